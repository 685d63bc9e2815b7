//! What the guarded pool tells the kernel: a page fault in the pool explained
//! ([`KernelHeap::diagnose_fault`]), and the problems found at a free
//! ([`GuardedReport`], through the report hook).

use super::pool::{Changed, Slot, State};
use super::site::CallSite;
use super::{KernelHeap, PAGE};
use crate::vmalloc::diagnose::access;
use core::fmt;
use x86_64::VirtAddr;
use x86_64::structures::idt::PageFaultErrorCode;

/// A heap object of the guarded pool, as a report names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuardedObject {
    /// Its first byte.
    pub addr: usize,
    /// Its size in bytes, as allocated.
    pub size: usize,
    /// Its slot in the pool.
    pub slot: usize,
    /// Where it was allocated.
    pub alloc: CallSite,
    /// Where it was freed, if it was.
    pub free: Option<CallSite>,
}

impl GuardedObject {
    fn from_slot(index: usize, slot: &Slot) -> Self {
        Self {
            addr: slot.addr,
            size: slot.size,
            slot: index,
            alloc: slot.alloc,
            free: (slot.state == State::Freed).then_some(slot.free),
        }
    }
}

impl fmt::Display for GuardedObject {
    /// `a 24-byte heap object (at 0x.., allocated on CPU 0 at .., freed ..)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "a {}-byte heap object (at {:#x}, allocated {}",
            self.size, self.addr, self.alloc
        )?;
        if let Some(free) = &self.free {
            write!(f, ", freed {free}")?;
        }
        write!(f, ")")
    }
}

/// What a page fault in the guarded pool hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuardedFault {
    /// A guard page past the end of `object`: `distance` bytes past its last byte
    /// (0 for the first byte after it).
    PastEnd {
        /// The object.
        object: GuardedObject,
        /// Bytes past its end.
        distance: usize,
    },
    /// A guard page before `object`: `distance` bytes before its first byte (1 for
    /// the byte just before it).
    BeforeStart {
        /// The object.
        object: GuardedObject,
        /// Bytes before its start.
        distance: usize,
    },
    /// The unmapped page of a freed object.
    UseAfterFree {
        /// The object, with where it was freed.
        object: GuardedObject,
        /// Bytes from its first byte (negative before it).
        offset: isize,
    },
    /// The page of a live `object`, which is mapped: an access its rights refuse (an
    /// instruction fetch, the page being non-executable, or a user-mode access).
    InLiveObject {
        /// The object.
        object: GuardedObject,
        /// Bytes from its first byte (negative before it, in the page's slack).
        offset: isize,
    },
    /// In the pool, but near no object (a slot never used, or being set up).
    NoObject,
    /// The pool's records were busy for longer than a fault handler waits.
    Busy,
}

/// A page fault in the guarded pool explained; its `Display` is the line an oops
/// prints. See [`KernelHeap::diagnose_fault`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeapFaultDiagnosis {
    /// The faulting address (CR2).
    pub addr: VirtAddr,
    /// The page-fault error code.
    pub code: PageFaultErrorCode,
    /// What the address is.
    pub fault: GuardedFault,
}

impl fmt::Display for HeapFaultDiagnosis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let access = access(self.code);
        let addr = self.addr.as_u64();
        match &self.fault {
            GuardedFault::PastEnd { object, distance } => write!(
                f,
                "out-of-bounds {access} past the end of {object} at {addr:#x}, {distance} \
                 bytes past it: guarded pool"
            ),
            GuardedFault::BeforeStart { object, distance } => write!(
                f,
                "out-of-bounds {access} before the start of {object} at {addr:#x}, \
                 {distance} bytes before it: guarded pool"
            ),
            GuardedFault::UseAfterFree { object, offset } => write!(
                f,
                "use after free: {access} of {object} at {addr:#x} (offset {offset}): \
                 guarded pool"
            ),
            GuardedFault::InLiveObject { object, offset } => write!(
                f,
                "{access} of {object} at {addr:#x} (offset {offset}), which is live: \
                 guarded pool"
            ),
            GuardedFault::NoObject => write!(
                f,
                "{access} at {addr:#x}: in the heap's guarded pool, near no object"
            ),
            GuardedFault::Busy => write!(
                f,
                "{access} at {addr:#x}: in the heap's guarded pool, which was busy (not \
                 looked up)"
            ),
        }
    }
}

