//! The pages a window holds: a ring in fill order with a hash index by page, and the
//! budgets that bound them (see [the module documentation](super)).

use super::{PAGE, anonymous};
use core::ptr::NonNull;
use core::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

/// Pages a window may keep mapped, and host mappings it may split its reservation
/// into, whatever the other windows hold, so a small test next to a large one is not
/// made to refill its few pages on every touch.
pub(crate) const FLOOR: usize = 64;
/// Pages the ring of a window bounded by mappings records at most (1 GiB of them):
/// past that a fill evicts, however few host mappings the pages cost.
pub(super) const MAX_RING: usize = 1 << 18;

/// Host-mapped pages of every window that bounds its pages, together.
pub(super) static MAPPED: AtomicUsize = AtomicUsize::new(0);
/// The host mappings the windows' pages split their reservations into, over one
/// per window: between them, every boundary between two neighbouring window pages
/// that lie in different host mappings.
pub(super) static SPLITS: AtomicUsize = AtomicUsize::new(0);
pub(super) static LIMIT: OnceLock<usize> = OnceLock::new();

/// The host's limit on mappings per process.
pub(super) fn limit() -> usize {
    *LIMIT.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/vm/max_map_count")
            .ok()
            .and_then(|text| text.trim().parse::<usize>().ok())
            .unwrap_or(65_530)
            .clamp(4096, 1 << 22)
    })
}

/// How many pages the windows of this process that bound their pages keep
/// host-mapped between them: a quarter of the host's limit on mappings (each
/// isolated page costs at most two, itself and the split of the reservation around
/// it), so at least half of the limit stays for the rest of the process.
pub(crate) fn budget() -> usize {
    page_budget(limit())
}

/// [`budget`] under a limit of `limit` mappings.
pub(super) fn page_budget(limit: usize) -> usize {
    limit / 4
}

/// How many host mappings the windows of this process split their reservations
/// into between them: three quarters of the host's limit, so a quarter of it
/// (16,382 by default; a process rarely uses a thousand) stays for the rest of the
/// process.
pub(super) fn mapping_budget(limit: usize) -> usize {
    limit / 4 * 3
}

/// The host rights of a parked page: its frame piece still mapped, with no access
/// (a flush took it away; see [the module documentation](super)).
pub(super) const PARKED: u64 = libc::PROT_NONE as u64;

/// A host-mapped page: the window page, and the frame piece, effective flags and
/// host rights the fill mapped it with ([`PARKED`] once a flush took them away).
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub(super) struct Entry {
    /// The page's address; 0 for a hole (a page a flush dropped since).
    pub(super) page: u64,
    pub(super) piece: u64,
    pub(super) flags: u64,
    pub(super) prot: u64,
}

impl Entry {
    /// Whether the host keeps `self` and `next`, the page after it, in one mapping:
    /// the kernel merges neighbouring mappings of consecutive pieces of the memfd
    /// with the same rights, and neighbouring reservations (`None`).
    pub(super) fn joins(this: Option<Entry>, next: Option<Entry>) -> bool {
        match (this, next) {
            (None, None) => true,
            (Some(this), Some(next)) => next.piece == this.piece + PAGE && next.prot == this.prot,
            _ => false,
        }
    }
}

/// A window's host-mapped pages: a ring in fill order (the oldest is evicted first)
/// and an open-addressing index from page to ring slot. Both live in anonymous host
/// memory of their own, allocated up front: the signal handler cannot allocate.
#[derive(Debug)]
pub(super) struct Mapped {
    pub(super) ring: NonNull<Entry>,
    /// Ring slots (a power of two).
    pub(super) capacity: usize,
    /// Ring positions, counting up: the next fill goes at `head`, the oldest is at
    /// `tail`; entries between them are pages or holes.
    pub(super) head: u64,
    pub(super) tail: u64,
    /// Pages (not holes) in the ring.
    pub(super) live: usize,
    /// `2 * capacity` slots: 0 free, else a ring slot + 1; linear probing.
    pub(super) index: NonNull<u32>,
    /// `capacity` words a flush sorts pages in (a flush may run inside a global
    /// allocator: it allocates nothing either).
    pub(super) scratch: NonNull<u64>,
    /// The window's pages: those outside it are no neighbours.
    pub(super) start: u64,
    pub(super) end: u64,
    /// This window's share of [`SPLITS`]: its host mappings less one.
    pub(super) splits: usize,
    /// Whether the window's pages count against [`budget`], not only their
    /// mappings against [`mapping_budget`].
    pub(super) pages_bounded: bool,
}

