//! Small areas from per-CPU blocks (`VmallocConfig::cpu_caches`) on one CPU: they
//! behave as other `vmalloc` areas (errors, resizing, protection, listings), are never
//! reused before the flush that covers them, and running out changes nothing.

mod common;

use common::blocks::*;
use std::ptr::NonNull;
use std::sync::atomic::Ordering;
use vmalloc::vmalloc::blocks::MAX_BLOCK_PAGES;
use vmalloc::vmalloc::{Prot, VmOptions, VmallocStats};
use vmalloc::{Error, FrameSource, TlbFlush, VmallocConfig};
use vmalloc_sim::scenarios::manager_with as manager;
use vmalloc_sim::{Access, SimMachine};
use x86_64::PhysAddr;
use x86_64::structures::idt::PageFaultErrorCode;
use x86_64::structures::paging::PhysFrame;

#[test]
fn a_small_area_comes_from_a_block_and_answers_every_call_as_an_area() {
    let (machine, frames, tlb) = smp_machine(1);
    // SAFETY: the machine's page tables serve this manager alone, and its flush reaches every CPU that runs.
    let vm = unsafe { manager(machine, frames, tlb, cached()) };
    let zone = zone(&vm);
    assert_eq!(vm.stats().block_zone_bytes, zone.end - zone.start);
    let ptr = vm.vmalloc(2 * PAGE).unwrap();
    let start = addr(ptr);
    assert!(zone.contains(&start.as_u64()), "{start:?} is in the zone");
    assert_eq!(vm.stats().block_areas, 1);

    // SAFETY: bytes the test owns: no live Rust value lives there.
    unsafe { machine.write(start + 4000u64, b"across a page") }.unwrap();
    let mut back = [0; 13];
    machine.read(start + 4000u64, &mut back).unwrap();
    assert_eq!(&back, b"across a page");
    let frame = vm.vmalloc_to_frame(start + PAGE as u64).unwrap();
    let translated = machine
        .translate(start + PAGE as u64, Access::READ)
        .unwrap();
    assert_eq!(
        translated.phys().align_down(PAGE as u64),
        frame.start_address()
    );

    let area = vm.find_vm_area(start + 5u64).unwrap();
    assert_eq!(
        (area.start, area.size, area.span),
        (start, 2 * PAGE as u64, 3 * PAGE as u64)
    );
    assert_eq!(
        vm.find_vm_area(start + 2 * PAGE as u64).unwrap().start,
        start,
        "the guard page is the area's"
    );
    assert!(
        machine.read(start + 2 * PAGE as u64, &mut back).is_err(),
        "the guard page faults"
    );

    // Every call that refuses a pointer refuses this one as it would any area.
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    assert_eq!(
        unsafe { vm.vfree(ptr.as_ptr().wrapping_add(8)) },
        Err(Error::InteriorPointer)
    );
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    assert_eq!(
        unsafe { vm.vfree(ptr.as_ptr().wrapping_add(PAGE)) },
        Err(Error::InteriorPointer)
    );
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    assert_eq!(
        unsafe { vm.vfree(ptr.as_ptr().wrapping_add(2 * PAGE)) },
        Err(Error::NotAllocated)
    );
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    assert_eq!(
        unsafe { vm.vfree(ptr.as_ptr().wrapping_add(64 * PAGE)) },
        Err(Error::NotAllocated)
    );
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    assert_eq!(
        unsafe { vm.vunmap(ptr.as_ptr(), |_| {}) },
        Err(Error::WrongKind)
    );
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    assert_eq!(unsafe { vm.iounmap(ptr.as_ptr()) }, Err(Error::WrongKind));
    // SAFETY: the test's own area: nothing relies on its pages staying unmapped.
    assert_eq!(
        unsafe { vm.populate(ptr.as_ptr(), PAGE) },
        Err(Error::WrongKind)
    );
    assert_eq!(vm.stats().block_areas, 1, "nothing changed");

    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    unsafe { vm.vfree(ptr.as_ptr()) }.unwrap();
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    assert_eq!(
        unsafe { vm.vfree(ptr.as_ptr()) },
        Err(Error::NotAllocated),
        "a double free"
    );
    assert_eq!(vm.vmalloc_to_frame(start), Err(Error::NotMapped));
    assert_eq!(vm.find_vm_area(start), None);
    let site = vm
        .diagnose_fault(start + 16u64, PageFaultErrorCode::empty())
        .site;
    assert!(
        matches!(site, vmalloc::vmalloc::FaultSite::Freed { offset: 16, .. }),
        "a use after free: {site:?}"
    );
    let stats = vm.stats();
    assert_eq!((stats.block_areas, stats.data_frames), (0, 0));
    assert_eq!(
        stats.cached_pending_frames, 2,
        "its frames wait for the flush"
    );
    assert_frames_conserved(&stats, frames);
    vm.purge();
    assert_eq!(
        vm.stats().cached_pending_frames,
        0,
        "a purge flushes the CPU's list"
    );
    assert!(machine.read(start, &mut back).is_err(), "unmapped");
    let site = vm.diagnose_fault(start, PageFaultErrorCode::empty()).site;
    assert_eq!(
        site,
        vmalloc::vmalloc::FaultSite::Unmapped,
        "flushed and forgotten"
    );
}

