//! The interrupt model of the machine's CPUs: each thread's interrupt flag, the one
//! thread at a time that runs on a CPU with it off, and the interrupt points where a
//! test may interrupt a CPU or hook into its next flush (see [`SimCpu`]).

use super::{Cpus, Padded, SimCpu, lock, per_cpu};
use std::boxed::Box;
use std::cell::Cell;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::vec::Vec;

thread_local! {
    /// Whether the calling thread runs with interrupts off (its RFLAGS.IF clear).
    pub(super) static INTERRUPTS_OFF: Cell<bool> = const { Cell::new(false) };
    /// The calling thread's token, for the CPU it occupies.
    static TOKEN: u64 = NEXT_TOKEN.fetch_add(1, Ordering::Relaxed);
}

/// Tokens of threads, from 1 (0 is no thread).
static NEXT_TOKEN: AtomicU64 = AtomicU64::new(1);

/// Code a test runs on a CPU at a moment of its choosing.
type Hook = Box<dyn FnOnce() + Send>;

/// An interrupt a test armed on one CPU: it runs at the `after`-th interrupt point
/// from now (0: the next one).
struct Armed {
    after: u64,
    handler: Hook,
}

/// The interrupt state of a machine's CPUs: who runs with interrupts off, and what
/// tests armed at their interrupt points.
pub(super) struct Interrupts {
    /// Per CPU: the token of the thread running on it with interrupts off, or 0.
    occupant: Vec<Padded<AtomicU64>>,
    /// Per CPU: the interrupt a test armed.
    armed: Vec<Mutex<Option<Armed>>>,
    /// Per CPU: interrupt points passed while counting.
    points: Vec<Padded<AtomicU64>>,
    /// Per CPU: whether its points are counted.
    counting: Vec<Padded<AtomicBool>>,
    /// Per CPU: what runs inside its next TLB flush.
    in_flush: Vec<Mutex<Option<Hook>>>,
    /// Whether any CPU has an interrupt or a flush hook armed, or counts its points:
    /// the one read an interrupt point or a flush makes otherwise.
    watched: AtomicU64,
}

impl Interrupts {
    pub(super) fn new(count: usize) -> Self {
        Self {
            occupant: per_cpu(count, || AtomicU64::new(0)),
            armed: (0..count).map(|_| Mutex::new(None)).collect(),
            points: per_cpu(count, || AtomicU64::new(0)),
            counting: per_cpu(count, || AtomicBool::new(false)),
            in_flush: (0..count).map(|_| Mutex::new(None)).collect(),
            watched: AtomicU64::new(0),
        }
    }
}

impl Cpus {
    /// Runs the hook armed for the calling thread's CPU's next flush, if any.
    pub(super) fn flushing(&self) {
        if self.irq.watched.load(Ordering::Relaxed) == 0 {
            return;
        }
        let Some(cpu) = self.current() else {
            return;
        };
        let hook = lock(&self.irq.in_flush[cpu]).take();
        if let Some(hook) = hook {
            self.irq.watched.fetch_sub(1, Ordering::Relaxed);
            hook();
        }
    }

    /// An interrupt point of the calling thread's CPU (see the [module
    /// docs](SimCpu#interrupt-points)): counts it, and takes the armed interrupt when
    /// it is due and interrupts are on.
    pub(crate) fn point(&self) {
        if self.irq.watched.load(Ordering::Relaxed) == 0 {
            return;
        }
        let Some(cpu) = self.current() else {
            return;
        };
        if self.irq.counting[cpu].load(Ordering::Relaxed) {
            self.irq.points[cpu].fetch_add(1, Ordering::Relaxed);
        }
        self.take_armed(cpu, true);
    }

    /// Runs CPU `cpu`'s armed interrupt if it is due (counting this point down when
    /// `tick`) and interrupts are on.
    fn take_armed(&self, cpu: usize, tick: bool) {
        let due = {
            let mut armed = lock(&self.irq.armed[cpu]);
            match armed.as_mut() {
                Some(interrupt) if interrupt.after > 0 => {
                    if tick {
                        interrupt.after -= 1;
                    }
                    None
                }
                Some(_) if !INTERRUPTS_OFF.get() => armed.take(),
                _ => None,
            }
        };
        if let Some(interrupt) = due {
            self.irq.watched.fetch_sub(1, Ordering::Relaxed);
            self.as_interrupt(cpu, interrupt.handler);
        }
    }

