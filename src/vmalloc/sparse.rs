//! Sparse areas: a reserved range whose pages are backed one at a time, anywhere in
//! it, and taken away again with the TLB flushed before the call returns.
//!
//! A [`reserve`](Vmalloc::reserve)d area is backed from its start, as a growing heap
//! wants. A pool of guarded pages wants the opposite: one page mapped here, its
//! neighbours never, and a page taken away at once so that the next access faults
//! (the kernel heap's guarded pool, after Linux's KFENCE).
//! [`Vmalloc::reserve_sparse`] makes such an area; [`map_page`](Vmalloc::map_page)
//! maps one of its pages, and [`unmap_page`](Vmalloc::unmap_page) makes it not present
//! and flushes every CPU's TLB before it returns. [`vfree`](Vmalloc::vfree) frees the
//! area with every frame its pages hold then.
//!
//! # A page keeps its frame
//!
//! A page's first [`map_page`](Vmalloc::map_page) backs it with a fresh frame; from
//! then on the page keeps that frame until the area is freed, as Linux's KFENCE keeps
//! its pool's pages (`kfence_protect` and `kfence_unprotect`). `unmap_page` clears the
//! entry's present bit, keeping the frame's address in it (the entry is *detached*,
//! [`PageTables::detach`]), and flushes that one page: no frame goes back to the
//! allocator, and the leaf table, still holding the entry, stays, so nothing has to
//! sweep it and flush the range it served. The next `map_page` of the page makes the
//! entry present again over the same frame (zeroed first if the area was reserved
//! with [`ZERO`](super::VmFlags::ZERO)): no frame allocator call, no page table
//! allocated, no flush (an entry that was not present is cached by no TLB). The frame
//! keeps what the page last held otherwise, as a freed heap block does.
//!
//! [`VmallocStats::data_frames`](super::VmallocStats::data_frames) counts the frames
//! mapped: a page unmapped by `unmap_page` leaves it, and its kept frame is the
//! area's, out of every count, until `vfree` gives it back with the rest.
//!
//! The record counts the mapped pages and does not say where they are: freeing walks
//! every page of the area (`detach_each`, `each_page`), which costs a walk per page,
//! once per area. Everything else (listings, counters, `diagnose_fault`,
//! `vmalloc_to_frame`) treats a sparse area as the reserved area it is.

use super::area::{AreaKind, AreaRecord};
use super::locked::{Locked, as_ptr, page_at, page_range};
use super::manager::Vmalloc;
use super::options::VmOptions;
use crate::paging::{PageTables, RangeFlush};
use crate::{Error, FrameSource, PAGE_SIZE, PhysMemory, TlbFlush};
use core::ptr::NonNull;
use x86_64::VirtAddr;
use x86_64::structures::paging::page::PageRange;
use x86_64::structures::paging::{Page, PhysFrame};

impl<F, M, T> Vmalloc<F, M, T>
where
    F: FrameSource + Clone,
    M: PhysMemory + Copy,
    T: TlbFlush,
{
    /// Reserves `size` bytes (rounded up to pages) whose pages are backed one at a
    /// time by [`map_page`](Self::map_page) and unmapped by
    /// [`unmap_page`](Self::unmap_page); nothing is mapped yet. A guard page follows
    /// it unless `options` say [`NO_GUARD`](super::VmFlags::NO_GUARD); pages mapped
    /// later get `options`' rights, zeroed with [`ZERO`](super::VmFlags::ZERO).
    /// [`vfree`](Self::vfree) frees it with the pages mapped then; `populate` refuses
    /// it ([`Error::WrongKind`]). See the [module documentation](self).
    ///
    /// # Errors
    ///
    /// As [`reserve`](Self::reserve).
    #[track_caller]
    pub fn reserve_sparse(&self, size: usize, options: &VmOptions) -> Result<NonNull<u8>, Error> {
        self.pages_for_options(size as u64, options)?;
        let align = self.check_align(options.align)?;
        let flags = options.prot.leaf_flags()?;
        let mut record = AreaRecord::new(AreaKind::Reserved, size as u64, flags, options);
        record.mapped_pages = 0;
        record.sparse = true;
        self.transact(|cx| cx.create_area(record, align).map(as_ptr))
    }

    /// Maps page `index` of the sparse area starting at `area` with the area's
    /// rights: over the frame the page kept from its last
    /// [`unmap_page`](Self::unmap_page), else over a fresh frame; zeroed if the area
    /// was reserved with [`ZERO`](super::VmFlags::ZERO). See the [module
    /// documentation](self).
    ///
    /// # Errors
    ///
    /// As [`vfree`](Self::vfree) for `area` ([`Error::WrongKind`] for anything but an
    /// area made by [`reserve_sparse`](Self::reserve_sparse)), [`Error::SizeTooLarge`]
    /// for a page past its end, [`Error::AlreadyMapped`] if the page is mapped,
    /// [`Error::OutOfFrames`], [`Error::NoExecuteAbove`] for executable rights below an
    /// upper entry with `NO_EXECUTE` (a boot loader's table the manager adopted). On
    /// error the page is as unmapped as it was.
    ///
    /// # Safety
    ///
    /// The area is the caller's to change: nothing else relies on the page staying
    /// unmapped (a guard page, a freed object's page: the kernel heap's guarded pool
    /// is such an area). A call refused with an error is safe.
    pub unsafe fn map_page(&self, area: *mut u8, index: usize) -> Result<(), Error> {
        self.transact(|cx| {
            let (start, record) = sparse_area(cx.live_area_at(area, &[AreaKind::Reserved])?)?;
            let index = page_index(&record, index)?;
            let page = page_range(start, index..index + 1);
            let mut kept = None;
            // SAFETY: in a live sparse area only `unmap_page` detaches a page, and it
            // flushed the page on every CPU before it returned: the frame is
            // unreachable. A page present or never mapped is refused, unchanged.
            let reclaimed = unsafe {
                cx.inner()
                    .tables
                    .reclaim_detached(page, |_, frame| kept = Some(frame))
            };
            match (reclaimed, kept) {
                (Ok(()), Some(frame)) => remap(cx, start, index, frame, &record)?,
                (Err(Error::NotMapped), _) => {
                    cx.back_pages(start, index..index + 1, record.flags, record.zeroed)?
                }
                (Err(error), _) => return Err(error),
                // A detached 4 KiB entry always hands out its frame.
                (Ok(()), None) => return Err(Error::NotMapped),
            }
            cx.record_mut(start).mapped_pages += 1;
            cx.inner().data_frames += 1;
            Ok(())
        })
    }

    /// Makes page `index` of the sparse area starting at `area` not present, and
    /// flushes it from every CPU's TLB (through the flush policy) before it returns:
    /// any access to the page afterwards faults, on every CPU. The page keeps its
    /// frame for its next [`map_page`](Self::map_page) (see the [module
    /// documentation](self)).
    ///
    /// # Errors
    ///
    /// As [`map_page`](Self::map_page), and [`Error::NotMapped`] for a page not
    /// mapped. On error nothing changed.
    ///
    /// # Safety
    ///
    /// If the page is mapped, nothing uses its memory after this call (its frame
    /// serves the page's next mapping, and goes back to the allocator with the area).
    /// A call refused with an error is safe.
    pub unsafe fn unmap_page(&self, area: *mut u8, index: usize) -> Result<(), Error> {
        let mut cx = self.lock();
        let (start, record) = sparse_area(cx.live_area_at(area, &[AreaKind::Reserved])?)?;
        let index = page_index(&record, index)?;
        // SAFETY: the caller gives the page up; the flush below comes before the call
        // returns, and the frame stays in the entry, for this page alone. A page not
        // present is refused, unchanged.
        let stale = unsafe {
            cx.inner()
                .tables
                .detach(page_range(start, index..index + 1))
        }?;
        let mut gather = self.gather();
        gather.stale(stale);
        gather.finish();
        cx.record_mut(start).mapped_pages -= 1;
        cx.inner().data_frames -= 1;
        Ok(())
    }
}

