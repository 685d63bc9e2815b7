//! A kernel heap (`GlobalAlloc`) on top of vmalloc.
//!
//! Three paths, chosen by the layout:
//!
//! - Blocks up to [`HeapConfig::slab_max`] bytes (a page by default) come from
//!   size-class [slabs](slab): constant time however fragmented the heap is, and
//!   emptied slabs go back to vmalloc. Once the heap knows the kernel's CPUs (from
//!   the manager's flush policy, by default, or [`KernelHeap::use_cpus`]), each CPU
//!   allocates from and frees into slabs it holds, with no lock and no locked
//!   instruction (SLUB's per-CPU slabs, in `cpu_slab.rs`); other CPUs' frees reach it
//!   lock-free.
//! - Other requests below [`HeapConfig::large_threshold`] come from a
//!   `linked_list_allocator::Heap` whose memory is a virtual *window* reserved once in
//!   the vmalloc region and backed by frames only as the heap grows (`list.rs`).
//! - Requests of at least [`HeapConfig::large_threshold`] bytes, or aligned beyond a
//!   page, go straight to `vmalloc` with the requested alignment, so big buffers never
//!   fragment the list, and growing one is a `vrealloc` that remaps instead of copying.
//!   A freed one is kept mapped, up to [`HeapConfig::large_cache`] bytes, for the next
//!   that fits (`large.rs`): no frames, page-table entries or TLB shootdown per
//!   buffer for a kernel that churns them.
//!
//! With [`HeapConfig::sample_interval`] set, about one slab-sized allocation in that
//! many is served instead from the [guarded pool](guarded) (Linux's KFENCE): alone on
//! a page between unmapped pages, so that an overrun, an underrun or a use after free
//! faults, and [`KernelHeap::diagnose_fault`] names the object and where it was
//! allocated and freed. Off, it costs the allocation path one load and a branch.
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
//! the per-CPU slabs are used under the same hold, so an interrupt handler may
//! allocate and free: it never finds a lock held by the code it interrupted.

mod cpu_slab;
pub mod guarded;
mod kvbox;
mod large;
mod list;
pub mod slab;

use crate::smp::Cpus;
use crate::sync::{IrqGuard, IrqLock, Spin};
use crate::vmalloc::{VmOptions, VmallocOps};
use crate::{Error, PAGE_SIZE};
use core::alloc::{GlobalAlloc, Layout};
use core::ptr::{self, NonNull};
use core::sync::atomic::{AtomicUsize, Ordering};
use cpu_slab::CpuSlabs;
use guarded::Guarded;
pub use kvbox::KVBox;
use large::Keep;
use list::{Backing, ListHeap};
use slab::{SlabClassStats, Slabs};

/// The tag of the heap's large blocks' areas: `dealloc` frees no other area.
const LARGE_TAG: &str = "kernel heap large";
/// The tag of the freed large blocks the heap keeps for reuse (`large.rs`).
const KEPT_TAG: &str = "kernel heap large, kept";

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
    /// Whether [`KernelHeap::init`] gives each CPU slabs of its own when the
    /// manager's flush policy names the kernel's CPUs ([`VmallocOps::cpus`]); with
    /// `false`, every slab allocation takes its class's lock unless the kernel calls
    /// [`KernelHeap::use_cpus`].
    pub per_cpu: bool,
    /// One slab-sized allocation in about this many is served from the
    /// [guarded pool](guarded) instead (Linux's KFENCE); 0, the default, turns
    /// sampling off. It can be changed at run time
    /// ([`KernelHeap::set_sample_interval`]).
    pub sample_interval: u32,
    /// Slots of the guarded pool: how many sampled objects can be live at once,
    /// from 1 to [`guarded::pool::MAX_SLOTS`] (0 is taken as 1, more as the most).
    /// The pool takes two pages of virtual space per slot, made by the first sampled
    /// allocation, and a frame for each slot an object has used, which the slot
    /// keeps (unmapped while it holds no object) for the pool's life.
    pub guarded_slots: usize,
    /// Bytes of freed large blocks the heap keeps mapped for the next large
    /// allocations that fit (see the [module documentation](self)); 0 gives each
    /// back to vmalloc at its free. Blocks larger than a quarter of it are never
    /// kept.
    pub large_cache: usize,
}

