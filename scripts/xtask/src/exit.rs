// SPDX-License-Identifier: MIT OR Apache-2.0
//! Exit codes of `cargo xtask`, one per way a command can end (listed in docs/running.md), and
//! the error type that carries a code other than the generic one up to `main`.

use std::fmt;
use std::process::ExitCode;

/// The run succeeded (or the command did what it was asked).
pub const OK: u8 = 0;
/// The run ended with outcome `failed` (a core, a guest or the records said so).
pub const FAILED: u8 = 1;
/// Bad arguments: clap's own errors, and options xtask refuses before building (an unknown
/// `--cmdline` option or `--cpu-model`, too many CPUs for the emulator, a path the emulator
/// cannot use, `--cpus` below the config's cores without `--allow-missing-cores`).
pub const USAGE: u8 = 2;
/// The config file is missing or invalid.
pub const CONFIG: u8 = 3;
/// The hypervisor refused to run (the machine lacks something it needs).
pub const REFUSED: u8 = 4;
/// The run hit `--timeout`.
pub const TIMEOUT: u8 = 5;
/// The `--report` file cannot be written (checked before anything is built).
pub const REPORT_PATH: u8 = 6;
/// Anything else that kept the command from being attempted: a build, an install, an
/// emulator that cannot be started, an I/O error.
pub const ERROR: u8 = 7;
/// `ctl`: the guest's core (or the relay) answered `busy`: not now (running already, a
/// request in flight, the machine already paused).
pub const BUSY: u8 = 8;
/// `ctl`: the guest's core is out of the machine (fenced), or the emulator is gone.
pub const GONE: u8 = 9;
/// Stopped by SIGINT, SIGTERM or SIGHUP (128 + SIGINT, as shells report it).
pub const INTERRUPTED: u8 = 130;

/// The exit code of a finished run with this report outcome.
pub fn for_outcome(outcome: &str) -> u8 {
    match outcome {
        "ok" => OK,
        "refused" => REFUSED,
        "timeout" => TIMEOUT,
        "interrupted" => INTERRUPTED,
        _ => FAILED,
    }
}

/// An error that must end the command with a particular exit code.
#[derive(Debug)]
pub struct Coded {
    pub code: u8,
    pub error: anyhow::Error,
}

impl fmt::Display for Coded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#}", self.error)
    }
}

impl std::error::Error for Coded {}

/// Wraps `error` so that it ends the command with `code`.
pub fn coded(code: u8, error: impl Into<anyhow::Error>) -> anyhow::Error {
    anyhow::Error::new(Coded { code, error: error.into() })
}

/// The exit code for an error that reached `main`.
pub fn of_error(e: &anyhow::Error) -> u8 {
    e.downcast_ref::<Coded>().map_or(ERROR, |c| c.code)
}

/// Prints `e` and turns it into the process exit code.
pub fn report_error(e: &anyhow::Error) -> ExitCode {
    eprintln!("xtask: error: {e:#}");
    ExitCode::from(of_error(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_distinct() {
        let mut all = [
            OK,
            FAILED,
            USAGE,
            CONFIG,
            REFUSED,
            TIMEOUT,
            REPORT_PATH,
            ERROR,
            BUSY,
            GONE,
            INTERRUPTED,
        ];
        all.sort_unstable();
        let n = all.len();
        let mut d = all.to_vec();
        d.dedup();
        assert_eq!(d.len(), n, "{all:?}");
        // clap reports its own usage errors with 2.
        assert_eq!(USAGE, 2);
    }

    #[test]
    fn outcomes_and_errors_map_to_their_codes() {
        assert_eq!(for_outcome("ok"), OK);
        assert_eq!(for_outcome("failed"), FAILED);
        assert_eq!(for_outcome("refused"), REFUSED);
        assert_eq!(for_outcome("timeout"), TIMEOUT);
        assert_eq!(for_outcome("interrupted"), INTERRUPTED);
        assert_eq!(of_error(&anyhow::anyhow!("plain")), ERROR);
        let e = coded(CONFIG, anyhow::anyhow!("x.toml:1:1: bad"));
        assert_eq!(of_error(&e), CONFIG);
        assert!(e.to_string().contains("x.toml:1:1: bad"));
        assert_eq!(of_error(&e.context("while running")), CONFIG);
    }
}
