//! Scripted interleavings: one test thread plays every CPU in turn, switching
//! `current`, and the steps of other CPUs run at the points the script picks.

extern crate std;

use super::*;
use crate::smp::{CpuSet, IrqState};
use core::sync::atomic::{AtomicU64, AtomicUsize};
use std::cell::Cell;
use std::vec::Vec;

std::thread_local! {
    /// Runs between a claim's compare-and-swap and its check: where an owner that
    /// read the slot idle just before may write over it.
    pub(super) static AFTER_CLAIM: Cell<Option<fn(&AtomicU8)>> = const { Cell::new(None) };
}

/// CPUs whose current one the script sets; interrupts are a no-op.
struct TestCpus {
    current: AtomicUsize,
    online: AtomicU64,
}

// SAFETY: one test thread plays every CPU, one at a time; nothing is shot down.
unsafe impl Cpus for TestCpus {
    fn current(&self) -> usize {
        self.current.load(Ordering::Relaxed)
    }
    fn online(&self) -> CpuSet {
        CpuSet::from_bits(self.online.load(Ordering::SeqCst))
    }
    fn send_ipi(&self, _: CpuSet) {}
    fn irq_save(&self) -> IrqState {
        IrqState::new(0)
    }
    fn irq_restore(&self, _: IrqState) {}
}

fn cpus(online: u64) -> TestCpus {
    TestCpus {
        current: AtomicUsize::new(0),
        online: AtomicU64::new(online),
    }
}

impl TestCpus {
    fn on<R>(&self, cpu: usize, f: impl FnOnce() -> R) -> R {
        let before = self.current.swap(cpu, Ordering::Relaxed);
        let result = f();
        self.current.store(before, Ordering::Relaxed);
        result
    }

    /// `work` run on every online CPU but the current one, as an IPI would.
    fn on_others(&self, work: &(dyn Fn() + Sync)) -> bool {
        let me = self.current();
        for cpu in self.online().iter().filter(|&cpu| cpu != me) {
            self.on(cpu, work);
        }
        true
    }
}

/// A count every CPU may read, and the objects only its holder touches.
type Cache = PerCpu<AtomicU64, Vec<u32>>;

impl Init for Vec<u32> {
    const INIT: Self = Vec::new();
}

/// Puts `object` in CPU `cpu`'s cache, as its owner.
fn stash(cache: &Cache, cpus: &TestCpus, cpu: usize, object: u32) {
    cpus.on(cpu, || {
        let irq = IrqOff::with(cpus);
        let mut held = cache
            .this_cpu(cpus, &irq)
            .expect("the owner's slot is idle");
        held.push(object);
        held.shared().fetch_add(1, Ordering::Relaxed);
    });
}

/// Drains every cache from the current CPU into `out`; whether all were drained.
fn drain_into(cache: &Cache, cpus: &TestCpus, reach: bool, out: &mut Vec<u32>) -> bool {
    cache.drain_all(
        cpus,
        |count| count.load(Ordering::Relaxed) > 0,
        |work| reach && cpus.on_others(work),
        core::hint::spin_loop,
        |held| {
            out.append(held);
            held.shared().store(0, Ordering::Relaxed);
        },
    )
}

#[test]
fn the_owner_takes_its_slot_and_code_landing_inside_finds_it_held() {
    let (cache, cpus) = (Cache::new(), cpus(0b11));
    let irq = IrqOff::with(&cpus);
    let held = cache.this_cpu(&cpus, &irq).unwrap();
    assert_eq!(held.cpu(), 0);
    assert!(
        cache.this_cpu(&cpus, &irq).is_none(),
        "an NMI inside gets nothing"
    );
    assert!(
        cpus.on(1, || cache.this_cpu(&cpus, &irq)).is_some(),
        "CPU 1 has its own"
    );
    drop(held);
    assert!(cache.this_cpu(&cpus, &irq).is_some(), "idle again");
}

#[test]
fn an_offline_cpus_slot_is_claimed_and_an_online_ones_is_not() {
    let (cache, cpus) = (Cache::new(), cpus(0b11));
    stash(&cache, &cpus, 1, 7);
    assert!(cache.claim_offline(1, 0, &cpus).is_none(), "online");
    cpus.online.store(0b01, Ordering::SeqCst);
    let mut claimed = cache.claim_offline(1, 0, &cpus).unwrap();
    assert_eq!((claimed.cpu(), claimed.as_slice()), (1, &[7][..]));
    claimed.clear();
    assert!(cache.claim_offline(1, 2, &cpus).is_none(), "held by CPU 0");
    drop(claimed);
    // Back online, the owner finds its slot idle again.
    cpus.online.store(0b11, Ordering::SeqCst);
    stash(&cache, &cpus, 1, 8);
}