impl HeapConfig {
    /// A 1 GiB window, slabs up to a page, requests from 16 KiB (four pages) to
    /// vmalloc, 64 KiB growth, per-CPU slabs wherever the CPUs are known; no sampling
    /// (a pool of 255 slots once [`KernelHeap::set_sample_interval`] turns it on); up
    /// to 2 MiB of freed large blocks kept for reuse.
    pub const DEFAULT: HeapConfig = HeapConfig {
        window: 1 << 30,
        large_threshold: 4 * PAGE_SIZE as usize,
        grow_step: 16 * PAGE_SIZE as usize,
        slab_max: slab::MAX_OBJECT,
        per_cpu: true,
        sample_interval: 0,
        guarded_slots: 255,
        large_cache: 2 << 20,
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
    /// Bytes handed out by the list heap (as `linked_list_allocator` counts them,
    /// with each block's closing word) and the slabs (whole objects).
    pub in_use: usize,
    /// Slab objects handed out and not freed.
    pub slab_objects: usize,
    /// Bytes of frames the slabs hold (per class: [`KernelHeap::slab_stats`]).
    pub slab_bytes: usize,
    /// Blocks living in their own vmalloc areas.
    pub large_blocks: usize,
    /// Bytes requested for those blocks.
    pub large_bytes: usize,
    /// Bytes of freed large blocks kept mapped for reuse
    /// ([`HeapConfig::large_cache`]); [`KernelHeap::shrink`] gives them back.
    pub large_kept: usize,
    /// Frees refused: a slab object freed again, with no other free or allocation of
    /// its size class between the two on that CPU, while it is still the last object
    /// freed onto the list its free went to (a magazine, a slab's free list, a slab's
    /// remote list, a CPU's notices: one comparison each) or while the slab its free
    /// emptied has nothing in use (an allocation between can make room in the CPU's
    /// magazine, which then takes the second free unchecked: checking the object's slab
    /// there would cost every free a cold read); a pointer into the list heap's window
    /// that starts no live list block of its layout's size (freed before, inside a
    /// block: each list block ends with a word only its live block holds); or a large
    /// block's pointer that starts no live large block of the heap's (another owner's
    /// area, a block the heap keeps after its free); and resizes of such a pointer
    /// (`realloc` returns null; a slab object resized within its size class is checked
    /// against the calling CPU's last freed object of the class); and a
    /// [`kvfree`](KernelHeap::kvfree) of a block whose header an underrun changed. A
    /// caller's bug the heap caught; a double free it does not catch (other frees or
    /// allocations of the class came between) is undefined behaviour, as `GlobalAlloc`
    /// says. Heaps over one manager tag their large blocks alike: one freed through
    /// another such heap is taken as that heap's (freed or kept by it, the memory
    /// sound), not refused, and the heap that made it keeps counting it in
    /// `large_blocks`.
    pub refused_frees: usize,
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
/// It holds every CPU's slabs and magazines, on cache lines of their own, for up to
/// [`MAX_CPUS`](crate::smp::MAX_CPUS) CPUs: some 300 KiB, at home in a `static` (or a
/// `Box`), not on a kernel stack; a debug build's test thread with two on its stack
/// runs out of its 2 MiB.
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
    cpu_slabs: CpuSlabs,
    config: HeapConfig,
    /// Sizes below this come from the slabs (when aligned enough): one compare for
    /// `slab_max`, `large_threshold` and [`slab::MAX_OBJECT`].
    slab_end: usize,
    large_blocks: AtomicUsize,
    large_bytes: AtomicUsize,
    refused_frees: AtomicUsize,
    guarded: Guarded<'a>,
}

/// Whether a call failed for want of memory, which the kept large blocks may give.
fn ran_dry(error: Error) -> bool {
    matches!(error, Error::OutOfFrames | Error::OutOfVirtualSpace)
}

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

/// The least size `config` keeps from the slabs: past `slab_max`, at least
/// `large_threshold`, or past [`slab::MAX_OBJECT`].
const fn slab_end(config: &HeapConfig) -> usize {
    let limit = if config.slab_max < slab::MAX_OBJECT {
        config.slab_max
    } else {
        slab::MAX_OBJECT
    };
    if limit == 0 {
        0 // off, for a zero-sized request too
    } else if limit < config.large_threshold {
        limit + 1
    } else {
        config.large_threshold
    }
}

impl<'a> KernelHeap<'a> {
    /// A heap that serves nothing until [`init`](Self::init); `const`, for a `static`.
    pub const fn new(config: HeapConfig) -> Self {
        Self {
            backing: spin::Once::new(),
            list: IrqLock::new(ListHeap::new()),
            slabs: Slabs::new(),
            cpus: spin::Once::new(),
            cpu_slabs: CpuSlabs::new(),
            config,
            slab_end: slab_end(&config),
            large_blocks: AtomicUsize::new(0),
            large_bytes: AtomicUsize::new(0),
            refused_frees: AtomicUsize::new(0),
            guarded: Guarded::new(config.sample_interval, config.guarded_slots),
        }
    }

