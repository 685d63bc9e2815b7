//! `PageTableMapper` against the `x86_64` crate's `OffsetPageTable`: the same calls
//! on two identical simulated machines give the same results and leave the same
//! bytes in memory; where `OffsetPageTable` would panic, the adapter returns the
//! `x86_64` error instead; and the adapter's tables take this crate's range calls.

use proptest::prelude::*;
use vmalloc::PAGE_SIZE;
use vmalloc::frame::MapperFrames;
use vmalloc::paging::{PageTableMapper, PageTables};
use vmalloc_sim::{Access, SimConfig, SimMachine};
use x86_64::structures::paging::mapper::CleanUp;
use x86_64::structures::paging::mapper::{
    FlagUpdateError, MapToError, MapperFlush, TranslateError, TranslateResult, UnmapError,
};
use x86_64::structures::paging::{
    Mapper, OffsetPageTable, Page, PageSize, PageTableFlags as F, PhysFrame, Size1GiB, Size2MiB,
    Size4KiB, Translate,
};
use x86_64::{PhysAddr, VirtAddr};

const MEMORY: u64 = 16 << 20;
/// Where the calls map: two 1 GiB regions in different PML4 slots, lower and upper half.
const BASES: [u64; 2] = [0x0000_1234_0000_0000, 0xffff_c900_0000_0000];

fn machine() -> SimMachine {
    SimMachine::new(SimConfig::new(MEMORY))
}

fn mapper(machine: &SimMachine) -> PageTableMapper<vmalloc_sim::SimPhys<'_>> {
    // SAFETY: the machine's tables belong to this mapper alone.
    PageTableMapper::new(unsafe { PageTables::new(machine.root(), machine.phys()) })
}

/// One call of the `Mapper` and `Translate` traits.
#[derive(Debug, Clone)]
enum Call {
    Map4k {
        page: u64,
        frame: u64,
        flags: F,
        parents: F,
    },
    Map2m {
        page: u64,
        frame: u64,
        flags: F,
        parents: F,
    },
    Unmap4k(u64),
    Unmap2m(u64),
    Update4k(u64, F),
    Update2m(u64, F),
    P4(u64, F),
    P3(u64, F),
    P2(u64, F),
    P2Of2m(u64, F),
    Page4k(u64),
    Page2m(u64),
    Translate(u64),
    Map1g {
        page: u64,
        frame: u64,
        flags: F,
        parents: F,
    },
    Unmap1g(u64),
    Update1g(u64, F),
    P3Of1g(u64, F),
    Page1g(u64),
    /// `clean_up_addr_range` from the first page to the last (inclusive).
    CleanUp(u64, u64),
    CleanUpAll,
}

/// A page address: one of a few 2 MiB chunks in each region, so calls meet.
fn page_addr() -> impl Strategy<Value = u64> {
    (0..2usize, 0..4u64, 0..6u64)
        .prop_map(|(base, chunk, page)| BASES[base] + chunk * Size2MiB::SIZE + page * PAGE_SIZE)
}

/// Leaf or upper-entry flags: always present and writable, so that no call meets
/// the cases where `OffsetPageTable` panics or ORs flags into a huge page (those
/// are tested on the adapter alone below).
fn flags() -> impl Strategy<Value = F> {
    let optional = F::USER_ACCESSIBLE
        | F::NO_EXECUTE
        | F::WRITE_THROUGH
        | F::NO_CACHE
        | F::ACCESSED
        | F::GLOBAL
        | F::BIT_9;
    any::<u64>()
        .prop_map(move |bits| F::PRESENT | F::WRITABLE | F::from_bits_truncate(bits) & optional)
}

/// Flags for `update_flags` of a 4 KiB page, which `OffsetPageTable` writes as they
/// come: a leaf may lose `PRESENT` (not zero, not present) or gain bit 7 (PAT), and
/// carries the software bits this crate gives meaning to in upper entries only
/// (`BIT_10`, `BIT_11`, `BIT_52`: a kernel's own marks in its leaves).
fn leaf_flags() -> impl Strategy<Value = F> {
    let software = F::BIT_10 | F::BIT_11 | F::BIT_52;
    (flags(), any::<bool>(), any::<bool>(), any::<u64>()).prop_map(
        move |(flags, absent, pat, bits)| {
            let flags = if absent { flags - F::PRESENT } else { flags };
            let flags = flags | F::from_bits_truncate(bits) & software;
            if pat { flags | F::HUGE_PAGE } else { flags }
        },
    )
}

fn parents() -> impl Strategy<Value = F> {
    prop_oneof![Just(F::PRESENT | F::WRITABLE), Just(F::PRESENT)]
}

