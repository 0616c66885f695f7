// SPDX-License-Identifier: MIT OR Apache-2.0
//! `cargo xtask`: see `xtask::cli`.

use anyhow::Result;
use std::process::{Command, ExitCode};
use xtask::cli::{Cli, Command as Cmd};

fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(xtask::workspace_root());
    c
}

/// Runs a step of `test`, shown first under -v.
fn step(c: &mut Command) -> std::io::Result<std::process::ExitStatus> {
    xtask::exit::running(c);
    c.status()
}

fn test(args: &xtask::cli::TestArgs) -> Result<bool> {
    xtask::setup::ensure_rust_target()?;
    xtask::setup::ensure_rust_components()?;
    // Style and lints first: formatting, then clippy on the host crates, the bare-metal
    // crates' host tests, and the bare-metal crates for their real target.
    let lints: [&[&str]; 4] = [
        &["fmt", "--all", "--check"],
        &[
            "clippy",
            "--all-targets",
            "-p",
            "vmcall-proto",
            "-p",
            "xtask",
            "-p",
            "systests",
            "--",
            "-D",
            "warnings",
        ],
        &["clippy", "--tests", "-p", "hypervisor", "-p", "guestkernel", "--", "-D", "warnings"],
        &[
            "clippy",
            "-p",
            "hypervisor",
            "-p",
            "guestkernel",
            "--target",
            xtask::build::TARGET,
            "--",
            "-D",
            "warnings",
        ],
    ];
    for l in lints {
        if !step(cargo().args(l))?.success() {
            eprintln!("error: test: `cargo {}` failed", l.join(" "));
            return Ok(false);
        }
    }
    // No module imports another that imports it back, in any crate.
    if !xtask::imports::check(&xtask::workspace_root(), false, xtask::imports::TOLERATED)? {
        eprintln!("error: test: import cycles (above)");
        return Ok(false);
    }
    // Only the CPU backends name VMCS or VMCB fields (issue 24).
    if !xtask::backends::check(&xtask::workspace_root())? {
        eprintln!("error: test: a module outside the backends names a VMCS or VMCB field (above)");
        return Ok(false);
    }
    // Host tests: the ABI, the tool, and the bare-metal crates' logic built for the host.
    let host = step(cargo().args([
        "test",
        "-p",
        "vmcall-proto",
        "-p",
        "xtask",
        "-p",
        "hypervisor",
        "-p",
        "guestkernel",
    ]))?;
    if !host.success() {
        return Ok(false);
    }
    // The channel ring's memory ordering, model-checked with loom (own target dir: the
    // cfg changes every dependency's build).
    let loom = step(
        cargo()
            .args(["test", "-q", "-p", "vmcall-proto", "--release", "--lib", "loom_tests"])
            .env("RUSTFLAGS", "--cfg loom")
            .env("CARGO_TARGET_DIR", xtask::target_dir().join("loom")),
    )?;
    if !loom.success() {
        return Ok(false);
    }
    // The cross-core capability protocol, model-checked with stateright on the
    // hypervisor's own code, in release (about a million states; under a minute).
    let model = step(cargo().args([
        "test",
        "-q",
        "-p",
        "hypervisor",
        "--release",
        "caps::model",
        "--",
        "members::model",
        "--nocapture",
    ]))?;
    if !model.success() || args.host_only {
        return Ok(model.success());
    }
    xtask::setup::ensure_packages(&[
        xtask::setup::BUILD,
        xtask::setup::BOCHS,
        xtask::setup::QEMU,
        xtask::setup::TEST,
    ])?;
    // Build once up front so the parallel system tests do not all wait on cargo's lock.
    xtask::build::images(false)?;
    let system = step(cargo().args(["test", "-p", "systests", "--", "--test-threads=2"]))?;
    if !system.success() {
        return Ok(false);
    }
    // The exact Bochs counts against the committed baseline (three boots in parallel: 15 s
    // on a quiet two-core machine, about 40 s on a busy one).
    xtask::baseline::check(false)
}

