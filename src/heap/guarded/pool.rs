//! The guarded pool: one sparse vmalloc area, its slots' records, and the queue of
//! freed slots.
//!
//! ```text
//!  page:   0       1       2       3       4          2N-1     2N
//!        +-------+-------+-------+-------+-------+  +-------+-------+
//!        | guard |slot 0 | guard |slot 1 | guard |..|slot N-1| guard |
//!        +-------+-------+-------+-------+-------+  +-------+-------+
//!          never   mapped   never  mapped   never     mapped   never
//!          mapped  while    mapped while    mapped    while    mapped
//!                  live            live               live
//! ```
//!
//! A slot's page is mapped ([`VmallocOps::map_page`]) when an object is placed in
//! it and unmapped, with every CPU's TLB flushed, when the object is freed
//! ([`VmallocOps::unmap_page`]); guard pages are never mapped. The page gets its
//! frame when the slot is first used and keeps it, not present while the slot is
//! free, until the pool goes: reusing a slot takes no frame and no page table (the
//! [sparse area](crate::vmalloc::sparse)'s promise). The records live in
//! a vmalloc area of their own, made with the pool, and change under the pool's
//! lock; the lock is never held across a call into the manager, nor while an
//! object's page is touched. Slots never used go first, then the one freed longest
//! ago (a FIFO), so a freed page stays unmapped as long as the pool allows, and a use
//! after free faults for that long. The order costs nothing: any reuse is the same
//! walk and, at its free, the same one-page flush.
//!
//! [`VmallocOps::map_page`]: crate::vmalloc::VmallocOps::map_page
//! [`VmallocOps::unmap_page`]: crate::vmalloc::VmallocOps::unmap_page

use super::site::CallSite;
use crate::PAGE_SIZE;
use crate::sync::{IrqGuard, IrqLock};
use crate::vmalloc::{VmFlags, VmOptions, VmallocOps};

/// The most slots a pool may have.
pub const MAX_SLOTS: usize = 1 << 14;

const PAGE: usize = PAGE_SIZE as usize;

/// What a slot holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(super) enum State {
    /// Never used: its page was never mapped.
    Unused = 0,
    /// One CPU is placing an object there: its page may be mapped.
    Placing,
    /// A live object.
    Live,
    /// An object was freed there: its page is unmapped, or being unmapped by the
    /// CPU freeing it (the slot goes back to the queue once it is).
    Freed,
}

/// One slot's record.
#[derive(Debug, Clone, Copy)]
pub(super) struct Slot {
    pub(super) state: State,
    /// The object's first byte and size.
    pub(super) addr: usize,
    pub(super) size: usize,
    pub(super) alloc: CallSite,
    pub(super) free: CallSite,
}

impl Slot {
    pub(super) const UNUSED: Slot = Slot {
        state: State::Unused,
        addr: 0,
        size: 0,
        alloc: CallSite::NONE,
        free: CallSite::NONE,
    };

    /// Whether the slot holds or held an object a report can name.
    pub(super) fn has_object(&self) -> bool {
        matches!(self.state, State::Live | State::Freed)
    }
}

/// The records and the queue, under the pool's lock.
pub(super) struct Records {
    slots: *mut Slot,
    /// Freed slots, oldest first: a ring of `count` indices.
    queue: *mut u16,
    head: usize,
    queued: usize,
    /// Slots `fresh..count` were never used.
    fresh: usize,
    /// Slots holding a live object.
    live: usize,
    count: usize,
    /// Objects placed so far: even ones go against their page's end, odd ones
    /// against its start.
    placed: u64,
}

// SAFETY: the records point into the pool's metadata area, which belongs to the pool
// alone; they are only used with the lock held.
unsafe impl Send for Records {}

impl Records {
    /// Slot `index`'s record.
    pub(super) fn slot(&self, index: usize) -> Option<&Slot> {
        // SAFETY: `slots` holds `count` initialised records.
        (index < self.count).then(|| unsafe { &*self.slots.add(index) })
    }

    fn slot_mut(&mut self, index: usize) -> Option<&mut Slot> {
        // SAFETY: as in `slot`; `&mut self` keeps it unique.
        (index < self.count).then(|| unsafe { &mut *self.slots.add(index) })
    }
}

