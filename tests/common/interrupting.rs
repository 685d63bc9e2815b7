//! A frame source that, once armed, runs an interrupt handler inside its next
//! allocation, which the manager makes under its lock: an interrupt (or a fault)
//! arriving while the CPU holds the manager's lock.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use vmalloc::{Error, FrameSource};
use vmalloc_sim::SimFrames;
use x86_64::structures::paging::PhysFrame;

pub struct Interrupting {
    frames: &'static SimFrames,
    armed: AtomicBool,
    interrupt: OnceLock<Box<dyn Fn() + Send + Sync>>,
}

impl Interrupting {
    /// A source over `frames`, leaked: the handler usually refers to a manager that
    /// refers to the source.
    pub fn leak(frames: &'static SimFrames) -> &'static Self {
        Box::leak(Box::new(Self {
            frames,
            armed: AtomicBool::new(false),
            interrupt: OnceLock::new(),
        }))
    }

    /// Sets the handler; once only.
    pub fn on_interrupt(&self, handler: impl Fn() + Send + Sync + 'static) {
        assert!(
            self.interrupt.set(Box::new(handler)).is_ok(),
            "the handler is set once"
        );
    }

    /// Runs the handler inside the next allocation.
    pub fn arm(&self) {
        self.armed.store(true, Ordering::SeqCst);
    }

    fn interrupt_if_armed(&self) {
        if self.armed.swap(false, Ordering::SeqCst) {
            (self
                .interrupt
                .get()
                .expect("a handler is set before arming"))();
        }
    }
}

// SAFETY: every frame comes from `frames`, whose contract this forwards.
unsafe impl FrameSource for Interrupting {
    fn alloc_frame(&self) -> Option<PhysFrame> {
        self.interrupt_if_armed();
        self.frames.alloc_frame()
    }
    fn alloc_frames(&self, out: &mut [PhysFrame]) -> usize {
        self.interrupt_if_armed();
        self.frames.alloc_frames(out)
    }
    unsafe fn free_frame(&self, frame: PhysFrame) -> Result<(), Error> {
        // SAFETY: forwarded from the caller.
        unsafe { self.frames.free_frame(frame) }
    }
    unsafe fn free_frames(&self, frames: &[PhysFrame]) -> Result<(), Error> {
        // SAFETY: forwarded from the caller.
        unsafe { self.frames.free_frames(frames) }
    }
}
