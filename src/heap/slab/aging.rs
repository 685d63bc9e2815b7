//! How empty slabs age out: the clock they age by (slab-object operations), and the
//! checks that give the aged ones back to vmalloc while the heap's empty slabs exceed
//! [`EMPTY_BUDGET`].

use super::class::{GEOMETRY, Geometry};
use super::{CLASSES, Class, Slabs};
use crate::PAGE_SIZE;
use crate::sync::IrqGuard;
use crate::vmalloc::VmallocOps;
use core::sync::atomic::{AtomicU64, Ordering};

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

/// Shares of the clock: CPUs tick share `cpu % CLOCK_SHARES`, calls under a class's
/// lock share 0.
pub(super) const CLOCK_SHARES: usize = 8;

/// One share of the clock empty slabs age by, on a cache line of its own: CPUs tick
/// their own share without a locked instruction (a lost tick only slows the clock),
/// and only reading the time (when a slab empties) sums them.
#[repr(align(128))]
pub(super) struct Clock(AtomicU64);

impl Clock {
    pub(super) const fn new() -> Self {
        Self(AtomicU64::new(0))
    }
}

impl Slabs {
    /// Counts `operations` that CPU `cpu` served from slabs it holds: those reach no
    /// class, but the clock must go on for the slabs they leave idle. The caller
    /// holds no class lock.
    pub(in crate::heap) fn tick_cpu(&self, cpu: usize, operations: u64, vmalloc: &dyn VmallocOps) {
        if self.tick(cpu % CLOCK_SHARES, operations) {
            self.age_idle(vmalloc);
        }
    }

    /// Advances share `share`'s clock by `objects` (once per batch); whether the share
    /// passed a multiple of [`AGE_EVERY`], so every class is due for aging (once the
    /// caller dropped its class lock).
    pub(super) fn tick(&self, share: usize, objects: u64) -> bool {
        let Some(Clock(share)) = self.clock.get(share) else {
            return false;
        };
        let before = share.load(Ordering::Relaxed);
        let after = before + objects;
        share.store(after, Ordering::Relaxed);
        before / AGE_EVERY != after / AGE_EVERY
    }

    /// The clock empty slabs age by: slab-object operations so far.
    pub(in crate::heap) fn now(&self) -> u64 {
        self.clock
            .iter()
            .map(|Clock(share)| share.load(Ordering::Relaxed))
            .sum()
    }

    /// After a slab of `class` emptied: lets its aged empty slabs go, then, without
    /// its lock, one other class's (classes that went idle age too).
    pub(super) fn age(
        &self,
        mut state: IrqGuard<'_, Class>,
        class: usize,
        geometry: &Geometry,
        vmalloc: &dyn VmallocOps,
    ) {
        if !self.over_budget() {
            return;
        }
        let now = self.now();
        self.discard_aged(&mut state, geometry, now, vmalloc);
        drop(state);
        let other = (class + 1 + now as usize % (CLASSES - 1)) % CLASSES;
        let mut state = self.classes[other].lock(vmalloc);
        self.discard_aged(&mut state, &GEOMETRY[other], now, vmalloc);
    }

    fn over_budget(&self) -> bool {
        self.empty_bytes.load(Ordering::Relaxed) > EMPTY_BUDGET
    }

    /// While the heap's empty slabs exceed [`EMPTY_BUDGET`], lets every class's aged
    /// ones go, one class lock at a time: slabs that emptied earlier age out even
    /// when none empties again. The caller holds no class lock.
    pub(super) fn age_idle(&self, vmalloc: &dyn VmallocOps) {
        self.release_large(self.now(), vmalloc);
        if !self.over_budget() {
            return;
        }
        let now = self.now();
        for (class, geometry) in GEOMETRY.iter().enumerate() {
            let mut state = self.classes[class].lock(vmalloc);
            self.discard_aged(&mut state, geometry, now, vmalloc);
        }
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
            if !self.over_budget() || oldest.emptied + EMPTY_DECAY > now {
                break;
            }
            self.discard_oldest_empty(state, geometry, vmalloc);
        }
    }

    /// Gives the class's oldest empty slab back to vmalloc.
    pub(super) fn discard_oldest_empty(
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
}
