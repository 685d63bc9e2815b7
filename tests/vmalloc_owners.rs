//! Owners and mappings: `vmap` and `ioremap` on the simulated machine, and the owner
//! types that free or unmap on drop and bound every access.

mod common;

use common::vm::*;
use vmalloc::vmalloc::*;
use vmalloc::{Error, FrameSource};
use vmalloc_sim::{Access, SimConfig, SimMachine, scenarios};
use x86_64::structures::paging::PageTableFlags;
use x86_64::structures::paging::PhysFrame;
use x86_64::{PhysAddr, VirtAddr};

#[test]
fn vmap_hands_the_callers_frames_back() {
    let machine = machine();
    let frames = machine.frames();
    let vm = manager(&machine, &frames, config(false));
    // A live neighbour keeps the page tables: only vunmap's own flush can make the
    // cached page fault.
    let neighbour = vm.vmalloc(4096).unwrap();
    let mut mine = [PhysFrame::containing_address(PhysAddr::zero()); 5];
    assert_eq!(frames.alloc_frames(&mut mine), 5);
    let free_before = free_frames(&frames);
    // SAFETY: frames the test owns, not freed while mapped.
    let ptr = unsafe { vm.vmap(&mine, Prot::KERNEL_RW) }.unwrap();
    // SAFETY: bytes the test owns: no live Rust value lives there.
    unsafe { machine.write(addr(ptr) + 3 * 4096u64, b"vmap") }.unwrap();
    let mut bytes = [0; 4];
    machine.read_phys(mine[3].start_address(), &mut bytes);
    assert_eq!(&bytes, b"vmap");
    let mut back = Vec::new();
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    unsafe { vm.vunmap(ptr.as_ptr(), |frame| back.push(frame)) }.unwrap();
    assert_eq!(back, mine);
    assert!(
        machine.read(addr(ptr) + 3 * 4096u64, &mut bytes).is_err(),
        "flushed before the frames came back"
    );
    assert_eq!(
        free_frames(&frames),
        free_before,
        "no frame went to the allocator"
    );
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    unsafe { vm.vfree(neighbour.as_ptr()) }.unwrap();
}

/// Each `CacheMode` selects its own PAT entry in the leaves (PAT, PCD, PWT bits):
/// UC entry 3, WC entry 1, WT entry 7 (Linux's layout). WC and WT both selected
/// entry 1, so one of them always mapped the other's memory type.
#[test]
fn each_cache_mode_selects_its_own_pat_entry() {
    let machine = machine();
    let frames = machine.frames();
    let vm = manager(&machine, &frames, config(false));
    let pat_entry = |mode| {
        // SAFETY: a device page past the machine's RAM; nothing accesses it.
        let ptr = unsafe { vm.ioremap(PhysAddr::new(0xfec0_0000), 4096, mode) }.unwrap();
        let flags = machine.translate(addr(ptr), Access::READ).unwrap().flags;
        // SAFETY: nothing uses the mapping after this.
        unsafe { vm.iounmap(ptr.as_ptr()) }.unwrap();
        // Bit 7 of a 4 KiB leaf is its PAT bit.
        u8::from(flags.contains(PageTableFlags::HUGE_PAGE)) << 2
            | u8::from(flags.contains(PageTableFlags::NO_CACHE)) << 1
            | u8::from(flags.contains(PageTableFlags::WRITE_THROUGH))
    };
    assert_eq!(
        [
            pat_entry(CacheMode::Uncached),
            pat_entry(CacheMode::WriteCombining),
            pat_entry(CacheMode::WriteThrough)
        ],
        [3, 1, 7]
    );
}

