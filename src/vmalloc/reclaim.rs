//! Frames leaving the manager, and the counting of page tables taken.
//!
//! Every frame the manager gives back goes through one [`Reclaim`]: data frames
//! after the flush that covers their translations, page tables a sweep unlinked
//! (held until a flush covers every address they served, so no paging-structure
//! cache can still walk through a table someone reuses), and empty bookkeeping
//! slabs. They go back to the frame allocator in bulk.
//!
//! Two paths stay outside it, because they undo an allocation whose frames were never
//! used: the page-table cursor returning tables it took but did not need, and the
//! node pool returning frames of a reservation that failed halfway.

use super::locked::CHUNK;
use crate::paging::{PageTables, RangeFlush};
use crate::{Error, FrameSource, PhysMemory, TlbFlush};
use core::cell::Cell;
use x86_64::PhysAddr;
use x86_64::structures::paging::page::PageRange;
use x86_64::structures::paging::{PhysFrame, Size4KiB};

/// Frames on their way back to the frame allocator. Call [`finish`](Self::finish):
/// dropping it unfinished keeps the last frames.
pub(super) struct Reclaim<'a, F: FrameSource> {
    frames: &'a F,
    tlb: &'a dyn TlbFlush,
    held: [PhysFrame; CHUNK],
    len: usize,
    /// What unlinked page tables among `held` wait for.
    tables_flush: Option<RangeFlush>,
    /// Set while tables are being unlinked, before their flush is known: a full
    /// buffer then needs a full flush.
    unlinking: bool,
    tables: u64,
}

impl<'a, F: FrameSource> Reclaim<'a, F> {
    pub(super) fn new(frames: &'a F, tlb: &'a dyn TlbFlush) -> Self {
        Self {
            frames,
            tlb,
            held: [PhysFrame::containing_address(PhysAddr::zero()); CHUNK],
            len: 0,
            tables_flush: None,
            unlinking: false,
            tables: 0,
        }
    }

    /// A frame nothing can reach any more: a data frame whose translations were
    /// flushed (or never made), or an empty bookkeeping slab.
    pub(super) fn unreachable(&mut self, frame: PhysFrame) {
        if self.len == CHUNK {
            self.free_held();
        }
        self.held[self.len] = frame;
        self.len += 1;
    }

    /// Unlinks the empty tables this manager created below the root for `range`;
    /// they are freed after a flush covering the addresses they served.
    pub(super) fn sweep_tables<M: PhysMemory>(
        &mut self,
        tables: &mut PageTables<M>,
        range: PageRange,
    ) {
        self.unlink_tables(|push| tables.free_empty_tables(range, push));
    }

    /// Runs `unlink`, which hands unlinked page tables to its argument and returns
    /// how many and the flush covering what they served; they wait for that flush.
    pub(super) fn unlink_tables(
        &mut self,
        unlink: impl FnOnce(&mut dyn FnMut(PhysFrame)) -> Result<(usize, RangeFlush), Error>,
    ) {
        self.unlinking = true;
        let unlinked = unlink(&mut |frame| self.unreachable(frame));
        self.unlinking = false;
        if let Ok((count, flush)) = unlinked
            && count > 0
        {
            self.tables += count as u64;
            self.tables_flush = Some(match self.tables_flush {
                Some(earlier) => earlier.merge(flush),
                None => flush,
            });
        }
    }

    /// Frees the held frames, flushing first if tables among them wait for it.
    fn free_held(&mut self) {
        if self.unlinking {
            // Tables among the held frames wait for a flush not known yet.
            self.tlb.flush_all();
            self.tables_flush = None;
        } else if let Some(flush) = self.tables_flush.take() {
            flush.flush(self.tlb);
        }
        let held = &self.held[..self.len];
        if !held.is_empty() && self.frames.free_frames(held).is_err() {
            // Every frame here came from this source, which must take them back
            // (`FrameSource`'s contract). Should one be refused, free the rest one by
            // one rather than lose them all with it.
            for &frame in held {
                let _ = self.frames.free_frame(frame);
            }
        }
        self.len = 0;
    }

    /// Flushes for the unlinked tables and frees everything; returns how many page
    /// tables went back.
    pub(super) fn finish(mut self) -> u64 {
        self.free_held();
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
    fn free_frame(&self, frame: PhysFrame<Size4KiB>) -> Result<(), Error> {
        self.frames.free_frame(frame)?;
        self.net.set(self.net.get() - 1);
        Ok(())
    }
    fn free_frames(&self, frames: &[PhysFrame<Size4KiB>]) -> Result<(), Error> {
        self.frames.free_frames(frames)?;
        self.net.set(self.net.get() - frames.len() as i64);
        Ok(())
    }
    fn manages(&self, first: PhysFrame<Size4KiB>, count: u64) -> bool {
        self.frames.manages(first, count)
    }
}
