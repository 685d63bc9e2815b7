//! A whole host program on the kernel heap: this binary's `#[global_allocator]`
//! builds a simulated machine, its vmalloc manager and a `KernelHeap` inside the
//! process's first allocation, and from then on serves every allocation of the
//! process (criterion's own included) from the heap, in the machine's host window.
//! A flag switches new allocations to `std::alloc::System` for the rows measured
//! against it; a block is always freed (or resized) by the allocator that made it,
//! told apart by address: the window belongs to the kernel heap.
//!
//! Rows, each against the system allocator in the same run:
//!
//! - `host_json`: parse a 20 MB JSON document (generated in-process from a fixed
//!   seed) into a `serde_json::Value` and serialize it back to a `String`.
//! - `host_threads_large`: 8 threads (8 CPUs of the machine, each thread its own),
//!   each with 2,500 live boxes; each step frees a random one and allocates one
//!   written whole: 16-512 bytes, 1 in 50 of 16-256 KiB (vmalloc's sizes).
//!
//! After each group it prints the ratio of the kernel heap's median to the system
//! allocator's, and the goal for it (1.5x for `host_json`, 2x for
//! `host_threads_large`), and after each kernel-heap row the host-window fills and
//! full TLB flushes it cost. The machine's window counts only the host mappings its
//! pages make ([`SimConfig::with_host_window_by_mappings`]), so the document's
//! working set of some 200 MiB stays mapped.
//!
//! `cargo bench --bench host_program` (a group alone: `-- host_json`).

use criterion::{Criterion, SamplingMode, Throughput};
use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use vmalloc::heap::{HeapConfig, KernelHeap};
use vmalloc::vmalloc::Vmalloc;
use vmalloc_sim::{Rng, SimConfig, SimFrames, SimMachine, SimPhys, scenarios};

/// CPUs of the machine: one per thread of `host_threads_large`.
const CPUS: usize = 8;

static HEAP: KernelHeap<'static> = KernelHeap::new(HeapConfig::DEFAULT);

const UNBUILT: u8 = 0;
const BUILDING: u8 = 1;
const READY: u8 = 2;
static STATE: AtomicU8 = AtomicU8::new(UNBUILT);
/// Set: new blocks come from the system allocator.
static USE_SYSTEM: AtomicBool = AtomicBool::new(false);
static WINDOW_START: AtomicU64 = AtomicU64::new(0);
static WINDOW_SIZE: AtomicU64 = AtomicU64::new(0);
static MACHINE: std::sync::OnceLock<&'static SimMachine> = std::sync::OnceLock::new();

type Manager = Vmalloc<&'static SimFrames, SimPhys<'static>, &'static SimMachine>;

/// Whether the kernel heap made `ptr`: the manager's region is the host window.
/// The size is published last and read first, so a reader that sees it sees the
/// start too.
fn in_window(ptr: *const u8) -> bool {
    let size = WINDOW_SIZE.load(Ordering::Acquire);
    (ptr as u64).wrapping_sub(WINDOW_START.load(Ordering::Acquire)) < size
}

/// Builds the machine, its manager and the heap, inside the process's first
/// allocation; allocations made meanwhile (the machine's own bookkeeping) come from
/// the system allocator (the state is `BUILDING`).
fn build() {
    let machine: &'static SimMachine = Box::leak(Box::new(SimMachine::new(
        SimConfig::new(2 << 30)
            .with_cpus(CPUS)
            .with_host_window(64 << 30)
            .with_host_window_by_mappings(),
    )));
    let frames: &'static SimFrames = Box::leak(Box::new(machine.frames()));
    // SAFETY: the machine's page tables serve this manager alone, and its flush reaches every CPU that runs.
    let manager = unsafe { scenarios::window_manager(machine, frames, machine) };
    let manager: &'static Manager = Box::leak(Box::new(manager));
    HEAP.init(manager).expect("the heap's window");
    // Per-CPU magazines: host threads run as the CPU they entered, CPU 0 unless they
    // entered another.
    HEAP.use_cpus(machine);
    let _ = MACHINE.set(machine);
    let (start, size) = machine.host_window().expect("a window");
    WINDOW_START.store(start.as_u64(), Ordering::Release);
    WINDOW_SIZE.store(size, Ordering::Release);
}

/// The kernel heap, or the system allocator while [`USE_SYSTEM`] is set.
struct Switch;

