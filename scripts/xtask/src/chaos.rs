// SPDX-License-Identifier: MIT OR Apache-2.0
//! `cargo xtask chaos`: a randomized fault campaign. From a seed (printed, so any run can
//! be replayed) it draws a machine: units of self-checking guests placed on cores (a
//! stream whose echoer faults and is restarted by policy, a guest mapping a large grant in
//! small pages, an owner revoking a large copy its holder mapped, a spinner, a controller
//! (`supervisor`) that stops and starts, restarts, or parks and brings back a guest at a
//! random time: a spinner, or the echoer of a stream), the failure detector's period, and
//! sometimes a hung core (`inject=hung-core:N` on a spinner's core) or a deaf one
//! (`inject=deaf-core:N:MS:AFTER` on a spinner's or a holder's core: its hypervisor serves
//! no inbox for a while, its guest running on; at least twice the detector's timeout, at
//! most half of it, or in the band between, where either outcome is allowed: see
//! [`Band`]). It boots it in Bochs and checks invariants from the
//! report and the guests' own counts: no live core suspected (only the hung one, the
//! deaf one when its deafness was long, and maybe when it was in the band), the deaf core
//! back at its inbox within a probe period of its deafness' end and, if fenced, fenced
//! cleanly (by every core, its guest stopped for good soon after), every other guest exited 0
//! (each checks its own traffic and caps), the hung core's guest fenced, every revoke
//! `Ok(1)` (or, only for a holder whose deaf core was fenced, `Timeout`),
//! no memory reachable after a successful revoke (each holder wrote and read a page of its
//! copy before the revoke and reads it after: that read must stop it with an EPT
//! violation at that page), no private frames or capabilities leaked across
//! incarnations, no message received that was not sent, every stream's messages accounted
//! exactly (echoed + lost = sent by the streamer's count, and the hypervisor's counts of
//! its channel equal the streamer's), every controller request answered (the supervisor's
//! count), every core's longest stretch away from its inbox under the detector's timeout
//! (the deaf core's injected one aside), no problem in the records.
//!
//! May call `run` (to boot), `report` (what it checks), `cli` (the run's arguments).

use crate::report::Report;
use std::fmt::Write as _;

/// A small deterministic generator (splitmix64): the same seed, the same campaign.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// A number in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }
    /// One of `items`.
    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.next_u64() as usize % items.len()]
    }
}

/// One drawn machine: its config, command line, and what the run must show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scenario {
    pub seed: u64,
    pub config: String,
    pub cmdline: String,
    /// The failure detector's period (0: off).
    pub probe_ms: u64,
    /// The core made to hang, if any (its guest is named `spin<N>`).
    pub hung: Option<u32>,
    /// The core made deaf for a while, if any (`inject=deaf-core:N:MS:AFTER`).
    pub deaf: Option<Deaf>,
    /// The holders of revoked copies, each with its owner: each reads one page of its
    /// copy after the revoke and must be stopped there (an EPT violation at that page).
    pub holders: Vec<(String, String)>,
    /// Every guest, by name.
    pub guests: Vec<String>,
    /// The streamers and the messages each must account for (its channel is its first).
    pub streams: Vec<(String, u64)>,
    /// The controllers, each of which must have every request answered.
    pub supervisors: Vec<String>,
    /// One line per unit, for the log.
    pub summary: Vec<String>,
}

/// A deaf core: its hypervisor serves no inbox for `ms` from `after_ms` into its guest's
/// run (its guest runs on).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deaf {
    pub core: u32,
    /// Its guest.
    pub guest: String,
    pub ms: u64,
    pub after_ms: u64,
    pub band: Band,
}

/// How long a deafness is, against the detector's timeout `T` (8 probe periods).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Band {
    /// At most `T/2` and half the capability protocol's deadline: it must not be fenced.
    Short,
    /// Strictly between `T/2` and `2T`: whether it is fenced depends on where in a probe
    /// period it falls. Either outcome is allowed, each with its invariants: not fenced,
    /// every guest finishes as without it; fenced, cleanly (its guest stopped for good
    /// soon after it hears, every other core fences it too, the revokes end).
    Middle,
    /// At least `2T`: it must be fenced, cleanly.
    Long,
}

impl Band {
    fn word(self) -> &'static str {
        match self {
            Band::Short => "must not be fenced",
            Band::Middle => "may be fenced",
            Band::Long => "must be fenced",
        }
    }
}

/// The capability protocol's deadline per level (the hypervisor's default
/// `caps_deadline_ms`): a short deafness stays under it, so a revoke waiting on the deaf
/// core still gets its answer in time.
const CAPS_DEADLINE_MS: u64 = 50;

