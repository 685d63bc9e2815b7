//! The per-CPU lists with scripted CPUs: one test thread plays every CPU in turn
//! (switching `current`), other CPUs' work runs when the script calls it, and an
//! "NMI" can land at any call the allocator makes into its CPUs, inside a held list
//! included. Interleavings of real threads are in `tests/frame_percpu.rs`.

extern crate std;

use super::test::{FRAME, frame};
use super::*;
use crate::TlbFlush;
use crate::smp::{CpuSet, Cpus, IrqState};
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::boxed::Box;
use std::collections::BTreeSet;
use std::sync::Mutex;
use std::vec;
use std::vec::Vec;
use x86_64::structures::paging::page::PageRange;
use x86_64::structures::paging::{Page, PhysFrame};

/// What runs at an `irq_save`, as an NMI landing there would.
type Nmi = Box<dyn FnOnce() + Send>;

/// CPUs whose current one the script sets; holding off interrupts is a no-op, and
/// an armed "NMI" runs at the chosen `irq_save`.
struct TestCpus {
    current: AtomicUsize,
    online: AtomicU64,
    /// `irq_save` calls until the NMI runs, and the NMI.
    nmi: Mutex<Option<(u64, Nmi)>>,
    saves: AtomicU64,
    /// Whether other CPUs can be reached with work.
    reach: bool,
}

// SAFETY: one test thread plays every CPU, one at a time; nothing is shot down.
unsafe impl Cpus for TestCpus {
    fn current(&self) -> usize {
        self.current.load(Ordering::Relaxed)
    }
    fn online(&self) -> CpuSet {
        CpuSet::from_bits(self.online.load(Ordering::SeqCst))
    }
    fn send_ipi(&self, _: CpuSet) {}
    fn irq_save(&self) -> IrqState {
        self.saves.fetch_add(1, Ordering::Relaxed);
        let due = {
            let mut nmi = self.nmi.lock().unwrap();
            match nmi.as_mut() {
                Some((0, _)) => nmi.take().map(|(_, nmi)| nmi),
                Some((left, _)) => {
                    *left -= 1;
                    None
                }
                None => None,
            }
        };
        if let Some(nmi) = due {
            nmi();
        }
        IrqState::new(0)
    }
    fn irq_restore(&self, _: IrqState) {}
}

impl TlbFlush for TestCpus {
    fn flush_page(&self, _: Page) {}
    fn flush_range(&self, _: PageRange) {}
    fn flush_all(&self) {}
    fn cpus(&self) -> Option<&dyn Cpus> {
        Some(self)
    }
    /// `work` on every other online CPU, as their shootdown service would run it.
    fn call_on_other_cpus(&self, work: &(dyn Fn() + Sync)) -> bool {
        if !self.reach {
            return false;
        }
        let me = self.current();
        for cpu in self.online().iter().filter(|&cpu| cpu != me) {
            self.on(cpu, work);
        }
        true
    }
}

impl TestCpus {
    fn new(online: u64, reach: bool) -> Self {
        Self {
            current: AtomicUsize::new(0),
            online: AtomicU64::new(online),
            nmi: Mutex::new(None),
            saves: AtomicU64::new(0),
            reach,
        }
    }

    fn on<R>(&self, cpu: usize, f: impl FnOnce() -> R) -> R {
        let before = self.current.swap(cpu, Ordering::Relaxed);
        let result = f();
        self.current.store(before, Ordering::Relaxed);
        result
    }
}

/// 256 frames, a reserved hole at 64..72 and frames 300..310 after a gap.
fn map() -> [MemoryRegion; 3] {
    [
        MemoryRegion::usable(0, 256 * FRAME),
        MemoryRegion::reserved(64 * FRAME, 72 * FRAME),
        MemoryRegion::usable(300 * FRAME, 310 * FRAME),
    ]
}

fn storage() -> Vec<u64> {
    vec![0; BitmapFrameAllocator::storage_words(map())]
}

