//! Fills and the window's capacity: what a fault maps besides its page, what the
//! window counts of its host mappings, and the budgets that bound them.

use super::*;

#[test]
fn a_2mib_mapping_is_filled_in_4_kib_pieces() {
    let machine = machine();
    let mut frames = frames_of(&machine);
    let (start, _) = machine.host_window().unwrap();
    let page = Page::<Size2MiB>::from_start_address(start + (2u64 << 20)).unwrap();
    // Far above the frames the tables come from.
    let frame = PhysFrame::<Size2MiB>::from_start_address(PhysAddr::new(48 << 20)).unwrap();
    // SAFETY: the 2 MiB frame is used by nothing else in this machine.
    unsafe { mapper(&machine).map_to_with_table_flags(page, frame, RW, RW, &mut frames) }
        .unwrap()
        .ignore();
    let base: *mut u8 = page.start_address().as_mut_ptr();
    let misses = machine.tlb_stats().misses;
    for offset in [0x12345, 0, (2 << 20) - 1] {
        // SAFETY: inside the writable 2 MiB page.
        unsafe { base.add(offset).write_volatile(0x77) };
        let mut byte = [0];
        machine.read_phys(frame.start_address() + offset as u64, &mut byte);
        assert_eq!(byte[0], 0x77, "offset {offset:#x}");
    }
    // The first touch mapped its piece and every one after it in the 2 MiB, the
    // second the pieces before it: two fills, two host mappings, which the host
    // merged (consecutive pieces of the memfd).
    assert_eq!(machine.tlb_stats().misses, misses + 2);
    assert_eq!(machine.host_mapped_pages(), 512);
    let start = page.start_address().as_u64();
    assert_eq!(host_mapping_of(start), start..start + (2 << 20));
}

#[test]
fn a_fill_maps_the_pages_after_it_that_the_tables_map() {
    let machine = machine();
    let mut frames = frames_of(&machine);
    // 40 pages on consecutive frames; 10 with page 105 left out; 4 across the end
    // of the window's first 2 MiB (pages 510 to 513).
    let run: Vec<PhysFrame> = (0..40).map(|_| next(&mut frames)).collect();
    assert!(run.windows(2).all(|pair| pair[1] == pair[0] + 1));
    for (index, &frame) in run.iter().enumerate() {
        // SAFETY: bytes the test owns: no live Rust value lives there.
        unsafe { machine.fill_phys(frame.start_address(), 4096, index as u8) };
        map(
            &machine,
            &mut frames,
            window_page(&machine, index as u64),
            frame,
            RW,
        );
    }
    for index in (100..110).filter(|&index| index != 105).chain(510..514) {
        let frame = next(&mut frames);
        // SAFETY: bytes the test owns: no live Rust value lives there.
        unsafe { machine.fill_phys(frame.start_address(), 4096, index as u8) };
        map(
            &machine,
            &mut frames,
            window_page(&machine, index),
            frame,
            RW,
        );
    }
    let resident = |range: std::ops::Range<u64>| -> Vec<bool> {
        range
            .map(|index| host_resident(window_page(&machine, index)))
            .collect()
    };
    let read = |index: u64| {
        // SAFETY: the caller reads mapped pages.
        unsafe { ptr(window_page(&machine, index)).read_volatile() }
    };
    let misses = machine.tlb_stats().misses;
    assert_eq!(read(0), 0);
    // The fill mapped the 39 pages after it with it, in one host mapping:
    // consecutive frames with the same rights.
    assert_eq!(resident(0..41), [[true; 40].as_slice(), &[false]].concat());
    let first = window_page(&machine, 0).start_address().as_u64();
    assert_eq!(host_mapping_of(first), first..first + 40 * 4096);
    assert!((1..40).all(|index| read(index) == index as u8));
    assert_eq!(
        machine.tlb_stats().misses,
        misses + 1,
        "one fill, then hits"
    );

    // It stops at a page the tables do not map, and at the end of a 2 MiB.
    assert_eq!(read(100), 100);
    assert_eq!(read(510), 510u64 as u8);
    let expected = [
        true, true, true, true, true, false, false, false, false, false,
    ];
    assert_eq!(resident(100..110), expected);
    assert_eq!(resident(510..514), [true, true, false, false]);
    assert_eq!(machine.tlb_stats().misses, misses + 3);
}

