//! The page tables behind the mappings: the flags of upper entries (`protect`, user
//! leaves), and which tables are made up front and which freed, and when.

mod common;

use common::paging::*;
use vmalloc::paging::*;
use vmalloc::tlb::CountingFlush;
use vmalloc::{Error, FrameSource, PAGE_SIZE};
use x86_64::PhysAddr;
use x86_64::structures::paging::{Page, PageTableFlags, PhysFrame, Size4KiB};

#[test]
fn unmap_hands_back_frames_in_order_and_free_empty_tables_returns_every_table_below_the_root() {
    let m = &mut machine(4096, 9);
    let start = BASE + GIB - 600 * PAGE_SIZE;
    let count = 1500;
    let frames = m.take(count);
    let out = m.out();
    m.map(pages(start, count as u64), frames.iter().copied(), RW)
        .unwrap();
    let table_count = m.out() - out;

    let mut handed_back = Vec::new();
    let tlb = CountingFlush::new();
    let flush = m
        .unmap(pages(start, count as u64), |p, f| handed_back.push((p, f)))
        .unwrap();
    assert_eq!(flush.range(), Some(pages(start, count as u64)));
    flush.flush(&tlb);
    assert_eq!((tlb.range_calls(), tlb.range_pages()), (1, count as u64));
    let expected: Vec<_> = frames
        .iter()
        .enumerate()
        .map(|(i, f)| (page(start) + i as u64, *f))
        .collect();
    assert_eq!(handed_back, expected);
    m.assert_unmapped(start, count as u64);

    let pml4_entry = m.table_copy(m.tables.root())[index(start, 0)];
    let (freed, flush) = m.free_empty(pages(start, count as u64));
    assert_eq!(freed, table_count - 1, "all but the PDPT");
    assert_eq!(m.out(), out + 1);
    let covered = flush.range().unwrap();
    assert!(covered.start <= page(start) && covered.end >= page(start) + count as u64);
    flush.flush(&NO_TLB);
    assert_eq!(
        m.table_snapshot().len(),
        2,
        "the PML4 and the PDPT are left"
    );
    assert_eq!(
        m.table_copy(m.tables.root())[index(start, 0)],
        pml4_entry,
        "root entries never change once made"
    );
}

#[test]
fn only_tables_this_crate_created_are_freed() {
    let m = &mut machine(2048, 43);
    let start = BASE + 3 * MIB2;
    let frames = m.take(2);
    m.map(pages(start, 2), frames.iter().copied(), RW).unwrap();
    let entries = |m: &Machine| {
        let root = m.table_copy(m.tables.root())[index(start, 0)];
        let pdpt = PhysFrame::containing_address(PhysAddr::new(root & ADDR_MASK));
        let pd_entry = m.table_copy(pdpt)[index(start, 1)];
        let pd = PhysFrame::containing_address(PhysAddr::new(pd_entry & ADDR_MASK));
        (pdpt, pd_entry, pd, m.table_copy(pd)[index(start, 2)])
    };
    let (pdpt, pd_entry, pd, pt_entry) = entries(m);
    for raw in [pd_entry, pt_entry] {
        assert!(PageTableFlags::from_bits_retain(raw).contains(CREATED));
    }
    // Take the mark off the PT's entry, as if a boot loader had made the PT.
    let slot = pd.start_address() + index(start, 2) as u64 * 8;
    m.write_phys(slot, &(pt_entry & !CREATED.bits()).to_le_bytes());
    m.unmap(pages(start, 2), |_, _| {}).unwrap().flush(&NO_TLB);
    let (freed, _) = m.free_empty(pages(start, 2));
    assert_eq!(
        freed, 0,
        "the PT is not ours, so the PD above it is not empty"
    );
    assert_eq!(entries(m).1, pd_entry);
    assert_eq!(m.table_copy(pdpt)[index(start, 1)], pd_entry);
}

#[test]
fn top_level_tables_are_made_up_front_and_released_only_on_request() {
    let m = &mut machine(2048, 47);
    let region = Page::range(page(BASE - 512 * GIB), page(BASE + 1024 * GIB));
    let out = m.out();
    // SAFETY: the test pool's frames.
    let made = unsafe { m.tables.preallocate_top_level(region, &m.frames) }.unwrap();
    assert_eq!((made, m.out() - out), (3, 3));
    let root = m.table_copy(m.tables.root());
    for index in [index(BASE, 0) - 1, index(BASE, 0), index(BASE, 0) + 1] {
        let flags = PageTableFlags::from_bits_retain(root[index]);
        assert!(flags.contains(RW | CREATED), "entry {index}: {flags:?}");
    }
    // SAFETY: as above.
    let again = unsafe { m.tables.preallocate_top_level(region, &m.frames) }.unwrap();
    assert_eq!(again, 0, "existing tables are kept");
    let frames = m.take(1);
    m.map(pages(BASE, 1), frames.iter().copied(), RW).unwrap();
    let (freed, _) = m.free_empty(region);
    assert_eq!(freed, 0);

    let mut unlinked = Vec::new();
    // SAFETY: no other address space uses the entries.
    let (released, flush) =
        unsafe { m.tables.release_top_level(region, |f| unlinked.push(f)) }.unwrap();
    assert_eq!(released, 2, "the PDPT still mapping a page stays");
    flush.flush(&NO_TLB);
    // SAFETY: frames the test took and no longer uses (or a bad free, refused).
    unsafe { m.frames.free_frames(&unlinked) }.unwrap();
    m.assert_mapped(BASE, &frames, RW);

    let out = m.out();
    m.fail_from(Some(2));
    // SAFETY: as above.
    let failed = unsafe { m.tables.preallocate_top_level(region, &m.frames) };
    assert_eq!(failed, Err(Error::OutOfFrames));
    assert_eq!(m.out(), out, "all or nothing");
    m.fail_from(None);
}

