//! The kernel heap's per-CPU slabs on a simulated machine whose host threads are its
//! CPUs (the default configuration: the manager's flush policy names the CPUs):
//! objects allocated on one CPU and freed on another, bursts, and drains of online
//! and offline CPUs. Interrupts at every point of these calls: `heap_interrupts.rs`.

use std::alloc::{GlobalAlloc, Layout};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Barrier, Mutex};
use vmalloc::heap::slab::class_for;
use vmalloc::heap::{HeapConfig, KernelHeap};
use vmalloc::smp::Shootdown;
use vmalloc::vmalloc::Vmalloc;
use vmalloc::{FrameSource, TlbFlush};
use vmalloc_sim::scenarios;
use vmalloc_sim::{DEADLOCK_LIMIT, Rng, SimConfig, SimFrames, SimMachine, SimPhys, watchdog};

/// A machine with `cpus` CPUs that lives as long as the test binary.
fn machine(cpus: usize, seed: u64) -> &'static SimMachine {
    Box::leak(Box::new(SimMachine::new(
        SimConfig::new(512 << 20)
            .with_cpus(cpus)
            .with_scatter_seed(seed)
            .with_host_window(8 << 30),
    )))
}

fn manager<F: FrameSource + Clone, T: TlbFlush>(
    machine: &SimMachine,
    frames: F,
    tlb: T,
) -> Vmalloc<F, SimPhys<'_>, T> {
    // SAFETY: the machine's page tables serve this manager alone, and its flush reaches every CPU that runs.
    unsafe { scenarios::window_manager(machine, frames, tlb) }
}

const CONFIG: HeapConfig = HeapConfig {
    window: 256 << 20,
    ..HeapConfig::DEFAULT
};

fn layout(size: usize) -> Layout {
    Layout::from_size_align(size, 8).unwrap()
}

/// What a manager has given out: areas, bytes of its region and frames mapped.
fn given_out<F: FrameSource + Clone, T: TlbFlush>(
    vm: &Vmalloc<F, SimPhys<'_>, T>,
) -> (u64, u64, u64) {
    vm.purge();
    let stats = vm.stats();
    (stats.areas, stats.used, stats.data_frames)
}

/// Slabs the CPUs hold as current or partial, over every class.
fn cpu_slabs(heap: &KernelHeap) -> usize {
    heap.slab_stats().iter().map(|class| class.cpu_slabs).sum()
}

/// A block stamped with a value of its own in every word, checked before it is
/// freed: a block handed out twice shows as a broken stamp.
#[derive(Clone, Copy)]
struct Stamped {
    ptr: usize,
    layout: Layout,
    stamp: u64,
}

impl Stamped {
    fn new(heap: &KernelHeap, layout: Layout, stamp: u64) -> Self {
        // SAFETY: a non-zero size.
        let ptr = unsafe { heap.alloc(layout) };
        assert!(!ptr.is_null());
        let block = Self {
            ptr: ptr as usize,
            layout,
            stamp,
        };
        for word in block.words() {
            // SAFETY: the block holds `layout.size()` bytes, 8-aligned.
            unsafe { word.write(stamp) };
        }
        block
    }

    fn words(&self) -> impl Iterator<Item = *mut u64> {
        let ptr = self.ptr as *mut u64;
        // SAFETY: within the block.
        (0..self.layout.size() / 8).map(move |word| unsafe { ptr.add(word) })
    }

    fn free(self, heap: &KernelHeap) {
        for word in self.words() {
            // SAFETY: a live block of this test.
            let seen = unsafe { word.read() };
            assert_eq!(seen, self.stamp, "a block was written by another");
        }
        // SAFETY: allocated with this layout, freed once.
        unsafe { heap.dealloc(self.ptr as *mut u8, self.layout) };
    }
}

