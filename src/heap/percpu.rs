//! Per-CPU magazines: the heap's fast path when it knows which CPU runs.
//!
//! A class's lock is shared by every CPU, and two CPUs freeing and allocating the
//! same sizes take turns on it, moving its cache line back and forth. Once the kernel
//! tells the heap its CPUs ([`KernelHeap::use_cpus`](super::KernelHeap::use_cpus)),
//! each CPU keeps its own magazine per class in front of the classes (Bonwick's
//! per-CPU layer; SLUB's per-CPU slabs do the same job): an allocation pops from it,
//! a free pushes to it. An empty magazine takes half a magazine from the class in one
//! locked batch, a full one gives half back, so the shared lock is taken once per 2
//! to 16 objects at most (a magazine holds as many objects as the class's own: up to
//! 32, about 8 KiB).
//!
//! The fast path has no locked instruction: a CPU's magazines are its
//! [`PerCpu`] slot, taken with interrupts held off (see
//! [`percpu`](crate::percpu) for the protocol, written once for every per-CPU
//! structure of the library). Code that lands inside a CPU's magazines (an NMI, or a
//! kernel whose hook holds nothing off) goes to the classes instead, as SLUB's
//! `this_cpu_cmpxchg` fast path lets an interrupted allocation retry. The classes'
//! locks, like every lock of the heap, are taken with interrupts held off too (see
//! [`sync`](crate::sync)), so an interrupt handler may allocate.
//!
//! Other CPUs reach the magazines only when memory runs out or
//! [`shrink`](super::KernelHeap::shrink) runs: the caller drains every CPU's
//! magazines into the classes ([`PerCpu::drain_all`]): its own at once, an offline
//! CPU's by claim, an online CPU's handed over by work it runs in its shootdown
//! service (when the manager's flush policy can reach it), or else at that CPU's next
//! heap call.
//!
//! A CPU's magazines live in pages of their own, made by vmalloc the first time the
//! CPU uses the heap, so no two CPUs' magazines share a cache line.

use super::slab::{CLASSES, Route, Slabs, magazine_limit};
use crate::percpu::{Held, Init, PerCpu};
use crate::smp::Cpus;
use crate::sync::IrqOff;
use crate::vmalloc::{VmOptions, VmallocOps};
use core::ptr::{self, NonNull};
use core::sync::atomic::{AtomicU8, Ordering};

/// The most objects a CPU's magazine holds per class; each class holds as many as
/// its shared magazine ([`magazine_limit`]), about 8 KiB.
const CPU_MAGAZINE: usize = 32;

const _: () = assert!(CPU_MAGAZINE <= u8::MAX as usize, "counts fit a byte");

/// How many objects each class's magazine of one CPU holds: written by the slot's
/// holder, read by anyone for statistics.
pub(crate) struct Counts([AtomicU8; CLASSES]);

impl Init for Counts {
    const INIT: Self = Counts([const { AtomicU8::new(0) }; CLASSES]);
}

/// One CPU's magazines, in a page of its own (made by vmalloc the first time the CPU
/// uses the heap, so no two CPUs' magazines share a cache line).
struct Magazines {
    objects: [[*mut u8; CPU_MAGAZINE]; CLASSES],
}

/// The page holding a CPU's magazines, reached only through its slot's holder.
struct Page(NonNull<Magazines>);

// SAFETY: the page is the slot's, and moves with it between CPUs.
unsafe impl Send for Page {}

type Slot<'a> = Held<'a, Counts, Option<Page>>;

/// Every CPU's magazines; see the [module documentation](self).
pub(crate) struct CpuCaches {
    slots: PerCpu<Counts, Option<Page>>,
}

impl CpuCaches {
    /// No CPU has magazines yet.
    pub(crate) const fn new() -> Self {
        Self {
            slots: PerCpu::new(),
        }
    }

    /// The held slot's magazines, made on first use; `None` when no page can be had.
    fn open<'s>(slot: &'s mut Slot<'_>, vmalloc: &dyn VmallocOps) -> Option<&'s mut Magazines> {
        if slot.is_none() {
            let options = VmOptions {
                tag: "kernel heap per-CPU magazines",
                ..VmOptions::default()
            };
            let page = vmalloc
                .vmalloc_with(size_of::<Magazines>(), &options)
                .ok()?
                .cast::<Magazines>();
            // SAFETY: a fresh area of the right size, page-aligned, this slot's alone.
            unsafe {
                page.write(Magazines {
                    objects: [[ptr::null_mut(); CPU_MAGAZINE]; CLASSES],
                })
            };
            **slot = Some(Page(page));
        }
        // SAFETY: the page lives as long as the heap and only the slot's holder
        // reaches it; `&mut` on the slot keeps this reference unique.
        slot.as_mut().map(|page| unsafe { page.0.as_mut() })
    }

