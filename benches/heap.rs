//! The kernel heap against `linked_list_allocator::LockedHeap` alone on a fixed
//! region of the same size: many small objects with a few 1 MiB buffers; and against
//! `talc` and `LockedHeap` on a heap that has fragmented ("random actions": 10,000 live
//! blocks of 16-512 bytes, 1 in 64 up to 4 KiB; each step frees a random live block
//! and allocates one of a random size).
//!
//! The kernel heap runs in the simulated machine's host window, where the first touch
//! of a freshly mapped page is a host page fault; the large-buffer workload pays for
//! that, a real MMU would not (see the README). `heap_threads_large` runs the random
//! actions with 1 block in 50 of 4-256 KiB (the list heap's and vmalloc's sizes), on
//! 1 and 2 threads: its purges end in full TLB flushes, which must not cost the
//! small blocks' pages a host fault each, and its large blocks must not make the
//! threads wait for each other inside the heap.
//!
//! The kernel heap runs in the default configuration (`kernel_heap`: per-CPU slabs,
//! the manager's flush policy naming the simulated CPUs), with every slab call under
//! its class's lock (`kernel_heap_locked`), and, in the single-threaded rows, with
//! per-CPU slabs whose interrupt hooks cost what `cli`/`sti` cost on hardware
//! (`kernel_heap_flag_hooks`: a flag of the calling thread). The simulator's hooks
//! cost more than that: they count interrupt points, look for pending IPIs, and keep
//! a CPU to one thread at a time with interrupts off (a CPU one thread keeps running
//! is biased to it, a store and two loads; shared ones take a compare-and-swap); that
//! row shows the heap's own cost. `kernel_heap_sampled_1000` is the default configuration with one
//! slab-sized allocation in 1,000 sampled into the guarded pool (KFENCE: a page mapped
//! and filled at the allocation, checked, unmapped and flushed at the free), beside
//! `kernel_heap` with sampling off.
//!
//! `cargo bench --bench heap`

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use linked_list_allocator::LockedHeap;
use std::alloc::{GlobalAlloc, Layout};
use std::cell::Cell;
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use talc::TalcLock;
use talc::source::Claim;
use vmalloc::heap::{HeapConfig, KernelHeap};
use vmalloc::smp::{CpuSet, Cpus, IrqState};
use vmalloc::vmalloc::Vmalloc;
use vmalloc_sim::{Rng, SimConfig, SimFrames, SimMachine, SimPhys, TlbStats, scenarios};

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

/// Live blocks of the random-actions workload.
const LIVE: usize = 10_000;
/// Steps run before measuring, so every heap has fragmented.
const WARM_UP_STEPS: usize = 200_000;
/// Steps per measured iteration.
const STEPS: usize = 1000;

/// How a random-actions run picks the size of each block.
type Sizes = fn(&mut Rng) -> Layout;

/// A size of the random-actions workload: 16-512 bytes, 1 in 64 up to 4 KiB.
fn random_action_layout(rng: &mut Rng) -> Layout {
    let size = if rng.below(64) == 0 {
        16 + rng.below(4096 - 15)
    } else {
        16 + rng.below(512 - 15)
    };
    Layout::from_size_align(size as usize, 8).unwrap()
}

/// A size of the large-blocks workload: 16-512 bytes, 1 in 50 from 4 KiB to 256 KiB.
fn large_action_layout(rng: &mut Rng) -> Layout {
    let size = if rng.below(50) == 0 {
        (4 << 10) + rng.below((256 - 4) << 10)
    } else {
        16 + rng.below(512 - 15)
    };
    Layout::from_size_align(size as usize, 8).unwrap()
}

/// The live blocks of a random-actions run on one heap.
struct RandomActions<'h> {
    heap: &'h dyn GlobalAlloc,
    live: Vec<(*mut u8, Layout)>,
    rng: Rng,
    sizes: Sizes,
}

impl<'h> RandomActions<'h> {
    /// Fills `heap` with [`LIVE`] blocks and runs the warm-up.
    fn new(heap: &'h dyn GlobalAlloc) -> Self {
        let mut run = Self::with_live(heap, LIVE, 3, random_action_layout);
        run.steps(WARM_UP_STEPS);
        run
    }

