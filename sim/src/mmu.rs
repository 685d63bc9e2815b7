//! The software MMU: access kinds, faults, the four-level walk and checked copies.

use super::SimMachine;
use core::fmt;
use core::sync::atomic::{AtomicU64, Ordering};
use std::vec::Vec;
use x86_64::structures::idt::PageFaultErrorCode;
use x86_64::structures::paging::mapper::MappedFrame;
use x86_64::structures::paging::{
    PageSize, PageTableFlags, PhysFrame, Size1GiB, Size2MiB, Size4KiB,
};
use x86_64::{PhysAddr, VirtAddr};

/// What an access does with the byte it reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AccessKind {
    /// A data read.
    Read,
    /// A data write.
    Write,
    /// An instruction fetch.
    Fetch,
}

/// One memory access: its kind and whether it comes from user mode (CPL 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Access {
    /// Read, write or fetch.
    pub kind: AccessKind,
    /// `true` for CPL 3, `false` for the kernel.
    pub user: bool,
}

impl Access {
    /// A kernel read.
    pub const READ: Access = Access::supervisor(AccessKind::Read);
    /// A kernel write.
    pub const WRITE: Access = Access::supervisor(AccessKind::Write);
    /// A kernel instruction fetch.
    pub const FETCH: Access = Access::supervisor(AccessKind::Fetch);

    const fn supervisor(kind: AccessKind) -> Access {
        Access { kind, user: false }
    }

    /// The same access made from user mode.
    pub const fn user(self) -> Access {
        Access { user: true, ..self }
    }

    /// The error-code bits this access contributes to any page fault it takes.
    fn fault_code(self) -> PageFaultErrorCode {
        let mut code = PageFaultErrorCode::empty();
        if self.user {
            code |= PageFaultErrorCode::USER_MODE;
        }
        match self.kind {
            AccessKind::Read => {}
            AccessKind::Write => code |= PageFaultErrorCode::CAUSED_BY_WRITE,
            AccessKind::Fetch => code |= PageFaultErrorCode::INSTRUCTION_FETCH,
        }
        code
    }
}

/// A page fault, as the CPU would raise it: CR2 and the error code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageFault {
    /// The faulting linear address (what CR2 would hold).
    pub addr: VirtAddr,
    /// The error code pushed by the CPU.
    pub code: PageFaultErrorCode,
}

/// Why an access did not complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// A #PF.
    Page(PageFault),
    /// A #GP: the access reached a non-canonical address (given here).
    GeneralProtection {
        /// The first non-canonical address the access touched.
        addr: u64,
    },
}

impl Fault {
    /// The page fault, if this is one.
    pub fn page_fault(self) -> Option<PageFault> {
        match self {
            Fault::Page(fault) => Some(fault),
            Fault::GeneralProtection { .. } => None,
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::Page(fault) => write!(
                f,
                "page fault at {:#x}, error code {:?}",
                fault.addr.as_u64(),
                fault.code
            ),
            Fault::GeneralProtection { addr } => {
                write!(
                    f,
                    "general protection fault: non-canonical address {addr:#x}"
                )
            }
        }
    }
}

impl std::error::Error for Fault {}

/// A successful translation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Translation {
    /// Start of the mapped frame (4 KiB, 2 MiB or 1 GiB).
    pub frame_start: PhysAddr,
    /// Size of the mapped frame: 4 KiB, 2 MiB or 1 GiB.
    pub page_size: u64,
    /// Offset of the translated address inside the frame.
    pub offset: u64,
    /// The leaf entry's flags, except that `WRITABLE` and `USER_ACCESSIBLE` hold the
    /// AND over all four levels and `NO_EXECUTE` the OR: the effective permissions.
    /// In a 4 KiB leaf, bit 7 (`HUGE_PAGE`) is the PAT bit.
    pub flags: PageTableFlags,
}

impl Translation {
    /// The physical address the translated virtual address reaches. (A translation
    /// made by hand past the 52-bit physical space has its top bits cut, as the MMU
    /// never makes one.)
    pub fn phys(&self) -> PhysAddr {
        PhysAddr::new_truncate(self.frame_start.as_u64().wrapping_add(self.offset))
    }

    /// The mapped frame, in the `x86_64` crate's form.
    pub fn frame(&self) -> MappedFrame {
        match self.page_size {
            Size4KiB::SIZE => {
                MappedFrame::Size4KiB(PhysFrame::containing_address(self.frame_start))
            }
            Size2MiB::SIZE => {
                MappedFrame::Size2MiB(PhysFrame::containing_address(self.frame_start))
            }
            _ => MappedFrame::Size1GiB(PhysFrame::containing_address(self.frame_start)),
        }
    }

