//! Failing a chosen frame allocation, to test rollback paths.

use super::FrameSource;
use crate::{Error, PAGE_SIZE};
use core::sync::atomic::{AtomicU64, Ordering};
use x86_64::structures::paging::{PageSize, PhysFrame, Size2MiB};

const DISARMED: u64 = u64::MAX;

/// A [`FrameSource`] that makes one chosen frame allocation fail.
///
/// After [`fail_after(n)`](Self::fail_after), the next `n` frames are handed out
/// as usual and the one after them is refused, as if memory had run out; then the
/// injector disarms itself. Requests the wrapped source cannot serve (it ran out, or
/// has no 2 MiB run) count nothing. Every frame of a bulk allocation counts as one: an
/// [`alloc_frames`](FrameSource::alloc_frames) call crossing the failing frame
/// returns a short count. Frees pass through untouched.
///
/// Kernel code that must roll back on [`Error::OutOfFrames`] can be run once per
/// possible failure point: `fail_after(0)`, `fail_after(1)`, ... until a run
/// completes without the injector firing ([`fired`](Self::fired)).
///
/// ```
/// use vmalloc::frame::{FaultInjector, FrameSource};
/// # use vmalloc::frame::{LockedFrameAllocator, MemoryRegion};
/// # let map = [MemoryRegion::usable(0, 1 << 20)];
/// # let mut storage = vec![0; 64];
/// # let frames = LockedFrameAllocator::with_storage(map, &mut storage).unwrap();
/// let source = FaultInjector::new(&frames);
/// source.fail_after(1);
/// assert!(source.alloc_frame().is_some());
/// assert!(source.alloc_frame().is_none());
/// assert!(source.fired());
/// assert!(source.alloc_frame().is_some());
/// assert_eq!(source.handed_out(), 2);
/// ```
#[derive(Debug)]
pub struct FaultInjector<S: FrameSource> {
    inner: S,
    /// Frames still to hand out before the failure, or [`DISARMED`].
    until_failure: AtomicU64,
    handed_out: AtomicU64,
    fired: AtomicU64,
}

impl<S: FrameSource> FaultInjector<S> {
    /// Wraps `inner`, disarmed.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            until_failure: AtomicU64::new(DISARMED),
            handed_out: AtomicU64::new(0),
            fired: AtomicU64::new(0),
        }
    }

    /// Arms the injector: `successes` more frames succeed, the next one fails.
    /// Re-arming replaces any earlier setting.
    pub fn fail_after(&self, successes: u64) {
        self.fired.store(0, Ordering::SeqCst);
        self.until_failure
            .store(successes.min(DISARMED - 1), Ordering::SeqCst);
    }

    /// No allocation fails any more.
    pub fn disarm(&self) {
        self.until_failure.store(DISARMED, Ordering::SeqCst);
    }

    /// Whether the armed failure has happened since the last [`fail_after`](Self::fail_after).
    pub fn fired(&self) -> bool {
        self.fired.load(Ordering::SeqCst) != 0
    }

    /// Frames handed out through this injector so far.
    pub fn handed_out(&self) -> u64 {
        self.handed_out.load(Ordering::SeqCst)
    }

    /// The wrapped source.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// How many of `wanted` frames may be handed out before the failure; fires and
    /// disarms when the failure falls inside them.
    fn allowed(&self, wanted: usize) -> usize {
        let left = self.until_failure.load(Ordering::SeqCst);
        if left == DISARMED || left >= wanted as u64 {
            if left != DISARMED {
                self.until_failure
                    .store(left - wanted as u64, Ordering::SeqCst);
            }
            return wanted;
        }
        self.fired.store(1, Ordering::SeqCst);
        self.disarm();
        left as usize
    }

    /// Gives back what `allowed` let through and the inner source did not hand out:
    /// only frames handed out count towards the failure.
    fn refund(&self, frames: usize) {
        if frames > 0 {
            let _ = self
                .until_failure
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| {
                    (left != DISARMED).then(|| left.saturating_add(frames as u64))
                });
        }
    }

    fn count(&self, frames: usize) {
        self.handed_out.fetch_add(frames as u64, Ordering::SeqCst);
    }
}

// SAFETY: every frame comes from `inner`, whose contract this forwards; the injector
// only ever hands out fewer.
unsafe impl<S: FrameSource> FrameSource for FaultInjector<S> {
    fn alloc_frame(&self) -> Option<PhysFrame> {
        if self.allowed(1) == 0 {
            return None;
        }
        let Some(frame) = self.inner.alloc_frame() else {
            self.refund(1);
            return None;
        };
        self.count(1);
        Some(frame)
    }

    fn alloc_frames(&self, out: &mut [PhysFrame]) -> usize {
        let allowed = self.allowed(out.len());
        let filled = self.inner.alloc_frames(&mut out[..allowed]);
        self.refund(allowed.saturating_sub(filled));
        self.count(filled);
        filled
    }

    fn alloc_frame_2m(&self) -> Option<PhysFrame<Size2MiB>> {
        const FRAMES: usize = (Size2MiB::SIZE / PAGE_SIZE) as usize;
        if self.allowed(FRAMES) < FRAMES {
            return None;
        }
        let Some(run) = self.inner.alloc_frame_2m() else {
            self.refund(FRAMES);
            return None;
        };
        self.count(FRAMES);
        Some(run)
    }

    unsafe fn free_frame(&self, frame: PhysFrame) -> Result<(), Error> {
        // SAFETY: forwarded from the caller.
        unsafe { self.inner.free_frame(frame) }
    }

    unsafe fn free_frames(&self, frames: &[PhysFrame]) -> Result<(), Error> {
        // SAFETY: forwarded from the caller.
        unsafe { self.inner.free_frames(frames) }
    }

    fn manages(&self, first: PhysFrame, count: u64) -> bool {
        self.inner.manages(first, count)
    }
}
