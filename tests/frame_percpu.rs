//! The frame allocator's per-CPU lists on the simulated machine's CPUs (host
//! threads): a frame freed on one CPU and again on another is refused, and of two
//! CPUs racing to free the same frames exactly one wins each; an interrupt handler
//! that allocates and frees frames at every interrupt point of an allocation or a
//! free corrupts nothing; a CPU that finds the bitmap dry takes the frames in other
//! CPUs' lists (online ones through work in their shootdown service, offline ones by
//! claiming them); four CPUs allocating, freeing each other's frames and running dry
//! never get one frame twice (each stamps its frames); every count stays exact.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Barrier, Mutex};
use vmalloc::Error;
use vmalloc::frame::{BitmapFrameAllocator, CPU_LIST_BATCH, CPU_LIST_FRAMES, LockedFrameAllocator};
use vmalloc::{FrameSource, Vmalloc, VmallocConfig};
use vmalloc_sim::{DEADLOCK_LIMIT, Rng, SimConfig, SimMachine, scenarios, watchdog};
use x86_64::structures::paging::PhysFrame;

type Frames = LockedFrameAllocator<'static>;

/// A machine with `cpus` CPUs and 16 MiB, a shootdown over it (each CPU's IPI
/// handler serves it), and a frame allocator over its memory with per-CPU lists,
/// drained through work on the other CPUs (built `with_shootdown`, as the QEMU
/// kernel builds it; `with_cpus` is covered by the unit tests).
fn rig(cpus: usize) -> (&'static SimMachine, &'static Frames) {
    let (machine, frames, _) = rig_with_tlb(cpus);
    (machine, frames)
}

/// [`rig`], and the shootdown.
fn rig_with_tlb(
    cpus: usize,
) -> (
    &'static SimMachine,
    &'static Frames,
    &'static scenarios::SmpTlb,
) {
    let (machine, _, tlb) = scenarios::smp_machine(SimConfig::new(16 << 20).with_cpus(cpus));
    let map = machine.memory_map().to_vec();
    let words = BitmapFrameAllocator::storage_words(map.iter().cloned());
    let storage: &'static mut [u64] = Box::leak(vec![0; words].into_boxed_slice());
    let bitmap = BitmapFrameAllocator::with_storage(map, storage).unwrap();
    let frames = LockedFrameAllocator::with_shootdown(bitmap, tlb);
    (machine, Box::leak(Box::new(frames)), tlb)
}

/// `f` on the calling thread as CPU `cpu`.
fn on<R>(machine: &SimMachine, cpu: usize, f: impl FnOnce() -> R) -> R {
    machine.cpu(cpu).run(|_| f())
}

const REFUSED: Result<(), Error> = Err(Error::FrameNotAllocated);

/// Sets its flag when dropped, also during a panic.
struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// Checks that `held` are distinct frames the allocator counts as out, and that
/// they are all it counts as out.
fn assert_held_exactly(frames: &Frames, held: &[PhysFrame]) {
    let distinct: BTreeSet<_> = held.iter().collect();
    assert_eq!(distinct.len(), held.len(), "a frame was handed out twice");
    assert!(held.iter().all(|&f| frames.is_free(f) == Ok(false)));
    let stats = frames.stats();
    assert_eq!(stats.used, held.len() as u64, "{stats:?}");
    assert_eq!(stats.free + stats.used, stats.total);
}

