//! A CPU's cache: its block, free frames and lazy list, in its [`PerCpu`] slot.

use super::block::{Block, NO_OWNER};
use super::{BLOCK_BYTES, BLOCK_PAGES, MAX_BLOCK_PAGES, MAX_BLOCKS, TAKE_FROM};
use crate::paging::RangeFlush;
use crate::percpu::{Held, Init};
use crate::sync::IrqOff;
use crate::tlb::FlushTicket;
use crate::vmalloc::gather::CountingFrames;
use crate::vmalloc::locked::Locked;
use crate::vmalloc::manager::Vmalloc;
use crate::{Error, FrameSource, PAGE_SIZE, PhysMemory, TlbFlush};
use core::ptr::NonNull;
use core::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use x86_64::structures::paging::page::PageRange;
use x86_64::structures::paging::{Page, PhysFrame};
use x86_64::{PhysAddr, VirtAddr};

/// Free frames a CPU keeps at most: as many as half its lazy list holds, so the
/// frames of a landed half fit back in the cache and a steady stream of areas costs
/// the frame allocator nothing.
pub(super) const CACHED_FRAMES: usize = LAZY_FRAMES / 2;
/// Frames a CPU takes from the allocator at once.
pub(super) const REFILL: usize = 32;
/// Freed areas a CPU's lazy list holds. On a machine with several CPUs each flush is
/// a shootdown, so the list is long (Linux batches its lazy vmap purges by the
/// megabyte), and it flushes in halves without waiting: once half of it collected,
/// that half's shootdown is sent and the CPU goes on; when the next half is due, the
/// first one's IPIs were long served, so finishing it rarely waits, and its areas
/// and frames come back. A stream of 1-page areas sends a shootdown per 112 frees
/// and waits for almost none.
const LAZY_RANGES: usize = 224;
/// Freed frames (1.4 MiB) the lazy list holds: 16-page areas send a shootdown every
/// 11 frees.
const LAZY_FRAMES: usize = 352;

const _: () = assert!(REFILL >= MAX_BLOCK_PAGES as usize && REFILL <= CACHED_FRAMES);

pub(super) const NO_FRAME: PhysFrame = PhysFrame::containing_address(PhysAddr::zero());

/// A freed area waiting for its CPU's batched flush: its block, its first page and
/// its mapped pages, packed in a word so that the list fits the cache's frame.
#[derive(Debug, Clone, Copy)]
pub(super) struct Lazy(u32);

const _: () = assert!(
    MAX_BLOCKS <= 1 << 10 && BLOCK_PAGES <= 1 << 10 && MAX_BLOCK_PAGES < 1 << 12,
    "a block index and a page each fit 10 bits, a page count 12"
);

impl Lazy {
    const NONE: Lazy = Lazy(0);

    pub(super) fn new(block: usize, first: usize, pages: usize) -> Self {
        Self((block as u32) | (first as u32) << 10 | (pages as u32) << 20)
    }

    pub(super) fn block(self) -> usize {
        (self.0 & 0x3ff) as usize
    }

    pub(super) fn first(self) -> usize {
        (self.0 >> 10 & 0x3ff) as usize
    }

    pub(super) fn pages(self) -> u64 {
        u64::from(self.0 >> 20)
    }
}

/// What a CPU's cache counts: written by its holder, read by `stats` from any CPU.
pub(crate) struct CacheCounters {
    /// Frames in `frames`.
    pub(super) cached: AtomicU64,
    /// Frames in `lazy_frames`.
    pub(super) pending: AtomicU64,
    /// Data frames mapped minus unmapped by this CPU.
    pub(super) data: AtomicI64,
    /// Areas made minus freed by this CPU.
    pub(super) areas: AtomicI64,
    /// Pages (guards included) of areas made minus freed by this CPU.
    pub(super) live_pages: AtomicI64,
    /// Whether the cache owns a block.
    pub(super) owns_block: AtomicBool,
}

impl Init for CacheCounters {
    const INIT: Self = CacheCounters {
        cached: AtomicU64::new(0),
        pending: AtomicU64::new(0),
        data: AtomicI64::new(0),
        areas: AtomicI64::new(0),
        live_pages: AtomicI64::new(0),
        owns_block: AtomicBool::new(false),
    };
}

