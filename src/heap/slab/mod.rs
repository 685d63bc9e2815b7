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
//! - A slab is *held* by its class or by one CPU (`remote.rs` says which, in the one
//!   word of the slab every CPU may touch). Once the kernel names its CPUs, each CPU
//!   allocates from slabs it holds and frees into them without a lock (the fast path
//!   is in `heap/cpu_slab.rs`), and frees into a slab another CPU holds go
//!   on that slab's lock-free remote list. A CPU takes slabs from its class when it
//!   runs out, and gives them back when they empty or when it is drained.
//! - A class keeps the slabs it holds that have both free and used objects on a
//!   doubly linked *partial* list, under its lock: CPUs take these first, and callers
//!   with no CPU slab (before the kernel names its CPUs, or an interrupt that found
//!   its CPU's slot held) allocate from its head. A slab whose objects are all free
//!   moves to the class's *empty* list, reused before a new slab is made.
//!
//! Callers with no CPU slab meet on the class's lock; a *magazine* (Bonwick's word)
//! in front of its slabs holds up to 32 freed objects (about 8 KiB of them) for the
//! next allocations, so a heap whose frees and allocations alternate rarely reaches
//! the slabs at all. When the class's last object in use comes back (to its slab,
//! not the magazine), the magazine goes back whole, so its slabs can empty.
//!
//! Empty slabs wait on their class's empty list. While they fit in [`EMPTY_BUDGET`]
//! they stay; past it, each goes back to vmalloc once the heap has made 16,384
//! slab-object operations since it emptied (the clock of `aging.rs`: objects moved to or
//! from slabs by any path, a CPU's own included). That is checked when a slab
//! empties (its class and one other), and, while the heap's empty slabs exceed the
//! budget, over every class each 1,024 operations on a clock share: a heap whose
//! slabs no longer empty still gives back the slabs it emptied before. So a heap that
//! frees everything and allocates it again, a common pattern, reuses its slabs instead
//! of remapping them, and a heap that shrank for good gives its frames back as it
//! keeps working. [`KernelHeap::shrink`](super::KernelHeap::shrink) gives everything
//! idle back at once, and an allocation that cannot make a slab calls it before it
//! fails.
//!
//! Each class has its own lock, held across the vmalloc call that makes or frees a
//! slab (class, then manager: the manager never allocates from the heap).

use super::large::LargeCache;
use super::lock_heap;
use crate::smp::MAX_CPUS;
use crate::sync::IrqLock;
use crate::vmalloc::{VmOptions, VmallocOps};
use core::ptr::{self, NonNull};
use core::sync::atomic::{AtomicIsize, AtomicPtr, AtomicUsize, Ordering};

mod aging;
mod class;
pub(super) mod list;
pub(super) mod remote;

pub use aging::EMPTY_BUDGET;
use aging::{CLOCK_SHARES, Clock};
pub use class::{CLASS_SIZES, CLASSES, MAX_OBJECT, class_for};
pub(super) use class::{GEOMETRY, Geometry, MIN_ALIGN, class_of_size};
use list::{FreeObject, Listed, SlabHeader, SlabList, give_objects};
use remote::Pushed;

/// Whether `slab`, which its class holds, has no object in use: a free into it is a
/// second free of an object whose first free emptied the slab (and reset its free
/// list), refused as [`RemoteFree::Repeated`] is.
///
/// # Safety
///
/// `slab` is a live slab; if its class holds it, the caller holds the class's lock.
unsafe fn slab_emptied(slab: *mut SlabHeader) -> bool {
    // SAFETY: a live slab (caller); its count is read only if the class holds it,
    // whose lock the caller holds.
    unsafe { (*slab).remote.holder().is_none() && (*slab).in_use == 0 }
}

/// What a free without the class's lock did.
pub(super) enum RemoteFree {
    /// The object went on its slab's remote list or its holder's notices.
    Freed,
    /// The class holds the slab: the object goes back under the class's lock.
    Class,
    /// The object heads the list it would join (the slab's free list, its remote
    /// list, its holder's notices): it is free already, so this is a second free in
    /// a row, the caller's bug, refused with nothing changed. A legitimate free
    /// cannot meet its object there, so the check costs one comparison and refuses
    /// nothing else.
    Repeated,
}