    /// Reserves the window in `vmalloc`'s region; until then every allocation fails.
    /// With [`HeapConfig::per_cpu`], the CPUs `vmalloc`'s flush policy names get
    /// slabs of their own, as [`use_cpus`](Self::use_cpus) gives them. With
    /// [`HeapConfig::sample_interval`] set, the [guarded pool](guarded) is made too.
    ///
    /// # Errors
    ///
    /// [`Error::Overlap`] if the heap was initialised already; whatever
    /// [`Vmalloc::reserve`](crate::vmalloc::Vmalloc::reserve) returns.
    pub fn init(&self, vmalloc: &'a dyn VmallocOps) -> Result<(), Error> {
        self.init_backing(vmalloc)?;
        if self.config.sample_interval != 0 {
            // Made now rather than by the first sampled allocation, which CPUs
            // racing to allocate would leave to the slabs while it is made; a pool
            // that cannot be had only turns sampling off.
            self.make_guarded_pool();
        }
        Ok(())
    }

    fn init_backing(&self, vmalloc: &'a dyn VmallocOps) -> Result<(), Error> {
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
        if self.config.per_cpu
            && let Some(cpus) = vmalloc.cpus()
        {
            self.cpus.call_once(|| cpus);
        }
        Ok(())
    }

    /// Gives each CPU slabs of its own, picked by `cpus.current()`: allocations and
    /// frees on different CPUs then rarely meet on a lock, and most take none (see
    /// the [module documentation](self)). Once, and only if [`init`](Self::init) did
    /// not already take the CPUs from the manager's flush policy; later calls change
    /// nothing.
    ///
    /// The per-CPU slabs rely on [`Cpus`]'s contract for their soundness: a caller
    /// does not change CPUs during a heap call, and a CPU outside `online()` makes
    /// none.
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
        let (mapped, list_in_use) = self.list_usage();
        let classes = self.slab_stats();
        let sum = |count: fn(&SlabClassStats) -> usize| classes.iter().map(count).sum::<usize>();
        HeapStats {
            mapped,
            in_use: list_in_use + sum(|class| class.objects * class.size),
            slab_objects: sum(|class| class.objects),
            slab_bytes: sum(|class| class.bytes),
            large_blocks: self.large_blocks.load(Ordering::Relaxed),
            large_bytes: self.large_bytes.load(Ordering::Relaxed),
            large_kept: self.slabs.large_kept(vmalloc),
            refused_frees: self.refused_frees.load(Ordering::Relaxed),
        }
    }

    /// The list heap's bytes backed by frames and in use.
    pub(crate) fn list_usage(&self) -> (usize, usize) {
        let vmalloc = self.backing.get().map(|backing| backing.vmalloc);
        let list = lock_heap(&self.list, vmalloc);
        (list.mapped, list.list.used())
    }

    /// Counters of each slab size class.
    pub fn slab_stats(&self) -> [SlabClassStats; slab::CLASSES] {
        let mut classes = self
            .slabs
            .stats(self.backing.get().map(|backing| backing.vmalloc));
        for (class, (live, held)) in classes.iter_mut().zip(self.cpu_slabs.counts()) {
            // The CPUs' counts and the classes' add up to what is in use; a moment's
            // sum may dip below zero while CPUs run.
            class.objects = class.objects.wrapping_add_signed(live);
            if class.objects > isize::MAX as usize {
                class.objects = 0;
            }
            class.cpu_slabs = held;
        }
        classes
    }

