//! The manager's page tables: other address spaces sharing the kernel half, the
//! region's top-level entries, tables adopted from before, and every frame back
//! when the manager is dropped.

mod common;

use common::vm::*;
use vmalloc::FrameSource;
use vmalloc::tlb::CountingFlush;
use vmalloc::vmalloc::*;
use vmalloc_sim::SimMachine;
use x86_64::structures::paging::PageTableFlags;
use x86_64::structures::paging::PhysFrame;
use x86_64::{PhysAddr, VirtAddr};

#[test]
fn areas_made_after_another_address_space_copied_the_kernel_half_are_visible_there() {
    let machine = machine();
    let frames = machine.frames();
    let vm = manager(&machine, &frames, config(false));
    // A process's address space: a PML4 with the kernel half copied once.
    let process = frames.alloc_frame().unwrap();
    // SAFETY: bytes the test owns: no live Rust value lives there.
    unsafe { machine.fill_phys(process.start_address(), 4096, 0) };
    for index in 256..512 {
        set_entry(
            &machine,
            process,
            index,
            entry(&machine, machine.root(), index),
        );
    }
    let ptr = vm.vmalloc(3 * 4096).unwrap();
    // SAFETY: bytes the test owns: no live Rust value lives there.
    unsafe { machine.write(addr(ptr) + 5000u64, b"shared") }.unwrap();
    machine.load_cr3(process);
    let mut back = [0; 6];
    machine.read(addr(ptr) + 5000u64, &mut back).unwrap();
    assert_eq!(&back, b"shared");
    machine.load_cr3(machine.root());

    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    unsafe { vm.vfree(ptr.as_ptr()) }.unwrap();
    vm.purge();
    for root in [process, machine.root()] {
        machine.load_cr3(root);
        assert!(machine.read(addr(ptr), &mut back).is_err(), "{root:?}");
    }
    machine.load_cr3(machine.root());
}

#[test]
fn the_regions_top_level_entries_never_change() {
    let machine = machine();
    let frames = machine.frames();
    let vm = manager(&machine, &frames, tree_config(false));
    let first = (VMALLOC_START >> 39) as usize & 511;
    assert_eq!(first, 402);
    let top = |machine: &SimMachine| -> Vec<u64> {
        (first..first + TOP_LEVEL_TABLES as usize)
            .map(|index| entry(machine, machine.root(), index))
            .collect()
    };
    let set_up = top(&machine);
    assert!(
        set_up.iter().all(|&raw| raw & 1 == 1),
        "all present after new"
    );
    for round in 0..20 {
        let far = VmOptions {
            align: 1 << 40,
            ..VmOptions::default()
        };
        let a = vm.vmalloc(4096).unwrap();
        let b = vm.vmalloc_with(8192, &far).unwrap();
        // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
        unsafe { vm.vfree(a.as_ptr()) }.unwrap();
        // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
        unsafe { vm.vfree(b.as_ptr()) }.unwrap();
        vm.purge();
        assert_eq!(top(&machine), set_up, "round {round}");
    }
    assert_eq!(vm.stats().page_table_frames, TOP_LEVEL_TABLES);
}

