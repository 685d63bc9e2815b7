extern crate std;

use super::*;
use crate::phys::PhysMemory;
use std::collections::BTreeSet;
use std::vec;
use std::vec::Vec;
use x86_64::PhysAddr;
use x86_64::structures::paging::{FrameAllocator, FrameDeallocator, PhysFrame};

const K: u64 = 1024;
const M: u64 = 1024 * K;
const FRAME: u64 = 4096;

fn frame(number: u64) -> PhysFrame {
    PhysFrame::containing_address(PhysAddr::new(number * FRAME))
}

fn storage_for(map: &[MemoryRegion]) -> Vec<u64> {
    vec![0; BitmapFrameAllocator::storage_words(map.iter().cloned())]
}

/// Every frame the allocator hands out, one at a time, until it runs dry.
fn drain(alloc: &mut BitmapFrameAllocator) -> Vec<u64> {
    core::iter::from_fn(|| alloc.alloc())
        .map(|f| f.start_address().as_u64() / FRAME)
        .collect()
}

fn build<'s>(map: &[MemoryRegion], storage: &'s mut Vec<u64>) -> BitmapFrameAllocator<'s> {
    *storage = storage_for(map);
    BitmapFrameAllocator::with_storage(map.iter().cloned(), storage).unwrap()
}

#[test]
fn unaligned_ends_are_rounded_inward() {
    let map = [MemoryRegion::usable(FRAME + 1, 5 * FRAME - 1)];
    let mut storage = Vec::new();
    let mut alloc = build(&map, &mut storage);
    // Frame 1 starts before the range and frame 4 ends after it.
    assert_eq!(alloc.stats().total, 2);
    assert_eq!(drain(&mut alloc), vec![2, 3]);
}

#[test]
fn zero_length_and_sub_frame_ranges_are_ignored() {
    let map = [
        MemoryRegion::usable(0, 0),
        MemoryRegion::usable(10 * FRAME + 5, 10 * FRAME + 100),
        MemoryRegion::usable(20 * FRAME, 22 * FRAME),
    ];
    let mut storage = Vec::new();
    let mut alloc = build(&map, &mut storage);
    assert_eq!(drain(&mut alloc), vec![20, 21]);
}

#[test]
fn overlapping_usable_ranges_count_once() {
    let map = [
        MemoryRegion::usable(0, 8 * FRAME),
        MemoryRegion::usable(4 * FRAME, 12 * FRAME),
        MemoryRegion::usable(2 * FRAME, 3 * FRAME),
    ];
    let mut storage = Vec::new();
    let mut alloc = build(&map, &mut storage);
    assert_eq!(alloc.stats().total, 12);
    assert_eq!(drain(&mut alloc), (0..12).collect::<Vec<_>>());
}

#[test]
fn reserved_wins_over_usable_and_rounds_outward() {
    let map = [
        MemoryRegion::usable(0, 16 * FRAME),
        MemoryRegion::reserved(4 * FRAME + 10, 6 * FRAME + 1),
        MemoryRegion::usable(5 * FRAME, 6 * FRAME),
    ];
    let mut storage = Vec::new();
    let mut alloc = build(&map, &mut storage);
    let handed: Vec<u64> = drain(&mut alloc);
    let expected: Vec<u64> = (0..16).filter(|n| !(4..7).contains(n)).collect();
    assert_eq!(handed, expected);
    assert_eq!(alloc.free(frame(5)), Err(Error::FrameNotManaged));
    assert_eq!(alloc.is_free(frame(5)), Err(Error::FrameNotManaged));
}

#[test]
fn no_usable_memory_is_a_bad_map() {
    let maps: [&[MemoryRegion]; 3] = [
        &[],
        &[MemoryRegion::usable(100, 4000)],
        &[
            MemoryRegion::usable(0, 4 * FRAME),
            MemoryRegion::reserved(0, 4 * FRAME),
        ],
    ];
    for map in maps {
        let mut storage = vec![0; 64];
        let result = BitmapFrameAllocator::with_storage(map.iter().cloned(), &mut storage);
        assert_eq!(result.err(), Some(Error::BadMemoryMap), "{map:?}");
    }
}

#[test]
fn too_small_storage_is_refused() {
    let map = [MemoryRegion::usable(0, 64 * M)];
    let words = BitmapFrameAllocator::storage_words(map.iter().cloned());
    let mut storage = vec![0; words - 1];
    let result = BitmapFrameAllocator::with_storage(map.iter().cloned(), &mut storage);
    assert_eq!(result.err(), Some(Error::BadMemoryMap));
}

