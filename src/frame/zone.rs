//! The pieces of the bitmap allocator below its public face: the memory map
//! normalised into frame numbers, and the zones with their stacked bitmap levels (see
//! [`bitmap`](super::bitmap) for the structure).

use super::bitmap::{MAX_LEVELS, MAX_MAP_REGIONS, MAX_ZONES, ZONE_GAP_FRAMES};
use super::{MemoryRegion, Reclaim, RegionKind};
use crate::{Error, PAGE_SIZE};
use x86_64::PhysAddr;
use x86_64::structures::paging::PhysFrame;

/// Frame numbers `[start, end)`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Span {
    pub(super) start: u64,
    pub(super) end: u64,
}

impl Span {
    #[inline]
    pub(super) fn is_empty(&self) -> bool {
        self.start >= self.end
    }
}

/// A reclaimable range of the map: bytes, and where it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Pending {
    pub(super) start: u64,
    pub(super) end: u64,
    pub(super) from: Reclaim,
}

impl Pending {
    /// Every frame the range touches: none of them is usable before it is reclaimed.
    #[inline]
    pub(super) fn outer(&self) -> Span {
        Span {
            start: self.start / PAGE_SIZE,
            end: self.end.div_ceil(PAGE_SIZE),
        }
    }

    /// The whole frames inside it: what reclaiming it may hand out.
    #[inline]
    pub(super) fn inner(&self) -> Span {
        Span {
            start: self.start.div_ceil(PAGE_SIZE),
            end: self.end / PAGE_SIZE,
        }
    }
}

/// A memory map copied into fixed arrays, in frame numbers.
pub(super) struct NormalMap {
    pub(super) usable: [Span; MAX_MAP_REGIONS],
    pub(super) usable_len: usize,
    pub(super) reserved: [Span; MAX_MAP_REGIONS],
    pub(super) reserved_len: usize,
    pub(super) pending: [Pending; MAX_MAP_REGIONS],
    pub(super) pending_len: usize,
}

impl NormalMap {
    /// Copies `map`: usable ranges rounded inward, reserved ones outward, reclaimable
    /// ones as bytes; empty ranges dropped. A list that fills up is sorted and its
    /// overlapping and touching entries merged, so a long firmware map of
    /// neighbouring entries fits.
    ///
    /// # Errors
    ///
    /// [`Error::BadMemoryMap`] without a whole usable frame, or when a list still
    /// holds more than [`MAX_MAP_REGIONS`] disjoint entries after merging.
    #[inline]
    pub(super) fn new(map: impl IntoIterator<Item = MemoryRegion>) -> Result<Self, Error> {
        let mut this = Self {
            usable: [Span::default(); MAX_MAP_REGIONS],
            usable_len: 0,
            reserved: [Span::default(); MAX_MAP_REGIONS],
            reserved_len: 0,
            pending: [Pending {
                start: 0,
                end: 0,
                from: Reclaim::Bootloader,
            }; MAX_MAP_REGIONS],
            pending_len: 0,
        };
        for region in map {
            let (start, end) = (region.range.start.as_u64(), region.range.end.as_u64());
            match region.kind {
                // Only whole frames inside the range are usable...
                RegionKind::Usable => push_span(
                    &mut this.usable,
                    &mut this.usable_len,
                    Span {
                        start: start.div_ceil(PAGE_SIZE),
                        end: end / PAGE_SIZE,
                    },
                )?,
                // ...and every frame touching a reserved range is reserved.
                RegionKind::Reserved => push_span(
                    &mut this.reserved,
                    &mut this.reserved_len,
                    Span {
                        start: start / PAGE_SIZE,
                        end: end.div_ceil(PAGE_SIZE),
                    },
                )?,
                RegionKind::Reclaimable(from) => {
                    this.push_pending(Pending { start, end, from })?;
                }
            }
        }
        if this.usable_len == 0 {
            return Err(Error::BadMemoryMap);
        }
        this.usable[..this.usable_len].sort_unstable_by_key(|span| span.start);
        this.reserved[..this.reserved_len].sort_unstable_by_key(|span| span.start);
        this.pending[..this.pending_len].sort_unstable_by_key(|pending| pending.start);
        Ok(this)
    }

