//! The vmalloc area manager: virtually contiguous memory from scattered frames.
//!
//! [`Vmalloc`] manages one virtual region (by default Linux's x86_64 vmalloc range,
//! `0xffffc90000000000..0xffffe90000000000`). Each allocation reserves a contiguous
//! range there, takes 4 KiB frames from wherever the frame allocator finds them, and
//! writes the page-table entries with one pass of the [page-table cursor]. One unmapped
//! guard page follows each area, so running off its end faults instead of corrupting
//! the neighbour.
//!
//! # Lazy TLB flushing
//!
//! Unmapping needs a TLB flush before the frames or the virtual range may be reused,
//! and on an SMP machine a flush is an inter-processor interrupt. Like Linux, `vfree`
//! does not flush: it *detaches* the area's entries (clears their present bit, so new
//! walks fault at once) and puts the area on a purge list. When the list holds more
//! than [`VmallocConfig::lazy_threshold_pages`] pages, or the region or the frame
//! allocator runs dry, or [`Vmalloc::purge`] is called, one purge flushes them all: a
//! range flush per area while the list holds at most
//! [`SINGLE_PAGE_FLUSH_CEILING`](crate::tlb::SINGLE_PAGE_FLUSH_CEILING) pages, one full
//! flush above that, and one more if emptied page tables are freed. Only then do their
//! virtual ranges become free again.
//!
//! Linux returns the pages to the page allocator right away and lets a stale TLB entry
//! point at a page that someone else may already own. Here the frames stay recorded in
//! the detached entries themselves (the hardware ignores every bit of a non-present
//! entry) and go back to the frame allocator after the flush: no frame is handed out
//! again while a stale translation may still reach it, and waiting costs no memory
//! for bookkeeping. [`VmallocConfig::eager`] flushes on every free instead.
//!
//! # Locking
//!
//! All methods take `&self` and serialise on one spin lock, so a kernel keeps one
//! `Vmalloc` in a `static` (`spin::Once`) and calls it from any CPU. The frame
//! allocator has its own lock, taken inside this one; nothing here allocates from a
//! global allocator, so the kernel heap may be built on top without deadlock.
//!
//! [page-table cursor]: crate::paging

mod area;
// Some helpers serve only the tests and `benches/vspace.rs`, which includes these files.
#[allow(dead_code)]
mod node;
mod owned;
mod purge;
#[allow(dead_code)]
mod space;
#[cfg(test)]
mod test;

pub use area::{AreaInfo, AreaKind, VmallocStats};
pub use owned::{VBox, VBuffer, VmallocOps};

use crate::paging::{PageTables, RangeFlush};
use crate::{Error, FrameSource, PAGE_SIZE, PhysMemory, TlbFlush};
use area::AreaRecord;
use bitflags::bitflags;
use core::cell::{Cell, RefCell};
use core::ptr::NonNull;
use node::NodePool;
use purge::PurgeList;
use space::{AreaMap, VSpace};
use x86_64::structures::paging::mapper::MappedFrame;
use x86_64::structures::paging::page::PageRange;
use x86_64::structures::paging::{Page, PageTableFlags, PhysFrame, Size4KiB};
use x86_64::{PhysAddr, VirtAddr};

pub use space::{VMALLOC_END, VMALLOC_START};
/// Size of Linux's x86_64 vmalloc range: 32 TiB.
pub const VMALLOC_SIZE: u64 = VMALLOC_END - VMALLOC_START;

/// Pages freed lazily before a purge is forced by default: 32 MiB, as Linux's
/// `lazy_max_pages()` on one CPU.
pub const DEFAULT_LAZY_THRESHOLD_PAGES: u64 = (32 << 20) / PAGE_SIZE;

/// Frames taken from the allocator per bulk call while mapping.
const CHUNK: usize = 64;

bitflags! {
    /// Access rights of a mapping. Kernel read access is always granted.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct Prot: u8 {
        /// Readable (always granted; x86 cannot map write-only or execute-only).
        const READ = 1 << 0;
        /// Writable.
        const WRITE = 1 << 1;
        /// Executable. Refused together with `WRITE` (W^X).
        const EXEC = 1 << 2;
        /// Reachable from user mode. Such mappings are not global.
        const USER = 1 << 3;
    }
}

impl Prot {
    /// Kernel read-write data: the default.
    pub const KERNEL_RW: Prot = Prot::READ.union(Prot::WRITE);

    /// The leaf entry flags for these rights: present, NX unless executable, global
    /// unless user-reachable.
    fn leaf_flags(self) -> Result<PageTableFlags, Error> {
        if self.contains(Prot::WRITE | Prot::EXEC) {
            return Err(Error::WriteExecute);
        }
        let mut flags = PageTableFlags::PRESENT;
        flags.set(PageTableFlags::WRITABLE, self.contains(Prot::WRITE));
        flags.set(PageTableFlags::NO_EXECUTE, !self.contains(Prot::EXEC));
        flags.set(PageTableFlags::USER_ACCESSIBLE, self.contains(Prot::USER));
        flags.set(PageTableFlags::GLOBAL, !self.contains(Prot::USER));
        Ok(flags)
    }
}

bitflags! {
    /// Options of an allocation, after Linux's `VM_*` and `__GFP_ZERO` flags.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct VmFlags: u8 {
        /// Zero the memory (`vzalloc`).
        const ZERO = 1 << 0;
        /// No guard page after the area (Linux's `VM_NO_GUARD`).
        const NO_GUARD = 1 << 1;
    }
}

/// Memory type of an `ioremap` mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CacheMode {
    /// Strong uncacheable (PCD and PWT set: PAT entry 3, UC in the power-on PAT).
    Uncached,
    /// Write-combining: PWT set alone, selecting PAT entry 1, which the kernel must
    /// program to WC (Linux does; the power-on value of entry 1 is write-through).
    WriteCombining,
    /// Write-through (PWT alone with the power-on PAT).
    WriteThrough,
}