#[test]
fn sparse_map_does_not_span_the_gap() {
    let high = 1u64 << 51;
    let map = [
        MemoryRegion::usable(0, 640 * K),
        MemoryRegion::usable(M, 128 * M),
        MemoryRegion::usable(high, high + 16 * M),
    ];
    let words = BitmapFrameAllocator::storage_words(map.iter().cloned());
    // Two bits per frame of (128 MiB + 16 MiB) plus summaries: far below the
    // 2^39 / 64 words a single bitmap up to 2^51 would need.
    assert!(words < 20_000, "{words} words");
    let mut storage = vec![0; words];
    let mut alloc = BitmapFrameAllocator::with_storage(map.iter().cloned(), &mut storage).unwrap();
    let expected = (640 * K + 127 * M + 16 * M) / FRAME;
    assert_eq!(alloc.stats().total, expected);
    let top = alloc.alloc_from(frame(high / FRAME)).unwrap();
    assert_eq!(top.start_address().as_u64(), high);
    assert_eq!(
        alloc.is_free(frame(200 * M / FRAME)),
        Err(Error::FrameNotManaged)
    );
    assert_eq!(
        alloc.free(frame((high - M) / FRAME)),
        Err(Error::FrameNotManaged)
    );
}

#[test]
fn many_far_apart_ranges_are_merged_into_few_zones() {
    let map: Vec<MemoryRegion> = (0..40u64)
        .map(|i| MemoryRegion::usable(i << 32, (i << 32) + 4 * FRAME))
        .collect();
    let mut storage = Vec::new();
    let mut alloc = build(&map, &mut storage);
    assert_eq!(alloc.stats().total, 160);
    let handed = drain(&mut alloc);
    let expected: Vec<u64> = (0..40u64)
        .flat_map(|i| (0..4).map(move |j| (i << 32) / FRAME + j))
        .collect();
    assert_eq!(handed, expected);
}

#[test]
fn too_many_map_entries_is_a_bad_map() {
    let map: Vec<MemoryRegion> = (0..200u64)
        .map(|i| MemoryRegion::usable(i * 2 * FRAME, (i * 2 + 1) * FRAME))
        .collect();
    assert_eq!(BitmapFrameAllocator::storage_words(map.iter().cloned()), 0);
    let mut storage = vec![0; 1024];
    let result = BitmapFrameAllocator::with_storage(map.iter().cloned(), &mut storage);
    assert_eq!(result.err(), Some(Error::BadMemoryMap));
}

#[test]
fn every_frame_is_handed_out_once_and_stats_follow() {
    // Enough frames for three bitmap levels.
    let map = [MemoryRegion::usable(0, 300_000 * FRAME)];
    let mut storage = Vec::new();
    let mut alloc = build(&map, &mut storage);
    let handed = drain(&mut alloc);
    assert_eq!(handed.len(), 300_000);
    assert_eq!(handed.iter().collect::<BTreeSet<_>>().len(), 300_000);
    assert_eq!(alloc.stats().free, 0);
    assert_eq!(alloc.stats().used, 300_000);
    alloc.free(frame(123_456)).unwrap();
    assert_eq!(alloc.alloc(), Some(frame(123_456)));
}

#[test]
fn free_refuses_double_free_and_unmanaged_frames() {
    let map = [MemoryRegion::usable(0, 8 * FRAME)];
    let mut storage = Vec::new();
    let mut alloc = build(&map, &mut storage);
    let taken = alloc.alloc().unwrap();
    let before = alloc.stats();
    assert_eq!(alloc.free(frame(5)), Err(Error::FrameNotAllocated));
    assert_eq!(alloc.free(frame(8)), Err(Error::FrameNotManaged));
    assert_eq!(alloc.stats(), before);
    assert_eq!(alloc.is_free(taken), Ok(false));
    alloc.free(taken).unwrap();
    assert_eq!(alloc.free(taken), Err(Error::FrameNotAllocated));
    assert_eq!(alloc.is_free(taken), Ok(true));
}

