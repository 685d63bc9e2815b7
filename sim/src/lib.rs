//! The simulated machine: host memory as physical memory, a software MMU and a TLB.
//!
//! Kernel memory code is hard to test in a kernel. [`SimMachine`] lets the same code
//! run in an ordinary `cargo test`:
//!
//! - **Physical memory** is one zeroed, 4 KiB-aligned block of host memory, allocated
//!   with `alloc_zeroed` (at a small alignment, so the system allocator's `calloc`
//!   hands out fresh pages) so that even a block of several GiB costs only the pages
//!   that are touched; with a [host window](#the-host-window), a `memfd` instead. Physical address `p` lives at host address [`phys_offset`]` + p`, so
//!   [`SimMachine::phys`] gives a [`PhysMemory`](vmalloc::PhysMemory) for the library, and the `x86_64`
//!   crate's `OffsetPageTable` can walk the tables with that offset.
//! - **A firmware memory map** ([`memory_map`]) shaped like a PC's E820 table: low
//!   memory, the legacy hole, a reserved kernel image at 1 MiB, reserved and unlisted
//!   holes with unaligned ends, ACPI tables, and a PCI hole below 4 GiB when memory
//!   reaches it.
//! - **A top-level page table** ([`root`]), a zeroed PML4 inside the kernel image:
//!   what CR3 would point to.
//! - **An MMU** ([`translate`], [`read`], [`write`], [`fetch`]) that walks the 4-level
//!   x86_64 format, with 2 MiB and 1 GiB entries, and raises the page faults a CPU
//!   raises, with the same error-code bits. It behaves as a CPU with CR0.WP = 1
//!   (supervisor writes to read-only pages fault), EFER.NXE = 1 (NX honoured; fetch
//!   faults carry the I/D bit), and SMEP and SMAP off (the kernel may touch user
//!   pages). Effective permissions combine all four levels: writable and user are
//!   ANDed, NX is ORed. Entries are read with atomic loads. A set PS bit in a PML4
//!   entry, or a set bit between PAT and the frame address of a huge entry, raises a
//!   reserved-bit fault (P = 1, RSVD = 1). A non-canonical address raises
//!   [`Fault::GeneralProtection`].
//!   Multi-byte accesses translate every page they touch first and copy only if all
//!   succeed: a fault leaves memory and the buffer untouched, and reports the first
//!   faulting page (at the access's first byte within it).
//! - **A TLB per CPU** caching every successful translation per 4 KiB page, with the
//!   frame, the effective permissions and the page size, and a paging-structure
//!   cache of upper-level entries. Entries leave only through the
//!   [`TlbFlush`](vmalloc::TlbFlush) methods run on that CPU (see [`SimCpu`]), so a
//!   test that unmaps a page without flushing still reads the old frame, as on
//!   hardware. Not-present entries are never cached. A hit whose cached permissions
//!   forbid the access re-walks the tables once before faulting (the x86 rule),
//!   through the paging-structure cache (so a right granted in an upper entry
//!   without a flush may still fault once, as hardware may), and
//!   any fault drops the page's entry and the cached upper-level entries its walk
//!   would use, and no other (SDM 4.10.4.1: a stale entry elsewhere survives an
//!   unrelated fault); `invlpg` drops the whole paging-structure cache, as the SDM
//!   says it does. Flushing a 4 KiB page
//!   inside a huge mapping drops the whole mapping. Counters ([`tlb_stats`]) let tests
//!   check that code flushes what it must, and no more.
//!
//! What is not simulated: caching attributes (PWT, PCD and PAT are recorded in
//! the translation and otherwise ignored; GLOBAL decides only which entries survive
//! [`load_cr3`](SimMachine::load_cr3)), accessed and dirty bits (never set by the
//! MMU, so tables change only when the code under test changes them), protection
//! keys and MAXPHYADDR checks. Each CPU's TLB and paging-structure cache sit behind
//! one lock held for the whole of each lookup-walk-fill, so a flush is never undone
//! by a walk that was racing it. A table pointer outside the simulated memory
//! is a bug in the test and panics with a message saying where. Data bytes are copied
//! with plain (non-atomic) copies: threads touching the same bytes at once race as
//! they would in a kernel.
//!
//! # The host window
//!
//! Addresses the MMU translates are not host pointers: code must go through
//! [`read`] and [`write`]. Code that dereferences the memory it is given, such as a
//! heap writing its free list into the pages it manages, needs more: with
//! [`SimConfig::with_host_window`] (Linux x86_64), physical memory is a `memfd`
//! mapped shared (still zeroed and backed only where touched), and the machine
//! reserves an inaccessible, 2 MiB-aligned host range, [`host_window`]. Its addresses
//! are canonical lower-half addresses, so a test can give that range to the library
//! as its vmalloc region: pages the library maps there under [`root`] become
//! dereferenceable by host code. The first touch of a window page raises SIGSEGV; a
//! process-wide handler walks this machine's tables as the MMU does and, if the
//! access is allowed (the fault's error code says whether it is a write), maps the
//! frame's 4 KiB at that page with the effective permissions, and the access is
//! retried. The host mappings are thus a second TLB, filled on demand, and one for
//! the whole process: every thread, whichever CPU it runs as, sees them, and a flush
//! on any CPU updates them for all. So a missing shootdown does not show through host
//! pointers; it shows through [`read`] and [`write`] on the CPU that missed it
//! ([`SimCpu`]; `tests/smp.rs`). A fill maps
//! the pages after the faulting one too while the tables map them on the frames
//! after its frame, up to the end of its 2 MiB (as a CPU may cache translations it
//! was not asked for): one host mapping per fill. Each fill counts as a TLB miss in
//! [`tlb_stats`]. An access the tables do not allow is a bug
//! in the code under test, as an oops is in a kernel: the handler prints the address
//! to stderr and the process dies with SIGSEGV.
//!
//! **Flushes.** The [`TlbFlush`](vmalloc::TlbFlush) methods drop the host mappings
//! in their range whose translation changed since they were filled (the flush walks
//! the tables for each host-mapped page it covers); the others stay, as the same
//! frame with the same rights would be filled again. So after a flush host code
//! reaches what the tables say now, an unmap without a flush leaves the old frame
//! readable through the host pointer too, as on hardware, and a flush costs no
//! refills of pages it did not change.
//!
//! **Capacity.** Each host-mapped page of a scattered frame is a host mapping of its
//! own, and Linux allows a process about 65,000 (`vm.max_map_count`). So, like a
//! TLB, the windows hold a bounded number of pages: between them at most a quarter
//! of the host's limit (16,382 pages by default; [`host_mapped_pages`] says how
//! many one holds), each at least 64 whatever the others hold; past that a fill
//! evicts the window's oldest fill (with the pages it holds in the same 2 MiB), and
//! the next touch of an evicted page fills it again from the tables. Host mappings
//! thus stay under half the limit however the frames scatter (each page costs at most
//! two: itself and the split of the reservation around it), and a test can keep as
//! much memory live as the machine has: a working set larger than the capacity only
//! costs refills. A test holding 1 GiB of live 1 KiB heap objects on scattered frames
//! (`tests/sim_scale.rs`, 262,144 pages) peaks at about 32,800 host mappings. A whole
//! program on the kernel heap has a working set of hundreds of MiB, mostly in runs
//! of consecutive frames: with [`SimConfig::with_host_window_by_mappings`] its
//! window counts only the host mappings its pages make, keeping them (with every
//! window's) under three quarters of the limit, however many pages that is. As for
//! a TLB entry, an eviction may end a stale translation early (a test reading a frame
//! through an unmapped, unflushed page relies on it only for pages it touched
//! recently).
//!
//! **The SIGSEGV handler.** The handler is installed when the first machine with a
//! window is made, in front of the one there was (Rust's stack-overflow handler in
//! `main`), to which it passes every fault outside the windows. Make the machine in
//! `main`, a test, or lazily from a global allocator once `main` runs: before `main`
//! the Rust runtime reads the SIGSEGV action, may allocate, and then installs its
//! handler over whatever the allocation installed. A machine made inside such an
//! allocation notices, as long as the action it replaced was the default: the
//! machine's accesses to physical memory, its flushes and its interrupts-off (which
//! every lock of the heap and the manager takes first) check that the handler is
//! still installed, and if not, install it again in front of the new one and print a
//! line saying so. That covers every window page the code under test maps after the
//! runtime's handler arrived, and every page first touched after a heap call; a page
//! mapped before it and first touched after, with no machine call in between, would
//! still reach the runtime's handler and kill the process. So a global allocator that makes its machine on first use is safest
//! serving allocations from the system allocator until `main` has started
//! (`tests/heap_global.rs` switches in a test). One that makes it inside the
//! runtime's first allocation works (`tests/sim_handler_order.rs`) as long as no
//! window page mapped during that allocation is first touched after it returns (a
//! kernel heap touches the slab it carves an object from at once).
//! [`host_window_handler_installed`] says whether the handler is in place. A program
//! that installs a SIGSEGV handler of its own after making a machine must pass the
//! faults it does not handle to the one it replaced. And the host kernel does not
//! fault on the program's behalf: a system call given a buffer in a window page not
//! host-mapped (fresh capacity, a large block `realloc` moved to new addresses, a
//! page evicted) fails with `EFAULT`, so such a buffer is host-mapped first
//! ([`host_window_prefault`]), or comes from the system allocator
//! (`benches/host_program.rs` builds criterion that way).
//!
//! Limits: flushing one page of a 2 MiB or 1 GiB mapping checks only that page's
//! host mapping (a TLB drops the whole mapping).
//!
//! # Example
//!
//! ```
//! use vmalloc_sim::{Access, SimConfig, SimMachine};
//! use x86_64::VirtAddr;
//!
//! let machine = SimMachine::new(SimConfig::new(64 << 20).with_holes(4));
//! let addr = VirtAddr::new(0xffff_8000_0000_0000);
//! // Nothing is mapped yet: a kernel read takes a not-present page fault.
//! let fault = machine.translate(addr, Access::READ).unwrap_err().page_fault().unwrap();
//! assert_eq!(fault.addr, addr);
//! assert!(fault.code.is_empty());
//! ```
//!
//! Page tables are written through [`SimMachine::phys`] (a [`PhysMemory`](vmalloc::PhysMemory)), or with
//! the `x86_64` crate's `OffsetPageTable` ([`SimMachine::offset_page_table`]). Drop its
//! `MapperFlush` with `ignore()` and flush through [`TlbFlush`](vmalloc::TlbFlush)
//! instead: `flush()` runs `invlpg`, which the host does not allow.
//!
//! [`phys_offset`]: SimMachine::phys_offset
//! [`memory_map`]: SimMachine::memory_map
//! [`root`]: SimMachine::root
//! [`translate`]: SimMachine::translate
//! [`read`]: SimMachine::read
//! [`write`]: SimMachine::write
//! [`fetch`]: SimMachine::fetch
//! [`tlb_stats`]: SimMachine::tlb_stats
//! [`host_window`]: SimMachine::host_window
//! [`host_mapped_pages`]: SimMachine::host_mapped_pages
//! [`host_window_handler_installed`]: SimMachine::host_window_handler_installed
//! [`host_window_prefault`]: SimMachine::host_window_prefault

