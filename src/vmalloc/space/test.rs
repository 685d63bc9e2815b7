//! Tests of the node pool, the free-space allocator and the area map.

extern crate std;

use super::super::nodes::NodePool;
use super::super::options::{VMALLOC_SIZE, VMALLOC_START};
use super::*;
use crate::frame::{BitmapFrameAllocator, FaultInjector, LockedFrameAllocator, MemoryRegion};
use crate::{Error, OffsetPhysMemory, PAGE_SIZE};
use proptest::prelude::*;
use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::vec::Vec;
use x86_64::VirtAddr;

/// Host memory posing as physical memory, its frames handed out by the library's own
/// allocator behind a fault injector.
struct TestFrames {
    buffer: *mut u8,
    layout: Layout,
    frames: FaultInjector<LockedFrameAllocator<'static>>,
}

impl TestFrames {
    /// `frame_count` frames to hand out: 1 to `frame_count` (frame 0 never is).
    fn new(frame_count: usize) -> Self {
        let bytes = (frame_count + 1) * PAGE_SIZE as usize;
        let layout = Layout::from_size_align(bytes, 4096).unwrap();
        // SAFETY: the layout has a non-zero size.
        let buffer = unsafe { alloc_zeroed(layout) };
        assert!(!buffer.is_null());
        let map = [MemoryRegion::usable(0, bytes as u64)];
        let words = BitmapFrameAllocator::storage_words(map.iter().cloned());
        // Leaked: a few words per test.
        let storage = Vec::leak(std::vec![0; words]);
        let allocator = LockedFrameAllocator::with_storage(map, storage).unwrap();
        Self {
            buffer,
            layout,
            frames: FaultInjector::new(allocator),
        }
    }

    fn phys(&self) -> OffsetPhysMemory {
        // SAFETY: every frame handed out lies in `buffer`, which lives as long as `self`.
        unsafe { OffsetPhysMemory::new(VirtAddr::new(self.buffer as u64)) }
    }

    fn available(&self) -> usize {
        self.frames.inner().stats().free as usize
    }
}

impl Drop for TestFrames {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.buffer, self.layout) };
    }
}

type Pool<'a> = NodePool<&'a FaultInjector<LockedFrameAllocator<'static>>, OffsetPhysMemory>;

fn pool(frames: &TestFrames) -> Pool<'_> {
    NodePool::new::<u64>(&frames.frames, frames.phys())
}

const PAGE: u64 = PAGE_SIZE;

fn va(addr: u64) -> VirtAddr {
    VirtAddr::new(addr)
}

fn free_list(space: &VSpace) -> Vec<(u64, u64)> {
    space.iter_free().map(|(s, n)| (s.as_u64(), n)).collect()
}

#[test]
fn pool_grows_by_frames_and_reuses_freed_slots() {
    let frames = TestFrames::new(8);
    let mut pool = pool(&frames);
    assert_eq!(pool.frames_held(), 0);
    pool.reserve(1).unwrap();
    assert_eq!(pool.frames_held(), 1);
    assert_eq!(frames.available(), 7);
    let per_frame = pool.slots_per_frame();
    assert_eq!(pool.free_slots(), per_frame);
    let node = pool.take(7u64);
    // SAFETY: taken from this pool just above, not linked anywhere.
    unsafe { pool.give(node.cast()) };
    pool.reserve(per_frame).unwrap();
    assert_eq!(pool.frames_held(), 1, "freed slot reused, no new frame");
    pool.reserve(per_frame + 1).unwrap();
    assert_eq!(pool.frames_held(), 2);
    assert_eq!(pool.page_frames().count(), 2);
}

#[test]
fn a_failed_reserve_keeps_its_frames_for_the_rollback_to_give_back() {
    let frames = TestFrames::new(8);
    let mut pool = NodePool::with_slot_size(&frames.frames, frames.phys(), 1024);
    frames.frames.fail_after(1);
    assert_eq!(pool.reserve(4), Err(Error::OutOfFrames));
    assert_eq!(pool.frames_held(), 1, "the frame it got is an empty page");
    let mut back = Vec::new();
    pool.shrink_to(0, |frame| back.push(frame));
    assert_eq!(
        (back.len(), pool.frames_held(), pool.free_slots()),
        (1, 0, 0)
    );
    back.into_iter()
        // SAFETY: frames the test took and no longer uses (or a bad free, refused).
        .for_each(|frame| unsafe { frames.frames.free_frame(frame) }.unwrap());
    assert_eq!(frames.available(), 8);
    pool.reserve(4).unwrap();
    assert_eq!(pool.frames_held(), 2);
}

