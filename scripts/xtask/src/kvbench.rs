// SPDX-License-Identifier: MIT OR Apache-2.0
//! `cargo xtask bench kv`: the sharded key-value service (`configs/kv-{1,2,4,8}.toml`) in
//! Bochs, loaded from the host through slirp's forwarded port by `kvload` while it runs:
//! requests per second and latency in host time, emulated instructions per request from the
//! front's own `bench kvfront:` line (the TSC counts instructions in Bochs), against the
//! number of workers; large values by capability against by copy through the ring; and the
//! cost of a worker's restart (a worker that crashes mid-load, `mode = "crash"`: requests
//! failed, time until its shard serves again). A benchmark: it prints figures and fails
//! nothing on them (a run that could not be made, or a reply the model refuses, is an error).
//! `--update-readme` puts the figures of `docs/bench/kv.json` into the README's table.
//!
//! Owns the config variants, the parsing of the front's `bench kvfront:` line and the
//! README's kv table; calls `kvload` (the load), `run` (the boots) and `bench` (table, save).

use crate::kvload::{self, LoadReport, Options};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::{Duration, Instant};

/// The worker counts of the scaling table (the shipped configs).
pub const WORKERS: [u32; 4] = [1, 2, 4, 8];
/// The host port the bench's boots forward to the front.
pub const PORT: u16 = 21411;

/// The figures of the front's `bench kvfront:` line (TSC ticks: emulated instructions in
/// Bochs).
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct FrontFigures {
    pub commands: u64,
    pub unavailable: u64,
    pub worker_requests: u64,
    /// The front's work (not its halts) per command.
    pub work_instructions_per_command: u64,
    /// Command latency inside the front, from its line read to its reply queued.
    pub latency_p50: u64,
    pub latency_p90: u64,
    pub latency_p99: u64,
    pub latency_max: u64,
    pub caps_granted: u64,
    pub caps_revoked: u64,
    pub cap_bytes: u64,
    pub ring_bytes: u64,
    pub messages_sent: u64,
    pub messages_received: u64,
    pub run_tsc: u64,
    pub halted_tsc: u64,
}

/// The number right before `phrase` in `s` (`12 commands` -> 12 for `commands`).
fn before(s: &str, phrase: &str) -> Option<u64> {
    let at = s.find(phrase)?;
    s[..at].split_whitespace().next_back()?.trim_matches(|c: char| !c.is_ascii_digit()).parse().ok()
}

/// The number right after `phrase` in `s`.
fn after(s: &str, phrase: &str) -> Option<u64> {
    let at = s.find(phrase)? + phrase.len();
    s[at..].split_whitespace().next()?.trim_matches(|c: char| !c.is_ascii_digit()).parse().ok()
}

/// The figures of guest `front`'s last `bench kvfront:` line and the `bench kvfront ...`
/// lines after it (`bench kvfront traffic:`: the console cuts long lines, the front
/// spreads its figures), found by the words around each number; those absent are 0.
pub fn front_figures(serial: &str, front: &str) -> Option<FrontFigures> {
    let tag = format!("[{front}@c");
    let mine: Vec<&str> = serial
        .lines()
        .filter(|l| l.starts_with(&tag))
        .filter_map(|l| l.split_once("] ").map(|(_, r)| r))
        .filter(|l| l.starts_with("bench kvfront"))
        .collect();
    let first = mine.iter().rposition(|l| l.starts_with("bench kvfront: "))?;
    let joined = mine[first..].join("; ");
    let l = joined.as_str();
    Some(FrontFigures {
        commands: before(l, " commands")?,
        unavailable: before(l, " unavailable").unwrap_or(0),
        worker_requests: before(l, " worker requests")?,
        work_instructions_per_command: before(l, " instructions per command")?,
        latency_p50: after(l, "p50 ")?,
        latency_p90: after(l, "p90 ")?,
        latency_p99: after(l, "p99 ")?,
        latency_max: after(l, "max ")?,
        caps_granted: before(l, " capabilities granted").unwrap_or(0),
        caps_revoked: before(l, " revoked").unwrap_or(0),
        cap_bytes: before(l, " value bytes by capability").unwrap_or(0),
        ring_bytes: before(l, " by ring").unwrap_or(0),
        messages_sent: after(l, "ring messages ")
            .or_else(|| before(l, " ring messages sent"))
            .unwrap_or(0),
        messages_received: before(l, " received").unwrap_or(0),
        run_tsc: after(l, "; run ").unwrap_or(0),
        halted_tsc: before(l, " halted").unwrap_or(0),
    })
}

