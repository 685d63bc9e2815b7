//! Memory maps into zones: rounding, overlaps, sparse and long maps, bookkeeping
//! carved out of memory (`from_memory`), early frames.

extern crate std;

use super::test::{FRAME, K, M, build, drain, frame};
use super::*;
use crate::phys::PhysMemory;
use std::vec;
use std::vec::Vec;
use x86_64::PhysAddr;
use x86_64::structures::paging::FrameAllocator;

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
    // Frame 0 is never handed out.
    assert_eq!(alloc.stats().total, 11);
    assert_eq!(drain(&mut alloc), (1..12).collect::<Vec<_>>());
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
    let expected: Vec<u64> = (1..16).filter(|n| !(4..7).contains(n)).collect();
    assert_eq!(handed, expected);
    // SAFETY: frames the test took and no longer uses (or a bad free, refused).
    assert_eq!(unsafe { alloc.free(frame(5)) }, Err(Error::FrameNotManaged));
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
        MemoryRegion::usable(FRAME, 640 * K),
        MemoryRegion::usable(M, 128 * M),
        MemoryRegion::usable(high, high + 16 * M),
    ];
    let words = BitmapFrameAllocator::storage_words(map.iter().cloned());
    // Two bits per frame of (128 MiB + 16 MiB) plus summaries: far below the
    // 2^39 / 64 words a single bitmap up to 2^51 would need.
    assert!(words < 20_000, "{words} words");
    let mut storage = vec![0; words];
    let mut alloc = BitmapFrameAllocator::with_storage(map.iter().cloned(), &mut storage).unwrap();
    let expected = (640 * K + 127 * M + 16 * M) / FRAME - 1;
    assert_eq!(alloc.stats().total, expected);
    let top = alloc.alloc_from(frame(high / FRAME)).unwrap();
    assert_eq!(top.start_address().as_u64(), high);
    assert_eq!(
        alloc.is_free(frame(200 * M / FRAME)),
        Err(Error::FrameNotManaged)
    );
    assert_eq!(
        // SAFETY: frames the test took and no longer uses (or a bad free, refused).
        unsafe { alloc.free(frame((high - M) / FRAME)) },
        Err(Error::FrameNotManaged)
    );
}

