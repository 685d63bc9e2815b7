//! The kernel heap's guarded pool (KFENCE) on one CPU: a sampled object sits alone on
//! its page between unmapped pages, so an overrun, an underrun and a use after free
//! fault and are diagnosed with the object, the offset and the sites; a corrupted
//! slack is reported at the free; a full pool falls back to the slabs.

#[path = "common/guarded.rs"]
mod guarded;

use guarded::*;
use std::alloc::GlobalAlloc;
use vmalloc::FrameSource;
use vmalloc::heap::guarded::{GuardedFault, HeapSiteUsage, ReportKind};
use vmalloc::heap::{HeapConfig, KVBox, KernelHeap};
use vmalloc_sim::{Access, DEADLOCK_LIMIT, SimConfig, SimMachine, watchdog};

const FILE: &str = "heap_guarded.rs";

fn machine() -> SimMachine {
    SimMachine::new(
        SimConfig::new(128 << 20)
            .with_scatter_seed(29)
            .with_host_window(4 << 30),
    )
}

#[test]
fn an_overrun_faults_on_the_next_page_and_is_charged_to_the_object() {
    let machine = machine();
    let frames = machine.frames();
    let vm = manager(&machine, &frames, &machine);
    let heap = KernelHeap::new(sampling(1, 8));
    heap.init(&vm).unwrap();
    let layout = layout(24, 8);
    // SAFETY: a non-zero size.
    let (object, line) = (unsafe { heap.alloc(layout) }, line!());
    assert!(heap.is_guarded(object));
    assert!(
        at_page_end(object, 24, 8),
        "the first object goes against the page end"
    );
    // SAFETY: the object's 24 bytes are its own.
    unsafe { object.write_bytes(0x5a, 24) };
    let (at, code) = fault_at(&machine, addr(object) + 24u64 + 8, Access::WRITE);
    let diagnosis = heap.diagnose_fault(at, code).expect("in the pool");
    match diagnosis.fault {
        GuardedFault::PastEnd {
            object: found,
            distance,
        } => {
            assert_eq!((found.addr, found.size, distance), (object as usize, 24, 8));
            assert_eq!(found.alloc.caller.unwrap().line(), line);
            assert_eq!(found.alloc.cpu, Some(0));
            assert_eq!(found.free, None);
        }
        other => panic!("not an overrun: {other:?}"),
    }
    assert_eq!(
        diagnosis.to_string(),
        format!(
            "out-of-bounds write past the end of a 24-byte heap object (at {object:p}, \
             allocated on CPU 0 at {} (no frame pointers)) at {:#x}, 8 bytes past it: \
             guarded pool",
            line_of(FILE, line),
            at.as_u64()
        )
    );
    // The first byte past it is on the guard page already.
    let (at, code) = fault_at(&machine, addr(object) + 24u64, Access::READ);
    let diagnosis = heap.diagnose_fault(at, code).unwrap();
    assert_eq!(object_of(&diagnosis.fault), Some((object as usize, 0)));
    assert!(
        diagnosis
            .to_string()
            .starts_with("out-of-bounds read past the end")
    );
    // Addresses outside the pool are the manager's to explain.
    let elsewhere = vm.vmalloc(PAGE).unwrap();
    assert!(
        heap.diagnose_fault(addr(elsewhere.as_ptr()), code)
            .is_none()
    );
    // SAFETY: the object is freed once, with its layout.
    unsafe { heap.dealloc(object, layout) };
    assert_eq!(
        heap.guarded_stats().reports,
        0,
        "an untouched slack is clean"
    );
}

