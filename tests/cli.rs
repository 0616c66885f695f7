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
        .args(["run", "--config", "configs/default.toml", "--quiet", "--timeout", "300"])
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
