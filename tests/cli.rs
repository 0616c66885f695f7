// SPDX-License-Identifier: MIT OR Apache-2.0
//! Whole-system tests of the `cargo xtask` process itself: the real binary on a real boot,
//! stopped from outside.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use systests::xtask_binary;

/// Processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = vec![];
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if !e.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else { continue };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains(needle) {
            found.push(format!("{}: {cmd}", e.file_name().to_string_lossy()));
        }
    }
    found
}

#[test]
fn sigint_kills_the_emulator_and_reports_interrupted() {
    let bin = xtask_binary();
    let dir = xtask::target_dir().join("xtask-tests");
    std::fs::create_dir_all(&dir).unwrap();
    let report = dir.join("interrupted.json");
    let _ = std::fs::remove_file(&report);
    let mut child = Command::new(&bin)
        // Not -q: its phase lines say when the emulator runs (the console goes to null).
        .args(["run", "--config", "configs/default.toml", "--timeout", "300"])
        .arg("--report")
        .arg(&report)
        .current_dir(xtask::workspace_root())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line.clone());
            all += &line;
            all.push('\n');
        }
        all
    });
    // The first progress line comes once the emulator runs.
    let limit = Instant::now() + Duration::from_secs(600);
    loop {
        let line = rx.recv_timeout(limit.saturating_duration_since(Instant::now()));
        match line {
            Ok(l) if l.contains("firmware") => break,
            Ok(_) => {}
            Err(e) => panic!("the emulator never started: {e}"),
        }
    }
    std::thread::sleep(Duration::from_secs(3));
    let sent = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(sent.success());
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            panic!("xtask still running 10 s after SIGINT");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stderr = reader.join().unwrap();
    assert_eq!(status.code(), Some(130), "{status:?}\n{stderr}");
    assert!(stderr.contains("outcome interrupted"), "{stderr}");
    let json = std::fs::read_to_string(&report).expect("the report is written when interrupted");
    let r: xtask::report::Report = serde_json::from_str(&json).unwrap();
    assert_eq!(r.outcome, "interrupted", "{json}");
    assert!(r.problems.iter().any(|p| p.contains("interrupted by a signal")), "{json}");
    // Every guest of the config is listed with what was seen of it (interrupted during the
    // boot: most likely nothing yet), none as if it had ended.
    let names: Vec<&str> = r.guests.iter().map(|g| g.name.as_str()).collect();
    assert_eq!(names, ["alpha", "beta", "gamma", "delta"], "{json}");
    for g in &r.guests {
        assert!(["running", "unknown", "exited"].contains(&g.state.as_str()), "{g:?}");
    }
    systests::assert_matches_schema(&r);
    // No process of that run survives: its run directory is in Bochs' arguments.
    let run_dir = Path::new(&r.serial_log).parent().unwrap().to_string_lossy().into_owned();
    std::thread::sleep(Duration::from_millis(500));
    let left = processes_mentioning(&run_dir);
    assert!(left.is_empty(), "still running: {left:?}");
}

#[test]
fn an_emulator_that_stops_at_once_is_named_in_the_report() {
    // Bochs' own refusals are caught before building; QEMU's CPU models are its own, so an
    // unknown one reaches the emulator, which exits with its reason on stderr.
    let args = xtask::cli::RunArgs {
        cpu_model: Some("nonsense".into()),
        ..xtask::cli::RunArgs::quiet(xtask::cli::Emulator::Qemu, None)
    };
    let r = xtask::run::run(&args).expect("the run is attempted");
    assert_eq!(r.outcome, "failed");
    // Under QEMU the TSC counts clock ticks, not instructions, and the report says so.
    assert_eq!(r.tsc_unit, "tsc_ticks");
    assert!(
        xtask::run::summary(&r).contains("TSC clock ticks, not instructions")
            || r.tsc.hypervisor_entry.is_none()
    );
    assert!(
        r.problems.iter().any(|p| p.starts_with("the emulator exited with")),
        "{:?}",
        r.problems
    );
    assert!(
        r.problems.iter().any(|p| p.contains("unable to find CPU model 'nonsense'")),
        "{:?}",
        r.problems
    );
}