/// The allocator over `storage` with lists over `cpus`.
fn listed<'a>(storage: &'a mut [u64], cpus: &'a TestCpus) -> LockedFrameAllocator<'a> {
    let bitmap = BitmapFrameAllocator::with_storage(map(), storage).unwrap();
    LockedFrameAllocator::with_shootdown(bitmap, cpus)
}

/// Every frame still free, taken: one by one on CPU 0 until none is left.
fn take_all(frames: &LockedFrameAllocator, cpus: &TestCpus) -> Vec<PhysFrame> {
    cpus.on(0, || core::iter::from_fn(|| frames.alloc()).collect())
}

#[test]
fn a_frame_in_a_list_is_free_yet_every_second_free_of_it_is_refused() {
    let cpus = TestCpus::new(0b11, true);
    let mut storage = storage();
    let frames = listed(&mut storage, &cpus);
    let total = frames.stats().total;
    let f = cpus.on(0, || frames.alloc()).unwrap();
    assert_eq!(
        frames.cpu_list_frames(),
        CPU_LIST_BATCH as u64 - 1,
        "refilled"
    );
    // The lowest frame first (frame 0 is never handed out); the list holds the
    // next ones, never handed out.
    assert_eq!(f, frame(1));
    for cpu in 0..2 {
        assert_eq!(
            // SAFETY: frames the test took and no longer uses (or a bad free, refused).
            cpus.on(cpu, || unsafe { frames.free(frame(2)) }),
            Err(Error::FrameNotAllocated)
        );
    }
    assert_eq!(frames.is_free(frame(2)), Ok(true));
    // SAFETY: frames the test took and no longer uses (or a bad free, refused).
    cpus.on(0, || unsafe { frames.free(f) }).unwrap();
    let stats = frames.stats();
    assert_eq!(
        (stats.free, stats.used),
        (total, 0),
        "a listed frame is free"
    );
    assert_eq!(frames.is_free(f), Ok(true));
    let refused = Err(Error::FrameNotAllocated);
    assert_eq!(
        // SAFETY: frames the test took and no longer uses (or a bad free, refused).
        cpus.on(1, || unsafe { frames.free(f) }),
        refused,
        "from another CPU"
    );
    assert_eq!(
        // SAFETY: frames the test took and no longer uses (or a bad free, refused).
        cpus.on(0, || unsafe { frames.free(f) }),
        refused,
        "from the same CPU"
    );
    // SAFETY: frames the test took and no longer uses (or a bad free, refused).
    assert_eq!(unsafe { frames.free_bulk(&[f]) }, refused, "in bulk");
    // SAFETY: a frame the test no longer uses (a free the allocator refuses), and the
    // closure leaves the allocator in place.
    let under_lock = unsafe { frames.with_lock(|bitmap| bitmap.free(f)) };
    assert_eq!(under_lock, refused, "under the lock");
    // SAFETY: the closure leaves this allocator in place.
    let free = unsafe { frames.with_lock(|bitmap| bitmap.is_free(f)) };
    assert_eq!(free, Ok(true));
    assert_eq!(frames.stats(), stats, "nothing changed");
    // Emptied into the bitmap, still refused, and handed out once.
    assert!(frames.drain_cpu_lists());
    assert_eq!(frames.cpu_list_frames(), 0);
    // SAFETY: frames the test took and no longer uses (or a bad free, refused).
    assert_eq!(cpus.on(1, || unsafe { frames.free(f) }), refused);
    let all = take_all(&frames, &cpus);
    assert_eq!(all.len() as u64, total);
    assert_eq!(all.iter().collect::<BTreeSet<_>>().len() as u64, total);
    // Frames freed on CPU 1 and freed again on CPU 0, in the list and out of it.
    cpus.on(1, || {
        // SAFETY: frames the test took and no longer uses (or a bad free, refused).
        all.iter().try_for_each(|&f| unsafe { frames.free(f) })
    })
    .unwrap();
    let listed = frames.cpu_list_frames() as usize;
    assert!(listed > CPU_LIST_FRAMES - CPU_LIST_BATCH && listed <= CPU_LIST_FRAMES);
    for &f in &all {
        // SAFETY: frames the test took and no longer uses (or a bad free, refused).
        assert_eq!(cpus.on(0, || unsafe { frames.free(f) }), refused);
    }
    assert_eq!(frames.stats().free, total);
}

