//! How a [`SimMachine`] is built.

#[cfg(doc)]
use crate::{SimCpu, SimMachine};

/// How to build a [`SimMachine`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimConfig {
    /// Bytes of physical address space, all backed by one host block; a multiple of
    /// 2 MiB, at least 16 MiB. Reserved ranges and holes of the memory map lie inside
    /// it, so usable memory is somewhat less.
    pub memory_size: u64,
    /// How many holes to cut into the usable memory above the kernel image (see
    /// [`SimMachine::memory_map`]); each needs 256 KiB of usable memory.
    pub reserved_holes: usize,
    /// Seed for handing frames out in shuffled order; `None` for address order.
    pub scatter_seed: Option<u64>,
    /// Bytes of host window to reserve (a positive multiple of 4 KiB), if any; see
    /// the [module documentation](crate#the-host-window). Linux x86_64 only.
    pub host_window: Option<u64>,
    /// Whether the host window's pages are bounded only by the host mappings they
    /// cost, not by their number too (see [`SimConfig::with_host_window_by_mappings`]).
    pub host_window_by_mappings: bool,
    /// CPUs, each with its own TLB (1 to [`MAX_CPUS`](vmalloc::smp::MAX_CPUS)).
    pub cpus: usize,
}

impl SimConfig {
    /// `memory_size` bytes, 8 holes, no scattering.
    pub const fn new(memory_size: u64) -> Self {
        Self {
            memory_size,
            reserved_holes: 8,
            scatter_seed: None,
            host_window: None,
            host_window_by_mappings: false,
            cpus: 1,
        }
    }

    /// The same configuration with `cpus` CPUs (see [`SimCpu`]). Every CPU starts
    /// online, so a shootdown waits for each until a thread serves it (one that
    /// [`enter`](SimCpu::enter)s it and takes its interrupts), or it goes offline:
    /// take the CPUs no thread runs offline first ([`SimCpu::go_offline`]).
    pub const fn with_cpus(self, cpus: usize) -> Self {
        Self { cpus, ..self }
    }

    /// The same configuration with `holes` holes.
    pub const fn with_holes(self, holes: usize) -> Self {
        Self {
            reserved_holes: holes,
            ..self
        }
    }

    /// The same configuration with a host window of `size` bytes (a positive
    /// multiple of 4 KiB): physical memory in a `memfd`, and a host range whose
    /// simulated virtual addresses host code can dereference.
    #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
    pub const fn with_host_window(self, size: u64) -> Self {
        Self {
            host_window: Some(size),
            ..self
        }
    }

    /// The same configuration with a host window (if it has one) that may keep as
    /// many pages host-mapped as fit in three quarters of the host's limit on
    /// mappings, rather than a quarter of that limit in pages: pages on consecutive
    /// frames share one mapping, so a whole program's working set of hundreds of MiB
    /// stays mapped instead of being filled again and again (see [the host
    /// window](crate#the-host-window)).
    pub const fn with_host_window_by_mappings(self) -> Self {
        Self {
            host_window_by_mappings: true,
            ..self
        }
    }

    /// The same configuration with a scatter seed.
    pub const fn with_scatter_seed(self, seed: u64) -> Self {
        Self {
            scatter_seed: Some(seed),
            ..self
        }
    }
}

impl Default for SimConfig {
    /// 64 MiB, 8 holes, no scattering.
    fn default() -> Self {
        Self::new(64 << 20)
    }
}