    /// `live` blocks on `heap` with sizes from `sizes`, from `seed`.
    fn with_live(heap: &'h dyn GlobalAlloc, live: usize, seed: u64, sizes: Sizes) -> Self {
        let mut run = Self {
            heap,
            live: Vec::with_capacity(live),
            rng: Rng::new(seed),
            sizes,
        };
        for _ in 0..live {
            let layout = (run.sizes)(&mut run.rng);
            run.live.push((run.alloc(layout), layout));
        }
        run
    }

    fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: a non-zero size.
        let block = unsafe { self.heap.alloc(layout) };
        assert!(!block.is_null());
        // SAFETY: the block holds at least 16 bytes.
        unsafe { block.write(layout.size() as u8) };
        block
    }

    /// Frees a random live block and allocates a new one, `count` times.
    fn steps(&mut self, count: usize) {
        for _ in 0..count {
            let index = self.rng.below(self.live.len() as u64) as usize;
            let (block, layout) = self.live[index];
            // SAFETY: a live block of this heap with its layout.
            unsafe { self.heap.dealloc(black_box(block), layout) };
            let layout = (self.sizes)(&mut self.rng);
            self.live[index] = (self.alloc(layout), layout);
        }
    }

    fn live_bytes(&self) -> usize {
        self.live.iter().map(|(_, layout)| layout.size()).sum()
    }
}

impl Drop for RandomActions<'_> {
    fn drop(&mut self) {
        for &(block, layout) in &self.live {
            // SAFETY: live blocks of this heap with their layouts.
            unsafe { self.heap.dealloc(block, layout) };
        }
    }
}

/// `talc` on a leaked host region of `size` bytes.
fn talc_with_region(size: usize) -> TalcLock<spinning_top::RawSpinlock, Claim> {
    let region: &'static mut [u8] = Box::leak(vec![0u8; size].into_boxed_slice());
    // SAFETY: the region is leaked, so it lives as long as the heap, and only the heap
    // uses it.
    TalcLock::new(unsafe { Claim::new(region.as_mut_ptr(), size) })
}

fn random_actions(c: &mut Criterion, heaps: &Heaps, machine: &SimMachine) {
    let talc = talc_with_region(REGION);
    let list = LockedHeap::empty_with_region(REGION);
    let mut group = c.benchmark_group("heap_random_actions");
    group.throughput(Throughput::Elements(STEPS as u64));
    group.sample_size(10);
    {
        let mut run = RandomActions::new(&heaps.default);
        let stats = heaps.default.stats();
        eprintln!(
            "kernel_heap after {WARM_UP_STEPS} steps: {} live bytes, {} bytes of frames \
             (list window {} + slabs {}): {:.2} bytes of frames per live byte",
            run.live_bytes(),
            stats.mapped + stats.slab_bytes,
            stats.mapped,
            stats.slab_bytes,
            (stats.mapped + stats.slab_bytes) as f64 / run.live_bytes() as f64
        );
        group.bench_function("kernel_heap", |b| b.iter(|| run.steps(STEPS)));
    }
    {
        let mut run = RandomActions::new(&heaps.sampled);
        group.bench_function("kernel_heap_sampled_1000", |b| b.iter(|| run.steps(STEPS)));
        let stats = heaps.sampled.guarded_stats();
        eprintln!(
            "kernel_heap_sampled_1000: {} allocations sampled, {} live in the pool, {} \
             past a full pool",
            stats.sampled, stats.live, stats.pool_full
        );
    }
    for (name, heap) in [
        ("kernel_heap_locked", &heaps.locked),
        ("kernel_heap_flag_hooks", &heaps.flag_hooks),
    ] {
        let mut run = RandomActions::new(heap);
        group.bench_function(name, |b| b.iter(|| run.steps(STEPS)));
    }
    for (name, peer) in [
        ("talc", &talc as &dyn GlobalAlloc),
        ("linked_list_allocator", &list),
    ] {
        // Set up only if selected: the list heap's warm-up alone takes seconds.
        let mut run = None;
        group.bench_function(name, |b| {
            let run = run.get_or_insert_with(|| RandomActions::new(peer));
            b.iter(|| run.steps(STEPS))
        });
    }
    group.finish();
    threads(
        c,
        "shared",
        &[&heaps.locked],
        machine,
        random_action_layout,
        &[1, 2, 4],
    );
    threads(
        c,
        "per_cpu",
        &[&heaps.default],
        machine,
        random_action_layout,
        &[1, 2, 4],
    );
    threads(
        c,
        "large",
        &[&heaps.default],
        machine,
        large_action_layout,
        &[1, 2],
    );
    // The control: each thread with a `talc` of its own, so nothing is shared but the
    // machine (its caches and memory bandwidth).
    let talcs: Vec<_> = (0..4).map(|_| Padded(talc_with_region(REGION))).collect();
    let talcs: Vec<&(dyn GlobalAlloc + Sync)> =
        talcs.iter().map(|Padded(talc)| talc as _).collect();
    threads(
        c,
        "private_talc",
        &talcs,
        machine,
        random_action_layout,
        &[1, 2, 4],
    );
}

