//! A window's fills and flushes: the signal handler's fill of the pages a fault
//! reaches, and a flush's drop of the host mappings whose translation changed.

use super::ring::{Entry, Mapped, PARKED};
use super::{PAGE, WINDOW_ALIGN, reserve, try_reserve};
use crate::mmu::{self, Access, AccessKind, Translation};
use core::cell::UnsafeCell;
use core::ffi::{c_int, c_void};
use core::ptr::{self, NonNull};
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use x86_64::PhysAddr;
use x86_64::structures::paging::{PageTableFlags, PhysFrame};

/// Turns a thread spins on a window's `busy` before it sleeps.
pub(super) const SPINS_BEFORE_SLEEP: u32 = 100;
/// The states of a window's `busy`.
pub(super) const FREE: u32 = 0;
pub(super) const HELD: u32 = 1;
pub(super) const CONTENDED: u32 = 2;

/// Set in a flush's scratch word of a page it parks (pages are 4 KiB-aligned).
const PARK: u64 = 1;

/// Error-code bits the CPU pushes for a page fault (the kernel passes them on in
/// `REG_ERR`).
pub(super) const ERR_WRITE: u64 = 1 << 1;
pub(super) const ERR_FETCH: u64 = 1 << 4;

/// What the signal handler needs of a machine with a host window; boxed, so its
/// address stays put while the machine moves.
#[derive(Debug)]
pub(super) struct Window {
    pub(super) fd: c_int,
    /// The memfd's mapping: physical address 0.
    pub(super) memory: NonNull<u8>,
    pub(super) memory_size: u64,
    pub(super) start: u64,
    pub(super) size: u64,
    pub(super) root: PhysFrame,
    /// Held while filling a page or dropping host mappings: [`FREE`], [`HELD`], or
    /// [`CONTENDED`] (held, and a thread may sleep on it).
    pub(super) busy: AtomicU32,
    /// Faults the handler served by filling pages: TLB misses of host accesses.
    pub(super) fills: AtomicU64,
    /// The pages mapped now; used only with `busy` held.
    pub(super) mapped: UnsafeCell<Mapped>,
}

/// The host rights of a page whose effective flags are `flags`: readable, and
/// writable if the tables allow it.
pub(super) fn prot_of(flags: PageTableFlags) -> c_int {
    if flags.contains(PageTableFlags::WRITABLE) {
        libc::PROT_READ | libc::PROT_WRITE
    } else {
        libc::PROT_READ
    }
}

/// Why a window fault cannot be served.
#[derive(Clone, Copy)]
pub(super) enum Refusal {
    NotMapped,
    NotAllowed,
    MapFailed,
}

impl Refusal {
    pub(super) fn message(self) -> &'static [u8] {
        match self {
            Refusal::NotMapped => b"page not mapped in the simulated page tables",
            Refusal::NotAllowed => b"access not allowed by the simulated page tables",
            Refusal::MapFailed => b"mmap or mprotect of the frame failed",
        }
    }
}

impl Window {
    pub(super) fn contains(&self, addr: u64) -> bool {
        addr.wrapping_sub(self.start) < self.size
    }

