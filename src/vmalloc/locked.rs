//! The manager with its lock held: the steps every call is made of, each undoing
//! itself on failure.

use super::area::{AreaKind, AreaRecord};
use super::blocks::Located;
use super::gather::{CHUNK, CountingFrames, Gather};
use super::manager::Vmalloc;
use super::nodes::NodePool;
use super::purge::PurgeList;
use super::space::{AreaMap, VSpace};
use crate::paging::{PageTables, RootEntries};
use crate::sync::IrqGuard;
use crate::{Error, FrameSource, PAGE_SIZE, PhysMemory, TlbFlush};
use core::ptr::NonNull;
use x86_64::structures::paging::mapper::MappedFrame;
use x86_64::structures::paging::page::PageRange;
use x86_64::structures::paging::{Page, PageTableFlags, PhysFrame};
use x86_64::{PhysAddr, VirtAddr};

/// Frames per bulk call for small areas.
const SMALL_CHUNK: usize = 16;

/// Empty bookkeeping slabs kept after a call, so alternating calls do not take and
/// give back a frame each time.
const KEEP_EMPTY_PAGES: usize = 1;

/// The manager's state, under its lock.
pub(super) struct Inner<F: FrameSource, M: PhysMemory + Copy> {
    pub(super) tables: PageTables<M>,
    pub(super) space: VSpace,
    pub(super) areas: AreaMap<AreaRecord>,
    pub(super) pool: NodePool<F, M>,
    pub(super) purge: PurgeList,
    /// Tables this manager created and has not freed, the top-level ones included.
    pub(super) page_table_frames: u64,
    pub(super) data_frames: u64,
    /// 2 MiB mappings among the data frames.
    pub(super) huge_mappings: u64,
    pub(super) purges: u64,
    /// `vmap` areas being unmapped: still in `areas`, in no lookup or listing.
    pub(super) dying: u64,
    /// Deferred frees whose pointer `vfree` would have refused.
    pub(super) deferred_refused: u64,
    /// The region's root entries that held a table before the manager: never cleared.
    pub(super) adopted_roots: RootEntries,
}

impl<F: FrameSource, M: PhysMemory + Copy> Inner<F, M> {
    /// Stops counting the data frames (and 2 MiB mappings) of an area being freed.
    pub(super) fn uncount_data(&mut self, record: &AreaRecord) {
        self.data_frames -= record.mapped_pages;
        self.huge_mappings -= record.huge_mappings;
    }
}

// SAFETY: `Inner` holds raw pointers into frames it owns (page tables, bookkeeping
// nodes); they are only dereferenced with the manager's lock held, so moving the
// state to another CPU is sound whenever the phys-to-virt access itself may move.
unsafe impl<F: FrameSource + Send, M: PhysMemory + Copy + Send> Send for Inner<F, M> {}

/// A [`Vmalloc`] whose lock this value holds. Dropping it gives back all but
/// [`KEEP_EMPTY_PAGES`] empty bookkeeping slabs, then unlocks.
pub(super) struct Locked<'v, F: FrameSource + Clone, M: PhysMemory + Copy, T: TlbFlush> {
    pub(super) vm: &'v Vmalloc<F, M, T>,
    guard: IrqGuard<'v, Inner<F, M>>,
}

impl<F: FrameSource + Clone, M: PhysMemory + Copy, T: TlbFlush> Drop for Locked<'_, F, M, T> {
    fn drop(&mut self) {
        if self.guard.pool.empty_pages() > KEEP_EMPTY_PAGES {
            let mut gather = self.vm.gather();
            self.guard
                .pool
                .shrink(KEEP_EMPTY_PAGES, |frame| gather.free(frame));
            gather.finish();
        }
    }
}

