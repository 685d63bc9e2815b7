//! The shootdown's one promise, seen from the MMU: a target acknowledges a flush only
//! after it has flushed, even when another shootdown's IPI lands while it flushes.
//!
//! The checks use the library's public API only: a second manager (over
//! [`PoisoningFrames`], in a top-level slot of its own) whose flush is [`HOOKED`], a
//! [`Shootdown`] over the kernel's CPUs whose local flush is [`HookedFlush`]. Armed,
//! that flush runs a hook on CPU 1 *before* it flushes: the hook reads the probe page
//! through CPU 1's cached translation for [`HOOK_SPINS`] reads, looking for the
//! poison the frame gets as the purge frees it or the new owner's data CPU 0 writes
//! as soon as its purge returns. CPU 0 can see neither before CPU 1 has acknowledged,
//! so with a protocol that acknowledges after flushing the hook reads only the old
//! data; with one that acknowledges first it reads the poison.
//!
//! While a check runs, the shootdown vector serves [`HOOKED`] too ([`serve_ipi`]).

use super::poison::{OLD_DATA, POISON, PoisonedManager, PoisoningFrames};
use super::{Ctx, SpareSlot, ensure, spare_region};
use crate::fault::probe_read;
use crate::mm;
use crate::smp::{self, KernelCpus, MAX_CPUS, on_each_cpu};
use core::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use vmalloc::PhysMemory;
use vmalloc::smp::Shootdown;
use vmalloc::tlb::{InvlpgFlush, TlbFlush};
use x86_64::VirtAddr;
use x86_64::instructions::interrupts;
use x86_64::structures::paging::page::PageRange;
use x86_64::structures::paging::{Page, PhysFrame, Size4KiB};

type Outcome = Result<(), &'static str>;

const PAGE: usize = 4096;
/// What CPU 0 writes into the freed frame once its purge has returned.
const NEW_DATA: u64 = u64::from_le_bytes(*b"NEWDATA!");
/// Reads of the probe page the hook makes before it lets the flush run: long enough
/// for CPU 0 to free the frame and write it, were it told the flush was done.
const HOOK_SPINS: u64 = 1_000_000;
/// Spins the nested variant's hook waits for an IPI to land: the pending one of the
/// shootdown it serves, then CPU 2's.
const NESTED_WAIT_SPINS: u64 = 10_000_000;
/// The CPU whose flushes are hooked.
const HOOKED_CPU: usize = 1;

/// The shootdown under test: the kernel's CPUs, each flushed by [`HookedFlush`].
static HOOKED: Shootdown<KernelCpus, HookedFlush> = Shootdown::new(KernelCpus, HookedFlush::new());

/// Bit `cpu` set: that CPU's shootdown vector serves [`HOOKED`] too.
static ROUTED: AtomicU64 = AtomicU64::new(0);
/// Shootdown-vector interrupts each CPU took.
static IPIS_TAKEN: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];

/// Called by the shootdown vector's handler after the boot shootdown's: serves
/// [`HOOKED`] on the CPUs routed to it.
pub fn serve_ipi() {
    let cpu = smp::cpu_index();
    if let Some(taken) = IPIS_TAKEN.get(cpu) {
        taken.fetch_add(1, Ordering::Relaxed);
    }
    if ROUTED.load(Ordering::Acquire) & 1 << cpu != 0 {
        HOOKED.handle_ipi();
    }
}

fn ipis_taken(cpu: usize) -> u64 {
    IPIS_TAKEN[cpu].load(Ordering::Relaxed)
}

/// How CPU 1 serves the request and what its hook does.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Mode {
    /// CPU 1 takes the IPI; the hook runs in the handler, before the flush.
    Ipi,
    /// CPU 1 polls `handle_ipi` with interrupts off; the hook runs before the flush.
    Poll,
    /// As `Poll`, but the hook lets interrupts in (as an NMI would come in) and has
    /// CPU 2 start a shootdown at CPU 1, whose IPI lands inside the hooked flush.
    Nested,
    /// The broken flush of the negative control: CPU 1's flush returns at once (so
    /// its serve acknowledges) and runs only after the hook.
    Deferred,
}