    /// `self`, if its effective permissions allow `access`.
    fn checked(self, access: Access) -> Result<Self, Cause> {
        if self.permits(access) {
            Ok(self)
        } else {
            Err(Cause::Protection)
        }
    }

    /// Checks `access` against the effective permissions (CR0.WP = 1, EFER.NXE = 1,
    /// SMEP and SMAP off).
    pub(super) fn permits(&self, access: Access) -> bool {
        if access.user && !self.flags.contains(PageTableFlags::USER_ACCESSIBLE) {
            return false;
        }
        match access.kind {
            AccessKind::Read => true,
            AccessKind::Write => self.flags.contains(PageTableFlags::WRITABLE),
            AccessKind::Fetch => !self.flags.contains(PageTableFlags::NO_EXECUTE),
        }
    }
}

/// Bits 12..=51: the physical address in a table entry.
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
/// Bits 13..=20 of a 2 MiB entry (between PAT and the frame address) must be 0.
const HUGE_2M_RESERVED: u64 = 0x1f_e000;
/// Bits 13..=29 of a 1 GiB entry must be 0.
const HUGE_1G_RESERVED: u64 = 0x3fff_e000;

/// Why a translation faults, before the access's own bits are added.
pub(super) enum Cause {
    /// An entry with P = 0.
    NotPresent,
    /// All entries present, but the access is not allowed.
    Protection,
    /// An entry with a reserved bit set.
    Reserved,
}

impl Cause {
    fn code(self) -> PageFaultErrorCode {
        match self {
            Cause::NotPresent => PageFaultErrorCode::empty(),
            Cause::Protection => PageFaultErrorCode::PROTECTION_VIOLATION,
            Cause::Reserved => {
                PageFaultErrorCode::PROTECTION_VIOLATION | PageFaultErrorCode::MALFORMED_TABLE
            }
        }
    }
}

impl SimMachine {
    /// Translates `addr` for `access`, through the TLB.
    ///
    /// A TLB hit answers without reading the page tables, so a changed or cleared
    /// entry goes on being used until it is flushed. A hit whose permissions forbid the
    /// access re-walks the tables once, as x86 does before raising #PF; a fault drops
    /// the page's entry, as on hardware. Not-present entries are never cached.
    ///
    /// # Errors
    ///
    /// [`Fault::Page`] with the x86 error code, or [`Fault::GeneralProtection`] for a
    /// non-canonical address (possible only through [`VirtAddr::new_unsafe`]; see
    /// [`translate_raw`](Self::translate_raw)).
    pub fn translate(&self, addr: VirtAddr, access: Access) -> Result<Translation, Fault> {
        self.translate_raw(addr.as_u64(), access)
    }

    /// [`translate`](Self::translate) for any 64-bit address, canonical or not.
    ///
    /// # Errors
    ///
    /// As [`translate`](Self::translate).
    pub fn translate_raw(&self, addr: u64, access: Access) -> Result<Translation, Fault> {
        // An interrupt lands between two instructions, before this access.
        self.take_interrupts();
        self.translate_now(addr, access)
    }

    /// [`translate_raw`](Self::translate_raw) without taking interrupts first: one
    /// page of an access already under way.
    fn translate_now(&self, addr: u64, access: Access) -> Result<Translation, Fault> {
        let virt = VirtAddr::try_new(addr).map_err(|_| Fault::GeneralProtection { addr })?;
        let vpn = addr >> 12;
        let mut tlb = self.lock_tlb();
        if let Some(cached) = tlb.lookup(vpn).filter(|t| t.permits(access)) {
            tlb.stats.hits += 1;
            return Ok(Translation {
                offset: addr & (cached.page_size - 1),
                ..cached
            });
        }
        tlb.stats.misses += 1;
        // Upper-level entries come from the paging-structure cache when it has them,
        // and those that point to a table are cached.
        let walked = walk(self.cr3(), addr, |entry, level| {
            if level == 1 {
                return self.load_entry(entry, level);
            }
            if let Some(raw) = tlb.cached_entry(level, addr) {
                return raw;
            }
            let raw = self.load_entry(entry, level);
            let flags = PageTableFlags::from_bits_truncate(raw);
            if flags.contains(PageTableFlags::PRESENT) && !flags.contains(PageTableFlags::HUGE_PAGE)
            {
                tlb.cache_entry(level, addr, raw);
            }
            raw
        });
        match walked.and_then(|walked| walked.checked(access)) {
            Ok(translation) => {
                tlb.insert(vpn, translation);
                Ok(translation)
            }
            Err(cause) => {
                tlb.forget_fault(addr);
                let code = access.fault_code() | cause.code();
                Err(Fault::Page(PageFault { addr: virt, code }))
            }
        }
    }

