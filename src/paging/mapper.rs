//! The `x86_64` crate's mapper traits over [`PageTables`]: [`PageTableMapper`].

use super::ADDR_MASK;
use super::PageTables;
use super::cursor::{entry_at, read, table_at};
use crate::PAGE_SIZE;
use crate::PhysMemory;
use core::sync::atomic::{Ordering, compiler_fence};
use x86_64::structures::paging::mapper::{
    CleanUp, FlagUpdateError, MapToError, MappedFrame, Mapper, MapperFlush, MapperFlushAll,
    TranslateError, TranslateResult, UnmapError,
};
use x86_64::structures::paging::page::PageRangeInclusive;
use x86_64::structures::paging::page_table::PageTableEntry;
use x86_64::structures::paging::{
    FrameAllocator, FrameDeallocator, Page, PageSize, PageTable, PageTableFlags, PhysFrame,
    Size1GiB, Size2MiB, Size4KiB, Translate,
};
use x86_64::{PhysAddr, VirtAddr};

/// [`PageTables`] as the `x86_64` crate's `Mapper<Size4KiB>`, `Mapper<Size2MiB>`,
/// `Mapper<Size1GiB>`, `Translate` and `CleanUp`, for code written against
/// `OffsetPageTable`.
///
/// The traits mean what the `x86_64` crate (0.15) makes them mean, flush tokens and
/// error enums included, so such code compiles unchanged and writes the same
/// entries `OffsetPageTable` writes; and [`tables_mut`](PageTableMapper::tables_mut)
/// gives the same tables to this crate's range calls. Because it reaches tables
/// through any [`PhysMemory`], the traits also work where no offset map exists
/// ([`RecursivePhysMemory`](crate::phys::RecursivePhysMemory)).
///
/// # Where it departs from `OffsetPageTable`
///
/// Only where `OffsetPageTable` panics or breaks an entry on its way to an error;
/// everything else, error paths included, leaves the tables as it leaves them:
///
/// - a `HUGE_PAGE` bit in `flags` of a 4 KiB page is written (it is the PAT bit
///   there); `OffsetPageTable` panics;
/// - `parent_table_flags` with `HUGE_PAGE`: [`MapToError::ParentEntryHugePage`],
///   nothing changed, as no table below it could be walked; `OffsetPageTable` ORs
///   it into the entries in the way first (the top-level one at least, which then
///   reads as a huge page) or panics;
/// - `parent_table_flags` without `PRESENT` where a table must be made:
///   [`MapToError::ParentEntryHugePage`]; `OffsetPageTable` panics;
/// - `parent_table_flags` with [`CREATED`](super::CREATED) (`BIT_10`),
///   [`KEPT`](super::KEPT) (`BIT_11`) or [`MANAGED`](super::MANAGED) (`BIT_52`):
///   the bits are left out, so the tables stay the caller's (below) and its clean-up
///   frees them; `set_flags_p4_entry` (and `p3`, `p2`) keep an entry's own `BIT_10`,
///   `BIT_11` and `BIT_52` whatever `flags` say;
/// - an upper entry in the way that is a huge page (a detached 2 MiB mapping of
///   this crate's included: not present, [`DETACHED`](super::DETACHED), `HUGE_PAGE`
///   kept), or is not present and stays so under `parent_table_flags`:
///   [`MapToError::ParentEntryHugePage`] with the entry left alone;
///   `OffsetPageTable` first ORs `parent_table_flags` into it (making a read-only
///   huge page writable, or a detached one present) or panics. A not-present table
///   entry that `parent_table_flags` makes present again is walked, as
///   `OffsetPageTable` walks it, whatever its software bits;
/// - `Translate::translate` of an address whose PML4 entry has `HUGE_PAGE` (a
///   reserved bit there) is [`TranslateResult::InvalidFrameAddress`];
///   `OffsetPageTable` panics;
/// - `CleanUp` leaves the tables this crate's range calls made (marked
///   [`CREATED`](super::CREATED), from their `FrameSource`), for
///   [`free_empty_tables`](PageTables::free_empty_tables) to give back where they
///   came from; `OffsetPageTable` hands them to the caller's deallocator.
///
/// Tables it makes are the caller's (from the `FrameAllocator`), as with
/// `OffsetPageTable`: they do not carry [`CREATED`](super::CREATED), so this crate
/// never frees them.
///
/// ```
/// use vmalloc::frame::MapperFrames;
/// use vmalloc::paging::{PageTableMapper, PageTables};
/// use vmalloc_sim::{SimConfig, SimMachine};
/// use x86_64::structures::paging::{Mapper, Page, PageTableFlags, PhysFrame, Size4KiB, Translate};
/// use x86_64::{PhysAddr, VirtAddr};
///
/// let machine = SimMachine::new(SimConfig::new(64 << 20));
/// let frames = machine.frames();
/// // SAFETY: the machine's tables are this mapper's alone.
/// let mut mapper = PageTableMapper::new(unsafe { PageTables::new(machine.root(), machine.phys()) });
/// let page = Page::<Size4KiB>::containing_address(VirtAddr::new(0xffff_c900_0000_0000));
/// let frame = PhysFrame::containing_address(PhysAddr::new(0x80_0000));
/// let flags = PageTableFlags::PRESENT | PageTableFlags::WRITABLE;
/// // SAFETY: the page and the frame are unused; nothing was mapped there before.
/// let flush = unsafe { mapper.map_to(page, frame, flags, &mut MapperFrames(&frames)) }.unwrap();
/// flush.ignore(); // a page that was not present was cached nowhere
/// assert_eq!(mapper.translate_addr(page.start_address() + 8u64), Some(PhysAddr::new(0x80_0008)));
/// ```
#[derive(Debug)]
pub struct PageTableMapper<M: PhysMemory> {
    tables: PageTables<M>,
}

