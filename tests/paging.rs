//! The page-table cursor on the simulated machine's memory: whole-range map, unmap
//! and detach, checked entry by entry and against the `x86_64` crate's own walker;
//! calls that fail change nothing; and the flush tokens they return.

mod common;

use common::paging::*;
use vmalloc::paging::*;
use vmalloc::tlb::CountingFlush;
use vmalloc::{Error, PAGE_SIZE, TlbFlush};
use x86_64::structures::paging::page::PageRange;
use x86_64::structures::paging::{Page, PageTableFlags, PhysFrame, Size2MiB};
use x86_64::{PhysAddr, VirtAddr};

#[test]
fn maps_across_2m_1g_and_512g_boundaries_as_the_reference_walker_sees() {
    let cases = [
        (BASE + MIB2 - 5 * PAGE_SIZE, 10, 1 + 1 + 2), // PDPT, PD, two PTs
        (BASE + GIB - 3 * PAGE_SIZE, 600, 1 + 2 + 3), // two PDs, three PTs
        (BASE - 7 * PAGE_SIZE, 20, 2 + 2 + 2),        // two of each
        (0x0000_7f00_0000_0000 - 4 * PAGE_SIZE, 9, 2 + 2 + 2), // lower half too
    ];
    for (start, count, tables_expected) in cases {
        let m = &mut machine(2048, start);
        let frames = m.take(count as usize);
        let flags = RW | PageTableFlags::NO_EXECUTE | PageTableFlags::GLOBAL;
        let before = m.out();
        m.map(pages(start, count), frames.iter().copied(), flags)
            .unwrap();
        assert_eq!(m.out() - before, tables_expected, "tables for {start:#x}");
        m.assert_mapped(start, &frames, flags);
        m.assert_unmapped(start - PAGE_SIZE, 1);
        m.assert_unmapped(start + count * PAGE_SIZE, 1);
        for i in [0, count - 1] {
            // Upper entries: PRESENT | WRITABLE only, whatever the leaf has.
            assert_eq!(m.upper_flags(start + i * PAGE_SIZE), [RW; 3]);
        }
    }
}

#[test]
fn bytes_written_at_consecutive_addresses_land_in_order_in_scattered_frames() {
    let m = &mut machine(1024, 7);
    let start = BASE + MIB2 - 100 * PAGE_SIZE;
    let count = 300;
    let frames = m.take(count);
    assert!(
        frames
            .windows(2)
            .any(|w| w[1].start_address() != w[0].start_address() + PAGE_SIZE)
    );
    m.map(pages(start, count as u64), frames.iter().copied(), RW)
        .unwrap();
    let pattern = |offset: u64| (offset / 61 % 251) as u8 + 1;
    for offset in (0..count as u64 * PAGE_SIZE).step_by(61) {
        let (phys, _, _) = m.tables.translate(VirtAddr::new(start + offset)).unwrap();
        m.write_phys(phys, &[pattern(offset)]);
    }
    for (i, frame) in frames.iter().enumerate() {
        let bytes = m.frame_copy(*frame);
        for (j, byte) in bytes.iter().enumerate() {
            let offset = i as u64 * PAGE_SIZE + j as u64;
            let expected = if offset.is_multiple_of(61) {
                pattern(offset)
            } else {
                0
            };
            assert_eq!(*byte, expected, "byte {offset} of the area");
        }
    }
}

