//! Per-CPU blocks: small areas made and freed without a shared lock.
//!
//! With [`VmallocConfig::cpu_caches`](super::VmallocConfig::cpu_caches) on, a
//! `vmalloc` of up to [`MAX_BLOCK_PAGES`] pages with plain options (page alignment,
//! a guard page, no 2 MiB pages, no label, not executable) is served from per-CPU
//! state, after Linux's vmap blocks (`vm_map_ram`) and per-CPU frame caches:
//!
//! - **The zone.** [`Vmalloc::new`](super::Vmalloc::new) reserves one range of the
//!   region, at most 1/64 of it and at most `MAX_BLOCKS` (512) blocks of 2 MiB, listed
//!   as one reserved area labelled `vmap_blocks`. Each block is one leaf page table's
//!   worth: the block makes its table when first used and keeps it until the manager
//!   is dropped, so mapping a page is one entry store, and no purge can free a table
//!   under it.
//! - **The CPU's cache** is its `PerCpu` slot, touched with
//!   interrupts held off and no locked instruction: the block it carves from, up to
//!   `CACHED_FRAMES` (176) free frames taken from the frame allocator `REFILL` (32) at
//!   a time, and its lazy list of freed areas (in a frame of its own).
//! - **Carving.** A CPU owns one block at a time and carves areas from its bitmap of
//!   free pages, first fit from where it last carved: `pages + 1` pages each, the last
//!   one the unmapped guard. The bitmap is the owner's alone (see `block.rs`). When its
//!   block has no room it flushes its own lazy list (which may free some) or hands the
//!   block back and takes another: one nobody owns with at least a quarter free (a
//!   bitmask finds them), else a new one.
//! - **Frees.** `vfree` from any CPU claims the area (a compare-and-swap on its first
//!   page's length, so a second free fails), clears its entries and puts the range and
//!   its frames on the *freeing* CPU's lazy list. When half the list has collected,
//!   one batched flush for it starts (through the manager's gather,
//!   `TlbFlush::start_flush`) without waiting for other CPUs; when the next half is
//!   due, the first one's flush is finished (`finish_flush`), and then its frames
//!   join the CPU's cache and its pages are free again: directly in a block the CPU
//!   owns, through the block's lock-free list of returned areas otherwise. Until
//!   then neither the frames nor the range can be handed out again. A full list, or
//!   a call that needs its frames now, flushes it all and waits.
//!
//! # Which calls take it
//!
//! The choice between a block area and an area of the tree is made once, by
//! `Blocks::locate`: the public calls match on what it found.
//!
//! # Running out
//!
//! A call that runs out of frames empties every CPU's cache
//! ([`Vmalloc::drain_cpu_caches`](super::Vmalloc::drain_cpu_caches)) and tries
//! once more: each online CPU hands its cache over from work it runs in its shootdown
//! service, an offline CPU's is claimed, and the caller flushes their lazy lists,
//! gives their frames back to the allocator and hands their blocks back (Linux's
//! `drain_all_pages`). A cache that cannot be reached now (no flush policy that runs
//! work on other CPUs, or its owner inside a call of its own) empties itself at its
//! owner's next call. A small area that finds no block to take and the tree's
//! space full does the same, then tries the blocks again: a block other CPUs held (an
//! offline CPU's, one whose areas were freed) may have room. That last try takes any
//! block nobody owns with room for the area, where a block is otherwise taken only
//! with a quarter of it free (so that CPUs do not trade nearly full blocks). The zone
//! itself stays reserved while the manager lives. When the frames ran out first, the
//! call fails with [`Error::OutOfFrames`](crate::Error::OutOfFrames), not for the
//! tree's space.
//!
//! # What callers see
//!
//! Areas in blocks behave as other `vmalloc` areas for `vfree`, `vfree_atomic`,
//! `vrealloc` (which shrinks them in place and copies them to grow), `set_prot`,
//! `vmalloc_to_frame`, `find_vm_area`, fault diagnosis (a freed one is a use after
//! free until its range is free in its block again, as a tree area is until the
//! purge) and listings, which show the zone as
//! one line followed by the areas in it. [`VmallocStats`](super::VmallocStats) counts
//! them in `block_areas` and `data_frames`, the frames of their frees waiting for a
//! flush in `pending_purge_pages` and `pending_purge_frames` (their ranges are the
//! block's, in `block_free_bytes`, not in `pending_purge_bytes`), and says what the
//! caches hold. Other calls on them (`vunmap`,
//! `iounmap`, `populate`) refuse them with [`Error::WrongKind`](crate::Error). Every
//! call keeps the promises it keeps on other areas: `eager` frees flush at once, and
//! a shrinking `vrealloc` returns after every CPU dropped the pages it took away.
//!
//! The caches need the kernel's CPUs ([`TlbFlush::cpus`](crate::TlbFlush::cpus)):
//! with a flush policy that names none, every small area takes the locked path.