impl<M: PhysMemory> PageTableMapper<M> {
    /// The mapper over `tables`.
    pub fn new(tables: PageTables<M>) -> Self {
        Self { tables }
    }

    /// The tables, for this crate's calls that read them.
    pub fn tables(&self) -> &PageTables<M> {
        &self.tables
    }

    /// The tables, for this crate's range calls.
    pub fn tables_mut(&mut self) -> &mut PageTables<M> {
        &mut self.tables
    }

    /// Gives back the tables.
    pub fn into_inner(self) -> PageTables<M> {
        self.tables
    }

    /// The root table.
    fn root(&self) -> *mut PageTable {
        table_at(&self.tables.phys, self.tables.root.start_address())
    }

    /// Entry `index` of the table below the upper entry `entry`, as `x86_64`'s
    /// `next_table` finds it: not present is [`Step::NotMapped`], `HUGE_PAGE` is
    /// [`Step::Huge`].
    ///
    /// # Safety
    ///
    /// `entry` lies in a table reachable through `phys` (`PageTables::new`'s
    /// contract).
    unsafe fn below(&self, entry: *mut PageTableEntry, index: usize) -> Step {
        // SAFETY: per the caller.
        let raw = unsafe { read(entry) };
        let flags = PageTableFlags::from_bits_retain(raw);
        if !flags.contains(PageTableFlags::PRESENT) {
            Step::NotMapped
        } else if flags.contains(PageTableFlags::HUGE_PAGE) {
            Step::Huge
        } else {
            // SAFETY: as above; a present entry without `HUGE_PAGE` holds a table.
            let table = table_at(&self.tables.phys, unsafe { (*entry).addr() });
            Step::Entry(entry_at(table, index))
        }
    }

    /// The entry of `addr` at `level` (4 = PML4 ... 1 = PT), walking down as
    /// `x86_64`'s `next_table` does.
    fn walk(&self, addr: VirtAddr, level: usize) -> Result<*mut PageTableEntry, Step> {
        let mut entry = entry_at(self.root(), addr.p4_index().into());
        for index in indexes(addr).into_iter().take(4 - level) {
            // SAFETY: `entry` lies in a table below the root (`PageTables::new`).
            match unsafe { self.below(entry, index) } {
                Step::Entry(next) => entry = next,
                other => return Err(other),
            }
        }
        Ok(entry)
    }

