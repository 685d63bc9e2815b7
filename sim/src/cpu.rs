//! The machine's CPUs: which one a host thread is, their TLB flushes, and the
//! inter-processor interrupts between them.
//!
//! Host threads act as CPUs. A thread is CPU 0 until it [enters](SimCpu::enter)
//! another; the machine's own accesses ([`SimMachine::read`], ...), its
//! [`TlbFlush`] methods and its [`Cpus`] answers are those of the calling thread's CPU,
//! and a [`SimCpu`] handle does the same for a chosen CPU.
//!
//! An IPI ([`Cpus::send_ipi`]) only marks the target pending; the target runs the
//! handler the test installed ([`SimMachine::set_ipi_handler`]) at its next memory
//! access or [`poll`](SimCpu::poll), the way a CPU takes an interrupt between
//! instructions. So delivery is asynchronous: a target that never touches memory never
//! takes it.

//!
//! Interrupts on and off, and the points a test may interrupt a CPU at: see
//! [`SimCpu`]; the model lives in the `interrupts` submodule.

mod interrupts;

use super::tlb::TlbStats;
use super::{Access, Fault, SimMachine, Translation};
use interrupts::{INTERRUPTS_OFF, Interrupts, WERE_ON};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::vec::Vec;
use vmalloc::TlbFlush;
use vmalloc::smp::{CpuSet, Cpus as KernelCpus, IrqState};
use x86_64::VirtAddr;
use x86_64::structures::paging::page::PageRange;
use x86_64::structures::paging::{Page, Size4KiB};

thread_local! {
    /// The CPU the calling thread runs as, on every machine.
    static CURRENT: Cell<usize> = const { Cell::new(0) };
}

/// A handler for the shootdown IPI.
type Handler = Arc<dyn Fn() + Send + Sync>;

/// A value on cache lines of its own: what one simulated CPU writes on every call
/// (its interrupt flag's occupancy, its pending IPI, its counters, its TLB's lock)
/// must not slow down another CPU's calls, as a real CPU's own state does not.
#[repr(align(128))]
#[derive(Debug, Default)]
pub(crate) struct Padded<T>(pub(crate) T);

impl<T> core::ops::Deref for Padded<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

/// One padded value per CPU.
pub(crate) fn per_cpu<T>(count: usize, make: impl FnMut() -> T) -> Vec<Padded<T>> {
    core::iter::repeat_with(make)
        .take(count)
        .map(Padded)
        .collect()
}

/// The interrupt state of a machine's CPUs.
pub(super) struct Cpus {
    online: AtomicU64,
    pending: Vec<Padded<AtomicBool>>,
    taken: Vec<Padded<AtomicU64>>,
    sent: AtomicU64,
    handler: Mutex<Option<Handler>>,
    /// Occupancy and interrupt points ([`interrupts`]); each thread's interrupt flag
    /// is its own.
    irq: Interrupts,
    /// Per CPU: turns of spin loops ([`TlbFlush::relax`]).
    relaxes: Vec<Padded<AtomicU64>>,
}

impl core::fmt::Debug for Cpus {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Cpus")
            .field("online", &self.online)
            .field("sent", &self.sent)
            .finish_non_exhaustive()
    }
}

impl Cpus {
    pub(super) fn new(count: usize) -> Self {
        Self {
            online: AtomicU64::new(CpuSet::first(count).bits()),
            pending: per_cpu(count, || AtomicBool::new(false)),
            taken: per_cpu(count, || AtomicU64::new(0)),
            sent: AtomicU64::new(0),
            handler: Mutex::new(None),
            irq: Interrupts::new(count),
            relaxes: per_cpu(count, || AtomicU64::new(0)),
        }
    }

    /// The CPU the calling thread runs as, if this machine has it.
    #[inline]
    fn current(&self) -> Option<usize> {
        let cpu = CURRENT.with(Cell::get);
        (cpu < self.pending.len()).then_some(cpu)
    }
}

