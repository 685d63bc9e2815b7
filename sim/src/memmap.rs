//! Builds the firmware-style memory map; the layout is documented on
//! [`SimMachine::memory_map`](super::SimMachine::memory_map).

use core::ops::Range;
use std::vec::Vec;
use vmalloc::frame::MemoryRegion;

/// End of the low usable memory: 640 KiB less a 1 KiB EBDA.
pub(super) const LOW_USABLE_END: u64 = 0x9_fc00;
/// The kernel image starts at 1 MiB, as a multiboot or BIOS-loaded kernel does.
pub(super) const KERNEL_IMAGE_START: u64 = 0x10_0000;
/// End of the reserved kernel image.
pub(super) const KERNEL_IMAGE_END: u64 = 0x40_0000;
/// Smallest memory the map's fixed parts fit in.
pub(super) const MIN_MEMORY: u64 = 16 << 20;
/// Where the PCI hole starts when memory reaches it.
const PCI_HOLE_START: u64 = 3 << 30;
const FOUR_GIB: u64 = 1 << 32;
/// ACPI tables at the top of low memory: 128 KiB plus an unaligned 2 KiB.
const TOP_ACPI_SIZE: u64 = 0x2_0800;
/// Fixed reserved ranges inside the PCI hole (IOAPIC, local APIC, BIOS flash).
const PCI_HOLE_RESERVED: [(u64, u64); 3] = [
    (0xfec0_0000, 0xfec0_1000),
    (0xfee0_0000, 0xfee0_1000),
    (0xfffc_0000, FOUR_GIB),
];
/// Every hole must have at least this much usable memory around it.
const MIN_SPACING: u64 = 256 << 10;

/// Builds the map for `memory_size` bytes of physical memory with `holes` holes.
///
/// # Panics
///
/// If the memory is smaller than [`MIN_MEMORY`], not a multiple of 2 MiB, or too
/// small for that many holes.
pub(super) fn build(memory_size: u64, holes: usize) -> Vec<MemoryRegion> {
    assert!(
        memory_size >= MIN_MEMORY,
        "SimConfig: memory_size {memory_size:#x} is below the minimum of {MIN_MEMORY:#x}"
    );
    assert!(
        memory_size.is_multiple_of(2 << 20),
        "SimConfig: memory_size {memory_size:#x} is not a multiple of 2 MiB"
    );
    let spans = usable_spans(memory_size);
    let total: u64 = spans.iter().map(|s| s.end - s.start).sum();
    assert!(
        total / (holes as u64 + 1) >= MIN_SPACING,
        "SimConfig: {holes} holes do not fit in {memory_size:#x} bytes of memory"
    );

    let mut map = Vec::new();
    map.push(MemoryRegion::usable(0, LOW_USABLE_END));
    map.push(MemoryRegion::reserved(LOW_USABLE_END, KERNEL_IMAGE_START));
    map.push(MemoryRegion::reserved(KERNEL_IMAGE_START, KERNEL_IMAGE_END));
    let cuts = hole_cuts(&spans, total, holes);
    for span in &spans {
        let mut start = span.start;
        for (hole, listed) in cuts.iter().filter(|(h, _)| span.contains(&h.start)) {
            push_usable(&mut map, start, hole.start);
            if *listed {
                map.push(MemoryRegion::reserved(hole.start, hole.end));
            }
            start = hole.end;
        }
        push_usable(&mut map, start, span.end);
        push_after_span(&mut map, span.end, memory_size);
    }
    map
}

fn push_usable(map: &mut Vec<MemoryRegion>, start: u64, end: u64) {
    if start < end {
        map.push(MemoryRegion::usable(start, end));
    }
}

/// The stretches of memory that are usable before holes are cut into them.
fn usable_spans(memory_size: u64) -> Vec<Range<u64>> {
    let low_top = memory_size.min(PCI_HOLE_START);
    let mut spans = std::vec![KERNEL_IMAGE_END..low_top - TOP_ACPI_SIZE];
    if memory_size > FOUR_GIB {
        spans.push(FOUR_GIB..memory_size);
    }
    spans
}

/// The reserved ranges that follow a usable span: top-of-low-memory ACPI tables and
/// the listed parts of the PCI hole.
fn push_after_span(map: &mut Vec<MemoryRegion>, span_end: u64, memory_size: u64) {
    if span_end == memory_size {
        return;
    }
    map.push(MemoryRegion::reserved(span_end, span_end + TOP_ACPI_SIZE));
    for (start, end) in PCI_HOLE_RESERVED {
        if end <= memory_size {
            map.push(MemoryRegion::reserved(start, end));
        }
    }
}

/// `holes` holes spread evenly over the concatenated spans, each with a flag saying
/// whether the map lists it as reserved. Sizes and offsets vary with the hole's
/// number so that region ends land on unaligned addresses.
fn hole_cuts(spans: &[Range<u64>], total: u64, holes: usize) -> Vec<(Range<u64>, bool)> {
    (0..holes as u64)
        .map(|i| {
            let target = (i + 1) * (total / (holes as u64 + 1));
            let (address, span) = address_at(spans, target);
            let len = 0x4000 * (1 + i % 4) + 0x200 * (i % 2);
            // Near a span's end, move the hole back so it stays inside the span.
            let start = address.min(span.end - len - 0x1000) & !0xfff;
            let start = start + 0x400 * (i % 3);
            (start..start + len, i % 2 == 0)
        })
        .collect()
}

/// The address `offset` bytes into the concatenated spans, and its span.
fn address_at(spans: &[Range<u64>], mut offset: u64) -> (u64, &Range<u64>) {
    for span in spans {
        let len = span.end - span.start;
        if offset < len {
            return (span.start + offset, span);
        }
        offset -= len;
    }
    unreachable!("offset past the usable spans")
}
