//! [`Vmalloc`] and its public calls; each is a short sequence of the locked steps in
//! `locked.rs`.

use super::area::{AreaKind, AreaRecord};
use super::blocks::{self, BLOCK_BYTES, Blocks, Located};
use super::claims;
use super::deferred::DeferredFrees;
use super::gather::Gather;
use super::huge;
use super::locked::{Inner, Locked, as_ptr, invariant, page_range};
use super::nodes::NodePool;
use super::options::{Prot, VmFlags, VmOptions, VmallocConfig};
use super::purge::PurgeList;
use super::space::{self, AreaMap, VSpace};
use crate::paging::PageTables;
use crate::sync::{IrqGuard, IrqLock, IrqOff};
use crate::{Error, FrameSource, PAGE_SIZE, PhysMemory, TlbFlush};
use core::panic::Location;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU64, Ordering};
use x86_64::VirtAddr;
use x86_64::structures::paging::PhysFrame;
use x86_64::structures::paging::mapper::MappedFrame;

/// Each manager's identity: distinct for every manager made in the program's life,
/// even one made at the address of a dropped one.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// The vmalloc area manager. See the [module documentation](crate::vmalloc).
pub struct Vmalloc<F: FrameSource + Clone, M: PhysMemory + Copy, T: TlbFlush> {
    /// This manager's identity (see [`NEXT_ID`]): what a
    /// [`StackCache`](super::StackCache) binds to.
    pub(super) id: u64,
    pub(super) inner: IrqLock<Inner<F, M>>,
    pub(super) frames: F,
    pub(super) phys: M,
    pub(super) tlb: T,
    pub(super) config: VmallocConfig,
    deferred: DeferredFrees,
    pub(super) blocks: Blocks,
}

