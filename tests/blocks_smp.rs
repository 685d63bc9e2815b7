//! Small areas from per-CPU blocks on several CPUs: a frame is reused only after
//! every CPU dropped its translation, running out empties every CPU's cache before
//! failing, and CPUs freeing each other's areas give every frame back.

mod common;

use common::blocks::*;
use std::ptr::NonNull;
use std::sync::Mutex;
use vmalloc::vmalloc::VmOptions;
use vmalloc::vmalloc::blocks::MAX_BLOCK_PAGES;
use vmalloc::{Error, FrameSource, TlbFlush};
use vmalloc_sim::scenarios::manager_with as manager;
use vmalloc_sim::{DEADLOCK_LIMIT, Rng, SimFrames, SimMachine, watchdog};
use x86_64::structures::paging::PhysFrame;
use x86_64::{PhysAddr, VirtAddr};

/// CPU 1 caches a translation of a small area; CPU 0 frees it and makes small areas
/// until one gets its frame back, then writes there; CPU 1 reads the old address
/// again. Returns what it read, or `None` if it faulted.
fn stale_read_after_reuse<T: TlbFlush + Sync>(
    machine: &'static SimMachine,
    frames: &'static SimFrames,
    tlb: T,
) -> Option<[u8; 8]> {
    // SAFETY: the machine's page tables serve this manager alone, and its flush reaches every CPU that runs.
    let vm = unsafe { manager(machine, frames, tlb, cached()) };
    let old = addr(vm.vmalloc(PAGE).unwrap());
    // The area after it keeps the old range a hole of two pages (the page and its
    // guard), where the 2-page areas below never fit: the frame, not the address,
    // comes back.
    let pin = vm.vmalloc(PAGE).unwrap();
    // SAFETY: bytes the test owns: no live Rust value lives there.
    unsafe { machine.write(old, b"OLD-DATA") }.unwrap();
    let (seen, new) = machine.read_again_after(1, old, || {
        let frame = vm.vmalloc_to_frame(old).unwrap();
        // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
        unsafe { vm.vfree(old.as_mut_ptr()) }.unwrap();
        // Small areas come and go until one gets the frame back.
        let (new, page) = (0..10_000)
            .find_map(|_| {
                let new = vm.vmalloc(2 * PAGE).unwrap();
                assert_ne!(addr(new), old, "the range is not reused");
                let page = (0..2u64)
                    .map(|i| addr(new) + i * PAGE as u64)
                    .find(|&page| vm.vmalloc_to_frame(page).unwrap() == frame);
                if page.is_some() {
                    return Some((new, page));
                }
                // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
                unsafe { vm.vfree(new.as_ptr()) }.unwrap();
                None
            })
            .expect("the frame comes back");
        // SAFETY: bytes the test owns: no live Rust value lives there.
        unsafe { machine.write(page.unwrap(), b"NEWDATA!") }.unwrap();
        new
    });
    // SAFETY: nothing uses the areas after this; a pointer to no live area is refused.
    unsafe {
        vm.vfree(new.as_ptr()).unwrap();
        vm.vfree(pin.as_ptr()).unwrap();
    }
    seen
}

#[test]
fn a_small_areas_frame_is_reused_only_after_every_cpu_dropped_its_translation() {
    watchdog(
        "a_small_areas_frame_is_reused_only_after_every_cpu_dropped_its_translation",
        DEADLOCK_LIMIT,
        || {
            let (machine, frames, tlb) = smp_machine(2);
            let seen = stale_read_after_reuse(machine, frames, tlb);
            assert_eq!(seen, None, "CPU 1 faults on the freed address");
        },
    );
}

#[test]
fn a_local_only_flush_is_caught_reading_the_reused_frame_of_a_small_area() {
    watchdog(
        "a_local_only_flush_is_caught_reading_the_reused_frame_of_a_small_area",
        DEADLOCK_LIMIT,
        || {
            // The negative control: the same steps with a flush that only reaches CPU 0.
            let (machine, frames, _) = smp_machine(2);
            assert_eq!(
                stale_read_after_reuse(machine, frames, machine),
                Some(*b"NEWDATA!"),
                "without a shootdown CPU 1 reads the new owner's data"
            );
        },
    );
}

