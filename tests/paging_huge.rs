//! 2 MiB and 1 GiB entries in the page-table cursor: translating, mapping, splitting
//! and unmapping them, and range calls that meet them.

mod common;

use common::paging::*;
use vmalloc::{Error, PAGE_SIZE};
use x86_64::structures::paging::mapper::{MappedFrame, TranslateResult};
use x86_64::structures::paging::{Page, PageTableFlags, PhysFrame, Size2MiB, Size4KiB};
use x86_64::{PhysAddr, VirtAddr};

#[test]
fn translate_understands_2m_and_1g_entries() {
    let m = &mut machine(2048, 31);
    let huge = Page::<Size2MiB>::containing_address(VirtAddr::new(BASE + 6 * MIB2));
    let frame = PhysFrame::<Size2MiB>::containing_address(PhysAddr::new(0x4020_0000));
    m.map_huge(huge, frame, RW).unwrap();
    let addr = BASE + 6 * MIB2 + 0x12345;
    let (phys, flags, mapped) = m.tables.translate(VirtAddr::new(addr)).unwrap();
    assert_eq!(phys, PhysAddr::new(0x4020_0000 + 0x12345));
    assert_eq!(flags, RW | PageTableFlags::HUGE_PAGE);
    assert!(matches!(mapped, MappedFrame::Size2MiB(f) if f == frame));
    match m.reference(addr) {
        TranslateResult::Mapped {
            frame: f, offset, ..
        } => assert_eq!(f.start_address() + offset, phys),
        other => panic!("{other:?}"),
    }
    let (back, flush) = m.unmap_huge(huge).unwrap();
    assert_eq!((back, flush.range().map(|r| r.len())), (frame, Some(512)));
    assert_eq!(m.unmap_huge(huge), Err(Error::NotMapped));

    // A 1 GiB entry, written by hand into the PDPT the 2 MiB page left behind.
    let pdpt = PhysFrame::<Size4KiB>::containing_address(PhysAddr::new(
        m.table_copy(m.tables.root())[index(BASE, 0)] & ADDR_MASK,
    ));
    let giant = 0x8000_0000u64 | (RW | PageTableFlags::HUGE_PAGE).bits();
    let slot = pdpt.start_address() + index(BASE + 3 * GIB, 1) as u64 * 8;
    m.write_phys(slot, &giant.to_le_bytes());
    let (phys, _, mapped) = m
        .tables
        .translate(VirtAddr::new(BASE + 3 * GIB + 0x1234_5678))
        .unwrap();
    assert_eq!(phys, PhysAddr::new(0x8000_0000 + 0x1234_5678));
    assert!(matches!(mapped, MappedFrame::Size1GiB(_)));
    let frames = m.take(1);
    let inside = pages(BASE + 3 * GIB + MIB2, 1);
    assert_eq!(m.map(inside, frames, RW), Err(Error::HugePageInTheWay));
    assert_eq!(m.unmap(inside, |_, _| {}), Err(Error::HugePageInTheWay));
}

