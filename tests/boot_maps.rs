//! Memory maps from each boot protocol, built with that protocol crate's own types:
//! every kind lands in the right class (usable now, reclaimable later, never), a
//! frame allocator built from the result hands out only usable frames until the
//! kernel reclaims the rest, and hostile maps never panic.

use bootloader_api::info::{MemoryRegion as BlRegion, MemoryRegionKind, MemoryRegions};
use multiboot2::{
    BootInformation, BootInformationHeader, Builder, EFIMemoryMapTag, FramebufferTag,
    FramebufferType, MemoryArea, MemoryAreaType, MemoryMapTag, ModuleTag,
};
use proptest::prelude::*;
use std::collections::BTreeSet;
use uefi::mem::memory_map::{
    MemoryAttribute, MemoryDescriptor, MemoryMapKey, MemoryMapMeta, MemoryMapRef, MemoryType,
};
use vmalloc::Error;
use vmalloc::boot::{self, Reclaim};
use vmalloc::frame::{BitmapFrameAllocator, MemoryRegion, RegionKind};
use x86_64::PhysAddr;

const FRAME: u64 = 4096;
const MIB: u64 = 1 << 20;
const ACPI: RegionKind = RegionKind::Reclaimable(Reclaim::Acpi);
const LOADER: RegionKind = RegionKind::Reclaimable(Reclaim::Bootloader);
const BOOT_SERVICES: RegionKind = RegionKind::Reclaimable(Reclaim::BootServices);

fn r(start: u64, end: u64, kind: RegionKind) -> MemoryRegion {
    MemoryRegion {
        range: PhysAddr::new(start)..PhysAddr::new(end),
        kind,
    }
}

/// Frame numbers an allocator hands out, all of them.
fn drain(alloc: &mut BitmapFrameAllocator) -> BTreeSet<u64> {
    std::iter::from_fn(|| alloc.alloc())
        .map(|f| f.start_address().as_u64() / FRAME)
        .collect()
}

/// Every whole frame inside `[start, end)`.
/// The whole frames of bytes `[start, end)`. (Frame 0 is never handed out: the
/// tests' maps that start at 0 expect frames from `FRAME` on.)
fn frames(start: u64, end: u64) -> BTreeSet<u64> {
    (start.div_ceil(FRAME)..end / FRAME).collect()
}

