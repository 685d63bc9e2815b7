//! Sampled guarded allocations: one small allocation in N on a page of its own,
//! between unmapped pages, so that an overrun, an underrun or a use after free
//! faults where it happens (Linux's KFENCE).
//!
//! # What it does
//!
//! With [`HeapConfig::sample_interval`] at N (0, the default, turns it off; it can be
//! changed at run time with [`KernelHeap::set_sample_interval`]), about one slab-sized
//! allocation in N is served from the *guarded pool* instead of the slabs:
//!
//! - The object gets a page of its own, between two pages that are never mapped (the
//!   [pool's layout](pool)), placed against the page's **end** or its **start**, in
//!   turn: an overrun of an object at the end faults on the next page, an underrun of
//!   one at the start on the page before.
//! - The rest of its page (the *slack*: alignment padding, and the page beyond the
//!   object) is filled with a pattern that [`dealloc`](core::alloc::GlobalAlloc)
//!   checks: an overrun too small to reach the next page is found there, at the free,
//!   and reported through the kernel's [report hook](KernelHeap::set_report_hook).
//! - A freed object's page is unmapped, and every CPU's TLB flushed, before `dealloc`
//!   returns ([`VmallocOps::unmap_page`]); it
//!   stays unmapped until its slot is reused, and slots are reused in the order they
//!   were freed (the slot freed longest ago first), so a use after free faults for as
//!   long as the pool allows.
//! - A slot's page keeps the frame its first object got for the pool's life, as
//!   Linux's KFENCE does: a free only clears the entry's present bit and flushes that
//!   page (`kfence_protect`), a reuse sets it again (`kfence_unprotect`; see [sparse
//!   areas](crate::vmalloc::sparse)). Past a slot's first use, no frame is allocated
//!   or freed and no page table made or swept per object.
//! - [`KernelHeap::diagnose_fault`], from the page-fault handler, names what such a
//!   fault hit: "out-of-bounds write past the end of a 24-byte heap object (at ...,
//!   allocated on CPU 1 at ...) at ..., 8 bytes past it", "use after free: read of a
//!   64-byte heap object (at ..., allocated ..., freed ...) at ... (offset 8)". Where
//!   the kernel is built with frame pointers, the sites are return addresses from the
//!   frame-pointer chain ([`KernelHeap::use_frame_pointers`]); without, the report
//!   says so (see [`site`] for what it shows instead).
//! - When the pool's slots are all taken, or a page cannot be mapped, the allocation
//!   is served by the slabs as usual (counted in [`GuardedStats`]).
//!
//! # Cost
//!
//! With sampling off, an allocation pays one relaxed load and a branch, and a
//! slab-sized free one range check (two loads). With it on, each allocation counts
//! down one of a few counters picked by the stack it runs on (so CPUs, each on its
//! own stack, rarely share one; a plain load and store, no locked instruction), and
//! one in N makes its slot's page present again (a page-table walk under the
//! manager's lock), fills it, and at its free checks it, makes it not present and
//! flushes that one page on every CPU: on hardware, a TLB miss and the flush (a
//! shootdown on SMP), once per N allocations. On the simulated machine the page's
//! first touch after each reuse is a host fault that maps it, and the flush a host
//! call that takes it away again: about 10 µs per sampled allocation and free.
//!
//! # Context
//!
//! The pool works from interrupt handlers that allocate, as the rest of the heap
//! does: its lock is taken with interrupts held off and never held across a call
//! into the manager or while an object's page is touched; the pool is made by the
//! first sampled allocation, and an allocation that finds another CPU making it
//! takes the slabs instead of waiting. The report hook and the fault diagnosis run
//! with no lock of the heap held: the hook may allocate. The diagnosis waits for the
//! pool's lock a bounded time only, serving shootdowns meanwhile.
//!
//! [`HeapConfig::sample_interval`]: super::HeapConfig::sample_interval

pub mod allocinfo;
pub mod pool;
mod report;
pub mod site;

