//! TLB-flush policy.
//!
//! Changing or removing a present page-table entry leaves the old translation in the
//! TLB until it is flushed. Who flushes, and how, is the kernel's business (one CPU
//! with `invlpg`, or an SMP shootdown), so the library only asks through [`TlbFlush`].
//! Two implementations come with it: [`InvlpgFlush`] for the CPU it runs on, and
//! [`CountingFlush`], which only counts, for tests.
//!
//! # When a range becomes a full flush
//!
//! One number decides: [`TlbFlush::ceiling`], the pages up to which flushing page by
//! page beats flushing everything (Linux's `tlb_single_page_flush_ceiling`, 33 by
//! default). [`TlbFlush::flush_range`] applies it to one range; the vmalloc manager's
//! gather applies it to a batch: each range on its own while their pages together
//! stay within the ceiling, one full flush above it.

use crate::smp::{CpuSet, Cpus, MAX_CPUS, OneCpu};
use core::sync::atomic::{AtomicU64, Ordering};
use x86_64::structures::paging::page::PageRange;
use x86_64::structures::paging::{Page, Size4KiB};

/// Pages up to which a range is flushed page by page rather than all at once:
/// Linux's `tlb_single_page_flush_ceiling`.
pub const SINGLE_PAGE_FLUSH_CEILING: u64 = 33;

/// Drops stale translations from the TLB.
///
/// Methods take `&self`: a TLB is machine state shared by every user of the page
/// tables, and implementations lock or use per-CPU state as they need.
pub trait TlbFlush {
    /// Drops any translation of `page`.
    fn flush_page(&self, page: Page<Size4KiB>);

    /// Drops any translation in `range`. The default flushes page by page up to
    /// [`ceiling`](Self::ceiling) pages and everything above it: ranges can be huge
    /// (a freed page table covers up to 1 GiB), and one `invlpg` per page would take
    /// far longer than refilling the TLB.
    fn flush_range(&self, range: PageRange<Size4KiB>) {
        if range.len() > self.ceiling() {
            return self.flush_all();
        }
        for page in range {
            self.flush_page(page);
        }
    }

    /// Drops any translation in each of `ranges`, whose pages together stay within
    /// [`ceiling`](Self::ceiling): a batch the caller wants flushed as one. The
    /// default flushes them one by one; a policy that reaches other CPUs sends them
    /// all in one request, so a batch costs one round of IPIs.
    fn flush_ranges(&self, ranges: &[PageRange<Size4KiB>]) {
        for range in ranges {
            self.flush_range(*range);
        }
    }

    /// Drops every non-global and global translation.
    fn flush_all(&self);

    /// Starts flushing `batch` from every CPU and may return before the other CPUs
    /// have: `ticket` records what to wait for. Nothing the batch's stale
    /// translations reached may be reused until [`finish_flush`](Self::finish_flush)
    /// returned for the ticket. The default flushes at once and leaves the ticket
    /// done; a policy that reaches other CPUs sends the IPIs and returns, so the
    /// caller works on while they flush (the vmalloc manager's per-CPU lazy lists do,
    /// finishing one batch when the next is due).
    ///
    /// A ticket that is not done is finished first.
    fn start_flush(&self, batch: FlushBatch<'_>, ticket: &mut FlushTicket) {
        self.finish_flush(ticket);
        match batch {
            FlushBatch::All => self.flush_all(),
            FlushBatch::Ranges(ranges) => self.flush_ranges(ranges),
        }
    }

    /// Returns once every CPU has flushed what [`start_flush`](Self::start_flush)
    /// recorded in `ticket` (at once if it is done), and leaves the ticket done. A
    /// policy that flushes other CPUs serves their requests to the calling CPU while
    /// it waits, as [`relax`](Self::relax) does.
    fn finish_flush(&self, ticket: &mut FlushTicket) {
        *ticket = FlushTicket::DONE;
    }

