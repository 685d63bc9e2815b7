//! The host window: simulated virtual addresses that host code can dereference.
//!
//! Physical memory lives in a `memfd` mapped `MAP_SHARED`, so any frame can be mapped
//! a second time elsewhere in the host's address space. The window is a reserved
//! (`PROT_NONE`) host range whose addresses the code under test also uses as
//! simulated virtual addresses. A first touch of a window page raises SIGSEGV; the
//! process-wide handler finds the window in a fixed registry of atomics, walks the
//! machine's page tables for the page (the MMU's own walk, entries read atomically)
//! and, if the access is allowed, maps the 4 KiB piece of the frame at that page with
//! the effective permissions, so the access retries and succeeds. The host's
//! mappings are thus a second TLB, filled on demand. A fill maps the pages after the
//! faulting one with it, as far as the tables map them and the window does not hold
//! them, up to the end of its 2 MiB (as a CPU may cache translations it was not
//! asked for): fresh memory is mostly written forwards, and each run of pages on
//! consecutive frames with the same rights is one host mapping, made with one call.
//!
//! Like a TLB it has a capacity. Each host-mapped page of scattered frames is a host
//! mapping of its own (and splits the reservation around it), and Linux allows a
//! process 65,530 by default (`vm.max_map_count`). Each window counts the host
//! mappings its pages make (every boundary between neighbouring pages in different
//! mappings), and the windows keep them under three quarters of that limit between
//! them; by default a window also counts its pages, and the windows keep at most
//! [`budget`] pages mapped between them (a quarter of that limit, so they use at
//! most about half of it); each window keeps at least [`FLOOR`] whatever the others
//! hold. Past that, a fill first evicts the window's oldest fill, with the other
//! pages it holds in the same 2 MiB (one call re-reserves them all), and the next
//! touch of an evicted page fills it again from the tables as they are then, as a
//! TLB refills an entry it evicted. Each window records, per page it holds, the
//! frame piece, the effective flags and the host rights it mapped, in a ring in fill
//! order with a hash index by page.
//!
//! A flush ([`TlbFlush`](vmalloc::TlbFlush)) re-walks the tables for the host-mapped
//! pages in its range and drops only those whose translation changed since the fill
//! (re-reserving them); a page whose entry is unchanged keeps its mapping, since a
//! refill would map the same frame with the same rights. So after a flush every
//! host-mapped page translates as the tables say now, as after a real flush, and an
//! unmap without a flush still leaves the old frame readable through the host
//! pointer, as on hardware; but a flush costs no refills of pages it did not change.
//!
//! An access the tables do not allow is a bug in the code under test, as an oops is
//! in a kernel: the handler prints one line naming the address to stderr, restores
//! the default action and returns, so the retried access kills the process with
//! SIGSEGV instead of looping. Faults outside every window go to the handler that was
//! installed before ours (Rust's stack-overflow handler).
//!
//! The Rust runtime installs that handler before `main` only if SIGSEGV still has its
//! default action, and reads the action before it allocates: a machine made inside
//! the process's first allocation (a global allocator that builds it on first use)
//! installs ours in between, and the runtime then installs its own over it. So while
//! the action ours replaced was the default, [`watch`] (called by every [`SimPhys`]
//! access and every flush, before the code under test can map a window page, and by
//! every interrupts-off, which each lock of the heap and the manager takes first)
//! checks that ours is still installed; if not, it installs it again in front,
//! chaining to the one that replaced it, and says so on stderr.
//!
//! The handler allocates nothing and takes no std lock. Each window has one lock,
//! `busy` (a futex), held while a fault fills pages and while a flush drops pages, so a
//! flush is never undone by a fill that walked the tables before the entry changed.
//! It cannot deadlock: the only code holding it is the fill and the flush, which make
//! system calls and read the page tables in the memfd mapping, never a window page,
//! so a thread never faults into the handler while holding it. Each registry slot
//! counts the handlers reading it, so that dropping a window waits for them before
//! unmapping what they read.
//!
//! [`SimPhys`]: super::SimPhys

use super::mmu::{self, Access, AccessKind, Translation};
use core::cell::UnsafeCell;
use core::ffi::{c_int, c_void};
use core::ptr::{self, NonNull};
use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::boxed::Box;
use std::sync::{Once, OnceLock};
use x86_64::PhysAddr;
use x86_64::structures::paging::{PageTableFlags, PhysFrame};

const PAGE: u64 = 4096;
/// Windows start on a 2 MiB boundary, so 2 MiB mappings can be tested in them.
const WINDOW_ALIGN: u64 = 2 << 20;
/// How many windows may exist at once (tests run machines in parallel threads).
const MAX_WINDOWS: usize = 64;
/// Pages a window may keep mapped, and host mappings it may split its reservation
/// into, whatever the other windows hold, so a small test next to a large one is not
/// made to refill its few pages on every touch.
pub(super) const FLOOR: usize = 64;
/// Pages the ring of a window bounded by mappings records at most (1 GiB of them):
/// past that a fill evicts, however few host mappings the pages cost.
const MAX_RING: usize = 1 << 18;
/// Turns a thread spins on a window's `busy` before it sleeps.
const SPINS_BEFORE_SLEEP: u32 = 100;
/// The states of a window's `busy`.
const FREE: u32 = 0;
const HELD: u32 = 1;
const CONTENDED: u32 = 2;

/// Error-code bits the CPU pushes for a page fault (the kernel passes them on in
/// `REG_ERR`).
const ERR_WRITE: u64 = 1 << 1;
const ERR_FETCH: u64 = 1 << 4;

