// SPDX-License-Identifier: MIT OR Apache-2.0
//! Bringing up the application processors, and how each core reports back.
//!
//! The BSP wakes APs one at a time with INIT-SIPI-SIPI (SDM Vol. 3A 9.4.4.1) through the
//! real-mode trampoline, waiting a bounded time for each to answer; a core that stays
//! silent is reported, not waited for. From then on the cores share nothing but messages:
//! each core posts its state to its own [`Mailbox`] (single writer), and the BSP reads them.

use crate::vmx::Features;
use core::fmt;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// Mailbox states, in the order a core goes through them.
pub mod state {
    pub const EMPTY: u32 = 0;
    pub const ALIVE: u32 = 1;
    pub const UP: u32 = 2;
    pub const FAILED: u32 = 3;
}

/// Why a core failed, as posted in its mailbox.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    None = 0,
    FeatureControl = 1,
    FixedBits = 2,
    Vmxon = 3,
    Exception = 4,
    Panic = 5,
    /// The SVM world-switch check failed on this core.
    SvmCheck = 6,
}

impl Failure {
    fn from_u32(v: u32) -> Self {
        match v {
            1 => Failure::FeatureControl,
            2 => Failure::FixedBits,
            3 => Failure::Vmxon,
            4 => Failure::Exception,
            5 => Failure::Panic,
            6 => Failure::SvmCheck,
            _ => Failure::None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Failure::None => "",
            Failure::FeatureControl => crate::vmx::VmxError::FeatureControlLocked.as_str(),
            Failure::FixedBits => crate::vmx::VmxError::FixedBits.as_str(),
            Failure::Vmxon => crate::vmx::VmxError::VmxonFailed.as_str(),
            Failure::Exception => "exception",
            Failure::Panic => "panic (see the core's log line)",
            Failure::SvmCheck => "the SVM world-switch check failed (see the core's log line)",
        }
    }
}

impl From<crate::vmx::VmxError> for Failure {
    fn from(e: crate::vmx::VmxError) -> Self {
        match e {
            crate::vmx::VmxError::FeatureControlLocked => Failure::FeatureControl,
            crate::vmx::VmxError::FixedBits => Failure::FixedBits,
            crate::vmx::VmxError::VmxonFailed => Failure::Vmxon,
        }
    }
}

/// One core's outbox to the BSP: written only by its core, read by the BSP. One cache
/// line, the state word written last (release) so the rest is visible when it changes.
#[repr(C, align(64))]
pub struct Mailbox {
    vmx_on: AtomicU32,
    failure: AtomicU32,
    /// For [`Failure::Exception`]: the vector and the faulting RIP.
    vector: AtomicU32,
    rip: AtomicU64,
    state: AtomicU32,
}
const _: () = assert!(core::mem::size_of::<Mailbox>() == 64);

/// What the BSP reads out of a mailbox.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CoreStatus {
    pub state: u32,
    pub vmx_on: bool,
    pub failure: Failure,
    pub vector: u32,
    pub rip: u64,
}

impl CoreStatus {
    /// Why the core failed, for its record.
    pub fn reason(&self) -> impl fmt::Display + '_ {
        struct R<'a>(&'a CoreStatus);
        impl fmt::Display for R<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let s = self.0;
                match s.failure {
                    Failure::Exception => write!(
                        f,
                        "exception {} (vector {}) at rip={:#x}",
                        crate::arch::idt::exception_name(s.vector as u64),
                        s.vector,
                        s.rip
                    ),
                    other => f.write_str(other.as_str()),
                }
            }
        }
        R(self)
    }
}

impl Mailbox {
    const fn new() -> Self {
        Mailbox {
            vmx_on: AtomicU32::new(0),
            failure: AtomicU32::new(0),
            vector: AtomicU32::new(0),
            rip: AtomicU64::new(0),
            state: AtomicU32::new(0),
        }
    }

    /// Posts this core's state. Only the owning core calls this.
    pub fn post(&self, state: u32, vmx_on: bool, failure: Failure) {
        self.post_fault(state, vmx_on, failure, 0, 0);
    }

    /// [`Mailbox::post`] with the vector and RIP of an exception.
    pub fn post_fault(&self, state: u32, vmx_on: bool, failure: Failure, vector: u32, rip: u64) {
        self.vector.store(vector, Ordering::Relaxed);
        self.rip.store(rip, Ordering::Relaxed);
        self.vmx_on.store(vmx_on as u32, Ordering::Relaxed);
        self.failure.store(failure as u32, Ordering::Relaxed);
        self.state.store(state, Ordering::Release);
    }

