extern crate std;

use super::*;
use crate::Error;
use crate::smp::CpuSet;
use core::alloc::Layout;
use core::sync::atomic::AtomicU64;
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
    // No interrupts on the host: the test plays them by switching `current`.
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
    // SAFETY: published caches live as long as `caches`.
    let cache = unsafe { caches.caches[cpu].load(Ordering::Acquire).as_ref() }.unwrap();
    cache.classes[CLASS].len.load(Ordering::Relaxed)
}

#[test]
fn an_interrupt_on_a_cpu_inside_its_magazines_goes_to_the_classes() {
    let (vmalloc, cpus) = (HostAreas::default(), two_cpus());
    let (caches, slabs) = (CpuCaches::new(), Slabs::new());
    let first = caches.alloc(&cpus, CLASS, &slabs, &vmalloc).unwrap();
    // SAFETY: an object of CLASS from these caches, not used again.
    unsafe { caches.free(&cpus, CLASS, first.as_ptr(), &slabs, &vmalloc) };
    let held = magazine_len(&caches, 0);
    assert!(held > 0);
    // The interrupted code is inside CPU 0's magazines.
    let inside = caches.enter(0, &slabs, &vmalloc).unwrap();
    let from_handler = caches.alloc(&cpus, CLASS, &slabs, &vmalloc).unwrap();
    assert_eq!(
        magazine_len(&caches, 0),
        held,
        "the handler took from a busy magazine"
    );
    // SAFETY: as above.
    unsafe { caches.free(&cpus, CLASS, from_handler.as_ptr(), &slabs, &vmalloc) };
    assert_eq!(
        magazine_len(&caches, 0),
        held,
        "the handler pushed to a busy magazine"
    );
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
fn only_an_offline_cpu_s_magazines_are_claimed_and_a_cpu_back_online_waits_for_the_claim() {
    let (vmalloc, cpus) = (HostAreas::default(), two_cpus());
    let (caches, slabs) = (CpuCaches::new(), Slabs::new());
    cpus.current.store(1, Ordering::Relaxed);
    let object = caches.alloc(&cpus, CLASS, &slabs, &vmalloc).unwrap();
    // SAFETY: an object of CLASS from these caches, not used again.
    unsafe { caches.free(&cpus, CLASS, object.as_ptr(), &slabs, &vmalloc) };
    cpus.current.store(0, Ordering::Relaxed);
    // SAFETY: published caches live as long as `caches`.
    let cpu1 = unsafe { caches.caches[1].load(Ordering::Acquire).as_ref() }.unwrap();
    assert!(cpu1.claim_offline(1, 0, &cpus).is_none(), "CPU 1 is online");
    assert_eq!(cpu1.state.load(Ordering::Relaxed), IDLE);
    cpus.online.fetch_and(!0b10, Ordering::SeqCst);
    let claim = cpu1.claim_offline(1, 0, &cpus).unwrap();
    // CPU 1 comes back while CPU 0 still empties its magazines: it stays out.
    cpus.online.fetch_or(0b10, Ordering::SeqCst);
    assert!(cpu1.enter().is_none(), "CPU 1 entered claimed magazines");
    drop(claim);
    assert!(cpu1.enter().is_some());
    // A drain from CPU 0 empties an offline CPU 1 at once, and asks an online one.
    caches.drain(&cpus, &slabs, &vmalloc);
    assert!(cpu1.drain_requested.load(Ordering::Relaxed));
    assert!(magazine_len(&caches, 1) > 0);
    cpus.online.fetch_and(!0b10, Ordering::SeqCst);
    caches.drain(&cpus, &slabs, &vmalloc);
    assert_eq!(magazine_len(&caches, 1), 0);
}

std::thread_local! {
    /// Runs inside `claim_offline` between the claim and its checks, on this thread.
    pub(super) static AFTER_CLAIM: core::cell::Cell<Option<fn(&CpuMagazines)>> =
        const { core::cell::Cell::new(None) };
}

/// The CPUs of the race test: a `static`, because the hook is a plain `fn`.
static RACE: TestCpus = TestCpus {
    current: AtomicUsize::new(0),
    online: AtomicU64::new(0b11),
};

/// CPU 1 read IDLE just before the claim: it writes OWNER over it, finishes its
/// call and leaves the online set, all before the claimer checks.
fn owner_finishes_and_goes_offline(cpu1: &CpuMagazines) {
    cpu1.state.store(OWNER, Ordering::Relaxed);
    cpu1.state.store(IDLE, Ordering::Release);
    RACE.online.fetch_and(!0b10, Ordering::SeqCst);
}

#[test]
fn a_claim_an_owner_wrote_over_is_not_taken_when_the_owner_has_gone_offline() {
    let (vmalloc, cpus) = (HostAreas::default(), &RACE);
    let (caches, slabs) = (CpuCaches::new(), Slabs::new());
    cpus.current.store(1, Ordering::Relaxed);
    let object = caches.alloc(cpus, CLASS, &slabs, &vmalloc).unwrap();
    cpus.current.store(0, Ordering::Relaxed);
    // SAFETY: published caches live as long as `caches`.
    let cpu1 = unsafe { caches.caches[1].load(Ordering::Acquire).as_ref() }.unwrap();
    AFTER_CLAIM.with(|hook| hook.set(Some(owner_finishes_and_goes_offline)));
    let claim = cpu1.claim_offline(1, 0, cpus);
    AFTER_CLAIM.with(|hook| hook.set(None));
    assert!(
        claim.is_none(),
        "claimed magazines whose claim the owner wrote over"
    );
    assert_eq!(cpu1.state.load(Ordering::Relaxed), IDLE);
    // Magazines another CPU has claimed are left to it.
    cpu1.state.store(claimed_by(3), Ordering::SeqCst);
    assert!(cpu1.claim_offline(1, 0, cpus).is_none());
    assert_eq!(cpu1.state.load(Ordering::Relaxed), claimed_by(3));
    cpu1.state.store(IDLE, Ordering::Release);
    // Offline and unclaimed: claimed.
    assert!(cpu1.claim_offline(1, 0, cpus).is_some());
    // SAFETY: an object of CLASS from these caches, not used again.
    unsafe { caches.free(cpus, CLASS, object.as_ptr(), &slabs, &vmalloc) };
}
