//! [`Shootdown`]: the protocol the [module documentation](super#the-protocol)
//! describes, over per-CPU mailboxes.

use super::{Cpus, MAX_CPUS};
use crate::TlbFlush;
use crate::percpu::{Init, PerCpu};
use crate::sync::{IrqOff, wait_for};
use crate::tlb::{FlushBatch, FlushTicket};
use core::sync::atomic::{AtomicU64, Ordering, fence};
use x86_64::VirtAddr;
use x86_64::structures::paging::page::PageRange;
use x86_64::structures::paging::{Page, Size4KiB};

/// Ranges a mailbox holds before it falls back to one full flush.
const QUEUED_RANGES: usize = 16;
/// Work items a mailbox holds; an initiator waits for room past them.
const QUEUED_WORK: usize = 4;

/// One flush to run on a CPU.
#[derive(Debug, Clone, Copy)]
enum Flush {
    Page(Page<Size4KiB>),
    Range(PageRange<Size4KiB>),
    All,
}

/// A queued page or range, as addresses (so a queue can be built in a `const`):
/// `end == 0` for a single page.
#[derive(Debug, Clone, Copy)]
struct Queued {
    start: u64,
    end: u64,
}

/// Work an initiator asked a CPU to run: the initiator keeps the closure alive until
/// that CPU published the request done, or takes it back out of the queue. The call's
/// number tells it apart from the same closure queued by another call.
#[derive(Clone, Copy)]
struct Work {
    run: *const (dyn Fn() + Sync),
    call: u64,
}

// SAFETY: the closure is `Sync`, and lives until the CPU that runs it publishes that
// it did (the initiator waits for that, or removes it from the queue first).
unsafe impl Send for Work {}

/// Flushes and work queued for one CPU.
#[derive(Clone, Copy)]
struct Queue {
    items: [Queued; QUEUED_RANGES],
    len: usize,
    all: bool,
    work: [Option<Work>; QUEUED_WORK],
}

impl Queue {
    const fn new() -> Self {
        Self {
            items: [Queued { start: 0, end: 0 }; QUEUED_RANGES],
            len: 0,
            all: false,
            work: [None; QUEUED_WORK],
        }
    }

    fn push(&mut self, flush: Flush) {
        let item = match flush {
            Flush::Page(page) => Queued {
                start: page.start_address().as_u64(),
                end: 0,
            },
            Flush::Range(range) => Queued {
                start: range.start.start_address().as_u64(),
                end: range.end.start_address().as_u64(),
            },
            Flush::All => {
                self.all = true;
                return;
            }
        };
        if self.len < QUEUED_RANGES {
            self.items[self.len] = item;
            self.len += 1;
        } else {
            self.all = true;
        }
    }

    /// Queues `work`; `false` when the queue has no room for it.
    fn push_work(&mut self, work: Work) -> bool {
        match self.work.iter_mut().find(|slot| slot.is_none()) {
            Some(slot) => {
                *slot = Some(work);
                true
            }
            None => false,
        }
    }

    /// Takes `work` back out, if it is still queued; whether it was.
    fn remove_work(&mut self, work: Work) -> bool {
        let mut found = false;
        for slot in &mut self.work {
            if slot.is_some_and(|queued| queued.call == work.call) {
                *slot = None;
                found = true;
            }
        }
        found
    }

    fn run(&self, tlb: &impl TlbFlush) {
        if self.all {
            tlb.flush_all();
        } else {
            let page = |addr| Page::containing_address(VirtAddr::new_truncate(addr));
            for item in &self.items[..self.len] {
                if item.end == 0 {
                    tlb.flush_page(page(item.start));
                } else {
                    tlb.flush_range(Page::range(page(item.start), page(item.end)));
                }
            }
        }
        for work in self.work.iter().flatten() {
            // SAFETY: the initiator keeps the closure alive until this CPU publishes
            // the request done, which comes after this call.
            unsafe { (*work.run)() };
        }
    }
}

/// One CPU's mailbox: what any CPU may touch. Serving it is its own CPU's, one serve
/// at a time (the [`PerCpu`] slot's hold).
struct Mailbox {
    queue: spin::Mutex<Queue>,
    /// Requests pushed so far (bumped under the queue's lock).
    requested: AtomicU64,
    /// The request count up to which this CPU has served.
    done: AtomicU64,
}

impl Init for Mailbox {
    const INIT: Self = Mailbox {
        queue: spin::Mutex::new(Queue::new()),
        requested: AtomicU64::new(0),
        done: AtomicU64::new(0),
    };
}