impl<'v, F, M, T> Locked<'v, F, M, T>
where
    F: FrameSource + Clone,
    M: PhysMemory + Copy,
    T: TlbFlush,
{
    pub(super) fn new(vm: &'v Vmalloc<F, M, T>, guard: IrqGuard<'v, Inner<F, M>>) -> Self {
        Self { vm, guard }
    }

    /// The state under the lock.
    pub(super) fn inner(&mut self) -> &mut Inner<F, M> {
        &mut self.guard
    }

    /// The live area starting exactly at `ptr`, of one of `kinds`.
    pub(super) fn live_area_at(
        &self,
        ptr: *mut u8,
        kinds: &[AreaKind],
    ) -> Result<(VirtAddr, AreaRecord), Error> {
        if ptr.is_null() {
            return Err(Error::NullPointer);
        }
        let addr = VirtAddr::try_new(ptr as u64).map_err(|_| Error::NotInRegion)?;
        if !self.vm.is_vmalloc_addr(addr) {
            return Err(Error::NotInRegion);
        }
        if let Located::Zone(at) = self.vm.blocks.locate(addr.as_u64()) {
            // Areas in per-CPU blocks are only ever `vmalloc` areas, which the
            // callers that accept them look up before taking the lock.
            return Err(match self.vm.block_area(at) {
                Some((area, false)) if area.start == addr => Error::WrongKind,
                Some((_, false)) => Error::InteriorPointer,
                _ => Error::NotAllocated,
            });
        }
        let (start, _, record) = self.area_containing(addr).ok_or(Error::NotAllocated)?;
        if record.dying {
            return Err(Error::NotAllocated);
        }
        let offset = addr - start;
        // An `ioremap` pointer keeps its physical address's offset in the page.
        let its_own = offset == 0 || (record.kind == AreaKind::Ioremap && offset < PAGE_SIZE);
        if its_own && !kinds.contains(&record.kind) {
            return Err(Error::WrongKind);
        }
        if offset != 0 {
            // A stack's memory starts past its unmapped lower half (`lead` pages).
            let lead = record.lead * PAGE_SIZE;
            let inside = offset >= lead && offset - lead < record.size;
            return Err(if inside {
                Error::InteriorPointer
            } else {
                Error::NotAllocated
            });
        }
        Ok((start, record))
    }

    /// The area whose span (guard page included) contains `addr`.
    pub(super) fn area_containing(&self, addr: VirtAddr) -> Option<(VirtAddr, u64, AreaRecord)> {
        self.guard
            .areas
            .find_containing(addr)
            .map(|area| (area.start, area.size, area.data))
    }

    /// What the page tables map `addr` to.
    pub(super) fn translate(
        &self,
        addr: VirtAddr,
    ) -> Result<(PhysAddr, PageTableFlags, MappedFrame), Error> {
        self.guard.tables.translate(addr)
    }

    /// The record of the live area at `start`, to update in place.
    pub(super) fn record_mut(&mut self, start: VirtAddr) -> &mut AreaRecord {
        self.guard
            .areas
            .data_mut(start)
            .expect("the area was looked up under the same lock")
    }

    /// Runs `op`, which must change nothing when it fails; if it runs out of frames or
    /// virtual space while areas wait on the purge list, purges and runs it again.
    pub(super) fn retrying<R>(
        &mut self,
        mut op: impl FnMut(&mut Self) -> Result<R, Error>,
    ) -> Result<R, Error> {
        loop {
            match op(self) {
                Err(Error::OutOfFrames | Error::OutOfVirtualSpace)
                    if !self.guard.purge.is_empty() =>
                {
                    self.purge()
                }
                result => return result,
            }
        }
    }

    /// Makes sure `count` bookkeeping nodes can be taken without failing.
    pub(super) fn reserve_nodes(&mut self, count: usize) -> Result<(), Error> {
        self.retrying(|cx| cx.guard.pool.reserve(count))
    }

    /// Reserves a range for `record` (its span, guard page included) and records it.
    pub(super) fn create_area(
        &mut self,
        record: AreaRecord,
        align: u64,
    ) -> Result<VirtAddr, Error> {
        if !self.could_ever_fit(record.span(), align) {
            // No purge can help: refuse before touching anything.
            return Err(Error::OutOfVirtualSpace);
        }
        self.retrying(|cx| {
            let inner = &mut *cx.guard;
            // A split of the free range and the area's own node: two at most.
            inner.pool.reserve(2)?;
            let span = record.span();
            let start = inner.space.alloc(&mut inner.pool, span, align)?;
            if let Err(error) = inner.areas.insert(&mut inner.pool, start, span, record) {
                invariant(inner.space.free(&mut inner.pool, start, span));
                return Err(error);
            }
            Ok(start)
        })
    }

    /// Whether the empty region has an address aligned to `align` with `span`
    /// bytes after it.
    fn could_ever_fit(&self, span: u64, align: u64) -> bool {
        let start = self.vm.config.start.as_u64();
        let end = start + self.vm.config.size;
        start
            .checked_next_multiple_of(align)
            .and_then(|first| first.checked_add(span))
            .is_some_and(|last| last <= end)
    }

    /// Forgets the area at `start` and frees its range.
    pub(super) fn remove_area(&mut self, start: VirtAddr) {
        let inner = &mut *self.guard;
        // The area's node goes back to the pool first, so freeing the range, which
        // needs at most one node, cannot fail.
        if let Some(area) = inner.areas.remove(&mut inner.pool, start) {
            invariant(inner.space.free(&mut inner.pool, start, area.size));
        }
    }

    /// Maps fresh frames at pages `pages` of the area at `start`, in chunks taken in
    /// bulk from the frame allocator. On failure, unmaps and frees what it mapped.
    pub(super) fn back_pages(
        &mut self,
        start: VirtAddr,
        pages: core::ops::Range<u64>,
        flags: PageTableFlags,
        zero: bool,
    ) -> Result<(), Error> {
        // A few pages need no kilobyte of stack cleared for their frames.
        if pages.end - pages.start <= SMALL_CHUNK as u64 {
            self.back_pages_by::<SMALL_CHUNK>(start, pages, flags, zero)
        } else {
            self.back_pages_by::<CHUNK>(start, pages, flags, zero)
        }
    }

    /// [`back_pages`](Self::back_pages), `N` frames per bulk call.
    fn back_pages_by<const N: usize>(
        &mut self,
        start: VirtAddr,
        pages: core::ops::Range<u64>,
        flags: PageTableFlags,
        zero: bool,
    ) -> Result<(), Error> {
        let mut chunk = [PhysFrame::containing_address(PhysAddr::zero()); N];
        let mut next = pages.start;
        while next < pages.end {
            let want = ((pages.end - next) as usize).min(N);
            let got = self.alloc_frames(&mut chunk[..want]);
            let frames = &chunk[..got];
            let result = if got < want {
                Err(Error::OutOfFrames)
            } else {
                if zero {
                    frames.iter().for_each(|&frame| self.zero_frame(frame));
                }
                self.map(page_at(start, next), frames.iter().copied(), flags)
            };
            if let Err(error) = result {
                let mut gather = self.vm.gather();
                frames.iter().for_each(|&frame| gather.free(frame));
                self.unmap_into(page_range(start, pages.start..next), &mut gather, true);
                self.guard.page_table_frames -= gather.finish();
                return Err(error);
            }
            next += got as u64;
        }
        Ok(())
    }

    /// Fills `out` from the frame allocator, purging once if it runs dry while
    /// frames wait on the purge list.
    fn alloc_frames(&mut self, out: &mut [PhysFrame]) -> usize {
        let got = self.vm.frames.alloc_frames(out);
        if got == out.len() || self.guard.purge.is_empty() {
            return got;
        }
        self.purge();
        got + self.vm.frames.alloc_frames(&mut out[got..])
    }

    /// Maps `frames` at `page` onward (all or nothing), purging once if page-table
    /// frames run out while frames wait on the purge list.
    pub(super) fn map<I>(
        &mut self,
        page: Page,
        frames: I,
        flags: PageTableFlags,
    ) -> Result<(), Error>
    where
        I: ExactSizeIterator<Item = PhysFrame> + Clone,
    {
        let vm = self.vm;
        self.retrying(|cx| {
            let source = CountingFrames::new(&vm.frames);
            let pages = Page::range(page, page + frames.len() as u64);
            let inner = &mut *cx.guard;
            // SAFETY: the area at `page` is this manager's and unmapped; its frames
            // are fresh from the allocator, the caller's (`vmap`, whose contract says
            // so) or the MMIO range `ioremap`'s caller vouched for; the tables come
            // from the allocator (`FrameSource`'s contract).
            let result = unsafe { inner.tables.map(pages, frames.clone(), flags, &source) };
            inner.page_table_frames = inner.page_table_frames.wrapping_add_signed(source.net());
            result
        })
    }

    pub(super) fn zero_frame(&self, frame: PhysFrame) {
        self.vm.zero_frame(frame);
    }

    /// Zeroes bytes `[from, to)` of the area at `start`, all inside its mapped pages.
    pub(super) fn zero_bytes(&self, start: VirtAddr, from: u64, to: u64) {
        let mut offset = from;
        while offset < to {
            let in_page = offset % crate::PAGE_SIZE;
            let len = (crate::PAGE_SIZE - in_page).min(to - offset);
            if let Ok((phys, _, _)) = self.translate(start + offset) {
                let ptr = self.vm.phys.phys_to_virt(phys);
                // SAFETY: `phys` is inside a frame of a live area, reachable through
                // `PhysMemory`, and the range stays within that frame.
                unsafe { core::ptr::write_bytes(ptr, 0, len as usize) };
            }
            offset += len;
        }
    }

    /// Takes the `vmap` area at `start` out of every lookup and unmaps its `pages`
    /// pages, flushing, but keeps its frames in the detached entries and its range
    /// busy, for [`reclaim_chunk`](Self::reclaim_chunk) to hand out.
    pub(super) fn start_unmapping(&mut self, start: VirtAddr, pages: u64) {
        self.record_mut(start).dying = true;
        self.guard.dying += 1;
        let range = page_range(start, 0..pages);
        if !range.is_empty() {
            let mut gather = self.vm.gather();
            // SAFETY: the area is being unmapped; its pages are this manager's, and the
            // flush comes right after.
            let detached = unsafe { self.guard.tables.detach(range) };
            invariant(detached.map(|flush| gather.stale(flush)));
            gather.finish();
        }
    }

    /// Takes the frames of the detached `range` (flushed) into `out`, in order.
    pub(super) fn reclaim_chunk(&mut self, range: PageRange, out: &mut [PhysFrame]) {
        let mut index = 0;
        // SAFETY: `start_unmapping` flushed the range.
        let reclaimed = unsafe {
            self.guard.tables.reclaim_detached(range, |_, frame| {
                out[index] = frame;
                index += 1;
            })
        };
        invariant(reclaimed);
    }

    /// Frees the page tables and the range of an area whose frames were all handed
    /// out, and forgets it.
    pub(super) fn finish_unmapping(&mut self, start: VirtAddr, pages: u64) {
        let mut gather = self.vm.gather();
        gather.sweep_tables(&mut self.guard.tables, page_range(start, 0..pages));
        self.guard.page_table_frames -= gather.finish();
        self.guard.dying -= 1;
        self.remove_area(start);
    }

    /// Unmaps `range` now, flushing before it returns; its frames go back to the
    /// allocator if `free_frames`, and the page tables it left empty in any case.
    pub(super) fn unmap_now(&mut self, range: PageRange, free_frames: bool) {
        let mut gather = self.vm.gather();
        self.unmap_into(range, &mut gather, free_frames);
        self.guard.page_table_frames -= gather.finish();
    }

    /// Unmaps `range` now, flushing, and hands its frames (if `free_frames`) and the
    /// page tables it left empty to `gather`.
    fn unmap_into(&mut self, range: PageRange, gather: &mut Gather<'_, F>, free_frames: bool) {
        if range.is_empty() {
            return;
        }
        let tables = &mut self.guard.tables;
        // SAFETY: the caller unmaps pages of its own area, which it no longer uses; the
        // flush follows at once.
        let detached = unsafe { tables.detach(range) };
        invariant(detached.map(|flush| gather.stale(flush)));
        gather.flush();
        // SAFETY: flushed just above.
        let reclaimed = unsafe {
            tables.reclaim_detached(range, |_, frame| {
                if free_frames {
                    gather.free(frame)
                }
            })
        };
        invariant(reclaimed);
        gather.sweep_tables(tables, range);
    }
}

pub(super) fn page_at(start: VirtAddr, index: u64) -> Page {
    Page::containing_address(start + index * PAGE_SIZE)
}

pub(super) fn page_range(start: VirtAddr, pages: core::ops::Range<u64>) -> PageRange {
    Page::range(page_at(start, pages.start), page_at(start, pages.end))
}

pub(super) fn as_ptr(addr: VirtAddr) -> NonNull<u8> {
    // SAFETY: areas lie in the region, which never contains address 0
    // (`space::check_region`).
    unsafe { NonNull::new_unchecked(addr.as_mut_ptr()) }
}

/// Internal consistency: areas this manager mapped are mapped. A failure is a bug
/// here, or someone else editing the region's page tables.
pub(super) fn invariant(result: Result<(), Error>) {
    debug_assert_eq!(
        result,
        Ok(()),
        "vmalloc page tables out of step with its areas"
    );
}
