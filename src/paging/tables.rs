//! The life of the page tables themselves: created up front under the root, unlinked
//! when empty (only those this crate [created](super::CREATED)), released at the end.

use super::*;

impl<M: PhysMemory> PageTables<M> {
    /// Unlinks every page table this crate [created](CREATED) below the root that is
    /// reached from `pages` and holds only zero entries (after its own empty children
    /// are unlinked), handing each table's frame to `on_table`. Returns how many and a
    /// token covering every address they served: the CPU's paging-structure caches may
    /// still point to them, so free the frames only after flushing it. Tables found
    /// rather than created, the root's own entries, and a vmalloc manager's top-level
    /// tables ([`MANAGED`]) are left as they are (see the
    /// [module documentation](crate::paging#whose-tables)).
    ///
    /// # Errors
    ///
    /// [`Error::RangeWraps`], [`Error::NonCanonical`]; nothing changes.
    pub fn free_empty_tables(
        &mut self,
        pages: PageRange,
        on_table: impl FnMut(PhysFrame),
    ) -> Result<(usize, RangeFlush), Error> {
        self.unlink_empty(pages, 1, (0, u64::MAX), on_table)
    }

    /// [`free_empty_tables`](Self::free_empty_tables), unlinking only tables that
    /// serve nothing outside `within` (inclusive addresses): an owner of that range
    /// alone leaves the tables it shares with its neighbours, which another owner
    /// may have made and may be using.
    pub(crate) fn free_empty_tables_within(
        &mut self,
        pages: PageRange,
        within: (u64, u64),
        on_table: impl FnMut(PhysFrame),
    ) -> Result<(usize, RangeFlush), Error> {
        self.unlink_empty(pages, 1, within, on_table)
    }

    /// Checks that the tables already under the root for `pages` map nothing there:
    /// every entry covering the range is zero or a present table entry, none leads back
    /// to a table on its own path (a recursive mapping's) or is [`KEPT`] (a
    /// [`RecursivePhysMemory`](crate::phys::RecursivePhysMemory) window's, which fills
    /// on demand), and no leaf or 2 MiB or 1 GiB entry is present or not. Returns the
    /// root entries that hold a table, for [`adopt`](Self::adopt).
    ///
    /// # Errors
    ///
    /// [`Error::Overlap`] for a root entry marked [`MANAGED`],
    /// [`Error::HugePageInTheWay`] for a 2 MiB or 1 GiB entry, [`Error::AlreadyMapped`]
    /// for anything else that is not a table, and the range errors of
    /// [`unmap`](Self::unmap).
    pub(crate) fn survey_for_adoption(&self, pages: PageRange) -> Result<RootEntries, Error> {
        let (start, end) = span(pages)?;
        let mut found = RootEntries::default();
        if start < end {
            let root = table_at(&self.phys, self.root.start_address());
            let mut path = [self.root.start_address().as_u64(); 4];
            self.adopt_below(root, 0, start, end - 1, &mut path, None, &mut found)?;
        }
        Ok(found)
    }

    /// Adopts the tables [`survey_for_adoption`](Self::survey_for_adoption) found
    /// below the root entries in `found`: their entries lose the [`CREATED`] mark, so
    /// no clean-up of this crate frees them (a kernel's own tables, made with this
    /// crate before the range was handed over, stay the kernel's). The root entries
    /// themselves do not change: [`release_top_level_except`] leaves them.
    ///
    /// [`release_top_level_except`]: Self::release_top_level_except
    ///
    /// # Safety
    ///
    /// The tables under those entries are as the survey found them.
    pub(crate) unsafe fn adopt(&mut self, pages: PageRange, found: &RootEntries) {
        let Ok((start, end)) = span(pages) else {
            return;
        };
        if start < end {
            let root = table_at(&self.phys, self.root.start_address());
            let mut path = [self.root.start_address().as_u64(); 4];
            let mut unused = RootEntries::default();
            let walked =
                self.adopt_below(root, 0, start, end - 1, &mut path, Some(found), &mut unused);
            debug_assert!(walked.is_ok(), "the survey saw the same entries");
        }
    }

