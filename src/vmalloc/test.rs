use super::*;
use crate::frame::FaultInjector;
use crate::sim::{Access, SimConfig, SimFrames, SimMachine, SimPhys};
use std::vec;
use std::vec::Vec;

type SimVmalloc<'m, F> = Vmalloc<F, SimPhys<'m>, &'m SimMachine>;

fn machine() -> SimMachine {
    SimMachine::new(SimConfig::new(64 << 20).with_scatter_seed(7))
}

fn config(eager: bool) -> VmallocConfig {
    VmallocConfig {
        eager,
        ..VmallocConfig::default()
    }
}

fn manager<'m, F: FrameSource + Clone>(
    machine: &'m SimMachine,
    frames: F,
    config: VmallocConfig,
) -> SimVmalloc<'m, F> {
    // SAFETY: the machine's root table is used by nothing else in this test.
    unsafe { Vmalloc::new(config, machine.root(), machine.phys(), frames, machine) }.unwrap()
}

fn addr(ptr: NonNull<u8>) -> VirtAddr {
    VirtAddr::from_ptr(ptr.as_ptr())
}

fn free_frames(frames: &SimFrames) -> u64 {
    frames.stats().free
}

/// Every frame is free, data, page table, waiting for the purge, bookkeeping, or
/// held by the test (`held`).
fn assert_frames_conserved<F: FrameSource + Clone>(
    vm: &SimVmalloc<'_, F>,
    frames: &SimFrames,
    held: u64,
) {
    let s = vm.stats();
    let accounted = frames.stats().free
        + s.data_frames
        + s.page_table_frames
        + s.pending_purge_frames
        + s.bookkeeping_frames
        + held;
    assert_eq!(accounted, frames.stats().total, "{s:?}");
}

#[test]
fn data_written_through_the_mmu_reads_back_from_scattered_frames() {
    let machine = machine();
    let frames = machine.frames();
    let vm = manager(&machine, &frames, config(false));
    let size = 300 * 4096 + 123;
    let ptr = vm.vmalloc(size).unwrap();
    let data: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
    machine.write(addr(ptr), &data).unwrap();
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
    let machine = machine();
    let frames = machine.frames();
    let vm = manager(&machine, &frames, config(true));
    let ptr = vm.vmalloc(64 * 4096).unwrap();
    machine.write(addr(ptr), &vec![0xa5; 64 * 4096]).unwrap();
    vm.vfree(ptr.as_ptr()).unwrap();
    // The same (non-scattered) frames come back first.
    let plain = SimMachine::new(SimConfig::new(64 << 20));
    let plain_frames = plain.frames();
    let vm2 = manager(&plain, &plain_frames, config(true));
    let dirty = vm2.vmalloc(64 * 4096).unwrap();
    plain.write(addr(dirty), &vec![0x5a; 64 * 4096]).unwrap();
    vm2.vfree(dirty.as_ptr()).unwrap();
    let zeroed = vm2.vzalloc(64 * 4096).unwrap();
    let mut back = vec![1; 64 * 4096];
    plain.read(addr(zeroed), &mut back).unwrap();
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
    assert!(machine.fetch(addr(ptr), &mut [0]).is_err());
    // The next area starts after the guard page.
    let next = vm.vmalloc(4096).unwrap();
    assert_eq!(addr(next), guard + 4096u64);
    let unguarded = VmOptions {
        flags: VmFlags::NO_GUARD,
        ..VmOptions::default()
    };
    let a = vm.vmalloc_with(4096, &unguarded).unwrap();
    let b = vm.vmalloc(4096).unwrap();
    assert_eq!(addr(b), addr(a) + 4096u64);
}

