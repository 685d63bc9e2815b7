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
//! # Bookkeeping storage
//!
//! The caller either provides the words ([`BitmapFrameAllocator::with_storage`], size
//! from [`BitmapFrameAllocator::storage_words`]) or lets the allocator carve them out
//! of the usable memory itself ([`BitmapFrameAllocator::from_memory`]), because a
//! booting kernel has no heap. No heap is used in either case.

use super::zone::{NormalMap, Span, Zone, frame_at, frame_number};
use super::{MemoryRegion, Reclaim};
use crate::phys::PhysMemory;
use crate::{Error, PAGE_SIZE};
use x86_64::PhysAddr;
use x86_64::structures::paging::{FrameAllocator, FrameDeallocator, PhysFrame, Size4KiB};

/// Most zones (disjoint bitmaps) one allocator keeps.
pub const MAX_ZONES: usize = 16;
/// Most entries a memory map may have.
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

/// The zone layout of a whole map, and where the reclaimable pieces are kept.
struct Plan {
    zones: [Zone; MAX_ZONES],
    zone_count: usize,
    /// First word of the pieces table: two words a piece, after every zone.
    pieces_offset: usize,
    pieces: usize,
    storage_words: usize,
}

impl Plan {
    fn new(map: &NormalMap) -> Self {
        let (spans, zone_count) = map.zone_spans();
        let mut zones = [Zone::default(); MAX_ZONES];
        let mut storage_words = 0;
        for (zone, span) in zones.iter_mut().zip(&spans[..zone_count]) {
            *zone = Zone::layout(*span, storage_words);
            storage_words = zone.storage_end();
        }
        let pieces = map.pieces(|_, _| {});
        Plan {
            zones,
            zone_count,
            pieces_offset: storage_words,
            pieces,
            storage_words: storage_words + 2 * pieces,
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
#[derive(Debug)]
pub struct BitmapFrameAllocator<'a> {
    bits: &'a mut [u64],
    zones: [Zone; MAX_ZONES],
    zone_count: usize,
    pieces_offset: usize,
    pieces: usize,
    total: u64,
    free: u64,
}

impl<'a> BitmapFrameAllocator<'a> {
    /// How many `u64` words of bookkeeping [`with_storage`](Self::with_storage) needs
    /// for `map`; 0 when the map is unusable (no usable frame, or more than
    /// [`MAX_MAP_REGIONS`] disjoint entries of one kind).
    pub fn storage_words(map: impl IntoIterator<Item = MemoryRegion>) -> usize {
        NormalMap::new(map).map_or(0, |map| Plan::new(&map).storage_words)
    }

    /// An allocator for `map` keeping its bitmaps in `storage`.
    ///
    /// # Errors
    ///
    /// [`Error::BadMemoryMap`] when the map has no whole usable frame, has more than
    /// [`MAX_MAP_REGIONS`] entries of one kind (usable, reserved, reclaimable) that
    /// stay apart after overlapping and touching ones are merged, or `storage` is
    /// shorter than [`storage_words`](Self::storage_words).
    pub fn with_storage(
        map: impl IntoIterator<Item = MemoryRegion>,
        storage: &'a mut [u64],
    ) -> Result<Self, Error> {
        let map = NormalMap::new(map)?;
        Self::build(&map, storage)
    }

    fn build(map: &NormalMap, storage: &'a mut [u64]) -> Result<Self, Error> {
        let plan = Plan::new(map);
        let bits = storage
            .get_mut(..plan.storage_words)
            .ok_or(Error::BadMemoryMap)?;
        bits.fill(0);
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

    fn take(&mut self, z: usize, index: u64) -> PhysFrame {
        let zone = self.zones[z];
        zone.clear_bit(self.bits, 0, index);
        self.free -= 1;
        frame_at(zone.base + index)
    }

    /// One free frame, the lowest-addressed one.
    pub fn alloc(&mut self) -> Option<PhysFrame> {
        let (z, index) = self.find_from(0)?;
        Some(self.take(z, index))
    }

    /// The first free frame at or after `hint`, wrapping around to the lowest one.
    pub fn alloc_from(&mut self, hint: PhysFrame) -> Option<PhysFrame> {
        let (z, index) = self
            .find_from(frame_number(hint))
            .or_else(|| self.find_from(0))?;
        Some(self.take(z, index))
    }

    /// Fills `out` from the front with free frames, a bitmap word at a time; returns
    /// how many it filled (fewer than `out.len()` only when memory ran out).
    pub fn alloc_bulk(&mut self, out: &mut [PhysFrame]) -> usize {
        let (mut filled, mut z, mut from) = (0, 0, 0);
        while filled < out.len() && z < self.zone_count {
            let zone = self.zones[z];
            let Some((first, mut taken)) = zone.take_word(self.bits, from, out.len() - filled)
            else {
                (z, from) = (z + 1, 0);
                continue;
            };
            // Everything below the word just taken is used: search on from its end.
            from = first;
            self.free -= u64::from(taken.count_ones());
            while taken != 0 {
                let index = first + u64::from(taken.trailing_zeros());
                out[filled] = frame_at(zone.base + index);
                filled += 1;
                taken &= taken - 1;
            }
        }
        filled
    }

    /// `count` physically contiguous frames, the first aligned to `align_frames`
    /// frames (as a physical address: `align_frames * 4096`).
    ///
    /// # Errors
    ///
    /// [`Error::ZeroSize`] for `count == 0`, [`Error::BadAlignment`] when
    /// `align_frames` is not a power of two, [`Error::OutOfFrames`] when no such run
    /// is free. Nothing changes on error.
    pub fn alloc_contiguous(&mut self, count: u64, align_frames: u64) -> Result<PhysFrame, Error> {
        if count == 0 {
            return Err(Error::ZeroSize);
        }
        if !align_frames.is_power_of_two() {
            return Err(Error::BadAlignment);
        }
        for z in 0..self.zone_count {
            if let Some(start) = self.find_run(z, count, align_frames) {
                let zone = self.zones[z];
                let mut index = start;
                while index < start + count {
                    let in_word = (64 - index % 64).min(start + count - index);
                    zone.take_in_word(self.bits, index, in_word);
                    index += in_word;
                }
                self.free -= count;
                return Ok(frame_at(zone.base + start));
            }
        }
        Err(Error::OutOfFrames)
    }

    /// The first aligned run of `count` free frames in zone `z`, as a zone index.
    fn find_run(&self, z: usize, count: u64, align: u64) -> Option<u64> {
        let zone = &self.zones[z];
        let mut from = 0;
        loop {
            let free = zone.find_free(self.bits, from)?;
            let start = (zone.base + free).checked_next_multiple_of(align)? - zone.base;
            let end = start.checked_add(count)?;
            if end > zone.frames {
                return None;
            }
            match zone.first_used(self.bits, start, end) {
                None => return Some(start),
                Some(used) => from = used + 1,
            }
        }
    }

    /// Returns `frame`.
    ///
    /// # Errors
    ///
    /// [`Error::FrameNotManaged`] when the frame lies outside the managed memory
    /// (including reserved and bookkeeping frames), [`Error::FrameNotAllocated`] when
    /// it is free. Nothing changes on error.
    pub fn free(&mut self, frame: PhysFrame) -> Result<(), Error> {
        let (z, index) = self.locate(frame_number(frame))?;
        let zone = self.zones[z];
        if !zone.is_managed(self.bits, index) {
            return Err(Error::FrameNotManaged);
        }
        if zone.is_free(self.bits, index) {
            return Err(Error::FrameNotAllocated);
        }
        zone.set_free(self.bits, index);
        self.free += 1;
        Ok(())
    }

    /// Returns every frame of `frames`, or none of them.
    ///
    /// Frames are freed in order; at the first bad one (including one listed twice,
    /// which finds itself already free) the frames freed so far are taken back, so
    /// the call is all-or-nothing.
    ///
    /// # Errors
    ///
    /// As [`free`](Self::free), for the first bad frame; nothing changes.
    pub fn free_bulk(&mut self, frames: &[PhysFrame]) -> Result<(), Error> {
        let mut done = 0;
        while let Some(&frame) = frames.get(done) {
            let run = self.free_word_run(&frames[done..]);
            if run > 0 {
                done += run;
                continue;
            }
            if let Err(error) = self.free(frame) {
                self.retake(&frames[..done]);
                return Err(error);
            }
            done += 1;
        }
        Ok(())
    }

    /// Frees the frames at the front of `frames` that share one bitmap word (each
    /// once), with one write, if there are at least two and all are managed and
    /// allocated: a 2 MiB run comes back 64 frames a word, and frames handed out in
    /// bulk from a fragmented zone a few dozen a word. Returns how many it freed: 0
    /// when it did nothing, and the caller frees one at a time (and reports the bad
    /// frame, if any).
    fn free_word_run(&mut self, frames: &[PhysFrame]) -> usize {
        let [first, second, ..] = *frames else {
            return 0;
        };
        let number = frame_number(first);
        if frame_number(second) / 64 != number / 64 {
            return 0; // the common case for scattered frames: no group to make
        }
        let Ok((z, index)) = self.locate(number) else {
            return 0;
        };
        let zone = self.zones[z];
        let word_start = zone.base + index / 64 * 64;
        let mut mask = 0u64;
        let mut run = 0;
        for &frame in frames {
            let offset = frame_number(frame).wrapping_sub(word_start);
            let bit = 1u64.checked_shl(offset as u32).filter(|_| offset < 64);
            match bit {
                // A frame listed twice stops the group; the one-by-one path refuses it.
                Some(bit) if mask & bit == 0 => mask |= bit,
                _ => break,
            }
            run += 1;
        }
        if run < 2 || !zone.free_in_word(self.bits, index / 64, mask) {
            return 0;
        }
        self.free += run as u64;
        run
    }

    /// Marks frames this call has just freed as allocated again.
    fn retake(&mut self, frames: &[PhysFrame]) {
        for &frame in frames {
            if let Ok((z, index)) = self.locate(frame_number(frame)) {
                self.take(z, index);
            }
        }
    }

    /// Whether `frame` is free.
    ///
    /// # Errors
    ///
    /// [`Error::FrameNotManaged`] when the frame can never be handed out: outside
    /// every usable range, reserved, or holding the bookkeeping.
    pub fn is_free(&self, frame: PhysFrame) -> Result<bool, Error> {
        let (z, index) = self.locate(frame_number(frame))?;
        let zone = &self.zones[z];
        if !zone.is_managed(self.bits, index) {
            return Err(Error::FrameNotManaged);
        }
        Ok(zone.is_free(self.bits, index))
    }

    /// Whether any of the `count` frames from `first` on may be handed out by this
    /// allocator (free or not): RAM it manages, which `ioremap` must refuse.
    pub fn manages(&self, first: PhysFrame, count: u64) -> bool {
        let start = frame_number(first);
        let end = start.saturating_add(count);
        self.zones().iter().any(|zone| {
            let (zone_start, zone_end) = (zone.base, zone.base + zone.frames);
            let (from, to) = (start.max(zone_start), end.min(zone_end));
            from < to && zone.manages_any(self.bits, from - zone_start, to - zone_start)
        })
    }

    /// Hands every frame the map said is reclaimable `from` this source, and that is
    /// not managed yet, to the allocator as free: call it once the kernel is done
    /// with what the memory holds (ACPI tables parsed, boot services exited, boot
    /// information read and the boot loader's tables and stack left). Returns how
    /// many frames it added; 0 when there are none left, so calling it twice frees
    /// nothing twice.
    ///
    /// Only whole frames inside a reclaimable range are added, never one that the
    /// map also reserves, nor one that a reclaimable range of another source
    /// touches.
    pub fn reclaim(&mut self, from: Reclaim) -> u64 {
        let mut added = 0;
        for i in 0..self.pieces {
            let (span, source) = self.piece(i);
            if source == Some(from) {
                added += self.adopt(span);
            }
        }
        added
    }

    /// Hands the reclaimable frames inside `range` to the allocator, as
    /// [`reclaim`](Self::reclaim) does for a whole source: for a kernel that is done
    /// with part of its reclaimable memory (the boot information, say, but not yet
    /// the page tables it runs on). Returns how many frames it added; 0 for a range
    /// with no whole frame.
    ///
    /// # Errors
    ///
    /// Nothing changes on any error:
    /// - [`Error::RangeWraps`] when `range` ends before it starts;
    /// - [`Error::Overlap`] when a frame of `range` is already managed: usable in
    ///   the map, or reclaimed before (so nothing is freed twice);
    /// - [`Error::FrameNotManaged`] when `range` holds no frame still waiting to be
    ///   reclaimed (reserved memory, a hole, or nothing the map called reclaimable).
    pub fn reclaim_range(&mut self, range: core::ops::Range<PhysAddr>) -> Result<u64, Error> {
        let (start, end) = (range.start.as_u64(), range.end.as_u64());
        if start > end {
            return Err(Error::RangeWraps);
        }
        let frames = Span {
            start: start.div_ceil(PAGE_SIZE),
            end: end / PAGE_SIZE,
        };
        if frames.is_empty() {
            return Ok(0); // no whole frame: nothing to do, as for an empty map entry
        }
        let managed = self.zones().iter().any(|zone| {
            zone.clip(frames)
                .is_some_and(|(from, to)| zone.manages_any(self.bits, from, to))
        });
        if managed {
            return Err(Error::Overlap);
        }
        let mut added = 0;
        for i in 0..self.pieces {
            let (span, _) = self.piece(i);
            let inside = Span {
                start: span.start.max(frames.start),
                end: span.end.min(frames.end),
            };
            if !inside.is_empty() {
                added += self.adopt(inside);
            }
        }
        if added == 0 {
            return Err(Error::FrameNotManaged);
        }
        Ok(added)
    }

    /// Piece `i` of the reclaim table: its frames and where they came from.
    fn piece(&self, i: usize) -> (Span, Option<Reclaim>) {
        let first = self.bits[self.pieces_offset + 2 * i];
        let source = first >> SOURCE_SHIFT;
        let span = Span {
            start: first & ((1 << SOURCE_SHIFT) - 1),
            end: self.bits[self.pieces_offset + 2 * i + 1],
        };
        (span, Reclaim::ALL.into_iter().find(|r| r.code() == source))
    }

    /// Makes the unmanaged frames of `span` managed and free; returns how many.
    fn adopt(&mut self, span: Span) -> u64 {
        let mut added = 0;
        for zone in &self.zones[..self.zone_count] {
            if let Some((start, end)) = zone.clip(span) {
                let new = zone.adopt(self.bits, start, end);
                if new > 0 {
                    zone.rebuild_summaries(self.bits);
                    added += new;
                }
            }
        }
        self.total += added;
        self.free += added;
        added
    }

    /// Frame counts.
    pub fn stats(&self) -> FrameStats {
        FrameStats {
            total: self.total,
            free: self.free,
            used: self.total - self.free,
        }
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
        let _ = self.free(frame);
    }
}