/// `config` (TOML text) with the front's `large` argument, the card's TCP forwarding from
/// host port `port` (not the shipped [`vmcall_proto::kv::HOST_PORT`]: a run of the shipped
/// config elsewhere on the machine would take the load) and, when `crash` is given, one
/// worker (`w{shard}`) crashing after that many requests (its restart policy kept).
pub fn variant(config: &str, large: &str, crash: Option<(u32, u32)>, port: u16) -> Result<String> {
    let mut t: toml::Table = config.parse().context("the kv config is not TOML")?;
    let forward = format!("tcp:{port}-{}", vmcall_proto::kv::GUEST_PORT);
    let nics = t.get_mut("nic").and_then(|n| n.as_array_mut()).context("no [[nic]]")?;
    let nic = nics.first_mut().and_then(|n| n.as_table_mut()).context("no [[nic]]")?;
    nic.insert("forward".into(), toml::Value::Array(vec![forward.into()]));
    let guests = t
        .get_mut("guest")
        .and_then(|g| g.as_array_mut())
        .context("the kv config has no [[guest]]")?;
    let mut front = false;
    for g in guests.iter_mut().filter_map(|g| g.as_table_mut()) {
        let workload = g.get("workload").and_then(|w| w.as_str()).unwrap_or("").to_string();
        let name = g.get("name").and_then(|w| w.as_str()).unwrap_or("").to_string();
        let args = g
            .entry("args")
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .context("`args` is not a table")?;
        if workload == "kvfront" {
            args.insert("large".into(), large.into());
            front = true;
        }
        if let Some((shard, after)) = crash {
            if workload == "kvworker" && name == format!("w{shard}") {
                args.insert("mode".into(), "crash".into());
                args.insert("after".into(), i64::from(after).into());
            }
        }
    }
    if !front {
        bail!("the kv config has no kvfront guest");
    }
    Ok(toml::to_string(&t)?)
}

/// One boot of the service under load.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Row {
    pub workers: u32,
    /// `cap` or `copy`.
    pub large: String,
    /// The worker that crashed mid-load (`restart` rows).
    pub crashed: Option<u32>,
    pub requests: u64,
    pub failures: u64,
    pub shard_errors: u64,
    pub requests_per_second: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// The front's work per command (emulated instructions).
    pub instructions_per_request: Option<u64>,
    pub front: Option<FrontFigures>,
    /// A crashed worker's outage as the client saw it.
    pub restart_failed_requests: Option<u64>,
    pub restart_serve_again_ms: Option<f64>,
    pub large_sets: u64,
    pub boot_seconds: f64,
    pub wall_seconds: f64,
    pub outcome: String,
}

/// What `bench kv` measured.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct KvBench {
    pub kv_scaling: Vec<Row>,
    pub kv_large: Vec<Row>,
    pub kv_restart: Vec<Row>,
    /// The load's parameters (per row: count, connections, sizes).
    pub count: u64,
    pub connections: u32,
    pub large_bytes: (usize, usize),
    pub meta: crate::bench::BenchMeta,
}

/// Sends `shutdown` (the run's end) and reads the front's `OK`.
pub fn shutdown(addr: &str) -> Result<()> {
    use std::io::{BufRead, Write};
    let s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    (&s).write_all(b"shutdown\r\n")?;
    let mut line = String::new();
    std::io::BufReader::new(&s).read_line(&mut line)?;
    if line != "OK\r\n" {
        bail!("`shutdown` answered {line:?}");
    }
    Ok(())
}