/// The frames an allocator may hand out of byte ranges: the whole frames of their
/// union (ranges that touch at unaligned borders merge first), frame 0 never.
fn merged_frames(mut ranges: Vec<(u64, u64)>) -> BTreeSet<u64> {
    ranges.retain(|(start, end)| start < end);
    ranges.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (start, end) in ranges {
        match merged.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    let mut frames: BTreeSet<u64> = merged.into_iter().flat_map(|(s, e)| frames(s, e)).collect();
    frames.remove(&0);
    frames
}

// ---------------------------------------------------------------- bootloader_api

fn bootloader_map() -> Vec<BlRegion> {
    let region = |start, end, kind| BlRegion { start, end, kind };
    vec![
        // Unsorted, as a map that was patched after it was built.
        region(8 * MIB, 16 * MIB, MemoryRegionKind::Usable),
        region(0, 0x9f000, MemoryRegionKind::Usable),
        // The kernel, its stack and page tables, the boot information.
        region(MIB, 4 * MIB, MemoryRegionKind::Bootloader),
        region(4 * MIB, 8 * MIB, MemoryRegionKind::Usable),
        // ACPI tables (BIOS) and boot-services data (UEFI).
        region(
            16 * MIB,
            16 * MIB + 0x2800,
            MemoryRegionKind::UnknownBios(3),
        ),
        region(17 * MIB, 18 * MIB, MemoryRegionKind::UnknownUefi(4)),
        region(18 * MIB, 19 * MIB, MemoryRegionKind::UnknownUefi(9)),
        // ACPI NVS, bad memory, runtime services: never.
        region(19 * MIB, 20 * MIB, MemoryRegionKind::UnknownBios(4)),
        region(20 * MIB, 21 * MIB, MemoryRegionKind::UnknownBios(5)),
        region(21 * MIB, 22 * MIB, MemoryRegionKind::UnknownUefi(6)),
        // Hostile: empty, backwards, past the top of any machine, overlapping.
        region(30 * MIB, 30 * MIB, MemoryRegionKind::Usable),
        region(31 * MIB, 30 * MIB, MemoryRegionKind::Usable),
        region(1 << 53, u64::MAX, MemoryRegionKind::Usable),
        region(12 * MIB, 13 * MIB, MemoryRegionKind::UnknownBios(2)),
    ]
}

#[test]
fn bootloader_kinds_are_kept_apart() {
    let map = bootloader_map();
    let regions: Vec<_> = boot::bootloader::regions(&map).collect();
    assert_eq!(
        regions,
        [
            r(8 * MIB, 16 * MIB, RegionKind::Usable),
            r(0, 0x9f000, RegionKind::Usable),
            r(MIB, 4 * MIB, RegionKind::Reserved),
            r(4 * MIB, 8 * MIB, RegionKind::Usable),
            r(16 * MIB, 16 * MIB + 0x2800, ACPI),
            r(17 * MIB, 18 * MIB, BOOT_SERVICES),
            r(18 * MIB, 19 * MIB, ACPI),
            r(19 * MIB, 20 * MIB, RegionKind::Reserved),
            r(20 * MIB, 21 * MIB, RegionKind::Reserved),
            r(21 * MIB, 22 * MIB, RegionKind::Reserved),
            r(12 * MIB, 13 * MIB, RegionKind::Reserved),
        ]
    );
}

#[test]
fn an_allocator_from_a_bootloader_map_hands_out_usable_frames_until_reclaim() {
    let map = bootloader_map();
    let regions = boot::bootloader::regions(&map);
    let mut storage = vec![0; BitmapFrameAllocator::storage_words(regions.clone())];
    let mut alloc = BitmapFrameAllocator::with_storage(regions, &mut storage).unwrap();
    let usable: BTreeSet<u64> = [frames(FRAME, 0x9f000), frames(4 * MIB, 12 * MIB)]
        .into_iter()
        .flatten()
        .chain(frames(13 * MIB, 16 * MIB))
        .collect();
    assert_eq!(drain(&mut alloc), usable);
    // The ACPI tables: both the BIOS one (whole frames only) and the UEFI one.
    // SAFETY: a simulated map: nothing uses its reclaimable memory.
    assert_eq!(unsafe { alloc.reclaim(Reclaim::Acpi) }, 2 + 256);
    // SAFETY: a simulated map: nothing uses its reclaimable memory.
    assert_eq!(unsafe { alloc.reclaim(Reclaim::BootServices) }, 256);
    assert_eq!(
        // SAFETY: a simulated map: nothing uses its reclaimable memory.
        unsafe { alloc.reclaim(Reclaim::Bootloader) },
        0,
        "Bootloader regions stay"
    );
    let reclaimed: BTreeSet<u64> = [
        frames(16 * MIB, 16 * MIB + 0x2800),
        frames(17 * MIB, 19 * MIB),
    ]
    .into_iter()
    .flatten()
    .collect();
    assert_eq!(drain(&mut alloc), reclaimed);
}

#[test]
fn bootloader_physical_memory_offset() {
    let regions: &'static mut [BlRegion] = Box::leak(Box::new([]));
    let mut info = bootloader_api::BootInfo::new(MemoryRegions::from(regions));
    // SAFETY (all three): a boot information made here; nothing reaches memory
    // through the result.
    assert_eq!(
        unsafe { boot::bootloader::phys_memory(&info) }.err(),
        Some(Error::NotMapped)
    );
    info.physical_memory_offset = bootloader_api::info::Optional::Some(0x0000_9000_0000_0000);
    assert_eq!(
        unsafe { boot::bootloader::phys_memory(&info) }.err(),
        Some(Error::NonCanonical)
    );
    // Not on a page: a frame's start would be reached at an unaligned pointer.
    info.physical_memory_offset = bootloader_api::info::Optional::Some(0xffff_8000_0000_0008);
    assert_eq!(
        unsafe { boot::bootloader::phys_memory(&info) }.err(),
        Some(Error::Unaligned)
    );
    info.physical_memory_offset = bootloader_api::info::Optional::Some(0xffff_8000_0000_0000);
    let phys = unsafe { boot::bootloader::phys_memory(&info) }.unwrap();
    assert_eq!(phys.offset().as_u64(), 0xffff_8000_0000_0000);
}

// ------------------------------------------------------------------------ limine

fn limine_type(raw: u64) -> limine::memory_map::EntryType {
    // SAFETY: `EntryType` is `repr(transparent)` over `u64`, any value allowed (the
    // protocol may add types; this is one the crate has no constant for).
    unsafe { std::mem::transmute::<u64, limine::memory_map::EntryType>(raw) }
}

#[test]
fn limine_kinds_are_kept_apart() {
    use limine::memory_map::{Entry, EntryType};
    let entry = |base, length, entry_type| Entry {
        base,
        length,
        entry_type,
    };
    let entries = [
        entry(0, 0x9f000, EntryType::USABLE),
        entry(0x9f000, 0x61000, EntryType::RESERVED),
        entry(MIB, MIB, EntryType::EXECUTABLE_AND_MODULES),
        entry(2 * MIB, 6 * MIB, EntryType::USABLE),
        entry(8 * MIB, MIB, EntryType::BOOTLOADER_RECLAIMABLE),
        entry(9 * MIB, 0x1800, EntryType::ACPI_RECLAIMABLE),
        entry(10 * MIB, MIB, EntryType::ACPI_NVS),
        entry(11 * MIB, MIB, EntryType::BAD_MEMORY),
        entry(0xfd00_0000, 4 * MIB, EntryType::FRAMEBUFFER),
        entry(12 * MIB, MIB, limine_type(99)),
        // Hostile: empty, an end past `u64::MAX`, past the top of any machine.
        entry(13 * MIB, 0, EntryType::USABLE),
        entry((1 << 52) - FRAME, u64::MAX, EntryType::USABLE),
        entry(1 << 60, 1 << 40, EntryType::USABLE),
    ];
    let refs: Vec<&Entry> = entries.iter().collect();
    let regions: Vec<_> = boot::limine::regions(&refs).collect();
    assert_eq!(
        regions,
        [
            r(0, 0x9f000, RegionKind::Usable),
            r(0x9f000, MIB, RegionKind::Reserved),
            r(MIB, 2 * MIB, RegionKind::Reserved),
            r(2 * MIB, 8 * MIB, RegionKind::Usable),
            r(8 * MIB, 9 * MIB, LOADER),
            r(9 * MIB, 9 * MIB + 0x1800, ACPI),
            r(10 * MIB, 11 * MIB, RegionKind::Reserved),
            r(11 * MIB, 12 * MIB, RegionKind::Reserved),
            r(0xfd00_0000, 0xfd40_0000, RegionKind::Reserved),
            r(12 * MIB, 13 * MIB, RegionKind::Reserved),
            r((1 << 52) - FRAME, (1 << 52) - 1, RegionKind::Usable),
        ]
    );
    let regions = boot::limine::regions(&refs);
    let mut storage = vec![0; BitmapFrameAllocator::storage_words(regions.clone())];
    let mut alloc = BitmapFrameAllocator::with_storage(regions, &mut storage).unwrap();
    let usable: BTreeSet<u64> = frames(FRAME, 0x9f000)
        .into_iter()
        .chain(frames(2 * MIB, 8 * MIB))
        .collect();
    assert_eq!(drain(&mut alloc), usable);
    // SAFETY: a simulated map: nothing uses its reclaimable memory.
    assert_eq!(unsafe { alloc.reclaim(Reclaim::Bootloader) }, 256);
    // SAFETY: a simulated map: nothing uses its reclaimable memory.
    assert_eq!(unsafe { alloc.reclaim(Reclaim::Acpi) }, 1);
}

#[test]
fn limine_hhdm_offset() {
    // SAFETY: `HhdmResponse` is `repr(C)`: its revision, then the offset.
    let hhdm: limine::response::HhdmResponse =
        unsafe { std::mem::transmute([0u64, 0xffff_8000_0000_0000]) };
    // SAFETY: nothing reaches memory through the result.
    let phys = unsafe { boot::limine::phys_memory(&hhdm) }.unwrap();
    assert_eq!(phys.offset().as_u64(), 0xffff_8000_0000_0000);
    // SAFETY: as above.
    let bad: limine::response::HhdmResponse = unsafe { std::mem::transmute([0u64, 1 << 63]) };
    // SAFETY: as above.
    assert_eq!(
        unsafe { boot::limine::phys_memory(&bad) }.err(),
        Some(Error::NonCanonical)
    );
    // SAFETY: as above.
    let off_page: limine::response::HhdmResponse =
        unsafe { std::mem::transmute([0u64, 0xffff_8000_0000_0800]) };
    // SAFETY: as above.
    assert_eq!(
        unsafe { boot::limine::phys_memory(&off_page) }.err(),
        Some(Error::Unaligned)
    );
}

// ---------------------------------------------------------------------- multiboot2

/// Raw UEFI descriptors, `desc_size` bytes apart (firmware reports 48 for a
/// 40-byte descriptor).
fn efi_bytes(descs: &[MemoryDescriptor], desc_size: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; descs.len() * desc_size];
    for (i, desc) in descs.iter().enumerate() {
        let at = i * desc_size;
        // SAFETY: `MemoryDescriptor` is plain `repr(C)` data, 40 bytes.
        let raw: [u8; 40] = unsafe { std::mem::transmute_copy(desc) };
        bytes[at..at + 40].copy_from_slice(&raw);
        bytes[at + 40..at + desc_size].fill(0xee); // what a newer revision adds
    }
    bytes
}