#[test]
fn bad_input_gets_a_specific_error_and_changes_nothing() {
    let machine = machine();
    let frames = machine.frames();
    let vm = manager(&machine, &frames, config(false));
    let live = vm.vmalloc(3 * 4096).unwrap();
    let mapped = vm
        .vmap(&[frames.alloc_frame().unwrap()], Prot::KERNEL_RW)
        .unwrap();
    let before = (vm.stats(), free_frames(&frames));

    assert_eq!(vm.vmalloc(0), Err(Error::ZeroSize));
    assert_eq!(vm.vmalloc(usize::MAX), Err(Error::SizeTooLarge));
    assert_eq!(vm.vmalloc(VMALLOC_SIZE as usize), Err(Error::SizeTooLarge));
    let odd = VmOptions {
        align: 3 * 4096,
        ..VmOptions::default()
    };
    assert_eq!(vm.vmalloc_with(4096, &odd), Err(Error::BadAlignment));
    let wx = VmOptions {
        prot: Prot::WRITE | Prot::EXEC,
        ..VmOptions::default()
    };
    assert_eq!(vm.vmalloc_with(4096, &wx), Err(Error::WriteExecute));
    assert_eq!(vm.vfree(core::ptr::null_mut()), Err(Error::NullPointer));
    assert_eq!(vm.vfree(0x1000 as *mut u8), Err(Error::NotInRegion));
    assert_eq!(
        vm.vfree(live.as_ptr().wrapping_add(4096)),
        Err(Error::InteriorPointer)
    );
    assert_eq!(
        vm.vfree(live.as_ptr().wrapping_add(1)),
        Err(Error::InteriorPointer)
    );
    assert_eq!(
        vm.vfree(live.as_ptr().wrapping_add(3 * 4096)),
        Err(Error::NotAllocated)
    );
    assert_eq!(
        vm.vfree((VMALLOC_START + (1 << 40)) as *mut u8),
        Err(Error::NotAllocated)
    );
    assert_eq!(vm.vfree(mapped.as_ptr()), Err(Error::WrongKind));
    assert_eq!(vm.vunmap(live.as_ptr(), |_| ()), Err(Error::WrongKind));
    assert_eq!(vm.iounmap(live.as_ptr()), Err(Error::WrongKind));
    assert_eq!(vm.vrealloc(mapped.as_ptr(), 8192), Err(Error::WrongKind));
    assert_eq!(vm.vrealloc(live.as_ptr(), 0), Err(Error::ZeroSize));
    assert_eq!(
        vm.ioremap(PhysAddr::new(0xfee0_0000), 0, CacheMode::Uncached),
        Err(Error::ZeroSize)
    );
    assert_eq!(vm.vmap(&[], Prot::KERNEL_RW), Err(Error::ZeroSize));
    assert_eq!((vm.stats(), free_frames(&frames)), before);

    vm.vfree(live.as_ptr()).unwrap();
    assert_eq!(
        vm.vfree(live.as_ptr()),
        Err(Error::NotAllocated),
        "double free"
    );
}

#[test]
fn lazy_vfree_holds_frames_until_the_batched_flush() {
    let machine = machine();
    let frames = machine.frames();
    let vm = manager(&machine, &frames, config(false));
    let baseline = free_frames(&frames);
    let ptrs: Vec<_> = (0..10).map(|_| vm.vmalloc(8 * 4096).unwrap()).collect();
    let tables = vm.stats().page_table_frames;
    for ptr in &ptrs {
        machine.write(addr(*ptr), b"live").unwrap();
        vm.vfree(ptr.as_ptr()).unwrap();
    }
    let stats = vm.stats();
    assert_eq!(stats.pending_purge_pages, 80);
    assert_eq!(stats.pending_purge_frames, 80);
    assert_eq!(stats.areas, 0);
    // Not one frame is back while the TLB may still hold the old translations.
    assert_eq!(free_frames(&frames), baseline - 80 - tables);
    assert_frames_conserved(&vm, &frames, 0);
    // The stale translation still reads the old bytes, as on hardware.
    let mut stale = [0; 4];
    machine.read(addr(ptrs[0]), &mut stale).unwrap();
    assert_eq!(&stale, b"live");

    let flushes = machine.tlb_stats();
    vm.purge();
    let after = machine.tlb_stats();
    assert_eq!(
        after.full_flushes,
        flushes.full_flushes + 1,
        "80 pages are above the ceiling: one full flush"
    );
    assert!(
        machine.read(addr(ptrs[0]), &mut stale).is_err(),
        "freed memory faults after the purge"
    );
    let stats = vm.stats();
    assert_eq!(stats.pending_purge_pages, 0);
    assert_eq!(stats.page_table_frames, 0, "empty page tables are freed");
    assert_eq!(free_frames(&frames), baseline, "every frame is back");
    assert_frames_conserved(&vm, &frames, 0);
    assert!(vm.vmalloc_to_frame(addr(ptrs[0])).is_err());
}

#[test]
fn eager_mode_flushes_each_free_by_range() {
    let machine = machine();
    let frames = machine.frames();
    let vm = manager(&machine, &frames, config(true));
    let baseline = free_frames(&frames);
    let ptr = vm.vmalloc(4 * 4096).unwrap();
    let before = machine.tlb_stats();
    vm.vfree(ptr.as_ptr()).unwrap();
    let after = machine.tlb_stats();
    assert_eq!(after.full_flushes, before.full_flushes);
    assert!(after.range_flushes > before.range_flushes);
    assert_eq!(free_frames(&frames), baseline);
    assert_frames_conserved(&vm, &frames, 0);
}