#[test]
fn default_region_is_linux_vmalloc_range() {
    let frames = TestFrames::new(4);
    let mut pool = pool(&frames);
    let space = VSpace::new(&mut pool, va(VMALLOC_START), VMALLOC_SIZE).unwrap();
    assert_eq!(space.region_start(), va(0xffff_c900_0000_0000));
    assert_eq!(space.region_size(), 32 << 40);
    assert_eq!(space.free_total(), 32 << 40);
    assert_eq!(space.largest_free(), 32 << 40);
}

#[test]
fn bad_regions_are_refused() {
    let frames = TestFrames::new(4);
    let mut pool = pool(&frames);
    let mut new = |start: u64, size| VSpace::new(&mut pool, va(start), size).err();
    assert_eq!(new(0x1000, 0), Some(Error::ZeroSize));
    assert_eq!(new(0x1800, 0x1000), Some(Error::Unaligned));
    assert_eq!(new(0x1000, 0x1000), None);
    assert_eq!(new(0x1000, 0x1800), Some(Error::Unaligned));
    assert_eq!(new(0xffff_ffff_ffff_f000, 0x1000), Some(Error::RangeWraps));
    assert_eq!(new(0x7fff_ffff_f000, 0x2000), Some(Error::NonCanonical));
}

#[test]
fn alloc_is_lowest_first_fit_and_free_coalesces() {
    let frames = TestFrames::new(4);
    let mut pool = pool(&frames);
    let base = VMALLOC_START;
    let mut space = VSpace::new(&mut pool, va(base), 64 * PAGE).unwrap();
    let a = space.alloc(&mut pool, PAGE, 1).unwrap();
    let b = space.alloc(&mut pool, 2 * PAGE, 1).unwrap();
    let c = space.alloc(&mut pool, PAGE, 1).unwrap();
    assert_eq!(
        [a, b, c].map(VirtAddr::as_u64),
        [base, base + PAGE, base + 3 * PAGE]
    );
    space.free(&mut pool, b, 2 * PAGE).unwrap();
    assert_eq!(space.alloc(&mut pool, PAGE, 1).unwrap(), b, "hole reused");
    space.free(&mut pool, b, PAGE).unwrap();
    space.free(&mut pool, a, PAGE).unwrap();
    assert_eq!(free_list(&space)[0], (base, 3 * PAGE));
    space.free(&mut pool, c, PAGE).unwrap();
    assert_eq!(free_list(&space), [(base, 64 * PAGE)]);
    assert_eq!(space.free_total(), 64 * PAGE);
}

#[test]
fn alignment_is_honoured_and_huge_alignments_fail_cleanly() {
    let frames = TestFrames::new(4);
    let mut pool = pool(&frames);
    let mut space = VSpace::new(&mut pool, va(VMALLOC_START), VMALLOC_SIZE).unwrap();
    let first = space.alloc(&mut pool, PAGE, 1).unwrap();
    let aligned = space.alloc(&mut pool, PAGE, 1 << 30).unwrap();
    assert_eq!(aligned.as_u64() % (1 << 30), 0);
    assert!(aligned > first);
    for shift in 0..64 {
        let before = free_list(&space);
        match space.alloc(&mut pool, PAGE, 1 << shift) {
            Ok(addr) => {
                assert_eq!(addr.as_u64() % (1 << shift), 0);
                space.free(&mut pool, addr, PAGE).unwrap();
            }
            Err(error) => assert_eq!(error, Error::OutOfVirtualSpace, "shift {shift}"),
        }
        assert_eq!(free_list(&space), before);
    }
    assert_eq!(
        space.alloc(&mut pool, PAGE, 1 << 63),
        Err(Error::OutOfVirtualSpace)
    );
}