/// The hook's state: set up by CPU 0 for a round, run on CPU 1.
struct Hook {
    mode: AtomicU8,
    /// Hook the next flush on [`HOOKED_CPU`].
    armed: AtomicBool,
    /// The page the hook reads.
    probe: AtomicU64,
    /// The hook has run.
    ran: AtomicBool,
    /// Its first read saw the area's data: the translation was cached.
    cached: AtomicBool,
    /// A read after that faulted: the translation was gone before the flush (a TLB
    /// eviction), so the round proves nothing.
    lost: AtomicBool,
    /// The first value other than the area's data the hook read, or 0.
    early: AtomicU64,
    /// Deferred mode: flushes on CPU 1 are owed, not done.
    owed: AtomicBool,
    /// Nested mode: CPU 2, start your shootdown.
    nested_go: AtomicBool,
    /// Nested mode: shootdown interrupts CPU 1 had taken when CPU 2 was told to
    /// shoot.
    nested_from: AtomicU64,
    /// Nested mode: shootdown interrupts CPU 1 took inside the hook after that.
    nested_landed: AtomicU64,
}

static HOOK: Hook = Hook {
    mode: AtomicU8::new(Mode::Ipi as u8),
    armed: AtomicBool::new(false),
    probe: AtomicU64::new(0),
    ran: AtomicBool::new(false),
    cached: AtomicBool::new(false),
    lost: AtomicBool::new(false),
    early: AtomicU64::new(0),
    owed: AtomicBool::new(false),
    nested_go: AtomicBool::new(false),
    nested_from: AtomicU64::new(0),
    nested_landed: AtomicU64::new(0),
};

impl Hook {
    fn mode(&self) -> Mode {
        match self.mode.load(Ordering::Acquire) {
            1 => Mode::Poll,
            2 => Mode::Nested,
            3 => Mode::Deferred,
            _ => Mode::Ipi,
        }
    }

    /// Sets up a round in `mode` reading `probe`, not armed yet.
    fn reset(&self, mode: Mode, probe: VirtAddr) {
        self.mode.store(mode as u8, Ordering::Relaxed);
        self.probe.store(probe.as_u64(), Ordering::Relaxed);
        for flag in [
            &self.armed,
            &self.ran,
            &self.cached,
            &self.lost,
            &self.owed,
            &self.nested_go,
        ] {
            flag.store(false, Ordering::Relaxed);
        }
        for count in [&self.early, &self.nested_from, &self.nested_landed] {
            count.store(0, Ordering::Relaxed);
        }
    }
}

/// The manager the rounds run on.
type HookedManager = PoisonedManager<&'static Shootdown<KernelCpus, HookedFlush>>;

/// CPU 1's local flush with the hook in front; other CPUs flush at once.
pub struct HookedFlush {
    tlb: InvlpgFlush,
}

impl HookedFlush {
    const fn new() -> Self {
        Self {
            // SAFETY: the kernel runs in ring 0 with paging on, on every CPU.
            tlb: unsafe { InvlpgFlush::new() },
        }
    }

    /// Runs before each of this CPU's flushes; false when the flush is owed instead
    /// (deferred mode).
    fn before_flush(&self) -> bool {
        if smp::cpu_index() != HOOKED_CPU {
            return true;
        }
        let mode = HOOK.mode();
        if mode == Mode::Deferred {
            let hooked = HOOK.armed.swap(false, Ordering::AcqRel);
            if hooked || HOOK.owed.load(Ordering::Acquire) {
                HOOK.owed.store(true, Ordering::Release);
                return false;
            }
            return true;
        }
        if HOOK.armed.swap(false, Ordering::AcqRel) {
            watch_probe(mode == Mode::Nested, false);
        }
        true
    }
}