impl CacheMode {
    fn flags(self) -> PageTableFlags {
        match self {
            CacheMode::Uncached => PageTableFlags::NO_CACHE | PageTableFlags::WRITE_THROUGH,
            CacheMode::WriteCombining | CacheMode::WriteThrough => PageTableFlags::WRITE_THROUGH,
        }
    }
}

/// Everything `vmalloc_with` (this library's `__vmalloc_node_range`) can be told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmOptions {
    /// Alignment of the start address, a power of two (bytes). At least a page.
    pub align: u64,
    /// Access rights.
    pub prot: Prot,
    /// Zeroing and guard-page options.
    pub flags: VmFlags,
    /// Label shown in [`Vmalloc::areas`] listings (Linux prints the caller).
    pub tag: &'static str,
}

impl Default for VmOptions {
    fn default() -> Self {
        Self {
            align: PAGE_SIZE,
            prot: Prot::KERNEL_RW,
            flags: VmFlags::empty(),
            tag: "",
        }
    }
}

/// Region and flushing policy of a [`Vmalloc`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmallocConfig {
    /// First address of the region; page-aligned and canonical.
    pub start: VirtAddr,
    /// Bytes in the region; a multiple of the page size.
    pub size: u64,
    /// Pages that may wait for the batched flush before `vfree` forces a purge.
    pub lazy_threshold_pages: u64,
    /// Flush and return frames on every free instead of batching.
    pub eager: bool,
}

impl Default for VmallocConfig {
    fn default() -> Self {
        Self {
            start: VirtAddr::new(VMALLOC_START),
            size: VMALLOC_SIZE,
            lazy_threshold_pages: DEFAULT_LAZY_THRESHOLD_PAGES,
            eager: false,
        }
    }
}

/// The vmalloc area manager. See the [module documentation](self).
pub struct Vmalloc<F: FrameSource + Clone, M: PhysMemory + Copy, T: TlbFlush> {
    inner: spin::Mutex<Inner<F, M>>,
    frames: F,
    phys: M,
    tlb: T,
    config: VmallocConfig,
}

/// State under the lock.
struct Inner<F: FrameSource, M: PhysMemory + Copy> {
    tables: PageTables<M>,
    space: VSpace,
    areas: AreaMap<AreaRecord>,
    pool: NodePool<F, M>,
    purge: PurgeList,
    page_table_frames: u64,
    data_frames: u64,
    purges: u64,
}

// SAFETY: `Inner` holds raw pointers into frames it owns (page tables, bookkeeping
// nodes); they are only dereferenced with the manager's lock held, so moving the
// state to another CPU is sound whenever the phys-to-virt access itself may move.
unsafe impl<F: FrameSource + Send, M: PhysMemory + Copy + Send> Send for Inner<F, M> {}