    /// The entry of `addr` at `level` (3 = PDPT ... 1 = PT), making the tables above
    /// it as `x86_64`'s `create_next_table` does, with `parent_flags`.
    ///
    /// # Safety
    ///
    /// `allocator` hands out unused frames, reachable through `phys`.
    unsafe fn create<A>(
        &mut self,
        addr: VirtAddr,
        level: usize,
        parent_flags: PageTableFlags,
        allocator: &mut A,
    ) -> Result<*mut PageTableEntry, Create>
    where
        A: FrameAllocator<Size4KiB> + ?Sized,
    {
        // No walkable table has `HUGE_PAGE` above it: refused before any entry
        // changes. `CREATED` would hand the caller's tables to this crate to free,
        // `KEPT` keep them from the caller's own clean-up.
        if parent_flags.contains(PageTableFlags::HUGE_PAGE) {
            return Err(Create::Huge);
        }
        let parent_flags = parent_flags - OWN_MARKS;
        let mut entry = entry_at(self.root(), addr.p4_index().into());
        for index in indexes(addr).into_iter().take(4 - level) {
            // SAFETY: `entry` lies in a reachable table; the caller vouches for the
            // allocator.
            let table = unsafe { self.next_table(entry, parent_flags, allocator) }?;
            entry = entry_at(table, index);
        }
        Ok(entry)
    }

    /// The table below the upper entry `entry`, made from `allocator` if the entry
    /// is zero; `insert` is OR-ed into an existing entry.
    ///
    /// # Safety
    ///
    /// As [`create`](Self::create), and `entry` lies in a reachable table.
    unsafe fn next_table<A>(
        &mut self,
        entry: *mut PageTableEntry,
        insert: PageTableFlags,
        allocator: &mut A,
    ) -> Result<*mut PageTable, Create>
    where
        A: FrameAllocator<Size4KiB> + ?Sized,
    {
        // SAFETY: per the caller.
        let raw = unsafe { read(entry) };
        if raw == 0 {
            let walkable = insert.contains(PageTableFlags::PRESENT)
                && !insert.contains(PageTableFlags::HUGE_PAGE);
            if !walkable {
                return Err(Create::Huge);
            }
            let frame = allocator.allocate_frame().ok_or(Create::NoFrame)?;
            let table = table_at(&self.tables.phys, frame.start_address());
            // SAFETY: a fresh frame from the allocator, reachable through `phys`,
            // linked nowhere yet.
            unsafe { table.write(PageTable::new()) };
            // The table is zero before the entry that publishes it is written.
            compiler_fence(Ordering::Release);
            // SAFETY: per the caller; nothing else borrows the entry.
            unsafe { (*entry).set_frame(frame, insert) };
            return Ok(table);
        }
        let flags = PageTableFlags::from_bits_retain(raw);
        // A huge page (a detached 2 MiB mapping of this crate's keeps `HUGE_PAGE`),
        // or a not-present entry that `insert` does not make present, is no table
        // to walk.
        let present =
            flags.contains(PageTableFlags::PRESENT) || insert.contains(PageTableFlags::PRESENT);
        if flags.contains(PageTableFlags::HUGE_PAGE) || !present {
            return Err(Create::Huge);
        }
        if !insert.is_empty() && !flags.contains(insert) {
            // SAFETY: as above.
            unsafe { (*entry).set_flags(flags | insert) };
        }
        // SAFETY: as above.
        Ok(table_at(&self.tables.phys, unsafe { (*entry).addr() }))
    }

    /// Sets the flags of the upper entry of `addr` at `level` (4 = PML4 ... 2 = PD).
    ///
    /// # Safety
    ///
    /// As `Mapper::set_flags_p4_entry`.
    unsafe fn set_upper_flags(
        &mut self,
        addr: VirtAddr,
        level: usize,
        flags: PageTableFlags,
    ) -> Result<MapperFlushAll, FlagUpdateError> {
        let entry = self.walk(addr, level).map_err(Step::flag_error)?;
        // SAFETY: a reachable entry; nothing else borrows it.
        unsafe {
            let raw = read(entry);
            if raw == 0 {
                return Err(FlagUpdateError::PageNotMapped);
            }
            // The marks of whose table it is stay as they are.
            let own = PageTableFlags::from_bits_retain(raw) & OWN_MARKS;
            (*entry).set_flags((flags - OWN_MARKS) | own);
        }
        Ok(MapperFlushAll::new())
    }
}

