//! The multiboot (version 1) information QEMU passes, and the memory map built from it.
//!
//! The firmware map lists RAM and reserved ranges. The map handed to checks (and
//! later to the frame allocator) is the firmware map with everything the kernel
//! already uses carved out of the usable ranges and listed as reserved instead: the
//! legacy first MiB, the kernel image (code, statics, boot page tables, stacks), the
//! multiboot info, its memory-map buffer and the command line. Usable ranges in it
//! therefore never overlap memory in use.

use crate::cell::StaticCell;
use core::ops::Range;
use vmalloc::frame::{MemoryRegion, RegionKind};
use x86_64::PhysAddr;

/// `eax` on entry from a multiboot loader.
pub const BOOTLOADER_MAGIC: u32 = 0x2bad_b002;
/// Capacity of the memory-map buffers; QEMU reports about 6 entries.
pub const MAX_REGIONS: usize = 64;

const FLAG_MEMORY: u32 = 1 << 0;
const FLAG_CMDLINE: u32 = 1 << 2;
const FLAG_MMAP: u32 = 1 << 6;
/// Size of the fixed part of the multiboot info structure.
const INFO_SIZE: u64 = 120;
const MMAP_TYPE_RAM: u32 = 1;
const PAGE: u64 = vmalloc::PAGE_SIZE;
/// Below 1 MiB live the real-mode IVT, the BIOS data area, the EBDA and option ROMs.
const LEGACY_LOW_END: u64 = 0x10_0000;

/// What the kernel learned from the multiboot info.
#[derive(Debug)]
pub struct BootInfo {
    /// Physical address of the multiboot info structure.
    pub info_addr: PhysAddr,
    /// KiB of RAM from 1 MiB up to the first hole (multiboot `mem_upper`).
    pub mem_upper_kib: u32,
    /// The kernel command line (`-append`), empty if none.
    pub cmdline: &'static str,
    /// The memory map exactly as the loader reported it.
    pub firmware_map: &'static [MemoryRegion],
    /// The firmware map with the memory the kernel uses reserved (see module docs).
    pub memory_map: &'static [MemoryRegion],
    /// Physical end of the highest RAM region.
    pub ram_end: PhysAddr,
    /// What the loader left that the kernel still reads: the info structure, the
    /// memory map buffer and the command line.
    loader: [Range<u64>; 3],
}

impl BootInfo {
    /// The physical ranges of what the loader left that the kernel still uses.
    pub fn loader_ranges(&self) -> [Range<u64>; 3] {
        self.loader.clone()
    }

    /// The value of `key=value` on the command line.
    pub fn cmdline_value(&self, key: &str) -> Option<&'static str> {
        self.cmdline
            .split_ascii_whitespace()
            .find_map(|word| word.strip_prefix(key)?.strip_prefix('='))
    }
}

/// A fixed-capacity list of regions (the kernel has no heap).
struct RegionList {
    regions: [MemoryRegion; MAX_REGIONS],
    len: usize,
}

const EMPTY_REGION: MemoryRegion = MemoryRegion {
    range: PhysAddr::zero()..PhysAddr::zero(),
    kind: RegionKind::Reserved,
};

impl RegionList {
    const fn new() -> Self {
        Self {
            regions: [EMPTY_REGION; MAX_REGIONS],
            len: 0,
        }
    }

    /// Appends `[start, end)` unless it is empty.
    fn push(&mut self, start: u64, end: u64, kind: RegionKind) {
        if start >= end {
            return;
        }
        assert!(
            self.len < MAX_REGIONS,
            "memory map has more than {MAX_REGIONS} entries"
        );
        self.regions[self.len] = MemoryRegion {
            range: PhysAddr::new(start)..PhysAddr::new(end),
            kind,
        };
        self.len += 1;
    }

    fn as_slice(&self) -> &[MemoryRegion] {
        &self.regions[..self.len]
    }
}

static FIRMWARE_MAP: StaticCell<RegionList> = StaticCell::new(RegionList::new());
static MEMORY_MAP: StaticCell<RegionList> = StaticCell::new(RegionList::new());

/// # Safety
///
/// `addr` is within the multiboot structures (identity-mapped, not necessarily
/// aligned).
unsafe fn read_u32(addr: u64) -> u32 {
    // SAFETY: the caller's contract.
    unsafe { (addr as *const u32).read_unaligned() }
}

/// # Safety
///
/// As [`read_u32`].
unsafe fn read_u64(addr: u64) -> u64 {
    // SAFETY: the caller's contract.
    unsafe { (addr as *const u64).read_unaligned() }
}

