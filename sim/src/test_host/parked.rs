//! Parked pages: a flush takes a page's access away but keeps its frame mapped, and
//! a later fault that finds the tables mapping the same frame gives it back.

use super::*;

/// The window's host mappings by its own count, and by `/proc/self/maps`.
fn mapping_counts(machine: &SimMachine) -> (usize, usize) {
    let counted = match &machine.backing {
        Backing::Host(host) => host.mappings(),
        Backing::Heap { .. } => unreachable!("a machine with a window"),
    };
    let (start, size) = machine.host_window().unwrap();
    let window = start.as_u64()..start.as_u64() + size;
    let maps = std::fs::read_to_string("/proc/self/maps").expect("procfs");
    let listed = maps
        .lines()
        .filter_map(|line| {
            let (start, end) = line.split_once(' ')?.0.split_once('-')?;
            Some(u64::from_str_radix(start, 16).ok()?..u64::from_str_radix(end, 16).ok()?)
        })
        .filter(|mapping| mapping.start < window.end && window.start < mapping.end)
        .count();
    (counted, listed)
}

fn check_counts(machine: &SimMachine, when: &str) {
    let (counted, listed) = mapping_counts(machine);
    assert_eq!(counted, listed, "host mappings {when}");
}

/// Sets the flags of `page`'s entry, keeping its frame (without `PRESENT`, the
/// page is not present, as a sparse area's `unmap_page` leaves it).
fn set_flags(machine: &SimMachine, page: Page, flags: Flags) {
    // SAFETY: the page is mapped by the test; only its flags change.
    unsafe { mapper(machine).update_flags(page, flags) }
        .unwrap()
        .ignore();
}

/// Reads `page` in a forked child: whether it died of SIGSEGV naming the page.
fn read_faults(page: Page) -> bool {
    let (status, printed) = in_child(|| {
        // SAFETY: none; the child is meant to die here.
        unsafe { ptr(page).read_volatile() };
    });
    let addr = std::format!("{:016x}", page.start_address().as_u64());
    libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSEGV && printed.contains(&addr)
}

#[test]
fn a_page_unmapped_and_mapped_again_over_its_frame_faults_between_and_works_after() {
    let machine = machine();
    let mut frames = frames_of(&machine);
    let page = window_page(&machine, 50);
    let frame = next(&mut frames);
    map(&machine, &mut frames, page, frame, RW);
    // SAFETY: mapped writable.
    unsafe { ptr(page).write_volatile(0x11) };
    check_counts(&machine, "after the fill");
    for round in 0..3u8 {
        set_flags(&machine, page, Flags::WRITABLE);
        machine.flush_page(page);
        assert!(
            !host_resident(page),
            "round {round}: no access after the flush"
        );
        assert_eq!(
            host_rights(page),
            "---s",
            "round {round}: the frame stays mapped"
        );
        check_counts(&machine, "with the page parked");
        assert!(read_faults(page), "round {round}: a use after unmap faults");
        // SAFETY: bytes the test owns: no live Rust value lives there.
        unsafe { machine.write_phys(frame.start_address() + 1, &[round]) };

        set_flags(&machine, page, RW);
        let misses = machine.tlb_stats().misses;
        // SAFETY: mapped writable again, on the same frame.
        let seen = unsafe { [ptr(page).read_volatile(), ptr(page).add(1).read_volatile()] };
        assert_eq!(seen, [0x11 + round, round], "round {round}");
        // SAFETY: as above.
        unsafe { ptr(page).write_volatile(0x12 + round) };
        assert_eq!(machine.frame_bytes(frame)[0], 0x12 + round);
        assert_eq!(machine.tlb_stats().misses, misses + 1, "one fill");
        assert_eq!(host_rights(page), "rw-s");
        check_counts(&machine, "after the page came back");
    }
    assert_eq!(machine.host_mapped_pages(), 1);
}

