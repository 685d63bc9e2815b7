//! Handing frames out: one, from a hint, in bulk, or as a contiguous run.

use super::BitmapFrameAllocator;
use crate::Error;
use crate::frame::handed;
use crate::frame::zone::{frame_at, frame_number};
use x86_64::structures::paging::PhysFrame;

impl BitmapFrameAllocator<'_> {
    /// Takes free frame `index` of zone `z`, marked out with its caller when the
    /// flags are kept.
    pub(super) fn take(&mut self, z: usize, index: u64) -> PhysFrame {
        let zone = self.zones[z];
        zone.clear_bit(self.bits, 0, index);
        self.free -= 1;
        if self.tracking {
            handed::mark(self.flag(z, index));
        }
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
        self.take_bulk(out, self.tracking)
    }

    /// As [`alloc_bulk`](Self::alloc_bulk), for a CPU list: the frames stay free to
    /// callers (their flags clear).
    pub(in crate::frame) fn alloc_bulk_listed(&mut self, out: &mut [PhysFrame]) -> usize {
        self.take_bulk(out, false)
    }

    /// Fills `out` with free frames, marking them out with a caller if `mark`.
    fn take_bulk(&mut self, out: &mut [PhysFrame], mark: bool) -> usize {
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
                if mark {
                    handed::mark(self.flag(z, index));
                }
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
                if self.tracking {
                    (start..start + count).for_each(|index| handed::mark(self.flag(z, index)));
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
}
