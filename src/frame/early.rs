//! Frames for a kernel that has no frame allocator yet (Linux's `memblock_alloc`).

use super::MemoryRegion;
use super::map::{NormalMap, Span};
use super::zone::frame_at;
use crate::{Error, PAGE_SIZE};
use core::iter::{Chain, Once};
use x86_64::structures::paging::{FrameAllocator, PhysFrame, Size4KiB};

/// Frames taken from the top of a memory map before any allocator exists: for the
/// few page tables a kernel must build before it can reach its memory (a
/// [`RecursivePhysMemory`](crate::phys::RecursivePhysMemory)'s window, say).
///
/// It hands out frames downwards from the top of the highest usable run that
/// nothing reserves or will reclaim, as an `x86_64` [`FrameAllocator`].
/// [`map`](Self::map) is the map it was made from with the frames taken so far
/// reserved: build the real allocator from that, and it never hands them out again.
///
/// ```
/// use vmalloc::frame::{BitmapFrameAllocator, EarlyFrames, MemoryRegion};
/// use x86_64::structures::paging::FrameAllocator;
///
/// let map = [MemoryRegion::usable(0, 1 << 20), MemoryRegion::reserved(0xff000, 1 << 20)];
/// let mut early = EarlyFrames::new(map.iter().cloned())?;
/// let table = early.allocate_frame().unwrap();
/// assert_eq!(table.start_address().as_u64(), 0xfe000);
/// let map = early.map();
/// let mut storage = vec![0; BitmapFrameAllocator::storage_words(map.clone())];
/// let mut frames = BitmapFrameAllocator::with_storage(map, &mut storage)?;
/// assert_eq!(frames.is_free(table), Err(vmalloc::Error::FrameNotManaged));
/// # Ok::<(), vmalloc::Error>(())
/// ```
///
/// Not `Clone` (a copy would hand out the same frames again), and [`map`](Self::map)
/// takes it, so no frame is handed out after the map that reserves them is made:
///
/// ```compile_fail,E0382
/// use vmalloc::frame::{EarlyFrames, MemoryRegion};
/// use x86_64::structures::paging::FrameAllocator;
///
/// let map = [MemoryRegion::usable(0, 1 << 20)];
/// let mut early = EarlyFrames::new(map.iter().cloned()).unwrap();
/// let reserved = early.map();
/// let _ = early.allocate_frame();
/// ```
#[derive(Debug)]
pub struct EarlyFrames<I> {
    map: I,
    /// The run frames are taken from; `[next, run.end)` is taken.
    run: Span,
    next: u64,
}

impl<I: Iterator<Item = MemoryRegion> + Clone> EarlyFrames<I> {
    /// Frames from the top of `map`.
    ///
    /// # Errors
    ///
    /// [`Error::BadMemoryMap`] as for
    /// [`BitmapFrameAllocator::with_storage`](super::BitmapFrameAllocator::with_storage),
    /// or when no usable frame is free of reserved and reclaimable ranges.
    pub fn new(map: I) -> Result<Self, Error> {
        let run = NormalMap::new(map.clone())?
            .highest_free_run()
            .ok_or(Error::BadMemoryMap)?;
        Ok(Self {
            map,
            run,
            next: run.end,
        })
    }

    /// The frames taken so far, as one reserved range (empty before the first).
    pub fn taken(&self) -> MemoryRegion {
        MemoryRegion::reserved(self.next * PAGE_SIZE, self.run.end * PAGE_SIZE)
    }

    /// The map, followed by [`taken`](Self::taken): what to build the frame
    /// allocator from. It takes the `EarlyFrames`, so no frame is handed out that
    /// the map does not reserve (clone the map to read it twice).
    pub fn map(self) -> Chain<I, Once<MemoryRegion>> {
        self.map.clone().chain(core::iter::once(self.taken()))
    }
}

// SAFETY: each frame handed out is usable RAM that the map neither reserves nor
// marks reclaimable, below every frame handed out before, so never handed out twice;
// `map` reserves all of them for whoever builds on it.
unsafe impl<I> FrameAllocator<Size4KiB> for EarlyFrames<I> {
    fn allocate_frame(&mut self) -> Option<PhysFrame> {
        if self.next <= self.run.start {
            return None;
        }
        self.next -= 1;
        Some(frame_at(self.next))
    }
}
