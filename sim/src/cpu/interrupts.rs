//! The interrupt model of the machine's CPUs: each thread's interrupt flag, the one
//! thread at a time that runs on a CPU with it off, and the interrupt points where a
//! test may interrupt a CPU or hook into its next flush (see [`SimCpu`]).
//!
//! # Occupancy, biased to the thread that runs a CPU
//!
//! Several host threads may run as one CPU, but only one at a time with interrupts
//! off: turning them off claims the CPU's occupant word with a compare-and-swap. That
//! locked instruction is a cost hardware's `cli` does not have (it waits for every
//! store before it), and every lock of the library pays it. Most CPUs are run by one
//! thread, so a CPU claimed by the same thread many times in a row is *biased* to it
//! (as JVMs bias a lock to the thread that keeps taking it): from then on that thread
//! claims it by setting a flag of its own and checking that the bias is still its
//! own, plain accesses with no fence. Another thread that wants the CPU takes the
//! occupant word, then revokes the bias: it clears it, makes every thread of the
//! process pass a full memory barrier (`membarrier`: the asymmetric half of a Dekker
//! handshake, after which the owner's flag is visible to it, or the owner's check
//! sees the bias gone), and waits until the owner's flag says it left the CPU. Each
//! revocation doubles the claims in a row a CPU needs before it is biased again, so
//! threads that take turns on a CPU soon stop paying for revocations. Without
//! `membarrier` (another host, or a kernel without it) no CPU is ever biased.

use super::{Cpus, Padded, SimCpu, lock, per_cpu};
use std::boxed::Box;
use std::cell::Cell;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::vec::Vec;

/// A thread's bias flag: the address of the [`Occupancy`] it runs on with
/// interrupts off through the bias, or 0. Only its thread writes it.
type Flag = Padded<AtomicUsize>;

thread_local! {
    /// Whether the calling thread runs with interrupts off (its RFLAGS.IF clear).
    pub(super) static INTERRUPTS_OFF: Cell<bool> = const { Cell::new(false) };
    /// With interrupts off, the machine whose `irq_save` turned them off (the
    /// address of its [`Interrupts`]), whose CPU the thread holds.
    static OFF_THROUGH: Cell<usize> = const { Cell::new(0) };
    /// With interrupts off, the CPU whose occupancy `irq_save` took: the thread may
    /// have entered another CPU since (see [`Cpus::save`]).
    static HELD_CPU: Cell<usize> = const { Cell::new(0) };
    /// Whether the calling thread's interrupts went off through a CPU's bias (else
    /// it holds the CPU's occupant word).
    static BIASED_OFF: Cell<bool> = const { Cell::new(false) };
    /// The calling thread's token, for the CPU it occupies (0 until it first needs
    /// one: a lazily made thread-local would cost a check of its own on every call).
    static TOKEN: Cell<u64> = const { Cell::new(0) };
    /// The calling thread's bias flag, made when a CPU is first biased to it and
    /// never freed (a revoking thread may read it after the thread is gone).
    static FLAG: Cell<*const Flag> = const { Cell::new(core::ptr::null()) };
}

/// The calling thread's token.
#[inline]
fn token() -> u64 {
    TOKEN.with(|token| match token.get() {
        0 => {
            let new = NEXT_TOKEN.fetch_add(1, Ordering::Relaxed);
            token.set(new);
            new
        }
        known => known,
    })
}

/// The calling thread's bias flag, made if it has none; null if the host has no
/// memory for it. It comes from the system allocator: the global allocator may be
/// a kernel heap on this machine, whose calls come here.
fn flag() -> *const Flag {
    FLAG.with(|flag| {
        if flag.get().is_null() {
            let layout = std::alloc::Layout::new::<Flag>();
            // SAFETY: `Flag` is not zero-sized.
            let made = unsafe { std::alloc::GlobalAlloc::alloc(&std::alloc::System, layout) };
            if !made.is_null() {
                let made = made.cast::<Flag>();
                // SAFETY: fresh, aligned for a `Flag`, never freed.
                unsafe { made.write(Padded(AtomicUsize::new(0))) };
                flag.set(made);
            }
        }
        flag.get()
    })
}

/// Claims in a row that bias a CPU at first, and at most after revocations.
const FIRST_BIAS: u32 = 8;
const LAST_BIAS: u32 = 1 << 20;

