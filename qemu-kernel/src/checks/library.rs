//! Checks of the library on the real MMU: the frame allocator, vmalloc, the
//! fault-visible effects of freeing, protections, a second address space, ioremap,
//! the global heap and a random stress run.

use super::infra::{APIC_VERSION_REGISTER, local_apic};
use super::{Ctx, ensure};
use crate::fault::{probe_exec, probe_read, probe_write, run_on_stack};
use crate::mm;
use crate::paging::{Leaf, leaf_entry};
use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;
use vmalloc::frame::RegionKind;
use vmalloc::vmalloc::{CacheMode, Prot, VmOptions};
use vmalloc::{Error, PhysMemory};
use x86_64::instructions::tlb;
use x86_64::registers::control::Cr3;
use x86_64::structures::idt::PageFaultErrorCode;
use x86_64::structures::paging::{PageTable, PageTableFlags, PhysFrame};
use x86_64::{PhysAddr, VirtAddr};

const PAGE: usize = 4096;
const MIB: usize = 1 << 20;

type Outcome = Result<(), &'static str>;

fn addr(ptr: *mut u8) -> VirtAddr {
    VirtAddr::from_ptr(ptr)
}

/// A list with room for every free frame, made before taking them: growing it
/// afterwards would need frames.
fn frame_list() -> Vec<PhysFrame> {
    Vec::with_capacity(mm::frames().stats().free as usize)
}

/// Takes every free frame into `held`; the caller gives them back with [`free_all`].
fn take_all_frames(held: &mut Vec<PhysFrame>) -> Outcome {
    let mut chunk = [PhysFrame::containing_address(PhysAddr::zero()); 64];
    loop {
        let room = chunk.len().min(held.capacity() - held.len());
        let got = mm::frames().alloc_bulk(&mut chunk[..room]);
        if got == 0 {
            return ensure(mm::frames().stats().free == 0, "frame list too short");
        }
        held.extend_from_slice(&chunk[..got]);
    }
}

fn free_all(frames: &[PhysFrame]) -> Outcome {
    mm::frames()
        .free_bulk(frames)
        .map_err(|_| "freeing frames the allocator handed out failed")
}

/// Initialised from the boot memory map: it manages the map's usable RAM, and no
/// frame it hands out lies in the kernel image or outside that RAM.
pub fn frame_allocator(ctx: &mut Ctx) -> Outcome {
    let stats = mm::frames().stats();
    let usable: u64 = ctx
        .boot
        .memory_map
        .iter()
        .filter(|region| region.kind == RegionKind::Usable)
        .map(|region| (region.range.end - region.range.start) / PAGE as u64)
        .sum();
    ensure(
        stats.total <= usable,
        "manages more frames than the map's usable RAM",
    )?;
    // The bitmaps of 128 MiB take a couple of frames.
    ensure(
        stats.total + 16 >= usable,
        "lost usable frames beyond its bookkeeping",
    )?;
    let mut held = frame_list();
    let with_list = mm::frames().stats();
    take_all_frames(&mut held)?;
    let image = &ctx.kernel_image;
    let in_image = held
        .iter()
        .any(|frame| image.start <= frame.start_address() && frame.start_address() < image.end);
    let outside_map = held.iter().any(|frame| {
        !ctx.boot.memory_map.iter().any(|region| {
            region.kind == RegionKind::Usable && region.range.contains(&frame.start_address())
        })
    });
    let count = held.len() as u64;
    free_all(&held)?;
    let given_back = mm::frames().stats();
    drop(held);
    ensure(!in_image, "handed out a frame of the kernel image")?;
    ensure(!outside_map, "handed out a frame outside usable RAM")?;
    ensure(
        count == with_list.free,
        "frames handed out differ from the free count",
    )?;
    ensure(
        given_back == with_list,
        "stats changed after giving every frame back",
    )
}

/// A 48 MiB buffer from frames with no two physically adjacent: written through its
/// virtual address, read back through the frames `vmalloc_to_frame` reports.
pub fn vmalloc_large(ctx: &mut Ctx) -> Outcome {
    let mut held = frame_list();
    take_all_frames(&mut held)?;
    // Give back the even frames only: every free run is one frame long.
    let mut freed = true;
    held.retain(|frame| {
        let even = (frame.start_address().as_u64() / PAGE as u64).is_multiple_of(2);
        freed &= !even || mm::frames().free(*frame).is_ok();
        !even
    });
    let outcome =
        ensure(freed, "giving back a taken frame failed").and_then(|()| large_on_fragmented(ctx));
    free_all(&held)?;
    outcome
}