#[test]
fn a_fill_maps_no_page_on_a_frame_out_of_its_run() {
    let machine = machine();
    let mut frames = frames_of(&machine);
    // Pages 200 to 203 on frames in falling order: no page's frame follows the one
    // before it.
    let mut taken: Vec<PhysFrame> = (0..4).map(|_| next(&mut frames)).collect();
    taken.reverse();
    for (i, &frame) in taken.iter().enumerate() {
        // SAFETY: bytes the test owns: no live Rust value lives there.
        unsafe { machine.fill_phys(frame.start_address(), 4096, 200 + i as u8) };
        map(
            &machine,
            &mut frames,
            window_page(&machine, 200 + i as u64),
            frame,
            RW,
        );
    }
    let read = |index: u64| {
        // SAFETY: the pages read are mapped.
        unsafe { ptr(window_page(&machine, index)).read_volatile() }
    };
    let resident = |range: std::ops::Range<u64>| -> Vec<bool> {
        range
            .map(|index| host_resident(window_page(&machine, index)))
            .collect()
    };
    let misses = machine.tlb_stats().misses;
    assert_eq!(read(200), 200);
    // Each of the others would be a host call of its own: they wait for their faults.
    assert_eq!(resident(200..204), [true, false, false, false]);
    assert!((201..204).all(|index| read(index) == index as u8));
    assert_eq!(machine.tlb_stats().misses, misses + 4, "a fill per page");
}

/// The host mapping holding `addr`, from `/proc/self/maps`.
fn host_mapping_of(addr: u64) -> std::ops::Range<u64> {
    let maps = std::fs::read_to_string("/proc/self/maps").expect("procfs");
    maps.lines()
        .find_map(|line| {
            let (start, end) = line.split_once(' ')?.0.split_once('-')?;
            let range = u64::from_str_radix(start, 16).ok()?..u64::from_str_radix(end, 16).ok()?;
            range.contains(&addr).then_some(range)
        })
        .expect("a mapping holds the address")
}

#[test]
fn pages_filled_again_and_again_keep_reaching_their_frames() {
    // More fills than the window keeps pages for: page 0 stays as it is, so the
    // holes the flushes leave behind it fill the ring, which is compacted. Each page
    // reaches the frame the tables give it at the time.
    use vmalloc::FrameSource as _;
    let machine = SimMachine::new(
        SimConfig::new(64 << 20)
            .with_holes(4)
            .with_host_window(16 << 20),
    );
    let mut frames = frames_of(&machine);
    const PAGES: u64 = 1024;
    const ROUNDS: u8 = 20;
    let pages: Vec<Page> = (0..PAGES).map(|i| window_page(&machine, 2 * i)).collect();
    let mut mapped: Vec<PhysFrame> = vec![];
    for round in 0..ROUNDS {
        for (index, &page) in pages.iter().enumerate() {
            if round > 0 && index == 0 {
                continue;
            }
            // A new frame before the old one goes back: the entry changes.
            let frame = next(&mut frames);
            // SAFETY: bytes the test owns: no live Rust value lives there.
            unsafe { machine.fill_phys(frame.start_address(), 8, round) };
            if round > 0 {
                mapper(&machine).unmap(page).unwrap().1.ignore();
                // SAFETY: frames the test took and no longer uses (or a bad free, refused).
                unsafe { frames.0.free_frame(mapped[index]) }.unwrap();
                mapped[index] = frame;
            } else {
                mapped.push(frame);
            }
            map(&machine, &mut frames, page, frame, RW);
        }
        machine.flush_all();
        for (index, &page) in pages.iter().enumerate() {
            // SAFETY: mapped writable.
            let seen = unsafe { ptr(page).read_volatile() };
            assert_eq!(seen, if index == 0 { 0 } else { round }, "page {index}");
        }
        assert_eq!(machine.host_mapped_pages(), PAGES as usize);
    }
    let fills = u64::from(ROUNDS) * (PAGES - 1) + 1;
    assert_eq!(machine.tlb_stats().misses, fills);
}

/// Host mappings that hold part of `range`, from `/proc/self/maps`.
fn host_mappings_in(range: std::ops::Range<u64>) -> usize {
    let maps = std::fs::read_to_string("/proc/self/maps").expect("procfs");
    maps.lines()
        .filter_map(|line| {
            let (start, end) = line.split_once(' ')?.0.split_once('-')?;
            Some(u64::from_str_radix(start, 16).ok()?..u64::from_str_radix(end, 16).ok()?)
        })
        .filter(|mapping| mapping.start < range.end && range.start < mapping.end)
        .count()
}

