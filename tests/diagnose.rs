//! `diagnose_fault`: what a page fault in the vmalloc region hit, in the words an oops
//! prints, with the area's label and the line that allocated it.

mod common;

use common::interrupting::Interrupting;
use std::sync::OnceLock;
use vmalloc::vmalloc::{FaultSite, Prot, VmOptions};
use vmalloc_sim::scenarios::manager_over as manager;
use vmalloc_sim::{Access, Fault, SimConfig, SimFrames, SimMachine};
use x86_64::structures::idt::PageFaultErrorCode;
use x86_64::{PhysAddr, VirtAddr};

fn machine() -> SimMachine {
    SimMachine::new(SimConfig::new(64 << 20).with_scatter_seed(2))
}

/// The page fault the simulated MMU raises for `access` at `addr`.
fn fault(machine: &SimMachine, addr: VirtAddr, access: Access) -> (VirtAddr, PageFaultErrorCode) {
    match machine.translate(addr, access) {
        Err(Fault::Page(fault)) => (fault.addr, fault.code),
        other => panic!("expected a page fault at {addr:#x}, got {other:?}"),
    }
}

#[test]
fn a_run_off_the_end_names_the_area_its_size_its_caller_and_the_guard_page() {
    let machine = machine();
    let frames = machine.frames();
    // SAFETY: the machine's page tables serve this manager alone, and its flush reaches every CPU that runs.
    let vm = unsafe { manager(&machine, &frames) };
    let ring = VmOptions {
        tag: "net_rx_ring",
        ..VmOptions::default()
    };
    let (ptr, line) = (vm.vmalloc_with(16 << 10, &ring).unwrap(), line!());
    let start = VirtAddr::from_ptr(ptr.as_ptr());
    let (addr, code) = fault(&machine, start + (16u64 << 10) + 8, Access::WRITE);
    let diagnosis = vm.diagnose_fault(addr, code);
    assert!(matches!(
        diagnosis.site,
        FaultSite::Guard { past_end: 8, area } if area.start == start
    ));
    assert_eq!(
        diagnosis.to_string(),
        format!(
            "write past the end of 'net_rx_ring' (16 KiB vmalloc at {:#x}, allocated at \
             tests/diagnose.rs:{line}) at {:#x}, 8 bytes past it: guard page",
            start.as_u64(),
            addr.as_u64()
        )
    );
}

#[test]
fn a_freed_area_waiting_for_the_purge_is_a_use_after_free_and_after_it_is_gone() {
    let machine = machine();
    let frames = machine.frames();
    // SAFETY: the machine's page tables serve this manager alone, and its flush reaches every CPU that runs.
    let vm = unsafe { manager(&machine, &frames) };
    let options = VmOptions {
        tag: "session",
        ..VmOptions::default()
    };
    let ptr = vm.vmalloc_with(3 * 4096, &options).unwrap();
    let start = VirtAddr::from_ptr(ptr.as_ptr());
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    unsafe { vm.vfree(ptr.as_ptr()) }.unwrap();
    // An untouched page: no stale translation, the walk finds the detached entry.
    let (addr, code) = fault(&machine, start + 4100u64, Access::READ);
    let diagnosis = vm.diagnose_fault(addr, code);
    assert!(matches!(
        diagnosis.site,
        FaultSite::Freed { offset: 4100, .. }
    ));
    let text = diagnosis.to_string();
    assert!(
        text.starts_with("use after free: read of 'session' (12 KiB vmalloc")
            && text.contains("tests/diagnose.rs:")
            && text.ends_with("freed (its range not reused yet)"),
        "{text}"
    );
    vm.purge();
    assert_eq!(vm.diagnose_fault(addr, code).site, FaultSite::Unmapped);
}