#[test]
fn running_out_empties_every_cpus_cache_before_failing() {
    watchdog(
        "running_out_empties_every_cpus_cache_before_failing",
        DEADLOCK_LIMIT,
        || {
            let (machine, frames, tlb) = smp_machine(4);
            // SAFETY: the machine's page tables serve this manager alone, and its flush reaches every CPU that runs.
            let vm = unsafe { manager(machine, frames, tlb, cached()) };
            // Each CPU leaves frames in its cache and freed areas on its lazy list.
            machine.on_every_cpu(|_| {
                let areas: Vec<_> = (0..8).map(|_| vm.vmalloc(PAGE).unwrap()).collect();
                // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
                areas
                    .iter()
                    .for_each(|ptr| unsafe { vm.vfree(ptr.as_ptr()) }.unwrap());
            });
            let stats = vm.stats();
            assert!(
                stats.cached_frames > 0 && stats.cached_pending_frames > 0,
                "{stats:?}"
            );
            let in_caches = stats.cached_frames + stats.cached_pending_frames;

            // Hold every free frame: only the caches have any.
            let mut held =
                vec![PhysFrame::containing_address(PhysAddr::zero()); frames.stats().free as usize];
            assert_eq!(frames.alloc_frames(&mut held), held.len());
            // A labelled area takes the locked path, which finds no frame, empties every
            // CPU's cache, and succeeds with their frames.
            let labelled = VmOptions {
                tag: "needs the caches",
                ..VmOptions::default()
            };
            let wanted = (in_caches as usize - 8) * PAGE;
            let ptr = vm.vmalloc_with(wanted, &labelled).unwrap();
            let stats = vm.stats();
            assert_eq!(
                (stats.cached_frames, stats.cached_pending_frames),
                (0, 0),
                "{stats:?}"
            );
            // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
            unsafe { vm.vfree(ptr.as_ptr()) }.unwrap();
            vm.purge();

            // With every cache empty, a request too large fails and changes nothing.
            vm.drain_cpu_caches();
            let before = (vm.stats(), frames.stats().free);
            assert_eq!(
                vm.vmalloc_with(4 * wanted, &labelled),
                Err(Error::OutOfFrames)
            );
            assert_eq!((vm.stats(), frames.stats().free), before);
            // SAFETY: frames the test took and no longer uses (or a bad free, refused).
            unsafe { frames.free_frames(&held) }.unwrap();
            assert_frames_conserved(&vm.stats(), frames);
        },
    );
}

#[test]
fn four_cpus_free_each_others_small_areas_and_every_frame_comes_back() {
    watchdog(
        "four_cpus_free_each_others_small_areas_and_every_frame_comes_back",
        DEADLOCK_LIMIT,
        || {
            let (machine, frames, tlb) = smp_machine(4);
            let start = frames.stats().free;
            // SAFETY: the machine's page tables serve this manager alone, and its flush reaches every CPU that runs.
            let vm = unsafe { manager(machine, frames, tlb, cached()) };
            let shared: Mutex<Vec<(usize, usize, u8)>> = Mutex::new(Vec::new());
            machine.on_every_cpu(|cpu| {
                let mut rng = Rng::new(cpu.index() as u64 + 11);
                for round in 0..400usize {
                    let tag = (cpu.index() * 64 + round % 64) as u8;
                    if rng.below(2) == 0 {
                        let pages = 1 + rng.below(MAX_BLOCK_PAGES) as usize;
                        let ptr = vm.vmalloc(pages * PAGE).unwrap();
                        for page in 0..pages {
                            // SAFETY: bytes the test owns: no live Rust value lives there.
                            unsafe { cpu.write(addr(ptr) + (page * PAGE) as u64, &[tag; 16]) }
                                .unwrap();
                        }
                        shared
                            .lock()
                            .unwrap()
                            .push((ptr.as_ptr() as usize, pages, tag));
                    } else {
                        let taken = {
                            let mut shared = shared.lock().unwrap();
                            let len = shared.len() as u64;
                            (len > 0).then(|| shared.swap_remove(rng.below(len) as usize))
                        };
                        // Often another CPU's area, in another CPU's block.
                        if let Some((ptr, pages, tag)) = taken {
                            let ptr = NonNull::new(ptr as *mut u8).unwrap();
                            for page in 0..pages {
                                let mut back = [0; 16];
                                cpu.read(addr(ptr) + (page * PAGE) as u64, &mut back)
                                    .unwrap();
                                assert_eq!(back, [tag; 16], "no other area shares its frames");
                            }
                            // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
                            unsafe { vm.vfree(ptr.as_ptr()) }.unwrap();
                        }
                    }
                }
            });
            let left: Vec<_> = shared.into_inner().unwrap();
            let stats = vm.stats();
            assert_eq!(stats.block_areas, left.len() as u64);
            assert_frames_conserved(&stats, frames);
            for &(ptr, ..) in &left[..left.len() / 2] {
                // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
                unsafe { vm.vfree(ptr as *mut u8) }.unwrap();
            }
            vm.purge();
            assert_eq!(vm.stats().cached_pending_frames, 0);
            // The rest leak into the manager's teardown, which gives them back too.
            drop(vm);
            assert_eq!(frames.stats().free, start, "every frame is back");
            assert!(tlb.stats().ipis > 0, "the CPUs were shot at");
        },
    );
}

#[test]
fn a_shrinking_vrealloc_returns_after_every_cpu_dropped_the_pages_for_block_and_tree_areas() {
    watchdog("shrinking vrealloc", DEADLOCK_LIMIT, shrink_on_two_cpus);
}

