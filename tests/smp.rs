//! Several CPUs on the simulated machine, each with its own TLB: the library's
//! shootdown reaches every one of them, and the checks can tell when it does not.
//! Interrupts arriving under a lock are in `smp_interrupted.rs`, an IPI nested in a
//! target's flush in `smp_nested.rs`.

mod common;

use common::smp::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use vmalloc::smp::Shootdown;
use vmalloc::vmalloc::VmOptions;
use vmalloc::{FrameSource, TlbFlush, Vmalloc, VmallocConfig};
use vmalloc_sim::scenarios::manager_with as manager;
use vmalloc_sim::{DEADLOCK_LIMIT, PoisonOnFree, Rng, SimFrames, SimMachine, watchdog};
use x86_64::VirtAddr;
use x86_64::structures::paging::{Page, PhysFrame};

#[test]
fn four_cpus_share_one_manager_and_every_free_is_seen_by_all() {
    watchdog(
        "four_cpus_share_one_manager_and_every_free_is_seen_by_all",
        DEADLOCK_LIMIT,
        || {
            let (machine, frames, tlb) = smp_machine(4, true);
            // SAFETY: the machine's page tables serve this manager alone, and its flush reaches every CPU that runs.
            let vm = unsafe {
                manager(
                    machine,
                    frames,
                    tlb,
                    VmallocConfig {
                        lazy_threshold_pages: 64,
                        ..VmallocConfig::default()
                    },
                )
            };
            machine.on_every_cpu(|cpu| {
                let mut rng = Rng::new(cpu.index() as u64 + 1);
                let mut live: Vec<(std::ptr::NonNull<u8>, usize, u8)> = Vec::new();
                let mut lent: Vec<(std::ptr::NonNull<u8>, Vec<PhysFrame>, [u8; 16])> = Vec::new();
                for round in 0..300usize {
                    let tag = (cpu.index() * 64 + round % 64) as u8;
                    match rng.below(6) {
                        0 | 1 => {
                            let pages = 1 + rng.below(8) as usize;
                            let ptr = vm.vmalloc(pages * 4096).unwrap();
                            for page in 0..pages {
                                // SAFETY: bytes the test owns: no live Rust value lives there.
                                unsafe { cpu.write(addr(ptr) + (page * 4096) as u64, &[tag; 32]) }
                                    .unwrap();
                            }
                            live.push((ptr, pages, tag));
                        }
                        2 if !live.is_empty() => {
                            let (ptr, pages, tag) =
                                live.swap_remove(rng.below(live.len() as u64) as usize);
                            for page in 0..pages {
                                let mut back = [0; 32];
                                cpu.read(addr(ptr) + (page * 4096) as u64, &mut back)
                                    .unwrap();
                                assert_eq!(
                                    back,
                                    [tag; 32],
                                    "CPU {} sees its own data",
                                    cpu.index()
                                );
                            }
                            // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
                            unsafe { vm.vfree(ptr.as_ptr()) }.unwrap();
                        }
                        3 if !live.is_empty() => {
                            let index = rng.below(live.len() as u64) as usize;
                            let (ptr, pages, tag) = live[index];
                            let grown = pages + 1 + rng.below(4) as usize;
                            // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
                            let moved = unsafe { vm.vrealloc(ptr.as_ptr(), grown * 4096) }.unwrap();
                            let mut back = [0; 32];
                            cpu.read(addr(moved), &mut back).unwrap();
                            assert_eq!(back, [tag; 32], "vrealloc kept the contents");
                            for page in pages..grown {
                                // SAFETY: bytes the test owns: no live Rust value lives there.
                                unsafe {
                                    cpu.write(addr(moved) + (page * 4096) as u64, &[tag; 32])
                                }
                                .unwrap();
                            }
                            live[index] = (moved, grown, tag);
                        }
                        4 => {
                            let owned: Vec<PhysFrame> = (0..1 + rng.below(4))
                                .map(|_| frames.alloc_frame().unwrap())
                                .collect();
                            // SAFETY: frames this test took from the allocator and holds.
                            let ptr = unsafe { vm.vmap(&owned, vmalloc::Prot::KERNEL_RW) }.unwrap();
                            // A stamp no other mapping holds: this CPU and round.
                            let mut stamp = [0xa5; 16];
                            stamp[0] = cpu.index() as u8;
                            stamp[1..3].copy_from_slice(&(round as u16).to_le_bytes());
                            // SAFETY: bytes the test owns: no live Rust value lives there.
                            unsafe { cpu.write(addr(ptr), &stamp) }.unwrap();
                            lent.push((ptr, owned, stamp));
                        }
                        5 if !lent.is_empty() => {
                            let (ptr, owned, stamp) = lent.swap_remove(0);
                            let mut back = [0; 16];
                            cpu.read(addr(ptr), &mut back).unwrap();
                            assert_eq!(back, stamp);
                            let mut returned = Vec::new();
                            // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
                            unsafe { vm.vunmap(ptr.as_ptr(), |frame| returned.push(frame)) }
                                .unwrap();
                            assert_eq!(returned, owned);
                            // Another CPU may map the freed range at once, but never onto the
                            // frames this CPU still holds: seeing the stamp is a stale entry.
                            let stale = cpu.read(addr(ptr), &mut back).is_ok() && back == stamp;
                            assert!(
                                !stale,
                                "CPU {} still reaches a vunmapped frame",
                                cpu.index()
                            );
                            // SAFETY: frames the test took and no longer uses (or a bad free, refused).
                            unsafe { frames.free_frames(&owned) }.unwrap();
                        }
                        _ => vm.purge(),
                    }
                }
                for (ptr, ..) in live {
                    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
                    unsafe { vm.vfree(ptr.as_ptr()) }.unwrap();
                }
                for (ptr, owned, _) in lent {
                    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
                    unsafe { vm.vunmap(ptr.as_ptr(), |_| {}) }.unwrap();
                    // SAFETY: frames the test took and no longer uses (or a bad free, refused).
                    unsafe { frames.free_frames(&owned) }.unwrap();
                }
            });
            vm.purge();
            let stats = vm.stats();
            assert_eq!(
                (stats.areas, stats.data_frames, stats.pending_purge_frames),
                (0, 0, 0)
            );
            // Every frame is free or the manager's own: its tables (the blocks keep
            // theirs while it lives), its bookkeeping, or a CPU's cache.
            assert_eq!(
                frames.stats().free
                    + stats.bookkeeping_frames
                    + stats.page_table_frames
                    + stats.cached_frames,
                frames.stats().total,
                "every frame is back: {stats:?}"
            );
            assert!(tlb.stats().ipis > 0, "the CPUs were shot at");
        },
    );
}

