//! Small areas from per-CPU blocks (`VmallocConfig::cpu_caches`): they behave as other
//! `vmalloc` areas, are never reused before the flush that covers them, give every
//! frame back, and running out empties every CPU's cache before failing.

use std::ptr::NonNull;
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use vmalloc::vmalloc::blocks::MAX_BLOCK_PAGES;
use vmalloc::vmalloc::{Prot, VmOptions, VmallocStats};
use vmalloc::{Error, FrameSource, TlbFlush, Vmalloc, VmallocConfig};
use vmalloc_sim::scenarios::{self, manager_with as manager};
use vmalloc_sim::{
    Access, DEADLOCK_LIMIT, Rng, SimConfig, SimFrames, SimMachine, SimPhys, watchdog,
};
use x86_64::structures::idt::PageFaultErrorCode;
use x86_64::structures::paging::PhysFrame;
use x86_64::{PhysAddr, VirtAddr};

type Tlb = scenarios::SmpTlb;
type Manager<T> = Vmalloc<&'static SimFrames, SimPhys<'static>, T>;

const PAGE: usize = 4096;

fn cached() -> VmallocConfig {
    VmallocConfig {
        cpu_caches: true,
        ..VmallocConfig::default()
    }
}

/// A machine with `cpus` CPUs, its frames and a shootdown over it.
fn smp_machine(cpus: usize) -> (&'static SimMachine, &'static SimFrames, &'static Tlb) {
    scenarios::smp_machine(
        SimConfig::new(64 << 20)
            .with_cpus(cpus)
            .with_scatter_seed(9),
    )
}

fn addr(ptr: NonNull<u8>) -> VirtAddr {
    VirtAddr::from_ptr(ptr.as_ptr())
}

/// The zone's range, from the listing.
fn zone<T: TlbFlush>(vm: &Manager<T>) -> std::ops::Range<u64> {
    let zone = vm
        .areas()
        .find(|area| area.tag == "vmap_blocks")
        .expect("the zone is listed");
    zone.start.as_u64()..zone.start.as_u64() + zone.span
}

/// Every frame is free, data, a page table, waiting for a flush (on the purge list
/// or a CPU's lazy list), cached, or bookkeeping.
fn assert_frames_conserved(stats: &VmallocStats, frames: &SimFrames) {
    let accounted = frames.stats().free
        + stats.data_frames
        + stats.page_table_frames
        + stats.pending_purge_frames
        + stats.cached_frames
        + stats.bookkeeping_frames;
    assert_eq!(accounted, frames.stats().total, "{stats:?}");
}

