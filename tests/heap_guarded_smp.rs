//! The kernel heap's guarded pool on several CPUs (host threads, each with its own
//! TLB, flushed by a shootdown): overruns, underruns and uses after free caught and
//! charged to the right object and CPU wherever they happen, a page freed on one CPU
//! gone from another's TLB, corruption reported at frees on every CPU, and the pool
//! running full under all of them at once.

#[path = "common/guarded.rs"]
mod guarded;

use guarded::*;
use std::alloc::GlobalAlloc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use vmalloc::heap::KernelHeap;
use vmalloc::heap::guarded::{GuardedFault, ReportKind};
use vmalloc_sim::scenarios::{SmpTlb, smp_machine};
use vmalloc_sim::{Access, DEADLOCK_LIMIT, Fault, Rng, SimConfig, SimFrames, SimMachine, watchdog};

const FILE: &str = "heap_guarded_smp.rs";
const CPUS: usize = 4;

/// A machine with `cpus` CPUs, all online: a shootdown waits for each, so every one
/// must run (`on_every_cpu`) or be the reader of `read_again_after`.
fn machine_with(cpus: usize) -> (&'static SimMachine, &'static SimFrames, &'static SmpTlb) {
    smp_machine(
        SimConfig::new(256 << 20)
            .with_cpus(cpus)
            .with_scatter_seed(31)
            .with_host_window(4 << 30),
    )
}

fn machine() -> (&'static SimMachine, &'static SimFrames, &'static SmpTlb) {
    machine_with(CPUS)
}

#[test]
fn every_cpu_overruns_and_underruns_its_own_objects_and_each_is_charged_right() {
    watchdog("every_cpu_overruns_and_underruns", DEADLOCK_LIMIT, || {
        let (machine, frames, tlb) = machine();
        let vm = manager(machine, frames, tlb);
        let heap = KernelHeap::new(sampling(1, 64));
        heap.init(&vm).unwrap();
        let caught = AtomicUsize::new(0);
        machine.on_every_cpu(|cpu| {
            let mut rng = Rng::new(cpu.index() as u64 + 7);
            for _ in 0..20 {
                let size = 1 + rng.below(512) as usize;
                let layout = layout(size, 8);
                // SAFETY: a non-zero size.
                let (object, line) = (unsafe { heap.alloc(layout) }, line!());
                if !heap.is_guarded(object) {
                    // Another CPU filled the pool for now.
                    // SAFETY: freed once, with its layout.
                    unsafe { heap.dealloc(object, layout) };
                    continue;
                }
                // SAFETY: the object's bytes are its own.
                unsafe { object.write_bytes(cpu.index() as u8, size) };
                let page = object.addr() & !(PAGE - 1);
                let (probe, access) = if page == object.addr() {
                    (object.addr() as u64 - 1 - rng.below(64), Access::READ)
                } else {
                    ((page + PAGE) as u64 + rng.below(64), Access::WRITE)
                };
                let probe = x86_64::VirtAddr::new(probe);
                let Err(Fault::Page(fault)) = cpu.translate(probe, access) else {
                    panic!(
                        "CPU {} reached {probe:#x} next to a guarded object",
                        cpu.index()
                    );
                };
                let diagnosis = heap.diagnose_fault(fault.addr, fault.code).unwrap();
                let object_found = match diagnosis.fault {
                    GuardedFault::PastEnd { object, distance } => {
                        assert_eq!(
                            object.addr + object.size + distance,
                            probe.as_u64() as usize
                        );
                        object
                    }
                    GuardedFault::BeforeStart { object, distance } => {
                        assert_eq!(object.addr - distance, probe.as_u64() as usize);
                        object
                    }
                    other => panic!("CPU {}: {other:?}", cpu.index()),
                };
                assert_eq!(object_found.addr, object as usize);
                assert_eq!(object_found.size, size);
                assert_eq!(object_found.alloc.cpu, Some(cpu.index()));
                assert_eq!(object_found.alloc.caller.unwrap().line(), line);
                caught.fetch_add(1, Ordering::Relaxed);
                // SAFETY: the object was not touched past its bytes; freed once.
                unsafe {
                    assert!(
                        std::slice::from_raw_parts(object, size)
                            .iter()
                            .all(|&byte| byte == cpu.index() as u8)
                    );
                    heap.dealloc(object, layout);
                }
            }
        });
        assert!(
            caught.load(Ordering::Relaxed) >= 20,
            "too few objects were sampled"
        );
        let stats = heap.guarded_stats();
        assert_eq!((stats.live, stats.reports), (0, 0));
    });
}