#[test]
fn range_calls_treat_a_whole_2m_entry_as_512_pages_and_refuse_part_of_one() {
    let m = &mut machine(2048, 37);
    let start = BASE + 10 * MIB2 - 2 * PAGE_SIZE;
    let small = m.take(4);
    m.map(pages(start, 2), small[..2].iter().copied(), RW)
        .unwrap();
    let huge = Page::<Size2MiB>::containing_address(VirtAddr::new(BASE + 10 * MIB2));
    let run = PhysFrame::<Size2MiB>::containing_address(PhysAddr::new(0x4000_0000));
    m.map_huge(huge, run, RW).unwrap();
    m.map(pages(BASE + 11 * MIB2, 2), small[2..].iter().copied(), RW)
        .unwrap();
    let whole = pages(start, 2 + 512 + 2);
    let first = PhysFrame::<Size4KiB>::containing_address(run.start_address());
    let mut expected: Vec<PhysFrame> = small[..2].to_vec();
    expected.extend((0..512).map(|i| first + i));
    expected.extend_from_slice(&small[2..]);

    // Part of the 2 MiB entry: refused, nothing changes.
    let snapshot = m.table_snapshot();
    let part = pages(start, 2 + 100);
    assert_eq!(
        m.protect(part, PageTableFlags::PRESENT),
        Err(Error::HugePageInTheWay)
    );
    assert_eq!(m.detach(part), Err(Error::HugePageInTheWay));
    assert!(m.table_snapshot() == snapshot);

    let read_only = PageTableFlags::GLOBAL;
    let flush = m.protect(whole, read_only).unwrap();
    assert_eq!(flush.range(), Some(whole));
    let (_, flags, mapped) = m
        .tables
        .translate(VirtAddr::new(BASE + 10 * MIB2 + 0x5000))
        .unwrap();
    assert_eq!(
        flags,
        read_only | PageTableFlags::PRESENT | PageTableFlags::HUGE_PAGE
    );
    assert!(matches!(mapped, MappedFrame::Size2MiB(f) if f == run));

    let flush = m.detach(whole).unwrap();
    assert_eq!(flush.range(), Some(whole));
    assert_eq!(
        m.tables.translate(VirtAddr::new(BASE + 10 * MIB2)).err(),
        Some(Error::NotMapped)
    );
    assert_eq!(
        m.detach(whole),
        Err(Error::NotMapped),
        "detached entries are not mapped"
    );
    let mut handed = Vec::new();
    m.reclaim(whole, |page, frame| handed.push((page, frame)))
        .unwrap();
    let pages_seen: Vec<_> = handed.iter().map(|&(page, _)| page).collect();
    assert_eq!(pages_seen, whole.collect::<Vec<_>>());
    let frames_seen: Vec<_> = handed.iter().map(|&(_, frame)| frame).collect();
    assert_eq!(frames_seen, expected);
    assert_eq!(
        m.map_huge(huge, run, RW),
        Ok(()),
        "the PD entry is free again"
    );
}

#[test]
fn splitting_a_2m_entry_keeps_every_translation_and_lets_part_of_it_go() {
    let m = &mut machine(2048, 43);
    let huge = Page::<Size2MiB>::containing_address(VirtAddr::new(BASE + 12 * MIB2));
    let run = PhysFrame::<Size2MiB>::containing_address(PhysAddr::new(0x4020_0000));
    let flags = RW | PageTableFlags::GLOBAL | PageTableFlags::NO_EXECUTE;
    m.map_huge(huge, run, flags).unwrap();
    assert_eq!(
        m.split_huge(Page::containing_address(VirtAddr::new(BASE + 14 * MIB2))),
        Err(Error::NotMapped)
    );

    let out = m.out();
    m.fail_from(Some(1));
    assert_eq!(m.split_huge(huge), Err(Error::OutOfFrames));
    m.fail_from(None);
    let flush = m.split_huge(huge).unwrap();
    assert_eq!(m.out(), out + 1, "one page table");
    assert_eq!(flush.range().map(|r| r.len()), Some(512));
    let first = PhysFrame::<Size4KiB>::containing_address(run.start_address());
    let frames: Vec<_> = (0..512).map(|i| first + i).collect();
    m.assert_mapped(BASE + 12 * MIB2, &frames, flags);
    assert_eq!(
        m.split_huge(huge),
        Err(Error::NotMapped),
        "a table is there now"
    );

    let mut back = Vec::new();
    let flush = m
        .unmap(
            pages(BASE + 12 * MIB2 + 256 * PAGE_SIZE, 256),
            |_, frame| back.push(frame),
        )
        .unwrap();
    assert_eq!(flush.range().map(|r| r.len()), Some(256));
    assert_eq!(back, frames[256..]);
    m.assert_mapped(BASE + 12 * MIB2, &frames[..256], flags);
}