#[test]
fn a_frame_freed_on_one_cpu_is_refused_when_freed_again_on_any_cpu() {
    let (machine, frames) = rig(4);
    let total = frames.stats().total;
    let f = on(machine, 0, || frames.alloc()).unwrap();
    // SAFETY: frames the test took and no longer uses (or a bad free, refused).
    on(machine, 0, || unsafe { frames.free(f) }).unwrap();
    let stats = frames.stats();
    assert_eq!(stats.free, total, "a frame in a CPU's list is free");
    for cpu in 0..4 {
        // SAFETY: frames the test took and no longer uses (or a bad free, refused).
        assert_eq!(
            on(machine, cpu, || unsafe { frames.free(f) }),
            REFUSED,
            "on CPU {cpu}"
        );
        // SAFETY: frames the test took and no longer uses (or a bad free, refused).
        assert_eq!(
            on(machine, cpu, || unsafe { frames.free_frames(&[f]) }),
            REFUSED
        );
    }
    assert_eq!(frames.stats(), stats, "refused frees change nothing");
    assert_eq!(frames.is_free(f), Ok(true));
    // Handed out by CPU 0, freed on CPU 1 (into its list), freed again anywhere.
    let g = on(machine, 0, || frames.alloc()).unwrap();
    // SAFETY: frames the test took and no longer uses (or a bad free, refused).
    on(machine, 1, || unsafe { frames.free(g) }).unwrap();
    for cpu in 0..4 {
        // SAFETY: frames the test took and no longer uses (or a bad free, refused).
        assert_eq!(
            on(machine, cpu, || unsafe { frames.free(g) }),
            REFUSED,
            "on CPU {cpu}"
        );
    }
    // Once CPU 1's list has given `g` back to the bitmap, still refused.
    let many: Vec<PhysFrame> = on(machine, 2, || {
        (0..3 * CPU_LIST_BATCH)
            .map(|_| frames.alloc().unwrap())
            .collect()
    });
    // SAFETY: frames the test took and no longer uses (or a bad free, refused).
    on(machine, 1, || {
        many.iter().try_for_each(|&f| unsafe { frames.free(f) })
    })
    .unwrap();
    for cpu in 0..4 {
        // SAFETY: frames the test took and no longer uses (or a bad free, refused).
        assert_eq!(
            on(machine, cpu, || unsafe { frames.free(g) }),
            REFUSED,
            "on CPU {cpu}"
        );
    }
    assert_eq!(frames.stats().free, total);
    // Every frame comes out once: the other CPUs offline, their lists claimed.
    (0..3).for_each(|cpu| machine.cpu(cpu).go_offline());
    let all: Vec<PhysFrame> = on(machine, 3, || {
        std::iter::from_fn(|| frames.alloc()).collect()
    });
    assert_eq!(all.len() as u64, total);
    assert_held_exactly(frames, &all);
}

#[test]
fn two_cpus_racing_to_free_the_same_frames_free_each_exactly_once() {
    watchdog(
        "two_cpus_racing_to_free_the_same_frames_free_each_exactly_once",
        DEADLOCK_LIMIT,
        || {
            let (machine, frames) = rig(3);
            let total = frames.stats().total;
            for _round in 0..12 {
                race_to_free(machine, frames);
            }
            assert_eq!(frames.stats().free, total);
            // No frame sits in two lists: every frame comes out once.
            let all: Vec<PhysFrame> = std::iter::from_fn(|| frames.alloc()).collect();
            assert_eq!(all.len() as u64, total);
            assert_held_exactly(frames, &all);
        },
    );
}

/// CPUs 1 and 2 free the same 1,500 frames in the same order, meeting at each one:
/// exactly one of them frees each.
fn race_to_free(machine: &SimMachine, frames: &Frames) {
    let held: Vec<PhysFrame> = on(machine, 0, || {
        (0..1500).map(|_| frames.alloc().unwrap()).collect()
    });
    let wins: Vec<AtomicU8> = held.iter().map(|_| AtomicU8::new(0)).collect();
    // Back online (a round takes them offline as it ends): from here on, a call
    // that runs dry waits for their threads to serve its work.
    (1..3).for_each(|cpu| machine.cpu(cpu).go_online());
    // CPU 0 starts each frame's race once both racers are ready for it, so
    // they see the start at the same moment.
    let (ready, go) = (AtomicU64::new(0), AtomicU64::new(0));
    machine.on_every_cpu(|cpu| {
        if cpu.index() == 0 {
            for i in 1..=held.len() as u64 {
                while ready.load(Ordering::Acquire) < 2 * i {
                    std::thread::yield_now();
                }
                go.store(i, Ordering::Release);
            }
            return;
        }
        for (i, (f, wins)) in (1..).zip(held.iter().zip(&wins)) {
            ready.fetch_add(1, Ordering::AcqRel);
            // Spin (a yield now and then: there may be fewer cores
            // than threads).
            for turn in 0u32.. {
                if go.load(Ordering::Acquire) >= i {
                    break;
                }
                if turn % 256 == 255 {
                    std::thread::yield_now();
                }
                std::hint::spin_loop();
            }
            // SAFETY: frames the test took and no longer uses (or a bad free, refused).
            match unsafe { frames.free(*f) } {
                Ok(()) => {
                    wins.fetch_add(1, Ordering::Relaxed);
                }
                refused => assert_eq!(refused, REFUSED),
            }
        }
    });
    for (f, wins) in held.iter().zip(&wins) {
        assert_eq!(wins.load(Ordering::Relaxed), 1, "{f:?}");
    }
}

