//! A kernel heap (`GlobalAlloc`) on top of vmalloc.
//!
//! Two paths, chosen by size:
//!
//! - Small requests come from a `linked_list_allocator::Heap` whose memory is a
//!   virtual *window* reserved once in the vmalloc region and backed by frames only as
//!   the heap grows: when the list runs dry, the next pages of the window are mapped
//!   ([`Vmalloc::populate`]) and handed to `Heap::extend`. Pages stay mapped once the
//!   heap has grown (the high-water mark), as a kernel's `brk`-style heap does.
//! - Requests of at least [`HeapConfig::large_threshold`] bytes, or aligned beyond a
//!   page, go straight to `vmalloc` with the requested alignment, so big buffers never
//!   fragment the list, and growing one is a `vrealloc` that remaps instead of copying.
//!
//! `dealloc` and `realloc` tell the paths apart by address: a block inside the window
//! is the list's, anything else is a vmalloc area. When the window is full, small
//! requests fall back to vmalloc too, so running past the window only fails when
//! vmalloc itself fails; failure is a null pointer, never a panic.
//!
//! The heap and the vmalloc manager have separate locks, always taken in that order
//! (heap, then manager, then frame allocator), and the manager never allocates from
//! the heap, so the heap can back a kernel's `#[global_allocator]`.
//!
//! [`Vmalloc::populate`]: crate::vmalloc::Vmalloc::populate

use crate::vmalloc::{VmOptions, VmallocOps};
use crate::{Error, PAGE_SIZE};
use core::alloc::{GlobalAlloc, Layout};
use core::ptr::{self, NonNull};
use core::sync::atomic::{AtomicUsize, Ordering};
use linked_list_allocator::Heap;

/// Sizes that shape a [`KernelHeap`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeapConfig {
    /// Bytes of virtual space reserved for the small-object heap.
    pub window: usize,
    /// Requests of at least this many bytes go straight to vmalloc.
    pub large_threshold: usize,
    /// The least the small heap grows by, in bytes (rounded up to pages).
    pub grow_step: usize,
}

impl HeapConfig {
    /// A 1 GiB window, requests from 16 KiB (four pages) to vmalloc, 64 KiB growth.
    pub const DEFAULT: HeapConfig = HeapConfig {
        window: 1 << 30,
        large_threshold: 4 * PAGE_SIZE as usize,
        grow_step: 16 * PAGE_SIZE as usize,
    };
}

impl Default for HeapConfig {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Counters of a [`KernelHeap`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HeapStats {
    /// Bytes of the window backed by frames (the small heap's high-water mark).
    pub mapped: usize,
    /// Bytes of the small heap handed out (as `linked_list_allocator` counts them).
    pub in_use: usize,
    /// Blocks living in their own vmalloc areas.
    pub large_blocks: usize,
    /// Bytes requested for those blocks.
    pub large_bytes: usize,
}

/// A kernel heap on vmalloc. See the [module documentation](self).
///
/// In a kernel, a `static` with `#[global_allocator]`, initialised at boot once the
/// vmalloc manager exists (see `examples/kernel_setup.rs`):
///
/// ```text
/// #[global_allocator]
/// static HEAP: KernelHeap<'static> = KernelHeap::new(HeapConfig::DEFAULT);
/// HEAP.init(VMALLOC.get().unwrap())?;
/// ```
///
/// On the host, as a plain object over a simulated machine whose host window makes
/// vmalloc memory dereferenceable:
///
/// ```
/// use core::alloc::{GlobalAlloc, Layout};
/// use vmalloc::heap::{HeapConfig, KernelHeap};
/// use vmalloc_sim::{SimConfig, SimMachine};
/// use vmalloc::vmalloc::{Vmalloc, VmallocConfig};
///
/// let machine = SimMachine::new(SimConfig::new(64 << 20).with_host_window(4 << 30));
/// let frames = machine.frames();
/// let (start, size) = machine.host_window().unwrap();
/// let config = VmallocConfig { start, size, ..VmallocConfig::default() };
/// // SAFETY: the machine's page tables belong to this manager alone.
/// let vm = unsafe { Vmalloc::new(config, machine.root(), machine.phys(), &frames, &machine) }?;
/// let heap = KernelHeap::new(HeapConfig::DEFAULT);
/// heap.init(&vm)?;
/// let layout = Layout::from_size_align(100, 8).unwrap();
/// // SAFETY: a non-zero size; the block is freed with the same layout.
/// unsafe {
///     let block = heap.alloc(layout);
///     block.write_bytes(7, 100);
///     assert!(heap.owns_small(block));
///     heap.dealloc(block, layout);
/// }
/// assert_eq!(heap.stats().in_use, 0);
/// # Ok::<(), vmalloc::Error>(())
/// ```
pub struct KernelHeap<'a> {
    vmalloc: spin::Once<&'a dyn VmallocOps>,
    small: spin::Mutex<SmallHeap>,
    config: HeapConfig,
    large_blocks: AtomicUsize,
    large_bytes: AtomicUsize,
}

/// The list heap and the window it lives in.
struct SmallHeap {
    list: Heap,
    window: usize,
    window_len: usize,
    mapped: usize,
}

// SAFETY: the list heap's raw pointers point into the window, which belongs to this
// heap alone; they are only used with the lock held.
unsafe impl Send for SmallHeap {}

impl<'a> KernelHeap<'a> {
    /// A heap that serves nothing until [`init`](Self::init); `const`, for a `static`.
    pub const fn new(config: HeapConfig) -> Self {
        Self {
            vmalloc: spin::Once::new(),
            small: spin::Mutex::new(SmallHeap {
                list: Heap::empty(),
                window: 0,
                window_len: 0,
                mapped: 0,
            }),
            config,
            large_blocks: AtomicUsize::new(0),
            large_bytes: AtomicUsize::new(0),
        }
    }

