//! A kernel heap (`GlobalAlloc`) on top of vmalloc.
//!
//! Three paths, chosen by the layout:
//!
//! - Blocks up to [`HeapConfig::slab_max`] bytes (a page by default) come from
//!   size-class [slabs](slab): constant time however fragmented the heap is, and
//!   emptied slabs go back to vmalloc. Once the kernel names its CPUs
//!   ([`KernelHeap::use_cpus`]), each CPU keeps a magazine per class of its own in
//!   front of them, used with no locked instruction and filled and emptied half a
//!   magazine at a time.
//! - Other requests below [`HeapConfig::large_threshold`] come from a
//!   `linked_list_allocator::Heap` whose memory is a virtual *window* reserved once in
//!   the vmalloc region and backed by frames only as the heap grows: when the list runs
//!   dry, the next pages of the window are mapped ([`Vmalloc::populate`]) and handed to
//!   `Heap::extend`. Pages stay mapped once the heap has grown (the high-water mark),
//!   as a kernel's `brk`-style heap does.
//! - Requests of at least [`HeapConfig::large_threshold`] bytes, or aligned beyond a
//!   page, go straight to `vmalloc` with the requested alignment, so big buffers never
//!   fragment the list, and growing one is a `vrealloc` that remaps instead of copying.
//!
//! `dealloc` and `realloc` tell the paths apart by address and layout: a block inside
//! the window is the list's (a slab-sized request falls back to the list when no slab
//! can be made), a slab-sized layout outside it is a slab object, anything else is a
//! vmalloc area. When the window is full, list-sized requests fall back to vmalloc
//! too, so running past the window only fails when vmalloc itself fails; failure is a
//! null pointer, never a panic.
//!
//! The heap and the vmalloc manager have separate locks, always taken in that order
//! (a slab class or the list, then the manager, then the frame allocator), and the
//! manager never allocates from the heap, so the heap can back a kernel's
//! `#[global_allocator]`. No lock of the whole heap is held across a call into the
//! manager: the list grows without its lock (other CPUs go on allocating and freeing
//! list blocks meanwhile), and blocks of their own go to vmalloc with no heap lock at
//! all; only a slab class's own lock is held while it makes or frees one of its
//! slabs. Every one of these locks is taken with interrupts held off through
//! the kernel's [`Cpus::irq_save`] (the manager's flush policy names the CPUs), and
//! the per-CPU magazines are used under the same hold, so an interrupt handler may
//! allocate and free: it never finds a lock held by the code it interrupted.
//!
//! [`Vmalloc::populate`]: crate::vmalloc::Vmalloc::populate

mod percpu;
pub mod slab;

use crate::smp::Cpus;
use crate::sync::{IrqGuard, IrqLock, Spin};
use crate::vmalloc::{VmOptions, VmallocOps};
use crate::{Error, PAGE_SIZE};
use core::alloc::{GlobalAlloc, Layout};
use core::ptr::{self, NonNull};
use core::sync::atomic::{AtomicUsize, Ordering};
use linked_list_allocator::Heap;
use percpu::CpuCaches;
use slab::{Route, SlabClassStats, Slabs};

/// Sizes that shape a [`KernelHeap`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeapConfig {
    /// Bytes of virtual space reserved for the list heap.
    pub window: usize,
    /// Requests of at least this many bytes go straight to vmalloc.
    pub large_threshold: usize,
    /// The least the list heap grows by, in bytes (rounded up to pages).
    pub grow_step: usize,
    /// Requests up to this many bytes (and [`slab::MAX_OBJECT`] at most) come from
    /// the slabs; 0 turns them off.
    pub slab_max: usize,
}