/// The states of the calling CPU's list an allocation or a free can find, and the
/// call made in it.
#[derive(Debug, Clone, Copy)]
enum Case {
    /// An allocation from a list holding frames.
    AllocFromList,
    /// An allocation that refills an empty list.
    AllocRefilling,
    /// An allocation that finds its list and the bitmap empty: it takes the list of
    /// an offline CPU.
    AllocDry,
    /// A free into a list with room.
    FreeToList,
    /// A free into a full list, which gives its oldest batch back.
    FreeSpilling,
    /// A second free of a frame in the list.
    DoubleFree,
}

#[test]
fn an_interrupt_at_every_point_of_alloc_and_free_that_allocates_and_frees_corrupts_nothing() {
    watchdog(
        "an_interrupt_at_every_point_of_alloc_and_free_that_allocates_and_frees_corrupts_nothing",
        DEADLOCK_LIMIT,
        || {
            // CPU 1 is offline: a list it left is claimed when CPU 0 runs dry.
            let (machine, frames) = rig(2);
            let cpu = machine.cpu(0);
            let handler_held: &'static Mutex<Vec<PhysFrame>> = Box::leak(Box::default());
            let interrupts: &'static AtomicU64 = Box::leak(Box::new(AtomicU64::new(0)));
            // A driver's handler: takes two frames, frees one of them twice (the
            // second refused), keeps the other.
            let handler = move || {
                interrupts.fetch_add(1, Ordering::Relaxed);
                if let Some(a) = frames.alloc() {
                    // SAFETY: frames the test took and no longer uses (or a bad free, refused).
                    unsafe { frames.free(a) }.unwrap();
                    // SAFETY: frames the test took and no longer uses (or a bad free, refused).
                    assert_eq!(unsafe { frames.free(a) }, REFUSED);
                }
                if let Some(b) = frames.alloc() {
                    handler_held.lock().unwrap().push(b);
                }
            };
            let cases = [
                Case::AllocFromList,
                Case::AllocRefilling,
                Case::AllocDry,
                Case::FreeToList,
                Case::FreeSpilling,
                Case::DoubleFree,
            ];
            for case in cases {
                for k in 0.. {
                    let mut held: Vec<PhysFrame> = Vec::new();
                    let victim = cpu.run(|_| set_up(machine, frames, case, &mut held));
                    cpu.interrupt_after(k, handler);
                    cpu.run(|_| match case {
                        Case::AllocFromList | Case::AllocRefilling | Case::AllocDry => {
                            held.push(frames.alloc().expect("a frame, from some list"));
                        }
                        Case::FreeToList | Case::FreeSpilling => {
                            // SAFETY: frames the test took and no longer uses (or a bad free, refused).
                            unsafe { frames.free(victim.unwrap()) }.unwrap();
                        }
                        Case::DoubleFree => {
                            let victim = victim.unwrap();
                            // SAFETY: frames the test took and no longer uses (or a bad free, refused).
                            if unsafe { frames.free(victim) } == Ok(()) {
                                // The handler took the frame again first: this free
                                // was its owner's.
                                let mut theirs = handler_held.lock().unwrap();
                                let at = theirs.iter().position(|&f| f == victim);
                                theirs.swap_remove(at.expect("refused unless handed out"));
                            }
                        }
                    });
                    let fired = !cpu.disarm();
                    let mut all = held.clone();
                    all.extend(handler_held.lock().unwrap().drain(..));
                    assert_held_exactly(frames, &all);
                    // SAFETY: frames the test took and no longer uses (or a bad free, refused).
                    cpu.run(|_| unsafe { frames.free_frames(&all) }).unwrap();
                    if !fired {
                        assert!(k > 0, "{case:?} passes an interrupt point");
                        break;
                    }
                }
            }
            assert!(interrupts.load(Ordering::Relaxed) > 20);
        },
    );
}