/// What the pool found wrong at a free.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportKind {
    /// Bytes of the object's page outside the object (its slack) were changed: an
    /// overrun or underrun too small to reach a guard page, or a stray write.
    Corrupted {
        /// How many bytes differ from the pattern.
        bytes: usize,
        /// The first and the last of them.
        first: usize,
        /// The last changed byte.
        last: usize,
    },
    /// The object was freed already.
    DoubleFree,
    /// The pointer starts no object of the pool (it is inside one, in a guard page,
    /// or in a slot with no object).
    InvalidFree,
}

/// A problem the guarded pool found outside a page fault, handed to the kernel's
/// report hook ([`KernelHeap::set_report_hook`]); its `Display` is the line to print.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuardedReport {
    /// What is wrong.
    pub kind: ReportKind,
    /// The pointer given to `dealloc`.
    pub ptr: usize,
    /// The object concerned, if there is one.
    pub object: Option<GuardedObject>,
    /// Where the `dealloc` that found it was called.
    pub site: CallSite,
}

impl GuardedReport {
    /// A free of `ptr` that started no live object; `found` is the slot `ptr` is in.
    pub(super) fn bad_free(ptr: usize, site: CallSite, found: Option<(usize, Slot)>) -> Self {
        let object = found
            .filter(|(_, slot)| slot.has_object())
            .map(|(index, slot)| GuardedObject::from_slot(index, &slot));
        let double = object.is_some_and(|object| object.addr == ptr && object.free.is_some());
        Self {
            kind: if double {
                ReportKind::DoubleFree
            } else {
                ReportKind::InvalidFree
            },
            ptr,
            object,
            site,
        }
    }

    /// The slack of the object in slot `index` (freed now) was `changed`.
    pub(super) fn corrupted(index: usize, slot: &Slot, changed: Changed) -> Self {
        Self {
            kind: ReportKind::Corrupted {
                bytes: changed.bytes,
                first: changed.first,
                last: changed.last,
            },
            ptr: slot.addr,
            object: Some(GuardedObject::from_slot(index, slot)),
            site: slot.free,
        }
    }
}

impl fmt::Display for GuardedReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.kind, &self.object) {
            (ReportKind::Corrupted { bytes, first, last }, Some(object)) => {
                let end = object.addr + object.size;
                let unit = if bytes == 1 { "byte" } else { "bytes" };
                write!(f, "corrupted memory: {bytes} {unit} of the slack ")?;
                // Distances as the fault diagnoses give them, the nearest first: 0
                // for the first byte past the end, 1 for the last before the start.
                let span = |f: &mut fmt::Formatter<'_>, near: usize, far: usize| {
                    if near == far {
                        write!(f, "{near}")
                    } else {
                        write!(f, "{near} to {far}")
                    }
                };
                if first >= end {
                    write!(f, "past the end, ")?;
                    span(f, first - end, last - end)?;
                    write!(f, " bytes past it")?;
                } else if last < object.addr {
                    write!(f, "before the start, ")?;
                    span(f, object.addr - last, object.addr - first)?;
                    write!(f, " bytes before it")?;
                } else {
                    write!(f, "around it")?;
                }
                write!(f, " ({first:#x}..={last:#x}), of {object}: guarded pool")
            }
            (ReportKind::DoubleFree, Some(object)) => {
                write!(f, "double free of {object}, freed again {}", self.site)
            }
            (_, Some(object)) => {
                let inside = self.ptr.wrapping_sub(object.addr) < object.size;
                let place = if inside { "inside" } else { "in the page of" };
                write!(
                    f,
                    "invalid free of {:#x} {}: {place} {object}",
                    self.ptr, self.site
                )
            }
            (_, None) => write!(
                f,
                "invalid free of {:#x} {}: no object of the guarded pool there",
                self.ptr, self.site
            ),
        }
    }
}