/// Draws the scenario of `seed`.
pub fn scenario(seed: u64) -> Scenario {
    let mut r = Rng::new(seed);
    let cores = r.range(2, 4) as u32;
    let probe_ms = r.pick(&[0, 12, 12, 16, 25]);
    let mut guests = String::new();
    let mut extra = String::new();
    let mut names = Vec::new();
    let mut summary = Vec::new();
    let mut spinners = Vec::new();
    let mut spin_ms = Vec::new();
    let mut holders = Vec::new();
    let mut streams = Vec::new();
    let mut supervisors = Vec::new();
    let mut grant_mib = 0;
    let mut core = 0;
    let mut chan = 0;
    let guest = |out: &mut String,
                 name: &str,
                 core: u32,
                 workload: &str,
                 args: &str,
                 more: &str| {
        let _ = write!(
            out,
            "\n[[guest]]\nname = \"{name}\"\ncore = {core}\nmemory_mib = 8\nworkload = \"{workload}\"\nargs = {{ {args} }}\n{more}"
        );
    };
    while core < cores {
        let room = cores - core;
        let unit = match room {
            1 => r.pick(&[1, 3]),
            2 => r.range(0, 4),
            _ => r.range(0, 5),
        };
        match unit {
            0 => {
                let n = r.range(200, 2000);
                let die = r.range(1, n / 2);
                let (s, e) = (format!("stream{core}"), format!("echo{}", core + 1));
                let args = format!("n = {n}, gone_ok = 1, rejoin_ms = 2000");
                guest(&mut guests, &s, core, "streamer", &args, "");
                let more = "restart = \"on-fault\"\nmax_restarts = 1\n";
                guest(&mut guests, &e, core + 1, "echoer", &format!("die_after = {die}"), more);
                let _ = write!(
                    extra,
                    "\n[[channel]]\nname = \"c{chan}\"\nbetween = [\"{s}\", \"{e}\"]\nslots = 8\n"
                );
                summary.push(format!("{s}/{e}: {n} messages, the echoer dies after {die}"));
                streams.push((s.clone(), n));
                names.extend([s, e]);
                chan += 1;
                core += 2;
            }
            1 => {
                let mib = 2 * r.range(1, 64);
                let offset = r.pick(&[0, 4, 8, 2052]);
                let rounds = r.range(1, 3);
                let m = format!("map{core}");
                let args = format!("offset_kib = {offset}, rounds = {rounds}");
                guest(&mut guests, &m, core, "bigmap", &args, "");
                let _ = write!(
                    extra,
                    "\n[[grant]]\nname = \"g{m}\"\nguest = \"{m}\"\nmemory_mib = {mib}\n"
                );
                summary.push(format!("{m}: maps {mib} MiB at +{offset} KiB, {rounds} times"));
                grant_mib += mib;
                names.push(m);
                core += 1;
            }
            2 => {
                let mib = 2 * r.range(1, 64);
                let offset = r.pick(&[0, 4, 2052]);
                let (o, h) = (format!("owner{core}"), format!("holder{}", core + 1));
                // The page the holder probes after the revoke: drawn with the rest of the
                // campaign's later draws (below), so earlier seeds keep their machines.
                guest(&mut guests, &o, core, "bigmap", "role = \"owner\", deaf_ok = 1", "");
                let args = format!(
                    "role = \"holder\", offset_kib = {offset}, probe = 1, probe_page = PROBE_{h}"
                );
                guest(&mut guests, &h, core + 1, "bigmap", &args, "");
                holders.push((h.clone(), o.clone(), mib, core + 1));
                let _ = write!(
                    extra,
                    "\n[[channel]]\nname = \"c{chan}\"\nbetween = [\"{o}\", \"{h}\"]\nslots = 8\n\n[[grant]]\nname = \"g{o}\"\nguest = \"{o}\"\nmemory_mib = {mib}\n"
                );
                summary
                    .push(format!("{o}/{h}: {mib} MiB copied, mapped at +{offset} KiB, revoked"));
                grant_mib += mib;
                names.extend([o, h]);
                chan += 1;
                core += 2;
            }
            4 | 5 => {
                // A controller (`supervisor`) acting on a guest at a random time: a stop and
                // start, a restart, or its core taken out and brought back. Alone (a spinner
                // as the target) or on the echoer of a stream (three cores).
                let op = r.pick(&["hold", "restart", "park"]);
                let after = r.range(5, 120);
                let parked = r.range(5, 150);
                let sup = format!("sup{core}");
                let target = if unit == 4 {
                    let ms = r.range(200, 400);
                    let t = format!("spin{}", core + 1);
                    guest(&mut guests, &t, core + 1, "spin", &format!("ms = {ms}"), "");
                    summary.push(format!("{sup}: {op} of {t} (spins {ms} ms) after {after} ms"));
                    names.push(t.clone());
                    t
                } else {
                    let n = r.range(200, 2000);
                    let (s, e) = (format!("stream{}", core + 1), format!("echo{}", core + 2));
                    let args = format!("n = {n}, gone_ok = 1, rejoin_ms = 3000");
                    guest(&mut guests, &s, core + 1, "streamer", &args, "");
                    let args = format!("die_after = {}", n + 1);
                    guest(&mut guests, &e, core + 2, "echoer", &args, "");
                    let _ = write!(
                        extra,
                        "\n[[channel]]\nname = \"c{chan}\"\nbetween = [\"{s}\", \"{e}\"]\nslots = 8\n"
                    );
                    summary.push(format!(
                        "{sup}: {op} of {e} after {after} ms while {s} streams {n} messages to it"
                    ));
                    streams.push((s.clone(), n));
                    names.extend([s, e.clone()]);
                    chan += 1;
                    e
                };
                let args = format!("tries = 0, {op} = 1, after_ms = {after}, parked_ms = {parked}");
                guest(&mut guests, &sup, core, "supervisor", &args, "");
                let _ = write!(extra, "\n[[control]]\nguest = \"{sup}\"\nover = [\"{target}\"]\n");
                supervisors.push(sup.clone());
                names.push(sup);
                core += if unit == 4 { 2 } else { 3 };
            }
            _ => {
                let ms = r.range(50, 300);
                let s = format!("spin{core}");
                guest(&mut guests, &s, core, "spin", &format!("ms = {ms}"), "");
                summary.push(format!("{s}: spins {ms} ms"));
                spinners.push(core);
                spin_ms.push((core, ms));
                names.push(s);
                core += 1;
            }
        }
    }
    // A hung core only where nobody depends on it (a spinner; not core 0, which collects
    // the reports), and only with the detector on.
    spinners.retain(|&c| c != 0);
    let hung =
        (probe_ms > 0 && !spinners.is_empty() && r.range(0, 2) == 0).then(|| r.pick(&spinners));
    let memory = 256 + grant_mib.div_ceil(64) * 64;
    let mut config = format!(
        "# chaos seed {seed}\n[machine]\ncpus = {cores}\nmemory_mib = {memory}\nprobe_ms = {probe_ms}\n"
    );
    config += &guests;
    config += &extra;
    let mut cmdline = hung.map(|c| format!("inject=hung-core:{c}")).unwrap_or_default();
    if let Some(c) = hung {
        summary.push(format!("core {c} hangs 20 ms into its guest's run"));
    }
    // Later draws from a generator of their own: the machines above stay as they were
    // for the seeds drawn before these were added.
    let mut r = Rng::new(seed ^ 0xdeaf_c0de_5eed_0001);
    for (h, _, mib, _) in &holders {
        // The first page, the last, or any.
        let pages = mib * 256;
        let page = match r.range(0, 2) {
            0 => 0,
            1 => pages - 1,
            _ => r.range(0, pages - 1),
        };
        config = config.replace(&format!("PROBE_{h}"), &page.to_string());
        summary.push(format!("{h} probes page {page} of its copy after the revoke"));
    }
    // A deaf core: a spinner's or a holder's (not core 0, which collects the reports), with
    // the detector on and no hung core.
    let mut candidates: Vec<(u32, String)> =
        spinners.iter().map(|&c| (c, format!("spin{c}"))).collect();
    candidates.extend(holders.iter().map(|(h, _, _, c)| (*c, h.clone())));
    candidates.retain(|(c, _)| *c != 0);
    let deaf = (probe_ms > 0 && hung.is_none() && !candidates.is_empty() && r.range(0, 1) == 0)
        .then(|| {
            let (core, guest) =
                candidates[r.range(0, candidates.len() as u64 - 1) as usize].clone();
            let timeout = 8 * probe_ms;
            let long = r.range(0, 1) == 0;
            let ms = if long {
                r.range(2 * timeout, 2 * timeout + 150)
            } else {
                r.range(5, (timeout / 2).min(CAPS_DEADLINE_MS / 2))
            };
            // A holder lives only until its copy is revoked: deaf early, or never.
            let after_ms = if guest.starts_with("holder") { r.range(0, 8) } else { r.range(0, 60) };
            let band = if long { Band::Long } else { Band::Short };
            Deaf { core, guest, ms, after_ms, band }
        });
    // A third of the deafnesses fall between half and twice the timeout (a generator of
    // their own again: the other deafnesses stay as they were drawn).
    let mut r = Rng::new(seed ^ 0xdeaf_ba4d_5eed_0002);
    let deaf = deaf.map(|mut d| {
        if r.range(0, 2) == 0 {
            let timeout = 8 * probe_ms;
            d.ms = r.range(timeout / 2 + 1, 2 * timeout - 1);
            d.band = Band::Middle;
        }
        d
    });
    if let Some(d) = &deaf {
        // A deaf spinner spins past its deafness (the others probe it meanwhile).
        if let Some(&(_, ms)) = spin_ms.iter().find(|(c, _)| *c == d.core) {
            let want = ms.max(d.after_ms + d.ms + 150);
            let name = &d.guest;
            config = config.replace(
                &format!("name = \"{name}\"\ncore = {}\nmemory_mib = 8\nworkload = \"spin\"\nargs = {{ ms = {ms} }}", d.core),
                &format!("name = \"{name}\"\ncore = {}\nmemory_mib = 8\nworkload = \"spin\"\nargs = {{ ms = {want} }}", d.core),
            );
        }
        if !cmdline.is_empty() {
            cmdline.push(' ');
        }
        cmdline += &format!("inject=deaf-core:{}:{}:{}", d.core, d.ms, d.after_ms);
        summary.push(format!(
            "core {} ({}) deaf for {} ms from {} ms in ({}: the detector's timeout is {} ms)",
            d.core,
            d.guest,
            d.ms,
            d.after_ms,
            d.band.word(),
            8 * probe_ms
        ));
    }
    let holders = holders.into_iter().map(|(h, o, _, _)| (h, o)).collect();
    Scenario {
        seed,
        config,
        cmdline,
        probe_ms,
        hung,
        deaf,
        holders,
        guests: names,
        streams,
        supervisors,
        summary,
    }
}