#[test]
fn a_small_area_comes_from_a_block_and_answers_every_call_as_an_area() {
    let (machine, frames, tlb) = smp_machine(1);
    let vm = manager(machine, frames, tlb, cached());
    let zone = zone(&vm);
    assert_eq!(vm.stats().block_zone_bytes, zone.end - zone.start);
    let ptr = vm.vmalloc(2 * PAGE).unwrap();
    let start = addr(ptr);
    assert!(zone.contains(&start.as_u64()), "{start:?} is in the zone");
    assert_eq!(vm.stats().block_areas, 1);

    machine.write(start + 4000u64, b"across a page").unwrap();
    let mut back = [0; 13];
    machine.read(start + 4000u64, &mut back).unwrap();
    assert_eq!(&back, b"across a page");
    let frame = vm.vmalloc_to_frame(start + PAGE as u64).unwrap();
    let translated = machine
        .translate(start + PAGE as u64, Access::READ)
        .unwrap();
    assert_eq!(
        translated.phys().align_down(PAGE as u64),
        frame.start_address()
    );

    let area = vm.find_vm_area(start + 5u64).unwrap();
    assert_eq!(
        (area.start, area.size, area.span),
        (start, 2 * PAGE as u64, 3 * PAGE as u64)
    );
    assert_eq!(
        vm.find_vm_area(start + 2 * PAGE as u64).unwrap().start,
        start,
        "the guard page is the area's"
    );
    assert!(
        machine.read(start + 2 * PAGE as u64, &mut back).is_err(),
        "the guard page faults"
    );

    // Every call that refuses a pointer refuses this one as it would any area.
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    assert_eq!(
        unsafe { vm.vfree(ptr.as_ptr().wrapping_add(8)) },
        Err(Error::InteriorPointer)
    );
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    assert_eq!(
        unsafe { vm.vfree(ptr.as_ptr().wrapping_add(PAGE)) },
        Err(Error::InteriorPointer)
    );
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    assert_eq!(
        unsafe { vm.vfree(ptr.as_ptr().wrapping_add(2 * PAGE)) },
        Err(Error::NotAllocated)
    );
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    assert_eq!(
        unsafe { vm.vfree(ptr.as_ptr().wrapping_add(64 * PAGE)) },
        Err(Error::NotAllocated)
    );
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    assert_eq!(
        unsafe { vm.vunmap(ptr.as_ptr(), |_| {}) },
        Err(Error::WrongKind)
    );
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    assert_eq!(unsafe { vm.iounmap(ptr.as_ptr()) }, Err(Error::WrongKind));
    assert_eq!(vm.populate(ptr.as_ptr(), PAGE), Err(Error::WrongKind));
    assert_eq!(vm.stats().block_areas, 1, "nothing changed");

    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    unsafe { vm.vfree(ptr.as_ptr()) }.unwrap();
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    assert_eq!(
        unsafe { vm.vfree(ptr.as_ptr()) },
        Err(Error::NotAllocated),
        "a double free"
    );
    assert_eq!(vm.vmalloc_to_frame(start), Err(Error::NotMapped));
    assert_eq!(vm.find_vm_area(start), None);
    let site = vm
        .diagnose_fault(start + 16u64, PageFaultErrorCode::empty())
        .site;
    assert!(
        matches!(site, vmalloc::vmalloc::FaultSite::Freed { offset: 16, .. }),
        "a use after free: {site:?}"
    );
    let stats = vm.stats();
    assert_eq!((stats.block_areas, stats.data_frames), (0, 0));
    assert_eq!(
        stats.cached_pending_frames, 2,
        "its frames wait for the flush"
    );
    assert_frames_conserved(&stats, frames);
    vm.purge();
    assert_eq!(
        vm.stats().cached_pending_frames,
        0,
        "a purge flushes the CPU's list"
    );
    assert!(machine.read(start, &mut back).is_err(), "unmapped");
    let site = vm.diagnose_fault(start, PageFaultErrorCode::empty()).site;
    assert_eq!(
        site,
        vmalloc::vmalloc::FaultSite::Unmapped,
        "flushed and forgotten"
    );
}

#[test]
fn labelled_aligned_unguarded_and_large_requests_take_the_locked_path() {
    let (machine, frames, tlb) = smp_machine(1);
    let vm = manager(machine, frames, tlb, cached());
    let zone = zone(&vm);
    let outside = |ptr: NonNull<u8>| !zone.contains(&(ptr.as_ptr() as u64));
    let labelled = VmOptions {
        tag: "ring",
        ..VmOptions::default()
    };
    let aligned = VmOptions {
        align: 4 * PAGE as u64,
        ..VmOptions::default()
    };
    let unguarded = VmOptions {
        flags: vmalloc::vmalloc::VmFlags::NO_GUARD,
        ..VmOptions::default()
    };
    for options in [labelled, aligned, unguarded] {
        let ptr = vm.vmalloc_with(PAGE, &options).unwrap();
        assert!(outside(ptr), "{options:?}");
        // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
        unsafe { vm.vfree(ptr.as_ptr()) }.unwrap();
    }
    let largest = vm.vmalloc(MAX_BLOCK_PAGES as usize * PAGE).unwrap();
    assert!(!outside(largest));
    let larger = vm.vmalloc((MAX_BLOCK_PAGES as usize + 1) * PAGE).unwrap();
    assert!(outside(larger));
    assert_eq!(vm.stats().block_areas, 1);
}

