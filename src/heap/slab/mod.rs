//! Size-class slabs in front of the list heap: allocation and free of blocks up to
//! [`MAX_OBJECT`] bytes in constant time, however fragmented the heap is.
//!
//! A first-fit list walks every hole before the one that fits, so once a heap has
//! fragmented into thousands of holes, each allocation costs thousands of steps.
//! Slabs cannot fragment that way: a size class hands out objects of one size, so any
//! free object of the class fits any request of it. The design is Linux's SLUB:
//!
//! - A *slab* is one vmalloc area, aligned to its size, so the slab an object lives in
//!   is its address rounded down: one page for classes up to 128 bytes, 4 pages up to
//!   1 KiB, 8 above, so the header and the tail waste at most an eighth. The slab's
//!   first bytes hold its header; objects follow, each aligned to the largest power of
//!   two dividing the class size, up to a page (a power-of-two class is naturally
//!   aligned, as `kmalloc` promises).
//! - Freed objects form a list threaded through themselves, one per slab; objects
//!   never handed out are counted by a bump index, so a new slab costs no pass over
//!   its memory.
//! - Each class keeps the slabs that have both free and used objects on a doubly
//!   linked *partial* list and allocates from its head. A slab leaves the list when it
//!   fills and joins it again at its first free. A class has eight (`PARTIAL_LISTS`) of
//!   them: a CPU with magazines of its own refills from its own list and frees full
//!   slabs onto it, so its objects come from slabs no other CPU is carving (SLUB's
//!   per-CPU partial slabs), and a list that runs dry takes a slab from another
//!   before a new one is made.
//! - A slab whose objects are all free moves to the class's *empty* list, reused
//!   before a new slab is made.
//!
//! In front of each class's slabs sits a *magazine* (Bonwick's word): a stack of
//! freed objects (up to 32, and about 8 KiB of them) that the next allocations take
//! first. A free then touches neither the object nor its slab, and a heap whose frees
//! and allocations alternate, as a running kernel's do, rarely reaches the slabs at
//! all. Past a full magazine, frees go to the slabs, and past an empty one, allocations
//! come from them, so a burst costs one trip per object. When the class's last object
//! in use comes back, the magazine goes back whole, so its slabs can empty.
//!
//! Empty slabs wait on their class's empty list. While they fit in [`EMPTY_BUDGET`]
//! they stay; past it, each goes back to vmalloc once the heap has made
//! `EMPTY_DECAY` (16,384) slab-object operations since it emptied: objects moved to or
//! from slabs, and allocations and frees a CPU's own magazines serve. That is checked
//! when a slab empties (its class and one other), and, while the heap's empty slabs
//! exceed the budget, over every class each `AGE_EVERY` (1,024) operations on a clock
//! share: a heap whose slabs no longer empty (its traffic stays in partial slabs or
//! magazines) still gives back the slabs it emptied before. So a heap that frees
//! everything and allocates it again, a common pattern, reuses its slabs instead of
//! remapping them, and a heap that shrank for good gives its frames back as it keeps
//! working.
//! [`KernelHeap::shrink`](super::KernelHeap::shrink) gives everything idle back at
//! once, and an allocation that cannot make a slab calls it before it fails.
//!
//! Each class has its own lock, held across the vmalloc call that makes or frees a
//! slab (class, then manager: the manager never allocates from the heap).

use super::lock_heap;
use crate::PAGE_SIZE;
use crate::sync::{IrqGuard, IrqLock};
use crate::vmalloc::{VmOptions, VmallocOps};
use core::ptr::{self, NonNull};
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

mod class;

pub(crate) use class::magazine_limit;
pub use class::{CLASS_SIZES, CLASSES, MAX_OBJECT, class_for};
use class::{GEOMETRY, Geometry, MAGAZINE};

/// Which list a slab is on.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Listed {
    /// Full: on no list (found again through its objects' addresses).
    Nowhere,
    Partial,
    Empty,
}

/// The start of a slab.
#[repr(C)]
struct SlabHeader {
    /// Freed objects, threaded through their first word.
    free: *mut FreeObject,
    /// Neighbours on the list the slab is on (null at its ends).
    next: *mut SlabHeader,
    prev: *mut SlabHeader,
    /// Objects `0..bump` have been handed out at least once.
    bump: u32,
    /// Objects handed out and not freed.
    in_use: u32,
    listed: Listed,
    /// Which of its class's partial lists the slab is on, when it is on one.
    list: u8,
    /// The heap's flush count when the slab became empty.
    emptied: u64,
}

