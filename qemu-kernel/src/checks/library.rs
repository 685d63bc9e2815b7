//! Checks of the library's allocation paths on the real MMU: the frame allocator,
//! vmalloc over scattered frames, zeroed and lazily freed frames, and a random
//! stress run; and the helpers the other check modules share.

use super::{Ctx, ensure};
use crate::mm;
use alloc::vec::Vec;
use vmalloc::PhysMemory;
use vmalloc::frame::RegionKind;
use vmalloc::vmalloc::Prot;
use x86_64::structures::paging::PhysFrame;
use x86_64::{PhysAddr, VirtAddr};

pub(super) const PAGE: usize = 4096;
pub(super) const MIB: usize = 1 << 20;

pub(super) type Outcome = Result<(), &'static str>;

pub(super) fn addr(ptr: *mut u8) -> VirtAddr {
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

pub(super) fn free_all(frames: &[PhysFrame]) -> Outcome {
    // SAFETY: the check took this frame and no longer uses it (or a bad free, refused).
    unsafe { mm::frames().free_bulk(frames) }
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
        // SAFETY: the check took this frame and no longer uses it (or a bad free, refused).
        freed &= !even || unsafe { mm::frames().free(*frame) }.is_ok();
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

pub(super) fn pattern(index: usize) -> u64 {
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

pub(super) fn vfree_all(ptrs: &[*mut u8]) -> Outcome {
    let vm = mm::vmalloc();
    // SAFETY: the check made this area and does not use it again.
    let freed = ptrs.iter().all(|&ptr| unsafe { vm.vfree(ptr) }.is_ok());
    vm.purge();
    ensure(freed, "vfree failed")
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

pub(super) fn held_by_manager() -> u64 {
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
