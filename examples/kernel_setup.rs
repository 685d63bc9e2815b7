//! The kernel setup the README walks through, compiled with every `cargo test` so it
//! stays true. `init_memory` and `use_vmalloc` run only in a kernel (they read CR3
//! and execute `invlpg`); on the host, `main` just says so.
//!
//! The shape is that of a kernel booted by the `bootloader` crate, as in "Writing an
//! OS in Rust": it gets the firmware memory map and the offset at which all physical
//! memory is mapped.

use vmalloc::frame::{BitmapFrameAllocator, LockedFrameAllocator, MemoryRegion};
use vmalloc::heap::{HeapConfig, KernelHeap};
use vmalloc::smp::OneCpu;
use vmalloc::tlb::InvlpgFlush;
use vmalloc::vmalloc::{CacheMode, IoMapping, VBuffer};
use vmalloc::{Error, KernelVmalloc, OffsetPhysMemory, Vmalloc, VmallocConfig};
use x86_64::registers::control::Cr3;
use x86_64::{PhysAddr, VirtAddr};

// SAFETY: this kernel runs on one CPU, in ring 0.
static CPU: OneCpu = unsafe { OneCpu::new() };
static FRAMES: spin::Once<LockedFrameAllocator<'static>> = spin::Once::new();
static VMALLOC: spin::Once<KernelVmalloc> = spin::Once::new();

// In the kernel: `#[global_allocator]` on this static.
static HEAP: KernelHeap<'static> = KernelHeap::new(HeapConfig::DEFAULT);

/// Brings up frames, vmalloc and the heap, once, at boot.
///
/// # Safety
///
/// `physical_memory_offset` is where the boot loader mapped all physical memory;
/// `regions` is the firmware map with the kernel image and boot structures marked
/// reserved; the page table in CR3 stays the kernel's; called once.
unsafe fn init_memory(regions: &[MemoryRegion], physical_memory_offset: u64) -> Result<(), Error> {
    // SAFETY: the boot loader maps all physical memory at this offset (caller).
    let phys = unsafe { OffsetPhysMemory::new(VirtAddr::new(physical_memory_offset)) };
    // SAFETY: the map describes this machine's RAM, reachable through `phys`; the
    // allocator keeps its bitmaps in usable frames it then marks used.
    let allocator = unsafe { BitmapFrameAllocator::from_memory(regions.iter().cloned(), &phys) }?;
    // Interrupts held off while its lock is held: a handler may allocate.
    let frames = FRAMES.call_once(|| LockedFrameAllocator::with_cpus(allocator, &CPU));
    let (root, _) = Cr3::read();
    // SAFETY: CR3's PML4 is the kernel's page table, reachable through `phys`; only
    // this manager edits the vmalloc region; invlpg flushes this (single) CPU.
    let vmalloc = unsafe {
        Vmalloc::new(
            VmallocConfig::default(),
            root,
            phys,
            frames,
            InvlpgFlush::new(),
        )
    }?;
    HEAP.init(VMALLOC.call_once(|| vmalloc))
}

/// What a driver does with it.
fn use_vmalloc() -> Result<(), Error> {
    let vmalloc = VMALLOC.get().expect("init_memory ran");
    // 16 MiB, virtually contiguous, from scattered frames, with a guard page after it;
    // zeroed, and freed when `buffer` is dropped.
    let mut buffer = VBuffer::new(vmalloc, 16 << 20)?;
    buffer.fill(0xab);
    drop(buffer);

    // The local APIC's registers, uncached, unmapped when `apic` is dropped.
    // SAFETY: 0xfee00000 is the local APIC's MMIO page, which this kernel may touch.
    let apic = unsafe {
        IoMapping::new(
            vmalloc,
            PhysAddr::new(0xfee0_0000),
            0x400,
            CacheMode::Uncached,
        )
    }?;
    let version: u32 = apic.read(0x30)?; // bounds- and alignment-checked
    let _ = version;
    Ok(())
}

fn main() {
    // Kept compiled: the functions above are the README's walk-through.
    let _ = (
        init_memory as unsafe fn(_, _) -> _,
        use_vmalloc as fn() -> _,
    );
    println!(
        "examples/kernel_setup.rs runs in a kernel; on the host, see `cargo run --example tour`."
    );
}
