// SPDX-License-Identifier: MIT OR Apache-2.0
//! The run report: what the hypervisor's records say, checked for consistency, as JSON.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use vmcall_proto::record::{self, guest_state, kind, outcome};

/// The metadata types live with the code that fills them in.
pub use crate::meta::{ConfigMeta, Host, KernelMeta, Meta};

/// Version of the report's JSON layout (`schemas/report.schema.json`), raised on any change a
/// reader must know about. Reports without the field are from before version 2.
/// 3: `meta.kernels`; guest states `running` and `unknown` (unfinished runs), and
/// `not_started` for guests the run's duration ended before their first entry.
/// 4: `meta.command_line` one shell-quoted line (was a list of words), `meta.working_dir`.
pub const SCHEMA_VERSION: u32 = 4;

/// One core, from its `core` record.
#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone, PartialEq, Eq)]
pub struct CoreReport {
    pub index: u32,
    pub apic_id: u32,
    /// `on` once the core's virtualization is on (VMXON succeeded, or EFER.SVME set and
    /// the world-switch check passed), else `off`; the name is the ABI's first backend's.
    pub vmx: String,
    /// `vmx` (Intel VT-x) or `svm` (AMD SVM): the backend the hypervisor picked from
    /// CPUID. Absent in runs of hypervisors older than the field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// `up`, `silent`, `failed` (see `vmcall_proto::record::core_state`).
    pub state: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// `name:count` words (a record's `exits` or `requests_from`), or `None` if one is not.
fn counts(text: &str) -> Option<BTreeMap<String, u64>> {
    text.split_whitespace()
        .map(|w| {
            let (k, v) = w.split_once(':')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// One guest, from its `guest` record.
///
/// In JSON, `exit_status` is `null` unless the guest `exited`, and the two TSC values are
/// `null` for a guest that never entered (the hypervisor's record says 0 for "none"); the
/// Rust fields keep 0 for those, and reading either form back gives the same value.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(into = "GuestJson")]
pub struct GuestReport {
    pub name: String,
    pub core: u32,
    /// `exited`, `stopped`, `ended`, `fenced` or `not_started` (the hypervisor's
    /// `vmcall_proto::record::guest_state`), or, in a run that did not reach its end
    /// record, `running` or `unknown` ([`unfinished`]).
    pub state: String,
    /// Its exit status when `exited`, else 0 (`null` in JSON).
    #[serde(deserialize_with = "null_as_zero")]
    pub exit_status: u64,
    /// VM exits by reason name.
    pub exits: BTreeMap<String, u64>,
    /// Why the hypervisor stopped it (and where), or why it never started.
    pub fault: Option<String>,
    pub hypercalls: u64,
    /// TSC at its first VM entry and at its end; 0 (`null` in JSON) if it never entered.
    #[serde(deserialize_with = "null_as_zero")]
    pub tsc_first_entry: u64,
    #[serde(deserialize_with = "null_as_zero")]
    pub tsc_end: u64,
    /// Inter-core messages and NMI kicks the guest's core sent (capability protocol).
    #[serde(default)]
    pub xmsgs: u64,
    #[serde(default)]
    pub nmis: u64,
    /// Capability-protocol requests this guest's core received, by sending core index.
    #[serde(default)]
    pub requests_from: BTreeMap<String, u64>,
    /// Transfers into this guest that its core refused (not accepted, no room, ended).
    #[serde(default)]
    pub cap_refused: u64,
    /// TSC ticks its core spent serving other cores while it ran (not charged to its
    /// budget).
    #[serde(default)]
    pub foreign_tsc: u64,
    /// TSC ticks its core worked on the guest's own `cap_revoke`s (requests sent, replies
    /// handled; not the time spent waiting for them).
    #[serde(default)]
    pub revoke_tsc: u64,
    /// The longest stretch its core spent in the hypervisor without serving its inbox
    /// (other cores' messages, membership probes), in TSC ticks: bounded whatever the
    /// guest asks (docs/membership.md); the failure detector's timeout must exceed it.
    #[serde(default)]
    pub away_tsc: u64,
    /// The revoke protocol's traffic through its core (its own revokes and other cores'):
    /// exact per operation in a run whose only revoke is that one.
    #[serde(default)]
    pub revoke: RevokeTraffic,
    /// Its core's membership failure detector's traffic over the run.
    #[serde(default)]
    pub probes: ProbeTraffic,
    /// Cores its core declared failed (fenced) for not answering in time.
    #[serde(default)]
    pub fenced: Vec<u32>,
    /// Each start of the guest, in order (one unless it was restarted).
    #[serde(default)]
    pub incarnations: Vec<IncarnationReport>,
    /// Its exit trace's totals, when the run was traced (`--trace`).
    #[serde(default)]
    pub trace: Option<GuestTrace>,
}

/// What a guest's core did for revokes (the `rv_*` fields of its `guest` record; the
/// hypervisor's `caps::RevokeCounts`): only the revoke protocol's messages, never inserts,
/// guest control, links or membership.
#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RevokeTraffic {
    /// `REVOKE` and `REVOKE_REPLY` ring messages sent (each followed by a kick).
    pub sent: u64,
    /// `REVOKE` and `REVOKE_REPLY` ring messages received.
    pub received: u64,
    /// Cores named by its multicast requests (rung and kicked, no ring message).
    pub mc_named: u64,
    /// Other cores' multicast requests it served (an answer in its reply line).
    pub mc_served: u64,
    /// Answers it took from its own multicast requests' reply lines.
    pub mc_taken: u64,
    /// Its guest's VM exits after which its core did revoke work.
    pub exits: u64,
    /// Its guest's own revokes that finished.
    pub own: u64,
    /// Rounds of its last own revoke, measured: the longest chain of requests.
    pub rounds: u64,
}

/// What a guest's core's membership failure detector did over the run (the `mb_*` fields
/// of its `guest` record; the hypervisor's `caps::mcount::ProbeCounts`).
#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProbeTraffic {
    /// `PING`s sent (to the member it probes) and received (from the member probing it).
    pub pings_sent: u64,
    pub pings_received: u64,
    /// `PONG`s sent and received.
    pub pongs_sent: u64,
    pub pongs_received: u64,
    /// Its guest's VM exits after which its core counted a probe or an answer.
    pub exits: u64,
    /// View-change messages that found no free per-view record (none in a run that stays
    /// within the hypervisor's bound: counted here instead of in `view_changes`).
    pub unattributed: u64,
}

/// View-change messages by kind (a `vchange` record's `sent` or `received`).
#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemberMessages {
    pub wish: u64,
    pub wish_ack: u64,
    pub prepare: u64,
    pub promise: u64,
    pub accept: u64,
    pub accepted: u64,
    pub nack: u64,
    pub commit: u64,
    pub catchup: u64,
}

impl MemberMessages {
    /// From `kind:count` words; `None` for an unknown kind or a malformed word.
    fn parse(text: &str) -> Option<Self> {
        let mut m = MemberMessages::default();
        for (k, v) in counts(text)? {
            *match k.as_str() {
                "wish" => &mut m.wish,
                "wish_ack" => &mut m.wish_ack,
                "prepare" => &mut m.prepare,
                "promise" => &mut m.promise,
                "accept" => &mut m.accept,
                "accepted" => &mut m.accepted,
                "nack" => &mut m.nack,
                "commit" => &mut m.commit,
                "catchup" => &mut m.catchup,
                _ => return None,
            } += v;
        }
        Some(m)
    }

    /// All kinds.
    pub fn total(&self) -> u64 {
        let m = self;
        m.wish
            + m.wish_ack
            + m.prepare
            + m.promise
            + m.accept
            + m.accepted
            + m.nack
            + m.commit
            + m.catchup
    }

    /// Adds `o`, kind by kind.
    pub fn add(&mut self, o: &MemberMessages) {
        self.wish += o.wish;
        self.wish_ack += o.wish_ack;
        self.prepare += o.prepare;
        self.promise += o.promise;
        self.accept += o.accept;
        self.accepted += o.accepted;
        self.nack += o.nack;
        self.commit += o.commit;
        self.catchup += o.catchup;
    }
}

/// One membership view change as one core took part in it (its `vchange` records, added
/// up): a message counts for the change after the view its core had installed when it sent
/// or handled it.
#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone, PartialEq, Eq)]
pub struct ViewChangeReport {
    /// The core.
    pub core: u32,
    /// The view the change installs.
    pub num: u32,
    /// Whether the core installed that view (false: the run ended first, or it installed
    /// a later one directly).
    pub installed: bool,
    /// View-change messages it sent and handled, by kind.
    pub sent: MemberMessages,
    pub received: MemberMessages,
    /// Ballots it tried as the change's coordinator (0 on the other cores).
    pub rounds: u32,
    /// Its guest's VM exits after which its core counted a message of the change.
    pub exits: u64,
    /// Its first and last message of the change (0: none).
    pub tsc_first: u64,
    pub tsc_last: u64,
}

/// A traced guest's totals (from its `tracesum` record), in `tsc_unit`. Exact whatever the
/// ring kept: the hypervisor adds every exit to them.
#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestTrace {
    /// VM exits traced (all of the guest's exits).
    pub exits: u64,
    /// Of those, the last ones the ring kept (the CSV's rows for this guest).
    pub kept: u64,
    /// Time in the guest: from the hypervisor's last look before each VM entry to its exit.
    pub guest_tsc: u64,
    /// Time in the hypervisor between its first VM entry and its end, the rest.
    pub hypervisor_tsc: u64,
}