#[test]
fn unmanaged_frames_are_refused_as_without_lists() {
    let cpus = TestCpus::new(0b1, true);
    let mut storage = storage();
    let frames = listed(&mut storage, &cpus);
    for f in [frame(64), frame(71), frame(280), frame(1 << 30)] {
        assert_eq!(
            // SAFETY: frames the test took and no longer uses (or a bad free, refused).
            unsafe { frames.free(f) },
            Err(Error::FrameNotManaged),
            "{f:?}"
        );
    }
    assert_eq!(frames.stats().used, 0);
}

/// `f`'s result, and how many times it held interrupts off.
fn saves<R>(cpus: &TestCpus, f: impl FnOnce() -> R) -> (R, u64) {
    let before = cpus.saves.load(Ordering::Relaxed);
    let result = f();
    (result, cpus.saves.load(Ordering::Relaxed) - before)
}

#[test]
fn lists_refill_and_spill_in_batches_and_counts_stay_exact() {
    let cpus = TestCpus::new(0b1, true);
    let mut storage = storage();
    let frames = listed(&mut storage, &cpus);
    let total = frames.stats().total;
    let (first, held_off) = saves(&cpus, || frames.alloc().unwrap());
    assert_eq!(
        held_off, 2,
        "an empty list refills: its hold, then the bitmap's lock"
    );
    assert_eq!(frames.cpu_list_frames(), CPU_LIST_BATCH as u64 - 1);
    let (second, held_off) = saves(&cpus, || frames.alloc().unwrap());
    assert_eq!(held_off, 1, "from the list: its hold alone");
    // SAFETY: frames the test took and no longer uses (or a bad free, refused).
    let ((), held_off) = saves(&cpus, || unsafe { frames.free(second) }.unwrap());
    assert_eq!(held_off, 1, "to the list: its hold alone");
    let mut held = vec![first];
    held.extend((0..100).map(|_| frames.alloc().unwrap()));
    let stats = frames.stats();
    assert_eq!(stats.used, held.len() as u64);
    assert_eq!(stats.free + stats.used, total);
    // Freeing fills the list to the top, then gives the oldest batch back.
    let mut listed_before = frames.cpu_list_frames() as usize;
    for (i, &f) in held.iter().enumerate() {
        // SAFETY: frames the test took and no longer uses (or a bad free, refused).
        unsafe { frames.free(f) }.unwrap();
        let listed = frames.cpu_list_frames() as usize;
        let expected = match listed_before {
            CPU_LIST_FRAMES => CPU_LIST_FRAMES - CPU_LIST_BATCH + 1,
            below => below + 1,
        };
        assert_eq!(listed, expected, "free {i}");
        listed_before = listed;
        assert_eq!(frames.stats().used, (held.len() - i - 1) as u64);
    }
    assert_eq!(frames.stats().free, total);
}

#[test]
fn running_dry_empties_the_callers_an_offline_cpus_and_online_cpus_lists() {
    let cpus = TestCpus::new(0b1111, true);
    let mut storage = storage();
    let frames = listed(&mut storage, &cpus);
    let total = frames.stats().total;
    // CPUs 1..4 take one frame each (their lists take a batch) and give it back.
    for cpu in 1..4 {
        let f = cpus.on(cpu, || frames.alloc()).unwrap();
        // SAFETY: frames the test took and no longer uses (or a bad free, refused).
        cpus.on(cpu, || unsafe { frames.free(f) }).unwrap();
    }
    assert_eq!(frames.cpu_list_frames(), 3 * CPU_LIST_BATCH as u64);
    cpus.online.store(0b0111, Ordering::SeqCst); // CPU 3 goes offline
    let all = take_all(&frames, &cpus);
    assert_eq!(all.len() as u64, total, "every list was emptied");
    assert_eq!(all.iter().collect::<BTreeSet<_>>().len(), all.len());
    assert_eq!(frames.cpu_list_frames(), 0);
    assert_eq!(frames.stats().free, 0);
}