    /// Gives every empty slab back to vmalloc (Linux's `kmem_cache_shrink`), and
    /// the freed large blocks kept for reuse; the heap otherwise keeps up to
    /// [`slab::EMPTY_BUDGET`] bytes of empty slabs and
    /// [`HeapConfig::large_cache`] bytes of large blocks.
    ///
    /// With per-CPU slabs, this CPU's and every offline CPU's go back to their classes
    /// first, and every other online CPU's when the manager's flush policy can run
    /// work on it (a [`Shootdown`](crate::smp::Shootdown) can); else that CPU gives
    /// them back at its next heap call (or run `shrink` on every CPU, as Linux's
    /// `flush_all` runs on each). A CPU's slabs in use at the moment (by the code an
    /// interrupt handler interrupted) go back at its next call.
    ///
    /// The slabs a CPU holds age only through its own heap calls: what other CPUs
    /// freed into them waits for its next one. A kernel that takes a CPU offline
    /// calls `shrink` afterwards (as Linux's CPU-dead callback flushes that CPU's
    /// slabs), or that CPU's slabs stay until an allocation runs out.
    pub fn shrink(&self) {
        self.give_back_idle();
    }

    /// [`shrink`](Self::shrink), for an allocation that ran out too: whether it gave
    /// anything back to vmalloc (empty slabs, kept large blocks), so that trying
    /// again may serve. What it gave is told by the giving, not by the heap's totals
    /// after, which frees on other CPUs (or an interrupt handler) change meanwhile.
    fn give_back_idle(&self) -> bool {
        let Some(backing) = self.backing.get() else {
            return false;
        };
        if let Some(cpus) = self.cpus.get() {
            self.cpu_slabs.drain(*cpus, &self.slabs, backing.vmalloc);
        }
        self.slabs.shrink(backing.vmalloc)
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

    /// The slab class that serves `layout`, if the slabs serve it: a compare and a
    /// table read for the usual alignments.
    #[inline(always)]
    fn slab_class(&self, layout: Layout) -> Option<usize> {
        if layout.size() >= self.slab_end {
            return None;
        }
        if layout.align() <= slab::MIN_ALIGN {
            // Below `slab_end`, so at most `MAX_OBJECT`.
            return Some(slab::class_of_size(layout.size()));
        }
        if self.is_large(layout) {
            return None;
        }
        slab::class_for(layout)
    }

    fn alloc_large(&self, layout: Layout) -> Option<NonNull<u8>> {
        let vmalloc = self.backing.get()?.vmalloc;
        let options = VmOptions {
            align: layout.align() as u64,
            tag: LARGE_TAG,
            ..VmOptions::default()
        };
        let block = match self
            .slabs
            .reuse_large(layout, self.config.large_cache, vmalloc)
        {
            Some(block) => block,
            None => match vmalloc.vmalloc_with(layout.size(), &options) {
                Ok(block) => block,
                // Out of memory: what the heap holds idle goes back first. Input
                // vmalloc refuses (an impossible size or alignment) changes nothing.
                Err(error) if ran_dry(error) && self.give_back_idle() => {
                    vmalloc.vmalloc_with(layout.size(), &options).ok()?
                }
                Err(_) => return None,
            },
        };
        self.large_blocks.fetch_add(1, Ordering::Relaxed);
        self.large_bytes.fetch_add(layout.size(), Ordering::Relaxed);
        Some(block)
    }

    /// Frees large block `ptr`: kept mapped for reuse if the budget has room, else
    /// given back to vmalloc. Refused (`false`, nothing changes) if it starts no live
    /// large block of the heap's (the area's tag says): another owner's area, or a
    /// block kept already (a second free).
    ///
    /// # Safety
    ///
    /// If `ptr` starts an area the heap made, the caller gives the block up.
    unsafe fn free_large(&self, ptr: *mut u8, size: usize, vmalloc: &dyn VmallocOps) -> bool {
        match (self.slabs).keep_large(ptr, size, self.config.large_cache, vmalloc) {
            Keep::Taken => true,
            Keep::Refused => false,
            // SAFETY: as the caller promised; an area of another tag is refused.
            Keep::Not => unsafe { vmalloc.vfree_tagged(ptr, LARGE_TAG) }.is_ok(),
        }
    }

    /// Resizes large block `ptr`: its frames are remapped, not copied. A pointer that
    /// starts no live large block of the heap's (a block it keeps after its free,
    /// another owner's area) is refused: null, counted in `refused_frees`. Out of
    /// memory, the kept blocks go back first.
    ///
    /// # Safety
    ///
    /// As [`GlobalAlloc::realloc`].
    unsafe fn realloc_large(
        &self,
        ptr: *mut u8,
        layout: Layout,
        new_size: usize,
        vmalloc: &dyn VmallocOps,
    ) -> *mut u8 {
        if vmalloc.area_size(ptr, LARGE_TAG).is_none() {
            self.refused_frees.fetch_add(1, Ordering::Relaxed);
            return ptr::null_mut();
        }
        // SAFETY: the caller gives up `ptr` unless it comes back (GlobalAlloc's
        // contract), and the block is a vmalloc area of its own.
        let resized = match unsafe { vmalloc.vrealloc(ptr, new_size) } {
            Err(error) if ran_dry(error) && self.give_back_idle() => {
                // SAFETY: as above; the failed call changed nothing.
                unsafe { vmalloc.vrealloc(ptr, new_size) }
            }
            resized => resized,
        };
        let Ok(moved) = resized else {
            return ptr::null_mut();
        };
        let _ = (self.large_bytes).fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bytes| {
            Some(bytes.saturating_sub(layout.size()).saturating_add(new_size))
        });
        moved.as_ptr()
    }