impl Mapped {
    /// Room for `capacity` pages (a power of two) of the window `start..end`.
    pub(super) fn new(capacity: usize, start: u64, end: u64, pages_bounded: bool) -> Mapped {
        let ring = anonymous(capacity * size_of::<Entry>()).cast();
        let index = anonymous(2 * capacity * size_of::<u32>()).cast();
        let scratch = anonymous(capacity * size_of::<u64>()).cast();
        Mapped {
            ring,
            capacity,
            head: 0,
            tail: 0,
            live: 0,
            index,
            scratch,
            start,
            end,
            splits: 0,
            pages_bounded,
        }
    }

    pub(super) fn slot_of(&self, position: u64) -> usize {
        position as usize & (self.capacity - 1)
    }

    pub(super) fn entry(&mut self, slot: usize) -> &mut Entry {
        debug_assert!(slot < self.capacity);
        // SAFETY: `slot` is below the capacity the ring was mapped with; `&mut self`
        // makes this the only reference.
        unsafe { &mut *self.ring.as_ptr().add(slot) }
    }

    /// A copy of the entry in ring slot `slot`.
    pub(super) fn get(&self, slot: usize) -> Entry {
        debug_assert!(slot < self.capacity);
        // SAFETY: `slot` is below the capacity the ring was mapped with.
        unsafe { self.ring.as_ptr().add(slot).read() }
    }

    pub(super) fn index_slot(&mut self, at: usize) -> &mut u32 {
        debug_assert!(at < 2 * self.capacity);
        // SAFETY: as in `entry`, for the index's `2 * capacity` slots.
        unsafe { &mut *self.index.as_ptr().add(at) }
    }

    /// Scratch word `at` (below the capacity).
    pub(super) fn scratch(&mut self, at: usize) -> &mut u64 {
        debug_assert!(at < self.capacity);
        // SAFETY: as in `entry`, for the scratch's `capacity` words.
        unsafe { &mut *self.scratch.as_ptr().add(at) }
    }

    /// The first `len` scratch words (at most the capacity).
    pub(super) fn scratch_slice(&mut self, len: usize) -> &mut [u64] {
        debug_assert!(len <= self.capacity);
        // SAFETY: as in `scratch`.
        unsafe { core::slice::from_raw_parts_mut(self.scratch.as_ptr(), len) }
    }

