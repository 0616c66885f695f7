// SPDX-License-Identifier: MIT OR Apache-2.0
//! The I/O APIC, as far as device assignment needs it: route an owned function's INTx line
//! to its owner's core at the owner's vector, and mask it again at the owner's death.
//!
//! Each line belongs to one guest (the config check and `super::assign` refuse lines shared
//! across guests), so each redirection entry is written by one core only. The I/O APIC's
//! registers are reached through one index/data pair (IOREGSEL, IOWIN: 82093AA datasheet,
//! 3.0), so two cores writing different entries would still interleave on the pair: every
//! access takes [`LOCK`], at guest setup and death only, never on the interrupt path
//! (interrupts reach the guest through its own IDT without the hypervisor).
//!
//! Routing: a PCI INTx line is level-triggered and active low (PCI 3.0, 2.2.6) unless the
//! MADT's interrupt source override for that ISA IRQ says otherwise; the line number is the
//! one the firmware wrote in the function's interrupt-line register, taken as the I/O APIC
//! input (what the i440FX/PIIX3 machines of Bochs and QEMU do). A machine that routes PCI
//! interrupts to other inputs describes that only in its ACPI `_PRT` (AML), which mkvisor
//! does not interpret.
//!
//! May call: `arch` (MMIO through the identity map).

/// What the MADT says about the I/O APIC and the ISA IRQ overrides.
#[derive(Clone, Copy, Debug, Default)]
pub struct Platform {
    /// Physical address of the first I/O APIC and its first global system interrupt.
    pub base: u64,
    pub gsi_base: u32,
    /// ISA IRQ overrides: (irq, gsi, MPS INTI flags).
    pub overrides: [(u8, u32, u16); 16],
    pub override_count: usize,
}

/// Polarity and trigger of a line: (active low, level).
pub fn line_mode(p: &Platform, line: u8) -> (u32, bool, bool) {
    for &(irq, gsi, flags) in &p.overrides[..p.override_count] {
        if irq == line {
            // MPS INTI flags: polarity bits 1:0 (3 = active low), trigger bits 3:2 (3 = level);
            // 0 means "conforms to the bus" (ISA: high, edge).
            let low = flags & 3 == 3;
            let level = (flags >> 2) & 3 == 3;
            return (gsi, low, level);
        }
    }
    (line as u32, true, true)
}

/// A redirection entry (82093AA 3.2.4): vector, fixed delivery, physical destination.
pub fn entry(vector: u8, apic: u32, low: bool, level: bool, masked: bool) -> u64 {
    (vector as u64)
        | (low as u64) << 13
        | (level as u64) << 15
        | (masked as u64) << 16
        | ((apic as u64) & 0xff) << 56
}

#[cfg(target_os = "none")]
mod hw {
    use super::*;

    static PLATFORM: spin::Once<Platform> = spin::Once::new();
    static LOCK: spin::Mutex<()> = spin::Mutex::new(());

    /// Records the MADT's I/O APIC (the BSP, at boot).
    pub fn set_platform(p: Platform) {
        PLATFORM.call_once(|| p);
    }

    fn platform() -> Option<&'static Platform> {
        PLATFORM.get().filter(|p| p.base != 0)
    }

    fn write_reg(base: u64, index: u32, value: u32) {
        // IOREGSEL at +0, IOWIN at +0x10; the caller holds LOCK.
        // SAFETY: the I/O APIC's MMIO page is identity-mapped uncached (the boot map's top GiB).
        unsafe {
            core::ptr::write_volatile(base as *mut u32, index);
            core::ptr::write_volatile((base + 0x10) as *mut u32, value);
        }
    }

    fn read_reg(base: u64, index: u32) -> u32 {
        // SAFETY: as for `write_reg`.
        unsafe {
            core::ptr::write_volatile(base as *mut u32, index);
            core::ptr::read_volatile((base + 0x10) as *const u32)
        }
    }

    /// Inputs this I/O APIC has (its version register, bits 23:16, plus one).
    fn inputs(p: &Platform) -> u32 {
        let _g = LOCK.lock();
        ((read_reg(p.base, 1) >> 16) & 0xff) + 1
    }

    /// Writes redirection entry `gsi`: high half first while masked, then the low half.
    fn set_entry(p: &Platform, gsi: u32, e: u64) -> Result<(), &'static str> {
        let pin = gsi.checked_sub(p.gsi_base).ok_or("interrupt below the I/O APIC")?;
        if pin >= inputs(p) {
            return Err("interrupt past the I/O APIC's inputs");
        }
        let _g = LOCK.lock();
        let idx = 0x10 + 2 * pin;
        write_reg(p.base, idx, 1 << 16);
        write_reg(p.base, idx + 1, (e >> 32) as u32);
        write_reg(p.base, idx, e as u32);
        Ok(())
    }

    /// Routes ISA/PCI line `line` to `apic` at `vector`, unmasked. Returns the input used.
    pub fn route(line: u8, vector: u8, apic: u32) -> Result<u32, &'static str> {
        let p = platform().ok_or("no I/O APIC in the MADT")?;
        // 0xff in an 8-bit physical destination is a broadcast (x2APIC mode without
        // interrupt remapping, SDM Vol. 3A 11.12.10): never a destination for one owner.
        if apic >= 0xff {
            return Err("the owner's APIC id does not fit a physical destination");
        }
        let (gsi, low, level) = line_mode(p, line);
        set_entry(p, gsi, entry(vector, apic, low, level, false))?;
        Ok(gsi)
    }

    /// Masks line `line` (its owner died), keeping its vector: an EOI for that vector still
    /// matches the entry and clears its remote IRR (82093AA 3.2.4) if one is pending.
    pub fn mask(line: u8, vector: u8) {
        if let Some(p) = platform() {
            let (gsi, low, level) = line_mode(p, line);
            let _ = set_entry(p, gsi, entry(vector, 0, low, level, true));
        }
    }
}

#[cfg(target_os = "none")]
pub use hw::{mask, route, set_platform};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pci_lines_are_level_low_unless_overridden() {
        let mut p = Platform::default();
        assert_eq!(line_mode(&p, 11), (11, true, true));
        p.overrides[0] = (9, 9, 0b1111);
        p.overrides[1] = (0, 2, 0);
        p.override_count = 2;
        assert_eq!(line_mode(&p, 9), (9, true, true));
        assert_eq!(line_mode(&p, 0), (2, false, false));
    }

    #[test]
    fn entries_encode_as_the_datasheet_says() {
        let e = entry(0x50, 3, true, true, false);
        assert_eq!(e, 0x0300_0000_0000_a050);
        assert_ne!(entry(0x50, 3, true, true, true) & 1 << 16, 0);
    }
}