    /// Reserves the window in `vmalloc`'s region; until then every allocation fails.
    ///
    /// # Errors
    ///
    /// [`Error::Overlap`] if the heap was initialised already; whatever
    /// [`Vmalloc::reserve`](crate::vmalloc::Vmalloc::reserve) returns.
    pub fn init(&self, vmalloc: &'a dyn VmallocOps) -> Result<(), Error> {
        let mut small = self.lock_small();
        if self.vmalloc.is_completed() {
            return Err(Error::Overlap);
        }
        let options = VmOptions {
            tag: "kernel heap",
            ..VmOptions::default()
        };
        let window = vmalloc.reserve(self.config.window, &options)?;
        small.window = window.as_ptr() as usize;
        // The reservation is whole pages, and so is what `populate` backs: blocks
        // past a window size that is not a page multiple are still the list's.
        small.window_len = self.config.window.next_multiple_of(PAGE_SIZE as usize);
        self.vmalloc.call_once(|| vmalloc);
        Ok(())
    }

    /// The configuration the heap was built with.
    pub fn config(&self) -> &HeapConfig {
        &self.config
    }

    /// Counters of both paths.
    pub fn stats(&self) -> HeapStats {
        let small = self.lock_small();
        HeapStats {
            mapped: small.mapped,
            in_use: small.list.used(),
            large_blocks: self.large_blocks.load(Ordering::Relaxed),
            large_bytes: self.large_bytes.load(Ordering::Relaxed),
        }
    }

    /// Whether `ptr` lies in the small heap's window.
    pub fn owns_small(&self, ptr: *const u8) -> bool {
        let small = self.lock_small();
        (ptr as usize).wrapping_sub(small.window) < small.window_len
    }

    /// The small heap, locked. Its holder may be in a vmalloc call that waits for this
    /// CPU's TLB flush (a shootdown), so a waiter serves flush requests while it spins
    /// ([`VmallocOps::relax`]): with interrupts disabled it would otherwise never
    /// answer, and both CPUs would wait forever.
    fn lock_small(&self) -> spin::MutexGuard<'_, SmallHeap> {
        loop {
            if let Some(guard) = self.small.try_lock() {
                return guard;
            }
            match self.vmalloc.get() {
                Some(vmalloc) => vmalloc.relax(),
                None => core::hint::spin_loop(),
            }
        }
    }

    fn is_large(&self, layout: Layout) -> bool {
        layout.size() >= self.config.large_threshold || layout.align() > PAGE_SIZE as usize
    }

    fn alloc_small(&self, layout: Layout) -> Option<NonNull<u8>> {
        let vmalloc = *self.vmalloc.get()?;
        let mut small = self.lock_small();
        if let Ok(block) = small.list.allocate_first_fit(layout) {
            return Some(block);
        }
        small.grow(vmalloc, layout, self.config.grow_step).ok()?;
        small.list.allocate_first_fit(layout).ok()
    }

    fn alloc_large(&self, layout: Layout) -> Option<NonNull<u8>> {
        let vmalloc = *self.vmalloc.get()?;
        let options = VmOptions {
            align: layout.align() as u64,
            tag: "kernel heap large",
            ..VmOptions::default()
        };
        let block = vmalloc.vmalloc_with(layout.size(), &options).ok()?;
        self.large_blocks.fetch_add(1, Ordering::Relaxed);
        self.large_bytes.fetch_add(layout.size(), Ordering::Relaxed);
        Some(block)
    }

