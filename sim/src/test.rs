use super::memmap::{KERNEL_IMAGE_END, KERNEL_IMAGE_START, LOW_USABLE_END};
use super::*;
use std::vec;
use vmalloc::TlbFlush;
use vmalloc::frame::RegionKind;
use x86_64::structures::idt::PageFaultErrorCode as Code;
use x86_64::structures::paging::Page;
use x86_64::structures::paging::mapper::{Translate, TranslateResult};
use x86_64::structures::paging::{PageTable, PageTableFlags as Flags};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

// ---------------------------------------------------------------------------------
// Helpers: hand-written page tables, with frames from a bump over the usable map.
// ---------------------------------------------------------------------------------

/// Hands out the usable 4 KiB frames of the memory map in address order.
struct Bump {
    frames: std::vec::IntoIter<PhysFrame>,
}

impl Bump {
    fn new(machine: &SimMachine) -> Self {
        let mut frames = Vec::new();
        for region in machine.memory_map() {
            if region.kind == RegionKind::Usable && region.range.start.as_u64() >= MIB {
                let start = region.range.start.align_up(4096u64).as_u64();
                let end = region.range.end.align_down(4096u64).as_u64();
                frames.extend((start..end).step_by(4096).map(frame_at));
            }
        }
        Self {
            frames: frames.into_iter(),
        }
    }

    fn frame(&mut self) -> PhysFrame {
        self.frames.next().expect("test ran out of frames")
    }
}

fn frame_at(addr: u64) -> PhysFrame {
    PhysFrame::containing_address(PhysAddr::new(addr))
}

/// The page table in `frame`, reached through the machine's physical memory.
///
/// The reference must be dropped before the machine reads the table again.
#[allow(clippy::mut_from_ref)]
fn table(machine: &SimMachine, frame: PhysFrame) -> &mut PageTable {
    let ptr = machine.phys().phys_to_virt(frame.start_address());
    // SAFETY: the frame is inside the block, 4 KiB-aligned, and the test holds no
    // other reference into it while using this one.
    unsafe { &mut *ptr.cast::<PageTable>() }
}

const TABLE: Flags = Flags::PRESENT
    .union(Flags::WRITABLE)
    .union(Flags::USER_ACCESSIBLE);
const KERNEL_RW: Flags = Flags::PRESENT.union(Flags::WRITABLE);

/// Writes page tables by hand: upper entries get `TABLE` flags unless overridden.
struct Tables<'m> {
    machine: &'m SimMachine,
    bump: Bump,
}

impl<'m> Tables<'m> {
    fn new(machine: &'m SimMachine) -> Self {
        Self {
            machine,
            bump: Bump::new(machine),
        }
    }

    /// Maps `virt` to `phys` with a leaf at `leaf_level` (1 = 4 KiB, 2 = 2 MiB,
    /// 3 = 1 GiB), creating missing tables with `TABLE` flags. Returns the tables
    /// walked, from the PML4 down.
    fn map(&mut self, virt: u64, phys: u64, leaf_level: u32, flags: Flags) -> Vec<PhysFrame> {
        let mut frame = self.machine.root();
        let mut walked = vec![frame];
        for level in (leaf_level + 1..=4).rev() {
            let index = index_at(virt, level);
            let entry = &table(self.machine, frame)[index];
            frame = if entry.is_unused() {
                let next = self.bump.frame();
                table(self.machine, frame)[index].set_frame(next, TABLE);
                next
            } else {
                entry.frame().expect("a table entry")
            };
            walked.push(frame);
        }
        let leaf_flags = if leaf_level > 1 {
            flags | Flags::HUGE_PAGE
        } else {
            flags
        };
        table(self.machine, frame)[index_at(virt, leaf_level)]
            .set_addr(PhysAddr::new(phys), leaf_flags);
        walked
    }

    /// Maps `virt` to a fresh frame with `flags`; returns the frame.
    fn map_new(&mut self, virt: u64, flags: Flags) -> PhysFrame {
        let frame = self.bump.frame();
        self.map(virt, frame.start_address().as_u64(), 1, flags);
        frame
    }

