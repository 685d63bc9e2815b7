//! Scripted: one test thread plays every CPU, switching `current`; an interrupt
//! that lands inside a CPU's slot is played by holding the slot and calling in.

extern crate std;

use super::*;
use crate::Error;
use crate::heap::slab::SlabClassStats;
use crate::smp::{CpuSet, IrqState};
use crate::vmalloc::VmOptions;
use core::alloc::Layout;
use core::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::Mutex;
use std::vec::Vec;

/// Areas from the host allocator, enough for slabs.
struct HostAreas<'c> {
    areas: Mutex<Vec<(usize, Layout)>>,
    cpus: &'c TestCpus,
    /// Whether work for other CPUs reaches them (run by switching `current`, as
    /// their shootdown service would run it).
    reach: bool,
}

impl<'c> HostAreas<'c> {
    fn new(cpus: &'c TestCpus, reach: bool) -> Self {
        Self {
            areas: Mutex::default(),
            cpus,
            reach,
        }
    }

    fn count(&self) -> usize {
        self.areas.lock().unwrap().len()
    }
}

// SAFETY: every area is fresh host memory of the size and alignment asked, the
// caller's until `vfree`; `cpus` are the test's.
unsafe impl VmallocOps for HostAreas<'_> {
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
    unsafe fn populate(&self, _: *mut u8, _: usize) -> Result<usize, Error> {
        Err(Error::WrongKind)
    }
    /// The class locks hold interrupts off through the test's CPUs, which count it.
    fn cpus(&self) -> Option<&dyn Cpus> {
        Some(self.cpus)
    }
    fn call_on_other_cpus(&self, work: &(dyn Fn() + Sync)) -> bool {
        if !self.reach {
            return false;
        }
        let me = self.cpus.current.load(Ordering::Relaxed);
        for cpu in self.cpus.online().iter().filter(|&cpu| cpu != me) {
            self.cpus.on(cpu, work);
        }
        true
    }
}

/// CPUs whose current one the test sets; `irq_save` counts its calls.
struct TestCpus {
    current: AtomicUsize,
    online: AtomicU64,
    saves: AtomicUsize,
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
    fn irq_save(&self) -> IrqState {
        self.saves.fetch_add(1, Ordering::Relaxed);
        IrqState::new(0)
    }
    fn irq_restore(&self, _: IrqState) {}
}

impl TestCpus {
    fn new(online: u64) -> Self {
        Self {
            current: AtomicUsize::new(0),
            online: AtomicU64::new(online),
            saves: AtomicUsize::new(0),
        }
    }

    fn on<R>(&self, cpu: usize, f: impl FnOnce() -> R) -> R {
        let before = self.current.swap(cpu, Ordering::Relaxed);
        let result = f();
        self.current.store(before, Ordering::Relaxed);
        result
    }
}

/// 64-byte objects: 63 per one-page slab.
const CLASS: usize = 3;
const PER_SLAB: usize = 63;

/// A CPU layer and its slabs over host memory.
struct Heap<'c> {
    cpus: &'c TestCpus,
    vm: HostAreas<'c>,
    slabs: Slabs,
    cpu: CpuSlabs,
}

impl<'c> Heap<'c> {
    fn new(cpus: &'c TestCpus, reach: bool) -> Self {
        Self {
            cpus,
            vm: HostAreas::new(cpus, reach),
            slabs: Slabs::new(),
            cpu: CpuSlabs::new(),
        }
    }

    fn alloc(&self, on: usize) -> *mut u8 {
        self.cpus.on(on, || {
            let object = self.cpu.alloc(self.cpus, CLASS, &self.slabs, &self.vm);
            object.expect("an object").as_ptr()
        })
    }

    fn free(&self, on: usize, object: *mut u8) {
        // SAFETY: objects of CLASS from these slabs, each freed once.
        let freed = self.cpus.on(on, || unsafe {
            self.cpu
                .free(self.cpus, CLASS, object, &self.slabs, &self.vm)
        });
        assert!(freed, "a free of a live object is taken");
    }

    fn stats(&self) -> SlabClassStats {
        let mut class = self.slabs.stats(Some(&self.vm))[CLASS];
        let (live, held) = self.cpu.counts()[CLASS];
        class.objects = class.objects.wrapping_add_signed(live);
        class.cpu_slabs = held;
        class
    }

