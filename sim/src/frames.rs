//! Frames of a simulated machine, handed out scattered.

use super::{Rng, SimMachine};
use std::boxed::Box;
use std::mem::ManuallyDrop;
use std::sync::Mutex;
use std::vec;
use vmalloc::frame::{BitmapFrameAllocator, FrameStats, LockedFrameAllocator};
use vmalloc::{Error, FrameSource, PAGE_SIZE};
use x86_64::structures::paging::{PhysFrame, Size2MiB};
use x86_64::{PhysAddr, VirtAddr};

/// A frame allocator over a [`SimMachine`]'s usable memory.
///
/// With a scatter seed ([`SimConfig::with_scatter_seed`](super::SimConfig::with_scatter_seed))
/// each frame is the first free one at or after a random frame, so consecutive
/// allocations land all over memory: "scattered frames" are the normal case in
/// tests, as on a machine that has run for a while. Without a seed it hands out the
/// lowest free frame, in bulk.
pub struct SimFrames {
    allocator: ManuallyDrop<LockedFrameAllocator<'static>>,
    /// The allocator's bitmap words, owned here and freed after the allocator.
    storage: *mut [u64],
    scatter: Option<Mutex<Rng>>,
    frames_in_memory: u64,
    /// The machine's CPUs: each call is an interrupt point of the calling CPU.
    cpus: std::sync::Arc<super::cpu::Cpus>,
}

// SAFETY: `storage` is only reached through the allocator, which locks.
unsafe impl Send for SimFrames {}
// SAFETY: as for `Send`.
unsafe impl Sync for SimFrames {}

impl SimMachine {
    /// A fresh frame allocator over this machine's usable memory (see [`SimFrames`]).
    ///
    /// # Panics
    ///
    /// Never for a machine built by [`SimMachine::new`], whose map always has usable
    /// memory.
    pub fn frames(&self) -> SimFrames {
        let map = self.memory_map().iter().cloned();
        let words = BitmapFrameAllocator::storage_words(map.clone());
        let storage = Box::into_raw(vec![0u64; words].into_boxed_slice());
        // SAFETY: `storage` is a fresh allocation that `SimFrames` frees only after
        // dropping the allocator that borrows it.
        let words = unsafe { &mut *storage };
        let allocator = BitmapFrameAllocator::with_storage(map, words)
            .expect("a simulated machine's memory map has usable memory");
        SimFrames {
            allocator: ManuallyDrop::new(LockedFrameAllocator::new(allocator)),
            storage,
            scatter: self.scatter_seed().map(|seed| Mutex::new(Rng::new(seed))),
            frames_in_memory: self.memory_size() / PAGE_SIZE,
            cpus: self.cpus.clone(),
        }
    }
}

impl SimFrames {
    /// The allocator behind this source, for stats and direct use.
    pub fn allocator(&self) -> &LockedFrameAllocator<'static> {
        &self.allocator
    }

    /// Total, free and used frames.
    pub fn stats(&self) -> FrameStats {
        self.allocator.stats()
    }

    fn random_frame(&self, rng: &Mutex<Rng>) -> PhysFrame {
        let index = rng.lock().expect("rng lock").below(self.frames_in_memory);
        PhysFrame::containing_address(PhysAddr::new(index * PAGE_SIZE))
    }
}

// SAFETY: every frame comes from the locked bitmap allocator over the machine's
// usable memory, which the machine reaches through `SimPhys`.
unsafe impl FrameSource for SimFrames {
    fn alloc_frame(&self) -> Option<PhysFrame> {
        self.cpus.point();
        match &self.scatter {
            Some(rng) => self.allocator.alloc_from(self.random_frame(rng)),
            None => self.allocator.alloc(),
        }
    }

    fn alloc_frames(&self, out: &mut [PhysFrame]) -> usize {
        self.cpus.point();
        if self.scatter.is_none() {
            return self.allocator.alloc_bulk(out);
        }
        let mut filled = 0;
        for slot in out.iter_mut() {
            let Some(frame) = self.alloc_frame() else {
                break;
            };
            *slot = frame;
            filled += 1;
        }
        filled
    }

    fn alloc_frame_2m(&self) -> Option<PhysFrame<Size2MiB>> {
        self.cpus.point();
        self.allocator.alloc_frame_2m()
    }

    unsafe fn free_frame(&self, frame: PhysFrame) -> Result<(), Error> {
        self.cpus.point();
        // SAFETY: forwarded from the caller.
        unsafe { self.allocator.free(frame) }
    }

    unsafe fn free_frames(&self, frames: &[PhysFrame]) -> Result<(), Error> {
        self.cpus.point();
        // SAFETY: forwarded from the caller.
        unsafe { self.allocator.free_bulk(frames) }
    }

    fn manages(&self, first: PhysFrame, count: u64) -> bool {
        self.allocator.manages(first, count)
    }
}

impl Drop for SimFrames {
    fn drop(&mut self) {
        // SAFETY: the allocator is dropped once, here, before the storage it borrows.
        unsafe {
            ManuallyDrop::drop(&mut self.allocator);
            drop(Box::from_raw(self.storage));
        }
    }
}