    /// Replaces the flags of the entry for `virt` in `table_frame` (a level-`level`
    /// table), keeping its address.
    fn set_flags(&self, table_frame: PhysFrame, virt: u64, level: u32, flags: Flags) {
        let entry = &mut table(self.machine, table_frame)[index_at(virt, level)];
        let addr = entry.addr();
        entry.set_addr(addr, flags);
    }

    fn clear(&self, table_frame: PhysFrame, virt: u64, level: u32) {
        table(self.machine, table_frame)[index_at(virt, level)].set_unused();
    }
}

fn index_at(virt: u64, level: u32) -> usize {
    ((virt >> (12 + 9 * (level - 1))) & 0x1ff) as usize
}

fn virt(addr: u64) -> VirtAddr {
    VirtAddr::new(addr)
}

fn page_of(addr: u64) -> Page {
    Page::containing_address(virt(addr))
}

fn page_fault(result: Result<Translation, Fault>) -> PageFault {
    result
        .expect_err("access should fault")
        .page_fault()
        .expect("a page fault")
}

fn machine() -> SimMachine {
    SimMachine::new(SimConfig::default())
}

/// A kernel-half address to map test pages at.
const BASE: u64 = 0xffff_c000_0000_0000;

// ---------------------------------------------------------------------------------
// Memory map
// ---------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------
// Rng
// ---------------------------------------------------------------------------------

#[test]
fn rng_is_deterministic_per_seed() {
    let take = |seed| {
        let mut rng = Rng::new(seed);
        (0..8).map(|_| rng.next_u64()).collect::<Vec<_>>()
    };
    assert_eq!(take(1), take(1));
    assert_ne!(take(1), take(2));
}

#[test]
fn rng_below_stays_in_range_and_reaches_every_value() {
    let mut rng = Rng::new(42);
    let mut seen = [false; 10];
    for _ in 0..1000 {
        let n = rng.below(10);
        assert!(n < 10);
        seen[n as usize] = true;
    }
    assert!(seen.iter().all(|&s| s), "{seen:?}");
}

#[test]
fn rng_shuffle_permutes() {
    let mut items: Vec<u32> = (0..100).collect();
    Rng::new(3).shuffle(&mut items);
    assert_ne!(items, (0..100).collect::<Vec<_>>());
    items.sort_unstable();
    assert_eq!(items, (0..100).collect::<Vec<_>>());
}

// ---------------------------------------------------------------------------------
// Physical memory
// ---------------------------------------------------------------------------------

#[test]
fn phys_memory_is_at_phys_offset() {
    let machine = machine();
    let addr = PhysAddr::new(0x12_3456);
    let ptr = machine.phys().phys_to_virt(addr);
    assert_eq!(ptr as u64, machine.phys_offset().as_u64() + addr.as_u64());
    assert_eq!(machine.phys_offset().as_u64() % 4096, 0);
}

#[test]
fn phys_helpers_round_trip() {
    let machine = machine();
    let frame = frame_at(0x50_0000);
    assert!(
        machine.frame_bytes(frame).iter().all(|&b| b == 0),
        "memory starts zeroed"
    );
    machine.fill_phys(frame.start_address(), 4096, 0xaa);
    machine.write_phys(frame.start_address() + 100u64, b"hello");
    let bytes = machine.frame_bytes(frame);
    assert_eq!(&bytes[100..105], b"hello");
    assert_eq!(bytes[99], 0xaa);
    assert_eq!(bytes[105], 0xaa);
    let mut back = [0; 5];
    machine.read_phys(frame.start_address() + 100u64, &mut back);
    assert_eq!(&back, b"hello");
}

#[test]
#[should_panic(expected = "outside the simulated memory")]
fn phys_address_past_the_end_panics() {
    let machine = machine();
    machine.phys().phys_to_virt(PhysAddr::new(64 * MIB));
}

#[test]
#[should_panic(expected = "outside the simulated memory")]
fn phys_write_running_past_the_end_panics() {
    let machine = machine();
    machine.write_phys(PhysAddr::new(64 * MIB - 2), b"abc");
}