impl HeapConfig {
    /// A 1 GiB window, slabs up to a page, requests from 16 KiB (four pages) to
    /// vmalloc, 64 KiB growth.
    pub const DEFAULT: HeapConfig = HeapConfig {
        window: 1 << 30,
        large_threshold: 4 * PAGE_SIZE as usize,
        grow_step: 16 * PAGE_SIZE as usize,
        slab_max: slab::MAX_OBJECT,
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
    /// Bytes of the window backed by frames (the list heap's high-water mark).
    pub mapped: usize,
    /// Bytes handed out by the list heap (as `linked_list_allocator` counts them) and
    /// the slabs (whole objects).
    pub in_use: usize,
    /// Slab objects handed out and not freed.
    pub slab_objects: usize,
    /// Bytes of frames the slabs hold (per class: [`KernelHeap::slab_stats`]).
    pub slab_bytes: usize,
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
///     assert_eq!(heap.stats().slab_objects, 1);
///     heap.dealloc(block, layout);
/// }
/// assert_eq!(heap.stats().in_use, 0);
/// # Ok::<(), vmalloc::Error>(())
/// ```
pub struct KernelHeap<'a> {
    backing: spin::Once<Backing<'a>>,
    list: IrqLock<ListHeap>,
    slabs: Slabs,
    cpus: spin::Once<&'a dyn Cpus>,
    cpu_caches: CpuCaches,
    config: HeapConfig,
    large_blocks: AtomicUsize,
    large_bytes: AtomicUsize,
}

/// What [`KernelHeap::init`] sets once.
struct Backing<'a> {
    vmalloc: &'a dyn VmallocOps,
    /// The list heap's window: start and length in bytes (whole pages).
    window: usize,
    window_len: usize,
}

/// The list heap and how much of its window is mapped.
struct ListHeap {
    list: Heap,
    mapped: usize,
}

// SAFETY: the list heap's raw pointers point into the window, which belongs to this
// heap alone; they are only used with the lock held.
unsafe impl Send for ListHeap {}

/// Takes one of the heap's locks with interrupts held off through the manager's
/// CPUs, serving flush requests while it waits: the holder may be in a vmalloc call
/// that waits for this CPU's TLB flush (see [`sync`](crate::sync)). Before `init`
/// nothing can be allocated, so no interrupt handler contends.
fn lock_heap<'m, T>(lock: &'m IrqLock<T>, vmalloc: Option<&'m dyn VmallocOps>) -> IrqGuard<'m, T> {
    match vmalloc {
        Some(vmalloc) => lock.lock(vmalloc),
        None => lock.lock(&Spin),
    }
}

