//! Which frames are out with a caller: one flag byte per frame, kept once a
//! [`LockedFrameAllocator`](super::LockedFrameAllocator) has CPU lists, so that a
//! free is refused wherever the frame is (see [`percpu`](super::percpu) for the
//! protocol, and why a byte). The bitmap keeps them under its lock; the CPU lists
//! find a frame's flag here without it, since the zones never change once the
//! allocator is built.

use super::bitmap::MAX_ZONES;
use super::zone::{Zone, frame_at};
use core::sync::atomic::{AtomicU8, Ordering};
use x86_64::structures::paging::PhysFrame;

/// Where an [`Entry`] keeps its zone's index: frame numbers stay below 2^40.
const ZONE_SHIFT: u32 = 56;

/// A frame as a CPU list keeps it: its number, and the index of its zone, so taking
/// it off the list finds its flag without a search.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Entry(u64);

impl Entry {
    /// An entry that stands for no frame, for empty list slots.
    pub(super) const NONE: Entry = Entry(0);

    /// The frame's number.
    #[inline]
    pub(super) fn number(self) -> u64 {
        self.0 & ((1 << ZONE_SHIFT) - 1)
    }

    /// The frame.
    #[inline]
    pub(super) fn frame(self) -> PhysFrame {
        frame_at(self.number())
    }
}

/// The frame is out with a caller.
const OUT: u8 = 1;
/// The frame is free (in the bitmap, in a CPU list, or on its way into one), or not
/// managed.
const IN: u8 = 0;

/// One zone's frames and where their flags start.
#[derive(Debug, Clone, Copy, Default)]
struct Extent {
    base: u64,
    frames: u64,
    first: usize,
}

/// The handed-out flags of an allocator's frames, with the zone extents needed to
/// find a frame's flag without the allocator's lock: the zones never change once
/// the allocator is built.
#[derive(Debug, Clone, Copy)]
pub(super) struct Handed<'a> {
    flags: &'a [AtomicU8],
    zones: [Extent; MAX_ZONES],
    count: usize,
}

impl<'a> Handed<'a> {
    /// The flags of `zones` (laid out by [`Zone::layout`]) in `flags`.
    pub(super) fn new(flags: &'a [AtomicU8], zones: &[Zone]) -> Self {
        let mut extents = [Extent::default(); MAX_ZONES];
        for (extent, zone) in extents.iter_mut().zip(zones) {
            *extent = Extent {
                base: zone.base,
                frames: zone.frames,
                first: zone.flags,
            };
        }
        Self {
            flags,
            zones: extents,
            count: zones.len().min(MAX_ZONES),
        }
    }

    /// Frame number `number` as an entry of a CPU list, and its flag; `None` outside
    /// every zone.
    #[inline]
    pub(super) fn locate(&self, number: u64) -> Option<(Entry, &'a AtomicU8)> {
        let z = self.zones[..self.count]
            .iter()
            .position(|zone| number.wrapping_sub(zone.base) < zone.frames)?;
        let entry = Entry(number | (z as u64) << ZONE_SHIFT);
        Some((entry, self.flag(entry)?))
    }

    /// The flag of a frame `locate` made `entry` of.
    #[inline]
    pub(super) fn flag(&self, entry: Entry) -> Option<&'a AtomicU8> {
        let zone = self.zones.get((entry.0 >> ZONE_SHIFT) as usize)?;
        let index = entry.number().checked_sub(zone.base)?;
        self.flags.get(zone.first + index as usize)
    }

    /// Which storage the flags live in: two allocators never share it.
    pub(super) fn identity(&self) -> *const AtomicU8 {
        self.flags.as_ptr()
    }
}

/// Marks a frame out with a caller.
#[inline]
pub(super) fn mark(flag: &AtomicU8) {
    flag.store(OUT, Ordering::Release);
}

/// Marks a frame free again (a claim undone).
#[inline]
pub(super) fn unmark(flag: &AtomicU8) {
    flag.store(IN, Ordering::Release);
}

/// Takes a frame back from its caller: whether it was out (and is now free).
/// A frame that was not out is left as it was.
#[inline]
pub(super) fn claim(flag: &AtomicU8) -> bool {
    // A plain read first: a refused free writes nothing.
    flag.load(Ordering::Relaxed) == OUT && flag.swap(IN, Ordering::AcqRel) == OUT
}

/// Whether a frame is out with a caller.
#[inline]
pub(super) fn is_out(flag: &AtomicU8) -> bool {
    flag.load(Ordering::Acquire) == OUT
}