/// Runs the `cargo xtask` binary with `args` and a target directory of its own (so that
/// anything it builds or boots would show there); returns exit code, stdout, stderr.
fn xtask_in(target: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(xtask_binary())
        .args(args)
        .env("CARGO_TARGET_DIR", target)
        .current_dir(xtask::workspace_root())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_checks_everything_run_checks_and_builds_nothing() {
    let target = xtask::target_dir().join("xtask-tests/check-target");
    let _ = std::fs::remove_dir_all(&target);
    std::fs::create_dir_all(&target).unwrap();
    let (code, out, err) = xtask_in(&target, &["check", "configs/default.toml"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("ok: 4 guest(s)") && out.contains("4 CPUs"), "{out}");
    // A config whose own kernel file is missing: refused like run would, nothing built.
    let missing = target.join("missing-kernel.toml");
    let cfg = std::fs::read_to_string(xtask::workspace_root().join("configs/pair.toml")).unwrap();
    let cfg = cfg.replacen("workload = \"", "kernel = \"nowhere.elf\"\nworkload = \"", 1);
    std::fs::write(&missing, cfg).unwrap();
    let (code, _, err) = xtask_in(&target, &["check", missing.to_str().unwrap()]);
    assert_eq!(code, Some(xtask::exit::CONFIG.into()), "{err}");
    assert!(err.contains("guest[0].kernel: file `nowhere.elf`"), "{err}");
    std::fs::remove_file(&missing).unwrap();
    // Each refusal with the code `run` would give.
    let cases: [(&[&str], u8, &str); 5] = [
        (&["check", "configs/bad-two-guests-one-core.toml"], xtask::exit::CONFIG, "guest[1].core"),
        (&["check", "configs/default.toml", "--cpus", "2"], xtask::exit::USAGE, "--cpus 4"),
        (&["check", "configs/pair.toml", "--cmdline", "frob"], xtask::exit::USAGE, "`frob`"),
        (&["check", "--no-config", "--cpu-model", "nonsense"], xtask::exit::USAGE, "nonsense"),
        (
            &["check", "configs/default.toml", "--report", "/nonexistent-dir/r.json"],
            xtask::exit::REPORT_PATH,
            "/nonexistent-dir/r.json",
        ),
    ];
    for (args, want, says) in cases {
        let (code, out, err) = xtask_in(&target, args);
        assert_eq!(code, Some(want.into()), "{args:?}: {out}{err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
    // Nothing was built, no run folder made.
    let left: Vec<_> = std::fs::read_dir(&target).unwrap().flatten().map(|e| e.path()).collect();
    assert!(left.is_empty(), "check built or booted something: {left:?}");
}

#[test]
fn trace_writes_every_exit_as_csv_and_totals_in_the_report() {
    let dir = xtask::target_dir().join("xtask-tests");
    std::fs::create_dir_all(&dir).unwrap();
    let report = dir.join("traced.json");
    let csv_path = dir.join("traced.trace.csv");
    let _ = std::fs::remove_file(&csv_path);
    let out = Command::new(xtask_binary())
        .args(["run", "--config", "configs/fault.toml", "--quiet", "--trace", "--report"])
        .arg(&report)
        .current_dir(xtask::workspace_root())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    // mallory is stopped by design: the run is `failed`.
    assert_eq!(out.status.code(), Some(xtask::exit::FAILED.into()), "{err}");
    let r: xtask::report::Report =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    systests::assert_matches_schema(&r);
    assert_eq!(r.trace_csv.as_deref(), Some(csv_path.to_str().unwrap()));
    let csv = std::fs::read_to_string(&csv_path).expect("the trace CSV next to the report");
    let rows: Vec<Vec<&str>> = csv.lines().skip(1).map(|l| l.split(',').collect()).collect();
    for g in &r.guests {
        let t = g.trace.as_ref().unwrap_or_else(|| panic!("{} has no trace totals", g.name));
        // Every exit the guest record counts was traced, and each kept one is a row with
        // its reason: the same counts by reason as the guest record (the ring held them all).
        let exits: u64 = g.exits.values().sum();
        assert_eq!(t.exits, exits, "{}: {:?}", g.name, g.exits);
        assert_eq!(t.kept, exits.min(512), "{}", g.name);
        let mine: Vec<_> = rows.iter().filter(|r| r[0] == g.name).collect();
        assert_eq!(mine.len() as u64, t.kept, "{}", g.name);
        let mut by_reason = std::collections::BTreeMap::<String, u64>::new();
        for row in &mine {
            *by_reason.entry(row[3].to_string()).or_default() += 1;
        }
        assert_eq!(by_reason, g.exits, "{}", g.name);
        // Time in the guest and in the hypervisor add up to the traced span, from the first
        // exit's entry (the hypervisor's last look before the first VM entry) to the last
        // exit, which lies within the guest's life.
        let num = |s: &str| s.parse::<u64>().unwrap();
        let t0 = r.tsc.hypervisor_entry.unwrap();
        let (first, last) = (num(mine[0][4]) + t0, num(mine[mine.len() - 1][5]) + t0);
        assert!(
            t.guest_tsc > 0 && t.guest_tsc + t.hypervisor_tsc == last - first,
            "{}: {t:?}",
            g.name
        );
        assert!(first <= g.tsc_first_entry && last <= g.tsc_end, "{}", g.name);
        let guest_rows: u64 = mine.iter().map(|r| num(r[6])).sum();
        assert_eq!(guest_rows, t.guest_tsc, "{}", g.name);
        // Rows in time order, each exit after its entry.
        for w in mine.windows(2) {
            assert!(num(w[0][5]) <= num(w[1][4]), "{w:?}");
        }
    }
    let m = r.guests.iter().find(|g| g.name == "mallory").unwrap();
    assert_eq!(rows.iter().rfind(|r| r[0] == "mallory").unwrap()[3], "ept_violation");
    assert!(err.contains("trace:") && err.contains("in the hypervisor"), "{err}");
    assert_eq!(m.state, "stopped");
    plot_and_diff(&report);
}

/// `plot` and `report diff` on the report and trace of the run above (no boot of their
/// own): run by the trace test, after its run.
fn plot_and_diff(report: &Path) {
    let dir = report.with_file_name("plots");
    let _ = std::fs::remove_dir_all(&dir);
    let out = Command::new(xtask_binary())
        .arg("plot")
        .arg(report)
        .arg("--out")
        .arg(&dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: xtask::report::Report =
        serde_json::from_str(&std::fs::read_to_string(report).unwrap()).unwrap();
    let mallory = r.guests.iter().find(|g| g.name == "mallory").expect("mallory");
    // Its EPT violation, its first hypercall, and whatever membership probes came between.
    let n: u64 = mallory.exits.values().sum();
    assert!(n >= 2, "{:?}", mallory.exits);
    let label = format!("mallory ({n} exits)");
    for (what, says) in [("boot", "hypervisor boot"), ("exits", label.as_str())] {
        let svg = std::fs::read_to_string(dir.join(format!("traced.{what}.svg"))).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains(says), "{what}: {says}");
    }
    let out = Command::new(xtask_binary())
        .args(["report", "diff"])
        .arg(report)
        .arg(report)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        table.contains("mallory.exits.ept_violation") && table.contains("delta.exits.hlt"),
        "{table}"
    );
    assert!(table.contains("+0") && !table.contains("+1"), "{table}");
}

/// A run watched from the outside: `cargo xtask run` names its folder as it starts, `ps`
/// lists it while it runs, `top` follows it to its end; the console it streams has the
/// guests' and the hypervisor's lines but none of the `#mkv` records (the serial log has
/// them all).
#[test]
fn a_run_is_seen_by_ps_and_followed_by_top_and_its_console_has_no_records() {
    let bin = xtask_binary();
    let mut run = Command::new(&bin)
        .args(["run", "--config", "configs/rejoin.toml", "--timeout", "300", "--stats", "10ms"])
        .current_dir(xtask::workspace_root())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = run.stdout.take().unwrap();
    let console = std::thread::spawn(move || std::io::read_to_string(stdout).unwrap());
    let mut err = BufReader::new(run.stderr.take().unwrap()).lines();
    // `run folder DIR (cargo xtask top NAME)`, before the firmware starts.
    let line = err
        .by_ref()
        .map_while(Result::ok)
        .find(|l| l.starts_with("run folder "))
        .expect("the run folder on stderr");
    let name = line
        .strip_suffix(')')
        .and_then(|l| l.rsplit_once("cargo xtask top "))
        .map(|(_, n)| n.to_string())
        .unwrap_or_else(|| panic!("no run folder: {line}"));
    let ps = Command::new(&bin).arg("ps").output().unwrap();
    let ps = String::from_utf8_lossy(&ps.stdout).into_owned();
    let row = ps.lines().find(|l| l.ends_with(&name)).unwrap_or_else(|| panic!("{ps}"));
    assert!(row.starts_with(&run.id().to_string()) && row.contains("configs/rejoin.toml"), "{ps}");
    let top = Command::new(&bin).args(["top", &name]).output().unwrap();
    let view = String::from_utf8_lossy(&top.stdout).into_owned();
    assert!(top.status.success(), "{view}{}", String::from_utf8_lossy(&top.stderr));
    let last = view.rsplit("mkvisor run ").next().unwrap();
    assert!(last.contains("phase: ended: ok"), "{view}");
    let echo = last.lines().find(|l| l.trim_start().starts_with("echo ")).expect("echo's row");
    let cols: Vec<&str> = echo.split_whitespace().collect();
    // Name, core, state, incarnation 2, one restart.
    assert_eq!(&cols[..6], ["echo", "1", "exited", "0", "2", "1"], "{view}");
    assert!(last.contains("channel line: source->echo sent "), "{view}");
    let rest: Vec<String> = err.map_while(Result::ok).collect();
    assert!(run.wait().unwrap().success(), "{rest:?}");
    let console = console.join().unwrap();
    assert!(console.contains("[echo@c1] echo: 69 echoed, end"), "{console}");
    assert!(!console.contains("#mkv"), "{console}");
    // `--stats`: live figures in the serial log, read without a problem.
    let serial = std::fs::read_to_string(xtask::run::runs_root().join(&name).join("serial.txt"));
    let serial = serial.unwrap();
    assert!(serial.contains("#mkv stats guest=source n=1 core=0 "), "{serial}");
    assert!(!last.contains("problem"), "{view}");
    // ps no longer lists it.
    let ps = Command::new(&bin).arg("ps").output().unwrap();
    assert!(!String::from_utf8_lossy(&ps.stdout).contains(&name));
}

/// The bad-input table: each bad input (malformed configs, bad flags, bad files) with the
/// exit code and the first line of what the tool says; every one an `error: ` line (one
/// prefix for every subcommand, clap's and cargo's), and every subcommand's unknown flag
/// exit 2 the same way. Printed (`--nocapture`) as the table the docs quote.
#[test]
fn every_subcommand_says_error_the_same_way_with_its_exit_code() {
    let target = xtask::target_dir().join("xtask-tests/bad-input-target");
    let _ = std::fs::remove_dir_all(&target);
    std::fs::create_dir_all(&target).unwrap();
    let file = |name: &str, text: &str| {
        let p = target.join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let guest = |i: usize| {
        format!("[[guest]]\nname = \"g{i}\"\ncore = {i}\nmemory_mib = 4\nworkload = \"hello\"\n")
    };
    let machine = "[machine]\ncpus = 4\nmemory_mib = 256\n";
    let many = std::iter::once(machine.replace("cpus = 4", "cpus = 64"))
        .chain((0..65).map(guest))
        .collect::<String>();
    let not_toml = file("not.toml", "[machine\ncpus = 4\n");
    let string_count =
        file("string.toml", &format!("{}{}", machine.replace("4", "\"four\""), guest(0)));
    let unknown_key = file("unknown.toml", &format!("{machine}colour = 1\n{}", guest(0)));
    let huge = file(
        "huge.toml",
        &format!("{}{}", machine.replace("= 4", "= 99999999999999999999"), guest(0)),
    );
    let many = file("many.toml", &many);
    let bad_name = file("name.toml", &format!("{machine}{}", guest(0).replace("g0", "g 0")));
    let no_guest = file("noguest.toml", machine);
    let not_json = file("not.json", "{ nope");
    let other_json = file("other.json", "{\"x\": 1}");
    let full = target.join("full");
    std::fs::create_dir_all(&full).unwrap();
    std::fs::write(full.join("x"), "").unwrap();
    let full = full.display().to_string();
    let cases: Vec<(Vec<&str>, u8)> = vec![
        (vec!["run", "--frobnicate"], 2),
        (vec!["run", "--cpus", "0"], 2),
        (vec!["run", "--config", "configs/nonexistent.toml"], 3),
        (vec!["check", &not_toml], 3),
        (vec!["check", &string_count], 3),
        (vec!["check", &unknown_key], 3),
        (vec!["check", &huge], 3),
        (vec!["check", &many], 3),
        (vec!["check", &bad_name], 3),
        (vec!["check", &no_guest], 3),
        (vec!["check", "Cargo.toml"], 3),
        (vec!["check", "configs/bad-two-guests-one-core.toml"], 3),
        (vec!["check", "configs/default.toml", "--cpus", "2"], 2),
        (vec!["check", "configs/default.toml", "--cmdline", "budget_ms=99999999999999999999"], 2),
        (vec!["check", "configs/default.toml", "--cmdline", "frob"], 2),
        (vec!["check", "configs/default.toml", "--duration", "0s"], 2),
        (vec!["check", "configs/default.toml", "--emulator", "vmware"], 2),
        (vec!["check", "configs/default.toml", "--report", "/nonexistent-dir/r.json"], 6),
        (vec!["check", "configs/hostctl.toml", "--cpus", "15"], 2),
        (vec!["plot", &not_json], 2),
        (vec!["plot", &other_json], 2),
        (vec!["plot", "/nonexistent/r.json"], 2),
        (vec!["report", "diff", &other_json, &not_json], 2),
        (vec!["report", "diff", "--fail-on", "frob", &other_json, &other_json], 2),
        (vec!["new-guest", &full], 2),
        (vec!["top", "no-such-run"], 2),
        (vec!["ctl", "no-such-run", "query", "w1"], 2),
        (vec!["ctl", "no-such-run", "query", "w1", "--wait", "0"], 2),
        (vec!["schema", "frob"], 2),
        (vec!["clean", "--keep", "-1"], 2),
        (vec!["bench", "caps", "--k", "99"], 2),
        (vec!["mutants", "--min", "101"], 2),
        (vec!["load", "--addr", "127.0.0.1:1", "--wait", "1"], 7),
        (vec!["frobnicate"], 2),
    ];
    let mut table = String::from("| input | exit | says |\n|---|---|---|\n");
    let mut wrong = vec![];
    for (args, want) in &cases {
        let (code, _, err) = xtask_in(&target, args);
        let first = err.lines().find(|l| !l.trim().is_empty()).unwrap_or("").to_string();
        let shown = args.join(" ").replace(&target.display().to_string(), "T");
        table += &format!(
            "| `{shown}` | {} | `{}` |\n",
            code.map_or("signal".into(), |c| c.to_string()),
            first.replace(&target.display().to_string(), "T").replace('|', "\\|")
        );
        if code != Some(i32::from(*want)) || !first.starts_with("error: ") {
            wrong.push(format!("{shown}: exit {code:?} (want {want}): {err}"));
        }
    }
    // Every subcommand's unknown flag: usage, exit 2, the same prefix.
    let subcommands = xtask::cli::subcommands();
    for s in &subcommands {
        let mut args: Vec<&str> = s.split(' ').collect();
        args.push("--frobnicate");
        let (code, _, err) = xtask_in(&target, &args);
        if code != Some(2) || !err.starts_with("error: ") {
            wrong.push(format!("{s} --frobnicate: exit {code:?}: {err}"));
        }
    }
    println!("{table}");
    assert!(wrong.is_empty(), "{}\n{table}", wrong.join("\n"));
    // Nothing was built or booted.
    let left: Vec<_> = std::fs::read_dir(&target)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".toml") && !n.ends_with(".json") && n != "full")
        .collect();
    assert!(left.is_empty(), "{left:?}");
}
