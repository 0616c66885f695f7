// SPDX-License-Identifier: MIT OR Apache-2.0
//! The guest's own CPU tables: GDT, IDT with exception handlers that report through a
//! hypercall, and page tables identity-mapping the first GiB (page 0 left out to catch
//! null pointers). Mapping more than the partition is deliberate: the guest may map what
//! it likes, and EPT is what confines it. The device window (GiB 1, where an owner's
//! memory BARs appear) is mapped on demand, uncached ([`map_device_window`]); the IDT
//! sends the device vectors (`vmcall_proto::device::device_vector`) to `crate::pci`'s
//! handler. This module also holds the port-I/O and x2APIC EOI instruction wrappers.
//!
//! The timer is the hypervisor's virtual one-shot timer (the `timer_oneshot` hypercall),
//! delivered as interrupt [`TIMER_VECTOR`] through this IDT: the guest gets no local APIC,
//! so the hypervisor keeps sole control of the physical one and nothing needs intercepting.
//!
//! May call: `hypercall` (to exit on a fault), `cpu`; `hypercall` never calls this.

use core::cell::UnsafeCell;
use core::sync::atomic::AtomicU64;

pub const TIMER_VECTOR: u8 = 32;

/// Statics written only during single-threaded init (the guest has one vCPU and these are
/// set up before interrupts are enabled).
struct InitOnly<T>(UnsafeCell<T>);
// SAFETY: one vCPU; written only in `init` before anything else can observe them, and in
// `map_identity_2m`, whose caller guarantees that nothing else touches them meanwhile.
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
/// Maps the device window (memory BARs): guest-physical 1 GiB to 2 GiB, uncached.
static PD_DEVICES: InitOnly<Table> = InitOnly(UnsafeCell::new(Table([0; 512])));

/// The armed probe (see [`probe!`]): landing RIP (0: disarmed), RSP at the probe, then
/// the vector and error code of the exception that ended it ([`NO_FAULT`] if none). Read and
/// written by `gexc_common` with interrupts off, on the one vCPU.
pub static RECOVER: [AtomicU64; 4] =
    [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(NO_FAULT), AtomicU64::new(0)];
/// `RECOVER[2]` when the probed instructions completed without an exception.
pub const NO_FAULT: u64 = u64::MAX;

/// Runs instructions that may raise an exception, and resumes after them if they do.
///
/// Expands to an `asm!` statement (so it must be used inside `unsafe`, whose `SAFETY`
/// comment covers the probed instructions) followed by [`last_fault`]: `None` if the
/// instructions completed, else `Some((vector, error code))`. The probe stores a landing
/// address (the end of the same `asm!` block) and RSP in [`RECOVER`]; the exception stub
/// finds them armed and IRETQs to the landing instead of reporting the exception, so
/// control never leaves the `asm!` block through a Rust frame. Operands are those of
/// `asm!`; use `out`/`inout` for explicit registers (never `lateout`: the probe keeps its
/// own register live across the instructions), and leave RSP as it was if they complete
/// (an exception restores it). With operands, give the instructions as one string.
#[macro_export]
#[doc(hidden)]
macro_rules! probe {
    ($($tpl:literal),+ $(, $($ops:tt)*)?) => {{
        $crate::arch::RECOVER[2].store($crate::arch::NO_FAULT, core::sync::atomic::Ordering::Relaxed);
        core::arch::asm!(
            "lea {probe_tmp}, [rip + 2f]",
            "mov qword ptr [{probe_rec}], {probe_tmp}",
            "mov qword ptr [{probe_rec} + 8], rsp",
            $($tpl),+ ,
            "mov qword ptr [{probe_rec}], 0",
            "2:",
            probe_rec = in(reg) $crate::arch::RECOVER.as_ptr(),
            probe_tmp = out(reg) _,
            $($($ops)*)?
        );
        $crate::arch::last_fault()
    }};
}
pub use crate::probe;

