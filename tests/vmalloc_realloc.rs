//! `vrealloc` on the simulated machine: shrinking, growing in place, moving without
//! copying, rolling back when frames run out, and zeroed areas staying zeroed.

mod common;

use common::vm::*;
use vmalloc::frame::FaultInjector;
use vmalloc::vmalloc::*;
use vmalloc::{Error, FrameSource};

#[test]
fn vrealloc_shrinks_grows_in_place_and_moves_without_copying() {
    let machine = machine();
    let frames = machine.frames();
    let vm = manager(&machine, &frames, tree_config(true));
    let data: Vec<u8> = (0..4 * 4096).map(|i| (i % 253) as u8).collect();
    let ptr = vm.vmalloc(4 * 4096).unwrap();
    // SAFETY: bytes the test owns: no live Rust value lives there.
    unsafe { machine.write(addr(ptr), &data) }.unwrap();
    let third = vm.vmalloc_to_frame(addr(ptr) + 2 * 4096u64).unwrap();

    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    let grown = unsafe { vm.vrealloc(ptr.as_ptr(), 6 * 4096) }.unwrap();
    assert_eq!(grown, ptr, "the pages after it were free");
    let blocker = vm.vmalloc(4096).unwrap();
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    let moved = unsafe { vm.vrealloc(ptr.as_ptr(), 20 * 4096) }.unwrap();
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
    // SAFETY: bytes the test owns: no live Rust value lives there.
    unsafe { machine.write(addr(moved) + 19 * 4096u64, &[1]) }.unwrap();

    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    let shrunk = unsafe { vm.vrealloc(moved.as_ptr(), 4096) }.unwrap();
    assert_eq!(shrunk, moved);
    assert!(
        machine.read(addr(moved) + 4096u64, &mut [0]).is_err(),
        "the tail is unmapped"
    );
    assert_eq!(vm.stats().data_frames, 2);
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    unsafe { vm.vfree(shrunk.as_ptr()) }.unwrap();
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    unsafe { vm.vfree(blocker.as_ptr()) }.unwrap();
    assert_eq!(vm.stats().data_frames, 0);
}

#[test]
fn a_moving_vrealloc_that_runs_out_of_frames_leaves_the_area_as_it_was() {
    let machine = machine();
    let frames = machine.frames();
    let vm = manager(&machine, &frames, tree_config(false));
    let a = vm.vmalloc(16 << 10).unwrap();
    let data: Vec<u8> = (0..16 << 10).map(|i| (i % 249) as u8).collect();
    // SAFETY: bytes the test owns: no live Rust value lives there.
    unsafe { machine.write(addr(a), &data) }.unwrap();
    let _blocker = vm.vmalloc(4096).unwrap();
    let _window = vm.reserve(2 << 20, &VmOptions::default()).unwrap();
    let held = hold_all_but(&frames, 0);
    let before = (
        free_frames(&frames),
        vm.stats(),
        vm.areas().collect::<Vec<_>>(),
    );
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    assert_eq!(
        unsafe { vm.vrealloc(a.as_ptr(), 32 << 10) },
        Err(Error::OutOfFrames)
    );
    assert_eq!(
        (
            free_frames(&frames),
            vm.stats(),
            vm.areas().collect::<Vec<_>>()
        ),
        before
    );
    let mut back = vec![0; data.len()];
    machine.read(addr(a), &mut back).unwrap();
    assert_eq!(back, data);
    // SAFETY: frames the test took and no longer uses (or a bad free, refused).
    unsafe { frames.free_frames(&held) }.unwrap();

    // The same for a failure at every frame the move takes.
    let machine = self::machine();
    let frames = machine.frames();
    let injector = FaultInjector::new(&frames);
    let vm = manager(&machine, &injector, tree_config(false));
    // 600 pages: at their new place they cross a page-table boundary, so remapping
    // them can fail halfway, as can backing the 100 new pages.
    let a = vm.vmalloc(600 * 4096).unwrap();
    let data: Vec<u8> = (0..600 * 4096).map(|i| (i % 241) as u8).collect();
    // SAFETY: bytes the test owns: no live Rust value lives there.
    unsafe { machine.write(addr(a), &data) }.unwrap();
    let _blocker = vm.vmalloc(4096).unwrap();
    for k in 0.. {
        let before = (
            free_frames(&frames),
            vm.stats(),
            vm.areas().collect::<Vec<_>>(),
        );
        injector.fail_after(k);
        // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
        let result = unsafe { vm.vrealloc(a.as_ptr(), 700 * 4096) };
        injector.disarm();
        if let Ok(moved) = result {
            assert!(k > 100, "succeeded with the failure injected at frame {k}");
            machine.read(addr(moved), &mut back_of(&data)).unwrap();
            break;
        }
        assert_eq!(
            (
                free_frames(&frames),
                vm.stats(),
                vm.areas().collect::<Vec<_>>()
            ),
            before,
            "failing frame {k}"
        );
        let mut back = back_of(&data);
        machine.read(addr(a), &mut back).unwrap();
        assert_eq!(back, data, "failing frame {k}");
    }
}

