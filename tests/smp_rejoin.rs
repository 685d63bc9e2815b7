//! A CPU that leaves the online set and joins it again while another CPU runs work
//! on every other CPU (`Shootdown::call_on_other_cpus`, which the per-CPU caches'
//! drains use): the initiator, having seen it gone, must not return while the CPU
//! took the work back in and has yet to run it (the work's closure lives on the
//! initiator's stack).

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use vmalloc::TlbFlush;
use vmalloc::smp::{CpuSet, Cpus, IrqState, Shootdown};
use vmalloc::tlb::{FlushBatch, FlushTicket};
use vmalloc::vmalloc::{Vmalloc, VmallocConfig};
use vmalloc_sim::{DEADLOCK_LIMIT, SimConfig, SimFrames, SimMachine, watchdog};
use x86_64::VirtAddr;
use x86_64::structures::paging::Page;

/// The machine's CPUs, but for one read of the online set by CPU 0 once an IPI was
/// sent after `after_ipis`: `hook` makes that read, as CPU 0 delayed right after its
/// load (an SMI, a preempted vCPU) while CPU 1 comes back. Counts CPU 0's `current`
/// calls, which a CPU waiting for a flush or a call makes at every turn.
struct DelayedRead {
    machine: &'static SimMachine,
    hook: Mutex<Option<Box<dyn FnOnce() -> CpuSet + Send>>>,
    after_ipis: AtomicU64,
    cpu_0_turns: AtomicU64,
}

// SAFETY: the machine's CPUs, as they are; the hook's read returns the online set
// as it was at a moment of the call.
unsafe impl Cpus for DelayedRead {
    fn current(&self) -> usize {
        let cpu = self.machine.current();
        if cpu == 0 {
            self.cpu_0_turns.fetch_add(1, Ordering::Relaxed);
        }
        cpu
    }
    fn online(&self) -> CpuSet {
        if self.machine.current_cpu() == 0
            && self.machine.ipis_sent() > self.after_ipis.load(Ordering::Acquire)
        {
            let hook = self.hook.lock().unwrap().take();
            if let Some(hook) = hook {
                return hook();
            }
        }
        self.machine.online()
    }
    fn send_ipi(&self, targets: CpuSet) {
        self.machine.send_ipi(targets)
    }
    fn irq_save(&self) -> IrqState {
        self.machine.irq_save()
    }
    fn irq_restore(&self, state: IrqState) {
        self.machine.irq_restore(state)
    }
}

type Tlb = Shootdown<&'static DelayedRead, &'static SimMachine>;

fn leak<T>(value: T) -> &'static T {
    Box::leak(Box::new(value))
}

/// The moments of the race, in order.
#[derive(Default)]
struct Steps {
    go_offline: AtomicBool,
    is_offline: AtomicBool,
    come_back: AtomicBool,
    took_queue: AtomicBool,
    call_returned: AtomicBool,
}

fn wait(flag: &AtomicBool) {
    while !flag.load(Ordering::Acquire) {
        std::hint::spin_loop();
    }
}

/// A 2-CPU machine with a shootdown over [`DelayedRead`], CPU 1 with a flush still
/// to serve (its serve flushes, where the test holds it, before it runs work).
fn rig() -> (&'static SimMachine, &'static DelayedRead, &'static Tlb) {
    let machine: &'static SimMachine = leak(SimMachine::new(SimConfig::new(64 << 20).with_cpus(2)));
    let cpus = leak(DelayedRead {
        machine,
        hook: Mutex::new(None),
        after_ipis: AtomicU64::new(u64::MAX),
        cpu_0_turns: AtomicU64::new(0),
    });
    let tlb: &'static Tlb = leak(Shootdown::new(cpus, machine));
    machine.set_ipi_handler(move || tlb.handle_ipi());
    (machine, cpus, tlb)
}

/// Turns CPU 0 spends waiting before CPU 1 takes it for a wait for its serve.
const WAITING: u64 = 10_000;

/// CPU 1, between library calls: goes offline when asked, comes back (flushing its
/// TLB as it joins), and serves its mailbox, holding still inside the serve (after
/// it took the queue) until the initiator returned, or spun `WAITING` turns waiting
/// for it (one that does not wait returns within a few).
fn cpu_1_leaves_and_comes_back(
    machine: &'static SimMachine,
    cpus: &'static DelayedRead,
    steps: &'static Steps,
) {
    let cpu = machine.cpu(1);
    cpu.enter();
    wait(&steps.go_offline);
    cpu.go_offline();
    steps.is_offline.store(true, Ordering::Release);
    wait(&steps.come_back);
    cpu.go_online();
    cpu.in_next_flush(move || {
        steps.took_queue.store(true, Ordering::Release);
        let start = cpus.cpu_0_turns.load(Ordering::Relaxed);
        while !steps.call_returned.load(Ordering::Acquire)
            && cpus.cpu_0_turns.load(Ordering::Relaxed) - start < WAITING
        {
            std::thread::yield_now();
        }
    });
    cpu.poll();
    cpu.go_offline();
}

/// Arms CPU 0's delayed read: CPU 1 is seen offline, then comes back and takes its
/// queue before CPU 0 goes on.
fn arm(machine: &'static SimMachine, cpus: &DelayedRead, steps: &'static Steps) {
    *cpus.hook.lock().unwrap() = Some(Box::new(move || {
        steps.go_offline.store(true, Ordering::Release);
        wait(&steps.is_offline);
        let seen = machine.online();
        steps.come_back.store(true, Ordering::Release);
        wait(&steps.took_queue);
        seen
    }));
    cpus.after_ipis
        .store(machine.ipis_sent(), Ordering::Release);
}