#[test]
fn vrealloc_set_prot_and_fault_diagnosis_work_on_small_areas() {
    let (machine, frames, tlb) = smp_machine(1);
    let vm = manager(machine, frames, tlb, cached());
    let ptr = vm.vzalloc(PAGE).unwrap();
    machine.write(addr(ptr), b"kept").unwrap();
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    let grown = unsafe { vm.vrealloc(ptr.as_ptr(), 3 * PAGE) }.unwrap();
    let mut back = [0xff; 4];
    machine.read(addr(grown), &mut back).unwrap();
    assert_eq!(&back, b"kept", "the contents moved");
    machine
        .read(addr(grown) + 2 * PAGE as u64 + 100, &mut back)
        .unwrap();
    assert_eq!(back, [0; 4], "a zeroed area grows zeroed");
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    assert_eq!(
        unsafe { vm.vfree(ptr.as_ptr()) },
        Err(Error::NotAllocated),
        "the old area is gone"
    );
    assert_eq!(vm.stats().block_areas, 1);

    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    unsafe { vm.set_prot(grown.as_ptr(), Prot::READ) }.unwrap();
    assert!(machine.write(addr(grown), b"x").is_err(), "read-only now");
    machine.read(addr(grown), &mut back).unwrap();
    let write = PageFaultErrorCode::CAUSED_BY_WRITE | PageFaultErrorCode::PROTECTION_VIOLATION;
    let site = vm.diagnose_fault(addr(grown) + 8u64, write).site;
    assert!(
        matches!(
            site,
            vmalloc::vmalloc::FaultSite::Area {
                offset: 8,
                broke_protection: true,
                ..
            }
        ),
        "{site:?}"
    );
    let past = vm.diagnose_fault(addr(grown) + 3 * PAGE as u64, write).site;
    assert!(
        matches!(past, vmalloc::vmalloc::FaultSite::Guard { past_end: 0, .. }),
        "{past:?}"
    );
    // A read-only area keeps its rights when it moves.
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    let moved = unsafe { vm.vrealloc(grown.as_ptr(), PAGE) }.unwrap();
    assert!(machine.write(addr(moved), b"x").is_err());
    machine.read(addr(moved), &mut back).unwrap();
    assert_eq!(&back, b"kept");
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    assert_eq!(
        unsafe { vm.vrealloc(moved.as_ptr().wrapping_add(1), PAGE) },
        Err(Error::InteriorPointer)
    );
}

#[test]
fn vfree_atomic_of_a_small_area_is_done_by_the_next_call() {
    let (machine, frames, tlb) = smp_machine(1);
    let vm = manager(machine, frames, tlb, cached());
    let ptr = vm.vmalloc(PAGE).unwrap();
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    unsafe { vm.vfree_atomic(ptr.as_ptr()) }.unwrap();
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    unsafe { vm.vfree_atomic(ptr.as_ptr().wrapping_add(PAGE)) }.unwrap();
    assert!(machine.read(addr(ptr), &mut [0; 1]).is_ok(), "queued only");
    // The next call that takes the lock frees the area and refuses the guard page.
    vm.purge();
    let stats = vm.stats();
    assert_eq!((stats.block_areas, stats.deferred_refused), (0, 1));
    assert!(machine.read(addr(ptr), &mut [0; 1]).is_err());
    assert_frames_conserved(&vm.stats(), frames);
}

/// CPU 1 caches a translation of a small area; CPU 0 frees it and makes small areas
/// until one gets its frame back, then writes there; CPU 1 reads the old address
/// again. Returns what it read, or `None` if it faulted.
fn stale_read_after_reuse<T: TlbFlush + Sync>(
    machine: &'static SimMachine,
    frames: &'static SimFrames,
    tlb: T,
) -> Option<[u8; 8]> {
    let vm = manager(machine, frames, tlb, cached());
    let old = addr(vm.vmalloc(PAGE).unwrap());
    machine.write(old, b"OLD-DATA").unwrap();
    let (seen, new) = machine.read_again_after(1, old, || {
        let frame = vm.vmalloc_to_frame(old).unwrap();
        // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
        unsafe { vm.vfree(old.as_mut_ptr()) }.unwrap();
        // Small areas come and go until one gets the frame back.
        let new = (0..10_000)
            .find_map(|_| {
                let new = vm.vmalloc(PAGE).unwrap();
                assert_ne!(addr(new), old, "the range is not reused before the flush");
                if vm.vmalloc_to_frame(addr(new)).unwrap() == frame {
                    return Some(new);
                }
                // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
                unsafe { vm.vfree(new.as_ptr()) }.unwrap();
                None
            })
            .expect("the frame comes back");
        machine.write(addr(new), b"NEWDATA!").unwrap();
        new
    });
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    unsafe { vm.vfree(new.as_ptr()) }.unwrap();
    seen
}

#[test]
fn a_small_areas_frame_is_reused_only_after_every_cpu_dropped_its_translation() {
    watchdog(
        "a_small_areas_frame_is_reused_only_after_every_cpu_dropped_its_translation",
        DEADLOCK_LIMIT,
        || {
            let (machine, frames, tlb) = smp_machine(2);
            let seen = stale_read_after_reuse(machine, frames, tlb);
            assert_eq!(seen, None, "CPU 1 faults on the freed address");
        },
    );
}

