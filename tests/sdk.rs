// SPDX-License-Identifier: MIT OR Apache-2.0
//! Whole-system tests of guests of one's own: a crate made by `cargo xtask new-guest`, built
//! and booted next to a built-in guest; kernels that must be refused before anything boots.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use systests::xtask_binary;
use xtask::report::Report;

/// Runs the real `cargo xtask` binary from the workspace root, with cargo offline: a guest
/// crate builds from the lock file `new-guest` gives it and crates already in the cache.
fn xtask(args: &[&str]) -> Output {
    Command::new(xtask_binary())
        .args(args)
        .current_dir(xtask::workspace_root())
        .env("CARGO_NET_OFFLINE", "true")
        .output()
        .expect("xtask runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Boots `config` with `cargo xtask run` in Bochs, the report written next to it; asserts
/// the run exited 0, and returns the report and the serial log.
fn boot_ok(config: &Path) -> (Report, String) {
    boot_ok_on(config, "bochs")
}

/// [`boot_ok`] in `emulator` (`cargo xtask run --emulator`).
fn boot_ok_on(config: &Path, emulator: &str) -> (Report, String) {
    let report = config.with_extension("report.json");
    let run = xtask(&[
        "run",
        "--quiet",
        "--emulator",
        emulator,
        "--config",
        config.to_str().unwrap(),
        "--report",
        report.to_str().unwrap(),
    ]);
    let r: Report = serde_json::from_str(&std::fs::read_to_string(&report).unwrap())
        .unwrap_or_else(|e| panic!("no report ({e}): {}", text(&run.stderr)));
    let serial = std::fs::read_to_string(&r.serial_log).unwrap();
    assert_eq!(run.status.code(), Some(0), "{}\n{serial}", text(&run.stderr));
    assert_eq!(r.outcome, "ok", "{:?}", r.problems);
    (r, serial)
}

/// `cargo xtask new-guest DIR`; returns DIR.
fn new_guest(dir: PathBuf) -> PathBuf {
    let made = xtask(&["new-guest", dir.to_str().unwrap()]);
    assert!(made.status.success(), "{}", text(&made.stderr));
    for f in ["Cargo.toml", "src/main.rs", "mkvisor.toml", "README.md"] {
        assert!(dir.join(f).is_file(), "new-guest wrote no {f}");
    }
    dir
}

/// Builds the C example guest into `out` with its own Makefile (the system C compiler).
fn make_c_guest(out: &Path) {
    let made = Command::new("make")
        .arg("-C")
        .arg(xtask::workspace_root().join("examples/c-guest"))
        .arg(format!("OUT={}", out.display()))
        .output()
        .expect("make runs");
    assert!(made.status.success(), "{}", text(&made.stderr));
}

/// The hypervisor's line for guest `name`: where its kernel's segments went.
fn kernel_range<'a>(serial: &'a str, name: &str) -> &'a str {
    let line = serial.lines().find(|l| l.contains(&format!("] guest {name} (id "))).unwrap();
    line.split("kernel ").nth(1).and_then(|k| k.split(' ').next()).unwrap()
}

#[test]
fn a_new_guest_crate_boots_and_talks_to_a_builtin_guest() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = new_guest(tmp.path().join("hello-guest"));
    let (r, serial) = boot_ok(&dir.join("mkvisor.toml"));
    // The crate was built in its own directory, for the guest target.
    assert!(dir.join("target/x86_64-unknown-none/release/hello-guest").is_file());
    for (name, core) in [("mine", 0), ("echo", 1)] {
        let g = r.guests.iter().find(|g| g.name == name).unwrap();
        assert_eq!((g.state.as_str(), g.exit_status, g.core), ("exited", 0, core), "{g:?}");
    }
    // Both sides checked every message: the new guest the replies, `pong` the requests.
    assert!(serial.contains("[mine@c0] hello from mine (guest 0) on core 0"), "{serial}");
    assert!(serial.contains(
        "[mine@c0] exchanged 100 messages with my peer, every reply checked; 100 kept on a "
    ));
    assert!(serial.contains("[echo@c1] bench pong mode=poll n=100 "), "{serial}");
    assert!(serial.contains("workload \"main\""), "the built-in kernel ran the new guest?");
    let link = r.channels.iter().find(|c| c.name == "link").unwrap();
    assert_eq!((link.a_sent, link.b_received, link.b_sent, link.a_received), (100, 100, 100, 100));
}

