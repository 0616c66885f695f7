// SPDX-License-Identifier: MIT OR Apache-2.0
//! Command-line interface of `cargo xtask`.

use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    version,
    about = "Build, boot and test mkvisor"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Colour in the output: auto (on a terminal, unless NO_COLOR), always, never; as
    /// cargo's `--color`.
    #[arg(long, global = true, value_enum, default_value_t = ColorWhen::Auto)]
    pub color: ColorWhen,
    /// Say more, as cargo's `-v`: each program the command starts (cargo, the emulator,
    /// grub-mkrescue, apt-get, rustup) as a shell line before it starts it, and cargo's own
    /// build output instead of a progress line; `-vv` also makes that cargo verbose and
    /// streams a run's machine records (as `run --records`).
    #[arg(long, short = 'v', global = true, action = clap::ArgAction::Count, conflicts_with = "quiet")]
    pub verbose: u8,
    /// Say less, as cargo's `-q`: no progress line and no notes of the tool's own (the run
    /// folder, files written, what `clean` freed); `run` and `check` do not stream the
    /// console either. Results (a summary, a table, JSON), warnings and errors are printed
    /// all the same.
    #[arg(long, short = 'q', global = true)]
    pub quiet: bool,
}

/// The command line's definition with every command's `Exit codes:` table
/// (`crate::exit::BY_COMMAND`) after its `--help`: what `main` parses with.
pub fn command() -> clap::Command {
    use clap::CommandFactory;
    fn with_codes(c: clap::Command, path: &str) -> clap::Command {
        let names: Vec<String> = c.get_subcommands().map(|s| s.get_name().to_string()).collect();
        let mut c = match crate::exit::help_of(path) {
            Some(h) => c.after_help(h),
            None => c,
        };
        for n in names {
            let sub = if path.is_empty() { n.clone() } else { format!("{path} {n}") };
            c = c.mut_subcommand(&n, |s| with_codes(s, &sub));
        }
        c
    }
    let mut all = String::from("Exit codes (each command's --help lists its own):\n");
    for (code, meaning) in crate::exit::TABLE {
        all += &format!("  {code:>3}  {meaning}\n");
    }
    with_codes(Cli::command(), "").after_help(all)
}

/// Every subcommand, as the words that name it (`run`, `bench check`), parents first.
pub fn subcommands() -> Vec<String> {
    fn walk(c: &clap::Command, path: &str, out: &mut Vec<String>) {
        for s in c.get_subcommands().filter(|s| s.get_name() != "help") {
            let p = format!("{path} {}", s.get_name()).trim_start().to_string();
            out.push(p.clone());
            walk(s, &p, out);
        }
    }
    let mut out = vec![];
    walk(&command(), "", &mut out);
    out
}

/// Parses the process's arguments with [`command`] (clap's own errors exit 2).
pub fn parse() -> Cli {
    use clap::FromArgMatches;
    Cli::from_arg_matches(&command().get_matches()).unwrap_or_else(|e| e.exit())
}

/// `--color`.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColorWhen {
    Auto,
    Always,
    Never,
}