#[test]
fn free_empty_tables_keeps_tables_that_still_map_something() {
    let m = &mut machine(2048, 13);
    let start = BASE + MIB2 - 4 * PAGE_SIZE;
    let frames = m.take(8);
    m.map(pages(start, 8), frames.iter().copied(), RW).unwrap();
    m.unmap(pages(start, 4), |_, _| {}).unwrap().flush(&NO_TLB);
    let (freed, flush) = m.free_empty(pages(start, 8));
    assert_eq!(freed, 1, "only the first PT became empty");
    assert_eq!(flush.range().unwrap().len(), 512, "the PT served 2 MiB");
    m.assert_mapped(start + 4 * PAGE_SIZE, &frames[4..], RW);
}

#[test]
fn protect_changes_flags_keeps_frames_and_accessed_dirty() {
    let m = &mut machine(2048, 23);
    let start = BASE + MIB2 - 2 * PAGE_SIZE;
    let frames = m.take(4);
    let used = RW | PageTableFlags::ACCESSED | PageTableFlags::DIRTY;
    m.map(pages(start, 4), frames.iter().copied(), used)
        .unwrap();
    let read_only = PageTableFlags::PRESENT | PageTableFlags::NO_EXECUTE;
    let flush = m.protect(pages(start, 4), read_only).unwrap();
    assert_eq!(flush.range(), Some(pages(start, 4)));
    flush.flush(&NO_TLB);
    let kept = read_only | PageTableFlags::ACCESSED | PageTableFlags::DIRTY;
    m.assert_mapped(start, &frames, kept);

    let user = RW | PageTableFlags::USER_ACCESSIBLE;
    m.protect(pages(start, 1), user).unwrap().flush(&NO_TLB);
    assert!(
        m.upper_flags(start)
            .iter()
            .all(|f| f.contains(PageTableFlags::USER_ACCESSIBLE))
    );
    assert!(!m.upper_flags(start + 2 * PAGE_SIZE)[2].contains(PageTableFlags::USER_ACCESSIBLE));
}

#[test]
fn user_leaves_get_user_upper_entries() {
    let m = &mut machine(2048, 29);
    let frames = m.take(1);
    let user = RW | PageTableFlags::USER_ACCESSIBLE;
    m.map(pages(0x40_0000, 1), frames.iter().copied(), user)
        .unwrap();
    assert_eq!(m.upper_flags(0x40_0000), [user; 3]);
    m.assert_mapped(0x40_0000, &frames, user);
}

#[test]
fn existing_upper_entries_gain_the_bits_a_new_leaf_needs() {
    let m = &mut machine(2048, 37);
    let start = BASE + 5 * MIB2;
    let frames = m.take(3);
    let read_only = PageTableFlags::PRESENT | PageTableFlags::NO_EXECUTE;
    m.map(pages(start, 1), [frames[0]], read_only).unwrap();
    // Take WRITABLE away from the PD entry, as a loader might have left it.
    let pd = PhysFrame::<Size4KiB>::containing_address(PhysAddr::new(
        m.table_copy(PhysFrame::containing_address(PhysAddr::new(
            m.table_copy(m.tables.root())[index(start, 0)] & ADDR_MASK,
        )))[index(start, 1)]
            & ADDR_MASK,
    ));
    let slot = pd.start_address() + index(start, 2) as u64 * 8;
    let pd_entry = m.table_copy(pd)[index(start, 2)];
    m.write_phys(
        slot,
        &(pd_entry & !PageTableFlags::WRITABLE.bits()).to_le_bytes(),
    );
    assert!(!m.upper_flags(start)[2].contains(PageTableFlags::WRITABLE));

    m.map(pages(start + PAGE_SIZE, 1), [frames[1]], RW).unwrap();
    assert_eq!(m.upper_flags(start)[2], RW);
    let user = RW | PageTableFlags::USER_ACCESSIBLE;
    m.map(pages(start + 2 * PAGE_SIZE, 1), [frames[2]], user)
        .unwrap();
    assert_eq!(m.upper_flags(start), [user; 3]);
    m.assert_mapped(start, &frames[..1], read_only);
    m.assert_mapped(start + PAGE_SIZE, &frames[1..2], RW);
    m.assert_mapped(start + 2 * PAGE_SIZE, &frames[2..], user);
}
