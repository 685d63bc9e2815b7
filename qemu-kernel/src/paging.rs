//! The kernel's address space beyond the boot stub's identity map.
//!
//! | virtual range                                  | what                                  |
//! |------------------------------------------------|---------------------------------------|
//! | `0 .. 1 GiB`                                   | identity map (boot stub), 2 MiB pages |
//! | `PHYS_OFFSET ..` + max(RAM end, 4 GiB)         | all physical memory, 2 MiB pages, NX  |
//! | [`VMALLOC_START`] .. [`VMALLOC_END`]           | the vmalloc manager's                 |
//! | [`SCRATCH_BASE`] .. + 2 MiB                    | 512 4 KiB slots checks map by hand    |
//!
//! The physical map makes [`vmalloc::OffsetPhysMemory`] valid at [`PHYS_OFFSET`]. It
//! covers at least 4 GiB so that MMIO below 4 GiB (the local APIC at 0xfee00000) is
//! reachable; 2 MiB pages above the end of RAM are mapped uncached. Its page tables
//! are statics in the kernel image, enough for [`PHYSMAP_MAX_GIB`] GiB.
//!
//! The vmalloc region's PML4 entries are left empty: the manager gives each one a
//! table as it is set up, and the tables below them as areas need them.

use crate::cell::{PageAligned, StaticCell};
use core::ops::Range;
use vmalloc::{OffsetPhysMemory, PhysMemory};
use x86_64::registers::control::Cr3;
use x86_64::structures::paging::{PageTable, PageTableFlags, PhysFrame};
use x86_64::{PhysAddr, VirtAddr, instructions::tlb};

/// Virtual address of physical address 0.
pub const PHYS_OFFSET: u64 = 0xffff_8000_0000_0000;
/// Start of the region the vmalloc manager owns (Linux's `VMALLOC_START`).
pub const VMALLOC_START: u64 = 0xffff_c900_0000_0000;
/// End (exclusive) of the vmalloc region.
pub const VMALLOC_END: u64 = 0xffff_e900_0000_0000;
/// Base of the scratch window.
pub const SCRATCH_BASE: u64 = 0xffff_fe00_0000_0000;
/// Number of 4 KiB slots in the scratch window.
pub const SCRATCH_SLOTS: usize = 512;
/// How much physical memory the static physical-map tables can cover.
pub const PHYSMAP_MAX_GIB: usize = 64;

const GIB: u64 = 1 << 30;
const HUGE_PAGE: u64 = 2 << 20;
/// Frames the kernel image sets aside for checks (see [`test_frames`]).
pub const TEST_FRAME_COUNT: usize = 4;

static PHYSMAP_PDPT: StaticCell<PageTable> = StaticCell::new(PageTable::new());
static PHYSMAP_PDS: StaticCell<[PageTable; PHYSMAP_MAX_GIB]> =
    StaticCell::new([const { PageTable::new() }; PHYSMAP_MAX_GIB]);
static SCRATCH_PDPT: StaticCell<PageTable> = StaticCell::new(PageTable::new());
static SCRATCH_PD: StaticCell<PageTable> = StaticCell::new(PageTable::new());
static SCRATCH_PT: StaticCell<PageTable> = StaticCell::new(PageTable::new());
static TEST_FRAMES: StaticCell<PageAligned<[[u8; 4096]; TEST_FRAME_COUNT]>> =
    StaticCell::new(PageAligned([[0; 4096]; TEST_FRAME_COUNT]));

unsafe extern "C" {
    static __image_start: u8;
    static __image_end: u8;
}

/// Physical range of the loaded kernel image (identity-mapped, so virtual == physical).
pub fn kernel_image() -> Range<PhysAddr> {
    let start = &raw const __image_start as u64;
    let end = &raw const __image_end as u64;
    PhysAddr::new(start)..PhysAddr::new(end)
}

/// Physical address of a static: the kernel image is identity-mapped.
fn phys_of<T>(ptr: *const T) -> PhysAddr {
    PhysAddr::new(ptr as u64)
}

/// The active PML4, reached through the identity map.
///
/// # Safety
///
/// No other reference to the PML4 is live.
unsafe fn active_pml4() -> &'static mut PageTable {
    let (frame, _) = Cr3::read();
    // SAFETY: the boot PML4 lies in the identity-mapped kernel image; exclusivity is
    // the caller's contract.
    unsafe { &mut *(frame.start_address().as_u64() as *mut PageTable) }
}

fn table_flags() -> PageTableFlags {
    PageTableFlags::PRESENT | PageTableFlags::WRITABLE
}

/// Maps all physical memory up to max(`ram_end`, 4 GiB) at [`PHYS_OFFSET`] and
/// returns the end of the mapped physical range. Call once, before any other user of
/// the physical map.
pub fn map_physical_memory(ram_end: PhysAddr) -> PhysAddr {
    let gib = ram_end.as_u64().max(4 * GIB).div_ceil(GIB) as usize;
    assert!(
        gib <= PHYSMAP_MAX_GIB,
        "more RAM than PHYSMAP_MAX_GIB covers"
    );
    // SAFETY: called once during boot; nothing else references these tables.
    let (pml4, pdpt, pds) = unsafe {
        (
            active_pml4(),
            &mut *PHYSMAP_PDPT.get(),
            &mut *PHYSMAP_PDS.get(),
        )
    };
    for (index, pd) in pds.iter_mut().enumerate().take(gib) {
        for (slot, entry) in pd.iter_mut().enumerate() {
            let phys = index as u64 * GIB + slot as u64 * HUGE_PAGE;
            let mut flags = table_flags() | PageTableFlags::HUGE_PAGE | PageTableFlags::NO_EXECUTE;
            if phys >= ram_end.as_u64() {
                flags |= PageTableFlags::NO_CACHE | PageTableFlags::WRITE_THROUGH;
            }
            entry.set_addr(PhysAddr::new(phys), flags);
        }
        pdpt[index].set_addr(phys_of(pd), table_flags());
    }
    pml4[VirtAddr::new(PHYS_OFFSET).p4_index()].set_addr(phys_of(pdpt), table_flags());
    tlb::flush_all();
    PhysAddr::new(gib as u64 * GIB)
}

