//! Per-CPU state: touched by its own CPU without a locked instruction, reached by
//! other CPUs only when it is handed to them.
//!
//! Every per-CPU structure of the library (the heap's per-CPU slabs, the vmalloc
//! manager's CPU caches, the kernel stack cache, the shootdown mailboxes) is a
//! [`PerCpu<T>`]: one slot per CPU, each on cache lines of its own, as Linux's
//! `DEFINE_PER_CPU`. The protocol is written once, here:
//!
//! - **Owner access.** A CPU takes its own slot ([`PerCpu::this_cpu`]) with interrupts
//!   held off (the caller's [`IrqOff`]), which also keeps it on its CPU
//!   ([`Cpus`]'s contract): a plain load sees the slot idle, a plain store marks it
//!   held, and no other code can run on the CPU until the guard marks it idle again.
//!   Code the hold cannot keep out (an NMI, or a kernel whose hook holds nothing off)
//!   finds the slot held and gets `None`: it takes the slow path, as SLUB's
//!   `this_cpu_cmpxchg` fast path lets an interrupted allocation retry.
//! - **Claiming an offline CPU's slot.** A CPU that runs no kernel code cannot hand
//!   its slot over, so another takes it with a compare-and-swap of a value naming
//!   itself, then checks that the owner is still offline and its claim still there;
//!   a CPU that comes back online checks for a claim after it rejoined. Both sides
//!   order their write before their read (a locked instruction on one side, the online
//!   set's sequentially consistent update on the other), so one sees the other
//!   (Dekker's argument). An owner already inside a call when the claim landed
//!   writes over it and leaves the online set only after that call returned: a
//!   claimer that then sees it offline no longer finds its claim, and backs off.
//! - **Draining an online CPU.** A call that ran dry empties every CPU's slot
//!   ([`PerCpu::drain_all`]), as Linux's `drain_all_pages` does with work on each CPU:
//!   it sends work to every other online CPU through the shootdown mailboxes
//!   ([`TlbFlush::call_on_other_cpus`](crate::TlbFlush::call_on_other_cpus)), and
//!   each CPU hands its idle slot to the caller (a compare-and-swap from idle to a
//!   claim naming the caller) and returns: the work never waits and takes no lock, so
//!   a CPU serving it cannot deadlock with anyone. The caller then drains the slots it
//!   was handed, in its own context, and gives them back. A slot that could not be
//!   handed over now (its owner holds it further up its own stack, or nothing can
//!   reach the CPU) is asked to drain itself at its owner's next entry.

use crate::smp::{Cpus, MAX_CPUS};
use crate::sync::IrqOff;
use core::cell::UnsafeCell;
use core::ops::{Deref, DerefMut};
use core::sync::atomic::{AtomicBool, AtomicU8, Ordering, compiler_fence, fence};

/// The slot is free.
const IDLE: u8 = 0;
/// Its own CPU holds it.
const OWNER: u8 = 1;

/// The slot is held by CPU `claimer`, another than its own: each claimer writes its
/// own value, so a claim is recognised as its claimer's alone.
const fn claimed_by(claimer: usize) -> u8 {
    2 + (claimer % MAX_CPUS) as u8
}

const _: () = assert!(
    claimed_by(MAX_CPUS - 1) as usize == MAX_CPUS + 1,
    "claims fit a byte"
);

/// A value a [`PerCpu`] starts every slot with, for `const` construction.
pub(crate) trait Init {
    /// The initial value.
    const INIT: Self;
}

impl Init for () {
    const INIT: Self = ();
}

impl<T> Init for Option<T> {
    const INIT: Self = None;
}

impl Init for core::sync::atomic::AtomicU64 {
    const INIT: Self = Self::new(0);
}

impl<T> Init for core::sync::atomic::AtomicPtr<T> {
    const INIT: Self = Self::new(core::ptr::null_mut());
}

impl<T: Init, const N: usize> Init for [T; N] {
    const INIT: Self = [const { T::INIT }; N];
}