    /// Runs `handler` as an interrupt on `cpu` (the calling thread's interrupts are
    /// on): with them off, on the CPU alone.
    pub(super) fn as_interrupt(&self, cpu: usize, handler: impl FnOnce()) {
        self.interrupts_off(cpu);
        handler();
        self.interrupts_on(cpu);
    }

    /// The calling thread's interrupts go off on `cpu`: it waits until no other
    /// thread runs there with interrupts off, as a task waits to be scheduled.
    fn interrupts_off(&self, cpu: usize) {
        let token = TOKEN.with(|token| *token);
        let occupant = &self.irq.occupant[cpu];
        while occupant
            .compare_exchange(0, token, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            std::thread::yield_now();
        }
        INTERRUPTS_OFF.set(true);
    }

    /// The calling thread's interrupts come back on: another thread may run on
    /// `cpu` with interrupts off.
    fn interrupts_on(&self, cpu: usize) {
        INTERRUPTS_OFF.set(false);
        self.irq.occupant[cpu].store(0, Ordering::Release);
    }

    /// `cli`, saying whether interrupts were on.
    pub(super) fn save(&self) -> bool {
        self.point();
        let Some(cpu) = self.current() else {
            return false;
        };
        let on = !INTERRUPTS_OFF.get();
        if on {
            self.interrupts_off(cpu);
        }
        on
    }

    /// `sti` if `on`; interrupts that waited are taken now. False when the calling
    /// thread runs as no CPU of this machine.
    pub(super) fn restore(&self, on: bool) -> bool {
        let Some(cpu) = self.current() else {
            return false;
        };
        if on && INTERRUPTS_OFF.get() {
            self.interrupts_on(cpu);
            // Nothing armed anywhere (the one read a benchmark pays): no interrupt
            // waited and the point counts for nobody.
            if self.irq.watched.load(Ordering::Relaxed) != 0 {
                self.take_armed(cpu, false);
                self.point();
            }
        }
        true
    }
}

impl SimCpu<'_> {
    /// Arms an interrupt: `handler` runs on the calling thread as an interrupt of
    /// this CPU at the `after`-th [interrupt point](SimCpu#interrupt-points) this CPU
    /// passes from now (0: the next one), or, if interrupts are off then, as soon as
    /// they are on again. Replaces an interrupt armed before and not yet taken.
    pub fn interrupt_after(&self, after: u64, handler: impl FnOnce() + Send + 'static) {
        let irq = &self.machine.cpus.irq;
        let old = lock(&irq.armed[self.index]).replace(Armed {
            after,
            handler: Box::new(handler),
        });
        if old.is_none() {
            irq.watched.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Whether an interrupt armed with [`interrupt_after`](Self::interrupt_after)
    /// has not run yet.
    pub fn interrupt_armed(&self) -> bool {
        lock(&self.machine.cpus.irq.armed[self.index]).is_some()
    }

    /// Drops the armed interrupt, if it has not run; says whether there was one.
    pub fn disarm(&self) -> bool {
        let irq = &self.machine.cpus.irq;
        let dropped = lock(&irq.armed[self.index]).take().is_some();
        if dropped {
            irq.watched.fetch_sub(1, Ordering::Relaxed);
        }
        dropped
    }

    /// Runs `f` on the calling thread as this CPU and counts the [interrupt
    /// points](SimCpu#interrupt-points) it passes on this CPU.
    pub fn count_points<R>(&self, f: impl FnOnce() -> R) -> (R, u64) {
        let irq = &self.machine.cpus.irq;
        let before = irq.points[self.index].load(Ordering::Relaxed);
        irq.counting[self.index].store(true, Ordering::Relaxed);
        irq.watched.fetch_add(1, Ordering::Relaxed);
        let result = self.run(|_| f());
        irq.watched.fetch_sub(1, Ordering::Relaxed);
        irq.counting[self.index].store(false, Ordering::Relaxed);
        (
            result,
            irq.points[self.index].load(Ordering::Relaxed) - before,
        )
    }

    /// Runs `hook` on the calling thread in the middle of this CPU's next TLB flush
    /// (before it drops anything), whether interrupts are on or off: what an NMI,
    /// or an IPI landing in a flush that runs with interrupts on, would do there.
    pub fn in_next_flush(&self, hook: impl FnOnce() + Send + 'static) {
        let irq = &self.machine.cpus.irq;
        let old = lock(&irq.in_flush[self.index]).replace(Box::new(hook));
        if old.is_none() {
            irq.watched.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Whether the calling thread's interrupts are on (the thread running as this CPU).
    pub fn interrupts_enabled(&self) -> bool {
        !INTERRUPTS_OFF.get()
    }
}