#[test]
fn without_work_on_other_cpus_an_online_list_is_emptied_at_its_next_call() {
    let cpus = TestCpus::new(0b11, false);
    let mut storage = storage();
    let bitmap = BitmapFrameAllocator::with_storage(map(), &mut storage).unwrap();
    let frames = LockedFrameAllocator::with_cpus(bitmap, &cpus);
    let total = frames.stats().total;
    let f = cpus.on(1, || frames.alloc()).unwrap();
    // SAFETY: frames the test took and no longer uses (or a bad free, refused).
    cpus.on(1, || unsafe { frames.free(f) }).unwrap();
    let first = take_all(&frames, &cpus);
    assert_eq!(
        first.len() as u64,
        total - CPU_LIST_BATCH as u64,
        "CPU 1's list is out of reach"
    );
    assert_eq!(
        frames.stats().free,
        CPU_LIST_BATCH as u64,
        "and still counted free"
    );
    // CPU 1's next call empties its list, as asked, before it frees into it.
    // SAFETY: frames the test took and no longer uses (or a bad free, refused).
    cpus.on(1, || unsafe { frames.free(first[0]) }).unwrap();
    assert_eq!(frames.cpu_list_frames(), 1);
    let rest = take_all(&frames, &cpus);
    assert_eq!(rest.len(), CPU_LIST_BATCH);
    let all: BTreeSet<_> = first[1..].iter().chain(&rest).collect();
    assert_eq!(all.len() as u64, total - 1);
}

#[test]
fn bulk_and_contiguous_allocations_empty_the_lists_before_they_come_up_short() {
    let cpus = TestCpus::new(0b11, true);
    let mut storage = storage();
    let frames = listed(&mut storage, &cpus);
    let total = frames.stats().total as usize;
    let f = cpus.on(1, || frames.alloc()).unwrap();
    // SAFETY: frames the test took and no longer uses (or a bad free, refused).
    cpus.on(1, || unsafe { frames.free(f) }).unwrap();
    let mut out = vec![frame(0); total + 1];
    assert_eq!(frames.alloc_bulk(&mut out), total);
    // SAFETY: frames the test took and no longer uses (or a bad free, refused).
    unsafe { frames.free_bulk(&out[..total]) }.unwrap();
    // A run of 64 free frames exists only once CPU 1's list is back in the bitmap.
    let g = cpus.on(1, || frames.alloc()).unwrap();
    // SAFETY: frames the test took and no longer uses (or a bad free, refused).
    cpus.on(1, || unsafe { frames.free(g) }).unwrap();
    let mut rest = vec![frame(0); total - CPU_LIST_BATCH];
    assert_eq!(frames.alloc_bulk(&mut rest), rest.len());
    let run = frames.alloc_contiguous(CPU_LIST_BATCH as u64, 1).unwrap();
    assert_eq!(frames.stats().free, 0);
    // SAFETY: frames the test took and no longer uses (or a bad free, refused).
    unsafe { frames.free_bulk(&rest) }.unwrap();
    let run: Vec<PhysFrame> = (0..CPU_LIST_BATCH as u64).map(|i| run + i).collect();
    // SAFETY: frames the test took and no longer uses (or a bad free, refused).
    unsafe { frames.free_bulk(&run) }.unwrap();
    assert_eq!(frames.stats().free as usize, total);
}

#[test]
fn a_contiguous_run_longer_than_every_free_frame_leaves_the_lists_alone() {
    let cpus = TestCpus::new(0b11, true);
    let mut storage = storage();
    let frames = listed(&mut storage, &cpus);
    let f = cpus.on(1, || frames.alloc()).unwrap();
    // SAFETY: frames the test took and no longer uses.
    cpus.on(1, || unsafe { frames.free(f) }).unwrap();
    let listed = frames.cpu_list_frames();
    assert!(listed > 0);
    let free = frames.stats().free;
    for count in [free + 1, u64::MAX] {
        assert_eq!(frames.alloc_contiguous(count, 1), Err(Error::OutOfFrames));
        // Refused without emptying CPU 1's list: no drain could have made the run.
        assert_eq!(frames.cpu_list_frames(), listed, "count {count}");
    }
}

