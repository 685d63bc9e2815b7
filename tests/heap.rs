//! The kernel heap as a plain object on a simulated machine. The machine's host
//! window makes vmalloc addresses dereferenceable here, as they are in a kernel.

mod common;

use allocator_api2::boxed::Box as ABox;
use allocator_api2::vec::Vec as AVec;
use std::alloc::{GlobalAlloc, Layout};
use std::collections::BTreeMap;
use vmalloc::frame::FaultInjector;
use vmalloc::heap::{HeapConfig, KVBox, KernelHeap};
use vmalloc::vmalloc::Vmalloc;
use vmalloc::{FrameSource, PAGE_SIZE};
use vmalloc_sim::scenarios;
use vmalloc_sim::{Rng, SimConfig, SimFrames, SimMachine, SimPhys};
use x86_64::VirtAddr;

type SimVmalloc<'m, F> = Vmalloc<F, SimPhys<'m>, &'m SimMachine>;

fn machine(memory: u64) -> SimMachine {
    SimMachine::new(
        SimConfig::new(memory)
            .with_scatter_seed(11)
            .with_host_window(8 << 30),
    )
}

fn manager<'m, F: FrameSource + Clone>(machine: &'m SimMachine, frames: F) -> SimVmalloc<'m, F> {
    // SAFETY: the machine's page tables serve this manager alone, and its flush reaches every CPU that runs.
    unsafe { scenarios::window_manager(machine, frames, machine) }
}

const CONFIG: HeapConfig = HeapConfig {
    window: 256 << 20,
    ..HeapConfig::DEFAULT
};

struct Block {
    ptr: *mut u8,
    layout: Layout,
    fill: u8,
}

fn fill(block: &Block) {
    // SAFETY: the block is live and `layout.size()` bytes long.
    unsafe { std::ptr::write_bytes(block.ptr, block.fill, block.layout.size()) };
}

fn check(block: &Block, len: usize) {
    // SAFETY: the block is live and at least `len` bytes long.
    let bytes = unsafe { std::slice::from_raw_parts(block.ptr, len) };
    assert!(
        bytes.iter().all(|&b| b == block.fill),
        "contents of a {:?} block",
        block.layout
    );
}

fn random_layout(rng: &mut Rng) -> Layout {
    // Sizes spread over 1 byte .. 4 MiB on a log scale; alignments up to 2 MiB.
    let size_bits = rng.below(23);
    let size = 1 + rng.below(1 << size_bits) as usize;
    let align_bits = if rng.below(8) == 0 { 22 } else { 7 };
    let align = 1 << rng.below(align_bits);
    Layout::from_size_align(size, align).unwrap()
}

#[test]
fn random_alloc_dealloc_realloc_keeps_blocks_apart_and_returns_frames() {
    let machine = machine(512 << 20);
    let frames = machine.frames();
    let vm = manager(&machine, &frames);
    let (free_before, before) = (frames.stats().free, vm.stats());
    let heap = KernelHeap::new(CONFIG);
    heap.init(&vm).unwrap();
    let mut rng = Rng::new(5);
    let mut live: Vec<Block> = Vec::new();
    for step in 0..3000u32 {
        match rng.below(10) {
            0..=4 => {
                let layout = random_layout(&mut rng);
                // SAFETY: the layout has a non-zero size.
                let ptr = unsafe { heap.alloc(layout) };
                assert!(!ptr.is_null(), "step {step}: {layout:?}");
                assert_eq!(ptr as usize % layout.align(), 0, "alignment of {layout:?}");
                let block = Block {
                    ptr,
                    layout,
                    fill: step as u8,
                };
                fill(&block);
                live.push(block);
            }
            5..=7 if !live.is_empty() => {
                let block = live.swap_remove(rng.below(live.len() as u64) as usize);
                check(&block, block.layout.size());
                // SAFETY: the block came from this heap with this layout.
                unsafe { heap.dealloc(block.ptr, block.layout) };
            }
            _ if !live.is_empty() => {
                let index = rng.below(live.len() as u64) as usize;
                let new_size = random_layout(&mut rng).size();
                let block = &mut live[index];
                // SAFETY: the block came from this heap with this layout.
                let moved = unsafe { heap.realloc(block.ptr, block.layout, new_size) };
                assert!(!moved.is_null());
                assert_eq!(moved as usize % block.layout.align(), 0);
                block.ptr = moved;
                check(block, block.layout.size().min(new_size));
                block.layout = Layout::from_size_align(new_size, block.layout.align()).unwrap();
                fill(block);
            }
            _ => {}
        }
        if step % 250 == 0 {
            assert_disjoint(&live);
        }
    }
    assert_disjoint(&live);
    for block in live.drain(..) {
        check(&block, block.layout.size());
        // SAFETY: as above.
        unsafe { heap.dealloc(block.ptr, block.layout) };
    }
    vm.purge();
    let stats = heap.stats();
    assert_eq!(
        (stats.in_use, stats.large_blocks, stats.large_bytes),
        (0, 0, 0)
    );
    let vm_stats = vm.stats();
    assert_eq!(
        vm_stats.data_frames,
        (stats.mapped + stats.slab_bytes + stats.large_kept) as u64 / PAGE_SIZE,
        "only the list's high-water pages, the slabs and the large blocks kept stay mapped"
    );
    assert!(stats.large_kept <= CONFIG.large_cache);
    assert_eq!(stats.slab_bytes % PAGE_SIZE as usize, 0);
    // The manager's own tables and bookkeeping may have grown or shrunk.
    let kept = vm_stats.data_frames as i64
        + (vm_stats.page_table_frames as i64 - before.page_table_frames as i64)
        + (vm_stats.bookkeeping_frames as i64 - before.bookkeeping_frames as i64);
    assert_eq!(
        frames.stats().free as i64 + kept,
        free_before as i64,
        "every other frame went back"
    );
    heap.shrink();
    vm.purge();
    assert_eq!(heap.stats().slab_bytes, 0, "shrink frees every empty slab");
    assert_eq!(heap.stats().large_kept, 0, "and every large block kept");
    assert_eq!(vm.stats().data_frames, stats.mapped as u64 / PAGE_SIZE);
}

fn assert_disjoint(live: &[Block]) {
    let mut ranges: Vec<(usize, usize)> = live
        .iter()
        .map(|b| (b.ptr as usize, b.ptr as usize + b.layout.size()))
        .collect();
    ranges.sort();
    for pair in ranges.windows(2) {
        assert!(pair[0].1 <= pair[1].0, "blocks overlap: {:x?}", pair);
    }
}

