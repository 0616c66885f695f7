// SPDX-License-Identifier: MIT OR Apache-2.0
//! The randomized fault campaign (`cargo xtask chaos`) with fixed seeds: each draws a
//! machine (streams with a restarted echoer, large maps in small pages, revokes of large
//! mapped copies whose holders then probe them, spinners, controllers stopping, restarting
//! or parking a guest at a random time, sometimes a hung core or a deaf one, the detector
//! at various periods), boots it in Bochs and must keep every invariant
//! (`xtask::chaos::check`). Longer campaigns with random seeds run on demand:
//! `cargo xtask chaos --runs 50`.

/// The seeds CI runs, picked to cover every kind of unit, controllers, a hung core and
/// both sides of the detector's timeout for a deaf core (about 10-45 s of Bochs each): 5 (a
/// controller parks the core of a stream's echoer 110 ms in and brings it back while 1,786
/// messages stream; a spinner whose core is deaf 18 ms, under the 200 ms timeout: not
/// fenced; probe_ms 25, four cores), 21 (a controller restarts a stream's echoer 30 ms in;
/// probe_ms 25), 16 (a controller restarts a spinner; a stream whose echoer dies after 266
/// echoes and is restarted by policy; probe_ms 16), 40 (a 74 MiB copy mapped in 4-KiB pages
/// and revoked, its holder stopped reading page 18,943 of it afterwards; a spinner on core 2,
/// which hangs; probe_ms 12), 71 (a 114 MiB copy in 4-KiB pages whose holder's core is deaf
/// 13 ms, under the 128 ms timeout, while the copy is sent: not fenced, the revoke `Ok(1)`,
/// the holder stopped at its probe page), 55 (the holder's core deaf 292 ms, over the 96 ms
/// timeout: fenced, the owner's wait for it ends `PeerGone` and its revoke `Timeout`), 15 (a
/// deafness in the band between half and twice the timeout: core 3 deaf 172 ms against 96
/// ms, fenced cleanly by every core, its spinner stopped for good as it heard, while a
/// controller parks and brings back the echoer of a stream; about 19 s).
const SEEDS: [u64; 7] = [5, 21, 16, 40, 71, 55, 15];

#[test]
fn fixed_seeds_keep_every_invariant() {
    let mut failures = Vec::new();
    for seed in SEEDS {
        let s = xtask::chaos::scenario(seed);
        eprintln!("chaos seed {seed}: {}", s.summary.join("; "));
        let o = xtask::chaos::run_one(&s).expect("the run could not be attempted");
        for b in o.broken {
            failures.push(format!("seed {seed}: {b}"));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// Issue 24: one seed on QEMU/SVM. Most invariants here are about the failure detector's
/// timing (no live core suspected with a 96-200 ms timeout, a deafness over or under it,
/// every stretch away from the inbox under it); under TCG the TSC is host time and a loaded
/// host starves vCPUs for longer than that, so those invariants would measure QEMU's
/// scheduling, not the hypervisor. This seed draws the detector off and neither a hung nor
/// a deaf core: a stream whose echoer dies after 291 echoes and is restarted by policy,
/// while a controller holds a spinner 47 ms in; what is checked is what does not depend
/// on time (every guest's end, every message accounted for, each incarnation starts with
/// the same frames and capabilities, no problem in the records).
#[test]
fn a_seed_without_detector_keeps_every_invariant_on_qemu_svm() {
    let s = xtask::chaos::scenario(QEMU_SEED);
    assert_eq!((s.probe_ms, s.hung.is_none(), s.deaf.is_none()), (0, true, true), "{s:?}");
    eprintln!("chaos seed {QEMU_SEED} on QEMU: {}", s.summary.join("; "));
    let o = xtask::chaos::run_one_on(&s, xtask::cli::Emulator::Qemu).expect("the run");
    assert!(o.broken.is_empty(), "{:#?}", o.broken);
}

const QEMU_SEED: u64 = 39;