fn shrink_on_two_cpus() {
    let (machine, frames, tlb) = smp_machine(2);
    // SAFETY: the machine's page tables serve this manager alone, and its flush reaches every CPU that runs.
    let vm = unsafe { manager(machine, frames, tlb, cached()) };
    for pages in [8, 24] {
        // The reader leaves the online set when it is done: back for this round.
        machine.cpu(1).go_online();
        let ptr = area_of(&vm, pages);
        let last = addr(ptr) + ((pages - 1) * PAGE) as u64;
        // SAFETY: bytes the test owns: no live Rust value lives there.
        unsafe { machine.write(last, b"old page") }.unwrap();
        // CPU 1 caches the last page; CPU 0 shrinks the area to two pages.
        let (seen, shrunk) = machine.read_again_after(1, last, || {
            // SAFETY: nothing keeps a reference into the dropped pages.
            unsafe { vm.vrealloc(ptr.as_ptr(), 2 * PAGE) }.unwrap()
        });
        assert_eq!(shrunk, ptr, "{pages} pages: shrunk in place");
        assert_eq!(
            seen, None,
            "{pages} pages: CPU 1 dropped the page before it returned"
        );
        let mut back = [0; 8];
        assert!(
            machine.read(last, &mut back).is_err(),
            "{pages} pages: so did CPU 0"
        );
        let mut kept = [0; 8];
        // SAFETY: bytes the test owns: no live Rust value lives there.
        unsafe { machine.write(addr(ptr) + PAGE as u64, b"page one") }.unwrap();
        machine.read(addr(ptr) + PAGE as u64, &mut kept).unwrap();
        assert_eq!(&kept, b"page one");
        // SAFETY: not used again.
        unsafe { vm.vfree(ptr.as_ptr()) }.unwrap();
    }
    vm.purge();
    assert_eq!(vm.stats().data_frames, 0);
    assert_frames_conserved(&vm.stats(), frames);
}

#[test]
fn four_cpus_stress_small_areas_allocating_freeing_resizing_and_purging_at_once() {
    watchdog("small-area stress", DEADLOCK_LIMIT, || {
        let (machine, frames, tlb) = smp_machine(4);
        // SAFETY: the machine's page tables serve this manager alone, and its flush reaches every CPU that runs.
        let vm = unsafe { manager(machine, frames, tlb, cached()) };
        let shared: Mutex<Vec<(usize, usize, u8)>> = Mutex::new(Vec::new());
        machine.on_every_cpu(|cpu| {
            let mut rng = Rng::new(cpu.index() as u64 * 7 + 3);
            let mut mine: Vec<(usize, usize, u8)> = Vec::new();
            for round in 0..1500usize {
                let stamp = (cpu.index() * 61 + round) as u8 | 1;
                match rng.below(8) {
                    0..=2 => {
                        let pages = 1 + rng.below(6) as usize;
                        let ptr = vm.vmalloc(pages * PAGE).unwrap();
                        for page in 0..pages {
                            // SAFETY: bytes the test owns: no live Rust value lives there.
                            unsafe { cpu.write(addr(ptr) + (page * PAGE) as u64, &[stamp; 8]) }
                                .unwrap();
                        }
                        mine.push((ptr.as_ptr() as usize, pages, stamp));
                    }
                    3 | 4 if !mine.is_empty() => {
                        let (ptr, pages, stamp) =
                            mine.swap_remove(rng.below(mine.len() as u64) as usize);
                        check(cpu, ptr, pages, stamp);
                        // Half of them are freed by another CPU.
                        if rng.below(2) == 0 {
                            shared.lock().unwrap().push((ptr, pages, stamp));
                        } else {
                            // SAFETY: this CPU's area, checked and not used again.
                            unsafe { vm.vfree(ptr as *mut u8) }.unwrap();
                        }
                    }
                    5 if !mine.is_empty() => {
                        let index = rng.below(mine.len() as u64) as usize;
                        let (ptr, pages, stamp) = mine[index];
                        check(cpu, ptr, pages, stamp);
                        let new_pages = 1 + rng.below(8) as usize;
                        // SAFETY: the old pointer is replaced by the one returned.
                        let moved =
                            unsafe { vm.vrealloc(ptr as *mut u8, new_pages * PAGE) }.unwrap();
                        let kept = pages.min(new_pages);
                        check(cpu, moved.as_ptr() as usize, kept, stamp);
                        for page in kept..new_pages {
                            // SAFETY: bytes the test owns: no live Rust value lives there.
                            unsafe { cpu.write(addr(moved) + (page * PAGE) as u64, &[stamp; 8]) }
                                .unwrap();
                        }
                        mine[index] = (moved.as_ptr() as usize, new_pages, stamp);
                    }
                    6 => {
                        let theirs = shared.lock().unwrap().pop();
                        if let Some((ptr, pages, stamp)) = theirs {
                            check(cpu, ptr, pages, stamp);
                            // SAFETY: handed over by the CPU that made it, not used again.
                            unsafe { vm.vfree(ptr as *mut u8) }.unwrap();
                        }
                    }
                    7 => vm.purge(),
                    _ => {}
                }
            }
            for (ptr, ..) in mine {
                // SAFETY: as above.
                unsafe { vm.vfree(ptr as *mut u8) }.unwrap();
            }
        });
        for (ptr, ..) in shared.into_inner().unwrap() {
            // SAFETY: as above.
            unsafe { vm.vfree(ptr as *mut u8) }.unwrap();
        }
        vm.purge();
        let stats = vm.stats();
        assert_eq!((stats.block_areas, stats.data_frames), (0, 0));
        assert_frames_conserved(&stats, frames);
    });
}

