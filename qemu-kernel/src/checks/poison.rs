//! A frame source that poisons every frame as it comes back, and checks that no CPU
//! reads the poison through a translation it cached before the frame was freed.
//!
//! [`PoisoningFrames`] fills each freed frame with [`POISON`] through the physical map
//! before the kernel's frame allocator takes it back. A CPU that still reads a freed
//! area through a stale TLB entry after the purge sees the poison at once, without
//! waiting for the frame to get a new owner (as `smp_stale_translation_faults` does).

use super::{Ctx, SpareSlot, ensure, spare_region};
use crate::fault::probe_read;
use crate::mm;
use crate::smp::{self, on_each_cpu};
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use vmalloc::frame::{BitmapFrameAllocator, LockedFrameAllocator};
use vmalloc::tlb::{InvlpgFlush, TlbFlush};
use vmalloc::vmalloc::Vmalloc;
use vmalloc::{Error, FrameSource, OffsetPhysMemory, PhysMemory};
use x86_64::VirtAddr;
use x86_64::structures::paging::{PhysFrame, Size2MiB};

type Outcome = Result<(), &'static str>;

const PAGE: usize = 4096;
/// What a freed frame holds from the moment it is back in the frame allocator.
pub const POISON: u64 = u64::from_le_bytes(*b"POISONED");
/// What an area holds while it is live.
pub const OLD_DATA: u64 = u64::from_le_bytes(*b"OLD_DATA");

/// The kernel's frame allocator, forwarded faithfully, except that a frame coming
/// back is filled with [`POISON`] first.
#[derive(Clone, Copy)]
pub struct PoisoningFrames {
    frames: &'static LockedFrameAllocator<'static>,
    phys: OffsetPhysMemory,
}

impl PoisoningFrames {
    /// Over the kernel's frame allocator, poisoning through `phys`.
    pub fn new(phys: OffsetPhysMemory) -> Self {
        Self {
            frames: mm::frames(),
            phys,
        }
    }

    /// Fills `frame` with [`POISON`].
    ///
    /// # Safety
    ///
    /// `frame` is allocated and its owner is giving it back (nobody uses it).
    unsafe fn poison(&self, frame: PhysFrame) {
        let words = self.phys.phys_to_virt(frame.start_address()).cast::<u64>();
        for index in 0..PAGE / 8 {
            // SAFETY: a whole frame of RAM through the physical map, no longer used
            // by its owner (the caller's contract).
            unsafe { words.add(index).write_volatile(POISON) };
        }
    }
}

// SAFETY: every call is the kernel's allocator's, which upholds the contract. The
// only addition writes into frames the allocator still counts as allocated (checked
// under its lock, so none can be handed out meanwhile) while their owner returns
// them; a free the allocator would refuse for a frame that is free or not its own
// writes nothing. (A bulk free listing an allocated frame twice is refused after
// its frames were poisoned: only a buggy caller makes one.)
unsafe impl FrameSource for PoisoningFrames {
    fn alloc_frame(&self) -> Option<PhysFrame> {
        FrameSource::alloc_frame(self.frames)
    }

    fn alloc_frames(&self, out: &mut [PhysFrame]) -> usize {
        FrameSource::alloc_frames(self.frames, out)
    }

    fn alloc_frame_2m(&self) -> Option<PhysFrame<Size2MiB>> {
        FrameSource::alloc_frame_2m(self.frames)
    }

    unsafe fn free_frame(&self, frame: PhysFrame) -> Result<(), Error> {
        let poison_and_free = |allocator: &mut BitmapFrameAllocator<'_>| {
            if allocator.is_free(frame) == Ok(false) {
                // SAFETY: allocated, and its owner is returning it.
                unsafe { self.poison(frame) };
            }
            // SAFETY: forwarded from the caller.
            unsafe { allocator.free(frame) }
        };
        // SAFETY: the closure leaves this allocator in place.
        unsafe { self.frames.with_lock(poison_and_free) }
    }

    unsafe fn free_frames(&self, frames: &[PhysFrame]) -> Result<(), Error> {
        let poison_and_free = |allocator: &mut BitmapFrameAllocator<'_>| {
            if frames
                .iter()
                .all(|&frame| allocator.is_free(frame) == Ok(false))
            {
                for &frame in frames {
                    // SAFETY: allocated, and its owner is returning it.
                    unsafe { self.poison(frame) };
                }
            }
            // SAFETY: forwarded from the caller.
            unsafe { allocator.free_bulk(frames) }
        };
        // SAFETY: the closure leaves this allocator in place.
        unsafe { self.frames.with_lock(poison_and_free) }
    }

    fn manages(&self, first: PhysFrame, count: u64) -> bool {
        FrameSource::manages(self.frames, first, count)
    }
}

