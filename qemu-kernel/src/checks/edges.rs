//! Checks of paths the host suite covers and the MMU checks did not: `set_prot` on
//! areas outside the per-CPU blocks, zeroing of areas the blocks serve and of the
//! part a shrink dropped, the stack cache, NX across a 2 MiB split, double frees of
//! frames, and heap blocks aligned beyond their size class.

use super::{Ctx, SpareSlot, ensure, spare_region};
use crate::fault::{probe_exec, probe_read, probe_write};
use crate::mm::{self, Manager};
use crate::paging::leaf_entry;
use crate::smp::{self, KernelCpus};
use alloc::vec::Vec;
use core::alloc::Layout;
use vmalloc::vmalloc::{Prot, StackCache, VmOptions};
use vmalloc::{Error, FrameSource};
use x86_64::VirtAddr;
use x86_64::structures::idt::PageFaultErrorCode;
use x86_64::structures::paging::{PageTableFlags, PhysFrame};

type Outcome = Result<(), &'static str>;

const PAGE: usize = 4096;
const MIB: usize = 1 << 20;
/// The most pages a per-CPU block serves in one area (`percpu::MAX_BLOCK_PAGES`).
const BLOCK_MAX_PAGES: usize = 16;
/// An x86 `ret`.
const RET: u8 = 0xc3;

fn addr(ptr: *mut u8) -> VirtAddr {
    VirtAddr::from_ptr(ptr)
}

/// Whether every byte of `len` bytes at `ptr` is `value`.
///
/// # Safety
///
/// `ptr..ptr + len` is mapped and readable.
unsafe fn all_bytes(ptr: *const u8, len: usize, value: u8) -> bool {
    // SAFETY: forwarded.
    unsafe { core::slice::from_raw_parts(ptr, len) }
        .iter()
        .all(|&byte| byte == value)
}

fn vfree_and_purge(ptrs: &[*mut u8]) -> Outcome {
    let vm = mm::vmalloc();
    // SAFETY: each area was made by the calling check, which does not use it again.
    let freed = ptrs.iter().all(|&ptr| unsafe { vm.vfree(ptr) }.is_ok());
    vm.purge();
    ensure(freed, "vfree failed")
}

/// The leaf flags `Prot` asks for, as the MMU reads them (present and global too).
fn leaf_flags_of(prot: Prot) -> PageTableFlags {
    let mut flags = PageTableFlags::PRESENT | PageTableFlags::GLOBAL;
    flags.set(PageTableFlags::WRITABLE, prot.contains(Prot::WRITE));
    flags.set(PageTableFlags::NO_EXECUTE, !prot.contains(Prot::EXEC));
    flags
}

/// Whether every page of `pages` pages from `start` has a 4 KiB leaf entry whose
/// flags are exactly those of `prot` (no user, cache-type or other bit), but for the
/// accessed and dirty bits the MMU sets.
fn leaves_have(ctx: &Ctx, start: VirtAddr, pages: usize, prot: Prot) -> bool {
    let wanted = leaf_flags_of(prot);
    let set_by_the_mmu = PageTableFlags::ACCESSED | PageTableFlags::DIRTY;
    (0..pages).all(|page| {
        leaf_entry(&ctx.phys, ctx.pml4, start + (page * PAGE) as u64)
            .is_some_and(|leaf| leaf.level == 1 && leaf.flags - set_by_the_mmu == wanted)
    })
}

fn is_write_protection_fault(result: Result<(), crate::fault::Fault>, at: VirtAddr) -> bool {
    result.is_err_and(|fault| {
        fault.addr == at
            && fault.code.contains(
                PageFaultErrorCode::PROTECTION_VIOLATION | PageFaultErrorCode::CAUSED_BY_WRITE,
            )
    })
}

fn is_fetch_protection_fault(result: Result<(), crate::fault::Fault>, at: VirtAddr) -> bool {
    result.is_err_and(|fault| {
        fault.addr == at
            && fault.code.contains(
                PageFaultErrorCode::PROTECTION_VIOLATION | PageFaultErrorCode::INSTRUCTION_FETCH,
            )
    })
}

