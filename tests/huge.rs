//! Huge (2 MiB) vmalloc mappings on the simulated machine: what the MMU and the
//! `x86_64` crate's walker see, the 4 KiB fallback, and every call on such areas.

use core::ptr::NonNull;
use vmalloc::frame::FaultInjector;
use vmalloc::vmalloc::*;
use vmalloc::{Error, FrameSource, PAGE_SIZE};
use vmalloc_sim::{Access, SimConfig, SimFrames, SimMachine, SimPhys};
use x86_64::structures::idt::PageFaultErrorCode;
use x86_64::structures::paging::mapper::{MappedFrame, Translate, TranslateResult};
use x86_64::structures::paging::{PageSize, PhysFrame, Size2MiB};
use x86_64::{PhysAddr, VirtAddr};

const MIB2: u64 = HUGE_PAGE_SIZE;

/// Frames are handed out lowest first, so 2 MiB runs exist.
fn machine() -> SimMachine {
    SimMachine::new(SimConfig::new(64 << 20))
}

/// A manager without the per-CPU blocks: huge areas never come from them, and
/// without their zone the region's first 2 MiB is where these tests expect areas.
fn manager<F: FrameSource + Clone>(
    machine: &SimMachine,
    frames: F,
) -> Vmalloc<F, SimPhys<'_>, &SimMachine> {
    let config = VmallocConfig {
        cpu_caches: false,
        ..VmallocConfig::default()
    };
    // SAFETY: the machine's page tables serve this manager alone.
    unsafe { Vmalloc::new(config, machine.root(), machine.phys(), frames, machine) }.unwrap()
}

fn addr(ptr: NonNull<u8>) -> VirtAddr {
    VirtAddr::from_ptr(ptr.as_ptr())
}

fn huge(flags: VmFlags) -> VmOptions {
    VmOptions {
        flags: VmFlags::HUGE | flags,
        ..VmOptions::default()
    }
}

/// The page size the `x86_64` crate's own walker finds at `at`.
fn walker_page_size(machine: &SimMachine, at: VirtAddr) -> Option<u64> {
    // SAFETY: the walker only reads the tables here.
    let walker = unsafe { machine.offset_page_table() };
    match walker.translate(at) {
        TranslateResult::Mapped { frame, .. } => Some(match frame {
            MappedFrame::Size4KiB(_) => 4096,
            MappedFrame::Size2MiB(_) => MIB2,
            MappedFrame::Size1GiB(_) => 1 << 30,
        }),
        _ => None,
    }
}

fn mmu_page_size(machine: &SimMachine, at: VirtAddr) -> u64 {
    machine.translate(at, Access::READ).unwrap().page_size
}

/// Writes a pattern that differs per 8-byte word over `len` bytes at `at`.
fn stamp(machine: &SimMachine, at: VirtAddr, len: u64, seed: u64) {
    let bytes: Vec<u8> = (0..len / 8)
        .flat_map(|i| (i ^ seed).to_le_bytes())
        .collect();
    // SAFETY: bytes the test owns: no live Rust value lives there.
    unsafe { machine.write(at, &bytes) }.unwrap();
}

fn stamped(machine: &SimMachine, at: VirtAddr, len: u64, seed: u64) -> bool {
    let mut bytes = vec![0; len as usize];
    machine.read(at, &mut bytes).unwrap();
    bytes
        .chunks(8)
        .enumerate()
        .all(|(i, word)| word == (i as u64 ^ seed).to_le_bytes())
}

fn zeroed(machine: &SimMachine, at: VirtAddr, len: u64) -> bool {
    let mut bytes = vec![1; len as usize];
    machine.read(at, &mut bytes).unwrap();
    bytes.iter().all(|&b| b == 0)
}

/// Takes every free frame, then gives back all but one frame in each 2 MiB, so no
/// 2 MiB run is left. Returns the frames kept.
fn break_every_run(frames: &SimFrames) -> Vec<PhysFrame> {
    let mut all =
        vec![PhysFrame::containing_address(PhysAddr::zero()); frames.stats().free as usize];
    let got = frames.alloc_frames(&mut all);
    all.truncate(got);
    let (kept, back): (Vec<_>, Vec<_>) = all
        .into_iter()
        .partition(|frame| frame.start_address().as_u64() % MIB2 == 0);
    // SAFETY: frames the test took and no longer uses (or a bad free, refused).
    unsafe { frames.free_frames(&back) }.unwrap();
    kept
}