impl CacheCounters {
    /// Whether draining the cache would give anything back.
    fn holds_anything(&self) -> bool {
        self.cached.load(Ordering::Relaxed) > 0
            || self.pending.load(Ordering::Relaxed) > 0
            || self.owns_block.load(Ordering::Relaxed)
    }
}

/// Adds `delta` to a counter only the cache's holder writes: no locked instruction.
#[inline]
pub(super) fn add(counter: &AtomicI64, delta: i64) {
    counter.store(counter.load(Ordering::Relaxed) + delta, Ordering::Relaxed);
}

/// A CPU's cache, touched only by whoever holds its slot; lives in a frame of its own
/// until the manager is dropped, its lazy list in another.
pub(super) struct CpuState {
    pub(super) block: Option<usize>,
    frames: [PhysFrame; CACHED_FRAMES],
    cached: usize,
    lazy: NonNull<LazyList>,
    /// The frame this state lives in.
    frame: PhysFrame,
}

impl CpuState {
    /// Frames the cache holds.
    pub(super) fn cached_frames(&self) -> usize {
        self.cached
    }
}

/// A CPU's lazy list: freed areas and their frames waiting for a flush.
struct LazyList {
    areas: [Lazy; LAZY_RANGES],
    len: usize,
    frames: [PhysFrame; LAZY_FRAMES],
    frame_count: usize,
    /// The first `flying` areas and `flying_frames` frames wait for the shootdown
    /// `ticket` records (see [`LAZY_RANGES`]).
    flying: usize,
    flying_frames: usize,
    ticket: FlushTicket,
    /// The frame this list lives in.
    frame: PhysFrame,
}

impl CpuState {
    /// Freed areas waiting on the lazy list.
    pub(super) fn lazy_len(&self) -> usize {
        // SAFETY: the list lives until the manager is dropped; `&self` comes from
        // the slot's holder, which writes the list only through `&mut` on the state.
        unsafe { self.lazy.as_ref() }.len
    }

    /// The lazy list, borrowed apart from the rest of the state (it lives in a frame
    /// of its own), so the cache's frames can take its frames.
    ///
    /// # Safety
    ///
    /// The caller holds the slot this state belongs to, and no other reference to
    /// the list is used while this one is.
    unsafe fn lazy<'a>(&self) -> &'a mut LazyList {
        let mut list = self.lazy;
        // SAFETY: the list lives until the manager is dropped, and only the slot's
        // holder reaches it, through one reference at a time (caller).
        unsafe { list.as_mut() }
    }
}

/// The frame holding a CPU's cache.
pub(crate) struct StatePage(NonNull<CpuState>);

// SAFETY: the state is the slot's, and moves with it between CPUs.
unsafe impl Send for StatePage {}

/// A CPU's cache, held.
pub(super) type Slot<'a> = Held<'a, CacheCounters, Option<StatePage>>;