    /// Sets (`on`) or clears [`MANAGED`] on the present root entries covering `pages`.
    ///
    /// # Safety
    ///
    /// Nothing else writes those entries meanwhile.
    pub(crate) unsafe fn mark_managed(&mut self, pages: PageRange, on: bool) {
        let Ok((start, end)) = span(pages) else {
            return;
        };
        if start == end {
            return;
        }
        let root = table_at(&self.phys, self.root.start_address());
        let (first, last) = (index(start, 0), index(end - 1, 0));
        for at in first..=last {
            let entry = entry_at(root, at);
            // SAFETY: an entry of the root, which is reachable.
            let raw = unsafe { read(entry) };
            if raw & PageTableFlags::PRESENT.bits() == 0 {
                continue;
            }
            let marked = if on {
                raw | MANAGED.bits()
            } else {
                raw & !MANAGED.bits()
            };
            // SAFETY: as above; only a bit the CPU ignores changes (caller: no one
            // else writes the entry).
            unsafe { core::ptr::write(entry.cast::<u64>(), marked) };
        }
    }

    /// The entries of `table` (at `level`) covering `[first, last]`, and the tables
    /// below them: checked, and with `adopt`, unmarked (root entries only those in
    /// it). Root entries holding a table are recorded in `found`.
    #[allow(clippy::too_many_arguments)]
    fn adopt_below(
        &self,
        table: *mut PageTable,
        level: usize,
        first: u64,
        last: u64,
        path: &mut [u64; 4],
        adopt: Option<&RootEntries>,
        found: &mut RootEntries,
    ) -> Result<(), Error> {
        let span = entry_span(level);
        let mut addr = first;
        loop {
            let region_last = (addr & !(span - 1)) | (span - 1);
            let at = index(addr, level);
            let entry = entry_at(table, at);
            // SAFETY: `entry` lies in a reachable table.
            let raw = unsafe { read(entry) };
            let flags = PageTableFlags::from_bits_retain(raw);
            let child = raw & ADDR_MASK;
            if raw != 0 {
                if level == 3 {
                    return Err(Error::AlreadyMapped);
                }
                // Present or not (a detached 2 MiB mapping keeps the bit).
                if flags.contains(PageTableFlags::HUGE_PAGE) {
                    return Err(Error::HugePageInTheWay);
                }
                if !flags.contains(PageTableFlags::PRESENT) {
                    return Err(Error::AlreadyMapped);
                }
                if level == 0 && flags.contains(MANAGED) {
                    return Err(Error::Overlap);
                }
                if flags.contains(KEPT) {
                    // A physical-memory window's table, filled on demand.
                    return Err(Error::AlreadyMapped);
                }
                if path[..=level].contains(&child) {
                    return Err(Error::AlreadyMapped);
                }
                if level == 0 {
                    found.insert(at);
                }
                let take = adopt.is_some_and(|found| level > 0 || found.contains(at));
                if adopt.is_none() || take {
                    path[level + 1] = child;
                    let below = table_at(&self.phys, PhysAddr::new(child));
                    self.adopt_below(
                        below,
                        level + 1,
                        addr,
                        last.min(region_last),
                        path,
                        adopt,
                        found,
                    )?;
                }
                if take && level > 0 && flags.contains(CREATED) {
                    // SAFETY: a present upper entry of a reachable table; only its
                    // software mark changes, which no walk of the CPU reads.
                    unsafe { core::ptr::write(entry.cast::<u64>(), raw & !CREATED.bits()) };
                }
            }
            if region_last >= last {
                return Ok(());
            }
            addr = region_last + 1;
        }
    }