    fn push_pending(&mut self, pending: Pending) -> Result<(), Error> {
        if pending.start >= pending.end {
            return Ok(());
        }
        if self.pending_len == MAX_MAP_REGIONS {
            let list = &mut self.pending[..self.pending_len];
            list.sort_unstable_by_key(|p| (p.from.code(), p.start));
            let mut kept: usize = 0;
            for i in 0..list.len() {
                let next = list[i];
                match kept.checked_sub(1).map(|last| &mut list[last]) {
                    Some(last) if last.from == next.from && next.start <= last.end => {
                        last.end = last.end.max(next.end);
                    }
                    _ => {
                        list[kept] = next;
                        kept += 1;
                    }
                }
            }
            self.pending_len = kept;
        }
        *self
            .pending
            .get_mut(self.pending_len)
            .ok_or(Error::BadMemoryMap)? = pending;
        self.pending_len += 1;
        Ok(())
    }

    #[inline]
    pub(super) fn usable(&self) -> &[Span] {
        &self.usable[..self.usable_len]
    }

    #[inline]
    pub(super) fn reserved(&self) -> &[Span] {
        &self.reserved[..self.reserved_len]
    }

    #[inline]
    pub(super) fn pending(&self) -> &[Pending] {
        &self.pending[..self.pending_len]
    }

    /// Frames nothing may take before they are reclaimed or never: reserved ones and
    /// every frame a reclaimable range touches.
    fn blockers(&self) -> impl Iterator<Item = Span> + '_ {
        let pending = self.pending().iter().map(Pending::outer);
        self.reserved().iter().copied().chain(pending)
    }

    /// The first frame of the lowest usable run of `count` frames that nothing
    /// reserves or will reclaim.
    #[inline]
    pub(super) fn find_unreserved_run(&self, count: u64) -> Option<u64> {
        self.usable().iter().find_map(|span| {
            let mut start = span.start;
            // Each blocker can push the candidate start at most once.
            for _ in 0..=self.reserved_len + self.pending_len {
                let end = start.checked_add(count)?;
                if end > span.end {
                    return None;
                }
                let clash = self.blockers().find(|r| r.start < end && start < r.end);
                match clash {
                    None => return Some(start),
                    Some(blocker) => start = blocker.end,
                }
            }
            None
        })
    }

    /// The highest run of usable frames that nothing reserves or will reclaim.
    #[inline]
    pub(super) fn highest_free_run(&self) -> Option<Span> {
        let mut best: Option<Span> = None;
        for span in self.usable() {
            let mut end = span.end;
            // Move the top down past every blocker covering it; each does so once.
            for _ in 0..=self.reserved_len + self.pending_len {
                match self.blockers().find(|b| b.start < end && end <= b.end) {
                    Some(blocker) => end = blocker.start,
                    None => break,
                }
            }
            if end <= span.start || best.is_some_and(|best| best.end >= end) {
                continue;
            }
            let start = self
                .blockers()
                .filter(|b| b.end < end)
                .map(|b| b.end)
                .fold(span.start, u64::max);
            best = Some(Span { start, end });
        }
        best
    }

    /// The frames a reclaim may hand out: each reclaimable range's whole frames,
    /// less every reserved frame and every frame a range of another source
    /// touches (a frame two sources claim waits for both, so it never comes). The
    /// pieces are given to `out` in order; returns how many there were.
    pub(super) fn pieces(&self, mut out: impl FnMut(Span, Reclaim)) -> usize {
        let mut count = 0;
        for pending in self.pending() {
            let inner = pending.inner();
            let others = self
                .pending()
                .iter()
                .filter(|other| other.from != pending.from)
                .map(Pending::outer);
            // Walk up through the blockers in start order: both lists are sorted,
            // so merge them as they go.
            let mut blockers = merge_sorted(self.reserved().iter().copied(), others);
            let mut at = inner.start;
            while at < inner.end {
                let next = blockers.find(|b| b.end > at);
                let stop = next.map_or(inner.end, |b| b.start.clamp(at, inner.end));
                if stop > at {
                    out(
                        Span {
                            start: at,
                            end: stop,
                        },
                        pending.from,
                    );
                    count += 1;
                }
                at = next.map_or(inner.end, |b| b.end.max(stop));
            }
        }
        count
    }

    /// Groups the sorted usable spans and the reclaimable ones into at most
    /// [`MAX_ZONES`] zone extents, so reclaimed frames land in a zone too.
    #[inline]
    pub(super) fn zone_spans(&self) -> ([Span; MAX_ZONES], usize) {
        let mut merged = [Span::default(); MAX_MAP_REGIONS];
        let mut count = 0;
        let reclaimable = self.pending().iter().map(Pending::inner);
        let spans = merge_sorted(self.usable().iter().copied(), reclaimable);
        for span in spans.filter(|span| !span.is_empty()) {
            if count > 0 && span.start <= merged[count - 1].end.saturating_add(ZONE_GAP_FRAMES) {
                merged[count - 1].end = merged[count - 1].end.max(span.end);
                continue;
            }
            if count == merged.len() {
                merge_closest(&mut merged, &mut count);
            }
            merged[count] = span;
            count += 1;
        }
        while count > MAX_ZONES {
            merge_closest(&mut merged, &mut count);
        }
        let mut zones = [Span::default(); MAX_ZONES];
        zones[..count].copy_from_slice(&merged[..count]);
        (zones, count)
    }
}

