//! The vmalloc manager's lazy frees: frames held until the batched flush, eager
//! mode, the purge's flush ceiling and threshold, calls that run dry purging first,
//! rollback when frames run out at any step, and the bookkeeping pool's frames.

mod common;

use common::vm::*;
use core::ptr::NonNull;
use vmalloc::frame::FaultInjector;
use vmalloc::tlb::CountingFlush;
use vmalloc::vmalloc::*;
use vmalloc::{Error, FrameSource};
use vmalloc_sim::{Access, SimConfig, SimFrames, SimMachine};
use x86_64::structures::paging::PhysFrame;

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
        // SAFETY: bytes the test owns: no live Rust value lives there.
        unsafe { machine.write(addr(*ptr), b"live") }.unwrap();
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
        // SAFETY: bytes the test owns: no live Rust value lives there.
        unsafe { machine.write(addr(ptr) + page * 4096, b"cached") }.unwrap();
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
    // SAFETY: frames the test took and no longer uses (or a bad free, refused).
    unsafe { frames.free_frames(&held) }.unwrap();
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
    // SAFETY: frames the test took and no longer uses (or a bad free, refused).
    unsafe { frames.free_frames(&held) }.unwrap();
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
            // SAFETY: the test's own area: nothing relies on its pages staying unmapped.
            unsafe { vm.populate(window.as_ptr(), 30 * 4096) }.map(drop)
        },
    );
    // Data frames.
    with_frames_waiting(|_| (), |vm, _| vm.vmalloc(30 * 4096).map(drop));
}