#[test]
fn a_huge_area_is_aligned_and_mapped_with_2mib_entries_and_a_4kib_tail() {
    let machine = machine();
    let frames = machine.frames();
    let vm = manager(&machine, &frames);
    let before = vm.vmalloc(4096).unwrap();
    let size = 2 * MIB2 + 3 * PAGE_SIZE;
    let ptr = vm.vmalloc_huge(size as usize).unwrap();
    let start = addr(ptr);
    assert_eq!(start.as_u64() % MIB2, 0, "2 MiB-aligned");
    assert_eq!(start, addr(before) + MIB2, "the next 2 MiB boundary");
    for chunk in [0, MIB2] {
        for offset in [0, 0x1234, MIB2 - 8] {
            let at = start + chunk + offset;
            assert_eq!(mmu_page_size(&machine, at), MIB2, "MMU at {at:?}");
            assert_eq!(
                walker_page_size(&machine, at),
                Some(MIB2),
                "walker at {at:?}"
            );
        }
    }
    let tail = start + 2 * MIB2;
    assert_eq!(mmu_page_size(&machine, tail + 2 * PAGE_SIZE), PAGE_SIZE);
    assert_eq!(walker_page_size(&machine, tail), Some(PAGE_SIZE));

    stamp(&machine, start, size, 0x5eed);
    assert!(stamped(&machine, start, size, 0x5eed));
    // SAFETY: bytes the test owns: no live Rust value lives there.
    let past_end = unsafe { machine.write(start + size, &[1]) }.unwrap_err();
    assert!(past_end.to_string().contains("not present") || past_end.page_fault().is_some());
    let diagnosis = vm
        .diagnose_fault(start + size, PageFaultErrorCode::CAUSED_BY_WRITE)
        .to_string();
    assert!(diagnosis.contains("guard"), "{diagnosis}");

    // Each 4 KiB page of a 2 MiB mapping is the matching frame of its run.
    let inner = start + MIB2 + 5 * PAGE_SIZE + 7;
    let frame = vm.vmalloc_to_frame(inner).unwrap();
    assert_eq!(
        frame.start_address(),
        machine
            .translate(inner, Access::READ)
            .unwrap()
            .phys()
            .align_down(PAGE_SIZE)
    );

    let stats = vm.stats();
    assert_eq!(stats.huge_mappings, 2);
    assert_eq!(
        stats.data_frames,
        size / PAGE_SIZE + 1,
        "and the page before"
    );
    let line = vm.info().to_string();
    assert!(
        line.contains(&format!("pages={} huge=2 vmalloc", size / PAGE_SIZE)),
        "{line}"
    );
    let area = vm.find_vm_area(start).unwrap();
    assert_eq!(area.huge_mappings, 2);
    assert!(vm.stats().to_string().contains("VmallocHuge:"));
}

#[test]
fn a_huge_area_needs_fewer_page_tables_and_gives_every_frame_back() {
    let machine = machine();
    let frames = machine.frames();
    let vm = manager(&machine, &frames);
    let base = (frames.stats().free, vm.stats().page_table_frames);
    let size = 8 * MIB2;

    let small = vm.vzalloc(size as usize).unwrap();
    let tables_4k = vm.stats().page_table_frames - base.1;
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    unsafe { vm.vfree(small.as_ptr()) }.unwrap();
    vm.purge();
    assert_eq!((frames.stats().free, vm.stats().page_table_frames), base);

    let options = huge(VmFlags::ZERO);
    let big = vm.vmalloc_with(size as usize, &options).unwrap();
    let tables_huge = vm.stats().page_table_frames - base.1;
    assert_eq!(vm.stats().huge_mappings, 8);
    assert!(
        tables_huge < tables_4k,
        "{tables_huge} tables vs {tables_4k}"
    );
    assert_eq!(tables_4k - tables_huge, 8, "one page table per 2 MiB saved");
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    unsafe { vm.vfree(big.as_ptr()) }.unwrap();
    assert_eq!(vm.stats().huge_mappings, 0);
    assert!(
        machine.read(addr(big), &mut [0]).is_err(),
        "detached at once"
    );
    vm.purge();
    assert_eq!((frames.stats().free, vm.stats().page_table_frames), base);
}

