// SPDX-License-Identifier: MIT OR Apache-2.0
//! Watching running machines from the host: the run's own description in its folder
//! (`run.json`, written when the emulator starts and again when the run ends), `cargo xtask
//! ps` (the runs in progress: a `run.json` without an outcome whose process is alive), and
//! `cargo xtask top RUN` (one run's serial log followed as it grows, read by the report's
//! own record parser, `report::Console`, and shown per guest and per channel).
//!
//! May call `report` (the record parser, the console's plain text) and the crate root (where
//! run folders live); never `run`, which calls this.

use crate::report::{Console, Phase};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{IsTerminal, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The file a run writes in its folder.
pub const RUN_INFO: &str = "run.json";

/// What a run folder's `run.json` says: who runs it, what, since when, and how it ended.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct RunInfo {
    /// The process running it (`cargo xtask run`, or a program using the library).
    pub pid: u32,
    /// That process's start time (`/proc/PID/stat`, clock ticks since boot), so that a
    /// reused pid is not taken for it.
    pub pid_start: Option<u64>,
    /// The emulator's process (its process group's leader).
    pub emulator_pid: u32,
    pub emulator: String,
    pub cpus: u32,
    /// The config booted, as given (absent for a cores-only run).
    pub config: Option<String>,
    /// When the emulator started, seconds since the Unix epoch.
    pub started_unix: f64,
    pub serial_log: String,
    pub report: Option<String>,
    /// The host control socket (`cargo xtask ctl`), while the run is in progress.
    #[serde(default)]
    pub control_socket: Option<String>,
    /// Set when the run is over: its outcome, and when.
    pub outcome: Option<String>,
    pub ended_unix: Option<f64>,
}

fn now_unix() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// The start time of process `pid` (field 22 of `/proc/PID/stat`), if it is alive.
pub fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count after it.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

impl RunInfo {
    /// A run of this process starting now.
    pub fn starting(
        emulator_pid: u32,
        emulator: &str,
        cpus: u32,
        config: Option<&Path>,
        serial_log: &Path,
        report: Option<&Path>,
    ) -> Self {
        let pid = std::process::id();
        RunInfo {
            pid,
            pid_start: process_start(pid),
            emulator_pid,
            emulator: emulator.into(),
            cpus,
            config: config.map(|c| c.display().to_string()),
            started_unix: now_unix(),
            serial_log: serial_log.display().to_string(),
            report: report.map(|r| r.display().to_string()),
            control_socket: None,
            outcome: None,
            ended_unix: None,
        }
    }

    /// Writes it to `dir/run.json` (whole, through a temporary file: a reader never sees
    /// half of it).
    pub fn write(&self, dir: &Path) -> Result<()> {
        let tmp = dir.join(format!("{RUN_INFO}.tmp"));
        std::fs::write(&tmp, serde_json::to_string_pretty(self)? + "\n")?;
        std::fs::rename(&tmp, dir.join(RUN_INFO))
            .with_context(|| format!("writing {}", dir.join(RUN_INFO).display()))
    }

    /// Reads `dir/run.json`.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(RUN_INFO);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{}: not a run.json", path.display()))
    }

    /// Records the run's end: its outcome, now.
    pub fn finish(dir: &Path, outcome: &str) -> Result<()> {
        let mut info = RunInfo::read(dir)?;
        info.outcome = Some(outcome.into());
        info.ended_unix = Some(now_unix());
        info.write(dir)
    }

    /// Whether the run is in progress: not over, and its process alive (the same process:
    /// its start time matches).
    pub fn in_progress(&self) -> bool {
        self.outcome.is_none()
            && match (self.pid_start, process_start(self.pid)) {
                (_, None) => false,
                (Some(want), Some(is)) => want == is,
                (None, Some(_)) => true,
            }
    }

    /// Seconds since it started (until it ended, if it did).
    pub fn elapsed(&self) -> f64 {
        (self.ended_unix.unwrap_or_else(now_unix) - self.started_unix).max(0.0)
    }
}