/// CPU 1 caches a translation of a vmalloc page; CPU 0 frees the area, purges, and
/// hands the frame out again with new contents; then CPU 1 reads the old address.
/// Returns what CPU 1 read, or `None` if it faulted.
fn stale_read_after_reuse<T: TlbFlush + Sync>(
    machine: &'static SimMachine,
    frames: &'static SimFrames,
    tlb: T,
) -> Option<[u8; 8]> {
    // The tree's path: `tests/blocks.rs` checks the same for small areas in blocks.
    let tree = VmallocConfig {
        cpu_caches: false,
        ..VmallocConfig::default()
    };
    // SAFETY: the machine's page tables serve this manager alone, and its flush reaches every CPU that runs.
    let vm = unsafe { manager(machine, frames, tlb, tree) };
    let old = addr(vm.vmalloc(4096).unwrap());
    let (seen, (new, hole)) = machine.read_again_after(1, old, || {
        let frame = vm.vmalloc_to_frame(old).unwrap();
        // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
        unsafe { vm.vfree(old.as_mut_ptr()) }.unwrap();
        vm.purge();
        // The old virtual range goes to a reservation without frames, so the frame
        // comes back at another address and the old one is mapped to nothing.
        let hole = vm.reserve(4096, &vmalloc::VmOptions::default()).unwrap();
        assert_eq!(addr(hole), old, "the virtual range came back");
        let new = vm.vmalloc(4096).unwrap();
        assert_eq!(
            vm.vmalloc_to_frame(addr(new)).unwrap(),
            frame,
            "the frame came back"
        );
        // SAFETY: bytes the test owns: no live Rust value lives there.
        unsafe { machine.write(addr(new), b"NEWDATA!") }.unwrap();
        (new, hole)
    });
    // CPU 1 left when it was done, so these flushes do not wait for it.
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    unsafe { vm.vfree(new.as_ptr()) }.unwrap();
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    unsafe { vm.vfree(hole.as_ptr()) }.unwrap();
    seen
}

