//! The page-table cursor on the simulated machine's memory: whole-range map, unmap,
//! detach, protect and sweep, checked entry by entry and against the `x86_64` crate's
//! own walker.

use vmalloc::frame::FaultInjector;
use vmalloc::paging::*;
use vmalloc::tlb::CountingFlush;
use vmalloc::{Error, FrameSource, PAGE_SIZE, TlbFlush};
use vmalloc_sim::{SimConfig, SimFrames, SimMachine, SimPhys};
use x86_64::structures::paging::mapper::{MappedFrame, Translate, TranslateResult};
use x86_64::structures::paging::page::PageRange;
use x86_64::structures::paging::{Page, PageTableFlags, PhysFrame, Size2MiB, Size4KiB};
use x86_64::{PhysAddr, VirtAddr};

/// A 512 GiB-aligned kernel address (PML4 index 402), as vmalloc areas use.
const BASE: u64 = 0xffff_c900_0000_0000;
const GIB: u64 = 1 << 30;
const MIB2: u64 = 2 << 20;
/// Bits of an entry that hold a physical address.
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// The index of `addr`'s entry in its table at `level` (0 = PML4 ... 3 = PT).
const fn index(addr: u64, level: usize) -> usize {
    ((addr >> (39 - 9 * level)) & 511) as usize
}

const RW: PageTableFlags = PageTableFlags::PRESENT.union(PageTableFlags::WRITABLE);

/// Page tables rooted at the machine's PML4, with frames from its scattered
/// allocator behind an injector that can fail a chosen allocation.
struct Machine {
    frames: FaultInjector<SimFrames>,
    tables: PageTables<SimPhys<'static>>,
    sim: &'static SimMachine,
    start_free: u64,
}

/// A machine of at least `frames` frames whose free frames come in the order `seed`
/// scatters them.
fn machine(frames: usize, seed: u64) -> Machine {
    let size = (frames as u64 * PAGE_SIZE).max(16 << 20);
    // Leaked: the tables borrow the machine for the whole test.
    let sim: &'static SimMachine = Box::leak(Box::new(SimMachine::new(
        SimConfig::new(size).with_scatter_seed(seed),
    )));
    let frames = FaultInjector::new(sim.frames());
    // SAFETY: the machine's root is a zeroed PML4 that nothing else uses.
    let tables = unsafe { PageTables::new(sim.root(), sim.phys()) };
    let start_free = frames.inner().stats().free;
    Machine {
        frames,
        tables,
        sim,
        start_free,
    }
}

/// Pool-like helpers over the machine's frames and memory.
impl Machine {
    /// `n` frames, panicking if memory runs dry.
    fn take(&self, n: usize) -> Vec<PhysFrame> {
        (0..n)
            .map(|_| self.frames.alloc_frame().expect("frames exhausted"))
            .collect()
    }

    /// Frames handed out since the machine was made and not given back.
    fn out(&self) -> usize {
        (self.start_free - self.frames.inner().stats().free) as usize
    }

    /// Makes the `k`-th allocation from now (1-based) fail, or disarms with `None`.
    fn fail_from(&self, k: Option<usize>) {
        match k {
            Some(k) => self.frames.fail_after(k as u64 - 1),
            None => self.frames.disarm(),
        }
    }

    /// A copy of the page table at `frame`.
    fn table_copy(&self, frame: PhysFrame) -> [u64; 512] {
        let bytes = self.sim.frame_bytes(frame);
        core::array::from_fn(|i| u64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().unwrap()))
    }

    fn frame_copy(&self, frame: PhysFrame) -> Vec<u8> {
        self.sim.frame_bytes(frame)
    }

    fn write_phys(&self, phys: PhysAddr, bytes: &[u8]) {
        self.sim.write_phys(phys, bytes)
    }
}

fn page(addr: u64) -> Page {
    Page::containing_address(VirtAddr::new(addr))
}

fn pages(start: u64, count: u64) -> PageRange {
    Page::range(page(start), page(start + count * PAGE_SIZE))
}

/// The test machines have no TLB: flushing is only counted.
static NO_TLB: CountingFlush = CountingFlush::new();

/// The calls under test, on tables and frames of the test's own host memory, which
/// no CPU walks: nothing the library could map or unmap there is in use.
impl Machine {
    fn map<I>(&mut self, range: PageRange, frames: I, flags: PageTableFlags) -> Result<(), Error>
    where
        I: IntoIterator<Item = PhysFrame>,
        I::IntoIter: ExactSizeIterator,
    {
        // SAFETY: the frames are the test pool's; nothing uses the address space.
        unsafe { self.tables.map(range, frames, flags, &self.frames) }
    }

    fn unmap(
        &mut self,
        range: PageRange,
        on_frame: impl FnMut(Page, PhysFrame),
    ) -> Result<RangeFlush, Error> {
        // SAFETY: nothing uses the address space; no TLB caches it.
        unsafe { self.tables.unmap(range, on_frame) }
    }

    fn detach(&mut self, range: PageRange) -> Result<RangeFlush, Error> {
        // SAFETY: as for `unmap`.
        unsafe { self.tables.detach(range) }
    }