#[test]
fn tables_that_were_there_before_the_manager_are_adopted_and_never_freed() {
    let machine = machine();
    let frames = machine.frames();
    // A PDPT, PD and PT in the kernel image, which the frame allocator does not
    // manage, as a boot loader might have left them over the region's start.
    let [pdpt, pd, pt] = [0x20_0000u64, 0x20_1000, 0x20_2000]
        .map(|phys| PhysFrame::containing_address(PhysAddr::new(phys)));
    let table = (PageTableFlags::PRESENT | PageTableFlags::WRITABLE).bits();
    set_entry(
        &machine,
        machine.root(),
        402,
        pdpt.start_address().as_u64() | table,
    );
    set_entry(&machine, pdpt, 0, pd.start_address().as_u64() | table);
    set_entry(&machine, pd, 0, pt.start_address().as_u64() | table);
    let boot = [
        entry(&machine, machine.root(), 402),
        entry(&machine, pdpt, 0),
        entry(&machine, pd, 0),
    ];
    let vm = manager(&machine, &frames, tree_config(false));
    assert_eq!(vm.stats().page_table_frames, TOP_LEVEL_TABLES - 1);
    let baseline = free_frames(&frames);

    let near = vm.vmalloc(4096).unwrap();
    assert_eq!(addr(near), VirtAddr::new(VMALLOC_START));
    let far = VmOptions {
        align: 1 << 30,
        ..VmOptions::default()
    };
    let far = vm.vmalloc_with(4096, &far).unwrap();
    assert_eq!(
        vm.stats().page_table_frames,
        TOP_LEVEL_TABLES - 1 + 2,
        "a PD and a PT for the far area, none for the near one"
    );
    assert_eq!(
        vm.vmalloc_to_frame(addr(near)).unwrap(),
        PhysFrame::containing_address(PhysAddr::new(
            entry(&machine, pt, 0) & 0x000f_ffff_ffff_f000
        ))
    );
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    unsafe { vm.vfree(near.as_ptr()) }.unwrap();
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    unsafe { vm.vfree(far.as_ptr()) }.unwrap();
    vm.purge();
    let managed = vmalloc::paging::MANAGED.bits();
    let now = [
        entry(&machine, machine.root(), 402),
        entry(&machine, pdpt, 0),
        entry(&machine, pd, 0),
    ];
    assert_eq!(
        now,
        [boot[0] | managed, boot[1], boot[2]],
        "the boot tables stay linked and untouched, the top-level entry marked as the \
         manager's"
    );
    assert_eq!(entry(&machine, pdpt, 1), 0, "the manager's own PD is gone");
    assert_eq!(vm.stats().page_table_frames, TOP_LEVEL_TABLES - 1);
    assert_eq!(free_frames(&frames), baseline, "its own tables went back");
    assert_frames_conserved(&vm, &frames, 0);
    drop(vm);
    assert_eq!(
        entry(&machine, machine.root(), 402),
        boot[0],
        "the mark goes with the manager"
    );
}

/// The root's entries, all of them.
fn root_entries(machine: &SimMachine) -> Vec<u64> {
    (0..512)
        .map(|i| entry(machine, machine.root(), i))
        .collect()
}

/// A manager over the default region, which starts at root entry 402, as `config`
/// says; `Err` as `Vmalloc::new` returns it.
fn try_manager<'m>(
    machine: &'m SimMachine,
    frames: &'m vmalloc_sim::SimFrames,
    config: VmallocConfig,
) -> Result<SimVmalloc<'m, &'m vmalloc_sim::SimFrames>, vmalloc::Error> {
    // SAFETY: the machine's root table is used by nothing else in this test.
    unsafe { Vmalloc::new(config, machine.root(), machine.phys(), frames, machine) }
}