impl ColorWhen {
    /// Applies it to every `anstream` stream of the process.
    pub fn apply(self) {
        anstream::ColorChoice::write_global(match self {
            ColorWhen::Auto => anstream::ColorChoice::Auto,
            ColorWhen::Always => anstream::ColorChoice::Always,
            ColorWhen::Never => anstream::ColorChoice::Never,
        });
    }
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Install what is missing: Debian packages (Bochs, GRUB, xorriso, QEMU) and the Rust target.
    Setup,
    /// Build the hypervisor, the guest kernel and a bootable GRUB ISO under target/.
    Build(BuildArgs),
    /// Build if needed, boot in an emulator, stream the console, end on completion or timeout.
    Run(RunArgs),
    /// Check a config and the run options as `run` would, then stop: nothing is built or
    /// booted. It exits with the code `run` would have refused with.
    Check(CheckArgs),
    /// Run the host tests, then the whole-system tests.
    Test(TestArgs),
    /// Benchmarks that print tables (not pass/fail tests).
    Bench(BenchArgs),
    /// Mutation testing (cargo-mutants) of the files that guard isolation: a table per file,
    /// failing under a threshold. Slow; not part of `test`.
    Mutants(MutantsArgs),
    /// Remove the run folders under target/xtask/ (runs in progress are kept).
    Clean(CleanArgs),
    /// Print the workloads and their arguments (the list in docs/config.md) from
    /// vmcall-proto's table.
    Workloads(WorkloadsArgs),
    /// The documentation's benchmark tables, generated from docs/bench/*.json between
    /// `<!-- figures:NAME ... -->` markers (in README.md and docs/**/*.md unless --file):
    /// checks them, or rewrites them with --update.
    Figures(FiguresArgs),
    /// Make a guest crate of your own in DIR (hello-world entry, a config that runs it next
    /// to a built-in guest, a README); then `cargo xtask run --config DIR/mkvisor.toml`.
    NewGuest(NewGuestArgs),
    /// Regenerate the C header of the guest ABI (vmcall-proto/include/mkvisor.h) with cbindgen.
    CHeader,
    /// Print the JSON Schema of the run report (schemas/report.schema.json) or of the config
    /// file (`schema config`: schemas/config.schema.json), or rewrite both with --update.
    Schema(SchemaArgs),
    /// Draw SVG figures from run reports (boot phases; exits over time with --trace) and
    /// from `bench channels --json` (latency histograms) or `bench caps --json` (revoke
    /// cost against k).
    Plot(PlotArgs),
    /// Work with run reports: `report diff A.json B.json` compares two, figure by figure.
    Report(ReportArgs),
    /// List the runs in progress (pid, elapsed time, config, run folder).
    Ps(PsArgs),
    /// Follow one run: per guest its state, incarnation, restarts, hypercalls and exits by
    /// reason, per channel its messages, refreshed as the hypervisor's records arrive, until
    /// the run is over.
    Top(TopArgs),
    /// Act on a running machine from the host: query, stop, start, restart or park a guest
    /// (as a `[[control]]` controller would, with the same checks; the config must say
    /// `[machine] host_control = true`), read a guest's counter, or pause and resume the
    /// whole machine (Bochs's process stopped, QEMU's virtual machine stopped through QMP:
    /// guest time stands still in both).
    Ctl(CtlArgs),
    /// Load the key-value service (configs/kv-*.toml, reached through the forwarded port)
    /// with a fixed, seeded mix of memcached text-protocol requests, verify every reply
    /// against a model of the store, print requests/s and latency percentiles.
    Load(LoadArgs),
    /// A randomized fault campaign in Bochs: machines drawn from a seed (printed) mixing
    /// channel traffic with restarts, large maps and revokes, hung cores; invariants checked
    /// on each report.
    Chaos(ChaosArgs),
    /// Check every crate's module import graph for cycles (also a step of `test`): each
    /// cycle printed with the line that makes each step. Also checks that no hypervisor
    /// module outside the CPU backends names a VMCS or VMCB field (`backends`).
    Imports(ImportsArgs),
}

#[derive(clap::Args, Debug, Clone)]
pub struct ImportsArgs {
    /// Also print each crate's whole graph (module -> the modules it imports).
    #[arg(long)]
    pub graph: bool,
}

