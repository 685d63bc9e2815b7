//! The manager calls its frame allocator only with interrupts held off.
//!
//! `LockedFrameAllocator::new` (what `SimFrames` is, and what a kernel whose
//! interrupt handlers never allocate frames directly uses) holds nothing off itself:
//! it relies on the manager, its only caller, holding interrupts off around every
//! call. A call made with interrupts on can be interrupted inside the allocator's
//! lock by a handler that allocates through vmalloc, which then spins on that lock
//! forever.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use vmalloc::smp::Cpus as _;
use vmalloc::vmalloc::{CacheMode, Prot, VmOptions, Vmalloc, VmallocConfig};
use vmalloc::{Error, FrameSource};
use vmalloc_sim::{SimConfig, SimFrames, SimMachine, SimPhys, scenarios, watchdog};
use x86_64::PhysAddr;
use x86_64::structures::paging::{PhysFrame, Size2MiB};

const LIMIT: Duration = Duration::from_secs(30);

/// `SimFrames` that counts calls made with the calling CPU's interrupts on, and
/// offers an interrupt point inside the allocator's lock in `manages` (where an
/// interrupt may land between two instructions on hardware).
struct Watched {
    frames: &'static SimFrames,
    machine: &'static SimMachine,
    with_interrupts_on: AtomicU64,
}

impl Watched {
    fn new(machine: &'static SimMachine) -> &'static Self {
        Box::leak(Box::new(Self {
            frames: Box::leak(Box::new(machine.frames())),
            machine,
            with_interrupts_on: AtomicU64::new(0),
        }))
    }

    fn check(&self) {
        if self
            .machine
            .cpu(self.machine.current_cpu())
            .interrupts_enabled()
        {
            self.with_interrupts_on.fetch_add(1, Ordering::Relaxed);
        }
    }
}

// SAFETY: every call goes to the wrapped source.
unsafe impl FrameSource for &'static Watched {
    fn alloc_frame(&self) -> Option<PhysFrame> {
        self.check();
        self.frames.alloc_frame()
    }
    fn alloc_frames(&self, out: &mut [PhysFrame]) -> usize {
        self.check();
        self.frames.alloc_frames(out)
    }
    fn alloc_frame_2m(&self) -> Option<PhysFrame<Size2MiB>> {
        self.check();
        self.frames.alloc_frame_2m()
    }
    unsafe fn free_frame(&self, frame: PhysFrame) -> Result<(), Error> {
        self.check();
        // SAFETY: forwarded from the caller.
        unsafe { self.frames.free_frame(frame) }
    }
    unsafe fn free_frames(&self, frames: &[PhysFrame]) -> Result<(), Error> {
        self.check();
        // SAFETY: forwarded from the caller.
        unsafe { self.frames.free_frames(frames) }
    }
    fn manages(&self, first: PhysFrame, count: u64) -> bool {
        self.check();
        // SAFETY: the closure leaves this allocator in place.
        unsafe {
            self.frames.allocator().with_lock(|bitmap| {
                let _ = self.machine.current();
                bitmap.manages(first, count)
            })
        }
    }
}

type Manager = Vmalloc<&'static Watched, SimPhys<'static>, &'static SimMachine>;

fn kernel() -> (&'static Watched, &'static Manager) {
    let machine: &'static SimMachine = Box::leak(Box::new(SimMachine::new(
        SimConfig::new(128 << 20).with_cpus(2),
    )));
    let frames = Watched::new(machine);
    // SAFETY: the machine's page tables serve this manager alone, and its flush reaches every CPU that runs.
    let vm = unsafe { scenarios::manager_with(machine, frames, machine, VmallocConfig::default()) };
    // No handler can reach a manager still being made: only its calls count.
    frames.with_interrupts_on.store(0, Ordering::Relaxed);
    (frames, Box::leak(Box::new(vm)))
}

#[test]
fn an_interrupt_landing_in_ioremaps_frame_allocator_call_can_vmalloc() {
    watchdog("ioremap: an interrupt inside frames.manages", LIMIT, || {
        let (frames, vm) = kernel();
        // A driver's handler that allocates, armed for the next interrupt point.
        let ran: &'static AtomicU64 = Box::leak(Box::new(AtomicU64::new(0)));
        frames.machine.cpu(0).interrupt_after(0, move || {
            let area = vm.vmalloc(8 * 4096).expect("vmalloc in the handler");
            // SAFETY: made above, not used again.
            unsafe { vm.vfree(area.as_ptr()) }.unwrap();
            ran.fetch_add(1, Ordering::Relaxed);
        });
        // SAFETY: an MMIO page no frame allocator manages, never touched.
        let mapped = unsafe { vm.ioremap(PhysAddr::new(0xfee0_0000), 0x400, CacheMode::Uncached) };
        assert!(mapped.is_ok());
        assert_eq!(ran.load(Ordering::Relaxed), 1, "the interrupt ran");
    });
}