#[test]
fn ioremap_keeps_the_offset_maps_uncached_and_refuses_ram() {
    let machine = machine();
    let frames = machine.frames();
    let vm = manager(&machine, &frames, config(false));
    let before = free_frames(&frames);
    // Past the end of the machine's 64 MiB: no RAM there.
    let phys = PhysAddr::new(0xfec0_0123);
    // SAFETY: nothing reads or writes through the mapping.
    let ptr = unsafe { vm.ioremap(phys, 0x2000, CacheMode::Uncached) }.unwrap();
    assert_eq!(ptr.as_ptr() as u64 % 4096, 0x123);
    let t = machine.translate(addr(ptr), Access::READ).unwrap();
    assert_eq!(t.phys(), phys);
    assert!(
        t.flags
            .contains(PageTableFlags::NO_CACHE | PageTableFlags::WRITE_THROUGH)
    );
    assert!(
        machine
            .translate(addr(ptr) + 0x2000u64, Access::READ)
            .is_ok(),
        "three pages cover it"
    );
    let info = vm.find_vm_area(addr(ptr)).unwrap();
    assert_eq!(info.kind, AreaKind::Ioremap);
    assert_eq!(info.phys, Some(phys));
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    assert_eq!(
        unsafe { vm.iounmap(ptr.as_ptr().wrapping_sub(0x123)) },
        Err(Error::InteriorPointer)
    );
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    unsafe { vm.iounmap(ptr.as_ptr()) }.unwrap();
    vm.purge();
    assert_eq!(
        free_frames(&frames),
        before,
        "MMIO frames never reach the allocator"
    );

    // RAM the allocator manages, free or in use, is refused; the reserved kernel
    // image is not the allocator's.
    let ram = vm
        .vmalloc_to_frame(addr(vm.vmalloc(4096).unwrap()))
        .unwrap();
    let stats = vm.stats();
    for (start, size) in [
        (ram.start_address(), 4096),
        (PhysAddr::new(0x3f_f000), 0x2000),
        (PhysAddr::new(16 << 20), 1),
    ] {
        // SAFETY: refused before anything is mapped.
        let result = unsafe { vm.ioremap(start, size, CacheMode::Uncached) };
        assert_eq!(result, Err(Error::ManagedRam), "{start:?}");
    }
    assert_eq!(vm.stats(), stats);
    // SAFETY: the kernel image's frames are reserved; nothing touches the mapping.
    let image = unsafe { vm.ioremap(PhysAddr::new(0x20_0000), 4096, CacheMode::WriteThrough) };
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    unsafe { vm.iounmap(image.unwrap().as_ptr()) }.unwrap();
}

#[test]
fn owners_free_on_drop_and_buffers_never_show_old_contents() {
    // The owners dereference their pointers: the host window makes that possible.
    let machine = SimMachine::new(SimConfig::new(64 << 20).with_host_window(1 << 30));
    let frames = machine.frames();
    let vm = manager(
        &machine,
        &frames,
        VmallocConfig {
            eager: true,
            ..scenarios::window_config(&machine)
        },
    );
    // Every free frame holds data first, so a buffer built from them shows 0xee
    // unless it is zeroed.
    common::dirty_free_frames(&machine, &frames, 0xee);
    {
        let mut buffer = VBuffer::new(&vm, 10_000).unwrap();
        assert_eq!(buffer.len(), 10_000);
        assert!(buffer.iter().all(|&b| b == 0));
        buffer[9_999] = 3;
        buffer.resize(40_000).unwrap();
        assert_eq!(buffer[9_999], 3);
        assert!(buffer[10_000..].iter().all(|&b| b == 0));
        let mut boxed = VBox::new(&vm, [7u64; 16]).unwrap();
        boxed[3] = 9;
        assert_eq!(boxed.iter().sum::<u64>(), 7 * 15 + 9);
        assert_eq!(vm.stats().areas, 2);
        assert_eq!(vm.stats().data_frames, 11);
    }
    assert_eq!(vm.stats().areas, 0);
    assert_eq!(vm.stats().data_frames, 0);
}

/// A `VBox` whose value's `drop` panics still frees its area while unwinding, as
/// `Box` does.
#[test]
fn a_vbox_whose_value_panics_in_drop_still_frees_its_area() {
    struct PanicsOnDrop;
    impl Drop for PanicsOnDrop {
        fn drop(&mut self) {
            panic!("the value's drop panics");
        }
    }
    let machine = SimMachine::new(SimConfig::new(64 << 20).with_host_window(1 << 30));
    let frames = machine.frames();
    let vm = manager(&machine, &frames, scenarios::window_config(&machine));
    let boxed = VBox::new(&vm, PanicsOnDrop).unwrap();
    assert_eq!((vm.stats().areas, vm.stats().data_frames), (1, 1));
    let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(boxed)));
    assert!(unwound.is_err());
    let stats = vm.stats();
    assert_eq!(
        (stats.areas, stats.data_frames),
        (0, 0),
        "freed while unwinding"
    );
}