#[test]
fn a_local_only_flush_is_caught_reading_the_reused_frame_of_a_small_area() {
    watchdog(
        "a_local_only_flush_is_caught_reading_the_reused_frame_of_a_small_area",
        DEADLOCK_LIMIT,
        || {
            // The negative control: the same steps with a flush that only reaches CPU 0.
            let (machine, frames, _) = smp_machine(2);
            assert_eq!(
                stale_read_after_reuse(machine, frames, machine),
                Some(*b"NEWDATA!"),
                "without a shootdown CPU 1 reads the new owner's data"
            );
        },
    );
}

#[test]
fn running_out_empties_every_cpus_cache_before_failing() {
    watchdog(
        "running_out_empties_every_cpus_cache_before_failing",
        DEADLOCK_LIMIT,
        || {
            let (machine, frames, tlb) = smp_machine(4);
            let vm = manager(machine, frames, tlb, cached());
            // Each CPU leaves frames in its cache and freed areas on its lazy list.
            machine.on_every_cpu(|_| {
                let areas: Vec<_> = (0..8).map(|_| vm.vmalloc(PAGE).unwrap()).collect();
                // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
                areas
                    .iter()
                    .for_each(|ptr| unsafe { vm.vfree(ptr.as_ptr()) }.unwrap());
            });
            let stats = vm.stats();
            assert!(
                stats.cached_frames > 0 && stats.cached_pending_frames > 0,
                "{stats:?}"
            );
            let in_caches = stats.cached_frames + stats.cached_pending_frames;

            // Hold every free frame: only the caches have any.
            let mut held =
                vec![PhysFrame::containing_address(PhysAddr::zero()); frames.stats().free as usize];
            assert_eq!(frames.alloc_frames(&mut held), held.len());
            // A labelled area takes the locked path, which finds no frame, empties every
            // CPU's cache, and succeeds with their frames.
            let labelled = VmOptions {
                tag: "needs the caches",
                ..VmOptions::default()
            };
            let wanted = (in_caches as usize - 8) * PAGE;
            let ptr = vm.vmalloc_with(wanted, &labelled).unwrap();
            let stats = vm.stats();
            assert_eq!(
                (stats.cached_frames, stats.cached_pending_frames),
                (0, 0),
                "{stats:?}"
            );
            // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
            unsafe { vm.vfree(ptr.as_ptr()) }.unwrap();
            vm.purge();

            // With every cache empty, a request too large fails and changes nothing.
            vm.drain_cpu_caches();
            let before = (vm.stats(), frames.stats().free);
            assert_eq!(
                vm.vmalloc_with(4 * wanted, &labelled),
                Err(Error::OutOfFrames)
            );
            assert_eq!((vm.stats(), frames.stats().free), before);
            frames.free_frames(&held).unwrap();
            assert_frames_conserved(&vm.stats(), frames);
        },
    );
}

#[test]
fn four_cpus_free_each_others_small_areas_and_every_frame_comes_back() {
    watchdog(
        "four_cpus_free_each_others_small_areas_and_every_frame_comes_back",
        DEADLOCK_LIMIT,
        || {
            let (machine, frames, tlb) = smp_machine(4);
            let start = frames.stats().free;
            let vm = manager(machine, frames, tlb, cached());
            let shared: Mutex<Vec<(usize, usize, u8)>> = Mutex::new(Vec::new());
            machine.on_every_cpu(|cpu| {
                let mut rng = Rng::new(cpu.index() as u64 + 11);
                for round in 0..400usize {
                    let tag = (cpu.index() * 64 + round % 64) as u8;
                    if rng.below(2) == 0 {
                        let pages = 1 + rng.below(MAX_BLOCK_PAGES) as usize;
                        let ptr = vm.vmalloc(pages * PAGE).unwrap();
                        for page in 0..pages {
                            cpu.write(addr(ptr) + (page * PAGE) as u64, &[tag; 16])
                                .unwrap();
                        }
                        shared
                            .lock()
                            .unwrap()
                            .push((ptr.as_ptr() as usize, pages, tag));
                    } else {
                        let taken = {
                            let mut shared = shared.lock().unwrap();
                            let len = shared.len() as u64;
                            (len > 0).then(|| shared.swap_remove(rng.below(len) as usize))
                        };
                        // Often another CPU's area, in another CPU's block.
                        if let Some((ptr, pages, tag)) = taken {
                            let ptr = NonNull::new(ptr as *mut u8).unwrap();
                            for page in 0..pages {
                                let mut back = [0; 16];
                                cpu.read(addr(ptr) + (page * PAGE) as u64, &mut back)
                                    .unwrap();
                                assert_eq!(back, [tag; 16], "no other area shares its frames");
                            }
                            // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
                            unsafe { vm.vfree(ptr.as_ptr()) }.unwrap();
                        }
                    }
                }
            });
            let left: Vec<_> = shared.into_inner().unwrap();
            let stats = vm.stats();
            assert_eq!(stats.block_areas, left.len() as u64);
            assert_frames_conserved(&stats, frames);
            for &(ptr, ..) in &left[..left.len() / 2] {
                // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
                unsafe { vm.vfree(ptr as *mut u8) }.unwrap();
            }
            vm.purge();
            assert_eq!(vm.stats().cached_pending_frames, 0);
            // The rest leak into the manager's teardown, which gives them back too.
            drop(vm);
            assert_eq!(frames.stats().free, start, "every frame is back");
            assert!(tlb.stats().ipis > 0, "the CPUs were shot at");
        },
    );
}

