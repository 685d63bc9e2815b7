//! `RecursivePhysMemory` on the simulated machine: the machine's PML4 gets a
//! recursive entry, and the window and the recursive addresses lie in the machine's
//! host window, so host code reaches them the way a CPU would, through the
//! simulated tables. A manager over it does what a manager over the machine's
//! offset map does on a twin machine: the same areas, frames, rights and bytes.
#![cfg(all(target_os = "linux", target_arch = "x86_64"))]

use vmalloc::phys::RecursivePhysMemory;
use vmalloc::vmalloc::{Vmalloc, VmallocConfig};
use vmalloc::{Error, FrameSource, PAGE_SIZE, PhysMemory};
use vmalloc_sim::{Access, SimConfig, SimMachine};
use x86_64::structures::paging::{FrameAllocator, PageTableFlags, PageTableIndex, PhysFrame};
use x86_64::{PhysAddr, VirtAddr};

const MEMORY: u64 = 64 << 20;
const SLOT: u64 = 1 << 39;

/// A machine whose host window holds two whole PML4 slots, the first of which gets
/// the recursive entry; the slot indexes.
fn machine() -> (SimMachine, PageTableIndex, PageTableIndex) {
    let machine = SimMachine::new(SimConfig::new(MEMORY).with_host_window(3 * SLOT));
    let (start, size) = machine.host_window().unwrap();
    let first = start.as_u64().div_ceil(SLOT);
    assert!((first + 2) * SLOT <= start.as_u64() + size);
    let root = machine.root().start_address();
    let entry = root.as_u64() | (PageTableFlags::PRESENT | PageTableFlags::WRITABLE).bits();
    // SAFETY: bytes the test owns: no live Rust value lives there.
    unsafe { machine.write_phys(root + first * 8, &entry.to_le_bytes()) };
    let index = |slot: u64| PageTableIndex::new(slot as u16);
    (machine, index(first), index(first + 1))
}

fn root_entry(machine: &SimMachine, index: PageTableIndex) -> u64 {
    let mut bytes = [0; 8];
    machine.read_phys(
        machine.root().start_address() + u64::from(index) * 8,
        &mut bytes,
    );
    u64::from_le_bytes(bytes)
}

#[test]
fn the_window_reaches_every_frame_and_maps_it_once() {
    let (machine, recursive, window) = machine();
    let frames = machine.frames();
    let before = frames.stats().free;
    // SAFETY: the recursive entry is in place, the window slot unused; the frames
    // come from the machine's allocator.
    let phys = unsafe {
        RecursivePhysMemory::new(recursive, window, MEMORY, &mut Few(&machine, &frames, 9))
    }
    .unwrap();
    assert_eq!(
        before - frames.stats().free,
        2,
        "a PDPT and one PD for 1 GiB"
    );
    assert_eq!(phys.window().as_u64(), u64::from(window) * SLOT);
    assert_eq!(phys.top().as_u64(), 1 << 30);
    // Frames 0 and 1 hold the window's PDPT and PD: leave them be.
    for addr in [0x3000, 0x9f000 + 8, 5 << 20, MEMORY - 8] {
        let ptr = phys.phys_to_virt(PhysAddr::new(addr));
        assert_eq!(ptr as u64, phys.window().as_u64() + addr);
        // SAFETY: bytes the test owns: no live Rust value lives there.
        unsafe { machine.write_phys(PhysAddr::new(addr), &addr.to_le_bytes()) };
        // SAFETY: the window maps this physical address (checked by the simulated
        // walk of the host-window fill); 8 bytes, aligned.
        assert_eq!(unsafe { ptr.cast::<u64>().read() }, addr);
        // SAFETY: as above.
        unsafe { ptr.cast::<u64>().write(!addr) };
        let mut back = [0; 8];
        machine.read_phys(PhysAddr::new(addr), &mut back);
        assert_eq!(u64::from_le_bytes(back), !addr);
        // The simulated MMU agrees: a 2 MiB mapping of the same frame, data only
        // (all of RAM is writable through it, so none of it executes from it).
        let t = machine
            .translate(VirtAddr::from_ptr(ptr), Access::WRITE)
            .unwrap();
        assert_eq!((t.phys().as_u64(), t.page_size), (addr, 2 << 20));
        assert!(
            machine
                .translate(VirtAddr::from_ptr(ptr), Access::FETCH)
                .is_err(),
            "RAM is executable through the window"
        );
    }
    // Each 2 MiB piece was mapped once, and no frame was taken for it.
    assert_eq!(before - frames.stats().free, 2);
    let mapped = (0..MEMORY / (2 << 20))
        .filter(|piece| {
            machine
                .translate(phys.window() + piece * (2 << 20), Access::READ)
                .is_ok()
        })
        .count();
    assert_eq!(mapped, 3, "pieces 0, 2 and 31");
}

