//! Interrupt handlers that allocate: a simulated interrupt lands at every point of a
//! heap or vmalloc call (every call the library makes into the machine, see
//! `vmalloc_sim`'s interrupt points), and its handler allocates and frees through the
//! heap and `vfree_atomic`s an area. Nothing hangs (a watchdog fails a stuck test by
//! name) and no block is handed out twice (every live block keeps its stamp).

use std::alloc::{GlobalAlloc, Layout};
use std::collections::BTreeMap;
use std::ptr::NonNull;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use vmalloc::Error;
use vmalloc::frame::{BitmapFrameAllocator, LockedFrameAllocator, MemoryRegion};
use vmalloc::heap::{HeapConfig, KernelHeap};
use vmalloc::smp::Shootdown;
use vmalloc::vmalloc::deferred::SLOTS;
use vmalloc::vmalloc::{Vmalloc, VmallocConfig};
use vmalloc_sim::scenarios;
use vmalloc_sim::{
    Access, DEADLOCK_LIMIT, SimConfig, SimCpu, SimFrames, SimMachine, SimPhys, watchdog,
};
use x86_64::VirtAddr;

type Tlb = Shootdown<&'static SimMachine, &'static SimMachine>;
type Manager = Vmalloc<&'static SimFrames, SimPhys<'static>, &'static Tlb>;

/// A machine whose vmalloc memory host code can touch, a manager over it with or
/// without per-CPU caches, and a heap on the manager with or without per-CPU
/// magazines; all leaked, for the `'static` interrupt handler.
struct Kernel {
    machine: &'static SimMachine,
    vm: &'static Manager,
    heap: &'static KernelHeap<'static>,
    /// Blocks handed out and not freed, by start: their end and their stamp.
    live: Mutex<BTreeMap<usize, (usize, u8)>>,
    next_stamp: AtomicU64,
    /// Interrupts that ran, and `vfree_atomic`s refused because the queue was full.
    interrupts: AtomicU64,
}

fn kernel(cpu_caches: bool, magazines: bool) -> &'static Kernel {
    let machine: &'static SimMachine = Box::leak(Box::new(SimMachine::new(
        SimConfig::new(256 << 20)
            .with_scatter_seed(7)
            .with_host_window(8 << 30),
    )));
    let frames: &'static SimFrames = Box::leak(Box::new(machine.frames()));
    let tlb: &'static Tlb = Box::leak(Box::new(Shootdown::new(machine, machine)));
    machine.set_ipi_handler(move || tlb.handle_ipi());
    let config = VmallocConfig {
        cpu_caches,
        ..scenarios::window_config(machine)
    };
    // SAFETY: the machine's page tables serve this manager alone.
    let vm = unsafe { Vmalloc::new(config, machine.root(), machine.phys(), frames, tlb) }.unwrap();
    let vm: &'static Manager = Box::leak(Box::new(vm));
    let heap: &'static KernelHeap<'static> =
        Box::leak(Box::new(KernelHeap::new(HeapConfig::DEFAULT)));
    heap.init(vm).unwrap();
    if magazines {
        heap.use_cpus(machine);
    }
    Box::leak(Box::new(Kernel {
        machine,
        vm,
        heap,
        live: Mutex::default(),
        next_stamp: AtomicU64::new(1),
        interrupts: AtomicU64::new(0),
    }))
}

impl Kernel {
    /// Records a fresh block and fills it with a stamp of its own; fails if it
    /// overlaps a live block.
    fn handed_out(&self, ptr: NonNull<u8>, len: usize) {
        let start = ptr.as_ptr() as usize;
        let stamp = self.next_stamp.fetch_add(1, Ordering::Relaxed) as u8 | 1;
        let mut live = self.live.lock().unwrap();
        if let Some((&other, &(end, _))) = live.range(..start + len).next_back() {
            assert!(
                end <= start,
                "{start:#x}+{len} handed out while {other:#x}..{end:#x} is live"
            );
        }
        live.insert(start, (start + len, stamp));
        drop(live);
        // SAFETY: a fresh block of `len` writable bytes, this test's alone.
        unsafe { ptr.as_ptr().write_bytes(stamp, len) };
    }