/// One class's slabs and its magazine, on cache lines of its own (with its lock):
/// two CPUs working in neighbouring classes must not bounce one line between them.
#[repr(align(128))]
struct Class {
    /// Slabs the class holds with both free and used objects.
    partial: SlabList,
    /// Slabs the class holds with no object in use, the last emptied at the head.
    empty: SlabList,
    /// Every slab of the class, whoever holds it.
    slabs: usize,
    /// Objects handed out and not freed under this lock (not counting the magazine's).
    objects: usize,
    /// Freed objects not yet given back to their slabs, the last freed on top.
    magazine: [*mut u8; class::MAGAZINE],
    cached: usize,
}

// SAFETY: the slab pointers point into vmalloc areas this class owns; they are only
// followed with the class's lock held.
unsafe impl Send for Class {}

/// Counters of one size class.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SlabClassStats {
    /// The class's object size in bytes.
    pub size: usize,
    /// Objects handed out and not freed.
    pub objects: usize,
    /// Freed objects the class's magazine holds for the next allocations.
    pub cached: usize,
    /// Slabs the class holds (full, partial and empty), those CPUs hold included.
    pub slabs: usize,
    /// Of those, slabs on the class's empty list.
    pub empty_slabs: usize,
    /// Of those, slabs CPUs hold as their current slab, their spare or on their
    /// partial lists.
    pub cpu_slabs: usize,
    /// Bytes of frames the class's slabs hold.
    pub bytes: usize,
}

/// An object given to a CPU's notice list: its first word links the list, the
/// second names its class.
pub(super) struct Notice {
    pub(super) next: *mut Notice,
    pub(super) class: usize,
}

/// One CPU's notice list, on a cache line of its own.
#[repr(align(128))]
struct Notices(AtomicPtr<Notice>);

/// Every class's slabs and magazines; see the [module documentation](self).
pub(crate) struct Slabs {
    classes: [IrqLock<Class>; CLASSES],
    /// Bytes of empty slabs, over all classes.
    empty_bytes: AtomicUsize,
    /// The clock empty slabs age by is the sum of these shares.
    clock: [Clock; CLOCK_SHARES],
    /// Per CPU: objects of slabs it holds, freed by others, that it was not told of
    /// yet (see [`remote`]).
    notices: [Notices; MAX_CPUS],
    /// Per class: objects freed with neither a class lock nor a CPU slot (onto remote
    /// lists), which the class's `objects` do not know of.
    loose: [AtomicIsize; CLASSES],
    /// Freed large blocks kept for reuse (`large.rs`): aged by this clock, given back
    /// with the empty slabs.
    pub(in crate::heap) large: IrqLock<LargeCache>,
}

/// The slab `object` of a class with `geometry` lives in.
#[inline]
pub(super) fn slab_of(object: *mut u8, geometry: &Geometry) -> *mut SlabHeader {
    (object as usize & !(geometry.slab_bytes - 1)) as *mut SlabHeader
}

impl Slabs {
    /// No slabs yet.
    pub(crate) const fn new() -> Self {
        Self {
            classes: [const {
                IrqLock::new(Class {
                    partial: SlabList::new(Listed::Partial),
                    empty: SlabList::new(Listed::Empty),
                    slabs: 0,
                    objects: 0,
                    magazine: [ptr::null_mut(); class::MAGAZINE],
                    cached: 0,
                })
            }; CLASSES],
            empty_bytes: AtomicUsize::new(0),
            clock: [const { Clock::new() }; CLOCK_SHARES],
            notices: [const { Notices(AtomicPtr::new(ptr::null_mut())) }; MAX_CPUS],
            loose: [const { AtomicIsize::new(0) }; CLASSES],
            large: IrqLock::new(LargeCache::new()),
        }
    }

    /// An object of `class` (below [`CLASSES`]) under the class's lock, from its
    /// magazine first if `magazine`; `None` if no slab can be made even after every
    /// class gave its magazine and empty slabs back.
    pub(crate) fn alloc(
        &self,
        class: usize,
        magazine: bool,
        vmalloc: &dyn VmallocOps,
    ) -> Option<NonNull<u8>> {
        let geometry = GEOMETRY.get(class)?;
        for attempt in 0..2 {
            let mut state = self.classes[class].lock(vmalloc);
            let object = if magazine && state.cached > 0 {
                state.cached -= 1;
                Some(state.magazine[state.cached])
            } else {
                self.take(&mut state, geometry, vmalloc)
            };
            if let Some(object) = object {
                state.objects = state.objects.wrapping_add(1);
                let due = self.tick(0, 1);
                drop(state);
                if due {
                    self.age_idle(vmalloc);
                }
                return NonNull::new(object);
            }
            drop(state);
            if attempt == 0 {
                // Out of memory: what every class holds idle goes back first.
                self.shrink(vmalloc);
            }
        }
        None
    }