/// Maps the frame page `index` of the area at `start` kept, just taken out of its
/// detached entry. Should the map fail (it needs no page table: the entry's leaf
/// table is there), the frame goes back to the allocator and the page is left never
/// mapped, as unmapped as it was.
fn remap<F, M, T>(
    cx: &mut Locked<'_, F, M, T>,
    start: VirtAddr,
    index: u64,
    frame: PhysFrame,
    record: &AreaRecord,
) -> Result<(), Error>
where
    F: FrameSource + Clone,
    M: PhysMemory + Copy,
    T: TlbFlush,
{
    if record.zeroed {
        cx.zero_frame(frame);
    }
    let mapped = cx.map(page_at(start, index), core::iter::once(frame), record.flags);
    if mapped.is_err() {
        let mut gather = cx.vm.gather();
        gather.free(frame);
        gather.finish();
    }
    mapped
}

/// The area, if it is a sparse one.
fn sparse_area(area: (VirtAddr, AreaRecord)) -> Result<(VirtAddr, AreaRecord), Error> {
    if area.1.sparse {
        Ok(area)
    } else {
        Err(Error::WrongKind)
    }
}

/// Page `index` of the area, if it has one.
fn page_index(record: &AreaRecord, index: usize) -> Result<u64, Error> {
    let index = index as u64;
    if index < record.size / PAGE_SIZE {
        Ok(index)
    } else {
        Err(Error::SizeTooLarge)
    }
}

/// Runs `each` on every page of `range`, as a range of one page.
pub(super) fn each_page<M: PhysMemory>(
    tables: &mut PageTables<M>,
    range: PageRange,
    mut each: impl FnMut(&mut PageTables<M>, PageRange),
) {
    if range.is_empty() {
        return;
    }
    let last = range.end.start_address().as_u64() - 1;
    let mut from = range.start.start_address().as_u64();
    // Only the pages leaf tables hold: a vast sparse area mapped in a few places
    // costs what it maps.
    while let Some((first, end)) = tables.next_leaf_table_run(from, last) {
        let run = Page::range_inclusive(
            Page::containing_address(VirtAddr::new(first)),
            Page::containing_address(VirtAddr::new(end)),
        );
        for page in run {
            each(tables, Page::range(page, page + 1));
        }
        if end >= last {
            break;
        }
        from = end + 1;
    }
}

/// Detaches every mapped page of the sparse area's `range` (see
/// [`PageTables::detach`]) and returns the flush that covers them.
pub(super) fn detach_each<M: PhysMemory>(
    tables: &mut PageTables<M>,
    range: PageRange,
) -> RangeFlush {
    let mut flush = RangeFlush::from_range(Page::range(range.start, range.start));
    each_page(tables, range, |tables, page| {
        // SAFETY: the area is being freed and its pages are the manager's; the purge
        // flushes the token before their frames or the range are reused. A page not
        // mapped is refused, unchanged.
        if let Ok(detached) = unsafe { tables.detach(page) } {
            flush = flush.merge(detached);
        }
    });
    flush
}
