// SPDX-License-Identifier: MIT OR Apache-2.0
//! Whole-system tests of the capability layer as far as it goes: granted memory as a
//! capability, identify/split/map/unmap with every refusal checked from inside the guest,
//! and an access after unmap contained.

use systests::boot_config;
use xtask::cli::Emulator;

#[test]
fn granted_memory_is_mapped_only_through_its_capability() {
    let b = boot_config(Emulator::Bochs, None, None, "", Some("configs/caps.toml"));
    let keeper = b.report.guests.iter().find(|g| g.name == "keeper").expect("keeper");
    assert_eq!((keeper.state.as_str(), keeper.exit_status), ("exited", 0), "{keeper:?}");
    for check in [
        "cap: slot 0 is type 1, rights 0b111, 4096 KiB",
        "cap: wrote 512 pages through the mapping, read back 0x5eed01ff",
        "cap: identify a forged slot: Err(Ok(NoSuchSlot)) as expected",
        "cap: map over a busy address: Err(Ok(AddressInUse)) as expected",
        "cap: map misaligned: Err(Ok(Misaligned)) as expected",
        "cap: map outside the grant window: Err(Ok(BadAddress)) as expected",
        "cap: map with GRANT as a right: Err(Ok(BadArgument)) as expected",
        "cap: split a mapped cap: Err(Ok(AlreadyMapped)) as expected",
        "cap: map an endpoint: Err(Ok(WrongType)) as expected",
        "cap: the same memory, read-only at 0xc0200000: 0x5eed0000",
    ] {
        assert!(b.serial.contains(&format!("[keeper@c0] {check}")), "missing: {check}");
    }
    assert!(!b.serial.contains("[keeper@c0] ERROR"));
    // The other guest reads its region after unmapping it: stopped at that address.
    let spent = b.report.guests.iter().find(|g| g.name == "spent").expect("spent");
    assert_eq!(spent.state, "stopped");
    let f = spent.fault.as_deref().unwrap_or_default();
    assert!(f.starts_with("EPT violation: read at guest-physical 0xc0000000"), "{f}");
}
