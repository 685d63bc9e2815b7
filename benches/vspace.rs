//! The manager's bookkeeping of virtual space (the free-range tree and the area
//! tree) through its public calls, against a naive peer.
//!
//! The peer is what a small kernel starts with: free ranges in a sorted `Vec`, linear
//! first fit, binary search plus `insert`/`remove` (and their shifting) on free; busy
//! areas in a sorted `Vec` found by binary search. It does only that, without a lock,
//! records or a purge list, so the comparison leans towards the peer.
//!
//! The manager reserves areas without backing them ([`Vmalloc::reserve`]) and frees
//! them eagerly, so no frame or page table takes part. Workloads, each with `n` live
//! areas separated by one-page holes (so `n` free ranges):
//! - `alloc_free_page/n`: reserve one page and free it again (the first hole fits);
//! - `alloc_free_fragmented/n`: two pages, which no hole fits, so first fit must look
//!   past all `n` holes;
//! - `alloc_free_random/10000`: random sizes (1..64 pages) and alignments (4 KiB..2 MiB);
//! - `lookup_containing/100000`: the area holding a random interior address
//!   ([`Vmalloc::find_vm_area`]).
//!
//! `cargo bench --bench vspace -- --warm-up-time 1 --measurement-time 2`
//!
//! [`Vmalloc::reserve`]: vmalloc::Vmalloc::reserve
//! [`Vmalloc::find_vm_area`]: vmalloc::Vmalloc::find_vm_area

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use std::hint::black_box;
use vmalloc::PAGE_SIZE;
use vmalloc::tlb::CountingFlush;
use vmalloc::vmalloc::{VMALLOC_END, VMALLOC_START, VmFlags, VmOptions, Vmalloc, VmallocConfig};
use vmalloc_sim::{SimConfig, SimFrames, SimMachine, SimPhys};
use x86_64::VirtAddr;

type Manager = Vmalloc<&'static SimFrames, SimPhys<'static>, &'static CountingFlush>;

/// The manager with `live` one-page areas separated by one-page holes.
fn manager_with_live(live: u64) -> Manager {
    // Leaked: the bench process is short-lived.
    let machine: &'static SimMachine =
        Box::leak(Box::new(SimMachine::new(SimConfig::new(256 << 20))));
    let frames: &'static SimFrames = Box::leak(Box::new(machine.frames()));
    let tlb: &'static CountingFlush = Box::leak(Box::new(CountingFlush::new()));
    let config = VmallocConfig {
        eager: true,
        ..VmallocConfig::default()
    };
    // SAFETY: the machine's root table serves this manager alone.
    let vm = unsafe { Vmalloc::new(config, machine.root(), machine.phys(), frames, tlb) }.unwrap();
    let page = PAGE_SIZE as usize;
    let no_guard = VmOptions {
        flags: VmFlags::NO_GUARD,
        ..VmOptions::default()
    };
    let holes: Vec<*mut u8> = (0..live)
        .map(|_| {
            vm.reserve(page, &no_guard).unwrap();
            vm.reserve(page, &no_guard).unwrap().as_ptr()
        })
        .collect();
    for hole in holes {
        // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
        unsafe { vm.vfree(hole) }.unwrap();
    }
    vm
}

fn reserve_free(vm: &Manager, size: u64, align: u64) {
    let options = VmOptions {
        align,
        flags: VmFlags::NO_GUARD,
        ..VmOptions::default()
    };
    let ptr = vm.reserve(size as usize, &options).unwrap();
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    unsafe { vm.vfree(black_box(ptr.as_ptr())) }.unwrap();
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
        let vm = manager_with_live(live);
        group.bench_function(BenchmarkId::new("vmalloc", live), |b| {
            b.iter(|| reserve_free(&vm, pages * PAGE_SIZE, PAGE_SIZE))
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
    let vm = manager_with_live(live);
    let mut rng = Lcg(1);
    group.bench_function(BenchmarkId::new("vmalloc", live), |b| {
        b.iter(|| {
            let (size, align) = random_request(&mut rng);
            reserve_free(&vm, size, align)
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
    let vm = manager_with_live(live);
    let naive = VecSpace::with_live(live);
    let mut rng = Lcg(7);
    let mut interior = move || VMALLOC_START + 2 * rng.next(live) * PAGE_SIZE + rng.next(4096);
    group.bench_function(BenchmarkId::new("vmalloc", live), |b| {
        b.iter(|| {
            vm.find_vm_area(VirtAddr::new(black_box(interior())))
                .unwrap()
        })
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
