//! Frame alloc+free cost at 0%, 50% and 99% occupancy, against the buddy allocator
//! of `buddy_system_allocator` on the same memory map.
//!
//! Occupancy is scattered at random: everything is allocated, then a random half
//! (50%) or hundredth (99%) of the frames is freed again, so free frames are spread
//! over all of memory. The single-frame rows also go through `LockedFrameAllocator`,
//! the allocator a kernel shares between CPUs and hands to the manager: plain
//! (`locked`), and with per-CPU lists (`percpu`, built `with_cpus`), where a frame
//! comes from and goes back to the CPU's list without the lock, and a free claims the
//! frame's handed-out flag with one exchange. The bench's CPUs hold nothing off (a
//! host thread cannot `cli`), so the `percpu` rows leave out a kernel's
//! `pushf`/`cli`/`popf` around the list.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use vmalloc::frame::{BitmapFrameAllocator, LockedFrameAllocator, MemoryRegion};
use vmalloc::smp::{CpuSet, Cpus, IrqState};
use x86_64::PhysAddr;
use x86_64::structures::paging::PhysFrame;

const FRAME: u64 = 4096;
const MIB: u64 = 1 << 20;

/// About 2 GiB of frames in three usable ranges with a reserved hole, so that even
/// at 99% occupancy 4096 frames are free.
fn memory_map() -> Vec<MemoryRegion> {
    vec![
        MemoryRegion::usable(0, 640 * 1024),
        MemoryRegion::usable(MIB, 1024 * MIB),
        MemoryRegion::reserved(16 * MIB, 32 * MIB),
        MemoryRegion::usable(4096 * MIB, 5136 * MIB),
    ]
}

/// Frame-number ranges of `memory_map` that are usable, for the buddy allocator.
fn usable_ranges() -> [(usize, usize); 4] {
    let f = |bytes: u64| (bytes / FRAME) as usize;
    [
        (0, f(640 * 1024)),
        (f(MIB), f(16 * MIB)),
        (f(32 * MIB), f(1024 * MIB)),
        (f(4096 * MIB), f(5136 * MIB)),
    ]
}

/// Whether the `index`-th frame stays allocated at `occupancy` percent: a fixed
/// pseudo-random pick (SplitMix64 of the index).
fn stays_held(index: usize, occupancy: usize) -> bool {
    let mut z = (index as u64).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z % 100) as usize >= 100 - occupancy
}

fn frame(number: usize) -> PhysFrame {
    PhysFrame::containing_address(PhysAddr::new(number as u64 * FRAME))
}

fn fill_bitmap(alloc: &mut BitmapFrameAllocator, occupancy: usize) {
    let mut all = vec![frame(0); alloc.stats().total as usize];
    alloc.alloc_bulk(&mut all);
    let back: Vec<PhysFrame> = (all.iter().enumerate())
        .filter(|(i, _)| !stays_held(*i, occupancy))
        .map(|(_, f)| *f)
        .collect();
    // SAFETY: frames the bench took and no longer uses.
    unsafe { alloc.free_bulk(&back) }.unwrap();
}

type Buddy = buddy_system_allocator::FrameAllocator<33>;

/// The bench thread as CPU 0 of one: interrupts are not touched.
struct BenchCpu;

// SAFETY: one thread, always CPU 0 and online; it sends no IPIs, and holding off
// interrupts is a no-op on a host thread no handler interrupts.
unsafe impl Cpus for BenchCpu {
    fn current(&self) -> usize {
        0
    }
    fn online(&self) -> CpuSet {
        CpuSet::first(1)
    }
    fn send_ipi(&self, _: CpuSet) {}
    fn irq_save(&self) -> IrqState {
        IrqState::new(0)
    }
    fn irq_restore(&self, _: IrqState) {}
}

fn buddy(occupancy: usize) -> Buddy {
    let mut buddy = Buddy::new();
    for (start, end) in usable_ranges() {
        buddy.add_frame(start, end);
    }
    let all: Vec<usize> = core::iter::from_fn(|| buddy.alloc(1)).collect();
    for (i, number) in all.into_iter().enumerate() {
        if !stays_held(i, occupancy) {
            buddy.dealloc(number, 1);
        }
    }
    buddy
}

fn bench(c: &mut Criterion) {
    let map = memory_map();
    for occupancy in [0, 50, 99] {
        let mut storage = vec![0; BitmapFrameAllocator::storage_words(map.clone())];
        let mut bitmap = BitmapFrameAllocator::with_storage(map.clone(), &mut storage).unwrap();
        fill_bitmap(&mut bitmap, occupancy);
        let mut locked_storage = vec![0; BitmapFrameAllocator::storage_words(map.clone())];
        let mut shared =
            BitmapFrameAllocator::with_storage(map.clone(), &mut locked_storage).unwrap();
        fill_bitmap(&mut shared, occupancy);
        let locked = LockedFrameAllocator::new(shared);
        let mut listed_storage = vec![0; BitmapFrameAllocator::storage_words(map.clone())];
        let mut listed =
            BitmapFrameAllocator::with_storage(map.clone(), &mut listed_storage).unwrap();
        fill_bitmap(&mut listed, occupancy);
        let percpu = LockedFrameAllocator::with_cpus(listed, &BenchCpu);
        let mut peer = buddy(occupancy);

        let mut group = c.benchmark_group(format!("frame/occupancy{occupancy}"));
        group.throughput(Throughput::Elements(1));
        group.bench_function("single/bitmap", |b| {
            b.iter(|| {
                let f = bitmap.alloc().unwrap();
                // SAFETY: frames the bench took and no longer uses.
                unsafe { bitmap.free(black_box(f)) }.unwrap();
            })
        });
        group.bench_function("single/locked", |b| {
            b.iter(|| {
                let f = locked.alloc().unwrap();
                // SAFETY: frames the bench took and no longer uses.
                unsafe { locked.free(black_box(f)) }.unwrap();
            })
        });
        group.bench_function("single/percpu", |b| {
            b.iter(|| {
                let f = percpu.alloc().unwrap();
                // SAFETY: frames the bench took and no longer uses.
                unsafe { percpu.free(black_box(f)) }.unwrap();
            })
        });
        group.bench_function("single/buddy", |b| {
            b.iter(|| {
                let f = peer.alloc(1).unwrap();
                peer.dealloc(black_box(f), 1);
            })
        });
        for count in [1usize, 64, 4096] {
            group.throughput(Throughput::Elements(count as u64));
            let mut out = vec![frame(0); count];
            group.bench_function(BenchmarkId::new("bulk/bitmap", count), |b| {
                b.iter(|| {
                    assert_eq!(bitmap.alloc_bulk(&mut out), count);
                    // SAFETY: frames the bench took and no longer uses.
                    unsafe { bitmap.free_bulk(black_box(&out)) }.unwrap();
                })
            });
            let mut numbers = vec![0usize; count];
            group.bench_function(BenchmarkId::new("bulk/buddy", count), |b| {
                b.iter(|| {
                    for slot in numbers.iter_mut() {
                        *slot = peer.alloc(1).unwrap();
                    }
                    for &number in black_box(&numbers) {
                        peer.dealloc(number, 1);
                    }
                })
            });
        }
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