    /// Pages up to which a range, or a batch of ranges, is flushed page by page
    /// rather than all at once. [`SINGLE_PAGE_FLUSH_CEILING`] unless overridden.
    fn ceiling(&self) -> u64 {
        SINGLE_PAGE_FLUSH_CEILING
    }

    /// Called on every turn of a spin: waiting for the vmalloc manager's lock, or for
    /// other CPUs to finish a flush. A policy that flushes other CPUs serves their
    /// requests here, so a CPU waiting for the lock cannot stall a flush its holder
    /// started (see [`smp`](crate::smp)). The default only hints the CPU that it
    /// spins.
    fn relax(&self) {
        core::hint::spin_loop();
    }

    /// The kernel's CPUs, when this policy knows them (a [`Shootdown`] does, and an
    /// [`InvlpgFlush`] answers as the one CPU of a uniprocessor kernel). The library
    /// holds off interrupts through them ([`Cpus::irq_save`]) around every lock an
    /// interrupt handler can reach, and the vmalloc manager's per-CPU caches use
    /// [`Cpus::current`] to pick the calling CPU's cache. `None`, the default, is for
    /// code no interrupt handler calls into (host tests): no interrupts are held off,
    /// and every CPU shares one cache.
    ///
    /// [`Shootdown`]: crate::smp::Shootdown
    fn cpus(&self) -> Option<&dyn Cpus> {
        None
    }

    /// Runs `work` on every other online CPU and returns once each has (Linux's
    /// `smp_call_function_many` with `wait`); `false` when this policy cannot reach
    /// other CPUs (the default). A [`Shootdown`] runs it in its IPI service, with
    /// interrupts held off: `work` must not wait for anything. The library's per-CPU
    /// caches use it to drain every CPU when a call runs dry.
    ///
    /// [`Shootdown`]: crate::smp::Shootdown
    fn call_on_other_cpus(&self, work: &(dyn Fn() + Sync)) -> bool {
        let _ = work;
        false
    }
}

/// What [`TlbFlush::start_flush`] flushes.
#[derive(Debug, Clone, Copy)]
pub enum FlushBatch<'a> {
    /// Every translation.
    All,
    /// The ranges, whose pages together stay within the policy's
    /// [ceiling](TlbFlush::ceiling).
    Ranges(&'a [PageRange<Size4KiB>]),
}

/// What a flush started with [`TlbFlush::start_flush`] waits for: per CPU it was
/// sent to, the request that CPU must have served. Kept by the caller until
/// [`TlbFlush::finish_flush`]; [`DONE`](Self::DONE) waits for nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlushTicket {
    pub(crate) targets: CpuSet,
    /// Per target CPU, its request's number (the low 32 bits: a CPU serves its
    /// requests in order and never runs 2^31 behind).
    pub(crate) requests: [u32; MAX_CPUS],
}

impl FlushTicket {
    /// A ticket that waits for nothing.
    pub const DONE: FlushTicket = FlushTicket {
        targets: CpuSet::empty(),
        requests: [0; MAX_CPUS],
    };

    /// Whether the ticket waits for nothing: finished, or its flush reached no
    /// other CPU. (A ticket whose CPUs have all served is done once finished.)
    pub fn is_done(&self) -> bool {
        self.targets.is_empty()
    }
}

impl<T: TlbFlush + ?Sized> TlbFlush for &T {
    fn flush_page(&self, page: Page<Size4KiB>) {
        (**self).flush_page(page)
    }
    fn flush_range(&self, range: PageRange<Size4KiB>) {
        (**self).flush_range(range)
    }
    fn flush_ranges(&self, ranges: &[PageRange<Size4KiB>]) {
        (**self).flush_ranges(ranges)
    }
    fn flush_all(&self) {
        (**self).flush_all()
    }
    fn start_flush(&self, batch: FlushBatch<'_>, ticket: &mut FlushTicket) {
        (**self).start_flush(batch, ticket)
    }
    fn finish_flush(&self, ticket: &mut FlushTicket) {
        (**self).finish_flush(ticket)
    }
    fn ceiling(&self) -> u64 {
        (**self).ceiling()
    }
    fn relax(&self) {
        (**self).relax()
    }
    fn cpus(&self) -> Option<&dyn Cpus> {
        (**self).cpus()
    }
    fn call_on_other_cpus(&self, work: &(dyn Fn() + Sync)) -> bool {
        (**self).call_on_other_cpus(work)
    }
}