/// Full TLB flushes of CPUs `0..count`, and host-window fills (every CPU's counters
/// include them: CPU 0's).
fn machine_counts(machine: &SimMachine, count: usize) -> TlbStats {
    TlbStats {
        full_flushes: (0..count)
            .map(|cpu| machine.cpu(cpu).tlb_stats().full_flushes)
            .sum(),
        misses: machine.cpu(0).tlb_stats().misses,
        ..TlbStats::default()
    }
}

/// A value on cache lines of its own.
#[repr(align(128))]
struct Padded<T>(T);

/// Pins the calling thread to host core `cpu` modulo the cores there are, so the
/// scheduler does not put two measuring threads on one core while another idles.
fn pin(cpu: usize) {
    if let Some(cores) = core_affinity::get_core_ids().filter(|cores| !cores.is_empty()) {
        core_affinity::set_for_current(cores[cpu % cores.len()]);
    }
}

/// A random-actions run a thread owns, on cache lines of its own: the runs sit side by
/// side in one `Vec`, and a generator state shared by two threads' lines would make
/// the harness, not the heap, stop scaling.
#[repr(align(128))]
struct Owned<'h>(RandomActions<'h>);

// SAFETY: the blocks belong to one run, used by one thread at a time (behind a lock);
// the heap is `Sync`.
unsafe impl Send for Owned<'_> {}

/// Random-actions steps with sizes from `sizes` on each count of threads at once
/// (thread `i` runs as CPU `i`, pinned to a host core), each on its own 2,500 live
/// blocks from `heaps[i % heaps.len()]`: total steps per second. Prints what the
/// machine did meanwhile: full TLB flushes and host-window fills per 1,000 steps.
fn threads(
    c: &mut Criterion,
    name: &str,
    heaps: &[&(dyn GlobalAlloc + Sync)],
    machine: &SimMachine,
    sizes: Sizes,
    counts: &[usize],
) {
    let mut group = c.benchmark_group(format!("heap_threads_{name}"));
    group.sample_size(10);
    let on_cpu = |cpu: usize| {
        pin(cpu);
        machine.cpu(cpu).enter();
    };
    for &count in counts {
        // Each run is set up on the CPU that will run it, as a kernel thread would.
        let runs: Vec<std::sync::Mutex<Owned>> = std::thread::scope(|scope| {
            let setups: Vec<_> = (0..count)
                .map(|cpu| {
                    let heap = heaps[cpu % heaps.len()];
                    scope.spawn(move || {
                        on_cpu(cpu);
                        let mut run =
                            RandomActions::with_live(heap, LIVE / 4, cpu as u64 + 10, sizes);
                        run.steps(WARM_UP_STEPS / 4);
                        std::sync::Mutex::new(Owned(run))
                    })
                })
                .collect();
            setups
                .into_iter()
                .map(|setup| setup.join().unwrap())
                .collect()
        });
        group.throughput(Throughput::Elements((STEPS * count) as u64));
        let (before, steps) = (machine_counts(machine, count), AtomicU64::new(0));
        group.bench_function(format!("{count}"), |b| {
            b.iter_custom(|iters| {
                steps.fetch_add(iters * (STEPS * count) as u64, Ordering::Relaxed);
                let start = std::time::Instant::now();
                std::thread::scope(|scope| {
                    for (cpu, run) in runs.iter().enumerate() {
                        scope.spawn(move || {
                            on_cpu(cpu);
                            run.lock().unwrap().0.steps(iters as usize * STEPS)
                        });
                    }
                });
                start.elapsed()
            })
        });
        let (after, steps) = (machine_counts(machine, count), steps.into_inner());
        if steps == 0 {
            // Not selected.
            continue;
        }
        let per_k = |of: fn(&TlbStats) -> u64| {
            let happened = of(&after) - of(&before);
            happened as f64 * 1000.0 / steps as f64
        };
        eprintln!(
            "heap_threads_{name}/{count}: per 1,000 steps, {:.2} full flushes and {:.1} \
             host-window fills",
            per_k(|stats| stats.full_flushes),
            per_k(|stats| stats.misses),
        );
    }
    group.finish();
}