/// One CPU's occupancy: who runs on it with interrupts off, and its bias.
struct Occupancy {
    /// The token of the thread holding it through the compare-and-swap, or 0.
    occupant: AtomicU64,
    /// The flag of the thread it is biased to, or null. Changed only by a thread
    /// holding `occupant`.
    owner: AtomicPtr<Flag>,
    /// The last thread that held `occupant`, the claims it made in a row, and how
    /// many bias the CPU: touched only by the thread holding `occupant`.
    last: AtomicU64,
    streak: AtomicU32,
    threshold: AtomicU32,
    /// Biases granted and revoked, for tests.
    biased: AtomicU64,
    revoked: AtomicU64,
}

impl Occupancy {
    fn new() -> Self {
        Self {
            occupant: AtomicU64::new(0),
            owner: AtomicPtr::new(core::ptr::null_mut()),
            last: AtomicU64::new(0),
            streak: AtomicU32::new(0),
            threshold: AtomicU32::new(FIRST_BIAS),
            biased: AtomicU64::new(0),
            revoked: AtomicU64::new(0),
        }
    }

    /// What the owner's flag holds while it runs here with interrupts off.
    fn id(&self) -> usize {
        core::ptr::from_ref(self) as usize
    }

    /// Claims the CPU through its bias, if it is biased to the calling thread.
    #[inline]
    fn claim_biased(&self) -> bool {
        let mine = FLAG.with(Cell::get).cast_mut();
        if mine.is_null() || self.owner.load(Ordering::Relaxed) != mine {
            return false;
        }
        // SAFETY: the calling thread's flag, never freed.
        let flag = unsafe { &*mine };
        flag.store(self.id(), Ordering::Relaxed);
        // The store must not pass the check below: the compiler is told so here,
        // and a revoking thread's `membarrier` makes the processor drain it.
        core::sync::atomic::compiler_fence(Ordering::SeqCst);
        if self.owner.load(Ordering::Relaxed) == mine {
            return true;
        }
        flag.store(0, Ordering::Release);
        false
    }

    /// Takes the occupant word for the calling thread (`token`), waiting while
    /// another thread holds it, then settles the bias.
    #[inline(always)]
    fn claim(&self, token: u64) {
        while self
            .occupant
            .compare_exchange(0, token, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            std::thread::yield_now();
        }
        self.settle_bias(token);
    }

