//! The machine shared between threads: translations in parallel and racing a
//! thread that rewrites the entry.

use super::*;
use std::sync::atomic::{AtomicU64, Ordering};

#[test]
fn machine_is_send_and_sync() {
    fn shareable<T: Send + Sync>() {}
    shareable::<SimMachine>();
    shareable::<SimPhys<'static>>();
}

#[test]
fn threads_translate_concurrently() {
    const THREADS: u64 = 4;
    const PAGES: u64 = 64;
    const ROUNDS: u64 = 20;
    let machine = machine();
    let mut tables = Tables::new(&machine);
    for page in 0..THREADS * PAGES {
        let frame = tables.map_new(BASE + page * 0x1000, KERNEL_RW);
        // SAFETY: bytes the test owns: no live Rust value lives there.
        unsafe { machine.write_phys(frame.start_address(), &page.to_le_bytes()) };
    }
    let touched: Vec<Vec<u64>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..THREADS)
            .map(|thread| {
                let machine = &machine;
                scope.spawn(move || {
                    let mut rng = Rng::new(thread);
                    let mut touched = Vec::new();
                    for _ in 0..ROUNDS * PAGES {
                        let page = rng.below(THREADS * PAGES);
                        let mut buf = [0; 8];
                        machine.read(virt(BASE + page * 0x1000), &mut buf).unwrap();
                        assert_eq!(u64::from_le_bytes(buf), page);
                        touched.push(page);
                        if rng.below(16) == 0 {
                            machine.flush_page(page_of(BASE + page * 0x1000));
                        }
                    }
                    touched
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    let mut distinct: Vec<u64> = touched.concat();
    distinct.sort_unstable();
    distinct.dedup();
    let stats = machine.tlb_stats();
    assert_eq!(stats.hits + stats.misses, THREADS * ROUNDS * PAGES);
    assert!(
        stats.misses >= distinct.len() as u64,
        "every page misses once"
    );
    assert!(stats.hits > 0);
    assert!(stats.page_flushes > 0);
    assert!(machine.tlb_len() <= distinct.len());
}

#[test]
fn translations_race_with_a_thread_rewriting_the_entry() {
    let machine = machine();
    let mut tables = Tables::new(&machine);
    let frames = [tables.bump.frame(), tables.bump.frame()];
    for (i, frame) in frames.iter().enumerate() {
        // SAFETY: bytes the test owns: no live Rust value lives there.
        unsafe { machine.fill_phys(frame.start_address(), 4096, i as u8 + 1) };
    }
    let walked = tables.map(BASE, frames[0].start_address().as_u64(), 1, KERNEL_RW);
    let entry_addr = walked[3].start_address() + index_at(BASE, 1) as u64 * 8;
    let entry_ptr = machine.phys().phys_to_virt(entry_addr).cast::<u64>();
    // SAFETY: the entry is 8-aligned inside the machine's memory, which outlives the
    // scope below, and is only accessed atomically from here on.
    let entry = unsafe { core::sync::atomic::AtomicU64::from_ptr(entry_ptr) };
    let values = frames.map(|f| f.start_address().as_u64() | KERNEL_RW.bits());

    std::thread::scope(|scope| {
        scope.spawn(|| {
            for round in 0..2000 {
                let value = values[round % 2] * u64::from(round % 3 != 0);
                entry.store(value, core::sync::atomic::Ordering::Release);
                machine.flush_page(page_of(BASE));
            }
        });
        for _ in 0..3 {
            scope.spawn(|| {
                for _ in 0..2000 {
                    let mut buf = [0; 64];
                    match machine.read(virt(BASE + 0x100), &mut buf) {
                        Ok(()) => assert!(buf == [1; 64] || buf == [2; 64], "{buf:?}"),
                        Err(fault) => assert_eq!(fault.page_fault().unwrap().code, Code::empty()),
                    }
                }
            });
        }
    });
    assert_eq!(machine.tlb_stats().page_flushes, 2000);
}

/// Threads running as one CPU take turns with interrupts off, whether they claim
/// it through the occupant word or through a bias; bursts by one thread bias the
/// CPU to it and the other thread's claims revoke the bias.
#[test]
fn threads_as_one_cpu_never_overlap_with_interrupts_off_through_bias_and_revocation() {
    use vmalloc::smp::Cpus as _;
    let machine = machine();
    let inside = AtomicU64::new(0);
    let overlaps = AtomicU64::new(0);
    std::thread::scope(|scope| {
        for thread in 0..3u64 {
            let (machine, inside, overlaps) = (&machine, &inside, &overlaps);
            scope.spawn(move || {
                let mut rng = Rng::new(thread + 1);
                for _ in 0..1000 {
                    // A burst long enough to bias the CPU, then a pause.
                    for _ in 0..rng.below(64) {
                        let state = machine.irq_save();
                        if inside.fetch_add(1, Ordering::SeqCst) != 0 {
                            overlaps.fetch_add(1, Ordering::Relaxed);
                        }
                        for _ in 0..rng.below(2000) {
                            std::hint::spin_loop();
                        }
                        inside.fetch_sub(1, Ordering::SeqCst);
                        machine.irq_restore(state);
                    }
                    std::thread::yield_now();
                }
            });
        }
    });
    assert_eq!(
        overlaps.load(Ordering::Relaxed),
        0,
        "two threads ran as CPU 0 with interrupts off at once"
    );
    let (biased, revoked) = machine.cpus.biases(0);
    assert!(
        biased > 0 && revoked > 0,
        "biased {biased} times, revoked {revoked} times"
    );
}

/// A critical section that counts the times two threads were inside at once.
#[derive(Default)]
struct Section {
    inside: AtomicU64,
    overlaps: AtomicU64,
}

impl Section {
    /// Spins `spin` times inside.
    fn enter(&self, spin: u64) {
        if self.inside.fetch_add(1, Ordering::SeqCst) != 0 {
            self.overlaps.fetch_add(1, Ordering::Relaxed);
        }
        for _ in 0..spin {
            std::hint::spin_loop();
        }
        self.inside.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A thread with interrupts off through one machine that calls into another (one
/// machine's kernel heap as the global allocator, called under another's lock)
/// holds its CPU on that one too: the threads running as CPU 0 there never run
/// beside it with interrupts off, and its nested calls on either machine hold
/// nothing more. (Two threads nesting the machines in opposite orders would wait for
/// each other, as two locks taken in opposite orders do.)
#[test]
fn a_thread_with_interrupts_off_through_one_machine_holds_its_cpu_on_another() {
    use vmalloc::smp::Cpus as _;
    let (outer, inner) = (machine(), machine());
    let section = Section::default();
    let critical = |spin: u64| section.enter(spin);
    let start = std::sync::Barrier::new(3);
    std::thread::scope(|scope| {
        for thread in 0..3u64 {
            let (outer, inner, critical, start) = (&outer, &inner, &critical, &start);
            scope.spawn(move || {
                let mut rng = Rng::new(thread + 1);
                start.wait();
                for _ in 0..10_000 {
                    // Thread 0 nests the inner machine in the outer one's section;
                    // the others run on the inner machine alone, in bursts that
                    // bias its CPU to them.
                    let held = (thread == 0).then(|| outer.irq_save());
                    let state = inner.irq_save();
                    let again = (inner.irq_save(), held.map(|_| outer.irq_save()));
                    critical(rng.below(500));
                    if let Some(again) = again.1 {
                        outer.irq_restore(again);
                    }
                    inner.irq_restore(again.0);
                    critical(rng.below(500));
                    inner.irq_restore(state);
                    if let Some(held) = held {
                        outer.irq_restore(held);
                    }
                    assert!(outer.cpu(0).interrupts_enabled(), "interrupts back on");
                    if rng.below(8) == 0 {
                        std::thread::yield_now();
                    }
                }
            });
        }
    });
    assert_eq!(
        section.overlaps.load(Ordering::Relaxed),
        0,
        "two threads ran as CPU 0 of the inner machine with interrupts off at once"
    );
}

/// A thread that entered another CPU with interrupts off (a safe `enter` after a
/// safe `irq_save`) holds that CPU too when it calls in: it never runs there beside
/// the thread running as that CPU. Its `irq_restore` lets go of the CPU it turned
/// them off on, whichever it runs as by then.
#[test]
fn a_thread_that_enters_another_cpu_with_interrupts_off_holds_that_one_too() {
    use crate::watchdog;
    use std::time::Duration;
    use vmalloc::smp::Cpus as _;
    let machine = SimMachine::new(SimConfig::new(64 << 20).with_cpus(2));
    let section = Section::default();
    let critical = |spin: u64| section.enter(spin);
    let name = "a_thread_that_enters_another_cpu_with_interrupts_off_holds_that_one_too";
    watchdog(name, Duration::from_secs(60), || {
        std::thread::scope(|scope| {
            let (machine, critical) = (&machine, &critical);
            scope.spawn(move || {
                let mut rng = Rng::new(1);
                for _ in 0..5_000 {
                    machine.cpu(0).enter();
                    let off = machine.irq_save();
                    machine.cpu(1).enter();
                    let nested = machine.irq_save();
                    critical(rng.below(300));
                    machine.irq_restore(nested);
                    // Restored as CPU 1: CPU 0's hold is the one let go.
                    machine.irq_restore(off);
                }
            });
            scope.spawn(move || {
                machine.cpu(1).enter();
                let mut rng = Rng::new(2);
                for _ in 0..5_000 {
                    let state = machine.irq_save();
                    critical(rng.below(300));
                    machine.irq_restore(state);
                }
            });
            scope.spawn(move || {
                let mut rng = Rng::new(3);
                for _ in 0..5_000 {
                    let state = machine.irq_save();
                    std::hint::black_box(rng.below(300));
                    machine.irq_restore(state);
                }
            });
        });
    });
    assert_eq!(
        section.overlaps.load(Ordering::Relaxed),
        0,
        "two threads ran as CPU 1 with interrupts off at once"
    );
}

#[test]
fn a_panic_inside_cpu_run_puts_the_thread_back_on_its_cpu() {
    let machine = SimMachine::new(SimConfig::new(64 << 20).with_cpus(2));
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                machine.cpu(0).enter();
                let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    machine.cpu(1).run(|_| panic!("a failed check inside run"))
                }));
                assert!(unwound.is_err());
                assert_eq!(machine.current_cpu(), 0, "back on CPU 0");
            })
            .join()
            .unwrap();
    });
}

