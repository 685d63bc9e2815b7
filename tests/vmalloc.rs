//! The vmalloc manager on the simulated machine: every public call's mapping, its
//! protections, its errors on bad input, the regions it accepts, and `set_prot`.
//! Lazy frees and rollback are in `vmalloc_purge.rs`, `vrealloc` in
//! `vmalloc_realloc.rs`, owners and `vmap`/`ioremap` in `vmalloc_owners.rs`, listings
//! and threads in `vmalloc_listing.rs`, page tables in `vmalloc_tables.rs`.

mod common;

use common::vm::*;
use vmalloc::vmalloc::*;
use vmalloc::{Error, FrameSource};
use vmalloc_sim::{Access, SimConfig, SimMachine};
use x86_64::structures::idt::PageFaultErrorCode;
use x86_64::structures::paging::PageTableFlags;
use x86_64::structures::paging::PhysFrame;
use x86_64::{PhysAddr, VirtAddr};

#[test]
fn data_written_through_the_mmu_reads_back_from_scattered_frames() {
    let machine = machine();
    let frames = machine.frames();
    let vm = manager(&machine, &frames, config(false));
    let size = 300 * 4096 + 123;
    let ptr = vm.vmalloc(size).unwrap();
    let data: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
    // SAFETY: bytes the test owns: no live Rust value lives there.
    unsafe { machine.write(addr(ptr), &data) }.unwrap();
    let mut back = vec![0; size];
    machine.read(addr(ptr), &mut back).unwrap();
    assert_eq!(back, data);

    let backing: Vec<PhysFrame> = (0..301)
        .map(|i| vm.vmalloc_to_frame(addr(ptr) + i * 4096).unwrap())
        .collect();
    let consecutive = backing
        .windows(2)
        .filter(|w| w[1].start_address() == w[0].start_address() + 4096u64)
        .count();
    assert!(
        consecutive < 30,
        "frames should be scattered, {consecutive} of 300 are consecutive"
    );
    // Each page's bytes sit in the frame vmalloc_to_frame names.
    let mut page = vec![0; 4096];
    machine.read_phys(backing[17].start_address(), &mut page);
    assert_eq!(page, data[17 * 4096..18 * 4096]);
}

#[test]
fn vzalloc_zeroes_frames_that_held_data() {
    // Without scatter the frames a purge gives back are the first handed out again.
    let machine = SimMachine::new(SimConfig::new(64 << 20));
    let frames = machine.frames();
    let vm = manager(&machine, &frames, config(true));
    let dirty = vm.vmalloc(64 * 4096).unwrap();
    // SAFETY: bytes the test owns: no live Rust value lives there.
    unsafe { machine.write(addr(dirty), &vec![0xa5; 64 * 4096]) }.unwrap();
    let dirtied: Vec<PhysFrame> = (0..64)
        .map(|i| vm.vmalloc_to_frame(addr(dirty) + i * 4096).unwrap())
        .collect();
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    unsafe { vm.vfree(dirty.as_ptr()) }.unwrap();
    let zeroed = vm.vzalloc(64 * 4096).unwrap();
    let reused = (0..64)
        .filter(|&i| dirtied.contains(&vm.vmalloc_to_frame(addr(zeroed) + i * 4096).unwrap()))
        .count();
    assert!(reused > 0, "the dirtied frames came back");
    let mut back = vec![1; 64 * 4096];
    machine.read(addr(zeroed), &mut back).unwrap();
    assert!(back.iter().all(|&b| b == 0));
}