/// The software bits that say whose an upper entry's table is ([`CREATED`]: this
/// crate's; [`KEPT`]: kept while empty): never taken from the caller's flags.
///
/// [`CREATED`]: super::CREATED
/// [`KEPT`]: super::KEPT
const OWN_MARKS: PageTableFlags = super::CREATED.union(super::KEPT).union(super::MANAGED);

/// The PDPT, PD and PT indexes of `addr`.
fn indexes(addr: VirtAddr) -> [usize; 3] {
    [addr.p3_index(), addr.p2_index(), addr.p1_index()].map(usize::from)
}

impl<M: PhysMemory> From<PageTables<M>> for PageTableMapper<M> {
    fn from(tables: PageTables<M>) -> Self {
        Self::new(tables)
    }
}

/// Where a walk down stopped.
enum Step {
    /// The entry at the next level.
    Entry(*mut PageTableEntry),
    /// An upper entry without `PRESENT`.
    NotMapped,
    /// An upper entry with `HUGE_PAGE`.
    Huge,
}

impl Step {
    fn unmap_error(self) -> UnmapError {
        match self {
            Step::Huge => UnmapError::ParentEntryHugePage,
            _ => UnmapError::PageNotMapped,
        }
    }

    fn flag_error(self) -> FlagUpdateError {
        match self {
            Step::Huge => FlagUpdateError::ParentEntryHugePage,
            _ => FlagUpdateError::PageNotMapped,
        }
    }

    fn translate_error(self) -> TranslateError {
        match self {
            Step::Huge => TranslateError::ParentEntryHugePage,
            _ => TranslateError::PageNotMapped,
        }
    }
}

/// Why a table could not be had on the way down.
enum Create {
    /// A huge page or an entry that is no table is in the way, or the table to be
    /// made could not be walked.
    Huge,
    /// The allocator ran out.
    NoFrame,
}

impl<S: PageSize> From<Create> for MapToError<S> {
    fn from(error: Create) -> Self {
        match error {
            Create::Huge => MapToError::ParentEntryHugePage,
            Create::NoFrame => MapToError::FrameAllocationFailed,
        }
    }
}

impl<M: PhysMemory> Mapper<Size4KiB> for PageTableMapper<M> {
    unsafe fn map_to_with_table_flags<A>(
        &mut self,
        page: Page<Size4KiB>,
        frame: PhysFrame<Size4KiB>,
        flags: PageTableFlags,
        parent_table_flags: PageTableFlags,
        frame_allocator: &mut A,
    ) -> Result<MapperFlush<Size4KiB>, MapToError<Size4KiB>>
    where
        Self: Sized,
        A: FrameAllocator<Size4KiB> + ?Sized,
    {
        let addr = page.start_address();
        // SAFETY: the caller vouches for the allocator (the trait's contract).
        let entry = unsafe { self.create(addr, 1, parent_table_flags, frame_allocator) }?;
        // SAFETY: a reachable PT entry; nothing else borrows it.
        unsafe {
            if read(entry) != 0 {
                return Err(MapToError::PageAlreadyMapped(frame));
            }
            (*entry).set_addr(frame.start_address(), flags);
        }
        Ok(MapperFlush::new(page))
    }

    fn unmap(
        &mut self,
        page: Page<Size4KiB>,
    ) -> Result<(PhysFrame<Size4KiB>, MapperFlush<Size4KiB>), UnmapError> {
        let entry = self
            .walk(page.start_address(), 1)
            .map_err(Step::unmap_error)?;
        // SAFETY: a reachable PT entry; nothing else borrows it.
        let entry = unsafe { &mut *entry };
        let flags = entry.flags();
        if !flags.contains(PageTableFlags::PRESENT) {
            return Err(UnmapError::PageNotMapped);
        }
        if flags.contains(PageTableFlags::HUGE_PAGE) {
            return Err(UnmapError::ParentEntryHugePage); // as `x86_64` reads the PAT bit
        }
        let frame = PhysFrame::containing_address(entry.addr());
        entry.set_unused();
        Ok((frame, MapperFlush::new(page)))
    }

