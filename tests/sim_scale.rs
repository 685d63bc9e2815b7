//! The simulator at scale: a test holds 1 GiB of live small objects from the kernel
//! heap in a host window, and the host mappings the window costs stay bounded
//! however the frames scatter.

use std::alloc::{GlobalAlloc, Layout};
use std::time::Instant;
use vmalloc::heap::{HeapConfig, KernelHeap};
use vmalloc_sim::scenarios;
use vmalloc_sim::{SimConfig, SimMachine};

/// Lines of `/proc/self/maps`: the host mappings of the process.
fn host_mappings() -> usize {
    std::fs::read_to_string("/proc/self/maps")
        .expect("procfs")
        .lines()
        .count()
}

/// The host's limit on mappings per process.
fn max_map_count() -> usize {
    std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(65_530)
}

#[test]
fn a_gib_of_live_small_objects_costs_a_bounded_number_of_host_mappings() {
    const LIVE: usize = 1 << 30;
    // Small enough for the slabs, large enough that the debug build's time goes to
    // the 262,144 pages rather than to the objects.
    const OBJECT: usize = 1024;
    const WORDS: usize = OBJECT / 8;
    let machine = SimMachine::new(
        SimConfig::new(1536 << 20)
            .with_scatter_seed(7)
            .with_host_window(4 << 30),
    );
    let frames = machine.frames();
    // SAFETY: the machine's page tables serve this manager alone, and its flush reaches every CPU that runs.
    let vm = unsafe { scenarios::window_manager(&machine, &frames, &machine) };
    let heap = KernelHeap::new(HeapConfig {
        window: 16 << 20,
        ..HeapConfig::DEFAULT
    });
    heap.init(&vm).unwrap();
    let layout = Layout::from_size_align(OBJECT, 8).unwrap();
    let before = host_mappings();
    let mut most = before;
    let started = Instant::now();
    let count = LIVE / OBJECT;
    let mut objects = Vec::with_capacity(count);
    for number in 0..count as u64 {
        // SAFETY: a non-zero size.
        let object = unsafe { heap.alloc(layout) }.cast::<u64>();
        assert!(!object.is_null(), "object {number}");
        // SAFETY: a fresh object of `WORDS` words.
        unsafe {
            object.write(number);
            object.add(WORDS - 1).write(!number);
        }
        objects.push(object);
        if number % (64 << 10) == 0 {
            most = most.max(host_mappings());
        }
    }
    let filled = started.elapsed();
    assert_eq!(heap.stats().slab_objects, count);
    assert!(heap.stats().slab_bytes >= LIVE);
    let held = machine.host_mapped_pages();
    // Objects from all over the gigabyte, most of them on pages the window evicted
    // long ago, read back through it.
    for (number, &object) in objects.iter().enumerate().step_by(61) {
        // SAFETY: a live object of `WORDS` words.
        let ends = unsafe { [object.read(), object.add(WORDS - 1).read()] };
        assert_eq!(ends, [number as u64, !(number as u64)], "object {number}");
    }
    most = most.max(host_mappings());
    eprintln!(
        "{} MiB live in {filled:.1?}, a sample read back in {:.1?}: {held} window pages \
         host-mapped, at most {most} host mappings ({before} before)",
        LIVE >> 20,
        started.elapsed() - filled,
    );
    // The windows keep a quarter of the limit's pages; each costs two mappings at
    // most (itself and a split of the reservation).
    assert!(held <= max_map_count() / 4 + 64, "{held} pages host-mapped");
    assert!(
        most - before <= max_map_count() / 2 + 128,
        "{most} mappings, {before} before"
    );
}
