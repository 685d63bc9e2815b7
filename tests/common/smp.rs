//! Helpers shared by the `smp*` tests: a machine with several CPUs and a shootdown
//! over them.

use vmalloc_sim::scenarios;
use vmalloc_sim::{SimConfig, SimFrames, SimMachine};
use x86_64::VirtAddr;

pub type Tlb = scenarios::SmpTlb;

/// A machine with `cpus` CPUs, its frames and a shootdown over it; `scatter` hands
/// its frames out in a scattered order.
pub fn smp_machine(
    cpus: usize,
    scatter: bool,
) -> (&'static SimMachine, &'static SimFrames, &'static Tlb) {
    let mut config = SimConfig::new(64 << 20).with_cpus(cpus);
    if scatter {
        config = config.with_scatter_seed(5);
    }
    scenarios::smp_machine(config)
}

pub fn addr(ptr: std::ptr::NonNull<u8>) -> VirtAddr {
    VirtAddr::from_ptr(ptr.as_ptr())
}