struct FreeObject {
    next: *mut FreeObject,
}

/// A doubly linked list of slabs, threaded through their headers.
struct SlabList {
    head: *mut SlabHeader,
    tail: *mut SlabHeader,
    which: Listed,
}

impl SlabList {
    const fn new(which: Listed) -> Self {
        Self {
            head: ptr::null_mut(),
            tail: ptr::null_mut(),
            which,
        }
    }

    /// Puts `slab` at the head.
    ///
    /// # Safety
    ///
    /// `slab` is a live slab of this list's class, on no list.
    unsafe fn push(&mut self, slab: *mut SlabHeader) {
        // SAFETY: live slabs of this class (caller); the class's lock is held.
        unsafe {
            (*slab).prev = ptr::null_mut();
            (*slab).next = self.head;
            match self.head.as_mut() {
                Some(head) => head.prev = slab,
                None => self.tail = slab,
            }
            (*slab).listed = self.which;
        }
        self.head = slab;
    }

    /// Takes `slab` off the list.
    ///
    /// # Safety
    ///
    /// `slab` is a live slab of this list's class, on this list.
    unsafe fn unlink(&mut self, slab: *mut SlabHeader) {
        // SAFETY: `slab` and its neighbours are live slabs on this list (caller).
        unsafe {
            let SlabHeader { next, prev, .. } = *slab;
            match prev.as_mut() {
                Some(prev) => prev.next = next,
                None => self.head = next,
            }
            match next.as_mut() {
                Some(next) => next.prev = prev,
                None => self.tail = prev,
            }
            (*slab).listed = Listed::Nowhere;
        }
    }
}

/// Bytes of empty slabs the heap keeps, over all classes, before it frees them.
pub const EMPTY_BUDGET: usize = 8 * PAGE_SIZE as usize;

/// Slab-object operations (over the whole heap) while an empty slab past
/// [`EMPTY_BUDGET`] waits before it goes back to vmalloc: more than a heap that frees
/// everything and allocates it again does in between, so it finds its slabs still
/// there.
const EMPTY_DECAY: u64 = 1 << 14;

/// Operations on one clock share between two checks of every class for aged empty
/// slabs, while they exceed [`EMPTY_BUDGET`] (a power of two).
const AGE_EVERY: u64 = 1 << 10;

/// Partial lists per class: a CPU with magazines of its own refills from the list
/// of its index modulo this, so two CPUs rarely carve objects from one slab (objects
/// of two CPUs in one cache line make each CPU's writes evict the other's line).
pub(crate) const PARTIAL_LISTS: usize = 8;

/// Where a batch of objects comes from or goes to.
#[derive(Clone, Copy)]
pub(crate) struct Route {
    /// The partial list that refills take from and that slabs freed into join.
    list: usize,
    /// Whether the class's magazine is used (not when a CPU has its own).
    magazine: bool,
}

impl Route {
    /// Callers without magazines of their own: the class's magazine, list 0.
    pub(crate) const SHARED: Self = Self {
        list: 0,
        magazine: true,
    };

    /// CPU `cpu`, which has magazines of its own.
    pub(crate) const fn cpu(cpu: usize) -> Self {
        Self {
            list: cpu % PARTIAL_LISTS,
            magazine: false,
        }
    }
}

/// One class's slabs and its magazine, on cache lines of its own (with its lock):
/// two CPUs working in neighbouring classes must not bounce one line between them.
#[repr(align(128))]
struct Class {
    /// Slabs with both free and used objects; allocation takes from the head of the
    /// caller's list ([`Route`]).
    partial: [SlabList; PARTIAL_LISTS],
    /// Slabs with no object in use, the last emptied at the head.
    empty: SlabList,
    slabs: usize,
    /// Objects handed out and not freed (not counting the magazine's).
    objects: usize,
    /// Freed objects not yet given back to their slabs, the last freed on top.
    magazine: [*mut u8; MAGAZINE],
    cached: usize,
}

