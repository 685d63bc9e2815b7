//! A static the single-CPU kernel mutates through raw pointers.

use core::cell::UnsafeCell;

/// Interior-mutable storage for a `static` (page tables, stacks, buffers).
///
/// The kernel runs on one CPU with interrupts off, so the only concurrency is an
/// exception handler interrupting the code it runs on; every user documents why its
/// accesses cannot overlap.
#[repr(transparent)]
pub struct StaticCell<T>(UnsafeCell<T>);

// SAFETY: one CPU, interrupts disabled; users uphold exclusivity per access (see above).
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
