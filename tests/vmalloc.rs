//! The vmalloc manager on the simulated machine: every public call, its errors, its
//! rollback, and what the MMU and TLB see.

use core::ptr::NonNull;
use vmalloc::frame::FaultInjector;
use vmalloc::tlb::CountingFlush;
use vmalloc::vmalloc::*;
use vmalloc::{Error, FrameSource};
use vmalloc_sim::{Access, DEADLOCK_LIMIT, SimConfig, SimFrames, SimMachine, SimPhys, watchdog};
use x86_64::structures::idt::PageFaultErrorCode;
use x86_64::structures::paging::PageTableFlags;
use x86_64::structures::paging::PhysFrame;
use x86_64::{PhysAddr, VirtAddr};

type SimVmalloc<'m, F> = Vmalloc<F, SimPhys<'m>, &'m SimMachine>;

fn machine() -> SimMachine {
    SimMachine::new(SimConfig::new(64 << 20).with_scatter_seed(7))
}

fn config(eager: bool) -> VmallocConfig {
    VmallocConfig {
        eager,
        ..VmallocConfig::default()
    }
}

/// Without the per-CPU blocks: for the tree's own mechanics (the purge list, range
/// flushes per area, bookkeeping nodes, growing in place) on areas small enough
/// that the blocks would serve them. `tests/blocks.rs` checks the same on blocks.
fn tree_config(eager: bool) -> VmallocConfig {
    VmallocConfig {
        cpu_caches: false,
        ..config(eager)
    }
}

fn manager<'m, F: FrameSource + Clone>(
    machine: &'m SimMachine,
    frames: F,
    config: VmallocConfig,
) -> SimVmalloc<'m, F> {
    // SAFETY: the machine's root table is used by nothing else in this test.
    unsafe { Vmalloc::new(config, machine.root(), machine.phys(), frames, machine) }.unwrap()
}

fn addr(ptr: NonNull<u8>) -> VirtAddr {
    VirtAddr::from_ptr(ptr.as_ptr())
}

fn free_frames(frames: &SimFrames) -> u64 {
    frames.stats().free
}

/// Top-level tables of the default region: one per 512 GiB of its 32 TiB.
const TOP_LEVEL_TABLES: u64 = VMALLOC_SIZE >> 39;

/// Every frame is free, data, page table, waiting for the purge, bookkeeping, or
/// held by the test (`held`).
fn assert_frames_conserved<F: FrameSource + Clone>(
    vm: &SimVmalloc<'_, F>,
    frames: &SimFrames,
    held: u64,
) {
    let s = vm.stats();
    let accounted = frames.stats().free
        + s.data_frames
        + s.page_table_frames
        + s.pending_purge_frames
        + s.cached_frames
        + s.bookkeeping_frames
        + held;
    assert_eq!(accounted, frames.stats().total, "{s:?}");
}

/// Takes frames from `frames` until only `left` are free; the caller frees them.
fn hold_all_but(frames: &SimFrames, left: u64) -> Vec<PhysFrame> {
    let mut held = vec![PhysFrame::containing_address(PhysAddr::zero()); 4096];
    let mut all = Vec::new();
    while free_frames(frames) > left {
        let want = ((free_frames(frames) - left) as usize).min(held.len());
        let got = frames.alloc_frames(&mut held[..want]);
        all.extend_from_slice(&held[..got]);
    }
    all
}

/// Entry `index` of the page table in `table`.
fn entry(machine: &SimMachine, table: PhysFrame, index: usize) -> u64 {
    let mut raw = [0; 8];
    machine.read_phys(table.start_address() + index as u64 * 8, &mut raw);
    u64::from_le_bytes(raw)
}

fn set_entry(machine: &SimMachine, table: PhysFrame, index: usize, value: u64) {
    machine.write_phys(
        table.start_address() + index as u64 * 8,
        &value.to_le_bytes(),
    );
}

fn is_write_protection_fault(machine: &SimMachine, at: VirtAddr) -> bool {
    let fault = machine.write(at, &[1]).unwrap_err().page_fault().unwrap();
    fault.addr == at
        && fault.code.contains(
            PageFaultErrorCode::PROTECTION_VIOLATION | PageFaultErrorCode::CAUSED_BY_WRITE,
        )
}

#[test]
fn data_written_through_the_mmu_reads_back_from_scattered_frames() {
    let machine = machine();
    let frames = machine.frames();
    let vm = manager(&machine, &frames, config(false));
    let size = 300 * 4096 + 123;
    let ptr = vm.vmalloc(size).unwrap();
    let data: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
    machine.write(addr(ptr), &data).unwrap();
    let mut back = vec![0; size];
    machine.read(addr(ptr), &mut back).unwrap();
    assert_eq!(back, data);

    let backing: Vec<PhysFrame> = (0..301)
        .map(|i| vm.vmalloc_to_frame(addr(ptr) + i * 4096).unwrap())
        .collect();
    let consecutive = backing
        .windows(2)
        .filter(|w| w[1].start_address() == w[0].start_address() + 4096u64)
        .count();
    assert!(
        consecutive < 30,
        "frames should be scattered, {consecutive} of 300 are consecutive"
    );
    // Each page's bytes sit in the frame vmalloc_to_frame names.
    let mut page = vec![0; 4096];
    machine.read_phys(backing[17].start_address(), &mut page);
    assert_eq!(page, data[17 * 4096..18 * 4096]);
}

#[test]
fn vzalloc_zeroes_frames_that_held_data() {
    // Without scatter the frames a purge gives back are the first handed out again.
    let machine = SimMachine::new(SimConfig::new(64 << 20));
    let frames = machine.frames();
    let vm = manager(&machine, &frames, config(true));
    let dirty = vm.vmalloc(64 * 4096).unwrap();
    machine.write(addr(dirty), &vec![0xa5; 64 * 4096]).unwrap();
    let dirtied: Vec<PhysFrame> = (0..64)
        .map(|i| vm.vmalloc_to_frame(addr(dirty) + i * 4096).unwrap())
        .collect();
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    unsafe { vm.vfree(dirty.as_ptr()) }.unwrap();
    let zeroed = vm.vzalloc(64 * 4096).unwrap();
    let reused = (0..64)
        .filter(|&i| dirtied.contains(&vm.vmalloc_to_frame(addr(zeroed) + i * 4096).unwrap()))
        .count();
    assert!(reused > 0, "the dirtied frames came back");
    let mut back = vec![1; 64 * 4096];
    machine.read(addr(zeroed), &mut back).unwrap();
    assert!(back.iter().all(|&b| b == 0));
}

#[test]
fn the_guard_page_faults_and_the_default_protection_is_rw_nx_global() {
    let machine = machine();
    let frames = machine.frames();
    let vm = manager(&machine, &frames, config(false));
    let ptr = vm.vmalloc(2 * 4096).unwrap();
    let guard = addr(ptr) + 2 * 4096u64;
    let fault = machine
        .read(guard, &mut [0])
        .unwrap_err()
        .page_fault()
        .unwrap();
    assert_eq!(fault.addr, guard);
    let t = machine.translate(addr(ptr), Access::WRITE).unwrap();
    assert!(
        t.flags.contains(
            PageTableFlags::NO_EXECUTE | PageTableFlags::GLOBAL | PageTableFlags::WRITABLE
        )
    );
    assert!(!t.flags.contains(PageTableFlags::USER_ACCESSIBLE));
    assert!(machine.fetch(addr(ptr), &mut [0]).is_err());
    // The next area starts after the guard page.
    let next = vm.vmalloc(4096).unwrap();
    assert_eq!(addr(next), guard + 4096u64);
    let unguarded = VmOptions {
        flags: VmFlags::NO_GUARD,
        ..VmOptions::default()
    };
    let a = vm.vmalloc_with(4096, &unguarded).unwrap();
    let b = vm.vmalloc_with(4096, &unguarded).unwrap();
    assert_eq!(addr(b), addr(a) + 4096u64);
}

