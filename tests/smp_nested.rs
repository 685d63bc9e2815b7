//! An IPI landing in the middle of a target's flush: the shootdown never completes
//! before every target flushed, in any nesting, and the protocol that published in
//! any nesting is caught completing early (the negative control).

mod common;

use common::smp::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use vmalloc::{TlbFlush, VmallocConfig};
use vmalloc_sim::scenarios::manager_with as manager;
use vmalloc_sim::{DEADLOCK_LIMIT, SimFrames, SimMachine, watchdog};
use x86_64::structures::paging::Page;

/// A shootdown's handler, for the nested-flush scenario to drive any protocol.
trait ServesIpis: TlbFlush + Sync {
    fn serve_ipi(&self);
}

impl ServesIpis for Tlb {
    fn serve_ipi(&self) {
        self.handle_ipi();
    }
}

/// The protocol before its fix, kept as the negative control: a serve publishes the
/// request count it read once it has flushed what it took, in any nesting, so a
/// serve nested in another's flush covers the outer serve's request too.
struct PublishesInAnyNesting {
    machine: &'static SimMachine,
    mailboxes: Vec<Mailbox>,
}

#[derive(Default)]
struct Mailbox {
    queue: std::sync::Mutex<Vec<x86_64::structures::paging::page::PageRange>>,
    requested: std::sync::atomic::AtomicU64,
    done: std::sync::atomic::AtomicU64,
}

impl PublishesInAnyNesting {
    fn serve(&self, cpu: usize) {
        let Ok(mut queue) = self.mailboxes[cpu].queue.try_lock() else {
            return;
        };
        let mailbox = &self.mailboxes[cpu];
        let requested = mailbox.requested.load(Ordering::Acquire);
        if mailbox.done.load(Ordering::Relaxed) >= requested {
            return;
        }
        let taken = std::mem::take(&mut *queue);
        drop(queue);
        taken
            .into_iter()
            .for_each(|range| self.machine.flush_range(range));
        mailbox.done.fetch_max(requested, Ordering::Release);
    }
}

impl TlbFlush for PublishesInAnyNesting {
    fn flush_page(&self, page: Page) {
        self.flush_range(Page::range(page, page + 1));
    }
    fn flush_range(&self, range: x86_64::structures::paging::page::PageRange) {
        let me = self.machine.current_cpu();
        self.machine.flush_range(range);
        let online = vmalloc::smp::Cpus::online(self.machine).without(me);
        let targets: Vec<usize> = online.iter().collect();
        let tickets: Vec<u64> = targets
            .iter()
            .map(|&cpu| {
                let mailbox = &self.mailboxes[cpu];
                mailbox.queue.lock().unwrap().push(range);
                mailbox.requested.fetch_add(1, Ordering::AcqRel) + 1
            })
            .collect();
        vmalloc::smp::Cpus::send_ipi(self.machine, online);
        for (&cpu, &ticket) in targets.iter().zip(&tickets) {
            while self.mailboxes[cpu].done.load(Ordering::Acquire) < ticket {
                self.serve(me);
                self.machine.relax();
            }
        }
    }
    fn flush_all(&self) {
        unreachable!("the scenario flushes ranges")
    }
}

impl ServesIpis for PublishesInAnyNesting {
    fn serve_ipi(&self) {
        self.serve(self.machine.current_cpu());
    }
}

/// Where the nested-flush scenario's threads stand.
#[derive(Default)]
struct Steps {
    start_a: AtomicBool,
    start_c: AtomicBool,
    a_done: AtomicBool,
    stop: AtomicBool,
    early: AtomicBool,
}