impl<F, M, T> Vmalloc<F, M, T>
where
    F: FrameSource + Clone,
    M: PhysMemory + Copy,
    T: TlbFlush,
{
    /// A manager for `config`'s region of the address space whose top-level table is
    /// `root`.
    ///
    /// # Errors
    ///
    /// [`Error::Unaligned`] if the region's start or size is not page-aligned,
    /// [`Error::ZeroSize`] for an empty region, [`Error::RangeWraps`] if it wraps,
    /// [`Error::NonCanonical`] if it leaves the canonical half it starts in,
    /// [`Error::OutOfFrames`] if no frame is left for the first bookkeeping node.
    ///
    /// # Safety
    ///
    /// - `root` is a valid PML4 reachable through `phys`, and stays valid while the
    ///   manager lives (normally the kernel's page table, loaded in CR3 on every CPU
    ///   that touches vmalloc memory, or whose top-level entries for the region are
    ///   kept identical in every address space);
    /// - nothing else maps, unmaps or frees anything in the region's page tables;
    /// - `frames` hands out frames nobody else uses, reachable through `phys`;
    /// - `tlb` flushes the TLB of every CPU that may hold translations of the region.
    pub unsafe fn new(
        config: VmallocConfig,
        root: PhysFrame,
        phys: M,
        frames: F,
        tlb: T,
    ) -> Result<Self, Error> {
        check_region(config.start, config.size)?;
        // SAFETY: forwarded from this function's contract.
        let tables = unsafe { PageTables::new(root, phys) };
        let mut pool = NodePool::new::<AreaRecord>(frames.clone(), phys);
        let space = VSpace::new(&mut pool, config.start, config.size)?;
        let inner = Inner {
            tables,
            space,
            areas: AreaMap::new(),
            pool,
            purge: PurgeList::new(),
            page_table_frames: 0,
            data_frames: 0,
            purges: 0,
        };
        Ok(Self {
            inner: spin::Mutex::new(inner),
            frames,
            phys,
            tlb,
            config,
        })
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
    pub fn vmalloc(&self, size: usize) -> Result<NonNull<u8>, Error> {
        self.vmalloc_with(size, &VmOptions::default())
    }

    /// As [`vmalloc`](Self::vmalloc), with the memory zeroed.
    ///
    /// # Errors
    ///
    /// As [`vmalloc`](Self::vmalloc).
    pub fn vzalloc(&self, size: usize) -> Result<NonNull<u8>, Error> {
        let options = VmOptions {
            flags: VmFlags::ZERO,
            ..VmOptions::default()
        };
        self.vmalloc_with(size, &options)
    }

    /// The general form: alignment, protection, zeroing, guard page and label
    /// (Linux's `__vmalloc_node_range`).
    ///
    /// # Errors
    ///
    /// As [`vmalloc`](Self::vmalloc), plus [`Error::BadAlignment`] for an alignment
    /// that is not a power of two and [`Error::WriteExecute`] for `WRITE | EXEC`.
    pub fn vmalloc_with(&self, size: usize, options: &VmOptions) -> Result<NonNull<u8>, Error> {
        let pages = self.pages_for(size as u64)?;
        let align = check_align(options.align)?;
        let flags = options.prot.leaf_flags()?;
        let record = AreaRecord::new(AreaKind::Vmalloc, pages, flags, options);
        let mut inner = self.inner.lock();
        let start = self.create_area(&mut inner, record, align)?;
        let zero = options.flags.contains(VmFlags::ZERO);
        if let Err(error) = self.back_pages(&mut inner, start, 0..pages, flags, zero) {
            self.destroy_unmapped(&mut inner, start);
            return Err(error);
        }
        inner.data_frames += pages;
        Ok(as_ptr(start))
    }

    /// Frees an area made by `vmalloc`/`vzalloc`/`vmalloc_with` (or [`reserve`]): its
    /// entries are detached at once, and its frames and virtual range return after
    /// the TLB flush that covers them (see the module documentation).
    ///
    /// # Errors
    ///
    /// [`Error::NullPointer`], [`Error::NotInRegion`], [`Error::InteriorPointer`],
    /// [`Error::NotAllocated`] (never allocated, or freed already),
    /// [`Error::WrongKind`] for a `vmap` or `ioremap` area. Nothing changes on error.
    ///
    /// [`reserve`]: Self::reserve
    pub fn vfree(&self, ptr: *mut u8) -> Result<(), Error> {
        let mut inner = self.inner.lock();
        let (start, record) =
            self.live_area_at(&inner, ptr, &[AreaKind::Vmalloc, AreaKind::Reserved])?;
        inner.data_frames -= record.mapped_pages;
        self.retire(&mut inner, start, record);
        Ok(())
    }

    /// Maps frames the caller owns at one contiguous virtual range (Linux's `vmap`).
    /// The frames stay the caller's: [`vunmap`](Self::vunmap) hands them back.
    ///
    /// # Errors
    ///
    /// [`Error::ZeroSize`] for no frames, [`Error::WriteExecute`],
    /// [`Error::OutOfVirtualSpace`], [`Error::OutOfFrames`] (for page tables).
    pub fn vmap(&self, frames: &[PhysFrame], prot: Prot) -> Result<NonNull<u8>, Error> {
        let pages = self.pages_for(frames.len() as u64 * PAGE_SIZE)?;
        let flags = prot.leaf_flags()?;
        let options = VmOptions {
            prot,
            ..VmOptions::default()
        };
        let record = AreaRecord::new(AreaKind::Vmap, pages, flags, &options);
        let mut inner = self.inner.lock();
        let start = self.create_area(&mut inner, record, PAGE_SIZE)?;
        let mapped =
            self.map_with_retry(&mut inner, page_at(start, 0), frames.iter().copied(), flags);
        if let Err(error) = mapped {
            self.destroy_unmapped(&mut inner, start);
            return Err(error);
        }
        Ok(as_ptr(start))
    }

    /// Unmaps a `vmap` area, flushes the TLB for it, and hands each frame back to
    /// `on_frame` in address order; they never go to the frame allocator.
    ///
    /// # Errors
    ///
    /// As [`vfree`](Self::vfree), with [`Error::WrongKind`] for anything but `vmap`.
    pub fn vunmap(&self, ptr: *mut u8, on_frame: impl FnMut(PhysFrame)) -> Result<(), Error> {
        let mut inner = self.inner.lock();
        let (start, record) = self.live_area_at(&inner, ptr, &[AreaKind::Vmap])?;
        let range = page_range(start, 0..record.mapped_pages);
        self.unmap_flushed(&mut inner, range, on_frame);
        inner.remove_area(start);
        Ok(())
    }

    /// Maps the physical MMIO range `phys..phys + size` with `cache` attributes
    /// (Linux's `ioremap`). `phys` need not be page-aligned: the returned pointer
    /// keeps its offset into the page. The frames are not the frame allocator's.
    ///
    /// # Errors
    ///
    /// [`Error::ZeroSize`], [`Error::SizeTooLarge`] (including a range past the 52-bit
    /// physical limit), [`Error::OutOfVirtualSpace`], [`Error::OutOfFrames`].
    pub fn ioremap(
        &self,
        phys: PhysAddr,
        size: usize,
        cache: CacheMode,
    ) -> Result<NonNull<u8>, Error> {
        if size == 0 {
            return Err(Error::ZeroSize);
        }
        let offset = phys.as_u64() % PAGE_SIZE;
        let end = phys
            .as_u64()
            .checked_add(size as u64)
            .ok_or(Error::SizeTooLarge)?;
        if PhysAddr::try_new(end - 1).is_err() {
            return Err(Error::SizeTooLarge);
        }
        let pages = self.pages_for(offset + size as u64)?;
        let flags = Prot::KERNEL_RW.leaf_flags()? | cache.flags();
        let mut record = AreaRecord::new(AreaKind::Ioremap, pages, flags, &VmOptions::default());
        record.phys = phys;
        let first = PhysFrame::containing_address(phys);
        let mut inner = self.inner.lock();
        let start = self.create_area(&mut inner, record, PAGE_SIZE)?;
        let frames = (0..pages as usize).map(|i| first + i as u64);
        if let Err(error) = self.map_with_retry(&mut inner, page_at(start, 0), frames, flags) {
            self.destroy_unmapped(&mut inner, start);
            return Err(error);
        }
        Ok(as_ptr(start + offset))
    }

    /// Unmaps an `ioremap` area, given the exact pointer `ioremap` returned.
    ///
    /// # Errors
    ///
    /// As [`vfree`](Self::vfree), with [`Error::WrongKind`] for anything but `ioremap`.
    pub fn iounmap(&self, ptr: *mut u8) -> Result<(), Error> {
        let mut inner = self.inner.lock();
        let page_start = (ptr as u64) & !(PAGE_SIZE - 1);
        let (start, record) =
            self.live_area_at(&inner, page_start as *mut u8, &[AreaKind::Ioremap])?;
        if ptr as u64 != start.as_u64() + record.phys.as_u64() % PAGE_SIZE {
            return Err(Error::InteriorPointer);
        }
        self.retire(&mut inner, start, record);
        Ok(())
    }

    /// Resizes a `vmalloc` area to `new_size` bytes, keeping its contents: shrinks in
    /// place; grows in place when the virtual pages after it are free; otherwise moves
    /// the existing frames to a new range by remapping them, without copying data.
    /// New memory is zeroed if the area was made zeroed.
    ///
    /// # Errors
    ///
    /// As [`vfree`](Self::vfree) for `ptr`, as [`vmalloc`](Self::vmalloc) for
    /// `new_size`. On error the old area is untouched.
    pub fn vrealloc(&self, ptr: *mut u8, new_size: usize) -> Result<NonNull<u8>, Error> {
        let new_pages = self.pages_for(new_size as u64)?;
        let mut inner = self.inner.lock();
        let (start, record) = self.live_area_at(&inner, ptr, &[AreaKind::Vmalloc])?;
        let old_pages = record.mapped_pages;
        // Every path below needs at most two bookkeeping nodes: have them first.
        inner.pool.reserve(2)?;
        let moved = if new_pages <= old_pages {
            self.shrink_in_place(&mut inner, start, &record, new_pages)?;
            start
        } else if inner.try_extend(start, record.span(), record.span_for(new_pages)) {
            self.grow_in_place(&mut inner, start, &record, new_pages)?;
            start
        } else {
            self.grow_by_moving(&mut inner, start, &record, new_pages)?
        };
        inner.data_frames = inner.data_frames + new_pages - old_pages;
        Ok(as_ptr(moved))
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
        let inner = self.inner.lock();
        let (start, _, record) = inner.area_containing(addr).ok_or(Error::NotMapped)?;
        let page_index = (addr - start) / PAGE_SIZE;
        if page_index >= record.mapped_pages {
            return Err(Error::NotMapped);
        }
        match inner.tables.translate(addr)? {
            (_, _, MappedFrame::Size4KiB(frame)) => Ok(frame),
            (phys, _, _) => Ok(PhysFrame::containing_address(phys)),
        }
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
    /// As [`vmalloc_with`](Self::vmalloc_with), except for frames.
    pub fn reserve(&self, size: usize, options: &VmOptions) -> Result<NonNull<u8>, Error> {
        let pages = self.pages_for(size as u64)?;
        let align = check_align(options.align)?;
        let flags = options.prot.leaf_flags()?;
        let mut record = AreaRecord::new(AreaKind::Reserved, pages, flags, options);
        record.mapped_pages = 0;
        let mut inner = self.inner.lock();
        let start = self.create_area(&mut inner, record, align)?;
        Ok(as_ptr(start))
    }

    /// Backs the first `bytes` (rounded up to pages) of a reserved area with fresh
    /// frames, mapping only the pages not mapped yet. Returns the bytes now backed.
    ///
    /// # Errors
    ///
    /// As [`vfree`](Self::vfree) for `ptr` ([`Error::WrongKind`] for anything but a
    /// reserved area), [`Error::SizeTooLarge`] past the area, [`Error::OutOfFrames`].
    /// On error nothing changed.
    pub fn populate(&self, ptr: *mut u8, bytes: usize) -> Result<usize, Error> {
        let mut inner = self.inner.lock();
        let (start, record) = self.live_area_at(&inner, ptr, &[AreaKind::Reserved])?;
        let want = (bytes as u64).div_ceil(PAGE_SIZE);
        if want * PAGE_SIZE > record.size {
            return Err(Error::SizeTooLarge);
        }
        let have = record.mapped_pages;
        if want > have {
            let zero = record.zeroed;
            self.back_pages(&mut inner, start, have..want, record.flags, zero)?;
            inner.record_mut(start).mapped_pages = want;
            inner.data_frames += want - have;
        }
        Ok((want.max(have) * PAGE_SIZE) as usize)
    }

    /// Flushes the TLB for every area waiting on the lazy-purge list (one batch, see
    /// the module documentation), then returns their frames and virtual ranges.
    pub fn purge(&self) {
        let mut inner = self.inner.lock();
        self.purge_locked(&mut inner);
    }

    /// Counters of the region, the frames held, and the purge list.
    pub fn stats(&self) -> VmallocStats {
        let inner = self.inner.lock();
        VmallocStats {
            region_total: self.config.size,
            used: self.config.size - inner.space.free_total() - inner.purge.bytes,
            pending_purge_bytes: inner.purge.bytes,
            largest_free: inner.space.largest_free(),
            areas: inner.areas.len() as u64,
            data_frames: inner.data_frames,
            page_table_frames: inner.page_table_frames,
            bookkeeping_frames: inner.pool.frames_held() as u64,
            pending_purge_pages: inner.purge.pages,
            pending_purge_frames: inner.purge.frames,
            purges: inner.purges,
        }
    }

    /// The live areas, in address order. The iterator holds the manager's lock:
    /// drop it before calling the manager again.
    pub fn areas(&self) -> Areas<'_, F, M> {
        Areas {
            inner: self.inner.lock(),
            next: 0,
        }
    }

    /// A `/proc/vmallocinfo`-style listing, one line per live area.
    pub fn info(&self) -> VmallocInfo<'_, F, M, T> {
        VmallocInfo { vmalloc: self }
    }
}

