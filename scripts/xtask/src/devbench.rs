// SPDX-License-Identifier: MIT OR Apache-2.0
//! `cargo xtask bench devices`: two guests each drive their own card through the guest SDK's
//! drivers (`guestkernel::nic`: an e1000 with DMA, an NE2000 by port I/O), in Bochs where the
//! TSC counts emulated instructions: the interrupt path from the card raising it to the
//! guest's handler (software-raised causes), from the handler to the halted waiter, ARP and
//! ping round trips with slirp's gateway, and the VM exits the owner's core took. A
//! benchmark: it prints figures, it passes or fails nothing.
//!
//! Owns the config and the parsing of the workload's `bench nic-*` lines; calls `bench`
//! (booting a config variant) and `run` (through it).

use anyhow::{Context, Result};
use serde::Serialize;

/// One card's figures, in emulated instructions unless named otherwise.
#[derive(Serialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct Row {
    pub model: String,
    pub bdf: String,
    /// Software-raised interrupt to the guest's handler: samples, min, median, max.
    pub irq_samples: u64,
    pub irq_min_instructions: u64,
    pub irq_median_instructions: u64,
    pub irq_max_instructions: u64,
    /// The handler to the halted waiter running again (waits the card's interrupt ended).
    pub wake_samples: u64,
    pub wake_min_instructions: u64,
    pub wake_max_instructions: u64,
    pub arp_instructions: u64,
    pub pings: u64,
    pub ping_min_instructions: u64,
    pub ping_max_instructions: u64,
    pub interrupts: u64,
    pub frames_sent: u64,
    pub frames_received: u64,
    /// VM exits of the owner for the whole run, by kind: configuration-space accesses (port
    /// I/O exits: its card's own ports never exit), hypercalls (the console lines and the
    /// exit), and every other exit.
    pub exits_io: u64,
    pub exits_vmcall: u64,
    pub exits_other: u64,
}

/// The numbers of a line, in order.
fn numbers(l: &str) -> Vec<u64> {
    l.split(|c: char| !c.is_ascii_digit()).filter_map(|w| w.parse().ok()).collect()
}

/// The card figures a guest printed (lines of `serial` tagged `[guest@c..] `).
pub fn parse(serial: &str, guest: &str) -> Option<Row> {
    let tag = format!("[{guest}@c");
    let mine: Vec<&str> = serial
        .lines()
        .filter(|l| l.starts_with(&tag))
        .filter_map(|l| l.split_once("] ").map(|(_, rest)| rest))
        .collect();
    let find = |p: &str| mine.iter().copied().find(|l| l.starts_with(p));
    let mut r = Row::default();
    let done = find("nic: done: ")?;
    let words: Vec<&str> = done.split_whitespace().collect();
    r.model = words.get(2)?.to_string();
    r.bdf = words.get(3)?.trim_end_matches(':').to_string();
    // "<model> <bdf>: I interrupts, S frames sent, R received, ..."
    let tail: Vec<u64> = numbers(done.split_once(&format!("{}: ", r.bdf)).map_or("", |(_, t)| t));
    (r.interrupts, r.frames_sent, r.frames_received) =
        (*tail.first()?, *tail.get(1)?, *tail.get(2)?);
    let model = r.model.clone();
    if let Some(l) = find(&format!("bench nic-irq-latency {model}: ")) {
        let v = numbers(l.split_once(": ").map_or("", |(_, t)| t));
        (
            r.irq_samples,
            r.irq_min_instructions,
            r.irq_median_instructions,
            r.irq_max_instructions,
        ) = (v[0], v[1], v[2], v[3]);
    }
    if let Some(l) = find(&format!("bench nic-wake {model}: ")) {
        let v = numbers(l.split_once(": ").map_or("", |(_, t)| t));
        (r.wake_samples, r.wake_min_instructions, r.wake_max_instructions) = (v[0], v[1], v[2]);
    }
    if let Some(l) = find(&format!("nic: {model}: ARP: ")) {
        r.arp_instructions = *numbers(l.split_once('(').map_or("", |(_, t)| t)).first()?;
    }
    if let Some(l) = find(&format!("bench nic-ping {model}: ")) {
        let v = numbers(l.split_once(": ").map_or("", |(_, t)| t));
        (r.pings, r.ping_min_instructions, r.ping_max_instructions) = (v[0], v[1], v[2]);
    }
    Some(r)
}

fn config(pings: u64) -> String {
    format!(
        "[machine]\ncpus = 2\nmemory_mib = 128\nprobe_ms = 0\n\n\
         [[nic]]\nmodel = \"e1000\"\n\n[[nic]]\nmodel = \"ne2k\"\n\n\
         [[guest]]\nname = \"intel\"\ncore = 0\nmemory_mib = 16\nworkload = \"nic\"\n\
         args = {{ pings = {pings}, latency = 32 }}\n\
         devices = [{{ pci = \"00:02.0\", dma = \"unconfined\" }}]\n\n\
         [[guest]]\nname = \"realtek\"\ncore = 1\nmemory_mib = 16\nworkload = \"nic\"\n\
         args = {{ pings = {pings}, latency = 32 }}\ndevices = [\"10ec:8029\"]\n"
    )
}

