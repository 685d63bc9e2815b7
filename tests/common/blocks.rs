//! Helpers shared by the `blocks*` tests: a machine with CPUs and a shootdown, a
//! manager configured for per-CPU blocks, and checks on its zone and its frames.

use std::ptr::NonNull;
use vmalloc::vmalloc::VmallocStats;
use vmalloc::vmalloc::blocks::MAX_BLOCK_PAGES;
use vmalloc::{TlbFlush, Vmalloc, VmallocConfig};
use vmalloc_sim::scenarios;
use vmalloc_sim::{SimConfig, SimFrames, SimMachine, SimPhys};
use x86_64::VirtAddr;

pub type Tlb = scenarios::SmpTlb;
pub type Manager<T> = Vmalloc<&'static SimFrames, SimPhys<'static>, T>;

pub const PAGE: usize = 4096;

pub fn cached() -> VmallocConfig {
    VmallocConfig {
        cpu_caches: true,
        ..VmallocConfig::default()
    }
}

/// A machine with `cpus` CPUs, its frames and a shootdown over it.
pub fn smp_machine(cpus: usize) -> (&'static SimMachine, &'static SimFrames, &'static Tlb) {
    scenarios::smp_machine(
        SimConfig::new(64 << 20)
            .with_cpus(cpus)
            .with_scatter_seed(9),
    )
}

pub fn addr(ptr: NonNull<u8>) -> VirtAddr {
    VirtAddr::from_ptr(ptr.as_ptr())
}

/// The zone's range, from the listing.
pub fn zone<T: TlbFlush>(vm: &Manager<T>) -> std::ops::Range<u64> {
    let zone = vm
        .areas()
        .find(|area| area.tag == "vmap_blocks")
        .expect("the zone is listed");
    zone.start.as_u64()..zone.start.as_u64() + zone.span
}

/// Every frame is free, data, a page table, waiting for a flush (on the purge list
/// or a CPU's lazy list), cached, or bookkeeping.
pub fn assert_frames_conserved(stats: &VmallocStats, frames: &SimFrames) {
    let accounted = frames.stats().free
        + stats.data_frames
        + stats.page_table_frames
        + stats.pending_purge_frames
        + stats.cached_frames
        + stats.bookkeeping_frames;
    assert_eq!(accounted, frames.stats().total, "{stats:?}");
}

/// An area of `pages` pages: from a per-CPU block up to `MAX_BLOCK_PAGES`, from the
/// locked path above.
pub fn area_of(vm: &Manager<impl TlbFlush>, pages: usize) -> NonNull<u8> {
    let ptr = vm.vmalloc(pages * PAGE).unwrap();
    let in_zone = zone(vm).contains(&(ptr.as_ptr() as u64));
    assert_eq!(in_zone, pages as u64 <= MAX_BLOCK_PAGES, "{pages} pages");
    ptr
}
