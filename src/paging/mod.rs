//! Page-table cursor: maps, unmaps, protects and detaches whole ranges of 4 KiB pages
//! in x86_64 4-level page tables reached through [`PhysMemory`].
//!
//! # The cursor
//!
//! Mapping page by page from the root, as the `x86_64` crate's `Mapper::map_to` does,
//! reads four levels for every page. The pages of a range are neighbours, though: 512
//! of them share a leaf table (PT), 512 PTs share a PD, 512 PDs share a PDPT. So the
//! walk here is a cursor that keeps the path PML4 → PDPT → PD → PT of the current
//! position, each table tagged with the address prefix it was found for. A range is
//! handled one leaf-table chunk at a time: inside a chunk the cursor writes entries
//! back to back into one table; moving to the next chunk it compares prefixes and
//! re-reads only the levels whose prefix changed. N consecutive pages cost N entry
//! writes plus one descent per table boundary crossed.
//!
//! # Passes: check first, then write
//!
//! Every call that changes entries walks its range twice. The first pass only reads:
//! it checks every leaf (free for `map`, mapped for `unmap`, ...) and, for `map`,
//! counts the page tables that are missing. Then `map` takes exactly that many frames
//! from the table source; if one cannot be had it returns those it took and fails
//! with [`Error::OutOfFrames`] before writing anything. Only then does the second pass
//! write. So a failing call leaves the tables byte for byte as they were, and the
//! stock of new tables needs no memory of its own (it is a list threaded through the
//! frames themselves).
//!
//! New tables are zeroed before the entry that publishes them is written. Upper-level
//! entries get `PRESENT | WRITABLE`, plus `USER_ACCESSIBLE` when the leaf asks for it;
//! never `NO_EXECUTE` or `GLOBAL`, so permissions are decided at the leaf. Existing
//! upper entries gain `WRITABLE` and `USER_ACCESSIBLE` when a leaf below needs them
//! (`map`, `protect`); nothing is ever taken away from them.
//!
//! # Whose tables
//!
//! An upper entry that points to a table this crate made carries the software bit
//! [`CREATED`]. Only such tables are ever freed: tables that were there before (the
//! boot loader's, the kernel's own) are used as found and never handed to anyone. An
//! owner that takes over a range from the kernel (the vmalloc manager) adopts the
//! tables this crate made there before it: their entries lose the mark. The root
//! entries a vmalloc manager uses carry [`MANAGED`] while it lives, so that no
//! second manager shares them.
//! Entries of the root itself are never cleared either. A kernel with processes copies
//! the kernel half of its PML4 into every new address space once, so a root entry
//! that changed later would leave the copies pointing at a freed table; instead the
//! owner of a region creates its top-level tables up front
//! ([`PageTables::preallocate_top_level`], Linux's `preallocate_vmalloc_pages`) and
//! they stay for as long as it lives.
//!
//! # Lazy unmapping
//!
//! [`PageTables::detach`] clears only `PRESENT` of each leaf and sets the
//! software-available bit [`DETACHED`], keeping the frame address: new walks fault,
//! while the frame stays recorded in the table itself until the caller has flushed
//! the TLB, possibly for many ranges at once. [`PageTables::reclaim_detached`] then
//! hands the frames back and zeroes the entries. The vmalloc
//! [purge](crate::vmalloc::purge) is the policy built on this.
//!
//! # 2 MiB entries
//!
//! [`PageTables::map_huge_2m`] writes a 2 MiB leaf into a PD. The range calls that
//! rewrite leaves ([`unmap`](PageTables::unmap), [`detach`](PageTables::detach),
//! [`reclaim_detached`](PageTables::reclaim_detached), [`protect`](PageTables::protect))
//! take a 2 MiB entry that the range covers whole as 512 pages, handing its frames
//! out one 4 KiB frame at a time; a range that covers part of one fails with
//! [`Error::HugePageInTheWay`] and changes nothing. [`PageTables::split_huge_2m`]
//! turns one into a page table first.
//!
//! # Ranges
//!
//! Ranges are [`PageRange`]s, end exclusive. A range whose end is below its start
//! fails with [`Error::RangeWraps`]; one that spans the non-canonical hole between
//! the lower and the upper half with [`Error::NonCanonical`]. (So the last page of the
//! lower half cannot be named by a range, nor the last page of the address space.)