/// A manager of the check's own over [`PoisoningFrames`].
pub type PoisonedManager<T> = Vmalloc<PoisoningFrames, OffsetPhysMemory, T>;

/// What the reading CPUs read from an area's page while CPU 0 freed and purged it.
#[derive(Clone, Copy, Default)]
struct Reads {
    /// The area's own data (before the purge, through the cached translation).
    old: u64,
    poison: u64,
    /// Anything else.
    other: u64,
    /// Reads that faulted.
    faults: u64,
    /// Reads started after CPU 0's purge returned.
    after_purge: u64,
}

impl Reads {
    fn add(&mut self, other: &Reads) {
        self.old += other.old;
        self.poison += other.poison;
        self.other += other.other;
        self.faults += other.faults;
        self.after_purge += other.after_purge;
    }
}

/// Reads each reading CPU makes at least after the purge returned, so a stale
/// translation has every chance to show.
const READS_AFTER_PURGE: u64 = 2000;
/// Spins CPU 0 waits for those reads before it calls the round failed.
const WAIT_SPINS: u64 = 200_000_000;
/// CPUs the check follows (the kernel boots fewer).
const CPUS: usize = 8;

/// Every other CPU reads a page of a fresh area again and again (each TLB holds the
/// translation); CPU 0 `vfree`s and purges the area, which poisons its frame, and
/// stops them once each has read [`READS_AFTER_PURGE`] times after the purge.
fn reads_while_freed<T: TlbFlush + Sync>(vm: &PoisonedManager<T>) -> Result<Reads, &'static str> {
    let area = vm.vmalloc(PAGE).map_err(|_| "vmalloc failed")?.as_ptr();
    let words = area.cast::<u64>();
    for index in 0..PAGE / 8 {
        // SAFETY: the live one-page area.
        unsafe { words.add(index).write_volatile(OLD_DATA) };
    }
    let at = VirtAddr::from_ptr(area);
    let readers = smp::online()
        .iter()
        .filter(|&cpu| cpu != 0 && cpu < CPUS)
        .count();
    let cached = AtomicUsize::new(0);
    let purged = AtomicBool::new(false);
    let stop = AtomicBool::new(false);
    let after_purge = [const { AtomicU64::new(0) }; CPUS];
    let reads = spin::Mutex::new(Reads::default());
    let error = spin::Mutex::new(Ok(()));
    on_each_cpu(&|cpu| match cpu {
        0 => {
            while cached.load(Ordering::Acquire) < readers {
                core::hint::spin_loop();
            }
            // SAFETY: the area is this check's; the other CPUs only probe it, which
            // is harmless after the free.
            let freed = unsafe { vm.vfree(at.as_mut_ptr()) };
            vm.purge();
            purged.store(true, Ordering::Release);
            let read_enough = || {
                (1..CPUS).all(|reader| {
                    !smp::online().contains(reader)
                        || after_purge[reader].load(Ordering::Acquire) >= READS_AFTER_PURGE
                })
            };
            let mut spins = 0;
            while !read_enough() && spins < WAIT_SPINS {
                spins += 1;
                core::hint::spin_loop();
            }
            stop.store(true, Ordering::Release);
            if freed.is_err() {
                *error.lock() = Err("vfree failed");
            } else if spins == WAIT_SPINS {
                *error.lock() = Err("a CPU stopped reading after the purge");
            }
        }
        reader if reader < CPUS => {
            let mut seen = Reads::default();
            loop {
                let late = purged.load(Ordering::Acquire);
                // SAFETY: an aligned address in the region of a manager whose frames
                // are RAM; a read is harmless whatever it reaches, a fault recovered.
                match unsafe { probe_read(at) } {
                    Ok(OLD_DATA) => seen.old += 1,
                    Ok(POISON) => seen.poison += 1,
                    Ok(_) => seen.other += 1,
                    Err(_) => seen.faults += 1,
                }
                if seen.old + seen.poison + seen.other + seen.faults == 1 {
                    cached.fetch_add(1, Ordering::Release);
                }
                if late {
                    seen.after_purge += 1;
                    after_purge[reader].store(seen.after_purge, Ordering::Release);
                }
                if stop.load(Ordering::Acquire) {
                    break;
                }
            }
            reads.lock().add(&seen);
        }
        _ => {}
    });
    error.into_inner()?;
    let reads = reads.into_inner();
    ensure(readers > 0, "no other CPU to read")?;
    ensure(reads.old > 0, "no CPU read the live area")?;
    Ok(reads)
}

