//! A [`BitmapFrameAllocator`] behind a spin lock, shared through `&self`, with
//! per-CPU lists of free frames in front of it once it knows the CPUs.

use super::bitmap::{BitmapFrameAllocator, FrameStats};
use super::percpu::{CpuLists, Dry};
use super::{FrameSource, MemoryRegion, Reclaim};
use crate::smp::Cpus;
use crate::sync::{Cpu, IrqLock};
use crate::{Error, TlbFlush};
use x86_64::PhysAddr;
use x86_64::structures::paging::{PageSize, PhysFrame, Size2MiB, Size4KiB};

/// A [`BitmapFrameAllocator`] shared between CPUs: behind a spin lock, and with a
/// list of free frames per CPU in front of it when it knows the kernel's CPUs.
///
/// Built with [`new`](Self::new) (or [`with_storage`](Self::with_storage)), every
/// method takes the lock once per call, bulk ones included, and holds nothing off:
/// the vmalloc manager calls it only with interrupts held off, so an interrupt
/// handler that allocates through the manager never finds the lock held by the code
/// it interrupted there.
///
/// Built [`with_cpus`](Self::with_cpus) or [`with_shootdown`](Self::with_shootdown),
/// the lock is taken with interrupts held off ([`Cpus::irq_save`]) on every call, so
/// a kernel may also call it where an interrupt handler that allocates may land; and
/// single frames ([`alloc`](Self::alloc), [`free`](Self::free), and `FrameSource`'s
/// `alloc_frame` and `free_frame`) come from and go to the calling CPU's list of up
/// to [`CPU_LIST_FRAMES`](super::CPU_LIST_FRAMES) frames without the lock (Linux's
/// per-CPU page lists; see [`percpu`](super::percpu) for how): a free claims the
/// frame's handed-out flag, one locked instruction, and an allocation sets it.
/// Double frees are refused as without the lists, from any CPU, whatever list the
/// frame sits in. Bulk and contiguous calls go to the bitmap in one locked call.
///
/// A frame in a CPU's list is free: [`stats`](Self::stats) and
/// [`is_free`](Self::is_free) count it so, and a call that finds the bitmap dry
/// empties every CPU's list into it and tries again before it fails. With
/// [`with_shootdown`](Self::with_shootdown), other online CPUs empty theirs from their
/// shootdown service at once; with [`with_cpus`](Self::with_cpus), at their next call
/// (an offline CPU's list is taken either way).
pub struct LockedFrameAllocator<'a> {
    inner: IrqLock<BitmapFrameAllocator<'a>>,
    cpus: Option<&'a dyn Cpus>,
    lists: Option<CpuLists<'a>>,
}

impl core::fmt::Debug for LockedFrameAllocator<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("LockedFrameAllocator")
            .field("stats", &self.stats())
            .field("holds_off_interrupts", &self.cpus.is_some())
            .field("cpu_list_frames", &self.cpu_list_frames())
            .finish()
    }
}

/// The frame allocator's lock holder never waits for another CPU, so a waiter spins
/// (and serves nothing: a CPU waiting with its list held must not hand it over).
pub(super) struct Hook<'a>(pub(super) Option<&'a dyn Cpus>);

impl Cpu for Hook<'_> {
    fn irq_cpus(&self) -> Option<&dyn Cpus> {
        self.0
    }

    fn relax(&self) {
        core::hint::spin_loop();
    }
}

impl<'a> LockedFrameAllocator<'a> {
    /// Wraps `allocator`; its lock holds nothing off and there are no CPU lists (see
    /// the type's docs).
    pub fn new(allocator: BitmapFrameAllocator<'a>) -> Self {
        Self {
            inner: IrqLock::new(allocator),
            cpus: None,
            lists: None,
        }
    }

    /// Wraps `allocator` with a list of free frames per CPU of `cpus` (a kernel's
    /// [`Cpus`], or [`OneCpu`](crate::smp::OneCpu) on one CPU); its lock and the lists
    /// are taken with interrupts held off through `cpus`.
    ///
    /// An allocation that finds the bitmap dry empties the calling CPU's list and
    /// every offline CPU's, and asks every other online CPU to empty its own at its
    /// next call: on several CPUs, [`with_shootdown`](Self::with_shootdown) reaches
    /// them at once.
    pub fn with_cpus(allocator: BitmapFrameAllocator<'a>, cpus: &'a dyn Cpus) -> Self {
        Self::with_lists(allocator, cpus, None)
    }