/// The stamp on every page of the area at `ptr`, as its maker wrote it.
fn check(cpu: vmalloc_sim::SimCpu<'_>, ptr: usize, pages: usize, stamp: u8) {
    for page in 0..pages {
        let mut back = [0; 8];
        cpu.read(VirtAddr::new((ptr + page * PAGE) as u64), &mut back)
            .unwrap();
        assert_eq!(back, [stamp; 8], "page {page} of {ptr:#x}");
    }
}

/// The lazy list flushes in halves without waiting (a half's shootdown is sent, and
/// finished when the next half is due): while CPU 1 takes no interrupt and still
/// caches the translation of a freed area, CPU 0 goes on making and freeing small
/// areas, and none of them gets that frame before CPU 1 dropped the translation.
#[test]
fn a_frame_in_a_flushing_half_of_the_lazy_list_waits_for_every_cpu() {
    watchdog(
        "a_frame_in_a_flushing_half_of_the_lazy_list_waits_for_every_cpu",
        DEADLOCK_LIMIT,
        || {
            let (machine, frames, tlb) = smp_machine(2);
            // SAFETY: the machine's page tables serve this manager alone, and its flush reaches every CPU that runs.
            let vm = unsafe { manager(machine, frames, tlb, cached()) };
            let old = addr(vm.vmalloc(PAGE).unwrap());
            let frame = vm.vmalloc_to_frame(old).unwrap();
            let cached_by_1 = std::sync::Barrier::new(2);
            let (mut reused, mut sent_before_served) = (0, false);
            std::thread::scope(|scope| {
                scope.spawn(|| {
                    let cpu = machine.cpu(1);
                    cpu.enter();
                    cpu.go_online();
                    let _offline = cpu.offline_when_dropped();
                    let mut word = [0; 8];
                    cpu.read(old, &mut word).unwrap();
                    cached_by_1.wait();
                    // No interrupt taken for a while: the IPIs CPU 0 sends meanwhile
                    // wait, and so must the frames they cover.
                    std::thread::sleep(std::time::Duration::from_millis(200));
                    while cpu.cached(old).is_some() {
                        cpu.poll();
                        std::thread::yield_now();
                    }
                });
                cached_by_1.wait();
                // SAFETY: CPU 1 only reads the stale translation, never through it.
                unsafe { vm.vfree(old.as_mut_ptr()) }.unwrap();
                for _ in 0..400 {
                    let new = vm.vmalloc(PAGE).unwrap();
                    if vm.vmalloc_to_frame(addr(new)).unwrap() == frame {
                        reused += 1;
                        assert!(
                            machine.cpu(1).cached(old).is_none(),
                            "the frame came back while CPU 1 still reached it"
                        );
                    }
                    sent_before_served |=
                        machine.ipis_sent() > 0 && machine.cpu(1).cached(old).is_some();
                    // SAFETY: nothing uses the area after this.
                    unsafe { vm.vfree(new.as_ptr()) }.unwrap();
                }
            });
            assert!(
                sent_before_served,
                "a shootdown was in flight while CPU 1 cached the page"
            );
            assert!(reused > 0, "the frame came back once CPU 1 flushed");
        },
    );
}

/// Dropped, a manager gives back the frames every CPU's cache holds, also an online
/// CPU's that its flush policy cannot run work on (a drain leaves that CPU's cache
/// to its next call, which a dropped manager never gets: 30 frames leaked).
#[test]
fn a_dropped_manager_gives_back_what_another_online_cpu_caches() {
    let machine: &'static SimMachine = Box::leak(Box::new(SimMachine::new(
        vmalloc_sim::SimConfig::new(64 << 20)
            .with_cpus(2)
            .with_scatter_seed(9),
    )));
    let frames: &'static SimFrames = Box::leak(Box::new(machine.frames()));
    let before = frames.stats().free;
    let config = vmalloc::VmallocConfig {
        cpu_caches: true,
        ..vmalloc::VmallocConfig::default()
    };
    // SAFETY: the machine's page tables serve this manager alone; CPU 1 touches no
    // vmalloc memory, so the calling CPU's flush is every flush there is to make.
    let vm =
        unsafe { vmalloc::Vmalloc::new(config, machine.root(), machine.phys(), frames, machine) };
    let vm = vm.unwrap();
    machine.cpu(1).run(|_| {
        let freed = vm.vmalloc(4096).unwrap();
        let _live = vm.vmalloc(2 * 4096).unwrap();
        // SAFETY: the test's area, not used afterwards.
        unsafe { vm.vfree(freed.as_ptr()) }.unwrap();
    });
    assert!(machine.cpu(1).is_online());
    assert!(vm.stats().cached_frames > 0, "CPU 1's cache holds frames");
    drop(vm);
    assert_eq!(frames.stats().free, before, "every frame the manager took");
}

