//! What a faulting address is: the call a page-fault handler makes before it oopses.
//!
//! A bare address tells a kernel author little; "write past the end of 'net_rx_ring'
//! (16 KiB vmalloc at 0xffffc90000010000, allocated at src/net.rs:88): guard page"
//! tells them where to look. [`Vmalloc::diagnose_fault`] looks the address up among
//! the live areas (a page of one, the guard page after it, or the unmapped memory
//! below a kernel stack: an overflow) and the areas freed whose range is not reused
//! yet (a use after free), with the area's label and the place that
//! allocated it (recorded through `#[track_caller]`).
//!
//! A page-fault handler may have interrupted the manager itself, on this CPU, with its
//! lock held: the lookup only *tries* the lock and reports
//! [`FaultSite::Busy`] rather than wait for a holder that cannot run. It allocates
//! nothing and takes no other lock.

use super::area::{AreaInfo, AreaKind, AreaRecord};
use super::blocks::{BlockSite, Located};
use super::manager::Vmalloc;
use crate::{FrameSource, PAGE_SIZE, PhysMemory, TlbFlush};
use core::fmt;
use x86_64::VirtAddr;
use x86_64::structures::idt::PageFaultErrorCode;
use x86_64::structures::paging::PageTableFlags;

/// What the manager knows about a faulting address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultSite {
    /// A page of a live area, `offset` bytes from its start. `broke_protection` says
    /// whether the access was one the area's protection refuses (a write to read-only
    /// memory, a fetch from no-execute memory); if not, the page is not mapped (a
    /// reserved area not populated that far).
    Area {
        /// The area.
        area: AreaInfo,
        /// Bytes from the area's start.
        offset: u64,
        /// Whether the access broke the area's protection.
        broke_protection: bool,
    },
    /// The unmapped memory below a kernel stack: a stack overflow.
    StackOverflow {
        /// The stack's area.
        area: AreaInfo,
        /// Bytes below the stack's base.
        below: u64,
    },
    /// The unmapped guard page that follows an area: a run off its end.
    Guard {
        /// The area the guard page follows.
        area: AreaInfo,
        /// Bytes past the area's last byte.
        past_end: u64,
    },
    /// An area freed whose range is not reused yet (its guard page included): one
    /// waiting for the purge, or in a per-CPU block until the flush that covers it
    /// lands on the block's owner (a range another CPU freed: until the owner's
    /// next carve takes it back). A use after free.
    Freed {
        /// The area as it was.
        area: AreaInfo,
        /// Bytes from the area's first mapped byte (a stack's base); 0 below it, in
        /// a freed stack's unmapped lower half (the diagnosis's text says how far
        /// below).
        offset: u64,
    },
    /// In the manager's region but in no area: never allocated, or freed and
    /// purged (from the tree, or a per-CPU block's range once it is free in the
    /// block again: see [`Freed`](Self::Freed)).
    Unmapped,
    /// Outside the manager's region.
    Outside,
    /// The manager's lock was held (the fault interrupted a call on this CPU, or
    /// another CPU holds it): nothing was looked up.
    Busy,
}

/// A page fault explained; its `Display` is the line an oops prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultDiagnosis {
    /// The faulting address (CR2).
    pub addr: VirtAddr,
    /// The page-fault error code.
    pub code: PageFaultErrorCode,
    /// What the address is.
    pub site: FaultSite,
}

impl<F, M, T> Vmalloc<F, M, T>
where
    F: FrameSource + Clone,
    M: PhysMemory + Copy,
    T: TlbFlush,
{
    /// What the faulting address `addr` is to this manager, with the fault's error
    /// `code`. Callable from a page-fault handler, even one that interrupted this
    /// manager: it never waits for the lock (see the [module docs](super::diagnose)).
    pub fn diagnose_fault(&self, addr: VirtAddr, code: PageFaultErrorCode) -> FaultDiagnosis {
        FaultDiagnosis {
            addr,
            code,
            site: self.fault_site(addr, code),
        }
    }

    fn fault_site(&self, addr: VirtAddr, code: PageFaultErrorCode) -> FaultSite {
        let config = self.config();
        if addr.as_u64().wrapping_sub(config.start.as_u64()) >= config.size {
            return FaultSite::Outside;
        }
        if let Located::Zone(at) = self.blocks.locate(addr.as_u64()) {
            return match self.block_site(at) {
                None => FaultSite::Unmapped,
                Some((area, site)) => {
                    let info = area.info();
                    let offset = addr - area.start;
                    match site {
                        BlockSite::Freed => FaultSite::Freed { area: info, offset },
                        BlockSite::Guard => FaultSite::Guard {
                            area: info,
                            past_end: offset - info.size,
                        },
                        BlockSite::Live => FaultSite::Area {
                            area: info,
                            offset,
                            broke_protection: refuses(area.flags, code),
                        },
                    }
                }
            };
        }
        let Some(inner) = self.inner.try_lock(&self.tlb) else {
            return FaultSite::Busy;
        };
        if let Some(area) = inner.areas.find_containing(addr) {
            let info = AreaInfo::new(area.start, area.size, &area.data);
            let lead = area.data.lead * PAGE_SIZE;
            if addr - area.start < lead && !area.data.dying {
                return FaultSite::StackOverflow {
                    area: info,
                    below: lead - (addr - area.start),
                };
            }
            // From the first mapped byte (the stack's base for a stack).
            let offset = (addr - area.start).saturating_sub(lead);
            return if area.data.dying {
                FaultSite::Freed { area: info, offset }
            } else if offset < area.data.size {
                FaultSite::Area {
                    area: info,
                    offset,
                    broke_protection: broke_protection(&area.data, code),
                }
            } else {
                FaultSite::Guard {
                    area: info,
                    past_end: offset - area.data.size,
                }
            };
        }
        match inner.purge.find_containing(addr) {
            Some((start, record)) => FaultSite::Freed {
                area: AreaInfo::new(start, record.span(), &record),
                offset: (addr - start).saturating_sub(record.lead * PAGE_SIZE),
            },
            None => FaultSite::Unmapped,
        }
    }
}