/// The run folders under `root` that have a `run.json`, oldest first.
pub fn runs(root: &Path) -> Vec<(PathBuf, RunInfo)> {
    let Ok(entries) = std::fs::read_dir(root) else { return vec![] };
    let mut out: Vec<(PathBuf, RunInfo)> = entries
        .flatten()
        .filter_map(|e| Some((e.path(), RunInfo::read(&e.path()).ok()?)))
        .collect();
    out.sort_by(|a, b| a.1.started_unix.total_cmp(&b.1.started_unix));
    out
}

/// `1:05`, `1:02:03`.
fn clock(seconds: f64) -> String {
    let s = seconds as u64;
    if s >= 3600 {
        format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
    } else {
        format!("{}:{:02}", s / 60, s % 60)
    }
}

/// A config path as short as it stays clear: relative to the workspace when inside it.
fn shown_config(c: Option<&str>) -> String {
    let Some(c) = c else { return "(no config)".into() };
    let root = crate::workspace_root();
    Path::new(c).strip_prefix(&root).map_or(c.to_string(), |p| p.display().to_string())
}

/// `cargo xtask ps`: a table of the runs in progress under `root` (with `all`, of every run
/// folder that has a `run.json`, with its outcome).
pub fn ps(root: &Path, all: bool) -> String {
    let runs: Vec<(PathBuf, RunInfo)> =
        runs(root).into_iter().filter(|(_, i)| all || i.in_progress()).collect();
    if runs.is_empty() {
        return if all {
            format!("no runs under {}\n", root.display())
        } else {
            "no run in progress\n".to_string()
        };
    }
    let mut out =
        format!("{:<8} {:>8}  {:<12} {:<28} {}\n", "PID", "ELAPSED", "STATE", "CONFIG", "FOLDER");
    for (dir, i) in runs {
        let state = match (&i.outcome, i.in_progress()) {
            (Some(o), _) => o.clone(),
            (None, true) => "running".into(),
            (None, false) => "abandoned".into(),
        };
        out += &format!(
            "{:<8} {:>8}  {:<12} {:<28} {}\n",
            i.pid,
            clock(i.elapsed()),
            state,
            shown_config(i.config.as_deref()),
            dir.display()
        );
    }
    out
}

/// The run folder `which` names: a folder (a path, or a name under `root`), a pid of a run
/// in progress, or, when `None`, the only run in progress.
pub fn find_run(root: &Path, which: Option<&str>) -> Result<PathBuf> {
    let usage = |e: anyhow::Error| crate::exit::coded(crate::exit::USAGE, e);
    let live: Vec<(PathBuf, RunInfo)> =
        runs(root).into_iter().filter(|(_, i)| i.in_progress()).collect();
    let Some(which) = which else {
        return match live.as_slice() {
            [(dir, _)] => Ok(dir.clone()),
            [] => Err(usage(anyhow::anyhow!("no run in progress (name a run folder)"))),
            many => {
                let names: Vec<String> =
                    many.iter().map(|(d, _)| d.display().to_string()).collect();
                Err(usage(anyhow::anyhow!(
                    "{} runs in progress; name one: {}",
                    many.len(),
                    names.join(", ")
                )))
            }
        };
    };
    for dir in [PathBuf::from(which), root.join(which)] {
        if dir.join("serial.txt").is_file() {
            return Ok(dir);
        }
    }
    if let Ok(pid) = which.parse::<u32>() {
        let mine: Vec<&PathBuf> =
            live.iter().filter(|(_, i)| i.pid == pid).map(|(d, _)| d).collect();
        if let [dir] = mine.as_slice() {
            return Ok((*dir).clone());
        }
    }
    Err(usage(anyhow::anyhow!(
        "`{which}` is neither a run folder (with a serial.txt; see `cargo xtask ps`) nor the pid \
         of one run in progress"
    )))
}