/// The hypervisor's TSC ticks per millisecond, from its log.
fn ticks_per_ms(serial: &str) -> Option<u64> {
    serial.lines().find_map(|l| l.split("TSC: ").nth(1)?.strip_suffix(" ticks/ms")?.parse().ok())
}

/// The invariants `s`'s run must keep, checked on its report and serial log: one line per
/// broken invariant (none: the run passed).
pub fn check(s: &Scenario, r: &Report, serial: &str) -> Vec<String> {
    let mut broken = Vec::new();
    let hung = s.hung.map(|c| format!("spin{c}"));
    for p in &r.problems {
        broken.push(format!("the records have a problem: {p}"));
    }
    // A long deafness that really happened must be fenced, one in the middle band may be;
    // nothing else may be. `deaf_long`: the deaf core when it was fenced (or had to be).
    let reached = s.deaf.as_ref().filter(|d| deaf_reached(serial, d.core));
    let suspected = |c: u32| r.suspicions.iter().any(|v| v.target == c);
    let deaf_long =
        reached.filter(|d| d.band == Band::Long || d.band == Band::Middle && suspected(d.core));
    let mayfence = |c: u32| Some(c) == s.hung || deaf_long.is_some_and(|d| d.core == c);
    // Every holder whose owner's revoke succeeded probes its copy and is stopped there.
    let probed: Vec<&str> = s
        .holders
        .iter()
        .filter(|(_, o)| {
            said(serial, o, "bigmap: ").contains(&"revoke the mapped copy: Ok(1) as expected")
        })
        .map(|(h, _)| h.as_str())
        .collect();
    let clean = s.hung.is_none() && deaf_long.is_none() && probed.is_empty();
    if clean && r.outcome != "ok" {
        broken.push(format!("outcome {} (expected ok)", r.outcome));
    }
    for v in &r.suspicions {
        if !mayfence(v.target) {
            broken.push(format!("core {} suspected core {}, which was alive", v.core, v.target));
        }
    }
    if let Some(c) = s.hung {
        if !r.suspicions.iter().any(|v| v.target == c) {
            broken.push(format!("the hung core {c} was never suspected"));
        }
    }
    if let Some(d) = deaf_long {
        if !suspected(d.core) {
            broken.push(format!(
                "core {} was deaf {} ms, over twice the detector's timeout ({} ms), and never suspected",
                d.core,
                d.ms,
                8 * s.probe_ms
            ));
        }
    }
    broken.extend(revoke_checks(s, serial, deaf_long));
    let timeout = ticks_per_ms(serial).map(|t| 8 * s.probe_ms * t).filter(|&t| t > 0);
    if let (Some(d), Some(t)) = (reached, timeout) {
        broken.extend(deaf_checks(s, r, serial, d, deaf_long.is_some(), t));
    }
    for name in &s.guests {
        let Some(g) = r.guests.iter().find(|g| &g.name == name) else {
            broken.push(format!("{name}: not in the report"));
            continue;
        };
        if hung.as_ref() == Some(name) {
            if g.state != "fenced" {
                broken.push(format!("{name} ran on the hung core but is {}", g.state));
            }
            continue;
        }
        let deaf_guest = deaf_long.is_some_and(|d| &d.guest == name);
        if probed.contains(&name.as_str()) {
            broken.extend(probe_check(serial, name, g, deaf_guest));
        } else if deaf_guest {
            // Fenced while alive: stopped for good when it heard (isolation), or done
            // before that.
            if g.state == "exited" && g.exit_status != 0 {
                broken.push(format!("{name} (deaf core): exited {}", g.exit_status));
            }
        } else if (g.state.as_str(), g.exit_status) != ("exited", 0) {
            broken.push(format!("{name}: {} status {} ({:?})", g.state, g.exit_status, g.fault));
        }
        let first = g.incarnations.first();
        for i in &g.incarnations {
            if Some((i.frames_at_start, i.caps_live))
                != first.map(|f| (f.frames_at_start, f.caps_live))
            {
                broken
                    .push(format!("{name}: incarnation {} starts with other frames or caps", i.n));
            }
        }
        // The deaf core's stretch is the injection's, not a legal operation's.
        let injected = s.deaf.as_ref().is_some_and(|d| &d.guest == name);
        if let (Some(t), false) = (timeout, injected) {
            if g.away_tsc >= t {
                broken
                    .push(format!("{name}: away from its inbox {} ticks, timeout {t}", g.away_tsc));
            }
        }
    }
    for c in &r.channels {
        if c.b_received > c.a_sent || c.a_received > c.b_sent {
            broken.push(format!("channel {}: more received than sent ({c:?})", c.name));
        }
    }
    for sup in &s.supervisors {
        let said = said(serial, sup, "supervisor: ");
        match said.iter().find_map(|l| l.strip_suffix(" unanswered")) {
            Some(l) if l.ends_with(", 0") => {}
            Some(l) => broken.push(format!("{sup}: a controller request was not answered ({l})")),
            None => broken.push(format!("{sup}: no count of its requests")),
        }
    }
    for (name, n) in &s.streams {
        broken.extend(stream_accounting(r, serial, name, *n));
    }
    broken
}

