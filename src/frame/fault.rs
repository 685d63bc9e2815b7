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
/// has no 2 MiB run) count nothing, and the failure happens only where the source
/// could have served the frame (it is asked, and what it gives is given back). Every
/// frame of a bulk allocation counts as one: an
/// [`alloc_frames`](FrameSource::alloc_frames) call crossing the failing frame
/// returns a short count. Frees pass through untouched. CPUs may share an
/// injector: each frame is counted once, and one allocation fails per arming.
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

    /// Takes `wanted` frames off the count before the failure, in one atomic step
    /// (CPUs share the injector): `Ok` if they all come before it (or it is
    /// disarmed); `Err(left)` if the failure falls among them, `left` frames after
    /// the first. Then the injector is disarmed, claimed by this call alone, which
    /// fires it ([`fire`](Self::fire)) or gives it back ([`unclaim`](Self::unclaim)).
    fn take(&self, wanted: usize) -> Result<(), u64> {
        let wanted = wanted as u64;
        let mut left = self.until_failure.load(Ordering::SeqCst);
        loop {
            let next = match left {
                DISARMED => return Ok(()),
                _ if left >= wanted => left - wanted,
                _ => DISARMED,
            };
            match self.until_failure.compare_exchange_weak(
                left,
                next,
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(_) if next == DISARMED => return Err(left),
                Ok(_) => return Ok(()),
                Err(now) => left = now,
            }
        }
    }

    /// The claimed failure happens: the wrapped source could have served the frame.
    fn fire(&self) {
        self.fired.store(1, Ordering::SeqCst);
    }

    /// The claimed failure did not happen (the wrapped source ran out first): the
    /// count is back, less the `handed` frames handed out, unless the injector was
    /// armed or disarmed meanwhile.
    fn unclaim(&self, left: u64, handed: usize) {
        let _ = self.until_failure.compare_exchange(
            DISARMED,
            left.saturating_sub(handed as u64),
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
    }

    /// Gives back what `take` counted and the inner source did not hand out: only
    /// frames handed out count towards the failure.
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

    /// Gives frames taken to see whether the source could serve the failing one
    /// back.
    fn give_back(&self, frames: &[PhysFrame]) {
        // SAFETY: just taken from `inner` and handed to no one.
        let _ = unsafe { self.inner.free_frames(frames) };
    }
}

// SAFETY: every frame comes from `inner`, whose contract this forwards; the injector
// only ever hands out fewer.
unsafe impl<S: FrameSource> FrameSource for FaultInjector<S> {
    fn alloc_frame(&self) -> Option<PhysFrame> {
        if let Err(left) = self.take(1) {
            // The failing frame: failed only if the source had one.
            let frame = self.inner.alloc_frame();
            if let Some(frame) = frame {
                self.give_back(&[frame]);
                self.fire();
            } else {
                self.unclaim(left, 0);
            }
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
        let Err(left) = self.take(out.len()) else {
            let filled = self.inner.alloc_frames(out);
            self.refund(out.len() - filled);
            self.count(filled);
            return filled;
        };
        // The frames before the failing one, and that one, to see whether the
        // source had it: given back if so.
        let before = left as usize;
        let filled = self.inner.alloc_frames(&mut out[..=before]);
        if filled > before {
            self.give_back(&out[before..filled]);
            self.fire();
        } else {
            self.unclaim(left, filled);
        }
        let handed = filled.min(before);
        self.count(handed);
        handed
    }

    fn alloc_frame_2m(&self) -> Option<PhysFrame<Size2MiB>> {
        const FRAMES: usize = (Size2MiB::SIZE / PAGE_SIZE) as usize;
        if let Err(left) = self.take(FRAMES) {
            // A run crossing the failure fails whole, if the source had one.
            let run = self.inner.alloc_frame_2m();
            if let Some(run) = run {
                let first = PhysFrame::containing_address(run.start_address());
                (0..FRAMES as u64).for_each(|i| self.give_back(&[first + i]));
                self.fire();
            } else {
                self.unclaim(left, 0);
            }
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