/// Compiles `c` with the system C compiler and the guest runtime's linker script.
fn cc(dir: &Path, out: &str, c: &str, extra: &[&str]) {
    let src = dir.join(format!("{out}.c"));
    std::fs::write(&src, c).unwrap();
    let script = xtask::workspace_root().join("guestkernel/linker.ld");
    let ok = Command::new("cc")
        .args(["-ffreestanding", "-nostdlib", "-static", "-no-pie", "-fno-pic", "-O1"])
        .arg(format!("-Wl,-T,{}", script.display()))
        .args(extra)
        .arg(&src)
        .arg("-o")
        .arg(dir.join(out))
        .status()
        .expect("cc runs")
        .success();
    assert!(ok, "cc {out}");
}

#[test]
fn bad_kernels_are_refused_before_boot_with_located_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let tiny = "void guest_start(void) { for (;;) __asm__ volatile(\"hlt\"); }\n";
    cc(d, "k32.elf", tiny, &["-m32"]);
    cc(d, "entry.elf", tiny, &["-Wl,-e,0x300000"]);
    let big = "volatile char big[6 << 20];\n\
               void guest_start(void) { big[0] = 1; for (;;) __asm__ volatile(\"hlt\"); }\n";
    cc(d, "big.elf", big, &[]);
    std::fs::write(d.join("script.elf"), "#!/bin/sh\necho not a kernel\n").unwrap();
    std::fs::create_dir(d.join("adir")).unwrap();
    let mut config = String::from("[machine]\ncpus = 8\nmemory_mib = 512\n");
    let kernels = ["script.elf", "k32.elf", "big.elf", "entry.elf", "missing.elf", "adir"];
    for (i, k) in kernels.iter().enumerate() {
        config += &format!(
            "\n[[guest]]\nname = \"g{i}\"\ncore = {i}\nmemory_mib = 4\nkernel = \"{k}\"\n"
        );
    }
    // And one guest on the built-in kernel, which is not in question.
    config += "\n[[guest]]\nname = \"g6\"\ncore = 6\nmemory_mib = 4\nworkload = \"hello\"\n";
    let path = d.join("bad.toml");
    std::fs::write(&path, &config).unwrap();
    let shown = path.display().to_string();
    let started = std::time::Instant::now();
    let run = xtask(&["run", "--quiet", "--config", &shown]);
    let err = text(&run.stderr);
    assert_eq!(run.status.code(), Some(xtask::exit::CONFIG as i32), "{err}");
    // Guest i's `kernel` is on line 9 + 6 i, column 10.
    let at =
        |i: usize| format!("{shown}:{}:10: guest[{i}].kernel: file `{}`", 9 + 6 * i, kernels[i]);
    let expected = [
        "not an ELF file (it starts with \"#!/b\"",
        "a 32-bit ELF (ELFCLASS32): a guest kernel is a 64-bit ELF",
        "ends past the partition (4 MiB, up to 0x400000)",
        "entry point 0x300000 is outside every executable segment",
        "missing.elf: No such file or directory",
        "adir is a directory, not an ELF file",
    ];
    for (i, what) in expected.iter().enumerate() {
        let line = err.lines().find(|l| l.contains(&at(i))).unwrap_or_else(|| {
            panic!("no error for guest {i} at `{}` in:\n{err}", at(i));
        });
        assert!(line.contains(what), "guest {i}: `{line}` does not say `{what}`");
    }
    assert!(err.contains("6 error(s) in the config"), "{err}");
    // Refused before anything was built or booted: no emulator, no run folder.
    assert!(!err.contains("firmware") && !text(&run.stdout).contains("outcome"), "{err}");
    assert!(started.elapsed().as_secs() < 60, "took {:?}", started.elapsed());
}