#[test]
fn alloc_from_starts_at_the_hint_and_wraps() {
    let map = [MemoryRegion::usable(0, 200 * FRAME)];
    let mut storage = Vec::new();
    let mut alloc = build(&map, &mut storage);
    assert_eq!(alloc.alloc_from(frame(150)), Some(frame(150)));
    assert_eq!(alloc.alloc_from(frame(150)), Some(frame(151)));
    assert_eq!(alloc.alloc_from(frame(5000)), Some(frame(0)));
    for n in 198..200 {
        assert_eq!(alloc.alloc_from(frame(198)), Some(frame(n)));
    }
    assert_eq!(alloc.alloc_from(frame(199)), Some(frame(1)));
}

#[test]
fn alloc_bulk_fills_from_the_front_and_reports_shortfall() {
    let map = [
        MemoryRegion::usable(0, 100 * FRAME),
        MemoryRegion::usable(1 << 40, (1 << 40) + 50 * FRAME),
    ];
    let mut storage = Vec::new();
    let mut alloc = build(&map, &mut storage);
    alloc.alloc().unwrap();
    let mut out = vec![frame(0); 200];
    assert_eq!(alloc.alloc_bulk(&mut out[..10]), 10);
    assert_eq!(out[..10], (1..11).map(frame).collect::<Vec<_>>()[..]);
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
    assert_eq!(alloc.free_bulk(&dup), Err(Error::FrameNotAllocated));
    let unmanaged = [held[2], frame(1000)];
    assert_eq!(alloc.free_bulk(&unmanaged), Err(Error::FrameNotManaged));
    assert_eq!(alloc.stats(), before);
    assert!(held.iter().all(|f| alloc.is_free(*f) == Ok(false)));
    alloc.free_bulk(&held).unwrap();
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
    alloc.free(frame(200)).unwrap();
    assert_eq!(alloc.free_bulk(&run), Err(Error::FrameNotAllocated));
    assert_eq!(alloc.stats().free, free_before + 1);
    assert!(!alloc.is_free(frame(150)).unwrap() && !alloc.is_free(frame(250)).unwrap());
    alloc.alloc_contiguous(1, 1).unwrap(); // frame 0..: takes back the lowest free
    assert!(!alloc.is_free(frame(200)).unwrap());

    // Across the reserved frames: refused as unmanaged, nothing freed.
    let across: Vec<PhysFrame> = (40..70).map(frame).collect();
    assert_eq!(alloc.free_bulk(&across), Err(Error::FrameNotManaged));
    assert_eq!(alloc.stats().free, free_before);

    // Frames of one word, not consecutive, one listed twice: refused as a double free.
    let twice: Vec<PhysFrame> = [130, 133, 140, 133, 150].map(frame).to_vec();
    assert_eq!(alloc.free_bulk(&twice), Err(Error::FrameNotAllocated));
    assert_eq!(alloc.stats().free, free_before);
    let spread: Vec<PhysFrame> = [130, 133, 140, 150, 191, 192].map(frame).to_vec();
    alloc.free_bulk(&spread).unwrap();
    assert_eq!(alloc.stats().free, free_before + 6);
    assert!(spread.iter().all(|&f| alloc.is_free(f) == Ok(true)));
    assert_eq!(alloc.is_free(frame(131)), Ok(false));
    for _ in 0..6 {
        alloc.alloc().unwrap();
    }
    assert_eq!(alloc.stats().free, free_before);

    // The run, then the rest: every frame free again, and each handed out once more.
    alloc.free_bulk(&run).unwrap();
    assert_eq!(alloc.stats().free, free_before + run.len() as u64);
    assert_eq!(alloc.free_bulk(&run[5..7]), Err(Error::FrameNotAllocated));
    let rest: Vec<PhysFrame> = all.iter().copied().filter(|f| !run.contains(f)).collect();
    alloc.free_bulk(&rest).unwrap();
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
        MemoryRegion::usable(0, 64 * FRAME),
        MemoryRegion::reserved(10 * FRAME, 11 * FRAME),
    ];
    let mut storage = Vec::new();
    let mut alloc = build(&map, &mut storage);
    assert_eq!(alloc.alloc_contiguous(12, 1), Ok(frame(11)));
    assert_eq!(alloc.alloc_contiguous(10, 1), Ok(frame(0)));
    assert_eq!(alloc.alloc_contiguous(42, 1), Err(Error::OutOfFrames));
    assert_eq!(alloc.alloc_contiguous(41, 1), Ok(frame(23)));
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

/// Host memory standing in for physical memory starting at `base`.
struct HostMemory {
    base: u64,
    bytes: *mut u8,
}

