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
//! mappings are thus a second TLB, filled on demand.
//!
//! Like a TLB it has a capacity. Each host-mapped page of scattered frames is a host
//! mapping of its own (and splits the reservation around it), and Linux allows a
//! process 65,530 by default (`vm.max_map_count`). So the windows of a process keep
//! at most [`budget`] pages mapped between them (a quarter of that limit, so they
//! use at most about half of it), each window at least [`FLOOR`] whatever the others
//! hold: past that, a fill first evicts the window's oldest fill, with the other
//! pages it holds in the same 2 MiB (one call re-reserves them all), and the next
//! touch of an evicted page fills it again from the tables as they are then, as a TLB
//! refills an entry it evicted. Each window records, per page it holds, the frame piece and the
//! effective flags it mapped, in a ring in fill order with a hash index by page.
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
//! access and every flush, before the code under test can map a window page) checks
//! that ours is still installed; if not, it installs it again in front, chaining to
//! the one that replaced it, and says so on stderr.
//!
//! The handler allocates nothing and takes no std lock. Each window has one spin
//! lock, `busy`, held while a fault fills a page and while a flush drops pages, so a
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
/// Pages a window may keep mapped whatever the other windows hold, so a small test
/// next to a large one is not made to refill its few pages on every touch.
pub(super) const FLOOR: usize = 64;

/// Error-code bits the CPU pushes for a page fault (the kernel passes them on in
/// `REG_ERR`).
const ERR_WRITE: u64 = 1 << 1;
const ERR_FETCH: u64 = 1 << 4;

/// Host-mapped pages of every window together.
static MAPPED: AtomicUsize = AtomicUsize::new(0);
static BUDGET: OnceLock<usize> = OnceLock::new();

/// How many pages the windows of this process keep host-mapped between them: a
/// quarter of the host's limit on mappings (each isolated page costs at most two,
/// itself and the split of the reservation around it), so at least half of the limit
/// stays for the rest of the process.
pub(super) fn budget() -> usize {
    *BUDGET.get_or_init(|| {
        let limit = std::fs::read_to_string("/proc/sys/vm/max_map_count")
            .ok()
            .and_then(|text| text.trim().parse::<usize>().ok())
            .unwrap_or(65_530);
        (limit / 4).clamp(1024, 1 << 16)
    })
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
    /// Held while filling a page or dropping host mappings.
    busy: AtomicBool,
    /// Pages filled by the handler: TLB misses of host accesses.
    fills: AtomicU64,
    /// The pages mapped now; used only with `busy` held.
    mapped: UnsafeCell<Mapped>,
}