#[derive(clap::Args, Debug, Clone)]
pub struct LoadArgs {
    /// The service's address (the host side of slirp's forwarding).
    #[arg(long, default_value_t = format!("127.0.0.1:{}", vmcall_proto::kv::HOST_PORT))]
    pub addr: String,
    /// The service's worker count (the shards keys are placed on: FNV-1a mod N).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub workers: u32,
    /// Requests in all, split among the connections.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    pub count: u64,
    /// The mix's seed: the same seed and options send the same requests.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Connections, each with its own keys, one request at a time on each.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub connections: u32,
    /// Small values' size in bytes.
    #[arg(long, default_value_t = 100, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1_048_576))]
    pub small_bytes: usize,
    /// Large values' size in bytes: N, or MIN-MAX drawn uniformly.
    #[arg(long, default_value = "8192-32768", value_parser = crate::kvload::parse_range)]
    pub large_bytes: (usize, usize),
    /// Share of sets that write a large value, in percent.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(0..=100))]
    pub large_percent: u32,
    /// Plain keys per connection (plus 8 counters for incr).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub keys: u32,
    /// A reply later than this (ms) is a failure (timeout), and the connection is made anew.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub timeout_ms: u64,
    /// Wait up to this many seconds for the service to answer `version` (it may be booting).
    #[arg(long, default_value_t = 120)]
    pub wait: u64,
    /// Stop sending after this many seconds (what was not sent is a failure).
    #[arg(long, default_value_t = 3600, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub deadline: u64,
    /// Also write the figures as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(clap::Args, Debug, Clone)]
pub struct PsArgs {
    /// Also the runs that are over (with their outcome) or abandoned.
    #[arg(long)]
    pub all: bool,
}

#[derive(clap::Args, Debug, Clone)]
pub struct TopArgs {
    /// The run: its folder (a path, or a name under target/xtask/), or the pid of a run in
    /// progress; default: the only run in progress.
    pub run: Option<String>,
    /// Print the view once (of a run in progress or over) and exit.
    #[arg(long)]
    pub once: bool,
}

#[derive(clap::Args, Debug, Clone)]
pub struct CtlArgs {
    /// The run: its folder (a path, or a name under target/xtask/), or the pid of a run in
    /// progress (see `cargo xtask ps`).
    pub run: String,
    /// query, stop, start, restart, park, counter:exits, counter:hypercalls,
    /// counter:doorbells (these name a GUEST), or pause, resume (the whole machine).
    pub op: String,
    /// The guest's name in the config.
    pub guest: Option<String>,
    /// How long to wait for the answer, seconds.
    #[arg(long, default_value_t = xtask_wait_default(), value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub wait: u64,
}

const fn xtask_wait_default() -> u64 {
    crate::hostctl::DEFAULT_WAIT_S
}

#[derive(clap::Args, Debug, Clone)]
pub struct ChaosArgs {
    /// The first seed (default: from the clock; printed either way, to replay a run).
    #[arg(long)]
    pub seed: Option<u64>,
    /// How many runs (seeds `seed`, `seed + 1`, ...).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub runs: u64,
    /// Print each drawn scenario (summary, command line, config) and boot nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(clap::Args, Debug, Clone)]
pub struct NewGuestArgs {
    /// Where to create the crate (must not exist, or be empty).
    pub dir: std::path::PathBuf,
}

#[derive(clap::Args, Debug, Clone)]
pub struct CheckArgs {
    /// The config to check (the same as `--config CONFIG`).
    #[arg(value_name = "CONFIG", conflicts_with_all = ["config", "no_config"])]
    pub file: Option<PathBuf>,
    /// The options `run` would be given (emulator, CPUs, model, command line, ...).
    #[command(flatten)]
    pub run: RunArgs,
}

impl CheckArgs {
    /// The run these arguments describe.
    pub fn run_args(&self) -> RunArgs {
        let mut r = self.run.clone();
        if let Some(f) = &self.file {
            r.config = f.clone();
        }
        r
    }
}

#[derive(clap::Args, Debug, Clone)]
pub struct ReportArgs {
    #[command(subcommand)]
    pub what: ReportWhat,
}

#[derive(Subcommand, Debug, Clone)]
pub enum ReportWhat {
    /// Two reports side by side: run figures, then per guest (state, exits by reason,
    /// life, trace totals, kernel when it differs), with B - A and B / A; warns when the
    /// configs, the guest kernels or the outcomes differ.
    Diff {
        a: PathBuf,
        b: PathBuf,
        /// Print the comparison as JSON (rows, warnings, the kinds that differ) instead of
        /// a table.
        #[arg(long)]
        json: bool,
        /// The kinds of difference that make the exit code 1 (comma-separated): `any`
        /// (every kind but `host`), `none`, or of outcome, config, kernels, setup, figures,
        /// host.
        #[arg(long, value_enum, value_delimiter = ',', default_value = "any")]
        fail_on: Vec<crate::diff::FailOn>,
    },
}

#[derive(clap::Args, Debug, Clone)]
pub struct PlotArgs {
    /// Report or bench JSON files.
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// Write the SVGs here (default: next to each file, as FILE-STEM.WHAT.svg).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(clap::Args, Debug, Clone)]
pub struct SchemaArgs {
    /// Which schema to print: the run report's (schemas/report.schema.json) or the config
    /// file's (schemas/config.schema.json, for editors: see docs/config.md).
    #[arg(value_enum, default_value_t = crate::schema::Which::Report)]
    pub which: crate::schema::Which,
    /// Rewrite both files under schemas/ instead of printing one.
    #[arg(long)]
    pub update: bool,
}

#[derive(clap::Args, Debug, Clone)]
pub struct WorkloadsArgs {
    /// Rewrite the generated workload section of docs/config.md instead of printing it.
    #[arg(long)]
    pub update_readme: bool,
}

#[derive(clap::Args, Debug, Clone)]
pub struct FiguresArgs {
    /// Rewrite the generated blocks (else: fail if one differs from its JSON).
    #[arg(long)]
    pub update: bool,
    /// A file to scan for blocks (repeat for several; default: README.md and docs/**/*.md).
    #[arg(long = "file", value_name = "PATH")]
    pub files: Vec<std::path::PathBuf>,
}

#[derive(clap::Args, Debug, Clone)]
pub struct MutantsArgs {
    /// A source file to mutate, relative to the workspace root (repeat for several; default:
    /// caps.rs, channel.rs and config.rs of vmcall-proto, exits.rs and ept.rs of the
    /// hypervisor).
    #[arg(long = "file", value_name = "PATH")]
    pub files: Vec<String>,
    /// Fail if a file has fewer than this percentage of its viable mutants caught.
    #[arg(long, default_value_t = 90.0, value_parser = percent)]
    pub min: f64,
    /// Mutants built and tested at once (each in its own copy of the tree).
    #[arg(long, short = 'j', default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub jobs: u32,
}

fn percent(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(p) if (0.0..=100.0).contains(&p) => Ok(p),
        _ => Err(format!("`{s}` is not a percentage in 0..=100")),
    }
}

#[derive(clap::Args, Debug, Clone)]
pub struct CleanArgs {
    /// Keep this many of the newest run folders.
    #[arg(long, default_value_t = 0)]
    pub keep: usize,
}

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub what: BenchWhat,
}

#[derive(Subcommand, Debug, Clone)]
pub enum BenchWhat {
    /// The channel ring: host transports side by side, and instruction/exit counts in Bochs.
    Channels {
        /// Also write the figures as JSON (keys `host`, `emulated`, `meta`).
        #[arg(long)]
        json: Option<PathBuf>,
        /// Measure the host transports this many times: medians across the repetitions,
        /// with a distribution-free confidence interval (the Bochs figures are exact and
        /// measured once).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
        repeat: u32,
        /// Only the host transports (no Bochs runs).
        #[arg(long, conflicts_with = "bochs_only")]
        host_only: bool,
        /// Only the Bochs runs (exact counts); `--json` then holds their figures alone
        /// (`docs/bench/channels-bochs.json`, read by `cargo xtask figures`).
        #[arg(long)]
        bochs_only: bool,
        /// Also draw the latency histograms next to the JSON (needs --json).
        #[arg(long, requires = "json")]
        plot: bool,
    },
    /// Capability map, copy, move and revoke for 1, 2, 4, 7, 10 and 14 copies (up to 15
    /// emulated CPUs); with `--revoke`, revoke strategies side by side at k = 1..=14, always
    /// on 15 CPUs.
    Caps {
        /// Also write the figures as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Only these numbers of copies (comma-separated; of 1, 2, 4, 7, 10, 14 without
        /// `--revoke`, any of 1..=14 with it): `--k 1` is the quick run for the map and
        /// unmap figures.
        #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(u64).range(1..=14))]
        k: Vec<u64>,
        /// Compare revoke strategies (comma-separated: multicast, broadcast, tree) on generated configs
        /// of 15 CPUs, k = 1..=14 unless `--k` says otherwise.
        #[arg(long, value_delimiter = ',', value_parser = ["multicast", "broadcast", "tree"])]
        revoke: Vec<String>,
        /// The tree's fan-out (2..=16) with `--revoke tree`.
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(2..=16))]
        fanout: u8,
        /// Also draw revoke cost against k next to the JSON (needs --json).
        #[arg(long, requires = "json")]
        plot: bool,
    },
    /// Two guests driving their own cards (e1000, NE2000): interrupt path, round trips, exits.
    Devices {
        /// Also write the figures as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Echo requests per card.
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..=1000))]
        pings: u64,
    },
    /// A controller stopping and starting the peer of its channel, at 2, 4 and 8 CPUs.
    Lifecycle {
        /// Also write the figures as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// The exact Bochs counts (null hypercall, CPUID, PAT MSR exits; the channel library's
    /// round trip, send, receive and stream) against `docs/bench/baseline.json`: fails on a
    /// figure more than 3% above its baseline, printing the table (also run by `cargo xtask
    /// test`).
    Check {
        /// Write this run's figures as the new baseline (then compare against them).
        #[arg(long)]
        update: bool,
    },
    /// The key-value service (configs/kv-{1,2,4,8}.toml) in Bochs under `cargo xtask
    /// load` through the forwarded port: requests/s and latency (host time), the front's
    /// instructions per request, against workers; large values by capability against by
    /// copy; a worker crashing mid-load (requests failed, time to serve again).
    Kv(KvBenchArgs),
    /// The bench configs (exits, polling, doorbell, caps k = 1 and 14) on each test bed side
    /// by side: VT-x on Bochs, SVM on QEMU's TCG, SVM on Bochs's `ryzen` model; exits and
    /// messages per operation, instructions on Bochs (`docs/bench/backends.json`).
    Backends {
        /// Also write the figures as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Only these test beds (comma-separated: vmx-bochs, svm-qemu, svm-bochs-ryzen).
        #[arg(long, value_delimiter = ',')]
        testbeds: Vec<String>,
    },
    /// VM exit round trips per exit reason and the hypervisor's share, at 2, 8 and 15 CPUs.
    Exits {
        /// Also write the figures as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
        /// An earlier run's `--json`: its figures go next to this run's as "before".
        #[arg(long)]
        before: Option<PathBuf>,
        /// The emulated CPU counts to boot (2 to 15, Bochs's limit).
        #[arg(long, value_delimiter = ',', default_values_t = crate::exitbench::CPUS,
              value_parser = clap::value_parser!(u32).range(2..=15))]
        cpus: Vec<u32>,
    },
}