// SAFETY: the slab pointers point into vmalloc areas this class owns; they are only
// followed with the class's lock held.
unsafe impl Send for Class {}

impl Class {
    /// Puts `slab` at the head of partial list `list` (below [`PARTIAL_LISTS`]).
    ///
    /// # Safety
    ///
    /// `slab` is a live slab of this class, on no list.
    unsafe fn push_partial(&mut self, slab: *mut SlabHeader, list: usize) {
        // SAFETY: a live slab of this class on no list (caller).
        unsafe {
            self.partial[list].push(slab);
            (*slab).list = list as u8;
        }
    }
}

/// Counters of one size class.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SlabClassStats {
    /// The class's object size in bytes.
    pub size: usize,
    /// Objects handed out and not freed.
    pub objects: usize,
    /// Freed objects the class's magazine holds for the next allocations.
    pub cached: usize,
    /// Slabs the class holds (full, partial and empty).
    pub slabs: usize,
    /// Of those, slabs with no object in use.
    pub empty_slabs: usize,
    /// Bytes of frames the class's slabs hold.
    pub bytes: usize,
}

/// Every class's slabs and magazines; see the [module documentation](self).
pub(crate) struct Slabs {
    classes: [IrqLock<Class>; CLASSES],
    /// Bytes of empty slabs, over all classes.
    empty_bytes: AtomicUsize,
    /// Slab-object operations so far, per partial list: the clock empty slabs age by
    /// is their sum. Bumped without a locked instruction: a lost tick only slows the
    /// clock.
    slab_ops: [Clock; PARTIAL_LISTS],
}

/// One partial list's share of the clock empty slabs age by, on a cache line of its
/// own: CPUs tick their own share, and only reading the time (when a slab empties)
/// sums them.
#[repr(align(128))]
struct Clock(AtomicU64);

impl Slabs {
    /// No slabs yet.
    pub(crate) const fn new() -> Self {
        Self {
            classes: [const {
                IrqLock::new(Class {
                    partial: [const { SlabList::new(Listed::Partial) }; PARTIAL_LISTS],
                    empty: SlabList::new(Listed::Empty),
                    slabs: 0,
                    objects: 0,
                    magazine: [ptr::null_mut(); MAGAZINE],
                    cached: 0,
                })
            }; CLASSES],
            empty_bytes: AtomicUsize::new(0),
            slab_ops: [const { Clock(AtomicU64::new(0)) }; PARTIAL_LISTS],
        }
    }

    /// An object of `class` (below [`CLASSES`]), or `None` if no slab can be made
    /// even after every class gave its magazine and empty slabs back.
    pub(crate) fn alloc(
        &self,
        class: usize,
        route: Route,
        vmalloc: &dyn VmallocOps,
    ) -> Option<NonNull<u8>> {
        let mut one = [ptr::null_mut()];
        (self.alloc_batch(class, &mut one, route, vmalloc) == 1)
            .then(|| NonNull::new(one[0]))
            .flatten()
    }

    /// Fills `out` with objects of `class` (below [`CLASSES`]) under one lock;
    /// returns how many, fewer (none) only if no slab can be made even after every
    /// class gave its magazine and empty slabs back.
    #[inline]
    pub(crate) fn alloc_batch(
        &self,
        class: usize,
        out: &mut [*mut u8],
        route: Route,
        vmalloc: &dyn VmallocOps,
    ) -> usize {
        let Some(geometry) = GEOMETRY.get(class) else {
            return 0;
        };
        for attempt in 0..2 {
            let mut state = self.classes[class].lock(vmalloc);
            let mut count = 0;
            for slot in out.iter_mut() {
                let Some(object) = self.get(&mut state, geometry, route, vmalloc) else {
                    break;
                };
                *slot = object;
                count += 1;
            }
            let due = self.tick(route.list, count);
            state.objects += count;
            drop(state);
            if due {
                self.age_idle(vmalloc);
            }
            if count > 0 {
                return count;
            }
            if attempt == 0 {
                // Out of memory: what every class holds idle goes back first.
                self.shrink(vmalloc);
            }
        }
        0
    }