#[test]
fn vzalloc_huge_zeroes_frames_that_held_data() {
    let machine = machine();
    let frames = machine.frames();
    let vm = manager(&machine, &frames);
    let dirty = vm.vmalloc_huge((4 * MIB2) as usize).unwrap();
    stamp(&machine, addr(dirty), 4 * MIB2, 0xdead);
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    unsafe { vm.vfree(dirty.as_ptr()) }.unwrap();
    vm.purge();
    let ptr = vm
        .vmalloc_with((4 * MIB2) as usize, &huge(VmFlags::ZERO))
        .unwrap();
    assert_eq!(vm.stats().huge_mappings, 4);
    assert!(zeroed(&machine, addr(ptr), 4 * MIB2));
}

#[test]
fn without_2mib_runs_each_chunk_falls_back_to_4kib_pages() {
    let machine = machine();
    let frames = machine.frames();
    let vm = manager(&machine, &frames);
    let kept = break_every_run(&frames);
    let size = 3 * MIB2;
    let ptr = vm.vmalloc_huge(size as usize).unwrap();
    assert_eq!(vm.stats().huge_mappings, 0);
    assert_eq!(mmu_page_size(&machine, addr(ptr)), PAGE_SIZE);
    stamp(&machine, addr(ptr), size, 3);
    assert!(stamped(&machine, addr(ptr), size, 3));
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    unsafe { vm.vfree(ptr.as_ptr()) }.unwrap();
    vm.purge();

    // One run back: the first chunk is huge, the others are not.
    let run_start = kept[kept.len() / 2];
    // SAFETY: frames the test took and no longer uses (or a bad free, refused).
    unsafe { frames.free_frame(run_start) }.unwrap();
    let ptr = vm.vmalloc_huge(size as usize).unwrap();
    assert_eq!(vm.stats().huge_mappings, 1);
    let sizes: Vec<_> = (0..3)
        .map(|c| mmu_page_size(&machine, addr(ptr) + c * MIB2))
        .collect();
    assert_eq!(sizes, [MIB2, PAGE_SIZE, PAGE_SIZE]);
    assert_eq!(vm.vmalloc_to_frame(addr(ptr)).unwrap(), run_start);
    assert!(vm.info().to_string().contains("huge=1"));
}

#[test]
fn small_huge_requests_are_plain_areas() {
    let machine = machine();
    let frames = machine.frames();
    let vm = manager(&machine, &frames);
    let first = vm.vmalloc(4096).unwrap();
    let ptr = vm.vmalloc_huge((MIB2 - PAGE_SIZE) as usize).unwrap();
    assert_eq!(vm.stats().huge_mappings, 0);
    assert_eq!(addr(ptr), addr(first) + 2 * PAGE_SIZE, "no 2 MiB alignment");
}

#[test]
fn running_out_of_frames_at_any_step_of_a_huge_vmalloc_rolls_back() {
    // With runs everywhere, and with one run only, so the second chunk's 4 KiB
    // fallback fails too.
    for runs in [usize::MAX, 1] {
        let machine = machine();
        let frames = machine.frames();
        if runs == 1 {
            let kept = break_every_run(&frames);
            // SAFETY: frames the test took and no longer uses (or a bad free, refused).
            unsafe { frames.free_frame(kept[kept.len() / 2]) }.unwrap();
        }
        let injector = FaultInjector::new(&frames);
        // No area yet: the first 2 MiB mapping needs a PD, which can fail too.
        let vm = manager(&machine, &injector);
        let size = 2 * MIB2 + 5 * PAGE_SIZE;
        let mut failures = 0;
        for k in 0.. {
            let before = (frames.stats().free, vm.stats());
            injector.fail_after(k);
            match vm.vmalloc_with(size as usize, &huge(VmFlags::ZERO)) {
                Ok(ptr) => {
                    let fired = injector.fired();
                    injector.disarm();
                    let huge = vm.stats().huge_mappings;
                    assert!(huge <= 2);
                    if !fired {
                        assert_eq!(huge as usize, runs.min(2));
                        assert!(zeroed(&machine, addr(ptr), size));
                        break;
                    }
                    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
                    unsafe { vm.vfree(ptr.as_ptr()) }.unwrap();
                }
                Err(error) => {
                    failures += 1;
                    assert_eq!(error, Error::OutOfFrames, "failing frame {k}");
                    assert_eq!(
                        (frames.stats().free, vm.stats()),
                        before,
                        "failing frame {k}"
                    );
                    assert_eq!(vm.areas().count(), 0);
                }
            }
            vm.purge();
        }
        assert!(failures > 5, "{failures} failures with {runs} runs");
    }
}