mod cursor;
mod flush;
mod huge;
use huge::{hand_out_huge, huge_leaf};
mod mapper;
mod tables;
pub(crate) use tables::RootEntries;

pub use flush::RangeFlush;
pub use mapper::PageTableMapper;

use crate::{Error, FrameSource, PAGE_SIZE, PhysMemory};
use core::sync::atomic::{Ordering, compiler_fence};
use cursor::{
    CountMissing, Cursor, ENTRIES, Existing, Install, LeafCheck, TableStock, entry_at, entry_span,
    index, leaf_entries, read, table_at,
};
use x86_64::structures::paging::mapper::MappedFrame;
use x86_64::structures::paging::page::PageRange;
use x86_64::structures::paging::{
    Page, PageSize, PageTable, PageTableFlags, PhysFrame, Size1GiB, Size2MiB, Size4KiB,
};
use x86_64::{PhysAddr, VirtAddr};

/// The software-available bit that marks a detached leaf (see [`PageTables::detach`]).
pub const DETACHED: PageTableFlags = PageTableFlags::BIT_9;

/// The software-available bit of an upper entry whose table this crate created, and
/// so may free when it is empty (see the [module documentation](self#whose-tables)).
pub const CREATED: PageTableFlags = PageTableFlags::BIT_10;

/// The software-available bit of an upper entry whose table stays while it is empty:
/// no clean-up frees it (a [`RecursivePhysMemory`](crate::phys::RecursivePhysMemory)
/// window's tables, made up front so that reaching memory never needs a frame).
pub const KEPT: PageTableFlags = PageTableFlags::BIT_11;

/// The software-available bit of a root entry a vmalloc manager's region uses: a
/// second manager over the entry would share the tables below it, and is refused
/// (see [`vmalloc::claims`](crate::vmalloc::claims)). Bits 52 to 62 of an entry that
/// points to a table are ignored by the CPU.
pub const MANAGED: PageTableFlags = PageTableFlags::BIT_52;

/// Start of the upper canonical half.
const UPPER_HALF: u64 = 0xffff_8000_0000_0000;
/// Bits of an entry that hold a physical address.
pub(crate) const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// One address space's page tables, changed a range at a time.
#[derive(Debug)]
pub struct PageTables<M: PhysMemory> {
    root: PhysFrame,
    phys: M,
}

impl<M: PhysMemory> PageTables<M> {
    /// The page tables whose PML4 is in `root`.
    ///
    /// # Safety
    ///
    /// `root` holds a valid PML4 whose tables (and every frame this value will write
    /// as a table) are reachable through `phys`; while this value lives, nobody else
    /// changes the parts of those tables it works on, except through this crate's
    /// locking. Frames handed to `map` are not page tables.
    pub unsafe fn new(root: PhysFrame, phys: M) -> Self {
        Self { root, phys }
    }

    /// The frame holding the PML4.
    pub fn root(&self) -> PhysFrame {
        self.root
    }

    /// How physical memory is reached.
    pub fn phys(&self) -> &M {
        &self.phys
    }