    unsafe fn update_flags(
        &mut self,
        page: Page<Size4KiB>,
        flags: PageTableFlags,
    ) -> Result<MapperFlush<Size4KiB>, FlagUpdateError> {
        let entry = self
            .walk(page.start_address(), 1)
            .map_err(Step::flag_error)?;
        // SAFETY: a reachable PT entry; nothing else borrows it.
        unsafe {
            let raw = read(entry);
            if raw == 0 {
                return Err(FlagUpdateError::PageNotMapped);
            }
            // A leaf's software bits are the caller's: written as they come (the
            // marks of whose table it is live in upper entries).
            (*entry).set_flags(flags);
        }
        Ok(MapperFlush::new(page))
    }

    unsafe fn set_flags_p4_entry(
        &mut self,
        page: Page<Size4KiB>,
        flags: PageTableFlags,
    ) -> Result<MapperFlushAll, FlagUpdateError> {
        // SAFETY: the trait's contract.
        unsafe { self.set_upper_flags(page.start_address(), 4, flags) }
    }

    unsafe fn set_flags_p3_entry(
        &mut self,
        page: Page<Size4KiB>,
        flags: PageTableFlags,
    ) -> Result<MapperFlushAll, FlagUpdateError> {
        // SAFETY: the trait's contract.
        unsafe { self.set_upper_flags(page.start_address(), 3, flags) }
    }

    unsafe fn set_flags_p2_entry(
        &mut self,
        page: Page<Size4KiB>,
        flags: PageTableFlags,
    ) -> Result<MapperFlushAll, FlagUpdateError> {
        // SAFETY: the trait's contract.
        unsafe { self.set_upper_flags(page.start_address(), 2, flags) }
    }

    fn translate_page(&self, page: Page<Size4KiB>) -> Result<PhysFrame<Size4KiB>, TranslateError> {
        let entry = self
            .walk(page.start_address(), 1)
            .map_err(Step::translate_error)?;
        // SAFETY: a reachable PT entry.
        let raw = unsafe { read(entry) };
        if raw == 0 {
            return Err(TranslateError::PageNotMapped);
        }
        // SAFETY: as above.
        Ok(PhysFrame::containing_address(unsafe { (*entry).addr() }))
    }
}

/// The level of a huge page's entry: 2 (PD) for 2 MiB, 3 (PDPT) for 1 GiB.
const fn huge_level<S: PageSize>() -> usize {
    if S::SIZE == Size1GiB::SIZE { 3 } else { 2 }
}

/// 2 MiB and 1 GiB pages: one entry with `HUGE_PAGE` at [`huge_level`], as the
/// `x86_64` crate's `Mapper` impls for both sizes write it.
impl<M: PhysMemory> PageTableMapper<M> {
    /// # Safety
    ///
    /// As `Mapper::map_to_with_table_flags`.
    unsafe fn map_huge<S: PageSize, A>(
        &mut self,
        page: Page<S>,
        frame: PhysFrame<S>,
        flags: PageTableFlags,
        parent_table_flags: PageTableFlags,
        frame_allocator: &mut A,
    ) -> Result<MapperFlush<S>, MapToError<S>>
    where
        A: FrameAllocator<Size4KiB> + ?Sized,
    {
        let addr = page.start_address();
        // SAFETY: the caller vouches for the allocator (the trait's contract).
        let entry =
            unsafe { self.create(addr, huge_level::<S>(), parent_table_flags, frame_allocator) }?;
        // SAFETY: a reachable entry at the page's level; nothing else borrows it.
        unsafe {
            if read(entry) != 0 {
                return Err(MapToError::PageAlreadyMapped(frame));
            }
            (*entry).set_addr(frame.start_address(), flags | PageTableFlags::HUGE_PAGE);
        }
        Ok(MapperFlush::new(page))
    }