#[test]
fn objects_one_cpu_allocates_and_another_frees_come_back_to_the_allocating_cpu() {
    watchdog("producer and consumer", DEADLOCK_LIMIT, || {
        let machine = machine(2, 21);
        let frames = machine.frames();
        let vm = manager(machine, &frames, machine);
        let heap = KernelHeap::new(CONFIG);
        heap.init(&vm).unwrap();
        let small = layout(64);
        let class = class_for(small).unwrap();
        let queue: Mutex<VecDeque<Stamped>> = Mutex::default();
        let done = AtomicBool::new(false);
        let most_slabs = AtomicUsize::new(0);
        const OBJECTS: u64 = 200_000;
        const IN_FLIGHT: usize = 512;
        std::thread::scope(|scope| {
            let (heap, queue, done, most_slabs) = (&heap, &queue, &done, &most_slabs);
            scope.spawn(move || {
                machine.cpu(0).enter();
                for stamp in 0..OBJECTS {
                    while queue.lock().unwrap().len() >= IN_FLIGHT {
                        std::thread::yield_now();
                    }
                    let block = Stamped::new(heap, small, stamp);
                    queue.lock().unwrap().push_back(block);
                    if stamp % 2000 == 0 {
                        let slabs = heap.slab_stats()[class].slabs;
                        most_slabs.fetch_max(slabs, Ordering::Relaxed);
                    }
                }
                done.store(true, Ordering::Release);
            });
            scope.spawn(move || {
                machine.cpu(1).enter();
                loop {
                    let block = queue.lock().unwrap().pop_front();
                    match block {
                        Some(block) => block.free(heap),
                        None if done.load(Ordering::Acquire) => break,
                        None => std::thread::yield_now(),
                    }
                }
                machine.cpu(1).go_offline();
            });
        });
        // 512 objects in flight fill 9 slabs of 63: CPU 0 found its full slabs
        // again through its notices instead of taking new ones.
        let most = most_slabs.load(Ordering::Relaxed);
        assert!(most <= 40, "{most} slabs for {IN_FLIGHT} objects in flight");
        assert_eq!(heap.stats().in_use, 0);
        heap.shrink();
        assert_eq!(heap.stats().slab_bytes, 0, "every slab went back");
    });
}

#[test]
fn cpus_freeing_bursts_of_each_others_objects_never_share_a_block() {
    watchdog("bursts across CPUs", DEADLOCK_LIMIT, || {
        let machine = machine(4, 22);
        let frames = machine.frames();
        let vm = manager(machine, &frames, machine);
        let heap = KernelHeap::new(CONFIG);
        heap.init(&vm).unwrap();
        let lists: Vec<Mutex<Vec<Stamped>>> = (0..4).map(|_| Mutex::default()).collect();
        let barrier = Barrier::new(4);
        std::thread::scope(|scope| {
            for cpu in 0..4 {
                let (heap, lists, barrier) = (&heap, &lists, &barrier);
                scope.spawn(move || {
                    machine.cpu(cpu).enter();
                    let mut rng = Rng::new(cpu as u64 + 50);
                    for round in 0..6u64 {
                        let mine: Vec<Stamped> = (0..3000u64)
                            .map(|i| {
                                let size = match rng.below(16) {
                                    0 => 8 + 8 * rng.below(512) as usize,
                                    _ => 8 + 8 * rng.below(64) as usize,
                                };
                                let stamp = (cpu as u64) << 56 | round << 32 | i;
                                Stamped::new(heap, layout(size), stamp)
                            })
                            .collect();
                        *lists[cpu].lock().unwrap() = mine;
                        barrier.wait();
                        // Free the next CPU's burst, in its order or backwards.
                        let theirs = std::mem::take(&mut *lists[(cpu + 1) % 4].lock().unwrap());
                        if round % 2 == 0 {
                            theirs.into_iter().for_each(|block| block.free(heap));
                        } else {
                            theirs.into_iter().rev().for_each(|block| block.free(heap));
                        }
                        barrier.wait();
                    }
                    if cpu != 0 {
                        machine.cpu(cpu).go_offline();
                    }
                });
            }
        });
        assert_eq!(heap.stats().in_use, 0);
        // This thread is CPU 0; the others are offline: claimed and drained.
        heap.shrink();
        assert_eq!(cpu_slabs(&heap), 0);
        assert_eq!(heap.stats().slab_bytes, 0, "every slab went back");
    });
}

/// Interrupt points of `f` on CPU 0 (every call of the CPU hooks is one).
fn points(machine: &SimMachine, f: impl FnOnce()) -> u64 {
    machine.cpu(0).count_points(f).1
}

