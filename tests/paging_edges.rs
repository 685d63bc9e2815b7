//! Edges of the page-table walker and the physical-memory windows: a recursive PML4
//! entry inside a walked range, a PML4 entry with the (reserved) huge bit, and
//! physical addresses past what a window reaches.
#![cfg(all(target_os = "linux", target_arch = "x86_64"))]

use vmalloc::frame::MapperFrames;
use vmalloc::paging::PageTables;
use vmalloc::phys::RecursivePhysMemory;
use vmalloc::{OffsetPhysMemory, PhysMemory};
use vmalloc_sim::{SimConfig, SimMachine};
use x86_64::structures::paging::{Page, PageTableFlags, PageTableIndex, Size4KiB};
use x86_64::{PhysAddr, VirtAddr};

const SLOT: u64 = 1 << 39;

fn root_entry(machine: &SimMachine, slot: u64) -> u64 {
    let mut bytes = [0; 8];
    machine.read_phys(machine.root().start_address() + slot * 8, &mut bytes);
    u64::from_le_bytes(bytes)
}

/// Writes root entry `slot` of the test's own machine, as a boot loader would.
fn set_root_entry(machine: &SimMachine, slot: u64, entry: u64) {
    // SAFETY: a page table of the test's machine: no live Rust value lives there.
    unsafe {
        machine.write_phys(
            machine.root().start_address() + slot * 8,
            &entry.to_le_bytes(),
        )
    };
}

fn slot_range(slot: u64) -> x86_64::structures::paging::page::PageRange<Size4KiB> {
    let start = VirtAddr::new_truncate(slot << 39);
    // The last page of the slot cannot end a range at the top of a half; stop a page short.
    let end = VirtAddr::new_truncate((slot << 39) + SLOT - 4096);
    Page::range(
        Page::containing_address(start),
        Page::containing_address(end),
    )
}

/// `free_empty_tables` never clears an entry of the root. A range covering a
/// recursive PML4 entry (`RecursivePhysMemory` needs one in the same PML4) leads the
/// walk back to the root, whose entries it must not take for a PDPT's (the empty,
/// preallocated PDPT of another slot would be unlinked).
#[test]
fn free_empty_tables_over_a_recursive_entry_leaves_every_root_entry() {
    let machine = SimMachine::new(SimConfig::new(64 << 20));
    let frames = machine.frames();
    let (recursive, region) = (400u64, 450u64);
    assert_eq!(root_entry(&machine, recursive), 0);
    assert_eq!(root_entry(&machine, region), 0);
    let root = machine.root().start_address().as_u64();
    let entry = root | (PageTableFlags::PRESENT | PageTableFlags::WRITABLE).bits();
    set_root_entry(&machine, recursive, entry);

    // SAFETY: the machine's tables are this value's alone; frames from its allocator.
    let mut tables = unsafe { PageTables::new(machine.root(), machine.phys()) };
    // SAFETY: the machine's allocator hands out unused frames.
    let made = unsafe { tables.preallocate_top_level(slot_range(region), &frames) }.unwrap();
    assert_eq!(made, 1);
    let before = root_entry(&machine, region);
    assert_ne!(before, 0);

    let mut unlinked = Vec::new();
    let (count, flush) = tables
        .free_empty_tables(slot_range(recursive), |f| unlinked.push(f))
        .unwrap();
    let _ = flush.range();
    // SAFETY: test only; nothing was cached.
    unsafe { flush.ignore() };
    assert_eq!(
        root_entry(&machine, region),
        before,
        "a safe call cleared root entry {region} (count {count}, frames {unlinked:?})"
    );
}

/// An address at or past the window's top (outside `PhysMemory`'s contract) gives a
/// pointer no access reaches (non-canonical), not a panic.
#[test]
fn recursive_phys_to_virt_past_the_top_gives_a_pointer_that_faults() {
    const MEMORY: u64 = 64 << 20;
    let machine = SimMachine::new(SimConfig::new(MEMORY).with_host_window(3 * SLOT));
    let (start, _) = machine.host_window().unwrap();
    let first = start.as_u64().div_ceil(SLOT);
    let root = machine.root().start_address();
    let entry = root.as_u64() | (PageTableFlags::PRESENT | PageTableFlags::WRITABLE).bits();
    set_root_entry(&machine, first, entry);
    let frames = machine.frames();
    // SAFETY: recursive entry in place, window slot unused, frames unused.
    let phys = unsafe {
        RecursivePhysMemory::new(
            PageTableIndex::new(first as u16),
            PageTableIndex::new(first as u16 + 1),
            MEMORY,
            &mut MapperFrames(&frames),
        )
    }
    .unwrap();
    for high in [MEMORY.next_multiple_of(1 << 30), 1 << 47, (1 << 52) - 1] {
        let high = PhysAddr::new(high);
        let ptr = phys.phys_to_virt(high) as u64;
        assert!(VirtAddr::try_new(ptr).is_err(), "{high:?} -> {ptr:#x}");
    }
}

