//! A kernel that boots straight from UEFI (the `uefi` crate, 0.37), from the
//! memory map `exit_boot_services` returns to a working `#[global_allocator]`.
//! Firmware identity-maps all memory, so physical address `p` is at virtual `p`.
//! Compiled by every `cargo test`; `init_heap` runs only in a kernel (it exits boot
//! services and reads CR3), and the heap is the global allocator only when built
//! for a bare-metal target.

use vmalloc::frame::{BitmapFrameAllocator, LockedFrameAllocator};
use vmalloc::heap::{HeapConfig, KernelHeap};
use vmalloc::{Error, KernelVmalloc, OffsetPhysMemory, Vmalloc, VmallocConfig, boot};
use vmalloc::{smp::OneCpu, tlb::InvlpgFlush};
use x86_64::{VirtAddr, registers::control::Cr3};

// SAFETY: this kernel runs on one CPU, in ring 0.
static CPU: OneCpu = unsafe { OneCpu::new() };
static FRAMES: spin::Once<LockedFrameAllocator<'static>> = spin::Once::new();
static VMALLOC: spin::Once<KernelVmalloc> = spin::Once::new();
#[cfg_attr(target_os = "none", global_allocator)]
static HEAP: KernelHeap<'static> = KernelHeap::new(HeapConfig::DEFAULT);

/// # Safety
///
/// Called once, from the UEFI application, when nothing needs boot services any
/// more; the firmware's identity map is in CR3.
unsafe fn init_heap() -> Result<(), Error> {
    // SAFETY: nothing uses boot services after this (caller).
    let map = unsafe { uefi::boot::exit_boot_services(None) };
    // SAFETY: the firmware identity-maps all memory, and its tables stay in CR3.
    let phys = unsafe { OffsetPhysMemory::new(VirtAddr::zero()) };
    // SAFETY: conventional memory is unused RAM now that boot services are gone;
    // boot-services memory (the firmware's page tables and the stack included)
    // waits for `after_own_page_tables`.
    let frames = unsafe { BitmapFrameAllocator::from_memory(boot::uefi::regions(&map)?, &phys) }?;
    let frames = FRAMES.call_once(|| LockedFrameAllocator::with_cpus(frames, &CPU));
    // SAFETY: CR3 holds the firmware's tables, reached through `phys`; one CPU.
    let vmalloc = unsafe {
        Vmalloc::new(
            VmallocConfig::default(),
            Cr3::read().0,
            phys,
            frames,
            InvlpgFlush::new(),
        )
    }?;
    HEAP.init(VMALLOC.call_once(|| vmalloc))
}

/// Once the kernel runs on page tables and a stack of its own, and has parsed the
/// ACPI tables.
///
/// # Safety
///
/// Nothing uses what the boot services' and the ACPI tables' memory holds any more.
unsafe fn after_own_page_tables() -> u64 {
    let frames = FRAMES.get();
    frames.map_or(0, |f| {
        // SAFETY: the caller is done with that memory.
        unsafe { f.reclaim(boot::Reclaim::BootServices) + f.reclaim(boot::Reclaim::Acpi) }
    })
}

fn main() {
    let _ = (
        init_heap as unsafe fn() -> _,
        after_own_page_tables as unsafe fn() -> _,
    );
    println!("examples/boot_uefi.rs runs in a kernel that boots from UEFI.");
}
