// SPDX-License-Identifier: MIT OR Apache-2.0
//! Whole-system tests of device assignment from the guests' side (workload `nic`): each
//! guest sees exactly its own PCI functions, brings its card up with the runtime's driver
//! (e1000 with DMA into its partition, NE2000 through port I/O), takes the card's
//! interrupts through its own IDT, and talks to the emulator's user-mode network; a guest
//! with no device has no PCI at all. Assertions are on the report and the console, never
//! on timing. Each file's main cases run on Bochs/VT-x and on QEMU/SVM (`*_on_qemu_svm`,
//! the same bodies): under SVM the card's interrupts are virtualized, so each costs exits
//! there (asserted exactly: one EOI exit per interrupt the guest took) and none on VT-x.

use systests::{boot_config, Boot};
use xtask::cli::Emulator;

/// The guest exited 0 and said `line` (after its console tag).
fn said(b: &Boot, guest: &str, line: &str) -> bool {
    let g = b.guest(guest);
    let tag = format!("[{guest}@c{}] ", g.core);
    b.serial.lines().any(|l| l.strip_prefix(&tag).is_some_and(|l| l.starts_with(line)))
}

/// How many interrupts the guest's card raised to it (its `nic: done:` line).
fn interrupts(b: &Boot, guest: &str, model: &str, bdf: &str) -> u64 {
    let tag = format!("[{guest}@c{}] nic: done: {model} {bdf}: ", b.guest(guest).core);
    b.serial
        .lines()
        .find_map(|l| l.strip_prefix(&tag)?.split_once(" interrupts")?.0.parse().ok())
        .unwrap_or_else(|| panic!("{guest}: no done line\n{}", b.serial))
}

/// The card's interrupts reached the guest's IDT: under VT-x without an exit; under SVM
/// (`svm`) each through the host: an `external_interrupt` exit (or one taken at the end
/// of another exit) and exactly one EOI exit (`wrmsr`) per interrupt the guest took.
fn assert_interrupt_exits(b: &Boot, guest: &str, model: &str, bdf: &str, svm: bool) {
    let g = b.guest(guest);
    let n = interrupts(b, guest, model, bdf);
    assert!(n >= 8, "{guest}: {n} interrupts");
    let count = |k: &str| g.exits.get(k).copied().unwrap_or(0);
    if svm {
        assert_eq!(count("wrmsr"), n, "{guest}: one EOI exit per interrupt: {:?}", g.exits);
        let intr = count("external_interrupt");
        assert!((1..=n + 1).contains(&intr), "{guest}: {n} interrupts: {:?}", g.exits);
    } else {
        assert!(!g.exits.contains_key("external_interrupt"), "{:?}", g.exits);
        assert!(!g.exits.contains_key("wrmsr"), "{:?}", g.exits);
    }
}

fn assert_card(b: &Boot, guest: &str, model: &str, bdf: &str, pings: u32) {
    let g = b.guest(guest);
    assert_eq!((g.state.as_str(), g.exit_status), ("exited", 0), "{g:?}\n{}", b.serial);
    assert!(said(b, guest, "nic: isolation: I see exactly my 1 function(s)"), "{guest}");
    assert!(said(b, guest, &format!("nic: {model} {bdf}: up in ")), "{guest}");
    assert!(said(b, guest, &format!("nic: {model}: ARP: 10.0.2.2 is at ")), "{guest}");
    for seq in 1..=pings {
        let want = format!("nic: {model}: echo reply from 10.0.2.2 seq {seq}: 32 bytes");
        assert!(said(b, guest, &want), "{guest}: {want}");
    }
    // Interrupts came through the guest's own IDT: the software-raised ones at least.
    assert!(said(b, guest, &format!("bench nic-irq-latency {model}: 8 samples")), "{guest}");
    assert!(said(b, guest, &format!("nic: done: {model} {bdf}: ")), "{guest}");
    assert_interrupt_exits(b, guest, model, bdf, b.report.emulator == "qemu");
}

