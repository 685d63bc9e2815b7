//! Checks with every CPU running: the shootdown on real (emulated) per-CPU TLBs.
//!
//! Under multi-threaded TCG each vCPU keeps its own TLB, and only its own `invlpg` or
//! CR3 write empties it, as on hardware; so a translation another CPU cached survives
//! a flush that does not reach it, and `smp_local_only_flush_is_caught` shows that the
//! stale-translation check sees it.

use super::library::{conserves_frames, random_steps};
use super::{Ctx, SpareSlot, ensure, spare_region};
use crate::fault::probe_read;
use crate::mm;
use crate::smp::{self, MAX_CPUS, on_each_cpu};
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use vmalloc::tlb::{InvlpgFlush, TlbFlush};
use vmalloc::vmalloc::Vmalloc;
use vmalloc::{OffsetPhysMemory, PhysMemory};
use x86_64::VirtAddr;
use x86_64::instructions::interrupts;
use x86_64::structures::paging::PhysFrame;

type Outcome = Result<(), &'static str>;

const PAGE: usize = 4096;
/// What the frame holds once it has a new owner.
const NEW_DATA: u64 = u64::from_le_bytes(*b"NEWDATA!");
const OLD_DATA: u64 = u64::from_le_bytes(*b"OLD_DATA");

/// The first failure any CPU reported.
struct FirstError(spin::Mutex<Outcome>);

impl FirstError {
    const fn new() -> Self {
        Self(spin::Mutex::new(Ok(())))
    }

    fn report(&self, outcome: Outcome) {
        let mut first = self.0.lock();
        if first.is_ok() {
            *first = outcome;
        }
    }

    fn get(&self) -> Outcome {
        *self.0.lock()
    }
}

/// Every CPU the command line asked for is online, and each ran work with its own
/// index and its own APIC ID.
pub fn smp_cpus_online(ctx: &mut Ctx) -> Outcome {
    let asked: usize = ctx
        .boot
        .cmdline_value("cpus")
        .and_then(|n| n.parse().ok())
        .unwrap_or(1);
    let online = smp::online();
    ensure(online.len() == asked, "not every CPU asked for is online")?;
    ensure(asked >= 2, "the SMP checks need cpus=2 or more")?;
    let ran = AtomicU64::new(0);
    let apic_ids = AtomicU64::new(0);
    on_each_cpu(&|cpu| {
        ran.fetch_or(1 << smp::cpu_index(), Ordering::Relaxed);
        if crate::lapic::id() == smp::apic_id(cpu) {
            apic_ids.fetch_or(1 << crate::lapic::id(), Ordering::Relaxed);
        }
    });
    ensure(
        ran.load(Ordering::Relaxed) == online.bits(),
        "not every online CPU ran the work as itself",
    )?;
    ensure(
        apic_ids.load(Ordering::Relaxed).count_ones() as usize == asked,
        "the CPUs' APIC IDs are not distinct or not the recorded ones",
    )
}

/// Every CPU runs random vmalloc/vfree/vmap/vunmap/vrealloc/purge steps at once, each
/// checking its areas' contents before it frees them; then every frame is back.
pub fn smp_stress(_ctx: &mut Ctx) -> Outcome {
    let ipis = smp::TLB.stats().ipis;
    conserves_frames(|| {
        let error = FirstError::new();
        on_each_cpu(&|cpu| error.report(random_steps(0x9e37_79b9 ^ cpu as u64, 1500)));
        error.get()
    })?;
    ensure(
        smp::TLB.stats().ipis > ipis,
        "no CPU was shot at during the run",
    )
}