    /// Checks a block's stamp and forgets it, before it is freed.
    fn giving_back(&self, ptr: NonNull<u8>) {
        let start = ptr.as_ptr() as usize;
        let (end, stamp) = self.live.lock().unwrap().remove(&start).unwrap();
        // SAFETY: a live block of this test, `end - start` readable bytes.
        let bytes = unsafe { std::slice::from_raw_parts(ptr.as_ptr(), end - start) };
        assert!(
            bytes.iter().all(|&b| b == stamp),
            "the block at {start:#x} was written by someone else"
        );
    }

    fn alloc(&self, layout: Layout) -> NonNull<u8> {
        // SAFETY: a non-zero size.
        let ptr = NonNull::new(unsafe { self.heap.alloc(layout) }).expect("heap allocation");
        assert_eq!(ptr.as_ptr() as usize % layout.align(), 0);
        self.handed_out(ptr, layout.size());
        ptr
    }

    fn dealloc(&self, ptr: NonNull<u8>, layout: Layout) {
        self.giving_back(ptr);
        // SAFETY: allocated with `layout` and not used again.
        unsafe { self.heap.dealloc(ptr.as_ptr(), layout) };
    }

    /// What an interrupt handler of a driver does: allocates and frees through the
    /// heap, and gives a vmalloc area back with `vfree_atomic`.
    fn handler(&'static self) -> impl FnOnce() + Send + 'static {
        move || {
            self.interrupts.fetch_add(1, Ordering::Relaxed);
            for size in [24, 64, 700, 6000, 40_000] {
                let layout = Layout::from_size_align(size, 8).unwrap();
                let block = self.alloc(layout);
                self.dealloc(block, layout);
            }
            let area = self.vm.vmalloc(2 * 4096).unwrap();
            self.handed_out(area, 2 * 4096);
            self.giving_back(area);
            // SAFETY: the area was made above and is not used again.
            let queued = unsafe { self.vm.vfree_atomic(area.as_ptr()) };
            assert_eq!(queued, Ok(()), "one area at a time never fills the queue");
        }
    }

    /// Runs `op` once per interrupt point it passes on `cpu`, with an interrupt at
    /// that point, after `self.cold()` each time so that it takes its slow paths
    /// (new slabs, refills, bookkeeping) every time.
    fn interrupt_everywhere(&'static self, cpu: SimCpu<'static>, mut op: impl FnMut()) {
        cpu.run(|_| self.cold());
        let (_, points) = cpu.count_points(&mut op);
        assert!(points > 0, "the call passes interrupt points");
        let mut taken = 0;
        for point in 0..points {
            cpu.run(|_| self.cold());
            let before = self.interrupts.load(Ordering::Relaxed);
            cpu.interrupt_after(point, self.handler());
            cpu.run(|_| op());
            // Scattered frames may make a run pass a few points fewer.
            if !cpu.disarm() {
                assert_eq!(self.interrupts.load(Ordering::Relaxed), before + 1);
                taken += 1;
            }
        }
        // A first run may take slower paths than later ones (a block made, a slab
        // carved): every point of the path the call takes now was interrupted.
        cpu.run(|_| self.cold());
        let (_, now) = cpu.count_points(&mut op);
        assert!(
            taken >= now,
            "interrupted at {taken} of {points} points, the call passes {now} now"
        );
    }

    /// Empty slabs, magazines, caches and the purge list: the next calls start cold.
    fn cold(&self) {
        self.heap.shrink();
        self.vm.purge();
    }
}

/// Heap calls of every path: a slab object, a list block, a vmalloc'd block, and a
/// large block grown in place or moved. Blocks of other sizes stay live throughout,
/// so a block handed out twice shows.
fn heap_calls(kernel: &'static Kernel) {
    let cpu = kernel.machine.cpu(0);
    let kept: Vec<_> = [(32, 8), (128, 8), (2048, 8), (5000, 8), (50_000, 8)]
        .into_iter()
        .map(|(size, align)| {
            let layout = Layout::from_size_align(size, align).unwrap();
            (kernel.alloc(layout), layout)
        })
        .collect();
    for (size, align) in [(48, 8), (256, 256), (3000, 8), (9000, 16), (70_000, 4096)] {
        let layout = Layout::from_size_align(size, align).unwrap();
        kernel.interrupt_everywhere(cpu, || {
            let block = kernel.alloc(layout);
            kernel.dealloc(block, layout);
        });
    }
    let layout = Layout::from_size_align(20_000, 8).unwrap();
    kernel.interrupt_everywhere(cpu, || {
        let block = kernel.alloc(layout);
        kernel.giving_back(block);
        // SAFETY: allocated with `layout`; the block is used only through the result.
        let grown = unsafe { kernel.heap.realloc(block.as_ptr(), layout, 90_000) };
        let grown = NonNull::new(grown).expect("realloc");
        kernel.handed_out(grown, 90_000);
        kernel.dealloc(grown, Layout::from_size_align(90_000, 8).unwrap());
    });
    for (block, layout) in kept {
        kernel.dealloc(block, layout);
    }
    kernel.heap.shrink();
}

/// vmalloc calls: a small area (a per-CPU block's, when the caches are on), a larger
/// one, a `vrealloc` that grows and one that shrinks, and a purge.
fn vmalloc_calls(kernel: &'static Kernel) {
    let cpu = kernel.machine.cpu(0);
    let vm = kernel.vm;
    for pages in [1, 4, 24] {
        kernel.interrupt_everywhere(cpu, || {
            let area = vm.vmalloc(pages * 4096).unwrap();
            kernel.handed_out(area, pages * 4096);
            kernel.giving_back(area);
            // SAFETY: made above, not used again.
            unsafe { vm.vfree(area.as_ptr()) }.unwrap();
        });
    }
    kernel.interrupt_everywhere(cpu, || {
        let area = vm.vzalloc(3 * 4096).unwrap();
        kernel.handed_out(area, 3 * 4096);
        kernel.giving_back(area);
        // SAFETY: made above; the old pointer is not used after the calls.
        let grown = unsafe { vm.vrealloc(area.as_ptr(), 30 * 4096) }.unwrap();
        kernel.handed_out(grown, 30 * 4096);
        kernel.giving_back(grown);
        // SAFETY: as above.
        let shrunk = unsafe { vm.vrealloc(grown.as_ptr(), 4096) }.unwrap();
        kernel.handed_out(shrunk, 4096);
        kernel.giving_back(shrunk);
        // SAFETY: as above.
        unsafe { vm.vfree(shrunk.as_ptr()) }.unwrap();
    });
    kernel.interrupt_everywhere(cpu, || vm.purge());
}

/// Everything the handlers and the calls took is back once the queue is drained.
fn nothing_left(kernel: &'static Kernel) {
    assert!(kernel.live.lock().unwrap().is_empty());
    kernel.heap.shrink();
    kernel.vm.purge();
    let stats = kernel.vm.stats();
    assert_eq!(stats.deferred_refused, 0, "every queued area was freed");
    // What is left is the heap's own (its window, slabs a CPU holds) and the
    // per-CPU blocks' zone: no area a call or a handler made.
    let left: Vec<_> = kernel
        .vm
        .areas()
        .filter(|area| !area.tag.starts_with("kernel heap") && area.tag != "vmap_blocks")
        .collect();
    assert!(left.is_empty(), "areas left: {left:?}");
    assert!(kernel.interrupts.load(Ordering::Relaxed) > 100);
}

#[test]
fn an_interrupt_at_every_point_of_a_heap_call_allocates_without_deadlock() {
    for (cpu_caches, magazines) in [(false, false), (true, true)] {
        let name = format!("heap calls, caches {cpu_caches}, magazines {magazines}");
        watchdog(&name, DEADLOCK_LIMIT, || {
            let kernel = kernel(cpu_caches, magazines);
            heap_calls(kernel);
            nothing_left(kernel);
        });
    }
}

#[test]
fn an_interrupt_at_every_point_of_a_vmalloc_call_allocates_without_deadlock() {
    for cpu_caches in [false, true] {
        let name = format!("vmalloc calls, caches {cpu_caches}");
        watchdog(&name, DEADLOCK_LIMIT, || {
            let kernel = kernel(cpu_caches, cpu_caches);
            vmalloc_calls(kernel);
            nothing_left(kernel);
        });
    }
}

/// TLB flushes of any kind the calling thread's CPU has made.
fn flushes(machine: &SimMachine) -> u64 {
    let stats = machine.tlb_stats();
    stats.page_flushes + stats.range_flushes + stats.full_flushes
}

#[test]
fn vfree_atomic_never_waits_or_flushes_even_inside_a_purge_and_refuses_a_full_queue() {
    watchdog("vfree_atomic inside a purge", DEADLOCK_LIMIT, || {
        let machine: &'static SimMachine =
            Box::leak(Box::new(SimMachine::new(SimConfig::new(64 << 20))));
        let frames: &'static SimFrames = Box::leak(Box::new(machine.frames()));
        // Eager: every free the queue hands over is flushed at once, so a
        // `vfree_atomic` that drained the queue itself would flush.
        let config = VmallocConfig {
            eager: true,
            ..VmallocConfig::default()
        };
        // SAFETY: the machine's page tables serve this manager alone, and its flush reaches every CPU that runs.
        let vm = unsafe { vmalloc_sim::scenarios::manager_with(machine, frames, machine, config) };
        let vm: &'static _ = Box::leak(Box::new(vm));
        let fill_the_queue = move |areas: &[usize]| {
            let before = flushes(machine);
            let outcomes: Vec<_> = areas
                .iter()
                // SAFETY: the areas are not used again.
                .map(|&area| unsafe { vm.vfree_atomic(area as *mut u8) })
                .collect();
            assert!(outcomes[..SLOTS].iter().all(Result::is_ok), "queued");
            assert_eq!(
                outcomes[SLOTS],
                Err(Error::WouldBlock),
                "refused, not drained"
            );
            assert_eq!(flushes(machine), before, "vfree_atomic never flushed");
        };
        let make = || -> &'static [usize] {
            (0..SLOTS + 1)
                .map(|_| vm.vmalloc(4096).unwrap().as_ptr() as usize)
                .collect::<Vec<_>>()
                .leak()
        };
        // From a plain context, the manager idle.
        let areas = make();
        fill_the_queue(areas);
        assert_eq!(vm.stats().areas, 1, "the next call freed the queued ones");
        // SAFETY: the refused area was never queued and is not used again.
        unsafe { vm.vfree(areas[SLOTS] as *mut u8) }.unwrap();
        // In the middle of a purge's flush, with the manager's lock held by the code
        // it interrupted (as an NMI, or a fault handler, would land).
        let areas = make();
        machine.cpu(0).in_next_flush(move || fill_the_queue(areas));
        let victim = vm.vmalloc(4096).unwrap();
        // SAFETY: made above, not used again; eager: the free purges at once.
        unsafe { vm.vfree(victim.as_ptr()) }.unwrap();
        assert!(!machine.cpu(0).disarm(), "the hook ran inside the purge");
        assert_eq!(vm.stats().areas, 1);
        // SAFETY: as above.
        unsafe { vm.vfree(areas[SLOTS] as *mut u8) }.unwrap();
        assert_eq!(vm.stats().deferred_refused, 0);
    });
}

