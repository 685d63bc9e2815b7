//! The gather: what unmaps detached, held until the TLB flush that covers it.
//!
//! Every frame and page table leaving the manager goes through a [`Gather`], and every
//! TLB flush the manager asks for is a gather's (Linux's `mmu_gather`, Asterinas's
//! `TlbFlusher`). A caller tells it which translations went stale
//! ([`stale`](Gather::stale)) and which frames they reached ([`free`](Gather::free)),
//! unlinks emptied page tables through it ([`sweep_tables`](Gather::sweep_tables));
//! the gather flushes, then releases: no frame or table is handed out again while a
//! TLB or a paging-structure cache may still reach it. Frames nothing ever mapped
//! (bookkeeping slabs, a rollback's fresh frames) go through it too, and wait for
//! nothing but the batch.
//!
//! # One flush for many ranges
//!
//! The stale ranges are flushed as one batch, by the rule Linux's
//! `tlb_single_page_flush_ceiling` sets: each range on its own while their pages
//! together stay within the TLB's [ceiling](TlbFlush::ceiling), one full flush above
//! it (or when a range can only be honoured by one). A freed page table waits for a
//! flush covering every address it served; while tables are being unlinked, before
//! that range is known, a full buffer is flushed whole.

use super::options::VmallocConfig;
use crate::paging::{PageTables, RangeFlush};
use crate::tlb::{FlushBatch, FlushTicket};
use crate::{Error, FrameSource, PhysMemory, TlbFlush};
use core::cell::Cell;
use x86_64::structures::paging::page::PageRange;
use x86_64::structures::paging::{Page, PhysFrame, Size4KiB};
use x86_64::{PhysAddr, VirtAddr};

/// Stale ranges a gather keeps apart; more are merged into the last one (flushing
/// more than changed is harmless).
const RANGES: usize = 16;

/// An empty range, for the unused slots.
const NO_RANGE: PageRange = PageRange {
    start: Page::containing_address(VirtAddr::zero()),
    end: Page::containing_address(VirtAddr::zero()),
};

/// Translations gone stale and not flushed yet.
#[derive(Clone, Copy)]
struct Stale {
    ranges: [PageRange; RANGES],
    len: usize,
    pages: u64,
    /// Only a full flush will do.
    all: bool,
}

impl Stale {
    const NONE: Stale = Stale {
        ranges: [NO_RANGE; RANGES],
        len: 0,
        pages: 0,
        all: false,
    };

    fn add(&mut self, flush: RangeFlush) {
        if flush.is_empty() {
            return;
        }
        let Some(range) = flush.range() else {
            self.all = true;
            return;
        };
        if self.len < RANGES {
            self.pages = self.pages.saturating_add(range.len());
            self.ranges[self.len] = range;
            self.len += 1;
            return;
        }
        // The rest merge into the last range, whose span (gaps included) is what a
        // range flush of it costs.
        let last = &mut self.ranges[RANGES - 1];
        match RangeFlush::from_range(*last).merge(flush).range() {
            Some(merged) => {
                self.pages = (self.pages - last.len()).saturating_add(merged.len());
                *last = merged;
            }
            None => self.all = true,
        }
    }

    fn is_empty(&self) -> bool {
        !self.all && self.len == 0
    }

    /// Flushes every stale range through `tlb`: each on its own within the ceiling,
    /// everything at once above it.
    fn flush(&mut self, tlb: &dyn TlbFlush) {
        if self.is_empty() {
            return;
        }
        if self.all || self.pages > tlb.ceiling() {
            tlb.flush_all();
        } else {
            // One batch: through a shootdown, one round of IPIs for all of them.
            tlb.flush_ranges(&self.ranges[..self.len]);
        }
        *self = Stale::NONE;
    }

    /// Starts flushing every stale range through `tlb` as [`flush`](Self::flush)
    /// would, recording in `ticket` what to wait for before anything they reached
    /// is reused.
    fn start(&mut self, tlb: &dyn TlbFlush, ticket: &mut FlushTicket) {
        if self.is_empty() {
            return;
        }
        if self.all || self.pages > tlb.ceiling() {
            tlb.start_flush(FlushBatch::All, ticket);
        } else {
            tlb.start_flush(FlushBatch::Ranges(&self.ranges[..self.len]), ticket);
        }
        *self = Stale::NONE;
    }
}

/// Frames taken from the allocator per bulk call while mapping, and frames handed
/// back per batch: one allocator lock per 128 frames. The batch is an array on the
/// stack (1 KiB), under the 2 KiB per frame Linux warns about.
pub(super) const CHUNK: usize = 128;

