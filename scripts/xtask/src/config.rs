// SPDX-License-Identifier: MIT OR Apache-2.0
//! Machine descriptions: TOML configs under `configs/`, validated with every error located
//! (file, line, column, field), compiled into the binary blob of `vmcall_proto::config`.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use toml::Spanned;
use vmcall_proto::config as blob;
use vmcall_proto::config::valid_name;
use vmcall_proto::guest::WorkloadSpec;

/// The most CPUs a Bochs machine has with the host's control port (COM2): Bochs 2.7's
/// timer table (64 entries; each CPU's local APIC and VMX preemption timers take some, each
/// serial port three) overflows at 15 CPUs with COM2 and panics; 8 is the most measured to
/// work.
pub const COM2_MAX_CPUS: u32 = 8;

#[derive(Deserialize, Debug, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub machine: Machine,
    #[serde(default, rename = "guest")]
    pub guests: Vec<Guest>,
    #[serde(default, rename = "channel")]
    pub channels: Vec<Channel>,
    #[serde(default, rename = "grant")]
    pub grants: Vec<Grant>,
    #[serde(default, rename = "control")]
    pub controls: Vec<Control>,
    /// Network cards the emulator plugs into the machine's PCI slots, in order.
    #[serde(default, rename = "nic")]
    pub nics: Vec<Nic>,
}

/// `[[nic]]`: a network card `cargo xtask run` gives the emulated machine, in the next free
/// PCI slot, with user-mode networking (Bochs `slirp`) and host ports forwarded to it.
#[derive(Deserialize, Debug, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Nic {
    /// One of [`NIC_MODELS`].
    #[schemars(with = "String", extend("enum" = ["e1000", "ne2k"]))]
    pub model: Spanned<String>,
    /// Host ports forwarded to the card's guest: `"udp:5555"` (the same port on both
    /// sides) or `"tcp:18080-80"` (host 18080 to guest 80).
    #[serde(default)]
    #[schemars(with = "Option<Vec<String>>")]
    pub forward: Option<Spanned<Vec<Spanned<String>>>>,
}

/// A card model `[[nic]]` may name: the Bochs device and its PCI identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NicModel {
    pub name: &'static str,
    pub vendor: u16,
    pub device: u16,
}

impl NicModel {
    /// QEMU's device of the same model (`-device`).
    pub fn qemu_device(&self) -> &'static str {
        match self.name {
            "ne2k" => "ne2k_pci",
            _ => self.name,
        }
    }
    /// Whether it masters the bus (DMA) whatever its command register says: the same list
    /// the hypervisor refuses without `dma = "unconfined"`.
    pub fn bus_master(&self) -> bool {
        vmcall_proto::device::known_bus_master(self.vendor, self.device)
    }
}

/// The models `[[nic]]` accepts.
pub const NIC_MODELS: [NicModel; 2] = [
    NicModel { name: "e1000", vendor: 0x8086, device: 0x100e },
    NicModel { name: "ne2k", vendor: 0x10ec, device: 0x8029 },
];

/// Bochs has five PCI slots; slot `k` (1-based) is device `k + 1` on bus 0 (the host
/// bridge is 00:00.0 and the PIIX3 00:01.x).
pub const PCI_SLOTS: usize = 5;

/// The interrupt line Bochs's BIOS routes the `i`-th `[[nic]]`'s INTA# to (its PIRQ
/// routing: slots 1, 3 and 5 share line 9, slots 2 and 4 line 11).
pub fn nic_line(i: usize) -> u8 {
    if i.is_multiple_of(2) {
        9
    } else {
        11
    }
}

/// The I/O APIC input the `i`-th `[[nic]]`'s INTA# reaches on QEMU's q35 (`--emulator
/// qemu`, the card at the same address, `crate::run::Machine::qemu_nics`): the hypervisor
/// takes a bus-0 function's own PIRQ input there (`pci::q35_inputs`: slot `s` on PIRQ E + `s`
/// mod 4, inputs 20-23). Every two cards that share an input here share a line on Bochs
/// too (a host test checks it), so the config check's rule ([`nic_line`]) covers both.
pub fn qemu_nic_line(i: usize) -> u8 {
    20 + (nic_address(i).device % 4)
}

/// The PCI address the `i`-th `[[nic]]` (0-based) gets in Bochs (and in QEMU).
pub fn nic_address(i: usize) -> vmcall_proto::device::Bdf {
    vmcall_proto::device::Bdf::new(0, i as u8 + 2, 0)
}

/// A forwarded port: protocol, host port, guest port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    pub proto: &'static str,
    pub host: u16,
    pub guest: u16,
}

/// Parses a `forward` entry (`udp:5555`, `tcp:18080-80`).
pub fn parse_forward(s: &str) -> Option<Forward> {
    let (proto, ports) = s.split_once(':')?;
    let proto = ["udp", "tcp"].into_iter().find(|p| *p == proto)?;
    let (h, g) = ports.split_once('-').unwrap_or((ports, ports));
    let (host, guest) = (h.parse().ok()?, g.parse().ok()?);
    (host != 0 && guest != 0).then_some(Forward { proto, host, guest })
}

impl Config {
    /// The model of `[[nic]]` `i` (`None` for an unknown name).
    pub fn nic_model(&self, i: usize) -> Option<NicModel> {
        NIC_MODELS.iter().copied().find(|m| m.name == self.nics[i].model.get_ref())
    }
    /// The function a device selector names on the emulated machine: the `[[nic]]` index.
    pub fn nic_for(&self, sel: vmcall_proto::device::Selector) -> Option<usize> {
        use vmcall_proto::device::Selector;
        match sel {
            Selector::Address(b) => (0..self.nics.len()).find(|&i| nic_address(i) == b),
            Selector::Id { vendor, device, nth } => (0..self.nics.len())
                .filter(|&i| {
                    self.nic_model(i).is_some_and(|m| m.vendor == vendor && m.device == device)
                })
                .nth(nth as usize),
        }
    }
}

/// One entry of a guest's `devices`: a selector (`"00:03.0"`, `"8086:100e"`), or a table
/// with the selector and its DMA rule.
#[derive(Deserialize, Debug, Clone, PartialEq, Eq, schemars::JsonSchema)]
#[serde(untagged)]
pub enum DeviceSpec {
    Plain(String),
    Table {
        pci: String,
        #[serde(default)]
        dma: Option<String>,
    },
}

impl DeviceSpec {
    pub fn selector_text(&self) -> &str {
        match self {
            DeviceSpec::Plain(s) | DeviceSpec::Table { pci: s, .. } => s,
        }
    }
    pub fn dma(&self) -> Option<&str> {
        match self {
            DeviceSpec::Plain(_) => None,
            DeviceSpec::Table { dma, .. } => dma.as_deref(),
        }
    }
}

#[derive(Deserialize, Debug, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Machine {
    /// CPUs the machine has (the emulator gets this many unless `--cpus` says otherwise).
    #[schemars(with = "u32", range(min = 1, max = 64))]
    pub cpus: Spanned<u32>,
    /// Machine memory, MiB.
    #[schemars(with = "u32", range(min = 64, max = 2048))]
    pub memory_mib: Spanned<u32>,
    /// The membership failure detector's probe period in ms (0: off; absent: the
    /// hypervisor's default). Passed on as the command line's `probe_ms=N` unless that
    /// already says.
    #[serde(default)]
    #[schemars(with = "Option<u32>")]
    pub probe_ms: Option<Spanned<u32>>,
    /// Whether the host may stop, start, restart, park and query guests of the running
    /// machine (`cargo xtask ctl`), as a `[[control]]` controller of every guest would
    /// (default: false: requests are answered `refused`). Passed on as `host_control=1`.
    /// Needs at most 63 CPUs and the failure detector on (`probe_ms` > 0: its tick is
    /// when a core with a running guest looks at the host's channel).
    #[serde(default)]
    #[schemars(with = "Option<bool>")]
    pub host_control: Option<Spanned<bool>>,
    /// How a revoke reaches the holders' cores: `multicast` (absent: the hypervisor's
    /// default), `broadcast` or `tree`; passed on as the command line's `revoke=...`.
    #[serde(default)]
    #[schemars(with = "Option<String>", extend("enum" = ["multicast", "broadcast", "tree"]))]
    pub revoke: Option<Spanned<String>>,
    /// Heads per level of a revoke tree (2..=16; only with `revoke = "tree"`); passed on as
    /// `revoke_fanout=N`.
    #[serde(default)]
    #[schemars(with = "Option<u32>", range(min = 2, max = 16))]
    pub revoke_fanout: Option<Spanned<u32>>,
}

/// The machine's `revoke` strategies.
pub const REVOKE_STRATEGIES: [&str; 3] = ["multicast", "broadcast", "tree"];

#[derive(Deserialize, Debug, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Guest {
    #[schemars(with = "String", regex(pattern = r"^[A-Za-z0-9_-]{1,32}$"))]
    pub name: Spanned<String>,
    #[schemars(with = "u32")]
    pub core: Spanned<u32>,
    #[schemars(with = "u32")]
    pub memory_mib: Spanned<u32>,
    /// A built-in workload; with a `kernel`, any name, handed to it in the boot info.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub workload: Option<Spanned<String>>,
    #[serde(default)]
    #[schemars(with = "Option<BTreeMap<String, ArgValue>>")]
    pub args: Option<Spanned<Args>>,
    /// The guest's own kernel instead of the built-in one (checked by `crate::kernel`).
    #[serde(default)]
    #[schemars(with = "Option<KernelSpec>")]
    pub kernel: Option<Spanned<KernelSpec>>,
    /// `never` (default), `on-fault` or `always`.
    #[serde(default)]
    #[schemars(with = "Option<String>", extend("enum" = ["never", "on-fault", "always"]))]
    pub restart: Option<Spanned<String>>,
    /// Restarts allowed after the first start (default 3 when `restart` is not `never`).
    #[serde(default)]
    #[schemars(with = "Option<u32>")]
    pub max_restarts: Option<Spanned<u32>>,
    /// Run budget of each incarnation, ms (default: the command line's `budget_ms`).
    #[serde(default)]
    #[schemars(with = "Option<u32>")]
    pub budget_ms: Option<Spanned<u32>>,
    /// Exitless waiting: MONITOR/MWAIT without VM exits (a guest with channels only).
    #[serde(default)]
    #[schemars(with = "Option<bool>")]
    pub mwait: Option<Spanned<bool>>,
    /// PCI functions this guest owns (see `vmcall_proto::device`).
    #[serde(default)]
    #[schemars(with = "Option<Vec<DeviceSpec>>")]
    pub devices: Option<Spanned<Vec<Spanned<DeviceSpec>>>>,
}