impl TlbFlush for HookedFlush {
    fn flush_page(&self, page: Page<Size4KiB>) {
        // Nothing maps the page CPU 2 shoots down in nested mode, so there is nothing
        // to drop. And under TCG an `invlpg` on a CPU that holds 2 MiB translations of
        // both the identity map and the physical map (an end of interrupt reaches the
        // APIC through the latter) empties its whole TLB (QEMU tracks one range of
        // large pages per TLB): it would drop the translation the hook reads.
        if page.start_address() == unrelated_page() {
            return;
        }
        if self.before_flush() {
            self.tlb.flush_page(page);
        }
    }

    fn flush_range(&self, range: PageRange<Size4KiB>) {
        if self.before_flush() {
            self.tlb.flush_range(range);
        }
    }

    fn flush_all(&self) {
        if self.before_flush() {
            self.tlb.flush_all();
        }
    }

    fn ceiling(&self) -> u64 {
        self.tlb.ceiling()
    }
}

/// The hook: reads the probe page [`HOOK_SPINS`] times through CPU 1's cached
/// translation, stopping at the first value that is not the area's data. `nested`
/// lets interrupts in and has CPU 2 shoot at CPU 1 first, and reads until that
/// IPI has landed before it counts; `serve` polls [`HOOKED`] between reads
/// (deferred mode, so CPU 0 is never stuck on CPU 1).
fn watch_probe(nested: bool, serve: bool) {
    let at = VirtAddr::new(HOOK.probe.load(Ordering::Acquire));
    let unchanged = |_| {
        // SAFETY: an aligned address in the check manager's region; the frame
        // behind it is RAM, so a read is harmless, and a fault is recovered.
        match unsafe { probe_read(at) } {
            Ok(OLD_DATA) => {
                if serve {
                    HOOKED.handle_ipi();
                }
                true
            }
            Ok(value) => {
                HOOK.early.store(value, Ordering::Release);
                false
            }
            Err(_) => {
                HOOK.lost.store(true, Ordering::Release);
                false
            }
        }
    };
    // SAFETY: as in `unchanged`.
    if unsafe { probe_read(at) } == Ok(OLD_DATA) {
        HOOK.cached.store(true, Ordering::Release);
        let waited = !nested || {
            let_in_nested_ipi();
            let from = HOOK.nested_from.load(Ordering::Acquire);
            (0..NESTED_WAIT_SPINS)
                .take_while(|_| ipis_taken(HOOKED_CPU) == from)
                .all(unchanged)
        };
        // `unchanged` records what ends the reads early.
        let _quiet = waited && (0..HOOK_SPINS).all(unchanged);
        if nested {
            interrupts::disable();
            let landed = ipis_taken(HOOKED_CPU) - HOOK.nested_from.load(Ordering::Acquire);
            HOOK.nested_landed.store(landed, Ordering::Release);
        }
    }
    HOOK.ran.store(true, Ordering::Release);
}

/// Nested mode, inside the hook with interrupts off: lets interrupts in, first with
/// CPU 1 not routed to [`HOOKED`] until the IPI of the shootdown being served (sent
/// while CPU 1 polled with interrupts off) has come and gone, then routed, and tells
/// CPU 2 to shoot. Leaves interrupts on: CPU 2's IPI lands in the hook. This breaks
/// the library's rule that a serve holds interrupts off, on purpose: it stands for
/// an NMI, or a kernel whose `irq_save` holds nothing off.
fn let_in_nested_ipi() {
    let cpu_bit = 1 << HOOKED_CPU;
    ROUTED.fetch_and(!cpu_bit, Ordering::AcqRel);
    let before = ipis_taken(HOOKED_CPU);
    interrupts::enable();
    let mut spins = 0;
    while ipis_taken(HOOKED_CPU) == before && spins < NESTED_WAIT_SPINS {
        spins += 1;
        core::hint::spin_loop();
    }
    ROUTED.fetch_or(cpu_bit, Ordering::AcqRel);
    HOOK.nested_from
        .store(ipis_taken(HOOKED_CPU), Ordering::Release);
    HOOK.nested_go.store(true, Ordering::Release);
}