#[test]
fn the_guard_page_faults_and_the_default_protection_is_rw_nx_global() {
    let machine = machine();
    let frames = machine.frames();
    let vm = manager(&machine, &frames, config(false));
    let ptr = vm.vmalloc(2 * 4096).unwrap();
    let guard = addr(ptr) + 2 * 4096u64;
    let fault = machine
        .read(guard, &mut [0])
        .unwrap_err()
        .page_fault()
        .unwrap();
    assert_eq!(fault.addr, guard);
    let t = machine.translate(addr(ptr), Access::WRITE).unwrap();
    assert!(
        t.flags.contains(
            PageTableFlags::NO_EXECUTE | PageTableFlags::GLOBAL | PageTableFlags::WRITABLE
        )
    );
    assert!(!t.flags.contains(PageTableFlags::USER_ACCESSIBLE));
    assert!(machine.fetch(addr(ptr), &mut [0]).is_err());
    // The next area starts after the guard page.
    let next = vm.vmalloc(4096).unwrap();
    assert_eq!(addr(next), guard + 4096u64);
    let unguarded = VmOptions {
        flags: VmFlags::NO_GUARD,
        ..VmOptions::default()
    };
    let a = vm.vmalloc_with(4096, &unguarded).unwrap();
    let b = vm.vmalloc_with(4096, &unguarded).unwrap();
    assert_eq!(addr(b), addr(a) + 4096u64);
}

#[test]
fn read_only_and_executable_areas_get_exactly_their_rights() {
    let machine = machine();
    let frames = machine.frames();
    let vm = manager(&machine, &frames, config(false));
    let with = |prot| VmOptions {
        prot,
        ..VmOptions::default()
    };
    assert_eq!(Prot::KERNEL_RO, Prot::READ);
    assert_eq!(Prot::KERNEL_RX, Prot::READ | Prot::EXEC);
    let read_only = addr(vm.vmalloc_with(4096, &with(Prot::KERNEL_RO)).unwrap());
    machine.read(read_only, &mut [0]).unwrap();
    assert!(is_write_protection_fault(&machine, read_only));
    assert!(machine.fetch(read_only, &mut [0]).is_err());

    let code = addr(vm.vmalloc_with(4096, &with(Prot::KERNEL_RX)).unwrap());
    machine.fetch(code, &mut [0]).unwrap();
    assert!(is_write_protection_fault(&machine, code));

    let data = addr(vm.vmalloc(4096).unwrap());
    // SAFETY: bytes the test owns: no live Rust value lives there.
    unsafe { machine.write(data, &[1]) }.unwrap();
    assert!(machine.fetch(data, &mut [0]).is_err());
}