#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

mod config;
mod cpu;
mod frames;
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
mod host;
mod memmap;
mod mmu;
mod phys;
mod rng;
mod routed;
pub mod scenarios;
mod tlb;
mod watchdog;

#[cfg(test)]
mod test;
#[cfg(all(test, target_os = "linux", target_arch = "x86_64"))]
mod test_host;

pub use config::SimConfig;
pub use cpu::{OfflineWhenDropped, SimCpu};
pub use frames::{POISON, PoisonOnFree, SimFrames, StaleRead};
pub use mmu::{Access, AccessKind, Fault, PageFault, Translation};
pub use phys::SimPhys;
pub use rng::Rng;
pub use routed::RoutedHeap;
pub use tlb::TlbStats;
pub use watchdog::{DEADLOCK_LIMIT, watchdog};

use core::marker::PhantomData;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU64, Ordering};
use std::alloc::{Layout, alloc_zeroed, dealloc, handle_alloc_error};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::vec::Vec;
use tlb::Tlb;
use vmalloc::frame::MemoryRegion;
use x86_64::structures::paging::PhysFrame;
use x86_64::{PhysAddr, VirtAddr};

/// A simulated x86_64 machine; see the [module documentation](self).
///
/// The calls that run as the calling thread's CPU (accesses through the MMU,
/// `translate`, the flushes, the `Cpus` hooks) panic when that thread entered a CPU
/// index this machine does not have ([`SimCpu::enter`] is per thread, across
/// machines), and the walks panic on a table outside the machine's memory (a test
/// that wrote a bad entry), as the [module documentation](self) says.
#[derive(Debug)]
pub struct SimMachine {
    /// Physical address 0, 4 KiB-aligned, inside `backing`.
    memory: NonNull<u8>,
    memory_size: u64,
    backing: Backing,
    memory_map: Vec<MemoryRegion>,
    root: PhysFrame,
    /// The PML4 the MMU walks: `root` until [`SimMachine::load_cr3`].
    cr3: AtomicU64,
    scatter_seed: Option<u64>,
    /// One TLB (and paging-structure cache) per CPU.
    tlbs: Vec<cpu::Padded<Mutex<Tlb>>>,
    /// The CPUs' interrupt state (see [`cpu`]), shared with the machine's frame
    /// sources (frame calls are interrupt points).
    cpus: std::sync::Arc<cpu::Cpus>,
}