/// Puts CPU 0's list (and the bitmap) in the state `case` needs; frames it takes
/// out go to `held`. Returns the frame the call under test frees, if it frees one.
fn set_up(
    machine: &SimMachine,
    frames: &Frames,
    case: Case,
    held: &mut Vec<PhysFrame>,
) -> Option<PhysFrame> {
    // CPU 1 leaves a list behind and goes offline.
    machine.cpu(1).go_online();
    let f = on(machine, 1, || frames.alloc()).unwrap();
    // SAFETY: frames the test took and no longer uses (or a bad free, refused).
    on(machine, 1, || unsafe { frames.free(f) }).unwrap();
    machine.cpu(1).go_offline();
    let take = |held: &mut Vec<PhysFrame>, count: usize| {
        held.extend((0..count).map(|_| frames.alloc().unwrap()));
    };
    match case {
        Case::AllocFromList => {
            take(held, 1); // the list now holds a batch less one
            None
        }
        Case::AllocRefilling => {
            assert!(frames.drain_cpu_lists());
            None
        }
        Case::AllocDry => {
            let listed = frames.cpu_list_frames();
            let mut rest = vec![f; (frames.stats().free - listed) as usize];
            assert_eq!(frames.alloc_bulk(&mut rest), rest.len(), "the bitmap alone");
            held.extend(rest);
            // Only CPU 1's list is left; CPU 0's own list goes too.
            let own = listed - CPU_LIST_BATCH as u64;
            take(held, own as usize);
            None
        }
        Case::FreeToList => {
            assert!(frames.drain_cpu_lists());
            frames.alloc() // the list holds a batch less one
        }
        Case::FreeSpilling => {
            assert!(frames.drain_cpu_lists());
            let mut extra: Vec<PhysFrame> = (0..=CPU_LIST_FRAMES)
                .map(|_| frames.alloc().unwrap())
                .collect();
            assert!(frames.drain_cpu_lists());
            let victim = extra.pop();
            // SAFETY: frames the test took and no longer uses (or a bad free, refused).
            extra
                .iter()
                .try_for_each(|&f| unsafe { frames.free(f) })
                .unwrap();
            assert_eq!(frames.cpu_list_frames(), CPU_LIST_FRAMES as u64, "full");
            victim
        }
        Case::DoubleFree => {
            let victim = frames.alloc().unwrap();
            // SAFETY: frames the test took and no longer uses (or a bad free, refused).
            unsafe { frames.free(victim) }.unwrap();
            Some(victim)
        }
    }
}

#[test]
fn running_dry_takes_online_cpus_lists_through_work_and_offline_ones_by_claim() {
    watchdog(
        "running_dry_takes_online_cpus_lists_through_work_and_offline_ones_by_claim",
        DEADLOCK_LIMIT,
        || {
            let (machine, frames) = rig(4);
            let total = frames.stats().total;
            let listed = Barrier::new(4);
            let done = AtomicBool::new(false);
            let taken = Mutex::new(Vec::new());
            machine.on_every_cpu(|cpu| {
                if cpu.index() > 0 {
                    // Each leaves a batch in its list; CPU 3 then goes offline, the
                    // others serve shootdowns until CPU 0 is done.
                    let f = frames.alloc().unwrap();
                    // SAFETY: frames the test took and no longer uses (or a bad free, refused).
                    unsafe { frames.free(f) }.unwrap();
                    listed.wait();
                    while cpu.index() < 3 && !done.load(Ordering::Acquire) {
                        cpu.poll();
                        std::thread::yield_now();
                    }
                    return;
                }
                listed.wait();
                // The others stop serving when this CPU is done, a failed check
                // included.
                let _done = SetOnDrop(&done);
                while machine.cpu(3).is_online() {
                    std::thread::yield_now();
                }
                let in_lists = frames.cpu_list_frames();
                assert_eq!(in_lists, 3 * CPU_LIST_BATCH as u64);
                // The bitmap's frames, in bulk (no shortfall: the lists stay).
                let mut bitmap = vec![
                    PhysFrame::containing_address(x86_64::PhysAddr::zero());
                    (total - in_lists) as usize
                ];
                assert_eq!(frames.alloc_bulk(&mut bitmap), bitmap.len());
                assert_eq!(frames.cpu_list_frames(), in_lists);
                // One by one: every list's frames come.
                let singles: Vec<PhysFrame> = std::iter::from_fn(|| frames.alloc()).collect();
                assert_eq!(singles.len() as u64, in_lists);
                assert_eq!(frames.cpu_list_frames(), 0);
                bitmap.extend(singles);
                *taken.lock().unwrap() = bitmap;
            });
            let taken = taken.into_inner().unwrap();
            assert_eq!(taken.len() as u64, total);
            assert_held_exactly(frames, &taken);
            assert_eq!(frames.stats().free, 0);
        },
    );
}