#[test]
fn the_lazy_threshold_forces_a_purge() {
    let machine = machine();
    let frames = machine.frames();
    let vm = manager(
        &machine,
        &frames,
        VmallocConfig {
            lazy_threshold_pages: 16,
            ..config(false)
        },
    );
    for _ in 0..3 {
        let ptr = vm.vmalloc(5 * 4096).unwrap();
        vm.vfree(ptr.as_ptr()).unwrap();
    }
    assert_eq!((vm.stats().purges, vm.stats().pending_purge_pages), (0, 15));
    let ptr = vm.vmalloc(5 * 4096).unwrap();
    vm.vfree(ptr.as_ptr()).unwrap();
    assert_eq!(
        (vm.stats().purges, vm.stats().pending_purge_pages),
        (1, 0),
        "20 pages > 16"
    );
}

#[test]
fn running_out_of_frames_at_any_step_rolls_back() {
    let machine = machine();
    let frames = machine.frames();
    let injector = FaultInjector::new(&frames);
    let vm = manager(&machine, &injector, config(false));
    let keep = vm.vmalloc(4096).unwrap();
    let pages = 1500u64;
    let mut k = 0;
    loop {
        let before = (free_frames(&frames), vm.stats());
        injector.fail_after(k);
        match vm.vmalloc((pages * 4096) as usize) {
            Ok(ptr) => {
                injector.disarm();
                assert!(
                    k > pages,
                    "only succeeds once all {pages} frames and tables could be had"
                );
                vm.vfree(ptr.as_ptr()).unwrap();
                break;
            }
            Err(error) => {
                assert_eq!(error, Error::OutOfFrames);
                assert_eq!(
                    (free_frames(&frames), vm.stats()),
                    before,
                    "failing frame {k}"
                );
                assert_eq!(vm.areas().count(), 1);
                let start = addr(keep) + 2 * 4096u64;
                for page in [0, 1, 511, 512, 1000, pages - 1] {
                    assert!(
                        machine
                            .translate(start + page * 4096, Access::READ)
                            .is_err()
                    );
                }
            }
        }
        k += 1;
    }
}

#[test]
fn vrealloc_shrinks_grows_in_place_and_moves_without_copying() {
    let machine = machine();
    let frames = machine.frames();
    let vm = manager(&machine, &frames, config(true));
    let data: Vec<u8> = (0..4 * 4096).map(|i| (i % 253) as u8).collect();
    let ptr = vm.vmalloc(4 * 4096).unwrap();
    machine.write(addr(ptr), &data).unwrap();
    let third = vm.vmalloc_to_frame(addr(ptr) + 2 * 4096u64).unwrap();

    let grown = vm.vrealloc(ptr.as_ptr(), 6 * 4096).unwrap();
    assert_eq!(grown, ptr, "the pages after it were free");
    let blocker = vm.vmalloc(4096).unwrap();
    let moved = vm.vrealloc(ptr.as_ptr(), 20 * 4096).unwrap();
    assert_ne!(moved, ptr);
    assert_eq!(
        vm.vmalloc_to_frame(addr(moved) + 2 * 4096u64).unwrap(),
        third,
        "frames remapped, not copied"
    );
    let mut back = vec![0; data.len()];
    machine.read(addr(moved), &mut back).unwrap();
    assert_eq!(back, data);
    assert!(
        machine.read(addr(ptr), &mut [0]).is_err(),
        "the old range is gone"
    );
    machine.write(addr(moved) + 19 * 4096u64, &[1]).unwrap();

    let shrunk = vm.vrealloc(moved.as_ptr(), 4096).unwrap();
    assert_eq!(shrunk, moved);
    assert!(
        machine.read(addr(moved) + 4096u64, &mut [0]).is_err(),
        "the tail is unmapped"
    );
    assert_eq!(vm.stats().data_frames, 2);
    vm.vfree(shrunk.as_ptr()).unwrap();
    vm.vfree(blocker.as_ptr()).unwrap();
    assert_eq!(vm.stats().data_frames, 0);
}

#[test]
fn vmap_hands_the_callers_frames_back() {
    let machine = machine();
    let frames = machine.frames();
    let vm = manager(&machine, &frames, config(false));
    let mut mine = [PhysFrame::containing_address(PhysAddr::zero()); 5];
    assert_eq!(frames.alloc_frames(&mut mine), 5);
    let free_before = free_frames(&frames);
    let ptr = vm.vmap(&mine, Prot::KERNEL_RW).unwrap();
    machine.write(addr(ptr) + 3 * 4096u64, b"vmap").unwrap();
    let mut bytes = [0; 4];
    machine.read_phys(mine[3].start_address(), &mut bytes);
    assert_eq!(&bytes, b"vmap");
    let mut back = Vec::new();
    vm.vunmap(ptr.as_ptr(), |frame| back.push(frame)).unwrap();
    assert_eq!(back, mine);
    assert!(
        machine.read(addr(ptr), &mut bytes).is_err(),
        "flushed before the frames came back"
    );
    let tables = vm.stats().page_table_frames;
    assert_eq!(
        free_frames(&frames) + tables,
        free_before + tables,
        "no frame went to the allocator"
    );
}