#[test]
fn a_translation_cached_on_another_cpu_is_gone_before_its_frame_is_reused() {
    watchdog(
        "a_translation_cached_on_another_cpu_is_gone_before_its_frame_is_reused",
        DEADLOCK_LIMIT,
        || {
            let (machine, frames, tlb) = smp_machine(2, false);
            assert_eq!(
                stale_read_after_reuse(machine, frames, tlb),
                None,
                "CPU 1 faults"
            );
            assert!(tlb.stats().ipis > 0 && machine.cpu(1).ipis_taken() > 0);
        },
    );
}

#[test]
fn a_local_only_flush_is_caught_reading_the_reused_frame() {
    watchdog(
        "a_local_only_flush_is_caught_reading_the_reused_frame",
        DEADLOCK_LIMIT,
        || {
            // The negative control: the same steps with a flush that only reaches CPU 0.
            let (machine, frames, _) = smp_machine(2, false);
            assert_eq!(
                stale_read_after_reuse(machine, frames, machine),
                Some(*b"NEWDATA!"),
                "without a shootdown CPU 1 reads the new owner's data"
            );
        },
    );
}

/// The calling CPU's flushes, by a CPU that spins with interrupts disabled: it never
/// takes an IPI while it waits.
struct InterruptsOff(&'static SimMachine);

impl TlbFlush for InterruptsOff {
    fn flush_page(&self, page: Page) {
        self.0.flush_page(page);
    }
    fn flush_range(&self, range: x86_64::structures::paging::page::PageRange) {
        self.0.flush_range(range);
    }
    fn flush_all(&self) {
        self.0.flush_all();
    }
    fn relax(&self) {
        thread::yield_now();
    }
}

#[test]
fn crossing_shootdowns_with_interrupts_disabled_do_not_deadlock() {
    watchdog(
        "crossing_shootdowns_with_interrupts_disabled_do_not_deadlock",
        DEADLOCK_LIMIT,
        || {
            let (machine, _, _) = smp_machine(2, false);
            // No IPI handler runs: each initiator must serve its own mailbox while it waits.
            let tlb: &'static _ =
                Box::leak(Box::new(Shootdown::new(machine, InterruptsOff(machine))));
            let page = Page::containing_address(VirtAddr::new(0xffff_c900_0000_0000));
            let rounds = 2000;
            machine.on_every_cpu(|_| {
                for i in 0..rounds {
                    if i % 2 == 0 {
                        tlb.flush_page(page);
                    } else {
                        tlb.flush_all();
                    }
                }
            });
            let stats = tlb.stats();
            assert_eq!(stats.shootdowns, 2 * rounds);
            assert!(
                stats.served > 0,
                "each CPU served the other's requests while waiting"
            );
        },
    );
}

#[test]
fn two_managers_purging_at_once_on_two_cpus_both_finish() {
    watchdog(
        "two_managers_purging_at_once_on_two_cpus_both_finish",
        DEADLOCK_LIMIT,
        || {
            let (machine, frames, tlb) = smp_machine(2, false);
            // SAFETY: the machine's page tables serve this manager alone, and its flush reaches every CPU that runs.
            let low = unsafe { manager(machine, frames, tlb, VmallocConfig::default()) };
            // SAFETY: the machine's page tables serve this manager alone, and its flush reaches every CPU that runs.
            let high = unsafe {
                manager(
                    machine,
                    frames,
                    tlb,
                    VmallocConfig {
                        start: VirtAddr::new(0xffff_ea00_0000_0000),
                        size: 1 << 40,
                        ..VmallocConfig::default()
                    },
                )
            };
            let managers = [&low, &high];
            machine.on_every_cpu(|cpu| {
                let vm = managers[cpu.index()];
                for _ in 0..300 {
                    let ptr = vm.vmalloc(3 * 4096).unwrap();
                    // SAFETY: bytes the test owns: no live Rust value lives there.
                    unsafe { cpu.write(addr(ptr), b"x") }.unwrap();
                    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
                    unsafe { vm.vfree(ptr.as_ptr()) }.unwrap();
                    vm.purge();
                }
            });
            assert_eq!((low.stats().areas, high.stats().areas), (0, 0));
        },
    );
}

/// Ten areas apart from each other, freed and purged on CPU 0 while CPU 1 serves
/// its IPIs: one shootdown flushes the ten ranges everywhere, and a translation CPU 1
/// cached of each is gone.
#[test]
fn a_purge_of_many_ranges_is_one_shootdown_that_reaches_every_range() {
    watchdog(
        "a_purge_of_many_ranges_is_one_shootdown_that_reaches_every_range",
        DEADLOCK_LIMIT,
        || {
            let (machine, frames, tlb) = smp_machine(2, false);
            // SAFETY: the machine's page tables serve this manager alone, and its flush reaches every CPU that runs.
            let vm = unsafe { manager(machine, frames, tlb, VmallocConfig::default()) };
            // Labelled areas come from the tree; every second one stays, so the
            // freed ones are ten ranges and no page table empties.
            let tagged = VmOptions {
                tag: "apart",
                ..VmOptions::default()
            };
            let areas: Vec<_> = (0..20)
                .map(|_| vm.vmalloc_with(4096, &tagged).unwrap())
                .collect();
            let freed: Vec<VirtAddr> = areas.iter().step_by(2).map(|ptr| addr(*ptr)).collect();
            let done = AtomicBool::new(false);
            let cached = AtomicBool::new(false);
            thread::scope(|scope| {
                scope.spawn(|| {
                    // Later flushes do not wait for a CPU whose thread is gone.
                    let cpu = machine.cpu(1);
                    let _offline = cpu.offline_when_dropped();
                    for &at in &freed {
                        cpu.read(at, &mut [0]).unwrap();
                    }
                    cached.store(true, Ordering::Release);
                    while !done.load(Ordering::Acquire) {
                        cpu.poll();
                        thread::yield_now();
                    }
                    for &at in &freed {
                        assert!(cpu.cached(at).is_none(), "CPU 1 still holds a freed page");
                    }
                });
                machine.cpu(0).enter();
                while !cached.load(Ordering::Acquire) {
                    thread::yield_now();
                }
                for ptr in areas.iter().step_by(2) {
                    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
                    unsafe { vm.vfree(ptr.as_ptr()) }.unwrap();
                }
                let before = tlb.stats();
                vm.purge();
                let after = tlb.stats();
                done.store(true, Ordering::Release);
                assert_eq!(
                    (
                        after.shootdowns - before.shootdowns,
                        after.ipis - before.ipis
                    ),
                    (1, 1),
                    "ten ranges, one shootdown"
                );
            });
            for ptr in areas.iter().skip(1).step_by(2) {
                // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
                unsafe { vm.vfree(ptr.as_ptr()) }.unwrap();
            }
        },
    );
}

#[test]
fn a_cpu_going_offline_is_no_longer_waited_for() {
    watchdog(
        "a_cpu_going_offline_is_no_longer_waited_for",
        DEADLOCK_LIMIT,
        || {
            let (machine, _, tlb) = smp_machine(3, false);
            machine.cpu(2).go_offline();
            // CPU 1 is online but never polls: only its leaving lets the flush finish.
            let done = AtomicBool::new(false);
            thread::scope(|scope| {
                scope.spawn(|| {
                    tlb.flush_all();
                    done.store(true, Ordering::Release);
                });
                thread::sleep(std::time::Duration::from_millis(20));
                assert!(!done.load(Ordering::Acquire), "the flush waits for CPU 1");
                machine.cpu(1).go_offline();
            });
            assert!(done.load(Ordering::Acquire));
            assert_eq!(machine.cpu(2).ipis_taken(), 0, "CPU 2 was never shot at");
        },
    );
}

#[test]
fn no_frame_comes_back_while_any_cpu_still_reaches_it() {
    watchdog("poisoned frames", DEADLOCK_LIMIT, || {
        for cpu_caches in [false, true] {
            let (machine, frames, tlb) = smp_machine(2, true);
            let poison: &'static PoisonOnFree =
                Box::leak(Box::new(PoisonOnFree::new(machine, frames)));
            let config = VmallocConfig {
                cpu_caches,
                lazy_threshold_pages: 48,
                ..VmallocConfig::default()
            };
            // SAFETY: the machine's page tables serve this manager alone.
            let vm = unsafe { Vmalloc::new(config, machine.root(), machine.phys(), poison, tlb) }
                .unwrap();
            let areas: Vec<(usize, usize)> = (1..40)
                .map(|pages| (vm.vmalloc(pages * 4096).unwrap().as_ptr() as usize, pages))
                .collect();
            let cached = AtomicBool::new(false);
            machine.on_every_cpu(|cpu| {
                if cpu.index() == 1 {
                    // Every page read once: CPU 1 caches every translation.
                    for &(start, pages) in &areas {
                        for page in 0..pages {
                            let mut byte = [0];
                            cpu.read(VirtAddr::new((start + page * 4096) as u64), &mut byte)
                                .unwrap();
                        }
                    }
                    cached.store(true, Ordering::Release);
                    // Served while CPU 0 frees: interrupts on, polled.
                    while cached.load(Ordering::Acquire) {
                        cpu.poll();
                        thread::yield_now();
                    }
                    return;
                }
                while !cached.load(Ordering::Acquire) {
                    thread::yield_now();
                }
                eprintln!(
                    "cpu1 caches first: {:?}",
                    machine.cpu(1).cached(VirtAddr::new(areas[0].0 as u64))
                );
                for &(start, _) in &areas {
                    // SAFETY: not used again (CPU 1 only read them before).
                    unsafe { vm.vfree(start as *mut u8) }.unwrap();
                }
                vm.purge();
                cached.store(false, Ordering::Release);
            });
            eprintln!(
                "poisoned {} stale {}",
                poison.poisoned(),
                poison.stale_reads().len()
            );
            assert!(
                poison.poisoned() >= (1..40).sum::<u64>(),
                "every data frame came back"
            );
            let stale = poison.stale_reads();
            assert!(
                stale.is_empty(),
                "caches {cpu_caches}: {} frames came back while a CPU could still reach them, \
                 the first: {:?}",
                stale.len(),
                stale.first()
            );
            drop(vm);
            assert_eq!(poison.stale_reads(), [], "caches {cpu_caches}: teardown");
        }
    });
}

#[test]
fn finishing_another_shootdowns_ticket_returns_instead_of_waiting_forever() {
    use vmalloc::tlb::{FlushBatch, FlushTicket};
    watchdog("a foreign ticket", DEADLOCK_LIMIT, || {
        let machine: &'static SimMachine = Box::leak(Box::new(SimMachine::new(
            vmalloc_sim::SimConfig::new(16 << 20).with_cpus(2),
        )));
        type Tlb = Shootdown<&'static SimMachine, &'static SimMachine>;
        let a: &'static Tlb = Box::leak(Box::new(Shootdown::new(machine, machine)));
        let b: &'static Tlb = Box::leak(Box::new(Shootdown::new(machine, machine)));
        machine.set_ipi_handler(move || {
            a.handle_ipi();
            b.handle_ipi();
        });
        let stop = AtomicBool::new(false);
        thread::scope(|scope| {
            // CPU 1 takes its IPIs until the check is done.
            scope.spawn(|| {
                let cpu = machine.cpu(1);
                cpu.enter();
                while !stop.load(Ordering::Acquire) {
                    cpu.poll();
                    thread::yield_now();
                }
            });
            machine.cpu(0).enter();
            let mut ticket = FlushTicket::DONE;
            a.start_flush(FlushBatch::All, &mut ticket);
            let mut foreign = ticket;
            assert!(!foreign.is_done());
            a.finish_flush(&mut ticket);
            // B never gave out that request number: nothing of B's to wait for.
            b.finish_flush(&mut foreign);
            assert!(foreign.is_done());
            stop.store(true, Ordering::Release);
        });
    });
}

