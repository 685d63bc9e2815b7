//! The vmalloc manager on the scenarios of Linux's `lib/test_vmalloc.c`, and against
//! the way blog_os-style kernels build vmalloc today: the `x86_64` crate's
//! `OffsetPageTable`, one `map_to` (and later `unmap`) per page, on the same machine
//! and the same scattered frames.
//!
//! `cargo bench --bench vmalloc`; TLB flush counts: `cargo run --release --example flush_counts`.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use std::time::{Duration, Instant};
use vmalloc::VmallocConfig;
use vmalloc::frame::{BitmapFrameAllocator, LockedFrameAllocator, MapperFrames};
use vmalloc::vmalloc::{VmFlags, VmOptions};
use vmalloc::{FrameSource, PAGE_SIZE};
use vmalloc_sim::scenarios::*;
use vmalloc_sim::{Rng, SimConfig, SimFrames, SimMachine};
use x86_64::structures::paging::{
    Mapper, OffsetPageTable, Page, PageTableFlags, PhysFrame, Size4KiB,
};
use x86_64::{PhysAddr, VirtAddr};

/// Where the peer maps: Linux's vmalloc start, as the manager uses by default.
const PEER_START: u64 = 0xffff_c900_0000_0000;

/// A blog_os-style vmalloc: a bump pointer for addresses (rewound when the last area
/// is freed, which the benchmark always does, so the peer never pays for a search),
/// a frame and a `map_to` per page, an `unmap` and a free per page. It ignores the
/// flush tokens (a real kernel would `invlpg` each page), so its figures are a lower
/// bound: the comparison leans towards the peer.
struct PeerVmalloc<'m, F = SimFrames> {
    mapper: OffsetPageTable<'m>,
    frames: &'m F,
    next: u64,
}

const FLAGS: PageTableFlags = PageTableFlags::PRESENT
    .union(PageTableFlags::WRITABLE)
    .union(PageTableFlags::NO_EXECUTE)
    .union(PageTableFlags::GLOBAL);

impl<'m, F: FrameSource> PeerVmalloc<'m, F> {
    fn new(machine: &'m SimMachine, frames: &'m F) -> Self {
        // SAFETY: the machine's tables are used by this peer alone.
        let mapper = unsafe { machine.offset_page_table() };
        Self {
            mapper,
            frames,
            next: PEER_START,
        }
    }

    fn vmalloc(&mut self, pages: u64) -> VirtAddr {
        let start = self.next;
        for i in 0..pages {
            let page = Page::containing_address(VirtAddr::new(start + i * PAGE_SIZE));
            let frame = self.frames.alloc_frame().unwrap();
            // SAFETY: the page is unused and the frame is fresh.
            unsafe {
                self.mapper
                    .map_to(page, frame, FLAGS, &mut MapperFrames(self.frames))
            }
            .unwrap()
            .ignore();
        }
        self.next = start + (pages + 1) * PAGE_SIZE;
        VirtAddr::new(start)
    }

    fn vfree(&mut self, start: VirtAddr, pages: u64) {
        for i in 0..pages {
            let (frame, flush) = self
                .mapper
                .unmap(Page::<Size4KiB>::containing_address(start + i * PAGE_SIZE))
                .unwrap();
            flush.ignore();
            // SAFETY: frames the bench took and no longer uses.
            unsafe { self.frames.free_frame(frame) }.unwrap();
        }
        self.next = start.as_u64();
    }
}