    /// Gives `ptr` back to its class: into the class's magazine if `magazine` and it
    /// has room, else into its slab (under the class's lock, or lock-free onto the
    /// remote list of a slab a CPU holds).
    ///
    /// # Safety
    ///
    /// `ptr` is an object of `class` on these slabs, handed out and not used
    /// afterwards.
    pub(crate) unsafe fn free(
        &self,
        class: usize,
        ptr: *mut u8,
        magazine: bool,
        vmalloc: &dyn VmallocOps,
    ) -> bool {
        let Some(geometry) = GEOMETRY.get(class) else {
            return false;
        };
        if !magazine {
            // SAFETY: a freed object of this class (caller).
            match unsafe { self.free_remote(class, ptr, geometry) } {
                RemoteFree::Freed => {
                    self.loose[class].fetch_sub(1, Ordering::Relaxed);
                    return true;
                }
                RemoteFree::Repeated => return false,
                RemoteFree::Class => {}
            }
        }
        // SAFETY: forwarded.
        unsafe { self.free_locked(class, ptr, magazine, true, vmalloc) }
    }

    /// Whether `ptr`, an object of `class` the caller says is live, is the object
    /// freed last into the class's magazine or onto its slab's free list, or is in a
    /// slab the class holds with nothing in use (what [`free`](Self::free) refuses
    /// there).
    ///
    /// # Safety
    ///
    /// `ptr`'s slab is live (as a free of `ptr` needs it).
    pub(crate) unsafe fn freed_last(
        &self,
        class: usize,
        ptr: *mut u8,
        vmalloc: &dyn VmallocOps,
    ) -> bool {
        let (Some(state), Some(geometry)) = (self.classes.get(class), GEOMETRY.get(class)) else {
            return false;
        };
        let state = state.lock(vmalloc);
        let top = state.cached.checked_sub(1);
        if top.and_then(|top| state.magazine.get(top)) == Some(&ptr) {
            return true;
        }
        let slab = slab_of(ptr, geometry);
        // SAFETY: a live slab (caller); its list and count are read only if the class
        // holds it, whose lock is held.
        unsafe {
            (*slab).remote.holder().is_none()
                && ((*slab).free == ptr.cast::<FreeObject>() || (*slab).in_use == 0)
        }
    }

    /// Gives `ptr` back to its slab under the class's lock, for a CPU that counted
    /// the free itself; `false` if refused (as [`free`](Self::free)).
    ///
    /// # Safety
    ///
    /// As [`free`](Self::free).
    pub(super) unsafe fn free_to_class(
        &self,
        class: usize,
        ptr: *mut u8,
        vmalloc: &dyn VmallocOps,
    ) -> bool {
        // SAFETY: forwarded.
        unsafe { self.free_locked(class, ptr, false, false, vmalloc) }
    }

    /// As [`free`](Self::free), under the class's lock, counting the free there if
    /// `count`. Refuses (`false`, nothing changed) an object on top of the magazine
    /// or at the head of the list it would join (see [`Repeated`](RemoteFree::Repeated)).
    ///
    /// # Safety
    ///
    /// As [`free`](Self::free).
    unsafe fn free_locked(
        &self,
        class: usize,
        ptr: *mut u8,
        magazine: bool,
        count: bool,
        vmalloc: &dyn VmallocOps,
    ) -> bool {
        let Some(geometry) = GEOMETRY.get(class) else {
            return false;
        };
        let mut state = self.classes[class].lock(vmalloc);
        if magazine && state.cached > 0 && state.magazine[state.cached - 1] == ptr {
            return false;
        }
        // The class's last object in use goes to its slab, not the magazine: the
        // magazine then goes back whole (below), so its slabs can empty.
        let last = count && state.objects == 1;
        let to_magazine = magazine && state.cached < geometry.magazine && !last;
        // SAFETY: the object's slab is live while the object is in use (caller); a
        // slab its class holds changes only under the lock held here.
        if to_magazine && unsafe { slab_emptied(slab_of(ptr, geometry)) } {
            return false;
        }
        let mut emptied = false;
        if to_magazine {
            let cached = state.cached;
            state.magazine[cached] = ptr;
            state.cached += 1;
        } else {
            // SAFETY: a freed object of this class (caller).
            match unsafe { self.give_object(&mut state, ptr, class, geometry) } {
                Some(slab_emptied) => emptied = slab_emptied,
                None => return false,
            }
        }
        let due = count && {
            state.objects = state.objects.wrapping_sub(1);
            self.tick(0, 1)
        };
        if !to_magazine && state.objects == 0 {
            // SAFETY: the magazine's objects are this class's, freed.
            emptied |= unsafe { self.drain_magazine(&mut state, class, geometry) };
        }
        if emptied {
            self.age(state, class, geometry, vmalloc);
        } else {
            drop(state);
        }
        if due {
            self.age_idle(vmalloc);
        }
        true
    }