    /// Takes `busy`, for the pages mapped now: a few turns of spinning, then sleeps
    /// on it (a futex, which a signal handler may wait on) until the holder wakes
    /// it. The holder makes system calls, and there may be more threads than host
    /// cores: spinning waiters would take the cores it needs.
    pub(super) fn lock(&self) -> Busy<'_> {
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
    pub(super) fn fill(&self, addr: u64, err: u64) -> Result<(), Refusal> {
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

    /// Maps `page` as a read fault there would, unless it is host-mapped already
    /// (with the rights its tables give: a system call may write it then).
    pub(super) fn prefault(&self, page: u64) -> Result<(), Refusal> {
        if self.holds(page) {
            return Ok(());
        }
        self.fill(page, 0)
    }

    /// Whether `page` is host-mapped now (not parked).
    pub(super) fn holds(&self, page: u64) -> bool {
        let mut mapped = self.lock();
        mapped
            .find(page)
            .is_some_and(|(_, slot)| mapped.get(slot).prot != PARKED)
    }

    /// The translation of `page` under the tables as they are now.
    pub(super) fn walk(&self, page: u64) -> Option<Translation> {
        mmu::walk(self.root, page, |entry, _| self.load_entry(entry)).ok()
    }

    /// The entry at `entry`, or 0 (not present) outside the memory: the handler
    /// must not panic.
    pub(super) fn load_entry(&self, entry: PhysAddr) -> u64 {
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
    /// fresh fill maps the pages after it on the following pieces with the same rights
    /// too (see [`Window::look_ahead`]), as one run with one call. A page still mapped
    /// on the same piece (held, or parked by a flush) only has its rights set.
    pub(super) fn map_page(
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
        if let Some((_, slot)) = mapped.find(page)
            && mapped.get(slot).prot != PARKED
        {
            return self.remap(mapped, slot, faulting);
        }
        let mut walker = Walker::new(self);
        let pages = self.look_ahead(mapped, &mut walker, faulting);
        // A parked page whose tables map its piece again, alone: its host mapping is
        // there still, without access, and gets the rights back (one call, where a
        // fresh fill's `mmap` would cost the host a new mapping).
        if pages == 1
            && let Some((_, slot)) = mapped.find(page)
            && mapped.get(slot).piece == faulting.piece
        {
            return self.remap(mapped, slot, faulting);
        }
        // One run: its mapping, and the split of the reservation around it.
        while mapped.must_evict(pages, 2) && mapped.tail < mapped.head {
            if let Some(oldest) = mapped.pop_oldest() {
                self.evict_around(mapped, oldest)
                    .map_err(|()| Refusal::MapFailed)?;
            }
        }
        // The same pages again (evicting changed none of them), each recorded as it
        // is met, then mapped with one call; a page that no longer joins the run
        // (the tables changed in between) waits for a fault of its own.
        let mut run = Run {
            first: faulting,
            last: faulting,
            len: 1,
        };
        mapped.push_over(faulting);
        for _ in 1..pages {
            match self.ahead(mapped, &mut walker, run.last.page + PAGE) {
                Some(ahead) if Entry::joins(Some(run.last), Some(ahead)) => {
                    mapped.push_over(ahead);
                    run.last = ahead;
                    run.len += 1;
                }
                _ => break,
            }
        }
        if self.map_recorded(mapped, &run).is_err() {
            return self.refused(mapped);
        }
        Ok(())
    }

    /// Maps the page in ring slot `slot` (held, or parked) as `entry` says: only
    /// its rights set if its piece is the same, else the new piece mapped over it.
    pub(super) fn remap(
        &self,
        mapped: &mut Mapped,
        slot: usize,
        entry: Entry,
    ) -> Result<(), Refusal> {
        let prot = entry.prot as c_int;
        if mapped.get(slot).piece == entry.piece {
            self.protect(entry.page, PAGE, prot)
        } else {
            self.map_run(entry.page, PAGE, entry.piece, prot)
        }
        .map_err(|()| Refusal::MapFailed)?;
        mapped.update(slot, entry);
        Ok(())
    }

    /// Counts the pages a fresh fill of `faulting` maps: it and the pages after it that the tables map (as a CPU may cache translations it was
    /// not asked for) and the window does not hold, on the frames after its frame
    /// with its rights, up to the first that is not, or the end of its 2 MiB: one
    /// run, one host call. Most accesses to fresh heap memory move forward (a slab's
    /// objects, a buffer being written), so a run saves a host fault for each page
    /// but the first; pages on scattered frames wait for faults of their own, as
    /// each would cost a host call of its own whether or not it is ever touched (a
    /// 1 MiB buffer written at its start would pay 256).
    pub(super) fn look_ahead(
        &self,
        mapped: &mut Mapped,
        walker: &mut Walker,
        faulting: Entry,
    ) -> usize {
        let (mut pages, mut last) = (1, faulting);
        while let Some(ahead) = self.ahead(mapped, walker, last.page + PAGE) {
            if !Entry::joins(Some(last), Some(ahead)) {
                break;
            }
            (pages, last) = (pages + 1, ahead);
        }
        pages
    }

    /// What a fill would map at `page`, after the page it faulted on: nothing if
    /// the page starts another 2 MiB or is outside the window, if the window holds
    /// it (parked pages aside: a fill maps over them), or if the tables do not map
    /// it.
    pub(super) fn ahead(
        &self,
        mapped: &mut Mapped,
        walker: &mut Walker,
        page: u64,
    ) -> Option<Entry> {
        if page.is_multiple_of(WINDOW_ALIGN)
            || !self.contains(page)
            || mapped.lookup(page).is_some_and(|held| held.prot != PARKED)
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
    /// refuses, and reserves them again (some may have been parked) so the host's
    /// mappings stay as counted.
    pub(super) fn map_recorded(&self, mapped: &mut Mapped, run: &Run) -> Result<(), ()> {
        let prot = run.first.prot as c_int;
        self.map_run(run.first.page, run.len * PAGE, run.first.piece, prot)
            .inspect_err(|()| {
                mapped.pop_newest(run.len as usize);
                let _ = try_reserve(Some(run.first.page), run.len * PAGE);
            })
    }

    /// The host refused the faulting page's mapping (out of mappings, which the
    /// budget should have prevented): the oldest fill is evicted and the access,
    /// retried, faults again.
    pub(super) fn refused(&self, mapped: &mut Mapped) -> Result<(), Refusal> {
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
    pub(super) fn map_run(&self, start: u64, len: u64, piece: u64, prot: c_int) -> Result<(), ()> {
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

    /// Sets the host rights of `len` bytes of window pages at `start`, host-mapped
    /// already (a flush parking them, or a fill giving rights back).
    pub(super) fn protect(&self, start: u64, len: u64, prot: c_int) -> Result<(), ()> {
        // SAFETY: the range is in the window, which this machine reserved and
        // nothing else maps; its rights change no memory Rust code owns.
        let done = unsafe { libc::mprotect(start as *mut c_void, len as usize, prot) };
        if done == 0 { Ok(()) } else { Err(()) }
    }

    /// Evicts the host-mapped pages of the 2 MiB of the window around `oldest` (the
    /// oldest fill, already taken off the ring): one call re-reserves them all, where
    /// a page at a time would cost a call per page.
    pub(super) fn evict_around(&self, mapped: &mut Mapped, oldest: u64) -> Result<(), ()> {
        let first = (oldest & !(WINDOW_ALIGN - 1)).max(self.start);
        let end = (first + WINDOW_ALIGN).min(self.start + self.size);
        for page in (first..end).step_by(PAGE as usize) {
            if let Some((at, slot)) = mapped.find(page) {
                mapped.forget(at, slot);
            }
        }
        try_reserve(Some(first), end - first).map(|_| ())
    }

    /// A flush of window pages `start_vpn..end_vpn` (clipped to the window): takes
    /// away the host mappings there whose translation changed since they were
    /// filled. A page the tables no longer map, or map on the same piece with other
    /// rights, is parked (its mapping kept, without access, for a fill to give the
    /// rights back); one mapped on another piece is reserved again.
    pub(super) fn flush(&self, start_vpn: u64, end_vpn: u64) {
        let start = (start_vpn.saturating_mul(PAGE)).max(self.start);
        let end = (end_vpn.saturating_mul(PAGE)).min(self.start + self.size);
        if start >= end {
            return;
        }
        let mut mapped = self.lock();
        let mut walker = Walker::new(self);
        // The pages to take away, in address order, in the scratch words (with
        // `PARK` set for those parked).
        let mut dropped = 0;
        if (end - start) / PAGE <= 2 * mapped.live as u64 {
            // Look each page up.
            for page in (start..end).step_by(PAGE as usize) {
                if let Some(entry) = mapped.lookup(page)
                    && let Some(park) = walker.change(&entry)
                {
                    *mapped.scratch(dropped) = page | u64::from(park);
                    dropped += 1;
                }
            }
        } else {
            // Fewer pages mapped than covered: take them from the ring. It is in
            // fill order, so mostly in runs, whose walks share their upper levels.
            for position in mapped.tail..mapped.head {
                let entry = mapped.get(mapped.slot_of(position));
                if entry.page != 0
                    && (start..end).contains(&entry.page)
                    && let Some(park) = walker.change(&entry)
                {
                    *mapped.scratch(dropped) = entry.page | u64::from(park);
                    dropped += 1;
                }
            }
            mapped.scratch_slice(dropped).sort_unstable();
        }
        // Each run of neighbouring pages parked, or reserved, goes with one call
        // (pages between runs are kept, or parked or reserved already), rather than
        // a call, and a host TLB shootdown, each.
        let mut run: Option<(u64, u64, bool)> = None;
        for index in 0..dropped {
            let word = *mapped.scratch(index);
            let (page, park) = (word & !(PAGE - 1), word & PARK != 0);
            if let Some((at, slot)) = mapped.find(page) {
                if park {
                    let parked = Entry {
                        prot: PARKED,
                        ..mapped.get(slot)
                    };
                    mapped.update(slot, parked);
                } else {
                    mapped.forget(at, slot);
                }
            }
            run = match run {
                Some((first, end, parks)) if end == page && parks == park => {
                    Some((first, page + PAGE, parks))
                }
                Some(done) => {
                    self.take_away(&mut mapped, done);
                    Some((page, page + PAGE, park))
                }
                None => Some((page, page + PAGE, park)),
            };
        }
        if let Some(done) = run {
            self.take_away(&mut mapped, done);
        }
    }

    /// Takes away the host mappings of the pages `first..end` a flush recorded
    /// parked (if `park`) or forgot: parks them, or reserves them again. If the
    /// host refuses to park them, they are forgotten and reserved instead.
    pub(super) fn take_away(&self, mapped: &mut Mapped, (first, end, park): (u64, u64, bool)) {
        if park && self.protect(first, end - first, libc::PROT_NONE).is_ok() {
            return;
        }
        if park {
            for page in (first..end).step_by(PAGE as usize) {
                if let Some((at, slot)) = mapped.find(page) {
                    mapped.forget(at, slot);
                }
            }
        }
        reserve(Some(first), end - first);
    }
}

/// Pages of a fill that one call maps: consecutive pieces with the same rights.
pub(super) struct Run {
    pub(super) first: Entry,
    pub(super) last: Entry,
    pub(super) len: u64,
}

/// Walks the tables for a fill or a flush, which meet pages in address or fill
/// order: the pages of one 2 MiB share their upper-level entries, which it reads
/// once. (Tables changing during the fill or flush are a race the code under test
/// has with the access or the flush, as on hardware.)
pub(super) struct Walker<'w> {
    pub(super) window: &'w Window,
    /// Per level 2 to 4: the address of the entry read last there, plus one (0:
    /// none), and the entry.
    pub(super) upper: [(u64, u64); 3],
}

impl<'w> Walker<'w> {
    pub(super) fn new(window: &'w Window) -> Self {
        Self {
            window,
            upper: [(0, 0); 3],
        }
    }

    /// The translation of `page`.
    pub(super) fn walk(&mut self, page: u64) -> Option<Translation> {
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

    /// What a flush does with the page the window holds as `entry`: nothing
    /// (`None`) if it is parked already or the tables translate it as at its fill;
    /// else whether it is parked (`true`: the tables no longer map it, or map the
    /// same piece with other rights) or reserved again (they map another piece).
    pub(super) fn change(&mut self, entry: &Entry) -> Option<bool> {
        if entry.prot == PARKED {
            return None;
        }
        let Some(now) = self.walk(entry.page) else {
            return Some(true);
        };
        let piece = now.phys().as_u64() & !(PAGE - 1);
        if piece != entry.piece {
            Some(false)
        } else {
            (now.flags.bits() != entry.flags).then_some(true)
        }
    }
}

/// A window's `busy` held, with its pages; dropping it lets go.
pub(super) struct Busy<'w> {
    pub(super) window: &'w Window,
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
