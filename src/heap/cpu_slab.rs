//! Per-CPU slabs: the heap's fast path once it knows which CPU runs (Linux SLUB's
//! `kmem_cache_cpu`).
//!
//! Each CPU holds, per size class, a *current* slab it carves objects from and a
//! partial list of other slabs it holds; the [slab](super::slab) header's shared word
//! says which CPU holds a slab, and only that CPU touches the slab's free list and
//! counts. With interrupts held off and its [`PerCpu`] slot held (see
//! [`percpu`](crate::percpu) for the protocol), a CPU:
//!
//! - **allocates** by popping its current slab's free objects (kept in the CPU's own
//!   `freelist`, as SLUB's `c->freelist`), then the objects it never handed out (a
//!   bump pointer);
//! - **frees** an object of its current slab by pushing it on that `freelist`, and an
//!   object of another slab it holds by pushing it on the slab's own free list (a
//!   full slab joins the CPU's partial list, an empty one goes back to its class);
//!
//! with no locked instruction: a burst of thousands of allocations and then thousands
//! of frees meets the class's lock once per slab, not per object. In front of the
//! slabs of the classes up to 512 bytes, a CPU keeps a few freed objects per class
//! (a [`Magazine`]): a free that finds room there, and the next allocation of the
//! class, touch neither the object nor its slab, so frees and allocations spread over
//! many slabs (a fragmented heap's) do not each pay a cold slab header. When the current
//! slab runs dry the CPU takes the objects other CPUs freed into it, else keeps it,
//! full, on no list, and carves the head of its partial list, else a slab its class
//! gives it (the class's lock, once per slab).
//!
//! **Frees from other CPUs** go, lock-free, on the slab's remote list (a
//! compare-and-swap on its shared word; see [`remote`](super::slab::remote)), or, the
//! first since the holder last looked, on the holder's *notice* list, which the holder
//! looks at on every heap call (a plain load): the holder takes those objects back,
//! and the slab's remote list with them, so a full slab on none of its lists is found
//! again. Objects of a slab its class holds go back under the class's lock.
//!
//! **Interrupts.** Code that lands inside a CPU's slot (an NMI, or a kernel whose
//! hook holds nothing off) finds it held and takes the slow path: the class's lock
//! to allocate, the remote list (even of its own CPU's slabs) or the class's lock to
//! free, as SLUB's `this_cpu_cmpxchg` fast path lets an interrupted allocation retry.
//! The interrupted code's plain writes to its slabs never meet those: they touch
//! only the shared word, atomically.
//!
//! **Draining.** [`shrink`](super::KernelHeap::shrink) and an allocation that ran out
//! of memory give every CPU's magazines back to their slabs and its slabs back to their
//! classes ([`PerCpu::drain_all`]):
//! the caller's at once, an offline CPU's by claim, an online CPU's handed over by
//! work it runs in its shootdown service (when the manager's flush policy can reach
//! it), or else at that CPU's next heap call. A drained CPU's full slabs stay its own
//! (they are on none of its lists); frees into them still reach it through its
//! notices, which the next drain also takes.
//!
//! A CPU's state lives in its slot, on cache lines of its own.

use super::slab::list::{FreeObject, Listed, SlabHeader, SlabList, give_objects};
use super::slab::{CLASSES, GEOMETRY, Geometry, RemoteFree, Slabs, slab_of};
use crate::percpu::{Held, Init, PerCpu};
use crate::smp::Cpus;
use crate::sync::IrqOff;
use crate::vmalloc::VmallocOps;
use core::ptr::{self, NonNull};
use core::sync::atomic::{AtomicBool, AtomicIsize, AtomicU32, AtomicUsize, Ordering};

/// Operations a CPU serves before it ticks the clock empty slabs age by.
const TICK_BATCH: u64 = 64;

/// Batches of [`TICK_BATCH`] operations between two looks at a CPU's magazines: one
/// that took no free since the last look goes back to its slabs (a class the CPU
/// stopped using, whose objects other CPUs freed, so that its own count of them in
/// use never dropped to none).
const MAGAZINE_IDLE_BATCHES: u64 = 16;

