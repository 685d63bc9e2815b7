//! Physical frame allocation.
//!
//! [`BitmapFrameAllocator`] manages the usable frames of a firmware memory map with
//! a hierarchical bitmap per zone (see [`bitmap`] for the structure), and takes the
//! map's reclaimable memory once the kernel is done with it
//! ([`reclaim`](BitmapFrameAllocator::reclaim));
//! [`LockedFrameAllocator`] shares it between CPUs as a [`FrameSource`], with a list
//! of free frames per CPU in front of it once it knows the CPUs (see [`percpu`]);
//! [`EarlyFrames`] hands out frames before there is an allocator, reserving them in
//! the map it gives on; [`FaultInjector`] makes a chosen allocation fail, to test
//! rollback paths.

pub mod bitmap;
mod early;
mod fault;
mod handed;
mod locked;
mod map;
pub mod percpu;
#[cfg(test)]
mod test;
#[cfg(test)]
mod test_map;
#[cfg(test)]
mod test_percpu;
#[cfg(test)]
mod test_reclaim;
mod zone;

pub use bitmap::{BitmapFrameAllocator, FrameStats};
pub use early::EarlyFrames;
pub use fault::FaultInjector;
pub use locked::LockedFrameAllocator;
pub use percpu::{CPU_LIST_BATCH, CPU_LIST_FRAMES};

use crate::Error;
use core::ops::Range;
use x86_64::PhysAddr;
use x86_64::structures::paging::{FrameAllocator, FrameDeallocator, PhysFrame, Size2MiB, Size4KiB};

/// What a firmware memory map says about one physical range.
///
/// Where entries of different kinds overlap, the allocator lets the more
/// restrictive one win: `Reserved` over `Reclaimable` over `Usable`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RegionKind {
    /// RAM the kernel may hand out.
    Usable,
    /// RAM in use now, free once the kernel is done with what it holds: an
    /// allocator built from the map leaves it alone until
    /// [`reclaim`](BitmapFrameAllocator::reclaim) hands it over.
    Reclaimable(Reclaim),
    /// Anything else: firmware, MMIO, the kernel image, boot structures.
    Reserved,
}

/// What a [`RegionKind::Reclaimable`] range holds until the kernel reclaims it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Reclaim {
    /// The boot loader's own data: the boot information, its memory map, and
    /// possibly the page tables and stack the kernel starts on (Limine's
    /// `BOOTLOADER_RECLAIMABLE`, the multiboot2 information structure). Reclaim it
    /// once nothing reads those and the kernel runs on its own tables and stack.
    Bootloader,
    /// ACPI tables (E820 type 3, UEFI `ACPI_RECLAIM`): reclaim them once parsed.
    Acpi,
    /// UEFI boot-services code and data: free once boot services are exited.
    BootServices,
}

impl Reclaim {
    /// Every source, in the order of their codes.
    pub(crate) const ALL: [Reclaim; 3] =
        [Reclaim::Bootloader, Reclaim::Acpi, Reclaim::BootServices];

    /// A small number naming the source, for the allocator's bookkeeping.
    pub(crate) fn code(self) -> u64 {
        match self {
            Reclaim::Bootloader => 0,
            Reclaim::Acpi => 1,
            Reclaim::BootServices => 2,
        }
    }
}

/// One entry of a firmware memory map (E820, multiboot, UEFI, `bootloader`).
///
/// Frame 0 is never handed out, whatever the map says: under an identity map (a
/// UEFI kernel's, an [`OffsetPhysMemory`](crate::OffsetPhysMemory) at offset 0) its
/// address is the null pointer, which Rust code may not write through. Linux
/// reserves it on x86 too (the BIOS data area lives there).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryRegion {
    /// Physical byte range, end exclusive; need not be page-aligned.
    pub range: Range<PhysAddr>,
    /// Whether the range may be handed out, now or once reclaimed.
    pub kind: RegionKind,
}

/// A shared source of 4 KiB physical frames.
///
/// Everything above the frame allocator (the page-table cursor, the vmalloc manager,
/// the heap) takes frames through this trait, with `&self` so one allocator can be
/// shared between CPUs behind its own lock.
///
/// # Safety
///
/// The library writes page tables and data into the frames it is given and maps them
/// into the kernel's address space, so an implementation promises:
///
/// - every frame handed out is RAM that nobody else uses (not the kernel image, not a
///   page table, not MMIO) until it comes back through `free_frame`/`free_frames`,
///   and is not handed out again before that;
/// - a run from [`alloc_frame_2m`](Self::alloc_frame_2m) is 512 such frames, all of
///   them: the library maps the run with one 2 MiB entry;
/// - it takes back, with `Ok`, every frame it handed out that is not back yet, and
///   `free_frames` frees all of its frames or none;
/// - [`manages`](Self::manages) does not answer `false` for a frame it may hand out.
///
/// Giving a frame back is `unsafe` for the caller: the source hands it out again, so
/// a frame still mapped somewhere (a live area's, found with `vmalloc_to_frame`)
/// would end up with two owners. Safe code cannot do it:
///
/// ```compile_fail,E0133
/// use vmalloc::FrameSource;
/// use x86_64::structures::paging::PhysFrame;
///
/// fn give_back(frames: &impl FrameSource, frame: PhysFrame) {
///     let _ = frames.free_frame(frame);
/// }
/// ```
pub unsafe trait FrameSource {
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

