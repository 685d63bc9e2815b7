//! Owners that free or unmap on drop, named after Rust-for-Linux's `kernel::alloc`
//! and `kernel::io`: the safe face of the manager. Each holds the only pointer to its
//! area, so the area cannot be freed while the owner lives, nor used after it died.

//! See [the safe and the raw calls](super#owners-and-raw-pointers).

use super::ops::VmallocOps;
use super::options::{CacheMode, Prot, VmFlags, VmOptions};
use crate::{Error, PAGE_SIZE};
use core::marker::PhantomData;
use core::mem::{align_of, size_of};
use core::ops::{Deref, DerefMut};
use core::ptr::NonNull;
use x86_64::PhysAddr;
use x86_64::structures::paging::PhysFrame;

/// A byte buffer in vmalloc memory, freed on drop.
pub struct VBuffer<'a> {
    ptr: NonNull<u8>,
    len: usize,
    vmalloc: &'a dyn VmallocOps,
}

impl<'a> VBuffer<'a> {
    /// `len` zeroed bytes (a `&[u8]` may not show whatever the frames held before:
    /// reading uninitialised memory as `u8` is undefined behaviour).
    ///
    /// # Errors
    ///
    /// As [`Vmalloc::vzalloc`](super::Vmalloc::vzalloc).
    #[track_caller]
    pub fn new(vmalloc: &'a dyn VmallocOps, len: usize) -> Result<Self, Error> {
        let options = VmOptions {
            flags: VmFlags::ZERO,
            ..VmOptions::default()
        };
        let ptr = vmalloc.vmalloc_with(len, &options)?;
        Ok(Self { ptr, len, vmalloc })
    }

    /// Resizes to `new_len` bytes with [`vrealloc`](super::Vmalloc::vrealloc),
    /// keeping the contents up to the smaller length; bytes added are zero (the area
    /// is a zeroed one). The buffer may move.
    ///
    /// # Errors
    ///
    /// As `vrealloc`; the buffer is unchanged on error.
    pub fn resize(&mut self, new_len: usize) -> Result<(), Error> {
        // SAFETY: the buffer owns its area, and `&mut self` means no reference into
        // it is alive; the pointer is replaced by the one returned.
        self.ptr = unsafe { self.vmalloc.vrealloc(self.ptr.as_ptr(), new_len) }?;
        self.len = new_len;
        Ok(())
    }

    /// The start of the buffer. Freeing it (`vfree`, an `unsafe fn`) while the
    /// buffer lives breaks `vfree`'s contract: the buffer frees it on drop.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Deref for VBuffer<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: the area holds `len` mapped, initialised (zeroed, then written only
        // through `self`) bytes for as long as `self` lives (`VmallocOps`' contract),
        // and only `self` hands out references to it.
        unsafe { core::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for VBuffer<'_> {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` makes this the only reference.
        unsafe { core::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for VBuffer<'_> {
    fn drop(&mut self) {
        // SAFETY: the buffer owns its area and nothing uses it after the drop.
        let freed = unsafe { self.vmalloc.vfree(self.ptr.as_ptr()) };
        debug_assert_eq!(freed, Ok(()), "a VBuffer owns its area");
    }
}

// SAFETY: the buffer owns its bytes exclusively; `VmallocOps: Sync` makes the
// manager reference usable from any thread.
unsafe impl Send for VBuffer<'_> {}
// SAFETY: shared access only reads the bytes.
unsafe impl Sync for VBuffer<'_> {}

/// A `T` in its own vmalloc area, dropped and freed together.
pub struct VBox<'a, T> {
    ptr: NonNull<T>,
    vmalloc: &'a dyn VmallocOps,
    _owns: PhantomData<T>,
}

impl<'a, T> VBox<'a, T> {
    /// Moves `value` into a fresh area aligned for `T`.
    ///
    /// # Errors
    ///
    /// As [`Vmalloc::vmalloc_with`](super::Vmalloc::vmalloc_with); `value` is dropped.
    #[track_caller]
    pub fn new(vmalloc: &'a dyn VmallocOps, value: T) -> Result<Self, Error> {
        let options = VmOptions {
            align: (align_of::<T>() as u64).max(PAGE_SIZE),
            ..VmOptions::default()
        };
        let ptr = vmalloc
            .vmalloc_with(size_of::<T>().max(1), &options)?
            .cast::<T>();
        // SAFETY: the area is fresh, mapped read-write, large enough and aligned for T
        // (`VmallocOps`' contract).
        unsafe { ptr.as_ptr().write(value) };
        Ok(Self {
            ptr,
            vmalloc,
            _owns: PhantomData,
        })
    }
}

impl<T> Deref for VBox<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: `new` wrote a valid T that lives until drop.
        unsafe { self.ptr.as_ref() }
    }
}

