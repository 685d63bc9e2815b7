//! Lazy freeing: freed areas wait on a list, and one purge flushes them all.
//!
//! Unmapping needs a TLB flush before the frames or the virtual range may be reused,
//! and on an SMP machine a flush is an inter-processor interrupt. Like Linux
//! (`purge_vmap_area_lazy`), `vfree` does not flush. It *detaches* the area's entries
//! (clears their present bit, so new walks fault at once) and moves the area from the
//! area map to the purge list, with the flush token the detach returned. When the list
//! holds more than [`VmallocConfig::lazy_threshold_pages`] pages, or the region or the
//! frame allocator runs dry, or [`Vmalloc::purge`] is called, one purge issues every
//! waiting token as one batch (through the manager's gather: the TLB's own ceiling decides between
//! range flushes and one full flush). Then it returns the frames, unlinks the page
//! tables left empty and frees them after one more flush covering every address they
//! served, and only then frees the virtual ranges. [`VmallocConfig::eager`] purges on
//! every free instead.
//!
//! Linux returns the pages to the page allocator right away and lets a stale TLB entry
//! point at a page that someone else may already own. Here the frames stay recorded in
//! the detached entries themselves (the hardware ignores every bit of a non-present
//! entry) and go back to the frame allocator after the flush: no frame is handed out
//! again while a stale translation may still reach it, and waiting costs no memory.
//!
//! The list is carved from the bookkeeping pool: the slot the area map just released is
//! the one the entry takes, so queueing never needs a frame, and lookups only ever
//! search live areas, however many frees wait.
//!
//! [`VmallocConfig::lazy_threshold_pages`]: super::VmallocConfig::lazy_threshold_pages
//! [`VmallocConfig::eager`]: super::VmallocConfig::eager
//! [`Vmalloc::purge`]: super::Vmalloc::purge

use super::area::{AreaKind, AreaRecord};
use super::blocks::Located;
use super::locked::{Locked, invariant, page_range};
use super::nodes::NodePool;
use super::options::{HUGE_PAGE_SIZE, VmallocConfig};
use super::tree::slot_size_for;
use crate::paging::{PageTables, RangeFlush};
use crate::{Error, FrameSource, PhysMemory, TlbFlush};
use core::ptr::null_mut;
use x86_64::VirtAddr;
use x86_64::structures::paging::Page;
use x86_64::structures::paging::page::PageRange;

/// One freed area: where it starts, what it was, and the flush its detach asked for.
#[derive(Clone, Copy)]
struct Pending {
    next: *mut Pending,
    start: VirtAddr,
    record: AreaRecord,
    flush: RangeFlush,
}

/// Bytes a bookkeeping slot needs: the trees' nodes and a purge-list entry.
pub(super) const SLOT_SIZE: usize = {
    let nodes = slot_size_for::<AreaRecord>();
    let entry = size_of::<Pending>();
    if nodes > entry { nodes } else { entry }
};

/// The pending areas (a stack: order does not matter to one flush) and their totals.
pub(super) struct PurgeList {
    head: *mut Pending,
    /// Pages detached (mapped before the free) in all pending areas.
    pub(super) pages: u64,
    /// Frames of pending areas that go back to the frame allocator after the flush.
    pub(super) frames: u64,
    /// Virtual bytes the pending areas still take.
    pub(super) bytes: u64,
}

// SAFETY: the list exclusively owns its entries, which live in the pool's frames and
// move with the manager's state.
unsafe impl Send for PurgeList {}

impl PurgeList {
    /// An empty list.
    pub(super) const fn new() -> Self {
        Self {
            head: null_mut(),
            pages: 0,
            frames: 0,
            bytes: 0,
        }
    }

    /// Whether nothing waits.
    pub(super) fn is_empty(&self) -> bool {
        self.head.is_null()
    }

    /// Queues the area at `start`, already removed from the area map, with the flush
    /// its detach returned.
    ///
    /// # Panics
    ///
    /// If the pool has no free slot: the caller frees the area's node first.
    fn push<F: FrameSource, M: PhysMemory>(
        &mut self,
        pool: &mut NodePool<F, M>,
        start: VirtAddr,
        record: AreaRecord,
        flush: RangeFlush,
    ) {
        let next = self.head;
        self.head = pool.take(Pending {
            next,
            start,
            record,
            flush,
        });
        self.pages += record.mapped_pages;
        if record.kind.owns_frames() {
            self.frames += record.mapped_pages;
        }
        self.bytes += record.span();
    }