#[derive(clap::Args, Debug, Clone)]
pub struct KvBenchArgs {
    /// Also write the figures as JSON (docs/bench/kv.json is the committed one).
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Also draw requests/s and instructions per request against workers (needs --json).
    #[arg(long, requires = "json")]
    pub plot: bool,
    /// Rewrite the README's kv table from the --json figures.
    #[arg(long, requires = "json")]
    pub update_readme: bool,
    /// With --update-readme: boot nothing, take the figures from the existing --json file.
    #[arg(long, requires = "update_readme")]
    pub only_readme: bool,
    /// The worker counts of the scaling table (comma-separated; configs/kv-N.toml must
    /// exist: 1, 2, 4, 8 are shipped).
    #[arg(long, value_delimiter = ',', default_values_t = crate::kvbench::WORKERS,
          value_parser = clap::value_parser!(u32).range(1..=8))]
    pub workers: Vec<u32>,
    /// Requests per boot.
    #[arg(long, default_value_t = 400, value_parser = clap::value_parser!(u64).range(10..=1_000_000))]
    pub count: u64,
    /// Connections at once (the front serves up to its `backlog`, 4 by default).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=8))]
    pub connections: u32,
    /// Large values' sizes: N or MIN-MAX bytes (the service stores up to 64 KiB).
    #[arg(long, default_value = "8192-32768", value_parser = crate::kvload::parse_range)]
    pub large_bytes: (usize, usize),
    /// The load's seed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