    #[inline]
    #[track_caller]
    fn allocate(&self, layout: Layout) -> Option<NonNull<u8>> {
        if let Some(class) = self.slab_class(layout) {
            // Sampling off: one load and a branch never taken.
            if self.guarded.due()
                && let Some(object) = self.alloc_guarded(layout)
            {
                return Some(object);
            }
            // Not to vmalloc: `deallocate` takes a slab-sized block outside the window
            // for a slab object.
            let vmalloc = self.backing.get()?.vmalloc;
            let object = match self.cpus.get() {
                Some(cpus) => self.cpu_slabs.alloc(*cpus, class, &self.slabs, vmalloc),
                None => self.slabs.alloc(class, true, vmalloc),
            };
            return object.or_else(|| self.alloc_list(layout));
        }
        if self.is_large(layout) {
            return self.alloc_large(layout);
        }
        self.alloc_list(layout).or_else(|| self.alloc_large(layout))
    }

    /// # Safety
    ///
    /// `ptr` was returned by `allocate` with `layout` and is not used afterwards.
    #[inline]
    #[track_caller]
    unsafe fn deallocate(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded.
        if !unsafe { self.release(ptr, layout) } {
            self.refused_frees.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Frees `ptr` on the path `allocate` chose for `layout`: whether the free was
    /// taken (`false`: refused, nothing changed; see [`HeapStats::refused_frees`]).
    ///
    /// # Safety
    ///
    /// As [`deallocate`](Self::deallocate).
    #[inline]
    #[track_caller]
    unsafe fn release(&self, ptr: *mut u8, layout: Layout) -> bool {
        let Some(backing) = self.backing.get() else {
            return false;
        };
        if self.owns_small(ptr) {
            // SAFETY: a block in the window is the list heap's (caller).
            return unsafe { self.free_list(ptr, layout, backing) };
        }
        if let Some(class) = self.slab_class(layout) {
            if self.guarded.owns(ptr) {
                // SAFETY: a sampled object, which the caller gives up. A bad free is
                // reported, not counted.
                unsafe { self.free_guarded(ptr) };
                return true;
            }
            // SAFETY: a slab-sized block outside the window and the guarded pool is a
            // slab object of this layout's class (caller, and `allocate`'s routing).
            return unsafe {
                match self.cpus.get() {
                    Some(cpus) => {
                        self.cpu_slabs
                            .free(*cpus, class, ptr, &self.slabs, backing.vmalloc)
                    }
                    None => self.slabs.free(class, ptr, true, backing.vmalloc),
                }
            };
        }
        // SAFETY: anything else is a block in a vmalloc area of its own, which the
        // caller gives up.
        if !unsafe { self.free_large(ptr, layout.size(), backing.vmalloc) } {
            return false;
        }
        // Saturating: another heap's large block (same manager, same tag) must not
        // wrap this heap's counts.
        let less = |by: usize| move |count: usize| Some(count.saturating_sub(by));
        let _ = (self.large_blocks).fetch_update(Ordering::Relaxed, Ordering::Relaxed, less(1));
        let _ = (self.large_bytes).fetch_update(
            Ordering::Relaxed,
            Ordering::Relaxed,
            less(layout.size()),
        );
        true
    }

    /// Whether `ptr`, an object of slab `class`, is the object freed last where a
    /// free of it would go (the calling CPU's magazine or current slab, or the
    /// class's magazine or the object's slab): a resize of it is of a freed object.
    ///
    /// # Safety
    ///
    /// `ptr` is a slab object of `class` (live, or freed into a slab still there).
    unsafe fn slab_freed_last(&self, class: usize, ptr: *mut u8) -> bool {
        let Some(backing) = self.backing.get() else {
            return false;
        };
        // SAFETY: forwarded.
        unsafe {
            match self.cpus.get() {
                Some(cpus) => {
                    (self.cpu_slabs).freed_last(*cpus, class, ptr, &self.slabs, backing.vmalloc)
                }
                None => self.slabs.freed_last(class, ptr, backing.vmalloc),
            }
        }
    }
}

impl Drop for KernelHeap<'_> {
    /// Gives back to vmalloc everything the heap holds that no allocated block is
    /// in: every CPU's slabs go back to their classes, then the empty slabs and the
    /// kept large blocks go back (as [`shrink`](Self::shrink) does), the list's
    /// window if no list block is allocated, and the guarded pool if no sampled
    /// object lives. What an allocated block is in (its slab, the window, its own
    /// area, the pool) stays mapped: a heap dropped with blocks still allocated
    /// leaks them, and never unmaps memory under a pointer someone kept.
    fn drop(&mut self) {
        let Some(backing) = self.backing.get() else {
            return;
        };
        let vmalloc = backing.vmalloc;
        self.cpu_slabs.empty_all(&self.slabs, vmalloc);
        self.slabs.shrink(vmalloc);
        let list_used = lock_heap(&self.list, Some(vmalloc)).list.used();
        if list_used == 0 {
            // SAFETY: the window is this heap's reservation, and no block of it is
            // allocated: nothing uses it.
            let _ = unsafe { vmalloc.vfree(backing.window as *mut u8) };
        }
        self.guarded.release(vmalloc);
    }
}

// SAFETY: blocks come from slabs, the list heap or their own vmalloc areas, all
// mapped read-write and handed out once; `dealloc` routes each back by address and
// layout as `allocate` chose.
unsafe impl GlobalAlloc for KernelHeap<'_> {
    #[track_caller]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.allocate(layout)
            .map_or(ptr::null_mut(), NonNull::as_ptr)
    }

    #[track_caller]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: GlobalAlloc's contract: `ptr` came from `alloc` with `layout`.
        unsafe { self.deallocate(ptr, layout) }
    }

    #[track_caller]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: GlobalAlloc's contract: `new_size` is valid for `layout.align()`.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        if self.guarded.owns(ptr) {
            // A sampled object is exactly its size, against a guard page: moved.
            // SAFETY: in the pool; as `GlobalAlloc::realloc`'s caller promised.
            return unsafe { self.realloc_guarded(ptr, layout, new_size) };
        }
        if !self.owns_small(ptr) {
            if let Some(class) = self.slab_class(layout) {
                if self.slab_class(new_layout) == Some(class) {
                    // SAFETY: a slab object of this layout's class (caller).
                    if unsafe { self.slab_freed_last(class, ptr) } {
                        // Freed just now: a resize of it is refused, as a free is.
                        self.refused_frees.fetch_add(1, Ordering::Relaxed);
                        return ptr::null_mut();
                    }
                    // The object already holds `new_size` bytes.
                    return ptr;
                }
            } else if let Some(backing) = self.backing.get() {
                if new_size >= self.config.large_threshold {
                    // SAFETY: as `GlobalAlloc::realloc`'s caller promised.
                    return unsafe { self.realloc_large(ptr, layout, new_size, backing.vmalloc) };
                }
                // Moved to a smaller path below: only a live large block of the
                // heap's (not another owner's area, nor a block kept after its free).
                if backing.vmalloc.area_size(ptr, LARGE_TAG).is_none() {
                    self.refused_frees.fetch_add(1, Ordering::Relaxed);
                    return ptr::null_mut();
                }
            }
        }
        if self.owns_small(ptr) && !self.is_live_list_block(ptr, layout) {
            // A pointer freed before, or inside a block: nothing to copy from.
            self.refused_frees.fetch_add(1, Ordering::Relaxed);
            return ptr::null_mut();
        }
        let Some(moved) = self.allocate(new_layout) else {
            return ptr::null_mut();
        };
        // SAFETY: both blocks are mapped and hold at least the bytes copied (a slab
        // object freed before is still in its slab: its free is refused below).
        unsafe {
            ptr::copy_nonoverlapping(ptr, moved.as_ptr(), layout.size().min(new_size));
            if !self.release(ptr, layout) {
                // Freed before, as the free says: the new block goes back, and the
                // resize is refused with nothing changed.
                self.refused_frees.fetch_add(1, Ordering::Relaxed);
                self.deallocate(moved.as_ptr(), new_layout);
                return ptr::null_mut();
            }
        }
        moved.as_ptr()
    }
}

