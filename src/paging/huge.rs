//! 2 MiB mappings: one PD entry instead of a page table.

use super::*;
use x86_64::structures::paging::page_table::PageTableEntry;

impl<M: PhysMemory> PageTables<M> {
    /// Maps the 2 MiB `page` to `frame` with one PD entry, flags
    /// `flags | PRESENT | HUGE_PAGE`.
    ///
    /// # Errors
    ///
    /// [`Error::AlreadyMapped`] if the PD entry is not zero (a page table or a mapping
    /// is there), [`Error::HugePageInTheWay`] for a 1 GiB entry above it,
    /// [`Error::OutOfFrames`], [`Error::NoExecuteAbove`] as for
    /// [`map`](super::PageTables::map); nothing changes.
    ///
    /// # Safety
    ///
    /// As [`map`](Self::map), for the 2 MiB `frame` and `page`.
    pub unsafe fn map_huge_2m(
        &mut self,
        page: Page<Size2MiB>,
        frame: PhysFrame<Size2MiB>,
        flags: PageTableFlags,
        tables: &impl FrameSource,
    ) -> Result<(), Error> {
        let addr = page.start_address().as_u64();
        let mut count = CountMissing {
            tables: 0,
            upper_bits: PageTableFlags::empty(),
            lacking: false,
            forbidden: super::forbidden_above(flags),
            forbidden_seen: false,
        };
        // SAFETY: `new`'s contract makes the tables below the root valid.
        let pd = unsafe { Cursor::new(&self.phys, self.root).table(addr, 1, &mut count) }?;
        if count.forbidden_seen {
            return Err(Error::NoExecuteAbove);
        }
        // SAFETY: the entry lies in a reachable PD.
        if !pd.is_null() && unsafe { read(entry_at(pd, index(addr, 2))) } != 0 {
            return Err(Error::AlreadyMapped);
        }
        let mut stock = TableStock::take(&self.phys, tables, count.tables)?;
        let leaf_flags = flags | PageTableFlags::PRESENT | PageTableFlags::HUGE_PAGE;
        let leaf_flags = PageTableFlags::from_bits_retain(leaf_flags.bits() & !ADDR_MASK);
        let mut install = Install {
            stock: &mut stock,
            upper_flags: upper_flags_for(leaf_flags),
            upper_bits: upper_bits_for(leaf_flags),
        };
        // SAFETY: as above; the first pass counted the tables in `stock`.
        let pd = unsafe { Cursor::new(&self.phys, self.root).table(addr, 1, &mut install) };
        stock.give_back(tables);
        // SAFETY: the entry lies in a reachable PD and was zero; nothing borrows it.
        unsafe { (*entry_at(pd?, index(addr, 2))).set_addr(frame.start_address(), leaf_flags) };
        Ok(())
    }

    /// Unmaps the 2 MiB `page` mapped by [`map_huge_2m`](Self::map_huge_2m) and
    /// returns its frame.
    ///
    /// # Errors
    ///
    /// [`Error::NotMapped`] unless a present 2 MiB entry maps `page`;
    /// [`Error::HugePageInTheWay`] for a 1 GiB entry above it. Nothing changes.
    ///
    /// # Safety
    ///
    /// As [`unmap`](Self::unmap).
    pub unsafe fn unmap_huge_2m(
        &mut self,
        page: Page<Size2MiB>,
    ) -> Result<(PhysFrame<Size2MiB>, RangeFlush), Error> {
        let addr = page.start_address().as_u64();
        let (entry, raw) = self.present_2m_entry(addr)?;
        // SAFETY: as above; nothing borrows the entry.
        unsafe { (*entry).set_unused() };
        let frame = PhysFrame::containing_address(PhysAddr::new(raw & ADDR_MASK));
        Ok((frame, huge_flush(addr)))
    }

    /// The PD entry of the present 2 MiB mapping at `addr`, and its value.
    fn present_2m_entry(&self, addr: u64) -> Result<(*mut PageTableEntry, u64), Error> {
        let mut existing = Existing::adding(PageTableFlags::empty());
        // SAFETY: `new`'s contract makes the tables below the root valid.
        let pd = unsafe { Cursor::new(&self.phys, self.root).table(addr, 1, &mut existing) }?;
        let entry = entry_at(pd, index(addr, 2));
        // SAFETY: the entry lies in a reachable PD.
        let raw = unsafe { read(entry) };
        let huge = PageTableFlags::PRESENT | PageTableFlags::HUGE_PAGE;
        if !PageTableFlags::from_bits_retain(raw).contains(huge) {
            return Err(Error::NotMapped);
        }
        Ok((entry, raw))
    }

