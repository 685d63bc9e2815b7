//! Kernels booted by Limine (the `limine` crate, 0.5): the memory-map response's
//! entries and the higher-half direct map.
//!
//! ```no_run
//! # use limine::request::{HhdmRequest, MemoryMapRequest};
//! # use vmalloc::frame::BitmapFrameAllocator;
//! static MEMORY_MAP: MemoryMapRequest = MemoryMapRequest::new();
//! static HHDM: HhdmRequest = HhdmRequest::new();
//! # fn kmain() -> Result<(), vmalloc::Error> {
//! let entries = MEMORY_MAP.get_response().ok_or(vmalloc::Error::BadMemoryMap)?.entries();
//! let hhdm = HHDM.get_response().ok_or(vmalloc::Error::NotMapped)?;
//! // SAFETY: Limine's direct map, with its page tables still in use.
//! let phys = unsafe { vmalloc::boot::limine::phys_memory(hhdm) }?;
//! // SAFETY: the usable entries are unused RAM, all in the direct map.
//! let frames = unsafe { BitmapFrameAllocator::from_memory(vmalloc::boot::limine::regions(entries), &phys) }?;
//! # Ok(()) }
//! ```

use super::{Reclaim, sized};
use crate::frame::{MemoryRegion, RegionKind};
use crate::{Error, OffsetPhysMemory, PAGE_SIZE};
use limine::memory_map::{Entry, EntryType};
use limine::response::HhdmResponse;
use x86_64::VirtAddr;

/// The memory-map response's entries (`response.entries()`) as this crate's
/// regions; see [`kind`].
pub fn regions<'a>(entries: &'a [&'a Entry]) -> impl Iterator<Item = MemoryRegion> + Clone + 'a {
    entries
        .iter()
        .filter_map(|entry| sized(entry.base, entry.length, kind(entry.entry_type)))
}

/// What a Limine entry type means here: `USABLE` is usable, `ACPI_RECLAIMABLE` is
/// [`Reclaim::Acpi`], `BOOTLOADER_RECLAIMABLE` is [`Reclaim::Bootloader`] (it holds
/// the page tables and stack the kernel starts on, so reclaim it after leaving
/// them); everything else (reserved, ACPI NVS, bad memory, the executable and its
/// modules, the framebuffer, types this crate does not know) is reserved.
pub fn kind(ty: EntryType) -> RegionKind {
    match ty {
        EntryType::USABLE => RegionKind::Usable,
        EntryType::ACPI_RECLAIMABLE => RegionKind::Reclaimable(Reclaim::Acpi),
        EntryType::BOOTLOADER_RECLAIMABLE => RegionKind::Reclaimable(Reclaim::Bootloader),
        _ => RegionKind::Reserved,
    }
}

/// Physical memory through Limine's higher-half direct map.
///
/// # Errors
///
/// [`Error::NonCanonical`] for an offset that is no address; [`Error::Unaligned`] for
/// one not on a 4 KiB boundary (frames would not start on pages).
///
/// # Safety
///
/// `hhdm` is Limine's response, and its direct map is still in place (the kernel
/// runs on Limine's page tables, or copied that part of them) while anything built
/// on the result is used. Limine maps every usable and reclaimable entry there.
pub unsafe fn phys_memory(hhdm: &HhdmResponse) -> Result<OffsetPhysMemory, Error> {
    let offset = VirtAddr::try_new(hhdm.offset()).map_err(|_| Error::NonCanonical)?;
    if !offset.is_aligned(PAGE_SIZE) {
        return Err(Error::Unaligned);
    }
    // SAFETY: all memory the library touches is in the direct map (the caller's
    // promise), from a page boundary (checked).
    Ok(unsafe { OffsetPhysMemory::new(offset) })
}