#[test]
fn labelled_aligned_unguarded_and_large_requests_take_the_locked_path() {
    let (machine, frames, tlb) = smp_machine(1);
    // SAFETY: the machine's page tables serve this manager alone, and its flush reaches every CPU that runs.
    let vm = unsafe { manager(machine, frames, tlb, cached()) };
    let zone = zone(&vm);
    let outside = |ptr: NonNull<u8>| !zone.contains(&(ptr.as_ptr() as u64));
    let labelled = VmOptions {
        tag: "ring",
        ..VmOptions::default()
    };
    let aligned = VmOptions {
        align: 4 * PAGE as u64,
        ..VmOptions::default()
    };
    let unguarded = VmOptions {
        flags: vmalloc::vmalloc::VmFlags::NO_GUARD,
        ..VmOptions::default()
    };
    for options in [labelled, aligned, unguarded] {
        let ptr = vm.vmalloc_with(PAGE, &options).unwrap();
        assert!(outside(ptr), "{options:?}");
        // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
        unsafe { vm.vfree(ptr.as_ptr()) }.unwrap();
    }
    let largest = vm.vmalloc(MAX_BLOCK_PAGES as usize * PAGE).unwrap();
    assert!(!outside(largest));
    let larger = vm.vmalloc((MAX_BLOCK_PAGES as usize + 1) * PAGE).unwrap();
    assert!(outside(larger));
    assert_eq!(vm.stats().block_areas, 1);
}

#[test]
fn vrealloc_set_prot_and_fault_diagnosis_work_on_small_areas() {
    let (machine, frames, tlb) = smp_machine(1);
    // SAFETY: the machine's page tables serve this manager alone, and its flush reaches every CPU that runs.
    let vm = unsafe { manager(machine, frames, tlb, cached()) };
    // Frames that held data: what is not zeroed shows 0xee.
    common::dirty_free_frames(machine, frames, 0xee);
    let ptr = vm.vzalloc(PAGE).unwrap();
    // SAFETY: bytes the test owns: no live Rust value lives there.
    unsafe { machine.write(addr(ptr), b"kept") }.unwrap();
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    let grown = unsafe { vm.vrealloc(ptr.as_ptr(), 3 * PAGE) }.unwrap();
    let mut back = [0xff; 4];
    machine.read(addr(grown), &mut back).unwrap();
    assert_eq!(&back, b"kept", "the contents moved");
    machine
        .read(addr(grown) + 2 * PAGE as u64 + 100, &mut back)
        .unwrap();
    assert_eq!(back, [0; 4], "a zeroed area grows zeroed");
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    assert_eq!(
        unsafe { vm.vfree(ptr.as_ptr()) },
        Err(Error::NotAllocated),
        "the old area is gone"
    );
    assert_eq!(vm.stats().block_areas, 1);

    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    unsafe { vm.set_prot(grown.as_ptr(), Prot::READ) }.unwrap();
    // SAFETY: bytes the test owns: no live Rust value lives there.
    assert!(
        unsafe { machine.write(addr(grown), b"x") }.is_err(),
        "read-only now"
    );
    machine.read(addr(grown), &mut back).unwrap();
    let write = PageFaultErrorCode::CAUSED_BY_WRITE | PageFaultErrorCode::PROTECTION_VIOLATION;
    let site = vm.diagnose_fault(addr(grown) + 8u64, write).site;
    assert!(
        matches!(
            site,
            vmalloc::vmalloc::FaultSite::Area {
                offset: 8,
                broke_protection: true,
                ..
            }
        ),
        "{site:?}"
    );
    let past = vm.diagnose_fault(addr(grown) + 3 * PAGE as u64, write).site;
    assert!(
        matches!(past, vmalloc::vmalloc::FaultSite::Guard { past_end: 0, .. }),
        "{past:?}"
    );
    // A read-only area keeps its rights when it moves.
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    let moved = unsafe { vm.vrealloc(grown.as_ptr(), PAGE) }.unwrap();
    // SAFETY: bytes the test owns: no live Rust value lives there.
    assert!(unsafe { machine.write(addr(moved), b"x") }.is_err());
    machine.read(addr(moved), &mut back).unwrap();
    assert_eq!(&back, b"kept");
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    assert_eq!(
        unsafe { vm.vrealloc(moved.as_ptr().wrapping_add(1), PAGE) },
        Err(Error::InteriorPointer)
    );
}