    /// Drains every CPU and shrinks.
    fn shrink(&self) {
        self.cpu.drain(self.cpus, &self.slabs, &self.vm);
        self.slabs.shrink(&self.vm);
    }
}

fn slab(object: *mut u8) -> *mut SlabHeader {
    slab_of(object, &GEOMETRY[CLASS])
}

#[test]
fn a_burst_of_allocations_then_frees_takes_the_class_lock_once_per_slab() {
    let cpus = TestCpus::new(0b1);
    let heap = Heap::new(&cpus, false);
    // Six slabs: their empty slabs fit the heap's budget, so no aging takes locks.
    let mut objects: Vec<*mut u8> = (0..6 * PER_SLAB).map(|_| heap.alloc(0)).collect();
    cpus.saves.store(0, Ordering::Relaxed);
    for round in 0..3 {
        for &object in &objects {
            heap.free(0, object);
        }
        objects = (0..objects.len()).map(|_| heap.alloc(0)).collect();
        // Each call holds interrupts off once; a class's lock once more.
        let locks = cpus.saves.swap(0, Ordering::Relaxed) - 2 * objects.len();
        assert!(
            locks <= 2 * 7,
            "round {round}: {locks} class locks for 6 slabs"
        );
        assert_eq!(heap.stats().objects, objects.len());
        // The statistics took every class's lock.
        cpus.saves.store(0, Ordering::Relaxed);
    }
    for object in objects {
        heap.free(0, object);
    }
    assert_eq!(heap.stats().objects, 0);
}

#[test]
fn an_object_freed_on_another_cpu_goes_back_to_its_slabs_holder() {
    let cpus = TestCpus::new(0b11);
    let heap = Heap::new(&cpus, false);
    // CPU 0 fills two slabs: the first is full, on none of its lists.
    let objects: Vec<*mut u8> = (0..PER_SLAB + 1).map(|_| heap.alloc(0)).collect();
    let full = slab(objects[0]);
    // SAFETY: live slabs of the test's objects.
    unsafe {
        assert_eq!((*full).remote.holder(), Some(0));
        assert_eq!((*full).listed, Listed::Nowhere);
    }
    // CPU 1 frees objects of both: the first of each goes to CPU 0's notices, the
    // rest on the slabs' remote lists.
    heap.free(1, objects[0]);
    heap.free(1, objects[1]);
    heap.free(1, objects[PER_SLAB]);
    assert!(heap.slabs.has_notices(0));
    assert_eq!(heap.stats().objects, PER_SLAB - 2, "counted freed at once");
    // CPU 0's next call takes them back: the full slab joins its partial list.
    heap.free(0, objects[2]);
    assert!(!heap.slabs.has_notices(0));
    // SAFETY: as above.
    unsafe {
        assert_eq!((*full).listed, Listed::Cpu);
        // The third waits in CPU 0's magazine: in use, as far as its slab knows.
        assert_eq!((*full).in_use as usize, PER_SLAB - 2);
        assert!(
            (*full).remote.take(full as usize).is_null(),
            "taken with its notice"
        );
    }
    // The magazine's object is handed out again first, then the current slab's.
    assert_eq!(heap.alloc(0), objects[2]);
    assert_eq!(heap.alloc(0), objects[PER_SLAB]);
    heap.free(0, objects[2]);
    for &object in &objects[3..PER_SLAB] {
        heap.free(1, object);
    }
    heap.free(0, objects[PER_SLAB]);
    // The first slab is empty: once CPU 0 took its remote objects back, it goes
    // back to its class.
    let _ = heap.alloc(0);
    heap.shrink();
    assert_eq!(heap.stats().slabs, 1, "the slab of the one live object");
    assert_eq!(heap.stats().objects, 1);
}

#[test]
fn code_landing_inside_a_cpus_slot_frees_through_the_shared_word_and_allocates_under_the_lock() {
    let cpus = TestCpus::new(0b1);
    let heap = Heap::new(&cpus, false);
    let first = heap.alloc(0);
    let second = heap.alloc(0);
    // The interrupted code is inside CPU 0's slot.
    let irq = IrqOff::with(&cpus);
    let inside = heap.cpu.slots.this_cpu(&cpus, &irq).unwrap();
    let from_handler = heap.alloc(0);
    assert_ne!(
        slab(from_handler),
        slab(first),
        "not from the CPU's own slab"
    );
    heap.free(0, first);
    assert!(
        heap.slabs.has_notices(0),
        "its own slab: through the shared word"
    );
    heap.free(0, from_handler);
    drop(inside);
    assert_eq!(heap.stats().objects, 1);
    // The next call takes the object back.
    assert_eq!(heap.alloc(0), first);
    heap.free(0, first);
    heap.free(0, second);
    heap.shrink();
    assert_eq!(heap.vm.count(), 0, "every slab went back");
}