#[test]
fn two_guests_own_two_cards_and_a_third_sees_no_pci() {
    two_cards(Emulator::Bochs);
}

/// The same on AMD SVM under QEMU's TCG: QEMU's e1000 and ne2k_pci at the same addresses,
/// its user-mode networks, q35's interrupt wiring (PIRQ G and H: inputs 22 and 23, where
/// Bochs's firmware routes them to lines 9 and 11).
#[test]
fn two_guests_own_two_cards_and_a_third_sees_no_pci_on_qemu_svm() {
    let b = two_cards(Emulator::Qemu);
    assert!(b.serial.contains("[c0] backend: svm"), "{}", b.serial);
    let line = |bdf: &str| b.report.devices.iter().find(|d| d.bdf == bdf).map(|d| d.line);
    assert_eq!((line("00:02.0"), line("00:03.0")), (Some(22), Some(23)));
}

fn two_cards(emulator: Emulator) -> Boot {
    let b = boot_config(emulator, None, None, "", Some("configs/nic.toml"));
    assert_eq!(b.report.outcome, "ok", "{:?}\n{}", b.report.problems, b.serial);
    assert_card(&b, "intel", "e1000", "00:02.0", 3);
    assert_card(&b, "realtek", "ne2k", "00:03.0", 3);
    // Each saw only its own card on bus 0 (the host bridge and the PIIX3 read all ones).
    let line = |g: &str| {
        b.serial
            .lines()
            .find(|l| l.contains(&format!("[{g}@")) && l.contains("nic: bus 0,"))
            .map(str::to_string)
    };
    assert!(
        line("intel").is_some_and(|l| l.ends_with(": 00:02.0 8086:100e")),
        "{:?}",
        line("intel")
    );
    assert!(
        line("realtek").is_some_and(|l| l.ends_with(": 00:03.0 10ec:8029")),
        "{:?}",
        line("realtek")
    );
    let nodev = b.guest("nodev");
    assert_eq!((nodev.state.as_str(), nodev.exit_status), ("exited", 0), "{nodev:?}");
    assert!(said(&b, "nodev", "nic: done: no device; configuration ports raise vector 13 (#GP)"));
    // Registers cost no exit: memory BARs are mapped, I/O BARs open in the bitmap. The only
    // port exits are configuration-space accesses (the bus-0 scan, 64 of them, and a few
    // to enable the card); no EPT violation.
    for g in ["intel", "realtek"] {
        let e = &b.guest(g).exits;
        assert!(e.get("io").copied().unwrap_or(0) <= 128, "{g}: {e:?}");
        assert!(!e.contains_key("ept_violation"), "{g}: {e:?}");
    }
    // The report lists every function found and who owns which.
    let r = &b.report;
    let dev = |bdf: &str| {
        r.devices.iter().find(|d| d.bdf == bdf).unwrap_or_else(|| panic!("{bdf}: {:?}", r.devices))
    };
    let e1000 = dev("00:02.0");
    assert_eq!(
        (e1000.id.as_str(), e1000.owner.as_deref(), e1000.dma.as_deref(), e1000.vector),
        ("8086:100e", Some("intel"), Some("unconfined"), Some(0x50))
    );
    assert!(e1000.owner_bars.as_deref().unwrap().starts_with("0:mem32:40000000->"), "{e1000:?}");
    let ne2k = dev("00:03.0");
    assert_eq!(
        (ne2k.id.as_str(), ne2k.owner.as_deref(), ne2k.dma.as_deref()),
        ("10ec:8029", Some("realtek"), Some("off"))
    );
    assert_eq!((dev("00:00.0").class.as_str(), dev("00:00.0").owner.as_deref()), ("060000", None));
    assert_eq!(r.devices.iter().filter(|d| d.owner.is_some()).count(), 2);
    systests::assert_matches_schema(r);
    b
}

#[test]
fn a_guest_echoes_udp_from_the_host_through_its_card() {
    udp_echo(Emulator::Bochs);
}

/// The same through QEMU's user-mode network and host forwarding, on SVM.
#[test]
fn a_guest_echoes_udp_from_the_host_through_its_card_on_qemu_svm() {
    udp_echo(Emulator::Qemu);
}