#[cfg(feature = "allocator-api2")]
// SAFETY: blocks are valid for their layout until deallocated, and `deallocate`
// routes them back to the path that made them, as `GlobalAlloc` does.
unsafe impl allocator_api2::alloc::Allocator for &KernelHeap<'_> {
    #[track_caller]
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

    #[track_caller]
    unsafe fn deallocate(&self, ptr: NonNull<u8>, layout: Layout) {
        if layout.size() != 0 {
            // SAFETY: the Allocator contract: `ptr` came from `allocate` with `layout`.
            unsafe { KernelHeap::deallocate(self, ptr.as_ptr(), layout) }
        }
    }

    #[track_caller]
    unsafe fn grow(
        &self,
        ptr: NonNull<u8>,
        old: Layout,
        new: Layout,
    ) -> Result<NonNull<[u8]>, allocator_api2::alloc::AllocError> {
        // SAFETY: the Allocator contract, forwarded.
        unsafe { self.resize(ptr, old, new) }
    }

    #[track_caller]
    unsafe fn grow_zeroed(
        &self,
        ptr: NonNull<u8>,
        old: Layout,
        new: Layout,
    ) -> Result<NonNull<[u8]>, allocator_api2::alloc::AllocError> {
        // SAFETY: the Allocator contract, forwarded.
        let block = unsafe { self.resize(ptr, old, new) }?;
        // SAFETY: the block holds `new.size()` bytes, at least `old.size()` (the
        // contract): the ones past the old block's are zeroed.
        unsafe {
            (block.cast::<u8>().as_ptr().add(old.size())).write_bytes(0, new.size() - old.size())
        };
        Ok(block)
    }

    #[track_caller]
    unsafe fn shrink(
        &self,
        ptr: NonNull<u8>,
        old: Layout,
        new: Layout,
    ) -> Result<NonNull<[u8]>, allocator_api2::alloc::AllocError> {
        // SAFETY: the Allocator contract, forwarded.
        unsafe { self.resize(ptr, old, new) }
    }
}