    /// Frees `object` without a lock if a CPU holds its slab (onto the slab's remote
    /// list, or the CPU's notice list).
    ///
    /// # Safety
    ///
    /// `object` is an object of the class with `geometry`, handed out and given up.
    #[inline]
    pub(super) unsafe fn free_remote(
        &self,
        class: usize,
        object: *mut u8,
        geometry: &Geometry,
    ) -> RemoteFree {
        let slab = slab_of(object, geometry);
        // SAFETY: the object's slab is live while the object is in use.
        let remote = unsafe { &(*slab).remote };
        if remote
            .holder()
            .is_some_and(|cpu| self.first_notice(cpu) == object.cast())
        {
            return RemoteFree::Repeated;
        }
        // SAFETY: `push` is the shared word's protocol; the object is the caller's.
        match unsafe { remote.push(slab as usize, object.cast()) } {
            Pushed::Listed => RemoteFree::Freed,
            Pushed::Notify(cpu) => {
                // SAFETY: the object is ours to write until the CPU takes it (caller).
                unsafe { self.notify(cpu, object, class) };
                RemoteFree::Freed
            }
            Pushed::Class => RemoteFree::Class,
            Pushed::Repeated => RemoteFree::Repeated,
        }
    }

    /// The head of CPU `cpu`'s notice list (a plain load).
    fn first_notice(&self, cpu: usize) -> *mut Notice {
        self.notices
            .get(cpu)
            .map_or(ptr::null_mut(), |Notices(list)| {
                list.load(Ordering::Relaxed)
            })
    }

    /// Puts `object` of `class` on CPU `cpu`'s notice list.
    ///
    /// # Safety
    ///
    /// `object` is a freed object of `class` in a slab CPU `cpu` held, given up.
    unsafe fn notify(&self, cpu: usize, object: *mut u8, class: usize) {
        let Some(Notices(list)) = self.notices.get(cpu) else {
            return;
        };
        let notice = object.cast::<Notice>();
        let mut head = list.load(Ordering::Relaxed);
        loop {
            // SAFETY: the object holds at least 16 bytes, the caller's to write.
            unsafe { notice.write(Notice { next: head, class }) };
            // Release: the CPU that takes the list sees the notice.
            match list.compare_exchange_weak(head, notice, Ordering::Release, Ordering::Relaxed) {
                Ok(_) => return,
                Err(now) => head = now,
            }
        }
    }

    /// Whether CPU `cpu` has notices waiting (a plain load).
    #[inline]
    pub(super) fn has_notices(&self, cpu: usize) -> bool {
        !self.first_notice(cpu).is_null()
    }

    /// CPU `cpu`'s notices, taken off its list.
    pub(super) fn take_notices(&self, cpu: usize) -> *mut Notice {
        self.notices
            .get(cpu)
            .map_or(ptr::null_mut(), |Notices(list)| {
                list.swap(ptr::null_mut(), Ordering::Acquire)
            })
    }

    /// A slab of `class` for CPU `cpu` to hold: one of the class's partial slabs,
    /// else its last emptied, else a new one; `None` if no slab can be made.
    pub(super) fn slab_for_cpu(
        &self,
        class: usize,
        cpu: usize,
        vmalloc: &dyn VmallocOps,
    ) -> Option<*mut SlabHeader> {
        let geometry = GEOMETRY.get(class)?;
        let mut state = self.classes[class].lock(vmalloc);
        // SAFETY: slabs on the class's lists are live slabs it holds; its lock is held.
        let slab =
            unsafe { state.partial.pop() }.or_else(|| self.reuse_empty(&mut state, geometry));
        let slab = match slab {
            Some(slab) => slab,
            None => {
                let slab = self.new_slab(geometry, vmalloc)?;
                state.slabs += 1;
                slab
            }
        };
        // SAFETY: a live slab the class holds, on no list; the lock is held.
        unsafe { (*slab).remote.give_to(cpu) };
        Some(slab)
    }

