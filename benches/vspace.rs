//! The vmalloc free-space allocator and area map against a naive peer.
//!
//! The peer is what a small kernel starts with: free ranges in a sorted `Vec`, linear
//! first fit, binary search plus `insert`/`remove` (and their shifting) on free; busy
//! areas in a sorted `Vec` found by binary search.
//!
//! Workloads, each with `n` live areas separated by one-page holes (so `n` free ranges):
//! - `alloc_free_page/n`: allocate one page and free it again (the first hole fits);
//! - `alloc_free_fragmented/n`: two pages, which no hole fits, so first fit must look
//!   past all `n` holes;
//! - `alloc_free_random/10000`: random sizes (1..64 pages) and alignments (4 KiB..2 MiB);
//! - `lookup_containing/100000`: the area containing a random interior address.
//!
//! Run: `cargo bench --bench vspace -- --warm-up-time 1 --measurement-time 2`.
//!
//! Median times from one run on the shared 2-core build machine (AVL tree / sorted `Vec`):
//!
//! | workload                     | 10 live        | 1,000 live      | 100,000 live     |
//! |------------------------------|----------------|-----------------|------------------|
//! | `alloc_free_page`            | 43 ns / 33 ns  | 129 ns / 327 ns | 222 ns / 39.6 µs |
//! | `alloc_free_fragmented`      | 40 ns / 23 ns  | 136 ns / 2.2 µs | 262 ns / 222 µs  |
//! | `alloc_free_random` (10,000) |                |                 | 906 ns / 21.8 µs |
//! | `lookup_containing`          |                |                 | 77 ns / 52 ns    |
//!
//! The tree grows with the depth of the path (about 4 levels at 10 ranges, 18 at
//! 100,000): 5.1x from 10 to 100,000 live areas, where the vector grows 1,200x to
//! 9,500x. Lookup by binary search in a sorted vector stays cheaper, but every insert or
//! remove in it shifts the tail, so it loses as soon as areas come and go.

// The library's bookkeeping is crate-internal; the bench compiles the same files.
#[allow(dead_code)]
#[path = "../src/vmalloc/node.rs"]
mod node;
#[allow(dead_code)]
#[path = "../src/vmalloc/space.rs"]
mod space;

/// What `space.rs`'s tests take from their sibling module in the library.
#[allow(unused_imports)]
mod options {
    pub use vmalloc::vmalloc::{VMALLOC_SIZE, VMALLOC_START};
}

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use node::NodePool;
use space::{AreaMap, VSpace};
use std::alloc::{Layout, alloc_zeroed};
use std::cell::RefCell;
use std::hint::black_box;
use vmalloc::vmalloc::{VMALLOC_END, VMALLOC_SIZE, VMALLOC_START};
#[allow(unused_imports)]
use vmalloc::{Error, FrameSource, OffsetPhysMemory, PAGE_SIZE, PhysMemory};
use x86_64::structures::paging::{PhysFrame, Size4KiB};
use x86_64::{PhysAddr, VirtAddr};

/// Host memory posing as physical memory; leaked, the bench process is short-lived.
struct HostFrames {
    base: *mut u8,
    free: RefCell<Vec<PhysFrame<Size4KiB>>>,
}

impl HostFrames {
    fn new(count: u64) -> &'static Self {
        let layout = Layout::from_size_align((count * PAGE_SIZE) as usize, 4096).unwrap();
        // SAFETY: non-zero size.
        let base = unsafe { alloc_zeroed(layout) };
        assert!(!base.is_null());
        let free = (0..count)
            .map(|i| PhysFrame::containing_address(PhysAddr::new(i * PAGE_SIZE)))
            .collect();
        Box::leak(Box::new(Self {
            base,
            free: RefCell::new(free),
        }))
    }

    fn phys(&self) -> OffsetPhysMemory {
        // SAFETY: all frames handed out lie in the leaked buffer at `base`.
        unsafe { OffsetPhysMemory::new(VirtAddr::new(self.base as u64)) }
    }
}