#[test]
fn root_table_starts_empty() {
    let machine = machine();
    assert!(machine.frame_bytes(machine.root()).iter().all(|&b| b == 0));
    assert_eq!(machine.tlb_len(), 0);
    let range = KERNEL_IMAGE_START..KERNEL_IMAGE_END;
    assert!(range.contains(&machine.root().start_address().as_u64()));
}

// ---------------------------------------------------------------------------------
// MMU: translations
// ---------------------------------------------------------------------------------

#[test]
fn translates_4k_2m_and_1g_pages() {
    let machine = machine();
    let mut tables = Tables::new(&machine);
    let small = tables.map_new(BASE, KERNEL_RW);
    tables.map(BASE + 2 * MIB, 8 * MIB, 2, KERNEL_RW);
    tables.map(BASE + GIB, 0, 3, KERNEL_RW);

    let t = machine.translate(virt(BASE + 0x123), Access::READ).unwrap();
    assert_eq!(t.phys(), small.start_address() + 0x123u64);
    assert_eq!(t.page_size, 4096);
    assert_eq!(t.flags, KERNEL_RW, "effective flags, no address bits");

    let t = machine
        .translate(virt(BASE + 3 * MIB + 0x45), Access::READ)
        .unwrap();
    assert_eq!(t.phys().as_u64(), 9 * MIB + 0x45);
    assert_eq!((t.page_size, t.frame_start.as_u64()), (2 * MIB, 8 * MIB));
    assert_eq!(t.flags, KERNEL_RW | Flags::HUGE_PAGE);

    let t = machine
        .translate(virt(BASE + GIB + 0x2a_b123), Access::WRITE)
        .unwrap();
    assert_eq!(t.phys().as_u64(), 0x2a_b123);
    assert_eq!(t.page_size, GIB);
}

#[test]
fn data_goes_where_the_tables_say() {
    let machine = machine();
    let mut tables = Tables::new(&machine);
    let frame = tables.map_new(BASE, KERNEL_RW);
    tables.map(BASE + 2 * MIB, 8 * MIB, 2, KERNEL_RW);

    machine.write(virt(BASE + 10), b"four k").unwrap();
    machine
        .write(virt(BASE + 2 * MIB + MIB + 7), b"two m")
        .unwrap();

    let mut buf = [0; 6];
    machine.read_phys(frame.start_address() + 10u64, &mut buf);
    assert_eq!(&buf, b"four k");
    let mut buf = [0; 5];
    machine.read_phys(PhysAddr::new(9 * MIB + 7), &mut buf);
    assert_eq!(&buf, b"two m");
    machine
        .read(virt(BASE + 2 * MIB + MIB + 7), &mut buf)
        .unwrap();
    assert_eq!(&buf, b"two m");
}

#[test]
fn offset_page_table_agrees_with_the_mmu() {
    let machine = machine();
    let mut tables = Tables::new(&machine);
    tables.map_new(BASE + 0x5000, KERNEL_RW | Flags::NO_EXECUTE);
    tables.map(BASE + 4 * MIB, 12 * MIB, 2, KERNEL_RW);
    tables.map(BASE + 2 * GIB, GIB, 3, Flags::PRESENT);

    // SAFETY: the tables are complete and nothing else writes them while it lives.
    let walker = unsafe { machine.offset_page_table() };
    for addr in [
        BASE + 0x5abc,
        BASE + 5 * MIB + 0x10,
        BASE + 2 * GIB + 0x1234_5678,
    ] {
        let ours = machine.translate(virt(addr), Access::READ).unwrap();
        let TranslateResult::Mapped { frame, offset, .. } = walker.translate(virt(addr)) else {
            panic!("OffsetPageTable finds {addr:#x} unmapped");
        };
        assert_eq!(frame.start_address(), ours.frame_start);
        assert_eq!(frame.size(), ours.page_size);
        assert_eq!(offset, ours.offset);
    }
    assert!(matches!(
        walker.translate(virt(BASE + 0x6000)),
        TranslateResult::NotMapped
    ));
}