#[test]
fn two_threads_running_as_one_cpu_share_its_slabs() {
    watchdog("two threads as CPU 0", DEADLOCK_LIMIT, || {
        let machine = machine(1, 25);
        let frames = machine.frames();
        let vm = manager(machine, &frames, machine);
        let heap = KernelHeap::new(CONFIG);
        heap.init(&vm).unwrap();
        // Both threads are CPU 0: one holds its slot, with interrupts off, at a time,
        // as two tasks a kernel switches between.
        std::thread::scope(|scope| {
            for seed in [1u64, 2] {
                let heap = &heap;
                scope.spawn(move || {
                    let mut rng = Rng::new(seed);
                    let mut live: Vec<Stamped> = Vec::new();
                    for i in 0..20_000u64 {
                        if live.len() < 500 && (live.is_empty() || rng.below(2) == 0) {
                            let size = 8 + 8 * rng.below(512) as usize;
                            let align = 8 << rng.below(4);
                            let layout = Layout::from_size_align(size, align).unwrap();
                            live.push(Stamped::new(heap, layout, i << 8 | seed));
                        } else {
                            let index = rng.below(live.len() as u64) as usize;
                            live.swap_remove(index).free(heap);
                        }
                    }
                    live.into_iter().for_each(|block| block.free(heap));
                });
            }
        });
        assert_eq!(heap.stats().in_use, 0);
    });
}

#[test]
fn a_burst_meets_its_classes_lock_once_per_slab_not_per_object() {
    let machine = machine(1, 23);
    let frames = machine.frames();
    let vm = manager(machine, &frames, machine);
    let heap = KernelHeap::new(CONFIG);
    heap.init(&vm).unwrap();
    let small = layout(64);
    // 63 objects per slab; six slabs' worth stays within the empty budget.
    const BURST: usize = 6 * 63;
    let burst = || {
        // SAFETY: non-zero sizes; each block freed once with its layout.
        unsafe {
            let blocks: Vec<*mut u8> = (0..BURST).map(|_| heap.alloc(small)).collect();
            for block in blocks {
                heap.dealloc(block, small);
            }
        }
    };
    burst();
    let pair = points(machine, || {
        // SAFETY: as above.
        unsafe { heap.dealloc(heap.alloc(small), small) }
    });
    let bursts = points(machine, burst);
    // Each call passes `pair / 2` points; a class's lock a few more, once per slab.
    let extra = bursts - pair * BURST as u64;
    assert!(
        extra <= 8 * 7,
        "{extra} points beyond the calls' own for {BURST} objects in 6 slabs"
    );
    assert_eq!(heap.stats().slab_objects, 0);
}

#[test]
fn per_cpu_slabs_never_hand_out_a_block_twice_and_shrink_drains_offline_cpus() {
    watchdog("per-CPU churn", DEADLOCK_LIMIT, || {
        let machine = machine(4, 11);
        let frames = machine.frames();
        let vm = manager(machine, &frames, machine);
        let heap = KernelHeap::new(CONFIG);
        heap.init(&vm).unwrap();
        std::thread::scope(|scope| {
            for cpu in 0..4 {
                let heap = &heap;
                scope.spawn(move || {
                    machine.cpu(cpu).enter();
                    let mut rng = Rng::new(cpu as u64 + 30);
                    let mut live: Vec<Stamped> = Vec::new();
                    for i in 0..20_000u64 {
                        if live.len() < 400 && (live.is_empty() || rng.below(2) == 0) {
                            let size = 8 + 8 * rng.below(512) as usize;
                            live.push(Stamped::new(heap, layout(size), i << 8 | cpu as u64));
                        } else {
                            let index = rng.below(live.len() as u64) as usize;
                            live.swap_remove(index).free(heap);
                        }
                    }
                    live.into_iter().for_each(|block| block.free(heap));
                    // CPU 0 is this test's thread again below; the others are unplugged.
                    if cpu != 0 {
                        machine.cpu(cpu).go_offline();
                    }
                });
            }
        });
        assert!(cpu_slabs(&heap) > 0, "the CPUs hold slabs");
        assert_eq!(heap.stats().in_use, 0);
        heap.shrink();
        vm.purge();
        assert_eq!(cpu_slabs(&heap), 0);
        assert_eq!(
            heap.stats().slab_bytes,
            0,
            "shrink drained this CPU's slabs and the offline CPUs'"
        );
    });
}