/// Ranges whose pages together pass `u64::MAX` (4,097 of the whole address space,
/// each valid) are one full flush, through `flush_ranges` and `start_flush` alike:
/// the count of their pages overflowed (a panic in debug builds; in release a
/// wrapped count sent them range by range).
#[test]
fn ranges_whose_page_count_overflows_are_one_full_flush() {
    watchdog("ranges_whose_page_count_overflows", DEADLOCK_LIMIT, || {
        let (machine, _frames, tlb) = smp_machine(1, false);
        machine.cpu(0).enter();
        let whole = Page::range(
            Page::containing_address(VirtAddr::new(0)),
            Page::containing_address(VirtAddr::new(0xffff_ffff_ffff_f000)),
        );
        let ranges = vec![whole; 4097];
        let before = machine.tlb_stats();
        tlb.flush_ranges(&ranges);
        let mut ticket = vmalloc::tlb::FlushTicket::DONE;
        tlb.start_flush(vmalloc::tlb::FlushBatch::Ranges(&ranges), &mut ticket);
        tlb.finish_flush(&mut ticket);
        let after = machine.tlb_stats();
        assert_eq!(after.full_flushes - before.full_flushes, 2);
        assert_eq!(after.range_flushes, before.range_flushes);
    });
}

/// `ShootdownStats::ipis` counts every IPI a shootdown sends: five CPUs call work on
/// the others at once while CPU 1 is slow to serve, so its four-entry work queue
/// fills and the callers send it IPIs again until it has room; the stats say what
/// the machine saw sent (they said 25, one per target per call, of 89).
#[test]
fn shootdown_stats_count_every_ipi_sent() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::time::{Duration, Instant};
    watchdog(
        "shootdown_stats_count_every_ipi_sent",
        DEADLOCK_LIMIT,
        || {
            let (machine, _, tlb) = vmalloc_sim::scenarios::smp_machine(
                vmalloc_sim::SimConfig::new(64 << 20).with_cpus(6),
            );
            let done = AtomicUsize::new(0);
            let resent = AtomicBool::new(false);
            std::thread::scope(|scope| {
                scope.spawn(|| {
                    let cpu = machine.cpu(1);
                    cpu.enter();
                    let _offline = cpu.offline_when_dropped();
                    // Five calls send it five IPIs; more are the callers' re-sends.
                    let start = Instant::now();
                    while machine.ipis_sent() <= 25 && start.elapsed() < Duration::from_secs(5) {
                        std::thread::yield_now();
                    }
                    resent.store(machine.ipis_sent() > 25, Ordering::Release);
                    while done.load(Ordering::Acquire) < 5 {
                        cpu.poll();
                        std::thread::yield_now();
                    }
                });
                for index in [0, 2, 3, 4, 5] {
                    let done = &done;
                    scope.spawn(move || {
                        let cpu = machine.cpu(index);
                        cpu.enter();
                        let _offline = cpu.offline_when_dropped();
                        tlb.call_on_other_cpus(&|| {});
                        done.fetch_add(1, Ordering::AcqRel);
                        while done.load(Ordering::Acquire) < 5 {
                            cpu.poll();
                            std::thread::yield_now();
                        }
                    });
                }
            });
            assert!(resent.load(Ordering::Acquire), "no call had to send again");
            let stats = tlb.stats();
            assert_eq!(stats.calls, 5);
            assert_eq!(stats.ipis, machine.ipis_sent(), "{stats:?}");
        },
    );
}