/// The shootdown, with CPU 1 slow (descheduled, say) right after the other CPUs
/// handed it their caches to drain.
struct SlowOn1 {
    inner: &'static Tlb,
    machine: &'static SimMachine,
    handed: &'static std::sync::atomic::AtomicBool,
}

impl TlbFlush for SlowOn1 {
    fn flush_page(&self, page: x86_64::structures::paging::Page) {
        self.inner.flush_page(page)
    }
    fn flush_range(&self, range: x86_64::structures::paging::page::PageRange) {
        self.inner.flush_range(range)
    }
    fn flush_ranges(&self, ranges: &[x86_64::structures::paging::page::PageRange]) {
        self.inner.flush_ranges(ranges)
    }
    fn flush_all(&self) {
        self.inner.flush_all()
    }
    fn start_flush(
        &self,
        batch: vmalloc::tlb::FlushBatch<'_>,
        ticket: &mut vmalloc::tlb::FlushTicket,
    ) {
        self.inner.start_flush(batch, ticket)
    }
    fn finish_flush(&self, ticket: &mut vmalloc::tlb::FlushTicket) {
        self.inner.finish_flush(ticket)
    }
    fn ceiling(&self) -> u64 {
        self.inner.ceiling()
    }
    fn relax(&self) {
        self.inner.relax()
    }
    fn cpus(&self) -> Option<&dyn vmalloc::smp::Cpus> {
        TlbFlush::cpus(self.inner)
    }
    fn call_on_other_cpus(&self, work: &(dyn Fn() + Sync)) -> bool {
        let reached = self.inner.call_on_other_cpus(work);
        if self.machine.current_cpu() == 1 {
            self.handed
                .store(true, std::sync::atomic::Ordering::Release);
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        reached
    }
}

/// `purge` on CPU 0 while CPU 1's `drain_cpu_caches` holds CPU 0's cache (handed over
/// to be drained) returns only once CPU 0's own lazily freed area is flushed and its
/// frame back: it returned at once, the page still readable on CPU 0 and its frame
/// still waiting.
#[test]
fn purge_waits_for_its_own_cache_held_by_another_cpus_drain() {
    use std::sync::atomic::{AtomicBool, Ordering};
    watchdog("purge while another CPU drains", DEADLOCK_LIMIT, || {
        let (machine, frames, tlb) = smp_machine(2);
        let handed: &'static AtomicBool = Box::leak(Box::new(AtomicBool::new(false)));
        let slow = SlowOn1 {
            inner: tlb,
            machine,
            handed,
        };
        // SAFETY: the machine's page tables serve this manager alone; the flush is a
        // shootdown over its CPUs.
        let vm = unsafe { manager(machine, frames, slow, cached()) };
        let ready = AtomicBool::new(false);
        let seen = Mutex::new(None);
        machine.on_every_cpu(|cpu| {
            if cpu.index() == 1 {
                while !ready.load(Ordering::Acquire) {
                    cpu.poll();
                }
                vm.drain_cpu_caches();
                return;
            }
            let area = vm.vmalloc(PAGE).unwrap();
            let at = addr(area);
            // SAFETY: the test's own area; CPU 0's TLB caches it.
            unsafe { cpu.write(at, b"STALE!!!") }.unwrap();
            // SAFETY: nothing uses the area after this.
            unsafe { vm.vfree(area.as_ptr()) }.unwrap();
            ready.store(true, Ordering::Release);
            // Serves CPU 1's call: CPU 0's cache goes to CPU 1.
            while !handed.load(Ordering::Acquire) {
                cpu.poll();
            }
            vm.purge();
            let stats = vm.stats();
            let mut back = [0u8; 8];
            let read = cpu.read(at, &mut back).map(|()| back);
            *seen.lock().unwrap() = Some((read.is_err(), stats.pending_purge_frames));
        });
        assert_eq!(
            seen.into_inner().unwrap(),
            Some((true, 0)),
            "(the freed page faults on CPU 0, frames waiting) after purge returned"
        );
    });
}

/// A manager over a 256 MiB region (its tree soon full) with the per-CPU caches.
fn small_region_manager(
    machine: &'static SimMachine,
    frames: &'static SimFrames,
    tlb: &'static Tlb,
) -> Manager<&'static Tlb> {
    let config = vmalloc::VmallocConfig {
        size: 256 << 20,
        ..cached()
    };
    // SAFETY: the machine's page tables serve this manager alone, and its flush
    // reaches every CPU that runs.
    unsafe { manager(machine, frames, tlb, config) }
}

/// Reserves all of the tree's space, in halving pieces.
fn fill_the_tree<T: TlbFlush>(vm: &Manager<T>) -> Vec<NonNull<u8>> {
    let mut reserved = Vec::new();
    let mut size = 128 << 20;
    while size >= PAGE {
        match vm.reserve(size, &VmOptions::default()) {
            Ok(area) => reserved.push(area),
            Err(_) => size /= 2,
        }
    }
    reserved
}