/// Every CPU but CPU 0 caches a translation of an area's page; CPU 0 frees the area,
/// purges, takes the frame back and writes new contents into it; every other CPU
/// reads the old address again. Returns what such a read saw: `None` if every one
/// faulted, else the value one of them read (the new owner's data through a stale
/// translation), so a shootdown that misses any one CPU shows.
fn stale_read_after_reuse<T: TlbFlush + Sync>(
    vm: &Vmalloc<&'static vmalloc::frame::LockedFrameAllocator<'static>, OffsetPhysMemory, T>,
    phys: OffsetPhysMemory,
) -> Result<Option<u64>, &'static str> {
    let old = VirtAddr::from_ptr(vm.vmalloc(PAGE).map_err(|_| "vmalloc failed")?.as_ptr());
    // SAFETY: the first word of the page just allocated.
    unsafe { old.as_mut_ptr::<u64>().write_volatile(OLD_DATA) };
    let readers = smp::online().without(0);
    let cached = AtomicUsize::new(0);
    let reused = AtomicBool::new(false);
    // What each reader's second read saw (`Some(None)`: a fault).
    let seen: [spin::Mutex<Option<Option<u64>>>; MAX_CPUS] =
        [const { spin::Mutex::new(None) }; MAX_CPUS];
    let error = FirstError::new();
    let reuse = || -> Result<PhysFrame, &'static str> {
        let frame = vm
            .vmalloc_to_frame(old)
            .map_err(|_| "vmalloc_to_frame failed")?;
        // SAFETY: the check made this area and does not use it again.
        unsafe { vm.vfree(old.as_mut_ptr()) }.map_err(|_| "vfree failed")?;
        vm.purge();
        ensure(
            mm::frames().alloc_from(frame) == Some(frame),
            "the purged frame did not come back",
        )?;
        // SAFETY: the frame is ours again; its first word, through the physical map.
        unsafe {
            phys.phys_to_virt(frame.start_address())
                .cast::<u64>()
                .write_volatile(NEW_DATA)
        };
        Ok(frame)
    };
    let frame = spin::Mutex::new(None);
    on_each_cpu(&|cpu| {
        if cpu == 0 {
            while cached.load(Ordering::Acquire) < readers.len() {
                core::hint::spin_loop();
            }
            match reuse() {
                Ok(reused) => *frame.lock() = Some(reused),
                Err(why) => error.report(Err(why)),
            }
            reused.store(true, Ordering::Release);
            return;
        }
        // SAFETY: a live vmalloc page, aligned.
        let first = unsafe { probe_read(old) };
        if first != Ok(OLD_DATA) {
            error.report(Err("a CPU could not read the live area"));
        }
        cached.fetch_add(1, Ordering::AcqRel);
        // Interrupts are on: the shootdown, if any, is taken here.
        while !reused.load(Ordering::Acquire) {
            core::hint::spin_loop();
        }
        // SAFETY: an aligned address in the vmalloc region; nothing else is mapped
        // there, so a read is harmless whatever it finds.
        let again = unsafe { probe_read(old) }.ok();
        if let Some(slot) = seen.get(cpu) {
            *slot.lock() = Some(again);
        }
    });
    if let Some(frame) = frame.lock().take() {
        // SAFETY: the check took this frame and no longer uses it (or a bad free, refused).
        unsafe { mm::frames().free(frame) }.map_err(|_| "the reused frame could not be freed")?;
    }
    error.get()?;
    let mut read = None;
    for cpu in readers.iter() {
        match seen.get(cpu).and_then(|slot| slot.lock().take()) {
            None => return Err("a CPU did not read"),
            Some(Some(value)) => read = read.or(Some(value)),
            Some(None) => {}
        }
    }
    Ok(read)
}

/// A translation the other CPUs cached is gone before CPU 0 hands its frame to a new
/// owner: each one's next read faults instead of reading the new owner's data.
pub fn smp_stale_translation_faults(ctx: &mut Ctx) -> Outcome {
    let taken = smp::TLB.stats().ipis;
    for _ in 0..8 {
        match stale_read_after_reuse(mm::vmalloc(), ctx.phys)? {
            None => {}
            Some(NEW_DATA) => return Err("a CPU read the new owner's data"),
            Some(_) => return Err("a CPU read something through a freed area"),
        }
    }
    ensure(smp::TLB.stats().ipis > taken, "no IPI was sent")
}

/// The negative control: the same steps through a manager whose flush reaches only
/// the calling CPU. The others keep their stale translations and read the new owner's data,
/// so the check above can fail. Its own region, top-level slots above the main
/// manager's, so it shares no page table with it. Run without and with the per-CPU
/// caches, whose blocks free and reuse areas on their own path.
pub fn smp_local_only_flush_is_caught(ctx: &mut Ctx) -> Outcome {
    local_only_flush_is_caught(ctx, false)?;
    local_only_flush_is_caught(ctx, true)
}