    fn unmap_huge<S: PageSize>(
        &mut self,
        page: Page<S>,
    ) -> Result<(PhysFrame<S>, MapperFlush<S>), UnmapError> {
        let entry = self
            .walk(page.start_address(), huge_level::<S>())
            .map_err(Step::unmap_error)?;
        // SAFETY: a reachable entry at the page's level; nothing else borrows it.
        let entry = unsafe { &mut *entry };
        let flags = entry.flags();
        if !flags.contains(PageTableFlags::PRESENT) {
            return Err(UnmapError::PageNotMapped);
        }
        if !flags.contains(PageTableFlags::HUGE_PAGE) {
            return Err(UnmapError::ParentEntryHugePage); // `x86_64`'s error for a table here
        }
        let frame = PhysFrame::from_start_address(entry.addr())
            .map_err(|_| UnmapError::InvalidFrameAddress(entry.addr()))?;
        entry.set_unused();
        Ok((frame, MapperFlush::new(page)))
    }

    /// # Safety
    ///
    /// As `Mapper::update_flags`.
    unsafe fn update_huge<S: PageSize>(
        &mut self,
        page: Page<S>,
        flags: PageTableFlags,
    ) -> Result<MapperFlush<S>, FlagUpdateError> {
        let entry = self
            .walk(page.start_address(), huge_level::<S>())
            .map_err(Step::flag_error)?;
        // SAFETY: a reachable entry at the page's level; nothing else borrows it.
        unsafe {
            if read(entry) == 0 {
                return Err(FlagUpdateError::PageNotMapped);
            }
            (*entry).set_flags(flags | PageTableFlags::HUGE_PAGE);
        }
        Ok(MapperFlush::new(page))
    }

    fn translate_huge<S: PageSize>(&self, page: Page<S>) -> Result<PhysFrame<S>, TranslateError> {
        let entry = self
            .walk(page.start_address(), huge_level::<S>())
            .map_err(Step::translate_error)?;
        // SAFETY: a reachable entry at the page's level.
        let (raw, addr) = unsafe { (read(entry), (*entry).addr()) };
        if raw == 0 {
            return Err(TranslateError::PageNotMapped);
        }
        PhysFrame::from_start_address(addr).map_err(|_| TranslateError::InvalidFrameAddress(addr))
    }
}

/// Writes one `Mapper` impl for a huge page size; `$p3` and `$p2` say which of
/// `set_flags_p3_entry` and `set_flags_p2_entry` reach a table (the entry at the
/// page's own level is the page: `ParentEntryHugePage`).
macro_rules! huge_mapper {
    ($size:ty, p3: $p3:expr) => {
        impl<M: PhysMemory> Mapper<$size> for PageTableMapper<M> {
            unsafe fn map_to_with_table_flags<A>(
                &mut self,
                page: Page<$size>,
                frame: PhysFrame<$size>,
                flags: PageTableFlags,
                parent_table_flags: PageTableFlags,
                frame_allocator: &mut A,
            ) -> Result<MapperFlush<$size>, MapToError<$size>>
            where
                Self: Sized,
                A: FrameAllocator<Size4KiB> + ?Sized,
            {
                // SAFETY: the trait's contract.
                unsafe { self.map_huge(page, frame, flags, parent_table_flags, frame_allocator) }
            }

            fn unmap(
                &mut self,
                page: Page<$size>,
            ) -> Result<(PhysFrame<$size>, MapperFlush<$size>), UnmapError> {
                self.unmap_huge(page)
            }

            unsafe fn update_flags(
                &mut self,
                page: Page<$size>,
                flags: PageTableFlags,
            ) -> Result<MapperFlush<$size>, FlagUpdateError> {
                // SAFETY: the trait's contract.
                unsafe { self.update_huge(page, flags) }
            }

            unsafe fn set_flags_p4_entry(
                &mut self,
                page: Page<$size>,
                flags: PageTableFlags,
            ) -> Result<MapperFlushAll, FlagUpdateError> {
                // SAFETY: the trait's contract.
                unsafe { self.set_upper_flags(page.start_address(), 4, flags) }
            }

            unsafe fn set_flags_p3_entry(
                &mut self,
                page: Page<$size>,
                flags: PageTableFlags,
            ) -> Result<MapperFlushAll, FlagUpdateError> {
                if !$p3 {
                    return Err(FlagUpdateError::ParentEntryHugePage); // the page itself
                }
                // SAFETY: the trait's contract.
                unsafe { self.set_upper_flags(page.start_address(), 3, flags) }
            }

            unsafe fn set_flags_p2_entry(
                &mut self,
                _page: Page<$size>,
                _flags: PageTableFlags,
            ) -> Result<MapperFlushAll, FlagUpdateError> {
                Err(FlagUpdateError::ParentEntryHugePage) // the page, or below it
            }

            fn translate_page(
                &self,
                page: Page<$size>,
            ) -> Result<PhysFrame<$size>, TranslateError> {
                self.translate_huge(page)
            }
        }
    };
}