/// The peer's frames from per-CPU lists (`LockedFrameAllocator::with_cpus`, the frame
/// rows' `percpu`), as a kernel would give it the allocator it gives the manager,
/// scattered as [`fragmented_frames`] scatters the others'. The manager keeps frames
/// of its own per CPU on top of whatever source it has; this peer gets the lists.
fn percpu_frames(machine: &'static SimMachine) -> LockedFrameAllocator<'static> {
    let map = machine.memory_map().to_vec();
    let words = BitmapFrameAllocator::storage_words(map.iter().cloned());
    let storage = Vec::leak(vec![0; words]);
    let mut bitmap = BitmapFrameAllocator::with_storage(map, storage).unwrap();
    let mut all =
        vec![PhysFrame::containing_address(PhysAddr::zero()); bitmap.stats().free as usize];
    let taken = bitmap.alloc_bulk(&mut all);
    all.truncate(taken);
    Rng::new(17).shuffle(&mut all);
    // SAFETY: taken above and never used.
    unsafe { bitmap.free_bulk(&all[..taken / 2]) }.unwrap();
    LockedFrameAllocator::with_cpus(bitmap, machine)
}

fn vmalloc_vfree(c: &mut Criterion) {
    let machine = machine();
    let frames = fragmented_frames(&machine);
    // SAFETY: the machine's page tables serve this manager alone, and its flush reaches every CPU that runs.
    let default = unsafe { manager(&machine, &frames, false) };
    let eager_machine = self::machine();
    let eager_frames = fragmented_frames(&eager_machine);
    // SAFETY: the machine's page tables serve this manager alone, and its flush reaches every CPU that runs.
    let eager = unsafe { manager(&eager_machine, &eager_frames, true) };
    let locked_machine = self::machine();
    let locked_frames = fragmented_frames(&locked_machine);
    // SAFETY: the machine's page tables serve this manager alone, and its flush reaches every CPU that runs.
    let locked = unsafe { locked_manager(&locked_machine, &locked_frames, false) };
    let peer_machine = self::machine();
    let peer_frames = fragmented_frames(&peer_machine);
    let mut peer = PeerVmalloc::new(&peer_machine, &peer_frames);
    // The same peer as a kernel shares it between CPUs: behind one spin lock, as
    // blog_os keeps its mapper and frame allocator.
    let shared_machine = self::machine();
    let shared_frames = fragmented_frames(&shared_machine);
    let shared_peer = spin::Mutex::new(PeerVmalloc::new(&shared_machine, &shared_frames));
    let listed_machine: &'static SimMachine = Box::leak(Box::new(self::machine()));
    let listed_frames = percpu_frames(listed_machine);
    let mut listed_peer = PeerVmalloc::new(listed_machine, &listed_frames);

    let mut group = c.benchmark_group("vmalloc_vfree");
    for pages in [1u64, 16, 256, 4096] {
        group.throughput(Throughput::Elements(pages));
        group.bench_with_input(BenchmarkId::new("default", pages), &pages, |b, &p| {
            b.iter(|| fix_size_alloc(&default, p))
        });
        group.bench_with_input(BenchmarkId::new("eager", pages), &pages, |b, &p| {
            b.iter(|| fix_size_alloc(&eager, p))
        });
        group.bench_with_input(BenchmarkId::new("locked", pages), &pages, |b, &p| {
            b.iter(|| fix_size_alloc(&locked, p))
        });
        group.bench_with_input(BenchmarkId::new("x86_64_map_to", pages), &pages, |b, &p| {
            b.iter(|| {
                let start = peer.vmalloc(p);
                peer.vfree(start, p);
            })
        });
        group.bench_with_input(
            BenchmarkId::new("x86_64_map_to_percpu_frames", pages),
            &pages,
            |b, &p| {
                b.iter(|| {
                    let start = listed_peer.vmalloc(p);
                    listed_peer.vfree(start, p);
                })
            },
        );
        group.bench_with_input(
            BenchmarkId::new("x86_64_map_to_locked", pages),
            &pages,
            |b, &p| {
                b.iter(|| {
                    let start = shared_peer.lock().vmalloc(p);
                    shared_peer.lock().vfree(start, p);
                })
            },
        );
    }
    group.finish();

    // The peer's floor for one page: a bare map_to + unmap of a frame it already has.
    let frame = peer_frames.alloc_frame().unwrap();
    let page = Page::containing_address(VirtAddr::new(PEER_START));
    c.bench_function("x86_64_bare_map_to_unmap_1_page", |b| {
        b.iter(|| {
            // SAFETY: the page is unused between iterations; the frame is ours.
            unsafe {
                peer.mapper
                    .map_to(page, frame, FLAGS, &mut MapperFrames(&peer_frames))
            }
            .unwrap()
            .ignore();
            peer.mapper.unmap(page).unwrap().1.ignore();
        })
    });
}

/// 64 MiB `vzalloc`+`vfree`+purge, mapped with 4 KiB pages and with 2 MiB ones
/// (`VmFlags::HUGE`), on a 1 GiB machine whose frames are not fragmented, so 2 MiB
/// runs exist; and the same with `vmalloc`, which leaves the memory as it was, so
/// the mapping work shows without the 64 MiB of zeroing. Prints the page-table
/// frames each needs.
fn huge_vzalloc(c: &mut Criterion) {
    const SIZE: usize = 64 << 20;
    let machine = machine();
    let frames = machine.frames();
    // SAFETY: the machine's page tables serve this manager alone, and its flush reaches every CPU that runs.
    let vm = unsafe { manager(&machine, &frames, false) };
    for zero in [true, false] {
        let name = if zero { "vzalloc_64m" } else { "vmalloc_64m" };
        let plain = VmOptions {
            flags: if zero {
                VmFlags::ZERO
            } else {
                VmFlags::empty()
            },
            ..VmOptions::default()
        };
        let huge = VmOptions {
            flags: plain.flags | VmFlags::HUGE,
            ..plain
        };
        let mut group = c.benchmark_group(name);
        group.throughput(Throughput::Bytes(SIZE as u64));
        for (pages, options) in [("4k", plain), ("huge", huge)] {
            let tables = vm.stats().page_table_frames;
            let ptr = vm.vmalloc_with(SIZE, &options).unwrap();
            let stats = vm.stats();
            println!(
                "{name}/{pages}: {} page-table frames, {} 2 MiB mappings",
                stats.page_table_frames - tables,
                stats.huge_mappings
            );
            // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
            unsafe { vm.vfree(ptr.as_ptr()) }.unwrap();
            vm.purge();
            group.bench_function(pages, |b| {
                b.iter(|| {
                    let ptr = vm.vmalloc_with(SIZE, &options).unwrap();
                    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
                    unsafe { vm.vfree(ptr.as_ptr()) }.unwrap();
                    vm.purge();
                })
            });
        }
        group.finish();
    }
}

fn test_vmalloc_scenarios(c: &mut Criterion) {
    let machine = machine();
    let frames = fragmented_frames(&machine);
    // SAFETY: the machine's page tables serve this manager alone, and its flush reaches every CPU that runs.
    let vm = unsafe { manager(&machine, &frames, false) };
    let mut group = c.benchmark_group("test_vmalloc");
    group.bench_function("fix_size_alloc_1", |b| b.iter(|| fix_size_alloc(&vm, 1)));
    group.bench_function("fix_size_alloc_64", |b| b.iter(|| fix_size_alloc(&vm, 64)));
    group.bench_function("full_fit_alloc_100_pairs", |b| {
        b.iter(|| full_fit_alloc(&vm, 100))
    });
    let mut rng = Rng::new(1);
    group.bench_function("random_size_alloc", |b| {
        b.iter(|| random_size_alloc(&vm, &mut rng))
    });
    group.bench_function("fix_align_alloc", |b| b.iter(|| fix_align_alloc(&vm)));
    group.bench_function("random_size_align_alloc", |b| {
        b.iter(|| random_size_align_alloc(&vm, &mut rng))
    });
    group.bench_function("align_shift_alloc", |b| b.iter(|| align_shift_alloc(&vm)));
    let lent = frames_for_vmap(&frames, 64);
    group.bench_function("vm_map_ram_64", |b| b.iter(|| vm_map_ram(&vm, &lent)));
    let _busy = busy_list(&vm, 15_000);
    group.bench_function("long_busy_list_alloc", |b| {
        b.iter(|| long_busy_list_alloc(&vm))
    });
    group.finish();
}

/// 1-page vmalloc+vfree latency with 10 and with 100,000 other live areas, in the
/// default configuration and without the per-CPU caches.
fn latency_with_live_areas(c: &mut Criterion) {
    for (group, caches) in [("latency_1_page", true), ("latency_1_page_locked", false)] {
        let make = |machine: &'static SimMachine| {
            let frames: &'static SimFrames = Box::leak(Box::new(fragmented_frames(machine)));
            if caches {
                // SAFETY: the machine's page tables serve this manager alone, and its flush reaches every CPU that runs.
                unsafe { manager(machine, frames, false) }
            } else {
                // SAFETY: the machine's page tables serve this manager alone, and its flush reaches every CPU that runs.
                unsafe { locked_manager(machine, frames, false) }
            }
        };
        let mut group = c.benchmark_group(group);
        for live in [10usize, 100_000] {
            let vm = make(Box::leak(Box::new(machine())));
            let _busy = busy_list(&vm, live);
            group.bench_with_input(BenchmarkId::new("live_areas", live), &live, |b, _| {
                b.iter(|| fix_size_alloc(&vm, 1))
            });
        }
        // 200,000 allocations, every second one (1 to 5 pages) freed, then a purge:
        // 100,000 live 1-page areas with holes between them.
        let vm = make(Box::leak(Box::new(machine())));
        let mut rng = Rng::new(8);
        let mut live = Vec::with_capacity(100_000);
        for _ in 0..100_000 {
            live.push(vm.vmalloc(PAGE_SIZE as usize).unwrap());
            let hole = vm
                .vmalloc((1 + rng.below(5) as usize) * PAGE_SIZE as usize)
                .unwrap();
            // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
            unsafe { vm.vfree(hole.as_ptr()) }.unwrap();
        }
        vm.purge();
        group.bench_function("live_areas_with_holes/100000", |b| {
            b.iter(|| fix_size_alloc(&vm, 1))
        });
        group.finish();
    }
}