impl Switch {
    /// Whether new blocks come from the kernel heap; builds it on first use.
    fn heap_serves(&self) -> bool {
        let mut state = STATE.load(Ordering::Acquire);
        if state == UNBUILT
            && STATE
                .compare_exchange(UNBUILT, BUILDING, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            build();
            STATE.store(READY, Ordering::Release);
            state = READY;
        }
        state == READY && !USE_SYSTEM.load(Ordering::Relaxed)
    }
}

// SAFETY: every block is freed and resized by the allocator that made it, told apart
// by address; each forwards the caller's promises.
unsafe impl GlobalAlloc for Switch {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded from the caller.
        unsafe {
            if self.heap_serves() {
                HEAP.alloc(layout)
            } else {
                System.alloc(layout)
            }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded from the caller.
        unsafe {
            if self.heap_serves() {
                HEAP.alloc_zeroed(layout)
            } else {
                System.alloc_zeroed(layout)
            }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded from the caller; the address says who made the block.
        unsafe {
            if in_window(ptr) {
                HEAP.dealloc(ptr, layout)
            } else {
                System.dealloc(ptr, layout)
            }
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded from the caller; a block stays with the allocator that
        // made it.
        unsafe {
            if in_window(ptr) {
                HEAP.realloc(ptr, layout, new_size)
            } else {
                System.realloc(ptr, layout, new_size)
            }
        }
    }
}

#[global_allocator]
static GLOBAL: Switch = Switch;

/// Who serves new blocks in a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Allocator {
    KernelHeap,
    System,
}

impl Allocator {
    /// The rows in the order they run: the system allocator's first, in a process
    /// whose host window has few mappings yet (tens of thousands of them after the
    /// kernel heap's row make every host `mmap` and page fault of the system
    /// allocator's slower: 317 against 230 ms per `host_json` round trip).
    const BOTH: [Allocator; 2] = [Allocator::System, Allocator::KernelHeap];

    fn name(self) -> &'static str {
        match self {
            Allocator::KernelHeap => "kernel_heap",
            Allocator::System => "system",
        }
    }

    /// Runs `f` with new blocks from this allocator: the row's setup, its
    /// measurement and criterion's analysis of it; the allocator before serves again
    /// after.
    fn serve<R>(self, f: impl FnOnce() -> R) -> R {
        let before = USE_SYSTEM.swap(self == Allocator::System, Ordering::Relaxed);
        let result = f();
        USE_SYSTEM.store(before, Ordering::Relaxed);
        result
    }
}

/// Per-iteration times of one row's `iter_custom` calls, the last `SAMPLES` of which
/// are criterion's samples.
#[derive(Default)]
struct Samples(Vec<Duration>);

impl Samples {
    fn record(&mut self, iters: u64, elapsed: Duration) {
        self.0.push(elapsed / iters.max(1) as u32);
    }

    /// The median of the last `count` per-iteration times: criterion's median.
    fn median(&self, count: usize) -> Option<Duration> {
        let start = self.0.len().checked_sub(count)?;
        let mut last = self.0[start..].to_vec();
        last.sort();
        Some(last[last.len() / 2])
    }
}

const SAMPLES: usize = 10;

/// Prints the kernel heap's median against the system allocator's, if both ran.
fn compare(row: &str, goal: f64, kernel: &Samples, system: &Samples) {
    if let (Some(kernel), Some(system)) = (kernel.median(SAMPLES), system.median(SAMPLES)) {
        let ratio = kernel.as_secs_f64() / system.as_secs_f64();
        eprintln!(
            "{row}: kernel heap {kernel:.2?}, system {system:.2?} (medians): {ratio:.2}x \
             (goal {goal}x: {})",
            if ratio <= goal { "met" } else { "missed" }
        );
    }
}

/// The machine's host-window fills and full TLB flushes so far.
fn machine_counts() -> (u64, u64) {
    let machine = MACHINE.get().expect("built");
    let full = (0..CPUS)
        .map(|cpu| machine.cpu(cpu).tlb_stats().full_flushes)
        .sum();
    (machine.cpu(0).tlb_stats().misses, full)
}

