//! QEMU's own page walk as the oracle: the kernel makes areas of every kind, writes a
//! tag into each page through its virtual address, and tells the test harness on
//! COM2 what each page must be: `walk <va> <tag> <pa> <flags>`, where `<pa>` is what
//! the library answers (`vmalloc_to_frame`), or the frame or MMIO address the check
//! itself mapped, and `<flags>` the leaf entry's flags in the order QEMU's `info tlb`
//! prints them (`XGPDACTUW`; `?` for the accessed and dirty bits the CPU sets), or
//! `none` for a page that must not be mapped (a guard page, a freed area). Then it
//! waits; and once more after it freed everything, when every page must be gone. The harness (`tests/qemu.rs`) asks QEMU's monitor for `info tlb` and reads
//! each tagged page's physical memory (`xp`) where QEMU's walk of the live page
//! tables says it is, compares, and sends a byte back. A `walk-control` line names a
//! tag no page holds: the harness must find it wrong (the negative control).

use super::infra::local_apic;
use super::library::{MIB, Outcome, PAGE, addr};
use super::{Ctx, ensure};
use crate::mm;
use crate::serial::{Harness, harness_byte};
use core::fmt::Write;
use core::ptr::NonNull;
use vmalloc::vmalloc::{CacheMode, Prot};
use x86_64::VirtAddr;

/// Line-status polls the kernel waits for the harness's answer: tens of seconds
/// under TCG; the harness's own timeout names the check first.
const ANSWER_SPINS: u64 = 1 << 32;

/// Leaf flags as `info tlb` prints them.
const RW_NX: &str = "XG-??---W";
const RO_NX: &str = "XG-??----";
const RO_X: &str = "-G-??----";
const HUGE_RW_NX: &str = "XGP??---W";
const UNCACHED_RW_NX: &str = "XG-??CT-W";

/// Tags each page of `pages` at `ptr` and describes it.
fn tagged(ptr: NonNull<u8>, pages: usize, flags: &str, seed: u64) -> Outcome {
    for page in 0..pages {
        let va = addr(ptr.as_ptr()) + (page * PAGE) as u64;
        let tag = tag_of(seed, page);
        // SAFETY: the page is inside a live, writable area this check made.
        unsafe { va.as_mut_ptr::<u64>().write_volatile(tag) };
        describe(va, Some(tag), flags)?;
    }
    Ok(())
}

fn tag_of(seed: u64, page: usize) -> u64 {
    0x5741_4c4b_0000_0000 | seed << 16 | page as u64
}

/// The line for a mapped page whose frame the library names.
fn describe(va: VirtAddr, tag: Option<u64>, flags: &str) -> Outcome {
    let frame = mm::vmalloc()
        .vmalloc_to_frame(va)
        .map_err(|_| "vmalloc_to_frame refused a page of a live area")?;
    line("walk", va, tag, Some(frame.start_address().as_u64()), flags);
    Ok(())
}

fn line(kind: &str, va: VirtAddr, tag: Option<u64>, pa: Option<u64>, flags: &str) {
    let hex = |value: Option<u64>| value.map_or("-".into(), |v| alloc::format!("{v:x}"));
    let _ = writeln!(
        Harness,
        "{kind} {:x} {} {} {flags}",
        va.as_u64(),
        hex(tag),
        hex(pa)
    );
}