fn bench(c: &mut Criterion) {
    let machine = SimMachine::new(
        SimConfig::new(512 << 20)
            .with_cpus(4)
            .with_scatter_seed(1)
            .with_host_window(4 << 30),
    );
    let frames = machine.frames();
    // SAFETY: the machine's page tables serve this manager alone, and its flush reaches every CPU that runs.
    let manager: Manager = unsafe { scenarios::window_manager(&machine, &frames, &machine) };
    let config = HeapConfig {
        window: REGION,
        ..HeapConfig::DEFAULT
    };
    let heaps = Heaps {
        default: KernelHeap::new(config),
        locked: KernelHeap::new(HeapConfig {
            per_cpu: false,
            ..config
        }),
        flag_hooks: KernelHeap::new(HeapConfig {
            per_cpu: false,
            ..config
        }),
        sampled: KernelHeap::new(HeapConfig {
            sample_interval: 1000,
            ..config
        }),
    };
    for heap in [
        &heaps.default,
        &heaps.locked,
        &heaps.flag_hooks,
        &heaps.sampled,
    ] {
        heap.init(&manager).unwrap();
    }
    heaps.flag_hooks.use_cpus(&FlagCpu);
    let peer = LockedHeap::empty_with_region(REGION);
    let mut held = Vec::with_capacity(OPS);
    for (name, large) in [("heap_mixed", true), ("heap_small_only", false)] {
        let layouts = layouts(large);
        let mut group = c.benchmark_group(name);
        group.throughput(Throughput::Elements(
            round(&peer, &layouts, &mut held) as u64
        ));
        for (name, heap) in [
            ("kernel_heap", &heaps.default),
            ("kernel_heap_locked", &heaps.locked),
            ("kernel_heap_flag_hooks", &heaps.flag_hooks),
        ] {
            group.bench_function(name, |b| b.iter(|| round(heap, &layouts, &mut held)));
        }
        group.bench_function("linked_list_allocator", |b| {
            b.iter(|| round(&peer, &layouts, &mut held))
        });
        group.finish();
    }
    random_actions(c, &heaps, &machine);
}

/// The kernel heaps each workload runs on, over one manager.
struct Heaps<'m> {
    /// The default configuration: per-CPU slabs on the simulated CPUs.
    default: KernelHeap<'m>,
    /// Every slab call under its class's lock.
    locked: KernelHeap<'m>,
    /// Per-CPU slabs on [`FlagCpu`]: the single-threaded rows only.
    flag_hooks: KernelHeap<'m>,
    /// The default configuration sampling 1 slab-sized allocation in 1,000 into the
    /// guarded pool.
    sampled: KernelHeap<'m>,
}

std::thread_local! {
    /// Whether the calling thread holds interrupts off, as [`FlagCpu`] models it.
    static INTERRUPTS_OFF: Cell<bool> = const { Cell::new(false) };
}

/// One CPU whose interrupt hooks cost what `pushf; cli` and `sti` cost: a flag of the
/// calling thread, where the simulator's also keep a CPU to one host thread at a
/// time (its model lets several run as one CPU). Only the bench's main thread uses
/// it.
struct FlagCpu;

// SAFETY: one CPU, index 0, which only the bench's main thread runs on (host
// threads take no interrupts and the heap using it is touched by no other thread);
// no IPIs are needed.
unsafe impl Cpus for FlagCpu {
    fn current(&self) -> usize {
        0
    }
    fn online(&self) -> CpuSet {
        CpuSet::first(1)
    }
    fn send_ipi(&self, _: CpuSet) {}
    fn irq_save(&self) -> IrqState {
        IrqState::new(u64::from(!INTERRUPTS_OFF.replace(true)))
    }
    fn irq_restore(&self, state: IrqState) {
        if state.bits() & 1 != 0 {
            INTERRUPTS_OFF.set(false);
        }
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