    /// Wraps `allocator` with a list of free frames per CPU of the CPUs `shootdown`
    /// names ([`TlbFlush::cpus`]: a [`Shootdown`](crate::smp::Shootdown)'s), as
    /// [`with_cpus`](Self::with_cpus); an allocation that finds the bitmap dry also
    /// empties every other online CPU's list, through work it runs there
    /// ([`TlbFlush::call_on_other_cpus`], Linux's `drain_all_pages`). A policy that
    /// names no CPUs gets what [`new`](Self::new) makes.
    pub fn with_shootdown(
        allocator: BitmapFrameAllocator<'a>,
        shootdown: &'a (dyn TlbFlush + Sync),
    ) -> Self {
        match shootdown.cpus() {
            Some(cpus) => Self::with_lists(allocator, cpus, Some(shootdown)),
            None => Self::new(allocator),
        }
    }

    fn with_lists(
        mut allocator: BitmapFrameAllocator<'a>,
        cpus: &'a dyn Cpus,
        calls: Option<&'a (dyn TlbFlush + Sync)>,
    ) -> Self {
        let lists = CpuLists::new(&mut allocator, cpus, calls);
        Self {
            inner: IrqLock::new(allocator),
            cpus: Some(cpus),
            lists: Some(lists),
        }
    }

