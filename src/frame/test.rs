//! The bitmap allocator's own calls (one frame, bulk, contiguous runs, double
//! frees), its lock and fault injection; helpers the other frame tests share.
//! Memory maps, zones and `from_memory` are in `test_map.rs`, reclaimable memory in
//! `test_reclaim.rs`, the per-CPU lists in `test_percpu.rs`.

extern crate std;

use super::*;
use std::collections::BTreeSet;
use std::vec;
use std::vec::Vec;
use x86_64::PhysAddr;
use x86_64::structures::paging::{FrameAllocator, FrameDeallocator, PhysFrame};

pub(super) const K: u64 = 1024;
pub(super) const M: u64 = 1024 * K;
pub(super) const FRAME: u64 = 4096;

pub(super) fn frame(number: u64) -> PhysFrame {
    PhysFrame::containing_address(PhysAddr::new(number * FRAME))
}

pub(super) fn storage_for(map: &[MemoryRegion]) -> Vec<u64> {
    vec![0; BitmapFrameAllocator::storage_words(map.iter().cloned())]
}

/// Every frame the allocator hands out, one at a time, until it runs dry.
pub(super) fn drain(alloc: &mut BitmapFrameAllocator) -> Vec<u64> {
    core::iter::from_fn(|| alloc.alloc())
        .map(|f| f.start_address().as_u64() / FRAME)
        .collect()
}

pub(super) fn build<'s>(
    map: &[MemoryRegion],
    storage: &'s mut Vec<u64>,
) -> BitmapFrameAllocator<'s> {
    *storage = storage_for(map);
    BitmapFrameAllocator::with_storage(map.iter().cloned(), storage).unwrap()
}

#[test]
fn every_frame_is_handed_out_once_and_stats_follow() {
    // Enough frames for three bitmap levels.
    let map = [MemoryRegion::usable(FRAME, 300_001 * FRAME)];
    let mut storage = Vec::new();
    let mut alloc = build(&map, &mut storage);
    let handed = drain(&mut alloc);
    assert_eq!(handed.len(), 300_000);
    assert_eq!(handed.iter().collect::<BTreeSet<_>>().len(), 300_000);
    assert_eq!(alloc.stats().free, 0);
    assert_eq!(alloc.stats().used, 300_000);
    // SAFETY: frames the test took and no longer uses (or a bad free, refused).
    unsafe { alloc.free(frame(123_456)) }.unwrap();
    assert_eq!(alloc.alloc(), Some(frame(123_456)));
}

#[test]
fn free_refuses_double_free_and_unmanaged_frames() {
    let map = [MemoryRegion::usable(0, 8 * FRAME)];
    let mut storage = Vec::new();
    let mut alloc = build(&map, &mut storage);
    let taken = alloc.alloc().unwrap();
    let before = alloc.stats();
    assert_eq!(
        // SAFETY: frames the test took and no longer uses (or a bad free, refused).
        unsafe { alloc.free(frame(5)) },
        Err(Error::FrameNotAllocated)
    );
    // SAFETY: frames the test took and no longer uses (or a bad free, refused).
    assert_eq!(unsafe { alloc.free(frame(8)) }, Err(Error::FrameNotManaged));
    assert_eq!(alloc.stats(), before);
    assert_eq!(alloc.is_free(taken), Ok(false));
    // SAFETY: frames the test took and no longer uses (or a bad free, refused).
    unsafe { alloc.free(taken) }.unwrap();
    // SAFETY: frames the test took and no longer uses (or a bad free, refused).
    assert_eq!(unsafe { alloc.free(taken) }, Err(Error::FrameNotAllocated));
    assert_eq!(alloc.is_free(taken), Ok(true));
}

#[test]
fn alloc_from_starts_at_the_hint_and_wraps() {
    let map = [MemoryRegion::usable(0, 200 * FRAME)];
    let mut storage = Vec::new();
    let mut alloc = build(&map, &mut storage);
    assert_eq!(alloc.alloc_from(frame(150)), Some(frame(150)));
    assert_eq!(alloc.alloc_from(frame(150)), Some(frame(151)));
    // Frame 0 is never handed out.
    assert_eq!(alloc.alloc_from(frame(5000)), Some(frame(1)));
    for n in 198..200 {
        assert_eq!(alloc.alloc_from(frame(198)), Some(frame(n)));
    }
    assert_eq!(alloc.alloc_from(frame(199)), Some(frame(2)));
}