mod block;
mod cache;
mod calls;

use block::Block;
use cache::{CacheCounters, StatePage};

use super::area::{AreaInfo, AreaKind};
use crate::PAGE_SIZE;
use crate::percpu::PerCpu;
use core::panic::Location;
use core::sync::atomic::{AtomicI64, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use x86_64::VirtAddr;
use x86_64::structures::paging::PageTableFlags;

/// Pages in a block: one leaf table's worth (2 MiB).
pub(super) const BLOCK_PAGES: usize = 512;
/// Bytes in a block.
pub(super) const BLOCK_BYTES: u64 = BLOCK_PAGES as u64 * PAGE_SIZE;
/// Largest area, in pages (its guard page not counted), served from a block.
pub const MAX_BLOCK_PAGES: u64 = 16;
/// Most blocks a zone holds (1 GiB).
pub(super) const MAX_BLOCKS: usize = 512;
/// Free pages from which a block nobody owns is worth taking.
const TAKE_FROM: usize = BLOCK_PAGES / 4;

const _: () = assert!(
    MAX_BLOCKS <= u16::MAX as usize,
    "lazy entries name blocks with 16 bits"
);
const _: () = assert!(BLOCK_PAGES <= u16::MAX as usize, "and pages with 16 bits");
const _: () = assert!(
    MAX_BLOCKS.is_multiple_of(64),
    "the takeable mask is whole words"
);

/// What the manager keeps for its per-CPU blocks.
pub(super) struct Blocks {
    /// First address of the zone; 0 when the caches are off.
    zone: u64,
    /// Blocks in the zone.
    count: usize,
    blocks: [AtomicPtr<Block>; MAX_BLOCKS],
    /// Blocks made so far: `blocks[..activated]` are published, in order.
    activated: AtomicUsize,
    /// Bit `i` set: block `i` may be worth taking (a hint; taking it decides).
    takeable: [AtomicU64; MAX_BLOCKS / 64],
    /// Each CPU's cache.
    cpus: PerCpu<CacheCounters, Option<StatePage>>,
    /// Counters of frees that went through no CPU's cache.
    data: AtomicI64,
    areas: AtomicI64,
    live_pages: AtomicI64,
    /// Frames holding descriptors and caches.
    bookkeeping: AtomicU64,
}

/// An address in the zone, as [`Blocks::locate`] found it.
#[derive(Clone, Copy)]
pub(super) struct InZone<'a> {
    addr: u64,
    /// The block holding it, if it was ever made.
    block: Option<(usize, &'a Block)>,
}

/// Where an address of the region is managed.
pub(super) enum Located<'a> {
    /// In the per-CPU blocks' zone.
    Zone(InZone<'a>),
    /// Anywhere else: the area tree's.
    Tree,
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
            cpus: PerCpu::new(),
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

    /// Where `addr` is managed: the one place the choice between a block area and an
    /// area of the tree is made.
    #[inline]
    pub(super) fn locate(&self, addr: u64) -> Located<'_> {
        if addr.wrapping_sub(self.zone) >= self.zone_bytes() {
            return Located::Tree;
        }
        let index = ((addr - self.zone) / BLOCK_BYTES) as usize;
        let block = self.blocks.get(index).and_then(|slot| {
            // SAFETY: published descriptors stay valid until the manager is dropped.
            unsafe { slot.load(Ordering::Acquire).as_ref() }.map(|block| (index, block))
        });
        Located::Zone(InZone { addr, block })
    }

    #[inline]
    fn block(&self, index: usize) -> &Block {
        let block = self.blocks[index].load(Ordering::Acquire);
        // SAFETY: as in `locate`; callers pass indices of published blocks.
        unsafe { &*block }
    }

    /// Every block made so far, in address order.
    fn published(&self) -> impl Iterator<Item = (usize, &Block)> {
        (0..self.published_count()).map(|index| (index, self.block(index)))
    }

    /// How many blocks are made so far.
    fn published_count(&self) -> usize {
        self.activated.load(Ordering::Acquire).min(self.count)
    }

    /// Marks block `index` as maybe worth taking.
    fn mark_takeable(&self, index: usize) {
        self.takeable[index / 64].fetch_or(1 << (index % 64), Ordering::Relaxed);
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
        for (_, cache) in self.cpus.each() {
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

/// An area in a block, as lookups see it.
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
    /// label.
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

/// Whether the result of a locked call asks for the caches to be drained: only
/// running out of frames, which the caches may hold. The tree's virtual space is
/// never in them (the zone stays the blocks'), so a request no free range can meet
/// (an alignment too large, say) is not retried at the cost of a shootdown per CPU.
pub(super) fn ran_out<R>(result: &Result<R, crate::Error>) -> bool {
    matches!(result, Err(crate::Error::OutOfFrames))
}
