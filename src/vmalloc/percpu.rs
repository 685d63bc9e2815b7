//! Per-CPU blocks: small areas made and freed without the manager's lock.
//!
//! With [`VmallocConfig::cpu_caches`](super::VmallocConfig::cpu_caches) on, a
//! `vmalloc` of up to [`MAX_BLOCK_PAGES`] pages with plain options (page alignment,
//! a guard page, no 2 MiB pages, no label) is served from per-CPU state, after
//! Linux's vmap blocks (`vm_map_ram`) and per-CPU frame caches:
//!
//! - **The zone.** [`Vmalloc::new`](super::Vmalloc::new) reserves one range of the
//!   region, at most 1/64 of it and at most `MAX_BLOCKS` (512) blocks of 2 MiB, listed
//!   as one reserved area labelled `vmap_blocks`. Each block is one leaf page
//!   table's worth: the block makes its table when first used and keeps it until the
//!   manager is dropped, so mapping a page is one entry store, and no purge can free
//!   a table under it.
//! - **Carving.** A CPU owns one block at a time and carves areas from its bitmap of
//!   free pages, first fit from where it last carved: `pages + 1` pages each, the
//!   last one the unmapped guard. When its block has no room it flushes its own lazy
//!   list (which may free some) or hands the block back and takes another: one nobody
//!   owns with at least a quarter free (a bitmask finds them), else a new one.
//! - **Frames.** A CPU keeps up to `CACHED_FRAMES` (128) free frames, taken from the
//!   frame allocator `REFILL` (32) at a time.
//! - **Frees.** `vfree` from any CPU clears the area's entries under its block's lock
//!   and puts the range and its frames on the *freeing* CPU's lazy list. When that
//!   list is full, one flush over the span of its areas covers it (Linux's purge
//!   flushes one range too); then the frames join the CPU's cache and the pages are
//!   free again in their blocks. Until then neither the frames nor the range can be
//!   handed out again.
//!
//! # Locks
//!
//! Each CPU's cache and each block has its own spin lock, so CPUs share no lock on
//! the fast path. The order is: a CPU's cache, then the manager's lock, then a
//! block. The fast paths run with interrupts held off, frame allocator calls
//! included, so an interrupt handler that allocates never finds a lock held by the
//! code it interrupted. The owner only *tries* its cache's lock, so a call that
//! finds it held further up its own stack (or, when every CPU shares one cache,
//! held by another CPU) takes the locked path; waiting for another CPU's cache or
//! for a block serves TLB flush requests meanwhile ([`TlbFlush::relax`]).
//!
//! # Running out
//!
//! A locked call that runs out of frames or virtual space empties every CPU's cache
//! ([`Vmalloc::drain_cpu_caches`](super::Vmalloc::drain_cpu_caches)) and tries
//! once more: lazy lists are flushed, cached frames go back to the allocator, and
//! blocks are handed back. The zone itself stays reserved while the manager lives.
//!
//! # What callers see
//!
//! Areas in blocks behave as other `vmalloc` areas for `vfree`, `vfree_atomic`,
//! `vrealloc` (which shrinks them in place and copies them to grow), `set_prot`, `vmalloc_to_frame`, `find_vm_area`,
//! fault diagnosis (a freed one waiting for its flush is a use after free) and
//! listings, which show the zone as one line followed by the areas in it.
//! [`VmallocStats`](super::VmallocStats) counts them in `block_areas` and
//! `data_frames`, their frees waiting for a flush in `pending_purge_*`, and says what
//! the caches hold. Other calls on them (`vunmap`, `iounmap`, `populate`) refuse
//! them with [`Error::WrongKind`]. Every call keeps the promises it keeps on other
//! areas: `eager` frees flush at once, and a shrinking `vrealloc` (which stays in
//! place) returns after every CPU dropped the pages it took away.

use super::area::{AreaInfo, AreaKind};
use super::gather::{CountingFrames, Gather};
use super::locked::Locked;
use super::manager::Vmalloc;
use super::options::{Prot, VmFlags, VmOptions};
use crate::paging::{ADDR_MASK, RangeFlush};
use crate::smp::MAX_CPUS;
use crate::sync::{IrqGuard, IrqLock, IrqOff};
use crate::{Error, FrameSource, PAGE_SIZE, PhysMemory, TlbFlush};
use core::panic::Location;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicI64, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use x86_64::structures::paging::page::PageRange;
use x86_64::structures::paging::{Page, PageTable, PageTableFlags, PhysFrame};
use x86_64::{PhysAddr, VirtAddr};

/// Pages in a block: one leaf table's worth (2 MiB).
pub(super) const BLOCK_PAGES: usize = 512;
/// Bytes in a block.
pub(super) const BLOCK_BYTES: u64 = BLOCK_PAGES as u64 * PAGE_SIZE;
/// Largest area, in pages (its guard page not counted), served from a block.
pub const MAX_BLOCK_PAGES: u64 = 16;
/// Most blocks a zone holds (1 GiB).
pub(super) const MAX_BLOCKS: usize = 512;
/// Free frames a CPU keeps at most: as many as its lazy list holds, so the frames
/// of a flushed list fit back in the cache and a steady stream of areas costs the
/// frame allocator nothing.
pub(super) const CACHED_FRAMES: usize = 128;
/// Frames a CPU takes from the allocator at once.
pub(super) const REFILL: usize = 32;
/// Freed areas a CPU collects before one batched flush.
const LAZY_RANGES: usize = 64;
/// Freed frames (512 KiB) a CPU collects before one batched flush: on a machine
/// with several CPUs each flush is a shootdown, so 16-page areas should not pay one
/// every other free.
const LAZY_FRAMES: usize = CACHED_FRAMES;

const NO_FRAME: PhysFrame = PhysFrame::containing_address(PhysAddr::zero());

/// Words in a block's free-page bitmap.
const WORDS: usize = BLOCK_PAGES / 64;

/// Free pages from which a block nobody owns is worth taking.
const TAKE_FROM: usize = BLOCK_PAGES / 4;

