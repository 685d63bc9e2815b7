//! A global allocator that builds the simulated machine inside the process's very
//! first allocation, before `main`: the Rust runtime reads the default SIGSEGV
//! disposition, allocates (the machine installs its host-window handler), then
//! installs its own stack-overflow handler over it. The machine must notice and put
//! its handler back in front, chaining to the runtime's, before the heap's first
//! touch of a fresh window page.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use vmalloc::heap::{HeapConfig, KernelHeap};
use vmalloc::vmalloc::Vmalloc;
use vmalloc_sim::scenarios;
use vmalloc_sim::{RoutedHeap, SimConfig, SimFrames, SimMachine};

static HEAP: KernelHeap<'static> = KernelHeap::new(HeapConfig {
    window: 256 << 20,
    ..HeapConfig::DEFAULT
});

static MACHINE: std::sync::OnceLock<&'static SimMachine> = std::sync::OnceLock::new();
/// Whether the runtime's handler was not yet installed when the machine was built:
/// the order this test is about.
static BUILT_BEFORE_RUNTIME: AtomicBool = AtomicBool::new(false);

type Manager = Vmalloc<&'static SimFrames, vmalloc_sim::SimPhys<'static>, &'static SimMachine>;

/// Builds the machine, its manager and the heap; allocations made meanwhile go to
/// the system allocator.
fn build() -> &'static SimMachine {
    // SAFETY: all-zero is a valid `sigaction`; the call only reads the disposition.
    let disposition = unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        libc::sigaction(libc::SIGSEGV, std::ptr::null(), &mut action);
        action.sa_sigaction
    };
    BUILT_BEFORE_RUNTIME.store(disposition == libc::SIG_DFL, Ordering::Relaxed);
    let machine: &'static SimMachine = Box::leak(Box::new(SimMachine::new(
        SimConfig::new(256 << 20)
            .with_scatter_seed(5)
            .with_host_window(4 << 30),
    )));
    let frames: &'static SimFrames = Box::leak(Box::new(machine.frames()));
    // SAFETY: the machine's page tables serve this manager alone, and its flush reaches every CPU that runs.
    let manager = unsafe { scenarios::window_manager(machine, frames, machine) };
    let manager: &'static Manager = Box::leak(Box::new(manager));
    HEAP.init(manager).unwrap();
    let _ = MACHINE.set(machine);
    machine
}

/// Builds the machine inside the process's first allocation, before `main`.
#[global_allocator]
// SAFETY: `build` initialises the heap over the machine it returns.
static GLOBAL: RoutedHeap = unsafe { RoutedHeap::building(&HEAP, build) };

#[test]
fn a_machine_built_before_main_keeps_serving_its_window() {
    assert!(GLOBAL.is_ready(), "built before the test");
    assert!(
        BUILT_BEFORE_RUNTIME.load(Ordering::Relaxed),
        "the machine was built before the runtime installed its SIGSEGV handler"
    );
    // Fresh window pages of every path: slabs of many classes, the list heap, and
    // areas of their own.
    let mut text = String::new();
    for i in 0..20_000 {
        text.push_str(&i.to_string());
    }
    let boxes: Vec<Box<[u8]>> = (1..=300)
        .map(|i| vec![i as u8; i * 37].into_boxed_slice())
        .collect();
    let map: BTreeMap<u32, u64> = (0..50_000).map(|i| (i, u64::from(i) * 3)).collect();
    let big: Vec<u64> = (0..(1 << 20)).collect();
    assert!(GLOBAL.owns(text.as_ptr()) && GLOBAL.owns(big.as_ptr().cast()));
    assert!(text.starts_with("0123456789101112"));
    assert!(
        boxes
            .iter()
            .enumerate()
            .all(|(i, b)| b.len() == (i + 1) * 37 && b.iter().all(|&x| x == (i + 1) as u8))
    );
    assert_eq!(map[&49_999], 149_997);
    assert_eq!(big.iter().sum::<u64>(), (1 << 20) * ((1 << 20) - 1) / 2);
    let machine = MACHINE.get().expect("built");
    assert!(machine.host_window_handler_installed());
}

/// Recurses until the stack runs out.
fn overflow(depth: u64) -> u64 {
    let frame = std::hint::black_box([depth; 64]);
    if frame[0] == u64::MAX {
        return 0;
    }
    overflow(depth + 1) + frame[7]
}

#[test]
#[ignore = "run by faults_outside_the_window_still_reach_the_runtime, in a child"]
fn overflow_the_stack() {
    std::thread::spawn(|| overflow(0)).join().unwrap();
}

#[test]
fn faults_outside_the_window_still_reach_the_runtime() {
    // A child of this same binary (so its machine is built before main too)
    // overflows a thread's stack: the runtime's handler, now behind the machine's,
    // must still name it.
    let child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "overflow_the_stack", "--nocapture"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&child.stderr);
    assert!(!child.status.success());
    assert!(stderr.contains("has overflowed its stack"), "{stderr}");
}
