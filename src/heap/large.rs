//! Freed large blocks kept mapped for the next large allocations that fit.
//!
//! A large block is a vmalloc area of its own. Freeing it and allocating the next
//! costs the area's frames, its page-table entries, a share of a lazy TLB shootdown,
//! and the first touch of every page; a program that churns buffers of 16-256 KiB
//! (a network stack's, a file system's) pays all of it per buffer, where a user-space
//! malloc keeps freed chunks. The heap keeps up to [`ENTRIES`] freed blocks, up to
//! [`HeapConfig::large_cache`](super::HeapConfig::large_cache) bytes, mapped as they
//! are, and serves a large allocation from the best fit among them: the smallest that
//! holds it and no more than twice its size (a 16 KiB request does not pin a 256 KiB
//! block). Requests aligned beyond a page take a fresh area: a `vrealloc` that moves
//! a block keeps its area's own alignment.
//!
//! A kept block stays a live area of the manager's, tagged `kernel heap large, kept`
//! (the tag changes under the manager's lock, [`VmallocOps::retag`]): a second free
//! of it, through this heap or another on the same manager, finds no large block of
//! the heap's and is refused, as is a `realloc` of it, and of two frees racing for one
//! block one wins.
//!
//! A block kept longer than [`DECAY`] ticks of the slabs' aging clock goes back to
//! vmalloc (the heap working on small objects gives back large blocks it no longer
//! reuses), as do the oldest ones when a new one does not fit the budget, and all of
//! them on [`KernelHeap::shrink`](super::KernelHeap::shrink) and when an allocation
//! runs out of memory. The cache only records blocks: the heap frees them after it
//! lets go of the cache's lock.

use super::slab::Slabs;
use super::{KEPT_TAG, LARGE_TAG, lock_heap};
use crate::PAGE_SIZE;
use crate::vmalloc::VmallocOps;
use core::alloc::Layout;
use core::ptr::NonNull;

/// Freed blocks kept at most.
pub(super) const ENTRIES: usize = 16;

/// Ticks of the slabs' aging clock (slab-object operations) a kept block waits for
/// reuse before it goes back to vmalloc.
pub(super) const DECAY: u64 = 1 << 16;

/// A kept block: its start, its usable bytes (whole pages), and when it was kept.
#[derive(Debug, Clone, Copy)]
struct Kept {
    start: usize,
    size: usize,
    since: u64,
}

/// The kept blocks, oldest first.
#[derive(Debug)]
pub(super) struct LargeCache {
    kept: [Kept; ENTRIES],
    len: usize,
    bytes: usize,
}

/// Blocks the cache let go of, for the caller to free without its lock.
pub(super) struct Released {
    starts: [usize; ENTRIES + 1],
    len: usize,
}

impl Released {
    pub(super) const fn new() -> Self {
        Self {
            starts: [0; ENTRIES + 1],
            len: 0,
        }
    }

    fn push(&mut self, start: usize) {
        if let Some(slot) = self.starts.get_mut(self.len) {
            *slot = start;
            self.len += 1;
        }
    }

    /// The starts of the blocks let go of.
    pub(super) fn starts(&self) -> &[usize] {
        &self.starts[..self.len]
    }
}

/// Why [`LargeCache::keep`] did not keep a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum NotKept {
    /// The block is kept already: a second free of it.
    Again,
    /// Larger than a quarter of the budget: it goes back to vmalloc.
    TooLarge,
}

impl LargeCache {
    pub(super) const fn new() -> Self {
        Self {
            kept: [Kept {
                start: 0,
                size: 0,
                since: 0,
            }; ENTRIES],
            len: 0,
            bytes: 0,
        }
    }

    fn kept(&self) -> &[Kept] {
        &self.kept[..self.len.min(ENTRIES)]
    }

