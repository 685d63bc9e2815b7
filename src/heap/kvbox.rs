//! Linux's `kvmalloc` and Rust-for-Linux's `KVBox`: blocks from whichever path their
//! size picks, freed without naming it.

use super::KernelHeap;
use crate::Error;
use core::alloc::Layout;
use core::ptr::NonNull;
use core::sync::atomic::Ordering;

/// Bytes `kvmalloc` keeps before each block: its size and a check of it (and the
/// alignment it gives).
const KV_HEADER: usize = 16;

/// What the check word holds besides the size: a header an underrun changed is
/// refused at `kvfree` rather than taken for a size.
const KV_CHECK: usize = 0x6b76_6d61_6c6c_6f63;

impl KernelHeap<'_> {
    /// Linux's `kvmalloc`: `size` bytes from the slabs or the list heap if they fit,
    /// else from vmalloc. Free with [`kvfree`](Self::kvfree), which needs no size.
    /// The caller's line is the block's site (the guarded pool's reports and
    /// `allocinfo`). The size sits in the block's first 16 bytes, before the
    /// pointer returned: a block the [guarded pool](super::guarded) samples is
    /// reported with them counted (a 24-byte request is a 40-byte object), and an
    /// underrun of up to 16 bytes lands in them rather than on the guard page, and
    /// [`kvfree`](Self::kvfree) refuses the block then.
    #[track_caller]
    pub fn kvmalloc(&self, size: usize) -> Option<NonNull<u8>> {
        let total = size.checked_add(KV_HEADER)?;
        let layout = Layout::from_size_align(total, KV_HEADER).ok()?;
        let block = self.allocate(layout)?;
        // SAFETY: the block holds `total` bytes, the first KV_HEADER for the header,
        // and is aligned for it.
        unsafe {
            let header = block.as_ptr().cast::<[usize; 2]>();
            header.write([total, total ^ KV_CHECK]);
            Some(block.add(KV_HEADER))
        }
    }

    /// Frees what [`kvmalloc`](Self::kvmalloc) returned.
    ///
    /// # Safety
    ///
    /// `ptr` was returned by `kvmalloc` on this heap, is live, and is not used
    /// afterwards. Beyond the header below, nothing is checked: the size `kvmalloc`
    /// stored before `ptr` says which block to free, so any other pointer frees
    /// memory that is not its caller's.
    ///
    /// A block whose header no longer checks (an underrun wrote into the 16 bytes
    /// before `ptr`) is not freed: it is counted in
    /// [`HeapStats::refused_frees`](super::HeapStats::refused_frees) and stays
    /// allocated, as freeing it by a size that is not its own would corrupt the heap.
    #[track_caller]
    pub unsafe fn kvfree(&self, ptr: NonNull<u8>) {
        // SAFETY: `kvmalloc` put the block's header KV_HEADER bytes before `ptr`
        // (caller), aligned for it.
        let (block, [total, check]) = unsafe {
            let block = ptr.as_ptr().sub(KV_HEADER);
            (block, block.cast::<[usize; 2]>().read())
        };
        let layout = Layout::from_size_align(total, KV_HEADER);
        match layout {
            Ok(layout) if check == total ^ KV_CHECK && total >= KV_HEADER => {
                // SAFETY: the block `kvmalloc` made with this layout (caller), whose
                // header checks.
                unsafe { self.deallocate(block, layout) }
            }
            _ => {
                self.refused_frees.fetch_add(1, Ordering::Relaxed);
            }
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