#[test]
fn a_zeroed_area_reads_zero_where_a_shrink_dropped_bytes() {
    let machine = machine();
    let frames = machine.frames();
    let vm = manager(&machine, &frames, config(false));
    let p = vm.vzalloc(8192).unwrap();
    // SAFETY: bytes the test owns: no live Rust value lives there.
    unsafe { machine.write(addr(p), &[0xaa; 8192]) }.unwrap();
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    let p = unsafe { vm.vrealloc(p.as_ptr(), 100) }.unwrap();
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    let p = unsafe { vm.vrealloc(p.as_ptr(), 8192) }.unwrap();
    let mut back = vec![1; 8192];
    machine.read(addr(p), &mut back).unwrap();
    assert!(back[..100].iter().all(|&b| b == 0xaa), "kept bytes stay");
    assert!(
        back[100..].iter().all(|&b| b == 0),
        "dropped bytes read zero"
    );

    // Within one page too.
    // SAFETY: bytes the test owns: no live Rust value lives there.
    unsafe { machine.write(addr(p), &[0xbb; 4096]) }.unwrap();
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    let p = unsafe { vm.vrealloc(p.as_ptr(), 3000) }.unwrap();
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    let p = unsafe { vm.vrealloc(p.as_ptr(), 4000) }.unwrap();
    let mut back = vec![1; 4000];
    machine.read(addr(p), &mut back).unwrap();
    assert!(back[3000..].iter().all(|&b| b == 0));
}

fn back_of(data: &[u8]) -> Vec<u8> {
    vec![0; data.len()]
}

#[test]
fn a_moving_vrealloc_keeps_the_caller_listings_name() {
    let machine = machine();
    let frames = machine.frames();
    // The default configuration: small areas come from the per-CPU blocks.
    let vm = manager(&machine, &frames, config(false));
    let caller = |ptr: core::ptr::NonNull<u8>| {
        let area = vm.find_vm_area(addr(ptr)).unwrap();
        area.caller.map(|at| (at.file(), at.line()))
    };
    let (tree, block, block_to_block) = (
        vm.vmalloc(20 * 4096).unwrap(),
        vm.vmalloc(4 * 4096).unwrap(),
        vm.vmalloc(2 * 4096).unwrap(),
    );
    let made_at = [caller(tree), caller(block), caller(block_to_block)];
    assert!(
        made_at
            .iter()
            .all(|at| at.is_some_and(|(file, _)| file.ends_with("vmalloc_realloc.rs")))
    );
    // SAFETY: each pointer is replaced by the one returned and not used again.
    let moved = unsafe {
        [
            vm.vrealloc(tree.as_ptr(), 40 * 4096).unwrap(),
            // Out of the blocks into the tree, and to another block area.
            vm.vrealloc(block.as_ptr(), 24 * 4096).unwrap(),
            vm.vrealloc(block_to_block.as_ptr(), 8 * 4096).unwrap(),
        ]
    };
    assert_eq!(moved.map(caller), made_at);
    for area in moved {
        // SAFETY: live areas, freed once.
        unsafe { vm.vfree(area.as_ptr()) }.unwrap();
    }
}

/// A growth that finds the pages after the area waiting for the purge, and no room
/// elsewhere, grows into them once the purge it runs has freed them, as a growth
/// after an explicit purge does.
#[test]
fn a_growth_into_a_neighbour_waiting_for_the_purge_is_done_in_place_when_nothing_else_fits() {
    let machine = machine();
    let frames = machine.frames();
    let size = 16 << 20;
    let config = VmallocConfig {
        size,
        ..tree_config(false)
    };
    let vm = manager(&machine, &frames, config);
    let area = vm.vmalloc(10 * 4096).unwrap();
    let neighbour = vm.vmalloc(20 * 4096).unwrap();
    assert_eq!(addr(neighbour), addr(area) + 11 * 4096u64);
    let rest = VmOptions {
        flags: VmFlags::NO_GUARD,
        ..VmOptions::default()
    };
    vm.reserve(size as usize - 32 * 4096, &rest).unwrap();
    assert_eq!(vm.stats().largest_free, 0, "the region is full");
    // SAFETY: nothing uses the area after this.
    unsafe { vm.vfree(neighbour.as_ptr()) }.unwrap();
    // SAFETY: nothing uses the area through the old pointer unless it is returned.
    let grown = unsafe { vm.vrealloc(area.as_ptr(), 25 * 4096) };
    assert_eq!(grown, Ok(area), "{:?}", vm.stats());
    assert_eq!(vm.find_vm_area(addr(area)).unwrap().pages, 25);
}
