//! An interrupt storm: a periodic local APIC timer on every CPU whose handler
//! allocates through the global heap and `vfree_atomic`s vmalloc areas, while every
//! CPU stresses the manager with interrupts on. The library takes every lock an
//! interrupt handler can reach with interrupts held off; a lock taken with them on
//! would deadlock here, on the CPU whose handler waits for the lock the code it
//! interrupted holds (the host's watchdog names the check).

use super::library::random_steps;
use super::{Ctx, ensure};
use crate::interrupts::TIMER_VECTOR;
use crate::mm;
use crate::smp::{self, MAX_CPUS, on_each_cpu};
use alloc::boxed::Box;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use vmalloc::Error;

type Outcome = Result<(), &'static str>;

const PAGE: usize = 4096;
/// The timer's period in APIC bus clocks (nanoseconds under QEMU): 250 µs. Under
/// TCG a CPU then takes about 400 a second while it stresses (a late tick merges
/// with the next), and still spends most of its time outside the handler.
const TIMER_PERIOD: u32 = 250_000;
/// Timer interrupts each CPU takes at least before it stops stressing: about 5 s.
const TICKS_PER_CPU: u64 = 2_000;
/// Stress steps per chunk; a CPU runs chunks until it has taken its ticks (about
/// 120 ticks a chunk).
const STEPS_PER_CHUNK: usize = 100;
/// Chunks a CPU runs at most: a bound on the run if the timer does not fire.
const MAX_CHUNKS: u64 = 100;

/// What the handlers did; per CPU where each CPU counts its own.
struct Storm {
    /// The handler does its work (outside the check it only ends the interrupt).
    on: AtomicBool,
    ticks: [AtomicU64; MAX_CPUS],
    /// Each CPU's handler's xorshift state.
    seeds: [AtomicU64; MAX_CPUS],
    /// A vmalloc area `vfree_atomic` refused (queue full), to try again, or 0.
    pending: [AtomicU64; MAX_CPUS],
    /// Heap blocks of 16 KiB or more (vmalloc'd) the handlers made.
    large_blocks: AtomicU64,
    /// Areas the handlers `vfree_atomic`ed.
    areas_queued: AtomicU64,
    /// `vfree_atomic` refusals with `WouldBlock`.
    would_block: AtomicU64,
    /// Allocations that failed.
    failed: AtomicU64,
    /// Blocks or areas that did not hold what their handler wrote.
    corrupted: AtomicU64,
    /// Anything else that went wrong in a handler.
    refused: AtomicU64,
}

static STORM: Storm = Storm {
    on: AtomicBool::new(false),
    ticks: [const { AtomicU64::new(0) }; MAX_CPUS],
    seeds: [const { AtomicU64::new(0) }; MAX_CPUS],
    pending: [const { AtomicU64::new(0) }; MAX_CPUS],
    large_blocks: AtomicU64::new(0),
    areas_queued: AtomicU64::new(0),
    would_block: AtomicU64::new(0),
    failed: AtomicU64::new(0),
    corrupted: AtomicU64::new(0),
    refused: AtomicU64::new(0),
};