#[test]
fn effective_permissions_combine_all_levels() {
    let machine = machine();
    let mut tables = Tables::new(&machine);
    let leaf = Flags::PRESENT | Flags::WRITABLE | Flags::USER_ACCESSIBLE;
    let walked = tables.map(BASE, 6 * MIB, 1, leaf);
    let t = machine.translate(virt(BASE), Access::READ.user()).unwrap();
    assert!(t.flags.contains(Flags::WRITABLE | Flags::USER_ACCESSIBLE));
    assert!(!t.flags.contains(Flags::NO_EXECUTE));

    // Read-only at the PDPT, NX at the PD, supervisor-only at the PML4.
    tables.set_flags(walked[1], BASE, 3, Flags::PRESENT | Flags::USER_ACCESSIBLE);
    tables.set_flags(walked[2], BASE, 2, TABLE | Flags::NO_EXECUTE);
    tables.set_flags(walked[0], BASE, 4, KERNEL_RW);
    machine.flush_all();
    let t = machine.translate(virt(BASE), Access::READ).unwrap();
    assert!(!t.flags.intersects(Flags::WRITABLE | Flags::USER_ACCESSIBLE));
    assert!(t.flags.contains(Flags::NO_EXECUTE | Flags::PRESENT));
}

// ---------------------------------------------------------------------------------
// MMU: faults
// ---------------------------------------------------------------------------------

#[test]
fn write_to_read_only_faults_for_kernel_and_user() {
    let machine = machine();
    let mut tables = Tables::new(&machine);
    tables.map_new(BASE, Flags::PRESENT | Flags::USER_ACCESSIBLE);
    let addr = virt(BASE + 0x10);
    assert!(machine.translate(addr, Access::READ).is_ok());

    let fault = page_fault(machine.translate(addr, Access::WRITE));
    assert_eq!(fault.addr, addr);
    assert_eq!(
        fault.code,
        Code::PROTECTION_VIOLATION | Code::CAUSED_BY_WRITE
    );
    let fault = page_fault(machine.translate(addr, Access::WRITE.user()));
    let user_write = Code::PROTECTION_VIOLATION | Code::CAUSED_BY_WRITE | Code::USER_MODE;
    assert_eq!(fault.code, user_write);
}

#[test]
fn read_only_upper_level_makes_the_page_read_only() {
    let machine = machine();
    let mut tables = Tables::new(&machine);
    let walked = tables.map(BASE, 6 * MIB, 1, KERNEL_RW);
    tables.set_flags(walked[2], BASE, 2, Flags::PRESENT);
    let fault = page_fault(machine.translate(virt(BASE), Access::WRITE));
    assert_eq!(
        fault.code,
        Code::PROTECTION_VIOLATION | Code::CAUSED_BY_WRITE
    );
}

#[test]
fn user_access_to_supervisor_page_faults() {
    let machine = machine();
    let mut tables = Tables::new(&machine);
    // The leaf says user, but the PD entry above it does not.
    let leaf = Flags::PRESENT | Flags::WRITABLE | Flags::USER_ACCESSIBLE;
    let walked = tables.map(BASE, 6 * MIB, 1, leaf);
    tables.set_flags(walked[2], BASE, 2, KERNEL_RW);
    let addr = virt(BASE + 8);

    let fault = page_fault(machine.translate(addr, Access::READ.user()));
    assert_eq!(fault.code, Code::PROTECTION_VIOLATION | Code::USER_MODE);
    let fault = machine.fetch_user(addr, &mut [0; 4]).unwrap_err();
    let fault = fault.page_fault().unwrap();
    let user_fetch = Code::PROTECTION_VIOLATION | Code::USER_MODE | Code::INSTRUCTION_FETCH;
    assert_eq!(fault.code, user_fetch);
    // SMAP off: the kernel reaches user pages, and this one is supervisor anyway.
    assert!(machine.translate(addr, Access::WRITE).is_ok());
}

#[test]
fn kernel_reaches_user_pages() {
    let machine = machine();
    let mut tables = Tables::new(&machine);
    tables.map_new(
        BASE,
        Flags::PRESENT | Flags::WRITABLE | Flags::USER_ACCESSIBLE,
    );
    for access in [Access::READ, Access::WRITE, Access::FETCH] {
        assert!(machine.translate(virt(BASE), access).is_ok(), "{access:?}");
    }
}

