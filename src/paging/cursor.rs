//! The cursor: a cached path from the PML4 to the current leaf table, and the table
//! stock that map calls take their new tables from. See the module doc of
//! [`paging`](super) for why.

use crate::{Error, FrameSource, PhysMemory};
use core::ptr;
use core::sync::atomic::{Ordering, compiler_fence};
use x86_64::PhysAddr;
use x86_64::structures::paging::page_table::PageTableEntry;
use x86_64::structures::paging::{PageTable, PageTableFlags, PhysFrame};

/// Bit position of the lowest address bit each level's index selects: PML4, PDPT, PD, PT.
const SHIFTS: [u32; 4] = [39, 30, 21, 12];
/// Entries per table.
pub(super) const ENTRIES: u64 = 512;
/// A key no canonical address shifts to.
const NO_KEY: u64 = u64::MAX;

/// Index of `addr` in the table at `level` (0 = PML4 ... 3 = PT).
pub(super) const fn index(addr: u64, level: usize) -> usize {
    ((addr >> SHIFTS[level]) & (ENTRIES - 1)) as usize
}

/// Bytes one entry at `level` covers (0 = PML4 ... 3 = PT).
pub(super) const fn entry_span(level: usize) -> u64 {
    1 << SHIFTS[level]
}

/// The page table in frame `phys`.
pub(super) fn table_at<M: PhysMemory>(phys: &M, frame: PhysAddr) -> *mut PageTable {
    phys.phys_to_virt(frame).cast()
}

/// Entry `index` of `table`, as a raw pointer: tables may be shared between paths
/// (recursive mappings), so the walk never holds references to two of them at once.
pub(super) fn entry_at(table: *mut PageTable, index: usize) -> *mut PageTableEntry {
    // `PageTable` is `repr(align(4096))` over `[PageTableEntry; 512]`; `index < 512`.
    table.cast::<PageTableEntry>().wrapping_add(index)
}

/// Reads an entry's raw value.
///
/// # Safety
///
/// `entry` points into a page table reachable through the walk's `PhysMemory`.
pub(super) unsafe fn read(entry: *const PageTableEntry) -> u64 {
    // SAFETY: per the caller; `PageTableEntry` is `repr(transparent)` over `u64`.
    unsafe { ptr::read(entry.cast::<u64>()) }
}

/// The raw entries `[first, first + count)` of the leaf table `table`. Leaf loops
/// work on raw `u64`s so that they compile to plain (vectorised) loads and stores.
///
/// # Safety
///
/// `table` is a page table reachable through the walk's `PhysMemory`, no other
/// reference to it is alive while the slice is, and `first + count <= 512`.
pub(super) unsafe fn leaf_entries<'t>(
    table: *mut PageTable,
    first: usize,
    count: usize,
) -> &'t mut [u64] {
    // SAFETY: per the caller; `PageTableEntry` is `repr(transparent)` over `u64`.
    unsafe { core::slice::from_raw_parts_mut(entry_at(table, first).cast(), count) }
}

/// What every leaf of a range must look like before a call changes any:
/// `leaf & mask == want`.
pub(super) struct LeafCheck {
    pub(super) mask: u64,
    pub(super) want: u64,
    /// The error for a leaf that fails the check.
    pub(super) error: fn(u64) -> Error,
}

impl LeafCheck {
    /// Checks `leaves` without branching per entry; finds the culprit only on failure.
    #[inline]
    pub(super) fn check(&self, leaves: &[u64]) -> Result<(), Error> {
        let wrong = leaves
            .iter()
            .fold(0, |acc, &raw| acc | ((raw & self.mask) ^ self.want));
        if wrong == 0 {
            return Ok(());
        }
        let culprit = leaves.iter().find(|&&raw| raw & self.mask != self.want);
        Err((self.error)(culprit.copied().unwrap_or_default()))
    }
}

/// What a descent does at an upper-level entry that does not lead to a table.
pub(super) trait Descend {
    /// The error for a non-zero entry that is neither a table nor a huge page.
    const ODD_ENTRY: Error;

    /// A zero entry (`Some`), or any entry below a table that does not exist yet
    /// (`None`). Returns the table to continue with; null for "does not exist yet".
    fn missing(&mut self, entry: Option<*mut PageTableEntry>) -> Result<*mut PageTable, Error>;

    /// A present entry leading to a table.
    fn present(&mut self, _entry: *mut PageTableEntry) {}
}

/// The cursor: the tables on the path to the current leaf table, each with the
/// address prefix it was looked up for, so moving on within the same table costs
/// nothing and crossing a boundary re-reads only the levels that changed.
pub(super) struct Cursor<'p, M: PhysMemory> {
    phys: &'p M,
    root: *mut PageTable,
    /// PDPT, PD, PT on the current path; null for a table that does not exist yet.
    tables: [*mut PageTable; 3],
    /// `addr >> SHIFTS[depth]` of the address each of `tables` was found for.
    keys: [u64; 3],
}

