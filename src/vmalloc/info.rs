//! What the manager shows of itself: the area listing (`/proc/vmallocinfo`) and the
//! counters (`/proc/meminfo`).
//!
//! Listings are read in batches: each batch is copied under the lock, and the lock is
//! released before the caller sees it, as Linux's `seq_file` iteration does. The
//! caller's code (a `Display` sink growing a `String` through the kernel heap, which
//! grows through this manager) thus never runs with the lock held.

use super::area::{AreaInfo, AreaKind};
use super::blocks::Located;
use super::manager::Vmalloc;
use crate::{FrameSource, PhysMemory, TlbFlush};
use core::fmt;
use x86_64::VirtAddr;

/// Areas copied per batch of a listing.
const BATCH: usize = 16;

impl<F, M, T> Vmalloc<F, M, T>
where
    F: FrameSource + Clone,
    M: PhysMemory + Copy,
    T: TlbFlush,
{
    /// Counters of the region, the frames held, and the purge list.
    pub fn stats(&self) -> VmallocStats {
        // Locked first: taking the lock frees what `vfree_atomic` queued.
        let mut cx = self.lock();
        let blocks = self.blocks.counters();
        let size = self.config.size;
        let inner = cx.inner();
        // The zone is one record of the tree; its areas are counted by the blocks.
        let zone_record = u64::from(blocks.zone_bytes > 0);
        VmallocStats {
            region_total: size,
            used: size - inner.space.free_total() - inner.purge.bytes - blocks.free_bytes,
            pending_purge_bytes: inner.purge.bytes,
            largest_free: inner.space.largest_free(),
            // An area being unmapped is in no listing: not counted either.
            areas: inner.areas.len() as u64 - zone_record - inner.dying + blocks.areas,
            data_frames: inner.data_frames + blocks.data_frames,
            huge_mappings: inner.huge_mappings,
            page_table_frames: inner.page_table_frames,
            bookkeeping_frames: inner.pool.frames_held() as u64 + blocks.bookkeeping_frames,
            bookkeeping_free_slots: inner.pool.free_slots() as u64,
            pending_purge_pages: inner.purge.pages + blocks.pending_frames,
            pending_purge_frames: inner.purge.frames + blocks.pending_frames,
            purges: inner.purges,
            deferred_refused: inner.deferred_refused,
            block_zone_bytes: blocks.zone_bytes,
            block_free_bytes: blocks.free_bytes,
            block_areas: blocks.areas,
            cached_frames: blocks.cached_frames,
            cached_pending_frames: blocks.pending_frames,
        }
    }

    /// The live areas, in address order. The iterator takes the lock only while it
    /// copies the next batch, so the manager may be called between items; an area
    /// made or freed meanwhile is shown or not depending on where the listing is.
    pub fn areas(&self) -> Areas<'_, F, M, T> {
        Areas {
            vmalloc: self,
            batch: [EMPTY; BATCH],
            len: 0,
            pos: 0,
            next: Some(0),
        }
    }

    /// The live area whose span (its guard page included) holds `addr` (Linux's
    /// `find_vm_area`), or `None`.
    pub fn find_vm_area(&self, addr: VirtAddr) -> Option<AreaInfo> {
        if let Located::Zone(at) = self.blocks.locate(addr.as_u64()) {
            self.settle();
            return self.block_area(at).map(|(area, _)| area.info());
        }
        let mut cx = self.lock();
        let area = cx.inner().areas.find_containing(addr)?;
        (!area.data.dying).then(|| AreaInfo::new(area.start, area.size, &area.data))
    }

    /// Gives the live `vmalloc` area that starts at `ptr` and carries tag `from`
    /// the tag `to`, in one step under the lock; its usable bytes, or `None`
    /// (nothing changes) for any other pointer. Areas of the per-CPU blocks carry no
    /// tag.
    pub(super) fn retag_area(&self, ptr: *const u8, from: &str, to: &'static str) -> Option<u64> {
        let start = VirtAddr::try_new(ptr as u64).ok()?;
        if !matches!(self.blocks.locate(start.as_u64()), Located::Tree) {
            return None;
        }
        let mut cx = self.lock();
        let area = cx.inner().areas.find_containing(start)?;
        let record = area.data;
        if area.start != start || record.dying || record.kind != AreaKind::Vmalloc {
            return None;
        }
        if record.tag != from {
            return None;
        }
        cx.record_mut(start).tag = to;
        Some(record.size)
    }

    /// A `/proc/vmallocinfo`-style listing, one line per live area.
    pub fn info(&self) -> VmallocInfo<'_, F, M, T> {
        VmallocInfo { vmalloc: self }
    }

    /// Copies up to `out.len()` live areas starting at or after `from`; returns how
    /// many, and where the next batch starts (`None` after the last area). The
    /// per-CPU blocks' zone is listed as one area, followed by the areas in it.
    fn copy_areas(&self, from: u64, out: &mut [AreaInfo]) -> (usize, Option<u64>) {
        let zone = self.blocks.zone();
        let mut cx = self.lock();
        let areas = &cx.inner().areas;
        let mut next = Some(from);
        let mut count = 0;
        while count < out.len() {
            let Some(at) = next else {
                return (count, None);
            };
            if matches!(self.blocks.locate(at), Located::Zone(_)) && at > zone {
                // Inside the zone: the areas of its blocks, then what follows it.
                let (copied, rest) = self.copy_block_areas(at, &mut out[count..]);
                count += copied;
                next = rest.or(Some(zone + self.blocks.zone_bytes()));
                continue;
            }
            let Some(area) = areas.first_from(at) else {
                return (count, None);
            };
            next = area.start.as_u64().checked_add(1);
            if !area.data.dying {
                out[count] = AreaInfo::new(area.start, area.size, &area.data);
                count += 1;
            }
        }
        (count, next)
    }
}

