//! The object-safe face of the manager that owners and the kernel heap hold.

use super::manager::Vmalloc;
use super::options::VmOptions;
use crate::{Error, FrameSource, PhysMemory, TlbFlush};
use core::ptr::NonNull;

/// The allocation calls the owners and the kernel heap need from a
/// [`Vmalloc`], object-safe so they can hold a `&dyn VmallocOps`
/// whatever the manager's frame allocator, memory access and flush policy.
///
/// # Safety
///
/// The owners ([`VBox`](super::VBox), [`VBuffer`](super::VBuffer)) and the kernel heap write through the pointers
/// these calls return, so an implementation promises, as [`Vmalloc`]
/// does:
///
/// - `vmalloc_with` returns the start of `size` bytes (rounded up to pages), aligned to
///   `options.align` (at least a page), mapped readable and writable when
///   `options.prot` has `WRITE`, zeroed when `options.flags` has `ZERO`, and used by
///   nothing else until `vfree` (or a moving `vrealloc`) gives them up;
/// - `vrealloc` returns such a block of `new_size` bytes holding the old contents up
///   to the smaller size, and the old pointer is no longer valid unless returned;
/// - `reserve` returns a range of `size` bytes that nothing else uses, of which
///   `populate` maps (readable and writable, zeroed when asked) the first bytes it
///   reports, staying mapped until `vfree`;
/// - a call that fails leaves every block as it was.
pub unsafe trait VmallocOps: Sync {
    /// See [`Vmalloc::vmalloc_with`](super::Vmalloc::vmalloc_with).
    ///
    /// # Errors
    ///
    /// As there.
    #[track_caller]
    fn vmalloc_with(&self, size: usize, options: &VmOptions) -> Result<NonNull<u8>, Error>;

    /// See [`Vmalloc::vfree`](super::Vmalloc::vfree).
    ///
    /// # Errors
    ///
    /// As there.
    fn vfree(&self, ptr: *mut u8) -> Result<(), Error>;

    /// See [`Vmalloc::vrealloc`](super::Vmalloc::vrealloc).
    ///
    /// # Errors
    ///
    /// As there.
    fn vrealloc(&self, ptr: *mut u8, new_size: usize) -> Result<NonNull<u8>, Error>;

    /// See [`Vmalloc::reserve`](super::Vmalloc::reserve).
    ///
    /// # Errors
    ///
    /// As there.
    #[track_caller]
    fn reserve(&self, size: usize, options: &VmOptions) -> Result<NonNull<u8>, Error>;

    /// See [`Vmalloc::populate`](super::Vmalloc::populate).
    ///
    /// # Errors
    ///
    /// As there.
    fn populate(&self, ptr: *mut u8, bytes: usize) -> Result<usize, Error>;

    /// Called by a CPU spinning for a lock whose holder may be inside one of these
    /// calls, waiting for this CPU to flush: serves the flush requests sent to this
    /// CPU ([`TlbFlush::relax`]), as the manager's own lock waits do.
    fn relax(&self) {
        core::hint::spin_loop();
    }
}

// SAFETY: each method forwards to the manager, whose areas are mapped read-write (or
// as asked), aligned as asked, and exclusively the caller's until freed.
unsafe impl<F, M, T> VmallocOps for Vmalloc<F, M, T>
where
    F: FrameSource + Clone + Send + Sync,
    M: PhysMemory + Copy + Send + Sync,
    T: TlbFlush + Sync,
{
    #[track_caller]
    fn vmalloc_with(&self, size: usize, options: &VmOptions) -> Result<NonNull<u8>, Error> {
        Vmalloc::vmalloc_with(self, size, options)
    }
    fn vfree(&self, ptr: *mut u8) -> Result<(), Error> {
        Vmalloc::vfree(self, ptr)
    }
    fn vrealloc(&self, ptr: *mut u8, new_size: usize) -> Result<NonNull<u8>, Error> {
        Vmalloc::vrealloc(self, ptr, new_size)
    }
    #[track_caller]
    fn reserve(&self, size: usize, options: &VmOptions) -> Result<NonNull<u8>, Error> {
        Vmalloc::reserve(self, size, options)
    }
    fn populate(&self, ptr: *mut u8, bytes: usize) -> Result<usize, Error> {
        Vmalloc::populate(self, ptr, bytes)
    }
    fn relax(&self) {
        self.tlb.relax();
    }
}