#[test]
fn fetch_from_nx_faults_with_the_fetch_bit() {
    let machine = machine();
    let mut tables = Tables::new(&machine);
    let frame = tables.map_new(BASE, KERNEL_RW | Flags::NO_EXECUTE);
    let code_page = tables.map_new(BASE + 0x1000, Flags::PRESENT);
    machine.write_phys(code_page.start_address(), &[0x90, 0xc3]);
    machine.write_phys(frame.start_address(), &[0xcc]);

    let mut buf = [0; 2];
    let fault = machine
        .fetch(virt(BASE), &mut buf)
        .unwrap_err()
        .page_fault()
        .unwrap();
    assert_eq!(fault.addr, virt(BASE));
    assert_eq!(
        fault.code,
        Code::PROTECTION_VIOLATION | Code::INSTRUCTION_FETCH
    );
    assert_eq!(buf, [0, 0]);
    assert!(
        machine.read(virt(BASE), &mut buf[..1]).is_ok(),
        "NX pages stay readable"
    );

    machine.fetch(virt(BASE + 0x1000), &mut buf).unwrap();
    assert_eq!(buf, [0x90, 0xc3]);
}

#[test]
fn not_present_at_each_level() {
    let machine = machine();
    let mut tables = Tables::new(&machine);
    let walked = tables.map(BASE, 6 * MIB, 1, KERNEL_RW);
    let addr = virt(BASE + 0x42);
    let accesses = [
        (Access::READ, Code::empty()),
        (Access::WRITE, Code::CAUSED_BY_WRITE),
        (Access::FETCH, Code::INSTRUCTION_FETCH),
        (
            Access::WRITE.user(),
            Code::CAUSED_BY_WRITE | Code::USER_MODE,
        ),
    ];
    // Clear the PT entry, then the PD, PDPT and PML4 entries above it in turn.
    for (depth, level) in [(3, 1), (2, 2), (1, 3), (0, 4)] {
        tables.clear(walked[depth], BASE, level);
        for (access, code) in accesses {
            let fault = page_fault(machine.translate(addr, access));
            assert_eq!(fault, PageFault { addr, code }, "level {level}, {access:?}");
        }
    }
    assert_eq!(machine.tlb_len(), 0);
}

#[test]
fn not_present_in_an_empty_machine() {
    let machine = machine();
    let fault = page_fault(machine.translate(virt(0x1000), Access::READ));
    assert_eq!(fault.code, Code::empty());
}

#[test]
fn reserved_bits_fault_with_rsvd() {
    let machine = machine();
    let mut tables = Tables::new(&machine);
    let walked = tables.map(BASE, 6 * MIB, 1, KERNEL_RW);
    tables.map(BASE + 2 * MIB, 8 * MIB, 2, KERNEL_RW);
    let rsvd = Code::PROTECTION_VIOLATION | Code::MALFORMED_TABLE;

    // A 2 MiB entry with bit 13 set (between PAT and the frame address).
    let pd = walked[2];
    let entry = &mut table(&machine, pd)[index_at(BASE + 2 * MIB, 2)];
    entry.set_addr(
        PhysAddr::new(8 * MIB + 0x2000),
        KERNEL_RW | Flags::HUGE_PAGE,
    );
    let fault = page_fault(machine.translate(virt(BASE + 2 * MIB), Access::READ));
    assert_eq!(fault.code, rsvd);

    // PS in a PML4 entry.
    tables.set_flags(walked[0], BASE, 4, TABLE | Flags::HUGE_PAGE);
    let fault = page_fault(machine.translate(virt(BASE), Access::WRITE));
    assert_eq!(fault.code, rsvd | Code::CAUSED_BY_WRITE);
}

#[test]
fn non_canonical_is_a_general_protection_fault() {
    let machine = machine();
    let result = machine.translate_raw(0x8000_0000_0000, Access::READ);
    assert_eq!(
        result,
        Err(Fault::GeneralProtection {
            addr: 0x8000_0000_0000
        })
    );
    let result = machine.translate_raw(0xffff_7fff_ffff_ffff, Access::WRITE);
    assert!(matches!(result, Err(Fault::GeneralProtection { .. })));
}

