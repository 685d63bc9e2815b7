//! A hierarchical-bitmap physical frame allocator.
//!
//! # Zones
//!
//! A firmware memory map is sparse: 0..640 KiB, 1 MiB..128 MiB and a range near 2^51
//! must not cost a bitmap spanning the gaps. The map is first normalised into frame
//! numbers (usable ranges rounded inward, reserved ranges rounded outward, empty
//! ranges dropped), the usable ranges are sorted and merged into at most
//! [`MAX_ZONES`] *zones*: neighbours closer than [`ZONE_GAP_FRAMES`] share a zone
//! (a small gap costs fewer bitmap words than a zone does), and while there are too
//! many zones the two with the smallest gap between them are merged. Every frame of
//! a zone starts as used; usable ranges are then marked free, and reserved ranges
//! and every frame a reclaimable range touches used again, so wherever kinds
//! overlap, reserved wins over reclaimable and reclaimable over usable.
//!
//! # Reclaimable memory
//!
//! Zones also span the whole frames of reclaimable ranges, which start neither free
//! nor managed. What may be reclaimed later (those frames, less reserved ones and
//! those another source's range touches) is kept as a table of pieces after the
//! bitmaps; [`reclaim`](BitmapFrameAllocator::reclaim) marks a source's pieces
//! managed and free, skipping frames already managed, so nothing is freed twice.
//!
//! # The hierarchical bitmap
//!
//! Each zone owns a stack of bitmap levels in the bookkeeping storage. Level 0 has
//! one bit per frame, set when the frame is free. Level `l + 1` has one bit per word
//! of level `l`, set when that word still has a free frame; the top level is a single
//! word. Finding a free frame reads the top word, takes its lowest set bit with
//! `trailing_zeros`, and descends one word per level: at most 7 levels for the whole
//! 52-bit physical space, so the cost does not depend on how full memory is. A search
//! "at or after" a position masks the low bits of the current word and, when nothing
//! is left in it, climbs one level to the next word's summary bit.
//!
//! Clearing a bit climbs only while a word becomes zero, and setting one climbs only
//! while a word was zero, so the summaries are updated in amortised constant time.
//! Bulk allocation takes a whole level-0 word at once.
//!
//! # Handed-out flags
//!
//! After the bitmaps, the bookkeeping keeps one flag byte per frame of a zone, set
//! while the frame is out with a caller. They are kept only once a
//! [`LockedFrameAllocator`](super::LockedFrameAllocator) with per-CPU lists wraps the
//! allocator: a frame in a CPU's list is allocated here yet free to its callers, and
//! the flag is what refuses a second free of it, from any CPU, without this
//! allocator's lock (see [`percpu`](super::percpu)). Then every call here keeps them
//! too: a frame handed out is marked, a free claims the mark or is refused, and
//! [`is_free`](BitmapFrameAllocator::is_free) calls a frame free that is not out.
//!
//! # Bookkeeping storage
//!
//! The caller either provides the words ([`BitmapFrameAllocator::with_storage`], size
//! from [`BitmapFrameAllocator::storage_words`]) or lets the allocator carve them out
//! of the usable memory itself ([`BitmapFrameAllocator::from_memory`]), because a
//! booting kernel has no heap. No heap is used in either case.

mod alloc;
mod free;
mod reclaim;

use super::MemoryRegion;
use super::handed::{self, Handed};
use super::map::{NormalMap, Span};
use super::zone::Zone;
use crate::phys::PhysMemory;
use crate::{Error, PAGE_SIZE};
use core::sync::atomic::AtomicU8;
use x86_64::PhysAddr;
use x86_64::structures::paging::{FrameAllocator, FrameDeallocator, PhysFrame, Size4KiB};

/// Most zones (disjoint bitmaps) one allocator keeps.
pub const MAX_ZONES: usize = 16;
/// Most disjoint ranges of one kind (usable, reserved, reclaimable: every source's
/// together) a memory map may hold once touching and overlapping entries are merged
/// (a reclaimable entry with others of its own source); a map may have any number of
/// entries. The map is read once, with this much room: the limit holds at every
/// point of it (an entry that neither touches nor overlaps a range of the full list
/// is refused, though a later entry might have joined them all up).
pub const MAX_MAP_REGIONS: usize = 128;
/// Usable ranges closer than this many frames share one zone.
pub const ZONE_GAP_FRAMES: u64 = 1 << 15;
/// Levels needed for 2^40 frames (the 52-bit physical limit) at 64 bits a word.
pub(super) const MAX_LEVELS: usize = 8;