#[test]
fn four_cpus_allocating_and_freeing_each_others_frames_never_share_one() {
    watchdog(
        "four_cpus_allocating_and_freeing_each_others_frames_never_share_one",
        DEADLOCK_LIMIT,
        || {
            let (machine, frames, tlb) = rig_with_tlb(4);
            for tight in [false, true] {
                stress(machine, frames, tight);
            }
            let total = frames.stats().total;
            let all: Vec<PhysFrame> = std::iter::from_fn(|| frames.alloc()).collect();
            assert_eq!(all.len() as u64, total);
            assert_held_exactly(frames, &all);
            eprintln!("{} calls of work on other CPUs", tlb.stats().calls);
        },
    );
}

/// Four CPUs allocate (one and in bulk), stamp, check and free (one, in bulk, and
/// frames another CPU allocated); `tight` keeps all but 300 frames out.
fn stress(machine: &SimMachine, frames: &Frames, tight: bool) {
    let total = frames.stats().total;
    // Tight: all but 300 frames stay out, so the lists (up to 64 frames
    // each) and the bitmap run dry again and again. Otherwise the lists
    // fill up and give batches back.
    let out = if tight { total as usize - 300 } else { 0 };
    let mut kept = vec![PhysFrame::containing_address(x86_64::PhysAddr::zero()); out];
    assert_eq!(frames.alloc_bulk(&mut kept), kept.len());
    // Back online after the frames above were taken (the previous run took them
    // offline as it ended): from here on, a call that runs dry waits for their
    // threads to serve its work.
    (1..4).for_each(|cpu| machine.cpu(cpu).go_online());
    // Frames one CPU hands to another to free.
    let handed: Mutex<Vec<(PhysFrame, u64)>> = Mutex::new(Vec::new());
    let refused = AtomicU64::new(0);
    let dry = AtomicU64::new(0);
    machine.on_every_cpu(|cpu| {
        let me = cpu.index() as u64;
        let mut rng = Rng::new(0xf4a3 + me);
        let mut mine: Vec<(PhysFrame, u64)> = Vec::new();
        let mut seq = 0u64;
        let stamp = |f: PhysFrame, seq: u64| {
            let value = me << 56 | seq;
            // SAFETY: bytes the test owns: no live Rust value lives there.
            unsafe { machine.write_phys(f.start_address(), &value.to_le_bytes()) };
            (f, value)
        };
        let check = |(f, value): (PhysFrame, u64)| {
            let mut bytes = [0; 8];
            machine.read_phys(f.start_address(), &mut bytes);
            assert_eq!(u64::from_le_bytes(bytes), value, "{f:?} was overwritten");
            f
        };
        for _ in 0..3000 {
            // With memory to spare, more single frees than single allocations
            // (bulk allocations make up for them): the lists fill and give
            // batches back.
            let roll = match rng.below(10) {
                3 if !tight => 5,
                roll => roll,
            };
            match roll {
                0..=3 => match frames.alloc() {
                    Some(f) => {
                        seq += 1;
                        mine.push(stamp(f, seq));
                    }
                    None => {
                        dry.fetch_add(1, Ordering::Relaxed);
                    }
                },
                4 => {
                    let mut out = vec![
                        PhysFrame::containing_address(x86_64::PhysAddr::zero());
                        1 + rng.below(40) as usize
                    ];
                    let got = frames.alloc_bulk(&mut out);
                    for &f in &out[..got] {
                        seq += 1;
                        mine.push(stamp(f, seq));
                    }
                }
                5..=6 if !mine.is_empty() => {
                    let at = rng.below(mine.len() as u64) as usize;
                    let f = check(mine.swap_remove(at));
                    // (A second free after this one could free a frame
                    // another CPU got since; a bulk free listing it twice
                    // cannot.)
                    if rng.below(4) == 0 {
                        // SAFETY: frames the test took and no longer uses (or a bad free, refused).
                        assert_eq!(unsafe { frames.free_frames(&[f, f]) }, REFUSED);
                        refused.fetch_add(1, Ordering::Relaxed);
                    }
                    // SAFETY: frames the test took and no longer uses (or a bad free, refused).
                    unsafe { frames.free(f) }.unwrap();
                }
                7 if !mine.is_empty() => {
                    let count = 1 + rng.below(mine.len().min(40) as u64) as usize;
                    let back: Vec<PhysFrame> = mine.drain(..count).map(check).collect();
                    // SAFETY: frames the test took and no longer uses (or a bad free, refused).
                    unsafe { frames.free_frames(&back) }.unwrap();
                }
                8 if !mine.is_empty() => {
                    // To another CPU, which frees it.
                    let at = rng.below(mine.len() as u64) as usize;
                    let given = mine.swap_remove(at);
                    handed.lock().unwrap().push(given);
                }
                _ => {
                    let given = handed.lock().unwrap().pop();
                    if let Some(given) = given {
                        // SAFETY: frames the test took and no longer uses (or a bad free, refused).
                        unsafe { frames.free(check(given)) }.unwrap();
                    }
                }
            }
        }
        let back: Vec<PhysFrame> = mine.into_iter().map(check).collect();
        // SAFETY: frames the test took and no longer uses (or a bad free, refused).
        unsafe { frames.free_frames(&back) }.unwrap();
    });
    let left: Vec<PhysFrame> = handed
        .into_inner()
        .unwrap()
        .into_iter()
        .map(|(f, _)| f)
        .collect();
    // SAFETY: frames the test took and no longer uses (or a bad free, refused).
    unsafe { frames.free_frames(&left) }.unwrap();
    // SAFETY: frames the test took and no longer uses (or a bad free, refused).
    unsafe { frames.free_frames(&kept) }.unwrap();
    assert!(!tight || dry.load(Ordering::Relaxed) > 0, "ran dry");
    assert_eq!(frames.stats().free, total, "every frame is back");
    assert!(refused.load(Ordering::Relaxed) > 0);
}