// SAFETY: frames lie in the leaked buffer, each handed out once until freed.
unsafe impl FrameSource for HostFrames {
    fn alloc_frame(&self) -> Option<PhysFrame<Size4KiB>> {
        self.free.borrow_mut().pop()
    }
    fn free_frame(&self, frame: PhysFrame<Size4KiB>) -> Result<(), Error> {
        self.free.borrow_mut().push(frame);
        Ok(())
    }
    fn free_frames(&self, frames: &[PhysFrame<Size4KiB>]) -> Result<(), Error> {
        frames.iter().try_for_each(|f| self.free_frame(*f))
    }
}

type Pool = NodePool<&'static HostFrames, OffsetPhysMemory>;

/// The tree-based bookkeeping with `live` one-page areas separated by one-page holes.
struct TreeSpace {
    pool: Pool,
    space: VSpace,
    areas: AreaMap<u64>,
}

impl TreeSpace {
    fn with_live(live: u64) -> Self {
        let frames = HostFrames::new(8192);
        let mut pool = NodePool::new::<u64>(frames, frames.phys());
        let mut space = VSpace::new(&mut pool, VirtAddr::new(VMALLOC_START), VMALLOC_SIZE).unwrap();
        let mut areas = AreaMap::new();
        for i in 0..live {
            let addr = space.alloc(&mut pool, PAGE_SIZE, 1).unwrap();
            areas.insert(&mut pool, addr, PAGE_SIZE, i).unwrap();
            space.alloc(&mut pool, PAGE_SIZE, 1).unwrap();
        }
        for i in 0..live {
            let hole = VMALLOC_START + (2 * i + 1) * PAGE_SIZE;
            space
                .free(&mut pool, VirtAddr::new(hole), PAGE_SIZE)
                .unwrap();
        }
        Self { pool, space, areas }
    }

    fn alloc_free(&mut self, size: u64, align: u64) {
        let addr = self.space.alloc(&mut self.pool, size, align).unwrap();
        self.space
            .free(&mut self.pool, black_box(addr), size)
            .unwrap();
    }

    fn lookup(&self, addr: u64) -> Option<u64> {
        let area = self.areas.find_containing(VirtAddr::new(addr))?;
        Some(area.data)
    }
}

/// The naive peer (see the module doc).
struct VecSpace {
    free: Vec<(u64, u64)>,
    busy: Vec<(u64, u64, u64)>,
}

impl VecSpace {
    fn with_live(live: u64) -> Self {
        let mut free = Vec::new();
        let mut busy = Vec::new();
        for i in 0..live {
            busy.push((VMALLOC_START + 2 * i * PAGE_SIZE, PAGE_SIZE, i));
            free.push((VMALLOC_START + (2 * i + 1) * PAGE_SIZE, PAGE_SIZE));
        }
        let tail = VMALLOC_START + 2 * live * PAGE_SIZE;
        match free.last_mut() {
            Some(last) => last.1 = VMALLOC_END - last.0,
            None => free.push((tail, VMALLOC_END - tail)),
        }
        Self { free, busy }
    }

    fn alloc(&mut self, size: u64, align: u64) -> Option<u64> {
        let align = align.max(PAGE_SIZE);
        let (index, addr) = self.free.iter().enumerate().find_map(|(i, &(s, n))| {
            let addr = s.checked_next_multiple_of(align)?;
            (addr <= s + n && s + n - addr >= size).then_some((i, addr))
        })?;
        let (start, len) = self.free[index];
        let (head, tail) = (addr - start, start + len - addr - size);
        match (head > 0, tail > 0) {
            (true, true) => {
                self.free[index].1 = head;
                self.free.insert(index + 1, (addr + size, tail));
            }
            (true, false) => self.free[index].1 = head,
            (false, true) => self.free[index] = (addr + size, tail),
            (false, false) => {
                self.free.remove(index);
            }
        }
        Some(addr)
    }