/// What one round showed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Round {
    /// The hook read only the area's data, and CPU 1's read after the round faulted.
    Quiet,
    /// The translation was not (or no longer) cached when the hook read: proves
    /// nothing either way.
    Inconclusive,
    /// The hook read this instead of the area's data: the acknowledgement came
    /// before the flush.
    Early(u64),
}

/// One round in `mode`: CPU 1 caches the translation of a fresh one-page area of
/// `vm` and arms the hook; CPU 0 frees and purges the area, takes its frame back and
/// writes [`NEW_DATA`] into it; CPU 1 serves the shootdown as `mode` says and, after
/// the round, reads the area again. Also returns whether CPU 2's IPI landed inside
/// the hook (nested mode).
fn round(
    vm: &HookedManager,
    mode: Mode,
    phys: vmalloc::OffsetPhysMemory,
    table: u64,
) -> Result<(Round, bool), &'static str> {
    let area = vm.vmalloc(PAGE).map_err(|_| "vmalloc failed")?.as_ptr();
    let at = VirtAddr::from_ptr(area);
    if at.as_u64() >> 21 != table {
        // SAFETY: the area was made above and is not used again.
        let _ = unsafe { vm.vfree(area) };
        return Err("the probe area left the page table its neighbour keeps");
    }
    // SAFETY: the first word of the live one-page area.
    unsafe { at.as_mut_ptr::<u64>().write_volatile(OLD_DATA) };
    let frame = vm
        .vmalloc_to_frame(at)
        .map_err(|_| "vmalloc_to_frame failed")?;
    HOOK.reset(mode, at);
    let ready = AtomicBool::new(false);
    let finished = AtomicBool::new(false);
    let reused = spin::Mutex::new(Err("CPU 0 did not free the area"));
    let read_after = spin::Mutex::new(Ok(0));
    let cpu_one = || {
        // SAFETY: the live area's first word; caches the translation.
        if unsafe { probe_read(at) } == Ok(OLD_DATA) {
            HOOK.armed.store(true, Ordering::Release);
        }
        ready.store(true, Ordering::Release);
        let done = || HOOK.ran.load(Ordering::Acquire) || finished.load(Ordering::Acquire);
        match mode {
            // Interrupts are on: the shootdown comes as an IPI.
            Mode::Ipi => {}
            Mode::Poll | Mode::Nested => interrupts::without_interrupts(|| {
                while !done() {
                    HOOKED.handle_ipi();
                }
            }),
            Mode::Deferred => interrupts::without_interrupts(|| {
                while !done() {
                    HOOKED.handle_ipi();
                    if HOOK.owed.load(Ordering::Acquire) {
                        watch_probe(false, true);
                        HOOK.owed.store(false, Ordering::Release);
                        HOOKED_LOCAL.flush_all();
                    }
                }
            }),
        }
        while !finished.load(Ordering::Acquire) {
            core::hint::spin_loop();
        }
        // SAFETY: the freed area's address; the frame behind a stale translation is
        // RAM, so a read is harmless; a fault is recovered.
        *read_after.lock() = unsafe { probe_read(at) };
    };
    let cpu_zero = || {
        while !ready.load(Ordering::Acquire) {
            core::hint::spin_loop();
        }
        // SAFETY: the area is this round's; CPU 1 only probes it afterwards.
        let outcome = match unsafe { vm.vfree(at.as_mut_ptr()) } {
            Ok(()) => {
                vm.purge();
                if mm::frames().alloc_from(frame) == Some(frame) {
                    // SAFETY: the frame is ours again; its first word, through the
                    // physical map.
                    unsafe {
                        phys.phys_to_virt(frame.start_address())
                            .cast::<u64>()
                            .write_volatile(NEW_DATA)
                    };
                    Ok(frame)
                } else {
                    Err("the purged frame did not come back")
                }
            }
            Err(_) => Err("vfree failed"),
        };
        *reused.lock() = outcome;
        finished.store(true, Ordering::Release);
    };
    on_each_cpu(&|cpu| match cpu {
        0 => cpu_zero(),
        HOOKED_CPU => cpu_one(),
        _ => {
            // Polling, so CPU 1's routing may change under them.
            while !finished.load(Ordering::Acquire) {
                if cpu == 2 && mode == Mode::Nested && HOOK.nested_go.swap(false, Ordering::AcqRel)
                {
                    HOOKED.flush_page(Page::containing_address(unrelated_page()));
                }
                HOOKED.handle_ipi();
            }
        }
    });
    let frame: PhysFrame = reused.into_inner()?;
    // SAFETY: the check took this frame and no longer uses it (or a bad free, refused).
    unsafe { mm::frames().free(frame) }.map_err(|_| "the reused frame could not be freed")?;
    let landed = HOOK.nested_landed.load(Ordering::Acquire) > 0;
    let early = HOOK.early.load(Ordering::Acquire);
    ensure(
        HOOK.ran.load(Ordering::Acquire),
        "CPU 1's hooked flush never ran",
    )?;
    if early != 0 {
        return Ok((Round::Early(early), landed));
    }
    if !HOOK.cached.load(Ordering::Acquire) || HOOK.lost.load(Ordering::Acquire) {
        return Ok((Round::Inconclusive, landed));
    }
    ensure(
        read_after.into_inner().is_err(),
        "CPU 1 still reads the freed area after the round: its translation survived",
    )?;
    Ok((Round::Quiet, landed))
}

