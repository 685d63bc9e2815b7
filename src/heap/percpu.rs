//! Per-CPU magazines: the heap's fast path when it knows which CPU runs.
//!
//! A class's lock is shared by every CPU, and two CPUs freeing and allocating the
//! same sizes take turns on it, moving its cache line back and forth. Once the kernel
//! tells the heap its CPUs ([`KernelHeap::use_cpus`](super::KernelHeap::use_cpus)),
//! each CPU keeps its own magazine per class in front of the classes (Bonwick's
//! per-CPU layer; SLUB's per-CPU slabs do the same job): an allocation pops from it,
//! a free pushes to it, under a lock only that CPU takes. An empty magazine takes half
//! a magazine from the class in one locked batch, a full one gives half back, so the
//! shared lock is taken once per 2 to 16 objects at most (a magazine holds as many
//! objects as the class's own: up to 32, about 8 KiB).
//!
//! A CPU's magazines live in a page of their own, made by vmalloc the first time the
//! CPU uses the heap. Another CPU only ever *tries* their lock (to drain them when
//! memory runs out, or for statistics), and so does the CPU itself: an interrupt
//! handler that allocates while the code it interrupted holds them goes to the class
//! instead. So no CPU ever waits for a magazine lock.

use super::slab::{CLASSES, Slabs, magazine_limit};
use crate::smp::MAX_CPUS;
use crate::vmalloc::{VmOptions, VmallocOps};
use core::ptr::{self, NonNull};
use core::sync::atomic::{AtomicPtr, Ordering};

/// The most objects a CPU's magazine holds per class; each class holds as many as
/// its shared magazine ([`magazine_limit`]), about 8 KiB.
const CPU_MAGAZINE: usize = 32;

/// One class's magazine on one CPU.
struct Magazine {
    len: usize,
    objects: [*mut u8; CPU_MAGAZINE],
}

/// One CPU's magazines.
struct CpuMagazines {
    classes: [Magazine; CLASSES],
}

type Locked = spin::Mutex<CpuMagazines>;

/// Every CPU's magazines; see the [module documentation](self).
pub(crate) struct CpuCaches {
    caches: [AtomicPtr<Locked>; MAX_CPUS],
}

// SAFETY: the magazines hold objects of the heap, moved only under their CPU's lock;
// the pages they live in belong to the heap.
unsafe impl Send for CpuMagazines {}

impl CpuCaches {
    /// No CPU has magazines yet.
    pub(crate) const fn new() -> Self {
        Self {
            caches: [const { AtomicPtr::new(ptr::null_mut()) }; MAX_CPUS],
        }
    }

    /// An object of `class` for CPU `cpu`.
    pub(crate) fn alloc(
        &self,
        cpu: usize,
        class: usize,
        slabs: &Slabs,
        vmalloc: &dyn VmallocOps,
    ) -> Option<NonNull<u8>> {
        let Some(mut magazines) = self.cache(cpu, vmalloc).and_then(spin::Mutex::try_lock) else {
            return slabs.alloc(class, vmalloc);
        };
        let magazine = magazines.classes.get_mut(class)?;
        if magazine.len == 0 {
            let half = magazine_limit(class) / 2;
            magazine.len = slabs.alloc_batch(class, &mut magazine.objects[..half], vmalloc);
        }
        if magazine.len == 0 {
            drop(magazines);
            // Out of memory: every CPU's magazines go back before the last try.
            self.drain(slabs, vmalloc);
            return slabs.alloc(class, vmalloc);
        }
        magazine.len -= 1;
        NonNull::new(magazine.objects[magazine.len])
    }

    /// Gives `ptr` back on CPU `cpu`.
    ///
    /// # Safety
    ///
    /// `ptr` is an object of `class` from these caches or `slabs`, with `vmalloc`, and
    /// is not used afterwards.
    pub(crate) unsafe fn free(
        &self,
        cpu: usize,
        class: usize,
        ptr: *mut u8,
        slabs: &Slabs,
        vmalloc: &dyn VmallocOps,
    ) {
        let Some(mut magazines) = self.cache(cpu, vmalloc).and_then(spin::Mutex::try_lock) else {
            // SAFETY: forwarded.
            return unsafe { slabs.free(class, ptr, vmalloc) };
        };
        let Some(magazine) = magazines.classes.get_mut(class) else {
            return;
        };
        if magazine.len >= magazine_limit(class) {
            let half = magazine.len / 2;
            // SAFETY: the magazine holds freed objects of this class.
            unsafe { slabs.free_batch(class, &magazine.objects[..half], vmalloc) };
            magazine.objects.copy_within(half.., 0);
            magazine.len -= half;
        }
        magazine.objects[magazine.len] = ptr;
        magazine.len += 1;
    }

    /// Gives every magazine whose lock is free back to the classes.
    pub(crate) fn drain(&self, slabs: &Slabs, vmalloc: &dyn VmallocOps) {
        for cache in &self.caches {
            // SAFETY: a published cache lives as long as the heap.
            let Some(mut magazines) =
                unsafe { cache.load(Ordering::Acquire).as_ref() }.and_then(spin::Mutex::try_lock)
            else {
                continue;
            };
            for (class, magazine) in magazines.classes.iter_mut().enumerate() {
                // SAFETY: the magazine holds freed objects of this class.
                unsafe { slabs.free_batch(class, &magazine.objects[..magazine.len], vmalloc) };
                magazine.len = 0;
            }
        }
    }

    /// Objects every magazine holds, per class (magazines busy at the moment are not
    /// counted).
    pub(crate) fn cached(&self) -> [usize; CLASSES] {
        let mut cached = [0; CLASSES];
        for cache in &self.caches {
            // SAFETY: a published cache lives as long as the heap.
            let cache = unsafe { cache.load(Ordering::Acquire).as_ref() };
            if let Some(magazines) = cache.and_then(spin::Mutex::try_lock) {
                for (count, magazine) in cached.iter_mut().zip(&magazines.classes) {
                    *count += magazine.len;
                }
            }
        }
        cached
    }

    /// CPU `cpu`'s magazines, made on first use; `None` for an index past
    /// [`MAX_CPUS`] or when no page can be had.
    fn cache(&self, cpu: usize, vmalloc: &dyn VmallocOps) -> Option<&Locked> {
        let slot = self.caches.get(cpu)?;
        // SAFETY: a published cache lives as long as the heap.
        if let Some(cache) = unsafe { slot.load(Ordering::Acquire).as_ref() } {
            return Some(cache);
        }
        let options = VmOptions {
            tag: "kernel heap per-CPU magazines",
            ..VmOptions::default()
        };
        let area = vmalloc
            .vmalloc_with(size_of::<Locked>(), &options)
            .ok()?
            .cast::<Locked>();
        // SAFETY: a fresh area of the right size, page-aligned, ours alone.
        unsafe {
            area.write(spin::Mutex::new(CpuMagazines {
                classes: [const {
                    Magazine {
                        len: 0,
                        objects: [ptr::null_mut(); CPU_MAGAZINE],
                    }
                }; CLASSES],
            }))
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
                let _ = vmalloc.vfree(area.as_ptr().cast());
                // SAFETY: published by the winner; it lives as long as the heap.
                unsafe { installed.as_ref() }
            }
        }
    }
}
