//! A host process's `#[global_allocator]` on a kernel heap over a simulated
//! machine's host window, with the system allocator before the heap is ready.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use vmalloc::heap::KernelHeap;

use crate::SimMachine;

const UNBUILT: u8 = 0;
const BUILDING: u8 = 1;
const READY: u8 = 2;

/// A global allocator that serves a whole host program from a [`KernelHeap`]
/// initialised over a machine with a host window
/// ([`SimConfig::with_host_window`](crate::SimConfig::with_host_window)), and from
/// [`System`] until then.
///
/// Each block is freed and resized by the allocator that made it, told apart by
/// address: the window is the heap's.
///
/// Two ways to start: build the machine and the heap inside the process's first
/// allocation ([`RoutedHeap::building`]; mind the SIGSEGV handler order the README's
/// host-testing section describes), or serve from `System` until the program calls
/// [`route`](Self::route) (safest: build the machine in `main`).
///
/// ```text
/// static HEAP: KernelHeap<'static> = KernelHeap::new(HeapConfig::DEFAULT);
/// #[global_allocator]
/// static GLOBAL: RoutedHeap = RoutedHeap::new(&HEAP);
/// // in main: build the machine and its manager, HEAP.init(manager), then
/// // SAFETY: the heap was initialised over this machine's window.
/// unsafe { GLOBAL.route(machine) };
/// ```
pub struct RoutedHeap {
    heap: &'static KernelHeap<'static>,
    /// Builds the machine and initialises the heap over its window, in the first
    /// allocation; allocations it makes come from the system allocator.
    build: Option<fn() -> &'static SimMachine>,
    state: AtomicU8,
    /// The window: the size is stored after the start and read first, so a reader
    /// that sees it sees the start too.
    start: AtomicU64,
    size: AtomicU64,
}

impl core::fmt::Debug for RoutedHeap {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("RoutedHeap")
            .field("ready", &self.is_ready())
            .field("start", &self.start)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl RoutedHeap {
    /// Serves from `System` until [`route`](Self::route) is called.
    pub const fn new(heap: &'static KernelHeap<'static>) -> Self {
        Self::with_build(heap, None)
    }

    /// Calls `build` inside the process's first allocation: it builds a machine
    /// with a host window, initialises `heap` over it and returns the machine,
    /// whose window the heap then serves. A `build` that panics aborts the process
    /// (a global allocator must not unwind).
    ///
    /// # Safety
    ///
    /// `build` initialises `heap` over the machine it returns, as
    /// [`route`](Self::route) requires.
    pub const unsafe fn building(
        heap: &'static KernelHeap<'static>,
        build: fn() -> &'static SimMachine,
    ) -> Self {
        Self::with_build(heap, Some(build))
    }

    const fn with_build(
        heap: &'static KernelHeap<'static>,
        build: Option<fn() -> &'static SimMachine>,
    ) -> Self {
        Self {
            heap,
            build,
            state: AtomicU8::new(UNBUILT),
            start: AtomicU64::new(0),
            size: AtomicU64::new(0),
        }
    }

    /// New blocks come from the heap, which the caller initialised over
    /// `machine`'s host window (nothing if the machine has none).
    ///
    /// # Safety
    ///
    /// The heap was initialised ([`KernelHeap::init`]) over a manager whose region
    /// is `machine`'s host window: every block it hands out lies there, which is how
    /// `dealloc` and `realloc` tell its blocks from the system allocator's. A later
    /// call names the same machine (another window would send the heap's blocks to
    /// the system allocator).
    pub unsafe fn route(&self, machine: &SimMachine) {
        let Some((start, size)) = machine.host_window() else {
            return;
        };
        self.start.store(start.as_u64(), Ordering::Release);
        self.size.store(size, Ordering::Release);
        self.state.store(READY, Ordering::Release);
    }

    /// Whether the heap made `ptr` (it lies in the routed window).
    pub fn owns(&self, ptr: *const u8) -> bool {
        let size = self.size.load(Ordering::Acquire);
        (ptr as u64).wrapping_sub(self.start.load(Ordering::Acquire)) < size
    }

    /// Whether the heap is ready (built and routed).
    pub fn is_ready(&self) -> bool {
        self.state.load(Ordering::Acquire) == READY
    }

    /// Whether new blocks come from the heap; builds it in the first call if asked.
    fn heap_serves(&self) -> bool {
        let mut state = self.state.load(Ordering::Acquire);
        if state == UNBUILT
            && let Some(build) = self.build
            && self
                .state
                .compare_exchange(UNBUILT, BUILDING, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            // Unwinding out of a global allocator is undefined behaviour.
            let machine = std::panic::catch_unwind(build).unwrap_or_else(|_| std::process::abort());
            // SAFETY: `building`'s contract: `build` initialised the heap over it.
            unsafe { self.route(machine) };
            state = self.state.load(Ordering::Acquire);
        }
        state == READY
    }
}

// SAFETY: every block is freed and resized by the allocator that made it, told apart
// by address (the heap's window is its own); each call forwards the caller's
// promises.
unsafe impl GlobalAlloc for RoutedHeap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded from the caller.
        unsafe {
            if self.heap_serves() {
                self.heap.alloc(layout)
            } else {
                System.alloc(layout)
            }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded from the caller.
        unsafe {
            if self.heap_serves() {
                self.heap.alloc_zeroed(layout)
            } else {
                System.alloc_zeroed(layout)
            }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded from the caller; the address says who made the block.
        unsafe {
            if self.owns(ptr) {
                self.heap.dealloc(ptr, layout)
            } else {
                System.dealloc(ptr, layout)
            }
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded from the caller; a block stays with the allocator that
        // made it.
        unsafe {
            if self.owns(ptr) {
                self.heap.realloc(ptr, layout, new_size)
            } else {
                System.realloc(ptr, layout, new_size)
            }
        }
    }
}