    /// The pending area whose span (guard page included) holds `addr`.
    pub(super) fn find_containing(&self, addr: VirtAddr) -> Option<(VirtAddr, AreaRecord)> {
        let mut entry = self.head;
        // SAFETY: linked entries stay valid until `pop` gives them back.
        while let Some(pending) = unsafe { entry.as_ref() } {
            if addr.as_u64().wrapping_sub(pending.start.as_u64()) < pending.record.span() {
                return Some((pending.start, pending.record));
            }
            entry = pending.next;
        }
        None
    }

    /// The flush tokens of the pending areas.
    fn tokens(&self) -> impl Iterator<Item = RangeFlush> + Clone + '_ {
        let mut entry = self.head;
        core::iter::from_fn(move || {
            // SAFETY: linked entries stay valid until `pop` gives them back.
            let pending = unsafe { entry.as_ref() }?;
            entry = pending.next;
            Some(pending.flush)
        })
    }

    /// Takes the first pending area off the list, giving its entry's slot back to
    /// `pool` first, so freeing the area's range may take one node without a frame.
    /// The totals are left alone: they describe the list as it was queued.
    fn pop<F: FrameSource, M: PhysMemory>(
        &mut self,
        pool: &mut NodePool<F, M>,
    ) -> Option<(VirtAddr, AreaRecord)> {
        let entry = self.head;
        if entry.is_null() {
            return None;
        }
        // SAFETY: `entry` is a linked entry taken from `pool`; it is read once and then
        // unlinked, so giving its slot back leaves nothing pointing at it.
        let pending = unsafe { entry.read() };
        self.head = pending.next;
        // SAFETY: as above: the slot came from `pool` and is no longer used.
        unsafe { pool.give(entry.cast()) };
        Some((pending.start, pending.record))
    }
}