/// A window of [`SCRATCH_SLOTS`] 4 KiB pages whose mappings checks set by hand, to
/// test how the CPU treats given page-table flags.
pub struct ScratchWindow {
    _only_one: (),
}

impl ScratchWindow {
    /// Hooks the window's page tables into the PML4. Call once.
    pub fn init() -> Self {
        // SAFETY: called once during boot; nothing else references these tables.
        let (pml4, pdpt, pd) = unsafe {
            (
                active_pml4(),
                &mut *SCRATCH_PDPT.get(),
                &mut *SCRATCH_PD.get(),
            )
        };
        let base = VirtAddr::new(SCRATCH_BASE);
        pd[base.p2_index()].set_addr(phys_of(SCRATCH_PT.get()), table_flags());
        pdpt[base.p3_index()].set_addr(phys_of(pd), table_flags());
        pml4[base.p4_index()].set_addr(phys_of(pdpt), table_flags());
        tlb::flush_all();
        Self { _only_one: () }
    }

    /// Virtual address of `slot`.
    pub fn slot_addr(&self, slot: usize) -> VirtAddr {
        assert!(slot < SCRATCH_SLOTS, "scratch slot {slot} out of range");
        VirtAddr::new(SCRATCH_BASE + slot as u64 * 4096)
    }

    fn set(&mut self, slot: usize, frame: PhysFrame, flags: PageTableFlags) -> VirtAddr {
        let addr = self.slot_addr(slot);
        // SAFETY: `&mut self` is the only access to the scratch page table.
        let pt = unsafe { &mut *SCRATCH_PT.get() };
        pt[addr.p1_index()].set_addr(frame.start_address(), flags);
        tlb::flush(addr);
        addr
    }

    /// Maps `slot` to `frame` with `flags` (PRESENT is added) and returns its address.
    pub fn map(&mut self, slot: usize, frame: PhysFrame, flags: PageTableFlags) -> VirtAddr {
        self.set(slot, frame, flags | PageTableFlags::PRESENT)
    }

    /// Makes `slot` not present.
    pub fn unmap(&mut self, slot: usize) {
        self.set(
            slot,
            PhysFrame::containing_address(PhysAddr::zero()),
            PageTableFlags::empty(),
        );
    }

    /// Unmaps every slot (between checks, so each starts from an empty window).
    pub fn unmap_all(&mut self) {
        (0..SCRATCH_SLOTS).for_each(|slot| self.unmap(slot));
    }
}

/// The frames the kernel image sets aside for checks to map in the scratch window.
pub fn test_frames() -> [PhysFrame; TEST_FRAME_COUNT] {
    let first = phys_of(TEST_FRAMES.get());
    core::array::from_fn(|index| PhysFrame::containing_address(first + index as u64 * 4096))
}

/// A present leaf entry found by [`leaf_entry`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leaf {
    /// The physical address the entry maps (in a large page's entry, bit 12 is its
    /// PAT bit and is not masked out).
    pub addr: PhysAddr,
    /// The entry's flags. In a 4 KiB entry bit 7 is PAT, which `PageTableFlags` calls
    /// `HUGE_PAGE`.
    pub flags: PageTableFlags,
    /// 1 for a 4 KiB page, 2 for 2 MiB, 3 for 1 GiB.
    pub level: u8,
}

/// The leaf entry that maps `addr` in the tables under `pml4`, as the MMU walks them
/// (read through the physical map, with no reference into tables others may edit),
/// or `None` where a walk would fault not-present.
pub fn leaf_entry(phys: &OffsetPhysMemory, pml4: PhysFrame, addr: VirtAddr) -> Option<Leaf> {
    const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
    let indices = [
        addr.p4_index(),
        addr.p3_index(),
        addr.p2_index(),
        addr.p1_index(),
    ];
    let mut table = pml4.start_address();
    for (depth, index) in indices.into_iter().enumerate() {
        let entries = phys.phys_to_virt(table).cast::<u64>();
        // SAFETY: `table` is a page table (the PML4 or one an entry above points to),
        // RAM the physical map reaches; `index` < 512 keeps the read inside it.
        let entry = unsafe { entries.add(usize::from(index)).read_volatile() };
        let flags = PageTableFlags::from_bits_truncate(entry);
        if !flags.contains(PageTableFlags::PRESENT) {
            return None;
        }
        let level = 4 - depth as u8;
        if level == 1 || (level < 4 && flags.contains(PageTableFlags::HUGE_PAGE)) {
            return Some(Leaf {
                addr: PhysAddr::new(entry & ADDR_MASK),
                flags,
                level,
            });
        }
        table = PhysAddr::new(entry & ADDR_MASK);
    }
    None
}