/// What a manager does: its pointers, the frames behind them, the data read back,
/// and the free frame counts after the purge and after the drop.
fn workload<P: PhysMemory + Copy>(
    machine: &SimMachine,
    frames: &vmalloc_sim::SimFrames,
    phys: P,
) -> Vec<String> {
    let mut log = Vec::new();
    // SAFETY: the machine's page tables serve this manager alone.
    let vm = unsafe {
        Vmalloc::new(
            VmallocConfig::default(),
            machine.root(),
            phys,
            frames,
            machine,
        )
    }
    .unwrap();
    let mut areas = Vec::new();
    for (i, size) in [PAGE_SIZE, 5 * PAGE_SIZE, 1 << 20, 3 << 20, 40 * PAGE_SIZE]
        .into_iter()
        .enumerate()
    {
        let area = vm.vzalloc(size as usize).unwrap();
        let addr = VirtAddr::from_ptr(area.as_ptr());
        // SAFETY: bytes the test owns: no live Rust value lives there.
        unsafe { machine.write(addr + (size - 8), &(i as u64 * 77).to_le_bytes()) }.unwrap();
        let mut back = [0; 8];
        machine.read(addr + (size - 8), &mut back).unwrap();
        let mut zero = [0xff; 8];
        machine.read(addr, &mut zero).unwrap();
        let frame = vm.vmalloc_to_frame(addr).unwrap();
        log.push(format!(
            "{addr:?} {frame:?} {} {zero:?}",
            u64::from_le_bytes(back)
        ));
        areas.push((area, size));
    }
    // Every page of every area: where it leads, with which rights, and what it holds.
    for (area, size) in &areas {
        let start = VirtAddr::from_ptr(area.as_ptr());
        let mut bytes = vec![0; *size as usize];
        machine.read(start, &mut bytes).unwrap();
        let sum: u64 = bytes.iter().map(|&b| u64::from(b)).sum();
        let pages: Vec<_> = (0..size / PAGE_SIZE)
            .map(|i| {
                machine
                    .translate(start + i * PAGE_SIZE, Access::READ)
                    .unwrap()
            })
            .map(|t| (t.phys(), t.flags))
            .collect();
        log.push(format!("{pages:?} {sum}"));
        log.push(format!("free {}", frames.stats().free));
    }
    for (area, _) in areas.iter().step_by(2) {
        // SAFETY: nothing uses the area after this.
        unsafe { vm.vfree(area.as_ptr()) }.unwrap();
    }
    vm.purge();
    log.push(format!("after purge: {}", frames.stats().free));
    let freed = VirtAddr::from_ptr(areas[0].0.as_ptr());
    log.push(format!(
        "{:?}",
        machine.translate(freed, Access::READ).is_err()
    ));
    drop(vm);
    log.push(format!("after drop: {}", frames.stats().free));
    log
}