impl<'p, M: PhysMemory> Cursor<'p, M> {
    /// A cursor with an empty path below `root`.
    pub(super) fn new(phys: &'p M, root: PhysFrame) -> Self {
        Self {
            phys,
            root: table_at(phys, root.start_address()),
            tables: [ptr::null_mut(); 3],
            keys: [NO_KEY; 3],
        }
    }

    /// The table at `depth` below the root (0 = PDPT, 1 = PD, 2 = PT) on the path to
    /// `addr`, descending only where the cached path does not already lead there.
    ///
    /// # Safety
    ///
    /// The tables below the root are valid page tables reachable through `phys`.
    #[inline]
    pub(super) unsafe fn table<D: Descend>(
        &mut self,
        addr: u64,
        depth: usize,
        descend: &mut D,
    ) -> Result<*mut PageTable, Error> {
        for (level, shift) in SHIFTS.iter().enumerate().take(depth + 1) {
            // Keys are address prefixes: a level whose key still matches is skipped,
            // and a change at one level changes the keys of every level below it.
            let key = addr >> shift;
            if self.keys[level] == key {
                continue;
            }
            let parent = if level == 0 {
                self.root
            } else {
                self.tables[level - 1]
            };
            // SAFETY: `parent` is the root or a table found by this walk.
            let table = unsafe { self.step(parent, index(addr, level), descend) }?;
            self.tables[level] = table;
            self.keys[level] = key;
        }
        Ok(self.tables[depth])
    }

    /// Follows entry `index` of `parent` (null: a table that does not exist yet).
    ///
    /// # Safety
    ///
    /// `parent` is null or a page table reachable through `phys`.
    #[inline]
    unsafe fn step<D: Descend>(
        &self,
        parent: *mut PageTable,
        index: usize,
        descend: &mut D,
    ) -> Result<*mut PageTable, Error> {
        if parent.is_null() {
            return descend.missing(None);
        }
        let entry = entry_at(parent, index);
        // SAFETY: `entry` lies in `parent`, a reachable table.
        let raw = unsafe { read(entry) };
        let flags = PageTableFlags::from_bits_retain(raw);
        if raw == 0 {
            descend.missing(Some(entry))
        } else if !flags.contains(PageTableFlags::PRESENT) {
            Err(D::ODD_ENTRY)
        } else if flags.contains(PageTableFlags::HUGE_PAGE) {
            Err(Error::HugePageInTheWay)
        } else {
            descend.present(entry);
            // SAFETY: as above.
            let next = unsafe { (*entry).addr() };
            Ok(table_at(self.phys, next))
        }
    }
}

/// Walks only existing tables: a missing one means the address is not mapped.
pub(super) struct Existing {
    /// Bits OR-ed into every upper entry passed on the way (for a leaf that needs
    /// them: `WRITABLE`, `USER_ACCESSIBLE`); empty for read-only walks.
    pub(super) upper_bits: PageTableFlags,
    /// Bits no upper entry on the way may have (`NO_EXECUTE` above an executable
    /// leaf, which this crate never takes away); `forbidden_seen` says one had.
    pub(super) forbidden: PageTableFlags,
    pub(super) forbidden_seen: bool,
}

impl Existing {
    /// A walk that ORs `upper_bits` into the upper entries it passes.
    pub(super) const fn adding(upper_bits: PageTableFlags) -> Self {
        Self {
            upper_bits,
            forbidden: PageTableFlags::empty(),
            forbidden_seen: false,
        }
    }
}

impl Descend for Existing {
    const ODD_ENTRY: Error = Error::NotMapped;

    fn missing(&mut self, _: Option<*mut PageTableEntry>) -> Result<*mut PageTable, Error> {
        Err(Error::NotMapped)
    }

    #[inline]
    fn present(&mut self, entry: *mut PageTableEntry) {
        if !self.forbidden.is_empty() {
            // SAFETY: `entry` is a present upper entry of a reachable table.
            let flags = unsafe { (*entry).flags() };
            self.forbidden_seen |= flags.intersects(self.forbidden);
        }
        if !self.upper_bits.is_empty() {
            add_upper_bits(entry, self.upper_bits);
        }
    }
}

/// ORs `bits` into the upper entry `entry` if it lacks any of them.
#[inline]
fn add_upper_bits(entry: *mut PageTableEntry, bits: PageTableFlags) {
    // SAFETY: `entry` is a present upper entry of a reachable table, handed to
    // `Descend::present` by `Cursor::step`; no reference to it is alive.
    let entry = unsafe { &mut *entry };
    if !entry.flags().contains(bits) {
        entry.set_flags(entry.flags() | bits);
    }
}

