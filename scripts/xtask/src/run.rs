// SPDX-License-Identifier: MIT OR Apache-2.0
//! Booting the ISO in an emulator: the run directory, the emulator's command line, the live
//! console, the progress line, and the end of the run (end record, emulator exit, timeout).

use crate::cli::{Emulator, RunArgs};
use crate::meta;
use crate::report::{line_guest, Console, Phase, Report};
use anyhow::{bail, Context, Result};
use process_wrap::std::{ChildWrapper, CommandWrap, ProcessGroup};
use std::io::{IsTerminal, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Default Bochs CPU model: has EPT, VPID, unrestricted guest (see shared/EMULATORS.md).
pub const DEFAULT_BOCHS_MODEL: &str = "corei7_skylake_x";
/// Default QEMU CPU model under TCG.
pub const DEFAULT_QEMU_MODEL: &str = "max";

/// After the end record, how long the emulator gets to exit by itself.
const EXIT_GRACE: Duration = Duration::from_secs(15);

/// Run folders kept under `target/xtask/` when `MKVISOR_KEEP_RUNS` does not say.
pub const DEFAULT_KEEP_RUNS: usize = 20;

/// Where the run folders live, and the console's plain text (kept below `run` and `watch`,
/// which both use them).
pub use crate::{report::strip_ansi, runs_root};

/// How many run folders to keep: `MKVISOR_KEEP_RUNS`, else [`DEFAULT_KEEP_RUNS`].
pub fn keep_runs() -> Result<usize> {
    match std::env::var("MKVISOR_KEEP_RUNS") {
        Ok(v) => v.trim().parse().map_err(|_| {
            crate::exit::coded(
                crate::exit::USAGE,
                anyhow::anyhow!("MKVISOR_KEEP_RUNS={v:?}: expected a number of run folders"),
            )
        }),
        Err(_) => Ok(DEFAULT_KEEP_RUNS),
    }
}

/// The process that made a run folder `<tag>-<pid>-<n>`, if the name says.
fn run_owner(name: &str) -> Option<u32> {
    let mut parts = name.rsplitn(3, '-');
    let _n: u32 = parts.next()?.parse().ok()?;
    parts.next()?.parse().ok()
}

/// Removes the run folders under `root` except the `keep` newest, and except any whose
/// process is still alive (a run in progress, here or in another `cargo xtask`). Returns
/// what it removed.
pub fn prune_runs(root: &Path, keep: usize) -> Result<Vec<PathBuf>> {
    let Ok(entries) = std::fs::read_dir(root) else { return Ok(vec![]) };
    let mut runs = vec![];
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = run_owner(&name) else { continue };
        if !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let alive = pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists();
        let modified = e.metadata().and_then(|m| m.modified()).ok();
        runs.push((modified, alive, e.path()));
    }
    // Newest first.
    runs.sort_by_key(|r| std::cmp::Reverse(r.0));
    let mut removed = vec![];
    for (_, alive, path) in runs.into_iter().skip(keep) {
        if !alive {
            match std::fs::remove_dir_all(&path) {
                Ok(()) => removed.push(path),
                // Another run of this tool (a parallel test) removed it first.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("removing {}", path.display()));
                }
            }
        }
    }
    Ok(removed)
}

/// `cargo xtask clean`: removes the run folders but the `keep` newest (and those of runs in
/// progress).
pub fn clean(keep: usize) -> Result<()> {
    let before = tree_bytes(&runs_root());
    let removed = prune_runs(&runs_root(), keep)?;
    let freed = before.saturating_sub(tree_bytes(&runs_root()));
    crate::exit::note(format_args!(
        "xtask clean: removed {} run folder(s) under {}, {:.1} MiB freed",
        removed.len(),
        runs_root().display(),
        freed as f64 / (1 << 20) as f64
    ));
    Ok(())
}

/// Bytes of the files under `dir` (what can be read of it; symbolic links not followed).
pub fn tree_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => tree_bytes(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map_or(0, |m| m.len()),
            _ => 0,
        })
        .sum()
}

/// A fresh directory for one run's files (ISO, emulator config, serial log, emulator log).
/// Older run folders beyond `MKVISOR_KEEP_RUNS` (default 20) go first.
pub fn run_dir(tag: &str) -> Result<PathBuf> {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    // One slot for the new folder. Cleaning up is never a reason for a run to fail.
    if let Err(e) = prune_runs(&runs_root(), keep_runs()?.saturating_sub(1)) {
        crate::exit::warn(format_args!("old run folders not cleaned up: {e:#}"));
    }
    let dir = runs_root().join(format!("{tag}-{}-{n}", std::process::id()));
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// The CPU interface KVM can hand the guest (`--emulator qemu-kvm`): the hypervisor picks
/// its backend from CPUID at boot (`backend: vmx` or `backend: svm`), so QEMU only has to
/// pass the host's on, nested.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvmBackend {
    /// Intel VT-x: `kvm_intel` with `nested=1`.
    Vmx,
    /// AMD SVM: `kvm_amd` with `nested=1`.
    Svm,
}

impl KvmBackend {
    /// QEMU's `-cpu` for it: the host's CPU with the virtualization extension forced on.
    pub fn qemu_cpu(self) -> &'static str {
        match self {
            KvmBackend::Vmx => "host,+vmx",
            KvmBackend::Svm => "host,+svm",
        }
    }
}

/// What decides whether QEMU with KVM can run mkvisor: read from the host by
/// [`KvmHost::probe`], made up in tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KvmHost {
    /// `/dev/kvm` exists.
    pub dev_kvm: bool,
    /// CPUID.01H:ECX.VMX and CPUID.8000_0001H:ECX.SVM of the host.
    pub vmx: bool,
    pub svm: bool,
    /// `/sys/module/kvm_intel/parameters/nested`, `/sys/module/kvm_amd/parameters/nested`
    /// (`None`: the module is not loaded).
    pub nested_intel: Option<String>,
    pub nested_amd: Option<String>,
}

impl KvmHost {
    pub fn probe() -> KvmHost {
        let cpuid = raw_cpuid::CpuId::new();
        let read = |p: &str| std::fs::read_to_string(p).ok().map(|s| s.trim().to_string());
        KvmHost {
            dev_kvm: Path::new("/dev/kvm").exists(),
            vmx: cpuid.get_feature_info().is_some_and(|f| f.has_vmx()),
            svm: cpuid
                .get_extended_processor_and_feature_identifiers()
                .is_some_and(|f| f.has_svm()),
            nested_intel: read("/sys/module/kvm_intel/parameters/nested"),
            nested_amd: read("/sys/module/kvm_amd/parameters/nested"),
        }
    }

    /// The backend KVM offers a guest here, or why none (to print as it is).
    pub fn backend(&self) -> Result<KvmBackend, String> {
        let on = |n: &Option<String>| matches!(n.as_deref(), Some("Y" | "y" | "1"));
        if !self.dev_kvm {
            return Err("/dev/kvm does not exist (no KVM on this host, or not for this user): \
                        nested runs need a Linux host with kvm_intel or kvm_amd loaded and \
                        nested=1; use --emulator qemu (TCG, SVM) or bochs (VT-x)"
                .into());
        }
        match (self.vmx, self.svm) {
            (true, _) if on(&self.nested_intel) => Ok(KvmBackend::Vmx),
            (true, _) => Err(format!(
                "the host has VT-x but kvm_intel is {}: load it with nested=1 \
                 (`modprobe kvm_intel nested=1`) so that guests get VMX",
                self.nested_intel.as_ref().map_or("not loaded".into(), |n| format!("nested={n}"))
            )),
            (false, true) if on(&self.nested_amd) => Ok(KvmBackend::Svm),
            (false, true) => Err(format!(
                "the host has AMD SVM but kvm_amd is {}: load it with nested=1 \
                 (`modprobe kvm_amd nested=1`) so that guests get SVM",
                self.nested_amd.as_ref().map_or("not loaded".into(), |n| format!("nested={n}"))
            )),
            (false, false) => Err("the host CPU has neither VMX nor SVM (CPUID), so KVM cannot \
                                   give a guest either; use --emulator qemu or bochs"
                .into()),
        }
    }
}

/// The CPU models Bochs 2.7 knows (`bochs -help cpu`); any other name stops it at once.
pub const BOCHS_MODELS: &[&str] = &[
    "bx_generic",
    "pentium",
    "pentium_mmx",
    "amd_k6_2_chomper",
    "p2_klamath",
    "p3_katmai",
    "p4_willamette",
    "core_duo_t2400_yonah",
    "atom_n270",
    "p4_prescott_celeron_336",
    "athlon64_clawhammer",
    "athlon64_venice",
    "turion64_tyler",
    "phenom_8650_toliman",
    "core2_penryn_t9600",
    "corei5_lynnfield_750",
    "corei5_arrandale_m520",
    "corei7_sandy_bridge_2600k",
    "zambezi",
    "trinity_apu",
    "ryzen",
    "corei7_ivy_bridge_3770k",
    "corei7_haswell_4770",
    "broadwell_ult",
    "corei7_skylake_x",
    "corei3_cnl",
    "corei7_icelake_u",
    "tigerlake",
];

/// Bochs 2.7 stops at once with 16 CPUs or more (`register_timer: too many registered
/// timers`; see shared/EMULATORS.md).
pub const BOCHS_MAX_CPUS: u32 = 15;