#[test]
fn bad_requests_are_refused_and_change_nothing() {
    let frames = TestFrames::new(4);
    let mut pool = pool(&frames);
    let mut space = VSpace::new(&mut pool, va(VMALLOC_START), 16 * PAGE).unwrap();
    let cases = [
        (0, 1, Error::ZeroSize),
        (100, 1, Error::Unaligned),
        (PAGE, 0, Error::BadAlignment),
        (PAGE, 3 << 12, Error::BadAlignment),
        (32 * PAGE, 1, Error::SizeTooLarge),
    ];
    for (size, align, error) in cases {
        assert_eq!(space.alloc(&mut pool, size, align), Err(error));
    }
    space.alloc(&mut pool, 16 * PAGE, 1).unwrap();
    assert_eq!(
        space.alloc(&mut pool, PAGE, 1),
        Err(Error::OutOfVirtualSpace)
    );
    assert_eq!((space.free_total(), space.largest_free()), (0, 0));
}

#[test]
fn extend_grows_into_free_tail_only() {
    let frames = TestFrames::new(4);
    let mut pool = pool(&frames);
    let base = VMALLOC_START;
    let mut space = VSpace::new(&mut pool, va(base), 8 * PAGE).unwrap();
    let a = space.alloc(&mut pool, PAGE, 1).unwrap();
    assert!(space.try_extend(&mut pool, a, PAGE, 3 * PAGE));
    let b = space.alloc(&mut pool, PAGE, 1).unwrap();
    assert_eq!(b.as_u64(), base + 3 * PAGE);
    assert!(
        !space.try_extend(&mut pool, a, 3 * PAGE, 4 * PAGE),
        "b is in the way"
    );
    assert!(
        space.try_extend(&mut pool, b, PAGE, 5 * PAGE),
        "up to the region end"
    );
    assert!(!space.try_extend(&mut pool, b, 5 * PAGE, 6 * PAGE));
    assert_eq!(space.free_total(), 0);
    space.shrink(&mut pool, a, 3 * PAGE, PAGE).unwrap();
    assert_eq!(free_list(&space), [(base + PAGE, 2 * PAGE)]);
    assert_eq!(
        space.shrink(&mut pool, b, 5 * PAGE, 6 * PAGE),
        Err(Error::SizeTooLarge)
    );
    assert_eq!(
        space.shrink(&mut pool, b, 5 * PAGE, 0),
        Err(Error::ZeroSize)
    );
    space.shrink(&mut pool, b, 5 * PAGE, 4 * PAGE).unwrap();
    assert_eq!(space.free_total(), 3 * PAGE);
}

#[test]
fn area_map_finds_containing_area_and_refuses_overlap() {
    let frames = TestFrames::new(4);
    let mut pool = pool(&frames);
    let mut areas = AreaMap::<u64>::new();
    let base = VMALLOC_START;
    areas
        .insert(&mut pool, va(base + 4 * PAGE), 2 * PAGE, 2)
        .unwrap();
    areas.insert(&mut pool, va(base), PAGE, 1).unwrap();
    let overlap = areas.insert(&mut pool, va(base + 5 * PAGE), PAGE, 3);
    assert_eq!(overlap, Err(Error::Overlap));
    let overlap = areas.insert(&mut pool, va(base + 3 * PAGE), 2 * PAGE, 3);
    assert_eq!(overlap, Err(Error::Overlap));
    let inside = areas.find_containing(va(base + 5 * PAGE + 17)).unwrap();
    assert_eq!(
        (inside.start, inside.size, inside.data),
        (va(base + 4 * PAGE), 2 * PAGE, 2)
    );
    assert!(areas.find_containing(va(base + 6 * PAGE)).is_none());
    assert!(areas.find_containing(va(base + PAGE)).is_none());
    assert!(
        areas.get(va(base + 5 * PAGE)).is_none(),
        "interior is not a start"
    );
    *areas.data_mut(va(base)).unwrap() = 10;
    let listed: Vec<_> = areas.iter().map(|a| (a.start.as_u64(), a.data)).collect();
    assert_eq!(listed, [(base, 10), (base + 4 * PAGE, 2)]);
    assert_eq!(areas.resize(va(base), 5 * PAGE), Err(Error::Overlap));
    areas.resize(va(base), 4 * PAGE).unwrap();
    assert_eq!(areas.find_containing(va(base + 3 * PAGE)).unwrap().data, 10);
    assert_eq!(areas.remove(&mut pool, va(base)).unwrap().size, 4 * PAGE);
    assert!(areas.remove(&mut pool, va(base)).is_none());
    areas.clear(&mut pool);
    assert!(areas.is_empty());
}

