//! One block: 2 MiB of the zone with its own leaf page table, carved by one CPU.

use super::{BLOCK_PAGES, MAX_BLOCK_PAGES};
use crate::paging::ADDR_MASK;
use crate::{Error, PAGE_SIZE};
use core::cell::UnsafeCell;
use core::panic::Location;
use core::sync::atomic::{AtomicPtr, AtomicU8, AtomicU16, AtomicUsize, Ordering};
use x86_64::structures::paging::{PageTable, PhysFrame};

/// Words in a block's free-page bitmap.
const WORDS: usize = BLOCK_PAGES / 64;

/// Marks a zeroed area in [`Block::len`].
pub(super) const ZEROED: u8 = 0x80;
/// Marks a freed area, or a shrink's dropped tail, waiting to be free again (for
/// fault diagnosis: a use after free).
pub(super) const FREED: u8 = 0x40;
/// Marks (with [`FREED`]) a shrink's dropped tail: pages of an area that lives on
/// shorter, not an area of their own (a fault there is in no area, as past a
/// shrunk tree area's guard).
const TAIL: u8 = 0x20;
/// The pages bits of a [`Block::len`] entry.
const PAGES: u8 = 0x1f;

const _: () = assert!(MAX_BLOCK_PAGES as u8 <= PAGES, "pages fit below the flags");
const _: () = assert!(
    BLOCK_PAGES < u16::MAX as usize,
    "page numbers fit the free list"
);

/// No CPU carves from the block.
pub(super) const NO_OWNER: usize = usize::MAX;

/// Which pages are free: touched only by whoever holds the owning CPU's cache.
struct Bitmap {
    /// Bit `i` set: page `i` is free and no TLB may still hold a translation of it.
    free: [u64; WORDS],
    /// The word where the last area was carved: the next search starts there.
    hint: usize,
}

/// One block; lives in a frame of its own until the manager is dropped.
///
/// A block is carved by the CPU that owns it (its cache's current block), without a
/// lock: the bitmap is that CPU's, touched only by whoever holds its cache (the CPU
/// itself, or a CPU draining it). Any CPU may free an area of it: the free claims the
/// area's first page with a compare-and-swap, and once the flush that covers it is
/// done, its pages come back through a lock-free list the owner takes whole at its
/// next carve (SLUB's and mimalloc's remote frees), unless the freeing CPU owns the
/// block itself. Lookups of live areas read the per-page lengths, from any CPU.
pub(super) struct Block {
    pub(super) base: u64,
    /// The block's leaf table, through the manager's `PhysMemory`.
    pub(super) table: *mut PageTable,
    /// The frame this descriptor lives in.
    pub(super) frame: PhysFrame,
    /// The CPU whose cache carves from the block, or [`NO_OWNER`].
    owner: AtomicUsize,
    bitmap: UnsafeCell<Bitmap>,
    /// Pages free in the bitmap: changed only by whoever holds the owning CPU's cache
    /// (a load and a store, no locked instruction), read by anyone.
    free_pages: AtomicUsize,
    /// Pages on `returned`, added by the CPUs returning them. With `free_pages`:
    /// whether the block is worth taking.
    returned_pages: AtomicUsize,
    /// At a live area's first page, its pages with [`ZEROED`] for a `vzalloc` area;
    /// with [`FREED`] once freed and until its pages are free again; 0 elsewhere.
    len: [AtomicU8; BLOCK_PAGES],
    /// Where the area starting at page `2 * i` or `2 * i + 1` was made (an area and its
    /// guard take two pages at least, so no two live areas start in one pair). The
    /// freed tail a one-page shrink leaves is one page (the old guard), and may share
    /// a pair with the next live area: a tail has no caller of its own, and the slot
    /// stays the live area's (see [`caller_slot_is_its_own`](Self::caller_slot_is_its_own)).
    callers: [AtomicPtr<Location<'static>>; BLOCK_PAGES / 2],
    /// Freed areas flushed by a CPU that did not own the block: a stack of first pages
    /// plus one (0: empty), linked through `next`; pushed by anyone, taken whole by
    /// the owner.
    returned: AtomicU16,
    next: [AtomicU16; BLOCK_PAGES],
}

// SAFETY: the bitmap is touched only by whoever holds the owning CPU's cache (one
// CPU at a time); everything else is atomic; `table` points into a page table
// reachable from every CPU (`PhysMemory`), whose entries each belong to one area.
unsafe impl Send for Block {}
// SAFETY: as above.
unsafe impl Sync for Block {}

impl Block {
    /// A block at `base` owned by `cpu`, every page free; `table` is set later.
    pub(super) fn new(base: u64, cpu: usize) -> Self {
        Self {
            base,
            table: core::ptr::null_mut(),
            frame: PhysFrame::containing_address(x86_64::PhysAddr::zero()),
            owner: AtomicUsize::new(cpu),
            bitmap: UnsafeCell::new(Bitmap {
                free: [u64::MAX; WORDS],
                hint: 0,
            }),
            free_pages: AtomicUsize::new(BLOCK_PAGES),
            returned_pages: AtomicUsize::new(0),
            len: [const { AtomicU8::new(0) }; BLOCK_PAGES],
            callers: [const { AtomicPtr::new(core::ptr::null_mut()) }; BLOCK_PAGES / 2],
            returned: AtomicU16::new(0),
            next: [const { AtomicU16::new(0) }; BLOCK_PAGES],
        }
    }