#[test]
fn vfree_atomic_of_a_small_area_is_done_by_the_next_call() {
    let (machine, frames, tlb) = smp_machine(1);
    // SAFETY: the machine's page tables serve this manager alone, and its flush reaches every CPU that runs.
    let vm = unsafe { manager(machine, frames, tlb, cached()) };
    let ptr = vm.vmalloc(PAGE).unwrap();
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    unsafe { vm.vfree_atomic(ptr.as_ptr()) }.unwrap();
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    unsafe { vm.vfree_atomic(ptr.as_ptr().wrapping_add(PAGE)) }.unwrap();
    assert!(machine.read(addr(ptr), &mut [0; 1]).is_ok(), "queued only");
    // The next call that takes the lock frees the area and refuses the guard page.
    vm.purge();
    let stats = vm.stats();
    assert_eq!((stats.block_areas, stats.deferred_refused), (0, 1));
    assert!(machine.read(addr(ptr), &mut [0; 1]).is_err());
    assert_frames_conserved(&vm.stats(), frames);
}

/// The machine's flushes, counted.
struct Counted {
    machine: &'static SimMachine,
    flushes: std::sync::atomic::AtomicU64,
}

impl TlbFlush for &Counted {
    fn flush_page(&self, page: x86_64::structures::paging::Page) {
        self.flushes.fetch_add(1, Ordering::Relaxed);
        self.machine.flush_page(page);
    }
    fn flush_all(&self) {
        self.flushes.fetch_add(1, Ordering::Relaxed);
        self.machine.flush_all();
    }
    fn cpus(&self) -> Option<&dyn vmalloc::smp::Cpus> {
        self.machine.cpus()
    }
}

#[test]
fn a_freed_range_comes_back_only_after_a_flush_and_then_does() {
    let (machine, frames, _) = smp_machine(1);
    let tlb: &'static Counted = Box::leak(Box::new(Counted {
        machine,
        flushes: 0.into(),
    }));
    // SAFETY: the machine's page tables serve this manager alone, and its flush reaches every CPU that runs.
    let vm = unsafe { manager(machine, frames, tlb, cached()) };
    let first = vm.vmalloc(PAGE).unwrap();
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    unsafe { vm.vfree(first.as_ptr()) }.unwrap();
    let mut live = Vec::new();
    let mut reused = false;
    for round in 0..1200 {
        if round == 600 {
            vm.purge();
        }
        let ptr = vm.vmalloc(PAGE).unwrap();
        live.push(ptr);
        if ptr == first {
            // A full block may have flushed its CPU's lazy list to make room.
            assert!(
                tlb.flushes.load(Ordering::Relaxed) > 0,
                "reused before any flush"
            );
            reused = true;
            break;
        }
    }
    assert!(reused, "a flushed range is carved again");
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    live.iter()
        .for_each(|ptr| unsafe { vm.vfree(ptr.as_ptr()) }.unwrap());
}