fn unserved_flush(tlb: &Tlb) {
    let mut ticket = FlushTicket::DONE;
    let page = Page::containing_address(VirtAddr::new(0xffff_c900_0000_0000));
    tlb.start_flush(
        FlushBatch::Ranges(&[Page::range(page, page + 1)]),
        &mut ticket,
    );
}

#[test]
fn work_on_other_cpus_has_run_everywhere_when_the_call_returns() {
    watchdog("a CPU rejoining during a call", DEADLOCK_LIMIT, || {
        let (machine, cpus, tlb) = rig();
        let steps: &'static Steps = leak(Steps::default());
        // 0: never ran; 1: before the call returned; 2: after.
        let ran = leak(AtomicU8::new(0));
        unserved_flush(tlb);
        std::thread::scope(|scope| {
            let other = scope.spawn(move || cpu_1_leaves_and_comes_back(machine, cpus, steps));
            arm(machine, cpus, steps);
            let work = move || {
                let late = steps.call_returned.load(Ordering::Acquire);
                ran.store(if late { 2 } else { 1 }, Ordering::Release);
            };
            assert!(tlb.call_on_other_cpus(&work));
            steps.call_returned.store(true, Ordering::Release);
            other.join().unwrap();
        });
        assert!(cpus.hook.lock().unwrap().is_none(), "the race was run");
        assert_eq!(
            ran.load(Ordering::Acquire),
            1,
            "CPU 1 ran the work after call_on_other_cpus returned"
        );
    });
}

/// The same race inside `Vmalloc::drain_cpu_caches`, whose work lives on the
/// drain's stack: CPU 1 ran it after the drain returned (a crash), and its cache,
/// left claimed, never drained again.
#[test]
fn a_cpu_rejoining_during_a_drain_of_the_cpu_caches_is_drained() {
    watchdog("a CPU rejoining during a drain", DEADLOCK_LIMIT, || {
        let (machine, cpus, tlb) = rig();
        let frames: &'static SimFrames = leak(machine.frames());
        let config = VmallocConfig {
            cpu_caches: true,
            ..VmallocConfig::default()
        };
        // SAFETY: the machine's page tables serve this manager alone, and the
        // shootdown reaches every CPU that runs.
        let vm = unsafe { Vmalloc::new(config, machine.root(), machine.phys(), frames, tlb) };
        let vm = leak(vm.unwrap());
        let steps: &'static Steps = leak(Steps::default());
        let cached = leak(AtomicBool::new(false));
        std::thread::scope(|scope| {
            let other = scope.spawn(move || {
                machine.cpu(1).run(|_| {
                    // CPU 1's cache holds frames and a block.
                    let area = vm.vmalloc(4096).unwrap();
                    // SAFETY: the test's area, not used afterwards.
                    unsafe { vm.vfree(area.as_ptr()) }.unwrap();
                });
                cached.store(true, Ordering::Release);
                cpu_1_leaves_and_comes_back(machine, cpus, steps);
            });
            wait(cached);
            unserved_flush(tlb);
            arm(machine, cpus, steps);
            vm.drain_cpu_caches();
            steps.call_returned.store(true, Ordering::Release);
            other.join().unwrap();
        });
        assert!(cpus.hook.lock().unwrap().is_none(), "the race was run");
        vm.purge();
        vm.drain_cpu_caches();
        vm.purge();
        let stats = vm.stats();
        assert_eq!((stats.areas, stats.cached_frames), (0, 0), "{stats:?}");
    });
}

static SHARED_WORK_RUNS: AtomicU64 = AtomicU64::new(0);

fn shared_work() {
    SHARED_WORK_RUNS.fetch_add(1, Ordering::Relaxed);
}

/// One `&'static` closure both initiators hand over.
static SHARED_WORK: fn() = shared_work;

/// Two CPUs run the same closure on every other CPU at once while a third, which
/// never served, goes offline: each initiator takes back its own queued copy, and
/// both return. (The first to see the CPU gone took both copies back, so the second
/// waited for the offline CPU to serve, for good.)
#[test]
fn two_calls_of_one_closure_both_return_when_a_target_goes_offline() {
    let run = |shared: bool, name: &str| {
        watchdog(name, DEADLOCK_LIMIT, || {
            let (machine, _frames, tlb) =
                vmalloc_sim::scenarios::smp_machine(SimConfig::new(16 << 20).with_cpus(3));
            std::thread::scope(|scope| {
                let callers: Vec<_> = (0..2)
                    .map(|i| {
                        scope.spawn(move || {
                            let cpu = machine.cpu(i);
                            cpu.enter();
                            let _off = cpu.offline_when_dropped();
                            let own = move || {
                                SHARED_WORK_RUNS.fetch_add(i as u64 + 1, Ordering::Relaxed);
                            };
                            let work: &(dyn Fn() + Sync) = if shared { &SHARED_WORK } else { &own };
                            assert!(tlb.call_on_other_cpus(work));
                        })
                    })
                    .collect();
                // Both calls queued their work on CPU 2 (and on each other).
                while tlb.stats().calls < 2 || machine.ipis_sent() < 4 {
                    std::thread::yield_now();
                }
                // CPU 2, which never served, is unplugged (it runs no kernel code).
                machine.cpu(2).go_offline();
                for caller in callers {
                    caller.join().unwrap();
                }
            });
        });
    };
    run(false, "two calls of two closures, a target unplugged");
    run(true, "two calls of one closure, a target unplugged");
}