/// Frame counts of an allocator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameStats {
    /// Frames the allocator manages (usable, not reserved, not bookkeeping).
    pub total: u64,
    /// Frames that can be handed out.
    pub free: u64,
    /// Frames handed out.
    pub used: u64,
}

/// The zone layout of a whole map, where the reclaimable pieces are kept, and where
/// the handed-out flags start.
struct Plan {
    zones: [Zone; MAX_ZONES],
    zone_count: usize,
    /// First word of the pieces table: two words a piece, after every zone.
    pieces_offset: usize,
    pieces: usize,
    /// First word of the flags, after the pieces: one byte a frame of every zone.
    flags_offset: usize,
    flags: usize,
    storage_words: usize,
}

impl Plan {
    fn new(map: &NormalMap) -> Self {
        let (spans, zone_count) = map.zone_spans();
        let mut zones = [Zone::default(); MAX_ZONES];
        let (mut storage_words, mut flags) = (0, 0);
        for (zone, span) in zones.iter_mut().zip(&spans[..zone_count]) {
            *zone = Zone::layout(*span, storage_words, flags);
            storage_words = zone.storage_end();
            flags += zone.frames as usize;
        }
        let pieces = map.pieces(|_, _| {});
        let flags_offset = storage_words + 2 * pieces;
        Plan {
            zones,
            zone_count,
            pieces_offset: storage_words,
            pieces,
            flags_offset,
            flags,
            storage_words: flags_offset + flags.div_ceil(8),
        }
    }
}

/// Bit position of a piece's source in the first word of its table entry (frame
/// numbers stay below 2^40).
const SOURCE_SHIFT: u32 = 56;

/// A physical frame allocator over a hierarchical bitmap per memory zone.
///
/// See the [module documentation](self) for the structure. Never hands out a frame
/// twice; every refused call leaves it unchanged.
///
/// Reclaimable ranges of the map are neither free nor managed until
/// [`reclaim`](Self::reclaim) or [`reclaim_range`](Self::reclaim_range) hands them
/// over; the allocator keeps their frames (less every reserved one) in its
/// bookkeeping until then.
pub struct BitmapFrameAllocator<'a> {
    bits: &'a mut [u64],
    /// The handed-out flags, after `bits` in the storage (see the module docs).
    flags: &'a [AtomicU8],
    /// Whether the flags are kept.
    tracking: bool,
    zones: [Zone; MAX_ZONES],
    zone_count: usize,
    pieces_offset: usize,
    pieces: usize,
    total: u64,
    free: u64,
}

impl core::fmt::Debug for BitmapFrameAllocator<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("BitmapFrameAllocator")
            .field("zones", &self.zones())
            .field("stats", &self.stats())
            .field("tracks_handed_out", &self.tracking)
            .finish_non_exhaustive()
    }
}

impl<'a> BitmapFrameAllocator<'a> {
    /// How many `u64` words of bookkeeping [`with_storage`](Self::with_storage) needs
    /// for `map`; 0 when the map is unusable (no usable frame that nothing reserves or
    /// will reclaim, more than [`MAX_MAP_REGIONS`] disjoint entries of one kind, a
    /// backwards reserved or reclaimable entry).
    pub fn storage_words(map: impl IntoIterator<Item = MemoryRegion>) -> usize {
        NormalMap::new(map).map_or(0, |map| Plan::new(&map).storage_words)
    }

    /// An allocator for `map` keeping its bitmaps in `storage`.
    ///
    /// # Errors
    ///
    /// [`Error::BadMemoryMap`] when the map has no whole usable frame that nothing
    /// reserves or will reclaim (frame 0 is never usable: see
    /// [`MemoryRegion`]), has more than
    /// [`MAX_MAP_REGIONS`] entries of one kind (usable, reserved, reclaimable) that
    /// stay apart after overlapping and touching ones are merged, has a reserved or
    /// reclaimable entry that ends before it starts (dropped, it would free what it
    /// keeps back; a backwards usable entry is dropped), or `storage` is shorter than
    /// [`storage_words`](Self::storage_words).
    pub fn with_storage(
        map: impl IntoIterator<Item = MemoryRegion>,
        storage: &'a mut [u64],
    ) -> Result<Self, Error> {
        let map = NormalMap::new(map)?;
        Self::build(&map, storage)
    }