/// Private machinery, each step undoing itself on failure.
impl<F, M, T> Vmalloc<F, M, T>
where
    F: FrameSource + Clone,
    M: PhysMemory + Copy,
    T: TlbFlush,
{
    /// Pages for `bytes`, refusing zero and sizes the region cannot hold.
    fn pages_for(&self, bytes: u64) -> Result<u64, Error> {
        if bytes == 0 {
            return Err(Error::ZeroSize);
        }
        if bytes > self.config.size - PAGE_SIZE {
            return Err(Error::SizeTooLarge);
        }
        Ok(bytes.div_ceil(PAGE_SIZE))
    }

    /// Whether the empty region has an address aligned to `align` with `span`
    /// bytes after it.
    fn could_ever_fit(&self, span: u64, align: u64) -> bool {
        let start = self.config.start.as_u64();
        let end = start + self.config.size;
        start
            .checked_next_multiple_of(align)
            .and_then(|first| first.checked_add(span))
            .is_some_and(|last| last <= end)
    }

    /// The live area starting exactly at `ptr`, of one of `kinds`.
    fn live_area_at(
        &self,
        inner: &Inner<F, M>,
        ptr: *mut u8,
        kinds: &[AreaKind],
    ) -> Result<(VirtAddr, AreaRecord), Error> {
        if ptr.is_null() {
            return Err(Error::NullPointer);
        }
        let addr = VirtAddr::try_new(ptr as u64).map_err(|_| Error::NotInRegion)?;
        if !self.is_vmalloc_addr(addr) {
            return Err(Error::NotInRegion);
        }
        let (start, _, record) = inner.area_containing(addr).ok_or(Error::NotAllocated)?;
        if start != addr {
            let in_guard = addr - start >= record.size;
            return Err(if in_guard {
                Error::NotAllocated
            } else {
                Error::InteriorPointer
            });
        }
        if !kinds.contains(&record.kind) {
            return Err(Error::WrongKind);
        }
        Ok((start, record))
    }

    /// Reserves a range and records `record` there, purging once if the region or the
    /// frames for bookkeeping ran out while areas wait on the purge list.
    fn create_area(
        &self,
        inner: &mut Inner<F, M>,
        record: AreaRecord,
        align: u64,
    ) -> Result<VirtAddr, Error> {
        if !self.could_ever_fit(record.span(), align) {
            // No purge can help: refuse before touching anything.
            return Err(Error::OutOfVirtualSpace);
        }
        loop {
            match inner.insert_area(record, align) {
                Err(Error::OutOfVirtualSpace | Error::OutOfFrames) if !inner.purge.is_empty() => {
                    self.purge_locked(inner)
                }
                result => return result,
            }
        }
    }

    /// Removes an area none of whose pages are mapped.
    fn destroy_unmapped(&self, inner: &mut Inner<F, M>, start: VirtAddr) {
        inner.remove_area(start);
    }

    /// Maps fresh frames at pages `pages` of the area at `start`, in chunks taken in
    /// bulk from the frame allocator. On failure, unmaps and frees what it mapped.
    fn back_pages(
        &self,
        inner: &mut Inner<F, M>,
        start: VirtAddr,
        pages: core::ops::Range<u64>,
        flags: PageTableFlags,
        zero: bool,
    ) -> Result<(), Error> {
        let mut chunk = [PhysFrame::containing_address(PhysAddr::zero()); CHUNK];
        let mut next = pages.start;
        while next < pages.end {
            let want = ((pages.end - next) as usize).min(CHUNK);
            let got = self.alloc_frames(inner, &mut chunk[..want]);
            let frames = &chunk[..got];
            let result = if got < want {
                Err(Error::OutOfFrames)
            } else {
                if zero {
                    frames.iter().for_each(|&frame| self.zero_frame(frame));
                }
                self.map_with_retry(inner, page_at(start, next), frames.iter().copied(), flags)
            };
            if let Err(error) = result {
                invariant(self.frames.free_frames(frames));
                self.free_range(inner, page_range(start, pages.start..next));
                return Err(error);
            }
            next += got as u64;
        }
        Ok(())
    }

    /// Fills `out` from the frame allocator, purging once if it runs dry while
    /// frames wait on the purge list.
    fn alloc_frames(&self, inner: &mut Inner<F, M>, out: &mut [PhysFrame]) -> usize {
        let got = self.frames.alloc_frames(out);
        if got == out.len() || inner.purge.is_empty() {
            return got;
        }
        self.purge_locked(inner);
        got + self.frames.alloc_frames(&mut out[got..])
    }

    /// Maps `frames` at `page` onward (all or nothing), purging once if page-table
    /// frames run out while frames wait on the purge list.
    fn map_with_retry<I>(
        &self,
        inner: &mut Inner<F, M>,
        page: Page,
        frames: I,
        flags: PageTableFlags,
    ) -> Result<(), Error>
    where
        I: ExactSizeIterator<Item = PhysFrame> + Clone,
    {
        loop {
            let source = CountingFrames::new(&self.frames);
            let pages = Page::range(page, page + frames.len() as u64);
            let result = inner.tables.map(pages, frames.clone(), flags, &source);
            inner.page_table_frames = inner.page_table_frames.wrapping_add_signed(source.net());
            match result {
                Err(Error::OutOfFrames) if !inner.purge.is_empty() => self.purge_locked(inner),
                result => return result,
            }
        }
    }

    fn zero_frame(&self, frame: PhysFrame) {
        let ptr = self.phys.phys_to_virt(frame.start_address());
        // SAFETY: `frame` was just handed to us by the frame allocator, and `PhysMemory`
        // guarantees the whole frame is writable through `ptr`.
        unsafe { core::ptr::write_bytes(ptr, 0, PAGE_SIZE as usize) };
    }

    /// Frees an area: detaches its mapped pages and queues it for the batched flush.
    fn retire(&self, inner: &mut Inner<F, M>, start: VirtAddr, record: AreaRecord) {
        let mapped = page_range(start, 0..record.mapped_pages);
        if !mapped.is_empty() {
            // The flush is the purge's: until then the frames stay recorded in the
            // detached entries and nothing can reuse them.
            invariant(inner.tables.detach(mapped).map(|flush| flush.ignore()));
        }
        // The area's node goes back to the pool and the purge entry takes it.
        let removed = inner.areas.remove(&mut inner.pool, start);
        debug_assert_eq!(removed.map(|area| area.size), Some(record.span()));
        inner.purge.push(&mut inner.pool, start, record);
        if self.config.eager || inner.purge.pages > self.config.lazy_threshold_pages {
            self.purge_locked(inner);
        }
    }

    /// One batched flush for every pending area, then their frames and ranges return.
    fn purge_locked(&self, inner: &mut Inner<F, M>) {
        if inner.purge.is_empty() {
            return;
        }
        if inner.purge.pages <= crate::tlb::SINGLE_PAGE_FLUSH_CEILING {
            for (start, record) in inner.purge.iter() {
                self.tlb
                    .flush_range(page_range(start, 0..record.mapped_pages));
            }
        } else {
            self.tlb.flush_all();
        }
        // Emptied page tables of all areas go after one more flush, which covers them.
        let mut sweep = TableSweep::new(&self.frames, &self.tlb);
        let mut pending = core::mem::replace(&mut inner.purge, PurgeList::new());
        let frames = FrameBatch::new(&self.frames);
        while let Some((start, record)) = pending.pop(&mut inner.pool) {
            let owns_frames = record.kind.owns_frames();
            let range = page_range(start, 0..record.mapped_pages);
            self.reclaim(
                inner,
                range,
                |frame| {
                    if owns_frames {
                        frames.push(frame)
                    }
                },
                &mut sweep,
            );
            // The entry's slot was just given back: freeing the range cannot fail.
            invariant(inner.space.free(&mut inner.pool, start, record.span()));
        }
        frames.finish();
        inner.page_table_frames -= sweep.finish(&self.tlb);
        inner.purges += 1;
    }

    /// Detaches `range`, flushes it, and hands each frame to `on_frame`, in order.
    fn unmap_flushed(
        &self,
        inner: &mut Inner<F, M>,
        range: PageRange,
        on_frame: impl FnMut(PhysFrame),
    ) {
        if range.is_empty() {
            return;
        }
        invariant(
            inner
                .tables
                .detach(range)
                .map(|flush| flush.flush(&self.tlb)),
        );
        let mut sweep = TableSweep::new(&self.frames, &self.tlb);
        self.reclaim(inner, range, on_frame, &mut sweep);
        inner.page_table_frames -= sweep.finish(&self.tlb);
    }

    /// Unmaps `range` now, flushing, and frees its frames to the allocator.
    fn free_range(&self, inner: &mut Inner<F, M>, range: PageRange) {
        let batch = FrameBatch::new(&self.frames);
        self.unmap_flushed(inner, range, |frame| batch.push(frame));
        batch.finish();
    }

    /// After the flush covering `range`: hands the frames in its detached entries to
    /// `on_frame`, and unlinks page tables left empty into `sweep`.
    fn reclaim(
        &self,
        inner: &mut Inner<F, M>,
        range: PageRange,
        mut on_frame: impl FnMut(PhysFrame),
        sweep: &mut TableSweep<'_, F>,
    ) {
        invariant(
            inner
                .tables
                .reclaim_detached(range, |_, frame| on_frame(frame)),
        );
        sweep.sweep(&mut inner.tables, range);
    }

    fn shrink_in_place(
        &self,
        inner: &mut Inner<F, M>,
        start: VirtAddr,
        record: &AreaRecord,
        new_pages: u64,
    ) -> Result<(), Error> {
        // The range first: it may need a bookkeeping node, and then nothing changed.
        inner.shrink(start, record.span(), record.span_for(new_pages))?;
        self.free_range(inner, page_range(start, new_pages..record.mapped_pages));
        let record = inner.record_mut(start);
        record.mapped_pages = new_pages;
        record.size = new_pages * PAGE_SIZE;
        Ok(())
    }

    fn grow_in_place(
        &self,
        inner: &mut Inner<F, M>,
        start: VirtAddr,
        record: &AreaRecord,
        new_pages: u64,
    ) -> Result<(), Error> {
        let old_pages = record.mapped_pages;
        if let Err(error) = self.back_pages(
            inner,
            start,
            old_pages..new_pages,
            record.flags,
            record.zeroed,
        ) {
            // A node was reserved before the extension, so giving the tail back
            // cannot fail.
            invariant(inner.shrink(start, record.span_for(new_pages), record.span()));
            return Err(error);
        }
        let record = inner.record_mut(start);
        record.mapped_pages = new_pages;
        record.size = new_pages * PAGE_SIZE;
        Ok(())
    }

    /// Maps the area's frames, then fresh ones, at a new range; unmaps the old one.
    fn grow_by_moving(
        &self,
        inner: &mut Inner<F, M>,
        start: VirtAddr,
        record: &AreaRecord,
        new_pages: u64,
    ) -> Result<VirtAddr, Error> {
        let old_pages = record.mapped_pages;
        let mut moved = *record;
        moved.mapped_pages = new_pages;
        moved.size = new_pages * PAGE_SIZE;
        let new_start = self.create_area(inner, moved, record.align)?;
        let result = self
            .remap(inner, start, new_start, old_pages, record.flags)
            .and_then(|()| {
                self.back_pages(
                    inner,
                    new_start,
                    old_pages..new_pages,
                    record.flags,
                    record.zeroed,
                )
            });
        if let Err(error) = result {
            // Only the old area's frames are mapped at the new range now: unmap them
            // there without freeing.
            self.unmap_flushed(inner, page_range(new_start, 0..old_pages), |_| {});
            inner.remove_area(new_start);
            return Err(error);
        }
        self.unmap_flushed(inner, page_range(start, 0..old_pages), |_| {});
        inner.remove_area(start);
        Ok(new_start)
    }

    /// Maps the frames behind `pages` pages at `from` again at `to`, in chunks.
    /// On failure, what it mapped at `to` is left for the caller to unmap.
    fn remap(
        &self,
        inner: &mut Inner<F, M>,
        from: VirtAddr,
        to: VirtAddr,
        pages: u64,
        flags: PageTableFlags,
    ) -> Result<(), Error> {
        let mut chunk = [PhysFrame::containing_address(PhysAddr::zero()); CHUNK];
        let mut next = 0;
        while next < pages {
            let count = ((pages - next) as usize).min(CHUNK);
            for (i, slot) in chunk[..count].iter_mut().enumerate() {
                let (phys, _, _) = inner
                    .tables
                    .translate(page_at(from, next + i as u64).start_address())?;
                *slot = PhysFrame::containing_address(phys);
            }
            if let Err(error) = self.map_with_retry(
                inner,
                page_at(to, next),
                chunk[..count].iter().copied(),
                flags,
            ) {
                // `map` is all or nothing: the caller unmaps pages `0..next` of `to`.
                self.unmap_flushed(inner, page_range(to, 0..next), |_| {});
                return Err(error);
            }
            next += count as u64;
        }
        Ok(())
    }
}