/// CPUs 1 and 2 each take a block for one small area and go offline; the tree's
/// space is then filled. A small area on CPU 0 still comes: running out of virtual
/// space empties every CPU's cache and tries again, as running out of frames does
/// (an offline CPU's block is taken back by claim), as Linux purges and retries.
#[test]
fn running_out_of_space_takes_blocks_back_from_other_cpus() {
    watchdog(
        "running_out_of_space_takes_blocks_back_from_other_cpus",
        DEADLOCK_LIMIT,
        || {
            let (machine, frames, tlb) = smp_machine(3);
            let vm = small_region_manager(machine, frames, tlb);
            let held = Mutex::new(Vec::new());
            machine.on_every_cpu(|cpu| {
                if cpu.index() != 0 {
                    held.lock().unwrap().push(addr(vm.vmalloc(PAGE).unwrap()));
                }
            });
            let reserved = fill_the_tree(&vm);
            let before = vm.stats();
            assert!(before.block_free_bytes > 0, "{before:?}");
            // An area the blocks do not serve fails and changes nothing: the caches
            // stay (no drain for a request they could not meet).
            let large = (MAX_BLOCK_PAGES as usize + 1) * PAGE;
            assert_eq!(vm.vmalloc(large), Err(Error::OutOfVirtualSpace));
            assert_eq!(vm.stats(), before);
            let area = vm.vmalloc(PAGE);
            assert!(area.is_ok(), "{area:?} with {before:?}");
            let held = held.into_inner().unwrap();
            let pointers = (area.into_iter().chain(reserved).map(|area| area.as_ptr()))
                .chain(held.iter().map(|at| at.as_mut_ptr()));
            // SAFETY: the test's own areas, not used again.
            pointers.for_each(|ptr| unsafe { vm.vfree(ptr) }.unwrap());
            vm.purge();
            assert_frames_conserved(&vm.stats(), frames);
        },
    );
}

/// Every block full of 15-page areas (CPU 1 offline) and the tree full: a 16-page
/// `vmalloc`, and growing one of the areas to 16 pages, fail with
/// `OutOfVirtualSpace` and change nothing: the frames the failed call stocked its
/// cache with go back to the allocator (they stayed in the cache: 32 frames fewer
/// in the allocator after each failed call).
#[test]
fn a_small_area_that_fails_for_space_keeps_no_frames() {
    watchdog(
        "a_small_area_that_fails_for_space_keeps_no_frames",
        DEADLOCK_LIMIT,
        || {
            let (machine, frames, tlb) = smp_machine(2);
            let vm = small_region_manager(machine, frames, tlb);
            machine.on_every_cpu(|_| {}); // CPU 1 offline from now on
            let mut areas = Vec::new();
            loop {
                let area = vm.vmalloc(15 * PAGE).unwrap();
                if !zone(&vm).contains(&(area.as_ptr() as u64)) {
                    // SAFETY: the test's own area, not used again.
                    unsafe { vm.vfree(area.as_ptr()) }.unwrap();
                    break;
                }
                areas.push(area);
            }
            let reserved = fill_the_tree(&vm);
            vm.drain_cpu_caches();
            let before = (vm.stats(), frames.stats().free);
            assert_eq!(vm.vmalloc(16 * PAGE), Err(Error::OutOfVirtualSpace));
            assert_eq!((vm.stats(), frames.stats().free), before, "vmalloc");
            // SAFETY: a live area of the test's; on error it stays live.
            let grown = unsafe { vm.vrealloc(areas[5].as_ptr(), 16 * PAGE) };
            assert_eq!(grown, Err(Error::OutOfVirtualSpace));
            assert_eq!((vm.stats(), frames.stats().free), before, "vrealloc");
            // SAFETY: the test's own areas, not used again.
            let pointers = areas.iter().chain(&reserved).map(|area| area.as_ptr());
            pointers.for_each(|ptr| unsafe { vm.vfree(ptr) }.unwrap());
            vm.purge();
            assert_frames_conserved(&vm.stats(), frames);
        },
    );
}

/// Takes every frame the allocator has left; the caller gives them back.
fn take_every_frame(frames: &SimFrames) -> Vec<PhysFrame> {
    let mut held = Vec::new();
    let mut batch = vec![PhysFrame::containing_address(PhysAddr::zero()); 4096];
    loop {
        let got = frames.alloc_frames(&mut batch);
        if got == 0 {
            return held;
        }
        held.extend_from_slice(&batch[..got]);
    }
}

/// Fills the zone's blocks with 1-page areas on the calling CPU (the first area
/// outside the zone is freed again) and returns them, in the order made.
fn fill_the_zone_with_pages(vm: &Manager<&'static Tlb>) -> Vec<NonNull<u8>> {
    let mut areas = Vec::new();
    loop {
        let area = vm.vmalloc(PAGE).unwrap();
        if !zone(vm).contains(&(area.as_ptr() as u64)) {
            // SAFETY: the test's own area, not used again.
            unsafe { vm.vfree(area.as_ptr()) }.unwrap();
            return areas;
        }
        areas.push(area);
    }
}