fn call() -> impl Strategy<Value = Call> {
    let frame4k = (12 * 256..16 * 256u64).prop_map(|n| n * PAGE_SIZE);
    let frame2m = prop_oneof![Just(12u64 << 20), Just(14u64 << 20)];
    // The one 1 GiB frame in memory: a call that takes `HUGE_PAGE` off its entry
    // (`set_flags_p3_entry`) makes it a table both mappers then walk.
    let frame1g = Just(0u64);
    prop_oneof![
        4 => (page_addr(), frame4k, flags(), parents())
            .prop_map(|(page, frame, flags, parents)| Call::Map4k { page, frame, flags, parents }),
        2 => (page_addr(), frame2m, flags(), parents())
            .prop_map(|(page, frame, flags, parents)| Call::Map2m { page, frame, flags, parents }),
        2 => page_addr().prop_map(Call::Unmap4k),
        1 => page_addr().prop_map(Call::Unmap2m),
        2 => (page_addr(), leaf_flags()).prop_map(|(p, f)| Call::Update4k(p, f)),
        1 => (page_addr(), flags()).prop_map(|(p, f)| Call::Update2m(p, f)),
        1 => (page_addr(), flags()).prop_map(|(p, f)| Call::P4(p, f)),
        1 => (page_addr(), flags()).prop_map(|(p, f)| Call::P3(p, f)),
        1 => (page_addr(), flags()).prop_map(|(p, f)| Call::P2(p, f)),
        1 => (page_addr(), flags()).prop_map(|(p, f)| Call::P2Of2m(p, f)),
        1 => page_addr().prop_map(Call::Page4k),
        1 => page_addr().prop_map(Call::Page2m),
        2 => (page_addr(), 0..PAGE_SIZE).prop_map(|(p, o)| Call::Translate(p + o)),
        1 => (page_addr(), frame1g, flags(), parents())
            .prop_map(|(page, frame, flags, parents)| Call::Map1g { page, frame, flags, parents }),
        1 => page_addr().prop_map(Call::Unmap1g),
        1 => (page_addr(), flags()).prop_map(|(p, f)| Call::Update1g(p, f)),
        1 => (page_addr(), flags()).prop_map(|(p, f)| Call::P3Of1g(p, f)),
        1 => page_addr().prop_map(Call::Page1g),
        1 => (page_addr(), page_addr()).prop_map(|(a, b)| Call::CleanUp(a.min(b), a.max(b))),
        1 => Just(Call::CleanUpAll),
    ]
}

fn page4k(addr: u64) -> Page<Size4KiB> {
    Page::containing_address(VirtAddr::new(addr))
}

fn page2m(addr: u64) -> Page<Size2MiB> {
    Page::containing_address(VirtAddr::new(addr))
}

fn page1g(addr: u64) -> Page<Size1GiB> {
    Page::containing_address(VirtAddr::new(addr))
}

/// What a flush token says (the page), dropped without flushing: the test only
/// compares tables, and the host cannot run `invlpg`.
fn token<S: PageSize>(flush: MapperFlush<S>) -> String {
    let page = flush.page();
    flush.ignore();
    format!("flush {page:?}")
}

/// `map_to_with_table_flags` of a page of any size, as text.
///
/// # Safety
///
/// As the trait's: the tests' own machines, nothing runs on the pages mapped.
unsafe fn map_call<S: PageSize + std::fmt::Debug, M: Mapper<S>>(
    mapper: &mut M,
    page: Page<S>,
    frame: u64,
    (flags, parents): (F, F),
    frames: &mut MapperFrames<&vmalloc_sim::SimFrames>,
) -> String {
    let frame = PhysFrame::containing_address(PhysAddr::new(frame));
    // SAFETY: the caller's.
    let mapped = unsafe { mapper.map_to_with_table_flags(page, frame, flags, parents, frames) };
    format!("{:?}", mapped.map(token))
}

/// `unmap` of a page of any size, as text.
fn unmap_call<S: PageSize + std::fmt::Debug, M: Mapper<S>>(
    mapper: &mut M,
    page: Page<S>,
) -> String {
    format!("{:?}", mapper.unmap(page).map(|(f, t)| (f, token(t))))
}