/// What ended the last [`probe!`]: `None` if nothing did, else (vector, error code).
pub fn last_fault() -> Option<(u8, u64)> {
    use core::sync::atomic::Ordering::Relaxed;
    match RECOVER[2].load(Relaxed) {
        NO_FAULT => None,
        v => Some((v as u8, RECOVER[3].load(Relaxed))),
    }
}

/// Nonzero while [`count_instructions`] single-steps: #DB then counts into [`STEPS`].
#[cfg(target_os = "none")]
static STEPPING: AtomicU64 = AtomicU64::new(0);
/// Single-step traps taken since [`count_instructions`] armed them.
#[cfg(target_os = "none")]
static STEPS: AtomicU64 = AtomicU64::new(0);

/// Runs `f` single-stepped (RFLAGS.TF) and returns its result and the instructions it
/// retired, counted one #DB at a time on this CPU: an exact count of the code alone, where
/// the TSC counts time, waits and spins included (under Bochs with several CPUs, the
/// rounds of 5 instructions it runs each CPU for). The cost of the
/// stepping itself (the instructions around `f` that trap) is measured on an empty closure
/// and taken off. Interrupts must be off (they are, outside waits), and `f` must not wait
/// for an interrupt or take a VM exit (the hypervisor injects the step after an emulated
/// instruction, which would count it once). About 10x slower than `f` alone.
#[cfg(target_os = "none")]
pub fn count_instructions<R>(f: impl FnOnce() -> R) -> (R, u64) {
    use core::sync::atomic::Ordering::SeqCst;
    #[inline(always)]
    fn stepped<R>(f: impl FnOnce() -> R) -> (R, u64) {
        STEPS.store(0, SeqCst);
        STEPPING.store(1, SeqCst);
        // Every #DB while STEPPING is set goes to `guest_step_stub`, which counts it and
        // returns.
        // SAFETY: only sets TF, whose traps that stub handles.
        unsafe { core::arch::asm!("pushfq", "or qword ptr [rsp], 0x100", "popfq") };
        let r = core::hint::black_box(f());
        // SAFETY: clears TF (the POPF traps once more, counted like the rest).
        unsafe { core::arch::asm!("pushfq", "and qword ptr [rsp], -0x101", "popfq") };
        STEPPING.store(0, SeqCst);
        (r, STEPS.load(SeqCst))
    }
    let (_, empty) = stepped(|| ());
    let (r, n) = stepped(f);
    (r, n.saturating_sub(empty))
}

/// On the host (the guest kernel's unit tests) there is no IDT of ours to count #DB with:
/// `f` runs and 0 instructions are reported. The workloads that step run only in a guest.
#[cfg(not(target_os = "none"))]
pub fn count_instructions<R>(f: impl FnOnce() -> R) -> (R, u64) {
    (f(), 0)
}

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
        cmpq $0, {recover}(%rip)
        jne 3f
        movq %rsp, %rdi
        andq $-16, %rsp
        call guest_exception
    1:  hlt
        jmp 1b
    # A probe is armed (see `probe!`): record the vector and error code, disarm, and
    # resume at the probe's landing with the probe's RSP, in ring 0 (a probe may have gone
    # to ring 3). Only RAX is used, and restored; IRETQ restores RFLAGS from the frame,
    # single-stepping (TF) cleared (a probe may have set it).
    3:  pushq %rax
        movq 8(%rsp), %rax
        movq %rax, {recover}+16(%rip)
        movq 16(%rsp), %rax
        movq %rax, {recover}+24(%rip)
        movq {recover}(%rip), %rax
        movq %rax, 24(%rsp)
        movq {recover}+8(%rip), %rax
        movq %rax, 48(%rsp)
        movq $0x08, 32(%rsp)
        movq $0x10, 56(%rsp)
        andq $-0x101, 40(%rsp)
        movq $0, {recover}(%rip)
        popq %rax
        addq $16, %rsp
        iretq

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

    # A device interrupt: as GINTR, with the device index (vector - 0x50) in EDI.
    .macro GDEVINTR n
    .global guest_device_stub_\n
    guest_device_stub_\n:
        pushq %rax
        pushq %rcx
        pushq %rdx
        pushq %rsi
        pushq %rdi
        pushq %r8
        pushq %r9
        pushq %r10
        pushq %r11
        movl $\n, %edi
        call guest_device_irq
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
    .irp n, 0,1,2,3
    GDEVINTR \n
    .endr

    # Vector 1 (#DB): while `count_instructions` single-steps (STEPPING set), count the
    # step and go back (IRETQ restores RFLAGS, TF included: the next instruction traps
    # again); otherwise the exception path above. INCQ's flags are the handler's own.
    .global guest_step_stub
    guest_step_stub:
        cmpq $0, {stepping}(%rip)
        je gexc_1
        incq {steps}(%rip)
        iretq

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
    recover = sym RECOVER,
    stepping = sym STEPPING,
    steps = sym STEPS,
    options(att_syntax)
);