#[test]
fn many_far_apart_ranges_are_merged_into_few_zones() {
    let map: Vec<MemoryRegion> = (0..40u64)
        .map(|i| MemoryRegion::usable((i << 32) + FRAME, (i << 32) + 5 * FRAME))
        .collect();
    let mut storage = Vec::new();
    let mut alloc = build(&map, &mut storage);
    assert_eq!(alloc.stats().total, 160);
    let handed = drain(&mut alloc);
    let expected: Vec<u64> = (0..40u64)
        .flat_map(|i| (1..5).map(move |j| (i << 32) / FRAME + j))
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

/// Host memory standing in for physical memory starting at `base`.
struct HostMemory {
    base: u64,
    bytes: *mut u8,
}

impl HostMemory {
    /// `ram` as physical memory from `base` on (`ram` must outlive its use).
    fn over(ram: &mut [u64], base: u64) -> Self {
        Self {
            base,
            bytes: ram.as_mut_ptr().cast(),
        }
    }
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
    let phys = HostMemory::over(&mut ram, base);
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
    assert_eq!(
        // SAFETY: frames the test took and no longer uses (or a bad free, refused).
        unsafe { alloc.free(first_carved) },
        Err(Error::FrameNotManaged)
    );
    let handed = drain(&mut alloc);
    assert_eq!(handed.len() as u64, usable - carved);
    assert_eq!(handed[0], base / FRAME + 1 + carved);
    // `alloc` lives in `ram`, which is dropped only here, after its last use.
    drop(ram);
}

/// RAM split into two touching usable entries (as a UEFI map gives conventional and
/// boot-services memory) with only a run across their border free of reserved
/// memory: the bookkeeping goes there, where neither half alone could hold it.
#[test]
fn from_memory_carves_a_run_across_touching_usable_entries() {
    let base = 64 * M;
    let size = 64 * M;
    let mut ram: Vec<u64> = vec![!0; (size / 8) as usize];
    let phys = HostMemory::over(&mut ram, base);
    let border = base + size / 2;
    let map_with = |side: u64| {
        [
            MemoryRegion::usable(base, border),
            MemoryRegion::usable(border, base + size),
            MemoryRegion::reserved(base, border - side * FRAME),
            MemoryRegion::reserved(border + side * FRAME, base + size),
        ]
    };
    let words = BitmapFrameAllocator::storage_words(map_with(1).iter().cloned()) as u64;
    let needed = (words * 8).div_ceil(FRAME);
    // Each side one frame short of the bookkeeping, both together enough.
    let side = needed - 1;
    let map = map_with(side);
    // SAFETY: `ram` backs the whole usable range and outlives the allocator.
    let mut alloc =
        unsafe { BitmapFrameAllocator::from_memory(map.iter().cloned(), &phys) }.unwrap();
    assert_eq!(alloc.stats().total, 2 * side - needed);
    let handed = drain(&mut alloc);
    assert_eq!(handed.len() as u64, 2 * side - needed);
    let run = (border / FRAME - side)..(border / FRAME - side + needed);
    assert!(
        handed.iter().all(|frame| !run.contains(frame)),
        "a bookkeeping frame handed out"
    );
    drop(ram);
}

#[test]
fn from_memory_without_room_is_a_bad_map() {
    let mut ram: Vec<u64> = vec![0; 512];
    let phys = HostMemory::over(&mut ram, 0);
    // One frame: the bookkeeping takes it and nothing is left.
    let map = [MemoryRegion::usable(0, FRAME)];
    // SAFETY: `ram` backs the whole usable range and outlives the call.
    let result = unsafe { BitmapFrameAllocator::from_memory(map.iter().cloned(), &phys) };
    assert_eq!(result.err(), Some(Error::BadMemoryMap));
}

#[test]
fn long_maps_of_touching_entries_are_merged_not_refused() {
    // 600 touching usable entries and 600 touching boot-services entries, as a
    // fragmented UEFI map gives them.
    let mut map = Vec::new();
    for i in 0..600u64 {
        map.push(MemoryRegion::usable((i + 1) * FRAME, (i + 2) * FRAME));
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
    // SAFETY: a simulated map: nothing uses its reclaimable memory.
    assert_eq!(unsafe { alloc.reclaim(Reclaim::BootServices) }, 600);
}

/// 127 disjoint ranges, then one more in two touching halves: 128 once merged,
/// which fits, whichever half comes first; one more disjoint range does not.
#[test]
fn a_full_list_takes_a_range_that_extends_one_it_holds() {
    let last = bitmap::MAX_MAP_REGIONS as u64 - 1;
    let spaced = |kind: &dyn Fn(u64, u64) -> MemoryRegion| -> Vec<MemoryRegion> {
        let mut map: Vec<_> = (0..last)
            .map(|i| kind((4 * i + 1) * FRAME, (4 * i + 2) * FRAME))
            .collect();
        let end = 1000 * FRAME;
        map.push(kind(end, end + FRAME));
        map.push(kind(end + FRAME, end + 2 * FRAME));
        map
    };
    let usable = spaced(&MemoryRegion::usable);
    let mut storage = Vec::new();
    let mut alloc = build(&usable, &mut storage);
    assert_eq!(alloc.stats().total, last + 2);
    assert_eq!(drain(&mut alloc).len() as u64, last + 2);

    let whole = MemoryRegion::usable(FRAME, 2049 * FRAME);
    let reserved = spaced(&MemoryRegion::reserved);
    let reclaimable = spaced(&|start, end| MemoryRegion::reclaimable(start, end, Reclaim::Acpi));
    for (kind, entries) in [("reserved", reserved), ("reclaimable", reclaimable)] {
        let mut map = vec![whole.clone()];
        map.extend(entries);
        let words = BitmapFrameAllocator::storage_words(map.iter().cloned());
        let mut storage = vec![0; words];
        let alloc = BitmapFrameAllocator::with_storage(map.iter().cloned(), &mut storage);
        assert_eq!(
            alloc.map(|alloc| alloc.stats().total).ok(),
            Some(2048 - last - 2),
            "{kind}: 128 ranges once merged"
        );
        map.push(if kind == "reserved" {
            MemoryRegion::reserved(1500 * FRAME, 1501 * FRAME)
        } else {
            MemoryRegion::reclaimable(1500 * FRAME, 1501 * FRAME, Reclaim::Acpi)
        });
        assert_eq!(
            BitmapFrameAllocator::storage_words(map.iter().cloned()),
            0,
            "{kind}: 129 disjoint ranges"
        );
    }
}

#[test]
fn a_backwards_reserved_or_reclaimable_entry_is_a_bad_map() {
    // The kernel image [1 MiB, 3 MiB) with its bounds swapped: dropped as an empty
    // entry is, it would leave the image's frames usable.
    let kept_back = [
        MemoryRegion::reserved(3 * M, M),
        MemoryRegion::reclaimable(3 * M, M, Reclaim::Bootloader),
    ];
    for entry in kept_back {
        let map = [MemoryRegion::usable(0, 16 * M), entry];
        assert_eq!(
            BitmapFrameAllocator::storage_words(map.iter().cloned()),
            0,
            "{map:?}"
        );
        let mut storage = vec![0; 1 << 12];
        let built = BitmapFrameAllocator::with_storage(map.iter().cloned(), &mut storage);
        assert_eq!(built.err(), Some(Error::BadMemoryMap), "{map:?}");
        let early = EarlyFrames::new(map.iter().cloned());
        assert_eq!(early.err(), Some(Error::BadMemoryMap), "{map:?}");
    }
    // A backwards usable entry only loses memory: dropped.
    let map = [
        MemoryRegion::usable(0, 4 * FRAME),
        MemoryRegion::usable(3 * M, M),
    ];
    let mut storage = Vec::new();
    let mut alloc = build(&map, &mut storage);
    assert_eq!(drain(&mut alloc), vec![1, 2, 3]);
}

#[test]
fn an_empty_reserved_range_inside_a_frame_reserves_nothing() {
    let map = [
        MemoryRegion::usable(FRAME, 4 * FRAME),
        MemoryRegion::reserved(2 * FRAME + 0xabc, 2 * FRAME + 0xabc),
    ];
    let mut storage = Vec::new();
    let mut alloc = build(&map, &mut storage);
    assert_eq!(drain(&mut alloc), vec![1, 2, 3]);
}

#[test]
fn from_memory_keeps_its_bookkeeping_off_reclaimable_memory() {
    let size = 4 * M;
    let mut ram: Vec<u64> = vec![!0; (size / 8) as usize];
    let phys = HostMemory::over(&mut ram, 0);
    let map = [
        MemoryRegion::usable(0, size),
        MemoryRegion::reclaimable(0, 16 * FRAME, Reclaim::Bootloader),
    ];
    // SAFETY: `ram` backs the whole usable range and outlives the allocator.
    let mut alloc =
        unsafe { BitmapFrameAllocator::from_memory(map.iter().cloned(), &phys) }.unwrap();
    // The bookkeeping took frame 16, the first one not reclaimable.
    assert_eq!(alloc.is_free(frame(16)), Err(Error::FrameNotManaged));
    // SAFETY: a simulated map: nothing uses its reclaimable memory.
    assert_eq!(unsafe { alloc.reclaim(Reclaim::Bootloader) }, 15);
    assert_eq!(alloc.is_free(frame(1)), Ok(true));
    // Frame 0 is never handed out, reclaimed or not.
    assert_eq!(alloc.is_free(frame(0)), Err(Error::FrameNotManaged));
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
    let map = early.map();
    let mut storage = vec![0; BitmapFrameAllocator::storage_words(map.clone())];
    let mut alloc = BitmapFrameAllocator::with_storage(map, &mut storage).unwrap();
    let handed = drain(&mut alloc);
    assert!(handed.iter().all(|f| !taken.contains(f)));
    // Frame 0 is never handed out.
    assert_eq!(handed.len(), 63 + 4);
    let nothing = [
        MemoryRegion::usable(0, FRAME),
        MemoryRegion::reserved(0, FRAME),
    ];
    assert_eq!(
        EarlyFrames::new(nothing.iter().cloned()).err(),
        Some(Error::BadMemoryMap)
    );
}

#[test]
fn early_frames_take_a_run_split_into_touching_and_overlapping_entries_whole() {
    // RAM as firmware often lists it: neighbouring entries, out of order, one
    // overlapping; a reserved frame below them all bounds the run.
    let map = [
        MemoryRegion::usable(300 * FRAME, 301 * FRAME),
        MemoryRegion::usable(256 * FRAME, 300 * FRAME),
        MemoryRegion::usable(301 * FRAME, 302 * FRAME),
        MemoryRegion::usable(250 * FRAME, 260 * FRAME),
        MemoryRegion::reserved(200 * FRAME, 252 * FRAME),
        MemoryRegion::usable(0, 200 * FRAME),
    ];
    let mut early = EarlyFrames::new(map.iter().cloned()).unwrap();
    let taken = core::iter::from_fn(|| early.allocate_frame()).count();
    assert_eq!(
        taken,
        302 - 252,
        "frames 252..302, down to the reserved range"
    );
    assert_eq!(
        early.taken(),
        MemoryRegion::reserved(252 * FRAME, 302 * FRAME)
    );
    // Thousands of one-frame entries, each touching the next.
    let many: Vec<_> = (0..5000u64)
        .map(|i| MemoryRegion::usable((1000 + i) * FRAME, (1001 + i) * FRAME))
        .collect();
    let mut early = EarlyFrames::new(many.iter().cloned()).unwrap();
    assert_eq!(core::iter::from_fn(|| early.allocate_frame()).count(), 5000);
}

/// RAM listed in entries that touch at unaligned borders (0x1800 bytes each) is one
/// range: the frames across the borders are usable, and 400 such entries are one
/// range, not 400 that overflow the list.
#[test]
fn usable_entries_touching_at_unaligned_borders_merge_before_rounding() {
    let map = [
        MemoryRegion::usable(FRAME, FRAME + 0x1800),
        MemoryRegion::usable(FRAME + 0x1800, 4 * FRAME),
    ];
    let mut storage = Vec::new();
    let mut alloc = build(&map, &mut storage);
    assert_eq!(drain(&mut alloc), vec![1, 2, 3]);

    let map: Vec<MemoryRegion> = (0..400u64)
        .map(|i| MemoryRegion::usable(FRAME + i * 0x1800, FRAME + (i + 1) * 0x1800))
        .collect();
    let words = BitmapFrameAllocator::storage_words(map.iter().cloned());
    let mut storage = vec![0; words];
    let alloc = BitmapFrameAllocator::with_storage(map.iter().cloned(), &mut storage);
    assert_eq!(alloc.map(|alloc| alloc.stats().total).ok(), Some(600));

    // Reclaimable entries of one source too.
    let map = [
        MemoryRegion::usable(16 * FRAME, 32 * FRAME),
        MemoryRegion::reclaimable(FRAME, FRAME + 0x1800, Reclaim::Acpi),
        MemoryRegion::reclaimable(FRAME + 0x1800, 4 * FRAME, Reclaim::Acpi),
    ];
    let mut storage = Vec::new();
    let mut alloc = build(&map, &mut storage);
    // SAFETY: a simulated map: nothing uses its reclaimable memory.
    assert_eq!(unsafe { alloc.reclaim(Reclaim::Acpi) }, 3);
}

/// Physical memory as an identity map reaches it: frame 0 is at the null pointer,
/// which no Rust code may write through (so reaching it fails the test).
struct IdentityLike {
    bytes: *mut u8,
}

// SAFETY: every frame but frame 0 of the tests' maps is a distinct page of the
// buffer; frame 0 is never given out (the call panics).
unsafe impl PhysMemory for IdentityLike {
    fn phys_to_virt(&self, phys: PhysAddr) -> *mut u8 {
        assert!(
            phys.as_u64() >= FRAME,
            "frame 0 reached: null under an identity map"
        );
        self.bytes.wrapping_add(phys.as_u64() as usize)
    }
}

/// GRUB, E820 and UEFI maps list `[0, 0x9fc00)` as usable; under an identity map
/// frame 0 is at address 0. Neither the bookkeeping nor any frame handed out, before
/// or after a reclaim, is frame 0.
#[test]
fn frame_0_is_never_handed_out_nor_holds_the_bookkeeping() {
    let size = 8 * M;
    let mut ram: Vec<u64> = vec![!0; (size / 8) as usize];
    let phys = IdentityLike {
        bytes: ram.as_mut_ptr().cast(),
    };
    let map = [
        MemoryRegion::usable(0, 0x9fc00),
        MemoryRegion::reserved(0x9fc00, M),
        MemoryRegion::usable(M, size),
        MemoryRegion::reclaimable(0, 2 * FRAME, Reclaim::Bootloader),
    ];
    // SAFETY: `ram` backs the whole usable range and outlives the allocator.
    let mut alloc =
        unsafe { BitmapFrameAllocator::from_memory(map.iter().cloned(), &phys) }.unwrap();
    // SAFETY: a simulated map: nothing uses its reclaimable memory.
    assert_eq!(unsafe { alloc.reclaim(Reclaim::Bootloader) }, 1);
    let handed = drain(&mut alloc);
    assert!(handed.contains(&1) && handed.contains(&(M / FRAME)));
    assert!(!handed.contains(&0));
    assert_eq!(alloc.is_free(frame(0)), Err(Error::FrameNotManaged));
    let early = EarlyFrames::new([MemoryRegion::usable(0, 2 * FRAME)].into_iter());
    let taken: Vec<u64> = early
        .into_iter()
        .flat_map(|mut early| core::iter::from_fn(move || early.allocate_frame()))
        .map(|f| f.start_address().as_u64() / FRAME)
        .collect();
    assert_eq!(taken, vec![1]);
    // `alloc` lives in `ram`, which is dropped only here, after its last use.
    drop(ram);
}

/// A map whose every usable frame is reserved or reclaimable has no storage size:
/// `storage_words` says 0, as its docs promise, where it said how much storage a
/// refused map would take.
#[test]
fn storage_words_is_0_for_a_map_without_a_frame_to_hand_out() {
    let maps = [
        [MemoryRegion::usable(0, M), MemoryRegion::reserved(0, M)],
        [
            MemoryRegion::usable(0, M),
            MemoryRegion::reclaimable(0, M, Reclaim::Acpi),
        ],
        [MemoryRegion::usable(0, FRAME), MemoryRegion::usable(0, 0)],
    ];
    for map in maps {
        assert_eq!(
            BitmapFrameAllocator::storage_words(map.iter().cloned()),
            0,
            "{map:?}"
        );
        let mut storage = vec![0; 64];
        let refused = BitmapFrameAllocator::with_storage(map.iter().cloned(), &mut storage);
        assert_eq!(refused.err(), Some(Error::BadMemoryMap), "{map:?}");
    }
}

/// Usable slivers holding no whole frame (bits a firmware map lists between
/// reserved ones) do not count against the 128-range limit: a map with 200 of them
/// beside 16 MiB of RAM is taken, in either order. Kept as bytes until the end (so
/// that touching ones can merge into a frame), they filled the list.
#[test]
fn usable_slivers_without_a_whole_frame_never_fill_the_list() {
    let ram = MemoryRegion::usable(16 * M, 32 * M);
    let slivers: Vec<MemoryRegion> = (0..200u64)
        .map(|k| {
            let base = 48 * M + k * 2 * FRAME;
            MemoryRegion::usable(base + 0x100, base + 0x200)
        })
        .collect();
    for ram_first in [true, false] {
        let mut map = slivers.clone();
        if ram_first {
            map.insert(0, ram.clone());
        } else {
            map.push(ram.clone());
        }
        let words = BitmapFrameAllocator::storage_words(map.iter().cloned());
        let mut storage = vec![0; words];
        let alloc = BitmapFrameAllocator::with_storage(map.iter().cloned(), &mut storage);
        assert_eq!(
            alloc.map(|alloc| alloc.stats().total).ok(),
            Some(16 * M / FRAME),
            "RAM first: {ram_first}"
        );
    }
}
