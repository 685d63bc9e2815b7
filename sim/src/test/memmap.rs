//! The firmware memory map: its shape with and without holes and a PCI hole,
//! determinism, the configurations it refuses, and the scatter seed.

use super::*;

fn check_map_shape(config: SimConfig) {
    let machine = SimMachine::new(config);
    let map = machine.memory_map();
    let size = config.memory_size;

    for region in map {
        assert!(region.range.start < region.range.end, "empty {region:?}");
        assert!(
            region.range.end.as_u64() <= size,
            "{region:?} past memory end"
        );
    }
    for pair in map.windows(2) {
        assert!(
            pair[0].range.end <= pair[1].range.start,
            "{pair:?} unsorted or overlap"
        );
    }
    let usable: Vec<_> = map
        .iter()
        .filter(|r| r.kind == RegionKind::Usable)
        .collect();
    let reserved: Vec<_> = map
        .iter()
        .filter(|r| r.kind == RegionKind::Reserved)
        .collect();
    for u in &usable {
        for r in &reserved {
            let disjoint = u.range.end <= r.range.start || r.range.end <= u.range.start;
            assert!(disjoint, "reserved {r:?} inside usable {u:?}");
        }
    }

    // Low memory, legacy hole and kernel image, as on a PC.
    assert_eq!(map[0], MemoryRegion::usable(0, LOW_USABLE_END));
    let legacy_usable = usable
        .iter()
        .any(|u| u.range.start.as_u64() < MIB && u.range.end.as_u64() > 640 << 10);
    assert!(!legacy_usable, "usable memory between 640 KiB and 1 MiB");
    let root = machine.root().start_address();
    let root_region = map
        .iter()
        .find(|r| r.range.contains(&root))
        .expect("root mapped");
    assert_eq!(root_region.kind, RegionKind::Reserved);
    assert_eq!(
        root_region.range.start.as_u64(),
        MIB,
        "kernel image at 1 MiB"
    );

    // Sizes add up: listed bytes and unlisted gaps cover the whole memory.
    let listed: u64 = map.iter().map(|r| r.range.end - r.range.start).sum();
    let mut gaps = Vec::new();
    let mut covered = 0;
    for region in map {
        if region.range.start.as_u64() > covered {
            gaps.push(covered..region.range.start.as_u64());
        }
        covered = region.range.end.as_u64();
    }
    if covered < size {
        gaps.push(covered..size);
    }
    let gap_bytes: u64 = gaps.iter().map(|g| g.end - g.start).sum();
    assert_eq!(listed + gap_bytes, size);

    // The holes: odd-numbered ones unlisted, plus the PCI hole on big machines.
    let pci_hole = size > 3 * GIB;
    let small_gaps = gaps.iter().filter(|g| g.end - g.start < MIB).count();
    assert_eq!(
        small_gaps,
        config.reserved_holes / 2,
        "unlisted holes: {gaps:x?}"
    );
    let pci_range = 3 * GIB..4 * GIB;
    let big_gaps: Vec<_> = gaps.iter().filter(|g| g.end - g.start >= MIB).collect();
    assert_eq!(big_gaps.is_empty(), !pci_hole, "{gaps:x?}");
    for gap in big_gaps {
        assert!(
            pci_range.contains(&gap.start) && gap.end <= pci_range.end,
            "{gap:x?}"
        );
    }
    let high_usable = usable
        .iter()
        .filter(|u| u.range.start.as_u64() >= KERNEL_IMAGE_END);
    let expected_pieces = config.reserved_holes + 1 + usize::from(size > 4 * GIB);
    assert_eq!(high_usable.count(), expected_pieces);
    if pci_hole {
        let in_pci_hole =
            |u: &&&MemoryRegion| u.range.start.as_u64() < 4 * GIB && u.range.end.as_u64() > 3 * GIB;
        assert!(
            !usable.iter().any(|u| in_pci_hole(&u)),
            "usable RAM in the PCI hole"
        );
    }

    // Fragmented like firmware maps: some region ends are not page-aligned.
    if config.reserved_holes >= 2 {
        assert!(usable.iter().any(|u| u.range.start.as_u64() % 4096 != 0));
    }
    assert!(usable.iter().any(|u| u.range.end.as_u64() % 4096 != 0));

    // Holes are small: usable memory is nearly all memory outside fixed ranges.
    let usable_bytes: u64 = usable.iter().map(|u| u.range.end - u.range.start).sum();
    let fixed = KERNEL_IMAGE_END - LOW_USABLE_END + 0x2_0800 + if pci_hole { GIB } else { 0 };
    let most_lost = fixed + config.reserved_holes as u64 * 0x11000;
    assert!(
        usable_bytes + most_lost >= size,
        "{usable_bytes:#x} of {size:#x}"
    );
}

#[test]
fn memory_map_default_shape() {
    check_map_shape(SimConfig::default());
}

#[test]
fn memory_map_without_holes_and_with_many() {
    check_map_shape(SimConfig::new(64 * MIB).with_holes(0));
    check_map_shape(SimConfig::new(64 * MIB).with_holes(1));
    check_map_shape(SimConfig::new(64 * MIB).with_holes(200));
}

#[test]
fn memory_map_with_pci_hole() {
    check_map_shape(SimConfig::new(3 * GIB + 512 * MIB).with_holes(5));
    check_map_shape(SimConfig::new(5 * GIB).with_holes(16));
}

#[test]
fn memory_map_is_deterministic() {
    let config = SimConfig::new(128 * MIB).with_holes(11);
    assert_eq!(
        SimMachine::new(config).memory_map(),
        SimMachine::new(config).memory_map()
    );
}

#[test]
#[should_panic(expected = "do not fit")]
fn too_many_holes_panics() {
    SimMachine::new(SimConfig::new(16 * MIB).with_holes(1000));
}

#[test]
#[should_panic(expected = "not a multiple of 2 MiB")]
fn odd_memory_size_panics() {
    SimMachine::new(SimConfig::new(64 * MIB + 4096));
}

#[test]
fn scatter_seed_is_kept() {
    assert_eq!(machine().scatter_seed(), None);
    let seeded = SimMachine::new(SimConfig::default().with_scatter_seed(7));
    assert_eq!(seeded.scatter_seed(), Some(7));
}