#[cfg(target_os = "none")]
extern "C" {
    static gexc_table: [u64; 32];
    fn guest_timer_stub();
    fn guest_doorbell_stub();
    fn guest_unexpected_stub();
    fn guest_step_stub();
    fn guest_device_stub_0();
    fn guest_device_stub_1();
    fn guest_device_stub_2();
    fn guest_device_stub_3();
}

/// The IDT entry of each device vector, in device order.
#[cfg(target_os = "none")]
fn device_stubs() -> [u64; vmcall_proto::device::MAX_DEVICES_PER_GUEST] {
    [
        guest_device_stub_0 as *const () as u64,
        guest_device_stub_1 as *const () as u64,
        guest_device_stub_2 as *const () as u64,
        guest_device_stub_3 as *const () as u64,
    ]
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

/// Picks the hypercall instruction, once per boot, without an exit on VT-x: VMMCALL is
/// tried under a probe with an unknown call number. An Intel CPU raises #UD for it inside
/// the guest (VT-x has no VMMCALL exit; the hypervisor does not intercept #UD), so VMCALL
/// stays; on AMD it is a hypercall (answered `UnknownCall`), and VMMCALL is used from then
/// on ([`crate::hypercall::set_vmmcall`]). Called after [`init`] (the IDT catches the #UD),
/// before any other hypercall.
#[cfg(target_os = "none")]
pub fn pick_hypercall_instruction() {
    let mut rax = u64::MAX;
    // VMMCALL either raises #UD (Intel), which the probe catches and resumes after, or traps
    // to the SVM hypervisor, which answers an unknown number with an error in RAX.
    // SAFETY: either way nothing but RAX changes.
    let fault = unsafe {
        probe!("vmmcall", inout("rax") rax, in("rdi") 0u64, in("rsi") 0u64, in("rdx") 0u64,
            in("r10") 0u64)
    };
    let _ = rax;
    crate::hypercall::set_vmmcall(fault.is_none());
}

/// Installs the GDT, IDT and page tables. Called once, first thing, interrupts off.
#[cfg(target_os = "none")]
pub fn init() {
    // The tables are 'static and correctly aligned.
    // SAFETY: single-threaded init with interrupts off: nothing else reads these statics.
    unsafe {
        let idt = &mut *IDT.0.get();
        let (first_device, stubs) =
            (vmcall_proto::device::DEVICE_VECTOR_BASE as usize, device_stubs());
        for (v, g) in idt.iter_mut().enumerate() {
            let h = if v == 1 {
                guest_step_stub as *const () as u64
            } else if v < 32 {
                gexc_table[v]
            } else if let Some(&stub) = v.checked_sub(first_device).and_then(|i| stubs.get(i)) {
                stub
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

/// Spare page tables for [`map_identity_2m`].
static SPARE_PDPT: InitOnly<[Table; 2]> =
    InitOnly(UnsafeCell::new([Table([0; 512]), Table([0; 512])]));
static SPARE_PD: InitOnly<[Table; 2]> =
    InitOnly(UnsafeCell::new([Table([0; 512]), Table([0; 512])]));
static SPARES_USED: AtomicU64 = AtomicU64::new(0);

/// Identity-maps the 2-MiB page holding `gpa` in the guest's own page tables, wherever it
/// is (below the guest's MAXPHYADDR), so that a workload can touch guest-physical addresses
/// the boot mapping leaves out (4 GiB, the top of the physical address space). Whether the
/// access then works is for EPT to decide. Takes intermediate tables from a small spare
/// pool; returns `false` when it is exhausted.
///
/// # Safety
/// Called after [`init`], from the one vCPU, with no reference to the page tables alive.
pub unsafe fn map_identity_2m(gpa: u64) -> bool {
    use core::sync::atomic::Ordering::Relaxed;
    let used = SPARES_USED.load(Relaxed);
    let (pml4, spare_pdpt, spare_pd) =
        // SAFETY: the caller guarantees exclusive access to the page-table statics.
        unsafe { (&mut *PML4.0.get(), &mut *SPARE_PDPT.0.get(), &mut *SPARE_PD.0.get()) };
    let (i4, i3, i2) =
        ((gpa >> 39) as usize & 511, (gpa >> 30) as usize & 511, (gpa >> 21) as usize & 511);
    let (mut pdpts, mut pds) = (used & 0xff, used >> 8);
    if pml4.0[i4] & 1 == 0 {
        let Some(t) = spare_pdpt.get(pdpts as usize) else { return false };
        pml4.0[i4] = t as *const Table as u64 | 3;
        pdpts += 1;
    }
    let pdpt = (pml4.0[i4] & 0x000f_ffff_ffff_f000) as *mut Table;
    // SAFETY: a PDPT of ours (boot or spare), identity-mapped, not otherwise referenced.
    let pdpt = unsafe { &mut *pdpt };
    if pdpt.0[i3] & 1 == 0 {
        let Some(t) = spare_pd.get(pds as usize) else { return false };
        pdpt.0[i3] = t as *const Table as u64 | 3;
        pds += 1;
    }
    let pd = (pdpt.0[i3] & 0x000f_ffff_ffff_f000) as *mut Table;
    // SAFETY: as above, for the PD.
    let pd = unsafe { &mut *pd };
    pd.0[i2] = (gpa & !0x1f_ffff) | 0x83;
    SPARES_USED.store(pdpts | pds << 8, Relaxed);
    // SAFETY: reloading CR3 with its own value flushes the TLB; the tables stay valid.
    unsafe {
        core::arch::asm!("mov {t}, cr3", "mov cr3, {t}", t = out(reg) _, options(nostack));
    }
    true
}

/// Ring-3 code and stack segment selectors (RPL 3), valid after [`user_mode_setup`].
pub const USER_CS: u64 = 0x1b;
pub const USER_SS: u64 = 0x23;
const TSS_SELECTOR: u16 = 0x28;

#[repr(C, align(4096))]
struct Page([u8; 4096]);

/// The GDT with user segments and a TSS: kernel code and data as in [`GDT`], user code,
/// user data, then the 16-byte TSS descriptor.
static USER_GDT: InitOnly<[u64; 7]> = InitOnly(UnsafeCell::new([0; 7]));
/// A 64-bit TSS (104 bytes as 26 doublewords): only RSP0 and the I/O-map base are set.
static TSS: InitOnly<[u32; 26]> = InitOnly(UnsafeCell::new([0; 26]));
/// The ring-0 stack for exceptions taken in ring 3 (TSS.RSP0), and the ring-3 stack.
static RING0_STACK: InitOnly<[Page; 2]> =
    InitOnly(UnsafeCell::new([Page([0; 4096]), Page([0; 4096])]));
static RING3_STACK: InitOnly<Page> = InitOnly(UnsafeCell::new(Page([0; 4096])));
static USER_MODE: AtomicU64 = AtomicU64::new(0);

/// Makes ring 3 reachable: a GDT with user segments and a TSS (RSP0 on a stack of its own,
/// so that an exception in ring 3 reaches the IDT's handlers), and the first 2 MiB of the
/// guest's page tables user-accessible (the kernel image, so that code in it can run in
/// ring 3). Returns the top of a ring-3 stack, or `None` if the image does not fit in those
/// 2 MiB. Idempotent.
///
/// # Safety
/// Called after [`init`], from the one vCPU with interrupts off, with no reference to the
/// page tables or the GDT alive.
pub unsafe fn user_mode_setup() -> Option<u64> {
    use core::sync::atomic::Ordering::Relaxed;
    let ring3_top = RING3_STACK.0.get() as u64 + 4096;
    if ring3_top > 2 << 20 {
        return None;
    }
    if USER_MODE.swap(1, Relaxed) == 1 {
        return Some(ring3_top);
    }
    // SAFETY: the caller guarantees exclusive access to these statics.
    let (gdt, tss, pml4, pdpt, pd, pt) = unsafe {
        (
            &mut *USER_GDT.0.get(),
            &mut *TSS.0.get(),
            &mut *PML4.0.get(),
            &mut *PDPT.0.get(),
            &mut *PD.0.get(),
            &mut *PT.0.get(),
        )
    };
    gdt[..3].copy_from_slice(&GDT);
    gdt[3] = 0x00af_fb00_0000_ffff; // 64-bit code, DPL 3
    gdt[4] = 0x00cf_f300_0000_ffff; // data, DPL 3
    let rsp0 = RING0_STACK.0.get() as u64 + 2 * 4096;
    tss[1] = rsp0 as u32;
    tss[2] = (rsp0 >> 32) as u32;
    tss[25] = 104 << 16; // I/O-map base past the limit: no I/O bitmap
    let (base, limit) = (tss.as_ptr() as u64, 103u64);
    gdt[5] = limit | (base & 0xff_ffff) << 16 | 0x89 << 40 | (base >> 24 & 0xff) << 56;
    gdt[6] = base >> 32;
    // The U bit on every level of the first 2 MiB.
    pml4.0[0] |= 4;
    pdpt.0[0] |= 4;
    pd.0[0] |= 4;
    for e in pt.0.iter_mut().skip(1) {
        *e |= 4;
    }
    let gdtr = x86_ptr(gdt.as_ptr() as u64, core::mem::size_of_val(gdt));
    // The new GDT keeps selectors 0x08 and 0x10 as they were (the loaded segment registers
    // stay valid), the TSS descriptor is fresh (not busy), CR3 is reloaded with itself.
    // SAFETY: per the line above: valid selectors, a non-busy TSS, only a TLB flush.
    unsafe {
        core::arch::asm!(
            "lgdt [{gdtr}]",
            "ltr {sel:x}",
            "mov {t}, cr3",
            "mov cr3, {t}",
            gdtr = in(reg) &gdtr,
            sel = in(reg) TSS_SELECTOR,
            t = out(reg) _,
            options(nostack)
        );
    }
    Some(ring3_top)
}

/// Identity-maps the GiB at `base` with 2-MiB pages (the channel windows, the grant
/// window). Only what the hypervisor backed in EPT is reachable; anything else faults.
fn identity_gib(pdpt: &mut Table, pd: &mut Table, base: u64) {
    pdpt.0[(base >> 30) as usize] = pd as *const Table as u64 | 3;
    for j in 0..512u64 {
        pd.0[j as usize] = (base + (j << 21)) | 0x83;
    }
}

/// PCD and PWT: the page is uncached (PAT entry 3, UC, with the power-on PAT the
/// hypervisor restores).
const UNCACHED: u64 = 0x18;
/// Execute-disable (valid only with EFER.NXE set).
const NX: u64 = 1 << 63;
static DEVICE_WINDOW_MAPPED: AtomicU64 = AtomicU64::new(0);

/// Identity-maps the device window (`vmcall_proto::device::DEVICE_WINDOW`, GiB 1) with
/// uncached 2-MiB pages, never executable when EFER.NXE is on. Only the owner's BARs are
/// backed in EPT; anything else there stops the guest. Idempotent.
///
/// # Safety
/// Called after [`init`], from the one vCPU, with no reference to the page tables alive.
pub unsafe fn map_device_window() {
    use core::sync::atomic::Ordering::Relaxed;
    if DEVICE_WINDOW_MAPPED.swap(1, Relaxed) == 1 {
        return;
    }
    let (base, end) = vmcall_proto::device::DEVICE_WINDOW;
    const _: () = assert!(
        vmcall_proto::device::DEVICE_WINDOW.1 - vmcall_proto::device::DEVICE_WINDOW.0 == 1 << 30
    );
    let nx = if read_efer() & (1 << 11) != 0 { NX } else { 0 };
    // SAFETY: the caller guarantees exclusive access to the page-table statics.
    let (pdpt, pd) = unsafe { (&mut *PDPT.0.get(), &mut *PD_DEVICES.0.get()) };
    for j in 0..512u64 {
        pd.0[j as usize] = (base + (j << 21)) | 0x83 | UNCACHED | nx;
    }
    debug_assert!(base + (512 << 21) == end);
    pdpt.0[(base >> 30) as usize] = pd as *const Table as u64 | 3;
    // SAFETY: reloading CR3 with its own value flushes the TLB; the tables stay valid.
    unsafe {
        core::arch::asm!("mov {t}, cr3", "mov cr3, {t}", t = out(reg) _, options(nostack));
    }
}

/// IA32_EFER (one VM exit: the hypervisor emulates EFER accesses).
pub fn read_efer() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: reading EFER has no side effect; the hypervisor allows it.
    unsafe {
        core::arch::asm!("rdmsr", in("ecx") 0xc000_0080u32, out("eax") lo, out("edx") hi,
            options(nomem, nostack))
    };
    (hi as u64) << 32 | lo as u64
}

/// Acknowledges the interrupt in service at the local APIC: WRMSR 0 to the x2APIC EOI
/// register (0x80b), which the hypervisor passes through to guests that take interrupts
/// directly (doorbells, devices).
///
/// # Safety
/// Called from an interrupt handler, once, for the interrupt it handles: an EOI with
/// nothing in service, or twice, retires another (higher-priority) interrupt.
pub unsafe fn x2apic_eoi() {
    // SAFETY: the caller is the handler of the interrupt in service.
    unsafe {
        core::arch::asm!("wrmsr", in("ecx") 0x80bu32, in("eax") 0u32, in("edx") 0u32, options(nostack))
    };
}

/// Port input, 8/16/32 bits (IN, SDM Vol. 2A). A port outside this guest's I/O bitmap
/// exits, and the hypervisor decides (#GP, or the filtered PCI configuration ports). Port
/// accesses are not `nomem`: the compiler keeps memory accesses on their side of them.
///
/// # Safety
/// The port belongs to this guest (a device it owns, the configuration ports) and reading
/// it has no side effect the caller is not ready for (a read may clear device state).
pub unsafe fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: per the caller's contract.
    unsafe { core::arch::asm!("in al, dx", in("dx") port, out("al") v, options(nostack)) };
    v
}

/// See [`inb`].
///
/// # Safety
/// As [`inb`].
pub unsafe fn inw(port: u16) -> u16 {
    let v: u16;
    // SAFETY: per the caller's contract.
    unsafe { core::arch::asm!("in ax, dx", in("dx") port, out("ax") v, options(nostack)) };
    v
}

/// See [`inb`].
///
/// # Safety
/// As [`inb`].
pub unsafe fn inl(port: u16) -> u32 {
    let v: u32;
    // SAFETY: per the caller's contract.
    unsafe { core::arch::asm!("in eax, dx", in("dx") port, out("eax") v, options(nostack)) };
    v
}

/// Port output, 8/16/32 bits (OUT, SDM Vol. 2B).
///
/// # Safety
/// The port belongs to this guest, and the write cannot make the device break memory
/// safety (a device that masters the bus can write anywhere: its DMA addresses are the
/// caller's responsibility).
pub unsafe fn outb(port: u16, v: u8) {
    // SAFETY: per the caller's contract.
    unsafe { core::arch::asm!("out dx, al", in("dx") port, in("al") v, options(nostack)) };
}

/// See [`outb`].
///
/// # Safety
/// As [`outb`].
pub unsafe fn outw(port: u16, v: u16) {
    // SAFETY: per the caller's contract.
    unsafe { core::arch::asm!("out dx, ax", in("dx") port, in("ax") v, options(nostack)) };
}

/// See [`outb`].
///
/// # Safety
/// As [`outb`].
pub unsafe fn outl(port: u16, v: u32) {
    // SAFETY: per the caller's contract.
    unsafe { core::arch::asm!("out dx, eax", in("dx") port, in("eax") v, options(nostack)) };
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

/// Whether MONITOR/MWAIT are offered (CPUID.01H:ECX[3]): the hypervisor shows them only
/// to a guest that waits exitless (`mwait = true`). One CPUID, one VM exit.
pub fn has_monitor() -> bool {
    let r = core::arch::x86_64::__cpuid_count(1, 0);
    r.ecx & (1 << 3) != 0
}

/// Arms the address monitor on the cache line of `line` (MONITOR, SDM Vol. 2B).
///
/// # Safety
/// MONITOR must be offered ([`has_monitor`]), else it is #UD; `line` must be mapped (it is
/// checked like a one-byte read).
pub unsafe fn monitor(line: *const u8) {
    // ECX = EDX = 0: no extensions, no hints.
    // SAFETY: the caller checked MONITOR is there and the line is mapped.
    unsafe {
        core::arch::asm!("monitor", in("rax") line, in("ecx") 0, in("edx") 0, options(nostack))
    };
}

/// Sleeps until the monitored line is written or an interrupt comes, with interrupts
/// enabled for the wait (STI; MWAIT; CLI, as [`wait_for_interrupt`] does with HLT). EAX = 0:
/// the lightest sleep state (C1).
///
/// # Safety
/// MWAIT must be offered ([`has_monitor`]), else it is #UD.
pub unsafe fn mwait() {
    // EAX = ECX = 0: C1, no extensions.
    // SAFETY: the caller checked MWAIT is there.
    unsafe {
        core::arch::asm!("sti; mwait; cli", in("eax") 0, in("ecx") 0, options(nomem, nostack))
    };
}

/// Drops this core's TLB entry for the page of `addr` (INVLPG; no VM exit: "INVLPG
/// exiting" is off under EPT).
pub fn invlpg(addr: *const u8) {
    // The next access walks the page tables again; allowed at CPL 0.
    // SAFETY: INVLPG only invalidates this guest's own (VPID-tagged) TLB entry.
    unsafe { core::arch::asm!("invlpg [{}]", in(reg) addr, options(nostack)) };
}

/// Waits for the next interrupt with interrupts enabled.
pub fn wait_for_interrupt() {
    // SAFETY: STI; HLT atomically enables interrupts and halts until one arrives.
    unsafe { core::arch::asm!("sti; hlt; cli", options(nomem, nostack)) };
}

/// Lets pending interrupts in for one instruction: STI; NOP; CLI (STI's shadow covers
/// the NOP, so an interrupt is taken between NOP and CLI).
///
/// Not PAUSE in the shadow: QEMU's TCG (7.2) leaves its execution loop at a PAUSE with
/// the shadow still marked, then runs the CLI, so the window never opens there and a
/// pending interrupt waits for whatever exit happens to land between STI and CLI (an
/// e1000 interrupt under SVM missed its 100 ms deadline in most runs on a loaded host;
/// with NOP, none in the same runs). A processor takes it after either instruction.
pub fn interrupt_window() {
    // SAFETY: enables interrupts for one instruction boundary; the IDT handles every vector.
    unsafe { core::arch::asm!("sti; nop; cli", options(nomem, nostack)) };
}

/// Below [`crate::hypercall`], which times its waits with it.
pub use crate::cpu::rdtsc;