#[test]
fn an_online_cpu_it_cannot_reach_gives_its_slabs_back_at_its_next_call() {
    let machine = machine(4, 12);
    let frames = machine.frames();
    let vm = manager(machine, &frames, machine);
    let heap = KernelHeap::new(CONFIG);
    heap.init(&vm).unwrap();
    let small = layout(64);
    let other = layout(1000);
    let class = |heap: &KernelHeap| heap.slab_stats()[class_for(small).unwrap()];
    // CPU 1 allocates and frees: its current slab stays its own.
    machine.cpu(1).run(|_| {
        // SAFETY: non-zero sizes; each block is freed once with its layout.
        unsafe {
            let blocks: Vec<*mut u8> = (0..20).map(|_| heap.alloc(small)).collect();
            for block in blocks {
                heap.dealloc(block, small);
            }
        }
    });
    assert_eq!(class(&heap).cpu_slabs, 1);
    // CPU 0 shrinks; CPU 1 is online and the flush policy cannot run work on it.
    heap.shrink();
    assert_eq!(
        class(&heap).cpu_slabs,
        1,
        "another online CPU's slab was touched"
    );
    assert_eq!(class(&heap).slabs, 1);
    // CPU 1's next call, of another class, gives its slabs back first.
    machine.cpu(1).run(|_| {
        // SAFETY: a non-zero size; freed with its layout.
        unsafe { heap.dealloc(heap.alloc(other), other) }
    });
    assert_eq!(class(&heap).cpu_slabs, 0);
    heap.shrink();
    assert_eq!(class(&heap).slabs, 0, "the 64-byte class kept a slab");
}

#[test]
fn a_shrink_reaches_online_cpus_through_their_shootdown_service() {
    watchdog(
        "shrink through the shootdown service",
        DEADLOCK_LIMIT,
        || {
            let machine = machine(3, 24);
            let frames: &'static SimFrames = Box::leak(Box::new(machine.frames()));
            let tlb: &'static Shootdown<&SimMachine, &SimMachine> =
                Box::leak(Box::new(Shootdown::new(machine, machine)));
            machine.set_ipi_handler(move || tlb.handle_ipi());
            let vm = manager(machine, frames, tlb);
            let heap = KernelHeap::new(CONFIG);
            heap.init(&vm).unwrap();
            let ready = AtomicUsize::new(0);
            let stop = AtomicBool::new(false);
            std::thread::scope(|scope| {
                for cpu in 1..3 {
                    let (heap, ready, stop) = (&heap, &ready, &stop);
                    scope.spawn(move || {
                        let me = machine.cpu(cpu);
                        me.enter();
                        let _offline = me.offline_when_dropped();
                        let sizes = [layout(48), layout(700)];
                        // SAFETY: non-zero sizes; each block freed once with its layout.
                        unsafe {
                            for size in sizes {
                                heap.dealloc(heap.alloc(size), size);
                            }
                        }
                        ready.fetch_add(1, Ordering::Release);
                        // Idle with interrupts on: it serves the shootdowns sent to it.
                        while !stop.load(Ordering::Acquire) {
                            me.poll();
                            std::hint::spin_loop();
                        }
                    });
                }
                while ready.load(Ordering::Acquire) < 2 {
                    std::thread::yield_now();
                }
                assert_eq!(cpu_slabs(&heap), 4, "two slabs on each of CPUs 1 and 2");
                heap.shrink();
                assert_eq!(cpu_slabs(&heap), 0, "handed over and drained at once");
                assert_eq!(heap.stats().slab_bytes, 0);
                stop.store(true, Ordering::Release);
            });
        },
    );
}