    fn free(&mut self, start: u64, size: u64) {
        let index = self.free.partition_point(|f| f.0 < start);
        let joins_prev = index > 0 && self.free[index - 1].0 + self.free[index - 1].1 == start;
        let joins_next = self.free.get(index).is_some_and(|f| f.0 == start + size);
        match (joins_prev, joins_next) {
            (true, true) => {
                self.free[index - 1].1 += size + self.free[index].1;
                self.free.remove(index);
            }
            (true, false) => self.free[index - 1].1 += size,
            (false, true) => self.free[index] = (start, self.free[index].1 + size),
            (false, false) => self.free.insert(index, (start, size)),
        }
    }

    fn alloc_free(&mut self, size: u64, align: u64) {
        let addr = self.alloc(size, align).unwrap();
        self.free(black_box(addr), size);
    }

    fn lookup(&self, addr: u64) -> Option<u64> {
        let index = self.busy.partition_point(|b| b.0 <= addr).checked_sub(1)?;
        let (start, size, data) = self.busy[index];
        (addr < start + size).then_some(data)
    }
}

/// Deterministic pseudo-random numbers (64-bit LCG, high bits).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, bound: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % bound
    }
}

fn alloc_free(c: &mut Criterion, name: &str, pages: u64) {
    let mut group = c.benchmark_group(name);
    for live in [10, 1_000, 100_000] {
        let mut tree = TreeSpace::with_live(live);
        group.bench_function(BenchmarkId::new("avl", live), |b| {
            b.iter(|| tree.alloc_free(pages * PAGE_SIZE, 1))
        });
        let mut naive = VecSpace::with_live(live);
        group.bench_function(BenchmarkId::new("sorted_vec", live), |b| {
            b.iter(|| naive.alloc_free(pages * PAGE_SIZE, 1))
        });
    }
    group.finish();
}

fn alloc_free_page(c: &mut Criterion) {
    alloc_free(c, "alloc_free_page", 1);
}

fn alloc_free_fragmented(c: &mut Criterion) {
    alloc_free(c, "alloc_free_fragmented", 2);
}

fn random_request(rng: &mut Lcg) -> (u64, u64) {
    let pages = 1 + rng.next(64);
    let align = PAGE_SIZE << rng.next(10);
    (pages * PAGE_SIZE, align)
}

fn alloc_free_random(c: &mut Criterion) {
    let mut group = c.benchmark_group("alloc_free_random");
    let live = 10_000;
    let mut tree = TreeSpace::with_live(live);
    let mut rng = Lcg(1);
    group.bench_function(BenchmarkId::new("avl", live), |b| {
        b.iter(|| {
            let (size, align) = random_request(&mut rng);
            tree.alloc_free(size, align)
        })
    });
    let mut naive = VecSpace::with_live(live);
    let mut rng = Lcg(1);
    group.bench_function(BenchmarkId::new("sorted_vec", live), |b| {
        b.iter(|| {
            let (size, align) = random_request(&mut rng);
            naive.alloc_free(size, align)
        })
    });
    group.finish();
}

fn lookup_containing(c: &mut Criterion) {
    let mut group = c.benchmark_group("lookup_containing");
    let live = 100_000;
    let tree = TreeSpace::with_live(live);
    let naive = VecSpace::with_live(live);
    let mut rng = Lcg(7);
    let mut interior = move || VMALLOC_START + 2 * rng.next(live) * PAGE_SIZE + rng.next(4096);
    group.bench_function(BenchmarkId::new("avl", live), |b| {
        b.iter(|| tree.lookup(black_box(interior())).unwrap())
    });
    group.bench_function(BenchmarkId::new("sorted_vec", live), |b| {
        b.iter(|| naive.lookup(black_box(interior())).unwrap())
    });
    group.finish();
}

criterion_group!(
    benches,
    alloc_free_page,
    alloc_free_fragmented,
    alloc_free_random,
    lookup_containing
);
criterion_main!(benches);
