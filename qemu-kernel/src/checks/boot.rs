//! What a kernel without a map of all physical memory uses (the `bootloader` crate
//! with only `map-page-table-recursively`): a recursive PML4 entry, a
//! `RecursivePhysMemory` window filled on demand through it, and a manager of its
//! own over that window, on the real MMU.

use super::{Ctx, ensure};
use crate::fault::probe_read;
use crate::mm;
use crate::paging::leaf_entry;
use crate::smp;
use vmalloc::frame::MapperFrames;
use vmalloc::phys::RecursivePhysMemory;
use vmalloc::vmalloc::{Vmalloc, VmallocConfig};
use vmalloc::{FrameSource, PhysMemory};
use x86_64::VirtAddr;
use x86_64::structures::paging::{PageTableFlags, PageTableIndex};

type Outcome = Result<(), &'static str>;

/// PML4 slots this check takes for good (a window is never torn down): above the
/// spare slots, below the scratch window. The recursive entry, the window, and the
/// region of the manager over the window.
const RECURSIVE: u16 = 496;
const WINDOW: u16 = 497;
const REGION: u16 = 498;
const GIB: u64 = 1 << 30;

/// A recursive entry in CR3's PML4, a window over all RAM through it, the same bytes
/// through the window and the physical map, and a manager over the window that
/// maps, zeroes, frees and gives back every frame as the boot manager does.
pub fn recursive_window_manager(ctx: &mut Ctx) -> Outcome {
    let pml4 = ctx
        .phys
        .phys_to_virt(ctx.pml4.start_address())
        .cast::<u64>();
    let entry = |slot: u16| pml4.wrapping_add(slot.into());
    let used = [RECURSIVE, WINDOW, REGION].map(|slot| {
        // SAFETY: an entry of CR3's PML4, reached through the physical map.
        unsafe { entry(slot).read_volatile() }
    });
    ensure(used == [0; 3], "a PML4 slot of this check is in use")?;
    let flags = PageTableFlags::PRESENT | PageTableFlags::WRITABLE;
    // SAFETY: an entry of CR3's PML4, reached through the physical map; it was
    // empty, so no CPU caches anything of it.
    unsafe { entry(RECURSIVE).write_volatile(ctx.pml4.start_address().as_u64() | flags.bits()) };
    let top = ctx.boot.ram_end.as_u64();
    let free_before = mm::frames().stats().free;
    let (recursive, window) = (PageTableIndex::new(RECURSIVE), PageTableIndex::new(WINDOW));
    // SAFETY: slot RECURSIVE maps CR3's PML4 onto itself, on every CPU (one PML4);
    // slot WINDOW has been empty since boot; all RAM lies below `ram_end`; the frames
    // come from the kernel's allocator.
    let phys = unsafe {
        RecursivePhysMemory::new(recursive, window, top, &mut MapperFrames(mm::frames()))
    }
    .map_err(|_| "the window could not be made")?;
    ensure(
        free_before - mm::frames().stats().free == 1 + top.div_ceil(GIB),
        "the window took other than a PDPT and a PD per GiB",
    )?;
    same_bytes(ctx, &phys)?;
    manager(ctx, &phys)
}

/// A frame written through one map reads back through the other, and the window
/// maps it with a 2 MiB entry at `window + phys`.
fn same_bytes(ctx: &Ctx, phys: &RecursivePhysMemory) -> Outcome {
    let frame = mm::frames().alloc_frame().ok_or("no frame")?;
    let at = frame.start_address();
    let (offset, window) = (ctx.phys.phys_to_virt(at), phys.phys_to_virt(at));
    let (offset, window) = (offset.cast::<u64>(), window.cast::<u64>());
    // SAFETY: a frame of our own, reached through both maps; 8 bytes, aligned.
    let (seen, back) = unsafe {
        offset.write_volatile(0x5eed_0001);
        let seen = window.read_volatile();
        window.add(1).write_volatile(0x5eed_0002);
        (seen, offset.add(1).read_volatile())
    };
    let leaf = leaf_entry(&ctx.phys, ctx.pml4, VirtAddr::from_ptr(window));
    // SAFETY: the check took this frame and no longer uses it (or a bad free, refused).
    let freed = unsafe { mm::frames().free_frame(frame) };
    ensure(
        seen == 0x5eed_0001,
        "the window does not show what the physical map wrote",
    )?;
    ensure(
        back == 0x5eed_0002,
        "the physical map does not show what the window wrote",
    )?;
    ensure(
        window as u64 == phys.window().as_u64() + at.as_u64(),
        "the window is not an offset map",
    )?;
    ensure(
        leaf.is_some_and(|leaf| leaf.level == 2),
        "the window is not mapped with 2 MiB entries",
    )?;
    ensure(freed.is_ok(), "the frame did not go back")
}