/// What anyone may read of a CPU's slabs, written by the slot's holder.
pub(crate) struct Counts {
    /// The CPU's index, once it took a slab (for its notices).
    cpu: AtomicUsize,
    /// Objects the CPU handed out minus those it freed, per class (a CPU may free
    /// another's objects, so one CPU's count may be negative).
    live: [AtomicIsize; CLASSES],
    /// Slabs the CPU holds as its current one, its spare or on its partial list, per
    /// class.
    held: [AtomicU32; CLASSES],
    /// Set when an object goes into an empty magazine of the CPU, cleared when a
    /// drain empties them all: a drain visits a CPU whose magazines may hold objects.
    stocked: AtomicBool,
}

impl Init for Counts {
    const INIT: Self = Self {
        cpu: AtomicUsize::new(usize::MAX),
        live: [const { AtomicIsize::new(0) }; CLASSES],
        held: [const { AtomicU32::new(0) }; CLASSES],
        stocked: AtomicBool::new(false),
    };
}

/// Classes with a magazine per CPU: those up to 512 bytes, the most frequent.
pub(crate) const MAGAZINE_CLASSES: usize = 16;

/// Objects a CPU's magazine of one class holds.
const MAGAZINE: usize = 16;

const _: () = assert!(MAGAZINE_CLASSES <= CLASSES);

/// Freed objects of one class a CPU keeps for its next allocations of it (Bonwick's
/// per-CPU magazine, Linux's sheaves), the last freed on top: a free and an
/// allocation that meet here touch neither the object nor its slab. The objects stay
/// in use as far as their slabs know (whoever holds them), and go back to their slabs
/// when the magazine is full, when the CPU's objects of the class in use drop to none,
/// when it took no free over [`MAGAZINE_IDLE_BATCHES`] batches of the CPU's heap
/// calls (a class whose objects other CPUs free: the CPU's own count never drops to
/// none) and when the CPU is drained.
pub(crate) struct Magazine {
    count: usize,
    /// An object went in since the CPU last looked at its idle magazines.
    pushed: bool,
    objects: [*mut u8; MAGAZINE],
}

impl Magazine {
    const EMPTY: Self = Self {
        count: 0,
        pushed: false,
        objects: [ptr::null_mut(); MAGAZINE],
    };

    /// The object put in last, if any, left in.
    #[inline(always)]
    fn top(&self) -> Option<*mut u8> {
        self.objects.get(self.count.checked_sub(1)?).copied()
    }

    /// The last object put in, if any.
    #[inline(always)]
    fn pop(&mut self) -> Option<*mut u8> {
        let count = self.count.checked_sub(1)?;
        self.count = count;
        self.objects.get(count).copied()
    }

    /// Keeps `object`; whether there was room.
    #[inline(always)]
    fn push(&mut self, object: *mut u8) -> bool {
        match self.objects.get_mut(self.count) {
            Some(slot) => {
                *slot = object;
                self.count += 1;
                self.pushed = true;
                true
            }
            None => false,
        }
    }
}

/// Adds `delta` to a counter only the slot's holder writes: no locked instruction.
#[inline(always)]
fn add(counter: &AtomicIsize, delta: isize) {
    counter.store(
        counter.load(Ordering::Relaxed).wrapping_add(delta),
        Ordering::Relaxed,
    );
}

/// As [`add`], for the held-slab counts.
fn add_held(counter: &AtomicU32, delta: i32) {
    counter.store(
        counter.load(Ordering::Relaxed).wrapping_add_signed(delta),
        Ordering::Relaxed,
    );
}

/// A CPU's slabs of one class.
pub(crate) struct CpuClass {
    /// Free objects of `current`, handed out first (SLUB's `c->freelist`).
    freelist: *mut FreeObject,
    /// Objects of `current` never handed out: from `bump` up to `bump_end`.
    bump: *mut u8,
    bump_end: *mut u8,
    /// The slab the CPU carves, or null.
    current: *mut SlabHeader,
    /// The other slabs the CPU holds that have a free object and one in use.
    partial: SlabList,
    /// One slab the CPU holds that emptied, kept for when it runs dry (SLUB keeps
    /// slabs per CPU too), or null; the class gets the others back.
    spare: *mut SlabHeader,
}

