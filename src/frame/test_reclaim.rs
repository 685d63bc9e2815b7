//! Reclaimable memory: never handed out before it is reclaimed, each source once,
//! never a reserved frame.

extern crate std;

use super::test::{FRAME, build, drain, frame};
use super::*;
use std::vec::Vec;

/// A map with usable memory, an ACPI table and boot-loader data in it, and a
/// reserved frame inside the boot-loader data.
fn map_with_reclaimable() -> [MemoryRegion; 4] {
    [
        MemoryRegion::usable(FRAME, 65 * FRAME),
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
    // 64 usable frames (1..65) less 4 (8..12, frame 8 touched) and 8 (32..40).
    assert_eq!(alloc.stats().total, 52);
    let handed = drain(&mut alloc);
    assert!(
        handed
            .iter()
            .all(|&f| !(8..12).contains(&f) && !(32..40).contains(&f))
    );
    assert!(!alloc.manages(frame(33), 1));
    assert_eq!(alloc.is_free(frame(9)), Err(Error::FrameNotManaged));
    // SAFETY: frames the test took and no longer uses (or a bad free, refused).
    assert_eq!(unsafe { alloc.free(frame(9)) }, Err(Error::FrameNotManaged));
}

#[test]
fn reclaim_hands_over_one_source_once_and_never_a_reserved_frame() {
    let map = map_with_reclaimable();
    let mut storage = Vec::new();
    let mut alloc = build(&map, &mut storage);
    let before = alloc.stats();
    // Frame 8 is only partly ACPI's: the other part is usable, but a frame is
    // reclaimed only when wholly inside the range.
    // SAFETY: a simulated map: nothing uses its reclaimable memory.
    assert_eq!(unsafe { alloc.reclaim(Reclaim::Acpi) }, 3);
    assert_eq!(
        // SAFETY: a simulated map: nothing uses its reclaimable memory.
        unsafe { alloc.reclaim(Reclaim::Acpi) },
        0,
        "a second reclaim frees nothing"
    );
    assert_eq!(alloc.stats().total, before.total + 3);
    assert_eq!(alloc.stats().free, before.free + 3);
    assert_eq!(alloc.is_free(frame(9)), Ok(true));
    assert_eq!(alloc.is_free(frame(33)), Err(Error::FrameNotManaged));
    // SAFETY: a simulated map: nothing uses its reclaimable memory.
    assert_eq!(unsafe { alloc.reclaim(Reclaim::Bootloader) }, 7);
    assert_eq!(alloc.is_free(frame(35)), Err(Error::FrameNotManaged));
    // SAFETY: a simulated map: nothing uses its reclaimable memory.
    assert_eq!(unsafe { alloc.reclaim(Reclaim::BootServices) }, 0);
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
    // SAFETY: a simulated map: nothing uses its reclaimable memory.
    assert_eq!(unsafe { alloc.reclaim_range(at(32)..at(34)) }, Ok(2));
    assert_eq!(
        // SAFETY: a simulated map: nothing uses its reclaimable memory.
        unsafe { alloc.reclaim_range(at(32)..at(34)) },
        Err(Error::Overlap)
    );
    assert_eq!(
        // SAFETY: a simulated map: nothing uses its reclaimable memory.
        unsafe { alloc.reclaim_range(at(30)..at(34)) },
        Err(Error::Overlap)
    );
    assert_eq!(
        // SAFETY: a simulated map: nothing uses its reclaimable memory.
        unsafe { alloc.reclaim_range(at(34)..at(33)) },
        Err(Error::RangeWraps)
    );
    assert_eq!(
        // SAFETY: a simulated map: nothing uses its reclaimable memory.
        unsafe { alloc.reclaim_range(at(35)..at(36)) },
        Err(Error::FrameNotManaged)
    );
    assert_eq!(
        // SAFETY: a simulated map: nothing uses its reclaimable memory.
        unsafe { alloc.reclaim_range(at(100)..at(200)) },
        Err(Error::FrameNotManaged)
    );
    // SAFETY: a simulated map: nothing uses its reclaimable memory.
    assert_eq!(unsafe { alloc.reclaim_range(at(34)..at(34)) }, Ok(0));
    // The whole source: only what is left.
    // SAFETY: a simulated map: nothing uses its reclaimable memory.
    assert_eq!(unsafe { alloc.reclaim(Reclaim::Bootloader) }, 5);
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
    // SAFETY: a simulated map: nothing uses its reclaimable memory.
    assert_eq!(unsafe { alloc.reclaim(Reclaim::Acpi) }, 8);
    // SAFETY: a simulated map: nothing uses its reclaimable memory.
    assert_eq!(unsafe { alloc.reclaim(Reclaim::Bootloader) }, 10);
    assert_eq!(alloc.is_free(frame(18)), Err(Error::FrameNotManaged));
    assert_eq!(alloc.is_free(frame(45)), Err(Error::FrameNotManaged));
}

#[test]
fn reclaimable_memory_outside_usable_zones_gets_a_zone() {
    // Boot-services memory far above the usable memory.
    let map = [
        MemoryRegion::usable(FRAME, 65 * FRAME),
        MemoryRegion::reclaimable(1 << 32, (1 << 32) + 16 * FRAME, Reclaim::BootServices),
    ];
    let mut storage = Vec::new();
    let mut alloc = build(&map, &mut storage);
    assert_eq!(alloc.stats().total, 64);
    // SAFETY: a simulated map: nothing uses its reclaimable memory.
    assert_eq!(unsafe { alloc.reclaim(Reclaim::BootServices) }, 16);
    let handed = drain(&mut alloc);
    assert_eq!(handed.len(), 80);
    assert!(handed.contains(&((1 << 32) / FRAME + 15)));
}
