// SPDX-License-Identifier: MIT OR Apache-2.0
//! The guest's own CPU tables: GDT, IDT with exception handlers that report through a
//! hypercall, and page tables identity-mapping the first GiB (page 0 left out to catch
//! null pointers). Mapping more than the partition is deliberate: the guest may map what
//! it likes, and EPT is what confines it.
//!
//! The timer is the hypervisor's virtual one-shot timer (the `timer_oneshot` hypercall),
//! delivered as interrupt [`TIMER_VECTOR`] through this IDT: the guest gets no local APIC,
//! so the hypervisor keeps sole control of the physical one and nothing needs intercepting.

use core::cell::UnsafeCell;
use core::sync::atomic::AtomicU64;

pub const TIMER_VECTOR: u8 = 32;

/// Statics written only during single-threaded init (the guest has one vCPU and these are
/// set up before interrupts are enabled).
struct InitOnly<T>(UnsafeCell<T>);
// SAFETY: one vCPU; written only in `init` before anything else can observe them.
unsafe impl<T> Sync for InitOnly<T> {}

#[repr(C, align(4096))]
struct Table([u64; 512]);

static GDT: [u64; 3] = [0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff];
static IDT: InitOnly<[[u64; 2]; 256]> = InitOnly(UnsafeCell::new([[0; 2]; 256]));
static PML4: InitOnly<Table> = InitOnly(UnsafeCell::new(Table([0; 512])));
static PDPT: InitOnly<Table> = InitOnly(UnsafeCell::new(Table([0; 512])));
static PD: InitOnly<Table> = InitOnly(UnsafeCell::new(Table([0; 512])));
static PT: InitOnly<Table> = InitOnly(UnsafeCell::new(Table([0; 512])));
/// Maps the channel windows: guest-physical 2 GiB to 3 GiB.
static PD_CHANNELS: InitOnly<Table> = InitOnly(UnsafeCell::new(Table([0; 512])));
/// Maps the grant window (capability mappings): guest-physical 3 GiB to 4 GiB.
static PD_GRANTS: InitOnly<Table> = InitOnly(UnsafeCell::new(Table([0; 512])));

/// Timer interrupts taken.
pub static TICKS: AtomicU64 = AtomicU64::new(0);
/// Doorbell interrupts taken.
pub static DOORBELLS: AtomicU64 = AtomicU64::new(0);