#[test]
fn vrealloc_of_a_huge_area_keeps_its_contents_and_splits_where_it_cuts() {
    let machine = machine();
    let frames = machine.frames();
    let vm = manager(&machine, &frames);
    let base = (frames.stats().free, vm.stats().page_table_frames);
    let size = 2 * MIB2 + 4 * PAGE_SIZE;
    let ptr = vm.vmalloc_huge(size as usize).unwrap();
    stamp(&machine, addr(ptr), size, 9);

    // A cut inside the second 2 MiB mapping splits it.
    let cut = MIB2 + MIB2 / 2;
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    let shrunk = unsafe { vm.vrealloc(ptr.as_ptr(), cut as usize) }.unwrap();
    assert_eq!(shrunk, ptr);
    assert_eq!(vm.stats().huge_mappings, 1);
    assert_eq!(vm.find_vm_area(addr(ptr)).unwrap().huge_mappings, 1);
    assert_eq!(mmu_page_size(&machine, addr(ptr) + MIB2), PAGE_SIZE);
    assert_eq!(mmu_page_size(&machine, addr(ptr)), MIB2);
    assert!(stamped(&machine, addr(ptr), cut, 9));
    assert!(
        machine.read(addr(ptr) + cut, &mut [0]).is_err(),
        "unmapped past the cut"
    );

    // A cut on a 2 MiB boundary drops whole mappings.
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    let shrunk = unsafe { vm.vrealloc(ptr.as_ptr(), MIB2 as usize) }.unwrap();
    assert_eq!(vm.stats().huge_mappings, 1);
    assert!(stamped(&machine, addr(shrunk), MIB2, 9));

    // Growing keeps the contents, wherever it lands.
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    let grown = unsafe { vm.vrealloc(shrunk.as_ptr(), (3 * MIB2) as usize) }.unwrap();
    assert!(stamped(&machine, addr(grown), MIB2, 9));
    let info = vm.find_vm_area(addr(grown)).unwrap();
    assert_eq!(vm.stats().huge_mappings, info.huge_mappings);
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    unsafe { vm.vfree(grown.as_ptr()) }.unwrap();
    vm.purge();
    assert_eq!((frames.stats().free, vm.stats().page_table_frames), base);
    assert_eq!(vm.stats().huge_mappings, 0);
}

#[test]
fn a_read_only_huge_area_refuses_writes() {
    let machine = machine();
    let frames = machine.frames();
    let vm = manager(&machine, &frames);
    let options = VmOptions {
        prot: Prot::READ,
        ..huge(VmFlags::ZERO)
    };
    let ptr = vm.vmalloc_with((2 * MIB2) as usize, &options).unwrap();
    assert_eq!(vm.stats().huge_mappings, 2);
    // SAFETY: bytes the test owns: no live Rust value lives there.
    let fault = unsafe { machine.write(addr(ptr) + MIB2 + 8, &[1]) }.unwrap_err();
    let fault = fault.page_fault().unwrap();
    assert!(
        fault
            .code
            .contains(PageFaultErrorCode::PROTECTION_VIOLATION)
    );
    let mut byte = [1];
    machine.read(addr(ptr) + MIB2 + 8, &mut byte).unwrap();
    assert_eq!(byte, [0]);
}

#[test]
fn a_2mib_run_is_aligned_and_comes_back_frame_by_frame() {
    let machine = machine();
    let frames = machine.frames();
    let before = frames.stats().free;
    let run = frames.alloc_frame_2m().unwrap();
    assert_eq!(run.start_address().as_u64() % Size2MiB::SIZE, 0);
    assert_eq!(frames.stats().free, before - 512);
    let first = PhysFrame::containing_address(run.start_address());
    let all: Vec<_> = PhysFrame::range(first, first + 512).collect();
    // SAFETY: frames the test took and no longer uses (or a bad free, refused).
    unsafe { frames.free_frames(&all) }.unwrap();
    assert_eq!(frames.stats().free, before);
    break_every_run(&frames);
    assert_eq!(frames.alloc_frame_2m(), None);
}

