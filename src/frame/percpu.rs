//! Per-CPU frame lists: Linux's `per_cpu_pages` in front of the bitmap.
//!
//! A [`LockedFrameAllocator`](super::LockedFrameAllocator) that knows the kernel's
//! CPUs keeps a list of up to [`CPU_LIST_FRAMES`] free frames per CPU. A single-frame
//! allocation pops from the calling CPU's list and a single-frame free pushes to it,
//! without the allocator's lock: the list is the CPU's `PerCpu` slot, taken with
//! interrupts held off, so an interrupt handler that allocates frames never lands
//! inside it (code the hold cannot keep out, an NMI, finds the slot held and goes to
//! the bitmap). An empty list takes [`CPU_LIST_BATCH`] frames from the bitmap in one
//! locked call, and a full one gives its [`CPU_LIST_BATCH`] oldest back the same way
//! (Linux's `rmqueue_bulk` and `free_pcppages_bulk`, with `pcp->batch` and
//! `pcp->high`).
//!
//! **Double frees.** A frame in a list is allocated in the bitmap, so the bitmap
//! cannot refuse a second free of it. Every frame carries a flag byte instead, set
//! while the frame is out with a caller (kept after the bitmaps, one byte per frame
//! of a zone: 1/4096 of the memory). The bitmap sets it on every frame it hands out
//! and claims it back on every free, under its lock; a list sets it with a plain
//! store on the frame it hands out (no other CPU touches a clear flag of a frame in a
//! list), and a free through a list claims it with one exchange, from any CPU,
//! without the lock: the only locked instruction on the way. So a free is refused
//! exactly when the flag is clear, wherever the frame is (in the bitmap, in any
//! CPU's list, or on its way into one), a refused free leaves it as it was, and of
//! two frees racing for one frame on two CPUs, one gets through. A byte, not a bit:
//! setting a bit would be a read-modify-write of a word other CPUs claim flags in at
//! the same time, a second locked instruction per frame.
//!
//! **Running dry.** When the bitmap has no frame left, an allocation empties every
//! CPU's list into it and tries again before it gives up (Linux's
//! `drain_all_pages`): its own list at once, an offline CPU's by claiming its slot,
//! and an online CPU's by work that CPU runs in its shootdown service, handing its
//! slot over (`PerCpu::drain_all`), when the allocator was given a flush policy that
//! reaches other CPUs ([`TlbFlush::call_on_other_cpus`]). Without one, an online CPU
//! empties its list at its next call instead, so up to [`CPU_LIST_FRAMES`] frames per
//! other online CPU may be out of reach until then. Bulk and contiguous allocations
//! do the same before they come up short. With a flush policy that reaches the other
//! CPUs, while the retry comes back empty and some list was out of reach (a CPU
//! draining at the same time held it, or its owner was inside a call), it drains and
//! tries again, 64 times at most, serving shootdowns between: CPUs running
//! dry at once mostly find the frames in each other's lists, though a CPU that holds
//! its list longer than those rounds take (its thread descheduled inside a call) can
//! still leave another empty-handed. And the retry takes one frame, not a batch, as
//! does any empty list while the bitmap holds fewer than a batch per online CPU:
//! memory that short is not parked in one list.
//!
//! **Counts.** Each CPU publishes how many frames its list holds (a plain store by the
//! slot's holder); `stats` adds them to the bitmap's free frames under the bitmap's
//! lock, and the lists change their counts only under that lock when frames move
//! between them and the bitmap, so a machine at rest counts every frame once.

use super::bitmap::BitmapFrameAllocator;
use super::handed::Entry;
use super::handed::{self, Handed};
use super::locked::Hook;
use super::zone::frame_number;
use crate::percpu::{Held, Init, PerCpu};
use crate::smp::Cpus;
use crate::sync::{IrqLock, IrqOff};
use crate::{Error, TlbFlush};
use core::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use x86_64::PhysAddr;
use x86_64::structures::paging::PhysFrame;