#[test]
fn hundred_thousand_live_areas_are_found() {
    const COUNT: u64 = 100_000;
    let frames = TestFrames::new(4096);
    let mut pool = pool(&frames);
    let mut space = VSpace::new(&mut pool, va(VMALLOC_START), VMALLOC_SIZE).unwrap();
    let mut areas = AreaMap::new();
    let mut starts = Vec::new();
    for i in 0..COUNT {
        let pages = 1 + i % 3;
        let addr = space.alloc(&mut pool, pages * PAGE, 1).unwrap();
        // A one-page gap after every area keeps 100,000 free ranges too.
        let gap = space.alloc(&mut pool, PAGE, 1).unwrap();
        starts.push((addr, pages * PAGE, gap));
        areas.insert(&mut pool, addr, pages * PAGE, i).unwrap();
    }
    for &(_, _, gap) in &starts {
        space.free(&mut pool, gap, PAGE).unwrap();
    }
    assert_eq!(areas.len(), COUNT as usize);
    assert_eq!(space.free_ranges(), COUNT as usize, "gaps stay apart");
    for (i, &(addr, size, gap)) in starts.iter().enumerate() {
        let found = areas.find_containing(addr + (size - 1)).unwrap();
        assert_eq!((found.start, found.data), (addr, i as u64));
        assert!(areas.find_containing(gap).is_none());
    }
    let in_order = areas.iter().zip(&starts).all(|(a, s)| a.start == s.0);
    assert!(in_order);
    // AVL bound: height < 1.45 log2(n + 2).
    let bound = (1.45 * ((COUNT + 2) as f64).log2()) as u8;
    // SAFETY: both roots are live nodes of non-empty trees.
    let heights = unsafe { ((*space.free.root()).height, (*areas.busy.root()).height) };
    assert!(
        heights.0 <= bound && heights.1 <= bound,
        "{heights:?} > {bound}"
    );
    space.free.assert_valid();
    areas.busy.assert_valid();
    // Freeing every other area joins the gaps on both sides of it (the first area
    // has none before it, so only 49,999 pairs join).
    for &(addr, size, _) in starts.iter().step_by(2) {
        areas.remove(&mut pool, addr).unwrap();
        space.free(&mut pool, addr, size).unwrap();
    }
    assert_eq!(space.free_ranges(), COUNT as usize / 2 + 1);
    space.free.assert_valid();
    areas.busy.assert_valid();
}

/// One step of a random workload.
#[derive(Debug, Clone)]
enum Op {
    Alloc { pages: u64, align_shift: u32 },
    Free { pick: usize },
    Extend { pick: usize, pages: u64 },
    Shrink { pick: usize, pages: u64 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1..24u64, 0..64u32).prop_map(|(pages, align_shift)| Op::Alloc { pages, align_shift }),
        3 => any::<usize>().prop_map(|pick| Op::Free { pick }),
        1 => (any::<usize>(), 1..8u64).prop_map(|(pick, pages)| Op::Extend { pick, pages }),
        1 => (any::<usize>(), 0..8u64).prop_map(|(pick, pages)| Op::Shrink { pick, pages }),
    ]
}

/// A region starting at an odd page so that large alignments bite.
const MODEL_BASE: u64 = VMALLOC_START + 0x3000;
const MODEL_SIZE: u64 = 256 * PAGE;

/// Brute-force lowest fit over the gaps between sorted busy ranges.
fn model_first_fit(busy: &[(u64, u64)], size: u64, align: u64) -> Option<u64> {
    let mut cursor = MODEL_BASE;
    let ends = busy
        .iter()
        .map(|&(s, _)| s)
        .chain([MODEL_BASE + MODEL_SIZE]);
    for (gap_end, next) in ends.zip(busy.iter().map(Some).chain([None])) {
        let addr = cursor.checked_next_multiple_of(align.max(PAGE));
        if let Some(addr) = addr.filter(|&a| a <= gap_end && gap_end - a >= size) {
            return Some(addr);
        }
        if let Some(&(s, n)) = next {
            cursor = s + n;
        }
    }
    None
}