/// The machine's flushes, counted.
struct Counted {
    machine: &'static SimMachine,
    flushes: std::sync::atomic::AtomicU64,
}

impl TlbFlush for &Counted {
    fn flush_page(&self, page: x86_64::structures::paging::Page) {
        self.flushes.fetch_add(1, Ordering::Relaxed);
        self.machine.flush_page(page);
    }
    fn flush_all(&self) {
        self.flushes.fetch_add(1, Ordering::Relaxed);
        self.machine.flush_all();
    }
    fn cpus(&self) -> Option<&dyn vmalloc::smp::Cpus> {
        self.machine.cpus()
    }
}

#[test]
fn a_freed_range_comes_back_only_after_a_flush_and_then_does() {
    let (machine, frames, _) = smp_machine(1);
    let tlb: &'static Counted = Box::leak(Box::new(Counted {
        machine,
        flushes: 0.into(),
    }));
    let vm = manager(machine, frames, tlb, cached());
    let first = vm.vmalloc(PAGE).unwrap();
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    unsafe { vm.vfree(first.as_ptr()) }.unwrap();
    let mut live = Vec::new();
    let mut reused = false;
    for round in 0..1200 {
        if round == 600 {
            vm.purge();
        }
        let ptr = vm.vmalloc(PAGE).unwrap();
        live.push(ptr);
        if ptr == first {
            // A full block may have flushed its CPU's lazy list to make room.
            assert!(
                tlb.flushes.load(Ordering::Relaxed) > 0,
                "reused before any flush"
            );
            reused = true;
            break;
        }
    }
    assert!(reused, "a flushed range is carved again");
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    live.iter()
        .for_each(|ptr| unsafe { vm.vfree(ptr.as_ptr()) }.unwrap());
}

#[test]
fn listings_show_the_zone_and_every_small_area_with_its_caller_in_address_order() {
    let (machine, frames, tlb) = smp_machine(1);
    let vm = manager(machine, frames, tlb, cached());
    let zone = zone(&vm);
    let labelled = VmOptions {
        tag: "big",
        ..VmOptions::default()
    };
    let big = vm.vmalloc_with(40 * PAGE, &labelled).unwrap();
    let small: Vec<_> = (0..40)
        .map(|i| vm.vmalloc((1 + i % 3) * PAGE).unwrap())
        .collect();
    let listed: Vec<_> = vm.areas().collect();
    // The zone, every small area, and the labelled one; listed in batches, so the
    // walk through the zone resumes in the middle of it.
    assert_eq!(listed.len(), 2 + small.len());
    // The zone's line comes first, at the start of its first area.
    assert!(listed.windows(2).all(|pair| pair[0].start < pair[1].start
        || (pair[0].tag == "vmap_blocks" && pair[0].start == pair[1].start)));
    assert_eq!(
        listed
            .iter()
            .filter(|area| area.tag == "vmap_blocks")
            .count(),
        1
    );
    for ptr in &small {
        let area = listed
            .iter()
            .find(|area| area.start == addr(*ptr) && area.tag.is_empty())
            .unwrap();
        assert!(zone.contains(&area.start.as_u64()));
        assert!(area.caller.unwrap().file().ends_with("blocks.rs"), "{area}");
        assert_eq!(vm.find_vm_area(area.start), Some(*area));
    }
    assert!(listed.iter().any(|area| area.start == addr(big)));
    let info = format!("{}", vm.info());
    assert_eq!(
        info.lines()
            .filter(|line| line.ends_with(" vmalloc"))
            .count(),
        41
    );
    assert!(format!("{}", vm.stats()).contains("BlockAreas:             40"));
}