#[test]
fn collections_through_the_allocator_api() {
    let machine = machine(128 << 20);
    let frames = machine.frames();
    let vm = manager(&machine, &frames);
    let heap = KernelHeap::new(CONFIG);
    heap.init(&vm).unwrap();
    let (window, size) = machine.host_window().unwrap();
    let inside = |ptr: *const u8| (ptr as u64).wrapping_sub(window.as_u64()) < size;

    let mut numbers = AVec::new_in(&heap);
    numbers.extend(0..100_000u64);
    assert!(inside(numbers.as_ptr().cast()));
    assert_eq!(numbers.iter().sum::<u64>(), 99_999 * 100_000 / 2);
    assert!(
        heap.stats().large_blocks >= 1,
        "a 800 KB vector lives in its own vmalloc area"
    );
    let boxed = ABox::new_in([3u8; 100], &heap);
    assert!(inside(boxed.as_ptr()) && !heap.owns_small(boxed.as_ptr()));
    assert!(heap.stats().slab_objects >= 1, "100 bytes come from a slab");
    let mut words: AVec<AVec<u8, &KernelHeap>, &KernelHeap> = AVec::new_in(&heap);
    for i in 0..500 {
        let mut word = AVec::new_in(&heap);
        word.extend(std::iter::repeat_n(b'a' + (i % 26) as u8, i % 40));
        words.push(word);
    }
    assert!(words.iter().enumerate().all(|(i, w)| w.len() == i % 40));
    drop((numbers, boxed, words));
    assert_eq!(heap.stats().in_use, 0);
    assert_eq!(heap.stats().large_blocks, 0);
}

#[test]
fn growing_a_large_block_remaps_instead_of_copying() {
    let machine = machine(128 << 20);
    let frames = machine.frames();
    let vm = manager(&machine, &frames);
    let heap = KernelHeap::new(CONFIG);
    heap.init(&vm).unwrap();
    let layout = Layout::from_size_align(1 << 20, 8).unwrap();
    // SAFETY: non-zero size.
    let ptr = unsafe { heap.alloc(layout) };
    // SAFETY: the block holds 1 MiB.
    unsafe { ptr.write_bytes(0x42, 1 << 20) };
    let first = vm.vmalloc_to_frame(VirtAddr::from_ptr(ptr)).unwrap();
    let blocker = vm.vmalloc(4096).unwrap();
    // SAFETY: the block came from this heap with this layout.
    let grown = unsafe { heap.realloc(ptr, layout, 8 << 20) };
    assert!(!grown.is_null());
    assert_eq!(
        vm.vmalloc_to_frame(VirtAddr::from_ptr(grown)).unwrap(),
        first,
        "same frame, new place"
    );
    // SAFETY: `grown` is a live 8 MiB block; its first MiB was kept.
    let kept = unsafe { std::slice::from_raw_parts(grown, 1 << 20) };
    assert!(kept.iter().all(|&b| b == 0x42));
    // SAFETY: as above, with the new size.
    unsafe { heap.dealloc(grown, Layout::from_size_align(8 << 20, 8).unwrap()) };
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    unsafe { vm.vfree(blocker.as_ptr()) }.unwrap();
    assert_eq!(heap.stats().large_blocks, 0);
}

#[test]
fn running_out_of_frames_gives_null_and_the_heap_recovers() {
    let machine = machine(32 << 20);
    let frames = machine.frames();
    let injector = FaultInjector::new(&frames);
    let vm = manager(&machine, &injector);
    let heap = KernelHeap::new(CONFIG);
    heap.init(&vm).unwrap();
    let small = Layout::from_size_align(2000, 8).unwrap();
    let large = Layout::from_size_align(256 << 10, 4096).unwrap();
    // SAFETY: non-zero sizes throughout; every block is freed with its layout.
    unsafe {
        injector.fail_after(10);
        assert!(
            heap.alloc(large).is_null(),
            "the 11th frame of a 64-frame block fails"
        );
        let retry = heap.alloc(large);
        assert!(
            !retry.is_null(),
            "the failure left nothing behind to trip over"
        );
        heap.dealloc(retry, large);

        // Real exhaustion: fill every frame of the machine with small blocks.
        let mut filled = Vec::new();
        loop {
            let p = heap.alloc(small);
            if p.is_null() {
                break;
            }
            filled.push(p);
        }
        assert!(
            filled.len() > 5000,
            "{} blocks of 2000 bytes in 32 MiB",
            filled.len()
        );
        assert!(heap.alloc(large).is_null());
        for p in filled.drain(..filled.len() / 2) {
            heap.dealloc(p, small);
        }
        let again = heap.alloc(small);
        assert!(!again.is_null(), "freed blocks serve again");
        heap.dealloc(again, small);
        for p in filled {
            heap.dealloc(p, small);
        }
    }
    assert_eq!(heap.stats().in_use, 0);
}

#[test]
fn kvmalloc_picks_a_path_by_size_and_kvfree_needs_no_size() {
    let machine = machine(128 << 20);
    let frames = machine.frames();
    let vm = manager(&machine, &frames);
    let heap = KernelHeap::new(CONFIG);
    heap.init(&vm).unwrap();
    let small = heap.kvmalloc(100).unwrap();
    let middle = heap.kvmalloc(8000).unwrap();
    let large = heap.kvmalloc(1 << 20).unwrap();
    assert_eq!(heap.stats().slab_objects, 1, "100 bytes from a slab");
    assert!(heap.owns_small(middle.as_ptr()), "8000 bytes from the list");
    assert!(!heap.owns_small(large.as_ptr()));
    assert_eq!(heap.stats().large_blocks, 1);
    // SAFETY: both came from kvmalloc and hold the sizes asked for.
    unsafe {
        small.as_ptr().write_bytes(1, 100);
        large.as_ptr().write_bytes(2, 1 << 20);
        middle.as_ptr().write_bytes(3, 8000);
        heap.kvfree(small);
        heap.kvfree(middle);
        heap.kvfree(large);
    }
    assert_eq!(heap.stats().large_blocks, 0);
    assert_eq!(heap.stats().in_use, 0);

    let mut map = KVBox::new(&heap, BTreeMap::<u32, u32>::new()).unwrap();
    map.insert(1, 2);
    assert_eq!(map.get(&1), Some(&2));
    let big = KVBox::new(&heap, [9u64; 8192]).unwrap();
    assert!(!heap.owns_small((&*big as *const [u64; 8192]).cast()));
    assert_eq!(big.iter().sum::<u64>(), 9 * 8192);
}

