//! The page faults the MMU raises and their error codes: protection, user,
//! fetch, not-present, reserved bits and non-canonical addresses.

use super::*;

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
    // SAFETY: bytes the test owns: no live Rust value lives there.
    unsafe { machine.write_phys(code_page.start_address(), &[0x90, 0xc3]) };
    // SAFETY: bytes the test owns: no live Rust value lives there.
    unsafe { machine.write_phys(frame.start_address(), &[0xcc]) };

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
    // SAFETY: bytes the test owns: no live Rust value lives there.
    assert!(unsafe { machine.write(virt(last_page + 0xff0), &[1; 32]) }.is_err());
    assert!(machine.frame_bytes(frame).iter().all(|&b| b == 0));
}