    /// Maps `pages` to `frames`, in order, with leaf flags `flags | PRESENT`.
    ///
    /// Missing page tables come from `tables`. Nothing needs flushing: no translation
    /// of a page that was not present can be cached. Upper entries get the
    /// `WRITABLE` and `USER_ACCESSIBLE` the leaves need, and lose nothing.
    ///
    /// # Safety
    ///
    /// - every frame of `frames` is the caller's to map with `flags` (memory it owns,
    ///   or MMIO it may touch), and none holds a page table;
    /// - the pages are the caller's to map: nothing else in the address space expects
    ///   them to stay unmapped;
    /// - `tables` hands out frames that are unused and reachable through `phys`.
    ///
    /// # Errors
    ///
    /// Nothing changes on any error:
    /// - [`Error::FrameCountMismatch`]: `frames.len()` is not the number of pages;
    /// - [`Error::AlreadyMapped`]: an entry in the way is not zero (mapped, detached);
    /// - [`Error::HugePageInTheWay`]: a 2 MiB or 1 GiB entry covers part of the range;
    /// - [`Error::OutOfFrames`]: `tables` ran out of frames for page tables;
    /// - [`Error::NoExecuteAbove`]: the leaves are executable (no `NO_EXECUTE`) but an
    ///   upper entry on the way has `NO_EXECUTE` (a boot loader's table), which the
    ///   leaves cannot override;
    /// - [`Error::RangeWraps`], [`Error::NonCanonical`]: see the [module doc](self).
    ///
    /// Should `frames` yield fewer frames than its `len()` promised (a broken
    /// `ExactSizeIterator`), the pages mapped so far are unmapped again and the call
    /// fails with [`Error::FrameCountMismatch`], but the page tables it added stay
    /// (empty; [`free_empty_tables`](Self::free_empty_tables) takes them back).
    pub unsafe fn map<I>(
        &mut self,
        pages: PageRange,
        frames: I,
        flags: PageTableFlags,
        tables: &impl FrameSource,
    ) -> Result<(), Error>
    where
        I: IntoIterator<Item = PhysFrame>,
        I::IntoIter: ExactSizeIterator,
    {
        let (start, end) = span(pages)?;
        let frames = frames.into_iter();
        if frames.len() as u64 != (end - start) / PAGE_SIZE {
            return Err(Error::FrameCountMismatch);
        }
        let leaf_flags = flags | PageTableFlags::PRESENT;
        let mut count = CountMissing {
            tables: 0,
            upper_bits: upper_bits_for(leaf_flags),
            lacking: false,
            forbidden: forbidden_above(leaf_flags),
            forbidden_seen: false,
        };
        let mut cursor = Cursor::new(&self.phys, self.root);
        self.check_map(start, end, &mut cursor, &mut count)?;
        if count.forbidden_seen {
            return Err(Error::NoExecuteAbove);
        }
        let mut stock = TableStock::take(&self.phys, tables, count.tables)?;
        if count.tables > 0 || count.lacking {
            // The path holds tables still to be made or entries still to be changed.
            cursor = Cursor::new(&self.phys, self.root);
        }
        let result = self.write_map(start, end, cursor, frames, leaf_flags, &mut stock);
        stock.give_back(tables);
        result
    }

    /// First pass of [`map`](Self::map): checks every leaf is zero, counts missing tables.
    fn check_map(
        &self,
        start: u64,
        end: u64,
        cursor: &mut Cursor<'_, M>,
        count: &mut CountMissing,
    ) -> Result<(), Error> {
        for (addr, first, len) in leaf_chunks(start, end) {
            // SAFETY: `new`'s contract makes the tables below the root valid.
            let table = unsafe { cursor.table(addr, 2, count) }?;
            if table.is_null() {
                continue; // a table to be made, so all zero
            }
            // SAFETY: a leaf table of the walk; no other reference to it is alive.
            FREE.check(unsafe { leaf_entries(table, first, len) })?;
        }
        Ok(())
    }

    /// Second pass of [`map`](Self::map): installs tables from `stock`, writes leaves.
    fn write_map(
        &self,
        start: u64,
        end: u64,
        mut cursor: Cursor<'_, M>,
        mut frames: impl Iterator<Item = PhysFrame>,
        leaf_flags: PageTableFlags,
        stock: &mut TableStock<'_, M>,
    ) -> Result<(), Error> {
        // Flags built with `from_bits_retain` could carry address bits: drop them.
        let leaf_bits = leaf_flags.bits() & !ADDR_MASK;
        let mut install = Install {
            stock,
            upper_flags: upper_flags_for(leaf_flags),
            upper_bits: upper_bits_for(leaf_flags),
        };
        for (addr, first, len) in leaf_chunks(start, end) {
            // SAFETY: `new`'s contract; the first pass counted the tables in `stock`.
            let table = unsafe { cursor.table(addr, 2, &mut install) }?;
            // SAFETY: a leaf table of the walk; no other reference to it is alive.
            let leaves = unsafe { leaf_entries(table, first, len) };
            let mut written = 0;
            for (leaf, frame) in leaves.iter_mut().zip(frames.by_ref()) {
                *leaf = frame.start_address().as_u64() | leaf_bits;
                written += 1;
            }
            if written < len {
                self.clear_leaves(start, addr + written as u64 * PAGE_SIZE);
                return Err(Error::FrameCountMismatch);
            }
        }
        Ok(())
    }

