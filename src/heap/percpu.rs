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
//! The fast path has no locked instruction. Only the CPU itself touches its
//! magazines, with interrupts (and task switches) held off through
//! [`Cpus::irq_save`], so nothing else runs on the CPU meanwhile and the caller stays
//! on it. A CPU still marks its magazines busy with a plain store before it touches
//! them and idle after: a handler the hold cannot keep out (an NMI, or a kernel
//! whose hook holds nothing off) that finds them busy goes to the classes instead,
//! as SLUB's `this_cpu_cmpxchg` fast path lets an interrupted allocation retry. The
//! classes' locks, like every lock of the heap, are taken with interrupts held off
//! too (see [`sync`](crate::sync)), so an interrupt handler may allocate.
//!
//! Other CPUs reach the magazines two ways, both rare:
//! - When memory runs out, or [`shrink`](super::KernelHeap::shrink) runs, the caller
//!   empties its own magazines and asks every other online CPU to empty its own at its
//!   next heap call (Linux sends an IPI for this, `flush_all`; a library cannot).
//!   Running `shrink` on every CPU (for example with an `on_each_cpu`) empties them
//!   all at once.
//! - The magazines of an offline CPU, which runs no kernel code, are emptied by the
//!   caller directly. The caller claims them with a compare-and-swap of a value of its
//!   own, then checks that the CPU is offline and that its claim is still there; a
//!   CPU that comes back online checks for a claim after it rejoined. Both sides order
//!   their write before their read (a locked instruction on one side, the online
//!   set's sequentially consistent update on the other), so at least one of them sees
//!   the other (Dekker's argument). An owner already inside a call when the claim
//!   landed writes over it, and it leaves the online set only after that call
//!   returned: a claimer that sees it offline then no longer finds its claim, and
//!   backs off.
//!
//! A CPU's magazines live in pages of their own, made by vmalloc the first time the
//! CPU uses the heap, so no two CPUs' magazines share a cache line.

use super::slab::{CLASSES, Route, Slabs, magazine_limit};
use crate::smp::{Cpus, MAX_CPUS};
use crate::sync::IrqOff;
use crate::vmalloc::{VmOptions, VmallocOps};
use core::cell::UnsafeCell;
use core::ptr::{self, NonNull};
use core::sync::atomic::{
    AtomicBool, AtomicPtr, AtomicU8, AtomicUsize, Ordering, compiler_fence, fence,
};

/// The most objects a CPU's magazine holds per class; each class holds as many as
/// its shared magazine ([`magazine_limit`]), about 8 KiB.
const CPU_MAGAZINE: usize = 32;

/// Nobody is using the magazines.
const IDLE: u8 = 0;
/// Their own CPU is using them.
const OWNER: u8 = 1;
/// Another CPU, `claimer`, is emptying them, their own being offline: each claimer
/// writes its own value, so a claim is recognised as its claimer's alone.
const fn claimed_by(claimer: usize) -> u8 {
    2 + (claimer % MAX_CPUS) as u8
}

/// One class's magazine on one CPU.
struct Magazine {
    /// Objects held; written by whoever holds the magazines, read by anyone for
    /// statistics.
    len: AtomicUsize,
    objects: UnsafeCell<[*mut u8; CPU_MAGAZINE]>,
}

/// One CPU's magazines.
struct CpuMagazines {
    /// [`IDLE`], [`OWNER`] or [`claimed_by`] a CPU.
    state: AtomicU8,
    /// Another CPU ran out of memory or shrank the heap: empty the magazines at the
    /// next call.
    drain_requested: AtomicBool,
    classes: [Magazine; CLASSES],
}

// SAFETY: the objects are moved only by whoever holds `state` (see the module
// documentation); everything else is atomic.
unsafe impl Sync for CpuMagazines {}

/// The right to use one CPU's magazines, given back on drop.
struct Held<'c> {
    cpu: &'c CpuMagazines,
}