/// Runs `call` on any mapper with both traits; the result, as text.
fn run<M>(mapper: &mut M, call: &Call, frames: &mut MapperFrames<&vmalloc_sim::SimFrames>) -> String
where
    M: Mapper<Size4KiB> + Mapper<Size2MiB> + Mapper<Size1GiB> + Translate + CleanUp,
{
    let all = |flush: x86_64::structures::paging::mapper::MapperFlushAll| {
        flush.ignore();
        "flush all".to_string()
    };
    // SAFETY (every call): the machines are tests' own; nothing runs on the pages
    // or frames mapped, and the frames come from the machine's allocator.
    unsafe {
        match *call {
            Call::Map4k {
                page,
                frame,
                flags,
                parents,
            } => map_call(mapper, page4k(page), frame, (flags, parents), frames),
            Call::Map2m {
                page,
                frame,
                flags,
                parents,
            } => map_call(mapper, page2m(page), frame, (flags, parents), frames),
            Call::Unmap4k(page) => unmap_call::<Size4KiB, _>(mapper, page4k(page)),
            Call::Unmap2m(page) => unmap_call::<Size2MiB, _>(mapper, page2m(page)),
            Call::Update4k(page, flags) => {
                format!("{:?}", mapper.update_flags(page4k(page), flags).map(token))
            }
            Call::Update2m(page, flags) => {
                format!("{:?}", mapper.update_flags(page2m(page), flags).map(token))
            }
            Call::P4(page, flags) => format!(
                "{:?}",
                Mapper::<Size4KiB>::set_flags_p4_entry(mapper, page4k(page), flags).map(all)
            ),
            Call::P3(page, flags) => format!(
                "{:?}",
                Mapper::<Size2MiB>::set_flags_p3_entry(mapper, page2m(page), flags).map(all)
            ),
            Call::P2(page, flags) => format!(
                "{:?}",
                Mapper::<Size4KiB>::set_flags_p2_entry(mapper, page4k(page), flags).map(all)
            ),
            Call::P2Of2m(page, flags) => format!(
                "{:?}",
                Mapper::<Size2MiB>::set_flags_p2_entry(mapper, page2m(page), flags).map(all)
            ),
            Call::Page4k(page) => format!("{:?}", mapper.translate_page(page4k(page))),
            Call::Page2m(page) => format!("{:?}", mapper.translate_page(page2m(page))),
            Call::Translate(addr) => {
                let addr = VirtAddr::new(addr);
                format!(
                    "{:?} {:?}",
                    mapper.translate(addr),
                    mapper.translate_addr(addr)
                )
            }
            Call::Map1g {
                page,
                frame,
                flags,
                parents,
            } => map_call(mapper, page1g(page), frame, (flags, parents), frames),
            Call::Unmap1g(page) => unmap_call::<Size1GiB, _>(mapper, page1g(page)),
            Call::Update1g(page, flags) => {
                format!("{:?}", mapper.update_flags(page1g(page), flags).map(token))
            }
            Call::P3Of1g(page, flags) => format!(
                "{:?} {:?}",
                Mapper::<Size1GiB>::set_flags_p3_entry(mapper, page1g(page), flags).map(all),
                Mapper::<Size1GiB>::set_flags_p2_entry(mapper, page1g(page), flags).map(all)
            ),
            Call::Page1g(page) => format!("{:?}", mapper.translate_page(page1g(page))),
            Call::CleanUp(first, last) => {
                let range = Page::range_inclusive(page4k(first), page4k(last));
                mapper.clean_up_addr_range(range, frames);
                "cleaned".to_string()
            }
            Call::CleanUpAll => {
                mapper.clean_up(frames);
                "cleaned all".to_string()
            }
        }
    }
}

/// Every byte of physical memory.
fn memory(machine: &SimMachine) -> Vec<u8> {
    let mut bytes = vec![0; MEMORY as usize];
    machine.read_phys(PhysAddr::zero(), &mut bytes);
    bytes
}