/// Pages of [`set_prot_tree_area`]'s area: more than a per-CPU block serves.
const TREE_PAGES: usize = 24;
/// The page of that area holding a `ret`, and its offset there.
const CODE_PAGE: usize = 20;
const CODE_OFFSET: usize = 64;

/// `set_prot` on areas the per-CPU blocks do not serve (24 pages; one page with a
/// label): READ, READ|EXEC and back to KERNEL_RW each rewrite every leaf entry's
/// W and NX bits and flush the old translations, so a write (or fetch) the new
/// rights forbid faults right after, with translations cached before the change.
pub fn set_prot_tree_area(ctx: &mut Ctx) -> Outcome {
    let vm = mm::vmalloc();
    let blocks_before = vm.stats().block_areas;
    let tree = vm
        .vmalloc(TREE_PAGES * PAGE)
        .map_err(|_| "vmalloc failed")?
        .as_ptr();
    let options = VmOptions {
        tag: "set_prot check",
        ..VmOptions::default()
    };
    let labelled = match vm.vmalloc_with(PAGE, &options) {
        Ok(ptr) => ptr.as_ptr(),
        Err(_) => {
            vfree_and_purge(&[tree])?;
            return Err("vmalloc_with(tag) failed");
        }
    };
    let outcome = ensure(
        vm.stats().block_areas == blocks_before,
        "a 24-page or labelled area came from a per-CPU block",
    )
    .and_then(|()| protections_of_tree_area(ctx, tree))
    .and_then(|()| labelled_area_read_only(ctx, labelled));
    vfree_and_purge(&[tree, labelled])?;
    outcome
}

/// The body of [`set_prot_tree_area`] for the 24-page area at `ptr`.
fn protections_of_tree_area(ctx: &Ctx, ptr: *mut u8) -> Outcome {
    let vm = mm::vmalloc();
    let start = addr(ptr);
    let page = |index: usize| start + (index * PAGE) as u64;
    let code = page(CODE_PAGE) + CODE_OFFSET as u64;
    for index in 0..TREE_PAGES {
        // SAFETY: the first word of a page of the live, writable area: every page's
        // writable translation is cached.
        unsafe { page(index).as_mut_ptr::<u64>().write_volatile(index as u64) };
    }
    // SAFETY: inside the live, writable area.
    unsafe { code.as_mut_ptr::<u8>().write_volatile(RET) };
    ensure(
        leaves_have(ctx, start, TREE_PAGES, Prot::KERNEL_RW),
        "a fresh area's leaf entries are not present, global, writable and NX",
    )?;

    // SAFETY: nothing writes the area while it is read-only but the probes below.
    unsafe { vm.set_prot(ptr, Prot::READ) }.map_err(|_| "set_prot(READ) failed")?;
    ensure(
        leaves_have(ctx, start, TREE_PAGES, Prot::READ),
        "after set_prot(READ) a leaf entry is writable or executable",
    )?;
    for index in [0, TREE_PAGES / 2, TREE_PAGES - 1] {
        // SAFETY: a page of the live area; the write faults, or (flush missing)
        // rewrites the word it holds.
        let write = unsafe { probe_write(page(index), index as u64) };
        ensure(
            is_write_protection_fault(write, page(index)),
            "a write after set_prot(READ) did not fault: a writable translation survived",
        )?;
        // SAFETY: a page of the live area, readable.
        let read = unsafe { probe_read(page(index)) };
        ensure(
            read == Ok(index as u64),
            "a read-only page does not read what was written before",
        )?;
    }

    // SAFETY: the area holds data and one `ret`; only the probe below runs it.
    unsafe { vm.set_prot(ptr, Prot::READ | Prot::EXEC) }
        .map_err(|_| "set_prot(READ | EXEC) failed")?;
    ensure(
        leaves_have(ctx, start, TREE_PAGES, Prot::READ | Prot::EXEC),
        "after set_prot(READ | EXEC) a leaf entry is writable or NX",
    )?;
    // SAFETY: a `ret`, written above, in an area now mapped executable.
    let run = unsafe { probe_exec(code) };
    ensure(
        run.is_ok(),
        "the area made executable did not run its `ret`",
    )?;

    // SAFETY: the area is plain data again; the probes below test that.
    unsafe { vm.set_prot(ptr, Prot::KERNEL_RW) }.map_err(|_| "set_prot(KERNEL_RW) failed")?;
    ensure(
        leaves_have(ctx, start, TREE_PAGES, Prot::KERNEL_RW),
        "after set_prot(KERNEL_RW) a leaf entry is read-only or executable",
    )?;
    // SAFETY: inside the live area, writable again; a fault is recovered.
    let write = unsafe { probe_write(page(1), 1) };
    ensure(
        write.is_ok(),
        "the area made writable again did not take a write",
    )?;
    // SAFETY: the `ret` again, now in NX memory: the fetch faults and is recovered.
    let run = unsafe { probe_exec(code) };
    ensure(
        is_fetch_protection_fault(run, code),
        "a fetch after set_prot(KERNEL_RW) ran: an executable translation survived",
    )
}

