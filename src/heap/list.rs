//! The list heap: `linked_list_allocator` in a virtual window reserved once in the
//! vmalloc region and backed by frames as it grows.
//!
//! When the list runs dry, the next pages of the window are mapped
//! ([`Vmalloc::populate`]) and handed to `Heap::extend`. Pages stay mapped once the
//! heap has grown (the high-water mark), as a kernel's `brk`-style heap does. The
//! list's lock is not held across the manager's call: other CPUs allocate and free
//! list blocks while one grows it.
//!
//! [`Vmalloc::populate`]: crate::vmalloc::Vmalloc::populate

use super::{KernelHeap, lock_heap};
use crate::Error;
use crate::vmalloc::VmallocOps;
use core::alloc::Layout;
use core::ptr::NonNull;
use linked_list_allocator::Heap;

/// What [`KernelHeap::init`] sets once.
pub(super) struct Backing<'a> {
    pub(super) vmalloc: &'a dyn VmallocOps,
    /// The list heap's window: start and length in bytes (whole pages).
    pub(super) window: usize,
    pub(super) window_len: usize,
}

/// The list heap and how much of its window is mapped.
pub(super) struct ListHeap {
    pub(super) list: Heap,
    pub(super) mapped: usize,
}

// SAFETY: the list heap's raw pointers point into the window, which belongs to this
// heap alone; they are only used with the lock held.
unsafe impl Send for ListHeap {}

impl ListHeap {
    pub(super) const fn new() -> Self {
        Self {
            list: Heap::empty(),
            mapped: 0,
        }
    }

    /// Hands the window's pages between the list's top and `backed` bytes (mapped by
    /// [`grow`], here or on another CPU) to the list heap.
    fn adopt(&mut self, backing: &Backing<'_>, backed: usize) {
        if backed <= self.mapped {
            return;
        }
        if self.mapped == 0 {
            // SAFETY: `backed` bytes from the window start are mapped read-write and
            // belong to this heap alone.
            unsafe { self.list.init(backing.window as *mut u8, backed) };
        } else {
            // SAFETY: the bytes between the old and the new top are mapped and
            // contiguous with the heap.
            unsafe { self.list.extend(backed - self.mapped) };
        }
        self.mapped = backed;
    }
}

/// Maps enough of the window past `mapped` bytes for `layout` (at least `step`
/// bytes); returns how many bytes from the window's start are mapped now. Called
/// without the list's lock: `populate` maps the window from its start under the
/// manager's lock, so CPUs growing at once each get a prefix that covers what they
/// asked, and the list takes it in with [`ListHeap::adopt`].
fn grow(backing: &Backing<'_>, mapped: usize, layout: Layout, step: usize) -> Result<usize, Error> {
    let need = layout.size() + layout.align() + 4 * core::mem::size_of::<usize>();
    let target = mapped
        .saturating_add(need.max(step))
        .min(backing.window_len);
    if target <= mapped {
        return Err(Error::OutOfVirtualSpace);
    }
    backing.vmalloc.populate(backing.window as *mut u8, target)
}

impl KernelHeap<'_> {
    /// A block of the list heap, grown if it must be.
    pub(super) fn alloc_list(&self, layout: Layout) -> Option<NonNull<u8>> {
        let backing = self.backing.get()?;
        // Two rounds: a CPU growing at the same time may take the pages this one
        // mapped, as this one may take its.
        for _ in 0..2 {
            let mapped = {
                let mut list = lock_heap(&self.list, Some(backing.vmalloc));
                if let Ok(block) = list.list.allocate_first_fit(layout) {
                    return Some(block);
                }
                list.mapped
            };
            // The list's lock is not held across the manager's call: other CPUs
            // allocate and free list blocks meanwhile.
            let backed = grow(backing, mapped, layout, self.config.grow_step).ok()?;
            let mut list = lock_heap(&self.list, Some(backing.vmalloc));
            list.adopt(backing, backed);
            if let Ok(block) = list.list.allocate_first_fit(layout) {
                return Some(block);
            }
        }
        None
    }

    /// Gives a block back to the list heap.
    ///
    /// # Safety
    ///
    /// `ptr` came from [`alloc_list`](Self::alloc_list) with `layout` and is not used
    /// afterwards.
    pub(super) unsafe fn free_list(&self, ptr: *mut u8, layout: Layout, backing: &Backing<'_>) {
        let mut list = lock_heap(&self.list, Some(backing.vmalloc));
        // SAFETY: the block came from the list heap with this layout (caller).
        unsafe { list.list.deallocate(NonNull::new_unchecked(ptr), layout) };
    }
}