#[test]
fn bad_input_gets_a_specific_error_and_changes_nothing() {
    let machine = machine();
    let frames = machine.frames();
    let vm = manager(&machine, &frames, config(false));
    let live = vm.vmalloc(3 * 4096).unwrap();
    let window = vm.reserve(64 << 10, &VmOptions::default()).unwrap();
    // SAFETY: a frame the test owns, never freed while mapped.
    let mapped = unsafe { vm.vmap(&[frames.alloc_frame().unwrap()], Prot::KERNEL_RW) }.unwrap();
    let before = (vm.stats(), free_frames(&frames));

    assert_eq!(vm.vmalloc(0), Err(Error::ZeroSize));
    assert_eq!(vm.vmalloc(usize::MAX), Err(Error::SizeTooLarge));
    assert_eq!(vm.vmalloc(VMALLOC_SIZE as usize), Err(Error::SizeTooLarge));
    for align in [3 * 4096, 1 << 46, 1 << 63] {
        let odd = VmOptions {
            align,
            ..VmOptions::default()
        };
        assert_eq!(
            vm.vmalloc_with(4096, &odd),
            Err(Error::BadAlignment),
            "{align:#x}"
        );
        assert_eq!(
            vm.reserve(4096, &odd),
            Err(Error::BadAlignment),
            "{align:#x}"
        );
    }
    let wx = VmOptions {
        prot: Prot::WRITE | Prot::EXEC,
        ..VmOptions::default()
    };
    assert_eq!(vm.vmalloc_with(4096, &wx), Err(Error::WriteExecute));
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    assert_eq!(
        unsafe { vm.vfree(core::ptr::null_mut()) },
        Err(Error::NullPointer)
    );
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    assert_eq!(
        unsafe { vm.vfree(0x1000 as *mut u8) },
        Err(Error::NotInRegion)
    );
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    assert_eq!(
        unsafe { vm.vfree(0x8000_0000_0000 as *mut u8) },
        Err(Error::NotInRegion)
    );
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    assert_eq!(
        unsafe { vm.vfree(live.as_ptr().wrapping_add(4096)) },
        Err(Error::InteriorPointer)
    );
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    assert_eq!(
        unsafe { vm.vfree(live.as_ptr().wrapping_add(1)) },
        Err(Error::InteriorPointer)
    );
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    assert_eq!(
        unsafe { vm.vfree(live.as_ptr().wrapping_add(3 * 4096)) },
        Err(Error::NotAllocated)
    );
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    assert_eq!(
        unsafe { vm.vfree((VMALLOC_START + (1 << 40)) as *mut u8) },
        Err(Error::NotAllocated)
    );
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    assert_eq!(unsafe { vm.vfree(mapped.as_ptr()) }, Err(Error::WrongKind));
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    assert_eq!(
        unsafe { vm.vunmap(live.as_ptr(), |_| ()) },
        Err(Error::WrongKind)
    );
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    assert_eq!(unsafe { vm.iounmap(live.as_ptr()) }, Err(Error::WrongKind));
    // A pointer in page 0 that is not null is outside the region for every call
    // (iounmap rounds to the page start: it said NullPointer).
    for not_in_region in [0x10 as *mut u8, 0xfff as *mut u8] {
        // SAFETY: a pointer to no live area is refused.
        unsafe {
            assert_eq!(vm.vfree(not_in_region), Err(Error::NotInRegion));
            assert_eq!(vm.iounmap(not_in_region), Err(Error::NotInRegion));
        }
    }
    // SAFETY: a pointer to no live area is refused.
    assert_eq!(
        unsafe { vm.iounmap(core::ptr::null_mut()) },
        Err(Error::NullPointer)
    );
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    assert_eq!(
        unsafe { vm.vrealloc(mapped.as_ptr(), 8192) },
        Err(Error::WrongKind)
    );
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    assert_eq!(
        unsafe { vm.vrealloc(live.as_ptr(), 0) },
        Err(Error::ZeroSize)
    );
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    assert_eq!(
        unsafe { vm.vrealloc(live.as_ptr(), usize::MAX) },
        Err(Error::SizeTooLarge)
    );
    // SAFETY: the test's own area: nothing relies on its pages staying unmapped.
    assert_eq!(
        unsafe { vm.populate(live.as_ptr(), 4096) },
        Err(Error::WrongKind)
    );
    for past_the_end in [usize::MAX, usize::MAX - 4095, (64 << 10) + 1] {
        assert_eq!(
            // SAFETY: the test's own area: nothing relies on its pages staying unmapped.
            unsafe { vm.populate(window.as_ptr(), past_the_end) },
            Err(Error::SizeTooLarge)
        );
    }
    // SAFETY: the calls are refused before anything is mapped.
    unsafe {
        assert_eq!(
            vm.ioremap(PhysAddr::new(0xfee0_0000), 0, CacheMode::Uncached),
            Err(Error::ZeroSize)
        );
        assert_eq!(
            vm.ioremap(PhysAddr::new(0xfee0_0000), usize::MAX, CacheMode::Uncached),
            Err(Error::SizeTooLarge)
        );
        assert_eq!(vm.vmap(&[], Prot::KERNEL_RW), Err(Error::ZeroSize));
    }
    assert_eq!((vm.stats(), free_frames(&frames)), before);

    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    unsafe { vm.vfree(live.as_ptr()) }.unwrap();
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    assert_eq!(
        unsafe { vm.vfree(live.as_ptr()) },
        Err(Error::NotAllocated),
        "double free"
    );
}

#[test]
fn regions_that_cannot_be_managed_are_refused() {
    let machine = machine();
    let frames = machine.frames();
    let free = free_frames(&frames);
    let region = |start: u64, size: u64| VmallocConfig {
        start: VirtAddr::new_truncate(start),
        size,
        ..VmallocConfig::default()
    };
    let lower_top = 1u64 << 47;
    let cases = [
        (region(0, 1 << 30), Error::NullPointer),
        (region(lower_top - 0x4000, 0x4000), Error::NonCanonical),
        (region(lower_top - 0x4000, 0x8000), Error::NonCanonical),
        (region(0xffff_ffff_ffff_0000, 0x1_0000), Error::RangeWraps),
        (region(0x1000, 0), Error::ZeroSize),
        (region(0x1000, 0x1800), Error::Unaligned),
    ];
    for (config, error) in cases {
        // SAFETY: the machine's root table is used by nothing else in this test.
        let made =
            unsafe { Vmalloc::new(config, machine.root(), machine.phys(), &frames, &machine) };
        assert_eq!(made.err(), Some(error), "{config:?}");
        assert_eq!(free_frames(&frames), free, "a refused region kept frames");
    }
}