#[test]
fn a_page_freed_on_one_cpu_faults_on_another_that_cached_it() {
    watchdog(
        "a_page_freed_on_one_cpu_faults_on_another",
        DEADLOCK_LIMIT,
        || {
            let (machine, frames, tlb) = machine_with(2);
            let vm = manager(machine, frames, tlb);
            let heap = KernelHeap::new(sampling(1, 8));
            heap.init(&vm).unwrap();
            let layout = layout(64, 8);
            // CPU 1 allocates the object and writes it.
            let (object, alloc_line) = machine.cpu(1).run(|_| {
                // SAFETY: a non-zero size.
                let object = unsafe { heap.alloc(layout) };
                (object, line!() - 1)
            });
            assert!(heap.is_guarded(object));
            // SAFETY: bytes the test owns: no live Rust value lives there.
            unsafe { machine.write(addr(object), b"CPU1 WAS HERE") }.unwrap();
            // CPU 1 reads it (caching the translation); CPU 0 frees it; CPU 1 reads again.
            let free_line = line!() + 3;
            let (seen, ()) = machine.read_again_after(1, addr(object) + 8u64, || {
                // SAFETY: freed once, with its layout; only the probe reads it after.
                unsafe { heap.dealloc(object, layout) }
            });
            assert_eq!(
                seen, None,
                "CPU 1 read a freed object through a stale translation"
            );
            let (at, code) = machine
                .cpu(1)
                .run(|machine| fault_at(machine, addr(object) + 8u64, Access::READ));
            let diagnosis = heap.diagnose_fault(at, code).unwrap();
            let GuardedFault::UseAfterFree {
                object: found,
                offset,
            } = diagnosis.fault
            else {
                panic!("{diagnosis}");
            };
            assert_eq!((found.addr, offset), (object as usize, 8));
            let (alloc, free) = (found.alloc, found.free.unwrap());
            assert_eq!((alloc.cpu, free.cpu), (Some(1), Some(0)));
            assert_eq!(
                (alloc.caller.unwrap().line(), free.caller.unwrap().line()),
                (alloc_line, free_line)
            );
            let text = diagnosis.to_string();
            assert!(
                text.contains(&format!(
                    "allocated on CPU 1 at {} (no frame pointers), freed on CPU 0 at {}",
                    line_of(FILE, alloc_line),
                    line_of(FILE, free_line)
                )),
                "{text}"
            );
        },
    );
}

#[test]
fn corruption_found_at_frees_on_every_cpu_reaches_the_hook() {
    watchdog(
        "corruption_found_at_frees_on_every_cpu",
        DEADLOCK_LIMIT,
        || {
            let (machine, frames, tlb) = machine();
            let vm = manager(machine, frames, tlb);
            let reports = Reports::default();
            let hook = reports.hook();
            let heap = KernelHeap::new(sampling(1, 64));
            heap.init(&vm).unwrap();
            heap.set_report_hook(&hook);
            let corrupted = AtomicUsize::new(0);
            machine.on_every_cpu(|cpu| {
                for round in 0..10 {
                    // 21 bytes aligned to 8: 3 bytes of slack after it at a page's end,
                    // the rest of the page at its start.
                    let layout = layout(21, 8);
                    // SAFETY: a non-zero size.
                    let object = unsafe { heap.alloc(layout) };
                    if !heap.is_guarded(object) {
                        // SAFETY: freed once, with its layout.
                        unsafe { heap.dealloc(object, layout) };
                        continue;
                    }
                    let spoil = round % 2 == 0;
                    // SAFETY: the object's bytes, and one byte of its page past it.
                    unsafe {
                        object.write_bytes(1, 21);
                        if spoil {
                            object.add(21 + round % 3).write(cpu.index() as u8);
                            corrupted.fetch_add(1, Ordering::Relaxed);
                        }
                        heap.dealloc(object, layout);
                    }
                }
            });
            let seen = reports.take();
            assert_eq!(seen.len(), corrupted.load(Ordering::Relaxed));
            assert!(!seen.is_empty());
            for report in &seen {
                let ReportKind::Corrupted {
                    bytes: 1, first, ..
                } = report.kind
                else {
                    panic!("{report}");
                };
                let object = report.object.unwrap();
                assert!(
                    (object.addr + 21..object.addr + 24).contains(&first),
                    "{report}"
                );
                // Freed on the CPU that spoiled it, which wrote its own index there.
                let free_cpu = object.free.unwrap().cpu.unwrap();
                assert_eq!(object.alloc.cpu, Some(free_cpu));
            }
        },
    );
}