/// With the usual upper-half offset, a physical address from 2^47 on (outside the
/// contract) wraps, in debug builds as in release.
#[test]
fn offset_phys_to_virt_past_the_address_space_wraps_instead_of_panicking() {
    // SAFETY: nothing is reached through it; only the translation is computed.
    let phys = unsafe { OffsetPhysMemory::new(VirtAddr::new(0xffff_8000_0000_0000)) };
    let high = PhysAddr::new(1 << 47);
    assert_eq!(phys.phys_to_virt(high) as u64, 0);
}

/// A PML4 entry with `HUGE_PAGE` (a reserved bit there: the CPU faults on it) is
/// refused by `translate` as by every range call, not read through as a table.
#[test]
fn translate_refuses_a_pml4_entry_with_the_huge_bit() {
    use vmalloc::FrameSource;
    use vmalloc::paging::PageTableMapper;
    use x86_64::structures::paging::{Translate, mapper::TranslateResult};
    let machine = SimMachine::new(SimConfig::new(64 << 20));
    let frames = machine.frames();
    let slot = 300u64;
    // Some frame with a non-zero word where a PDPT entry would be.
    let other = frames.alloc_frame().unwrap();
    let fake = (1u64 << 30) | (PageTableFlags::PRESENT | PageTableFlags::HUGE_PAGE).bits();
    // SAFETY: bytes the test owns: no live Rust value lives there.
    unsafe { machine.write_phys(other.start_address(), &fake.to_le_bytes()) };
    let entry = other.start_address().as_u64()
        | (PageTableFlags::PRESENT | PageTableFlags::WRITABLE | PageTableFlags::HUGE_PAGE).bits();
    set_root_entry(&machine, slot, entry);

    // SAFETY: the machine's tables are this value's alone.
    let tables = unsafe { PageTables::new(machine.root(), machine.phys()) };
    let addr = VirtAddr::new_truncate(slot << 39);
    let mapper = PageTableMapper::new(tables);
    assert!(matches!(
        mapper.translate(addr),
        TranslateResult::InvalidFrameAddress(_)
    ));
    let ours = mapper.tables().translate(addr).map(|_| ());
    assert_eq!(ours, Err(vmalloc::Error::HugePageInTheWay));
}

/// An upper entry with `NO_EXECUTE` (a boot loader's, not this crate's) forbids
/// fetches whatever the leaf says, and the crate takes no right away from upper
/// entries: asking for an executable page below it is refused, and changes nothing.
#[test]
fn an_executable_page_below_a_no_execute_upper_entry_is_refused() {
    use vmalloc::{Error, FrameSource};
    let machine = SimMachine::new(SimConfig::new(64 << 20));
    let frames = machine.frames();
    let slot = 300u64;
    let pdpt = frames.alloc_frame().unwrap();
    let flags = PageTableFlags::PRESENT | PageTableFlags::WRITABLE | PageTableFlags::NO_EXECUTE;
    let entry = pdpt.start_address().as_u64() | flags.bits();
    // SAFETY: a fresh frame of the test's machine, made a page table.
    unsafe { machine.fill_phys(pdpt.start_address(), 4096, 0) };
    set_root_entry(&machine, slot, entry);
    // SAFETY: the machine's tables are this value's alone.
    let mut tables = unsafe { PageTables::new(machine.root(), machine.phys()) };
    let addr = VirtAddr::new_truncate(slot << 39);
    let page = Page::<Size4KiB>::containing_address(addr);
    let range = Page::range(page, page + 1);
    let frame = frames.alloc_frame().unwrap();
    let free_before = frames.stats().free;
    // SAFETY: an unused page and a frame from the allocator.
    let executable = unsafe { tables.map(range, [frame], PageTableFlags::WRITABLE, &frames) };
    assert_eq!(executable, Err(Error::NoExecuteAbove));
    assert_eq!(frames.stats().free, free_before, "no table was taken");
    let rw_nx = PageTableFlags::WRITABLE | PageTableFlags::NO_EXECUTE;
    // SAFETY: as above.
    unsafe { tables.map(range, [frame], rw_nx, &frames) }.unwrap();
    // SAFETY: the page is ours; nothing relies on its rights.
    let protect = unsafe { tables.protect(range, PageTableFlags::empty()) };
    assert_eq!(protect.map(|_| ()), Err(Error::NoExecuteAbove));
    let (_, leaf, _) = tables.translate(addr).unwrap();
    assert!(leaf.contains(rw_nx), "unchanged: {leaf:?}");
}