#[test]
fn alloc_bulk_fills_from_the_front_and_reports_shortfall() {
    let map = [
        MemoryRegion::usable(FRAME, 101 * FRAME),
        MemoryRegion::usable(1 << 40, (1 << 40) + 50 * FRAME),
    ];
    let mut storage = Vec::new();
    let mut alloc = build(&map, &mut storage);
    alloc.alloc().unwrap();
    let mut out = vec![frame(0); 200];
    assert_eq!(alloc.alloc_bulk(&mut out[..10]), 10);
    assert_eq!(out[..10], (2..12).map(frame).collect::<Vec<_>>()[..]);
    let got = alloc.alloc_bulk(&mut out);
    assert_eq!(got, 139);
    assert_eq!(alloc.stats().free, 0);
    let all: BTreeSet<_> = out[..got].iter().collect();
    assert_eq!(all.len(), got);
    assert!(out[..got].iter().all(|f| alloc.is_free(*f) == Ok(false)));
}

#[test]
fn free_bulk_is_all_or_nothing() {
    let map = [MemoryRegion::usable(0, 64 * FRAME)];
    let mut storage = Vec::new();
    let mut alloc = build(&map, &mut storage);
    let mut held = vec![frame(0); 4];
    alloc.alloc_bulk(&mut held);
    let before = alloc.stats();
    let dup = [held[0], held[1], held[0]];
    assert_eq!(
        // SAFETY: frames the test took and no longer uses (or a bad free, refused).
        unsafe { alloc.free_bulk(&dup) },
        Err(Error::FrameNotAllocated)
    );
    let unmanaged = [held[2], frame(1000)];
    assert_eq!(
        // SAFETY: frames the test took and no longer uses (or a bad free, refused).
        unsafe { alloc.free_bulk(&unmanaged) },
        Err(Error::FrameNotManaged)
    );
    assert_eq!(alloc.stats(), before);
    assert!(held.iter().all(|f| alloc.is_free(*f) == Ok(false)));
    // SAFETY: frames the test took and no longer uses (or a bad free, refused).
    unsafe { alloc.free_bulk(&held) }.unwrap();
    assert_eq!(alloc.stats().used, 0);
}