/// Boots `contents` (written as `target/xtask/FILE`) in Bochs, loads it with `opts` once it
/// answers, shuts it down; the load and the run's report.
pub fn boot_and_load(
    file: &str,
    contents: &str,
    opts: &Options,
) -> Result<(LoadReport, crate::report::Report, f64)> {
    let dir = crate::target_dir().join("xtask");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(file);
    std::fs::write(&path, contents)?;
    let mut args = crate::cli::RunArgs::quiet(crate::cli::Emulator::Bochs, path.to_str());
    args.timeout = 3600;
    let t0 = Instant::now();
    let boot = std::thread::spawn(move || crate::run::run(&args));
    let ready = Duration::from_secs(600);
    let up = kvload::wait_ready(&opts.addr, opts.timeout, Instant::now() + ready)
        .map(|_| t0.elapsed().as_secs_f64());
    let load = up.and_then(|b| kvload::run(opts, Duration::from_secs(10)).map(|l| (l, b)));
    // End the run whatever happened (else it goes on until its timeout).
    let down = shutdown(&opts.addr);
    let report = boot.join().map_err(|_| anyhow::anyhow!("the run panicked"))??;
    let (load, boot_s) = load.with_context(|| format!("{file}: the load"))?;
    down.with_context(|| format!("{file}: shutdown"))?;
    Ok((load, report, boot_s))
}

/// One row: `config` of `workers` workers, `large` values by cap or copy, maybe a crash.
fn measure(
    name: &str,
    config: &str,
    workers: u32,
    large: &str,
    crash: Option<(u32, u32)>,
    opts: &Options,
) -> Result<Row> {
    let text = variant(config, large, crash, PORT)?;
    let o = Options { workers, addr: format!("127.0.0.1:{PORT}"), ..opts.clone() };
    let (mut l, r, boot_seconds) = boot_and_load(name, &text, &o)?;
    let serial = std::fs::read_to_string(&r.serial_log)?;
    let front = front_figures(&serial, "front");
    l.instructions_per_request = front.as_ref().map(|f| f.work_instructions_per_command as f64);
    eprint!("{}", kvload::render(&l));
    let outage = crash.and_then(|(s, _)| l.outages.iter().find(|o| o.shard == s));
    let ms = |us: u64| us as f64 / 1000.0;
    if l.failures() > 0 {
        eprintln!("{}", kvload::render(&l));
        bail!("{name}: {} failures in the load (the first are listed above)", l.failures());
    }
    Ok(Row {
        workers,
        large: large.into(),
        crashed: crash.map(|c| c.0),
        requests: l.requests,
        failures: l.failures(),
        shard_errors: l.errors.get("shard_unavailable").copied().unwrap_or(0),
        requests_per_second: l.requests_per_second,
        p50_ms: ms(l.latency_us.p50),
        p90_ms: ms(l.latency_us.p90),
        p99_ms: ms(l.latency_us.p99),
        max_ms: ms(l.latency_us.max),
        instructions_per_request: front.as_ref().map(|f| f.work_instructions_per_command),
        front,
        restart_failed_requests: outage.map(|o| o.failed),
        restart_serve_again_ms: outage.and_then(|o| o.serve_again_ms),
        large_sets: l.large_sets,
        boot_seconds,
        wall_seconds: r.wall_seconds,
        outcome: r.outcome,
    })
}

/// The shipped `configs/kv-N.toml` of `workers` workers.
pub fn read_config(workers: u32) -> Result<String> {
    let p = crate::workspace_root().join(format!("configs/kv-{workers}.toml"));
    std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))
}

fn opt(v: Option<u64>) -> String {
    v.map_or("-".into(), |v| v.to_string())
}