/// The Bochs and QEMU runs forward the same host port: one at a time (the tests of a file
/// run at once).
static PORT: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn udp_echo(emulator: Emulator) {
    let _port = PORT.lock().unwrap_or_else(|e| e.into_inner());
    // The host side: datagram 0 until an echo comes back (the guest is up only seconds
    // into the run; slirp queues or drops what comes before, and the guest may echo queued
    // copies), then one new datagram after each echo, until the run ends.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let client = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            s.set_read_timeout(Some(std::time::Duration::from_millis(300))).unwrap();
            let (mut echoes, mut next) = (Vec::new(), 0);
            let mut buf = [0u8; 2048];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let msg = format!("datagram {next} from the host");
                let _ = s.send_to(msg.as_bytes(), "127.0.0.1:15557");
                if let Ok((n, from)) = s.recv_from(&mut buf) {
                    assert_eq!(from.port(), 15557);
                    echoes.push(String::from_utf8_lossy(&buf[..n]).into_owned());
                    next += 1;
                }
            }
            (echoes, next)
        })
    };
    let b = boot_config(emulator, None, None, "", Some("configs/nic-echo.toml"));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (echoes, sent) = client.join().unwrap();
    assert_eq!(b.report.outcome, "ok", "{:?}\n{}", b.report.problems, b.serial);
    assert_card(&b, "echo", "e1000", "00:02.0", 1);
    assert_eq!(b.serial.matches("nic: e1000: echoed 24 bytes to 10.0.2.2:").count(), 3);
    // Every echo is a datagram the host sent, unchanged.
    assert!(!echoes.is_empty() && echoes.len() <= 3, "{echoes:?}");
    for e in &echoes {
        let k: usize = e
            .strip_prefix("datagram ")
            .and_then(|r| r.strip_suffix(" from the host"))
            .and_then(|k| k.parse().ok())
            .unwrap_or_else(|| panic!("not a datagram of ours: {e:?}"));
        assert!(k <= sent, "{e:?}");
    }
}

#[test]
fn a_card_owner_restarted_in_traffic_finds_its_card_quiesced_and_brings_it_up_again() {
    let b = boot_config(Emulator::Bochs, None, None, "", Some("configs/nic-restart.toml"));
    assert_eq!(b.report.outcome, "ok", "{:?}\n{}", b.report.problems, b.serial);
    let g = b.guest("phoenix");
    assert_eq!((g.state.as_str(), g.exit_status, g.incarnations.len()), ("exited", 0, 2), "{g:?}");
    // The guest's own #UD handler ends the first incarnation with a non-zero status, which
    // its `on-fault` policy restarts.
    let first = &g.incarnations[0];
    assert!(first.exit_status.is_some_and(|s| s != 0), "{first:?}");
    assert!(said(&b, "phoenix", "nic: crash: 8 echo requests sent, replies due"));
    // The second found the card as the hypervisor left it at the death, its memory clean.
    // (Bochs's e1000 keeps only the low three bits of the command register: the INTx
    // disable the hypervisor sets does not read back there.)
    let found = b
        .serial
        .lines()
        .find(|l| l.contains("[phoenix@c0] nic: incarnation 2: 00:02.0 found with command"))
        .expect("the second incarnation's look at its card");
    assert!(found.ends_with("bus mastering off (quiesced at the death)"), "{found}");
    assert!(said(
        &b,
        "phoenix",
        "nic: incarnation 2: the dead incarnation's buffer reads 0 non-zero bytes"
    ));
    // ... and brought the link up again: the whole exchange once more, after the restart.
    let replies =
        b.serial.lines().filter(|l| l.contains("e1000: echo reply from 10.0.2.2 seq 3")).count();
    assert_eq!(replies, 2, "seq 3 answered in both incarnations");
    assert!(said(&b, "phoenix", "nic: done: e1000 00:02.0: "));
    assert_eq!(b.guest("bystander").exit_status, 0);
}