#[test]
fn running_out_of_table_frames_at_any_point_leaves_the_tables_byte_identical() {
    // 3000 pages from 1000 pages below a 1 GiB boundary: two PDs and seven PTs, with a
    // PT, a PD and the PDPT already there because of a page mapped just before.
    let start = BASE + GIB - 1000 * PAGE_SIZE;
    let count = 3000;
    let setup = || {
        let mut m = machine(8192, 11);
        let before = m.take(1);
        m.map(pages(start - PAGE_SIZE, 1), before, RW).unwrap();
        let frames = m.take(count);
        (m, frames)
    };
    let (mut m, frames) = setup();
    let out = m.out();
    m.map(pages(start, count as u64), frames.iter().copied(), RW)
        .unwrap();
    let needed = m.out() - out;
    assert_eq!(needed, 1 + 5, "one more PD, five more PTs");

    for k in 1..=needed {
        let (mut m, frames) = setup();
        let tables_before = m.table_snapshot();
        let out_before = m.out();
        m.fail_from(Some(k));
        let result = m.map(pages(start, count as u64), frames.iter().copied(), RW);
        assert_eq!(result, Err(Error::OutOfFrames), "failing allocation {k}");
        assert!(
            m.table_snapshot() == tables_before,
            "tables changed, failing allocation {k}"
        );
        assert_eq!(
            m.out(),
            out_before,
            "table frames kept, failing allocation {k}"
        );
        m.fail_from(None);
        m.map(pages(start, count as u64), frames.iter().copied(), RW)
            .unwrap();
        m.assert_mapped(start, &frames, RW);
    }
}

#[test]
fn mapping_over_anything_in_the_way_fails_and_changes_nothing() {
    let m = &mut machine(2048, 3);
    let start = BASE + MIB2 - 8 * PAGE_SIZE;
    let frames = m.take(16);
    m.map(pages(start + 12 * PAGE_SIZE, 1), [frames[15]], RW)
        .unwrap();
    let huge = Page::<Size2MiB>::containing_address(VirtAddr::new(BASE + 4 * MIB2));
    let huge_frame = PhysFrame::<Size2MiB>::containing_address(PhysAddr::new(0x20_0000));
    m.map_huge(huge, huge_frame, RW).unwrap();
    let snapshot = m.table_snapshot();
    let out = m.out();
    let mut attempt = |range: PageRange, frames: &[PhysFrame]| {
        let result = m.map(range, frames.iter().copied(), RW);
        assert!(m.table_snapshot() == snapshot && m.out() == out);
        result
    };
    assert_eq!(
        attempt(pages(start, 15), &frames[..15]),
        Err(Error::AlreadyMapped)
    );
    assert_eq!(
        attempt(pages(start, 15), &frames[..14]),
        Err(Error::FrameCountMismatch)
    );
    assert_eq!(
        attempt(pages(start, 14), &frames[..15]),
        Err(Error::FrameCountMismatch)
    );
    let into_huge = BASE + 4 * MIB2 - 2 * PAGE_SIZE;
    assert_eq!(
        attempt(pages(into_huge, 4), &frames[..4]),
        Err(Error::HugePageInTheWay)
    );
    let backwards = Page::range(page(start + PAGE_SIZE), page(start));
    assert_eq!(attempt(backwards, &[]), Err(Error::RangeWraps));
    let across_hole = Page::range(page(0x7fff_ffff_e000), page(0xffff_8000_0000_0000));
    assert_eq!(attempt(across_hole, &frames[..1]), Err(Error::NonCanonical));
    assert_eq!(m.map_huge(huge, huge_frame, RW), Err(Error::AlreadyMapped));
}

/// An iterator that promises more frames than it has.
struct Liar(std::vec::IntoIter<PhysFrame>, usize);

impl Iterator for Liar {
    type Item = PhysFrame;
    fn next(&mut self) -> Option<PhysFrame> {
        self.0.next()
    }
}

impl ExactSizeIterator for Liar {
    fn len(&self) -> usize {
        self.1
    }
}

#[test]
fn a_short_exact_size_iterator_unmaps_what_it_mapped() {
    let m = &mut machine(2048, 5);
    let start = BASE + MIB2 - 100 * PAGE_SIZE;
    let frames = m.take(290);
    let liar = Liar(frames.into_iter(), 300);
    assert_eq!(
        m.map(pages(start, 300), liar, RW),
        Err(Error::FrameCountMismatch)
    );
    m.assert_unmapped(start, 300);
}

