//! Freed areas waiting for the batched TLB flush (Linux's `purge_vmap_area_list`).
//!
//! `vfree` takes the area out of the area map at once, so lookups and inserts only
//! ever search live areas, however many frees wait; its range stays out of the free
//! tree, so nothing can be placed there before the flush. The area's record moves
//! into an entry of this list, carved from the same node pool: the slot the area
//! map just released is the one the entry takes, so queueing never needs a frame.

use super::area::AreaRecord;
use super::slab::NodePool;
use crate::{FrameSource, PhysMemory};
use core::ptr::null_mut;
use x86_64::VirtAddr;

/// One freed area: where it starts and what it was.
struct Pending {
    next: *mut Pending,
    start: VirtAddr,
    record: AreaRecord,
}

/// The pending areas (a stack: order does not matter to one flush) and their totals.
pub(crate) struct PurgeList {
    head: *mut Pending,
    /// Pages detached (mapped before the free) in all pending areas.
    pub(crate) pages: u64,
    /// Frames of pending areas that go back to the frame allocator after the flush.
    pub(crate) frames: u64,
    /// Virtual bytes the pending areas still take.
    pub(crate) bytes: u64,
}

// SAFETY: the list exclusively owns its entries, which live in the pool's frames and
// move with the manager's state.
unsafe impl Send for PurgeList {}

impl PurgeList {
    /// An empty list.
    pub(crate) const fn new() -> Self {
        Self {
            head: null_mut(),
            pages: 0,
            frames: 0,
            bytes: 0,
        }
    }

    /// Whether nothing waits.
    pub(crate) fn is_empty(&self) -> bool {
        self.head.is_null()
    }

    /// Queues the area at `start`, already removed from the area map.
    ///
    /// # Panics
    ///
    /// If the pool has no free slot: the caller frees the area's node first.
    pub(crate) fn push<F: FrameSource, M: PhysMemory>(
        &mut self,
        pool: &mut NodePool<F, M>,
        start: VirtAddr,
        record: AreaRecord,
    ) {
        let next = self.head;
        self.head = pool.take(Pending {
            next,
            start,
            record,
        });
        self.pages += record.mapped_pages;
        self.frames += if record.kind.owns_frames() {
            record.mapped_pages
        } else {
            0
        };
        self.bytes += record.span();
    }

    /// The pending areas, newest first.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (VirtAddr, &AreaRecord)> + '_ {
        let mut entry = self.head;
        core::iter::from_fn(move || {
            // SAFETY: linked entries stay valid until `pop` gives them back.
            let pending = unsafe { entry.as_ref() }?;
            entry = pending.next;
            Some((pending.start, &pending.record))
        })
    }

    /// Takes the first pending area off the list, giving its entry's slot back to
    /// `pool` first, so freeing the area's range may take one node without a frame.
    /// The totals are left alone: they describe the list as it was queued.
    pub(crate) fn pop<F: FrameSource, M: PhysMemory>(
        &mut self,
        pool: &mut NodePool<F, M>,
    ) -> Option<(VirtAddr, AreaRecord)> {
        let entry = self.head;
        if entry.is_null() {
            return None;
        }
        // SAFETY: `entry` is a linked entry taken from `pool`; it is read once and then
        // unlinked, so giving its slot back leaves nothing pointing at it.
        let pending = unsafe { entry.read() };
        self.head = pending.next;
        // SAFETY: as above: the slot came from `pool` and is no longer used.
        unsafe { pool.give(entry.cast()) };
        Some((pending.start, pending.record))
    }
}