/// A labelled one-page area (outside the blocks) made read-only faults on a write.
fn labelled_area_read_only(ctx: &Ctx, ptr: *mut u8) -> Outcome {
    let at = addr(ptr) + 8u64;
    // SAFETY: a word of the live, writable area; caches its writable translation.
    unsafe { at.as_mut_ptr::<u64>().write_volatile(7) };
    // SAFETY: nothing writes the area after this but the probe below.
    unsafe { mm::vmalloc().set_prot(ptr, Prot::READ) }
        .map_err(|_| "set_prot(READ) of a labelled area failed")?;
    // SAFETY: the live area; the write faults, or (flush missing) rewrites the word.
    let write = unsafe { probe_write(at, 8) };
    ensure(
        leaves_have(ctx, addr(ptr), 1, Prot::READ),
        "the labelled area's leaf entry is still writable",
    )?;
    ensure(
        is_write_protection_fault(write, at),
        "a write to the labelled area after set_prot(READ) did not fault",
    )
}

/// Block-sized areas of [`vzalloc_block_zeroed`]: together more than a CPU's lazy
/// list holds, so their frees are flushed and the frames cached for reuse.
const DIRTY_AREAS: usize = 16;

/// `vzalloc` from the per-CPU blocks (16 pages, no label) zeroes frames that
/// `vmalloc` areas dirtied, recycled through the CPU's own frame cache without a
/// purge.
pub fn vzalloc_block_zeroed(_ctx: &mut Ctx) -> Outcome {
    let vm = mm::vmalloc();
    vm.purge();
    let blocks_before = vm.stats().block_areas;
    let mut dirtied = Vec::with_capacity(DIRTY_AREAS * BLOCK_MAX_PAGES);
    let mut areas = Vec::with_capacity(DIRTY_AREAS);
    for _ in 0..DIRTY_AREAS {
        let Ok(ptr) = vm.vmalloc(BLOCK_MAX_PAGES * PAGE) else {
            vfree_and_purge(&areas)?;
            return Err("vmalloc of a block-sized area failed");
        };
        areas.push(ptr.as_ptr());
        // SAFETY: a live area of BLOCK_MAX_PAGES pages.
        unsafe { ptr.as_ptr().write_bytes(0xa5, BLOCK_MAX_PAGES * PAGE) };
        for page in 0..BLOCK_MAX_PAGES {
            if let Ok(frame) = vm.vmalloc_to_frame(addr(ptr.as_ptr()) + (page * PAGE) as u64) {
                dirtied.push(frame);
            }
        }
    }
    let in_blocks = vm.stats().block_areas == blocks_before + DIRTY_AREAS as u64;
    // SAFETY: the areas were made above and are not used again.
    let freed = areas.drain(..).all(|ptr| unsafe { vm.vfree(ptr) }.is_ok());
    let mut zeroed_areas = Vec::with_capacity(DIRTY_AREAS);
    let mut reused = 0;
    let mut all_zero = true;
    for _ in 0..DIRTY_AREAS {
        let Ok(ptr) = vm.vzalloc(BLOCK_MAX_PAGES * PAGE) else {
            vfree_and_purge(&zeroed_areas)?;
            return Err("vzalloc of a block-sized area failed");
        };
        zeroed_areas.push(ptr.as_ptr());
        for page in 0..BLOCK_MAX_PAGES {
            let frame = vm.vmalloc_to_frame(addr(ptr.as_ptr()) + (page * PAGE) as u64);
            reused += usize::from(frame.is_ok_and(|frame| dirtied.contains(&frame)));
        }
        // SAFETY: a live area of BLOCK_MAX_PAGES pages.
        all_zero &= unsafe { all_bytes(ptr.as_ptr(), BLOCK_MAX_PAGES * PAGE, 0) };
    }
    let zeroed_in_blocks = vm.stats().block_areas == blocks_before + DIRTY_AREAS as u64;
    vfree_and_purge(&zeroed_areas)?;
    ensure(freed, "vfree of a block area failed")?;
    ensure(
        in_blocks && zeroed_in_blocks,
        "16-page areas did not come from the per-CPU blocks",
    )?;
    ensure(reused > 0, "vzalloc reused none of the dirtied frames")?;
    ensure(all_zero, "vzalloc memory from a block is not zero")
}