#[test]
fn an_underrun_faults_on_the_page_before_and_is_charged_to_the_object() {
    let machine = machine();
    let frames = machine.frames();
    let vm = manager(&machine, &frames, &machine);
    let heap = KernelHeap::new(sampling(1, 8));
    heap.init(&vm).unwrap();
    let layout = layout(64, 16);
    // SAFETY: non-zero sizes.
    let (first, object) = unsafe { (heap.alloc(layout), heap.alloc(layout)) };
    let line = line!() - 1;
    assert!(heap.is_guarded(first) && heap.is_guarded(object));
    assert!(
        object.addr().is_multiple_of(PAGE),
        "the second object goes against the page start"
    );
    let (at, code) = fault_at(&machine, addr(object) - 16u64, Access::READ);
    let diagnosis = heap.diagnose_fault(at, code).unwrap();
    match diagnosis.fault {
        GuardedFault::BeforeStart {
            object: found,
            distance,
        } => {
            assert_eq!(
                (found.addr, found.size, distance),
                (object as usize, 64, 16)
            );
            assert_eq!(found.alloc.caller.unwrap().line(), line);
        }
        other => panic!("not an underrun: {other:?}"),
    }
    let text = diagnosis.to_string();
    assert!(
        text.starts_with(&format!(
            "out-of-bounds read before the start of a 64-byte heap object (at {object:p}, \
             allocated on CPU 0 at {}",
            line_of(FILE, line)
        )) && text.ends_with(&format!(
            "at {:#x}, 16 bytes before it: guarded pool",
            at.as_u64()
        )),
        "{text}"
    );
    // SAFETY: each object is freed once, with its layout.
    unsafe {
        heap.dealloc(first, layout);
        heap.dealloc(object, layout);
    }
}

#[test]
fn a_use_after_free_faults_until_the_slot_is_reused_and_names_both_sites() {
    let machine = machine();
    let frames = machine.frames();
    let vm = manager(&machine, &frames, &machine);
    let heap = KernelHeap::new(sampling(1, 4));
    heap.init(&vm).unwrap();
    let layout = layout(64, 8);
    // SAFETY: a non-zero size.
    let (object, alloc_line) = (unsafe { heap.alloc(layout) }, line!());
    // SAFETY: the object is live; the host touch caches its page.
    unsafe { object.write_bytes(1, 64) };
    let mut read = [0; 8];
    machine.read(addr(object) + 8u64, &mut read).unwrap();
    assert_eq!(read, [1; 8]);
    let data_frames = vm.stats().data_frames;
    // SAFETY: freed once, with its layout; only the MMU probes touch it afterwards.
    let free_line = line!() + 1;
    unsafe { heap.dealloc(object, layout) };
    assert_eq!(
        vm.stats().data_frames,
        data_frames - 1,
        "the page is unmapped (its frame stays the slot's)"
    );
    // The translation this CPU cached is gone: the read faults.
    let (at, code) = fault_at(&machine, addr(object) + 8u64, Access::READ);
    let diagnosis = heap.diagnose_fault(at, code).unwrap();
    match diagnosis.fault {
        GuardedFault::UseAfterFree {
            object: found,
            offset,
        } => {
            assert_eq!((found.addr, found.size, offset), (object as usize, 64, 8));
            assert_eq!(found.alloc.caller.unwrap().line(), alloc_line);
            assert_eq!(found.free.unwrap().caller.unwrap().line(), free_line);
        }
        other => panic!("not a use after free: {other:?}"),
    }
    assert_eq!(
        diagnosis.to_string(),
        format!(
            "use after free: read of a 64-byte heap object (at {object:p}, allocated on \
             CPU 0 at {} (no frame pointers), freed on CPU 0 at {} (no frame pointers)) \
             at {:#x} (offset 8): guarded pool",
            line_of(FILE, alloc_line),
            line_of(FILE, free_line),
            at.as_u64()
        )
    );
    // The three never-used slots go first: the freed page stays unmapped meanwhile.
    // SAFETY: non-zero sizes.
    let others: Vec<_> = (0..3).map(|_| unsafe { heap.alloc(layout) }).collect();
    assert!(others.iter().all(|&other| heap.is_guarded(other)));
    fault_at(&machine, addr(object), Access::WRITE);
    // Then the freed slot is the one reused.
    // SAFETY: a non-zero size.
    let again = unsafe { heap.alloc(layout) };
    assert_eq!(again.addr() & !(PAGE - 1), object.addr() & !(PAGE - 1));
    // SAFETY: bytes the test owns: no live Rust value lives there.
    unsafe { machine.write(addr(again), b"reused") }.unwrap();
    // SAFETY: each object is freed once, with its layout.
    unsafe {
        others.iter().for_each(|&other| heap.dealloc(other, layout));
        heap.dealloc(again, layout);
    }
}

