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
//! mappings are thus a second TLB: filled on demand, and dropped only when the
//! machine's [`TlbFlush`](vmalloc::TlbFlush) methods re-reserve the flushed pages.
//!
//! An access the tables do not allow is a bug in the code under test, as an oops is
//! in a kernel: the handler prints one line naming the address to stderr, restores
//! the default action and returns, so the retried access kills the process with
//! SIGSEGV instead of looping. Faults outside every window go to the handler that was
//! installed before ours (Rust's stack-overflow handler).
//!
//! The handler allocates nothing and takes no std lock. Each window has one spin
//! lock, `busy`, held while a fault fills a page and while a flush drops pages, so a
//! flush is never undone by a fill that walked the tables before the entry changed.
//! It cannot deadlock: the only code holding it is the fill and the flush, which make
//! system calls and read the page tables in the memfd mapping, never a window page,
//! so a thread never faults into the handler while holding it. Each registry slot
//! counts the handlers reading it, so that dropping a window waits for them before
//! unmapping what they read.

use super::mmu::{self, Access, AccessKind};
use core::ffi::{c_int, c_void};
use core::ptr::{self, NonNull};
use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::boxed::Box;
use std::sync::{Once, OnceLock};
use x86_64::PhysAddr;
use x86_64::structures::paging::{PageTableFlags, PhysFrame};

const PAGE: u64 = 4096;
/// Windows start on a 2 MiB boundary, so 2 MiB mappings can be tested in them.
const WINDOW_ALIGN: u64 = 2 << 20;
/// How many windows may exist at once (tests run machines in parallel threads).
const MAX_WINDOWS: usize = 64;

/// Error-code bits the CPU pushes for a page fault (the kernel passes them on in
/// `REG_ERR`).
const ERR_WRITE: u64 = 1 << 1;
const ERR_FETCH: u64 = 1 << 4;

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

impl Window {
    fn contains(&self, addr: u64) -> bool {
        addr.wrapping_sub(self.start) < self.size
    }

    fn lock(&self) {
        while self
            .busy
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            core::hint::spin_loop();
        }
    }

    fn unlock(&self) {
        self.busy.store(false, Ordering::Release);
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
        self.lock();
        self.fills.fetch_add(1, Ordering::Relaxed);
        let result = match mmu::walk(self.root, page, |entry, _| self.load_entry(entry)) {
            Err(_) => Err(Refusal::NotMapped),
            Ok(translation) if !translation.permits(access) => Err(Refusal::NotAllowed),
            Ok(translation) => self.map_frame(page, translation.phys(), translation.flags, kind),
        };
        self.unlock();
        result
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

    /// Maps the 4 KiB of physical memory at `phys` at window page `page`.
    fn map_frame(
        &self,
        page: u64,
        phys: PhysAddr,
        flags: PageTableFlags,
        kind: AccessKind,
    ) -> Result<(), Refusal> {
        let offset = phys.as_u64() & !(PAGE - 1);
        if offset >= self.memory_size {
            return Err(Refusal::NotMapped);
        }
        let mut prot = libc::PROT_READ;
        if flags.contains(PageTableFlags::WRITABLE) {
            prot |= libc::PROT_WRITE;
        }
        // Executable only when fetched from, so data pages stay non-executable.
        if kind == AccessKind::Fetch {
            prot |= libc::PROT_EXEC;
        }
        // SAFETY: `page` is a page of the window, which this machine reserved and
        // nothing else maps; replacing it changes no memory Rust code owns.
        let mapped = unsafe {
            libc::mmap(
                page as *mut c_void,
                PAGE as usize,
                prot,
                libc::MAP_SHARED | libc::MAP_FIXED,
                self.fd,
                offset as libc::off_t,
            )
        };
        if mapped == libc::MAP_FAILED {
            Err(Refusal::MapFailed)
        } else {
            Ok(())
        }
    }

    /// Drops the host mappings of window pages `start_vpn..end_vpn` (clipped to the
    /// window) by reserving them again.
    fn drop_pages(&self, start_vpn: u64, end_vpn: u64) {
        let start = (start_vpn.saturating_mul(PAGE)).max(self.start);
        let end = (end_vpn.saturating_mul(PAGE)).min(self.start + self.size);
        if start < end {
            self.lock();
            reserve(Some(start), end - start);
            self.unlock();
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
    assert!(
        addr != libc::MAP_FAILED,
        "host window: cannot reserve {size:#x} bytes: {}",
        std::io::Error::last_os_error()
    );
    addr as u64
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

/// The SIGSEGV action installed before ours.
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();
static INSTALL: Once = Once::new();

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
        });
        let window = NonNull::from(Box::leak(window));
        INSTALL.call_once(install_handler);
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

    /// Drops the host mappings of pages `start_vpn..end_vpn` inside the window.
    pub(super) fn flush(&self, start_vpn: u64, end_vpn: u64) {
        self.window().drop_pages(start_vpn, end_vpn);
    }

    /// Drops every host mapping of the window.
    pub(super) fn flush_all(&self) {
        let window = self.window();
        window.drop_pages(window.start / PAGE, (window.start + window.size) / PAGE);
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

fn install_handler() {
    // SAFETY: all-zero is a valid `sigaction` (no handler, empty mask, no flags).
    let mut previous: libc::sigaction = unsafe { core::mem::zeroed() };
    // SAFETY: querying the current action into a valid struct.
    unsafe { libc::sigaction(libc::SIGSEGV, ptr::null(), &mut previous) };
    let _ = PREVIOUS.set(previous);
    // SAFETY: as above.
    let mut action: libc::sigaction = unsafe { core::mem::zeroed() };
    action.sa_sigaction = on_segv as *const () as libc::sighandler_t;
    // On the alternate stack when there is one, as Rust's handler, so a stack
    // overflow still reaches it through us.
    action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
    // SAFETY: `sa_mask` is a valid sigset; installing a handler with the
    // `SA_SIGINFO` signature.
    unsafe {
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGSEGV, &action, ptr::null_mut());
    }
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

/// Hands a fault outside every window to the previous handler.
fn chain(signal: c_int, info: *mut libc::siginfo_t, context: *mut c_void) {
    let Some(previous) = PREVIOUS.get() else {
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
    // SAFETY: all-zero with `SIG_DFL` (0) is the default action.
    let action: libc::sigaction = unsafe { core::mem::zeroed() };
    // SAFETY: `sigaction` is async-signal-safe.
    unsafe { libc::sigaction(libc::SIGSEGV, &action, ptr::null_mut()) };
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
    // SAFETY: `write` is async-signal-safe and `line[..len]` is initialised.
    unsafe { libc::write(libc::STDERR_FILENO, line.as_ptr().cast(), len) };
}