pub use allocinfo::{HeapAllocInfo, HeapSiteUsage};
pub use report::{GuardedFault, GuardedObject, GuardedReport, HeapFaultDiagnosis, ReportKind};
pub use site::CallSite;

use super::KernelHeap;
use crate::PAGE_SIZE;
use crate::sync::IrqOff;
use crate::vmalloc::VmallocOps;
use core::alloc::Layout;
use core::panic::Location;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use pool::{Changed, Freeing, Lookup, Pool, Taken};

const PAGE: usize = PAGE_SIZE as usize;

/// Countdowns a sampling heap keeps, picked by the stack an allocation runs on.
const COUNTERS: usize = 8;

/// One countdown, on a cache line of its own.
#[repr(align(64))]
struct Countdown(AtomicU32);

/// A kernel report hook: called with each problem the pool finds outside a fault.
pub type ReportHook<'a> = &'a (dyn Fn(&GuardedReport) + Sync);

/// The guarded pool's part of a [`KernelHeap`].
pub(super) struct Guarded<'a> {
    interval: AtomicU32,
    slots: usize,
    countdowns: [Countdown; COUNTERS],
    /// Whether a CPU is making the pool or made it (`pool` says which); a CPU that
    /// could not make it turns sampling off (a zero `interval`) and gives the claim
    /// back, so sampling turned on again tries again.
    claimed: AtomicBool,
    pool: spin::Once<Pool>,
    /// The pool's area and length once it is made (0 before): the free path's check.
    start: AtomicUsize,
    len: AtomicUsize,
    frame_pointers: AtomicBool,
    hook: spin::Once<ReportHook<'a>>,
    sampled: AtomicU64,
    pool_full: AtomicU64,
    unplaced: AtomicU64,
    reports: AtomicU64,
}

/// Counters of a heap's guarded pool; see [`KernelHeap::guarded_stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GuardedStats {
    /// The sampling interval now (0: off).
    pub interval: u32,
    /// Slots of the pool (0 until it is made: by [`KernelHeap::init`] when sampling is
    /// on, else by the first sampled allocation).
    pub slots: usize,
    /// Slots holding a live object.
    pub live: usize,
    /// Slots a new object may take.
    pub free_slots: usize,
    /// Allocations served from the pool so far.
    pub sampled: u64,
    /// Sampled allocations the slabs served because every slot was taken.
    pub pool_full: u64,
    /// Sampled allocations the slabs served because the pool could not be made or a
    /// page could not be mapped, and frees whose page could not be unmapped (the
    /// manager refused: the slot stays taken, never reused).
    pub unplaced: u64,
    /// Problems found outside a fault (corrupted slack, double or invalid frees),
    /// reported to the hook if there is one.
    pub reports: u64,
}

impl Guarded<'_> {
    /// Gives the pool back to `vmalloc` if it was made and holds no live object: the
    /// teardown's (`&mut self`: no CPU samples, frees or reads the records).
    pub(super) fn release(&mut self, vmalloc: &dyn VmallocOps) {
        if let Some(pool) = self.pool.get() {
            // SAFETY: the heap is going away; nothing uses its pool after this.
            unsafe { pool.release(vmalloc) };
        }
    }

    /// Off until sampling is asked for; `const`, for a `static` heap.
    pub(super) const fn new(interval: u32, slots: usize) -> Self {
        Self {
            interval: AtomicU32::new(interval),
            slots,
            countdowns: [const { Countdown(AtomicU32::new(0)) }; COUNTERS],
            claimed: AtomicBool::new(false),
            pool: spin::Once::new(),
            start: AtomicUsize::new(0),
            len: AtomicUsize::new(0),
            frame_pointers: AtomicBool::new(false),
            hook: spin::Once::new(),
            sampled: AtomicU64::new(0),
            pool_full: AtomicU64::new(0),
            unplaced: AtomicU64::new(0),
            reports: AtomicU64::new(0),
        }
    }

    /// Whether this allocation is sampled: a load and a branch while sampling is off.
    #[inline(always)]
    pub(super) fn due(&self) -> bool {
        let interval = self.interval.load(Ordering::Relaxed);
        interval != 0 && self.count_down(interval)
    }

    /// Counts one allocation down on the countdown of the stack it runs on; true when
    /// it reaches the sample. Racing updates (an interrupt handler on the same stack,
    /// CPUs sharing a countdown) may lose a count: the rate stays about one in N.
    #[inline]
    fn count_down(&self, interval: u32) -> bool {
        let marker = 0u8;
        let stack = (&raw const marker).addr() >> 16;
        let countdown = &self.countdowns[stack % COUNTERS].0;
        let left = countdown.load(Ordering::Relaxed);
        if left <= 1 {
            countdown.store(interval, Ordering::Relaxed);
            true
        } else {
            countdown.store(left - 1, Ordering::Relaxed);
            false
        }
    }

    /// Whether `ptr` is in the pool: one range check.
    #[inline(always)]
    pub(super) fn owns(&self, ptr: *const u8) -> bool {
        let start = self.start.load(Ordering::Relaxed);
        ptr.addr().wrapping_sub(start) < self.len.load(Ordering::Relaxed)
    }

    /// The pool, if it is made.
    fn ready(&self) -> Option<&Pool> {
        self.pool.get()
    }
}

