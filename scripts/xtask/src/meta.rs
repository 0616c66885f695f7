// SPDX-License-Identifier: MIT OR Apache-2.0
//! A report's metadata ([`Meta`], also reached as `report::Meta`): the tool and tree that
//! ran, the config and the guest kernels as booted, the host and its load, the date. Owns
//! those types; reads git, `/proc`, CPUID, uname, the kernel files. May call `build`,
//! `config`, `files` (never `report`, which embeds these types).
//! Called by `run` once per run; never fails a run (what cannot be read is `None` or empty).

use crate::build::Images;
use crate::config::{Config, KernelSpec};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::Path;
use std::process::Command;

/// Where a report comes from: enough to repeat the run and to tell two runs apart.
#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone, Default, PartialEq)]
pub struct Meta {
    /// `cargo xtask --version`.
    pub tool_version: String,
    /// The commit of the tree that was built (`git rev-parse HEAD`), if it is a git tree.
    pub git_commit: Option<String>,
    /// Whether the tree had uncommitted changes (`git status --porcelain`).
    pub git_dirty: Option<bool>,
    /// The config booted: path, SHA-256 and contents (absent for a cores-only run).
    pub config: Option<ConfigMeta>,
    /// Every guest kernel the run booted (the built-in one if a guest runs it, then the
    /// config's own in module order), with the guests that run it.
    #[serde(default)]
    pub kernels: Vec<KernelMeta>,
    /// The command that ran it, one line a POSIX shell reads back into the same arguments
    /// (words quoted where needed): `cargo xtask run --config 'my configs/a.toml'`, or the
    /// program that called the library (a test binary). Paste it in `working_dir`. Older
    /// reports held a list of words; they read as the line.
    #[serde(deserialize_with = "command_line_from_either")]
    #[schemars(with = "String")]
    pub command_line: String,
    /// The directory the command ran in (relative paths in it are from there).
    #[serde(default)]
    pub working_dir: Option<String>,
    /// The emulator's own version line, when it says.
    pub emulator_version: Option<String>,
    pub host: Host,
    /// When the run started, RFC 3339, UTC.
    pub date_utc: String,
}

/// The config of a run, as booted.
#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone, Default, PartialEq)]
pub struct ConfigMeta {
    pub path: String,
    /// SHA-256 of the file's bytes, hex.
    pub sha256: String,
    pub contents: String,
}

/// One guest kernel of a run, as booted.
#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelMeta {
    /// `builtin` (the `guestkernel` of this tree), `file` (`kernel = "x.elf"`) or `crate`
    /// (`kernel = { crate = "dir" }`, built by `cargo xtask`).
    pub source: String,
    /// As the config names it (a file or a crate directory, relative to the config);
    /// absent for the built-in kernel.
    pub spec: Option<String>,
    /// The ELF file booted.
    pub path: String,
    /// SHA-256 of the ELF's bytes, hex.
    pub sha256: String,
    /// Its size in bytes.
    pub size: u64,
    /// Its entry point (guest-physical), if the file reads as an ELF.
    pub entry: Option<u64>,
    /// The guests that run it, in config order.
    pub guests: Vec<String>,
}

/// The machine the emulator ran on, and how busy it was.
#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone, Default, PartialEq)]
pub struct Host {
    pub hostname: String,
    /// Kernel name and release (`uname -sr`).
    pub os: String,
    /// CPUID brand string.
    pub cpu: String,
    /// CPUs this process may use.
    pub cpus: u32,
    /// `/proc/loadavg` at the start of the run: 1, 5 and 15 minutes.
    pub load_average: [f64; 3],
}

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

/// One kernel file as booted: its hash, size and entry point.
pub fn kernel(source: &str, spec: Option<String>, path: &Path, guests: Vec<String>) -> KernelMeta {
    let bytes = std::fs::read(path).unwrap_or_default();
    let entry =
        elf::ElfBytes::<elf::endian::AnyEndian>::minimal_parse(&bytes).ok().map(|f| f.ehdr.e_entry);
    KernelMeta {
        source: source.into(),
        spec,
        path: path.display().to_string(),
        sha256: sha256_hex(&bytes),
        size: bytes.len() as u64,
        entry,
        guests,
    }
}

/// The guest kernels a run boots: the built-in one (`images.guest`) if a guest of the
/// config runs it, then each of the config's own (`images.kernels`, blob index order),
/// each with the guests that run it. None for a cores-only run.
pub fn kernels(images: &Images, config: Option<&Config>) -> Vec<KernelMeta> {
    let Some(config) = config else { return vec![] };
    let users = |index: u16| -> Vec<String> {
        let on = config.guests.iter().filter(|g| config.kernel_index(g) == index);
        on.map(|g| g.name.get_ref().clone()).collect()
    };
    let mut out = vec![];
    let builtin = users(0);
    if !builtin.is_empty() {
        out.push(kernel("builtin", None, &images.guest, builtin));
    }
    for (i, (spec, path)) in config.kernels().into_iter().zip(&images.kernels).enumerate() {
        let (source, spec) = match spec {
            KernelSpec::File(p) => ("file", p.clone()),
            KernelSpec::Crate { krate } => ("crate", krate.clone()),
        };
        out.push(kernel(source, Some(spec), path, users(i as u16 + 1)));
    }
    out
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
        kernels: vec![],
        command_line: command_line(std::env::args()),
        working_dir: std::env::current_dir().ok().map(|d| d.display().to_string()),
        emulator_version: None,
        host: host(),
        date_utc: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    }
}