/// A membership view as one core installed it (`view` record).
#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone, PartialEq, Eq)]
pub struct ViewReport {
    /// The core that installed it.
    pub core: u32,
    /// The view's number (0 is the config's: never logged).
    pub num: u32,
    /// Its cores.
    pub members: Vec<u32>,
    /// The core that coordinated the change (as the installing core learnt it).
    pub by: u32,
    /// When the core installed it.
    pub tsc: u64,
}

/// A core fenced by another's failure detector (`suspect` record).
#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone, PartialEq, Eq)]
pub struct SuspectReport {
    /// The core that suspected.
    pub core: u32,
    /// The core it fenced.
    pub target: u32,
    pub tsc: u64,
}

/// A request from the host's control channel (`cargo xtask ctl`), as the hypervisor answered
/// it (its `hostctl` record): what, for which guest, the outcome (`ok`, `refused`, `busy`,
/// `timeout`, `gone`, `error`) and its detail, and when (TSC of the core serving the
/// channel). `id` is absent for a line the hypervisor could not read one from.
#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone, PartialEq, Eq)]
pub struct HostRequest {
    pub id: Option<u32>,
    pub op: String,
    pub guest: String,
    pub outcome: String,
    pub detail: String,
    pub tsc: u64,
}

/// The whole machine paused from the host (`cargo xtask ctl RUN pause`, the emulator's
/// process stopped) and resumed: seconds since the run started, wall-clock length.
#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone, PartialEq)]
pub struct PauseReport {
    pub at_seconds: f64,
    pub seconds: f64,
}

/// `inject=hung-core`: the core that stopped answering, and when.
#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone, PartialEq, Eq)]
pub struct HangReport {
    pub core: u32,
    pub tsc: u64,
}

/// One incarnation of a guest, from its `incarnation` record: how it ended, its times
/// (TSC), and its clean death.
#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone, PartialEq, Eq)]
pub struct IncarnationReport {
    /// 1 for the first start.
    pub n: u32,
    /// `exited` or `stopped`.
    pub ending: String,
    /// Its exit status when it exited.
    pub exit_status: Option<u64>,
    /// Why it was stopped.
    pub fault: Option<String>,
    /// TSC when its setup began, at its first VM entry (`null` if never entered), at its end.
    pub tsc_start: u64,
    pub tsc_first_entry: Option<u64>,
    pub tsc_end: u64,
    /// Private frames (EPT tables, VMCS, bitmaps) in use when it was first entered: the
    /// same for every incarnation unless the hypervisor leaks.
    pub frames_at_start: u64,
    /// At its death: copies of its capabilities revoked on other cores, revokes not
    /// confirmed (fenced cores), copies it held that were dropped.
    pub caps_revoked: u64,
    pub caps_unconfirmed: u64,
    pub caps_dropped: u64,
    /// Capabilities in its space when it was first entered (equal for every incarnation
    /// unless the hypervisor leaks slots).
    #[serde(default)]
    pub caps_live: u64,
    /// Channel resets so far (one per channel per restart) and the messages they found
    /// in flight (lost to the restart), as this guest's core counted them.
    #[serde(default)]
    pub link_resets: u64,
    #[serde(default)]
    pub link_lost: u64,
    /// This incarnation's VM exits by reason name, and its hypercalls.
    #[serde(default)]
    pub exits: BTreeMap<String, u64>,
    #[serde(default)]
    pub hypercalls: u64,
}

fn null_as_zero<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    Ok(Option::<u64>::deserialize(d)?.unwrap_or(0))
}

/// The JSON form of [`GuestReport`]: what was never there is `null`, not 0.
#[derive(Serialize, JsonSchema)]
#[schemars(rename = "Guest")]
struct GuestJson {
    name: String,
    core: u32,
    state: String,
    exit_status: Option<u64>,
    exits: BTreeMap<String, u64>,
    fault: Option<String>,
    hypercalls: u64,
    tsc_first_entry: Option<u64>,
    tsc_end: Option<u64>,
    xmsgs: u64,
    nmis: u64,
    requests_from: BTreeMap<String, u64>,
    cap_refused: u64,
    foreign_tsc: u64,
    revoke_tsc: u64,
    away_tsc: u64,
    #[serde(default)]
    revoke: RevokeTraffic,
    #[serde(default)]
    probes: ProbeTraffic,
    fenced: Vec<u32>,
    incarnations: Vec<IncarnationReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    trace: Option<GuestTrace>,
}

impl JsonSchema for GuestReport {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        GuestJson::schema_name()
    }
    fn json_schema(g: &mut schemars::SchemaGenerator) -> schemars::Schema {
        GuestJson::json_schema(g)
    }
}

impl From<GuestReport> for GuestJson {
    fn from(g: GuestReport) -> Self {
        let entered = g.tsc_first_entry != 0;
        GuestJson {
            exit_status: (g.state == "exited").then_some(g.exit_status),
            tsc_first_entry: entered.then_some(g.tsc_first_entry),
            tsc_end: (entered && g.tsc_end != 0).then_some(g.tsc_end),
            name: g.name,
            core: g.core,
            state: g.state,
            exits: g.exits,
            fault: g.fault,
            hypercalls: g.hypercalls,
            xmsgs: g.xmsgs,
            nmis: g.nmis,
            requests_from: g.requests_from,
            cap_refused: g.cap_refused,
            foreign_tsc: g.foreign_tsc,
            revoke_tsc: g.revoke_tsc,
            away_tsc: g.away_tsc,
            revoke: g.revoke,
            probes: g.probes,
            fenced: g.fenced,
            trace: g.trace,
            incarnations: g.incarnations,
        }
    }
}

/// One channel's counters at the end, as its two guests left them in the ring headers.
#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone, PartialEq, Eq)]
pub struct ChannelReport {
    pub name: String,
    pub a: String,
    pub b: String,
    pub slots: u32,
    /// Messages `a` sent and `b` received (on the a-to-b ring), and the reverse.
    pub a_sent: u64,
    pub b_received: u64,
    pub b_sent: u64,
    pub a_received: u64,
}

/// A PCI function the hypervisor found at boot, and its owner if a guest was given it.
#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceReport {
    /// `bus:device.function`, hex.
    pub bdf: String,
    /// `vendor:device`, hex.
    pub id: String,
    /// Class, subclass, programming interface, hex.
    pub class: String,
    /// INTx pin (0 none, 1..4 INTA..INTD) and the I/O APIC input it reaches: the line the
    /// firmware routed it to (its interrupt-line register), or on QEMU's q35 a bus-0
    /// function's own PIRQ input (16-23).
    pub pin: u32,
    pub line: u32,
    /// `index:kind:base+size` words (hex) as found at boot.
    pub bars: String,
    /// The guest that owns it (absent: nobody).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// The vector its interrupt reaches the owner at (0: none routed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vector: Option<u32>,
    /// `unconfined` (the owner may master the bus; no IOMMU) or `off`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dma: Option<String>,
    /// The owner's view of its memory BARs: `index:kind:gpa->base+size`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_bars: Option<String>,
}

/// Time-stamp counter values the hypervisor reported, in the report's `tsc_unit`.
#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone, Default, PartialEq, Eq)]
pub struct Tsc {
    /// At hypervisor entry: firmware and GRUB took this long.
    pub hypervisor_entry: Option<u64>,
    /// When every core had reported its bring-up (the `ready` record).
    #[serde(default)]
    pub ready: Option<u64>,
    /// At the end record.
    pub end: Option<u64>,
    /// `ready - hypervisor_entry`: the hypervisor's own boot, all cores up; no guest time
    /// after it (guests on cores that came up early may run meanwhile).
    pub hypervisor_boot: Option<u64>,
    /// From hypervisor entry to the last guest's first VM entry: all guests running.
    pub to_all_guests_running: Option<u64>,
}