#[test]
fn the_pool_runs_full_under_every_cpu_and_the_slabs_take_the_rest() {
    watchdog("the_pool_runs_full_under_every_cpu", DEADLOCK_LIMIT, || {
        let (machine, frames, tlb) = machine();
        let vm = manager(machine, frames, tlb);
        let heap = KernelHeap::new(sampling(1, 8));
        heap.init(&vm).unwrap();
        let layout = layout(200, 8);
        let held = Mutex::new(Vec::new());
        machine.on_every_cpu(|cpu| {
            // SAFETY: non-zero sizes; every block is freed below, with its layout.
            let blocks: Vec<usize> = (0..6)
                .map(|_| unsafe { heap.alloc(layout) })
                .inspect(|&block| {
                    assert!(!block.is_null());
                    // SAFETY: the block's bytes are its own.
                    unsafe { block.write_bytes(cpu.index() as u8, 200) };
                })
                .map(|block| block as usize)
                .collect();
            held.lock().unwrap().push((cpu.index(), blocks));
        });
        let held = held.into_inner().unwrap();
        let guarded = held
            .iter()
            .flat_map(|(_, blocks)| blocks)
            .filter(|&&block| heap.is_guarded(block as *const u8))
            .count();
        let stats = heap.guarded_stats();
        assert_eq!(guarded, 8, "every slot taken, no more");
        assert_eq!((stats.live, stats.free_slots), (8, 0));
        assert_eq!(stats.sampled + stats.pool_full, (CPUS * 6) as u64);
        // SAFETY: each block is freed once, with its layout, its bytes intact.
        unsafe {
            for (cpu, blocks) in held {
                for block in blocks {
                    let block = block as *mut u8;
                    assert!(
                        std::slice::from_raw_parts(block, 200)
                            .iter()
                            .all(|&b| b == cpu as u8)
                    );
                    heap.dealloc(block, layout);
                }
            }
        }
        let stats = heap.guarded_stats();
        assert_eq!((stats.live, stats.free_slots), (0, 8));
    });
}

#[test]
fn cpus_allocating_and_freeing_at_once_keep_every_object_intact_and_give_frames_back() {
    watchdog(
        "cpus_allocating_and_freeing_at_once",
        DEADLOCK_LIMIT,
        || {
            let (machine, frames, tlb) = machine();
            let vm = manager(machine, frames, tlb);
            let heap = KernelHeap::new(sampling(3, 32));
            heap.init(&vm).unwrap();
            machine.on_every_cpu(|cpu| {
                let mut rng = Rng::new(cpu.index() as u64 + 100);
                let mut live: Vec<(*mut u8, std::alloc::Layout, u8)> = Vec::new();
                for step in 0..2000 {
                    if live.len() > 40 || (!live.is_empty() && rng.below(2) == 0) {
                        let (block, layout, fill) =
                            live.swap_remove(rng.below(live.len() as u64) as usize);
                        // SAFETY: live, freed once, with its layout.
                        unsafe {
                            assert!(
                                std::slice::from_raw_parts(block, layout.size())
                                    .iter()
                                    .all(|&b| b == fill)
                            );
                            heap.dealloc(block, layout);
                        }
                    } else {
                        let layout = layout(1 + rng.below(2048) as usize, 1 << rng.below(5));
                        let fill = (step % 251) as u8;
                        // SAFETY: a non-zero size.
                        let block = unsafe { heap.alloc(layout) };
                        assert!(!block.is_null());
                        // SAFETY: the block's bytes are its own.
                        unsafe { block.write_bytes(fill, layout.size()) };
                        live.push((block, layout, fill));
                    }
                }
                for (block, layout, _) in live {
                    // SAFETY: live, freed once, with its layout.
                    unsafe { heap.dealloc(block, layout) };
                }
            });
            let stats = heap.guarded_stats();
            assert!(stats.sampled > 100, "{stats:?}");
            assert_eq!((stats.live, stats.reports), (0, 0));
            // The pool's pages are all unmapped again: only its records hold a frame
            // (plus what the slabs and the list keep).
            let before = frames.stats().free;
            heap.shrink();
            vm.purge();
            assert!(frames.stats().free >= before);
        },
    );
}
