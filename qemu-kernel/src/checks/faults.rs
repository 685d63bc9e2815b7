//! Checks of the fault-visible effects of the library on the real MMU: use after
//! free, guard pages, read-only and non-executable areas, and a kernel stack overflow.

use super::library::{Outcome, PAGE, addr, vfree_all};
use super::{Ctx, ensure};
use crate::fault::{probe_exec, probe_read, probe_write, run_on_stack};
use crate::mm;
use alloc::vec::Vec;
use vmalloc::vmalloc::{Prot, VmOptions};
use x86_64::VirtAddr;
use x86_64::structures::idt::PageFaultErrorCode;

pub(super) fn is_not_present_fault_at(
    result: Result<u64, crate::fault::Fault>,
    at: VirtAddr,
) -> bool {
    result.is_err_and(|fault| {
        fault.addr == at
            && !fault
                .code
                .contains(PageFaultErrorCode::PROTECTION_VIOLATION)
    })
}

/// Pages of [`use_after_free_faults`]' area whose translations it caches: few
/// enough that the purge flushes them page by page, as a driver's small buffer is.
const TOUCHED_PAGES: usize = 8;

/// The last-level page table (2 MiB slot) that maps `addr`.
fn page_table_of(addr: u64) -> u64 {
    addr >> 21
}

/// A one-page neighbour, then a `pages`-page area in the same last-level page table,
/// so freeing the area leaves that table in use and its purge frees no table (whose
/// flush would cover the area and hide a missing one). Pairs that straddle a 2 MiB
/// boundary stay allocated in `held`, so the next try lands elsewhere; the caller
/// frees `held` after its purge.
fn area_beside_neighbour(
    pages: usize,
    held: &mut Vec<*mut u8>,
) -> Result<(*mut u8, *mut u8), &'static str> {
    let vm = mm::vmalloc();
    for _ in 0..8 {
        let neighbour = vm.vmalloc(PAGE).map_err(|_| "vmalloc failed")?.as_ptr();
        held.push(neighbour);
        let area = vm.vmalloc(pages * PAGE).map_err(|_| "vmalloc failed")?;
        let (first, last) = (area.addr().get(), area.addr().get() + pages * PAGE - 1);
        let table = page_table_of(neighbour as u64);
        if page_table_of(first as u64) == table && page_table_of(last as u64) == table {
            return Ok((neighbour, area.as_ptr()));
        }
        held.push(area.as_ptr());
    }
    Err("no area landed in its neighbour's page table")
}

/// After `vfree` the entries are detached at once (an untouched page faults, not
/// present); after `purge` every page whose translation was cached faults too. A
/// live neighbour keeps the page table, so only the purge's own flush of the area
/// can drop those translations.
pub fn use_after_free_faults(_ctx: &mut Ctx) -> Outcome {
    // Nothing else on the purge list: its flush is the area's alone.
    mm::vmalloc().purge();
    // Made now: growing it later could map heap pages between the touch and the probe.
    let mut held = Vec::with_capacity(16);
    let outcome = area_beside_neighbour(TOUCHED_PAGES + 1, &mut held)
        .and_then(|(_, area)| faults_after_free(area));
    // Freed only now: their purge may free page tables, and that flush covers the area.
    let freed = vfree_all(&held);
    outcome.and(freed)
}

/// The body of [`use_after_free_faults`]: touches the first [`TOUCHED_PAGES`] pages
/// of the area at `ptr` (one more page, untouched, follows), frees and purges it.
fn faults_after_free(ptr: *mut u8) -> Outcome {
    let vm = mm::vmalloc();
    let page = |index: usize| addr(ptr) + (index * PAGE) as u64;
    let mut cached = true;
    for index in 0..TOUCHED_PAGES {
        let word = page(index).as_mut_ptr::<u64>();
        // SAFETY: a page of the live area, mapped writable.
        cached &= unsafe {
            word.write_volatile(index as u64);
            word.read_volatile() == index as u64
        };
    }
    // SAFETY: the check made this area and does not use it again.
    unsafe { vm.vfree(ptr) }.map_err(|_| "vfree failed")?;
    ensure(cached, "the area did not read back what was written")?;
    ensure(
        vm.stats().pending_purge_pages == (TOUCHED_PAGES + 1) as u64,
        "vfree did not defer to the purge list",
    )?;
    // Only a stale TLB entry could still reach the area; the untouched page has none.
    let untouched = page(TOUCHED_PAGES);
    // SAFETY: vmalloc region; a fault is recovered.
    let before_purge = unsafe { probe_read(untouched) };
    ensure(
        is_not_present_fault_at(before_purge, untouched),
        "detached page still readable before purge",
    )?;
    ensure(
        diagnosed(
            before_purge,
            "use after free: read of an area (36 KiB vmalloc at",
        ),
        "the fault before the purge is not diagnosed as a use after free",
    )?;
    vm.purge();
    ensure(
        (0..TOUCHED_PAGES).all(|index| {
            // SAFETY: as above.
            let read = unsafe { probe_read(page(index)) };
            is_not_present_fault_at(read, page(index))
        }),
        "a freed page whose translation was cached is readable after purge (not flushed)",
    )
}