/// A `kvmalloc` block's size sits before the pointer it returns, where an underrun
/// writes: `kvfree` checks it and refuses a block whose header changed, rather than
/// free memory by a size that is not the block's.
#[test]
fn kvfree_refuses_a_block_whose_header_an_underrun_changed() {
    let machine = machine(128 << 20);
    let frames = machine.frames();
    let vm = manager(&machine, &frames);
    let heap = KernelHeap::new(CONFIG);
    heap.init(&vm).unwrap();
    for (size, underrun) in [(100, 1), (100, 16), (8000, 3), (1 << 20, 9)] {
        let block = heap.kvmalloc(size).unwrap();
        let in_use = heap.stats().in_use;
        let refused = heap.stats().refused_frees;
        // SAFETY: the header before the block is the heap's; the test writes into
        // it on purpose, as an underrun would, and frees the block once.
        unsafe {
            let byte = block.as_ptr().sub(underrun);
            byte.write(byte.read() ^ 0x40);
            heap.kvfree(block);
        }
        assert_eq!(
            (heap.stats().refused_frees, heap.stats().in_use),
            (refused + 1, in_use),
            "{size} bytes, {underrun} before the block: refused and kept"
        );
    }
    // What a kept block's neighbours hold is intact: the heap goes on serving.
    let block = heap.kvmalloc(100).unwrap();
    // SAFETY: a live kvmalloc block, freed once.
    unsafe {
        block.as_ptr().write_bytes(7, 100);
        heap.kvfree(block);
    }
}

#[test]
fn an_uninitialised_heap_fails_cleanly() {
    let machine = machine(64 << 20);
    let frames = machine.frames();
    let vm = manager(&machine, &frames);
    let heap = KernelHeap::new(HeapConfig::DEFAULT);
    // SAFETY: non-zero size.
    assert!(unsafe { heap.alloc(Layout::new::<u64>()) }.is_null());
    assert!(heap.kvmalloc(10).is_none());
    heap.init(&vm).unwrap();
    assert_eq!(
        heap.init(&vm),
        Err(vmalloc::Error::Overlap),
        "initialised once"
    );
}

#[test]
fn a_window_that_is_not_a_page_multiple_serves_and_takes_back_every_block() {
    let machine = machine(64 << 20);
    let frames = machine.frames();
    let vm = manager(&machine, &frames);
    let heap = KernelHeap::new(HeapConfig {
        window: 25_000,
        grow_step: 4096,
        ..HeapConfig::DEFAULT
    });
    heap.init(&vm).unwrap();
    // Past the slabs' largest class: the list's.
    let layout = Layout::from_size_align(5000, 8).unwrap();
    // SAFETY: non-zero size; every block is freed with its layout.
    let blocks: Vec<*mut u8> = (0..5).map(|_| unsafe { heap.alloc(layout) }).collect();
    for &block in &blocks {
        assert!(!block.is_null());
        assert!(heap.owns_small(block), "{block:?} is in the reserved pages");
        // SAFETY: a live 5000-byte block.
        unsafe { block.write_bytes(0x77, 5000) };
    }
    let areas = vm.stats().areas;
    for block in blocks {
        // SAFETY: as above.
        unsafe { heap.dealloc(block, layout) };
    }
    assert_eq!(heap.stats().in_use, 0, "every block came back to the list");
    assert_eq!(vm.stats().areas, areas, "no block went to vfree");
}

/// A block of the slab model: `len` bytes, every 8-byte word holding `id` (and the
/// tail bytes its low byte).
struct Tagged {
    ptr: *mut u8,
    layout: Layout,
    id: u64,
}

impl Tagged {
    fn write(&self) {
        let words = self.layout.size() / 8;
        // SAFETY: the block is live and `layout.size()` bytes long, aligned to at
        // least its layout's alignment; words are written unaligned.
        unsafe {
            for word in 0..words {
                self.ptr
                    .add(word * 8)
                    .cast::<u64>()
                    .write_unaligned(self.id);
            }
            for byte in words * 8..self.layout.size() {
                self.ptr.add(byte).write(self.id as u8);
            }
        }
    }

    fn intact(&self) -> bool {
        let words = self.layout.size() / 8;
        // SAFETY: as in `write`.
        unsafe {
            (0..words).all(|word| self.ptr.add(word * 8).cast::<u64>().read_unaligned() == self.id)
                && (words * 8..self.layout.size())
                    .all(|byte| self.ptr.add(byte).read() == self.id as u8)
        }
    }
}

fn slab_layout(rng: &mut Rng) -> Layout {
    let size = 1 + rng.below(4096) as usize;
    let align = match rng.below(16) {
        0 => 1 << rng.below(13),
        _ => 8,
    };
    Layout::from_size_align(size, align).unwrap()
}

#[test]
fn a_size_class_never_hands_out_a_block_twice() {
    let machine = machine(512 << 20);
    let frames = machine.frames();
    let vm = manager(&machine, &frames);
    let heap = KernelHeap::new(CONFIG);
    heap.init(&vm).unwrap();
    let mut rng = Rng::new(17);
    let mut live: Vec<Tagged> = Vec::new();
    // Start address -> end of every live block, to find an overlap at once.
    let mut spans: BTreeMap<usize, usize> = BTreeMap::new();
    for id in 0..60_000u64 {
        // Climbs to 4000 live blocks, then churns there.
        if live.len() < 4000 && (live.is_empty() || rng.below(4) != 0) {
            let layout = slab_layout(&mut rng);
            // SAFETY: a non-zero size.
            let ptr = unsafe { heap.alloc(layout) };
            assert!(!ptr.is_null());
            assert_eq!(ptr as usize % layout.align(), 0, "{layout:?}");
            let (start, end) = (ptr as usize, ptr as usize + layout.size());
            let below = spans.range(..=start).next_back();
            let above = spans.range(start..).next();
            assert!(
                below.is_none_or(|(_, &below_end)| below_end <= start)
                    && above.is_none_or(|(&above_start, _)| end <= above_start),
                "block {id} at {start:#x}..{end:#x} overlaps a live block"
            );
            spans.insert(start, end);
            let block = Tagged { ptr, layout, id };
            block.write();
            live.push(block);
        } else {
            let block = live.swap_remove(rng.below(live.len() as u64) as usize);
            assert!(block.intact(), "block {} was written by another", block.id);
            spans.remove(&(block.ptr as usize));
            // SAFETY: the block came from this heap with this layout.
            unsafe { heap.dealloc(block.ptr, block.layout) };
        }
    }
    assert_eq!(
        heap.stats().slab_objects,
        live.len(),
        "the slabs served every block"
    );
    for block in live.drain(..) {
        assert!(block.intact(), "block {} was written by another", block.id);
        // SAFETY: as above.
        unsafe { heap.dealloc(block.ptr, block.layout) };
    }
    let stats = heap.stats();
    assert_eq!((stats.in_use, stats.slab_objects), (0, 0));
}

