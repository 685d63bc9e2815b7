//! Interrupt handlers that allocate, landing at every point of the per-CPU slab
//! paths (every call the heap makes into the machine is an interrupt point, see
//! `vmalloc_sim`'s `SimCpu`): frees of objects another CPU allocated, allocations
//! that take back what another CPU freed, and bursts that cross slabs. The handler
//! allocates and frees through the heap; no block is handed out twice (every live
//! block keeps its stamp) and nothing hangs (a watchdog fails a stuck test by name).
//! The heap runs with and without per-CPU slabs.

use std::alloc::{GlobalAlloc, Layout};
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use vmalloc::heap::{HeapConfig, KernelHeap};
use vmalloc::vmalloc::Vmalloc;
use vmalloc_sim::scenarios;
use vmalloc_sim::{DEADLOCK_LIMIT, SimConfig, SimCpu, SimFrames, SimMachine, SimPhys, watchdog};

/// Flushes reach only the calling CPU: CPU 1 runs only inside CPU 0's thread here.
type Manager = Vmalloc<&'static SimFrames, SimPhys<'static>, &'static SimMachine>;

/// A two-CPU machine, a manager over it and a heap on the manager; all leaked, for
/// the `'static` interrupt handler.
struct Kernel {
    machine: &'static SimMachine,
    heap: &'static KernelHeap<'static>,
    /// Blocks handed out and not freed, by start: their end and their stamp.
    live: Mutex<BTreeMap<usize, (usize, u8)>>,
    next_stamp: AtomicU64,
    interrupts: AtomicU64,
}

fn kernel(per_cpu: bool) -> &'static Kernel {
    let machine: &'static SimMachine = Box::leak(Box::new(SimMachine::new(
        SimConfig::new(256 << 20)
            .with_cpus(2)
            .with_scatter_seed(31)
            .with_host_window(8 << 30),
    )));
    let frames: &'static SimFrames = Box::leak(Box::new(machine.frames()));
    // SAFETY: the machine's page tables serve this manager alone, and its flush reaches every CPU that runs.
    let vm = unsafe { scenarios::window_manager(machine, frames, machine) };
    let vm: &'static Manager = Box::leak(Box::new(vm));
    let heap: &'static KernelHeap<'static> = Box::leak(Box::new(KernelHeap::new(HeapConfig {
        per_cpu,
        ..HeapConfig::DEFAULT
    })));
    heap.init(vm).unwrap();
    Box::leak(Box::new(Kernel {
        machine,
        heap,
        live: Mutex::default(),
        next_stamp: AtomicU64::new(1),
        interrupts: AtomicU64::new(0),
    }))
}

impl Kernel {
    /// Allocates a block, fails if it overlaps a live one, and stamps it.
    fn alloc(&self, layout: Layout) -> usize {
        // SAFETY: a non-zero size.
        let ptr = unsafe { self.heap.alloc(layout) };
        assert!(!ptr.is_null());
        let (start, len) = (ptr as usize, layout.size());
        let stamp = self.next_stamp.fetch_add(1, Ordering::Relaxed) as u8 | 1;
        let mut live = self.live.lock().unwrap();
        if let Some((&other, &(end, _))) = live.range(..start + len).next_back() {
            assert!(
                end <= start,
                "{start:#x}+{len} handed out while {other:#x}..{end:#x} is live"
            );
        }
        live.insert(start, (start + len, stamp));
        drop(live);
        // SAFETY: a fresh block of `len` writable bytes, this test's alone.
        unsafe { ptr.write_bytes(stamp, len) };
        start
    }

    /// Checks a block's stamp, forgets it and frees it.
    fn free(&self, start: usize, layout: Layout) {
        let (end, stamp) = self.live.lock().unwrap().remove(&start).unwrap();
        // SAFETY: a live block of this test.
        let bytes = unsafe { std::slice::from_raw_parts(start as *const u8, end - start) };
        assert!(
            bytes.iter().all(|&b| b == stamp),
            "the block at {start:#x} was written by another"
        );
        // SAFETY: allocated with `layout`, freed once.
        unsafe { self.heap.dealloc(start as *mut u8, layout) };
    }