/// A JSON document of about `bytes` bytes, the same for the same seed: an array of
/// user records with strings, numbers, booleans, nested objects and arrays, as
/// `serde_json` writes it (so it serializes back to itself).
fn document(bytes: usize, seed: u64) -> String {
    use serde_json::{Value, json};
    const WORDS: [&str; 16] = [
        "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india",
        "juliet", "kilo", "lima", "mike", "november", "oscar", "papa",
    ];
    let mut rng = Rng::new(seed);
    let word = |rng: &mut Rng| WORDS[rng.below(16) as usize];
    let mut records = Vec::new();
    let mut size = 0;
    while size < bytes {
        let id = records.len() as u64;
        let about: Vec<&str> = (0..8 + rng.below(24)).map(|_| word(&mut rng)).collect();
        let friends: Vec<Value> = (0..rng.below(6))
            .map(|_| json!({ "id": rng.below(1 << 20), "name": word(&mut rng) }))
            .collect();
        let record = json!({
            "id": id,
            "guid": format!("{:016x}-{:08x}", rng.next_u64(), rng.below(1 << 32)),
            "active": rng.below(2) == 0,
            "balance": rng.below(1_000_000) as f64 / 100.0,
            "name": format!("{} {}", word(&mut rng), word(&mut rng)),
            "email": format!("user{id}@{}.example", word(&mut rng)),
            "tags": (0..rng.below(8)).map(|_| word(&mut rng)).collect::<Vec<_>>(),
            "address": {
                "street": format!("{} {} street", rng.below(1000), word(&mut rng)),
                "zip": format!("{:05}", rng.below(100_000)),
                "location": [rng.below(180_000) as f64 / 1000.0, rng.below(90_000) as f64 / 1000.0],
            },
            "friends": friends,
            "about": about.join(" "),
        });
        size += serde_json::to_string(&record).expect("serializable").len() + 1;
        records.push(record);
    }
    serde_json::to_string(&Value::Array(records)).expect("serializable")
}

/// Bytes of the JSON document, about.
const DOCUMENT: usize = 20 << 20;

/// Parses `doc` and serializes it back; the output's length.
fn round_trip(doc: &str) -> usize {
    let value: serde_json::Value = serde_json::from_str(doc).expect("valid JSON");
    let text = serde_json::to_string(&value).expect("serializable");
    black_box(&value);
    text.len()
}

fn json(c: &mut Criterion) {
    let mut doc = None;
    let mut group = c.benchmark_group("host_json");
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(SAMPLES)
        .measurement_time(Duration::from_secs(20))
        .throughput(Throughput::Bytes(DOCUMENT as u64));
    let mut samples = [Samples::default(), Samples::default()];
    for (allocator, samples) in Allocator::BOTH.into_iter().zip(&mut samples) {
        allocator.serve(|| {
            let before = machine_counts();
            let mut checked = false;
            group.bench_function(allocator.name(), |b| {
                // Made only if selected, once for both rows, by the system allocator:
                // the input is not what is measured, and neither row may pay for the
                // other's memory (the window's fills of the document's pages).
                let doc =
                    doc.get_or_insert_with(|| Allocator::System.serve(|| document(DOCUMENT, 1)));
                if !checked {
                    // The parsed records come from this row's allocator, and they
                    // serialize back to the document.
                    let value: serde_json::Value = serde_json::from_str(doc).expect("valid JSON");
                    assert_eq!(
                        in_window(value_ptr(&value)),
                        allocator == Allocator::KernelHeap
                    );
                    assert!(serde_json::to_string(&value).expect("serializable") == *doc);
                    checked = true;
                }
                b.iter_custom(|iters| {
                    let start = Instant::now();
                    for _ in 0..iters {
                        assert_eq!(round_trip(black_box(doc)), doc.len());
                    }
                    let elapsed = start.elapsed();
                    samples.record(iters, elapsed);
                    elapsed
                })
            });
            print_counts("host_json", allocator, before, samples.0.len());
        });
    }
    group.finish();
    compare("host_json", 1.5, &samples[1], &samples[0]);
}

/// Where a parsed document's array of records lives.
fn value_ptr(value: &serde_json::Value) -> *const u8 {
    value.as_array().expect("an array").as_ptr().cast()
}

/// Host-window fills and full flushes during a row, per `iter_custom` call.
fn print_counts(row: &str, allocator: Allocator, before: (u64, u64), calls: usize) {
    if allocator == Allocator::KernelHeap && calls > 0 {
        let after = machine_counts();
        let stats = HEAP.stats();
        eprintln!(
            "{row}/kernel_heap: {} host-window fills, {} full flushes over the row; \
             heap: {} MiB in use, {} large blocks",
            after.0 - before.0,
            after.1 - before.1,
            stats.in_use >> 20,
            stats.large_blocks,
        );
    }
}

/// Live boxes per thread in `host_threads_large`.
const LIVE: usize = 2500;
/// Steps per thread before measuring, so the heap has fragmented.
const WARM_UP_STEPS: usize = 50_000;
/// Steps per thread per measured iteration.
const STEPS: usize = 1000;