#[test]
fn an_instruction_fetch_from_a_live_object_names_the_object() {
    let machine = machine();
    let frames = machine.frames();
    let vm = manager(&machine, &frames, &machine);
    let heap = KernelHeap::new(sampling(1, 8));
    heap.init(&vm).unwrap();
    let layout = layout(40, 8);
    // SAFETY: a non-zero size.
    let (object, line) = (unsafe { heap.alloc(layout) }, line!());
    assert!(heap.is_guarded(object));
    // The page is mapped and not executable: a jump into the object faults there.
    let (at, code) = fault_at(&machine, addr(object) + 16u64, Access::FETCH);
    let diagnosis = heap.diagnose_fault(at, code).expect("in the pool");
    match diagnosis.fault {
        GuardedFault::InLiveObject {
            object: found,
            offset,
        } => {
            assert_eq!((found.addr, found.size, offset), (object as usize, 40, 16));
            assert_eq!(found.alloc.caller.unwrap().line(), line);
            assert_eq!(found.free, None);
        }
        other => panic!("not the live object: {other:?}"),
    }
    assert_eq!(
        diagnosis.to_string(),
        format!(
            "instruction fetch of a 40-byte heap object (at {object:p}, allocated on CPU 0 \
             at {} (no frame pointers)) at {:#x} (offset 16), which is live: guarded pool",
            line_of(FILE, line),
            at.as_u64()
        )
    );
    // SAFETY: freed once, with its layout.
    unsafe { heap.dealloc(object, layout) };
}

#[test]
fn a_corrupted_slack_is_reported_at_the_free_through_the_hook() {
    watchdog(
        "a_corrupted_slack_is_reported_at_the_free",
        DEADLOCK_LIMIT,
        || {
            let machine = machine();
            let frames = machine.frames();
            let vm = manager(&machine, &frames, &machine);
            let reports = Reports::default();
            let hook = reports.hook();
            let heap = KernelHeap::new(sampling(1, 8));
            heap.init(&vm).unwrap();
            heap.set_report_hook(&hook);
            // 13 bytes aligned to 8 against the page's end: 3 bytes of slack after it,
            // which an off-by-one write reaches without faulting.
            let layout = layout(13, 8);
            // SAFETY: a non-zero size.
            let (object, line) = (unsafe { heap.alloc(layout) }, line!());
            assert!(at_page_end(object, 13, 8));
            // SAFETY: the object is live; the byte past it is in its (mapped) page.
            unsafe {
                object.write_bytes(7, 13);
                object.add(13).write(0);
            }
            assert!(reports.take().is_empty());
            let free_line = line!() + 2;
            // SAFETY: freed once, with its layout.
            unsafe { heap.dealloc(object, layout) };
            let seen = reports.take();
            assert_eq!(seen.len(), 1, "{seen:?}");
            let report = seen[0];
            let past_end = object as usize + 13;
            assert_eq!(
                report.kind,
                ReportKind::Corrupted {
                    bytes: 1,
                    first: past_end,
                    last: past_end
                }
            );
            let found = report.object.unwrap();
            assert_eq!((found.addr, found.size), (object as usize, 13));
            assert_eq!(found.alloc.caller.unwrap().line(), line);
            assert_eq!(found.free.unwrap().caller.unwrap().line(), free_line);
            assert!(
                report.to_string().starts_with(&format!(
                    "corrupted memory: 1 byte of the slack past the end, 0 bytes past it \
                 ({past_end:#x}..={past_end:#x}), of a 13-byte heap object (at {object:p}, \
                 allocated on CPU 0 at {}",
                    line_of(FILE, line)
                )),
                "{report}"
            );
            // The page went all the same: the free was done.
            fault_at(&machine, addr(object), Access::READ);

            // A write before an object at its page's start goes to the guard page; one
            // past it into the slack is found wherever it lands.
            // SAFETY: a non-zero size.
            let start = unsafe { heap.alloc(layout) };
            assert!(start.addr().is_multiple_of(PAGE));
            // SAFETY: in the object's page, 100 bytes past its end.
            unsafe { start.add(113).write(0) };
            // SAFETY: freed once, with its layout.
            unsafe { heap.dealloc(start, layout) };
            let seen = reports.take();
            assert!(
                matches!(seen[..], [report] if report.kind == ReportKind::Corrupted {
                    bytes: 1,
                    first: start as usize + 113,
                    last: start as usize + 113,
                }),
                "{seen:?}"
            );

            // Writes before an object against its page's end land in the slack: the
            // report gives their distances before it, the nearest first.
            // SAFETY: a non-zero size.
            let end = unsafe { heap.alloc(layout) };
            assert!(at_page_end(end, 13, 8));
            // SAFETY: in the object's page, 3 and 10 bytes before it.
            unsafe {
                end.sub(3).write(0);
                end.sub(10).write(0);
            }
            // SAFETY: freed once, with its layout.
            unsafe { heap.dealloc(end, layout) };
            let seen = reports.take();
            assert_eq!(seen.len(), 1, "{seen:?}");
            assert!(
                seen[0].to_string().starts_with(&format!(
                    "corrupted memory: 2 bytes of the slack before the start, 3 to 10 bytes \
                     before it ({:#x}..={:#x}), of a 13-byte heap object (at {end:p}",
                    end as usize - 10,
                    end as usize - 3
                )),
                "{}",
                seen[0]
            );
            assert_eq!(heap.guarded_stats().reports, 3);
        },
    );
}