#[derive(clap::Args, Debug, Clone)]
pub struct BuildArgs {
    /// Build the bare-metal images with the dev profile instead of release.
    #[arg(long)]
    pub debug: bool,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Emulator {
    /// Bochs 2.7 with emulated VT-x (EPT, VPID): the test bed.
    Bochs,
    /// QEMU with TCG: no VT-x, so the hypervisor must refuse cleanly.
    Qemu,
    /// QEMU with KVM and `-cpu host,+vmx` or `host,+svm`, whichever the host offers
    /// nested (kvm_intel or kvm_amd with nested=1); refused where /dev/kvm offers neither.
    QemuKvm,
}

impl Emulator {
    pub fn name(self) -> &'static str {
        match self {
            Emulator::Bochs => "bochs",
            Emulator::Qemu => "qemu",
            Emulator::QemuKvm => "qemu-kvm",
        }
    }
}

#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// Which emulator boots the image.
    #[arg(long, value_enum, default_value_t = Emulator::Bochs)]
    pub emulator: Emulator,
    /// Machine description (TOML) to boot; see configs/ and the README's config reference.
    #[arg(long, default_value = "configs/default.toml", conflicts_with = "no_config")]
    pub config: PathBuf,
    /// Boot without a config: bring up the cores only, no guests.
    #[arg(long)]
    pub no_config: bool,
    /// Number of emulated CPUs (default: the config's `machine.cpus`, or 4).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub cpus: Option<u32>,
    /// CPU model: a Bochs `cpu: model=` name, or a QEMU `-cpu` name.
    #[arg(long)]
    pub cpu_model: Option<String>,
    /// Wall-clock limit in seconds; the run is stopped and reported as `timeout` after it.
    #[arg(long, default_value_t = 180, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub timeout: u64,
    /// The run's length in the machine's own time (`500ms`, `3s`): then every guest still
    /// running is stopped (state `ended`) and none is restarted; what `duration_ms=N` on
    /// the hypervisor command line does.
    #[arg(long, value_parser = parse_duration_ms)]
    pub duration: Option<u64>,
    /// Live figures for `cargo xtask top`: each core writes its guest's exits, hypercalls
    /// and messages per channel at most this often (`100ms`, `1s`; machine time, at its
    /// membership probes); what `stats_ms=N` on the hypervisor command line does.
    #[arg(long, value_parser = parse_duration_ms)]
    pub stats: Option<u64>,
    /// Write the JSON run report to this file (`-`: to stdout once the run is over; the
    /// console is then not streamed, as with --quiet).
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Extra words for the hypervisor command line (e.g. `cpus=2 vmxcaps`).
    #[arg(long, default_value = "")]
    pub cmdline: String,
    /// Trace every VM exit (the hypervisor's `trace` word): each guest's exits (reason, TSC)
    /// go to a CSV next to the report (or in the run folder), totals into the report.
    #[arg(long)]
    pub trace: bool,
    /// Also draw the run's figures (see `cargo xtask plot`) next to the report.
    #[arg(long, requires = "report")]
    pub plot: bool,
    /// Do not stream the console (the report and the saved log still have everything):
    /// the global `-q`/`--quiet`.
    #[arg(skip)]
    pub quiet: bool,
    /// Also show the machine records (`#mkv ...` lines, `--trace` records among them) on
    /// the streamed console (also `-vv`); by default it shows the guests' and the
    /// hypervisor's own lines only (the report and the serial log keep everything).
    #[arg(long)]
    pub records: bool,
    /// Boot even when the machine (`--cpus`, `cpus=N`) has fewer cores than the config's
    /// guests need; those guests are then `not_started` and the run `failed`.
    #[arg(long)]
    pub allow_missing_cores: bool,
    #[command(flatten)]
    pub build: BuildArgs,
}

