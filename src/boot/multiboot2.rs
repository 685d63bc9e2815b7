//! Kernels booted through multiboot2 (GRUB, QEMU, ...): the `multiboot2` crate's
//! boot information, with what the loader left in memory.
//!
//! The memory-map tag lists RAM with the kernel, its modules and the boot
//! information inside it, so [`regions`] adds them: the modules and the framebuffer
//! as reserved, the boot information as [`Reclaim::Bootloader`], and the kernel
//! image, which only the kernel knows (its linker script's symbols), as reserved.
//! When the loader also passes the EFI memory map, its entries come too: UEFI
//! boot-services memory is then [`Reclaim::BootServices`] (in use while the loader
//! left boot services running, which the `EFIBootServicesNotExited` tag says).
//!
//! The tags are read from their bytes, stepping by the entry and descriptor sizes
//! they give: the `multiboot2` crate's own accessors panic on sizes they do not
//! expect.

use super::{Reclaim, le_u32, le_u64, region, sized};
use crate::Error;
use crate::frame::{MemoryRegion, RegionKind};
use core::ops::Range;
use multiboot2::{BootInformation, MemoryAreaType, TagType};
use x86_64::PhysAddr;

/// Bytes of a memory-map entry: base, length, type, reserved.
const AREA_SIZE: usize = 24;

/// The memory described by `info`, whose physical address is `info_phys` (what the
/// loader passed in `ebx`), for a kernel whose image occupies `kernel`.
///
/// # Errors
///
/// - [`Error::BadMemoryMap`] when `info` has neither a memory-map tag nor an EFI
///   memory-map tag, or when one of them gives an entry size smaller than its
///   entries.
/// - [`Error::RangeWraps`] when `kernel` ends before it starts: the caller's mistake,
///   which dropping it as a backwards map entry is dropped would turn into the
///   kernel's own frames handed out.
pub fn regions<'a>(
    info: &'a BootInformation<'a>,
    info_phys: PhysAddr,
    kernel: Range<PhysAddr>,
) -> Result<impl Iterator<Item = MemoryRegion> + Clone + 'a, Error> {
    if kernel.end < kernel.start {
        return Err(Error::RangeWraps);
    }
    let payload = |ty: TagType| {
        info.tags()
            .find(move |tag| tag.header().typ.get() == ty.val())
            .map(|tag| tag.payload())
    };
    let areas = payload(TagType::Mmap).map(areas).transpose()?;
    let efi = payload(TagType::EfiMmap).map(efi_descriptors).transpose()?;
    if areas.is_none() && efi.is_none() {
        return Err(Error::BadMemoryMap);
    }
    let boot_info = sized(
        info_phys.as_u64(),
        info.total_size() as u64,
        RegionKind::Reclaimable(Reclaim::Bootloader),
    );
    let modules = info
        .tags()
        .filter(|tag| tag.header().typ.get() == TagType::Module.val())
        .filter_map(|tag| {
            let bytes = tag.payload().get(..8)?;
            let (start, end) = (le_u32(bytes, 0), le_u32(bytes, 4));
            region(start.into(), end.into(), RegionKind::Reserved)
        });
    let framebuffer = payload(TagType::Framebuffer).and_then(|bytes| {
        let bytes = bytes.get(..20)?;
        let size = u64::from(le_u32(bytes, 8)) * u64::from(le_u32(bytes, 16));
        sized(le_u64(bytes, 0), size, RegionKind::Reserved)
    });
    let kernel = region(
        kernel.start.as_u64(),
        kernel.end.as_u64(),
        RegionKind::Reserved,
    );
    Ok(areas
        .into_iter()
        .flatten()
        .chain(efi.into_iter().flatten())
        .chain(boot_info)
        .chain(modules)
        .chain(framebuffer)
        .chain(kernel))
}

/// What a memory-map area type means here: available RAM is usable, ACPI tables
/// are [`Reclaim::Acpi`], everything else (reserved, ACPI NVS, defective, types
/// this crate does not know) is reserved.
pub fn kind(ty: MemoryAreaType) -> RegionKind {
    match ty {
        MemoryAreaType::Available => RegionKind::Usable,
        MemoryAreaType::AcpiAvailable => RegionKind::Reclaimable(Reclaim::Acpi),
        _ => RegionKind::Reserved,
    }
}

/// The memory-map tag's areas, from its payload: entry size, entry version, then
/// the entries, `entry size` bytes apart.
fn areas(payload: &[u8]) -> Result<impl Iterator<Item = MemoryRegion> + Clone + '_, Error> {
    let (head, entries) = payload.split_at_checked(8).ok_or(Error::BadMemoryMap)?;
    let entry_size = le_u32(head, 0) as usize;
    if entry_size < AREA_SIZE {
        return Err(Error::BadMemoryMap);
    }
    Ok(entries.chunks_exact(entry_size).filter_map(|area| {
        let ty = MemoryAreaType::from_val(le_u32(area, 16));
        sized(le_u64(area, 0), le_u64(area, 8), kind(ty))
    }))
}

/// The EFI memory-map tag's descriptors, from its payload: descriptor size,
/// descriptor version, then the map.
fn efi_descriptors(
    payload: &[u8],
) -> Result<impl Iterator<Item = MemoryRegion> + Clone + '_, Error> {
    let (head, map) = payload.split_at_checked(8).ok_or(Error::BadMemoryMap)?;
    super::efi::descriptors(map, le_u32(head, 0) as usize)
}