// SAFETY: the block is owned by the machine and reached only through raw pointers,
// like physical memory shared by CPUs; the TLB is behind a mutex.
unsafe impl Send for SimMachine {}
// SAFETY: as for `Send`: no method hands out a reference into the block, and page
// table entries are read atomically.
unsafe impl Sync for SimMachine {}

/// What holds the machine's physical memory.
#[derive(Debug)]
enum Backing {
    /// A host allocation, as `alloc_zeroed` returned it, and its layout.
    Heap { block: NonNull<u8>, layout: Layout },
    /// A memfd, with a host window.
    #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
    Host(host::HostMemory),
}

impl Backing {
    /// Zeroed, lazily backed memory of `size` bytes, and where physical 0 is in it.
    fn new(config: &SimConfig, root: PhysFrame) -> (Backing, NonNull<u8>) {
        #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
        if let Some(window) = config.host_window {
            let host = host::HostMemory::new(
                config.memory_size,
                window,
                root,
                !config.host_window_by_mappings,
            );
            let memory = host.memory();
            return (Backing::Host(host), memory);
        }
        #[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
        let _ = root;
        let size = usize::try_from(config.memory_size).expect("memory size fits in usize");
        // The system allocator zeroes by `calloc`, whose large blocks are fresh
        // untouched pages, only for small alignments; a 4 KiB-aligned request would be
        // zeroed by writing every byte. So ask for one page more and align by hand.
        let layout = Layout::from_size_align(size + 4096, 16).expect("memory size fits");
        // SAFETY: the layout's size is at least 16 MiB, so not zero.
        let block = NonNull::new(unsafe { alloc_zeroed(layout) })
            .unwrap_or_else(|| handle_alloc_error(layout));
        let to_boundary = block.as_ptr().align_offset(4096);
        // SAFETY: `to_boundary` < 4096, so the result is inside the allocation.
        let memory = unsafe { block.add(to_boundary) };
        (Backing::Heap { block, layout }, memory)
    }
}