#[test]
fn every_call_drains_the_queued_frees_the_per_cpu_fast_paths_included() {
    let machine: &'static SimMachine = Box::leak(Box::new(SimMachine::new(
        SimConfig::new(64 << 20).with_cpus(2),
    )));
    let frames: &'static SimFrames = Box::leak(Box::new(machine.frames()));
    let config = VmallocConfig {
        cpu_caches: true,
        ..VmallocConfig::default()
    };
    // SAFETY: the machine's page tables serve this manager alone, and its flush reaches every CPU that runs.
    let vm = unsafe { vmalloc_sim::scenarios::manager_with(machine, frames, machine, config) };
    // Each call returns the areas it made, which may take a queued area's place.
    type Call<'a> = (&'a str, Box<dyn Fn() -> Vec<NonNull<u8>> + 'a>);
    let small = vm.vmalloc(4096).unwrap();
    let calls: [Call; 5] = [
        (
            "a small vmalloc",
            Box::new(|| vec![vm.vmalloc(4096).unwrap()]),
        ),
        (
            "a small vfree",
            Box::new(|| {
                // SAFETY: made for this call, not used again.
                unsafe { vm.vfree(vm.vmalloc(4096).unwrap().as_ptr()) }.unwrap();
                Vec::new()
            }),
        ),
        (
            "vmalloc_to_frame of a small area",
            Box::new(|| {
                vm.vmalloc_to_frame(VirtAddr::from_ptr(small.as_ptr()))
                    .unwrap();
                Vec::new()
            }),
        ),
        (
            "find_vm_area of a small area",
            Box::new(|| {
                vm.find_vm_area(VirtAddr::from_ptr(small.as_ptr())).unwrap();
                Vec::new()
            }),
        ),
        (
            "a large vmalloc",
            Box::new(|| vec![vm.vmalloc(64 * 4096).unwrap()]),
        ),
    ];
    for (name, call) in &calls {
        // One small and one large area, written on CPU 0, queued.
        let queued = [vm.vmalloc(4096).unwrap(), vm.vmalloc(40 * 4096).unwrap()];
        for area in queued {
            // SAFETY: bytes the test owns: no live Rust value lives there.
            unsafe { machine.write(VirtAddr::from_ptr(area.as_ptr()), b"queued") }.unwrap();
            // SAFETY: not used again.
            unsafe { vm.vfree_atomic(area.as_ptr()) }.unwrap();
        }
        let made = call();
        // CPU 1 never cached them: its walk sees what the page tables say now.
        for area in queued.into_iter().filter(|area| !made.contains(area)) {
            let at = VirtAddr::from_ptr(area.as_ptr());
            let walk = machine.cpu(1).translate(at, Access::READ);
            assert!(walk.is_err(), "{name} left a queued area mapped");
        }
    }
}