/// Whether `probe` faulted and the manager's diagnosis of the fault contains `text`.
pub(super) fn diagnosed<T>(probe: Result<T, crate::fault::Fault>, text: &str) -> bool {
    probe.is_err_and(|fault| {
        let diagnosis = mm::vmalloc().diagnose_fault(fault.addr, fault.code);
        alloc::format!("{diagnosis}").contains(text)
    })
}

/// A two-page area and a one-page neighbour allocated right after it: one guard page
/// past the area's end, or (guard missing) right at it, which the probes must catch.
/// Pairs placed apart stay allocated in `held` for the caller to free.
fn area_then_neighbour(held: &mut Vec<*mut u8>) -> Result<(*mut u8, *mut u8), &'static str> {
    let vm = mm::vmalloc();
    for _ in 0..8 {
        let area = vm.vmalloc(2 * PAGE).map_err(|_| "vmalloc failed")?.as_ptr();
        held.push(area);
        let neighbour = vm.vmalloc(PAGE).map_err(|_| "vmalloc failed")?.as_ptr();
        held.push(neighbour);
        let end = addr(area) + (2 * PAGE) as u64;
        if [end, end + PAGE as u64].contains(&addr(neighbour)) {
            return Ok((area, neighbour));
        }
    }
    Err("no neighbour landed right after the area")
}

/// The page after an area is an unmapped guard, even with another area allocated
/// right after it: reading or writing the guard faults there.
pub fn guard_page_faults(_ctx: &mut Ctx) -> Outcome {
    let mut held = Vec::with_capacity(16);
    let outcome =
        area_then_neighbour(&mut held).and_then(|(area, neighbour)| guard_between(area, neighbour));
    let freed = vfree_all(&held);
    outcome.and(freed)
}

/// The body of [`guard_page_faults`].
fn guard_between(area: *mut u8, neighbour: *mut u8) -> Outcome {
    let last_word = addr(area) + (2 * PAGE - 8) as u64;
    let guard = addr(area) + (2 * PAGE) as u64;
    // SAFETY: the last word of the area, then its guard page (or, were the guard
    // missing, the first word of the neighbour, which is ours); faults are recovered.
    let (inside, read, write) = unsafe {
        (
            probe_write(last_word, 1),
            probe_read(guard),
            probe_write(guard, 1),
        )
    };
    ensure(inside.is_ok(), "the area's last word is not writable")?;
    ensure(
        is_not_present_fault_at(read, guard),
        "reading the guard page did not fault there",
    )?;
    ensure(
        write.is_err_and(|fault| {
            fault.addr == guard && fault.code.contains(PageFaultErrorCode::CAUSED_BY_WRITE)
        }),
        "writing the guard page did not fault there",
    )?;
    ensure(
        diagnosed(write, "write past the end of an area (8 KiB vmalloc at")
            && diagnosed(write, "checks/faults.rs:")
            && diagnosed(write, ", 0 bytes past it: guard page"),
        "the guard-page write is not diagnosed as a run past the area's end",
    )?;
    ensure(
        addr(neighbour) == guard + PAGE as u64,
        "the neighbour does not start one guard page after the area",
    )
}

/// A read-only area reads, and a write to it faults with P = 1, W = 1 there.
pub fn readonly_write_faults(_ctx: &mut Ctx) -> Outcome {
    let vm = mm::vmalloc();
    let options = VmOptions {
        prot: Prot::READ,
        ..VmOptions::default()
    };
    let ptr = vm
        .vmalloc_with(PAGE, &options)
        .map_err(|_| "vmalloc_with(Prot::READ) failed")?
        .as_ptr();
    let at = addr(ptr) + 8u64;
    // SAFETY: a live area of ours; a fault is recovered.
    let (read, write) = unsafe { (probe_read(at), probe_write(at, 1)) };
    // SAFETY: the check made this area and does not use it again.
    unsafe { vm.vfree(ptr) }.map_err(|_| "vfree failed")?;
    vm.purge();
    ensure(read.is_ok(), "reading a read-only area faulted")?;
    let write = write.err().ok_or("writing a read-only area succeeded")?;
    ensure(
        write.addr == at
            && write.code.contains(
                PageFaultErrorCode::PROTECTION_VIOLATION | PageFaultErrorCode::CAUSED_BY_WRITE,
            ),
        "writing a read-only area did not fault with P=1, W=1 there",
    )?;
    set_prot_read_only()
}