/// Where the machine's PML4 lives: the last frame of the kernel image.
const ROOT_TABLE: u64 = memmap::KERNEL_IMAGE_END - 0x1000;

impl SimMachine {
    /// A machine with `config.memory_size` bytes of zeroed physical memory.
    ///
    /// # Panics
    ///
    /// If the memory size is below 16 MiB or not a multiple of 2 MiB, or too small
    /// for `config.reserved_holes` holes (each needs 256 KiB of usable memory), or
    /// above what a host allocation can be (`isize::MAX` bytes). If the host cannot
    /// allocate the block, the process aborts as for any allocation.
    /// With a host window: if its size is not a positive multiple of 4 KiB or is
    /// above 32 TiB, if the host refuses the memfd or a mapping (a window the host
    /// cannot reserve), or if 64 machines with windows exist.
    ///
    /// Also if `config.cpus` is 0 or above [`MAX_CPUS`](vmalloc::smp::MAX_CPUS).
    pub fn new(config: SimConfig) -> SimMachine {
        assert!(
            (1..=vmalloc::smp::MAX_CPUS).contains(&config.cpus),
            "a machine has 1 to 64 CPUs"
        );
        let memory_map = memmap::build(config.memory_size, config.reserved_holes);
        let root = PhysFrame::containing_address(PhysAddr::new(ROOT_TABLE));
        let (backing, memory) = Backing::new(&config, root);
        SimMachine {
            memory,
            memory_size: config.memory_size,
            backing,
            memory_map,
            root,
            cr3: AtomicU64::new(root.start_address().as_u64()),
            scatter_seed: config.scatter_seed,
            tlbs: cpu::per_cpu(config.cpus, Mutex::default),
            cpus: std::sync::Arc::new(cpu::Cpus::new(config.cpus)),
        }
    }

