//! The TLB: stale data until a flush, re-walks on permission faults, and what each
//! flush drops.

use super::*;

#[test]
fn forgotten_flush_reads_stale_data() {
    let machine = machine();
    let mut tables = Tables::new(&machine);
    let frame = tables.bump.frame();
    let walked = tables.map(BASE, frame.start_address().as_u64(), 1, KERNEL_RW);
    // SAFETY: bytes the test owns: no live Rust value lives there.
    unsafe { machine.write_phys(frame.start_address(), b"old data") };

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

/// A CPU that comes back online starts with an empty TLB, as a CPU that boots: what
/// a thread running as it cached while it was offline (where no shootdown reaches
/// it) is gone, so it cannot read a page unmapped and flushed meanwhile.
#[test]
fn a_cpu_coming_back_online_forgets_what_it_cached_offline() {
    let machine = SimMachine::new(SimConfig::default().with_cpus(2));
    let mut tables = Tables::new(&machine);
    let walked = tables.map(BASE, 6 * MIB, 1, KERNEL_RW);
    let cpu = machine.cpu(1);
    cpu.go_offline();
    let mut buf = [0; 8];
    cpu.read(virt(BASE), &mut buf).unwrap();
    assert!(cpu.cached(virt(BASE)).is_some());
    // Unmapped and flushed on CPU 0, the only CPU online.
    tables.clear(walked[3], BASE, 1);
    machine.flush_page(page_of(BASE));
    cpu.go_online();
    assert!(cpu.cached(virt(BASE)).is_none());
    assert!(
        cpu.read(virt(BASE), &mut buf).is_err(),
        "a stale translation"
    );
}

/// A page fault drops what that address's walk would use, and no more: a page table
/// freed (its PD entry cleared) without a flush is still walked, through the cached
/// PD entry, after a fault at an unrelated address (a guard-page probe). The fault
/// dropped the whole paging-structure cache, hiding the missing flush.
#[test]
fn an_unrelated_fault_keeps_a_stale_paging_structure_entry() {
    let machine = machine();
    let mut tables = Tables::new(&machine);
    let first = tables.map_new(BASE, KERNEL_RW);
    let next = BASE + 0x1000;
    let frame = tables.bump.frame().start_address().as_u64();
    let walked = tables.map(next, frame, 1, KERNEL_RW);
    // SAFETY: bytes the test owns: no live Rust value lives there.
    unsafe { machine.write_phys(first.start_address(), b"cached!!") };
    let mut buf = [0; 8];
    machine.read(virt(BASE), &mut buf).unwrap();
    // The page table is freed: its PD entry cleared, and no flush.
    tables.clear(walked[2], next, 2);
    let unrelated = BASE + (1 << 30);
    assert!(machine.read(virt(unrelated), &mut buf).is_err());
    assert!(
        machine.read(virt(next), &mut buf).is_ok(),
        "the cached PD entry still reaches the freed table"
    );
    // A flush drops it (and the page's own entry, filled by that read).
    machine.flush_page(page_of(next));
    assert!(machine.read(virt(next), &mut buf).is_err());
}