    /// Loads the table entry at `entry` (in a level-`level` table) atomically.
    ///
    /// # Panics
    ///
    /// If the table lies outside the simulated memory: the tables under test point
    /// somewhere that is not RAM.
    fn load_entry(&self, entry: PhysAddr, level: u32) -> u64 {
        assert!(
            entry.as_u64() < self.memory_size(),
            "page walk: level-{level} table entry at physical {:#x} is outside the \
             simulated memory ({:#x} bytes)",
            entry.as_u64(),
            self.memory_size()
        );
        let ptr = self.phys().host_ptr(entry).cast::<u64>();
        // SAFETY: `entry` is inside the block (checked above) and 8-aligned (a table
        // base is 4 KiB-aligned and the index is scaled by 8); the block lives as
        // long as `self`. An atomic load never tears against a concurrent atomic
        // store of the entry.
        unsafe { AtomicU64::from_ptr(ptr) }.load(Ordering::Acquire)
    }

    /// Reads `buf.len()` bytes at `addr` as the kernel would.
    ///
    /// Every page the range touches is translated first; only if all succeed are bytes
    /// copied, so a fault leaves `buf` untouched.
    ///
    /// # Errors
    ///
    /// The fault of the first page that cannot be read, at that page's first byte in
    /// the range (or `addr` itself for the first page).
    ///
    /// # Panics
    ///
    /// If a page of the range maps a frame outside the simulated memory (an MMIO
    /// range an `ioremap` mapped, say: the machine has no device there), or a table
    /// on the way lies outside it.
    pub fn read(&self, addr: VirtAddr, buf: &mut [u8]) -> Result<(), Fault> {
        self.copy_out(Access::READ, addr, buf)
    }

    /// Writes `data` at `addr` as the kernel would; all-or-nothing like
    /// [`read`](Self::read).
    ///
    /// # Errors
    ///
    /// As [`read`](Self::read); on error no byte is written.
    ///
    /// # Panics
    ///
    /// As [`read`](Self::read).
    ///
    /// # Safety
    ///
    /// The bytes written, through the simulated page tables, are no part of a live
    /// Rust value. With a host window the
    /// machine's memory is also what host code reaches through the window (a kernel
    /// heap's objects, a `KVBox`): writing there is writing through a raw pointer,
    /// as a device's DMA would.
    pub unsafe fn write(&self, addr: VirtAddr, data: &[u8]) -> Result<(), Fault> {
        // SAFETY: forwarded from the caller.
        unsafe { self.copy_in(Access::WRITE, addr, data) }
    }

    /// Fetches `buf.len()` instruction bytes at `addr` as the kernel would.
    ///
    /// # Errors
    ///
    /// As [`read`](Self::read), with fetch permissions (NX) checked.
    ///
    /// # Panics
    ///
    /// As [`read`](Self::read).
    pub fn fetch(&self, addr: VirtAddr, buf: &mut [u8]) -> Result<(), Fault> {
        self.copy_out(Access::FETCH, addr, buf)
    }

    /// [`read`](Self::read) from user mode.
    ///
    /// # Errors
    ///
    /// As [`read`](Self::read).
    ///
    /// # Panics
    ///
    /// As [`read`](Self::read).
    pub fn read_user(&self, addr: VirtAddr, buf: &mut [u8]) -> Result<(), Fault> {
        self.copy_out(Access::READ.user(), addr, buf)
    }

    /// [`write`](Self::write) from user mode.
    ///
    /// # Errors
    ///
    /// As [`write`](Self::write).
    ///
    /// # Panics
    ///
    /// As [`read`](Self::read).
    ///
    /// # Safety
    ///
    /// As [`write`](Self::write).
    pub unsafe fn write_user(&self, addr: VirtAddr, data: &[u8]) -> Result<(), Fault> {
        // SAFETY: forwarded from the caller.
        unsafe { self.copy_in(Access::WRITE.user(), addr, data) }
    }

    /// [`fetch`](Self::fetch) from user mode.
    ///
    /// # Errors
    ///
    /// As [`fetch`](Self::fetch).
    ///
    /// # Panics
    ///
    /// As [`read`](Self::read).
    pub fn fetch_user(&self, addr: VirtAddr, buf: &mut [u8]) -> Result<(), Fault> {
        self.copy_out(Access::FETCH.user(), addr, buf)
    }

