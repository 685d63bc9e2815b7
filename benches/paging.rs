//! Map + unmap of N scattered frames: this crate's cursor against the `x86_64`
//! crate's `OffsetPageTable` (`map_to` + `unmap` per page) and against the floor, a
//! loop that only stores and clears N 8-byte entries in an array. All three work on
//! the same host memory and the same frames; the page tables stay allocated between
//! iterations, so the steady state measured is entry writes and walks. Unmapped
//! frames are folded into a checksum, the least a caller does with them.
//!
//! `cargo bench --bench paging -- --warm-up-time 1 --measurement-time 2`

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use vmalloc::frame::MapperFrames;
use vmalloc::paging::PageTables;
use vmalloc::{FrameSource, OffsetPhysMemory};
use vmalloc_sim::{SimConfig, SimMachine};
use x86_64::VirtAddr;
use x86_64::structures::paging::page::PageRange;
use x86_64::structures::paging::{Mapper, Page, PageTableFlags, PhysFrame};

/// The vmalloc region's start: a 512 GiB-aligned kernel address.
const START: u64 = 0xffff_c900_0000_0000;
const SIZES: [u64; 5] = [1, 16, 256, 4096, 65536];
const FLAGS: PageTableFlags = PageTableFlags::PRESENT
    .union(PageTableFlags::WRITABLE)
    .union(PageTableFlags::NO_EXECUTE)
    .union(PageTableFlags::GLOBAL);

fn range(count: u64) -> PageRange {
    let start = Page::containing_address(VirtAddr::new(START));
    Page::range(start, start + count)
}

fn map_unmap(c: &mut Criterion) {
    let max = *SIZES.last().unwrap() as usize;
    let machine = SimMachine::new(SimConfig::new(512 << 20).with_scatter_seed(0x5eed));
    let pool = machine.frames();
    let frames: Vec<PhysFrame> = (0..max).map(|_| pool.alloc_frame().unwrap()).collect();
    // SAFETY: the machine's memory stays at this offset while `machine` lives.
    let phys = unsafe { OffsetPhysMemory::new(machine.phys_offset()) };
    // SAFETY: the machine's root is a zeroed PML4 that nothing else uses.
    let mut tables = unsafe { PageTables::new(machine.root(), phys) };

    let mut group = c.benchmark_group("map_unmap");
    for size in SIZES {
        let frames = &frames[..size as usize];
        group.throughput(Throughput::Elements(size));
        group.bench_with_input(BenchmarkId::new("cursor", size), &size, |b, &size| {
            b.iter(|| {
                // SAFETY: the pool's frames, in simulated tables no CPU walks.
                unsafe { tables.map(range(size), frames.iter().copied(), FLAGS, &pool) }.unwrap();
                let mut checksum = 0;
                // SAFETY: as above; no TLB caches these tables.
                let flush = unsafe {
                    tables.unmap(range(size), |_, frame| {
                        checksum ^= frame.start_address().as_u64();
                    })
                };
                // SAFETY: as above: nothing to flush. (The peer ignores its tokens too.)
                unsafe { flush.unwrap().ignore() };
                black_box(checksum);
            })
        });
        group.bench_with_input(
            BenchmarkId::new("x86_64_map_to", size),
            &size,
            |b, &size| {
                // SAFETY: the cursor above is not used while this walker lives.
                let mut mapper = unsafe { machine.offset_page_table() };
                let mut allocator = MapperFrames(&pool);
                b.iter(|| {
                    for (page, frame) in range(size).zip(frames) {
                        // SAFETY: the page is unmapped and the frame is not a page table.
                        let flush = unsafe { mapper.map_to(page, *frame, FLAGS, &mut allocator) };
                        flush.unwrap().ignore();
                    }
                    let mut checksum = 0;
                    for page in range(size) {
                        let (frame, flush) = mapper.unmap(page).unwrap();
                        checksum ^= frame.start_address().as_u64();
                        flush.ignore();
                    }
                    black_box(checksum);
                })
            },
        );
        group.bench_with_input(BenchmarkId::new("raw_stores", size), &size, |b, _| {
            let mut entries = vec![0u64; frames.len()];
            b.iter(|| {
                for (entry, frame) in entries.iter_mut().zip(frames) {
                    *entry = frame.start_address().as_u64() | FLAGS.bits();
                }
                black_box(&mut entries);
                for entry in entries.iter_mut() {
                    *entry = 0;
                }
                black_box(&mut entries);
            })
        });
    }
    group.finish();
}

fn config() -> Criterion {
    Criterion::default().sample_size(20)
}

criterion_group! { name = benches; config = config(); targets = map_unmap }
criterion_main!(benches);
