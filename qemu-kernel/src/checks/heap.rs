//! Checks of the global heap on the library: collections, a large `Vec` through
//! vmalloc and `vrealloc`, and a listing formatted while the heap grows.

use super::library::{MIB, Outcome, PAGE, held_by_manager, vfree_all};
use super::{Ctx, ensure};
use crate::mm;
use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;
use x86_64::VirtAddr;

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