#[test]
fn a_cpu_going_offline_and_online_while_another_shrinks_never_shares_its_slabs() {
    watchdog("offline and online under shrink", DEADLOCK_LIMIT, || {
        let machine = machine(4, 13);
        let frames = machine.frames();
        let vm = manager(machine, &frames, machine);
        let heap = KernelHeap::new(CONFIG);
        heap.init(&vm).unwrap();
        let done = AtomicBool::new(false);
        std::thread::scope(|scope| {
            let (heap, done) = (&heap, &done);
            scope.spawn(move || {
                let cpu = machine.cpu(1);
                cpu.enter();
                let mut rng = Rng::new(40);
                for round in 0..16u64 {
                    cpu.go_online();
                    let blocks: Vec<Stamped> = (0..64u64)
                        .map(|i| {
                            Stamped::new(
                                heap,
                                layout(8 + 8 * rng.below(64) as usize),
                                round << 8 | i,
                            )
                        })
                        .collect();
                    blocks.into_iter().for_each(|block| block.free(heap));
                    cpu.go_offline();
                }
                done.store(true, Ordering::Relaxed);
            });
            scope.spawn(move || {
                machine.cpu(2).enter();
                while !done.load(Ordering::Relaxed) {
                    heap.shrink();
                }
            });
        });
        assert_eq!(heap.stats().in_use, 0);
        heap.shrink();
        assert_eq!(
            cpu_slabs(&heap),
            0,
            "CPU 1 went offline; its slabs were drained"
        );
    });
}

#[test]
fn a_cpu_whose_slabs_ran_dry_takes_the_partial_slabs_another_gave_back_before_new_ones() {
    let machine = machine(4, 14);
    let frames = machine.frames();
    let vm = manager(machine, &frames, machine);
    let heap = KernelHeap::new(CONFIG);
    heap.init(&vm).unwrap();
    let small = layout(64);
    let class = class_for(small).unwrap();
    // CPU 1 fills slabs, frees every second object and gives its slabs back: its
    // class holds half-used slabs.
    let kept: Vec<usize> = machine.cpu(1).run(|_| {
        // SAFETY: non-zero sizes; each block is freed once with its layout.
        unsafe {
            let blocks: Vec<*mut u8> = (0..2000).map(|_| heap.alloc(small)).collect();
            for &block in blocks.iter().step_by(2) {
                heap.dealloc(block, small);
            }
            heap.shrink();
            blocks
                .iter()
                .skip(1)
                .step_by(2)
                .map(|&b| b as usize)
                .collect()
        }
    });
    let slabs = heap.slab_stats()[class].slabs;
    // CPU 0 allocates as many as were freed: no new slab.
    // SAFETY: non-zero sizes; each block is freed once with its layout.
    unsafe {
        let blocks: Vec<*mut u8> = (0..1000).map(|_| heap.alloc(small)).collect();
        assert_eq!(
            heap.slab_stats()[class].slabs,
            slabs,
            "CPU 0 made new slabs while CPU 1's half-used ones waited"
        );
        for block in blocks {
            heap.dealloc(block, small);
        }
        // CPU 1's slabs (CPU 0 holds some now): remote frees, and CPU 0's own.
        for block in kept {
            heap.dealloc(block as *mut u8, small);
        }
    }
    assert_eq!(heap.stats().in_use, 0);
    heap.shrink();
    assert_eq!(heap.stats().slab_bytes, 0);
}

/// Frees `block` (live, of `layout`) twice: the second free is refused and counted,
/// and nothing but the first free changed.
///
/// # Safety
///
/// `block` is a live block of `heap` of `layout`, not used afterwards.
unsafe fn free_twice(heap: &KernelHeap, block: *mut u8, layout: Layout, path: &str) {
    let before = heap.stats();
    // SAFETY: the caller's block; the second free is a deliberate double free.
    unsafe {
        heap.dealloc(block, layout);
        heap.dealloc(block, layout);
    }
    let after = heap.stats();
    assert_eq!(
        after.refused_frees,
        before.refused_frees + 1,
        "{path}: the second free was taken"
    );
    assert_eq!(after.in_use, before.in_use - layout.size(), "{path}");
}