/// Areas of every kind, each page as QEMU's walk must find it.
pub fn qemu_walk_agrees(ctx: &mut Ctx) -> Outcome {
    let vm = mm::vmalloc();
    let small = vm.vmalloc(3 * PAGE).map_err(|_| "vmalloc failed")?;
    let large = vm.vmalloc(40 * PAGE).map_err(|_| "vmalloc failed")?;
    let read_only = vm.vmalloc(2 * PAGE).map_err(|_| "vmalloc failed")?;
    let code = vm.vmalloc(PAGE).map_err(|_| "vmalloc failed")?;
    let huge = vm
        .vmalloc_huge(2 * MIB + PAGE)
        .map_err(|_| "vmalloc_huge failed")?;
    let lent = &ctx.test_frames[..2];
    // SAFETY: the kernel image's test frames, which only checks use, one at a time.
    let vmapped = unsafe { vm.vmap(lent, Prot::READ | Prot::WRITE) }.map_err(|_| "vmap failed")?;
    let (apic, _) = local_apic();
    // SAFETY: the local APIC's MMIO page; nothing is read or written through it.
    let mmio =
        unsafe { vm.ioremap(apic, PAGE, CacheMode::Uncached) }.map_err(|_| "ioremap failed")?;
    let freed = vm.vmalloc(PAGE).map_err(|_| "vmalloc failed")?;

    tagged(small, 3, RW_NX, 1)?;
    line(
        "walk",
        addr(small.as_ptr()) + 3 * PAGE as u64,
        None,
        None,
        "none",
    );
    tagged(large, 40, RW_NX, 2)?;
    tagged(read_only, 2, RO_NX, 3)?;
    tagged(code, 1, RO_X, 4)?;
    // SAFETY: the check's own areas; nothing writes them after this.
    unsafe {
        vm.set_prot(read_only.as_ptr(), Prot::READ)
            .map_err(|_| "set_prot failed")?;
        vm.set_prot(code.as_ptr(), Prot::READ | Prot::EXEC)
            .map_err(|_| "set_prot failed")?;
    }
    let huge_va = addr(huge.as_ptr());
    for (offset, flags, page) in [(0, HUGE_RW_NX, 0), (2 * MIB, RW_NX, 1)] {
        let va = huge_va + offset as u64;
        let tag = tag_of(5, page);
        // SAFETY: inside the live huge area.
        unsafe { va.as_mut_ptr::<u64>().write_volatile(tag) };
        describe(va, Some(tag), flags)?;
    }
    for (page, frame) in lent.iter().enumerate() {
        let va = addr(vmapped.as_ptr()) + (page * PAGE) as u64;
        let tag = tag_of(6, page);
        // SAFETY: the vmapped test frame, writable.
        unsafe { va.as_mut_ptr::<u64>().write_volatile(tag) };
        // The frame the check lent, not the library's answer.
        line(
            "walk",
            va,
            Some(tag),
            Some(frame.start_address().as_u64()),
            RW_NX,
        );
    }
    line(
        "walk",
        addr(mmio.as_ptr()),
        None,
        Some(apic.as_u64()),
        UNCACHED_RW_NX,
    );
    let freed_va = addr(freed.as_ptr());
    // SAFETY: the check's own area, not used again.
    unsafe { vm.vfree(freed.as_ptr()) }.map_err(|_| "vfree failed")?;
    vm.purge();
    line("walk", freed_va, None, None, "none");
    // The control: a tag no page holds.
    let small_va = addr(small.as_ptr());
    line(
        "walk-control",
        small_va,
        Some(tag_of(1, 0) ^ 1),
        Some(
            vm.vmalloc_to_frame(small_va)
                .map_or(0, |f| f.start_address().as_u64()),
        ),
        RW_NX,
    );
    let answered = ask();

    // Freed, unmapped and purged, every page is gone from QEMU's walk too.
    let areas = [
        (small, 3),
        (large, 40),
        (read_only, 2),
        (code, 1),
        (vmapped, 2),
        (mmio, 1),
    ];
    // SAFETY: the check's own areas, not used again.
    unsafe {
        for area in [small, large, read_only, code, huge] {
            vm.vfree(area.as_ptr()).map_err(|_| "vfree failed")?;
        }
        vm.vunmap(vmapped.as_ptr(), |_| ())
            .map_err(|_| "vunmap failed")?;
        vm.iounmap(mmio.as_ptr()).map_err(|_| "iounmap failed")?;
    }
    vm.purge();
    for (area, pages) in areas {
        let start = addr(area.as_ptr()).align_down(PAGE as u64);
        for page in 0..pages {
            line("walk", start + (page * PAGE) as u64, None, None, "none");
        }
    }
    line("walk", huge_va, None, None, "none");
    line("walk", huge_va + (2 * MIB) as u64, None, None, "none");
    ensure(
        answered && ask(),
        "no answer from the test harness on COM2 (the kernel is run by tests/qemu.rs)",
    )
}

/// Tells the harness the pages described are ready, and waits for its answer.
fn ask() -> bool {
    let _ = writeln!(Harness, "walk-wait");
    harness_byte(ANSWER_SPINS) == Some(b'g')
}
