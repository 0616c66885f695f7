// SPDX-License-Identifier: MIT OR Apache-2.0
//! Prerequisites: Debian packages and the Rust target. Each command asks for what it needs;
//! only what is missing is installed, and the tool says what and why.

use anyhow::{bail, Context, Result};
use std::process::Command;

/// A Debian package and why mkvisor needs it.
pub struct Package {
    pub name: &'static str,
    pub why: &'static str,
}

/// Packages to build the ISO.
pub const BUILD: &[Package] = &[
    Package { name: "grub-pc-bin", why: "GRUB's BIOS modules for the boot ISO" },
    Package { name: "grub-common", why: "grub-mkrescue" },
    Package { name: "xorriso", why: "ISO 9660 image writer for grub-mkrescue" },
    Package { name: "mtools", why: "FAT image tools for grub-mkrescue" },
];
/// Packages to boot in Bochs.
pub const BOCHS: &[Package] = &[
    Package { name: "bochs", why: "the VT-x emulator mkvisor is tested on" },
    Package { name: "bochs-term", why: "Bochs's headless text display (no TCP port per run)" },
    Package { name: "bochsbios", why: "Bochs BIOS" },
    Package { name: "vgabios", why: "Bochs VGA BIOS" },
];
/// Packages the tests need besides: the C example guest is built with make and the
/// system C compiler (which also checks the C header's static asserts).
pub const TEST: &[Package] = &[
    Package { name: "make", why: "builds the C example guest in the tests" },
    Package { name: "gcc", why: "the system C compiler for the C guest and the header check" },
    Package {
        name: "memcached",
        why: "the reference server `cargo xtask load`'s client is tested on",
    },
];
/// Packages to boot in QEMU.
pub const QEMU: &[Package] = &[Package { name: "qemu-system-x86", why: "QEMU (the no-VT-x path)" }];

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| {
            o.status.success()
                && String::from_utf8_lossy(&o.stdout).contains("install ok installed")
        })
        .unwrap_or(false)
}

fn run(cmd: &mut Command) -> Result<()> {
    crate::exit::running(cmd);
    let status = cmd.status().with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

/// Installs the missing packages among `sets`.
///
/// Parallel callers (the system tests) take turns on a lock file and check again once they
/// hold it, so apt runs once.
pub fn ensure_packages(sets: &[&[Package]]) -> Result<()> {
    let missing = || -> Vec<&Package> {
        sets.iter().flat_map(|s| s.iter()).filter(|p| !installed(p.name)).collect()
    };
    if missing().is_empty() {
        return Ok(());
    }
    let dir = crate::target_dir().join("xtask");
    std::fs::create_dir_all(&dir)?;
    let lock = std::fs::File::create(dir.join("setup.lock"))?;
    lock.lock().context("locking target/xtask/setup.lock")?;
    let missing = missing();
    if missing.is_empty() {
        return Ok(());
    }
    for p in &missing {
        crate::exit::note(format_args!("setup: installing {} ({})", p.name, p.why));
    }
    let root = nix::unistd::geteuid().is_root();
    let apt = |args: &[&str]| {
        let mut c = if root {
            Command::new("apt-get")
        } else {
            let mut c = Command::new("sudo");
            c.arg("apt-get");
            c
        };
        // Another apt (a second checkout's setup, unattended upgrades) may hold dpkg's lock:
        // wait for it rather than fail.
        c.args(["-o", "DPkg::Lock::Timeout=600"])
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive");
        c
    };
    run(apt(&["update", "-q"]).stdout(std::process::Stdio::null()))?;
    let mut install = apt(&["install", "-y", "-q", "--no-install-recommends"]);
    install.args(missing.iter().map(|p| p.name));
    install.stdout(std::process::Stdio::null());
    run(&mut install).context("installing Debian packages (run `cargo xtask setup` as root)")
}

/// Installs the x86_64-unknown-none target if rustup lacks it.
pub fn ensure_rust_target() -> Result<()> {
    let root = crate::workspace_root();
    let out = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .current_dir(&root)
        .output()
        .context("rustup is needed to install the x86_64-unknown-none target")?;
    if String::from_utf8_lossy(&out.stdout).lines().any(|l| l.trim() == "x86_64-unknown-none") {
        return Ok(());
    }
    eprintln!(
        "setup: installing Rust target x86_64-unknown-none (bare-metal hypervisor and guest)"
    );
    run(Command::new("rustup").args(["target", "add", "x86_64-unknown-none"]).current_dir(&root))
}

/// Installs rustfmt and clippy if rustup lacks them (`cargo xtask test` runs both; with
/// RUSTUP_AUTO_INSTALL=0 nothing installs what rust-toolchain.toml lists).
pub fn ensure_rust_components() -> Result<()> {
    let root = crate::workspace_root();
    let out = Command::new("rustup")
        .args(["component", "list", "--installed"])
        .current_dir(&root)
        .output()
        .context("rustup is needed to install rustfmt and clippy")?;
    let have = String::from_utf8_lossy(&out.stdout).into_owned();
    for c in ["rustfmt", "clippy"] {
        if !have.lines().any(|l| l.starts_with(c)) {
            crate::exit::note(format_args!(
                "setup: installing Rust component {c} (cargo xtask test lints with it)"
            ));
            run(Command::new("rustup").args(["component", "add", c]).current_dir(&root))?;
        }
    }
    Ok(())
}

/// Everything, for `cargo xtask setup`.
pub fn all() -> Result<()> {
    ensure_rust_target()?;
    ensure_rust_components()?;
    ensure_packages(&[BUILD, BOCHS, QEMU, TEST])?;
    crate::exit::note("setup: everything is in place");
    Ok(())
}
