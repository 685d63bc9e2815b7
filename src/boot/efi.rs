//! UEFI memory descriptors read from raw bytes, stepping by the descriptor size the
//! firmware reports (larger than the descriptor type on most firmware), for the
//! `uefi` memory map and multiboot2's EFI memory-map tag alike.

use super::Reclaim;
use crate::frame::RegionKind;

/// `EFI_MEMORY_SP`: conventional memory set aside for a specific purpose, which the
/// firmware asks the kernel not to use as ordinary RAM.
const SPECIFIC_PURPOSE: u64 = 1 << 18;

/// What a UEFI memory type (and attributes) means once boot services are exited.
pub(super) fn kind(ty: u32, attributes: u64) -> RegionKind {
    match ty {
        // Conventional memory, unless set aside for a specific purpose.
        7 if attributes & SPECIFIC_PURPOSE == 0 => RegionKind::Usable,
        // Boot-services code and data.
        3 | 4 => RegionKind::Reclaimable(Reclaim::BootServices),
        // ACPI_RECLAIM.
        9 => RegionKind::Reclaimable(Reclaim::Acpi),
        // Reserved, loader code and data (the kernel itself and what it allocated
        // before exiting boot services), runtime services, unusable, ACPI NVS, MMIO,
        // PAL code, persistent and unaccepted memory, and types of the OEM and OS.
        _ => RegionKind::Reserved,
    }
}

/// Bytes of a UEFI memory descriptor as the specification defines it: type (u32,
/// padded to 8), physical start, virtual start, page count, attributes.
#[cfg(any(feature = "multiboot2", feature = "uefi"))]
const DESCRIPTOR_SIZE: usize = 40;

/// The regions of a raw UEFI memory map: one descriptor every `desc_size` bytes, a
/// partial one at the end ignored.
///
/// # Errors
///
/// [`Error::BadMemoryMap`](crate::Error::BadMemoryMap) when `desc_size` is smaller
/// than a descriptor.
#[cfg(any(feature = "multiboot2", feature = "uefi"))]
pub(super) fn descriptors(
    bytes: &[u8],
    desc_size: usize,
) -> Result<impl Iterator<Item = crate::frame::MemoryRegion> + Clone + '_, crate::Error> {
    use super::{le_u32, le_u64, sized};
    if desc_size < DESCRIPTOR_SIZE {
        return Err(crate::Error::BadMemoryMap);
    }
    Ok(bytes.chunks_exact(desc_size).filter_map(|desc| {
        let (start, pages) = (le_u64(desc, 8), le_u64(desc, 24));
        let kind = kind(le_u32(desc, 0), le_u64(desc, 32));
        sized(start, pages.saturating_mul(crate::PAGE_SIZE), kind)
    }))
}