/// 1- and 16-page vmalloc+vfree pairs on 1, 2 and 4 threads sharing one manager,
/// thread i running as CPU i: total pairs per second. `shootdown`: the default
/// configuration flushing through a `Shootdown`, as an SMP kernel runs it (the CPUs
/// without a thread are offline, every running one takes the others' IPIs);
/// `local_only`: the same with flushes that reach the calling CPU alone, which no SMP
/// kernel has; `locked`: without the per-CPU caches, local flushes.
fn threads(c: &mut Criterion) {
    let machine = |cpus| SimConfig::new(1 << 30).with_cpus(cpus);
    let (smp, _, tlb) = smp_machine(machine(4));
    // No thread serves CPUs 1-3 outside the measured runs (which bring them online):
    // offline, a flush does not wait for them (the manager's teardown flushes, even
    // when a name filter selects none of this group's rows).
    (1..smp.cpu_count()).for_each(|cpu| smp.cpu(cpu).go_offline());
    let smp_frames: &'static SimFrames = Box::leak(Box::new(fragmented_frames(smp)));
    // SAFETY: the machine's page tables serve this manager alone, and its flush
    // reaches every online CPU.
    let shootdown = unsafe { manager_with(smp, smp_frames, tlb, VmallocConfig::default()) };
    let leak = |config| -> (&'static SimMachine, &'static SimFrames) {
        let machine: &'static SimMachine = Box::leak(Box::new(SimMachine::new(config)));
        (machine, Box::leak(Box::new(fragmented_frames(machine))))
    };
    let (local_machine, local_frames) = leak(machine(4));
    // SAFETY: the machine's page tables serve this manager alone, and its flush reaches every CPU that runs.
    let local_only = unsafe { manager(local_machine, local_frames, false) };
    let (locked_machine, locked_frames) = leak(machine(4));
    // SAFETY: the machine's page tables serve this manager alone, and its flush reaches every CPU that runs.
    let locked = unsafe { locked_manager(locked_machine, locked_frames, false) };
    let mut group = c.benchmark_group("vmalloc_threads");
    group.sample_size(10);
    for pages in [1u64, 16] {
        for count in [1u64, 2, 4] {
            group.throughput(Throughput::Elements(count));
            let mut run = |name: &str, machine: &'static SimMachine, pairs: &(dyn Fn() + Sync)| {
                let id = BenchmarkId::new(format!("{name}/pages{pages}"), count);
                group.bench_function(id, |b| {
                    b.iter_custom(|iters| on_cpus(machine, count as usize, iters, pairs))
                });
            };
            run("shootdown", smp, &|| fix_size_alloc(&shootdown, pages));
            run("local_only", local_machine, &|| {
                fix_size_alloc(&local_only, pages)
            });
            run("locked", locked_machine, &|| fix_size_alloc(&locked, pages));
        }
    }
    group.finish();
}

