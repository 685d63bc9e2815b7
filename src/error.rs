use core::fmt;

/// Everything that can go wrong in this crate.
///
/// Every fallible operation either succeeds or returns one of these and leaves the
/// state it was called on exactly as it found it: no frame, page-table entry, area or
/// bookkeeping slab is kept from a failed call. (A call that runs short of frames or
/// virtual space may first purge the areas waiting for the batched TLB flush, which
/// gives frames back; that is the lazy free completing early, not a change.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Error {
    /// A size of zero was requested.
    ZeroSize,
    /// The size does not fit the region, or rounding it up overflows.
    SizeTooLarge,
    /// An alignment that is not a power of two, or larger than the region.
    BadAlignment,
    /// An address or size that must be page-aligned is not.
    Unaligned,
    /// A null pointer was passed.
    NullPointer,
    /// An address outside the 48-bit canonical forms.
    NonCanonical,
    /// A range whose end wraps around the address space.
    RangeWraps,
    /// A pointer outside the managed virtual region.
    NotInRegion,
    /// A pointer inside a live area but not at its start.
    InteriorPointer,
    /// A pointer that does not start a live area: never allocated, or already freed.
    NotAllocated,
    /// The area exists but was made by another call (`vfree` of a `vmap` area, ...).
    WrongKind,
    /// Writable and executable at once was asked for (W^X).
    WriteExecute,
    /// No physical frame is left (for data, page tables or bookkeeping).
    OutOfFrames,
    /// No free virtual range of that size and alignment is left in the region.
    OutOfVirtualSpace,
    /// A frame outside the memory the frame allocator manages.
    FrameNotManaged,
    /// A frame freed that is not allocated (a double free).
    FrameNotAllocated,
    /// The memory map holds no usable memory, or the bookkeeping does not fit.
    BadMemoryMap,
    /// A page that should be unmapped is already mapped.
    AlreadyMapped,
    /// A page that should be mapped is not.
    NotMapped,
    /// A huge (2 MiB or 1 GiB) entry covers part of the range.
    HugePageInTheWay,
    /// Fewer or more frames were given than the range has pages.
    FrameCountMismatch,
    /// A range overlaps one already in use.
    Overlap,
    /// A physical range holding RAM the frame allocator manages was given where only
    /// memory outside it may go (`ioremap` of RAM, as Linux refuses it).
    ManagedRam,
    /// The call cannot complete without waiting, and may not wait (`vfree_atomic`
    /// with its queue full).
    WouldBlock,
    /// The object serves another manager (a `StackCache` bound to another `Vmalloc`).
    WrongManager,
    /// An executable page was asked for below an upper page-table entry with
    /// `NO_EXECUTE` (a table this crate did not make), which no leaf overrides.
    NoExecuteAbove,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = match self {
            Error::ZeroSize => "size is zero",
            Error::SizeTooLarge => "size too large",
            Error::BadAlignment => "alignment is not a power of two or is too large",
            Error::Unaligned => "address or size not page-aligned",
            Error::NullPointer => "null pointer",
            Error::NonCanonical => "non-canonical virtual address",
            Error::RangeWraps => "range wraps around the address space",
            Error::NotInRegion => "pointer outside the vmalloc region",
            Error::InteriorPointer => "pointer inside an area, not at its start",
            Error::NotAllocated => "no live area starts at this pointer",
            Error::WrongKind => "area was not made by the matching call",
            Error::WriteExecute => "writable and executable at once",
            Error::OutOfFrames => "out of physical frames",
            Error::OutOfVirtualSpace => "out of virtual address space",
            Error::FrameNotManaged => "frame not managed by this allocator",
            Error::FrameNotAllocated => "frame is not allocated (double free)",
            Error::BadMemoryMap => "memory map has no usable memory for the bookkeeping",
            Error::AlreadyMapped => "page already mapped",
            Error::NotMapped => "page not mapped",
            Error::HugePageInTheWay => "a huge page entry covers part of the range",
            Error::FrameCountMismatch => "frame count does not match the page count",
            Error::Overlap => "range overlaps one in use",
            Error::WouldBlock => "would have to wait",
            Error::WrongManager => "serves another manager",
            Error::NoExecuteAbove => "an upper page-table entry forbids execution",
            Error::ManagedRam => "physical range holds RAM the frame allocator manages",
        };
        f.write_str(text)
    }
}

impl core::error::Error for Error {}