/// One CPU's slot, on cache lines of its own.
#[repr(align(128))]
struct Slot<S, O> {
    state: AtomicU8,
    /// Someone asked the owner to drain its slot at its next entry.
    drain: AtomicBool,
    /// What any CPU may read (atomics, a lock inside).
    shared: S,
    /// What only the slot's holder touches.
    owned: UnsafeCell<O>,
}

/// One slot per CPU, each with a part every CPU may share (`S`) and a part only its
/// holder touches (`O`); see the [module documentation](self).
pub(crate) struct PerCpu<S, O = ()> {
    slots: [Slot<S, O>; MAX_CPUS],
}

// SAFETY: `shared` is `Sync` itself; `owned` is reached only by whoever holds the
// slot (its state says who, and taking it orders the accesses), and moves between
// CPUs with it.
unsafe impl<S: Sync, O: Send> Sync for PerCpu<S, O> {}

/// A slot held: its own CPU's, or one handed to or claimed by another CPU. Derefs to
/// the owner-only part.
pub(crate) struct Held<'a, S, O> {
    slot: &'a Slot<S, O>,
    cpu: usize,
}

impl<S, O> Held<'_, S, O> {
    /// The CPU whose slot this is.
    pub(crate) fn cpu(&self) -> usize {
        self.cpu
    }

    /// The slot's shared part.
    pub(crate) fn shared(&self) -> &S {
        &self.slot.shared
    }

    /// Both parts at once: the shared one and the owner's.
    pub(crate) fn split(&mut self) -> (&S, &mut O) {
        // SAFETY: holding the slot makes this the only access to its owned part;
        // `shared` is a separate field.
        (&self.slot.shared, unsafe { &mut *self.slot.owned.get() })
    }

    /// Whether a drain was asked of this slot since it was last held; clears it.
    pub(crate) fn take_drain_request(&self) -> bool {
        self.slot.drain.load(Ordering::Relaxed) && self.slot.drain.swap(false, Ordering::Relaxed)
    }
}

impl<S, O> Deref for Held<'_, S, O> {
    type Target = O;
    #[inline]
    fn deref(&self) -> &O {
        // SAFETY: holding the slot makes this the only access to its owned part.
        unsafe { &*self.slot.owned.get() }
    }
}

impl<S, O> DerefMut for Held<'_, S, O> {
    #[inline]
    fn deref_mut(&mut self) -> &mut O {
        // SAFETY: as in `deref`; `&mut self` keeps it unique while it is used.
        unsafe { &mut *self.slot.owned.get() }
    }
}

impl<S, O> Drop for Held<'_, S, O> {
    #[inline]
    fn drop(&mut self) {
        debug_assert_ne!(
            self.slot.state.load(Ordering::Relaxed),
            IDLE,
            "a slot held twice"
        );
        // Release: whoever takes the slot next sees what was done to it.
        self.slot.state.store(IDLE, Ordering::Release);
    }
}

impl<S: Init, O: Init> PerCpu<S, O> {
    /// Every slot idle, both parts [`Init::INIT`]; `const`, for a `static`.
    pub(crate) const fn new() -> Self {
        Self {
            slots: [const {
                Slot {
                    state: AtomicU8::new(IDLE),
                    drain: AtomicBool::new(false),
                    shared: S::INIT,
                    owned: UnsafeCell::new(O::INIT),
                }
            }; MAX_CPUS],
        }
    }
}

impl<S, O> PerCpu<S, O> {
    /// Every slot's owned part, by value: the teardown's, once nothing holds a slot.
    pub(crate) fn into_owned(self) -> impl Iterator<Item = O> {
        self.slots.into_iter().map(|slot| slot.owned.into_inner())
    }