    /// Replaces the 2 MiB mapping at `page` by a page table of 512 4 KiB entries
    /// that map the same frames with the same rights (Linux's `split_huge_pmd`), so
    /// that part of it can be unmapped. The table comes from `tables` and is marked
    /// [`CREATED`]. Flush the returned token: the TLB may hold the 2 MiB translation.
    ///
    /// # Errors
    ///
    /// [`Error::NotMapped`] unless a present 2 MiB entry maps `page`;
    /// [`Error::HugePageInTheWay`] for a 1 GiB entry above it; [`Error::OutOfFrames`]
    /// without a frame for the table. Nothing changes on error.
    ///
    /// # Safety
    ///
    /// As [`protect`](Self::protect): the pages are the caller's to change, and
    /// `tables` hands out unused frames reachable through `phys`.
    pub unsafe fn split_huge_2m(
        &mut self,
        page: Page<Size2MiB>,
        tables: &impl FrameSource,
    ) -> Result<RangeFlush, Error> {
        let addr = page.start_address().as_u64();
        let (entry, raw) = self.present_2m_entry(addr)?;
        let table_frame = tables.alloc_frame().ok_or(Error::OutOfFrames)?;
        // Bit 12 of the 2 MiB entry is PAT and bit 7 says "huge"; a 4 KiB leaf keeps
        // its PAT in bit 7 (a firmware's write-combining framebuffer keeps its type).
        let base = raw & ADDR_MASK & !(Size2MiB::SIZE - 1);
        let pat = if raw & HUGE_PAT != 0 {
            PageTableFlags::HUGE_PAGE.bits()
        } else {
            0
        };
        let leaf_bits = (raw & !ADDR_MASK & !PageTableFlags::HUGE_PAGE.bits()) | pat;
        let table = table_at(&self.phys, table_frame.start_address());
        // SAFETY: the frame is fresh from `tables`, reachable through `phys`, and not
        // yet linked anywhere.
        let leaves = unsafe { leaf_entries(table, 0, ENTRIES as usize) };
        for (i, leaf) in leaves.iter_mut().enumerate() {
            *leaf = (base + i as u64 * PAGE_SIZE) | leaf_bits;
        }
        // The table is complete before the entry that publishes it is written.
        compiler_fence(Ordering::Release);
        let leaf_flags = PageTableFlags::from_bits_retain(leaf_bits);
        // SAFETY: the entry lies in a reachable PD; nothing borrows it.
        unsafe { (*entry).set_frame(table_frame, upper_flags_for(leaf_flags) | CREATED) };
        Ok(huge_flush(addr))
    }
}

/// The PAT bit of a 2 MiB or 1 GiB entry.
const HUGE_PAT: u64 = 1 << 12;

/// The flush token of the 2 MiB page at `addr`. The last 2 MiB of each canonical
/// half cannot end a page range, so there the range stops one 4 KiB page short:
/// flushing any page of a 2 MiB mapping drops its translation, which is one TLB
/// entry.
fn huge_flush(addr: u64) -> RangeFlush {
    RangeFlush::new(addr, tables::range_end_after(addr + (Size2MiB::SIZE - 1)))
}

/// The 2 MiB leaf that maps the whole leaf-table chunk at `addr` (`len` pages), if
/// there is one: present, or detached (the hardware ignores a non-present entry's
/// other bits, so `HUGE_PAGE` still tells its size).
///
/// # Safety
///
/// The cursor's tables are valid (`PageTables::new`'s contract).
#[inline(never)]
pub(super) unsafe fn huge_leaf<M: PhysMemory>(
    cursor: &mut Cursor<'_, M>,
    addr: u64,
    len: usize,
    existing: &mut Existing,
) -> Result<Option<*mut u64>, Error> {
    if len as u64 != ENTRIES {
        return Ok(None);
    }
    // SAFETY: per the caller.
    let pd = unsafe { cursor.table(addr, 1, existing) }?;
    let entry = entry_at(pd, index(addr, 2));
    // SAFETY: the entry lies in a reachable PD.
    let raw = unsafe { read(entry) };
    let leaf = PageTableFlags::PRESENT.bits() | DETACHED.bits();
    let huge = raw & PageTableFlags::HUGE_PAGE.bits() != 0 && raw & leaf != 0;
    Ok(huge.then_some(entry.cast()))
}

/// Hands each 4 KiB page and frame of the 2 MiB leaf `raw` at `addr` to `on_frame`.
#[inline(never)]
pub(super) fn hand_out_huge(addr: u64, raw: u64, on_frame: &mut impl FnMut(Page, PhysFrame)) {
    // Bit 12 of a 2 MiB entry is PAT, not address.
    let first = frame_of(raw & !(Size2MiB::SIZE - 1));
    for i in 0..ENTRIES {
        on_frame(page_at(addr + i * PAGE_SIZE), first + i);
    }
}
