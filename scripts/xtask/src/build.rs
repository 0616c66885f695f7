// SPDX-License-Identifier: MIT OR Apache-2.0
//! Building the bare-metal images and the bootable GRUB ISO.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use vmcall_proto::config::{KERNEL_MODULES, MAX_KERNELS};

/// The bare-metal target (kept in the crate root, below every module that names it).
pub use crate::TARGET;

/// The bare-metal ELF images: the hypervisor, the built-in guest kernel, and the kernels
/// a config names (`crate::kernel::prepare`), in blob index order from 1.
#[derive(Debug, Clone)]
pub struct Images {
    pub hypervisor: PathBuf,
    pub guest: PathBuf,
    pub kernels: Vec<PathBuf>,
}

/// Builds the hypervisor and the guest kernel for `x86_64-unknown-none`.
pub fn images(debug: bool) -> Result<Images> {
    images_with(debug, false)
}

/// The crate a line of cargo's `--message-format=json` output says was built, if it does.
pub fn built_artifact(line: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    (v.get("reason")? == "compiler-artifact").then_some(())?;
    Some(v.get("target")?.get("name")?.as_str()?.to_string())
}

/// [`images`], with a spinner naming each crate as cargo finishes it when `progress` (a
/// terminal, not `--quiet`): the first build takes about 30 s.
pub fn images_with(debug: bool, progress: bool) -> Result<Images> {
    crate::setup::ensure_rust_target()?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(crate::workspace_root()).args([
        "build",
        "-p",
        "hypervisor",
        "-p",
        "guestkernel",
        "--target",
        TARGET,
    ]);
    if !debug {
        cmd.arg("--release");
    }
    // Cargo says what it does under -v (-vv: cargo's own -v), else nothing but errors.
    match crate::exit::verbosity() {
        ..=0 => {
            cmd.arg("--quiet");
        }
        1 => {}
        _ => {
            cmd.arg("-v");
        }
    }
    crate::exit::running(&cmd);
    let status = if progress && crate::exit::verbosity() == 0 {
        let bar = indicatif::ProgressBar::new_spinner();
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}")
                .expect("a valid template"),
        );
        bar.enable_steady_tick(std::time::Duration::from_millis(120));
        bar.set_message("building the hypervisor and the guest kernel");
        cmd.arg("--message-format=json-render-diagnostics").stdout(std::process::Stdio::piped());
        let mut child = cmd.spawn().context("cannot run cargo")?;
        let stdout = child.stdout.take().expect("piped");
        let mut n = 0;
        for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)).map_while(Result::ok) {
            if let Some(name) = built_artifact(&line) {
                n += 1;
                bar.set_message(format!("building: {n} crates done, last {name}"));
            }
        }
        let status = child.wait()?;
        bar.finish_and_clear();
        status
    } else {
        cmd.status().context("cannot run cargo")?
    };
    if !status.success() {
        bail!("building the bare-metal images failed");
    }
    let dir = crate::target_dir().join(TARGET).join(if debug { "debug" } else { "release" });
    Ok(Images {
        hypervisor: dir.join("mkvisor"),
        guest: dir.join("guestkernel"),
        kernels: Vec::new(),
    })
}

/// The GRUB configuration: no menu, console on COM1 so the host sees GRUB's progress too.
/// `kernels` of the config's own kernels follow the built-in one as modules.
pub fn grub_cfg(cmdline: &str, with_config: bool, kernels: usize) -> String {
    let cmdline = cmdline.replace(['\n', '\r', '"', '\''], " ");
    format!(
        "set timeout=0\n\
         set timeout_style=hidden\n\
         serial --unit=0 --speed=115200\n\
         terminal_input serial\n\
         terminal_output serial\n\
         menuentry \"mkvisor\" {{\n\
         \x20 echo \"{GRUB_MARKER}\"\n\
         \x20 multiboot2 /boot/mkvisor {cmdline}\n\
         \x20 module2 /boot/guestkernel guestkernel\n\
         {own}{config}\
         \x20 boot\n\
         }}\n",
        config = if with_config { "  module2 /boot/config.bin config\n" } else { "" },
        own = (1..=kernels)
            .map(|i| format!("  module2 /boot/{m} {m}\n", m = KERNEL_MODULES[i]))
            .collect::<String>(),
    )
}

/// What GRUB prints on the serial console right before it loads the hypervisor.
pub const GRUB_MARKER: &str = "mkvisor: GRUB is loading the hypervisor";

/// Lays out an ISO tree in `dir` and writes `dir/mkvisor.iso`.
pub fn iso(images: &Images, dir: &Path, cmdline: &str, config: Option<&[u8]>) -> Result<PathBuf> {
    crate::setup::ensure_packages(&[crate::setup::BUILD])?;
    let tree = dir.join("iso");
    let boot = tree.join("boot");
    std::fs::create_dir_all(boot.join("grub"))?;
    std::fs::copy(&images.hypervisor, boot.join("mkvisor"))
        .with_context(|| format!("copying {}", images.hypervisor.display()))?;
    std::fs::copy(&images.guest, boot.join("guestkernel"))
        .with_context(|| format!("copying {}", images.guest.display()))?;
    if images.kernels.len() > MAX_KERNELS {
        bail!("{} kernels; at most {MAX_KERNELS}", images.kernels.len());
    }
    for (i, k) in images.kernels.iter().enumerate() {
        // Read as checked (a regular file, bounded), not copied from whatever the path is now.
        let image = crate::kernel::read_kernel(k).map_err(anyhow::Error::msg)?;
        std::fs::write(boot.join(KERNEL_MODULES[i + 1]), image)
            .with_context(|| format!("copying {}", k.display()))?;
    }
    if let Some(blob) = config {
        std::fs::write(boot.join("config.bin"), blob)?;
    }
    let cfg = grub_cfg(cmdline, config.is_some(), images.kernels.len());
    std::fs::write(boot.join("grub/grub.cfg"), cfg)?;
    let iso = dir.join("mkvisor.iso");
    let mut mkrescue = Command::new("grub-mkrescue");
    mkrescue.arg("-o").arg(&iso).arg(&tree);
    crate::exit::running(&mkrescue);
    let out = mkrescue.output().context("cannot run grub-mkrescue")?;
    if !out.status.success() {
        bail!("grub-mkrescue failed:\n{}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(iso)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grub_cfg_passes_the_command_line_and_module() {
        let cfg = grub_cfg("cpus=2 vmxcaps", true, 0);
        assert!(cfg.contains("module2 /boot/config.bin config\n"));
        assert!(!grub_cfg("", false, 0).contains("config.bin"));
        assert!(!cfg.contains("kernel1"));
        let own = grub_cfg("", true, 2);
        assert!(own.contains("module2 /boot/kernel1 kernel1\n  module2 /boot/kernel2 kernel2\n"));
        assert!(!own.contains("kernel3"));
        assert!(cfg.contains("multiboot2 /boot/mkvisor cpus=2 vmxcaps\n"));
        assert!(cfg.contains("module2 /boot/guestkernel guestkernel\n"));
        assert!(cfg.contains("set timeout=0\n"));
    }

    #[test]
    fn grub_cfg_cannot_be_broken_out_of() {
        let cfg = grub_cfg("a\nboot\" b", false, 0);
        assert!(cfg.contains("multiboot2 /boot/mkvisor a boot  b\n"));
    }
}