/// The pool: where its area is, and its records.
pub(super) struct Pool {
    /// The sparse area's first byte (a guard page).
    pub(super) area: usize,
    /// Slots.
    pub(super) count: usize,
    records: IrqLock<Records>,
}

/// What [`Pool::start_free`] found.
pub(super) enum Freeing {
    /// The live object of slot `.0`, now marked freed; its record.
    Freed(usize, Slot),
    /// No live object starts at the pointer: the record of the slot it is in, if any.
    NotLive(Option<(usize, Slot)>),
}

/// What a pointer into the pool starts.
pub(super) enum Lookup {
    /// A live object: its record.
    Live(Slot),
    /// No live object: the record of the slot the pointer is in, if any.
    NotLive(Option<(usize, Slot)>),
}

/// A slot handed to the CPU that places an object in it.
pub(super) struct Taken {
    pub(super) index: usize,
    /// Whether the object goes against the page's end (else its start).
    pub(super) at_end: bool,
}

impl Pool {
    /// Makes a pool of `count` slots (at most [`MAX_SLOTS`]) in `vmalloc`: the sparse
    /// area, and the records' area. `None` if either cannot be had.
    pub(super) fn new(vmalloc: &dyn VmallocOps, count: usize) -> Option<Pool> {
        let count = count.clamp(1, MAX_SLOTS);
        let area = vmalloc
            .reserve_sparse(
                (2 * count + 1) * PAGE,
                &VmOptions {
                    tag: "kernel heap guarded pool",
                    ..VmOptions::default()
                },
            )
            .ok()?;
        let bytes = count * (size_of::<Slot>() + size_of::<u16>());
        let records = VmOptions {
            tag: "kernel heap guarded records",
            flags: VmFlags::ZERO,
            ..VmOptions::default()
        };
        let Ok(meta) = vmalloc.vmalloc_with(bytes, &records) else {
            // SAFETY: the area was made above and nothing uses it.
            let _ = unsafe { vmalloc.vfree(area.as_ptr()) };
            return None;
        };
        let slots = meta.as_ptr().cast::<Slot>();
        for index in 0..count {
            // SAFETY: the records' area holds `count` slots, then the queue; vmalloc
            // areas are page-aligned, and a `Slot` is smaller than a page.
            unsafe { slots.add(index).write(Slot::UNUSED) };
        }
        Some(Pool {
            area: area.as_ptr() as usize,
            count,
            records: IrqLock::new(Records {
                slots,
                // SAFETY: the queue follows the slots, inside the area; `Slot`'s
                // alignment is a multiple of `u16`'s.
                queue: unsafe { slots.add(count) }.cast::<u16>(),
                head: 0,
                queued: 0,
                fresh: 0,
                live: 0,
                count,
                placed: 0,
            }),
        })
    }

    /// Gives the pool's area (with the frames its slots keep) and its records back
    /// to `vmalloc` if no slot holds a live object; whether it did.
    ///
    /// # Safety
    ///
    /// Nothing uses the pool afterwards.
    pub(super) unsafe fn release(&self, vmalloc: &dyn VmallocOps) -> bool {
        let records = self.lock(vmalloc);
        if records.live > 0 {
            return false;
        }
        let meta = records.slots.cast::<u8>();
        drop(records);
        // SAFETY: the pool's two areas, made by `new`, which nothing uses now
        // (caller) and no live object is in.
        unsafe {
            let _ = vmalloc.vfree(meta);
            let _ = vmalloc.vfree(self.area as *mut u8);
        }
        true
    }

    /// Bytes of the pool's area.
    pub(super) fn len(&self) -> usize {
        (2 * self.count + 1) * PAGE
    }

    /// Slot `index`'s page: its first byte, and its index in the area.
    pub(super) fn page(&self, index: usize) -> (usize, usize) {
        let page = 2 * index + 1;
        (self.area + page * PAGE, page)
    }

    /// The records, the lock taken through `vmalloc`'s CPUs.
    pub(super) fn lock<'a>(&'a self, vmalloc: &'a dyn VmallocOps) -> IrqGuard<'a, Records> {
        self.records.lock(vmalloc)
    }