    /// A driver's interrupt handler: allocates and frees small blocks of a few
    /// classes, one of them the class the interrupted call works in.
    fn handler(&'static self) -> impl FnOnce() + Send + 'static {
        move || {
            self.interrupts.fetch_add(1, Ordering::Relaxed);
            let blocks: Vec<(usize, Layout)> = [64, 24, 64, 300]
                .into_iter()
                .map(|size| {
                    let layout = Layout::from_size_align(size, 8).unwrap();
                    (self.alloc(layout), layout)
                })
                .collect();
            for (block, layout) in blocks {
                self.free(block, layout);
            }
        }
    }

    /// Runs `op` once per interrupt point it passes on `cpu`, with an interrupt at
    /// that point, after `setup` each time.
    fn interrupt_everywhere(&'static self, cpu: SimCpu<'static>, setup: impl Fn(), op: impl Fn()) {
        setup();
        let (_, points) = cpu.count_points(&op);
        assert!(points > 0, "the call passes interrupt points");
        for point in 0..points {
            setup();
            let before = self.interrupts.load(Ordering::Relaxed);
            cpu.interrupt_after(point, self.handler());
            cpu.run(|_| op());
            if !cpu.disarm() {
                assert_eq!(self.interrupts.load(Ordering::Relaxed), before + 1);
            }
        }
    }
}

const SMALL: Layout = match Layout::from_size_align(64, 8) {
    Ok(layout) => layout,
    Err(_) => panic!(),
};

/// Objects CPU 1 allocated and hands to CPU 0, by start.
static HANDED: Mutex<Vec<usize>> = Mutex::new(Vec::new());

fn per_cpu_paths(kernel: &'static Kernel) {
    let (cpu0, cpu1) = (kernel.machine.cpu(0), kernel.machine.cpu(1));
    // Blocks of other sizes stay live throughout, so a block handed out twice shows.
    let kept: Vec<(usize, Layout)> = [32, 64, 64, 2000]
        .into_iter()
        .map(|size| {
            let layout = Layout::from_size_align(size, 8).unwrap();
            (kernel.alloc(layout), layout)
        })
        .collect();
    // CPU 0 frees an object CPU 1 allocated: CPU 1's slab, through its shared word.
    kernel.interrupt_everywhere(
        cpu0,
        || {
            let block = cpu1.run(|_| kernel.alloc(SMALL));
            HANDED.lock().unwrap().push(block);
        },
        || {
            let block = HANDED.lock().unwrap().pop().unwrap();
            kernel.free(block, SMALL);
        },
    );
    // CPU 0 allocates after CPU 1 freed objects of CPU 0's slabs: it takes them
    // back (its notices) in the call.
    kernel.interrupt_everywhere(
        cpu0,
        || {
            let blocks: Vec<usize> = (0..3).map(|_| cpu0.run(|_| kernel.alloc(SMALL))).collect();
            cpu1.run(|_| {
                blocks
                    .into_iter()
                    .for_each(|block| kernel.free(block, SMALL))
            });
        },
        || {
            let block = kernel.alloc(SMALL);
            kernel.free(block, SMALL);
        },
    );
    // A burst across slabs: 130 objects (three slabs) allocated, then freed.
    kernel.interrupt_everywhere(
        cpu0,
        || {},
        || {
            let blocks: Vec<usize> = (0..130).map(|_| kernel.alloc(SMALL)).collect();
            blocks
                .into_iter()
                .for_each(|block| kernel.free(block, SMALL));
        },
    );
    // CPU 1's objects come back on CPU 1 afterwards: everything still adds up.
    for block in HANDED.lock().unwrap().drain(..) {
        kernel.free(block, SMALL);
    }
    for (block, layout) in kept {
        kernel.free(block, layout);
    }
}

#[test]
fn an_interrupt_at_every_point_of_a_per_cpu_slab_call_allocates_without_harm() {
    for per_cpu in [true, false] {
        let name = format!("per-CPU slab calls, per_cpu {per_cpu}");
        watchdog(&name, DEADLOCK_LIMIT, || {
            let kernel = kernel(per_cpu);
            per_cpu_paths(kernel);
            assert!(kernel.live.lock().unwrap().is_empty());
            assert!(kernel.interrupts.load(Ordering::Relaxed) > 100);
            kernel.machine.cpu(1).go_offline();
            kernel.heap.shrink();
            let stats = kernel.heap.stats();
            assert_eq!((stats.slab_objects, stats.slab_bytes), (0, 0));
        });
    }
}

/// A machine, a manager over its host window and a heap with `config`, leaked.
fn large_kernel(
    memory: u64,
    config: HeapConfig,
) -> (
    &'static SimMachine,
    &'static Manager,
    &'static KernelHeap<'static>,
) {
    let machine: &'static SimMachine = Box::leak(Box::new(SimMachine::new(
        SimConfig::new(memory)
            .with_cpus(2)
            .with_host_window(8 << 30),
    )));
    let frames: &'static SimFrames = Box::leak(Box::new(machine.frames()));
    // SAFETY: the window's tables serve this manager alone.
    let vm: &'static Manager = Box::leak(Box::new(unsafe {
        scenarios::window_manager(machine, frames, machine)
    }));
    let heap: &'static KernelHeap<'static> = Box::leak(Box::new(KernelHeap::new(config)));
    heap.init(vm).unwrap();
    (machine, vm, heap)
}

static REUSED: Mutex<Vec<usize>> = Mutex::new(Vec::new());

