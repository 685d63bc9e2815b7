//! No heap-wide lock is held across a call into the manager: while one CPU's list
//! heap grows (and waits inside the manager), another CPU allocates and frees list
//! blocks.

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicBool, Ordering};
use vmalloc::heap::{HeapConfig, KernelHeap};
use vmalloc::{Error, FrameSource};
use vmalloc_sim::scenarios;
use vmalloc_sim::{DEADLOCK_LIMIT, SimConfig, SimFrames, SimMachine, watchdog};
use x86_64::structures::paging::{PhysFrame, Size2MiB};

/// Frames from a [`SimFrames`]; once armed, the next allocation waits until the
/// gate opens: a manager call stopped in the middle, its lock held.
struct Gate<'m> {
    frames: &'m SimFrames,
    armed: AtomicBool,
    stopped: AtomicBool,
    open: AtomicBool,
}

impl Gate<'_> {
    fn stop_if_armed(&self) {
        if self.armed.swap(false, Ordering::AcqRel) {
            self.stopped.store(true, Ordering::Release);
            while !self.open.load(Ordering::Acquire) {
                std::thread::yield_now();
            }
        }
    }
}

// SAFETY: every call forwards to `SimFrames`, which upholds the contract.
unsafe impl FrameSource for &Gate<'_> {
    fn alloc_frame(&self) -> Option<PhysFrame> {
        self.stop_if_armed();
        self.frames.alloc_frame()
    }
    fn alloc_frames(&self, out: &mut [PhysFrame]) -> usize {
        self.stop_if_armed();
        self.frames.alloc_frames(out)
    }
    fn alloc_frame_2m(&self) -> Option<PhysFrame<Size2MiB>> {
        self.frames.alloc_frame_2m()
    }
    unsafe fn free_frame(&self, frame: PhysFrame) -> Result<(), Error> {
        // SAFETY: forwarded from the caller.
        unsafe { self.frames.free_frame(frame) }
    }
    unsafe fn free_frames(&self, frames: &[PhysFrame]) -> Result<(), Error> {
        // SAFETY: forwarded from the caller.
        unsafe { self.frames.free_frames(frames) }
    }
    fn manages(&self, first: PhysFrame, count: u64) -> bool {
        self.frames.manages(first, count)
    }
}

fn layout(size: usize) -> Layout {
    Layout::from_size_align(size, 8).unwrap()
}

#[test]
fn the_list_serves_other_cpus_while_it_grows() {
    let machine = SimMachine::new(
        SimConfig::new(64 << 20)
            .with_cpus(2)
            .with_scatter_seed(8)
            .with_host_window(4 << 30),
    );
    let frames = machine.frames();
    let gate = Gate {
        frames: &frames,
        armed: AtomicBool::new(false),
        stopped: AtomicBool::new(false),
        open: AtomicBool::new(false),
    };
    // SAFETY: the machine's page tables serve this manager alone, and its flush reaches every CPU that runs.
    let vm = unsafe { scenarios::window_manager(&machine, &gate, &machine) };
    let heap = KernelHeap::new(HeapConfig::DEFAULT);
    heap.init(&vm).unwrap();
    // Blocks of 8 KiB fill the list's first growth step (64 KiB) but for a hole too
    // small for 12 KiB.
    let eight = layout(8 << 10);
    // SAFETY: non-zero sizes, each block freed once with its layout below.
    let held: Vec<*mut u8> = (0..7).map(|_| unsafe { heap.alloc(eight) }).collect();
    assert!(held.iter().all(|block| !block.is_null()));
    assert!(heap.owns_small(held[0]));
    assert_eq!(heap.stats().mapped, 64 << 10);

    watchdog(
        "the_list_serves_other_cpus_while_it_grows",
        DEADLOCK_LIMIT,
        || {
            std::thread::scope(|scope| {
                let (heap, gate, machine) = (&heap, &gate, &machine);
                // CPU 0 needs 12 KiB: the list grows, and stops inside the manager.
                let grower = scope.spawn(move || {
                    machine.cpu(0).enter();
                    gate.armed.store(true, Ordering::Release);
                    // SAFETY: a non-zero size.
                    unsafe { heap.alloc(layout(12 << 10)) as usize }
                });
                while !gate.stopped.load(Ordering::Acquire) {
                    std::thread::yield_now();
                }
                // CPU 1 frees a list block and allocates two meanwhile.
                let freed = held[6] as usize;
                let other = scope.spawn(move || {
                    machine.cpu(1).enter();
                    // SAFETY: a live block with its layout; fresh blocks of non-zero size.
                    unsafe {
                        heap.dealloc(freed as *mut u8, eight);
                        let blocks = [heap.alloc(layout(6 << 10)), heap.alloc(layout(5 << 10))];
                        assert!(blocks.iter().all(|&b| !b.is_null() && heap.owns_small(b)));
                        blocks.map(|b| b as usize)
                    }
                });
                let blocks = other.join().unwrap();
                assert!(gate.stopped.load(Ordering::Acquire) && !gate.open.load(Ordering::Acquire));
                gate.open.store(true, Ordering::Release);
                let grown = grower.join().unwrap() as *mut u8;
                assert!(!grown.is_null() && heap.owns_small(grown));
                // SAFETY: live blocks with their layouts.
                unsafe {
                    heap.dealloc(grown, layout(12 << 10));
                    heap.dealloc(blocks[0] as *mut u8, layout(6 << 10));
                    heap.dealloc(blocks[1] as *mut u8, layout(5 << 10));
                    for &block in &held[..6] {
                        heap.dealloc(block, eight);
                    }
                }
            });
        },
    );
    assert_eq!(heap.stats().in_use, 0);
}
