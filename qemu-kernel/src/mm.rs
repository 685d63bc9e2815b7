//! The kernel's memory management, built at boot from the library as a kernel would:
//! the frame allocator, the vmalloc manager over the live PML4, and the global heap.

use crate::smp::KernelCpus;
use vmalloc::frame::{BitmapFrameAllocator, LockedFrameAllocator, MemoryRegion};
use vmalloc::heap::{HeapConfig, KernelHeap};
use vmalloc::smp::Shootdown;
use vmalloc::tlb::InvlpgFlush;
use vmalloc::vmalloc::{Vmalloc, VmallocConfig};
use vmalloc::{Error, OffsetPhysMemory};
use x86_64::structures::paging::PhysFrame;

/// The vmalloc manager's type in this kernel.
pub type Manager = Vmalloc<&'static LockedFrameAllocator<'static>, OffsetPhysMemory, Tlb>;
/// The manager's TLB flush: a shootdown of every online CPU.
pub type Tlb = &'static Shootdown<KernelCpus, InvlpgFlush>;

/// The frame allocator over the boot memory map.
pub static FRAMES: spin::Once<LockedFrameAllocator<'static>> = spin::Once::new();
/// The vmalloc manager.
pub static VMALLOC: spin::Once<Manager> = spin::Once::new();

/// The kernel heap: small blocks from a vmalloc window, large ones from vmalloc.
#[global_allocator]
pub static HEAP: KernelHeap<'static> = KernelHeap::new(HeapConfig::DEFAULT);

/// Builds the frame allocator from `map`, the vmalloc manager on `pml4`, and the heap
/// (with per-CPU magazines).
///
/// # Safety
///
/// Called once; the usable ranges of `map` are RAM nothing else uses, `phys` reaches
/// all of it, `pml4` is the live PML4 whose vmalloc-region entries nothing else
/// touches.
pub unsafe fn init(
    map: &[MemoryRegion],
    phys: OffsetPhysMemory,
    pml4: PhysFrame,
    tlb: Tlb,
) -> Result<(), Error> {
    // SAFETY: forwarded from this function's contract.
    let bitmap = unsafe { BitmapFrameAllocator::from_memory(map.iter().cloned(), &phys)? };
    // Checks call the allocator directly with interrupts on, and a timer handler may
    // allocate through the manager, which takes the same lock: it is taken with
    // interrupts held off. Each CPU keeps a list of free frames, emptied through work
    // in the shootdown service when another CPU runs dry.
    let frames = FRAMES.call_once(|| LockedFrameAllocator::with_shootdown(bitmap, tlb));
    // Small areas come from per-CPU blocks: the SMP checks run with the caches on.
    let config = VmallocConfig {
        cpu_caches: true,
        ..VmallocConfig::default()
    };
    // SAFETY: forwarded; `tlb` flushes every CPU that runs on these page tables.
    let manager = unsafe { Manager::new(config, pml4, phys, frames, tlb)? };
    let manager = VMALLOC.call_once(|| manager);
    HEAP.init(manager)?;
    // Each CPU its own slab magazines.
    HEAP.use_cpus(&KernelCpus);
    Ok(())
}

/// The frame allocator (after [`init`]).
pub fn frames() -> &'static LockedFrameAllocator<'static> {
    FRAMES.get().expect("mm::init ran at boot")
}

/// The vmalloc manager (after [`init`]).
pub fn vmalloc() -> &'static Manager {
    VMALLOC.get().expect("mm::init ran at boot")
}