    /// 512 physically contiguous frames starting on a 2 MiB boundary, for one 2 MiB
    /// mapping, or `None`. They come back as 512 single frames, through
    /// [`free_frame`](Self::free_frame) or [`free_frames`](Self::free_frames). The
    /// default finds none, so a source that cannot look for runs maps 4 KiB pages.
    fn alloc_frame_2m(&self) -> Option<PhysFrame<Size2MiB>> {
        None
    }

    /// Returns one frame.
    ///
    /// # Errors
    ///
    /// [`Error::FrameNotManaged`] or [`Error::FrameNotAllocated`]; nothing changes.
    ///
    /// # Safety
    ///
    /// Nothing uses or maps `frame` any more: the source hands it out again, and its
    /// next owner writes it. A frame the source holds already (a double free) or does
    /// not manage is refused with an error, which is safe; a free of a frame handed
    /// out again since, to another owner, cannot be told from that owner's.
    unsafe fn free_frame(&self, frame: PhysFrame<Size4KiB>) -> Result<(), Error>;

    /// Returns every frame of `frames`, or none of them on error.
    ///
    /// # Errors
    ///
    /// As [`free_frame`](Self::free_frame), for the first bad frame (including a
    /// frame listed twice); nothing changes.
    ///
    /// # Safety
    ///
    /// As [`free_frame`](Self::free_frame), for every frame of `frames`.
    unsafe fn free_frames(&self, frames: &[PhysFrame<Size4KiB>]) -> Result<(), Error>;

    /// Whether any of the `count` frames from `first` on is RAM this source may hand
    /// out (Linux refuses to `ioremap` such memory). The default says `true` for
    /// everything: a source that cannot tell lets no `ioremap` through.
    fn manages(&self, first: PhysFrame<Size4KiB>, count: u64) -> bool {
        let _ = (first, count);
        true
    }
}

// SAFETY: a shared reference forwards to an implementation that upholds the contract.
unsafe impl<S: FrameSource + ?Sized> FrameSource for &S {
    fn alloc_frame(&self) -> Option<PhysFrame<Size4KiB>> {
        (**self).alloc_frame()
    }
    fn alloc_frames(&self, out: &mut [PhysFrame<Size4KiB>]) -> usize {
        (**self).alloc_frames(out)
    }
    fn alloc_frame_2m(&self) -> Option<PhysFrame<Size2MiB>> {
        (**self).alloc_frame_2m()
    }
    unsafe fn free_frame(&self, frame: PhysFrame<Size4KiB>) -> Result<(), Error> {
        // SAFETY: forwarded from the caller.
        unsafe { (**self).free_frame(frame) }
    }
    unsafe fn free_frames(&self, frames: &[PhysFrame<Size4KiB>]) -> Result<(), Error> {
        // SAFETY: forwarded from the caller.
        unsafe { (**self).free_frames(frames) }
    }
    fn manages(&self, first: PhysFrame<Size4KiB>, count: u64) -> bool {
        (**self).manages(first, count)
    }
}

/// Any [`FrameSource`] as the `x86_64` crate's `FrameAllocator` and
/// `FrameDeallocator`, so its mappers (`OffsetPageTable`, ...) can take page-table
/// frames from the same allocator as this library.
///
/// A free the source refuses (a frame it never handed out) is dropped, as
/// `FrameDeallocator` cannot report it.
#[derive(Debug, Clone, Copy)]
pub struct MapperFrames<S>(pub S);

// SAFETY: `FrameSource`'s contract is the same promise: unique, unused frames.
unsafe impl<S: FrameSource> FrameAllocator<Size4KiB> for MapperFrames<S> {
    fn allocate_frame(&mut self) -> Option<PhysFrame<Size4KiB>> {
        self.0.alloc_frame()
    }
}

impl<S: FrameSource> FrameDeallocator<Size4KiB> for MapperFrames<S> {
    unsafe fn deallocate_frame(&mut self, frame: PhysFrame<Size4KiB>) {
        // A refused free left the source unchanged; there is no way to report it.
        // SAFETY: `deallocate_frame`'s contract: the frame is unused.
        let _ = unsafe { self.0.free_frame(frame) };
    }
}

/// Convenience for building memory maps in tests and examples. Addresses are cut off
/// at the last byte of the 52-bit physical space (a `PhysAddr` cannot hold 2^52), as
/// the [boot-protocol adapters](crate::boot) cut theirs; a range wholly above it is
/// empty.
impl MemoryRegion {
    /// A usable range `[start, end)`.
    pub fn usable(start: u64, end: u64) -> Self {
        Self::of(start, end, RegionKind::Usable)
    }
    /// A reserved range `[start, end)`.
    pub fn reserved(start: u64, end: u64) -> Self {
        Self::of(start, end, RegionKind::Reserved)
    }
    /// A range `[start, end)` that is in use until reclaimed.
    pub fn reclaimable(start: u64, end: u64, from: Reclaim) -> Self {
        Self::of(start, end, RegionKind::Reclaimable(from))
    }

    fn of(start: u64, end: u64, kind: RegionKind) -> Self {
        let last = crate::boot::PHYS_LIMIT - 1;
        Self {
            range: PhysAddr::new_truncate(start.min(last))..PhysAddr::new_truncate(end.min(last)),
            kind,
        }
    }
}