    /// Zeroes the leaves `[start, end)`, all of which lie in existing tables.
    fn clear_leaves(&self, start: u64, end: u64) {
        let cleared = self.rewrite_leaves(start, end, NOTHING_ABOVE, &ANY, |_, leaf, _| *leaf = 0);
        debug_assert!(cleared.is_ok());
    }

    /// Unmaps every page of `pages`, handing each page and its frame to `on_frame`
    /// after its entry is cleared. The frames stay the caller's until the returned
    /// token is flushed: the TLB may still reach them.
    ///
    /// # Errors
    ///
    /// [`Error::NotMapped`] if a page of the range is not present (detached pages
    /// included: see [`reclaim_detached`](Self::reclaim_detached)),
    /// [`Error::HugePageInTheWay`], [`Error::RangeWraps`], [`Error::NonCanonical`].
    /// The range is checked first, so nothing changes and `on_frame` is not called.
    ///
    /// # Safety
    ///
    /// The pages are the caller's to unmap: no code or data anyone still uses lives
    /// there, and the caller flushes the returned token before the frames are reused.
    pub unsafe fn unmap(
        &mut self,
        pages: PageRange,
        mut on_frame: impl FnMut(Page, PhysFrame),
    ) -> Result<RangeFlush, Error> {
        let (start, end) = span(pages)?;
        self.rewrite_leaves(start, end, NOTHING_ABOVE, &PRESENT, |addr, leaf, pages| {
            let raw = core::mem::take(leaf);
            match pages {
                1 => on_frame(page_at(addr), frame_of(raw)),
                _ => hand_out_huge(addr, raw, &mut on_frame),
            }
        })?;
        Ok(RangeFlush::new(start, end))
    }

    /// Makes every page of `pages` fault on new walks while keeping its frame
    /// recorded: clears `PRESENT`, sets [`DETACHED`]. Flush the returned token (or a
    /// batch it was merged into), then call [`reclaim_detached`](Self::reclaim_detached).
    ///
    /// # Errors
    ///
    /// As [`unmap`](Self::unmap); nothing changes.
    ///
    /// # Safety
    ///
    /// As [`unmap`](Self::unmap).
    pub unsafe fn detach(&mut self, pages: PageRange) -> Result<RangeFlush, Error> {
        let (start, end) = span(pages)?;
        let (present, detached) = (PageTableFlags::PRESENT.bits(), DETACHED.bits());
        self.rewrite_leaves(start, end, NOTHING_ABOVE, &PRESENT, |_, leaf, _| {
            *leaf = (*leaf & !present) | detached;
        })?;
        Ok(RangeFlush::new(start, end))
    }

    /// Zeroes the detached entries of `pages`, handing each page and its frame to
    /// `on_frame`. Call it only after flushing the token [`detach`](Self::detach)
    /// returned.
    ///
    /// # Errors
    ///
    /// [`Error::AlreadyMapped`] for a present page, [`Error::NotMapped`] for a page
    /// neither present nor detached, and the range errors of [`unmap`](Self::unmap);
    /// nothing changes.
    ///
    /// # Safety
    ///
    /// The token [`detach`](Self::detach) returned for these pages has been flushed on
    /// every CPU that may have used them: the frames handed out are unreachable.
    pub unsafe fn reclaim_detached(
        &mut self,
        pages: PageRange,
        mut on_frame: impl FnMut(Page, PhysFrame),
    ) -> Result<(), Error> {
        let (start, end) = span(pages)?;
        self.rewrite_leaves(
            start,
            end,
            NOTHING_ABOVE,
            &DETACHED_LEAF,
            |addr, leaf, pages| {
                let raw = core::mem::take(leaf);
                match pages {
                    1 => on_frame(page_at(addr), frame_of(raw)),
                    _ => hand_out_huge(addr, raw, &mut on_frame),
                }
            },
        )
    }