/// Counters of a [`Shootdown`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShootdownStats {
    /// Global flushes started (each is one local flush plus the remote ones).
    pub shootdowns: u64,
    /// IPIs sent: one per target CPU per shootdown or call, and each one more a
    /// call sends a CPU whose queue was full, or that it saw go offline and finds
    /// back online.
    pub ipis: u64,
    /// Mailboxes served on behalf of other CPUs' shootdowns and calls.
    pub served: u64,
    /// Calls of work on other CPUs ([`TlbFlush::call_on_other_cpus`]).
    pub calls: u64,
}

/// A [`TlbFlush`] that flushes every online CPU, and runs work on them; see the
/// [module documentation](super).
///
/// `local` flushes the calling CPU's TLB (an [`InvlpgFlush`](crate::tlb::InvlpgFlush)
/// on hardware); its [ceiling](TlbFlush::ceiling) is the shootdown's.
pub struct Shootdown<C: Cpus, L: TlbFlush> {
    cpus: C,
    local: L,
    mailboxes: PerCpu<Mailbox>,
    shootdowns: AtomicU64,
    ipis: AtomicU64,
    served: AtomicU64,
    calls: AtomicU64,
}

impl<C: Cpus, L: TlbFlush> Shootdown<C, L> {
    /// A shootdown over the kernel's `cpus`, flushing each CPU with `local`.
    pub const fn new(cpus: C, local: L) -> Self {
        Self {
            cpus,
            local,
            mailboxes: PerCpu::new(),
            shootdowns: AtomicU64::new(0),
            ipis: AtomicU64::new(0),
            served: AtomicU64::new(0),
            calls: AtomicU64::new(0),
        }
    }

    /// The kernel's CPUs.
    pub fn cpus(&self) -> &C {
        &self.cpus
    }

    /// Runs the flushes and work other CPUs queued for the calling CPU. Call it from
    /// the shootdown IPI's handler, or to poll.
    pub fn handle_ipi(&self) {
        self.serve();
    }

    /// Counters since the shootdown was made.
    pub fn stats(&self) -> ShootdownStats {
        ShootdownStats {
            shootdowns: self.shootdowns.load(Ordering::Relaxed),
            ipis: self.ipis.load(Ordering::Relaxed),
            served: self.served.load(Ordering::Relaxed),
            calls: self.calls.load(Ordering::Relaxed),
        }
    }

    /// Serves the calling CPU's mailbox (see the [module docs](super#the-protocol)):
    /// runs what is queued and publishes the requests it covered, until nothing is
    /// left or a pusher holds the queue (it sends an IPI after it unlocks).
    fn serve(&self) {
        let irq = IrqOff::new(self);
        // A serve that landed inside another on this CPU (an NMI, or a kernel whose
        // hook holds nothing off) leaves the queue to the one it interrupted, which
        // looks again before it returns: publishing here could tell an initiator its
        // request was served while the outer serve still holds it unserved.
        let Some(held) = self.mailboxes.this_cpu(&self.cpus, &irq) else {
            return;
        };
        let mailbox = held.shared();
        while let Some(mut queue) = mailbox.queue.try_lock() {
            let requested = mailbox.requested.load(Ordering::Acquire);
            if mailbox.done.load(Ordering::Relaxed) >= requested {
                break;
            }
            let taken = core::mem::replace(&mut *queue, Queue::new());
            drop(queue);
            taken.run(&self.local);
            self.served.fetch_add(1, Ordering::Relaxed);
            mailbox.done.store(requested, Ordering::Release);
        }
    }

    /// Waits until every CPU of `targets` served its request `tickets[cpu]`, or left
    /// the online set, serving this CPU's own mailbox meanwhile. Returns the CPUs
    /// that left without serving it.
    fn wait_for_targets(&self, targets: super::CpuSet, tickets: &[u32; MAX_CPUS]) -> super::CpuSet {
        let mut left = super::CpuSet::empty();
        for cpu in targets.iter() {
            let Some(mailbox) = self.mailboxes.get(cpu) else {
                continue;
            };
            while !served(mailbox.done.load(Ordering::Acquire), tickets[cpu]) {
                // A number this mailbox never gave out: another shootdown's ticket,
                // which nothing here will serve (and no flush of this one waits).
                if !served(mailbox.requested.load(Ordering::Acquire), tickets[cpu]) {
                    break;
                }
                if !self.cpus.online().contains(cpu) {
                    left = left.with(cpu);
                    break;
                }
                self.serve();
                self.local.relax();
            }
        }
        left
    }

