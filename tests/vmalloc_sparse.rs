//! Sparse areas (`reserve_sparse`, `map_page`, `unmap_page`): pages mapped one at a
//! time anywhere in the area, unmapped with every CPU's TLB flushed before the call
//! returns, each keeping its frame and page tables for its next mapping, and every
//! frame back when the area or the manager goes.

use vmalloc::vmalloc::{FaultSite, VmFlags, VmOptions, Vmalloc, VmallocConfig};
use vmalloc::{Error, PAGE_SIZE};
use vmalloc_sim::scenarios::{self, manager_over as manager, manager_with};
use vmalloc_sim::{Access, DEADLOCK_LIMIT, Fault, SimConfig, SimMachine, watchdog};
use x86_64::VirtAddr;
use x86_64::structures::idt::PageFaultErrorCode;

const PAGE: usize = PAGE_SIZE as usize;

fn machine() -> SimMachine {
    SimMachine::new(SimConfig::new(64 << 20).with_scatter_seed(3))
}

fn options() -> VmOptions {
    VmOptions {
        tag: "sparse",
        ..VmOptions::default()
    }
}

fn page(area: std::ptr::NonNull<u8>, index: usize) -> VirtAddr {
    VirtAddr::from_ptr(area.as_ptr()) + (index * PAGE) as u64
}

fn faults(machine: &SimMachine, addr: VirtAddr) -> bool {
    matches!(machine.translate(addr, Access::READ), Err(Fault::Page(_)))
}

#[test]
fn a_page_mapped_alone_reads_and_writes_and_its_neighbours_fault() {
    let machine = machine();
    let frames = machine.frames();
    // SAFETY: the machine's page tables serve this manager alone, and its flush reaches every CPU that runs.
    let vm = unsafe { manager(&machine, &frames) };
    let area = vm.reserve_sparse(5 * PAGE, &options()).unwrap();
    // SAFETY: the test's own area: nothing relies on its pages staying unmapped.
    unsafe { vm.map_page(area.as_ptr(), 3) }.unwrap();
    // SAFETY: bytes the test owns: no live Rust value lives there.
    unsafe { machine.write(page(area, 3) + 100u64, b"in page 3") }.unwrap();
    let mut back = [0; 9];
    machine.read(page(area, 3) + 100u64, &mut back).unwrap();
    assert_eq!(&back, b"in page 3");
    for index in [0, 1, 2, 4, 5] {
        assert!(
            faults(&machine, page(area, index)),
            "page {index} is mapped"
        );
    }
    let info = vm.find_vm_area(page(area, 3)).unwrap();
    assert_eq!((info.pages, info.tag), (1, "sparse"));
    assert_eq!(vm.stats().data_frames, 1);
}

#[test]
fn an_unmapped_page_faults_at_once_even_where_its_translation_was_cached() {
    let machine = machine();
    let frames = machine.frames();
    // SAFETY: the machine's page tables serve this manager alone, and its flush reaches every CPU that runs.
    let vm = unsafe { manager(&machine, &frames) };
    let free = frames.stats().free;
    let area = vm.reserve_sparse(3 * PAGE, &options()).unwrap();
    // SAFETY: the test's own area: nothing relies on its pages staying unmapped.
    unsafe { vm.map_page(area.as_ptr(), 1) }.unwrap();
    // The read caches the translation in this CPU's TLB.
    // SAFETY: bytes the test owns: no live Rust value lives there.
    unsafe { machine.write(page(area, 1), b"cached") }.unwrap();
    assert!(machine.cpu(0).cached(page(area, 1)).is_some());
    // SAFETY: nothing uses the page after this.
    unsafe { vm.unmap_page(area.as_ptr(), 1) }.unwrap();
    assert!(
        faults(&machine, page(area, 1)),
        "the stale translation survived"
    );
    let site = vm
        .diagnose_fault(page(area, 1), PageFaultErrorCode::empty())
        .site;
    assert!(matches!(
        site,
        FaultSite::Area {
            offset: 4096,
            broke_protection: false,
            ..
        }
    ));
    // The page is not mapped any more; its frame and page tables stay for the area.
    assert_eq!(vm.stats().data_frames, 0);
    // SAFETY: the test's own area: nothing relies on its pages staying unmapped.
    unsafe { vm.map_page(area.as_ptr(), 1) }.unwrap();
    // SAFETY: as above.
    unsafe {
        vm.unmap_page(area.as_ptr(), 1).unwrap();
        vm.vfree(area.as_ptr()).unwrap();
    }
    vm.purge();
    assert_eq!(frames.stats().free, free);
}