#[cold]
#[inline(never)]
fn not_a_cpu(cpu: usize) -> ! {
    panic!("this thread runs as CPU {cpu}, which the machine does not have");
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl SimMachine {
    /// How many CPUs the machine has.
    pub fn cpu_count(&self) -> usize {
        self.tlbs.len()
    }

    /// A handle on CPU `index`.
    ///
    /// # Panics
    ///
    /// If the machine has no such CPU.
    pub fn cpu(&self, index: usize) -> SimCpu<'_> {
        assert!(
            index < self.cpu_count(),
            "the machine has {} CPUs",
            self.cpu_count()
        );
        SimCpu {
            machine: self,
            index,
        }
    }

    /// The CPU the calling thread runs as.
    ///
    /// # Panics
    ///
    /// If the thread entered a CPU this machine does not have.
    #[inline]
    pub fn current_cpu(&self) -> usize {
        let cpu = CURRENT.with(Cell::get);
        if cpu >= self.cpu_count() {
            not_a_cpu(cpu);
        }
        cpu
    }

    /// Installs the handler every CPU runs when it takes a shootdown IPI (typically
    /// `move || shootdown.handle_ipi()`).
    pub fn set_ipi_handler(&self, handler: impl Fn() + Send + Sync + 'static) {
        // The old handler is dropped once the lock is let go: its captures are the
        // test's, and their drop may call in again.
        let old = self.lock_handler().replace(Arc::new(handler));
        drop(old);
    }

    /// IPIs sent so far, one per target.
    pub fn ipis_sent(&self) -> u64 {
        self.cpus.sent.load(Ordering::Relaxed)
    }

    /// Runs the calling thread's CPU's pending IPI, if any: what a CPU does between
    /// two instructions with interrupts enabled.
    #[inline]
    pub(super) fn take_interrupts(&self) {
        let cpu = self.current_cpu();
        self.cpus.point();
        // A plain read first: spinning CPUs poll here, and a swap would take the line
        // from the CPUs that send to this one.
        if self.cpus.pending[cpu].load(Ordering::Relaxed) {
            self.take_pending(cpu);
        }
    }

    /// Runs CPU `cpu`'s pending IPI, if interrupts are on.
    #[cold]
    fn take_pending(&self, cpu: usize) {
        if INTERRUPTS_OFF.get() || !self.cpus.pending[cpu].swap(false, Ordering::AcqRel) {
            return;
        }
        self.cpus.taken[cpu].fetch_add(1, Ordering::Relaxed);
        let handler = self.lock_handler().clone();
        if let Some(handler) = handler {
            self.cpus.as_interrupt(cpu, || handler());
        }
    }

    fn lock_handler(&self) -> std::sync::MutexGuard<'_, Option<Handler>> {
        self.cpus
            .handler
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Flushes the calling thread's CPU's TLB and paging-structure cache for
    /// `start_vpn..end_vpn`, counting the flush with `count`.
    fn flush_current(&self, start_vpn: u64, end_vpn: u64, count: impl FnOnce(&mut TlbStats)) {
        self.cpus.point();
        self.cpus.flushing();
        let mut tlb = self.lock_tlb();
        count(&mut tlb.stats);
        if start_vpn < end_vpn {
            tlb.invalidate(start_vpn, end_vpn);
            self.flush_host(start_vpn, end_vpn);
        }
    }
}

impl TlbFlush for SimMachine {
    /// `invlpg` on the calling thread's CPU: drops the page's translation (the whole
    /// mapping if it is huge) and the paging-structure cache.
    fn flush_page(&self, page: Page<Size4KiB>) {
        let vpn = page.start_address().as_u64() >> 12;
        self.flush_current(vpn, vpn + 1, |stats| stats.page_flushes += 1);
    }

    /// Drops every translation overlapping `range`, on the calling thread's CPU;
    /// counts as one range flush.
    fn flush_range(&self, range: PageRange<Size4KiB>) {
        let start = range.start.start_address().as_u64() >> 12;
        let end = range.end.start_address().as_u64() >> 12;
        self.flush_current(start, end, |stats| stats.range_flushes += 1);
    }

    /// A CR3 reload with global pages flushed too, on the calling thread's CPU:
    /// empties its TLB.
    fn flush_all(&self) {
        self.cpus.point();
        self.cpus.flushing();
        let mut tlb = self.lock_tlb();
        tlb.stats.full_flushes += 1;
        tlb.clear();
        self.flush_host_all();
    }