/// CPU 1 fills every block with 1-page areas, frees 60 of them (every other one of
/// its first block: 120 pages, less than the quarter from which a block nobody owns
/// is taken) and goes offline; with the tree full, a 1-page area on CPU 0 fits one
/// of those holes (the last try after the drain takes any block with room; it
/// failed with `OutOfVirtualSpace` and 60 holes free). On one CPU, the holes its own
/// block had when `purge` handed it back are found the same way.
#[test]
fn a_small_area_fits_a_hole_of_a_block_less_than_a_quarter_free() {
    watchdog(
        "a_small_area_fits_a_hole_of_a_block",
        DEADLOCK_LIMIT,
        || {
            for cpus in [2, 1] {
                let (machine, frames, tlb) = smp_machine(cpus);
                let vm = small_region_manager(machine, frames, tlb);
                let areas = Mutex::new(Vec::new());
                machine.on_every_cpu(|cpu| {
                    if cpu.index() != cpus - 1 {
                        return;
                    }
                    let mut mine = fill_the_zone_with_pages(&vm);
                    let freed: Vec<NonNull<u8>> = (0..60).map(|i| mine.remove(i)).collect();
                    // SAFETY: the test's own areas, not used again.
                    freed
                        .iter()
                        .for_each(|area| unsafe { vm.vfree(area.as_ptr()) }.unwrap());
                    areas
                        .lock()
                        .unwrap()
                        .extend(mine.iter().map(|area| addr(*area)));
                });
                vm.purge();
                let reserved = fill_the_tree(&vm);
                let before = vm.stats();
                assert!(
                    before.block_free_bytes >= 60 * 2 * PAGE as u64,
                    "{before:?}"
                );
                let area = vm.vmalloc(PAGE);
                assert!(area.is_ok(), "{cpus} CPUs: {area:?} with {before:?}");
                assert!(zone(&vm).contains(&(area.unwrap().as_ptr() as u64)));
                let all = areas.into_inner().unwrap();
                let pointers = (reserved.iter().chain(&area).map(|area| area.as_ptr()))
                    .chain(all.iter().map(|at| at.as_mut_ptr()));
                // SAFETY: the test's own areas, not used again.
                pointers.for_each(|ptr| unsafe { vm.vfree(ptr) }.unwrap());
                vm.purge();
                assert_frames_conserved(&vm.stats(), frames);
            }
        },
    );
}

/// With room in a block but no frame left and the tree full, a small area fails with
/// `OutOfFrames` (what ran out), not `OutOfVirtualSpace`, and changes nothing.
#[test]
fn a_small_area_with_room_in_a_block_but_no_frame_is_out_of_frames() {
    watchdog(
        "a_small_area_with_room_but_no_frame",
        DEADLOCK_LIMIT,
        || {
            let (machine, frames, tlb) = smp_machine(1);
            let vm = small_region_manager(machine, frames, tlb);
            let one = vm.vmalloc(PAGE).unwrap();
            let reserved = fill_the_tree(&vm);
            vm.drain_cpu_caches();
            let held = take_every_frame(frames);
            let before = vm.stats();
            assert!(before.block_free_bytes > 0, "{before:?}");
            let area = vm.vmalloc(PAGE);
            let after = vm.stats();
            // SAFETY: frames the test took and never used.
            unsafe { frames.free_frames(&held) }.unwrap();
            assert_eq!(area, Err(Error::OutOfFrames));
            assert_eq!(after, before);
            let pointers = reserved.iter().chain([&one]).map(|area| area.as_ptr());
            // SAFETY: the test's own areas, not used again.
            pointers.for_each(|ptr| unsafe { vm.vfree(ptr) }.unwrap());
            vm.purge();
            assert_frames_conserved(&vm.stats(), frames);
        },
    );
}

/// Block A is a quarter free, but only in 2-page holes; block B has one 4-page hole
/// and is less than a quarter free. With the tree full, a 2-page area lands in B: the
/// last try visits every block with room once before taking A again (it took A on
/// every round, A marked takeable again each time it went back: OutOfVirtualSpace
/// with 144 pages free).
#[test]
fn the_last_try_reaches_a_block_with_room_behind_a_fragmented_one_a_quarter_free() {
    watchdog(
        "the_last_try_reaches_a_block_with_room",
        DEADLOCK_LIMIT,
        || {
            let (machine, frames, tlb) = smp_machine(1);
            let vm = small_region_manager(machine, frames, tlb);
            let all = fill_the_zone_with_pages(&vm);
            let zone = zone(&vm);
            let block_of = |area: &NonNull<u8>| (area.as_ptr() as u64 - zone.start) / (2 << 20);
            let (a, b): (Vec<NonNull<u8>>, Vec<NonNull<u8>>) =
                all.iter().partition(|area| block_of(area) == 0);
            assert!(a.len() > 200 && b.len() > 200, "{} {}", a.len(), b.len());
            // A: 70 2-page holes (140 pages, more than a quarter), no run of 3 pages.
            let mut freed: Vec<NonNull<u8>> = a.iter().step_by(2).take(70).copied().collect();
            // B: one 4-page hole.
            freed.extend([b[10], b[11]]);
            // SAFETY: the test's own areas, not used again.
            freed
                .iter()
                .for_each(|area| unsafe { vm.vfree(area.as_ptr()) }.unwrap());
            vm.purge();
            let reserved = fill_the_tree(&vm);
            let before = vm.stats();
            let area = vm.vmalloc(2 * PAGE);
            assert!(area.is_ok(), "{area:?} with {before:?}");
            assert_eq!(block_of(area.as_ref().unwrap()), 1);
            let live = (all.iter().filter(|area| !freed.contains(area)))
                .chain(&reserved)
                .chain(&area);
            // SAFETY: the test's own areas, not used again.
            live.for_each(|area| unsafe { vm.vfree(area.as_ptr()) }.unwrap());
            vm.purge();
            assert_frames_conserved(&vm.stats(), frames);
        },
    );
}

