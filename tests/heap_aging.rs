//! Empty slabs age out while the heap keeps working: after a burst of frees leaves
//! hundreds of empty slabs, ordinary work afterwards (a ring of small blocks, or one
//! class's allocations and frees served by a CPU's current slab alone) gives back all
//! but the heap's budget of them, without a `shrink`; and a fragmented heap holds
//! little more than its live bytes.

use std::alloc::{GlobalAlloc, Layout};
use vmalloc::PAGE_SIZE;
use vmalloc::heap::slab::EMPTY_BUDGET;
use vmalloc::heap::{HeapConfig, KernelHeap};
use vmalloc_sim::scenarios;
use vmalloc_sim::{Rng, SimConfig, SimMachine};

fn machine() -> SimMachine {
    SimMachine::new(
        SimConfig::new(256 << 20)
            .with_scatter_seed(21)
            .with_host_window(4 << 30),
    )
}

/// Bytes of frames the heap's empty slabs hold.
fn empty_slab_bytes(heap: &KernelHeap) -> usize {
    heap.slab_stats()
        .iter()
        .map(|class| class.bytes / class.slabs.max(1) * class.empty_slabs)
        .sum()
}

/// Allocates `count` blocks of `size` bytes, then frees them all: the slabs they
/// filled are left empty.
fn burst(heap: &KernelHeap, size: usize, count: usize) {
    let layout = Layout::from_size_align(size, 8).unwrap();
    let blocks: Vec<*mut u8> = (0..count)
        .map(|_| {
            // SAFETY: a non-zero size.
            let block = unsafe { heap.alloc(layout) };
            assert!(!block.is_null());
            // SAFETY: the block holds `size` bytes.
            unsafe { block.write_bytes(0x5a, size) };
            block
        })
        .collect();
    for block in blocks {
        // SAFETY: freed once, with its layout.
        unsafe { heap.dealloc(block, layout) };
    }
}

/// The bursts of the report: 48-byte and 200-byte objects, many slabs' worth.
fn bursts(heap: &KernelHeap) {
    burst(heap, 48, 200_000);
    burst(heap, 200, 40_000);
    let left = empty_slab_bytes(heap);
    assert!(
        left > 16 * EMPTY_BUDGET,
        "the bursts leave {left} bytes of empty slabs: the freshly emptied wait"
    );
}

#[test]
fn a_ring_of_small_blocks_ages_the_empty_slabs_out() {
    let machine = machine();
    let frames = machine.frames();
    // SAFETY: the machine's page tables serve this manager alone, and its flush reaches every CPU that runs.
    let vm = unsafe { scenarios::window_manager(&machine, &frames, &machine) };
    let heap = KernelHeap::new(HeapConfig::DEFAULT);
    heap.init(&vm).unwrap();
    bursts(&heap);
    // A ring of 1,000 blocks of 16-512 bytes: each step frees the oldest and
    // allocates another.
    let mut rng = Rng::new(4);
    let mut ring: Vec<(*mut u8, Layout)> = Vec::with_capacity(1000);
    for step in 0..100_000 {
        if ring.len() == 1000 {
            let (block, layout) = ring[step % 1000];
            // SAFETY: a live block with its layout.
            unsafe { heap.dealloc(block, layout) };
        }
        let layout = Layout::from_size_align(16 + rng.below(497) as usize, 8).unwrap();
        // SAFETY: a non-zero size.
        let block = unsafe { heap.alloc(layout) };
        assert!(!block.is_null());
        // SAFETY: the block holds at least 16 bytes.
        unsafe { block.write(step as u8) };
        if ring.len() < 1000 {
            ring.push((block, layout));
        } else {
            ring[step % 1000] = (block, layout);
        }
    }
    let left = empty_slab_bytes(&heap);
    assert!(
        left <= EMPTY_BUDGET,
        "{left} bytes of empty slabs after the ring, the budget is {EMPTY_BUDGET}"
    );
    for (block, layout) in ring {
        // SAFETY: a live block with its layout.
        unsafe { heap.dealloc(block, layout) };
    }
}