    /// A spinning CPU takes its interrupts and pauses, as `pause` does; every 64th
    /// turn its host thread lets the others run (there may be more simulated CPUs
    /// than host cores). Yielding at every turn would make every turn of every wait a
    /// system call.
    fn relax(&self) {
        let mut turns = 0;
        if let Some(cpu) = self.cpus.current() {
            turns = self.cpus.relaxes[cpu].fetch_add(1, Ordering::Relaxed);
        }
        self.take_interrupts();
        if turns % 64 == 63 {
            std::thread::yield_now();
        } else {
            core::hint::spin_loop();
        }
    }

    /// The calling thread's CPU picks its per-CPU caches.
    fn cpus(&self) -> Option<&dyn KernelCpus> {
        Some(self)
    }
}

// SAFETY: `current` is the thread's CPU, below the machine's count (checked), and a
// thread changes it only by entering another CPU, which the tests do between calls;
// `online` starts as every CPU, and `SimCpu::go_offline` flushes the CPU's TLB before
// taking it out; `send_ipi` marks each target, which runs the installed handler at its
// next access or poll.
unsafe impl KernelCpus for SimMachine {
    #[inline]
    fn current(&self) -> usize {
        self.cpus.point();
        self.current_cpu()
    }

    fn online(&self) -> CpuSet {
        CpuSet::from_bits(self.cpus.online.load(Ordering::Acquire))
    }

    fn send_ipi(&self, targets: CpuSet) {
        for cpu in targets.iter().filter(|&cpu| cpu < self.cpu_count()) {
            self.cpus.pending[cpu].store(true, Ordering::Release);
            self.cpus.sent.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The calling thread's CPU's interrupt flag goes off (see the [module
    /// docs](SimCpu#interrupts-on-and-off)).
    #[inline]
    fn irq_save(&self) -> IrqState {
        // Every lock of the heap and the manager comes here first: before the heap
        // hands out memory, see "The SIGSEGV handler" in the crate documentation.
        #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
        super::host::watch();
        IrqState::new(self.cpus.save())
    }

    /// The flag comes back on if it was; a pending IPI or an armed interrupt that
    /// waited is taken now.
    #[inline]
    fn irq_restore(&self, state: IrqState) {
        if self.cpus.restore(state.bits()) && state.bits() == WERE_ON {
            self.take_interrupts();
        }
    }
}

impl SimMachine {
    /// Runs `work(cpu)` on one host thread per CPU, each entered as its CPU. Each
    /// thread takes its CPU offline when `work` returns or panics (flushing its TLB),
    /// so shootdowns stop waiting for it and a failed check fails the test instead
    /// of leaving the others waiting. Afterwards CPU 0 is back online, for the caller.
    pub fn on_every_cpu<'m>(&'m self, work: impl Fn(SimCpu<'m>) + Sync) {
        std::thread::scope(|scope| {
            for index in 0..self.cpu_count() {
                let work = &work;
                scope.spawn(move || {
                    let cpu = self.cpu(index);
                    cpu.enter();
                    let _offline = cpu.offline_when_dropped();
                    work(cpu);
                });
            }
        });
        self.cpu(0).go_online();
    }
}

impl SimMachine {
    /// The stale-translation probe: CPU `reader` reads 8 bytes at `addr` (so its TLB
    /// caches the translation), then the calling thread runs `change`; then the
    /// reader takes its pending IPIs and reads `addr` again. Returns what that second
    /// read saw (`None`: it faulted) and what `change` returned. The reader's CPU goes
    /// offline when it is done, and is released even if `change` panics.
    ///
    /// # Panics
    ///
    /// If the machine has no CPU `reader`, the first read faults, or `change`
    /// panics.
    pub fn read_again_after<R>(
        &self,
        reader: usize,
        addr: VirtAddr,
        change: impl FnOnce() -> R,
    ) -> (Option<[u8; 8]>, R) {
        /// Lets the reader go when dropped.
        struct Release<'a>(&'a AtomicBool);
        impl Drop for Release<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Release);
            }
        }
        let cached = std::sync::Barrier::new(2);
        let changed = AtomicBool::new(false);
        std::thread::scope(|scope| {
            let cpu = self.cpu(reader);
            let (cached, changed) = (&cached, &changed);
            let read = scope.spawn(move || {
                cpu.enter();
                let _offline = cpu.offline_when_dropped();
                let mut first = [0; 8];
                let touched = cpu.read(addr, &mut first);
                cached.wait();
                touched.expect("the first read maps");
                // Interrupts are taken between instructions: poll until the change
                // is done.
                while !changed.load(Ordering::Acquire) {
                    cpu.poll();
                    std::hint::spin_loop();
                }
                let mut again = [0; 8];
                cpu.read(addr, &mut again).ok().map(|()| again)
            });
            cached.wait();
            let release = Release(changed);
            let result = change();
            drop(release);
            let seen = read.join().expect("the reader does not panic");
            (seen, result)
        })
    }
}