/// Iterator over live areas; see [`Vmalloc::areas`].
pub struct Areas<'a, F: FrameSource, M: PhysMemory + Copy> {
    inner: spin::MutexGuard<'a, Inner<F, M>>,
    next: u64,
}

impl<F: FrameSource, M: PhysMemory + Copy> Iterator for Areas<'_, F, M> {
    type Item = AreaInfo;

    fn next(&mut self) -> Option<AreaInfo> {
        let area = self.inner.areas.first_from(self.next)?;
        self.next = area.start.as_u64().checked_add(1)?;
        Some(AreaInfo::new(area.start, area.size, &area.data))
    }
}

/// Page tables left empty by unmapping, unlinked from their parents at once but
/// freed only after one flush covering every address they served, so no
/// paging-structure cache can still walk through a table someone reuses.
struct TableSweep<'a, F: FrameSource> {
    tables: FrameBatch<'a, F>,
    flush: Option<RangeFlush>,
    freed: u64,
}

impl<'a, F: FrameSource> TableSweep<'a, F> {
    fn new(frames: &'a F, tlb: &'a dyn TlbFlush) -> Self {
        Self {
            tables: FrameBatch::flushing_on_overflow(frames, tlb),
            flush: None,
            freed: 0,
        }
    }

    fn sweep<M: PhysMemory>(&mut self, tables: &mut PageTables<M>, range: PageRange) {
        match tables.free_empty_tables(range, &self.tables) {
            Ok((0, flush)) => flush.ignore(),
            Ok((freed, flush)) => {
                self.freed += freed as u64;
                self.flush = Some(self.flush.map_or(flush, |earlier| earlier.merge(flush)));
            }
            Err(error) => invariant(Err(error)),
        }
    }