/// What a deafness that happened must leave (`fenced`: its core was fenced, `timeout`: the
/// detector's, in ticks). Its end is handled at once: the core serves its inbox again
/// within a probe period of it (the run loop's timer aims there), and what expired
/// meanwhile is decided on what its inbox holds (answers read before deadlines: a core that
/// looked at its deadlines first would suspect a live one, which `check` names). Fenced,
/// cleanly: every other core fenced it too (its guests' channels down there: `PeerGone`
/// for their peers), and its own guest, if still running when it heard, stopped for good
/// (isolation, one incarnation, no exit after) within a timeout of the deafness' end.
fn deaf_checks(
    s: &Scenario,
    r: &Report,
    serial: &str,
    d: &Deaf,
    fenced: bool,
    timeout: u64,
) -> Vec<String> {
    let mut broken = Vec::new();
    let Some(until) = deaf_window(serial, d.core).map(|(_, b)| b) else {
        return vec![format!("core {}: its deafness' window is not in the log", d.core)];
    };
    let period = timeout / 8;
    // The run may end while the core is still deaf (the BSP does not wait for a fenced
    // core): then neither its return nor its guest's end can be seen.
    let run_end = r.tsc.end.unwrap_or(u64::MAX);
    let again = deaf_over_at(serial, d.core);
    let g = r.guests.iter().find(|g| g.name == d.guest);
    let ended = g.and_then(|g| g.incarnations.last()).map(|i| i.tsc_end);
    match again {
        Some(t) if t > until + period => broken.push(format!(
            "core {}: served its inbox again {} ticks after its deafness ended (a probe period is {period})",
            d.core,
            t - until
        )),
        // Its guest ended while it was deaf (the loop that logs the end was left).
        None if ended.is_none_or(|e| e > until + period) && run_end > until + period => broken.push(format!(
            "core {}: never served its inbox again after its deafness",
            d.core
        )),
        _ => {}
    }
    if !fenced {
        return broken;
    }
    let up = r.cores.iter().filter(|c| c.state == "up" && c.index != d.core);
    for c in up.map(|c| c.index) {
        let line = format!("[c{c}] ERROR core {} did not answer membership probes", d.core);
        if !serial.contains(&line) {
            broken.push(format!("core {c} never fenced the deaf core {}", d.core));
        }
    }
    let Some(g) = g else { return broken };
    if g.incarnations.len() > 1 {
        broken.push(format!("{}: started again on its fenced core", d.guest));
    }
    // A holder whose owner's revoke still got its answer is stopped by its probe instead
    // (`probe_check`).
    let probed = s.holders.iter().any(|(h, o)| {
        h == &d.guest
            && said(serial, o, "bigmap: ").contains(&"revoke the mapped copy: Ok(1) as expected")
    });
    // Its end, as its own core recorded it (the BSP, not waiting for a fenced core, may
    // report it `fenced`): done before it heard, or stopped for good when it did.
    match g.incarnations.last() {
        _ if probed => {}
        None if run_end > until + timeout => {
            broken.push(format!("{}: no record of its end on the fenced core", d.guest))
        }
        None => {}
        Some(i) => {
            let isolated = i.ending == "stopped"
                && i.fault.as_deref().is_some_and(|f| f.contains("fenced out of the membership"));
            let exited = i.ending == "exited" && i.exit_status == Some(0);
            if !(isolated || exited) || i.tsc_end > until + timeout {
                broken.push(format!(
                    "{}: on the fenced core, {} ({:?}) at {}, the deafness ended at {until}",
                    d.guest, i.ending, i.fault, i.tsc_end
                ));
            }
        }
    }
    broken
}

