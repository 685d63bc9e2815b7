//! Virtually contiguous kernel memory built from scattered 4 KiB physical frames,
//! for x86_64 kernels written in Rust: what Linux's `mm/vmalloc.c` gives Linux.
//!
//! # Layout
//!
//! One module per concept, from the heap down to the frames. Four of them form one
//! layer every other module uses, and they use each other: [`tlb`] (a flush policy
//! names the kernel's CPUs), [`smp`], `sync` (a lock serves shootdowns while it
//! waits) and `percpu`. Each module's uses:
//!
//! | module | holds | uses |
//! |---|---|---|
//! | [`heap`] | [`KernelHeap`](heap::KernelHeap): a `GlobalAlloc` whose blocks up to a page come from size-class slabs (each CPU carving and freeing into slabs of its own, SLUB's fast path), middle ones from `linked_list_allocator` in a growing vmalloc window, large ones from vmalloc | `vmalloc`, and the layer |
//! | [`vmalloc`] | [`Vmalloc`]: areas in a virtual region, guard pages, lazy purge ([`vmalloc::purge`]), 2 MiB mappings ([`vmalloc::huge`]), `vrealloc`, listings, fault diagnosis, kernel stacks; its files are mapped in its own docs | `paging`, `frame`, `phys`, and the layer |
//! | [`paging`] | [`PageTables`](paging::PageTables): a cursor that maps, unmaps, detaches and protects whole ranges in one walk (2 MiB entries included), and `#[must_use]` flush tokens | `frame`, `phys`, `tlb` |
//! | [`smp`] | [`Shootdown`](smp::Shootdown): a [`TlbFlush`] that reaches every CPU through IPIs and mailboxes, and runs work on other CPUs | `percpu`, `sync`, `tlb` |
//! | `percpu` | `PerCpu`: the one per-CPU primitive (the shootdown mailboxes, the heap's per-CPU slabs, the vmalloc blocks' caches, the stack cache): state its CPU touches with interrupts held off and no locked instruction, claimed when its CPU is offline, drained by work on each CPU | `smp`, `sync` |
//! | `sync` | locks an interrupt handler may reach (taken with interrupts held off), and the one wait loop, which serves shootdowns while it spins | `smp`, `tlb`, `vmalloc` (its `VmallocOps` waits as a CPU) |
//! | [`tlb`] | [`TlbFlush`]: how stale translations are dropped, each policy's ceiling between range and full flushes | `smp` |
//! | [`boot`] | memory maps from `bootloader`, Limine, multiboot2 and UEFI as [`MemoryRegion`](frame::MemoryRegion)s (one feature each), usable, reclaimable later, or never | `frame`, `phys` |
//! | [`frame`] | [`FrameSource`], [`BitmapFrameAllocator`](frame::BitmapFrameAllocator) (a hierarchical bitmap from a firmware memory map, reclaimable memory taken later), its lock, early frames, fault injection | `phys`, `boot` (the 52-bit limit), and the layer (the per-CPU frame lists) |
//! | [`phys`] | [`PhysMemory`]: how code reaches physical memory ([`OffsetPhysMemory`], or [`RecursivePhysMemory`](phys::RecursivePhysMemory) on demand) | — |
//!
//! Beside the library, in the same workspace: `vmalloc-sim` (`sim/`), a simulated
//! machine (host memory as physical memory, a software MMU and a TLB that only a
//! flush updates) that runs all of the above in `cargo test`, a missing flush
//! included; `qemu-kernel/`, a test kernel that proves it on a real MMU;
//! `benches/`, criterion benchmarks against peers.
//!
//! Nothing here needs a global allocator: bookkeeping grows from frames.
//!
//! # Example
//!
//! ```
//! use vmalloc::{Vmalloc, VmallocConfig};
//! use vmalloc_sim::{SimConfig, SimMachine};
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
//! // SAFETY: the area's bytes hold no Rust value.
//! unsafe { machine.write(addr + 4000u64, b"across a page boundary") }.unwrap();
//! let mut back = [0; 22];
//! machine.read(addr + 4000u64, &mut back).unwrap();
//! assert_eq!(&back, b"across a page boundary");
//! // SAFETY: nothing uses the buffer after this (safe code frees through owners:
//! // `VBuffer`, `VBox`); a pointer to no live area is refused with an error.
//! unsafe {
//!     vm.vfree(buffer.as_ptr())?;
//!     assert_eq!(vm.vfree(buffer.as_ptr()), Err(vmalloc::Error::NotAllocated));
//! }
//! # Ok::<(), vmalloc::Error>(())
//! ```
#![no_std]
#![cfg_attr(docsrs, feature(doc_cfg))]
#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

#[cfg(test)]
extern crate std;

pub mod boot;
mod error;
pub mod frame;
pub mod heap;
pub mod paging;
mod percpu;
pub mod phys;
pub mod smp;
mod sync;
pub mod tlb;
pub mod vmalloc;

pub use error::Error;
pub use frame::FrameSource;
pub use phys::{OffsetPhysMemory, PhysMemory};
pub use tlb::TlbFlush;
pub use vmalloc::{Prot, VmFlags, VmOptions, Vmalloc, VmallocConfig, VmallocOps};

/// The manager as a kernel with one CPU usually sets it up: frames from a
/// [`LockedFrameAllocator`](frame::LockedFrameAllocator) in a `static`, all physical
/// memory mapped at an offset, `invlpg` for flushes (see `examples/kernel_setup.rs`).
pub type KernelVmalloc =
    Vmalloc<&'static frame::LockedFrameAllocator<'static>, OffsetPhysMemory, tlb::InvlpgFlush>;

/// Size of a base page and of a physical frame, in bytes.
pub const PAGE_SIZE: u64 = 4096;