/// After a refused double free: 600 new blocks are all distinct (none handed out
/// twice), and once every block is freed the slabs empty and go back whole (each
/// CPU gives its own back: the flush policy runs no work on the other).
fn heap_intact(
    machine: &SimMachine,
    heap: &KernelHeap,
    live: Vec<*mut u8>,
    layout: Layout,
    path: &str,
) {
    let fresh: Vec<Stamped> = (0..600).map(|i| Stamped::new(heap, layout, i)).collect();
    let mut seen: std::collections::HashSet<usize> = live.iter().map(|&b| b as usize).collect();
    for block in &fresh {
        assert!(seen.insert(block.ptr), "{path}: a block handed out twice");
    }
    fresh.into_iter().for_each(|block| block.free(heap));
    for block in live {
        // SAFETY: live blocks of this test, freed once.
        unsafe { heap.dealloc(block, layout) };
    }
    assert_eq!(heap.stats().in_use, 0, "{path}");
    machine.cpu(1).run(|_| heap.shrink());
    heap.shrink();
    assert_eq!(heap.stats().slab_bytes, 0, "{path}: a slab stayed in use");
}

/// A slab object freed twice in a row is refused on every list its free can put it
/// on, not only on top of a magazine or of the current slab's free list: the slab's
/// own free list (a slab the CPU holds, or its class holds), the holder's notices,
/// the slab's remote list.
#[test]
fn an_object_freed_twice_in_a_row_is_refused_whichever_list_took_it() {
    let small = layout(64);
    // SAFETY (each block below): a live block of the heap, of `small`; the double
    // frees are deliberate and refused.
    let alloc = |heap: &KernelHeap, n: usize| -> Vec<*mut u8> {
        (0..n)
            .map(|_| unsafe { heap.alloc(small) })
            .inspect(|block| assert!(!block.is_null()))
            .collect()
    };
    // Frees the last 16 blocks (the CPU's magazine of the class fills).
    let fill_magazine = |heap: &KernelHeap, blocks: &mut Vec<*mut u8>| {
        for block in blocks.split_off(blocks.len() - 16) {
            // SAFETY: live blocks, freed once.
            unsafe { heap.dealloc(block, small) };
        }
    };
    let machine = machine(2, 15);
    let frames = machine.frames();
    let vm = manager(machine, &frames, machine);
    for path in [
        "held slab",
        "class's slab",
        "notices",
        "remote list",
        "no per-CPU",
    ] {
        let heap = KernelHeap::new(HeapConfig {
            per_cpu: path != "no per-CPU",
            ..CONFIG
        });
        heap.init(&vm).unwrap();
        let mut blocks = alloc(&heap, 256);
        match path {
            // A full slab the CPU holds, not its current one.
            "held slab" => {
                fill_magazine(&heap, &mut blocks);
                let first = blocks.remove(0);
                unsafe { free_twice(&heap, first, small, path) };
            }
            // A slab the CPU gave back to its class, with a free object.
            "class's slab" => {
                let first = blocks.remove(0);
                unsafe { heap.dealloc(first, small) };
                heap.shrink();
                fill_magazine(&heap, &mut blocks);
                let second = blocks.remove(0);
                unsafe { free_twice(&heap, second, small, path) };
            }
            // Objects CPU 1 holds the slab of, freed by CPU 0 past its full
            // magazine: the first such free goes on CPU 1's notices, the next on the
            // slab's remote list.
            "notices" | "remote list" => {
                let theirs = machine.cpu(1).run(|_| alloc(&heap, 64));
                fill_magazine(&heap, &mut blocks);
                if path == "remote list" {
                    unsafe { heap.dealloc(theirs[0], small) };
                }
                unsafe { free_twice(&heap, theirs[1], small, path) };
                let rest = theirs[2..].to_vec();
                machine.cpu(1).run(|_| {
                    for block in rest {
                        // SAFETY: live blocks, freed once.
                        unsafe { heap.dealloc(block, small) };
                    }
                });
                if path == "notices" {
                    unsafe { heap.dealloc(theirs[0], small) };
                }
            }
            // One lock for every CPU: a free past the class's full magazine goes on
            // the slab's free list.
            _ => {
                fill_magazine(&heap, &mut blocks);
                let first = blocks.remove(0);
                unsafe { free_twice(&heap, first, small, path) };
            }
        }
        heap_intact(machine, &heap, blocks, small, path);
    }
}