/// `word` as a POSIX shell reads it back (kept in `exit`, which prints commands too).
pub use crate::exit::shell_quote;

/// The process's arguments as one shell line; the tool itself (started by cargo's alias
/// as `target/.../xtask`) as `cargo xtask`.
pub fn command_line(args: impl IntoIterator<Item = String>) -> String {
    let mut args = args.into_iter();
    let program = args.next().unwrap_or_default();
    let is_tool = Path::new(&program).file_name().is_some_and(|n| n == "xtask");
    let first = if is_tool { "cargo xtask".to_string() } else { shell_quote(&program) };
    std::iter::once(first).chain(args.map(|a| shell_quote(&a))).collect::<Vec<_>>().join(" ")
}

/// `command_line` as written now (a string) or by reports before it was one (a list).
fn command_line_from_either<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        Line(String),
        Words(Vec<String>),
    }
    Ok(match Either::deserialize(d)? {
        Either::Line(l) => l,
        Either::Words(w) => command_line(w),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_reads_back_through_a_shell() {
        let args: Vec<String> = [
            "/w/target/release/xtask",
            "run",
            "--config",
            "my configs/it's.toml",
            "--cmdline",
            "cpus=2 trace",
            "",
            "$HOME `id` \"q\" \\ * ? ; & | < > ( ) # ~ !",
            "new\nline",
            "plain-1.5_x/y:z=a,b+c@d%e",
        ]
        .map(String::from)
        .to_vec();
        let line = command_line(args.clone());
        assert!(line.starts_with("cargo xtask run --config 'my configs/it'\\''s.toml' "), "{line}");
        assert!(line.ends_with(" plain-1.5_x/y:z=a,b+c@d%e"), "{line}");
        // Paste it into a shell whose `cargo` prints its arguments, NUL-separated.
        let script = format!("cargo() {{ printf '%s\\0' \"$@\"; }}\n{line}");
        let out = std::process::Command::new("sh").args(["-c", &script]).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let mut got: Vec<String> =
            String::from_utf8(out.stdout).unwrap().split('\0').map(String::from).collect();
        assert_eq!(got.pop().as_deref(), Some(""), "a NUL after the last word");
        assert_eq!(got[0], "xtask");
        assert_eq!(got[1..], args[1..]);
        // A program that is not the tool keeps its path, quoted.
        assert_eq!(command_line(["/t/a b".to_string()]), "'/t/a b'");
        // Reports from before (a list of words) read as the line.
        let old = serde_json::json!(["/w/target/release/xtask", "run", "--report", "a b.json"]);
        let m: String = command_line_from_either(old).unwrap();
        assert_eq!(m, "cargo xtask run --report 'a b.json'");
    }

    #[test]
    fn sha256_is_the_standard_one() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    /// The first 64 bytes of an x86-64 ELF64 executable entered at `entry`, no segments.
    fn elf_header(entry: u64) -> Vec<u8> {
        let mut b = vec![0u8; 64];
        b[..4].copy_from_slice(b"\x7fELF");
        (b[4], b[5], b[6]) = (2, 1, 1);
        b[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        b[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
        b[20..24].copy_from_slice(&1u32.to_le_bytes());
        b[24..32].copy_from_slice(&entry.to_le_bytes());
        b[52..54].copy_from_slice(&64u16.to_le_bytes());
        b[54..56].copy_from_slice(&56u16.to_le_bytes());
        b
    }

    #[test]
    fn every_kernel_a_run_boots_is_identified_with_its_guests() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        let guest = |name: &str, core: u32, what: &str| {
            format!("\n[[guest]]\nname = \"{name}\"\ncore = {core}\nmemory_mib = 4\n{what}\n")
        };
        let text = [
            "[machine]\ncpus = 4\nmemory_mib = 256\n".to_string(),
            guest("a", 0, "kernel = \"k.elf\""),
            guest("b", 1, "workload = \"hello\""),
            guest("c", 2, "kernel = { crate = \"g\" }"),
            guest("d", 3, "kernel = \"k.elf\""),
        ]
        .concat();
        std::fs::write(d.join("m.toml"), text).unwrap();
        let config = crate::config::load(&d.join("m.toml")).unwrap().config;
        let (builtin, k, g) =
            (elf_header(0x10_0000), elf_header(0x10_2040), b"not an ELF".to_vec());
        for (f, bytes) in [("builtin.elf", &builtin), ("k.elf", &k), ("g.elf", &g)] {
            std::fs::write(d.join(f), bytes).unwrap();
        }
        let images = Images {
            hypervisor: d.join("mkvisor"),
            guest: d.join("builtin.elf"),
            kernels: vec![d.join("k.elf"), d.join("g.elf")],
        };
        let ks = kernels(&images, Some(&config));
        let brief: Vec<_> = ks
            .iter()
            .map(|k| (k.source.as_str(), k.spec.as_deref(), k.entry, k.size, k.guests.join(" ")))
            .collect();
        assert_eq!(
            brief,
            [
                ("builtin", None, Some(0x10_0000), 64, "b".to_string()),
                ("file", Some("k.elf"), Some(0x10_2040), 64, "a d".to_string()),
                ("crate", Some("g"), None, 10, "c".to_string()),
            ]
        );
        assert_eq!(ks[1].sha256, sha256_hex(&k));
        assert_eq!(ks[1].path, d.join("k.elf").display().to_string());
        assert_ne!(ks[0].sha256, ks[1].sha256, "the entry point differs, so does the hash");
        // Cores only: no kernel.
        assert!(kernels(&images, None).is_empty());
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