impl<T> DerefMut for VBox<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as in `deref`; `&mut self` makes this the only reference.
        unsafe { self.ptr.as_mut() }
    }
}

impl<T> Drop for VBox<'_, T> {
    fn drop(&mut self) {
        /// Frees the area when dropped: after the value's `drop`, or while it
        /// unwinds, as `Box<T>` does.
        struct FreeArea<'b> {
            vmalloc: &'b dyn VmallocOps,
            ptr: *mut u8,
        }
        impl Drop for FreeArea<'_> {
            fn drop(&mut self) {
                // SAFETY: the box owns its area, and its value is dropped (or
                // dropping it unwound): nothing uses it.
                let freed = unsafe { self.vmalloc.vfree(self.ptr) };
                debug_assert_eq!(freed, Ok(()), "a VBox owns its area");
            }
        }
        let _free = FreeArea {
            vmalloc: self.vmalloc,
            ptr: self.ptr.as_ptr().cast(),
        };
        // SAFETY: the T is valid and is never used again.
        unsafe { self.ptr.as_ptr().drop_in_place() };
    }
}

// SAFETY: a `VBox<T>` owns its `T` like a `Box<T>` does.
unsafe impl<T: Send> Send for VBox<'_, T> {}
// SAFETY: as `Box<T>`.
unsafe impl<T: Sync> Sync for VBox<'_, T> {}

/// Frames the caller owns, mapped at one contiguous range by
/// [`vmap`](super::Vmalloc::vmap) and unmapped (with the TLB flush) on drop: the
/// frames stay the caller's throughout.
pub struct VMapping<'a> {
    ptr: NonNull<u8>,
    pages: usize,
    vmalloc: &'a dyn VmallocOps,
}

impl<'a> VMapping<'a> {
    /// Maps `frames` with `prot` ([`Vmalloc::vmap`](super::Vmalloc::vmap)).
    ///
    /// # Errors
    ///
    /// As `vmap`.
    ///
    /// # Safety
    ///
    /// As `vmap`: every frame is the caller's to map with `prot` until the mapping
    /// is dropped.
    #[track_caller]
    pub unsafe fn new(
        vmalloc: &'a dyn VmallocOps,
        frames: &[PhysFrame],
        prot: Prot,
    ) -> Result<Self, Error> {
        // SAFETY: forwarded from the caller.
        let ptr = unsafe { vmalloc.vmap(frames, prot) }?;
        Ok(Self {
            ptr,
            pages: frames.len(),
            vmalloc,
        })
    }

    /// The start of the mapping.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Bytes mapped.
    pub fn len(&self) -> usize {
        self.pages * PAGE_SIZE as usize
    }

    /// Whether nothing is mapped (never: `vmap` refuses no frames).
    pub fn is_empty(&self) -> bool {
        self.pages == 0
    }

    /// Unmaps, flushes, and hands each frame to `on_frame` in order
    /// ([`Vmalloc::vunmap`](super::Vmalloc::vunmap)).
    pub fn unmap(self, mut on_frame: impl FnMut(PhysFrame)) {
        let this = core::mem::ManuallyDrop::new(self);
        // SAFETY: the mapping owns its area and is consumed here.
        let unmapped = unsafe { this.vmalloc.vunmap(this.as_ptr(), &mut on_frame) };
        debug_assert_eq!(unmapped, Ok(()), "a VMapping owns its area");
    }
}

impl Drop for VMapping<'_> {
    fn drop(&mut self) {
        // SAFETY: the mapping owns its area and nothing uses it after the drop.
        let unmapped = unsafe { self.vmalloc.vunmap(self.as_ptr(), &mut |_| {}) };
        debug_assert_eq!(unmapped, Ok(()), "a VMapping owns its area");
    }
}