#[test]
fn ioremap_keeps_the_offset_and_maps_uncached() {
    let machine = machine();
    let frames = machine.frames();
    let vm = manager(&machine, &frames, config(false));
    let before = free_frames(&frames);
    let phys = PhysAddr::new(0x0100_0123);
    let ptr = vm.ioremap(phys, 0x2000, CacheMode::Uncached).unwrap();
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
    let info: Vec<AreaInfo> = vm.areas().collect();
    assert_eq!(info[0].kind, AreaKind::Ioremap);
    assert_eq!(info[0].phys, Some(phys));
    assert_eq!(
        vm.iounmap(ptr.as_ptr().wrapping_sub(0x123)),
        Err(Error::InteriorPointer)
    );
    vm.iounmap(ptr.as_ptr()).unwrap();
    vm.purge();
    assert_eq!(
        free_frames(&frames),
        before,
        "MMIO frames never reach the allocator"
    );
    assert!(
        frames
            .allocator()
            .is_free(PhysFrame::containing_address(phys))
            .unwrap(),
        "nor leave it"
    );
}

#[test]
fn owners_free_on_drop() {
    // The owners dereference their pointers: the host window makes that possible.
    let machine = SimMachine::new(SimConfig::new(64 << 20).with_host_window(1 << 30));
    let frames = machine.frames();
    let (start, size) = machine.host_window().unwrap();
    let vm = manager(
        &machine,
        &frames,
        VmallocConfig {
            start,
            size,
            ..config(true)
        },
    );
    {
        let buffer = VBuffer::zeroed(&vm, 10_000).unwrap();
        assert_eq!(buffer.len(), 10_000);
        assert!(buffer.iter().all(|&b| b == 0));
        let mut boxed = VBox::new(&vm, [7u64; 16]).unwrap();
        boxed[3] = 9;
        assert_eq!(boxed.iter().sum::<u64>(), 7 * 15 + 9);
        assert_eq!(vm.stats().areas, 2);
        assert_eq!(vm.stats().data_frames, 4);
    }
    assert_eq!(vm.stats().areas, 0);
    assert_eq!(vm.stats().data_frames, 0);
}

#[test]
fn listing_and_stats_read_like_procfs() {
    let machine = machine();
    let frames = machine.frames();
    let vm = manager(&machine, &frames, config(false));
    let tagged = VmOptions {
        tag: "driver_ring",
        ..VmOptions::default()
    };
    let ptr = vm.vmalloc_with(4 * 4096, &tagged).unwrap();
    let listing = std::format!("{}", vm.info());
    let line = std::format!(
        "{:#018x}-{:#018x}     20480 driver_ring pages=4 vmalloc\n",
        ptr.as_ptr() as u64,
        ptr.as_ptr() as u64 + 5 * 4096
    );
    assert_eq!(listing, line);
    let stats = vm.stats();
    assert_eq!(stats.used, 5 * 4096);
    assert_eq!(stats.largest_free, VMALLOC_SIZE - 5 * 4096);
    assert!(std::format!("{stats}").contains("VmallocUsed:            20 kB"));
}

#[test]
fn threads_share_one_manager() {
    let machine = machine();
    let frames = machine.frames();
    let vm = manager(
        &machine,
        &frames,
        VmallocConfig {
            lazy_threshold_pages: 64,
            ..config(false)
        },
    );
    let baseline = free_frames(&frames);
    std::thread::scope(|scope| {
        for t in 0..4u8 {
            let (vm, machine) = (&vm, &machine);
            scope.spawn(move || {
                let mut live = Vec::new();
                for i in 0..200usize {
                    let pages = 1 + (i * 7 + t as usize) % 9;
                    let ptr = vm.vmalloc(pages * 4096).unwrap();
                    machine.write(addr(ptr), &[t; 64]).unwrap();
                    live.push(ptr);
                    if i % 3 != 0 {
                        let victim = live.swap_remove(i % live.len());
                        let mut check = [0; 64];
                        machine.read(addr(victim), &mut check).unwrap();
                        assert_eq!(check, [t; 64], "no other thread wrote into this area");
                        vm.vfree(victim.as_ptr()).unwrap();
                    }
                }
                for ptr in live {
                    vm.vfree(ptr.as_ptr()).unwrap();
                }
            });
        }
    });
    vm.purge();
    let stats = vm.stats();
    assert_eq!(
        (stats.areas, stats.data_frames, stats.page_table_frames),
        (0, 0, 0)
    );
    assert_eq!(
        free_frames(&frames) + stats.bookkeeping_frames,
        baseline + 1,
        "all back but the bookkeeping grown"
    );
    assert_frames_conserved(&vm, &frames, 0);
}
