//! What the manager records about each area, and how it shows it.

use super::options::{VmFlags, VmOptions};
use crate::PAGE_SIZE;
use core::fmt;
use core::panic::Location;
use x86_64::structures::paging::PageTableFlags;
use x86_64::{PhysAddr, VirtAddr};

/// Which call made an area; only the matching call may free it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AreaKind {
    /// `vmalloc`/`vzalloc`: frames from the frame allocator, returned on `vfree`.
    Vmalloc,
    /// `vmap`: frames owned by the caller, handed back on `vunmap`.
    Vmap,
    /// `ioremap`: a physical MMIO range, never backed by the frame allocator.
    Ioremap,
    /// `reserve`: a virtual window populated page by page (the kernel heap's).
    Reserved,
    /// `alloc_stack`: a kernel stack, with an unmapped guard below it.
    Stack,
}

impl AreaKind {
    /// The word `/proc/vmallocinfo` prints for this kind.
    pub const fn name(self) -> &'static str {
        match self {
            AreaKind::Vmalloc => "vmalloc",
            AreaKind::Vmap => "vmap",
            AreaKind::Ioremap => "ioremap",
            AreaKind::Reserved => "reserved",
            AreaKind::Stack => "stack",
        }
    }

    /// Whether the frames behind the area belong to the frame allocator.
    pub(crate) const fn owns_frames(self) -> bool {
        matches!(
            self,
            AreaKind::Vmalloc | AreaKind::Reserved | AreaKind::Stack
        )
    }
}

/// The manager's record of one area, kept in the area map while it lives and on
/// the purge list after it is freed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AreaRecord {
    pub kind: AreaKind,
    /// Unmapped pages at the start of the area, before the mapped ones (a stack's
    /// guard below); 0 for every other kind.
    pub lead: u64,
    /// Pages mapped after the lead (for `Reserved`: populated so far).
    pub mapped_pages: u64,
    /// How many 2 MiB mappings back the area (see `VmFlags::HUGE`); the rest of its
    /// pages are 4 KiB ones.
    pub huge_mappings: u64,
    /// Usable size in bytes, whole pages (excludes the guard page).
    pub size: u64,
    /// Bytes the caller asked for (`vmalloc`, the last `vrealloc`): a zeroed area
    /// zeroes what a shrink drops past it, so growing again shows zeros.
    pub bytes: u64,
    /// Being unmapped by `vunmap`, which hands its frames back outside the lock: no
    /// call may find it any more.
    pub dying: bool,
    /// Whether one unmapped guard page follows the area.
    pub guard: bool,
    /// Leaf flags the area is mapped with.
    pub flags: PageTableFlags,
    /// For `Ioremap`: the physical address `ioremap` was given, which the pointer
    /// it returned maps (its offset in the page is the pointer's, not the area's
    /// page-aligned start's).
    pub phys: PhysAddr,
    /// Alignment the area was made with, kept for moves by `vrealloc`.
    pub align: u64,
    /// Whether memory added later (by `vrealloc` or `populate`) must be zeroed.
    pub zeroed: bool,
    /// Caller-supplied label for listings.
    pub tag: &'static str,
    /// Where the call that made the area was made (`#[track_caller]`).
    pub caller: &'static Location<'static>,
    /// Pages are mapped one at a time, anywhere in the area (`reserve_sparse`):
    /// `mapped_pages` counts them and says nothing of where they are.
    pub sparse: bool,
}

impl AreaRecord {
    #[track_caller]
    pub fn new(kind: AreaKind, bytes: u64, flags: PageTableFlags, options: &VmOptions) -> Self {
        let pages = bytes.div_ceil(PAGE_SIZE);
        Self {
            kind,
            lead: 0,
            mapped_pages: pages,
            huge_mappings: 0,
            size: pages * PAGE_SIZE,
            bytes,
            dying: false,
            guard: !options.flags.contains(VmFlags::NO_GUARD),
            flags,
            phys: PhysAddr::zero(),
            align: options.align.max(PAGE_SIZE),
            zeroed: options.flags.contains(VmFlags::ZERO),
            tag: options.tag,
            caller: Location::caller(),
            sparse: false,
        }
    }

    /// The pages, from the area's start, that may hold frames: the mapped run after
    /// the lead, or every page of a sparse area.
    pub fn frame_pages(&self) -> core::ops::Range<u64> {
        if self.sparse {
            0..self.size / PAGE_SIZE
        } else {
            self.lead..self.lead + self.mapped_pages
        }
    }

    /// Virtual bytes the area takes, guard pages included.
    pub fn span(&self) -> u64 {
        self.span_for(self.size / PAGE_SIZE)
    }

    /// Virtual bytes the area would take with `pages` pages.
    pub fn span_for(&self, pages: u64) -> u64 {
        (self.lead + pages + u64::from(self.guard)) * PAGE_SIZE
    }
}

/// One live area, as [`Vmalloc::areas`](super::Vmalloc::areas) shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AreaInfo {
    /// First byte of the area (page-aligned; `ioremap` pointers add the offset).
    pub start: VirtAddr,
    /// Virtual bytes the area takes, guard page included, as `/proc/vmallocinfo` shows.
    pub span: u64,
    /// Usable bytes.
    pub size: u64,
    /// Pages mapped, in 4 KiB pages.
    pub pages: u64,
    /// How many 2 MiB mappings back the area ([`VmFlags::HUGE`]); its other pages
    /// are mapped 4 KiB at a time.
    pub huge_mappings: u64,
    /// Which call made it.
    pub kind: AreaKind,
    /// The physical address an `ioremap` area was made for: the one the pointer
    /// `ioremap` returned maps (not page-aligned when that pointer is not).
    pub phys: Option<PhysAddr>,
    /// Unmapped bytes before the mapped ones (a stack's guard below).
    pub lead: u64,
    /// The caller's label.
    pub tag: &'static str,
    /// Where the call that made the area was made, as `/proc/vmallocinfo` names the
    /// caller.
    pub caller: Option<&'static Location<'static>>,
}

impl AreaInfo {
    pub(crate) fn new(start: VirtAddr, span: u64, record: &AreaRecord) -> Self {
        Self {
            start,
            span,
            size: record.size,
            pages: record.mapped_pages,
            huge_mappings: record.huge_mappings,
            kind: record.kind,
            phys: (record.kind == AreaKind::Ioremap).then_some(record.phys),
            lead: record.lead * PAGE_SIZE,
            tag: record.tag,
            caller: Some(record.caller),
        }
    }
}

impl fmt::Display for AreaInfo {
    /// One line in the style of `/proc/vmallocinfo`:
    /// `0xffffc90000000000-0xffffc90000005000   20480 tag src/net.rs:88 pages=4 vmalloc`,
    /// with `huge=N` after the pages for an area backed by N 2 MiB mappings.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let end = self.start.as_u64() + self.span;
        write!(
            f,
            "{:#018x}-{:#018x} {:>9}",
            self.start.as_u64(),
            end,
            self.span
        )?;
        if !self.tag.is_empty() {
            write!(f, " {}", self.tag)?;
        }
        if let Some(caller) = self.caller {
            write!(f, " {}:{}", caller.file(), caller.line())?;
        }
        if self.pages > 0 {
            write!(f, " pages={}", self.pages)?;
        }
        if self.huge_mappings > 0 {
            write!(f, " huge={}", self.huge_mappings)?;
        }
        if let Some(phys) = self.phys {
            write!(f, " phys={:#x}", phys.as_u64())?;
        }
        write!(f, " {}", self.kind.name())
    }
}