/// The body of [`vmalloc_large`], run while the odd frames are held.
fn large_on_fragmented(ctx: &Ctx) -> Outcome {
    const SIZE: usize = 48 * MIB;
    let pair = mm::frames().alloc_contiguous(2, 1);
    if let Ok(first) = pair {
        free_all(&[first, first + 1])?;
    }
    ensure(pair.is_err(), "two adjacent frames are still free")?;
    let vm = mm::vmalloc();
    let ptr = vm.vmalloc(SIZE).map_err(|_| "vmalloc of 48 MiB failed")?;
    let outcome = fill_and_verify_scattered(ctx, ptr.as_ptr(), SIZE);
    // SAFETY: the check made this area and does not use it again.
    unsafe { vm.vfree(ptr.as_ptr()) }.map_err(|_| "vfree failed")?;
    vm.purge();
    outcome
}

fn pattern(index: usize) -> u64 {
    (index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5a5a
}

fn fill_and_verify_scattered(ctx: &Ctx, ptr: *mut u8, size: usize) -> Outcome {
    let words = ptr.cast::<u64>();
    for i in 0..size / 8 {
        // SAFETY: `ptr` is a live vmalloc area of `size` bytes, page-aligned.
        unsafe { words.add(i).write_volatile(pattern(i)) };
    }
    let vm = mm::vmalloc();
    let mut adjacent = 0;
    let mut previous: Option<PhysFrame> = None;
    for page in 0..size / PAGE {
        let frame = vm
            .vmalloc_to_frame(addr(ptr) + (page * PAGE) as u64)
            .map_err(|_| "vmalloc_to_frame failed inside the area")?;
        if previous.is_some_and(|p| p + 1 == frame) {
            adjacent += 1;
        }
        previous = Some(frame);
        let physical = ctx.phys.phys_to_virt(frame.start_address()).cast::<u64>();
        for w in 0..PAGE / 8 {
            // SAFETY: the frame is RAM, reached through the physical map.
            let value = unsafe { physical.add(w).read_volatile() };
            ensure(
                value == pattern(page * PAGE / 8 + w),
                "frame content differs from the virtual write",
            )?;
        }
    }
    ensure(adjacent == 0, "consecutive pages sit in adjacent frames")
}

/// Frames dirtied by one area, freed and purged, come back zeroed from `vzalloc`.
pub fn vzalloc_zeroed(_ctx: &mut Ctx) -> Outcome {
    const PAGES: usize = 64;
    let vm = mm::vmalloc();
    let dirty = vm.vmalloc(PAGES * PAGE).map_err(|_| "vmalloc failed")?;
    // SAFETY: a live area of PAGES pages.
    unsafe { dirty.as_ptr().write_bytes(0xa5, PAGES * PAGE) };
    let mut dirtied = [PhysFrame::containing_address(PhysAddr::zero()); PAGES];
    for (page, frame) in dirtied.iter_mut().enumerate() {
        *frame = vm
            .vmalloc_to_frame(addr(dirty.as_ptr()) + (page * PAGE) as u64)
            .map_err(|_| "vmalloc_to_frame failed")?;
    }
    // SAFETY: the check made this area and does not use it again.
    unsafe { vm.vfree(dirty.as_ptr()) }.map_err(|_| "vfree failed")?;
    vm.purge();
    let zeroed = vm.vzalloc(PAGES * PAGE).map_err(|_| "vzalloc failed")?;
    let mut reused = 0;
    for page in 0..PAGES {
        let frame = vm.vmalloc_to_frame(addr(zeroed.as_ptr()) + (page * PAGE) as u64);
        reused += usize::from(frame.is_ok_and(|f| dirtied.contains(&f)));
    }
    // SAFETY: a live area of PAGES pages.
    let bytes = unsafe { core::slice::from_raw_parts(zeroed.as_ptr(), PAGES * PAGE) };
    let all_zero = bytes.iter().all(|&b| b == 0);
    // SAFETY: the check made this area and does not use it again.
    unsafe { vm.vfree(zeroed.as_ptr()) }.map_err(|_| "vfree failed")?;
    ensure(reused > 0, "vzalloc reused none of the dirtied frames")?;
    ensure(all_zero, "vzalloc memory is not zero")
}

fn is_not_present_fault_at(result: Result<u64, crate::fault::Fault>, at: VirtAddr) -> bool {
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

fn vfree_all(ptrs: &[*mut u8]) -> Outcome {
    let vm = mm::vmalloc();
    // SAFETY: the check made this area and does not use it again.
    let freed = ptrs.iter().all(|&ptr| unsafe { vm.vfree(ptr) }.is_ok());
    vm.purge();
    ensure(freed, "vfree failed")
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
fn diagnosed<T>(probe: Result<T, crate::fault::Fault>, text: &str) -> bool {
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
            && diagnosed(write, "checks/library.rs:")
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

/// A huge area: its 2 MiB chunks are 2 MiB entries in the real page tables, every
/// byte reads back what was written through them, the 4 KiB tail follows, and a write
/// past the end faults on the guard page and is diagnosed so. After `vfree` and the
/// purge, the area faults and every frame is back.
pub fn vmalloc_huge(ctx: &mut Ctx) -> Outcome {
    const SIZE: usize = 4 * MIB + 3 * PAGE;
    let vm = mm::vmalloc();
    let ptr = vm
        .vmalloc_huge(SIZE)
        .map_err(|_| "vmalloc_huge failed")?
        .as_ptr();
    let start = addr(ptr);
    let level = |at: VirtAddr| leaf_entry(&ctx.phys, ctx.pml4, at).map(|leaf| leaf.level);
    let shape = [0, 2 * MIB, 4 * MIB].map(|offset| level(start + offset as u64));
    let frames: Vec<PhysFrame> = (0..SIZE / PAGE)
        .filter_map(|page| leaf_entry(&ctx.phys, ctx.pml4, start + (page * PAGE) as u64))
        .enumerate()
        .map(|(page, leaf)| {
            let base = leaf
                .addr
                .align_down((PAGE << (9 * (leaf.level - 1))) as u64);
            let offset = (page * PAGE) as u64 % (PAGE << (9 * (leaf.level - 1))) as u64;
            PhysFrame::containing_address(base + offset)
        })
        .collect();
    let words = SIZE / 8;
    let base = ptr.cast::<u64>();
    for i in 0..words {
        // SAFETY: `i` < `words` keeps the write inside the live area.
        unsafe { base.add(i).write_volatile(i as u64 ^ 0x2_0000_0000) };
    }
    // SAFETY: as above, reading back.
    let intact =
        (0..words).all(|i| unsafe { base.add(i).read_volatile() } == i as u64 ^ 0x2_0000_0000);
    let guard = start + SIZE as u64;
    // SAFETY: the guard page after the area; the fault is recovered.
    let past_end = unsafe { probe_write(guard, 1) };
    let guard_diagnosed = diagnosed(past_end, "0 bytes past it: guard page");
    let huge = vm.stats().huge_mappings;
    let listed = alloc::format!("{}", vm.info()).contains("pages=1027 huge=2 vmalloc");
    // A shrink that cuts inside the second 2 MiB mapping splits it into a page table:
    // the words before the cut still read back, the page after it faults (its 2 MiB
    // translation, cached by the writes above, was flushed).
    const CUT: usize = 3 * MIB;
    // SAFETY: the check made this area and does not use it again.
    let shrunk = unsafe { vm.vrealloc(ptr, CUT) }.map(|p| p.as_ptr() == ptr);
    let split = [0, 2 * MIB].map(|offset| level(start + offset as u64)) == [Some(2), Some(1)];
    // SAFETY: as above, below the cut.
    let kept =
        (0..CUT / 8).all(|i| unsafe { base.add(i).read_volatile() } == i as u64 ^ 0x2_0000_0000);
    // SAFETY: past the cut; the fault is recovered.
    let past_cut = unsafe { probe_read(start + CUT as u64 + 8) };
    // SAFETY: the check made this area and does not use it again.
    unsafe { vm.vfree(ptr) }.map_err(|_| "vfree failed")?;
    vm.purge();
    // SAFETY: the freed area; the fault is recovered.
    let after_free = unsafe { probe_read(start + MIB as u64) };
    ensure(
        start.as_u64().is_multiple_of((2 * MIB) as u64),
        "the huge area is not 2 MiB-aligned",
    )?;
    ensure(
        shape == [Some(2), Some(2), Some(1)],
        "not two 2 MiB entries and a 4 KiB tail",
    )?;
    ensure(
        huge == 2 && listed,
        "stats or info do not show the two 2 MiB mappings",
    )?;
    ensure(intact, "a word of the huge area did not read back")?;
    ensure(
        shrunk == Ok(true) && split && kept,
        "a shrink inside a 2 MiB mapping did not split it in place, contents kept",
    )?;
    ensure(
        is_not_present_fault_at(past_cut, start + CUT as u64 + 8),
        "the page past the shrink's cut did not fault",
    )?;
    ensure(
        past_end.is_err_and(|fault| {
            fault.addr == guard && fault.code.contains(PageFaultErrorCode::CAUSED_BY_WRITE)
        }) && guard_diagnosed,
        "a write past the huge area did not fault on its guard page",
    )?;
    ensure(
        is_not_present_fault_at(after_free, start + MIB as u64),
        "the freed huge area did not fault",
    )?;
    ensure(
        frames.len() == SIZE / PAGE
            && frames
                .iter()
                .all(|&frame| mm::frames().is_free(frame) == Ok(true))
            && vm.stats().huge_mappings == 0,
        "the huge area's frames did not all come back",
    )
}

/// Frames of a lazily freed area stay allocated until the purge has flushed their
/// stale translations, and are free right after it.
pub fn no_frame_reused_before_purge(_ctx: &mut Ctx) -> Outcome {
    const PAGES: usize = 16;
    let vm = mm::vmalloc();
    // From an empty list this `vfree` stays below the lazy threshold: no purge of its own.
    vm.purge();
    let ptr = vm.vmalloc(PAGES * PAGE).map_err(|_| "vmalloc failed")?;
    let mut frames = [PhysFrame::containing_address(PhysAddr::zero()); PAGES];
    let mut found = true;
    for (page, frame) in frames.iter_mut().enumerate() {
        match vm.vmalloc_to_frame(addr(ptr.as_ptr()) + (page * PAGE) as u64) {
            Ok(mapped) => *frame = mapped,
            Err(_) => found = false,
        }
    }
    // SAFETY: the check made this area and does not use it again.
    unsafe { vm.vfree(ptr.as_ptr()) }.map_err(|_| "vfree failed")?;
    let is_free = |frame: &PhysFrame| mm::frames().is_free(*frame);
    let none_before = frames.iter().all(|frame| is_free(frame) == Ok(false));
    vm.purge();
    let all_after = frames.iter().all(|frame| is_free(frame) == Ok(true));
    ensure(found, "vmalloc_to_frame failed inside the area")?;
    ensure(
        none_before,
        "a frame of a freed area went back before the purge flushed it",
    )?;
    ensure(all_after, "the purge did not give the area's frames back")
}

/// Bytes one PML4 entry maps.
const TOP_LEVEL_SPAN: u64 = 1 << 39;

/// Runs `body` with CR3 on `pml4`, then loads the live PML4 again, whatever `body`
/// found (it reports failure by its result, never by leaving early).
fn in_address_space<R>(pml4: PhysFrame, body: impl FnOnce() -> R) -> R {
    let (live, flags) = Cr3::read();
    // SAFETY: `pml4` holds every entry of the live PML4 (the caller copied them), so
    // the kernel's code, stacks, IDT and physical map stay where they are.
    unsafe { Cr3::write(pml4, flags) };
    let result = body();
    // SAFETY: the PML4 that was live before.
    unsafe { Cr3::write(live, flags) };
    result
}

/// Reads `addr` through a fresh page walk: vmalloc pages are global, so a CR3 switch
/// keeps their translations, and only `invlpg` makes the read prove the tables the
/// current PML4 reaches.
///
/// # Safety
///
/// As [`probe_read`].
unsafe fn read_walked(addr: VirtAddr) -> Result<u64, crate::fault::Fault> {
    tlb::flush(addr);
    // SAFETY: forwarded.
    unsafe { probe_read(addr) }
}

/// A process's address space, made by copying the kernel's PML4, sees areas made
/// after the copy, and stops seeing them once they are freed and purged: the region's
/// top-level entries are fixed when the manager is set up.
pub fn second_address_space(ctx: &mut Ctx) -> Outcome {
    let copy = mm::frames().alloc().ok_or("no frame for a second PML4")?;
    let live = ctx.phys.phys_to_virt(ctx.pml4.start_address());
    // SAFETY: two whole frames of RAM through the physical map: the fresh one is
    // ours, the live PML4 is only read. All 512 entries: the kernel runs identity
    // mapped in the low half, the vmalloc region is in the high half.
    unsafe {
        core::ptr::copy_nonoverlapping(
            live.cast::<PageTable>(),
            ctx.phys
                .phys_to_virt(copy.start_address())
                .cast::<PageTable>(),
            1,
        )
    };
    let outcome = area_made_after_copy(copy);
    let freed = mm::frames().free(copy);
    outcome?;
    ensure(freed.is_ok(), "freeing the second PML4 failed")
}

/// The body of [`second_address_space`], with the copied PML4 `copy`.
fn area_made_after_copy(copy: PhysFrame) -> Outcome {
    const PAGES: usize = 2;
    let value = |page: usize| pattern(page) ^ 0xc0fe;
    let vm = mm::vmalloc();
    // Alone in its 512 GiB top-level slot: only a table that was there before the
    // copy can show it in the copy.
    let options = VmOptions {
        align: TOP_LEVEL_SPAN,
        ..VmOptions::default()
    };
    let ptr = vm
        .vmalloc_with(PAGES * PAGE, &options)
        .map_err(|_| "vmalloc failed")?
        .as_ptr();
    let start = addr(ptr);
    let slot = start.as_u64()..start.as_u64() + TOP_LEVEL_SPAN;
    let alone = vm
        .areas()
        .filter(|area| {
            area.start.as_u64() < slot.end && slot.start < area.start.as_u64() + area.span
        })
        .count()
        == 1;
    let page = |index: usize| start + (index * PAGE) as u64;
    for index in 0..PAGES {
        // SAFETY: a page of the live area, mapped writable in the live address space.
        unsafe { page(index).as_mut_ptr::<u64>().write_volatile(value(index)) };
    }
    let seen = in_address_space(copy, || {
        // SAFETY: the area's pages; a fault is recovered.
        (0..PAGES).all(|index| unsafe { read_walked(page(index)) } == Ok(value(index)))
    });
    // SAFETY: the check made this area and does not use it again.
    unsafe { vm.vfree(ptr) }.map_err(|_| "vfree failed")?;
    vm.purge();
    // SAFETY: the freed area's first page; a fault is recovered.
    let after = in_address_space(copy, || unsafe { read_walked(start) });
    ensure(
        alone,
        "another area shares the top-level slot of the test area",
    )?;
    ensure(
        seen,
        "an area made after the PML4 was copied does not read back in the copy",
    )?;
    ensure(
        is_not_present_fault_at(after, start),
        "a freed and purged area is still readable in the copy",
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

/// `ioremap` of the local APIC reads the same version register as the physical map,
/// through a 4 KiB entry the CPU treats as strong uncacheable (PCD, PWT, PAT = 0:
/// PAT entry 3, UC); `ioremap` of RAM the frame allocator manages is refused.
pub fn ioremap_apic(ctx: &mut Ctx) -> Outcome {
    let (base, _) = local_apic();
    ensure(
        base + PAGE as u64 <= ctx.physmap_end,
        "APIC is outside the physical map",
    )?;
    let vm = mm::vmalloc();
    // SAFETY: the local APIC's MMIO page; the check only reads a read-only register.
    let mmio =
        unsafe { vm.ioremap(base, PAGE, CacheMode::Uncached) }.map_err(|_| "ioremap failed")?;
    let leaf = leaf_entry(&ctx.phys, ctx.pml4, addr(mmio.as_ptr()));
    // SAFETY: the APIC page, just mapped uncached; the version register is read-only.
    let remapped = unsafe {
        mmio.as_ptr()
            .add(APIC_VERSION_REGISTER as usize)
            .cast::<u32>()
            .read_volatile()
    };
    let direct = ctx
        .phys
        .phys_to_virt(base + APIC_VERSION_REGISTER)
        .cast::<u32>();
    // SAFETY: the physical map covers the APIC (checked above); the register is read-only.
    let direct = unsafe { direct.read_volatile() };
    // SAFETY: the check made this area and does not use it again.
    unsafe { vm.iounmap(mmio.as_ptr()) }.map_err(|_| "iounmap failed")?;
    vm.purge();
    ensure(
        remapped == direct,
        "APIC version through ioremap differs from the physical map",
    )?;
    ensure(
        leaf.is_some_and(|leaf| leaf.level == 1 && leaf.addr == base),
        "the ioremap leaf entry is not a 4 KiB entry for the APIC page",
    )?;
    let uncached = PageTableFlags::NO_CACHE | PageTableFlags::WRITE_THROUGH;
    ensure(
        leaf.is_some_and(|Leaf { flags, .. }| {
            // In a 4 KiB entry `HUGE_PAGE` is the PAT bit.
            flags.contains(uncached) && !flags.contains(PageTableFlags::HUGE_PAGE)
        }),
        "the ioremap leaf entry lacks PCD and PWT (or sets PAT): not uncached",
    )?;
    ioremap_refuses_ram()
}

/// `ioremap` of a frame the allocator manages fails with `ManagedRam`: an uncached
/// alias of RAM someone else owns would break the cached view of it.
fn ioremap_refuses_ram() -> Outcome {
    let vm = mm::vmalloc();
    let ram = mm::frames().alloc().ok_or("no frame to ioremap")?;
    // SAFETY: this should be refused; if it is not, nothing touches the mapping, and
    // it is gone (unmapped and flushed) before the frame goes back.
    let result = unsafe { vm.ioremap(ram.start_address(), PAGE, CacheMode::Uncached) };
    if let Ok(mmio) = result {
        // SAFETY: the check made this area and does not use it again.
        unsafe { vm.iounmap(mmio.as_ptr()) }.map_err(|_| "iounmap failed")?;
        vm.purge();
    }
    free_all(&[ram])?;
    ensure(
        matches!(result, Err(Error::ManagedRam)),
        "ioremap of managed RAM was not refused with ManagedRam",
    )
}

/// The `#[global_allocator]` is the library's heap: collections work (their small
/// blocks from its slabs, a 4000-byte `Vec` from a slab, an 8000-byte one from the list
/// heap's window), and a multi-MiB `Vec` lives in its own vmalloc area, grows through `vrealloc`, and gives
/// every frame back when dropped and purged.
pub fn heap_global_alloc(_ctx: &mut Ctx) -> Outcome {
    let numbers: Vec<u32> = (0..1000).collect();
    let mut map = BTreeMap::new();
    for n in &numbers {
        map.insert(*n, n * 2);
    }
    let mut text = String::new();
    for n in 0..100 {
        text.push_str(if n % 2 == 0 { "even " } else { "odd " });
    }
    ensure(numbers.iter().sum::<u32>() == 499_500, "Vec content wrong")?;
    ensure(
        map.get(&999) == Some(&1998) && map.len() == 1000,
        "BTreeMap content wrong",
    )?;
    ensure(
        text.len() == 450 && text.starts_with("even odd "),
        "String content wrong",
    )?;
    let slab_objects = mm::HEAP.stats().slab_objects;
    let (in_slab, in_list) = (
        Vec::<u8>::with_capacity(4000),
        Vec::<u8>::with_capacity(8000),
    );
    ensure(
        mm::HEAP.stats().slab_objects == slab_objects + 1 && !mm::HEAP.owns_small(in_slab.as_ptr()),
        "a 4000-byte Vec did not come from a slab",
    )?;
    ensure(
        mm::HEAP.owns_small(in_list.as_ptr()),
        "an 8000-byte Vec not in the heap window",
    )?;
    drop((in_slab, in_list));

    let vm = mm::vmalloc();
    // Nothing pending: the purge below returns the Vec's frames alone.
    vm.purge();
    let free_before = mm::frames().stats().free;
    let held_before = held_by_manager();
    let heap_before = mm::HEAP.stats();
    let large_before = mm::HEAP.stats().large_blocks;
    let mut large: Vec<u64> = (0..(4 * MIB / 8) as u64).collect();
    ensure(
        mm::HEAP.stats().large_blocks == large_before + 1,
        "4 MiB Vec did not go to vmalloc",
    )?;
    ensure(
        vm.is_vmalloc_addr(VirtAddr::from_ptr(large.as_ptr())),
        "4 MiB Vec outside vmalloc",
    )?;
    let frame_of = |v: &Vec<u64>| vm.vmalloc_to_frame(VirtAddr::from_ptr(v.as_ptr()));
    let first_frame = frame_of(&large);
    large.reserve_exact(4 * MIB / 8);
    // `vrealloc` remaps the old frames; allocate-copy-free would have new ones.
    let remapped = first_frame.is_ok() && frame_of(&large) == first_frame;
    large.extend((4 * MIB / 8) as u64..(8 * MIB / 8) as u64);
    let intact = large.iter().enumerate().all(|(i, &v)| v == i as u64);
    ensure(
        mm::HEAP.stats().large_blocks == large_before + 1,
        "growing made another block",
    )?;
    drop(large);
    vm.purge();
    // Every frame is back but those the manager's tables and bookkeeping, or the
    // list heap's window and the slabs, grew by (any may also shrink: signed
    // arithmetic).
    let heap_after = mm::HEAP.stats();
    let heap_grown = (heap_after.mapped + heap_after.slab_bytes) as i64
        - (heap_before.mapped + heap_before.slab_bytes) as i64;
    let grown = held_by_manager() as i64 - held_before as i64 + heap_grown / PAGE as i64;
    let leaked = free_before as i64 - grown - mm::frames().stats().free as i64;
    ensure(intact, "Vec content changed when it grew to 8 MiB")?;
    ensure(
        remapped,
        "growing did not keep the Vec's frames (no vrealloc)",
    )?;
    ensure(
        mm::HEAP.stats().large_blocks == large_before,
        "dropped Vec still counted",
    )?;
    ensure(
        leaked == 0,
        "frames of the dropped 8 MiB Vec did not come back after purge",
    )
}

/// Small areas [`info_listing_under_global_heap`] lists.
const LISTED_AREAS: usize = 1000;

/// A `/proc/vmallocinfo` listing formatted into a `String` on the global heap: the
/// `String` grows through the heap, which grows through the manager, so a listing
/// that held the manager's lock while writing would deadlock here.
pub fn info_listing_under_global_heap(_ctx: &mut Ctx) -> Outcome {
    let vm = mm::vmalloc();
    let mut areas = Vec::with_capacity(LISTED_AREAS);
    let mut made = true;
    for _ in 0..LISTED_AREAS {
        match vm.vmalloc(PAGE) {
            Ok(ptr) => areas.push(ptr.as_ptr()),
            Err(_) => made = false,
        }
    }
    let listing = if made {
        alloc::format!("{}", vm.info())
    } else {
        String::new()
    };
    let lines = listing
        .lines()
        .filter(|line| line.contains("vmalloc"))
        .count();
    // Past the heap's large threshold, the `String` grew through `vrealloc`.
    let grew_through_vmalloc = !mm::HEAP.owns_small(listing.as_ptr());
    drop(listing);
    let freed = vfree_all(&areas);
    ensure(made, "vmalloc of a small area failed")?;
    freed?;
    ensure(
        lines >= LISTED_AREAS,
        "the listing lacks a vmalloc line per area",
    )?;
    ensure(
        grew_through_vmalloc,
        "the listing never grew past the small heap (no vmalloc call while listing)",
    )
}

/// xorshift64: the stress run's deterministic randomness.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Vmalloc,
    Vmap,
}

/// A live allocation of the stress run: its pages hold `seed ^ page`.
#[derive(Clone, Copy)]
struct Slot {
    ptr: *mut u8,
    pages: usize,
    seed: u64,
    kind: Kind,
}

const SLOTS: usize = 32;
const MAX_PAGES: u64 = 24;
const VMAP_PAGES: usize = 8;

fn write_pages(slot: &Slot, from: usize) {
    for page in from..slot.pages {
        // SAFETY: page `page` of a live, writable area.
        unsafe {
            slot.ptr
                .add(page * PAGE)
                .cast::<u64>()
                .write_volatile(slot.seed ^ page as u64)
        };
    }
}

fn pages_intact(slot: &Slot) -> bool {
    (0..slot.pages).all(|page| {
        // SAFETY: page `page` of a live area.
        unsafe {
            slot.ptr.add(page * PAGE).cast::<u64>().read_volatile() == slot.seed ^ page as u64
        }
    })
}

fn stress_alloc(rng: &mut XorShift) -> Result<Slot, &'static str> {
    let vm = mm::vmalloc();
    let seed = rng.next();
    if rng.below(4) == 0 {
        let mut frames = [PhysFrame::containing_address(PhysAddr::zero()); VMAP_PAGES];
        let pages = 1 + rng.below(VMAP_PAGES as u64) as usize;
        ensure(
            mm::frames().alloc_bulk(&mut frames[..pages]) == pages,
            "out of frames for vmap",
        )?;
        // SAFETY: frames this check took from the allocator and frees after vunmap.
        let ptr =
            unsafe { vm.vmap(&frames[..pages], Prot::KERNEL_RW) }.map_err(|_| "vmap failed")?;
        return Ok(Slot {
            ptr: ptr.as_ptr(),
            pages,
            seed,
            kind: Kind::Vmap,
        });
    }
    let pages = 1 + rng.below(MAX_PAGES) as usize;
    let ptr = vm.vmalloc(pages * PAGE).map_err(|_| "vmalloc failed")?;
    Ok(Slot {
        ptr: ptr.as_ptr(),
        pages,
        seed,
        kind: Kind::Vmalloc,
    })
}

fn stress_free(slot: &Slot) -> Outcome {
    ensure(pages_intact(slot), "area content changed")?;
    let vm = mm::vmalloc();
    match slot.kind {
        // SAFETY: the check made this area and does not use it again.
        Kind::Vmalloc => unsafe { vm.vfree(slot.ptr) }.map_err(|_| "vfree failed"),
        Kind::Vmap => {
            let mut freed = true;
            // SAFETY: the check made this area and does not use it again.
            unsafe { vm.vunmap(slot.ptr, |frame| freed &= mm::frames().free(frame).is_ok()) }
                .map_err(|_| "vunmap failed")?;
            ensure(freed, "a vunmapped frame was not the caller's")
        }
    }
}

fn stress_realloc(slot: &mut Slot, rng: &mut XorShift) -> Outcome {
    ensure(pages_intact(slot), "area content changed before vrealloc")?;
    let pages = 1 + rng.below(2 * MAX_PAGES) as usize;
    // SAFETY: the slot's area is this check's; its old pointer is replaced below.
    let ptr =
        unsafe { mm::vmalloc().vrealloc(slot.ptr, pages * PAGE) }.map_err(|_| "vrealloc failed")?;
    let kept = slot.pages.min(pages);
    *slot = Slot {
        ptr: ptr.as_ptr(),
        pages: kept,
        ..*slot
    };
    ensure(pages_intact(slot), "vrealloc lost content")?;
    slot.pages = pages;
    write_pages(slot, kept);
    Ok(())
}

fn held_by_manager() -> u64 {
    let stats = mm::vmalloc().stats();
    stats.page_table_frames + stats.bookkeeping_frames
}

/// 4000 seeded random vmalloc/vfree/vmap/vunmap/vrealloc/purge steps with content
/// checks; afterwards every frame is back except those the manager's own page
/// tables and bookkeeping grew by.
pub fn stress(_ctx: &mut Ctx) -> Outcome {
    conserves_frames(|| random_steps(0x2545_f491_4f6c_dd1d, 4000))
}

/// Runs `run`, purges, and checks that every frame is back except those the
/// manager's own page tables and bookkeeping grew by.
pub(super) fn conserves_frames(run: impl FnOnce() -> Outcome) -> Outcome {
    let vm = mm::vmalloc();
    vm.purge();
    let free_before = mm::frames().stats().free;
    let held_before = held_by_manager();
    run()?;
    vm.purge();
    // The manager's own tables may have grown or shrunk: signed arithmetic.
    let grown = held_by_manager() as i64 - held_before as i64;
    ensure(
        vm.stats().pending_purge_frames == 0,
        "frames still pending after purge",
    )?;
    ensure(
        mm::frames().stats().free as i64 == free_before as i64 - grown,
        "frames lost or duplicated by the stress run",
    )
}

/// `steps` random vmalloc/vfree/vmap/vunmap/vrealloc/purge steps from `seed`, each
/// area's pages checked before it is freed; frees what is left at the end.
pub(super) fn random_steps(seed: u64, steps: usize) -> Outcome {
    let vm = mm::vmalloc();
    let mut rng = XorShift(seed);
    let mut slots: [Option<Slot>; SLOTS] = [None; SLOTS];
    for _ in 0..steps {
        let index = rng.below(SLOTS as u64) as usize;
        match (slots[index].as_mut(), rng.below(8)) {
            (_, 0) => vm.purge(),
            (None, _) => {
                let slot = stress_alloc(&mut rng)?;
                write_pages(&slot, 0);
                slots[index] = Some(slot);
            }
            (Some(slot), 1..=2) if matches!(slot.kind, Kind::Vmalloc) => {
                stress_realloc(slot, &mut rng)?
            }
            (Some(slot), _) => {
                stress_free(slot)?;
                slots[index] = None;
            }
        }
    }
    slots.iter().flatten().try_for_each(stress_free)
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
