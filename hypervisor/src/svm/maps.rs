// SPDX-License-Identifier: MIT OR Apache-2.0
//! The permission maps a VMCB points at: the MSR permission map (APM Vol. 2 15.11, 8 KiB,
//! two bits per MSR: read then write, in three 2-KiB ranges) and the I/O permission map
//! (15.10.1, 12 KiB, one bit per port, the third page for accesses that run past 0xffff).
//! A set bit intercepts. Maps start all-intercepting and open only what the policy lists,
//! the same lists the VT-x bitmaps use (`exits::MSR_PASSTHROUGH`, `MSR_SWITCHED`, the
//! owner's I/O BARs). Pure functions on byte arrays, tested on the host.

/// Size of the MSR permission map.
pub const MSRPM_BYTES: usize = 8192;
/// Size of the I/O permission map.
pub const IOPM_BYTES: usize = 12288;

/// The MSR permission map, page-aligned (VMCB offset 0x048 takes its physical address).
#[repr(C, align(4096))]
pub struct Msrpm(pub [u8; MSRPM_BYTES]);
const _: () = assert!(core::mem::size_of::<Msrpm>() == MSRPM_BYTES);

/// The I/O permission map, page-aligned (VMCB offset 0x040).
#[repr(C, align(4096))]
pub struct Iopm(pub [u8; IOPM_BYTES]);
const _: () = assert!(core::mem::size_of::<Iopm>() == IOPM_BYTES);

/// The pass-through MSRs whose value is an address that must be canonical: LSTAR, CSTAR,
/// FS base, GS base, KERNEL_GS_BASE (a WRMSR of a non-canonical address is #GP, AMD APM
/// Vol. 2 6.1.1 and 4.5.3; SDM Vol. 4 Table 2-2). Their writes exit on SVM: the VMCB holds
/// them (VMLOAD/VMSAVE, VMRUN), and not every SVM implementation checks the address
/// (QEMU 7.2's TCG stores it as written), so the backend checks it and gives the #GP
/// itself, the outcome VT-x gets from the processor. Reads pass.
pub const CANONICAL_MSRS: [u32; 5] =
    [0xc000_0082, 0xc000_0083, 0xc000_0100, 0xc000_0101, 0xc000_0102];

/// The bit of `msr`'s read permission in the map (its write permission is the next bit),
/// or `None` for an MSR outside the three mapped ranges, which always intercepts
/// (APM Table 15-5: 0000_0000-0000_1FFF at byte 0, C000_0000-C000_1FFF at 0x800,
/// C001_0000-C001_1FFF at 0x1000).
pub fn msr_bit(msr: u32) -> Option<usize> {
    let base = match msr & !0x1fff {
        0x0000_0000 => 0,
        0xc000_0000 => 0x800 * 8,
        0xc001_0000 => 0x1000 * 8,
        _ => return None,
    };
    Some(base + (msr & 0x1fff) as usize * 2)
}

impl Msrpm {
    /// A map intercepting every MSR access.
    pub const fn intercept_all() -> Self {
        Msrpm([0xff; MSRPM_BYTES])
    }

    /// Lets the guest read and write `msr` without an exit. Returns false (and changes
    /// nothing) for an MSR the map cannot describe.
    pub fn allow(&mut self, msr: u32) -> bool {
        let Some(bit) = msr_bit(msr) else { return false };
        for b in [bit, bit + 1] {
            self.0[b / 8] &= !(1 << (b % 8));
        }
        true
    }

    /// Opens what the guest policy lets a guest access without an exit: the VT-x bitmap's
    /// lists (`exits::MSR_PASSTHROUGH`, `MSR_SWITCHED`), except that writes of the MSRs
    /// that must hold a canonical address ([`CANONICAL_MSRS`]) exit.
    pub fn allow_policy(&mut self) {
        for msr in crate::exits::MSR_PASSTHROUGH.into_iter().chain(crate::exits::MSR_SWITCHED) {
            if CANONICAL_MSRS.contains(&msr) {
                self.allow_read(msr);
            } else {
                self.allow(msr);
            }
        }
    }