/// The TSC window of core `core`'s injected deafness, from its log.
fn deaf_window(serial: &str, core: u32) -> Option<(u64, u64)> {
    let tag = format!("inject=deaf-core: core {core} serves no inbox for ");
    let rest = serial.lines().find_map(|l| l.split(tag.as_str()).nth(1))?;
    let (a, b) = rest.split("tsc=").nth(1)?.split_once("..")?;
    Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
}

/// When core `core` served its inbox again after its deafness, from its log.
fn deaf_over_at(serial: &str, core: u32) -> Option<u64> {
    let tag = format!("inject=deaf-core: core {core} serves its inbox again, tsc=");
    serial.lines().find_map(|l| l.split(tag.as_str()).nth(1)?.trim().parse().ok())
}

/// Whether core `core`'s injected deafness started (its hypervisor logs the window).
pub fn deaf_reached(serial: &str, core: u32) -> bool {
    serial.contains(&format!("inject=deaf-core: core {core} serves no inbox for"))
}

/// Every owner's revoke ended: `Ok(1)`, or, only where its holder's core was deaf past the
/// detector's timeout (and fenced, checked above), a `Timeout` or a transfer that failed;
/// and no holder read memory after a revoke.
fn revoke_checks(s: &Scenario, serial: &str, deaf_long: Option<&Deaf>) -> Vec<String> {
    let mut broken = Vec::new();
    for (h, o) in &s.holders {
        let lines = said(serial, o, "bigmap: ");
        let excused = deaf_long.is_some_and(|d| &d.guest == h);
        let ok = lines.contains(&"revoke the mapped copy: Ok(1) as expected");
        let deaf = lines.iter().any(|l| l.ends_with("its holder's core deaf"));
        if deaf && !excused {
            broken.push(format!("{o}: its holder {h} was taken for deaf: {lines:?}"));
        }
        if !(ok || deaf && excused) {
            broken.push(format!("{o}: the revoke did not end Ok(1): {lines:?}"));
        }
        for l in said(serial, h, "bigmap: ") {
            if l.contains("still reachable after the revoke") {
                broken.push(format!("{h}: {l}"));
            }
        }
    }
    broken
}

/// Holder `name`, whose owner's revoke returned `Ok(1)`: it wrote and read back its probe
/// page through the copy before the revoke, read it after, and was stopped by that read (an
/// EPT violation there, nothing mapped). A deaf holder may instead have been stopped by
/// its fence before it got to the read.
fn probe_check(
    serial: &str,
    name: &str,
    g: &crate::report::GuestReport,
    deaf: bool,
) -> Vec<String> {
    let lines = said(serial, name, "bigmap: ");
    let page = |prefix: &str| {
        lines.iter().find_map(|l| l.strip_prefix(prefix)?.split(' ').next().map(str::to_string))
    };
    let before = page("probe page ");
    let after = page("probing ");
    let reachable = lines.iter().any(|l| l.ends_with("reachable before the revoke: true"));
    if deaf && after.is_none() {
        return vec![];
    }
    let (Some(before), Some(after), true) = (before, after, reachable) else {
        return vec![format!(
            "{name}: no probe of its copy before and after the revoke: {lines:?}"
        )];
    };
    let fault = g.fault.as_deref().unwrap_or_default();
    let want = format!("EPT violation: read at guest-physical {after} (not mapped for this guest)");
    if before != after || g.state != "stopped" || !fault.starts_with(&want) {
        return vec![format!(
            "{name}: the probe of {after} after the revoke did not fault there: {} ({fault})",
            g.state
        )];
    }
    vec![]
}

/// The lines guest `name` printed that start with `prefix` (the prefix removed).
fn said<'a>(serial: &'a str, name: &str, prefix: &str) -> Vec<&'a str> {
    let tag = format!("[{name}@c");
    serial
        .lines()
        .filter_map(|l| l.strip_prefix(tag.as_str()))
        .filter_map(|l| l.split_once("] ").map(|(_, t)| t))
        .filter_map(|t| t.strip_prefix(prefix))
        .collect()
}

