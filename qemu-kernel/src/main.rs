//! A test kernel for `vmalloc`: boots under QEMU (multiboot), builds a kernel address
//! space, starts the other CPUs (`cpus=N` on the command line), runs the checks in
//! [`checks`] on the real MMU, reports on COM1 and exits QEMU through isa-debug-exit.
//! See `README.md` for the boot path.
#![no_std]
#![no_main]
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

extern crate alloc;

mod boot;
mod cell;
mod checks;
mod fault;
mod interrupts;
mod lapic;
mod mm;
mod multiboot;
mod paging;
mod runtime;
mod serial;
mod smp;

use x86_64::registers::control::Cr3;

/// Entered from the boot stub in long mode with `magic` and the multiboot info's
/// physical address.
#[unsafe(no_mangle)]
extern "C" fn kmain(magic: u32, multiboot_info: u32) -> ! {
    serial::init();
    println!("vmalloc test kernel");
    interrupts::init_cpu(0);
    if magic != multiboot::BOOTLOADER_MAGIC {
        println!("not started by a multiboot loader (eax = {magic:#x})");
        serial::exit(false);
    }
    let kernel_image = paging::kernel_image();
    // SAFETY: the loader's pointer, in the identity-mapped first GiB; the only call.
    let boot = unsafe { multiboot::parse(u64::from(multiboot_info), kernel_image.clone()) };
    for region in boot.memory_map {
        let range = &region.range;
        println!(
            "memory: {:#012x}..{:#012x} {:?}",
            range.start.as_u64(),
            range.end.as_u64(),
            region.kind
        );
    }
    let physmap_end = paging::map_physical_memory(boot.ram_end);
    smp::init_bsp();
    let mut ctx = checks::Ctx {
        boot,
        // SAFETY: `map_physical_memory` mapped all RAM at PHYS_OFFSET, for good.
        phys: unsafe { vmalloc::OffsetPhysMemory::new(x86_64::VirtAddr::new(paging::PHYS_OFFSET)) },
        physmap_end,
        kernel_image,
        pml4: Cr3::read().0,
        scratch: paging::ScratchWindow::init(),
        test_frames: paging::test_frames(),
    };
    // SAFETY: the only call; `memory_map` reserves everything the kernel uses, the
    // physical map reaches all RAM, and only `mm` touches the vmalloc region's entries.
    if let Err(error) = unsafe { mm::init(ctx.boot.memory_map, ctx.phys, ctx.pml4, &smp::TLB) } {
        println!("memory management failed to start: {error:?}");
        serial::exit(false);
    }
    let cpus = ctx
        .boot
        .cmdline_value("cpus")
        .and_then(|n| n.parse().ok())
        .unwrap_or(1);
    match smp::start_aps(cpus, &ctx.boot.loader_ranges()) {
        Ok(online) => println!("cpus: {online} online"),
        Err(why) => {
            println!("cpus: starting {cpus} failed: {why}");
            serial::exit(false);
        }
    }
    x86_64::instructions::interrupts::enable();
    serial::exit(checks::run_all(&mut ctx))
}