/// Removes terminal control sequences (GRUB clears the screen on the serial console) and
/// carriage returns (`anstream`'s escape-sequence parser).
/// A guest's exit status as every view prints it (the summary, its incarnations, `top`,
/// `report diff`): decimal up to 255, hex above, as guests write large ones (a panic exits
/// `0xdead`, see docs/guests.md). The JSON keeps the number.
pub fn status_text(status: u64) -> String {
    match status {
        0..=255 => status.to_string(),
        s => format!("{s:#x}"),
    }
}

pub fn strip_ansi(s: &str) -> String {
    anstream::adapter::strip_str(s).to_string().replace('\r', "")
}

/// The unit of every `*tsc*` field of a report: exact emulated instructions in Bochs
/// (`clock: sync=none`), clock ticks of the emulated TSC under QEMU.
pub fn tsc_unit(emulator: &str) -> &'static str {
    if emulator == "bochs" {
        "emulated_instructions"
    } else {
        "tsc_ticks"
    }
}

#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone, PartialEq)]
pub struct Report {
    /// The layout version, [`SCHEMA_VERSION`] (0 when read from an older report).
    #[serde(default)]
    pub schema_version: u32,
    /// `ok`, `failed`, `refused`, `timeout` or `interrupted`.
    pub outcome: String,
    pub emulator: String,
    pub cpu_model: String,
    /// Emulated CPUs requested.
    pub cpus: u32,
    /// Processors the firmware listed and the run used (from the `cpus` record).
    pub cpus_listed: Option<u32>,
    pub cores_used: Option<u32>,
    pub cores: Vec<CoreReport>,
    /// The config booted (absent for a cores-only run).
    pub config: Option<String>,
    pub guests: Vec<GuestReport>,
    pub channels: Vec<ChannelReport>,
    /// The machine's PCI functions and who owns each.
    #[serde(default)]
    pub devices: Vec<DeviceReport>,
    /// Core membership: every view each core installed, in the order logged.
    #[serde(default)]
    pub views: Vec<ViewReport>,
    /// Core membership: what each core sent and handled for each view change, in the
    /// order logged (`vchange` records).
    #[serde(default)]
    pub view_changes: Vec<ViewChangeReport>,
    /// Cores hung on purpose (`inject=hung-core`).
    #[serde(default)]
    pub hangs: Vec<HangReport>,
    /// Cores fenced by a failure detector, by whom and when.
    #[serde(default)]
    pub suspicions: Vec<SuspectReport>,
    /// What the machine lacks, when the outcome is `refused`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub missing: Option<String>,
    /// Requests from the host's control channel, in the order answered (`hostctl` records).
    #[serde(default)]
    pub host_requests: Vec<HostRequest>,
    /// Pauses of the whole machine from the host.
    #[serde(default)]
    pub pauses: Vec<PauseReport>,
    pub tsc: Tsc,
    /// The unit of every TSC figure in this report (`tsc`, guests' `tsc_*`, `foreign_tsc`,
    /// `trace`): `emulated_instructions` (Bochs, exact) or `tsc_ticks` (QEMU: clock ticks,
    /// not instructions).
    #[serde(default)]
    pub tsc_unit: String,
    pub wall_seconds: f64,
    pub serial_log: String,
    /// The exit trace (`--trace`): CSV next to the serial log, one row per kept exit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_csv: Option<String>,
    /// Anything inconsistent or malformed seen in the console output.
    pub problems: Vec<String>,
    #[serde(default)]
    pub meta: Meta,
}

/// A report of `c` as a Bochs run on 2 CPUs would give, for the host tests of readers of
/// reports (schema, diff).
#[cfg(test)]
pub(crate) fn for_tests(c: &mut Console) -> Report {
    c.attach_traces();
    Report {
        schema_version: SCHEMA_VERSION,
        outcome: c.outcome(false),
        emulator: "bochs".into(),
        cpu_model: "corei7_skylake_x".into(),
        cpus: 2,
        cpus_listed: c.cpus_listed,
        cores_used: c.cores_used,
        cores: c.cores.clone(),
        config: None,
        guests: c.guests.clone(),
        channels: vec![],
        devices: c.devices.clone(),
        views: vec![],
        view_changes: c.view_changes.clone(),
        hangs: vec![],
        suspicions: vec![],
        missing: None,
        host_requests: c.host_requests.clone(),
        pauses: vec![],
        tsc: c.tsc_figures(),
        tsc_unit: tsc_unit("bochs").into(),
        wall_seconds: 2.0,
        serial_log: "/x/serial.txt".into(),
        trace_csv: None,
        problems: c.problems.clone(),
        meta: crate::meta::collect(None),
    }
}

/// Guest states only the host tool gives, for a run that did not reach its end record
/// (interrupted, timed out, the emulator gone): what was seen of the guest so far.
pub mod unfinished {
    /// Heard from (a console line of its own) or started again by its restart policy, and
    /// its end not seen.
    pub const RUNNING: &str = "running";
    /// Nothing of it seen: it may not have started.
    pub const UNKNOWN: &str = "unknown";
}

/// What the hypervisor says of a guest the run's duration ended before its first VM entry
/// (its record: `ended`, no first entry); the report makes it `not_started`.
pub const NEVER_ENTERED: &str =
    "never entered: the run's duration ended during its setup, before its first VM entry";

/// A guest of the config, as a report needs it when the hypervisor did not report it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    pub name: String,
    pub core: u32,
    /// `never`, `on-fault` or `always`.
    pub restart: String,
    /// Restarts its policy allows after the first start.
    pub max_restarts: u32,
}

/// The config's guests as [`Console::account_for`] needs them.
pub fn planned(c: &crate::config::Config) -> Vec<Planned> {
    c.guests
        .iter()
        .map(|g| {
            let restart = g.restart.as_ref().map_or("never", |r| r.get_ref()).to_string();
            let default = if restart == "never" { 0 } else { crate::config::DEFAULT_MAX_RESTARTS };
            Planned {
                name: g.name.get_ref().clone(),
                core: *g.core.get_ref(),
                max_restarts: g.max_restarts.as_ref().map_or(default.into(), |m| *m.get_ref()),
                restart,
            }
        })
        .collect()
}

/// The guest a console line comes from: `[name@c2] ...`.
pub fn line_guest(line: &str) -> Option<&str> {
    let tag = line.strip_prefix('[')?.split(']').next()?;
    tag.rsplit_once("@c").map(|(name, _)| name)
}

/// The phases of a run, as the console shows them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Firmware,
    Grub,
    Hypervisor,
    Cores { online: u32, total: u32 },
    Ended,
}

/// Accumulates console lines into the report's content.
#[derive(Debug, Default)]
pub struct Console {
    grub_seen: bool,
    boot_seen: bool,
    pub cpus_listed: Option<u32>,
    pub cores_used: Option<u32>,
    pub online: u32,
    pub cores: Vec<CoreReport>,
    pub guests: Vec<GuestReport>,
    pub channels: Vec<ChannelReport>,
    pub devices: Vec<DeviceReport>,
    pub views: Vec<ViewReport>,
    pub view_changes: Vec<ViewChangeReport>,
    pub hangs: Vec<HangReport>,
    pub suspicions: Vec<SuspectReport>,
    pub host_requests: Vec<HostRequest>,
    pub missing: Option<String>,
    pub end_outcome: Option<String>,
    pub tsc: Tsc,
    /// Exit traces by core (`trace` records), oldest first, and their totals.
    pub traces: BTreeMap<u32, Vec<TraceEvent>>,
    pub trace_sums: BTreeMap<u32, GuestTrace>,
    pub problems: Vec<String>,
    /// Incarnation records seen, by guest name, until the guest's own record takes them.
    incarnations: BTreeMap<String, Vec<IncarnationReport>>,
    /// Guests heard from on the console (a `[name@cN]` line).
    heard: std::collections::BTreeSet<String>,
    /// The hypervisor's first `ERROR` line (`[cN] ERROR ...`), its words only.
    first_error: Option<String>,
    /// Each guest's latest start (`start` record): incarnation and core, by guest name.
    pub starts: BTreeMap<String, (u32, u32)>,
    /// Each guest's latest live figures (`stats` records, `stats_ms=N`), by guest name.
    pub live: BTreeMap<String, LiveStats>,
}

/// A running incarnation's figures so far, from its latest `stats` record.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LiveStats {
    /// The incarnation they are of.
    pub n: u32,
    pub tsc: u64,
    pub exits: BTreeMap<String, u64>,
    pub hypercalls: u64,
    /// Per channel of the guest: its name, messages sent and received.
    pub traffic: Vec<(String, u64, u64)>,
}