#[test]
fn frames_sharing_a_bitmap_word_come_back_with_one_write_and_still_all_or_nothing() {
    // Frames 100..400 usable, 50..60 reserved inside a word: runs cross words and
    // touch unmanaged frames.
    let map = [
        MemoryRegion::usable(0, 400 * FRAME),
        MemoryRegion::reserved(50 * FRAME, 60 * FRAME),
    ];
    let mut storage = Vec::new();
    let mut alloc = build(&map, &mut storage);
    let all: Vec<PhysFrame> = core::iter::from_fn(|| alloc.alloc()).collect();
    let free_before = alloc.stats().free;
    let run: Vec<PhysFrame> = (70..300).map(frame).collect();

    // A run with one frame already free in the middle: refused, nothing freed.
    // SAFETY: frames the test took and no longer uses (or a bad free, refused).
    unsafe { alloc.free(frame(200)) }.unwrap();
    assert_eq!(
        // SAFETY: frames the test took and no longer uses (or a bad free, refused).
        unsafe { alloc.free_bulk(&run) },
        Err(Error::FrameNotAllocated)
    );
    assert_eq!(alloc.stats().free, free_before + 1);
    assert!(!alloc.is_free(frame(150)).unwrap() && !alloc.is_free(frame(250)).unwrap());
    alloc.alloc_contiguous(1, 1).unwrap(); // frame 0..: takes back the lowest free
    assert!(!alloc.is_free(frame(200)).unwrap());

    // Across the reserved frames: refused as unmanaged, nothing freed.
    let across: Vec<PhysFrame> = (40..70).map(frame).collect();
    assert_eq!(
        // SAFETY: frames the test took and no longer uses (or a bad free, refused).
        unsafe { alloc.free_bulk(&across) },
        Err(Error::FrameNotManaged)
    );
    assert_eq!(alloc.stats().free, free_before);

    // Frames of one word, not consecutive, one listed twice: refused as a double free.
    let twice: Vec<PhysFrame> = [130, 133, 140, 133, 150].map(frame).to_vec();
    assert_eq!(
        // SAFETY: frames the test took and no longer uses (or a bad free, refused).
        unsafe { alloc.free_bulk(&twice) },
        Err(Error::FrameNotAllocated)
    );
    assert_eq!(alloc.stats().free, free_before);
    let spread: Vec<PhysFrame> = [130, 133, 140, 150, 191, 192].map(frame).to_vec();
    // SAFETY: frames the test took and no longer uses (or a bad free, refused).
    unsafe { alloc.free_bulk(&spread) }.unwrap();
    assert_eq!(alloc.stats().free, free_before + 6);
    assert!(spread.iter().all(|&f| alloc.is_free(f) == Ok(true)));
    assert_eq!(alloc.is_free(frame(131)), Ok(false));
    for _ in 0..6 {
        alloc.alloc().unwrap();
    }
    assert_eq!(alloc.stats().free, free_before);

    // The run, then the rest: every frame free again, and each handed out once more.
    // SAFETY: frames the test took and no longer uses (or a bad free, refused).
    unsafe { alloc.free_bulk(&run) }.unwrap();
    assert_eq!(alloc.stats().free, free_before + run.len() as u64);
    assert_eq!(
        // SAFETY: frames the test took and no longer uses (or a bad free, refused).
        unsafe { alloc.free_bulk(&run[5..7]) },
        Err(Error::FrameNotAllocated)
    );
    let rest: Vec<PhysFrame> = all.iter().copied().filter(|f| !run.contains(f)).collect();
    // SAFETY: frames the test took and no longer uses (or a bad free, refused).
    unsafe { alloc.free_bulk(&rest) }.unwrap();
    let mut again = drain(&mut alloc);
    again.sort_unstable();
    let mut expected: Vec<u64> = all
        .iter()
        .map(|f| f.start_address().as_u64() / FRAME)
        .collect();
    expected.sort_unstable();
    assert_eq!(again, expected);
}

#[test]
fn alloc_contiguous_returns_aligned_free_runs() {
    let map = [MemoryRegion::usable(FRAME, 8 * M)];
    let mut storage = Vec::new();
    let mut alloc = build(&map, &mut storage);
    alloc.alloc().unwrap();
    let huge = alloc.alloc_contiguous(512, 512).unwrap();
    assert_eq!(huge.start_address().as_u64(), 2 * M);
    let run = alloc.alloc_contiguous(3, 1).unwrap();
    assert_eq!(run, frame(2));
    assert_eq!(alloc.stats().used, 1 + 512 + 3);
    for n in 0..512 {
        assert_eq!(alloc.is_free(frame(512 + n)), Ok(false));
    }
    assert_eq!(alloc.alloc_contiguous(0, 1), Err(Error::ZeroSize));
    assert_eq!(alloc.alloc_contiguous(1, 3), Err(Error::BadAlignment));
    let before = alloc.stats();
    assert_eq!(alloc.alloc_contiguous(2048, 1), Err(Error::OutOfFrames));
    assert_eq!(alloc.alloc_contiguous(1, 1 << 40), Err(Error::OutOfFrames));
    assert_eq!(alloc.stats(), before);
    // The rest comes out one frame at a time, never a frame of the runs.
    let rest = drain(&mut alloc);
    assert_eq!(rest.len() as u64, before.free);
    assert!(
        rest.iter()
            .all(|&n| !(512..1024).contains(&n) && !(1..5).contains(&n))
    );
    assert_eq!(rest.iter().collect::<BTreeSet<_>>().len(), rest.len());
}

#[test]
fn alloc_contiguous_skips_holes() {
    let map = [
        MemoryRegion::usable(FRAME, 65 * FRAME),
        MemoryRegion::reserved(11 * FRAME, 12 * FRAME),
    ];
    let mut storage = Vec::new();
    let mut alloc = build(&map, &mut storage);
    assert_eq!(alloc.alloc_contiguous(12, 1), Ok(frame(12)));
    assert_eq!(alloc.alloc_contiguous(10, 1), Ok(frame(1)));
    assert_eq!(alloc.alloc_contiguous(42, 1), Err(Error::OutOfFrames));
    assert_eq!(alloc.alloc_contiguous(41, 1), Ok(frame(24)));
}