#[test]
fn empty_slabs_go_back_to_vmalloc_and_a_fragmented_heap_keeps_only_its_live_slabs() {
    let machine = machine(512 << 20);
    let frames = machine.frames();
    let vm = manager(&machine, &frames);
    let heap = KernelHeap::new(CONFIG);
    heap.init(&vm).unwrap();
    let free_at_start = frames.stats().free;
    let class = |heap: &KernelHeap, size| {
        heap.slab_stats()
            .into_iter()
            .find(|class| class.size == size)
            .unwrap()
    };
    let layout = Layout::from_size_align(64, 8).unwrap();
    // SAFETY: non-zero size; every block is freed with its layout below.
    let blocks: Vec<*mut u8> = (0..40_000).map(|_| unsafe { heap.alloc(layout) }).collect();
    assert!(blocks.iter().all(|block| !block.is_null()));
    let full = class(&heap, 64);
    assert_eq!(full.objects, 40_000);
    // 63 objects of 64 bytes per 4 KiB slab, after its header.
    assert_eq!(full.slabs, 40_000usize.div_ceil(63));

    // Keep one block in every 10th slab's worth, free the rest: most slabs empty.
    let mut kept = Vec::new();
    for (index, &block) in blocks.iter().enumerate() {
        if index % 630 == 0 {
            kept.push(block);
        } else {
            // SAFETY: as above.
            unsafe { heap.dealloc(block, layout) };
        }
    }
    // Bursts in another class move the heap's clock: the 64-byte class's empty slabs
    // age past the decay and go back, though the class itself is idle.
    let other = Layout::from_size_align(128, 8).unwrap();
    for _ in 0..20 {
        // SAFETY: non-zero size; freed with the same layout.
        let burst: Vec<*mut u8> = (0..2000).map(|_| unsafe { heap.alloc(other) }).collect();
        for block in burst {
            // SAFETY: as above.
            unsafe { heap.dealloc(block, other) };
        }
    }
    let aged = class(&heap, 64);
    assert_eq!(aged.objects, kept.len());
    // Each live object may pin a slab, and so may the CPU's own (its current slab
    // and spare), plus what the empty budget keeps.
    let budget_slabs = vmalloc::heap::slab::EMPTY_BUDGET / 4096;
    assert!(
        aged.slabs <= kept.len() + aged.cpu_slabs + budget_slabs,
        "{} slabs for {} live objects and {} the CPU holds",
        aged.slabs,
        kept.len(),
        aged.cpu_slabs
    );
    heap.shrink();
    assert_eq!(
        class(&heap, 64).slabs,
        kept.len(),
        "after shrink, exactly the slabs with a live object stay"
    );
    for block in kept {
        // SAFETY: as above.
        unsafe { heap.dealloc(block, layout) };
    }
    heap.shrink();
    vm.purge();
    let stats = heap.stats();
    assert_eq!(stats.slab_bytes, 0);
    assert_eq!(
        vm.stats().data_frames,
        stats.mapped as u64 / PAGE_SIZE,
        "every data frame of the slabs came back"
    );
    // The rest is the manager's own page tables and bookkeeping.
    let vm_own = vm.stats().page_table_frames + vm.stats().bookkeeping_frames;
    assert!(free_at_start - frames.stats().free <= vm_own);
}

#[test]
fn with_the_slabs_off_small_blocks_come_from_the_list_heap() {
    let machine = machine(64 << 20);
    let frames = machine.frames();
    let vm = manager(&machine, &frames);
    let heap = KernelHeap::new(HeapConfig {
        slab_max: 0,
        ..CONFIG
    });
    heap.init(&vm).unwrap();
    let layout = Layout::from_size_align(100, 8).unwrap();
    // SAFETY: non-zero sizes; every block is freed with its layout.
    unsafe {
        let blocks: Vec<*mut u8> = (0..100).map(|_| heap.alloc(layout)).collect();
        assert!(blocks.iter().all(|&block| heap.owns_small(block)));
        assert_eq!(heap.stats().slab_objects, 0);
        // Growing within what was a slab class stays on the list too.
        let grown = heap.realloc(blocks[0], layout, 200);
        assert!(heap.owns_small(grown));
        heap.dealloc(grown, Layout::from_size_align(200, 8).unwrap());
        for &block in &blocks[1..] {
            heap.dealloc(block, layout);
        }
    }
    assert_eq!(heap.stats().in_use, 0);
}

/// Callers' bugs the heap catches cheaply and counts: an area it did not make (the
/// `VBox` owning it stays valid), and a slab block freed twice in a row.
#[test]
fn frees_of_foreign_areas_and_a_free_right_after_the_same_free_are_refused() {
    let machine = machine(64 << 20);
    let frames = machine.frames();
    let vm = manager(&machine, &frames);
    let foreign = vmalloc::vmalloc::VBox::new(&vm, [7u8; 20_000]).unwrap();
    for per_cpu in [false, true] {
        let heap = KernelHeap::new(HeapConfig { per_cpu, ..CONFIG });
        heap.init(&vm).unwrap();
        let before = heap.stats();
        let ptr = std::ptr::from_ref(&*foreign).cast::<u8>().cast_mut();
        // SAFETY: deliberately wrong: the heap did not make this block; it refuses it.
        unsafe { heap.dealloc(ptr, Layout::from_size_align(20_000, 8).unwrap()) };
        let refused = vmalloc::heap::HeapStats {
            refused_frees: 1,
            ..before
        };
        assert_eq!(heap.stats(), refused, "per_cpu {per_cpu}");
        assert!(vm.find_vm_area(VirtAddr::from_ptr(ptr)).is_some());
        assert_eq!(foreign[19_999], 7);

        // A block freed twice in a row: the second free is refused, so the next two
        // allocations are two blocks, whether the first free went to a magazine or
        // to the slab's free list.
        for held in [0, 3] {
            let small = Layout::from_size_align(64, 8).unwrap();
            // SAFETY: deliberately wrong (a double free), which the heap refuses.
            unsafe {
                let others: Vec<_> = (0..held).map(|_| heap.alloc(small)).collect();
                let block = heap.alloc(small);
                let before = heap.stats();
                heap.dealloc(block, small);
                heap.dealloc(block, small);
                assert_eq!(heap.stats().refused_frees, before.refused_frees + 1);
                let (a, b) = (heap.alloc(small), heap.alloc(small));
                assert!(
                    !a.is_null() && !b.is_null() && a != b,
                    "per_cpu {per_cpu}, {held} held"
                );
                for block in others.into_iter().chain([a, b]) {
                    heap.dealloc(block, small);
                }
            }
        }
    }
}