#[test]
fn read_only_and_executable_areas_get_exactly_their_rights() {
    let machine = machine();
    let frames = machine.frames();
    let vm = manager(&machine, &frames, config(false));
    let with = |prot| VmOptions {
        prot,
        ..VmOptions::default()
    };
    let read_only = addr(vm.vmalloc_with(4096, &with(Prot::READ)).unwrap());
    machine.read(read_only, &mut [0]).unwrap();
    assert!(is_write_protection_fault(&machine, read_only));
    assert!(machine.fetch(read_only, &mut [0]).is_err());

    let code = addr(
        vm.vmalloc_with(4096, &with(Prot::READ | Prot::EXEC))
            .unwrap(),
    );
    machine.fetch(code, &mut [0]).unwrap();
    assert!(is_write_protection_fault(&machine, code));

    let data = addr(vm.vmalloc(4096).unwrap());
    machine.write(data, &[1]).unwrap();
    assert!(machine.fetch(data, &mut [0]).is_err());
}

#[test]
fn bad_input_gets_a_specific_error_and_changes_nothing() {
    let machine = machine();
    let frames = machine.frames();
    let vm = manager(&machine, &frames, config(false));
    let live = vm.vmalloc(3 * 4096).unwrap();
    let window = vm.reserve(64 << 10, &VmOptions::default()).unwrap();
    // SAFETY: a frame the test owns, never freed while mapped.
    let mapped = unsafe { vm.vmap(&[frames.alloc_frame().unwrap()], Prot::KERNEL_RW) }.unwrap();
    let before = (vm.stats(), free_frames(&frames));

    assert_eq!(vm.vmalloc(0), Err(Error::ZeroSize));
    assert_eq!(vm.vmalloc(usize::MAX), Err(Error::SizeTooLarge));
    assert_eq!(vm.vmalloc(VMALLOC_SIZE as usize), Err(Error::SizeTooLarge));
    for align in [3 * 4096, 1 << 46, 1 << 63] {
        let odd = VmOptions {
            align,
            ..VmOptions::default()
        };
        assert_eq!(
            vm.vmalloc_with(4096, &odd),
            Err(Error::BadAlignment),
            "{align:#x}"
        );
        assert_eq!(
            vm.reserve(4096, &odd),
            Err(Error::BadAlignment),
            "{align:#x}"
        );
    }
    let wx = VmOptions {
        prot: Prot::WRITE | Prot::EXEC,
        ..VmOptions::default()
    };
    assert_eq!(vm.vmalloc_with(4096, &wx), Err(Error::WriteExecute));
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    assert_eq!(
        unsafe { vm.vfree(core::ptr::null_mut()) },
        Err(Error::NullPointer)
    );
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    assert_eq!(
        unsafe { vm.vfree(0x1000 as *mut u8) },
        Err(Error::NotInRegion)
    );
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    assert_eq!(
        unsafe { vm.vfree(0x8000_0000_0000 as *mut u8) },
        Err(Error::NotInRegion)
    );
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    assert_eq!(
        unsafe { vm.vfree(live.as_ptr().wrapping_add(4096)) },
        Err(Error::InteriorPointer)
    );
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    assert_eq!(
        unsafe { vm.vfree(live.as_ptr().wrapping_add(1)) },
        Err(Error::InteriorPointer)
    );
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    assert_eq!(
        unsafe { vm.vfree(live.as_ptr().wrapping_add(3 * 4096)) },
        Err(Error::NotAllocated)
    );
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    assert_eq!(
        unsafe { vm.vfree((VMALLOC_START + (1 << 40)) as *mut u8) },
        Err(Error::NotAllocated)
    );
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    assert_eq!(unsafe { vm.vfree(mapped.as_ptr()) }, Err(Error::WrongKind));
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    assert_eq!(
        unsafe { vm.vunmap(live.as_ptr(), |_| ()) },
        Err(Error::WrongKind)
    );
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    assert_eq!(unsafe { vm.iounmap(live.as_ptr()) }, Err(Error::WrongKind));
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    assert_eq!(
        unsafe { vm.vrealloc(mapped.as_ptr(), 8192) },
        Err(Error::WrongKind)
    );
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    assert_eq!(
        unsafe { vm.vrealloc(live.as_ptr(), 0) },
        Err(Error::ZeroSize)
    );
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    assert_eq!(
        unsafe { vm.vrealloc(live.as_ptr(), usize::MAX) },
        Err(Error::SizeTooLarge)
    );
    assert_eq!(vm.populate(live.as_ptr(), 4096), Err(Error::WrongKind));
    for past_the_end in [usize::MAX, usize::MAX - 4095, (64 << 10) + 1] {
        assert_eq!(
            vm.populate(window.as_ptr(), past_the_end),
            Err(Error::SizeTooLarge)
        );
    }
    // SAFETY: the calls are refused before anything is mapped.
    unsafe {
        assert_eq!(
            vm.ioremap(PhysAddr::new(0xfee0_0000), 0, CacheMode::Uncached),
            Err(Error::ZeroSize)
        );
        assert_eq!(
            vm.ioremap(PhysAddr::new(0xfee0_0000), usize::MAX, CacheMode::Uncached),
            Err(Error::SizeTooLarge)
        );
        assert_eq!(vm.vmap(&[], Prot::KERNEL_RW), Err(Error::ZeroSize));
    }
    assert_eq!((vm.stats(), free_frames(&frames)), before);

    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    unsafe { vm.vfree(live.as_ptr()) }.unwrap();
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    assert_eq!(
        unsafe { vm.vfree(live.as_ptr()) },
        Err(Error::NotAllocated),
        "double free"
    );
}

#[test]
fn regions_that_cannot_be_managed_are_refused() {
    let machine = machine();
    let frames = machine.frames();
    let free = free_frames(&frames);
    let region = |start: u64, size: u64| VmallocConfig {
        start: VirtAddr::new_truncate(start),
        size,
        ..VmallocConfig::default()
    };
    let lower_top = 1u64 << 47;
    let cases = [
        (region(0, 1 << 30), Error::NullPointer),
        (region(lower_top - 0x4000, 0x4000), Error::NonCanonical),
        (region(lower_top - 0x4000, 0x8000), Error::NonCanonical),
        (region(0xffff_ffff_ffff_0000, 0x1_0000), Error::RangeWraps),
        (region(0x1000, 0), Error::ZeroSize),
        (region(0x1000, 0x1800), Error::Unaligned),
    ];
    for (config, error) in cases {
        // SAFETY: the machine's root table is used by nothing else in this test.
        let made =
            unsafe { Vmalloc::new(config, machine.root(), machine.phys(), &frames, &machine) };
        assert_eq!(made.err(), Some(error), "{config:?}");
        assert_eq!(free_frames(&frames), free, "a refused region kept frames");
    }
}