fn model_free(busy: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut free = Vec::new();
    let mut cursor = MODEL_BASE;
    for &(start, size) in busy.iter().chain([&(MODEL_BASE + MODEL_SIZE, 0)]) {
        if start > cursor {
            free.push((cursor, start - cursor));
        }
        cursor = start + size;
    }
    free
}

fn check(space: &VSpace, areas: &AreaMap<u64>, busy: &[(u64, u64)]) {
    space.free.assert_valid();
    areas.busy.assert_valid();
    let expected_free = model_free(busy);
    assert_eq!(free_list(space), expected_free);
    let busy_total: u64 = busy.iter().map(|b| b.1).sum();
    assert_eq!(space.free_total() + busy_total, MODEL_SIZE);
    let largest = expected_free.iter().map(|f| f.1).max().unwrap_or(0);
    assert_eq!(space.largest_free(), largest);
    for pair in busy.windows(2) {
        assert!(pair[0].0 + pair[0].1 <= pair[1].0, "overlap");
    }
    let listed: Vec<_> = areas.iter().map(|a| (a.start.as_u64(), a.size)).collect();
    assert_eq!(listed, busy);
}

fn apply(
    space: &mut VSpace,
    areas: &mut AreaMap<u64>,
    pool: &mut Pool,
    busy: &mut Vec<(u64, u64)>,
    op: &Op,
) {
    match *op {
        Op::Alloc { pages, align_shift } => {
            let (size, align) = (pages * PAGE, 1u64 << align_shift);
            let expected = model_first_fit(busy, size, align);
            let got = space.alloc(pool, size, align).ok().map(VirtAddr::as_u64);
            assert_eq!(got, expected, "lowest fit of {size:#x} aligned {align:#x}");
            if let Some(addr) = got {
                assert_eq!(addr % align, 0);
                areas.insert(pool, va(addr), size, addr).unwrap();
                let at = busy.partition_point(|b| b.0 < addr);
                busy.insert(at, (addr, size));
            }
        }
        Op::Free { pick } if !busy.is_empty() => {
            let (start, size) = busy.remove(pick % busy.len());
            assert_eq!(areas.remove(pool, va(start)).unwrap().size, size);
            space.free(pool, va(start), size).unwrap();
        }
        Op::Extend { pick, pages } if !busy.is_empty() => {
            let index = pick % busy.len();
            let (start, size) = busy[index];
            let new_size = size + pages * PAGE;
            let limit = busy.get(index + 1).map_or(MODEL_BASE + MODEL_SIZE, |b| b.0);
            let fits = start + new_size <= limit;
            assert_eq!(space.try_extend(pool, va(start), size, new_size), fits);
            if fits {
                areas.resize(va(start), new_size).unwrap();
                busy[index].1 = new_size;
            }
        }
        Op::Shrink { pick, pages } if !busy.is_empty() => {
            let index = pick % busy.len();
            let (start, size) = busy[index];
            let new_size = (pages * PAGE).clamp(PAGE, size);
            space.shrink(pool, va(start), size, new_size).unwrap();
            areas.resize(va(start), new_size).unwrap();
            busy[index].1 = new_size;
        }
        _ => {}
    }
}

proptest! {
    #[test]
    fn random_workload_matches_model(ops in proptest::collection::vec(op(), 1..200)) {
        let frames = TestFrames::new(64);
        let mut pool = pool(&frames);
        let mut space = VSpace::new(&mut pool, va(MODEL_BASE), MODEL_SIZE).unwrap();
        let mut areas = AreaMap::new();
        let mut busy = Vec::new();
        for op in &ops {
            apply(&mut space, &mut areas, &mut pool, &mut busy, op);
            check(&space, &areas, &busy);
        }
    }
}

