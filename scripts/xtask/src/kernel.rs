// SPDX-License-Identifier: MIT OR Apache-2.0
//! Guest kernels a config names (`kernel = "file.elf"` or `kernel = { crate = "dir" }` on a
//! `[[guest]]`): resolving them relative to the config file, building guest crates for the
//! guest target with the runtime's recipe ([`guest_build`]), and checking every ELF against
//! the partition of every guest that runs it before anything boots. Every problem is a
//! config error located at the guest's `kernel` (file:line:column). The checks are the
//! hypervisor's own (`hypervisor/src/instance/loader.rs`), which makes them again at launch.
//!
//! May call `config` (the config and its located errors), `build` (the target name), `files`
//! (reading a kernel file), cargo.

use crate::config::{Compiled, ConfigError, ConfigErrors, KernelSpec};
use anyhow::{bail, Context, Result};
use elf::endian::AnyEndian;
use elf::{abi, ElfBytes};
use std::path::{Path, PathBuf};
use std::process::Command;
use vmcall_proto::config::MAX_KERNEL_BYTES;
use vmcall_proto::guest::KERNEL_BASE;

/// Loadable segments the hypervisor's loader takes at most.
pub const MAX_SEGMENTS: usize = 8;

/// What [`check_elf`] found in a good kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub entry: u64,
    /// Highest guest-physical address a segment uses (exclusive).
    pub end: u64,
}

/// Checks a kernel image for a partition of `partition` bytes, as the hypervisor's loader
/// does: a little-endian x86-64 ELF64 executable of at most [`MAX_KERNEL_BYTES`], loadable
/// segments identity-addressed, inside the file, not overlapping, between [`KERNEL_BASE`]
/// and the end of the partition, and the entry point inside an executable segment.
pub fn check_elf(image: &[u8], partition: u64) -> Result<Layout, String> {
    if image.len() as u64 > MAX_KERNEL_BYTES {
        return Err(format!(
            "{} bytes: larger than the {} MiB a kernel may have",
            image.len(),
            MAX_KERNEL_BYTES >> 20
        ));
    }
    if !image.starts_with(b"\x7fELF") {
        let head: String =
            image.iter().take(4).map(|&b| (b as char).escape_default().to_string()).collect();
        return Err(format!("not an ELF file (it starts with \"{head}\", not \"\\x7fELF\")"));
    }
    match image.get(abi::EI_CLASS) {
        Some(&abi::ELFCLASS64) => {}
        Some(&abi::ELFCLASS32) => {
            return Err("a 32-bit ELF (ELFCLASS32): a guest kernel is a 64-bit ELF".into())
        }
        _ => return Err("an ELF of unknown class: a guest kernel is a 64-bit ELF".into()),
    }
    if image.get(abi::EI_DATA) != Some(&abi::ELFDATA2LSB) {
        return Err("a big-endian ELF: a guest kernel is little-endian x86-64".into());
    }
    let file = ElfBytes::<AnyEndian>::minimal_parse(image)
        .map_err(|e| format!("a damaged ELF file: {e}"))?;
    let h = &file.ehdr;
    if h.e_machine != abi::EM_X86_64 {
        return Err(format!("an ELF for machine {}, not x86-64", h.e_machine));
    }
    if h.e_type != abi::ET_EXEC {
        return Err(format!(
            "ELF type {} is not an executable (ET_EXEC); position-independent (ET_DYN) kernels \
             are not loaded: link at a fixed address",
            h.e_type
        ));
    }
    let segments = file.segments().ok_or("no program headers")?;
    let mut seen: Vec<(u64, u64, bool)> = Vec::new();
    for ph in segments.iter().filter(|p| p.p_type == abi::PT_LOAD) {
        let (a, size) = (ph.p_paddr, ph.p_memsz);
        let end = a.checked_add(size).ok_or(format!("segment at {a:#x}: size overflows"))?;
        if ph.p_vaddr != a {
            return Err(format!(
                "segment at {a:#x}: virtual address {:#x} differs from the physical one \
                 (guest kernels are identity-mapped)",
                ph.p_vaddr
            ));
        }
        if ph.p_filesz > size {
            return Err(format!("segment at {a:#x}: file size over memory size"));
        }
        if ph.p_offset.checked_add(ph.p_filesz).is_none_or(|e| e > image.len() as u64) {
            return Err(format!("segment at {a:#x}: data beyond the end of the file"));
        }
        if a < KERNEL_BASE {
            return Err(format!(
                "segment {a:#x}..{end:#x} starts below {KERNEL_BASE:#x}, where the partition's \
                 kernel area begins"
            ));
        }
        if end > partition {
            return Err(format!(
                "segment {a:#x}..{end:#x} ends past the partition ({} MiB, up to {partition:#x})",
                partition >> 20
            ));
        }
        if seen.iter().any(|&(s, e, _)| a < e && s < end) {
            return Err(format!("segment {a:#x}..{end:#x} overlaps another segment"));
        }
        seen.push((a, end, ph.p_flags & abi::PF_X != 0));
        if seen.len() > MAX_SEGMENTS {
            return Err(format!("more than {MAX_SEGMENTS} loadable segments"));
        }
    }
    if seen.is_empty() {
        return Err("no loadable segment".into());
    }
    let entry = h.e_entry;
    if !seen.iter().any(|&(s, e, x)| x && s <= entry && entry < e) {
        return Err(format!("entry point {entry:#x} is outside every executable segment"));
    }
    Ok(Layout { entry, end: seen.iter().map(|s| s.1).max().unwrap_or(0) })
}

