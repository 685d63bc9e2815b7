//! TLB shootdown: flushing every CPU that may hold a stale translation.
//!
//! On a machine with several CPUs, each has its own TLB, and a page-table write on one
//! CPU does not reach the others: only their own `invlpg` or CR3 writes do. So a flush
//! that must be global (before a frame or a virtual range is reused) has to run on
//! every CPU. [`Shootdown`] is a [`TlbFlush`] that does it: it flushes the calling CPU,
//! queues the same flush in the mailbox of every other online CPU, interrupts them
//! with an IPI, and waits until each has flushed.
//!
//! # What the kernel supplies
//!
//! The three facts the library cannot know, in [`Cpus`]: the calling CPU's index, the
//! CPUs that are online, and how to send them the shootdown IPI. The kernel's IPI
//! handler calls [`Shootdown::handle_ipi`], then signals end of interrupt. That is all:
//!
//! ```text
//! struct KernelCpus;
//! unsafe impl Cpus for KernelCpus {
//!     fn current(&self) -> usize { percpu::index() }
//!     fn online(&self) -> CpuSet { CpuSet::from_bits(ONLINE.load(Acquire)) }
//!     fn send_ipi(&self, targets: CpuSet) { lapic::send(targets, SHOOTDOWN_VECTOR) }
//! }
//! static TLB: Shootdown<KernelCpus, InvlpgFlush> = Shootdown::new(KernelCpus, unsafe { InvlpgFlush::new() });
//! extern "x86-interrupt" fn shootdown_vector(_: InterruptStackFrame) {
//!     TLB.handle_ipi();
//!     lapic::eoi();
//! }
//! // Vmalloc::new(config, root, phys, frames, &TLB)
//! ```
//!
//! An application processor marks itself online only once it runs on the kernel's page
//! tables with its IPI vector installed; before that it holds no translation of kernel
//! memory that a flush could miss.
//!
//! # Which CPUs are shot at
//!
//! Every online CPU but the caller. The vmalloc region lives in the kernel half of the
//! address space, which every address space shares, so any CPU may have touched an
//! area (or prefetched its translation) whatever process it runs; tracking which ones
//! did would cost more on every access than the IPIs it saves on a purge, which the
//! lazy purge already makes rare.
//!
//! # The protocol
//!
//! Each CPU has a mailbox: a short queue of flushes (ranges, or "everything" when the
//! queue overflows or a range passes the [ceiling](TlbFlush::ceiling)), a request
//! count and a done count. The initiator flushes its own TLB, then, after a
//! sequentially consistent fence, reads the online set, and for each target pushes
//! the flush under that mailbox's lock and bumps its request count, remembering the
//! number. It sends one IPI to all targets and waits until each target's done count
//! reaches the remembered number. A target's handler reads its request count, takes
//! the queued flushes under the lock, flushes, and publishes the request count it
//! read as done (Release), so the initiator's Acquire load sees the flush complete;
//! then it looks again, until the queue is empty.
//!
//! A flush started with [`TlbFlush::start_flush`] stops after the IPI: the numbers it
//! remembered go to the caller in a [`FlushTicket`](crate::tlb::FlushTicket), and
//! [`TlbFlush::finish_flush`] does the waiting later (at once if every target has
//! served by then, which the vmalloc manager's lazy lists count on).
//!
//! The fence orders the caller's page-table stores before the read of the online set.
//! A CPU joining the set does so with a sequentially consistent update and only then
//! flushes its own TLB (the [`Cpus`] contract): either the initiator sees it and
//! shoots at it, or its walks after the flush see the stores.
//!
//! A CPU serves its mailbox once at a time. Both the shootdown and the serve run with
//! interrupts held off ([`Cpus::irq_save`]), and a serve that still finds itself
//! nested in another on the same CPU (an NMI, or a kernel whose hook holds nothing
//! off) returns at once: the serve it interrupted looks at the queue again before it
//! returns. So `done` never passes a request its CPU has not flushed: a nested serve
//! cannot publish a count that covers a request the outer one took but has not
//! flushed yet.
//!
//! No deadlock is possible between CPUs that follow it:
//!
//! - While it waits, for targets or for a target's mailbox lock, the initiator serves
//!   its own mailbox, so two CPUs shooting at each other both progress.
//! - While a CPU waits for any of the library's locks (the manager's, a per-CPU
//!   block's, the kernel heap's, whose holder may be inside a vmalloc call), it serves
//!   its mailbox too ([`TlbFlush::relax`], in the library's one wait loop), so an
//!   initiator that holds a lock is never waiting for a CPU that waits for it, even
//!   though that CPU spins with interrupts held off.
//! - The handler only ever *tries* its own mailbox's lock: when another CPU is pushing,
//!   that CPU sends an IPI after it unlocks.
//!
//! # Allowed CPU states
//!
//! An initiator may hold any of the library's locks and runs with interrupts held
//! off: it polls its own mailbox. A target must eventually do one of: take the IPI
//! (interrupts enabled), wait for one of the library's locks, or call
//! [`handle_ipi`](Shootdown::handle_ipi) itself (a CPU that idles with interrupts off
//! must poll). A CPU that leaves the online set must flush its own TLB as it goes;
//! one that joins it again, after its own flush, serves its mailbox
//! ([`handle_ipi`](Shootdown::handle_ipi)): an IPI sent as it left may have been
//! lost, and an initiator that saw it online again waits for its request.
//! An interrupt handler may start a shootdown (it cannot have interrupted one: the
//! library holds interrupts off while it shoots); an NMI handler must not, and frees
//! with `vfree_atomic`.