/// What the emulator would reject or misread, found before anything is built: an unknown
/// Bochs CPU model, more CPUs than Bochs supports, a run directory Bochs cannot name in its
/// config (its values are quoted, which works for spaces and commas, not for `"`).
pub fn check_emulator_args(
    emulator: Emulator,
    cpus: u32,
    model: &str,
    runs_under: &Path,
) -> std::result::Result<(), String> {
    if emulator != Emulator::Bochs {
        return Ok(());
    }
    if !BOCHS_MODELS.contains(&model) {
        return Err(format!(
            "--cpu-model: Bochs 2.7 has no CPU model `{model}`; it knows {}",
            BOCHS_MODELS.join(", ")
        ));
    }
    if cpus > BOCHS_MAX_CPUS {
        return Err(format!(
            "{cpus} CPUs: Bochs 2.7 supports at most {BOCHS_MAX_CPUS} (at 16 it stops with \
             `register_timer: too many registered timers`)"
        ));
    }
    let dir = runs_under.display().to_string();
    if dir.contains(['"', '\n', '\r']) {
        return Err(format!(
            "the run directory {dir:?} contains a quote or a line break, which a Bochs config \
             cannot hold; set CARGO_TARGET_DIR to another directory"
        ));
    }
    Ok(())
}

/// The config's guests whose core the machine will not have: the emulated CPUs, capped by
/// the hypervisor's `cpus=N` (its last one wins, as in the hypervisor).
pub fn guests_without_a_core(
    config: &crate::config::Config,
    cpus: u32,
    cmdline: &str,
) -> (u32, Vec<(String, u32)>) {
    let cap = cmdline
        .split_ascii_whitespace()
        .filter_map(|w| w.strip_prefix("cpus=")?.parse::<u32>().ok())
        .next_back();
    let cores = cap.map_or(cpus, |c| c.min(cpus));
    let missing = config
        .guests
        .iter()
        .filter(|g| *g.core.get_ref() >= cores)
        .map(|g| (g.name.get_ref().clone(), *g.core.get_ref()))
        .collect();
    (cores, missing)
}

/// Why the emulator stopped, in its own words: Bochs' PANIC lines and its exit message, or
/// else its first error lines, from its log and its console output.
pub fn emulator_diagnosis(texts: &[&str]) -> Vec<String> {
    // `00000000000p[SYS   ] >>PANIC<< register_timer: ...` -> `register_timer: ...`
    fn message(line: &str) -> &str {
        let rest = line.split_once("] ").map_or(line, |(_, r)| r);
        rest.trim_start_matches(">>PANIC<<").trim()
    }
    let is_level = |line: &str, level: char| {
        let digits = line.bytes().take_while(u8::is_ascii_digit).count();
        digits > 0 && line[digits..].starts_with(level) && line[digits + 1..].starts_with('[')
    };
    let mut panics = vec![];
    let mut errors = vec![];
    for text in texts {
        for line in text.lines() {
            let line = line.trim_end();
            if is_level(line, 'p') || line.contains(">>PANIC<<") {
                panics.push(format!("Bochs panic: {}", message(line)));
            } else if is_level(line, 'e') && !line.contains("notify called") {
                errors.push(format!("Bochs error: {}", message(line)));
            }
        }
    }
    let mut out = if panics.is_empty() { errors } else { panics };
    let mut seen = std::collections::BTreeSet::new();
    out.retain(|l| seen.insert(l.clone()));
    out.truncate(4);
    out
}

/// A value of a Bochs config line: quoted, so that spaces and commas in paths survive.
fn bochs_quoted(p: &Path) -> String {
    format!("\"{}\"", p.display())
}

fn bochsrc(iso: &Path, dir: &Path, cpus: u32, model: &str, megs: u32) -> String {
    format!(
        "megs: {megs}\n\
         romimage: file=/usr/share/bochs/BIOS-bochs-latest, options=fastboot\n\
         vgaromimage: file=/usr/share/vgabios/vgabios.bin\n\
         ata0-master: type=cdrom, path={iso}, status=inserted\n\
         boot: cdrom\n\
         cpu: model={model}, count={cpus}, ips=4000000, reset_on_triple_fault=0\n\
         clock: sync=none\n\
         display_library: term\n\
         com1: enabled=1, mode=file, dev={serial}\n\
         log: {log}\n\
         panic: action=fatal\n\
         error: action=report\n\
         info: action=report\n\
         debug: action=ignore\n\
         sound: driver=dummy\n",
        iso = bochs_quoted(iso),
        serial = bochs_quoted(&dir.join("serial.txt")),
        log = bochs_quoted(&dir.join("bochs.log")),
    )
}

/// Set by SIGINT, SIGTERM or SIGHUP (see [`catch_interrupts`]); the run loop stops on it.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);
/// Process groups of the emulators running now, for the signal handler and the panic hook.
static GROUPS: Mutex<Vec<u32>> = Mutex::new(Vec::new());

/// Kills every running emulator's whole process group (SIGKILL: Bochs ignores SIGTERM).
pub fn kill_all_emulators() {
    let groups = GROUPS.lock().map(|g| g.clone()).unwrap_or_default();
    for pgid in groups {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pgid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// For the `cargo xtask` process only (not for the library users, whose test harness owns
/// the signals): SIGINT, SIGTERM and SIGHUP end the run in progress as `interrupted` (the
/// loop kills the emulator and writes the report); a second signal kills the emulators and
/// exits at once. A panic kills the emulators too (release builds abort, so no `Drop` runs).
pub fn catch_interrupts() -> Result<()> {
    ctrlc::set_handler(|| {
        if INTERRUPTED.swap(true, Ordering::SeqCst) {
            kill_all_emulators();
            std::process::exit(crate::exit::INTERRUPTED.into());
        }
    })
    .context("cannot install the SIGINT/SIGTERM handler")?;
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        kill_all_emulators();
        previous(info);
    }));
    Ok(())
}

/// A running emulator in its own process group (so a terminal's Ctrl-C reaches only
/// xtask, and every process it starts can be killed at once). Dropping it kills the group
/// and reaps it, whichever way the run ends: normal end, timeout, signal, error, unwinding.
struct EmulatorProcess {
    child: Box<dyn ChildWrapper>,
    pgid: u32,
}

impl EmulatorProcess {
    fn start(cmd: Command) -> std::io::Result<Self> {
        let mut wrap = CommandWrap::from(cmd);
        wrap.wrap(ProcessGroup::leader());
        // Registered before the child can run long: the lock is held across the spawn so a
        // signal handler that kills all groups cannot miss it.
        let mut groups = GROUPS.lock().unwrap_or_else(|p| p.into_inner());
        let child = wrap.spawn()?;
        // The leader's pid is the group id.
        let pgid = child.id();
        groups.push(pgid);
        Ok(EmulatorProcess { child, pgid })
    }

    fn try_wait(&mut self) -> std::io::Result<Option<std::process::ExitStatus>> {
        self.child.try_wait()
    }

    fn kill(&mut self) {
        let _ = self.child.start_kill();
    }

    fn wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.wait().ok()
    }
}

impl Drop for EmulatorProcess {
    fn drop(&mut self) {
        // Whatever is still in the group goes, even after the leader has exited.
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(self.pgid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = self.child.wait();
        if let Ok(mut g) = GROUPS.lock() {
            g.retain(|&p| p != self.pgid);
        }
    }
}

fn spawn(
    args: &RunArgs,
    m: &Machine,
    iso: &Path,
    dir: &Path,
    model: &str,
    com2: Option<u16>,
) -> Result<EmulatorProcess> {
    let out = std::fs::File::create(dir.join("emulator.out"))?;
    let err = out.try_clone()?;
    let mut cmd = match args.emulator {
        Emulator::Bochs => {
            let mut rc = bochsrc(iso, dir, m.cpus, model, m.memory_mib) + &m.bochs_nics(dir)?;
            if let Some(port) = com2 {
                // The host's control channel (`crate::hostctl`): Bochs connects at its start.
                rc += &format!("com2: enabled=1, mode=socket-client, dev=127.0.0.1:{port}\n");
            }
            m.print_forwards();
            std::fs::write(dir.join("bochsrc"), rc)?;
            std::fs::write(dir.join("cont.rc"), "c\n")?;
            let mut c = Command::new("bochs");
            // The `term` display needs no TCP port (rfb binds one per instance, and parallel
            // runs once exhausted 5900-5949) and no tty, only a TERM.
            c.env("TERM", "dumb");
            c.arg("-q").arg("-f").arg(dir.join("bochsrc")).arg("-rc").arg(dir.join("cont.rc"));
            c
        }
        Emulator::Qemu | Emulator::QemuKvm => {
            let mut c = Command::new("qemu-system-x86_64");
            c.args([
                "-machine",
                "q35",
                "-m",
                &m.memory_mib.to_string(),
                "-smp",
                &m.cpus.to_string(),
            ])
            .args(["-display", "none", "-monitor", "none", "-no-reboot"])
            // The host's pause (`ctl pause`: `hostctl::Stopper::Qmp`).
            .arg("-qmp")
            .arg(format!(
                "unix:{},server=on,wait=off",
                dir.join(crate::hostctl::QMP_SOCKET).display()
            ))
            .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"])
            .arg("-serial")
            .arg(format!("file:{}", dir.join("serial.txt").display()));
            if let Some(port) = com2 {
                c.arg("-serial").arg(format!("tcp:127.0.0.1:{port}"));
            }
            c.arg("-cdrom").arg(iso);
            c.args(m.qemu_nics());
            m.print_forwards();
            if args.emulator == Emulator::QemuKvm {
                // `prepare` found the backend (a run that gets here has one).
                let cpu = KvmHost::probe().backend().map_or("host", KvmBackend::qemu_cpu);
                c.args(["-enable-kvm", "-cpu", cpu]);
            } else {
                c.args(["-cpu", model]);
            }
            c
        }
    };
    cmd.stdin(Stdio::null()).stdout(out).stderr(err).current_dir(dir);
    // The emulator dies with the thread that started it, even when xtask is killed without
    // its process group (SIGKILL of xtask alone): no orphaned emulator keeps running.
    // What the emulator creates is its owner's only (umask 077): QEMU's QMP socket, through
    // which a client could stop or quit the machine, as the relay's own socket (0600).
    // The closure runs in the child between fork and exec; it allocates nothing and takes
    // no lock.
    // SAFETY: it calls only prctl(2) and umask(2), which are async-signal-safe.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(std::io::Error::from)
        });
    }
    crate::exit::running(&cmd);
    EmulatorProcess::start(cmd).with_context(|| format!("cannot start {}", args.emulator.name()))
}