    /// Lets the guest read `msr` without an exit; its writes still exit.
    pub fn allow_read(&mut self, msr: u32) -> bool {
        let Some(bit) = msr_bit(msr) else { return false };
        self.0[bit / 8] &= !(1 << (bit % 8));
        true
    }

    /// Whether a read (`write` false) or write of `msr` exits.
    #[cfg(test)]
    pub fn intercepts(&self, msr: u32, write: bool) -> bool {
        msr_bit(msr).is_none_or(|b| {
            let b = b + write as usize;
            self.0[b / 8] & (1 << (b % 8)) != 0
        })
    }
}

impl Iopm {
    /// A map intercepting every port.
    pub const fn intercept_all() -> Self {
        Iopm([0xff; IOPM_BYTES])
    }

    /// Lets the guest access `port` without an exit (the owner's I/O BARs; the check guest
    /// has none). A multi-byte access checks the bit of every port it touches (APM
    /// 15.10.1), so a wide access at the end of an allowed range still exits.
    pub fn allow(&mut self, port: u16) {
        let p = port as usize;
        self.0[p / 8] &= !(1 << (p % 8));
    }

    /// Whether a `size`-byte access at `port` exits.
    #[cfg(test)]
    pub fn intercepts(&self, port: u16, size: usize) -> bool {
        (port as usize..port as usize + size).any(|p| self.0[p / 8] & (1 << (p % 8)) != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msr_bits_follow_the_apm_table() {
        assert_eq!(msr_bit(0), Some(0));
        assert_eq!(msr_bit(0x1fff), Some(0x3ffe));
        // LSTAR (C000_0082h): byte 0x800 + 0x82 * 2 / 8 = 0x820, bits 4 and 5.
        assert_eq!(msr_bit(0xc000_0082), Some(0x820 * 8 + 4));
        assert_eq!(msr_bit(0xc001_0114), Some(0x1000 * 8 + 0x114 * 2));
        assert_eq!(msr_bit(0x2000), None);
        assert_eq!(msr_bit(0x4000_0000), None);
    }

    #[test]
    fn only_the_listed_msrs_pass_through() {
        let mut m = Box::new(Msrpm::intercept_all());
        m.allow_policy();
        // STAR and SFMASK pass both ways; LSTAR and GS base (VMLOAD/VMSAVE switch it) are
        // read without an exit, their writes are checked.
        for msr in [0xc000_0081, 0xc000_0084] {
            assert!(!m.intercepts(msr, false) && !m.intercepts(msr, true), "{msr:#x}");
        }
        for msr in CANONICAL_MSRS {
            assert!(!m.intercepts(msr, false) && m.intercepts(msr, true), "{msr:#x}");
            assert!(crate::exits::MSR_PASSTHROUGH
                .into_iter()
                .chain(crate::exits::MSR_SWITCHED)
                .any(|p| p == msr));
        }
        // EFER, the APIC base, TSC, VM_CR, VM_HSAVE_PA: all exit.
        for msr in [0xc000_0080, 0x1b, 0x10, 0xc001_0114, 0xc001_0117] {
            assert!(m.intercepts(msr, false) && m.intercepts(msr, true), "{msr:#x}");
        }
        assert!(!m.allow(0x4000_0000));
        assert!(m.intercepts(0x4000_0000, false));
    }

    #[test]
    fn a_wide_access_exits_when_any_port_it_touches_is_intercepted() {
        let mut io = Box::new(Iopm::intercept_all());
        for p in 0xc000..0xc004 {
            io.allow(p);
        }
        assert!(!io.intercepts(0xc000, 4));
        assert!(io.intercepts(0xc002, 4));
        assert!(io.intercepts(0x3f8, 1));
        // The third page covers an access starting at 0xffff.
        assert!(io.intercepts(0xffff, 4));
    }
}
