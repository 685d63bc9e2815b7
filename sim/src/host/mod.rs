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
//! faulting one with it while the tables map them on the frames after its frame with
//! the same rights and the window does not hold them, up to the end of its 2 MiB (as
//! a CPU may cache translations it was not asked for): fresh memory is mostly written
//! forwards, and such a run is one host mapping, made with one call.
//!
//! Like a TLB it has a capacity. Each host-mapped page of scattered frames is a host
//! mapping of its own (and splits the reservation around it), and Linux allows a
//! process 65,530 by default (`vm.max_map_count`). Each window counts the host
//! mappings its pages make (every boundary between neighbouring pages in different
//! mappings), and the windows keep them under three quarters of that limit between
//! them; by default a window also counts its pages, and the windows keep at most
//! [`budget`] pages mapped between them (a quarter of that limit, so they use at
//! most about half of it); each window keeps at least [`FLOOR`](ring::FLOOR) whatever the others
//! hold. Past that, a fill first evicts the window's oldest fill, with the other
//! pages it holds in the same 2 MiB (one call re-reserves them all), and the next
//! touch of an evicted page fills it again from the tables as they are then, as a
//! TLB refills an entry it evicted. Each window records, per page it holds, the
//! frame piece, the effective flags and the host rights it mapped, in a ring in fill
//! order with a hash index by page.
//!
//! A flush ([`TlbFlush`](vmalloc::TlbFlush)) re-walks the tables for the host-mapped
//! pages in its range and takes away only those whose translation changed since the
//! fill; a page whose entry is unchanged keeps its mapping, since a refill would map
//! the same frame with the same rights. A page the tables now map on another frame
//! is reserved again. One they no longer map, or map on the same frame with other
//! rights, is *parked*: its host mapping stays, made inaccessible (`mprotect`), and
//! the window keeps its record, so a later fault that finds the tables mapping the
//! same frame again gives the rights back with one `mprotect` instead of a new
//! `mmap` (a page unmapped and mapped again over the frame it kept, as a sampled
//! heap object's is, costs the host no new mapping); a fill over a parked page on
//! another frame maps that frame over it. Parked pages count as held pages, and
//! their mappings as the window's. So after a flush every host-mapped page
//! translates as the tables say now or faults, as after a real flush, and an unmap
//! without a flush still leaves the old frame readable through the host pointer, as
//! on hardware; but a flush costs no refills of pages it did not change.
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

mod ring;
mod signal;
mod window;

use core::cell::UnsafeCell;
use core::ffi::{c_int, c_void};
use core::ptr::{self, NonNull};
use core::sync::atomic::{AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering};
pub(super) use ring::budget;
use ring::{Entry, MAPPED, MAX_RING, Mapped, SPLITS, limit};
#[cfg(test)]
pub(super) use signal::watch_again;
use signal::{INSTALL, install_handler};
pub(super) use signal::{installed, watch};
use std::boxed::Box;
use window::{FREE, Window};
use x86_64::structures::paging::PhysFrame;

const PAGE: u64 = 4096;
/// Windows start on a 2 MiB boundary, so 2 MiB mappings can be tested in them.
const WINDOW_ALIGN: u64 = 2 << 20;
/// How many windows may exist at once (tests run machines in parallel threads).
const MAX_WINDOWS: usize = 64;

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

/// A machine's physical memory in a memfd, and its host window.
#[derive(Debug)]
pub(super) struct HostMemory {
    window: NonNull<Window>,
    slot: usize,
}

/// Passes of [`HostMemory::prefault`] over its range before it gives up on keeping
/// it all mapped (each maps again only the pages the one before lost).
const PREFAULT_PASSES: usize = 4;

impl HostMemory {
    /// `memory_size` bytes of zeroed memory and a window of `window_size` bytes,
    /// served with the page tables under `root`.
    ///
    /// # Panics
    ///
    /// If `window_size` is zero or not a multiple of 4 KiB, if the host refuses the
    /// memfd or a mapping, or if [`MAX_WINDOWS`] windows already exist; if it is
    /// above [`MAX_WINDOW`].
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
        assert!(
            window_size <= MAX_WINDOW,
            "host window size {window_size:#x} is above {MAX_WINDOW:#x} (a quarter of the \
             host's address space)"
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

    /// Host-maps every page of `start..start + len` that is not host-mapped yet;
    /// the first page that cannot be (outside the window, or not mapped readable by
    /// the tables) is the error.
    pub(super) fn prefault(&self, start: u64, len: u64) -> Result<(), u64> {
        let window = self.window();
        let first = start & !(PAGE - 1);
        if len == 0 {
            // No page holds an empty range.
            return Ok(());
        }
        let end = start.checked_add(len).ok_or(first)?;
        let pages = || (first..end).step_by(PAGE as usize);
        // A fill that finds the window full evicts the oldest fill's 2 MiB, which may
        // hold pages this call mapped before: another pass maps those again.
        for _ in 0..PREFAULT_PASSES {
            for page in pages() {
                if !window.contains(page) || window.prefault(page).is_err() {
                    return Err(page);
                }
            }
            if pages().all(|page| window.holds(page)) {
                return Ok(());
            }
        }
        Err(pages().find(|&page| !window.holds(page)).unwrap_or(first))
    }

    /// Faults served by a fill so far (each may map several pages).
    pub(super) fn fills(&self) -> u64 {
        self.window().fills.load(Ordering::Relaxed)
    }

    /// Window pages host-mapped now (parked ones too: they hold their mappings).
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

/// The largest host window: a quarter of the host's lower half, so reserving it
/// (with its alignment padding) cannot overflow.
pub(crate) const MAX_WINDOW: u64 = 1 << 45;

/// Reserves `size` bytes at a `WINDOW_ALIGN` boundary: reserve more, trim the ends.
fn reserve_aligned(size: u64) -> u64 {
    let padded = size + WINDOW_ALIGN;
    let raw = reserve(None, padded);
    let start = raw.next_multiple_of(WINDOW_ALIGN);
    unmap(raw, start - raw);
    unmap(start + size, raw + padded - (start + size));
    start
}