#[test]
fn listings_show_the_zone_and_every_small_area_with_its_caller_in_address_order() {
    let (machine, frames, tlb) = smp_machine(1);
    // SAFETY: the machine's page tables serve this manager alone, and its flush reaches every CPU that runs.
    let vm = unsafe { manager(machine, frames, tlb, cached()) };
    let zone = zone(&vm);
    let labelled = VmOptions {
        tag: "big",
        ..VmOptions::default()
    };
    let big = vm.vmalloc_with(40 * PAGE, &labelled).unwrap();
    let small: Vec<_> = (0..40)
        .map(|i| vm.vmalloc((1 + i % 3) * PAGE).unwrap())
        .collect();
    let listed: Vec<_> = vm.areas().collect();
    // The zone, every small area, and the labelled one; listed in batches, so the
    // walk through the zone resumes in the middle of it.
    assert_eq!(listed.len(), 2 + small.len());
    // The zone's line comes first, at the start of its first area.
    assert!(listed.windows(2).all(|pair| pair[0].start < pair[1].start
        || (pair[0].tag == "vmap_blocks" && pair[0].start == pair[1].start)));
    assert_eq!(
        listed
            .iter()
            .filter(|area| area.tag == "vmap_blocks")
            .count(),
        1
    );
    for ptr in &small {
        let area = listed
            .iter()
            .find(|area| area.start == addr(*ptr) && area.tag.is_empty())
            .unwrap();
        assert!(zone.contains(&area.start.as_u64()));
        assert!(area.caller.unwrap().file().ends_with("blocks.rs"), "{area}");
        assert_eq!(vm.find_vm_area(area.start), Some(*area));
    }
    assert!(listed.iter().any(|area| area.start == addr(big)));
    let info = format!("{}", vm.info());
    assert_eq!(
        info.lines()
            .filter(|line| line.ends_with(" vmalloc"))
            .count(),
        41
    );
    assert!(format!("{}", vm.stats()).contains("BlockAreas:             40"));
}

/// With only `k` frames free, for every `k` until it succeeds, a small area is made
/// on a CPU whose cache, block and descriptor do not exist yet. Each failure takes
/// no frame but those of the per-CPU structures it made, which stay for the
/// manager's life and are counted as bookkeeping and page tables; nothing else
/// changes.
#[test]
fn running_out_while_making_the_first_small_area_keeps_only_the_per_cpu_structures() {
    let (machine, frames, tlb) = smp_machine(1);
    for k in 0.. {
        // SAFETY: the machine's page tables serve this manager alone, and its flush reaches every CPU that runs.
        let vm = unsafe { manager(machine, frames, tlb, cached()) };
        let before = (vm.stats(), vm.areas().collect::<Vec<_>>());
        let mut held =
            vec![PhysFrame::containing_address(PhysAddr::zero()); frames.stats().free as usize - k];
        assert_eq!(frames.alloc_frames(&mut held), held.len());
        let result = vm.vmalloc(3 * PAGE);
        let after = vm.stats();
        // SAFETY: frames the test took and no longer uses (or a bad free, refused).
        unsafe { frames.free_frames(&held) }.unwrap();
        match result {
            Err(error) => {
                assert_eq!(error, Error::OutOfFrames, "{k} frames free");
                assert_eq!(vm.areas().collect::<Vec<_>>(), before.1, "{k} frames free");
                let structures = (after.bookkeeping_frames - before.0.bookkeeping_frames)
                    + (after.page_table_frames - before.0.page_table_frames);
                assert_eq!(
                    VmallocStats {
                        bookkeeping_frames: before.0.bookkeeping_frames,
                        page_table_frames: before.0.page_table_frames,
                        bookkeeping_free_slots: before.0.bookkeeping_free_slots,
                        ..after
                    },
                    before.0,
                    "{k} frames free"
                );
                assert!(structures <= k as u64, "{k} frames free");
                assert_frames_conserved(&after, frames);
            }
            Ok(ptr) => {
                assert!(k > 0);
                // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
                unsafe { vm.vfree(ptr.as_ptr()) }.unwrap();
                break;
            }
        }
    }
}