/// A manager over the window, in its own top-level slot: zeroed areas whose pages
/// lead to the frames it reports, faults after `vfree` and the purge, every frame
/// back when dropped.
fn manager(ctx: &Ctx, phys: &RecursivePhysMemory) -> Outcome {
    let free_before = mm::frames().stats().free;
    let config = VmallocConfig {
        start: VirtAddr::new_truncate(u64::from(REGION) << 39),
        size: 1 << 39,
        ..VmallocConfig::default()
    };
    // SAFETY: the region's slot is empty and no address space copies it; the window
    // reaches every frame the allocator hands out; the shootdown flushes every CPU.
    let vm = unsafe { Vmalloc::new(config, ctx.pml4, phys, mm::frames(), &smp::TLB) }
        .map_err(|_| "a manager over the window could not be made")?;
    let mut areas = [core::ptr::null_mut(); 3];
    let mut outcome = Ok(());
    for (area, size) in areas.iter_mut().zip([4096, 64 << 10, 3 << 20]) {
        let Ok(ptr) = vm.vzalloc(size) else {
            outcome = Err("vzalloc over the window failed");
            break;
        };
        *area = ptr.as_ptr();
        outcome = outcome.and(pages_lead_to_frames(ctx, &vm, *area, size));
    }
    for &area in areas.iter().filter(|area| !area.is_null()) {
        // SAFETY: an area of this manager that nothing uses after this.
        outcome = outcome.and(unsafe { vm.vfree(area) }.map_err(|_| "vfree failed"));
    }
    vm.purge();
    // SAFETY: a probe; the area is freed and purged, so the read faults.
    let gone = unsafe { probe_read(VirtAddr::from_ptr(areas[1])) }.is_err();
    drop(vm);
    outcome?;
    ensure(gone, "a freed area still reads after the purge")?;
    ensure(
        mm::frames().stats().free == free_before,
        "the manager over the window did not give its frames back",
    )
}

/// Every page of the `size` bytes at `ptr` reads zero and, once written through the
/// area, shows the value at the frame `vmalloc_to_frame` names, read through the
/// physical map.
fn pages_lead_to_frames<F, M, T>(
    ctx: &Ctx,
    vm: &Vmalloc<F, M, T>,
    ptr: *mut u8,
    size: usize,
) -> Outcome
where
    F: FrameSource + Clone,
    M: PhysMemory + Copy,
    T: vmalloc::TlbFlush,
{
    for page in (0..size).step_by(4096) {
        let at = ptr.wrapping_add(page).cast::<u64>();
        let tag = 0xa11c_0000 + page as u64;
        // SAFETY: inside a live, writable area of `size` bytes.
        let zero = unsafe { at.read_volatile() };
        // SAFETY: as above.
        unsafe { at.write_volatile(tag) };
        let frame = vm
            .vmalloc_to_frame(VirtAddr::from_ptr(at))
            .map_err(|_| "no frame")?;
        let through_map = ctx.phys.phys_to_virt(frame.start_address()).cast::<u64>();
        // SAFETY: the area's frame, reached through the physical map.
        let seen = unsafe { through_map.read_volatile() };
        ensure(zero == 0, "a vzalloc page over the window is not zeroed")?;
        ensure(
            seen == tag,
            "a page does not lead to the frame the manager names",
        )?;
    }
    Ok(())
}