/// A region whose page tables map something already (the kernel's page, a 2 MiB or
/// 1 GiB entry, a recursive entry that maps the tables themselves) is refused, with
/// nothing changed: mapping over it would write the kernel's tables (through a
/// recursive entry, the root itself, outside the region) and the purge would free them.
#[test]
fn a_region_that_maps_something_already_is_refused() {
    let table = (PageTableFlags::PRESENT | PageTableFlags::WRITABLE).bits();
    let huge = table | PageTableFlags::HUGE_PAGE.bits();
    let [pdpt, pd, pt] = [0x20_0000u64, 0x20_1000, 0x20_2000]
        .map(|phys| PhysFrame::containing_address(PhysAddr::new(phys)));
    type Make<'a> = dyn Fn(&SimMachine) + 'a;
    let cases: [(&str, vmalloc::Error, &Make<'_>); 6] = [
        ("a 4 KiB page", vmalloc::Error::AlreadyMapped, &|machine| {
            set_entry(machine, pdpt, 3, pd.start_address().as_u64() | table);
            set_entry(machine, pd, 7, pt.start_address().as_u64() | table);
            set_entry(machine, pt, 9, 0x30_0000 | table);
        }),
        (
            "a not-present leaf",
            vmalloc::Error::AlreadyMapped,
            &|machine| {
                set_entry(machine, pdpt, 3, pd.start_address().as_u64() | table);
                set_entry(machine, pd, 7, pt.start_address().as_u64() | table);
                set_entry(machine, pt, 9, 0x30_0000);
            },
        ),
        (
            "a 2 MiB page",
            vmalloc::Error::HugePageInTheWay,
            &|machine| {
                set_entry(machine, pdpt, 3, pd.start_address().as_u64() | table);
                set_entry(machine, pd, 7, 0x40_0000 | huge);
            },
        ),
        (
            "a detached 2 MiB page",
            vmalloc::Error::HugePageInTheWay,
            &|machine| {
                set_entry(machine, pdpt, 3, pd.start_address().as_u64() | table);
                let detached = PageTableFlags::HUGE_PAGE | vmalloc::paging::DETACHED;
                set_entry(machine, pd, 7, 0x40_0000 | detached.bits());
            },
        ),
        (
            "a 1 GiB page",
            vmalloc::Error::HugePageInTheWay,
            &|machine| {
                set_entry(machine, pdpt, 3, huge);
            },
        ),
        (
            "a recursive entry",
            vmalloc::Error::AlreadyMapped,
            &|machine| {
                set_entry(machine, pdpt, 3, pdpt.start_address().as_u64() | table);
            },
        ),
    ];
    for (what, error, make) in cases {
        let machine = machine();
        let frames = machine.frames();
        set_entry(
            &machine,
            machine.root(),
            402,
            pdpt.start_address().as_u64() | table,
        );
        make(&machine);
        let before = (root_entries(&machine), free_frames(&frames));
        let made = try_manager(&machine, &frames, tree_config(false));
        assert_eq!(made.err(), Some(error), "{what}");
        assert_eq!(
            (root_entries(&machine), free_frames(&frames)),
            before,
            "{what}: nothing changed"
        );
    }
    // The root's own recursive entry in the region's slot.
    let machine = machine();
    let frames = machine.frames();
    let root = machine.root().start_address().as_u64();
    set_entry(&machine, machine.root(), 402, root | table);
    let before = (root_entries(&machine), free_frames(&frames));
    let made = try_manager(&machine, &frames, tree_config(false));
    assert_eq!(
        made.err(),
        Some(vmalloc::Error::AlreadyMapped),
        "the recursive slot"
    );
    assert_eq!((root_entries(&machine), free_frames(&frames)), before);
}

/// Tables a kernel made with this crate's own `PageTables` before it handed the
/// region over (a page mapped and unmapped again leaves them, empty and marked as
/// the crate's) are adopted like a boot loader's: no purge or drop frees them, and
/// the manager counts none of them.
#[test]
fn tables_this_crate_made_for_the_kernel_before_the_manager_are_adopted_too() {
    let machine = machine();
    let frames = machine.frames();
    // SAFETY: the machine's root table, which this test alone edits.
    let mut kernel = unsafe { vmalloc::paging::PageTables::new(machine.root(), machine.phys()) };
    let page = x86_64::structures::paging::Page::containing_address(VirtAddr::new(VMALLOC_START));
    let pages = x86_64::structures::paging::Page::range(page, page + 1);
    let data = frames.alloc_frame().unwrap();
    let flags = PageTableFlags::WRITABLE | PageTableFlags::NO_EXECUTE;
    // SAFETY: the kernel's frame and tables, mapped and unmapped before any manager.
    unsafe {
        kernel.map(pages, [data], flags, &&frames).unwrap();
        let _ = kernel.unmap(pages, |_, _| {}).unwrap();
    }
    let root_before = root_entries(&machine);
    let pdpt =
        PhysFrame::containing_address(PhysAddr::new(root_before[402] & 0x000f_ffff_ffff_f000));
    let pd_entry = entry(&machine, pdpt, 0);
    let kernel_tables = free_frames(&frames);
    let vm = manager(&machine, &frames, tree_config(true));
    assert_eq!(
        vm.stats().page_table_frames,
        TOP_LEVEL_TABLES - 1,
        "adopted, not made"
    );
    let ptr = vm
        .vmalloc_with(
            4096,
            &VmOptions {
                align: 1 << 30,
                ..VmOptions::default()
            },
        )
        .unwrap();
    assert_eq!(
        addr(ptr),
        VirtAddr::new(VMALLOC_START),
        "in the kernel's tables"
    );
    // SAFETY: nothing uses the area after this.
    unsafe { vm.vfree(ptr.as_ptr()) }.unwrap();
    vm.purge();
    assert_eq!(
        entry(&machine, pdpt, 0) & 0x000f_ffff_ffff_f000,
        pd_entry & 0x000f_ffff_ffff_f000,
        "the kernel's PD stays"
    );
    assert_eq!(vm.stats().page_table_frames, TOP_LEVEL_TABLES - 1);
    drop(vm);
    assert_eq!(
        root_entries(&machine),
        root_before,
        "the root as the kernel left it"
    );
    assert_eq!(
        free_frames(&frames),
        kernel_tables,
        "every frame the manager took is back, none of the kernel's"
    );
}

/// Two managers whose regions share a top-level entry would share the tables below
/// it, each freeing what the other maps through (side by side in one page
/// directory, the second one's purge freed the first one's directory and its count
/// of tables went below zero: a panic in a debug build). The second is refused, with
/// nothing changed, while the first lives; regions in other top-level entries, or
/// in another address space, are not.
#[test]
fn a_region_sharing_a_top_level_entry_with_a_live_manager_is_refused() {
    let machine = machine();
    let frames = machine.frames();
    let region = |start: u64, size: u64| VmallocConfig {
        start: VirtAddr::new(start),
        size,
        ..tree_config(true)
    };
    let left = manager(&machine, &frames, region(VMALLOC_START, 8 << 20));
    let area = left.vmalloc(4096).unwrap();
    let before = (root_entries(&machine), free_frames(&frames));
    for (start, size) in [
        (VMALLOC_START + (8 << 20), 8 << 20),
        (VMALLOC_START - (1 << 39), 2 << 39),
        (VMALLOC_START + (1 << 30), 4096),
    ] {
        assert_eq!(
            try_manager(&machine, &frames, region(start, size)).err(),
            Some(vmalloc::Error::Overlap),
            "{start:#x}, {size} bytes"
        );
    }
    assert_eq!((root_entries(&machine), free_frames(&frames)), before);
    // The next top-level entry, and another machine's same region, are fine.
    let next = manager(
        &machine,
        &frames,
        region(VMALLOC_START + (1 << 39), 8 << 20),
    );
    let other_machine = common::vm::machine();
    let other_frames = other_machine.frames();
    let other = manager(
        &other_machine,
        &other_frames,
        region(VMALLOC_START, 8 << 20),
    );
    // SAFETY: nothing uses the area after this.
    unsafe { left.vfree(area.as_ptr()) }.unwrap();
    drop(left);
    // Once the first is gone, its region may be had again.
    let again = manager(
        &machine,
        &frames,
        region(VMALLOC_START + (8 << 20), 8 << 20),
    );
    drop((next, other, again));
}

#[test]
fn dropping_the_manager_returns_every_frame_it_took() {
    let machine = machine();
    let frames = machine.frames();
    let before = free_frames(&frames);
    let tlb = CountingFlush::new();
    let mut lent = [PhysFrame::containing_address(PhysAddr::zero()); 4];
    assert_eq!(frames.alloc_frames(&mut lent), 4);
    {
        // SAFETY: the machine's root table is used by nothing else in this test.
        let vm = unsafe {
            Vmalloc::new(
                VmallocConfig::default(),
                machine.root(),
                machine.phys(),
                &frames,
                &tlb,
            )
        }
        .unwrap();
        let ptrs: Vec<_> = (0..200)
            .map(|i| vm.vmalloc((i % 7 + 1) * 4096).unwrap())
            .collect();
        for ptr in ptrs.iter().step_by(3) {
            // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
            unsafe { vm.vfree(ptr.as_ptr()) }.unwrap();
        }
        let window = vm.reserve(1 << 20, &VmOptions::default()).unwrap();
        // SAFETY: the test's own area: nothing relies on its pages staying unmapped.
        unsafe { vm.populate(window.as_ptr(), 300 << 10) }.unwrap();
        // SAFETY: frames the test owns; MMIO past the end of RAM, never touched.
        unsafe {
            vm.vmap(&lent, Prot::KERNEL_RW).unwrap();
            vm.ioremap(PhysAddr::new(0xfec0_0000), 4096, CacheMode::Uncached)
                .unwrap();
        }
        assert!(vm.stats().pending_purge_frames > 0);
        assert!(free_frames(&frames) < before - 4 - TOP_LEVEL_TABLES);
    }
    assert_eq!(
        free_frames(&frames),
        before - 4,
        "all but the test's own frames"
    );
    // The order, each frame back only after its flush, is the gather's
    // (`gather.rs`: `held_frames_go_back_after_the_flush_of_what_was_gathered_before_them`).
    assert!(tlb.full_calls() > 0, "the drop flushed");
    for index in 402..402 + TOP_LEVEL_TABLES as usize {
        assert_eq!(entry(&machine, machine.root(), index), 0, "entry {index}");
    }
    // SAFETY: frames the test took and no longer uses (or a bad free, refused).
    unsafe { frames.free_frames(&lent) }.unwrap();
}

/// The marks that tell a manager's top-level entries live in the address space: a
/// manager forgotten rather than dropped keeps its region (another over it is
/// refused: its areas are still mapped there), while a new machine, whose memory the
/// host may place where the old one's was, starts with none; and no count of live
/// managers limits the check.
#[test]
fn the_marks_of_a_managers_region_live_in_its_address_space() {
    for _ in 0..3 {
        let machine = machine();
        let frames = machine.frames();
        let forgotten = manager(&machine, &frames, tree_config(false));
        core::mem::forget(forgotten);
        assert_eq!(
            try_manager(&machine, &frames, tree_config(false)).err(),
            Some(vmalloc::Error::Overlap)
        );
    }
    let machine = machine();
    let frames = machine.frames();
    let region = |index: u64| VmallocConfig {
        start: VirtAddr::new(index << 39),
        size: 1 << 39,
        ..tree_config(false)
    };
    let mut managers: Vec<_> = (1..=100)
        .map(|index| manager(&machine, &frames, region(index)))
        .collect();
    drop(managers.remove(0));
    for index in [2, 50, 100] {
        assert_eq!(
            try_manager(&machine, &frames, region(index)).err(),
            Some(vmalloc::Error::Overlap),
            "top-level entry {index}"
        );
    }
    let again = manager(&machine, &frames, region(1));
    drop((again, managers));
}

/// This crate's other page-table code beside a manager whose region shares a
/// top-level entry with the kernel's own page (a region not on a 512 GiB boundary):
/// the kernel's clean-up of its page (`PageTableMapper::clean_up_addr_range`) or
/// release of its top-level range (`PageTables::release_top_level`) leaves the
/// manager's top-level table, which its mark names. Both freed it (the root entry
/// went to 0, and a second manager over the region was accepted).
#[test]
fn the_crates_own_clean_up_beside_a_region_leaves_the_managers_top_level_table() {
    use vmalloc::frame::MapperFrames;
    use vmalloc::paging::{PageTableMapper, PageTables};
    use x86_64::structures::paging::mapper::CleanUp;
    use x86_64::structures::paging::{Mapper, Page, Size4KiB};
    let kernel_page = Page::<Size4KiB>::containing_address(VirtAddr::new(VMALLOC_START));
    let region = VmallocConfig {
        start: VirtAddr::new(VMALLOC_START + (1 << 30)),
        size: 1 << 30,
        ..tree_config(false)
    };
    for through_release in [false, true] {
        let machine = machine();
        let frames = machine.frames();
        // SAFETY: the kernel's tables, which the test edits outside the region only.
        let mut tables = unsafe { PageTables::new(machine.root(), machine.phys()) };
        let own = Page::range(kernel_page, kernel_page + 1);
        let mut mapper = None;
        if through_release {
            // SAFETY: frames from the machine's allocator.
            assert_eq!(unsafe { tables.preallocate_top_level(own, &frames) }, Ok(1));
        } else {
            let mut kernel = PageTableMapper::new(tables);
            let data = frames.alloc_frame().unwrap();
            let flags = PageTableFlags::PRESENT | PageTableFlags::WRITABLE;
            // SAFETY: a page and a frame nothing else uses.
            unsafe { kernel.map_to(kernel_page, data, flags, &mut MapperFrames(&frames)) }
                .unwrap()
                .ignore();
            mapper = Some((kernel, data));
            // SAFETY: as above.
            tables = unsafe { PageTables::new(machine.root(), machine.phys()) };
        }
        let vm = manager(&machine, &frames, region);
        let marked = entry(&machine, machine.root(), 402);
        if let Some((mut kernel, data)) = mapper {
            let (frame, flush) = kernel.unmap(kernel_page).unwrap();
            flush.ignore();
            assert_eq!(frame, data);
            // SAFETY: the kernel's own page's range; its tables came from `frames`.
            unsafe {
                kernel.clean_up_addr_range(
                    Page::range_inclusive(kernel_page, kernel_page),
                    &mut MapperFrames(&frames),
                )
            };
        } else {
            // SAFETY: no other address space copied the kernel's root entries.
            let (count, _) = unsafe { tables.release_top_level(own, |_| ()) }.unwrap();
            assert_eq!(count, 0, "nothing of the kernel's own to release");
        }
        assert_eq!(entry(&machine, machine.root(), 402), marked);
        assert_eq!(
            try_manager(&machine, &frames, region).err(),
            Some(vmalloc::Error::Overlap)
        );
        let area = vm.vmalloc(4096).unwrap();
        // SAFETY: nothing uses the area after this.
        unsafe { vm.vfree(area.as_ptr()) }.unwrap();
    }
}