    /// The firmware memory map: sorted, non-overlapping, inside the memory.
    ///
    /// It imitates a PC's E820 table, so a frame allocator tested on it meets the
    /// shapes it meets on real hardware:
    ///
    /// - `0..0x9fc00` usable (the low 640 KiB less the EBDA: an unaligned end);
    /// - `0x9fc00..1 MiB` reserved (EBDA, VGA window, BIOS ROM);
    /// - `1 MiB..4 MiB` reserved: the kernel image, which holds [`root`](Self::root);
    /// - the rest usable, cut by [`SimConfig::reserved_holes`] holes spread evenly
    ///   over it, 16 to 64 KiB long with unaligned ends; even-numbered holes are listed
    ///   as reserved (ACPI-like tables), odd-numbered ones are not listed at all (like
    ///   missing or MMIO ranges);
    /// - reserved ACPI tables (130 KiB, unaligned start) at the top of low memory;
    /// - when memory passes 3 GiB, a PCI hole from 3 GiB to 4 GiB, not listed except
    ///   for small reserved IOAPIC, local APIC and BIOS flash ranges, with the rest
    ///   of memory usable above 4 GiB.
    ///
    /// The layout depends only on the size and the number of holes.
    pub fn memory_map(&self) -> &[MemoryRegion] {
        &self.memory_map
    }

    /// Bytes of simulated physical memory (physical addresses `0..memory_size`).
    pub fn memory_size(&self) -> u64 {
        self.memory_size
    }

    /// The seed for shuffled frame hand-out, as configured.
    pub fn scatter_seed(&self) -> Option<u64> {
        self.scatter_seed
    }

