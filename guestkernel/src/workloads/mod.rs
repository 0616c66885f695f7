// SPDX-License-Identifier: MIT OR Apache-2.0
//! The workload registry: the `workload` of a guest's config picks one of these. Each
//! returns the exit status the guest reports. The small ones are below; each family has
//! its own module in this folder.
//!
//! May call: the guest SDK (`guestkernel`), `vmcall_proto`; a workload module may call
//! another (`hostile` sends `netloads` messages), never the SDK back.
//!
//! * `hello`: prints its identity, checks what the hypervisor shows it (boot-info against
//!   the guest-info hypercall, the CPUID signature, VMX hidden, a bad hypercall refused),
//!   computes `sum(1..=n)` two ways (`n` from its args) and exits 0 only if all agree.
//! * `spin`: takes timer interrupts every millisecond until its budget (`ms`) is used up,
//!   then exits 0.
//! * `fault`: reads guest-physical memory past the end of its partition. The hypervisor
//!   must stop it there; if the read ever returns, it exits 1.
//! * `phoenix`: a guest that is restarted: finds no mark of an earlier incarnation (in its
//!   memory or its grant), leaves its own, and faults until incarnation `live_at`.

use crate::hypercall::{self, call};
use vmcall_proto::guest::BootInfo;
use vmcall_proto::hypercall::{HvError, Hypercall};

mod capattack;
mod capload;
mod capxfer;
mod exitbench;
mod ghost;
mod hostile;
mod kvfront;
mod kvworker;
mod linkloads;
mod meter;
mod netloads;
mod nicload;
mod pciattack;
mod supervise;
mod tcpecho;

type Workload = fn(&BootInfo) -> u64;

const REGISTRY: [(&str, Workload); 42] = [
    ("hello", hello),
    ("spin", spin),
    ("fault", fault),
    ("ping", netloads::ping),
    ("pong", netloads::pong),
    ("stream", netloads::stream),
    ("sink", netloads::sink),
    ("relay", netloads::relay),
    ("scribble", netloads::scribble),
    ("trespass", netloads::trespass),
    ("pool", capload::pool),
    ("giver", capxfer::giver),
    ("taker", capxfer::taker),
    ("racer", capxfer::racer),
    ("capowner", capxfer::capowner),
    ("holder", capxfer::holder),
    ("doomed", capxfer::doomed),
    ("revoker", capattack::revoker),
    ("splitter", capattack::splitter),
    ("passer", capattack::passer),
    ("far", capattack::far),
    ("flooder", capattack::flooder),
    ("quiet", capattack::quiet),
    ("attack", hostile::attack),
    ("phoenix", phoenix),
    ("supervisor", supervise::supervisor),
    ("streamer", linkloads::streamer),
    ("echoer", linkloads::echoer),
    ("ghost", ghost::ghost),
    ("lifebench", linkloads::lifebench),
    ("looper", linkloads::looper),
    ("forwarder", linkloads::forwarder),
    ("exitbench", exitbench::exitbench),
    ("meter", meter::meter),
    ("nic", nicload::nic),
    ("pciattack", pciattack::run),
    ("bigmap", capload::bigmap),
    ("tcpecho", tcpecho::tcpecho),
    ("kvfront", kvfront::kvfront),
    ("kvworker", kvworker::kvworker),
    ("impatient", netloads::impatient),
    ("laggard", netloads::laggard),
];
const _: () = assert!(REGISTRY.len() == vmcall_proto::guest::WORKLOADS.len());

pub fn run(bi: &BootInfo) -> u64 {
    match REGISTRY.iter().find(|(n, _)| *n == bi.workload()) {
        Some((_, w)) => w(bi),
        None => {
            log::error!("unknown workload {:?}", bi.workload());
            0xbad
        }
    }
}

/// The hypervisor's CPUID signature leaf, and whether CPUID.1:ECX.VMX is visible.
fn cpuid_view() -> ([u8; 12], bool) {
    let sig = core::arch::x86_64::__cpuid(vmcall_proto::hypercall::CPUID_SIGNATURE_LEAF);
    let mut s = [0u8; 12];
    s[..4].copy_from_slice(&sig.ebx.to_le_bytes());
    s[4..8].copy_from_slice(&sig.ecx.to_le_bytes());
    s[8..].copy_from_slice(&sig.edx.to_le_bytes());
    let vmx = core::arch::x86_64::__cpuid(1).ecx & (1 << 5) != 0;
    (s, vmx)
}