/// Dropped once every block is freed, a heap gives back the slabs every CPU holds,
/// online or not, reachable or not, with the objects their magazines and notices
/// held.
#[test]
fn a_dropped_heap_gives_back_the_slabs_every_cpu_holds() {
    let machine = machine(4, 16);
    let frames = machine.frames();
    let vm = manager(machine, &frames, machine);
    let before = given_out(&vm);
    let heap = KernelHeap::new(CONFIG);
    heap.init(&vm).unwrap();
    let sizes = [16, 64, 200, 512, 2000];
    // Each CPU allocates; CPU 0 frees every CPU's blocks (remote frees, notices),
    // then each CPU frees a few of its own (its magazines).
    let theirs: Vec<Vec<Stamped>> = (1..4)
        .map(|cpu| {
            machine.cpu(cpu).run(|_| {
                (0..400)
                    .map(|i| Stamped::new(&heap, layout(sizes[i % 5]), i as u64))
                    .collect()
            })
        })
        .collect();
    let mut kept = Vec::new();
    for (cpu, blocks) in (1..4).zip(theirs) {
        let (own, remote) = blocks.split_at(20);
        remote.iter().for_each(|block| block.free(&heap));
        kept.push((cpu, own.to_vec()));
    }
    for (cpu, own) in kept {
        machine
            .cpu(cpu)
            .run(|_| own.into_iter().for_each(|block| block.free(&heap)));
    }
    machine.cpu(3).go_offline();
    assert_eq!(heap.stats().in_use, 0);
    assert!(cpu_slabs(&heap) > 0, "the CPUs hold slabs");
    drop(heap);
    assert_eq!(given_out(&vm), before, "(areas, bytes, frames)");
}

/// A free that empties its slab resets the slab's free list, so the object heads no
/// list: a second free of it is refused all the same (a slab with nothing in use
/// takes no free), on a CPU's held slab and on a slab its class holds, through the
/// class's magazine or past it.
#[test]
fn a_second_free_of_the_object_whose_free_emptied_its_slab_is_refused() {
    let small = layout(64);
    for (path, count) in [
        // The emptied slab becomes the CPU's spare.
        ("per-CPU, spare", 64),
        // The CPU has a spare: the emptied slab goes back to its class.
        ("per-CPU, to the class", 130),
        ("class", 130),
        ("class, full magazine", 130),
    ] {
        let machine = machine(2, 3);
        let frames = machine.frames();
        let vm = manager(machine, &frames, machine);
        let per_cpu = path.starts_with("per-CPU");
        let heap = KernelHeap::new(HeapConfig { per_cpu, ..CONFIG });
        heap.init(&vm).unwrap();
        // SAFETY: live blocks of the heap, each freed once but for the deliberate
        // (refused) double free.
        unsafe {
            let mut blocks: Vec<*mut u8> = (0..count).map(|_| heap.alloc(small)).collect();
            let slab = |block: *mut u8| block as usize & !4095;
            let first = slab(blocks[0]);
            assert!(blocks[..63].iter().all(|&b| slab(b) == first));
            assert_ne!(slab(blocks[63]), first, "63 objects to a slab");
            let others = blocks.split_off(63);
            let mut live = Vec::new();
            if path == "class, full magazine" {
                // The class's magazine fills (32 objects of 64 bytes) and the other
                // slabs keep objects in use.
                for &block in &others[..32] {
                    heap.dealloc(block, small);
                }
                live = others[32..].to_vec();
            } else {
                for &block in &others {
                    heap.dealloc(block, small);
                }
            }
            for &block in &blocks[1..] {
                heap.dealloc(block, small);
            }
            // The slab's last object: its free empties the slab.
            free_twice(&heap, blocks[0], small, path);
            heap_intact(machine, &heap, live, small, path);
        }
    }
}

