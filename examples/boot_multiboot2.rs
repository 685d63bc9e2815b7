//! A kernel booted through multiboot2 (GRUB), from the boot information to a
//! working `#[global_allocator]`. Its boot code identity-maps all RAM, so physical
//! address `p` is at virtual `p`. Compiled by every `cargo test`; `init_heap` runs
//! only in a kernel (it reads CR3), and the heap is the global allocator only when
//! built for a bare-metal target.

use core::ops::Range;
use multiboot2::{BootInformation, BootInformationHeader};
use vmalloc::frame::{BitmapFrameAllocator, LockedFrameAllocator};
use vmalloc::heap::{HeapConfig, KernelHeap};
use vmalloc::{Error, KernelVmalloc, OffsetPhysMemory, Vmalloc, VmallocConfig, boot};
use vmalloc::{smp::OneCpu, tlb::InvlpgFlush};
use x86_64::{PhysAddr, VirtAddr, registers::control::Cr3};

// SAFETY: this kernel runs on one CPU, in ring 0.
static CPU: OneCpu = unsafe { OneCpu::new() };
static FRAMES: spin::Once<LockedFrameAllocator<'static>> = spin::Once::new();
static VMALLOC: spin::Once<KernelVmalloc> = spin::Once::new();
#[cfg_attr(target_os = "none", global_allocator)]
static HEAP: KernelHeap<'static> = KernelHeap::new(HeapConfig::DEFAULT);

/// `mbi` is what the loader passed in `ebx`; `kernel` the image's physical extent
/// (the linker script's start and end symbols).
///
/// # Safety
///
/// `mbi` points to the loader's boot information; all RAM is identity-mapped in the
/// tables in CR3; called once.
unsafe fn init_heap(mbi: u32, kernel: Range<PhysAddr>) -> Result<(), Error> {
    // SAFETY: the loader's boot information, identity-mapped (caller).
    let info = unsafe { BootInformation::load(mbi as usize as *const BootInformationHeader) }
        .map_err(|_| Error::BadMemoryMap)?;
    let regions = boot::multiboot2::regions(&info, PhysAddr::new(mbi.into()), kernel)?;
    // SAFETY: all RAM is identity-mapped (caller).
    let phys = unsafe { OffsetPhysMemory::new(VirtAddr::zero()) };
    // SAFETY: the usable regions, with the kernel, its modules and the boot
    // information taken out, are unused RAM.
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

/// Once the kernel has read the boot information and parsed the ACPI tables.
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
        init_heap as unsafe fn(_, _) -> _,
        after_boot as unsafe fn() -> _,
    );
    println!("examples/boot_multiboot2.rs runs in a kernel booted through multiboot2.");
}
