extern crate std;

use super::*;
use crate::Error;
use crate::smp::CpuSet;
use core::alloc::Layout;
use core::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::Mutex;
use std::vec::Vec;

/// Areas from the host allocator, enough for slabs and magazine pages.
#[derive(Default)]
struct HostAreas {
    areas: Mutex<Vec<(usize, Layout)>>,
}

// SAFETY: every area is fresh host memory of the size and alignment asked, the
// caller's until `vfree`.
unsafe impl VmallocOps for HostAreas {
    fn vmalloc_with(&self, size: usize, options: &VmOptions) -> Result<NonNull<u8>, Error> {
        let align = (options.align as usize).max(4096);
        let layout = Layout::from_size_align(size.next_multiple_of(4096), align)
            .map_err(|_| Error::BadAlignment)?;
        // SAFETY: a non-zero size.
        let area =
            NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) }).ok_or(Error::OutOfFrames)?;
        self.areas
            .lock()
            .unwrap()
            .push((area.as_ptr() as usize, layout));
        Ok(area)
    }
    unsafe fn vfree(&self, ptr: *mut u8) -> Result<(), Error> {
        let mut areas = self.areas.lock().unwrap();
        let index = areas
            .iter()
            .position(|&(start, _)| start == ptr as usize)
            .ok_or(Error::NotAllocated)?;
        let (_, layout) = areas.swap_remove(index);
        // SAFETY: allocated above with this layout.
        unsafe { std::alloc::dealloc(ptr, layout) };
        Ok(())
    }
    unsafe fn vrealloc(&self, _: *mut u8, _: usize) -> Result<NonNull<u8>, Error> {
        Err(Error::WrongKind)
    }
    fn reserve(&self, _: usize, _: &VmOptions) -> Result<NonNull<u8>, Error> {
        Err(Error::WrongKind)
    }
    fn populate(&self, _: *mut u8, _: usize) -> Result<usize, Error> {
        Err(Error::WrongKind)
    }
}

/// CPUs whose "current" one the test sets: a call made while `current` is the CPU
/// that holds its magazines is that CPU's interrupt handler.
struct TestCpus {
    current: AtomicUsize,
    online: AtomicU64,
}

// SAFETY: one test thread plays every CPU, one at a time; nothing is shot down.
unsafe impl Cpus for TestCpus {
    fn current(&self) -> usize {
        self.current.load(Ordering::Relaxed)
    }
    fn online(&self) -> CpuSet {
        CpuSet::from_bits(self.online.load(Ordering::SeqCst))
    }
    fn send_ipi(&self, _: CpuSet) {}
    // No interrupts on the host: the test plays them by holding slots itself.
    fn irq_save(&self) -> crate::smp::IrqState {
        crate::smp::IrqState::new(0)
    }
    fn irq_restore(&self, _: crate::smp::IrqState) {}
}

const CLASS: usize = 4;

fn two_cpus() -> TestCpus {
    TestCpus {
        current: AtomicUsize::new(0),
        online: AtomicU64::new(0b11),
    }
}

fn magazine_len(caches: &CpuCaches, cpu: usize) -> usize {
    caches.cached_on(cpu)[CLASS]
}

impl CpuCaches {
    /// Objects CPU `cpu`'s magazines hold, per class.
    fn cached_on(&self, cpu: usize) -> [usize; CLASSES] {
        let counts = self.slots.get(cpu).unwrap();
        core::array::from_fn(|class| usize::from(counts.0[class].load(Ordering::Relaxed)))
    }
}

/// Host areas, and work on other CPUs run by switching the test's current CPU, as
/// their shootdown service would run it.
struct Reaching<'c> {
    areas: HostAreas,
    cpus: &'c TestCpus,
}

// SAFETY: forwards to `HostAreas`.
unsafe impl VmallocOps for Reaching<'_> {
    fn vmalloc_with(&self, size: usize, options: &VmOptions) -> Result<NonNull<u8>, Error> {
        self.areas.vmalloc_with(size, options)
    }
    unsafe fn vfree(&self, ptr: *mut u8) -> Result<(), Error> {
        // SAFETY: forwarded.
        unsafe { self.areas.vfree(ptr) }
    }
    unsafe fn vrealloc(&self, _: *mut u8, _: usize) -> Result<NonNull<u8>, Error> {
        Err(Error::WrongKind)
    }
    fn reserve(&self, _: usize, _: &VmOptions) -> Result<NonNull<u8>, Error> {
        Err(Error::WrongKind)
    }
    fn populate(&self, _: *mut u8, _: usize) -> Result<usize, Error> {
        Err(Error::WrongKind)
    }
    fn call_on_other_cpus(&self, work: &(dyn Fn() + Sync)) -> bool {
        let me = self.cpus.current.load(Ordering::Relaxed);
        for cpu in self.cpus.online().iter().filter(|&cpu| cpu != me) {
            self.cpus.current.store(cpu, Ordering::Relaxed);
            work();
        }
        self.cpus.current.store(me, Ordering::Relaxed);
        true
    }
}