impl CpuClass {
    const EMPTY: Self = Self {
        freelist: ptr::null_mut(),
        bump: ptr::null_mut(),
        bump_end: ptr::null_mut(),
        current: ptr::null_mut(),
        partial: SlabList::new(Listed::Cpu),
        spare: ptr::null_mut(),
    };

    /// An object of the current slab, if it has one left.
    #[inline(always)]
    fn pop(&mut self, geometry: &Geometry) -> Option<*mut u8> {
        // SAFETY: the free list holds freed objects of the current slab, which this
        // CPU holds.
        if let Some(object) = unsafe { self.freelist.as_mut() } {
            self.freelist = object.next;
            return Some(ptr::from_mut(object).cast());
        }
        if self.bump < self.bump_end {
            let object = self.bump;
            self.bump = object.wrapping_add(geometry.size);
            return Some(object);
        }
        None
    }

    /// Pushes a freed object of the current slab on the free list.
    ///
    /// # Safety
    ///
    /// `object` is a freed object of the current slab.
    #[inline(always)]
    unsafe fn push(&mut self, object: *mut u8) {
        let link = object.cast::<FreeObject>();
        // SAFETY: the object is free, at least 16 bytes (caller).
        unsafe {
            link.write(FreeObject {
                next: self.freelist,
            })
        };
        self.freelist = link;
    }

    /// Makes `slab`, held by this CPU and on no list, the current slab: its free
    /// objects move to the CPU's free list.
    ///
    /// # Safety
    ///
    /// There is no current slab; `slab` is a live slab of this class this CPU holds.
    unsafe fn carve(&mut self, slab: *mut SlabHeader, geometry: &Geometry) {
        // SAFETY: the CPU's slab (caller).
        unsafe {
            self.freelist = (*slab).free;
            (*slab).free = ptr::null_mut();
            (*slab).listed = Listed::Nowhere;
            let first = slab.cast::<u8>().add(geometry.first);
            self.bump = first.add((*slab).bump as usize * geometry.size);
            self.bump_end = first.add(geometry.capacity as usize * geometry.size);
        }
        self.current = slab;
    }

    /// Stops carving the current slab: its free objects go back on its own list, and
    /// its counts are made up to date. Returns it (or null).
    fn uncarve(&mut self, geometry: &Geometry) -> *mut SlabHeader {
        let slab = core::mem::replace(&mut self.current, ptr::null_mut());
        if slab.is_null() {
            return slab;
        }
        let carved = (self.bump as usize)
            .saturating_sub(slab as usize + geometry.first)
            .div_ceil(geometry.size) as u32;
        let free = core::mem::replace(&mut self.freelist, ptr::null_mut());
        // SAFETY: the CPU's current slab; the free list holds freed objects of it.
        unsafe {
            (*slab).bump = carved.min(geometry.capacity);
            let count = give_objects(slab, free);
            (*slab).in_use = (*slab).bump.wrapping_sub(count);
        }
        self.bump = ptr::null_mut();
        self.bump_end = ptr::null_mut();
        slab
    }
}

/// One CPU's state: only the holder of its slot touches it.
pub(crate) struct CpuState {
    classes: [CpuClass; CLASSES],
    /// Operations served since the clock last ticked.
    ticks: u64,
    /// Batches of operations served since the CPU last looked at its magazines.
    batches: u64,
    /// Freed objects kept per class, for the first [`MAGAZINE_CLASSES`].
    magazines: [Magazine; MAGAZINE_CLASSES],
}

// SAFETY: the slabs the pointers reach are the CPU's, and move with its slot
// between CPUs (only its holder follows them).
unsafe impl Send for CpuState {}