#[test]
fn a_parked_page_mapped_on_another_frame_shows_that_frame() {
    let machine = machine();
    let mut frames = frames_of(&machine);
    let page = window_page(&machine, 70);
    let (old, new) = (next(&mut frames), next(&mut frames));
    // SAFETY: bytes the test owns: no live Rust value lives there.
    unsafe { machine.fill_phys(old.start_address(), 4096, 1) };
    // SAFETY: bytes the test owns: no live Rust value lives there.
    unsafe { machine.fill_phys(new.start_address(), 4096, 2) };
    map(&machine, &mut frames, page, old, RW);
    // SAFETY: mapped writable.
    assert_eq!(unsafe { ptr(page).read_volatile() }, 1);
    // Unmapped altogether (the entry cleared): parked.
    mapper(&machine).unmap(page).unwrap().1.ignore();
    machine.flush_page(page);
    assert_eq!(host_rights(page), "---s");
    assert!(read_faults(page));
    map(&machine, &mut frames, page, new, RW);
    // SAFETY: mapped writable, on the new frame.
    unsafe {
        assert_eq!(ptr(page).add(9).read_volatile(), 2);
        ptr(page).write_volatile(3);
    }
    assert_eq!(machine.frame_bytes(new)[0], 3);
    assert_eq!(
        machine.frame_bytes(old)[0],
        1,
        "the old frame is not written"
    );
    check_counts(&machine, "after the new frame's fill");

    // A held page mapped on another frame without a flush, then written where it
    // was read-only: the fault maps the new frame, not the old one's rights.
    let other = next(&mut frames);
    // SAFETY: bytes the test owns: no live Rust value lives there.
    unsafe { machine.fill_phys(other.start_address(), 4096, 4) };
    set_flags(&machine, page, Flags::PRESENT);
    machine.flush_page(page);
    // SAFETY: mapped readable.
    assert_eq!(unsafe { ptr(page).read_volatile() }, 3);
    mapper(&machine).unmap(page).unwrap().1.ignore();
    map(&machine, &mut frames, page, other, RW);
    // SAFETY: mapped writable, on `other`.
    unsafe { ptr(page).add(1).write_volatile(5) };
    assert_eq!(&machine.frame_bytes(other)[..2], [4, 5]);
    assert_eq!(&machine.frame_bytes(new)[..2], [3, 2]);
    check_counts(&machine, "after the write");
}

#[test]
fn rights_a_flush_took_come_back_as_the_tables_give_them() {
    let machine = machine();
    let mut frames = frames_of(&machine);
    let page = window_page(&machine, 90);
    let frame = next(&mut frames);
    map(&machine, &mut frames, page, frame, RW);
    // SAFETY: mapped writable.
    unsafe { ptr(page).write_volatile(6) };
    set_flags(&machine, page, Flags::PRESENT);
    machine.flush_page(page);
    assert_eq!(host_rights(page), "---s");
    // SAFETY: mapped readable.
    assert_eq!(unsafe { ptr(page).read_volatile() }, 6);
    assert_eq!(host_rights(page), "r--s", "read-only, as the tables say");
    let (status, _) = in_child(|| {
        // SAFETY: none; the child is meant to die here.
        unsafe { ptr(page).write_volatile(7) };
    });
    assert!(libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSEGV);
    set_flags(&machine, page, RW);
    // SAFETY: writable again (an upgrade needs no flush).
    unsafe { ptr(page).write_volatile(8) };
    assert_eq!(machine.frame_bytes(frame)[0], 8);
    check_counts(&machine, "at the end");
}

