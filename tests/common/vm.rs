//! Helpers shared by the `vmalloc*` tests: the machine, the manager in the default
//! and tree-only configurations, frame accounting and raw page-table entries.

use core::ptr::NonNull;
use vmalloc::FrameSource;
use vmalloc::vmalloc::*;
use vmalloc_sim::{SimConfig, SimFrames, SimMachine, SimPhys};
use x86_64::structures::idt::PageFaultErrorCode;
use x86_64::structures::paging::PhysFrame;
use x86_64::{PhysAddr, VirtAddr};

pub type SimVmalloc<'m, F> = Vmalloc<F, SimPhys<'m>, &'m SimMachine>;

pub fn machine() -> SimMachine {
    SimMachine::new(SimConfig::new(64 << 20).with_scatter_seed(7))
}

pub fn config(eager: bool) -> VmallocConfig {
    VmallocConfig {
        eager,
        ..VmallocConfig::default()
    }
}

/// Without the per-CPU blocks: for the tree's own mechanics (the purge list, range
/// flushes per area, bookkeeping nodes, growing in place) on areas small enough
/// that the blocks would serve them. `tests/blocks.rs` checks the same on blocks.
pub fn tree_config(eager: bool) -> VmallocConfig {
    VmallocConfig {
        cpu_caches: false,
        ..config(eager)
    }
}

pub fn manager<'m, F: FrameSource + Clone>(
    machine: &'m SimMachine,
    frames: F,
    config: VmallocConfig,
) -> SimVmalloc<'m, F> {
    // SAFETY: the machine's root table is used by nothing else in this test.
    unsafe { Vmalloc::new(config, machine.root(), machine.phys(), frames, machine) }.unwrap()
}

pub fn addr(ptr: NonNull<u8>) -> VirtAddr {
    VirtAddr::from_ptr(ptr.as_ptr())
}

pub fn free_frames(frames: &SimFrames) -> u64 {
    frames.stats().free
}

/// Top-level tables of the default region: one per 512 GiB of its 32 TiB.
pub const TOP_LEVEL_TABLES: u64 = VMALLOC_SIZE >> 39;

/// Every frame is free, data, page table, waiting for the purge, bookkeeping, or
/// held by the test (`held`).
pub fn assert_frames_conserved<F: FrameSource + Clone>(
    vm: &SimVmalloc<'_, F>,
    frames: &SimFrames,
    held: u64,
) {
    let s = vm.stats();
    let accounted = frames.stats().free
        + s.data_frames
        + s.page_table_frames
        + s.pending_purge_frames
        + s.cached_frames
        + s.bookkeeping_frames
        + held;
    assert_eq!(accounted, frames.stats().total, "{s:?}");
}

/// Takes frames from `frames` until only `left` are free; the caller frees them.
pub fn hold_all_but(frames: &SimFrames, left: u64) -> Vec<PhysFrame> {
    let mut held = vec![PhysFrame::containing_address(PhysAddr::zero()); 4096];
    let mut all = Vec::new();
    while free_frames(frames) > left {
        let want = ((free_frames(frames) - left) as usize).min(held.len());
        let got = frames.alloc_frames(&mut held[..want]);
        all.extend_from_slice(&held[..got]);
    }
    all
}

/// Entry `index` of the page table in `table`.
pub fn entry(machine: &SimMachine, table: PhysFrame, index: usize) -> u64 {
    let mut raw = [0; 8];
    machine.read_phys(table.start_address() + index as u64 * 8, &mut raw);
    u64::from_le_bytes(raw)
}

pub fn set_entry(machine: &SimMachine, table: PhysFrame, index: usize, value: u64) {
    // SAFETY: bytes the test owns: no live Rust value lives there.
    unsafe {
        machine.write_phys(
            table.start_address() + index as u64 * 8,
            &value.to_le_bytes(),
        )
    };
}

pub fn is_write_protection_fault(machine: &SimMachine, at: VirtAddr) -> bool {
    // SAFETY: bytes the test owns: no live Rust value lives there.
    let fault = unsafe { machine.write(at, &[1]) }
        .unwrap_err()
        .page_fault()
        .unwrap();
    fault.addr == at
        && fault.code.contains(
            PageFaultErrorCode::PROTECTION_VIOLATION | PageFaultErrorCode::CAUSED_BY_WRITE,
        )
}