/// A 2 MiB entry with its PAT bit (bit 12; a firmware's or a kernel's
/// write-combining framebuffer) splits into 4 KiB entries with theirs (bit 7), so
/// every page keeps its memory type; the frames stay the same.
#[test]
fn splitting_a_2m_entry_keeps_its_memory_type() {
    const PAT_2M: u64 = 1 << 12;
    const PAT_4K: u64 = 1 << 7;
    let m = &mut machine(2048, 44);
    let addr = BASE + 12 * MIB2;
    let huge = Page::<Size2MiB>::containing_address(VirtAddr::new(addr));
    let run = PhysFrame::<Size2MiB>::containing_address(PhysAddr::new(0x4020_0000));
    let flags = RW | PageTableFlags::WRITE_THROUGH;
    m.map_huge(huge, run, flags).unwrap();
    let next = |table: [u64; 512], level| {
        PhysFrame::containing_address(PhysAddr::new(table[index(addr, level)] & ADDR_MASK))
    };
    let pdpt = next(m.table_copy(m.sim.root()), 0);
    let pd = next(m.table_copy(pdpt), 1);
    let slot = pd.start_address() + index(addr, 2) as u64 * 8;
    let entry = m.table_copy(pd)[index(addr, 2)];
    m.write_phys(slot, &(entry | PAT_2M).to_le_bytes());

    let _flush = m.split_huge(huge).unwrap();
    let first = PhysFrame::<Size4KiB>::containing_address(run.start_address());
    let leaves = m.table_copy(next(m.table_copy(pd), 2));
    for (i, leaf) in leaves.iter().enumerate() {
        assert_eq!(
            leaf & ADDR_MASK,
            (first + i as u64).start_address().as_u64()
        );
        assert_eq!(leaf & PAT_4K, PAT_4K, "page {i} lost its PAT bit");
        assert_eq!(
            PageTableFlags::from_bits_truncate(leaf & !PAT_4K),
            flags,
            "page {i}"
        );
    }
}

/// `protect` keeps bit 7 whatever `flags` says, as its docs promise: `HUGE_PAGE` in
/// `flags` set the PAT bit of 4 KiB leaves (changing their memory type), and a
/// 4 KiB leaf's PAT bit stays set without it.
#[test]
fn protect_keeps_bit_7_whatever_the_flags_say() {
    const PAT_4K: u64 = 1 << 7;
    let m = &mut machine(2048, 45);
    let frames = m.take(4);
    m.map(pages(BASE, 4), frames, RW).unwrap();
    let leaf = |m: &Machine, addr: u64| {
        let mut table = m.sim.root();
        for level in 0..3 {
            let entry = m.table_copy(table)[index(addr, level)];
            table = PhysFrame::containing_address(PhysAddr::new(entry & ADDR_MASK));
        }
        (table, m.table_copy(table)[index(addr, 3)])
    };
    let flush = m
        .protect(pages(BASE, 4), RW | PageTableFlags::HUGE_PAGE)
        .unwrap();
    // SAFETY: a simulated machine whose TLB the test does not read.
    unsafe { flush.ignore() };
    assert_eq!(
        leaf(m, BASE).1 & PAT_4K,
        0,
        "HUGE_PAGE in flags set the PAT bit"
    );
    let (table, entry) = leaf(m, BASE);
    let slot = table.start_address() + index(BASE, 3) as u64 * 8;
    m.write_phys(slot, &(entry | PAT_4K).to_le_bytes());
    let flush = m.protect(pages(BASE, 4), PageTableFlags::PRESENT).unwrap();
    // SAFETY: as above.
    unsafe { flush.ignore() };
    let (_, entry) = leaf(m, BASE);
    assert_eq!(entry & PAT_4K, PAT_4K, "the PAT bit was dropped");
    assert_eq!(
        PageTableFlags::from_bits_truncate(entry & !PAT_4K) & !PageTableFlags::ACCESSED,
        PageTableFlags::PRESENT
    );
}

#[test]
fn a_huge_mapping_that_runs_out_of_table_frames_changes_nothing() {
    let m = &mut machine(256, 41);
    let huge = Page::<Size2MiB>::containing_address(VirtAddr::new(BASE + 8 * MIB2));
    let frame = PhysFrame::<Size2MiB>::containing_address(PhysAddr::new(0x4000_0000));
    let snapshot = m.table_snapshot();
    let out = m.out();
    for k in 1..=2 {
        m.fail_from(Some(k));
        let result = m.map_huge(huge, frame, RW);
        assert_eq!(result, Err(Error::OutOfFrames), "failing allocation {k}");
        assert!(m.table_snapshot() == snapshot && m.out() == out);
    }
    m.fail_from(None);
    m.map_huge(huge, frame, RW).unwrap();
    assert_eq!(m.out(), out + 2, "a PDPT and a PD");
}