#[cfg(feature = "allocator-api2")]
impl KernelHeap<'_> {
    /// `Allocator::grow` and `shrink`: `GlobalAlloc::realloc` (a large block is
    /// remapped by `vrealloc`, not copied) when the alignment stays, else a new block,
    /// as the trait's default does.
    ///
    /// # Safety
    ///
    /// The `Allocator` contract for `grow`/`shrink`: `ptr` is a block of `self`
    /// allocated with `old`.
    #[track_caller]
    unsafe fn resize(
        &self,
        ptr: NonNull<u8>,
        old: Layout,
        new: Layout,
    ) -> Result<NonNull<[u8]>, allocator_api2::alloc::AllocError> {
        use allocator_api2::alloc::{AllocError, Allocator};
        if old.size() == 0 || new.size() == 0 || old.align() != new.align() {
            // Zero-sized blocks are dangling pointers; another alignment moves.
            let block = Allocator::allocate(&self, new)?;
            // SAFETY: both blocks hold the bytes copied; the old one is given up.
            unsafe {
                ptr::copy_nonoverlapping(
                    ptr.as_ptr(),
                    block.cast::<u8>().as_ptr(),
                    old.size().min(new.size()),
                );
                Allocator::deallocate(&self, ptr, old);
            }
            return Ok(block);
        }
        // SAFETY: `ptr` is a live block of `old` (the contract); `new` is a valid
        // layout of the same alignment, so its size is valid for it.
        let moved = unsafe { GlobalAlloc::realloc(self, ptr.as_ptr(), old, new.size()) };
        NonNull::new(moved)
            .map(|block| NonNull::slice_from_raw_parts(block, new.size()))
            .ok_or(AllocError)
    }
}