    /// The online CPUs but the caller, read after the caller's page-table stores: a
    /// CPU joining the set (a sequentially consistent update, then a flush of its
    /// own TLB) either is seen here, or walks the tables after the stores.
    fn others(&self, me: usize) -> super::CpuSet {
        fence(Ordering::SeqCst);
        self.cpus.online().without(me)
    }

    /// Flushes `flush` on this CPU and on every other online CPU, and returns once
    /// all have.
    fn shoot(&self, flush: Flush) {
        self.shoot_with(
            |local| match flush {
                Flush::Page(page) => local.flush_page(page),
                Flush::Range(range) => local.flush_range(range),
                Flush::All => local.flush_all(),
            },
            |queue| queue.push(flush),
        );
    }

    /// Flushes on this CPU with `local`, and on every other online CPU what `push`
    /// queues in its mailbox (one request, however many flushes it holds); returns
    /// once all have.
    fn shoot_with(&self, local: impl FnOnce(&L), push: impl Fn(&mut Queue)) {
        // No interrupt handler on this CPU may start a shootdown inside this one.
        let _irq = IrqOff::new(self);
        let mut ticket = FlushTicket::DONE;
        self.send(local, push, &mut ticket);
        self.wait(&mut ticket);
    }

    /// Flushes on this CPU with `local` and sends every other online CPU what `push`
    /// queues in its mailbox, recording in `ticket` the request each must serve.
    fn send(&self, local: impl FnOnce(&L), push: impl Fn(&mut Queue), ticket: &mut FlushTicket) {
        let me = self.cpus.current();
        local(&self.local);
        self.shootdowns.fetch_add(1, Ordering::Relaxed);
        let targets = self.others(me);
        if targets.is_empty() {
            return;
        }
        for cpu in targets.iter() {
            let Some(mailbox) = self.mailboxes.get(cpu) else {
                continue;
            };
            let mut queue = wait_for(&mailbox.queue, self);
            push(&mut queue);
            // The low bits of a count: a CPU never runs 2^31 requests behind.
            ticket.requests[cpu] = (mailbox.requested.fetch_add(1, Ordering::AcqRel) + 1) as u32;
            ticket.targets = ticket.targets.with(cpu);
        }
        self.cpus.send_ipi(targets);
        self.ipis.fetch_add(targets.len() as u64, Ordering::Relaxed);
    }

    /// Flushes `batch` on this CPU and sends it to every other online CPU (see
    /// [`send`](Self::send)): ranges past the [ceiling](TlbFlush::ceiling) as one
    /// full flush, and nothing for ranges that are all empty.
    fn send_batch(&self, batch: FlushBatch<'_>, ticket: &mut FlushTicket) {
        let ranges = match batch {
            FlushBatch::Ranges(ranges)
                if ranges
                    .iter()
                    .try_fold(0u64, |pages, range| pages.checked_add(range.len()))
                    .is_some_and(|pages| pages <= self.ceiling()) =>
            {
                ranges
            }
            _ => {
                return self.send(
                    |local| local.flush_all(),
                    |queue| queue.push(Flush::All),
                    ticket,
                );
            }
        };
        let ranges = || ranges.iter().filter(|range| !range.is_empty());
        if ranges().next().is_some() {
            self.send(
                |local| ranges().for_each(|range| local.flush_range(*range)),
                |queue| ranges().for_each(|range| queue.push(Flush::Range(*range))),
                ticket,
            );
        }
    }

    /// Waits until every CPU `ticket` names served its request, or left the online
    /// set (flushing its own TLB as it went), serving this CPU's mailbox meanwhile.
    fn wait(&self, ticket: &mut FlushTicket) {
        if !ticket.is_done() {
            self.wait_for_targets(ticket.targets, &ticket.requests);
        }
        *ticket = FlushTicket::DONE;
    }

    /// An IPI to `cpu` alone, counted.
    fn send_ipi_to(&self, cpu: usize) {
        self.cpus.send_ipi(super::CpuSet::empty().with(cpu));
        self.ipis.fetch_add(1, Ordering::Relaxed);
    }