impl<F, M, T> Vmalloc<F, M, T>
where
    F: FrameSource + Clone,
    M: PhysMemory + Copy,
    T: TlbFlush,
{
    /// The calling CPU's cache, for as long as `irq` holds interrupts off; emptied
    /// first if that was asked. `None` when the flush policy names no CPUs, or the
    /// cache is held (further up this CPU's stack, or by a CPU draining it).
    pub(super) fn cpu_slot<'a>(&'a self, irq: &'a IrqOff<'_>) -> Option<Slot<'a>> {
        let cpus = self.tlb.cpus()?;
        let mut slot = self.blocks.cpus.this_cpu(cpus, irq)?;
        if slot.take_drain_request() {
            self.empty_cache(&mut slot);
        }
        Some(slot)
    }

    /// The block a held cache owns, without making a state for a CPU that has none
    /// (it owns no block).
    pub(super) fn owned_block(owned: &Option<StatePage>) -> Option<usize> {
        // SAFETY: as in `open`: the state lives until the manager is dropped, and the
        // caller holds the slot it belongs to.
        owned
            .as_ref()
            .and_then(|page| unsafe { page.0.as_ref() }.block)
    }

    /// The held cache's state, made on first use; `None` if no frame can be had.
    pub(super) fn open<'s>(&self, owned: &'s mut Option<StatePage>) -> Option<&'s mut CpuState> {
        if owned.is_none() {
            let list = LazyList {
                areas: [Lazy::NONE; LAZY_RANGES],
                len: 0,
                frames: [NO_FRAME; LAZY_FRAMES],
                frame_count: 0,
                flying: 0,
                flying_frames: 0,
                ticket: FlushTicket::DONE,
                frame: NO_FRAME,
            };
            let list = self.place(list, |list, frame| list.frame = frame).ok()?;
            let state = CpuState {
                block: None,
                frames: [NO_FRAME; CACHED_FRAMES],
                cached: 0,
                // SAFETY: placed just above.
                lazy: unsafe { NonNull::new_unchecked(list) },
                frame: NO_FRAME,
            };
            let Ok(placed) = self.place(state, |state, frame| state.frame = frame) else {
                // SAFETY: placed above; nothing else knows of it.
                self.unplace(unsafe { (*list).frame });
                return None;
            };
            // SAFETY: placed just above: a valid, unaliased state.
            *owned = Some(StatePage(unsafe { NonNull::new_unchecked(placed) }));
        }
        // SAFETY: the state lives until the manager is dropped and only the slot's
        // holder reaches it; `&mut` on the slot's part keeps this reference unique.
        owned.as_mut().map(|page| unsafe { page.0.as_mut() })
    }

    /// Gives back the state [`open`](Self::open) made, with the frames it cached, if
    /// it has no block and nothing waits for a flush: a call that made it and
    /// failed leaves no bookkeeping behind.
    pub(super) fn close_if_unused(&self, counters: &CacheCounters, owned: &mut Option<StatePage>) {
        let Some(page) = owned.take() else {
            return;
        };
        // SAFETY: the state lives until here and only the slot's holder reaches it.
        let (state, list) = unsafe {
            let state = page.0.as_ref();
            (state, state.lazy.as_ref())
        };
        let unused = state.block.is_none()
            && list.len == 0
            && list.frame_count == 0
            && list.ticket.is_done();
        if !unused {
            *owned = Some(page);
            return;
        }
        let mut gather = self.gather();
        for &frame in &state.frames[..state.cached] {
            gather.free(frame);
        }
        gather.finish();
        counters.cached.store(0, Ordering::Relaxed);
        let (list_frame, state_frame) = (list.frame, state.frame);
        self.unplace(list_frame);
        self.unplace(state_frame);
    }

    /// Makes sure the cache holds `n` frames: from the allocator, or from its own
    /// lazy list after flushing it. Returns how many came from the allocator (on top
    /// of the cache, for [`unstock`](Self::unstock) to give back if the call fails),
    /// or `Err` with that count when the cache still holds fewer than `n`.
    pub(super) fn stock_frames(
        &self,
        counters: &CacheCounters,
        state: &mut CpuState,
        n: usize,
    ) -> Result<usize, usize> {
        let mut taken = 0;
        if state.cached < n {
            let have = state.cached;
            let want = REFILL.max(n).min(CACHED_FRAMES - have);
            taken = self
                .frames
                .alloc_frames(&mut state.frames[have..have + want]);
            state.cached += taken;
            counters
                .cached
                .store(state.cached as u64, Ordering::Relaxed);
        }
        if state.cached < n {
            self.flush_lazy(counters, state);
        }
        if state.cached >= n {
            Ok(taken)
        } else {
            Err(taken)
        }
    }

    /// Gives the `taken` frames a failed call's [`stock_frames`](Self::stock_frames)
    /// took from the allocator back to it (the cache's top `taken`, as many: a lazy
    /// list flushed meanwhile may have put its frames above them): a failed call
    /// changes nothing.
    pub(super) fn unstock(&self, state: &mut CpuState, counters: &CacheCounters, taken: usize) {
        let taken = taken.min(state.cached);
        if taken == 0 {
            return;
        }
        state.cached -= taken;
        counters
            .cached
            .store(state.cached as u64, Ordering::Relaxed);
        // Frames of the cache, mapped nowhere: nothing stale to wait for.
        let mut gather = self.gather();
        (state.frames[state.cached..state.cached + taken].iter())
            .for_each(|&frame| gather.free(frame));
        gather.finish();
    }

    /// Takes `n` frames out of the cache into `out` (the caller stocked them).
    pub(super) fn take_frames(
        state: &mut CpuState,
        counters: &CacheCounters,
        out: &mut [PhysFrame],
    ) {
        let n = out.len();
        state.cached -= n;
        // One frame (the common 1-page area) without a call to `memcpy`.
        match out {
            [frame] => *frame = state.frames[state.cached],
            _ => out.copy_from_slice(&state.frames[state.cached..state.cached + n]),
        }
        counters
            .cached
            .store(state.cached as u64, Ordering::Relaxed);
    }

    /// Puts flushed `frames` into the cache; those it has no room for go back to the
    /// allocator.
    pub(super) fn cache_frames(
        &self,
        state: &mut CpuState,
        counters: &CacheCounters,
        frames: &[PhysFrame],
    ) {
        let room = (CACHED_FRAMES - state.cached).min(frames.len());
        let (kept, rest) = frames.split_at(room);
        state.frames[state.cached..state.cached + room].copy_from_slice(kept);
        state.cached += room;
        counters
            .cached
            .store(state.cached as u64, Ordering::Relaxed);
        if !rest.is_empty() {
            // Flushed frames of ours: nothing stale to wait for.
            let mut gather = self.gather();
            rest.iter().for_each(|&frame| gather.free(frame));
            gather.finish();
        }
    }

    /// Queues a freed area and its frames on the cache's lazy list, flushing the list
    /// first if it is full, and sending half of it off once that half is collected.
    pub(super) fn queue_lazy(
        &self,
        counters: &CacheCounters,
        state: &mut CpuState,
        lazy: Lazy,
        frames: &[PhysFrame],
    ) {
        let pages = frames.len();
        // SAFETY: the caller holds the slot; no other reference to the list is live.
        let list = unsafe { state.lazy() };
        if list.len == LAZY_RANGES || list.frame_count + pages > LAZY_FRAMES {
            self.flush_lazy(counters, state);
        }
        // SAFETY: as above: the list taken before is no longer used.
        let list = unsafe { state.lazy() };
        list.areas[list.len] = lazy;
        list.len += 1;
        let count = list.frame_count;
        // One frame (the common 1-page area) without a call to `memcpy`.
        match frames {
            [frame] => list.frames[count] = *frame,
            _ => list.frames[count..count + pages].copy_from_slice(frames),
        }
        list.frame_count += pages;
        counters
            .pending
            .store(list.frame_count as u64, Ordering::Relaxed);
        if list.len - list.flying >= LAZY_RANGES / 2
            || list.frame_count - list.flying_frames >= LAZY_FRAMES / 2
        {
            self.send_lazy(counters, state);
        }
    }

    /// The second half of the lazy list takes off: the half in flight is finished
    /// (its shootdown sent a half ago) and comes back, and the rest's shootdown is
    /// sent without waiting.
    fn send_lazy(&self, counters: &CacheCounters, state: &mut CpuState) {
        // SAFETY: the caller holds the slot; each reference to the list below is
        // used only until the next one is taken.
        if unsafe { state.lazy() }.flying > 0 {
            // SAFETY: as above.
            self.tlb.finish_flush(&mut unsafe { state.lazy() }.ticket);
            self.land_lazy(counters, state);
        }
        // SAFETY: as above.
        let list = unsafe { state.lazy() };
        let mut gather = self.gather();
        list.areas[..list.len]
            .iter()
            .for_each(|entry| gather.stale(RangeFlush::from_range(self.range_of(*entry))));
        gather.start_flush(&mut list.ticket);
        gather.finish();
        list.flying = list.len;
        list.flying_frames = list.frame_count;
    }

    /// The areas and frames in flight, whose flush is finished, are free again; the
    /// rest of the list moves to its front.
    fn land_lazy(&self, counters: &CacheCounters, state: &mut CpuState) {
        // SAFETY: the caller holds the slot; no other reference to the list is live.
        let list = unsafe { state.lazy() };
        let (areas, frames) = (list.flying, list.flying_frames);
        let owned = state.block;
        for entry in &list.areas[..areas] {
            self.free_again(owned, entry.block(), entry.first());
        }
        self.cache_frames(state, counters, &list.frames[..frames]);
        list.areas.copy_within(areas..list.len, 0);
        list.len -= areas;
        list.frames.copy_within(frames..list.frame_count, 0);
        list.frame_count -= frames;
        list.flying = 0;
        list.flying_frames = 0;
        counters
            .pending
            .store(list.frame_count as u64, Ordering::Relaxed);
    }

    /// The mapped pages of a freed area.
    pub(super) fn range_of(&self, lazy: Lazy) -> PageRange {
        let start =
            self.blocks.zone + lazy.block() as u64 * BLOCK_BYTES + lazy.first() as u64 * PAGE_SIZE;
        let first = Page::containing_address(VirtAddr::new(start));
        Page::range(first, first + lazy.pages())
    }

    /// One batched flush for the cache's lazy list; then its frames join the cache
    /// (the rest go back to the allocator) and its pages are free again.
    pub(super) fn flush_lazy(&self, counters: &CacheCounters, state: &mut CpuState) {
        // SAFETY: the caller holds the slot; no other reference to the list is live.
        let list = unsafe { state.lazy() };
        if list.len == 0 {
            return;
        }
        self.tlb.finish_flush(&mut list.ticket);
        // One batched flush for the areas not in flight: past the ceiling, which a
        // list of small areas usually is, one full flush.
        let mut gather = self.gather();
        list.areas[list.flying..list.len]
            .iter()
            .for_each(|entry| gather.stale(RangeFlush::from_range(self.range_of(*entry))));
        gather.flush();
        let owned = state.block;
        for entry in &list.areas[..list.len] {
            self.free_again(owned, entry.block(), entry.first());
        }
        let count = list.frame_count;
        list.len = 0;
        list.frame_count = 0;
        list.flying = 0;
        list.flying_frames = 0;
        counters.pending.store(0, Ordering::Relaxed);
        // Flushed above: the frames go back to this cache.
        gather.finish_into(|_| self.cache_frames(state, counters, &list.frames[..count]));
    }

    /// The flushed freed area at page `first` of block `index` is free again:
    /// directly in the bitmap when the cache holding it owns the block (`owned`),
    /// through the block's list of returned areas otherwise.
    pub(super) fn free_again(&self, owned: Option<usize>, index: usize, first: usize) {
        let block = self.blocks.block(index);
        if owned == Some(index) {
            // SAFETY: the caller holds the cache of the CPU owning the block.
            unsafe { block.free_again(first) };
        } else if block.return_freed(first, TAKE_FROM) {
            self.blocks.mark_takeable(index);
        }
    }

    /// Empties a held cache: flushes its lazy list, gives its frames back to the
    /// allocator and hands its block back. Returns whether anything came back.
    pub(super) fn empty_cache(&self, slot: &mut Slot<'_>) -> bool {
        let (counters, owned) = slot.split();
        let Some(page) = owned.as_mut() else {
            return false;
        };
        // SAFETY: as in `open`: the slot is held.
        let state = unsafe { page.0.as_mut() };
        let released = state.lazy_len() > 0 || state.cached > 0 || state.block.is_some();
        self.flush_lazy(counters, state);
        if state.cached > 0 {
            // Flushed frames of ours: nothing stale to wait for.
            let mut gather = self.gather();
            state.frames[..state.cached]
                .iter()
                .for_each(|&frame| gather.free(frame));
            gather.finish();
            state.cached = 0;
            counters.cached.store(0, Ordering::Relaxed);
        }
        if let Some(index) = state.block.take() {
            self.release_block(index);
            counters.owns_block.store(false, Ordering::Relaxed);
        }
        released
    }

    /// Empties every CPU's cache, other CPUs' too: flushes its lazy list, gives its
    /// frames back to the allocator and hands its block back (see [per-CPU
    /// blocks](super)). Returns whether anything came back. An online CPU's cache is
    /// handed over from work it runs in its shootdown service; one that cannot be had
    /// now (the flush policy cannot run work on other CPUs, or its owner is inside a
    /// call of its own) empties itself at its owner's next call.
    pub fn drain_cpu_caches(&self) -> bool {
        self.settle();
        let Some(cpus) = self.tlb.cpus() else {
            return false;
        };
        let mut released = false;
        self.blocks.cpus.drain_all(
            cpus,
            CacheCounters::holds_anything,
            |work| self.tlb.call_on_other_cpus(work),
            || self.tlb.relax(),
            |slot| released |= self.empty_cache(slot),
        );
        released
    }

    /// Empties every CPU's cache, with no CPU in the manager: the teardown's. It
    /// reaches the online CPUs no work can (a flush policy that runs none, where
    /// [`drain_cpu_caches`](Self::drain_cpu_caches) leaves them to their next call,
    /// which a dropped manager never gets).
    pub(in crate::vmalloc) fn empty_all_caches(&mut self) {
        self.settle();
        // Out of `self` for the loop: emptying a cache touches no CPU's slot.
        let mut cpus = core::mem::replace(&mut self.blocks.cpus, crate::percpu::PerCpu::new());
        {
            // As every call into the frame allocator (see `Drop for Vmalloc`).
            let _irq = IrqOff::new(&self.tlb);
            for mut slot in cpus.hold_each() {
                self.empty_cache(&mut slot);
            }
        }
        self.blocks.cpus = cpus;
    }

    /// Block `index` is no longer its CPU's.
    pub(super) fn release_block(&self, index: usize) {
        let block = self.blocks.block(index);
        block.release();
        if block.worth_taking(TAKE_FROM) {
            self.blocks.mark_takeable(index);
        }
    }

    /// A block for `cpu`: one nobody owns with room in it, or a new one;
    /// [`Error::OutOfFrames`] when a new one is wanted and its descriptor or leaf
    /// table cannot be had, [`Error::OutOfVirtualSpace`] when the zone has no block
    /// left to make.
    pub(super) fn take_block(&self, cpu: usize) -> Result<usize, Error> {
        let blocks = &self.blocks;
        for (word, marks) in blocks.takeable.iter().enumerate() {
            let mut bits = marks.load(Ordering::Relaxed);
            while bits != 0 {
                let index = word * 64 + bits.trailing_zeros() as usize;
                bits &= bits - 1;
                let block = blocks.block(index);
                if block.worth_taking(TAKE_FROM) && block.take(cpu) {
                    marks.fetch_and(!(1 << (index % 64)), Ordering::Relaxed);
                    return Ok(index);
                }
                if block.owner() == NO_OWNER && !block.worth_taking(TAKE_FROM) {
                    // Not worth it any more: the next return marks it again.
                    marks.fetch_and(!(1 << (index % 64)), Ordering::Relaxed);
                }
            }
        }
        loop {
            let unused = blocks.activated.load(Ordering::Acquire);
            if unused >= blocks.count {
                return Err(Error::OutOfVirtualSpace);
            }
            match self.lock().activate_block(unused, cpu) {
                Ok(_) => return Ok(unused),
                Err(Error::OutOfFrames) => return Err(Error::OutOfFrames),
                // Made by another CPU meanwhile (its own now): the next one. Giving up
                // here sent the small area to the tree.
                Err(_) if blocks.activated.load(Ordering::Acquire) != unused => continue,
                Err(_) => return Err(Error::OutOfVirtualSpace),
            }
        }
    }

    /// The last resort of a small area once every cache is drained: the first block
    /// from `*next` on that nobody owns and has `pages` pages free, however few
    /// (whether they lie together, carving tells); `*next` moves past it.
    pub(super) fn take_any_block(
        &self,
        cpu: usize,
        pages: usize,
        next: &mut usize,
    ) -> Option<usize> {
        while *next < self.blocks.published_count() {
            let index = *next;
            *next += 1;
            let block = self.blocks.block(index);
            if block.worth_taking(pages) && block.take(cpu) {
                return Some(index);
            }
        }
        None
    }

    /// Moves `value` into a frame of its own; `set_frame` records the frame in it.
    pub(super) fn place<V>(
        &self,
        mut value: V,
        set_frame: impl FnOnce(&mut V, PhysFrame),
    ) -> Result<*mut V, Error> {
        const { assert!(size_of::<V>() <= PAGE_SIZE as usize && align_of::<V>() <= 4096) };
        let frame = self.frames.alloc_frame().ok_or(Error::OutOfFrames)?;
        set_frame(&mut value, frame);
        let ptr = self.phys.phys_to_virt(frame.start_address()).cast::<V>();
        // SAFETY: the frame is fresh from the allocator, reachable through `phys`
        // (`FrameSource` and `PhysMemory` contracts), page-aligned and big enough.
        unsafe { ptr.write(value) };
        self.blocks.bookkeeping.fetch_add(1, Ordering::Relaxed);
        Ok(ptr)
    }

    /// Gives back a frame `place` took.
    pub(super) fn unplace(&self, frame: PhysFrame) {
        let mut gather = self.gather();
        gather.free(frame);
        gather.finish();
        self.blocks.bookkeeping.fetch_sub(1, Ordering::Relaxed);
    }

    /// Gives back the frames of every block descriptor and CPU cache: the teardown,
    /// after the caches were emptied.
    pub(in crate::vmalloc) fn release_block_bookkeeping(&mut self) {
        let cpus = core::mem::replace(&mut self.blocks.cpus, crate::percpu::PerCpu::new());
        // As every call into the frame allocator (see `Drop for Vmalloc`).
        let _irq = IrqOff::new(&self.tlb);
        for slot in &self.blocks.blocks {
            let block = slot.swap(core::ptr::null_mut(), Ordering::AcqRel);
            // SAFETY: descriptors stay valid until here; nothing else holds one.
            if let Some(block) = unsafe { block.as_ref() } {
                self.unplace(block.frame);
            }
        }
        for page in cpus.into_owned().flatten() {
            // SAFETY: the state and its lazy list live until here; the slots are gone.
            let (frame, list) = unsafe {
                let state = page.0.as_ref();
                (state.frame, state.lazy.as_ref().frame)
            };
            self.unplace(list);
            self.unplace(frame);
        }
    }
}