#[test]
fn the_last_2m_page_of_each_half_unmaps_and_splits_with_a_token_inside_it() {
    for top in [0x7fff_ffe0_0000u64, 0xffff_ffff_ffe0_0000] {
        let m = &mut machine(2048, 41);
        let huge = Page::<Size2MiB>::containing_address(VirtAddr::new(top));
        let frame = PhysFrame::<Size2MiB>::containing_address(PhysAddr::new(0x4000_0000));
        m.map_huge(huge, frame, RW).unwrap();
        // The range stops a page short of the half's end, which no page range can
        // name; flushing any page of the 2 MiB entry drops it.
        let flush = m.split_huge(huge).unwrap();
        let range = flush.range().unwrap();
        assert_eq!(
            (range.start.start_address().as_u64(), range.len()),
            (top, 511),
            "{top:#x}"
        );
        let (phys, _, mapped) = m.tables.translate(VirtAddr::new(top + (MIB2 - 1))).unwrap();
        assert_eq!(phys, PhysAddr::new(0x4000_0000 + (MIB2 - 1)));
        assert!(matches!(mapped, MappedFrame::Size4KiB(_)), "split");

        let m = &mut machine(2048, 43);
        m.map_huge(huge, frame, RW).unwrap();
        let (back, flush) = m.unmap_huge(huge).unwrap();
        let range = flush.range().unwrap();
        assert_eq!(
            (back, range.start.start_address().as_u64(), range.len()),
            (frame, top, 511),
            "{top:#x}"
        );
        assert!(m.tables.translate(VirtAddr::new(top)).is_err(), "unmapped");
    }
}

/// A 2 MiB or 1 GiB leaf with a reserved address bit set (bit 13; tables the crate
/// did not write) is malformed: the MMU faults on it, and `translate` says so
/// instead of answering with a frame. Bit 12, the PAT bit, is no such bit.
#[test]
fn translate_refuses_huge_leaves_with_reserved_bits_as_the_mmu_does() {
    use vmalloc_sim::Access;
    let entry = |m: &Machine, table: u64, index: usize, value: u64| {
        m.write_phys(
            PhysAddr::new(table + index as u64 * 8),
            &value.to_le_bytes(),
        );
    };
    for (level, bit, malformed) in [(2, 13, true), (1, 13, true), (2, 12, false), (1, 12, false)] {
        let m = machine(4096, 45);
        let tables = m.take(2);
        for table in &tables {
            m.write_phys(table.start_address(), &[0; 4096]);
        }
        let (pdpt, pd) = (
            tables[0].start_address().as_u64(),
            tables[1].start_address().as_u64(),
        );
        let addr = BASE + 3 * GIB + 4 * MIB2;
        let root = m.tables.root().start_address().as_u64();
        entry(&m, root, index(addr, 0), pdpt | RW.bits());
        let leaf = (8 * GIB) | (1 << bit) | (RW | PageTableFlags::HUGE_PAGE).bits();
        if level == 2 {
            entry(&m, pdpt, index(addr, 1), pd | RW.bits());
            entry(&m, pd, index(addr, 2), leaf);
        } else {
            entry(&m, pdpt, index(addr, 1), leaf);
        }
        let mmu = m.sim.translate(VirtAddr::new(addr), Access::READ);
        let ours = m.tables.translate(VirtAddr::new(addr));
        assert_eq!(mmu.is_err(), malformed, "level {level}, bit {bit}: {mmu:?}");
        if malformed {
            assert_eq!(
                ours.map(|_| ()),
                Err(Error::HugePageInTheWay),
                "level {level}"
            );
        } else {
            let base = 8 * GIB + (addr & (if level == 2 { MIB2 } else { GIB } - 1));
            assert_eq!(
                ours.map(|(phys, ..)| phys),
                Ok(PhysAddr::new(base)),
                "level {level}"
            );
        }
    }
}