/// A follower of one serial log: reads what was appended since the last look, whole lines
/// only, into the report's record parser.
pub struct Follower {
    file: std::fs::File,
    offset: u64,
    pending: Vec<u8>,
    pub console: Console,
    /// Lines read so far.
    pub lines: u64,
}

impl Follower {
    pub fn open(serial: &Path) -> Result<Self> {
        let file = std::fs::File::open(serial)
            .with_context(|| format!("cannot read {}", serial.display()))?;
        Ok(Follower { file, offset: 0, pending: vec![], console: Console::default(), lines: 0 })
    }

    /// Reads what is new; returns how many lines it read.
    pub fn poll(&mut self) -> Result<u64> {
        self.file.seek(SeekFrom::Start(self.offset))?;
        let mut buf = Vec::new();
        self.file.read_to_end(&mut buf)?;
        self.offset += buf.len() as u64;
        self.pending.extend_from_slice(&buf);
        let mut n = 0;
        while let Some(nl) = self.pending.iter().position(|&b| b == b'\n') {
            let raw: Vec<u8> = self.pending.drain(..=nl).collect();
            let line = crate::report::strip_ansi(&String::from_utf8_lossy(&raw[..raw.len() - 1]));
            if !line.trim().is_empty() {
                self.console.feed(&line);
                n += 1;
            }
        }
        self.lines += n;
        Ok(n)
    }

    /// Takes the unfinished last line as a line: the writer is gone (the hypervisor's end
    /// record has no line break after it).
    pub fn finish(&mut self) {
        let rest = std::mem::take(&mut self.pending);
        let line = crate::report::strip_ansi(&String::from_utf8_lossy(&rest));
        if !line.trim().is_empty() {
            self.console.feed(&line);
            self.lines += 1;
        }
    }
}

/// One guest as `top` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestRow {
    pub name: String,
    pub core: u32,
    /// `starting`... `running`, how its last incarnation ended, or its final state.
    pub state: String,
    /// Its current (or last) incarnation, 1 for the first start.
    pub incarnation: u32,
    pub restarts: u32,
    pub hypercalls: u64,
    /// VM exits by reason: the guest's total once its record is in, else the sum of its
    /// incarnations seen to end.
    pub exits: BTreeMap<String, u64>,
    /// Whether the figures are final (the guest's own record arrived).
    pub final_figures: bool,
    /// Whether they include the running incarnation's (a `stats` record of it).
    pub live_figures: bool,
}

/// The guests of what was read so far, by core: from the `start` and `incarnation`
/// records as they arrive, and from the `guest` records at the end.
pub fn guest_rows(c: &Console) -> Vec<GuestRow> {
    let mut names: BTreeMap<&str, u32> =
        c.starts.iter().map(|(g, &(_, core))| (g.as_str(), core)).collect();
    for g in &c.guests {
        names.insert(&g.name, g.core);
    }
    let mut rows: Vec<GuestRow> = names
        .into_iter()
        .map(|(name, core)| {
            let ended = c.incarnations_of(name);
            let started = c.starts.get(name).map_or(0, |s| s.0);
            let incarnation = started.max(ended.last().map_or(0, |i| i.n));
            let ending = |ending: &str, status: Option<u64>, fault: Option<&str>| match ending {
                "exited" => format!("exited {}", crate::report::status_text(status.unwrap_or(0))),
                "stopped" => format!("stopped: {}", fault.unwrap_or("")),
                other => other.to_string(),
            };
            let record = c.guests.iter().find(|g| g.name == name);
            let state = match (record, ended.last()) {
                (Some(g), _) => {
                    let status = (g.state == "exited").then_some(g.exit_status);
                    ending(&g.state, status, g.fault.as_deref())
                }
                (None, Some(last)) if last.n >= started => {
                    ending(&last.ending, last.exit_status, last.fault.as_deref())
                }
                (None, _) if started > 0 => "running".into(),
                (None, _) => "starting".into(),
            };
            // The running incarnation's latest `stats`, if it is later than every ending.
            let live = c
                .live
                .get(name)
                .filter(|l| record.is_none() && l.n > ended.last().map_or(0, |i| i.n));
            let (exits, hypercalls) = match record {
                Some(g) => (g.exits.clone(), g.hypercalls),
                None => {
                    let mut sum = BTreeMap::new();
                    let parts = ended.iter().map(|i| (&i.exits, i.hypercalls));
                    let mut calls = 0;
                    for (exits, h) in parts.chain(live.map(|l| (&l.exits, l.hypercalls))) {
                        for (k, v) in exits {
                            *sum.entry(k.clone()).or_default() += v;
                        }
                        calls += h;
                    }
                    (sum, calls)
                }
            };
            GuestRow {
                name: name.to_string(),
                core,
                state,
                incarnation,
                restarts: incarnation.saturating_sub(1),
                hypercalls,
                exits,
                final_figures: record.is_some(),
                live_figures: live.is_some(),
            }
        })
        .collect();
    rows.sort_by_key(|r| (r.core, r.name.clone()));
    rows
}