fn desc(ty: MemoryType, start: u64, pages: u64) -> MemoryDescriptor {
    MemoryDescriptor {
        ty,
        phys_start: start,
        virt_start: 0,
        page_count: pages,
        att: MemoryAttribute::WRITE_BACK,
    }
}

fn efi_map() -> Vec<MemoryDescriptor> {
    let mut specific = desc(MemoryType::CONVENTIONAL, 40 * MIB, 256);
    specific.att |= MemoryAttribute::from_bits_retain(1 << 18);
    vec![
        desc(MemoryType::CONVENTIONAL, 0, 0x9f),
        desc(MemoryType::LOADER_CODE, MIB, 256),
        desc(MemoryType::LOADER_DATA, 2 * MIB, 256),
        desc(MemoryType::BOOT_SERVICES_CODE, 3 * MIB, 256),
        desc(MemoryType::BOOT_SERVICES_DATA, 4 * MIB, 256),
        desc(MemoryType::CONVENTIONAL, 5 * MIB, 2816),
        desc(MemoryType::RUNTIME_SERVICES_DATA, 16 * MIB, 256),
        desc(MemoryType::ACPI_RECLAIM, 17 * MIB, 16),
        desc(MemoryType::ACPI_NON_VOLATILE, 18 * MIB, 256),
        desc(MemoryType::MMIO, 0xfec0_0000, 1),
        desc(MemoryType::PERSISTENT_MEMORY, 1 << 40, 1 << 20),
        desc(MemoryType::custom(0x8000_0001), 19 * MIB, 256),
        specific,
        // Hostile: no pages, pages that overflow, past the top of any machine.
        desc(MemoryType::CONVENTIONAL, 20 * MIB, 0),
        desc(MemoryType::CONVENTIONAL, 1 << 51, u64::MAX),
        desc(MemoryType::CONVENTIONAL, 1 << 62, 16),
    ]
}