#[test]
fn a_chunk_whose_pd_entry_holds_a_table_falls_back_and_its_run_goes_back() {
    let machine = machine();
    let frames = machine.frames();
    // A PDPT, PD and PT outside the allocator's memory, as a boot loader might have
    // left them over the region's start: the first 2 MiB cannot be a 2 MiB page.
    let [pdpt, pd, pt] = [0x20_0000u64, 0x20_1000, 0x20_2000]
        .map(|phys| PhysFrame::containing_address(PhysAddr::new(phys)));
    let table = 0b11; // PRESENT | WRITABLE
    let set = |table_frame: PhysFrame, index: u64, value: u64| {
        // SAFETY: bytes the test owns: no live Rust value lives there.
        unsafe {
            machine.write_phys(
                table_frame.start_address() + index * 8,
                &value.to_le_bytes(),
            )
        }
    };
    set(machine.root(), 402, pdpt.start_address().as_u64() | table);
    set(pdpt, 0, pd.start_address().as_u64() | table);
    set(pd, 0, pt.start_address().as_u64() | table);
    let vm = manager(&machine, &frames);
    let base = frames.stats().free;

    let ptr = vm.vmalloc_huge((2 * MIB2) as usize).unwrap();
    assert_eq!(addr(ptr), VirtAddr::new(VMALLOC_START));
    assert_eq!(vm.stats().huge_mappings, 1);
    assert_eq!(mmu_page_size(&machine, addr(ptr)), PAGE_SIZE);
    assert_eq!(mmu_page_size(&machine, addr(ptr) + MIB2), MIB2);
    stamp(&machine, addr(ptr), 2 * MIB2, 1);
    assert!(stamped(&machine, addr(ptr), 2 * MIB2, 1));
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    unsafe { vm.vfree(ptr.as_ptr()) }.unwrap();
    vm.purge();
    assert_eq!(
        frames.stats().free,
        base,
        "the run the first chunk could not use is back"
    );
}

#[test]
fn without_a_2mib_aligned_range_a_huge_request_gets_4kib_pages_where_it_fits() {
    let machine = machine();
    let frames = machine.frames();
    // 3 MiB from one page past a 2 MiB boundary: the next boundary leaves only
    // 1 MiB before the end.
    let config = VmallocConfig {
        start: VirtAddr::new(VMALLOC_START + PAGE_SIZE),
        size: 3 << 20,
        ..VmallocConfig::default()
    };
    // SAFETY: the machine's root table is used by nothing else in this test.
    let vm =
        unsafe { Vmalloc::new(config, machine.root(), machine.phys(), &frames, &machine) }.unwrap();
    let ptr = vm.vmalloc_huge(MIB2 as usize).unwrap();
    assert_eq!(addr(ptr), config.start);
    assert_eq!(vm.stats().huge_mappings, 0);
    stamp(&machine, addr(ptr), MIB2, 4);
    assert!(stamped(&machine, addr(ptr), MIB2, 4));
    assert_eq!(
        vm.vmalloc_huge(MIB2 as usize),
        Err(Error::OutOfVirtualSpace)
    );
}

#[test]
fn set_prot_on_a_huge_area_keeps_its_2mib_entries() {
    let machine = machine();
    let frames = machine.frames();
    let vm = manager(&machine, &frames);
    let size = 2 * MIB2 + PAGE_SIZE;
    let ptr = vm.vmalloc_huge(size as usize).unwrap();
    stamp(&machine, addr(ptr), size, 6);
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    unsafe { vm.set_prot(ptr.as_ptr(), Prot::READ) }.unwrap();
    for at in [addr(ptr) + 8u64, addr(ptr) + MIB2 + 8, addr(ptr) + 2 * MIB2] {
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
    }
    assert_eq!(mmu_page_size(&machine, addr(ptr) + MIB2), MIB2);
    assert_eq!(walker_page_size(&machine, addr(ptr)), Some(MIB2));
    assert!(stamped(&machine, addr(ptr), size, 6));
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    unsafe { vm.set_prot(ptr.as_ptr(), Prot::KERNEL_RW) }.unwrap();
    // SAFETY: bytes the test owns: no live Rust value lives there.
    unsafe { machine.write(addr(ptr) + MIB2 + 8, &[1]) }.unwrap();
    assert_eq!(vm.stats().huge_mappings, 2);
}
