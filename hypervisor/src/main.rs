// SPDX-License-Identifier: MIT OR Apache-2.0
//! mkvisor: a thin VT-x hypervisor for a multikernel of guests.
//!
//! Boot flow on the bootstrap processor (BSP), from [`hv_entry_bsp`]:
//! 1. console, per-core tables (GDT/TSS/IDT, GS), multiboot2 information copied out;
//! 2. the core list from the ACPI MADT, cross-checked with CPUID, capped by `cpus=`;
//! 3. the VMX feature probe: a missing requirement ends the run as `refused`, cleanly;
//! 4. each AP is woken, enters long mode on its own stack and does VMXON on itself;
//! 5. the BSP does VMXON, collects every core's mailbox, prints the records and ends the
//!    run through the emulator's exit port.
//!
//! Each core owns its state ([`percpu`]); cores talk through single-writer mailboxes.
#![cfg_attr(not(test), no_std)]
#![cfg_attr(not(test), no_main)]
// Host builds (unit tests) compile the bare-metal paths without their callers, which live in
// `boot` below; only there would they count as dead. The x86_64-unknown-none build is strict.
#![cfg_attr(not(target_os = "none"), allow(dead_code))]

mod arch;
mod bootinfo;
mod caps;
mod console;
mod cores;
mod ept;
mod exits;
mod fastexit;
mod fault;
#[cfg(target_os = "none")]
mod guests;
mod hostctl;
mod instance;
mod members;
mod memory;
mod pci;
mod percpu;
mod power;
mod smp;
mod svm;
mod trace;
mod vcpu;
mod vmx;

#[cfg(target_os = "none")]
mod boot {
    use crate::power::{end_run, Outcome};
    use crate::{arch, bootinfo, console, cores, guests, pci, percpu, record, smp, svm, vmx};
    use vmcall_proto::record::{core_state, kind, Quoted};