fn efi_expected() -> Vec<MemoryRegion> {
    vec![
        r(0, 0x9f000, RegionKind::Usable),
        r(MIB, 2 * MIB, RegionKind::Reserved),
        r(2 * MIB, 3 * MIB, RegionKind::Reserved),
        r(3 * MIB, 4 * MIB, BOOT_SERVICES),
        r(4 * MIB, 5 * MIB, BOOT_SERVICES),
        r(5 * MIB, 16 * MIB, RegionKind::Usable),
        r(16 * MIB, 17 * MIB, RegionKind::Reserved),
        r(17 * MIB, 17 * MIB + 16 * FRAME, ACPI),
        r(18 * MIB, 19 * MIB, RegionKind::Reserved),
        r(0xfec0_0000, 0xfec0_1000, RegionKind::Reserved),
        r(1 << 40, (1 << 40) + (1 << 32), RegionKind::Reserved),
        r(19 * MIB, 20 * MIB, RegionKind::Reserved),
        r(40 * MIB, 41 * MIB, RegionKind::Reserved),
        r(1 << 51, (1 << 52) - 1, RegionKind::Usable),
    ]
}

/// A multiboot2 information structure as a loader builds it, and its bytes.
fn multiboot2_info(
    efi: Option<(u32, &[MemoryDescriptor])>,
) -> Box<multiboot2::DynSizedStructure<BootInformationHeader>> {
    let mut builder = Builder::new()
        .mmap(MemoryMapTag::new(&[
            MemoryArea::new(0, 0x9fc00, MemoryAreaType::Available),
            MemoryArea::new(0x9fc00, 0x60400, MemoryAreaType::Reserved),
            MemoryArea::new(MIB, 63 * MIB, MemoryAreaType::Available),
            MemoryArea::new(64 * MIB, 0x2800, MemoryAreaType::AcpiAvailable),
            MemoryArea::new(65 * MIB, MIB, MemoryAreaType::ReservedHibernate),
            MemoryArea::new(66 * MIB, MIB, MemoryAreaType::Defective),
            MemoryArea::new(67 * MIB, MIB, MemoryAreaType::Custom(77)),
            MemoryArea::new(68 * MIB, 0, MemoryAreaType::Available),
            MemoryArea::new(u64::MAX - FRAME, 2 * FRAME, MemoryAreaType::Available),
        ]))
        .add_module(ModuleTag::new(
            8 * MIB as u32,
            9 * MIB as u32 + 10,
            "initrd",
        ))
        .framebuffer(FramebufferTag::new(
            0x20_0000,
            160,
            80,
            25,
            16,
            FramebufferType::Text,
        ));
    if let Some((desc_size, descs)) = efi {
        let bytes = efi_bytes(descs, desc_size.max(40) as usize);
        let len = descs.len() * desc_size as usize;
        builder = builder.efi_mmap(EFIMemoryMapTag::new_from_map(desc_size, 1, &bytes[..len]));
    }
    builder.build()
}