    fn build(map: &NormalMap, storage: &'a mut [u64]) -> Result<Self, Error> {
        let plan = Plan::new(map);
        let storage = storage
            .get_mut(..plan.storage_words)
            .ok_or(Error::BadMemoryMap)?;
        storage.fill(0);
        let (bits, flag_words) = storage.split_at_mut(plan.flags_offset);
        // SAFETY: `AtomicU8` has the size, alignment and bit validity of `u8`, so the
        // words are `8 * len` valid flags (all clear: zeroed above), no more than
        // `plan.flags` of which are used. The unique borrow of the words moves into
        // this shared one for the same lifetime, so nothing else reaches them.
        let flags = unsafe {
            core::slice::from_raw_parts(
                flag_words.as_mut_ptr().cast::<AtomicU8>(),
                plan.flags.min(flag_words.len() * 8),
            )
        };
        let mut free = 0;
        for zone in &plan.zones[..plan.zone_count] {
            for (start, end) in map.usable().iter().filter_map(|span| zone.clip(*span)) {
                zone.fill_leaf(bits, start, end, true);
            }
            for (start, end) in map.reserved().iter().filter_map(|span| zone.clip(*span)) {
                zone.fill_leaf(bits, start, end, false);
            }
            let pending = map.pending().iter().map(|p| p.outer());
            for (start, end) in pending.filter_map(|span| zone.clip(span)) {
                zone.fill_leaf(bits, start, end, false);
            }
            zone.record_managed(bits);
            free += zone.rebuild_summaries(bits);
        }
        if free == 0 {
            return Err(Error::BadMemoryMap);
        }
        let mut slot = plan.pieces_offset;
        map.pieces(|span, from| {
            bits[slot] = span.start | from.code() << SOURCE_SHIFT;
            bits[slot + 1] = span.end;
            slot += 2;
        });
        Ok(Self {
            bits,
            flags,
            tracking: false,
            zones: plan.zones,
            zone_count: plan.zone_count,
            pieces_offset: plan.pieces_offset,
            pieces: plan.pieces,
            total: free,
            free,
        })
    }