/// The emulated machine: CPUs, memory, and the network cards in its PCI slots (model, host
/// ports forwarded to it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Machine {
    pub cpus: u32,
    pub memory_mib: u32,
    pub nics: Vec<(crate::config::NicModel, Vec<crate::config::Forward>)>,
}

impl Machine {
    /// One line per forwarded port, on stderr, before the emulator starts.
    fn print_forwards(&self) {
        for (i, (nic, fwd)) in self.nics.iter().enumerate() {
            for f in fwd {
                eprintln!(
                    "network: host {}:127.0.0.1:{} -> {} at {} (guest 10.0.2.15 port {}, \
                     user-mode gateway 10.0.2.2)",
                    f.proto,
                    f.host,
                    nic.name,
                    crate::config::nic_address(i),
                    f.guest
                );
            }
        }
    }

    /// QEMU's arguments for the cards, the same machine as [`Machine::bochs_nics`]: the
    /// `i`-th card at `crate::config::nic_address(i)` (00:02.0, 00:03.0, ...: on q35 an
    /// integrated function of the root complex, `bus=pcie.0`), the same MAC, each with its
    /// own user-mode network (QEMU's slirp: 10.0.2.0/24, gateway 10.0.2.2, the guest
    /// 10.0.2.15) and the config's ports forwarded from the host's 127.0.0.1. Without
    /// cards, `-nic none`: q35 would otherwise add an e1000e of its own at 00:02.0.
    pub fn qemu_nics(&self) -> Vec<String> {
        if self.nics.is_empty() {
            return vec!["-nic".into(), "none".into()];
        }
        let mut out = Vec::new();
        for (i, (m, fwd)) in self.nics.iter().enumerate() {
            let mut netdev = format!("user,id=nic{i},net=10.0.2.0/24,host=10.0.2.2");
            for f in fwd {
                netdev.push_str(&format!(",hostfwd={}:127.0.0.1:{}-:{}", f.proto, f.host, f.guest));
            }
            let a = crate::config::nic_address(i);
            out.extend([
                "-netdev".to_string(),
                netdev,
                "-device".to_string(),
                format!(
                    "{},netdev=nic{i},bus=pcie.0,addr={:#x}.{},mac=52:54:00:12:34:{:02x}",
                    m.qemu_device(),
                    a.device,
                    a.function,
                    0x56 + i
                ),
            ]);
        }
        out
    }

    /// The Bochs lines for the cards: the PCI slots, each card with its own user-mode
    /// network (slirp, 10.0.2.0/24, gateway 10.0.2.2) and its config file in `dir`.
    pub fn bochs_nics(&self, dir: &Path) -> Result<String> {
        if self.nics.is_empty() {
            return Ok(String::new());
        }
        let slots: Vec<String> = self
            .nics
            .iter()
            .enumerate()
            .map(|(i, (m, _))| format!("slot{}={}", i + 1, m.name))
            .collect();
        let mut out = format!("pci: enabled=1, chipset=i440fx, {}\n", slots.join(", "));
        let mut cards = std::collections::HashMap::new();
        for (i, (m, fwd)) in self.nics.iter().enumerate() {
            let conf = dir.join(format!("slirp{i}.conf"));
            let mut text = String::from("# slirp config\n");
            for f in fwd {
                text.push_str(&format!("hostfwd = {}::{}-:{}\n", f.proto, f.host, f.guest));
            }
            std::fs::write(&conf, text)?;
            let card: &mut u32 = cards.entry(m.name).or_default();
            let extra = if m.name == "ne2k" { ", type=pci" } else { "" };
            out.push_str(&format!(
                "{}: card={}, enabled=1, mac=52:54:00:12:34:{:02x}, ethmod=slirp, script={}{extra}\n",
                m.name,
                *card,
                0x56 + i,
                bochs_quoted(&conf)
            ));
            *card += 1;
        }
        Ok(out)
    }
}

/// The core a console line comes from: `[c2] ...` (hypervisor) or `[name@c2] ...` (guest).
pub fn line_core(line: &str) -> Option<u32> {
    let tag = line.strip_prefix('[')?.split(']').next()?;
    let core = tag.rsplit_once("@c").map_or_else(|| tag.strip_prefix('c'), |(_, c)| Some(c))?;
    core.parse().ok()
}

/// Whether a console line is streamed: the guests' and the hypervisor's own lines always,
/// the machine records (`#mkv ...`, `--trace` records among them, malformed ones too) only
/// when asked (`--records`). The serial log and the report keep every line either way.
pub fn shown_on_console(is_record: bool, records: bool) -> bool {
    !is_record || records
}

/// Prints console lines live, one colour per core. Colour follows each stream on its own
/// (`anstream` drops it where that stream is not a terminal, or under `NO_COLOR`). Progress
/// (phase, guests heard from, elapsed time) is an `indicatif` spinner when stderr is a
/// terminal and the run is not `--quiet`, else one line per phase.
struct Printer<O: Write, E: Write> {
    out: O,
    err: E,
    quiet: bool,
    /// Stream the machine records too (`--records`).
    records: bool,
    /// The live progress line, when there is one.
    bar: Option<indicatif::ProgressBar>,
    /// Guests heard from on the console so far (`[name@cN]` lines), in order.
    guests: Vec<String>,
    phase: Option<String>,
}

/// The spinner for a run's progress on stderr.
fn progress_bar() -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}")
            .expect("a valid template"),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

impl<O: Write, E: Write> Printer<O, E> {
    fn clear_status(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }

    fn line(&mut self, line: &str, is_record: bool) {
        if let Some(g) = line_guest(line) {
            if !self.guests.iter().any(|x| x == g) {
                self.guests.push(g.to_string());
                self.redraw();
            }
        }
        if self.quiet || !shown_on_console(is_record, self.records) {
            return;
        }
        use anstyle::{AnsiColor, Style};
        const COLOURS: [AnsiColor; 6] = [
            AnsiColor::Cyan,
            AnsiColor::Yellow,
            AnsiColor::Green,
            AnsiColor::Magenta,
            AnsiColor::Blue,
            AnsiColor::Red,
        ];
        let style = if is_record {
            Style::new().dimmed()
        } else if let Some(core) = line_core(line) {
            Style::new().fg_color(Some(COLOURS[core as usize % COLOURS.len()].into()))
        } else {
            Style::new()
        };
        match &self.bar {
            Some(b) => b.suspend(|| writeln!(self.out, "{style}{line}{style:#}")),
            None => writeln!(self.out, "{style}{line}{style:#}"),
        }
        .unwrap_or(());
    }

    /// The progress line's text: the phase, and the guests heard from.
    fn message(&self) -> String {
        let mut m = self.phase.clone().unwrap_or_default();
        if !self.guests.is_empty() {
            m += &format!("; guests heard from: {} ({})", self.guests.len(), self.guests.join(" "));
        }
        m
    }

    /// A line of the tool's own on stderr (above the progress line); not under `-q`.
    fn note(&mut self, text: &str) {
        if crate::exit::verbosity() < 0 {
            return;
        }
        match &self.bar {
            Some(b) => b.suspend(|| writeln!(self.err, "{text}")),
            None => writeln!(self.err, "{text}"),
        }
        .unwrap_or(());
    }

    fn redraw(&self) {
        if let Some(b) = &self.bar {
            b.set_message(self.message());
        }
    }

    fn status(&mut self, started: Instant, phase: Phase) {
        let what = match phase {
            Phase::Firmware => "firmware (BIOS) starting".to_string(),
            Phase::Grub => "GRUB loading the hypervisor".to_string(),
            Phase::Hypervisor => "hypervisor initialising".to_string(),
            Phase::Cores { online, total } => format!("cores coming up: {online}/{total} online"),
            Phase::Ended => "run ended".to_string(),
        };
        self.phase = Some(what.clone());
        if self.bar.is_some() {
            self.redraw();
        } else if crate::exit::verbosity() >= 0 {
            let t = started.elapsed().as_secs_f64();
            let _ = writeln!(self.err, "[{t:6.1}s] {what}");
        }
    }
}

/// What `cargo xtask run` decided before building anything: every check passed.
pub struct Prepared {
    /// The emulator's CPU model (the default of the emulator when not given).
    pub model: String,
    /// The config (its path as found, and compiled), or `None` for a cores-only run.
    pub compiled: Option<(PathBuf, crate::config::Compiled)>,
    pub machine: Machine,
}

