//! Reaching physical memory from the kernel's address space.
//!
//! Page tables hold physical addresses, but a CPU running with paging on can only
//! dereference virtual ones. Everything in this crate that touches a page table or a
//! frame goes through [`PhysMemory`], so the same code runs in a kernel (which maps all
//! physical memory at a fixed offset, as the `bootloader` crate does) and on the
//! simulated machine (where "physical memory" is a block of host memory).
//!
//! [`OffsetPhysMemory`] is a map of all physical memory at one offset, as boot loaders
//! make it; [`RecursivePhysMemory`] maps physical memory on demand, for kernels with
//! a recursive page table and no such map.

mod recursive;

pub use recursive::RecursivePhysMemory;
use x86_64::{PhysAddr, VirtAddr};

/// Translates physical addresses to pointers the running code may dereference.
///
/// # Safety
///
/// An implementation promises that for every physical address of RAM that the frame
/// allocator hands out or that a page table lives in, [`phys_to_virt`] returns a
/// pointer valid for reads and writes of the whole 4 KiB frame containing it, for as
/// long as the implementation lives, that distinct frames never alias, and that the
/// start of a frame maps to a 4 KiB-aligned pointer (page tables must be aligned, and
/// the bookkeeping finds a slab's header by rounding a pointer down).
///
/// [`phys_to_virt`]: PhysMemory::phys_to_virt
pub unsafe trait PhysMemory {
    /// The pointer through which `phys` is reached.
    fn phys_to_virt(&self, phys: PhysAddr) -> *mut u8;
}

// SAFETY: a shared reference forwards to an implementation that upholds the contract.
unsafe impl<M: PhysMemory + ?Sized> PhysMemory for &M {
    fn phys_to_virt(&self, phys: PhysAddr) -> *mut u8 {
        (**self).phys_to_virt(phys)
    }
}

/// All physical memory mapped at one fixed virtual offset.
///
/// This is the `bootloader` crate's `map_physical_memory` layout, and what the
/// `x86_64` crate's `OffsetPageTable` expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OffsetPhysMemory {
    offset: VirtAddr,
}

impl OffsetPhysMemory {
    /// Physical address `p` is reached at virtual address `offset + p`.
    ///
    /// # Safety
    ///
    /// The caller guarantees that all physical memory the library will touch (every
    /// usable frame and every page table) is mapped read-write at `offset`, and stays
    /// mapped while the returned value or anything built from it is in use, and that
    /// `offset` is 4 KiB-aligned, so that each frame starts on a page of its own
    /// ([`PhysMemory`]'s contract: page tables are read and written in place).
    pub const unsafe fn new(offset: VirtAddr) -> Self {
        Self { offset }
    }

    /// The virtual address at which physical address 0 is mapped.
    pub const fn offset(&self) -> VirtAddr {
        self.offset
    }
}

// SAFETY: `new`'s contract: every frame mapped read-write at `offset + phys`, one
// linear map (distinct frames never alias), from a page boundary (aligned frames).
unsafe impl PhysMemory for OffsetPhysMemory {
    fn phys_to_virt(&self, phys: PhysAddr) -> *mut u8 {
        // Wrapping: an address past the mapping (outside the contract) gives a
        // pointer outside it, never a panic.
        self.offset.as_u64().wrapping_add(phys.as_u64()) as *mut u8
    }
}