    /// The leaf table (the one holding 4 KiB entries) whose 2 MiB contains `addr`,
    /// made with the tables above it (marked [`CREATED`]) if missing. For a caller that
    /// owns the whole 2 MiB and writes its entries itself: the vmalloc manager's
    /// per-CPU blocks, which keep their tables for as long as they live.
    ///
    /// # Errors
    ///
    /// [`Error::OutOfFrames`] (nothing created), [`Error::HugePageInTheWay`] or
    /// [`Error::AlreadyMapped`] for an upper entry that is not a table.
    ///
    /// # Safety
    ///
    /// `tables` hands out frames that are unused and reachable through `phys`.
    pub unsafe fn leaf_table(
        &mut self,
        addr: VirtAddr,
        tables: &impl FrameSource,
    ) -> Result<*mut PageTable, Error> {
        let flags = PageTableFlags::PRESENT | PageTableFlags::WRITABLE;
        let addr = addr.as_u64();
        let mut count = CountMissing {
            tables: 0,
            upper_bits: upper_bits_for(flags),
            lacking: false,
            forbidden: PageTableFlags::empty(),
            forbidden_seen: false,
        };
        // SAFETY: `new`'s contract makes the tables below the root valid.
        unsafe { Cursor::new(&self.phys, self.root).table(addr, 2, &mut count) }?;
        let mut stock = TableStock::take(&self.phys, tables, count.tables)?;
        let mut install = Install {
            stock: &mut stock,
            upper_flags: upper_flags_for(flags),
            upper_bits: upper_bits_for(flags),
        };
        // SAFETY: as above; the first walk counted the tables in `stock`.
        let table = unsafe { Cursor::new(&self.phys, self.root).table(addr, 2, &mut install) };
        stock.give_back(tables);
        table
    }

    /// Gives every root entry covering `pages` a table, creating the missing ones from
    /// `tables` (marked [`CREATED`]); returns how many it created. After this, the
    /// root's entries for the range never change while only this crate edits it, so
    /// the kernel may copy them into other address spaces.
    ///
    /// # Errors
    ///
    /// [`Error::OutOfFrames`] (nothing created), [`Error::HugePageInTheWay`] or
    /// [`Error::AlreadyMapped`] for a root entry that is not a table, and the range
    /// errors of [`unmap`](Self::unmap). Nothing changes on error.
    ///
    /// # Safety
    ///
    /// `tables` hands out frames that are unused and reachable through `phys`.
    pub unsafe fn preallocate_top_level(
        &mut self,
        pages: PageRange,
        tables: &impl FrameSource,
    ) -> Result<usize, Error> {
        let (start, end) = span(pages)?;
        if start == end {
            return Ok(0);
        }
        let mut count = CountMissing {
            tables: 0,
            upper_bits: PageTableFlags::empty(),
            lacking: false,
            forbidden: PageTableFlags::empty(),
            forbidden_seen: false,
        };
        let root_span = entry_span(0);
        let last = end - 1;
        let mut addr = start;
        loop {
            // SAFETY: `new`'s contract makes the tables below the root valid.
            unsafe { Cursor::new(&self.phys, self.root).table(addr, 0, &mut count) }?;
            match (addr | (root_span - 1)).checked_add(1) {
                Some(next) if next <= last => addr = next,
                _ => break,
            }
        }
        let created = count.tables;
        let mut stock = TableStock::take(&self.phys, tables, created)?;
        let mut install = Install {
            stock: &mut stock,
            upper_flags: upper_flags_for(PageTableFlags::WRITABLE),
            upper_bits: PageTableFlags::empty(),
        };
        addr = start;
        loop {
            // SAFETY: as above; the first pass counted the tables in the stock.
            let made = unsafe { Cursor::new(&self.phys, self.root).table(addr, 0, &mut install) };
            debug_assert!(made.is_ok(), "the counting pass saw the same entries");
            match (addr | (root_span - 1)).checked_add(1) {
                Some(next) if next <= last => addr = next,
                _ => break,
            }
        }
        stock.give_back(tables);
        Ok(created)
    }

    /// Unlinks the empty tables this crate created anywhere under the root for
    /// `pages`, the root's own entries included, handing their frames to `on_table`:
    /// the teardown of a region [`preallocate_top_level`](Self::preallocate_top_level)
    /// prepared. Tables that still map something stay.
    ///
    /// # Errors
    ///
    /// As [`free_empty_tables`](Self::free_empty_tables).
    ///
    /// # Safety
    ///
    /// No address space still uses a copy of the root entries for `pages`: once the
    /// returned token is flushed, the kernel frees their tables.
    pub unsafe fn release_top_level(
        &mut self,
        pages: PageRange,
        on_table: impl FnMut(PhysFrame),
    ) -> Result<(usize, RangeFlush), Error> {
        self.unlink_empty(pages, 0, (0, u64::MAX), on_table)
    }