/// CPU 1's own flush, for the flush deferred mode owes.
static HOOKED_LOCAL: InvlpgFlush = {
    // SAFETY: the kernel runs in ring 0 with paging on.
    unsafe { InvlpgFlush::new() }
};

/// A page no manager maps, for CPU 2's shootdown in nested mode.
fn unrelated_page() -> VirtAddr {
    spare_region(SpareSlot::ShootdownUnrelated, false).start
}

/// The body of [`rounds`] on its manager `vm`. A live one-page area first keeps the
/// last-level page table the rounds' areas land in, so each purge frees no table and
/// flushes once: a second shootdown in the purge would flush CPU 1 (served in the
/// hook, when acknowledged early) before the frame is freed and poisoned.
fn rounds_on(
    vm: &HookedManager,
    ctx: &Ctx,
    modes: &[Mode],
    rounds: usize,
    mut judge: impl FnMut(Round, bool) -> Result<bool, &'static str>,
) -> Outcome {
    let keeper = vm.vmalloc(PAGE).map_err(|_| "vmalloc failed")?;
    let table = VirtAddr::from_ptr(keeper.as_ptr()).as_u64() >> 21;
    let mut outcome = Ok(());
    'modes: for &mode in modes {
        for _ in 0..rounds {
            match round(vm, mode, ctx.phys, table)
                .and_then(|(result, landed)| judge(result, landed))
            {
                Ok(false) => {}
                Ok(true) => break 'modes,
                Err(why) => {
                    outcome = Err(why);
                    break 'modes;
                }
            }
        }
    }
    // SAFETY: the area was made above and is not used again.
    let freed = unsafe { vm.vfree(keeper.as_ptr()) };
    vm.purge();
    outcome?;
    ensure(freed.is_ok(), "vfree failed")
}

