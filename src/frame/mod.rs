//! Physical frame allocation.
//!
//! [`BitmapFrameAllocator`] manages the usable frames of a firmware memory map with
//! a hierarchical bitmap per zone (see [`bitmap`] for the structure);
//! [`LockedFrameAllocator`] shares it between CPUs as a [`FrameSource`];
//! [`FaultInjector`] makes a chosen allocation fail, to test rollback paths.

pub mod bitmap;
mod fault;
mod locked;
#[cfg(test)]
mod test;

pub use bitmap::{BitmapFrameAllocator, FrameStats};
pub use fault::FaultInjector;
pub use locked::LockedFrameAllocator;

use crate::Error;
use core::ops::Range;
use x86_64::PhysAddr;
use x86_64::structures::paging::{PhysFrame, Size4KiB};

/// What a firmware memory map says about one physical range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegionKind {
    /// RAM the kernel may hand out.
    Usable,
    /// Anything else: firmware, MMIO, the kernel image, boot structures.
    Reserved,
}

/// One entry of a firmware memory map (E820, multiboot, UEFI, `bootloader`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryRegion {
    /// Physical byte range, end exclusive; need not be page-aligned.
    pub range: Range<PhysAddr>,
    /// Whether the range may be handed out.
    pub kind: RegionKind,
}

/// A shared source of 4 KiB physical frames.
///
/// Everything above the frame allocator (the page-table cursor, the vmalloc manager,
/// the heap) takes frames through this trait, with `&self` so one allocator can be
/// shared between CPUs behind its own lock.
pub trait FrameSource {
    /// One frame, or `None` when none is left.
    fn alloc_frame(&self) -> Option<PhysFrame<Size4KiB>>;

    /// Fills `out` from the front with up to `out.len()` frames; returns how many.
    fn alloc_frames(&self, out: &mut [PhysFrame<Size4KiB>]) -> usize {
        let mut filled = 0;
        for slot in out.iter_mut() {
            match self.alloc_frame() {
                Some(frame) => *slot = frame,
                None => break,
            }
            filled += 1;
        }
        filled
    }

    /// Returns one frame.
    ///
    /// # Errors
    ///
    /// [`Error::FrameNotManaged`] or [`Error::FrameNotAllocated`]; nothing changes.
    fn free_frame(&self, frame: PhysFrame<Size4KiB>) -> Result<(), Error>;

    /// Returns every frame of `frames`, or none of them on error.
    ///
    /// # Errors
    ///
    /// As [`free_frame`](Self::free_frame), for the first bad frame (including a
    /// frame listed twice); nothing changes.
    fn free_frames(&self, frames: &[PhysFrame<Size4KiB>]) -> Result<(), Error>;
}

impl<S: FrameSource + ?Sized> FrameSource for &S {
    fn alloc_frame(&self) -> Option<PhysFrame<Size4KiB>> {
        (**self).alloc_frame()
    }
    fn alloc_frames(&self, out: &mut [PhysFrame<Size4KiB>]) -> usize {
        (**self).alloc_frames(out)
    }
    fn free_frame(&self, frame: PhysFrame<Size4KiB>) -> Result<(), Error> {
        (**self).free_frame(frame)
    }
    fn free_frames(&self, frames: &[PhysFrame<Size4KiB>]) -> Result<(), Error> {
        (**self).free_frames(frames)
    }
}

/// Convenience for building memory maps in tests and examples.
impl MemoryRegion {
    /// A usable range `[start, end)`.
    pub fn usable(start: u64, end: u64) -> Self {
        Self {
            range: PhysAddr::new(start)..PhysAddr::new(end),
            kind: RegionKind::Usable,
        }
    }
    /// A reserved range `[start, end)`.
    pub fn reserved(start: u64, end: u64) -> Self {
        Self {
            range: PhysAddr::new(start)..PhysAddr::new(end),
            kind: RegionKind::Reserved,
        }
    }
}