#[test]
fn eager_mode_flushes_and_returns_a_block_areas_frames_at_once_as_a_tree_areas() {
    let (machine, frames, tlb) = smp_machine(1);
    let config = VmallocConfig {
        eager: true,
        ..cached()
    };
    // SAFETY: the machine's page tables serve this manager alone, and its flush reaches every CPU that runs.
    let vm = unsafe { manager(machine, frames, tlb, config) };
    for pages in [2, 20] {
        let ptr = area_of(&vm, pages);
        // SAFETY: bytes the test owns: no live Rust value lives there.
        unsafe { machine.write(addr(ptr), b"cached") }.unwrap();
        let before = vm.stats();
        // SAFETY: not used again (the reads below go through the MMU).
        unsafe { vm.vfree(ptr.as_ptr()) }.unwrap();
        let mut back = [0; 6];
        assert!(
            machine.read(addr(ptr), &mut back).is_err(),
            "{pages} pages: the calling CPU no longer reads the page"
        );
        let stats = vm.stats();
        assert_eq!(
            stats.pending_purge_frames, 0,
            "{pages} pages: nothing waits"
        );
        assert_eq!(stats.data_frames, before.data_frames - pages as u64);
        assert_frames_conserved(&stats, frames);
    }
}

#[test]
fn a_shrunk_block_area_reads_zero_where_it_grows_back_and_its_freed_pages_are_reused() {
    let (machine, frames, tlb) = smp_machine(1);
    // SAFETY: the machine's page tables serve this manager alone, and its flush reaches every CPU that runs.
    let vm = unsafe { manager(machine, frames, tlb, cached()) };
    // Frames that held data: what is not zeroed shows 0xee.
    common::dirty_free_frames(machine, frames, 0xee);
    let ptr = vm.vzalloc(6 * PAGE).unwrap();
    // SAFETY: bytes the test owns: no live Rust value lives there.
    unsafe { machine.write(addr(ptr), &[0xee; 6 * PAGE]) }.unwrap();
    // SAFETY: the old pages past the new size are not used again.
    let shrunk = unsafe { vm.vrealloc(ptr.as_ptr(), PAGE + 100) }.unwrap();
    assert_eq!(shrunk, ptr);
    let mut tail = [0xff; 100];
    machine
        .read(addr(ptr) + (PAGE + 100) as u64, &mut tail)
        .unwrap();
    assert_eq!(
        tail, [0; 100],
        "the dropped bytes of the kept page are zero"
    );
    assert!(
        machine
            .read(addr(ptr) + 2 * PAGE as u64, &mut tail)
            .is_err(),
        "the new guard page"
    );
    // SAFETY: as above.
    let grown = unsafe { vm.vrealloc(ptr.as_ptr(), 6 * PAGE) }.unwrap();
    let mut back = vec![0xff; 6 * PAGE];
    machine.read(addr(grown), &mut back).unwrap();
    assert!(back[..PAGE + 100].iter().all(|&b| b == 0xee), "kept");
    assert!(back[PAGE + 100..].iter().all(|&b| b == 0), "regrown zeroed");
    // The pages the shrink freed are free again: an area fits there now.
    let next = vm.vmalloc(2 * PAGE).unwrap();
    assert!(zone(&vm).contains(&(next.as_ptr() as u64)));
    // SAFETY: not used again.
    unsafe {
        vm.vfree(grown.as_ptr()).unwrap();
        vm.vfree(next.as_ptr()).unwrap();
    }
    vm.purge();
    assert_frames_conserved(&vm.stats(), frames);
}