/// Appends `span` to `list`, merging the list when it is full.
fn push_span(list: &mut [Span; MAX_MAP_REGIONS], len: &mut usize, span: Span) -> Result<(), Error> {
    if span.is_empty() {
        return Ok(());
    }
    if *len == MAX_MAP_REGIONS {
        let spans = &mut list[..*len];
        spans.sort_unstable_by_key(|span| span.start);
        let mut kept = 0;
        for i in 0..spans.len() {
            let next = spans[i];
            if kept > 0 && next.start <= spans[kept - 1].end {
                spans[kept - 1].end = spans[kept - 1].end.max(next.end);
            } else {
                spans[kept] = next;
                kept += 1;
            }
        }
        *len = kept;
    }
    *list.get_mut(*len).ok_or(Error::BadMemoryMap)? = span;
    *len += 1;
    Ok(())
}

/// Merges the neighbours with the smallest gap between them (sorted, `count >= 2`).
fn merge_closest(merged: &mut [Span], count: &mut usize) {
    let closest = (1..*count)
        .min_by_key(|&i| merged[i].start.saturating_sub(merged[i - 1].end))
        .unwrap_or(1);
    merged[closest - 1].end = merged[closest - 1].end.max(merged[closest].end);
    merged.copy_within(closest + 1..*count, closest);
    *count -= 1;
}

/// Two iterators of spans sorted by start, as one sorted by start.
fn merge_sorted(
    a: impl Iterator<Item = Span>,
    b: impl Iterator<Item = Span>,
) -> impl Iterator<Item = Span> {
    let (mut a, mut b) = (a.peekable(), b.peekable());
    core::iter::from_fn(move || match (a.peek(), b.peek()) {
        (Some(x), Some(y)) if y.start < x.start => b.next(),
        (Some(_), _) => a.next(),
        (None, _) => b.next(),
    })
}

/// One zone: frames `[base, base + frames)` and where its bitmap levels live.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Zone {
    pub(super) base: u64,
    pub(super) frames: u64,
    pub(super) levels: usize,
    pub(super) offset: [usize; MAX_LEVELS],
    pub(super) words: [usize; MAX_LEVELS],
    /// One bit per frame, set when the frame may ever be handed out.
    pub(super) managed_offset: usize,
}

impl Zone {
    /// Lays out a zone's levels from storage word `first_word` on.
    #[inline]
    pub(super) fn layout(span: Span, first_word: usize) -> Self {
        let mut zone = Zone {
            base: span.start,
            frames: span.end - span.start,
            ..Zone::default()
        };
        let mut bits = zone.frames;
        let mut next = first_word;
        loop {
            let words = bits.div_ceil(64) as usize;
            zone.offset[zone.levels] = next;
            zone.words[zone.levels] = words;
            zone.levels += 1;
            next += words;
            if words == 1 {
                zone.managed_offset = next;
                return zone;
            }
            bits = words as u64;
        }
    }

    #[inline]
    pub(super) fn storage_end(&self) -> usize {
        self.managed_offset + self.words[0]
    }

    #[inline]
    pub(super) fn is_managed(&self, bits: &[u64], index: u64) -> bool {
        bits[self.managed_offset + (index / 64) as usize] & (1 << (index % 64)) != 0
    }

    /// Whether any frame index of `[start, end)` may ever be handed out.
    #[inline]
    pub(super) fn manages_any(&self, bits: &[u64], start: u64, end: u64) -> bool {
        let mut index = start;
        while index < end {
            let in_word = index % 64;
            let span = (64 - in_word).min(end - index);
            let word = bits[self.managed_offset + (index / 64) as usize];
            if word & (low_mask(span) << in_word) != 0 {
                return true;
            }
            index += span;
        }
        false
    }