#[test]
fn pairs_served_by_a_cpus_current_slab_age_the_empty_slabs_out() {
    let machine = machine();
    let frames = machine.frames();
    // SAFETY: the machine's page tables serve this manager alone, and its flush reaches every CPU that runs.
    let vm = unsafe { scenarios::window_manager(&machine, &frames, &machine) };
    let heap = KernelHeap::new(HeapConfig::DEFAULT);
    heap.init(&vm).unwrap();
    bursts(&heap);
    // Allocate and free one 64-byte block, over and over: the CPU's current slab
    // serves every call, and no class is touched.
    let layout = Layout::from_size_align(64, 8).unwrap();
    for _ in 0..100_000 {
        // SAFETY: a non-zero size; freed at once with its layout.
        unsafe {
            let block = heap.alloc(layout);
            assert!(!block.is_null());
            block.write(1);
            heap.dealloc(block, layout);
        }
    }
    let left = empty_slab_bytes(&heap);
    assert!(
        left <= EMPTY_BUDGET,
        "{left} bytes of empty slabs after the pairs, the budget is {EMPTY_BUDGET}"
    );
}

#[test]
fn a_fragmented_heap_holds_little_more_than_its_live_bytes_and_gives_it_all_back() {
    // The random-actions workload: 10,000 live blocks of 16-512 bytes (1 in 64 up to
    // 4 KiB); each step frees a random one and allocates one of a random size.
    let machine = machine();
    let frames = machine.frames();
    // SAFETY: the machine's page tables serve this manager alone, and its flush reaches every CPU that runs.
    let vm = unsafe { scenarios::window_manager(&machine, &frames, &machine) };
    let heap = KernelHeap::new(HeapConfig::DEFAULT);
    heap.init(&vm).unwrap();
    let data_at_start = vm.stats().data_frames;
    let mut rng = Rng::new(3);
    let mut layout = || {
        let top = if rng.below(64) == 0 { 4096 } else { 512 };
        Layout::from_size_align(16 + rng.below(top - 15) as usize, 8).unwrap()
    };
    let mut live: Vec<(*mut u8, Layout)> = (0..10_000)
        .map(|_| {
            let layout = layout();
            // SAFETY: a non-zero size.
            (unsafe { heap.alloc(layout) }, layout)
        })
        .collect();
    let mut rng = Rng::new(4);
    for _ in 0..100_000 {
        let index = rng.below(live.len() as u64) as usize;
        let (block, old) = live[index];
        // SAFETY: a live block with its layout; the new one has a non-zero size.
        unsafe {
            heap.dealloc(block, old);
            let new = layout();
            live[index] = (heap.alloc(new), new);
        }
    }
    assert!(live.iter().all(|(block, _)| !block.is_null()));
    let live_bytes: usize = live.iter().map(|(_, layout)| layout.size()).sum();
    let held = (vm.stats().data_frames - data_at_start) as usize * PAGE_SIZE as usize;
    assert!(
        held * 2 <= live_bytes * 3,
        "{held} bytes of frames for {live_bytes} live bytes"
    );
    for (block, layout) in live {
        // SAFETY: as above.
        unsafe { heap.dealloc(block, layout) };
    }
    heap.shrink();
    vm.purge();
    let stats = heap.stats();
    assert_eq!((stats.in_use, stats.slab_bytes), (0, 0));
    assert!(
        vm.stats().data_frames - data_at_start <= 4 + stats.mapped as u64 / PAGE_SIZE,
        "within a few pages of the start once everything is freed and shrunk"
    );
}