fn count(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// The timer's handler: during the check, one tick of heap and vmalloc work.
pub fn timer_tick() {
    if STORM.on.load(Ordering::Acquire) {
        tick(smp::cpu_index());
    }
}

fn next(cpu: usize) -> u64 {
    let mut seed = STORM.seeds[cpu].load(Ordering::Relaxed);
    seed ^= seed << 13;
    seed ^= seed >> 7;
    seed ^= seed << 17;
    STORM.seeds[cpu].store(seed, Ordering::Relaxed);
    seed
}

/// One tick on `cpu`: a `Vec` of 8 bytes to 48 KiB (one in 64 of 16 KiB or more, so
/// vmalloc'd and `vfree`d here; four in 64 from the list heap; the rest from the
/// slabs) and a `Box`, each filled with the tick's stamp and checked; every fourth
/// tick a fresh vmalloc area of 1 to 3 pages, stamped, checked and `vfree_atomic`ed.
/// Heavier ticks would leave the CPUs little time for anything else under TCG.
fn tick(cpu: usize) {
    let tick = STORM.ticks[cpu].fetch_add(1, Ordering::Relaxed) + 1;
    let stamp = (cpu as u64) << 56 | tick;
    let random = next(cpu);
    let words = match random % 64 {
        0 => 2048 + (random >> 8) % 4096,
        1..=4 => 512 + (random >> 8) % 1024,
        _ => 1 + (random >> 8) % 64,
    } as usize;
    let mut block: Vec<u64> = Vec::new();
    if block.try_reserve_exact(words).is_err() {
        return count(&STORM.failed);
    }
    block.resize(words, stamp);
    if words >= 2048 {
        count(&STORM.large_blocks);
    }
    let boxed = Box::new([stamp; 4]);
    let block = core::hint::black_box(block);
    if block.iter().any(|&word| word != stamp) || core::hint::black_box(boxed)[3] != stamp {
        count(&STORM.corrupted);
    }
    drop(block);
    if tick.is_multiple_of(4) {
        area_tick(cpu, stamp, 1 + (random >> 40) as usize % 3);
    }
}

/// Vmallocs `pages` pages, stamps and checks each, and `vfree_atomic`s them; an area
/// refused before is tried first, and while it stays refused no new one is made.
fn area_tick(cpu: usize, stamp: u64, pages: usize) {
    let vm = mm::vmalloc();
    let pending = STORM.pending[cpu].swap(0, Ordering::Relaxed);
    if pending != 0 && !queue_free(cpu, pending as *mut u8) {
        return;
    }
    let Ok(area) = vm.vmalloc(pages * PAGE) else {
        return count(&STORM.failed);
    };
    let words = area.as_ptr().cast::<u64>();
    for page in 0..pages {
        // SAFETY: the first word of a page of the live area made above.
        unsafe {
            words
                .add(page * PAGE / 8)
                .write_volatile(stamp ^ page as u64)
        };
    }
    let intact = (0..pages).all(|page| {
        // SAFETY: as above, read back.
        let word = unsafe { words.add(page * PAGE / 8).read_volatile() };
        word == stamp ^ page as u64
    });
    if !intact {
        count(&STORM.corrupted);
    }
    queue_free(cpu, area.as_ptr());
}

/// `vfree_atomic`s `area`; keeps it in `cpu`'s pending slot when the queue is full.
fn queue_free(cpu: usize, area: *mut u8) -> bool {
    // SAFETY: the handler made the area and does not use it again.
    match unsafe { mm::vmalloc().vfree_atomic(area) } {
        Ok(()) => {
            count(&STORM.areas_queued);
            true
        }
        Err(Error::WouldBlock) => {
            count(&STORM.would_block);
            STORM.pending[cpu].store(area as u64, Ordering::Relaxed);
            false
        }
        Err(_) => {
            count(&STORM.refused);
            true
        }
    }
}

/// Heap blocks the interrupted code allocates and frees between stress chunks, so
/// handlers also interrupt the heap's own paths: mostly 32-byte blocks, the slab
/// class (and magazine) of the handlers' `Box`, and some of up to 6 KiB. Each is
/// filled with a stamp of its CPU and checked before it is freed; a block handed
/// out to a handler too shows the handler's stamp.
fn heap_churn(cpu: usize, chunk: u64) -> Outcome {
    const LIVE: usize = 32;
    // Bit 55 tells the interrupted code's stamps from the handlers'.
    let marker = (cpu as u64) << 1 | 1;
    let mut live: Vec<Vec<u64>> = Vec::with_capacity(LIVE);
    let mut intact = true;
    let holds_own_stamp =
        |block: &Vec<u64>| block[0] >> 55 == marker && block.iter().all(|&word| word == block[0]);
    for step in 0..400u64 {
        if live.len() < LIVE && step % 3 != 2 {
            let words = if step % 4 == 3 {
                1 + step * 37 % 768
            } else {
                4
            };
            live.push(alloc::vec![marker << 55 | chunk << 16 | step; words as usize]);
        } else if let Some(block) = live.pop() {
            intact &= holds_own_stamp(&block);
        }
    }
    intact &= live.iter().all(holds_own_stamp);
    ensure(
        intact,
        "a heap block of the interrupted code changed under it",
    )
}

/// Every frame the manager and the heap hold beyond the free ones: what a run may
/// grow and still have given every frame back.
fn held_by_manager_and_heap() -> i64 {
    let vm = mm::vmalloc().stats();
    let heap = mm::HEAP.stats();
    (vm.page_table_frames + vm.bookkeeping_frames) as i64
        + ((heap.mapped + heap.slab_bytes) / PAGE) as i64
}

/// Every CPU takes a 250 µs local APIC timer interrupt whose handler allocates
/// through the global heap (8 B to 48 KiB, some of it vmalloc'd and so `vfree`d in
/// the handler) and vmallocs, checks and `vfree_atomic`s areas, while the CPU runs
/// the `stress` steps with interrupts on until it has taken 2000 of them (and
/// between chunks of them allocates and frees heap blocks of its own, checked). Then the
/// timers stop, refused frees are done, and after a purge and a heap shrink every
/// frame is back (but what the manager's tables and the heap grew by) and no slab
/// object is left; every handler saw its own data.
pub fn smp_irq_storm(_ctx: &mut Ctx) -> Outcome {
    let vm = mm::vmalloc();
    // Empty slabs go back to the manager first, which purges them.
    on_each_cpu(&|_| mm::HEAP.shrink());
    vm.purge();
    let free_before = mm::frames().stats().free as i64;
    let held_before = held_by_manager_and_heap();
    let objects_before = mm::HEAP.stats().slab_objects;
    let refused_before = vm.stats().deferred_refused;
    for cpu in 0..MAX_CPUS {
        STORM.ticks[cpu].store(0, Ordering::Relaxed);
        STORM.seeds[cpu].store(0x9e37_79b9_7f4a_7c15 ^ cpu as u64, Ordering::Relaxed);
    }
    for counter in [
        &STORM.large_blocks,
        &STORM.areas_queued,
        &STORM.would_block,
        &STORM.failed,
        &STORM.corrupted,
        &STORM.refused,
    ] {
        counter.store(0, Ordering::Relaxed);
    }
    let first_error = spin::Mutex::new(Ok(()));
    STORM.on.store(true, Ordering::Release);
    on_each_cpu(&|cpu| {
        crate::lapic::start_periodic_timer(TIMER_VECTOR, TIMER_PERIOD);
        let mut chunk = 0;
        let mut outcome = Ok(());
        while STORM.ticks[cpu].load(Ordering::Relaxed) < TICKS_PER_CPU && chunk < MAX_CHUNKS {
            outcome = random_steps(0x5851_f42d ^ (cpu as u64) << 32 ^ chunk, STEPS_PER_CHUNK)
                .and_then(|()| heap_churn(cpu, chunk));
            if outcome.is_err() {
                break;
            }
            chunk += 1;
        }
        crate::lapic::stop_timer();
        if let Err(why) = outcome {
            let mut first = first_error.lock();
            if first.is_ok() {
                *first = Err(why);
            }
        }
    });
    STORM.on.store(false, Ordering::Release);
    for pending in &STORM.pending {
        let area = pending.swap(0, Ordering::Relaxed);
        // SAFETY: an area a handler made and `vfree_atomic` refused; nothing uses it.
        if area != 0 && unsafe { vm.vfree(area as *mut u8) }.is_err() {
            count(&STORM.refused);
        }
    }
    vm.purge();
    on_each_cpu(&|_| mm::HEAP.shrink());
    vm.purge();
    first_error.into_inner()?;
    let cpus = smp::online().len().min(MAX_CPUS);
    ensure(
        STORM.ticks[..cpus]
            .iter()
            .all(|ticks| ticks.load(Ordering::Relaxed) >= TICKS_PER_CPU),
        "a CPU took fewer timer interrupts than asked for",
    )?;
    ensure(
        STORM.corrupted.load(Ordering::Relaxed) == 0,
        "a handler's heap block or area did not hold what it wrote",
    )?;
    ensure(
        STORM.failed.load(Ordering::Relaxed) == 0,
        "an allocation in a handler failed",
    )?;
    ensure(
        STORM.refused.load(Ordering::Relaxed) == 0 && vm.stats().deferred_refused == refused_before,
        "a handler's vfree_atomic (or the free it queued) was refused",
    )?;
    ensure(
        STORM.large_blocks.load(Ordering::Relaxed) > 0
            && STORM.areas_queued.load(Ordering::Relaxed) > 0,
        "the handlers made no vmalloc'd heap block or no area",
    )?;
    ensure(
        vm.stats().pending_purge_frames == 0,
        "frames still pending after purge",
    )?;
    ensure(
        mm::HEAP.stats().slab_objects == objects_before,
        "slab objects left behind",
    )?;
    let grown = held_by_manager_and_heap() - held_before;
    ensure(
        mm::frames().stats().free as i64 == free_before - grown,
        "frames lost or duplicated during the storm",
    )
}