/// Whether an access with `code` is one `record`'s protection refuses.
fn broke_protection(record: &AreaRecord, code: PageFaultErrorCode) -> bool {
    refuses(record.flags, code)
}

/// Whether leaf flags `flags` refuse the access `code` describes.
fn refuses(flags: PageTableFlags, code: PageFaultErrorCode) -> bool {
    let write = code.contains(PageFaultErrorCode::CAUSED_BY_WRITE);
    let fetch = code.contains(PageFaultErrorCode::INSTRUCTION_FETCH);
    (write && !flags.contains(PageTableFlags::WRITABLE))
        || (fetch && flags.contains(PageTableFlags::NO_EXECUTE))
}

/// The access: "read", "write" or "instruction fetch".
pub(crate) fn access(code: PageFaultErrorCode) -> &'static str {
    if code.contains(PageFaultErrorCode::INSTRUCTION_FETCH) {
        "instruction fetch"
    } else if code.contains(PageFaultErrorCode::CAUSED_BY_WRITE) {
        "write"
    } else {
        "read"
    }
}

/// `'tag' (16 KiB vmalloc at 0x..., allocated at file:line)`.
struct Described<'a>(&'a AreaInfo);

impl fmt::Display for Described<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let area = self.0;
        if area.tag.is_empty() {
            write!(f, "an area (")?;
        } else {
            write!(f, "'{}' (", area.tag)?;
        }
        let size = area.size;
        if size.is_multiple_of(1024) {
            write!(f, "{} KiB", size / 1024)?;
        } else {
            write!(f, "{size} bytes")?;
        }
        write!(
            f,
            " {} at {:#x}",
            area.kind.name(),
            area.start.as_u64() + area.lead
        )?;
        if let Some(phys) = area.phys {
            write!(f, " of {:#x}", phys.as_u64())?;
        }
        if let Some(caller) = area.caller {
            write!(f, ", allocated at {}:{}", caller.file(), caller.line())?;
        }
        write!(f, ")")
    }
}

impl fmt::Display for FaultDiagnosis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let access = access(self.code);
        let addr = self.addr.as_u64();
        match &self.site {
            FaultSite::Guard { area, past_end } => write!(
                f,
                "{access} past the end of {} at {addr:#x}, {past_end} bytes past it: guard page",
                Described(area)
            ),
            FaultSite::StackOverflow { area, below } => write!(
                f,
                "{access} below {} at {addr:#x}, {below} bytes below its base: stack \
                 overflow",
                Described(area)
            ),
            FaultSite::Freed { area, offset } => {
                write!(
                    f,
                    "use after free: {access} of {} at {addr:#x} (",
                    Described(area)
                )?;
                // Below a freed stack's base (its unmapped lower half), not in it.
                match (area.start.as_u64() + area.lead).checked_sub(addr) {
                    Some(below) if below > 0 => write!(f, "{below} bytes below its base")?,
                    _ => write!(f, "offset {offset}")?,
                }
                write!(f, "), freed (its range not reused yet)")
            }
            FaultSite::Area {
                area,
                offset,
                broke_protection: true,
            } => {
                let broke = if access == "write" {
                    "read-only"
                } else {
                    "no-execute"
                };
                write!(
                    f,
                    "{access} to {broke} memory of {} at {addr:#x}: page {} of {}",
                    Described(area),
                    offset / PAGE_SIZE,
                    area.size / PAGE_SIZE
                )
            }
            FaultSite::Area { area, offset, .. } => {
                let why = if area.kind == AreaKind::Reserved {
                    "not populated yet"
                } else {
                    "not mapped"
                };
                write!(
                    f,
                    "{access} of {} at {addr:#x}: page {} of {}, {why}",
                    Described(area),
                    offset / PAGE_SIZE,
                    area.size / PAGE_SIZE
                )
            }
            FaultSite::Unmapped => write!(
                f,
                "{access} at {addr:#x}: in the vmalloc region but in no area (never \
                 allocated, or freed and purged)"
            ),
            FaultSite::Outside => write!(f, "{access} at {addr:#x}: outside the vmalloc region"),
            FaultSite::Busy => write!(
                f,
                "{access} at {addr:#x}: vmalloc manager busy (the fault interrupted it), \
                 not looked up"
            ),
        }
    }
}