    /// Gives `ptr` back to its class.
    ///
    /// # Safety
    ///
    /// `ptr` came from [`alloc`](Self::alloc) or [`alloc_batch`](Self::alloc_batch)
    /// with `class` on these slabs, with `vmalloc`, and is not used afterwards.
    pub(crate) unsafe fn free(
        &self,
        class: usize,
        ptr: *mut u8,
        route: Route,
        vmalloc: &dyn VmallocOps,
    ) {
        // SAFETY: forwarded.
        unsafe { self.free_batch(class, &[ptr], route, vmalloc) }
    }

    /// Gives `objects` back to their class under one lock.
    ///
    /// # Safety
    ///
    /// As [`free`](Self::free), for each object.
    #[inline]
    pub(crate) unsafe fn free_batch(
        &self,
        class: usize,
        objects: &[*mut u8],
        route: Route,
        vmalloc: &dyn VmallocOps,
    ) {
        let Some(geometry) = GEOMETRY.get(class) else {
            return;
        };
        let mut state = self.classes[class].lock(vmalloc);
        state.objects -= objects.len();
        let due = self.tick(route.list, objects.len());
        let mut emptied = false;
        for &object in objects {
            // SAFETY: a freed object of this class (caller).
            emptied |= unsafe { self.put(&mut state, object, geometry, route) };
        }
        if state.objects == 0 {
            // SAFETY: the magazine's objects are this class's, freed.
            emptied |= unsafe { self.drain_magazine(&mut state, geometry) };
        }
        if emptied {
            self.age(state, class, geometry, vmalloc);
        } else {
            drop(state);
        }
        if due {
            self.age_idle(vmalloc);
        }
    }

    /// Counts one allocation or free that CPU `cpu`'s own magazine served: those
    /// reach no slab, but the clock must go on for the slabs they leave idle. The
    /// caller holds no class lock.
    pub(crate) fn tick_cpu(&self, cpu: usize, vmalloc: &dyn VmallocOps) {
        if self.tick(Route::cpu(cpu).list, 1) {
            self.age_idle(vmalloc);
        }
    }

    /// An object from the class's magazine, else from its slabs.
    #[inline(always)]
    fn get(
        &self,
        state: &mut Class,
        geometry: &Geometry,
        route: Route,
        vmalloc: &dyn VmallocOps,
    ) -> Option<*mut u8> {
        if route.magazine && state.cached > 0 {
            state.cached -= 1;
            Some(state.magazine[state.cached])
        } else {
            self.take(state, geometry, route.list, vmalloc)
        }
    }

    /// Puts a freed object in the class's magazine, else on its slab; whether a slab
    /// emptied.
    ///
    /// # Safety
    ///
    /// `object` is a freed object of this class.
    #[inline(always)]
    unsafe fn put(
        &self,
        state: &mut Class,
        object: *mut u8,
        geometry: &Geometry,
        route: Route,
    ) -> bool {
        if route.magazine && state.cached < geometry.magazine {
            state.magazine[state.cached] = object;
            state.cached += 1;
            false
        } else {
            // SAFETY: forwarded.
            unsafe { self.release(state, object, geometry, route.list) }
        }
    }

    /// After a slab of `class` emptied: lets its aged empty slabs go, then, without
    /// its lock, one other class's (classes that went idle age too).
    fn age(
        &self,
        mut state: IrqGuard<'_, Class>,
        class: usize,
        geometry: &Geometry,
        vmalloc: &dyn VmallocOps,
    ) {
        let now = self.now();
        self.discard_aged(&mut state, geometry, now, vmalloc);
        drop(state);
        let other = (class + 1 + now as usize % (CLASSES - 1)) % CLASSES;
        let mut state = self.classes[other].lock(vmalloc);
        self.discard_aged(&mut state, &GEOMETRY[other], now, vmalloc);
    }

    /// While the heap's empty slabs exceed [`EMPTY_BUDGET`], lets every class's aged
    /// ones go, one class lock at a time: slabs that emptied earlier age out even
    /// when none empties again. The caller holds no class lock.
    fn age_idle(&self, vmalloc: &dyn VmallocOps) {
        if self.empty_bytes.load(Ordering::Relaxed) <= EMPTY_BUDGET {
            return;
        }
        let now = self.now();
        for (class, geometry) in GEOMETRY.iter().enumerate() {
            let mut state = self.classes[class].lock(vmalloc);
            self.discard_aged(&mut state, geometry, now, vmalloc);
        }
    }