impl Held<'_> {
    /// Class `class`'s objects and how many there are.
    fn magazine(&mut self, class: usize) -> Option<(&mut [*mut u8; CPU_MAGAZINE], &AtomicUsize)> {
        let magazine = self.cpu.classes.get(class)?;
        // SAFETY: holding the magazines makes this the only reference to their
        // objects; `&mut self` keeps it unique while it is used.
        Some((unsafe { &mut *magazine.objects.get() }, &magazine.len))
    }

    /// Gives every object back to its class.
    fn empty(&mut self, route: Route, slabs: &Slabs, vmalloc: &dyn VmallocOps) {
        for class in 0..CLASSES {
            if let Some((objects, len)) = self.magazine(class) {
                let held = len.load(Ordering::Relaxed);
                // SAFETY: the magazine holds freed objects of this class.
                unsafe { slabs.free_batch(class, &objects[..held], route, vmalloc) };
                len.store(0, Ordering::Relaxed);
            }
        }
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        // Release: whoever takes the magazines next sees what was done to them.
        self.cpu.state.store(IDLE, Ordering::Release);
    }
}

impl CpuMagazines {
    /// The magazines for their own CPU, unless an interrupted call on this CPU or
    /// another CPU holds them.
    #[inline]
    fn enter(&self) -> Option<Held<'_>> {
        // SeqCst, a plain load on x86: it is the read of Dekker's pair.
        if self.state.load(Ordering::SeqCst) != IDLE {
            return None;
        }
        self.state.store(OWNER, Ordering::Relaxed);
        // An interrupt handler on this CPU must see OWNER before the magazines move.
        compiler_fence(Ordering::SeqCst);
        Some(Held { cpu: self })
    }

    /// The magazines of offline CPU `index`, for CPU `claimer`; `None` if `index`
    /// is online or they are held.
    fn claim_offline(&self, index: usize, claimer: usize, cpus: &dyn Cpus) -> Option<Held<'_>> {
        let claim = claimed_by(claimer);
        self.state
            .compare_exchange(IDLE, claim, Ordering::SeqCst, Ordering::Relaxed)
            .ok()?;
        fence(Ordering::SeqCst);
        #[cfg(test)]
        test::AFTER_CLAIM.with(|hook| hook.get().map(|hook| hook(self)));
        // An owner that read IDLE just before the claim may have written OWNER over
        // it, finished its call and left the online set since: the claim must still
        // be there once the CPU is seen offline.
        if cpus.online().contains(index) || self.state.load(Ordering::SeqCst) != claim {
            // Undo only our own claim, never another claimer's or the owner's.
            let _ = self
                .state
                .compare_exchange(claim, IDLE, Ordering::Release, Ordering::Relaxed);
            return None;
        }
        Some(Held { cpu: self })
    }
}

/// Every CPU's magazines; see the [module documentation](self).
pub(crate) struct CpuCaches {
    caches: [AtomicPtr<CpuMagazines>; MAX_CPUS],
}

impl CpuCaches {
    /// No CPU has magazines yet.
    pub(crate) const fn new() -> Self {
        Self {
            caches: [const { AtomicPtr::new(ptr::null_mut()) }; MAX_CPUS],
        }
    }

