//! The MMU's translations: 4 KiB, 2 MiB and 1 GiB pages, data placement, agreement
//! with the `x86_64` crate's walker, permissions across levels, and accesses that
//! cross pages.

use super::*;

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

    // SAFETY: bytes the test owns: no live Rust value lives there.
    unsafe { machine.write(virt(BASE + 10), b"four k") }.unwrap();
    // SAFETY: bytes the test owns: no live Rust value lives there.
    unsafe { machine.write(virt(BASE + 2 * MIB + MIB + 7), b"two m") }.unwrap();

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
// Multi-page accesses
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
    // SAFETY: bytes the test owns: no live Rust value lives there.
    unsafe { machine.write(virt(BASE + 0x1000 - 32), &data) }.unwrap();
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

    // SAFETY: bytes the test owns: no live Rust value lives there.
    let fault = unsafe { machine.write(start, &[0xee; 16]) }
        .unwrap_err()
        .page_fault()
        .unwrap();
    assert_eq!(fault.addr, virt(BASE + 0x1000));
    assert_eq!(fault.code, Code::CAUSED_BY_WRITE);
    assert!(
        machine.frame_bytes(frame).iter().all(|&b| b == 0),
        "partial write"
    );

    // SAFETY: bytes the test owns: no live Rust value lives there.
    unsafe { machine.write_phys(frame.start_address() + 0xff8u64, &[1; 8]) };
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
    // SAFETY: bytes the test owns: no live Rust value lives there.
    let fault = unsafe { machine.write(virt(BASE + 0x10), &[0; 0x3000]) }.unwrap_err();
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

/// An access spanning pages takes interrupts once, before its first page, as one
/// instruction does: an interrupt that unmaps and flushes a page cannot land
/// between two of its pages, with the copy still going through the first page's
/// flushed translation (bytes the frame's next owner wrote read back as the old
/// mapping's).
#[test]
fn an_interrupt_cannot_flush_a_page_of_an_access_under_way() {
    for after in 0..4 {
        let machine: &'static SimMachine =
            Box::leak(Box::new(SimMachine::new(SimConfig::new(64 << 20))));
        let mut tables = Tables::new(machine);
        let first = tables.map_new(BASE, KERNEL_RW);
        tables.map_new(BASE + 0x1000, KERNEL_RW);
        let pt = *tables
            .map(BASE, first.start_address().as_u64(), 1, KERNEL_RW)
            .last()
            .unwrap();
        // SAFETY: a frame of this test's.
        unsafe { machine.fill_phys(first.start_address(), 4096, 0x11) };
        machine.cpu(0).interrupt_after(after, move || {
            table(machine, pt)[index_at(BASE, 1)].set_unused();
            machine.flush_page(page_of(BASE));
            // The frame's next owner writes it.
            // SAFETY: as above.
            unsafe { machine.fill_phys(first.start_address(), 4096, 0x6b) };
        });
        let mut back = vec![0; 8192];
        let read = machine.read(virt(BASE), &mut back);
        assert!(
            read.is_err() || back[0] == 0x11,
            "interrupt after {after} points: {read:?}, first byte {:#x}",
            back[0]
        );
        machine.cpu(0).disarm();
    }
}

/// A hand-made translation past the physical address space gives an address cut to
/// it, not a panic.
#[test]
fn a_translation_made_by_hand_past_the_physical_space_does_not_panic() {
    let made = Translation {
        frame_start: PhysAddr::new(0x000f_ffff_ffff_f000),
        page_size: 4096,
        offset: 0x1000,
        flags: KERNEL_RW,
    };
    assert_eq!(made.phys(), PhysAddr::new(0));
}
