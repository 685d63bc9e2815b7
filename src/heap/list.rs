//! The list heap: `linked_list_allocator` in a virtual window reserved once in the
//! vmalloc region and backed by frames as it grows.
//!
//! When the list runs dry, the next pages of the window are mapped
//! ([`Vmalloc::populate`]) and handed to `Heap::extend`. Pages stay mapped once the
//! heap has grown (the high-water mark), as a kernel's `brk`-style heap does. The
//! list's lock is not held across the manager's call: other CPUs allocate and free
//! list blocks while one grows it.
//!
//! Each block ends with a seal, a word that only its pointer's live block holds
//! there ([`seal_of`]); a free checks it and clears it, so a pointer freed twice,
//! or one inside a block, is refused: `linked_list_allocator` would panic on
//! either (a freed node that overlaps a hole), or link it into its list.
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
    // SAFETY: the window is the heap's own reservation, mapped from its start as
    // the list heap grows into it.
    unsafe { backing.vmalloc.populate(backing.window as *mut u8, target) }
}

/// The seal's size: a word after the caller's bytes (rounded up to a word).
const SEAL: usize = core::mem::size_of::<usize>();

/// What the list heap allocates for `layout`: the block, then its seal; `None` for
/// a size the window could never hold.
fn sealed(layout: Layout) -> Option<(Layout, usize)> {
    let seal_at = layout.size().checked_next_multiple_of(SEAL)?;
    let size = seal_at.checked_add(SEAL)?;
    let layout = Layout::from_size_align(size, layout.align().max(SEAL)).ok()?;
    Some((layout, seal_at))
}

/// The seal of the live block at `ptr`: no address's seal is another's, and
/// ordinary data (zeroes, small numbers, pointers) is none.
fn seal_of(ptr: usize) -> usize {
    ptr.rotate_left(29) ^ 0x5a6c_6973_745f_626c
}

impl KernelHeap<'_> {
    /// A block of the list heap, grown if it must be.
    pub(super) fn alloc_list(&self, layout: Layout) -> Option<NonNull<u8>> {
        let (sealed, seal_at) = sealed(layout)?;
        let block = self.alloc_sealed(sealed)?;
        // SAFETY: the block holds `seal_at + SEAL` bytes, aligned to a word.
        unsafe {
            block
                .as_ptr()
                .add(seal_at)
                .cast::<usize>()
                .write(seal_of(block.as_ptr() as usize))
        };
        Some(block)
    }

    fn alloc_sealed(&self, layout: Layout) -> Option<NonNull<u8>> {
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

    /// Gives a block back to the list heap; false (nothing changed) unless `ptr`
    /// starts a live block of `layout`'s size: its seal is there.
    ///
    /// # Safety
    ///
    /// If `ptr` starts a live block of the list heap with `layout`, it is not used
    /// afterwards.
    pub(super) unsafe fn free_list(
        &self,
        ptr: *mut u8,
        layout: Layout,
        backing: &Backing<'_>,
    ) -> bool {
        let mut list = lock_heap(&self.list, Some(backing.vmalloc));
        let Some((seal, sealed)) = live_seal(&list, ptr, layout, backing) else {
            return false;
        };
        // SAFETY: `live_seal` found the seal in the mapped window; the list's lock
        // keeps another free of the block from reading it meanwhile.
        unsafe { seal.write(0) };
        // SAFETY: the seal says a live block of this size starts at `ptr` (a caller
        // that lies about a block it still uses is past what the seal can see).
        unsafe { list.list.deallocate(NonNull::new_unchecked(ptr), sealed) };
        true
    }

    /// Whether `ptr` starts a live list block of `layout`'s size.
    pub(super) fn is_live_list_block(&self, ptr: *mut u8, layout: Layout) -> bool {
        self.backing.get().is_some_and(|backing| {
            let list = lock_heap(&self.list, Some(backing.vmalloc));
            live_seal(&list, ptr, layout, backing).is_some()
        })
    }
}

/// The seal of the live block of `layout` at `ptr`, and the layout the list heap
/// gave it; `None` unless the seal is there.
fn live_seal(
    list: &ListHeap,
    ptr: *mut u8,
    layout: Layout,
    backing: &Backing<'_>,
) -> Option<(*mut usize, Layout)> {
    let (sealed, seal_at) = sealed(layout)?;
    let offset = (ptr as usize).wrapping_sub(backing.window);
    let end = offset.checked_add(seal_at + SEAL)?;
    if end > list.mapped || !(ptr as usize).is_multiple_of(sealed.align()) {
        return None;
    }
    // The word lies in the mapped part of the window, aligned.
    let seal = ptr.wrapping_add(seal_at).cast::<usize>();
    // SAFETY: as above: mapped read-write for the heap's life.
    (unsafe { seal.read() } == seal_of(ptr as usize)).then_some((seal, sealed))
}