/// A block's state, under its lock.
struct BlockState {
    /// The CPU carving from it, if any.
    owner: Option<usize>,
    /// Bit `i` set: page `i` is free and no TLB may still hold a translation of it.
    free: [u64; WORDS],
    /// Set bits in `free`.
    free_pages: usize,
    /// The word where the last area was carved: the next search starts there.
    hint: usize,
    /// Pages held by live areas, guard pages included.
    live: usize,
    /// Pages of freed areas waiting for a flush, guard pages included.
    dirty: usize,
    /// At a live area's first page, its pages (guard excluded), with [`ZEROED`] set
    /// for a `vzalloc` area; 0 elsewhere.
    len: [u8; BLOCK_PAGES],
    /// Where the live area starting at page `2 * i` or `2 * i + 1` was made (an area
    /// and its guard take two pages at least, so no two start in one pair).
    callers: [Option<&'static Location<'static>>; BLOCK_PAGES / 2],
}

/// Marks a zeroed area in [`BlockState::len`].
const ZEROED: u8 = 0x80;
/// Marks a freed area waiting for its flush in [`BlockState::len`] (for fault
/// diagnosis: a use after free).
const FREED: u8 = 0x40;

impl BlockState {
    /// A block owned by `cpu`, every page free.
    fn new(cpu: usize) -> Self {
        Self {
            owner: Some(cpu),
            free: [u64::MAX; WORDS],
            free_pages: BLOCK_PAGES,
            hint: 0,
            live: 0,
            dirty: 0,
            len: [0; BLOCK_PAGES],
            callers: [None; BLOCK_PAGES / 2],
        }
    }

    /// The first page of a run of `span` free pages, now taken: first fit from the
    /// word of the last carve, wrapping around. A run may cross into the next word:
    /// each word is searched with the next one above it.
    fn carve(&mut self, span: usize) -> Option<usize> {
        for step in 0..WORDS {
            let word = (self.hint + step) % WORDS;
            let next = self.free.get(word + 1).copied().unwrap_or(0);
            let both = u128::from(self.free[word]) | u128::from(next) << 64;
            // Bit i of `starts`: pages i..i + span of `both` are all free.
            let starts = (1..span).fold(both, |run, shift| run & both >> shift) as u64;
            if starts != 0 {
                let first = word * 64 + starts.trailing_zeros() as usize;
                self.set_free(first, span, false);
                self.hint = word;
                return Some(first);
            }
        }
        None
    }

    /// Marks pages `first..first + span` free (clean) or taken.
    fn set_free(&mut self, first: usize, span: usize, free: bool) {
        for page in first..first + span {
            let bit = 1u64 << (page % 64);
            if free {
                self.free[page / 64] |= bit;
            } else {
                self.free[page / 64] &= !bit;
            }
        }
        if free {
            self.free_pages += span;
        } else {
            self.free_pages -= span;
        }
    }

    /// Whether a CPU looking for a block should take this one.
    fn worth_taking(&self) -> bool {
        self.owner.is_none() && self.free_pages >= TAKE_FROM
    }

    /// Pages of the live area starting at page `first`; 0 if none does.
    fn pages_at(&self, first: usize) -> usize {
        if self.len[first] & FREED != 0 {
            return 0;
        }
        usize::from(self.len[first] & !ZEROED)
    }

    /// The freed area, still waiting for its flush, whose span holds page `page`:
    /// its first page and pages.
    fn freed_over(&self, page: usize) -> Option<(usize, usize)> {
        let lowest = page.saturating_sub(MAX_BLOCK_PAGES as usize);
        (lowest..=page).rev().find_map(|first| {
            let pages = usize::from(self.len[first] & !FREED);
            let freed = self.len[first] & FREED != 0;
            (freed && page <= first + pages).then_some((first, pages))
        })
    }

    /// The live area whose span (guard included) holds page `page`: its first page
    /// and its pages.
    fn area_over(&self, page: usize) -> Option<(usize, usize)> {
        let lowest = page.saturating_sub(MAX_BLOCK_PAGES as usize);
        (lowest..=page).rev().find_map(|first| {
            let pages = self.pages_at(first);
            (pages > 0 && page <= first + pages).then_some((first, pages))
        })
    }

    /// The live area starting at `addr`'s page (`addr` in `block`): its first page and
    /// pages, or the error `vfree` gives for `addr`.
    fn area_at(&self, block: &Block, addr: u64) -> Result<(usize, usize), Error> {
        let page = ((addr - block.base) / PAGE_SIZE) as usize;
        let pages = self.pages_at(page);
        if pages > 0 && addr.is_multiple_of(PAGE_SIZE) {
            return Ok((page, pages));
        }
        Err(match self.area_over(page) {
            Some((first, pages)) if page < first + pages => Error::InteriorPointer,
            _ => Error::NotAllocated,
        })
    }

    /// Marks the `span` freed pages from `first` as flushed: free again.
    fn clean(&mut self, first: usize, span: usize) {
        self.len[first] = 0;
        self.callers[first / 2] = None;
        self.dirty -= span;
        self.set_free(first, span, true);
    }
}

/// One block: its lock, its range, and its leaf table. Lives in a frame of its own
/// until the manager is dropped.
pub(super) struct Block {
    state: IrqLock<BlockState>,
    base: u64,
    /// The block's leaf table, through the manager's `PhysMemory`.
    table: *mut PageTable,
    /// The frame this descriptor lives in.
    frame: PhysFrame,
}

/// A freed area waiting for its CPU's batched flush.
#[derive(Debug, Clone, Copy)]
struct Lazy {
    block: u16,
    first: u16,
    pages: u8,
}

/// A CPU's cache, under its lock.
struct CpuState {
    block: Option<usize>,
    frames: [PhysFrame; CACHED_FRAMES],
    cached: usize,
    lazy: [Lazy; LAZY_RANGES],
    lazy_len: usize,
    lazy_frames: [PhysFrame; LAZY_FRAMES],
    lazy_frame_count: usize,
}

