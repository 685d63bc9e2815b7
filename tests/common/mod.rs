//! Helpers shared by integration tests, one submodule per family of tests. Each test
//! crate uses only some of them.

#![allow(dead_code)]

pub mod blocks;
pub mod interrupting;
pub mod paging;
pub mod smp;
pub mod vm;

/// Writes `byte` into every frame `frames` has free now (taking them all, then giving
/// them back), so memory a test is handed afterwards reads `byte` wherever the
/// library does not zero it: a check that memory reads zero can fail.
pub fn dirty_free_frames(
    machine: &vmalloc_sim::SimMachine,
    frames: &vmalloc_sim::SimFrames,
    byte: u8,
) {
    use vmalloc::FrameSource;
    use x86_64::structures::paging::PhysFrame;
    let free = frames.stats().free as usize;
    let mut all = vec![PhysFrame::containing_address(x86_64::PhysAddr::zero()); free];
    let taken = frames.alloc_frames(&mut all);
    for frame in &all[..taken] {
        // SAFETY: a free frame, taken just above: nothing else uses it.
        unsafe { machine.fill_phys(frame.start_address(), 4096, byte) };
    }
    // SAFETY: the frames taken above, unused and unmapped.
    unsafe { frames.free_frames(&all[..taken]) }.unwrap();
}