    /// Runs `work` on every other online CPU, in its shootdown service, and returns
    /// once each has (Linux's `smp_call_function_many` with `wait`).
    fn call(&self, work: &(dyn Fn() + Sync)) {
        let _irq = IrqOff::new(self);
        let me = self.cpus.current();
        let targets = self.others(me);
        if targets.is_empty() {
            return;
        }
        let call = self.calls.fetch_add(1, Ordering::Relaxed);
        // SAFETY: only the lifetime is erased: this call takes the pointer back out
        // of every queue that still holds it before it returns, and waits for every
        // CPU that took it to publish that it ran it.
        let run = unsafe {
            core::mem::transmute::<*const (dyn Fn() + Sync + '_), *const (dyn Fn() + Sync)>(work)
        };
        let work = Work { run, call };
        let mut tickets = [0u32; MAX_CPUS];
        for cpu in targets.iter() {
            let Some(mailbox) = self.mailboxes.get(cpu) else {
                continue;
            };
            loop {
                let mut queue = wait_for(&mailbox.queue, self);
                if queue.push_work(work) {
                    tickets[cpu] = (mailbox.requested.fetch_add(1, Ordering::AcqRel) + 1) as u32;
                    break;
                }
                // No room: the target is slow to serve; let it, and serve meanwhile.
                drop(queue);
                self.send_ipi_to(cpu);
                self.serve();
                self.local.relax();
            }
        }
        self.cpus.send_ipi(targets);
        self.ipis.fetch_add(targets.len() as u64, Ordering::Relaxed);
        // A CPU seen gone without serving: take the work back. One that came back
        // and took its queue after it was seen gone runs the work now, its serve
        // under way (a CPU leaves only between library calls): wait for it.
        let left = self.wait_for_targets(targets, &tickets);
        for cpu in left.iter() {
            let Some(mailbox) = self.mailboxes.get(cpu) else {
                continue;
            };
            let removed = wait_for(&mailbox.queue, self).remove_work(work);
            // Whoever held a queue sends its CPU an IPI after unlocking (a serve
            // that found it held gave up): the CPU may be back and have found it so.
            if self.cpus.online().contains(cpu) {
                self.send_ipi_to(cpu);
            }
            if removed {
                continue;
            }
            while !served(mailbox.done.load(Ordering::Acquire), tickets[cpu]) {
                self.serve();
                self.local.relax();
            }
        }
    }
}

impl<C: Cpus, L: TlbFlush> TlbFlush for Shootdown<C, L> {
    fn flush_page(&self, page: Page<Size4KiB>) {
        self.shoot(Flush::Page(page));
    }

    fn flush_range(&self, range: PageRange<Size4KiB>) {
        if range.is_empty() {
            return;
        }
        if range.len() > self.ceiling() {
            self.shoot(Flush::All);
        } else {
            self.shoot(Flush::Range(range));
        }
    }

    fn flush_ranges(&self, ranges: &[PageRange<Size4KiB>]) {
        let _irq = IrqOff::new(self);
        let mut ticket = FlushTicket::DONE;
        self.send_batch(FlushBatch::Ranges(ranges), &mut ticket);
        self.wait(&mut ticket);
    }

    fn flush_all(&self) {
        self.shoot(Flush::All);
    }

    /// Flushes this CPU and sends the batch to every other online CPU, returning
    /// before they have: [`finish_flush`](TlbFlush::finish_flush) waits for them.
    fn start_flush(&self, batch: FlushBatch<'_>, ticket: &mut FlushTicket) {
        let _irq = IrqOff::new(self);
        self.wait(ticket);
        self.send_batch(batch, ticket);
    }

    fn finish_flush(&self, ticket: &mut FlushTicket) {
        let _irq = IrqOff::new(self);
        self.wait(ticket);
    }

    fn ceiling(&self) -> u64 {
        self.local.ceiling()
    }

    fn relax(&self) {
        self.handle_ipi();
        self.local.relax();
    }

    fn cpus(&self) -> Option<&dyn Cpus> {
        Some(&self.cpus)
    }

    fn call_on_other_cpus(&self, work: &(dyn Fn() + Sync)) -> bool {
        self.call(work);
        true
    }
}

/// Whether a CPU that has served its requests up to `done` has served `request`
/// (the low 32 bits of its number): compared as a wrapping distance, since a CPU
/// never runs 2^31 requests behind.
fn served(done: u64, request: u32) -> bool {
    (done as u32).wrapping_sub(request) as i32 >= 0
}

#[cfg(test)]
mod test {
    use super::served;

    #[test]
    fn a_request_number_is_served_by_its_count_and_later_ones_across_the_wrap() {
        for base in [1u64, 1 << 20, (1 << 32) - 2, (1 << 33) + 5] {
            let request = base as u32;
            assert!(!served(base - 1, request), "{base}");
            assert!(served(base, request), "{base}");
            assert!(served(base + 3, request), "{base}");
            assert!(served(base + (1 << 30), request), "{base}");
        }
    }
}