#[test]
fn a_region_just_below_the_top_of_the_lower_half_fills_up_cleanly() {
    let machine = machine();
    let frames = machine.frames();
    let start = (1u64 << 47) - 9 * 4096;
    let config = VmallocConfig {
        start: VirtAddr::new(start),
        size: 8 * 4096,
        ..config(false)
    };
    let vm = manager(&machine, &frames, config);
    let unguarded = VmOptions {
        flags: VmFlags::NO_GUARD,
        ..VmOptions::default()
    };
    let a = vm.vmalloc(4096).unwrap();
    let b = vm.vmalloc_with(8192, &unguarded).unwrap();
    let c = vm.vmalloc_with(4 * 4096, &unguarded).unwrap();
    assert_eq!(addr(c) + 4 * 4096u64, VirtAddr::new(start + 8 * 4096));
    assert_eq!(vm.vmalloc(4096), Err(Error::OutOfVirtualSpace));
    machine.write(addr(c) + 4 * 4096u64 - 1u64, &[1]).unwrap();
    for ptr in [a, b, c] {
        // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
        unsafe { vm.vfree(ptr.as_ptr()) }.unwrap();
    }
    vm.purge();
    assert_eq!(vm.stats().largest_free, 8 * 4096);
}

#[test]
fn lazy_vfree_holds_frames_until_the_batched_flush() {
    let machine = machine();
    let frames = machine.frames();
    let vm = manager(&machine, &frames, tree_config(false));
    // A live neighbour keeps the page tables, so only the data flush can make the
    // freed pages fault.
    let neighbour = vm.vmalloc(4096).unwrap();
    let baseline = free_frames(&frames);
    let tables_before = vm.stats().page_table_frames;
    let ptrs: Vec<_> = (0..10).map(|_| vm.vmalloc(8 * 4096).unwrap()).collect();
    let tables = vm.stats().page_table_frames - tables_before;
    for ptr in &ptrs {
        machine.write(addr(*ptr), b"live").unwrap();
        // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
        unsafe { vm.vfree(ptr.as_ptr()) }.unwrap();
    }
    let stats = vm.stats();
    assert_eq!(stats.pending_purge_pages, 80);
    assert_eq!(stats.pending_purge_frames, 80);
    assert_eq!(stats.areas, 1);
    // Not one frame is back while the TLB may still hold the old translations.
    assert_eq!(free_frames(&frames), baseline - 80 - tables);
    assert_frames_conserved(&vm, &frames, 0);
    // The stale translation still reads the old bytes, as on hardware.
    let mut stale = [0; 4];
    machine.read(addr(ptrs[0]), &mut stale).unwrap();
    assert_eq!(&stale, b"live");

    let flushes = machine.tlb_stats();
    vm.purge();
    let after = machine.tlb_stats();
    assert_eq!(
        after.full_flushes,
        flushes.full_flushes + 1,
        "80 pages are above the ceiling: one full flush"
    );
    assert!(
        machine.read(addr(ptrs[0]), &mut stale).is_err(),
        "freed memory faults after the purge"
    );
    let stats = vm.stats();
    assert_eq!(stats.pending_purge_pages, 0);
    assert_eq!(stats.page_table_frames, tables_before + tables);
    assert_eq!(free_frames(&frames), baseline, "every frame is back");
    assert_frames_conserved(&vm, &frames, 0);
    assert!(vm.vmalloc_to_frame(addr(ptrs[0])).is_err());

    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    unsafe { vm.vfree(neighbour.as_ptr()) }.unwrap();
    vm.purge();
    assert_eq!(
        vm.stats().page_table_frames,
        TOP_LEVEL_TABLES,
        "emptied tables are freed, the top-level ones stay"
    );
}

#[test]
fn eager_mode_flushes_each_free_by_range() {
    let machine = machine();
    let frames = machine.frames();
    let vm = manager(&machine, &frames, tree_config(true));
    let neighbour = vm.vmalloc(4096).unwrap();
    let baseline = free_frames(&frames);
    let ptr = vm.vmalloc(4 * 4096).unwrap();
    for page in 0..4u64 {
        machine.write(addr(ptr) + page * 4096, b"cached").unwrap();
    }
    let before = machine.tlb_stats();
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    unsafe { vm.vfree(ptr.as_ptr()) }.unwrap();
    let after = machine.tlb_stats();
    assert_eq!(after.full_flushes, before.full_flushes);
    assert_eq!(
        after.range_flushes,
        before.range_flushes + 1,
        "one range flush, and no table was freed to flush for"
    );
    for page in 0..4u64 {
        assert!(
            machine.read(addr(ptr) + page * 4096, &mut [0]).is_err(),
            "the cached translation of page {page} is gone"
        );
    }
    assert_eq!(free_frames(&frames), baseline);
    assert_frames_conserved(&vm, &frames, 0);
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    unsafe { vm.vfree(neighbour.as_ptr()) }.unwrap();
}

#[test]
fn the_purge_flushes_as_the_tlbs_own_ceiling_says() {
    // Ten 10-page areas: 100 pages, above the default ceiling of 33.
    let purge_flushes = |tlb: &CountingFlush| {
        let machine = machine();
        let frames = machine.frames();
        // SAFETY: the machine's root table is used by nothing else in this test.
        let vm =
            unsafe { Vmalloc::new(config(false), machine.root(), machine.phys(), &frames, tlb) }
                .unwrap();
        let areas: Vec<_> = (0..10).map(|_| vm.vmalloc(10 * 4096).unwrap()).collect();
        let keep = vm.vmalloc(4096).unwrap();
        // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
        areas
            .iter()
            .for_each(|p| unsafe { vm.vfree(p.as_ptr()) }.unwrap());
        let before = (tlb.range_calls(), tlb.full_calls());
        vm.purge();
        // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
        unsafe { vm.vfree(keep.as_ptr()) }.unwrap();
        (tlb.range_calls() - before.0, tlb.full_calls() - before.1)
    };
    assert_eq!(
        purge_flushes(&CountingFlush::new()),
        (0, 1),
        "one full flush"
    );
    assert_eq!(
        purge_flushes(&CountingFlush::with_ceiling(1000)),
        (10, 0),
        "a range flush per area under a ceiling of 1000 pages"
    );
}

#[test]
fn the_lazy_threshold_forces_a_purge() {
    let machine = machine();
    let frames = machine.frames();
    let vm = manager(
        &machine,
        &frames,
        VmallocConfig {
            lazy_threshold_pages: 16,
            ..tree_config(false)
        },
    );
    for _ in 0..3 {
        let ptr = vm.vmalloc(5 * 4096).unwrap();
        // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
        unsafe { vm.vfree(ptr.as_ptr()) }.unwrap();
    }
    assert_eq!((vm.stats().purges, vm.stats().pending_purge_pages), (0, 15));
    let ptr = vm.vmalloc(5 * 4096).unwrap();
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    unsafe { vm.vfree(ptr.as_ptr()) }.unwrap();
    assert_eq!(
        (vm.stats().purges, vm.stats().pending_purge_pages),
        (1, 0),
        "20 pages > 16"
    );
}

#[test]
fn running_out_of_frames_at_any_step_rolls_back() {
    let machine = machine();
    let frames = machine.frames();
    let injector = FaultInjector::new(&frames);
    let vm = manager(&machine, &injector, tree_config(false));
    let keep = vm.vmalloc(4096).unwrap();
    let pages = 1500u64;
    let mut k = 0;
    loop {
        let before = (free_frames(&frames), vm.stats());
        injector.fail_after(k);
        match vm.vmalloc((pages * 4096) as usize) {
            Ok(ptr) => {
                injector.disarm();
                assert!(
                    k > pages,
                    "only succeeds once all {pages} frames and tables could be had"
                );
                // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
                unsafe { vm.vfree(ptr.as_ptr()) }.unwrap();
                break;
            }
            Err(error) => {
                assert!(injector.fired(), "frame {k}: failed without a failure");
                assert_eq!(error, Error::OutOfFrames);
                assert_eq!(
                    (free_frames(&frames), vm.stats()),
                    before,
                    "failing frame {k}"
                );
                assert_eq!(vm.areas().count(), 1);
                let start = addr(keep) + 2 * 4096u64;
                for page in [0, 1, 511, 512, 1000, pages - 1] {
                    assert!(
                        machine
                            .translate(start + page * 4096, Access::READ)
                            .is_err()
                    );
                }
            }
        }
        k += 1;
    }
}