/// Emptying one CPU at teardown can free objects into a full slab an earlier CPU
/// holds (from the later CPU's magazines): the drop still gives that slab back.
#[test]
fn a_dropped_heap_gives_back_a_full_slab_freed_from_other_cpus_magazines() {
    let machine = machine(3, 7);
    let frames = machine.frames();
    let vm = manager(machine, &frames, machine);
    let before = given_out(&vm);
    let heap = KernelHeap::new(CONFIG);
    heap.init(&vm).unwrap();
    let big = layout(512);
    let alloc = |n: usize| -> Vec<usize> {
        // SAFETY: a non-zero size.
        (0..n)
            .map(|_| unsafe { heap.alloc(big) } as usize)
            .collect()
    };
    let free = |blocks: &[usize]| {
        for &block in blocks {
            // SAFETY: live blocks, each freed once.
            unsafe { heap.dealloc(block as *mut u8, big) };
        }
    };
    // CPU 0 fills a slab (31 objects of 512 bytes) and starts another: the first is
    // full, on none of its lists.
    let zero = machine.cpu(0).run(|_| alloc(32));
    let (full, extra) = zero.split_at(31);
    let slab = full[0] & !(16384 - 1);
    assert!(full.iter().all(|&b| b & !(16384 - 1) == slab), "one slab");
    // CPUs 1 and 2, with objects of their own in use, free its objects: into their
    // magazines.
    let one = machine.cpu(1).run(|_| {
        let own = alloc(17);
        free(&full[..16]);
        own
    });
    let two = machine.cpu(2).run(|_| {
        let own = alloc(17);
        free(&full[16..]);
        own
    });
    machine.cpu(0).run(|_| {
        free(&one);
        free(&two);
        free(extra);
    });
    assert_eq!(heap.stats().in_use, 0);
    drop(heap);
    assert_eq!(given_out(&vm), before, "(areas, bytes, frames)");
}

/// A large or list-sized allocation that runs out gives back what the heap holds
/// idle (empty slabs, an offline CPU's slabs included, and kept large blocks)
/// before it fails, as a slab-sized one does: it failed while 16 MiB of slabs with
/// no object in use stayed mapped.
#[test]
fn an_allocation_of_any_size_that_runs_out_shrinks_the_heap_first() {
    watchdog("running out shrinks first", DEADLOCK_LIMIT, || {
        for (request, offline) in [(256 << 10, false), (8 << 10, false), (256 << 10, true)] {
            let machine: &'static SimMachine = Box::leak(Box::new(SimMachine::new(
                SimConfig::new(48 << 20)
                    .with_cpus(2)
                    .with_scatter_seed(4)
                    .with_host_window(8 << 30),
            )));
            let frames = machine.frames();
            let vm = manager(machine, &frames, machine);
            let heap = KernelHeap::new(HeapConfig {
                window: 64 << 20,
                ..HeapConfig::DEFAULT
            });
            heap.init(&vm).unwrap();
            heap.use_cpus(machine);
            // CPU 1 fills 16 MiB of slabs, which it or CPU 0 then empties.
            let small = layout(256);
            let objects: Vec<usize> = machine.cpu(1).run(|_| {
                // SAFETY: a valid layout; each block is checked below.
                (0..(16 << 20) / 256)
                    .map(|_| unsafe { heap.alloc(small) } as usize)
                    .collect()
            });
            assert!(objects.iter().all(|&object| object != 0));
            let freeing = if offline {
                machine.cpu(1).go_offline();
                0
            } else {
                1
            };
            machine.cpu(freeing).run(|_| {
                for &object in &objects {
                    // SAFETY: allocated above with `small`, not used afterwards.
                    unsafe { heap.dealloc(object as *mut u8, small) };
                }
            });
            let idle = heap.stats().slab_bytes;
            let request = layout(request);
            let mut got = Vec::new();
            machine.cpu(0).run(|_| {
                loop {
                    // SAFETY: a valid layout.
                    let block = unsafe { heap.alloc(request) };
                    if block.is_null() {
                        break;
                    }
                    got.push(block);
                }
            });
            let stats = heap.stats();
            assert!(
                stats.slab_bytes < 1 << 20 && got.len() * request.size() > 16 << 20,
                "{request:?}, offline {offline}: {} of {idle} idle slab bytes left, {} blocks",
                stats.slab_bytes,
                got.len()
            );
            machine.cpu(0).run(|_| {
                for block in got {
                    // SAFETY: allocated above with `request`.
                    unsafe { heap.dealloc(block, request) };
                }
            });
        }
    });
}