/// Every check `cargo xtask run` makes before it builds or boots (`cargo xtask check` runs
/// exactly these): the report path, the hypervisor command line, the config, the cores the
/// config needs, and what the emulator would refuse. Installs nothing; each failure carries
/// its exit code (`crate::exit`).
pub fn prepare(args: &RunArgs) -> Result<Prepared> {
    // Found now rather than after a boot of several minutes.
    if let Some(path) = &args.report {
        check_writable(path).map_err(|e| crate::exit::coded(crate::exit::REPORT_PATH, e))?;
    }
    let model = args.cpu_model.clone().unwrap_or_else(|| {
        match args.emulator {
            Emulator::Bochs => DEFAULT_BOCHS_MODEL,
            Emulator::Qemu => DEFAULT_QEMU_MODEL,
            Emulator::QemuKvm => "host",
        }
        .to_string()
    });
    let cmdline = args.hypervisor_cmdline();
    let bad = crate::cmdline::check(&cmdline);
    if !bad.is_empty() {
        let list: Vec<String> = bad.iter().map(ToString::to_string).collect();
        let e = anyhow::anyhow!("--cmdline: the hypervisor would ignore {}", list.join("; "));
        return Err(crate::exit::coded(crate::exit::USAGE, e));
    }
    // A malformed config stops here, before anything is built or booted.
    let compiled = if args.no_config {
        None
    } else {
        let path = config_path(&args.config);
        let c =
            crate::config::load(&path).map_err(|e| crate::exit::coded(crate::exit::CONFIG, e))?;
        Some((path, c))
    };
    let machine = Machine {
        cpus: args
            .cpus
            .or(compiled.as_ref().map(|(_, c)| *c.config.machine.cpus.get_ref()))
            .unwrap_or(4),
        memory_mib: compiled.as_ref().map_or(256, |(_, c)| *c.config.machine.memory_mib.get_ref()),
        nics: compiled.as_ref().map_or(Vec::new(), |(_, c)| {
            (0..c.config.nics.len())
                .filter_map(|i| {
                    let fwd = c.config.nics[i].forward.iter().flat_map(|f| f.get_ref().iter());
                    let fwd = fwd.filter_map(|f| crate::config::parse_forward(f.get_ref()));
                    Some((c.config.nic_model(i)?, fwd.collect()))
                })
                .collect()
        }),
    };
    let past = crate::cmdline::injections_past(&cmdline, machine.cpus);
    if !past.is_empty() {
        let e = anyhow::anyhow!(
            "--cmdline: {} names a core the machine of {} cores does not have: nothing would \
             be injected",
            past.join(", "),
            machine.cpus
        );
        return Err(crate::exit::coded(crate::exit::USAGE, e));
    }
    if let Some((_, c)) = &compiled {
        let (cores, missing) = guests_without_a_core(&c.config, machine.cpus, &cmdline);
        if !missing.is_empty() && !args.allow_missing_cores {
            let list: Vec<String> =
                missing.iter().map(|(g, core)| format!("`{g}` on core {core}")).collect();
            // Where the first of them is in the config (file, line, column, field).
            let first =
                c.config.guests.iter().enumerate().find(|(_, g)| *g.core.get_ref() >= cores);
            let e = anyhow::anyhow!(
                "the machine has {cores} cores (--cpus or machine.cpus, capped by any cpus=N) but \
                 the config runs {}; give --cpus {} or more, \
                 or --allow-missing-cores to boot anyway (those guests will not start and the \
                 run will fail)",
                list.join(", "),
                missing.iter().map(|(_, core)| core + 1).max().unwrap_or(cores)
            );
            let e = match first {
                Some((i, g)) => {
                    let at = c.error_at(g.core.span(), format!("guest[{i}].core"), "");
                    e.context(format!("{}:{}:{}: {}", at.file, at.line, at.column, at.field))
                }
                None => e,
            };
            return Err(crate::exit::coded(crate::exit::USAGE, e));
        }
    }
    check_emulator_args(args.emulator, machine.cpus, &model, &crate::target_dir())
        .map_err(|e| crate::exit::coded(crate::exit::USAGE, anyhow::anyhow!(e)))?;
    // The config's own cpus are checked with it; a --cpus above the limit would take the
    // machine's COM2, and with it host control, away without a word.
    let host_control = compiled
        .as_ref()
        .is_some_and(|(_, c)| c.config.machine.host_control.as_ref().is_some_and(|h| *h.get_ref()));
    if host_control && machine.cpus > crate::config::COM2_MAX_CPUS {
        return Err(crate::exit::coded(
            crate::exit::USAGE,
            anyhow::anyhow!(
                "the config asks for host_control, which needs COM2, which the machine gets \
                 up to {} CPUs (Bochs 2.7's timer table); this one would have {}",
                crate::config::COM2_MAX_CPUS,
                machine.cpus
            ),
        ));
    }
    if args.emulator == Emulator::QemuKvm {
        if let Err(why) = KvmHost::probe().backend() {
            // The host lacks what the run needs: as a machine the hypervisor refuses.
            return Err(crate::exit::coded(
                crate::exit::REFUSED,
                anyhow::anyhow!("cannot run under qemu-kvm: {why}"),
            ));
        }
    }
    Ok(Prepared { model, compiled, machine })
}

/// A config path as given, else relative to the workspace root.
pub fn config_path(p: &Path) -> PathBuf {
    if p.is_relative() && !p.exists() {
        crate::workspace_root().join(p)
    } else {
        p.to_path_buf()
    }
}

/// `cargo xtask check`: what `run` checks before building, and nothing else. Prints what it
/// found (the config's warnings, the machine it would boot) and returns the summary line.
pub fn check(args: &RunArgs) -> Result<String> {
    let p = prepare(args)?;
    // The config's own kernels: files checked completely, crates only found (not built).
    if let Some((_, c)) = &p.compiled {
        crate::kernel::check_unbuilt(c)?;
    }
    for w in p.compiled.iter().flat_map(|(_, c)| &c.warnings) {
        crate::exit::warn(format_args!("config: {w}"));
    }
    let what = match &p.compiled {
        Some((path, c)) => format!(
            "{}: ok: {} guest(s), {} channel(s), {} grant(s)",
            path.display(),
            c.config.guests.len(),
            c.config.channels.len(),
            c.config.grants.len()
        ),
        None => "no config: ok".to_string(),
    };
    Ok(format!(
        "{what}; would boot {} with {} CPUs (model {}), {} MiB{}",
        args.emulator.name(),
        p.machine.cpus,
        p.model,
        p.machine.memory_mib,
        match machine_cmdline(args, p.compiled.as_ref()) {
            c if c.is_empty() => String::new(),
            c => format!(", command line `{c}`"),
        }
    ))
}

/// The hypervisor command line: `--cmdline` (and `--trace`), plus the config's
/// `machine.probe_ms`, `machine.revoke` and `machine.revoke_fanout` as `probe_ms=N`,
/// `revoke=...` and `revoke_fanout=N`, each when the command line does not set it.
fn machine_cmdline(
    args: &RunArgs,
    compiled: Option<&(PathBuf, crate::config::Compiled)>,
) -> String {
    let mut c = args.hypervisor_cmdline();
    let Some((_, compiled)) = compiled else { return c };
    let m = &compiled.config.machine;
    let words = [
        ("probe_ms", m.probe_ms.as_ref().map(|p| p.get_ref().to_string())),
        ("revoke", m.revoke.as_ref().map(|r| r.get_ref().clone())),
        ("revoke_fanout", m.revoke_fanout.as_ref().map(|f| f.get_ref().to_string())),
        ("host_control", m.host_control.as_ref().filter(|h| *h.get_ref()).map(|_| "1".into())),
    ];
    for (key, value) in words {
        let Some(value) = value else { continue };
        if !c.split_ascii_whitespace().any(|w| w.starts_with(&format!("{key}="))) {
            if !c.is_empty() {
                c.push(' ');
            }
            c += &format!("{key}={value}");
        }
    }
    c
}

