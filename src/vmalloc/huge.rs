//! Huge mappings: areas backed by 2 MiB pages where the frame allocator has them.
//!
//! A 2 MiB page is one PD entry instead of a page table of 512 entries: one TLB
//! entry instead of 512, and no page-table frame. Linux offers it for vmalloc on
//! request (`VM_ALLOW_HUGE_VMAP`, `vmalloc_huge`), for large hash tables and BPF
//! program packs; so does [`VmFlags::HUGE`] here.
//!
//! An area asked for with it, of at least 2 MiB, starts on a 2 MiB boundary. Each
//! whole 2 MiB chunk of it is backed by a run of 512 contiguous, 2 MiB-aligned frames
//! ([`FrameSource::alloc_frame_2m`]) if the allocator has one, after a purge if that
//! is what it takes; otherwise, or where something already sits in the PD entry, by
//! 4 KiB pages, chunk by chunk. The tail past the last whole chunk is 4 KiB pages,
//! and the guard page follows it as usual. So a fragmented machine still gets its
//! memory, only less of it huge; [`AreaInfo::huge_mappings`](super::AreaInfo) and
//! [`VmallocStats::huge_mappings`](super::VmallocStats) say how much was.
//!
//! Everything else treats a 2 MiB entry as 512 pages: the page-table cursor detaches,
//! reclaims and protects whole 2 MiB entries in its range walks, and hands their
//! frames back one 4 KiB frame at a time, so `vfree`, the purge, `protect` and
//! rollback need nothing of their own. `vmalloc_to_frame` gives the 4 KiB frame
//! inside the run. `vrealloc` grows with 4 KiB pages; a shrink that cuts a 2 MiB
//! mapping first splits it into a page table ([`PageTables::split_huge_2m`]), and a
//! move maps the same frames 4 KiB at a time at the new place.
//!
//! [`PageTables::split_huge_2m`]: crate::paging::PageTables::split_huge_2m

use super::area::AreaRecord;
use super::gather::CountingFrames;
use super::locked::{Locked, as_ptr, page_range};
use super::manager::Vmalloc;
use super::options::{HUGE_PAGE_SIZE, VmFlags, VmOptions};
use crate::{Error, FrameSource, PAGE_SIZE, PhysMemory, TlbFlush};
use core::ptr::NonNull;
use x86_64::VirtAddr;
use x86_64::structures::paging::mapper::MappedFrame;
use x86_64::structures::paging::{Page, PageTableFlags, PhysFrame, Size2MiB};

/// 4 KiB pages in one 2 MiB mapping.
const HUGE_PAGES: u64 = HUGE_PAGE_SIZE / PAGE_SIZE;

impl<F, M, T> Vmalloc<F, M, T>
where
    F: FrameSource + Clone,
    M: PhysMemory + Copy,
    T: TlbFlush,
{
    /// As [`vmalloc`](Self::vmalloc), mapped with 2 MiB pages where the frame
    /// allocator has 2 MiB runs (Linux's `vmalloc_huge`; see the
    /// [module docs](super::huge)). Same as `vmalloc_with` and [`VmFlags::HUGE`].
    ///
    /// # Errors
    ///
    /// As [`vmalloc`](Self::vmalloc).
    #[track_caller]
    pub fn vmalloc_huge(&self, size: usize) -> Result<NonNull<u8>, Error> {
        let options = VmOptions {
            flags: VmFlags::HUGE,
            ..VmOptions::default()
        };
        self.vmalloc_with(size, &options)
    }

    /// `vmalloc_with` for an area that may be backed by 2 MiB pages.
    pub(super) fn vmalloc_huge_area(
        &self,
        record: AreaRecord,
        pages: u64,
        zero: bool,
    ) -> Result<NonNull<u8>, Error> {
        let flags = record.flags;
        self.transact(|cx| {
            // Where no free range has a 2 MiB-aligned start, an area with the
            // caller's own alignment and 4 KiB pages will do (so does Linux).
            let aligned = AreaRecord {
                align: record.align.max(HUGE_PAGE_SIZE),
                ..record
            };
            let (start, record) = match cx.create_area(aligned, aligned.align) {
                Ok(start) => (start, aligned),
                Err(Error::OutOfVirtualSpace) => (cx.create_area(record, record.align)?, record),
                Err(error) => return Err(error),
            };
            let backed = if record.align >= HUGE_PAGE_SIZE {
                cx.back_huge(start, pages, flags, zero)
            } else {
                cx.back_pages(start, 0..pages, flags, zero).map(|()| 0)
            };
            match backed {
                Ok(huge) => {
                    cx.record_mut(start).huge_mappings = huge;
                    let inner = cx.inner();
                    inner.data_frames += pages;
                    inner.huge_mappings += huge;
                    Ok(as_ptr(start))
                }
                Err(error) => {
                    cx.remove_area(start);
                    Err(error)
                }
            }
        })
    }
}