/// Bytes of a cached kernel stack in [`stack_cache_reuse`].
const STACK_SIZE: usize = 16 << 10;

/// A `StackCache` gives a dropped stack back to its CPU and hands it out again
/// zeroed; bound to the boot manager, it refuses another manager (`alloc` and
/// `drain`) with `Error::WrongManager`.
pub fn stack_cache_reuse(ctx: &mut Ctx) -> Outcome {
    let vm = mm::vmalloc();
    let cache = StackCache::new(KernelCpus);
    let first = cache
        .alloc(vm, STACK_SIZE)
        .map_err(|_| "StackCache::alloc failed")?;
    let base = first.base();
    // SAFETY: the whole stack, mapped writable and used by nothing.
    unsafe { base.as_mut_ptr::<u8>().write_bytes(0x5a, STACK_SIZE) };
    drop(first);
    let parked = cache.cached() == 1;
    let again = cache
        .alloc(vm, STACK_SIZE)
        .map_err(|_| "StackCache::alloc of a cached stack failed")?;
    let same = again.base() == base;
    // SAFETY: the whole stack, mapped and used by nothing.
    let zeroed = unsafe { all_bytes(again.base().as_ptr(), STACK_SIZE, 0) };
    let refused = refuses_other_manager(ctx, &cache);
    drop(again);
    let drained = cache.drain(vm);
    vm.purge();
    ensure(parked, "a dropped stack did not go back to the cache")?;
    ensure(same, "the cache did not hand out the stack it held")?;
    ensure(zeroed, "a stack from the cache is not zeroed")?;
    refused?;
    ensure(
        drained.is_ok() && cache.cached() == 0,
        "draining the cache into its own manager failed",
    )
}

/// A manager of its own, made and dropped here: `cache` (bound to the boot manager)
/// refuses it, and it gives every frame back when dropped.
fn refuses_other_manager(ctx: &Ctx, cache: &StackCache<KernelCpus>) -> Outcome {
    let free_before = mm::frames().stats().free;
    let config = spare_region(SpareSlot::StackCacheOther, false);
    // SAFETY: the region's top-level slot is empty and no address space copies it;
    // the frame allocator's frames are RAM the physical map reaches; the shootdown
    // flushes every CPU.
    let other = unsafe { Manager::new(config, ctx.pml4, ctx.phys, mm::frames(), &smp::TLB) }
        .map_err(|_| "a second manager could not be made")?;
    let alloc = cache.alloc(&other, STACK_SIZE).map(|stack| stack.base());
    let drain = cache.drain(&other);
    drop(other);
    ensure(
        alloc == Err(Error::WrongManager),
        "a cache bound to one manager served another",
    )?;
    ensure(
        drain == Err(Error::WrongManager),
        "a cache bound to one manager drained into another",
    )?;
    ensure(
        mm::frames().stats().free == free_before,
        "the second manager did not give its frames back",
    )
}

