//! A kernel booted by the `bootloader` crate (0.11), from its memory map to a
//! working `#[global_allocator]`, with `map-physical-memory` on (`init_heap`) or
//! with only `map-page-table-recursively` (`init_heap_recursive`). Compiled by
//! every `cargo test`; the functions run only in a kernel (they read CR3), and the
//! heap is the global allocator only when built for a bare-metal target.

use bootloader_api::BootInfo;
use vmalloc::frame::{BitmapFrameAllocator, EarlyFrames, LockedFrameAllocator, RegionKind};
use vmalloc::heap::{HeapConfig, KernelHeap};
use vmalloc::phys::RecursivePhysMemory;
use vmalloc::{Error, Vmalloc, VmallocConfig, boot, smp::OneCpu, tlb::InvlpgFlush};
use x86_64::{registers::control::Cr3, structures::paging::PageTableIndex};

type Manager<P> = Vmalloc<&'static LockedFrameAllocator<'static>, P, InvlpgFlush>;
// SAFETY: this kernel runs on one CPU, in ring 0.
static CPU: OneCpu = unsafe { OneCpu::new() };
static FRAMES: spin::Once<LockedFrameAllocator<'static>> = spin::Once::new();
static VMALLOC: spin::Once<vmalloc::KernelVmalloc> = spin::Once::new();
#[cfg_attr(target_os = "none", global_allocator)]
static HEAP: KernelHeap<'static> = KernelHeap::new(HeapConfig::DEFAULT);

/// # Safety
///
/// `boot_info` is what the boot loader passed; the kernel runs on its page tables;
/// called once.
unsafe fn init_heap(boot_info: &'static BootInfo) -> Result<(), Error> {
    // SAFETY: the boot loader's map of physical memory, still in place (caller).
    let phys = unsafe { boot::bootloader::phys_memory(boot_info) }?;
    let regions = boot::bootloader::regions(&boot_info.memory_regions);
    // SAFETY: usable regions are unused RAM, all reached through `phys`.
    let frames = unsafe { BitmapFrameAllocator::from_memory(regions, &phys) }?;
    let frames = FRAMES.call_once(|| LockedFrameAllocator::with_cpus(frames, &CPU));
    // SAFETY: CR3 holds the kernel's tables, reached through `phys`; one CPU.
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

static PHYS: spin::Once<RecursivePhysMemory> = spin::Once::new();
static VMALLOC_RECURSIVE: spin::Once<Manager<&'static RecursivePhysMemory>> = spin::Once::new();

/// The same without a map of physical memory (call one of the two): a window in
/// PML4 slot 320 (the kernel keeps it free), filled on demand through the
/// recursive entry.
///
/// # Safety
///
/// As [`init_heap`], and slot 320 is unused.
unsafe fn init_heap_recursive(boot_info: &'static BootInfo) -> Result<(), Error> {
    let recursive = boot_info
        .recursive_index
        .into_option()
        .ok_or(Error::NotMapped)?;
    let regions = boot::bootloader::regions(&boot_info.memory_regions);
    // Memory the allocator may hand out, now or once reclaimed: reserved ranges
    // (MMIO, high above RAM on large machines) need no window.
    let top = regions
        .clone()
        .filter(|region| region.kind != RegionKind::Reserved)
        .map(|region| region.range.end.as_u64())
        .max()
        .unwrap_or(0);
    let mut early = EarlyFrames::new(regions)?; // the window's few tables
    let (recursive, window) = (PageTableIndex::new(recursive), PageTableIndex::new(320));
    // SAFETY: the boot loader's recursive entry maps CR3's table; slot 320 is free.
    let phys = unsafe { RecursivePhysMemory::new(recursive, window, top, &mut early) }?;
    let phys = PHYS.call_once(|| phys);
    // SAFETY: usable regions are unused RAM below `top`; `early.map()` reserves
    // the window's tables.
    let frames = unsafe { BitmapFrameAllocator::from_memory(early.map(), &phys) }?;
    let frames = FRAMES.call_once(|| LockedFrameAllocator::with_cpus(frames, &CPU));
    // SAFETY: as in `init_heap`.
    let vmalloc = unsafe {
        Vmalloc::new(
            VmallocConfig::default(),
            Cr3::read().0,
            phys,
            frames,
            InvlpgFlush::new(),
        )
    }?;
    HEAP.init(VMALLOC_RECURSIVE.call_once(|| vmalloc))
}

/// Once the ACPI tables are parsed: their memory goes to the frame allocator.
///
/// # Safety
///
/// Nothing reads the ACPI tables' memory any more.
unsafe fn after_acpi() -> u64 {
    // SAFETY: the caller is done with that memory.
    FRAMES
        .get()
        .map_or(0, |frames| unsafe { frames.reclaim(boot::Reclaim::Acpi) })
}

fn main() {
    let _ = (
        init_heap as unsafe fn(_) -> _,
        init_heap_recursive as unsafe fn(_) -> _,
        after_acpi as unsafe fn() -> _,
    );
    println!("examples/boot_bootloader.rs runs in a kernel booted by the bootloader crate.");
}