    /// Entered from `arch::boot` in long mode, on the boot stack.
    #[no_mangle]
    extern "C" fn hv_entry_bsp(magic: u32, mbi: u64) -> ! {
        let tsc_entry = arch::rdtsc();
        // SAFETY: first code on the BSP; no other core runs yet.
        unsafe { console::init() };
        let bsp_apic = arch::apic::current_id();
        // SAFETY: the BSP's one initialisation of slot 0.
        unsafe { percpu::init_this_core(0, bsp_apic) };
        log::info!(
            "mkvisor {} starting (ABI {})",
            env!("CARGO_PKG_VERSION"),
            vmcall_proto::ABI_VERSION
        );

        // SAFETY: `mbi` is GRUB's information block, untouched so far.
        let boot = match unsafe { bootinfo::parse(magic, mbi) } {
            Ok(b) => b,
            Err(e) => {
                log::error!("{e}");
                end_run(Outcome::Failed)
            }
        };
        record!(
            kind::BOOT,
            "abi={} tsc={} cmdline={}",
            vmcall_proto::ABI_VERSION,
            tsc_entry,
            Quoted(boot.cmdline())
        );
        let opts = bootinfo::parse_options(boot.cmdline(), |bad| log::warn!("{bad} (ignored)"));
        crate::trace::enable(opts.trace);
        log::info!(
            "loader {:?}, {} MiB usable in {} regions{}",
            boot.loader(),
            boot.usable_bytes() >> 20,
            boot.regions().len(),
            if boot.regions_dropped > 0 { " (some dropped)" } else { "" }
        );

        // The legacy 8259 PICs would interrupt whichever guest runs on the BSP; nothing of
        // ours uses them.
        // SAFETY: writing the interrupt-mask registers masks every line.
        unsafe {
            arch::outb(0x21, 0xff);
            arch::outb(0xa1, 0xff);
        }
        // SAFETY: single core; PIT channel 2 is ours.
        match unsafe { arch::tsc::calibrate() } {
            Some(t) => log::info!("TSC: {t} ticks/ms"),
            None => log::warn!(
                "TSC calibration failed (PIT silent); using {} ticks/ms",
                arch::tsc::ticks_per_ms()
            ),
        }

        // The backend, from CPUID: VT-x where the machine has it, else AMD SVM.
        let raw = vmx::features::read();
        if opts.vmxcaps {
            log::info!("VMX capabilities: {raw:#x?}");
        }
        let features = match vmx::features::decode(&raw) {
            Ok(f) => Backend::Vmx(f),
            Err(missing) => {
                let mut svm_ok = None;
                if missing == vmx::features::Missing::Vmx {
                    let raw = svm::features::read();
                    if opts.vmxcaps {
                        log::info!("SVM capabilities: {raw:#x?}");
                    }
                    match svm::features::decode(&raw) {
                        Ok(f) => svm_ok = Some(f),
                        Err(svm::features::Missing::Svm) => {}
                        Err(m) => log::warn!("AMD SVM present but unusable: no {m}"),
                    }
                }
                let Some(f) = svm_ok else {
                    log::error!("mkvisor needs {missing}; this machine lacks it. Nothing started.");
                    record!(kind::REFUSED, "missing={}", Quoted(missing));
                    end_run(Outcome::Refused)
                };
                Backend::Svm(f)
            }
        };
        match &features {
            Backend::Vmx(f) => {
                log::info!("backend: vmx");
                log::info!(
                    "VMX: revision {:#x}, EPT 2M={} 1G={} A/D={}, preemption timer={}, feature control {:?}",
                    f.revision,
                    f.ept_2m_pages,
                    f.ept_1g_pages,
                    f.ept_accessed_dirty,
                    f.preemption_timer,
                    f.feature_control
                );
            }
            Backend::Svm(f) => {
                log::info!("backend: svm");
                log::info!("SVM: {f}");
            }
        }
        let list = match discover_cores(&boot, bsp_apic, opts.cpus) {
            Ok(l) => l,
            Err(e) => {
                log::error!("cannot list the cores: {e}");
                end_run(Outcome::Failed)
            }
        };

        match features {
            Backend::Vmx(f) => smp::publish_features(f),
            Backend::Svm(f) => {
                // SAFETY: on the BSP, before any AP starts.
                unsafe { svm::build_maps() };
                // Every guest's nested tables in AMD's format (before any core builds one).
                crate::ept::set_format(crate::ept::Format::Npt);
                smp::publish_svm(f);
            }
        }
        let mut apics = [0u32; percpu::MAX_CORES];
        for (a, c) in apics.iter_mut().zip(list.cores()) {
            *a = c.apic_id;
        }
        crate::instance::xcore::publish_cores(&apics[..list.len()]);
        smp::inject_ap_fault(opts.inject == Some(bootinfo::Inject::ApFault));
        record!(kind::ONLINE, "index=0 apic={bsp_apic}");

        let fns = pci::discover(&mut pci::Cf8);
        guests::report_pci(fns);
        let plan = match guests::plan(&boot, &list, &opts) {
            Ok(p) => p,
            Err(e) => {
                log::error!("{e}");
                end_run(Outcome::Failed)
            }
        };
        if let Some(ms) = opts.ap_answer_ms {
            smp::set_ap_answer_us(ms.saturating_mul(1000));
        }
        start_aps(&boot, &list, opts.inject);
        // The BSP's APIC is in x2APIC mode now (if it has one): kicks to it may be logical.
        crate::instance::xcore::publish_logical_id(0);
        smp::enable_vmx_and_report(0);
        let svm = matches!(features, Backend::Svm(_));
        let all_up = collect(
            &list,
            if svm { "with SVM on" } else { "in VMX root operation" },
            if svm { "svm" } else { "vmx" },
        );
        let tsc_ready = arch::rdtsc();
        log::info!("all cores reported in: {} ticks since hypervisor entry", tsc_ready - tsc_entry);
        record!(kind::READY, "tsc={tsc_ready}");
        let Some(plan) = plan else { end_run(if all_up { Outcome::Ok } else { Outcome::Failed }) };
        // The BSP serves until every guest has reported, then ends the run.
        let fenced = smp::run_guest(0, guests::pending);
        let all_exited = guests::collect(plan, fenced);
        end_run(if all_up && all_exited { Outcome::Ok } else { Outcome::Failed })
    }