// SAFETY: `bytes` points to a live buffer covering every usable frame of the maps
// the tests below use, frames at distinct offsets.
unsafe impl PhysMemory for HostMemory {
    fn phys_to_virt(&self, phys: PhysAddr) -> *mut u8 {
        self.bytes
            .wrapping_add((phys.as_u64() - self.base) as usize)
    }
}

#[test]
fn from_memory_carves_bookkeeping_out_of_usable_frames() {
    let base = 64 * M;
    let size = 64 * M;
    let mut ram: Vec<u64> = vec![!0; (size / 8) as usize];
    let phys = HostMemory {
        base,
        bytes: ram.as_mut_ptr().cast(),
    };
    let map = [
        MemoryRegion::usable(base, base + size),
        MemoryRegion::reserved(base, base + FRAME),
    ];
    let words = BitmapFrameAllocator::storage_words(map.iter().cloned()) as u64;
    let carved = (words * 8).div_ceil(FRAME);
    // SAFETY: `ram` backs the whole usable range and outlives the allocator.
    let mut alloc =
        unsafe { BitmapFrameAllocator::from_memory(map.iter().cloned(), &phys) }.unwrap();
    let usable = size / FRAME - 1;
    assert_eq!(alloc.stats().total, usable - carved);
    let first_carved = frame(base / FRAME + 1);
    assert_eq!(alloc.is_free(first_carved), Err(Error::FrameNotManaged));
    assert_eq!(alloc.free(first_carved), Err(Error::FrameNotManaged));
    let handed = drain(&mut alloc);
    assert_eq!(handed.len() as u64, usable - carved);
    assert_eq!(handed[0], base / FRAME + 1 + carved);
    // `alloc` lives in `ram`, which is dropped only here, after its last use.
    drop(ram);
}

#[test]
fn from_memory_without_room_is_a_bad_map() {
    let mut ram: Vec<u64> = vec![0; 512];
    let phys = HostMemory {
        base: 0,
        bytes: ram.as_mut_ptr().cast(),
    };
    // One frame: the bookkeeping takes it and nothing is left.
    let map = [MemoryRegion::usable(0, FRAME)];
    // SAFETY: `ram` backs the whole usable range and outlives the call.
    let result = unsafe { BitmapFrameAllocator::from_memory(map.iter().cloned(), &phys) };
    assert_eq!(result.err(), Some(Error::BadMemoryMap));
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
        source.free_frames(&[many[0], many[0]]),
        Err(Error::FrameNotAllocated)
    );
    source.free_frames(&many).unwrap();
    source.free_frame(one).unwrap();
    assert_eq!(source.free_frame(one), Err(Error::FrameNotAllocated));
    assert_eq!(locked.stats().used, 0);
    assert_eq!(locked.alloc_contiguous(4, 4), Ok(frame(0)));
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

/// A map with usable memory, an ACPI table and boot-loader data in it, and a
/// reserved frame inside the boot-loader data.
fn map_with_reclaimable() -> [MemoryRegion; 4] {
    [
        MemoryRegion::usable(0, 64 * FRAME),
        MemoryRegion::reclaimable(8 * FRAME + 100, 12 * FRAME, Reclaim::Acpi),
        MemoryRegion::reclaimable(32 * FRAME, 40 * FRAME, Reclaim::Bootloader),
        MemoryRegion::reserved(35 * FRAME, 36 * FRAME),
    ]
}

#[test]
fn reclaimable_memory_is_never_handed_out_before_it_is_reclaimed() {
    let map = map_with_reclaimable();
    let mut storage = Vec::new();
    let mut alloc = build(&map, &mut storage);
    // 64 usable frames less 4 (8..12, frame 8 touched) and 8 (32..40).
    assert_eq!(alloc.stats().total, 52);
    let handed = drain(&mut alloc);
    assert!(
        handed
            .iter()
            .all(|&f| !(8..12).contains(&f) && !(32..40).contains(&f))
    );
    assert!(!alloc.manages(frame(33), 1));
    assert_eq!(alloc.is_free(frame(9)), Err(Error::FrameNotManaged));
    assert_eq!(alloc.free(frame(9)), Err(Error::FrameNotManaged));
}

