//! Physical memory mapped on demand through a recursive PML4 entry.

use crate::paging::KEPT;
use crate::{Error, PhysMemory};
use core::sync::atomic::{AtomicU64, Ordering};
use x86_64::structures::paging::{
    FrameAllocator, PageSize, PageTableFlags, PageTableIndex, PhysFrame, Size1GiB, Size2MiB,
    Size4KiB,
};
use x86_64::{PhysAddr, VirtAddr};

/// Entries in a table.
const ENTRIES: u64 = 512;
/// Most physical memory one PML4 slot can map.
const SLOT_SPAN: u64 = ENTRIES * Size1GiB::SIZE;

/// Physical memory for kernels that do not map all of it: a window of one PML4 slot
/// where physical address `p` is at `window + p`, filled 2 MiB at a time the first
/// time something there is asked for, and never torn down. The window's tables are
/// reached through a recursive PML4 entry (the `bootloader` crate's
/// `map-page-table-recursively`, `BootInfo::recursive_index`).
///
/// The tables above the 2 MiB entries (one PDPT, one PD per GiB up to `top`) are
/// made up front by [`new`](Self::new), so [`phys_to_virt`](PhysMemory::phys_to_virt)
/// never needs a frame and never fails: once a 2 MiB piece is mapped, a call reads
/// its entry and returns; the first call for a piece writes the entry (a
/// compare-and-swap: no lock an interrupt handler could find held).
/// Nothing needs flushing afterwards, as no CPU caches an entry that was not present.
/// A table `new` makes is zeroed through the recursive mapping right after it is
/// linked (with no direct map, that is the only way to reach its frame): until then
/// it holds whatever the frame held, which only a speculative walk of window
/// addresses, which nothing uses yet, could cache. A kernel that rules that out too
/// flushes its whole TLB, global entries included, after `new`.
///
/// # Why not a temporary window
///
/// [`PhysMemory`]'s contract gives every pointer for as long as the implementation
/// lives: the library keeps pointers to page tables, to its bitmaps and to its
/// bookkeeping slabs long after it asked for them. A mapping that is reused or torn
/// down (Linux's per-CPU `kmap_local`) would leave those pointing at another frame,
/// so there is none here: what is mapped stays mapped.
///
/// ```no_run
/// # use vmalloc::frame::{BitmapFrameAllocator, EarlyFrames};
/// # use vmalloc::phys::RecursivePhysMemory;
/// # use x86_64::structures::paging::PageTableIndex;
/// # fn init(boot_info: &'static bootloader_api::BootInfo) -> Result<(), vmalloc::Error> {
/// let recursive = boot_info.recursive_index.into_option().ok_or(vmalloc::Error::NotMapped)?;
/// let regions = vmalloc::boot::bootloader::regions(&boot_info.memory_regions);
/// // RAM, now or once reclaimed: reserved ranges (MMIO, maybe far above) need no window.
/// let top = regions
///     .clone()
///     .filter(|r| r.kind != vmalloc::frame::RegionKind::Reserved)
///     .map(|r| r.range.end.as_u64())
///     .max()
///     .unwrap_or(0);
/// let mut early = EarlyFrames::new(regions)?;
/// // SAFETY: the boot loader's recursive entry is in place; slot 300 is unused.
/// let phys = unsafe {
///     RecursivePhysMemory::new(PageTableIndex::new(recursive), PageTableIndex::new(300), top, &mut early)
/// }?;
/// // SAFETY: the usable regions are unused RAM, below `top`.
/// let frames = unsafe { BitmapFrameAllocator::from_memory(early.map(), &phys) }?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct RecursivePhysMemory {
    recursive: u64,
    window: u64,
    /// End of what the window reaches: a whole number of GiB.
    top: u64,
}