    /// The calling CPU's magazines, entered, after emptying them if that was asked.
    #[inline]
    fn enter(&self, cpu: usize, slabs: &Slabs, vmalloc: &dyn VmallocOps) -> Option<Held<'_>> {
        let mut held = self.cache(cpu, vmalloc)?.enter()?;
        if held.cpu.drain_requested.load(Ordering::Relaxed) {
            held.cpu.drain_requested.store(false, Ordering::Relaxed);
            held.empty(Route::cpu(cpu), slabs, vmalloc);
        }
        Some(held)
    }

    /// An object of `class` for the calling CPU.
    pub(crate) fn alloc(
        &self,
        cpus: &dyn Cpus,
        class: usize,
        slabs: &Slabs,
        vmalloc: &dyn VmallocOps,
    ) -> Option<NonNull<u8>> {
        let _irq = IrqOff::with(cpus);
        let cpu = cpus.current();
        let Some(mut held) = self.enter(cpu, slabs, vmalloc) else {
            return slabs.alloc(class, Route::cpu(cpu), vmalloc);
        };
        let (objects, len) = held.magazine(class)?;
        let mut count = len.load(Ordering::Relaxed);
        if count == 0 {
            let half = magazine_limit(class) / 2;
            count = slabs.alloc_batch(class, &mut objects[..half], Route::cpu(cpu), vmalloc);
        }
        if count == 0 {
            drop(held);
            // Out of memory: the magazines go back before the last try.
            self.drain(cpus, slabs, vmalloc);
            return slabs.alloc(class, Route::cpu(cpu), vmalloc);
        }
        count -= 1;
        len.store(count, Ordering::Relaxed);
        NonNull::new(*objects.get(count)?)
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
        let _irq = IrqOff::with(cpus);
        let cpu = cpus.current();
        let Some(mut held) = self.enter(cpu, slabs, vmalloc) else {
            // SAFETY: forwarded.
            return unsafe { slabs.free(class, ptr, Route::cpu(cpu), vmalloc) };
        };
        let Some((objects, len)) = held.magazine(class) else {
            return;
        };
        let mut count = len.load(Ordering::Relaxed);
        if count >= magazine_limit(class) {
            let half = count / 2;
            // SAFETY: the magazine holds freed objects of this class.
            unsafe { slabs.free_batch(class, &objects[..half], Route::cpu(cpu), vmalloc) };
            objects.copy_within(half..count, 0);
            count -= half;
        }
        if let Some(slot) = objects.get_mut(count) {
            *slot = ptr;
            len.store(count + 1, Ordering::Relaxed);
        }
    }

    /// Empties the calling CPU's magazines and those of offline CPUs, and asks every
    /// other CPU to empty its own at its next call.
    pub(crate) fn drain(&self, cpus: &dyn Cpus, slabs: &Slabs, vmalloc: &dyn VmallocOps) {
        let _irq = IrqOff::with(cpus);
        let current = cpus.current();
        for (index, cache) in self.caches.iter().enumerate() {
            // SAFETY: a published cache lives as long as the heap.
            let Some(cache) = (unsafe { cache.load(Ordering::Acquire).as_ref() }) else {
                continue;
            };
            let held = if index == current {
                cache.enter()
            } else {
                cache.claim_offline(index, current, cpus)
            };
            match held {
                Some(mut held) => held.empty(Route::cpu(index), slabs, vmalloc),
                None => cache.drain_requested.store(true, Ordering::Relaxed),
            }
        }
    }

    /// Objects every magazine holds, per class (a moment's count while CPUs run).
    pub(crate) fn cached(&self) -> [usize; CLASSES] {
        let mut cached = [0; CLASSES];
        for cache in &self.caches {
            // SAFETY: a published cache lives as long as the heap.
            if let Some(cache) = unsafe { cache.load(Ordering::Acquire).as_ref() } {
                for (count, magazine) in cached.iter_mut().zip(&cache.classes) {
                    *count += magazine.len.load(Ordering::Relaxed);
                }
            }
        }
        cached
    }

    /// CPU `cpu`'s magazines, made on first use; `None` for an index past
    /// [`MAX_CPUS`] or when no page can be had.
    #[inline]
    fn cache(&self, cpu: usize, vmalloc: &dyn VmallocOps) -> Option<&CpuMagazines> {
        let slot = self.caches.get(cpu)?;
        // SAFETY: a published cache lives as long as the heap.
        if let Some(cache) = unsafe { slot.load(Ordering::Acquire).as_ref() } {
            return Some(cache);
        }
        self.publish(slot, vmalloc)
    }

    #[cold]
    fn publish<'s>(
        &'s self,
        slot: &'s AtomicPtr<CpuMagazines>,
        vmalloc: &dyn VmallocOps,
    ) -> Option<&'s CpuMagazines> {
        let options = VmOptions {
            tag: "kernel heap per-CPU magazines",
            ..VmOptions::default()
        };
        let area = vmalloc
            .vmalloc_with(size_of::<CpuMagazines>(), &options)
            .ok()?
            .cast::<CpuMagazines>();
        // SAFETY: a fresh area of the right size, page-aligned, ours alone.
        unsafe {
            area.write(CpuMagazines {
                state: AtomicU8::new(IDLE),
                drain_requested: AtomicBool::new(false),
                classes: [const {
                    Magazine {
                        len: AtomicUsize::new(0),
                        objects: UnsafeCell::new([ptr::null_mut(); CPU_MAGAZINE]),
                    }
                }; CLASSES],
            })
        };
        match slot.compare_exchange(
            ptr::null_mut(),
            area.as_ptr(),
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            // SAFETY: just published; it lives as long as the heap.
            Ok(_) => Some(unsafe { area.as_ref() }),
            Err(installed) => {
                // An interrupt on this CPU made them first: use those.
                // SAFETY: ours was never published; nothing refers to it.
                let _ = unsafe { vmalloc.vfree(area.as_ptr().cast()) };
                // SAFETY: published by the winner; it lives as long as the heap.
                unsafe { installed.as_ref() }
            }
        }
    }
}

#[cfg(test)]
mod test;
