//! `vrealloc`: resizing an area in place, or moving its frames without copying.

use super::area::{AreaKind, AreaRecord};
use super::blocks::Located;
use super::gather::CHUNK;
use super::locked::{Locked, as_ptr, invariant, page_at, page_range};
use super::manager::Vmalloc;
use crate::{Error, FrameSource, PAGE_SIZE, PhysMemory, TlbFlush};
use core::ptr::NonNull;
use x86_64::structures::paging::{PageTableFlags, PhysFrame};
use x86_64::{PhysAddr, VirtAddr};

impl<F, M, T> Vmalloc<F, M, T>
where
    F: FrameSource + Clone,
    M: PhysMemory + Copy,
    T: TlbFlush,
{
    /// Resizes a `vmalloc` area to `new_size` bytes, keeping its contents: shrinks in
    /// place; grows in place when the virtual pages after it are free; otherwise moves
    /// the existing frames to a new range by remapping them, without copying data.
    /// A zeroed area stays zeroed: new memory is zero, and so is what a shrink drops
    /// (as Linux's `vrealloc` does), so growing it back shows zeros. An area in a
    /// [per-CPU block](super::blocks) is copied to a new area instead (at most 16
    /// pages).
    ///
    /// # Errors
    ///
    /// As [`vfree`](Self::vfree) for `ptr`, as [`vmalloc`](Self::vmalloc) for
    /// `new_size`. On error the old area is untouched and nothing changed.
    ///
    /// # Safety
    ///
    /// If `ptr` starts a live area, nothing uses it through `ptr` (or any reference
    /// or pointer into it) after the call unless the call fails or returns `ptr`
    /// itself: a moved area's old range goes to new owners, and a shrink takes the
    /// pages past `new_size` away. A pointer that starts no live `vmalloc` area is
    /// refused with an error, which is safe.
    pub unsafe fn vrealloc(&self, ptr: *mut u8, new_size: usize) -> Result<NonNull<u8>, Error> {
        // Checked again below for an area with a guard page, which takes a page more.
        let new_pages = self.pages_for_area(new_size as u64, false)?;
        let new_bytes = new_size as u64;
        if let Located::Zone(at) = self.blocks.locate(ptr as u64) {
            self.settle();
            return self.realloc_in_block(at, new_size);
        }
        self.transact(|cx| {
            let (start, record) = cx.live_area_at(ptr, &[AreaKind::Vmalloc])?;
            self.pages_for_area(new_bytes, record.guard)?;
            let old_pages = record.mapped_pages;
            // Every path below needs at most two bookkeeping nodes: have them first.
            cx.reserve_nodes(2)?;
            if new_pages < old_pages && record.huge_mappings > 0 {
                cx.split_at_cut(start, new_pages)?;
            }
            let moved = if new_pages <= old_pages {
                cx.shrink_in_place(start, &record, new_pages, new_bytes)
                    .map(|()| start)
            } else if cx.try_extend(start, &record, new_pages) {
                cx.grow_in_place(start, &record, new_pages, new_bytes)
                    .map(|()| start)
            } else {
                match cx.grow_by_moving(start, &record, new_pages, new_bytes) {
                    // Its purge may have freed the pages right after the area (a
                    // neighbour waiting for it), which the first look found taken.
                    Err(Error::OutOfVirtualSpace) if cx.try_extend(start, &record, new_pages) => cx
                        .grow_in_place(start, &record, new_pages, new_bytes)
                        .map(|()| start),
                    moved => moved,
                }
            };
            if record.huge_mappings > 0 {
                // A split or a move maps 4 KiB pages where 2 MiB ones were.
                let (at, pages) = moved.map_or((start, old_pages), |at| (at, new_pages));
                let huge = cx.count_huge(at, pages);
                cx.record_mut(at).huge_mappings = huge;
                let inner = cx.inner();
                inner.huge_mappings = inner.huge_mappings + huge - record.huge_mappings;
            }
            let moved = moved?;
            let inner = cx.inner();
            inner.data_frames = inner.data_frames + new_pages - old_pages;
            Ok(as_ptr(moved))
        })
    }
}