#[test]
fn vmap_and_ioremap_owners_unmap_on_drop_and_bound_every_access() {
    // The owners dereference their pointers: the host window makes that possible.
    let machine = SimMachine::new(SimConfig::new(64 << 20).with_host_window(1 << 30));
    let frames = machine.frames();
    let vm = manager(
        &machine,
        &frames,
        VmallocConfig {
            eager: false,
            ..scenarios::window_config(&machine)
        },
    );
    let mut mine = [PhysFrame::containing_address(PhysAddr::zero()); 2];
    assert_eq!(frames.alloc_frames(&mut mine), 2);
    // SAFETY: the frames are this test's, held until the end.
    let mapping = unsafe { VMapping::new(&vm, &mine, Prot::KERNEL_RW) }.unwrap();
    assert_eq!(mapping.len(), 8192);
    let at = VirtAddr::from_ptr(mapping.as_ptr());
    // SAFETY: bytes the test owns: no live Rust value lives there.
    unsafe { machine.write(at + 4096u64, b"vmapped") }.unwrap();
    let mut back = Vec::new();
    mapping.unmap(|frame| back.push(frame));
    assert_eq!(back, mine, "the frames come back in order");
    assert!(
        machine.translate(at, Access::READ).is_err(),
        "unmapped at once"
    );
    // SAFETY: as above.
    let dropped = unsafe { VMapping::new(&vm, &mine, Prot::READ) }.unwrap();
    let at = VirtAddr::from_ptr(dropped.as_ptr());
    drop(dropped);
    assert!(
        machine.translate(at, Access::READ).is_err(),
        "dropped: unmapped"
    );
    assert_eq!(vm.stats().areas, 0);
    // SAFETY: frames the test took and no longer uses (or a bad free, refused).
    unsafe { frames.free_frames(&mine) }.expect("the frames stayed the test's");

    // Part of the machine's reserved kernel image, which no one else uses here.
    let phys = PhysAddr::new(0x20_0010);
    // SAFETY: a reserved range nothing else touches; the test reads and writes it.
    let device = unsafe { IoMapping::new(&vm, phys, 64, CacheMode::Uncached) }.unwrap();
    assert_eq!(device.len(), 64);
    device.write::<u32>(4, 0xdead_beef).unwrap();
    assert_eq!(device.read::<u32>(4), Ok(0xdead_beef));
    let mut word = [0; 4];
    machine
        .read(VirtAddr::from_ptr(device.as_ptr()) + 4u64, &mut word)
        .unwrap();
    assert_eq!(u32::from_le_bytes(word), 0xdead_beef, "the same bytes");
    assert_eq!(
        device.read::<u64>(57),
        Err(Error::SizeTooLarge),
        "past the end"
    );
    assert_eq!(device.write::<u8>(64, 1), Err(Error::SizeTooLarge));
    assert_eq!(device.read::<u64>(usize::MAX), Err(Error::SizeTooLarge));
    assert_eq!(device.read::<u32>(2), Err(Error::Unaligned));
    assert_eq!(device.read::<u8>(63), Ok(0));
    // Alignment is the register's address's: the mapping keeps `phys`'s offset.
    // SAFETY: as above, the same reserved range.
    let odd = unsafe { IoMapping::new(&vm, PhysAddr::new(0x20_0002), 64, CacheMode::Uncached) };
    let odd = odd.unwrap();
    assert_eq!(odd.read::<u32>(0), Err(Error::Unaligned));
    assert!(odd.read::<u32>(2).is_ok(), "0x20_0004: aligned");
    drop(odd);
    let at = VirtAddr::from_ptr(device.as_ptr());
    drop(device);
    assert!(
        machine.translate(at, Access::READ).is_err(),
        "dropped: unmapped"
    );
    assert_eq!(vm.stats().areas, 0);
}
