//! The page-table test machine shared by the `paging*` tests: page tables on the
//! simulated machine's memory, the calls under test, and walkers that check them.

use vmalloc::frame::FaultInjector;
use vmalloc::paging::*;
use vmalloc::tlb::CountingFlush;
use vmalloc::{Error, FrameSource, PAGE_SIZE};
use vmalloc_sim::{SimConfig, SimFrames, SimMachine, SimPhys};
use x86_64::structures::paging::mapper::{MappedFrame, Translate, TranslateResult};
use x86_64::structures::paging::page::PageRange;
use x86_64::structures::paging::{Page, PageTableFlags, PhysFrame, Size2MiB};
use x86_64::{PhysAddr, VirtAddr};
/// A 512 GiB-aligned kernel address (PML4 index 402), as vmalloc areas use.
pub const BASE: u64 = 0xffff_c900_0000_0000;
pub const GIB: u64 = 1 << 30;
pub const MIB2: u64 = 2 << 20;
/// Bits of an entry that hold a physical address.
pub const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// The index of `addr`'s entry in its table at `level` (0 = PML4 ... 3 = PT).
pub const fn index(addr: u64, level: usize) -> usize {
    ((addr >> (39 - 9 * level)) & 511) as usize
}

pub const RW: PageTableFlags = PageTableFlags::PRESENT.union(PageTableFlags::WRITABLE);

/// Page tables rooted at the machine's PML4, with frames from its scattered
/// allocator behind an injector that can fail a chosen allocation.
pub struct Machine {
    pub frames: FaultInjector<SimFrames>,
    pub tables: PageTables<SimPhys<'static>>,
    pub sim: &'static SimMachine,
    start_free: u64,
}

/// A machine of at least `frames` frames whose free frames come in the order `seed`
/// scatters them.
pub fn machine(frames: usize, seed: u64) -> Machine {
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
    pub fn take(&self, n: usize) -> Vec<PhysFrame> {
        (0..n)
            .map(|_| self.frames.alloc_frame().expect("frames exhausted"))
            .collect()
    }

    /// Frames handed out since the machine was made and not given back.
    pub fn out(&self) -> usize {
        (self.start_free - self.frames.inner().stats().free) as usize
    }

    /// Makes the `k`-th allocation from now (1-based) fail, or disarms with `None`.
    pub fn fail_from(&self, k: Option<usize>) {
        match k {
            Some(k) => self.frames.fail_after(k as u64 - 1),
            None => self.frames.disarm(),
        }
    }

    /// A copy of the page table at `frame`.
    pub fn table_copy(&self, frame: PhysFrame) -> [u64; 512] {
        let bytes = self.sim.frame_bytes(frame);
        core::array::from_fn(|i| u64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().unwrap()))
    }

    pub fn frame_copy(&self, frame: PhysFrame) -> Vec<u8> {
        self.sim.frame_bytes(frame)
    }

    pub fn write_phys(&self, phys: PhysAddr, bytes: &[u8]) {
        // SAFETY: bytes the test owns: no live Rust value lives there.
        unsafe { self.sim.write_phys(phys, bytes) }
    }
}

pub fn page(addr: u64) -> Page {
    Page::containing_address(VirtAddr::new(addr))
}

pub fn pages(start: u64, count: u64) -> PageRange {
    Page::range(page(start), page(start + count * PAGE_SIZE))
}

/// The test machines have no TLB: flushing is only counted.
pub static NO_TLB: CountingFlush = CountingFlush::new();

/// The calls under test, on tables and frames of the test's own host memory, which
/// no CPU walks: nothing the library could map or unmap there is in use.
impl Machine {
    pub fn map<I>(
        &mut self,
        range: PageRange,
        frames: I,
        flags: PageTableFlags,
    ) -> Result<(), Error>
    where
        I: IntoIterator<Item = PhysFrame>,
        I::IntoIter: ExactSizeIterator,
    {
        // SAFETY: the frames are the test pool's; nothing uses the address space.
        unsafe { self.tables.map(range, frames, flags, &self.frames) }
    }