    /// Gives every magazine back to the slabs and every empty slab back to vmalloc
    /// (Linux's `kmem_cache_shrink`).
    pub(crate) fn shrink(&self, vmalloc: &dyn VmallocOps) {
        for (class, geometry) in GEOMETRY.iter().enumerate() {
            let mut state = self.classes[class].lock(vmalloc);
            // SAFETY: the magazine's objects are this class's, freed.
            unsafe { self.drain_magazine(&mut state, geometry) };
            while !state.empty.tail.is_null() {
                self.discard_oldest_empty(&mut state, geometry, vmalloc);
            }
        }
    }

    /// Counters of every class.
    pub(crate) fn stats(&self, vmalloc: Option<&dyn VmallocOps>) -> [SlabClassStats; CLASSES] {
        core::array::from_fn(|class| {
            let state = lock_heap(&self.classes[class], vmalloc);
            let geometry = GEOMETRY[class];
            let mut empty_slabs = 0;
            let mut slab = state.empty.head;
            while !slab.is_null() {
                empty_slabs += 1;
                // SAFETY: slabs on the list are live slabs of this class.
                slab = unsafe { (*slab).next };
            }
            SlabClassStats {
                size: geometry.size,
                objects: state.objects,
                cached: state.cached,
                slabs: state.slabs,
                empty_slabs,
                bytes: state.slabs * geometry.slab_bytes,
            }
        })
    }

    /// Gives every object of `state`'s magazine back to its slab; whether a slab
    /// emptied.
    ///
    /// # Safety
    ///
    /// The magazine holds freed objects of this class.
    unsafe fn drain_magazine(&self, state: &mut Class, geometry: &Geometry) -> bool {
        // Aging waits for the next tick: the caller holds the class lock.
        let _ = self.tick(0, state.cached);
        let mut emptied = false;
        while state.cached > 0 {
            state.cached -= 1;
            let object = state.magazine[state.cached];
            // SAFETY: a freed object of this class (caller).
            emptied |= unsafe { self.release(state, object, geometry, 0) };
        }
        emptied
    }

    /// Advances list `list`'s share of the clock by `objects` (once per batch); whether
    /// the share passed a multiple of [`AGE_EVERY`], so every class is due for aging
    /// (once the caller dropped its class lock).
    fn tick(&self, list: usize, objects: usize) -> bool {
        let Some(Clock(share)) = self.slab_ops.get(list) else {
            return false;
        };
        let before = share.load(Ordering::Relaxed);
        let after = before + objects as u64;
        share.store(after, Ordering::Relaxed);
        before / AGE_EVERY != after / AGE_EVERY
    }

    /// The clock empty slabs age by: slab-object operations so far.
    fn now(&self) -> u64 {
        self.slab_ops
            .iter()
            .map(|Clock(share)| share.load(Ordering::Relaxed))
            .sum()
    }

    /// Gives back the class's empty slabs that have waited [`EMPTY_DECAY`] ticks by
    /// `now`, oldest first, while the heap's empty slabs exceed [`EMPTY_BUDGET`].
    fn discard_aged(
        &self,
        state: &mut Class,
        geometry: &Geometry,
        now: u64,
        vmalloc: &dyn VmallocOps,
    ) {
        // SAFETY: the tail of the empty list is a live slab of this class.
        while let Some(oldest) = unsafe { state.empty.tail.as_ref() } {
            let over_budget = self.empty_bytes.load(Ordering::Relaxed) > EMPTY_BUDGET;
            if !over_budget || oldest.emptied + EMPTY_DECAY > now {
                break;
            }
            self.discard_oldest_empty(state, geometry, vmalloc);
        }
    }

    /// Gives the class's oldest empty slab back to vmalloc.
    fn discard_oldest_empty(
        &self,
        state: &mut Class,
        geometry: &Geometry,
        vmalloc: &dyn VmallocOps,
    ) {
        let slab = state.empty.tail;
        if slab.is_null() {
            return;
        }
        // SAFETY: the tail of the empty list is a live slab on it.
        unsafe { state.empty.unlink(slab) };
        state.slabs -= 1;
        self.empty_bytes
            .fetch_sub(geometry.slab_bytes, Ordering::Relaxed);
        // SAFETY: the slab is a vmalloc area of its own, off every list, and no
        // object of it is in use.
        let _ = unsafe { vmalloc.vfree(slab.cast()) };
    }