/// The whole view of `top`: the run, its phase, each guest, each channel.
pub fn render(dir: &Path, info: Option<&RunInfo>, f: &Follower) -> String {
    let c = &f.console;
    let mut out = format!("mkvisor run {}\n", dir.display());
    if let Some(i) = info {
        out += &format!(
            "  pid {}  {} with {} CPUs  config {}  elapsed {}{}\n",
            i.pid,
            i.emulator,
            i.cpus,
            shown_config(i.config.as_deref()),
            clock(i.elapsed()),
            i.outcome.as_deref().map(|o| format!("  outcome {o}")).unwrap_or_default()
        );
    }
    let phase = match c.phase() {
        Phase::Firmware => "firmware".to_string(),
        Phase::Grub => "GRUB loading the hypervisor".into(),
        Phase::Hypervisor => "hypervisor initialising".into(),
        Phase::Cores { online, total } => format!("{online}/{total} cores online"),
        Phase::Ended => format!("ended: {}", c.end_outcome.as_deref().unwrap_or("?")),
    };
    out += &format!("  phase: {phase}; {} console lines\n", f.lines);
    let rows = guest_rows(c);
    if !rows.is_empty() {
        let width = rows.iter().map(|r| r.name.len()).max().unwrap_or(5).max(5);
        out += &format!(
            "  {:<width$} {:>4}  {:<24} {:>4} {:>8} {:>10}  EXITS\n",
            "GUEST", "CORE", "STATE", "INC", "RESTARTS", "HYPERCALLS"
        );
        for r in &rows {
            let mut exits: Vec<(&String, &u64)> = r.exits.iter().collect();
            exits.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
            let words: Vec<String> = exits.iter().map(|(k, v)| format!("{k}:{v}")).collect();
            let mut state = r.state.clone();
            if state.len() > 24 {
                state.truncate(23);
                state.push('~');
            }
            out += &format!(
                "  {:<width$} {:>4}  {:<24} {:>4} {:>8} {:>10}  {}{}\n",
                r.name,
                r.core,
                state,
                r.incarnation,
                r.restarts,
                r.hypercalls,
                words.join(" "),
                match (r.final_figures, r.live_figures) {
                    (true, _) => "",
                    (false, true) => " (live)",
                    (false, false) if r.exits.is_empty() => "",
                    (false, false) => " (ended incarnations)",
                }
            );
        }
    }
    if c.channels.is_empty() {
        // Live (`--stats`): each guest's channels as its status page last saw them.
        let live: Vec<String> = rows
            .iter()
            .filter_map(|r| Some((r, c.live.get(&r.name).filter(|_| !r.final_figures)?)))
            .flat_map(|(r, l)| {
                l.traffic.iter().map(move |(ch, sent, received)| {
                    format!(
                        "  channel {ch} at {}: sent {sent} received {received} (live)\n",
                        r.name
                    )
                })
            })
            .collect();
        if !live.is_empty() {
            out += &live.concat();
        } else if c.phase() != Phase::Ended {
            out += "  channels (if any): their messages are counted at the end of the run \
                    (live with `run --stats`)\n";
        }
    } else {
        for ch in &c.channels {
            out += &format!(
                "  channel {}: {}->{} sent {} received {}; {}->{} sent {} received {}\n",
                ch.name, ch.a, ch.b, ch.a_sent, ch.b_received, ch.b, ch.a, ch.b_sent, ch.a_received
            );
        }
    }
    for p in &c.problems {
        out += &format!("  problem: {p}\n");
    }
    out
}

