// SPDX-License-Identifier: MIT OR Apache-2.0
//! Per-core IDT. Every vector has a stub that pushes (error code, vector) in a common frame
//! and calls [`crate::fault::exception`], which reports vector, error code, RIP and core,
//! then parks the core. The hypervisor runs with interrupts disabled; anything arriving
//! here is a bug or a fault and is reported as one.

use super::gdt::{CODE_SELECTOR, IST_CRITICAL};

/// What the stubs hand to the Rust handler: the vector and error code they push, then the
/// frame the processor pushed (SDM Vol. 3A 6.14.1: 64-bit mode stack frame).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ExceptionFrame {
    pub vector: u64,
    pub error_code: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}
const _: () = assert!(core::mem::size_of::<ExceptionFrame>() == 56);

/// One 16-byte interrupt gate.
#[repr(C, align(16))]
#[derive(Clone, Copy, Debug)]
pub struct Gate([u64; 2]);

/// The gate for a 64-bit interrupt gate (type 0xE, present, DPL 0) to `handler` on `ist`
/// (0 = no stack switch).
pub const fn interrupt_gate(handler: u64, ist: u8) -> Gate {
    let low = (handler & 0xffff)
        | (CODE_SELECTOR as u64) << 16
        | ((ist as u64) & 7) << 32
        | 0x8e << 40
        | ((handler >> 16) & 0xffff) << 48;
    Gate([low, handler >> 32])
}

/// A core's IDT.
#[repr(C, align(4096))]
#[derive(Debug)]
pub struct Idt([Gate; 256]);
const _: () = assert!(core::mem::size_of::<Idt>() == 4096);

/// The local-APIC timer's vector when it is the run timer (`arch::apic::timer_init_this_core`,
/// the SVM backend).
pub const HOST_TIMER_VECTOR: u8 = 0xee;

/// Run-timer interrupts the host took, one bit per core index (set by the timer gate's
/// stub on that core, taken by its SVM vCPU after each exit: the exit was the timer's).
#[no_mangle]
pub static HOST_TIMERS: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

/// Doorbells the host took, one bit per core index (set by the doorbell gate's stub on
/// that core, taken by its SVM vCPU after each exit).
#[no_mangle]
pub static HOST_DOORBELLS: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

/// Device interrupts the host took and has not acknowledged, one word per device index
/// `i` (vector `vmcall_proto::device::DEVICE_VECTOR_BASE + i`), one bit per core index in
/// each (set by the device gate's stub on that core, taken by its SVM vCPU after each
/// exit). The stub does not EOI: the vector stays in service at the local APIC (and a
/// level-triggered line's remote IRR set at the I/O APIC) until the guest's own EOI, which
/// the SVM vCPU then makes, as the guest's EOI does directly under VT-x.
#[no_mangle]
pub static HOST_DEVICE_IRQS: [core::sync::atomic::AtomicU64;
    vmcall_proto::device::MAX_DEVICES_PER_GUEST] =
    [const { core::sync::atomic::AtomicU64::new(0) }; vmcall_proto::device::MAX_DEVICES_PER_GUEST];
const _: () = assert!(vmcall_proto::device::MAX_DEVICES_PER_GUEST == 4);

/// Vectors whose handlers run on the IST stack: NMI (2), #DF (8), #PF (14: a stack
/// overflow faults on the stack itself), #MC (18).
const fn uses_ist(vector: usize) -> bool {
    matches!(vector, 2 | 8 | 14 | 18)
}

impl Idt {
    /// An IDT with every vector routed to its reporting stub.
    pub fn new() -> Self {
        let mut gates = [Gate([0, 0]); 256];
        for (v, g) in gates.iter_mut().enumerate() {
            let ist = if uses_ist(v) { IST_CRITICAL } else { 0 };
            *g = interrupt_gate(stubs::address(v), ist);
        }
        // NMIs are inter-core kicks (see xcore): the handler only returns; the kicked core
        // reads its inbox on its own path. A hardware NMI is therefore not reported.
        gates[2] = interrupt_gate(stubs::nmi(), IST_CRITICAL);
        // The run timer of a backend without a preemption timer (SVM): its interrupt is
        // acknowledged and nothing else (the exit it caused already returned to the run
        // loop). Never raised under VT-x, which programs no APIC timer.
        gates[HOST_TIMER_VECTOR as usize] = interrupt_gate(stubs::host_timer(), 0);
        // A channel doorbell taken by the host (SVM: the guest's interrupts are virtualized,
        // `svm::vcpu`): marked for this core in [`HOST_DOORBELLS`], acknowledged. Under VT-x
        // a doorbell reaches the guest's IDT directly and never this gate.
        gates[vmcall_proto::guest::DOORBELL_VECTOR as usize] =
            interrupt_gate(stubs::host_doorbell(), 0);
        // A device's interrupt taken by the host (SVM, as the doorbell): marked for this
        // core in [`HOST_DEVICE_IRQS`], left in service. Under VT-x it reaches the guest's
        // IDT directly and never these gates.
        for i in 0..vmcall_proto::device::MAX_DEVICES_PER_GUEST {
            gates[vmcall_proto::device::DEVICE_VECTOR_BASE as usize + i] =
                interrupt_gate(stubs::host_device(i), 0);
        }
        Idt(gates)
    }