/// Flushes with `invlpg` page by page up to a ceiling, and the whole TLB above it.
///
/// The ceiling defaults to 33 pages, Linux's `tlb_single_page_flush_ceiling`: past
/// it, refilling the TLB after a full flush costs less than the `invlpg`s. A full
/// flush toggles `CR4.PGE` when global pages or PCIDs are enabled (reloading CR3
/// alone keeps global translations, which kernel mappings often are, and those of
/// every other PCID; a change of `CR4.PGE` drops all of them) and reloads CR3
/// otherwise.
///
/// With PCIDs on (`CR4.PCIDE`), keep global pages on too (`CR4.PGE`): `invlpg`
/// drops a page's translation from the current PCID and its global one, and this
/// crate's leaves are global, so another PCID's copy of a kernel page exists only
/// where global pages are off.
///
/// This flushes only the CPU it runs on; SMP kernels wrap it in a shootdown. It
/// answers [`TlbFlush::cpus`] as the one CPU of a uniprocessor kernel, holding off
/// interrupts with `cli`.
#[derive(Debug, Clone, Copy)]
pub struct InvlpgFlush {
    ceiling: u64,
}

impl InvlpgFlush {
    /// Linux's default ceiling, in pages.
    pub const DEFAULT_CEILING: u64 = SINGLE_PAGE_FLUSH_CEILING;

    /// A flusher with the default ceiling.
    ///
    /// # Safety
    ///
    /// Its methods execute `invlpg` and write CR3/CR4: the caller runs in ring 0 on
    /// x86_64 with paging enabled (in a kernel, never in a host process).
    pub const unsafe fn new() -> Self {
        Self {
            ceiling: Self::DEFAULT_CEILING,
        }
    }

    /// A flusher that flushes everything for ranges longer than `ceiling` pages.
    ///
    /// # Safety
    ///
    /// As [`new`](Self::new).
    pub const unsafe fn with_ceiling(ceiling: u64) -> Self {
        Self { ceiling }
    }
}

/// What an [`InvlpgFlush`] answers: its constructor's contract is `OneCpu`'s.
static ONE_CPU: OneCpu = OneCpu(());

#[cfg(target_arch = "x86_64")]
impl TlbFlush for InvlpgFlush {
    /// The calling CPU alone, holding off interrupts with `cli`: an `InvlpgFlush`
    /// runs in ring 0 (its constructor's contract). An SMP kernel wraps it in a
    /// [`Shootdown`](crate::smp::Shootdown), which answers with the kernel's CPUs.
    fn cpus(&self) -> Option<&dyn Cpus> {
        Some(&ONE_CPU)
    }

    fn flush_page(&self, page: Page<Size4KiB>) {
        x86_64::instructions::tlb::flush(page.start_address());
    }

    fn ceiling(&self) -> u64 {
        self.ceiling
    }

    fn flush_all(&self) {
        use x86_64::registers::control::{Cr4, Cr4Flags};
        // Between the two CR4 writes an interrupt handler would run with global
        // pages off; harmless, but keeping it out costs nothing.
        x86_64::instructions::interrupts::without_interrupts(|| {
            let cr4 = Cr4::read();
            if cr4.intersects(Cr4Flags::PAGE_GLOBAL | Cr4Flags::PCID) {
                // SAFETY: `new`'s contract puts us in ring 0; flipping PGE and back
                // changes no setting, it only flushes every TLB entry, global ones
                // and every PCID's included (SDM 4.10.4.1). A CR3 reload would not
                // (and, written back by `x86_64`'s `flush_all`, would drop the PCID
                // bits of CR3).
                unsafe {
                    Cr4::write(cr4 ^ Cr4Flags::PAGE_GLOBAL);
                    Cr4::write(cr4);
                }
            } else {
                x86_64::instructions::tlb::flush_all();
            }
        });
    }
}