    pub fn unmap(
        &mut self,
        range: PageRange,
        on_frame: impl FnMut(Page, PhysFrame),
    ) -> Result<RangeFlush, Error> {
        // SAFETY: nothing uses the address space; no TLB caches it.
        unsafe { self.tables.unmap(range, on_frame) }
    }

    pub fn detach(&mut self, range: PageRange) -> Result<RangeFlush, Error> {
        // SAFETY: as for `unmap`.
        unsafe { self.tables.detach(range) }
    }

    pub fn reclaim(
        &mut self,
        range: PageRange,
        on_frame: impl FnMut(Page, PhysFrame),
    ) -> Result<(), Error> {
        // SAFETY: no TLB caches the test's address space.
        unsafe { self.tables.reclaim_detached(range, on_frame) }
    }

    pub fn protect(
        &mut self,
        range: PageRange,
        flags: PageTableFlags,
    ) -> Result<RangeFlush, Error> {
        // SAFETY: as for `unmap`.
        unsafe { self.tables.protect(range, flags) }
    }

    pub fn map_huge(
        &mut self,
        page: Page<Size2MiB>,
        frame: PhysFrame<Size2MiB>,
        flags: PageTableFlags,
    ) -> Result<(), Error> {
        // SAFETY: as for `map`; the 2 MiB frame is never accessed.
        unsafe { self.tables.map_huge_2m(page, frame, flags, &self.frames) }
    }

    pub fn unmap_huge(
        &mut self,
        page: Page<Size2MiB>,
    ) -> Result<(PhysFrame<Size2MiB>, RangeFlush), Error> {
        // SAFETY: as for `unmap`.
        unsafe { self.tables.unmap_huge_2m(page) }
    }

    pub fn split_huge(&mut self, page: Page<Size2MiB>) -> Result<RangeFlush, Error> {
        // SAFETY: as for `map`: the same frames stay mapped with the same rights.
        unsafe { self.tables.split_huge_2m(page, &self.frames) }
    }

    /// Unlinks the empty tables of `range` and frees them to the pool at once (no
    /// TLB to flush first).
    pub fn free_empty(&mut self, range: PageRange) -> (usize, RangeFlush) {
        let mut unlinked = Vec::new();
        let result = self
            .tables
            .free_empty_tables(range, |frame| unlinked.push(frame))
            .unwrap();
        // SAFETY: frames the test took and no longer uses (or a bad free, refused).
        unsafe { self.frames.free_frames(&unlinked) }.unwrap();
        result
    }
}

impl Machine {
    /// What the `x86_64` crate's walker says about `addr`.
    pub fn reference(&self, addr: u64) -> TranslateResult {
        // SAFETY: no reference into the tables is alive during the call.
        unsafe { self.sim.offset_page_table() }.translate(VirtAddr::new(addr))
    }

    /// Asserts the reference walker sees `frames[i]` with `flags` at page `i` from `start`.
    pub fn assert_mapped(&self, start: u64, frames: &[PhysFrame], flags: PageTableFlags) {
        self.assert_mapped_with(start, frames, |got| {
            assert_eq!(got, flags | PageTableFlags::PRESENT)
        });
    }

    /// Asserts the reference walker sees `frames[i]` at page `i` from `start`, and
    /// checks the flags it reports with `check_flags`.
    pub fn assert_mapped_with(
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

    pub fn assert_unmapped(&self, start: u64, count: u64) {
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
    pub fn table_snapshot(&self) -> Vec<(PhysFrame, [u64; 512])> {
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
    pub fn upper_flags(&self, addr: u64) -> [PageTableFlags; 3] {
        let mut frame = self.tables.root();
        core::array::from_fn(|level| {
            let raw = self.table_copy(frame)[index(addr, level)];
            frame = PhysFrame::containing_address(PhysAddr::new(raw & ADDR_MASK));
            PageTableFlags::from_bits_retain(raw & !ADDR_MASK) - CREATED
        })
    }
}