impl<F, M, T> Locked<'_, F, M, T>
where
    F: FrameSource + Clone,
    M: PhysMemory + Copy,
    T: TlbFlush,
{
    /// Frees an area: detaches its mapped pages and queues it for the batched flush,
    /// purging when the list has grown past the threshold (at once when eager).
    pub(super) fn retire(&mut self, start: VirtAddr, record: AreaRecord) {
        self.queue_for_purge(start, record);
        let config = self.vm.config();
        if config.eager || self.inner().purge.pages > config.lazy_threshold_pages {
            self.purge();
        }
    }

    /// [`vfree`](Self::vfree) of the tree area starting at `ptr` if it carries `tag`
    /// ([`Error::WrongKind`] if not).
    pub(super) fn vfree_tagged(&mut self, ptr: *mut u8, tag: &str) -> Result<(), Error> {
        self.free_tree_area(ptr, |record| record.tag == tag)
    }

    /// Frees the `vmalloc` or reserved area starting at `ptr`: `vfree` under the lock.
    pub(super) fn vfree(&mut self, ptr: *mut u8) -> Result<(), Error> {
        if let Located::Zone(at) = self.vm.blocks.locate(ptr as u64) {
            // Under the lock the CPU's cache may be held by the caller: flush now.
            return self.vm.free_in_block(at, true);
        }
        self.free_tree_area(ptr, |_| true)
    }

    /// Frees the tree's `vmalloc` or reserved area starting at `ptr` if `wanted`
    /// takes its record ([`Error::WrongKind`] if not).
    fn free_tree_area(
        &mut self,
        ptr: *mut u8,
        wanted: impl FnOnce(&AreaRecord) -> bool,
    ) -> Result<(), Error> {
        let (start, record) = self.live_area_at(ptr, &[AreaKind::Vmalloc, AreaKind::Reserved])?;
        if !wanted(&record) {
            return Err(Error::WrongKind);
        }
        self.inner().uncount_data(&record);
        self.retire(start, record);
        Ok(())
    }

    /// Detaches the area's pages and moves it from the area map to the purge list.
    fn queue_for_purge(&mut self, start: VirtAddr, record: AreaRecord) {
        let inner = self.inner();
        let mapped = page_range(start, record.frame_pages());
        let mut flush = RangeFlush::from_range(mapped);
        if record.sparse {
            flush = super::sparse::detach_each(&mut inner.tables, mapped);
        } else if !mapped.is_empty() {
            // SAFETY: the area is being freed, its pages are this manager's; the purge
            // issues the returned flush before their frames or range are reused.
            match unsafe { inner.tables.detach(mapped) } {
                Ok(detached) => flush = detached,
                Err(error) => invariant(Err(error)),
            }
        }
        // The area's node goes back to the pool and the purge entry takes it.
        let removed = inner.areas.remove(&mut inner.pool, start);
        debug_assert_eq!(removed.map(|area| area.size), Some(record.span()));
        inner.purge.push(&mut inner.pool, start, record, flush);
    }

    /// Frees every live area, as `vfree` (or `vunmap`, `iounmap`) would, without
    /// purging: the manager's teardown.
    pub(super) fn retire_all(&mut self) {
        while let Some(area) = self.inner().areas.first_from(0) {
            if area.data.kind.owns_frames() {
                self.inner().uncount_data(&area.data);
            }
            self.queue_for_purge(area.start, area.data);
        }
    }

    /// One batched flush for every pending area, then their frames, emptied page
    /// tables and ranges return.
    pub(super) fn purge(&mut self) {
        let vm = self.vm;
        let inner = self.inner();
        if inner.purge.is_empty() {
            return;
        }
        let mut gather = vm.gather();
        inner.purge.tokens().for_each(|flush| gather.stale(flush));
        gather.flush();
        let mut pending = core::mem::replace(&mut inner.purge, PurgeList::new());
        // Neighbouring areas share leaf tables: each table is swept once, when the
        // run of 2 MiB regions the purged areas touch ends.
        let mut sweep = SweepWindow::default();
        while let Some((start, record)) = pending.pop(&mut inner.pool) {
            let owns_frames = record.kind.owns_frames();
            let range = page_range(start, record.frame_pages());
            let mut reclaim = |tables: &mut PageTables<M>, range| {
                // SAFETY: the batch above flushed the range.
                unsafe {
                    tables.reclaim_detached(range, |_, frame| {
                        if owns_frames {
                            gather.free(frame)
                        }
                    })
                }
            };
            if record.sparse {
                super::sparse::each_page(&mut inner.tables, range, |tables, page| {
                    match reclaim(tables, page) {
                        // A page never mapped, or unmapped before the free: nothing there.
                        Ok(()) | Err(Error::NotMapped) => {}
                        other => invariant(other),
                    }
                });
            } else {
                invariant(reclaim(&mut inner.tables, range));
            }
            if let Some(done) = sweep.extend(range) {
                gather.sweep_tables(&mut inner.tables, in_region(vm.config(), done));
            }
            // The entry's slot was just given back: freeing the range cannot fail.
            invariant(inner.space.free(&mut inner.pool, start, record.span()));
        }
        if let Some(last) = sweep.window {
            gather.sweep_tables(&mut inner.tables, in_region(vm.config(), last));
        }
        inner.page_table_frames -= gather.finish();
        inner.purges += 1;
    }
}

/// The 2 MiB regions (one leaf table each) of the areas a purge has reclaimed since
/// the last sweep, as long as they stay one run.
#[derive(Default)]
struct SweepWindow {
    window: Option<(u64, u64)>,
}

impl SweepWindow {
    /// Adds `range`; returns the window to sweep now when `range` does not touch it.
    fn extend(&mut self, range: PageRange) -> Option<(u64, u64)> {
        if range.is_empty() {
            return None;
        }
        const REGION: u64 = HUGE_PAGE_SIZE;
        let low = range.start.start_address().as_u64() & !(REGION - 1);
        let end = range.end.start_address().as_u64();
        let high = end.checked_next_multiple_of(REGION).unwrap_or(end);
        match self.window {
            Some((start, end)) if low <= end && high >= start => {
                self.window = Some((start.min(low), end.max(high)));
                None
            }
            done => {
                self.window = Some((low, high));
                done
            }
        }
    }
}

/// The pages of `[start, end)` inside the region.
fn in_region(config: &VmallocConfig, (start, end): (u64, u64)) -> PageRange {
    let region = config.start.as_u64();
    let first = VirtAddr::new(start.max(region));
    let last = VirtAddr::new(end.min(region + config.size));
    Page::range(
        Page::containing_address(first),
        Page::containing_address(last),
    )
}