    /// Entry `page` of the block's leaf table.
    #[inline]
    pub(super) fn entry(&self, page: usize) -> *mut u64 {
        debug_assert!(page < BLOCK_PAGES);
        self.table.cast::<u64>().wrapping_add(page)
    }

    /// The frame entry `page` maps (or recorded).
    pub(super) fn frame_at(&self, page: usize) -> PhysFrame {
        // SAFETY: the entry lies in the block's table; a read of a word that only the
        // area's owner (the caller) changes.
        let raw = unsafe { self.entry(page).read() };
        PhysFrame::containing_address(x86_64::PhysAddr::new(raw & ADDR_MASK))
    }

    /// Page index of `addr` in the block.
    pub(super) fn page_of(&self, addr: u64) -> usize {
        ((addr - self.base) / PAGE_SIZE) as usize
    }

    pub(super) fn owner(&self) -> usize {
        self.owner.load(Ordering::Relaxed)
    }

    /// Makes `cpu` the owner, if the block has none.
    pub(super) fn take(&self, cpu: usize) -> bool {
        self.owner
            .compare_exchange(NO_OWNER, cpu, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
    }

    /// The owner gives the block up: its bitmap is the next owner's.
    pub(super) fn release(&self) {
        self.owner.store(NO_OWNER, Ordering::Release);
    }

    /// Whether a CPU looking for a block should take this one.
    pub(super) fn worth_taking(&self, from: usize) -> bool {
        self.owner() == NO_OWNER && self.available() >= from
    }

    /// Pages free in the bitmap or on the returned list.
    fn available(&self) -> usize {
        self.free_pages.load(Ordering::Relaxed) + self.returned_pages.load(Ordering::Relaxed)
    }

    /// Adds `delta` pages to the bitmap's count: the holder's alone.
    fn add_free(&self, delta: isize) {
        let pages = self.free_pages.load(Ordering::Relaxed);
        self.free_pages
            .store(pages.wrapping_add_signed(delta), Ordering::Relaxed);
    }

    /// The bitmap.
    ///
    /// # Safety
    ///
    /// The caller holds the cache of the CPU that owns the block, and no other
    /// reference to the bitmap is alive.
    #[allow(clippy::mut_from_ref)]
    unsafe fn bitmap(&self) -> &mut Bitmap {
        // SAFETY: the caller's contract.
        unsafe { &mut *self.bitmap.get() }
    }

    /// The first page of a run of `span` free pages, now taken (after taking back
    /// what other CPUs returned): first fit from the word of the last carve,
    /// wrapping around. A run may cross into the next word: each word is searched
    /// with the next one above it.
    ///
    /// # Safety
    ///
    /// As [`bitmap`](Self::bitmap).
    pub(super) unsafe fn carve(&self, span: usize) -> Option<usize> {
        // SAFETY: forwarded.
        unsafe { self.take_returned() };
        // SAFETY: forwarded.
        let bitmap = unsafe { self.bitmap() };
        for step in 0..WORDS {
            let word = (bitmap.hint + step) % WORDS;
            let next = bitmap.free.get(word + 1).copied().unwrap_or(0);
            let both = u128::from(bitmap.free[word]) | u128::from(next) << 64;
            let starts = run_starts(both, span);
            if starts != 0 {
                let first = word * 64 + starts.trailing_zeros() as usize;
                set_bits(&mut bitmap.free, first, span, false);
                bitmap.hint = word;
                self.add_free(-(span as isize));
                return Some(first);
            }
        }
        None
    }

    /// Records a live area of `pages` pages at `first`, made at `caller`.
    pub(super) fn record(&self, first: usize, pages: usize, zero: bool, caller: &'static Location) {
        let caller = (caller as *const Location<'static>).cast_mut();
        self.callers[first / 2].store(caller, Ordering::Relaxed);
        // Release: a lookup that sees the length sees the entries and the caller.
        let len = pages as u8 | if zero { ZEROED } else { 0 };
        self.len[first].store(len, Ordering::Release);
    }

    /// Pages of the live area starting at page `first`; 0 if none does.
    pub(super) fn pages_at(&self, first: usize) -> usize {
        let len = self.len[first].load(Ordering::Acquire);
        if len & FREED != 0 {
            return 0;
        }
        usize::from(len & PAGES)
    }

    /// Whether the live area at `first` was made zeroed.
    pub(super) fn zeroed(&self, first: usize) -> bool {
        self.len[first].load(Ordering::Relaxed) & ZEROED != 0
    }

    /// Whether the caller slot of the record at `first` is that record's alone: no
    /// other record starts in its pair of pages. A live area's always is (a tail
    /// sharing its pair never writes the slot); a freed record's may not be.
    fn caller_slot_is_its_own(&self, first: usize) -> bool {
        self.len
            .get(first ^ 1)
            .is_none_or(|mate| mate.load(Ordering::Relaxed) == 0)
    }

    /// Where the freed area at `first` was made, if the block still knows.
    pub(super) fn freed_caller(&self, first: usize) -> Option<&'static Location<'static>> {
        self.caller_slot_is_its_own(first)
            .then(|| self.caller(first))
            .flatten()
    }

    /// Forgets the caller of the freed record at `first`, unless another record
    /// starts in its pair (a live area's slot is its own).
    fn forget_caller(&self, first: usize) {
        if self.caller_slot_is_its_own(first) {
            self.callers[first / 2].store(core::ptr::null_mut(), Ordering::Relaxed);
        }
    }

    /// Where the live area starting at `first` was made.
    pub(super) fn caller(&self, first: usize) -> Option<&'static Location<'static>> {
        let caller = self.callers[first / 2].load(Ordering::Relaxed);
        // SAFETY: only `&'static Location`s are stored.
        unsafe { caller.as_ref() }
    }

    /// The live area whose span (guard included) holds page `page`: its first page and
    /// its pages.
    pub(super) fn area_over(&self, page: usize) -> Option<(usize, usize)> {
        let lowest = page.saturating_sub(MAX_BLOCK_PAGES as usize);
        (lowest..=page).rev().find_map(|first| {
            let pages = self.pages_at(first);
            (pages > 0 && page <= first + pages).then_some((first, pages))
        })
    }

    /// The freed area, still waiting to be free again, whose span holds `page`: its
    /// first page and pages. A shrink's dropped tail is none.
    pub(super) fn freed_over(&self, page: usize) -> Option<(usize, usize)> {
        let lowest = page.saturating_sub(MAX_BLOCK_PAGES as usize);
        (lowest..=page).rev().find_map(|first| {
            let len = self.len[first].load(Ordering::Acquire);
            let pages = usize::from(len & PAGES);
            let freed_area = len & (FREED | TAIL) == FREED;
            (freed_area && page <= first + pages).then_some((first, pages))
        })
    }

    /// The live area starting at `addr` (in the block): its first page and pages, or
    /// the error `vfree` gives for `addr`.
    pub(super) fn area_at(&self, addr: u64) -> Result<(usize, usize), Error> {
        let page = self.page_of(addr);
        let pages = self.pages_at(page);
        if pages > 0 && addr.is_multiple_of(PAGE_SIZE) {
            return Ok((page, pages));
        }
        Err(match self.area_over(page) {
            Some((first, pages)) if page < first + pages => Error::InteriorPointer,
            _ => Error::NotAllocated,
        })
    }

    /// Marks the live area of `pages` pages at `first` freed, if it still is live: a
    /// second free of it (by another CPU at once, too) finds it freed.
    pub(super) fn claim_free(&self, first: usize, pages: usize) -> bool {
        let len = &self.len[first];
        let live = len.load(Ordering::Acquire);
        if live & FREED != 0 || usize::from(live & PAGES) != pages {
            return false;
        }
        len.compare_exchange(live, live | FREED, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
    }

    /// Shrinks the live area at `first` from `pages` to `new_pages` pages: its length
    /// changes now, and the dropped tail past the new guard page is recorded as
    /// freed, for [`free_again`](Self::free_again) once flushed. Returns the tail's
    /// first page and span.
    pub(super) fn cut(&self, first: usize, pages: usize, new_pages: usize) -> (usize, usize) {
        let tail = first + new_pages + 1;
        let span = pages - new_pages;
        self.len[tail].store((span - 1) as u8 | FREED | TAIL, Ordering::Relaxed);
        let zero = self.len[first].load(Ordering::Relaxed) & ZEROED;
        self.len[first].store(new_pages as u8 | zero, Ordering::Release);
        (tail, span)
    }

    /// Span (pages with the guard) of the freed area at `first`.
    fn freed_span(&self, first: usize) -> usize {
        usize::from(self.len[first].load(Ordering::Relaxed) & PAGES) + 1
    }

    /// The freed area at `first`, flushed, is free again: directly in the bitmap.
    ///
    /// # Safety
    ///
    /// As [`bitmap`](Self::bitmap).
    pub(super) unsafe fn free_again(&self, first: usize) {
        let span = self.freed_span(first);
        self.forget_caller(first);
        self.len[first].store(0, Ordering::Relaxed);
        // SAFETY: forwarded.
        set_bits(unsafe { &mut self.bitmap().free }, first, span, true);
        self.add_free(span as isize);
    }

    /// The freed area at `first`, flushed, goes back to the owner, which frees it at
    /// its next carve (or to whoever takes the block next). Returns whether the block
    /// is now worth taking by a CPU looking for one.
    pub(super) fn return_freed(&self, first: usize, take_from: usize) -> bool {
        let span = self.freed_span(first);
        // Counted before the push: the owner subtracts what it takes off the list,
        // so a count added after could come after the subtraction (and run below
        // zero, making `available` overflow) when the owner takes the list between.
        self.returned_pages.fetch_add(span, Ordering::Relaxed);
        // The unit test's seam: the owner gets to run here.
        #[cfg(test)]
        std::thread::yield_now();
        let mut head = self.returned.load(Ordering::Relaxed);
        loop {
            self.next[first].store(head, Ordering::Relaxed);
            match self.returned.compare_exchange_weak(
                head,
                first as u16 + 1,
                Ordering::Release,
                Ordering::Relaxed,
            ) {
                Ok(_) => break,
                Err(now) => head = now,
            }
        }
        self.worth_taking(take_from)
    }

    /// Frees in the bitmap every area other CPUs returned.
    ///
    /// # Safety
    ///
    /// As [`bitmap`](Self::bitmap).
    unsafe fn take_returned(&self) {
        if self.returned.load(Ordering::Relaxed) == 0 {
            return;
        }
        let mut at = self.returned.swap(0, Ordering::Acquire);
        let mut taken = 0;
        while at != 0 {
            let first = usize::from(at - 1);
            at = self.next[first].load(Ordering::Relaxed);
            let span = self.freed_span(first);
            self.forget_caller(first);
            self.len[first].store(0, Ordering::Relaxed);
            // SAFETY: forwarded.
            set_bits(unsafe { &mut self.bitmap().free }, first, span, true);
            taken += span;
        }
        // The pages move from the returned count to the bitmap's; one returned after
        // the swap is on the new list, and counted there.
        self.add_free(taken as isize);
        self.returned_pages.fetch_sub(taken, Ordering::Relaxed);
    }
}

/// Bit `i` set: bits `i..i + span` of `bits` are all set, for `i` below 64 (a run
/// may reach into the upper half). Runs double at each step: `span` 17 takes five.
fn run_starts(bits: u128, span: usize) -> u64 {
    let (mut run, mut len) = (bits, 1);
    while len < span {
        let shift = (span - len).min(len);
        run &= run >> shift;
        len += shift;
    }
    run as u64
}

/// Marks pages `first..first + span` of `free` free or taken, a word at a time.
fn set_bits(free: &mut [u64; WORDS], first: usize, span: usize, value: bool) {
    let (mut page, end) = (first, first + span);
    while page < end {
        let (word, bit) = (page / 64, page % 64);
        let count = (64 - bit).min(end - page);
        let mask = (u64::MAX >> (64 - count)) << bit;
        if value {
            free[word] |= mask;
        } else {
            free[word] &= !mask;
        }
        page += count;
    }
}

#[cfg(test)]
mod test;