/// One traced VM exit: reason, and the TSC at the VM entry it ended and at the exit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceEvent {
    pub reason: String,
    pub entry: u64,
    pub exit: u64,
}

fn unescape(v: record::Value<'_>) -> String {
    let mut s = String::new();
    v.unescape_into(|c| s.push(c));
    s
}

fn num<T: std::str::FromStr>(r: &record::Record<'_>, key: &str) -> Option<T> {
    r.get(key).and_then(|v| v.raw().parse().ok())
}

impl Console {
    /// Reads one console line. Returns whether it was a record.
    pub fn feed(&mut self, line: &str) -> bool {
        if line.contains(crate::build::GRUB_MARKER) {
            self.grub_seen = true;
        }
        let r = match record::parse(line) {
            Ok(Some(r)) => r,
            Ok(None) => {
                if let Some(p) = crate::cmdline::ignored_by_hypervisor(line) {
                    self.problems.push(p);
                }
                if let Some(g) = line_guest(line) {
                    if !self.heard.contains(g) {
                        self.heard.insert(g.to_string());
                    }
                } else if line.starts_with("[c") && self.first_error.is_none() {
                    self.first_error = line.split_once("] ERROR ").map(|(_, e)| e.to_string());
                }
                return false;
            }
            Err(e) => {
                self.problems.push(format!("malformed record ({e:?}): {line}"));
                return true;
            }
        };
        match r.kind {
            kind::BOOT => {
                self.boot_seen = true;
                self.tsc.hypervisor_entry = num(&r, "tsc");
            }
            kind::CPUS => {
                self.cpus_listed = num(&r, "count");
                self.cores_used = num(&r, "used");
            }
            kind::ONLINE => self.online += 1,
            kind::CORE => {
                let core = (|| {
                    Some(CoreReport {
                        index: num(&r, "index")?,
                        apic_id: num(&r, "apic")?,
                        vmx: r.get("vmx")?.raw().to_string(),
                        backend: r.get("backend").map(|b| b.raw().to_string()),
                        state: r.get("state")?.raw().to_string(),
                        reason: r.get("reason").map(unescape).filter(|s| !s.is_empty()),
                    })
                })();
                match core {
                    Some(c) => self.cores.push(c),
                    None => self.problems.push(format!("core record without its fields: {line}")),
                }
            }
            kind::GUEST => {
                let guest = (|| {
                    let exits = counts(&unescape(r.get("exits")?))?;
                    Some(GuestReport {
                        name: unescape(r.get("name")?),
                        core: num(&r, "core")?,
                        state: r.get("state")?.raw().to_string(),
                        exit_status: num(&r, "exit_status")?,
                        exits,
                        fault: r.get("fault").map(unescape).filter(|s| !s.is_empty()),
                        hypercalls: num(&r, "hypercalls")?,
                        tsc_first_entry: num(&r, "tsc_first_entry")?,
                        tsc_end: num(&r, "tsc_end")?,
                        xmsgs: num(&r, "xmsgs").unwrap_or(0),
                        nmis: num(&r, "nmis").unwrap_or(0),
                        requests_from: r
                            .get("requests_from")
                            .and_then(|v| counts(&unescape(v)))
                            .unwrap_or_default(),
                        cap_refused: num(&r, "cap_refused").unwrap_or(0),
                        foreign_tsc: num(&r, "foreign_tsc").unwrap_or(0),
                        revoke_tsc: num(&r, "revoke_tsc").unwrap_or(0),
                        away_tsc: num(&r, "away_tsc").unwrap_or(0),
                        revoke: RevokeTraffic {
                            sent: num(&r, "rv_sent").unwrap_or(0),
                            received: num(&r, "rv_received").unwrap_or(0),
                            mc_named: num(&r, "rv_mc_named").unwrap_or(0),
                            mc_served: num(&r, "rv_mc_served").unwrap_or(0),
                            mc_taken: num(&r, "rv_mc_taken").unwrap_or(0),
                            exits: num(&r, "rv_exits").unwrap_or(0),
                            own: num(&r, "rv_own").unwrap_or(0),
                            rounds: num(&r, "rv_rounds").unwrap_or(0),
                        },
                        probes: ProbeTraffic {
                            pings_sent: num(&r, "mb_pings_sent").unwrap_or(0),
                            pings_received: num(&r, "mb_pings_received").unwrap_or(0),
                            pongs_sent: num(&r, "mb_pongs_sent").unwrap_or(0),
                            pongs_received: num(&r, "mb_pongs_received").unwrap_or(0),
                            exits: num(&r, "mb_probe_exits").unwrap_or(0),
                            unattributed: num(&r, "mb_unattributed").unwrap_or(0),
                        },
                        fenced: r
                            .get("fenced")
                            .map(unescape)
                            .unwrap_or_default()
                            .split_whitespace()
                            .filter_map(|w| w.parse().ok())
                            .collect(),
                        trace: None,
                        incarnations: vec![],
                    })
                })();
                let guest = guest.map(|mut g| {
                    g.incarnations = self.incarnations.remove(&g.name).unwrap_or_default();
                    // Stopped at the run's end before it ran an instruction: not started.
                    if g.state == guest_state::ENDED && g.tsc_first_entry == 0 {
                        g.state = guest_state::NOT_STARTED.into();
                        g.fault = Some(NEVER_ENTERED.into());
                    }
                    g
                });
                match guest {
                    Some(g) => self.guests.push(g),
                    None => self.problems.push(format!("guest record without its fields: {line}")),
                }
            }
            kind::PCI => {
                let d = (|| {
                    Some(DeviceReport {
                        bdf: r.get("bdf")?.raw().to_string(),
                        id: r.get("id")?.raw().to_string(),
                        class: r.get("class")?.raw().to_string(),
                        pin: num(&r, "pin")?,
                        line: num(&r, "line")?,
                        bars: unescape(r.get("bars")?),
                        ..Default::default()
                    })
                })();
                match d {
                    Some(d) => self.devices.push(d),
                    None => self.problems.push(format!("pci record without its fields: {line}")),
                }
            }
            kind::DEVICE => {
                let bdf = r.get("bdf").map(|v| v.raw().to_string());
                let found = bdf.and_then(|b| self.devices.iter_mut().find(|d| d.bdf == b));
                match (found, r.get("name"), num::<u32>(&r, "vector"), r.get("bars")) {
                    (Some(d), Some(name), Some(vector), Some(bars)) => {
                        d.owner = Some(unescape(name));
                        d.vector = Some(vector);
                        d.dma = r.get("dma").map(|v| v.raw().to_string());
                        d.owner_bars = Some(unescape(bars));
                    }
                    _ => self.problems.push(format!("device record without its function: {line}")),
                }
            }
            kind::CHANNEL => {
                let ch = (|| {
                    Some(ChannelReport {
                        name: unescape(r.get("name")?),
                        a: unescape(r.get("a")?),
                        b: unescape(r.get("b")?),
                        slots: num(&r, "slots")?,
                        a_sent: num(&r, "a_sent")?,
                        b_received: num(&r, "b_received")?,
                        b_sent: num(&r, "b_sent")?,
                        a_received: num(&r, "a_received")?,
                    })
                })();
                match ch {
                    Some(c) => self.channels.push(c),
                    None => {
                        self.problems.push(format!("channel record without its fields: {line}"))
                    }
                }
            }
            kind::INCARNATION => {
                let inc = (|| {
                    let ending = r.get("ending")?.raw().to_string();
                    let first: u64 = num(&r, "tsc_first_entry")?;
                    Some((
                        unescape(r.get("guest")?),
                        IncarnationReport {
                            n: num(&r, "n")?,
                            exit_status: (ending == "exited")
                                .then(|| num(&r, "exit_status"))
                                .flatten(),
                            ending,
                            fault: r.get("fault").map(unescape).filter(|s| !s.is_empty()),
                            tsc_start: num(&r, "tsc_start")?,
                            tsc_first_entry: (first != 0).then_some(first),
                            tsc_end: num(&r, "tsc_end")?,
                            frames_at_start: num(&r, "frames_at_start")?,
                            caps_revoked: num(&r, "caps_revoked")?,
                            caps_unconfirmed: num(&r, "caps_unconfirmed")?,
                            caps_dropped: num(&r, "caps_dropped")?,
                            caps_live: num(&r, "caps_live").unwrap_or(0),
                            link_resets: num(&r, "link_resets").unwrap_or(0),
                            link_lost: num(&r, "link_lost").unwrap_or(0),
                            exits: match r.get("exits") {
                                Some(v) => counts(&unescape(v))?,
                                None => BTreeMap::new(),
                            },
                            hypercalls: num(&r, "hypercalls").unwrap_or(0),
                        },
                    ))
                })();
                match inc {
                    Some((g, i)) => self.incarnations.entry(g).or_default().push(i),
                    None => {
                        self.problems.push(format!("incarnation record without its fields: {line}"))
                    }
                }
            }
            kind::START => match (r.get("guest").map(unescape), num(&r, "n"), num(&r, "core")) {
                (Some(g), Some(n), Some(core)) => {
                    self.starts.insert(g, (n, core));
                }
                _ => self.problems.push(format!("start record without its fields: {line}")),
            },
            kind::STATS => {
                let live = (|| {
                    let traffic = unescape(r.get("traffic")?)
                        .split_whitespace()
                        .map(|w| {
                            let mut p = w.rsplitn(3, ':');
                            let received = p.next()?.parse().ok()?;
                            let sent = p.next()?.parse().ok()?;
                            Some((p.next()?.to_string(), sent, received))
                        })
                        .collect::<Option<Vec<_>>>()?;
                    Some((
                        unescape(r.get("guest")?),
                        LiveStats {
                            n: num(&r, "n")?,
                            tsc: num(&r, "tsc")?,
                            exits: counts(&unescape(r.get("exits")?))?,
                            hypercalls: num(&r, "hypercalls")?,
                            traffic,
                        },
                    ))
                })();
                match live {
                    Some((g, s)) => {
                        self.live.insert(g, s);
                    }
                    None => self.problems.push(format!("malformed stats record: {line}")),
                }
            }
            kind::REFUSED => self.missing = r.get("missing").map(unescape),
            kind::READY => self.tsc.ready = num(&r, "tsc"),
            kind::TRACE => {
                let events = (|| {
                    let core: u32 = num(&r, "core")?;
                    let base: u64 = num(&r, "base")?;
                    let ev = unescape(r.get("ev")?);
                    let list: Option<Vec<TraceEvent>> = record::trace::events(&ev, base)
                        .map(|e| {
                            e.map(|e| TraceEvent {
                                reason: e.reason.to_string(),
                                entry: e.entry,
                                exit: e.exit,
                            })
                        })
                        .collect();
                    Some((core, list?))
                })();
                match events {
                    Some((core, list)) => self.traces.entry(core).or_default().extend(list),
                    None => self.problems.push(format!("malformed trace record: {line}")),
                }
            }
            kind::TRACE_SUM => {
                let sum = (|| {
                    Some((
                        num(&r, "core")?,
                        GuestTrace {
                            exits: num(&r, "exits")?,
                            kept: num(&r, "kept")?,
                            guest_tsc: num(&r, "guest_tsc")?,
                            hypervisor_tsc: num(&r, "hv_tsc")?,
                        },
                    ))
                })();
                match sum {
                    Some((core, s)) => {
                        self.trace_sums.insert(core, s);
                    }
                    None => self.problems.push(format!("malformed tracesum record: {line}")),
                }
            }
            kind::END => {
                self.end_outcome = r.get("outcome").map(|v| v.raw().to_string());
                self.tsc.end = num(&r, "tsc");
            }
            kind::VIEW => {
                let v = (|| {
                    let members = unescape(r.get("members")?)
                        .split_whitespace()
                        .map(|w| w.parse().ok())
                        .collect::<Option<Vec<u32>>>()?;
                    Some(ViewReport {
                        core: num(&r, "core")?,
                        num: num(&r, "num")?,
                        members,
                        by: num(&r, "by")?,
                        tsc: num(&r, "tsc")?,
                    })
                })();
                match v {
                    Some(v) => self.views.push(v),
                    None => self.problems.push(format!("view record without its fields: {line}")),
                }
            }
            kind::VCHANGE => {
                let v = (|| {
                    Some(ViewChangeReport {
                        core: num(&r, "core")?,
                        num: num(&r, "num")?,
                        installed: num::<u32>(&r, "installed")? != 0,
                        sent: MemberMessages::parse(&unescape(r.get("sent")?))?,
                        received: MemberMessages::parse(&unescape(r.get("received")?))?,
                        rounds: num(&r, "rounds")?,
                        exits: num(&r, "exits")?,
                        tsc_first: num(&r, "tsc_first")?,
                        tsc_last: num(&r, "tsc_last")?,
                    })
                })();
                match v {
                    // A core prints the changes it has not installed when its guest is
                    // down for good; a later record of the same change adds to it.
                    Some(v) => match self
                        .view_changes
                        .iter_mut()
                        .find(|o| (o.core, o.num) == (v.core, v.num))
                    {
                        Some(o) => {
                            o.installed |= v.installed;
                            o.sent.add(&v.sent);
                            o.received.add(&v.received);
                            o.rounds += v.rounds;
                            o.exits += v.exits;
                            let firsts = [o.tsc_first, v.tsc_first].into_iter().filter(|&t| t != 0);
                            o.tsc_first = firsts.min().unwrap_or(0);
                            o.tsc_last = o.tsc_last.max(v.tsc_last);
                        }
                        None => self.view_changes.push(v),
                    },
                    None => {
                        self.problems.push(format!("vchange record without its fields: {line}"))
                    }
                }
            }
            kind::SUSPECT => match (num(&r, "core"), num(&r, "target"), num(&r, "tsc")) {
                (Some(core), Some(target), Some(tsc)) => {
                    self.suspicions.push(SuspectReport { core, target, tsc })
                }
                _ => self.problems.push(format!("suspect record without its fields: {line}")),
            },
            kind::HANG => match (num(&r, "core"), num(&r, "tsc")) {
                (Some(core), Some(tsc)) => self.hangs.push(HangReport { core, tsc }),
                _ => self.problems.push(format!("hang record without its fields: {line}")),
            },
            kind::HOSTCTL => match (
                r.get("op").map(unescape),
                r.get("guest").map(unescape),
                r.get("outcome").map(unescape),
                r.get("detail").map(unescape),
                num(&r, "tsc"),
            ) {
                (Some(op), Some(guest), Some(outcome), Some(detail), Some(tsc)) => {
                    let id = num(&r, "id");
                    self.host_requests.push(HostRequest { id, op, guest, outcome, detail, tsc })
                }
                _ => self.problems.push(format!("hostctl record without its fields: {line}")),
            },
            other => self.problems.push(format!("unknown record kind `{other}`")),
        }
        true
    }