#[test]
fn the_hook_may_allocate_and_without_one_problems_are_counted() {
    watchdog("the_hook_may_allocate", DEADLOCK_LIMIT, || {
        let machine = machine();
        let frames = machine.frames();
        let vm = manager(&machine, &frames, &machine);
        // Leaked, so that the hook can hold the heap it reports for, as a kernel's
        // `static` hook calls its `static` heap.
        let heap: &KernelHeap = Box::leak(Box::new(KernelHeap::new(sampling(1, 8))));
        heap.init(&vm).unwrap();
        let object_layout = layout(37, 8);
        // No hook: the free finds the corruption, counts it and goes on.
        // SAFETY: a non-zero size; the bytes past the object are in its page (37
        // bytes aligned to 8 against the page's end leave 3).
        unsafe {
            let object = heap.alloc(object_layout);
            object.add(37).write(1);
            heap.dealloc(object, object_layout);
        }
        assert_eq!(heap.guarded_stats().reports, 1);
        // A hook that formats the report into a `String` on this very heap, as a
        // kernel's printing through its global allocator does.
        let printed: &std::sync::Mutex<Vec<usize>> = Box::leak(Box::default());
        let hook = Box::leak(Box::new(
            move |report: &vmalloc::heap::guarded::GuardedReport| {
                let text = report.to_string();
                // SAFETY: a non-zero size, freed below with its layout.
                unsafe {
                    let copy = heap.alloc(layout(text.len(), 1));
                    copy.copy_from(text.as_ptr(), text.len());
                    printed.lock().unwrap().push(text.len());
                    heap.dealloc(copy, layout(text.len(), 1));
                }
            },
        ));
        heap.set_report_hook(hook);
        // SAFETY: as above.
        unsafe {
            let object = heap.alloc(object_layout);
            object.add(38).write(1);
            heap.dealloc(object, object_layout);
        }
        assert_eq!(printed.lock().unwrap().len(), 1);
        assert_eq!(heap.guarded_stats().reports, 2);
    });
}

#[test]
fn double_and_invalid_frees_are_reported_and_not_done() {
    let machine = machine();
    let frames = machine.frames();
    let vm = manager(&machine, &frames, &machine);
    let reports = Reports::default();
    let hook = reports.hook();
    let heap = KernelHeap::new(sampling(1, 4));
    heap.init(&vm).unwrap();
    heap.set_report_hook(&hook);
    let layout = layout(32, 8);
    // SAFETY: non-zero sizes; the bad frees below are refused by the pool, which is
    // what is tested.
    unsafe {
        let object = heap.alloc(layout);
        let live = heap.alloc(layout);
        heap.dealloc(object, layout);
        heap.dealloc(object, layout);
        heap.dealloc(live.add(8), layout);
        let kinds: Vec<_> = reports.take().iter().map(|report| report.kind).collect();
        assert_eq!(kinds, [ReportKind::DoubleFree, ReportKind::InvalidFree]);
        // The live object is untouched, and the pool still serves.
        live.write_bytes(3, 32);
        let next = heap.alloc(layout);
        assert!(heap.is_guarded(next));
        heap.dealloc(next, layout);
        heap.dealloc(live, layout);
    }
    let stats = heap.guarded_stats();
    assert_eq!((stats.live, stats.reports), (0, 2));
}