/// CPU 1 frees its small areas (their frames wait in its cache) and goes offline.
/// With the tree full, room in a block and the allocator empty, a 1-page area on CPU
/// 0 comes from the frames CPU 1's cache held: running out of frames empties every
/// CPU's cache before failing, on the small-area path too (it failed with
/// OutOfFrames and 32 frames cached).
#[test]
fn a_small_area_out_of_frames_with_the_tree_full_empties_other_caches_first() {
    watchdog(
        "a_small_area_out_of_frames_empties_caches",
        DEADLOCK_LIMIT,
        || {
            let (machine, frames, tlb) = smp_machine(2);
            let vm = small_region_manager(machine, frames, tlb);
            let one = vm.vmalloc(PAGE).unwrap();
            let reserved = fill_the_tree(&vm);
            vm.drain_cpu_caches();
            machine.on_every_cpu(|cpu| {
                if cpu.index() == 1 {
                    let mine: Vec<_> = (0..8).map(|_| vm.vmalloc(PAGE).unwrap()).collect();
                    // SAFETY: the test's own areas, not used again.
                    mine.iter()
                        .for_each(|area| unsafe { vm.vfree(area.as_ptr()) }.unwrap());
                }
            });
            let held = take_every_frame(frames);
            let before = vm.stats();
            assert!(
                before.cached_frames + before.cached_pending_frames > 0,
                "{before:?}"
            );
            let area = vm.vmalloc(PAGE);
            // SAFETY: frames the test took and never used.
            unsafe { frames.free_frames(&held) }.unwrap();
            assert!(area.is_ok(), "{area:?} with {before:?}");
            let live = reserved.iter().chain([&one]).chain(&area);
            // SAFETY: the test's own areas, not used again.
            live.for_each(|area| unsafe { vm.vfree(area.as_ptr()) }.unwrap());
            vm.purge();
            assert_frames_conserved(&vm.stats(), frames);
        },
    );
}

/// Block 0 full, block 1 never made, the tree full and `keep` frames in the
/// allocator: a 1-page area makes block 1 when the frames allow (the cache's stock of
/// up to 32 frames took those its descriptor and leaf table need: OutOfVirtualSpace
/// up to 33 frames free), and says OutOfFrames, with nothing changed, when they do
/// not.
#[test]
fn a_small_area_makes_a_new_block_with_the_frames_its_cache_stocked() {
    watchdog("a_small_area_makes_a_new_block", DEADLOCK_LIMIT, || {
        for keep in [1, 8, 33] {
            let (machine, frames, tlb) = smp_machine(1);
            let vm = small_region_manager(machine, frames, tlb);
            let zone = zone(&vm);
            let areas: Vec<NonNull<u8>> = (0..256).map(|_| vm.vmalloc(PAGE).unwrap()).collect();
            let last = areas[255].as_ptr() as u64;
            assert!(last - zone.start < 2 << 20, "block 0 holds them all");
            let reserved = fill_the_tree(&vm);
            vm.drain_cpu_caches();
            let mut held = take_every_frame(frames);
            let back = held.split_off(held.len() - keep);
            // SAFETY: frames the test took and never used.
            unsafe { frames.free_frames(&back) }.unwrap();
            let before = (vm.stats(), frames.stats().free);
            let area = vm.vmalloc(PAGE);
            let after = (vm.stats(), frames.stats().free);
            // SAFETY: as above.
            unsafe { frames.free_frames(&held) }.unwrap();
            if keep == 1 {
                assert_eq!(area, Err(Error::OutOfFrames), "{keep} frames free");
                assert_eq!(after, before, "{keep} frames free");
            } else {
                let at = area.map(|area| area.as_ptr() as u64);
                assert!(
                    at.is_ok_and(|at| at - zone.start >= 2 << 20),
                    "{keep}: {at:x?}"
                );
            }
            let live = areas.iter().chain(&reserved).chain(&area);
            // SAFETY: the test's own areas, not used again.
            live.for_each(|area| unsafe { vm.vfree(area.as_ptr()) }.unwrap());
            vm.purge();
            assert_frames_conserved(&vm.stats(), frames);
        }
    });
}