#[test]
fn every_call_into_the_frame_allocator_is_made_with_interrupts_held_off() {
    watchdog("every call with interrupts off", LIMIT, || {
        for huge in [false, true] {
            let (frames, vm) = kernel();
            // SAFETY (the block): each area is used only while live and freed once.
            unsafe {
                let small = vm.vmalloc(4096).unwrap();
                let zeroed = vm.vzalloc(40 * 4096).unwrap();
                let grown = vm.vrealloc(zeroed.as_ptr(), 90 * 4096).unwrap();
                vm.set_prot(grown.as_ptr(), Prot::READ).unwrap();
                let big = if huge {
                    vm.vmalloc_huge(4 << 20).ok()
                } else {
                    None
                };
                let mut borrowed = [PhysFrame::containing_address(PhysAddr::new(0)); 4];
                assert_eq!(frames.frames.alloc_frames(&mut borrowed), 4);
                let mapped = vm.vmap(&borrowed, Prot::KERNEL_RW).unwrap();
                let io = vm
                    .ioremap(PhysAddr::new(0xfee0_0000), 0x400, CacheMode::Uncached)
                    .unwrap();
                let options = VmOptions::default();
                let reserved = vm.reserve(64 * 4096, &options).unwrap();
                vm.populate(reserved.as_ptr(), 20 * 4096).unwrap();
                let sparse = vm.reserve_sparse(16 * 4096, &options).unwrap();
                vm.map_page(sparse.as_ptr(), 3).unwrap();
                vm.unmap_page(sparse.as_ptr(), 3).unwrap();
                let stack = vm.alloc_stack(16 * 1024).unwrap();
                drop(stack);
                for area in [small, grown, reserved, sparse].into_iter().chain(big) {
                    vm.vfree(area.as_ptr()).unwrap();
                }
                vm.vunmap(mapped.as_ptr(), |_| {}).unwrap();
                vm.iounmap(io.as_ptr()).unwrap();
                let atomic = vm.vmalloc(3 * 4096).unwrap();
                vm.vfree_atomic(atomic.as_ptr()).unwrap();
                frames.frames.free_frames(&borrowed).unwrap();
            }
            // Many small areas: per-CPU blocks, lazy lists, purges.
            let areas: Vec<_> = (0..2000)
                .map(|i| vm.vmalloc(4096 * (1 + i % 3)).unwrap())
                .collect();
            for area in areas {
                // SAFETY: made above, freed once.
                unsafe { vm.vfree(area.as_ptr()) }.unwrap();
            }
            vm.drain_cpu_caches();
            vm.purge();
            let _ = (vm.stats(), vm.info().to_string());
            assert_eq!(
                frames.with_interrupts_on.load(Ordering::Relaxed),
                0,
                "calls into the frame allocator with interrupts on (huge: {huge})"
            );
        }
    });
}

/// Dropping a manager (live areas in its per-CPU blocks and in its tree, or none
/// left) returns its frames with interrupts held off too: a handler that allocates
/// through another manager on the same frames would spin on their lock.
#[test]
fn dropping_a_manager_calls_the_frame_allocator_with_interrupts_held_off() {
    watchdog("drop with interrupts off", LIMIT, || {
        for live in [false, true] {
            let machine: &'static SimMachine = Box::leak(Box::new(SimMachine::new(
                SimConfig::new(128 << 20).with_cpus(2),
            )));
            let frames = Watched::new(machine);
            // SAFETY: the machine's page tables serve this manager alone, and its
            // flush reaches every CPU that runs.
            let vm: Manager = unsafe {
                scenarios::manager_with(machine, frames, machine, VmallocConfig::default())
            };
            let areas: Vec<_> = (0..50)
                .map(|i| vm.vmalloc(4096 * (1 + i % 4)).unwrap())
                .chain([vm.vmalloc(600 * 4096).unwrap()])
                .collect();
            if !live {
                for area in areas {
                    // SAFETY: made above, freed once.
                    unsafe { vm.vfree(area.as_ptr()) }.unwrap();
                }
            }
            frames.with_interrupts_on.store(0, Ordering::Relaxed);
            drop(vm);
            assert_eq!(
                frames.with_interrupts_on.load(Ordering::Relaxed),
                0,
                "calls into the frame allocator with interrupts on (live areas: {live})"
            );
        }
    });
}