impl<'a> KernelHeap<'a> {
    /// Samples one slab-sized allocation in about `interval` for the guarded pool
    /// from now on; 0 stops sampling (objects in the pool stay guarded until freed).
    /// See the [guarded pool](crate::heap::guarded). The pool is made at the first
    /// sampled allocation if [`init`](Self::init) did not make it; when it cannot be
    /// (out of frames or virtual space), sampling turns off, and an interval set
    /// again tries again.
    pub fn set_sample_interval(&self, interval: u32) {
        self.guarded.interval.store(interval, Ordering::Relaxed);
        for countdown in &self.guarded.countdowns {
            countdown.0.store(0, Ordering::Relaxed);
        }
    }

    /// Records a few return addresses from the frame-pointer chain as the allocation
    /// and free sites of sampled objects (see [`site`]).
    ///
    /// # Safety
    ///
    /// Every function that may call the heap keeps `rbp` as a frame pointer (the
    /// kernel is built with `-C force-frame-pointers=yes`; Rust's prebuilt `core` and
    /// `alloc` keep them), and every stack's outermost frame record holds a null
    /// saved `rbp` (the kernel's entry code clears `rbp` before its first call): the
    /// walk reads each frame record the chain leads to.
    pub unsafe fn use_frame_pointers(&self) {
        self.guarded.frame_pointers.store(true, Ordering::Relaxed);
    }

    /// Sets the kernel's report hook, once: it is called with each problem the
    /// guarded pool finds outside a page fault (a corrupted slack at a free, a double
    /// or invalid free, a `realloc` of such a pointer, which returns null), from the
    /// `dealloc` or `realloc` that found it, with no lock of the heap
    /// held (it may allocate, and print). The allocator itself never panics on them;
    /// without a hook they are only counted ([`GuardedStats::reports`]). Later calls
    /// change nothing.
    pub fn set_report_hook(&self, hook: ReportHook<'a>) {
        self.guarded.hook.call_once(|| hook);
    }

    /// Whether `ptr` lies in the guarded pool.
    pub fn is_guarded(&self, ptr: *const u8) -> bool {
        self.guarded.owns(ptr)
    }

    /// Counters of the guarded pool.
    pub fn guarded_stats(&self) -> GuardedStats {
        let guarded = &self.guarded;
        let (slots, live, free_slots) = match (guarded.ready(), self.backing.get()) {
            (Some(pool), Some(backing)) => {
                let (live, free) = pool.counts(backing.vmalloc);
                (pool.count, live, free)
            }
            _ => (0, 0, 0),
        };
        GuardedStats {
            interval: guarded.interval.load(Ordering::Relaxed),
            slots,
            live,
            free_slots,
            sampled: guarded.sampled.load(Ordering::Relaxed),
            pool_full: guarded.pool_full.load(Ordering::Relaxed),
            unplaced: guarded.unplaced.load(Ordering::Relaxed),
            reports: guarded.reports.load(Ordering::Relaxed),
        }
    }