/// With only `k` frames free, for every `k` until it succeeds, a small area is made
/// on a CPU whose cache, block and descriptor do not exist yet. Each failure takes
/// no frame but those of the per-CPU structures it made, which stay for the
/// manager's life and are counted as bookkeeping and page tables; nothing else
/// changes.
#[test]
fn running_out_while_making_the_first_small_area_keeps_only_the_per_cpu_structures() {
    let (machine, frames, tlb) = smp_machine(1);
    for k in 0.. {
        let vm = manager(machine, frames, tlb, cached());
        let before = (vm.stats(), vm.areas().collect::<Vec<_>>());
        let mut held =
            vec![PhysFrame::containing_address(PhysAddr::zero()); frames.stats().free as usize - k];
        assert_eq!(frames.alloc_frames(&mut held), held.len());
        let result = vm.vmalloc(3 * PAGE);
        let after = vm.stats();
        frames.free_frames(&held).unwrap();
        match result {
            Err(error) => {
                assert_eq!(error, Error::OutOfFrames, "{k} frames free");
                assert_eq!(vm.areas().collect::<Vec<_>>(), before.1, "{k} frames free");
                let structures = (after.bookkeeping_frames - before.0.bookkeeping_frames)
                    + (after.page_table_frames - before.0.page_table_frames);
                assert_eq!(
                    VmallocStats {
                        bookkeeping_frames: before.0.bookkeeping_frames,
                        page_table_frames: before.0.page_table_frames,
                        bookkeeping_free_slots: before.0.bookkeeping_free_slots,
                        ..after
                    },
                    before.0,
                    "{k} frames free"
                );
                assert!(structures <= k as u64, "{k} frames free");
                assert_frames_conserved(&after, frames);
            }
            Ok(ptr) => {
                assert!(k > 0);
                // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
                unsafe { vm.vfree(ptr.as_ptr()) }.unwrap();
                break;
            }
        }
    }
}

/// An area of `pages` pages: from a per-CPU block up to `MAX_BLOCK_PAGES`, from the
/// locked path above.
fn area_of(vm: &Manager<impl TlbFlush>, pages: usize) -> NonNull<u8> {
    let ptr = vm.vmalloc(pages * PAGE).unwrap();
    let in_zone = zone(vm).contains(&(ptr.as_ptr() as u64));
    assert_eq!(in_zone, pages as u64 <= MAX_BLOCK_PAGES, "{pages} pages");
    ptr
}

#[test]
fn eager_mode_flushes_and_returns_a_block_areas_frames_at_once_as_a_tree_areas() {
    let (machine, frames, tlb) = smp_machine(1);
    let config = VmallocConfig {
        eager: true,
        ..cached()
    };
    let vm = manager(machine, frames, tlb, config);
    for pages in [2, 20] {
        let ptr = area_of(&vm, pages);
        machine.write(addr(ptr), b"cached").unwrap();
        let before = vm.stats();
        // SAFETY: not used again (the reads below go through the MMU).
        unsafe { vm.vfree(ptr.as_ptr()) }.unwrap();
        let mut back = [0; 6];
        assert!(
            machine.read(addr(ptr), &mut back).is_err(),
            "{pages} pages: the calling CPU no longer reads the page"
        );
        let stats = vm.stats();
        assert_eq!(
            stats.pending_purge_frames, 0,
            "{pages} pages: nothing waits"
        );
        assert_eq!(stats.data_frames, before.data_frames - pages as u64);
        assert_frames_conserved(&stats, frames);
    }
}

#[test]
fn a_shrinking_vrealloc_returns_after_every_cpu_dropped_the_pages_for_block_and_tree_areas() {
    watchdog("shrinking vrealloc", DEADLOCK_LIMIT, shrink_on_two_cpus);
}