    /// The incarnations of guest `name` seen to end so far, oldest first (from its
    /// `incarnation` records, or from its guest record once that has taken them).
    pub fn incarnations_of(&self, name: &str) -> &[IncarnationReport] {
        match self.guests.iter().find(|g| g.name == name) {
            Some(g) => &g.incarnations,
            None => self.incarnations.get(name).map_or(&[], Vec::as_slice),
        }
    }

    /// Gives every guest of the config a place in the report when the hypervisor's records
    /// did not: a refused run lists them `not_started`, with what the machine lacks; a run
    /// that never reached its end record (interrupted, timed out, the emulator gone) keeps
    /// what was seen: a guest whose last incarnation ended and that its restart policy
    /// does not start again is `exited` (with its status) or `stopped` (with its fault);
    /// one its policy restarts, or heard from and not seen ending, is `running`; the rest
    /// `unknown`. (A controller may still have started a guest again: not followed.)
    pub fn account_for(&mut self, planned: &[Planned]) {
        let refused = self.end_outcome.as_deref() == Some(outcome::REFUSED);
        // A run the hypervisor ended without a word of any guest (the SVM backend, which
        // starts none yet): they are `not_started`, with its reason, not left out.
        let none_started = self.end_outcome.as_deref() == Some(outcome::FAILED)
            && self.incarnations.is_empty()
            && self.starts.is_empty()
            && self.heard.is_empty();
        if !self.guests.is_empty() || (self.end_outcome.is_some() && !refused && !none_started) {
            return;
        }
        if none_started && !refused && !planned.is_empty() {
            self.problems.push(format!(
                "the hypervisor ended the run without starting any guest{}",
                self.first_error.as_deref().map(|e| format!(": {e}")).unwrap_or_default()
            ));
        }
        for p in planned {
            let incarnations = self.incarnations.remove(&p.name).unwrap_or_default();
            let mut g = GuestReport {
                name: p.name.clone(),
                core: p.core,
                state: unfinished::UNKNOWN.into(),
                exit_status: 0,
                exits: BTreeMap::new(),
                fault: None,
                hypercalls: 0,
                tsc_first_entry: incarnations.iter().find_map(|i| i.tsc_first_entry).unwrap_or(0),
                tsc_end: 0,
                xmsgs: 0,
                nmis: 0,
                requests_from: BTreeMap::new(),
                cap_refused: 0,
                foreign_tsc: 0,
                revoke_tsc: 0,
                away_tsc: 0,
                revoke: RevokeTraffic::default(),
                probes: ProbeTraffic::default(),
                fenced: vec![],
                incarnations,
                trace: None,
            };
            if refused {
                g.state = guest_state::NOT_STARTED.into();
                g.fault = Some(format!(
                    "the hypervisor refused to run: this machine lacks {}",
                    self.missing.as_deref().unwrap_or("something it did not name")
                ));
            } else if none_started {
                g.state = guest_state::NOT_STARTED.into();
                g.fault = Some(match &self.first_error {
                    Some(e) => format!("the hypervisor started no guest: {e}"),
                    None => "the hypervisor ended the run without starting it".into(),
                });
            } else if let Some(last) = g.incarnations.last().cloned() {
                let failed = last.ending != guest_state::EXITED || last.exit_status != Some(0);
                let policy = match p.restart.as_str() {
                    "always" => true,
                    "on-fault" => failed,
                    _ => false,
                };
                if policy && last.n <= p.max_restarts {
                    g.state = unfinished::RUNNING.into();
                } else {
                    g.state = last.ending.clone();
                    g.exit_status = last.exit_status.unwrap_or(0);
                    g.fault = last.fault.clone();
                    g.tsc_end = last.tsc_end;
                }
            } else if self.heard.contains(&p.name) {
                g.state = unfinished::RUNNING.into();
            }
            self.guests.push(g);
        }
    }