/// Takes its CPU offline when dropped, also during a panic; see
/// [`SimCpu::offline_when_dropped`].
#[derive(Debug)]
pub struct OfflineWhenDropped<'m>(SimCpu<'m>);

impl Drop for OfflineWhenDropped<'_> {
    fn drop(&mut self) {
        self.0.go_offline();
    }
}

/// One CPU of a [`SimMachine`]: its own view of memory through its own TLB.
///
/// # Interrupts on and off
///
/// Each thread has an interrupt flag (RFLAGS.IF), on at first.
/// [`KernelCpus::irq_save`] turns it off and [`KernelCpus::irq_restore`] back on, as
/// `cli` and `sti` do; a handler runs with it off. While it is off, interrupts wait:
/// an IPI stays pending, and is taken when `irq_restore` turns the flag on again.
///
/// Several threads may run as one CPU, as tasks share a CPU; but only one at a time
/// runs on it with interrupts off: a thread that turns them off waits until no other
/// thread is inside such a section on its CPU, as a task waits to be scheduled. So
/// the per-CPU state the library touches with interrupts off is one thread's at a
/// time, as [`KernelCpus`]'s contract promises, however many threads a test runs
/// as CPU 0. A CPU that one thread keeps taking is biased to it, so its `cli` costs
/// no locked instruction, until another thread wants it (see the `interrupts`
/// module's source).
///
/// The flag is the thread's, not a machine's, as a thread runs as one CPU index on
/// every machine: a thread with interrupts off through one machine's `irq_save`
/// has them off for all. When it calls `irq_save` on another machine then (one
/// machine's kernel heap as the global allocator, called while the thread holds
/// another's lock), it waits for its CPU there as well and holds it until the
/// matching `irq_restore`, so each machine's per-CPU state stays one thread's at a
/// time. Two threads that nest two machines in opposite orders wait for each other
/// for good, as two locks taken in opposite orders do.
///
/// # Interrupt points
///
/// A test can interrupt a CPU at a point of its choosing inside a library call
/// ([`SimCpu::interrupt_after`]). The points are the calls the library makes into
/// the machine on that CPU: [`KernelCpus::current`], `irq_save` (before the flag goes off)
/// and `irq_restore` (after it comes on), each [`TlbFlush`] method, frame allocation
/// and freeing through [`SimFrames`](crate::SimFrames), and each memory access
/// through the MMU. [`SimCpu::count_points`] says how many points a call passes, so
/// a test can interrupt it at each one in turn. An interrupt due while the flag is
/// off is taken when it comes on, as on hardware.
#[derive(Debug, Clone, Copy)]
pub struct SimCpu<'m> {
    machine: &'m SimMachine,
    index: usize,
}

impl<'m> SimCpu<'m> {
    /// The CPU's index.
    pub fn index(&self) -> usize {
        self.index
    }