/// One object of CLASS allocated and freed on CPU `cpu`: it stays in its magazine.
fn churn_on(caches: &CpuCaches, cpus: &TestCpus, cpu: usize, slabs: &Slabs, vm: &dyn VmallocOps) {
    cpus.current.store(cpu, Ordering::Relaxed);
    let object = caches.alloc(cpus, CLASS, slabs, vm).unwrap();
    // SAFETY: an object of CLASS from these caches, not used again.
    unsafe { caches.free(cpus, CLASS, object.as_ptr(), slabs, vm) };
    cpus.current.store(0, Ordering::Relaxed);
    assert!(magazine_len(caches, cpu) > 0);
}

#[test]
fn code_landing_inside_a_cpus_magazines_goes_to_the_classes() {
    let (vmalloc, cpus) = (HostAreas::default(), two_cpus());
    let (caches, slabs) = (CpuCaches::new(), Slabs::new());
    let first = caches.alloc(&cpus, CLASS, &slabs, &vmalloc).unwrap();
    // SAFETY: an object of CLASS from these caches, not used again.
    unsafe { caches.free(&cpus, CLASS, first.as_ptr(), &slabs, &vmalloc) };
    let held = magazine_len(&caches, 0);
    assert!(held > 0);
    // The interrupted code is inside CPU 0's magazines.
    let irq = IrqOff::with(&cpus);
    let inside = caches.slots.this_cpu(&cpus, &irq).unwrap();
    let from_handler = caches.alloc(&cpus, CLASS, &slabs, &vmalloc).unwrap();
    assert_eq!(magazine_len(&caches, 0), held, "took from a busy magazine");
    // SAFETY: as above.
    unsafe { caches.free(&cpus, CLASS, from_handler.as_ptr(), &slabs, &vmalloc) };
    assert_eq!(magazine_len(&caches, 0), held, "pushed to a busy magazine");
    drop(inside);
    let again = caches.alloc(&cpus, CLASS, &slabs, &vmalloc).unwrap();
    assert_eq!(
        again, first,
        "the magazine hands out its last freed object first"
    );
    assert_eq!(magazine_len(&caches, 0), held - 1);
    // SAFETY: as above.
    unsafe { caches.free(&cpus, CLASS, again.as_ptr(), &slabs, &vmalloc) };
    caches.drain(&cpus, &slabs, &vmalloc);
    slabs.shrink(&vmalloc);
    assert!(
        vmalloc.areas.lock().unwrap().len() <= 2,
        "only the magazine pages remain"
    );
}

#[test]
fn a_drain_empties_the_callers_an_offline_cpus_and_through_their_service_online_cpus_magazines() {
    let cpus = TestCpus {
        current: AtomicUsize::new(0),
        online: AtomicU64::new(0b111),
    };
    let vm = Reaching {
        areas: HostAreas::default(),
        cpus: &cpus,
    };
    let (caches, slabs) = (CpuCaches::new(), Slabs::new());
    for cpu in 0..3 {
        churn_on(&caches, &cpus, cpu, &slabs, &vm);
    }
    cpus.online.fetch_and(!0b100, Ordering::SeqCst);
    caches.drain(&cpus, &slabs, &vm);
    assert_eq!(caches.cached(), [0; CLASSES], "every magazine is empty");
    assert_eq!(slabs.stats(Some(&vm))[CLASS].objects, 0);
    slabs.shrink(&vm);
    assert_eq!(
        vm.areas.areas.lock().unwrap().len(),
        3,
        "the three magazine pages"
    );
}

#[test]
fn without_a_way_to_reach_them_online_cpus_empty_their_magazines_at_their_next_call() {
    let (vmalloc, cpus) = (HostAreas::default(), two_cpus());
    let (caches, slabs) = (CpuCaches::new(), Slabs::new());
    churn_on(&caches, &cpus, 1, &slabs, &vmalloc);
    caches.drain(&cpus, &slabs, &vmalloc);
    assert!(magazine_len(&caches, 1) > 0, "CPU 1 could not be reached");
    // Its next call empties them first.
    cpus.current.store(1, Ordering::Relaxed);
    let object = caches.alloc(&cpus, CLASS, &slabs, &vmalloc).unwrap();
    assert!(magazine_len(&caches, 1) > 0, "refilled after the drain");
    // SAFETY: an object of CLASS from these caches, not used again.
    unsafe { caches.free(&cpus, CLASS, object.as_ptr(), &slabs, &vmalloc) };
    cpus.online.fetch_and(!0b10, Ordering::SeqCst);
    cpus.current.store(0, Ordering::Relaxed);
    caches.drain(&cpus, &slabs, &vmalloc);
    assert_eq!(magazine_len(&caches, 1), 0, "offline: claimed and emptied");
}