#[test]
fn a_region_just_below_the_top_of_the_lower_half_fills_up_cleanly() {
    let machine = machine();
    let frames = machine.frames();
    let start = (1u64 << 47) - 9 * 4096;
    let config = VmallocConfig {
        start: VirtAddr::new(start),
        size: 8 * 4096,
        ..config(false)
    };
    let vm = manager(&machine, &frames, config);
    let unguarded = VmOptions {
        flags: VmFlags::NO_GUARD,
        ..VmOptions::default()
    };
    let a = vm.vmalloc(4096).unwrap();
    let b = vm.vmalloc_with(8192, &unguarded).unwrap();
    let c = vm.vmalloc_with(4 * 4096, &unguarded).unwrap();
    assert_eq!(addr(c) + 4 * 4096u64, VirtAddr::new(start + 8 * 4096));
    assert_eq!(vm.vmalloc(4096), Err(Error::OutOfVirtualSpace));
    // SAFETY: bytes the test owns: no live Rust value lives there.
    unsafe { machine.write(addr(c) + 4 * 4096u64 - 1u64, &[1]) }.unwrap();
    for ptr in [a, b, c] {
        // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
        unsafe { vm.vfree(ptr.as_ptr()) }.unwrap();
    }
    vm.purge();
    assert_eq!(vm.stats().largest_free, 8 * 4096);
}