/// What unmaps detached, on its way out of the manager: see the [module
/// documentation](self). Call [`finish`](Self::finish): a gather dropped unfinished
/// keeps its frames (and flushes nothing), as a leak rather than a reuse.
pub(super) struct Gather<'a, F: FrameSource> {
    frames: &'a F,
    tlb: &'a dyn TlbFlush,
    stale: Stale,
    held: [PhysFrame; CHUNK],
    len: usize,
    /// Set while tables are being unlinked, before the range they served is known.
    unlinking: bool,
    /// Page tables released so far.
    tables: u64,
    /// The region whose page tables `sweep_tables` may unlink: tables that also serve
    /// addresses outside it are never its own alone (inclusive bounds).
    region: (u64, u64),
}

impl<'a, F: FrameSource> Gather<'a, F> {
    pub(super) fn new(frames: &'a F, tlb: &'a dyn TlbFlush) -> Self {
        Self {
            frames,
            tlb,
            stale: Stale::NONE,
            held: [PhysFrame::containing_address(PhysAddr::zero()); CHUNK],
            len: 0,
            unlinking: false,
            tables: 0,
            region: (0, u64::MAX),
        }
    }

    /// A gather of the manager whose region is `config`'s.
    pub(super) fn for_region(frames: &'a F, tlb: &'a dyn TlbFlush, config: &VmallocConfig) -> Self {
        let start = config.start.as_u64();
        Self {
            region: (start, start + (config.size - 1)),
            ..Self::new(frames, tlb)
        }
    }

    /// The translations `flush` names may still be cached: no frame gathered from
    /// now on leaves before they are flushed.
    pub(super) fn stale(&mut self, flush: RangeFlush) {
        self.stale.add(flush);
    }

    /// A frame to give back once every stale translation gathered so far is flushed:
    /// a data frame of an unmapped range, or a frame nothing maps (bookkeeping, a
    /// rollback's fresh frame).
    pub(super) fn free(&mut self, frame: PhysFrame) {
        if self.len == CHUNK {
            self.release();
        }
        self.held[self.len] = frame;
        self.len += 1;
    }

    /// Flushes every stale translation now; the frames stay until
    /// [`finish`](Self::finish). For calls that return only once every CPU dropped
    /// what they changed (`vunmap`, `iounmap`, `set_prot`, a shrinking `vrealloc`).
    pub(super) fn flush(&mut self) {
        self.stale.flush(self.tlb);
    }

    /// Starts flushing the stale translations gathered so far, recording in
    /// `ticket` what to wait for ([`TlbFlush::start_flush`]): for a caller that holds
    /// what they reached itself, and finishes the ticket before it lets go. The
    /// gather must hold no frame (they would leave at [`finish`](Self::finish),
    /// before the ticket is done).
    pub(super) fn start_flush(&mut self, ticket: &mut FlushTicket) {
        debug_assert_eq!(self.len, 0, "a gather holding frames starts no flush");
        self.stale.start(self.tlb, ticket);
    }

    /// Unlinks the empty tables this manager created below the root for `range`; they
    /// are freed after a flush covering the addresses they served. A table that also
    /// serves addresses outside the region stays (until the manager is dropped): the
    /// kernel's mappings next to the region may be using it, or have made it.
    pub(super) fn sweep_tables<M: PhysMemory>(
        &mut self,
        tables: &mut PageTables<M>,
        range: PageRange,
    ) {
        let region = self.region;
        self.unlink_tables(|push| tables.free_empty_tables_within(range, region, push));
    }

    /// Runs `unlink`, which hands unlinked page tables to its argument and returns
    /// how many and the flush covering what they served.
    pub(super) fn unlink_tables(
        &mut self,
        unlink: impl FnOnce(&mut dyn FnMut(PhysFrame)) -> Result<(usize, RangeFlush), Error>,
    ) {
        self.unlinking = true;
        let unlinked = unlink(&mut |frame| self.free(frame));
        self.unlinking = false;
        if let Ok((count, flush)) = unlinked
            && count > 0
        {
            self.tables += count as u64;
            self.stale(flush);
        }
    }