impl Init for CpuState {
    const INIT: Self = Self {
        classes: [const { CpuClass::EMPTY }; CLASSES],
        ticks: 0,
        batches: 0,
        magazines: [const { Magazine::EMPTY }; MAGAZINE_CLASSES],
    };
}

type Slot<'a> = Held<'a, Counts, CpuState>;

/// Every CPU's slabs; see the [module documentation](self).
pub(crate) struct CpuSlabs {
    slots: PerCpu<Counts, CpuState>,
}

impl CpuSlabs {
    /// No CPU holds a slab yet.
    pub(crate) const fn new() -> Self {
        Self {
            slots: PerCpu::new(),
        }
    }

    /// The calling CPU's slot, after draining it if that was asked and taking back
    /// the objects it was told of.
    #[inline]
    fn enter<'a>(
        &'a self,
        cpus: &dyn Cpus,
        irq: &'a IrqOff<'_>,
        slabs: &Slabs,
        vmalloc: &dyn VmallocOps,
    ) -> Option<Slot<'a>> {
        let mut slot = self.slots.this_cpu(cpus, irq)?;
        if slot.take_drain_request() {
            Self::empty(&mut slot, slabs, vmalloc);
        } else if slabs.has_notices(slot.cpu()) {
            Self::take_notices(&mut slot, slabs, vmalloc);
        }
        Some(slot)
    }

    /// An object of `class` for the calling CPU.
    #[inline]
    pub(crate) fn alloc(
        &self,
        cpus: &dyn Cpus,
        class: usize,
        slabs: &Slabs,
        vmalloc: &dyn VmallocOps,
    ) -> Option<NonNull<u8>> {
        let geometry = GEOMETRY.get(class)?;
        let irq = IrqOff::with(cpus);
        let Some(mut slot) = self.enter(cpus, &irq, slabs, vmalloc) else {
            // Inside this CPU's slot, or the slot was handed away: the class's lock.
            return slabs.alloc(class, false, vmalloc);
        };
        let cpu = slot.cpu();
        let (counts, state) = slot.split();
        let slabs_of_class = &mut state.classes[class];
        let kept = state.magazines.get_mut(class).and_then(Magazine::pop);
        let object = match kept.or_else(|| slabs_of_class.pop(geometry)) {
            Some(object) => object,
            None => match Self::refill(slabs_of_class, counts, cpu, class, slabs, vmalloc) {
                Some(object) => object,
                None => {
                    drop(slot);
                    // Out of memory: every CPU's slabs go back before the last try.
                    self.drain(cpus, slabs, vmalloc);
                    return slabs.alloc(class, false, vmalloc);
                }
            },
        };
        add(&counts.live[class], 1);
        Self::tick(state, counts, cpu, slabs, vmalloc);
        NonNull::new(object)
    }

    /// Gives `ptr` back on the calling CPU.
    ///
    /// # Safety
    ///
    /// `ptr` is an object of `class` from these slabs, with `vmalloc`, handed out and
    /// not used afterwards.
    #[inline]
    pub(crate) unsafe fn free(
        &self,
        cpus: &dyn Cpus,
        class: usize,
        ptr: *mut u8,
        slabs: &Slabs,
        vmalloc: &dyn VmallocOps,
    ) -> bool {
        if class >= CLASSES {
            return false;
        }
        let irq = IrqOff::with(cpus);
        let Some(mut slot) = self.enter(cpus, &irq, slabs, vmalloc) else {
            // SAFETY: forwarded.
            return unsafe { slabs.free(class, ptr, false, vmalloc) };
        };
        let cpu = slot.cpu();
        let (counts, state) = slot.split();
        if Self::on_top(state, class, ptr) {
            // On top of the magazine or of the current slab's free list: freed just
            // before and freed again, the caller's bug, caught where it costs two
            // comparisons. Nothing changes.
            return false;
        }
        let live = &counts.live[class];
        let left = live.load(Ordering::Relaxed).wrapping_sub(1);
        live.store(left, Ordering::Relaxed);
        if let Some(magazine) = state.magazines.get_mut(class) {
            if left > 0 {
                if magazine.count == 0 {
                    counts.stocked.store(true, Ordering::Relaxed);
                }
                if magazine.push(ptr) {
                    Self::tick(state, counts, cpu, slabs, vmalloc);
                    return true;
                }
            } else if magazine.count > 0 {
                // The CPU's last object of the class in use came back: the magazine
                // goes back whole, so that its slabs can empty.
                Self::flush_magazine(state, counts, cpu, class, slabs, vmalloc);
            }
        }
        // SAFETY: forwarded.
        if !unsafe { Self::release(state, counts, cpu, class, ptr, slabs, vmalloc) } {
            // Refused, nothing changed: the object heads the list it would join.
            live.store(left.wrapping_add(1), Ordering::Relaxed);
            return false;
        }
        Self::tick(state, counts, cpu, slabs, vmalloc);
        true
    }

    /// Whether `ptr` is the object the CPU freed last of `class`: on top of its
    /// magazine or of its current slab's free list.
    #[inline(always)]
    fn on_top(state: &CpuState, class: usize, ptr: *mut u8) -> bool {
        state
            .magazines
            .get(class)
            .is_some_and(|magazine| magazine.top() == Some(ptr))
            || state
                .classes
                .get(class)
                .is_some_and(|slabs| slabs.freelist.cast::<u8>() == ptr)
    }

    /// Whether `ptr` is the object the calling CPU freed last of `class` (what
    /// [`free`](Self::free) refuses for two comparisons): a resize of it is a resize
    /// of a freed object.
    ///
    /// # Safety
    ///
    /// As [`Slabs::freed_last`].
    pub(crate) unsafe fn freed_last(
        &self,
        cpus: &dyn Cpus,
        class: usize,
        ptr: *mut u8,
        slabs: &Slabs,
        vmalloc: &dyn VmallocOps,
    ) -> bool {
        let irq = IrqOff::with(cpus);
        let Some(mut slot) = self.enter(cpus, &irq, slabs, vmalloc) else {
            // SAFETY: forwarded.
            return unsafe { slabs.freed_last(class, ptr, vmalloc) };
        };
        Self::on_top(slot.split().1, class, ptr)
    }

    /// Gives back every object of the CPU's magazine of `class` to its slab.
    #[cold]
    fn flush_magazine(
        state: &mut CpuState,
        counts: &Counts,
        cpu: usize,
        class: usize,
        slabs: &Slabs,
        vmalloc: &dyn VmallocOps,
    ) {
        while let Some(object) = state.magazines.get_mut(class).and_then(Magazine::pop) {
            // SAFETY: a magazine holds freed objects of its class, counted as freed.
            // One refused is on its slab's list already (freed twice, missed then).
            unsafe { Self::release(state, counts, cpu, class, object, slabs, vmalloc) };
        }
    }

    /// Gives every object of the CPU's magazines back to its slab.
    pub(super) fn flush_magazines(
        state: &mut CpuState,
        counts: &Counts,
        cpu: usize,
        slabs: &Slabs,
        vmalloc: &dyn VmallocOps,
    ) {
        for class in 0..MAGAZINE_CLASSES {
            Self::flush_magazine(state, counts, cpu, class, slabs, vmalloc);
        }
        counts.stocked.store(false, Ordering::Relaxed);
    }

    /// Gives `ptr` back to its slab, with the free already counted: onto the CPU's
    /// free list, the free list of another slab it holds, or as a free from another
    /// CPU. `false` if refused: the object heads the list it would join (see
    /// [`RemoteFree::Repeated`]).
    ///
    /// # Safety
    ///
    /// `ptr` is a freed object of `class` from these slabs, not used afterwards; the
    /// caller holds CPU `cpu`'s slot.
    #[inline(always)]
    unsafe fn release(
        state: &mut CpuState,
        counts: &Counts,
        cpu: usize,
        class: usize,
        ptr: *mut u8,
        slabs: &Slabs,
        vmalloc: &dyn VmallocOps,
    ) -> bool {
        let geometry = &GEOMETRY[class];
        let slabs_of_class = &mut state.classes[class];
        let slab = slab_of(ptr, geometry);
        if slab == slabs_of_class.current {
            if slabs_of_class.freelist.cast() == ptr {
                return false;
            }
            // SAFETY: a freed object of the current slab (caller).
            unsafe { slabs_of_class.push(ptr) };
            true
        // SAFETY: the object's slab is live while the object is in use (caller).
        } else if unsafe { (*slab).remote.holder() } == Some(cpu) {
            // SAFETY: a freed object of a slab this CPU holds, not its current one.
            unsafe { Self::free_held(slabs_of_class, counts, slab, class, ptr, slabs, vmalloc) }
        } else {
            // SAFETY: a freed object of this class (caller), of a slab this CPU does
            // not hold.
            unsafe { Self::free_slow(class, ptr, slabs, vmalloc) }
        }
    }

    /// Frees `ptr` into `slab`, a slab this CPU holds other than its current one:
    /// onto the slab's own free list, no locked instruction; a slab that was full or
    /// empties is settled. `false` if refused (the object heads that list).
    ///
    /// # Safety
    ///
    /// As [`free`](Self::free); the caller holds the slot of the CPU that holds
    /// `slab`, the object's slab, which is not its current one.
    #[inline(always)]
    unsafe fn free_held(
        slabs_of_class: &mut CpuClass,
        counts: &Counts,
        slab: *mut SlabHeader,
        class: usize,
        ptr: *mut u8,
        slabs: &Slabs,
        vmalloc: &dyn VmallocOps,
    ) -> bool {
        let link = ptr.cast::<FreeObject>();
        // SAFETY: a freed object of a slab this CPU holds (caller).
        unsafe {
            // Heading the list, or into a slab with nothing in use (the first free
            // emptied it, and reset its list): freed already.
            if (*slab).free == link || (*slab).in_use == 0 {
                return false;
            }
            link.write(FreeObject { next: (*slab).free });
            (*slab).free = link;
            (*slab).in_use = (*slab).in_use.wrapping_sub(1);
            // On the CPU's partial list with objects still in use: nothing moves.
            if (*slab).listed != Listed::Cpu || (*slab).in_use == 0 {
                Self::settle(slabs_of_class, counts, slab, class, slabs, vmalloc);
            }
        }
        true
    }

    /// Frees `ptr`, of a slab this CPU does not hold: onto its remote list, the
    /// holder's notices or under its class's lock; `false` if refused (the object
    /// heads the list it would join).
    ///
    /// # Safety
    ///
    /// As [`free`](Self::free); the object's slab is not held by the caller's CPU.
    #[inline(never)]
    unsafe fn free_slow(
        class: usize,
        ptr: *mut u8,
        slabs: &Slabs,
        vmalloc: &dyn VmallocOps,
    ) -> bool {
        let geometry = &GEOMETRY[class];
        // SAFETY: a freed object (caller).
        match unsafe { slabs.free_remote(class, ptr, geometry) } {
            RemoteFree::Freed => true,
            RemoteFree::Repeated => false,
            // SAFETY: its class holds the slab.
            RemoteFree::Class => unsafe { slabs.free_to_class(class, ptr, vmalloc) },
        }
    }

    /// After objects were freed into `slab`, a slab this CPU holds other than its
    /// current one: a full slab joins the CPU's partial list, an empty one becomes its
    /// spare if it has none, else goes back to its class.
    ///
    /// # Safety
    ///
    /// `slab` is a live slab of `class` the caller's CPU holds, not its current one,
    /// with `in_use` up to date.
    #[inline(never)]
    unsafe fn settle(
        slabs_of_class: &mut CpuClass,
        counts: &Counts,
        slab: *mut SlabHeader,
        class: usize,
        slabs: &Slabs,
        vmalloc: &dyn VmallocOps,
    ) {
        // SAFETY: the CPU's slab (caller).
        unsafe {
            if (*slab).listed == Listed::Nowhere {
                slabs_of_class.partial.push(slab);
                add_held(&counts.held[class], 1);
            }
            if (*slab).in_use == 0 {
                slabs_of_class.partial.unlink(slab);
                if slabs_of_class.spare.is_null() {
                    // Carved in address order again, without reading a link per
                    // object.
                    (*slab).free = ptr::null_mut();
                    (*slab).bump = 0;
                    slabs_of_class.spare = slab;
                } else {
                    add_held(&counts.held[class], -1);
                    slabs.take_back(class, [slab], vmalloc);
                }
            }
        }
    }

    /// Refills the CPU's free list of `class` once the current slab ran dry: from
    /// the objects other CPUs freed into it, else from the head of its partial list,
    /// else from its spare, else from a slab its class gives it; an object of it, or
    /// `None` if no slab can be made.
    #[inline(never)]
    fn refill(
        slabs_of_class: &mut CpuClass,
        counts: &Counts,
        cpu: usize,
        class: usize,
        slabs: &Slabs,
        vmalloc: &dyn VmallocOps,
    ) -> Option<*mut u8> {
        let geometry = &GEOMETRY[class];
        loop {
            let current = slabs_of_class.current;
            if !current.is_null() {
                // SAFETY: the CPU's current slab.
                let taken = unsafe { (*current).remote.take(current as usize) };
                if !taken.is_null() {
                    slabs_of_class.freelist = taken;
                    return slabs_of_class.pop(geometry);
                }
                // Full: kept, on no list, until an object comes back.
                slabs_of_class.uncarve(geometry);
                add_held(&counts.held[class], -1);
            }
            // SAFETY: slabs on the CPU's partial list are live slabs it holds.
            let partial = unsafe { slabs_of_class.partial.pop() };
            let spare = || {
                Some(core::mem::replace(
                    &mut slabs_of_class.spare,
                    ptr::null_mut(),
                ))
            };
            let slab = match partial.or_else(spare).filter(|slab| !slab.is_null()) {
                Some(slab) => slab,
                None => {
                    let slab = slabs.slab_for_cpu(class, cpu, vmalloc)?;
                    add_held(&counts.held[class], 1);
                    // Where others' frees into it find this CPU's notices.
                    counts.cpu.store(cpu, Ordering::Relaxed);
                    slab
                }
            };
            // SAFETY: a slab of this class the CPU holds, on no list; none is current.
            unsafe { slabs_of_class.carve(slab, geometry) };
            // A slab on a partial list or from the class has a free object.
            if let Some(object) = slabs_of_class.pop(geometry) {
                return Some(object);
            }
        }
    }

    /// Counts one operation; every [`TICK_BATCH`] of them tick the aging clock.
    #[inline(always)]
    fn tick(
        state: &mut CpuState,
        counts: &Counts,
        cpu: usize,
        slabs: &Slabs,
        vmalloc: &dyn VmallocOps,
    ) {
        state.ticks += 1;
        if state.ticks >= TICK_BATCH {
            slabs.tick_cpu(cpu, core::mem::take(&mut state.ticks), vmalloc);
            state.batches += 1;
            if state.batches >= MAGAZINE_IDLE_BATCHES {
                state.batches = 0;
                Self::flush_idle_magazines(state, counts, cpu, slabs, vmalloc);
            }
        }
    }

    /// Gives back the magazines that took no free since the last look.
    #[cold]
    #[inline(never)]
    fn flush_idle_magazines(
        state: &mut CpuState,
        counts: &Counts,
        cpu: usize,
        slabs: &Slabs,
        vmalloc: &dyn VmallocOps,
    ) {
        for class in 0..MAGAZINE_CLASSES {
            let Some(magazine) = state.magazines.get_mut(class) else {
                continue;
            };
            let idle = magazine.count > 0 && !magazine.pushed;
            magazine.pushed = false;
            if idle {
                Self::flush_magazine(state, counts, cpu, class, slabs, vmalloc);
            }
        }
    }
}

mod drain;
#[cfg(test)]
mod test;