/// Every message of streamer `name` (`n` to send) accounted for, exactly: by its own count
/// (echoed + lost = sent, nothing bad) and by the hypervisor's counts of its channel, which
/// must agree with it: the streamer's sends (its messages, and the end marker if it got to
/// the end) and its receives (the echoes), so sent = received + lost on the channel itself.
fn stream_accounting(r: &Report, serial: &str, name: &str, n: u64) -> Vec<String> {
    let mut broken = Vec::new();
    // `sent N, echoed E, lost L in R resets, bad B` or, the peer gone for good,
    // `peer gone for good: sent S of N, echoed E, lost L, bad B`.
    let lines = said(serial, name, "stream: ");
    let Some(last) =
        lines.iter().rev().find(|l| l.starts_with("sent ") || l.starts_with("peer gone for good"))
    else {
        return vec![format!("{name}: no final count")];
    };
    let num = |key: &str| -> Option<u64> {
        let rest = last.split(key).nth(1)?;
        rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
    };
    let completed = last.starts_with("sent ");
    let (Some(sent), Some(echoed), Some(lost), Some(bad)) =
        (num("sent "), num("echoed "), num("lost "), num("bad "))
    else {
        return vec![format!("{name}: unreadable count `{last}`")];
    };
    if echoed + lost != sent || bad != 0 {
        broken.push(format!("{name}: sent {sent} != echoed {echoed} + lost {lost} (bad {bad})"));
    }
    if completed && sent != n {
        broken.push(format!("{name}: sent {sent} of {n}"));
    }
    let Some(c) = r.channels.iter().find(|c| c.a == name || c.b == name) else {
        broken.push(format!("{name}: its channel is not in the report"));
        return broken;
    };
    // The record counts the rings since their last reset (an echoer's restart): the
    // streamer counts that epoch too (its sends into the rings, the end marker included,
    // and the echoes it took).
    let (Some(e_sent), Some(e_echoed)) = (num("epoch_sent="), num("epoch_echoed=")) else {
        broken.push(format!("{name}: no count of its last epoch `{last}`"));
        return broken;
    };
    let (out, back) = if c.a == name { (c.a_sent, c.a_received) } else { (c.b_sent, c.b_received) };
    if out != e_sent || back != e_echoed {
        broken.push(format!(
            "{name}: the hypervisor counted {out} sent and {back} received since the last reset, the streamer {e_sent} and {e_echoed}"
        ));
    }
    broken
}

/// What one run of the campaign found.
pub struct Outcome {
    pub scenario: Scenario,
    pub broken: Vec<String>,
    /// What the run exercised (the deafness and whether it was fenced, the probes).
    pub notes: Vec<String>,
    pub wall_seconds: f64,
}

/// Boots scenario `s` in Bochs (its config in a temporary file) and checks it.
pub fn run_one(s: &Scenario) -> anyhow::Result<Outcome> {
    run_one_on(s, crate::cli::Emulator::Bochs)
}

/// [`run_one`] in `emulator`. The invariants are the same; those about the detector's
/// timeout compare TSC stretches, which under QEMU are host time (a starved vCPU counts).
pub fn run_one_on(s: &Scenario, emulator: crate::cli::Emulator) -> anyhow::Result<Outcome> {
    let dir = tempfile_dir()?;
    let path = dir.join(format!("chaos-{}.toml", s.seed));
    std::fs::write(&path, &s.config)?;
    let args = crate::cli::RunArgs {
        cmdline: s.cmdline.clone(),
        timeout: 600,
        ..crate::cli::RunArgs::quiet(emulator, path.to_str())
    };
    let report = crate::run::run(&args)?;
    let serial = std::fs::read_to_string(&report.serial_log).unwrap_or_default();
    let broken = check(s, &report, &serial);
    let notes = notes(s, &report, &serial);
    Ok(Outcome { scenario: s.clone(), broken, notes, wall_seconds: report.wall_seconds })
}

/// What run `s` exercised: its deafness (reached, fenced or not), its holders' probes.
pub fn notes(s: &Scenario, r: &Report, serial: &str) -> Vec<String> {
    let mut notes = Vec::new();
    if let Some(d) = &s.deaf {
        let fenced = r.suspicions.iter().any(|v| v.target == d.core);
        notes.push(match (deaf_reached(serial, d.core), fenced) {
            (false, _) => format!("core {} never got deaf (its guest ended first)", d.core),
            (true, f) => format!(
                "core {} deaf {} ms ({:?}, timeout {} ms): {}",
                d.core,
                d.ms,
                d.band,
                8 * s.probe_ms,
                if f { "fenced" } else { "not fenced" }
            ),
        });
    }
    for (h, _) in &s.holders {
        let faulted = said(serial, h, "bigmap: ").iter().any(|l| l.starts_with("probing "));
        let g = r.guests.iter().find(|g| &g.name == h);
        let fault = g.and_then(|g| g.fault.clone()).unwrap_or_default();
        notes.push(if faulted {
            format!("{h}: probe after the revoke stopped it: {fault}")
        } else {
            format!("{h}: no probe (state {})", g.map_or("?", |g| g.state.as_str()))
        });
    }
    notes
}

/// Where the drawn configs are written (kept for replay: each names its seed).
fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let d = crate::target_dir().join("xtask/chaos");
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

