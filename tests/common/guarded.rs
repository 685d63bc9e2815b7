//! A kernel heap sampling into its guarded pool, on a simulated machine whose host
//! window makes vmalloc memory dereferenceable: what `tests/heap_guarded*.rs` share.

#![allow(dead_code)]

use std::alloc::Layout;
use std::sync::Mutex;
use vmalloc::heap::HeapConfig;
use vmalloc::heap::guarded::{GuardedFault, GuardedReport};
use vmalloc::vmalloc::Vmalloc;
use vmalloc::{FrameSource, PAGE_SIZE, TlbFlush};
use vmalloc_sim::{Access, Fault, SimMachine, SimPhys, scenarios};
use x86_64::VirtAddr;
use x86_64::structures::idt::PageFaultErrorCode;

pub const PAGE: usize = PAGE_SIZE as usize;

/// A heap configuration sampling one allocation in `interval` into `slots` slots.
pub fn sampling(interval: u32, slots: usize) -> HeapConfig {
    HeapConfig {
        window: 64 << 20,
        sample_interval: interval,
        guarded_slots: slots,
        ..HeapConfig::DEFAULT
    }
}

/// A manager over the machine's host window, flushing with `tlb`.
pub fn manager<'m, F: FrameSource + Clone, T: TlbFlush>(
    machine: &'m SimMachine,
    frames: F,
    tlb: T,
) -> Vmalloc<F, SimPhys<'m>, T> {
    // SAFETY: the machine's page tables serve this manager alone, and its flush reaches every CPU that runs.
    unsafe { scenarios::window_manager(machine, frames, tlb) }
}

pub fn layout(size: usize, align: usize) -> Layout {
    Layout::from_size_align(size, align).unwrap()
}

pub fn addr(ptr: *const u8) -> VirtAddr {
    VirtAddr::from_ptr(ptr)
}

/// Whether the object at `ptr` sits against its page's end (else its start).
pub fn at_page_end(ptr: *const u8, size: usize, align: usize) -> bool {
    let end = (ptr as usize + size).next_multiple_of(align);
    end.is_multiple_of(PAGE) && !(ptr as usize).is_multiple_of(PAGE)
}

/// The page fault the calling CPU's MMU raises for `access` at `at`.
pub fn fault_at(
    machine: &SimMachine,
    at: VirtAddr,
    access: Access,
) -> (VirtAddr, PageFaultErrorCode) {
    match machine.translate(at, access) {
        Err(Fault::Page(fault)) => (fault.addr, fault.code),
        other => panic!("expected a page fault at {at:#x}, got {other:?}"),
    }
}

/// `file:line` of a test file.
pub fn line_of(file: &str, line: u32) -> String {
    format!("tests/{file}:{line}")
}

/// What a report hook saw.
#[derive(Default)]
pub struct Reports(pub Mutex<Vec<GuardedReport>>);

impl Reports {
    pub fn hook(&self) -> impl Fn(&GuardedReport) + Sync + '_ {
        |report: &GuardedReport| self.0.lock().unwrap().push(*report)
    }

    pub fn take(&self) -> Vec<GuardedReport> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

/// The object a fault was charged to, and how far from it.
pub fn object_of(fault: &GuardedFault) -> Option<(usize, usize)> {
    match fault {
        GuardedFault::PastEnd { object, distance } => Some((object.addr, *distance)),
        GuardedFault::BeforeStart { object, distance } => Some((object.addr, *distance)),
        _ => None,
    }
}