    pub fn read(&self) -> CoreStatus {
        let state = self.state.load(Ordering::Acquire);
        CoreStatus {
            state,
            vmx_on: self.vmx_on.load(Ordering::Relaxed) != 0,
            failure: Failure::from_u32(self.failure.load(Ordering::Relaxed)),
            vector: self.vector.load(Ordering::Relaxed),
            rip: self.rip.load(Ordering::Relaxed),
        }
    }
}

static MAILBOXES: [Mailbox; crate::percpu::MAX_CORES] =
    [const { Mailbox::new() }; crate::percpu::MAX_CORES];

/// The features the BSP probed: written once before any AP starts, then read-only.
static FEATURES: spin::Once<Features> = spin::Once::new();
/// Set instead of [`FEATURES`] when the backend is AMD SVM.
static SVM_FEATURES: spin::Once<crate::svm::Features> = spin::Once::new();
/// The BSP's launch message to each core (written before the core starts, once).
static LAUNCHES: [spin::Once<crate::instance::Launch>; crate::percpu::MAX_CORES] =
    [const { spin::Once::new() }; crate::percpu::MAX_CORES];
/// Each core's report when its guest has ended (written once by that core).
static REPORTS: [spin::Once<crate::instance::GuestReport>; crate::percpu::MAX_CORES] =
    [const { spin::Once::new() }; crate::percpu::MAX_CORES];

/// Tells core `index` which guest to run. Called by the BSP before the core starts.
pub fn post_launch(index: usize, l: crate::instance::Launch) {
    LAUNCHES[index].call_once(|| l);
}

pub fn launch_of(index: usize) -> Option<&'static crate::instance::Launch> {
    LAUNCHES[index].get()
}

pub fn report_of(index: usize) -> Option<&'static crate::instance::GuestReport> {
    REPORTS[index].get()
}

/// Runs this core's guest, if it has one and VMX is on, and posts the report; then serves
/// the capability protocol while `keep` (handed the cores this one's view fenced) says so.
/// Returns the cores fenced.
pub fn run_guest(index: usize, keep: impl Fn(u64) -> bool) -> u64 {
    let Some(l) = launch_of(index) else { return 0 };
    if !mailbox(index).read().vmx_on {
        return 0;
    }
    #[cfg(target_os = "none")]
    let fenced = {
        let post = |r, serve: &mut dyn FnMut()| {
            // The guest has ended: its core writes its exit trace before reporting.
            crate::trace::drain(index, serve);
            REPORTS[index].call_once(|| r);
        };
        if let Some(f) = SVM_FEATURES.get() {
            crate::instance::run::run::<crate::svm::vcpu::SvmVcpu>(l, f, index as u32, post, keep)
        } else if let Some(f) = FEATURES.get() {
            crate::instance::run::run::<crate::vmx::vcpu::VmxVcpu>(l, f, index as u32, post, keep)
        } else {
            0
        }
    };
    #[cfg(not(target_os = "none"))]
    let fenced = {
        let _ = (l, keep, FEATURES.get(), SVM_FEATURES.get());
        0
    };
    fenced
}

/// Set once by the BSP before APs start (`inject=ap-fault`): core 1 faults on purpose.
static INJECT_AP_FAULT: spin::Once<bool> = spin::Once::new();

/// Arms the `inject=ap-fault` test fault. Called once, before [`start_ap`].
pub fn inject_ap_fault(on: bool) {
    INJECT_AP_FAULT.call_once(|| on);
}

pub fn mailbox(index: usize) -> &'static Mailbox {
    &MAILBOXES[index]
}

/// Records the probed features for the APs. Called once, before [`start_ap`].
pub fn publish_features(f: Features) {
    FEATURES.call_once(|| f);
}

/// Records the probed SVM features for the APs (the SVM backend). Called once, before
/// [`start_ap`].
pub fn publish_svm(f: crate::svm::Features) {
    SVM_FEATURES.call_once(|| f);
}

/// Turns SVM on for this core, runs the world-switch check and posts the result (the
/// mailbox's `vmx_on` then means "hardware virtualization on").
fn enable_svm_and_report(index: usize, f: &crate::svm::Features) {
    #[cfg(target_os = "none")]
    // SAFETY: once per core, after init_this_core; the BSP built the maps before any AP.
    let result = unsafe {
        crate::svm::enable_on_this_core(index);
        crate::svm::check(index, f)
    };
    #[cfg(not(target_os = "none"))]
    let result: Result<crate::svm::CheckReport, crate::svm::SvmError> = {
        let _ = f;
        Ok(Default::default())
    };
    match result {
        Ok(r) => {
            log::info!(
                "SVM on; world-switch check: {} exits (VMMCALL rcx={:#x}, CPUID, nested page \
                 fault at {:#x} error {:#x}, HLT) in {} TSC ticks",
                r.exits,
                r.rcx_at_vmmcall,
                r.npf_gpa,
                r.npf_error,
                r.ticks
            );
            mailbox(index).post(state::UP, true, Failure::None);
        }
        Err(e) => {
            log::error!("SVM world-switch check failed: {e}");
            mailbox(index).post(state::FAILED, false, Failure::SvmCheck);
        }
    }
}

