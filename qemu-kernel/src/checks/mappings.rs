//! Checks of how areas appear in the real page tables: 2 MiB entries of huge areas,
//! a second address space, and `ioremap`'s uncached entries.

use super::faults::{diagnosed, is_not_present_fault_at};
use super::infra::{APIC_VERSION_REGISTER, local_apic};
use super::library::{MIB, Outcome, PAGE, addr, free_all, pattern};
use super::{Ctx, ensure};
use crate::fault::{probe_read, probe_write};
use crate::mm;
use crate::paging::{Leaf, leaf_entry};
use alloc::vec::Vec;
use vmalloc::vmalloc::{CacheMode, VmOptions};
use vmalloc::{Error, PhysMemory};
use x86_64::VirtAddr;
use x86_64::instructions::tlb;
use x86_64::registers::control::Cr3;
use x86_64::structures::idt::PageFaultErrorCode;
use x86_64::structures::paging::{PageTable, PageTableFlags, PhysFrame};

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
    // SAFETY: the check took this frame and no longer uses it (or a bad free, refused).
    let freed = unsafe { mm::frames().free(copy) };
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