#[test]
fn alloc_from_takes_the_hint_from_the_callers_list() {
    let cpus = TestCpus::new(0b11, true);
    let mut storage = storage();
    let frames = listed(&mut storage, &cpus);
    let f = frames.alloc().unwrap();
    // SAFETY: frames the test took and no longer uses (or a bad free, refused).
    unsafe { frames.free(f) }.unwrap();
    assert_eq!(frames.alloc_from(f), Some(f));
    assert_eq!(frames.is_free(f), Ok(false));
    // SAFETY: frames the test took and no longer uses (or a bad free, refused).
    unsafe { frames.free(f) }.unwrap();
    // On another CPU's list, the hint is passed over: the next free frame comes.
    let other = cpus.on(1, || frames.alloc_from(f)).unwrap();
    assert_ne!(other, f);
    assert_eq!(frames.is_free(f), Ok(true));
}

#[test]
fn an_nmi_at_every_irq_save_of_alloc_and_free_corrupts_nothing() {
    // The NMI allocates two frames and frees one of them and one the interrupted
    // code holds; whatever list it finds held, it goes to the bitmap.
    let cpus: &'static TestCpus = Box::leak(Box::new(TestCpus::new(0b11, true)));
    let storage: &'static mut [u64] = Box::leak(storage().into_boxed_slice());
    let frames: &'static LockedFrameAllocator<'static> = Box::leak(Box::new(listed(storage, cpus)));
    let total = frames.stats().total;
    let held: &'static Mutex<Vec<PhysFrame>> = Box::leak(Box::new(Mutex::new(Vec::new())));
    let nmi = move || {
        if let Some(a) = frames.alloc() {
            // SAFETY: frames the test took and no longer uses (or a bad free, refused).
            unsafe { frames.free(a) }.unwrap();
            // SAFETY: frames the test took and no longer uses (or a bad free, refused).
            assert_eq!(unsafe { frames.free(a) }, Err(Error::FrameNotAllocated));
        }
        let mut held = held.lock().unwrap();
        held.extend(frames.alloc());
        if held.len() > 1 {
            let c = held.swap_remove(0);
            // SAFETY: frames the test took and no longer uses (or a bad free, refused).
            unsafe { frames.free(c) }.unwrap();
        }
    };
    // States of the list the outer call finds: empty (refill) on even rounds, full
    // (spill) on odd ones, neither once the NMIs have moved it; and an empty
    // bitmap (drain). The NMI lands before the list is held (the first
    // `irq_save`) and inside it (the lock a refill or a spill takes).
    for round in 0..40u64 {
        for k in 0..4 {
            if round % 2 == 0 {
                assert!(frames.drain_cpu_lists());
            }
            *cpus.nmi.lock().unwrap() = Some((k, Box::new(nmi)));
            let f = frames.alloc().unwrap();
            held.lock().unwrap().push(f);
            if round % 2 == 1 {
                fill_list(frames);
            }
            *cpus.nmi.lock().unwrap() = Some((k, Box::new(nmi)));
            let g = held.lock().unwrap().swap_remove(0);
            // SAFETY: frames the test took and no longer uses (or a bad free, refused).
            unsafe { frames.free(g) }.unwrap();
            *cpus.nmi.lock().unwrap() = None;
        }
        if round % 8 == 7 {
            // All but a few frames: the lists and the bitmap run dry.
            let mut rest = vec![frame(0); total as usize - 8];
            let got = frames.alloc_bulk(&mut rest);
            held.lock().unwrap().extend_from_slice(&rest[..got]);
        }
        if round % 8 == 3 {
            let all: Vec<PhysFrame> = held.lock().unwrap().drain(..).collect();
            all.iter()
                // SAFETY: frames the test took and no longer uses (or a bad free, refused).
                .try_for_each(|&f| unsafe { frames.free(f) })
                .unwrap();
        }
        let held = held.lock().unwrap();
        let distinct: BTreeSet<_> = held.iter().collect();
        assert_eq!(distinct.len(), held.len(), "a frame handed out twice");
        assert!(held.iter().all(|&f| frames.is_free(f) == Ok(false)));
        let stats = frames.stats();
        assert_eq!(stats.used, held.len() as u64, "round {round}");
        assert_eq!(stats.free + stats.used, total);
    }
}