#[test]
fn a_claim_the_owner_wrote_over_before_it_went_offline_backs_off() {
    let (cache, cpus) = (Cache::new(), cpus(0b01));
    // The owner read IDLE just before the claim, wrote OWNER over it, finished its
    // call (IDLE again) and left the online set: the claim is gone.
    AFTER_CLAIM.with(|hook| hook.set(Some(|state| state.store(IDLE, Ordering::SeqCst))));
    let claimed = cache.claim_offline(1, 0, &cpus);
    AFTER_CLAIM.with(|hook| hook.set(None));
    assert!(claimed.is_none(), "the claimer backs off");
    // Had the owner still held it, the claimer must not have undone its hold.
    AFTER_CLAIM.with(|hook| hook.set(Some(|state| state.store(OWNER, Ordering::SeqCst))));
    let claimed = cache.claim_offline(1, 0, &cpus);
    AFTER_CLAIM.with(|hook| hook.set(None));
    assert!(claimed.is_none());
    assert_eq!(
        cache.slots[1].state.load(Ordering::SeqCst),
        OWNER,
        "left to its owner"
    );
}

#[test]
fn draining_takes_the_callers_slot_claims_offline_ones_and_is_handed_online_ones() {
    let (cache, cpus) = (Cache::new(), cpus(0b1111));
    for cpu in 0..4 {
        stash(&cache, &cpus, cpu, cpu as u32);
    }
    cpus.online.store(0b0111, Ordering::SeqCst);
    let mut out = Vec::new();
    assert!(drain_into(&cache, &cpus, true, &mut out));
    out.sort();
    assert_eq!(out, [0, 1, 2, 3]);
    for cpu in 0..4 {
        assert_eq!(
            cache.slots[cpu].state.load(Ordering::SeqCst),
            IDLE,
            "CPU {cpu}"
        );
    }
    cpus.online.store(0b1111, Ordering::SeqCst);
    stash(&cache, &cpus, 2, 9);
}

#[test]
fn a_slot_its_owner_holds_up_its_stack_is_drained_at_the_owners_next_entry() {
    let (cache, cpus) = (Cache::new(), cpus(0b111));
    stash(&cache, &cpus, 1, 1);
    stash(&cache, &cpus, 2, 2);
    // CPU 2 is inside a call, spinning with its slot held, and serves the work.
    let irq = IrqOff::with(&cpus);
    let held = cpus.on(2, || cache.this_cpu(&cpus, &irq)).unwrap();
    let mut out = Vec::new();
    assert!(
        !drain_into(&cache, &cpus, true, &mut out),
        "not everything now"
    );
    assert_eq!(out, [1]);
    drop(held);
    cpus.on(2, || {
        let held = cache.this_cpu(&cpus, &irq).unwrap();
        assert!(held.take_drain_request(), "asked to drain");
        assert!(!held.take_drain_request(), "once");
        assert_eq!(held.as_slice(), [2]);
    });
}

#[test]
fn without_a_way_to_reach_them_online_cpus_drain_at_their_next_entry() {
    let (cache, cpus) = (Cache::new(), cpus(0b11));
    stash(&cache, &cpus, 1, 1);
    let mut out = Vec::new();
    assert!(!drain_into(&cache, &cpus, false, &mut out));
    assert!(out.is_empty());
    let irq = IrqOff::with(&cpus);
    let held = cpus.on(1, || cache.this_cpu(&cpus, &irq)).unwrap();
    assert!(held.take_drain_request());
}

#[test]
fn every_slot_handed_over_ends_idle_an_unused_ones_and_a_cpu_that_came_back_online() {
    let (cache, cpus) = (Cache::new(), cpus(0b11));
    stash(&cache, &cpus, 1, 1);
    stash(&cache, &cpus, 3, 3);
    cpus.online.store(0b0011, Ordering::SeqCst);
    // CPU 3, offline when the set was read and drained by claim, is back online when
    // the work runs, and hands its slot over too.
    let mut out = Vec::new();
    let drained = cache.drain_all(
        &cpus,
        |count| count.load(Ordering::Relaxed) > 0,
        |work| {
            cpus.online.store(0b1011, Ordering::SeqCst);
            cpus.on_others(work)
        },
        core::hint::spin_loop,
        |held| out.append(held),
    );
    assert!(drained);
    out.sort();
    assert_eq!(out, [1, 3]);
    assert_eq!(cache.slots[3].state.load(Ordering::SeqCst), IDLE);
    // A CPU with nothing in its slot that hands it over gets it back too.
    assert_eq!(cache.slots[2].state.load(Ordering::SeqCst), IDLE);
}