/// Reads and checks a kernel file (see [`check_elf`]), saying what is wrong with the path:
/// only a regular file of at most [`MAX_KERNEL_BYTES`] is read (see [`crate::files`]).
fn check_file(path: &Path, partition: u64) -> Result<Layout, String> {
    let image = read_kernel(path)?;
    check_elf(&image, partition).map_err(|e| format!("{}: {e}", path.display()))
}

/// The bytes of kernel file `path`, if it is a regular file of at most [`MAX_KERNEL_BYTES`].
pub fn read_kernel(path: &Path) -> Result<Vec<u8>, String> {
    crate::files::read(path, MAX_KERNEL_BYTES, "an ELF file")
}

/// The runtime's build recipe for a guest crate: the guest target, a fixed-address link
/// (no position-independent executable, no dynamic linker) with the runtime's linker
/// script. A guest crate carries none of this; `cargo xtask` passes it.
pub fn guest_build(manifest: &Path, debug: bool) -> Command {
    let script = crate::workspace_root().join("guestkernel/linker.ld");
    let flags = [
        "-Crelocation-model=static".to_string(),
        format!("-Clink-arg=-T{}", script.display()),
        "-Clink-arg=--no-dynamic-linker".to_string(),
    ];
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.args(["build", "--message-format=json-render-diagnostics", "--target"])
        .arg(crate::TARGET)
        .arg("--manifest-path")
        .arg(manifest)
        .env("CARGO_ENCODED_RUSTFLAGS", flags.join("\x1f"))
        // A guest crate is its own workspace, with its own target directory.
        .env_remove("CARGO_TARGET_DIR");
    if !debug {
        cmd.arg("--release");
    }
    // Cargo's own lines as for the images (`build::images_with`): none, unless -v.
    match crate::exit::verbosity() {
        ..=0 => {
            cmd.arg("--quiet");
        }
        1 => {}
        _ => {
            cmd.arg("-v");
        }
    }
    cmd
}

/// Builds the guest crate at `dir`; returns its ELF.
pub fn build_crate(dir: &Path, debug: bool) -> Result<PathBuf> {
    let manifest = dir.join("Cargo.toml");
    let mut cmd = guest_build(&manifest, debug);
    crate::exit::running(&cmd);
    let out = cmd.stderr(std::process::Stdio::inherit()).output().context("cannot run cargo")?;
    if !out.status.success() {
        bail!("building the guest crate {} failed", dir.display());
    }
    let mut elf = None;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        let local = msg["package_id"].as_str().is_some_and(|p| p.starts_with("path+file://"));
        if msg["reason"] == "compiler-artifact" && local {
            if let Some(exe) = msg["executable"].as_str() {
                elf = Some(PathBuf::from(exe));
            }
        }
    }
    elf.with_context(|| format!("the guest crate {} built no binary", dir.display()))
}

/// The config's own kernels and where they are (relative to the config file).
fn kernels_of(c: &Compiled) -> (Vec<KernelSpec>, impl Fn(&KernelSpec) -> PathBuf) {
    let base = Path::new(&c.file).parent().unwrap_or(Path::new(".")).to_path_buf();
    let kernels: Vec<KernelSpec> = c.config.kernels().into_iter().cloned().collect();
    let path_of = move |k: &KernelSpec| match k {
        KernelSpec::File(p) | KernelSpec::Crate { krate: p } => base.join(p),
    };
    (kernels, path_of)
}