#[test]
fn access_running_into_non_canonical_space_faults_whole() {
    let machine = machine();
    let mut tables = Tables::new(&machine);
    let last_page = 0x7fff_ffff_f000;
    let frame = tables.map_new(last_page, KERNEL_RW);
    let mut buf = [7; 32];
    let fault = machine.read(virt(last_page + 0xff0), &mut buf).unwrap_err();
    assert_eq!(
        fault,
        Fault::GeneralProtection {
            addr: 0x8000_0000_0000
        }
    );
    assert_eq!(buf, [7; 32]);
    assert!(machine.write(virt(last_page + 0xff0), &[1; 32]).is_err());
    assert!(machine.frame_bytes(frame).iter().all(|&b| b == 0));
}

// ---------------------------------------------------------------------------------
// MMU: multi-page accesses
// ---------------------------------------------------------------------------------

#[test]
fn reads_and_writes_cross_pages_into_scattered_frames() {
    let machine = machine();
    let mut tables = Tables::new(&machine);
    let first = tables.map_new(BASE, KERNEL_RW);
    tables.bump.frame(); // keep the two frames apart
    let second = tables.map_new(BASE + 0x1000, KERNEL_RW);
    assert_ne!(first.start_address() + 4096u64, second.start_address());

    let data: Vec<u8> = (0..64).collect();
    machine.write(virt(BASE + 0x1000 - 32), &data).unwrap();
    assert_eq!(machine.frame_bytes(first)[4096 - 32..], data[..32]);
    assert_eq!(machine.frame_bytes(second)[..32], data[32..]);
    let mut back = [0; 64];
    machine.read(virt(BASE + 0x1000 - 32), &mut back).unwrap();
    assert_eq!(back[..], data[..]);
}

#[test]
fn crossing_into_an_unmapped_page_faults_without_partial_copy() {
    let machine = machine();
    let mut tables = Tables::new(&machine);
    let frame = tables.map_new(BASE, KERNEL_RW);
    let start = virt(BASE + 0x1000 - 8);

    let fault = machine
        .write(start, &[0xee; 16])
        .unwrap_err()
        .page_fault()
        .unwrap();
    assert_eq!(fault.addr, virt(BASE + 0x1000));
    assert_eq!(fault.code, Code::CAUSED_BY_WRITE);
    assert!(
        machine.frame_bytes(frame).iter().all(|&b| b == 0),
        "partial write"
    );

    machine.write_phys(frame.start_address() + 0xff8u64, &[1; 8]);
    let mut buf = [9; 16];
    let fault = machine
        .read(start, &mut buf)
        .unwrap_err()
        .page_fault()
        .unwrap();
    assert_eq!(fault.addr, virt(BASE + 0x1000));
    assert_eq!(fault.code, Code::empty());
    assert_eq!(buf, [9; 16], "partial read");
}

#[test]
fn first_faulting_page_is_reported() {
    let machine = machine();
    let mut tables = Tables::new(&machine);
    tables.map_new(BASE, KERNEL_RW);
    tables.map_new(BASE + 0x1000, Flags::PRESENT);
    // Page 2 is read-only, page 3 unmapped: the write reports page 2.
    let fault = machine.write(virt(BASE + 0x10), &[0; 0x3000]).unwrap_err();
    let fault = fault.page_fault().unwrap();
    assert_eq!(fault.addr, virt(BASE + 0x1000));
    assert_eq!(
        fault.code,
        Code::PROTECTION_VIOLATION | Code::CAUSED_BY_WRITE
    );
}

#[test]
fn empty_access_touches_nothing() {
    let machine = machine();
    assert_eq!(machine.read(virt(BASE), &mut []), Ok(()));
    assert_eq!(machine.tlb_stats(), TlbStats::default());
}

// ---------------------------------------------------------------------------------
// TLB
// ---------------------------------------------------------------------------------