/// A 4 MiB `vmalloc_huge` area (two 2 MiB entries, NX) shrunk to 3 MiB: the second
/// 2 MiB entry is split into 4 KiB entries that keep NX (and the rest of its
/// flags, and its frames), so a fetch from the split part faults, as from the 2 MiB
/// part before it.
pub fn huge_split_keeps_nx(ctx: &mut Ctx) -> Outcome {
    const SIZE: usize = 4 * MIB;
    const CUT: usize = 3 * MIB;
    let vm = mm::vmalloc();
    let ptr = vm
        .vmalloc_huge(SIZE)
        .map_err(|_| "vmalloc_huge failed")?
        .as_ptr();
    let outcome = split_keeps_nx(ctx, ptr, CUT);
    vfree_and_purge(&[ptr])?;
    outcome
}

/// The body of [`huge_split_keeps_nx`] for the 4 MiB area at `ptr`, cut at `cut`.
fn split_keeps_nx(ctx: &Ctx, ptr: *mut u8, cut: usize) -> Outcome {
    let start = addr(ptr);
    let second = start + (2 * MIB) as u64;
    let leaf = |at: VirtAddr| leaf_entry(&ctx.phys, ctx.pml4, at);
    let huge_nx = [start, second].map(|at| {
        leaf(at)
            .is_some_and(|leaf| leaf.level == 2 && leaf.flags.contains(PageTableFlags::NO_EXECUTE))
    });
    ensure(
        huge_nx == [true, true],
        "not two 2 MiB NX entries (no 2 MiB run free?)",
    )?;
    let huge_base = leaf(second).map(|leaf| leaf.addr).ok_or("no 2 MiB entry")?;
    let code = [start + 64u64, second + (5 * PAGE + 64) as u64];
    for at in code {
        // SAFETY: inside the live, writable area.
        unsafe { at.as_mut_ptr::<u8>().write_volatile(RET) };
    }
    // SAFETY: the area is this check's; shrunk in place (checked), it stays at `ptr`.
    let shrunk = unsafe { mm::vmalloc().vrealloc(ptr, cut) }.map(|p| p.as_ptr());
    ensure(
        shrunk == Ok(ptr),
        "the shrink inside a 2 MiB mapping failed or moved",
    )?;
    let split_pages = (cut - 2 * MIB) / PAGE;
    ensure(
        leaf(start).is_some_and(|leaf| leaf.level == 2),
        "the untouched 2 MiB entry changed",
    )?;
    ensure(
        leaves_have(ctx, second, split_pages, Prot::KERNEL_RW),
        "a 4 KiB entry split from an NX 2 MiB entry lost NX (or present, global, writable)",
    )?;
    ensure(
        (0..split_pages).all(|page| {
            let at = second + (page * PAGE) as u64;
            leaf(at).is_some_and(|leaf| leaf.addr == huge_base + (page * PAGE) as u64)
        }),
        "the split entries do not map the 2 MiB page's frames in order",
    )?;
    for at in code {
        // SAFETY: a `ret` in NX memory: the fetch faults and is recovered.
        let run = unsafe { probe_exec(at) };
        ensure(
            is_fetch_protection_fault(run, at),
            "a fetch from a huge area (2 MiB part or split part) did not fault",
        )?;
    }
    Ok(())
}