#[cfg(doc)]
use crate::TlbFlush;

/// The most CPUs a [`CpuSet`] can name.
pub const MAX_CPUS: usize = 64;

/// A set of CPU indices below [`MAX_CPUS`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct CpuSet(u64);

impl CpuSet {
    /// No CPU.
    pub const fn empty() -> Self {
        Self(0)
    }

    /// CPUs `0..count` (all of them from [`MAX_CPUS`] on).
    pub const fn first(count: usize) -> Self {
        if count >= MAX_CPUS {
            Self(u64::MAX)
        } else {
            Self((1 << count) - 1)
        }
    }

    /// The set whose bit `i` says whether CPU `i` is in it.
    pub const fn from_bits(bits: u64) -> Self {
        Self(bits)
    }

    /// Bit `i` set for CPU `i`.
    pub const fn bits(self) -> u64 {
        self.0
    }

    /// This set and `cpu` (unchanged for an index from [`MAX_CPUS`] on).
    pub const fn with(self, cpu: usize) -> Self {
        if cpu >= MAX_CPUS {
            self
        } else {
            Self(self.0 | 1 << cpu)
        }
    }

    /// This set without `cpu`.
    pub const fn without(self, cpu: usize) -> Self {
        if cpu >= MAX_CPUS {
            self
        } else {
            Self(self.0 & !(1 << cpu))
        }
    }

    /// Whether `cpu` is in the set.
    pub const fn contains(self, cpu: usize) -> bool {
        cpu < MAX_CPUS && self.0 & (1 << cpu) != 0
    }

    /// Whether the set is empty.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// How many CPUs are in it.
    pub const fn len(self) -> usize {
        self.0.count_ones() as usize
    }

    /// The CPUs, lowest first.
    pub fn iter(self) -> impl Iterator<Item = usize> {
        let mut bits = self.0;
        core::iter::from_fn(move || {
            if bits == 0 {
                return None;
            }
            let cpu = bits.trailing_zeros() as usize;
            bits &= bits - 1;
            Some(cpu)
        })
    }
}

/// What the kernel tells the library about its CPUs.
///
/// # Safety
///
/// [`Shootdown`] relies on these answers to decide which TLBs are flushed, and the
/// library's per-CPU state (the kernel heap's per-CPU slabs, the vmalloc manager's CPU
/// caches) on them to touch a CPU's state from that CPU alone:
///
/// - [`current`](Self::current) is the index (below [`MAX_CPUS`]) of the CPU running
///   the caller, distinct for each CPU;
/// - the caller stays on that CPU from [`irq_save`](Self::irq_save) to the matching
///   [`irq_restore`](Self::irq_restore): `irq_save` holds off interrupts on the
///   calling CPU and, in a kernel that preempts, task switches (no migration, no
///   other task on the CPU) until then; the library reads `current` only in between.
///   The defaults execute `pushf`/`cli`/`sti`, so an implementation running outside
///   ring 0 (a host test) overrides both;
/// - [`online`](Self::online) contains every CPU that may hold a translation of kernel
///   memory (every CPU that runs on the kernel's page tables); a CPU leaves it only
///   after flushing its own TLB and after its last call into the library returned,
///   with a release (or stronger) update, and joins it with a sequentially consistent
///   read-modify-write (any locked instruction on x86) before it flushes its own TLB
///   and calls the library again;
/// - [`send_ipi`](Self::send_ipi) makes each target CPU run
///   [`Shootdown::handle_ipi`] eventually (or the target polls it, see the
///   [module documentation](self#allowed-cpu-states)).
pub unsafe trait Cpus: Sync {
    /// The index of the CPU running the caller.
    fn current(&self) -> usize;