#[test]
fn block_and_tree_areas_refuse_the_same_bad_pointers_and_calls() {
    let (machine, frames, tlb) = smp_machine(1);
    // SAFETY: the machine's page tables serve this manager alone, and its flush reaches every CPU that runs.
    let vm = unsafe { manager(machine, frames, tlb, cached()) };
    for pages in [3, 30] {
        let ptr = area_of(&vm, pages);
        let interior = ptr.as_ptr().wrapping_add(8);
        let guard = ptr.as_ptr().wrapping_add(pages * PAGE);
        let stats = vm.stats();
        // SAFETY: every call below is refused; the area stays live and unused.
        unsafe {
            assert_eq!(vm.vfree(interior), Err(Error::InteriorPointer), "{pages}");
            assert_eq!(vm.vfree(guard), Err(Error::NotAllocated), "{pages}");
            assert_eq!(
                vm.vrealloc(interior, PAGE).err(),
                Some(Error::InteriorPointer)
            );
            assert_eq!(
                vm.set_prot(interior, Prot::READ),
                Err(Error::InteriorPointer)
            );
            assert_eq!(
                vm.set_prot(ptr.as_ptr(), Prot::all()),
                Err(Error::WriteExecute)
            );
            assert_eq!(vm.vunmap(ptr.as_ptr(), |_| {}), Err(Error::WrongKind));
            assert_eq!(vm.iounmap(ptr.as_ptr()), Err(Error::WrongKind));
        }
        // SAFETY: the test's own area: nothing relies on its pages staying unmapped.
        assert_eq!(
            unsafe { vm.populate(ptr.as_ptr(), PAGE) },
            Err(Error::WrongKind)
        );
        assert_eq!(vm.stats(), stats, "{pages} pages: nothing changed");
        // SAFETY: not used again; the second call is refused.
        unsafe {
            vm.vfree(ptr.as_ptr()).unwrap();
            assert_eq!(vm.vfree(ptr.as_ptr()), Err(Error::NotAllocated), "{pages}");
            assert_eq!(
                vm.vrealloc(ptr.as_ptr(), PAGE).err(),
                Some(Error::NotAllocated)
            );
        }
    }
}

/// A live area's recorded caller is its own however its neighbours change: shrinking
/// the area before it by one page leaves a freed record on the old guard page,
/// beside it, and taking that record back once flushed forgot the neighbour's caller
/// (its listing, `allocinfo` and fault diagnosis lost it).
/// A shrink by a CPU that does not own the block leaves the dropped pages waiting
/// for the owner: a fault there is in no area (as past a shrunk tree area's guard),
/// not a use after free of an area that never was, nor one charged to the call that
/// made a neighbour freed long ago; the new guard page is still the area's.
#[test]
fn a_fault_in_the_pages_another_cpu_shrank_off_an_area_is_in_no_area() {
    use vmalloc::vmalloc::FaultSite;
    let (machine, frames, tlb) = smp_machine(2);
    // SAFETY: the machine's page tables serve this manager alone, and its flush reaches every CPU that runs.
    let vm = unsafe { manager(machine, frames, tlb, cached()) };
    // Block pages: d at 0..4 (guard 4), c at 5 (guard 6); then d shrinks to one page
    // on CPU 1 (pages 2..=4 dropped, 1 its new guard) and c is freed and flushed.
    let d = vm.vmalloc(4 * PAGE).unwrap();
    let c = vm.vmalloc(PAGE).unwrap();
    assert_eq!(addr(c) - addr(d), 5 * PAGE as u64);
    // One thread: the CPU it does not run as is offline, or no one would serve the
    // shootdowns sent to it.
    machine.cpu(0).go_offline();
    // SAFETY: d is this test's area, not used afterwards but through its return.
    machine
        .cpu(1)
        .run(|_| unsafe { vm.vrealloc(d.as_ptr(), PAGE) }.unwrap());
    machine.cpu(1).go_offline();
    machine.cpu(0).go_online();
    // SAFETY: c is this test's area, not used afterwards.
    unsafe { vm.vfree(c.as_ptr()) }.unwrap();
    vm.purge();
    let site = |page: u64| {
        let at = addr(d) + page * PAGE as u64 + 8;
        vm.diagnose_fault(at, PageFaultErrorCode::empty()).site
    };
    assert!(
        matches!(site(1), FaultSite::Guard { area, .. } if area.start == addr(d)),
        "{:?}",
        site(1)
    );
    for page in 2..=4 {
        assert!(
            matches!(site(page), FaultSite::Unmapped),
            "page {page}: {:?}",
            site(page)
        );
    }
}