fn load(mbi: &multiboot2::DynSizedStructure<BootInformationHeader>) -> BootInformation<'_> {
    let ptr = (mbi as *const multiboot2::DynSizedStructure<BootInformationHeader>).cast();
    // SAFETY: a complete information structure, alive and unchanged while used.
    unsafe { BootInformation::load(ptr) }.unwrap()
}

#[test]
fn multiboot2_refuses_a_kernel_range_given_end_first() {
    let mbi = multiboot2_info(None);
    let info = load(&mbi);
    // The image [1 MiB, 3 MiB), its bounds swapped: dropped as a backwards firmware
    // entry is, it would leave the kernel's own frames usable.
    let backwards = PhysAddr::new(3 * MIB)..PhysAddr::new(MIB);
    assert_eq!(
        boot::multiboot2::regions(&info, PhysAddr::new(0x7000), backwards).err(),
        Some(Error::RangeWraps)
    );
    // An empty range reserves nothing, and is no mistake.
    let empty = PhysAddr::new(MIB)..PhysAddr::new(MIB);
    assert!(boot::multiboot2::regions(&info, PhysAddr::new(0x7000), empty).is_ok());
}

#[test]
fn multiboot2_adds_what_the_loader_left_and_the_kernel() {
    let mbi = multiboot2_info(None);
    let info = load(&mbi);
    let info_phys = PhysAddr::new(0x7000);
    let kernel = PhysAddr::new(MIB)..PhysAddr::new(3 * MIB + 5);
    let regions: Vec<_> = boot::multiboot2::regions(&info, info_phys, kernel)
        .unwrap()
        .collect();
    let size = info.total_size() as u64;
    assert_eq!(
        regions,
        [
            r(0, 0x9fc00, RegionKind::Usable),
            r(0x9fc00, MIB, RegionKind::Reserved),
            r(MIB, 64 * MIB, RegionKind::Usable),
            r(64 * MIB, 64 * MIB + 0x2800, ACPI),
            r(65 * MIB, 66 * MIB, RegionKind::Reserved),
            r(66 * MIB, 67 * MIB, RegionKind::Reserved),
            r(67 * MIB, 68 * MIB, RegionKind::Reserved),
            r(0x7000, 0x7000 + size, LOADER),
            r(8 * MIB, 9 * MIB + 10, RegionKind::Reserved),
            r(0x20_0000, 0x20_0000 + 160 * 25, RegionKind::Reserved),
            r(MIB, 3 * MIB + 5, RegionKind::Reserved),
        ]
    );
    let regions = boot::multiboot2::regions(
        &info,
        info_phys,
        PhysAddr::new(MIB)..PhysAddr::new(3 * MIB + 5),
    )
    .unwrap();
    let mut storage = vec![0; BitmapFrameAllocator::storage_words(regions.clone())];
    let mut alloc = BitmapFrameAllocator::with_storage(regions, &mut storage).unwrap();
    let handed = drain(&mut alloc);
    let kernel_frames = frames(MIB - FRAME, 3 * MIB + FRAME);
    assert!(handed.is_disjoint(&kernel_frames));
    assert!(
        handed.is_disjoint(&frames(8 * MIB, 9 * MIB + FRAME)),
        "module"
    );
    assert!(!handed.contains(&7), "boot information");
    assert!(handed.contains(&6) && handed.contains(&(3 * MIB / FRAME + 1)));
    // SAFETY: a simulated map: nothing uses its reclaimable memory.
    assert_eq!(
        unsafe { alloc.reclaim(Reclaim::Bootloader) },
        0,
        "a partial frame"
    );
}