#[test]
fn forgotten_flush_reads_stale_data() {
    let machine = machine();
    let mut tables = Tables::new(&machine);
    let frame = tables.bump.frame();
    let walked = tables.map(BASE, frame.start_address().as_u64(), 1, KERNEL_RW);
    machine.write_phys(frame.start_address(), b"old data");

    let mut buf = [0; 8];
    machine.read(virt(BASE), &mut buf).unwrap();
    assert_eq!(&buf, b"old data");
    assert_eq!(machine.tlb_len(), 1);

    tables.clear(walked[3], BASE, 1);
    buf = [0; 8];
    machine.read(virt(BASE), &mut buf).unwrap();
    assert_eq!(
        &buf, b"old data",
        "no flush yet: the TLB still maps the page"
    );

    machine.flush_page(page_of(BASE));
    let fault = machine
        .read(virt(BASE), &mut buf)
        .unwrap_err()
        .page_fault()
        .unwrap();
    assert_eq!(
        fault,
        PageFault {
            addr: virt(BASE),
            code: Code::empty()
        }
    );

    let stats = machine.tlb_stats();
    assert_eq!((stats.hits, stats.misses, stats.page_flushes), (1, 2, 1));
    assert_eq!((stats.range_flushes, stats.full_flushes), (0, 0));
    assert_eq!(machine.tlb_len(), 0);
}

#[test]
fn permission_fault_on_a_cached_entry_rewalks() {
    let machine = machine();
    let mut tables = Tables::new(&machine);
    let walked = tables.map(BASE, 6 * MIB, 1, Flags::PRESENT);
    machine.translate(virt(BASE), Access::READ).unwrap();

    // Made writable without a flush: the re-walk sees it.
    tables.set_flags(walked[3], BASE, 1, KERNEL_RW);
    let t = machine.translate(virt(BASE), Access::WRITE).unwrap();
    assert!(t.flags.contains(Flags::WRITABLE));
    assert_eq!(
        (machine.tlb_stats().hits, machine.tlb_stats().misses),
        (0, 2)
    );
    assert_eq!(machine.tlb_len(), 1);

    // Made read-only without a flush: the stale writable entry still answers.
    tables.set_flags(walked[3], BASE, 1, Flags::PRESENT);
    assert!(machine.translate(virt(BASE), Access::WRITE).is_ok());
    machine.flush_page(page_of(BASE));
    assert!(machine.translate(virt(BASE), Access::WRITE).is_err());
    assert_eq!(machine.tlb_len(), 0, "a fault drops the entry");
}

#[test]
fn fault_drops_the_stale_entry() {
    let machine = machine();
    let mut tables = Tables::new(&machine);
    let walked = tables.map(BASE, 6 * MIB, 1, Flags::PRESENT);
    machine.translate(virt(BASE), Access::READ).unwrap();
    tables.clear(walked[3], BASE, 1);
    // The write misses the cached read-only permissions, re-walks, finds nothing.
    let fault = page_fault(machine.translate(virt(BASE), Access::WRITE));
    assert_eq!(fault.code, Code::CAUSED_BY_WRITE);
    assert_eq!(machine.tlb_len(), 0);
    assert!(machine.translate(virt(BASE), Access::READ).is_err());
}

#[test]
fn flushing_one_page_of_a_huge_mapping_drops_all_of_it() {
    let machine = machine();
    let mut tables = Tables::new(&machine);
    tables.map(BASE, 8 * MIB, 2, KERNEL_RW);
    tables.map_new(BASE + 2 * MIB, KERNEL_RW);
    for offset in [0, 0x5000, 0x1f_f000, 2 * MIB] {
        machine
            .translate(virt(BASE + offset), Access::READ)
            .unwrap();
    }
    assert_eq!(machine.tlb_len(), 4);
    machine.flush_page(page_of(BASE + 0x10_0000));
    assert_eq!(
        machine.tlb_len(),
        1,
        "only the 4 KiB page after the huge one stays"
    );
}

#[test]
fn flush_range_and_flush_all() {
    let machine = machine();
    let mut tables = Tables::new(&machine);
    for i in 0..8 {
        tables.map_new(BASE + i * 0x1000, KERNEL_RW);
        machine
            .translate(virt(BASE + i * 0x1000), Access::READ)
            .unwrap();
    }
    assert_eq!(machine.tlb_len(), 8);
    let range = Page::range(page_of(BASE + 0x2000), page_of(BASE + 0x5000));
    machine.flush_range(range);
    assert_eq!(machine.tlb_len(), 5);
    for i in 0..8 {
        machine
            .translate(virt(BASE + i * 0x1000), Access::READ)
            .unwrap();
    }
    let stats = machine.tlb_stats();
    assert_eq!((stats.hits, stats.misses, stats.range_flushes), (5, 11, 1));
    machine.flush_all();
    assert_eq!(machine.tlb_len(), 0);
    assert_eq!(machine.tlb_stats().full_flushes, 1);
    assert_eq!(machine.tlb_stats().page_flushes, 0);
}