/// Parses the multiboot info at `info_addr`; `kernel_image` is the physical range
/// of the loaded image. Call once.
///
/// # Safety
///
/// `info_addr` is the pointer a multiboot loader passed, identity-mapped, and this
/// is the only call.
pub unsafe fn parse(info_addr: u64, kernel_image: Range<PhysAddr>) -> BootInfo {
    // SAFETY: fields of the loader's info structure (the caller's contract).
    let [flags, mem_upper_kib, cmdline_addr, mmap_len, mmap_addr] =
        [0, 8, 16, 44, 48].map(|offset| unsafe { read_u32(info_addr + offset) });
    assert!(
        flags & FLAG_MEMORY != 0,
        "multiboot info has no memory sizes"
    );
    assert!(flags & FLAG_MMAP != 0, "multiboot info has no memory map");
    let cmdline = if flags & FLAG_CMDLINE != 0 {
        // SAFETY: the loader's NUL-terminated command line, identity-mapped; it is
        // reserved below, so it lives as long as the kernel.
        unsafe { c_str(u64::from(cmdline_addr)) }
    } else {
        ""
    };
    let cmdline_range = {
        let start = cmdline.as_ptr() as u64;
        start..start + cmdline.len() as u64 + 1
    };
    let mmap = u64::from(mmap_addr)..u64::from(mmap_addr) + u64::from(mmap_len);
    // SAFETY: the only call, so nothing else references the map buffers; after it
    // they are only read.
    let (firmware, memory_map) = unsafe { (&mut *FIRMWARE_MAP.get(), &mut *MEMORY_MAP.get()) };
    // SAFETY: the map the loader's info structure points to.
    unsafe { read_mmap(mmap.clone(), firmware) };
    let ram_end = firmware
        .as_slice()
        .iter()
        .filter(|region| region.kind == RegionKind::Usable)
        .map(|region| region.range.end)
        .max()
        .expect("no usable RAM in the memory map");
    let loader = [info_addr..info_addr + INFO_SIZE, mmap, cmdline_range];
    let in_use = [
        0..LEGACY_LOW_END,
        kernel_image.start.as_u64()..kernel_image.end.as_u64(),
        loader[0].clone(),
        loader[1].clone(),
        loader[2].clone(),
    ];
    carve(firmware.as_slice(), in_use, memory_map);
    BootInfo {
        info_addr: PhysAddr::new(info_addr),
        mem_upper_kib,
        cmdline,
        firmware_map: firmware.as_slice(),
        memory_map: memory_map.as_slice(),
        ram_end,
        loader,
    }
}

/// Reads the multiboot memory map: entries of `size: u32` (not counting itself),
/// `base: u64`, `length: u64`, `type: u32`.
///
/// # Safety
///
/// `mmap` is the memory map a multiboot loader reported, identity-mapped.
unsafe fn read_mmap(mmap: Range<u64>, out: &mut RegionList) {
    let mut entry = mmap.start;
    while entry < mmap.end {
        // SAFETY: an entry of the map (the caller's contract).
        let (size, base, length, kind) = unsafe {
            (
                read_u32(entry),
                read_u64(entry + 4),
                read_u64(entry + 12),
                read_u32(entry + 20),
            )
        };
        let size = u64::from(size);
        let kind = match kind {
            MMAP_TYPE_RAM => RegionKind::Usable,
            _ => RegionKind::Reserved,
        };
        out.push(base, base + length, kind);
        entry += size + 4;
    }
}

/// Copies `regions` into `out`, splitting each usable region around the `in_use`
/// ranges, widened to whole pages (which become reserved pieces).
fn carve<const N: usize>(
    regions: &[MemoryRegion],
    mut in_use: [Range<u64>; N],
    out: &mut RegionList,
) {
    // Whole pages: a frame allocator only hands out whole frames anyway.
    for range in &mut in_use {
        let (start, end) = (range.start / PAGE * PAGE, range.end.div_ceil(PAGE) * PAGE);
        *range = start..end;
    }
    in_use.sort_unstable_by_key(|range| range.start);
    for region in regions {
        let (start, end) = (region.range.start.as_u64(), region.range.end.as_u64());
        if region.kind == RegionKind::Reserved {
            out.push(start, end, RegionKind::Reserved);
            continue;
        }
        let mut cursor = start;
        for used in &in_use {
            let (used_start, used_end) = (used.start.max(cursor), used.end.min(end));
            if used_start < used_end {
                out.push(cursor, used_start, RegionKind::Usable);
                out.push(used_start, used_end, RegionKind::Reserved);
                cursor = used_end;
            }
        }
        out.push(cursor, end, RegionKind::Usable);
    }
}

/// # Safety
///
/// `addr` points to a NUL-terminated string in identity-mapped memory that lives
/// forever.
unsafe fn c_str(addr: u64) -> &'static str {
    let start = addr as *const u8;
    // SAFETY: the caller's contract is `strlen`'s.
    let len = unsafe { crate::runtime::strlen(start) };
    // SAFETY: the `len` bytes before the NUL, alive forever by the caller's contract.
    let bytes = unsafe { core::slice::from_raw_parts(start, len) };
    core::str::from_utf8(bytes).unwrap_or("")
}