/// Blocks between the slabs and the large path come from the list heap: a second
/// free of one (right after its free, or after the hole it left merged with its
/// neighbours'), a pointer inside a live one, one at a live block with another
/// size, and a resize of a freed one are each refused and counted, and change
/// nothing: `linked_list_allocator` panicked on them, or linked a live block into
/// its free list.
#[test]
fn bad_frees_of_list_blocks_are_refused_and_change_nothing() {
    let machine = machine(64 << 20);
    let frames = machine.frames();
    let vm = manager(&machine, &frames);
    let heap = KernelHeap::new(CONFIG);
    heap.init(&vm).unwrap();
    let layout = Layout::from_size_align(5000, 8).unwrap();
    // SAFETY: deliberately wrong frees and a resize, which the heap refuses; every
    // block is live where it is written or read.
    unsafe {
        let blocks: Vec<_> = (0..4).map(|_| heap.alloc(layout)).collect();
        assert!(blocks.iter().all(|&block| heap.owns_small(block)));
        for (i, &block) in blocks.iter().enumerate() {
            block.write_bytes(i as u8 + 1, layout.size());
        }
        heap.dealloc(blocks[1], layout);
        heap.dealloc(blocks[2], layout); // merges with the hole blocks[1] left
        let before = heap.stats();
        let other = Layout::from_size_align(6000, 8).unwrap();
        type Call<'c> = Box<dyn Fn() + 'c>;
        let bad: [(&str, Call); 6] = [
            ("freed again", Box::new(|| heap.dealloc(blocks[1], layout))),
            (
                "freed again, merged",
                Box::new(|| heap.dealloc(blocks[2], layout)),
            ),
            (
                "inside a block",
                Box::new(|| heap.dealloc(blocks[0].add(64), layout)),
            ),
            (
                "unaligned",
                Box::new(|| heap.dealloc(blocks[3].add(3), layout)),
            ),
            ("another size", Box::new(|| heap.dealloc(blocks[3], other))),
            (
                "resized after its free",
                Box::new(|| assert!(heap.realloc(blocks[1], layout, 9000).is_null())),
            ),
        ];
        for (n, (name, call)) in bad.iter().enumerate() {
            call();
            let stats = heap.stats();
            assert_eq!(stats.refused_frees, before.refused_frees + n + 1, "{name}");
            assert_eq!(stats.in_use, before.in_use, "{name}: nothing freed");
        }
        for i in [0, 3] {
            let block = blocks[i];
            let bytes = std::slice::from_raw_parts(block, layout.size());
            assert!(bytes.iter().all(|&b| b == i as u8 + 1), "block {i} intact");
        }
        // The next blocks overlap no live one.
        let fresh: Vec<_> = (0..3).map(|_| heap.alloc(layout)).collect();
        let mut live: Vec<usize> = fresh.iter().map(|&b| b as usize).collect();
        live.extend([blocks[0] as usize, blocks[3] as usize]);
        live.sort_unstable();
        assert!(
            live.windows(2).all(|w| w[1] - w[0] >= layout.size()),
            "{live:x?}"
        );
        for block in fresh.into_iter().chain([blocks[0], blocks[3]]) {
            heap.dealloc(block, layout);
        }
        assert_eq!(heap.stats().in_use, 0);
        assert_eq!(heap.stats().refused_frees, before.refused_frees + 6);
    }
}

#[test]
fn a_freed_large_block_is_kept_mapped_for_the_next_that_fits_and_shrink_gives_it_back() {
    let machine = machine(64 << 20);
    let frames = machine.frames();
    let vm = manager(&machine, &frames);
    let heap = KernelHeap::new(CONFIG);
    heap.init(&vm).unwrap();
    let (areas, data_frames) = (vm.stats().areas, vm.stats().data_frames);
    let layout = |size: usize, align: usize| Layout::from_size_align(size, align).unwrap();
    // SAFETY: non-zero sizes; each block is freed with its layout (the second free of
    // one is a deliberate double free, which the heap refuses).
    unsafe {
        let first = heap.alloc(layout(100 << 10, 8));
        first.write_bytes(3, 100 << 10);
        heap.dealloc(first, layout(100 << 10, 8));
        let kept = heap.stats();
        assert_eq!((kept.large_blocks, kept.large_kept), (0, 100 << 10));
        assert_eq!(vm.stats().areas, areas + 1, "kept, still mapped");

        heap.dealloc(first, layout(100 << 10, 8));
        let refused = vmalloc::heap::HeapStats {
            refused_frees: kept.refused_frees + 1,
            ..kept
        };
        assert_eq!(heap.stats(), refused, "a second free of a kept block");

        // Within twice its size: served by the kept block, no new area.
        let again = heap.alloc(layout(60 << 10, 8));
        assert_eq!(again, first);
        assert_eq!(heap.stats().large_kept, 0);
        assert_eq!(vm.stats().areas, areas + 1);
        again.write_bytes(4, 60 << 10);
        heap.dealloc(again, layout(60 << 10, 8));

        // Less than half its size, or aligned beyond its start: a fresh area.
        let small = heap.alloc(layout(20 << 10, 8));
        let aligned = heap.alloc(layout(64 << 10, 2 << 20));
        assert!(small != first && aligned != first && (aligned as usize).is_multiple_of(2 << 20));
        assert_eq!(vm.stats().areas, areas + 3);
        heap.dealloc(small, layout(20 << 10, 8));
        heap.dealloc(aligned, layout(64 << 10, 2 << 20));
        assert_eq!(heap.stats().large_kept, (100 + 20 + 64) << 10);

        // Aligned past a page: no kept block serves it, the 2 MiB-aligned one
        // included (a move by `vrealloc` keeps the area's own alignment).
        let aligned_again = heap.alloc(layout(64 << 10, 2 << 20));
        assert_eq!(heap.stats().large_kept, (100 + 20 + 64) << 10);
        heap.dealloc(aligned_again, layout(64 << 10, 2 << 20));

        // Past a quarter of the budget: never kept.
        let huge = heap.alloc(layout(CONFIG.large_cache / 4 + 1, 8));
        heap.dealloc(huge, layout(CONFIG.large_cache / 4 + 1, 8));
        assert_eq!(vm.stats().areas, areas + 4);
    }
    heap.shrink();
    vm.purge();
    let stats = heap.stats();
    assert_eq!((stats.large_kept, stats.large_blocks), (0, 0));
    assert_eq!(vm.stats().areas, areas);
    assert_eq!(
        vm.stats().data_frames,
        data_frames + (stats.mapped + stats.slab_bytes) as u64 / PAGE_SIZE
    );

    // With no budget, a free gives the block back at once.
    let none = KernelHeap::new(HeapConfig {
        large_cache: 0,
        ..CONFIG
    });
    none.init(&vm).unwrap();
    let areas = vm.stats().areas;
    // SAFETY: as above.
    unsafe {
        let block = none.alloc(layout(100 << 10, 8));
        none.dealloc(block, layout(100 << 10, 8));
    }
    assert_eq!((vm.stats().areas, none.stats().large_kept), (areas, 0));
}