    /// Makes the guarded pool now if sampling is to use it and it is not made yet.
    pub(super) fn make_guarded_pool(&self) {
        let _ = self.guarded_pool();
    }

    /// The pool, made now by the first caller; `None` while another CPU makes it (the
    /// caller takes the slabs rather than wait) or if it could not be made.
    fn guarded_pool(&self) -> Option<&Pool> {
        let guarded = &self.guarded;
        if let Some(pool) = guarded.pool.get() {
            return Some(pool);
        }
        // Before the claim: a claim never leaves the pool half made.
        let vmalloc = self.backing.get()?.vmalloc;
        let won = guarded
            .claimed
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_ok();
        if !won {
            return None;
        }
        match Pool::new(vmalloc, guarded.slots) {
            Some(pool) => {
                let pool = guarded.pool.call_once(|| pool);
                guarded.len.store(pool.len(), Ordering::Relaxed);
                guarded.start.store(pool.area, Ordering::Release);
                Some(pool)
            }
            None => {
                guarded.interval.store(0, Ordering::Relaxed);
                guarded.claimed.store(false, Ordering::Release);
                None
            }
        }
    }

    /// The CPU the caller runs on, if the heap knows the CPUs.
    fn this_cpu(&self) -> Option<usize> {
        let cpus = self
            .cpus
            .get()
            .copied()
            .or_else(|| self.backing.get()?.vmalloc.cpus())?;
        // Read with interrupts held off, as `Cpus` asks: the CPU the call ran on then.
        let _irq = IrqOff::with(cpus);
        Some(cpus.current())
    }

    /// The site of a call into the heap made now from `caller`.
    #[inline(always)]
    fn call_site(&self, caller: &'static Location<'static>) -> CallSite {
        let frame_pointers = self.guarded.frame_pointers.load(Ordering::Relaxed);
        // SAFETY: the walk runs only after `use_frame_pointers`, whose caller
        // promised the frame-pointer chain.
        unsafe { CallSite::here(caller, self.this_cpu(), frame_pointers) }
    }