/// `cargo xtask top [RUN] [--once]`: follows a run's serial log and redraws the view as
/// records arrive (on a terminal, in place; otherwise a new view each time something
/// changed), until the run is over; `once`: the view of what is there now.
pub fn top(which: Option<&str>, once: bool) -> Result<()> {
    let root = crate::runs_root();
    let dir = find_run(&root, which)?;
    let mut f = Follower::open(&dir.join("serial.txt"))?;
    let tty = std::io::stdout().is_terminal();
    let mut out = std::io::stdout().lock();
    let mut shown = String::new();
    loop {
        f.poll()?;
        let info = RunInfo::read(&dir).ok();
        let gone = info.as_ref().is_none_or(|i| !i.in_progress());
        let over = once || gone || f.console.phase() == Phase::Ended;
        if gone {
            // Whatever the emulator wrote last, also without a line break (in a run still
            // going, a line without one may still be cut short).
            f.poll()?;
            f.finish();
        }
        let view = render(&dir, info.as_ref(), &f);
        // The elapsed time alone changes nothing worth a new view off a terminal.
        let changed = view.lines().skip(2).ne(shown.lines().skip(2));
        if tty {
            // In place, when anything (the elapsed time included) changed.
            if view != shown {
                write!(out, "\x1b[H\x1b[2J{view}")?;
            }
        } else if changed || over {
            if !shown.is_empty() {
                writeln!(out)?;
            }
            write!(out, "{view}")?;
        }
        out.flush()?;
        shown = view;
        if over {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let info = RunInfo::read(&dir).ok();
    if !once && f.console.phase() != Phase::Ended && info.is_some_and(|i| i.outcome.is_none()) {
        bail!("the run's process is gone without writing the run's end");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `cargo xtask run --config configs/rejoin.toml`, as Bochs wrote it (GRUB's screen
    /// control included, no line break after the end record): `echo` dies at message 30 and
    /// is restarted; `source` streams 100 messages across the restart.
    const REJOIN: &str = include_str!("../testdata/rejoin.serial.txt");

    /// The view after the first `n` lines of the recorded log.
    fn after(n: usize) -> (Console, Vec<GuestRow>) {
        let mut c = Console::default();
        for l in REJOIN.lines().take(n) {
            c.feed(&crate::report::strip_ansi(l));
        }
        let rows = guest_rows(&c);
        (c, rows)
    }

    fn brief(rows: &[GuestRow]) -> Vec<(&str, &str, u32, u32, u64)> {
        rows.iter()
            .map(|r| (r.name.as_str(), r.state.as_str(), r.incarnation, r.restarts, r.hypercalls))
            .collect()
    }

    #[test]
    fn top_follows_a_recorded_run_record_by_record() {
        assert!(after(23).1.is_empty(), "no guest started yet");
        assert_eq!(brief(&after(24).1), [("echo", "running", 1, 0, 0)]);
        let (_, rows) = after(27);
        assert_eq!(brief(&rows), [("source", "running", 1, 0, 0), ("echo", "running", 1, 0, 0)]);
        // echo's first incarnation ends: how, and its exits, as its record says.
        let (_, rows) = after(31);
        assert_eq!(rows[1].state, "stopped: EPT violation: read at guest-physical 0xa00000 (not mapped for this guest), rip=0x10c50a");
        let exits: Vec<(&str, u64)> = rows[1].exits.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        assert_eq!(exits, [("ept_violation", 1), ("exception_nmi", 1), ("vmcall", 2)]);
        assert!(!rows[1].final_figures);
        // Restarted: incarnation 2, one restart, the figures of the ended one so far.
        assert_eq!(brief(&after(34).1)[1], ("echo", "running", 2, 1, 2));
        let (_, rows) = after(42);
        assert_eq!(brief(&rows), [("source", "exited 0", 1, 0, 4), ("echo", "exited 0", 2, 1, 5)]);
        assert_eq!(rows[1].exits.get("vmcall"), Some(&5), "both incarnations: 2 + 3");
        // The guest records: the final figures.
        let (c, rows) = after(usize::MAX);
        assert!(rows.iter().all(|r| r.final_figures), "{rows:?}");
        assert_eq!(rows[0].exits.get("preemption_timer"), Some(&6));
        assert_eq!(c.end_outcome.as_deref(), Some("ok"));
        assert!(c.problems.is_empty(), "{:?}", c.problems);
    }

    #[test]
    fn a_follower_reads_a_growing_log_in_whole_lines() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("serial.txt");
        // Written in pieces that cut lines (and records) in two.
        let bytes = REJOIN.as_bytes();
        std::fs::write(&path, b"").unwrap();
        let mut f = Follower::open(&path).unwrap();
        let mut file = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
        let mut views = vec![];
        for piece in bytes.chunks(997) {
            file.write_all(piece).unwrap();
            f.poll().unwrap();
            views.push(render(tmp.path(), None, &f));
        }
        // No half record was read as a malformed one; the last line waits for its end.
        assert!(f.console.problems.is_empty(), "{:?}", f.console.problems);
        assert_eq!(f.console.phase(), Phase::Cores { online: 2, total: 2 });
        assert!(views[views.len() - 1].contains("channel line: source->echo sent 70 received 70"));
        f.finish();
        assert_eq!(f.console.phase(), Phase::Ended);
        assert_eq!(
            f.lines,
            REJOIN.lines().filter(|l| !crate::report::strip_ansi(l).trim().is_empty()).count()
                as u64
        );
        let view = render(tmp.path(), None, &f);
        assert!(view.contains("phase: ended: ok"), "{view}");
        let echo = view.lines().find(|l| l.trim_start().starts_with("echo")).unwrap();
        let cols: Vec<&str> = echo.split_whitespace().collect();
        assert_eq!(&cols[..7], ["echo", "1", "exited", "0", "2", "1", "5"], "{view}");
        assert!(echo.ends_with("vmcall:5 ept_violation:1 exception_nmi:1"), "{echo}");
        // Mid-run, the figures of ended incarnations are marked as such.
        let mid = views.iter().find(|v| v.contains("running")).expect("a view mid-run");
        assert!(mid.contains("channels (if any): their messages are counted at the end"), "{mid}");
    }

    #[test]
    fn live_stats_move_the_running_incarnations_figures() {
        // The recorded run to echo's restart, then the `stats` records of `--stats`.
        let mut c = Console::default();
        for l in REJOIN.lines().take(34) {
            c.feed(&crate::report::strip_ansi(l));
        }
        for l in [
            // Of the incarnation that ended: older than its ending, not counted again.
            "#mkv stats guest=echo n=1 core=1 tsc=1 exits=\"vmcall:2\" hypercalls=2 traffic=\"line:0:30\"",
            "#mkv stats guest=echo n=2 core=1 tsc=2 exits=\"vmcall:1 hlt:4\" hypercalls=1 traffic=\"line:10:11\"",
            "#mkv stats guest=source n=1 core=0 tsc=3 exits=\"preemption_timer:2\" hypercalls=0 traffic=\"line:41:40\"",
        ] {
            assert!(c.feed(l));
        }
        assert!(c.problems.is_empty(), "{:?}", c.problems);
        let rows = guest_rows(&c);
        let echo = &rows[1];
        assert!(echo.live_figures && !echo.final_figures);
        // Incarnation 1 (its record) plus incarnation 2 so far (its latest stats).
        assert_eq!(echo.hypercalls, 3);
        let exits: Vec<(&str, u64)> = echo.exits.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        assert_eq!(exits, [("ept_violation", 1), ("exception_nmi", 1), ("hlt", 4), ("vmcall", 3)]);
        let f = Follower {
            file: std::fs::File::open("/dev/null").unwrap(),
            offset: 0,
            pending: vec![],
            console: c,
            lines: 38,
        };
        let view = render(Path::new("/x"), None, &f);
        assert!(view.contains("channel line at source: sent 41 received 40 (live)"), "{view}");
        assert!(view.contains("channel line at echo: sent 10 received 11 (live)"), "{view}");
        let echo = view.lines().find(|l| l.trim_start().starts_with("echo")).unwrap();
        assert!(echo.ends_with("(live)"), "{echo}");
    }

    /// A run folder of `pid` under `root`, as `run` leaves it.
    fn folder(root: &Path, name: &str, pid: u32, outcome: Option<&str>) -> PathBuf {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("serial.txt"), REJOIN).unwrap();
        let mut info = RunInfo::starting(
            4242,
            "bochs",
            2,
            Some(&crate::workspace_root().join("configs/rejoin.toml")),
            &dir.join("serial.txt"),
            None,
        );
        info.pid = pid;
        if pid != std::process::id() {
            info.pid_start = None;
        }
        info.outcome = outcome.map(str::to_string);
        info.write(&dir).unwrap();
        dir
    }

    #[test]
    fn ps_lists_the_runs_in_progress_and_top_finds_them() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let me = std::process::id();
        // pid 0x7fffffff is never alive.
        let live = folder(root, "bochs-2cpu-1-0", me, None);
        folder(root, "bochs-2cpu-2-0", 0x7fff_ffff, None);
        let done = folder(root, "bochs-2cpu-3-0", me, Some("ok"));
        let text = ps(root, false);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(lines[0].starts_with("PID") && lines[0].contains("ELAPSED"), "{text}");
        let cols: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(cols[0], me.to_string());
        assert_eq!(&cols[2..], ["running", "configs/rejoin.toml", &live.display().to_string()]);
        let all = ps(root, true);
        assert!(all.contains("abandoned") && all.contains(" ok "), "{all}");
        assert_eq!(ps(&root.join("none"), false), "no run in progress\n");
        // top's run: the only live one, by name, by path, by pid; a finished one by name.
        assert_eq!(find_run(root, None).unwrap(), live);
        assert_eq!(find_run(root, Some("bochs-2cpu-3-0")).unwrap(), done);
        assert_eq!(find_run(root, Some(done.to_str().unwrap())).unwrap(), done);
        assert_eq!(find_run(root, Some(&me.to_string())).unwrap(), live);
        let e = find_run(root, Some("nonsense")).unwrap_err();
        assert_eq!(crate::exit::of_error(&e), crate::exit::USAGE);
        folder(root, "bochs-2cpu-4-0", me, None);
        let e = find_run(root, None).unwrap_err();
        assert!(e.to_string().contains("2 runs in progress"), "{e}");
        // The end of the run, as `run` writes it: no longer in progress.
        RunInfo::finish(&live, "failed").unwrap();
        let info = RunInfo::read(&live).unwrap();
        assert_eq!(info.outcome.as_deref(), Some("failed"));
        assert!(!info.in_progress() && info.ended_unix.is_some());
    }

    #[test]
    fn a_reused_pid_is_not_the_run() {
        let me = std::process::id();
        let start = process_start(me).expect("our own start time");
        assert_eq!(process_start(me), Some(start), "stable");
        let mut info = RunInfo::starting(1, "bochs", 1, None, Path::new("/x"), None);
        assert!(info.in_progress());
        info.pid_start = Some(start + 1);
        assert!(!info.in_progress(), "same pid, another process");
        assert_eq!(clock(65.0), "1:05");
        assert_eq!(clock(3723.0), "1:02:03");
    }
}
