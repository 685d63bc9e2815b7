//! Which frames the allocator manages, and reclaimable memory handed over later.

use super::{BitmapFrameAllocator, SOURCE_SHIFT};
use crate::frame::Reclaim;
use crate::frame::map::Span;
use crate::frame::zone::frame_number;
use crate::{Error, PAGE_SIZE};
use x86_64::PhysAddr;
use x86_64::structures::paging::PhysFrame;

impl BitmapFrameAllocator<'_> {
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
    ///
    /// # Safety
    ///
    /// Nothing uses what those frames hold any more (the boot loader's page tables
    /// and stack, the boot information, ACPI tables the kernel still reads): the
    /// allocator hands them out, and their owners write them.
    pub unsafe fn reclaim(&mut self, from: Reclaim) -> u64 {
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
    ///
    /// # Safety
    ///
    /// As [`reclaim`](Self::reclaim), for the frames of `range`.
    pub unsafe fn reclaim_range(
        &mut self,
        range: core::ops::Range<PhysAddr>,
    ) -> Result<u64, Error> {
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
}
