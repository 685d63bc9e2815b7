//! A tour of `vmalloc` on a simulated machine: `cargo run --example tour`.
//!
//! It boots a machine whose memory is fragmented, vmallocs a buffer, shows the
//! scattered frames behind it, writes through it, maps a table with 2 MiB pages,
//! lists the areas, runs into a guard page and a stack's guard, makes a few mistakes
//! on purpose, and gives everything back. Then a kernel heap sampling its allocations
//! into the guarded pool catches an overrun and lists its memory per site.

use core::alloc::{GlobalAlloc, Layout};
use vmalloc::heap::guarded::HeapSiteUsage;
use vmalloc::heap::{HeapConfig, KernelHeap};
use vmalloc::{VmOptions, Vmalloc, VmallocConfig};
use vmalloc_sim::{Access, SimConfig, SimMachine};
use x86_64::VirtAddr;

fn main() {
    // 128 MiB of "physical" memory with an E820-style map full of holes. The scatter
    // seed hands frames out all over memory, as on a machine that has run a while;
    // the host window lets this program dereference vmalloc pointers directly.
    let machine = SimMachine::new(
        SimConfig::new(128 << 20)
            .with_holes(12)
            .with_scatter_seed(42)
            .with_host_window(1 << 30),
    );
    let frames = machine.frames();
    let free_at_boot = frames.stats().free;
    println!(
        "machine: {} MiB, {} usable frames, {} regions in the memory map",
        machine.memory_size() >> 20,
        free_at_boot,
        machine.memory_map().len()
    );

    let (start, size) = machine.host_window().expect("host window");
    let config = VmallocConfig {
        start,
        size,
        ..VmallocConfig::default()
    };
    // SAFETY: the machine's page tables belong to this manager alone.
    let vm = unsafe { Vmalloc::new(config, machine.root(), machine.phys(), &frames, &machine) }
        .expect("vmalloc");

    // Eight pages, virtually contiguous, physically anywhere.
    let options = VmOptions {
        tag: "tour_buffer",
        ..VmOptions::default()
    };
    let buffer = vm.vmalloc_with(8 * 4096, &options).expect("vmalloc");
    let base = VirtAddr::from_ptr(buffer.as_ptr());
    println!("\nvmalloc(32 KiB) = {base:#x}; the frames behind it are scattered:");
    let mut previous = None;
    for page in 0..8u64 {
        let addr = base + page * 4096;
        let frame = vm.vmalloc_to_frame(addr).expect("mapped").start_address();
        let jump = previous.map_or(String::new(), |p: u64| {
            format!(
                "  ({:+} frames from the last)",
                (frame.as_u64() as i64 - p as i64) / 4096
            )
        });
        println!(
            "  page {page}  {:#x} -> frame {:#010x}{jump}",
            addr.as_u64(),
            frame.as_u64()
        );
        previous = Some(frame.as_u64());
    }

    // Through the software MMU, and through the pointer itself.
    let message = b"one buffer, eight scattered frames";
    // SAFETY: bytes the test owns: no live Rust value lives there.
    unsafe { machine.write(base + 4090u64, message) }.expect("write across a page boundary");
    let mut back = [0u8; 34];
    machine.read(base + 4090u64, &mut back).expect("read");
    // SAFETY: the buffer is 32 KiB long and mapped read-write.
    let direct = unsafe { std::slice::from_raw_parts(buffer.as_ptr().add(4090), message.len()) };
    println!(
        "\nwrote across pages 0 and 1, read back: {:?} (and {:?} through the pointer)",
        std::str::from_utf8(&back).unwrap(),
        std::str::from_utf8(direct).unwrap()
    );

    let zeroed = vm.vzalloc(3 * 4096).expect("vzalloc");
    // Large tables may ask for 2 MiB pages: one TLB entry and no page table per 2 MiB,
    // where the frame allocator has 2 MiB runs; 4 KiB pages elsewhere and for the tail.
    let table = vm.vmalloc_huge((4 << 20) + 8192).expect("vmalloc_huge");
    let table_at = VirtAddr::from_ptr(table.as_ptr());
    let mapped = machine.translate(table_at, Access::READ).expect("mapped");
    println!(
        "\nvmalloc_huge(4 MiB + 8 KiB) = {table_at:#x}: its first page is a {} KiB page at frame {:#x}",
        mapped.page_size >> 10,
        mapped.frame_start.as_u64()
    );
    println!("\n/proc/vmallocinfo:\n{}", vm.info());
    println!("/proc/meminfo:\n{}\n", vm.stats());

    // One page past the end is the guard page: touching it faults.
    let guard = base + 8 * 4096u64;
    let fault = machine
        .translate(guard, Access::WRITE)
        .expect_err("guard page");
    println!("write to the guard page at {guard:#x}: {fault:?}");
    // What a page-fault handler prints before it oopses: which area, who made it.
    if let Some(fault) = fault.page_fault() {
        println!("diagnosis: {}", vm.diagnose_fault(fault.addr, fault.code));
    }
    // A kernel stack: aligned to its size, unmapped below, so an overflow faults.
    let stack = vm.alloc_stack(16 << 10).expect("alloc_stack");
    let below = stack.base() - 8u64;
    if let Err(fault) = machine.translate(below, Access::WRITE)
        && let Some(fault) = fault.page_fault()
    {
        println!("diagnosis: {}", vm.diagnose_fault(fault.addr, fault.code));
    }
    drop(stack);
    // Raw pointers are freed with `unsafe` (owners such as `VBuffer` free on drop).
    // Mistakes get an error and change nothing.
    // SAFETY: an interior pointer starts no area: refused, the buffer stays live.
    let interior = unsafe { vm.vfree(buffer.as_ptr().wrapping_add(100)) };
    println!("vfree(interior pointer): {:?}", interior.unwrap_err());
    // SAFETY: the zeroed area is not used again; the second call frees nothing.
    let (first, again) = unsafe { (vm.vfree(zeroed.as_ptr()), vm.vfree(zeroed.as_ptr())) };
    first.expect("vfree");
    println!("vfree(the same pointer twice): {:?}", again.unwrap_err());

    // SAFETY: neither area is used again.
    unsafe {
        vm.vfree(buffer.as_ptr()).expect("vfree");
        vm.vfree(table.as_ptr()).expect("vfree");
    }
    println!(
        "\nafter vfree: {} pages wait for the next purge",
        vm.stats().pending_purge_pages
    );
    vm.purge();
    let stats = vm.stats();
    println!(
        "after purge: {} areas, {} of {} frames free; the manager keeps {} page-table frames \
         (the top-level tables made at setup, shared by every address space, and the \
         per-CPU blocks' tables) and {} frames of bookkeeping",
        stats.areas,
        frames.stats().free,
        free_at_boot,
        stats.page_table_frames,
        stats.bookkeeping_frames
    );
    assert_eq!(
        frames.stats().free + stats.page_table_frames + stats.bookkeeping_frames,
        free_at_boot
    );
    drop(vm);
    println!(
        "after dropping the manager: {} frames free",
        frames.stats().free
    );
    assert_eq!(frames.stats().free, free_at_boot);
    println!("all {free_at_boot} frames returned");

    // A kernel heap with KFENCE-style sampling: one small allocation in 100 lands
    // alone on a page between unmapped ones (every one of them, for this tour).
    // SAFETY: the first manager is gone; its page tables are this one's alone.
    let vm = unsafe { Vmalloc::new(config, machine.root(), machine.phys(), &frames, &machine) }
        .expect("vmalloc");
    let heap = KernelHeap::new(HeapConfig {
        window: 16 << 20,
        sample_interval: 100,
        guarded_slots: 64,
        ..HeapConfig::DEFAULT
    });
    heap.init(&vm).expect("heap");
    heap.set_sample_interval(1);
    let layout = Layout::from_size_align(24, 8).unwrap();
    // SAFETY: a non-zero size; freed below with its layout.
    let object = unsafe { heap.alloc(layout) };
    println!(
        "\nheap.alloc(24 bytes) = {object:p}, sampled: {}",
        heap.is_guarded(object)
    );
    // An off-by-one loop writing a fourth u64: the page after the object is unmapped.
    let overrun = VirtAddr::from_ptr(object) + 24u64;
    if let Err(fault) = machine.translate(overrun, Access::WRITE)
        && let Some(fault) = fault.page_fault()
        && let Some(diagnosis) = heap.diagnose_fault(fault.addr, fault.code)
    {
        println!("diagnosis: {diagnosis}");
    }
    // Back to about 1 in 100; the countdown starts again, so the first of these
    // blocks is sampled too, and the rest come from the slabs.
    heap.set_sample_interval(100);
    let small = Layout::from_size_align(64, 8).unwrap();
    // SAFETY: non-zero sizes; freed below with their layout.
    let blocks: Vec<_> = (0..10).map(|_| unsafe { heap.alloc(small) }).collect();
    let mut sites = [HeapSiteUsage::EMPTY; 8];
    println!("\n/proc/allocinfo (heap):\n{}", heap.allocinfo(&mut sites));
    // SAFETY: allocated above with these layouts, not used again.
    unsafe {
        heap.dealloc(object, layout);
        blocks.iter().for_each(|&block| heap.dealloc(block, small));
    }
    println!("guarded pool: {:?}", heap.guarded_stats());
}