#[test]
fn kept_large_blocks_age_out_while_the_heap_works_on_small_objects() {
    let machine = machine(64 << 20);
    let frames = machine.frames();
    let vm = manager(&machine, &frames);
    let heap = KernelHeap::new(CONFIG);
    heap.init(&vm).unwrap();
    let large = Layout::from_size_align(64 << 10, 8).unwrap();
    let small = Layout::from_size_align(48, 8).unwrap();
    // SAFETY: non-zero sizes; each block is freed once with its layout.
    unsafe {
        let block = heap.alloc(large);
        heap.dealloc(block, large);
        assert_eq!(heap.stats().large_kept, 64 << 10);
        for _ in 0..20_000 {
            let object = heap.alloc(small);
            heap.dealloc(object, small);
        }
        assert_eq!(heap.stats().large_kept, 64 << 10, "a short while: kept");
        for _ in 0..60_000 {
            let object = heap.alloc(small);
            heap.dealloc(object, small);
        }
    }
    assert_eq!(heap.stats().large_kept, 0, "idle long enough: given back");
}

/// Runs `check` on a heap (keeping up to 4 MiB of large blocks) whose machine's
/// frames are all taken by small blocks, with 3 MiB of freed 1 MiB blocks kept and
/// a live 64 KiB block, which `check` may resize or free.
fn with_memory_full_and_3_mib_kept(
    check: impl FnOnce(&KernelHeap, &SimVmalloc<&SimFrames>, *mut u8),
) {
    let machine = machine(32 << 20);
    let frames = machine.frames();
    let vm = manager(&machine, &frames);
    let heap = KernelHeap::new(HeapConfig {
        large_cache: 4 << 20,
        ..CONFIG
    });
    heap.init(&vm).unwrap();
    let large = Layout::from_size_align(1 << 20, 8).unwrap();
    let small = Layout::from_size_align(2000, 8).unwrap();
    // SAFETY: non-zero sizes; each block is freed once with its layout.
    unsafe {
        let live = heap.alloc(Layout::from_size_align(64 << 10, 8).unwrap());
        let blocks: Vec<_> = (0..3).map(|_| heap.alloc(large)).collect();
        assert!(!live.is_null() && blocks.iter().all(|block| !block.is_null()));
        let filled: Vec<_> =
            std::iter::from_fn(|| Some(heap.alloc(small)).filter(|p| !p.is_null())).collect();
        for block in blocks {
            heap.dealloc(block, large);
        }
        assert_eq!(heap.stats().large_kept, 3 << 20);
        check(&heap, &vm, live);
        for p in filled {
            heap.dealloc(p, small);
        }
    }
    assert_eq!(heap.stats().large_bytes, 0);
}

#[test]
fn an_allocation_that_runs_out_of_frames_gets_the_kept_large_blocks_back_first() {
    with_memory_full_and_3_mib_kept(|heap, _, live| {
        let big = Layout::from_size_align(2 << 20, 8).unwrap();
        // SAFETY: a non-zero size; each block is freed once with its layout.
        unsafe {
            // No kept block holds 2 MiB, and no free frame is left but theirs.
            let block = heap.alloc(big);
            assert!(!block.is_null(), "the kept blocks' frames serve it");
            assert_eq!(heap.stats().large_kept, 0);
            block.write_bytes(1, 2 << 20);
            heap.dealloc(block, big);
            heap.dealloc(live, Layout::from_size_align(64 << 10, 8).unwrap());
        }
    });
}

#[test]
fn a_kept_block_freed_again_through_another_heap_or_resized_is_refused() {
    let machine = machine(64 << 20);
    let frames = machine.frames();
    let vm = manager(&machine, &frames);
    // Boxed: two heaps' per-CPU state outgrows a test thread's stack in debug builds.
    let a = Box::new(KernelHeap::new(CONFIG));
    let b = Box::new(KernelHeap::new(CONFIG));
    a.init(&vm).unwrap();
    b.init(&vm).unwrap();
    let big = Layout::from_size_align(128 << 10, 8).unwrap();
    // SAFETY: non-zero sizes; the second free and the resize of the freed block are
    // deliberate misuse, which the heaps refuse.
    unsafe {
        let block = a.alloc(big);
        a.dealloc(block, big);
        let (kept_a, kept_b) = (a.stats(), b.stats());
        b.dealloc(block, big);
        assert_eq!(b.stats().refused_frees, kept_b.refused_frees + 1);
        assert_eq!(b.stats().large_kept, 0, "B does not keep A's kept block");
        assert!(a.realloc(block, big, 16 << 10).is_null());
        assert!(a.realloc(block, big, 1 << 20).is_null());
        let refused = vmalloc::heap::HeapStats {
            refused_frees: kept_a.refused_frees + 2,
            ..kept_a
        };
        assert_eq!(a.stats(), refused, "resizes of a kept block change nothing");
        let (from_a, from_b) = (a.alloc(big), b.alloc(big));
        assert_eq!(from_a, block, "A's kept block serves A, whole");
        assert_ne!(from_b, block);
        let area = vm.find_vm_area(VirtAddr::from_ptr(from_a)).unwrap();
        assert!(area.size >= big.size() as u64);
        a.dealloc(from_a, big);
        b.dealloc(from_b, big);
    }
}