    /// Gives every object in a held slot back to its class.
    fn empty(slot: &mut Slot<'_>, slabs: &Slabs, vmalloc: &dyn VmallocOps) {
        let route = Route::cpu(slot.cpu());
        let Some(page) = slot.as_mut().map(|page| page.0) else {
            return;
        };
        // SAFETY: as in `open`: the slot is held.
        let magazines = unsafe { &mut *page.as_ptr() };
        for (class, count) in slot.shared().0.iter().enumerate() {
            let held = usize::from(count.load(Ordering::Relaxed));
            // SAFETY: the magazine holds freed objects of this class.
            unsafe { slabs.free_batch(class, &magazines.objects[class][..held], route, vmalloc) };
            count.store(0, Ordering::Relaxed);
        }
    }

    /// The calling CPU's slot, after emptying it if that was asked.
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
        }
        Some(slot)
    }

    /// An object of `class` for the calling CPU.
    pub(crate) fn alloc(
        &self,
        cpus: &dyn Cpus,
        class: usize,
        slabs: &Slabs,
        vmalloc: &dyn VmallocOps,
    ) -> Option<NonNull<u8>> {
        let irq = IrqOff::with(cpus);
        let Some(mut slot) = self.enter(cpus, &irq, slabs, vmalloc) else {
            return slabs.alloc(class, Route::cpu(cpus.current()), vmalloc);
        };
        let route = Route::cpu(slot.cpu());
        let count = slot.shared().0.get(class)?;
        let mut len = usize::from(count.load(Ordering::Relaxed));
        let Some(magazines) = Self::open(&mut slot, vmalloc) else {
            return slabs.alloc(class, route, vmalloc);
        };
        let objects = &mut magazines.objects[class];
        if len == 0 {
            let half = magazine_limit(class) / 2;
            len = slabs.alloc_batch(class, &mut objects[..half], route, vmalloc);
        }
        if len == 0 {
            drop(slot);
            // Out of memory: the magazines go back before the last try.
            self.drain(cpus, slabs, vmalloc);
            return slabs.alloc(class, route, vmalloc);
        }
        len -= 1;
        let object = objects[len];
        slot.shared().0[class].store(len as u8, Ordering::Relaxed);
        let cpu = slot.cpu();
        drop(slot);
        // Served by the magazine alone: the clock empty slabs age by still ticks.
        slabs.tick_cpu(cpu, vmalloc);
        NonNull::new(object)
    }

    /// Gives `ptr` back on the calling CPU.
    ///
    /// # Safety
    ///
    /// `ptr` is an object of `class` from these caches or `slabs`, with `vmalloc`, and
    /// is not used afterwards.
    pub(crate) unsafe fn free(
        &self,
        cpus: &dyn Cpus,
        class: usize,
        ptr: *mut u8,
        slabs: &Slabs,
        vmalloc: &dyn VmallocOps,
    ) {
        let irq = IrqOff::with(cpus);
        let Some(mut slot) = self.enter(cpus, &irq, slabs, vmalloc) else {
            // SAFETY: forwarded.
            return unsafe { slabs.free(class, ptr, Route::cpu(cpus.current()), vmalloc) };
        };
        let route = Route::cpu(slot.cpu());
        let Some(count) = slot.shared().0.get(class) else {
            return;
        };
        let mut len = usize::from(count.load(Ordering::Relaxed));
        let Some(magazines) = Self::open(&mut slot, vmalloc) else {
            // SAFETY: forwarded.
            return unsafe { slabs.free(class, ptr, route, vmalloc) };
        };
        let objects = &mut magazines.objects[class];
        if len >= magazine_limit(class) {
            let half = len / 2;
            // SAFETY: the magazine holds freed objects of this class.
            unsafe { slabs.free_batch(class, &objects[..half], route, vmalloc) };
            objects.copy_within(half..len, 0);
            len -= half;
        }
        objects[len] = ptr;
        slot.shared().0[class].store(len as u8 + 1, Ordering::Relaxed);
        let cpu = slot.cpu();
        drop(slot);
        // As in `alloc`.
        slabs.tick_cpu(cpu, vmalloc);
    }

    /// Empties every CPU's magazines into the classes (see the [module
    /// documentation](self)).
    pub(crate) fn drain(&self, cpus: &dyn Cpus, slabs: &Slabs, vmalloc: &dyn VmallocOps) {
        self.slots.drain_all(
            cpus,
            |counts| {
                counts
                    .0
                    .iter()
                    .any(|count| count.load(Ordering::Relaxed) > 0)
            },
            |work| vmalloc.call_on_other_cpus(work),
            |slot| Self::empty(slot, slabs, vmalloc),
        );
    }

    /// Objects every magazine holds, per class (a moment's count while CPUs run).
    pub(crate) fn cached(&self) -> [usize; CLASSES] {
        let mut cached = [0; CLASSES];
        for (_, counts) in self.slots.each() {
            for (total, count) in cached.iter_mut().zip(&counts.0) {
                *total += usize::from(count.load(Ordering::Relaxed));
            }
        }
        cached
    }
}

#[cfg(test)]
mod test;