#[test]
fn a_manager_on_four_cpus_over_the_lists_gives_every_frame_back() {
    watchdog(
        "a_manager_on_four_cpus_over_the_lists_gives_every_frame_back",
        DEADLOCK_LIMIT,
        || {
            let (machine, _, tlb) = scenarios::smp_machine(SimConfig::new(64 << 20).with_cpus(4));
            let map = machine.memory_map().to_vec();
            let words = BitmapFrameAllocator::storage_words(map.iter().cloned());
            let mut storage = vec![0; words];
            let bitmap = BitmapFrameAllocator::with_storage(map, &mut storage).unwrap();
            let frames = LockedFrameAllocator::with_shootdown(bitmap, tlb);
            let free_before = frames.stats().free;
            let config = VmallocConfig {
                cpu_caches: true,
                ..VmallocConfig::default()
            };
            // SAFETY: the machine's page tables serve this manager alone.
            let vm = unsafe { Vmalloc::new(config, machine.root(), machine.phys(), &frames, tlb) }
                .unwrap();
            machine.on_every_cpu(|cpu| {
                let mut rng = Rng::new(cpu.index() as u64);
                let mut live = Vec::new();
                for _ in 0..300 {
                    if live.len() < 8 && rng.below(3) > 0 {
                        let pages = 1 + rng.below(20) as usize;
                        live.push(vm.vmalloc(pages * 4096).unwrap());
                        // A page table or two now and then, one frame at a time.
                        if let Some(f) = frames.alloc_frame() {
                            // SAFETY: frames the test took and no longer uses (or a bad free, refused).
                            unsafe { frames.free_frame(f) }.unwrap();
                        }
                    } else if let Some(area) = live.pop() {
                        // SAFETY: made above, not used again.
                        unsafe { vm.vfree(area.as_ptr()) }.unwrap();
                    }
                }
                for area in live {
                    // SAFETY: as above.
                    unsafe { vm.vfree(area.as_ptr()) }.unwrap();
                }
            });
            drop(vm);
            assert_eq!(frames.stats().free, free_before, "every frame is back");
        },
    );
}

const FRAME: u64 = 4096;

fn frame(number: u64) -> PhysFrame {
    PhysFrame::containing_address(x86_64::PhysAddr::new(number * FRAME))
}

/// An allocator with per-CPU lists (so with handed-out flags) over two zones:
/// frames 0..10 and 100,000..100,008, whose flags follow the first zone's.
fn two_zones(cpus: usize) -> (&'static SimMachine, &'static Frames) {
    let machine: &'static SimMachine = Box::leak(Box::new(SimMachine::new(
        SimConfig::new(16 << 20).with_cpus(cpus),
    )));
    let map = vec![
        vmalloc::frame::MemoryRegion::usable(0, 10 * FRAME),
        vmalloc::frame::MemoryRegion::usable(100_000 * FRAME, 100_008 * FRAME),
    ];
    let words = BitmapFrameAllocator::storage_words(map.iter().cloned());
    let storage: &'static mut [u64] = Box::leak(vec![0; words].into_boxed_slice());
    let bitmap = BitmapFrameAllocator::with_storage(map, storage).unwrap();
    let frames = Box::leak(Box::new(LockedFrameAllocator::with_cpus(bitmap, machine)));
    (machine, frames)
}