/// `500ms`, `3s`, `1.5s` (or plain milliseconds) as milliseconds, 1 ms to a day.
pub fn parse_duration_ms(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let ms = if let Some(v) = t.strip_suffix("ms") {
        v.trim().parse::<f64>().ok()
    } else if let Some(v) = t.strip_suffix('s') {
        v.trim().parse::<f64>().ok().map(|v| v * 1000.0)
    } else {
        t.parse::<f64>().ok()
    };
    match ms {
        Some(ms) if ms.is_finite() && (1.0..=86_400_000.0).contains(&ms.round()) => {
            Ok(ms.round() as u64)
        }
        _ => Err(format!("`{s}`: expected a length like 500ms or 3s, from 1 ms to a day")),
    }
}

impl RunArgs {
    /// The hypervisor command line: `--cmdline`, and `trace` for `--trace`.
    pub fn hypervisor_cmdline(&self) -> String {
        let mut c = self.cmdline.trim().to_string();
        if let Some(ms) = self.duration {
            if !c.is_empty() {
                c.push(' ');
            }
            c += &format!("duration_ms={ms}");
        }
        if let Some(ms) = self.stats {
            if !c.is_empty() {
                c.push(' ');
            }
            c += &format!("stats_ms={}", ms.min(60_000));
        }
        if self.trace && !c.split_ascii_whitespace().any(|w| w == "trace" || w == "trace=1") {
            if !c.is_empty() {
                c.push(' ');
            }
            c.push_str("trace");
        }
        c
    }

    /// A quiet run of `config` (`None`: cores only) with the defaults of `cargo xtask run`:
    /// what the benchmarks and the system tests start from.
    pub fn quiet(emulator: Emulator, config: Option<&str>) -> Self {
        RunArgs {
            emulator,
            config: config.unwrap_or("configs/default.toml").into(),
            no_config: config.is_none(),
            cpus: None,
            cpu_model: None,
            timeout: 300,
            duration: None,
            stats: None,
            report: None,
            cmdline: String::new(),
            trace: false,
            plot: false,
            quiet: true,
            records: false,
            allow_missing_cores: false,
            build: BuildArgs { debug: false },
        }
    }
}