#[test]
fn kept_blocks_go_back_when_a_resize_runs_out_and_stay_when_a_request_is_impossible() {
    with_memory_full_and_3_mib_kept(|heap, vm, live| {
        let layout = |size: usize, align: usize| Layout::from_size_align(size, align).unwrap();
        // SAFETY: non-zero sizes; each block is freed once with its layout.
        unsafe {
            // Impossible requests: refused by vmalloc, the kept blocks stay.
            let (kept, areas) = (heap.stats().large_kept, vm.stats().areas);
            assert!(heap.alloc(layout(64 << 10, 1 << 62)).is_null());
            assert!(heap.alloc(layout(isize::MAX as usize / 2, 8)).is_null());
            assert_eq!((heap.stats().large_kept, vm.stats().areas), (kept, areas));
            // Growing past what is free: the kept blocks' frames serve it.
            let grown = heap.realloc(live, layout(64 << 10, 8), 2 << 20);
            assert!(!grown.is_null(), "the kept blocks went back");
            grown.write_bytes(1, 2 << 20);
            heap.dealloc(grown, layout(2 << 20, 8));
        }
    });
}

#[test]
fn a_kvbox_whose_value_panics_in_drop_still_frees_its_block() {
    struct PanicsOnDrop(#[allow(dead_code)] [u8; 64]);
    impl Drop for PanicsOnDrop {
        fn drop(&mut self) {
            panic!("the value's drop panics");
        }
    }
    let machine = machine(64 << 20);
    let frames = machine.frames();
    let vm = manager(&machine, &frames);
    let heap = KernelHeap::new(CONFIG);
    heap.init(&vm).unwrap();
    let boxed = KVBox::new(&heap, PanicsOnDrop([0; 64])).unwrap();
    assert_eq!(heap.stats().slab_objects, 1);
    let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(boxed)));
    assert!(unwound.is_err());
    assert_eq!(
        heap.stats().slab_objects,
        0,
        "freed while unwinding, as Box does"
    );
}

#[test]
fn a_realloc_of_a_foreign_area_to_a_smaller_path_is_refused() {
    let machine = machine(64 << 20);
    let frames = machine.frames();
    let vm = manager(&machine, &frames);
    let heap = KernelHeap::new(CONFIG);
    heap.init(&vm).unwrap();
    let options = vmalloc::vmalloc::VmOptions {
        tag: "someone else",
        ..vmalloc::vmalloc::VmOptions::default()
    };
    let foreign = vm.vmalloc_with(32 << 10, &options).unwrap().as_ptr();
    let layout = Layout::from_size_align(32 << 10, 8).unwrap();
    for new_size in [100, 8 << 10, 64 << 10] {
        let before = heap.stats();
        // SAFETY: deliberately wrong: the heap did not make this block; it refuses it.
        let moved = unsafe { heap.realloc(foreign, layout, new_size) };
        assert!(moved.is_null(), "to {new_size} bytes");
        assert_eq!(heap.stats().refused_frees, before.refused_frees + 1);
        assert_eq!(heap.stats().in_use, before.in_use, "nothing allocated");
    }
    assert!(
        vm.find_vm_area(VirtAddr::from_ptr(foreign)).is_some(),
        "still its owner's"
    );
}

/// What a manager has given out: areas, bytes of its region and frames mapped.
fn given_out<F: FrameSource + Clone>(vm: &SimVmalloc<'_, F>) -> (u64, u64, u64) {
    vm.purge();
    let stats = vm.stats();
    (stats.areas, stats.used, stats.data_frames)
}

/// A heap dropped once its blocks are freed leaves the manager as it found it: its
/// window, its slabs (the CPU's too), its kept large blocks and its guarded pool all
/// go back, whatever paths the blocks took.
#[test]
fn a_dropped_heap_gives_back_every_area_and_frame_it_took() {
    let machine = machine(64 << 20);
    let frames = machine.frames();
    let vm = manager(&machine, &frames);
    let before = given_out(&vm);
    for (per_cpu, sample_interval) in [(true, 0), (true, 3), (false, 0)] {
        let heap = KernelHeap::new(HeapConfig {
            per_cpu,
            sample_interval,
            ..CONFIG
        });
        heap.init(&vm).unwrap();
        let mut rng = Rng::new(5);
        let mut live: Vec<Block> = Vec::new();
        for step in 0..3000 {
            if live.len() < 300 && rng.below(3) != 0 {
                let size = match rng.below(10) {
                    0 => 5000 + rng.below(8000) as usize,      // the list
                    1 => 20_000 + rng.below(200_000) as usize, // a large block
                    _ => 1 + rng.below(2000) as usize,         // a slab
                };
                let layout = Layout::from_size_align(size, 8).unwrap();
                // SAFETY: a non-zero size.
                let ptr = unsafe { heap.alloc(layout) };
                assert!(!ptr.is_null());
                let block = Block {
                    ptr,
                    layout,
                    fill: step as u8,
                };
                fill(&block);
                live.push(block);
            } else if !live.is_empty() {
                let block = live.swap_remove(rng.below(live.len() as u64) as usize);
                check(&block, block.layout.size());
                // SAFETY: a live block, freed once with its layout.
                unsafe { heap.dealloc(block.ptr, block.layout) };
            }
        }
        for block in live {
            // SAFETY: as above.
            unsafe { heap.dealloc(block.ptr, block.layout) };
        }
        let stats = heap.stats();
        assert!(stats.large_kept > 0 && stats.slab_bytes > 0, "{stats:?}");
        if sample_interval > 0 {
            assert!(heap.guarded_stats().sampled > 0);
        }
        assert_ne!(given_out(&vm), before);
        drop(heap);
        assert_eq!(
            given_out(&vm),
            before,
            "per_cpu {per_cpu}, sampling 1 in {sample_interval}: (areas, bytes, frames)"
        );
    }
}