/// A CPU's cache and its counters; lives in a frame of its own until the manager is
/// dropped. The counters are written under the lock and read by `stats` without it.
pub(super) struct CpuCache {
    state: IrqLock<CpuState>,
    /// Frames in `frames`.
    cached: AtomicU64,
    /// Frames in `lazy_frames`.
    pending: AtomicU64,
    /// Data frames mapped minus unmapped by this CPU.
    data: AtomicI64,
    /// Areas made minus freed by this CPU.
    areas: AtomicI64,
    /// Pages (guards included) of areas made minus freed by this CPU.
    live_pages: AtomicI64,
    frame: PhysFrame,
}

/// What the manager keeps for its per-CPU blocks.
pub(super) struct Blocks {
    /// First address of the zone; 0 when the caches are off.
    zone: u64,
    /// Blocks in the zone.
    count: usize,
    blocks: [AtomicPtr<Block>; MAX_BLOCKS],
    /// Blocks made so far: `blocks[..activated]` are published, in order.
    activated: AtomicUsize,
    /// Bit `i` set: block `i` is worth taking (see `BlockState::worth_taking`);
    /// changed only under that block's lock.
    takeable: [AtomicU64; MAX_BLOCKS / 64],
    caches: [AtomicPtr<CpuCache>; MAX_CPUS],
    /// Counters of frees that went through no CPU's cache.
    data: AtomicI64,
    areas: AtomicI64,
    live_pages: AtomicI64,
    /// Frames holding descriptors and caches.
    bookkeeping: AtomicU64,
}

impl Blocks {
    /// No zone: every call takes the locked path.
    pub(super) const fn off() -> Self {
        Self {
            zone: 0,
            count: 0,
            blocks: [const { AtomicPtr::new(core::ptr::null_mut()) }; MAX_BLOCKS],
            activated: AtomicUsize::new(0),
            takeable: [const { AtomicU64::new(0) }; MAX_BLOCKS / 64],
            caches: [const { AtomicPtr::new(core::ptr::null_mut()) }; MAX_CPUS],
            data: AtomicI64::new(0),
            areas: AtomicI64::new(0),
            live_pages: AtomicI64::new(0),
            bookkeeping: AtomicU64::new(0),
        }
    }

    /// Blocks a zone for a region of `size` bytes gets: 1/64 of the region, at most
    /// [`MAX_BLOCKS`].
    pub(super) fn blocks_for(size: u64) -> usize {
        ((size / 64 / BLOCK_BYTES) as usize).min(MAX_BLOCKS)
    }

    /// The zone at `zone`, `count` blocks long.
    pub(super) fn set_zone(&mut self, zone: u64, count: usize) {
        self.zone = zone;
        self.count = count;
    }

    /// First address of the zone (0 when the caches are off).
    pub(super) fn zone(&self) -> u64 {
        self.zone
    }

    /// Bytes of the zone.
    pub(super) fn zone_bytes(&self) -> u64 {
        self.count as u64 * BLOCK_BYTES
    }

    /// Whether `addr` lies in the zone.
    pub(super) fn contains(&self, addr: u64) -> bool {
        addr.wrapping_sub(self.zone) < self.zone_bytes()
    }

    /// The block holding `addr` (in the zone), if it was ever used.
    fn block_at(&self, addr: u64) -> Option<(usize, &Block)> {
        let index = (addr.wrapping_sub(self.zone) / BLOCK_BYTES) as usize;
        let block = self.blocks.get(index)?.load(Ordering::Acquire);
        // SAFETY: published descriptors stay valid until the manager is dropped.
        unsafe { block.as_ref() }.map(|block| (index, block))
    }

    #[inline]
    fn block(&self, index: usize) -> &Block {
        let block = self.blocks[index].load(Ordering::Acquire);
        // SAFETY: as in `block_at`; callers pass indices of published blocks.
        unsafe { &*block }
    }

    /// Records whether block `index`, whose lock the caller holds, is worth taking.
    fn mark(&self, index: usize, state: &BlockState) {
        let (word, bit) = (&self.takeable[index / 64], 1u64 << (index % 64));
        let marked = word.load(Ordering::Relaxed) & bit != 0;
        if state.worth_taking() && !marked {
            word.fetch_or(bit, Ordering::Relaxed);
        } else if !state.worth_taking() && marked {
            word.fetch_and(!bit, Ordering::Relaxed);
        }
    }

    /// Every block made so far, in address order.
    fn published(&self) -> impl Iterator<Item = &Block> {
        let made = self.activated.load(Ordering::Acquire).min(self.count);
        (0..made).map(|index| self.block(index))
    }

    fn cache(&self, cpu: usize) -> Option<&CpuCache> {
        let cache = self.caches.get(cpu)?.load(Ordering::Acquire);
        // SAFETY: published caches stay valid until the manager is dropped.
        unsafe { cache.as_ref() }
    }

    /// What the caches hold, for `stats`.
    pub(super) fn counters(&self) -> BlockCounters {
        let mut counters = BlockCounters {
            zone_bytes: self.zone_bytes(),
            bookkeeping_frames: self.bookkeeping.load(Ordering::Relaxed),
            ..BlockCounters::default()
        };
        let (mut data, mut areas, mut live) = (
            self.data.load(Ordering::Relaxed),
            self.areas.load(Ordering::Relaxed),
            self.live_pages.load(Ordering::Relaxed),
        );
        for cache in (0..MAX_CPUS).filter_map(|cpu| self.cache(cpu)) {
            counters.cached_frames += cache.cached.load(Ordering::Relaxed);
            counters.pending_frames += cache.pending.load(Ordering::Relaxed);
            data += cache.data.load(Ordering::Relaxed);
            areas += cache.areas.load(Ordering::Relaxed);
            live += cache.live_pages.load(Ordering::Relaxed);
        }
        counters.data_frames = data.max(0) as u64;
        counters.areas = areas.max(0) as u64;
        counters.free_bytes = counters
            .zone_bytes
            .saturating_sub(live.max(0) as u64 * PAGE_SIZE);
        counters
    }
}

