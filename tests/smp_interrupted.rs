//! Interrupts and shootdowns arriving while a CPU holds a lock: `vfree_atomic` from
//! an interrupt under the manager's lock, and a CPU waiting for the heap's lock that
//! serves the shootdown its holder started.

mod common;

use common::interrupting::Interrupting;
use common::smp::*;
use std::alloc::{GlobalAlloc, Layout};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use vmalloc::heap::{HeapConfig, KernelHeap};
use vmalloc::smp::Shootdown;
use vmalloc::vmalloc::deferred::SLOTS;
use vmalloc::vmalloc::{VmOptions, VmallocOps};
use vmalloc::{Error, TlbFlush, Vmalloc, VmallocConfig};
use vmalloc_sim::scenarios::manager_with as manager;
use vmalloc_sim::{DEADLOCK_LIMIT, SimConfig, SimFrames, SimMachine, scenarios, watchdog};

#[test]
fn vfree_atomic_from_an_interrupt_under_the_lock_is_done_by_the_next_call() {
    let (machine, frames, _) = smp_machine(1, false);
    let source = Interrupting::leak(frames);
    // SAFETY: the machine's root table serves this manager alone.
    let vm = unsafe {
        Vmalloc::new(
            VmallocConfig::default(),
            machine.root(),
            machine.phys(),
            source,
            machine,
        )
    }
    .unwrap();
    let vm: &'static _ = Box::leak(Box::new(vm));
    let victims: Vec<_> = (0..SLOTS + 2).map(|_| vm.vmalloc(4096).unwrap()).collect();
    let outcomes: &'static std::sync::Mutex<Vec<Result<(), Error>>> = Box::leak(Box::default());
    let queue: &'static std::sync::Mutex<Vec<usize>> = Box::leak(Box::default());
    source.on_interrupt(move || {
        for &ptr in queue.lock().unwrap().iter() {
            // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
            outcomes
                .lock()
                .unwrap()
                .push(unsafe { vm.vfree_atomic(ptr as *mut u8) });
        }
    });
    let areas = vm.stats().areas;

    // One good pointer and one interior pointer, freed while the lock is held.
    *queue.lock().unwrap() = vec![
        victims[0].as_ptr() as usize,
        victims[1].as_ptr() as usize + 8,
    ];
    source.arm();
    // More than 16 pages: made under the manager's lock, not from a CPU's cache.
    let trigger = vm.vmalloc(20 * 4096).unwrap();
    assert_eq!(
        *outcomes.lock().unwrap(),
        [Ok(()), Ok(())],
        "queued without waiting"
    );
    // SAFETY: bytes the test owns: no live Rust value lives there.
    unsafe { machine.write(addr(victims[0]), b"mapped until the next call") }.unwrap();
    let stats = vm.stats();
    assert_eq!(
        stats.areas, areas,
        "the next call freed one area and made one"
    );
    assert_eq!(
        stats.deferred_refused, 1,
        "the interior pointer was refused"
    );
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    assert_eq!(
        unsafe { vm.vfree(victims[0].as_ptr()) },
        Err(Error::NotAllocated)
    );

    // A full queue: the free past its slots is refused at once, without waiting
    // for the lock or draining the queue itself.
    outcomes.lock().unwrap().clear();
    *queue.lock().unwrap() = victims[1..].iter().map(|p| p.as_ptr() as usize).collect();
    source.arm();
    let trigger2 = vm.vmalloc(20 * 4096).unwrap();
    let outcomes = outcomes.lock().unwrap().clone();
    assert!(outcomes[..SLOTS].iter().all(Result::is_ok));
    assert_eq!(outcomes[SLOTS], Err(Error::WouldBlock));
    // Since `areas` was counted: two triggers made, victims[0] and SLOTS more freed.
    assert_eq!(
        vm.stats().areas,
        areas + 2 - 1 - SLOTS as u64,
        "the queued areas are freed by the next call"
    );
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    unsafe { vm.vfree(victims[SLOTS + 1].as_ptr()) }.unwrap();
    for ptr in [trigger, trigger2] {
        // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
        unsafe { vm.vfree(ptr.as_ptr()) }.unwrap();
    }
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    assert_eq!(
        unsafe { vm.vfree_atomic(std::ptr::null_mut()) },
        Err(Error::NullPointer)
    );
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    assert_eq!(
        unsafe { vm.vfree_atomic(0x1000 as *mut u8) },
        Err(Error::NotInRegion)
    );
}