#[test]
fn multiboot2_with_an_efi_map_steps_by_its_descriptor_size() {
    let descs = efi_map();
    let mbi = multiboot2_info(Some((48, &descs)));
    let info = load(&mbi);
    let none = PhysAddr::zero()..PhysAddr::zero();
    let regions: Vec<_> = boot::multiboot2::regions(&info, PhysAddr::new(0x7000), none.clone())
        .unwrap()
        .collect();
    let efi: Vec<_> = regions[7..7 + efi_expected().len()].to_vec();
    assert_eq!(efi, efi_expected());
    // Boot-services memory the legacy map calls available stays reclaimable.
    let mbi = multiboot2_info(Some((48, &descs[..10])));
    let info = load(&mbi);
    let regions = boot::multiboot2::regions(&info, PhysAddr::new(0x7000), none).unwrap();
    let mut storage = vec![0; BitmapFrameAllocator::storage_words(regions.clone())];
    let mut alloc = BitmapFrameAllocator::with_storage(regions, &mut storage).unwrap();
    assert!(drain(&mut alloc).is_disjoint(&frames(3 * MIB, 5 * MIB)));
    // SAFETY: a simulated map: nothing uses its reclaimable memory.
    assert_eq!(unsafe { alloc.reclaim(Reclaim::BootServices) }, 512);
}

#[test]
fn multiboot2_descriptors_too_small_or_no_map_are_errors() {
    let mbi = multiboot2_info(Some((24, &efi_map())));
    let info = load(&mbi);
    let none = PhysAddr::zero()..PhysAddr::zero();
    assert_eq!(
        boot::multiboot2::regions(&info, PhysAddr::zero(), none.clone()).err(),
        Some(Error::BadMemoryMap)
    );
    let empty = Builder::new().build();
    let info = load(&empty);
    assert_eq!(
        boot::multiboot2::regions(&info, PhysAddr::zero(), none.clone()).err(),
        Some(Error::BadMemoryMap)
    );
    let raw = raw_mbi(&[(6, mmap_payload(16, &[]))]);
    assert_eq!(
        boot::multiboot2::regions(&raw_info(&raw), PhysAddr::zero(), none).err(),
        Some(Error::BadMemoryMap)
    );
}

/// A multiboot2 information structure built byte by byte from `(type, payload)`
/// tags, with the end tag; 8-aligned.
fn raw_mbi(tags: &[(u32, Vec<u8>)]) -> Vec<u64> {
    let mut bytes = vec![0u8; 8];
    for (ty, payload) in tags.iter().chain([&(0, Vec::new())]) {
        bytes.extend(ty.to_le_bytes());
        bytes.extend((8 + payload.len() as u32).to_le_bytes());
        bytes.extend(payload);
        bytes.resize(bytes.len().next_multiple_of(8), 0);
    }
    let total = bytes.len() as u32;
    bytes[..4].copy_from_slice(&total.to_le_bytes());
    aligned(&bytes)
}

fn raw_info(raw: &[u64]) -> BootInformation<'_> {
    // SAFETY: `raw_mbi` built a complete structure, which outlives the result.
    unsafe { BootInformation::load(raw.as_ptr().cast()) }.unwrap()
}

/// A memory-map tag's payload with `entry_size`-byte entries `(base, length, type)`.
fn mmap_payload(entry_size: u32, entries: &[(u64, u64, u32)]) -> Vec<u8> {
    let mut bytes = [entry_size.to_le_bytes(), 0u32.to_le_bytes()].concat();
    for &(base, length, ty) in entries {
        let mut entry = [base.to_le_bytes(), length.to_le_bytes()].concat();
        entry.extend(ty.to_le_bytes());
        entry.resize(entry_size as usize, 0xaa);
        bytes.extend(entry);
    }
    bytes
}