/// Brings this core into VMX root operation (or SVM on, with that backend) and posts the
/// result.
pub fn enable_vmx_and_report(index: usize) {
    if let Some(f) = SVM_FEATURES.get() {
        return enable_svm_and_report(index, f);
    }
    let Some(f) = FEATURES.get() else {
        mailbox(index).post(state::FAILED, false, Failure::Panic);
        return;
    };
    #[cfg(target_os = "none")]
    // SAFETY: called once per core after init_this_core, with the BSP's features.
    let result = unsafe { crate::vmx::enable_on_this_core(f) };
    #[cfg(not(target_os = "none"))]
    let result: Result<(), crate::vmx::VmxError> = {
        let _ = f;
        Ok(())
    };
    match result {
        Ok(()) => {
            log::info!("VMX root operation on (VMXON region revision {:#x})", f.revision);
            #[cfg(target_os = "none")]
            {
                let (cd, nw, pat) = crate::arch::cache_state();
                log::info!("caches on: CR0.CD={} NW={} PAT={pat:#x}", cd as u8, nw as u8);
            }
            mailbox(index).post(state::UP, true, Failure::None);
        }
        Err(e) => {
            log::error!("VMX could not be enabled: {e}");
            mailbox(index).post(state::FAILED, false, e.into());
        }
    }
}

/// Called by a core that cannot go on (exception, panic): an AP posts the failure and
/// parks; the BSP ends the run, since it is the one that would report. `vector` and `rip`
/// describe an exception (0 otherwise).
pub fn this_core_failed(failure: Failure, vector: u32, rip: u64) -> ! {
    match crate::percpu::current_index() {
        Some(0) | None => {
            mailbox(0).post_fault(state::FAILED, false, failure, vector, rip);
            crate::power::end_run(crate::power::Outcome::Failed)
        }
        Some(i) => {
            let vmx = mailbox(i).read().vmx_on;
            mailbox(i).post_fault(state::FAILED, vmx, failure, vector, rip);
            crate::arch::park()
        }
    }
}

/// Where an AP lands in long mode, on its own stack, with its slot index.
#[cfg(target_os = "none")]
extern "C" fn ap_entry(index: u64) -> ! {
    let index = index as usize;
    let apic_id = crate::arch::apic::current_id();
    // SAFETY: the BSP handed this index to this core alone; first thing the core does.
    unsafe { crate::percpu::init_this_core(index, apic_id) };
    mailbox(index).post(state::ALIVE, false, Failure::None);
    crate::record!(vmcall_proto::record::kind::ONLINE, "index={index} apic={apic_id}");
    // SAFETY: once, during this core's bring-up, before its guest runs.
    if !unsafe { crate::arch::apic::enable_x2apic_this_core() } {
        log::warn!(
            "no x2APIC: under VT-x this core's guest cannot take channel doorbells (the SVM \
             backend virtualizes them)"
        );
    }
    // Kicks to this core may now share an ICR write with the rest of its x2APIC cluster.
    crate::instance::xcore::publish_logical_id(index);
    if index == 1 && INJECT_AP_FAULT.get() == Some(&true) {
        log::warn!("inject=ap-fault: executing UD2 during bring-up");
        // SAFETY: deliberately raises #UD, which the IDT reports; nothing is corrupted.
        unsafe { core::arch::asm!("ud2", options(nomem, nostack)) };
    }
    enable_vmx_and_report(index);
    // An AP serves its inbox for the rest of the run (the BSP ends it).
    run_guest(index, |_| true);
    crate::arch::park()
}

/// How long an AP may take to enter Rust code after its SIPI, in microseconds of TSC time
/// (the default; the command line's `ap_answer_ms` replaces it).
pub const AP_ANSWER_US: u64 = 200_000;

/// The wait in force: set once on the BSP before it starts any AP, read only by it.
#[cfg(target_os = "none")]
static AP_ANSWER: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(AP_ANSWER_US);

/// Sets how long each AP may take to answer (`ap_answer_ms`); before any AP is started.
#[cfg(target_os = "none")]
pub fn set_ap_answer_us(us: u64) {
    AP_ANSWER.store(us.max(1), core::sync::atomic::Ordering::Relaxed);
}

