// SPDX-License-Identifier: MIT OR Apache-2.0
//! Exit codes of `cargo xtask`, one per way a command can end, the codes each subcommand can
//! end with (the one source of every `--help`'s table and of docs/running.md's), the error
//! type that carries a code other than the generic one up to `main`, and the one way errors
//! and warnings are printed (`error: ...`, `warning: ...`, as cargo and clap print them),
//! and how much else the tool says (`-q`, `-v`: [`verbosity`], [`note`], [`running`]).
//! Calls nothing of ours.

use std::fmt;
use std::process::ExitCode;
use std::sync::atomic::{AtomicI8, Ordering};

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

/// Every code and what it means for most commands (a command's own meaning, where it has
/// one, is in [`BY_COMMAND`]).
pub const TABLE: [(u8, &str); 11] = [
    (OK, "done"),
    (FAILED, "failed"),
    (USAGE, "usage: bad arguments, or an input that is not what the command takes"),
    (CONFIG, "the config is missing or invalid"),
    (REFUSED, "the hypervisor refused to run (the machine lacks something it needs)"),
    (TIMEOUT, "the run hit --timeout"),
    (REPORT_PATH, "the --report file cannot be written (checked before anything is built)"),
    (
        ERROR,
        "anything else kept the command from being attempted: a build, an install, the \
         emulator, I/O",
    ),
    (BUSY, "busy: not now (already running, a request in flight, already paused)"),
    (GONE, "gone: the guest's core is out of the machine, or the emulator is gone"),
    (INTERRUPTED, "interrupted by SIGINT, SIGTERM or SIGHUP"),
];

/// The codes each subcommand (by its words: `run`, `bench check`) can end with; a meaning
/// given here replaces the table's for that command, "" keeps it.
pub const BY_COMMAND: &[(&str, &[(u8, &str)])] = &[
    ("setup", &[(OK, ""), (USAGE, ""), (ERROR, "")]),
    ("build", &[(OK, ""), (USAGE, ""), (ERROR, "")]),
    ("run", RUN),
    (
        "check",
        &[
            (OK, "`run` would boot this"),
            (USAGE, ""),
            (CONFIG, ""),
            (REFUSED, "the emulator cannot run this machine (qemu-kvm without /dev/kvm or nested VMX/SVM)"),
            (REPORT_PATH, ""),
            (ERROR, ""),
        ],
    ),
    (
        "test",
        &[
            (OK, ""),
            (FAILED, "a step failed (lints, imports, host or system tests, the bench baseline)"),
            (USAGE, ""),
            (ERROR, ""),
        ],
    ),
    ("bench", BENCH),
    ("bench channels", BENCH),
    ("bench caps", BENCH),
    ("bench devices", BENCH),
    ("bench lifecycle", BENCH),
    (
        "bench check",
        &[
            (OK, "every figure within 3% of its baseline"),
            (FAILED, "a figure more than 3% above its baseline"),
            (USAGE, ""),
            (ERROR, ""),
        ],
    ),
    ("bench kv", BENCH),
    ("bench exits", BENCH),
    ("bench backends", BENCH),
    (
        "mutants",
        &[
            (OK, ""),
            (FAILED, "a file has fewer than --min of its mutants caught"),
            (USAGE, ""),
            (ERROR, ""),
        ],
    ),
    ("clean", &[(OK, ""), (USAGE, ""), (ERROR, "")]),
    ("workloads", &[(OK, ""), (USAGE, ""), (ERROR, "")]),
    (
        "figures",
        &[
            (OK, "every block as its JSON says (or rewritten)"),
            (FAILED, "a block differs from its JSON (without --update)"),
            (USAGE, ""),
            (ERROR, ""),
        ],
    ),
    (
        "new-guest",
        &[
            (OK, ""),
            (USAGE, "bad arguments, or DIR exists and is not an empty directory"),
            (ERROR, ""),
        ],
    ),
    ("c-header", &[(OK, ""), (USAGE, ""), (ERROR, "")]),
    ("schema", &[(OK, ""), (USAGE, ""), (ERROR, "")]),
    (
        "plot",
        &[
            (OK, ""),
            (USAGE, "bad arguments, or a file that is neither a run report nor a bench output"),
            (ERROR, ""),
        ],
    ),
    ("report", DIFF),
    ("report diff", DIFF),
    ("ps", &[(OK, ""), (USAGE, ""), (ERROR, "")]),
    ("top", &[(OK, ""), (USAGE, "bad arguments, or RUN names no run"), (ERROR, "")]),
    (
        "ctl",
        &[
            (OK, "the guest's core (or the machine) did it"),
            (USAGE, "bad arguments, no such run, an unknown operation, a malformed request"),
            (
                REFUSED,
                "refused: host control off, an unknown guest, a guest that cannot start again",
            ),
            (TIMEOUT, "no answer within --wait (or the hypervisor never opened its control port)"),
            (ERROR, "the run cannot be reached"),
            (BUSY, ""),
            (GONE, ""),
        ],
    ),
    (
        "load",
        &[
            (OK, "every reply as the model allows"),
            (FAILED, "a mismatch, a reply that never came, a closed connection or garbage"),
            (USAGE, ""),
            (ERROR, "the server never answered `version` within --wait"),
        ],
    ),
    (
        "chaos",
        &[
            (OK, "every run held every invariant"),
            (FAILED, "a run broke one"),
            (USAGE, ""),
            (ERROR, ""),
        ],
    ),
    ("imports", &[(OK, "no cycle"), (FAILED, "a module import cycle"), (USAGE, ""), (ERROR, "")]),
];