/// An interrupt handler that panics (a failed check in it) turns the CPU's
/// interrupts back on as it unwinds: another thread then takes the CPU with
/// interrupts off. It was left held by the thread that was gone, and every later
/// `irq_save` on that CPU (every heap and manager lock) waited forever.
#[test]
fn a_panicking_interrupt_handler_leaves_its_cpu_free() {
    use vmalloc::smp::Cpus as _;
    let machine: &'static SimMachine = Box::leak(Box::new(machine()));
    let failed = std::thread::spawn(move || {
        machine
            .cpu(0)
            .interrupt_after(0, || panic!("a failed check in the handler"));
        let mut buf = [0u8; 1];
        let _ = machine.read(virt(BASE), &mut buf);
    })
    .join();
    assert!(failed.is_err(), "the handler's panic reaches its thread");
    let (taken, took) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let state = machine.irq_save();
        machine.irq_restore(state);
        let _ = taken.send(());
    });
    assert!(
        took.recv_timeout(std::time::Duration::from_secs(20))
            .is_ok(),
        "no other thread could take CPU 0 with interrupts off"
    );
}

/// A check that fails inside `watchdog` fails as itself: the watching thread is
/// told the work is over and ends the process with no "deadlock" report, so the
/// other tests of the binary go on. (It waited for a `done` the panic skipped, then
/// killed the process as deadlocked.)
#[test]
fn a_failed_check_under_the_watchdog_is_not_a_deadlock() {
    const CHILD: &str = "VMALLOC_SIM_WATCHDOG_CHILD";
    if std::env::var_os(CHILD).is_some() {
        let failed = std::thread::spawn(|| {
            crate::watchdog(
                "a failed check",
                std::time::Duration::from_millis(300),
                || panic!("a failed check"),
            )
        })
        .join();
        assert!(failed.is_err());
        std::thread::sleep(std::time::Duration::from_millis(900));
        println!("the other tests go on");
        return;
    }
    let child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "test::threads::a_failed_check_under_the_watchdog_is_not_a_deadlock",
            "--nocapture",
        ])
        .env(CHILD, "1")
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&child.stdout),
        String::from_utf8_lossy(&child.stderr),
    );
    assert!(
        child.status.success() && stdout.contains("the other tests go on"),
        "{:?}\nstdout: {stdout}\nstderr: {stderr}",
        child.status
    );
    assert!(!stderr.contains("(deadlock)"), "{stderr}");
}

