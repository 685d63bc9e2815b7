//! Kernels booted by the `bootloader` crate (0.11): its memory regions and its map
//! of physical memory.
//!
//! ```no_run
//! # use vmalloc::frame::BitmapFrameAllocator;
//! # fn kernel_main(boot_info: &'static mut bootloader_api::BootInfo) -> Result<(), vmalloc::Error> {
//! // SAFETY: the boot information the boot loader passed, its mapping in place.
//! let phys = unsafe { vmalloc::boot::bootloader::phys_memory(boot_info) }?;
//! let regions = vmalloc::boot::bootloader::regions(&boot_info.memory_regions);
//! // SAFETY: the usable regions are unused RAM, all mapped through `phys`.
//! let frames = unsafe { BitmapFrameAllocator::from_memory(regions, &phys) }?;
//! # Ok(()) }
//! ```

use super::{Reclaim, region};
use crate::frame::{MemoryRegion, RegionKind};
use crate::{Error, OffsetPhysMemory, PAGE_SIZE};
use bootloader_api::BootInfo;
use bootloader_api::info::{self, MemoryRegionKind};
use x86_64::VirtAddr;

/// E820 type of ACPI tables the kernel may reclaim once it has read them.
const E820_ACPI: u32 = 3;

/// The boot loader's regions (`&boot_info.memory_regions`) as this crate's.
///
/// `Bootloader` regions are never usable: the boot loader puts the kernel image,
/// its stack, the page tables the kernel runs on and the boot information in them,
/// without telling which is which. See [`kind`] for the rest.
pub fn regions(regions: &[info::MemoryRegion]) -> impl Iterator<Item = MemoryRegion> + Clone + '_ {
    regions
        .iter()
        .filter_map(|r| region(r.start, r.end, kind(r.kind)))
}

/// What a `bootloader_api` region kind means here: `Usable` is usable; E820 type 3
/// and UEFI `ACPI_RECLAIM` are [`Reclaim::Acpi`]; UEFI boot-services memory (the
/// boot loader normally lists it as usable already) is [`Reclaim::BootServices`];
/// everything else, `Bootloader` and kinds this crate does not know included, is
/// reserved.
pub fn kind(kind: MemoryRegionKind) -> RegionKind {
    match kind {
        MemoryRegionKind::Usable => RegionKind::Usable,
        MemoryRegionKind::UnknownBios(E820_ACPI) => RegionKind::Reclaimable(Reclaim::Acpi),
        MemoryRegionKind::UnknownUefi(ty) => super::efi::kind(ty, 0),
        _ => RegionKind::Reserved,
    }
}

/// Physical memory as the boot loader mapped it (`map_physical_memory` in its
/// configuration), for [`Vmalloc::new`](crate::Vmalloc::new) and the frame
/// allocator.
///
/// # Errors
///
/// [`Error::NotMapped`] when the boot loader did not map physical memory (use a
/// [`RecursivePhysMemory`](crate::phys::RecursivePhysMemory) then);
/// [`Error::NonCanonical`] for an offset that is no address; [`Error::Unaligned`] for
/// one not on a 4 KiB boundary (frames would not start on pages).
///
/// # Safety
///
/// `boot_info` is what the boot loader passed, and the mapping it describes is
/// still in place (the kernel runs on the boot loader's page tables, or copied
/// that part of them), and stays so while anything built on the result is used.
pub unsafe fn phys_memory(boot_info: &BootInfo) -> Result<OffsetPhysMemory, Error> {
    let offset = boot_info
        .physical_memory_offset
        .into_option()
        .ok_or(Error::NotMapped)?;
    let offset = VirtAddr::try_new(offset).map_err(|_| Error::NonCanonical)?;
    if !offset.is_aligned(PAGE_SIZE) {
        return Err(Error::Unaligned);
    }
    // SAFETY: the boot loader maps all physical memory there (the caller's promise),
    // from a page boundary (checked).
    Ok(unsafe { OffsetPhysMemory::new(offset) })
}