/// A second free of a kept large block, while an interrupt handler on the same CPU
/// takes the kept block for a new buffer, is refused and leaves the handler's block
/// alone, at every point of the free. The heap, having seen the block kept, went on
/// to free whatever large block started there by then: the handler's, live.
#[test]
fn a_second_free_of_a_kept_block_never_frees_the_block_reused_meanwhile() {
    watchdog("second free of a kept block", DEADLOCK_LIMIT, || {
        let (machine, vm, heap) = large_kernel(256 << 20, HeapConfig::DEFAULT);
        let cpu = machine.cpu(0);
        cpu.enter();
        let layout = Layout::from_size_align(20 << 10, 8).unwrap();
        // SAFETY: a non-zero size; the second free is the bad call the heap refuses.
        let x = unsafe { heap.alloc(layout) };
        // SAFETY: as above.
        unsafe { heap.dealloc(x, layout) };
        // SAFETY: as above.
        let (_, points) = cpu.count_points(|| unsafe { heap.dealloc(x, layout) });
        assert_eq!(heap.stats().refused_frees, 1);
        // Point 0 lands before the second free looks at the block: the handler's
        // allocation comes first, a plain double free of a reused block.
        for point in 1..points {
            let refused = heap.stats().refused_frees;
            // SAFETY: as above.
            let x = unsafe { heap.alloc(layout) };
            // SAFETY: as above; kept.
            unsafe { heap.dealloc(x, layout) };
            cpu.interrupt_after(point, move || {
                // SAFETY: a non-zero size; the test frees it below.
                let y = unsafe { heap.alloc(layout) };
                assert!(!y.is_null());
                // SAFETY: the block holds `layout.size()` bytes.
                unsafe { y.write_bytes(0xab, layout.size()) };
                REUSED.lock().unwrap().push(y as usize);
            });
            // SAFETY: the second free: refused.
            cpu.run(|_| unsafe { heap.dealloc(x, layout) });
            cpu.disarm();
            for y in REUSED.lock().unwrap().drain(..) {
                let area = vm.find_vm_area(x86_64::VirtAddr::new(y as u64));
                assert_eq!(
                    area.map(|area| area.tag),
                    Some("kernel heap large"),
                    "point {point}"
                );
                assert_eq!(heap.stats().refused_frees, refused + 1, "point {point}");
                // SAFETY: the handler's block, freed once.
                unsafe { heap.dealloc(y as *mut u8, layout) };
            }
        }
    });
}

static HELD_MIB: Mutex<Vec<usize>> = Mutex::new(Vec::new());

/// An allocation that runs out gives the kept large blocks back and tries again,
/// whatever else is freed meanwhile: an interrupt handler freeing buffers (kept by
/// the heap) at any point of it made it return null, the kept bytes looking no
/// lower after the give-back, though the frames it gave back would serve it (the
/// same call made again right after did).
#[test]
fn an_allocation_that_runs_out_tries_again_after_giving_back_whatever_is_freed_meanwhile() {
    watchdog("give back, then try again", DEADLOCK_LIMIT, || {
        let config = HeapConfig {
            large_cache: 8 << 20,
            window: 1 << 20,
            ..HeapConfig::DEFAULT
        };
        let (machine, vm, heap) = large_kernel(32 << 20, config);
        let cpu = machine.cpu(0);
        cpu.enter();
        let mib = Layout::from_size_align(1 << 20, 8).unwrap();
        let want = Layout::from_size_align(2 << 20, 8).unwrap();
        // Memory full of 1 MiB blocks; three freed (kept), three more held for the
        // handler to free.
        let fill = || {
            let mut all = Vec::new();
            loop {
                // SAFETY: a non-zero size.
                let block = unsafe { heap.alloc(mib) };
                if block.is_null() {
                    break;
                }
                all.push(block as usize);
            }
            for _ in 0..3 {
                // SAFETY: a block of that layout, freed once.
                unsafe { heap.dealloc(all.pop().unwrap() as *mut u8, mib) };
            }
            assert_eq!(heap.stats().large_kept, 3 << 20);
            HELD_MIB
                .lock()
                .unwrap()
                .extend((0..3).map(|_| all.pop().unwrap()));
            all
        };
        let empty = |all: Vec<usize>, got: *mut u8| {
            for block in all.into_iter().chain(HELD_MIB.lock().unwrap().drain(..)) {
                // SAFETY: blocks of that layout, freed once.
                unsafe { heap.dealloc(block as *mut u8, mib) };
            }
            if !got.is_null() {
                // SAFETY: as above.
                unsafe { heap.dealloc(got, want) };
            }
            heap.shrink();
            vm.purge();
        };
        let all = fill();
        // SAFETY: a non-zero size.
        let (got, points) = cpu.count_points(|| unsafe { heap.alloc(want) });
        assert!(!got.is_null(), "the kept blocks' frames serve it");
        empty(all, got);
        for point in (0..points).step_by(7) {
            let all = fill();
            cpu.interrupt_after(point, || {
                for block in HELD_MIB.lock().unwrap().drain(..) {
                    let mib = Layout::from_size_align(1 << 20, 8).unwrap();
                    // SAFETY: blocks of that layout, freed once.
                    unsafe { heap.dealloc(block as *mut u8, mib) };
                }
            });
            // SAFETY: a non-zero size.
            let got = cpu.run(|_| unsafe { heap.alloc(want) });
            cpu.disarm();
            assert!(!got.is_null(), "point {point} of {points}: null");
            empty(all, got);
        }
    });
}