#[test]
fn a_write_to_a_read_only_area_broke_its_protection() {
    let machine = machine();
    let frames = machine.frames();
    // SAFETY: the machine's page tables serve this manager alone, and its flush reaches every CPU that runs.
    let vm = unsafe { manager(&machine, &frames) };
    let options = VmOptions {
        prot: Prot::READ,
        tag: "firmware_table",
        ..VmOptions::default()
    };
    let ptr = vm.vmalloc_with(2 * 4096, &options).unwrap();
    let start = VirtAddr::from_ptr(ptr.as_ptr());
    let (addr, code) = fault(&machine, start + 4096u64, Access::WRITE);
    let diagnosis = vm.diagnose_fault(addr, code);
    assert!(matches!(
        diagnosis.site,
        FaultSite::Area {
            offset: 4096,
            broke_protection: true,
            ..
        }
    ));
    let text = diagnosis.to_string();
    assert!(
        text.starts_with("write to read-only memory of 'firmware_table' (8 KiB vmalloc")
            && text.ends_with("page 1 of 2"),
        "{text}"
    );
    // A read of the same page would not have faulted: no protection broken.
    let read = vm.diagnose_fault(addr, PageFaultErrorCode::empty());
    assert!(matches!(
        read.site,
        FaultSite::Area {
            broke_protection: false,
            ..
        }
    ));
}

#[test]
fn ioremap_areas_and_addresses_outside_any_area_are_told_apart() {
    let machine = machine();
    let frames = machine.frames();
    // SAFETY: the machine's page tables serve this manager alone, and its flush reaches every CPU that runs.
    let vm = unsafe { manager(&machine, &frames) };
    // SAFETY: a page past the machine's RAM, which nothing uses.
    let mmio = unsafe {
        vm.ioremap(
            PhysAddr::new(0xfee0_0000),
            4096,
            vmalloc::vmalloc::CacheMode::Uncached,
        )
    }
    .unwrap();
    let at = VirtAddr::from_ptr(mmio.as_ptr());
    let text = vm
        .diagnose_fault(at, PageFaultErrorCode::empty())
        .to_string();
    assert!(
        text.contains("ioremap at") && text.contains("of 0xfee00000"),
        "{text}"
    );
    let never = vm.config().start + (1u64 << 40);
    assert_eq!(
        vm.diagnose_fault(never, PageFaultErrorCode::empty()).site,
        FaultSite::Unmapped
    );
    assert_eq!(
        vm.diagnose_fault(VirtAddr::new(0x1000), PageFaultErrorCode::empty())
            .site,
        FaultSite::Outside
    );
}

#[test]
fn a_fault_that_interrupted_the_manager_is_told_busy_instead_of_deadlocking() {
    // Leaked: the interrupt refers to the manager, which refers to the source.
    let machine: &'static SimMachine = Box::leak(Box::new(machine()));
    let frames: &'static SimFrames = Box::leak(Box::new(machine.frames()));
    let source = Interrupting::leak(frames);
    // SAFETY: the machine's page tables serve this manager alone, and its flush reaches every CPU that runs.
    let vm: &'static _ = Box::leak(Box::new(unsafe { manager(machine, source) }));
    // Areas of more than 16 pages are made under the manager's lock; a small one is
    // a per-CPU block's, whose diagnosis takes no lock.
    const PAGES: u64 = 20;
    let live = vm.vmalloc(PAGES as usize * 4096).unwrap();
    let guard = VirtAddr::from_ptr(live.as_ptr()) + PAGES * 4096;
    let small = vm.vmalloc(4096).unwrap();
    let small_guard = VirtAddr::from_ptr(small.as_ptr()) + 4096u64;
    let seen: &'static OnceLock<(FaultSite, FaultSite)> = Box::leak(Box::default());
    source.on_interrupt(move || {
        let _ = seen.set((
            vm.diagnose_fault(guard, PageFaultErrorCode::empty()).site,
            vm.diagnose_fault(small_guard, PageFaultErrorCode::empty())
                .site,
        ));
    });
    source.arm();
    vm.vmalloc(PAGES as usize * 4096).unwrap();
    let (large, small) = seen.get().expect("the interrupt came under the lock");
    assert_eq!(large, &FaultSite::Busy, "asked under the lock");
    assert!(
        matches!(small, FaultSite::Guard { past_end: 0, .. }),
        "a small area's guard page is told apart under the lock: {small:?}"
    );
    let text = vm
        .diagnose_fault(guard, PageFaultErrorCode::empty())
        .to_string();
    assert!(text.ends_with("guard page"), "outside the lock: {text}");
}