    /// Every slot in turn, held by the caller: the teardown's, which `&mut self` keeps
    /// from any other holder.
    pub(crate) fn hold_each(&mut self) -> impl Iterator<Item = Held<'_, S, O>> {
        self.slots.iter().enumerate().map(|(cpu, slot)| {
            slot.state.store(OWNER, Ordering::Relaxed);
            Held { slot, cpu }
        })
    }

    /// CPU `cpu`'s shared part; `None` past [`MAX_CPUS`].
    #[inline]
    pub(crate) fn get(&self, cpu: usize) -> Option<&S> {
        self.slots.get(cpu).map(|slot| &slot.shared)
    }

    /// Every CPU's shared part, by index.
    pub(crate) fn each(&self) -> impl Iterator<Item = (usize, &S)> {
        self.slots.iter().map(|slot| &slot.shared).enumerate()
    }

    /// The calling CPU's slot, for as long as `irq` holds interrupts off: `None` if
    /// the CPU already holds it further up its stack (code the hold does not keep
    /// out) or it was handed to another CPU.
    #[inline]
    pub(crate) fn this_cpu<'a>(
        &'a self,
        cpus: &dyn Cpus,
        irq: &'a IrqOff<'_>,
    ) -> Option<Held<'a, S, O>> {
        let _ = irq;
        let cpu = cpus.current();
        let slot = self.slots.get(cpu)?;
        // SeqCst, a plain load on x86: the read of Dekker's pair with a claimer.
        if slot.state.load(Ordering::SeqCst) != IDLE {
            return None;
        }
        slot.state.store(OWNER, Ordering::Relaxed);
        // Code that lands on this CPU from here on sees the slot held.
        compiler_fence(Ordering::SeqCst);
        Some(Held { slot, cpu })
    }

    /// Offline CPU `index`'s slot, for CPU `claimer`; `None` if `index` is online
    /// (or comes back) or its slot is held.
    pub(crate) fn claim_offline(
        &self,
        index: usize,
        claimer: usize,
        cpus: &dyn Cpus,
    ) -> Option<Held<'_, S, O>> {
        let slot = self.slots.get(index)?;
        let claim = claimed_by(claimer);
        slot.state
            .compare_exchange(IDLE, claim, Ordering::SeqCst, Ordering::Relaxed)
            .ok()?;
        fence(Ordering::SeqCst);
        #[cfg(test)]
        test::AFTER_CLAIM.with(|hook| hook.get().map(|hook| hook(&slot.state)));
        // An owner that read IDLE just before the claim may have written OWNER over
        // it, finished its call and left the online set since: the claim must still
        // be there once the CPU is seen offline.
        if cpus.online().contains(index) || slot.state.load(Ordering::SeqCst) != claim {
            // Undo only this claim, never another claimer's or the owner's.
            let _ = slot
                .state
                .compare_exchange(claim, IDLE, Ordering::Release, Ordering::Relaxed);
            return None;
        }
        Some(Held { slot, cpu: index })
    }

    /// Run by the calling CPU for `claimer`: hands its idle slot over (see the module
    /// docs). Never waits.
    fn surrender(&self, cpus: &dyn Cpus, claimer: usize) {
        if let Some(slot) = self.slots.get(cpus.current()) {
            let _ = slot.state.compare_exchange(
                IDLE,
                claimed_by(claimer),
                Ordering::Acquire,
                Ordering::Relaxed,
            );
        }
    }

    /// The slot of CPU `index`, if it was handed to `claimer`.
    fn handed(&self, index: usize, claimer: usize) -> Option<Held<'_, S, O>> {
        let slot = &self.slots[index];
        // Not `then_some`: a `Held` made and dropped would mark the slot idle.
        if slot.state.load(Ordering::Acquire) == claimed_by(claimer) {
            Some(Held { slot, cpu: index })
        } else {
            None
        }
    }

    /// Asks CPU `index`'s owner to drain its slot at its next entry.
    pub(crate) fn request_drain(&self, index: usize) {
        if let Some(slot) = self.slots.get(index) {
            slot.drain.store(true, Ordering::Relaxed);
        }
    }

    /// Drains every CPU's slot with `drain`, for the calling CPU: its own now, an
    /// offline CPU's by claim, an online one's by the work `on_others` runs on every
    /// other online CPU (handing its slot over), or, where none of that can be had
    /// now, at its owner's next entry. `used` says which slots hold anything (others
    /// are skipped). Returns whether every used slot was drained before it returned.
    ///
    /// `on_others` runs its argument on every other online CPU and returns once each
    /// has (`false` if it cannot reach them): the shootdown's
    /// [`call_on_other_cpus`](crate::TlbFlush::call_on_other_cpus). Call this with none
    /// of the library's locks held: `drain` runs here, on the caller's CPU.
    ///
    /// The caller's own slot, handed to another CPU that drains every slot at the
    /// same time, is waited for (`relax` each turn: the shootdown's, which serves the
    /// other CPU's flushes meanwhile) and drained once it is back: what this CPU
    /// freed is drained before this returns, as `Vmalloc::purge` promises.
    pub(crate) fn drain_all(
        &self,
        cpus: &dyn Cpus,
        used: impl Fn(&S) -> bool,
        on_others: impl FnOnce(&(dyn Fn() + Sync)) -> bool,
        relax: impl Fn(),
        mut drain: impl FnMut(&mut Held<'_, S, O>),
    ) -> bool
    where
        S: Sync,
        O: Send,
    {
        let irq = IrqOff::with(cpus);
        let me = cpus.current();
        let mut drained = true;
        // The caller's own slot: drained now, or once it is back if another CPU
        // holds it.
        let mut own_away = false;
        if self.get(me).is_some_and(&used) {
            match self.this_cpu(cpus, &irq) {
                Some(mut held) => drain(&mut held),
                None => own_away = true,
            }
        }
        let online = cpus.online();
        let used_by = |index: usize| index != me && used(&self.slots[index].shared);
        let mut handle = |held: Option<Held<'_, S, O>>, index: usize| match held {
            Some(mut held) => drain(&mut held),
            None => {
                self.request_drain(index);
                drained = false;
            }
        };
        let mut remote = false;
        for index in (0..MAX_CPUS).filter(|&index| used_by(index)) {
            if online.contains(index) {
                remote = true;
            } else {
                handle(self.claim_offline(index, me, cpus), index);
            }
        }
        if remote {
            // Whatever the policy answers (one that reached some CPUs and not others
            // says `false`), every slot handed over is drained (if used) and given
            // back, a CPU's that came online since the set was read included: one
            // left handed would keep its owner out of it for good.
            let _reached = on_others(&|| self.surrender(cpus, me));
            for index in (0..MAX_CPUS).filter(|&index| index != me) {
                match self.handed(index, me) {
                    Some(held) if used_by(index) => handle(Some(held), index),
                    Some(_unused) => {}
                    None if used_by(index) && online.contains(index) => handle(None, index),
                    None => {}
                }
            }
        }
        if own_away {
            drained &= self.drain_own_when_back(cpus, me, &irq, &used, relax, &mut drain);
        }
        drained
    }

    /// The caller's own slot, which it found held: if another CPU holds it (handed
    /// over to that CPU's drain), waits until it is back, then drains it if used; if
    /// it is held further up this CPU's stack, asks for a drain at the next entry.
    /// Whether it was drained.
    fn drain_own_when_back(
        &self,
        cpus: &dyn Cpus,
        me: usize,
        irq: &IrqOff<'_>,
        used: &impl Fn(&S) -> bool,
        relax: impl Fn(),
        drain: &mut impl FnMut(&mut Held<'_, S, O>),
    ) -> bool {
        let Some(slot) = self.slots.get(me) else {
            return false;
        };
        loop {
            match slot.state.load(Ordering::Acquire) {
                OWNER => {
                    self.request_drain(me);
                    return false;
                }
                IDLE => {
                    if let Some(mut held) = self.this_cpu(cpus, irq) {
                        if used(&slot.shared) {
                            drain(&mut held);
                        }
                        return true;
                    }
                }
                // Handed to a CPU draining it now: it gives it back when done, and
                // may wait for this CPU to take its shootdown meanwhile.
                _ => relax(),
            }
        }
    }
}

#[cfg(test)]
mod test;