/// A heap dropped with blocks still allocated does not unmap them: a pointer kept
/// past the heap (a caller's leak) reads what was written, and nothing else is lost.
#[test]
fn a_heap_dropped_with_blocks_allocated_leaves_them_mapped() {
    let machine = machine(64 << 20);
    let frames = machine.frames();
    let vm = manager(&machine, &frames);
    let heap = KernelHeap::new(HeapConfig {
        sample_interval: 1,
        ..CONFIG
    });
    heap.init(&vm).unwrap();
    let blocks: Vec<Block> = [(48, 1), (100, 2), (6000, 3), (100_000, 4)]
        .into_iter()
        .map(|(size, fill_byte)| {
            let layout = Layout::from_size_align(size, 8).unwrap();
            // SAFETY: a non-zero size.
            let block = Block {
                ptr: unsafe { heap.alloc(layout) },
                layout,
                fill: fill_byte,
            };
            fill(&block);
            block
        })
        .collect();
    assert!(
        heap.guarded_stats().live > 0,
        "the first allocation is sampled"
    );
    drop(heap);
    // Whatever the heap gave back is unmapped and flushed now.
    vm.purge();
    for block in &blocks {
        check(block, block.layout.size());
    }
}

/// A `realloc` of a slab object freed just before is refused as a second free of it
/// is: null, counted, nothing changed, into another size class (the heap moved it,
/// and returned the new block) and within its class (the heap returned the freed
/// pointer, which the next allocation handed out again: two owners). With per-CPU
/// slabs and without.
#[test]
fn a_realloc_of_a_slab_object_freed_just_before_is_refused() {
    let machine = SimMachine::new(
        SimConfig::new(64 << 20)
            .with_scatter_seed(11)
            .with_host_window(8 << 30),
    );
    let frames = machine.frames();
    // SAFETY: the window's tables serve this manager alone.
    let vm = unsafe { scenarios::window_manager(&machine, &frames, &machine) };
    for per_cpu in [false, true] {
        let heap = KernelHeap::new(HeapConfig {
            per_cpu,
            window: 16 << 20,
            ..HeapConfig::DEFAULT
        });
        heap.init(&vm).unwrap();
        let old = Layout::from_size_align(100, 8).unwrap();
        for new_size in [2000, 110] {
            // SAFETY: a non-zero size; the resize of the freed block is the bad call
            // the heap refuses.
            unsafe {
                let block = heap.alloc(old);
                heap.dealloc(block, old);
                let before = heap.stats();
                let resized = heap.realloc(block, old, new_size);
                assert!(resized.is_null(), "per_cpu {per_cpu}, 100 -> {new_size}");
                let after = heap.stats();
                assert_eq!(after.refused_frees, before.refused_frees + 1);
                assert_eq!(after.in_use, before.in_use, "nothing changed");
                // A live block still resizes, in its class and out of it.
                let live = heap.alloc(old);
                live.write_bytes(0x77, 100);
                let same = heap.realloc(live, old, 110);
                assert_eq!(same, live);
                let moved = heap.realloc(same, Layout::from_size_align(110, 8).unwrap(), 2000);
                assert!(!moved.is_null());
                assert_eq!(std::slice::from_raw_parts(moved, 100), [0x77; 100]);
                heap.dealloc(moved, Layout::from_size_align(2000, 8).unwrap());
            }
        }
        assert_eq!(heap.stats().in_use, 0);
    }
}

/// `Allocator::grow` of a large block remaps it as `realloc` does (its frames stay,
/// at the new address), as the README says of growing one; the trait's default
/// copied it into a new area, needing both at once. `grow_zeroed` zeroes what it
/// adds; `shrink` and a new alignment keep the bytes.
#[test]
fn allocator_grow_of_a_large_block_remaps_it() {
    use allocator_api2::alloc::Allocator;
    use x86_64::VirtAddr;
    let machine = SimMachine::new(
        SimConfig::new(128 << 20)
            .with_scatter_seed(11)
            .with_host_window(8 << 30),
    );
    let frames = machine.frames();
    // SAFETY: the window's tables serve this manager alone.
    let vm = unsafe { scenarios::window_manager(&machine, &frames, &machine) };
    let heap = KernelHeap::new(HeapConfig {
        window: 16 << 20,
        ..HeapConfig::DEFAULT
    });
    heap.init(&vm).unwrap();
    let heap = &heap;
    let layout = |size| Layout::from_size_align(size, 8).unwrap();
    let block = heap.allocate(layout(1 << 20)).unwrap().cast::<u8>();
    // SAFETY: the block holds 1 MiB.
    unsafe { block.as_ptr().write_bytes(1, 1 << 20) };
    let first = vm
        .vmalloc_to_frame(VirtAddr::from_ptr(block.as_ptr()))
        .unwrap();
    // The frames the grown part gets held data: it reads zero only if zeroed.
    common::dirty_free_frames(&machine, &frames, 0xee);
    // SAFETY: a live block of that layout, given up for the new one.
    let grown = unsafe { heap.grow_zeroed(block, layout(1 << 20), layout(8 << 20)) }
        .unwrap()
        .cast::<u8>();
    let at = VirtAddr::from_ptr(grown.as_ptr());
    assert_eq!(vm.vmalloc_to_frame(at), Ok(first), "remapped, not copied");
    // SAFETY: the grown block holds 8 MiB.
    let bytes = unsafe { std::slice::from_raw_parts(grown.as_ptr(), 8 << 20) };
    assert!(bytes[..1 << 20].iter().all(|&b| b == 1));
    assert!(bytes[1 << 20..].iter().all(|&b| b == 0));
    // SAFETY: as above.
    let shrunk = unsafe { Allocator::shrink(&heap, grown, layout(8 << 20), layout(100)) }
        .unwrap()
        .cast::<u8>();
    let aligned = Layout::from_size_align(100, 4096).unwrap();
    // SAFETY: as above.
    let moved = unsafe { heap.grow(shrunk, layout(100), aligned) }
        .unwrap()
        .cast::<u8>();
    assert!(moved.as_ptr().addr().is_multiple_of(4096));
    // SAFETY: the block holds 100 bytes.
    assert_eq!(
        unsafe { std::slice::from_raw_parts(moved.as_ptr(), 100) },
        [1; 100]
    );
    // SAFETY: a live block of that layout.
    unsafe { heap.deallocate(moved, aligned) };
    assert_eq!(heap.stats().in_use, 0);
}
