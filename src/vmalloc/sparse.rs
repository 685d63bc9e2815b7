//! Sparse areas: a reserved range whose pages are backed one at a time, anywhere in
//! it, and taken away again with the TLB flushed before the call returns.
//!
//! A [`reserve`](Vmalloc::reserve)d area is backed from its start, as a growing heap
//! wants. A pool of guarded pages wants the opposite: one page mapped here, its
//! neighbours never, and a page given back unmapped at once so that the next access
//! faults (the kernel heap's guarded pool, after Linux's
//! KFENCE). [`Vmalloc::reserve_sparse`] makes such an area;
//! [`map_page`](Vmalloc::map_page) backs one of its pages with a fresh frame, and
//! [`unmap_page`](Vmalloc::unmap_page) unmaps it, flushes every CPU's TLB, and gives
//! the frame back, before it returns (Linux's `vmap_pages_range` and `vunmap_range`
//! on a `get_vm_area` range). [`vfree`](Vmalloc::vfree) frees the area with whatever
//! pages are mapped then.
//!
//! The record counts the mapped pages and does not say where they are: freeing walks
//! every page of the area (`detach_each`, `each_page`), which costs a walk per page,
//! once per area. Everything else (listings, counters, `diagnose_fault`,
//! `vmalloc_to_frame`) treats a sparse area as the reserved area it is.

use super::area::{AreaKind, AreaRecord};
use super::locked::{as_ptr, page_range};
use super::manager::Vmalloc;
use super::options::VmOptions;
use crate::paging::{PageTables, RangeFlush};
use crate::{Error, FrameSource, PAGE_SIZE, PhysMemory, TlbFlush};
use core::ptr::NonNull;
use x86_64::VirtAddr;
use x86_64::structures::paging::Page;
use x86_64::structures::paging::page::PageRange;

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
        self.pages_for(size as u64)?;
        let align = self.check_align(options.align)?;
        let flags = options.prot.leaf_flags()?;
        let mut record = AreaRecord::new(AreaKind::Reserved, size as u64, flags, options);
        record.mapped_pages = 0;
        record.sparse = true;
        self.transact(|cx| cx.create_area(record, align).map(as_ptr))
    }

    /// Backs page `index` of the sparse area starting at `area` with a fresh frame,
    /// mapped with the area's rights (and zeroed if it was reserved with
    /// [`ZERO`](super::VmFlags::ZERO)).
    ///
    /// # Errors
    ///
    /// As [`vfree`](Self::vfree) for `area` ([`Error::WrongKind`] for anything but an
    /// area made by [`reserve_sparse`](Self::reserve_sparse)),
    /// [`Error::SizeTooLarge`] for a page past its end, [`Error::AlreadyMapped`] if
    /// the page is mapped, [`Error::OutOfFrames`]. On error nothing changed.
    pub fn map_page(&self, area: *mut u8, index: usize) -> Result<(), Error> {
        self.transact(|cx| {
            let (start, record) = sparse_area(cx.live_area_at(area, &[AreaKind::Reserved])?)?;
            let index = page_index(&record, index)?;
            if cx.translate(start + index * PAGE_SIZE).is_ok() {
                return Err(Error::AlreadyMapped);
            }
            cx.back_pages(start, index..index + 1, record.flags, record.zeroed)?;
            cx.record_mut(start).mapped_pages += 1;
            cx.inner().data_frames += 1;
            Ok(())
        })
    }

    /// Unmaps page `index` of the sparse area starting at `area`, flushes it from
    /// every CPU's TLB (through the flush policy), and gives its frame back, all
    /// before it returns: any access to the page afterwards faults, on every CPU.
    ///
    /// # Errors
    ///
    /// As [`map_page`](Self::map_page), and [`Error::NotMapped`] for a page not
    /// mapped. On error nothing changed.
    ///
    /// # Safety
    ///
    /// If the page is mapped, nothing uses its memory after this call (its frame goes
    /// to a new owner). A call refused with an error is safe.
    pub unsafe fn unmap_page(&self, area: *mut u8, index: usize) -> Result<(), Error> {
        let mut cx = self.lock();
        let (start, record) = sparse_area(cx.live_area_at(area, &[AreaKind::Reserved])?)?;
        let index = page_index(&record, index)?;
        if cx.translate(start + index * PAGE_SIZE).is_err() {
            return Err(Error::NotMapped);
        }
        cx.unmap_now(page_range(start, index..index + 1), true);
        cx.record_mut(start).mapped_pages -= 1;
        cx.inner().data_frames -= 1;
        Ok(())
    }
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
pub(super) fn each_page(range: PageRange, mut each: impl FnMut(PageRange)) {
    for page in range {
        each(Page::range(page, page + 1));
    }
}

/// Detaches every mapped page of the sparse area's `range` (see
/// [`PageTables::detach`]) and returns the flush that covers them.
pub(super) fn detach_each<M: PhysMemory>(
    tables: &mut PageTables<M>,
    range: PageRange,
) -> RangeFlush {
    let mut flush = RangeFlush::from_range(Page::range(range.start, range.start));
    each_page(range, |page| {
        // SAFETY: the area is being freed and its pages are the manager's; the purge
        // flushes the token before their frames or the range are reused. A page not
        // mapped is refused, unchanged.
        if let Ok(detached) = unsafe { tables.detach(page) } {
            flush = flush.merge(detached);
        }
    });
    flush
}
