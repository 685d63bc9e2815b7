//! Mappings of memory the manager does not own: frames the caller hands in
//! (`vmap`, Linux's for discontiguous buffers) and device ranges (`ioremap`). Both
//! take an `unsafe` promise that the memory is the caller's to map, and both unmap
//! with the TLB flushed before they return: the frames or the device may be given
//! to someone else right after.

use super::area::{AreaKind, AreaRecord};
use super::gather::CHUNK;
use super::locked::{as_ptr, page_at, page_range};
use super::manager::Vmalloc;
use super::options::{CacheMode, Prot, VmOptions};
use crate::sync::IrqOff;
use crate::{Error, FrameSource, PAGE_SIZE, PhysMemory, TlbFlush};
use core::ptr::NonNull;
use x86_64::structures::paging::PhysFrame;
use x86_64::{PhysAddr, VirtAddr};

impl<F, M, T> Vmalloc<F, M, T>
where
    F: FrameSource + Clone,
    M: PhysMemory + Copy,
    T: TlbFlush,
{
    /// Maps frames the caller owns at one contiguous virtual range (Linux's `vmap`).
    /// The frames stay the caller's: [`vunmap`](Self::vunmap) hands them back.
    ///
    /// # Errors
    ///
    /// [`Error::ZeroSize`] for no frames, [`Error::SizeTooLarge`],
    /// [`Error::WriteExecute`], [`Error::OutOfVirtualSpace`], [`Error::OutOfFrames`]
    /// (for page tables), [`Error::NoExecuteAbove`] for executable rights below an
    /// upper entry with `NO_EXECUTE` (a boot loader's table the manager adopted).
    /// Nothing changes on error.
    ///
    /// # Safety
    ///
    /// Every frame is the caller's to map with `prot` for as long as the mapping lives:
    /// RAM it owns (not the frame allocator's free memory, not a page table, not the
    /// kernel image) and does not free before `vunmap` hands it back.
    #[track_caller]
    pub unsafe fn vmap(&self, frames: &[PhysFrame], prot: Prot) -> Result<NonNull<u8>, Error> {
        let bytes = (frames.len() as u64)
            .checked_mul(PAGE_SIZE)
            .ok_or(Error::SizeTooLarge)?;
        self.pages_for(bytes)?;
        let flags = prot.leaf_flags()?;
        let options = VmOptions {
            prot,
            ..VmOptions::default()
        };
        let record = AreaRecord::new(AreaKind::Vmap, bytes, flags, &options);
        self.transact(|cx| {
            let start = cx.create_area(record, PAGE_SIZE)?;
            let mapped = cx.map(page_at(start, 0), frames.iter().copied(), flags);
            if let Err(error) = mapped {
                cx.remove_area(start);
                return Err(error);
            }
            Ok(as_ptr(start))
        })
    }

    /// Unmaps a `vmap` area, flushes the TLB for it, and hands each frame back to
    /// `on_frame` in address order; they never go to the frame allocator. `on_frame`
    /// runs without the manager's lock, so it may call the manager (or the heap).
    ///
    /// # Errors
    ///
    /// As [`vfree`](Self::vfree), with [`Error::WrongKind`] for anything but `vmap`.
    ///
    /// # Safety
    ///
    /// As [`vfree`](Self::vfree): if `ptr` starts a live `vmap` area, nothing uses
    /// the mapping after this call ([`VMapping`](super::VMapping) is the owner that
    /// makes this safe).
    pub unsafe fn vunmap(
        &self,
        ptr: *mut u8,
        mut on_frame: impl FnMut(PhysFrame),
    ) -> Result<(), Error> {
        let (start, pages) = {
            let mut cx = self.lock();
            let (start, record) = cx.live_area_at(ptr, &[AreaKind::Vmap])?;
            cx.start_unmapping(start, record.mapped_pages);
            (start, record.mapped_pages)
        };
        // The area is out of every lookup and its entries are detached and flushed;
        // its frames come back a chunk at a time, each handed out after unlocking.
        let mut unmapping = Unmapping {
            vm: self,
            start,
            pages,
            reclaimed: 0,
        };
        let mut chunk = [PhysFrame::containing_address(PhysAddr::zero()); CHUNK];
        while let Some(count) = unmapping.reclaim(&mut chunk) {
            chunk[..count].iter().for_each(|&f| on_frame(f));
        }
        Ok(())
    }

    /// Maps the physical MMIO range `phys..phys + size` with `cache` attributes
    /// (Linux's `ioremap`). `phys` need not be page-aligned: the returned pointer
    /// keeps its offset into the page.
    ///
    /// # Errors
    ///
    /// [`Error::ZeroSize`], [`Error::SizeTooLarge`] (including a range past the 52-bit
    /// physical limit), [`Error::ManagedRam`] if the range holds RAM the frame
    /// allocator manages, [`Error::OutOfVirtualSpace`], [`Error::OutOfFrames`].
    /// Nothing changes on error.
    ///
    /// # Safety
    ///
    /// The physical range is the caller's to map with `cache`: device memory (or
    /// firmware tables) it may touch, whose accesses through this mapping cannot break
    /// anything the rest of the kernel relies on.
    #[track_caller]
    pub unsafe fn ioremap(
        &self,
        phys: PhysAddr,
        size: usize,
        cache: CacheMode,
    ) -> Result<NonNull<u8>, Error> {
        if size == 0 {
            return Err(Error::ZeroSize);
        }
        let offset = phys.as_u64() % PAGE_SIZE;
        let end = phys
            .as_u64()
            .checked_add(size as u64)
            .ok_or(Error::SizeTooLarge)?;
        if PhysAddr::try_new(end - 1).is_err() {
            return Err(Error::SizeTooLarge);
        }
        let bytes = offset + size as u64;
        let pages = self.pages_for(bytes)?;
        let first = PhysFrame::containing_address(phys);
        // With interrupts held off, as every call into the frame allocator: one that
        // takes no hold of its own may be locked by the code an interrupt handler
        // that allocates interrupted.
        let managed = {
            let _irq = IrqOff::new(&self.tlb);
            self.frames.manages(first, pages)
        };
        if managed {
            return Err(Error::ManagedRam);
        }
        let flags = Prot::KERNEL_RW.leaf_flags()? | cache.flags();
        let mut record = AreaRecord::new(AreaKind::Ioremap, bytes, flags, &VmOptions::default());
        record.phys = phys;
        self.transact(|cx| {
            let start = cx.create_area(record, PAGE_SIZE)?;
            let frames = (0..pages as usize).map(|i| first + i as u64);
            if let Err(error) = cx.map(page_at(start, 0), frames, flags) {
                cx.remove_area(start);
                return Err(error);
            }
            Ok(as_ptr(start + offset))
        })
    }

    /// Unmaps an `ioremap` area, given the exact pointer `ioremap` returned, and
    /// flushes the TLB for it before it returns.
    ///
    /// # Errors
    ///
    /// As [`vfree`](Self::vfree), with [`Error::WrongKind`] for anything but `ioremap`.
    ///
    /// # Safety
    ///
    /// As [`vfree`](Self::vfree): if `ptr` is what `ioremap` returned for a live
    /// mapping, nothing uses the mapping after this call
    /// ([`IoMapping`](super::IoMapping) is the owner that makes this safe).
    pub unsafe fn iounmap(&self, ptr: *mut u8) -> Result<(), Error> {
        let mut cx = self.lock();
        let page_start = ptr.map_addr(|addr| addr & !(PAGE_SIZE as usize - 1));
        // A pointer in page 0 but not null is outside every region (`check_region`
        // refuses one starting at 0), not the null its page start would be.
        if page_start.is_null() && !ptr.is_null() {
            return Err(Error::NotInRegion);
        }
        let (start, record) = cx.live_area_at(page_start, &[AreaKind::Ioremap])?;
        if ptr as u64 != start.as_u64() + record.phys.as_u64() % PAGE_SIZE {
            return Err(Error::InteriorPointer);
        }
        // Flushed before it returns, as `vunmap`: the device range may be given to
        // another driver (or remapped by its bus) as soon as the caller is done.
        cx.unmap_now(page_range(start, 0..record.mapped_pages), false);
        cx.remove_area(start);
        Ok(())
    }
}