#[test]
fn the_window_knows_how_many_host_mappings_its_pages_make() {
    // What the budget counts must be what the host has: runs of consecutive frames
    // share a host mapping, scattered ones and other rights do not, and reserved
    // pages merge again when a flush drops pages.
    let machine = machine();
    let mut frames = frames_of(&machine);
    let (start, size) = machine.host_window().unwrap();
    let window = start.as_u64()..start.as_u64() + size;
    let counted = || match &machine.backing {
        Backing::Host(host) => host.mappings(),
        Backing::Heap { .. } => unreachable!("a machine with a window"),
    };
    let check = |when: &str| assert_eq!(counted(), host_mappings_in(window.clone()), "{when}");
    let pool: Vec<PhysFrame> = (0..1200).map(|_| next(&mut frames)).collect();
    let mut rng = Rng::new(5);
    let mut mapped = vec![];
    let mut frame = 0;
    let mut index = 0;
    while index < 900 {
        // A run of pages on consecutive frames (or a jump), some read-only.
        if rng.below(3) == 0 {
            frame = rng.below(pool.len() as u64 - 20) as usize;
        }
        let flags = if rng.below(5) == 0 {
            Flags::PRESENT
        } else {
            RW
        };
        for _ in 0..1 + rng.below(12) {
            let page = window_page(&machine, index);
            map(&machine, &mut frames, page, pool[frame % pool.len()], flags);
            mapped.push(page);
            (index, frame) = (index + 1, frame + 1);
        }
        // A gap the tables leave unmapped, now and then.
        index += rng.below(3) * rng.below(2);
    }
    check("before any touch");
    for &page in mapped.iter().step_by(7) {
        // SAFETY: mapped readable.
        unsafe { ptr(page).read_volatile() };
    }
    check("after touching every seventh page");
    // Some pages change frames or rights; a flush covers half of them.
    for &page in &mapped {
        if rng.below(6) != 0 {
            continue;
        }
        mapper(&machine).unmap(page).unwrap().1.ignore();
        let frame = pool[rng.below(pool.len() as u64) as usize];
        let flags = if rng.below(2) == 0 {
            Flags::PRESENT
        } else {
            RW
        };
        map(&machine, &mut frames, page, frame, flags);
    }
    machine.flush_range(Page::range(mapped[0], mapped[mapped.len() / 2]));
    check("after a range flush");
    machine.flush_all();
    check("after a full flush");
    for &page in &mapped {
        // SAFETY: mapped readable.
        unsafe { ptr(page).read_volatile() };
    }
    check("after touching every page");
    assert_eq!(machine.host_mapped_pages(), mapped.len());
}

/// A machine whose window maps `count` 2 MiB pages on 2 MiB frames above the
/// tables' frames, each touched once: the window pages it then holds, and its fills.
fn touch_huge_pages(config: SimConfig, count: u64) -> (usize, u64) {
    let machine = SimMachine::new(config);
    let mut frames = frames_of(&machine);
    let (start, _) = machine.host_window().unwrap();
    for index in 0..count {
        let page = Page::<Size2MiB>::from_start_address(start + (index << 21)).unwrap();
        let frame =
            PhysFrame::<Size2MiB>::from_start_address(PhysAddr::new((32 << 20) + (index << 21)))
                .unwrap();
        // SAFETY: the 2 MiB frame is used by nothing else in this machine.
        unsafe { mapper(&machine).map_to_with_table_flags(page, frame, RW, RW, &mut frames) }
            .unwrap()
            .ignore();
        // SAFETY: inside the writable 2 MiB page.
        unsafe {
            page.start_address()
                .as_mut_ptr::<u64>()
                .write_volatile(index)
        };
    }
    for index in 0..count {
        let mut word = [0; 8];
        machine.read_phys(PhysAddr::new((32 << 20) + (index << 21)), &mut word);
        assert_eq!(u64::from_le_bytes(word), index);
    }
    (machine.host_mapped_pages(), machine.tlb_stats().misses)
}

#[test]
fn a_window_bounded_by_mappings_holds_more_pages_than_the_page_budget() {
    // More 2 MiB pages than the page budget has 4 KiB pages: each touch maps its
    // 512 pieces with one host mapping.
    let count = host::budget() as u64 / 512 + 4;
    let config = SimConfig::new((32 << 20) + (count << 21))
        .with_holes(0)
        .with_host_window(count << 21);
    let (held, fills) = touch_huge_pages(config.with_host_window_by_mappings(), count);
    assert_eq!(held as u64, count * 512, "every page stays mapped");
    assert_eq!(fills, count, "one fill per 2 MiB");
    // (Bounded by pages, it would evict: tests/sim_scale.rs. Not here, where it
    // would take the page budget from the tests running beside this one.)
}