    /// The CPUs that may hold translations of kernel memory.
    fn online(&self) -> CpuSet;

    /// Interrupts each CPU in `targets` with the shootdown vector.
    fn send_ipi(&self, targets: CpuSet);

    /// Holds off interrupts (and task switches) on the calling CPU until the matching
    /// [`irq_restore`](Self::irq_restore), and says what to restore: Linux's
    /// `local_irq_save`. The library calls it before it takes any lock an interrupt
    /// handler can reach, and around its per-CPU state. Calls nest.
    ///
    /// The default reads RFLAGS.IF and executes `cli`: ring 0 only. A kernel that
    /// counts preemption disables it here too, or keeps interrupts as its only way
    /// to preempt.
    fn irq_save(&self) -> IrqState {
        let enabled = x86_64::instructions::interrupts::are_enabled();
        x86_64::instructions::interrupts::disable();
        IrqState::new(u64::from(enabled))
    }

    /// Undoes the matching [`irq_save`](Self::irq_save): Linux's
    /// `local_irq_restore`. The default executes `sti` if interrupts were enabled.
    fn irq_restore(&self, state: IrqState) {
        if state.bits() & 1 != 0 {
            x86_64::instructions::interrupts::enable();
        }
    }
}

/// The one CPU of a uniprocessor kernel: index 0, always online, no IPIs, and
/// interrupts held off with `cli` (the [`Cpus`] defaults). An [`InvlpgFlush`]
/// answers [`TlbFlush::cpus`] with it; a kernel gives it to a
/// [`LockedFrameAllocator`] it also calls outside the library.
///
/// [`InvlpgFlush`]: crate::tlb::InvlpgFlush
/// [`LockedFrameAllocator`]: crate::frame::LockedFrameAllocator
#[derive(Debug)]
pub struct OneCpu(pub(crate) ());

impl OneCpu {
    /// The kernel's only CPU.
    ///
    /// # Safety
    ///
    /// The kernel runs on one CPU, in ring 0 (interrupts are held off with `cli`).
    pub const unsafe fn new() -> Self {
        Self(())
    }
}

// SAFETY: made by `new`, whose contract puts the caller in ring 0 on the only CPU:
// index 0, online while it runs, nothing to interrupt with a shootdown, and the
// default `cli`/`sti` may run.
unsafe impl Cpus for OneCpu {
    fn current(&self) -> usize {
        0
    }
    fn online(&self) -> CpuSet {
        CpuSet::first(1)
    }
    fn send_ipi(&self, _: CpuSet) {}
}

/// What [`Cpus::irq_save`] saved, for [`Cpus::irq_restore`]: the defaults keep
/// whether interrupts were enabled in bit 0; a kernel's own implementation may keep
/// anything in the bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IrqState(u64);

impl IrqState {
    /// A state holding `bits`.
    pub const fn new(bits: u64) -> Self {
        Self(bits)
    }

    /// The bits the state holds.
    pub const fn bits(self) -> u64 {
        self.0
    }
}

// SAFETY: forwards to an implementation that upholds the contract.
unsafe impl<C: Cpus + ?Sized> Cpus for &C {
    fn current(&self) -> usize {
        (**self).current()
    }
    fn online(&self) -> CpuSet {
        (**self).online()
    }
    fn send_ipi(&self, targets: CpuSet) {
        (**self).send_ipi(targets)
    }
    fn irq_save(&self) -> IrqState {
        (**self).irq_save()
    }
    fn irq_restore(&self, state: IrqState) {
        (**self).irq_restore(state)
    }
}

mod shootdown;

pub use shootdown::{Shootdown, ShootdownStats};