    /// The records if the lock can be had within a bounded wait (serving shootdowns
    /// meanwhile): for a fault handler, which must not wait for ever.
    pub(super) fn try_lock<'a>(
        &'a self,
        vmalloc: &'a dyn VmallocOps,
    ) -> Option<IrqGuard<'a, Records>> {
        for _ in 0..1 << 16 {
            if let Some(records) = self.records.try_lock(vmalloc) {
                return Some(records);
            }
            vmalloc.relax();
        }
        None
    }

    /// A slot for a new object: one never used, else the one freed longest ago
    /// (that one first if `used_first`: it keeps the frame it had, where a slot
    /// never used needs a new one). `None` when every slot holds an object (or is
    /// being freed).
    pub(super) fn take(&self, vmalloc: &dyn VmallocOps, used_first: bool) -> Option<Taken> {
        let mut records = self.lock(vmalloc);
        let index = if records.fresh < records.count && !(used_first && records.queued > 0) {
            records.fresh += 1;
            records.fresh - 1
        } else if records.queued > 0 {
            // SAFETY: `head` is below `count`: the queue's ring has `count` entries.
            let index = usize::from(unsafe { records.queue.add(records.head).read() });
            records.head = (records.head + 1) % records.count;
            records.queued -= 1;
            index
        } else {
            return None;
        };
        let at_end = records.placed.is_multiple_of(2);
        records.placed += 1;
        let slot = records.slot_mut(index)?;
        slot.state = State::Placing;
        Some(Taken { index, at_end })
    }

    /// Hands back a slot taken for an object that could not be placed; its page is
    /// not mapped. The last slot taken never used goes back among those (it has no
    /// frame: queued, it would come before slots that have one).
    pub(super) fn untake(&self, vmalloc: &dyn VmallocOps, index: usize) {
        let mut records = self.lock(vmalloc);
        let mut used = true;
        if let Some(slot) = records.slot_mut(index) {
            used = slot.alloc.caller.is_some();
            // It keeps what it showed before (unused, or a freed object's record).
            slot.state = if used { State::Freed } else { State::Unused };
        }
        if !used && index + 1 == records.fresh {
            records.fresh = index;
        } else {
            Self::enqueue(&mut records, index);
        }
    }

    /// Records the live object at `addr` in slot `index`.
    pub(super) fn publish(
        &self,
        vmalloc: &dyn VmallocOps,
        index: usize,
        addr: usize,
        size: usize,
        alloc: CallSite,
    ) {
        let mut records = self.lock(vmalloc);
        records.live += 1;
        if let Some(slot) = records.slot_mut(index) {
            *slot = Slot {
                state: State::Live,
                addr,
                size,
                alloc,
                free: CallSite::NONE,
            };
        }
    }

    /// Starts freeing the object at `ptr`: records the free and returns the slot's
    /// index and record; or, when `ptr` starts no live object, the slot's record (if
    /// `ptr` is in one), for a report.
    pub(super) fn start_free(
        &self,
        vmalloc: &dyn VmallocOps,
        ptr: usize,
        free: CallSite,
    ) -> Freeing {
        let offset = ptr.wrapping_sub(self.area);
        if offset >= self.len() || (offset / PAGE).is_multiple_of(2) {
            return Freeing::NotLive(None);
        }
        let index = offset / PAGE / 2;
        let mut records = self.lock(vmalloc);
        let Some(slot) = records.slot_mut(index) else {
            return Freeing::NotLive(None);
        };
        if slot.state != State::Live || slot.addr != ptr {
            return Freeing::NotLive(Some((index, *slot)));
        }
        slot.state = State::Freed;
        slot.free = free;
        let slot = *slot;
        records.live -= 1;
        Freeing::Freed(index, slot)
    }

    /// The record of the live object that starts at `ptr`; or, when none does, the
    /// record of the slot `ptr` is in (if any), as [`start_free`](Self::start_free)
    /// gives it.
    pub(super) fn live(&self, vmalloc: &dyn VmallocOps, ptr: usize) -> Lookup {
        let offset = ptr.wrapping_sub(self.area);
        if offset >= self.len() || (offset / PAGE).is_multiple_of(2) {
            return Lookup::NotLive(None);
        }
        let index = offset / PAGE / 2;
        let records = self.lock(vmalloc);
        match records.slot(index) {
            Some(slot) if slot.state == State::Live && slot.addr == ptr => Lookup::Live(*slot),
            found => Lookup::NotLive(found.map(|slot| (index, *slot))),
        }
    }

    /// Puts slot `index`, whose page is unmapped now, in the queue for reuse.
    pub(super) fn finish_free(&self, vmalloc: &dyn VmallocOps, index: usize) {
        let mut records = self.lock(vmalloc);
        Self::enqueue(&mut records, index);
    }

    fn enqueue(records: &mut Records, index: usize) {
        if records.queued >= records.count {
            return;
        }
        let tail = (records.head + records.queued) % records.count;
        // SAFETY: `tail` is below `count`; indices fit a `u16` (`MAX_SLOTS`).
        unsafe { records.queue.add(tail).write(index as u16) };
        records.queued += 1;
    }

    /// Copies of up to `out.len()` records from slot `from` on, the lock held only
    /// meanwhile; returns how many.
    pub(super) fn copy(&self, vmalloc: &dyn VmallocOps, from: usize, out: &mut [Slot]) -> usize {
        let records = self.lock(vmalloc);
        let mut copied = 0;
        while copied < out.len() {
            let Some(slot) = records.slot(from + copied) else {
                break;
            };
            out[copied] = *slot;
            copied += 1;
        }
        copied
    }

    /// Slots holding live objects, and those free for new ones.
    pub(super) fn counts(&self, vmalloc: &dyn VmallocOps) -> (usize, usize) {
        let records = self.lock(vmalloc);
        (records.live, records.count - records.fresh + records.queued)
    }
}