fn shrink_on_two_cpus() {
    let (machine, frames, tlb) = smp_machine(2);
    let vm = manager(machine, frames, tlb, cached());
    for pages in [8, 24] {
        // The reader leaves the online set when it is done: back for this round.
        machine.cpu(1).go_online();
        let ptr = area_of(&vm, pages);
        let last = addr(ptr) + ((pages - 1) * PAGE) as u64;
        machine.write(last, b"old page").unwrap();
        // CPU 1 caches the last page; CPU 0 shrinks the area to two pages.
        let (seen, shrunk) = machine.read_again_after(1, last, || {
            // SAFETY: nothing keeps a reference into the dropped pages.
            unsafe { vm.vrealloc(ptr.as_ptr(), 2 * PAGE) }.unwrap()
        });
        assert_eq!(shrunk, ptr, "{pages} pages: shrunk in place");
        assert_eq!(
            seen, None,
            "{pages} pages: CPU 1 dropped the page before it returned"
        );
        let mut back = [0; 8];
        assert!(
            machine.read(last, &mut back).is_err(),
            "{pages} pages: so did CPU 0"
        );
        let mut kept = [0; 8];
        machine.write(addr(ptr) + PAGE as u64, b"page one").unwrap();
        machine.read(addr(ptr) + PAGE as u64, &mut kept).unwrap();
        assert_eq!(&kept, b"page one");
        // SAFETY: not used again.
        unsafe { vm.vfree(ptr.as_ptr()) }.unwrap();
    }
    vm.purge();
    assert_eq!(vm.stats().data_frames, 0);
    assert_frames_conserved(&vm.stats(), frames);
}

#[test]
fn a_shrunk_block_area_reads_zero_where_it_grows_back_and_its_freed_pages_are_reused() {
    let (machine, frames, tlb) = smp_machine(1);
    let vm = manager(machine, frames, tlb, cached());
    let ptr = vm.vzalloc(6 * PAGE).unwrap();
    machine.write(addr(ptr), &[0xee; 6 * PAGE]).unwrap();
    // SAFETY: the old pages past the new size are not used again.
    let shrunk = unsafe { vm.vrealloc(ptr.as_ptr(), PAGE + 100) }.unwrap();
    assert_eq!(shrunk, ptr);
    let mut tail = [0xff; 100];
    machine
        .read(addr(ptr) + (PAGE + 100) as u64, &mut tail)
        .unwrap();
    assert_eq!(
        tail, [0; 100],
        "the dropped bytes of the kept page are zero"
    );
    assert!(
        machine
            .read(addr(ptr) + 2 * PAGE as u64, &mut tail)
            .is_err(),
        "the new guard page"
    );
    // SAFETY: as above.
    let grown = unsafe { vm.vrealloc(ptr.as_ptr(), 6 * PAGE) }.unwrap();
    let mut back = vec![0xff; 6 * PAGE];
    machine.read(addr(grown), &mut back).unwrap();
    assert!(back[..PAGE + 100].iter().all(|&b| b == 0xee), "kept");
    assert!(back[PAGE + 100..].iter().all(|&b| b == 0), "regrown zeroed");
    // The pages the shrink freed are free again: an area fits there now.
    let next = vm.vmalloc(2 * PAGE).unwrap();
    assert!(zone(&vm).contains(&(next.as_ptr() as u64)));
    // SAFETY: not used again.
    unsafe {
        vm.vfree(grown.as_ptr()).unwrap();
        vm.vfree(next.as_ptr()).unwrap();
    }
    vm.purge();
    assert_frames_conserved(&vm.stats(), frames);
}

#[test]
fn block_and_tree_areas_refuse_the_same_bad_pointers_and_calls() {
    let (machine, frames, tlb) = smp_machine(1);
    let vm = manager(machine, frames, tlb, cached());
    for pages in [3, 30] {
        let ptr = area_of(&vm, pages);
        let interior = ptr.as_ptr().wrapping_add(8);
        let guard = ptr.as_ptr().wrapping_add(pages * PAGE);
        let stats = vm.stats();
        // SAFETY: every call below is refused; the area stays live and unused.
        unsafe {
            assert_eq!(vm.vfree(interior), Err(Error::InteriorPointer), "{pages}");
            assert_eq!(vm.vfree(guard), Err(Error::NotAllocated), "{pages}");
            assert_eq!(
                vm.vrealloc(interior, PAGE).err(),
                Some(Error::InteriorPointer)
            );
            assert_eq!(
                vm.set_prot(interior, Prot::READ),
                Err(Error::InteriorPointer)
            );
            assert_eq!(
                vm.set_prot(ptr.as_ptr(), Prot::all()),
                Err(Error::WriteExecute)
            );
            assert_eq!(vm.vunmap(ptr.as_ptr(), |_| {}), Err(Error::WrongKind));
            assert_eq!(vm.iounmap(ptr.as_ptr()), Err(Error::WrongKind));
        }
        assert_eq!(vm.populate(ptr.as_ptr(), PAGE), Err(Error::WrongKind));
        assert_eq!(vm.stats(), stats, "{pages} pages: nothing changed");
        // SAFETY: not used again; the second call is refused.
        unsafe {
            vm.vfree(ptr.as_ptr()).unwrap();
            assert_eq!(vm.vfree(ptr.as_ptr()), Err(Error::NotAllocated), "{pages}");
            assert_eq!(
                vm.vrealloc(ptr.as_ptr(), PAGE).err(),
                Some(Error::NotAllocated)
            );
        }
    }
}

