//! A kernel booted by Limine (the `limine` crate, 0.5), from its memory map to a
//! working `#[global_allocator]`. Compiled by every `cargo test`; `init_heap` runs
//! only in a kernel (it reads CR3), and the heap is the global allocator only when
//! built for a bare-metal target.

use limine::BaseRevision;
use limine::request::{HhdmRequest, MemoryMapRequest};
use vmalloc::frame::{BitmapFrameAllocator, LockedFrameAllocator};
use vmalloc::heap::{HeapConfig, KernelHeap};
use vmalloc::{Error, KernelVmalloc, Vmalloc, VmallocConfig, boot, smp::OneCpu, tlb::InvlpgFlush};
use x86_64::registers::control::Cr3;

#[used]
#[unsafe(link_section = ".requests")]
static BASE_REVISION: BaseRevision = BaseRevision::new();
#[used]
#[unsafe(link_section = ".requests")]
static MEMORY_MAP: MemoryMapRequest = MemoryMapRequest::new();
#[used]
#[unsafe(link_section = ".requests")]
static HHDM: HhdmRequest = HhdmRequest::new();

// SAFETY: this kernel runs on one CPU, in ring 0.
static CPU: OneCpu = unsafe { OneCpu::new() };
static FRAMES: spin::Once<LockedFrameAllocator<'static>> = spin::Once::new();
static VMALLOC: spin::Once<KernelVmalloc> = spin::Once::new();
#[cfg_attr(target_os = "none", global_allocator)]
static HEAP: KernelHeap<'static> = KernelHeap::new(HeapConfig::DEFAULT);

/// # Safety
///
/// Limine booted this kernel, which runs on its page tables; called once.
unsafe fn init_heap() -> Result<(), Error> {
    let entries = MEMORY_MAP
        .get_response()
        .ok_or(Error::BadMemoryMap)?
        .entries();
    let hhdm = HHDM.get_response().ok_or(Error::NotMapped)?;
    // SAFETY: Limine's direct map, in place while the kernel runs on its tables.
    let phys = unsafe { boot::limine::phys_memory(hhdm) }?;
    // SAFETY: usable entries are unused RAM, all in the direct map.
    let frames =
        unsafe { BitmapFrameAllocator::from_memory(boot::limine::regions(entries), &phys) }?;
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

/// Once the kernel runs on its own page tables and stack, and has read every
/// response: Limine's memory (and the ACPI tables, once parsed) becomes free.
///
/// # Safety
///
/// Nothing uses what the boot loader's and the ACPI tables' memory holds any more.
unsafe fn after_boot() -> u64 {
    let frames = FRAMES.get();
    frames.map_or(0, |f| {
        // SAFETY: the caller is done with that memory.
        unsafe { f.reclaim(boot::Reclaim::Bootloader) + f.reclaim(boot::Reclaim::Acpi) }
    })
}

fn main() {
    let _ = (
        init_heap as unsafe fn() -> _,
        after_boot as unsafe fn() -> _,
    );
    println!("examples/boot_limine.rs runs in a kernel booted by Limine.");
}