/// Everything observable about the bookkeeping.
fn snapshot(
    space: &VSpace,
    areas: &AreaMap<u64>,
    frames: &TestFrames,
) -> impl PartialEq + std::fmt::Debug + use<> {
    let listed: Vec<_> = areas.iter().map(|a| (a.start, a.size, a.data)).collect();
    (
        free_list(space),
        space.free_total(),
        space.largest_free(),
        listed,
        frames.available(),
    )
}

fn fault_workload() -> Vec<Op> {
    (0..60)
        .map(|i| match i % 5 {
            0 | 1 | 3 => Op::Alloc {
                pages: 1 + i as u64 % 3,
                align_shift: (i % 4) as u32 * 7,
            },
            2 => Op::Free { pick: i * 7 },
            _ => Op::Shrink { pick: i, pages: 1 },
        })
        .collect()
}

/// Runs the workload with frame allocation `fail_at` failing; returns how many frames
/// the pool asked for and how many steps failed. Checks that a failed step changed
/// nothing and that everything is given back at the end.
fn run_with_failure(fail_at: Option<usize>) -> (usize, usize) {
    let frames = TestFrames::new(64);
    // Three slots a frame make the pool grow every few nodes.
    let mut pool = NodePool::with_slot_size(&frames.frames, frames.phys(), 1024);
    let base = VMALLOC_START + 0x5000;
    let mut space = VSpace::new(&mut pool, va(base), 1 << 30).unwrap();
    let mut areas = AreaMap::<u64>::new();
    let mut live = Vec::new();
    let first = frames.frames.handed_out() as usize;
    if let Some(k) = fail_at {
        frames.frames.fail_after(k as u64);
    }
    let mut failures = 0;
    for op in &fault_workload() {
        let before = snapshot(&space, &areas, &frames);
        if step_with_failure(&mut space, &mut areas, &mut pool, &mut live, op) {
            failures += 1;
            assert_eq!(snapshot(&space, &areas, &frames), before, "{op:?}");
        }
    }
    for &(start, size) in &live {
        areas.remove(&mut pool, va(start)).unwrap();
        space.free(&mut pool, va(start), size).unwrap();
    }
    assert_eq!(free_list(&space), [(base, 1 << 30)]);
    (frames.frames.handed_out() as usize - first, failures)
}

#[test]
fn running_out_of_node_frames_changes_nothing() {
    let (frames_used, failures) = run_with_failure(None);
    assert_eq!(failures, 0);
    assert!(frames_used > 5, "the workload makes the pool grow");
    for fail_at in 0..frames_used {
        let (_, failures) = run_with_failure(Some(fail_at));
        assert_eq!(failures, 1, "frame allocation {fail_at} failed one step");
    }
}

/// Runs one step; true if it failed for lack of frames (and so must have done nothing).
fn step_with_failure(
    space: &mut VSpace,
    areas: &mut AreaMap<u64>,
    pool: &mut Pool,
    live: &mut Vec<(u64, u64)>,
    op: &Op,
) -> bool {
    match *op {
        Op::Alloc { pages, align_shift } => {
            let size = pages * PAGE;
            let addr = match space.alloc(pool, size, 1 << align_shift) {
                Err(Error::OutOfFrames) => return true,
                other => other.unwrap(),
            };
            if areas.insert(pool, addr, size, 0) == Err(Error::OutOfFrames) {
                // Undo the range so the step as a whole did nothing.
                space.free(pool, addr, size).unwrap();
                return true;
            }
            live.push((addr.as_u64(), size));
            false
        }
        Op::Free { pick } | Op::Shrink { pick, .. } if !live.is_empty() => {
            let index = pick % live.len();
            let (start, size) = live[index];
            if matches!(op, Op::Shrink { .. }) && size > PAGE {
                match space.shrink(pool, va(start), size, PAGE) {
                    Err(Error::OutOfFrames) => return true,
                    other => other.unwrap(),
                }
                areas.resize(va(start), PAGE).unwrap();
                live[index].1 = PAGE;
                return false;
            }
            live.swap_remove(index);
            areas.remove(pool, va(start)).unwrap();
            space
                .free(pool, va(start), size)
                .expect("the removed area's node is reused");
            false
        }
        _ => false,
    }
}