#[test]
fn multiboot2_tags_the_crate_would_panic_on_are_read_or_refused() {
    let none = PhysAddr::zero()..PhysAddr::zero();
    // Entries of 32 bytes, as a later revision of the format may give them, and a
    // tag whose size is not a whole number of 24-byte entries (the crate asserts
    // both away).
    let wide = mmap_payload(32, &[(0, 0x9fc00, 1), (MIB, MIB, 3)]);
    let mut backwards_module = (9 * MIB as u32).to_le_bytes().to_vec();
    backwards_module.extend((8 * MIB as u32).to_le_bytes());
    let raw = raw_mbi(&[
        (6, wide),
        (3, backwards_module),
        (3, vec![1, 2, 3]), // a module tag too short to hold its range
        (8, vec![0; 6]),    // a framebuffer tag too short to hold its size
    ]);
    let info = raw_info(&raw);
    let regions: Vec<_> = boot::multiboot2::regions(&info, PhysAddr::new(0x7000), none.clone())
        .unwrap()
        .collect();
    assert_eq!(
        regions,
        [
            r(0, 0x9fc00, RegionKind::Usable),
            r(MIB, 2 * MIB, ACPI),
            r(0x7000, 0x7000 + info.total_size() as u64, LOADER),
        ]
    );
    let odd = mmap_payload(24, &[(0, MIB, 1)])
        .into_iter()
        .chain([0; 12])
        .collect();
    let raw = raw_mbi(&[(6, odd)]);
    let regions: Vec<_> = boot::multiboot2::regions(&raw_info(&raw), PhysAddr::zero(), none)
        .unwrap()
        .collect();
    assert_eq!(regions[0], r(0, MIB, RegionKind::Usable));
}

// ---------------------------------------------------------------------------- uefi

fn uefi_map(bytes: &[u8], desc_size: usize) -> MemoryMapRef<'_> {
    let meta = MemoryMapMeta {
        map_size: bytes.len(),
        desc_size,
        map_key: MemoryMapKey::default(),
        desc_version: MemoryDescriptor::VERSION,
    };
    MemoryMapRef::new(bytes, meta).unwrap()
}

/// Bytes at an 8-aligned address, as `MemoryMapRef` wants them.
fn aligned(bytes: &[u8]) -> Vec<u64> {
    let mut words = vec![0u64; bytes.len().div_ceil(8)];
    for (i, b) in bytes.iter().enumerate() {
        words[i / 8] |= u64::from(*b) << (8 * (i % 8));
    }
    words
}

fn as_bytes(words: &[u64], len: usize) -> &[u8] {
    // SAFETY: `len` bytes of `words`, which outlives the slice.
    unsafe { std::slice::from_raw_parts(words.as_ptr().cast(), len) }
}

#[test]
fn uefi_map_steps_by_the_reported_descriptor_size() {
    for desc_size in [40, 48, 64] {
        let bytes = efi_bytes(&efi_map(), desc_size);
        let words = aligned(&bytes);
        let map = uefi_map(as_bytes(&words, bytes.len()), desc_size);
        let regions: Vec<_> = boot::uefi::regions(&map).unwrap().collect();
        assert_eq!(regions, efi_expected(), "descriptor size {desc_size}");
    }
}

#[test]
fn uefi_descriptor_size_below_the_descriptor_is_an_error() {
    let bytes = vec![0u64; 12];
    let map = uefi_map(as_bytes(&bytes, 96), 24);
    assert_eq!(boot::uefi::regions(&map).err(), Some(Error::BadMemoryMap));
}

#[test]
fn an_allocator_from_a_uefi_map_reclaims_boot_services_after_exit() {
    let bytes = efi_bytes(&efi_map()[..10], 48);
    let words = aligned(&bytes);
    let map = uefi_map(as_bytes(&words, bytes.len()), 48);
    let regions = boot::uefi::regions(&map).unwrap();
    let mut storage = vec![0; BitmapFrameAllocator::storage_words(regions.clone())];
    let mut alloc = BitmapFrameAllocator::with_storage(regions, &mut storage).unwrap();
    let usable: BTreeSet<u64> = frames(FRAME, 0x9f000)
        .into_iter()
        .chain(frames(5 * MIB, 16 * MIB))
        .collect();
    assert_eq!(drain(&mut alloc), usable);
    // SAFETY: a simulated map: nothing uses its reclaimable memory.
    assert_eq!(unsafe { alloc.reclaim(Reclaim::BootServices) }, 512);
    assert_eq!(drain(&mut alloc), frames(3 * MIB, 5 * MIB));
}

// ------------------------------------------------------------------ hostile maps