/// Making a manager takes its first frames (its top-level tables, its first
/// bookkeeping page) with interrupts held off too: an interrupt handler that
/// allocates through another manager over the same frames, landing in their lock
/// while the new manager is made, spun on it.
#[test]
fn making_a_manager_calls_the_frame_allocator_with_interrupts_held_off() {
    watchdog("new with interrupts off", LIMIT, || {
        let machine: &'static SimMachine = Box::leak(Box::new(SimMachine::new(
            SimConfig::new(128 << 20).with_cpus(2),
        )));
        let frames = Watched::new(machine);
        for cpu_caches in [false, true] {
            let config = VmallocConfig {
                cpu_caches,
                ..VmallocConfig::default()
            };
            // SAFETY: the machine's page tables serve this manager alone, and its
            // flush reaches every CPU that runs.
            let vm: Manager = unsafe { scenarios::manager_with(machine, frames, machine, config) };
            assert_eq!(
                frames.with_interrupts_on.swap(0, Ordering::Relaxed),
                0,
                "calls into the frame allocator with interrupts on (caches: {cpu_caches})"
            );
            drop(vm);
        }
    });
}

/// The machine's CPUs, counting the reads of `current` made with interrupts on,
/// which the `Cpus` contract says the library never makes (a kernel checking it, as
/// Linux's `debug_smp_processor_id` does, would trip).
struct Strict {
    machine: &'static SimMachine,
    reads_with_interrupts_on: AtomicU64,
}

// SAFETY: the machine's CPUs, as they are; only counted.
unsafe impl vmalloc::smp::Cpus for Strict {
    fn current(&self) -> usize {
        let cpu = self.machine.current_cpu();
        if self.machine.cpu(cpu).interrupts_enabled() {
            self.reads_with_interrupts_on
                .fetch_add(1, Ordering::Relaxed);
        }
        self.machine.current()
    }
    fn online(&self) -> vmalloc::smp::CpuSet {
        self.machine.online()
    }
    fn send_ipi(&self, targets: vmalloc::smp::CpuSet) {
        self.machine.send_ipi(targets)
    }
    fn irq_save(&self) -> vmalloc::smp::IrqState {
        self.machine.irq_save()
    }
    fn irq_restore(&self, state: vmalloc::smp::IrqState) {
        self.machine.irq_restore(state)
    }
}

/// A stack cache and the kernel heap's guarded pool read which CPU they run on
/// with interrupts held off, as the `Cpus` contract says of the library.
#[test]
fn the_cpu_index_is_read_with_interrupts_held_off() {
    use std::alloc::{GlobalAlloc, Layout};
    use vmalloc::heap::{HeapConfig, KernelHeap};
    use vmalloc::vmalloc::StackCache;
    let machine: &'static SimMachine = Box::leak(Box::new(SimMachine::new(
        SimConfig::new(128 << 20).with_host_window(4 << 30),
    )));
    let frames = machine.frames();
    let strict = Strict {
        machine,
        reads_with_interrupts_on: AtomicU64::new(0),
    };
    // SAFETY: the window's tables serve this manager alone.
    let vm = unsafe { scenarios::window_manager(machine, &frames, machine) };
    let cache = StackCache::new(&strict);
    let stack = cache.alloc(&vm, 16 << 10).unwrap();
    drop(stack);
    let heap = KernelHeap::new(HeapConfig {
        per_cpu: false,
        sample_interval: 1,
        guarded_slots: 8,
        ..HeapConfig::DEFAULT
    });
    heap.use_cpus(&strict);
    heap.init(&vm).unwrap();
    let layout = Layout::from_size_align(24, 8).unwrap();
    // SAFETY: a non-zero size; freed once, with its layout.
    unsafe {
        let object = heap.alloc(layout);
        assert!(heap.is_guarded(object));
        heap.dealloc(object, layout);
    }
    assert_eq!(strict.reads_with_interrupts_on.load(Ordering::Relaxed), 0);
    drop(heap);
    cache.drain(&vm).unwrap();
}