#[test]
fn reclaim_hands_over_one_source_once_and_never_a_reserved_frame() {
    let map = map_with_reclaimable();
    let mut storage = Vec::new();
    let mut alloc = build(&map, &mut storage);
    let before = alloc.stats();
    // Frame 8 is only partly ACPI's: the other part is usable, but a frame is
    // reclaimed only when wholly inside the range.
    assert_eq!(alloc.reclaim(Reclaim::Acpi), 3);
    assert_eq!(
        alloc.reclaim(Reclaim::Acpi),
        0,
        "a second reclaim frees nothing"
    );
    assert_eq!(alloc.stats().total, before.total + 3);
    assert_eq!(alloc.stats().free, before.free + 3);
    assert_eq!(alloc.is_free(frame(9)), Ok(true));
    assert_eq!(alloc.is_free(frame(33)), Err(Error::FrameNotManaged));
    assert_eq!(alloc.reclaim(Reclaim::Bootloader), 7);
    assert_eq!(alloc.is_free(frame(35)), Err(Error::FrameNotManaged));
    assert_eq!(alloc.reclaim(Reclaim::BootServices), 0);
    let handed = drain(&mut alloc);
    assert!(handed.contains(&9) && handed.contains(&39) && !handed.contains(&35));
    assert_eq!(handed.len() as u64, before.total + 10);
    assert!(alloc.manages(frame(33), 1));
}

#[test]
fn reclaim_range_checks_overlap_and_frees_nothing_twice() {
    let map = map_with_reclaimable();
    let mut storage = Vec::new();
    let mut alloc = build(&map, &mut storage);
    let at = |f: u64| PhysAddr::new(f * FRAME);
    // Part of the boot-loader data: the rest waits.
    assert_eq!(alloc.reclaim_range(at(32)..at(34)), Ok(2));
    assert_eq!(alloc.reclaim_range(at(32)..at(34)), Err(Error::Overlap));
    assert_eq!(alloc.reclaim_range(at(30)..at(34)), Err(Error::Overlap));
    assert_eq!(alloc.reclaim_range(at(34)..at(33)), Err(Error::RangeWraps));
    assert_eq!(
        alloc.reclaim_range(at(35)..at(36)),
        Err(Error::FrameNotManaged)
    );
    assert_eq!(
        alloc.reclaim_range(at(100)..at(200)),
        Err(Error::FrameNotManaged)
    );
    assert_eq!(alloc.reclaim_range(at(34)..at(34)), Ok(0));
    // The whole source: only what is left.
    assert_eq!(alloc.reclaim(Reclaim::Bootloader), 5);
    assert_eq!(alloc.is_free(frame(33)), Ok(true));
}

#[test]
fn a_frame_two_sources_claim_is_never_reclaimed_and_reserved_beats_reclaimable() {
    let map = [
        MemoryRegion::usable(0, 64 * FRAME),
        MemoryRegion::reclaimable(10 * FRAME, 20 * FRAME, Reclaim::Acpi),
        MemoryRegion::reclaimable(18 * FRAME, 30 * FRAME, Reclaim::Bootloader),
        MemoryRegion::reclaimable(40 * FRAME, 50 * FRAME, Reclaim::Acpi),
        MemoryRegion::reserved(40 * FRAME, 50 * FRAME),
    ];
    let mut storage = Vec::new();
    let mut alloc = build(&map, &mut storage);
    assert_eq!(alloc.reclaim(Reclaim::Acpi), 8);
    assert_eq!(alloc.reclaim(Reclaim::Bootloader), 10);
    assert_eq!(alloc.is_free(frame(18)), Err(Error::FrameNotManaged));
    assert_eq!(alloc.is_free(frame(45)), Err(Error::FrameNotManaged));
}

#[test]
fn reclaimable_memory_outside_usable_zones_gets_a_zone() {
    // Boot-services memory far above the usable memory.
    let map = [
        MemoryRegion::usable(0, 64 * FRAME),
        MemoryRegion::reclaimable(1 << 32, (1 << 32) + 16 * FRAME, Reclaim::BootServices),
    ];
    let mut storage = Vec::new();
    let mut alloc = build(&map, &mut storage);
    assert_eq!(alloc.stats().total, 64);
    assert_eq!(alloc.reclaim(Reclaim::BootServices), 16);
    let handed = drain(&mut alloc);
    assert_eq!(handed.len(), 80);
    assert!(handed.contains(&((1 << 32) / FRAME + 15)));
}