/// `cargo xtask bench devices`.
pub fn devices(json: Option<&std::path::Path>, pings: u64) -> Result<()> {
    let r = crate::bench::boot_variant("bench-devices.toml", &config(pings), "")?;
    let serial = std::fs::read_to_string(&r.serial_log)?;
    let mut rows = Vec::new();
    for g in ["intel", "realtek"] {
        let mut row = parse(&serial, g).with_context(|| format!("{g}: no `nic: done:` line"))?;
        let gr = r.guests.iter().find(|x| x.name == g).context("guest missing from the report")?;
        let count = |k: &str| gr.exits.get(k).copied().unwrap_or(0);
        row.exits_io = count("io");
        row.exits_vmcall = count("vmcall");
        row.exits_other = gr.exits.values().sum::<u64>() - row.exits_io - row.exits_vmcall;
        rows.push(row);
    }
    println!(
        "Devices in Bochs (emulated instructions; {pings} pings per card, 32 interrupt samples; \
         probes off; run {:.1} s wall)",
        r.wall_seconds
    );
    let mut t = crate::bench::table(&[
        "card",
        "irq -> handler (min/med/max)",
        "handler -> waiter",
        "ARP",
        "ping RTT (min/max)",
        "interrupts",
        "frames out/in",
        "exits: config io / vmcall / other",
        "other exits per frame",
    ]);
    for x in &rows {
        let frames = (x.frames_sent + x.frames_received).max(1);
        t.add_row([
            format!("{} {}", x.model, x.bdf),
            format!(
                "{}/{}/{}",
                x.irq_min_instructions, x.irq_median_instructions, x.irq_max_instructions
            ),
            format!(
                "{}..{} ({} waits)",
                x.wake_min_instructions, x.wake_max_instructions, x.wake_samples
            ),
            x.arp_instructions.to_string(),
            format!("{}/{}", x.ping_min_instructions, x.ping_max_instructions),
            x.interrupts.to_string(),
            format!("{}/{}", x.frames_sent, x.frames_received),
            format!("{} / {} / {}", x.exits_io, x.exits_vmcall, x.exits_other),
            format!("{:.3}", x.exits_other as f64 / frames as f64),
        ]);
    }
    println!("{t}");
    println!(
        "Bochs has no cache model and completes a transmit, slirp's reply included, inside the \
         tail-register write: on hardware a round trip costs the wire and the peer, and the \
         interrupt path costs cache misses these counts do not show."
    );
    crate::bench::save(json, &serde_json::json!({ "devices": rows, "pings": pings }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "\
[intel@c0] nic: e1000: ARP: 10.0.2.2 is at 52:55:0a:00:02:02 (460 TSC ticks after the request)
[intel@c0] bench nic-irq-latency e1000: 8 samples, TSC ticks trigger to handler: min 20 median 25 max 25
[intel@c0] bench nic-ping e1000: 3 echo replies, round trip TSC ticks min 890 max 890
[intel@c0] bench nic-wake e1000: 2 waits ended by the card's interrupt, TSC ticks from handler to waiter: min 45 max 50
[intel@c0] nic: done: e1000 00:02.0: 8 interrupts, 4 frames sent, 5 received, 0 dropped, 0 overruns; 0 unclaimed; exit 0
[other@c1] nic: done: ne2k 00:03.0: 1 interrupts, 1 frames sent, 1 received, 0 dropped, 0 overruns; 0 unclaimed; exit 0
";

    #[test]
    fn card_lines_parse() {
        let r = parse(LOG, "intel").unwrap();
        assert_eq!((r.model.as_str(), r.bdf.as_str()), ("e1000", "00:02.0"));
        assert_eq!((r.interrupts, r.frames_sent, r.frames_received), (8, 4, 5));
        assert_eq!(
            (
                r.irq_samples,
                r.irq_min_instructions,
                r.irq_median_instructions,
                r.irq_max_instructions
            ),
            (8, 20, 25, 25)
        );
        assert_eq!((r.wake_samples, r.wake_min_instructions, r.wake_max_instructions), (2, 45, 50));
        assert_eq!(
            (r.arp_instructions, r.pings, r.ping_min_instructions, r.ping_max_instructions),
            (460, 3, 890, 890)
        );
        assert_eq!(parse(LOG, "other").unwrap().model, "ne2k");
        assert!(parse(LOG, "nobody").is_none());
    }

    #[test]
    fn the_config_compiles() {
        assert!(crate::config::compile("x.toml", &config(50)).is_ok(), "{}", config(50));
    }
}