    fn reclaim(
        &mut self,
        range: PageRange,
        on_frame: impl FnMut(Page, PhysFrame),
    ) -> Result<(), Error> {
        // SAFETY: no TLB caches the test's address space.
        unsafe { self.tables.reclaim_detached(range, on_frame) }
    }

    fn protect(&mut self, range: PageRange, flags: PageTableFlags) -> Result<RangeFlush, Error> {
        // SAFETY: as for `unmap`.
        unsafe { self.tables.protect(range, flags) }
    }

    fn map_huge(
        &mut self,
        page: Page<Size2MiB>,
        frame: PhysFrame<Size2MiB>,
        flags: PageTableFlags,
    ) -> Result<(), Error> {
        // SAFETY: as for `map`; the 2 MiB frame is never accessed.
        unsafe { self.tables.map_huge_2m(page, frame, flags, &self.frames) }
    }

    fn unmap_huge(
        &mut self,
        page: Page<Size2MiB>,
    ) -> Result<(PhysFrame<Size2MiB>, RangeFlush), Error> {
        // SAFETY: as for `unmap`.
        unsafe { self.tables.unmap_huge_2m(page) }
    }

    fn split_huge(&mut self, page: Page<Size2MiB>) -> Result<RangeFlush, Error> {
        // SAFETY: as for `map`: the same frames stay mapped with the same rights.
        unsafe { self.tables.split_huge_2m(page, &self.frames) }
    }

    /// Unlinks the empty tables of `range` and frees them to the pool at once (no
    /// TLB to flush first).
    fn free_empty(&mut self, range: PageRange) -> (usize, RangeFlush) {
        let mut unlinked = Vec::new();
        let result = self
            .tables
            .free_empty_tables(range, |frame| unlinked.push(frame))
            .unwrap();
        self.frames.free_frames(&unlinked).unwrap();
        result
    }
}

impl Machine {
    /// What the `x86_64` crate's walker says about `addr`.
    fn reference(&self, addr: u64) -> TranslateResult {
        // SAFETY: no reference into the tables is alive during the call.
        unsafe { self.sim.offset_page_table() }.translate(VirtAddr::new(addr))
    }

    /// Asserts the reference walker sees `frames[i]` with `flags` at page `i` from `start`.
    fn assert_mapped(&self, start: u64, frames: &[PhysFrame], flags: PageTableFlags) {
        self.assert_mapped_with(start, frames, |got| {
            assert_eq!(got, flags | PageTableFlags::PRESENT)
        });
    }

    /// Asserts the reference walker sees `frames[i]` at page `i` from `start`, and
    /// checks the flags it reports with `check_flags`.
    fn assert_mapped_with(
        &self,
        start: u64,
        frames: &[PhysFrame],
        check_flags: impl Fn(PageTableFlags),
    ) {
        for (i, frame) in frames.iter().enumerate() {
            let addr = start + i as u64 * PAGE_SIZE;
            match self.reference(addr) {
                TranslateResult::Mapped {
                    frame: MappedFrame::Size4KiB(f),
                    offset: 0,
                    flags,
                } => {
                    assert_eq!(f, *frame, "page {addr:#x}");
                    check_flags(flags);
                }
                other => panic!("page {addr:#x}: {other:?}"),
            }
        }
    }

    fn assert_unmapped(&self, start: u64, count: u64) {
        for i in 0..count {
            let addr = start + i * PAGE_SIZE;
            assert!(
                matches!(self.reference(addr), TranslateResult::NotMapped),
                "page {addr:#x}"
            );
            assert!(matches!(
                self.tables.translate(VirtAddr::new(addr)),
                Err(Error::NotMapped)
            ));
        }
    }

    /// Every page-table frame reachable from the root, with its contents.
    fn table_snapshot(&self) -> Vec<(PhysFrame, [u64; 512])> {
        let mut out = Vec::new();
        self.collect_tables(self.tables.root(), 0, &mut out);
        out
    }

    fn collect_tables(
        &self,
        frame: PhysFrame,
        level: usize,
        out: &mut Vec<(PhysFrame, [u64; 512])>,
    ) {
        let entries = self.table_copy(frame);
        out.push((frame, entries));
        if level == 3 {
            return;
        }
        for raw in entries {
            let flags = PageTableFlags::from_bits_retain(raw);
            if flags.contains(PageTableFlags::PRESENT) && !flags.contains(PageTableFlags::HUGE_PAGE)
            {
                let child = PhysFrame::containing_address(PhysAddr::new(raw & ADDR_MASK));
                self.collect_tables(child, level + 1, out);
            }
        }
    }

    /// The flags of the upper entries on the path to `addr`: PML4, PDPT, PD.
    fn upper_flags(&self, addr: u64) -> [PageTableFlags; 3] {
        let mut frame = self.tables.root();
        core::array::from_fn(|level| {
            let raw = self.table_copy(frame)[index(addr, level)];
            frame = PhysFrame::containing_address(PhysAddr::new(raw & ADDR_MASK));
            PageTableFlags::from_bits_retain(raw & !ADDR_MASK) - CREATED
        })
    }
}

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
    m.frames.free_frames(&unlinked).unwrap();
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