impl<'v, F, M, T> Locked<'v, F, M, T>
where
    F: FrameSource + Clone,
    M: PhysMemory + Copy,
    T: TlbFlush,
{
    /// Makes block `index` (the next one) with its leaf table, owned by `cpu`, and
    /// publishes it. The manager's lock serialises this; if another CPU made block
    /// `index` meanwhile, [`Error::AlreadyMapped`]. Nothing is kept on error.
    pub(super) fn activate_block(&mut self, index: usize, cpu: usize) -> Result<&'v Block, Error> {
        let vm = self.vm;
        let slot = &vm.blocks.blocks[index];
        if vm.blocks.activated.load(Ordering::Acquire) != index {
            return Err(Error::AlreadyMapped);
        }
        let base = vm.blocks.zone + index as u64 * BLOCK_BYTES;
        let block = vm.place(Block::new(base, cpu), |block, frame| block.frame = frame)?;
        let source = CountingFrames::new(&vm.frames);
        let inner = self.inner();
        // SAFETY: the zone is this manager's; `frames` hands out unused frames
        // reachable through `phys` (`new`'s contract).
        let table = unsafe { inner.tables.leaf_table(VirtAddr::new(base), &source) };
        inner.page_table_frames = inner.page_table_frames.wrapping_add_signed(source.net());
        match table {
            Ok(table) => {
                // SAFETY: placed above and not yet published.
                unsafe { (*block).table = table };
                slot.store(block, Ordering::Release);
                vm.blocks.activated.store(index + 1, Ordering::Release);
                // SAFETY: published descriptors stay valid until the manager is dropped.
                Ok(unsafe { &*block })
            }
            Err(error) => {
                // SAFETY: placed above and never published.
                vm.unplace(unsafe { (*block).frame });
                Err(error)
            }
        }
    }
}

const _: () = assert!(
    size_of::<Block>() <= PAGE_SIZE as usize,
    "a descriptor fits its frame"
);
const _: () = assert!(
    size_of::<CpuState>() <= PAGE_SIZE as usize,
    "a cache fits its frame"
);
const _: () = assert!(BLOCK_PAGES.is_multiple_of(64));