/// Wakes the AP with `apic_id` as slot `index` and waits (bounded) until it answers.
/// Returns whether it did.
///
/// # Safety
/// Called on the BSP only, for each AP once, one at a time; the trampoline page is free RAM.
#[cfg(target_os = "none")]
pub unsafe fn start_ap(
    apic: &mut crate::arch::apic::LocalApic,
    index: usize,
    apic_id: u32,
    start: Start,
) -> bool {
    use crate::arch::{trampoline, tsc};
    use core::sync::atomic::Ordering::{AcqRel, Acquire, Release};
    if TRAMPOLINE_HELD.load(Acquire) {
        // An earlier AP took its block and never gave it back: writing another would
        // change what it may still be reading.
        return false;
    }
    // The previous AP has left the block (it read it, or its block was withdrawn).
    // SAFETY: only this BSP writes the page now.
    unsafe {
        trampoline::install(trampoline::Params {
            cr3: crate::arch::read_cr3(),
            stack_top: crate::percpu::stack_top(index),
            entry: ap_entry as *const () as u64,
            arg: index as u64,
            claim: trampoline::FREE,
        })
    };
    // SAFETY: installed just above.
    let claim = unsafe { trampoline::claim_word() };
    let open = trampoline::open(apic_id);
    claim.store(open, Release);
    let answered = || mailbox(index).read().state != state::EMPTY;
    if let Start::AlsoStray(stray) = start {
        // The injected late AP reaches the trampoline now, this AP's block open.
        // SAFETY: the stray AP had its INIT and runs nothing of ours.
        unsafe { apic.send_sipi(stray, trampoline::SIPI_VECTOR) };
        tsc::delay_us(20_000);
    }
    // SAFETY: the target is an AP nothing of ours runs on; the trampoline is installed.
    unsafe {
        apic.send_init(apic_id);
        tsc::delay_us(10_000);
        if start != Start::Withhold {
            apic.send_sipi(apic_id, trampoline::SIPI_VECTOR);
            tsc::delay_us(200);
            if !answered() {
                apic.send_sipi(apic_id, trampoline::SIPI_VECTOR);
            }
        }
    }
    let deadline = tsc::deadline_us(AP_ANSWER.load(core::sync::atomic::Ordering::Relaxed));
    while crate::arch::rdtsc() < deadline {
        if answered() {
            return true;
        }
        crate::arch::pause();
    }
    if claim.compare_exchange(open, trampoline::FREE, AcqRel, Acquire).is_ok() {
        // Withdrawn before the AP took it: if it starts late it parks in the trampoline.
        // INIT puts it back to waiting for a SIPI that never comes (a parked AP has no
        // IDT, so it must not meet an NMI). Not for the injected late AP, whose SIPI is
        // still to come.
        if start != Start::Withhold {
            // SAFETY: the AP runs nothing of ours (it never took its block).
            unsafe { apic.send_init(apic_id) };
        }
        // INIT again once every AP is started ([`withdrawn`]): an emulator may keep a SIPI
        // pending across this INIT (QEMU's TCG does), and the AP then parks in the
        // trampoline, where an NMI would find no IDT.
        WITHDRAWN.fetch_or(1 << index, AcqRel);
        return answered();
    }
    // The AP took its block: it is a few instructions from giving it back and answering.
    let deadline = tsc::deadline_us(AP_ANSWER.load(core::sync::atomic::Ordering::Relaxed));
    while claim.load(Acquire) != trampoline::FREE || !answered() {
        if crate::arch::rdtsc() >= deadline {
            if claim.load(Acquire) != trampoline::FREE {
                TRAMPOLINE_HELD.store(true, Release);
            }
            return answered();
        }
        crate::arch::pause();
    }
    true
}

/// How [`start_ap`] starts its AP: as usual, or for `inject=late-ap` without a STARTUP IPI
/// (the AP to be late), or as usual after sending the late AP (this APIC ID) its SIPI.
#[cfg(target_os = "none")]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    Normal,
    Withhold,
    AlsoStray(u32),
}

/// The cores whose start-up block [`start_ap`] withdrew, one bit each.
#[cfg(target_os = "none")]
static WITHDRAWN: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

/// The cores whose start-up block was withdrawn (they never answered): the BSP sends each
/// an INIT once every AP is started, so that none is left parked in the trampoline.
#[cfg(target_os = "none")]
pub fn withdrawn() -> u64 {
    WITHDRAWN.load(core::sync::atomic::Ordering::Acquire)
}

/// An AP took the trampoline's block and did not give it back in time: no further AP is
/// started (the block cannot be rewritten under it).
#[cfg(target_os = "none")]
static TRAMPOLINE_HELD: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);