    fn allocate(&self, layout: Layout) -> Option<NonNull<u8>> {
        if self.is_large(layout) {
            self.alloc_large(layout)
        } else {
            self.alloc_small(layout)
                .or_else(|| self.alloc_large(layout))
        }
    }

    /// # Safety
    ///
    /// `ptr` was returned by `allocate` with `layout` and is not used afterwards.
    unsafe fn deallocate(&self, ptr: *mut u8, layout: Layout) {
        let mut small = self.lock_small();
        if (ptr as usize).wrapping_sub(small.window) < small.window_len {
            // SAFETY: the block came from the list heap with this layout (caller).
            unsafe { small.list.deallocate(NonNull::new_unchecked(ptr), layout) };
            return;
        }
        drop(small);
        let Some(vmalloc) = self.vmalloc.get() else {
            return;
        };
        if vmalloc.vfree(ptr).is_ok() {
            self.large_blocks.fetch_sub(1, Ordering::Relaxed);
            self.large_bytes.fetch_sub(layout.size(), Ordering::Relaxed);
        }
    }

    /// Linux's `kvmalloc`: `size` bytes from the small heap if they fit, else from
    /// vmalloc. Free with [`kvfree`](Self::kvfree), which needs no size.
    pub fn kvmalloc(&self, size: usize) -> Option<NonNull<u8>> {
        let total = size.checked_add(KV_HEADER)?;
        let layout = Layout::from_size_align(total, KV_HEADER).ok()?;
        let block = self.allocate(layout)?;
        // SAFETY: the block holds `total` bytes, the first KV_HEADER for the size.
        unsafe {
            block.as_ptr().cast::<usize>().write(total);
            Some(block.add(KV_HEADER))
        }
    }

    /// Frees what [`kvmalloc`](Self::kvmalloc) returned.
    ///
    /// # Safety
    ///
    /// `ptr` was returned by `kvmalloc` on this heap and is not used afterwards.
    pub unsafe fn kvfree(&self, ptr: NonNull<u8>) {
        // SAFETY: `kvmalloc` put the block's size KV_HEADER bytes before `ptr`.
        unsafe {
            let block = ptr.as_ptr().sub(KV_HEADER);
            let total = block.cast::<usize>().read();
            self.deallocate(block, Layout::from_size_align_unchecked(total, KV_HEADER));
        }
    }
}

/// Bytes `kvmalloc` keeps before each block for its size (and the alignment it gives).
const KV_HEADER: usize = 16;

impl SmallHeap {
    /// Maps enough of the window for `layout` (at least `step` bytes) and hands the
    /// new pages to the list heap.
    fn grow(&mut self, vmalloc: &dyn VmallocOps, layout: Layout, step: usize) -> Result<(), Error> {
        let need = layout.size() + layout.align() + 4 * core::mem::size_of::<usize>();
        let target = self
            .mapped
            .saturating_add(need.max(step))
            .min(self.window_len);
        if target <= self.mapped {
            return Err(Error::OutOfVirtualSpace);
        }
        let backed = vmalloc.populate(self.window as *mut u8, target)?;
        if self.mapped == 0 {
            // SAFETY: `backed` bytes from the window start are mapped read-write and
            // belong to this heap alone.
            unsafe { self.list.init(self.window as *mut u8, backed) };
        } else {
            // SAFETY: the bytes between the old and the new top are freshly mapped
            // and contiguous with the heap.
            unsafe { self.list.extend(backed - self.mapped) };
        }
        self.mapped = backed;
        Ok(())
    }
}

// SAFETY: blocks come from the list heap or from their own vmalloc areas, both
// mapped read-write and handed out once; `dealloc` routes each back by address.
unsafe impl GlobalAlloc for KernelHeap<'_> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.allocate(layout)
            .map_or(ptr::null_mut(), NonNull::as_ptr)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: GlobalAlloc's contract: `ptr` came from `alloc` with `layout`.
        unsafe { self.deallocate(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let large_block = !self.owns_small(ptr);
        if let Some(vmalloc) = self.vmalloc.get()
            && large_block
            && new_size >= self.config.large_threshold
        {
            // The frames are remapped, not copied.
            return match vmalloc.vrealloc(ptr, new_size) {
                Ok(moved) => {
                    self.large_bytes.fetch_add(new_size, Ordering::Relaxed);
                    self.large_bytes.fetch_sub(layout.size(), Ordering::Relaxed);
                    moved.as_ptr()
                }
                Err(_) => ptr::null_mut(),
            };
        }
        // SAFETY: GlobalAlloc's contract: `new_size` is valid for `layout.align()`.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        let Some(moved) = self.allocate(new_layout) else {
            return ptr::null_mut();
        };
        // SAFETY: both blocks are live and hold at least the bytes copied.
        unsafe {
            ptr::copy_nonoverlapping(ptr, moved.as_ptr(), layout.size().min(new_size));
            self.deallocate(ptr, layout);
        }
        moved.as_ptr()
    }
}

