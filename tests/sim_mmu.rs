//! The simulated machine driven from outside the crate, with the `x86_64` crate's own
//! mapper writing the page tables, as a kernel built on that crate would.

use vmalloc::TlbFlush;
use vmalloc::frame::MapperFrames;
use vmalloc_sim::{Access, Fault, SimConfig, SimMachine};
use x86_64::structures::idt::PageFaultErrorCode;
use x86_64::structures::paging::{
    FrameAllocator, Mapper, OffsetPageTable, Page, PageTableFlags, PhysFrame, Size2MiB,
};
use x86_64::{PhysAddr, VirtAddr};

/// The `x86_64` crate's mapper over the machine's tables.
fn mapper(machine: &SimMachine) -> OffsetPageTable<'_> {
    // SAFETY: each test keeps a single mapper and writes tables only through it.
    unsafe { machine.offset_page_table() }
}

const KERNEL_DATA: PageTableFlags = PageTableFlags::PRESENT
    .union(PageTableFlags::WRITABLE)
    .union(PageTableFlags::NO_EXECUTE);

#[test]
fn pages_mapped_by_the_x86_64_mapper_are_reachable() {
    let machine = SimMachine::new(SimConfig::default());
    let mut frames = MapperFrames(machine.frames());
    let mut tables = mapper(&machine);
    let page: Page = Page::containing_address(VirtAddr::new(0xffff_8880_0000_0000));
    let frame = frames.allocate_frame().unwrap();
    // SAFETY: the frame is fresh and the page unused. `ignore`, never `flush`: the
    // latter runs `invlpg` on the host.
    unsafe { tables.map_to(page, frame, KERNEL_DATA, &mut frames) }
        .unwrap()
        .ignore();

    // SAFETY: bytes the test owns: no live Rust value lives there.
    let across = unsafe { machine.write(page.start_address() + 0xffcu64, b"across") };
    assert!(across.is_err(), "the next page is not mapped");
    // SAFETY: bytes the test owns: no live Rust value lives there.
    unsafe { machine.write(page.start_address() + 8u64, b"kernel") }.unwrap();
    let mut seen = [0; 6];
    machine.read_phys(frame.start_address() + 8u64, &mut seen);
    assert_eq!(&seen, b"kernel");

    let fault = machine
        .translate(page.start_address(), Access::FETCH)
        .unwrap_err()
        .page_fault()
        .unwrap();
    let nx_fetch = PageFaultErrorCode::PROTECTION_VIOLATION | PageFaultErrorCode::INSTRUCTION_FETCH;
    assert_eq!(fault.code, nx_fetch);
}

#[test]
fn huge_pages_mapped_by_the_x86_64_mapper_translate() {
    let machine = SimMachine::new(SimConfig::default());
    let mut frames = MapperFrames(machine.frames());
    let mut tables = mapper(&machine);
    let page: Page<Size2MiB> = Page::containing_address(VirtAddr::new(0xffff_9000_0000_0000));
    let frame: PhysFrame<Size2MiB> = PhysFrame::containing_address(PhysAddr::new(32 << 20));
    // SAFETY: the 2 MiB page is unused; the frame is RAM the test owns.
    unsafe { tables.map_to(page, frame, KERNEL_DATA, &mut frames) }
        .unwrap()
        .ignore();

    let addr = page.start_address() + 0x1_2345u64;
    let translation = machine.translate(addr, Access::READ).unwrap();
    assert_eq!(translation.phys().as_u64(), (32 << 20) + 0x1_2345);
    assert_eq!(translation.page_size, 2 << 20);
}

#[test]
fn unmap_without_flush_is_stale_until_flushed() {
    let machine = SimMachine::new(SimConfig::default());
    let mut frames = MapperFrames(machine.frames());
    let mut tables = mapper(&machine);
    let page: Page = Page::containing_address(VirtAddr::new(0xffff_8880_0010_0000));
    let frame = frames.allocate_frame().unwrap();
    // SAFETY: bytes the test owns: no live Rust value lives there.
    unsafe { machine.write_phys(frame.start_address(), b"still here") };
    // SAFETY: as above.
    unsafe { tables.map_to(page, frame, KERNEL_DATA, &mut frames) }
        .unwrap()
        .ignore();

    let mut buf = [0; 10];
    machine.read(page.start_address(), &mut buf).unwrap();
    tables.unmap(page).unwrap().1.ignore();
    buf = [0; 10];
    machine.read(page.start_address(), &mut buf).unwrap();
    assert_eq!(&buf, b"still here", "the TLB still holds the translation");

    machine.flush_page(page);
    let fault = machine.read(page.start_address(), &mut buf).unwrap_err();
    assert!(
        matches!(fault, Fault::Page(f) if f.code.is_empty()),
        "{fault}"
    );
    assert_eq!(machine.tlb_stats().page_flushes, 1);
}
