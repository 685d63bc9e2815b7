//! The marks that keep two managers off one top-level entry, under managers made and
//! dropped at the same time.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread;
use vmalloc::{Error, FrameSource, TlbFlush, Vmalloc, VmallocConfig};
use vmalloc_sim::{DEADLOCK_LIMIT, SimConfig, SimFrames, SimMachine, watchdog};
use x86_64::VirtAddr;
use x86_64::structures::paging::{Page, PhysFrame, Size4KiB};

/// The machine's flushes, where a turn of a wait for a lock runs `hook` first: a
/// CPU preempted there.
struct HookTlb<'a> {
    machine: &'a SimMachine,
    hook: &'a (dyn Fn() + Sync),
}

impl TlbFlush for HookTlb<'_> {
    fn flush_page(&self, page: Page<Size4KiB>) {
        self.machine.flush_page(page)
    }
    fn flush_all(&self) {
        self.machine.flush_all()
    }
    fn relax(&self) {
        (self.hook)();
        thread::yield_now();
    }
}

/// Frames handed out only once `open` is set (after `entered` says one was asked
/// for): a frame allocator that keeps its caller waiting.
#[derive(Clone, Copy)]
struct Gated<'a> {
    inner: &'a SimFrames,
    entered: &'a AtomicBool,
    open: &'a AtomicBool,
}

// SAFETY: every frame comes from and goes back to `inner`.
unsafe impl FrameSource for Gated<'_> {
    fn alloc_frame(&self) -> Option<PhysFrame<Size4KiB>> {
        self.entered.store(true, Ordering::SeqCst);
        wait(self.open);
        self.inner.alloc_frame()
    }
    unsafe fn free_frame(&self, frame: PhysFrame<Size4KiB>) -> Result<(), Error> {
        // SAFETY: forwarded.
        unsafe { self.inner.free_frame(frame) }
    }
    unsafe fn free_frames(&self, frames: &[PhysFrame<Size4KiB>]) -> Result<(), Error> {
        // SAFETY: forwarded.
        unsafe { self.inner.free_frames(frames) }
    }
}

fn wait(flag: &AtomicBool) {
    while !flag.load(Ordering::SeqCst) {
        thread::yield_now();
    }
}

/// Top-level entry `index` alone.
fn region(index: u64) -> VmallocConfig {
    VmallocConfig {
        start: VirtAddr::new(index << 39),
        size: 1 << 39,
        cpu_caches: false,
        ..VmallocConfig::default()
    }
}

/// A manager dropped while another is made over its region (the drop waiting for
/// the lock another machine's manager holds) leaves the new one its mark: the drop
/// gave back its top-level table first and cleared the marks after, the new one's
/// included, and a third manager over the region was accepted beside the second.
#[test]
fn a_manager_made_while_the_old_one_drops_keeps_its_mark() {
    watchdog(
        "a_manager_made_while_the_old_one_drops",
        DEADLOCK_LIMIT,
        || {
            let (machine, other) = (
                SimMachine::new(SimConfig::new(64 << 20)),
                SimMachine::new(SimConfig::new(64 << 20)),
            );
            let (frames, other_frames) = (machine.frames(), other.frames());
            let (gate_entered, gate_open) = (AtomicBool::new(false), AtomicBool::new(false));
            let (armed, dropping_waits, made) = (
                AtomicBool::new(false),
                AtomicBool::new(false),
                AtomicBool::new(false),
            );
            let hook = || {
                if armed.swap(false, Ordering::SeqCst) {
                    dropping_waits.store(true, Ordering::SeqCst);
                    wait(&made);
                }
            };
            thread::scope(|s| {
                let (ready_tx, ready_rx) = mpsc::channel();
                let (go_tx, go_rx) = mpsc::channel::<()>();
                let (machine, frames, hook, armed) = (&machine, &frames, &hook, &armed);
                let old = s.spawn(move || {
                    let tlb = HookTlb { machine, hook };
                    // SAFETY: the machine's root serves these managers alone.
                    let vm = unsafe {
                        Vmalloc::new(region(5), machine.root(), machine.phys(), frames, tlb)
                    }
                    .unwrap();
                    ready_tx.send(()).unwrap();
                    go_rx.recv().unwrap();
                    armed.store(true, Ordering::SeqCst);
                    drop(vm);
                });
                ready_rx.recv().unwrap();
                // Another machine's manager, holding the lock while its frames wait.
                let holder = s.spawn(|| {
                    let gated = Gated {
                        inner: &other_frames,
                        entered: &gate_entered,
                        open: &gate_open,
                    };
                    // SAFETY: the other machine's root serves this manager alone.
                    let vm = unsafe {
                        Vmalloc::new(region(7), other.root(), other.phys(), gated, &other)
                    };
                    drop(vm.unwrap());
                });
                wait(&gate_entered);
                go_tx.send(()).unwrap();
                // The drop waits for the lock (with its table given back, before the fix),
                // or has finished.
                while !dropping_waits.load(Ordering::SeqCst) && !old.is_finished() {
                    thread::yield_now();
                }
                gate_open.store(true, Ordering::SeqCst);
                holder.join().unwrap();
                // While the drop waits: the region is still its manager's, or (the
                // drop gave its table back before it took the lock) a new manager
                // gets it.
                // SAFETY: as above.
                let meanwhile = unsafe {
                    Vmalloc::new(region(5), machine.root(), machine.phys(), frames, machine)
                };
                made.store(true, Ordering::SeqCst);
                old.join().unwrap();
                let new = match meanwhile {
                    // SAFETY: as above.
                    Err(Error::Overlap) => unsafe {
                        Vmalloc::new(region(5), machine.root(), machine.phys(), frames, machine)
                    }
                    .unwrap(),
                    made => made.unwrap(),
                };
                // SAFETY: as above.
                let third = unsafe {
                    Vmalloc::new(region(5), machine.root(), machine.phys(), frames, machine)
                };
                assert_eq!(
                    third.as_ref().err(),
                    Some(&Error::Overlap),
                    "a second live manager over the region"
                );
                drop(new);
            });
        },
    );
}