/// What the per-CPU caches hold (see `VmallocStats`).
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct BlockCounters {
    pub zone_bytes: u64,
    pub free_bytes: u64,
    pub areas: u64,
    pub data_frames: u64,
    pub cached_frames: u64,
    pub pending_frames: u64,
    pub bookkeeping_frames: u64,
}

/// Where in an area of a block a faulting address is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum BlockSite {
    /// A page of the live area.
    Live,
    /// Its guard page.
    Guard,
    /// The area was freed and waits for its flush: a use after free.
    Freed,
}

/// A live area in a block, as lookups see it.
#[derive(Debug, Clone, Copy)]
pub(super) struct BlockArea {
    pub start: VirtAddr,
    pub pages: u64,
    /// The leaf flags of its first page.
    pub flags: PageTableFlags,
    /// Where it was made.
    pub caller: Option<&'static Location<'static>>,
}

impl BlockArea {
    /// The area as listings show areas: a `vmalloc` area with its guard page, no
    /// label, no caller.
    pub(super) fn info(&self) -> AreaInfo {
        AreaInfo {
            start: self.start,
            span: (self.pages + 1) * PAGE_SIZE,
            size: self.pages * PAGE_SIZE,
            pages: self.pages,
            huge_mappings: 0,
            kind: AreaKind::Vmalloc,
            phys: None,
            lead: 0,
            tag: "",
            caller: self.caller,
        }
    }
}

// SAFETY: a `Block` is a lock and plain data; `table` points into a page table only
// this block's lock holders write, reachable from every CPU (`PhysMemory`).
unsafe impl Send for Block {}
// SAFETY: as above.
unsafe impl Sync for Block {}