/// A host-mapped page: the window page, and the frame piece and effective flags the
/// fill mapped it with.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
struct Entry {
    /// The page's address; 0 for a hole (a page a flush dropped since).
    page: u64,
    piece: u64,
    flags: u64,
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
    /// Room for `capacity` pages (a power of two).
    fn new(capacity: usize) -> Mapped {
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

    /// Forgets the page in ring slot `slot` (at index position `at`).
    fn forget(&mut self, at: usize, slot: usize) {
        self.remove(at);
        self.entry(slot).page = 0;
        self.live -= 1;
        MAPPED.fetch_sub(1, Ordering::Relaxed);
        // Holes at the old end are not kept: flushes walk from `tail`.
        while self.tail < self.head && self.get(self.slot_of(self.tail)).page == 0 {
            self.tail += 1;
        }
    }

    /// Records a fresh fill of `page`; the ring has room.
    fn push(&mut self, page: u64, piece: u64, flags: u64) {
        let slot = self.slot_of(self.head);
        *self.entry(slot) = Entry { page, piece, flags };
        self.insert(page, slot);
        self.head += 1;
        self.live += 1;
        MAPPED.fetch_add(1, Ordering::Relaxed);
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

    /// Whether a fill must make room first: the ring is full (of pages, or of holes
    /// too: then it is compacted instead, if that frees half of it), or every window
    /// together holds the budget and this one at least its floor.
    fn must_evict(&mut self) -> bool {
        let mut full = self.head - self.tail == self.capacity as u64;
        if full && self.live <= self.capacity / 2 {
            self.compact();
            full = false;
        }
        // The budget was set before any window existed.
        let budget = BUDGET.get().copied().unwrap_or(0);
        full || (self.live >= FLOOR && MAPPED.load(Ordering::Relaxed) >= budget)
    }
}

impl Window {
    fn contains(&self, addr: u64) -> bool {
        addr.wrapping_sub(self.start) < self.size
    }

    /// Takes `busy`, for the pages mapped now.
    fn lock(&self) -> Busy<'_> {
        while self
            .busy
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            core::hint::spin_loop();
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
    /// and records it, evicting the oldest fills first if the budget says so.
    fn map_page(
        &self,
        mapped: &mut Mapped,
        page: u64,
        translation: Translation,
        kind: AccessKind,
    ) -> Result<(), Refusal> {
        let piece = translation.phys().as_u64() & !(PAGE - 1);
        if piece >= self.memory_size {
            return Err(Refusal::NotMapped);
        }
        // A page mapped already faults again when the access needs more rights than
        // it was mapped with (the tables gave them since, or it is fetched from).
        let known = mapped.find(page);
        if known.is_none() {
            while mapped.must_evict() && mapped.tail < mapped.head {
                if let Some(oldest) = mapped.pop_oldest() {
                    self.evict_around(mapped, oldest)
                        .map_err(|()| Refusal::MapFailed)?;
                }
            }
        }
        let mut prot = libc::PROT_READ;
        if translation.flags.contains(PageTableFlags::WRITABLE) {
            prot |= libc::PROT_WRITE;
        }
        // Executable only when fetched from, so data pages stay non-executable.
        if kind == AccessKind::Fetch {
            prot |= libc::PROT_EXEC;
        }
        // SAFETY: `page` is a page of the window, which this machine reserved and
        // nothing else maps; replacing it changes no memory Rust code owns.
        let done = unsafe {
            libc::mmap(
                page as *mut c_void,
                PAGE as usize,
                prot,
                libc::MAP_SHARED | libc::MAP_FIXED,
                self.fd,
                piece as libc::off_t,
            )
        };
        if done == libc::MAP_FAILED {
            return Err(Refusal::MapFailed);
        }
        let flags = translation.flags.bits();
        match known {
            Some((_, slot)) => *mapped.entry(slot) = Entry { page, piece, flags },
            None => mapped.push(page, piece, flags),
        }
        Ok(())
    }

    /// Evicts the host-mapped pages of the 2 MiB of the window around `oldest` (the
    /// oldest fill, already taken off the ring): one call re-reserves them all, where
    /// a page at a time would cost a call per page (pages of scattered frames never
    /// merge into one mapping).
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

    /// Whether the recorded fill no longer matches what the tables say now.
    fn changed(&self, entry: &Entry) -> bool {
        self.walk(entry.page).is_none_or(|now| {
            now.phys().as_u64() & !(PAGE - 1) != entry.piece || now.flags.bits() != entry.flags
        })
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
        let mut runs = Runs(None);
        if (end - start) / PAGE <= 2 * mapped.live as u64 {
            // Look each page up.
            for page in (start..end).step_by(PAGE as usize) {
                if let Some((at, slot)) = mapped.find(page) {
                    let changed = self.changed(&mapped.get(slot));
                    if changed {
                        mapped.forget(at, slot);
                    }
                    runs.push(page, changed);
                }
            }
        } else {
            // Fewer pages mapped than covered: take them from the ring, in address
            // order.
            let mut held = 0;
            for position in mapped.tail..mapped.head {
                let entry = mapped.get(mapped.slot_of(position));
                if entry.page != 0 && (start..end).contains(&entry.page) {
                    let changed = u64::from(self.changed(&entry));
                    *mapped.scratch(held) = entry.page | changed;
                    held += 1;
                }
            }
            mapped.scratch_slice(held).sort_unstable();
            for index in 0..held {
                let tagged = *mapped.scratch(index);
                let (page, changed) = (tagged & !(PAGE - 1), tagged & 1 != 0);
                if changed {
                    let (at, slot) = mapped.find(page).expect("a live ring entry is indexed");
                    mapped.forget(at, slot);
                }
                runs.push(page, changed);
            }
        }
        runs.finish();
    }
}

/// Host-mapped pages a flush drops, met in address order: each run of them with no
/// kept page between goes with one call (the pages between are reserved already),
/// rather than a call, and a host TLB shootdown, each.
struct Runs(Option<(u64, u64)>);

impl Runs {
    fn push(&mut self, page: u64, dropped: bool) {
        if dropped {
            let first = self.0.map_or(page, |(first, _)| first);
            self.0 = Some((first, page + PAGE));
        } else {
            self.finish();
        }
    }

    fn finish(&mut self) {
        if let Some((first, end)) = self.0.take() {
            reserve(Some(first), end - first);
        }
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
        self.window.busy.store(false, Ordering::Release);
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
    pub(super) fn new(memory_size: u64, window_size: u64, root: PhysFrame) -> HostMemory {
        assert!(
            window_size > 0 && window_size.is_multiple_of(PAGE),
            "host window size {window_size:#x} is not a positive multiple of 4 KiB"
        );
        let (fd, memory) = shared_memory(memory_size);
        let window = Box::new(Window {
            fd,
            memory,
            memory_size,
            start: reserve_aligned(window_size),
            size: window_size,
            root,
            busy: AtomicBool::new(false),
            fills: AtomicU64::new(0),
            mapped: UnsafeCell::new(Mapped::new(budget().next_power_of_two())),
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
        MAPPED.fetch_sub(mapped.live, Ordering::Relaxed);
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