    /// Takes back slabs a CPU held: each of `slabs` (taken off the CPU's lists) goes
    /// on the class's partial or empty list, or on none if it is full.
    ///
    /// # Safety
    ///
    /// Each slab is a live slab of `class` on no list, held by the CPU whose slot the
    /// caller holds, with `in_use` and `free` up to date.
    pub(super) unsafe fn take_back(
        &self,
        class: usize,
        slabs: impl IntoIterator<Item = *mut SlabHeader>,
        vmalloc: &dyn VmallocOps,
    ) {
        let Some(geometry) = GEOMETRY.get(class) else {
            return;
        };
        let mut state = self.classes[class].lock(vmalloc);
        let mut emptied = false;
        for slab in slabs {
            // SAFETY: the caller's slab; once the word says the class, the lock
            // governs it, and the remote objects are the class's.
            unsafe {
                let remote = (*slab).remote.give_back(slab as usize);
                let count = give_objects(slab, remote);
                (*slab).in_use = (*slab).in_use.wrapping_sub(count);
                emptied |= self.place(&mut state, slab, geometry);
            }
        }
        if emptied {
            self.age(state, class, geometry, vmalloc);
        }
    }

    /// Gives every magazine back to the slabs, and every empty slab and kept large
    /// block back to vmalloc (Linux's `kmem_cache_shrink`).
    pub(crate) fn shrink(&self, vmalloc: &dyn VmallocOps) -> bool {
        let mut discarded = false;
        for (class, geometry) in GEOMETRY.iter().enumerate() {
            let mut state = self.classes[class].lock(vmalloc);
            // SAFETY: the magazine's objects are this class's, freed.
            unsafe { self.drain_magazine(&mut state, class, geometry) };
            while !state.empty.tail.is_null() {
                self.discard_oldest_empty(&mut state, geometry, vmalloc);
                discarded = true;
            }
        }
        self.release_large(u64::MAX, vmalloc) || discarded
    }