/// A bulk free naming, beside a frame it holds, an unmanaged frame of the same
/// bitmap word past the zone's end is refused with nothing changed (it panicked
/// past the last zone's flags).
#[test]
fn a_bulk_free_with_a_frame_past_its_zone_is_refused_and_changes_nothing() {
    let (machine, frames) = two_zones(1);
    on(machine, 0, || {
        let held = frames.alloc().unwrap();
        let before = frames.stats();
        for stranger in [frame(12), frame(100_020)] {
            let partner = if stranger == frame(12) {
                held
            } else {
                frames.alloc_from(frame(100_003)).unwrap()
            };
            let before = frames.stats();
            // SAFETY: `partner` is held and unused; the stranger is not managed,
            // so the call is refused.
            let freed = unsafe { frames.free_bulk(&[partner, stranger]) };
            assert_eq!(freed, Err(Error::FrameNotManaged));
            assert_eq!(frames.stats(), before);
            assert_eq!(frames.is_free(partner), Ok(false));
        }
        assert_eq!(frames.stats().used, before.used + 1);
    });
}

/// A refused bulk free never touches another frame's handed-out flag: frame 15 is
/// past the first zone, and its index there names the second zone's frame
/// 100,005, which CPU 1 frees and takes again meanwhile. Its frees were refused
/// while CPU 0's call held that flag.
#[test]
fn a_refused_bulk_free_never_refuses_another_cpus_free() {
    watchdog("a refused bulk free racing a free", DEADLOCK_LIMIT, || {
        let (machine, frames) = two_zones(2);
        // Frames 1..10 and 100,000..100,008 (frame 0 is never handed out).
        let mut all = [frame(0); 17];
        assert_eq!(on(machine, 0, || frames.alloc_bulk(&mut all)), 17);
        let stop = AtomicBool::new(false);
        let theirs = frame(100_005);
        std::thread::scope(|scope| {
            scope.spawn(|| {
                on(machine, 0, || {
                    let _stop = SetOnDrop(&stop);
                    for _ in 0..200_000 {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        // SAFETY: frame 1 is held and unused; frame 15 is not
                        // managed, so the call is refused.
                        let freed = unsafe { frames.free_bulk(&[frame(1), frame(15)]) };
                        assert_eq!(freed, Err(Error::FrameNotManaged));
                    }
                })
            });
            scope.spawn(|| {
                on(machine, 1, || {
                    let _stop = SetOnDrop(&stop);
                    while !stop.load(Ordering::Relaxed) {
                        // SAFETY: CPU 1's frame, unused.
                        assert_eq!(
                            unsafe { frames.free(theirs) },
                            Ok(()),
                            "a good free refused"
                        );
                        assert_eq!(frames.alloc(), Some(theirs));
                    }
                })
            });
        });
    });
}

/// A flush policy that runs work on the other CPUs, as a [`Shootdown`] does, but
/// says it could not: a policy reaching some CPUs and not others answers so.
///
/// [`Shootdown`]: vmalloc::smp::Shootdown
struct SaysUnreached(&'static scenarios::SmpTlb);

impl vmalloc::TlbFlush for SaysUnreached {
    fn flush_page(&self, page: x86_64::structures::paging::Page) {
        self.0.flush_page(page)
    }
    fn flush_all(&self) {
        self.0.flush_all()
    }
    fn relax(&self) {
        self.0.relax()
    }
    fn cpus(&self) -> Option<&dyn vmalloc::smp::Cpus> {
        vmalloc::TlbFlush::cpus(self.0)
    }
    fn call_on_other_cpus(&self, work: &(dyn Fn() + Sync)) -> bool {
        self.0.call_on_other_cpus(work);
        false
    }
}

#[test]
fn a_drain_whose_policy_says_unreached_strands_no_cpus_list() {
    watchdog(
        "a_drain_whose_policy_says_unreached_strands_no_cpus_list",
        DEADLOCK_LIMIT,
        || {
            let (machine, _, tlb) = scenarios::smp_machine(SimConfig::new(16 << 20).with_cpus(2));
            let map = machine.memory_map().to_vec();
            let words = BitmapFrameAllocator::storage_words(map.iter().cloned());
            let storage: &'static mut [u64] = Box::leak(vec![0; words].into_boxed_slice());
            let bitmap = BitmapFrameAllocator::with_storage(map, storage).unwrap();
            let policy: &'static SaysUnreached = Box::leak(Box::new(SaysUnreached(tlb)));
            let frames: &'static Frames = Box::leak(Box::new(
                LockedFrameAllocator::with_shootdown(bitmap, policy),
            ));
            let total = frames.stats().total;
            let listed = Barrier::new(2);
            let done = AtomicBool::new(false);
            let taken = Mutex::new(Vec::new());
            machine.on_every_cpu(|cpu| {
                if cpu.index() == 1 {
                    // CPU 1 leaves a batch in its list and serves IPIs until CPU 0 ran
                    // dry; then it takes what it can.
                    let f = frames.alloc().unwrap();
                    // SAFETY: a frame the test took and no longer uses.
                    unsafe { frames.free(f) }.unwrap();
                    listed.wait();
                    while !done.load(Ordering::Acquire) {
                        cpu.poll();
                        std::thread::yield_now();
                    }
                    let mine: Vec<PhysFrame> = std::iter::from_fn(|| frames.alloc()).collect();
                    taken.lock().unwrap().extend(mine);
                    return;
                }
                listed.wait();
                let _done = SetOnDrop(&done);
                let mine: Vec<PhysFrame> = std::iter::from_fn(|| frames.alloc()).collect();
                taken.lock().unwrap().extend(mine);
            });
            // The work ran on CPU 1 and handed its list over: whatever the policy
            // said, no frame is left out of reach.
            let taken = taken.into_inner().unwrap();
            assert_eq!(taken.len() as u64, total, "{:?}", frames.stats());
            assert_held_exactly(frames, &taken);
        },
    );
}