    /// Copies from virtual memory into `buf` after translating every page.
    fn copy_out(&self, access: Access, addr: VirtAddr, buf: &mut [u8]) -> Result<(), Fault> {
        let mut done = 0;
        for (phys, len) in self.translate_all(addr, buf.len(), access)? {
            self.read_phys(phys, &mut buf[done..done + len]);
            done += len;
        }
        Ok(())
    }

    /// Copies `data` into virtual memory after translating every page.
    ///
    /// # Safety
    ///
    /// As [`write`](Self::write).
    unsafe fn copy_in(&self, access: Access, addr: VirtAddr, data: &[u8]) -> Result<(), Fault> {
        let mut done = 0;
        for (phys, len) in self.translate_all(addr, data.len(), access)? {
            // SAFETY: forwarded from the caller.
            unsafe { self.write_phys(phys, &data[done..done + len]) };
            done += len;
        }
        Ok(())
    }

    /// Translates every page of `addr..addr + len`, returning the physical pieces.
    /// Interrupts are taken once, before the first page, as for one instruction: an
    /// interrupt between two pages could unmap and flush a page already translated,
    /// and the copy would still go through the translation it flushed.
    fn translate_all(
        &self,
        addr: VirtAddr,
        len: usize,
        access: Access,
    ) -> Result<Vec<(PhysAddr, usize)>, Fault> {
        let mut pieces = Vec::new();
        let mut cursor = addr.as_u64();
        let mut left = len as u64;
        self.take_interrupts();
        while left > 0 {
            let in_page = (0x1000 - (cursor & 0xfff)).min(left);
            let translation = self.translate_now(cursor, access)?;
            pieces.push((translation.phys(), in_page as usize));
            left -= in_page;
            // Linear addresses wrap in 64-bit mode; both sides of the wrap are canonical.
            cursor = cursor.wrapping_add(in_page);
        }
        Ok(pieces)
    }
}

/// Walks the four levels under `root` for `addr`; `load` reads the entry at a
/// physical address in a level-`level` table (the MMU and the host window differ
/// only in what they do with an entry outside the memory).
pub(super) fn walk(
    root: PhysFrame,
    addr: u64,
    mut load: impl FnMut(PhysAddr, u32) -> u64,
) -> Result<Translation, Cause> {
    let mut table = root.start_address();
    let mut writable = true;
    let mut user = true;
    let mut no_execute = false;
    for level in (1..=4u32).rev() {
        let shift = 12 + 9 * (level - 1);
        let index = (addr >> shift) & 0x1ff;
        let raw = load(table + index * 8, level);
        let flags = PageTableFlags::from_bits_truncate(raw);
        if !flags.contains(PageTableFlags::PRESENT) {
            return Err(Cause::NotPresent);
        }
        writable &= flags.contains(PageTableFlags::WRITABLE);
        user &= flags.contains(PageTableFlags::USER_ACCESSIBLE);
        no_execute |= flags.contains(PageTableFlags::NO_EXECUTE);
        let huge = flags.contains(PageTableFlags::HUGE_PAGE);
        let leaf_size = match (level, huge) {
            (4, true) => return Err(Cause::Reserved),
            (3, true) if raw & HUGE_1G_RESERVED != 0 => return Err(Cause::Reserved),
            (2, true) if raw & HUGE_2M_RESERVED != 0 => return Err(Cause::Reserved),
            (3, true) => Size1GiB::SIZE,
            (2, true) => Size2MiB::SIZE,
            (1, _) => Size4KiB::SIZE,
            _ => {
                table = PhysAddr::new(raw & ADDR_MASK);
                continue;
            }
        };
        let mut effective = flags
            & !(PageTableFlags::WRITABLE
                | PageTableFlags::USER_ACCESSIBLE
                | PageTableFlags::NO_EXECUTE);
        effective.set(PageTableFlags::WRITABLE, writable);
        effective.set(PageTableFlags::USER_ACCESSIBLE, user);
        effective.set(PageTableFlags::NO_EXECUTE, no_execute);
        return Ok(Translation {
            frame_start: PhysAddr::new(raw & ADDR_MASK & !(leaf_size - 1)),
            page_size: leaf_size,
            offset: addr & (leaf_size - 1),
            flags: effective,
        });
    }
    unreachable!("a level-1 entry is always a leaf")
}
