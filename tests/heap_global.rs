//! The kernel heap as this test binary's `#[global_allocator]`: once it is
//! initialised, every `String`, `BTreeMap`, `Vec` and `Box` of the process (the test
//! harness's included) lives in vmalloc memory of a simulated machine.
//!
//! The machine, its frame source and the vmalloc manager are built, and leaked, while
//! the allocator still forwards to the system allocator; blocks are routed back by
//! address, so system blocks made before the switch are freed where they came from.

use std::collections::BTreeMap;
use vmalloc::heap::{HeapConfig, KernelHeap};
use vmalloc::vmalloc::Vmalloc;
use vmalloc_sim::scenarios;
use vmalloc_sim::{RoutedHeap, SimConfig, SimFrames, SimMachine};

static HEAP: KernelHeap<'static> = KernelHeap::new(HeapConfig {
    window: 512 << 20,
    ..HeapConfig::DEFAULT
});

/// The system allocator until the switch, the kernel heap from then on.
#[global_allocator]
static GLOBAL: RoutedHeap = RoutedHeap::new(&HEAP);

type Manager = Vmalloc<&'static SimFrames, vmalloc_sim::SimPhys<'static>, &'static SimMachine>;

fn switch_to_the_kernel_heap() -> &'static Manager {
    let machine: &'static SimMachine = Box::leak(Box::new(SimMachine::new(
        SimConfig::new(256 << 20)
            .with_scatter_seed(3)
            .with_host_window(4 << 30),
    )));
    let frames: &'static SimFrames = Box::leak(Box::new(machine.frames()));
    // SAFETY: the machine's page tables serve this manager alone, and its flush reaches every CPU that runs.
    let manager = unsafe { scenarios::window_manager(machine, frames, machine) };
    let manager: &'static Manager = Box::leak(Box::new(manager));
    HEAP.init(manager).unwrap();
    // SAFETY: the heap was initialised over this machine's window just above.
    unsafe { GLOBAL.route(machine) };
    manager
}

#[test]
fn std_collections_live_in_vmalloc_memory() {
    // A heap that deadlocks (a lock taken again from inside the allocator) fails by
    // name: the watchdog's thread exists before the switch, and reports without
    // allocating.
    vmalloc_sim::watchdog(
        "std_collections_live_in_vmalloc_memory",
        vmalloc_sim::DEADLOCK_LIMIT,
        collections_in_vmalloc_memory,
    );
}

fn collections_in_vmalloc_memory() {
    let manager = switch_to_the_kernel_heap();

    let mut text = String::from("vmalloc");
    for i in 0..1000 {
        text.push_str(&i.to_string());
    }
    assert!(GLOBAL.owns(text.as_mut_ptr()));
    assert!(text.starts_with("vmalloc0123"));

    let mut map = BTreeMap::new();
    for i in 0..20_000u32 {
        map.insert(i, i.wrapping_mul(2_654_435_761));
    }
    assert_eq!(map.len(), 20_000);
    assert_eq!(map[&12_345], 12_345u32.wrapping_mul(2_654_435_761));

    let mut boxed = Box::new([1u64; 64]);
    boxed[5] = 6;
    assert!(GLOBAL.owns(boxed.as_mut_ptr().cast()));
    assert_eq!(boxed.iter().sum::<u64>(), 69);

    // 8 MiB: above the large threshold, so its own vmalloc area; growing it remaps.
    let mut big: Vec<u64> = (0..(1 << 20)).collect();
    assert!(HEAP.stats().large_blocks >= 1);
    assert!(manager.is_vmalloc_addr(x86_64::VirtAddr::from_ptr(big.as_ptr())));
    big.extend(0..(1 << 20));
    assert_eq!(big[(1 << 20) + 7], 7);
    assert_eq!(big[1000], 1000);

    let before = HEAP.stats().large_blocks;
    drop(big);
    assert_eq!(HEAP.stats().large_blocks, before - 1);

    // A listing longer than a heap step grows its `String` through the heap, which
    // grows through the manager: the listing must not hold the manager's lock then.
    let areas: Vec<_> = (0..1000).map(|_| manager.vmalloc(4096).unwrap()).collect();
    let listing = format!("{}", manager.info());
    assert!(listing.len() > 16 << 10, "{} bytes", listing.len());
    assert!(listing.lines().filter(|l| l.ends_with(" vmalloc")).count() >= 1000);
    for area in areas {
        // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
        unsafe { manager.vfree(area.as_ptr()) }.unwrap();
    }
}