/// Runs `rounds` rounds of each of `modes` on a manager over [`PoisoningFrames`]
/// whose flush is [`HOOKED`], in `slot`, with the shootdown vector routed to it;
/// hands each round's result to `judge`, which stops early with `Ok(true)`. The
/// manager gives every frame back when dropped.
fn rounds(
    ctx: &Ctx,
    slot: SpareSlot,
    modes: &[Mode],
    rounds: usize,
    judge: impl FnMut(Round, bool) -> Result<bool, &'static str>,
) -> Outcome {
    let free_before = mm::frames().stats().free;
    ROUTED.store(smp::online().bits(), Ordering::Release);
    // SAFETY: the region's top-level slot is empty and no address space copies it;
    // the poisoning source hands out the kernel allocator's frames, RAM the physical
    // map reaches; `HOOKED` reaches every online CPU (its IPIs are routed to it).
    let made = unsafe {
        vmalloc::vmalloc::Vmalloc::new(
            spare_region(slot, false),
            ctx.pml4,
            ctx.phys,
            PoisoningFrames::new(ctx.phys),
            &HOOKED,
        )
    };
    let outcome = match made {
        Ok(vm) => {
            let outcome = rounds_on(&vm, ctx, modes, rounds, judge);
            drop(vm);
            outcome
        }
        Err(_) => Err("a manager over the hooked shootdown could not be made"),
    };
    ROUTED.store(0, Ordering::Release);
    outcome?;
    ensure(
        mm::frames().stats().free == free_before,
        "the manager over the hooked shootdown did not give its frames back",
    )
}

/// CPU 1, in its flush and before it, keeps reading a freed area's page through its
/// cached translation, taking the shootdown as an IPI and by polling with interrupts
/// off; CPU 0 can neither free the frame nor hand it to a new owner until CPU 1 has
/// flushed: the hook never reads the poison or the new data.
pub fn smp_shootdown_acks_after_flush(ctx: &mut Ctx) -> Outcome {
    let mut quiet = 0;
    rounds(
        ctx,
        SpareSlot::ShootdownAckAfterFlush,
        &[Mode::Ipi, Mode::Poll],
        3,
        |result, _| match result {
            Round::Early(POISON) => {
                Err("CPU 1 read the poison in its flush: acknowledged before flushing")
            }
            Round::Early(NEW_DATA) => {
                Err("CPU 1 read the new owner's data in its flush: acknowledged before flushing")
            }
            Round::Early(_) => Err("CPU 1 read something else in its flush"),
            Round::Quiet => {
                quiet += 1;
                Ok(false)
            }
            Round::Inconclusive => Ok(false),
        },
    )?;
    ensure(
        quiet >= 3,
        "too few rounds had the translation cached through the hook",
    )
}

/// The nested variant: while CPU 1 is in the hooked flush (polled, with interrupts
/// let in as an NMI would come in), CPU 2 starts a shootdown at CPU 1, whose IPI
/// lands there; the serve it runs must not acknowledge CPU 0's request for the
/// interrupted one: the hook never reads the poison or the new data.
pub fn smp_shootdown_nested_acks_after_flush(ctx: &mut Ctx) -> Outcome {
    let mut nested = 0;
    rounds(
        ctx,
        SpareSlot::ShootdownNestedAck,
        &[Mode::Nested],
        3,
        |result, landed| match result {
            Round::Early(_) => {
                Err("a shootdown IPI nested in CPU 1's flush acknowledged the flush it interrupted")
            }
            Round::Quiet => {
                nested += usize::from(landed);
                Ok(false)
            }
            Round::Inconclusive => Ok(false),
        },
    )?;
    ensure(nested > 0, "CPU 2's IPI never landed inside CPU 1's flush")
}

/// The negative control: CPU 1's flush returns at once, so its serve acknowledges,
/// and runs only after the hook: the hook reads the poison or the new data.
pub fn smp_early_ack_is_caught(ctx: &mut Ctx) -> Outcome {
    let mut caught = false;
    rounds(
        ctx,
        SpareSlot::ShootdownEarlyAck,
        &[Mode::Deferred],
        4,
        |result, _| {
            caught |= matches!(result, Round::Early(POISON | NEW_DATA));
            Ok(caught)
        },
    )?;
    ensure(
        caught,
        "the hook never read the poison or the new data with the flush after the acknowledgement",
    )
}