/// An area without a guard page may take the whole region; with one, it may not, and
/// is too large for it.
#[test]
fn an_unguarded_area_may_fill_the_whole_region() {
    let machine = machine();
    let frames = machine.frames();
    let config = VmallocConfig {
        size: 32 * 4096,
        ..tree_config(false)
    };
    let vm = manager(&machine, &frames, config);
    let unguarded = VmOptions {
        flags: VmFlags::NO_GUARD,
        ..VmOptions::default()
    };
    let whole = 32 * 4096;
    for guarded in [
        vm.vmalloc(whole),
        vm.reserve(whole, &VmOptions::default()),
        vm.reserve_sparse(whole, &VmOptions::default()),
    ] {
        assert_eq!(guarded, Err(Error::SizeTooLarge));
    }
    type Make<'v> = Box<dyn Fn() -> Result<core::ptr::NonNull<u8>, Error> + 'v>;
    let makers: [(&str, Make<'_>); 3] = [
        (
            "vmalloc_with",
            Box::new(|| vm.vmalloc_with(whole, &unguarded)),
        ),
        ("reserve", Box::new(|| vm.reserve(whole, &unguarded))),
        (
            "reserve_sparse",
            Box::new(|| vm.reserve_sparse(whole, &unguarded)),
        ),
    ];
    for (name, make) in makers {
        let area = make().unwrap_or_else(|error| panic!("{name}: {error:?}"));
        assert_eq!(addr(area), config.start, "{name}");
        assert_eq!(vm.stats().largest_free, 0, "{name}");
        // SAFETY: nothing uses the area after this.
        unsafe { vm.vfree(area.as_ptr()) }.unwrap();
        vm.purge();
    }
    // Grown to the whole region: the unguarded area may, the guarded one may not.
    let guarded = vm.vmalloc(4096).unwrap();
    // SAFETY: a live area, refused unchanged.
    assert_eq!(
        unsafe { vm.vrealloc(guarded.as_ptr(), whole) },
        Err(Error::SizeTooLarge)
    );
    // SAFETY: nothing uses the area after this.
    unsafe { vm.vfree(guarded.as_ptr()) }.unwrap();
    vm.purge();
    let small = vm.vmalloc_with(4096, &unguarded).unwrap();
    // SAFETY: nothing uses the area through `small` after the call.
    let grown = unsafe { vm.vrealloc(small.as_ptr(), whole) }.unwrap();
    assert_eq!(vm.stats().largest_free, 0);
    // SAFETY: nothing uses the area after this.
    unsafe { vm.vfree(grown.as_ptr()) }.unwrap();
    vm.purge();
    assert_eq!(vm.stats().largest_free, whole as u64);
}

#[test]
fn set_prot_changes_a_whole_area_and_flushes_what_the_tlb_cached() {
    let machine = machine();
    let frames = machine.frames();
    let vm = manager(&machine, &frames, config(false));
    let ptr = vm.vmalloc(3 * 4096).unwrap();
    let at = addr(ptr) + 2 * 4096u64 + 8;
    // Cache a writable translation of every page first.
    for page in 0..3u64 {
        // SAFETY: bytes the test owns: no live Rust value lives there.
        unsafe { machine.write(addr(ptr) + page * 4096, &[7]) }.unwrap();
    }
    let before = (free_frames(&frames), vm.stats());

    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    unsafe { vm.set_prot(ptr.as_ptr(), Prot::READ) }.unwrap();
    // SAFETY: bytes the test owns: no live Rust value lives there.
    let fault = unsafe { machine.write(at, &[1]) }
        .unwrap_err()
        .page_fault()
        .unwrap();
    assert!(
        fault
            .code
            .contains(PageFaultErrorCode::PROTECTION_VIOLATION)
    );
    let diagnosis = vm.diagnose_fault(fault.addr, fault.code).to_string();
    assert!(
        diagnosis.starts_with("write to read-only memory of an area (12 KiB vmalloc"),
        "{diagnosis}"
    );
    let mut byte = [0];
    machine.read(addr(ptr), &mut byte).unwrap();
    assert_eq!(byte, [7], "the same frames, readable");

    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    unsafe { vm.set_prot(ptr.as_ptr(), Prot::READ | Prot::EXEC) }.unwrap();
    machine.fetch(at, &mut byte).unwrap();
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    unsafe { vm.set_prot(ptr.as_ptr(), Prot::KERNEL_RW) }.unwrap();
    assert!(machine.fetch(at, &mut byte).is_err(), "NX again, flushed");
    // SAFETY: bytes the test owns: no live Rust value lives there.
    unsafe { machine.write(at, &[2]) }.unwrap();
    assert_eq!((free_frames(&frames), vm.stats()), before);

    // Growing keeps the rights the area has now.
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    unsafe { vm.set_prot(ptr.as_ptr(), Prot::READ) }.unwrap();
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    let grown = unsafe { vm.vrealloc(ptr.as_ptr(), 6 * 4096) }.unwrap();
    // SAFETY: bytes the test owns: no live Rust value lives there.
    assert!(unsafe { machine.write(addr(grown) + 5 * 4096u64, &[1]) }.is_err());

    // Bad input changes nothing.
    let snapshot = (free_frames(&frames), vm.stats());
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    assert_eq!(
        unsafe { vm.set_prot(grown.as_ptr(), Prot::WRITE | Prot::EXEC) },
        Err(Error::WriteExecute)
    );
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    assert_eq!(
        unsafe { vm.set_prot(grown.as_ptr().wrapping_add(4096), Prot::READ) },
        Err(Error::InteriorPointer)
    );
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    assert_eq!(
        unsafe { vm.set_prot(core::ptr::null_mut(), Prot::READ) },
        Err(Error::NullPointer)
    );
    assert_eq!((free_frames(&frames), vm.stats()), snapshot);
    let frames_for_vmap = vmalloc_sim::scenarios::frames_for_vmap(&frames, 1);
    // SAFETY: the frames are the test's own.
    let mapped = unsafe { vm.vmap(&frames_for_vmap, Prot::KERNEL_RW) }.unwrap();
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    assert_eq!(
        unsafe { vm.set_prot(mapped.as_ptr(), Prot::READ) },
        Err(Error::WrongKind)
    );
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    unsafe { vm.vunmap(mapped.as_ptr(), |_| {}) }.unwrap();
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    unsafe { vm.vfree(grown.as_ptr()) }.unwrap();
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    assert_eq!(
        unsafe { vm.set_prot(grown.as_ptr(), Prot::READ) },
        Err(Error::NotAllocated)
    );
    // SAFETY: bytes the test owns: no live Rust value lives there.
    assert!(unsafe { machine.write(addr(grown), &[1]) }.is_err());
}

/// Every call of `VmallocOps` that takes a pointer refuses a non-canonical one (as
/// `vfree` does) instead of panicking, and changes nothing; so does the kernel
/// heap's free of one as a large block.
#[test]
fn every_pointer_call_refuses_a_non_canonical_pointer() {
    let machine = machine();
    let frames = machine.frames();
    let vm = manager(&machine, &frames, config(false));
    let ops: &dyn VmallocOps = &vm;
    let live = ops.vmalloc_with(3 * 4096, &VmOptions::default()).unwrap();
    let before = given_out(&vm);
    for bad in [
        0x8000_0000_0000_0000_u64,
        0x0000_8000_0000_0000,
        0xdead_0000_0000_0000,
    ] {
        let ptr = bad as *mut u8;
        // SAFETY: a pointer to no area: every call refuses it.
        unsafe {
            assert_eq!(ops.vfree(ptr), Err(Error::NotInRegion));
            assert_eq!(ops.vfree_tagged(ptr, "t"), Err(Error::NotInRegion));
            assert!(ops.vrealloc(ptr, 4096).is_err());
            assert!(ops.unmap_page(ptr, 0).is_err());
            assert!(ops.vunmap(ptr, &mut |_| {}).is_err());
            assert!(ops.iounmap(ptr).is_err());
            assert_eq!(ops.retag(ptr, "t", "u"), None);
            assert!(ops.populate(ptr, 4096).is_err());
            assert!(ops.map_page(ptr, 0).is_err());
        }
        assert_eq!(ops.area_size(ptr, "t"), None);
        let heap = vmalloc::heap::KernelHeap::new(vmalloc::heap::HeapConfig {
            window: 1 << 20,
            ..vmalloc::heap::HeapConfig::DEFAULT
        });
        heap.init(ops).unwrap();
        let layout = std::alloc::Layout::from_size_align(1 << 20, 8).unwrap();
        // SAFETY: deliberately wrong: the heap made no such block, and refuses it.
        unsafe { std::alloc::GlobalAlloc::dealloc(&heap, ptr, layout) };
        assert_eq!(heap.stats().refused_frees, 1);
        drop(heap);
        assert_eq!(given_out(&vm), before, "{bad:#x}");
    }
    // SAFETY: the test's area, not used afterwards.
    unsafe { ops.vfree(live.as_ptr()) }.unwrap();
}

/// A `vunmap` whose `on_frame` panics (the caller's bug) still takes the area away
/// whole: nothing stays half-unmapped, the manager goes on working and is dropped
/// cleanly, and the frames the callback never saw stay the caller's.
#[test]
fn a_vunmap_whose_callback_panics_still_takes_the_whole_area_away() {
    let machine = machine();
    let frames = machine.frames();
    let vm = manager(&machine, &frames, config(false));
    let before = given_out(&vm);
    let mine: Vec<PhysFrame> = (0..300).map(|_| frames.alloc_frame().unwrap()).collect();
    let free_frames = frames.stats().free;
    // SAFETY: the frames are this test's, mapped nowhere else.
    let area = unsafe { vm.vmap(&mine, Prot::KERNEL_RW) }.unwrap();
    let mut seen = 0;
    let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // SAFETY: nothing uses the mapping afterwards.
        unsafe {
            vm.vunmap(area.as_ptr(), |_| {
                seen += 1;
                assert!(seen < 100, "a driver's bug");
            })
        }
    }));
    assert!(unwound.is_err());
    assert_eq!(given_out(&vm), before, "the area is gone whole");
    // SAFETY: as above; the area is gone, and the call is refused.
    assert_eq!(
        unsafe { vm.vunmap(area.as_ptr(), |_| {}) },
        Err(Error::NotAllocated)
    );
    assert_eq!(
        frames.stats().free,
        free_frames,
        "the frames stay the caller's"
    );
    // SAFETY: as above.
    let again = unsafe { vm.vmap(&mine, Prot::KERNEL_RW) }.unwrap();
    let mut back = Vec::new();
    // SAFETY: nothing uses the mapping afterwards.
    unsafe { vm.vunmap(again.as_ptr(), |frame| back.push(frame)) }.unwrap();
    assert_eq!(back, mine);
    drop(vm);
}