fn local_only_flush_is_caught(ctx: &mut Ctx, cpu_caches: bool) -> Outcome {
    // A slot of its own for each run: the CPUs keep stale translations (and cached
    // upper-level entries) of the one before.
    let slot = if cpu_caches {
        SpareSlot::LocalOnlyFlushCpuCaches
    } else {
        SpareSlot::LocalOnlyFlush
    };
    let config = spare_region(slot, cpu_caches);
    let free_before = mm::frames().stats().free;
    // SAFETY: ring 0 with paging on; a local-only flush on purpose.
    let local = unsafe { InvlpgFlush::new() };
    // SAFETY: the region's top-level slot is empty and no address space copies it; the
    // frame allocator's frames are RAM the physical map reaches.
    let vm = unsafe { Vmalloc::new(config, ctx.pml4, ctx.phys, mm::frames(), local) }
        .map_err(|_| "the local-only manager could not be made")?;
    let mut caught = false;
    for _ in 0..8 {
        match stale_read_after_reuse(&vm, ctx.phys)? {
            Some(NEW_DATA) => caught = true,
            Some(_) => return Err("a CPU read neither fault nor the new data"),
            None => {}
        }
        if caught {
            break;
        }
    }
    drop(vm);
    ensure(
        caught,
        "with a local-only flush no CPU read the new owner's data",
    )?;
    ensure(
        mm::frames().stats().free == free_before,
        "the local-only manager did not give its frames back",
    )
}

/// Every CPU purges at once, two of them with interrupts disabled (they take no IPI
/// and must serve their mailbox while they wait), and shoots down directly too:
/// nobody deadlocks, and every area is gone at the end.
pub fn smp_crossing_purges(_ctx: &mut Ctx) -> Outcome {
    let vm = mm::vmalloc();
    let before = smp::TLB.stats();
    let areas = vm.stats().areas;
    let error = FirstError::new();
    let rounds = 200;
    on_each_cpu(&|cpu| {
        let run = || {
            for round in 0..rounds {
                let Ok(ptr) = vm.vmalloc(3 * PAGE) else {
                    return error.report(Err("vmalloc failed"));
                };
                // SAFETY: the first word of a live area.
                unsafe { ptr.as_ptr().cast::<u64>().write_volatile(round) };
                // SAFETY: the check made this area and does not use it again.
                if unsafe { vm.vfree(ptr.as_ptr()) }.is_err() {
                    return error.report(Err("vfree failed"));
                }
                vm.purge();
                smp::TLB.flush_all();
            }
        };
        if cpu < 2 {
            interrupts::without_interrupts(run);
        } else {
            run();
        }
    });
    error.get()?;
    let after = smp::TLB.stats();
    let cpus = smp::online().len().min(MAX_CPUS) as u64;
    ensure(
        after.shootdowns - before.shootdowns >= cpus * rounds,
        "fewer shootdowns than the CPUs started",
    )?;
    ensure(vm.stats().areas == areas, "areas left behind")
}

/// Every CPU allocates and frees through the global heap at once (slab objects from
/// its own magazines, list blocks, a few vmalloc'd ones), each block filled with a
/// pattern of its CPU and checked before it is dropped; afterwards every slab object
/// is back.
pub fn smp_heap(_ctx: &mut Ctx) -> Outcome {
    let error = FirstError::new();
    let objects_before = mm::HEAP.stats().slab_objects;
    on_each_cpu(&|cpu| {
        let mut seed = 0x2545_f491_4f6c_dd1d_u64 ^ (cpu as u64) << 32;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut live: alloc::vec::Vec<alloc::vec::Vec<u64>> = alloc::vec::Vec::new();
        for step in 0..3000u64 {
            if live.len() < 64 && next() % 2 == 0 {
                let words = match next() % 64 {
                    0 => 4096,
                    1..=4 => 1024,
                    _ => 1 + next() % 64,
                } as usize;
                let stamp = (cpu as u64) << 56 | step;
                live.push(alloc::vec![stamp; words]);
            } else if !live.is_empty() {
                let index = (next() % live.len() as u64) as usize;
                let block = live.swap_remove(index);
                let stamp = block[0];
                if stamp >> 56 != cpu as u64 || block.iter().any(|&word| word != stamp) {
                    error.report(Err("a heap block changed under its owner"));
                }
            }
        }
    });
    error.get()?;
    mm::HEAP.shrink();
    ensure(
        mm::HEAP.stats().slab_objects == objects_before,
        "slab objects left behind",
    )
}
