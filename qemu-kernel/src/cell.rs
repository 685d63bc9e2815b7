//! A static the kernel mutates through raw pointers.

use core::cell::UnsafeCell;

/// Interior-mutable storage for a `static` (page tables, stacks, buffers).
///
/// Each user documents why its accesses cannot overlap: boot-time tables and buffers
/// are written before the other CPUs start, and stacks belong to one CPU each.
#[repr(transparent)]
pub struct StaticCell<T>(UnsafeCell<T>);

// SAFETY: users uphold exclusivity per access (see above).
unsafe impl<T> Sync for StaticCell<T> {}

impl<T> StaticCell<T> {
    /// Wraps `value`.
    pub const fn new(value: T) -> Self {
        Self(UnsafeCell::new(value))
    }

    /// Raw pointer to the contents.
    pub const fn get(&self) -> *mut T {
        self.0.get()
    }
}

/// Page-aligned storage, for page tables, stacks and test frames.
#[repr(C, align(4096))]
pub struct PageAligned<T>(pub T);