    /// The machine.
    pub fn machine(&self) -> &'m SimMachine {
        self.machine
    }

    /// Makes the calling thread run as this CPU from now on (on every machine).
    ///
    /// A thread that entered a CPU index another machine does not have panics at
    /// that machine's every call that runs as its CPU (memory accesses through the
    /// MMU, `translate`, flushes, the [`KernelCpus`] hooks), as
    /// [`SimMachine::current_cpu`] says.
    ///
    /// A thread that enters a CPU with its interrupts off (inside `irq_save`) keeps
    /// the CPU it turned them off on, and holds this one too at each call in (as
    /// threads calling into a second machine do): threads still run one at a time
    /// with interrupts off on each CPU, and its `irq_restore` lets go of the CPU
    /// `irq_save` took.
    pub fn enter(&self) {
        CURRENT.with(|cpu| cpu.set(self.index));
    }

    /// Runs `f` on the calling thread as this CPU, then switches back.
    pub fn run<R>(&self, f: impl FnOnce(&SimMachine) -> R) -> R {
        /// Puts the thread's CPU back when dropped: after `f`, or while it unwinds
        /// (a failed check inside `f` must not leave the thread on this CPU).
        struct Back(usize);
        impl Drop for Back {
            fn drop(&mut self) {
                CURRENT.with(|cpu| cpu.set(self.0));
            }
        }
        let _back = Back(CURRENT.with(|cpu| cpu.replace(self.index)));
        f(self.machine)
    }

    /// Takes a pending IPI, if any (as the CPU does with interrupts enabled).
    pub fn poll(&self) {
        self.run(SimMachine::take_interrupts);
    }

    /// [`SimMachine::translate`] on this CPU.
    ///
    /// # Errors
    ///
    /// As there.
    pub fn translate(&self, addr: VirtAddr, access: Access) -> Result<Translation, Fault> {
        self.run(|machine| machine.translate(addr, access))
    }

    /// [`SimMachine::read`] on this CPU.
    ///
    /// # Errors
    ///
    /// As there.
    pub fn read(&self, addr: VirtAddr, buf: &mut [u8]) -> Result<(), Fault> {
        self.run(|machine| machine.read(addr, buf))
    }

    /// [`SimMachine::write`] on this CPU.
    ///
    /// # Errors
    ///
    /// As there.
    ///
    /// # Safety
    ///
    /// As there.
    pub unsafe fn write(&self, addr: VirtAddr, data: &[u8]) -> Result<(), Fault> {
        // SAFETY: forwarded from the caller.
        self.run(|machine| unsafe { machine.write(addr, data) })
    }

    /// This CPU's TLB counters.
    pub fn tlb_stats(&self) -> TlbStats {
        self.run(SimMachine::tlb_stats)
    }

    /// IPIs this CPU has taken.
    pub fn ipis_taken(&self) -> u64 {
        self.machine.cpus.taken[self.index].load(Ordering::Relaxed)
    }

    /// Turns of spin loops this CPU has made ([`TlbFlush::relax`] calls): a waiter
    /// that made two since a moment has read what it waits for after it.
    pub fn relaxes(&self) -> u64 {
        self.machine.cpus.relaxes[self.index].load(Ordering::Relaxed)
    }

    /// Whether an IPI waits for this CPU.
    pub fn ipi_pending(&self) -> bool {
        self.machine.cpus.pending[self.index].load(Ordering::Acquire)
    }

    /// What this CPU's TLB holds for `addr`'s page, without walking the tables or
    /// counting a lookup.
    pub fn cached(&self, addr: VirtAddr) -> Option<Translation> {
        self.machine
            .lock_tlb_of(self.index)
            .lookup(addr.as_u64() >> 12)
            .map(|cached| Translation {
                offset: addr.as_u64() & (cached.page_size - 1),
                ..cached
            })
    }

    /// Whether this CPU is online.
    pub fn is_online(&self) -> bool {
        KernelCpus::online(self.machine).contains(self.index)
    }

    /// A guard that takes this CPU offline when dropped, also when the thread
    /// running it panics.
    pub fn offline_when_dropped(self) -> OfflineWhenDropped<'m> {
        OfflineWhenDropped(self)
    }

    /// Takes the CPU offline, as hot-unplug does: it flushes its own TLB and leaves
    /// the online set, so shootdowns no longer wait for it.
    pub fn go_offline(&self) {
        self.run(TlbFlush::flush_all);
        self.machine
            .cpus
            .online
            .fetch_and(!(1 << self.index), Ordering::AcqRel);
    }

    /// Brings the CPU back online, as a CPU that boots: it joins the online set
    /// (sequentially consistent, [`KernelCpus`]'s contract), then flushes its own
    /// TLB, whatever it cached while offline (a thread may still run as an offline
    /// CPU) included.
    pub fn go_online(&self) {
        self.machine
            .cpus
            .online
            .fetch_or(1 << self.index, Ordering::SeqCst);
        self.run(TlbFlush::flush_all);
    }
}

impl TlbFlush for SimCpu<'_> {
    fn flush_page(&self, page: Page<Size4KiB>) {
        self.run(|machine| machine.flush_page(page));
    }

    fn flush_range(&self, range: PageRange<Size4KiB>) {
        self.run(|machine| machine.flush_range(range));
    }

    fn flush_all(&self) {
        self.run(TlbFlush::flush_all);
    }

    fn relax(&self) {
        self.run(TlbFlush::relax);
    }
}