/// Without per-CPU slabs: one object of each class, allocated and freed, then work in
/// one class alone. Each class's last object came back into its magazine, which
/// must go back whole (so its slab can empty and age out): the idle classes hold no
/// more than the budget of empty slabs.
#[test]
fn a_class_magazine_holding_its_last_object_gives_it_back() {
    let machine = machine();
    let frames = machine.frames();
    // SAFETY: the machine's page tables serve this manager alone.
    let vm = unsafe { scenarios::window_manager(&machine, &frames, &machine) };
    let heap = KernelHeap::new(HeapConfig {
        per_cpu: false,
        ..HeapConfig::DEFAULT
    });
    heap.init(&vm).unwrap();
    for &size in vmalloc::heap::slab::CLASS_SIZES.iter() {
        let layout = Layout::from_size_align(size, 8).unwrap();
        // SAFETY: a non-zero size; freed once.
        unsafe { heap.dealloc(heap.alloc(layout), layout) };
    }
    let small = Layout::from_size_align(16, 8).unwrap();
    for _ in 0..20_000 {
        // SAFETY: as above.
        unsafe { heap.dealloc(heap.alloc(small), small) };
    }
    let stats = heap.stats();
    assert_eq!(stats.slab_objects, 0);
    let pinned: Vec<_> = heap
        .slab_stats()
        .into_iter()
        .filter(|class| class.size != 16 && class.slabs > class.empty_slabs)
        .map(|class| (class.size, class.cached))
        .collect();
    assert!(
        pinned.is_empty(),
        "classes whose magazine pins a slab: {pinned:?}"
    );
    assert!(
        stats.slab_bytes <= EMPTY_BUDGET + PAGE_SIZE as usize,
        "nothing in use, {} bytes of slabs held (budget {EMPTY_BUDGET})",
        stats.slab_bytes
    );
}

/// Per-CPU slabs: CPU 0 allocates 160 objects, CPU 1 frees 144 of them and CPU 0 the
/// other 16 (a producer and a consumer: CPU 0's own count of objects out never drops
/// to none). Once CPU 0 works on in other classes, the magazine its 16 frees went
/// into goes back, and the class's slabs empty: the CPU keeps its current slab and
/// its spare, the class the empty others.
#[test]
fn a_cpu_magazine_idle_while_the_cpu_works_on_gives_its_objects_back() {
    let machine = SimMachine::new(
        SimConfig::new(64 << 20)
            .with_cpus(2)
            .with_host_window(4 << 30),
    );
    let frames = machine.frames();
    // SAFETY: the machine's page tables serve this manager alone.
    let vm = unsafe { scenarios::window_manager(&machine, &frames, &machine) };
    let heap = KernelHeap::new(HeapConfig::DEFAULT);
    heap.init(&vm).unwrap();
    let layout = Layout::from_size_align(512, 8).unwrap();
    let (cpu0, cpu1) = (machine.cpu(0), machine.cpu(1));
    let blocks: Vec<usize> = cpu0.run(|_| {
        // SAFETY: a non-zero size.
        (0..160)
            .map(|_| unsafe { heap.alloc(layout) } as usize)
            .collect()
    });
    let (mine, theirs): (Vec<_>, Vec<_>) = blocks
        .iter()
        .enumerate()
        .partition(|(index, _)| index % 10 == 0);
    cpu1.run(|_| {
        for &(_, &block) in &theirs {
            // SAFETY: a live block, freed once with its layout.
            unsafe { heap.dealloc(block as *mut u8, layout) }
        }
    });
    cpu0.run(|_| {
        for &(_, &block) in &mine {
            // SAFETY: as above.
            unsafe { heap.dealloc(block as *mut u8, layout) }
        }
    });
    let small = Layout::from_size_align(16, 8).unwrap();
    cpu0.run(|_| {
        for _ in 0..20_000 {
            // SAFETY: a non-zero size; freed once.
            unsafe { heap.dealloc(heap.alloc(small), small) }
        }
    });
    assert_eq!(heap.stats().slab_objects, 0);
    let class = heap
        .slab_stats()
        .into_iter()
        .find(|class| class.size == 512)
        .unwrap();
    assert!(
        class.cpu_slabs <= 2 && class.slabs == class.empty_slabs + class.cpu_slabs,
        "nothing of the class in use, yet {class:?}"
    );
}
