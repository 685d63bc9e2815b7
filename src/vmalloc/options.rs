//! What a [`Vmalloc`](super::Vmalloc) and each of its allocations can be told.

use crate::{Error, PAGE_SIZE};
use bitflags::bitflags;
use x86_64::VirtAddr;
use x86_64::structures::paging::PageTableFlags;

/// Start of Linux's x86_64 vmalloc range (4-level paging).
pub const VMALLOC_START: u64 = 0xffff_c900_0000_0000;
/// End of Linux's x86_64 vmalloc range, exclusive: 32 TiB after the start.
pub const VMALLOC_END: u64 = 0xffff_e900_0000_0000;
/// Size of Linux's x86_64 vmalloc range: 32 TiB.
pub const VMALLOC_SIZE: u64 = VMALLOC_END - VMALLOC_START;

/// Bytes of one huge mapping (a PD entry): 2 MiB.
pub const HUGE_PAGE_SIZE: u64 = 2 << 20;

/// Pages freed lazily before a purge is forced by default: 32 MiB, as Linux's
/// `lazy_max_pages()` on one CPU.
pub const DEFAULT_LAZY_THRESHOLD_PAGES: u64 = (32 << 20) / PAGE_SIZE;

bitflags! {
    /// Access rights of a mapping. Kernel read access is always granted.
    ///
    /// There is no user-mode right: the vmalloc region is part of the kernel half
    /// that every address space shares, so a user-reachable page there would be open
    /// to every process. Linux's `vmalloc_user` likewise maps kernel-only and hands
    /// pages to one process through `remap_vmalloc_range`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct Prot: u8 {
        /// Readable (always granted; x86 cannot map write-only or execute-only).
        const READ = 1 << 0;
        /// Writable.
        const WRITE = 1 << 1;
        /// Executable. Refused together with `WRITE` (W^X).
        const EXEC = 1 << 2;
    }
}

impl Prot {
    /// Kernel read-write data: the default (Linux's `PAGE_KERNEL`).
    pub const KERNEL_RW: Prot = Prot::READ.union(Prot::WRITE);

    /// Kernel read-only data (Linux's `PAGE_KERNEL_RO`).
    pub const KERNEL_RO: Prot = Prot::READ;

    /// Kernel code: read and execute, never written (Linux's `PAGE_KERNEL_ROX`).
    pub const KERNEL_RX: Prot = Prot::READ.union(Prot::EXEC);

    /// The leaf entry flags for these rights: present, global, writable only if
    /// asked, NX unless executable.
    pub(crate) fn leaf_flags(self) -> Result<PageTableFlags, Error> {
        if self.contains(Prot::WRITE | Prot::EXEC) {
            return Err(Error::WriteExecute);
        }
        let mut flags = PageTableFlags::PRESENT | PageTableFlags::GLOBAL;
        flags.set(PageTableFlags::WRITABLE, self.contains(Prot::WRITE));
        flags.set(PageTableFlags::NO_EXECUTE, !self.contains(Prot::EXEC));
        Ok(flags)
    }
}

bitflags! {
    /// Options of an allocation, after Linux's `VM_*` and `__GFP_ZERO` flags.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct VmFlags: u8 {
        /// Zero the memory (`vzalloc`).
        const ZERO = 1 << 0;
        /// No guard page after the area (Linux's `VM_NO_GUARD`).
        const NO_GUARD = 1 << 1;
        /// Map with 2 MiB pages where possible (Linux's `VM_ALLOW_HUGE_VMAP`,
        /// `vmalloc_huge`): see [huge mappings](super::huge).
        const HUGE = 1 << 2;
    }
}

/// Memory type of an `ioremap` mapping: the PAT entry its 4 KiB leaves select
/// (PAT, PCD, PWT), in the layout Linux programs the PAT with (entry 1 WC, entry 7
/// WT; the others as at power-on). A kernel that leaves the power-on PAT gets a
/// stricter type for the two modes that need a programmed entry (WT for WC, UC for
/// WT), never a weaker one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CacheMode {
    /// Strong uncacheable: PCD and PWT, entry 3 (UC in both layouts).
    Uncached,
    /// Write-combining: PWT alone, entry 1 (WC as Linux programs it; WT at power-on).
    WriteCombining,
    /// Write-through: PAT, PCD and PWT, entry 7 (WT as Linux programs it; UC at
    /// power-on).
    WriteThrough,
}

/// Bit 7 of a 4 KiB leaf: its PAT bit (`HUGE_PAGE` names it in an upper entry).
const PAT_4K: PageTableFlags = PageTableFlags::HUGE_PAGE;

impl CacheMode {
    pub(crate) fn flags(self) -> PageTableFlags {
        match self {
            CacheMode::Uncached => PageTableFlags::NO_CACHE | PageTableFlags::WRITE_THROUGH,
            CacheMode::WriteCombining => PageTableFlags::WRITE_THROUGH,
            CacheMode::WriteThrough => {
                PAT_4K | PageTableFlags::NO_CACHE | PageTableFlags::WRITE_THROUGH
            }
        }
    }
}

/// Everything `vmalloc_with` (this library's `__vmalloc_node_range`) can be told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmOptions {
    /// Alignment of the start address, a power of two (bytes). At least a page.
    pub align: u64,
    /// Access rights.
    pub prot: Prot,
    /// Zeroing and guard-page options.
    pub flags: VmFlags,
    /// Label shown in [`Vmalloc::areas`](super::Vmalloc::areas) listings (Linux
    /// prints the caller).
    pub tag: &'static str,
}

impl Default for VmOptions {
    fn default() -> Self {
        Self {
            align: PAGE_SIZE,
            prot: Prot::KERNEL_RW,
            flags: VmFlags::empty(),
            tag: "",
        }
    }
}

/// Region and flushing policy of a [`Vmalloc`](super::Vmalloc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmallocConfig {
    /// First address of the region; page-aligned, canonical, not 0.
    pub start: VirtAddr,
    /// Bytes in the region; a multiple of the page size. The region's end must be a
    /// canonical address too (so not the top of either canonical half).
    pub size: u64,
    /// Pages that may wait for the batched flush before `vfree` forces a purge.
    pub lazy_threshold_pages: u64,
    /// Flush and return frames on every free instead of batching.
    pub eager: bool,
    /// Serve small `vmalloc` areas (up to 16 pages, plain options) from per-CPU
    /// blocks and frame caches, without the manager's lock (see
    /// [per-CPU blocks](super::blocks)). On by default. It takes effect when the
    /// flush policy names the CPUs ([`TlbFlush::cpus`](crate::TlbFlush::cpus), as
    /// `InvlpgFlush` and `Shootdown` do); off, or without CPUs, every area is made
    /// under the manager's lock and no zone is set aside for the blocks.
    pub cpu_caches: bool,
}

impl Default for VmallocConfig {
    fn default() -> Self {
        Self {
            start: VirtAddr::new(VMALLOC_START),
            size: VMALLOC_SIZE,
            lazy_threshold_pages: DEFAULT_LAZY_THRESHOLD_PAGES,
            eager: false,
            cpu_caches: true,
        }
    }
}
