//! Kernels that boot straight from UEFI (the `uefi` crate, 0.37): the memory map
//! `exit_boot_services` returns.
//!
//! ```no_run
//! # use vmalloc::frame::BitmapFrameAllocator;
//! # fn after_boot() -> Result<(), vmalloc::Error> {
//! // SAFETY: nothing uses boot services after this.
//! let map = unsafe { uefi::boot::exit_boot_services(None) };
//! let regions = vmalloc::boot::uefi::regions(&map)?;
//! # Ok(()) }
//! ```

use crate::Error;
use crate::frame::{MemoryRegion, RegionKind};
use uefi::mem::memory_map::{MemoryMap, MemoryType};

/// The regions of `map`, read descriptor by descriptor at the size the firmware
/// reported (`map.meta().desc_size`, usually larger than the descriptor type). A
/// map size beyond the buffer is cut to the buffer; a partial descriptor at the end
/// is ignored. See [`kind`] for what each type becomes.
///
/// The map must be the one taken after boot services were exited (or the
/// boot-services memory must not be reclaimed before they are).
///
/// # Errors
///
/// [`Error::BadMemoryMap`] when the descriptor size is smaller than a UEFI memory
/// descriptor (the `uefi` crate would read past each entry).
pub fn regions(
    map: &impl MemoryMap,
) -> Result<impl Iterator<Item = MemoryRegion> + Clone + '_, Error> {
    let buffer = map.buffer();
    let size = map.meta().map_size.min(buffer.len());
    super::efi::descriptors(&buffer[..size], map.meta().desc_size)
}

/// What a UEFI memory type means once boot services are exited: conventional memory
/// is usable (unless marked specific-purpose, `EFI_MEMORY_SP`, in `attributes`);
/// boot-services code and data are
/// [`Reclaim::BootServices`](super::Reclaim::BootServices); `ACPI_RECLAIM` is
/// [`Reclaim::Acpi`](super::Reclaim::Acpi); everything else is reserved, loader code and data included
/// (the kernel image and what it allocated from the firmware).
pub fn kind(ty: MemoryType, attributes: u64) -> RegionKind {
    super::efi::kind(ty.0, attributes)
}