#[test]
fn x86_64_traits_allocate_and_deallocate() {
    let map = [MemoryRegion::usable(0, 4 * FRAME)];
    let mut storage = Vec::new();
    let mut alloc = build(&map, &mut storage);
    let taken = alloc.allocate_frame().unwrap();
    assert_eq!(alloc.is_free(taken), Ok(false));
    // SAFETY: the frame was just allocated and is not in use.
    unsafe { alloc.deallocate_frame(taken) };
    assert_eq!(alloc.is_free(taken), Ok(true));
}

#[test]
fn locked_allocator_is_a_frame_source() {
    let map = [MemoryRegion::usable(0, 256 * FRAME)];
    let mut storage = storage_for(&map);
    let locked = LockedFrameAllocator::with_storage(map.iter().cloned(), &mut storage).unwrap();
    let source: &dyn FrameSource = &locked;
    let one = source.alloc_frame().unwrap();
    let mut many = vec![frame(0); 100];
    assert_eq!(source.alloc_frames(&mut many), 100);
    assert_eq!(locked.stats().used, 101);
    assert_eq!(
        // SAFETY: frames the test took and no longer uses (or a bad free, refused).
        unsafe { source.free_frames(&[many[0], many[0]]) },
        Err(Error::FrameNotAllocated)
    );
    // SAFETY: frames the test took and no longer uses (or a bad free, refused).
    unsafe { source.free_frames(&many) }.unwrap();
    // SAFETY: frames the test took and no longer uses (or a bad free, refused).
    unsafe { source.free_frame(one) }.unwrap();
    assert_eq!(
        // SAFETY: frames the test took and no longer uses (or a bad free, refused).
        unsafe { source.free_frame(one) },
        Err(Error::FrameNotAllocated)
    );
    assert_eq!(locked.stats().used, 0);
    // Frame 0 is never handed out.
    assert_eq!(locked.alloc_contiguous(4, 4), Ok(frame(4)));
    assert_eq!(locked.alloc_from(frame(100)), Some(frame(100)));
}

#[test]
fn fault_injector_fails_the_chosen_frame_once() {
    let map = [MemoryRegion::usable(0, 256 * FRAME)];
    let mut storage = storage_for(&map);
    let locked = LockedFrameAllocator::with_storage(map.iter().cloned(), &mut storage).unwrap();
    let injector = FaultInjector::new(&locked);
    injector.fail_after(5);
    let mut out = vec![frame(0); 8];
    assert_eq!(injector.alloc_frames(&mut out[..3]), 3);
    assert!(!injector.fired());
    assert_eq!(injector.alloc_frames(&mut out), 2);
    assert!(injector.fired());
    assert_eq!(locked.stats().used, 5);
    assert_eq!(injector.handed_out(), 5);
    assert!(injector.alloc_frame().is_some());
    injector.fail_after(0);
    assert!(injector.alloc_frame().is_none());
    injector.fail_after(0);
    injector.disarm();
    assert!(injector.alloc_frame().is_some());
    assert!(!injector.fired());
    assert_eq!(injector.handed_out(), 7);
    assert_eq!(locked.stats().used, 7);
}