    /// The library's way into this machine's physical memory.
    pub fn phys(&self) -> SimPhys<'_> {
        SimPhys {
            base: self.memory,
            size: self.memory_size(),
            _machine: PhantomData,
        }
    }

    /// The frame of the boot top-level page table (a zeroed PML4 at start-up).
    pub fn root(&self) -> PhysFrame {
        self.root
    }

    /// The PML4 the MMU walks now: [`root`](Self::root) until
    /// [`load_cr3`](Self::load_cr3) switches address spaces.
    pub fn cr3(&self) -> PhysFrame {
        PhysFrame::containing_address(PhysAddr::new(self.cr3.load(Ordering::Acquire)))
    }

    /// Switches to the address space whose PML4 is `pml4`, as a write to CR3 does:
    /// later walks start there, and every TLB entry but those of global pages is
    /// dropped, on every CPU (the machine has one CR3 for all of them). (The host
    /// window's fills always walk [`root`](Self::root).)
    pub fn load_cr3(&self, pml4: PhysFrame) {
        self.cr3
            .store(pml4.start_address().as_u64(), Ordering::Release);
        for cpu in 0..self.tlbs.len() {
            self.lock_tlb_of(cpu).clear_non_global();
        }
    }

    /// The host address at which physical address 0 lives.
    pub fn phys_offset(&self) -> VirtAddr {
        VirtAddr::from_ptr(self.memory.as_ptr())
    }

    /// The `x86_64` crate's mapper over the machine's tables, from [`root`](Self::root)
    /// at [`phys_offset`](Self::phys_offset): an independent walker to check this
    /// crate against, or a peer to measure it with.
    ///
    /// # Safety
    ///
    /// The mapper holds the root table as `&mut`: while it lives, nothing else may
    /// write the machine's page tables (no other mapper, no `PageTables`, no `Vmalloc`
    /// call that maps or unmaps) unless those tables are disjoint from what it touches.
    pub unsafe fn offset_page_table(&self) -> x86_64::structures::paging::OffsetPageTable<'_> {
        let root = self.phys_offset() + self.root().start_address().as_u64();
        // SAFETY: the root frame is a page table inside the machine's memory, all of
        // which is reached at `phys_offset`; the caller rules out other writers.
        unsafe {
            x86_64::structures::paging::OffsetPageTable::new(
                &mut *root.as_mut_ptr(),
                self.phys_offset(),
            )
        }
    }

    /// Copies physical memory at `addr` into `buf`.
    ///
    /// # Panics
    ///
    /// If the range leaves the simulated memory.
    pub fn read_phys(&self, addr: PhysAddr, buf: &mut [u8]) {
        let src = self.phys().host_range(addr, buf.len());
        // SAFETY: `host_range` checked that the whole range is inside the block, and
        // `buf` is the caller's to write. `copy`: with a host window, `buf` may be
        // window memory over the same bytes.
        unsafe { core::ptr::copy(src, buf.as_mut_ptr(), buf.len()) };
    }

    /// Copies `data` into physical memory at `addr`.
    ///
    /// # Panics
    ///
    /// If the range leaves the simulated memory.
    ///
    /// # Safety
    ///
    /// The bytes written are no part of a live Rust value. With a host window the
    /// machine's memory is also what host code reaches through the window (a kernel
    /// heap's objects, a `KVBox`): writing there is writing through a raw pointer,
    /// as a device's DMA would.
    ///
    /// Safe code cannot write a live value's bytes this way:
    ///
    /// ```compile_fail,E0133
    /// let machine = vmalloc_sim::SimMachine::new(vmalloc_sim::SimConfig::new(64 << 20));
    /// machine.write_phys(x86_64::PhysAddr::new(0x1000), &[1]);
    /// ```
    pub unsafe fn write_phys(&self, addr: PhysAddr, data: &[u8]) {
        let dst = self.phys().host_range(addr, data.len());
        // SAFETY: inside the block (checked); what the bytes belong to is the
        // caller's to vouch for. `copy`, as `data` may itself be window memory.
        unsafe { core::ptr::copy(data.as_ptr(), dst, data.len()) };
    }

    /// Sets `len` bytes of physical memory at `addr` to `byte`.
    ///
    /// # Panics
    ///
    /// If the range leaves the simulated memory.
    ///
    /// # Safety
    ///
    /// The bytes set are no part of a live Rust value. With a host window the
    /// machine's memory is also what host code reaches through the window (a kernel
    /// heap's objects, a `KVBox`): writing there is writing through a raw pointer,
    /// as a device's DMA would.
    pub unsafe fn fill_phys(&self, addr: PhysAddr, len: usize, byte: u8) {
        let dst = self.phys().host_range(addr, len);
        // SAFETY: `host_range` checked that the whole range is inside the block;
        // what the bytes belong to is the caller's to vouch for.
        unsafe { core::ptr::write_bytes(dst, byte, len) };
    }

    /// A copy of the 4 KiB of `frame` (a copy, so later writes cannot alias it).
    ///
    /// # Panics
    ///
    /// If the frame is outside the simulated memory.
    pub fn frame_bytes(&self, frame: PhysFrame) -> Vec<u8> {
        let mut bytes = std::vec![0; 4096];
        self.read_phys(frame.start_address(), &mut bytes);
        bytes
    }

    /// The host window's start and size, if the machine has one: simulated virtual
    /// addresses there can be dereferenced by the host.
    pub fn host_window(&self) -> Option<(VirtAddr, u64)> {
        match &self.backing {
            #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
            Backing::Host(host) => {
                let (start, size) = host.range();
                Some((VirtAddr::new(start), size))
            }
            Backing::Heap { .. } => None,
        }
    }

    /// Host-maps the window's pages holding `addr..addr + len` now, as a touch of
    /// each would (with the rights the tables give each page): for a system call, which
    /// meets a window page that is not host-mapped with `EFAULT` instead of a fault
    /// the window serves. Such pages are fresh memory, a large block `realloc`
    /// moved to new addresses (its frames remapped, not copied), and pages the
    /// window let go of to stay within its capacity; call this right before the
    /// system call, for a range the window can hold at once (see [the module
    /// documentation](self#the-host-window)).
    ///
    /// # Errors
    ///
    /// The first page that cannot be host-mapped: outside the window, or not
    /// mapped readable by the machine's page tables (the pages before it are
    /// mapped); or, for a range more than the window holds at once, the first page
    /// its own later fills evicted again. Without a window, `addr`'s page. On `Ok`
    /// every page of the range is host-mapped; another thread's fills may evict
    /// some before the system call runs, as they may any page of the window (a
    /// window bounded by mappings, [`SimConfig::with_host_window_by_mappings`],
    /// evicts far less often).
    pub fn host_window_prefault(&self, addr: VirtAddr, len: usize) -> Result<(), VirtAddr> {
        match &self.backing {
            #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
            Backing::Host(host) => host
                .prefault(addr.as_u64(), len as u64)
                .map_err(VirtAddr::new_truncate),
            Backing::Heap { .. } => Err(addr.align_down(4096u64)),
        }
    }

    /// What the calling thread's CPU's TLB has done so far (see [`SimCpu`]). Each
    /// host-window fault, and each page [`host_window_prefault`](Self::host_window_prefault)
    /// maps, walks the tables and counts as a miss, whether the page could be mapped
    /// or not (of whichever CPU asks, however many pages the fill maps); host
    /// accesses that hit the host's own mappings are not counted.
    pub fn tlb_stats(&self) -> TlbStats {
        let mut stats = self.lock_tlb().stats;
        stats.misses += self.host_fills();
        stats
    }

    /// How many pages of the host window are host-mapped now (see [the
    /// module documentation](self#the-host-window)); 0 without a window.
    pub fn host_mapped_pages(&self) -> usize {
        match &self.backing {
            #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
            Backing::Host(host) => host.mapped_pages(),
            Backing::Heap { .. } => 0,
        }
    }

    /// Whether the host window's SIGSEGV handler is installed now; `false` for a
    /// machine without a window (see [the module documentation](self#the-host-window)).
    pub fn host_window_handler_installed(&self) -> bool {
        match &self.backing {
            #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
            Backing::Host(_) => host::installed(),
            Backing::Heap { .. } => false,
        }
    }

    fn host_fills(&self) -> u64 {
        match &self.backing {
            #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
            Backing::Host(host) => host.fills(),
            Backing::Heap { .. } => 0,
        }
    }

    /// Drops the host window's mappings whose translation changed, if any.
    fn flush_host_all(&self) {
        match &self.backing {
            #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
            Backing::Host(host) => host.flush_all(),
            Backing::Heap { .. } => {}
        }
    }

    /// Drops the host window's mappings of pages `start_vpn..end_vpn` whose
    /// translation changed, if any.
    fn flush_host(&self, start_vpn: u64, end_vpn: u64) {
        match &self.backing {
            #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
            Backing::Host(host) => host.flush(start_vpn, end_vpn),
            Backing::Heap { .. } => {
                let _ = (start_vpn, end_vpn);
            }
        }
    }

    /// How many 4 KiB pages the calling thread's CPU's TLB holds a translation for
    /// (the host window's mappings are not counted).
    pub fn tlb_len(&self) -> usize {
        self.lock_tlb().len()
    }

    /// The calling thread's CPU's TLB.
    fn lock_tlb(&self) -> MutexGuard<'_, Tlb> {
        self.lock_tlb_of(self.current_cpu())
    }

    /// CPU `cpu`'s TLB; a panic in another thread while holding it leaves it
    /// consistent (every update is a single map operation), so poisoning is ignored.
    pub(crate) fn lock_tlb_of(&self, cpu: usize) -> MutexGuard<'_, Tlb> {
        self.tlbs[cpu]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for SimMachine {
    fn drop(&mut self) {
        if let Backing::Heap { block, layout } = self.backing {
            // SAFETY: `block` came from `alloc_zeroed` with exactly `layout`, and
            // nothing borrowing the machine (such as a `SimPhys`) outlives it.
            unsafe { dealloc(block.as_ptr(), layout) };
        }
    }
}