    /// With `occupant` held by the calling thread (`token`): revokes another
    /// thread's bias, or counts this claim towards biasing the CPU to the caller.
    fn settle_bias(&self, token: u64) {
        let owner = self.owner.load(Ordering::Relaxed);
        if !owner.is_null() {
            self.revoke(owner);
        }
        if self.last.load(Ordering::Relaxed) != token {
            self.last.store(token, Ordering::Relaxed);
            self.streak.store(0, Ordering::Relaxed);
            return;
        }
        let streak = self.streak.load(Ordering::Relaxed) + 1;
        self.streak.store(streak, Ordering::Relaxed);
        if streak >= self.threshold.load(Ordering::Relaxed) && can_bias() {
            let flag = flag();
            if !flag.is_null() {
                // Published by the release of `occupant`, which the next claimant
                // takes.
                self.owner.store(flag.cast_mut(), Ordering::Relaxed);
                self.biased.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Takes the bias from the thread whose flag is `owner` (the caller holds
    /// `occupant`), once that thread is off the CPU.
    #[cold]
    fn revoke(&self, owner: *mut Flag) {
        self.owner.store(core::ptr::null_mut(), Ordering::Relaxed);
        barrier_every_thread();
        // SAFETY: flags are never freed.
        let owner = unsafe { &*owner };
        while owner.load(Ordering::Acquire) == self.id() {
            std::thread::yield_now();
        }
        let threshold = self.threshold.load(Ordering::Relaxed);
        self.threshold.store(
            threshold.saturating_mul(2).min(LAST_BIAS),
            Ordering::Relaxed,
        );
        self.last.store(0, Ordering::Relaxed);
        self.revoked.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(target_os = "linux")]
const MEMBARRIER_CMD_PRIVATE_EXPEDITED: libc::c_int = 1 << 3;
#[cfg(target_os = "linux")]
const MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED: libc::c_int = 1 << 4;

/// Whether this process may bias CPUs: `membarrier`'s expedited barrier is there
/// (registered once).
fn can_bias() -> bool {
    #[cfg(target_os = "linux")]
    {
        static REGISTERED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *REGISTERED.get_or_init(|| {
            // SAFETY: a system call with no pointer arguments.
            unsafe {
                libc::syscall(
                    libc::SYS_membarrier,
                    MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED,
                    0,
                    0,
                ) == 0
            }
        })
    }
    #[cfg(not(target_os = "linux"))]
    {
        false
    }
}

/// Makes every running thread of the process pass a full memory barrier before it
/// returns. Only called once a CPU was biased, so registered (a forked child that
/// finds its registration gone registers again).
fn barrier_every_thread() {
    #[cfg(target_os = "linux")]
    {
        let barrier = || {
            // SAFETY: a system call with no pointer arguments.
            unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_PRIVATE_EXPEDITED, 0, 0) }
        };
        if barrier() != 0 {
            // SAFETY: as above.
            unsafe {
                libc::syscall(
                    libc::SYS_membarrier,
                    MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED,
                    0,
                    0,
                )
            };
            assert_eq!(barrier(), 0, "membarrier failed after it was registered");
        }
    }
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
    /// Per CPU: which thread runs on it with interrupts off.
    occupancy: Vec<Padded<Occupancy>>,
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
    /// What `OFF_THROUGH` holds while a thread's interrupts are off through this
    /// machine.
    fn id(&self) -> usize {
        core::ptr::from_ref(self) as usize
    }

    pub(super) fn new(count: usize) -> Self {
        Self {
            occupancy: per_cpu(count, Occupancy::new),
            armed: (0..count).map(|_| Mutex::new(None)).collect(),
            points: per_cpu(count, || AtomicU64::new(0)),
            counting: per_cpu(count, || AtomicBool::new(false)),
            in_flush: (0..count).map(|_| Mutex::new(None)).collect(),
            watched: AtomicU64::new(0),
        }
    }
}

impl Cpus {
    /// How many times CPU `cpu` was biased to a thread, and how many times a bias was
    /// revoked (see the [module docs](self)).
    #[cfg(test)]
    pub(crate) fn biases(&self, cpu: usize) -> (u64, u64) {
        let occupancy = &self.irq.occupancy[cpu];
        (
            occupancy.biased.load(Ordering::Relaxed),
            occupancy.revoked.load(Ordering::Relaxed),
        )
    }

    /// Whether a test watches any CPU's interrupt points or flushes.
    #[inline]
    pub(super) fn watched(&self) -> bool {
        self.irq.watched.load(Ordering::Relaxed) != 0
    }

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
    #[inline]
    pub(crate) fn point(&self) {
        if self.watched() {
            self.watched_point();
        }
    }

    #[cold]
    fn watched_point(&self) {
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
    /// on): with them off, on the CPU alone. A handler that panics (a failed check)
    /// turns them back on as it unwinds, as the interrupted code had them: the CPU is
    /// not left held by a thread that is gone.
    pub(super) fn as_interrupt(&self, cpu: usize, handler: impl FnOnce()) {
        struct On<'c>(&'c Cpus);
        impl Drop for On<'_> {
            fn drop(&mut self) {
                self.0.interrupts_on();
            }
        }
        self.interrupts_off(cpu);
        let _on = On(self);
        handler();
    }

    /// The calling thread's interrupts go off on `cpu`: it waits until no other
    /// thread runs there with interrupts off, as a task waits to be scheduled (see
    /// the [module docs](self) for the bias).
    #[inline]
    fn interrupts_off(&self, cpu: usize) {
        let occupancy = &self.irq.occupancy[cpu];
        if occupancy.claim_biased() {
            BIASED_OFF.set(true);
        } else {
            occupancy.claim(token());
        }
        INTERRUPTS_OFF.set(true);
        OFF_THROUGH.set(self.irq.id());
        HELD_CPU.set(cpu);
    }

    /// The calling thread's interrupts come back on: another thread may run with
    /// them off on the CPU it held (the one it turned them off on, whichever it runs
    /// as now).
    #[inline]
    fn interrupts_on(&self) {
        INTERRUPTS_OFF.set(false);
        if BIASED_OFF.replace(false) {
            // SAFETY: set when the bias was claimed: the thread's flag, never freed.
            unsafe { &*FLAG.with(Cell::get) }.store(0, Ordering::Release);
        } else if let Some(occupancy) = self.irq.occupancy.get(HELD_CPU.get()) {
            occupancy.occupant.store(0, Ordering::Release);
        }
    }

    /// `cli`, saying what [`restore`](Self::restore) undoes: [`WERE_ON`],
    /// [`WERE_OFF`], or [`HELD_HERE`] (with the CPU's index) when this call claimed
    /// the thread's CPU though its interrupts were off: they went off through another
    /// machine, or on another CPU the thread left since ([`SimCpu::enter`] with
    /// interrupts off). A task does not move with interrupts off on hardware; here
    /// the CPU it entered is held too, so that the per-CPU state of the library stays
    /// one thread's.
    #[inline(always)]
    pub(super) fn save(&self) -> u64 {
        self.point();
        let Some(cpu) = self.current() else {
            return WERE_OFF;
        };
        if !INTERRUPTS_OFF.get() {
            self.interrupts_off(cpu);
            WERE_ON
        } else if OFF_THROUGH.get() == self.irq.id() && HELD_CPU.get() == cpu {
            WERE_OFF
        } else {
            self.hold_for_nested(cpu)
        }
    }

    /// The calling thread, with interrupts off through another machine, calls into
    /// this one (a kernel heap on one machine as the global allocator, called while
    /// the thread holds another's lock): it holds its CPU here too, so the per-CPU
    /// state of this machine's library stays one thread's. Through the occupant word
    /// only: the thread's bias flag says which CPU it runs on through a bias, and
    /// that is the other machine's.
    #[cold]
    #[inline(never)]
    fn hold_for_nested(&self, cpu: usize) -> u64 {
        let occupancy = &self.irq.occupancy[cpu];
        let token = token();
        if occupancy.occupant.load(Ordering::Relaxed) == token {
            return WERE_OFF;
        }
        occupancy.claim(token);
        HELD_HERE | (cpu as u64) << HELD_SHIFT
    }

    /// Undoes what [`save`](Self::save) said (`sti` after [`WERE_ON`]); interrupts
    /// that waited are taken now. False when the calling thread runs as no CPU of
    /// this machine.
    #[inline(always)]
    pub(super) fn restore(&self, saved: u64) -> bool {
        let Some(cpu) = self.current() else {
            return false;
        };
        if saved == WERE_ON {
            if INTERRUPTS_OFF.get() {
                self.interrupts_on();
                // Nothing armed anywhere (the one read a benchmark pays): no
                // interrupt waited and the point counts for nobody.
                if self.watched() {
                    self.take_armed(cpu, false);
                    self.watched_point();
                }
            }
        } else if saved & HELD_MASK == HELD_HERE {
            self.release_nested(saved >> HELD_SHIFT);
        }
        true
    }

    /// Lets go of the CPU [`hold_for_nested`](Self::hold_for_nested) held: only the
    /// thread's own hold (a state made up, or restored on another thread, must not
    /// let a third thread in beside the holder).
    #[cold]
    #[inline(never)]
    fn release_nested(&self, cpu: u64) {
        let Some(occupancy) = usize::try_from(cpu)
            .ok()
            .and_then(|cpu| self.irq.occupancy.get(cpu))
        else {
            return;
        };
        let _ =
            occupancy
                .occupant
                .compare_exchange(token(), 0, Ordering::Release, Ordering::Relaxed);
    }
}

/// What [`Cpus::save`] saved: interrupts were on (bit 0, as the library's defaults
/// keep it); they were off; they were off through another machine and the call
/// held the thread's CPU on this one.
const WERE_OFF: u64 = 0;
pub(super) const WERE_ON: u64 = 1;
const HELD_HERE: u64 = 2;
/// [`HELD_HERE`] is in the low bits, the CPU's index above them.
const HELD_MASK: u64 = 0xff;
const HELD_SHIFT: u32 = 8;

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
        // Dropped once the lock is let go: the handler's captures are the test's.
        let armed = lock(&irq.armed[self.index]).take();
        let dropped = armed.is_some();
        drop(armed);
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