/// Written into every frame a [`PoisonOnFree`] takes back.
pub const POISON: u8 = 0x6b;

/// A frame source in front of a [`SimFrames`] that writes [`POISON`] into every frame
/// at the moment it comes back, and records every CPU whose TLB still holds a
/// translation to it, or whose paging-structure cache still points to it as a
/// table: that CPU would read the poison (and later the next owner's data) through
/// it, or walk it as a page table. A frame returned before the flush that covers its translations
/// shows in [`stale_reads`](Self::stale_reads), whatever the manager does afterwards.
/// A frame the allocator does not hold as allocated (a double free) is passed on
/// untouched, to be refused there. Host code reading through a host window's
/// mapping of the page (filled before the unmap, and not yet taken away by a flush)
/// reads the poison too, but is not recorded: only the simulated CPUs' TLBs and
/// paging-structure caches are searched.
pub struct PoisonOnFree<'m> {
    frames: &'m SimFrames,
    machine: &'m SimMachine,
    poisoned: std::sync::atomic::AtomicU64,
    stale: Mutex<vec::Vec<StaleRead>>,
}

/// A translation a CPU still cached when its frame came back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StaleRead {
    /// The CPU.
    pub cpu: usize,
    /// The page it could still read the frame through; `None` for a page table its
    /// paging-structure cache could still walk through.
    pub addr: Option<VirtAddr>,
    /// The frame that had come back.
    pub frame: PhysFrame,
}

impl<'m> PoisonOnFree<'m> {
    /// Frames from `frames`, over `machine`'s memory and TLBs.
    pub fn new(machine: &'m SimMachine, frames: &'m SimFrames) -> Self {
        Self {
            frames,
            machine,
            poisoned: std::sync::atomic::AtomicU64::new(0),
            stale: Mutex::new(vec::Vec::new()),
        }
    }

    /// Frames poisoned so far.
    pub fn poisoned(&self) -> u64 {
        self.poisoned.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Each frame that came back while a CPU could still reach it.
    pub fn stale_reads(&self) -> vec::Vec<StaleRead> {
        self.stale.lock().expect("stale reads").clone()
    }

    fn poison(&self, frame: PhysFrame) {
        if self.frames.allocator().is_free(frame) != Ok(false) {
            return;
        }
        // SAFETY: the frame's owner is giving it back (`free_frame`'s contract):
        // nothing lives in it any more.
        unsafe {
            self.machine
                .fill_phys(frame.start_address(), PAGE_SIZE as usize, POISON)
        };
        self.poisoned
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        for cpu in 0..self.machine.cpu_count() {
            let pages: vec::Vec<u64> = self
                .machine
                .lock_tlb_of(cpu)
                .pages_reaching(frame.start_address().as_u64())
                .collect();
            let mut stale = self.stale.lock().expect("stale reads");
            stale.extend(pages.into_iter().map(|vpn| StaleRead {
                cpu,
                addr: Some(VirtAddr::new_truncate(vpn << 12)),
                frame,
            }));
            if self
                .machine
                .lock_tlb_of(cpu)
                .walks_through(frame.start_address().as_u64())
            {
                stale.push(StaleRead {
                    cpu,
                    addr: None,
                    frame,
                });
            }
        }
    }
}

// SAFETY: every call forwards to `SimFrames`, which upholds the contract; poisoning
// writes only frames that were just handed back, which nobody owns.
unsafe impl FrameSource for &PoisonOnFree<'_> {
    fn alloc_frame(&self) -> Option<PhysFrame> {
        self.frames.alloc_frame()
    }
    fn alloc_frames(&self, out: &mut [PhysFrame]) -> usize {
        self.frames.alloc_frames(out)
    }
    fn alloc_frame_2m(&self) -> Option<PhysFrame<Size2MiB>> {
        self.frames.alloc_frame_2m()
    }
    unsafe fn free_frame(&self, frame: PhysFrame) -> Result<(), Error> {
        self.poison(frame);
        // SAFETY: forwarded from the caller.
        unsafe { self.frames.free_frame(frame) }
    }
    unsafe fn free_frames(&self, frames: &[PhysFrame]) -> Result<(), Error> {
        // All or none come back: a list the allocator will refuse (a frame free
        // already, or twice in it) poisons nothing, as its other frames stay their
        // owner's.
        // No allocation here: the manager frees under its lock, and the global
        // allocator may be a kernel heap over it. Lists are a gather's chunk long.
        let distinct = (1..frames.len()).all(|i| !frames[..i].contains(&frames[i]));
        let held = |frame: &PhysFrame| self.frames.allocator().is_free(*frame) == Ok(false);
        if distinct && frames.iter().all(held) {
            frames.iter().for_each(|&frame| self.poison(frame));
        }
        // SAFETY: forwarded from the caller.
        unsafe { self.frames.free_frames(frames) }
    }
    fn manages(&self, first: PhysFrame, count: u64) -> bool {
        self.frames.manages(first, count)
    }
}
