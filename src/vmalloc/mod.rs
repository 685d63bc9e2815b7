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
//! Tables found in the region at `new` (a boot loader's, or the kernel's own made
//! with this crate's [`PageTables`](crate::paging::PageTables)) are adopted and
//! never freed, and must map nothing there (`new` refuses a region that does). A
//! table that also serves addresses outside the region (a region that starts or ends
//! inside a 2 MiB or 1 GiB span) may be shared with the kernel's mappings there: a
//! purge never frees it, the drop does if it is empty and the crate made it. Two
//! managers never share a table: `new` refuses a region whose top-level entries a
//! live manager of the same address space uses (see [`claims`]).
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
//! it: see [per-CPU blocks](blocks)), so a kernel keeps one
//! `Vmalloc` in a `static` (`spin::Once`) and calls it from any CPU. The frame
//! allocator has its own lock, taken inside this one; nothing here allocates from a
//! global allocator, and no caller code ([`vunmap`](Vmalloc::vunmap)'s callback, the
//! writer of an [`info`](Vmalloc::info) listing, the consumer of
//! [`areas`](Vmalloc::areas)) runs while the lock is held, so the kernel heap may be
//! built on top without deadlock.
//!
//! # Owners and raw pointers
//!
//! The safe way to hold vmalloc memory is an owner that frees or unmaps it on drop:
//! [`VBuffer`], [`VBox`], [`VMapping`] (`vmap`), [`IoMapping`] (`ioremap`),
//! [`KernelStack`], and the kernel heap's blocks. The raw-pointer calls that free,
//! move or change an area (`vfree`, `vfree_atomic`, `vrealloc`, `set_prot`,
//! `vunmap`, `iounmap`) are `unsafe fn`s, so safe code holding an owner's pointer
//! cannot free the area under it: each line below fails to compile (E0133, a call to
//! an unsafe function), and compiles once an `unsafe` block vouches for it, as the
//! last example shows. A bad pointer passed to them (never allocated, freed already,
//! interior) is refused with an [`Error`](crate::Error) and changes nothing; what
//! their `# Safety` sections ask is only that no reference into a live area
//! survives its free.
//!
//! ```compile_fail,E0133
//! # use vmalloc::{FrameSource, Prot, Vmalloc, VmallocConfig};
//! # use vmalloc::vmalloc::{CacheMode, IoMapping, VBuffer, VMapping};
//! # use vmalloc_sim::{SimConfig, SimMachine};
//! # use x86_64::PhysAddr;
//! # let machine = SimMachine::new(SimConfig::new(64 << 20).with_host_window(4 << 30));
//! # let frames = machine.frames();
//! # // SAFETY: the machine's page tables belong to this manager alone, and its host
//! # // window maps the region here.
//! # let vm = unsafe { vmalloc_sim::scenarios::window_manager(&machine, &frames, &machine) };
//! let mut buffer = VBuffer::new(&vm, 4096).unwrap();
//! vm.vfree(buffer.as_ptr()).unwrap();
//! buffer[0] = b'X'; // would write into whoever owns the frame next
//! ```
//!
//! ```compile_fail,E0133
//! # use vmalloc::{FrameSource, Prot, Vmalloc, VmallocConfig};
//! # use vmalloc::vmalloc::{CacheMode, IoMapping, VBuffer, VMapping};
//! # use vmalloc_sim::{SimConfig, SimMachine};
//! # use x86_64::PhysAddr;
//! # let machine = SimMachine::new(SimConfig::new(64 << 20).with_host_window(4 << 30));
//! # let frames = machine.frames();
//! # // SAFETY: the machine's page tables belong to this manager alone, and its host
//! # // window maps the region here.
//! # let vm = unsafe { vmalloc_sim::scenarios::window_manager(&machine, &frames, &machine) };
//! let buffer = VBuffer::new(&vm, 4096).unwrap();
//! vm.vfree_atomic(buffer.as_ptr()).unwrap();
//! ```
//!
//! ```compile_fail,E0133
//! # use vmalloc::{FrameSource, Prot, Vmalloc, VmallocConfig};
//! # use vmalloc::vmalloc::{CacheMode, IoMapping, VBuffer, VMapping};
//! # use vmalloc_sim::{SimConfig, SimMachine};
//! # use x86_64::PhysAddr;
//! # let machine = SimMachine::new(SimConfig::new(64 << 20).with_host_window(4 << 30));
//! # let frames = machine.frames();
//! # // SAFETY: the machine's page tables belong to this manager alone, and its host
//! # // window maps the region here.
//! # let vm = unsafe { vmalloc_sim::scenarios::window_manager(&machine, &frames, &machine) };
//! let buffer = VBuffer::new(&vm, 8192).unwrap();
//! vm.vrealloc(buffer.as_ptr(), 4096).unwrap();
//! ```
//!
//! ```compile_fail,E0133
//! # use vmalloc::{FrameSource, Prot, Vmalloc, VmallocConfig};
//! # use vmalloc::vmalloc::{CacheMode, IoMapping, VBuffer, VMapping};
//! # use vmalloc_sim::{SimConfig, SimMachine};
//! # use x86_64::PhysAddr;
//! # let machine = SimMachine::new(SimConfig::new(64 << 20).with_host_window(4 << 30));
//! # let frames = machine.frames();
//! # // SAFETY: the machine's page tables belong to this manager alone, and its host
//! # // window maps the region here.
//! # let vm = unsafe { vmalloc_sim::scenarios::window_manager(&machine, &frames, &machine) };
//! let buffer = VBuffer::new(&vm, 4096).unwrap();
//! vm.set_prot(buffer.as_ptr(), Prot::READ).unwrap();
//! ```
//!
//! ```compile_fail,E0133
//! # use vmalloc::{FrameSource, Prot, Vmalloc, VmallocConfig};
//! # use vmalloc::vmalloc::{CacheMode, IoMapping, VBuffer, VMapping};
//! # use vmalloc_sim::{SimConfig, SimMachine};
//! # use x86_64::PhysAddr;
//! # let machine = SimMachine::new(SimConfig::new(64 << 20).with_host_window(4 << 30));
//! # let frames = machine.frames();
//! # // SAFETY: the machine's page tables belong to this manager alone, and its host
//! # // window maps the region here.
//! # let vm = unsafe { vmalloc_sim::scenarios::window_manager(&machine, &frames, &machine) };
//! # let mine = [frames.alloc_frame().unwrap()];
//! let mapping = unsafe { VMapping::new(&vm, &mine, Prot::KERNEL_RW) }.unwrap();
//! vm.vunmap(mapping.as_ptr(), |_| {}).unwrap();
//! ```
//!
//! ```compile_fail,E0133
//! # use vmalloc::{FrameSource, Prot, Vmalloc, VmallocConfig};
//! # use vmalloc::vmalloc::{CacheMode, IoMapping, VBuffer, VMapping};
//! # use vmalloc_sim::{SimConfig, SimMachine};
//! # use x86_64::PhysAddr;
//! # let machine = SimMachine::new(SimConfig::new(64 << 20).with_host_window(4 << 30));
//! # let frames = machine.frames();
//! # // SAFETY: the machine's page tables belong to this manager alone, and its host
//! # // window maps the region here.
//! # let vm = unsafe { vmalloc_sim::scenarios::window_manager(&machine, &frames, &machine) };
//! let device = unsafe { IoMapping::new(&vm, PhysAddr::new(0xfee0_0000), 0x400, CacheMode::Uncached) }.unwrap();
//! vm.iounmap(device.as_ptr()).unwrap();
//! ```
//!
//! ```
//! # use vmalloc::{FrameSource, Prot, Vmalloc, VmallocConfig};
//! # use vmalloc::vmalloc::{CacheMode, IoMapping, VBuffer, VMapping};
//! # use vmalloc_sim::{SimConfig, SimMachine};
//! # use x86_64::PhysAddr;
//! # let machine = SimMachine::new(SimConfig::new(64 << 20).with_host_window(4 << 30));
//! # let frames = machine.frames();
//! # // SAFETY: the machine's page tables belong to this manager alone, and its host
//! # // window maps the region here.
//! # let vm = unsafe { vmalloc_sim::scenarios::window_manager(&machine, &frames, &machine) };
//! # let mine = [frames.alloc_frame().unwrap()];
//! // SAFETY: each area below is made here and not used after the call that frees
//! // it; the mapped frame and the device range are this example's.
//! unsafe {
//!     vm.vfree(vm.vmalloc(4096)?.as_ptr())?;
//!     vm.vfree_atomic(vm.vmalloc(4096)?.as_ptr())?;
//!     let area = vm.vzalloc(8192)?;
//!     let area = vm.vrealloc(area.as_ptr(), 4096)?;
//!     vm.set_prot(area.as_ptr(), Prot::READ)?;
//!     vm.vfree(area.as_ptr())?;
//!     let mapping = vm.vmap(&mine, Prot::KERNEL_RW)?;
//!     vm.vunmap(mapping.as_ptr(), |_| {})?;
//!     let device = vm.ioremap(PhysAddr::new(0xfee0_0000), 0x400, CacheMode::Uncached)?;
//!     vm.iounmap(device.as_ptr())?;
//! }
//! # Ok::<(), vmalloc::Error>(())
//! ```
//!
//! # Files
//!
//! | file | holds | uses |
//! |---|---|---|
//! | `options.rs` | the region's bounds, [`VmallocConfig`], [`VmOptions`], [`Prot`] | — |
//! | `manager.rs` | [`Vmalloc`] and its public calls | `locked`, `options` |
//! | `mapping.rs` | `vmap` and `ioremap`: memory the caller owns | `locked` |
//! | `locked.rs` | the state under the lock and the steps calls are made of | `space`, `purge`, `gather` |
//! | `purge.rs` | the lazy-free list and the purge | `gather` |
//! | `realloc.rs` | `vrealloc` | `locked` |
//! | `huge.rs` | areas backed by 2 MiB pages | `locked` |
//! | `info.rs` | listings and counters | `locked` |
//! | `gather.rs` | what unmaps detached (ranges, frames, emptied tables) until the flush that lets it go: every flush the manager asks for and every frame leaving it, with the range-or-full rule | [`tlb`](crate::tlb) |
//! | `space.rs` | free virtual ranges and the area map | `tree`, `nodes` |
//! | `tree.rs`, `nodes.rs` | the AVL trees, the node pool | the frame source |
//! | `area.rs` | what is recorded per area | `options` |
//! | `deferred.rs` | frees queued by `vfree_atomic` | — |
//! | `blocks/` | per-CPU blocks and frame caches for small areas: the block, the CPU's cache, the calls on block areas | `locked`, `gather` |
//! | `diagnose.rs` | what a faulting address is | `locked`, `purge` |
//! | `stack.rs` | kernel stacks with a guard below | `locked` |
//! | `sparse.rs` | [sparse areas](sparse): pages mapped and unmapped one at a time (the heap's guarded pool) | `locked` |
//! | `allocinfo.rs` | live bytes and areas per allocation site (`/proc/allocinfo`) | `info` |
//! | `ops.rs`, `owned.rs` | [`VmallocOps`], [`VBox`], [`VBuffer`] | `manager` |
//!
//! [page-table cursor]: crate::paging

pub mod allocinfo;
mod area;
pub mod blocks;
pub mod claims;
pub mod deferred;
pub mod diagnose;
mod gather;
pub mod huge;
mod info;
mod locked;
mod manager;
mod mapping;
mod nodes;
mod ops;
mod options;
mod owned;
pub mod purge;
mod realloc;
mod space;
pub mod sparse;
pub mod stack;
mod tree;

pub use allocinfo::{AllocInfo, SiteUsage};
pub use area::{AreaInfo, AreaKind};
pub use diagnose::{FaultDiagnosis, FaultSite};
pub use info::{Areas, VmallocInfo, VmallocStats};
pub use manager::Vmalloc;
pub use ops::VmallocOps;
pub use options::{
    CacheMode, DEFAULT_LAZY_THRESHOLD_PAGES, HUGE_PAGE_SIZE, Prot, VMALLOC_END, VMALLOC_SIZE,
    VMALLOC_START, VmFlags, VmOptions, VmallocConfig,
};
pub use owned::{IoMapping, IoValue, VBox, VBuffer, VMapping};
pub use stack::{KernelStack, StackCache};
