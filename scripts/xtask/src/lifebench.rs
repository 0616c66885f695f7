// SPDX-License-Identifier: MIT OR Apache-2.0
//! `cargo xtask bench lifecycle`: a controller stopping and starting the guest at the other
//! end of its channel (`configs/bench-lifecycle.toml`, workload `lifebench`), at 2, 4 and 8
//! emulated CPUs (the extra cores run a short `spin` guest, then only serve), in Bochs where
//! the TSC counts emulated instructions. Figures are medians over the rounds of one run per
//! CPU count; a benchmark, not a pass/fail test. Then the membership protocol detecting and
//! fencing a hung core (`inject=hung-core:N` on the highest core, the coordinator: the worst
//! case, its successor takes over), one run per CPU count.
//!
//! Owns the config variants and the parsing of the `lifebench:` lines; calls `run`.

use anyhow::{bail, Context, Result};
use serde::Serialize;

/// One CPU count's medians, in emulated instructions.
#[derive(Serialize, Debug, Clone)]
pub struct Row {
    pub cpus: u32,
    pub rounds: usize,
    /// The controller's `STOP` call (the target's clean death included).
    pub stop_call_instructions: u64,
    /// From the `STOP` call to the controller's own channel saying `PeerGone`.
    pub stop_to_peer_gone_instructions: u64,
    /// The controller's `START` call (answered as the new incarnation is entered).
    pub start_call_instructions: u64,
    /// From the `START` call to the new incarnation's first VM entry.
    pub start_to_first_entry_instructions: u64,
    /// From the `START` call to the controller's channel up again in the next epoch.
    pub start_to_link_up_instructions: u64,
}

/// Detecting and fencing a hung core, in emulated instructions.
#[derive(Serialize, Debug, Clone)]
pub struct HangRow {
    pub cpus: u32,
    /// The probe period (the detector's unit).
    pub probe_ms: u64,
    /// From the hang to the first core suspecting it (detection).
    pub hang_to_suspected_instructions: u64,
    /// From that suspicion to the new view installed by its coordinator (agreement).
    pub suspected_to_view_instructions: u64,
    /// From the hang to the last live core installing the view.
    pub hang_to_all_fenced_instructions: u64,
}

/// `cpus` cores each running a `spin` guest; the last core hangs.
fn hang_config(cpus: u32) -> String {
    let mut c = format!("[machine]\ncpus = {cpus}\nmemory_mib = 256\n");
    for core in 0..cpus {
        c += &format!(
            "\n[[guest]]\nname = \"g{core}\"\ncore = {core}\nmemory_mib = 4\nworkload = \"spin\"\nargs = {{ ms = 400 }}\n"
        );
    }
    c
}

fn measure_hang(cpus: u32) -> Result<HangRow> {
    let file = format!("bench-hang-{cpus}cpu.toml");
    let inject = format!("inject=hung-core:{}", cpus - 1);
    let r = crate::bench::boot_variant(&file, &hang_config(cpus), &inject)?;
    let hang = r.hangs.first().context("no hang record")?.tsc;
    let suspect = r.suspicions.iter().map(|s| s.tsc).min().context("no core suspected it")?;
    let first_view = r.views.iter().filter(|v| v.num == 1).map(|v| v.tsc).min();
    let coordinator = r.views.iter().find(|v| v.num == 1 && v.core == v.by);
    let all = r.views.iter().filter(|v| v.num == 1).map(|v| v.tsc).max();
    let (Some(view), Some(all)) = (coordinator.map(|v| v.tsc).or(first_view), all) else {
        bail!("no view fenced the hung core: {:?}", r.problems);
    };
    let logged = r.views.iter().filter(|v| v.num == 1).count() as u32;
    if logged != cpus - 1 {
        bail!("{logged} of {} live cores logged the view", cpus - 1);
    }
    Ok(HangRow {
        cpus,
        probe_ms: 25,
        hang_to_suspected_instructions: suspect.saturating_sub(hang),
        suspected_to_view_instructions: view.saturating_sub(suspect),
        hang_to_all_fenced_instructions: all.saturating_sub(hang),
    })
}