fn hello(bi: &BootInfo) -> u64 {
    let n = bi.arg_int("n");
    log::info!(
        "hello from {} (guest {}) on core {}: {} MiB, args {:?}",
        bi.name(),
        bi.guest_id,
        bi.core,
        bi.memory_bytes >> 20,
        bi.args()
    );
    let mut ok = true;
    let info = call(Hypercall::GuestInfo, 0, 0).unwrap_or(0);
    let i = vmcall_proto::hypercall::GuestInfo::unpack(info);
    let (id, core, mib) = (u64::from(i.id), u64::from(i.core), u64::from(i.memory_mib));
    if (id, core, mib) != (bi.guest_id as u64, bi.core as u64, bi.memory_bytes >> 20) {
        log::error!("guest-info hypercall says id {id} core {core} {mib} MiB; boot-info disagrees");
        ok = false;
    }
    let (sig, vmx) = cpuid_view();
    let sig_ok = &sig[..7] == b"mkvisor";
    log::info!(
        "cpuid: signature {:?}, VMX {}",
        core::str::from_utf8(&sig[..7]).unwrap_or("?"),
        if vmx { "visible" } else { "hidden" }
    );
    ok &= sig_ok && !vmx;
    let bad = hypercall::raw(0xffff, 0, 0);
    let refused = HvError::from_rax(bad) == Err(Ok(HvError::UnknownCall));
    let oob = call(Hypercall::ConsoleWrite, bi.memory_bytes - 4, 16);
    let oob_refused = oob == Err(Ok(HvError::BadAddress));
    log::info!(
        "bad hypercalls refused: unknown number {refused}, buffer past my memory {oob_refused}"
    );
    ok &= refused && oob_refused;
    // Exit-free telemetry: the page counts every exit so far; `exit_count` counts its own
    // exit too, so it says one more.
    let (page, (calls, entries)) =
        (guestkernel::telemetry::exits(), guestkernel::telemetry::hypercalls_and_entries());
    let counted = hypercall::exit_count();
    log::info!(
        "telemetry: the status page says {page} exits ({calls} hypercalls, {entries} entries), \
         exit_count says {counted}"
    );
    ok &= counted == page + 1 && entries == page + 1 && calls > 0;
    let mut sum: u64 = 0;
    for i in 1..=n {
        sum = sum.wrapping_add(core::hint::black_box(i));
    }
    let closed = n * (n + 1) / 2;
    log::info!("result: sum(1..={n}) = {sum} (closed form {closed})");
    ok &= sum == closed;
    if ok {
        0
    } else {
        1
    }
}

fn spin(bi: &BootInfo) -> u64 {
    use core::sync::atomic::Ordering;
    let ms = bi.arg_int("ms").max(1);
    let tick = bi.tsc_per_ms;
    log::info!("spin: {ms} ms budget, 1 ms timer ticks ({tick} TSC ticks each)");
    let start = crate::arch::rdtsc();
    let mut spins: u64 = 0;
    while crate::arch::TICKS.load(Ordering::Relaxed) < ms {
        let before = crate::arch::TICKS.load(Ordering::Relaxed);
        if call(Hypercall::TimerOneshot, tick, crate::arch::TIMER_VECTOR as u64).is_err() {
            log::error!("timer hypercall refused");
            return 1;
        }
        while crate::arch::TICKS.load(Ordering::Relaxed) == before {
            // Busy half the tick, then sleep until the interrupt.
            let t = crate::arch::rdtsc();
            while crate::arch::rdtsc() - t < tick / 2 {
                spins += 1;
            }
            crate::arch::wait_for_interrupt();
        }
    }
    let elapsed = crate::arch::rdtsc() - start;
    log::info!(
        "spin: {} ticks, {} TSC ticks elapsed ({} ms), {spins} spins",
        crate::arch::TICKS.load(Ordering::Relaxed),
        elapsed,
        elapsed / tick.max(1)
    );
    0
}

fn fault(bi: &BootInfo) -> u64 {
    let target = bi.memory_bytes + (2 << 20);
    log::info!(
        "fault: reading guest-physical {target:#x}, past the end of my {} MiB",
        bi.memory_bytes >> 20
    );
    // Deliberately out of bounds: the hypervisor stops this guest at the read.
    // SAFETY: our page tables map the address (EPT does not), so the read itself is valid.
    let v = unsafe { core::ptr::read_volatile(target as *const u64) };
    log::error!("fault: the read returned {v:#x}: memory outside the partition is reachable");
    1
}

/// What a `phoenix` incarnation writes where the next one looks: never found if the
/// hypervisor scrubs a dead incarnation's memory.
const MARK: u64 = 0x9e0e_41c5_0000_0000;

fn phoenix(bi: &BootInfo) -> u64 {
    let n = bi.incarnation as u64;
    let live_at = bi.arg_int("live_at");
    // The last page of the partition: mapped by the boot page tables, used by nothing.
    let last = (bi.memory_bytes - 4096) as *mut u64;
    // SAFETY: inside this guest's partition, identity-mapped, not used by the kernel.
    let found = unsafe { core::ptr::read_volatile(last) };
    let mut clean = found == 0;
    // The first grant, if it has one, mapped read-write in the grant window.
    let window = vmcall_proto::hypercall::GRANT_WINDOW.0;
    let grant = crate::hypercall::call3(Hypercall::CapMap, 0, window, 3).is_ok();
    let mut in_grant = 0;
    if grant {
        // SAFETY: just mapped read-write at the window's base.
        in_grant = unsafe { core::ptr::read_volatile(window as *const u64) };
        clean &= in_grant == 0;
    }
    log::info!(
        "phoenix: incarnation {n}: earlier marks {} (memory {found:#x}, {})",
        if clean { "none" } else { "FOUND" },
        Grant(grant.then_some(in_grant)),
    );
    // SAFETY: as above.
    unsafe { core::ptr::write_volatile(last, MARK | n) };
    if grant {
        // SAFETY: as above.
        unsafe { core::ptr::write_volatile(window as *mut u64, MARK | n) };
    }
    if !clean {
        return 2;
    }
    if n < live_at {
        log::info!("phoenix: incarnation {n} faults on purpose");
        // SAFETY: our page tables map the address (EPT does not): the hypervisor stops us.
        unsafe { core::ptr::read_volatile((bi.memory_bytes + (2 << 20)) as *const u64) };
        return 1;
    }
    log::info!("phoenix: incarnation {n} lives");
    0
}

struct Grant(Option<u64>);
impl core::fmt::Display for Grant {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.0 {
            Some(v) => write!(f, "grant {v:#x}"),
            None => f.write_str("no grant"),
        }
    }
}