    /// Flushes once and frees the tables; returns how many.
    fn finish(self, tlb: &dyn TlbFlush) -> u64 {
        if let Some(flush) = self.flush {
            flush.flush(tlb);
        }
        self.tables.finish();
        self.freed
    }
}

/// A `/proc/vmallocinfo`-style listing; see [`Vmalloc::info`].
pub struct VmallocInfo<'a, F: FrameSource + Clone, M: PhysMemory + Copy, T: TlbFlush> {
    vmalloc: &'a Vmalloc<F, M, T>,
}

impl<F: FrameSource + Clone, M: PhysMemory + Copy, T: TlbFlush> core::fmt::Display
    for VmallocInfo<'_, F, M, T>
{
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        self.vmalloc
            .areas()
            .try_for_each(|area| writeln!(f, "{area}"))
    }
}

fn check_region(start: VirtAddr, size: u64) -> Result<(), Error> {
    if size == 0 {
        return Err(Error::ZeroSize);
    }
    if !start.as_u64().is_multiple_of(PAGE_SIZE) || !size.is_multiple_of(PAGE_SIZE) {
        return Err(Error::Unaligned);
    }
    let last = start
        .as_u64()
        .checked_add(size - 1)
        .ok_or(Error::RangeWraps)?;
    match VirtAddr::try_new(last) {
        Ok(_) if (last >> 47) == (start.as_u64() >> 47) => Ok(()),
        _ => Err(Error::NonCanonical),
    }
}