const RUN: &[(u8, &str)] = &[
    (OK, "the run's outcome is `ok`"),
    (FAILED, "the run's outcome is `failed`"),
    (
        USAGE,
        "bad arguments, an unknown --cmdline word or --cpu-model, too many CPUs for the \
         emulator, too few cores for the config without --allow-missing-cores",
    ),
    (CONFIG, ""),
    (REFUSED, ""),
    (TIMEOUT, ""),
    (REPORT_PATH, ""),
    (ERROR, ""),
    (INTERRUPTED, "interrupted by SIGINT, SIGTERM or SIGHUP (the report says `interrupted`)"),
];
const BENCH: &[(u8, &str)] = &[(OK, ""), (USAGE, ""), (ERROR, "a boot or a measurement failed")];
const DIFF: &[(u8, &str)] = &[
    (OK, "the same (in what --fail-on counts)"),
    (FAILED, "they differ"),
    (USAGE, "trouble: bad arguments, a file that is not a run report"),
];

/// The codes `command` (its words, `bench check`) can end with and what each means for it.
pub fn codes_of(command: &str) -> Option<Vec<(u8, &'static str)>> {
    let (_, codes) = BY_COMMAND.iter().find(|(c, _)| *c == command)?;
    Some(
        codes
            .iter()
            .map(|&(code, own)| {
                let general = TABLE.iter().find(|t| t.0 == code).map_or("", |t| t.1);
                (code, if own.is_empty() { general } else { own })
            })
            .collect(),
    )
}

/// The `Exit codes:` section of `command`'s `--help`.
pub fn help_of(command: &str) -> Option<String> {
    let mut out = String::from("Exit codes:\n");
    for (code, meaning) in codes_of(command)? {
        out += &format!("  {code:>3}  {meaning}\n");
    }
    Some(out)
}

/// Prints an error as every subcommand does: `error: ...` on stderr (clap's prefix, and
/// cargo's).
pub fn print_error(e: &anyhow::Error) {
    eprintln!("error: {e:#}");
}

/// Prints a warning: `warning: ...` on stderr.
pub fn warn(message: impl fmt::Display) {
    eprintln!("warning: {message}");
}

/// How much the tool says of its own: -1 under `-q`, 0 by default, 1 under `-v`, 2 under
/// `-vv` (as cargo's flags). Set once by `main`.
static VERBOSITY: AtomicI8 = AtomicI8::new(0);

/// Sets [`verbosity`] from `-q` and the count of `-v`.
pub fn set_verbosity(quiet: bool, verbose: u8) {
    let v = if quiet { -1 } else { verbose.min(2) as i8 };
    VERBOSITY.store(v, Ordering::Relaxed);
}

/// -1 (`-q`), 0, 1 (`-v`) or 2 (`-vv`).
pub fn verbosity() -> i8 {
    VERBOSITY.load(Ordering::Relaxed)
}

/// A line of the tool's own about what it did (a folder, a file written, a phase) on
/// stderr; not under `-q`. Results, warnings and errors are printed whatever the level.
pub fn note(message: impl fmt::Display) {
    if verbosity() >= 0 {
        eprintln!("{message}");
    }
}

/// `word` as a POSIX shell reads it back: as it is when made only of characters no shell
/// treats specially, else in single quotes (a `'` inside as `'\''`).
pub fn shell_quote(word: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_./:=,+@%".contains(c);
    if !word.is_empty() && word.chars().all(plain) {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', "'\\''"))
    }
}

/// Under `-v`: the command about to be run, as a shell line, as cargo prints its own
/// (`     Running `...``).
pub fn running(c: &std::process::Command) {
    if verbosity() >= 1 {
        let words = std::iter::once(c.get_program())
            .chain(c.get_args())
            .map(|w| shell_quote(&w.to_string_lossy()))
            .collect::<Vec<_>>();
        eprintln!("     Running `{}`", words.join(" "));
    }
}

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
    print_error(e);
    ExitCode::from(of_error(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_quoting_reads_back() {
        assert_eq!(shell_quote("configs/a.toml"), "configs/a.toml");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
        assert_eq!(shell_quote(""), "''");
    }

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
    fn every_command_s_codes_are_known_and_each_command_listed_once() {
        for (i, (name, codes)) in BY_COMMAND.iter().enumerate() {
            assert!(!BY_COMMAND[..i].iter().any(|(n, _)| n == name), "{name} twice");
            for (code, _) in *codes {
                assert!(TABLE.iter().any(|t| t.0 == *code), "{name}: {code}");
            }
            // Every command can be called wrongly; every command can succeed.
            assert!(codes.iter().any(|c| c.0 == USAGE) && codes[0].0 == OK, "{name}");
        }
        let help = help_of("ctl").unwrap();
        assert!(help.starts_with("Exit codes:\n"), "{help}");
        assert!(help.contains("    9  gone: "), "{help}");
        assert!(help_of("frobnicate").is_none());
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