/// Boots the image described by `args` and returns the report (also written to
/// `args.report` when given). Fails only when the run could not be attempted at all.
pub fn run(args: &RunArgs) -> Result<Report> {
    let Prepared { model, compiled, machine } = prepare(args)?;
    for w in compiled.iter().flat_map(|(_, c)| &c.warnings) {
        crate::exit::warn(format_args!("config: {w}"));
    }
    match args.emulator {
        Emulator::Bochs => crate::setup::ensure_packages(&[crate::setup::BOCHS])?,
        Emulator::Qemu | Emulator::QemuKvm => crate::setup::ensure_packages(&[crate::setup::QEMU])?,
    }
    // The config's own kernels: checked (and guest crates built) before anything boots.
    let kernels = match &compiled {
        Some((_, c)) => crate::kernel::prepare(c, args.build.debug)?,
        None => Vec::new(),
    };
    let images = crate::build::Images {
        kernels,
        ..crate::build::images_with(
            args.build.debug,
            !args.quiet && crate::exit::verbosity() == 0 && std::io::stderr().is_terminal(),
        )?
    };
    let dir = run_dir(&format!("{}-{}cpu", args.emulator.name(), machine.cpus))?;
    let blob = compiled.as_ref().map(|(_, c)| c.blob.as_slice());
    let iso = crate::build::iso(&images, &dir, &machine_cmdline(args, compiled.as_ref()), blob)?;
    let serial_path = dir.join("serial.txt");
    std::fs::write(&serial_path, b"")?;

    let mut printer = Printer {
        out: anstream::stdout(),
        err: anstream::stderr(),
        quiet: args.quiet,
        records: args.records,
        bar: (std::io::stderr().is_terminal() && !args.quiet).then(progress_bar),
        guests: vec![],
        phase: None,
    };
    let mut meta = meta::collect(compiled.as_ref().map(|(p, _)| p.as_path()));
    meta.kernels = meta::kernels(&images, compiled.as_ref().map(|(_, c)| &c.config));
    let started = Instant::now();
    // The host's control channel: the emulator's COM2 connects to it (a run never fails
    // for it).
    let relay = crate::hostctl::Relay::bind()
        .map_err(|e| crate::exit::warn(format_args!("{e:#}; no host control for this run")))
        .ok();
    // Bochs 2.7 has room for a second serial port's timers only up to COM2_MAX_CPUS CPUs
    // (`check` refuses host_control beyond that); a larger machine gets no COM2.
    let com2 =
        relay.as_ref().map(|r| r.port).filter(|_| machine.cpus <= crate::config::COM2_MAX_CPUS);
    let mut child = spawn(args, &machine, &iso, &dir, &model, com2)?;
    let relay = relay.and_then(|r| {
        let stopper = match args.emulator {
            Emulator::Bochs => crate::hostctl::Stopper::Signals,
            Emulator::Qemu | Emulator::QemuKvm => {
                crate::hostctl::Stopper::Qmp(dir.join(crate::hostctl::QMP_SOCKET))
            }
        };
        r.start(&dir, child.pgid, com2.is_some(), stopper)
            .map_err(|e| crate::exit::warn(format_args!("{e:#}; no host control for this run")))
            .ok()
    });
    // What `cargo xtask ps` and `top` find in the folder; a run never fails for it.
    let mut info = crate::watch::RunInfo::starting(
        child.pgid,
        args.emulator.name(),
        machine.cpus,
        compiled.as_ref().map(|(p, _)| p.as_path()),
        &serial_path,
        args.report.as_deref(),
    );
    if relay.is_some() {
        info.control_socket = Some(dir.join(crate::hostctl::SOCKET).display().to_string());
    }
    if let Err(e) = info.write(&dir) {
        crate::exit::warn(format_args!("{e:#}"));
    }
    printer.note(&format!(
        "run folder {} (cargo xtask top {})",
        dir.display(),
        dir.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()
    ));
    let mut console = Console::default();
    let mut serial = std::fs::File::open(&serial_path)?;
    let mut pending = Vec::new();
    let mut offset = 0u64;
    let mut last_phase = None;
    let mut ended_at: Option<Instant> = None;
    let deadline = started + Duration::from_secs(args.timeout);
    let mut timed_out = false;
    let mut interrupted = false;

    loop {
        let exited = child.try_wait()?.is_some();
        // Read what the emulator appended since last time; keep an unfinished line.
        serial.seek(SeekFrom::Start(offset))?;
        let mut buf = Vec::new();
        serial.read_to_end(&mut buf)?;
        offset += buf.len() as u64;
        pending.extend_from_slice(&buf);
        while let Some(nl) = pending.iter().position(|&b| b == b'\n') {
            let raw: Vec<u8> = pending.drain(..=nl).collect();
            let line = strip_ansi(&String::from_utf8_lossy(&raw[..raw.len() - 1]));
            if line.trim().is_empty() {
                continue;
            }
            let is_record = console.feed(&line);
            printer.line(&line, is_record);
        }
        let phase = console.phase();
        if last_phase != Some(phase) {
            printer.status(started, phase);
            last_phase = Some(phase);
        }
        if phase == Phase::Ended && ended_at.is_none() {
            ended_at = Some(Instant::now());
        }
        if exited {
            break;
        }
        if INTERRUPTED.load(Ordering::SeqCst) {
            interrupted = true;
            child.kill();
        } else if ended_at.is_some_and(|t| t.elapsed() > EXIT_GRACE) {
            console.problems.push("the emulator did not exit after the end record; killed".into());
            child.kill();
        } else if relay.as_ref().is_some_and(|r| r.paused()) {
            // Paused from the host: no grace or timeout runs out meanwhile.
        } else if Instant::now()
            > deadline
                + relay.as_ref().map_or(Duration::ZERO, |r| {
                    r.pauses.lock().map_or(Duration::ZERO, |p| p.total())
                })
        {
            timed_out = true;
            child.kill();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let pauses: Vec<crate::report::PauseReport> = relay
        .map(|r| r.finish(started))
        .unwrap_or_default()
        .into_iter()
        .map(|(at_seconds, seconds)| crate::report::PauseReport { at_seconds, seconds })
        .collect();
    let status = child.wait();
    drop(child);
    if !pending.is_empty() {
        let line = strip_ansi(&String::from_utf8_lossy(&pending));
        let is_record = console.feed(&line);
        printer.line(&line, is_record);
    }
    printer.clear_status();

    let outcome = if interrupted {
        console.problems.push(format!(
            "interrupted by a signal after {:.1} s; the emulator was killed",
            started.elapsed().as_secs_f64()
        ));
        "interrupted".to_string()
    } else {
        console.outcome(timed_out)
    };
    if outcome == outcome_failed() && console.end_outcome.is_none() && !timed_out {
        // The emulator stopped by itself before the hypervisor ended the run: say why.
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
        let (log, out) = (read("bochs.log"), read("emulator.out"));
        let mut why = emulator_diagnosis(&[&log, &out]);
        if why.is_empty() && args.emulator != Emulator::Bochs {
            why =
                out.lines().filter(|l| !l.trim().is_empty()).take(3).map(str::to_string).collect();
        }
        if let Some(st) = status {
            console.problems.push(format!("the emulator exited with {st}"));
        }
        console.problems.extend(why);
    }
    // A refused or unfinished run still lists the config's guests, with what was seen.
    if let Some((_, c)) = &compiled {
        console.account_for(&crate::report::planned(&c.config));
    }
    let tsc = console.tsc_figures();
    console.attach_traces();
    let trace_csv = if args.trace {
        let path = match &args.report {
            Some(r) => r.with_extension("trace.csv"),
            None => dir.join("trace.csv"),
        };
        std::fs::write(&path, console.trace_csv())
            .with_context(|| format!("writing {}", path.display()))?;
        Some(path.display().to_string())
    } else {
        None
    };
    meta.emulator_version = meta::emulator_version(
        args.emulator.name(),
        &std::fs::read_to_string(dir.join("emulator.out")).unwrap_or_default(),
    );
    let report = Report {
        schema_version: crate::report::SCHEMA_VERSION,
        outcome,
        emulator: args.emulator.name().into(),
        cpu_model: model,
        cpus: machine.cpus,
        cpus_listed: console.cpus_listed,
        cores_used: console.cores_used,
        cores: console.cores,
        config: compiled.as_ref().map(|(p, _)| p.display().to_string()),
        guests: console.guests,
        channels: console.channels,
        devices: console.devices,
        views: console.views,
        view_changes: console.view_changes,
        hangs: console.hangs,
        suspicions: console.suspicions,
        missing: console.missing,
        host_requests: console.host_requests,
        pauses,
        tsc,
        wall_seconds: (started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
        serial_log: serial_path.display().to_string(),
        trace_csv,
        problems: console.problems,
        tsc_unit: crate::report::tsc_unit(args.emulator.name()).to_string(),
        meta,
    };
    if let Some(path) = &args.report {
        std::fs::write(path, serde_json::to_string_pretty(&report)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Err(e) = crate::watch::RunInfo::finish(&dir, &report.outcome) {
        crate::exit::warn(format_args!("{e:#}"));
    }
    Ok(report)
}

/// The membership views of a run, one line per view number: its cores, who coordinated
/// it, which cores logged it, and a problem line if two cores logged different sets.
pub fn views_summary(views: &[crate::report::ViewReport]) -> String {
    let mut by_num: std::collections::BTreeMap<u32, Vec<&crate::report::ViewReport>> =
        Default::default();
    for v in views {
        by_num.entry(v.num).or_default().push(v);
    }
    let mut s = String::new();
    for (num, vs) in by_num {
        let cores: Vec<String> = vs.iter().map(|v| v.core.to_string()).collect();
        let list = |m: &[u32]| m.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(" ");
        s += &format!(
            "  view {num}: cores {{{}}} (coordinated by core {}; logged by {})\n",
            list(&vs[0].members),
            vs[0].by,
            cores.join(" ")
        );
        if vs.iter().any(|v| v.members != vs[0].members) {
            s += &format!("  problem: cores disagree on view {num}\n");
        }
    }
    s
}

/// One line per view change of a run (its `vchange` records): messages sent by kind summed
/// over the cores, the coordinator's share and rounds, the cores' exits, and the time from
/// the change's first message anywhere to the last core's install of its view (its last
/// message of the change; one TSC across cores).
pub fn view_changes_summary(r: &crate::report::Report) -> String {
    use crate::report::MemberMessages;
    let mut by_num: std::collections::BTreeMap<u32, Vec<&crate::report::ViewChangeReport>> =
        Default::default();
    for v in &r.view_changes {
        by_num.entry(v.num).or_default().push(v);
    }
    let mut s = String::new();
    for (num, vs) in by_num {
        let mut sent = MemberMessages::default();
        vs.iter().for_each(|v| sent.add(&v.sent));
        let by = r.views.iter().find(|v| v.num == num).map(|v| v.by);
        let coord = vs.iter().find(|v| Some(v.core) == by);
        let installed = vs.iter().filter(|v| v.installed).count();
        let exits: u64 = vs.iter().map(|v| v.exits).sum();
        let first = vs.iter().map(|v| v.tsc_first).filter(|&t| t != 0).min();
        // A record's last message is the install for a core that installed the view (what
        // comes after counts for the next change).
        let last = vs.iter().filter(|v| v.installed).map(|v| v.tsc_last).max();
        let kinds = serde_json::to_value(sent).unwrap_or_default();
        let words: Vec<String> = kinds
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(_, n)| n.as_u64() != Some(0))
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        s += &format!(
            "  view change {num}: {} messages ({}) on {} cores, {installed} installed; ",
            sent.total(),
            words.join(", "),
            vs.len()
        );
        match coord {
            Some(c) => {
                s += &format!(
                    "coordinator core {} sent {} in {} round(s); ",
                    c.core,
                    c.sent.total(),
                    c.rounds
                )
            }
            None => s += "coordinator not among them; ",
        }
        s += &format!("{exits} exits");
        if let (Some(a), Some(b)) = (first, last) {
            s += &format!(
                "; {} TSC from its first message to its last install",
                b.saturating_sub(a)
            );
            // The coordinator's first message of the change: its round's start (or the
            // intent it was told), after whatever the others re-told it before.
            if let Some(c) = coord.filter(|c| c.tsc_first != 0) {
                s += &format!(" ({} from the coordinator's first)", b.saturating_sub(c.tsc_first));
            }
        }
        s += "\n";
    }
    s
}

/// Checks that the report can be written to `path` without leaving anything behind: an
/// existing file is opened for writing (not truncated), a new one created and removed.
pub fn check_writable(path: &Path) -> Result<()> {
    let fail =
        |e: std::io::Error| anyhow::anyhow!("cannot write the report to {}: {e}", path.display());
    if path.is_dir() {
        bail!("cannot write the report to {}: it is a directory", path.display());
    }
    if path.exists() {
        std::fs::OpenOptions::new().write(true).open(path).map_err(fail)?;
    } else {
        std::fs::OpenOptions::new().write(true).create_new(true).open(path).map_err(fail)?;
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

/// Draws figures from files (`plot::files`): the files, an output folder; what it wrote.
pub type Plotter = fn(&[PathBuf], Option<&Path>) -> Result<Vec<PathBuf>>;

/// `cargo xtask run`: the run, its summary, and the exit code of its outcome (see
/// `crate::exit`); signals end it as `interrupted` with the report written. With `--plot`,
/// `plot` draws the report (the caller passes `plot::files`: `plot` reads `bench`'s
/// types and `bench` boots through this module, so this module does not name `plot`).
pub fn command(args: &RunArgs, plot: Plotter) -> std::process::ExitCode {
    if let Err(e) = catch_interrupts() {
        return crate::exit::report_error(&e);
    }
    // `--report -`: the report's JSON on stdout, so nothing else goes there (as --quiet).
    let to_stdout = args.report.as_deref() == Some(Path::new("-"));
    let quieted;
    let args = if to_stdout {
        quieted = RunArgs { report: None, quiet: true, ..args.clone() };
        &quieted
    } else {
        args
    };
    match run(args) {
        Ok(report) => {
            eprint!("{}", summary(&report));
            if to_stdout {
                match serde_json::to_string_pretty(&report) {
                    Ok(json) => println!("{json}"),
                    Err(e) => return crate::exit::report_error(&e.into()),
                }
            }
            if let (true, Some(path)) = (args.plot, &args.report) {
                match plot(std::slice::from_ref(path), None) {
                    Ok(written) => {
                        for w in written {
                            crate::exit::note(format_args!("  plot: {}", w.display()));
                        }
                    }
                    Err(e) => crate::exit::warn(format_args!("no plot: {e:#}")),
                }
            }
            std::process::ExitCode::from(crate::exit::for_outcome(&report.outcome))
        }
        // A Ctrl-C during the build also reaches cargo, whose failure is then only an echo.
        Err(e) if INTERRUPTED.load(Ordering::SeqCst) => {
            crate::exit::print_error(&e.context("interrupted before the emulator started"));
            std::process::ExitCode::from(crate::exit::INTERRUPTED)
        }
        Err(e) => crate::exit::report_error(&e),
    }
}

fn outcome_failed() -> &'static str {
    vmcall_proto::record::outcome::FAILED
}

/// One-paragraph summary for the end of `cargo xtask run`.
pub fn summary(r: &Report) -> String {
    let mut s = format!(
        "mkvisor run: outcome {} ({} with {} CPUs, model {}, {:.1} s wall)\n",
        r.outcome, r.emulator, r.cpus, r.cpu_model, r.wall_seconds
    );
    for c in &r.cores {
        s += &format!(
            "  core {:2}  APIC id {:3}  {:7} {} {}{}\n",
            c.index,
            c.apic_id,
            c.state,
            c.backend.as_deref().unwrap_or("vmx").to_uppercase(),
            c.vmx,
            c.reason.as_deref().map(|x| format!("  ({x})")).unwrap_or_default()
        );
    }
    // Names up to 32 characters: the column is as wide as the longest.
    let w = r.guests.iter().map(|g| g.name.len()).chain(r.channels.iter().map(|c| c.name.len()));
    let w = w.max().unwrap_or(0).max(10);
    for g in &r.guests {
        let exits: Vec<String> = g.exits.iter().map(|(k, v)| format!("{k}:{v}")).collect();
        s += &format!(
            "  guest {:<w$} core {:2}  {:11} status {:<6} exits {}\n",
            g.name,
            g.core,
            g.state,
            if g.state == "exited" {
                crate::report::status_text(g.exit_status)
            } else {
                "-".into()
            },
            exits.join(" ")
        );
        if let Some(t) = &g.trace {
            let life = t.guest_tsc + t.hypervisor_tsc;
            s += &format!(
                "        trace: {} exits ({} kept), in the guest {}, in the hypervisor {} ({:.1}%)\n",
                t.exits,
                t.kept,
                t.guest_tsc,
                t.hypervisor_tsc,
                if life > 0 { 100.0 * t.hypervisor_tsc as f64 / life as f64 } else { 0.0 }
            );
        }
        if let Some(f) = &g.fault {
            s += &format!(
                "        {}: {f}\n",
                if g.state == "not_started" { "why" } else { "fault" }
            );
        }
        if g.incarnations.len() > 1 {
            s += &format!("        {} incarnations:\n", g.incarnations.len());
            let many = g.incarnations.len() > 8;
            for (k, i) in g.incarnations.iter().enumerate() {
                if many && (3..g.incarnations.len() - 3).contains(&k) {
                    if k == 3 {
                        s += "          ...\n";
                    }
                    continue;
                }
                let how = match (&i.exit_status, &i.fault) {
                    (Some(st), _) => format!("exited {}", crate::report::status_text(*st)),
                    (None, Some(f)) => format!("stopped: {f}"),
                    (None, None) => i.ending.clone(),
                };
                s += &format!(
                    "          #{:<3} {:>12} TSC  {how}\n",
                    i.n,
                    i.tsc_end.saturating_sub(i.tsc_start)
                );
            }
        }
    }
    for c in &r.channels {
        s += &format!(
            "  channel {:<w$} {}->{}: sent {} received {}; {}->{}: sent {} received {}\n",
            c.name, c.a, c.b, c.a_sent, c.b_received, c.b, c.a, c.b_sent, c.a_received
        );
    }
    for h in &r.hangs {
        s += &format!("  core {} hung on purpose at TSC {}\n", h.core, h.tsc);
    }
    for p in &r.suspicions {
        s += &format!("  core {} fenced core {} at TSC {}\n", p.core, p.target, p.tsc);
    }
    s += &views_summary(&r.views);
    s += &view_changes_summary(r);
    for d in r.devices.iter().filter(|d| d.owner.is_some()) {
        s += &format!(
            "  device {} {} -> {} (vector {}, line {}, dma {}; BARs {})\n",
            d.bdf,
            d.id,
            d.owner.as_deref().unwrap_or("?"),
            d.vector.unwrap_or(0),
            d.line,
            d.dma.as_deref().unwrap_or("off"),
            d.owner_bars.as_deref().unwrap_or("")
        );
    }
    let unit = match r.tsc_unit.as_str() {
        "emulated_instructions" => "emulated instructions",
        _ => "TSC clock ticks, not instructions",
    };
    if let Some(t) = r.tsc.to_all_guests_running {
        s += &format!("  TSC: hypervisor entry to all guests running {t} ({unit})\n");
    }
    if let Some(m) = &r.missing {
        s += &format!("  refused: this machine lacks {m}\n");
    }
    if let (Some(e), Some(b)) = (r.tsc.hypervisor_entry, r.tsc.hypervisor_boot) {
        s += &format!(
            "  TSC: firmware+GRUB {e}, hypervisor boot (entry to all cores up) {b} ({unit})\n"
        );
    }
    for h in &r.host_requests {
        let id = h.id.map_or("-".to_string(), |i| i.to_string());
        s += &format!("  from the host: #{id} {} {}: {} {}\n", h.op, h.guest, h.outcome, h.detail);
    }
    for p in &r.pauses {
        s += &format!("  paused from the host at {:.1} s for {:.1} s\n", p.at_seconds, p.seconds);
    }
    for p in &r.problems {
        s += &format!("  problem: {p}\n");
    }
    s += &format!("  serial log: {}\n", r.serial_log);
    if let Some(t) = &r.trace_csv {
        s += &format!("  exit trace: {t}\n");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_names_each_cores_backend() {
        let mut c = crate::report::Console::default();
        let abi = vmcall_proto::ABI_VERSION;
        for l in [
            format!("#mkv boot abi={abi} tsc=5"),
            "#mkv core index=0 apic=0 state=up vmx=on backend=svm reason=\"\"".into(),
            "#mkv core index=1 apic=1 state=up vmx=on reason=\"\"".into(),
        ] {
            c.feed(&l);
        }
        let s = summary(&crate::report::for_tests(&mut c));
        assert!(s.contains("core  0  APIC id   0  up      SVM on"), "{s}");
        assert!(
            s.contains("core  1  APIC id   1  up      VMX on"),
            "no field: the first backend: {s}"
        );
    }

    #[test]
    fn qemu_kvm_picks_the_backend_the_host_offers_nested() {
        let yes = Some("Y".to_string());
        let intel =
            KvmHost { dev_kvm: true, vmx: true, nested_intel: yes.clone(), ..Default::default() };
        assert_eq!(intel.backend(), Ok(KvmBackend::Vmx));
        assert_eq!(KvmBackend::Vmx.qemu_cpu(), "host,+vmx");
        let amd = KvmHost {
            dev_kvm: true,
            svm: true,
            nested_amd: Some("1".into()),
            ..Default::default()
        };
        assert_eq!(amd.backend(), Ok(KvmBackend::Svm));
        assert_eq!(KvmBackend::Svm.qemu_cpu(), "host,+svm");
        // What is missing, named.
        let no_kvm = KvmHost { dev_kvm: false, ..intel.clone() };
        assert!(no_kvm.backend().unwrap_err().contains("/dev/kvm does not exist"));
        let off = KvmHost { nested_intel: Some("N".into()), ..intel.clone() };
        assert!(
            off.backend().unwrap_err().contains("kvm_intel is nested=N"),
            "{:?}",
            off.backend()
        );
        let unloaded = KvmHost { nested_amd: None, ..amd.clone() };
        assert!(unloaded.backend().unwrap_err().contains("kvm_amd is not loaded"));
        let amd_off = KvmHost { nested_amd: Some("0".into()), ..amd };
        assert!(amd_off.backend().unwrap_err().contains("modprobe kvm_amd nested=1"));
        let neither = KvmHost { vmx: false, ..intel };
        assert!(neither.backend().unwrap_err().contains("neither VMX nor SVM"));
    }

    /// On a host without /dev/kvm (this test bed: containers, CI), `--emulator qemu-kvm`
    /// stops before it builds or boots, saying so, with the "refused" exit code.
    #[test]
    fn qemu_kvm_without_dev_kvm_is_refused_naming_it() {
        if Path::new("/dev/kvm").exists() {
            eprintln!("/dev/kvm exists here: the refusal is covered by the case above only");
            return;
        }
        use clap::Parser;
        let cli = crate::cli::Cli::try_parse_from([
            "xtask",
            "run",
            "--emulator",
            "qemu-kvm",
            "--no-config",
        ])
        .unwrap();
        let crate::cli::Command::Run(args) = cli.command else { panic!("a run") };
        let err = prepare(&args).err().expect("refused");
        assert_eq!(crate::exit::of_error(&err), crate::exit::REFUSED, "{err:#}");
        let text = format!("{err:#}");
        assert!(text.contains("cannot run under qemu-kvm: /dev/kvm does not exist"), "{text}");
    }

    #[test]
    fn the_summary_names_the_tsc_unit() {
        let mut c = Console::default();
        for l in ["#mkv boot abi=1 tsc=100 cmdline=\"\"", "#mkv ready tsc=150"] {
            c.feed(l);
        }
        let mut r = crate::report::for_tests(&mut c);
        assert!(summary(&r).contains("entry to all cores up) 50 (emulated instructions)"));
        r.emulator = "qemu".into();
        r.tsc_unit = crate::report::tsc_unit("qemu").into();
        assert!(summary(&r).contains("50 (TSC clock ticks, not instructions)"), "{}", summary(&r));
    }

    #[test]
    fn the_summary_prints_large_exit_statuses_in_hex_everywhere() {
        let mut c = Console::default();
        let inc = |n: u32, status: u64| {
            format!("#mkv incarnation guest=a n={n} ending=exited exit_status={status} fault=\"\" tsc_start=100 tsc_first_entry=110 tsc_end=300 frames_at_start=9 caps_revoked=0 caps_unconfirmed=0 caps_dropped=0")
        };
        for l in [
            "#mkv boot abi=1 tsc=100 cmdline=\"\"".to_string(),
            inc(1, 57005),
            inc(2, 3),
            "#mkv guest index=0 name=a core=0 state=exited exit_status=57005 exits=\"\" fault=\"\" hypercalls=1 tsc_first_entry=110 tsc_end=300 incarnations=2".into(),
        ] {
            c.feed(&l);
        }
        let text = summary(&crate::report::for_tests(&mut c));
        assert!(text.contains("status 0xdead"), "{text}");
        assert!(text.contains("exited 0xdead") && text.contains("exited 3"), "{text}");
        assert!(!text.contains("57005"), "{text}");
    }

    #[test]
    fn strips_grub_screen_control() {
        assert_eq!(strip_ansi("\x1b[H\x1b[J\x1b[1;1H  Booting `mkvisor'\r"), "  Booting `mkvisor'");
        assert_eq!(strip_ansi("plain"), "plain");
        assert_eq!(strip_ansi("a\x1b"), "a");
    }

    #[test]
    fn console_lines_are_attributed_to_cores() {
        assert_eq!(line_core("[c2] online"), Some(2));
        assert_eq!(line_core("[alpha@c3] hello"), Some(3));
        assert_eq!(line_core("[we@ird@c1] x"), Some(1));
        assert_eq!(line_core("#mkv core"), None);
        assert_eq!(line_core("[alpha] x"), None);
    }

    #[test]
    fn an_unwritable_report_path_stops_the_run_before_anything_else() {
        // The config does not exist either: the report path must be the first thing checked.
        let args = RunArgs {
            report: Some("/nonexistent-dir/r.json".into()),
            ..RunArgs::quiet(Emulator::Bochs, Some("configs/does-not-exist.toml"))
        };
        let e = run(&args).expect_err("an unwritable report path must stop the run");
        assert_eq!(crate::exit::of_error(&e), crate::exit::REPORT_PATH, "{e:#}");
        assert!(e.to_string().contains("/nonexistent-dir/r.json"), "{e:#}");
    }

    #[test]
    fn emulator_arguments_bochs_cannot_take_are_refused() {
        let ok = |cpus, model: &str, dir: &str| {
            check_emulator_args(Emulator::Bochs, cpus, model, Path::new(dir))
        };
        assert_eq!(ok(4, "corei7_skylake_x", "/w/target"), Ok(()));
        assert_eq!(ok(15, "tigerlake", "/my target, with commas"), Ok(()));
        let e = ok(4, "nonsense", "/w").unwrap_err();
        assert!(e.contains("no CPU model `nonsense`") && e.contains("tigerlake"), "{e}");
        let e = ok(16, "tigerlake", "/w").unwrap_err();
        assert!(e.contains("at most 15"), "{e}");
        assert!(ok(4, "tigerlake", "/w/\"odd\"").unwrap_err().contains("quote"));
        // QEMU names its own models; Bochs' limits do not apply.
        assert_eq!(check_emulator_args(Emulator::Qemu, 16, "max", Path::new("/w")), Ok(()));
        // Refused before anything is built, with the usage exit code.
        let args =
            RunArgs { cpu_model: Some("nonsense".into()), ..RunArgs::quiet(Emulator::Bochs, None) };
        let e = run(&args).expect_err("an unknown model must not boot");
        assert_eq!(crate::exit::of_error(&e), crate::exit::USAGE, "{e:#}");
        let args = RunArgs { cpus: Some(16), ..RunArgs::quiet(Emulator::Bochs, None) };
        let e = run(&args).expect_err("16 CPUs must not boot in Bochs");
        assert!(e.to_string().contains("at most 15"), "{e:#}");
    }

    #[test]
    fn the_emulators_own_words_name_the_failure() {
        // Captured from Bochs 2.7: 16 CPUs, an unknown model, a path it could not open.
        let log16 = "00000000000i[      ] reading configuration\n\
                     00000000000p[SYS   ] >>PANIC<< register_timer: too many registered timers\n";
        assert_eq!(
            emulator_diagnosis(&[log16]),
            ["Bochs panic: register_timer: too many registered timers"]
        );
        let out_model = "00000000000e[      ] rcm:6: wrong value for parameter 'model'\n\
            00000000000p[      ] >>PANIC<< rcm:6: cpu directive malformed.\n\
            00000000000e[SIM   ] notify called, but no bxevent_callback function is registered\n\
            [      ] rcm:6: cpu directive malformed.\n";
        assert_eq!(
            emulator_diagnosis(&["", out_model]),
            ["Bochs panic: rcm:6: cpu directive malformed."]
        );
        let log_path =
            "00000000000e[CD1   ] open cd failed for '/tmp/myiso.iso': No such file or directory\n\
            00004341935p[BIOS  ] >>PANIC<< No bootable device.\n";
        assert_eq!(emulator_diagnosis(&[log_path]), ["Bochs panic: No bootable device."]);
        let errors_only = "00000000000e[CD1   ] open cd failed for '/x': No such file\n";
        assert_eq!(
            emulator_diagnosis(&[errors_only]),
            ["Bochs error: open cd failed for '/x': No such file"]
        );
        assert!(emulator_diagnosis(&["plain text\n(0) [0x0] f000:fff0: jmpf\n"]).is_empty());
    }

    #[test]
    fn a_bad_command_line_stops_the_run_before_anything_is_built() {
        let args =
            RunArgs { cmdline: "cpus=2 vmxcap".into(), ..RunArgs::quiet(Emulator::Bochs, None) };
        let e = run(&args).expect_err("an unknown option must not boot");
        assert_eq!(crate::exit::of_error(&e), crate::exit::USAGE, "{e:#}");
        assert!(e.to_string().contains("`vmxcap`: unknown option"), "{e:#}");
    }

    #[test]
    fn colour_follows_each_stream() {
        use anstream::{AutoStream, ColorChoice};
        // stderr a terminal, stdout a pipe: the console lines on stdout carry no colour.
        let mut p = Printer {
            out: AutoStream::new(Vec::new(), ColorChoice::Never),
            err: AutoStream::new(Vec::new(), ColorChoice::Always),
            quiet: false,
            records: true,
            bar: Some(indicatif::ProgressBar::hidden()),
            guests: vec![],
            phase: None,
        };
        p.line("[c2] online", false);
        p.line("#mkv end outcome=ok tsc=1", true);
        p.status(Instant::now(), Phase::Grub);
        let out = String::from_utf8(p.out.into_inner()).unwrap();
        assert_eq!(out, "[c2] online\n#mkv end outcome=ok tsc=1\n");
        // A terminal that wants colour gets one per core.
        let mut p = Printer {
            out: AutoStream::new(Vec::new(), ColorChoice::Always),
            err: Vec::new(),
            quiet: false,
            records: false,
            bar: None,
            guests: vec![],
            phase: None,
        };
        p.line("[c2] online", false);
        p.status(Instant::now(), Phase::Grub);
        assert_eq!(String::from_utf8(p.out.into_inner()).unwrap(), "\x1b[32m[c2] online\x1b[0m\n");
        let err = String::from_utf8(p.err).unwrap();
        assert!(!err.contains('\x1b') && err.ends_with("GRUB loading the hypervisor\n"), "{err:?}");
    }

    #[test]
    fn records_stay_off_the_console_unless_asked() {
        // A console as a traced run writes it: human lines, records, a trace record, and a
        // line that looks like a record but is malformed (a problem in the report).
        let serial = "[c0] mkvisor 0.1.0 starting (ABI 1)\n\
            #mkv boot abi=1 tsc=100 cmdline=\"trace\"\n\
            [alpha@c0] hello from alpha\n\
            #mkv trace core=0 base=150 ev=\"cpuid:0:20\"\n\
            #mkv tracesum core=0 exits=1 kept=1 guest_tsc=20 hv_tsc=0\n\
            #mkv guest index=0 name=alpha core=0 state=exited exit_status=0 exits=\"cpuid:1\" fault=\"\" hypercalls=0 tsc_first_entry=150 tsc_end=200\n\
            #mkv core index=0 apic=0 junk\n\
            #mkv end outcome=ok tsc=250\n\
            [c0] run over\n";
        let stream = |records: bool| {
            let mut console = Console::default();
            let never = anstream::ColorChoice::Never;
            let mut p = Printer {
                out: anstream::AutoStream::new(Vec::new(), never),
                err: Vec::new(),
                quiet: false,
                records,
                bar: None,
                guests: vec![],
                phase: None,
            };
            for l in serial.lines() {
                let is_record = console.feed(l);
                p.line(l, is_record);
            }
            (String::from_utf8(p.out.into_inner()).unwrap(), console)
        };
        let (out, console) = stream(false);
        assert_eq!(
            out,
            "[c0] mkvisor 0.1.0 starting (ABI 1)\n[alpha@c0] hello from alpha\n[c0] run over\n"
        );
        // Hidden, still read: the report gets the guest, its trace and the malformed line.
        assert_eq!(console.guests.len(), 1);
        assert_eq!(console.traces.get(&0).map(Vec::len), Some(1));
        assert_eq!(console.problems.len(), 1, "{:?}", console.problems);
        // `--records`: every line, in order.
        let (out, _) = stream(true);
        assert_eq!(out, serial);
        assert!(shown_on_console(false, false) && !shown_on_console(true, false));
    }

    #[test]
    fn progress_shows_the_phase_and_the_guests_heard_from() {
        // On a terminal the progress is the spinner's message, nothing on stderr itself.
        let mut p = Printer {
            out: Vec::new(),
            err: Vec::new(),
            quiet: true,
            records: true,
            bar: Some(indicatif::ProgressBar::hidden()),
            guests: vec![],
            phase: None,
        };
        p.status(Instant::now(), Phase::Cores { online: 1, total: 4 });
        p.line("[alpha@c0] hello", false);
        p.line("[beta@c1] hello", false);
        p.line("[alpha@c0] again", false);
        let msg = p.bar.as_ref().unwrap().message();
        assert_eq!(msg, "cores coming up: 1/4 online; guests heard from: 2 (alpha beta)");
        assert!(p.err.is_empty() && p.out.is_empty(), "quiet: no console lines");
        assert_eq!(line_guest("[we@ird@c1] x"), Some("we@ird"));
        assert_eq!(line_guest("[c1] x"), None);
    }

    #[test]
    fn fewer_cores_than_the_config_needs_is_refused_unless_allowed() {
        let cfg = crate::config::load(&crate::workspace_root().join("configs/default.toml"))
            .unwrap()
            .config;
        assert_eq!(guests_without_a_core(&cfg, 4, ""), (4, vec![]));
        let names = |cpus, cmdline| {
            let (n, m) = guests_without_a_core(&cfg, cpus, cmdline);
            (n, m.into_iter().map(|(g, _)| g).collect::<Vec<_>>())
        };
        assert_eq!(names(2, ""), (2, vec!["gamma".into(), "delta".into()]));
        assert_eq!(names(4, "cpus=3"), (3, vec!["delta".to_string()]));
        assert_eq!(names(4, "cpus=1 cpus=8"), (4, vec![]));
        let args = RunArgs {
            cpus: Some(2),
            ..RunArgs::quiet(Emulator::Bochs, Some("configs/default.toml"))
        };
        let e = run(&args).expect_err("a guest without its core must not boot unasked");
        assert_eq!(crate::exit::of_error(&e), crate::exit::USAGE, "{e:#}");
        let msg = e.to_string();
        assert!(
            msg.contains("`gamma` on core 2, `delta` on core 3") && msg.contains("--cpus 4"),
            "{msg}"
        );
        assert!(msg.contains("--allow-missing-cores"), "{msg}");
    }

    #[test]
    fn old_run_folders_are_pruned_but_not_live_ones() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        // pid 0x7fffffff is never alive; our own pid is.
        let dead = |n: u32| root.join(format!("bochs-4cpu-2147483647-{n}"));
        for n in 0..5 {
            std::fs::create_dir(dead(n)).unwrap();
            // Distinct modification times, oldest first.
            std::thread::sleep(Duration::from_millis(20));
        }
        let mine = root.join(format!("qemu-2cpu-{}-0", std::process::id()));
        std::fs::create_dir(&mine).unwrap();
        std::fs::create_dir(root.join("not-a-run")).unwrap();
        std::fs::create_dir(mine.with_file_name("bochs-1cpu-x-0")).unwrap();
        // Keep 2: the live one and dead 4 are the newest; 0..=3 go.
        let mut gone = prune_runs(&root, 2).unwrap();
        gone.sort();
        assert_eq!(gone, (0..4).map(dead).collect::<Vec<_>>());
        assert!(dead(4).exists() && mine.exists() && root.join("not-a-run").exists());
        // Keep 0: a live run's folder is never removed.
        assert_eq!(prune_runs(&root, 0).unwrap(), [dead(4)]);
        assert!(mine.exists());
    }

    #[test]
    fn parallel_runs_pruning_the_same_folders_all_succeed() {
        // The system tests start runs from several threads at once: each prunes.
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        for n in 0..60 {
            std::fs::create_dir_all(root.join(format!("bochs-4cpu-2147483647-{n}"))).unwrap();
        }
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let root = root.clone();
                std::thread::spawn(move || prune_runs(&root, 0).map(|v| v.len()))
            })
            .collect();
        for t in threads {
            assert!(t.join().unwrap().is_ok(), "a folder another thread removed is no error");
        }
        assert_eq!(std::fs::read_dir(&root).unwrap().count(), 0, "all old folders gone");
    }

    /// Processes whose command line contains `marker`.
    fn alive_with(marker: &str) -> usize {
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter(|e| {
                std::fs::read(e.path().join("cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains(marker))
            })
            .count()
    }

    /// A leader that starts a grandchild and waits: both carry `marker` in their arguments.
    fn family(marker: &str) -> EmulatorProcess {
        let mut c = Command::new("sh");
        c.arg("-c").arg(format!("sh -c 'sleep 300; : {marker}' & sleep 300; : {marker}"));
        let p = EmulatorProcess::start(c).unwrap();
        let t = Instant::now();
        while alive_with(marker) < 2 && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(20));
        }
        // (For a moment the forked subshell is a third copy before its exec.)
        std::thread::sleep(Duration::from_millis(200));
        assert!(alive_with(marker) >= 2, "leader and grandchild running");
        p
    }

    #[test]
    fn the_emulators_whole_process_group_is_killed() {
        // Dropped (normal end, error, timeout, unwinding): the group goes, grandchildren too.
        let marker = format!("xtask-group-drop-{}", std::process::id());
        drop(family(&marker));
        // The leader is reaped by the drop; the grandchild, killed with it, vanishes once
        // init reaps it: a moment on a busy machine.
        let t = Instant::now();
        while alive_with(&marker) > 0 && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(alive_with(&marker), 0);
        // A signal or a panic: every registered group is killed from outside the run loop.
        let marker = format!("xtask-group-kill-{}", std::process::id());
        let mut p = family(&marker);
        kill_all_emulators();
        assert!(p.wait().is_some());
        let t = Instant::now();
        while alive_with(&marker) > 0 && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(alive_with(&marker), 0);
        drop(p);
    }

    #[test]
    fn report_path_check_leaves_nothing_behind() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let new = dir.join("new.json");
        check_writable(&new).unwrap();
        assert!(!new.exists(), "the check must not leave an empty report");
        std::fs::write(&new, "keep").unwrap();
        check_writable(&new).unwrap();
        assert_eq!(std::fs::read_to_string(&new).unwrap(), "keep", "nor truncate an old one");
        assert!(check_writable(&dir).is_err(), "a directory is not a report file");
    }

    #[test]
    fn bochsrc_has_the_requested_machine() {
        let rc = bochsrc(Path::new("/x/m.iso"), Path::new("/x"), 2, "tigerlake", 512);
        assert!(rc.contains("megs: 512\n"));
        assert!(rc.contains("cpu: model=tigerlake, count=2,"));
        assert!(rc.contains("path=\"/x/m.iso\""));
        assert!(rc.contains("com1: enabled=1, mode=file, dev=\"/x/serial.txt\""));
        assert!(rc.contains("log: \"/x/bochs.log\""));
        // Bochs drops unquoted spaces from a value: every path is quoted.
        let rc = bochsrc(Path::new("/my runs/m.iso"), Path::new("/my runs"), 2, "tigerlake", 512);
        assert!(rc.contains("path=\"/my runs/m.iso\""), "{rc}");
        assert!(rc.contains("dev=\"/my runs/serial.txt\""), "{rc}");
        assert!(rc.contains("clock: sync=none"));
    }
}