impl<F, M, T> Vmalloc<F, M, T>
where
    F: FrameSource + Clone,
    M: PhysMemory + Copy,
    T: TlbFlush,
{
    /// A manager for `config`'s region of the address space whose top-level table is
    /// `root`. It gives every top-level entry of the region a table now (see
    /// [shared top-level tables](crate::vmalloc#shared-top-level-tables)).
    ///
    /// # Errors
    ///
    /// For the region: [`Error::Unaligned`] if its start or size is not page-aligned,
    /// [`Error::ZeroSize`] if it is empty, [`Error::NullPointer`] if it starts at 0,
    /// [`Error::RangeWraps`] if it reaches the end of the address space,
    /// [`Error::NonCanonical`] if it leaves the canonical half it starts in or ends at
    /// its top. [`Error::HugePageInTheWay`] if the region's page tables hold a 2 MiB or
    /// 1 GiB entry there already, [`Error::AlreadyMapped`] if they map anything else
    /// there (a page, an entry that is not a table, an entry leading back to a table
    /// above it, as a recursive mapping's, a
    /// [`RecursivePhysMemory`](crate::phys::RecursivePhysMemory) window's table, marked
    /// [`KEPT`](crate::paging::KEPT), which fills on demand): the manager would map
    /// over it, or through the recursion write the tables themselves.
    /// [`Error::Overlap`] if a live manager over the same root uses one of the region's
    /// top-level entries (they would share the tables below it; see
    /// [`claims`](super::claims): the entries carry
    /// [`MANAGED`](crate::paging::MANAGED)). [`Error::OutOfFrames`] if the top-level
    /// tables or the first bookkeeping node cannot be had. Nothing is kept on error.
    ///
    /// # Safety
    ///
    /// - `root` is a valid PML4 reachable through `phys`, and stays valid while the
    ///   manager lives (normally the kernel's page table, loaded in CR3 on every CPU
    ///   that touches vmalloc memory; other address spaces may copy the region's
    ///   top-level entries after this call, and must stop using them before the
    ///   manager is dropped);
    /// - nothing else maps, unmaps or frees anything in the region's page tables,
    ///   those that also serve addresses next to the region included (a region that
    ///   does not start and end on 1 GiB boundaries shares such tables with its
    ///   neighbours: the kernel maps nothing there while the manager lives);
    /// - `frames` upholds [`FrameSource`]'s contract with frames reachable through
    ///   `phys`;
    /// - `tlb` flushes the TLB of every CPU that may hold translations of the region:
    ///   each `flush_*` call before it returns, and what `start_flush` started by
    ///   the time `finish_flush` returns for its ticket;
    /// - every CPU that touches the memory the manager hands out translates through
    ///   `root` (loaded in CR3): the owners ([`VBuffer`](super::VBuffer),
    ///   [`VBox`](super::VBox), the kernel heap and its `KVBox`) read and write it
    ///   from safe code. Where the region is not mapped so (a table not loaded yet;
    ///   on the host, a simulated machine without a host window), no owner or heap
    ///   may be made over the manager until it is, as `Pin::new_unchecked` binds
    ///   the safe code after it.
    pub unsafe fn new(
        config: VmallocConfig,
        root: PhysFrame,
        phys: M,
        frames: F,
        tlb: T,
    ) -> Result<Self, Error> {
        space::check_region(config.start.as_u64(), config.size)?;
        // SAFETY: forwarded from this function's contract.
        let mut tables = unsafe { PageTables::new(root, phys) };
        let mut pool = NodePool::with_slot_size(frames.clone(), phys, super::purge::SLOT_SIZE);
        let region = page_range(config.start, 0..config.size / PAGE_SIZE);
        let made = {
            // As every call into the frame allocator: an interrupt handler that
            // allocates through another manager on the same frames never finds their
            // lock held.
            let _irq = IrqOff::new(&tlb);
            let _claiming = claims::lock(&tlb);
            // What the region's tables hold already: nothing mapped, no entry leading
            // back up (a recursive slot), no top-level entry another manager uses; the
            // tables found are adopted.
            let found = tables.survey_for_adoption(region);
            let space = found
                .and_then(|found| Ok((found, VSpace::new(&mut pool, config.start, config.size)?)));
            let created = space.and_then(|(found, space)| {
                // SAFETY: `frames` hands out unused frames reachable through `phys`
                // (contract).
                let created = unsafe { tables.preallocate_top_level(region, &frames) }?;
                // SAFETY: nothing changed under the entries surveyed; the root
                // entries made just now keep their mark.
                unsafe { tables.adopt(region, &found) };
                // SAFETY: the claiming lock keeps other managers off the entries.
                unsafe { tables.mark_managed(region, true) };
                Ok((space, created as u64, found))
            });
            if created.is_err() {
                let mut gather = Gather::new(&frames, &tlb);
                pool.release_all(|frame| gather.free(frame));
                gather.finish();
            }
            created
        };
        let (space, created, adopted_roots) = made?;
        let inner = Inner {
            tables,
            space,
            areas: AreaMap::new(),
            pool,
            purge: PurgeList::new(),
            page_table_frames: created,
            data_frames: 0,
            huge_mappings: 0,
            purges: 0,
            dying: 0,
            deferred_refused: 0,
            adopted_roots,
        };
        let mut vm = Self {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            inner: IrqLock::new(inner),
            frames,
            phys,
            tlb,
            config,
            deferred: DeferredFrees::new(),
            blocks: Blocks::off(),
        };
        let blocks = Blocks::blocks_for(config.size);
        // Without CPUs to tell apart a cache could never be picked: no zone then.
        if config.cpu_caches && blocks > 0 && vm.tlb.cpus().is_some() {
            let options = VmOptions {
                flags: VmFlags::NO_GUARD,
                tag: "vmap_blocks",
                ..VmOptions::default()
            };
            let bytes = blocks as u64 * BLOCK_BYTES;
            let mut record = AreaRecord::new(
                AreaKind::Reserved,
                bytes,
                Prot::KERNEL_RW.leaf_flags()?,
                &options,
            );
            record.mapped_pages = 0;
            let zone = vm.transact(|cx| cx.create_area(record, BLOCK_BYTES))?;
            vm.blocks.set_zone(zone.as_u64(), blocks);
        }
        Ok(vm)
    }

    /// The configuration the manager was built with.
    pub fn config(&self) -> &VmallocConfig {
        &self.config
    }

    /// The frame allocator the manager takes frames from.
    pub fn frames(&self) -> &F {
        &self.frames
    }

    /// The TLB-flush policy.
    pub fn tlb(&self) -> &T {
        &self.tlb
    }

    /// `size` bytes of kernel read-write memory, virtually contiguous, built from
    /// scattered frames, followed by a guard page. Like Linux's `vmalloc`, the memory
    /// is not zeroed.
    ///
    /// # Errors
    ///
    /// [`Error::ZeroSize`], [`Error::SizeTooLarge`], [`Error::OutOfVirtualSpace`],
    /// [`Error::OutOfFrames`]; on error nothing changed.
    #[track_caller]
    pub fn vmalloc(&self, size: usize) -> Result<NonNull<u8>, Error> {
        self.vmalloc_with(size, &VmOptions::default())
    }

    /// As [`vmalloc`](Self::vmalloc), with the memory zeroed.
    ///
    /// # Errors
    ///
    /// As [`vmalloc`](Self::vmalloc).
    #[track_caller]
    pub fn vzalloc(&self, size: usize) -> Result<NonNull<u8>, Error> {
        let options = VmOptions {
            flags: VmFlags::ZERO,
            ..VmOptions::default()
        };
        self.vmalloc_with(size, &options)
    }

    /// The general form: alignment, protection, zeroing, guard page, 2 MiB pages
    /// ([`VmFlags::HUGE`], see [huge mappings](super::huge)) and label (Linux's
    /// `__vmalloc_node_range`).
    ///
    /// # Errors
    ///
    /// As [`vmalloc`](Self::vmalloc), plus [`Error::BadAlignment`] for an alignment
    /// that is not a power of two or exceeds the region, [`Error::WriteExecute`]
    /// for `WRITE | EXEC`, and [`Error::NoExecuteAbove`] for `EXEC` below an upper
    /// entry with `NO_EXECUTE` (a boot loader's table the manager adopted).
    #[track_caller]
    pub fn vmalloc_with(&self, size: usize, options: &VmOptions) -> Result<NonNull<u8>, Error> {
        self.vmalloc_for(size, options, Location::caller())
    }

    /// [`vmalloc_with`](Self::vmalloc_with) on behalf of `caller`, whom listings
    /// name (a `vrealloc` that moves an area keeps its caller).
    #[inline]
    pub(super) fn vmalloc_for(
        &self,
        size: usize,
        options: &VmOptions,
        caller: &'static Location<'static>,
    ) -> Result<NonNull<u8>, Error> {
        let pages = self.pages_for_options(size as u64, options)?;
        let align = self.check_align(options.align)?;
        let flags = options.prot.leaf_flags()?;
        let zero = options.flags.contains(VmFlags::ZERO);
        self.settle();
        let in_block = Self::fits_a_block(options) && self.blocks_take(pages, flags);
        let block = if in_block {
            self.alloc_in_block(pages, flags, zero, caller, false)
        } else {
            Err(Error::WouldBlock)
        };
        if let Ok(ptr) = block {
            return Ok(ptr);
        }
        let mut record = AreaRecord::new(AreaKind::Vmalloc, size as u64, flags, options);
        record.caller = caller;
        if huge::wants_huge(size as u64, options) {
            return self.vmalloc_huge_area(record, pages, zero);
        }
        let made = self.transact(|cx| {
            let start = cx.create_area(record, align)?;
            if let Err(error) = cx.back_pages(start, 0..pages, flags, zero) {
                cx.remove_area(start);
                return Err(error);
            }
            cx.inner().data_frames += pages;
            Ok(as_ptr(start))
        });
        if !in_block || made != Err(Error::OutOfVirtualSpace) {
            return made;
        }
        // No block to take (or no frame for one) and the tree full: the blocks and
        // frames other CPUs hold (an offline CPU's, one whose areas were freed) may
        // serve once every cache hands them back, as Linux purges and retries
        // before it gives up; any block with room for the area is taken now. What
        // that last try runs out of is the answer: frames, or room.
        self.drain_cpu_caches();
        match self.alloc_in_block(pages, flags, zero, caller, true) {
            Err(Error::WouldBlock) if block == Err(Error::OutOfFrames) => block,
            Err(Error::WouldBlock) => made,
            last => last,
        }
    }

    /// Frees an area made by `vmalloc`/`vzalloc`/`vmalloc_with` (or [`reserve`]): its
    /// entries are detached at once, and its frames and virtual range return after
    /// the TLB flush that covers them (see [the purge](super::purge)).
    ///
    /// # Errors
    ///
    /// [`Error::NullPointer`], [`Error::NotInRegion`], [`Error::InteriorPointer`],
    /// [`Error::NotAllocated`] (never allocated, or freed already),
    /// [`Error::WrongKind`] for a `vmap` or `ioremap` area. Nothing changes on error.
    ///
    /// # Safety
    ///
    /// If `ptr` starts a live area, nothing uses that area's memory after this call:
    /// no reference, owner ([`VBox`](super::VBox), [`VBuffer`](super::VBuffer), the
    /// kernel heap) or other pointer into it is used again, since its frames and
    /// range go to new owners. A pointer that starts no live area of this manager is
    /// refused with an error, which is safe.
    ///
    /// [`reserve`]: Self::reserve
    pub unsafe fn vfree(&self, ptr: *mut u8) -> Result<(), Error> {
        match self.blocks.locate(ptr as u64) {
            Located::Zone(at) => {
                self.settle();
                self.free_in_block(at, self.config.eager)
            }
            Located::Tree => self.lock().vfree(ptr),
        }
    }

    /// [`vfree`](Self::vfree) of the area at `ptr` if it carries `tag`
    /// ([`Error::WrongKind`] if not), the tag checked under the lock the free takes:
    /// an area retagged and handed to another owner meanwhile is never freed.
    ///
    /// # Safety
    ///
    /// As [`vfree`](Self::vfree).
    pub(super) unsafe fn vfree_tagged(&self, ptr: *mut u8, tag: &str) -> Result<(), Error> {
        match self.blocks.locate(ptr as u64) {
            // Areas in per-CPU blocks carry no tag: an area's own pointer is of the
            // wrong kind, any other as `vfree` answers it.
            Located::Zone(at) if !tag.is_empty() => Err(match self.block_area(at) {
                Some((area, false)) if area.start.as_u64() == ptr as u64 => Error::WrongKind,
                Some((_, false)) => Error::InteriorPointer,
                _ => Error::NotAllocated,
            }),
            // SAFETY: forwarded from the caller.
            Located::Zone(_) => unsafe { self.vfree(ptr) },
            Located::Tree => self.lock().vfree_tagged(ptr, tag),
        }
    }

    /// Frees like [`vfree`](Self::vfree), from a context that may not wait for any
    /// lock: an interrupt or fault handler, perhaps one that interrupted this
    /// manager on its own CPU (Linux's `vfree_atomic`). The area is queued with one
    /// compare-and-swap and freed by the next call on this manager that allocates,
    /// frees, resizes, lists or counts, fast paths included (see [deferred
    /// frees](super::deferred)); it stays mapped until then. It never waits and never
    /// flushes. A pointer `vfree` would refuse is then
    /// refused silently, counted in [`stats`](Self::stats).
    ///
    /// # Errors
    ///
    /// [`Error::NullPointer`], [`Error::NotInRegion`]; [`Error::WouldBlock`] when the
    /// queue is full (nothing was queued: keep the pointer and try again after the
    /// next call, or `vfree` it from a context that may wait).
    ///
    /// # Safety
    ///
    /// As [`vfree`](Self::vfree), from the moment of the call: the area may be freed
    /// at any time after it.
    pub unsafe fn vfree_atomic(&self, ptr: *mut u8) -> Result<(), Error> {
        if ptr.is_null() {
            return Err(Error::NullPointer);
        }
        let addr = VirtAddr::try_new(ptr as u64).map_err(|_| Error::NotInRegion)?;
        if !self.is_vmalloc_addr(addr) {
            return Err(Error::NotInRegion);
        }
        if self.deferred.push(addr.as_u64()) {
            Ok(())
        } else {
            Err(Error::WouldBlock)
        }
    }

    /// The frame behind the vmalloc address `addr` (Linux's `vmalloc_to_page`).
    ///
    /// # Errors
    ///
    /// [`Error::NotInRegion`] outside the region, [`Error::NotMapped`] for an address
    /// no live area maps (a guard page, a freed area).
    pub fn vmalloc_to_frame(&self, addr: VirtAddr) -> Result<PhysFrame, Error> {
        if !self.is_vmalloc_addr(addr) {
            return Err(Error::NotInRegion);
        }
        if let Located::Zone(at) = self.blocks.locate(addr.as_u64()) {
            self.settle();
            return self.block_frame(at);
        }
        let cx = self.lock();
        let (start, _, record) = cx.area_containing(addr).ok_or(Error::NotMapped)?;
        let page_index = (addr - start) / PAGE_SIZE;
        let mapped = record.frame_pages();
        if record.dying || !mapped.contains(&page_index) {
            return Err(Error::NotMapped);
        }
        match cx.translate(addr)? {
            (_, _, MappedFrame::Size4KiB(frame)) => Ok(frame),
            (phys, _, _) => Ok(PhysFrame::containing_address(phys)),
        }
    }

    /// Gives a whole `vmalloc` area the rights `prot` and flushes its old
    /// translations (Linux's `set_memory_ro`, `set_memory_rw`, `set_memory_x` and
    /// `set_memory_nx` on vmalloc memory, as module loaders and BPF use them). Its
    /// 2 MiB mappings stay 2 MiB; memory `vrealloc` adds later gets the new rights.
    ///
    /// # Errors
    ///
    /// As [`vfree`](Self::vfree) for `ptr` ([`Error::WrongKind`] for anything but a
    /// `vmalloc` area), [`Error::WriteExecute`] for `WRITE | EXEC`,
    /// [`Error::NoExecuteAbove`] for `EXEC` below an upper entry with `NO_EXECUTE`
    /// (a boot loader's table the manager adopted). Nothing changes on error.
    ///
    /// # Safety
    ///
    /// If `ptr` starts a live area, no reference into it is used in a way `prot`
    /// forbids: a `&mut` (or an owner that writes, such as [`VBuffer`](super::VBuffer)
    /// or the kernel heap) into memory made read-only would fault on its next write,
    /// and memory made executable runs whatever it holds. A pointer that starts no
    /// live `vmalloc` area is refused with an error, which is safe.
    pub unsafe fn set_prot(&self, ptr: *mut u8, prot: Prot) -> Result<(), Error> {
        let flags = prot.leaf_flags()?;
        if let Located::Zone(at) = self.blocks.locate(ptr as u64) {
            self.settle();
            return self.protect_in_block(at, flags);
        }
        let mut cx = self.lock();
        let (start, record) = cx.live_area_at(ptr, &[AreaKind::Vmalloc])?;
        let pages = page_range(start, record.lead..record.lead + record.mapped_pages);
        // SAFETY: the caller owns the live area and asks for the rights; the flush
        // follows before the lock is released.
        let changed = unsafe { cx.inner().tables.protect(pages, flags) };
        let flush = match changed {
            // Executable rights below a boot loader's no-execute entry.
            Err(Error::NoExecuteAbove) => return Err(Error::NoExecuteAbove),
            changed => changed,
        };
        let mut gather = self.gather();
        invariant(flush.map(|flush| gather.stale(flush)));
        gather.finish();
        cx.record_mut(start).flags = flags;
        Ok(())
    }

    /// Whether `addr` lies in the managed region (Linux's `is_vmalloc_addr`).
    pub fn is_vmalloc_addr(&self, addr: VirtAddr) -> bool {
        let offset = addr.as_u64().wrapping_sub(self.config.start.as_u64());
        offset < self.config.size
    }

    /// Reserves `size` bytes of the region without backing them (Linux's
    /// `get_vm_area`); [`populate`](Self::populate) backs them from the start,
    /// as a growing heap does. [`vfree`](Self::vfree) releases it.
    ///
    /// # Errors
    ///
    /// As [`vmalloc_with`](Self::vmalloc_with), but [`Error::OutOfFrames`] only when
    /// the manager's bookkeeping needs a frame (the area itself takes none), and no
    /// [`Error::NoExecuteAbove`]: nothing is mapped yet ([`populate`](Self::populate)
    /// says it). Nothing changes on error.
    #[track_caller]
    pub fn reserve(&self, size: usize, options: &VmOptions) -> Result<NonNull<u8>, Error> {
        self.pages_for_options(size as u64, options)?;
        let align = self.check_align(options.align)?;
        let flags = options.prot.leaf_flags()?;
        let mut record = AreaRecord::new(AreaKind::Reserved, size as u64, flags, options);
        record.mapped_pages = 0;
        self.transact(|cx| cx.create_area(record, align).map(as_ptr))
    }

    /// Backs the first `bytes` (rounded up to pages) of a reserved area with fresh
    /// frames, mapping only the pages not mapped yet. Returns the bytes now backed.
    ///
    /// # Errors
    ///
    /// As [`vfree`](Self::vfree) for `ptr` ([`Error::WrongKind`] for anything but a
    /// reserved area), [`Error::SizeTooLarge`] past the area, [`Error::OutOfFrames`],
    /// [`Error::NoExecuteAbove`] for executable rights below an upper entry with
    /// `NO_EXECUTE` (a boot loader's table the manager adopted). On error nothing
    /// changed.
    ///
    /// # Safety
    ///
    /// The area is the caller's to change: nothing else relies on its pages past
    /// what it populated staying unmapped. A call refused with an error is safe.
    pub unsafe fn populate(&self, ptr: *mut u8, bytes: usize) -> Result<usize, Error> {
        self.transact(|cx| {
            let (start, record) = cx.live_area_at(ptr, &[AreaKind::Reserved])?;
            if record.sparse {
                // Mapped page by page: see `reserve_sparse`.
                return Err(Error::WrongKind);
            }
            let want = (bytes as u64).div_ceil(PAGE_SIZE);
            if want > record.size / PAGE_SIZE {
                return Err(Error::SizeTooLarge);
            }
            let have = record.mapped_pages;
            if want > have {
                cx.back_pages(start, have..want, record.flags, record.zeroed)?;
                cx.record_mut(start).mapped_pages = want;
                cx.inner().data_frames += want - have;
            }
            Ok((want.max(have) * PAGE_SIZE) as usize)
        })
    }

    /// Flushes the TLB for every area waiting on the lazy-purge list (one batch, see
    /// [the purge](super::purge)), then returns their frames and virtual ranges. With
    /// [per-CPU blocks](super::blocks) it first empties every CPU's cache
    /// ([`drain_cpu_caches`](Self::drain_cpu_caches)), so every frame not in use is
    /// back in the frame allocator when it returns.
    pub fn purge(&self) {
        self.drain_cpu_caches();
        self.lock().purge();
    }

    /// Pages for `bytes` of an area with a guard page, refusing zero and sizes the
    /// region cannot hold.
    pub(super) fn pages_for(&self, bytes: u64) -> Result<u64, Error> {
        self.pages_for_area(bytes, true)
    }

    /// Pages for `bytes` of an area made with `options`, with its guard page or not.
    pub(super) fn pages_for_options(&self, bytes: u64, options: &VmOptions) -> Result<u64, Error> {
        self.pages_for_area(bytes, !options.flags.contains(VmFlags::NO_GUARD))
    }

    /// Pages for `bytes` of an area with a guard page or not.
    pub(super) fn pages_for_area(&self, bytes: u64, guard: bool) -> Result<u64, Error> {
        if bytes == 0 {
            return Err(Error::ZeroSize);
        }
        // The per-CPU blocks' zone is never free for the tree's areas.
        let guard = if guard { PAGE_SIZE } else { 0 };
        let room = (self.config.size - guard).saturating_sub(self.blocks.zone_bytes());
        if bytes > room {
            return Err(Error::SizeTooLarge);
        }
        Ok(bytes.div_ceil(PAGE_SIZE))
    }

    /// An alignment of at least a page, refusing those that are not powers of two or
    /// that exceed the region.
    pub(super) fn check_align(&self, align: u64) -> Result<u64, Error> {
        if !align.is_power_of_two() || align > self.config.size {
            return Err(Error::BadAlignment);
        }
        Ok(align.max(PAGE_SIZE))
    }

    /// Whether an area made with `options` may come from a per-CPU block: page
    /// alignment, a guard page, no 2 MiB pages and no label (listings show labels).
    fn fits_a_block(options: &VmOptions) -> bool {
        options.align <= PAGE_SIZE
            && options.tag.is_empty()
            && !options.flags.intersects(VmFlags::NO_GUARD | VmFlags::HUGE)
    }

    /// The manager with its lock held. While it waits, the flush policy serves
    /// other CPUs' flush requests ([`TlbFlush::relax`]): the holder may be waiting
    /// for this CPU's flush.
    /// Frees queued by [`vfree_atomic`](Self::vfree_atomic) are done first.
    pub(super) fn lock(&self) -> Locked<'_, F, M, T> {
        self.enter(self.inner.lock(&self.tlb))
    }

    /// Frees what [`vfree_atomic`](Self::vfree_atomic) queued, at the start of a call
    /// that may not take the manager's lock (taking it does this).
    #[inline]
    pub(super) fn settle(&self) {
        if self.deferred.any() {
            drop(self.lock());
        }
    }

    /// The locked context over `guard`, after the frees `vfree_atomic` queued.
    fn enter<'a>(&'a self, guard: IrqGuard<'a, Inner<F, M>>) -> Locked<'a, F, M, T> {
        let mut cx = Locked::new(self, guard);
        if self.deferred.any() {
            self.deferred.drain(|addr| {
                if cx.vfree(addr as *mut u8).is_err() {
                    cx.inner().deferred_refused += 1;
                }
            });
        }
        cx
    }

    /// Runs `op` under the lock; if it fails, gives back every bookkeeping slab it
    /// took, so the frame allocator sees no difference. If it ran out of frames while
    /// the per-CPU caches held some, empties them all and runs it once more.
    pub(super) fn transact<R>(
        &self,
        mut op: impl FnMut(&mut Locked<'_, F, M, T>) -> Result<R, Error>,
    ) -> Result<R, Error> {
        let result = self.transact_once(&mut op);
        if blocks::ran_out(&result) && self.drain_cpu_caches() {
            return self.transact_once(&mut op);
        }
        result
    }

    fn transact_once<R>(
        &self,
        op: &mut impl FnMut(&mut Locked<'_, F, M, T>) -> Result<R, Error>,
    ) -> Result<R, Error> {
        let mut cx = self.lock();
        let slabs = cx.inner().pool.frames_held();
        let result = op(&mut cx);
        if result.is_err() {
            let mut gather = self.gather();
            cx.inner().pool.shrink_to(slabs, |frame| gather.free(frame));
            gather.finish();
        }
        result
    }

    /// A gather for what this manager unmaps: the only way its frames and tables
    /// leave it (see [the gather](super::gather)).
    pub(super) fn gather(&self) -> Gather<'_, F> {
        Gather::for_region(&self.frames, &self.tlb, &self.config)
    }
}