#[test]
fn shrinking_an_area_by_one_page_keeps_the_next_areas_caller() {
    let (machine, frames, tlb) = smp_machine(1);
    // SAFETY: the machine's page tables serve this manager alone, and its flush reaches every CPU that runs.
    let vm = unsafe { manager(machine, frames, tlb, cached()) };
    // Block pages: a at 0 (guard 1), b at 2..4 (guard 4), c at 5 (guard 6).
    let a = addr(vm.vmalloc(PAGE).unwrap());
    let b = vm.vmalloc(2 * PAGE).unwrap();
    let c = addr(vm.vmalloc(PAGE).unwrap());
    assert_eq!(
        (addr(b) - a, c - addr(b)),
        (2 * PAGE as u64, 3 * PAGE as u64)
    );
    let caller = |at| vm.find_vm_area(at).and_then(|area| area.caller);
    let made = caller(c);
    assert!(made.is_some());
    // SAFETY: b is this test's area, not used afterwards but through its return.
    let shrunk = unsafe { vm.vrealloc(b.as_ptr(), PAGE) }.unwrap();
    assert_eq!(shrunk, b);
    // The dropped page's record is taken back after its flush.
    vm.purge();
    let _ = vm.vmalloc(PAGE).unwrap();
    assert_eq!(caller(c), made, "c's caller");
    let listed = vm
        .areas()
        .find(|area| area.start == c)
        .map(|area| area.caller);
    assert_eq!(listed, Some(made));
}

/// A block area freed and flushed while no CPU's cache held its block (a purge had
/// released it) is still a use after free, until the block carves its range again;
/// the diagnosis says so without claiming it waits for a purge that is done.
/// (It said "freed and waiting for the purge" with nothing pending.)
#[test]
fn a_freed_block_area_is_a_use_after_free_until_its_range_is_carved_again() {
    let (machine, frames, tlb) = smp_machine(1);
    // SAFETY: the machine's page tables serve this manager alone.
    let vm = unsafe { manager(machine, frames, tlb, cached()) };
    let freed = vm.vmalloc(PAGE).unwrap();
    let keep = vm.vmalloc(PAGE).unwrap();
    // Releases CPU 0's block: the free below finds it owned by no cache.
    vm.purge();
    // SAFETY: nothing uses the area after this.
    unsafe { vm.vfree(freed.as_ptr()) }.unwrap();
    vm.purge();
    let stats = vm.stats();
    assert_eq!(
        (stats.pending_purge_pages, stats.pending_purge_frames),
        (0, 0),
        "{stats:?}"
    );
    let diagnosis = vm.diagnose_fault(addr(freed), PageFaultErrorCode::CAUSED_BY_WRITE);
    let text = diagnosis.to_string();
    assert!(
        matches!(diagnosis.site, vmalloc::vmalloc::FaultSite::Freed { .. })
            && text.ends_with("freed (its range not reused yet)"),
        "{text}"
    );
    // SAFETY: nothing uses the area after this.
    unsafe { vm.vfree(keep.as_ptr()) }.unwrap();
}

/// A small `vmalloc` that runs out of frames on a CPU's first use of the caches
/// leaves nothing behind: the CPU's cache state it made (two bookkeeping frames,
/// taking the last two) goes back with the failure. It stayed until the manager
/// was dropped.
#[test]
fn a_failed_first_small_vmalloc_keeps_no_bookkeeping() {
    let (machine, frames, tlb) = smp_machine(1);
    // SAFETY: the machine's page tables serve this manager alone.
    let vm = unsafe { manager(machine, frames, tlb, cached()) };
    for left in 0..4 {
        let mut held = Vec::new();
        let mut chunk = [PhysFrame::containing_address(PhysAddr::zero()); 4096];
        while frames.stats().free > left {
            let want = ((frames.stats().free - left) as usize).min(chunk.len());
            let got = frames.alloc_frames(&mut chunk[..want]);
            held.extend_from_slice(&chunk[..got]);
        }
        let before = (frames.stats().free, vm.stats());
        let result = vm.vmalloc(PAGE);
        if result.is_err() {
            assert_eq!(
                (frames.stats().free, vm.stats()),
                before,
                "{left} frames left: a failed vmalloc kept frames"
            );
        }
        if let Ok(area) = result {
            // SAFETY: made above, freed once.
            unsafe { vm.vfree(area.as_ptr()) }.unwrap();
        }
        vm.purge();
        // SAFETY: frames the test took and does not use.
        unsafe { frames.free_frames(&held) }.unwrap();
        vm.drain_cpu_caches();
    }
}