#[repr(C)]
#[derive(Debug)]
pub struct Frame {
    pub vector: u64,
    pub error_code: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

#[cfg(target_os = "none")]
core::arch::global_asm!(
    r#"
    .section .text
    .macro GEXC_NOERR n
    .balign 16
    gexc_\n:
        pushq $0
        pushq $\n
        jmp gexc_common
    .endm
    .macro GEXC_ERR n
    .balign 16
    gexc_\n:
        pushq $\n
        jmp gexc_common
    .endm
    .irp n, 0,1,2,3,4,5,6,7,9,15,16,18,19,20,22,23,24,25,26,27,28,31
    GEXC_NOERR \n
    .endr
    .irp n, 8,10,11,12,13,14,17,21,29,30
    GEXC_ERR \n
    .endr
    gexc_common:
        movq %rsp, %rdi
        andq $-16, %rsp
        call guest_exception
    1:  hlt
        jmp 1b

    # An interrupt handler in Rust: caller-saved registers around the call, then IRETQ.
    .macro GINTR name, handler
    .global \name
    \name:
        pushq %rax
        pushq %rcx
        pushq %rdx
        pushq %rsi
        pushq %rdi
        pushq %r8
        pushq %r9
        pushq %r10
        pushq %r11
        call \handler
        popq %r11
        popq %r10
        popq %r9
        popq %r8
        popq %rdi
        popq %rsi
        popq %rdx
        popq %rcx
        popq %rax
        iretq
    .endm
    GINTR guest_timer_stub, guest_timer_tick
    GINTR guest_doorbell_stub, guest_doorbell

    .global guest_unexpected_stub
    guest_unexpected_stub:
        pushq $0
        pushq $255
        jmp gexc_common

    .section .rodata
    .balign 8
    .global gexc_table
    gexc_table:
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .quad gexc_\n
    .endr
"#,
    options(att_syntax)
);

#[cfg(target_os = "none")]
extern "C" {
    static gexc_table: [u64; 32];
    fn guest_timer_stub();
    fn guest_doorbell_stub();
    fn guest_unexpected_stub();
}

/// Called by `guest_timer_stub`. The processor aligns the interrupt frame to 16 bytes and
/// pushes 5 quadwords; with the stub's 9 pushes RSP is 16-byte aligned at the call, as the
/// ABI requires.
#[cfg(target_os = "none")]
#[no_mangle]
extern "C" fn guest_timer_tick() {
    TICKS.fetch_add(1, core::sync::atomic::Ordering::Relaxed);
}

/// A channel doorbell: count it and acknowledge it at the (real) local APIC. Writing the
/// x2APIC EOI register is the one APIC access the hypervisor lets through.
#[cfg(target_os = "none")]
#[no_mangle]
extern "C" fn guest_doorbell() {
    DOORBELLS.fetch_add(1, core::sync::atomic::Ordering::Relaxed);
    // SAFETY: WRMSR to x2APIC EOI (0x80b) with 0 retires the doorbell in service.
    unsafe {
        core::arch::asm!("wrmsr", in("ecx") 0x80bu32, in("eax") 0u32, in("edx") 0u32, options(nostack))
    };
}

#[cfg(target_os = "none")]
#[no_mangle]
extern "C" fn guest_exception(f: &Frame) -> ! {
    log::error!(
        "guest exception: vector {} error {:#x} at rip={:#x} rsp={:#x} cr2={:#x}",
        f.vector,
        f.error_code,
        f.rip,
        f.rsp,
        read_cr2()
    );
    crate::hypercall::exit(0xe000 | f.vector)
}

fn read_cr2() -> u64 {
    let v: u64;
    // SAFETY: reading CR2 has no side effect.
    unsafe { core::arch::asm!("mov {}, cr2", out(reg) v, options(nomem, nostack)) };
    v
}

fn gate(handler: u64) -> [u64; 2] {
    let low = (handler & 0xffff) | (0x08 << 16) | (0x8e << 40) | ((handler >> 16) & 0xffff) << 48;
    [low, handler >> 32]
}

/// Installs the GDT, IDT and page tables. Called once, first thing, interrupts off.
#[cfg(target_os = "none")]
pub fn init() {
    // The tables are 'static and correctly aligned.
    // SAFETY: single-threaded init with interrupts off: nothing else reads these statics.
    unsafe {
        let idt = &mut *IDT.0.get();
        for (v, g) in idt.iter_mut().enumerate() {
            let h = if v < 32 {
                gexc_table[v]
            } else if v == TIMER_VECTOR as usize {
                guest_timer_stub as *const () as u64
            } else if v == vmcall_proto::guest::DOORBELL_VECTOR as usize {
                guest_doorbell_stub as *const () as u64
            } else {
                guest_unexpected_stub as *const () as u64
            };
            *g = gate(h);
        }
        let (pml4, pdpt, pd, pt) =
            (&mut *PML4.0.get(), &mut *PDPT.0.get(), &mut *PD.0.get(), &mut *PT.0.get());
        pml4.0[0] = pdpt as *const Table as u64 | 3;
        pdpt.0[0] = pd as *const Table as u64 | 3;
        pd.0[0] = pt as *const Table as u64 | 3;
        for i in 1..512u64 {
            pt.0[i as usize] = (i << 12) | 3;
        }
        for j in 1..512u64 {
            pd.0[j as usize] = (j << 21) | 0x83;
        }
        let pdc = &mut *PD_CHANNELS.0.get();
        identity_gib(pdpt, pdc, vmcall_proto::guest::CHANNEL_WINDOW_GPA);
        let pdg = &mut *PD_GRANTS.0.get();
        identity_gib(pdpt, pdg, vmcall_proto::hypercall::GRANT_WINDOW.0);
        let gdtr = x86_ptr(GDT.as_ptr() as u64, core::mem::size_of_val(&GDT));
        let idtr = x86_ptr(idt.as_ptr() as u64, core::mem::size_of_val(idt));
        core::arch::asm!(
            "lgdt [{gdtr}]",
            "push 0x08",
            "lea {tmp}, [rip + 2f]",
            "push {tmp}",
            "retfq",
            "2:",
            "mov {tmp:e}, 0x10",
            "mov ds, {tmp:e}",
            "mov es, {tmp:e}",
            "mov ss, {tmp:e}",
            "lidt [{idtr}]",
            "mov cr3, {cr3}",
            gdtr = in(reg) &gdtr,
            idtr = in(reg) &idtr,
            cr3 = in(reg) pml4 as *const Table as u64,
            tmp = out(reg) _,
        );
    }
}

/// Identity-maps the GiB at `base` with 2-MiB pages (the channel windows, the grant
/// window). Only what the hypervisor backed in EPT is reachable; anything else faults.
fn identity_gib(pdpt: &mut Table, pd: &mut Table, base: u64) {
    pdpt.0[(base >> 30) as usize] = pd as *const Table as u64 | 3;
    for j in 0..512u64 {
        pd.0[j as usize] = (base + (j << 21)) | 0x83;
    }
}

/// A descriptor-table register image: limit then base.
#[repr(C, packed)]
struct Dtr {
    limit: u16,
    base: u64,
}

fn x86_ptr(base: u64, size: usize) -> Dtr {
    Dtr { limit: (size - 1) as u16, base }
}

/// Waits for the next interrupt with interrupts enabled.
pub fn wait_for_interrupt() {
    // SAFETY: STI; HLT atomically enables interrupts and halts until one arrives.
    unsafe { core::arch::asm!("sti; hlt; cli", options(nomem, nostack)) };
}

pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC is allowed at CPL 0.
    unsafe { core::arch::x86_64::_rdtsc() }
}