    /// Gives every page of `pages` the leaf flags `flags | PRESENT`, keeping its frame,
    /// its `ACCESSED` and `DIRTY` bits and bit 7 (`HUGE_PAGE` in a 2 MiB leaf, the
    /// PAT bit in a 4 KiB one, which `flags` cannot change here; its `HUGE_PAGE` is
    /// ignored). As [`map`](Self::map), upper entries get
    /// the `WRITABLE` and `USER_ACCESSIBLE` the leaves need and lose nothing.
    ///
    /// # Errors
    ///
    /// As [`unmap`](Self::unmap), and [`Error::NoExecuteAbove`] as for
    /// [`map`](Self::map); nothing changes.
    ///
    /// # Safety
    ///
    /// The pages are the caller's to change: the new rights expose nothing the caller
    /// may not write or execute, and nothing relies on the old rights (read-only code,
    /// for one). The caller flushes the returned token.
    pub unsafe fn protect(
        &mut self,
        pages: PageRange,
        flags: PageTableFlags,
    ) -> Result<RangeFlush, Error> {
        let (start, end) = span(pages)?;
        // `HUGE_PAGE` says a 2 MiB leaf (in a 4 KiB leaf it is PAT): kept either way.
        let kept = ADDR_MASK
            | (PageTableFlags::ACCESSED | PageTableFlags::DIRTY | PageTableFlags::HUGE_PAGE).bits();
        let leaf_bits = (flags | PageTableFlags::PRESENT).bits() & !kept;
        let upper_bits = upper_bits_for(flags);
        let forbidden = forbidden_above(flags);
        self.rewrite_leaves(
            start,
            end,
            (upper_bits, forbidden),
            &PRESENT,
            |_, leaf, _| {
                *leaf = (*leaf & kept) | leaf_bits;
            },
        )?;
        Ok(RangeFlush::new(start, end))
    }

    /// Whether an upper entry above the leaf table at `addr` has `NO_EXECUTE` (a
    /// boot loader's), so that no leaf below it can be executable.
    ///
    /// # Errors
    ///
    /// [`Error::NotMapped`] without a leaf table there.
    pub(crate) fn exec_forbidden_above(&self, addr: VirtAddr) -> Result<bool, Error> {
        let mut existing = Existing {
            forbidden: PageTableFlags::NO_EXECUTE,
            ..Existing::adding(PageTableFlags::empty())
        };
        // SAFETY: `new`'s contract makes the tables below the root valid; the walk
        // only reads.
        unsafe { Cursor::new(&self.phys, self.root).table(addr.as_u64(), 2, &mut existing) }?;
        Ok(existing.forbidden_seen)
    }

    /// Checks every leaf of `[start, end)` with `check`, then, if all pass, rewrites
    /// each with `rewrite(address, entry, pages it maps)`, OR-ing `upper_bits` into
    /// the upper entries on the way.
    ///
    /// A 2 MiB entry (present, or detached by [`detach`](Self::detach)) that the range
    /// covers whole is one leaf of 512 pages; one the range covers in part fails
    /// with [`Error::HugePageInTheWay`] (or [`Error::NotMapped`] when detached).
    fn rewrite_leaves(
        &self,
        start: u64,
        end: u64,
        upper: (PageTableFlags, PageTableFlags),
        check: &LeafCheck,
        mut rewrite: impl FnMut(u64, &mut u64, u64),
    ) -> Result<(), Error> {
        let (upper_bits, forbidden) = upper;
        let mut existing = Existing {
            forbidden,
            ..Existing::adding(PageTableFlags::empty())
        };
        let mut cursor = Cursor::new(&self.phys, self.root);
        let mut any_huge = false;
        for (addr, first, len) in leaf_chunks(start, end) {
            // SAFETY: `new`'s contract makes the tables below the root valid.
            let table = match unsafe { cursor.table(addr, 2, &mut existing) } {
                Ok(table) => table,
                // In the way of a leaf table: perhaps a 2 MiB leaf the chunk covers.
                Err(error) => {
                    // SAFETY: as above.
                    let huge = unsafe { huge_leaf(&mut cursor, addr, len, &mut existing) }?;
                    let huge = huge.ok_or(error)?;
                    // SAFETY: `huge_leaf` found the entry in a reachable PD.
                    check.check(core::slice::from_ref(unsafe { &*huge }))?;
                    any_huge = true;
                    continue;
                }
            };
            // SAFETY: a leaf table of the walk; no other reference to it is alive.
            check.check(unsafe { leaf_entries(table, first, len) })?;
        }
        // The path the check ended on is still valid (rewriting leaves moves no
        // table), so a range inside one leaf table is not walked twice; unless upper
        // entries need bits, which takes passing each of them again.
        if existing.forbidden_seen {
            return Err(Error::NoExecuteAbove);
        }
        let mut existing = Existing::adding(upper_bits);
        if !upper_bits.is_empty() || any_huge {
            cursor = Cursor::new(&self.phys, self.root);
        }
        for (addr, first, len) in leaf_chunks(start, end) {
            if any_huge {
                // SAFETY: as above; the first pass found every table and 2 MiB leaf.
                if let Some(huge) = unsafe { huge_leaf(&mut cursor, addr, len, &mut existing) }? {
                    // SAFETY: as above; nothing else borrows the entry.
                    rewrite(addr, unsafe { &mut *huge }, ENTRIES);
                    continue;
                }
            }
            // SAFETY: as above.
            let table = unsafe { cursor.table(addr, 2, &mut existing) }?;
            // SAFETY: as above.
            let leaves = unsafe { leaf_entries(table, first, len) };
            let mut page_addr = addr;
            for leaf in leaves {
                rewrite(page_addr, leaf, 1);
                page_addr += PAGE_SIZE;
            }
        }
        Ok(())
    }