/// Host-mapped pages of every window that bounds its pages, together.
static MAPPED: AtomicUsize = AtomicUsize::new(0);
/// The host mappings the windows' pages split their reservations into, over one
/// per window: between them, every boundary between two neighbouring window pages
/// that lie in different host mappings.
static SPLITS: AtomicUsize = AtomicUsize::new(0);
static LIMIT: OnceLock<usize> = OnceLock::new();

/// The host's limit on mappings per process.
fn limit() -> usize {
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
pub(super) fn budget() -> usize {
    page_budget(limit())
}

/// [`budget`] under a limit of `limit` mappings.
fn page_budget(limit: usize) -> usize {
    limit / 4
}

/// How many host mappings the windows of this process split their reservations
/// into between them: three quarters of the host's limit, so a quarter of it
/// (16,382 by default; a process rarely uses a thousand) stays for the rest of the
/// process.
fn mapping_budget(limit: usize) -> usize {
    limit / 4 * 3
}

/// What the signal handler needs of a machine with a host window; boxed, so its
/// address stays put while the machine moves.
#[derive(Debug)]
struct Window {
    fd: c_int,
    /// The memfd's mapping: physical address 0.
    memory: NonNull<u8>,
    memory_size: u64,
    start: u64,
    size: u64,
    root: PhysFrame,
    /// Held while filling a page or dropping host mappings: [`FREE`], [`HELD`], or
    /// [`CONTENDED`] (held, and a thread may sleep on it).
    busy: AtomicU32,
    /// Faults the handler served by filling pages: TLB misses of host accesses.
    fills: AtomicU64,
    /// The pages mapped now; used only with `busy` held.
    mapped: UnsafeCell<Mapped>,
}

/// A host-mapped page: the window page, and the frame piece, effective flags and
/// host rights the fill mapped it with.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
struct Entry {
    /// The page's address; 0 for a hole (a page a flush dropped since).
    page: u64,
    piece: u64,
    flags: u64,
    prot: u64,
}

impl Entry {
    /// Whether the host keeps `self` and `next`, the page after it, in one mapping:
    /// the kernel merges neighbouring mappings of consecutive pieces of the memfd
    /// with the same rights, and neighbouring reservations (`None`).
    fn joins(this: Option<Entry>, next: Option<Entry>) -> bool {
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
struct Mapped {
    ring: NonNull<Entry>,
    /// Ring slots (a power of two).
    capacity: usize,
    /// Ring positions, counting up: the next fill goes at `head`, the oldest is at
    /// `tail`; entries between them are pages or holes.
    head: u64,
    tail: u64,
    /// Pages (not holes) in the ring.
    live: usize,
    /// `2 * capacity` slots: 0 free, else a ring slot + 1; linear probing.
    index: NonNull<u32>,
    /// `capacity` words a flush sorts pages in (a flush may run inside a global
    /// allocator: it allocates nothing either).
    scratch: NonNull<u64>,
    /// The window's pages: those outside it are no neighbours.
    start: u64,
    end: u64,
    /// This window's share of [`SPLITS`]: its host mappings less one.
    splits: usize,
    /// Whether the window's pages count against [`budget`], not only their
    /// mappings against [`mapping_budget`].
    pages_bounded: bool,
}

/// The host rights of a page whose effective flags are `flags`: readable, and
/// writable if the tables allow it.
fn prot_of(flags: PageTableFlags) -> c_int {
    if flags.contains(PageTableFlags::WRITABLE) {
        libc::PROT_READ | libc::PROT_WRITE
    } else {
        libc::PROT_READ
    }
}

/// Why a window fault cannot be served.
#[derive(Clone, Copy)]
enum Refusal {
    NotMapped,
    NotAllowed,
    MapFailed,
}

impl Refusal {
    fn message(self) -> &'static [u8] {
        match self {
            Refusal::NotMapped => b"page not mapped in the simulated page tables",
            Refusal::NotAllowed => b"access not allowed by the simulated page tables",
            Refusal::MapFailed => b"mmap of the frame failed",
        }
    }
}

impl Mapped {
    /// Room for `capacity` pages (a power of two) of the window `start..end`.
    fn new(capacity: usize, start: u64, end: u64, pages_bounded: bool) -> Mapped {
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

    fn slot_of(&self, position: u64) -> usize {
        position as usize & (self.capacity - 1)
    }

    fn entry(&mut self, slot: usize) -> &mut Entry {
        debug_assert!(slot < self.capacity);
        // SAFETY: `slot` is below the capacity the ring was mapped with; `&mut self`
        // makes this the only reference.
        unsafe { &mut *self.ring.as_ptr().add(slot) }
    }

    /// A copy of the entry in ring slot `slot`.
    fn get(&self, slot: usize) -> Entry {
        debug_assert!(slot < self.capacity);
        // SAFETY: `slot` is below the capacity the ring was mapped with.
        unsafe { self.ring.as_ptr().add(slot).read() }
    }

    fn index_slot(&mut self, at: usize) -> &mut u32 {
        debug_assert!(at < 2 * self.capacity);
        // SAFETY: as in `entry`, for the index's `2 * capacity` slots.
        unsafe { &mut *self.index.as_ptr().add(at) }
    }

    /// Scratch word `at` (below the capacity).
    fn scratch(&mut self, at: usize) -> &mut u64 {
        debug_assert!(at < self.capacity);
        // SAFETY: as in `entry`, for the scratch's `capacity` words.
        unsafe { &mut *self.scratch.as_ptr().add(at) }
    }

    /// The first `len` scratch words (at most the capacity).
    fn scratch_slice(&mut self, len: usize) -> &mut [u64] {
        debug_assert!(len <= self.capacity);
        // SAFETY: as in `scratch`.
        unsafe { core::slice::from_raw_parts_mut(self.scratch.as_ptr(), len) }
    }

    /// Where `page` hashes to in the index.
    fn home(&self, page: u64) -> usize {
        let bits = (2 * self.capacity).trailing_zeros();
        ((page / PAGE).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - bits)) as usize
    }

    /// The index position and ring slot of `page`, if it is mapped.
    fn find(&mut self, page: u64) -> Option<(usize, usize)> {
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

    fn insert(&mut self, page: u64, slot: usize) {
        let mask = 2 * self.capacity - 1;
        let mut at = self.home(page);
        while *self.index_slot(at) != 0 {
            at = (at + 1) & mask;
        }
        *self.index_slot(at) = slot as u32 + 1;
    }

    /// Takes index position `at` out, shifting back the entries that probed past it.
    fn remove(&mut self, mut at: usize) {
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
    fn lookup(&mut self, page: u64) -> Option<Entry> {
        self.find(page).map(|(_, slot)| self.get(slot))
    }

    /// The boundaries on either side of `page` (inside the window) between
    /// different host mappings, were `page` as `this` says.
    fn splits_around(&mut self, page: u64, this: Option<Entry>) -> usize {
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
    fn account(&mut self, before: usize, after: usize) {
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
    fn forget(&mut self, at: usize, slot: usize) {
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
    fn push(&mut self, entry: Entry) {
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

    /// Records that the page in ring slot `slot` is mapped as `entry` now.
    fn update(&mut self, slot: usize, entry: Entry) {
        let before = self.splits_around(entry.page, Some(self.get(slot)));
        *self.entry(slot) = entry;
        let after = self.splits_around(entry.page, Some(entry));
        self.account(before, after);
    }

    /// Takes the newest `count` pages off the ring again (a fill whose mapping the
    /// host refused): they are at its head, in the order they were pushed.
    fn pop_newest(&mut self, count: usize) {
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
    fn pop_oldest(&mut self) -> Option<u64> {
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
    fn compact(&mut self) {
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
    fn must_evict(&mut self, pages: usize, splits: usize) -> bool {
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

impl Window {
    fn contains(&self, addr: u64) -> bool {
        addr.wrapping_sub(self.start) < self.size
    }

    /// Takes `busy`, for the pages mapped now: a few turns of spinning, then sleeps
    /// on it (a futex, which a signal handler may wait on) until the holder wakes
    /// it. The holder makes system calls, and there may be more threads than host
    /// cores: spinning waiters would take the cores it needs.
    fn lock(&self) -> Busy<'_> {
        for _ in 0..SPINS_BEFORE_SLEEP {
            if self
                .busy
                .compare_exchange_weak(FREE, HELD, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                return Busy { window: self };
            }
            core::hint::spin_loop();
        }
        // Held with a sleeper from now on, until the holder lets go and wakes one.
        while self.busy.swap(CONTENDED, Ordering::Acquire) != FREE {
            // SAFETY: waits on a word of this window while it holds `CONTENDED`;
            // returns at once if it no longer does.
            unsafe {
                libc::syscall(
                    libc::SYS_futex,
                    self.busy.as_ptr(),
                    libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
                    CONTENDED,
                    ptr::null::<libc::timespec>(),
                )
            };
        }
        Busy { window: self }
    }

    /// Serves a fault at `addr` with error code `err`: maps the page's frame, or
    /// says why not.
    fn fill(&self, addr: u64, err: u64) -> Result<(), Refusal> {
        let kind = if err & ERR_WRITE != 0 {
            AccessKind::Write
        } else if err & ERR_FETCH != 0 {
            AccessKind::Fetch
        } else {
            AccessKind::Read
        };
        let access = Access { kind, user: false };
        let page = addr & !(PAGE - 1);
        let mut mapped = self.lock();
        self.fills.fetch_add(1, Ordering::Relaxed);
        match self.walk(page) {
            None => Err(Refusal::NotMapped),
            Some(translation) if !translation.permits(access) => Err(Refusal::NotAllowed),
            Some(translation) => self.map_page(&mut mapped, page, translation, kind),
        }
    }

    /// The translation of `page` under the tables as they are now.
    fn walk(&self, page: u64) -> Option<Translation> {
        mmu::walk(self.root, page, |entry, _| self.load_entry(entry)).ok()
    }

    /// The entry at `entry`, or 0 (not present) outside the memory: the handler
    /// must not panic.
    fn load_entry(&self, entry: PhysAddr) -> u64 {
        if entry.as_u64() >= self.memory_size {
            return 0;
        }
        // SAFETY: inside the memfd mapping (checked above) and 8-aligned (a table
        // base is 4 KiB-aligned, the index scaled by 8); the mapping lives as long
        // as the window. Atomic, like the MMU's loads.
        let entry = unsafe { self.memory.as_ptr().add(entry.as_u64() as usize) };
        // SAFETY: as above.
        unsafe { AtomicU64::from_ptr(entry.cast()) }.load(Ordering::Acquire)
    }

    /// Maps the 4 KiB of physical memory `translation` reaches at window page `page`
    /// and records it, evicting the oldest fills first if the budget says so. A
    /// fresh fill maps the pages after it too (see [`Window::look_ahead`]), each run
    /// of consecutive pieces with the same rights with one call.
    fn map_page(
        &self,
        mapped: &mut Mapped,
        page: u64,
        translation: Translation,
        kind: AccessKind,
    ) -> Result<(), Refusal> {
        let mut prot = prot_of(translation.flags);
        // Executable only when fetched from, so data pages stay non-executable.
        if kind == AccessKind::Fetch {
            prot |= libc::PROT_EXEC;
        }
        let faulting = Entry {
            page,
            piece: translation.phys().as_u64() & !(PAGE - 1),
            flags: translation.flags.bits(),
            prot: prot as u64,
        };
        if faulting.piece >= self.memory_size {
            return Err(Refusal::NotMapped);
        }
        // A page mapped already faults again when the access needs more rights than
        // it was mapped with (the tables gave them since, or it is fetched from).
        if let Some((_, slot)) = mapped.find(page) {
            self.map_run(page, PAGE, faulting.piece, prot)
                .map_err(|()| Refusal::MapFailed)?;
            mapped.update(slot, faulting);
            return Ok(());
        }
        let mut walker = Walker::new(self);
        let (pages, runs) = self.look_ahead(mapped, &mut walker, faulting);
        while mapped.must_evict(pages, runs + 1) && mapped.tail < mapped.head {
            if let Some(oldest) = mapped.pop_oldest() {
                self.evict_around(mapped, oldest)
                    .map_err(|()| Refusal::MapFailed)?;
            }
        }
        // The same pages again (evicting changed none of them): each is recorded as
        // it is met, and each run mapped when it ends.
        let mut run = Run {
            first: faulting,
            last: faulting,
            len: 1,
        };
        mapped.push(faulting);
        for _ in 1..pages {
            let Some(ahead) = self.ahead(mapped, &mut walker, run.last.page + PAGE) else {
                break;
            };
            if !Entry::joins(Some(run.last), Some(ahead)) {
                if self.map_recorded(mapped, &run).is_err() {
                    return self.refused(mapped, run.first.page == page);
                }
                run = Run {
                    first: ahead,
                    last: ahead,
                    len: 0,
                };
            }
            mapped.push(ahead);
            run.last = ahead;
            run.len += 1;
        }
        if self.map_recorded(mapped, &run).is_err() {
            return self.refused(mapped, run.first.page == page);
        }
        Ok(())
    }

    /// Counts the pages a fresh fill of `faulting` maps and the runs they make: the
    /// pages after it that the tables map (as a CPU may cache translations it was
    /// not asked for) and the window does not hold, up to the first that is not, or
    /// the end of its 2 MiB. Most accesses to fresh heap memory move forward (a
    /// slab's objects, a buffer being written), so this saves a host fault for each
    /// page but the first, and a run of consecutive frames costs one call.
    fn look_ahead(
        &self,
        mapped: &mut Mapped,
        walker: &mut Walker,
        faulting: Entry,
    ) -> (usize, usize) {
        let (mut pages, mut runs, mut last) = (1, 1, faulting);
        while let Some(ahead) = self.ahead(mapped, walker, last.page + PAGE) {
            if !Entry::joins(Some(last), Some(ahead)) {
                runs += 1;
            }
            (pages, last) = (pages + 1, ahead);
        }
        (pages, runs)
    }

    /// What a fill would map at `page`, after the page it faulted on: nothing if
    /// the page starts another 2 MiB or is outside the window, if the window holds
    /// it, or if the tables do not map it.
    fn ahead(&self, mapped: &mut Mapped, walker: &mut Walker, page: u64) -> Option<Entry> {
        if page.is_multiple_of(WINDOW_ALIGN) || !self.contains(page) || mapped.find(page).is_some()
        {
            return None;
        }
        let translation = walker.walk(page)?;
        let piece = translation.phys().as_u64() & !(PAGE - 1);
        (piece < self.memory_size).then(|| Entry {
            page,
            piece,
            flags: translation.flags.bits(),
            prot: prot_of(translation.flags) as u64,
        })
    }

    /// Maps `run`, whose pages are the newest recorded; forgets them if the host
    /// refuses.
    fn map_recorded(&self, mapped: &mut Mapped, run: &Run) -> Result<(), ()> {
        let prot = run.first.prot as c_int;
        self.map_run(run.first.page, run.len * PAGE, run.first.piece, prot)
            .inspect_err(|()| mapped.pop_newest(run.len as usize))
    }

    /// The host refused a mapping (out of mappings, which the budget should have
    /// prevented). If it was the faulting page's, the oldest fill is evicted and the
    /// access, retried, faults again; pages after it wait for faults of their own.
    fn refused(&self, mapped: &mut Mapped, faulting: bool) -> Result<(), Refusal> {
        if !faulting {
            return Ok(());
        }
        while mapped.tail < mapped.head {
            if let Some(oldest) = mapped.pop_oldest() {
                return self
                    .evict_around(mapped, oldest)
                    .map_err(|()| Refusal::MapFailed);
            }
        }
        Err(Refusal::MapFailed)
    }

    /// Maps `len` bytes of the memfd from `piece` at window address `start`, with
    /// the host's page tables filled at once: a first write to a shared mapping is
    /// a host page fault of its own per page, where one call fills them all.
    fn map_run(&self, start: u64, len: u64, piece: u64, prot: c_int) -> Result<(), ()> {
        // SAFETY: the range is in the window, which this machine reserved and
        // nothing else maps; replacing it changes no memory Rust code owns.
        let done = unsafe {
            libc::mmap(
                start as *mut c_void,
                len as usize,
                prot,
                libc::MAP_SHARED | libc::MAP_FIXED | libc::MAP_POPULATE,
                self.fd,
                piece as libc::off_t,
            )
        };
        if done == libc::MAP_FAILED {
            Err(())
        } else {
            Ok(())
        }
    }

    /// Evicts the host-mapped pages of the 2 MiB of the window around `oldest` (the
    /// oldest fill, already taken off the ring): one call re-reserves them all, where
    /// a page at a time would cost a call per page.
    fn evict_around(&self, mapped: &mut Mapped, oldest: u64) -> Result<(), ()> {
        let first = (oldest & !(WINDOW_ALIGN - 1)).max(self.start);
        let end = (first + WINDOW_ALIGN).min(self.start + self.size);
        for page in (first..end).step_by(PAGE as usize) {
            if let Some((at, slot)) = mapped.find(page) {
                mapped.forget(at, slot);
            }
        }
        try_reserve(Some(first), end - first).map(|_| ())
    }

    /// A flush of window pages `start_vpn..end_vpn` (clipped to the window): drops
    /// the host mappings there whose translation changed since they were filled.
    fn flush(&self, start_vpn: u64, end_vpn: u64) {
        let start = (start_vpn.saturating_mul(PAGE)).max(self.start);
        let end = (end_vpn.saturating_mul(PAGE)).min(self.start + self.size);
        if start >= end {
            return;
        }
        let mut mapped = self.lock();
        let mut walker = Walker::new(self);
        // The pages to drop, in address order, in the scratch words.
        let mut dropped = 0;
        if (end - start) / PAGE <= 2 * mapped.live as u64 {
            // Look each page up.
            for page in (start..end).step_by(PAGE as usize) {
                if let Some(entry) = mapped.lookup(page)
                    && walker.changed(&entry)
                {
                    *mapped.scratch(dropped) = page;
                    dropped += 1;
                }
            }
        } else {
            // Fewer pages mapped than covered: take them from the ring. It is in
            // fill order, so mostly in runs, whose walks share their upper levels.
            for position in mapped.tail..mapped.head {
                let entry = mapped.get(mapped.slot_of(position));
                if entry.page != 0 && (start..end).contains(&entry.page) && walker.changed(&entry) {
                    *mapped.scratch(dropped) = entry.page;
                    dropped += 1;
                }
            }
            mapped.scratch_slice(dropped).sort_unstable();
        }
        // Each run of neighbouring pages goes with one call (pages between runs are
        // kept, or reserved already), rather than a call, and a host TLB shootdown,
        // each.
        let mut run: Option<(u64, u64)> = None;
        for index in 0..dropped {
            let page = *mapped.scratch(index);
            if let Some((at, slot)) = mapped.find(page) {
                mapped.forget(at, slot);
            }
            run = match run {
                Some((first, end)) if end == page => Some((first, page + PAGE)),
                Some((first, end)) => {
                    reserve(Some(first), end - first);
                    Some((page, page + PAGE))
                }
                None => Some((page, page + PAGE)),
            };
        }
        if let Some((first, end)) = run {
            reserve(Some(first), end - first);
        }
    }
}

/// Pages of a fill that one call maps: consecutive pieces with the same rights.
struct Run {
    first: Entry,
    last: Entry,
    len: u64,
}

/// Walks the tables for a fill or a flush, which meet pages in address or fill
/// order: the pages of one 2 MiB share their upper-level entries, which it reads
/// once. (Tables changing during the fill or flush are a race the code under test
/// has with the access or the flush, as on hardware.)
struct Walker<'w> {
    window: &'w Window,
    /// Per level 2 to 4: the address of the entry read last there, plus one (0:
    /// none), and the entry.
    upper: [(u64, u64); 3],
}

impl<'w> Walker<'w> {
    fn new(window: &'w Window) -> Self {
        Self {
            window,
            upper: [(0, 0); 3],
        }
    }

    /// The translation of `page`.
    fn walk(&mut self, page: u64) -> Option<Translation> {
        let (window, upper) = (self.window, &mut self.upper);
        mmu::walk(window.root, page, |entry, level| {
            let Some(cached) = (level as usize)
                .checked_sub(2)
                .and_then(|at| upper.get_mut(at))
            else {
                return window.load_entry(entry);
            };
            if cached.0 != entry.as_u64() + 1 {
                *cached = (entry.as_u64() + 1, window.load_entry(entry));
            }
            cached.1
        })
        .ok()
    }

    /// Whether the recorded fill no longer matches what the tables say now.
    fn changed(&mut self, entry: &Entry) -> bool {
        self.walk(entry.page).is_none_or(|now| {
            now.phys().as_u64() & !(PAGE - 1) != entry.piece || now.flags.bits() != entry.flags
        })
    }
}

/// A window's `busy` held, with its pages; dropping it lets go.
struct Busy<'w> {
    window: &'w Window,
}

impl core::ops::Deref for Busy<'_> {
    type Target = Mapped;
    fn deref(&self) -> &Mapped {
        // SAFETY: `busy` is held while this value lives, so nothing else reaches the
        // pages.
        unsafe { &*self.window.mapped.get() }
    }
}

impl core::ops::DerefMut for Busy<'_> {
    fn deref_mut(&mut self) -> &mut Mapped {
        // SAFETY: as in `deref`; `&mut self` makes this the only reference.
        unsafe { &mut *self.window.mapped.get() }
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        if self.window.busy.swap(FREE, Ordering::Release) == CONTENDED {
            // SAFETY: wakes one thread sleeping on a word of this window.
            unsafe {
                libc::syscall(
                    libc::SYS_futex,
                    self.window.busy.as_ptr(),
                    libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
                    1,
                )
            };
        }
    }
}

/// Reserves `size` bytes of host address space, inaccessible and costing no
/// memory: anywhere, or exactly at `at` (replacing what is there).
///
/// # Panics
///
/// If the host refuses.
fn reserve(at: Option<u64>, size: u64) -> u64 {
    let reserved = try_reserve(at, size);
    assert!(
        reserved.is_ok(),
        "host window: cannot reserve {size:#x} bytes: {}",
        std::io::Error::last_os_error()
    );
    reserved.unwrap_or_default()
}

/// [`reserve`], failing with `Err` instead of panicking.
fn try_reserve(at: Option<u64>, size: u64) -> Result<u64, ()> {
    let (hint, fixed) = match at {
        Some(addr) => (addr as *mut c_void, libc::MAP_FIXED),
        None => (ptr::null_mut(), 0),
    };
    // SAFETY: without `at`, a fresh range; with it, a range of a window this machine
    // owns, which no Rust reference points into.
    let addr = unsafe {
        libc::mmap(
            hint,
            size as usize,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | fixed,
            -1,
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        Err(())
    } else {
        Ok(addr as u64)
    }
}

/// `size` bytes of zeroed, readable and writable host memory of its own, backed only
/// where touched.
///
/// # Panics
///
/// If the host refuses.
fn anonymous(size: usize) -> NonNull<u8> {
    // SAFETY: a fresh private mapping; the result is checked.
    let addr = unsafe {
        libc::mmap(
            ptr::null_mut(),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    assert!(
        addr != libc::MAP_FAILED,
        "host window: cannot map {size:#x} bytes of bookkeeping: {}",
        std::io::Error::last_os_error()
    );
    NonNull::new(addr.cast()).expect("mmap never returns null")
}

/// Unmaps `size` bytes at `addr`; failure only leaks address space.
fn unmap(addr: u64, size: u64) {
    if size > 0 {
        // SAFETY: the caller owns the range and no reference points into it.
        unsafe { libc::munmap(addr as *mut c_void, size as usize) };
    }
}

/// A slot of the registry: a live window, and how many handlers are reading it.
struct Slot {
    window: AtomicPtr<Window>,
    readers: AtomicUsize,
}

static SLOTS: [Slot; MAX_WINDOWS] = [const {
    Slot {
        window: AtomicPtr::new(ptr::null_mut()),
        readers: AtomicUsize::new(0),
    }
}; MAX_WINDOWS];

/// How many times ours may be put back in front of a handler that replaced it.
const REINSTALLS: usize = 4;
/// The action faults outside every window go to: `PREVIOUS[CHAIN]`, the one ours
/// replaced last. Set before `CHAIN` points to it, never changed afterwards, so the
/// handler reads it without a lock.
static PREVIOUS: [OnceLock<libc::sigaction>; REINSTALLS + 1] =
    [const { OnceLock::new() }; REINSTALLS + 1];
static CHAIN: AtomicUsize = AtomicUsize::new(0);
static INSTALL: Once = Once::new();
/// Checks [`watch`] still makes (see the module documentation): 0 once ours has
/// been found replaced and put back, or when it replaced a handler, not the default.
static WATCH: AtomicU32 = AtomicU32::new(0);
/// How many checks a process watching its handler makes at most: a program whose
/// runtime installs no handler of its own is not slowed down for ever.
const WATCH_CHECKS: u32 = 100_000;
/// Held while putting ours back.
static REINSTALLING: AtomicBool = AtomicBool::new(false);
/// Set once a refused fault restored the default action: nothing is put back then.
static DYING: AtomicBool = AtomicBool::new(false);

/// A machine's physical memory in a memfd, and its host window.
#[derive(Debug)]
pub(super) struct HostMemory {
    window: NonNull<Window>,
    slot: usize,
}

impl HostMemory {
    /// `memory_size` bytes of zeroed memory and a window of `window_size` bytes,
    /// served with the page tables under `root`.
    ///
    /// # Panics
    ///
    /// If `window_size` is zero or not a multiple of 4 KiB, if the host refuses the
    /// memfd or a mapping, or if [`MAX_WINDOWS`] windows already exist.
    pub(super) fn new(
        memory_size: u64,
        window_size: u64,
        root: PhysFrame,
        pages_bounded: bool,
    ) -> HostMemory {
        assert!(
            window_size > 0 && window_size.is_multiple_of(PAGE),
            "host window size {window_size:#x} is not a positive multiple of 4 KiB"
        );
        let (fd, memory) = shared_memory(memory_size);
        // The limit is read before the first window exists (`must_evict` needs it).
        limit();
        let most = if pages_bounded { budget() } else { MAX_RING };
        // As many pages as the window has, up to the most it may hold.
        let capacity = (window_size / PAGE)
            .min(most as u64)
            .next_power_of_two()
            .max(64) as usize;
        let start = reserve_aligned(window_size);
        let window = Box::new(Window {
            fd,
            memory,
            memory_size,
            start,
            size: window_size,
            root,
            busy: AtomicU32::new(FREE),
            fills: AtomicU64::new(0),
            mapped: UnsafeCell::new(Mapped::new(
                capacity,
                start,
                start + window_size,
                pages_bounded,
            )),
        });
        let window = NonNull::from(Box::leak(window));
        INSTALL.call_once(install_handler);
        watch();
        let slot = SLOTS
            .iter()
            .position(|slot| {
                slot.window
                    .compare_exchange(
                        ptr::null_mut(),
                        window.as_ptr(),
                        Ordering::SeqCst,
                        Ordering::SeqCst,
                    )
                    .is_ok()
            })
            .expect("too many simulated machines with a host window at once");
        HostMemory { window, slot }
    }

    fn window(&self) -> &Window {
        // SAFETY: the window is leaked from a box in `new` and freed only in `drop`.
        unsafe { self.window.as_ref() }
    }

    /// Physical address 0 in the host.
    pub(super) fn memory(&self) -> NonNull<u8> {
        self.window().memory
    }

    /// The window's start and size.
    pub(super) fn range(&self) -> (u64, u64) {
        (self.window().start, self.window().size)
    }

    /// Window pages filled so far.
    pub(super) fn fills(&self) -> u64 {
        self.window().fills.load(Ordering::Relaxed)
    }

    /// Window pages host-mapped now.
    pub(super) fn mapped_pages(&self) -> usize {
        self.window().lock().live
    }

    /// Host mappings the window's range is split into now, by its own count.
    #[cfg(test)]
    pub(super) fn mappings(&self) -> usize {
        self.window().lock().splits + 1
    }

    /// A flush of pages `start_vpn..end_vpn`: drops the host mappings there whose
    /// translation changed.
    pub(super) fn flush(&self, start_vpn: u64, end_vpn: u64) {
        watch();
        self.window().flush(start_vpn, end_vpn);
    }

    /// A flush of every page: drops the host mappings whose translation changed.
    pub(super) fn flush_all(&self) {
        let window = self.window();
        self.flush(window.start / PAGE, (window.start + window.size) / PAGE);
    }
}

impl Drop for HostMemory {
    fn drop(&mut self) {
        let slot = &SLOTS[self.slot];
        slot.window.store(ptr::null_mut(), Ordering::SeqCst);
        while slot.readers.load(Ordering::SeqCst) != 0 {
            core::hint::spin_loop();
        }
        // SAFETY: unregistered and no handler reads it any more (waited above); it
        // came from `Box::leak` in `new`.
        let window = unsafe { Box::from_raw(self.window.as_ptr()) };
        let mapped = window.mapped.into_inner();
        SPLITS.fetch_sub(mapped.splits, Ordering::Relaxed);
        if mapped.pages_bounded {
            MAPPED.fetch_sub(mapped.live, Ordering::Relaxed);
        }
        unmap(
            mapped.ring.as_ptr() as u64,
            (mapped.capacity * size_of::<Entry>()) as u64,
        );
        unmap(
            mapped.index.as_ptr() as u64,
            (2 * mapped.capacity * size_of::<u32>()) as u64,
        );
        unmap(
            mapped.scratch.as_ptr() as u64,
            (mapped.capacity * size_of::<u64>()) as u64,
        );
        unmap(window.start, window.size);
        unmap(window.memory.as_ptr() as u64, window.memory_size);
        // SAFETY: the memfd is owned by the window and closed once, here.
        unsafe { libc::close(window.fd) };
    }
}

/// A memfd of `size` bytes (sparse, so zeroed and backed only where touched), and
/// its shared mapping.
fn shared_memory(size: u64) -> (c_int, NonNull<u8>) {
    // SAFETY: a valid C string and flags; the result is checked.
    let fd = unsafe { libc::memfd_create(c"vmalloc-sim".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is the memfd just made.
    let sized = unsafe { libc::ftruncate(fd, size as libc::off_t) };
    assert!(sized == 0, "ftruncate: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh shared mapping of the whole file; the result is checked.
    let memory = unsafe {
        libc::mmap(
            ptr::null_mut(),
            size as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_NORESERVE,
            fd,
            0,
        )
    };
    assert!(
        memory != libc::MAP_FAILED,
        "mmap of the simulated memory: {}",
        std::io::Error::last_os_error()
    );
    (
        fd,
        NonNull::new(memory.cast()).expect("mmap never returns null"),
    )
}

/// Reserves `size` bytes at a `WINDOW_ALIGN` boundary: reserve more, trim the ends.
fn reserve_aligned(size: u64) -> u64 {
    let padded = size + WINDOW_ALIGN;
    let raw = reserve(None, padded);
    let start = raw.next_multiple_of(WINDOW_ALIGN);
    unmap(raw, start - raw);
    unmap(start + size, raw + padded - (start + size));
    start
}

/// The SIGSEGV action now.
fn current_action() -> libc::sigaction {
    // SAFETY: all-zero is a valid `sigaction` (no handler, empty mask, no flags).
    let mut action: libc::sigaction = unsafe { core::mem::zeroed() };
    // SAFETY: querying the current action into a valid struct.
    unsafe { libc::sigaction(libc::SIGSEGV, ptr::null(), &mut action) };
    action
}

fn ours() -> libc::sighandler_t {
    on_segv as *const () as libc::sighandler_t
}

/// Installs ours, to chain to `previous` (the action it replaces).
fn install_over(previous: libc::sigaction) {
    let chain = CHAIN.load(Ordering::Acquire);
    let next = if PREVIOUS[chain].get().is_none() {
        chain
    } else {
        chain + 1
    };
    let Some(slot) = PREVIOUS.get(next) else {
        return;
    };
    let _ = slot.set(previous);
    CHAIN.store(next, Ordering::Release);
    // SAFETY: all-zero is a valid `sigaction`.
    let mut action: libc::sigaction = unsafe { core::mem::zeroed() };
    action.sa_sigaction = ours();
    // On the alternate stack when there is one, as Rust's handler, so a stack
    // overflow still reaches it through us.
    action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
    // SAFETY: `sa_mask` is a valid sigset; installing a handler with the
    // `SA_SIGINFO` signature.
    unsafe {
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGSEGV, &action, ptr::null_mut());
    }
    // Replacing the default action, ours may be replaced in turn by a runtime that
    // read the default before it (see the module documentation).
    let watch = if previous.sa_sigaction == libc::SIG_DFL {
        WATCH_CHECKS
    } else {
        0
    };
    WATCH.store(watch, Ordering::Relaxed);
}

fn install_handler() {
    install_over(current_action());
}

/// Whether the SIGSEGV action is ours now.
pub(super) fn installed() -> bool {
    INSTALL.is_completed() && current_action().sa_sigaction == ours()
}

/// Watches the handler again as if ours had replaced the default action: a forked
/// test child then plays the runtime that installs its own over ours.
#[cfg(test)]
pub(super) fn watch_again() {
    WATCH.store(WATCH_CHECKS, Ordering::Relaxed);
}

/// While ours may still be replaced (see the module documentation): checks that it
/// is installed, and if it is not, installs it again in front of the one that
/// replaced it and says so. One relaxed load otherwise. Allocates nothing: it runs
/// inside the code under test, which may be a global allocator.
pub(super) fn watch() {
    if WATCH.load(Ordering::Relaxed) == 0 {
        return;
    }
    let _ = WATCH.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
        left.checked_sub(1)
    });
    let current = current_action();
    if current.sa_sigaction == ours()
        || DYING.load(Ordering::Relaxed)
        || REINSTALLING.swap(true, Ordering::Acquire)
    {
        return;
    }
    let full = CHAIN.load(Ordering::Acquire) >= REINSTALLS;
    if full {
        WATCH.store(0, Ordering::Relaxed);
        say(b"vmalloc-sim host window: the SIGSEGV handler was replaced again; window faults now reach the new handler\n");
    } else {
        install_over(current);
        say(b"vmalloc-sim host window: the SIGSEGV handler was replaced after the machine was made (by the Rust runtime, if the machine was made before main); installed again in front of the new one\n");
    }
    REINSTALLING.store(false, Ordering::Release);
}

extern "C" fn on_segv(signal: c_int, info: *mut libc::siginfo_t, context: *mut c_void) {
    // SAFETY: the kernel passes a valid siginfo for a SIGSEGV with `SA_SIGINFO`.
    let addr = unsafe { (*info).si_addr() } as u64;
    // SAFETY: and a valid `ucontext_t`, whose `REG_ERR` holds the page-fault error
    // code on x86_64.
    let err = unsafe { (*context.cast::<libc::ucontext_t>()).uc_mcontext.gregs }
        [libc::REG_ERR as usize] as u64;
    match serve(addr, err) {
        Some(Ok(())) => {}
        Some(Err(refusal)) => {
            report(addr, refusal);
            die_on_return();
        }
        None => chain(signal, info, context),
    }
}

/// Serves a fault in a registered window; `None` if `addr` is in none.
fn serve(addr: u64, err: u64) -> Option<Result<(), Refusal>> {
    SLOTS.iter().find_map(|slot| {
        // Announce the read before loading the pointer, so `drop` waits for it.
        slot.readers.fetch_add(1, Ordering::SeqCst);
        let window = slot.window.load(Ordering::SeqCst);
        // SAFETY: a registered window stays allocated while `readers` is non-zero.
        let outcome = unsafe { window.as_ref() }
            .filter(|window| window.contains(addr))
            .map(|window| window.fill(addr, err));
        slot.readers.fetch_sub(1, Ordering::SeqCst);
        outcome
    })
}

/// Hands a fault outside every window to the action ours replaced.
fn chain(signal: c_int, info: *mut libc::siginfo_t, context: *mut c_void) {
    let Some(previous) = PREVIOUS[CHAIN.load(Ordering::Acquire)].get() else {
        return die_on_return();
    };
    match previous.sa_sigaction {
        libc::SIG_DFL | libc::SIG_IGN => die_on_return(),
        handler if previous.sa_flags & libc::SA_SIGINFO != 0 => {
            // SAFETY: with `SA_SIGINFO` the handler has this signature.
            let handler: extern "C" fn(c_int, *mut libc::siginfo_t, *mut c_void) =
                unsafe { core::mem::transmute(handler) };
            handler(signal, info, context);
        }
        handler => {
            // SAFETY: without `SA_SIGINFO` the handler takes only the signal.
            let handler: extern "C" fn(c_int) = unsafe { core::mem::transmute(handler) };
            handler(signal);
        }
    }
}

/// Restores the default action, so the faulting access, retried, kills the process.
fn die_on_return() {
    DYING.store(true, Ordering::Relaxed);
    // SAFETY: all-zero with `SIG_DFL` (0) is the default action.
    let action: libc::sigaction = unsafe { core::mem::zeroed() };
    // SAFETY: `sigaction` is async-signal-safe.
    unsafe { libc::sigaction(libc::SIGSEGV, &action, ptr::null_mut()) };
}

/// Writes `line` to stderr, without allocating.
fn say(line: &[u8]) {
    // SAFETY: `write` is async-signal-safe and `line` is initialised.
    unsafe { libc::write(libc::STDERR_FILENO, line.as_ptr().cast(), line.len()) };
}

/// Writes one line about a refused fault to stderr, without allocating.
fn report(addr: u64, refusal: Refusal) {
    let mut line = [0u8; 160];
    let mut len = 0;
    let mut push = |bytes: &[u8]| {
        let n = bytes.len().min(line.len() - len);
        line[len..len + n].copy_from_slice(&bytes[..n]);
        len += n;
    };
    push(b"vmalloc-sim host window: fatal fault at 0x");
    let mut hex = [0u8; 16];
    for (i, digit) in hex.iter_mut().enumerate() {
        *digit = b"0123456789abcdef"[(addr >> (60 - 4 * i)) as usize & 0xf];
    }
    push(&hex);
    push(b": ");
    push(refusal.message());
    push(b"\n");
    say(&line[..len]);
}
