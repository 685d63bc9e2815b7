//! The vmalloc area manager: virtually contiguous memory from scattered frames.
//!
//! [`Vmalloc`] manages one virtual region (by default Linux's x86_64 vmalloc range,
//! `0xffffc90000000000..0xffffe90000000000`). Each allocation reserves a contiguous
//! range there, takes 4 KiB frames from wherever the frame allocator finds them, and
//! writes the page-table entries with one pass of the [page-table cursor]. One unmapped
//! guard page follows each area, so running off its end faults instead of corrupting
//! the neighbour. Frees are lazy: see [the purge](purge) for when the TLB is flushed
//! and the frames come back.
//!
//! # Shared top-level tables
//!
//! [`Vmalloc::new`] gives every top-level (PML4) entry of the region a table before it
//! returns, adopting tables that are already there, and never changes or frees those
//! entries afterwards (Linux's `preallocate_vmalloc_pages`). A kernel with processes
//! copies the kernel half of its PML4 into each new address space once, and every
//! area made later is visible there. Lower tables are created as areas need them and
//! freed when a purge leaves them empty; only tables the manager created are freed.
//! For the default 32 TiB region this costs 64 frames (256 KiB).
//!
//! # Failure
//!
//! Every call either succeeds or leaves the manager and the frame allocator as it
//! found them (see [`Error`](crate::Error)): frames for data, page tables and
//! bookkeeping are taken before anything is published, and a failed call gives back
//! every one it took, bookkeeping slabs included. A call that runs out of frames or
//! virtual space while areas wait for the purge purges once and tries again.
//!
//! # Locking
//!
//! All methods take `&self` and serialise on one spin lock (small areas may skip
//! it: see [per-CPU blocks](percpu)), so a kernel keeps one
//! `Vmalloc` in a `static` (`spin::Once`) and calls it from any CPU. The frame
//! allocator has its own lock, taken inside this one; nothing here allocates from a
//! global allocator, and no caller code ([`vunmap`](Vmalloc::vunmap)'s callback, the
//! writer of an [`info`](Vmalloc::info) listing, the consumer of
//! [`areas`](Vmalloc::areas)) runs while the lock is held, so the kernel heap may be
//! built on top without deadlock.
//!
//! # Files
//!
//! | file | holds | uses |
//! |---|---|---|
//! | `options.rs` | the region's bounds, [`VmallocConfig`], [`VmOptions`], [`Prot`] | — |
//! | `manager.rs` | [`Vmalloc`] and its public calls | `locked`, `options` |
//! | `locked.rs` | the state under the lock and the steps calls are made of | `space`, `purge`, `reclaim` |
//! | `purge.rs` | the lazy-free list and the purge | `reclaim`, [`tlb`](crate::tlb) |
//! | `realloc.rs` | `vrealloc` | `locked` |
//! | `huge.rs` | areas backed by 2 MiB pages | `locked` |
//! | `info.rs` | listings and counters | `locked` |
//! | `reclaim.rs` | every frame leaving the manager | [`paging`](crate::paging) |
//! | `space.rs` | free virtual ranges and the area map | `tree`, `slab` |
//! | `tree.rs`, `slab.rs` | the AVL trees, the node pool | the frame source |
//! | `area.rs` | what is recorded per area | `options` |
//! | `deferred.rs` | frees queued by `vfree_atomic` | — |
//! | `percpu.rs` | per-CPU blocks and frame caches for small areas | `locked` |
//! | `diagnose.rs` | what a faulting address is | `locked`, `purge` |
//! | `stack.rs` | kernel stacks with a guard below | `locked` |
//! | `ops.rs`, `owned.rs` | [`VmallocOps`], [`VBox`], [`VBuffer`] | `manager` |
//!
//! [page-table cursor]: crate::paging

mod area;
pub mod deferred;
pub mod diagnose;
pub mod huge;
mod info;
mod locked;
mod manager;
mod ops;
mod options;
mod owned;
pub mod percpu;
pub mod purge;
mod realloc;
mod reclaim;
mod slab;
mod space;
pub mod stack;
mod tree;

pub use area::{AreaInfo, AreaKind};
pub use diagnose::{FaultDiagnosis, FaultSite};
pub use info::{Areas, VmallocInfo, VmallocStats};
pub use manager::Vmalloc;
pub use ops::VmallocOps;
pub use options::{
    CacheMode, DEFAULT_LAZY_THRESHOLD_PAGES, HUGE_PAGE_SIZE, Prot, VMALLOC_END, VMALLOC_SIZE,
    VMALLOC_START, VmFlags, VmOptions, VmallocConfig,
};
pub use owned::{VBox, VBuffer};
pub use stack::{KernelStack, StackCache};