impl RecursivePhysMemory {
    /// A window in PML4 slot `window` for physical memory below `top`, its tables
    /// made from `tables` and reached through the recursive PML4 entry `recursive`.
    ///
    /// # Errors
    ///
    /// Nothing is written on any error:
    /// - [`Error::ZeroSize`] for `top == 0`;
    /// - [`Error::SizeTooLarge`] when `top` passes 512 GiB, what one slot maps;
    /// - [`Error::Overlap`] when `window` is `recursive`;
    /// - [`Error::AlreadyMapped`] when the window's PML4 entry is not zero;
    /// - [`Error::OutOfFrames`] when `tables` runs out; the frames it gave before are
    ///   not returned (a `FrameAllocator` cannot take them back; [`EarlyFrames`]
    ///   keeps them reserved).
    ///
    /// [`EarlyFrames`]: crate::frame::EarlyFrames
    ///
    /// # Safety
    ///
    /// The kernel vouches that:
    /// - PML4 entry `recursive` of the active page table (CR3) maps that table onto
    ///   itself, present and writable, and does so for as long as the value lives,
    ///   in every address space the kernel runs this library in (each maps its own
    ///   PML4 there);
    /// - slot `window` is the window's alone: nothing else maps there, no TLB holds
    ///   a translation from an earlier use of the slot or of its recursive
    ///   addresses, and every address space made later copies its PML4 entry;
    /// - all RAM the library will reach (every frame the frame allocator may hand
    ///   out or reclaim, every page table) lies below `top`;
    /// - `tables` hands out unused frames.
    pub unsafe fn new(
        recursive: PageTableIndex,
        window: PageTableIndex,
        top: u64,
        tables: &mut impl FrameAllocator<Size4KiB>,
    ) -> Result<Self, Error> {
        if top == 0 {
            return Err(Error::ZeroSize);
        }
        if top > SLOT_SPAN {
            return Err(Error::SizeTooLarge);
        }
        if recursive == window {
            return Err(Error::Overlap);
        }
        let this = Self {
            recursive: u64::from(recursive),
            window: u64::from(window),
            top: top.div_ceil(Size1GiB::SIZE) * Size1GiB::SIZE,
        };
        let pml4_entry = this
            .table(&[this.recursive; 3])
            .wrapping_add(this.window as usize);
        // SAFETY: the recursive entry maps the PML4 at that address (the caller).
        if unsafe { entry(pml4_entry) }.load(Ordering::Acquire) != 0 {
            return Err(Error::AlreadyMapped);
        }
        // Every frame first, so that running out changes no table.
        let gibs = (this.top / Size1GiB::SIZE) as usize;
        let mut frames = [None::<PhysFrame>; ENTRIES as usize + 1];
        for slot in &mut frames[..=gibs] {
            *slot = Some(tables.allocate_frame().ok_or(Error::OutOfFrames)?);
        }
        // KEPT: no clean-up frees a window table while it is empty.
        let table_flags = PageTableFlags::PRESENT | PageTableFlags::WRITABLE | KEPT;
        let link = |entry: *mut u64, frame: PhysFrame, table: *mut u64| {
            let value = frame.start_address().as_u64() | table_flags.bits();
            // SAFETY: `entry` is a zero entry of a table reached through the
            // recursive mapping; once it is written, `table` (the recursive address
            // of the entry's table, never mapped before: no TLB holds it) reaches
            // the fresh frame, which is zeroed before anything below is linked.
            unsafe {
                self::entry(entry).store(value, Ordering::Release);
                table.write_bytes(0, ENTRIES as usize);
            }
        };
        let mut frames = frames.into_iter().flatten();
        let pdpt = this.table(&[this.recursive, this.recursive, this.window]);
        link(pml4_entry, frames.next().ok_or(Error::OutOfFrames)?, pdpt);
        for (gib, frame) in frames.enumerate() {
            let pd = this.table(&[this.recursive, this.window, gib as u64]);
            link(pdpt.wrapping_add(gib), frame, pd);
        }
        Ok(this)
    }

    /// Where physical address 0 is in the window.
    pub fn window(&self) -> VirtAddr {
        VirtAddr::new_truncate(self.window << 39)
    }

    /// The end of the physical memory the window reaches (`top` rounded up to a GiB).
    pub fn top(&self) -> PhysAddr {
        PhysAddr::new_truncate(self.top)
    }

    /// The table that the recursive mapping reaches with indexes `path` below the
    /// recursive slot, as entries.
    fn table(&self, path: &[u64; 3]) -> *mut u64 {
        let [a, b, c] = *path;
        let addr = self.recursive << 39 | a << 30 | b << 21 | c << 12;
        VirtAddr::new_truncate(addr).as_mut_ptr()
    }
}

/// The entry at `entry` as an atomic: CPUs map pieces of the window concurrently.
///
/// # Safety
///
/// `entry` is an 8-aligned entry of a page table reachable at that address.
unsafe fn entry<'a>(entry: *mut u64) -> &'a AtomicU64 {
    // SAFETY: per the caller; `AtomicU64` has the layout of `u64`.
    unsafe { AtomicU64::from_ptr(entry) }
}

/// An address no access reaches: bit 63 set, bits 47 to 62 clear.
const NON_CANONICAL: u64 = 1 << 63;

// SAFETY: every address below `top` is reached at `window + p`, one mapping of the
// physical address space, so frames never alias and a frame's start is 4 KiB-aligned;
// its 2 MiB piece is mapped (writable) before the pointer is returned and never
// unmapped, and the window's tables exist for as long as the value (`new`'s
// contract keeps the recursive entry and the slot).
unsafe impl PhysMemory for RecursivePhysMemory {
    fn phys_to_virt(&self, phys: PhysAddr) -> *mut u8 {
        let addr = phys.as_u64();
        if addr >= self.top {
            // Outside the contract: a non-canonical address, which faults however
            // it is offset within its page.
            return (NON_CANONICAL | (addr % crate::PAGE_SIZE)) as *mut u8;
        }
        let virt = (self.window() + addr).as_mut_ptr();
        let pd = self.table(&[self.recursive, self.window, addr / Size1GiB::SIZE]);
        let slot = pd.wrapping_add((addr / Size2MiB::SIZE % ENTRIES) as usize);
        // SAFETY: `new` made every PD below `top`; the recursive mapping reaches it.
        let slot = unsafe { entry(slot) };
        if slot.load(Ordering::Acquire) == 0 {
            // Data, never code: the window makes all of RAM writable, so none of it
            // may be executable through it (as Linux's direct map).
            let flags = PageTableFlags::PRESENT
                | PageTableFlags::WRITABLE
                | PageTableFlags::HUGE_PAGE
                | PageTableFlags::GLOBAL
                | PageTableFlags::NO_EXECUTE;
            let base = addr & !(Size2MiB::SIZE - 1);
            // Racing writers write the same entry, so the first wins and the others
            // find it there; no lock, which an interrupt handler reaching this from
            // the code it interrupted would spin on forever.
            let _ =
                slot.compare_exchange(0, base | flags.bits(), Ordering::AcqRel, Ordering::Acquire);
        }
        virt
    }
}