    /// Bytes of the blocks kept.
    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }

    /// The best fit for `size` bytes at `align`, taken out: its start and usable
    /// bytes.
    pub(super) fn take(&mut self, size: usize, align: usize) -> Option<(NonNull<u8>, usize)> {
        let most = size.saturating_mul(2);
        let (at, best) = self
            .kept()
            .iter()
            .enumerate()
            .filter(|(_, kept)| {
                (size..=most).contains(&kept.size) && kept.start.is_multiple_of(align.max(1))
            })
            .min_by_key(|(_, kept)| kept.size)
            .map(|(at, kept)| (at, *kept))?;
        self.remove(at);
        Some((NonNull::new(best.start as *mut u8)?, best.size))
    }

    fn remove(&mut self, at: usize) {
        if at >= self.len.min(ENTRIES) {
            return;
        }
        self.bytes -= self.kept[at].size;
        self.kept.copy_within(at + 1..self.len, at);
        self.len -= 1;
    }

    /// Keeps the block at `start` of `size` usable bytes at clock time `now`; the
    /// oldest blocks go to `released` while the kept ones would exceed `budget`
    /// bytes or [`ENTRIES`].
    pub(super) fn keep(
        &mut self,
        start: usize,
        size: usize,
        now: u64,
        budget: usize,
        released: &mut Released,
    ) -> Result<(), NotKept> {
        if self.kept().iter().any(|kept| kept.start == start) {
            return Err(NotKept::Again);
        }
        if size > budget / 4 {
            return Err(NotKept::TooLarge);
        }
        while self.len > 0 && (self.len >= ENTRIES || self.bytes + size > budget) {
            released.push(self.kept[0].start);
            self.remove(0);
        }
        self.kept[self.len] = Kept {
            start,
            size,
            since: now,
        };
        self.len += 1;
        self.bytes += size;
        Ok(())
    }

    /// Lets go of the blocks kept since before `now - DECAY` (all of them with
    /// `now` at `u64::MAX`).
    pub(super) fn release_aged(&mut self, now: u64, released: &mut Released) {
        while let Some(oldest) = self.kept().first()
            && (now == u64::MAX || oldest.since.saturating_add(DECAY) <= now)
        {
            released.push(oldest.start);
            self.remove(0);
        }
    }

    /// Whether a block kept at or before `now - DECAY` waits: the caller checks this
    /// without letting go of anything.
    pub(super) fn has_aged(&self, now: u64) -> bool {
        self.kept()
            .first()
            .is_some_and(|oldest| oldest.since.saturating_add(DECAY) <= now)
    }
}

/// What [`Slabs::keep_large`] did with a freed large block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Keep {
    /// Kept for reuse, or given back to vmalloc at once (larger than the budget
    /// allows): the free is done.
    Taken,
    /// No live large block of the heap's starts there (kept already: a second free;
    /// another owner's area), as the manager's tags say at the retag: refused. Its
    /// free goes no further: by then another CPU may have taken the kept block back.
    Refused,
    /// Not taken (no budget, or a manager that keeps no tags): the caller gives it
    /// back to vmalloc, which refuses what is not the heap's.
    Not,
}

impl Slabs {
    /// A kept block that serves `layout`, if one fits (see the module documentation),
    /// tagged as the heap's live large block again. Blocks aligned beyond a page are
    /// not served: a moving `vrealloc` keeps the area's own alignment.
    pub(super) fn reuse_large(
        &self,
        layout: Layout,
        budget: usize,
        vmalloc: &dyn VmallocOps,
    ) -> Option<NonNull<u8>> {
        if budget == 0 || layout.align() > PAGE_SIZE as usize {
            return None;
        }
        loop {
            let (start, _) = {
                let mut cache = self.large.lock(vmalloc);
                if cache.bytes() == 0 {
                    return None;
                }
                cache.take(layout.size(), layout.align())?
            };
            // SAFETY: a block the heap kept: its tag is the heap's.
            if unsafe { vmalloc.retag(start.as_ptr(), KEPT_TAG, LARGE_TAG) }.is_some() {
                return Some(start);
            }
            // No longer a kept block (freed behind the heap's back): forgotten.
        }
    }

    /// Keeps freed large block `ptr` (of `size` bytes requested) if `budget` allows
    /// and it is a live large block of the heap's: tagged as kept first, in one step
    /// under the manager's lock, so a second free of it finds no block of the heap's,
    /// and of two racing frees one wins. The oldest blocks it pushes out go back to
    /// vmalloc once the cache's lock is let go.
    pub(super) fn keep_large(
        &self,
        ptr: *mut u8,
        size: usize,
        budget: usize,
        vmalloc: &dyn VmallocOps,
    ) -> Keep {
        if size.next_multiple_of(PAGE_SIZE as usize) > budget / 4 {
            return Keep::Not;
        }
        // SAFETY: a large block of the heap's (tagged so) that its owner gave up.
        let Some(size) = (unsafe { vmalloc.retag(ptr, LARGE_TAG, KEPT_TAG) }) else {
            return if vmalloc.retags() {
                Keep::Refused
            } else {
                Keep::Not
            };
        };
        let mut released = Released::new();
        let kept = {
            let now = self.now();
            let mut cache = self.large.lock(vmalloc);
            cache.release_aged(now, &mut released);
            cache.keep(ptr as usize, size, now, budget, &mut released)
        };
        let keep = match kept {
            Ok(()) => Keep::Taken,
            Err(NotKept::Again) => Keep::Refused,
            Err(NotKept::TooLarge) => {
                released.push(ptr as usize);
                Keep::Taken
            }
        };
        free_released(&released, vmalloc);
        keep
    }