impl<'a> KernelHeap<'a> {
    /// A heap that serves nothing until [`init`](Self::init); `const`, for a `static`.
    pub const fn new(config: HeapConfig) -> Self {
        Self {
            backing: spin::Once::new(),
            list: IrqLock::new(ListHeap {
                list: Heap::empty(),
                mapped: 0,
            }),
            slabs: Slabs::new(),
            cpus: spin::Once::new(),
            cpu_caches: CpuCaches::new(),
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
        // The list's lock keeps two `init`s from both reserving.
        let _list = self.list.lock(vmalloc);
        if self.backing.is_completed() {
            return Err(Error::Overlap);
        }
        let options = VmOptions {
            tag: "kernel heap",
            ..VmOptions::default()
        };
        let window = vmalloc.reserve(self.config.window, &options)?;
        self.backing.call_once(|| Backing {
            vmalloc,
            window: window.as_ptr() as usize,
            // The reservation is whole pages, and so is what `populate` backs: blocks
            // past a window size that is not a page multiple are still the list's.
            window_len: self.config.window.next_multiple_of(PAGE_SIZE as usize),
        });
        Ok(())
    }

    /// Gives each CPU its own magazines in front of the slab classes, picked by
    /// `cpus.current()`: allocations and frees on different CPUs then rarely meet on a
    /// lock, and most take none (see the [module documentation](self)). Once; later
    /// calls change nothing.
    ///
    /// The magazines rely on [`Cpus`]'s contract for their soundness: a caller does
    /// not change CPUs during a heap call, and a CPU outside `online()` makes none.
    pub fn use_cpus(&self, cpus: &'a dyn Cpus) {
        self.cpus.call_once(|| cpus);
    }

    /// The configuration the heap was built with.
    pub fn config(&self) -> &HeapConfig {
        &self.config
    }

    /// Counters of every path.
    pub fn stats(&self) -> HeapStats {
        let vmalloc = self.backing.get().map(|backing| backing.vmalloc);
        let (mapped, list_in_use) = {
            let list = lock_heap(&self.list, vmalloc);
            (list.mapped, list.list.used())
        };
        let classes = self.slab_stats();
        let sum = |count: fn(&SlabClassStats) -> usize| classes.iter().map(count).sum::<usize>();
        HeapStats {
            mapped,
            in_use: list_in_use + sum(|class| class.objects * class.size),
            slab_objects: sum(|class| class.objects),
            slab_bytes: sum(|class| class.bytes),
            large_blocks: self.large_blocks.load(Ordering::Relaxed),
            large_bytes: self.large_bytes.load(Ordering::Relaxed),
        }
    }

    /// Counters of each slab size class.
    pub fn slab_stats(&self) -> [SlabClassStats; slab::CLASSES] {
        let mut classes = self
            .slabs
            .stats(self.backing.get().map(|backing| backing.vmalloc));
        // Objects in per-CPU magazines left their class but are free.
        for (class, cached) in classes.iter_mut().zip(self.cpu_caches.cached()) {
            class.objects -= cached.min(class.objects);
            class.cached += cached;
        }
        classes
    }

    /// Gives every empty slab back to vmalloc (Linux's `kmem_cache_shrink`); the
    /// heap otherwise keeps up to [`slab::EMPTY_BUDGET`] bytes of them.
    ///
    /// With per-CPU magazines, this CPU's and every offline CPU's are emptied first;
    /// another online CPU empties its own at its next heap call (or run `shrink` on
    /// every CPU, as Linux's `flush_all` runs on each). Magazines in use at the moment
    /// (by the code an interrupt handler interrupted) are emptied at their next call.
    pub fn shrink(&self) {
        if let Some(backing) = self.backing.get() {
            if let Some(cpus) = self.cpus.get() {
                self.cpu_caches.drain(*cpus, &self.slabs, backing.vmalloc);
            }
            self.slabs.shrink(backing.vmalloc);
        }
    }

    /// Whether `ptr` lies in the list heap's window.
    pub fn owns_small(&self, ptr: *const u8) -> bool {
        self.backing
            .get()
            .is_some_and(|backing| (ptr as usize).wrapping_sub(backing.window) < backing.window_len)
    }

    fn is_large(&self, layout: Layout) -> bool {
        layout.size() >= self.config.large_threshold || layout.align() > PAGE_SIZE as usize
    }

    /// The slab class that serves `layout`, if the slabs serve it.
    fn slab_class(&self, layout: Layout) -> Option<usize> {
        if layout.size() > self.config.slab_max || self.is_large(layout) {
            return None;
        }
        slab::class_for(layout)
    }

    fn alloc_list(&self, layout: Layout) -> Option<NonNull<u8>> {
        let backing = self.backing.get()?;
        // Two rounds: a CPU growing at the same time may take the pages this one
        // mapped, as this one may take its.
        for _ in 0..2 {
            let mapped = {
                let mut list = lock_heap(&self.list, Some(backing.vmalloc));
                if let Ok(block) = list.list.allocate_first_fit(layout) {
                    return Some(block);
                }
                list.mapped
            };
            // The list's lock is not held across the manager's call: other CPUs
            // allocate and free list blocks meanwhile.
            let backed = grow(backing, mapped, layout, self.config.grow_step).ok()?;
            let mut list = lock_heap(&self.list, Some(backing.vmalloc));
            list.adopt(backing, backed);
            if let Ok(block) = list.list.allocate_first_fit(layout) {
                return Some(block);
            }
        }
        None
    }

    fn alloc_large(&self, layout: Layout) -> Option<NonNull<u8>> {
        let vmalloc = self.backing.get()?.vmalloc;
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
            return self.alloc_large(layout);
        }
        if let Some(class) = self.slab_class(layout) {
            // Not to vmalloc: `deallocate` takes a slab-sized block outside the window
            // for a slab object.
            let vmalloc = self.backing.get()?.vmalloc;
            let object = match self.cpus.get() {
                Some(cpus) => self.cpu_caches.alloc(*cpus, class, &self.slabs, vmalloc),
                None => self.slabs.alloc(class, Route::SHARED, vmalloc),
            };
            return object.or_else(|| self.alloc_list(layout));
        }
        self.alloc_list(layout).or_else(|| self.alloc_large(layout))
    }