    /// Where `page` hashes to in the index.
    pub(super) fn home(&self, page: u64) -> usize {
        let bits = (2 * self.capacity).trailing_zeros();
        ((page / PAGE).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - bits)) as usize
    }

    /// The index position and ring slot of `page`, if it is mapped.
    pub(super) fn find(&mut self, page: u64) -> Option<(usize, usize)> {
        let mask = 2 * self.capacity - 1;
        let mut at = self.home(page);
        loop {
            let value = *self.index_slot(at);
            if value == 0 {
                return None;
            }
            let slot = value as usize - 1;
            if self.get(slot).page == page {
                return Some((at, slot));
            }
            at = (at + 1) & mask;
        }
    }

    pub(super) fn insert(&mut self, page: u64, slot: usize) {
        let mask = 2 * self.capacity - 1;
        let mut at = self.home(page);
        while *self.index_slot(at) != 0 {
            at = (at + 1) & mask;
        }
        *self.index_slot(at) = slot as u32 + 1;
    }

    /// Takes index position `at` out, shifting back the entries that probed past it.
    pub(super) fn remove(&mut self, mut at: usize) {
        let mask = 2 * self.capacity - 1;
        let mut next = at;
        loop {
            next = (next + 1) & mask;
            let value = *self.index_slot(next);
            if value == 0 {
                break;
            }
            let home = self.home(self.get(value as usize - 1).page);
            // The entry at `next` may fill the hole unless its home lies cyclically
            // in (at, next]: it would no longer be found from there.
            let stays = if at <= next {
                at < home && home <= next
            } else {
                at < home || home <= next
            };
            if !stays {
                *self.index_slot(at) = value;
                at = next;
            }
        }
        *self.index_slot(at) = 0;
    }

    /// The entry of `page`, if it is mapped.
    pub(super) fn lookup(&mut self, page: u64) -> Option<Entry> {
        self.find(page).map(|(_, slot)| self.get(slot))
    }

    /// The boundaries on either side of `page` (inside the window) between
    /// different host mappings, were `page` as `this` says.
    pub(super) fn splits_around(&mut self, page: u64, this: Option<Entry>) -> usize {
        let mut splits = 0;
        if page > self.start && !Entry::joins(self.lookup(page - PAGE), this) {
            splits += 1;
        }
        if page + PAGE < self.end && !Entry::joins(this, self.lookup(page + PAGE)) {
            splits += 1;
        }
        splits
    }

    /// Counts a page's change from `before` to `after` boundaries around it.
    pub(super) fn account(&mut self, before: usize, after: usize) {
        if after >= before {
            self.splits += after - before;
            SPLITS.fetch_add(after - before, Ordering::Relaxed);
        } else {
            self.splits -= before - after;
            SPLITS.fetch_sub(before - after, Ordering::Relaxed);
        }
    }

    /// Forgets the page in ring slot `slot` (at index position `at`), which the
    /// caller reserves again.
    pub(super) fn forget(&mut self, at: usize, slot: usize) {
        let entry = self.get(slot);
        let before = self.splits_around(entry.page, Some(entry));
        self.remove(at);
        self.entry(slot).page = 0;
        self.live -= 1;
        if self.pages_bounded {
            MAPPED.fetch_sub(1, Ordering::Relaxed);
        }
        let after = self.splits_around(entry.page, None);
        self.account(before, after);
        // Holes at the old end are not kept: flushes walk from `tail`.
        while self.tail < self.head && self.get(self.slot_of(self.tail)).page == 0 {
            self.tail += 1;
        }
    }

    /// Records a fresh fill of `entry.page`, which the caller maps; the ring has
    /// room.
    pub(super) fn push(&mut self, entry: Entry) {
        let before = self.splits_around(entry.page, None);
        let slot = self.slot_of(self.head);
        *self.entry(slot) = entry;
        self.insert(entry.page, slot);
        self.head += 1;
        self.live += 1;
        if self.pages_bounded {
            MAPPED.fetch_add(1, Ordering::Relaxed);
        }
        let after = self.splits_around(entry.page, Some(entry));
        self.account(before, after);
    }

    /// Records a fill of `entry.page` (which the caller maps) over the page's parked
    /// mapping, if it has one: that record goes, and the fill is the newest.
    pub(super) fn push_over(&mut self, entry: Entry) {
        if let Some((at, slot)) = self.find(entry.page) {
            self.forget(at, slot);
        }
        self.push(entry);
    }

    /// Records that the page in ring slot `slot` is mapped as `entry` now.
    pub(super) fn update(&mut self, slot: usize, entry: Entry) {
        let before = self.splits_around(entry.page, Some(self.get(slot)));
        *self.entry(slot) = entry;
        let after = self.splits_around(entry.page, Some(entry));
        self.account(before, after);
    }

    /// Takes the newest `count` pages off the ring again (a fill whose mapping the
    /// host refused): they are at its head, in the order they were pushed.
    pub(super) fn pop_newest(&mut self, count: usize) {
        for _ in 0..count {
            let slot = self.slot_of(self.head - 1);
            if let Some((at, _)) = self.find(self.get(slot).page) {
                self.forget(at, slot);
            }
            // `forget` may have moved `tail` past holes up to the old head.
            self.head -= 1;
            self.tail = self.tail.min(self.head);
        }
    }

    /// Takes the oldest ring position off: its page, if it was not a hole.
    pub(super) fn pop_oldest(&mut self) -> Option<u64> {
        let slot = self.slot_of(self.tail);
        self.tail += 1;
        let page = self.get(slot).page;
        if page == 0 {
            return None;
        }
        // Always indexed; no panic in the signal handler if not.
        let (at, _) = self.find(page)?;
        self.forget(at, slot);
        Some(page)
    }

    /// Moves the ring's pages together, oldest first, dropping the holes between them
    /// (those a flush left), and indexes them again.
    pub(super) fn compact(&mut self) {
        let mut kept = self.tail;
        for position in self.tail..self.head {
            let entry = self.get(self.slot_of(position));
            if entry.page != 0 {
                let slot = self.slot_of(kept);
                *self.entry(slot) = entry;
                kept += 1;
            }
        }
        self.head = kept;
        for at in 0..2 * self.capacity {
            *self.index_slot(at) = 0;
        }
        for position in self.tail..self.head {
            let slot = self.slot_of(position);
            let page = self.get(slot).page;
            self.insert(page, slot);
        }
    }

    /// Whether a fill of `pages` pages that splits the reservation `splits` times
    /// more must make room first: the ring has no room for them (full of pages, or
    /// of holes too: then it is compacted instead, if that frees half of it), or
    /// every window together would pass a budget that this one counts against, and
    /// this one uses at least its floor of it.
    pub(super) fn must_evict(&mut self, pages: usize, splits: usize) -> bool {
        let mut full = self.head - self.tail + pages as u64 > self.capacity as u64;
        if full && self.live + pages <= self.capacity / 2 {
            self.compact();
            full = false;
        }
        // The limit was read before any window existed.
        let limit = LIMIT.get().copied().unwrap_or(0);
        let mappings =
            self.splits >= FLOOR && SPLITS.load(Ordering::Relaxed) + splits > mapping_budget(limit);
        let pages = self.pages_bounded
            && self.live >= FLOOR
            && MAPPED.load(Ordering::Relaxed) + pages > page_budget(limit);
        full || mappings || pages
    }
}