/// A `vunmap` under way: its area is out of every lookup, and the frames not
/// reclaimed yet are still in its detached entries. Dropped, it reclaims the rest
/// unseen and forgets the area, so that an `on_frame` that unwinds (the caller's
/// panic) leaves no half-unmapped area behind; the frames it did not see were the
/// caller's, never the allocator's.
struct Unmapping<'v, F: FrameSource + Clone, M: PhysMemory + Copy, T: TlbFlush> {
    vm: &'v Vmalloc<F, M, T>,
    start: VirtAddr,
    pages: u64,
    reclaimed: u64,
}

impl<F: FrameSource + Clone, M: PhysMemory + Copy, T: TlbFlush> Unmapping<'_, F, M, T> {
    /// The next chunk's frames into `chunk`, and how many; `None` once all are.
    fn reclaim(&mut self, chunk: &mut [PhysFrame; CHUNK]) -> Option<usize> {
        let count = (self.pages - self.reclaimed).min(CHUNK as u64);
        if count == 0 {
            return None;
        }
        let range = page_range(self.start, self.reclaimed..self.reclaimed + count);
        self.vm.lock().reclaim_chunk(range, chunk);
        self.reclaimed += count;
        Some(count as usize)
    }
}

impl<F: FrameSource + Clone, M: PhysMemory + Copy, T: TlbFlush> Drop for Unmapping<'_, F, M, T> {
    fn drop(&mut self) {
        let mut chunk = [PhysFrame::containing_address(PhysAddr::zero()); CHUNK];
        while self.reclaim(&mut chunk).is_some() {}
        self.vm.lock().finish_unmapping(self.start, self.pages);
    }
}