#[test]
fn a_full_pool_falls_back_to_the_slabs() {
    let machine = machine();
    let frames = machine.frames();
    let vm = manager(&machine, &frames, &machine);
    let heap = KernelHeap::new(sampling(1, 4));
    heap.init(&vm).unwrap();
    let layout = layout(100, 4);
    // SAFETY: non-zero sizes; each block is freed once, with its layout.
    unsafe {
        let blocks: Vec<_> = (0..6).map(|_| heap.alloc(layout)).collect();
        assert!(
            blocks.iter().all(|block| !block.is_null()),
            "a full pool failed them"
        );
        let guarded: Vec<bool> = blocks.iter().map(|&block| heap.is_guarded(block)).collect();
        assert_eq!(guarded, [true, true, true, true, false, false]);
        for &block in &blocks {
            block.write_bytes(9, 100);
        }
        let stats = heap.guarded_stats();
        assert_eq!((stats.slots, stats.live, stats.free_slots), (4, 4, 0));
        assert_eq!((stats.sampled, stats.pool_full), (4, 2));
        // A freed slot takes the next sampled allocation.
        heap.dealloc(blocks[1], layout);
        let again = heap.alloc(layout);
        assert!(heap.is_guarded(again));
        heap.dealloc(again, layout);
        for (_, &block) in blocks.iter().enumerate().filter(|&(index, _)| index != 1) {
            assert!(
                std::slice::from_raw_parts(block, 100)
                    .iter()
                    .all(|&b| b == 9)
            );
            heap.dealloc(block, layout);
        }
    }
    assert_eq!(heap.guarded_stats().live, 0);
    assert_eq!(heap.stats().slab_objects, 0);
}

#[test]
fn sampling_is_off_by_default_and_about_one_in_n_when_on() {
    let machine = machine();
    let frames = machine.frames();
    let vm = manager(&machine, &frames, &machine);
    let off = KernelHeap::new(HeapConfig::DEFAULT);
    off.init(&vm).unwrap();
    let small = layout(48, 8);
    let count = |heap: &KernelHeap| {
        // SAFETY: non-zero sizes; each block is freed once, with its layout.
        unsafe {
            let blocks: Vec<_> = (0..200).map(|_| heap.alloc(small)).collect();
            let guarded = blocks
                .iter()
                .filter(|&&block| heap.is_guarded(block))
                .count();
            blocks.iter().for_each(|&block| heap.dealloc(block, small));
            guarded
        }
    };
    assert_eq!(count(&off), 0);
    assert_eq!(off.guarded_stats(), Default::default());
    let on = KernelHeap::new(sampling(10, 64));
    on.init(&vm).unwrap();
    let sampled = count(&on);
    assert!(
        (15..=25).contains(&sampled),
        "{sampled} of 200 sampled at 1 in 10"
    );
    on.set_sample_interval(0);
    assert_eq!(count(&on), 0);
    // Large, list-sized and over-aligned blocks are never sampled.
    on.set_sample_interval(1);
    // SAFETY: non-zero sizes; each block is freed once, with its layout.
    unsafe {
        for layout in [layout(8000, 8), layout(1 << 20, 8), layout(64, 8192)] {
            let block = on.alloc(layout);
            assert!(!block.is_null() && !on.is_guarded(block));
            on.dealloc(block, layout);
        }
    }
}