/// Runs `cargo xtask check PATH` and returns its exit code and stderr, failing if it takes
/// more than 60 s (a check that blocks on a FIFO is killed, and the test fails).
fn check_promptly(path: &Path) -> (Option<i32>, String) {
    let mut child = Command::new(xtask_binary())
        .args(["check", path.to_str().unwrap()])
        .current_dir(xtask::workspace_root())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("xtask runs");
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if started.elapsed().as_secs() > 60 {
            child.kill().unwrap();
            let _ = child.wait();
            panic!("`cargo xtask check {}` blocked for 60 s", path.display());
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    (status.code(), err)
}

/// Kernel and config paths that are not regular files of bounded size are refused at once
/// (config errors, exit code 3) without reading them: a FIFO (which would block the read
/// for ever), a symlink to `/dev/zero` (endless), an oversized (sparse) file, and a config
/// that is itself a FIFO.
#[test]
fn unreadable_kernel_and_config_paths_are_refused_promptly() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let mkfifo = |p: &Path| assert!(Command::new("mkfifo").arg(p).status().unwrap().success());
    mkfifo(&d.join("fifo.elf"));
    std::os::unix::fs::symlink("/dev/zero", d.join("zero.elf")).unwrap();
    std::fs::File::create(d.join("huge.elf")).unwrap().set_len(17 << 20).unwrap();
    let kernels = ["fifo.elf", "zero.elf", "huge.elf"];
    let mut config = String::from("[machine]\ncpus = 3\nmemory_mib = 256\n");
    for (i, k) in kernels.iter().enumerate() {
        config += &format!(
            "\n[[guest]]\nname = \"g{i}\"\ncore = {i}\nmemory_mib = 4\nkernel = \"{k}\"\n"
        );
    }
    let path = d.join("files.toml");
    std::fs::write(&path, &config).unwrap();
    let (code, err) = check_promptly(&path);
    assert_eq!(code, Some(xtask::exit::CONFIG as i32), "{err}");
    for what in [
        "fifo.elf is a FIFO, not an ELF file",
        "zero.elf is a character device, not an ELF file",
        "huge.elf is 17825792 bytes: larger than the 16 MiB for an ELF file",
    ] {
        assert!(err.contains(what), "missing `{what}` in:\n{err}");
    }
    assert!(err.contains("3 error(s) in the config"), "{err}");
    let fifo = d.join("config.toml");
    mkfifo(&fifo);
    let (code, err) = check_promptly(&fifo);
    assert_eq!(code, Some(xtask::exit::CONFIG as i32), "{err}");
    assert!(err.contains("config.toml is a FIFO, not a config file"), "{err}");
}

#[test]
fn the_c_example_guest_talks_to_a_rust_guest() {
    c_example_guest("bochs");
}

/// Issue 24: the same on QEMU/SVM: the C guest picks VMMCALL from the CPU vendor, the Rust
/// guest by its probe; both speak the same ABI to the SVM backend.
#[test]
fn the_c_example_guest_talks_to_a_rust_guest_on_qemu_svm() {
    let serial = c_example_guest("qemu");
    assert!(serial.contains("[c0] backend: svm"), "{serial}");
}

fn c_example_guest(emulator: &str) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let example = xtask::workspace_root().join("examples/c-guest");
    // Built next to a copy of its config (kernel = "guest.elf" is relative to the config).
    make_c_guest(&tmp.path().join("guest.elf"));
    let config = tmp.path().join("mkvisor.toml");
    std::fs::copy(example.join("mkvisor.toml"), &config).unwrap();
    let (r, serial) = boot_ok_on(&config, emulator);
    for name in ["cguest", "echo"] {
        let g = r.guests.iter().find(|g| g.name == name).unwrap();
        assert_eq!((g.state.as_str(), g.exit_status), ("exited", 0), "{g:?}");
    }
    // The C side checked every reply; `pong` (Rust) checked every message and exits 1 on
    // the first wrong one.
    assert!(serial.contains("[cguest@c0] hello from C: cguest (guest 0) on core 0"), "{serial}");
    assert!(serial
        .contains("[cguest@c0] C guest: 100 messages exchanged over link, every reply checked"));
    assert!(serial.contains("[echo@c1] bench pong mode=poll n=100 "), "{serial}");
    let link = r.channels.iter().find(|c| c.name == "link").unwrap();
    assert_eq!((link.a_sent, link.b_received, link.b_sent, link.a_received), (100, 100, 100, 100));
    serial
}