    /// The physical address `addr` maps to, with the leaf's flags and frame (whose
    /// size says which level mapped it).
    ///
    /// # Errors
    ///
    /// [`Error::NotMapped`] if no present entry maps `addr` (detached ones included);
    /// [`Error::HugePageInTheWay`] for an entry on the way the MMU faults on as
    /// malformed: `HUGE_PAGE` in a PML4 entry, or a reserved address bit set in a
    /// 2 MiB or 1 GiB leaf.
    pub fn translate(
        &self,
        addr: VirtAddr,
    ) -> Result<(PhysAddr, PageTableFlags, MappedFrame), Error> {
        let addr = addr.as_u64();
        let mut table = table_at(&self.phys, self.root.start_address());
        for level in 0..4 {
            // SAFETY: `new`'s contract makes the tables below the root valid.
            let raw = unsafe { read(entry_at(table, index(addr, level))) };
            let flags = PageTableFlags::from_bits_retain(raw & !ADDR_MASK);
            if !flags.contains(PageTableFlags::PRESENT) {
                return Err(Error::NotMapped);
            }
            // Reserved in a PML4 entry: the MMU faults there, as every range call
            // refuses it.
            if level == 0 && flags.contains(PageTableFlags::HUGE_PAGE) {
                return Err(Error::HugePageInTheWay);
            }
            let leaf = level == 3 || (level > 0 && flags.contains(PageTableFlags::HUGE_PAGE));
            if leaf {
                // A huge leaf's address bits below its size, but PAT (bit 12), are
                // reserved: the MMU faults on them.
                let reserved = raw & ADDR_MASK & (entry_span(level) - 1) & !(1 << 12);
                if level < 3 && reserved != 0 {
                    return Err(Error::HugePageInTheWay);
                }
                return Ok(leaf_translation(addr, raw, level, flags));
            }
            table = table_at(&self.phys, PhysAddr::new(raw & ADDR_MASK));
        }
        unreachable!("level 3 entries are leaves")
    }
}

/// `[start, end)` of `pages` as addresses, checked.
fn span(pages: PageRange) -> Result<(u64, u64), Error> {
    let start = pages.start.start_address().as_u64();
    let end = pages.end.start_address().as_u64();
    if start > end {
        return Err(Error::RangeWraps);
    }
    if start < UPPER_HALF && end >= UPPER_HALF {
        return Err(Error::NonCanonical);
    }
    Ok((start, end))
}