/// Runs `rounds` of [`reads_while_freed`] on a manager over [`PoisoningFrames`] in
/// `slot` with the flush `tlb`, stopping early once a CPU read the poison; returns
/// the reads of all rounds added up. The manager gives every frame back when dropped.
fn poison_rounds<T: TlbFlush + Sync>(
    ctx: &Ctx,
    slot: SpareSlot,
    cpu_caches: bool,
    tlb: T,
    rounds: usize,
) -> Result<Reads, &'static str> {
    let free_before = mm::frames().stats().free;
    // SAFETY: the region's top-level slot is empty and no address space copies it;
    // the poisoning source hands out the kernel allocator's frames, RAM the physical
    // map reaches; `tlb` is what the caller tests (a local-only one on purpose).
    let vm = unsafe {
        Vmalloc::new(
            spare_region(slot, cpu_caches),
            ctx.pml4,
            ctx.phys,
            PoisoningFrames::new(ctx.phys),
            tlb,
        )
    }
    .map_err(|_| "a manager over the poisoning frame source could not be made")?;
    let mut total = Reads::default();
    for _ in 0..rounds {
        let reads = match reads_while_freed(&vm) {
            Ok(reads) => reads,
            Err(why) => {
                drop(vm);
                return Err(why);
            }
        };
        total.add(&reads);
        if total.poison > 0 {
            break;
        }
    }
    drop(vm);
    ensure(
        mm::frames().stats().free == free_before,
        "the manager over the poisoning frame source did not give its frames back",
    )?;
    Ok(total)
}

/// With the shootdown, every other CPU reading a page of an area while CPU 0 frees
/// and purges it reads the area's data, then faults; never the poison its frame holds from
/// the moment it is back in the frame allocator. Without and with the per-CPU caches.
pub fn smp_freed_frame_poison_unseen(ctx: &mut Ctx) -> Outcome {
    let ipis = smp::TLB.stats().ipis;
    for (slot, cpu_caches) in [
        (SpareSlot::PoisonShootdown, false),
        (SpareSlot::PoisonShootdownCpuCaches, true),
    ] {
        let reads = poison_rounds(ctx, slot, cpu_caches, &smp::TLB, 4)?;
        ensure(reads.poison == 0, "a CPU read the poison of a freed frame")?;
        ensure(reads.other == 0, "a CPU read neither the data nor a fault")?;
        ensure(
            reads.faults > 0,
            "no CPU faulted after the purge: the translations survived",
        )?;
    }
    ensure(smp::TLB.stats().ipis > ipis, "no IPI was sent")
}

/// The negative control: the same rounds with a flush that reaches only CPU 0, and
/// the other CPUs read the poison through the translations they kept. Without and with the
/// per-CPU caches.
pub fn smp_poison_seen_with_local_only_flush(ctx: &mut Ctx) -> Outcome {
    for (slot, cpu_caches) in [
        (SpareSlot::PoisonLocalOnly, false),
        (SpareSlot::PoisonLocalOnlyCpuCaches, true),
    ] {
        // SAFETY: ring 0 with paging on; a local-only flush on purpose.
        let local = unsafe { InvlpgFlush::new() };
        let reads = poison_rounds(ctx, slot, cpu_caches, local, 8)?;
        ensure(
            reads.poison > 0,
            "with a local-only flush no CPU ever read the poison",
        )?;
    }
    Ok(())
}
