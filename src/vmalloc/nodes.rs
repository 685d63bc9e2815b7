//! The pool the bookkeeping nodes are carved from.
//!
//! The vmalloc manager must work before the kernel has a heap, so its two trees (free
//! virtual ranges in [`space`](super::space), busy areas in [`AreaMap`](super::space::AreaMap))
//! take their nodes from a [`NodePool`]: 4 KiB frames pulled from a [`FrameSource`] on
//! demand, reached through [`PhysMemory`], and cut into equal slots. The first slot of
//! every frame (its header) links the pool's frames together; the others hold nodes. A freed
//! node goes onto an intrusive free list and is reused before any new frame is taken.
//! Both trees share one slot size (the larger of their node types), so a node freed by
//! one tree can be reused by the other: `vfree` moves the area's record into a purge-list
//! entry in the slot the area map just freed, and the purge pops it (freeing the slot)
//! before giving the range back (which may need one), so neither step needs a new frame.
//!
//! Each page counts its free slots and keeps its own free list, and the pool keeps
//! its pages on three lists (full, partial, empty), as SLUB does, so a page whose
//! last node is freed is found in O(1). Empty pages go back to the frame source when
//! the manager asks ([`NodePool::shrink`]): after every call it keeps at most one, so
//! bookkeeping shrinks when areas go, and a failed call gives back every page it took
//! ([`NodePool::shrink_to`]). The pool hands those frames to the caller, which frees
//! them with every other frame leaving the manager (through the
//! [gather](super::gather)). Nothing is given back in the middle of a call, so a
//! reservation stays valid until the call ends.
//!
//! Operations that may need nodes call [`NodePool::reserve`] first and mutate only once
//! it succeeded. A reservation that runs out of frames halfway keeps the frames it
//! got as empty pages, and the failed call's rollback (`shrink_to`) gives them back,
//! so running out of frames changes nothing.

use crate::{Error, FrameSource, PAGE_SIZE, PhysMemory};
use core::mem::{align_of, size_of};
use core::ptr::null_mut;
use x86_64::structures::paging::{PhysFrame, Size4KiB};

/// Alignment of every slot; a node type may not need more.
const SLOT_ALIGN: usize = 16;

/// Most frames one [`NodePool::reserve`] call may need to take.
const MAX_RESERVE_FRAMES: usize = 4;

/// A free slot, linked through its first word.
struct FreeSlot {
    next: *mut FreeSlot,
}

/// The first slot of every page frame.
struct PageHeader {
    next: *mut PageHeader,
    prev: *mut PageHeader,
    /// This page's free slots.
    free: *mut FreeSlot,
    free_count: usize,
    frame: PhysFrame<Size4KiB>,
}

/// A doubly linked list of pages.
struct PageList {
    head: *mut PageHeader,
    len: usize,
}

impl PageList {
    const fn new() -> Self {
        Self {
            head: null_mut(),
            len: 0,
        }
    }

    /// Links `page` at the front.
    ///
    /// # Safety
    ///
    /// `page` is a live page header on no list.
    unsafe fn push(&mut self, page: *mut PageHeader) {
        // SAFETY: per the caller; `head` is live or null.
        unsafe {
            (*page).prev = null_mut();
            (*page).next = self.head;
            if let Some(head) = self.head.as_mut() {
                head.prev = page;
            }
        }
        self.head = page;
        self.len += 1;
    }

    /// Unlinks `page`.
    ///
    /// # Safety
    ///
    /// `page` is on this list.
    unsafe fn unlink(&mut self, page: *mut PageHeader) {
        // SAFETY: per the caller; neighbours on a list are live or null.
        unsafe {
            let (prev, next) = ((*page).prev, (*page).next);
            match prev.as_mut() {
                Some(prev) => prev.next = next,
                None => self.head = next,
            }
            if let Some(next) = next.as_mut() {
                next.prev = prev;
            }
        }
        self.len -= 1;
    }

    /// Unlinks and returns the first page.
    fn pop(&mut self) -> Option<*mut PageHeader> {
        let page = self.head;
        if page.is_null() {
            return None;
        }
        // SAFETY: the head is on this list.
        unsafe { self.unlink(page) };
        Some(page)
    }
}