#[test]
fn different_guests_run_different_kernels_in_one_machine() {
    let tmp = tempfile::tempdir().unwrap();
    make_c_guest(&tmp.path().join("guest.elf"));
    new_guest(tmp.path().join("rusty"));
    let guest = |name: &str, core: u32, what: &str, n: u32| {
        format!("\n[[guest]]\nname = \"{name}\"\ncore = {core}\nmemory_mib = 8\n{what}\nargs = {{ n = {n} }}\n")
    };
    let config = tmp.path().join("four.toml");
    let text = [
        "[machine]\ncpus = 4\nmemory_mib = 256\n".to_string(),
        guest("cguest", 0, "kernel = \"guest.elf\"", 50),
        guest("rusty", 1, "kernel = { crate = \"rusty\" }", 60),
        guest("echo-c", 2, "workload = \"pong\"", 50),
        guest("echo-r", 3, "workload = \"pong\"", 60),
        "\n[[channel]]\nname = \"to-c\"\nbetween = [\"cguest\", \"echo-c\"]\nslots = 16\n".into(),
        "\n[[channel]]\nname = \"to-r\"\nbetween = [\"rusty\", \"echo-r\"]\nslots = 16\n".into(),
    ]
    .concat();
    std::fs::write(&config, text).unwrap();
    let (r, serial) = boot_ok(&config);
    for g in &r.guests {
        assert_eq!((g.state.as_str(), g.exit_status), ("exited", 0), "{g:?}");
    }
    assert_eq!(r.guests.len(), 4);
    // Each guest ran its own kernel: three different images, each saying what it is.
    let ranges: Vec<&str> = ["cguest", "rusty", "echo-c"].map(|g| kernel_range(&serial, g)).into();
    assert!(
        ranges[0] != ranges[1] && ranges[1] != ranges[2] && ranges[0] != ranges[2],
        "{ranges:?}"
    );
    assert_eq!(kernel_range(&serial, "echo-c"), kernel_range(&serial, "echo-r"));
    // The report names each kernel it booted, with the guests that ran it.
    let kernels: Vec<(&str, Option<&str>, Vec<&str>)> = r
        .meta
        .kernels
        .iter()
        .map(|k| {
            (k.source.as_str(), k.spec.as_deref(), k.guests.iter().map(|g| g.as_str()).collect())
        })
        .collect();
    assert_eq!(
        kernels,
        [
            ("builtin", None, vec!["echo-c", "echo-r"]),
            ("file", Some("guest.elf"), vec!["cguest"]),
            ("crate", Some("rusty"), vec!["rusty"]),
        ]
    );
    for k in &r.meta.kernels {
        let bytes = std::fs::read(&k.path).unwrap();
        assert_eq!(
            (k.size, k.sha256.as_str()),
            (bytes.len() as u64, xtask::meta::sha256_hex(&bytes).as_str())
        );
        // The entry point the hypervisor's loader found in it.
        let line = serial.lines().find(|l| l.contains(&format!("] guest {} (id ", k.guests[0])));
        let entry = line.and_then(|l| l.split("entry 0x").nth(1)?.split(',').next());
        let entry = entry.and_then(|e| u64::from_str_radix(e, 16).ok());
        assert_eq!(k.entry, entry, "{k:?}");
    }
    assert!(
        r.meta.kernels[2].path.ends_with("target/x86_64-unknown-none/release/rusty"),
        "{:?}",
        r.meta.kernels[2]
    );
    assert!(serial.contains("[cguest@c0] C guest: 50 messages exchanged over to-c"), "{serial}");
    assert!(serial.contains("[rusty@c1] exchanged 60 messages with my peer"), "{serial}");
    assert!(serial.contains("[echo-c@c2] bench pong mode=poll n=50 "), "{serial}");
    assert!(serial.contains("[echo-r@c3] bench pong mode=poll n=60 "), "{serial}");
}