const EMPTY: AreaInfo = AreaInfo {
    start: VirtAddr::zero(),
    span: 0,
    size: 0,
    pages: 0,
    huge_mappings: 0,
    kind: AreaKind::Vmalloc,
    phys: None,
    lead: 0,
    tag: "",
    caller: None,
};

/// Iterator over live areas; see [`Vmalloc::areas`].
pub struct Areas<'a, F: FrameSource + Clone, M: PhysMemory + Copy, T: TlbFlush> {
    vmalloc: &'a Vmalloc<F, M, T>,
    batch: [AreaInfo; BATCH],
    len: usize,
    pos: usize,
    /// Where the next batch starts; `None` once the last one is copied.
    next: Option<u64>,
}

impl<F: FrameSource + Clone, M: PhysMemory + Copy, T: TlbFlush> Iterator for Areas<'_, F, M, T> {
    type Item = AreaInfo;

    fn next(&mut self) -> Option<AreaInfo> {
        if self.pos == self.len {
            let from = self.next?;
            (self.len, self.next) = self.vmalloc.copy_areas(from, &mut self.batch);
            self.pos = 0;
            if self.len == 0 {
                return None;
            }
        }
        self.pos += 1;
        Some(self.batch[self.pos - 1])
    }
}

/// A `/proc/vmallocinfo`-style listing; see [`Vmalloc::info`].
pub struct VmallocInfo<'a, F: FrameSource + Clone, M: PhysMemory + Copy, T: TlbFlush> {
    vmalloc: &'a Vmalloc<F, M, T>,
}

impl<F: FrameSource + Clone, M: PhysMemory + Copy, T: TlbFlush> fmt::Display
    for VmallocInfo<'_, F, M, T>
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.vmalloc
            .areas()
            .try_for_each(|area| writeln!(f, "{area}"))
    }
}

/// Counters in the spirit of the `Vmalloc*` lines of `/proc/meminfo`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VmallocStats {
    /// Bytes in the managed region.
    pub region_total: u64,
    /// Bytes of the region taken by live areas and their guard pages.
    pub used: u64,
    /// Bytes of the region outside the per-CPU blocks waiting for the lazy purge
    /// (a block area's freed range is its block's, counted in `block_free_bytes`).
    pub pending_purge_bytes: u64,
    /// Largest free contiguous chunk of the region, in bytes.
    pub largest_free: u64,
    /// Live areas, in per-CPU blocks or not (the blocks' zone is not counted).
    pub areas: u64,
    /// Frames mapped as data of live `vmalloc`, reserved and stack areas.
    pub data_frames: u64,
    /// Of those, how many are 2 MiB mappings (512 frames each).
    pub huge_mappings: u64,
    /// Frames held in page tables this manager allocated.
    pub page_table_frames: u64,
    /// Frames holding the manager's own bookkeeping.
    pub bookkeeping_frames: u64,
    /// Bookkeeping slots free in those frames: a call that needs more than this many
    /// takes a new frame first.
    pub bookkeeping_free_slots: u64,
    /// Pages detached by `vfree` and waiting for the batched TLB flush.
    pub pending_purge_pages: u64,
    /// Frames waiting for that flush before they go back to the frame allocator.
    pub pending_purge_frames: u64,
    /// Purges (batched flushes) done so far.
    pub purges: u64,
    /// Frees queued by `vfree_atomic` that were refused when drained, as `vfree`
    /// would have refused them (never allocated, freed already, ...).
    pub deferred_refused: u64,
    /// Bytes of the region reserved for [per-CPU blocks](super::blocks) (0 with
    /// the caches off), listed as one reserved area labelled `vmap_blocks`: not free
    /// for the areas of the tree, so `largest_free` never counts them.
    pub block_zone_bytes: u64,
    /// Of those, bytes no live area (or its guard page) holds: virtual space the
    /// caches keep, not counted in `used`.
    pub block_free_bytes: u64,
    /// Of the live `areas`, those in per-CPU blocks.
    pub block_areas: u64,
    /// Free frames the per-CPU caches hold.
    pub cached_frames: u64,
    /// Frames of areas freed from per-CPU blocks, waiting for their CPU's batched
    /// flush before they can be reused; included in `pending_purge_frames` (and,
    /// one page each, in `pending_purge_pages`).
    pub cached_pending_frames: u64,
}

impl fmt::Display for VmallocStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kib = |bytes: u64| bytes / 1024;
        writeln!(f, "VmallocTotal:   {:>10} kB", kib(self.region_total))?;
        writeln!(f, "VmallocUsed:    {:>10} kB", kib(self.used))?;
        writeln!(f, "VmallocChunk:   {:>10} kB", kib(self.largest_free))?;
        writeln!(f, "VmallocAreas:   {:>10}", self.areas)?;
        writeln!(f, "VmallocFrames:  {:>10}", self.data_frames)?;
        writeln!(f, "VmallocHuge:    {:>10}", self.huge_mappings)?;
        writeln!(f, "PageTables:     {:>10} kB", self.page_table_frames * 4)?;
        writeln!(f, "Bookkeeping:    {:>10} kB", self.bookkeeping_frames * 4)?;
        write!(f, "LazyPurgePages: {:>10}", self.pending_purge_pages)?;
        if self.block_zone_bytes > 0 {
            writeln!(f)?;
            writeln!(f, "BlockAreas:     {:>10}", self.block_areas)?;
            writeln!(f, "BlockFree:      {:>10} kB", kib(self.block_free_bytes))?;
            write!(
                f,
                "CachedFrames:   {:>10} ({} waiting for a flush)",
                self.cached_frames, self.cached_pending_frames
            )?;
        }
        Ok(())
    }
}