/// Fills the calling CPU's list with as many frames as are free, up to
/// [`CPU_LIST_FRAMES`].
fn fill_list(frames: &LockedFrameAllocator) {
    let mut taken = [frame(0); CPU_LIST_FRAMES];
    let got = frames.alloc_bulk(&mut taken);
    assert!(frames.drain_cpu_lists());
    taken[..got]
        .iter()
        // SAFETY: frames the test took and no longer uses (or a bad free, refused).
        .try_for_each(|&f| unsafe { frames.free(f) })
        .unwrap();
    assert_eq!(frames.cpu_list_frames(), got as u64);
}

#[test]
fn a_bitmap_swapped_inside_with_lock_detaches_the_lists() {
    let cpus = TestCpus::new(0b1, true);
    let (mut first, mut second) = (storage(), storage());
    let frames = listed(&mut first, &cpus);
    let f = frames.alloc().unwrap();
    let replacement = BitmapFrameAllocator::with_storage(map(), &mut second).unwrap();
    // SAFETY: the swap is what is tested; the one frame handed out (`f`) is not
    // used, and the old allocator is checked on its own below.
    let mut old = unsafe { frames.with_lock(|bitmap| core::mem::replace(bitmap, replacement)) };
    // Everything goes to the new bitmap now; the old one's frames are not taken.
    assert_eq!(frames.cpu_list_frames(), CPU_LIST_BATCH as u64 - 1);
    assert_eq!(frames.stats().used, 0);
    let g = frames.alloc().unwrap();
    assert_eq!(frames.stats().used, 1);
    // SAFETY: frames the test took and no longer uses (or a bad free, refused).
    unsafe { frames.free(g) }.unwrap();
    // SAFETY: frames the test took and no longer uses (or a bad free, refused).
    assert_eq!(unsafe { frames.free(g) }, Err(Error::FrameNotAllocated));
    // SAFETY: frames the test took and no longer uses (or a bad free, refused).
    assert_eq!(unsafe { frames.free(f) }, Err(Error::FrameNotAllocated));
    // The old allocator still takes its own frame back; its lists' are lost.
    // SAFETY: frames the test took and no longer uses (or a bad free, refused).
    assert_eq!(unsafe { old.free(f) }, Ok(()));
    assert_eq!(old.stats().used, CPU_LIST_BATCH as u64 - 1);
    let back = frames.into_inner();
    assert_eq!(back.stats().used, 0);
}

#[test]
fn into_inner_gives_the_listed_frames_back() {
    let cpus = TestCpus::new(0b11, true);
    let mut storage = storage();
    let frames = listed(&mut storage, &cpus);
    let f = cpus.on(1, || frames.alloc()).unwrap();
    let g = cpus.on(0, || frames.alloc()).unwrap();
    // SAFETY: frames the test took and no longer uses (or a bad free, refused).
    cpus.on(0, || unsafe { frames.free(g) }).unwrap();
    let mut bitmap = frames.into_inner();
    assert_eq!(bitmap.stats().used, 1);
    // SAFETY: frames the test took and no longer uses (or a bad free, refused).
    assert_eq!(unsafe { bitmap.free(f) }, Ok(()));
    // SAFETY: frames the test took and no longer uses (or a bad free, refused).
    assert_eq!(unsafe { bitmap.free(g) }, Err(Error::FrameNotAllocated));
    assert_eq!(bitmap.stats().used, 0);
}
