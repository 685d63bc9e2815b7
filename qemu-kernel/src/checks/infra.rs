//! Checks of the test kernel itself: the memory map, the address space, fault
//! recovery and device access. Later checks rely on all of these.

use super::{Ctx, ensure};
use crate::fault::{probe_exec, probe_read, probe_write};
use crate::paging::{PHYS_OFFSET, VMALLOC_END, VMALLOC_START};
use vmalloc::PhysMemory;
use vmalloc::frame::{MemoryRegion, RegionKind};
use x86_64::registers::model_specific::Msr;
use x86_64::structures::idt::PageFaultErrorCode;
use x86_64::structures::paging::{PageTable, PageTableFlags};
use x86_64::{PhysAddr, VirtAddr};

const MIB: u64 = 1 << 20;
/// QEMU keeps a little RAM for itself (below 1 MiB and ACPI tables at the top).
const FIRMWARE_SLACK: u64 = 4 * MIB;

fn usable_bytes(map: &[MemoryRegion]) -> u64 {
    map.iter()
        .filter(|region| region.kind == RegionKind::Usable)
        .map(|region| region.range.end - region.range.start)
        .sum()
}

fn overlaps(region: &MemoryRegion, start: PhysAddr, end: PhysAddr) -> bool {
    region.range.start < end && start < region.range.end
}

/// The multiboot map parses, its usable RAM matches `-m` (passed as
/// `expect_mem_mib=` on the command line), and the kernel's own memory is reserved.
pub fn memory_map(ctx: &mut Ctx) -> Result<(), &'static str> {
    let boot = &ctx.boot;
    let expected_mib: u64 = boot
        .cmdline_value("expect_mem_mib")
        .ok_or("command line lacks expect_mem_mib=<MiB>")?
        .parse()
        .map_err(|_| "expect_mem_mib is not a number")?;
    let usable = usable_bytes(boot.firmware_map);
    ensure(usable <= expected_mib * MIB, "more usable RAM than -m gave")?;
    ensure(
        usable + FIRMWARE_SLACK >= expected_mib * MIB,
        "usable RAM far below -m",
    )?;
    // `mem_upper` counts the RAM from 1 MiB up to the first hole.
    let mem_upper = u64::from(boot.mem_upper_kib) * 1024;
    let above_1mib = boot
        .firmware_map
        .iter()
        .find(|region| region.kind == RegionKind::Usable && region.range.start.as_u64() == MIB)
        .ok_or("no usable RAM starts at 1 MiB")?;
    ensure(
        mem_upper.abs_diff(above_1mib.range.end.as_u64() - MIB) < FIRMWARE_SLACK,
        "multiboot mem_upper disagrees with the memory map",
    )?;

    let image = &ctx.kernel_image;
    ensure(
        boot.firmware_map.iter().any(|region| {
            region.kind == RegionKind::Usable
                && region.range.start <= image.start
                && image.end <= region.range.end
        }),
        "kernel image is not in RAM the firmware reports usable",
    )?;
    let map = boot.memory_map;
    let info = boot.info_addr;
    ensure(
        !map.iter().any(|region| {
            region.kind == RegionKind::Usable
                && (overlaps(region, image.start, image.end) || overlaps(region, info, info + 1))
        }),
        "a usable region overlaps the kernel image or the multiboot info",
    )?;
    ensure(
        map.iter().enumerate().all(|(index, region)| {
            map[index + 1..]
                .iter()
                .all(|other| !overlaps(region, other.range.start, other.range.end))
        }),
        "memory map regions overlap",
    )?;
    let carved = usable - usable_bytes(map);
    ensure(
        carved >= image.end - image.start && carved <= image.end - image.start + 2 * MIB,
        "carving reserved a different amount than the kernel uses",
    )
}

