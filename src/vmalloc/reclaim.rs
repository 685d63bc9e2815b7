//! Frames on their way back to the frame allocator, and the counting of those taken.
//!
//! Every frame the manager gives back (data frames after the flush that covers them,
//! page tables a sweep unlinked) goes through a [`FrameBatch`], which frees them in
//! bulk; the node pool gives its slabs back itself (`NodePool::shrink`).

use super::CHUNK;
use crate::paging::{PageTables, RangeFlush};
use crate::{Error, FrameSource, PhysMemory, TlbFlush};
use core::cell::Cell;
use x86_64::PhysAddr;
use x86_64::structures::paging::page::PageRange;
use x86_64::structures::paging::{PhysFrame, Size4KiB};

/// Frames to free in bulk. Pushing a frame promises it may be freed as soon as the
/// batch is full: for page tables, whose flush comes at the end, the batch flushes
/// the whole TLB first when it overflows ([`FrameBatch::flushing_on_overflow`]).
pub(super) struct FrameBatch<'a, F: FrameSource> {
    frames: &'a F,
    overflow_flush: Option<&'a dyn TlbFlush>,
    held: [PhysFrame; CHUNK],
    len: usize,
}

impl<'a, F: FrameSource> FrameBatch<'a, F> {
    pub(super) fn new(frames: &'a F) -> Self {
        Self {
            frames,
            overflow_flush: None,
            held: [PhysFrame::containing_address(PhysAddr::zero()); CHUNK],
            len: 0,
        }
    }

    /// A batch for frames that are freed only after a flush still to come.
    pub(super) fn flushing_on_overflow(frames: &'a F, tlb: &'a dyn TlbFlush) -> Self {
        Self {
            overflow_flush: Some(tlb),
            ..Self::new(frames)
        }
    }

    pub(super) fn push(&mut self, frame: PhysFrame) {
        if self.len == CHUNK {
            if let Some(tlb) = self.overflow_flush {
                tlb.flush_all();
            }
            self.free_held();
        }
        self.held[self.len] = frame;
        self.len += 1;
    }

    fn free_held(&mut self) {
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

    /// Frees what is left.
    pub(super) fn finish(mut self) {
        self.free_held();
    }
}

/// Page tables left empty by unmapping, unlinked from their parents at once but
/// freed only after one flush covering every address they served, so no
/// paging-structure cache can still walk through a table someone reuses.
pub(super) struct TableSweep<'a, F: FrameSource> {
    tables: FrameBatch<'a, F>,
    flush: Option<RangeFlush>,
    freed: u64,
}

impl<'a, F: FrameSource> TableSweep<'a, F> {
    pub(super) fn new(frames: &'a F, tlb: &'a dyn TlbFlush) -> Self {
        Self {
            tables: FrameBatch::flushing_on_overflow(frames, tlb),
            flush: None,
            freed: 0,
        }
    }

    /// Unlinks the empty tables this manager created below the root for `range`.
    pub(super) fn sweep<M: PhysMemory>(&mut self, tables: &mut PageTables<M>, range: PageRange) {
        let batch = &mut self.tables;
        if let Ok((freed, flush)) = tables.free_empty_tables(range, |frame| batch.push(frame)) {
            self.add(freed, flush);
        }
    }

    /// Counts `freed` unlinked tables whose addresses `flush` covers.
    pub(super) fn add(&mut self, freed: usize, flush: RangeFlush) {
        if freed > 0 {
            self.freed += freed as u64;
            self.flush = Some(self.flush.map_or(flush, |earlier| earlier.merge(flush)));
        }
    }

    /// The batch the unlinked tables go to, for unlinking that is not a sweep.
    pub(super) fn batch(&mut self) -> &mut FrameBatch<'a, F> {
        &mut self.tables
    }

    /// Flushes once and frees the tables; returns how many.
    pub(super) fn finish(self, tlb: &dyn TlbFlush) -> u64 {
        if let Some(flush) = self.flush {
            flush.flush(tlb);
        }
        self.tables.finish();
        self.freed
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
