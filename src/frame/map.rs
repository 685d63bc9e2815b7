//! A firmware memory map normalised into frame numbers: usable ranges merged and
//! rounded inward, reserved ones rounded outward, reclaimable ones kept as bytes, and
//! grouped into zone extents (see [`bitmap`](super::bitmap) for how the allocator uses
//! them).
//!
//! Frame 0 is never usable. Under an identity map (a UEFI kernel's, an
//! [`OffsetPhysMemory`](crate::OffsetPhysMemory) at offset 0) its address is the null
//! pointer, which Rust code may not write through; Linux reserves it on x86 too.

use super::bitmap::{MAX_MAP_REGIONS, MAX_ZONES, ZONE_GAP_FRAMES};
use super::{MemoryRegion, Reclaim, RegionKind};
use crate::{Error, PAGE_SIZE};

/// The lowest frame number a map may hand out (see the module documentation).
const FIRST_USABLE_FRAME: u64 = 1;

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

    /// The whole frames of bytes `[start, end)` that may be handed out.
    #[inline]
    fn inside(start: u64, end: u64) -> Self {
        Span {
            start: start.div_ceil(PAGE_SIZE).max(FIRST_USABLE_FRAME),
            end: end / PAGE_SIZE,
        }
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
        Span::inside(self.start, self.end)
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
    /// Copies `map`: usable ranges merged, then rounded inward (RAM split into
    /// entries at unaligned borders loses no frame), reserved ones rounded outward,
    /// reclaimable ones merged per source, as bytes; empty ranges dropped. A list that fills up is
    /// sorted and its overlapping and touching entries merged, so a long firmware
    /// map of neighbouring entries fits.
    ///
    /// # Errors
    ///
    /// [`Error::BadMemoryMap`] without a whole usable frame that nothing reserves or
    /// will reclaim, for a reserved or reclaimable entry that ends before it starts,
    /// or when a list still holds more than [`MAX_MAP_REGIONS`] disjoint entries
    /// after merging.
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
            if end < start && region.kind != RegionKind::Usable {
                // Dropped, it would hand out what it keeps back. (A backwards usable
                // entry only loses memory: dropped, as the boot adapters drop theirs.)
                return Err(Error::BadMemoryMap);
            }
            match region.kind {
                // Bytes until every usable entry is in: only whole frames inside
                // the merged ranges are usable...
                RegionKind::Usable => {
                    push_usable(&mut this.usable, &mut this.usable_len, Span { start, end })?
                }
                // ...and every frame touching a reserved range is reserved (an
                // empty one touches none).
                RegionKind::Reserved if start >= end => {}
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
        this.usable_len = merge(&mut this.usable[..this.usable_len]);
        let mut frames = 0;
        for i in 0..this.usable_len {
            let span = Span::inside(this.usable[i].start, this.usable[i].end);
            if !span.is_empty() {
                this.usable[frames] = span;
                frames += 1;
            }
        }
        this.usable_len = frames;
        this.reserved[..this.reserved_len].sort_unstable_by_key(|span| span.start);
        // A source's ranges that touch at unaligned borders lose no frame either.
        this.merge_pending();
        this.pending[..this.pending_len].sort_unstable_by_key(|pending| pending.start);
        if this.find_unreserved_run(1).is_none() {
            return Err(Error::BadMemoryMap);
        }
        Ok(this)
    }

    fn push_pending(&mut self, pending: Pending) -> Result<(), Error> {
        if pending.start >= pending.end {
            return Ok(());
        }
        if self.pending_len == MAX_MAP_REGIONS {
            self.merge_pending();
            if self.pending_len == MAX_MAP_REGIONS {
                let touched = self.pending.iter_mut().find(|kept| {
                    kept.from == pending.from
                        && pending.start <= kept.end
                        && kept.start <= pending.end
                });
                let kept = touched.ok_or(Error::BadMemoryMap)?;
                kept.start = kept.start.min(pending.start);
                kept.end = kept.end.max(pending.end);
                return Ok(());
            }
        }
        *self
            .pending
            .get_mut(self.pending_len)
            .ok_or(Error::BadMemoryMap)? = pending;
        self.pending_len += 1;
        Ok(())
    }

    /// Merges the overlapping and touching reclaimable ranges of each source, sorted
    /// by source, then start.
    fn merge_pending(&mut self) {
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
            // Nothing below the highest blocker under the top belongs to the run.
            let floor = self
                .blockers()
                .filter(|b| b.end < end)
                .map(|b| b.end)
                .fold(0, u64::max);
            let start = span.start.max(floor);
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
    push_span_keeping(list, len, span, |_| true)
}

/// [`push_span`] for usable ranges, in bytes: when the merged list is still full,
/// the ranges holding no whole frame (slivers a firmware map lists between reserved
/// bits) go, as they would have when rounded; until then they stay, since two that
/// touch may make a whole frame together.
fn push_usable(
    list: &mut [Span; MAX_MAP_REGIONS],
    len: &mut usize,
    span: Span,
) -> Result<(), Error> {
    push_span_keeping(list, len, span, |bytes| {
        !Span::inside(bytes.start, bytes.end).is_empty()
    })
}

/// Appends `span` to `list`, merging the list when it is full and then dropping
/// the entries `worth` says are not worth keeping.
fn push_span_keeping(
    list: &mut [Span; MAX_MAP_REGIONS],
    len: &mut usize,
    span: Span,
    worth: impl Fn(&Span) -> bool,
) -> Result<(), Error> {
    if span.is_empty() {
        return Ok(());
    }
    if *len == MAX_MAP_REGIONS {
        *len = merge(&mut list[..]);
        if *len == MAX_MAP_REGIONS {
            let mut kept = 0;
            for i in 0..MAX_MAP_REGIONS {
                if worth(&list[i]) {
                    list[kept] = list[i];
                    kept += 1;
                }
            }
            *len = kept;
        }
        if *len == MAX_MAP_REGIONS {
            // Still full: the new range may extend one it touches (a range the
            // map gives in two touching halves after 127 others).
            let touched = list
                .iter_mut()
                .find(|kept| span.start <= kept.end && kept.start <= span.end);
            let Some(kept) = touched else {
                // A range not worth keeping goes, as the list's own did.
                return if worth(&span) {
                    Err(Error::BadMemoryMap)
                } else {
                    Ok(())
                };
            };
            kept.start = kept.start.min(span.start);
            kept.end = kept.end.max(span.end);
            return Ok(());
        }
    }
    *list.get_mut(*len).ok_or(Error::BadMemoryMap)? = span;
    *len += 1;
    Ok(())
}

/// Sorts `spans` and merges the overlapping and touching ones to the front: how many
/// are left.
fn merge(spans: &mut [Span]) -> usize {
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
    kept
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