/// Requests the wrapped source cannot serve hand out nothing and count nothing: the
/// failure still comes after the chosen number of frames handed out.
#[test]
fn fault_injector_counts_only_frames_handed_out() {
    // 1 MiB: no 2 MiB run.
    let map = [MemoryRegion::usable(FRAME, 257 * FRAME)];
    let mut storage = storage_for(&map);
    let locked = LockedFrameAllocator::with_storage(map.iter().cloned(), &mut storage).unwrap();
    let injector = FaultInjector::new(&locked);
    injector.fail_after(600);
    assert!(injector.alloc_frame_2m().is_none());
    assert!(!injector.fired());
    // Crossing the failing frame, but the source has no run: nothing fired.
    injector.fail_after(200);
    assert!(injector.alloc_frame_2m().is_none());
    assert!(!injector.fired());
    // The source runs dry before the chosen frame: nothing fired, nothing counted.
    injector.fail_after(300);
    let mut out = vec![frame(0); 280];
    assert_eq!(injector.alloc_frames(&mut out), 256);
    assert!(injector.alloc_frame().is_none());
    assert!(!injector.fired());
    // SAFETY: frames this test took and no longer uses.
    unsafe { locked.free_bulk(&out[..256]) }.unwrap();
    // 44 of the 300 are left: the 45th frame fails.
    assert_eq!(injector.alloc_frames(&mut out[..40]), 40);
    assert_eq!(injector.alloc_frames(&mut out[40..50]), 4);
    assert!(injector.fired());
}

/// The failure of a request the source could not have served either does not
/// happen: a bulk request the source cuts short before the failing frame, a single
/// frame from a dry source. The failure stays armed for the frame it was set for.
#[test]
fn fault_injector_fires_only_where_the_source_could_serve() {
    let map = [MemoryRegion::usable(FRAME, 5 * FRAME)];
    let mut storage = storage_for(&map);
    let locked = LockedFrameAllocator::with_storage(map.iter().cloned(), &mut storage).unwrap();
    let injector = FaultInjector::new(&locked);
    injector.fail_after(5);
    let mut out = vec![frame(0); 10];
    assert_eq!(injector.alloc_frames(&mut out), 4, "all the source has");
    assert!(injector.alloc_frame().is_none(), "the source is dry");
    assert!(!injector.fired());
    // SAFETY: frames this test took and no longer uses.
    unsafe { locked.free_bulk(&out[..4]) }.unwrap();
    assert_eq!(
        injector.alloc_frames(&mut out),
        1,
        "the fifth frame, then the failure"
    );
    assert!(injector.fired());
    assert_eq!(injector.handed_out(), 5);
    assert_eq!(
        locked.stats().free,
        3,
        "the frame seen past the failure went back"
    );
}

/// CPUs sharing an injector: of exactly `n + 1` allocations, the first `n` succeed
/// and the last fails, whichever CPU makes them (a count-down lost between two
/// CPUs moved the failure later, or made it fire twice).
#[test]
fn a_fault_injector_shared_by_threads_fails_exactly_the_chosen_frame() {
    let map = [MemoryRegion::usable(0, 64 * M)];
    let mut storage = storage_for(&map);
    let locked = LockedFrameAllocator::with_storage(map.iter().cloned(), &mut storage).unwrap();
    let injector = FaultInjector::new(&locked);
    const PER_THREAD: u64 = 20_000;
    for round in 0..10 {
        injector.fail_after(2 * PER_THREAD - 1);
        let failures = std::sync::atomic::AtomicU64::new(0);
        let start = std::sync::Barrier::new(2);
        std::thread::scope(|scope| {
            for _ in 0..2 {
                scope.spawn(|| {
                    start.wait();
                    for _ in 0..PER_THREAD {
                        match injector.alloc_frame() {
                            // SAFETY: just taken, unused.
                            Some(frame) => unsafe { injector.free_frame(frame) }.unwrap(),
                            None => {
                                failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                        }
                    }
                });
            }
        });
        let failures = failures.into_inner();
        assert_eq!(failures, 1, "round {round}");
        assert!(injector.fired(), "round {round}");
    }
    assert_eq!(injector.handed_out(), 10 * (2 * PER_THREAD - 1));
}

#[test]
fn memory_regions_are_cut_off_at_the_52_bit_physical_space() {
    let last = crate::boot::PHYS_LIMIT - 1;
    let top = MemoryRegion::usable(1 << 40, 1 << 52);
    assert_eq!(
        (top.range.start.as_u64(), top.range.end.as_u64()),
        (1 << 40, last)
    );
    let above = MemoryRegion::reserved(1 << 60, u64::MAX);
    assert_eq!(
        (above.range.start.as_u64(), above.range.end.as_u64()),
        (last, last)
    );
    let reclaim = MemoryRegion::reclaimable(u64::MAX, u64::MAX, Reclaim::Acpi);
    assert!(reclaim.range.is_empty());
}