#[test]
fn bad_calls_are_refused_and_change_nothing() {
    let machine = machine();
    let frames = machine.frames();
    // SAFETY: the machine's page tables serve this manager alone, and its flush reaches every CPU that runs.
    let vm = unsafe { manager(&machine, &frames) };
    let area = vm.reserve_sparse(2 * PAGE, &options()).unwrap();
    let reserved = vm.reserve(2 * PAGE, &options()).unwrap();
    let plain = vm.vmalloc(PAGE).unwrap();
    // SAFETY: the test's own area: nothing relies on its pages staying unmapped.
    unsafe { vm.map_page(area.as_ptr(), 0) }.unwrap();
    // SAFETY: the test's own area: nothing relies on its pages staying unmapped.
    assert_eq!(
        unsafe { vm.map_page(area.as_ptr(), 0) },
        Err(Error::AlreadyMapped)
    );
    // SAFETY: the test's own area: nothing relies on its pages staying unmapped.
    assert_eq!(
        unsafe { vm.map_page(area.as_ptr(), 2) },
        Err(Error::SizeTooLarge)
    );
    // SAFETY: the test's own area: nothing relies on its pages staying unmapped.
    assert_eq!(
        unsafe { vm.map_page(reserved.as_ptr(), 0) },
        Err(Error::WrongKind)
    );
    // SAFETY: the test's own area: nothing relies on its pages staying unmapped.
    assert_eq!(
        unsafe { vm.map_page(plain.as_ptr(), 0) },
        Err(Error::WrongKind)
    );
    assert_eq!(
        // SAFETY: the test's own area: nothing relies on its pages staying unmapped.
        unsafe { vm.map_page(page(area, 1).as_mut_ptr(), 0) },
        Err(Error::InteriorPointer)
    );
    // SAFETY: the test's own area: nothing relies on its pages staying unmapped.
    assert_eq!(
        unsafe { vm.populate(area.as_ptr(), PAGE) },
        Err(Error::WrongKind)
    );
    // SAFETY: every call below is refused, or unmaps a page nothing uses.
    unsafe {
        assert_eq!(vm.unmap_page(area.as_ptr(), 1), Err(Error::NotMapped));
        assert_eq!(vm.unmap_page(area.as_ptr(), 9), Err(Error::SizeTooLarge));
        assert_eq!(vm.unmap_page(plain.as_ptr(), 0), Err(Error::WrongKind));
        assert_eq!(
            vm.unmap_page(std::ptr::null_mut(), 0),
            Err(Error::NullPointer)
        );
    }
    assert_eq!(vm.stats().data_frames, 2);
    let mut back = [0; 4];
    // SAFETY: bytes the test owns: no live Rust value lives there.
    unsafe { machine.write(page(area, 0), b"kept") }.unwrap();
    machine.read(page(area, 0), &mut back).unwrap();
    assert_eq!(&back, b"kept");
}

#[test]
fn freeing_the_area_or_dropping_the_manager_gives_every_frame_back() {
    let machine = machine();
    let frames = machine.frames();
    let free = frames.stats().free;
    {
        // SAFETY: the machine's page tables serve this manager alone, and its flush reaches every CPU that runs.
        let vm = unsafe { manager(&machine, &frames) };
        let area = vm.reserve_sparse(64 * PAGE, &options()).unwrap();
        for index in [0, 7, 8, 33, 63] {
            // SAFETY: the test's own area: nothing relies on its pages staying unmapped.
            unsafe { vm.map_page(area.as_ptr(), index) }.unwrap();
        }
        // SAFETY: nothing uses the area after this.
        unsafe { vm.vfree(area.as_ptr()) }.unwrap();
        assert!(faults(&machine, page(area, 7)));
        vm.purge();
        assert_eq!(vm.stats().data_frames, 0);
        assert!(vm.find_vm_area(page(area, 7)).is_none());
        // The range is free again: a plain area may take it.
        let again = vm.vmalloc(64 * PAGE).unwrap();
        // SAFETY: bytes the test owns: no live Rust value lives there.
        unsafe { machine.write(VirtAddr::from_ptr(again.as_ptr()), b"x") }.unwrap();
        let kept = vm.reserve_sparse(8 * PAGE, &options()).unwrap();
        // SAFETY: the test's own area: nothing relies on its pages staying unmapped.
        unsafe { vm.map_page(kept.as_ptr(), 5) }.unwrap();
    }
    assert_eq!(frames.stats().free, free, "the manager's drop kept frames");
}

