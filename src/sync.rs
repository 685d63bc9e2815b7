//! The library's locks: taken with interrupts held off, and waited for in one loop
//! that serves TLB shootdowns.
//!
//! A kernel's interrupt handler may allocate (a keyboard handler pushing into a
//! `Vec`) and so reach the heap's locks, the manager's, the per-CPU blocks' and the
//! frame allocator's. Had the code it interrupted on the same CPU held one of them,
//! it would spin forever. So every lock here is taken as Linux's
//! `spin_lock_irqsave` takes one: interrupts held off first ([`Cpus::irq_save`]), and
//! restored only after the unlock. Per-CPU state is touched under the same hold,
//! which also keeps the caller on its CPU.
//!
//! While it waits, a CPU serves the TLB shootdowns sent to it ([`TlbFlush::relax`]):
//! with interrupts off it takes no IPI, and the holder it waits for may itself wait
//! for this CPU's flush. Every lock that spins waits in [`wait_for`].

use crate::TlbFlush;
use crate::smp::{Cpus, IrqState};
use crate::vmalloc::VmallocOps;
use core::ops::{Deref, DerefMut};

/// What a CPU does around the library's locks.
pub(crate) trait Cpu {
    /// The kernel's CPUs, whose hook holds off interrupts; `None` where no
    /// interrupt handler can call in (host code).
    fn irq_cpus(&self) -> Option<&dyn Cpus>;

    /// One turn of a wait: serve what other CPUs asked of this one.
    fn relax(&self);
}

impl<T: TlbFlush + ?Sized> Cpu for T {
    #[inline]
    fn irq_cpus(&self) -> Option<&dyn Cpus> {
        self.cpus()
    }

    #[inline]
    fn relax(&self) {
        TlbFlush::relax(self)
    }
}

impl Cpu for dyn VmallocOps + '_ {
    #[inline]
    fn irq_cpus(&self) -> Option<&dyn Cpus> {
        self.cpus()
    }

    #[inline]
    fn relax(&self) {
        VmallocOps::relax(self)
    }
}

/// A CPU with no hooks: code that runs before the heap knows its manager, where no
/// lock can be contended by an interrupt handler that allocates.
pub(crate) struct Spin;

impl Cpu for Spin {
    fn irq_cpus(&self) -> Option<&dyn Cpus> {
        None
    }

    fn relax(&self) {
        core::hint::spin_loop();
    }
}

/// Interrupts held off on the calling CPU until this value is dropped.
pub(crate) struct IrqOff<'a> {
    cpus: Option<&'a dyn Cpus>,
    state: IrqState,
}

impl<'a> IrqOff<'a> {
    /// Holds off interrupts through `cpu`'s hook (nothing without one).
    #[inline]
    pub(crate) fn new(cpu: &'a (impl Cpu + ?Sized)) -> Self {
        let cpus = cpu.irq_cpus();
        let state = cpus.map_or(IrqState::new(0), |cpus| cpus.irq_save());
        Self { cpus, state }
    }

    /// Holds off interrupts through the kernel's `cpus`.
    #[inline]
    pub(crate) fn with(cpus: &'a dyn Cpus) -> Self {
        Self {
            state: cpus.irq_save(),
            cpus: Some(cpus),
        }
    }
}

impl Drop for IrqOff<'_> {
    #[inline]
    fn drop(&mut self) {
        if let Some(cpus) = self.cpus {
            cpus.irq_restore(self.state);
        }
    }
}

/// Takes `mutex`, serving `cpu`'s shootdowns while it waits: the one wait loop.
/// The waiter reads before it retries, since a failed compare-and-swap would take
/// the line from the holder, who needs it back to unlock.
#[inline]
pub(crate) fn wait_for<'m, T, C: Cpu + ?Sized>(
    mutex: &'m spin::Mutex<T>,
    cpu: &C,
) -> spin::MutexGuard<'m, T> {
    loop {
        if let Some(guard) = mutex.try_lock() {
            return guard;
        }
        while mutex.is_locked() {
            cpu.relax();
        }
    }
}

/// A spin lock an interrupt handler may take: see the [module documentation](self).
pub(crate) struct IrqLock<T> {
    lock: spin::Mutex<T>,
}

/// An [`IrqLock`] held, interrupts held off; both undone on drop, the lock first.
pub(crate) struct IrqGuard<'a, T> {
    guard: spin::MutexGuard<'a, T>,
    _irq: IrqOff<'a>,
}

impl<T> IrqLock<T> {
    pub(crate) const fn new(value: T) -> Self {
        Self {
            lock: spin::Mutex::new(value),
        }
    }

    /// The lock, interrupts held off through `cpu` while it is waited for and held.
    #[inline]
    pub(crate) fn lock<'a>(&'a self, cpu: &'a (impl Cpu + ?Sized)) -> IrqGuard<'a, T> {
        let irq = IrqOff::new(cpu);
        IrqGuard {
            guard: wait_for(&self.lock, cpu),
            _irq: irq,
        }
    }

    /// The value, the lock no longer needed.
    pub(crate) fn into_inner(self) -> T {
        self.lock.into_inner()
    }

    /// The lock if it is free, interrupts held off while it is held.
    #[inline]
    pub(crate) fn try_lock<'a>(&'a self, cpu: &'a (impl Cpu + ?Sized)) -> Option<IrqGuard<'a, T>> {
        let irq = IrqOff::new(cpu);
        Some(IrqGuard {
            guard: self.lock.try_lock()?,
            _irq: irq,
        })
    }
}

impl<T> Deref for IrqGuard<'_, T> {
    type Target = T;
    #[inline]
    fn deref(&self) -> &T {
        &self.guard
    }
}

impl<T> DerefMut for IrqGuard<'_, T> {
    #[inline]
    fn deref_mut(&mut self) -> &mut T {
        &mut self.guard
    }
}