/// Free frames a CPU's list holds at most (Linux's `pcp->high`).
pub const CPU_LIST_FRAMES: usize = 64;
/// Frames a CPU's list takes from the bitmap when empty, and gives back when full,
/// in one locked call (Linux's `pcp->batch`). An empty list takes a single frame
/// instead while the bitmap holds fewer than a batch for every online CPU: memory
/// that short is not parked in one CPU's list.
pub const CPU_LIST_BATCH: usize = 32;

/// Rounds of draining and retrying an allocation that found every list and the
/// bitmap dry makes at most, while some list could not be reached.
const DRY_ROUNDS: usize = 64;

/// What an allocation that ran dry returns: whether it came back empty.
pub(super) trait Dry {
    /// Whether the allocation got nothing.
    fn is_dry(&self) -> bool;
}

impl<T> Dry for Option<T> {
    fn is_dry(&self) -> bool {
        self.is_none()
    }
}

/// A bulk allocation's count.
impl Dry for usize {
    fn is_dry(&self) -> bool {
        *self == 0
    }
}

impl<T> Dry for Result<T, crate::Error> {
    fn is_dry(&self) -> bool {
        matches!(self, Err(crate::Error::OutOfFrames))
    }
}

const _: () = assert!(CPU_LIST_BATCH > 0 && CPU_LIST_BATCH <= CPU_LIST_FRAMES);

/// How many frames a CPU's list holds: stored by the slot's holder, read by anyone.
pub(super) struct Count(AtomicU64);

impl Init for Count {
    const INIT: Self = Count(AtomicU64::new(0));
}

/// A CPU's free frames, the most recently freed on top.
pub(super) struct List {
    len: usize,
    frames: [Entry; CPU_LIST_FRAMES],
}

impl Init for List {
    const INIT: Self = List {
        len: 0,
        frames: [Entry::NONE; CPU_LIST_FRAMES],
    };
}

impl List {
    /// The frames on the list, oldest first.
    fn frames(&self) -> impl Iterator<Item = PhysFrame> + '_ {
        self.frames[..self.len.min(CPU_LIST_FRAMES)]
            .iter()
            .map(|entry| entry.frame())
    }
}

type Slot<'s> = Held<'s, Count, List>;

/// The bitmap behind its lock.
pub(super) type Bitmap<'a> = IrqLock<BitmapFrameAllocator<'a>>;

/// Every CPU's list, and what the lists need without the bitmap's lock.
pub(super) struct CpuLists<'a> {
    slots: PerCpu<Count, List>,
    handed: Handed<'a>,
    cpus: &'a dyn Cpus,
    /// What reaches other CPUs to drain their lists, if anything.
    calls: Option<&'a (dyn TlbFlush + Sync)>,
    /// The bitmap was swapped for another one inside `with_lock`: the lists are no
    /// longer used, and the frames they held are lost.
    detached: AtomicBool,
}

impl<'a> CpuLists<'a> {
    /// Lists in front of `bitmap`, which keeps its handed-out flags from now on.
    pub(super) fn new(
        bitmap: &mut BitmapFrameAllocator<'a>,
        cpus: &'a dyn Cpus,
        calls: Option<&'a (dyn TlbFlush + Sync)>,
    ) -> Self {
        bitmap.track(true);
        Self {
            slots: PerCpu::new(),
            handed: bitmap.handed(),
            cpus,
            calls,
            detached: AtomicBool::new(false),
        }
    }