impl<F, M, T> Vmalloc<F, M, T>
where
    F: FrameSource + Clone,
    M: PhysMemory + Copy,
    T: TlbFlush,
{
    /// The calling CPU's index (0 when the flush policy knows no CPUs).
    fn cpu(&self) -> usize {
        self.tlb.cpus().map_or(0, |cpus| cpus.current())
    }

    /// Makes `pages` pages (at most [`MAX_BLOCK_PAGES`]) from the calling CPU's block;
    /// `None` leaves the request to the locked path, with nothing changed.
    pub(super) fn alloc_in_block(
        &self,
        pages: u64,
        flags: PageTableFlags,
        zero: bool,
        caller: &'static Location<'static>,
    ) -> Option<NonNull<u8>> {
        let blocks = &self.blocks;
        if blocks.count == 0 || pages > MAX_BLOCK_PAGES {
            return None;
        }
        // The whole call, frame allocator calls included, with interrupts held off;
        // the calling CPU stays the one it picks.
        let _irq = IrqOff::new(&self.tlb);
        let cpu = self.cpu();
        let cache = self.cpu_cache(cpu)?;
        let mut state = cache.state.try_lock(&self.tlb)?;
        let n = pages as usize;
        if !self.stock_frames(cache, &mut state, n) {
            return None;
        }
        // The frames leave the cache first: carving may flush the lazy list, which
        // puts other frames into it.
        let mut frames = [NO_FRAME; MAX_BLOCK_PAGES as usize];
        state.cached -= n;
        frames[..n].copy_from_slice(&state.frames[state.cached..state.cached + n]);
        let frames = &frames[..n];
        if zero {
            for frame in frames {
                let ptr = self.phys.phys_to_virt(frame.start_address());
                // SAFETY: a cached frame is free and ours, and `PhysMemory` makes the
                // whole frame writable through `ptr`.
                unsafe { core::ptr::write_bytes(ptr, 0, PAGE_SIZE as usize) };
            }
        }
        let Some(start) = self.carve(cpu, cache, &mut state, (n, zero, caller), flags, frames)
        else {
            self.cache_frames(&mut state, frames);
            cache.cached.store(state.cached as u64, Ordering::Relaxed);
            return None;
        };
        cache.cached.store(state.cached as u64, Ordering::Relaxed);
        add(&cache.data, n as i64);
        add(&cache.areas, 1);
        add(&cache.live_pages, n as i64 + 1);
        // SAFETY: the zone lies in the region, which never holds address 0.
        Some(unsafe { NonNull::new_unchecked(start as *mut u8) })
    }

    /// Makes sure the cache holds `n` frames: from the allocator, or from its own
    /// lazy list after flushing it.
    fn stock_frames(&self, cache: &CpuCache, state: &mut CpuState, n: usize) -> bool {
        if state.cached < n {
            let have = state.cached;
            let want = REFILL.max(n).min(CACHED_FRAMES - have);
            state.cached += self
                .frames
                .alloc_frames(&mut state.frames[have..have + want]);
            cache.cached.store(state.cached as u64, Ordering::Relaxed);
        }
        if state.cached < n {
            self.flush_lazy(cache, state);
        }
        state.cached >= n
    }

    /// Maps `state.frames[frames]` at `n` fresh pages of the CPU's block, taking a new
    /// block if it has no room; the area's start.
    fn carve(
        &self,
        cpu: usize,
        cache: &CpuCache,
        state: &mut CpuState,
        (n, zero, caller): (usize, bool, &'static Location<'static>),
        flags: PageTableFlags,
        frames: &[PhysFrame],
    ) -> Option<u64> {
        for _ in 0..3 {
            let index = match state.block {
                Some(index) => index,
                None => {
                    let index = self.take_block(cpu)?;
                    state.block = Some(index);
                    index
                }
            };
            let block = self.blocks.block(index);
            let mut locked = self.lock_block(block);
            if let Some(first) = locked.carve(n + 1) {
                let bits = (flags | PageTableFlags::PRESENT).bits();
                for (i, frame) in frames.iter().enumerate() {
                    // SAFETY: the page is fresh in a block this CPU carves under its
                    // lock; the entry lies in the block's own leaf table.
                    unsafe { entry(block, first + i).write(frame.start_address().as_u64() | bits) };
                }
                locked.len[first] = n as u8 | if zero { ZEROED } else { 0 };
                locked.callers[first / 2] = Some(caller);
                locked.live += n + 1;
                return Some(block.base + first as u64 * PAGE_SIZE);
            }
            drop(locked);
            if state.lazy_len > 0 {
                // Flushing our own freed areas may empty the block.
                self.flush_lazy(cache, state);
                continue;
            }
            self.release_block(index);
            state.block = None;
        }
        None
    }

    /// Block `index` is no longer its CPU's.
    fn release_block(&self, index: usize) {
        let mut state = self.lock_block(self.blocks.block(index));
        state.owner = None;
        self.blocks.mark(index, &state);
    }

    /// A block for `cpu`: one nobody owns with room in it, or a new one.
    fn take_block(&self, cpu: usize) -> Option<usize> {
        let blocks = &self.blocks;
        for (word, marks) in blocks.takeable.iter().enumerate() {
            let mut bits = marks.load(Ordering::Relaxed);
            while bits != 0 {
                let index = word * 64 + bits.trailing_zeros() as usize;
                bits &= bits - 1;
                let Some(mut state) = blocks.block(index).state.try_lock(&self.tlb) else {
                    continue;
                };
                if state.worth_taking() {
                    state.owner = Some(cpu);
                    blocks.mark(index, &state);
                    return Some(index);
                }
                blocks.mark(index, &state);
            }
        }
        let unused = blocks.activated.load(Ordering::Acquire);
        if unused >= blocks.count {
            return None;
        }
        self.lock().activate_block(unused, cpu).ok()?;
        Some(unused)
    }

    /// The calling CPU's cache, made on first use.
    fn cpu_cache(&self, cpu: usize) -> Option<&CpuCache> {
        if let Some(cache) = self.blocks.cache(cpu) {
            return Some(cache);
        }
        let slot = self.blocks.caches.get(cpu)?;
        let cache = CpuCache {
            state: IrqLock::new(CpuState {
                block: None,
                frames: [NO_FRAME; CACHED_FRAMES],
                cached: 0,
                lazy: [Lazy {
                    block: 0,
                    first: 0,
                    pages: 0,
                }; LAZY_RANGES],
                lazy_len: 0,
                lazy_frames: [NO_FRAME; LAZY_FRAMES],
                lazy_frame_count: 0,
            }),
            cached: AtomicU64::new(0),
            pending: AtomicU64::new(0),
            data: AtomicI64::new(0),
            areas: AtomicI64::new(0),
            live_pages: AtomicI64::new(0),
            frame: NO_FRAME,
        };
        let placed = self.place(cache, |cache, frame| cache.frame = frame).ok()?;
        match slot.compare_exchange(
            core::ptr::null_mut(),
            placed,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => {}
            // An interrupt handler on this CPU made it first: ours was never seen.
            Err(_) => {
                // SAFETY: `placed` was placed by us and published nowhere.
                let frame = unsafe { (*placed).frame };
                self.unplace(frame);
            }
        }
        self.blocks.cache(cpu)
    }

    /// Moves `value` into a frame of its own; `set_frame` records the frame in it.
    fn place<V>(
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
    fn unplace(&self, frame: PhysFrame) {
        let mut gather = self.gather();
        gather.free(frame);
        gather.finish();
        self.blocks.bookkeeping.fetch_sub(1, Ordering::Relaxed);
    }

    /// `block`'s lock, serving flush requests while it waits.
    fn lock_block<'b>(&'b self, block: &'b Block) -> IrqGuard<'b, BlockState> {
        block.state.lock(&self.tlb)
    }

    /// Frees the area at `addr` in the zone. Its entries are cleared now; its range and
    /// frames wait on the calling CPU's lazy list, or are flushed at once when that
    /// list cannot be had (`eager`, or its lock held further up this CPU's stack).
    pub(super) fn free_in_block(&self, addr: u64, eager: bool) -> Result<(), Error> {
        let (index, block) = self.blocks.block_at(addr).ok_or(Error::NotAllocated)?;
        let _irq = IrqOff::new(&self.tlb);
        let mut frames = [NO_FRAME; MAX_BLOCK_PAGES as usize];
        let (page, pages) = {
            let mut state = self.lock_block(block);
            let (page, pages) = state.area_at(block, addr)?;
            for (i, frame) in frames[..pages].iter_mut().enumerate() {
                // SAFETY: the entry lies in the block's leaf table, which only this
                // lock's holders write; the area is live, so the entry maps its frame.
                let raw = unsafe { entry(block, page + i).replace(0) };
                *frame = PhysFrame::containing_address(PhysAddr::new(raw & ADDR_MASK));
            }
            state.len[page] = pages as u8 | FREED;
            state.live -= pages + 1;
            state.dirty += pages + 1;
            (page, pages)
        };
        let lazy = Lazy {
            block: index as u16,
            first: page as u16,
            pages: pages as u8,
        };
        let cache = (!eager).then(|| self.cpu_cache(self.cpu())).flatten();
        match cache.and_then(|cache| Some((cache, cache.state.try_lock(&self.tlb)?))) {
            Some((cache, mut state)) => {
                if state.lazy_len == LAZY_RANGES || state.lazy_frame_count + pages > LAZY_FRAMES {
                    self.flush_lazy(cache, &mut state);
                }
                let len = state.lazy_len;
                state.lazy[len] = lazy;
                state.lazy_len += 1;
                let count = state.lazy_frame_count;
                state.lazy_frames[count..count + pages].copy_from_slice(&frames[..pages]);
                state.lazy_frame_count += pages;
                cache
                    .pending
                    .store(state.lazy_frame_count as u64, Ordering::Relaxed);
                add(&cache.data, -(pages as i64));
                add(&cache.areas, -1);
                add(&cache.live_pages, -(pages as i64 + 1));
            }
            None => {
                let mut gather = self.gather();
                gather.stale(RangeFlush::from_range(self.range_of(lazy)));
                gather.flush();
                let mut state = self.lock_block(block);
                state.clean(page, pages + 1);
                self.blocks.mark(index, &state);
                drop(state);
                frames[..pages].iter().for_each(|&frame| gather.free(frame));
                gather.finish();
                self.blocks.data.fetch_sub(pages as i64, Ordering::Relaxed);
                self.blocks.areas.fetch_sub(1, Ordering::Relaxed);
                self.blocks
                    .live_pages
                    .fetch_sub(pages as i64 + 1, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// The mapped pages of a freed area.
    fn range_of(&self, lazy: Lazy) -> PageRange {
        let start = self.blocks.zone
            + u64::from(lazy.block) * BLOCK_BYTES
            + u64::from(lazy.first) * PAGE_SIZE;
        let first = Page::containing_address(VirtAddr::new(start));
        Page::range(first, first + u64::from(lazy.pages))
    }

    /// One batched flush for the CPU's lazy list; then its frames join the cache (the
    /// rest go back to the allocator) and its pages count as clean.
    fn flush_lazy(&self, cache: &CpuCache, state: &mut CpuState) {
        if state.lazy_len == 0 {
            return;
        }
        let lazy = &state.lazy[..state.lazy_len];
        // One batched flush for them all: past the ceiling, which a full list of
        // small areas usually is, one full flush.
        let mut gather = self.gather();
        lazy.iter()
            .for_each(|entry| gather.stale(RangeFlush::from_range(self.range_of(*entry))));
        gather.flush();
        // Then their pages are clean; one lock per run of entries in one block.
        let mut held: Option<(usize, IrqGuard<'_, BlockState>)> = None;
        for entry in lazy {
            let index = usize::from(entry.block);
            let block = match &mut held {
                Some((at, block)) if *at == index => block,
                _ => {
                    if let Some((at, block)) = held.take() {
                        self.blocks.mark(at, &block);
                    }
                    let block = self.lock_block(self.blocks.block(index));
                    &mut held.insert((index, block)).1
                }
            };
            block.clean(usize::from(entry.first), usize::from(entry.pages) + 1);
        }
        if let Some((at, block)) = held {
            self.blocks.mark(at, &block);
        }
        let count = state.lazy_frame_count;
        let pending = state.lazy_frames;
        // Flushed above: the frames go back to this CPU's cache.
        gather.finish_into(|_| self.cache_frames(state, &pending[..count]));
        state.lazy_len = 0;
        state.lazy_frame_count = 0;
        cache.cached.store(state.cached as u64, Ordering::Relaxed);
        cache.pending.store(0, Ordering::Relaxed);
    }

    /// Puts flushed `frames` into the CPU's cache; those it has no room for go back
    /// to the allocator.
    fn cache_frames(&self, state: &mut CpuState, frames: &[PhysFrame]) {
        let room = (CACHED_FRAMES - state.cached).min(frames.len());
        let (kept, rest) = frames.split_at(room);
        state.frames[state.cached..state.cached + room].copy_from_slice(kept);
        state.cached += room;
        if !rest.is_empty() {
            // Flushed frames of ours: nothing stale to wait for.
            let mut gather = self.gather();
            rest.iter().for_each(|&frame| gather.free(frame));
            gather.finish();
        }
    }

    /// Empties every CPU's cache, other CPUs' too: flushes its lazy list, gives its
    /// frames back to the allocator and hands its block back (see [per-CPU
    /// blocks](super::percpu)). Returns whether anything came back. The calling
    /// CPU's cache is skipped if its lock is held: further up this CPU's stack, or,
    /// when the flush policy names no CPUs and all share one cache, by another CPU.
    pub fn drain_cpu_caches(&self) -> bool {
        self.settle();
        let mut released = false;
        self.each_cache(|cache, state| {
            released |= state.lazy_len > 0 || state.cached > 0 || state.block.is_some();
            self.flush_lazy(cache, state);
            if state.cached > 0 {
                // Flushed frames of ours: nothing stale to wait for.
                let mut gather = self.gather();
                let cached = &state.frames[..state.cached];
                cached.iter().for_each(|&frame| gather.free(frame));
                gather.finish();
                state.cached = 0;
                cache.cached.store(0, Ordering::Relaxed);
            }
            if let Some(index) = state.block.take() {
                self.release_block(index);
            }
        });
        released
    }

    /// Runs `op` on every CPU's cache under its lock; the calling CPU's only if its
    /// lock is free (held, it belongs to a caller further up this CPU's stack, or,
    /// when the flush policy names no CPUs and all share one cache, to another CPU).
    fn each_cache(&self, mut op: impl FnMut(&CpuCache, &mut CpuState)) {
        let me = self.cpu();
        for cpu in 0..MAX_CPUS {
            let Some(cache) = self.blocks.cache(cpu) else {
                continue;
            };
            let state = if cpu == me {
                cache.state.try_lock(&self.tlb)
            } else {
                Some(cache.state.lock(&self.tlb))
            };
            if let Some(mut state) = state {
                op(cache, &mut state);
            }
        }
    }

    /// The live area in the zone whose span (guard page included) holds `addr`, and
    /// whether `addr` is in its guard page.
    pub(super) fn block_area(&self, addr: u64) -> Option<(BlockArea, bool)> {
        let (_, block) = self.blocks.block_at(addr)?;
        let page = ((addr - block.base) / PAGE_SIZE) as usize;
        let state = self.lock_block(block);
        Some(area_in(block, &state, page))?
    }

    /// As [`block_area`](Self::block_area) without waiting, and finding freed areas
    /// that wait for their flush too: `Err` if the block's lock is held (a fault
    /// handler must not wait for it).
    pub(super) fn try_block_area(&self, addr: u64) -> Result<Option<(BlockArea, BlockSite)>, ()> {
        let Some((_, block)) = self.blocks.block_at(addr) else {
            return Ok(None);
        };
        let page = ((addr - block.base) / PAGE_SIZE) as usize;
        let state = block.state.try_lock(&self.tlb).ok_or(())?;
        if let Some((area, guard)) = area_in(block, &state, page) {
            let site = if guard {
                BlockSite::Guard
            } else {
                BlockSite::Live
            };
            return Ok(Some((area, site)));
        }
        Ok(state.freed_over(page).map(|(first, pages)| {
            let area = BlockArea {
                start: VirtAddr::new(block.base + first as u64 * PAGE_SIZE),
                pages: pages as u64,
                flags: PageTableFlags::empty(),
                caller: state.callers[first / 2],
            };
            (area, BlockSite::Freed)
        }))
    }

    /// The frame behind `addr`, a page of a live area in the zone.
    pub(super) fn block_frame(&self, addr: u64) -> Result<PhysFrame, Error> {
        let (_, block) = self.blocks.block_at(addr).ok_or(Error::NotMapped)?;
        let page = ((addr - block.base) / PAGE_SIZE) as usize;
        let state = self.lock_block(block);
        match state.area_over(page) {
            Some((first, pages)) if page < first + pages => {
                // SAFETY: the entry lies in the block's table; its lock is held.
                let raw = unsafe { entry(block, page).read() };
                Ok(PhysFrame::containing_address(PhysAddr::new(
                    raw & ADDR_MASK,
                )))
            }
            _ => Err(Error::NotMapped),
        }
    }

    /// Gives the live area starting at `addr` in the zone the leaf flags `flags`, and
    /// flushes its old translations.
    pub(super) fn protect_in_block(&self, addr: u64, flags: PageTableFlags) -> Result<(), Error> {
        let (_, block) = self.blocks.block_at(addr).ok_or(Error::NotAllocated)?;
        let state = self.lock_block(block);
        let (page, pages) = state.area_at(block, addr)?;
        let bits = (flags | PageTableFlags::PRESENT).bits();
        for i in page..page + pages {
            let entry = entry(block, i);
            // SAFETY: the block's table, under its lock; the area is live.
            unsafe { entry.write(entry.read() & ADDR_MASK | bits) };
        }
        drop(state);
        let first = Page::containing_address(VirtAddr::new(addr));
        let mut gather = self.gather();
        gather.stale(RangeFlush::from_range(Page::range(
            first,
            first + pages as u64,
        )));
        gather.finish();
        Ok(())
    }

    /// `vrealloc` of the live area at `addr` in the zone. A shrink stays in place: the
    /// dropped pages are unmapped and flushed before it returns, as a tree area's
    /// are. A growth makes a new area with the same rights (zeroed if the old one
    /// was), copies the contents, and frees the old area with its flush done before
    /// it returns, as a tree area's move does.
    pub(super) fn realloc_from_block(
        &self,
        addr: u64,
        new_size: usize,
    ) -> Result<NonNull<u8>, Error> {
        let (index, block) = self.blocks.block_at(addr).ok_or(Error::NotAllocated)?;
        let new_pages = (new_size as u64).div_ceil(PAGE_SIZE);
        let (pages, zeroed, flags) = {
            let state = self.lock_block(block);
            let (first, pages) = state.area_at(block, addr)?;
            // SAFETY: the block's table, under its lock.
            let raw = unsafe { entry(block, first).read() };
            let flags = PageTableFlags::from_bits_truncate(raw & !ADDR_MASK);
            (pages as u64, state.len[first] & ZEROED != 0, flags)
        };
        if new_pages <= pages {
            self.shrink_in_block(index, addr, new_pages as usize)?;
            if zeroed {
                // What the shrink drops reads as zero if the area grows back.
                self.zero_block_bytes(addr, new_size as u64, new_pages * PAGE_SIZE)?;
            }
            // SAFETY: the zone lies in the region, which never holds address 0.
            return Ok(unsafe { NonNull::new_unchecked(addr as *mut u8) });
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
        let new = self.vmalloc_with(new_size, &options)?;
        let copied = self.copy_area(addr, new.as_ptr() as u64, pages * PAGE_SIZE);
        let freed = copied.and_then(|()| self.free_in_block(addr, true));
        if let Err(error) = freed {
            // The old area changed under us (freed by someone else): keep nothing.
            // SAFETY: `new` was made above and handed to nobody.
            let _ = unsafe { self.vfree(new.as_ptr()) };
            return Err(error);
        }
        Ok(new)
    }

    /// Shrinks the live area at `addr` in block `index` to `new_pages` pages in place:
    /// the dropped pages' entries are cleared, flushed at once, and their frames and
    /// pages freed; the first dropped page becomes the guard.
    fn shrink_in_block(&self, index: usize, addr: u64, new_pages: usize) -> Result<(), Error> {
        let block = self.blocks.block(index);
        let _irq = IrqOff::new(&self.tlb);
        let mut frames = [NO_FRAME; MAX_BLOCK_PAGES as usize];
        let (first, dropped) = {
            let mut state = self.lock_block(block);
            let (first, pages) = state.area_at(block, addr)?;
            let dropped = pages.saturating_sub(new_pages);
            for (i, frame) in frames[..dropped].iter_mut().enumerate() {
                // SAFETY: the entry lies in the block's leaf table, under its lock;
                // the area is live, so the entry maps its frame.
                let raw = unsafe { entry(block, first + new_pages + i).replace(0) };
                *frame = PhysFrame::containing_address(PhysAddr::new(raw & ADDR_MASK));
            }
            state.len[first] = new_pages as u8 | state.len[first] & ZEROED;
            state.live -= dropped;
            state.dirty += dropped;
            (first, dropped)
        };
        if dropped == 0 {
            return Ok(());
        }
        let cut = Page::containing_address(VirtAddr::new(addr)) + new_pages as u64;
        let mut gather = self.gather();
        gather.stale(RangeFlush::from_range(Page::range(
            cut,
            cut + dropped as u64,
        )));
        gather.flush();
        let mut state = self.lock_block(block);
        // The pages past the new guard page are free again.
        state.set_free(first + new_pages + 1, dropped, true);
        state.dirty -= dropped;
        self.blocks.mark(index, &state);
        drop(state);
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

    /// Zeroes bytes `[from, to)` of the live area at `addr` in the zone, through
    /// `PhysMemory`.
    fn zero_block_bytes(&self, addr: u64, from: u64, to: u64) -> Result<(), Error> {
        let mut offset = from;
        while offset < to {
            let in_page = offset % PAGE_SIZE;
            let len = (PAGE_SIZE - in_page).min(to - offset);
            let frame = self.block_frame(addr + offset)?;
            let ptr = self.phys.phys_to_virt(frame.start_address() + in_page);
            // SAFETY: a frame of a live area of the caller's, reachable through
            // `PhysMemory`; the range stays within it.
            unsafe { core::ptr::write_bytes(ptr, 0, len as usize) };
            offset += len;
        }
        Ok(())
    }

    /// Copies `bytes` from the area at `from` (in the zone) to the area at `to`,
    /// frame by frame through `PhysMemory`.
    fn copy_area(&self, from: u64, to: u64, bytes: u64) -> Result<(), Error> {
        for offset in (0..bytes).step_by(PAGE_SIZE as usize) {
            let len = (bytes - offset).min(PAGE_SIZE) as usize;
            let source = self.block_frame(from + offset)?;
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
    /// `out`, in address order; returns how many, and where to go on if `out` filled up.
    pub(super) fn copy_block_areas(&self, from: u64, out: &mut [AreaInfo]) -> (usize, Option<u64>) {
        let mut count = 0;
        let blocks = &self.blocks;
        let first = (from.saturating_sub(blocks.zone) / BLOCK_BYTES) as usize;
        for block in blocks.published().skip(first) {
            let state = self.lock_block(block);
            for page in 0..BLOCK_PAGES {
                let start = block.base + page as u64 * PAGE_SIZE;
                // `from` may be one past the zone's start: its line was listed.
                if start < from & !(PAGE_SIZE - 1) || state.pages_at(page) == 0 {
                    continue;
                }
                if count == out.len() {
                    return (count, Some(start));
                }
                if let Some((area, _)) = area_in(block, &state, page) {
                    out[count] = area.info();
                    count += 1;
                }
            }
        }
        (count, None)
    }

    /// Unmaps the areas still live in the zone, flushes, and hands their frames to
    /// `reclaim`: the manager's teardown, after the caches were drained.
    pub(super) fn unmap_all_blocks(&self, gather: &mut Gather<'_, F>) {
        // First every entry stops being present, keeping its frame; one flush; then
        // the frames are taken.
        let mut any = false;
        self.each_live_page(|entry| {
            // SAFETY: the block's table, under its lock; the area is live.
            unsafe { entry.write(entry.read() & !PageTableFlags::PRESENT.bits()) };
            any = true;
        });
        if !any {
            return;
        }
        let zone = Page::containing_address(VirtAddr::new(self.blocks.zone));
        let blocks = self.blocks.count as u64 * BLOCK_PAGES as u64;
        gather.stale(RangeFlush::from_range(Page::range(zone, zone + blocks)));
        gather.flush();
        self.each_live_page(|entry| {
            // SAFETY: as above.
            let raw = unsafe { entry.replace(0) };
            gather.free(PhysFrame::containing_address(PhysAddr::new(
                raw & ADDR_MASK,
            )));
        });
        for block in self.blocks.published() {
            self.lock_block(block).len = [0; BLOCK_PAGES];
        }
    }

    /// Runs `op` on the entry of every page of every live area in the zone, each
    /// block under its lock.
    fn each_live_page(&self, mut op: impl FnMut(*mut u64)) {
        for block in self.blocks.published() {
            let state = self.lock_block(block);
            for first in 0..BLOCK_PAGES {
                (first..first + state.pages_at(first)).for_each(|page| op(entry(block, page)));
            }
        }
    }

    /// Gives back the frames of every block descriptor and CPU cache.
    pub(super) fn release_block_bookkeeping(&self) {
        for slot in &self.blocks.blocks {
            let block = slot.swap(core::ptr::null_mut(), Ordering::AcqRel);
            // SAFETY: descriptors stay valid until here; nothing else holds one.
            if let Some(block) = unsafe { block.as_ref() } {
                self.unplace(block.frame);
            }
        }
        for slot in &self.blocks.caches {
            let cache = slot.swap(core::ptr::null_mut(), Ordering::AcqRel);
            // SAFETY: as above.
            if let Some(cache) = unsafe { cache.as_ref() } {
                self.unplace(cache.frame);
            }
        }
    }
}

/// Entry `page` of `block`'s leaf table.
#[inline]
fn entry(block: &Block, page: usize) -> *mut u64 {
    debug_assert!(page < BLOCK_PAGES);
    block.table.cast::<u64>().wrapping_add(page)
}

/// The live area over `page` of a locked block, and whether `page` is its guard.
fn area_in(block: &Block, state: &BlockState, page: usize) -> Option<(BlockArea, bool)> {
    let (first, pages) = state.area_over(page)?;
    // SAFETY: the block's table, under its lock.
    let raw = unsafe { entry(block, first).read() };
    let area = BlockArea {
        start: VirtAddr::new(block.base + first as u64 * PAGE_SIZE),
        pages: pages as u64,
        flags: PageTableFlags::from_bits_truncate(raw & !ADDR_MASK),
        caller: state.callers[first / 2],
    };
    Some((area, page == first + pages))
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
    fn activate_block(&mut self, index: usize, cpu: usize) -> Result<&'v Block, Error> {
        let vm = self.vm;
        let slot = &vm.blocks.blocks[index];
        if vm.blocks.activated.load(Ordering::Acquire) != index {
            return Err(Error::AlreadyMapped);
        }
        let base = vm.blocks.zone + index as u64 * BLOCK_BYTES;
        let descriptor = Block {
            state: IrqLock::new(BlockState::new(cpu)),
            base,
            table: core::ptr::null_mut(),
            frame: NO_FRAME,
        };
        let block = vm.place(descriptor, |block, frame| block.frame = frame)?;
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

/// Adds `delta` to a counter only its cache's lock holder writes.
#[inline]
fn add(counter: &AtomicI64, delta: i64) {
    counter.store(counter.load(Ordering::Relaxed) + delta, Ordering::Relaxed);
}

/// Whether the result of a locked call asks for the caches to be drained.
pub(super) fn ran_out<R>(result: &Result<R, Error>) -> bool {
    matches!(result, Err(Error::OutOfFrames | Error::OutOfVirtualSpace))
}