#[test]
fn realloc_moves_a_sampled_object_and_keeps_its_bytes() {
    let machine = machine();
    let frames = machine.frames();
    let vm = manager(&machine, &frames, &machine);
    let heap = KernelHeap::new(sampling(1, 8));
    heap.init(&vm).unwrap();
    let layout = layout(24, 8);
    // SAFETY: a non-zero size; `realloc` gives the object up and returns its copy,
    // freed once with its new layout.
    unsafe {
        let object = heap.alloc(layout);
        object.copy_from(b"twenty-four bytes here!!".as_ptr(), 24);
        let grown = heap.realloc(object, layout, 30);
        assert_ne!(grown, object, "an exact-size object cannot grow in place");
        assert_eq!(
            std::slice::from_raw_parts(grown, 24),
            b"twenty-four bytes here!!"
        );
        fault_at(&machine, addr(object), Access::READ);
        heap.dealloc(grown, self::layout(30, 8));
    }
    assert_eq!(heap.guarded_stats().reports, 0);
}

#[test]
fn the_listing_totals_live_sampled_objects_per_site_and_blocks_per_kind() {
    let machine = machine();
    let frames = machine.frames();
    let vm = manager(&machine, &frames, &machine);
    let heap = KernelHeap::new(sampling(1, 16));
    heap.init(&vm).unwrap();
    let (small, big) = (layout(16, 8), layout(1000, 8));
    // SAFETY: non-zero sizes; each block is freed once, with its layout.
    unsafe {
        let mut blocks = Vec::new();
        for _ in 0..3 {
            blocks.push((heap.alloc(small), small));
        }
        let small_line = line!() - 2;
        let (one, big_line) = (heap.alloc(big), line!());
        heap.set_sample_interval(0);
        let slab = heap.alloc(big);
        let mut table = [HeapSiteUsage::EMPTY; 4];
        let info = heap.allocinfo(&mut table);
        let sites: Vec<_> = info
            .sites()
            .iter()
            .map(|site| (site.site.caller.unwrap().line(), site.bytes, site.calls))
            .collect();
        assert_eq!(sites, [(big_line, 1000, 1), (small_line, 48, 3)]);
        let text = info.to_string();
        assert!(
            text.contains(&format!(
                "        1000        1 {} (no frame pointers)\n",
                line_of(FILE, big_line)
            )),
            "{text}"
        );
        // The sampled objects together, as a kind of block.
        assert!(
            text.contains("        1048        4 kernel heap: guarded pool\n"),
            "{text}"
        );
        // The slab object counts in its class's line (1024-byte objects).
        assert!(
            text.contains("        1024        1 kernel heap: slab-1024\n"),
            "{text}"
        );
        blocks.push((one, big));
        blocks.push((slab, big));
        for (block, layout) in blocks {
            heap.dealloc(block, layout);
        }
        let info = heap.allocinfo(&mut table);
        assert!(info.sites().is_empty());
    }
}

/// A pool that cannot be made (no frames left) turns sampling off; turned on again
/// once memory is back, sampling makes the pool and samples. (One failure turned it
/// off for good, while the stats said it was on.)
#[test]
fn sampling_turned_on_again_after_the_pool_could_not_be_made_samples() {
    let machine = machine();
    let frames = machine.frames();
    let vm = manager(&machine, &frames, &machine);
    let heap = KernelHeap::new(sampling(0, 16));
    heap.init(&vm).unwrap();
    vm.purge();
    let free = frames.stats().free as usize;
    let first = frames.alloc_frame().unwrap();
    let mut hogged = vec![first; free - 1];
    assert_eq!(frames.alloc_frames(&mut hogged), free - 1);
    heap.set_sample_interval(1);
    let l = layout(24, 8);
    // SAFETY: a non-zero size; the frames go back once, unused.
    unsafe {
        assert!(heap.alloc(l).is_null(), "no frame for anything");
        assert_eq!(heap.guarded_stats().interval, 0, "sampling turned off");
        frames.free_frame(first).unwrap();
        frames.free_frames(&hogged).unwrap();
    }
    heap.set_sample_interval(1);
    // SAFETY: a non-zero size; freed once, with its layout.
    unsafe {
        let block = heap.alloc(l);
        assert!(!block.is_null());
        let sampled = heap.is_guarded(block);
        heap.dealloc(block, l);
        assert!(sampled, "{:?}", heap.guarded_stats());
    }
}