#[test]
fn long_maps_of_touching_entries_are_merged_not_refused() {
    // 600 touching usable entries and 600 touching boot-services entries, as a
    // fragmented UEFI map gives them.
    let mut map = Vec::new();
    for i in 0..600u64 {
        map.push(MemoryRegion::usable(i * FRAME, (i + 1) * FRAME));
        let base = 1 << 30;
        map.push(MemoryRegion::reclaimable(
            base + i * FRAME,
            base + (i + 1) * FRAME,
            Reclaim::BootServices,
        ));
        map.push(MemoryRegion::reserved(
            (1 << 31) + i * FRAME,
            (1 << 31) + (i + 1) * FRAME,
        ));
    }
    let mut storage = Vec::new();
    let mut alloc = build(&map, &mut storage);
    assert_eq!(alloc.stats().total, 600);
    assert_eq!(alloc.reclaim(Reclaim::BootServices), 600);
}

#[test]
fn from_memory_keeps_its_bookkeeping_off_reclaimable_memory() {
    let size = 4 * M;
    let mut ram: Vec<u64> = vec![!0; (size / 8) as usize];
    let phys = HostMemory {
        base: 0,
        bytes: ram.as_mut_ptr().cast(),
    };
    let map = [
        MemoryRegion::usable(0, size),
        MemoryRegion::reclaimable(0, 16 * FRAME, Reclaim::Bootloader),
    ];
    // SAFETY: `ram` backs the whole usable range and outlives the allocator.
    let mut alloc =
        unsafe { BitmapFrameAllocator::from_memory(map.iter().cloned(), &phys) }.unwrap();
    // The bookkeeping took frame 16, the first one not reclaimable.
    assert_eq!(alloc.is_free(frame(16)), Err(Error::FrameNotManaged));
    assert_eq!(alloc.reclaim(Reclaim::Bootloader), 16);
    assert_eq!(alloc.is_free(frame(0)), Ok(true));
    drop(ram);
}

/// Physical memory reached through pages that are not in physical order.
struct Scrambled {
    bytes: *mut u8,
}

// SAFETY: every frame below 1 MiB maps to a distinct, aligned page of the buffer;
// frames are swapped in pairs, so no two alias.
unsafe impl PhysMemory for Scrambled {
    fn phys_to_virt(&self, phys: PhysAddr) -> *mut u8 {
        let frame = (phys.as_u64() / FRAME) ^ 1;
        self.bytes
            .wrapping_add((frame * FRAME + phys.as_u64() % FRAME) as usize)
    }
}

#[test]
fn from_memory_refuses_bookkeeping_that_is_not_contiguous() {
    let mut ram: Vec<u64> = vec![0; (64 * M / 8) as usize];
    let phys = Scrambled {
        bytes: ram.as_mut_ptr().cast(),
    };
    let map = [MemoryRegion::usable(0, 64 * M)];
    // SAFETY: `ram` backs the whole usable range and outlives the call.
    let result = unsafe { BitmapFrameAllocator::from_memory(map.iter().cloned(), &phys) };
    assert_eq!(result.err(), Some(Error::BadMemoryMap));
}

#[test]
fn early_frames_come_from_the_top_and_the_map_reserves_them() {
    let map = [
        MemoryRegion::usable(0, 64 * FRAME),
        MemoryRegion::usable(100 * FRAME, 110 * FRAME),
        MemoryRegion::reserved(108 * FRAME, 110 * FRAME),
        MemoryRegion::reclaimable(104 * FRAME, 105 * FRAME, Reclaim::Acpi),
    ];
    let mut early = EarlyFrames::new(map.iter().cloned()).unwrap();
    let taken: Vec<u64> = core::iter::from_fn(|| early.allocate_frame())
        .map(|f| f.start_address().as_u64() / FRAME)
        .collect();
    // The highest free run is 105..108.
    assert_eq!(taken, vec![107, 106, 105]);
    assert_eq!(
        early.taken(),
        MemoryRegion::reserved(105 * FRAME, 108 * FRAME)
    );
    let mut storage = vec![0; BitmapFrameAllocator::storage_words(early.map())];
    let mut alloc = BitmapFrameAllocator::with_storage(early.map(), &mut storage).unwrap();
    let handed = drain(&mut alloc);
    assert!(handed.iter().all(|f| !taken.contains(f)));
    assert_eq!(handed.len(), 64 + 4);
    let nothing = [
        MemoryRegion::usable(0, FRAME),
        MemoryRegion::reserved(0, FRAME),
    ];
    assert_eq!(
        EarlyFrames::new(nothing.iter().cloned()).err(),
        Some(Error::BadMemoryMap)
    );
}