/// Fixed-size node slots carved from 4 KiB frames (see the module doc).
pub(crate) struct NodePool<F: FrameSource, M: PhysMemory> {
    frames: F,
    phys: M,
    slot_size: usize,
    /// Pages with no free slot, some free slots, every slot free.
    full: PageList,
    partial: PageList,
    empty: PageList,
    free_count: usize,
}

// SAFETY: the pool exclusively owns its pages; the raw pointers are never shared with
// another pool, so moving the pool moves ownership of that memory with it.
unsafe impl<F: FrameSource + Send, M: PhysMemory + Send> Send for NodePool<F, M> {}

impl<F: FrameSource, M: PhysMemory> NodePool<F, M> {
    /// An empty pool whose slots fit both trees' nodes for area payload `T`.
    #[cfg(test)]
    pub(crate) fn new<T: Copy>(frames: F, phys: M) -> Self {
        Self::with_slot_size(frames, phys, super::tree::slot_size_for::<T>())
    }

    /// An empty pool of `slot_size`-byte slots (rounded up to [`SLOT_ALIGN`]).
    ///
    /// # Panics
    ///
    /// If fewer than two nodes of that size fit in a frame next to the page header.
    pub(crate) fn with_slot_size(frames: F, phys: M, slot_size: usize) -> Self {
        let slot_size = slot_size
            .max(size_of::<PageHeader>())
            .next_multiple_of(SLOT_ALIGN);
        assert!(PAGE_SIZE as usize / slot_size >= 3, "node slots too large");
        Self {
            frames,
            phys,
            slot_size,
            full: PageList::new(),
            partial: PageList::new(),
            empty: PageList::new(),
            free_count: 0,
        }
    }

    /// Node slots per page frame (one slot holds the page header).
    pub(crate) fn slots_per_frame(&self) -> usize {
        PAGE_SIZE as usize / self.slot_size - 1
    }

    /// Frames the pool holds: the manager's "bookkeeping frames".
    pub(crate) fn frames_held(&self) -> usize {
        self.full.len + self.partial.len + self.empty.len
    }

    /// Slots ready to hand out without taking a frame.
    pub(crate) fn free_slots(&self) -> usize {
        self.free_count
    }

    /// Makes sure `count` slots can be taken without failing.
    ///
    /// # Errors
    ///
    /// [`Error::OutOfFrames`] when the frame source runs dry; the frames this call got
    /// stay as empty pages, for the caller's rollback ([`shrink_to`](Self::shrink_to))
    /// to give back.
    pub(crate) fn reserve(&mut self, count: usize) -> Result<(), Error> {
        let missing = count.saturating_sub(self.free_count);
        let needed = missing.div_ceil(self.slots_per_frame());
        assert!(needed <= MAX_RESERVE_FRAMES, "reservation too large");
        for _ in 0..needed {
            let frame = self.frames.alloc_frame().ok_or(Error::OutOfFrames)?;
            self.carve(frame);
        }
        Ok(())
    }

    /// Links a fresh frame in as an empty page.
    fn carve(&mut self, frame: PhysFrame<Size4KiB>) {
        let base = self.phys.phys_to_virt(frame.start_address());
        let header = base.cast::<PageHeader>();
        let mut free = null_mut::<FreeSlot>();
        for index in (1..=self.slots_per_frame()).rev() {
            // SAFETY: slot `index` lies inside the frame (see `slots_per_frame`), which
            // this pool now owns; slots are `SLOT_ALIGN`-aligned in a 4 KiB-aligned
            // frame (`PhysMemory`'s contract).
            let slot = unsafe { base.add(index * self.slot_size) }.cast::<FreeSlot>();
            // SAFETY: as above.
            unsafe { slot.write(FreeSlot { next: free }) };
            free = slot;
        }
        // SAFETY: as above; the header fits in the first slot.
        unsafe {
            header.write(PageHeader {
                next: null_mut(),
                prev: null_mut(),
                free,
                free_count: self.slots_per_frame(),
                frame,
            });
            self.empty.push(header);
        }
        self.free_count += self.slots_per_frame();
    }