#[test]
fn parked_pages_split_and_rejoin_their_run_as_counted() {
    // 40 pages on consecutive frames, one host mapping after one fill; some parked
    // in the middle, next to each other, and at the end.
    let machine = machine();
    let mut frames = frames_of(&machine);
    let run: Vec<PhysFrame> = (0..40).map(|_| next(&mut frames)).collect();
    assert!(run.windows(2).all(|pair| pair[1] == pair[0] + 1));
    let pages: Vec<Page> = (0..40).map(|index| window_page(&machine, index)).collect();
    for (index, (&page, &frame)) in pages.iter().zip(&run).enumerate() {
        // SAFETY: bytes the test owns: no live Rust value lives there.
        unsafe { machine.fill_phys(frame.start_address(), 4096, index as u8) };
        map(&machine, &mut frames, page, frame, RW);
    }
    // SAFETY: mapped writable.
    unsafe { ptr(pages[0]).read_volatile() };
    assert_eq!(mapping_counts(&machine), (2, 2), "the run and the rest");
    let parked = [10, 11, 20, 39];
    for index in parked {
        set_flags(&machine, pages[index], Flags::WRITABLE);
    }
    machine.flush_all();
    // 0..10, 10..12 (parked, merged), 12..20, 20, 21..39, 39, the rest.
    assert_eq!(mapping_counts(&machine), (7, 7));
    for index in parked {
        set_flags(&machine, pages[index], RW);
        // SAFETY: mapped writable again.
        assert_eq!(unsafe { ptr(pages[index]).read_volatile() }, index as u8);
        check_counts(&machine, &std::format!("after page {index} came back"));
    }
    assert_eq!(mapping_counts(&machine), (2, 2), "merged again");
}

#[test]
fn the_mapping_count_follows_random_parks_remaps_and_touches() {
    let machine = machine();
    let mut frames = frames_of(&machine);
    const PAGES: usize = 300;
    let pool: Vec<PhysFrame> = (0..PAGES + 60).map(|_| next(&mut frames)).collect();
    for (index, frame) in pool.iter().enumerate() {
        // SAFETY: bytes the test owns: no live Rust value lives there.
        unsafe { machine.fill_phys(frame.start_address(), 4096, index as u8) };
    }
    let pages: Vec<Page> = (0..PAGES as u64)
        .map(|index| window_page(&machine, index))
        .collect();
    // Per page: its frame's index in the pool, and whether it is present.
    let mut state: Vec<(usize, bool)> = vec![];
    for (index, &page) in pages.iter().enumerate() {
        map(&machine, &mut frames, page, pool[index], RW);
        state.push((index, true));
    }
    let mut rng = Rng::new(29);
    for step in 0..400 {
        let index = rng.below(PAGES as u64) as usize;
        let page = pages[index];
        match rng.below(4) {
            // Not present, frame kept.
            0 if state[index].1 => {
                set_flags(&machine, page, Flags::WRITABLE);
                state[index].1 = false;
            }
            // Present again, on its frame.
            1 if !state[index].1 => {
                set_flags(&machine, page, RW);
                state[index].1 = true;
            }
            // Another frame (the pages share the pool's frames now and then).
            2 => {
                if !state[index].1 {
                    // (The mapper unmaps present pages only.)
                    set_flags(&machine, page, RW);
                }
                mapper(&machine).unmap(page).unwrap().1.ignore();
                let frame = rng.below(pool.len() as u64) as usize;
                map(&machine, &mut frames, page, pool[frame], RW);
                state[index] = (frame, true);
            }
            _ => {}
        }
        if rng.below(3) == 0 {
            let first = rng.below(PAGES as u64) as usize;
            let last = (first + rng.below(40) as usize).min(PAGES - 1);
            machine.flush_range(Page::range(pages[first], pages[last] + 1));
        }
        if rng.below(8) == 0 {
            machine.flush_all();
        }
        // Touch a few present pages (one changed without a flush may show its old
        // frame, as on hardware: only the last reads, after a full flush, check).
        for _ in 0..4 {
            let index = rng.below(PAGES as u64) as usize;
            if state[index].1 {
                // SAFETY: mapped readable.
                unsafe { ptr(pages[index]).read_volatile() };
            }
        }
        check_counts(&machine, &std::format!("at step {step}"));
    }
    machine.flush_all();
    for (index, &page) in pages.iter().enumerate() {
        let (frame, present) = state[index];
        if present {
            // SAFETY: mapped readable.
            let seen = unsafe { ptr(page).read_volatile() };
            assert_eq!(seen, frame as u8, "page {index}");
        } else {
            assert!(!host_resident(page), "page {index} is not present");
        }
    }
    check_counts(&machine, "at the end");
}