/// The range split at leaf-table boundaries: `(address, first index, length)`.
fn leaf_chunks(start: u64, end: u64) -> impl Iterator<Item = (u64, usize, usize)> {
    let mut addr = start;
    core::iter::from_fn(move || {
        if addr >= end {
            return None;
        }
        let first = index(addr, 3);
        let len = ((end - addr) / PAGE_SIZE).min(ENTRIES - first as u64);
        let chunk = (addr, first, len as usize);
        addr += len * PAGE_SIZE;
        Some(chunk)
    })
}

/// Upper entries neither gain nor are refused anything: the rewrites that take
/// rights or mappings away.
const NOTHING_ABOVE: (PageTableFlags, PageTableFlags) =
    (PageTableFlags::empty(), PageTableFlags::empty());

/// Bits no existing upper entry above a leaf with `leaf_flags` may have: for an
/// executable leaf, `NO_EXECUTE` (this crate never takes a right away from an upper
/// entry, and one it did not make may hold it).
pub(super) fn forbidden_above(leaf_flags: PageTableFlags) -> PageTableFlags {
    if leaf_flags.contains(PageTableFlags::NO_EXECUTE) {
        PageTableFlags::empty()
    } else {
        PageTableFlags::NO_EXECUTE
    }
}

/// Bits every upper entry above a leaf with `leaf_flags` must have.
fn upper_bits_for(leaf_flags: PageTableFlags) -> PageTableFlags {
    leaf_flags & (PageTableFlags::WRITABLE | PageTableFlags::USER_ACCESSIBLE)
}

/// Flags for new upper entries above a leaf with `leaf_flags`.
fn upper_flags_for(leaf_flags: PageTableFlags) -> PageTableFlags {
    PageTableFlags::PRESENT
        | PageTableFlags::WRITABLE
        | (leaf_flags & PageTableFlags::USER_ACCESSIBLE)
}

/// Leaves a map may write: zero ones.
const FREE: LeafCheck = LeafCheck {
    mask: u64::MAX,
    want: 0,
    error: |_| Error::AlreadyMapped,
};

/// Leaves that are mapped.
const PRESENT: LeafCheck = LeafCheck {
    mask: PageTableFlags::PRESENT.bits(),
    want: PageTableFlags::PRESENT.bits(),
    error: |_| Error::NotMapped,
};

/// Leaves [`PageTables::detach`] left.
const DETACHED_LEAF: LeafCheck = LeafCheck {
    mask: PageTableFlags::PRESENT.bits() | DETACHED.bits(),
    want: DETACHED.bits(),
    error: |raw| {
        if raw & PageTableFlags::PRESENT.bits() != 0 {
            Error::AlreadyMapped
        } else {
            Error::NotMapped
        }
    },
};

/// Any leaf.
const ANY: LeafCheck = LeafCheck {
    mask: 0,
    want: 0,
    error: |_| Error::NotMapped,
};

/// The frame a 4 KiB leaf entry points to.
fn frame_of(raw: u64) -> PhysFrame {
    // SAFETY: masking with `ADDR_MASK` leaves a 4 KiB-aligned address below 2^52.
    unsafe { PhysFrame::from_start_address_unchecked(PhysAddr::new_truncate(raw & ADDR_MASK)) }
}

/// The 4 KiB page at canonical address `addr`.
fn page_at(addr: u64) -> Page {
    // SAFETY: callers pass page-aligned canonical addresses from a checked range.
    unsafe { Page::from_start_address_unchecked(VirtAddr::new_truncate(addr)) }
}

/// What the leaf entry `raw` at `level` says about `addr`.
fn leaf_translation(
    addr: u64,
    raw: u64,
    level: usize,
    flags: PageTableFlags,
) -> (PhysAddr, PageTableFlags, MappedFrame) {
    let offset_mask = entry_span(level) - 1;
    // Bit 12 of a huge entry is PAT, not address.
    let base = PhysAddr::new(raw & ADDR_MASK & !offset_mask);
    let frame = match level {
        1 => MappedFrame::Size1GiB(PhysFrame::<Size1GiB>::containing_address(base)),
        2 => MappedFrame::Size2MiB(PhysFrame::<Size2MiB>::containing_address(base)),
        _ => MappedFrame::Size4KiB(PhysFrame::<Size4KiB>::containing_address(base)),
    };
    (base + (addr & offset_mask), flags, frame)
}