impl Guest {
    /// The guest's device entries (none when it has no `devices`).
    pub fn device_specs(&self) -> &[Spanned<DeviceSpec>] {
        self.devices.as_ref().map_or(&[], |d| d.get_ref().as_slice())
    }
}

/// Default `max_restarts` for a guest that restarts.
pub const DEFAULT_MAX_RESTARTS: u16 = 3;

impl Guest {
    /// The restart policy's value in the blob (`None` for an unknown name).
    fn restart_policy(&self) -> Option<u8> {
        let name = self.restart.as_ref().map_or("never", |r| r.get_ref().as_str());
        blob::restart::NAMES.iter().position(|n| *n == name).map(|p| p as u8)
    }
}

/// `[[control]]`: guest `guest` controls the guests `over` (a guest-control capability each).
#[derive(Deserialize, Debug, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Control {
    #[schemars(with = "String")]
    pub guest: Spanned<String>,
    #[schemars(with = "Vec<String>")]
    pub over: Spanned<Vec<Spanned<String>>>,
}

/// A `kernel = ...` of a guest: an ELF file, or a guest crate `cargo xtask` builds. Paths
/// are relative to the config file.
#[derive(Deserialize, Debug, Clone, PartialEq, Eq, schemars::JsonSchema)]
#[serde(untagged)]
pub enum KernelSpec {
    File(String),
    Crate {
        #[serde(rename = "crate")]
        krate: String,
    },
}

impl fmt::Display for KernelSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KernelSpec::File(p) => write!(f, "file `{p}`"),
            KernelSpec::Crate { krate } => write!(f, "crate `{krate}`"),
        }
    }
}

/// The workload name the blob carries for a guest with its own kernel and no `workload`.
pub const OWN_KERNEL_WORKLOAD: &str = "main";

/// A guest's `args` table, each key and value with its place in the file.
pub type Args = BTreeMap<Spanned<String>, Spanned<ArgValue>>;

static NO_ARGS: Args = BTreeMap::new();

impl Guest {
    fn args(&self) -> &Args {
        self.args.as_ref().map_or(&NO_ARGS, |a| a.get_ref())
    }
    fn args_span(&self) -> std::ops::Range<usize> {
        self.args.as_ref().map_or(self.workload_span(), |a| a.span())
    }
    /// Where the guest says what it runs: its `workload`, else its `kernel`, else its name.
    fn workload_span(&self) -> std::ops::Range<usize> {
        (self.workload.as_ref().map(|w| w.span()))
            .or_else(|| self.kernel.as_ref().map(|k| k.span()))
            .unwrap_or_else(|| self.name.span())
    }
    /// The workload name the guest's kernel gets.
    pub fn workload_name(&self) -> &str {
        self.workload.as_ref().map_or(OWN_KERNEL_WORKLOAD, |w| w.get_ref())
    }
}

impl Config {
    /// The distinct kernels the guests name, in order of first use: kernel `i` here is
    /// module `vmcall_proto::config::KERNEL_MODULES[i + 1]`.
    pub fn kernels(&self) -> Vec<&KernelSpec> {
        let mut list: Vec<&KernelSpec> = Vec::new();
        for k in self.guests.iter().filter_map(|g| g.kernel.as_ref()) {
            if !list.contains(&k.get_ref()) {
                list.push(k.get_ref());
            }
        }
        list
    }
    /// A guest's kernel index in the blob (0: the built-in kernel).
    pub fn kernel_index(&self, g: &Guest) -> u16 {
        let k = g.kernel.as_ref().map(|k| k.get_ref());
        k.and_then(|k| self.kernels().iter().position(|o| *o == k)).map_or(0, |i| i as u16 + 1)
    }
}

#[derive(Deserialize, Debug, Clone, schemars::JsonSchema)]
#[serde(untagged)]
pub enum ArgValue {
    Int(i64),
    Bool(bool),
    Str(String),
}

impl fmt::Display for ArgValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ArgValue::Int(i) => write!(f, "{i}"),
            ArgValue::Bool(b) => write!(f, "{b}"),
            ArgValue::Str(s) => f.write_str(s),
        }
    }
}

#[derive(Deserialize, Debug, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Channel {
    #[schemars(with = "String")]
    pub name: Spanned<String>,
    #[schemars(with = "[String; 2]")]
    pub between: Spanned<[Spanned<String>; 2]>,
    #[schemars(with = "u32")]
    pub slots: Spanned<u32>,
}

#[derive(Deserialize, Debug, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    #[schemars(with = "String")]
    pub name: Spanned<String>,
    #[schemars(with = "String")]
    pub guest: Spanned<String>,
    #[schemars(with = "u32")]
    pub memory_mib: Spanned<u32>,
}

/// One problem in a config, located.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    pub column: usize,
    /// The field, as a path (`guest[1].core`).
    pub field: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: {}: {}", self.file, self.line, self.column, self.field, self.message)
    }
}

/// All the errors of one config, in source order.
#[derive(Debug)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for e in &self.0 {
            writeln!(f, "{e}")?;
        }
        write!(f, "{} error(s) in the config", self.0.len())
    }
}

impl std::error::Error for ConfigErrors {}

fn line_col(src: &str, offset: usize) -> (usize, usize) {
    let before = &src[..offset.min(src.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rfind('\n').map_or(before.len(), |nl| before.len() - nl - 1) + 1;
    (line, col)
}

struct Errors<'a> {
    file: &'a str,
    src: &'a str,
    list: Vec<(usize, ConfigError)>,
}

impl Errors<'_> {
    fn at(
        &mut self,
        span: std::ops::Range<usize>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) {
        let (line, column) = line_col(self.src, span.start);
        self.list.push((
            span.start,
            ConfigError {
                file: self.file.to_string(),
                line,
                column,
                field: field.into(),
                message: message.into(),
            },
        ));
    }
}

/// A validated config with its compiled blob.
pub struct Compiled {
    pub config: Config,
    pub blob: Vec<u8>,
    /// Non-fatal remarks (e.g. a guest on a core the machine may lack).
    pub warnings: Vec<String>,
    /// The config's file name and text, to locate errors found later (its kernels).
    pub file: String,
    pub src: String,
}