#[derive(clap::Args, Debug, Clone)]
pub struct TestArgs {
    /// Only the host tests (no emulator).
    #[arg(long)]
    pub host_only: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_args(args: &[&str]) -> Result<RunArgs, clap::Error> {
        let mut v = vec!["cargo xtask", "run"];
        v.extend_from_slice(args);
        match Cli::try_parse_from(v)?.command {
            Command::Run(r) => Ok(r),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn durations_read_as_milliseconds_and_reach_the_command_line() {
        assert_eq!(parse_duration_ms("500ms"), Ok(500));
        assert_eq!(parse_duration_ms("1.5s"), Ok(1500));
        assert_eq!(parse_duration_ms("250"), Ok(250));
        for bad in ["0ms", "-1s", "soon", "2d", "100000s", "NaNs"] {
            assert!(parse_duration_ms(bad).is_err(), "{bad}");
        }
        let r = run_args(&["--duration", "2s", "--cmdline", "cpus=2"]).unwrap();
        assert_eq!(r.hypervisor_cmdline(), "cpus=2 duration_ms=2000");
        let r = run_args(&["--stats", "100ms", "--trace"]).unwrap();
        assert_eq!(r.hypervisor_cmdline(), "stats_ms=100 trace");
        assert!(crate::cmdline::check(&r.hypervisor_cmdline()).is_empty());
        assert_eq!(crate::cmdline::check("stats_ms=0").len(), 1);
        assert!(run_args(&["--duration", "0s"]).is_err());
    }

    #[test]
    fn run_defaults() {
        let r = run_args(&[]).unwrap();
        assert_eq!(r.emulator, Emulator::Bochs);
        assert_eq!(r.cpus, None);
        assert_eq!(r.config, PathBuf::from("configs/default.toml"));
        assert!(!r.no_config);
        assert_eq!(r.cpu_model, None);
        assert!(r.report.is_none());
        assert!(!r.build.debug);
    }

    #[test]
    fn run_options() {
        let r = run_args(&[
            "--emulator",
            "qemu-kvm",
            "--cpus",
            "2",
            "--cpu-model",
            "tigerlake",
            "--timeout",
            "30",
            "--report",
            "r.json",
            "--cmdline",
            "cpus=1",
        ])
        .unwrap();
        assert_eq!(r.emulator, Emulator::QemuKvm);
        assert_eq!((r.cpus, r.timeout), (Some(2), 30));
        assert_eq!(r.cpu_model.as_deref(), Some("tigerlake"));
        assert_eq!(r.report.unwrap(), PathBuf::from("r.json"));
        assert_eq!(r.cmdline, "cpus=1");
    }

    #[test]
    fn bad_arguments_are_refused() {
        assert!(run_args(&["--cpus", "0"]).is_err());
        assert!(run_args(&["--cpus", "65"]).is_err());
        assert!(run_args(&["--emulator", "vmware"]).is_err());
        assert!(run_args(&["--timeout", "0"]).is_err());
        assert!(run_args(&["--frobnicate"]).is_err());
        assert!(run_args(&["--no-config", "--config", "x.toml"]).is_err());
        assert!(Cli::try_parse_from(["cargo xtask"]).is_err());
    }

    #[test]
    fn mutants_arguments() {
        let parse = |args: &[&str]| {
            let mut v = vec!["cargo xtask", "mutants"];
            v.extend_from_slice(args);
            match Cli::try_parse_from(v)?.command {
                Command::Mutants(m) => Ok::<_, clap::Error>(m),
                other => panic!("parsed as {other:?}"),
            }
        };
        let m = parse(&[]).unwrap();
        assert!(m.files.is_empty());
        assert_eq!((m.min, m.jobs), (90.0, 1));
        let m = parse(&["--file", "a.rs", "--file", "b.rs", "--min", "75.5", "-j", "2"]).unwrap();
        assert_eq!(m.files, ["a.rs", "b.rs"]);
        assert_eq!((m.min, m.jobs), (75.5, 2));
        for bad in [&["--min", "101"][..], &["--min", "-1"], &["--min", "x"], &["-j", "0"]] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn usage_names_cargo_xtask_and_version_is_offered() {
        // Whatever path the binary was started by, usage says how to call it.
        let e = Cli::try_parse_from(["/w/target/release/xtask", "run", "--frob"]).unwrap_err();
        assert!(e.to_string().contains("Usage: cargo xtask run"), "{e}");
        let e = Cli::try_parse_from(["xtask", "--version"]).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::DisplayVersion);
        assert!(e.to_string().contains(env!("CARGO_PKG_VERSION")), "{e}");
        assert_eq!(e.exit_code(), 0);
        let e = Cli::try_parse_from(["xtask", "run", "--frob"]).unwrap_err();
        assert_eq!(e.exit_code(), i32::from(crate::exit::USAGE));
    }

    #[test]
    fn trace_adds_the_hypervisor_word() {
        assert_eq!(run_args(&["--trace"]).unwrap().hypervisor_cmdline(), "trace");
        let r = run_args(&["--trace", "--cmdline", "cpus=2"]).unwrap();
        assert_eq!(r.hypervisor_cmdline(), "cpus=2 trace");
        let r = run_args(&["--trace", "--cmdline", "trace"]).unwrap();
        assert_eq!(r.hypervisor_cmdline(), "trace");
        assert_eq!(run_args(&["--cmdline", "cpus=2"]).unwrap().hypervisor_cmdline(), "cpus=2");
    }

    #[test]
    fn every_subcommand_s_help_lists_its_exit_codes() {
        let all = subcommands();
        assert!(all.len() >= 25 && all.contains(&"bench check".to_string()), "{all:?}");
        for name in &all {
            let mut args = vec!["cargo xtask"];
            args.extend(name.split(' '));
            args.push("--help");
            let e = command().try_get_matches_from(&args).unwrap_err();
            assert_eq!(e.kind(), clap::error::ErrorKind::DisplayHelp, "{name}");
            let help = e.to_string();
            let codes = crate::exit::codes_of(name).unwrap_or_else(|| panic!("{name}: no codes"));
            assert!(help.contains("Exit codes:\n"), "{name}:\n{help}");
            for (code, meaning) in codes {
                let line = format!("  {code:>3}  {}", meaning.split_whitespace().next().unwrap());
                assert!(help.contains(&line), "{name}: no `{line}` in\n{help}");
            }
            // `-h` too.
            args.pop();
            args.push("-h");
            let e = command().try_get_matches_from(&args).unwrap_err();
            assert!(e.to_string().contains("Exit codes:\n"), "{name} -h");
        }
        // And no table for a command that is not there.
        for (name, _) in crate::exit::BY_COMMAND {
            assert!(all.iter().any(|a| a == name), "exit::BY_COMMAND names `{name}`");
        }
        let top = command().try_get_matches_from(["cargo xtask", "--help"]).unwrap_err();
        assert!(top.to_string().contains("130  interrupted"), "{top}");
    }

    #[test]
    fn verbose_and_quiet_are_cargo_s_on_every_command() {
        let parse = |args: &[&str]| {
            let mut v = vec!["cargo xtask"];
            v.extend_from_slice(args);
            Cli::try_parse_from(v)
        };
        for name in subcommands() {
            let mut words: Vec<&str> = name.split(' ').collect();
            // The arguments a command needs before it parses.
            let needs: &[&str] = match name.as_str() {
                "new-guest" => &["d"],
                "plot" => &["f.json"],
                "report diff" => &["a.json", "b.json"],
                "ctl" => &["1", "query", "w1"],
                "bench" | "report" => continue,
                _ => &[],
            };
            words.extend_from_slice(needs);
            let cases: [(&[&str], (bool, u8)); 5] = [
                (&["-q"], (true, 0)),
                (&["--quiet"], (true, 0)),
                (&["-v"], (false, 1)),
                (&["-vv"], (false, 2)),
                (&["--verbose", "--verbose"], (false, 2)),
            ];
            for (flags, want) in cases {
                let mut args = words.clone();
                args.extend_from_slice(flags);
                let cli = parse(&args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
                assert_eq!((cli.quiet, cli.verbose), want, "{args:?}");
            }
            let mut args = words.clone();
            args.extend_from_slice(&["-q", "-v"]);
            assert!(parse(&args).is_err(), "{args:?}: -q with -v");
        }
        // Before the command too.
        assert!(parse(&["-q", "run"]).unwrap().quiet);
        assert_eq!(parse(&["-vv", "check"]).unwrap().verbose, 2);
    }

    #[test]
    fn clap_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        command().debug_assert();
    }
}