    /// [`release_top_level`](Self::release_top_level), leaving the root entries in
    /// `adopted` as they are (those an owner found rather than made): their tables
    /// stay linked, while the empty tables this crate made below them are unlinked as
    /// usual.
    ///
    /// # Errors
    ///
    /// As [`free_empty_tables`](Self::free_empty_tables).
    ///
    /// # Safety
    ///
    /// As [`release_top_level`](Self::release_top_level).
    pub(crate) unsafe fn release_top_level_except(
        &mut self,
        pages: PageRange,
        adopted: &RootEntries,
        on_table: impl FnMut(PhysFrame),
    ) -> Result<(usize, RangeFlush), Error> {
        let mut freed = self.freed(0, (0, u64::MAX));
        freed.adopted_roots = *adopted;
        self.unlink_with(pages, freed, on_table)
    }

    /// [`free_empty_tables`](Self::free_empty_tables), unlinking tables whose parent is
    /// at `from_level` or deeper and that serve nothing outside `within`.
    fn unlink_empty(
        &mut self,
        pages: PageRange,
        from_level: usize,
        within: (u64, u64),
        on_table: impl FnMut(PhysFrame),
    ) -> Result<(usize, RangeFlush), Error> {
        self.unlink_with(pages, self.freed(from_level, within), on_table)
    }

    /// Nothing freed yet, unlinking tables whose parent is at `from_level` or deeper
    /// and that serve nothing outside `within`.
    fn freed(&self, from_level: usize, within: (u64, u64)) -> Freed {
        Freed {
            count: 0,
            low: u64::MAX,
            high: 0,
            from_level,
            within,
            adopted_roots: RootEntries::default(),
            path: [self.root.start_address().as_u64(); 3],
        }
    }

    fn unlink_with(
        &mut self,
        pages: PageRange,
        mut freed: Freed,
        mut on_table: impl FnMut(PhysFrame),
    ) -> Result<(usize, RangeFlush), Error> {
        let (start, end) = span(pages)?;
        if start < end {
            let root = table_at(&self.phys, self.root.start_address());
            self.free_below(root, 0, start, end - 1, &mut on_table, &mut freed);
        }
        let flush = if freed.count == 0 {
            RangeFlush::new(start, start)
        } else {
            RangeFlush::new(freed.low, freed.high)
        };
        Ok((freed.count, flush))
    }

    /// Unlinks the empty created tables below the entries of `table` (at `level`)
    /// covering `[first, last]`, deepest first. An entry that leads back to a table
    /// on the walk's own path (a recursive mapping's) is not followed: its "tables"
    /// would be the walk's own, seen at the wrong level.
    fn free_below(
        &self,
        table: *mut PageTable,
        level: usize,
        first: u64,
        last: u64,
        on_table: &mut impl FnMut(PhysFrame),
        freed: &mut Freed,
    ) {
        let span = entry_span(level);
        let mut addr = first;
        loop {
            let region_start = addr & !(span - 1);
            let region_last = region_start | (span - 1);
            let entry = entry_at(table, index(addr, level));
            // SAFETY: `entry` lies in a reachable table.
            let raw = unsafe { read(entry) };
            let flags = PageTableFlags::from_bits_retain(raw);
            let child_frame = raw & ADDR_MASK;
            if flags.contains(PageTableFlags::PRESENT)
                && !flags.contains(PageTableFlags::HUGE_PAGE)
                && !freed.path[..=level.min(2)].contains(&child_frame)
            {
                let child = table_at(&self.phys, PhysAddr::new(child_frame));
                if level < 2 {
                    freed.path[level + 1] = child_frame;
                    self.free_below(
                        child,
                        level + 1,
                        addr,
                        last.min(region_last),
                        on_table,
                        freed,
                    );
                }
                // A live manager's top-level table (MANAGED) is not to be released by
                // anyone else; the manager clears the mark before it releases it.
                let ours = level >= freed.from_level
                    && flags.contains(CREATED)
                    && !flags.contains(MANAGED)
                    && !(level == 0 && freed.adopted_roots.contains(index(addr, 0)))
                    && region_start >= freed.within.0
                    && region_last <= freed.within.1;
                // SAFETY: `child` is a reachable table; nothing borrows it.
                if ours && unsafe { (*child).is_empty() } {
                    // SAFETY: `entry` is a present upper entry of a reachable table.
                    unsafe { (*entry).set_unused() };
                    // No walk may reach the table once someone else can have its frame.
                    compiler_fence(Ordering::Release);
                    on_table(frame_of(raw));
                    freed.count += 1;
                    freed.low = freed.low.min(region_start);
                    freed.high = freed.high.max(range_end_after(region_last));
                }
            }
            if region_last >= last {
                break;
            }
            addr = region_last + 1;
        }
    }
}