fn main() -> ExitCode {
    let mut cli: Cli = xtask::cli::parse();
    cli.color.apply();
    xtask::exit::set_verbosity(cli.quiet, cli.verbose);
    // `run` and `check` take them as their own: -q does not stream the console, -vv
    // streams the machine records too.
    if let Cmd::Run(r) | Cmd::Check(xtask::cli::CheckArgs { run: r, .. }) = &mut cli.command {
        r.quiet = cli.quiet;
        r.records |= cli.verbose >= 2;
    }
    let result = match &cli.command {
        Cmd::Setup => xtask::setup::all().map(|_| true),
        Cmd::Build(b) => (|| {
            let progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
            let images = xtask::build::images_with(b.debug, progress)?;
            let dir = xtask::target_dir().join("mkvisor-iso");
            std::fs::create_dir_all(&dir)?;
            let cfg = xtask::config::load(&xtask::workspace_root().join("configs/default.toml"))?;
            let iso = xtask::build::iso(&images, &dir, "", Some(&cfg.blob))?;
            println!("{}", iso.display());
            Ok(true)
        })(),
        Cmd::Run(r) => return xtask::run::command(r, xtask::plot::files),
        Cmd::Check(c) => xtask::run::check(&c.run_args()).map(|summary| {
            println!("{summary}");
            true
        }),
        Cmd::Test(t) => test(t),
        Cmd::Load(l) => xtask::kvload::command(l),
        Cmd::Chaos(c) => xtask::chaos::campaign(c.seed, c.runs, c.dry_run),
        Cmd::Clean(c) => xtask::run::clean(c.keep).map(|()| true),
        Cmd::Bench(b) => match &b.what {
            xtask::cli::BenchWhat::Channels { json, repeat, host_only, bochs_only, plot } => {
                xtask::bench::channels(json.as_deref(), *repeat, *host_only, *bochs_only).map(
                    |()| {
                        if *plot {
                            xtask::plot::after_bench(json.as_deref());
                        }
                        true
                    },
                )
            }
            xtask::cli::BenchWhat::Caps { json, plot, k, revoke, fanout } if !revoke.is_empty() => {
                xtask::bench::caps_strategies(json.as_deref(), k, revoke, *fanout).map(|()| {
                    if *plot {
                        xtask::plot::after_bench(json.as_deref());
                    }
                    true
                })
            }
            xtask::cli::BenchWhat::Caps { json, plot, k, .. } => {
                xtask::bench::caps(json.as_deref(), k).map(|()| {
                    if *plot {
                        xtask::plot::after_bench(json.as_deref());
                    }
                    true
                })
            }
            xtask::cli::BenchWhat::Devices { json, pings } => {
                xtask::devbench::devices(json.as_deref(), *pings).map(|()| true)
            }
            xtask::cli::BenchWhat::Lifecycle { json } => {
                xtask::lifebench::lifecycle(json.as_deref()).map(|()| true)
            }
            xtask::cli::BenchWhat::Kv(k) => xtask::kvbench::kv(k).map(|()| {
                if k.plot {
                    xtask::plot::after_bench(k.json.as_deref());
                }
                true
            }),
            xtask::cli::BenchWhat::Check { update } => xtask::baseline::check(*update),
            xtask::cli::BenchWhat::Backends { json, testbeds } => {
                xtask::testbeds::backends(json.as_deref(), testbeds).map(|()| true)
            }
            xtask::cli::BenchWhat::Exits { json, before, cpus } => {
                xtask::exitbench::exits(json.as_deref(), before.as_deref(), cpus).map(|()| true)
            }
        },
        Cmd::Mutants(m) => xtask::mutants::run(&m.files, m.min, m.jobs),
        Cmd::NewGuest(n) => xtask::template::new_guest(&n.dir).map(|files| {
            for f in files {
                println!("created {:?}", f.display().to_string());
            }
            println!(
                "run it: cargo xtask run --config {:?} (or, in that directory: cargo xtask run \
                 --config mkvisor.toml)",
                n.dir.join("mkvisor.toml").display().to_string()
            );
            true
        }),
        Cmd::CHeader => xtask::cheader::write().map(|p| {
            println!("wrote {}", p.display());
            true
        }),
        Cmd::Plot(p) => xtask::plot::files(&p.files, p.out.as_deref()).map(|written| {
            for w in written {
                println!("{}", w.display());
            }
            true
        }),
        Cmd::Report(r) => match &r.what {
            xtask::cli::ReportWhat::Diff { a, b, json, fail_on } => {
                xtask::diff::command(a, b, *json, fail_on)
            }
        },
        Cmd::Ps(p) => {
            print!("{}", xtask::watch::ps(&xtask::run::runs_root(), p.all));
            Ok(true)
        }
        Cmd::Ctl(c) => {
            let wait = std::time::Duration::from_secs(c.wait);
            match xtask::hostctl::command(&c.run, &c.op, c.guest.as_deref(), wait) {
                Ok(code) => return ExitCode::from(code),
                Err(e) => Err(e),
            }
        }
        Cmd::Top(t) => xtask::watch::top(t.run.as_deref(), t.once).map(|()| true),
        Cmd::Schema(s) => xtask::schema::command(s.which, s.update).map(|()| true),
        Cmd::Imports(i) => {
            let root = xtask::workspace_root();
            // And only the CPU backends name VMCS or VMCB fields (issue 24).
            xtask::imports::check(&root, i.graph, &[])
                .and_then(|acyclic| xtask::backends::check(&root).map(|neutral| acyclic && neutral))
        }
        Cmd::Figures(f) => xtask::figures::figures(&f.files, f.update),
        Cmd::Workloads(w) => {
            if w.update_readme {
                xtask::workloads::update_readme(
                    &xtask::workspace_root().join(xtask::workloads::PAGE),
                )
                .map(|()| true)
            } else {
                println!("{}", xtask::workloads::markdown());
                Ok(true)
            }
        }
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => xtask::exit::report_error(&e),
    }
}