/// RAM is reachable through the physical map, and every top-level entry of the
/// vmalloc region is a table the library made when the manager was set up (so the
/// kernel half can be copied into other address spaces).
pub fn address_space(ctx: &mut Ctx) -> Result<(), &'static str> {
    static MARKER: u64 = 0x5eed_cafe_f00d_beef;
    let marker_phys = PhysAddr::new(&raw const MARKER as u64);
    let through_physmap = VirtAddr::from_ptr(ctx.phys.phys_to_virt(marker_phys));
    ensure(
        through_physmap.as_u64() == PHYS_OFFSET + marker_phys.as_u64(),
        "phys_to_virt",
    )?;
    // SAFETY: reads of RAM through the physical map, or of unmapped addresses.
    let (marker, last_ram_word) = unsafe {
        (
            probe_read(through_physmap),
            probe_read(VirtAddr::new(PHYS_OFFSET + ctx.boot.ram_end.as_u64() - 8)),
        )
    };
    ensure(
        marker == Ok(MARKER),
        "a static reads differently through the physical map",
    )?;
    ensure(last_ram_word.is_ok(), "the last word of RAM is not mapped")?;
    ensure(
        ctx.physmap_end >= ctx.boot.ram_end,
        "physical map ends before RAM does",
    )?;

    // SAFETY: the PML4 is identity-mapped and only read here.
    let pml4 = unsafe { &*(ctx.pml4.start_address().as_u64() as *const PageTable) };
    let first = VirtAddr::new(VMALLOC_START).p4_index();
    let last = VirtAddr::new(VMALLOC_END - 1).p4_index();
    let table = PageTableFlags::PRESENT | PageTableFlags::WRITABLE | vmalloc::paging::CREATED;
    ensure(
        (usize::from(first)..=usize::from(last)).all(|index| {
            let flags = pml4[index].flags();
            flags.contains(table) && !flags.contains(PageTableFlags::HUGE_PAGE)
        }),
        "a vmalloc-region PML4 entry is not a table the library made",
    )
}

/// Reading unmapped addresses faults with CR2 = the address and P = 0, and the
/// kernel carries on; a mapped read still succeeds after.
pub fn fault_probe_read(_: &mut Ctx) -> Result<(), &'static str> {
    static VALUE: u64 = 0x0123_4567_89ab_cdef;
    for addr in [VMALLOC_START + 0x1238, VMALLOC_END - 8] {
        let addr = VirtAddr::new(addr);
        // SAFETY: the vmalloc region is unmapped (checked by `address_space`).
        let fault = unsafe { probe_read(addr) }
            .err()
            .ok_or("read of unmapped memory succeeded")?;
        ensure(fault.addr == addr, "CR2 is not the address read")?;
        ensure(
            !fault.code.intersects(
                PageFaultErrorCode::PROTECTION_VIOLATION
                    | PageFaultErrorCode::CAUSED_BY_WRITE
                    | PageFaultErrorCode::INSTRUCTION_FETCH,
            ),
            "error code is not a not-present read",
        )?;
    }
    // SAFETY: a static of the kernel image.
    let value = unsafe { probe_read(VirtAddr::from_ptr(&raw const VALUE)) };
    ensure(
        value == Ok(VALUE),
        "mapped read after a recovered fault failed",
    )
}

/// A page mapped read-only faults on write with P = 1, W = 1 and keeps its contents;
/// mapped writable, the same write goes through.
pub fn fault_probe_write_readonly(ctx: &mut Ctx) -> Result<(), &'static str> {
    const BEFORE: u64 = 0xfeed_face_0000_0001;
    const AFTER: u64 = 0xfeed_face_0000_0002;
    let frame = ctx.test_frames[0];
    let identity = frame.start_address().as_u64() as *mut u64;
    // SAFETY: a test frame inside the identity-mapped image, used by this check only.
    unsafe { identity.write_volatile(BEFORE) };

    let addr = ctx.scratch.map(0, frame, PageTableFlags::NO_EXECUTE);
    // SAFETY: `addr` maps our test frame; reading or writing it is harmless.
    let read = unsafe { probe_read(addr) };
    ensure(read == Ok(BEFORE), "read-only page does not read back")?;
    // SAFETY: as above.
    let fault = unsafe { probe_write(addr, AFTER) }
        .err()
        .ok_or("write to a read-only page succeeded")?;
    ensure(fault.addr == addr, "CR2 is not the address written")?;
    ensure(
        fault.code.contains(
            PageFaultErrorCode::PROTECTION_VIOLATION | PageFaultErrorCode::CAUSED_BY_WRITE,
        ),
        "error code lacks P=1, W=1",
    )?;
    // SAFETY: as above.
    let contents = unsafe { identity.read_volatile() };
    ensure(contents == BEFORE, "read-only page changed")?;

    let addr = ctx.scratch.map(
        0,
        frame,
        PageTableFlags::WRITABLE | PageTableFlags::NO_EXECUTE,
    );
    // SAFETY: as above.
    let write = unsafe { probe_write(addr, AFTER) };
    ensure(write.is_ok(), "write to a writable page faulted")?;
    // SAFETY: as above.
    let contents = unsafe { identity.read_volatile() };
    ensure(contents == AFTER, "write did not reach the frame")
}