#[test]
fn a_manager_over_the_window_does_what_one_over_the_offset_map_does() {
    let (ours, recursive, window) = machine();
    let peer = SimMachine::new(SimConfig::new(MEMORY));
    let (our_frames, peer_frames) = (ours.frames(), peer.frames());
    // SAFETY: as in the test above.
    let phys = unsafe {
        RecursivePhysMemory::new(recursive, window, MEMORY, &mut Few(&ours, &our_frames, 2))
    }
    .unwrap();
    // The twin gives the same two frames away, so both allocators stay alike.
    for _ in 0..2 {
        peer_frames.alloc_frame().unwrap();
    }
    let start = our_frames.stats().free;
    let our_log = workload(&ours, &our_frames, &phys);
    let peer_log = workload(&peer, &peer_frames, peer.phys());
    assert_eq!(our_log, peer_log);
    assert_eq!(our_frames.stats().free, start, "every frame came back");
}

/// A frame allocator that has `left` frames to give, each full of garbage (as a
/// frame fresh from an allocator may be).
struct Few<'a>(&'a SimMachine, &'a vmalloc_sim::SimFrames, usize);

// SAFETY: forwards to the machine's allocator.
unsafe impl FrameAllocator<x86_64::structures::paging::Size4KiB> for Few<'_> {
    fn allocate_frame(&mut self) -> Option<PhysFrame> {
        self.2 = self.2.checked_sub(1)?;
        let frame = self.1.alloc_frame()?;
        // SAFETY: bytes the test owns: no live Rust value lives there.
        unsafe {
            self.0
                .fill_phys(frame.start_address(), PAGE_SIZE as usize, 0xa5)
        };
        Some(frame)
    }
}

#[test]
fn bad_windows_are_refused_and_leave_the_tables_alone() {
    let (machine, recursive, window) = machine();
    let frames = machine.frames();
    let new = |window, top, left| {
        // SAFETY: as above; every call below is refused before it writes a table.
        unsafe {
            RecursivePhysMemory::new(recursive, window, top, &mut Few(&machine, &frames, left))
        }
        .err()
    };
    assert_eq!(new(window, 0, 9), Some(Error::ZeroSize));
    assert_eq!(new(window, (512 << 30) + 1, 9), Some(Error::SizeTooLarge));
    assert_eq!(new(recursive, MEMORY, 9), Some(Error::Overlap));
    assert_eq!(
        new(window, 3 << 30, 3),
        Some(Error::OutOfFrames),
        "needs a PDPT and 3 PDs"
    );
    assert_eq!(root_entry(&machine, window), 0);
    // SAFETY: as above.
    let phys = unsafe {
        RecursivePhysMemory::new(recursive, window, 3 << 30, &mut Few(&machine, &frames, 4))
    }
    .unwrap();
    assert_ne!(root_entry(&machine, window), 0);
    assert_eq!(new(window, MEMORY, 9), Some(Error::AlreadyMapped));
    // Beyond `top` (the contract's edge) the pointer faults instead of reaching
    // another frame: it is not canonical.
    let beyond = phys.phys_to_virt(PhysAddr::new(3 << 30));
    assert!(VirtAddr::try_new(beyond as u64).is_err());
}

/// The window's PDPT entries (one PD per GiB), read from the machine's tables.
fn window_pdpt_entries(machine: &SimMachine, window: PageTableIndex, gibs: u64) -> Vec<u64> {
    let pml4e = root_entry(machine, window);
    assert_ne!(pml4e, 0, "the window's PML4 entry is gone");
    let pdpt = PhysAddr::new(pml4e & 0x000f_ffff_ffff_f000);
    (0..gibs)
        .map(|gib| {
            let mut bytes = [0; 8];
            machine.read_phys(pdpt + gib * 8, &mut bytes);
            u64::from_le_bytes(bytes)
        })
        .collect()
}