#[test]
fn unmapping_a_page_drops_it_from_every_cpus_tlb() {
    watchdog(
        "unmapping_a_page_drops_it_from_every_cpus_tlb",
        DEADLOCK_LIMIT,
        || {
            let (machine, frames, tlb) =
                scenarios::smp_machine(SimConfig::new(64 << 20).with_cpus(2));
            // SAFETY: the machine's page tables serve this manager alone, and its flush reaches every CPU that runs.
            let vm: Vmalloc<_, _, _> =
                unsafe { manager_with(machine, frames, tlb, VmallocConfig::default()) };
            let area = vm.reserve_sparse(3 * PAGE, &options()).unwrap();
            // SAFETY: the test's own area: nothing relies on its pages staying unmapped.
            unsafe { vm.map_page(area.as_ptr(), 1) }.unwrap();
            // SAFETY: bytes the test owns: no live Rust value lives there.
            unsafe { machine.write(page(area, 1), b"SHARED!!") }.unwrap();
            // CPU 1 reads (caching the translation), CPU 0 unmaps, CPU 1 reads again.
            let (seen, unmapped) = machine.read_again_after(1, page(area, 1), || {
                // SAFETY: nothing uses the page after this but the probe.
                unsafe { vm.unmap_page(area.as_ptr(), 1) }
            });
            unmapped.unwrap();
            assert_eq!(seen, None, "CPU 1 still reached the unmapped page");
        },
    );
}

#[test]
fn a_page_mapped_again_gets_its_own_frame_back_and_takes_nothing_from_the_allocator() {
    let machine = machine();
    let frames = machine.frames();
    // SAFETY: the machine's page tables serve this manager alone, and its flush reaches every CPU that runs.
    let vm = unsafe { manager(&machine, &frames) };
    let area = vm.reserve_sparse(8 * PAGE, &options()).unwrap();
    // SAFETY: the test's own area: nothing relies on its pages staying unmapped.
    unsafe { vm.map_page(area.as_ptr(), 5) }.unwrap();
    // SAFETY: bytes the test owns: no live Rust value lives there.
    unsafe { machine.write(page(area, 5), b"object 1") }.unwrap();
    let frame = vm.vmalloc_to_frame(page(area, 5)).unwrap();
    let (free, tables) = (frames.stats().free, vm.stats().page_table_frames);
    for round in 0..3 {
        // SAFETY: nothing uses the page after this.
        unsafe { vm.unmap_page(area.as_ptr(), 5) }.unwrap();
        assert!(faults(&machine, page(area, 5)));
        // SAFETY: refused: the page is not mapped.
        assert_eq!(
            unsafe { vm.unmap_page(area.as_ptr(), 5) },
            Err(Error::NotMapped)
        );
        assert_eq!(vm.stats().data_frames, 0);
        assert_eq!(
            (frames.stats().free, vm.stats().page_table_frames),
            (free, tables),
            "round {round}: a frame or a page table went back"
        );
        // SAFETY: the test's own area: nothing relies on its pages staying unmapped.
        unsafe { vm.map_page(area.as_ptr(), 5) }.unwrap();
        assert_eq!(vm.vmalloc_to_frame(page(area, 5)), Ok(frame));
        assert_eq!(
            (frames.stats().free, vm.stats().page_table_frames),
            (free, tables),
            "round {round}: a frame or a page table was taken"
        );
        assert_eq!(vm.stats().data_frames, 1);
    }
    // Not zeroed: the area was reserved without `ZERO`.
    let mut back = [0; 8];
    machine.read(page(area, 5), &mut back).unwrap();
    assert_eq!(&back, b"object 1");
    // Another page takes a frame of its own.
    // SAFETY: the test's own area: nothing relies on its pages staying unmapped.
    unsafe { vm.map_page(area.as_ptr(), 2) }.unwrap();
    assert_eq!(frames.stats().free, free - 1);
    // SAFETY: nothing uses the area after this.
    unsafe { vm.vfree(area.as_ptr()) }.unwrap();
    vm.purge();
    assert_eq!(vm.stats().data_frames, 0);
}