/// A `T` allocated through a [`KernelHeap`] (small heap or vmalloc, by size), dropped
/// and freed together: Rust-for-Linux's `KVBox`.
pub struct KVBox<'h, T> {
    ptr: NonNull<T>,
    heap: &'h dyn Blocks,
}

/// What a [`KVBox`] needs of its heap once it exists, so the box need not name the
/// heap's own lifetime.
trait Blocks: Sync {
    /// # Safety
    ///
    /// As [`KernelHeap::deallocate`].
    unsafe fn deallocate(&self, ptr: *mut u8, layout: Layout);
}

impl Blocks for KernelHeap<'_> {
    unsafe fn deallocate(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded from the caller.
        unsafe { KernelHeap::deallocate(self, ptr, layout) }
    }
}

impl<'h, T> KVBox<'h, T> {
    /// Moves `value` onto `heap`.
    ///
    /// # Errors
    ///
    /// [`Error::OutOfFrames`] when neither path can serve it; `value` is dropped.
    pub fn new<'v: 'h>(heap: &'h KernelHeap<'v>, value: T) -> Result<Self, Error> {
        let layout = Layout::new::<T>();
        let ptr = if layout.size() == 0 {
            NonNull::dangling()
        } else {
            heap.allocate(layout).ok_or(Error::OutOfFrames)?.cast::<T>()
        };
        // SAFETY: `ptr` is valid and aligned for a `T` (dangling is valid for a ZST).
        unsafe { ptr.as_ptr().write(value) };
        Ok(Self { ptr, heap })
    }
}

impl<T> core::ops::Deref for KVBox<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: `new` wrote a valid `T` that lives until drop.
        unsafe { self.ptr.as_ref() }
    }
}

impl<T> core::ops::DerefMut for KVBox<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as in `deref`; `&mut self` makes this the only reference.
        unsafe { self.ptr.as_mut() }
    }
}

impl<T> Drop for KVBox<'_, T> {
    fn drop(&mut self) {
        let layout = Layout::new::<T>();
        // SAFETY: the `T` is valid and never used again; the block came from
        // `allocate` with `layout` unless `T` is zero-sized.
        unsafe {
            self.ptr.as_ptr().drop_in_place();
            if layout.size() != 0 {
                self.heap.deallocate(self.ptr.as_ptr().cast(), layout);
            }
        }
    }
}

// SAFETY: a `KVBox<T>` owns its `T` like a `Box<T>`; the heap is `Sync`.
unsafe impl<T: Send> Send for KVBox<'_, T> {}
// SAFETY: as `Box<T>`.
unsafe impl<T: Sync> Sync for KVBox<'_, T> {}

#[cfg(feature = "allocator-api2")]
// SAFETY: blocks are valid for their layout until deallocated, and `deallocate`
// routes them back to the path that made them, as `GlobalAlloc` does.
unsafe impl allocator_api2::alloc::Allocator for &KernelHeap<'_> {
    fn allocate(&self, layout: Layout) -> Result<NonNull<[u8]>, allocator_api2::alloc::AllocError> {
        if layout.size() == 0 {
            // A dangling, aligned pointer: what zero-sized allocations get.
            let dangling = ptr::without_provenance_mut::<u8>(layout.align());
            // SAFETY: an alignment is never zero.
            let dangling = unsafe { NonNull::new_unchecked(dangling) };
            return Ok(NonNull::slice_from_raw_parts(dangling, 0));
        }
        let block = KernelHeap::allocate(self, layout).ok_or(allocator_api2::alloc::AllocError)?;
        Ok(NonNull::slice_from_raw_parts(block, layout.size()))
    }

    unsafe fn deallocate(&self, ptr: NonNull<u8>, layout: Layout) {
        if layout.size() != 0 {
            // SAFETY: the Allocator contract: `ptr` came from `allocate` with `layout`.
            unsafe { KernelHeap::deallocate(self, ptr.as_ptr(), layout) }
        }
    }
}
