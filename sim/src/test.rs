//! Unit tests of the simulated machine, one submodule per feature; the helpers they
//! share (hand-written page tables, frames from a bump) are here.

use super::memmap::{KERNEL_IMAGE_END, KERNEL_IMAGE_START, LOW_USABLE_END};
use super::*;
use std::vec;
use vmalloc::frame::RegionKind;
use vmalloc::{PhysMemory, TlbFlush};
use x86_64::structures::idt::PageFaultErrorCode as Code;
use x86_64::structures::paging::Page;
use x86_64::structures::paging::mapper::{Translate, TranslateResult};
use x86_64::structures::paging::{PageTable, PageTableFlags as Flags};

mod faults;
mod memmap;
mod mmu;
mod phys;
mod rng;
mod threads;
mod tlb;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

// ---------------------------------------------------------------------------------
// Helpers: hand-written page tables, with frames from a bump over the usable map.
// ---------------------------------------------------------------------------------

/// Hands out the usable 4 KiB frames of the memory map in address order.
struct Bump {
    frames: std::vec::IntoIter<PhysFrame>,
}

impl Bump {
    fn new(machine: &SimMachine) -> Self {
        let mut frames = Vec::new();
        for region in machine.memory_map() {
            if region.kind == RegionKind::Usable && region.range.start.as_u64() >= MIB {
                let start = region.range.start.align_up(4096u64).as_u64();
                let end = region.range.end.align_down(4096u64).as_u64();
                frames.extend((start..end).step_by(4096).map(frame_at));
            }
        }
        Self {
            frames: frames.into_iter(),
        }
    }

    fn frame(&mut self) -> PhysFrame {
        self.frames.next().expect("test ran out of frames")
    }
}

fn frame_at(addr: u64) -> PhysFrame {
    PhysFrame::containing_address(PhysAddr::new(addr))
}

/// The page table in `frame`, reached through the machine's physical memory.
///
/// The reference must be dropped before the machine reads the table again.
#[allow(clippy::mut_from_ref)]
fn table(machine: &SimMachine, frame: PhysFrame) -> &mut PageTable {
    let ptr = machine.phys().phys_to_virt(frame.start_address());
    // SAFETY: the frame is inside the block, 4 KiB-aligned, and the test holds no
    // other reference into it while using this one.
    unsafe { &mut *ptr.cast::<PageTable>() }
}

const TABLE: Flags = Flags::PRESENT
    .union(Flags::WRITABLE)
    .union(Flags::USER_ACCESSIBLE);
const KERNEL_RW: Flags = Flags::PRESENT.union(Flags::WRITABLE);

/// Writes page tables by hand: upper entries get `TABLE` flags unless overridden.
struct Tables<'m> {
    machine: &'m SimMachine,
    bump: Bump,
}

impl<'m> Tables<'m> {
    fn new(machine: &'m SimMachine) -> Self {
        Self {
            machine,
            bump: Bump::new(machine),
        }
    }

    /// Maps `virt` to `phys` with a leaf at `leaf_level` (1 = 4 KiB, 2 = 2 MiB,
    /// 3 = 1 GiB), creating missing tables with `TABLE` flags. Returns the tables
    /// walked, from the PML4 down.
    fn map(&mut self, virt: u64, phys: u64, leaf_level: u32, flags: Flags) -> Vec<PhysFrame> {
        let mut frame = self.machine.root();
        let mut walked = vec![frame];
        for level in (leaf_level + 1..=4).rev() {
            let index = index_at(virt, level);
            let entry = &table(self.machine, frame)[index];
            frame = if entry.is_unused() {
                let next = self.bump.frame();
                table(self.machine, frame)[index].set_frame(next, TABLE);
                next
            } else {
                entry.frame().expect("a table entry")
            };
            walked.push(frame);
        }
        let leaf_flags = if leaf_level > 1 {
            flags | Flags::HUGE_PAGE
        } else {
            flags
        };
        table(self.machine, frame)[index_at(virt, leaf_level)]
            .set_addr(PhysAddr::new(phys), leaf_flags);
        walked
    }

    /// Maps `virt` to a fresh frame with `flags`; returns the frame.
    fn map_new(&mut self, virt: u64, flags: Flags) -> PhysFrame {
        let frame = self.bump.frame();
        self.map(virt, frame.start_address().as_u64(), 1, flags);
        frame
    }

    /// Replaces the flags of the entry for `virt` in `table_frame` (a level-`level`
    /// table), keeping its address.
    fn set_flags(&self, table_frame: PhysFrame, virt: u64, level: u32, flags: Flags) {
        let entry = &mut table(self.machine, table_frame)[index_at(virt, level)];
        let addr = entry.addr();
        entry.set_addr(addr, flags);
    }

    fn clear(&self, table_frame: PhysFrame, virt: u64, level: u32) {
        table(self.machine, table_frame)[index_at(virt, level)].set_unused();
    }
}

fn index_at(virt: u64, level: u32) -> usize {
    ((virt >> (12 + 9 * (level - 1))) & 0x1ff) as usize
}

fn virt(addr: u64) -> VirtAddr {
    VirtAddr::new(addr)
}

fn page_of(addr: u64) -> Page {
    Page::containing_address(virt(addr))
}

fn page_fault(result: Result<Translation, Fault>) -> PageFault {
    result
        .expect_err("access should fault")
        .page_fault()
        .expect("a page fault")
}

fn machine() -> SimMachine {
    SimMachine::new(SimConfig::default())
}

/// A kernel-half address to map test pages at.
const BASE: u64 = 0xffff_c000_0000_0000;
