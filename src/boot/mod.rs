//! Memory maps from the boot protocols kernels are booted with, as this crate's
//! [`MemoryRegion`]s: one module per protocol, each behind the feature of the same
//! name, each reading that protocol crate's own types.
//!
//! | feature | module | reads | physical memory |
//! |---|---|---|---|
//! | `bootloader` | [`bootloader`] | `bootloader_api` 0.11: `BootInfo::memory_regions` | `physical_memory_offset`, or a recursive mapping ([`RecursivePhysMemory`](crate::phys::RecursivePhysMemory)) |
//! | `limine` | [`limine`] | `limine` 0.5: the memory-map response's entries | the HHDM offset |
//! | `multiboot2` | [`multiboot2`] | `multiboot2`: the memory-map tag, the EFI memory-map tag, modules, framebuffer, the information itself | the kernel maps it |
//! | `uefi` | [`uefi`] | `uefi` 0.37: the memory map `exit_boot_services` returns | the kernel maps it |
//!
//! Each sorts the protocol's kinds into three, kept apart by
//! [`RegionKind`](crate::frame::RegionKind):
//!
//! - **usable now**: free RAM;
//! - **reclaimable later** ([`Reclaim`]): boot-loader data, ACPI tables, UEFI
//!   boot-services memory. A frame allocator built from the map leaves them alone
//!   until the kernel calls
//!   [`reclaim`](crate::frame::BitmapFrameAllocator::reclaim);
//! - **never**: reserved, ACPI NVS, bad memory, the kernel and its modules, the
//!   framebuffer, firmware runtime memory, anything the protocol does not name.
//!
//! # Hostile maps
//!
//! The conversions read every entry and never panic. What they pass on, the frame
//! allocator normalises: entries may come unsorted, overlapping (the more
//! restrictive kind wins: reserved over reclaimable over usable), unaligned (usable
//! and reclaimable memory is rounded inward to whole frames, reserved memory
//! outward), and in any number (touching and overlapping entries of a kind are
//! merged; more than [`MAX_MAP_REGIONS`](crate::frame::bitmap::MAX_MAP_REGIONS)
//! disjoint ones is [`Error::BadMemoryMap`](crate::Error::BadMemoryMap)). Here, an
//! entry of zero length, or whose end is before its start, is dropped; one whose end
//! overflows `u64` ends at the top; everything at or above 2^52 (the most physical
//! address x86_64 has) is cut off. Memory past the top of *this* machine is cut off
//! by [`below`] with [`phys_addr_bits`]. A layout the protocol crate would panic on
//! (a descriptor smaller than the descriptor type, a memory-map entry size it cannot
//! read) is [`Error::BadMemoryMap`](crate::Error::BadMemoryMap).
//!
//! Ranges the kernel gives are not dropped that way: dropped, a backwards range that
//! keeps memory back would hand that memory out. The kernel image range
//! [`multiboot2::regions`] takes is [`Error::RangeWraps`](crate::Error::RangeWraps)
//! when it ends before it starts, and the frame allocator refuses a reserved or
//! reclaimable [`MemoryRegion`] that does
//! ([`Error::BadMemoryMap`](crate::Error::BadMemoryMap)).

#[cfg(feature = "bootloader")]
#[cfg_attr(docsrs, doc(cfg(feature = "bootloader")))]
pub mod bootloader;
#[cfg(any(feature = "bootloader", feature = "multiboot2", feature = "uefi"))]
mod efi;
#[cfg(feature = "limine")]
#[cfg_attr(docsrs, doc(cfg(feature = "limine")))]
pub mod limine;
#[cfg(feature = "multiboot2")]
#[cfg_attr(docsrs, doc(cfg(feature = "multiboot2")))]
pub mod multiboot2;
#[cfg(feature = "uefi")]
#[cfg_attr(docsrs, doc(cfg(feature = "uefi")))]
pub mod uefi;