/// The pattern a slack byte at `addr` holds: it varies with the address, so bytes
/// moved by a few places do not pass for slack (Linux's KFENCE canary).
pub(super) const fn pattern(addr: usize) -> u8 {
    0xaa ^ (addr & 7) as u8
}

/// The pattern of eight slack bytes from an 8-aligned address, as one word.
const PATTERN_WORD: u64 = u64::from_le_bytes([
    pattern(0),
    pattern(1),
    pattern(2),
    pattern(3),
    pattern(4),
    pattern(5),
    pattern(6),
    pattern(7),
]);

/// Fills the bytes `[from, to)` with the slack pattern.
///
/// # Safety
///
/// The bytes are mapped writable and nothing else uses them.
pub(super) unsafe fn fill(from: usize, to: usize) {
    let mut at = from;
    while at < to {
        // SAFETY: inside `[from, to)` (caller).
        unsafe {
            if at.is_multiple_of(8) && to - at >= 8 {
                (at as *mut u64).write_volatile(PATTERN_WORD);
                at += 8;
            } else {
                (at as *mut u8).write_volatile(pattern(at));
                at += 1;
            }
        }
    }
}

/// The changed bytes of the slack `[from, to)`: how many, the first and the last.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Changed {
    pub(super) bytes: usize,
    pub(super) first: usize,
    pub(super) last: usize,
}

/// Checks the slack `[from, to)` against the pattern, adding what changed to `seen`.
///
/// # Safety
///
/// The bytes are mapped readable.
pub(super) unsafe fn check(from: usize, to: usize, seen: &mut Changed) {
    let mut at = from;
    while at < to {
        // SAFETY: inside `[from, to)` (caller).
        let whole_word = at.is_multiple_of(8)
            && to - at >= 8
            && unsafe { (at as *const u64).read_volatile() } == PATTERN_WORD;
        if whole_word {
            at += 8;
            continue;
        }
        let end = if at.is_multiple_of(8) && to - at >= 8 {
            at + 8
        } else {
            at + 1
        };
        while at < end {
            // SAFETY: as above.
            if unsafe { (at as *const u8).read_volatile() } != pattern(at) {
                if seen.bytes == 0 {
                    seen.first = at;
                }
                seen.bytes += 1;
                seen.last = at;
            }
            at += 1;
        }
    }
}
