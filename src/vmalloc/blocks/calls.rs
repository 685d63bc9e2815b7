//! The calls on areas in blocks: making, freeing, resizing, protecting, looking up.

use super::block::{Block, FREED};
use super::cache::{CpuState, Lazy, NO_FRAME, add};
use super::{BLOCK_PAGES, BlockArea, BlockSite, InZone, MAX_BLOCK_PAGES};
use crate::paging::{ADDR_MASK, RangeFlush};
use crate::sync::IrqOff;
use crate::vmalloc::area::AreaInfo;
use crate::vmalloc::gather::Gather;
use crate::vmalloc::manager::Vmalloc;
use crate::vmalloc::options::{Prot, VmFlags, VmOptions};
use crate::{Error, FrameSource, PAGE_SIZE, PhysMemory, TlbFlush};
use core::panic::Location;
use core::ptr::NonNull;
use core::sync::atomic::Ordering;
use x86_64::structures::paging::{Page, PageTableFlags, PhysFrame};
use x86_64::{PhysAddr, VirtAddr};

impl<'a> InZone<'a> {
    /// The block holding the address, or the error a call on it gives.
    fn block(&self, missing: Error) -> Result<(usize, &'a Block), Error> {
        self.block.ok_or(missing)
    }
}

impl<F, M, T> Vmalloc<F, M, T>
where
    F: FrameSource + Clone,
    M: PhysMemory + Copy,
    T: TlbFlush,
{
    /// Makes `pages` pages (at most [`MAX_BLOCK_PAGES`]) from the calling CPU's block
    /// (or, `anywhere`, from any block nobody owns with room for them: the last
    /// resort once every cache is drained). On error, with nothing changed, the
    /// request goes to the locked path: [`Error::OutOfFrames`] when the frames ran
    /// out, [`Error::OutOfVirtualSpace`] when no block had room, [`Error::WouldBlock`]
    /// when the blocks do not serve it (not small data, or this CPU's cache held).
    pub(in crate::vmalloc) fn alloc_in_block(
        &self,
        pages: u64,
        flags: PageTableFlags,
        zero: bool,
        caller: &'static Location<'static>,
        anywhere: bool,
    ) -> Result<NonNull<u8>, Error> {
        if !self.blocks_take(pages, flags) {
            return Err(Error::WouldBlock);
        }
        // The whole call, frame allocator calls included, with interrupts held off;
        // the calling CPU stays the one whose cache it holds.
        let irq = IrqOff::new(&self.tlb);
        let mut slot = self.cpu_slot(&irq).ok_or(Error::WouldBlock)?;
        let cpu = slot.cpu();
        let (counters, owned) = slot.split();
        let fresh = owned.is_none();
        let made = match self.open(owned) {
            Some(state) => {
                let request = (pages, zero, caller);
                self.alloc_from_state(cpu, counters, state, flags, request, anywhere)
            }
            None => Err(Error::OutOfFrames), // no frame for the cache's state
        };
        if made.is_err() && fresh {
            // A call that fails changes nothing: a state it made goes again.
            self.close_if_unused(counters, owned);
        }
        made
    }

    /// Whether an area of `pages` pages with `flags` is one the blocks serve: small
    /// data. Executable areas (rare: module text) go to the tree, whose walk refuses
    /// them below a boot loader's no-execute upper entry.
    pub(in crate::vmalloc) fn blocks_take(&self, pages: u64, flags: PageTableFlags) -> bool {
        let data = flags.contains(PageTableFlags::NO_EXECUTE);
        self.blocks.count > 0 && pages <= MAX_BLOCK_PAGES && data
    }

    /// [`alloc_in_block`](Self::alloc_in_block) once the CPU's state is open.
    fn alloc_from_state(
        &self,
        cpu: usize,
        counters: &super::CacheCounters,
        state: &mut CpuState,
        flags: PageTableFlags,
        (pages, zero, caller): (u64, bool, &'static Location<'static>),
        anywhere: bool,
    ) -> Result<NonNull<u8>, Error> {
        let n = pages as usize;
        let taken = match self.stock_frames(counters, state, n) {
            Ok(taken) => taken,
            Err(taken) => {
                self.unstock(state, counters, taken);
                return Err(Error::OutOfFrames);
            }
        };
        // The frames leave the cache first: carving may flush the lazy list, which
        // puts other frames into it.
        let mut frames = [NO_FRAME; MAX_BLOCK_PAGES as usize];
        Self::take_frames(state, counters, &mut frames[..n]);
        let frames = &frames[..n];
        if zero {
            frames.iter().for_each(|&frame| self.zero_frame(frame));
        }
        let request = (n, zero, caller);
        let start = match self.carve(cpu, counters, state, request, flags, frames, anywhere) {
            Ok(start) => start,
            Err(error) => {
                self.cache_frames(state, counters, frames);
                self.unstock(state, counters, taken);
                return Err(error);
            }
        };
        add(&counters.data, n as i64);
        add(&counters.areas, 1);
        add(&counters.live_pages, n as i64 + 1);
        // SAFETY: the zone lies in the region, which never holds address 0.
        Ok(unsafe { NonNull::new_unchecked(start as *mut u8) })
    }

    /// Zeroes a frame fresh from the allocator or a CPU's cache.
    pub(in crate::vmalloc) fn zero_frame(&self, frame: PhysFrame) {
        let ptr = self.phys.phys_to_virt(frame.start_address());
        // SAFETY: a frame fresh from the allocator or the cache is ours and mapped
        // nowhere yet, and `PhysMemory` makes the whole frame writable through `ptr`.
        unsafe { core::ptr::write_bytes(ptr, 0, PAGE_SIZE as usize) };
    }

    /// Maps `frames` at `n` fresh pages of the CPU's block, taking a new block if it
    /// has no room (`anywhere`: any block nobody owns with `n + 1` pages free, each
    /// tried once, as a last resort: blocks with less than a quarter free are not
    /// taken otherwise); the area's start, or what ran out: frames for a new block
    /// ([`Error::OutOfFrames`]) or room ([`Error::OutOfVirtualSpace`]).
    #[allow(clippy::too_many_arguments)]
    fn carve(
        &self,
        cpu: usize,
        counters: &super::CacheCounters,
        state: &mut CpuState,
        (n, zero, caller): (usize, bool, &'static Location<'static>),
        flags: PageTableFlags,
        frames: &[PhysFrame],
        anywhere: bool,
    ) -> Result<u64, Error> {
        let mut next_any = 0;
        let rounds = 3 + if anywhere {
            self.blocks.published_count()
        } else {
            0
        };
        for _ in 0..rounds {
            let index = match state.block {
                Some(index) => index,
                None => {
                    // The last resort visits every block with room once before any
                    // other take: a block a quarter free whose holes are all too
                    // small, marked takeable again as it goes back, would otherwise
                    // be taken round after round.
                    let any = || self.take_any_block(cpu, n + 1, &mut next_any);
                    let taken = match anywhere.then(any).flatten() {
                        Some(index) => Ok(index),
                        None => self.take_block(cpu),
                    };
                    let index = match taken {
                        Err(Error::OutOfFrames) if state.cached_frames() > 0 => {
                            // The cache's stock took the frames a new block's
                            // descriptor and table need: they go back first.
                            self.unstock(state, counters, state.cached_frames());
                            self.take_block(cpu)?
                        }
                        taken => taken?,
                    };
                    state.block = Some(index);
                    counters.owns_block.store(true, Ordering::Relaxed);
                    index
                }
            };
            let block = self.blocks.block(index);
            // SAFETY: the caller holds this CPU's cache, whose block this is.
            if let Some(first) = unsafe { block.carve(n + 1) } {
                let bits = (flags | PageTableFlags::PRESENT).bits();
                for (i, frame) in frames.iter().enumerate() {
                    // SAFETY: the page is fresh in a block this CPU carves; the entry
                    // lies in the block's own leaf table.
                    unsafe {
                        block
                            .entry(first + i)
                            .write(frame.start_address().as_u64() | bits)
                    };
                }
                block.record(first, n, zero, caller);
                return Ok(block.base + first as u64 * PAGE_SIZE);
            }
            if state.lazy_len() > 0 {
                // Flushing our own freed areas may free pages of the block.
                self.flush_lazy(counters, state);
                continue;
            }
            self.release_block(index);
            state.block = None;
            counters.owns_block.store(false, Ordering::Relaxed);
        }
        Err(Error::OutOfVirtualSpace)
    }

    /// Frees the area at `at`. Its entries are cleared now; its range and frames wait
    /// on the calling CPU's lazy list, or are flushed at once when `eager` or when that
    /// list cannot be had (its cache held further up this CPU's stack).
    pub(in crate::vmalloc) fn free_in_block(
        &self,
        at: InZone<'_>,
        eager: bool,
    ) -> Result<(), Error> {
        let (index, block) = at.block(Error::NotAllocated)?;
        let irq = IrqOff::new(&self.tlb);
        let (first, pages) = block.area_at(at.addr)?;
        if !block.claim_free(first, pages) {
            return Err(Error::NotAllocated);
        }
        let mut frames = [NO_FRAME; MAX_BLOCK_PAGES as usize];
        for (i, frame) in frames[..pages].iter_mut().enumerate() {
            // SAFETY: the entry lies in the block's leaf table and belongs to the area
            // this call just claimed.
            let raw = unsafe { block.entry(first + i).replace(0) };
            *frame = PhysFrame::containing_address(PhysAddr::new(raw & ADDR_MASK));
        }
        let lazy = Lazy::new(index, first, pages);
        let mut slot = if eager { None } else { self.cpu_slot(&irq) };
        if let Some(slot) = &mut slot {
            let (counters, owned) = slot.split();
            if let Some(state) = self.open(owned) {
                self.queue_lazy(counters, state, lazy, &frames[..pages]);
                add(&counters.data, -(pages as i64));
                add(&counters.areas, -1);
                add(&counters.live_pages, -(pages as i64 + 1));
                return Ok(());
            }
        }
        // At once: flushed before it returns.
        let mut gather = self.gather();
        gather.stale(RangeFlush::from_range(self.range_of(lazy)));
        gather.flush();
        let owned = slot
            .as_mut()
            .and_then(|slot| Self::owned_block(slot.split().1));
        self.free_again(owned, index, first);
        frames[..pages].iter().for_each(|&frame| gather.free(frame));
        gather.finish();
        self.blocks.data.fetch_sub(pages as i64, Ordering::Relaxed);
        self.blocks.areas.fetch_sub(1, Ordering::Relaxed);
        self.blocks
            .live_pages
            .fetch_sub(pages as i64 + 1, Ordering::Relaxed);
        Ok(())
    }

    /// The live area in the zone whose span (guard page included) holds `at`, and
    /// whether `at` is in its guard page.
    pub(in crate::vmalloc) fn block_area(&self, at: InZone<'_>) -> Option<(BlockArea, bool)> {
        let (_, block) = at.block?;
        area_in(block, block.page_of(at.addr))
    }

    /// What `at` is for a fault handler: a live area's page, its guard, or an area
    /// freed and waiting for its flush. Never waits: the lookups take no lock.
    pub(in crate::vmalloc) fn block_site(&self, at: InZone<'_>) -> Option<(BlockArea, BlockSite)> {
        let (_, block) = at.block?;
        let page = block.page_of(at.addr);
        if let Some((area, guard)) = area_in(block, page) {
            let site = if guard {
                BlockSite::Guard
            } else {
                BlockSite::Live
            };
            return Some((area, site));
        }
        block.freed_over(page).map(|(first, pages)| {
            let area = BlockArea {
                start: VirtAddr::new(block.base + first as u64 * PAGE_SIZE),
                pages: pages as u64,
                flags: PageTableFlags::empty(),
                caller: block.freed_caller(first),
            };
            (area, BlockSite::Freed)
        })
    }

    /// The frame behind `at`, a page of a live area in the zone.
    pub(in crate::vmalloc) fn block_frame(&self, at: InZone<'_>) -> Result<PhysFrame, Error> {
        let (_, block) = at.block(Error::NotMapped)?;
        let page = block.page_of(at.addr);
        match block.area_over(page) {
            Some((first, pages)) if page < first + pages => Ok(block.frame_at(page)),
            _ => Err(Error::NotMapped),
        }
    }

    /// Gives the live area starting at `at` the leaf flags `flags`, and flushes its
    /// old translations before it returns.
    pub(in crate::vmalloc) fn protect_in_block(
        &self,
        at: InZone<'_>,
        flags: PageTableFlags,
    ) -> Result<(), Error> {
        let (_, block) = at.block(Error::NotAllocated)?;
        let (first, pages) = block.area_at(at.addr)?;
        if !flags.contains(PageTableFlags::NO_EXECUTE) {
            let mut cx = self.lock();
            let base = VirtAddr::new(block.base);
            if cx.inner().tables.exec_forbidden_above(base) != Ok(false) {
                return Err(Error::NoExecuteAbove);
            }
        }
        let bits = (flags | PageTableFlags::PRESENT).bits();
        for i in first..first + pages {
            let entry = block.entry(i);
            // SAFETY: the block's table; the area is live and the caller's.
            unsafe { entry.write(entry.read() & ADDR_MASK | bits) };
        }
        let start = Page::containing_address(VirtAddr::new(at.addr));
        let mut gather = self.gather();
        gather.stale(RangeFlush::from_range(Page::range(
            start,
            start + pages as u64,
        )));
        gather.finish();
        Ok(())
    }

    /// `vrealloc` of the live area at `at`. A shrink stays in place: the dropped pages
    /// are unmapped and flushed before it returns, as a tree area's are. A growth
    /// makes a new area with the same rights (zeroed if the old one was), copies the
    /// contents, and frees the old area with its flush done before it returns, as a
    /// tree area's move does.
    pub(in crate::vmalloc) fn realloc_in_block(
        &self,
        at: InZone<'_>,
        new_size: usize,
    ) -> Result<NonNull<u8>, Error> {
        let (index, block) = at.block(Error::NotAllocated)?;
        let new_pages = (new_size as u64).div_ceil(PAGE_SIZE);
        let (first, pages) = block.area_at(at.addr)?;
        let (pages, zeroed) = (pages as u64, block.zeroed(first));
        let flags = PageTableFlags::from_bits_truncate(block_entry_flags(block, first));
        if new_pages <= pages {
            self.shrink_in_block(index, block, first, pages as usize, new_pages as usize)?;
            if zeroed {
                // What the shrink drops reads as zero if the area grows back.
                self.zero_block_bytes(at, new_size as u64, new_pages * PAGE_SIZE)?;
            }
            // SAFETY: the zone lies in the region, which never holds address 0.
            return Ok(unsafe { NonNull::new_unchecked(at.addr as *mut u8) });
        }
        let mut prot = Prot::READ;
        if flags.contains(PageTableFlags::WRITABLE) {
            prot |= Prot::WRITE;
        }
        if !flags.contains(PageTableFlags::NO_EXECUTE) {
            prot |= Prot::EXEC;
        }
        let options = VmOptions {
            prot,
            flags: if zeroed {
                VmFlags::ZERO
            } else {
                VmFlags::empty()
            },
            ..VmOptions::default()
        };
        // The moved area keeps the caller that made it, as a tree area does.
        let caller = block.caller(first).unwrap_or(Location::caller());
        let new = self.vmalloc_for(new_size, &options, caller)?;
        let copied = self.copy_area(at, new.as_ptr() as u64, pages * PAGE_SIZE);
        let freed = copied.and_then(|()| self.free_in_block(at, true));
        if let Err(error) = freed {
            // The old area changed under us (freed by someone else): keep nothing.
            // SAFETY: `new` was made above and handed to nobody.
            let _ = unsafe { self.vfree(new.as_ptr()) };
            return Err(error);
        }
        Ok(new)
    }

    /// Shrinks the live area at page `first` of block `index` from `pages` to
    /// `new_pages` pages in place: the dropped pages' entries are cleared and flushed
    /// at once, and their frames and pages freed; the first dropped page becomes the
    /// guard.
    fn shrink_in_block(
        &self,
        index: usize,
        block: &Block,
        first: usize,
        pages: usize,
        new_pages: usize,
    ) -> Result<(), Error> {
        if new_pages == pages {
            return Ok(());
        }
        let irq = IrqOff::new(&self.tlb);
        let dropped = pages - new_pages;
        let mut frames = [NO_FRAME; MAX_BLOCK_PAGES as usize];
        for (i, frame) in frames[..dropped].iter_mut().enumerate() {
            // SAFETY: the entry lies in the block's leaf table and belongs to the
            // caller's live area.
            let raw = unsafe { block.entry(first + new_pages + i).replace(0) };
            *frame = PhysFrame::containing_address(PhysAddr::new(raw & ADDR_MASK));
        }
        let (tail, _) = block.cut(first, pages, new_pages);
        let cut = Page::containing_address(VirtAddr::new(block.base)) + (first + new_pages) as u64;
        let mut gather: Gather<'_, F> = self.gather();
        gather.stale(RangeFlush::from_range(Page::range(
            cut,
            cut + dropped as u64,
        )));
        gather.flush();
        // The cache stays held until the tail is back in the bitmap, which only its
        // holder writes (an offline CPU's cache is claimed by whoever drains it).
        let mut slot = self.cpu_slot(&irq);
        let owned = slot
            .as_mut()
            .and_then(|slot| Self::owned_block(slot.split().1));
        self.free_again(owned, index, tail);
        drop(slot);
        frames[..dropped]
            .iter()
            .for_each(|&frame| gather.free(frame));
        gather.finish();
        self.blocks
            .data
            .fetch_sub(dropped as i64, Ordering::Relaxed);
        self.blocks
            .live_pages
            .fetch_sub(dropped as i64, Ordering::Relaxed);
        Ok(())
    }

    /// Zeroes bytes `[from, to)` of the live area at `at`, through `PhysMemory`.
    fn zero_block_bytes(&self, at: InZone<'_>, from: u64, to: u64) -> Result<(), Error> {
        let mut offset = from;
        while offset < to {
            let in_page = offset % PAGE_SIZE;
            let len = (PAGE_SIZE - in_page).min(to - offset);
            let page = InZone {
                addr: at.addr + offset,
                ..at
            };
            let frame = self.block_frame(page)?;
            let ptr = self.phys.phys_to_virt(frame.start_address() + in_page);
            // SAFETY: a frame of a live area of the caller's, reachable through
            // `PhysMemory`; the range stays within it.
            unsafe { core::ptr::write_bytes(ptr, 0, len as usize) };
            offset += len;
        }
        Ok(())
    }

    /// Copies `bytes` from the area at `from` (in the zone) to the area at `to`, frame
    /// by frame through `PhysMemory`.
    fn copy_area(&self, from: InZone<'_>, to: u64, bytes: u64) -> Result<(), Error> {
        for offset in (0..bytes).step_by(PAGE_SIZE as usize) {
            let len = (bytes - offset).min(PAGE_SIZE) as usize;
            let page = InZone {
                addr: from.addr + offset,
                ..from
            };
            let source = self.block_frame(page)?;
            let target = self.vmalloc_to_frame(VirtAddr::new(to + offset))?;
            let source = self.phys.phys_to_virt(source.start_address());
            let target = self.phys.phys_to_virt(target.start_address());
            // SAFETY: both are frames of live areas (the target is ours alone), whole
            // frames reachable through `PhysMemory`; distinct areas share no frame.
            unsafe { core::ptr::copy_nonoverlapping(source, target, len) };
        }
        Ok(())
    }

    /// Copies the live areas of the zone starting in `from`'s page or above into
    /// `out`, in address order; returns how many, and where to go on if `out` filled
    /// up.
    pub(in crate::vmalloc) fn copy_block_areas(
        &self,
        from: u64,
        out: &mut [AreaInfo],
    ) -> (usize, Option<u64>) {
        let mut count = 0;
        let blocks = &self.blocks;
        let first = (from.saturating_sub(blocks.zone) / super::BLOCK_BYTES) as usize;
        for (_, block) in blocks.published().skip(first) {
            for page in 0..BLOCK_PAGES {
                let start = block.base + page as u64 * PAGE_SIZE;
                // `from` may be one past the zone's start: its line was listed.
                if start < from & !(PAGE_SIZE - 1) || block.pages_at(page) == 0 {
                    continue;
                }
                if count == out.len() {
                    return (count, Some(start));
                }
                if let Some((area, _)) = area_in(block, page) {
                    out[count] = area.info();
                    count += 1;
                }
            }
        }
        (count, None)
    }

    /// Unmaps the areas still live in the zone, flushes, and hands their frames to
    /// `gather`: the manager's teardown, after the caches were emptied.
    pub(in crate::vmalloc) fn unmap_all_blocks(&self, gather: &mut Gather<'_, F>) {
        // First every entry stops being present, keeping its frame; one flush; then
        // the frames are taken.
        let mut any = false;
        self.each_live_page(|entry| {
            // SAFETY: the block's table; the manager is being dropped, nothing else
            // touches it.
            unsafe { entry.write(entry.read() & !PageTableFlags::PRESENT.bits()) };
            any = true;
        });
        if !any {
            return;
        }
        let zone = Page::containing_address(VirtAddr::new(self.blocks.zone));
        let pages = self.blocks.count as u64 * BLOCK_PAGES as u64;
        gather.stale(RangeFlush::from_range(Page::range(zone, zone + pages)));
        gather.flush();
        self.each_live_page(|entry| {
            // SAFETY: as above.
            let raw = unsafe { entry.replace(0) };
            gather.free(PhysFrame::containing_address(PhysAddr::new(
                raw & ADDR_MASK,
            )));
        });
    }

    /// Runs `op` on the entry of every page of every live area in the zone.
    fn each_live_page(&self, mut op: impl FnMut(*mut u64)) {
        for (_, block) in self.blocks.published() {
            for first in 0..BLOCK_PAGES {
                (first..first + block.pages_at(first)).for_each(|page| op(block.entry(page)));
            }
        }
    }
}

/// The leaf flags of entry `page` of `block`.
fn block_entry_flags(block: &Block, page: usize) -> u64 {
    // SAFETY: the entry lies in the block's table; a read of a word only the area's
    // owner (the caller) changes.
    unsafe { block.entry(page).read() & !ADDR_MASK }
}

/// The live area over `page` of `block`, and whether `page` is its guard.
fn area_in(block: &Block, page: usize) -> Option<(BlockArea, bool)> {
    let (first, pages) = block.area_over(page)?;
    let area = BlockArea {
        start: VirtAddr::new(block.base + first as u64 * PAGE_SIZE),
        pages: pages as u64,
        flags: PageTableFlags::from_bits_truncate(block_entry_flags(block, first)),
        caller: block.caller(first),
    };
    Some((area, page == first + pages))
}

const _: () = assert!(FREED & 0x1f == 0);