/// A `PageTableMapper` over the machine's tables cleaning up, the whole address
/// space and the window's slot alone, frees none of the window's tables (empty until
/// `phys_to_virt` reaches their GiB, made up front so that it never needs a frame):
/// a GiB reached afterwards is mapped through its own PD, whose frame nobody else
/// got (it was freed, and `phys_to_virt` wrote a 2 MiB entry into its next owner).
#[test]
fn clean_up_keeps_the_windows_tables() {
    use vmalloc::frame::MapperFrames;
    use vmalloc::paging::{PageTableMapper, PageTables};
    use x86_64::structures::paging::Page;
    use x86_64::structures::paging::mapper::CleanUp;
    const TOP: u64 = 3 << 30;
    let (machine, recursive, window) = machine();
    let frames = machine.frames();
    // SAFETY: the recursive entry is in place, the window slot unused.
    let phys =
        unsafe { RecursivePhysMemory::new(recursive, window, TOP, &mut Few(&machine, &frames, 9)) }
            .unwrap();
    let entries = window_pdpt_entries(&machine, window, 3);
    assert!(entries.iter().all(|&entry| entry != 0), "{entries:x?}");
    // SAFETY: the machine's tables are this mapper's alone.
    let mut mapper = PageTableMapper::new(unsafe { PageTables::new(machine.root(), &phys) });
    let free = frames.stats().free;
    let slot = Page::range_inclusive(
        Page::containing_address(phys.window()),
        Page::containing_address(phys.window() + (SLOT - PAGE_SIZE)),
    );
    // SAFETY: every table came from `frames`, used once; the window's are marked to
    // stay.
    unsafe {
        mapper.clean_up_addr_range(slot, &mut MapperFrames(&frames));
        mapper.clean_up(&mut MapperFrames(&frames));
    }
    vmalloc::TlbFlush::flush_all(&&machine);
    assert_eq!(window_pdpt_entries(&machine, window, 3), entries);
    assert_eq!(frames.stats().free, free, "clean-up freed a window table");
    // GiB 2, untouched so far, is reached through its own PD.
    let addr = PhysAddr::new((2 << 30) + (6 << 20));
    let ptr = phys.phys_to_virt(addr);
    let t = machine
        .translate(VirtAddr::from_ptr(ptr), Access::READ)
        .unwrap();
    assert_eq!(t.phys(), addr);
    let pd = PhysAddr::new(entries[2] & 0x000f_ffff_ffff_f000);
    let mut entry = [0; 8];
    machine.read_phys(pd + 3 * 8, &mut entry);
    assert_ne!(
        u64::from_le_bytes(entry),
        0,
        "the 2 MiB entry is in the window's PD"
    );
}

/// A manager's region over the window's slot is refused, even where no 2 MiB piece
/// is mapped yet: the window's tables (marked `KEPT`) fill on demand through
/// `phys_to_virt`, which would write the manager's tables beside it. Nothing
/// changes.
#[test]
fn a_region_over_the_window_is_refused() {
    const TOP: u64 = 2 << 30;
    let (machine, recursive, window) = machine();
    let frames = machine.frames();
    // SAFETY: the recursive entry is in place, the window slot unused.
    let phys =
        unsafe { RecursivePhysMemory::new(recursive, window, TOP, &mut Few(&machine, &frames, 9)) }
            .unwrap();
    let entries = window_pdpt_entries(&machine, window, 2);
    let free = frames.stats().free;
    // GiB 1 of the window: its PD is there, empty.
    let config = VmallocConfig {
        start: phys.window() + (1u64 << 30),
        size: 1 << 30,
        ..VmallocConfig::default()
    };
    // SAFETY: refused before anything is written (what the test checks).
    let made = unsafe { Vmalloc::new(config, machine.root(), &phys, &frames, &machine) };
    assert_eq!(made.err(), Some(Error::AlreadyMapped));
    assert_eq!(window_pdpt_entries(&machine, window, 2), entries);
    assert_eq!(frames.stats().free, free);
}