/// Runs `calls` through `OffsetPageTable` on one machine and through the adapter on
/// another; returns both transcripts and both memories.
fn both(calls: &[Call]) -> ([Vec<String>; 2], [Vec<u8>; 2]) {
    let (peer_machine, our_machine) = (machine(), machine());
    let (peer_frames, our_frames) = (peer_machine.frames(), our_machine.frames());
    // SAFETY: nothing else writes this machine's tables while the mapper lives.
    let mut peer: OffsetPageTable<'_> = unsafe { peer_machine.offset_page_table() };
    let mut ours = mapper(&our_machine);
    let peer_log = calls
        .iter()
        .map(|call| run(&mut peer, call, &mut MapperFrames(&peer_frames)))
        .collect();
    let our_log = calls
        .iter()
        .map(|call| run(&mut ours, call, &mut MapperFrames(&our_frames)))
        .collect();
    let _ = peer;
    (
        [peer_log, our_log],
        [memory(&peer_machine), memory(&our_machine)],
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn the_same_calls_give_the_same_results_and_the_same_tables(calls in prop::collection::vec(call(), 1..60)) {
        let ([peer_log, our_log], [peer_memory, our_memory]) = both(&calls);
        for (i, (peer, ours)) in peer_log.iter().zip(&our_log).enumerate() {
            prop_assert_eq!(peer, ours, "call {} of {:?}", i, calls);
        }
        prop_assert!(peer_memory == our_memory, "the tables differ after {:?}", calls);
    }
}

#[test]
fn a_sequence_through_every_call_matches_offset_page_table() {
    let base = BASES[1];
    let calls = [
        Call::Map4k {
            page: base,
            frame: 12 << 20,
            flags: F::PRESENT | F::WRITABLE,
            parents: F::PRESENT | F::WRITABLE,
        },
        Call::Map4k {
            page: base,
            frame: 13 << 20,
            flags: F::PRESENT,
            parents: F::PRESENT,
        },
        Call::Map4k {
            page: base + PAGE_SIZE,
            frame: 13 << 20,
            flags: F::PRESENT | F::NO_EXECUTE,
            parents: F::PRESENT | F::WRITABLE,
        },
        Call::Map2m {
            page: base + (2 << 20),
            frame: 14 << 20,
            flags: F::PRESENT | F::WRITABLE,
            parents: F::PRESENT | F::WRITABLE,
        },
        Call::Map2m {
            page: base,
            frame: 14 << 20,
            flags: F::PRESENT,
            parents: F::PRESENT,
        },
        Call::Map4k {
            page: base + (2 << 20),
            frame: 12 << 20,
            flags: F::PRESENT | F::WRITABLE,
            parents: F::PRESENT | F::WRITABLE,
        },
        Call::Translate(base + 0x123),
        Call::Translate(base + (2 << 20) + 0x12345),
        Call::Translate(base + (4 << 20)),
        Call::Page4k(base),
        Call::Page4k(base + (2 << 20)),
        Call::Page2m(base + (2 << 20)),
        Call::Page2m(base),
        Call::Update4k(base, F::PRESENT | F::WRITABLE | F::USER_ACCESSIBLE),
        Call::Update4k(base + (4 << 20), F::PRESENT),
        Call::Update4k(base + PAGE_SIZE, F::WRITABLE),
        Call::Translate(base + PAGE_SIZE),
        Call::Page4k(base + PAGE_SIZE),
        Call::Unmap4k(base + PAGE_SIZE),
        Call::Update4k(base + PAGE_SIZE, F::PRESENT | F::HUGE_PAGE),
        Call::Translate(base + PAGE_SIZE + 4),
        Call::Unmap4k(base + PAGE_SIZE),
        Call::Update2m(base + (2 << 20), F::PRESENT | F::WRITABLE | F::NO_EXECUTE),
        Call::Update2m(base, F::PRESENT),
        Call::P4(base, F::PRESENT | F::WRITABLE | F::USER_ACCESSIBLE),
        Call::P3(base, F::PRESENT | F::WRITABLE),
        Call::P2(base, F::PRESENT | F::WRITABLE | F::ACCESSED),
        Call::P2Of2m(base, F::PRESENT),
        Call::P4(BASES[0], F::PRESENT),
        Call::Unmap4k(base),
        Call::Unmap4k(base),
        Call::Unmap4k(base + (2 << 20)),
        Call::Unmap2m(base),
        Call::Unmap2m(base + (2 << 20)),
        Call::Unmap2m(base + (2 << 20)),
        Call::Translate(base + (2 << 20)),
    ];
    let ([peer_log, our_log], [peer_memory, our_memory]) = both(&calls);
    assert_eq!(peer_log, our_log);
    assert!(peer_memory == our_memory, "the tables differ");
    // The transcript holds each kind of answer at least once.
    let log = our_log.join("\n");
    for expected in [
        "PageAlreadyMapped",
        "ParentEntryHugePage",
        "PageNotMapped",
        "Size2MiB",
        "Size4KiB",
        "flush all",
        "NotMapped",
    ] {
        assert!(log.contains(expected), "no {expected} in\n{log}");
    }
}

#[test]
fn where_offset_page_table_panics_the_adapter_answers_with_an_error() {
    let machine = machine();
    let frames = machine.frames();
    let mut tables = MapperFrames(&frames);
    let mut mapper = mapper(&machine);
    let base = BASES[1];
    let frame = PhysFrame::<Size4KiB>::containing_address(PhysAddr::new(12 << 20));
    // SAFETY (every call): the test's own machine; nothing runs on these pages.
    unsafe {
        // A table must be made, but the parent flags would make it unwalkable.
        for parents in [F::WRITABLE, F::PRESENT | F::HUGE_PAGE, F::empty()] {
            let result = mapper.map_to_with_table_flags(
                page4k(base),
                frame,
                F::PRESENT,
                parents,
                &mut tables,
            );
            assert!(
                matches!(result, Err(MapToError::ParentEntryHugePage)),
                "{parents:?}"
            );
        }
        // Bit 7 of a 4 KiB leaf is PAT: written, not refused.
        let pat = F::PRESENT | F::HUGE_PAGE;
        mapper
            .map_to(page4k(base), frame, pat, &mut tables)
            .unwrap()
            .ignore();
        match mapper.translate(VirtAddr::new(base)) {
            TranslateResult::Mapped { flags, .. } => assert!(flags.contains(F::HUGE_PAGE)),
            other => panic!("{other:?}"),
        }
        // A read-only 2 MiB page stays read-only when a 4 KiB map meets it.
        let huge = PhysFrame::<Size2MiB>::containing_address(PhysAddr::new(14 << 20));
        mapper
            .map_to(page2m(base + (2 << 20)), huge, F::PRESENT, &mut tables)
            .unwrap()
            .ignore();
        let result = mapper.map_to(
            page4k(base + (2 << 20)),
            frame,
            F::PRESENT | F::WRITABLE,
            &mut tables,
        );
        assert!(matches!(result, Err(MapToError::ParentEntryHugePage)));
        assert_eq!(
            machine
                .translate(VirtAddr::new(base + (2 << 20)), Access::WRITE)
                .map(|_| ())
                .err()
                .map(|f| f.page_fault().is_some()),
            Some(true),
            "the 2 MiB page became writable"
        );
    }
    // A 2 MiB mapping this crate detached: not present, not zero.
    let detached = base + (4 << 20);
    let huge = PhysFrame::<Size2MiB>::containing_address(PhysAddr::new(14 << 20));
    // SAFETY: as above.
    unsafe {
        let tables = mapper.tables_mut();
        tables
            .map_huge_2m(page2m(detached), huge, F::PRESENT | F::WRITABLE, &&frames)
            .unwrap();
        tables
            .detach(Page::range(page4k(detached), page4k(detached + (2 << 20))))
            .unwrap()
            .ignore();
    }
    let before = machine.frame_bytes(PhysFrame::containing_address(PhysAddr::new(0)));
    // SAFETY: as above.
    let result = unsafe {
        mapper.map_to(
            page4k(detached),
            frame,
            F::PRESENT | F::WRITABLE,
            &mut tables,
        )
    };
    assert!(matches!(result, Err(MapToError::ParentEntryHugePage)));
    assert!(matches!(
        mapper.translate(VirtAddr::new(detached)),
        TranslateResult::NotMapped
    ));
    assert_eq!(
        before,
        machine.frame_bytes(PhysFrame::containing_address(PhysAddr::new(0)))
    );
    // A PML4 entry with the (reserved) huge bit: no panic.
    // SAFETY: as above.
    unsafe {
        Mapper::<Size4KiB>::set_flags_p4_entry(&mut mapper, page4k(base), F::PRESENT | F::HUGE_PAGE)
    }
    .unwrap()
    .ignore();
    assert!(matches!(
        mapper.translate(VirtAddr::new(base)),
        TranslateResult::InvalidFrameAddress(_)
    ));
    assert!(matches!(
        mapper.translate_page(page4k(base)),
        Err(TranslateError::ParentEntryHugePage)
    ));
    assert!(matches!(
        Mapper::<Size4KiB>::unmap(&mut mapper, page4k(base)),
        Err(UnmapError::ParentEntryHugePage)
    ));
    // SAFETY: as above.
    let update = unsafe { mapper.update_flags(page4k(base), F::PRESENT) };
    assert!(matches!(update, Err(FlagUpdateError::ParentEntryHugePage)));
}

#[test]
fn the_adapter_gains_the_range_walk_on_the_same_tables() {
    let machine = machine();
    let frames = machine.frames();
    let mut mapper = mapper(&machine);
    let start = page4k(BASES[1]);
    let pages = Page::range(start, start + 600);
    let data: Vec<PhysFrame> = (0..600)
        .map(|i| PhysFrame::containing_address(PhysAddr::new((12 << 20) + i * PAGE_SIZE)))
        .collect();
    // SAFETY: the test's own machine; nothing runs on these pages.
    unsafe {
        mapper
            .tables_mut()
            .map(pages, data.iter().copied(), F::WRITABLE, &&frames)
            .unwrap();
    }
    for (i, frame) in data.iter().enumerate() {
        assert!(matches!(mapper.translate_page(start + i as u64), Ok(f) if f == *frame));
    }
    // One page out through the trait, the rest through the range call.
    let (frame, flush) = Mapper::<Size4KiB>::unmap(&mut mapper, start + 5).unwrap();
    flush.ignore();
    assert_eq!(frame, data[5]);
    // SAFETY: as above; nothing was accessed, so no TLB holds the pages.
    let error = unsafe { mapper.tables_mut().unmap(pages, |_, _| {}) }.unwrap_err();
    assert_eq!(error, vmalloc::Error::NotMapped);
    let mut back = Vec::new();
    // SAFETY: as above.
    unsafe {
        mapper
            .tables_mut()
            .unmap(Page::range(start + 6, start + 600), |_, f| back.push(f))
    }
    .unwrap()
    .flush(&machine);
    assert_eq!(back, data[6..]);
    assert!(matches!(
        mapper.translate(VirtAddr::new(BASES[1] + 7 * PAGE_SIZE)),
        TranslateResult::NotMapped
    ));
}

/// `CleanUp` frees the empty tables the caller made (through the trait), as
/// `OffsetPageTable` does, and leaves this crate's (made by its range calls, marked
/// `CREATED`) for `free_empty_tables`, which gives them back to where they came
/// from.
#[test]
fn clean_up_frees_the_callers_empty_tables_and_leaves_this_crates() {
    let machine = machine();
    let frames = machine.frames();
    let mut mapper = mapper(&machine);
    let rw = F::PRESENT | F::WRITABLE;
    let frame = PhysFrame::containing_address(PhysAddr::new(12 << 20));
    let ours = Page::range(page4k(BASES[1]), page4k(BASES[1]) + 5);
    // SAFETY: the test's own machine; nothing runs on these pages.
    unsafe {
        mapper
            .tables_mut()
            .map(ours, [frame; 5], F::WRITABLE, &&frames)
            .unwrap();
        mapper.map_to(page4k(BASES[0]), frame, rw, &mut MapperFrames(&frames))
    }
    .unwrap()
    .ignore();
    let free = |frames: &vmalloc_sim::SimFrames| frames.stats().free;
    let mapped = free(&frames);
    // SAFETY: as above.
    unsafe { mapper.tables_mut().unmap(ours, |_, _| {}) }
        .unwrap()
        .flush(&machine);
    Mapper::<Size4KiB>::unmap(&mut mapper, page4k(BASES[0]))
        .unwrap()
        .1
        .ignore();
    // SAFETY: every table is used once, in these tables, and came from `frames`.
    unsafe { mapper.clean_up(&mut MapperFrames(&frames)) };
    assert_eq!(free(&frames), mapped + 3, "the caller's PDPT, PD and PT");
    assert!(matches!(
        mapper.translate_page(page4k(BASES[1])),
        Err(TranslateError::PageNotMapped)
    ));
    let mut freed = Vec::new();
    let (count, flush) = mapper
        .tables_mut()
        .free_empty_tables(ours, |table| freed.push(table))
        .unwrap();
    flush.flush(&machine);
    assert_eq!(
        count, 2,
        "this crate's PD and PT stayed for it (its PDPT is the root's)"
    );
}

/// A table of the caller's under one of this crate's (a page `map_to` maps next to
/// this crate's range, below the PD that range made) is freed by `clean_up`, which
/// then leaves this crate's empty tables to `free_empty_tables`: every frame comes
/// back. (`clean_up` did not walk below this crate's tables, and
/// `free_empty_tables` frees only this crate's, so both stayed for good.)
#[test]
fn clean_up_frees_the_callers_tables_below_this_crates() {
    let machine = machine();
    let frames = machine.frames();
    let mut mapper = mapper(&machine);
    let start = frames.stats().free;
    let frame = PhysFrame::containing_address(PhysAddr::new(12 << 20));
    let ours = Page::range(page4k(BASES[1]), page4k(BASES[1]) + 5);
    let theirs = page4k(BASES[1] + (2 << 20));
    // SAFETY: the test's own machine; nothing runs on these pages.
    unsafe {
        mapper
            .tables_mut()
            .map(ours, [frame; 5], F::WRITABLE, &&frames)
            .unwrap();
        let rw = F::PRESENT | F::WRITABLE;
        mapper.map_to(theirs, frame, rw, &mut MapperFrames(&frames))
    }
    .unwrap()
    .ignore();
    assert_eq!(start - frames.stats().free, 4, "PDPT, PD, our PT, their PT");
    // SAFETY: as above.
    unsafe { mapper.tables_mut().unmap(ours, |_, _| {}) }
        .unwrap()
        .flush(&machine);
    Mapper::<Size4KiB>::unmap(&mut mapper, theirs)
        .unwrap()
        .1
        .ignore();
    // SAFETY: every table is used once, in these tables, and came from `frames`.
    unsafe { mapper.clean_up(&mut MapperFrames(&frames)) };
    assert_eq!(start - frames.stats().free, 3, "their PT freed");
    let mut freed = Vec::new();
    let whole = Page::range(page4k(BASES[1]), page4k(BASES[1] + (1 << 30)));
    let (count, flush) = mapper
        .tables_mut()
        .free_empty_tables(whole, |table| freed.push(table))
        .unwrap();
    flush.flush(&machine);
    assert_eq!(count, 2, "this crate's PD and PT");
    for table in freed {
        // SAFETY: tables this crate made from `frames`, unlinked and flushed above.
        unsafe { vmalloc::FrameSource::free_frame(&&frames, table) }.unwrap();
    }
    assert_eq!(
        start - frames.stats().free,
        1,
        "the PDPT under the root's entry"
    );
}

/// Maps a page, makes its PD entry not present, maps the next page with `PRESENT`
/// parent flags and translates it: what each call returned.
fn through_a_not_present_table<M: Mapper<Size4KiB>>(
    mapper: &mut M,
    machine: &SimMachine,
) -> Vec<String> {
    let (base, rw) = (BASES[1], F::PRESENT | F::WRITABLE);
    let frame = |mib: u64| PhysFrame::<Size4KiB>::containing_address(PhysAddr::new(mib << 20));
    let frames = machine.frames();
    let mut tables = MapperFrames(&frames);
    // SAFETY (every call): the test's own machine; nothing runs on these pages.
    unsafe {
        vec![
            format!(
                "{:?}",
                mapper
                    .map_to(page4k(base), frame(12), rw, &mut tables)
                    .map(token)
            ),
            format!(
                "{:?}",
                mapper
                    .set_flags_p2_entry(page4k(base), F::WRITABLE)
                    .map(|t| t.ignore())
            ),
            format!(
                "{:?}",
                mapper
                    .map_to(page4k(base + 0x1000), frame(13), rw, &mut tables)
                    .map(token)
            ),
            format!("{:?}", mapper.translate_page(page4k(base + 0x1000))),
        ]
    }
}

/// Parent flags the adapter must not take as they come: `HUGE_PAGE` where the tables
/// exist is refused with nothing changed (it made the tables above the page huge
/// pages and answered `Ok`); a table entry made not present is walked again once the
/// parent flags make it present, as `OffsetPageTable` walks it (it was refused);
/// and `BIT_10`, this crate's `CREATED`, never hands the caller's tables to this
/// crate to free (`free_empty_tables` freed them).
#[test]
fn parent_flags_neither_break_tables_nor_give_them_away() {
    let rw = F::PRESENT | F::WRITABLE;
    let base = BASES[1];
    let frame = |mib: u64| PhysFrame::<Size4KiB>::containing_address(PhysAddr::new(mib << 20));
    // SAFETY (every call): the test's own machines; nothing runs on these pages.
    unsafe {
        // HUGE_PAGE in the parent flags, the tables made already.
        let machine = machine();
        let frames = machine.frames();
        let mut mapper = mapper(&machine);
        let mut tables = MapperFrames(&frames);
        mapper
            .map_to(page4k(base), frame(12), rw, &mut tables)
            .unwrap()
            .ignore();
        let before = memory(&machine);
        let huge = mapper.map_to_with_table_flags(
            page4k(base + 0x1000),
            frame(13),
            rw,
            rw | F::HUGE_PAGE,
            &mut tables,
        );
        assert!(
            matches!(huge, Err(MapToError::ParentEntryHugePage)),
            "{huge:?}"
        );
        assert!(memory(&machine) == before, "the tables changed");
        assert!(matches!(mapper.translate_page(page4k(base)), Ok(f) if f == frame(12)));

        // Through a not-present PD entry: both mappers walk it, the same entries.
        let (ours, peer) = (self::machine(), self::machine());
        let ours_log = through_a_not_present_table(&mut self::mapper(&ours), &ours);
        let peer_log = through_a_not_present_table(&mut peer.offset_page_table(), &peer);
        assert_eq!(ours_log, peer_log);
        assert!(memory(&ours) == memory(&peer), "different entries");
        assert!(ours_log[3].starts_with("Ok"), "{ours_log:?}");

        // BIT_10 in the parent flags: the tables stay the caller's.
        let machine = self::machine();
        let frames = machine.frames();
        let mut mapper = self::mapper(&machine);
        let parents = rw | F::BIT_10;
        mapper
            .map_to_with_table_flags(
                page4k(base),
                frame(12),
                rw,
                parents,
                &mut MapperFrames(&frames),
            )
            .unwrap()
            .ignore();
        Mapper::<Size4KiB>::unmap(&mut mapper, page4k(base))
            .unwrap()
            .1
            .ignore();
        let mut freed = Vec::new();
        let range = Page::range(page4k(base), page4k(base) + 512);
        let (_, flush) = mapper
            .tables_mut()
            .free_empty_tables(range, |table| freed.push(table))
            .unwrap();
        flush.flush(&machine);
        assert!(
            freed.is_empty(),
            "the caller's tables were freed: {freed:?}"
        );
    }
}

/// The software bits this crate gives meaning to in upper entries (`CREATED`,
/// `KEPT`), set by the caller through `parent_table_flags` or `set_flags_p*_entry`,
/// do not hand the caller's tables to this crate (which its clean-up then kept: 3
/// table frames never freed), and a caller's not-present table entry with `BIT_9`
/// is walked again as `OffsetPageTable` walks it (it was taken for a detached 2 MiB
/// mapping). Each sequence answers, frees and leaves memory as `OffsetPageTable`
/// does.
#[test]
fn the_crates_software_bits_set_by_the_caller_change_nothing_against_offset_page_table() {
    use x86_64::structures::paging::PageTableFlags as F;
    const MEMORY: u64 = 16 << 20;
    let rw = F::PRESENT | F::WRITABLE;
    /// Maps two pages (the first with `parents`), sets their PD entry to `p2`, maps
    /// the second, sets it back with `p2`'s software bits, unmaps both, cleans up.
    fn sequence<M: Mapper<Size4KiB> + CleanUp + Translate>(
        mapper: &mut M,
        machine: &SimMachine,
        parents: F,
        p2: F,
    ) -> Vec<String> {
        let frames = machine.frames();
        let page = |addr: u64| Page::<Size4KiB>::containing_address(VirtAddr::new(addr));
        let frame = |mib: u64| PhysFrame::<Size4KiB>::containing_address(PhysAddr::new(mib << 20));
        let rw = F::PRESENT | F::WRITABLE;
        let mut log = Vec::new();
        // SAFETY: the test's own machine; nothing runs on these pages.
        unsafe {
            let at = |offset: u64| page(0xffff_c900_0000_0000 + offset);
            let made = mapper.map_to_with_table_flags(
                at(0),
                frame(12),
                rw,
                parents,
                &mut MapperFrames(&frames),
            );
            log.push(format!("{:?}", made.map(|flush| flush.ignore())));
            let set = mapper.set_flags_p2_entry(at(0), p2);
            log.push(format!("{:?}", set.map(|flush| flush.ignore())));
            let made = mapper.map_to(at(0x1000), frame(13), rw, &mut MapperFrames(&frames));
            log.push(format!("{:?}", made.map(|flush| flush.ignore())));
            log.push(format!("{:?}", mapper.translate_page(at(0x1000))));
            let soft = p2 & (F::BIT_9 | F::BIT_10 | F::BIT_11);
            let set = mapper.set_flags_p2_entry(at(0), rw | soft);
            log.push(format!("{:?}", set.map(|flush| flush.ignore())));
            for offset in [0, 0x1000] {
                let gone = mapper.unmap(at(offset));
                log.push(format!(
                    "{:?}",
                    gone.map(|(frame, flush)| (frame, flush.ignore()))
                ));
            }
            let free = frames.stats().free;
            mapper.clean_up(&mut MapperFrames(&frames));
            log.push(format!("clean_up freed {}", frames.stats().free - free));
        }
        log
    }
    for (parents, p2) in [
        (rw | F::BIT_11, rw),
        (rw | F::BIT_10, rw),
        (rw, rw | F::BIT_10),
        (rw, rw | F::BIT_11),
        (rw, F::WRITABLE | F::BIT_9),
        (rw, F::WRITABLE | F::NO_EXECUTE),
    ] {
        let (peer_machine, our_machine) = (
            SimMachine::new(SimConfig::new(MEMORY)),
            SimMachine::new(SimConfig::new(MEMORY)),
        );
        // SAFETY: each machine's tables are its mapper's alone.
        let mut peer: OffsetPageTable<'_> = unsafe { peer_machine.offset_page_table() };
        // SAFETY: as above.
        let tables = unsafe { PageTables::new(our_machine.root(), our_machine.phys()) };
        let mut ours = PageTableMapper::new(tables);
        let theirs = sequence(&mut peer, &peer_machine, parents, p2);
        let mine = sequence(&mut ours, &our_machine, parents, p2);
        assert_eq!(mine, theirs, "parents {parents:?}, PD entry {p2:?}");
        let memory = |machine: &SimMachine| {
            let mut bytes = vec![0; MEMORY as usize];
            machine.read_phys(PhysAddr::zero(), &mut bytes);
            bytes
        };
        assert!(
            memory(&our_machine) == memory(&peer_machine),
            "parents {parents:?}, PD entry {p2:?}: the tables differ"
        );
    }
}