/// One thread's boxes, on cache lines of its own.
#[repr(align(128))]
struct Ring {
    live: Vec<Box<[u8]>>,
    rng: Rng,
}

impl Ring {
    fn new(seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let live = (0..LIVE).map(|_| Self::block(&mut rng)).collect();
        Self { live, rng }
    }

    /// A box written whole: 16-512 bytes, 1 in 50 of 16-256 KiB.
    fn block(rng: &mut Rng) -> Box<[u8]> {
        let size = if rng.below(50) == 0 {
            (16 << 10) + rng.below((256 - 16) << 10)
        } else {
            16 + rng.below(512 - 15)
        };
        vec![size as u8 | 1; size as usize].into_boxed_slice()
    }

    /// Frees a random box and allocates another, `count` times.
    fn steps(&mut self, count: usize) {
        for _ in 0..count {
            let index = self.rng.below(self.live.len() as u64) as usize;
            let fresh = Self::block(&mut self.rng);
            let old = std::mem::replace(&mut self.live[index], fresh);
            assert_eq!(old[old.len() - 1], old.len() as u8 | 1);
        }
    }
}

/// Pins the calling thread to host core `cpu` modulo the cores there are.
fn pin(cpu: usize) {
    if let Some(cores) = core_affinity::get_core_ids().filter(|cores| !cores.is_empty()) {
        core_affinity::set_for_current(cores[cpu % cores.len()]);
    }
}

/// Runs `work(cpu)` on `CPUS` threads, thread `cpu` as that CPU of the machine,
/// pinned to a host core.
fn on_cpus<R: Send>(work: impl Fn(usize) -> R + Sync) -> Vec<R> {
    let machine = MACHINE.get().expect("built");
    std::thread::scope(|scope| {
        let work = &work;
        let threads: Vec<_> = (0..CPUS)
            .map(|cpu| {
                scope.spawn(move || {
                    pin(cpu);
                    machine.cpu(cpu).enter();
                    work(cpu)
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|thread| thread.join().expect("no panic"))
            .collect()
    })
}

fn threads(c: &mut Criterion) {
    let mut group = c.benchmark_group("host_threads_large");
    group
        .sample_size(SAMPLES)
        .throughput(Throughput::Elements((STEPS * CPUS) as u64));
    let mut samples = [Samples::default(), Samples::default()];
    for (allocator, samples) in Allocator::BOTH.into_iter().zip(&mut samples) {
        allocator.serve(|| {
            let mut rings = None;
            let before = machine_counts();
            group.bench_function(allocator.name(), |b| {
                // Made only if selected, each ring on the CPU that runs it, as a
                // kernel thread would.
                let rings = rings.get_or_insert_with(|| {
                    let rings: Vec<Mutex<Ring>> = on_cpus(|cpu| {
                        let mut ring = Ring::new(cpu as u64 + 10);
                        ring.steps(WARM_UP_STEPS);
                        Mutex::new(ring)
                    });
                    let in_heap = rings.iter().all(|ring| {
                        let ring = ring.lock().unwrap();
                        ring.live.iter().all(|b| in_window(b.as_ptr()))
                    });
                    assert_eq!(in_heap, allocator == Allocator::KernelHeap);
                    rings
                });
                b.iter_custom(|iters| {
                    let start = Instant::now();
                    on_cpus(|cpu| rings[cpu].lock().unwrap().steps(iters as usize * STEPS));
                    let elapsed = start.elapsed();
                    samples.record(iters, elapsed);
                    elapsed
                })
            });
            print_counts("host_threads_large", allocator, before, samples.0.len());
            drop(rings);
        });
    }
    group.finish();
    compare("host_threads_large", 2.0, &samples[1], &samples[0]);
}

fn main() {
    assert_eq!(STATE.load(Ordering::Acquire), READY, "built before main");
    // The runtime installed its SIGSEGV handler over the window's after the first
    // allocation; the machine's next call (any heap call is one) put its own back
    // in front.
    let args: Vec<String> = std::env::args().collect();
    assert!(in_window(args.as_ptr().cast()));
    let machine = MACHINE.get().expect("built");
    assert!(
        machine.host_window_handler_installed(),
        "the window's SIGSEGV handler is in front of the runtime's"
    );
    // Criterion asks `cargo metadata` for the target directory and reads its output
    // into a fresh buffer: the host kernel's writes into window pages not host-mapped
    // yet fail with EFAULT rather than fault, so that buffer comes from the system.
    let mut c = Allocator::System.serve(|| Criterion::default().configure_from_args());
    json(&mut c);
    threads(&mut c);
    c.final_summary();
}