#[test]
fn a_zeroing_area_zeroes_a_page_mapped_again_and_gives_kept_frames_back_when_freed() {
    let machine = machine();
    let frames = machine.frames();
    let free = frames.stats().free;
    {
        // SAFETY: the machine's page tables serve this manager alone, and its flush reaches every CPU that runs.
        let vm = unsafe { manager(&machine, &frames) };
        let zeroing = VmOptions {
            flags: VmFlags::ZERO,
            ..options()
        };
        let area = vm.reserve_sparse(4 * PAGE, &zeroing).unwrap();
        let kept = vm.reserve_sparse(4 * PAGE, &options()).unwrap();
        for index in 0..4 {
            // SAFETY: the test's own area: nothing relies on its pages staying unmapped.
            unsafe { vm.map_page(area.as_ptr(), index) }.unwrap();
            // SAFETY: the test's own area: nothing relies on its pages staying unmapped.
            unsafe { vm.map_page(kept.as_ptr(), index) }.unwrap();
        }
        // SAFETY: bytes the test owns: no live Rust value lives there.
        unsafe { machine.write(page(area, 1) + 8u64, b"stale") }.unwrap();
        // SAFETY: nothing uses these pages after this.
        unsafe {
            for index in 0..3 {
                vm.unmap_page(area.as_ptr(), index).unwrap();
                vm.unmap_page(kept.as_ptr(), index).unwrap();
            }
        }
        // SAFETY: the test's own area: nothing relies on its pages staying unmapped.
        unsafe { vm.map_page(area.as_ptr(), 1) }.unwrap();
        let mut back = [0xff; 16];
        machine.read(page(area, 1), &mut back).unwrap();
        assert_eq!(back, [0; 16], "the kept frame was not zeroed");
        // Freeing gives back the mapped frames and the kept ones alike, through the
        // area and through the manager's drop.
        // SAFETY: nothing uses the area after this.
        unsafe { vm.vfree(area.as_ptr()) }.unwrap();
        vm.purge();
        assert_eq!(vm.stats().data_frames, 1);
    }
    assert_eq!(frames.stats().free, free, "a kept frame was lost");
}

/// A vast sparse area (16 TiB) with a few pages mapped, far apart, one of them
/// unmapped again (its frame kept): freeing it gives back exactly those frames, and
/// costs what its tables hold, not what it spans. Freeing walked all 2^32 pages one
/// by one (minutes; past the watchdog's limit).
#[test]
fn a_vast_sparse_area_is_freed_by_what_it_maps() {
    watchdog("a vast sparse area is freed", DEADLOCK_LIMIT, || {
        let machine = machine();
        let frames = machine.frames();
        let config = VmallocConfig {
            cpu_caches: false,
            ..VmallocConfig::default()
        };
        // SAFETY: the machine's page tables serve this manager alone.
        let vm = unsafe { manager_with(&machine, &frames, &machine, config) };
        vm.purge();
        let before = frames.stats().free;
        let area = vm.reserve_sparse(1 << 44, &options()).unwrap();
        let pages = (1usize << 44) / PAGE_SIZE as usize;
        for index in [0, 1, pages / 3, pages / 2 + 7, pages - 1] {
            // SAFETY: the test's own area: nothing relies on its pages staying unmapped.
            unsafe { vm.map_page(area.as_ptr(), index) }.unwrap();
        }
        // SAFETY: nothing uses the page afterwards.
        unsafe { vm.unmap_page(area.as_ptr(), pages / 3) }.unwrap();
        assert!(!faults(&machine, page(area, pages - 1)));
        // SAFETY: nothing uses the area afterwards.
        unsafe { vm.vfree(area.as_ptr()) }.unwrap();
        vm.purge();
        assert!(faults(&machine, page(area, pages - 1)));
        assert_eq!(vm.stats().data_frames, 0);
        assert_eq!(frames.stats().free, before, "every frame back, tables too");
    });
}