fn check_align(align: u64) -> Result<u64, Error> {
    if !align.is_power_of_two() {
        return Err(Error::BadAlignment);
    }
    Ok(align.max(PAGE_SIZE))
}

fn page_at(start: VirtAddr, index: u64) -> Page {
    Page::containing_address(start + index * PAGE_SIZE)
}

fn page_range(start: VirtAddr, pages: core::ops::Range<u64>) -> PageRange {
    Page::range(page_at(start, pages.start), page_at(start, pages.end))
}

fn as_ptr(addr: VirtAddr) -> NonNull<u8> {
    NonNull::new(addr.as_mut_ptr()).expect("the vmalloc region does not contain address 0")
}

/// Internal consistency: areas this manager mapped are mapped. A failure is a bug
/// here, or someone else editing the region's page tables.
fn invariant(result: Result<(), Error>) {
    debug_assert_eq!(
        result,
        Ok(()),
        "vmalloc page tables out of step with its areas"
    );
}

/// A frame source that counts the frames it hands out and takes back, so the
/// manager can report how many frames its page tables hold.
struct CountingFrames<'a, F: FrameSource> {
    frames: &'a F,
    net: Cell<i64>,
}

impl<'a, F: FrameSource> CountingFrames<'a, F> {
    fn new(frames: &'a F) -> Self {
        Self {
            frames,
            net: Cell::new(0),
        }
    }
    fn net(&self) -> i64 {
        self.net.get()
    }
}