/// The three tables, as markdown (the README's) or for the terminal.
pub fn tables(b: &KvBench) -> String {
    let mut s = String::new();
    s += "| workers | requests/s (host) | p50 ms | p99 ms | instructions/request (front) | worker requests | ring messages |\n";
    s += "|---:|---:|---:|---:|---:|---:|---:|\n";
    for r in &b.kv_scaling {
        let f = r.front.clone().unwrap_or_default();
        s += &format!(
            "| {} | {:.1} | {:.1} | {:.1} | {} | {} | {} |\n",
            r.workers,
            r.requests_per_second,
            r.p50_ms,
            r.p99_ms,
            opt(r.instructions_per_request),
            f.worker_requests,
            f.messages_sent + f.messages_received
        );
    }
    s += "\n| large values | requests/s (host) | p50 ms | p99 ms | instructions/request | capabilities granted | bytes by capability | bytes by ring | ring messages |\n";
    s += "|---|---:|---:|---:|---:|---:|---:|---:|---:|\n";
    for r in &b.kv_large {
        let f = r.front.clone().unwrap_or_default();
        s += &format!(
            "| {} ({} workers) | {:.1} | {:.1} | {:.1} | {} | {} | {} | {} | {} |\n",
            r.large,
            r.workers,
            r.requests_per_second,
            r.p50_ms,
            r.p99_ms,
            opt(r.instructions_per_request),
            f.caps_granted,
            f.cap_bytes,
            f.ring_bytes,
            f.messages_sent + f.messages_received
        );
    }
    s += "\n| worker restart | requests failed | served again after (ms, host) | requests/s (host) | p99 ms |\n";
    s += "|---|---:|---:|---:|---:|\n";
    for r in &b.kv_restart {
        s += &format!(
            "| w{} of {} crashes | {} | {} | {:.1} | {:.1} |\n",
            r.crashed.unwrap_or(0),
            r.workers,
            opt(r.restart_failed_requests),
            r.restart_serve_again_ms.map_or("-".into(), |t| format!("{t:.0}")),
            r.requests_per_second,
            r.p99_ms
        );
    }
    s
}

/// The page that holds the generated kv table.
pub const PAGE: &str = "docs/kv.md";

/// First and last lines of the README's generated kv table.
pub const BEGIN: &str =
    "<!-- kv-bench: generated from docs/bench/kv.json by `cargo xtask bench kv --update-readme`; do not edit -->";
pub const END: &str = "<!-- kv-bench end -->";

/// The README's section, markers included.
pub fn markdown(b: &KvBench) -> String {
    format!(
        "{BEGIN}\n{} requests per row over {} connections, large values {}..={} bytes \
         (measured {}):\n\n{}{END}",
        b.count,
        b.connections,
        b.large_bytes.0,
        b.large_bytes.1,
        b.meta.date_utc.split('T').next().unwrap_or(""),
        tables(b)
    )
}

/// `readme` with its kv section from `b`, or `None` without the markers.
pub fn updated(readme: &str, b: &KvBench) -> Option<String> {
    let start = readme.find(BEGIN)?;
    let end = readme[start..].find(END)? + start + END.len();
    Some(format!("{}{}{}", &readme[..start], markdown(b), &readme[end..]))
}

/// Rewrites the README's kv table from `json`.
pub fn update_readme(json: &Path) -> Result<()> {
    let b: KvBench = serde_json::from_str(&std::fs::read_to_string(json)?)
        .with_context(|| format!("{}: not `bench kv --json` output", json.display()))?;
    let path = crate::workspace_root().join(PAGE);
    let old = std::fs::read_to_string(&path)?;
    let new = updated(&old, &b)
        .with_context(|| format!("{}: no `{BEGIN}` ... `{END}` section", path.display()))?;
    if new != old {
        std::fs::write(&path, new)?;
    }
    Ok(())
}