#[test]
fn a_failed_vmalloc_gives_back_the_bookkeeping_slab_it_took() {
    let machine = SimMachine::new(SimConfig::new(16 << 20));
    let frames = machine.frames();
    let vm = manager(&machine, &frames, tree_config(false));
    let live: Vec<_> = (0..33).map(|_| vm.vmalloc(4096).unwrap()).collect();
    // Fill the bookkeeping slab to its last slot, so the next area needs a new one.
    let mut extra = Vec::new();
    while vm.stats().bookkeeping_free_slots > 1 {
        extra.push(vm.vmalloc(4096).unwrap());
    }
    let held = hold_all_but(&frames, 1);
    let before = (free_frames(&frames), vm.stats());
    assert_eq!(vm.vmalloc(8192), Err(Error::OutOfFrames));
    assert_eq!((free_frames(&frames), vm.stats()), before);
    frames.free_frames(&held).unwrap();
    for ptr in live.iter().chain(&extra) {
        // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
        unsafe { vm.vfree(ptr.as_ptr()) }.unwrap();
    }
}

#[test]
fn empty_bookkeeping_slabs_go_back_to_the_frame_allocator() {
    let machine = machine();
    let frames = machine.frames();
    let vm = manager(&machine, &frames, tree_config(false));
    let start = vm.stats().bookkeeping_frames;
    let baseline = free_frames(&frames);
    // Holes between live areas make a free-range node each, and the area nodes too.
    let ptrs: Vec<_> = (0..3000).map(|_| vm.vmalloc(4096).unwrap()).collect();
    for ptr in ptrs.iter().step_by(2) {
        // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
        unsafe { vm.vfree(ptr.as_ptr()) }.unwrap();
    }
    vm.purge();
    let grown = vm.stats().bookkeeping_frames;
    assert!(
        grown > start + 40,
        "3000 areas and 1500 holes take slabs: {grown}"
    );
    for ptr in ptrs.iter().skip(1).step_by(2) {
        // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
        unsafe { vm.vfree(ptr.as_ptr()) }.unwrap();
    }
    vm.purge();
    let after = vm.stats();
    assert!(
        // The pool keeps one empty slab for the next call.
        after.bookkeeping_frames <= start + 1,
        "slabs kept after everything was freed: {} (started with {start})",
        after.bookkeeping_frames
    );
    assert_eq!(
        free_frames(&frames) + after.bookkeeping_frames,
        baseline + start
    );
}

#[test]
fn vrealloc_shrinks_grows_in_place_and_moves_without_copying() {
    let machine = machine();
    let frames = machine.frames();
    let vm = manager(&machine, &frames, tree_config(true));
    let data: Vec<u8> = (0..4 * 4096).map(|i| (i % 253) as u8).collect();
    let ptr = vm.vmalloc(4 * 4096).unwrap();
    machine.write(addr(ptr), &data).unwrap();
    let third = vm.vmalloc_to_frame(addr(ptr) + 2 * 4096u64).unwrap();

    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    let grown = unsafe { vm.vrealloc(ptr.as_ptr(), 6 * 4096) }.unwrap();
    assert_eq!(grown, ptr, "the pages after it were free");
    let blocker = vm.vmalloc(4096).unwrap();
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    let moved = unsafe { vm.vrealloc(ptr.as_ptr(), 20 * 4096) }.unwrap();
    assert_ne!(moved, ptr);
    assert_eq!(
        vm.vmalloc_to_frame(addr(moved) + 2 * 4096u64).unwrap(),
        third,
        "frames remapped, not copied"
    );
    let mut back = vec![0; data.len()];
    machine.read(addr(moved), &mut back).unwrap();
    assert_eq!(back, data);
    assert!(
        machine.read(addr(ptr), &mut [0]).is_err(),
        "the old range is gone"
    );
    machine.write(addr(moved) + 19 * 4096u64, &[1]).unwrap();

    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    let shrunk = unsafe { vm.vrealloc(moved.as_ptr(), 4096) }.unwrap();
    assert_eq!(shrunk, moved);
    assert!(
        machine.read(addr(moved) + 4096u64, &mut [0]).is_err(),
        "the tail is unmapped"
    );
    assert_eq!(vm.stats().data_frames, 2);
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    unsafe { vm.vfree(shrunk.as_ptr()) }.unwrap();
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    unsafe { vm.vfree(blocker.as_ptr()) }.unwrap();
    assert_eq!(vm.stats().data_frames, 0);
}

#[test]
fn a_moving_vrealloc_that_runs_out_of_frames_leaves_the_area_as_it_was() {
    let machine = machine();
    let frames = machine.frames();
    let vm = manager(&machine, &frames, tree_config(false));
    let a = vm.vmalloc(16 << 10).unwrap();
    let data: Vec<u8> = (0..16 << 10).map(|i| (i % 249) as u8).collect();
    machine.write(addr(a), &data).unwrap();
    let _blocker = vm.vmalloc(4096).unwrap();
    let _window = vm.reserve(2 << 20, &VmOptions::default()).unwrap();
    let held = hold_all_but(&frames, 0);
    let before = (
        free_frames(&frames),
        vm.stats(),
        vm.areas().collect::<Vec<_>>(),
    );
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    assert_eq!(
        unsafe { vm.vrealloc(a.as_ptr(), 32 << 10) },
        Err(Error::OutOfFrames)
    );
    assert_eq!(
        (
            free_frames(&frames),
            vm.stats(),
            vm.areas().collect::<Vec<_>>()
        ),
        before
    );
    let mut back = vec![0; data.len()];
    machine.read(addr(a), &mut back).unwrap();
    assert_eq!(back, data);
    frames.free_frames(&held).unwrap();

    // The same for a failure at every frame the move takes.
    let machine = self::machine();
    let frames = machine.frames();
    let injector = FaultInjector::new(&frames);
    let vm = manager(&machine, &injector, tree_config(false));
    // 600 pages: at their new place they cross a page-table boundary, so remapping
    // them can fail halfway, as can backing the 100 new pages.
    let a = vm.vmalloc(600 * 4096).unwrap();
    let data: Vec<u8> = (0..600 * 4096).map(|i| (i % 241) as u8).collect();
    machine.write(addr(a), &data).unwrap();
    let _blocker = vm.vmalloc(4096).unwrap();
    for k in 0.. {
        let before = (
            free_frames(&frames),
            vm.stats(),
            vm.areas().collect::<Vec<_>>(),
        );
        injector.fail_after(k);
        // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
        let result = unsafe { vm.vrealloc(a.as_ptr(), 700 * 4096) };
        injector.disarm();
        if let Ok(moved) = result {
            assert!(k > 100, "succeeded with the failure injected at frame {k}");
            machine.read(addr(moved), &mut back_of(&data)).unwrap();
            break;
        }
        assert_eq!(
            (
                free_frames(&frames),
                vm.stats(),
                vm.areas().collect::<Vec<_>>()
            ),
            before,
            "failing frame {k}"
        );
        let mut back = back_of(&data);
        machine.read(addr(a), &mut back).unwrap();
        assert_eq!(back, data, "failing frame {k}");
    }
}

fn back_of(data: &[u8]) -> Vec<u8> {
    vec![0; data.len()]
}