#[test]
fn unmapping_a_range_with_a_hole_fails_and_changes_nothing() {
    let m = &mut machine(2048, 17);
    let start = BASE + MIB2 - 4 * PAGE_SIZE;
    let frames = m.take(8);
    m.map(pages(start, 4), frames[..4].iter().copied(), RW)
        .unwrap();
    m.map(
        pages(start + 5 * PAGE_SIZE, 3),
        frames[5..].iter().copied(),
        RW,
    )
    .unwrap();
    let snapshot = m.table_snapshot();
    let mut called = false;
    let range = pages(start, 8);
    assert_eq!(m.unmap(range, |_, _| called = true), Err(Error::NotMapped));
    assert_eq!(m.detach(range), Err(Error::NotMapped));
    assert_eq!(m.protect(range, RW), Err(Error::NotMapped));
    assert_eq!(
        m.unmap(pages(BASE + 8 * GIB, 1), |_, _| called = true),
        Err(Error::NotMapped)
    );
    assert!(!called);
    assert!(m.table_snapshot() == snapshot);
}

#[test]
fn detached_pages_fault_keep_their_frames_and_are_reclaimed_after_the_flush() {
    let m = &mut machine(2048, 19);
    let start = BASE + MIB2 - 10 * PAGE_SIZE;
    let frames = m.take(20);
    m.map(pages(start, 20), frames.iter().copied(), RW).unwrap();
    let first = m.detach(pages(start, 10)).unwrap();
    let second = m.detach(pages(start + 10 * PAGE_SIZE, 10)).unwrap();
    // The reference walker reports any non-zero leaf as mapped, present or not.
    m.assert_mapped_with(start, &frames, |flags| {
        assert!(!flags.contains(PageTableFlags::PRESENT) && flags.contains(DETACHED))
    });
    for i in 0..20 {
        let addr = VirtAddr::new(start + i * PAGE_SIZE);
        assert!(matches!(m.tables.translate(addr), Err(Error::NotMapped)));
    }

    let range = pages(start, 20);
    let more = m.take(20);
    assert_eq!(
        m.map(range, more.iter().copied(), RW),
        Err(Error::AlreadyMapped)
    );
    assert_eq!(m.unmap(range, |_, _| {}), Err(Error::NotMapped));

    let batch = first.merge(second);
    assert_eq!(batch.range(), Some(range));
    let tlb = CountingFlush::new();
    batch.flush(&tlb);
    assert_eq!(tlb.range_pages(), 20);

    let mut reclaimed = Vec::new();
    m.reclaim(range, |_, f| reclaimed.push(f)).unwrap();
    assert_eq!(reclaimed, frames);
    assert_eq!(m.reclaim(range, |_, _| {}), Err(Error::NotMapped));
    m.map(range, more.iter().copied(), RW).unwrap();
    assert_eq!(m.reclaim(range, |_, _| {}), Err(Error::AlreadyMapped));
    m.assert_mapped(start, &more, RW);
}

#[test]
fn flush_tokens_merge_into_hulls_and_across_the_hole_into_a_full_flush() {
    let low = RangeFlush::from_range(pages(0x1000, 2));
    let high = RangeFlush::from_range(pages(BASE, 2));
    let near = RangeFlush::from_range(pages(0x8000, 1));
    assert_eq!(low.merge(near).range(), Some(pages(0x1000, 8)));
    let empty = RangeFlush::from_range(pages(BASE, 0));
    assert!(empty.is_empty());
    assert_eq!(empty.merge(high), high);
    let tlb = CountingFlush::new();
    low.merge(high).flush(&tlb);
    empty.flush(&tlb);
    assert_eq!((tlb.full_calls(), tlb.range_calls()), (1, 0));
}

#[test]
fn counting_flush_counts_what_it_is_asked() {
    let tlb = CountingFlush::new();
    tlb.flush_page(page(BASE));
    tlb.flush_range(pages(BASE, 7));
    tlb.flush_all();
    assert_eq!(
        (
            tlb.page_calls(),
            tlb.range_calls(),
            tlb.range_pages(),
            tlb.full_calls()
        ),
        (1, 1, 7, 1)
    );
}