    /// Loads this IDT on the current core.
    ///
    /// # Safety
    /// `self` must live for the rest of the core's life and the GDT with [`CODE_SELECTOR`]
    /// and the IST stack must already be loaded.
    pub unsafe fn load(&'static self) {
        let ptr = x86::dtables::DescriptorTablePointer::new(&self.0);
        // SAFETY: the table is 'static and every gate points to a valid stub.
        unsafe { x86::dtables::lidt(&ptr) };
    }
}

impl Default for Idt {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(target_os = "none")]
mod stubs {
    core::arch::global_asm!(
        r#"
        .section .text
        .macro EXC_NOERR n
        .balign 16
        exc_stub_\n:
            pushq $0
            pushq $\n
            jmp exc_common
        .endm
        .macro EXC_ERR n
        .balign 16
        exc_stub_\n:
            pushq $\n
            jmp exc_common
        .endm

        .irp n, 0,2,3,4,5,6,7,9,15,16,18,19,20,22,23,24,25,26,27,28,31
        EXC_NOERR \n
        .endr

        // #DB at the instruction after VMRUN, where #VMEXIT lands (`svm_vmexit_landing`,
        // arch::svm): the single-step trap of a guest instruction that exited (TF set in
        // the guest). An intercept replaces the instruction, so no trap is due in the host
        // (AMD APM Vol. 2 15.7, 15.9), and the backend gives the guest its own #DB
        // (vcpu::Field::PendingDebug); Bochs 2.7's SVM still raises it in the host after
        // the #VMEXIT. Dropped here (DR6 back to its reset value); a #DB anywhere else is
        // fatal, as every exception in the hypervisor is.
        .balign 16
        exc_stub_1:
            pushq %rax
            leaq svm_vmexit_landing(%rip), %rax
            cmpq %rax, 8(%rsp)
            jne 1f
            movl $0xffff0ff0, %eax
            movq %rax, %dr6
            popq %rax
            iretq
        1:  popq %rax
            pushq $0
            pushq $1
            jmp exc_common
        .irp n, 8,10,11,12,13,14,17,21,29,30
        EXC_ERR \n
        .endr

        # Vectors 32..255: no error code; 16 bytes each from irq_stubs.
        .balign 16
        .global irq_stubs
        irq_stubs:
        .set vec, 32
        .rept 224
        .balign 16
            pushq $0
            pushq $vec
            jmp exc_common
        .set vec, vec + 1
        .endr

        // An NMI taken in the hypervisor is a kick whose message the core may already have
        // missed (it read its inbox, then the kick came before the entry). If the core has
        // a guest vCPU live (gs:[16], PerCore::kick_hook, non-zero), call its backend's
        // kick hook (vcpu::Vcpu::KICK_HOOK; VMX: the preemption timer zeroed), which makes
        // the next entry exit before the guest runs an instruction, and the core reads its
        // inbox. gs:[24] (PerCore::kicked) tells the run loop, which rewrites the timer
        // after this. gs:[32] (PerCore::nmis) counts the kicks taken while a vCPU is live,
        // for the guest's telemetry. The hook preserves every register but RFLAGS, which
        // IRETQ restores. Nothing here knows the backend.
        .global nmi_kick_stub
        nmi_kick_stub:
            cmpq $0, %gs:16
            je 1f
            incq %gs:32
            movq $1, %gs:24
            callq *%gs:16
        1:  iretq

        // The host run timer (HOST_TIMER_VECTOR): this core's bit in HOST_TIMERS, then the
        // EOI to this core's local APIC, in x2APIC
        // mode (IA32_APIC_BASE.EXTD) through MSR 0x80B, else at the xAPIC page + 0xB0.
        .global host_timer_stub
        host_timer_stub:
            pushq %rax
            pushq %rcx
            pushq %rdx
            movq %gs:0, %rcx
            lock btsq %rcx, HOST_TIMERS(%rip)
            jmp host_eoi

        // A doorbell for this core's guest taken by the host (SVM): this core's bit in
        // HOST_DOORBELLS (gs:[0] is the core index), then the EOI.
        .global host_doorbell_stub
        host_doorbell_stub:
            pushq %rax
            pushq %rcx
            pushq %rdx
            movq %gs:0, %rcx
            lock btsq %rcx, HOST_DOORBELLS(%rip)
        host_eoi:
            movl $0x1b, %ecx
            rdmsr
            testl $0x400, %eax
            jz 2f
            movl $0x80b, %ecx
            xorl %eax, %eax
            xorl %edx, %edx
            wrmsr
            jmp 3f
        2:  andl $0xfffff000, %eax
            shlq $32, %rdx
            orq %rdx, %rax
            movl $0, 0xb0(%rax)
        3:  popq %rdx
            popq %rcx
            popq %rax
            iretq

        // A device interrupt for this core's guest taken by the host (SVM): this core's
        // bit in HOST_DEVICE_IRQS[i], and no EOI (the guest's EOI retires it, see
        // HOST_DEVICE_IRQS).
        .irp i, 0,1,2,3
        .global host_device_stub_\i
        host_device_stub_\i:
            pushq %rcx
            movq %gs:0, %rcx
            lock btsq %rcx, HOST_DEVICE_IRQS+8*\i(%rip)
            popq %rcx
            iretq
        .endr

        exc_common:
            movq %rsp, %rdi
            andq $-16, %rsp
            call exception_entry
        1:  cli
            hlt
            jmp 1b

        .section .rodata
        .balign 8
        .global exc_stub_table
        exc_stub_table:
        .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
        .quad exc_stub_\n
        .endr
        "#,
        options(att_syntax)
    );