huge_mapper!(Size2MiB, p3: true);
huge_mapper!(Size1GiB, p3: false);

impl<M: PhysMemory> CleanUp for PageTableMapper<M> {
    /// Frees every empty page table below the root, as
    /// [`clean_up_addr_range`](CleanUp::clean_up_addr_range) over the whole address
    /// space.
    ///
    /// # Safety
    ///
    /// As [`clean_up_addr_range`](CleanUp::clean_up_addr_range).
    unsafe fn clean_up<D>(&mut self, frame_deallocator: &mut D)
    where
        D: FrameDeallocator<Size4KiB>,
    {
        let first = Page::containing_address(VirtAddr::zero());
        let last = Page::containing_address(VirtAddr::new_truncate(u64::MAX));
        // SAFETY: the caller's promise, for the whole address space.
        unsafe { self.clean_up_addr_range(Page::range_inclusive(first, last), frame_deallocator) }
    }

    /// Frees the page tables below the root that serve only `range` and hold no
    /// entry (once their own empty tables are gone), giving each frame to
    /// `frame_deallocator`, as `OffsetPageTable` does; the root stays. Tables marked
    /// [`CREATED`](super::CREATED) are this crate's (its range calls made them from
    /// their `FrameSource`): they stay (as those marked [`KEPT`](super::KEPT) do, and a
    /// vmalloc manager's top-level tables, marked [`MANAGED`](super::MANAGED), which
    /// also serve its region), for
    /// [`free_empty_tables`](PageTables::free_empty_tables) to give back where they
    /// came from, and the caller's tables below them are freed as any other. Flush
    /// the whole TLB afterwards: its paging-structure caches may
    /// still point to the freed tables.
    ///
    /// # Safety
    ///
    /// As the `x86_64` crate asks: each table frame is used once, in these tables
    /// alone, and comes from the allocator `frame_deallocator` gives it back to; and
    /// nothing keeps an empty table for later (a [`Vmalloc`](crate::Vmalloc) over
    /// these tables keeps its per-CPU blocks' tables while they are empty). A table
    /// whose entry carries [`KEPT`](super::KEPT) (a
    /// [`RecursivePhysMemory`](crate::phys::RecursivePhysMemory) window's) stays,
    /// as a [`CREATED`](super::CREATED) one does (empty tables below it are freed as
    /// any other), and a recursive entry is not followed.
    unsafe fn clean_up_addr_range<D>(
        &mut self,
        range: PageRangeInclusive,
        frame_deallocator: &mut D,
    ) where
        D: FrameDeallocator<Size4KiB>,
    {
        if range.is_empty() {
            return;
        }
        let span = (
            range.start.start_address().as_u64(),
            range.end.start_address().as_u64(),
        );
        let root = self.tables.root.start_address();
        // SAFETY: the root is a valid table (`PageTables::new`); the caller's promise.
        unsafe { self.clean_table(root, 4, 0, span, frame_deallocator) };
    }
}