/// `cargo xtask bench kv`.
pub fn kv(a: &crate::cli::KvBenchArgs) -> Result<()> {
    let json = a.json.as_deref();
    if a.update_readme && a.only_readme {
        return update_readme(json.context("--only-readme needs --json FILE (the figures)")?);
    }
    let opts = Options {
        count: a.count,
        connections: a.connections,
        large_bytes: a.large_bytes,
        seed: a.seed,
        ..Options::default()
    };
    let timer = crate::bench::timer_resolution();
    let host = crate::meta::host();
    let mut b = KvBench {
        kv_scaling: vec![],
        kv_large: vec![],
        kv_restart: vec![],
        count: a.count,
        connections: a.connections,
        large_bytes: a.large_bytes,
        meta: crate::bench::bench_meta(timer, host),
    };
    for &w in a.workers.iter() {
        eprintln!("bench kv: {w} worker(s)");
        let row = measure(&format!("bench-kv-{w}.toml"), &read_config(w)?, w, "cap", None, &opts)?;
        b.kv_scaling.push(row);
    }
    // Large values only: every set of a plain key is large.
    let large = Options { large_percent: 100, ..opts.clone() };
    let two = read_config(2)?;
    for mode in ["cap", "copy"] {
        eprintln!("bench kv: large values by {mode}");
        b.kv_large.push(measure(
            &format!("bench-kv-large-{mode}.toml"),
            &two,
            2,
            mode,
            None,
            &large,
        )?);
    }
    eprintln!("bench kv: a worker crashing mid-load");
    let crash = Some((1, (a.count / 8).max(10) as u32));
    b.kv_restart.push(measure("bench-kv-restart.toml", &two, 2, "cap", crash, &opts)?);
    b.meta.load_average_after = crate::meta::load_average();
    println!(
        "The key-value service in Bochs under load from the host ({} requests per row, {} \
         connections; host time is Bochs's speed, instructions are exact):\n",
        a.count, a.connections
    );
    println!("{}", tables(&b));
    println!(
        "One front core parses every command and relays it: with Bochs emulating the cores \
         one after another, more workers add cores to emulate and no parallelism, so host \
         requests/s cannot grow with workers; the front's instructions per request show \
         the work that does not depend on the number of workers."
    );
    crate::bench::save(json, &b)?;
    if a.update_readme {
        update_readme(json.context("--update-readme needs --json FILE")?)?;
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const LINE: &str = "[front@c0] bench kvfront: 412 commands (300 get keys, 120 sets; 200 hits, \
        100 misses; 7 unavailable) in 405 worker requests; work 23456 instructions per command; \
        latency p50 20000 p90 31000 p99 52000 max 90000 TSC ticks\n\
        [front@c0] bench kvfront traffic: 40 capabilities granted, 40 revoked; 655360 value bytes \
        by capability, 12000 by ring; ring messages 1800 sent, 1700 received; run 99999999 TSC \
        ticks, 5555555 halted";

    #[test]
    fn the_fronts_bench_line_parses() {
        let serial = format!(
            "[w0@c1] bench kvfront: 1 commands\n[front@c0] bench kvfront: 3 commands in 3 \
             worker requests; work 5 instructions per command; latency p50 1 p90 1 p99 1 max 1\n\
             [front@c0] bench kvfront traffic: 1 capabilities granted\n\
             {LINE}\n[front@c0] kvfront: done\n"
        );
        let f = front_figures(&serial, "front").expect("parsed");
        assert_eq!((f.commands, f.unavailable, f.worker_requests), (412, 7, 405));
        assert_eq!(f.work_instructions_per_command, 23456);
        assert_eq!(
            (f.latency_p50, f.latency_p90, f.latency_p99, f.latency_max),
            (20000, 31000, 52000, 90000)
        );
        assert_eq!(
            (f.caps_granted, f.caps_revoked, f.cap_bytes, f.ring_bytes),
            (40, 40, 655360, 12000)
        );
        assert_eq!((f.messages_sent, f.messages_received), (1800, 1700));
        assert_eq!((f.run_tsc, f.halted_tsc), (99_999_999, 5_555_555));
        assert!(front_figures("[front@c0] kvfront: up\n", "front").is_none());
        // The older, single line (cut where the console cut it).
        let cut = "[front@c0] bench kvfront: 3 commands (1 get keys) in 4 worker requests; work 5 \
                   instructions per command; latency p50 1 p90 2 p99 3 max 4 TSC ticks; 6 \
                   capabilities granted, 6 revoked, 728337 value ";
        let f = front_figures(cut, "front").unwrap();
        assert_eq!((f.commands, f.caps_granted, f.caps_revoked, f.cap_bytes), (3, 6, 6, 0));
    }

    const CONFIG: &str = "[machine]\ncpus = 3\n\n[[nic]]\nmodel = \"e1000\"\n\n[[guest]]\nname = \"front\"\ncore = 0\n\
        workload = \"kvfront\"\nargs = { large = \"cap\" }\n\n[[guest]]\nname = \"w0\"\ncore = 1\n\
        workload = \"kvworker\"\n\n[[guest]]\nname = \"w1\"\ncore = 2\nworkload = \"kvworker\"\n";

    #[test]
    fn variants_set_the_fronts_mode_and_a_crash() {
        let v: toml::Table = variant(CONFIG, "copy", Some((1, 30)), 4000).unwrap().parse().unwrap();
        assert_eq!(v["nic"][0]["forward"][0].as_str(), Some("tcp:4000-11211"));
        let g = v["guest"].as_array().unwrap();
        assert_eq!(g[0]["args"]["large"].as_str(), Some("copy"));
        assert!(g[1].get("args").is_none_or(|a| a.get("mode").is_none()));
        assert_eq!(g[2]["args"]["mode"].as_str(), Some("crash"));
        assert_eq!(g[2]["args"]["after"].as_integer(), Some(30));
        assert!(variant("[machine]\ncpus = 1\n", "cap", None, 4000).is_err());
        let no_front = CONFIG.replace("kvfront", "spin");
        assert!(variant(&no_front, "cap", None, 4000).is_err());
    }

    #[test]
    fn shipped_configs_take_the_variants() {
        for w in WORKERS {
            let c = read_config(w).unwrap();
            for (large, crash) in [("cap", None), ("copy", None), ("cap", Some((0, 5)))] {
                let v = variant(&c, large, crash, PORT).unwrap();
                let checked = crate::config::compile(&format!("kv-{w}.toml"), &v);
                assert!(checked.is_ok(), "kv-{w} {large} {crash:?}: {:?}", checked.err());
            }
        }
    }

    fn row(workers: u32, rps: f64, ipr: u64) -> Row {
        Row {
            workers,
            large: "cap".into(),
            crashed: None,
            requests: 100,
            failures: 0,
            shard_errors: 0,
            requests_per_second: rps,
            p50_ms: 10.0,
            p90_ms: 12.0,
            p99_ms: 30.0,
            max_ms: 40.0,
            instructions_per_request: Some(ipr),
            front: None,
            restart_failed_requests: None,
            restart_serve_again_ms: None,
            large_sets: 3,
            boot_seconds: 5.0,
            wall_seconds: 9.0,
            outcome: "ok".into(),
        }
    }

    /// Figures of a made-up bench (also drawn by `plot`'s tests).
    pub(crate) fn sample() -> KvBench {
        let mut crashed = row(2, 30.0, 0);
        (crashed.crashed, crashed.restart_failed_requests, crashed.restart_serve_again_ms) =
            (Some(1), Some(12), Some(345.6));
        KvBench {
            kv_scaling: vec![row(1, 50.0, 20_000), row(2, 40.5, 21_000), row(8, 12.25, 22_000)],
            kv_large: vec![row(2, 20.0, 30_000)],
            kv_restart: vec![crashed],
            count: 100,
            connections: 4,
            large_bytes: (8192, 32768),
            meta: crate::bench::BenchMeta::default(),
        }
    }

    #[test]
    fn figures_make_tables_and_a_readme_section() {
        let b = sample();
        let t = tables(&b);
        assert!(t.contains("| 2 | 40.5 | 10.0 | 30.0 | 21000 |"), "{t}");
        assert!(t.contains("| cap (2 workers) | 20.0 |"), "{t}");
        assert!(t.contains("| w1 of 2 crashes | 12 | 346 |"), "{t}");
        let readme = format!("intro\n{BEGIN}\nold\n{END}\nrest\n");
        let new = updated(&readme, &b).unwrap();
        assert!(new.starts_with("intro\n") && new.ends_with(&format!("{END}\nrest\n")), "{new}");
        assert!(new.contains(&t) && !new.contains("old"));
        assert_eq!(updated("no markers", &b), None);
    }

    #[test]
    fn the_readme_table_matches_the_committed_figures() {
        let json = crate::workspace_root().join("docs/bench/kv.json");
        let Ok(text) = std::fs::read_to_string(&json) else { return };
        let b: KvBench = serde_json::from_str(&text).expect("docs/bench/kv.json reads");
        let readme = std::fs::read_to_string(crate::workspace_root().join(PAGE)).unwrap();
        let want = updated(&readme, &b).expect("docs/kv.md has the kv-bench section");
        assert!(
            want == readme,
            "docs/kv.md's kv table differs from docs/bench/kv.json: run `cargo xtask bench kv \
             --json docs/bench/kv.json --update-readme --only-readme`"
        );
    }
}
