// SPDX-License-Identifier: MIT OR Apache-2.0
//! Whole-system tests of the host's load generator (`xtask::kvload`): against the key-value
//! service in Bochs (`configs/kv-2.toml`: a front owning the e1000 and two workers, reached
//! through slirp's forwarding of 127.0.0.1:21311 here: not the shipped port, which
//! `tests/kv.rs` uses), a few hundred seeded requests with values
//! below and above the ring's inline size, every reply verified against the load's model;
//! the run's report must show the channel and capability traffic that carried them. And
//! against a real memcached (the reference server; `cargo xtask test` installs it), so the
//! client and its model are checked on the protocol's own implementation too.

use std::net::TcpListener;
use std::time::Duration;
use systests::boot_args;
use xtask::cli::{Emulator, RunArgs};
use xtask::kvload::{self, LoadReport, Options};

/// Runs the load of `o` on a thread, failing the test if it is not over in `limit`.
fn load_within(o: Options, ready: Duration, limit: Duration) -> LoadReport {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(kvload::run(&o, ready).map_err(|e| format!("{e:#}")));
    });
    rx.recv_timeout(limit).expect("the load hung").expect("the load ran")
}

/// A real memcached, where installed (`apt-get install memcached`): the client and the
/// model agree with the reference server. Skips with a notice where it is absent.
#[test]
fn the_load_agrees_with_a_real_memcached() {
    let Some(bin) = std::env::var_os("PATH")
        .and_then(|p| std::env::split_paths(&p).map(|d| d.join("memcached")).find(|p| p.is_file()))
    else {
        eprintln!("SKIPPED: no memcached on PATH (apt-get install memcached to run this test)");
        return;
    };
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut child = std::process::Command::new(bin)
        .args(["-l", "127.0.0.1", "-p", &port.to_string(), "-U", "0", "-m", "64", "-u", "nobody"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("memcached starts");
    let r = std::panic::catch_unwind(|| {
        load_within(
            Options {
                addr: format!("127.0.0.1:{port}"),
                workers: 1,
                count: 3000,
                connections: 3,
                keys: 24,
                timeout: Duration::from_secs(5),
                deadline: Duration::from_secs(60),
                ..Options::default()
            },
            Duration::from_secs(10),
            Duration::from_secs(120),
        )
    });
    let _ = child.kill();
    let _ = child.wait();
    let r = r.expect("the load against memcached");
    eprintln!("{}", kvload::render(&r));
    assert!(r.server_version.starts_with('1'), "{}", r.server_version);
    assert_eq!((r.failures(), r.ok), (0, 3000), "{:?}", r.first_mismatches);
}

#[test]
fn two_workers_serve_a_verified_load_from_the_host() {
    const PORT: u16 = 21311;
    let count = 300;
    let config = xtask::kvbench::read_config(2).unwrap();
    let config = xtask::kvbench::variant(&config, "cap", None, PORT).unwrap();
    let path = xtask::target_dir().join("xtask/test-kv-load.toml");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, config).unwrap();
    let opts = Options {
        addr: format!("127.0.0.1:{PORT}"),
        workers: 2,
        count,
        seed: 19,
        connections: 2,
        keys: 32,
        // Above the ring's inline size: by capability.
        large_bytes: (vmcall_proto::kv::INLINE_MAX + 1, 32 << 10),
        large_percent: 25,
        timeout: Duration::from_secs(60),
        deadline: Duration::from_secs(900),
        ..Options::default()
    };
    let addr = opts.addr.clone();
    let client = std::thread::spawn(move || {
        let l = load_within(opts, Duration::from_secs(600), Duration::from_secs(1500));
        // The run ends on `shutdown`, whatever the load saw.
        let down = xtask::kvbench::shutdown(&addr);
        (l, down)
    });
    let b = boot_args(RunArgs { timeout: 1500, ..RunArgs::quiet(Emulator::Bochs, path.to_str()) });
    let (mut l, down) = client.join().expect("the host client failed");
    let f = xtask::kvbench::front_figures(&b.serial, "front").expect("a bench kvfront: line");
    l.instructions_per_request = Some(f.work_instructions_per_command as f64);
    eprintln!("{}", kvload::render(&l));
    down.expect("shutdown answered OK");
    assert_eq!((l.requests, l.failures(), l.mismatches), (count, 0, 0), "{:?}", l.first_mismatches);
    assert_eq!(l.ok, count, "no shard was down: {:?}", l.errors);
    assert!(l.large_sets > 10 && l.by_op["get_multi"] > 10, "{:?} {}", l.by_op, l.large_sets);
    assert_eq!(b.report.outcome, "ok", "{:?}\n{}", b.report.problems, b.serial);
    for g in ["front", "w0", "w1"] {
        let r = b.guest(g);
        assert_eq!((r.state.as_str(), r.exit_status), ("exited", 0), "{g}: {r:?}");
    }
    // The requests went over both channels, both ways.
    assert_eq!(b.report.channels.len(), 2, "{:?}", b.report.channels);
    for c in &b.report.channels {
        assert!(c.a_sent > 2 * count / 10 && c.b_sent > 2 * count / 10, "{c:?}");
        assert_eq!((c.a_sent, c.b_sent), (c.b_received, c.a_received), "{c:?}");
    }
    // The large values went by capability: granted, revoked, as the front counted and as
    // the workers' cores saw the front's core ask them.
    eprintln!("front: {f:?}");
    assert!(f.caps_granted >= l.large_sets, "{f:?}");
    assert_eq!(f.caps_granted, f.caps_revoked, "{f:?}");
    assert!(f.commands >= count, "{f:?}");
    assert!(f.cap_bytes > f.ring_bytes && f.messages_sent > 2 * count, "{f:?}");
    let front_core = b.guest("front").core.to_string();
    for w in ["w0", "w1"] {
        let asked = b.guest(w).requests_from.get(&front_core).copied().unwrap_or(0);
        assert!(asked > 0, "{w}: no capability request from the front's core: {:?}", b.guest(w));
    }
}