/// A table shorter than the sampled sites keeps the largest site, not the first one
/// met: one 16-byte object at one site, three 4000-byte ones at another, a table
/// of one line.
#[test]
fn a_short_table_keeps_the_largest_sampled_sites() {
    let machine = machine();
    let frames = machine.frames();
    let vm = manager(&machine, &frames, &machine);
    let heap = KernelHeap::new(sampling(1, 8));
    heap.init(&vm).unwrap();
    let (small, big) = (layout(16, 8), layout(4000, 8));
    // SAFETY: non-zero sizes; each block is freed once, with its layout.
    unsafe {
        let one = heap.alloc(small);
        let three: Vec<_> = (0..3).map(|_| heap.alloc(big)).collect();
        let big_line = line!() - 1;
        assert!(heap.is_guarded(one) && three.iter().all(|&block| heap.is_guarded(block)));
        let mut table = [HeapSiteUsage::EMPTY; 1];
        let info = heap.allocinfo(&mut table);
        let site = info.sites()[0];
        assert_eq!(
            (site.site.caller.unwrap().line(), site.bytes, site.calls),
            (big_line, 12_000, 3),
            "{info}"
        );
        assert_eq!((info.other().bytes, info.other().calls), (16, 1));
        heap.dealloc(one, small);
        for block in three {
            heap.dealloc(block, big);
        }
    }
}

#[test]
fn a_free_of_an_object_whose_slot_was_reused_says_where_it_points() {
    let machine = machine();
    let frames = machine.frames();
    let vm = manager(&machine, &frames, &machine);
    let reports = Reports::default();
    let hook = reports.hook();
    let heap = KernelHeap::new(sampling(1, 1));
    heap.init(&vm).unwrap();
    heap.set_report_hook(&hook);
    let l = layout(32, 8);
    // SAFETY: non-zero sizes; the second free of `a` is the bad free the pool refuses
    // and reports.
    unsafe {
        let a = heap.alloc(l);
        heap.dealloc(a, l);
        // One slot: `b` takes it, at the other end of the page.
        let b = heap.alloc(l);
        assert!(heap.is_guarded(b) && a != b);
        heap.dealloc(a, l);
        let seen = reports.take();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].kind, ReportKind::InvalidFree);
        let text = seen[0].to_string();
        assert!(
            text.contains(&format!("invalid free of {:#x}", a as usize))
                && text.contains("in the page of a 32-byte heap object")
                && !text.contains("inside"),
            "{text}"
        );
        heap.dealloc(b, l);
    }
}

/// A `realloc` of a sampled pointer that starts no live object (freed before, inside
/// an object) is reported as its free would be and returns null, changing nothing:
/// it read the unmapped page of the freed object (a fault inside the allocator), or
/// moved the object inside which it pointed (left live and unreachable). A live one
/// moves with its bytes.
#[test]
fn a_realloc_of_a_freed_or_interior_sampled_pointer_is_reported_and_refused() {
    let machine = machine();
    let frames = machine.frames();
    let vm = manager(&machine, &frames, &machine);
    let reports = Reports::default();
    let hook = reports.hook();
    let heap = KernelHeap::new(sampling(1, 4));
    heap.init(&vm).unwrap();
    heap.set_report_hook(&hook);
    let l = layout(32, 8);
    // SAFETY: non-zero sizes; the resizes of `freed` and of `inside` are the bad
    // calls the pool refuses and reports; each live block is freed once.
    unsafe {
        let freed = heap.alloc(l);
        assert!(heap.is_guarded(freed));
        heap.dealloc(freed, l);
        assert!(heap.realloc(freed, l, 64).is_null());
        let seen = reports.take();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].kind, ReportKind::DoubleFree);

        let live = heap.alloc(l);
        live.write_bytes(0x5a, 32);
        let before = heap.guarded_stats();
        assert!(heap.realloc(live.add(8), l, 16).is_null());
        assert_eq!(reports.take()[0].kind, ReportKind::InvalidFree);
        assert_eq!(
            (heap.guarded_stats().live, heap.guarded_stats().sampled),
            (before.live, before.sampled)
        );

        let moved = heap.realloc(live, l, 64);
        assert!(!moved.is_null());
        assert_eq!(std::slice::from_raw_parts(moved, 32), [0x5a; 32]);
        assert!(reports.take().is_empty());
        heap.dealloc(moved, layout(64, 8));
    }
    assert_eq!(heap.guarded_stats().live, 0);
}