/// What can be checked of the config's own kernels without building anything: each file
/// kernel completely, each crate kernel that it is a crate. Returns each kernel's file
/// (`None` for a crate, still to be built).
pub fn check_unbuilt(c: &Compiled) -> Result<Vec<Option<PathBuf>>> {
    let (kernels, path_of) = kernels_of(c);
    let mut errors = Vec::new();
    let mut files: Vec<Option<PathBuf>> = Vec::new();
    for k in &kernels {
        let path = path_of(k);
        match k {
            KernelSpec::File(_) => {
                errors.extend(check_users(c, k, |partition| check_file(&path, partition)));
                files.push(Some(path));
            }
            KernelSpec::Crate { .. } => {
                if !path.join("Cargo.toml").is_file() {
                    errors.extend(check_users(c, k, |_| {
                        Err(format!("{} is not a crate (no Cargo.toml in it)", path.display()))
                    }));
                }
                files.push(None);
            }
        }
    }
    fail_on(errors)?;
    Ok(files)
}

/// The config's own kernels, resolved, built and checked: file `i` is the kernel of blob
/// index `i + 1` (module `KERNEL_MODULES[i + 1]`).
pub fn prepare(c: &Compiled, debug: bool) -> Result<Vec<PathBuf>> {
    let mut files = check_unbuilt(c)?;
    let (kernels, path_of) = kernels_of(c);
    // Then the crates, built and checked the same way.
    let mut errors = Vec::new();
    for (k, file) in kernels.iter().zip(&mut files) {
        if file.is_none() {
            let elf = build_crate(&path_of(k), debug)?;
            errors.extend(check_users(c, k, |partition| check_file(&elf, partition)));
            *file = Some(elf);
        }
    }
    fail_on(errors)?;
    Ok(files.into_iter().flatten().collect())
}

/// Runs `check` for the partition of every guest that runs kernel `k`; the errors are
/// located at each guest's `kernel`.
fn check_users(
    c: &Compiled,
    k: &KernelSpec,
    check: impl Fn(u64) -> Result<Layout, String>,
) -> Vec<ConfigError> {
    let mut out = Vec::new();
    for (i, g) in c.config.guests.iter().enumerate() {
        let Some(spec) = g.kernel.as_ref().filter(|s| s.get_ref() == k) else { continue };
        if let Err(e) = check(*g.memory_mib.get_ref() as u64 * (1 << 20)) {
            out.push(c.error_at(spec.span(), format!("guest[{i}].kernel"), format!("{k}: {e}")));
        }
    }
    out
}