impl<F, M, T> Locked<'_, F, M, T>
where
    F: FrameSource + Clone,
    M: PhysMemory + Copy,
    T: TlbFlush,
{
    fn set_size(&mut self, start: VirtAddr, pages: u64, bytes: u64) {
        let record = self.record_mut(start);
        record.mapped_pages = pages;
        record.size = pages * PAGE_SIZE;
        record.bytes = bytes;
    }

    fn shrink_in_place(
        &mut self,
        start: VirtAddr,
        record: &AreaRecord,
        new_pages: u64,
        new_bytes: u64,
    ) -> Result<(), Error> {
        if new_pages < record.mapped_pages {
            // The range first: it may need a bookkeeping node, and then nothing changed.
            let inner = self.inner();
            let (old_span, new_span) = (record.span(), record.span_for(new_pages));
            inner
                .space
                .shrink(&mut inner.pool, start, old_span, new_span)?;
            invariant(inner.areas.resize(start, new_span));
            self.unmap_now(page_range(start, new_pages..record.mapped_pages), true);
        }
        if record.zeroed && new_bytes < record.bytes {
            let kept_end = (new_pages * PAGE_SIZE).min(record.bytes);
            self.zero_bytes(start, new_bytes, kept_end);
        }
        self.set_size(start, new_pages, new_bytes);
        Ok(())
    }

    /// Takes the free virtual pages right after the area, if they are enough.
    fn try_extend(&mut self, start: VirtAddr, record: &AreaRecord, new_pages: u64) -> bool {
        let inner = self.inner();
        let (old_span, new_span) = (record.span(), record.span_for(new_pages));
        if !inner
            .space
            .try_extend(&mut inner.pool, start, old_span, new_span)
        {
            return false;
        }
        invariant(inner.areas.resize(start, new_span));
        true
    }

    fn grow_in_place(
        &mut self,
        start: VirtAddr,
        record: &AreaRecord,
        new_pages: u64,
        new_bytes: u64,
    ) -> Result<(), Error> {
        let old_pages = record.mapped_pages;
        let backed = self.back_pages(start, old_pages..new_pages, record.flags, record.zeroed);
        if let Err(error) = backed {
            // Two nodes were reserved before the extension, so giving the tail back
            // cannot fail.
            let inner = self.inner();
            let (old_span, new_span) = (record.span_for(new_pages), record.span());
            invariant(
                inner
                    .space
                    .shrink(&mut inner.pool, start, old_span, new_span),
            );
            invariant(inner.areas.resize(start, new_span));
            return Err(error);
        }
        self.set_size(start, new_pages, new_bytes);
        Ok(())
    }

    /// Maps the area's frames, then fresh ones, at a new range; unmaps the old one.
    fn grow_by_moving(
        &mut self,
        start: VirtAddr,
        record: &AreaRecord,
        new_pages: u64,
        new_bytes: u64,
    ) -> Result<VirtAddr, Error> {
        let old_pages = record.mapped_pages;
        let mut moved = *record;
        moved.mapped_pages = new_pages;
        moved.size = new_pages * PAGE_SIZE;
        moved.bytes = new_bytes;
        let new_start = self.create_area(moved, record.align)?;
        if let Err(error) = self.remap(start, new_start, old_pages, record.flags) {
            self.remove_area(new_start);
            return Err(error);
        }
        let backed = self.back_pages(new_start, old_pages..new_pages, record.flags, record.zeroed);
        if let Err(error) = backed {
            // The old area's frames are mapped at the new range too: unmap them there
            // without freeing.
            self.unmap_now(page_range(new_start, 0..old_pages), false);
            self.remove_area(new_start);
            return Err(error);
        }
        self.unmap_now(page_range(start, 0..old_pages), false);
        self.remove_area(start);
        Ok(new_start)
    }

    /// Maps the frames behind `pages` pages at `from` again at `to`, in chunks; all or
    /// nothing.
    fn remap(
        &mut self,
        from: VirtAddr,
        to: VirtAddr,
        pages: u64,
        flags: PageTableFlags,
    ) -> Result<(), Error> {
        let mut chunk = [PhysFrame::containing_address(PhysAddr::zero()); CHUNK];
        let mut next = 0;
        while next < pages {
            let count = ((pages - next) as usize).min(CHUNK);
            let frames = &mut chunk[..count];
            let mapped = self
                .frames_at(from + next * PAGE_SIZE, frames)
                .and_then(|()| self.map(page_at(to, next), frames.iter().copied(), flags));
            if let Err(error) = mapped {
                // `map` is all or nothing: undo the chunks before this one.
                self.unmap_now(page_range(to, 0..next), false);
                return Err(error);
            }
            next += count as u64;
        }
        Ok(())
    }

    /// The frames mapped at the `out.len()` pages from `from`.
    fn frames_at(&self, from: VirtAddr, out: &mut [PhysFrame]) -> Result<(), Error> {
        for (i, slot) in out.iter_mut().enumerate() {
            let (phys, _, _) = self.translate(from + i as u64 * PAGE_SIZE)?;
            *slot = PhysFrame::containing_address(phys);
        }
        Ok(())
    }
}