/// Two CPUs running dry at the same moment, the free frames in CPU lists (offline
/// CPUs' in the first case, the two CPUs' own in the second): neither gets `None`
/// while frames are free. Each drained once and tried once: the second to try found
/// the frames the first took back into its own list (a batch for one frame), or a
/// list the other's drain held, and gave up.
#[test]
fn cpus_running_dry_at_once_each_get_a_frame_while_any_is_free() {
    watchdog("cpus_running_dry_at_once", DEADLOCK_LIMIT, || {
        for offline_lists in [true, false] {
            let (machine, frames) = rig(4);
            let total = frames.stats().total;
            let failures = Mutex::new(Vec::new());
            for round in 0..100 {
                // Lists left with frames: on CPUs 2 and 3, which then stay offline,
                // or on the two CPUs that run dry.
                let holders = if offline_lists { 2..4 } else { 0..2 };
                for cpu in 2..4 {
                    machine.cpu(cpu).go_offline();
                }
                machine.cpu(1).go_offline();
                for cpu in holders {
                    machine.cpu(cpu).run(|_| {
                        let frame = frames.alloc().unwrap();
                        // SAFETY: the frame the test just took.
                        unsafe { frames.free(frame) }.unwrap();
                    });
                }
                let listed = frames.cpu_list_frames();
                let mut rest = vec![
                    PhysFrame::containing_address(x86_64::PhysAddr::zero());
                    (total - listed) as usize
                ];
                assert_eq!(frames.alloc_bulk(&mut rest), rest.len());
                machine.cpu(1).go_online();
                let start = Barrier::new(2);
                let taken = Mutex::new(Vec::new());
                let finished = AtomicU64::new(0);
                machine.on_every_cpu(|cpu| {
                    if cpu.index() >= 2 {
                        return;
                    }
                    start.wait();
                    let mut mine = Vec::new();
                    while let Some(frame) = frames.alloc() {
                        mine.push(frame);
                    }
                    let free = frames.stats().free;
                    if free > 0 {
                        failures.lock().unwrap().push((round, cpu.index(), free));
                    }
                    taken.lock().unwrap().extend(mine);
                    finished.fetch_add(1, Ordering::AcqRel);
                    while finished.load(Ordering::Acquire) < 2 {
                        cpu.poll();
                        std::thread::yield_now();
                    }
                });
                let mut taken = taken.into_inner().unwrap();
                assert_eq!(
                    taken.len() as u64,
                    listed,
                    "round {round}: every listed frame, once"
                );
                taken.extend(rest);
                // SAFETY: frames the test took.
                unsafe { frames.free_bulk(&taken) }.unwrap();
                assert_eq!(frames.stats().free, total);
            }
            let failures = failures.into_inner().unwrap();
            assert!(
                failures.is_empty(),
                "offline lists {offline_lists}: {} CPUs got None with frames free (round, cpu, free): {:?}",
                failures.len(),
                &failures[..failures.len().min(8)]
            );
        }
    });
}