/// Makes areas of one page until the bookkeeping pool has exactly `slots` free.
fn leave_free_slots(vm: &SimVmalloc<'_, &SimFrames>, slots: usize) -> Vec<NonNull<u8>> {
    let free_slots = || vm.stats().bookkeeping_free_slots as usize;
    let mut made = Vec::new();
    while free_slots() != slots {
        made.push(vm.vmalloc(4096).unwrap());
        assert!(made.len() < 1000, "cannot leave {slots} free slots");
    }
    made
}

/// Runs `call` on a manager whose frames are all taken, but for 200 waiting for the
/// purge, after `setup`; the call must succeed by purging them.
fn with_frames_waiting(
    setup: impl FnOnce(&SimVmalloc<'_, &SimFrames>),
    call: impl FnOnce(&SimVmalloc<'_, &SimFrames>, &[PhysFrame]) -> Result<(), Error>,
) {
    let machine = machine();
    let frames = machine.frames();
    let vm = manager(&machine, &frames, tree_config(false));
    let waiting = vm.vmalloc(200 * 4096).unwrap();
    setup(&vm);
    let held = hold_all_but(&frames, 0);
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    unsafe { vm.vfree(waiting.as_ptr()) }.unwrap();
    assert_eq!(vm.stats().pending_purge_frames, 200);
    call(&vm, &held).unwrap();
    assert_eq!(vm.stats().pending_purge_frames, 0, "purged");
    frames.free_frames(&held).unwrap();
}

/// Reserves the region up to the next 2 MiB boundary, so the next area needs a new
/// page table.
fn pad_to_a_new_page_table(vm: &SimVmalloc<'_, &SimFrames>) {
    let end = vm
        .areas()
        .map(|area| area.start.as_u64() + area.span)
        .max()
        .unwrap();
    let pad = end.next_multiple_of(2 << 20) - end;
    if pad > 4096 {
        vm.reserve((pad - 4096) as usize, &VmOptions::default())
            .unwrap();
    }
}

#[test]
fn calls_that_run_dry_purge_the_lazily_freed_frames_first() {
    // Bookkeeping: the pool has one free slot, and every call reserves two first, so
    // it needs a new slab.
    with_frames_waiting(
        |vm| drop(leave_free_slots(vm, 1)),
        |vm, _| vm.vmalloc(4096).map(drop),
    );
    with_frames_waiting(
        |vm| drop(leave_free_slots(vm, 1)),
        |vm, _| {
            let a = vm.areas().next().unwrap().start;
            // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
            unsafe { vm.vrealloc(a.as_mut_ptr(), 8 * 4096) }.map(drop)
        },
    );
    // Page tables: the pool has room, the mapping needs a new page table.
    with_frames_waiting(
        |vm| {
            drop(leave_free_slots(vm, 5));
            pad_to_a_new_page_table(vm);
        },
        |vm, held| {
            // SAFETY: frames the test holds, never freed while mapped.
            let mapped = unsafe { vm.vmap(&held[..4], Prot::KERNEL_RW) }?;
            // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
            unsafe { vm.vunmap(mapped.as_ptr(), |_| ()) }
        },
    );
    with_frames_waiting(
        |vm| {
            drop(leave_free_slots(vm, 5));
            pad_to_a_new_page_table(vm);
        },
        |vm, _| {
            let window = vm.reserve(1 << 20, &VmOptions::default())?;
            vm.populate(window.as_ptr(), 30 * 4096).map(drop)
        },
    );
    // Data frames.
    with_frames_waiting(|_| (), |vm, _| vm.vmalloc(30 * 4096).map(drop));
}

#[test]
fn a_zeroed_area_reads_zero_where_a_shrink_dropped_bytes() {
    let machine = machine();
    let frames = machine.frames();
    let vm = manager(&machine, &frames, config(false));
    let p = vm.vzalloc(8192).unwrap();
    machine.write(addr(p), &[0xaa; 8192]).unwrap();
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    let p = unsafe { vm.vrealloc(p.as_ptr(), 100) }.unwrap();
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    let p = unsafe { vm.vrealloc(p.as_ptr(), 8192) }.unwrap();
    let mut back = vec![1; 8192];
    machine.read(addr(p), &mut back).unwrap();
    assert!(back[..100].iter().all(|&b| b == 0xaa), "kept bytes stay");
    assert!(
        back[100..].iter().all(|&b| b == 0),
        "dropped bytes read zero"
    );

    // Within one page too.
    machine.write(addr(p), &[0xbb; 4096]).unwrap();
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    let p = unsafe { vm.vrealloc(p.as_ptr(), 3000) }.unwrap();
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    let p = unsafe { vm.vrealloc(p.as_ptr(), 4000) }.unwrap();
    let mut back = vec![1; 4000];
    machine.read(addr(p), &mut back).unwrap();
    assert!(back[3000..].iter().all(|&b| b == 0));
}

#[test]
fn vmap_hands_the_callers_frames_back() {
    let machine = machine();
    let frames = machine.frames();
    let vm = manager(&machine, &frames, config(false));
    // A live neighbour keeps the page tables: only vunmap's own flush can make the
    // cached page fault.
    let neighbour = vm.vmalloc(4096).unwrap();
    let mut mine = [PhysFrame::containing_address(PhysAddr::zero()); 5];
    assert_eq!(frames.alloc_frames(&mut mine), 5);
    let free_before = free_frames(&frames);
    // SAFETY: frames the test owns, not freed while mapped.
    let ptr = unsafe { vm.vmap(&mine, Prot::KERNEL_RW) }.unwrap();
    machine.write(addr(ptr) + 3 * 4096u64, b"vmap").unwrap();
    let mut bytes = [0; 4];
    machine.read_phys(mine[3].start_address(), &mut bytes);
    assert_eq!(&bytes, b"vmap");
    let mut back = Vec::new();
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    unsafe { vm.vunmap(ptr.as_ptr(), |frame| back.push(frame)) }.unwrap();
    assert_eq!(back, mine);
    assert!(
        machine.read(addr(ptr) + 3 * 4096u64, &mut bytes).is_err(),
        "flushed before the frames came back"
    );
    assert_eq!(
        free_frames(&frames),
        free_before,
        "no frame went to the allocator"
    );
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    unsafe { vm.vfree(neighbour.as_ptr()) }.unwrap();
}

#[test]
fn ioremap_keeps_the_offset_maps_uncached_and_refuses_ram() {
    let machine = machine();
    let frames = machine.frames();
    let vm = manager(&machine, &frames, config(false));
    let before = free_frames(&frames);
    // Past the end of the machine's 64 MiB: no RAM there.
    let phys = PhysAddr::new(0xfec0_0123);
    // SAFETY: nothing reads or writes through the mapping.
    let ptr = unsafe { vm.ioremap(phys, 0x2000, CacheMode::Uncached) }.unwrap();
    assert_eq!(ptr.as_ptr() as u64 % 4096, 0x123);
    let t = machine.translate(addr(ptr), Access::READ).unwrap();
    assert_eq!(t.phys(), phys);
    assert!(
        t.flags
            .contains(PageTableFlags::NO_CACHE | PageTableFlags::WRITE_THROUGH)
    );
    assert!(
        machine
            .translate(addr(ptr) + 0x2000u64, Access::READ)
            .is_ok(),
        "three pages cover it"
    );
    let info = vm.find_vm_area(addr(ptr)).unwrap();
    assert_eq!(info.kind, AreaKind::Ioremap);
    assert_eq!(info.phys, Some(phys));
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    assert_eq!(
        unsafe { vm.iounmap(ptr.as_ptr().wrapping_sub(0x123)) },
        Err(Error::InteriorPointer)
    );
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    unsafe { vm.iounmap(ptr.as_ptr()) }.unwrap();
    vm.purge();
    assert_eq!(
        free_frames(&frames),
        before,
        "MMIO frames never reach the allocator"
    );

    // RAM the allocator manages, free or in use, is refused; the reserved kernel
    // image is not the allocator's.
    let ram = vm
        .vmalloc_to_frame(addr(vm.vmalloc(4096).unwrap()))
        .unwrap();
    let stats = vm.stats();
    for (start, size) in [
        (ram.start_address(), 4096),
        (PhysAddr::new(0x3f_f000), 0x2000),
        (PhysAddr::new(16 << 20), 1),
    ] {
        // SAFETY: refused before anything is mapped.
        let result = unsafe { vm.ioremap(start, size, CacheMode::Uncached) };
        assert_eq!(result, Err(Error::ManagedRam), "{start:?}");
    }
    assert_eq!(vm.stats(), stats);
    // SAFETY: the kernel image's frames are reserved; nothing touches the mapping.
    let image = unsafe { vm.ioremap(PhysAddr::new(0x20_0000), 4096, CacheMode::WriteThrough) };
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    unsafe { vm.iounmap(image.unwrap().as_ptr()) }.unwrap();
}

#[test]
fn owners_free_on_drop_and_buffers_never_show_old_contents() {
    // The owners dereference their pointers: the host window makes that possible.
    let machine = SimMachine::new(SimConfig::new(64 << 20).with_host_window(1 << 30));
    let frames = machine.frames();
    let (start, size) = machine.host_window().unwrap();
    let vm = manager(
        &machine,
        &frames,
        VmallocConfig {
            start,
            size,
            ..config(true)
        },
    );
    // Dirty frames first, so a buffer built from them would show 0xee.
    let dirty = vm.vmalloc(16 * 4096).unwrap();
    machine.write(addr(dirty), &[0xee; 16 * 4096]).unwrap();
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    unsafe { vm.vfree(dirty.as_ptr()) }.unwrap();
    {
        let mut buffer = VBuffer::new(&vm, 10_000).unwrap();
        assert_eq!(buffer.len(), 10_000);
        assert!(buffer.iter().all(|&b| b == 0));
        buffer[9_999] = 3;
        buffer.resize(40_000).unwrap();
        assert_eq!(buffer[9_999], 3);
        assert!(buffer[10_000..].iter().all(|&b| b == 0));
        let mut boxed = VBox::new(&vm, [7u64; 16]).unwrap();
        boxed[3] = 9;
        assert_eq!(boxed.iter().sum::<u64>(), 7 * 15 + 9);
        assert_eq!(vm.stats().areas, 2);
        assert_eq!(vm.stats().data_frames, 11);
    }
    assert_eq!(vm.stats().areas, 0);
    assert_eq!(vm.stats().data_frames, 0);
}

#[test]
fn vmap_and_ioremap_owners_unmap_on_drop_and_bound_every_access() {
    // The owners dereference their pointers: the host window makes that possible.
    let machine = SimMachine::new(SimConfig::new(64 << 20).with_host_window(1 << 30));
    let frames = machine.frames();
    let (start, size) = machine.host_window().unwrap();
    let vm = manager(
        &machine,
        &frames,
        VmallocConfig {
            start,
            size,
            ..config(false)
        },
    );
    let mut mine = [PhysFrame::containing_address(PhysAddr::zero()); 2];
    assert_eq!(frames.alloc_frames(&mut mine), 2);
    // SAFETY: the frames are this test's, held until the end.
    let mapping = unsafe { VMapping::new(&vm, &mine, Prot::KERNEL_RW) }.unwrap();
    assert_eq!(mapping.len(), 8192);
    let at = VirtAddr::from_ptr(mapping.as_ptr());
    machine.write(at + 4096u64, b"vmapped").unwrap();
    let mut back = Vec::new();
    mapping.unmap(|frame| back.push(frame));
    assert_eq!(back, mine, "the frames come back in order");
    assert!(
        machine.translate(at, Access::READ).is_err(),
        "unmapped at once"
    );
    // SAFETY: as above.
    let dropped = unsafe { VMapping::new(&vm, &mine, Prot::READ) }.unwrap();
    let at = VirtAddr::from_ptr(dropped.as_ptr());
    drop(dropped);
    assert!(
        machine.translate(at, Access::READ).is_err(),
        "dropped: unmapped"
    );
    assert_eq!(vm.stats().areas, 0);
    frames
        .free_frames(&mine)
        .expect("the frames stayed the test's");

    // Part of the machine's reserved kernel image, which no one else uses here.
    let phys = PhysAddr::new(0x20_0010);
    // SAFETY: a reserved range nothing else touches; the test reads and writes it.
    let device = unsafe { IoMapping::new(&vm, phys, 64, CacheMode::Uncached) }.unwrap();
    assert_eq!(device.len(), 64);
    device.write::<u32>(4, 0xdead_beef).unwrap();
    assert_eq!(device.read::<u32>(4), Ok(0xdead_beef));
    let mut word = [0; 4];
    machine
        .read(VirtAddr::from_ptr(device.as_ptr()) + 4u64, &mut word)
        .unwrap();
    assert_eq!(u32::from_le_bytes(word), 0xdead_beef, "the same bytes");
    assert_eq!(
        device.read::<u64>(57),
        Err(Error::SizeTooLarge),
        "past the end"
    );
    assert_eq!(device.write::<u8>(64, 1), Err(Error::SizeTooLarge));
    assert_eq!(device.read::<u64>(usize::MAX), Err(Error::SizeTooLarge));
    assert_eq!(device.read::<u32>(2), Err(Error::Unaligned));
    assert_eq!(device.read::<u8>(63), Ok(0));
    let at = VirtAddr::from_ptr(device.as_ptr());
    drop(device);
    assert!(
        machine.translate(at, Access::READ).is_err(),
        "dropped: unmapped"
    );
    assert_eq!(vm.stats().areas, 0);
}

#[test]
fn listing_and_stats_read_like_procfs() {
    let machine = machine();
    let frames = machine.frames();
    let vm = manager(&machine, &frames, config(false));
    let tagged = VmOptions {
        tag: "driver_ring",
        ..VmOptions::default()
    };
    let (ptr, line) = (vm.vmalloc_with(4 * 4096, &tagged).unwrap(), line!());
    let listing = std::format!("{}", vm.info());
    // As Linux names the caller, the line names the call that made the area.
    let line = std::format!(
        "{:#018x}-{:#018x}     20480 driver_ring tests/vmalloc.rs:{line} pages=4 vmalloc",
        ptr.as_ptr() as u64,
        ptr.as_ptr() as u64 + 5 * 4096
    );
    let stats = vm.stats();
    // The per-CPU blocks' zone first, as Linux lists its vmap blocks.
    let zone = std::format!(
        "{:#018x}-{:#018x} {} vmap_blocks ",
        VMALLOC_START,
        VMALLOC_START + stats.block_zone_bytes,
        stats.block_zone_bytes
    );
    let lines: Vec<&str> = listing.lines().collect();
    assert_eq!(lines.len(), 2, "{listing}");
    assert!(
        lines[0].starts_with(&zone) && lines[0].ends_with(" reserved"),
        "{listing}"
    );
    assert_eq!(lines[1], line);
    assert_eq!(stats.used, 5 * 4096, "the zone's free space is not used");
    assert_eq!(stats.areas, 1);
    assert_eq!(
        stats.largest_free,
        VMALLOC_SIZE - stats.block_zone_bytes - 5 * 4096
    );
    assert!(std::format!("{stats}").contains("VmallocUsed:            20 kB"));
}

/// A `fmt::Write` sink that calls the manager on every write, as a `String` growing
/// through a heap built on the manager does.
struct CallingSink<'v, 'm> {
    vm: &'v SimVmalloc<'m, &'m SimFrames>,
    text: String,
}

impl core::fmt::Write for CallingSink<'_, '_> {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let ptr = self.vm.vmalloc(4096).map_err(|_| core::fmt::Error)?;
        // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
        unsafe { self.vm.vfree(ptr.as_ptr()) }.map_err(|_| core::fmt::Error)?;
        self.text.push_str(s);
        Ok(())
    }
}

#[test]
fn listings_and_callbacks_run_without_the_lock() {
    let machine = machine();
    let frames = machine.frames();
    let vm = manager(&machine, &frames, config(false));
    let ptrs: Vec<_> = (0..1000).map(|_| vm.vmalloc(4096).unwrap()).collect();

    // Calling the manager between items would deadlock on a held spin lock.
    let mut seen = 0;
    for area in vm.areas().filter(|area| area.tag != "vmap_blocks") {
        assert_eq!(area.kind, AreaKind::Vmalloc);
        vm.stats();
        seen += 1;
    }
    assert_eq!(seen, 1000);

    let mut sink = CallingSink {
        vm: &vm,
        text: String::new(),
    };
    core::fmt::write(&mut sink, format_args!("{}", vm.info())).unwrap();
    assert_eq!(
        sink.text
            .lines()
            .filter(|line| line.ends_with("pages=1 vmalloc"))
            .count(),
        1000
    );

    let mut mine = [PhysFrame::containing_address(PhysAddr::zero()); 3];
    assert_eq!(frames.alloc_frames(&mut mine), 3);
    // SAFETY: frames the test owns, not freed while mapped.
    let mapped = unsafe { vm.vmap(&mine, Prot::KERNEL_RW) }.unwrap();
    let mut back = Vec::new();
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    unsafe {
        vm.vunmap(mapped.as_ptr(), |frame| {
            assert_eq!(vm.vfree(mapped.as_ptr()), Err(Error::NotAllocated));
            back.push(frame);
        })
    }
    .unwrap();
    assert_eq!(back, mine);
    for ptr in ptrs {
        // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
        unsafe { vm.vfree(ptr.as_ptr()) }.unwrap();
    }
}

#[test]
fn threads_share_one_manager() {
    for cpu_caches in [true, false] {
        watchdog("threads_share_one_manager", DEADLOCK_LIMIT, || {
            threads_share_one_manager_with(cpu_caches)
        });
    }
}

fn threads_share_one_manager_with(cpu_caches: bool) {
    {
        let machine = machine();
        let frames = machine.frames();
        let before_manager = free_frames(&frames);
        let vm = manager(
            &machine,
            &frames,
            VmallocConfig {
                lazy_threshold_pages: 64,
                cpu_caches,
                ..config(false)
            },
        );
        let initial = vm.stats();
        let baseline = free_frames(&frames);
        std::thread::scope(|scope| {
            for t in 0..4u8 {
                let (vm, machine) = (&vm, &machine);
                scope.spawn(move || {
                    let mut live = Vec::new();
                    for i in 0..200usize {
                        let pages = 1 + (i * 7 + t as usize) % 9;
                        let ptr = vm.vmalloc(pages * 4096).unwrap();
                        machine.write(addr(ptr), &[t; 64]).unwrap();
                        live.push(ptr);
                        if i % 3 != 0 {
                            let victim = live.swap_remove(i % live.len());
                            let mut check = [0; 64];
                            machine.read(addr(victim), &mut check).unwrap();
                            assert_eq!(check, [t; 64], "no other thread wrote into this area");
                            // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
                            unsafe { vm.vfree(victim.as_ptr()) }.unwrap();
                        }
                    }
                    for ptr in live {
                        // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
                        unsafe { vm.vfree(ptr.as_ptr()) }.unwrap();
                    }
                });
            }
        });
        vm.purge();
        let stats = vm.stats();
        assert_eq!((stats.areas, stats.data_frames), (0, 0));
        assert_frames_conserved(&vm, &frames, 0);
        if !cpu_caches {
            // The blocks keep their page tables and cached frames while the manager
            // lives; the tree gives back all but its bookkeeping at once.
            assert_eq!(stats.page_table_frames, initial.page_table_frames);
            assert_eq!(
                free_frames(&frames) + stats.bookkeeping_frames,
                baseline + initial.bookkeeping_frames,
                "every frame is back but the bookkeeping kept"
            );
        }
        drop(vm);
        assert_eq!(
            free_frames(&frames),
            before_manager,
            "the manager kept nothing"
        );
    }
}

#[test]
fn areas_made_after_another_address_space_copied_the_kernel_half_are_visible_there() {
    let machine = machine();
    let frames = machine.frames();
    let vm = manager(&machine, &frames, config(false));
    // A process's address space: a PML4 with the kernel half copied once.
    let process = frames.alloc_frame().unwrap();
    machine.fill_phys(process.start_address(), 4096, 0);
    for index in 256..512 {
        set_entry(
            &machine,
            process,
            index,
            entry(&machine, machine.root(), index),
        );
    }
    let ptr = vm.vmalloc(3 * 4096).unwrap();
    machine.write(addr(ptr) + 5000u64, b"shared").unwrap();
    machine.load_cr3(process);
    let mut back = [0; 6];
    machine.read(addr(ptr) + 5000u64, &mut back).unwrap();
    assert_eq!(&back, b"shared");
    machine.load_cr3(machine.root());

    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    unsafe { vm.vfree(ptr.as_ptr()) }.unwrap();
    vm.purge();
    for root in [process, machine.root()] {
        machine.load_cr3(root);
        assert!(machine.read(addr(ptr), &mut back).is_err(), "{root:?}");
    }
    machine.load_cr3(machine.root());
}

#[test]
fn the_regions_top_level_entries_never_change() {
    let machine = machine();
    let frames = machine.frames();
    let vm = manager(&machine, &frames, tree_config(false));
    let first = (VMALLOC_START >> 39) as usize & 511;
    assert_eq!(first, 402);
    let top = |machine: &SimMachine| -> Vec<u64> {
        (first..first + TOP_LEVEL_TABLES as usize)
            .map(|index| entry(machine, machine.root(), index))
            .collect()
    };
    let set_up = top(&machine);
    assert!(
        set_up.iter().all(|&raw| raw & 1 == 1),
        "all present after new"
    );
    for round in 0..20 {
        let far = VmOptions {
            align: 1 << 40,
            ..VmOptions::default()
        };
        let a = vm.vmalloc(4096).unwrap();
        let b = vm.vmalloc_with(8192, &far).unwrap();
        // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
        unsafe { vm.vfree(a.as_ptr()) }.unwrap();
        // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
        unsafe { vm.vfree(b.as_ptr()) }.unwrap();
        vm.purge();
        assert_eq!(top(&machine), set_up, "round {round}");
    }
    assert_eq!(vm.stats().page_table_frames, TOP_LEVEL_TABLES);
}

#[test]
fn tables_that_were_there_before_the_manager_are_adopted_and_never_freed() {
    let machine = machine();
    let frames = machine.frames();
    // A PDPT, PD and PT in the kernel image, which the frame allocator does not
    // manage, as a boot loader might have left them over the region's start.
    let [pdpt, pd, pt] = [0x20_0000u64, 0x20_1000, 0x20_2000]
        .map(|phys| PhysFrame::containing_address(PhysAddr::new(phys)));
    let table = (PageTableFlags::PRESENT | PageTableFlags::WRITABLE).bits();
    set_entry(
        &machine,
        machine.root(),
        402,
        pdpt.start_address().as_u64() | table,
    );
    set_entry(&machine, pdpt, 0, pd.start_address().as_u64() | table);
    set_entry(&machine, pd, 0, pt.start_address().as_u64() | table);
    let boot = [
        entry(&machine, machine.root(), 402),
        entry(&machine, pdpt, 0),
        entry(&machine, pd, 0),
    ];
    let vm = manager(&machine, &frames, tree_config(false));
    assert_eq!(vm.stats().page_table_frames, TOP_LEVEL_TABLES - 1);
    let baseline = free_frames(&frames);

    let near = vm.vmalloc(4096).unwrap();
    assert_eq!(addr(near), VirtAddr::new(VMALLOC_START));
    let far = VmOptions {
        align: 1 << 30,
        ..VmOptions::default()
    };
    let far = vm.vmalloc_with(4096, &far).unwrap();
    assert_eq!(
        vm.stats().page_table_frames,
        TOP_LEVEL_TABLES - 1 + 2,
        "a PD and a PT for the far area, none for the near one"
    );
    assert_eq!(
        vm.vmalloc_to_frame(addr(near)).unwrap(),
        PhysFrame::containing_address(PhysAddr::new(
            entry(&machine, pt, 0) & 0x000f_ffff_ffff_f000
        ))
    );
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    unsafe { vm.vfree(near.as_ptr()) }.unwrap();
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    unsafe { vm.vfree(far.as_ptr()) }.unwrap();
    vm.purge();
    let now = [
        entry(&machine, machine.root(), 402),
        entry(&machine, pdpt, 0),
        entry(&machine, pd, 0),
    ];
    assert_eq!(now, boot, "the boot tables stay linked and untouched");
    assert_eq!(entry(&machine, pdpt, 1), 0, "the manager's own PD is gone");
    assert_eq!(vm.stats().page_table_frames, TOP_LEVEL_TABLES - 1);
    assert_eq!(free_frames(&frames), baseline, "its own tables went back");
    assert_frames_conserved(&vm, &frames, 0);
}

#[test]
fn dropping_the_manager_returns_every_frame_it_took() {
    let machine = machine();
    let frames = machine.frames();
    let before = free_frames(&frames);
    let tlb = CountingFlush::new();
    let mut lent = [PhysFrame::containing_address(PhysAddr::zero()); 4];
    assert_eq!(frames.alloc_frames(&mut lent), 4);
    {
        // SAFETY: the machine's root table is used by nothing else in this test.
        let vm = unsafe {
            Vmalloc::new(
                VmallocConfig::default(),
                machine.root(),
                machine.phys(),
                &frames,
                &tlb,
            )
        }
        .unwrap();
        let ptrs: Vec<_> = (0..200)
            .map(|i| vm.vmalloc((i % 7 + 1) * 4096).unwrap())
            .collect();
        for ptr in ptrs.iter().step_by(3) {
            // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
            unsafe { vm.vfree(ptr.as_ptr()) }.unwrap();
        }
        let window = vm.reserve(1 << 20, &VmOptions::default()).unwrap();
        vm.populate(window.as_ptr(), 300 << 10).unwrap();
        // SAFETY: frames the test owns; MMIO past the end of RAM, never touched.
        unsafe {
            vm.vmap(&lent, Prot::KERNEL_RW).unwrap();
            vm.ioremap(PhysAddr::new(0xfec0_0000), 4096, CacheMode::Uncached)
                .unwrap();
        }
        assert!(vm.stats().pending_purge_frames > 0);
        assert!(free_frames(&frames) < before - 4 - TOP_LEVEL_TABLES);
    }
    assert_eq!(
        free_frames(&frames),
        before - 4,
        "all but the test's own frames"
    );
    assert!(tlb.full_calls() > 0, "flushed before giving frames back");
    for index in 402..402 + TOP_LEVEL_TABLES as usize {
        assert_eq!(entry(&machine, machine.root(), index), 0, "entry {index}");
    }
    frames.free_frames(&lent).unwrap();
}

#[test]
fn set_prot_changes_a_whole_area_and_flushes_what_the_tlb_cached() {
    let machine = machine();
    let frames = machine.frames();
    let vm = manager(&machine, &frames, config(false));
    let ptr = vm.vmalloc(3 * 4096).unwrap();
    let at = addr(ptr) + 2 * 4096u64 + 8;
    // Cache a writable translation of every page first.
    for page in 0..3u64 {
        machine.write(addr(ptr) + page * 4096, &[7]).unwrap();
    }
    let before = (free_frames(&frames), vm.stats());

    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    unsafe { vm.set_prot(ptr.as_ptr(), Prot::READ) }.unwrap();
    let fault = machine.write(at, &[1]).unwrap_err().page_fault().unwrap();
    assert!(
        fault
            .code
            .contains(PageFaultErrorCode::PROTECTION_VIOLATION)
    );
    let diagnosis = vm.diagnose_fault(fault.addr, fault.code).to_string();
    assert!(
        diagnosis.starts_with("write to read-only memory of an area (12 KiB vmalloc"),
        "{diagnosis}"
    );
    let mut byte = [0];
    machine.read(addr(ptr), &mut byte).unwrap();
    assert_eq!(byte, [7], "the same frames, readable");

    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    unsafe { vm.set_prot(ptr.as_ptr(), Prot::READ | Prot::EXEC) }.unwrap();
    machine.fetch(at, &mut byte).unwrap();
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    unsafe { vm.set_prot(ptr.as_ptr(), Prot::KERNEL_RW) }.unwrap();
    assert!(machine.fetch(at, &mut byte).is_err(), "NX again, flushed");
    machine.write(at, &[2]).unwrap();
    assert_eq!((free_frames(&frames), vm.stats()), before);

    // Growing keeps the rights the area has now.
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    unsafe { vm.set_prot(ptr.as_ptr(), Prot::READ) }.unwrap();
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    let grown = unsafe { vm.vrealloc(ptr.as_ptr(), 6 * 4096) }.unwrap();
    assert!(machine.write(addr(grown) + 5 * 4096u64, &[1]).is_err());

    // Bad input changes nothing.
    let snapshot = (free_frames(&frames), vm.stats());
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    assert_eq!(
        unsafe { vm.set_prot(grown.as_ptr(), Prot::WRITE | Prot::EXEC) },
        Err(Error::WriteExecute)
    );
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    assert_eq!(
        unsafe { vm.set_prot(grown.as_ptr().wrapping_add(4096), Prot::READ) },
        Err(Error::InteriorPointer)
    );
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    assert_eq!(
        unsafe { vm.set_prot(core::ptr::null_mut(), Prot::READ) },
        Err(Error::NullPointer)
    );
    assert_eq!((free_frames(&frames), vm.stats()), snapshot);
    let frames_for_vmap = vmalloc_sim::scenarios::frames_for_vmap(&frames, 1);
    // SAFETY: the frames are the test's own.
    let mapped = unsafe { vm.vmap(&frames_for_vmap, Prot::KERNEL_RW) }.unwrap();
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    assert_eq!(
        unsafe { vm.set_prot(mapped.as_ptr(), Prot::READ) },
        Err(Error::WrongKind)
    );
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    unsafe { vm.vunmap(mapped.as_ptr(), |_| {}) }.unwrap();
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    unsafe { vm.vfree(grown.as_ptr()) }.unwrap();
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    assert_eq!(
        unsafe { vm.set_prot(grown.as_ptr(), Prot::READ) },
        Err(Error::NotAllocated)
    );
    assert!(machine.write(addr(grown), &[1]).is_err());
}