/// What a manager has given out: areas, bytes of its region and frames mapped.
fn given_out<F: FrameSource + Clone>(vm: &SimVmalloc<'_, F>) -> (u64, u64, u64) {
    vm.purge();
    let stats = vm.stats();
    (stats.areas, stats.used, stats.data_frames)
}

/// Below a boot loader's top-level entry with `NO_EXECUTE` (which the manager
/// adopts), no area is made executable: a tree area's or a per-CPU block area's
/// `set_prot`, and an executable area of block size, each get
/// [`Error::NoExecuteAbove`] and change nothing; data rights still change.
#[test]
fn executable_rights_below_a_no_execute_top_level_entry_are_refused() {
    let machine = machine();
    let frames = machine.frames();
    let pdpt = frames.alloc_frame().unwrap();
    // SAFETY: a fresh frame, ours: zeroed, it is an empty table.
    unsafe { machine.write_phys(pdpt.start_address(), &[0; 4096]) };
    let nx = PageTableFlags::PRESENT | PageTableFlags::WRITABLE | PageTableFlags::NO_EXECUTE;
    let entry = pdpt.start_address().as_u64() | nx.bits();
    let slot = machine.root().start_address() + ((VMALLOC_START >> 39) & 511) * 8;
    // SAFETY: the root's entry for the region, which nothing uses yet.
    unsafe { machine.write_phys(slot, &entry.to_le_bytes()) };
    let vm = manager(&machine, &frames, VmallocConfig::default());

    let text = VmOptions {
        prot: Prot::READ,
        tag: "module text",
        ..VmOptions::default()
    };
    let tree = vm.vmalloc_with(4 * 4096, &text).unwrap();
    let block = vm.vmalloc(4096).unwrap();
    assert_eq!(vm.stats().block_areas, 1, "one area from a per-CPU block");
    let before = (
        vm.stats(),
        free_frames(&frames),
        vm.areas().collect::<Vec<_>>(),
    );
    for (name, ptr) in [("tree", tree), ("block", block)] {
        // SAFETY: the test owns the area; nothing relies on its rights.
        let exec = unsafe { vm.set_prot(ptr.as_ptr(), Prot::READ | Prot::EXEC) };
        assert_eq!(exec, Err(Error::NoExecuteAbove), "{name} area");
        assert!(machine.translate(addr(ptr), Access::FETCH).is_err());
        // SAFETY: as above.
        unsafe { vm.set_prot(ptr.as_ptr(), Prot::READ | Prot::WRITE) }.unwrap();
        assert!(
            machine.translate(addr(ptr), Access::WRITE).is_ok(),
            "{name}"
        );
        // SAFETY: as above.
        unsafe { vm.set_prot(ptr.as_ptr(), Prot::READ) }.unwrap();
    }
    let small_text = VmOptions {
        prot: Prot::READ | Prot::EXEC,
        ..VmOptions::default()
    };
    let made = vm.vmalloc_with(4096, &small_text);
    assert_eq!(
        made,
        Err(Error::NoExecuteAbove),
        "a block-sized executable area"
    );
    let after = (
        vm.stats(),
        free_frames(&frames),
        vm.areas().collect::<Vec<_>>(),
    );
    assert!(after == before, "{after:?}\n{before:?}");

    // The calls that map executable pages later, as their docs list: vmap, a
    // reserved area's populate, a sparse area's map_page (reserving maps nothing).
    let mine = frames.alloc_frame().unwrap();
    let before = (vm.stats(), free_frames(&frames), vm.areas().count());
    // SAFETY: the frame is the test's, mapped nowhere else.
    let mapped = unsafe { vm.vmap(&[mine], Prot::KERNEL_RX) };
    assert_eq!(mapped.err(), Some(Error::NoExecuteAbove), "vmap");
    assert_eq!(
        (vm.stats(), free_frames(&frames), vm.areas().count()),
        before
    );
    let reserved = vm.reserve(4 * 4096, &small_text).unwrap();
    let sparse = vm.reserve_sparse(4 * 4096, &small_text).unwrap();
    let before = (vm.stats(), free_frames(&frames), vm.areas().count());
    // SAFETY: the test's own areas; nothing relies on their pages staying unmapped.
    unsafe {
        assert_eq!(
            vm.populate(reserved.as_ptr(), 4096),
            Err(Error::NoExecuteAbove)
        );
        assert_eq!(vm.map_page(sparse.as_ptr(), 1), Err(Error::NoExecuteAbove));
    }
    assert_eq!(
        (vm.stats(), free_frames(&frames), vm.areas().count()),
        before
    );
}