    /// `f` on the bitmap, locked with interrupts held off.
    fn locked<R>(
        &self,
        bitmap: &Bitmap<'a>,
        f: impl FnOnce(&mut BitmapFrameAllocator<'a>) -> R,
    ) -> R {
        let hook = Hook(Some(self.cpus));
        f(&mut bitmap.lock(&hook))
    }

    /// Whether the lists still serve `bitmap` (held locked); see `detached`.
    pub(super) fn serve(&self, bitmap: &BitmapFrameAllocator<'a>) -> bool {
        !self.detached.load(Ordering::Relaxed)
            && core::ptr::eq(bitmap.handed_identity(), self.handed.identity())
    }

    /// After `with_lock`: stops using the lists if the bitmap was swapped.
    pub(super) fn check(&self, bitmap: &BitmapFrameAllocator<'a>) {
        if !self.serve(bitmap) {
            self.detached.store(true, Ordering::Relaxed);
        }
    }

    #[inline]
    fn attached(&self) -> bool {
        !self.detached.load(Ordering::Relaxed)
    }

    /// Frames in every CPU's list (a moment's sum while CPUs run).
    pub(super) fn listed(&self) -> u64 {
        self.slots
            .each()
            .map(|(_, count)| count.0.load(Ordering::Relaxed))
            .sum()
    }

    /// The calling CPU's slot, emptied first if another CPU asked for that.
    #[inline]
    fn enter<'s>(&'s self, bitmap: &Bitmap<'a>, irq: &'s IrqOff<'_>) -> Option<Slot<'s>> {
        let mut slot = self.slots.this_cpu(self.cpus, irq)?;
        if slot.take_drain_request() {
            self.spill(bitmap, &mut slot, CPU_LIST_FRAMES);
        }
        Some(slot)
    }

    /// One frame: from the calling CPU's list (refilled from the bitmap when empty),
    /// else from the bitmap; when that is dry too, from every CPU's list.
    #[inline(always)]
    pub(super) fn alloc(&self, bitmap: &Bitmap<'a>) -> Option<PhysFrame> {
        if self.attached() {
            let irq = IrqOff::with(self.cpus);
            if let Some(mut slot) = self.enter(bitmap, &irq) {
                if slot.len == 0 {
                    self.refill(bitmap, &mut slot);
                }
                if let Some(frame) = self.pop(&mut slot) {
                    return Some(frame);
                }
            }
        }
        self.alloc_slow(bitmap)
    }

    /// One frame from the bitmap; when it is dry, from every CPU's list.
    #[cold]
    #[inline(never)]
    fn alloc_slow(&self, bitmap: &Bitmap<'a>) -> Option<PhysFrame> {
        if let Some(frame) = self.locked(bitmap, |bitmap| bitmap.alloc()) {
            return Some(frame);
        }
        // One frame, not a batch for this CPU's list: memory this short stays where
        // every CPU finds it.
        self.drained(bitmap, || self.locked(bitmap, |bitmap| bitmap.alloc()))
    }

    /// Empties every CPU's list into the bitmap, then runs `retry` with interrupts
    /// still held off: no interrupt handler on this CPU takes the frames back into its
    /// list in between. With a flush policy that reaches the other CPUs, while `retry`
    /// fails and some list could not be emptied (a CPU draining at the same time held
    /// it, or its owner was inside a call, which empties it on its next), drains and
    /// tries again, [`DRY_ROUNDS`] times at most, serving shootdowns between. Without
    /// one, the other online CPUs' lists are out of reach until their next call: one
    /// round.
    pub(super) fn drained<R>(&self, bitmap: &Bitmap<'a>, mut retry: impl FnMut() -> R) -> R
    where
        R: Dry,
    {
        let mut round = 0;
        loop {
            let irq = IrqOff::with(self.cpus);
            let reached = self.drain(bitmap);
            let result = retry();
            drop(irq);
            round += 1;
            let Some(calls) = self.calls else {
                return result;
            };
            if !result.is_dry() || reached || round == DRY_ROUNDS {
                return result;
            }
            calls.relax();
        }
    }

    /// `hint` itself if it is on the calling CPU's list (what `alloc_from` finds
    /// first); `None` otherwise.
    pub(super) fn take(&self, bitmap: &Bitmap<'a>, hint: PhysFrame) -> Option<PhysFrame> {
        if !self.attached() {
            return None;
        }
        let irq = IrqOff::with(self.cpus);
        let mut slot = self.enter(bitmap, &irq)?;
        let (count, list) = slot.split();
        let at = list.frames().position(|frame| frame == hint)?;
        let entry = list.frames[at];
        list.frames.copy_within(at + 1..list.len, at);
        list.len -= 1;
        count.0.store(list.len as u64, Ordering::Relaxed);
        self.mark(entry);
        Some(hint)
    }

    /// Gives `frame` back to the calling CPU's list (spilling its oldest frames to
    /// the bitmap when full), or to the bitmap.
    ///
    /// # Safety
    ///
    /// As [`BitmapFrameAllocator::free`].
    #[inline(always)]
    pub(super) unsafe fn free(&self, bitmap: &Bitmap<'a>, frame: PhysFrame) -> Result<(), Error> {
        if self.attached() {
            let (entry, flag) = self
                .handed
                .locate(frame_number(frame))
                .ok_or(Error::FrameNotManaged)?;
            if self.push(bitmap, entry, flag) {
                return Ok(());
            }
            return Err(self.refusal(bitmap, frame));
        }
        // SAFETY: forwarded from the caller.
        unsafe { self.free_slow(bitmap, frame) }
    }

    /// Gives `frame` back to the bitmap.
    ///
    /// # Safety
    ///
    /// As [`BitmapFrameAllocator::free`].
    #[cold]
    #[inline(never)]
    unsafe fn free_slow(&self, bitmap: &Bitmap<'a>, frame: PhysFrame) -> Result<(), Error> {
        // SAFETY: forwarded from the caller.
        self.locked(bitmap, |bitmap| unsafe { bitmap.free(frame) })
    }

    /// Claims a frame (whose handed-out flag is `flag`) and pushes it on the calling
    /// CPU's list, or gives it to the bitmap when the list cannot be had (an NMI
    /// that landed inside it): whether the claim held. The claim comes before the
    /// slot is taken: the exchange then waits for fewer stores to drain (a quarter
    /// of a single-frame alloc+free in the frame bench), and with interrupts
    /// held off no handler on this CPU sees the frame between the claim and the
    /// list.
    #[inline(always)]
    fn push(&self, bitmap: &Bitmap<'a>, entry: Entry, flag: &AtomicU8) -> bool {
        let irq = IrqOff::with(self.cpus);
        if !handed::claim(flag) {
            return false;
        }
        let Some(mut slot) = self.enter(bitmap, &irq) else {
            self.free_claimed(bitmap, entry);
            return true;
        };
        if slot.len >= CPU_LIST_FRAMES {
            self.spill(bitmap, &mut slot, CPU_LIST_BATCH);
        }
        let (count, list) = slot.split();
        match list.frames.get_mut(list.len) {
            Some(top) => {
                *top = entry;
                list.len += 1;
                count.0.store(list.len as u64, Ordering::Relaxed);
            }
            // Unreachable (the spill made room); should it happen, the bitmap takes
            // the claimed frame.
            None => self.free_claimed(bitmap, entry),
        }
        true
    }

    /// Gives a claimed frame that no list takes to the bitmap.
    #[cold]
    #[inline(never)]
    fn free_claimed(&self, bitmap: &Bitmap<'a>, entry: Entry) {
        self.locked(bitmap, |bitmap| {
            // Frames of a bitmap swapped out are not this one's to take: lost.
            if self.serve(bitmap) {
                bitmap.free_listed([entry.frame()]);
            }
        });
    }

    /// Why a free whose claim failed is refused: the bitmap's answer for a frame
    /// that is free, or not managed.
    #[cold]
    #[inline(never)]
    fn refusal(&self, bitmap: &Bitmap<'a>, frame: PhysFrame) -> Error {
        match self.locked(bitmap, |bitmap| bitmap.is_free(frame)) {
            Err(error) => error,
            Ok(_) => Error::FrameNotAllocated,
        }
    }

    /// Marks a frame of a list out with its caller.
    #[inline]
    fn mark(&self, entry: Entry) {
        if let Some(flag) = self.handed.flag(entry) {
            handed::mark(flag);
        }
    }

    /// The top frame of a held list, marked out with its caller.
    #[inline]
    fn pop(&self, slot: &mut Slot<'_>) -> Option<PhysFrame> {
        let (count, list) = slot.split();
        let len = list.len.checked_sub(1)?;
        let entry = *list.frames.get(len)?;
        list.len = len;
        count.0.store(len as u64, Ordering::Relaxed);
        self.mark(entry);
        Some(entry.frame())
    }

    /// Fills an empty held list with up to a batch of frames from the bitmap, the
    /// lowest on top.
    #[cold]
    #[inline(never)]
    fn refill(&self, bitmap: &Bitmap<'a>, slot: &mut Slot<'_>) {
        let (count, list) = slot.split();
        if list.len > 0 {
            return;
        }
        self.locked(bitmap, |bitmap| {
            if !self.serve(bitmap) {
                return;
            }
            let mut taken = [PhysFrame::containing_address(PhysAddr::zero()); CPU_LIST_BATCH];
            let low = bitmap.stats().free < (CPU_LIST_BATCH * self.cpus.online().len()) as u64;
            let want = if low { 1 } else { CPU_LIST_BATCH };
            let got = bitmap.alloc_bulk_listed(&mut taken[..want]);
            list.len = 0;
            // The lowest frame on top.
            for &frame in taken[..got].iter().rev() {
                match self.handed.locate(frame_number(frame)) {
                    Some((entry, _)) => {
                        list.frames[list.len] = entry;
                        list.len += 1;
                    }
                    None => bitmap.free_listed([frame]), // never: the bitmap's own frame
                }
            }
            count.0.store(list.len as u64, Ordering::Relaxed);
        });
    }

    /// Gives the `want` oldest frames of a held list (all of them, at most) back to
    /// the bitmap, in one locked call.
    #[cold]
    #[inline(never)]
    fn spill(&self, bitmap: &Bitmap<'a>, slot: &mut Slot<'_>, want: usize) {
        let (count, list) = slot.split();
        let len = list.len.min(CPU_LIST_FRAMES);
        let gone = want.min(len);
        if gone == 0 {
            return;
        }
        self.locked(bitmap, |bitmap| {
            // Frames of a bitmap swapped out are not this one's to take: lost.
            if self.serve(bitmap) {
                bitmap.free_listed(list.frames[..gone].iter().map(|entry| entry.frame()));
            }
            list.frames.copy_within(gone..len, 0);
            list.len = len - gone;
            count.0.store(list.len as u64, Ordering::Relaxed);
        });
    }

    /// Empties every CPU's list into the bitmap (see the module docs); whether all
    /// of them were emptied before it returned. Call it with no lock of the library
    /// held and the calling CPU's slot not held.
    pub(super) fn drain(&self, bitmap: &Bitmap<'a>) -> bool {
        self.slots.drain_all(
            self.cpus,
            |count| count.0.load(Ordering::Relaxed) > 0,
            |work| {
                self.calls
                    .is_some_and(|calls| calls.call_on_other_cpus(work))
            },
            || match self.calls {
                Some(calls) => calls.relax(),
                None => core::hint::spin_loop(),
            },
            |slot| self.spill(bitmap, slot, CPU_LIST_FRAMES),
        )
    }

    /// Gives every list's frames back to `bitmap` and stops its flags, when the
    /// allocator is taken apart.
    pub(super) fn give_back(self, bitmap: &mut BitmapFrameAllocator<'a>) {
        if !self.serve(bitmap) {
            return;
        }
        for list in self.slots.into_owned() {
            bitmap.free_listed(list.frames());
        }
        bitmap.track(false);
    }
}