    /// The TSC values with the figures derived from them: `hypervisor_boot` (entry to the
    /// `ready` record: no guest time after it) and `to_all_guests_running`.
    pub fn tsc_figures(&self) -> Tsc {
        let mut tsc = self.tsc.clone();
        if let (Some(a), Some(b)) = (tsc.hypervisor_entry, tsc.ready) {
            tsc.hypervisor_boot = b.checked_sub(a);
        }
        let entered: Vec<u64> =
            self.guests.iter().map(|g| g.tsc_first_entry).filter(|t| *t > 0).collect();
        let meant_to_run = self.guests.iter().filter(|g| g.state != "not_started").count();
        if let (Some(a), true) =
            (tsc.hypervisor_entry, !entered.is_empty() && entered.len() == meant_to_run)
        {
            tsc.to_all_guests_running = entered.iter().max().and_then(|m| m.checked_sub(a));
        }
        tsc
    }

    /// Each guest's trace totals (from its core's `tracesum`), and a problem for a traced
    /// core whose records do not add up (fewer rows than it says it kept).
    pub fn attach_traces(&mut self) {
        for g in &mut self.guests {
            g.trace = self.trace_sums.get(&g.core).cloned();
            if let Some(t) = &g.trace {
                let rows = self.traces.get(&g.core).map_or(0, Vec::len) as u64;
                if rows != t.kept {
                    self.problems.push(format!(
                        "trace of guest {}: {rows} exits in its records, {} kept",
                        g.name, t.kept
                    ));
                }
            }
        }
    }

    /// The exit trace as CSV: one row per kept exit, guests in report order, oldest first.
    /// Times are in the report's `tsc_unit`, relative to the hypervisor's entry (`t0`).
    pub fn trace_csv(&self) -> String {
        let t0 = self.tsc.hypervisor_entry.unwrap_or(0);
        let mut out = String::from(
            "guest,core,seq,reason,entry_tsc,exit_tsc,guest_tsc,hypervisor_tsc_before\n",
        );
        for g in &self.guests {
            let Some(events) = self.traces.get(&g.core) else { continue };
            let skipped = g.trace.as_ref().map_or(0, |t| t.exits.saturating_sub(t.kept));
            let mut prev: Option<u64> = None;
            for (i, e) in events.iter().enumerate() {
                let before =
                    prev.map(|p| (e.entry.saturating_sub(p)).to_string()).unwrap_or_default();
                out += &format!(
                    "{},{},{},{},{},{},{},{}\n",
                    g.name,
                    g.core,
                    skipped + i as u64,
                    e.reason,
                    e.entry.saturating_sub(t0),
                    e.exit.saturating_sub(t0),
                    e.exit.saturating_sub(e.entry),
                    before
                );
                prev = Some(e.exit);
            }
        }
        out
    }

    pub fn phase(&self) -> Phase {
        if self.end_outcome.is_some() {
            Phase::Ended
        } else if let Some(total) = self.cores_used {
            Phase::Cores { online: self.online, total }
        } else if self.boot_seen {
            Phase::Hypervisor
        } else if self.grub_seen {
            Phase::Grub
        } else {
            Phase::Firmware
        }
    }

