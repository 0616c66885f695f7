// SPDX-License-Identifier: MIT OR Apache-2.0
//! The mkvisor host tool behind `cargo xtask`: installs prerequisites, builds the
//! bare-metal images and the GRUB ISO, boots it in an emulator, streams the serial console
//! and turns the hypervisor's records into a JSON report. The whole-system tests under
//! `tests/` use this library directly.
//!
//! The root holds only what every module may name (the workspace's paths and the target)
//! and imports none of its modules; `cargo xtask imports` checks that no module imports
//! another that imports it back.

pub mod backends;
pub mod baseline;
pub mod bench;
pub mod build;
pub mod chaos;
pub mod cheader;
pub mod cli;
pub mod cmdline;
pub mod config;
pub mod devbench;
pub mod diff;
pub mod docs;
pub mod exit;
pub mod exitbench;
pub mod figures;
pub mod files;
pub mod hostctl;
pub mod imports;
pub mod kernel;
pub mod kvbench;
pub mod kvload;
pub mod lifebench;
pub mod meta;
pub mod mutants;
pub mod plot;
pub mod report;
pub mod run;
pub mod schema;
pub mod setup;
pub mod template;
pub mod testbeds;
pub mod watch;
pub mod workloads;

use std::path::PathBuf;

/// The workspace root (this crate lives in `scripts/xtask`).
pub fn workspace_root() -> PathBuf {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    here.parent()
        .and_then(|p| p.parent())
        .expect("xtask sits two levels below the root")
        .to_path_buf()
}

/// The bare-metal target the hypervisor and the guest kernels are built for.
pub const TARGET: &str = "x86_64-unknown-none";

/// The folder of the run folders (`cargo xtask run`, `ps`, `top`, `clean`).
pub fn runs_root() -> PathBuf {
    target_dir().join("xtask")
}

/// The cargo target directory of the workspace.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}
