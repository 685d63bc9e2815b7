//! A [`BitmapFrameAllocator`] behind a spin lock, shared through `&self`.

use super::bitmap::{BitmapFrameAllocator, FrameStats};
use super::{FrameSource, MemoryRegion};
use crate::Error;
use x86_64::structures::paging::{PageSize, PhysFrame, Size2MiB, Size4KiB};

/// A [`BitmapFrameAllocator`] behind a [`spin::Mutex`], usable from several CPUs.
///
/// Every method takes the lock once per call, bulk ones included.
#[derive(Debug)]
pub struct LockedFrameAllocator<'a> {
    inner: spin::Mutex<BitmapFrameAllocator<'a>>,
}

impl<'a> LockedFrameAllocator<'a> {
    /// Wraps `allocator`.
    pub fn new(allocator: BitmapFrameAllocator<'a>) -> Self {
        Self {
            inner: spin::Mutex::new(allocator),
        }
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
        f(&mut self.inner.lock())
    }

    /// Gives back the allocator.
    pub fn into_inner(self) -> BitmapFrameAllocator<'a> {
        self.inner.into_inner()
    }

    /// See [`BitmapFrameAllocator::alloc`].
    pub fn alloc(&self) -> Option<PhysFrame> {
        self.inner.lock().alloc()
    }

    /// See [`BitmapFrameAllocator::alloc_from`].
    pub fn alloc_from(&self, hint: PhysFrame) -> Option<PhysFrame> {
        self.inner.lock().alloc_from(hint)
    }

    /// See [`BitmapFrameAllocator::alloc_bulk`].
    pub fn alloc_bulk(&self, out: &mut [PhysFrame]) -> usize {
        self.inner.lock().alloc_bulk(out)
    }

    /// See [`BitmapFrameAllocator::alloc_contiguous`].
    ///
    /// # Errors
    ///
    /// As [`BitmapFrameAllocator::alloc_contiguous`].
    pub fn alloc_contiguous(&self, count: u64, align_frames: u64) -> Result<PhysFrame, Error> {
        self.inner.lock().alloc_contiguous(count, align_frames)
    }

    /// See [`BitmapFrameAllocator::free`].
    ///
    /// # Errors
    ///
    /// As [`BitmapFrameAllocator::free`].
    pub fn free(&self, frame: PhysFrame) -> Result<(), Error> {
        self.inner.lock().free(frame)
    }

    /// See [`BitmapFrameAllocator::free_bulk`].
    ///
    /// # Errors
    ///
    /// As [`BitmapFrameAllocator::free_bulk`].
    pub fn free_bulk(&self, frames: &[PhysFrame]) -> Result<(), Error> {
        self.inner.lock().free_bulk(frames)
    }

    /// See [`BitmapFrameAllocator::is_free`].
    ///
    /// # Errors
    ///
    /// As [`BitmapFrameAllocator::is_free`].
    pub fn is_free(&self, frame: PhysFrame) -> Result<bool, Error> {
        self.inner.lock().is_free(frame)
    }

    /// See [`BitmapFrameAllocator::manages`].
    pub fn manages(&self, first: PhysFrame, count: u64) -> bool {
        self.inner.lock().manages(first, count)
    }

    /// See [`BitmapFrameAllocator::stats`].
    pub fn stats(&self) -> FrameStats {
        self.inner.lock().stats()
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
