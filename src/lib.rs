//! Virtually contiguous kernel memory built from scattered 4 KiB physical frames,
//! for x86_64 kernels written in Rust: what Linux's `mm/vmalloc.c` gives Linux.
//!
//! The crate is layered, one module per concept:
//!
//! - [`frame`]: a physical frame allocator built from a firmware memory map.
//! - [`phys`]: how the library reaches physical memory ([`PhysMemory`]).
//! - [`tlb`]: the TLB-flush policy ([`TlbFlush`]).
//! - [`paging`]: a page-table cursor that maps, unmaps and protects whole ranges.
//! - [`vmalloc`]: the area manager, [`Vmalloc`](vmalloc::Vmalloc).
//! - [`heap`]: a kernel heap (`GlobalAlloc`) on vmalloc.
//! - [`sim`] (feature `sim`): a simulated machine to test all of the above on the host.
#![no_std]
#![cfg_attr(docsrs, feature(doc_cfg))]
#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

#[cfg(feature = "std")]
extern crate std;

mod error;
pub mod frame;
pub mod heap;
pub mod paging;
pub mod phys;
#[cfg(feature = "sim")]
pub mod sim;
pub mod tlb;
pub mod vmalloc;

pub use error::Error;
pub use frame::FrameSource;
pub use phys::{OffsetPhysMemory, PhysMemory};
pub use tlb::TlbFlush;

/// Size of a base page and of a physical frame, in bytes.
pub const PAGE_SIZE: u64 = 4096;