    /// # Safety
    ///
    /// `ptr` was returned by `allocate` with `layout` and is not used afterwards.
    unsafe fn deallocate(&self, ptr: *mut u8, layout: Layout) {
        let Some(backing) = self.backing.get() else {
            return;
        };
        if self.owns_small(ptr) {
            let mut list = lock_heap(&self.list, Some(backing.vmalloc));
            // SAFETY: the block came from the list heap with this layout (caller).
            unsafe { list.list.deallocate(NonNull::new_unchecked(ptr), layout) };
        } else if let Some(class) = self.slab_class(layout) {
            // SAFETY: a slab-sized block outside the window is a slab object of this
            // layout's class (caller, and `allocate`'s routing).
            unsafe {
                match self.cpus.get() {
                    Some(cpus) => {
                        self.cpu_caches
                            .free(*cpus, class, ptr, &self.slabs, backing.vmalloc)
                    }
                    None => self.slabs.free(class, ptr, Route::SHARED, backing.vmalloc),
                }
            }
        // SAFETY: anything else is a block in a vmalloc area of its own, which the
        // caller gives up.
        } else if unsafe { backing.vmalloc.vfree(ptr) }.is_ok() {
            self.large_blocks.fetch_sub(1, Ordering::Relaxed);
            self.large_bytes.fetch_sub(layout.size(), Ordering::Relaxed);
        }
    }

    /// Linux's `kvmalloc`: `size` bytes from the slabs or the list heap if they fit,
    /// else from vmalloc. Free with [`kvfree`](Self::kvfree), which needs no size.
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

/// Maps enough of the window past `mapped` bytes for `layout` (at least `step`
/// bytes); returns how many bytes from the window's start are mapped now. Called
/// without the list's lock: `populate` maps the window from its start under the
/// manager's lock, so CPUs growing at once each get a prefix that covers what they
/// asked, and the list takes it in with [`ListHeap::adopt`].
fn grow(backing: &Backing<'_>, mapped: usize, layout: Layout, step: usize) -> Result<usize, Error> {
    let need = layout.size() + layout.align() + 4 * core::mem::size_of::<usize>();
    let target = mapped
        .saturating_add(need.max(step))
        .min(backing.window_len);
    if target <= mapped {
        return Err(Error::OutOfVirtualSpace);
    }
    backing.vmalloc.populate(backing.window as *mut u8, target)
}

impl ListHeap {
    /// Hands the window's pages between the list's top and `backed` bytes (mapped by
    /// [`grow`], here or on another CPU) to the list heap.
    fn adopt(&mut self, backing: &Backing<'_>, backed: usize) {
        if backed <= self.mapped {
            return;
        }
        if self.mapped == 0 {
            // SAFETY: `backed` bytes from the window start are mapped read-write and
            // belong to this heap alone.
            unsafe { self.list.init(backing.window as *mut u8, backed) };
        } else {
            // SAFETY: the bytes between the old and the new top are mapped and
            // contiguous with the heap.
            unsafe { self.list.extend(backed - self.mapped) };
        }
        self.mapped = backed;
    }
}

// SAFETY: blocks come from slabs, the list heap or their own vmalloc areas, all
// mapped read-write and handed out once; `dealloc` routes each back by address and
// layout as `allocate` chose.
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
        // SAFETY: GlobalAlloc's contract: `new_size` is valid for `layout.align()`.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        if !self.owns_small(ptr) {
            if let Some(class) = self.slab_class(layout) {
                if self.slab_class(new_layout) == Some(class) {
                    // The object already holds `new_size` bytes.
                    return ptr;
                }
            } else if let Some(backing) = self.backing.get()
                && new_size >= self.config.large_threshold
            {
                // A large block: the frames are remapped, not copied.
                // SAFETY: the caller gives up `ptr` unless it comes back (GlobalAlloc's
                // contract), and the block is a vmalloc area of its own.
                return match unsafe { backing.vmalloc.vrealloc(ptr, new_size) } {
                    Ok(moved) => {
                        self.large_bytes.fetch_add(new_size, Ordering::Relaxed);
                        self.large_bytes.fetch_sub(layout.size(), Ordering::Relaxed);
                        moved.as_ptr()
                    }
                    Err(_) => ptr::null_mut(),
                };
            }
        }
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