/// A kind as `bootloader_api` reports it, from a number.
fn bl_kind(n: u8) -> MemoryRegionKind {
    match n % 6 {
        0 | 1 => MemoryRegionKind::Usable,
        2 => MemoryRegionKind::Bootloader,
        3 => MemoryRegionKind::UnknownBios(3),
        4 => MemoryRegionKind::UnknownUefi(u32::from(n) % 16),
        _ => MemoryRegionKind::UnknownBios(u32::from(n)),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Any entries at all, through every conversion: nothing panics, nothing
    /// reaches past 2^52, and no region is empty.
    #[test]
    fn no_conversion_panics(entries in prop::collection::vec((any::<u64>(), any::<u64>(), any::<u8>()), 0..300), desc_size in 0usize..100) {
        let bl: Vec<BlRegion> = entries.iter().map(|&(a, b, k)| BlRegion { start: a, end: b, kind: bl_kind(k) }).collect();
        let limine: Vec<limine::memory_map::Entry> = entries.iter().map(|&(a, b, k)| limine::memory_map::Entry { base: a, length: b, entry_type: limine_type(u64::from(k % 10)) }).collect();
        let limine_refs: Vec<_> = limine.iter().collect();
        let descs: Vec<MemoryDescriptor> = entries.iter().map(|&(a, b, k)| desc(MemoryType(u32::from(k % 17)), a, b)).collect();
        let desc_size = desc_size.max(1);
        let bytes = efi_bytes(&descs, desc_size.max(40));
        let words = aligned(&bytes);
        let len = descs.len() * desc_size;
        let words_len = words.len() * 8;
        let map = uefi_map(as_bytes(&words, len.min(words_len)), desc_size);
        let mut all: Vec<MemoryRegion> = boot::bootloader::regions(&bl).chain(boot::limine::regions(&limine_refs)).collect();
        match boot::uefi::regions(&map) {
            Ok(regions) => all.extend(regions),
            Err(error) => prop_assert!(desc_size < 40 && error == Error::BadMemoryMap),
        }
        for region in &all {
            prop_assert!(region.range.start < region.range.end);
        }
        // The allocator takes whatever comes: a map or a clear error.
        let words = BitmapFrameAllocator::storage_words(all.iter().cloned());
        if words > 0 && words < 1 << 20 {
            let mut storage = vec![0; words];
            prop_assert!(BitmapFrameAllocator::with_storage(all.iter().cloned(), &mut storage).is_ok());
        }
    }

    /// Small hostile maps (unsorted, overlapping, unaligned, empty entries): the
    /// allocator hands out exactly the whole frames that usable entries cover and no
    /// other entry touches; reclaiming a source adds exactly its whole frames that
    /// no reserved entry and no other source touches.
    #[test]
    fn classes_survive_any_overlap(entries in prop::collection::vec((0u64..4 * MIB, 0u64..MIB, any::<u8>()), 1..40)) {
        let bl: Vec<BlRegion> = entries.iter().map(|&(a, len, k)| BlRegion { start: a, end: a + len, kind: bl_kind(k) }).collect();
        let regions: Vec<MemoryRegion> = boot::bootloader::regions(&bl).collect();
        let touched = |pred: &dyn Fn(RegionKind) -> bool| -> BTreeSet<u64> {
            regions.iter().filter(|r| pred(r.kind)).flat_map(|r| r.range.start.as_u64() / FRAME..r.range.end.as_u64().div_ceil(FRAME)).collect()
        };
        let inside = |pred: &dyn Fn(RegionKind) -> bool| -> BTreeSet<u64> {
            merged_frames(regions.iter().filter(|r| pred(r.kind)).map(|r| (r.range.start.as_u64(), r.range.end.as_u64())).collect())
        };
        let blocked = touched(&|k| k != RegionKind::Usable);
        let usable: BTreeSet<u64> = inside(&|k| k == RegionKind::Usable).difference(&blocked).copied().collect();
        let words = BitmapFrameAllocator::storage_words(regions.iter().cloned());
        let mut storage = vec![0; words];
        let Ok(mut alloc) = BitmapFrameAllocator::with_storage(regions.iter().cloned(), &mut storage) else {
            prop_assert!(usable.is_empty(), "refused a map with usable frames");
            return Ok(());
        };
        prop_assert_eq!(drain(&mut alloc), usable);
        let reserved = touched(&|k| k == RegionKind::Reserved);
        for source in [Reclaim::Acpi, Reclaim::BootServices, Reclaim::Bootloader] {
            let mine = RegionKind::Reclaimable(source);
            let others = touched(&|k| matches!(k, RegionKind::Reclaimable(s) if s != source));
            let expected: BTreeSet<u64> = inside(&|k| k == mine).into_iter().filter(|f| !reserved.contains(f) && !others.contains(f)).collect();
            // SAFETY: a simulated map: nothing uses its reclaimable memory.
            prop_assert_eq!(unsafe { alloc.reclaim(source) }, expected.len() as u64);
            prop_assert_eq!(drain(&mut alloc), expected);
        }
    }
}
