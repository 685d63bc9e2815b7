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
//! [`SimCpu`].

use super::tlb::TlbStats;
use super::{Access, Fault, SimMachine, Translation};
use std::boxed::Box;
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
    /// Whether the calling thread runs with interrupts off (its RFLAGS.IF clear).
    static INTERRUPTS_OFF: Cell<bool> = const { Cell::new(false) };
    /// The calling thread's token, for the CPU it occupies.
    static TOKEN: u64 = NEXT_TOKEN.fetch_add(1, Ordering::Relaxed);
}

/// Tokens of threads, from 1 (0 is no thread).
static NEXT_TOKEN: AtomicU64 = AtomicU64::new(1);

/// A handler for the shootdown IPI.
type Handler = Arc<dyn Fn() + Send + Sync>;

/// Code a test runs on a CPU at a moment of its choosing.
type Hook = Box<dyn FnOnce() + Send>;

/// An interrupt a test armed on one CPU: it runs at the `after`-th interrupt point
/// from now (0: the next one).
struct Armed {
    after: u64,
    handler: Hook,
}

/// The interrupt state of a machine's CPUs.
pub(super) struct Cpus {
    online: AtomicU64,
    pending: Vec<AtomicBool>,
    taken: Vec<AtomicU64>,
    sent: AtomicU64,
    handler: Mutex<Option<Handler>>,
    /// Per CPU: the token of the thread running on it with interrupts off, or 0.
    occupant: Vec<AtomicU64>,
    /// Per CPU: the interrupt a test armed.
    armed: Vec<Mutex<Option<Armed>>>,
    /// Per CPU: interrupt points passed while counting.
    points: Vec<AtomicU64>,
    /// Per CPU: whether its points are counted.
    counting: Vec<AtomicBool>,
    /// Per CPU: what runs inside its next TLB flush.
    in_flush: Vec<Mutex<Option<Hook>>>,
    /// Per CPU: turns of spin loops ([`TlbFlush::relax`]).
    relaxes: Vec<AtomicU64>,
    /// Whether any CPU has an interrupt or a flush hook armed, or counts its points:
    /// the one read an interrupt point or a flush makes otherwise.
    watched: AtomicU64,
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
            pending: (0..count).map(|_| AtomicBool::new(false)).collect(),
            taken: (0..count).map(|_| AtomicU64::new(0)).collect(),
            sent: AtomicU64::new(0),
            handler: Mutex::new(None),
            occupant: (0..count).map(|_| AtomicU64::new(0)).collect(),
            armed: (0..count).map(|_| Mutex::new(None)).collect(),
            points: (0..count).map(|_| AtomicU64::new(0)).collect(),
            counting: (0..count).map(|_| AtomicBool::new(false)).collect(),
            in_flush: (0..count).map(|_| Mutex::new(None)).collect(),
            relaxes: (0..count).map(|_| AtomicU64::new(0)).collect(),
            watched: AtomicU64::new(0),
        }
    }

    /// Runs the hook armed for the calling thread's CPU's next flush, if any.
    fn flushing(&self) {
        if self.watched.load(Ordering::Relaxed) == 0 {
            return;
        }
        let Some(cpu) = self.current() else {
            return;
        };
        let hook = lock(&self.in_flush[cpu]).take();
        if let Some(hook) = hook {
            self.watched.fetch_sub(1, Ordering::Relaxed);
            hook();
        }
    }

    /// The CPU the calling thread runs as, if this machine has it.
    fn current(&self) -> Option<usize> {
        let cpu = CURRENT.with(Cell::get);
        (cpu < self.occupant.len()).then_some(cpu)
    }

    /// An interrupt point of the calling thread's CPU (see the [module
    /// docs](SimCpu#interrupt-points)): counts it, and takes the armed interrupt when
    /// it is due and interrupts are on.
    pub(super) fn point(&self) {
        if self.watched.load(Ordering::Relaxed) == 0 {
            return;
        }
        let Some(cpu) = self.current() else {
            return;
        };
        if self.counting[cpu].load(Ordering::Relaxed) {
            self.points[cpu].fetch_add(1, Ordering::Relaxed);
        }
        self.take_armed(cpu, true);
    }

    /// Runs CPU `cpu`'s armed interrupt if it is due (counting this point down when
    /// `tick`) and interrupts are on.
    fn take_armed(&self, cpu: usize, tick: bool) {
        let due = {
            let mut armed = lock(&self.armed[cpu]);
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
            self.watched.fetch_sub(1, Ordering::Relaxed);
            self.as_interrupt(cpu, interrupt.handler);
        }
    }

    /// Runs `handler` as an interrupt on `cpu` (the calling thread's interrupts are
    /// on): with them off, on the CPU alone.
    fn as_interrupt(&self, cpu: usize, handler: impl FnOnce()) {
        self.interrupts_off(cpu);
        handler();
        self.interrupts_on(cpu);
    }

    /// The calling thread's interrupts go off on `cpu`: it waits until no other
    /// thread runs there with interrupts off, as a task waits to be scheduled.
    fn interrupts_off(&self, cpu: usize) {
        let token = TOKEN.with(|token| *token);
        let occupant = &self.occupant[cpu];
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
        self.occupant[cpu].store(0, Ordering::Release);
    }

    /// `cli`, saying whether interrupts were on.
    fn save(&self) -> bool {
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

    /// `sti` if `on`; interrupts that waited are taken now.
    fn restore(&self, on: bool) -> Option<usize> {
        let cpu = self.current()?;
        if on && INTERRUPTS_OFF.get() {
            self.interrupts_on(cpu);
            self.take_armed(cpu, false);
            self.point();
        }
        Some(cpu)
    }
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
    pub fn current_cpu(&self) -> usize {
        let cpu = CURRENT.with(Cell::get);
        assert!(
            cpu < self.cpu_count(),
            "this thread runs as CPU {cpu}, which the machine does not have"
        );
        cpu
    }

    /// Installs the handler every CPU runs when it takes a shootdown IPI (typically
    /// `move || shootdown.handle_ipi()`).
    pub fn set_ipi_handler(&self, handler: impl Fn() + Send + Sync + 'static) {
        *self.lock_handler() = Some(Arc::new(handler));
    }

    /// IPIs sent so far, one per target.
    pub fn ipis_sent(&self) -> u64 {
        self.cpus.sent.load(Ordering::Relaxed)
    }

    /// Runs the calling thread's CPU's pending IPI, if any: what a CPU does between
    /// two instructions with interrupts enabled.
    pub(super) fn take_interrupts(&self) {
        let cpu = self.current_cpu();
        self.cpus.point();
        // A plain read first: spinning CPUs poll here, and a swap would write the
        // line every CPU's flag shares.
        let pending = &self.cpus.pending[cpu];
        if !pending.load(Ordering::Relaxed)
            || INTERRUPTS_OFF.get()
            || !pending.swap(false, Ordering::AcqRel)
        {
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

    /// A spinning CPU takes its interrupts, and its host thread lets the others run
    /// (there may be more simulated CPUs than host cores).
    fn relax(&self) {
        if let Some(cpu) = self.cpus.current() {
            self.cpus.relaxes[cpu].fetch_add(1, Ordering::Relaxed);
        }
        self.take_interrupts();
        std::thread::yield_now();
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
    fn irq_save(&self) -> IrqState {
        IrqState::new(u64::from(self.cpus.save()))
    }

    /// The flag comes back on if it was; a pending IPI or an armed interrupt that
    /// waited is taken now.
    fn irq_restore(&self, state: IrqState) {
        let on = state.bits() & 1 != 0;
        if self.cpus.restore(on).is_some() && on {
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
    /// If the first read faults, or `change` panics.
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
/// as CPU 0.
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
    pub fn enter(&self) {
        CURRENT.with(|cpu| cpu.set(self.index));
    }

    /// Runs `f` on the calling thread as this CPU, then switches back.
    pub fn run<R>(&self, f: impl FnOnce(&SimMachine) -> R) -> R {
        let before = CURRENT.with(|cpu| cpu.replace(self.index));
        let result = f(self.machine);
        CURRENT.with(|cpu| cpu.set(before));
        result
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
    pub fn write(&self, addr: VirtAddr, data: &[u8]) -> Result<(), Fault> {
        self.run(|machine| machine.write(addr, data))
    }

    /// This CPU's TLB counters.
    pub fn tlb_stats(&self) -> TlbStats {
        self.run(SimMachine::tlb_stats)
    }

    /// IPIs this CPU has taken.
    pub fn ipis_taken(&self) -> u64 {
        self.machine.cpus.taken[self.index].load(Ordering::Relaxed)
    }

    /// Arms an interrupt: `handler` runs on the calling thread as an interrupt of
    /// this CPU at the `after`-th [interrupt point](SimCpu#interrupt-points) this CPU
    /// passes from now (0: the next one), or, if interrupts are off then, as soon as
    /// they are on again. Replaces an interrupt armed before and not yet taken.
    pub fn interrupt_after(&self, after: u64, handler: impl FnOnce() + Send + 'static) {
        let cpus = &self.machine.cpus;
        let old = lock(&cpus.armed[self.index]).replace(Armed {
            after,
            handler: Box::new(handler),
        });
        if old.is_none() {
            cpus.watched.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Whether an interrupt armed with [`interrupt_after`](Self::interrupt_after)
    /// has not run yet.
    pub fn interrupt_armed(&self) -> bool {
        lock(&self.machine.cpus.armed[self.index]).is_some()
    }

    /// Drops the armed interrupt, if it has not run; says whether there was one.
    pub fn disarm(&self) -> bool {
        let cpus = &self.machine.cpus;
        let dropped = lock(&cpus.armed[self.index]).take().is_some();
        if dropped {
            cpus.watched.fetch_sub(1, Ordering::Relaxed);
        }
        dropped
    }

    /// Runs `f` on the calling thread as this CPU and counts the [interrupt
    /// points](SimCpu#interrupt-points) it passes on this CPU.
    pub fn count_points<R>(&self, f: impl FnOnce() -> R) -> (R, u64) {
        let cpus = &self.machine.cpus;
        let before = cpus.points[self.index].load(Ordering::Relaxed);
        cpus.counting[self.index].store(true, Ordering::Relaxed);
        cpus.watched.fetch_add(1, Ordering::Relaxed);
        let result = self.run(|_| f());
        cpus.watched.fetch_sub(1, Ordering::Relaxed);
        cpus.counting[self.index].store(false, Ordering::Relaxed);
        (
            result,
            cpus.points[self.index].load(Ordering::Relaxed) - before,
        )
    }

    /// Runs `hook` on the calling thread in the middle of this CPU's next TLB flush
    /// (before it drops anything), whether interrupts are on or off: what an NMI,
    /// or an IPI landing in a flush that runs with interrupts on, would do there.
    pub fn in_next_flush(&self, hook: impl FnOnce() + Send + 'static) {
        let cpus = &self.machine.cpus;
        let old = lock(&cpus.in_flush[self.index]).replace(Box::new(hook));
        if old.is_none() {
            cpus.watched.fetch_add(1, Ordering::Relaxed);
        }
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

    /// Whether the calling thread's interrupts are on (the thread running as this CPU).
    pub fn interrupts_enabled(&self) -> bool {
        !INTERRUPTS_OFF.get()
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

    /// Brings the CPU back online (with an empty TLB: it was flushed going offline).
    pub fn go_online(&self) {
        self.machine
            .cpus
            .online
            .fetch_or(1 << self.index, Ordering::SeqCst);
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