/// Code on an executable page runs; on an NX page, or on no page, the fetch faults
/// with I/D = 1 at the target address.
pub fn fault_probe_exec_nx(ctx: &mut Ctx) -> Result<(), &'static str> {
    const RET: u8 = 0xc3;
    let frame = ctx.test_frames[1];
    // SAFETY: a test frame inside the identity-mapped image, used by this check only.
    unsafe { (frame.start_address().as_u64() as *mut u8).write_volatile(RET) };

    let addr = ctx.scratch.map(1, frame, PageTableFlags::empty());
    // SAFETY: the page holds a lone `ret`.
    let run = unsafe { probe_exec(addr) };
    ensure(run.is_ok(), "executable page did not run")?;

    let addr = ctx.scratch.map(1, frame, PageTableFlags::NO_EXECUTE);
    // SAFETY: as above; NX forbids the fetch.
    let fault = unsafe { probe_exec(addr) }
        .err()
        .ok_or("NX page executed")?;
    ensure(fault.addr == addr, "CR2 is not the NX target")?;
    ensure(
        fault.code.contains(
            PageFaultErrorCode::INSTRUCTION_FETCH | PageFaultErrorCode::PROTECTION_VIOLATION,
        ),
        "NX fault lacks I/D=1, P=1",
    )?;

    let unmapped = ctx.scratch.slot_addr(2);
    // SAFETY: nothing is mapped at `unmapped`.
    let fault = unsafe { probe_exec(unmapped) }
        .err()
        .ok_or("unmapped page executed")?;
    ensure(
        fault.addr == unmapped
            && fault.code.contains(PageFaultErrorCode::INSTRUCTION_FETCH)
            && !fault
                .code
                .contains(PageFaultErrorCode::PROTECTION_VIOLATION),
        "fetch from an unmapped page reports the wrong fault",
    )
}

/// Offset of the local APIC's version register in its MMIO page.
pub const APIC_VERSION_REGISTER: u64 = 0x30;

/// The local APIC's physical base and whether it is enabled (IA32_APIC_BASE).
pub fn local_apic() -> (PhysAddr, bool) {
    const IA32_APIC_BASE: u32 = 0x1b;
    const APIC_ENABLED: u64 = 1 << 11;
    // SAFETY: IA32_APIC_BASE exists on every x86_64 CPU; reading it has no effect.
    let msr = unsafe { Msr::new(IA32_APIC_BASE).read() };
    (
        PhysAddr::new(msr & 0x000f_ffff_ffff_f000),
        msr & APIC_ENABLED != 0,
    )
}

/// The local APIC is enabled and its version register, read through the physical
/// map, holds an integrated APIC's version (QEMU: 0x14, with 6 LVT entries: 0x50014).
pub fn apic_version(ctx: &mut Ctx) -> Result<(), &'static str> {
    let (base, enabled) = local_apic();
    ensure(enabled, "local APIC is disabled")?;
    ensure(
        base + 0x1000u64 <= ctx.physmap_end,
        "APIC is outside the physical map",
    )?;
    let register = ctx
        .phys
        .phys_to_virt(base + APIC_VERSION_REGISTER)
        .cast::<u32>();
    // SAFETY: the APIC's MMIO page is mapped (uncached) by the physical map; the
    // version register is read-only and reading it has no side effect.
    let version = unsafe { register.read_volatile() };
    let max_lvt = (version >> 16) & 0xff;
    ensure(
        (0x10..=0x15).contains(&(version & 0xff)),
        "not an integrated APIC version",
    )?;
    ensure(
        (3..=6).contains(&max_lvt),
        "implausible number of LVT entries",
    )
}