    /// Flushes, then gives every held frame back to the frame allocator.
    fn release(&mut self) {
        if self.unlinking {
            // Tables among the held frames wait for a flush not known yet.
            self.stale.all = true;
        }
        self.stale.flush(self.tlb);
        let held = &self.held[..self.len];
        // SAFETY: the held frames are unmapped, and flushed from every TLB just above:
        // nothing reaches them any more.
        if !held.is_empty() && unsafe { self.frames.free_frames(held) }.is_err() {
            // Every frame here came from this source, which must take them back
            // (`FrameSource`'s contract). Should one be refused, free the rest one by
            // one rather than lose them all with it.
            for &frame in held {
                // SAFETY: as above.
                let _ = unsafe { self.frames.free_frame(frame) };
            }
        }
        self.len = 0;
    }

    /// Flushes and releases everything; returns how many page tables went back.
    pub(super) fn finish(mut self) -> u64 {
        self.release();
        self.tables
    }

    /// Flushes, then hands the held frames to `keep` instead of the allocator (a
    /// CPU's frame cache takes flushed frames back); returns how many page tables
    /// `keep` was given among them (none unless tables were swept).
    pub(super) fn finish_into(mut self, keep: impl FnOnce(&[PhysFrame])) -> u64 {
        self.stale.flush(self.tlb);
        keep(&self.held[..self.len]);
        self.tables
    }
}

/// A frame source that counts the frames it hands out and takes back, so the
/// manager can report how many frames its page tables hold.
pub(super) struct CountingFrames<'a, F: FrameSource> {
    frames: &'a F,
    net: Cell<i64>,
}

impl<'a, F: FrameSource> CountingFrames<'a, F> {
    pub(super) fn new(frames: &'a F) -> Self {
        Self {
            frames,
            net: Cell::new(0),
        }
    }

    /// Frames handed out less frames taken back.
    pub(super) fn net(&self) -> i64 {
        self.net.get()
    }
}

// SAFETY: every frame comes from, and goes back to, the wrapped source.
unsafe impl<F: FrameSource> FrameSource for CountingFrames<'_, F> {
    fn alloc_frame(&self) -> Option<PhysFrame<Size4KiB>> {
        let frame = self.frames.alloc_frame()?;
        self.net.set(self.net.get() + 1);
        Some(frame)
    }
    unsafe fn free_frame(&self, frame: PhysFrame<Size4KiB>) -> Result<(), Error> {
        // SAFETY: forwarded from the caller.
        unsafe { self.frames.free_frame(frame) }?;
        self.net.set(self.net.get() - 1);
        Ok(())
    }
    unsafe fn free_frames(&self, frames: &[PhysFrame<Size4KiB>]) -> Result<(), Error> {
        // SAFETY: forwarded from the caller.
        unsafe { self.frames.free_frames(frames) }?;
        self.net.set(self.net.get() - frames.len() as i64);
        Ok(())
    }
    fn manages(&self, first: PhysFrame<Size4KiB>, count: u64) -> bool {
        self.frames.manages(first, count)
    }
}

#[cfg(test)]
mod test {
    use super::*;
    use crate::tlb::CountingFlush;
    use x86_64::VirtAddr;
    use x86_64::structures::paging::Page;

    fn tokens(count: u64, pages: u64) -> impl Iterator<Item = RangeFlush> {
        (0..count).map(move |i| {
            let start =
                Page::containing_address(VirtAddr::new(0xffff_c900_0000_0000)) + i * (pages + 1);
            RangeFlush::from_range(Page::range(start, start + pages))
        })
    }

    /// A gather with no frames to release: only its flushes are observed.
    fn flush_all_of(tlb: &CountingFlush, stale: impl Iterator<Item = RangeFlush>) {
        struct NoFrames;
        // SAFETY: hands out nothing, so it owes nothing back.
        unsafe impl FrameSource for NoFrames {
            fn alloc_frame(&self) -> Option<PhysFrame> {
                None
            }
            unsafe fn free_frame(&self, _: PhysFrame) -> Result<(), Error> {
                Ok(())
            }
            unsafe fn free_frames(&self, _: &[PhysFrame]) -> Result<(), Error> {
                Ok(())
            }
            fn manages(&self, _: PhysFrame, _: u64) -> bool {
                false
            }
        }
        let mut gather = Gather::new(&NoFrames, tlb);
        stale.for_each(|flush| gather.stale(flush));
        gather.finish();
    }