    /// The run's outcome, cross-checked: an `ok` end record must come with one `core`
    /// record per core used, each with VMX on.
    pub fn outcome(&mut self, timed_out: bool) -> String {
        let Some(end) = self.end_outcome.clone() else {
            if !timed_out {
                self.problems.push("the emulator stopped without an end record".into());
            }
            return if timed_out { "timeout".into() } else { outcome::FAILED.into() };
        };
        if end == outcome::OK {
            let used = self.cores_used.unwrap_or(0) as usize;
            if self.cores.len() != used || used == 0 {
                self.problems
                    .push(format!("{} core records for {used} cores used", self.cores.len()));
                return outcome::FAILED.into();
            }
            // Exited 0, or still running when the run's duration was over.
            let fine = |g: &GuestReport| {
                (g.state == guest_state::EXITED && g.exit_status == 0)
                    || g.state == guest_state::ENDED
            };
            if let Some(g) = self.guests.iter().find(|g| !fine(g)) {
                let why = g.fault.as_deref().map(|f| format!(" ({f})")).unwrap_or_default();
                self.problems.push(format!(
                    "end says ok but guest {} is {} with status {}{why}",
                    g.name, g.state, g.exit_status
                ));
                return outcome::FAILED.into();
            }
            if let Some(c) = self.cores.iter().find(|c| c.vmx != "on" || c.state != "up") {
                self.problems.push(format!(
                    "end says ok but core {} is {} with VMX {}",
                    c.index, c.state, c.vmx
                ));
                return outcome::FAILED.into();
            }
        }
        if end == outcome::REFUSED && self.missing.is_none() {
            self.problems.push("refused without saying what is missing".into());
        }
        end
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RUN_OK: &str = "\
  Booting `mkvisor'
mkvisor: GRUB is loading the hypervisor
[c0] mkvisor 0.1.0 starting (ABI 1)
#mkv boot abi=1 tsc=100 cmdline=\"\"
#mkv cpus count=2 enabled=2 used=2 bsp_apic=0 x2apic=1
#mkv online index=0 apic=0
#mkv online index=1 apic=1
#mkv core index=0 apic=0 state=up vmx=on reason=\"\"
#mkv core index=1 apic=1 state=up vmx=on reason=\"\"
#mkv end outcome=ok tsc=250
";

    fn feed(text: &str) -> Console {
        let mut c = Console::default();
        for l in text.lines() {
            c.feed(l);
        }
        c
    }

    #[test]
    fn exit_statuses_print_in_decimal_up_to_255_and_in_hex_above() {
        assert_eq!(status_text(0), "0");
        assert_eq!(status_text(255), "255");
        assert_eq!(status_text(256), "0x100");
        assert_eq!(status_text(0xdead), "0xdead");
    }

    #[test]
    fn phases_follow_the_console() {
        let mut c = Console::default();
        assert_eq!(c.phase(), Phase::Firmware);
        let mut seen = vec![];
        for l in RUN_OK.lines() {
            c.feed(l);
            if seen.last() != Some(&c.phase()) {
                seen.push(c.phase());
            }
        }
        assert_eq!(
            seen,
            [
                Phase::Firmware,
                Phase::Grub,
                Phase::Hypervisor,
                Phase::Cores { online: 0, total: 2 },
                Phase::Cores { online: 1, total: 2 },
                Phase::Cores { online: 2, total: 2 },
                Phase::Ended
            ]
        );
    }

    #[test]
    fn ok_run() {
        let mut c = feed(RUN_OK);
        assert_eq!(c.outcome(false), "ok");
        assert_eq!(c.cores.len(), 2);
        assert_eq!(c.cores[1].apic_id, 1);
        assert_eq!(c.cores[1].reason, None);
        assert_eq!(c.cores[1].backend, None, "a record without the field (older hypervisors)");
        let svm = feed(&RUN_OK.replace(
            "index=1 apic=1 state=up vmx=on",
            "index=1 apic=1 state=up vmx=on backend=svm",
        ));
        assert_eq!(svm.cores[1].backend.as_deref(), Some("svm"));
        assert_eq!(c.tsc.hypervisor_entry, Some(100));
        assert_eq!(c.tsc.end, Some(250));
        assert!(c.problems.is_empty(), "{:?}", c.problems);
    }

    #[test]
    fn ok_end_with_a_failed_core_is_failed() {
        let mut c = feed(&RUN_OK.replace(
            "index=1 apic=1 state=up vmx=on reason=\"\"",
            "index=1 apic=1 state=silent vmx=off reason=\"no answer\"",
        ));
        assert_eq!(c.outcome(false), "failed");
        assert_eq!(c.cores[1].reason.as_deref(), Some("no answer"));
        let mut c =
            feed(&RUN_OK.replace("#mkv core index=1 apic=1 state=up vmx=on reason=\"\"\n", ""));
        assert_eq!(c.outcome(false), "failed");
    }

    #[test]
    fn guest_records() {
        let mut c = feed(&RUN_OK.replace(
            "#mkv end",
            "#mkv guest index=0 name=alpha core=0 state=exited exit_status=0 exits=\"cpuid:2 vmcall:9\" fault=\"\" hypercalls=9 tsc_first_entry=150 tsc_end=200\n\
             #mkv guest index=1 name=mallory core=1 state=stopped exit_status=0 exits=\"ept_violation:1\" fault=\"EPT violation: read at guest-physical 0xa00000\" hypercalls=1 tsc_first_entry=160 tsc_end=210\n\
             #mkv end",
        ));
        assert_eq!(c.guests.len(), 2);
        assert_eq!(c.guests[0].exits.get("vmcall"), Some(&9));
        assert_eq!(
            c.guests[1].fault.as_deref(),
            Some("EPT violation: read at guest-physical 0xa00000")
        );
        assert_eq!(c.outcome(false), "failed", "a stopped guest is not an ok run");
        let c = feed(
            "#mkv channel name=ab a=x b=y slots=64 a_sent=5 b_received=4 b_sent=0 a_received=0\n",
        );
        assert_eq!(c.channels[0].b_received, 4);
        assert!(c.problems.is_empty());
        let c = feed("#mkv guest index=0 name=a core=0 state=exited exit_status=0 exits=\"cpuid\" fault=\"\" hypercalls=0 tsc_first_entry=0 tsc_end=0\n");
        assert_eq!(c.problems.len(), 1, "exits without counts are malformed");
    }

    #[test]
    fn hypervisor_boot_ends_when_the_cores_are_up_not_at_the_end() {
        // Guests ran from 300 to 9000: none of that is the hypervisor's boot.
        let c = feed(&RUN_OK.replace(
            "#mkv end outcome=ok tsc=250",
            "#mkv ready tsc=180\n\
             #mkv guest index=0 name=a core=0 state=exited exit_status=0 exits=\"\" fault=\"\" hypercalls=1 tsc_first_entry=300 tsc_end=9000\n\
             #mkv end outcome=ok tsc=9100",
        ));
        let t = c.tsc_figures();
        assert_eq!(t.hypervisor_boot, Some(80));
        assert_eq!(t.to_all_guests_running, Some(200));
        assert_eq!(t.end, Some(9100));
        // Without a ready record (a refusal) there is no boot figure, rather than a wrong one.
        assert_eq!(feed(RUN_OK).tsc_figures().hypervisor_boot, None);
    }

    #[test]
    fn traces_become_csv_rows_and_guest_totals() {
        let mut c = feed(&RUN_OK.replace(
            "#mkv end",
            "#mkv trace core=1 base=150 ev=\"cpuid:0:20 vmcall:5:30\"\n\
             #mkv trace core=1 base=300 ev=\"hlt:0:1000\"\n\
             #mkv tracesum core=1 exits=4 kept=3 guest_tsc=1060 hv_tsc=150\n\
             #mkv guest index=0 name=a core=1 state=exited exit_status=0 exits=\"cpuid:2 vmcall:1 hlt:1\" fault=\"\" hypercalls=1 tsc_first_entry=120 tsc_end=1400\n\
             #mkv end",
        ));
        c.attach_traces();
        assert!(c.problems.is_empty(), "{:?}", c.problems);
        let t = c.guests[0].trace.clone().unwrap();
        assert_eq!((t.exits, t.kept, t.guest_tsc, t.hypervisor_tsc), (4, 3, 1060, 150));
        let csv = c.trace_csv();
        let rows: Vec<&str> = csv.lines().collect();
        assert_eq!(
            rows[0],
            "guest,core,seq,reason,entry_tsc,exit_tsc,guest_tsc,hypervisor_tsc_before"
        );
        // Times from hypervisor entry (tsc=100); the first kept exit is the second traced.
        assert_eq!(rows[1], "a,1,1,cpuid,50,70,20,");
        assert_eq!(rows[2], "a,1,2,vmcall,75,105,30,5");
        assert_eq!(rows[3], "a,1,3,hlt,200,1200,1000,95");
        assert_eq!(rows.len(), 4);
        // Records that do not add up are a problem; a malformed one too.
        let mut c = feed("#mkv trace core=0 base=1 ev=\"cpuid:0\"\n#mkv tracesum core=0 exits=1 kept=1 guest_tsc=1 hv_tsc=0\n#mkv guest index=0 name=a core=0 state=exited exit_status=0 exits=\"\" fault=\"\" hypercalls=1 tsc_first_entry=1 tsc_end=2\n");
        c.attach_traces();
        assert_eq!(c.problems.len(), 2, "{:?}", c.problems);
    }

    #[test]
    fn refused_run() {
        let mut c = feed("#mkv boot abi=1 tsc=5\n#mkv refused missing=\"VT-x (CPUID.01H:ECX.VMX[bit 5] is 0)\"\n#mkv end outcome=refused tsc=9\n");
        assert_eq!(c.outcome(false), "refused");
        assert!(c.missing.as_deref().unwrap().starts_with("VT-x"));
    }

    #[test]
    fn no_end_record() {
        let mut c = feed("#mkv boot abi=1 tsc=5\n");
        assert_eq!(c.outcome(true), "timeout");
        let mut c = feed("#mkv boot abi=1 tsc=5\n");
        assert_eq!(c.outcome(false), "failed");
        assert_eq!(c.problems.len(), 1);
    }

    #[test]
    fn ignored_command_line_words_are_problems() {
        let c = feed(&RUN_OK.replace(
            "#mkv cpus",
            "[c0] WARN command line: `frob`: unknown option (ignored)\n#mkv cpus",
        ));
        assert_eq!(
            c.problems,
            ["the hypervisor ignored a word of its command line: `frob`: unknown option"]
        );
    }

    #[test]
    fn what_a_guest_never_had_is_null_in_json() {
        let c = feed(
            "#mkv guest index=0 name=a core=0 state=exited exit_status=3 exits=\"\" fault=\"\" hypercalls=1 tsc_first_entry=10 tsc_end=20\n\
             #mkv guest index=1 name=b core=9 state=not_started exit_status=0 exits=\"\" fault=\"its core does not exist on this machine\" hypercalls=0 tsc_first_entry=0 tsc_end=0\n\
             #mkv guest index=2 name=c core=1 state=stopped exit_status=0 exits=\"\" fault=\"triple fault\" hypercalls=0 tsc_first_entry=11 tsc_end=30\n",
        );
        assert!(c.problems.is_empty(), "{:?}", c.problems);
        let json = serde_json::to_value(&c.guests).unwrap();
        assert_eq!(json[0]["exit_status"], 3);
        assert_eq!(
            (json[0]["tsc_first_entry"].as_u64(), json[0]["tsc_end"].as_u64()),
            (Some(10), Some(20))
        );
        assert!(json[1]["exit_status"].is_null(), "{json}");
        assert!(json[1]["tsc_first_entry"].is_null() && json[1]["tsc_end"].is_null(), "{json}");
        assert!(json[2]["exit_status"].is_null(), "a stopped guest has no exit status: {json}");
        assert_eq!(json[2]["tsc_end"], 30);
        // Read back (and reports written before the change, with 0s): the same values.
        let back: Vec<GuestReport> = serde_json::from_value(json).unwrap();
        assert_eq!(back, c.guests);
        let old = serde_json::to_string(&c.guests[1]).unwrap().replace("null", "0");
        assert_eq!(serde_json::from_str::<GuestReport>(&old).unwrap(), c.guests[1]);
    }

    #[test]
    fn malformed_records_are_problems_not_crashes() {
        let c = feed(
            "#mkv core index=1 junk\n#mkv core index=x apic=1 vmx=on state=up\n#mkv martian a=1\n",
        );
        assert_eq!(c.problems.len(), 3);
        assert!(c.cores.is_empty());
    }

    fn plan(name: &str, core: u32, restart: &str, max_restarts: u32) -> Planned {
        Planned { name: name.into(), core, restart: restart.into(), max_restarts }
    }

    #[test]
    fn a_guest_the_duration_ended_before_its_first_entry_is_not_started_and_the_run_failed() {
        // As the hypervisor reports `--duration 1ms` (pair.toml): `ended`, never entered,
        // and an `ok` end record.
        let run = RUN_OK.replace(
            "#mkv end",
            "#mkv incarnation guest=big n=1 ending=stopped exit_status=0 fault=\"the run's duration ended\" tsc_start=120 tsc_first_entry=0 tsc_end=200 frames_at_start=9 caps_revoked=0 caps_unconfirmed=0 caps_dropped=0 caps_live=2 link_resets=0 link_lost=0\n\
             #mkv guest index=0 name=big core=0 state=ended exit_status=0 exits=\"\" fault=\"\" hypercalls=0 tsc_first_entry=0 tsc_end=200 incarnations=1\n\
             #mkv guest index=1 name=small core=1 state=ended exit_status=0 exits=\"vmcall:3\" fault=\"\" hypercalls=3 tsc_first_entry=130 tsc_end=210 incarnations=1\n\
             #mkv end",
        );
        let mut c = feed(&run);
        assert_eq!(c.outcome(false), "failed");
        let big = &c.guests[0];
        assert_eq!(
            (big.state.as_str(), big.fault.as_deref()),
            ("not_started", Some(NEVER_ENTERED))
        );
        assert!(c.problems[0].contains("guest big is not_started"), "{:?}", c.problems);
        assert!(c.problems[0].contains("never entered"), "{:?}", c.problems);
        // One that entered and was stopped by the duration is `ended`, as before: fine.
        assert_eq!(c.guests[1].state, "ended");
        let mut c = feed(&run.replace(
            "tsc_first_entry=0 tsc_end=200 incarnations",
            "tsc_first_entry=150 tsc_end=200 incarnations",
        ));
        assert_eq!(c.outcome(false), "ok", "{:?}", c.problems);
    }

    #[test]
    fn an_unfinished_run_keeps_what_it_saw_of_each_guest() {
        let inc = |g: &str, n: u32, ending: &str, status: u32, fault: &str| {
            format!("#mkv incarnation guest={g} n={n} ending={ending} exit_status={status} fault=\"{fault}\" tsc_start=100 tsc_first_entry=110 tsc_end=300 frames_at_start=9 caps_revoked=0 caps_unconfirmed=0 caps_dropped=0\n")
        };
        let text = [
            "#mkv boot abi=1 tsc=5 cmdline=\"\"\n".to_string(),
            "[done@c0] hello\n".into(),
            inc("done", 1, "exited", 3, ""),
            "[talky@c1] still going\n".into(),
            inc("phoenix", 1, "stopped", 0, "EPT violation"),
            inc("broke", 1, "stopped", 0, "EPT violation"),
            inc("worn", 1, "stopped", 0, "x"),
            inc("worn", 2, "stopped", 0, "triple fault"),
        ]
        .concat();
        let mut c = feed(&text);
        assert_eq!(c.outcome(false), "failed");
        c.account_for(&[
            plan("done", 0, "never", 0),
            plan("talky", 1, "never", 0),
            plan("phoenix", 2, "on-fault", 3),
            plan("broke", 3, "never", 0),
            plan("worn", 4, "on-fault", 1),
            plan("silent", 5, "never", 0),
        ]);
        let seen: Vec<_> = c
            .guests
            .iter()
            .map(|g| (g.name.as_str(), g.core, g.state.as_str(), g.exit_status, g.fault.as_deref()))
            .collect();
        assert_eq!(
            seen,
            [
                ("done", 0, "exited", 3, None),
                ("talky", 1, "running", 0, None),
                ("phoenix", 2, "running", 0, None),
                ("broke", 3, "stopped", 0, Some("EPT violation")),
                ("worn", 4, "stopped", 0, Some("triple fault")),
                ("silent", 5, "unknown", 0, None),
            ]
        );
        assert_eq!(c.guests[4].incarnations.len(), 2);
        assert_eq!((c.guests[0].tsc_first_entry, c.guests[0].tsc_end), (110, 300));
        let json = serde_json::to_value(&c.guests).unwrap();
        assert_eq!(json[0]["exit_status"], 3);
        assert!(json[5]["exit_status"].is_null() && json[5]["tsc_first_entry"].is_null());
        // A run that reached its end record is the hypervisor's to report, not ours.
        let mut c = feed(RUN_OK);
        c.account_for(&[plan("x", 0, "never", 0)]);
        assert!(c.guests.is_empty());
    }

    #[test]
    fn a_refused_run_lists_the_configs_guests_not_started_with_the_reason() {
        let mut c = feed("#mkv boot abi=1 tsc=5\n#mkv refused missing=\"VT-x (CPUID.01H:ECX.VMX[bit 5] is 0)\"\n#mkv end outcome=refused tsc=9\n");
        assert_eq!(c.outcome(false), "refused");
        c.account_for(&[plan("alpha", 0, "never", 0), plan("beta", 1, "always", 3)]);
        assert_eq!(c.guests.len(), 2);
        for g in &c.guests {
            assert_eq!(g.state, "not_started");
            assert_eq!(
                g.fault.as_deref(),
                Some("the hypervisor refused to run: this machine lacks VT-x (CPUID.01H:ECX.VMX[bit 5] is 0)")
            );
        }
    }

    #[test]
    fn a_run_ended_before_any_guest_started_lists_them_not_started_with_the_reason() {
        // What the SVM backend does today (QEMU's `max` CPU): cores up, no guest started.
        let mut c = feed(
            "#mkv boot abi=1 tsc=5\n#mkv core index=0 apic=0 state=up vmx=on reason=\"\"\n\
             [c0] ERROR the SVM backend runs its world-switch check only. Guests not started.\n\
             #mkv end outcome=failed tsc=9\n",
        );
        c.account_for(&[plan("alpha", 0, "never", 0), plan("beta", 1, "always", 3)]);
        let states: Vec<(&str, &str)> =
            c.guests.iter().map(|g| (g.name.as_str(), g.state.as_str())).collect();
        assert_eq!(states, [("alpha", "not_started"), ("beta", "not_started")]);
        assert_eq!(
            c.guests[0].fault.as_deref(),
            Some(
                "the hypervisor started no guest: the SVM backend runs its world-switch check \
                 only. Guests not started."
            )
        );
        assert!(c.problems.iter().any(|p| p.starts_with("the hypervisor ended the run without")));
        // A failed run whose guests did start is the hypervisor's to report.
        let mut c = feed("#mkv boot abi=1 tsc=5\n#mkv start guest=alpha n=1 core=0\n#mkv end outcome=failed tsc=9\n");
        c.account_for(&[plan("alpha", 0, "never", 0)]);
        assert!(c.guests.is_empty());
    }

    #[test]
    fn planned_guests_come_from_the_config_with_their_restart_policy() {
        let c = crate::config::load(&crate::workspace_root().join("configs/lifecycle.toml"))
            .unwrap()
            .config;
        let p = planned(&c);
        assert_eq!(p.len(), c.guests.len());
        assert!(p.iter().any(|g| g.restart == "never" && g.max_restarts == 0), "{p:?}");
        assert!(p.iter().any(|g| g.restart != "never" && g.max_restarts > 0), "{p:?}");
    }

    #[test]
    fn live_stats_records_keep_each_guests_latest_figures() {
        let c = feed(
            "#mkv stats guest=ping n=1 core=0 tsc=100 exits=\"vmcall:3\" hypercalls=3 traffic=\"ab:5:4 a:b:1:0\"\n\
             #mkv stats guest=ping n=1 core=0 tsc=200 exits=\"vmcall:7 hlt:2\" hypercalls=7 traffic=\"ab:9:8 a:b:2:1\"\n\
             #mkv stats guest=pong n=2 core=1 tsc=150 exits=\"\" hypercalls=0 traffic=\"\"\n\
             #mkv stats guest=bad n=1 core=2 tsc=1 exits=\"\" hypercalls=0 traffic=\"ab:x:1\"\n",
        );
        let ping = &c.live["ping"];
        assert_eq!((ping.n, ping.tsc, ping.hypercalls), (1, 200, 7));
        assert_eq!(ping.exits.get("hlt"), Some(&2));
        assert_eq!(ping.traffic, [("ab".to_string(), 9, 8), ("a:b".to_string(), 2, 1)]);
        assert_eq!(c.live["pong"], LiveStats { n: 2, tsc: 150, ..Default::default() });
        assert_eq!(c.problems.len(), 1, "{:?}", c.problems);
        assert!(!c.live.contains_key("bad"));
    }
}
