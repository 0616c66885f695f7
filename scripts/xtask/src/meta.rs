// SPDX-License-Identifier: MIT OR Apache-2.0
//! A report's metadata (`report::Meta`): the tool and tree that ran, the config as booted,
//! the host and its load, the date. Owns nothing but reads: git, `/proc`, CPUID, uname.
//! Called by `run` once per run; never fails a run (what cannot be read is `None` or empty).

use crate::report::{ConfigMeta, Host, Meta};
use sha2::{Digest, Sha256};
use std::path::Path;
use std::process::Command;

/// SHA-256 of `bytes`, lower-case hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// The config as booted: its path, hash and contents.
pub fn config(path: &Path) -> Option<ConfigMeta> {
    let bytes = crate::files::read(path, crate::files::MAX_CONFIG_BYTES, "a config file").ok()?;
    Some(ConfigMeta {
        path: path.display().to_string(),
        sha256: sha256_hex(&bytes),
        contents: String::from_utf8_lossy(&bytes).into_owned(),
    })
}

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(crate::workspace_root())
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The host: name, kernel, CPU brand, usable CPUs, load average.
pub fn host() -> Host {
    let hostname =
        nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_default();
    let os = nix::sys::utsname::uname()
        .map(|u| format!("{} {}", u.sysname().to_string_lossy(), u.release().to_string_lossy()))
        .unwrap_or_default();
    let cpu = raw_cpuid::CpuId::new()
        .get_processor_brand_string()
        .map(|b| b.as_str().trim().to_string())
        .unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get() as u32);
    Host { hostname, os, cpu, cpus, load_average: load_average() }
}

/// `/proc/loadavg`'s first three figures (zeros where it cannot be read).
pub fn load_average() -> [f64; 3] {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut v = text.split_whitespace().map(|w| w.parse().unwrap_or(0.0));
    [v.next().unwrap_or(0.0), v.next().unwrap_or(0.0), v.next().unwrap_or(0.0)]
}

/// The emulator's version line from its own output (Bochs prints it at start), else from
/// `--version` (QEMU).
pub fn emulator_version(emulator: &str, output: &str) -> Option<String> {
    if let Some(l) = output.lines().find(|l| l.contains("Bochs x86 Emulator")) {
        return Some(l.trim().trim_matches('=').trim().to_string());
    }
    if emulator.starts_with("qemu") {
        let out = Command::new("qemu-system-x86_64").arg("--version").output().ok()?;
        return String::from_utf8_lossy(&out.stdout).lines().next().map(str::to_string);
    }
    None
}

/// Everything but the emulator version (known only once it ran), at the start of a run.
pub fn collect(config_path: Option<&Path>) -> Meta {
    Meta {
        tool_version: env!("CARGO_PKG_VERSION").to_string(),
        git_commit: git(&["rev-parse", "HEAD"]),
        git_dirty: git(&["status", "--porcelain", "--untracked-files=no"]).map(|s| !s.is_empty()),
        config: config_path.and_then(config),
        command_line: std::env::args().collect(),
        emulator_version: None,
        host: host(),
        date_utc: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_is_the_standard_one() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn metadata_names_tree_config_and_host() {
        let path = crate::workspace_root().join("configs/default.toml");
        let m = collect(Some(&path));
        assert_eq!(m.tool_version, env!("CARGO_PKG_VERSION"));
        assert!(m.git_commit.as_ref().is_some_and(|c| c.len() == 40), "{:?}", m.git_commit);
        let c = m.config.unwrap();
        assert_eq!(c.contents, std::fs::read_to_string(&path).unwrap());
        assert_eq!(c.sha256, sha256_hex(c.contents.as_bytes()));
        assert!(m.host.cpus >= 1 && !m.host.os.is_empty());
        assert!(m.date_utc.ends_with('Z') && m.date_utc.len() == 20, "{}", m.date_utc);
        assert_eq!(
            emulator_version("bochs", "=====\n  Bochs x86 Emulator 2.7\n  Built from\n"),
            Some("Bochs x86 Emulator 2.7".into())
        );
    }
}