/// One object allocated and freed on CPU `cpu`: its slab stays the CPU's current.
fn churn_on(heap: &Heap<'_>, cpu: usize) {
    let object = heap.alloc(cpu);
    heap.free(cpu, object);
    assert!(heap.cpu.counts()[CLASS].1 > 0);
}

fn held_by(heap: &Heap<'_>, cpu: usize) -> u32 {
    heap.cpu.slots.get(cpu).unwrap().held[CLASS].load(Ordering::Relaxed)
}

#[test]
fn a_drain_empties_the_callers_an_offline_cpus_and_through_their_service_online_cpus_slabs() {
    let cpus = TestCpus::new(0b111);
    let heap = Heap::new(&cpus, true);
    for cpu in 0..3 {
        churn_on(&heap, cpu);
    }
    cpus.online.fetch_and(!0b100, Ordering::SeqCst);
    heap.shrink();
    assert_eq!(heap.stats().cpu_slabs, 0, "no CPU holds a slab");
    assert_eq!(heap.stats().slabs, 0);
    assert_eq!(heap.vm.count(), 0, "every slab went back");
}

#[test]
fn without_a_way_to_reach_them_online_cpus_give_their_slabs_back_at_their_next_call() {
    let cpus = TestCpus::new(0b11);
    let heap = Heap::new(&cpus, false);
    churn_on(&heap, 1);
    heap.shrink();
    assert_eq!(held_by(&heap, 1), 1, "CPU 1 could not be reached");
    // Its next call gives them back first, then takes one again.
    let object = heap.alloc(1);
    assert_eq!(held_by(&heap, 1), 1);
    heap.free(1, object);
    cpus.online.fetch_and(!0b10, Ordering::SeqCst);
    heap.shrink();
    assert_eq!(held_by(&heap, 1), 0, "offline: claimed and drained");
    assert_eq!(heap.stats().slabs, 0);
}

#[test]
fn a_drained_cpus_full_slab_still_hears_of_frees_and_the_next_drain_takes_them() {
    let cpus = TestCpus::new(0b11);
    let heap = Heap::new(&cpus, true);
    let objects: Vec<*mut u8> = (0..PER_SLAB).map(|_| heap.alloc(1)).collect();
    // CPU 1's slab is full and stays its own through a drain.
    let _ = heap.alloc(1);
    heap.shrink();
    // SAFETY: a live slab of the test's objects.
    assert_eq!(unsafe { (*slab(objects[0])).remote.holder() }, Some(1));
    cpus.online.fetch_and(!0b10, Ordering::SeqCst);
    for &object in &objects {
        heap.free(0, object);
    }
    assert!(heap.slabs.has_notices(1));
    heap.shrink();
    assert!(!heap.slabs.has_notices(1));
    assert_eq!(heap.stats().slabs, 1, "the slab of the object still live");
}

#[test]
fn a_cpus_magazine_goes_back_to_its_slabs_when_its_last_object_of_the_class_comes_back() {
    let cpus = TestCpus::new(0b1);
    let heap = Heap::new(&cpus, false);
    // The first slab full, the second the CPU's current one.
    let objects: Vec<*mut u8> = (0..PER_SLAB + 1).map(|_| heap.alloc(0)).collect();
    let first = slab(objects[0]);
    for &object in &objects[..MAGAZINE] {
        heap.free(0, object);
    }
    // SAFETY: a live slab of the test's objects, held by CPU 0, which runs nothing.
    unsafe { assert_eq!((*first).in_use as usize, PER_SLAB, "kept in the magazine") };
    for &object in &objects[MAGAZINE..] {
        heap.free(0, object);
    }
    // SAFETY: as above; an emptied slab stays the CPU's spare.
    unsafe {
        assert_eq!((*first).in_use, 0, "the magazine went back whole");
        assert_eq!((*first).remote.holder(), Some(0));
    }
    assert_eq!(heap.stats().objects, 0);
    heap.shrink();
    assert_eq!(heap.stats().slabs, 0, "every slab went back");
}
