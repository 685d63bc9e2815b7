//! A [`BitmapFrameAllocator`] behind a spin lock, shared through `&self`.

use super::bitmap::{BitmapFrameAllocator, FrameStats};
use super::{FrameSource, MemoryRegion, Reclaim};
use crate::Error;
use crate::smp::Cpus;
use crate::sync::{Cpu, IrqLock};
use x86_64::PhysAddr;
use x86_64::structures::paging::{PageSize, PhysFrame, Size2MiB, Size4KiB};

/// A [`BitmapFrameAllocator`] behind a spin lock, usable from several CPUs.
///
/// Every method takes the lock once per call, bulk ones included. The vmalloc
/// manager calls it only with interrupts held off, so an interrupt handler that
/// allocates through the manager never finds the lock held by the code it
/// interrupted there. A kernel that also calls it directly, where such a handler may
/// interrupt, builds it [`with_cpus`](Self::with_cpus): the lock is then taken with
/// interrupts held off ([`Cpus::irq_save`]) on every call.
pub struct LockedFrameAllocator<'a> {
    inner: IrqLock<BitmapFrameAllocator<'a>>,
    cpus: Option<&'a dyn Cpus>,
}

impl core::fmt::Debug for LockedFrameAllocator<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("LockedFrameAllocator")
            .field("stats", &self.stats())
            .field("holds_off_interrupts", &self.cpus.is_some())
            .finish()
    }
}

/// The frame allocator's lock holder never waits for another CPU, so a waiter spins.
struct Hook<'a>(Option<&'a dyn Cpus>);

impl Cpu for Hook<'_> {
    fn irq_cpus(&self) -> Option<&dyn Cpus> {
        self.0
    }

    fn relax(&self) {
        core::hint::spin_loop();
    }
}

impl<'a> LockedFrameAllocator<'a> {
    /// Wraps `allocator`; its lock holds nothing off (see the type's docs).
    pub fn new(allocator: BitmapFrameAllocator<'a>) -> Self {
        Self {
            inner: IrqLock::new(allocator),
            cpus: None,
        }
    }

    /// Wraps `allocator`; its lock is taken with interrupts held off through `cpus`
    /// (a kernel's [`Cpus`], or [`OneCpu`](crate::smp::OneCpu) on one CPU).
    pub fn with_cpus(allocator: BitmapFrameAllocator<'a>, cpus: &'a dyn Cpus) -> Self {
        Self {
            inner: IrqLock::new(allocator),
            cpus: Some(cpus),
        }
    }

    /// The allocator, locked, for one call.
    fn locked<R>(&self, f: impl FnOnce(&mut BitmapFrameAllocator<'a>) -> R) -> R {
        let hook = Hook(self.cpus);
        f(&mut self.inner.lock(&hook))
    }

    /// See [`BitmapFrameAllocator::with_storage`].
    ///
    /// # Errors
    ///
    /// As [`BitmapFrameAllocator::with_storage`].
    pub fn with_storage(
        map: impl IntoIterator<Item = MemoryRegion>,
        storage: &'a mut [u64],
    ) -> Result<Self, Error> {
        BitmapFrameAllocator::with_storage(map, storage).map(Self::new)
    }

    /// Runs `f` with the lock held, for several operations in one critical section.
    pub fn with_lock<R>(&self, f: impl FnOnce(&mut BitmapFrameAllocator<'a>) -> R) -> R {
        self.locked(f)
    }

    /// Gives back the allocator.
    pub fn into_inner(self) -> BitmapFrameAllocator<'a> {
        self.inner.into_inner()
    }

    /// See [`BitmapFrameAllocator::alloc`].
    pub fn alloc(&self) -> Option<PhysFrame> {
        self.locked(|bitmap| bitmap.alloc())
    }

    /// See [`BitmapFrameAllocator::alloc_from`].
    pub fn alloc_from(&self, hint: PhysFrame) -> Option<PhysFrame> {
        self.locked(|bitmap| bitmap.alloc_from(hint))
    }

    /// See [`BitmapFrameAllocator::alloc_bulk`].
    pub fn alloc_bulk(&self, out: &mut [PhysFrame]) -> usize {
        self.locked(|bitmap| bitmap.alloc_bulk(out))
    }

    /// See [`BitmapFrameAllocator::alloc_contiguous`].
    ///
    /// # Errors
    ///
    /// As [`BitmapFrameAllocator::alloc_contiguous`].
    pub fn alloc_contiguous(&self, count: u64, align_frames: u64) -> Result<PhysFrame, Error> {
        self.locked(|bitmap| bitmap.alloc_contiguous(count, align_frames))
    }

    /// See [`BitmapFrameAllocator::free`].
    ///
    /// # Errors
    ///
    /// As [`BitmapFrameAllocator::free`].
    pub fn free(&self, frame: PhysFrame) -> Result<(), Error> {
        self.locked(|bitmap| bitmap.free(frame))
    }

    /// See [`BitmapFrameAllocator::free_bulk`].
    ///
    /// # Errors
    ///
    /// As [`BitmapFrameAllocator::free_bulk`].
    pub fn free_bulk(&self, frames: &[PhysFrame]) -> Result<(), Error> {
        self.locked(|bitmap| bitmap.free_bulk(frames))
    }

    /// See [`BitmapFrameAllocator::is_free`].
    ///
    /// # Errors
    ///
    /// As [`BitmapFrameAllocator::is_free`].
    pub fn is_free(&self, frame: PhysFrame) -> Result<bool, Error> {
        self.locked(|bitmap| bitmap.is_free(frame))
    }

    /// See [`BitmapFrameAllocator::manages`].
    pub fn manages(&self, first: PhysFrame, count: u64) -> bool {
        self.locked(|bitmap| bitmap.manages(first, count))
    }

    /// See [`BitmapFrameAllocator::reclaim`].
    pub fn reclaim(&self, from: Reclaim) -> u64 {
        self.locked(|bitmap| bitmap.reclaim(from))
    }

    /// See [`BitmapFrameAllocator::reclaim_range`].
    ///
    /// # Errors
    ///
    /// As [`BitmapFrameAllocator::reclaim_range`].
    pub fn reclaim_range(&self, range: core::ops::Range<PhysAddr>) -> Result<u64, Error> {
        self.locked(|bitmap| bitmap.reclaim_range(range))
    }

    /// See [`BitmapFrameAllocator::stats`].
    pub fn stats(&self) -> FrameStats {
        self.locked(|bitmap| bitmap.stats())
    }
}

// SAFETY: the bitmap allocator hands out each managed frame once until it is freed,
// takes back exactly the frames it handed out, frees in bulk all-or-nothing, and
// knows which frames it manages.
unsafe impl FrameSource for LockedFrameAllocator<'_> {
    fn alloc_frame(&self) -> Option<PhysFrame> {
        self.alloc()
    }
    fn alloc_frames(&self, out: &mut [PhysFrame]) -> usize {
        self.alloc_bulk(out)
    }
    fn alloc_frame_2m(&self) -> Option<PhysFrame<Size2MiB>> {
        let frames = Size2MiB::SIZE / Size4KiB::SIZE;
        let first = self.alloc_contiguous(frames, frames).ok()?;
        PhysFrame::from_start_address(first.start_address()).ok()
    }
    fn free_frame(&self, frame: PhysFrame) -> Result<(), Error> {
        self.free(frame)
    }
    fn free_frames(&self, frames: &[PhysFrame]) -> Result<(), Error> {
        self.free_bulk(frames)
    }
    fn manages(&self, first: PhysFrame, count: u64) -> bool {
        LockedFrameAllocator::manages(self, first, count)
    }
}