    /// The allocator, locked, for one call.
    fn locked<R>(&self, f: impl FnOnce(&mut BitmapFrameAllocator<'a>) -> R) -> R {
        let hook = Hook(self.cpus);
        f(&mut self.inner.lock(&hook))
    }

    /// Empties every CPU's list into the bitmap (Linux's `drain_all_pages`): the
    /// calling CPU's and every offline CPU's at once, every other online CPU's through
    /// work it runs there when built [`with_shootdown`](Self::with_shootdown), else at
    /// its next call. Returns whether every list was empty when it returned (`true`
    /// without lists). Allocations that find the bitmap dry do this themselves.
    pub fn drain_cpu_lists(&self) -> bool {
        self.lists
            .as_ref()
            .is_none_or(|lists| lists.drain(&self.inner))
    }

    /// Empties every CPU's list into the bitmap, then runs `retry` before an
    /// interrupt handler on this CPU can take frames back into its list (again while
    /// it comes back dry and a list was out of reach; see `CpuLists::drained`).
    fn drained<R: Dry>(&self, mut retry: impl FnMut() -> R) -> R {
        match &self.lists {
            Some(lists) => lists.drained(&self.inner, retry),
            None => retry(),
        }
    }

    /// See [`BitmapFrameAllocator::with_storage`]; no CPU lists.
    ///
    /// # Errors
    ///
    /// As [`BitmapFrameAllocator::with_storage`].
    pub fn with_storage(
        map: impl IntoIterator<Item = MemoryRegion>,
        storage: &'a mut [u64],
    ) -> Result<Self, Error> {
        BitmapFrameAllocator::with_storage(map, storage).map(Self::new)
    }

    /// Runs `f` with the lock held, for several operations in one critical section.
    ///
    /// With CPU lists, `f` sees a frame in any CPU's list as allocated in the
    /// bitmap's counts, but as free to [`BitmapFrameAllocator::is_free`], and its
    /// [`free`](BitmapFrameAllocator::free) refuses it.
    ///
    /// # Safety
    ///
    /// `f` does not put another allocator in the place of this one (`*bitmap = ..`,
    /// `mem::swap`, `mem::replace`): the frames this one handed out would be free in
    /// the other, handed out again while their owners still use them. (Its `free`
    /// and `reclaim` calls are `unsafe` on their own.) Safe code cannot call it:
    ///
    /// ```compile_fail,E0133
    /// use vmalloc::frame::LockedFrameAllocator;
    ///
    /// fn swap_in(frames: &LockedFrameAllocator<'static>, other: &mut vmalloc::frame::BitmapFrameAllocator<'static>) {
    ///     frames.with_lock(|bitmap| core::mem::swap(bitmap, other));
    /// }
    /// ```
    pub unsafe fn with_lock<R>(&self, f: impl FnOnce(&mut BitmapFrameAllocator<'a>) -> R) -> R {
        self.locked(|bitmap| {
            let result = f(bitmap);
            if let Some(lists) = &self.lists {
                lists.check(bitmap);
            }
            result
        })
    }

    /// Gives back the allocator, with the frames of every CPU's list free in it.
    pub fn into_inner(self) -> BitmapFrameAllocator<'a> {
        let mut bitmap = self.inner.into_inner();
        if let Some(lists) = self.lists {
            lists.give_back(&mut bitmap);
        }
        bitmap
    }

    /// One frame: from the calling CPU's list if there are lists, else the lowest
    /// free one ([`BitmapFrameAllocator::alloc`]). `None` when every frame is out.
    #[inline]
    pub fn alloc(&self) -> Option<PhysFrame> {
        match &self.lists {
            Some(lists) => lists.alloc(&self.inner),
            None => self.locked(|bitmap| bitmap.alloc()),
        }
    }

    /// See [`BitmapFrameAllocator::alloc_from`]. With CPU lists, `hint` itself comes
    /// from the calling CPU's list when it is there; other frames in CPU lists are
    /// passed over (and taken back when the bitmap is dry).
    pub fn alloc_from(&self, hint: PhysFrame) -> Option<PhysFrame> {
        if let Some(frame) = self
            .lists
            .as_ref()
            .and_then(|lists| lists.take(&self.inner, hint))
        {
            return Some(frame);
        }
        self.locked(|bitmap| bitmap.alloc_from(hint))
            .or_else(|| self.drained(|| self.locked(|bitmap| bitmap.alloc_from(hint))))
    }

    /// See [`BitmapFrameAllocator::alloc_bulk`]; with CPU lists, short of frames it
    /// empties them into the bitmap and fills the rest.
    pub fn alloc_bulk(&self, out: &mut [PhysFrame]) -> usize {
        let got = self.locked(|bitmap| bitmap.alloc_bulk(out));
        match (&self.lists, out.get_mut(got..)) {
            (Some(_), Some(rest)) if !rest.is_empty() => {
                got + self.drained(|| self.locked(|bitmap| bitmap.alloc_bulk(rest)))
            }
            _ => got,
        }
    }

    /// See [`BitmapFrameAllocator::alloc_contiguous`]; with CPU lists, when no run
    /// is free it empties them into the bitmap and looks again (unless `count` is
    /// more than every free frame: then the lists stay).
    ///
    /// # Errors
    ///
    /// As [`BitmapFrameAllocator::alloc_contiguous`].
    pub fn alloc_contiguous(&self, count: u64, align_frames: u64) -> Result<PhysFrame, Error> {
        match self.locked(|bitmap| bitmap.alloc_contiguous(count, align_frames)) {
            // Emptying the lists helps only a run that all the free frames can make.
            Err(Error::OutOfFrames) if self.lists.is_some() && count <= self.stats().free => {
                self.drained(|| self.locked(|bitmap| bitmap.alloc_contiguous(count, align_frames)))
            }
            result => result,
        }
    }

    /// Returns `frame`: to the calling CPU's list if there are lists, else to the
    /// bitmap ([`BitmapFrameAllocator::free`]).
    ///
    /// # Errors
    ///
    /// As [`BitmapFrameAllocator::free`]: [`Error::FrameNotAllocated`] for a frame
    /// that is free, in any CPU's list too; nothing changes.
    ///
    /// # Safety
    ///
    /// Nothing uses or maps `frame` any more: the allocator hands it out again, and
    /// its next owner writes it. A frame the allocator holds already (a double free)
    /// or does not manage is refused with an error, which is safe; a free of a frame
    /// handed out again since, to another owner, cannot be told from that owner's.
    #[inline]
    pub unsafe fn free(&self, frame: PhysFrame) -> Result<(), Error> {
        match &self.lists {
            // SAFETY: forwarded from the caller.
            Some(lists) => unsafe { lists.free(&self.inner, frame) },
            // SAFETY: forwarded from the caller.
            None => self.locked(|bitmap| unsafe { bitmap.free(frame) }),
        }
    }

    /// See [`BitmapFrameAllocator::free_bulk`]: to the bitmap, in one locked call.
    ///
    /// # Errors
    ///
    /// As [`BitmapFrameAllocator::free_bulk`].
    ///
    /// # Safety
    ///
    /// As [`free`](Self::free), for every frame of `frames`.
    pub unsafe fn free_bulk(&self, frames: &[PhysFrame]) -> Result<(), Error> {
        // SAFETY: forwarded from the caller.
        self.locked(|bitmap| unsafe { bitmap.free_bulk(frames) })
    }

    /// See [`BitmapFrameAllocator::is_free`]: a frame in a CPU's list is free.
    ///
    /// # Errors
    ///
    /// As [`BitmapFrameAllocator::is_free`].
    pub fn is_free(&self, frame: PhysFrame) -> Result<bool, Error> {
        self.locked(|bitmap| bitmap.is_free(frame))
    }

    /// See [`BitmapFrameAllocator::manages`].
    pub fn manages(&self, first: PhysFrame, count: u64) -> bool {
        self.locked(|bitmap| bitmap.manages(first, count))
    }

    /// See [`BitmapFrameAllocator::reclaim`].
    ///
    /// # Safety
    ///
    /// As there.
    pub unsafe fn reclaim(&self, from: Reclaim) -> u64 {
        // SAFETY: forwarded from the caller.
        self.locked(|bitmap| unsafe { bitmap.reclaim(from) })
    }

    /// See [`BitmapFrameAllocator::reclaim_range`].
    ///
    /// # Errors
    ///
    /// As [`BitmapFrameAllocator::reclaim_range`].
    ///
    /// # Safety
    ///
    /// As there.
    pub unsafe fn reclaim_range(&self, range: core::ops::Range<PhysAddr>) -> Result<u64, Error> {
        // SAFETY: forwarded from the caller.
        self.locked(|bitmap| unsafe { bitmap.reclaim_range(range) })
    }

    /// See [`BitmapFrameAllocator::stats`]; frames in CPU lists count as free.
    pub fn stats(&self) -> FrameStats {
        self.locked(|bitmap| {
            let mut stats = bitmap.stats();
            if let Some(lists) = self.lists.as_ref().filter(|lists| lists.serve(bitmap)) {
                let listed = lists.listed().min(stats.used);
                stats.free += listed;
                stats.used -= listed;
            }
            stats
        })
    }

    /// Frames in the CPU lists (a moment's count while CPUs run; 0 without lists).
    /// [`stats`](Self::stats) counts them free.
    pub fn cpu_list_frames(&self) -> u64 {
        self.lists.as_ref().map_or(0, CpuLists::listed)
    }
}

// SAFETY: the bitmap allocator hands out each managed frame once until it is freed,
// takes back exactly the frames it handed out, frees in bulk all-or-nothing, and
// knows which frames it manages; a CPU list holds only frames whose handed-out flag
// it claimed (so no frame is in two lists, or in a list and free in the bitmap) and
// hands each one out once.
unsafe impl FrameSource for LockedFrameAllocator<'_> {
    fn alloc_frame(&self) -> Option<PhysFrame> {
        self.alloc()
    }
    fn alloc_frames(&self, out: &mut [PhysFrame]) -> usize {
        self.alloc_bulk(out)
    }
    fn alloc_frame_2m(&self) -> Option<PhysFrame<Size2MiB>> {
        let frames = Size2MiB::SIZE / Size4KiB::SIZE;
        let first = self.alloc_contiguous(frames, frames).ok()?;
        PhysFrame::from_start_address(first.start_address()).ok()
    }
    unsafe fn free_frame(&self, frame: PhysFrame) -> Result<(), Error> {
        // SAFETY: forwarded from the caller.
        unsafe { self.free(frame) }
    }
    unsafe fn free_frames(&self, frames: &[PhysFrame]) -> Result<(), Error> {
        // SAFETY: forwarded from the caller.
        unsafe { self.free_bulk(frames) }
    }
    fn manages(&self, first: PhysFrame, count: u64) -> bool {
        LockedFrameAllocator::manages(self, first, count)
    }
}