    /// Takes a reserved slot and writes `node` into it.
    ///
    /// # Panics
    ///
    /// If nothing was reserved, or `N` does not fit a slot: both are bugs in the caller.
    pub(crate) fn take<N>(&mut self, node: N) -> *mut N {
        assert!(size_of::<N>() <= self.slot_size && align_of::<N>() <= SLOT_ALIGN);
        let page = if self.partial.head.is_null() {
            let page = self.empty.pop().expect("node taken without a reservation");
            // SAFETY: a page just unlinked from the empty list.
            unsafe { self.partial.push(page) };
            page
        } else {
            self.partial.head
        };
        // SAFETY: pages on the lists are live, and partial ones have a free slot.
        let header = unsafe { &mut *page };
        let slot = header.free;
        // SAFETY: free-list slots hold a valid `FreeSlot`.
        header.free = unsafe { (*slot).next };
        header.free_count -= 1;
        self.free_count -= 1;
        if header.free_count == 0 {
            // SAFETY: the page is on the partial list.
            unsafe {
                self.partial.unlink(page);
                self.full.push(page);
            }
        }
        let node_ptr = slot.cast::<N>();
        // SAFETY: the slot is unused, large and aligned enough for `N` (checked above).
        unsafe { node_ptr.write(node) };
        node_ptr
    }

    /// Puts a node's slot back on its page's free list.
    ///
    /// # Safety
    ///
    /// `node` came from [`take`](Self::take) on this pool, is no longer linked into any
    /// tree and is not used again.
    pub(crate) unsafe fn give(&mut self, node: *mut u8) {
        // Pages are 4 KiB-aligned and a slot never crosses its page's end.
        let page = node
            .map_addr(|addr| addr & !(PAGE_SIZE as usize - 1))
            .cast::<PageHeader>();
        let per_frame = self.slots_per_frame();
        // SAFETY: the node's page is live and owned by this pool (the caller).
        let header = unsafe { &mut *page };
        let slot = node.cast::<FreeSlot>();
        // SAFETY: the slot is unused now (the caller) and aligned for a `FreeSlot`.
        unsafe { slot.write(FreeSlot { next: header.free }) };
        header.free = slot;
        header.free_count += 1;
        self.free_count += 1;
        // SAFETY: a page with one free slot was full, with all free partial (or full
        // when a page holds one slot); each is on the list its old count says.
        unsafe {
            if header.free_count == 1 {
                self.full.unlink(page);
                self.partial.push(page);
            }
            if header.free_count == per_frame {
                self.partial.unlink(page);
                self.empty.push(page);
            }
        }
    }

    /// Empty pages held.
    pub(crate) fn empty_pages(&self) -> usize {
        self.empty.len
    }

    /// Hands empty pages' frames to `give_back` until at most `keep` are left.
    pub(crate) fn shrink(&mut self, keep: usize, mut give_back: impl FnMut(PhysFrame)) {
        while self.empty.len > keep {
            self.release_empty(&mut give_back);
        }
    }

    /// Hands empty pages' frames to `give_back` until the pool holds at most `frames`
    /// frames (or no empty page is left): the rollback of a failed call that grew it.
    pub(crate) fn shrink_to(&mut self, frames: usize, mut give_back: impl FnMut(PhysFrame)) {
        while self.frames_held() > frames && self.empty.len > 0 {
            self.release_empty(&mut give_back);
        }
    }

    fn release_empty(&mut self, give_back: &mut impl FnMut(PhysFrame)) {
        if let Some(page) = self.empty.pop() {
            // SAFETY: an empty page: no node lives in it, and it is on no list now.
            let frame = unsafe { (*page).frame };
            self.free_count -= self.slots_per_frame();
            give_back(frame);
        }
    }

    /// Hands every page's frame to `give_back`, whatever lives in it: the end of the
    /// manager, whose trees are dropped unused.
    pub(crate) fn release_all(&mut self, mut give_back: impl FnMut(PhysFrame)) {
        for list in [&mut self.full, &mut self.partial, &mut self.empty] {
            while let Some(page) = list.pop() {
                // SAFETY: pages on the lists are live; this one is on none now.
                give_back(unsafe { (*page).frame });
            }
        }
        self.free_count = 0;
    }

    #[cfg(test)]
    /// Physical start addresses of the page frames (for diagnostics).
    pub(crate) fn page_frames(&self) -> impl Iterator<Item = x86_64::PhysAddr> + '_ {
        [&self.full, &self.partial, &self.empty]
            .into_iter()
            .flat_map(|list| {
                let mut page = list.head;
                core::iter::from_fn(move || {
                    // SAFETY: pages on the lists are live.
                    let header = unsafe { page.as_ref() }?;
                    page = header.next;
                    Some(header.frame.start_address())
                })
            })
    }
}