    /// Frames the gather holds go back only after the flush that drops the stale
    /// translations gathered before them, the last chunk at `finish` and each full
    /// chunk on the way: a frame given back before could be handed out again while
    /// a TLB still reaches it (`Vmalloc::drop` gives back its page tables so).
    #[test]
    fn held_frames_go_back_after_the_flush_of_what_was_gathered_before_them() {
        extern crate std;
        use std::cell::RefCell;
        use std::vec::Vec;
        /// Records, for each frame given back, the flushes done by then.
        struct Recording<'t> {
            tlb: &'t CountingFlush,
            flushes_at_free: RefCell<Vec<u64>>,
        }
        // SAFETY: hands out nothing; takes back whatever it is given.
        unsafe impl FrameSource for Recording<'_> {
            fn alloc_frame(&self) -> Option<PhysFrame> {
                None
            }
            unsafe fn free_frame(&self, frame: PhysFrame) -> Result<(), Error> {
                // SAFETY: forwarded.
                unsafe { self.free_frames(&[frame]) }
            }
            unsafe fn free_frames(&self, frames: &[PhysFrame]) -> Result<(), Error> {
                let done = self.tlb.range_calls() + self.tlb.full_calls();
                let mut seen = self.flushes_at_free.borrow_mut();
                seen.extend(frames.iter().map(|_| done));
                Ok(())
            }
            fn manages(&self, _: PhysFrame, _: u64) -> bool {
                true
            }
        }
        let tlb = CountingFlush::new();
        let frames = Recording {
            tlb: &tlb,
            flushes_at_free: RefCell::new(Vec::new()),
        };
        let mut gather = Gather::new(&frames, &tlb);
        let frame = |n: u64| PhysFrame::containing_address(PhysAddr::new(n << 12));
        let mut stale = tokens(3 * CHUNK as u64, 1);
        for n in 0..3 * CHUNK as u64 {
            gather.stale(stale.next().unwrap());
            gather.free(frame(n + 1));
        }
        gather.finish();
        let seen = frames.flushes_at_free.into_inner();
        assert_eq!(seen.len(), 3 * CHUNK);
        // Each chunk went back after a flush of everything gathered before it.
        for (chunk, flushes) in seen.chunks(CHUNK).enumerate() {
            assert!(
                flushes.iter().all(|&done| done > chunk as u64),
                "chunk {chunk} went back before its flush: {flushes:?}"
            );
        }
        assert_eq!(
            seen.last().copied(),
            Some(tlb.range_calls() + tlb.full_calls())
        );
    }

    /// Past 16 ranges the rest merge into the last, whose span covers the gaps
    /// between them: a batch handed to `flush_ranges` stays within the ceiling with
    /// the merged span counted (20 one-page ranges a GiB apart counted 20 pages, and
    /// went as ranges of some 4 GiB of pages: one `invlpg` each to a policy that
    /// trusts the ceiling), else it is one full flush.
    #[test]
    fn merged_ranges_count_their_whole_span_against_the_ceiling() {
        let tlb = CountingFlush::with_ceiling(64);
        let far_apart = (0..20u64).map(|i| {
            let start = Page::containing_address(VirtAddr::new(0xffff_c900_0000_0000 + (i << 30)));
            RangeFlush::from_range(Page::range(start, start + 1))
        });
        flush_all_of(&tlb, far_apart);
        assert!(
            tlb.range_pages() <= 64,
            "{} pages as ranges",
            tlb.range_pages()
        );
        assert_eq!((tlb.range_calls(), tlb.full_calls()), (0, 1));
    }

    #[test]
    fn stale_ranges_are_flushed_range_by_range_within_the_ceiling_and_at_once_above_it() {
        let tlb = CountingFlush::new();
        flush_all_of(&tlb, tokens(11, 3));
        assert_eq!((tlb.range_calls(), tlb.full_calls()), (11, 0), "33 pages");
        flush_all_of(&tlb, tokens(17, 2));
        assert_eq!((tlb.range_calls(), tlb.full_calls()), (11, 1), "34 pages");
        let wide = CountingFlush::with_ceiling(1000);
        flush_all_of(&wide, tokens(16, 2));
        assert_eq!(
            (wide.range_calls(), wide.full_calls()),
            (16, 0),
            "its own ceiling"
        );
        flush_all_of(&wide, tokens(40, 2));
        assert_eq!(
            (wide.range_calls(), wide.full_calls()),
            (32, 0),
            "past 16 ranges the rest merge into the last"
        );
        assert!(wide.range_pages() >= 16 * 2 + 16 * 2 + 24 * 2);
        flush_all_of(&wide, tokens(0, 2));
        flush_all_of(&wide, tokens(5, 0));
        assert_eq!(
            (wide.range_calls(), wide.full_calls()),
            (32, 0),
            "nothing to do"
        );
    }
}