fn fail_on(errors: Vec<ConfigError>) -> Result<()> {
    if errors.is_empty() {
        return Ok(());
    }
    Err(crate::exit::coded(crate::exit::CONFIG, ConfigErrors(errors)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 with these PT_LOAD (paddr, memsz, flags) segments, each with 16
    /// bytes of file data at offset 0x200.
    fn elf64(entry: u64, segs: &[(u64, u64, u32)]) -> Vec<u8> {
        let mut b = vec![0u8; 0x300];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = abi::ELFCLASS64;
        b[5] = abi::ELFDATA2LSB;
        b[6] = 1;
        b[16..18].copy_from_slice(&abi::ET_EXEC.to_le_bytes());
        b[18..20].copy_from_slice(&abi::EM_X86_64.to_le_bytes());
        b[20..24].copy_from_slice(&1u32.to_le_bytes());
        b[24..32].copy_from_slice(&entry.to_le_bytes());
        b[32..40].copy_from_slice(&64u64.to_le_bytes());
        b[52..54].copy_from_slice(&64u16.to_le_bytes());
        b[54..56].copy_from_slice(&56u16.to_le_bytes());
        b[56..58].copy_from_slice(&(segs.len() as u16).to_le_bytes());
        for (i, &(a, size, flags)) in segs.iter().enumerate() {
            let p = 64 + 56 * i;
            b[p..p + 4].copy_from_slice(&abi::PT_LOAD.to_le_bytes());
            b[p + 4..p + 8].copy_from_slice(&flags.to_le_bytes());
            b[p + 8..p + 16].copy_from_slice(&0x200u64.to_le_bytes());
            b[p + 16..p + 24].copy_from_slice(&a.to_le_bytes());
            b[p + 24..p + 32].copy_from_slice(&a.to_le_bytes());
            b[p + 32..p + 40].copy_from_slice(&16u64.to_le_bytes());
            b[p + 40..p + 48].copy_from_slice(&size.to_le_bytes());
        }
        b
    }

    #[test]
    fn a_kernel_crate_that_is_not_a_crate_is_a_located_config_error() {
        let dir = std::env::temp_dir().join(format!("mkvisor-kernel-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("empty")).unwrap();
        let src = "[machine]\ncpus = 2\nmemory_mib = 128\n\n[[guest]]\nname = \"a\"\ncore = 0\n\
                   memory_mib = 4\nkernel = { crate = \"empty\" }\n";
        let file = dir.join("k.toml");
        std::fs::write(&file, src).unwrap();
        let c = crate::config::load(&file).unwrap();
        let e = prepare(&c, false).unwrap_err();
        let coded = e.downcast_ref::<crate::exit::Coded>().expect("a coded error");
        assert_eq!(coded.code, crate::exit::CONFIG);
        let text = format!("{:#}", coded.error);
        let at = format!("{}:9:10: guest[0].kernel: crate `empty`: ", file.display());
        assert!(text.contains(&at), "{text}");
        assert!(text.contains("empty is not a crate (no Cargo.toml in it)"), "{text}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    const MIB: u64 = 1 << 20;
    const RX: u32 = abi::PF_R | abi::PF_X;

    #[test]
    fn a_good_kernel_passes() {
        let k = elf64(0x10_0010, &[(0x10_0000, 0x1000, RX), (0x20_0000, 0x3000, abi::PF_R)]);
        assert_eq!(check_elf(&k, 4 * MIB), Ok(Layout { entry: 0x10_0010, end: 0x20_3000 }));
    }

    #[test]
    fn each_rule_is_enforced() {
        let good = elf64(0x10_0010, &[(0x10_0000, 0x1000, RX)]);
        let err = |b: &[u8], partition: u64| check_elf(b, partition).unwrap_err();
        assert!(err(b"#!/bin/sh\n", 4 * MIB).contains("not an ELF file"));
        let mut b = good.clone();
        b[4] = abi::ELFCLASS32;
        assert!(err(&b, 4 * MIB).contains("32-bit ELF"));
        let mut b = good.clone();
        b[5] = abi::ELFDATA2MSB;
        assert!(err(&b, 4 * MIB).contains("big-endian"));
        let mut b = good.clone();
        b[18] = 3; // EM_386
        assert!(err(&b, 4 * MIB).contains("not x86-64"));
        let mut b = good.clone();
        b[16] = abi::ET_DYN as u8;
        assert!(err(&b, 4 * MIB).contains("not an executable"));
        let past = elf64(0x10_0010, &[(0x10_0000, 4 * MIB, RX)]);
        assert!(
            err(&past, 4 * MIB).contains("ends past the partition (4 MiB"),
            "{}",
            err(&past, 4 * MIB)
        );
        assert!(check_elf(&past, 8 * MIB).is_ok());
        let low = elf64(0x1000, &[(0x1000, 0x1000, RX)]);
        assert!(err(&low, 4 * MIB).contains("starts below 0x100000"));
        let outside = elf64(0x30_0000, &[(0x10_0000, 0x1000, RX)]);
        assert!(err(&outside, 4 * MIB).contains("entry point 0x300000 is outside"));
        let not_exec = elf64(0x10_0010, &[(0x10_0000, 0x1000, abi::PF_R)]);
        assert!(err(&not_exec, 4 * MIB).contains("outside every executable segment"));
        let overlap = elf64(0x10_0010, &[(0x10_0000, 0x2000, RX), (0x10_1000, 0x1000, RX)]);
        assert!(err(&overlap, 4 * MIB).contains("overlaps"));
        assert!(err(&elf64(0x10_0000, &[]), 4 * MIB).contains("no loadable segment"));
        let mut short = good.clone();
        short.truncate(0x205);
        assert!(err(&short, 4 * MIB).contains("beyond the end of the file"));
        let big = vec![0u8; MAX_KERNEL_BYTES as usize + 1];
        assert!(err(&big, 4 * MIB).contains("larger than the 16 MiB"));
    }
}