impl<F, M, T> Locked<'_, F, M, T>
where
    F: FrameSource + Clone,
    M: PhysMemory + Copy,
    T: TlbFlush,
{
    /// Backs the first `pages` pages of the 2 MiB-aligned area at `start`: each whole
    /// 2 MiB chunk with a 2 MiB mapping where it can, else with 4 KiB pages, the tail
    /// with 4 KiB pages. Returns the number of 2 MiB mappings. On failure, unmaps and
    /// frees everything it mapped.
    fn back_huge(
        &mut self,
        start: VirtAddr,
        pages: u64,
        flags: PageTableFlags,
        zero: bool,
    ) -> Result<u64, Error> {
        let mut huge = 0;
        let mut done = 0;
        while done < pages {
            let step = HUGE_PAGES.min(pages - done);
            let backed = if step == HUGE_PAGES {
                self.map_huge_run(start + done * PAGE_SIZE, flags, zero)
            } else {
                Ok(false)
            };
            let backed = match backed {
                Ok(true) => {
                    huge += 1;
                    Ok(())
                }
                Ok(false) => self.back_pages(start, done..done + step, flags, zero),
                Err(error) => Err(error),
            };
            if let Err(error) = backed {
                self.unmap_now(page_range(start, 0..done), true);
                return Err(error);
            }
            done += step;
        }
        Ok(huge)
    }

    /// Maps a fresh 2 MiB run at `at`. `Ok(false)` when there is no run, even after
    /// a purge, or the PD entry is taken (a page table left there): then the caller
    /// maps 4 KiB pages instead.
    fn map_huge_run(
        &mut self,
        at: VirtAddr,
        flags: PageTableFlags,
        zero: bool,
    ) -> Result<bool, Error> {
        let Some(run) = self.alloc_frame_2m() else {
            return Ok(false);
        };
        let frames = || PhysFrame::range(first_frame(run), first_frame(run) + HUGE_PAGES);
        if zero {
            frames().for_each(|frame| self.zero_frame(frame));
        }
        let page = Page::<Size2MiB>::containing_address(at);
        let vm = self.vm;
        let mapped = self.retrying(|cx| {
            let source = CountingFrames::new(&vm.frames);
            let inner = cx.inner();
            // SAFETY: the 2 MiB at `at` are a chunk of this manager's area, unmapped;
            // the run is fresh from the allocator; tables come from the allocator.
            let result = unsafe { inner.tables.map_huge_2m(page, run, flags, &source) };
            inner.page_table_frames = inner.page_table_frames.wrapping_add_signed(source.net());
            result
        });
        if mapped.is_err() {
            let mut gather = vm.gather();
            frames().for_each(|frame| gather.free(frame));
            gather.finish();
        }
        match mapped {
            Ok(()) => Ok(true),
            Err(Error::AlreadyMapped) => Ok(false),
            Err(error) => Err(error),
        }
    }

    /// A 2 MiB run from the allocator, purging once if it has none while frames
    /// wait on the purge list.
    fn alloc_frame_2m(&mut self) -> Option<PhysFrame<Size2MiB>> {
        let run = self.vm.frames.alloc_frame_2m();
        if run.is_some() || self.inner().purge.is_empty() {
            return run;
        }
        self.purge();
        self.vm.frames.alloc_frame_2m()
    }

    /// Before a huge area at `start` shrinks to `new_pages`: splits the 2 MiB
    /// mapping the cut falls inside, if any, so the cut can unmap 4 KiB pages.
    pub(super) fn split_at_cut(&mut self, start: VirtAddr, new_pages: u64) -> Result<(), Error> {
        let cut = start + new_pages * PAGE_SIZE;
        if new_pages.is_multiple_of(HUGE_PAGES) || !self.is_huge_at(cut) {
            return Ok(());
        }
        let vm = self.vm;
        self.retrying(|cx| {
            let source = CountingFrames::new(&vm.frames);
            let inner = cx.inner();
            let page = Page::<Size2MiB>::containing_address(cut);
            // SAFETY: the chunk belongs to a live area of this manager; the split maps
            // the same frames with the same rights, and the flush follows.
            let split = unsafe { inner.tables.split_huge_2m(page, &source) };
            inner.page_table_frames = inner.page_table_frames.wrapping_add_signed(source.net());
            split.map(|flush| {
                let mut gather = vm.gather();
                gather.stale(flush);
                gather.finish();
            })
        })
    }

    /// How many 2 MiB mappings back the first `pages` pages of the area at `start`.
    pub(super) fn count_huge(&self, start: VirtAddr, pages: u64) -> u64 {
        (0..pages / HUGE_PAGES)
            .filter(|&chunk| self.is_huge_at(start + chunk * HUGE_PAGE_SIZE))
            .count() as u64
    }

    fn is_huge_at(&self, addr: VirtAddr) -> bool {
        matches!(self.translate(addr), Ok((_, _, MappedFrame::Size2MiB(_))))
    }
}

/// Whether an allocation of `bytes` with `options` is to be tried with 2 MiB pages.
pub(super) fn wants_huge(bytes: u64, options: &VmOptions) -> bool {
    options.flags.contains(VmFlags::HUGE) && bytes >= HUGE_PAGE_SIZE
}

fn first_frame(run: PhysFrame<Size2MiB>) -> PhysFrame {
    PhysFrame::containing_address(run.start_address())
}