#[test]
fn a_frame_allocator_given_the_cpus_holds_interrupts_off_while_its_lock_is_held() {
    let machine = SimMachine::new(SimConfig::new(64 << 20));
    let map: Vec<MemoryRegion> = machine.memory_map().to_vec();
    let words = BitmapFrameAllocator::storage_words(map.iter().cloned());
    let (mut plain, mut guarded) = (vec![0; words], vec![0; words]);
    let plain = LockedFrameAllocator::with_storage(map.iter().cloned(), &mut plain).unwrap();
    let bitmap = BitmapFrameAllocator::with_storage(map.iter().cloned(), &mut guarded).unwrap();
    let guarded = LockedFrameAllocator::with_cpus(bitmap, &machine);
    let cpu = machine.cpu(0);
    assert!(
        // SAFETY: the closure leaves this allocator in place.
        unsafe { plain.with_lock(|_| cpu.interrupts_enabled()) },
        "nothing held off"
    );
    // SAFETY: the closure leaves this allocator in place.
    assert!(
        !unsafe { guarded.with_lock(|_| cpu.interrupts_enabled()) },
        "held off"
    );
    assert!(cpu.interrupts_enabled(), "and on again after the unlock");
    let frame = guarded.alloc().unwrap();
    // SAFETY: frames the test took and no longer uses (or a bad free, refused).
    assert_eq!(unsafe { guarded.free(frame) }, Ok(()));
    // SAFETY: frames the test took and no longer uses (or a bad free, refused).
    assert_eq!(
        unsafe { guarded.free(frame) },
        Err(Error::FrameNotAllocated)
    );
}