    /// Counters of every class; `objects` counts what was allocated and freed under
    /// the classes' locks and onto remote lists, `cpu_slabs` nothing (the caller adds
    /// what its CPUs counted).
    pub(crate) fn stats(&self, vmalloc: Option<&dyn VmallocOps>) -> [SlabClassStats; CLASSES] {
        core::array::from_fn(|class| {
            let state = lock_heap(&self.classes[class], vmalloc);
            let geometry = GEOMETRY[class];
            let loose = self.loose[class].load(Ordering::Relaxed);
            SlabClassStats {
                size: geometry.size,
                objects: state.objects.wrapping_add_signed(loose),
                cached: state.cached,
                slabs: state.slabs,
                // SAFETY: slabs on the list are live slabs of this class; the lock is
                // held.
                empty_slabs: unsafe { state.empty.len() },
                cpu_slabs: 0,
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
    unsafe fn drain_magazine(&self, state: &mut Class, class: usize, geometry: &Geometry) -> bool {
        // Aging waits for the next tick: the caller holds the class lock.
        let _ = self.tick(0, state.cached as u64);
        let mut emptied = false;
        while state.cached > 0 {
            state.cached -= 1;
            let object = state.magazine[state.cached];
            // SAFETY: a freed object of this class (caller). One refused is on its
            // slab's list already (freed twice, and missed then).
            emptied |= unsafe { self.give_object(state, object, class, geometry) } == Some(true);
        }
        emptied
    }

    /// Gives a freed object back to its slab, with the class's lock held: onto the
    /// slab's remote list if a CPU holds it, else onto its free list; whether a slab
    /// emptied, `None` if refused (see [`Repeated`](RemoteFree::Repeated)).
    ///
    /// # Safety
    ///
    /// `object` is a freed object of this class.
    unsafe fn give_object(
        &self,
        state: &mut Class,
        object: *mut u8,
        class: usize,
        geometry: &Geometry,
    ) -> Option<bool> {
        // SAFETY: a freed object (caller); with the lock held, a slab the word says
        // the class holds stays the class's.
        unsafe {
            match self.free_remote(class, object, geometry) {
                RemoteFree::Freed => Some(false),
                RemoteFree::Repeated => None,
                RemoteFree::Class => self.release(state, object, geometry),
            }
        }
    }

    /// The last emptied slab of the class, taken off its empty list.
    fn reuse_empty(&self, state: &mut Class, geometry: &Geometry) -> Option<*mut SlabHeader> {
        // SAFETY: the head of the empty list is a live slab on it; the lock is held.
        let slab = unsafe { state.empty.pop() }?;
        self.empty_bytes
            .fetch_sub(geometry.slab_bytes, Ordering::Relaxed);
        Some(slab)
    }

    /// An object from the head of the partial list, else from the last emptied slab,
    /// else from a new slab.
    fn take(
        &self,
        state: &mut Class,
        geometry: &Geometry,
        vmalloc: &dyn VmallocOps,
    ) -> Option<*mut u8> {
        if state.partial.head.is_null() {
            let slab = match self.reuse_empty(state, geometry) {
                Some(slab) => slab,
                None => {
                    let slab = self.new_slab(geometry, vmalloc)?;
                    state.slabs += 1;
                    slab
                }
            };
            // SAFETY: a live slab the class holds, on no list.
            unsafe { state.partial.push(slab) };
        }
        let slab = state.partial.head;
        // SAFETY: the head of the partial list is a live slab the class holds, with a
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
            header.in_use = header.in_use.wrapping_add(1);
            if header.in_use == geometry.capacity {
                state.partial.unlink(slab);
            }
            Some(object)
        }
    }

    /// Puts `object` back on its slab's free list, the class holding the slab; a full
    /// slab joins the partial list, and a slab left empty moves to the empty list.
    /// Whether the slab emptied; `None` if the object heads the list already (see
    /// [`Repeated`](RemoteFree::Repeated)).
    ///
    /// # Safety
    ///
    /// `object` is a freed object of this class, whose slab the class holds.
    unsafe fn release(
        &self,
        state: &mut Class,
        object: *mut u8,
        geometry: &Geometry,
    ) -> Option<bool> {
        let slab = slab_of(object, geometry);
        let link = object.cast::<FreeObject>();
        // SAFETY: the object's slab is live and the class's (caller), and the object's
        // first word is free to hold the list link.
        unsafe {
            // Heading the list, or into a slab with nothing in use (the first free
            // emptied it, and reset its list): freed already.
            if (*slab).free == link || (*slab).in_use == 0 {
                return None;
            }
            link.write(FreeObject { next: (*slab).free });
            (*slab).free = link;
            (*slab).in_use = (*slab).in_use.wrapping_sub(1);
            Some(match (*slab).listed {
                Listed::Partial if (*slab).in_use > 0 => false,
                Listed::Partial => {
                    state.partial.unlink(slab);
                    self.place(state, slab, geometry)
                }
                _ => self.place(state, slab, geometry),
            })
        }
    }

    /// Puts a slab the class holds, on no list, where it belongs: the empty list
    /// (stamped with the clock) if no object is in use, the partial list if it has a
    /// free one, no list if it is full. Whether it went on the empty list.
    ///
    /// # Safety
    ///
    /// `slab` is a live slab of this class that the class holds, on no list.
    unsafe fn place(&self, state: &mut Class, slab: *mut SlabHeader, geometry: &Geometry) -> bool {
        // SAFETY: the class's slab (caller), its lock held.
        unsafe {
            if (*slab).in_use == 0 {
                // An empty slab's free list says nothing: it hands out its objects in
                // address order again, without reading a link per object.
                (*slab).free = ptr::null_mut();
                (*slab).bump = 0;
                (*slab).emptied = self.now();
                state.empty.push(slab);
                self.empty_bytes
                    .fetch_add(geometry.slab_bytes, Ordering::Relaxed);
                true
            } else {
                if !(*slab).free.is_null() || (*slab).bump < geometry.capacity {
                    state.partial.push(slab);
                }
                false
            }
        }
    }

    /// A new slab the class holds, on no list.
    fn new_slab(&self, geometry: &Geometry, vmalloc: &dyn VmallocOps) -> Option<*mut SlabHeader> {
        let options = VmOptions {
            align: geometry.slab_bytes as u64,
            tag: "kernel heap slab",
            ..VmOptions::default()
        };
        let area = vmalloc.vmalloc_with(geometry.slab_bytes, &options).ok()?;
        let slab = area.as_ptr().cast::<SlabHeader>();
        // SAFETY: the area is ours, mapped read-write, aligned for the header.
        unsafe { slab.write(SlabHeader::new()) };
        Some(slab)
    }
}
