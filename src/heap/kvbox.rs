//! Linux's `kvmalloc` and Rust-for-Linux's `KVBox`: blocks from whichever path their
//! size picks, freed without naming it.

use super::KernelHeap;
use crate::Error;
use core::alloc::Layout;
use core::ptr::NonNull;

/// Bytes `kvmalloc` keeps before each block for its size (and the alignment it gives).
const KV_HEADER: usize = 16;

impl KernelHeap<'_> {
    /// Linux's `kvmalloc`: `size` bytes from the slabs or the list heap if they fit,
    /// else from vmalloc. Free with [`kvfree`](Self::kvfree), which needs no size.
    /// The caller's line is the block's site (the guarded pool's reports and
    /// `allocinfo`).
    #[track_caller]
    pub fn kvmalloc(&self, size: usize) -> Option<NonNull<u8>> {
        let total = size.checked_add(KV_HEADER)?;
        let layout = Layout::from_size_align(total, KV_HEADER).ok()?;
        let block = self.allocate(layout)?;
        // SAFETY: the block holds `total` bytes, the first KV_HEADER for the size.
        unsafe {
            block.as_ptr().cast::<usize>().write(total);
            Some(block.add(KV_HEADER))
        }
    }

    /// Frees what [`kvmalloc`](Self::kvmalloc) returned.
    ///
    /// # Safety
    ///
    /// `ptr` was returned by `kvmalloc` on this heap, is live, and is not used
    /// afterwards. Nothing else is checked: the size `kvmalloc` stored before `ptr`
    /// says which block to free, so any other pointer frees memory that is not its
    /// caller's.
    #[track_caller]
    pub unsafe fn kvfree(&self, ptr: NonNull<u8>) {
        // SAFETY: `kvmalloc` put the block's size KV_HEADER bytes before `ptr`.
        unsafe {
            let block = ptr.as_ptr().sub(KV_HEADER);
            let total = block.cast::<usize>().read();
            self.deallocate(block, Layout::from_size_align_unchecked(total, KV_HEADER));
        }
    }
}

/// A `T` allocated through a [`KernelHeap`] (small heap or vmalloc, by size), dropped
/// and freed together: Rust-for-Linux's `KVBox`.
pub struct KVBox<'h, T> {
    ptr: NonNull<T>,
    heap: &'h dyn Deallocate,
}

/// What a [`KVBox`] needs of its heap once it exists, so the box need not name the
/// heap's own lifetime.
trait Deallocate: Sync {
    /// # Safety
    ///
    /// As [`KernelHeap::deallocate`].
    unsafe fn deallocate(&self, ptr: *mut u8, layout: Layout);
}

impl Deallocate for KernelHeap<'_> {
    unsafe fn deallocate(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded from the caller.
        unsafe { KernelHeap::deallocate(self, ptr, layout) }
    }
}

impl<'h, T> KVBox<'h, T> {
    /// Moves `value` onto `heap`.
    ///
    /// # Errors
    ///
    /// [`Error::OutOfFrames`] when neither path can serve it; `value` is dropped.
    #[track_caller]
    pub fn new<'v: 'h>(heap: &'h KernelHeap<'v>, value: T) -> Result<Self, Error> {
        let layout = Layout::new::<T>();
        let ptr = if layout.size() == 0 {
            NonNull::dangling()
        } else {
            heap.allocate(layout).ok_or(Error::OutOfFrames)?.cast::<T>()
        };
        // SAFETY: `ptr` is valid and aligned for a `T` (dangling is valid for a ZST).
        unsafe { ptr.as_ptr().write(value) };
        Ok(Self { ptr, heap })
    }
}

impl<T> core::ops::Deref for KVBox<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: `new` wrote a valid `T` that lives until drop.
        unsafe { self.ptr.as_ref() }
    }
}

impl<T> core::ops::DerefMut for KVBox<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as in `deref`; `&mut self` makes this the only reference.
        unsafe { self.ptr.as_mut() }
    }
}

impl<T> Drop for KVBox<'_, T> {
    fn drop(&mut self) {
        /// Frees the block when dropped: after the value's `drop`, or while it
        /// unwinds, as `Box<T>` does.
        struct FreeBlock<'b, T> {
            heap: &'b dyn Deallocate,
            ptr: NonNull<T>,
        }
        impl<T> Drop for FreeBlock<'_, T> {
            fn drop(&mut self) {
                let layout = Layout::new::<T>();
                if layout.size() != 0 {
                    // SAFETY: the block came from `allocate` with `layout` and its
                    // value is dropped (or dropping it unwound): nothing uses it.
                    unsafe { self.heap.deallocate(self.ptr.as_ptr().cast(), layout) };
                }
            }
        }
        let _free = FreeBlock {
            heap: self.heap,
            ptr: self.ptr,
        };
        // SAFETY: the `T` is valid and never used again.
        unsafe { self.ptr.as_ptr().drop_in_place() };
    }
}

// SAFETY: a `KVBox<T>` owns its `T` like a `Box<T>`; the heap is `Sync`.
unsafe impl<T: Send> Send for KVBox<'_, T> {}
// SAFETY: as `Box<T>`.
unsafe impl<T: Sync> Sync for KVBox<'_, T> {}
