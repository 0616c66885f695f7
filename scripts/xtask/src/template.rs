// SPDX-License-Identifier: MIT OR Apache-2.0
//! `cargo xtask new-guest DIR`: a ready guest crate (files under `scripts/xtask/template/`)
//! with a hello-world entry that talks to a built-in guest, a config that runs the two with
//! a channel between them, a README, and the workspace's `Cargo.lock`. May call only the
//! file system.

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

const CARGO_TOML: &str = include_str!("../template/Cargo.toml.in");
const MAIN_RS: &str = include_str!("../template/main.rs");
const CONFIG: &str = include_str!("../template/mkvisor.toml");
const README: &str = include_str!("../template/README.md");

/// The crate name for a directory: its last component in lower case, anything but letters,
/// digits, `-` and `_` turned into `-` (`guest` if nothing is left or it starts oddly).
pub fn crate_name(dir: &Path) -> String {
    let base = dir.file_name().map(|n| n.to_string_lossy().to_lowercase()).unwrap_or_default();
    let name: String = base
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' { c } else { '-' })
        .collect();
    match name.chars().next() {
        Some(c) if c.is_ascii_alphabetic() => name,
        _ => format!("guest{name}"),
    }
}

/// Writes the template into `dir` (created; it must not exist or be empty). Returns the
/// files written.
pub fn new_guest(dir: &Path) -> Result<Vec<PathBuf>> {
    if dir.exists() && std::fs::read_dir(dir).map_or(true, |mut d| d.next().is_some()) {
        return Err(crate::exit::coded(
            crate::exit::USAGE,
            anyhow::anyhow!(
                "{:?} already exists and is not an empty directory",
                dir.display().to_string()
            ),
        ));
    }
    std::fs::create_dir_all(dir.join("src"))
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let runtime = crate::workspace_root().join("guestkernel");
    // Relative to the crate when the two share more than the root (the pair can move
    // together), else absolute. A TOML string, quoted and escaped by the toml crate.
    let runtime = relative(dir, &runtime).unwrap_or(runtime);
    let runtime = toml::Value::String(runtime.display().to_string()).to_string();
    // `cargo xtask` from the crate's own directory: the clone's tool, through an alias.
    let manifest = crate::workspace_root().join("Cargo.toml").display().to_string();
    let alias = toml::Value::Array(
        ["run", "--quiet", "--release", "--manifest-path", &manifest, "--package", "xtask", "--"]
            .iter()
            .map(|s| toml::Value::String(s.to_string()))
            .collect(),
    );
    std::fs::create_dir_all(dir.join(".cargo"))
        .with_context(|| format!("cannot create {}", dir.join(".cargo").display()))?;
    let name = crate_name(dir);
    let shown = dir.display().to_string();
    let fill = |t: &str| {
        t.replace("@NAME@", &name).replace("@GUESTKERNEL@", &runtime).replace("@DIR@", &shown)
    };
    let files = [
        ("Cargo.toml", fill(CARGO_TOML)),
        ("src/main.rs", fill(MAIN_RS)),
        ("mkvisor.toml", fill(CONFIG)),
        ("README.md", fill(README)),
        (".gitignore", "/target\n".to_string()),
        (
            ".cargo/config.toml",
            format!(
                "# `cargo xtask run --config mkvisor.toml` from this directory: the mkvisor \
                 clone's tool.\n[alias]\nxtask = {alias}\n"
            ),
        ),
    ];
    // The workspace's lock file pins the runtime's dependencies to the versions it is
    // tested with (cargo drops what the guest does not use); it also lets the first build
    // work offline when those crates are already in cargo's cache.
    let lock = std::fs::read_to_string(crate::workspace_root().join("Cargo.lock"))
        .context("cannot read the workspace's Cargo.lock")?;
    let files = files.into_iter().chain([("Cargo.lock", lock)]);
    let mut written = Vec::new();
    for (path, text) in files {
        let p = dir.join(path);
        std::fs::write(&p, text).with_context(|| format!("cannot write {}", p.display()))?;
        written.push(p);
    }
    Ok(written)
}

/// `to` relative to directory `from` (both existing), if they share more than the root.
fn relative(from: &Path, to: &Path) -> Option<PathBuf> {
    let (f, t) = (from.canonicalize().ok()?, to.canonicalize().ok()?);
    let common = f.components().zip(t.components()).take_while(|(a, b)| a == b).count();
    if common < 2 {
        return None;
    }
    let mut r = PathBuf::new();
    for _ in f.components().skip(common) {
        r.push("..");
    }
    for c in t.components().skip(common) {
        r.push(c);
    }
    Some(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crate_names_are_valid() {
        assert_eq!(crate_name(Path::new("/tmp/My Guest")), "my-guest");
        assert_eq!(crate_name(Path::new("rel/hello_world")), "hello_world");
        assert_eq!(crate_name(Path::new("/tmp/.tmpA1b2")), "guest-tmpa1b2");
        assert_eq!(crate_name(Path::new("/")), "guest");
    }

    #[test]
    fn the_template_is_a_crate_and_a_valid_config() {
        let dir = std::env::temp_dir().join(format!("mkvisor-template-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let files = new_guest(&dir).unwrap();
        assert_eq!(files.len(), 7);
        assert!(std::fs::read_to_string(dir.join("Cargo.lock")).unwrap().contains("\"log\""));
        let manifest: toml::Value =
            toml::from_str(&std::fs::read_to_string(dir.join("Cargo.toml")).unwrap()).unwrap();
        let path = manifest["dependencies"]["guestkernel"]["path"].as_str().unwrap();
        assert!(dir.join(path).join("src/lib.rs").is_file(), "{path}");
        let alias: toml::Value =
            toml::from_str(&std::fs::read_to_string(dir.join(".cargo/config.toml")).unwrap())
                .unwrap();
        assert_eq!(alias["alias"]["xtask"][4].as_str(), Some(&*manifest_of_this_clone()));
        let c = crate::config::load(&dir.join("mkvisor.toml")).unwrap();
        assert_eq!(c.config.kernels().len(), 1);
        assert!(!std::fs::read_to_string(dir.join("README.md")).unwrap().contains('@'));
        // A second time into the same directory is refused.
        assert!(new_guest(&dir).unwrap_err().to_string().contains("already exists"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn manifest_of_this_clone() -> String {
        crate::workspace_root().join("Cargo.toml").display().to_string()
    }

    #[test]
    fn relative_paths_climb_to_the_common_ancestor() {
        let base = std::env::temp_dir().join(format!("mkvisor-rel-{}", std::process::id()));
        std::fs::create_dir_all(base.join("a/b")).unwrap();
        std::fs::create_dir_all(base.join("c")).unwrap();
        assert_eq!(relative(&base.join("a/b"), &base.join("c")), Some(PathBuf::from("../../c")));
        assert_eq!(relative(Path::new("/"), &base), None, "only the root in common");
        std::fs::remove_dir_all(&base).unwrap();
    }
}