#[test]
fn four_cpus_stress_small_areas_allocating_freeing_resizing_and_purging_at_once() {
    watchdog("small-area stress", DEADLOCK_LIMIT, || {
        let (machine, frames, tlb) = smp_machine(4);
        let vm = manager(machine, frames, tlb, cached());
        let shared: Mutex<Vec<(usize, usize, u8)>> = Mutex::new(Vec::new());
        machine.on_every_cpu(|cpu| {
            let mut rng = Rng::new(cpu.index() as u64 * 7 + 3);
            let mut mine: Vec<(usize, usize, u8)> = Vec::new();
            for round in 0..1500usize {
                let stamp = (cpu.index() * 61 + round) as u8 | 1;
                match rng.below(8) {
                    0..=2 => {
                        let pages = 1 + rng.below(6) as usize;
                        let ptr = vm.vmalloc(pages * PAGE).unwrap();
                        for page in 0..pages {
                            cpu.write(addr(ptr) + (page * PAGE) as u64, &[stamp; 8])
                                .unwrap();
                        }
                        mine.push((ptr.as_ptr() as usize, pages, stamp));
                    }
                    3 | 4 if !mine.is_empty() => {
                        let (ptr, pages, stamp) =
                            mine.swap_remove(rng.below(mine.len() as u64) as usize);
                        check(cpu, ptr, pages, stamp);
                        // Half of them are freed by another CPU.
                        if rng.below(2) == 0 {
                            shared.lock().unwrap().push((ptr, pages, stamp));
                        } else {
                            // SAFETY: this CPU's area, checked and not used again.
                            unsafe { vm.vfree(ptr as *mut u8) }.unwrap();
                        }
                    }
                    5 if !mine.is_empty() => {
                        let index = rng.below(mine.len() as u64) as usize;
                        let (ptr, pages, stamp) = mine[index];
                        check(cpu, ptr, pages, stamp);
                        let new_pages = 1 + rng.below(8) as usize;
                        // SAFETY: the old pointer is replaced by the one returned.
                        let moved =
                            unsafe { vm.vrealloc(ptr as *mut u8, new_pages * PAGE) }.unwrap();
                        let kept = pages.min(new_pages);
                        check(cpu, moved.as_ptr() as usize, kept, stamp);
                        for page in kept..new_pages {
                            cpu.write(addr(moved) + (page * PAGE) as u64, &[stamp; 8])
                                .unwrap();
                        }
                        mine[index] = (moved.as_ptr() as usize, new_pages, stamp);
                    }
                    6 => {
                        let theirs = shared.lock().unwrap().pop();
                        if let Some((ptr, pages, stamp)) = theirs {
                            check(cpu, ptr, pages, stamp);
                            // SAFETY: handed over by the CPU that made it, not used again.
                            unsafe { vm.vfree(ptr as *mut u8) }.unwrap();
                        }
                    }
                    7 => vm.purge(),
                    _ => {}
                }
            }
            for (ptr, ..) in mine {
                // SAFETY: as above.
                unsafe { vm.vfree(ptr as *mut u8) }.unwrap();
            }
        });
        for (ptr, ..) in shared.into_inner().unwrap() {
            // SAFETY: as above.
            unsafe { vm.vfree(ptr as *mut u8) }.unwrap();
        }
        vm.purge();
        let stats = vm.stats();
        assert_eq!((stats.block_areas, stats.data_frames), (0, 0));
        assert_frames_conserved(&stats, frames);
    });
}

/// The stamp on every page of the area at `ptr`, as its maker wrote it.
fn check(cpu: vmalloc_sim::SimCpu<'_>, ptr: usize, pages: usize, stamp: u8) {
    for page in 0..pages {
        let mut back = [0; 8];
        cpu.read(VirtAddr::new((ptr + page * PAGE) as u64), &mut back)
            .unwrap();
        assert_eq!(back, [stamp; 8], "page {page} of {ptr:#x}");
    }
}