use crate::frame::MemoryRegion;
pub use crate::frame::Reclaim;
use x86_64::PhysAddr;

/// One past the highest physical address x86_64 can have (52 bits).
pub const PHYS_LIMIT: u64 = 1 << 52;

/// `[start, end)` of `kind`, cut off at [`PHYS_LIMIT`] (at its last byte: a
/// `PhysAddr` cannot hold 2^52); `None` when nothing is left.
#[cfg(any(
    feature = "bootloader",
    feature = "limine",
    feature = "multiboot2",
    feature = "uefi",
    test
))]
pub(crate) fn region(start: u64, end: u64, kind: crate::frame::RegionKind) -> Option<MemoryRegion> {
    let end = end.min(PHYS_LIMIT - 1);
    (start < end).then(|| MemoryRegion {
        range: PhysAddr::new_truncate(start)..PhysAddr::new_truncate(end),
        kind,
    })
}

/// `len` bytes from `start`, with an end that overflows `u64` at the top.
#[cfg(any(feature = "limine", feature = "multiboot2", feature = "uefi", test))]
pub(crate) fn sized(start: u64, len: u64, kind: crate::frame::RegionKind) -> Option<MemoryRegion> {
    region(start, start.saturating_add(len), kind)
}

/// The little-endian `u32` at `at` in `bytes` (which holds it).
#[cfg(any(feature = "multiboot2", feature = "uefi"))]
pub(crate) fn le_u32(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0; 4];
    word.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(word)
}

/// The little-endian `u64` at `at` in `bytes` (which holds it).
#[cfg(any(feature = "multiboot2", feature = "uefi"))]
pub(crate) fn le_u64(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(word)
}

/// How many bits of physical address this CPU has (CPUID leaf `0x8000_0008`; 36 on
/// a CPU too old to say), for [`below`].
#[cfg(target_arch = "x86_64")]
pub fn phys_addr_bits() -> u32 {
    use core::arch::x86_64::__cpuid;
    if __cpuid(0x8000_0000).eax < 0x8000_0008 {
        return 36;
    }
    (__cpuid(0x8000_0008).eax & 0xff).clamp(32, 52)
}

/// `regions` with everything at or above `top` cut off: for a firmware map that
/// claims memory past the top of the machine (`top = 1 << phys_addr_bits()`).
/// Entries that end up empty are dropped.
pub fn below<I>(regions: I, top: u64) -> impl Iterator<Item = MemoryRegion> + Clone
where
    I: IntoIterator<Item = MemoryRegion>,
    I::IntoIter: Clone,
{
    regions.into_iter().filter_map(move |region| {
        let end = region.range.end.as_u64().min(top);
        let start = region.range.start.as_u64();
        (start < end).then(|| MemoryRegion {
            range: region.range.start..PhysAddr::new_truncate(end),
            kind: region.kind,
        })
    })
}

#[cfg(test)]
mod test {
    use super::*;
    use crate::frame::RegionKind;

    #[test]
    fn regions_are_cut_at_the_limit_and_empty_ones_dropped() {
        let usable = RegionKind::Usable;
        assert_eq!(region(5, 5, usable), None);
        assert_eq!(region(6, 5, usable), None);
        assert_eq!(region(PHYS_LIMIT, u64::MAX, usable), None);
        assert_eq!(
            sized(PHYS_LIMIT - 4096, u64::MAX, usable).map(|r| r.range.end.as_u64()),
            Some(PHYS_LIMIT - 1)
        );
        let cut = below([MemoryRegion::usable(0, 1 << 40)], 1 << 36);
        assert_eq!(
            cut.collect::<std::vec::Vec<_>>(),
            [MemoryRegion::usable(0, 1 << 36)]
        );
        assert_eq!(
            below([MemoryRegion::usable(1 << 37, 1 << 40)], 1 << 36).count(),
            0
        );
        assert!((32..=52).contains(&phys_addr_bits()));
    }
}
