//! The kernel heap against `linked_list_allocator::LockedHeap` alone on a fixed
//! region of the same size: many small objects with a few 1 MiB buffers.
//!
//! The kernel heap runs in the simulated machine's host window, where the first touch
//! of a freshly mapped page is a host page fault and a purge unmaps the window again;
//! the large-buffer workload pays for that, a real MMU would not (see the README).
//!
//! `cargo bench --bench heap`

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use linked_list_allocator::LockedHeap;
use std::alloc::{GlobalAlloc, Layout};
use std::hint::black_box;
use vmalloc::heap::{HeapConfig, KernelHeap};
use vmalloc::vmalloc::{Vmalloc, VmallocConfig};
use vmalloc_sim::{Rng, SimConfig, SimFrames, SimMachine, SimPhys};

/// Bytes of heap for both contenders.
const REGION: usize = 64 << 20;
/// Allocations per workload round; every eighth is freed at once, the rest at the end.
const OPS: usize = 4096;

/// The workload: sizes 16..512 bytes, and with `large`, a 1 MiB buffer every 512
/// allocations.
fn layouts(large: bool) -> Vec<Layout> {
    let mut rng = Rng::new(9);
    (0..OPS)
        .map(|i| {
            let size = if large && i % 512 == 511 {
                1 << 20
            } else {
                16 + rng.below(497) as usize
            };
            Layout::from_size_align(size, 8).unwrap()
        })
        .collect()
}

/// Runs one round: allocate all, touching each block, freeing every eighth block
/// right away, then free the rest. Returns the number of operations.
fn round(heap: &dyn GlobalAlloc, layouts: &[Layout], held: &mut Vec<(*mut u8, Layout)>) -> usize {
    let mut ops = 0;
    for (i, &layout) in layouts.iter().enumerate() {
        // SAFETY: non-zero sizes; each block is freed once with its layout.
        unsafe {
            let block = heap.alloc(layout);
            assert!(!block.is_null());
            block.write(i as u8);
            if i % 8 == 0 {
                heap.dealloc(block, layout);
                ops += 1;
            } else {
                held.push((block, layout));
            }
        }
        ops += 1;
    }
    for (block, layout) in held.drain(..) {
        // SAFETY: as above.
        unsafe { heap.dealloc(black_box(block), layout) };
        ops += 1;
    }
    ops
}

type Manager<'m> = Vmalloc<&'m SimFrames, SimPhys<'m>, &'m SimMachine>;

fn bench(c: &mut Criterion) {
    let machine = SimMachine::new(
        SimConfig::new(512 << 20)
            .with_scatter_seed(1)
            .with_host_window(4 << 30),
    );
    let frames = machine.frames();
    let (start, size) = machine.host_window().unwrap();
    let config = VmallocConfig {
        start,
        size,
        ..VmallocConfig::default()
    };
    // SAFETY: the machine's page tables are used by this manager alone.
    let manager: Manager =
        unsafe { Vmalloc::new(config, machine.root(), machine.phys(), &frames, &machine) }.unwrap();
    let heap = KernelHeap::new(HeapConfig {
        window: REGION,
        ..HeapConfig::DEFAULT
    });
    heap.init(&manager).unwrap();
    let peer = LockedHeap::empty_with_region(REGION);
    let mut held = Vec::with_capacity(OPS);
    for (name, large) in [("heap_mixed", true), ("heap_small_only", false)] {
        let layouts = layouts(large);
        let mut group = c.benchmark_group(name);
        group.throughput(Throughput::Elements(
            round(&peer, &layouts, &mut held) as u64
        ));
        group.bench_function("kernel_heap", |b| {
            b.iter(|| round(&heap, &layouts, &mut held))
        });
        group.bench_function("linked_list_allocator", |b| {
            b.iter(|| round(&peer, &layouts, &mut held))
        });
        group.finish();
    }
}

/// A `LockedHeap` over a leaked host region of `size` bytes.
trait WithRegion {
    fn empty_with_region(size: usize) -> Self;
}

impl WithRegion for LockedHeap {
    fn empty_with_region(size: usize) -> Self {
        let region: &'static mut [u8] = Box::leak(vec![0u8; size].into_boxed_slice());
        // SAFETY: the region is leaked, so it lives as long as the heap, and only the
        // heap uses it.
        unsafe { LockedHeap::new(region.as_mut_ptr(), size) }
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
