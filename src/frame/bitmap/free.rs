//! Taking frames back: one, in bulk (all or nothing), or from the CPU lists; and
//! whether a frame is free.

use super::BitmapFrameAllocator;
use crate::Error;
use crate::frame::handed;
use crate::frame::zone::frame_number;
use x86_64::structures::paging::PhysFrame;

impl BitmapFrameAllocator<'_> {
    /// Returns `frame`.
    ///
    /// # Errors
    ///
    /// [`Error::FrameNotManaged`] when the frame lies outside the managed memory
    /// (including reserved and bookkeeping frames), [`Error::FrameNotAllocated`] when
    /// it is free (in a CPU list of a
    /// [`LockedFrameAllocator`](crate::frame::LockedFrameAllocator) too). Nothing
    /// changes on error.
    ///
    /// # Safety
    ///
    /// Nothing uses or maps `frame` any more: the allocator hands it out again, and
    /// its next owner writes it. A frame the allocator holds already (a double free)
    /// or does not manage is refused with an error, which is safe; a free of a frame
    /// handed out again since, to another owner, cannot be told from that owner's.
    pub unsafe fn free(&mut self, frame: PhysFrame) -> Result<(), Error> {
        let (z, index) = self.locate(frame_number(frame))?;
        let zone = self.zones[z];
        if !zone.is_managed(self.bits, index) {
            return Err(Error::FrameNotManaged);
        }
        if zone.is_free(self.bits, index) || self.tracking && !handed::claim(self.flag(z, index)) {
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
    ///
    /// # Safety
    ///
    /// As [`free`](Self::free), for every frame of `frames`.
    pub unsafe fn free_bulk(&mut self, frames: &[PhysFrame]) -> Result<(), Error> {
        let mut done = 0;
        while let Some(&frame) = frames.get(done) {
            let run = self.free_word_run(&frames[done..]);
            if run > 0 {
                done += run;
                continue;
            }
            // SAFETY: forwarded from the caller.
            if let Err(error) = unsafe { self.free(frame) } {
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
            let number = frame_number(frame);
            let offset = number.wrapping_sub(word_start);
            // In the word and in the zone: a frame past the zone's end has no flag
            // here (its index names another zone's frame, or none).
            let bit = 1u64
                .checked_shl(offset as u32)
                .filter(|_| offset < 64 && zone.contains(number));
            match bit {
                // A frame listed twice stops the group; the one-by-one path refuses it.
                Some(bit) if mask & bit == 0 => mask |= bit,
                _ => break,
            }
            run += 1;
        }
        if run < 2 || !self.claim_word(z, index / 64 * 64, mask) {
            return 0;
        }
        if !zone.free_in_word(self.bits, index / 64, mask) {
            self.mark_word(z, index / 64 * 64, mask);
            return 0;
        }
        self.free += run as u64;
        run
    }

    /// Claims the handed-out flags of the frames `mask` picks from zone index `first`
    /// on, if the flags are kept: all of them, or none (and returns `false`).
    fn claim_word(&self, z: usize, first: u64, mask: u64) -> bool {
        if !self.tracking {
            return true;
        }
        let mut claimed = 0u64;
        let mut rest = mask;
        while rest != 0 {
            let bit = rest & rest.wrapping_neg();
            if !handed::claim(self.flag(z, first + u64::from(bit.trailing_zeros()))) {
                self.mark_word(z, first, claimed);
                return false;
            }
            claimed |= bit;
            rest &= rest - 1;
        }
        true
    }

    /// Marks the frames `mask` picks from zone index `first` on out again, if the
    /// flags are kept.
    fn mark_word(&self, z: usize, first: u64, mut mask: u64) {
        while self.tracking && mask != 0 {
            handed::mark(self.flag(z, first + u64::from(mask.trailing_zeros())));
            mask &= mask - 1;
        }
    }

    /// Marks frames this call has just freed as allocated again.
    fn retake(&mut self, frames: &[PhysFrame]) {
        for &frame in frames {
            if let Ok((z, index)) = self.locate(frame_number(frame)) {
                self.take(z, index);
            }
        }
    }

    /// Gives frames of CPU lists back: each one managed, allocated here and free to
    /// its callers (its flag clear), so none can be refused.
    pub(in crate::frame) fn free_listed(&mut self, frames: impl IntoIterator<Item = PhysFrame>) {
        for frame in frames {
            let Ok((z, index)) = self.locate(frame_number(frame)) else {
                continue;
            };
            let zone = self.zones[z];
            if zone.is_managed(self.bits, index) && !zone.is_free(self.bits, index) {
                zone.set_free(self.bits, index);
                self.free += 1;
            }
        }
    }

    /// Whether `frame` is free: in the bitmap, or (with the handed-out flags kept)
    /// anywhere but with a caller, a CPU list included.
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
        let out = self.tracking && handed::is_out(self.flag(z, index));
        Ok(zone.is_free(self.bits, index) || self.tracking && !out)
    }
}