    /// Records the current level 0 as the set of frames that may be handed out.
    #[inline]
    pub(super) fn record_managed(&self, bits: &mut [u64]) {
        let leaf = self.offset[0];
        bits.copy_within(leaf..leaf + self.words[0], self.managed_offset);
    }

    #[inline]
    pub(super) fn contains(&self, frame: u64) -> bool {
        frame >= self.base && frame - self.base < self.frames
    }

    #[inline]
    pub(super) fn level<'s>(&self, bits: &'s [u64], level: usize) -> &'s [u64] {
        &bits[self.offset[level]..self.offset[level] + self.words[level]]
    }

    #[inline]
    pub(super) fn level_mut<'s>(&self, bits: &'s mut [u64], level: usize) -> &'s mut [u64] {
        &mut bits[self.offset[level]..self.offset[level] + self.words[level]]
    }

    #[inline]
    pub(super) fn is_free(&self, bits: &[u64], index: u64) -> bool {
        self.level(bits, 0)[(index / 64) as usize] & (1 << (index % 64)) != 0
    }

    #[inline]
    pub(super) fn has_free(&self, bits: &[u64]) -> bool {
        self.level(bits, self.levels - 1)[0] != 0
    }

    /// The first free frame index at or after `from`.
    #[inline]
    pub(super) fn find_free(&self, bits: &[u64], from: u64) -> Option<u64> {
        if from == 0 {
            // The lowest free frame: no need to climb, start at the top word.
            let top = self.level(bits, self.levels - 1)[0];
            return (top != 0)
                .then(|| self.descend(bits, self.levels - 1, u64::from(top.trailing_zeros())));
        }
        let (mut level, mut index) = (0, from);
        loop {
            let word_index = (index / 64) as usize;
            let word = *self.level(bits, level).get(word_index)?;
            let masked = word & (!0u64 << (index % 64));
            if masked != 0 {
                index = word_index as u64 * 64 + u64::from(masked.trailing_zeros());
                return Some(self.descend(bits, level, index));
            }
            if level + 1 == self.levels {
                return None;
            }
            level += 1;
            index = word_index as u64 + 1;
        }
    }

    /// Follows lowest set bits from bit `index` of `level` down to a frame index.
    #[inline]
    pub(super) fn descend(&self, bits: &[u64], mut level: usize, mut index: u64) -> u64 {
        while level > 0 {
            level -= 1;
            let word = self.level(bits, level)[index as usize];
            index = index * 64 + u64::from(word.trailing_zeros());
        }
        index
    }

    /// Clears bit `index` of `level`, and the summary bits above while words empty.
    #[inline]
    pub(super) fn clear_bit(&self, bits: &mut [u64], mut level: usize, mut index: u64) {
        while level < self.levels {
            let word_index = (index / 64) as usize;
            let word = &mut self.level_mut(bits, level)[word_index];
            *word &= !(1 << (index % 64));
            if *word != 0 {
                return;
            }
            level += 1;
            index = word_index as u64;
        }
    }

    /// Sets bit `index` of level 0, and the summary bits above while words were empty.
    #[inline]
    pub(super) fn set_free(&self, bits: &mut [u64], mut index: u64) {
        for level in 0..self.levels {
            let word_index = (index / 64) as usize;
            let word = &mut self.level_mut(bits, level)[word_index];
            let was_empty = *word == 0;
            *word |= 1 << (index % 64);
            if !was_empty {
                return;
            }
            index = word_index as u64;
        }
    }

    /// Takes the `count` free frames from `index` on, all in one level-0 word.
    #[inline]
    pub(super) fn take_in_word(&self, bits: &mut [u64], index: u64, count: u64) {
        let word_index = (index / 64) as usize;
        let word = &mut self.level_mut(bits, 0)[word_index];
        *word &= !(low_mask(count) << (index % 64));
        if *word == 0 && self.levels > 1 {
            self.clear_bit(bits, 1, word_index as u64);
        }
    }

    /// Frees the frames whose bits `mask` sets in level-0 word `word_index`, if every
    /// one is managed and allocated; returns whether it did.
    #[inline]
    pub(super) fn free_in_word(&self, bits: &mut [u64], word_index: u64, mask: u64) -> bool {
        let word_index = word_index as usize;
        let managed = bits[self.managed_offset + word_index] & mask == mask;
        let word = self.level(bits, 0)[word_index];
        if !managed || word & mask != 0 {
            return false;
        }
        if word == 0 {
            // The summary bits above learn of the word's first free frame.
            self.set_free(
                bits,
                word_index as u64 * 64 + u64::from(mask.trailing_zeros()),
            );
        }
        self.level_mut(bits, 0)[word_index] |= mask;
        true
    }

    /// Takes up to `want` free frames from the level-0 word holding a free frame at
    /// or after `from`; returns the word's first frame index and the bits taken.
    #[inline]
    pub(super) fn take_word(&self, bits: &mut [u64], from: u64, want: usize) -> Option<(u64, u64)> {
        let index = self.find_free(bits, from)?;
        let word_index = (index / 64) as usize;
        let leaf = self.level_mut(bits, 0);
        let word = leaf[word_index] & (!0u64 << (index % 64));
        let taken = lowest_bits(word, want);
        leaf[word_index] &= !taken;
        if leaf[word_index] == 0 && self.levels > 1 {
            self.clear_bit(bits, 1, word_index as u64);
        }
        Some((word_index as u64 * 64, taken))
    }

    /// The first used frame index in `[start, end)`.
    #[inline]
    pub(super) fn first_used(&self, bits: &[u64], start: u64, end: u64) -> Option<u64> {
        let leaf = self.level(bits, 0);
        let mut index = start;
        while index < end {
            let in_word = index % 64;
            let span = (64 - in_word).min(end - index);
            let mask = low_mask(span) << in_word;
            let used = !leaf[(index / 64) as usize] & mask;
            if used != 0 {
                return Some(index - in_word + u64::from(used.trailing_zeros()));
            }
            index += span;
        }
        None
    }

    /// Sets level-0 bits `[start, end)` to `free`, without touching summaries.
    #[inline]
    pub(super) fn fill_leaf(&self, bits: &mut [u64], start: u64, end: u64, free: bool) {
        let leaf = self.level_mut(bits, 0);
        let mut index = start;
        while index < end {
            let in_word = index % 64;
            let span = (64 - in_word).min(end - index);
            let mask = low_mask(span) << in_word;
            let word = &mut leaf[(index / 64) as usize];
            *word = if free { *word | mask } else { *word & !mask };
            index += span;
        }
    }

    /// Recomputes every summary level from level 0; returns the free frame count.
    #[inline]
    pub(super) fn rebuild_summaries(&self, bits: &mut [u64]) -> u64 {
        for level in 1..self.levels {
            self.level_mut(bits, level).fill(0);
            for word_index in 0..self.words[level - 1] {
                if self.level(bits, level - 1)[word_index] != 0 {
                    self.level_mut(bits, level)[word_index / 64] |= 1 << (word_index % 64);
                }
            }
        }
        self.level(bits, 0)
            .iter()
            .map(|word| u64::from(word.count_ones()))
            .sum()
    }

    /// Makes every frame index of `[start, end)` that is not managed yet managed and
    /// free, without touching summaries; returns how many it added.
    #[inline]
    pub(super) fn adopt(&self, bits: &mut [u64], start: u64, end: u64) -> u64 {
        let mut added = 0;
        let mut index = start;
        while index < end {
            let in_word = index % 64;
            let span = (64 - in_word).min(end - index);
            let word = (index / 64) as usize;
            let managed = &mut bits[self.managed_offset + word];
            let new = (low_mask(span) << in_word) & !*managed;
            *managed |= new;
            self.level_mut(bits, 0)[word] |= new;
            added += u64::from(new.count_ones());
            index += span;
        }
        added
    }

    /// Clips frame span `span` to this zone, as zone-relative indices.
    #[inline]
    pub(super) fn clip(&self, span: Span) -> Option<(u64, u64)> {
        let start = span.start.max(self.base);
        let end = span.end.min(self.base + self.frames);
        (start < end).then(|| (start - self.base, end - self.base))
    }
}

/// A mask of the `count` (1..=64) lowest bits.
#[inline]
pub(super) fn low_mask(count: u64) -> u64 {
    if count >= 64 { !0 } else { (1 << count) - 1 }
}

/// The lowest `count` set bits of `word`.
#[inline]
pub(super) fn lowest_bits(word: u64, count: usize) -> u64 {
    if word.count_ones() as usize <= count {
        return word;
    }
    let mut rest = word;
    for _ in 0..count {
        rest &= rest - 1;
    }
    word & !rest
}

#[inline]
pub(super) fn frame_at(number: u64) -> PhysFrame {
    PhysFrame::containing_address(PhysAddr::new(number * PAGE_SIZE))
}

#[inline]
pub(super) fn frame_number(frame: PhysFrame) -> u64 {
    frame.start_address().as_u64() / PAGE_SIZE
}
