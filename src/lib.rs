//! Virtually contiguous kernel memory built from scattered 4 KiB physical frames,
//! for x86_64 kernels written in Rust: what Linux's `mm/vmalloc.c` gives Linux.
//!
//! # Architecture
//!
//! One module per concept, each usable on its own:
//!
//! - [`frame`] hands out physical frames. [`BitmapFrameAllocator`](frame::BitmapFrameAllocator)
//!   is built from a firmware memory map and keeps a hierarchical bitmap, so finding a
//!   single free frame costs about the same at 0% and 99% use; [`LockedFrameAllocator`](frame::LockedFrameAllocator)
//!   shares it between CPUs as a [`FrameSource`].
//! - [`phys`] says how the code reaches physical memory ([`PhysMemory`]); a kernel
//!   that maps all of it at an offset uses [`OffsetPhysMemory`].
//! - [`paging`] is a cursor over x86_64 page tables ([`PageTables`](paging::PageTables)):
//!   it maps, unmaps and protects whole ranges in one walk, takes every table frame
//!   it needs before writing, and returns `#[must_use]` flush tokens for [`TlbFlush`].
//! - [`vmalloc`] is the area manager ([`Vmalloc`](vmalloc::Vmalloc)): it reserves
//!   virtual ranges (lowest fit, O(log n)), backs them with frames, keeps a guard page
//!   after each area and batches TLB flushes lazily, as Linux does, but returns frames
//!   only after the flush that covers them.
//! - [`heap`] is a `GlobalAlloc` ([`KernelHeap`](heap::KernelHeap)) on vmalloc: small
//!   blocks from `linked_list_allocator` in a growing window, large ones from vmalloc.
//! - [`sim`] (feature `sim`) is a simulated machine: host memory as physical memory, a
//!   software MMU and a TLB that only a flush updates, so all of the above runs in
//!   `cargo test`, a missing flush included.
//!
//! Nothing here needs a global allocator: bookkeeping grows from frames.
//!
//! # Example
//!
//! ```
//! use vmalloc_sim::{SimConfig, SimMachine};
//! use vmalloc::vmalloc::{Vmalloc, VmallocConfig};
//! use x86_64::VirtAddr;
//!
//! let machine = SimMachine::new(SimConfig::new(64 << 20).with_scatter_seed(1));
//! let frames = machine.frames();
//! // SAFETY: the machine's page tables belong to this manager alone.
//! let vm = unsafe {
//!     Vmalloc::new(VmallocConfig::default(), machine.root(), machine.phys(), &frames, &machine)
//! }?;
//! let buffer = vm.vmalloc(64 << 10)?;
//! let addr = VirtAddr::from_ptr(buffer.as_ptr());
//! machine.write(addr + 4000u64, b"across a page boundary").unwrap();
//! let mut back = [0; 22];
//! machine.read(addr + 4000u64, &mut back).unwrap();
//! assert_eq!(&back, b"across a page boundary");
//! vm.vfree(buffer.as_ptr())?;
//! assert_eq!(vm.vfree(buffer.as_ptr()), Err(vmalloc::Error::NotAllocated));
//! # Ok::<(), vmalloc::Error>(())
//! ```
#![no_std]
#![cfg_attr(docsrs, feature(doc_cfg))]
#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

#[cfg(test)]
extern crate std;

mod error;
pub mod frame;
pub mod heap;
pub mod paging;
pub mod phys;
pub mod tlb;
pub mod vmalloc;

pub use error::Error;
pub use frame::FrameSource;
pub use phys::{OffsetPhysMemory, PhysMemory};
pub use tlb::TlbFlush;

/// Size of a base page and of a physical frame, in bytes.
pub const PAGE_SIZE: u64 = 4096;