/// `cargo xtask chaos --seed N --runs K`: seeds N, N+1, ..., N+K-1 (N from the clock if not
/// given, printed). Prints each scenario and what it broke (with `dry_run`, its config
/// instead of booting it); `true` if nothing broke.
pub fn campaign(seed: Option<u64>, runs: u64, dry_run: bool) -> anyhow::Result<bool> {
    let seed = seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    println!("chaos: seeds {seed}..{} ({runs} runs)", seed + runs - 1);
    let mut failed = 0;
    for k in 0..runs {
        let s = scenario(seed + k);
        println!(
            "chaos seed {}: {}{}",
            s.seed,
            s.summary.join("; "),
            match s.probe_ms {
                0 => ", detector off".to_string(),
                p => format!(", probe_ms {p}"),
            }
        );
        if dry_run {
            println!("  command line `{}`\n{}", s.cmdline, s.config);
            continue;
        }
        let o = run_one(&s)?;
        for n in &o.notes {
            println!("  {n}");
        }
        if o.broken.is_empty() {
            println!("  held: every invariant ({:.1} s)", o.wall_seconds);
        } else {
            failed += 1;
            for b in &o.broken {
                println!("  BROKEN: {b}");
            }
        }
    }
    println!("chaos: {} of {runs} runs held every invariant", runs - failed);
    Ok(failed == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_draws_the_same_scenario_and_every_draw_is_a_valid_config() {
        let mut deaf = [0; 3];
        for seed in 0..200 {
            let s = scenario(seed);
            assert_eq!(s, scenario(seed), "seed {seed}");
            let c = crate::config::compile("chaos.toml", &s.config)
                .unwrap_or_else(|e| panic!("seed {seed}: {e}\n{}", s.config));
            assert_eq!(c.config.guests.len(), s.guests.len());
            assert!(crate::cmdline::check(&s.cmdline).is_empty(), "seed {seed}: {}", s.cmdline);
            if let Some(h) = s.hung {
                assert!(s.probe_ms > 0 && h != 0 && s.guests.contains(&format!("spin{h}")));
            }
            assert!(!s.config.contains("PROBE_"), "seed {seed}: a probe page left undrawn");
            if let Some(d) = &s.deaf {
                let timeout = 8 * s.probe_ms;
                assert!(s.hung.is_none() && d.core != 0 && s.guests.contains(&d.guest));
                match d.band {
                    Band::Long => assert!(d.ms >= 2 * timeout, "seed {seed}: {d:?}"),
                    Band::Middle => {
                        assert!(2 * d.ms > timeout && d.ms < 2 * timeout, "seed {seed}: {d:?}")
                    }
                    Band::Short => {
                        assert!(2 * d.ms <= timeout && 2 * d.ms <= CAPS_DEADLINE_MS, "{d:?}")
                    }
                }
                // A deaf spinner spins past its deafness.
                if d.guest.starts_with("spin") {
                    let block = s.config.split(&format!("name = \"{}\"", d.guest)).nth(1);
                    let ms: u64 = block
                        .and_then(|b| b.split("ms = ").nth(1))
                        .and_then(|t| t.split(' ').next())
                        .and_then(|t| t.parse().ok())
                        .unwrap_or_else(|| panic!("seed {seed}: {}", s.config));
                    assert!(ms > d.after_ms + d.ms, "seed {seed}: {d:?} spins {ms}");
                }
                deaf[d.band as usize] += 1;
            }
        }
        // Both sides of the detector's timeout are drawn, and the band between.
        assert!(deaf.iter().all(|&n| n >= 5), "{deaf:?}");
        assert_ne!(scenario(1).config, scenario(2).config);
    }

    #[test]
    fn messages_and_controller_requests_are_accounted_exactly() {
        let s = Scenario {
            seed: 7,
            config: String::new(),
            cmdline: String::new(),
            probe_ms: 0,
            hung: None,
            deaf: None,
            holders: vec![],
            guests: vec![],
            streams: vec![("st".into(), 10)],
            supervisors: vec!["sup".into()],
            summary: vec![],
        };
        let mut r: Report = serde_json::from_value(serde_json::json!({
            "schema_version": 1, "outcome": "ok", "emulator": "bochs", "cpu_model": "m",
            "cpus": 1, "cpus_listed": null, "cores_used": null, "cores": [], "config": null,
            "guests": [], "tsc": {}, "tsc_unit": "emulated_instructions",
            "channels": [{"name": "c0", "a": "st", "b": "ec", "slots": 8, "a_sent": 11,
            "b_received": 10, "b_sent": 8, "a_received": 8}],
            "wall_seconds": 1.0, "serial_log": "s", "problems": []
        }))
        .expect("a minimal report");
        let serial = "[st@c0] stream: sent 10, echoed 8, lost 2 in 1 resets, bad 0; \
                      epoch_sent=11 epoch_echoed=8\n\
                      [sup@c1] supervisor: 4 requests, 0 unanswered\n";
        assert_eq!(check(&s, &r, serial), Vec::<String>::new());
        // One echo more than the hypervisor saw, a count that does not add up, a request
        // never answered: each is named.
        r.channels[0].a_received = 7;
        let bad = serial.replace("lost 2", "lost 1").replace(", 0 unanswered", ", 1 unanswered");
        let broken = check(&s, &r, &bad);
        assert!(broken.iter().any(|b| b.contains("!= echoed 8 + lost 1")), "{broken:?}");
        assert!(broken.iter().any(|b| b.contains("counted 11 sent and 7 received")), "{broken:?}");
        assert!(broken.iter().any(|b| b.contains("not answered")), "{broken:?}");
        assert!(check(&s, &r, "").iter().any(|b| b.contains("no final count")));
    }

    #[test]
    fn broken_invariants_are_named() {
        let s = Scenario {
            seed: 7,
            config: String::new(),
            cmdline: String::new(),
            probe_ms: 8,
            hung: None,
            deaf: None,
            holders: vec![],
            guests: vec!["a".into()],
            streams: vec![],
            supervisors: vec![],
            summary: vec![],
        };
        let mut r: Report = serde_json::from_value(serde_json::json!({
            "schema_version": 1, "outcome": "ok", "emulator": "bochs", "cpu_model": "m",
            "cpus": 1, "cpus_listed": null, "cores_used": null, "cores": [], "config": null,
            "guests": [{"name": "a", "core": 0, "state": "exited", "exit_status": 0,
            "exits": {}, "hypercalls": 0, "tsc_first_entry": 1, "tsc_end": 2, "away_tsc": 10}],
            "channels": [], "tsc": {}, "tsc_unit": "emulated_instructions",
            "wall_seconds": 1.0, "serial_log": "s", "problems": []
        }))
        .expect("a minimal report");
        let serial = "[c0] TSC: 4000 ticks/ms\n";
        assert_eq!(check(&s, &r, serial), Vec::<String>::new());
        r.guests[0].away_tsc = 8 * 8 * 4000 * 12 / 8;
        r.suspicions.push(crate::report::SuspectReport { core: 1, target: 0, tsc: 5 });
        let broken = check(&s, &r, serial);
        assert!(
            broken.iter().any(|b| b.contains("suspected core 0, which was alive")),
            "{broken:?}"
        );
        assert!(broken.iter().any(|b| b.contains("away from its inbox")), "{broken:?}");
    }

    /// The deafness' invariants: back at its inbox within a probe period of its end; if
    /// fenced (allowed in the band), by every other core, its guest stopped for good within
    /// a timeout of the end. Each break is named.
    #[test]
    fn a_deafness_in_the_band_must_end_promptly_and_a_fence_must_be_clean() {
        let s = Scenario {
            seed: 7,
            config: String::new(),
            cmdline: String::new(),
            probe_ms: 8,
            hung: None,
            deaf: Some(Deaf {
                core: 1,
                guest: "a".into(),
                ms: 50,
                after_ms: 0,
                band: Band::Middle,
            }),
            holders: vec![],
            guests: vec!["a".into()],
            streams: vec![],
            supervisors: vec![],
            summary: vec![],
        };
        // Timeout 8 x 8 ms x 1,000 ticks = 64,000 ticks; a period 8,000.
        let report = |state: &str, ending: &str, fault: &str, end: u64| -> Report {
            let status = (ending == "exited").then_some(0);
            serde_json::from_value(serde_json::json!({
                "schema_version": 1, "outcome": "ok", "emulator": "bochs", "cpu_model": "m",
                "cpus": 2, "cpus_listed": null, "cores_used": null, "config": null,
                "cores": [{"index": 0, "apic_id": 0, "vmx": "on", "state": "up"},
                          {"index": 1, "apic_id": 1, "vmx": "on", "state": "up"}],
                "guests": [{"name": "a", "core": 1, "state": state, "exit_status": 0,
                "exits": {}, "hypercalls": 0, "tsc_first_entry": 1, "tsc_end": end,
                "incarnations": [{"n": 1, "ending": ending, "exit_status": status,
                "fault": fault, "tsc_start": 0, "tsc_first_entry": 1, "tsc_end": end,
                "frames_at_start": 8, "caps_revoked": 0, "caps_unconfirmed": 0,
                "caps_dropped": 0}]}],
                "channels": [], "tsc": {}, "tsc_unit": "emulated_instructions",
                "wall_seconds": 1.0, "serial_log": "s", "problems": []
            }))
            .expect("a minimal report")
        };
        let window = "[c0] TSC: 1000 ticks/ms\n\
                      [c1] WARN inject=deaf-core: core 1 serves no inbox for 50 ms, tsc=1000..51000\n";
        let back = |t: u64| {
            format!("{window}[c1] WARN inject=deaf-core: core 1 serves its inbox again, tsc={t}\n")
        };
        // Not fenced, back at once: nothing broken.
        let ok = report("exited", "exited", "", 300_000);
        assert_eq!(check(&s, &ok, &back(51_010)), Vec::<String>::new());
        // Back only after more than a period.
        let late = check(&s, &ok, &back(51_000 + 8_001));
        assert!(late.iter().any(|b| b.contains("served its inbox again 8001 ticks")), "{late:?}");
        assert!(check(&s, &ok, window).iter().any(|b| b.contains("never served its inbox")));
        // Fenced (core 0 suspects it): core 0 must say so, and the guest must have stopped
        // for good (isolation) within a timeout of the end.
        let isolation = "stopped to keep isolation: its core was fenced out of the membership view";
        let mut fenced = report("fenced", "stopped", isolation, 51_000 + 64_000);
        fenced.suspicions.push(crate::report::SuspectReport { core: 0, target: 1, tsc: 40_000 });
        let heard = "[c0] ERROR core 1 did not answer membership probes in time: fenced\n";
        let serial = back(51_010) + heard;
        assert_eq!(check(&s, &fenced, &serial), Vec::<String>::new());
        let unheard = check(&s, &fenced, &back(51_010));
        assert!(unheard.iter().any(|b| b.contains("core 0 never fenced")), "{unheard:?}");
        fenced.guests[0].incarnations[0].tsc_end += 1;
        let slow = check(&s, &fenced, &serial);
        assert!(slow.iter().any(|b| b.contains("on the fenced core, stopped")), "{slow:?}");
        let ran_on = report("exited", "exited", "", 51_000 + 64_001);
        let mut ran_on_fenced = ran_on.clone();
        ran_on_fenced.suspicions = fenced.suspicions.clone();
        let ran = check(&s, &ran_on_fenced, &serial);
        assert!(ran.iter().any(|b| b.contains("on the fenced core, exited")), "{ran:?}");
        // The run ended while the core was still deaf: nothing more to see.
        let mut cut = fenced.clone();
        cut.guests[0].incarnations.clear();
        assert!(check(&s, &cut, &serial).iter().any(|b| b.contains("no record of its end")));
        cut.tsc.end = Some(50_000);
        assert_eq!(check(&s, &cut, &(window.to_string() + heard)), Vec::<String>::new());
        // A short deafness must not be fenced at all.
        let short =
            Scenario { deaf: s.deaf.clone().map(|d| Deaf { band: Band::Short, ..d }), ..s.clone() };
        let mut suspected = ok.clone();
        suspected.suspicions = fenced.suspicions.clone();
        let b = check(&short, &suspected, &serial);
        assert!(b.iter().any(|b| b.contains("suspected core 1, which was alive")), "{b:?}");
    }
}