/// Runs `pair` `iters` times on each of `count` threads, thread i as CPU i of
/// `machine`, online while it runs; the other CPUs stay offline. Returns the time
/// until the last thread is done.
fn on_cpus(machine: &SimMachine, count: usize, iters: u64, pair: &(dyn Fn() + Sync)) -> Duration {
    (0..machine.cpu_count()).for_each(|cpu| machine.cpu(cpu).go_offline());
    let start = Instant::now();
    std::thread::scope(|scope| {
        for thread in 0..count {
            scope.spawn(move || {
                pin(thread);
                let cpu = machine.cpu(thread);
                cpu.enter();
                cpu.go_online();
                // Offline when done: the threads still running stop waiting for it.
                let _offline = cpu.offline_when_dropped();
                (0..iters).for_each(|_| pair());
            });
        }
    });
    let elapsed = start.elapsed();
    // The machine's CPU 0 (every later caller's) is online again.
    machine.cpu(0).go_online();
    elapsed
}

/// Pins the calling thread to host core `thread` modulo the cores there are, so the
/// scheduler does not put two measuring threads on one core while another idles.
fn pin(thread: usize) {
    if let Some(cores) = core_affinity::get_core_ids().filter(|cores| !cores.is_empty()) {
        core_affinity::set_for_current(cores[thread % cores.len()]);
    }
}

criterion_group!(
    benches,
    vmalloc_vfree,
    huge_vzalloc,
    test_vmalloc_scenarios,
    latency_with_live_areas,
    threads
);
criterion_main!(benches);