/// A read-write area, written (so the TLB holds a writable translation), then made
/// read-only with `set_prot`: the next write faults, so the old translation was
/// flushed.
fn set_prot_read_only() -> Outcome {
    let vm = mm::vmalloc();
    let ptr = vm.vmalloc(PAGE).map_err(|_| "vmalloc failed")?.as_ptr();
    let at = addr(ptr) + 8u64;
    // SAFETY: a live area of ours, read-write until `set_prot`; faults are recovered.
    let before = unsafe { probe_write(at, 1) };
    // SAFETY: the check made this area and does not use it again.
    let changed = unsafe { vm.set_prot(ptr, Prot::READ) };
    // SAFETY: as above.
    let after = unsafe { probe_write(at, 2) };
    // SAFETY: the check made this area and does not use it again.
    unsafe { vm.vfree(ptr) }.map_err(|_| "vfree failed")?;
    vm.purge();
    ensure(
        before.is_ok() && changed.is_ok(),
        "writing before set_prot failed",
    )?;
    ensure(
        after.is_err_and(|fault| {
            fault
                .code
                .contains(PageFaultErrorCode::PROTECTION_VIOLATION)
        }),
        "a write after set_prot(READ) did not fault: the writable translation was not flushed",
    )
}

/// vmalloc data is not executable: a `ret` written there faults on fetch.
pub fn nx_faults(_ctx: &mut Ctx) -> Outcome {
    let vm = mm::vmalloc();
    let ptr = vm.vmalloc(PAGE).map_err(|_| "vmalloc failed")?.as_ptr();
    // SAFETY: a live, writable page.
    unsafe { ptr.write_volatile(0xc3) };
    // SAFETY: the target is a `ret`; the NX fetch fault is recovered.
    let result = unsafe { probe_exec(addr(ptr)) };
    // SAFETY: the check made this area and does not use it again.
    unsafe { vm.vfree(ptr) }.map_err(|_| "vfree failed")?;
    let fetch = PageFaultErrorCode::INSTRUCTION_FETCH | PageFaultErrorCode::PROTECTION_VIOLATION;
    ensure(
        result.is_err_and(|fault| fault.addr == addr(ptr) && fault.code.contains(fetch)),
        "executing vmalloc data did not fault with the fetch bit",
    )
}

/// Recurses until the stack runs out (the depth is opaque to the optimiser).
extern "C" fn overflow_the_stack() {
    fn deep(depth: u64) -> u64 {
        let mut frame = [0u8; 512];
        core::hint::black_box(&mut frame);
        if core::hint::black_box(depth) == u64::MAX {
            return 0;
        }
        deep(depth + 1) + u64::from(frame[core::hint::black_box(1)])
    }
    core::hint::black_box(deep(0));
}

/// Uses a little of the stack and returns.
extern "C" fn use_the_stack() {
    let frame = [7u8; 1024];
    core::hint::black_box(&frame);
}

/// A vmalloc'd kernel stack works, and a deliberate overflow of it faults in the
/// unmapped memory below it, on the page-fault handler's IST stack (not a double or
/// triple fault); the manager's diagnosis names it an overflow of that stack.
pub fn kernel_stack_overflow(_ctx: &mut Ctx) -> Outcome {
    const SIZE: u64 = 16 << 10;
    let vm = mm::vmalloc();
    let stack = vm
        .alloc_stack(SIZE as usize)
        .map_err(|_| "alloc_stack failed")?;
    let guard = stack.base() - SIZE..stack.base();
    ensure(
        stack.base().as_u64() % SIZE == 0,
        "the stack is not aligned to its size",
    )?;
    // SAFETY: a mapped, writable stack of this CPU's alone, unmapped below; the
    // functions only use their own frames.
    let (shallow, overflow) = unsafe {
        (
            run_on_stack(stack.top(), guard.clone(), use_the_stack),
            run_on_stack(stack.top(), guard, overflow_the_stack),
        )
    };
    let expected = alloc::format!(
        "below 'kernel stack' (16 KiB stack at {:#x}, allocated at",
        stack.base().as_u64()
    );
    // Asked while the stack lives, as a fault handler would.
    let named = diagnosed(overflow, &expected) && diagnosed(overflow, "stack overflow");
    drop(stack);
    vm.purge();
    ensure(shallow.is_ok(), "a function that fits faulted on the stack")?;
    ensure(
        named,
        "the overflow was not diagnosed as an overflow of that stack",
    )
}