impl KernelHeap<'_> {
    /// What the faulting address `addr` is to the heap's guarded pool, with the
    /// fault's error `code`: `None` if it is not in the pool (ask the manager's
    /// [`diagnose_fault`](crate::vmalloc::Vmalloc::diagnose_fault) then). A fault on
    /// a guard page is charged to the nearer of the objects on either side; one on a
    /// freed object's page is a use after free. Callable from a page-fault handler: it
    /// allocates nothing, and waits for the pool's lock a bounded time only (serving
    /// shootdowns meanwhile), answering [`GuardedFault::Busy`] past it.
    pub fn diagnose_fault(
        &self,
        addr: VirtAddr,
        code: PageFaultErrorCode,
    ) -> Option<HeapFaultDiagnosis> {
        let pool = self.guarded.ready()?;
        let offset = addr.as_u64().wrapping_sub(pool.area as u64) as usize;
        if offset >= pool.len() {
            return None;
        }
        let vmalloc = self.backing.get()?.vmalloc;
        let page = offset / PAGE;
        let fault = match pool.try_lock(vmalloc) {
            None => GuardedFault::Busy,
            Some(records) => {
                // Slots on either side of a guard page; the slot itself for its page.
                let (left, right) = if page % 2 == 1 {
                    (Some(page / 2), None)
                } else {
                    (page.checked_sub(1).map(|page| page / 2), Some(page / 2))
                };
                let near = |index: Option<usize>| {
                    let index = index?;
                    let slot = records.slot(index)?;
                    slot.has_object().then_some((index, *slot))
                };
                explain(
                    addr.as_u64() as usize,
                    page % 2 == 1,
                    near(left),
                    near(right),
                )
            }
        };
        Some(HeapFaultDiagnosis { addr, code, fault })
    }
}

/// What an access at `addr` hit: its own slot's page (`in_slot`, the slot is
/// `left`), or a guard page between `left` and `right`.
fn explain(
    addr: usize,
    in_slot: bool,
    left: Option<(usize, Slot)>,
    right: Option<(usize, Slot)>,
) -> GuardedFault {
    if in_slot {
        return match left {
            Some((index, slot)) => {
                let object = GuardedObject::from_slot(index, &slot);
                let offset = addr.wrapping_sub(slot.addr) as isize;
                match slot.state {
                    State::Freed => GuardedFault::UseAfterFree { object, offset },
                    _ => GuardedFault::InLiveObject { object, offset },
                }
            }
            None => GuardedFault::NoObject,
        };
    }
    let past = left.map(|(index, slot)| {
        let distance = addr.saturating_sub(slot.addr + slot.size);
        (distance, index, slot)
    });
    let before = right.map(|(index, slot)| {
        let distance = slot.addr.saturating_sub(addr);
        (distance, index, slot)
    });
    // The nearer object; on a tie, the live one.
    let live = |slot: &Slot| slot.state == State::Live;
    let take_before = match (&past, &before) {
        (Some((p, _, ps)), Some((b, _, bs))) => b < p || (b == p && live(bs) && !live(ps)),
        (None, Some(_)) => true,
        _ => false,
    };
    match (take_before, past, before) {
        (true, _, Some((distance, index, slot))) => GuardedFault::BeforeStart {
            object: GuardedObject::from_slot(index, &slot),
            distance,
        },
        (false, Some((distance, index, slot)), _) => GuardedFault::PastEnd {
            object: GuardedObject::from_slot(index, &slot),
            distance,
        },
        _ => GuardedFault::NoObject,
    }
}