    /// An allocator for `map` keeping its bitmaps in usable frames of `map` itself.
    ///
    /// The bookkeeping takes the lowest run of usable, unreserved frames that is
    /// long enough; those frames are marked used for good and left out of
    /// [`FrameStats::total`].
    ///
    /// The frames are asked of `phys` one by one, so a [`PhysMemory`] that maps on
    /// demand maps them all; they must come out virtually contiguous.
    ///
    /// # Safety
    ///
    /// Every usable range of `map` must be RAM that nothing else uses (the allocator
    /// writes to it), and `phys` must reach it for as long as the allocator lives.
    ///
    /// # Errors
    ///
    /// [`Error::BadMemoryMap`] as for [`with_storage`](Self::with_storage), when no
    /// usable run is long enough for the bookkeeping (or nothing is left after it),
    /// or when `phys` does not reach the run as one virtually contiguous block.
    pub unsafe fn from_memory(
        map: impl IntoIterator<Item = MemoryRegion>,
        phys: &impl PhysMemory,
    ) -> Result<BitmapFrameAllocator<'static>, Error> {
        let map = NormalMap::new(map)?;
        let words = Plan::new(&map).storage_words;
        let frames = (words as u64 * 8).div_ceil(PAGE_SIZE);
        let first = map.find_unreserved_run(frames).ok_or(Error::BadMemoryMap)?;
        let start = phys.phys_to_virt(PhysAddr::new(first * PAGE_SIZE));
        let contiguous = (1..frames).all(|i| {
            let at = phys.phys_to_virt(PhysAddr::new((first + i) * PAGE_SIZE));
            at.addr() == start.addr().wrapping_add((i * PAGE_SIZE) as usize)
        });
        if !contiguous {
            return Err(Error::BadMemoryMap);
        }
        let start = start.cast::<u64>();
        // SAFETY: frames `first..first + frames` are usable and unreserved, so by the
        // caller's promise they are unused RAM, reached contiguously at `start`
        // (checked above), which is page-aligned (so aligned for u64); nothing else
        // refers to them while the returned allocator, which marks them used, lives.
        let storage = unsafe { core::slice::from_raw_parts_mut(start, words) };
        let mut this = BitmapFrameAllocator::build(&map, storage)?;
        this.exclude(Span {
            start: first,
            end: first + frames,
        })?;
        Ok(this)
    }

    /// Removes frames `span` (all free) from the managed memory for good.
    fn exclude(&mut self, span: Span) -> Result<(), Error> {
        for z in 0..self.zone_count {
            let zone = self.zones[z];
            let Some((start, end)) = zone.clip(span) else {
                continue;
            };
            zone.fill_leaf(self.bits, start, end, false);
            zone.record_managed(self.bits);
            self.total -= end - start;
            self.free -= end - start;
            zone.rebuild_summaries(self.bits);
        }
        if self.total == 0 {
            return Err(Error::BadMemoryMap);
        }
        Ok(())
    }

    fn zones(&self) -> &[Zone] {
        &self.zones[..self.zone_count]
    }

    /// The zone holding frame number `number`, and the frame's index in it.
    fn locate(&self, number: u64) -> Result<(usize, u64), Error> {
        self.zones()
            .iter()
            .position(|zone| zone.contains(number))
            .map(|z| (z, number - self.zones[z].base))
            .ok_or(Error::FrameNotManaged)
    }

    /// The first free frame at or after frame number `from`, without wrapping.
    fn find_from(&self, from: u64) -> Option<(usize, u64)> {
        self.zones().iter().enumerate().find_map(|(z, zone)| {
            if from >= zone.base + zone.frames || !zone.has_free(self.bits) {
                return None;
            }
            let start = from.saturating_sub(zone.base);
            zone.find_free(self.bits, start).map(|index| (z, index))
        })
    }

    /// Frame counts. Frames in the CPU lists of a
    /// [`LockedFrameAllocator`](super::LockedFrameAllocator) wrapping this allocator
    /// count as used here (its own `stats` counts them free).
    pub fn stats(&self) -> FrameStats {
        FrameStats {
            total: self.total,
            free: self.free,
            used: self.total - self.free,
        }
    }

    /// The handed-out flags, and the zones to find them by, for the CPU lists.
    pub(super) fn handed(&self) -> Handed<'a> {
        Handed::new(self.flags, self.zones())
    }

    /// Which storage the handed-out flags live in: two allocators never share it.
    pub(super) fn handed_identity(&self) -> *const AtomicU8 {
        self.flags.as_ptr()
    }

    /// Starts or stops keeping the handed-out flags (see the module docs). Starting
    /// marks every managed frame that is allocated now.
    pub(super) fn track(&mut self, on: bool) {
        if on && !self.tracking {
            for z in 0..self.zone_count {
                let zone = self.zones[z];
                for index in 0..zone.frames {
                    let out = zone.is_managed(self.bits, index) && !zone.is_free(self.bits, index);
                    if out {
                        handed::mark(self.flag(z, index));
                    } else {
                        handed::unmark(self.flag(z, index));
                    }
                }
            }
        }
        self.tracking = on;
    }

    /// The handed-out flag of frame `index` of zone `z`.
    #[inline]
    fn flag(&self, z: usize, index: u64) -> &'a AtomicU8 {
        let flags = self.flags;
        &flags[self.zones[z].flags + index as usize]
    }
}

// SAFETY: `alloc` hands out only managed frames that are free, and marks them used,
// so no frame is returned twice while it is in use.
unsafe impl FrameAllocator<Size4KiB> for BitmapFrameAllocator<'_> {
    fn allocate_frame(&mut self) -> Option<PhysFrame> {
        self.alloc()
    }
}

impl FrameDeallocator<Size4KiB> for BitmapFrameAllocator<'_> {
    /// Frees `frame`; a frame that is not allocated here is ignored (see
    /// [`BitmapFrameAllocator::free`] for the checked version).
    unsafe fn deallocate_frame(&mut self, frame: PhysFrame) {
        // SAFETY: `deallocate_frame`'s contract: the frame is unused.
        let _ = unsafe { self.free(frame) };
    }
}