    /// An object from the head of partial list `list`, else from the last emptied
    /// slab, else from another partial list's head slab, else from a new slab.
    fn take(
        &self,
        state: &mut Class,
        geometry: &Geometry,
        list: usize,
        vmalloc: &dyn VmallocOps,
    ) -> Option<*mut u8> {
        if state.partial[list].head.is_null() {
            let slab = if !state.empty.head.is_null() {
                let slab = state.empty.head;
                // SAFETY: the head of the empty list is a live slab on it.
                unsafe { state.empty.unlink(slab) };
                self.empty_bytes
                    .fetch_sub(geometry.slab_bytes, Ordering::Relaxed);
                slab
            } else if let Some(other) = state.partial.iter().position(|other| !other.head.is_null())
            {
                let slab = state.partial[other].head;
                // SAFETY: the head of a partial list is a live slab on it.
                unsafe { state.partial[other].unlink(slab) };
                slab
            } else {
                let slab = self.new_slab(geometry, vmalloc)?;
                state.slabs += 1;
                slab
            };
            // SAFETY: a live slab of this class, on no list.
            unsafe { state.push_partial(slab, list) };
        }
        let slab = state.partial[list].head;
        // SAFETY: the head of the partial list is a live slab of this class with a
        // free object: one on its free list, or one past `bump` below `capacity`.
        unsafe {
            let header = &mut *slab;
            let object = if let Some(freed) = header.free.as_mut() {
                header.free = freed.next;
                ptr::from_mut(freed).cast::<u8>()
            } else {
                let offset = geometry.first + header.bump as usize * geometry.size;
                header.bump += 1;
                slab.cast::<u8>().add(offset)
            };
            header.in_use += 1;
            if header.in_use == geometry.capacity {
                state.partial[list].unlink(slab);
            }
            Some(object)
        }
    }

    /// Puts `object` back on its slab's free list; a full slab joins partial list
    /// `list`, and a slab left empty moves to the empty list, stamped with the clock.
    /// Whether the slab emptied.
    ///
    /// # Safety
    ///
    /// `object` is a freed object of this class.
    unsafe fn release(
        &self,
        state: &mut Class,
        object: *mut u8,
        geometry: &Geometry,
        list: usize,
    ) -> bool {
        let slab = (object as usize & !(geometry.slab_bytes - 1)) as *mut SlabHeader;
        // SAFETY: `object` is an object of this class (caller), so `slab` is its live
        // slab, and the object's first word is free to hold the list link.
        unsafe {
            let link = object.cast::<FreeObject>();
            link.write(FreeObject { next: (*slab).free });
            (*slab).free = link;
            (*slab).in_use -= 1;
            if (*slab).listed == Listed::Partial {
                if (*slab).in_use > 0 {
                    return false;
                }
                state.partial[usize::from((*slab).list)].unlink(slab);
            }
            if (*slab).in_use > 0 {
                state.push_partial(slab, list);
                return false;
            }
            // An empty slab's free list says nothing: it hands out its objects in
            // address order again, without reading a link per object.
            (*slab).free = ptr::null_mut();
            (*slab).bump = 0;
            (*slab).emptied = self.now();
            state.empty.push(slab);
        }
        self.empty_bytes
            .fetch_add(geometry.slab_bytes, Ordering::Relaxed);
        true
    }

    /// A new slab, on no list.
    fn new_slab(&self, geometry: &Geometry, vmalloc: &dyn VmallocOps) -> Option<*mut SlabHeader> {
        let options = VmOptions {
            align: geometry.slab_bytes as u64,
            tag: "kernel heap slab",
            ..VmOptions::default()
        };
        let area = vmalloc.vmalloc_with(geometry.slab_bytes, &options).ok()?;
        let slab = area.as_ptr().cast::<SlabHeader>();
        // SAFETY: the area is ours, mapped read-write, aligned for the header.
        unsafe {
            slab.write(SlabHeader {
                free: ptr::null_mut(),
                next: ptr::null_mut(),
                prev: ptr::null_mut(),
                bump: 0,
                in_use: 0,
                listed: Listed::Nowhere,
                list: 0,
                emptied: 0,
            })
        };
        Some(slab)
    }
}