// ---------------------------------------------------------------------------------
// Threads
// ---------------------------------------------------------------------------------

#[test]
fn machine_is_send_and_sync() {
    fn shareable<T: Send + Sync>() {}
    shareable::<SimMachine>();
    shareable::<SimPhys<'static>>();
}

#[test]
fn threads_translate_concurrently() {
    const THREADS: u64 = 4;
    const PAGES: u64 = 64;
    const ROUNDS: u64 = 20;
    let machine = machine();
    let mut tables = Tables::new(&machine);
    for page in 0..THREADS * PAGES {
        let frame = tables.map_new(BASE + page * 0x1000, KERNEL_RW);
        machine.write_phys(frame.start_address(), &page.to_le_bytes());
    }
    let touched: Vec<Vec<u64>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..THREADS)
            .map(|thread| {
                let machine = &machine;
                scope.spawn(move || {
                    let mut rng = Rng::new(thread);
                    let mut touched = Vec::new();
                    for _ in 0..ROUNDS * PAGES {
                        let page = rng.below(THREADS * PAGES);
                        let mut buf = [0; 8];
                        machine.read(virt(BASE + page * 0x1000), &mut buf).unwrap();
                        assert_eq!(u64::from_le_bytes(buf), page);
                        touched.push(page);
                        if rng.below(16) == 0 {
                            machine.flush_page(page_of(BASE + page * 0x1000));
                        }
                    }
                    touched
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    let mut distinct: Vec<u64> = touched.concat();
    distinct.sort_unstable();
    distinct.dedup();
    let stats = machine.tlb_stats();
    assert_eq!(stats.hits + stats.misses, THREADS * ROUNDS * PAGES);
    assert!(
        stats.misses >= distinct.len() as u64,
        "every page misses once"
    );
    assert!(stats.hits > 0);
    assert!(stats.page_flushes > 0);
    assert!(machine.tlb_len() <= distinct.len());
}

#[test]
fn translations_race_with_a_thread_rewriting_the_entry() {
    let machine = machine();
    let mut tables = Tables::new(&machine);
    let frames = [tables.bump.frame(), tables.bump.frame()];
    for (i, frame) in frames.iter().enumerate() {
        machine.fill_phys(frame.start_address(), 4096, i as u8 + 1);
    }
    let walked = tables.map(BASE, frames[0].start_address().as_u64(), 1, KERNEL_RW);
    let entry_addr = walked[3].start_address() + index_at(BASE, 1) as u64 * 8;
    let entry_ptr = machine.phys().phys_to_virt(entry_addr).cast::<u64>();
    // SAFETY: the entry is 8-aligned inside the machine's memory, which outlives the
    // scope below, and is only accessed atomically from here on.
    let entry = unsafe { core::sync::atomic::AtomicU64::from_ptr(entry_ptr) };
    let values = frames.map(|f| f.start_address().as_u64() | KERNEL_RW.bits());

    std::thread::scope(|scope| {
        scope.spawn(|| {
            for round in 0..2000 {
                let value = values[round % 2] * u64::from(round % 3 != 0);
                entry.store(value, core::sync::atomic::Ordering::Release);
                machine.flush_page(page_of(BASE));
            }
        });
        for _ in 0..3 {
            scope.spawn(|| {
                for _ in 0..2000 {
                    let mut buf = [0; 64];
                    match machine.read(virt(BASE + 0x100), &mut buf) {
                        Ok(()) => assert!(buf == [1; 64] || buf == [2; 64], "{buf:?}"),
                        Err(fault) => assert_eq!(fault.page_fault().unwrap().code, Code::empty()),
                    }
                }
            });
        }
    });
    assert_eq!(machine.tlb_stats().page_flushes, 2000);
}