/// Flushes nothing and counts what it was asked: for tests, and for kernels that
/// want to see how much flushing their unmaps cost.
#[derive(Debug)]
pub struct CountingFlush {
    ceiling: u64,
    page_calls: AtomicU64,
    range_calls: AtomicU64,
    range_pages: AtomicU64,
    full_calls: AtomicU64,
}

impl CountingFlush {
    /// All counters at zero, with the default [ceiling](TlbFlush::ceiling).
    pub const fn new() -> Self {
        Self::with_ceiling(SINGLE_PAGE_FLUSH_CEILING)
    }

    /// All counters at zero, reporting `ceiling` as its [ceiling](TlbFlush::ceiling).
    pub const fn with_ceiling(ceiling: u64) -> Self {
        Self {
            ceiling,
            page_calls: AtomicU64::new(0),
            range_calls: AtomicU64::new(0),
            range_pages: AtomicU64::new(0),
            full_calls: AtomicU64::new(0),
        }
    }

    /// Calls of [`TlbFlush::flush_page`].
    pub fn page_calls(&self) -> u64 {
        self.page_calls.load(Ordering::Relaxed)
    }

    /// Calls of [`TlbFlush::flush_range`].
    pub fn range_calls(&self) -> u64 {
        self.range_calls.load(Ordering::Relaxed)
    }

    /// Pages of all ranges passed to [`TlbFlush::flush_range`].
    pub fn range_pages(&self) -> u64 {
        self.range_pages.load(Ordering::Relaxed)
    }

    /// Calls of [`TlbFlush::flush_all`].
    pub fn full_calls(&self) -> u64 {
        self.full_calls.load(Ordering::Relaxed)
    }
}

impl Default for CountingFlush {
    fn default() -> Self {
        Self::new()
    }
}

impl TlbFlush for CountingFlush {
    fn flush_page(&self, _: Page<Size4KiB>) {
        self.page_calls.fetch_add(1, Ordering::Relaxed);
    }

    fn flush_range(&self, range: PageRange<Size4KiB>) {
        self.range_calls.fetch_add(1, Ordering::Relaxed);
        self.range_pages.fetch_add(range.len(), Ordering::Relaxed);
    }

    fn flush_all(&self) {
        self.full_calls.fetch_add(1, Ordering::Relaxed);
    }

    fn ceiling(&self) -> u64 {
        self.ceiling
    }
}

#[cfg(test)]
mod test {
    use super::*;
    use core::sync::atomic::{AtomicU64, Ordering};
    use x86_64::VirtAddr;

    /// A policy that only knows single pages and everything.
    #[derive(Default)]
    struct Minimal {
        pages: AtomicU64,
        alls: AtomicU64,
    }

    impl TlbFlush for Minimal {
        fn flush_page(&self, _: Page<Size4KiB>) {
            self.pages.fetch_add(1, Ordering::Relaxed);
        }
        fn flush_all(&self) {
            self.alls.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn range(pages: u64) -> PageRange<Size4KiB> {
        let start = Page::containing_address(VirtAddr::new(0xffff_c900_0000_0000));
        Page::range(start, start + pages)
    }

    #[test]
    fn the_default_range_flush_goes_page_by_page_only_up_to_the_ceiling() {
        let tlb = Minimal::default();
        tlb.flush_range(range(SINGLE_PAGE_FLUSH_CEILING));
        assert_eq!(tlb.pages.load(Ordering::Relaxed), SINGLE_PAGE_FLUSH_CEILING);
        tlb.flush_range(range(1 << 18));
        assert_eq!(tlb.pages.load(Ordering::Relaxed), SINGLE_PAGE_FLUSH_CEILING);
        assert_eq!(
            tlb.alls.load(Ordering::Relaxed),
            1,
            "a 1 GiB range is one full flush"
        );
    }
}