/// Freeing a frame twice is refused with `FrameNotAllocated` and changes nothing,
/// one by one or in a bulk free that lists a frame twice (which frees none of them).
pub fn frame_double_free_refused(_ctx: &mut Ctx) -> Outcome {
    let frames = mm::frames();
    let mut pair = [PhysFrame::containing_address(x86_64::PhysAddr::zero()); 2];
    ensure(frames.alloc_bulk(&mut pair) == 2, "no two frames to free")?;
    let [once, twice] = pair;
    // SAFETY: the check took this frame and no longer uses it (or a bad free, refused).
    unsafe { frames.free_frame(once) }.map_err(|_| "freeing an allocated frame failed")?;
    let stats = frames.stats();
    // SAFETY: the check took this frame and no longer uses it (or a bad free, refused).
    let again = unsafe { frames.free_frame(once) };
    let unchanged = frames.stats() == stats && frames.is_free(once) == Ok(true);
    // SAFETY: the check took this frame and no longer uses it (or a bad free, refused).
    let bulk = unsafe { frames.free_frames(&[twice, twice]) };
    let none_freed = frames.is_free(twice) == Ok(false) && frames.stats() == stats;
    // SAFETY: the check took this frame and no longer uses it (or a bad free, refused).
    let taken_back = unsafe { frames.free_frames(&[twice]) };
    ensure(
        again == Err(Error::FrameNotAllocated),
        "a double free was not refused with FrameNotAllocated",
    )?;
    ensure(unchanged, "a refused double free changed the allocator")?;
    ensure(
        bulk == Err(Error::FrameNotAllocated),
        "a bulk free listing a frame twice was not refused with FrameNotAllocated",
    )?;
    ensure(none_freed, "a refused bulk free freed some of its frames")?;
    ensure(taken_back.is_ok(), "the frame could not be freed after all")
}

/// A zeroed area, written everywhere, shrunk (to a size inside a page) and grown
/// back: what it kept reads as written, everything past the shrink reads zero. Once
/// for an area in a per-CPU block and once for one outside.
pub fn vrealloc_regrow_zeroed(_ctx: &mut Ctx) -> Outcome {
    let vm = mm::vmalloc();
    let blocks_before = vm.stats().block_areas;
    regrow_zeroed(8, 3 * PAGE + 100)?;
    ensure(
        vm.stats().block_areas == blocks_before,
        "a block area was left behind",
    )?;
    regrow_zeroed(40, 13 * PAGE + 100)
}

/// [`vrealloc_regrow_zeroed`] for a `pages`-page area shrunk to `kept` bytes.
fn regrow_zeroed(pages: usize, kept: usize) -> Outcome {
    let vm = mm::vmalloc();
    let blocks_before = vm.stats().block_areas;
    let size = pages * PAGE;
    let ptr = vm.vzalloc(size).map_err(|_| "vzalloc failed")?.as_ptr();
    let in_block = vm.stats().block_areas == blocks_before + 1;
    // SAFETY: the live area of `size` bytes.
    unsafe { ptr.write_bytes(0xff, size) };
    // SAFETY: the area is this check's; its new pointer replaces the old one.
    let shrunk = match unsafe { vm.vrealloc(ptr, kept) } {
        Ok(shrunk) => shrunk.as_ptr(),
        Err(_) => {
            vfree_and_purge(&[ptr])?;
            return Err("vrealloc to a smaller size failed");
        }
    };
    // SAFETY: the first `kept` bytes of the live, shrunk area.
    let kept_after_shrink = unsafe { all_bytes(shrunk, kept, 0xff) };
    // SAFETY: as above.
    let grown = match unsafe { vm.vrealloc(shrunk, size) } {
        Ok(grown) => grown.as_ptr(),
        Err(_) => {
            vfree_and_purge(&[shrunk])?;
            return Err("vrealloc back to the larger size failed");
        }
    };
    // SAFETY: the live area of `size` bytes again.
    let (kept_after_growth, zero_past_cut) = unsafe {
        (
            all_bytes(grown, kept, 0xff),
            all_bytes(grown.add(kept), size - kept, 0),
        )
    };
    vfree_and_purge(&[grown])?;
    ensure(
        in_block == (pages <= BLOCK_MAX_PAGES),
        "the area did not come from where its size sends it (block or tree)",
    )?;
    ensure(
        kept_after_shrink && kept_after_growth,
        "vrealloc lost the bytes it kept",
    )?;
    ensure(
        zero_past_cut,
        "a zeroed area grown back after a shrink shows old bytes past the cut",
    )
}

/// Layouts aligned beyond their size class, and blocks of each held at once.
const OVERALIGNED: [(usize, usize); 6] = [
    (24, 256),
    (100, 4096),
    (5000, 8192),
    (8, 128),
    (3000, 2048),
    (20_000, 16_384),
];
const BLOCKS_PER_LAYOUT: usize = 8;

