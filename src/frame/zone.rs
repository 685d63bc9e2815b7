//! The zones of the bitmap allocator: each one's stacked bitmap levels, its managed
//! bits and its handed-out flags in the bookkeeping storage (see
//! [`bitmap`](super::bitmap) for the structure), and the bit helpers they share.

use super::bitmap::MAX_LEVELS;
use super::map::Span;
use crate::PAGE_SIZE;
use x86_64::PhysAddr;
use x86_64::structures::paging::PhysFrame;

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
    /// Where the zone's handed-out flags start, one byte per frame, in the flags
    /// after the bitmaps (see [`handed`](super::handed)).
    pub(super) flags: usize,
}

impl Zone {
    /// Lays out a zone's levels from storage word `first_word` on, its handed-out
    /// flags from flag `first_flag` on.
    #[inline]
    pub(super) fn layout(span: Span, first_word: usize, first_flag: usize) -> Self {
        let mut zone = Zone {
            base: span.start,
            frames: span.end - span.start,
            flags: first_flag,
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