    /// The CPU backend picked at boot.
    enum Backend {
        Vmx(vmx::Features),
        Svm(svm::Features),
    }

    fn discover_cores(
        boot: &bootinfo::BootParams,
        bsp_apic: u32,
        cap: Option<usize>,
    ) -> Result<cores::CoreList, &'static str> {
        let root = boot.acpi.ok_or("the loader passed no ACPI RSDP")?;
        // ACPI tables are in identity-mapped memory below 4 GiB on the machines we boot.
        // SAFETY: the root table address comes from a checksummed RSDP.
        let tables = unsafe {
            match root {
                bootinfo::AcpiRoot::Rsdt(a) => {
                    acpi::AcpiTables::from_rsdt(cores::IdentityMapped, 0, a as usize)
                }
                bootinfo::AcpiRoot::Xsdt(a) => {
                    acpi::AcpiTables::from_rsdt(cores::IdentityMapped, 2, a as usize)
                }
            }
        }
        .map_err(|_| "the ACPI root table is invalid")?;
        let madt = tables.find_table::<acpi::madt::Madt>().map_err(|_| "no valid MADT")?;
        cores::check_madt_entries(madt.get()).map_err(|e| {
            log::error!("{e}");
            "the MADT is malformed"
        })?;
        let io = cores::madt_ioapic(madt.get());
        log::info!(
            "MADT: I/O APIC at {:#x} (GSI base {}), {} interrupt source overrides",
            io.base,
            io.gsi_base,
            io.override_count
        );
        pci::ioapic::set_platform(io);
        let x2apic = arch::apic::has_x2apic();
        let list = cores::CoreList::build(cores::madt_cpus(madt.get()), bsp_apic, cap, |id| {
            x2apic || id < 0xff
        })
        .map_err(|e| {
            log::error!("{e}");
            "MADT and CPUID disagree"
        })?;
        let cpuid_logical = raw_cpuid::CpuId::new()
            .get_feature_info()
            .map(|f| f.max_logical_processor_ids() as usize)
            .unwrap_or(1);
        log::info!(
            "MADT: {} enabled processors ({} disabled), BSP APIC id {bsp_apic}, x2APIC {}; \
             CPUID allows {} logical ids per package; using {}",
            list.enabled,
            list.skipped_disabled,
            if x2apic { "yes" } else { "no" },
            cpuid_logical,
            list.len()
        );
        if list.skipped_capped > 0 {
            log::info!("cpus={} leaves {} cores idle", cap.unwrap_or(0), list.skipped_capped);
        }
        if list.skipped_unaddressable > 0 {
            log::warn!(
                "{} cores have APIC ids unreachable without x2APIC",
                list.skipped_unaddressable
            );
        }
        record!(
            kind::CPUS,
            "count={} enabled={} used={} bsp_apic={} x2apic={}",
            list.enabled + list.skipped_disabled,
            list.enabled,
            list.len(),
            bsp_apic,
            x2apic as u8
        );
        Ok(list)
    }

    fn start_aps(
        boot: &bootinfo::BootParams,
        list: &cores::CoreList,
        inject: Option<bootinfo::Inject>,
    ) {
        let silence_last = inject == Some(bootinfo::Inject::SilentAp);
        let late_ap = inject == Some(bootinfo::Inject::LateAp) && list.len() >= 3;
        // The late AP's APIC ID once the BSP gave up on it: it gets its SIPI during the
        // next AP's window.
        let mut stray = None;
        use arch::trampoline::BASE;
        if list.len() == 1 {
            // No AP to wake, but the BSP's guest may still take interrupts through its own
            // IDT (a device's) and acknowledge them at the x2APIC EOI register: x2APIC mode
            // on, as on every core that starts APs or is one.
            // SAFETY: once, on the BSP, before its guest runs.
            unsafe { arch::apic::enable_x2apic_this_core() };
            return;
        }
        if !boot.is_usable(BASE, BASE + 4096) {
            log::error!(
                "the AP trampoline page {BASE:#x} is not usable RAM; running on the BSP only"
            );
            return;
        }
        // SAFETY: called once, on the BSP, before any IPI.
        let mut apic = unsafe { arch::apic::LocalApic::enable() };
        for (index, core) in list.cores().iter().enumerate().skip(1) {
            if silence_last && index == list.len() - 1 {
                log::warn!("inject=silent-ap: core {index} gets no STARTUP IPI");
                continue;
            }
            let start = if late_ap && index == 1 {
                log::warn!("inject=late-ap: core {index} gets its STARTUP IPI late");
                smp::Start::Withhold
            } else {
                stray.take().map_or(smp::Start::Normal, smp::Start::AlsoStray)
            };
            // SAFETY: BSP only, each AP once, one at a time, trampoline page checked above.
            let answered = unsafe { smp::start_ap(&mut apic, index, core.apic_id, start) };
            if late_ap && index == 1 {
                stray = Some(core.apic_id);
            }
            if !answered {
                log::error!(
                    "core {index} (APIC id {}) did not answer its STARTUP IPI",
                    core.apic_id
                );
            }
        }
        // Every withdrawn AP back to waiting for a SIPI (one that started late parks in the
        // trampoline with no IDT); none gets another.
        let withdrawn = smp::withdrawn();
        for (index, core) in
            list.cores().iter().enumerate().filter(|(i, _)| withdrawn >> i & 1 != 0)
        {
            log::warn!("core {index} (APIC id {}): INIT again, it stays out", core.apic_id);
            // SAFETY: it never took its start-up block, so nothing of ours runs there.
            unsafe { apic.send_init(core.apic_id) };
        }
    }

    /// Waits (bounded) for every started core's final state, prints one record per core.
    /// Returns whether every core is up with its virtualization on (`vmx=on`, whichever
    /// `backend`, `vmx` or `svm`).
    fn collect(list: &cores::CoreList, on: &str, backend: &str) -> bool {
        let deadline = arch::tsc::deadline_us(2_000_000);
        loop {
            let pending =
                (0..list.len()).any(|i| smp::mailbox(i).read().state == smp::state::ALIVE);
            if !pending || arch::rdtsc() >= deadline {
                break;
            }
            arch::pause();
        }
        let mut all_up = true;
        for (i, core) in list.cores().iter().enumerate() {
            let s = smp::mailbox(i).read();
            let state = match s.state {
                smp::state::UP => core_state::UP,
                smp::state::EMPTY => core_state::SILENT,
                _ => core_state::FAILED,
            };
            let reason = ReasonOf(&s);
            all_up &= s.state == smp::state::UP && s.vmx_on;
            record!(
                kind::CORE,
                "index={i} apic={} state={state} vmx={} backend={backend} reason={}",
                core.apic_id,
                if s.vmx_on { "on" } else { "off" },
                Quoted(reason)
            );
        }
        let up = (0..list.len()).filter(|&i| smp::mailbox(i).read().vmx_on).count();
        log::info!("{up}/{} cores {on}", list.len());
        all_up
    }

    /// The `reason` field of a core record.
    struct ReasonOf<'a>(&'a smp::CoreStatus);

    impl core::fmt::Display for ReasonOf<'_> {
        fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
            match self.0.state {
                smp::state::UP => Ok(()),
                smp::state::EMPTY => f.write_str("no answer to INIT-SIPI-SIPI"),
                smp::state::ALIVE => f.write_str("answered but never finished bring-up"),
                _ => write!(f, "{}", self.0.reason()),
            }
        }
    }
}