impl<F, M, T> Vmalloc<F, M, T>
where
    F: FrameSource + Clone,
    M: PhysMemory + Copy,
    T: TlbFlush,
{
    /// The drop's first part: unmaps every area, flushes, and returns the data
    /// frames, the page tables and the tree's bookkeeping (see `drop`).
    fn release_areas_and_tables(&self) {
        let region = page_range(self.config.start, 0..self.config.size / PAGE_SIZE);
        let mut leaked = self.gather();
        self.unmap_all_blocks(&mut leaked);
        leaked.finish();
        let mut cx = self.lock();
        cx.retire_all();
        cx.purge();
        let inner = cx.inner();
        let mut gather = Gather::new(&self.frames, &self.tlb);
        let zone = self.blocks.zone_bytes() / PAGE_SIZE;
        if zone > 0 {
            let start = VirtAddr::new(self.blocks.zone());
            gather.sweep_tables(&mut inner.tables, page_range(start, 0..zone));
        }
        let adopted = inner.adopted_roots;
        let tables = &mut inner.tables;
        // The marks and the top-level tables go together: a manager made over the
        // region meanwhile finds the entries either still marked or free.
        let claiming = claims::lock(&self.tlb);
        // SAFETY: the claiming lock keeps other managers off the entries.
        unsafe { tables.mark_managed(region, false) };
        gather.unlink_tables(|push| {
            // SAFETY: `new`'s contract: no address space uses copies of the region's
            // top-level entries once the manager is dropped.
            unsafe { tables.release_top_level_except(region, &adopted, push) }
        });
        drop(claiming);
        inner.space = VSpace::empty();
        inner.areas = AreaMap::new();
        inner.pool.release_all(|frame| gather.free(frame));
        let freed = gather.finish();
        inner.page_table_frames = inner.page_table_frames.saturating_sub(freed);
        drop(cx);
    }
}

impl<F, M, T> Drop for Vmalloc<F, M, T>
where
    F: FrameSource + Clone,
    M: PhysMemory + Copy,
    T: TlbFlush,
{
    /// Unmaps every area, flushes, and returns every frame the manager took: data
    /// frames, the page tables it created (the top-level ones too, clearing their
    /// entries in the root) and its bookkeeping. Frames of `vmap` areas are not the
    /// manager's and are not returned anywhere; `ioremap` ranges are just unmapped.
    fn drop(&mut self) {
        self.empty_all_caches();
        {
            // As every call into the frame allocator: an interrupt handler that
            // allocates through another manager on the same frames never finds
            // their lock held.
            let _irq = IrqOff::new(&self.tlb);
            self.release_areas_and_tables();
        }
        self.release_block_bookkeeping();
    }
}