/// Each bad pointer gets the error its kind of place calls for, whatever the area:
/// inside a kernel stack's memory is interior, its unmapped lower half and the page
/// above are guards (they were swapped: the stack's memory starts past its lead);
/// the pointer `ioremap` returned (its page offset kept) is the wrong kind for
/// `vfree`, `vrealloc` and `set_prot` (it was interior); a tagged free inside or
/// past a per-CPU block area is interior or not allocated (it was the wrong kind);
/// a size only the blocks' zone keeps from fitting is too large (it ran out of
/// virtual space).
#[test]
fn bad_pointers_get_the_error_of_their_place() {
    for cpu_caches in [true, false] {
        let machine = machine();
        let frames = machine.frames();
        let cfg = if cpu_caches {
            config(false)
        } else {
            tree_config(false)
        };
        let vm = manager(&machine, &frames, cfg);
        let p = |a: VirtAddr| a.as_u64() as *mut u8;
        let stack = vm.alloc_stack(16 << 10).unwrap();
        let start = vm.find_vm_area(stack.base()).unwrap().start;
        // SAFETY (the block): pointers each call refuses, changing nothing.
        unsafe {
            assert_eq!(vm.vfree(p(stack.base())), Err(Error::InteriorPointer));
            assert_eq!(vm.vfree(p(stack.top() - 8u64)), Err(Error::InteriorPointer));
            assert_eq!(vm.vfree(p(start + 4096u64)), Err(Error::NotAllocated));
            assert_eq!(vm.vfree(p(stack.top())), Err(Error::NotAllocated));
            assert_eq!(
                vm.set_prot(p(stack.base()), Prot::READ),
                Err(Error::InteriorPointer)
            );
            let io = vm
                .ioremap(PhysAddr::new(0xfec0_0010), 0x2000, CacheMode::Uncached)
                .unwrap();
            assert_eq!(vm.vfree(io.as_ptr()), Err(Error::WrongKind));
            assert_eq!(vm.vrealloc(io.as_ptr(), 4096), Err(Error::WrongKind));
            assert_eq!(vm.set_prot(io.as_ptr(), Prot::READ), Err(Error::WrongKind));
            assert_eq!(vm.vfree(io.as_ptr().add(4096)), Err(Error::InteriorPointer));
            vm.iounmap(io.as_ptr()).unwrap();
            let small = vm.vmalloc(2 * 4096).unwrap();
            let ops: &dyn VmallocOps = &vm;
            assert_eq!(
                ops.vfree_tagged(small.as_ptr().add(4096), "t"),
                Err(Error::InteriorPointer)
            );
            assert_eq!(
                ops.vfree_tagged(small.as_ptr().add(2 * 4096), "t"),
                Err(Error::NotAllocated)
            );
            assert_eq!(ops.vfree_tagged(small.as_ptr(), "t"), Err(Error::WrongKind));
            vm.vfree(small.as_ptr()).unwrap();
        }
        if cpu_caches {
            let whole = (vm.config().size - 4096) as usize;
            assert_eq!(vm.vmalloc(whole).map(drop), Err(Error::SizeTooLarge));
            assert_eq!(
                vm.reserve(whole, &VmOptions::default()).map(drop),
                Err(Error::SizeTooLarge)
            );
        }
        drop(stack);
    }
}