/// The read-only first pass of a map: counts the tables the map will need, and
/// treats every table below a missing one as missing too.
pub(super) struct CountMissing {
    pub(super) tables: usize,
    /// Bits the map will want in every upper entry on the way.
    pub(super) upper_bits: PageTableFlags,
    /// Whether some existing upper entry lacks some of `upper_bits`.
    pub(super) lacking: bool,
    /// Bits no existing upper entry may have (see [`Existing::forbidden`]), and
    /// whether one had.
    pub(super) forbidden: PageTableFlags,
    pub(super) forbidden_seen: bool,
}

impl Descend for CountMissing {
    const ODD_ENTRY: Error = Error::AlreadyMapped;

    fn missing(&mut self, _: Option<*mut PageTableEntry>) -> Result<*mut PageTable, Error> {
        self.tables += 1;
        Ok(ptr::null_mut())
    }

    #[inline]
    fn present(&mut self, entry: *mut PageTableEntry) {
        // SAFETY: `entry` is a present upper entry of a reachable table.
        let flags = unsafe { (*entry).flags() };
        self.lacking |= !flags.contains(self.upper_bits);
        self.forbidden_seen |= flags.intersects(self.forbidden);
    }
}

/// The writing pass of a map: installs tables from a stock filled beforehand.
pub(super) struct Install<'s, 'p, M: PhysMemory> {
    pub(super) stock: &'s mut TableStock<'p, M>,
    /// Flags for new upper entries.
    pub(super) upper_flags: PageTableFlags,
    /// Bits OR-ed into existing upper entries that lack them (see [`Existing`]).
    pub(super) upper_bits: PageTableFlags,
}

impl<M: PhysMemory> Descend for Install<'_, '_, M> {
    const ODD_ENTRY: Error = Error::AlreadyMapped;

    fn missing(&mut self, entry: Option<*mut PageTableEntry>) -> Result<*mut PageTable, Error> {
        // The counting pass saw the same tables, so the stock holds enough and
        // every missing entry has a parent by now.
        let (Some(entry), Some(frame)) = (entry, self.stock.pop()) else {
            return Err(Error::OutOfFrames);
        };
        let table = table_at(self.stock.phys, frame.start_address());
        // SAFETY: `frame` came from the table source and is ours alone until the
        // entry below publishes it.
        unsafe { (*table).zero() };
        // The hardware walker may follow the entry the moment it is written: the
        // table must be zero before that.
        compiler_fence(Ordering::Release);
        // SAFETY: `entry` is a zero upper entry of a reachable table.
        unsafe { (*entry).set_frame(frame, self.upper_flags | super::CREATED) };
        Ok(table)
    }

    fn present(&mut self, entry: *mut PageTableEntry) {
        if !self.upper_bits.is_empty() {
            add_upper_bits(entry, self.upper_bits);
        }
    }
}

/// Frames for new page tables, taken before a map writes anything so that running
/// out of frames leaves the tables untouched. The stock needs no memory of its own:
/// each frame holds the address of the next in its first eight bytes.
pub(super) struct TableStock<'p, M: PhysMemory> {
    phys: &'p M,
    head: Option<PhysFrame>,
}

impl<'p, M: PhysMemory> TableStock<'p, M> {
    /// `count` frames from `source`, or none of them and [`Error::OutOfFrames`].
    pub(super) fn take(
        phys: &'p M,
        source: &impl FrameSource,
        count: usize,
    ) -> Result<Self, Error> {
        let mut stock = Self { phys, head: None };
        for _ in 0..count {
            match source.alloc_frame() {
                Some(frame) => stock.push(frame),
                None => {
                    stock.give_back(source);
                    return Err(Error::OutOfFrames);
                }
            }
        }
        Ok(stock)
    }

    fn push(&mut self, frame: PhysFrame) {
        let next = self.head.map_or(u64::MAX, |f| f.start_address().as_u64());
        let slot = self.phys.phys_to_virt(frame.start_address()).cast::<u64>();
        // SAFETY: `frame` was just handed to us by the frame source and is reachable
        // through `phys` (its contract); nothing else uses it.
        unsafe { slot.write(next) };
        self.head = Some(frame);
    }

    fn pop(&mut self) -> Option<PhysFrame> {
        let frame = self.head?;
        let slot = self.phys.phys_to_virt(frame.start_address()).cast::<u64>();
        // SAFETY: `frame` is in the stock, so `push` wrote its first word.
        let next = unsafe { slot.read() };
        self.head = (next != u64::MAX).then(|| PhysFrame::containing_address(PhysAddr::new(next)));
        Some(frame)
    }

    /// Returns every frame still in the stock to `source`.
    pub(super) fn give_back(&mut self, source: &impl FrameSource) {
        while let Some(frame) = self.pop() {
            // The frame came from `source` a moment ago; a source refusing it back
            // has nothing better to be told.
            // SAFETY: a table frame the stock took and never used.
            let _ = unsafe { source.free_frame(frame) };
        }
    }
}