impl<F: FrameSource> FrameSource for CountingFrames<'_, F> {
    fn alloc_frame(&self) -> Option<PhysFrame<Size4KiB>> {
        let frame = self.frames.alloc_frame()?;
        self.net.set(self.net.get() + 1);
        Some(frame)
    }
    fn free_frame(&self, frame: PhysFrame<Size4KiB>) -> Result<(), Error> {
        self.frames.free_frame(frame)?;
        self.net.set(self.net.get() - 1);
        Ok(())
    }
    fn free_frames(&self, frames: &[PhysFrame<Size4KiB>]) -> Result<(), Error> {
        self.frames.free_frames(frames)?;
        self.net.set(self.net.get() - frames.len() as i64);
        Ok(())
    }
}

/// Frames on their way back to the allocator, freed in bulk. As a [`FrameSource`]
/// it only takes frames back, holding page tables until the caller has flushed;
/// should more pile up than it holds, it flushes everything first.
struct FrameBatch<'a, F: FrameSource> {
    frames: &'a F,
    overflow_flush: Option<&'a dyn TlbFlush>,
    held: RefCell<([PhysFrame; CHUNK], usize)>,
}

impl<'a, F: FrameSource> FrameBatch<'a, F> {
    fn new(frames: &'a F) -> Self {
        let held = RefCell::new(([PhysFrame::containing_address(PhysAddr::zero()); CHUNK], 0));
        Self {
            frames,
            overflow_flush: None,
            held,
        }
    }

    fn flushing_on_overflow(frames: &'a F, tlb: &'a dyn TlbFlush) -> Self {
        Self {
            overflow_flush: Some(tlb),
            ..Self::new(frames)
        }
    }

    fn push(&self, frame: PhysFrame) {
        if self.held.borrow().1 == CHUNK {
            if let Some(tlb) = self.overflow_flush {
                tlb.flush_all();
            }
            self.free_held();
        }
        let mut held = self.held.borrow_mut();
        let (buffer, len) = &mut *held;
        buffer[*len] = frame;
        *len += 1;
    }

    fn free_held(&self) {
        let mut held = self.held.borrow_mut();
        let (buffer, len) = &mut *held;
        if *len > 0 {
            invariant(self.frames.free_frames(&buffer[..*len]));
            *len = 0;
        }
    }

    fn finish(self) {
        self.free_held();
    }
}

impl<F: FrameSource> FrameSource for FrameBatch<'_, F> {
    fn alloc_frame(&self) -> Option<PhysFrame<Size4KiB>> {
        None
    }
    fn free_frame(&self, frame: PhysFrame<Size4KiB>) -> Result<(), Error> {
        self.push(frame);
        Ok(())
    }
    fn free_frames(&self, frames: &[PhysFrame<Size4KiB>]) -> Result<(), Error> {
        frames.iter().for_each(|&frame| self.push(frame));
        Ok(())
    }
}

/// The area bookkeeping, keeping the free ranges and the area map in step.
impl<F: FrameSource, M: PhysMemory + Copy> Inner<F, M> {
    /// Reserves a range for `record` (its span, guard page included) and records it.
    fn insert_area(&mut self, record: AreaRecord, align: u64) -> Result<VirtAddr, Error> {
        // A split of the free range and the area's own node: two at most.
        self.pool.reserve(2)?;
        let span = record.span();
        let start = self.space.alloc(&mut self.pool, span, align)?;
        if let Err(error) = self.areas.insert(&mut self.pool, start, span, record) {
            invariant(self.space.free(&mut self.pool, start, span));
            return Err(error);
        }
        Ok(start)
    }

    /// Forgets the area at `start` and frees its range.
    fn remove_area(&mut self, start: VirtAddr) {
        // The area's node goes back to the pool first, so freeing the range, which
        // needs at most one node, cannot fail.
        if let Some(area) = self.areas.remove(&mut self.pool, start) {
            invariant(self.space.free(&mut self.pool, start, area.size));
        }
    }

    fn area_containing(&self, addr: VirtAddr) -> Option<(VirtAddr, u64, AreaRecord)> {
        self.areas
            .find_containing(addr)
            .map(|area| (area.start, area.size, area.data))
    }

    fn record_mut(&mut self, start: VirtAddr) -> &mut AreaRecord {
        self.areas
            .data_mut(start)
            .expect("the area was looked up under the same lock")
    }

    fn try_extend(&mut self, start: VirtAddr, old_span: u64, new_span: u64) -> bool {
        if !self
            .space
            .try_extend(&mut self.pool, start, old_span, new_span)
        {
            return false;
        }
        invariant(self.areas.resize(start, new_span));
        true
    }

    fn shrink(&mut self, start: VirtAddr, old_span: u64, new_span: u64) -> Result<(), Error> {
        self.space
            .shrink(&mut self.pool, start, old_span, new_span)?;
        invariant(self.areas.resize(start, new_span));
        Ok(())
    }
}

impl<F, M, T> VmallocOps for Vmalloc<F, M, T>
where
    F: FrameSource + Clone + Send + Sync,
    M: PhysMemory + Copy + Send + Sync,
    T: TlbFlush + Sync,
{
    fn vmalloc_with(&self, size: usize, options: &VmOptions) -> Result<NonNull<u8>, Error> {
        Vmalloc::vmalloc_with(self, size, options)
    }
    fn vfree(&self, ptr: *mut u8) -> Result<(), Error> {
        Vmalloc::vfree(self, ptr)
    }
    fn vrealloc(&self, ptr: *mut u8, new_size: usize) -> Result<NonNull<u8>, Error> {
        Vmalloc::vrealloc(self, ptr, new_size)
    }
    fn reserve(&self, size: usize, options: &VmOptions) -> Result<NonNull<u8>, Error> {
        Vmalloc::reserve(self, size, options)
    }
    fn populate(&self, ptr: *mut u8, bytes: usize) -> Result<usize, Error> {
        Vmalloc::populate(self, ptr, bytes)
    }
}