/// A scenario of `scenarios::shootdowns` that fails (here, out of frames) panics,
/// as its docs say, instead of leaving the CPUs it keeps idling waiting forever.
#[test]
fn a_failing_shootdown_scenario_panics_rather_than_hangs() {
    use crate::scenarios::{manager_with, smp_machine};
    use vmalloc::FrameSource;
    // The frames a manager takes when made, on a twin machine.
    let twin = smp_machine(SimConfig::new(64 << 20).with_cpus(2));
    let before = twin.1.stats().free;
    // SAFETY: this manager alone uses the twin's tables; nothing runs on CPU 1.
    let vm = unsafe { manager_with(twin.0, twin.1, twin.0, Default::default()) };
    let needed = (before - twin.1.stats().free) as usize;
    drop(vm);
    let smp = smp_machine(SimConfig::new(64 << 20).with_cpus(2));
    let frames = smp.1;
    // Just the frames the manager takes: it is made, and the scenario runs dry.
    let mut all =
        vec![PhysFrame::containing_address(PhysAddr::zero()); frames.stats().free as usize];
    let taken = frames.alloc_frames(&mut all);
    // SAFETY: frames taken above, never used.
    unsafe { frames.free_frames(&all[..needed.min(taken)]) }.unwrap();
    let (ended, end) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let scenario = std::thread::spawn(move || {
            // SAFETY: this manager alone uses the machine's tables.
            unsafe { crate::scenarios::shootdowns(0, false, smp) }
        });
        let _ = ended.send(scenario.join().is_err());
    });
    let panicked = end.recv_timeout(std::time::Duration::from_secs(30));
    assert_eq!(panicked, Ok(true), "the failed scenario hung (or passed)");
}

/// Replacing the IPI handler and disarming an interrupt drop the old closure with
/// no lock of the machine held: its captures are the test's, and their drop may call
/// in again.
#[test]
fn an_old_handler_is_dropped_with_no_lock_held() {
    use crate::watchdog;
    use std::time::Duration;
    struct CallsIn(&'static SimMachine);
    impl Drop for CallsIn {
        fn drop(&mut self) {
            let _ = self.0.cpu(0).interrupt_armed();
            self.0.set_ipi_handler(|| {});
        }
    }
    let machine: &'static SimMachine =
        Box::leak(Box::new(SimMachine::new(SimConfig::new(64 << 20))));
    let name = "an_old_handler_is_dropped_with_no_lock_held";
    watchdog(name, Duration::from_secs(30), || {
        let calls_in = CallsIn(machine);
        machine.set_ipi_handler(move || {
            let _ = &calls_in;
        });
        machine.set_ipi_handler(|| {});
        let calls_in = CallsIn(machine);
        machine.cpu(0).interrupt_after(1_000_000, move || {
            let _ = &calls_in;
        });
        assert!(machine.cpu(0).disarm());
    });
}