fn config(cpus: u32) -> Result<String> {
    let base =
        std::fs::read_to_string(crate::workspace_root().join("configs/bench-lifecycle.toml"))?;
    let mut c = base.replacen("cpus = 2", &format!("cpus = {cpus}"), 1);
    for core in 2..cpus {
        c += &format!(
            "\n[[guest]]\nname = \"idle{core}\"\ncore = {core}\nmemory_mib = 4\nworkload = \"spin\"\nargs = {{ ms = 5 }}\n"
        );
    }
    Ok(c)
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

/// The `key=value` numbers of one `lifebench: round=` line.
fn fields(line: &str) -> impl Iterator<Item = (&str, u64)> {
    line.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .filter_map(|(k, v)| Some((k, v.parse().ok()?)))
}

fn measure(cpus: u32) -> Result<Row> {
    let file = format!("bench-lifecycle-{cpus}cpu.toml");
    let r = crate::bench::boot_variant(&file, &config(cpus)?, "")?;
    if r.outcome != "ok" {
        bail!("the lifecycle run with {cpus} CPUs ended {}: {:?}", r.outcome, r.problems);
    }
    let serial = std::fs::read_to_string(&r.serial_log)?;
    let echo = r.guests.iter().find(|g| g.name == "echo").context("no echo guest")?;
    let (mut stop, mut gone, mut start, mut first, mut up) =
        (vec![], vec![], vec![], vec![], vec![]);
    for line in serial.lines().filter(|l| l.contains("lifebench: round=")) {
        let get = |k: &str| fields(line).find(|(n, _)| *n == k).map(|(_, v)| v);
        let (Some(round), Some(at)) = (get("round"), get("start_at")) else { continue };
        stop.push(get("stop_call").context("stop_call")?);
        gone.push(get("peer_gone").context("peer_gone")?);
        start.push(get("start_call").context("start_call")?);
        up.push(get("link_up").context("link_up")?);
        // Round k started incarnation k + 2.
        let inc = echo.incarnations.iter().find(|i| u64::from(i.n) == round + 2);
        if let Some(entry) = inc.and_then(|i| i.tsc_first_entry) {
            first.push(entry.saturating_sub(at));
        }
    }
    if stop.is_empty() {
        bail!("no lifebench rounds in {}", r.serial_log);
    }
    Ok(Row {
        cpus,
        rounds: stop.len(),
        stop_call_instructions: median(stop),
        stop_to_peer_gone_instructions: median(gone),
        start_call_instructions: median(start),
        start_to_first_entry_instructions: median(first),
        start_to_link_up_instructions: median(up),
    })
}

pub fn lifecycle(json: Option<&std::path::Path>) -> Result<()> {
    let mut rows = vec![];
    for cpus in [2, 4, 8] {
        eprintln!("bench: lifecycle with {cpus} CPUs...");
        rows.push(measure(cpus)?);
    }
    println!("Guest lifecycle in Bochs (emulated instructions, medians over the rounds; a");
    println!("controller stops and starts the guest at the other end of its channel)");
    let mut t = crate::bench::table(&[
        "CPUs",
        "rounds",
        "stop call",
        "stop -> gone",
        "start call",
        "start -> entry",
        "start -> link up",
    ]);
    for r in &rows {
        t.add_row([
            r.cpus.to_string(),
            r.rounds.to_string(),
            r.stop_call_instructions.to_string(),
            r.stop_to_peer_gone_instructions.to_string(),
            r.start_call_instructions.to_string(),
            r.start_to_first_entry_instructions.to_string(),
            r.start_to_link_up_instructions.to_string(),
        ]);
    }
    println!("{t}");
    let mut hangs = vec![];
    for cpus in [2, 4, 8] {
        eprintln!("bench: a hung core with {cpus} CPUs...");
        hangs.push(measure_hang(cpus)?);
    }
    println!("Detecting and fencing a hung core (emulated instructions; the highest core, the");
    println!("membership coordinator, hangs; probes every 25 ms, a core silent for 8 is fenced)");
    let mut t = crate::bench::table(&[
        "CPUs",
        "hang -> suspected",
        "suspected -> view",
        "hang -> all fenced",
    ]);
    for h in &hangs {
        t.add_row([
            h.cpus.to_string(),
            h.hang_to_suspected_instructions.to_string(),
            h.suspected_to_view_instructions.to_string(),
            h.hang_to_all_fenced_instructions.to_string(),
        ]);
    }
    println!("{t}");
    let all = serde_json::json!({ "lifecycle": rows, "hung_core": hangs });
    crate::bench::save(json, &all)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_lines_parse_and_medians_take_the_middle() {
        let l = "[mgr@c0] lifebench: round=3 stop_call=120910 peer_gone=120915 start_at=99 x=y";
        let f: Vec<_> = fields(l).collect();
        assert_eq!(
            f,
            [("round", 3), ("stop_call", 120910), ("peer_gone", 120915), ("start_at", 99)]
        );
        assert_eq!(median(vec![5, 1, 9]), 5);
        assert_eq!(median(vec![]), 0);
    }

    #[test]
    fn hang_configs_give_every_core_a_guest() {
        let c = hang_config(4);
        assert!(c.contains("cpus = 4") && c.contains("name = \"g3\""));
        assert!(crate::config::compile("x.toml", &c).is_ok(), "{c}");
    }

    #[test]
    fn configs_add_idle_guests_on_the_extra_cores() {
        let c = config(4).unwrap();
        assert!(c.contains("cpus = 4"));
        assert!(c.contains("name = \"idle2\"") && c.contains("name = \"idle3\""));
        assert!(crate::config::compile("x.toml", &c).is_ok(), "{c}");
    }
}