/// The manager as the kernel heap sees it, except that the calls that map memory
/// (which the heap makes with a lock held: a slab class's for `vmalloc_with`, the list
/// heap's for `populate`) first shoot down every CPU, as a purge under memory pressure
/// would from inside the call.
struct ShootsWhilePopulating<'a> {
    vm: &'a dyn VmallocOps,
    tlb: &'static Tlb,
    inside: &'a AtomicBool,
}

// SAFETY: every call forwards to a manager; the shootdown changes no mapping.
unsafe impl VmallocOps for ShootsWhilePopulating<'_> {
    fn vmalloc_with(&self, size: usize, options: &VmOptions) -> Result<NonNull<u8>, Error> {
        self.inside.store(true, Ordering::Release);
        self.tlb.flush_all();
        self.vm.vmalloc_with(size, options)
    }
    unsafe fn vfree(&self, ptr: *mut u8) -> Result<(), Error> {
        // SAFETY: forwarded from the caller.
        unsafe { self.vm.vfree(ptr) }
    }
    unsafe fn vrealloc(&self, ptr: *mut u8, new_size: usize) -> Result<NonNull<u8>, Error> {
        // SAFETY: forwarded from the caller.
        unsafe { self.vm.vrealloc(ptr, new_size) }
    }
    fn reserve(&self, size: usize, options: &VmOptions) -> Result<NonNull<u8>, Error> {
        self.vm.reserve(size, options)
    }
    unsafe fn populate(&self, ptr: *mut u8, bytes: usize) -> Result<usize, Error> {
        self.inside.store(true, Ordering::Release);
        self.tlb.flush_all();
        // SAFETY: forwarded from the caller.
        unsafe { self.vm.populate(ptr, bytes) }
    }
    fn relax(&self) {
        self.vm.relax();
    }
}

#[test]
fn a_cpu_waiting_for_the_heap_lock_serves_the_shootdown_its_holder_started() {
    watchdog(
        "a_cpu_waiting_for_the_heap_lock_serves_the_shootdown_its_holder_started",
        DEADLOCK_LIMIT,
        || {
            let machine: &'static SimMachine = Box::leak(Box::new(SimMachine::new(
                SimConfig::new(64 << 20)
                    .with_cpus(2)
                    .with_host_window(1 << 30),
            )));
            let frames: &'static SimFrames = Box::leak(Box::new(machine.frames()));
            let tlb: &'static Tlb = Box::leak(Box::new(Shootdown::new(machine, machine)));
            machine.set_ipi_handler(move || tlb.handle_ipi());
            let config = scenarios::window_config(machine);
            // A hang is the failure: a watchdog turns it into a panic.
            let (done, finished) = std::sync::mpsc::channel();
            thread::spawn(move || {
                // A slab-sized block (the class's lock) and a list-sized one (the list's).
                for size in [64, 5000] {
                    machine.cpu(1).go_online();
                    // SAFETY: the machine's page tables serve this manager alone, and its flush reaches every CPU that runs.
                    let vm = unsafe { manager(machine, frames, tlb, config) };
                    let inside = AtomicBool::new(false);
                    let ops = ShootsWhilePopulating {
                        vm: &vm,
                        tlb,
                        inside: &inside,
                    };
                    let heap = KernelHeap::new(HeapConfig {
                        window: 16 << 20,
                        ..HeapConfig::DEFAULT
                    });
                    heap.init(&ops).unwrap();
                    let layout = Layout::from_size_align(size, 8).unwrap();
                    thread::scope(|scope| {
                        let cpu1 = machine.cpu(1);
                        let (heap, inside) = (&heap, &inside);
                        scope.spawn(move || {
                            cpu1.enter();
                            // Interrupts off: this CPU takes no IPI, it only serves while it waits.
                            while !inside.load(Ordering::Acquire) {
                                std::hint::spin_loop();
                            }
                            // SAFETY: a valid layout; the block is freed with it.
                            unsafe {
                                let block = heap.alloc(layout);
                                assert!(!block.is_null());
                                heap.dealloc(block, layout);
                            }
                        });
                        machine.cpu(0).enter();
                        // The first block of its kind maps memory under the heap's lock.
                        // SAFETY: as above.
                        unsafe {
                            let block = heap.alloc(layout);
                            assert!(!block.is_null());
                            heap.dealloc(block, layout);
                        }
                    });
                    // CPU 1's thread is gone: it leaves, so dropping the manager (which
                    // shoots down) does not wait for it.
                    machine.cpu(1).go_offline();
                }
                done.send(tlb.stats()).unwrap();
            });
            let stats = finished
                .recv_timeout(std::time::Duration::from_secs(120))
                .expect("deadlock: CPU 1 waited for the heap lock without serving the shootdown");
            assert!(stats.ipis >= 2 && stats.served >= 2);
        },
    );
}