impl<M: PhysMemory> PageTableMapper<M> {
    /// Frees the empty tables below the table at `at` (at `level`, 4 = PML4; its
    /// first entry maps from `base`) that serve only pages in `first..=last`; whether
    /// the table holds no entry afterwards. The recursion is at most three deep: an
    /// entry that maps its own table (a recursive entry) is no table below it, and
    /// is left alone, as `x86_64`'s `RecursivePageTable` leaves it.
    ///
    /// # Safety
    ///
    /// The table is reachable through `phys`; as `CleanUp::clean_up_addr_range`.
    unsafe fn clean_table<D>(
        &self,
        at: PhysAddr,
        level: usize,
        base: u64,
        (first, last): (u64, u64),
        frame_deallocator: &mut D,
    ) -> bool
    where
        D: FrameDeallocator<Size4KiB>,
    {
        let table = table_at(&self.tables.phys, at);
        if level > 1 {
            let shift = 12 + 9 * (level - 1);
            let index = |addr: u64| (addr >> shift) as usize & 511;
            for i in index(first)..=index(last) {
                let entry = entry_at(table, i);
                // SAFETY: an entry of a reachable table.
                let raw = unsafe { read(entry) };
                let flags = PageTableFlags::from_bits_retain(raw);
                // Below this crate's tables too: the caller's tables there are the
                // caller's to free.
                let below = PhysAddr::new(raw & ADDR_MASK);
                let walkable = flags.contains(PageTableFlags::PRESENT)
                    && !flags.contains(PageTableFlags::HUGE_PAGE)
                    && below != at;
                if !walkable {
                    continue;
                }
                // Canonical: the top level's upper half is sign-extended.
                let start = VirtAddr::new_truncate(base + ((i as u64) << shift)).as_u64();
                let end = start + ((1 << shift) - PAGE_SIZE);
                let part = (first.max(start), last.min(end));
                // SAFETY: a present table entry holds a reachable table.
                let empty =
                    unsafe { self.clean_table(below, level - 1, start, part, frame_deallocator) };
                // A vmalloc manager's top-level table (MANAGED) serves its region too.
                let kept = flags.intersects(super::CREATED | super::KEPT | super::MANAGED);
                if empty && !kept {
                    let frame = PhysFrame::containing_address(below);
                    // SAFETY: an entry of a reachable table; nothing borrows it. The
                    // table below it is empty and serves no other address (caller).
                    unsafe {
                        (*entry).set_unused();
                        frame_deallocator.deallocate_frame(frame);
                    }
                }
            }
        }
        // SAFETY: a reachable table.
        (0..512).all(|i| unsafe { read(entry_at(table, i)) } == 0)
    }
}

impl<M: PhysMemory> Translate for PageTableMapper<M> {
    fn translate(&self, addr: VirtAddr) -> TranslateResult {
        let mut entry = entry_at(self.root(), addr.p4_index().into());
        for (depth, index) in indexes(addr).into_iter().enumerate() {
            // SAFETY: `entry` lies in a table below the root (`PageTables::new`).
            match unsafe { self.below(entry, index) } {
                Step::Entry(next) => entry = next,
                Step::NotMapped => return TranslateResult::NotMapped,
                Step::Huge => {
                    // SAFETY: as above.
                    let (addr_bits, flags) = unsafe { ((*entry).addr(), (*entry).flags()) };
                    let (frame, offset) = match depth {
                        // `HUGE_PAGE` is reserved in a PML4 entry.
                        0 => return TranslateResult::InvalidFrameAddress(addr_bits),
                        1 => (
                            MappedFrame::Size1GiB(PhysFrame::containing_address(addr_bits)),
                            addr.as_u64() & (Size1GiB::SIZE - 1),
                        ),
                        _ => (
                            MappedFrame::Size2MiB(PhysFrame::containing_address(addr_bits)),
                            addr.as_u64() & (Size2MiB::SIZE - 1),
                        ),
                    };
                    return TranslateResult::Mapped {
                        frame,
                        offset,
                        flags,
                    };
                }
            }
        }
        // SAFETY: a reachable PT entry.
        let (raw, addr_bits, flags) = unsafe { (read(entry), (*entry).addr(), (*entry).flags()) };
        if raw == 0 {
            return TranslateResult::NotMapped;
        }
        TranslateResult::Mapped {
            frame: MappedFrame::Size4KiB(PhysFrame::containing_address(addr_bits)),
            offset: u64::from(addr.page_offset()),
            flags,
        }
    }
}