// SAFETY: the mapping is a range of the caller's frames it owns exclusively.
unsafe impl Send for VMapping<'_> {}
// SAFETY: shared access hands out only the pointer.
unsafe impl Sync for VMapping<'_> {}

/// A value a device register holds: what [`IoMapping::read`] and
/// [`IoMapping::write`] move with one volatile access.
pub trait IoValue: Copy + sealed::Sealed {}
impl IoValue for u8 {}
impl IoValue for u16 {}
impl IoValue for u32 {}
impl IoValue for u64 {}

mod sealed {
    pub trait Sealed {}
    impl Sealed for u8 {}
    impl Sealed for u16 {}
    impl Sealed for u32 {}
    impl Sealed for u64 {}
}

/// A physical MMIO range mapped by [`ioremap`](super::Vmalloc::ioremap), with
/// bounds-checked volatile access, unmapped on drop (Rust-for-Linux's `IoMem`).
pub struct IoMapping<'a> {
    ptr: NonNull<u8>,
    len: usize,
    vmalloc: &'a dyn VmallocOps,
}

impl<'a> IoMapping<'a> {
    /// Maps `phys..phys + size` with `cache` ([`Vmalloc::ioremap`](super::Vmalloc::ioremap)).
    ///
    /// # Errors
    ///
    /// As `ioremap`.
    ///
    /// # Safety
    ///
    /// As `ioremap`: the range is the caller's to map with `cache`, and any access
    /// through the mapping is one its device allows.
    #[track_caller]
    pub unsafe fn new(
        vmalloc: &'a dyn VmallocOps,
        phys: PhysAddr,
        size: usize,
        cache: CacheMode,
    ) -> Result<Self, Error> {
        // SAFETY: forwarded from the caller.
        let ptr = unsafe { vmalloc.ioremap(phys, size, cache) }?;
        Ok(Self {
            ptr,
            len: size,
            vmalloc,
        })
    }

    /// The mapping of `phys` (it keeps `phys`'s offset into its page).
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Bytes mapped.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is mapped (never: `ioremap` refuses a size of zero).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The value at `offset`, read with one volatile access.
    ///
    /// # Errors
    ///
    /// [`Error::SizeTooLarge`] if it does not lie within the mapping,
    /// [`Error::Unaligned`] if the register's address is not aligned to the value's
    /// size: the mapping's start keeps the physical address's offset in its page, so
    /// for a `phys` that is not itself aligned, an aligned `offset` is not enough.
    pub fn read<V: IoValue>(&self, offset: usize) -> Result<V, Error> {
        let at = self.at::<V>(offset)?;
        // SAFETY: inside the mapping, aligned; `new`'s caller vouched for accesses.
        Ok(unsafe { at.read_volatile() })
    }

    /// Writes `value` at `offset` with one volatile access.
    ///
    /// # Errors
    ///
    /// As [`read`](Self::read).
    pub fn write<V: IoValue>(&self, offset: usize, value: V) -> Result<(), Error> {
        let at = self.at::<V>(offset)?;
        // SAFETY: as in `read`.
        unsafe { at.write_volatile(value) };
        Ok(())
    }

    fn at<V: IoValue>(&self, offset: usize) -> Result<*mut V, Error> {
        let end = offset
            .checked_add(size_of::<V>())
            .ok_or(Error::SizeTooLarge)?;
        if end > self.len {
            return Err(Error::SizeTooLarge);
        }
        let at = self.ptr.as_ptr().wrapping_add(offset);
        if !(at as usize).is_multiple_of(align_of::<V>()) {
            return Err(Error::Unaligned);
        }
        Ok(at.cast())
    }
}

impl Drop for IoMapping<'_> {
    fn drop(&mut self) {
        // SAFETY: the mapping owns its area and nothing uses it after the drop.
        let unmapped = unsafe { self.vmalloc.iounmap(self.as_ptr()) };
        debug_assert_eq!(unmapped, Ok(()), "an IoMapping owns its area");
    }
}

// SAFETY: the mapping owns its range; access is volatile and bounds-checked.
unsafe impl Send for IoMapping<'_> {}
// SAFETY: as above; concurrent register access is the device's business, as with
// any MMIO.
unsafe impl Sync for IoMapping<'_> {}