/// With every allocation sampled, a heap that ran out of frames and had everything
/// freed serves again, as without sampling: the pool's idle slots hold the frames
/// the program freed, and a slot used before maps without a new one.
#[test]
fn a_heap_sampling_every_allocation_recovers_from_running_out_of_frames() {
    for interval in [0, 1] {
        let machine = SimMachine::new(
            SimConfig::new(16 << 20)
                .with_scatter_seed(3)
                .with_host_window(4 << 30),
        );
        let frames = machine.frames();
        let vm = manager(&machine, &frames, &machine);
        // All but 120 frames are taken for good.
        let free = frames.stats().free as usize;
        let first = vmalloc::FrameSource::alloc_frame(&frames).unwrap();
        let mut hogged = vec![first; free - 121];
        assert_eq!(
            vmalloc::FrameSource::alloc_frames(&frames, &mut hogged),
            free - 121
        );
        let heap = KernelHeap::new(sampling(interval, 255));
        heap.init(&vm).unwrap();
        let small = layout(24, 8);
        // SAFETY: non-zero sizes; each block is freed once with its layout.
        unsafe {
            let blocks: Vec<*mut u8> =
                std::iter::from_fn(|| Some(heap.alloc(small)).filter(|block| !block.is_null()))
                    .collect();
            assert!(
                blocks.len() > 50,
                "interval {interval}: {} blocks",
                blocks.len()
            );
            for block in blocks {
                heap.dealloc(block, small);
            }
            heap.shrink();
            vm.purge();
            let again = heap.alloc(small);
            assert!(
                !again.is_null(),
                "interval {interval}: {:?}",
                heap.guarded_stats()
            );
            heap.dealloc(again, small);
        }
    }
}

/// `kvmalloc`, `kvfree` and `KVBox::new` name their caller's line as the block's
/// sites, as `alloc` does: each user of them gets its own `allocinfo` line and its
/// own lines in a diagnosis, not the library's.
#[test]
fn kvmalloc_kvfree_and_kvbox_name_their_callers() {
    let machine = machine();
    let frames = machine.frames();
    let vm = manager(&machine, &frames, &machine);
    let heap = KernelHeap::new(sampling(1, 8));
    heap.init(&vm).unwrap();
    let site = |caller: Option<&std::panic::Location<'_>>| {
        caller.map(|caller| format!("{}:{}", caller.file(), caller.line()))
    };
    let (block, alloc_line) = (heap.kvmalloc(24).unwrap(), line!());
    let (boxed, box_line) = (KVBox::new(&heap, [1u64; 3]).unwrap(), line!());
    assert!(heap.is_guarded(block.as_ptr()));
    let mut table = [HeapSiteUsage::EMPTY; 4];
    let mut sites: Vec<_> = (heap.allocinfo(&mut table).sites().iter())
        .map(|usage| site(usage.site.caller))
        .collect();
    sites.sort();
    let mut expected = vec![
        Some(line_of(FILE, alloc_line)),
        Some(line_of(FILE, box_line)),
    ];
    expected.sort();
    assert_eq!(sites, expected);
    drop(boxed);
    let free_line = line!() + 2;
    // SAFETY: from `kvmalloc` on this heap; not used afterwards (but for the fault).
    unsafe { heap.kvfree(block) };
    let (at, code) = fault_at(&machine, addr(block.as_ptr()), Access::READ);
    let diagnosis = heap.diagnose_fault(at, code).unwrap();
    let GuardedFault::UseAfterFree { object, .. } = diagnosis.fault else {
        panic!("{diagnosis}");
    };
    assert_eq!(
        (site(object.alloc.caller), site(object.free.unwrap().caller)),
        (
            Some(line_of(FILE, alloc_line)),
            Some(line_of(FILE, free_line))
        ),
        "{diagnosis}"
    );
}