/// CPU 0 shoots down R1, which CPU 1 caches; CPU 1 is its only target. CPU 1 takes
/// the IPI, and in the middle of that flush (before it dropped R1) CPU 2 comes
/// online, shoots down R2, and its IPI lands and is served, nested. Returns whether
/// CPU 0's shootdown returned while CPU 1 still translated R1: a frame behind R1
/// could then be handed out while CPU 1 reads it.
fn completes_before_the_target_flushed<T: ServesIpis + 'static>(
    machine: &'static SimMachine,
    frames: &'static SimFrames,
    tlb: &'static T,
) -> bool {
    // SAFETY: the machine's page tables serve this manager alone, and its flush reaches every CPU that runs.
    let vm = unsafe { manager(machine, frames, machine, VmallocConfig::default()) };
    let area = addr(vm.vmalloc(2 * 4096).unwrap());
    let (r1, r2) = (
        Page::containing_address(area),
        Page::containing_address(area) + 1,
    );
    let steps: &'static Steps = Box::leak(Box::default());
    let (cpu0, cpu1, cpu2) = (machine.cpu(0), machine.cpu(1), machine.cpu(2));
    cpu2.go_offline();
    // Every CPU serves its mailbox while it waits for its turn, as a CPU polls
    // with interrupts off, until the scenario is over.
    let serve_until = |flag: &AtomicBool| {
        while !flag.load(Ordering::Acquire) {
            tlb.serve_ipi();
            thread::yield_now();
        }
    };
    machine.set_ipi_handler(move || tlb.serve_ipi());
    thread::scope(|scope| {
        scope.spawn(|| {
            cpu2.enter();
            while !steps.start_c.load(Ordering::Acquire) {
                thread::yield_now();
            }
            cpu2.go_online();
            tlb.flush_range(Page::range(r2, r2 + 1));
            serve_until(&steps.stop);
        });
        scope.spawn(|| {
            cpu0.enter();
            serve_until(&steps.start_a);
            tlb.flush_range(Page::range(r1, r1 + 1));
            let cached = cpu1.cached(r1.start_address()).is_some();
            steps.early.store(cached, Ordering::Release);
            steps.a_done.store(true, Ordering::Release);
            serve_until(&steps.stop);
        });
        cpu1.enter();
        let mut word = [0; 8];
        cpu1.read(r1.start_address(), &mut word).unwrap();
        cpu1.read(r2.start_address(), &mut word).unwrap();
        // Runs on this thread, as CPU 1, inside the flush of R1 that its handler
        // runs: CPU 2's IPI lands there.
        cpu1.in_next_flush(move || {
            steps.start_c.store(true, Ordering::Release);
            while !cpu1.ipi_pending() {
                thread::yield_now();
            }
            tlb.serve_ipi();
            // CPU 0 waits for CPU 1 alone, and spins only while it is told R1 is not
            // flushed: two spins since the nested serve returned and no return mean
            // it read "not flushed" after that serve.
            let spins = cpu0.relaxes();
            while !steps.a_done.load(Ordering::Acquire) && cpu0.relaxes() < spins + 2 {
                thread::yield_now();
            }
        });
        steps.start_a.store(true, Ordering::Release);
        while !cpu1.ipi_pending() {
            thread::yield_now();
        }
        // CPU 1 takes CPU 0's IPI.
        cpu1.poll();
        serve_until(&steps.a_done);
        steps.stop.store(true, Ordering::Release);
    });
    cpu0.enter();
    steps.early.load(Ordering::Acquire)
}

#[test]
fn an_ipi_landing_in_a_targets_flush_never_completes_a_shootdown_early() {
    watchdog("nested shootdown", DEADLOCK_LIMIT, || {
        let (machine, frames, tlb) = smp_machine(3, false);
        assert!(
            !completes_before_the_target_flushed(machine, frames, tlb),
            "CPU 0 was told R1 was flushed while CPU 1 still translated it"
        );
    });
}

#[test]
fn publishing_in_any_nesting_is_caught_completing_early() {
    // The negative control: the protocol before the fix, on the same steps.
    watchdog("nested shootdown, negative control", DEADLOCK_LIMIT, || {
        let (machine, frames, _) = smp_machine(3, false);
        let tlb: &'static _ = Box::leak(Box::new(PublishesInAnyNesting {
            machine,
            mailboxes: (0..3).map(|_| Mailbox::default()).collect(),
        }));
        assert!(
            completes_before_the_target_flushed(machine, frames, tlb),
            "the old protocol reports R1 flushed before CPU 1 flushed it"
        );
    });
}