impl<M: PhysMemory> PageTables<M> {
    /// The first run of `[from, last]` (inclusive addresses) that one leaf table
    /// maps, at or after `from`: its first and last addresses. Missing upper tables
    /// are skipped whole, so a walk over a vast, mostly unmapped range (a sparse
    /// area's) costs what its tables hold, not what it spans.
    pub(crate) fn next_leaf_table_run(&self, from: u64, last: u64) -> Option<(u64, u64)> {
        if from > last {
            return None;
        }
        let root = table_at(&self.phys, self.root.start_address());
        self.leaf_table_run_below(root, 0, from, last)
    }

    /// [`next_leaf_table_run`](Self::next_leaf_table_run) below `table` (at
    /// `level`, 0 = PML4), for `[first, last]` inside its span.
    fn leaf_table_run_below(
        &self,
        table: *mut PageTable,
        level: usize,
        first: u64,
        last: u64,
    ) -> Option<(u64, u64)> {
        let span = entry_span(level);
        let mut addr = first;
        loop {
            let region_last = (addr & !(span - 1)) | (span - 1);
            // SAFETY: an entry of a reachable table.
            let raw = unsafe { read(entry_at(table, index(addr, level))) };
            let flags = PageTableFlags::from_bits_retain(raw);
            if flags.contains(PageTableFlags::PRESENT) && !flags.contains(PageTableFlags::HUGE_PAGE)
            {
                let end = last.min(region_last);
                if level == 2 {
                    return Some((addr, end));
                }
                let child = table_at(&self.phys, PhysAddr::new(raw & ADDR_MASK));
                if let Some(run) = self.leaf_table_run_below(child, level + 1, addr, end) {
                    return Some(run);
                }
            }
            if region_last >= last {
                return None;
            }
            addr = region_last + 1;
        }
    }
}

/// The exclusive end of a flush range whose last address is `last`. The last page of
/// each canonical half cannot end a `PageRange` (its end would not be canonical), so
/// there the range stops one page short.
pub(super) fn range_end_after(last: u64) -> u64 {
    const LOWER_HALF_END: u64 = 1 << 47;
    if last < LOWER_HALF_END {
        (last + 1).min(LOWER_HALF_END - PAGE_SIZE)
    } else {
        last.saturating_add(1).min(u64::MAX - PAGE_SIZE + 1)
    }
}

/// Tables freed so far and the hull of the addresses they served.
struct Freed {
    count: usize,
    low: u64,
    high: u64,
    /// Level of the shallowest parent whose entries may be cleared (0 = the root).
    from_level: usize,
    /// Only tables serving addresses inside these (inclusive) are unlinked.
    within: (u64, u64),
    /// Root entries whose tables stay.
    adopted_roots: RootEntries,
    /// Frames of the tables on the walk's path, by level (0 = the root); entries
    /// past the current level are stale.
    path: [u64; 3],
}

/// A set of root-table entries, by index.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct RootEntries([u64; 8]);

impl RootEntries {
    fn insert(&mut self, index: usize) {
        if let Some(word) = self.0.get_mut(index / 64) {
            *word |= 1 << (index % 64);
        }
    }

    fn contains(&self, index: usize) -> bool {
        self.0
            .get(index / 64)
            .is_some_and(|word| word & (1 << (index % 64)) != 0)
    }
}