    /// Serves a sampled allocation from the guarded pool; `None` (the slabs serve it)
    /// when the pool is full or cannot be had.
    #[cold]
    #[inline(never)]
    #[track_caller]
    pub(super) fn alloc_guarded(&self, layout: Layout) -> Option<NonNull<u8>> {
        let caller = Location::caller();
        let guarded = &self.guarded;
        let (size, align) = (layout.size(), layout.align());
        if size == 0 || size > PAGE || align > PAGE {
            return None;
        }
        let vmalloc = self.backing.get()?.vmalloc;
        let Some(pool) = self.guarded_pool() else {
            guarded.unplaced.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        let Some(first) = pool.take(vmalloc, false) else {
            guarded.pool_full.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        let map = |taken: Taken| {
            let (_, index) = pool.page(taken.index);
            // SAFETY: the pool is the heap's own area; the slot was just taken, so
            // nothing relies on its page staying unmapped.
            let mapped = unsafe { vmalloc.map_page(pool.area as *mut u8, index) }.is_ok();
            if !mapped {
                pool.untake(vmalloc, taken.index);
            }
            mapped.then_some(taken)
        };
        // Out of frames for a slot never used, a slot used before (which keeps its
        // frame) maps without one: else the pool, holding the frames a program
        // freed, would fail where the slabs would have served.
        let Some(taken) = map(first).or_else(|| pool.take(vmalloc, true).and_then(map)) else {
            guarded.unplaced.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        let (page, _) = pool.page(taken.index);
        let addr = if taken.at_end {
            (page + PAGE - size) & !(align - 1)
        } else {
            page
        };
        // SAFETY: the page was just mapped, read-write, for this object alone.
        unsafe {
            pool::fill(page, addr);
            pool::fill(addr + size, page + PAGE);
        }
        let site = self.call_site(caller);
        pool.publish(vmalloc, taken.index, addr, size, site);
        guarded.sampled.fetch_add(1, Ordering::Relaxed);
        NonNull::new(addr as *mut u8)
    }

    /// Frees an object of the guarded pool: checks its slack, unmaps its page (every
    /// CPU's TLB flushed), and reports what it found to the hook, with no lock held.
    ///
    /// # Safety
    ///
    /// `ptr` is in the pool ([`Guarded::owns`]); if it starts a live object, nothing
    /// uses the object after the call.
    #[cold]
    #[inline(never)]
    #[track_caller]
    pub(super) unsafe fn free_guarded(&self, ptr: *mut u8) {
        let caller = Location::caller();
        let (Some(pool), Some(backing)) = (self.guarded.ready(), self.backing.get()) else {
            return;
        };
        let vmalloc = backing.vmalloc;
        let site = self.call_site(caller);
        let (index, slot) = match pool.start_free(vmalloc, ptr.addr(), site) {
            Freeing::Freed(index, slot) => (index, slot),
            Freeing::NotLive(found) => {
                return self.report(GuardedReport::bad_free(ptr.addr(), site, found));
            }
        };
        let (page, page_index) = pool.page(index);
        let mut changed = Changed::default();
        // SAFETY: the object's page stays mapped until `unmap_page` below.
        unsafe {
            pool::check(page, slot.addr, &mut changed);
            pool::check(slot.addr + slot.size, page + PAGE, &mut changed);
        }
        // SAFETY: the caller gives the object up; nothing else is in its page.
        match unsafe { vmalloc.unmap_page(pool.area as *mut u8, page_index) } {
            Ok(()) => pool.finish_free(vmalloc, index),
            // Still mapped (the manager refused): the slot is not reused.
            Err(_) => {
                self.guarded.unplaced.fetch_add(1, Ordering::Relaxed);
            }
        }
        if changed.bytes > 0 {
            self.report(GuardedReport::corrupted(index, &slot, changed));
        }
    }

    /// `GlobalAlloc::realloc` of a pointer in the pool: the object moves to a block
    /// of `new_size` (sampled again or not) and is freed as `dealloc` frees it. A
    /// pointer that starts no live object (freed before, inside an object) is reported
    /// as its free would be, and null returned with nothing changed: there is nothing
    /// to copy from.
    ///
    /// # Safety
    ///
    /// `ptr` is in the pool ([`Guarded::owns`]); as `GlobalAlloc::realloc`'s caller
    /// promises, `new_size` is valid for `layout.align()`.
    #[cold]
    #[inline(never)]
    #[track_caller]
    pub(super) unsafe fn realloc_guarded(
        &self,
        ptr: *mut u8,
        layout: Layout,
        new_size: usize,
    ) -> *mut u8 {
        let (Some(pool), Some(backing)) = (self.guarded.ready(), self.backing.get()) else {
            return core::ptr::null_mut();
        };
        let slot = match pool.live(backing.vmalloc, ptr.addr()) {
            Lookup::Live(slot) => slot,
            Lookup::NotLive(found) => {
                let site = self.call_site(Location::caller());
                self.report(GuardedReport::bad_free(ptr.addr(), site, found));
                return core::ptr::null_mut();
            }
        };
        // SAFETY: the caller's promise.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        let Some(moved) = self.allocate(new_layout) else {
            return core::ptr::null_mut();
        };
        // The object's own size bounds the copy: its page ends past it.
        let size = layout.size().min(slot.size).min(new_size);
        // SAFETY: the live object holds `size` bytes on its mapped page; the new block
        // is live and holds `new_size`; the caller gives the object up.
        unsafe {
            core::ptr::copy_nonoverlapping(ptr, moved.as_ptr(), size);
            self.free_guarded(ptr);
        }
        moved.as_ptr()
    }

    /// Counts `report` and hands it to the kernel's hook, if any.
    fn report(&self, report: GuardedReport) {
        self.guarded.reports.fetch_add(1, Ordering::Relaxed);
        if let Some(hook) = self.guarded.hook.get() {
            hook(&report);
        }
    }
}