impl Compiled {
    /// An error at `span` of the config's text.
    pub fn error_at(
        &self,
        span: std::ops::Range<usize>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> ConfigError {
        let mut errs = Errors { file: &self.file, src: &self.src, list: Vec::new() };
        errs.at(span, field, message);
        errs.list.remove(0).1
    }
}

/// Parses and validates `src` (named `file` in errors) and compiles it.
/// Which rule of names (1 to 32 letters, digits, `-` or `_`) `name` breaks.
fn name_rule(name: &str) -> String {
    let rule = "use 1 to 32 letters, digits, '-' or '_'";
    if name.is_empty() {
        return format!("empty: {rule}");
    }
    if let Some((i, c)) =
        name.char_indices().find(|(_, c)| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
    {
        return format!("{c:?} at position {} is not allowed: {rule}", i + 1);
    }
    if name.len() > 32 {
        return format!("{} characters, more than 32: {rule}", name.len());
    }
    rule.to_string()
}

/// The field a byte offset of the source sits in, as `table.key` (`guest[1].key` in the
/// `n`-th `[[guest]]`): for errors toml reports without a path (a number too large).
fn field_at(src: &str, offset: usize) -> Option<String> {
    let before = src.get(..offset)?;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = &src[line_start..];
    let line = line.lines().next().unwrap_or("");
    let key = line.split_once('=')?.0.trim();
    if key.is_empty() || key.starts_with('[') {
        return None;
    }
    let header = src[..line_start].lines().rev().map(str::trim).find(|l| l.starts_with('['));
    Some(match header {
        None => key.to_string(),
        Some(h) if h.starts_with("[[") => {
            let table = h.trim_matches(|c| c == '[' || c == ']').trim();
            let n = src[..line_start]
                .lines()
                .filter(|l| {
                    l.trim().trim_start_matches("[[").trim_end_matches("]]").trim() == table
                        && l.trim().starts_with("[[")
                })
                .count();
            format!("{table}[{}].{key}", n.saturating_sub(1))
        }
        Some(h) => format!("{}.{key}", h.trim_matches(|c| c == '[' || c == ']').trim()),
    })
}

pub fn compile(file: &str, src: &str) -> Result<Compiled, ConfigErrors> {
    let mut errs = Errors { file, src, list: Vec::new() };
    // serde_path_to_error keeps the path of the value that failed (`guest[1].core`), which
    // toml's own error loses for type errors.
    let parsed = serde_path_to_error::deserialize(toml::Deserializer::new(src)).map_err(|e| {
        // `Spanned` values add a private segment of their own: not a field of the file.
        let full = e.path().to_string();
        let path = full
            .split('.')
            .filter(|seg| !seg.starts_with("$__serde_spanned"))
            .collect::<Vec<_>>()
            .join(".");
        (path, e.into_inner())
    });
    let config: Config = match parsed {
        Ok(c) => c,
        Err((path, e)) => {
            let span = e.span().unwrap_or(0..0);
            let msg = e.message().to_string();
            // For an unknown or missing key serde names it in the message: the field is
            // the key under its table's path.
            let key = msg
                .split('`')
                .nth(1)
                .filter(|_| msg.starts_with("unknown field") || msg.starts_with("missing field"));
            let field = match (key, path.as_str()) {
                (Some(k), "" | ".") => k.to_string(),
                (Some(k), p) if !p.ends_with(k) => format!("{p}.{k}"),
                // A value toml itself refuses (a number too large): the key on its line.
                (_, "" | ".") => field_at(src, span.start).unwrap_or_else(|| "(syntax)".into()),
                (_, p) => p.to_string(),
            };
            errs.at(span, field, msg);
            return Err(ConfigErrors(errs.list.into_iter().map(|(_, e)| e).collect()));
        }
    };
    let mut warnings = Vec::new();
    let m = &config.machine;
    if *m.cpus.get_ref() == 0 || *m.cpus.get_ref() > 64 {
        errs.at(m.cpus.span(), "machine.cpus", "must be between 1 and 64");
    }
    if let Some(p) = &m.probe_ms {
        let v = u64::from(*p.get_ref());
        if v != 0 && !(blob::MIN_PROBE_MS..=blob::MAX_PROBE_MS).contains(&v) {
            let msg = format!(
                "must be 0 (off) or between {} and {} ms: a core is fenced after 8 silent \
                 periods, which must outlast {} times the longest stretch a live core spends \
                 away from its inbox ({} us: a console turn and the longest step)",
                blob::MIN_PROBE_MS,
                blob::MAX_PROBE_MS,
                blob::DETECTOR_MARGIN,
                blob::LONGEST_STRETCH_US
            );
            errs.at(p.span(), "machine.probe_ms", &msg);
        }
    }
    if let Some(h) = m.host_control.as_ref().filter(|h| *h.get_ref()) {
        if *m.cpus.get_ref() > 63 {
            errs.at(
                h.span(),
                "machine.host_control",
                "needs at most 63 CPUs (the host's identity is the 64th core's)",
            );
        }
        if *m.cpus.get_ref() > COM2_MAX_CPUS {
            errs.at(
                h.span(),
                "machine.host_control",
                format!(
                    "needs at most {} CPUs in Bochs: with more, its second serial port overflows \
                     Bochs 2.7's timer table (\"register_timer: too many registered timers\")",
                    COM2_MAX_CPUS
                ),
            );
        }
        if m.probe_ms.as_ref().is_some_and(|p| *p.get_ref() == 0) {
            errs.at(
                h.span(),
                "machine.host_control",
                "needs the failure detector on (probe_ms > 0): its tick is when a core whose \
                 guest runs looks at the host's channel",
            );
        }
    }
    if let Some(r) = &m.revoke {
        if !REVOKE_STRATEGIES.contains(&r.get_ref().as_str()) {
            let msg = format!(
                "unknown revoke strategy `{}` (known: {})",
                r.get_ref(),
                REVOKE_STRATEGIES.join(", ")
            );
            errs.at(r.span(), "machine.revoke", msg);
        }
    }
    if let Some(f) = &m.revoke_fanout {
        if !(2..=16).contains(f.get_ref()) {
            errs.at(f.span(), "machine.revoke_fanout", "must be between 2 and 16");
        } else if m.revoke.as_ref().is_none_or(|r| r.get_ref() != "tree") {
            errs.at(f.span(), "machine.revoke_fanout", "given, but `revoke` is not `tree`");
        }
    }
    if *m.memory_mib.get_ref() < 64 || *m.memory_mib.get_ref() > 2048 {
        errs.at(m.memory_mib.span(), "machine.memory_mib", "must be between 64 and 2048 MiB");
    }
    if config.guests.is_empty() {
        errs.at(0..0, "guest", "a config needs at least one [[guest]]");
    }
    if config.guests.len() > blob::MAX_GUESTS {
        let msg = format!(
            "too many guests: at most {} (this config has {})",
            blob::MAX_GUESTS,
            config.guests.len()
        );
        errs.at(config.guests[blob::MAX_GUESTS].name.span(), "guest", &msg);
    }
    for (i, g) in config.guests.iter().enumerate() {
        let f = |k: &str| format!("guest[{i}].{k}");
        let name = g.name.get_ref();
        if !valid_name(name) || name.len() > 32 {
            errs.at(g.name.span(), f("name"), name_rule(name));
        }
        if let Some(prev) = config.guests[..i].iter().find(|o| o.name.get_ref() == name) {
            let (l, _) = line_col(src, prev.name.span().start);
            errs.at(
                g.name.span(),
                f("name"),
                format!("duplicate guest name `{name}` (first on line {l})"),
            );
        }
        let core = *g.core.get_ref();
        if let Some(prev) = config.guests[..i].iter().find(|o| *o.core.get_ref() == core) {
            errs.at(
                g.core.span(),
                f("core"),
                format!(
                    "core {core} already runs guest `{}`: one guest per core",
                    prev.name.get_ref()
                ),
            );
        }
        if core >= *m.cpus.get_ref() {
            warnings.push(format!(
                "guest `{name}` asks for core {core} but machine.cpus is {}: the hypervisor will skip it",
                m.cpus.get_ref()
            ));
        }
        let mem = *g.memory_mib.get_ref();
        if !(blob::MIN_GUEST_MIB..=blob::MAX_GUEST_MIB).contains(&mem) {
            errs.at(
                g.memory_mib.span(),
                f("memory_mib"),
                format!(
                    "{mem} MiB is out of bounds ({}..={} MiB)",
                    blob::MIN_GUEST_MIB,
                    blob::MAX_GUEST_MIB
                ),
            );
        } else if mem % 2 != 0 {
            errs.at(
                g.memory_mib.span(),
                f("memory_mib"),
                format!("{mem} MiB is not a multiple of 2 MiB"),
            );
        }
        let w = g.workload_name();
        check_kernel(&mut errs, g, &f("kernel"), &f("workload"));
        if g.kernel.is_none()
            && g.workload.is_some()
            && !vmcall_proto::guest::WORKLOADS.contains(&w)
        {
            errs.at(
                g.workload_span(),
                f("workload"),
                format!(
                    "unknown workload `{w}` (known: {})",
                    vmcall_proto::guest::WORKLOADS.join(", ")
                ),
            );
        }
        let args = args_string(g.args());
        if args.len() > 127 || args.contains('\0') {
            errs.at(
                g.args_span(),
                f("args"),
                "arguments longer than 127 bytes when written as key=value words",
            );
        }
        for (k, v) in g.args() {
            if !valid_name(k.get_ref()) || v.get_ref().to_string().contains(char::is_whitespace) {
                errs.at(
                    k.span(),
                    f("args"),
                    format!(
                        "argument `{}` must be a plain word = a value without spaces",
                        k.get_ref()
                    ),
                );
            }
        }
        if let Some(spec) = vmcall_proto::guest::workload_spec(w).filter(|_| g.kernel.is_none()) {
            check_args(&mut errs, &config, g, spec, &f("args"));
        }
        check_lifecycle(&mut errs, g, &f);
        if let Some(m) = g.mwait.as_ref().filter(|m| *m.get_ref()) {
            let name = g.name.get_ref();
            if !config
                .channels
                .iter()
                .any(|c| c.between.get_ref().iter().any(|e| e.get_ref() == name))
            {
                errs.at(
                    m.span(),
                    f("mwait"),
                    "exitless waiting is for a guest with channels (it waits on a channel's line)",
                );
            }
        }
    }
    check_controls(&mut errs, &config);
    check_devices(&mut errs, &config, &mut warnings);
    let total_mib: u64 = config.guests.iter().map(|g| *g.memory_mib.get_ref() as u64).sum();
    let grant_mib: u64 = config.grants.iter().map(|g| *g.memory_mib.get_ref() as u64).sum();
    let needed = blob::memory_needed(
        config.guests.iter().map(|g| *g.memory_mib.get_ref()),
        config.grants.iter().map(|g| *g.memory_mib.get_ref()),
        config.channels.iter().map(|c| *c.slots.get_ref()),
    );
    let available = blob::available_bytes(*m.memory_mib.get_ref());
    if needed > available {
        let span = config.guests.last().map_or(m.memory_mib.span(), |g| g.memory_mib.span());
        let mib = |b: u64| b.div_ceil(1 << 20);
        errs.at(
            span,
            "guest[*].memory_mib",
            format!(
                "guests ({total_mib} MiB, plus {} MiB private to each for its EPT tables and \
                 VMCS), grants ({grant_mib} MiB) and channel rings need {} MiB, more than the \
                 machine's {} MiB less {} MiB for the hypervisor and firmware",
                blob::GUEST_PRIVATE_BYTES >> 20,
                mib(needed),
                m.memory_mib.get_ref(),
                blob::HOST_RESERVED_MIB
            ),
        );
    }
    if let Some(g) = config
        .guests
        .iter()
        .find(|g| config.kernel_index(g) as usize > blob::MAX_KERNELS)
        .and_then(|g| g.kernel.as_ref())
    {
        errs.at(
            g.span(),
            "guest[*].kernel",
            format!("more than {} distinct kernels in one config", blob::MAX_KERNELS),
        );
    }
    let guest_index = |n: &str| config.guests.iter().position(|g| g.name.get_ref() == n);
    for (i, c) in config.channels.iter().enumerate() {
        let f = |k: &str| format!("channel[{i}].{k}");
        let name = c.name.get_ref();
        if !valid_name(name) || name.len() > 32 {
            errs.at(c.name.span(), f("name"), "use 1 to 32 letters, digits, '-' or '_'");
        }
        if config.channels[..i].iter().any(|o| o.name.get_ref() == name) {
            errs.at(c.name.span(), f("name"), format!("duplicate channel name `{name}`"));
        }
        let [a, b] = c.between.get_ref();
        for end in [a, b] {
            if guest_index(end.get_ref()).is_none() {
                errs.at(end.span(), f("between"), format!("unknown guest `{}`", end.get_ref()));
            }
        }
        if a.get_ref() == b.get_ref() {
            errs.at(c.between.span(), f("between"), "a channel joins two different guests");
        }
        let s = *c.slots.get_ref();
        if s == 0 || s > blob::MAX_SLOTS || !s.is_power_of_two() {
            errs.at(
                c.slots.span(),
                f("slots"),
                format!("{s}: must be a power of two in 1..={}", blob::MAX_SLOTS),
            );
        }
    }
    // Per-guest limits of the boot-info channel table and the grant slots.
    for (gi, g) in config.guests.iter().enumerate() {
        let name = g.name.get_ref();
        let channels = config
            .channels
            .iter()
            .filter(|c| c.between.get_ref().iter().any(|e| e.get_ref() == name))
            .count();
        let grants = config.grants.iter().filter(|gr| gr.guest.get_ref() == name).count();
        for (n, max, what, noun) in [
            (
                channels,
                vmcall_proto::guest::MAX_CHANNELS_PER_GUEST,
                "is an endpoint of",
                "channels",
            ),
            (grants, blob::MAX_GRANTS_PER_GUEST, "receives", "grants"),
        ] {
            if n > max {
                errs.at(
                    g.name.span(),
                    format!("guest[{gi}].name"),
                    format!("`{name}` {what} {n} {noun}; at most {max}"),
                );
            }
        }
    }
    for (i, g) in config.grants.iter().enumerate() {
        let f = |k: &str| format!("grant[{i}].{k}");
        let name = g.name.get_ref();
        if !valid_name(name) || name.len() > 32 {
            errs.at(g.name.span(), f("name"), name_rule(name));
        }
        if config.grants[..i].iter().any(|o| o.name.get_ref() == name) {
            errs.at(g.name.span(), f("name"), format!("duplicate grant name `{name}`"));
        }
        if guest_index(g.guest.get_ref()).is_none() {
            errs.at(g.guest.span(), f("guest"), format!("unknown guest `{}`", g.guest.get_ref()));
        }
        let mem = *g.memory_mib.get_ref();
        if mem == 0 || mem > blob::MAX_GRANT_MIB || mem % 2 != 0 {
            errs.at(
                g.memory_mib.span(),
                f("memory_mib"),
                format!("{mem} MiB: must be even, 2..={}", blob::MAX_GRANT_MIB),
            );
        }
    }
    if !errs.list.is_empty() {
        errs.list.sort_by_key(|(at, _)| *at);
        return Err(ConfigErrors(errs.list.into_iter().map(|(_, e)| e).collect()));
    }
    let blob = encode(&config).map_err(|m| {
        ConfigErrors(vec![ConfigError {
            file: file.into(),
            line: 1,
            column: 1,
            field: "(whole config)".into(),
            message: m,
        }])
    })?;
    Ok(Compiled { config, blob, warnings, file: file.into(), src: src.into() })
}

/// `[[nic]]` entries and every guest's `devices`: models and ports known, selectors well
/// formed and present on the emulated machine, each function given to one guest once, the
/// per-guest and total bounds, and the DMA rule (a bus-mastering card needs
/// `dma = "unconfined"`, which is then a warning naming guest and device).
fn check_devices(errs: &mut Errors<'_>, config: &Config, warnings: &mut Vec<String>) {
    use vmcall_proto::device::{parse_selector, MAX_DEVICES, MAX_DEVICES_PER_GUEST};
    if config.nics.len() > PCI_SLOTS {
        errs.at(
            config.nics[PCI_SLOTS].model.span(),
            format!("nic[{PCI_SLOTS}]"),
            format!("the emulated machine has {PCI_SLOTS} PCI slots"),
        );
    }
    let mut host_ports: Vec<(&str, u16, usize)> = Vec::new();
    for (i, n) in config.nics.iter().enumerate() {
        if config.nic_model(i).is_none() {
            let known: Vec<_> = NIC_MODELS.iter().map(|m| m.name).collect();
            let msg =
                format!("unknown model `{}` (known: {})", n.model.get_ref(), known.join(", "));
            errs.at(n.model.span(), format!("nic[{i}].model"), msg);
        }
        for (j, f) in n.forward.iter().flat_map(|f| f.get_ref().iter()).enumerate() {
            let field = format!("nic[{i}].forward[{j}]");
            match parse_forward(f.get_ref()) {
                None => errs.at(
                    f.span(),
                    field,
                    format!(
                        "`{}`: expected `udp:PORT`, `tcp:PORT` or `tcp:HOSTPORT-GUESTPORT` \
                         (ports 1..=65535)",
                        f.get_ref()
                    ),
                ),
                Some(fw) => {
                    if let Some(&(_, _, other)) =
                        host_ports.iter().find(|(p, h, _)| *p == fw.proto && *h == fw.host)
                    {
                        errs.at(
                            f.span(),
                            field,
                            format!(
                                "host {} port {} is forwarded by nic[{other}] already",
                                fw.proto, fw.host
                            ),
                        );
                    }
                    host_ports.push((fw.proto, fw.host, i));
                }
            }
        }
    }
    let mut taken: Vec<(usize, &str, usize)> = Vec::new(); // (nic, guest, line)
    let mut total = 0;
    for (gi, g) in config.guests.iter().enumerate() {
        let specs = g.device_specs();
        if specs.len() > MAX_DEVICES_PER_GUEST {
            errs.at(
                specs[MAX_DEVICES_PER_GUEST].span(),
                format!("guest[{gi}].devices"),
                format!("a guest owns at most {MAX_DEVICES_PER_GUEST} devices"),
            );
        }
        for (j, d) in specs.iter().enumerate() {
            total += 1;
            let field = format!("guest[{gi}].devices[{j}]");
            if total == MAX_DEVICES + 1 {
                errs.at(d.span(), field.clone(), format!("at most {MAX_DEVICES} devices in all"));
            }
            if let Some(dma) = d.get_ref().dma().filter(|d| *d != "unconfined") {
                errs.at(
                    d.span(),
                    field.clone(),
                    format!("dma = `{dma}`: the only value is \"unconfined\" (there is no IOMMU)"),
                );
            }
            let text = d.get_ref().selector_text();
            let sel = match parse_selector(text) {
                Ok(s) => s,
                Err(e) => {
                    errs.at(d.span(), field, format!("`{text}`: {e}"));
                    continue;
                }
            };
            let Some(nic) = config.nic_for(sel) else {
                let have: Vec<String> = (0..config.nics.len())
                    .map(|i| {
                        let m = config.nic_model(i);
                        let id = m.map_or(String::new(), |m| {
                            format!(" {:04x}:{:04x}", m.vendor, m.device)
                        });
                        format!("{} {}{id}", nic_address(i), config.nics[i].model.get_ref())
                    })
                    .collect();
                let have = if have.is_empty() {
                    "none: add a [[nic]]".to_string()
                } else {
                    have.join(", ")
                };
                errs.at(
                    d.span(),
                    field,
                    format!("`{text}`: the machine has no such device to give (its cards: {have})"),
                );
                continue;
            };
            let (line, _) = line_col(errs.src, d.span().start);
            if let Some(&(_, owner, first)) = taken.iter().find(|(n, _, _)| *n == nic) {
                errs.at(
                    d.span(),
                    field.clone(),
                    format!(
                        "`{text}` is {} ({}), already given to `{owner}` on line {first}: a device belongs to one guest",
                        nic_address(nic),
                        config.nics[nic].model.get_ref()
                    ),
                );
            }
            if let Some(&(other, owner, first)) = taken.iter().find(|(n, o, _)| {
                *n != nic && *o != g.name.get_ref() && nic_line(*n) == nic_line(nic)
            }) {
                errs.at(
                    d.span(),
                    field.clone(),
                    format!(
                        "`{text}` ({} {}) interrupts on line {}, as {} does, which `{owner}` \
                         owns (line {first}): a line belongs to one guest; put the cards in \
                         slots of different lines (slots 1, 3, 5: line 9; 2, 4: line 11)",
                        nic_address(nic),
                        config.nics[nic].model.get_ref(),
                        nic_line(nic),
                        nic_address(other)
                    ),
                );
            }
            taken.push((nic, g.name.get_ref(), line));
            let master = config.nic_model(nic).is_some_and(|m| m.bus_master());
            match d.get_ref().dma() {
                None if master => errs.at(
                    d.span(),
                    field,
                    format!(
                        "`{text}` ({}) masters the bus (DMA): without an IOMMU it can reach all \
                         memory, so say so: {{ pci = \"{text}\", dma = \"unconfined\" }}",
                        config.nics[nic].model.get_ref()
                    ),
                ),
                Some("unconfined") => warnings.push(format!(
                    "guest `{}` owns {} ({}) with dma = \"unconfined\": without an IOMMU the device \
                     can read and write all machine memory, other guests' and the hypervisor's",
                    g.name.get_ref(),
                    nic_address(nic),
                    config.nics[nic].model.get_ref()
                )),
                _ => {}
            }
        }
    }
}

/// What the config alone can tell about a guest's `kernel` (the files are checked by
/// `crate::kernel`): a path at all, and a `workload` that is a valid name.
fn check_kernel(errs: &mut Errors<'_>, g: &Guest, field: &str, workload_field: &str) {
    if let Some(k) = &g.kernel {
        let (KernelSpec::File(p) | KernelSpec::Crate { krate: p }) = k.get_ref();
        if p.trim().is_empty() {
            errs.at(k.span(), field, "an empty path: name an ELF file or `{ crate = \"dir\" }`");
        }
    } else if g.workload.is_none() {
        errs.at(
            g.name.span(),
            workload_field,
            "a guest needs a `workload` (built-in) or a `kernel` (its own)",
        );
    }
    let bad = |w: &&Spanned<String>| !valid_name(w.get_ref()) || w.get_ref().len() > 32;
    if let Some(w) = g.workload.as_ref().filter(bad).filter(|_| g.kernel.is_some()) {
        errs.at(w.span(), workload_field, "use 1 to 32 letters, digits, '-' or '_'");
    }
}

fn args_string(args: &Args) -> String {
    args.iter()
        .map(|(k, v)| format!("{}={}", k.get_ref(), v.get_ref()))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `a, b, c`, or the first eight and how many there are.
fn word_list(words: &[&str]) -> String {
    if words.len() <= 8 {
        words.join(", ")
    } else {
        format!("{}, ... ({} words; see the README)", words[..8].join(", "), words.len())
    }
}

/// Checks a guest's `args` against its workload's declared arguments
/// (`vmcall_proto::guest::WORKLOAD_SPECS`): known keys, types, ranges, channel names that
/// are the guest's own channels, required arguments present.
fn check_args(errs: &mut Errors<'_>, config: &Config, g: &Guest, spec: &WorkloadSpec, field: &str) {
    use vmcall_proto::guest::{ArgDefault, ArgKind};
    let w = spec.name;
    let known = || {
        if spec.args.is_empty() {
            format!("`{w}` takes no arguments")
        } else {
            let keys: Vec<_> = spec.args.iter().map(|a| a.key).collect();
            format!("`{w}` takes {}", keys.join(", "))
        }
    };
    let own_channels: Vec<&str> = config
        .channels
        .iter()
        .filter(|c| c.between.get_ref().iter().any(|e| e.get_ref() == g.name.get_ref()))
        .map(|c| c.name.get_ref().as_str())
        .collect();
    for (k, v) in g.args() {
        let key = k.get_ref();
        let field = format!("{field}.{key}");
        let Some(a) = spec.arg(key) else {
            errs.at(k.span(), field, format!("unknown argument `{key}`: {}", known()));
            continue;
        };
        let problem = match (a.kind, v.get_ref()) {
            (ArgKind::Int { min, max }, ArgValue::Int(n)) => (u64::try_from(*n)
                .map_or(true, |n| n < min || n > max))
            .then(|| format!("{n} is out of range {min}..={max}")),
            (ArgKind::Int { min, max }, other) => {
                Some(format!("`{other}` is not a whole number (expected {min}..={max})"))
            }
            (ArgKind::Word(words), ArgValue::Str(s)) => (!words.contains(&s.as_str()))
                .then(|| format!("`{s}` is not one of {}", word_list(words))),
            (ArgKind::Word(words), other) => {
                Some(format!("`{other}` is not a word (expected one of {})", word_list(words)))
            }
            (ArgKind::Channel, ArgValue::Str(s)) => {
                (!own_channels.contains(&s.as_str())).then(|| {
                    if own_channels.is_empty() {
                        format!("no channel `{s}`: guest `{}` has no channels", g.name.get_ref())
                    } else {
                        format!(
                            "no channel `{s}` of guest `{}` (its channels: {})",
                            g.name.get_ref(),
                            own_channels.join(", ")
                        )
                    }
                })
            }
            (ArgKind::Channel, other) => Some(format!("`{other}` is not a channel name")),
        };
        if let Some(p) = problem {
            errs.at(v.span(), field, format!("{p}: {}", a.meaning));
        }
    }
    for a in spec.args {
        let given = g.args().keys().any(|k| k.get_ref() == a.key);
        match a.default {
            ArgDefault::Required if !given => errs.at(
                g.args_span(),
                field.to_string(),
                format!("workload `{w}` needs argument `{}` ({})", a.key, a.meaning),
            ),
            ArgDefault::FirstChannel if !given && own_channels.is_empty() => errs.at(
                g.workload_span(),
                field.to_string(),
                format!(
                    "workload `{w}` uses a channel (`{}`) but guest `{}` has none",
                    a.key,
                    g.name.get_ref()
                ),
            ),
            _ => {}
        }
    }
}

/// `restart`, `max_restarts`, `budget_ms` of one guest.
fn check_lifecycle(errs: &mut Errors, g: &Guest, f: &impl Fn(&str) -> String) {
    if let Some(r) = &g.restart {
        if g.restart_policy().is_none() {
            errs.at(
                r.span(),
                f("restart"),
                format!(
                    "unknown restart policy `{}` (known: {})",
                    r.get_ref(),
                    blob::restart::NAMES.join(", ")
                ),
            );
        }
    }
    if let Some(m) = &g.max_restarts {
        if *m.get_ref() > blob::MAX_RESTARTS as u32 {
            errs.at(m.span(), f("max_restarts"), format!("at most {}", blob::MAX_RESTARTS));
        } else if g.restart_policy() == Some(blob::restart::NEVER) {
            errs.at(m.span(), f("max_restarts"), "given, but `restart` is `never` (the default)");
        }
    }
    if let Some(b) = &g.budget_ms {
        if !(1..=blob::MAX_BUDGET_MS).contains(b.get_ref()) {
            errs.at(b.span(), f("budget_ms"), format!("must be in 1..={}", blob::MAX_BUDGET_MS));
        }
    }
}

/// `[[control]]` tables: the controller and every controlled guest exist, none controls
/// itself, no pair twice.
fn check_controls(errs: &mut Errors, c: &Config) {
    let known = |n: &str| c.guests.iter().any(|g| g.name.get_ref() == n);
    let index = |n: &str| c.guests.iter().position(|g| g.name.get_ref() == n);
    let mut masks = vec![0u64; c.guests.len().min(blob::MAX_GUESTS)];
    for ctl in &c.controls {
        let Some(i) = index(ctl.guest.get_ref()).filter(|&i| i < masks.len()) else { continue };
        for o in ctl.over.get_ref() {
            if let Some(t) = index(o.get_ref()).filter(|&t| t < 64 && t != i) {
                masks[i] |= 1 << t;
            }
        }
    }
    // Every cap a guest starts with has a slot: grants, then channel endpoints, then control.
    for (i, g) in c.guests.iter().enumerate() {
        let name = g.name.get_ref();
        let grants = c.grants.iter().filter(|r| r.guest.get_ref() == name).count();
        let ends = c
            .channels
            .iter()
            .filter(|ch| ch.between.get_ref().iter().any(|e| e.get_ref() == name))
            .count();
        let controls = masks.get(i).map_or(0, |m| m.count_ones() as usize);
        if grants + ends + controls > vmcall_proto::caps::MAX_SLOTS {
            errs.at(
                g.name.span(),
                format!("guest[{i}].name"),
                format!(
                    "`{name}` would start with {} capabilities ({grants} grants, {ends} \
                     channels, {controls} guests to control): at most {}",
                    grants + ends + controls,
                    vmcall_proto::caps::MAX_SLOTS
                ),
            );
        }
    }
    if let Some(i) = blob::control_cycle(&masks) {
        let who = c.guests[i].name.get_ref();
        if let Some((k, ctl)) =
            c.controls.iter().enumerate().find(|(_, x)| x.guest.get_ref() == who)
        {
            errs.at(
                ctl.guest.span(),
                format!("control[{k}].guest"),
                format!(
                    "`{who}` is in a cycle of guests controlling each other: each would wait \
                     for the other to let go"
                ),
            );
        }
    }
    for (i, ctl) in c.controls.iter().enumerate() {
        let who = ctl.guest.get_ref();
        if !known(who) {
            errs.at(ctl.guest.span(), format!("control[{i}].guest"), format!("no guest `{who}`"));
        }
        if ctl.over.get_ref().is_empty() {
            errs.at(ctl.over.span(), format!("control[{i}].over"), "names no guest");
        }
        for (j, o) in ctl.over.get_ref().iter().enumerate() {
            let field = format!("control[{i}].over[{j}]");
            let name = o.get_ref();
            if !known(name) {
                errs.at(o.span(), field, format!("no guest `{name}`"));
            } else if name == who {
                errs.at(o.span(), field, format!("guest `{who}` cannot control itself"));
            } else if c.controls[..=i]
                .iter()
                .flat_map(|p| p.over.get_ref().iter().map(move |x| (p, x)))
                .take_while(|(_, x)| !std::ptr::eq(*x, o))
                .any(|(p, x)| p.guest.get_ref() == who && x.get_ref() == name)
            {
                errs.at(o.span(), field, format!("`{who}` already controls `{name}`"));
            }
        }
    }
}

fn encode(c: &Config) -> Result<Vec<u8>, String> {
    let idx = |n: &str| c.guests.iter().position(|g| g.name.get_ref() == n).unwrap_or(0) as u16;
    let guests = c
        .guests
        .iter()
        .map(|g| {
            blob::guest_entry(
                g.name.get_ref(),
                g.workload_name(),
                &args_string(g.args()),
                *g.core.get_ref(),
                *g.memory_mib.get_ref(),
            )
            .map(|mut e| {
                e.restart = g.restart_policy().unwrap_or(blob::restart::NEVER);
                e.max_restarts = match &g.max_restarts {
                    Some(m) => *m.get_ref() as u16,
                    None if e.restart != blob::restart::NEVER => DEFAULT_MAX_RESTARTS,
                    None => 0,
                };
                e.kernel = c.kernel_index(g);
                e.budget_ms = g.budget_ms.as_ref().map_or(0, |b| *b.get_ref());
                if g.mwait.as_ref().is_some_and(|m| *m.get_ref()) {
                    e.flags |= blob::flags::MWAIT;
                }
                e.controls = c
                    .controls
                    .iter()
                    .filter(|ctl| ctl.guest.get_ref() == g.name.get_ref())
                    .flat_map(|ctl| ctl.over.get_ref().iter())
                    .fold(0u64, |m, o| m | 1 << idx(o.get_ref()));
                e
            })
            .ok_or_else(|| format!("guest `{}` does not fit the blob", g.name.get_ref()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let channels: Vec<blob::ChannelEntry> = c
        .channels
        .iter()
        .map(|ch| blob::ChannelEntry {
            name: vmcall_proto::fixed::put(ch.name.get_ref()).unwrap_or([0; 32]),
            a: idx(ch.between.get_ref()[0].get_ref()),
            b: idx(ch.between.get_ref()[1].get_ref()),
            slots: *ch.slots.get_ref(),
            _reserved: [0; 8],
        })
        .collect();
    let grants: Vec<blob::GrantEntry> = c
        .grants
        .iter()
        .map(|g| blob::GrantEntry {
            name: vmcall_proto::fixed::put(g.name.get_ref()).unwrap_or([0; 32]),
            guest: idx(g.guest.get_ref()),
            _reserved0: 0,
            memory_mib: *g.memory_mib.get_ref(),
            _reserved: [0; 8],
        })
        .collect();
    let devices: Vec<vmcall_proto::device::DeviceEntry> = c
        .guests
        .iter()
        .enumerate()
        .flat_map(|(gi, g)| g.device_specs().iter().map(move |d| (gi, d.get_ref())))
        .filter_map(|(gi, d)| {
            let sel = vmcall_proto::device::parse_selector(d.selector_text()).ok()?;
            let flags = if d.dma() == Some("unconfined") {
                vmcall_proto::device::flags::DMA_UNCONFINED
            } else {
                0
            };
            Some(vmcall_proto::device::device_entry(gi as u16, sel, flags))
        })
        .collect();
    let mut out =
        vec![0; blob::blob_len(guests.len(), channels.len(), grants.len(), devices.len())];
    blob::encode(&guests, &channels, &grants, &devices, &mut out)
        .ok_or("counts too large for the blob")?;
    // The hypervisor validates the same blob again; check here that it will accept it.
    blob::parse(&out).map_err(|e| format!("compiled blob rejected: {e}"))?;
    Ok(out)
}

/// Reads and compiles a config file.
pub fn load(path: &Path) -> anyhow::Result<Compiled> {
    // Only a regular file of bounded size (a FIFO or a device would block or fill memory).
    let src = crate::files::read_config(path).map_err(|e| anyhow::anyhow!("config: {e}"))?;
    Ok(compile(&path.display().to_string(), &src)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[machine]
cpus = 4
memory_mib = 256

[[guest]]
name = "alpha"
core = 0
memory_mib = 16
workload = "hello"

[[guest]]
name = "beta"
core = 1
memory_mib = 8
workload = "spin"
args = { ms = 5 }

[[channel]]
name = "ab"
between = ["alpha", "beta"]
slots = 64

[[grant]]
name = "pool"
guest = "beta"
memory_mib = 4
"#;

    fn errors(src: &str) -> Vec<ConfigError> {
        match compile("t.toml", src) {
            Ok(_) => panic!("accepted:\n{src}"),
            Err(e) => e.0,
        }
    }

    fn one_error(src: &str) -> ConfigError {
        let e = errors(src);
        assert_eq!(e.len(), 1, "{e:#?}");
        e.into_iter().next().unwrap()
    }

    #[test]
    fn good_config_compiles_to_a_valid_blob() {
        let c = compile("t.toml", GOOD).unwrap();
        let b = blob::parse(&c.blob).unwrap();
        assert_eq!(b.guest_count(), 2);
        assert_eq!(vmcall_proto::fixed::get(&b.guest(1).args), Some("ms=5"));
        let ch = b.channels().next().unwrap();
        assert_eq!((ch.a, ch.b, ch.slots), (0, 1, 64));
        assert_eq!(b.grants().next().unwrap().guest, 1);
        assert!(c.warnings.is_empty());
    }

    #[test]
    fn probe_ms_is_checked_and_zero_turns_the_detector_off() {
        let with = |v: &str| {
            GOOD.replacen("memory_mib = 256\n", &format!("memory_mib = 256\nprobe_ms = {v}\n"), 1)
        };
        assert!(with("0").contains("probe_ms = 0"), "GOOD has no `memory_mib = 256` line");
        assert!(compile("t.toml", &with("0")).is_ok());
        assert!(compile("t.toml", &with("10000")).is_ok());
        assert!(compile("t.toml", &with("12")).is_ok());
        for bad in ["10001", "1", "11"] {
            let e = one_error(&with(bad));
            assert_eq!(e.field, "machine.probe_ms", "{e}");
            assert!(e.message.contains("0 (off) or between 12 and 10000"), "{e}");
            assert!(e.message.contains("times the longest stretch"), "{e}");
        }
        assert!(!errors(&with("\"fast\"")).is_empty(), "a string is refused");
    }

    #[test]
    fn revoke_strategy_and_fanout_are_checked_at_their_line() {
        let with = |extra: &str| {
            GOOD.replacen("memory_mib = 256\n", &format!("memory_mib = 256\n{extra}"), 1)
        };
        assert!(compile("t.toml", &with("revoke = \"multicast\"\n")).is_ok());
        assert!(compile("t.toml", &with("revoke = \"broadcast\"\n")).is_ok());
        assert!(compile("t.toml", &with("revoke = \"tree\"\n")).is_ok());
        assert!(compile("t.toml", &with("revoke = \"tree\"\nrevoke_fanout = 16\n")).is_ok());
        let line = GOOD.lines().position(|l| l == "memory_mib = 256").unwrap() + 2;
        let e = one_error(&with("revoke = \"star\"\n"));
        assert_eq!((e.field.as_str(), e.line), ("machine.revoke", line), "{e}");
        assert!(e
            .message
            .contains("unknown revoke strategy `star` (known: multicast, broadcast, tree)"));
        for bad in ["1", "17", "0"] {
            let e = one_error(&with(&format!("revoke = \"tree\"\nrevoke_fanout = {bad}\n")));
            assert_eq!((e.field.as_str(), e.line), ("machine.revoke_fanout", line + 1), "{e}");
            assert!(e.message.contains("between 2 and 16"), "{e}");
        }
        let e = one_error(&with("revoke_fanout = 3\n"));
        assert_eq!(e.field, "machine.revoke_fanout", "{e}");
        assert!(e.message.contains("`revoke` is not `tree`"), "{e}");
        assert!(!errors(&with("revoke = 2\n")).is_empty(), "a number is refused");
        assert!(!errors(&with("revoke = \"tree\"\nrevoke_fanout = \"2\"\n")).is_empty());
    }

    #[test]
    fn unknown_key() {
        let e = one_error(&GOOD.replace("memory_mib = 8", "memroy_mib = 8"));
        assert_eq!((e.line, e.field.as_str()), (15, "guest[1].memroy_mib"));
        assert!(e.message.contains("unknown field"), "{e}");
        assert!(
            e.to_string().starts_with("t.toml:15:1: guest[1].memroy_mib: unknown field"),
            "{e}"
        );
    }

    #[test]
    fn duplicate_names() {
        let errs = errors(&GOOD.replace("name = \"beta\"", "name = \"alpha\""));
        let dup = errs.iter().find(|e| e.field == "guest[1].name").expect("duplicate reported");
        assert_eq!((dup.line, dup.column), (13, 8));
        assert!(dup.message.contains("duplicate guest name `alpha` (first on line 7)"));
    }

    #[test]
    fn two_guests_on_one_core() {
        let e = one_error(&GOOD.replace("core = 1", "core = 0"));
        assert_eq!((e.line, e.column, e.field.as_str()), (14, 8, "guest[1].core"));
        assert!(e.message.contains("already runs guest `alpha`"));
    }

    #[test]
    fn zero_absurd_and_odd_memory() {
        let e = one_error(&GOOD.replace("memory_mib = 16", "memory_mib = 0"));
        assert_eq!((e.line, e.field.as_str()), (9, "guest[0].memory_mib"));
        let e = errors(&GOOD.replace("memory_mib = 16", "memory_mib = 100000"));
        assert!(e[0].message.contains("out of bounds"), "{e:?}");
        assert!(e[1].message.contains("more than the machine"), "{e:?}");
        let e = one_error(&GOOD.replace("memory_mib = 16", "memory_mib = 7"));
        assert!(e.message.contains("multiple of 2"));
    }

    #[test]
    fn total_memory_over_the_machine() {
        let e = one_error(&GOOD.replace("memory_mib = 16", "memory_mib = 220"));
        assert_eq!(e.field, "guest[*].memory_mib");
        assert!(e.message.contains("more than the machine's 256 MiB"), "{e}");
    }

    #[test]
    fn private_regions_count_against_the_machine() {
        // 4 x 56 MiB is exactly 256 - 32, but each guest also needs its 2-MiB private
        // region: the hypervisor would leave the fourth guest `not_started`.
        let guest = |k: u32| {
            format!(
                "[[guest]]\nname = \"g{k}\"\ncore = {k}\nmemory_mib = 56\nworkload = \"spin\"\n"
            )
        };
        let four: String = (0..4).map(guest).collect();
        let src = format!("[machine]\ncpus = 4\nmemory_mib = 256\n\n{four}");
        let e = one_error(&src);
        assert_eq!(e.field, "guest[*].memory_mib");
        assert!(e.message.contains("need 232 MiB"), "{e}");
        let fits = src.replace("memory_mib = 56", "memory_mib = 54");
        assert!(compile("t.toml", &fits).is_ok());
    }

    #[test]
    fn references_to_unknown_guests() {
        let e = one_error(&GOOD.replace("[\"alpha\", \"beta\"]", "[\"alpha\", \"gamma\"]"));
        assert_eq!((e.line, e.field.as_str()), (21, "channel[0].between"));
        assert!(e.message.contains("unknown guest `gamma`"));
        let e = one_error(&GOOD.replace("guest = \"beta\"", "guest = \"delta\""));
        assert_eq!((e.line, e.field.as_str()), (26, "grant[0].guest"));
    }

    /// GOOD with two cards and `alpha` owning `dev` (a `devices` line of its own).
    fn with_devices(alpha: &str, beta: &str) -> String {
        let nics =
            "[[nic]]\nmodel = \"e1000\"\nforward = [\"udp:5555\"]\n\n[[nic]]\nmodel = \"ne2k\"\n";
        let s = GOOD.replace("workload = \"hello\"", &format!("workload = \"hello\"\n{alpha}"));
        let s = s.replace("args = { ms = 5 }", &format!("args = {{ ms = 5 }}\n{beta}"));
        format!("{s}\n{nics}")
    }

    #[test]
    fn devices_compile_into_the_blob() {
        let src = with_devices(
            "devices = [{ pci = \"00:02.0\", dma = \"unconfined\" }]",
            "devices = [\"10ec:8029\"]",
        );
        let c = compile("t.toml", &src).unwrap();
        assert!(c.warnings.iter().any(|w| w.contains("`alpha` owns 00:02.0 (e1000) with dma")));
        let b = blob::parse(&c.blob).unwrap();
        let d: Vec<_> = b.devices().collect();
        assert_eq!(d.len(), 2);
        assert_eq!((d[0].guest, d[0].select, d[0].device, d[0].flags), (0, 0, 2, 1));
        assert_eq!(
            (d[1].guest, d[1].vendor_id, d[1].device_id, d[1].flags),
            (1, 0x10ec, 0x8029, 0)
        );
    }

    #[test]
    fn bad_devices_are_refused_at_their_line() {
        let cases = [
            // (alpha's devices line, beta's, field, message part)
            ("devices = [\"00:2.0\"]", "", "guest[0].devices[0]", "expected a PCI address"),
            ("devices = [\"00:09.0\"]", "", "guest[0].devices[0]", "no such device"),
            ("devices = [\"8086:100e#1\"]", "", "guest[0].devices[0]", "no such device"),
            ("devices = [\"00:02.0\"]", "", "guest[0].devices[0]", "masters the bus"),
            (
                "devices = [{ pci = \"00:02.0\", dma = \"iommu\" }]",
                "",
                "guest[0].devices[0]",
                "the only value",
            ),
            (
                "devices = [\"00:03.0\"]",
                "devices = [\"10ec:8029\"]",
                "guest[1].devices[0]",
                "already given to `alpha` on line 11",
            ),
            (
                "devices = [\"00:03.0\", \"00:03.0\"]",
                "",
                "guest[0].devices[1]",
                "already given to `alpha`",
            ),
        ];
        for (a, b, field, msg) in cases {
            let src = with_devices(a, b);
            let e = one_error(&src);
            assert_eq!(e.field, field, "{a} / {b}: {e}");
            assert!(e.message.contains(msg), "{a} / {b}: {e}");
            let line = src.lines().position(|l| l.contains("devices")).unwrap() + 1;
            if field == "guest[0].devices[0]" {
                assert_eq!(e.line, line, "{e}");
            }
        }
        let unknown = with_devices("", "").replace("model = \"ne2k\"", "model = \"rtl8139\"");
        let e = one_error(&unknown);
        assert_eq!(e.field, "nic[1].model");
        assert!(e.message.contains("known: e1000, ne2k"), "{e}");
        let bad_fw = with_devices("", "").replace("udp:5555", "udp:0");
        assert_eq!(one_error(&bad_fw).field, "nic[0].forward[0]");
        let none =
            GOOD.replace("workload = \"hello\"", "workload = \"hello\"\ndevices = [\"00:02.0\"]");
        assert!(one_error(&none).message.contains("none: add a [[nic]]"));
    }

    #[test]
    fn two_guests_cards_on_one_line_are_refused() {
        // Three cards: slots 1 and 3 share line 9.
        let src = with_devices(
            "devices = [{ pci = \"00:02.0\", dma = \"unconfined\" }]",
            "devices = [\"00:04.0\"]",
        ) + "\n[[nic]]\nmodel = \"ne2k\"\n";
        let e = one_error(&src);
        assert_eq!(e.field, "guest[1].devices[0]");
        assert!(
            e.message.contains("interrupts on line 9, as 00:02.0 does, which `alpha` owns"),
            "{e}"
        );
        // One guest may own both; different lines are fine.
        let own_both = with_devices(
            "devices = [{ pci = \"00:02.0\", dma = \"unconfined\" }, \"00:04.0\"]",
            "",
        ) + "\n[[nic]]\nmodel = \"ne2k\"\n";
        assert!(compile("t.toml", &own_both).is_ok());
        assert_eq!((nic_line(0), nic_line(1), nic_line(2)), (9, 11, 9));
        // q35: 00:02.0 and 00:03.0 on PIRQ G and H; only slots 1 and 5 share, as on Bochs.
        assert_eq!((qemu_nic_line(0), qemu_nic_line(1), qemu_nic_line(4)), (22, 23, 22));
        for i in 0..PCI_SLOTS {
            for j in 0..PCI_SLOTS {
                if qemu_nic_line(i) == qemu_nic_line(j) {
                    assert_eq!(nic_line(i), nic_line(j), "slots {} and {}", i + 1, j + 1);
                }
            }
        }
    }

    #[test]
    fn forwards_parse() {
        assert_eq!(
            parse_forward("udp:5555"),
            Some(Forward { proto: "udp", host: 5555, guest: 5555 })
        );
        assert_eq!(
            parse_forward("tcp:18080-80"),
            Some(Forward { proto: "tcp", host: 18080, guest: 80 })
        );
        for bad in ["", "udp", "icmp:1", "udp:0", "tcp:1-0", "tcp:70000", "udp:a"] {
            assert_eq!(parse_forward(bad), None, "{bad}");
        }
    }

    #[test]
    fn mwait_is_a_flag_for_guests_with_channels() {
        const AB: &str =
            "[[channel]]\nname = \"ab\"\nbetween = [\"alpha\", \"beta\"]\nslots = 64\n";
        assert!(GOOD.contains(AB));
        let on = GOOD.replace("args = { ms = 5 }", "args = { ms = 5 }\nmwait = true");
        let cfg = compile("t.toml", &on).unwrap();
        let cfg = blob::parse(&cfg.blob).unwrap();
        assert_eq!((cfg.guest(0).flags, cfg.guest(1).flags), (0, blob::flags::MWAIT));
        let off = on.replace("mwait = true", "mwait = false");
        let cfg = compile("t.toml", &off).unwrap();
        assert_eq!(blob::parse(&cfg.blob).unwrap().guest(1).flags, 0);
        let e = one_error(&on.replace(AB, ""));
        assert_eq!(e.field, "guest[1].mwait");
        assert!(e.message.contains("a guest with channels"), "{e}");
        let e = one_error(&on.replace("mwait = true", "mwait = 1"));
        assert!(e.message.contains("bool"), "{e}");
    }

    #[test]
    fn restart_policies_budgets_and_control() {
        const AB: &str =
            "[[channel]]\nname = \"ab\"\nbetween = [\"alpha\", \"beta\"]\nslots = 64\n";
        assert!(GOOD.contains(AB));
        let src = GOOD.replace(AB, "").replace(
            "args = { ms = 5 }",
            "args = { ms = 5 }\nrestart = \"on-fault\"\nbudget_ms = 700",
        ) + "[[control]]\nguest = \"alpha\"\nover = [\"beta\"]\n";
        let c = compile("t.toml", &src).unwrap();
        let cfg = blob::parse(&c.blob).unwrap();
        let (a, b) = (cfg.guest(0), cfg.guest(1));
        assert_eq!((b.restart, b.max_restarts, b.budget_ms), (blob::restart::ON_FAULT, 3, 700));
        assert_eq!((a.restart, a.max_restarts, a.budget_ms), (blob::restart::NEVER, 0, 0));
        assert_eq!((a.controls, b.controls), (0b10, 0));

        let bad = |from: &str, to: &str| one_error(&src.replace(from, to));
        let e = bad("\"on-fault\"", "\"sometimes\"");
        assert_eq!((e.line, e.field.as_str()), (18, "guest[1].restart"));
        assert!(e.message.contains("unknown restart policy `sometimes` (known: never"), "{e}");
        let e = bad("budget_ms = 700", "budget_ms = 0");
        assert_eq!(e.field, "guest[1].budget_ms");
        let e = bad("budget_ms = 700", "max_restarts = 1001");
        assert!(e.message.contains("at most 1000"), "{e}");
        let e = bad("restart = \"on-fault\"", "max_restarts = 2");
        assert!(e.message.contains("`restart` is `never`"), "{e}");
        let e = bad("over = [\"beta\"]", "over = [\"alpha\"]");
        assert_eq!(e.field, "control[0].over[0]");
        assert!(e.message.contains("cannot control itself"), "{e}");
        let e = bad("over = [\"beta\"]", "over = [\"beta\", \"gamma\"]");
        assert_eq!(
            (e.field.as_str(), e.message.as_str()),
            ("control[0].over[1]", "no guest `gamma`")
        );
        let e = bad("over = [\"beta\"]", "over = [\"beta\", \"beta\"]");
        assert!(e.message.contains("already controls"), "{e}");
        let e = bad("guest = \"alpha\"\nover", "guest = \"nobody\"\nover");
        assert_eq!(e.field, "control[0].guest");
        assert!(bad("over = [\"beta\"]", "over = []").message.contains("names no guest"));
        let e = one_error(&src.replace("over = [\"beta\"]", "over = [\"beta\"]\nextra = 1"));
        assert!(e.message.contains("unknown field `extra`"), "{e}");
        // Guests with channels may be restarted and controlled (their channels are reset).
        assert!(compile("t.toml", &format!("{src}{AB}")).is_ok());
        // A cycle of control is refused where it starts.
        let cycle = format!("{src}[[control]]\nguest = \"beta\"\nover = [\"alpha\"]\n");
        let e = one_error(&cycle);
        assert_eq!(e.field, "control[0].guest");
        assert!(e.message.contains("`alpha` is in a cycle"), "{e}");
    }

    #[test]
    fn at_most_eight_grants_per_guest() {
        let grants = |n: usize| {
            (0..n)
                .map(|k| format!("[[grant]]\nname = \"g{k}\"\nguest = \"beta\"\nmemory_mib = 2\n"))
                .collect::<String>()
        };
        assert!(compile("t.toml", &format!("{GOOD}{}", grants(7))).is_ok(), "eight is fine");
        let e = one_error(&format!("{GOOD}{}", grants(8)));
        assert_eq!((e.line, e.field.as_str()), (13, "guest[1].name"));
        assert!(e.message.contains("`beta` receives 9 grants; at most 8"), "{e}");
    }

    #[test]
    fn channel_rules() {
        let e = one_error(&GOOD.replace("[\"alpha\", \"beta\"]", "[\"alpha\", \"alpha\"]"));
        assert!(e.message.contains("two different guests"));
        let e = one_error(&GOOD.replace("slots = 64", "slots = 0"));
        assert_eq!((e.line, e.field.as_str()), (22, "channel[0].slots"));
    }

    #[test]
    fn duplicate_channels_and_too_many_per_guest() {
        let two = GOOD.replace(
            "[[grant]]",
            "[[channel]]\nname = \"ab\"\nbetween = [\"beta\", \"alpha\"]\nslots = 8\n\n[[grant]]",
        );
        let e = one_error(&two);
        assert_eq!((e.line, e.column, e.field.as_str()), (25, 8, "channel[1].name"));
        assert!(e.message.contains("duplicate channel name `ab`"));
        let mut many = GOOD.to_string();
        for k in 0..16 {
            many += &format!(
                "\n[[channel]]\nname = \"x{k}\"\nbetween = [\"alpha\", \"beta\"]\nslots = 8\n"
            );
        }
        let errs = errors(&many);
        assert_eq!(errs.len(), 2, "{errs:#?}");
        assert!(errs[0].message.contains("`alpha` is an endpoint of 17 channels; at most 16"));
        assert_eq!(errs[0].line, 7);
    }

    #[test]
    fn a_number_too_large_for_toml_keeps_its_field_and_names_say_which_rule_broke() {
        let big = GOOD.replacen("memory_mib = 256\n", "memory_mib = 99999999999999999999\n", 1);
        let Err(errs) = compile("t.toml", &big) else { panic!("accepted") };
        let errs = errs.0;
        assert_eq!(errs[0].field, "machine.memory_mib", "{}", errs[0]);
        let src = "[machine]\ncpus = 1\n\n[[guest]]\nname = \"a\"\n\n[[guest]]\ncore = 9\n";
        assert_eq!(field_at(src, src.find("= 9").unwrap() + 2).as_deref(), Some("guest[1].core"));
        assert_eq!(field_at(src, src.find("= 1").unwrap() + 2).as_deref(), Some("machine.cpus"));
        assert!(name_rule("a b").starts_with("' ' at position 2"));
        assert!(name_rule(&"x".repeat(33)).starts_with("33 characters"));
        assert!(name_rule("").starts_with("empty"));
    }

    #[test]
    fn guests_name_their_own_kernels() {
        let own = GOOD
            .replace("workload = \"hello\"", "kernel = \"a.elf\"\nargs = { anything = 3 }")
            .replace("workload = \"spin\"", "kernel = { crate = \"../g\" }\nworkload = \"x\"");
        let c = compile("t.toml", &own).unwrap();
        let b = blob::parse(&c.blob).unwrap();
        assert_eq!((b.guest(0).kernel, b.guest(1).kernel), (1, 2));
        assert_eq!(vmcall_proto::fixed::get(&b.guest(0).workload), Some(OWN_KERNEL_WORKLOAD));
        assert_eq!(vmcall_proto::fixed::get(&b.guest(1).workload), Some("x"));
        assert_eq!(vmcall_proto::fixed::get(&b.guest(0).args), Some("anything=3"));
        assert_eq!(
            c.config.kernels(),
            [&KernelSpec::File("a.elf".into()), &KernelSpec::Crate { krate: "../g".into() }]
        );
        // The same kernel twice is one module; the built-in workloads stay index 0.
        let same = GOOD
            .replace("workload = \"hello\"", "kernel = \"a.elf\"")
            .replace("workload = \"spin\"\nargs = { ms = 5 }", "kernel = \"a.elf\"");
        let b = compile("t.toml", &same).unwrap().blob;
        let b = blob::parse(&b).unwrap();
        assert_eq!((b.guest(0).kernel, b.guest(1).kernel), (1, 1));
        let b = compile("t.toml", GOOD).unwrap().blob;
        assert_eq!(blob::parse(&b).unwrap().guest(0).kernel, 0);
    }

    #[test]
    fn bad_kernel_entries_are_located() {
        let e = one_error(&GOOD.replace("workload = \"hello\"", "kernel = \"\""));
        assert_eq!((e.line, e.column, e.field.as_str()), (10, 10, "guest[0].kernel"));
        assert!(e.message.contains("empty path"), "{e}");
        let e =
            one_error(&GOOD.replace("workload = \"hello\"", "kernel = \"k\"\nworkload = \"a b\""));
        assert_eq!((e.line, e.field.as_str()), (11, "guest[0].workload"));
        let e = one_error(&GOOD.replace("workload = \"hello\"", "kernel = { path = \"k\" }"));
        assert_eq!(e.line, 10, "{e}");
        let mut many = GOOD.replace("cpus = 4", "cpus = 16").replace("256", "1024");
        for k in 0..=blob::MAX_KERNELS {
            many += &format!(
                "\n[[guest]]\nname = \"k{k}\"\ncore = {}\nmemory_mib = 4\nkernel = \"k{k}.elf\"\n",
                k + 2
            );
        }
        let e = one_error(&many);
        assert_eq!(e.field, "guest[*].kernel");
        assert!(e.message.contains("more than 6 distinct kernels"), "{e}");
    }

    #[test]
    fn unknown_workload_and_syntax_errors() {
        let e = one_error(&GOOD.replace("\"spin\"", "\"spinn\""));
        assert_eq!((e.line, e.field.as_str()), (16, "guest[1].workload"));
        let e = one_error(&GOOD.replace("cpus = 4", "cpus = "));
        assert_eq!((e.line, e.field.as_str()), (3, "machine.cpus"));
        let e = one_error(&GOOD.replace("workload = \"hello\"\n", ""));
        assert_eq!((e.line, e.field.as_str()), (7, "guest[0].workload"));
        assert!(e.message.contains("needs a `workload` (built-in) or a `kernel`"), "{e}");
    }

    #[test]
    fn type_errors_name_their_field_and_line() {
        let e = one_error(&GOOD.replace("core = 1", "core = \"one\""));
        assert_eq!((e.line, e.field.as_str()), (14, "guest[1].core"), "{e}");
        assert!(e.message.contains("invalid type"), "{e}");
        let e = one_error(&GOOD.replace("cpus = 4", "cpus = -4"));
        assert_eq!((e.line, e.field.as_str()), (3, "machine.cpus"), "{e}");
        let e = one_error(&GOOD.replace("slots = 64", "slots = [64]"));
        assert_eq!((e.line, e.field.as_str()), (22, "channel[0].slots"), "{e}");
        let e = one_error(&GOOD.replace("memory_mib = 4\n", "memory_mib = 4\nsize = 2\n"));
        assert_eq!(e.field, "grant[0].size", "{e}");
    }

    #[test]
    fn every_error_is_reported_not_just_the_first() {
        let bad = GOOD.replace("core = 1", "core = 0").replace("slots = 64", "slots = 3");
        let e = errors(&bad);
        assert_eq!(e.len(), 2);
        assert!(e[0].line < e[1].line, "in source order");
    }

    #[test]
    fn missing_core_is_a_warning() {
        let c = compile("t.toml", &GOOD.replace("core = 1", "core = 9")).unwrap();
        assert_eq!(c.warnings.len(), 1);
    }

    #[test]
    fn shipped_configs_compile() {
        let root = crate::workspace_root().join("configs");
        let mut n = 0;
        for dir in [root.clone(), root.join("hostile")] {
            for e in std::fs::read_dir(&dir).unwrap() {
                let p = e.unwrap().path();
                if p.extension().is_some_and(|x| x == "toml")
                    && !p.file_name().unwrap().to_string_lossy().starts_with("bad-")
                {
                    load(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                    n += 1;
                }
            }
        }
        assert!(n >= 10, "configs/ and configs/hostile/");
    }

    const RELAY: &str = r#"
[machine]
cpus = 2
memory_mib = 256

[[guest]]
name = "a"
core = 0
memory_mib = 8
workload = "relay"
args = { to = "ab", from = "ba" }

[[guest]]
name = "b"
core = 1
memory_mib = 8
workload = "relay"
args = { to = "ba", from = "ab", n = 10 }

[[channel]]
name = "ab"
between = ["a", "b"]
slots = 8

[[channel]]
name = "ba"
between = ["b", "a"]
slots = 8
"#;

    #[test]
    fn workload_arguments_are_checked() {
        assert!(compile("t.toml", RELAY).is_ok());
        // Negative, out of range, wrong type: located at the value.
        let e = one_error(&GOOD.replace("ms = 5", "ms = -5"));
        assert_eq!((e.line, e.column, e.field.as_str()), (17, 15, "guest[1].args.ms"));
        assert!(e.message.starts_with("-5 is out of range 1..=3600000"), "{e}");
        let e = one_error(&GOOD.replace("ms = 5", "ms = \"fast\""));
        assert!(e.message.starts_with("`fast` is not a whole number"), "{e}");
        let e = one_error(&RELAY.replace("n = 10", "n = true"));
        assert_eq!(e.field, "guest[1].args.n");
        // A misspelt key: located at the key, with the keys the workload knows.
        let e = one_error(&GOOD.replace("ms = 5", "msec = 5"));
        assert_eq!((e.line, e.column, e.field.as_str()), (17, 10, "guest[1].args.msec"));
        assert_eq!(e.message, "unknown argument `msec`: `spin` takes ms");
        let e = one_error(
            &GOOD.replace("workload = \"hello\"", "workload = \"fault\"\nargs = { n = 1 }"),
        );
        assert!(e.message.contains("`fault` takes no arguments"), "{e}");
        // Words.
        let attack = GOOD.replace("\"spin\"", "\"attack\"").replace("ms = 5", "which = \"vmxon\"");
        assert!(compile("t.toml", &attack).is_ok());
        let e = one_error(&attack.replace("vmxon", "vmxonn"));
        assert!(e.message.starts_with("`vmxonn` is not one of all, fence, msr-"), "{e}");
    }

    #[test]
    fn channel_arguments_name_the_guest_s_own_channels() {
        let e =
            one_error(&RELAY.replace("to = \"ab\", from = \"ba\"", "to = \"ab\", from = \"bx\""));
        assert_eq!((e.line, e.field.as_str()), (11, "guest[0].args.from"));
        assert!(
            e.message.starts_with("no channel `bx` of guest `a` (its channels: ab, ba)"),
            "{e}"
        );
        // A channel that exists but joins two other guests is not this guest's.
        let three = format!(
            "{RELAY}\n[[guest]]\nname = \"c\"\ncore = 2\nmemory_mib = 8\nworkload = \"hello\"\n\n\
             [[channel]]\nname = \"bc\"\nbetween = [\"b\", \"c\"]\nslots = 8\n"
        )
        .replace("from = \"ba\" }", "from = \"bc\" }");
        let e = one_error(&three);
        assert!(e.message.starts_with("no channel `bc` of guest `a`"), "{e}");
        // Required arguments; a channel workload without a channel.
        let e = one_error(&RELAY.replace("to = \"ab\", from = \"ba\"", "to = \"ab\""));
        assert_eq!(e.field, "guest[0].args");
        assert!(e.message.starts_with("workload `relay` needs argument `from`"), "{e}");
        let e = one_error(&GOOD.replace("\"hello\"", "\"ping\"").replace(
            "[[channel]]\nname = \"ab\"\nbetween = [\"alpha\", \"beta\"]\nslots = 64\n",
            "",
        ));
        assert!(
            e.message
                .contains("workload `ping` uses a channel (`channel`) but guest `alpha` has none"),
            "{e}"
        );
    }
}