/// Heap blocks aligned beyond their size class (24 bytes at 256, 100 at 4096, 5000
/// at 8192, ...) are aligned, do not overlap, keep what is written, stay aligned
/// and keep it through `realloc`, and are all given back.
pub fn heap_overaligned(_ctx: &mut Ctx) -> Outcome {
    let heap_before = mm::HEAP.stats();
    let mut blocks: Vec<(*mut u8, Layout)> =
        Vec::with_capacity(OVERALIGNED.len() * BLOCKS_PER_LAYOUT);
    let mut outcome = Ok(());
    for (size, align) in OVERALIGNED {
        let layout = Layout::from_size_align(size, align).map_err(|_| "bad layout")?;
        for _ in 0..BLOCKS_PER_LAYOUT {
            // SAFETY: a layout of non-zero size.
            let ptr = unsafe { alloc::alloc::alloc(layout) };
            if ptr.is_null() {
                outcome = Err("an over-aligned allocation failed");
                break;
            }
            blocks.push((ptr, layout));
        }
    }
    for (index, &(ptr, layout)) in blocks.iter().enumerate() {
        // SAFETY: a live block of `layout.size()` bytes.
        unsafe { ptr.write_bytes(index as u8, layout.size()) };
    }
    if outcome.is_ok() {
        outcome = overaligned_blocks_hold(&mut blocks);
    }
    for &(ptr, layout) in &blocks {
        // SAFETY: allocated (or reallocated) above with this layout, freed once.
        unsafe { alloc::alloc::dealloc(ptr, layout) };
    }
    drop(blocks);
    mm::HEAP.shrink();
    mm::vmalloc().purge();
    outcome?;
    let heap_after = mm::HEAP.stats();
    ensure(
        heap_after.slab_objects == heap_before.slab_objects
            && heap_after.large_blocks == heap_before.large_blocks,
        "over-aligned blocks were not all given back",
    )
}

/// The checks of [`heap_overaligned`] on its live `blocks`, each filled with its
/// index; the first of each layout is reallocated to three times its size.
fn overaligned_blocks_hold(blocks: &mut [(*mut u8, Layout)]) -> Outcome {
    ensure(
        blocks
            .iter()
            .all(|&(ptr, layout)| (ptr as usize).is_multiple_of(layout.align())),
        "an over-aligned block is not aligned",
    )?;
    let mut spans: Vec<(usize, usize)> = blocks
        .iter()
        .map(|&(ptr, layout)| (ptr as usize, ptr as usize + layout.size()))
        .collect();
    spans.sort_unstable();
    ensure(
        spans.windows(2).all(|pair| pair[0].1 <= pair[1].0),
        "two over-aligned blocks overlap",
    )?;
    ensure(
        blocks.iter().enumerate().all(|(index, &(ptr, layout))| {
            // SAFETY: a live block of `layout.size()` bytes.
            unsafe { all_bytes(ptr, layout.size(), index as u8) }
        }),
        "an over-aligned block did not keep what was written",
    )?;
    for index in (0..blocks.len()).step_by(BLOCKS_PER_LAYOUT) {
        let (ptr, layout) = blocks[index];
        let new_size = 3 * layout.size();
        // SAFETY: a live block allocated with `layout`; the new size is non-zero and
        // small enough not to overflow when rounded up to the alignment.
        let moved = unsafe { alloc::alloc::realloc(ptr, layout, new_size) };
        if moved.is_null() {
            return Err("realloc of an over-aligned block failed");
        }
        let new_layout = Layout::from_size_align(new_size, layout.align())
            .map_err(|_| "bad layout after realloc")?;
        blocks[index] = (moved, new_layout);
        ensure(
            (moved as usize).is_multiple_of(layout.align()),
            "realloc of an over-aligned block lost its alignment",
        )?;
        // SAFETY: the first `layout.size()` bytes of the live, reallocated block.
        let kept = unsafe { all_bytes(moved, layout.size(), index as u8) };
        ensure(kept, "realloc of an over-aligned block lost its content")?;
    }
    Ok(())
}
