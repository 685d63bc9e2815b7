//! Owners that `vfree` on drop, named after Rust-for-Linux's `kernel::alloc`.

use super::ops::VmallocOps;
use super::options::{VmFlags, VmOptions};
use crate::{Error, PAGE_SIZE};
use core::marker::PhantomData;
use core::mem::{align_of, size_of};
use core::ops::{Deref, DerefMut};
use core::ptr::NonNull;

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
        self.ptr = self.vmalloc.vrealloc(self.ptr.as_ptr(), new_len)?;
        self.len = new_len;
        Ok(())
    }

    /// The start of the buffer.
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
        let freed = self.vmalloc.vfree(self.ptr.as_ptr());
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
        // SAFETY: the T is valid and is never used again.
        unsafe { self.ptr.as_ptr().drop_in_place() };
        let freed = self.vmalloc.vfree(self.ptr.as_ptr().cast());
        debug_assert_eq!(freed, Ok(()), "a VBox owns its area");
    }
}

// SAFETY: a `VBox<T>` owns its `T` like a `Box<T>` does.
unsafe impl<T: Send> Send for VBox<'_, T> {}
// SAFETY: as `Box<T>`.
unsafe impl<T: Sync> Sync for VBox<'_, T> {}