    extern "C" {
        static exc_stub_table: [u64; 32];
        static irq_stubs: u8;
        static nmi_kick_stub: u8;
        static host_timer_stub: u8;
        static host_doorbell_stub: u8;
        static host_device_stub_0: u8;
        static host_device_stub_1: u8;
        static host_device_stub_2: u8;
        static host_device_stub_3: u8;
    }

    pub fn nmi() -> u64 {
        core::ptr::addr_of!(nmi_kick_stub) as u64
    }

    pub fn host_timer() -> u64 {
        core::ptr::addr_of!(host_timer_stub) as u64
    }

    pub fn host_doorbell() -> u64 {
        core::ptr::addr_of!(host_doorbell_stub) as u64
    }

    /// The stub of device index `i` (0..4).
    pub fn host_device(i: usize) -> u64 {
        let stubs = [
            core::ptr::addr_of!(host_device_stub_0),
            core::ptr::addr_of!(host_device_stub_1),
            core::ptr::addr_of!(host_device_stub_2),
            core::ptr::addr_of!(host_device_stub_3),
        ];
        stubs[i % stubs.len()] as u64
    }

    pub fn address(vector: usize) -> u64 {
        if vector < 32 {
            // SAFETY: the table is immutable data filled by the assembler.
            unsafe { exc_stub_table[vector] }
        } else {
            let base = core::ptr::addr_of!(irq_stubs) as u64;
            base + 16 * (vector as u64 - 32)
        }
    }
}

#[cfg(not(target_os = "none"))]
mod stubs {
    /// Host builds (tests) have no stubs; gates get a recognisable fake address.
    pub fn address(vector: usize) -> u64 {
        0xffff_8000_0000_0000 | (vector as u64) << 4
    }
    pub fn nmi() -> u64 {
        0xffff_8000_0000_0000 | 2 << 4
    }
    pub fn host_timer() -> u64 {
        0xffff_8000_0000_0000 | (super::HOST_TIMER_VECTOR as u64) << 4
    }
    pub fn host_doorbell() -> u64 {
        0xffff_8000_0000_0000 | (vmcall_proto::guest::DOORBELL_VECTOR as u64) << 4
    }
    pub fn host_device(i: usize) -> u64 {
        0xffff_8000_0000_0000
            | (vmcall_proto::device::DEVICE_VECTOR_BASE as u64 + i as u64) << 4
            | 1 << 40
    }
}

const NAMES: [&str; 32] = [
    "#DE divide error",
    "#DB debug",
    "NMI",
    "#BP breakpoint",
    "#OF overflow",
    "#BR bound range",
    "#UD invalid opcode",
    "#NM device not available",
    "#DF double fault",
    "coprocessor segment overrun",
    "#TS invalid TSS",
    "#NP segment not present",
    "#SS stack fault",
    "#GP general protection",
    "#PF page fault",
    "reserved 15",
    "#MF x87 error",
    "#AC alignment check",
    "#MC machine check",
    "#XM SIMD error",
    "#VE virtualization exception",
    "#CP control protection",
    "reserved 22",
    "reserved 23",
    "reserved 24",
    "reserved 25",
    "reserved 26",
    "reserved 27",
    "#HV hypervisor injection",
    "#VC VMM communication",
    "#SX security exception",
    "reserved 31",
];

/// The mnemonic and name of an exception vector.
pub fn exception_name(vector: u64) -> &'static str {
    NAMES.get(vector as usize).copied().unwrap_or("unexpected interrupt")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gate_encodes_handler_selector_and_ist() {
        let g = interrupt_gate(0x1234_5678_9abc_def0, 1);
        assert_eq!(g.0[0] & 0xffff, 0xdef0);
        assert_eq!(g.0[0] >> 16 & 0xffff, CODE_SELECTOR as u64);
        assert_eq!(g.0[0] >> 32 & 7, 1);
        assert_eq!(g.0[0] >> 40 & 0xff, 0x8e);
        assert_eq!(g.0[0] >> 48, 0x9abc);
        assert_eq!(g.0[1], 0x1234_5678);
    }

    #[test]
    fn critical_vectors_use_the_ist() {
        let idt = Idt::new();
        for v in 0..256 {
            let ist = idt.0[v].0[0] >> 32 & 7;
            assert_eq!(ist == 1, matches!(v, 2 | 8 | 14 | 18), "vector {v}");
        }
    }
}