    /// Gives back the kept blocks that waited [`DECAY`] ticks by `now` (all of them
    /// at `u64::MAX`); whether any went.
    pub(super) fn release_large(&self, now: u64, vmalloc: &dyn VmallocOps) -> bool {
        let mut released = Released::new();
        {
            let mut cache = self.large.lock(vmalloc);
            if now != u64::MAX && !cache.has_aged(now) {
                return false;
            }
            cache.release_aged(now, &mut released);
        }
        free_released(&released, vmalloc);
        !released.starts().is_empty()
    }

    /// Bytes of the blocks kept.
    pub(super) fn large_kept(&self, vmalloc: Option<&dyn VmallocOps>) -> usize {
        lock_heap(&self.large, vmalloc).bytes()
    }
}

/// Gives `released`'s blocks back to vmalloc; the caller holds no heap lock.
fn free_released(released: &Released, vmalloc: &dyn VmallocOps) {
    for &start in released.starts() {
        // SAFETY: a block the heap kept after its free: the start of a live area it
        // made (tagged as kept), which nothing uses.
        let _ = unsafe { vmalloc.vfree_tagged(start as *mut u8, KEPT_TAG) };
    }
}

#[cfg(test)]
mod test {
    use super::*;

    const PAGE: usize = 4096;

    #[test]
    fn the_best_fit_within_twice_the_size_is_taken() {
        let mut cache = LargeCache::new();
        let mut released = Released::new();
        for (start, pages) in [(0x10_0000, 40), (0x20_0000, 9), (0x30_0000, 5)] {
            cache
                .keep(start, pages * PAGE, 0, 1 << 20, &mut released)
                .unwrap();
        }
        // 4 pages: 5 and 9 fit within twice; the smaller is taken.
        assert_eq!(
            cache
                .take(4 * PAGE, 8)
                .map(|(p, s)| (p.as_ptr() as usize, s)),
            Some((0x30_0000, 5 * PAGE))
        );
        // 30 pages: only the 40-page block is at least that, and within twice.
        assert_eq!(cache.take(30 * PAGE, 8).map(|(_, s)| s), Some(40 * PAGE));
        // 3 pages: the 9-page block is more than twice.
        assert_eq!(cache.take(3 * PAGE, 8), None);
        // An alignment the block's start does not have.
        assert_eq!(cache.take(8 * PAGE, 1 << 22), None);
        assert_eq!(cache.bytes(), 9 * PAGE);
        assert_eq!(released.starts(), &[]);
    }

    #[test]
    fn a_block_kept_twice_is_refused_and_the_budget_releases_the_oldest() {
        let mut cache = LargeCache::new();
        let mut released = Released::new();
        let budget = 64 * PAGE;
        cache
            .keep(0x1000_0000, 16 * PAGE, 0, budget, &mut released)
            .unwrap();
        assert_eq!(
            cache.keep(0x1000_0000, 16 * PAGE, 1, budget, &mut released),
            Err(NotKept::Again)
        );
        assert_eq!(
            cache.keep(0x2000_0000, 17 * PAGE, 1, budget, &mut released),
            Err(NotKept::TooLarge)
        );
        for i in 1..4 {
            cache
                .keep(
                    0x1000_0000 + i * 0x10_0000,
                    16 * PAGE,
                    i as u64,
                    budget,
                    &mut released,
                )
                .unwrap();
        }
        assert_eq!(cache.bytes(), budget);
        cache
            .keep(0x3000_0000, 8 * PAGE, 9, budget, &mut released)
            .unwrap();
        assert_eq!(released.starts(), &[0x1000_0000]);
        assert_eq!(cache.bytes(), 56 * PAGE);
    }

    #[test]
    fn no_more_than_the_entries_are_kept_and_aged_ones_go() {
        let mut cache = LargeCache::new();
        let mut released = Released::new();
        for i in 0..ENTRIES + 2 {
            cache
                .keep((i + 1) << 24, PAGE, i as u64, usize::MAX, &mut released)
                .unwrap();
        }
        assert_eq!(released.starts(), &[1 << 24, 2 << 24]);
        let mut aged = Released::new();
        assert!(!cache.has_aged(DECAY + 1));
        assert!(cache.has_aged(DECAY + 2));
        cache.release_aged(DECAY + 3, &mut aged);
        assert_eq!(aged.starts(), &[3 << 24, 4 << 24]);
        let mut all = Released::new();
        cache.release_aged(u64::MAX, &mut all);
        assert_eq!(all.starts().len(), ENTRIES - 2);
        assert_eq!(cache.bytes(), 0);
    }
}
