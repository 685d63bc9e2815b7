//! Notices and drains: a CPU takes back what others freed into its full slabs, and
//! gives every slab it carves or keeps partial back to its class when it is drained.

use super::{Counts, CpuClass, CpuSlabs, Slot};
use crate::heap::slab::list::{FreeObject, give_objects};
use crate::heap::slab::{CLASSES, GEOMETRY, Notice, Slabs, slab_of};
use crate::smp::Cpus;
use crate::vmalloc::VmallocOps;
use core::sync::atomic::Ordering;

impl CpuSlabs {
    /// Takes back the objects the held slot's CPU was told of, each with the rest of
    /// its slab's remote list.
    #[cold]
    pub(super) fn take_notices(slot: &mut Slot<'_>, slabs: &Slabs, vmalloc: &dyn VmallocOps) {
        let cpu = slot.cpu();
        let (counts, state) = slot.split();
        let mut notice = slabs.take_notices(cpu);
        while !notice.is_null() {
            // SAFETY: a notice is a freed object of its class, whose slab stays live
            // while the object counts as in use.
            unsafe {
                let Notice { next, class } = notice.read();
                if let Some(slabs_of_class) = state.classes.get_mut(class) {
                    Self::take_back_notice(
                        slabs_of_class,
                        counts,
                        cpu,
                        class,
                        notice.cast(),
                        slabs,
                        vmalloc,
                    );
                }
                notice = next;
            }
        }
    }

    /// Takes back an object this CPU was told of, and the rest of its slab's remote
    /// list if the CPU still holds the slab.
    ///
    /// # Safety
    ///
    /// `object` is a freed object of `class`; the caller holds CPU `cpu`'s slot.
    unsafe fn take_back_notice(
        slabs_of_class: &mut CpuClass,
        counts: &Counts,
        cpu: usize,
        class: usize,
        object: *mut u8,
        slabs: &Slabs,
        vmalloc: &dyn VmallocOps,
    ) {
        let geometry = &GEOMETRY[class];
        let slab = slab_of(object, geometry);
        // SAFETY: the slab is live while the object counts as in use; a slab this CPU
        // holds is its to touch.
        unsafe {
            if (*slab).remote.holder() != Some(cpu) {
                // Given back to its class (or on to another CPU) since.
                Self::free_slow(class, object, slabs, vmalloc);
                return;
            }
            let taken = (*slab).remote.take(slab as usize);
            if slab == slabs_of_class.current {
                let mut next = taken;
                while !next.is_null() {
                    let this = next;
                    next = (*this).next;
                    slabs_of_class.push(this.cast());
                }
                slabs_of_class.push(object);
                return;
            }
            let link = object.cast::<FreeObject>();
            link.write(FreeObject { next: (*slab).free });
            (*slab).free = link;
            let count = give_objects(slab, taken) + 1;
            (*slab).in_use = (*slab).in_use.wrapping_sub(count);
            Self::settle(slabs_of_class, counts, slab, class, slabs, vmalloc);
        }
    }

    /// Gives every slab a held slot's CPU holds as current, spare or on its partial
    /// list back to its class, after taking back what it was told of and what its
    /// magazines held.
    pub(super) fn empty(slot: &mut Slot<'_>, slabs: &Slabs, vmalloc: &dyn VmallocOps) {
        Self::take_notices(slot, slabs, vmalloc);
        let cpu = slot.cpu();
        let (counts, state) = slot.split();
        Self::flush_magazines(state, counts, cpu, slabs, vmalloc);
        for (class, slabs_of_class) in state.classes.iter_mut().enumerate() {
            if counts.held[class].load(Ordering::Relaxed) == 0 {
                continue;
            }
            let current = slabs_of_class.uncarve(&GEOMETRY[class]);
            let spare = core::mem::replace(&mut slabs_of_class.spare, core::ptr::null_mut());
            let partial = &mut slabs_of_class.partial;
            // SAFETY: slabs on the CPU's partial list are live slabs it holds.
            let rest = core::iter::from_fn(|| unsafe { partial.pop() });
            let back = [current, spare]
                .into_iter()
                .filter(|slab| !slab.is_null())
                .chain(rest);
            // SAFETY: slabs of this class the held CPU held, taken off its lists,
            // their counts up to date.
            unsafe { slabs.take_back(class, back, vmalloc) };
            counts.held[class].store(0, Ordering::Relaxed);
        }
    }

    /// Gives every CPU's slabs back to their classes (see the [module
    /// documentation](super)).
    pub(crate) fn drain(&self, cpus: &dyn Cpus, slabs: &Slabs, vmalloc: &dyn VmallocOps) {
        self.slots.drain_all(
            cpus,
            |counts| {
                counts
                    .held
                    .iter()
                    .any(|held| held.load(Ordering::Relaxed) > 0)
                    || counts.stocked.load(Ordering::Relaxed)
                    || slabs.has_notices(counts.cpu.load(Ordering::Relaxed))
            },
            |work| vmalloc.call_on_other_cpus(work),
            || vmalloc.relax(),
            |slot| Self::empty(slot, slabs, vmalloc),
        );
    }

    /// Gives every CPU's slabs back to their classes with no CPU in the heap: the
    /// teardown's. Emptying one CPU's magazines can free objects into a full slab
    /// another CPU holds, emptied already, which learns of it by a notice: a second
    /// round takes those back (and makes no notice itself: every object it frees
    /// is of a slab its CPU holds, or its class's).
    pub(crate) fn empty_all(&mut self, slabs: &Slabs, vmalloc: &dyn VmallocOps) {
        for _ in 0..2 {
            for mut slot in self.slots.hold_each() {
                Self::empty(&mut slot, slabs, vmalloc);
            }
        }
    }

    /// Per class: objects the CPUs handed out minus those they freed, and slabs they
    /// hold as current, spare or on their partial lists (a moment's count while CPUs
    /// run).
    pub(crate) fn counts(&self) -> [(isize, usize); CLASSES] {
        let mut totals = [(0, 0); CLASSES];
        for (_, counts) in self.slots.each() {
            for (total, (live, held)) in totals.iter_mut().zip(counts.live.iter().zip(&counts.held))
            {
                total.0 += live.load(Ordering::Relaxed);
                total.1 += held.load(Ordering::Relaxed) as usize;
            }
        }
        totals
    }
}
