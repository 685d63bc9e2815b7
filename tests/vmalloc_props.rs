//! Random sequences of every vmalloc operation, bad input included, against a plain
//! model, with the page tables checked by an independent walker after every step.

use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use vmalloc::frame::FaultInjector;
use vmalloc::vmalloc::{
    AreaInfo, AreaKind, CacheMode, HUGE_PAGE_SIZE, Prot, VmFlags, VmOptions, Vmalloc, VmallocConfig,
};
use vmalloc::{Error, FrameSource, PAGE_SIZE, TlbFlush};
use vmalloc_sim::scenarios::{SmpTlb, manager_with, smp_machine};
use vmalloc_sim::{DEADLOCK_LIMIT, SimConfig, SimFrames, SimMachine, SimPhys, watchdog};
use x86_64::structures::paging::PhysFrame;
use x86_64::structures::paging::mapper::{Translate, TranslateResult};
use x86_64::{PhysAddr, VirtAddr};

type Manager<'m, F> = Vmalloc<F, SimPhys<'m>, &'m SimMachine>;

#[derive(Debug, Clone)]
enum Op {
    Alloc {
        bytes: usize,
        align_shift: u8,
        zero: bool,
        no_guard: bool,
        wx: bool,
        huge: bool,
    },
    Free {
        pick: usize,
        how: BadPointer,
    },
    Vmap {
        pages: usize,
    },
    Vunmap {
        pick: usize,
    },
    Ioremap {
        phys: u64,
        bytes: usize,
    },
    Iounmap {
        pick: usize,
    },
    Realloc {
        pick: usize,
        bytes: usize,
    },
    SetProt {
        pick: usize,
        prot: u8,
    },
    Purge,
}

#[derive(Debug, Clone, Copy)]
enum BadPointer {
    Exact,
    Interior,
    Guard,
    Null,
    Outside,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1usize..40 * 4096, 0u8..64, any::<bool>(), any::<bool>(), prop::bool::weighted(0.05))
            .prop_map(|(bytes, align_shift, zero, no_guard, wx)| Op::Alloc { bytes, align_shift, zero, no_guard, wx, huge: false }),
        1 => (1usize..5 << 20, 0u8..24, any::<bool>(), any::<bool>(), prop::bool::weighted(0.05))
            .prop_map(|(bytes, align_shift, zero, no_guard, wx)| Op::Alloc { bytes, align_shift, zero, no_guard, wx, huge: true }),
        1 => (any::<usize>(), 0u8..4).prop_map(|(pick, prot)| Op::SetProt { pick, prot }),
        3 => (any::<usize>(), prop_oneof![
                6 => Just(BadPointer::Exact), 1 => Just(BadPointer::Interior), 1 => Just(BadPointer::Guard),
                1 => Just(BadPointer::Null), 1 => Just(BadPointer::Outside)])
            .prop_map(|(pick, how)| Op::Free { pick, how }),
        1 => (1usize..12).prop_map(|pages| Op::Vmap { pages }),
        1 => any::<usize>().prop_map(|pick| Op::Vunmap { pick }),
        1 => (prop_oneof![0u64..(64 << 20), 0u64..(1 << 40)], 1usize..5 * 4096)
            .prop_map(|(phys, bytes)| Op::Ioremap { phys, bytes }),
        1 => any::<usize>().prop_map(|pick| Op::Iounmap { pick }),
        2 => (any::<usize>(), 1usize..50 * 4096).prop_map(|(pick, bytes)| Op::Realloc { pick, bytes }),
        1 => Just(Op::Purge),
    ]
}

/// What the model knows of one live area.
#[derive(Debug, Clone)]
struct Live {
    kind: AreaKind,
    pages: u64,
    /// Byte pattern written at the start of vmalloc areas: (seed, length).
    pattern: Option<(u8, usize)>,
    /// Frames the test owns and lent to vmap; the physical start of ioremap.
    frames: Vec<PhysFrame>,
    phys: Option<PhysAddr>,
    /// The pointer the call returned.
    ptr: u64,
    /// Whether a guard page follows.
    guard: bool,
}

struct World<'m, T: TlbFlush = &'m SimMachine> {
    machine: &'m SimMachine,
    frames: &'m SimFrames,
    vm: Vmalloc<&'m SimFrames, SimPhys<'m>, T>,
    live: BTreeMap<u64, Live>,
    /// Ranges freed since the last purge: their pages must not translate after it.
    freed: Vec<(u64, u64)>,
    held_for_vmap: u64,
    /// The label areas get: none with the per-CPU caches on, so small ones come
    /// from blocks.
    tag: &'static str,
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i * 31 % 255) as u8))
        .collect()
}

impl<T: TlbFlush> World<'_, T> {
    fn pick(&self, pick: usize, kind: AreaKind) -> Option<(u64, Live)> {
        let of_kind: Vec<_> = self.live.iter().filter(|(_, l)| l.kind == kind).collect();
        (!of_kind.is_empty()).then(|| {
            let (start, live) = of_kind[pick % of_kind.len()];
            (*start, live.clone())
        })
    }

    fn snapshot(&self) -> (vmalloc::vmalloc::VmallocStats, u64, Vec<AreaInfo>) {
        (
            self.vm.stats(),
            self.frames.stats().free,
            self.vm.areas().collect(),
        )
    }

    fn step(&mut self, op: Op) {
        let before = self.snapshot();
        let refused = |world: &Self, what: &str| {
            assert_eq!(
                world.snapshot(),
                before,
                "a refused {what} changed something"
            );
        };
        match op {
            Op::Alloc {
                bytes,
                align_shift,
                zero,
                no_guard,
                wx,
                huge,
            } => {
                let mut flags = VmFlags::empty();
                flags.set(VmFlags::ZERO, zero);
                flags.set(VmFlags::NO_GUARD, no_guard);
                flags.set(VmFlags::HUGE, huge);
                let prot = if wx {
                    Prot::WRITE | Prot::EXEC
                } else {
                    Prot::KERNEL_RW
                };
                let align = 1u64 << align_shift;
                let options = VmOptions {
                    align,
                    prot,
                    flags,
                    tag: self.tag,
                };
                match self.vm.vmalloc_with(bytes, &options) {
                    Ok(ptr) => {
                        assert!(!wx);
                        let start = ptr.as_ptr() as u64;
                        assert_eq!(start % align.max(PAGE_SIZE), 0);
                        if huge && bytes as u64 >= HUGE_PAGE_SIZE {
                            assert_eq!(start % HUGE_PAGE_SIZE, 0, "a huge area is 2 MiB-aligned");
                        }
                        let pages = (bytes as u64).div_ceil(PAGE_SIZE);
                        if zero {
                            let mut bytes_back = vec![1; (pages * PAGE_SIZE) as usize];
                            self.machine
                                .read(VirtAddr::new(start), &mut bytes_back)
                                .unwrap();
                            assert!(bytes_back.iter().all(|&b| b == 0), "vzalloc memory is zero");
                        }
                        let seed = start as u8 ^ 0x5a;
                        let len = bytes.min(3 * 4096);
                        // SAFETY: bytes the test owns: no live Rust value lives there.
                        unsafe {
                            self.machine
                                .write(VirtAddr::new(start), &pattern(seed, len))
                        }
                        .unwrap();
                        let live = Live {
                            kind: AreaKind::Vmalloc,
                            pages,
                            pattern: Some((seed, len)),
                            frames: vec![],
                            phys: None,
                            ptr: start,
                            guard: !no_guard,
                        };
                        self.live.insert(start, live);
                    }
                    Err(Error::WriteExecute) => {
                        assert!(wx);
                        refused(self, "W+X vmalloc");
                    }
                    Err(Error::BadAlignment) => {
                        assert!(
                            align > vmalloc::vmalloc::VMALLOC_SIZE,
                            "only alignments past the region's size are bad: 2^{align_shift}"
                        );
                        refused(self, "over-aligned vmalloc");
                    }
                    Err(Error::OutOfVirtualSpace) => {
                        assert!(
                            align_shift > 40,
                            "only huge alignments fail: 2^{align_shift}"
                        );
                        // Lazily freed areas may be purged first, in case one holds the
                        // only aligned slot; live areas stay as they were.
                        let (_, _, areas) = self.snapshot();
                        assert_eq!(areas, before.2, "a refused vmalloc changed the live areas");
                    }
                    Err(error) => panic!("vmalloc({bytes}, 2^{align_shift}): {error:?}"),
                }
            }
            Op::Free { pick, how } => {
                let Some((start, live)) = self.pick(pick, AreaKind::Vmalloc) else {
                    return;
                };
                let (ptr, expected) = match how {
                    BadPointer::Exact => (start, Ok(())),
                    BadPointer::Interior => (start + 8, Err(Error::InteriorPointer)),
                    BadPointer::Guard => (start + live.pages * PAGE_SIZE, Err(Error::NotAllocated)),
                    BadPointer::Null => (0, Err(Error::NullPointer)),
                    BadPointer::Outside => (0x1000, Err(Error::NotInRegion)),
                };
                if matches!(how, BadPointer::Guard) && !live.guard {
                    return;
                }
                if expected.is_ok() {
                    self.check_pattern(&live);
                }
                // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
                let result = unsafe { self.vm.vfree(ptr as *mut u8) };
                assert_eq!(result, expected, "vfree {how:?}");
                if expected.is_ok() {
                    self.live.remove(&start);
                    self.freed.push((start, live.pages));
                    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
                    assert_eq!(
                        unsafe { self.vm.vfree(start as *mut u8) },
                        Err(Error::NotAllocated),
                        "double free"
                    );
                } else {
                    refused(self, "vfree");
                }
            }
            Op::Vmap { pages } => {
                let mut frames = vec![PhysFrame::containing_address(PhysAddr::zero()); pages];
                if self.frames.alloc_frames(&mut frames) < pages {
                    return;
                }
                self.held_for_vmap += pages as u64;
                let before = self.snapshot();
                // SAFETY: frames the test holds until vunmap hands them back.
                let refused = unsafe { self.vm.vmap(&frames, Prot::WRITE | Prot::EXEC) };
                assert_eq!(refused, Err(Error::WriteExecute));
                assert_eq!(self.snapshot(), before);
                // SAFETY: as above.
                let ptr = unsafe { self.vm.vmap(&frames, Prot::KERNEL_RW) };
                let ptr = ptr.unwrap().as_ptr() as u64;
                let live = Live {
                    kind: AreaKind::Vmap,
                    pages: pages as u64,
                    pattern: None,
                    frames,
                    phys: None,
                    ptr,
                    guard: true,
                };
                self.live.insert(ptr, live);
            }
            Op::Vunmap { pick } => {
                let Some((start, live)) = self.pick(pick, AreaKind::Vmap) else {
                    return;
                };
                // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
                assert_eq!(
                    unsafe { self.vm.vfree(start as *mut u8) },
                    Err(Error::WrongKind)
                );
                let mut back = Vec::new();
                // SAFETY: the model uses the mapping no more.
                unsafe { self.vm.vunmap(start as *mut u8, |frame| back.push(frame)) }.unwrap();
                assert_eq!(
                    back, live.frames,
                    "vunmap hands the caller's frames back in order"
                );
                assert!(
                    self.machine.read(VirtAddr::new(start), &mut [0]).is_err(),
                    "flushed at once"
                );
                // SAFETY: frames the test took and no longer uses (or a bad free, refused).
                unsafe { self.frames.free_frames(&back) }.unwrap();
                self.held_for_vmap -= back.len() as u64;
                self.live.remove(&start);
            }
            Op::Ioremap { phys, bytes } => {
                let first = PhysFrame::containing_address(PhysAddr::new(phys));
                let pages = (phys % PAGE_SIZE + bytes as u64).div_ceil(PAGE_SIZE);
                // SAFETY: nothing reads or writes through the mapping.
                let mapped = unsafe {
                    self.vm
                        .ioremap(PhysAddr::new(phys), bytes, CacheMode::Uncached)
                };
                if self.frames.manages(first, pages) {
                    assert_eq!(mapped, Err(Error::ManagedRam));
                    refused(self, "ioremap of RAM");
                    return;
                }
                let ptr = mapped.unwrap().as_ptr() as u64;
                assert_eq!(ptr % PAGE_SIZE, phys % PAGE_SIZE);
                let start = ptr - ptr % PAGE_SIZE;
                let live = Live {
                    kind: AreaKind::Ioremap,
                    pages,
                    pattern: None,
                    frames: vec![],
                    phys: Some(PhysAddr::new(phys)),
                    ptr,
                    guard: true,
                };
                self.live.insert(start, live);
            }
            Op::Iounmap { pick } => {
                let Some((start, live)) = self.pick(pick, AreaKind::Ioremap) else {
                    return;
                };
                if live.ptr != start {
                    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
                    assert_eq!(
                        unsafe { self.vm.iounmap(start as *mut u8) },
                        Err(Error::InteriorPointer)
                    );
                }
                // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
                unsafe { self.vm.iounmap(live.ptr as *mut u8) }.unwrap();
                self.live.remove(&start);
                self.freed.push((start, live.pages));
            }
            Op::Realloc { pick, bytes } => {
                let Some((start, mut live)) = self.pick(pick, AreaKind::Vmalloc) else {
                    return;
                };
                // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
                let moved = unsafe { self.vm.vrealloc(start as *mut u8, bytes) }
                    .unwrap()
                    .as_ptr() as u64;
                let (seed, len) = live.pattern.unwrap();
                let old_pages = live.pages;
                live.pattern = Some((seed, len.min(bytes)));
                live.pages = (bytes as u64).div_ceil(PAGE_SIZE);
                live.ptr = moved;
                self.check_pattern(&live);
                self.live.remove(&start);
                if moved != start {
                    self.freed.push((start, old_pages));
                }
                self.live.insert(moved, live);
            }
            Op::SetProt { pick, prot } => {
                let Some((start, live)) = self.pick(pick, AreaKind::Vmalloc) else {
                    return;
                };
                let prot = [
                    Prot::READ,
                    Prot::KERNEL_RW,
                    Prot::READ | Prot::EXEC,
                    Prot::WRITE | Prot::EXEC,
                ][usize::from(prot)];
                // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
                let result = unsafe { self.vm.set_prot(start as *mut u8, prot) };
                if prot.contains(Prot::WRITE | Prot::EXEC) {
                    assert_eq!(result, Err(Error::WriteExecute));
                    refused(self, "W+X set_prot");
                } else {
                    result.unwrap();
                    assert_eq!(
                        self.snapshot(),
                        before,
                        "set_prot changes rights, nothing else"
                    );
                    let last = VirtAddr::new(start + (live.pages - 1) * PAGE_SIZE);
                    let write = self.machine.translate(last, vmalloc_sim::Access::WRITE);
                    assert_eq!(write.is_ok(), prot.contains(Prot::WRITE), "{prot:?}");
                    self.check_pattern(&live);
                }
            }
            Op::Purge => {
                self.vm.purge();
                for (start, pages) in self.freed.drain(..) {
                    for page in 0..pages.max(1) {
                        let addr = VirtAddr::new(start + page * PAGE_SIZE);
                        if !self.live.keys().any(|&s| {
                            s <= addr.as_u64()
                                && addr.as_u64() < s + self.live[&s].pages * PAGE_SIZE
                        }) {
                            assert!(
                                self.machine
                                    .translate(addr, vmalloc_sim::Access::READ)
                                    .is_err(),
                                "freed page still maps"
                            );
                        }
                    }
                }
            }
        }
        self.check_invariants();
    }

    fn check_pattern(&self, live: &Live) {
        let (seed, len) = live.pattern.unwrap();
        let mut back = vec![0; len];
        self.machine
            .read(VirtAddr::new(live.ptr), &mut back)
            .unwrap();
        assert_eq!(back, pattern(seed, len), "contents survive");
    }

    fn check_invariants(&self) {
        // The per-CPU blocks' zone is listed before the areas in it.
        let areas: Vec<AreaInfo> = self
            .vm
            .areas()
            .filter(|area| area.tag != "vmap_blocks")
            .collect();
        assert_eq!(areas.len(), self.live.len());
        for pair in areas.windows(2) {
            assert!(
                pair[0].start + pair[0].span <= pair[1].start,
                "areas and guards overlap"
            );
        }
        // SAFETY: the machine's tables are valid, and nothing writes them meanwhile.
        let walker = unsafe { self.machine.offset_page_table() };
        let mut data_frames = BTreeSet::new();
        for area in &areas {
            let live = &self.live[&area.start.as_u64()];
            assert_eq!((area.kind, area.pages), (live.kind, live.pages));
            for page in 0..live.pages {
                let addr = area.start + page * PAGE_SIZE;
                let TranslateResult::Mapped { frame, offset, .. } = walker.translate(addr) else {
                    panic!("page {page} of {area} is not mapped");
                };
                // The 4 KiB frame, inside a 2 MiB one where the area has those.
                let frame = (frame.start_address() + offset).align_down(PAGE_SIZE);
                match live.kind {
                    AreaKind::Vmalloc => {
                        assert!(data_frames.insert(frame), "frame {frame:?} held twice")
                    }
                    AreaKind::Vmap => assert_eq!(frame, live.frames[page as usize].start_address()),
                    AreaKind::Ioremap => {
                        let base = live.phys.unwrap().align_down(PAGE_SIZE);
                        assert_eq!(frame, base + page * PAGE_SIZE);
                    }
                    AreaKind::Reserved | AreaKind::Stack => unreachable!("the model makes neither"),
                }
            }
            if area.span > area.size {
                let guard = area.start + area.size;
                assert!(
                    matches!(walker.translate(guard), TranslateResult::NotMapped),
                    "guard page of {area} maps"
                );
            }
        }
        let s = self.vm.stats();
        assert_eq!(s.data_frames, data_frames.len() as u64);
        let accounted = self.frames.stats().free
            + s.data_frames
            + s.page_table_frames
            + s.pending_purge_frames
            + s.cached_frames
            + s.bookkeeping_frames
            + self.held_for_vmap;
        assert_eq!(
            accounted,
            self.frames.stats().total,
            "frames are conserved: {s:?}"
        );
    }
}

fn run(ops: Vec<Op>, eager: bool) {
    run_with(ops, eager, true)
}

fn run_with(ops: Vec<Op>, eager: bool, cpu_caches: bool) {
    let machine = SimMachine::new(SimConfig::new(64 << 20).with_scatter_seed(2));
    let frames = machine.frames();
    let config = VmallocConfig {
        eager,
        lazy_threshold_pages: 40,
        cpu_caches,
        ..VmallocConfig::default()
    };
    // SAFETY: the machine's page tables are used by this manager alone.
    let vm =
        unsafe { Vmalloc::new(config, machine.root(), machine.phys(), &frames, &machine) }.unwrap();
    let mut world = World {
        machine: &machine,
        frames: &frames,
        vm,
        live: BTreeMap::new(),
        freed: Vec::new(),
        held_for_vmap: 0,
        tag: if cpu_caches { "" } else { "prop" },
    };
    for op in ops {
        world.step(if cpu_caches { small_half(op) } else { op });
    }
    world.step(Op::Purge);
}

/// With the per-CPU caches on, every other allocation is made one the blocks serve:
/// up to 16 pages, page-aligned, with a guard page.
fn small_half(op: Op) -> Op {
    match op {
        Op::Alloc {
            bytes,
            align_shift,
            zero,
            wx,
            huge: false,
            ..
        } if align_shift % 2 == 0 => Op::Alloc {
            bytes: 1 + bytes % (16 * 4096),
            align_shift: align_shift % 13,
            zero,
            no_guard: false,
            wx,
            huge: false,
        },
        op => op,
    }
}

/// CPUs of the machine the SMP model runs on.
const CPUS: usize = 3;

/// One machine for every case of the SMP model (its IPI handler must be `'static`);
/// each case makes a manager of its own over it, and dropping it gives back every
/// frame and table.
fn shared_smp_machine() -> (&'static SimMachine, &'static SimFrames, &'static SmpTlb) {
    static MACHINE: std::sync::OnceLock<(
        &'static SimMachine,
        &'static SimFrames,
        &'static SmpTlb,
    )> = std::sync::OnceLock::new();
    *MACHINE.get_or_init(|| {
        smp_machine(
            SimConfig::new(64 << 20)
                .with_cpus(CPUS)
                .with_scatter_seed(3),
        )
    })
}

type Job<'a> = Box<dyn FnOnce() + Send + 'a>;

/// Runs `job` on CPU `cpu` and waits for it.
fn run_on<'a>(cpus: &[std::sync::mpsc::Sender<Job<'a>>], cpu: usize, job: Job<'a>) {
    let (done, finished) = std::sync::mpsc::channel();
    cpus[cpu]
        .send(Box::new(move || {
            job();
            done.send(()).unwrap();
        }))
        .unwrap();
    finished
        .recv()
        .unwrap_or_else(|_| panic!("the step on CPU {cpu} failed"));
}

/// Runs each step on the CPU it names, one step at a time, with every CPU a host
/// thread that serves shootdowns while it waits for its next step: areas are made on
/// one CPU and freed, resized and checked on others, through their own caches.
fn run_on_cpus(ops: Vec<(usize, Op)>, eager: bool) {
    let (machine, frames, tlb) = shared_smp_machine();
    let config = VmallocConfig {
        eager,
        lazy_threshold_pages: 40,
        ..VmallocConfig::default()
    };
    let start = frames.stats().free;
    let world = std::sync::Mutex::new(Some(World {
        machine,
        frames,
        // SAFETY: the machine's page tables serve this manager alone, and its flush reaches every CPU that runs.
        vm: unsafe { manager_with(machine, frames, tlb, config) },
        live: BTreeMap::new(),
        freed: Vec::new(),
        held_for_vmap: 0,
        tag: "",
    }));
    std::thread::scope(|scope| {
        let cpus: Vec<std::sync::mpsc::Sender<Job<'_>>> = (0..CPUS)
            .map(|index| {
                let (jobs, next) = std::sync::mpsc::channel::<Job<'_>>();
                scope.spawn(move || {
                    let cpu = machine.cpu(index);
                    cpu.enter();
                    loop {
                        match next.try_recv() {
                            Ok(job) => job(),
                            Err(std::sync::mpsc::TryRecvError::Empty) => {
                                cpu.poll();
                                std::thread::yield_now();
                            }
                            Err(std::sync::mpsc::TryRecvError::Disconnected) => break,
                        }
                    }
                });
                jobs
            })
            .collect();
        let world = &world;
        for (cpu, op) in ops.into_iter().chain([(1, Op::Purge)]) {
            run_on(
                &cpus,
                cpu % CPUS,
                Box::new(move || world.lock().unwrap().as_mut().unwrap().step(small_half(op))),
            );
        }
        // The manager goes while every CPU serves its shootdowns; the frames the
        // model lent to vmap areas are given back after it.
        run_on(
            &cpus,
            0,
            Box::new(move || {
                let world = world.lock().unwrap().take().unwrap();
                let lent: Vec<PhysFrame> = world
                    .live
                    .values()
                    .flat_map(|live| live.frames.clone())
                    .collect();
                drop(world);
                // SAFETY: frames the test took and no longer uses (or a bad free, refused).
                unsafe { frames.free_frames(&lent) }.unwrap();
            }),
        );
        // Dropping the senders stops the CPUs.
    });
    assert_eq!(
        frames.stats().free,
        start,
        "the manager gave back every frame"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn lazy_manager_matches_the_model(ops in prop::collection::vec(op(), 1..120)) {
        run(ops, false);
    }

    #[test]
    fn eager_manager_matches_the_model(ops in prop::collection::vec(op(), 1..80)) {
        run(ops, true);
    }

    #[test]
    fn manager_without_cpu_caches_matches_the_model(ops in prop::collection::vec(op(), 1..120)) {
        run_with(ops, false, false);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn three_cpus_freeing_each_others_areas_match_the_model(
        ops in prop::collection::vec((0..CPUS, op()), 1..120),
        eager in any::<bool>(),
    ) {
        watchdog("three_cpus_freeing_each_others_areas_match_the_model", DEADLOCK_LIMIT, || {
            run_on_cpus(ops, eager)
        });
    }
}

/// Fails the k-th frame allocation, for every k, during a large `vmalloc`, a moving
/// `vrealloc`, a `vmap` (its page tables) and a `populate`; each failure must leave
/// everything as it was.
#[test]
fn every_failing_frame_allocation_rolls_back() {
    let machine = SimMachine::new(SimConfig::new(64 << 20).with_scatter_seed(4));
    let frames = machine.frames();
    let injector = FaultInjector::new(&frames);
    // SAFETY: the machine's page tables are used by this manager alone.
    let vm = unsafe {
        Vmalloc::new(
            VmallocConfig::default(),
            machine.root(),
            machine.phys(),
            &injector,
            &machine,
        )
    }
    .unwrap();
    let small = vm.vmalloc(3 * 4096).unwrap();
    let _blocker = vm.vmalloc(4096).unwrap();
    let reserved = vm.reserve(1 << 20, &VmOptions::default()).unwrap();
    let mut lent = vec![PhysFrame::containing_address(PhysAddr::zero()); 600];
    assert_eq!(frames.alloc_frames(&mut lent), 600);
    let snapshot = |vm: &Manager<&FaultInjector<&SimFrames>>| {
        (
            vm.stats(),
            frames.stats().free,
            vm.areas().collect::<Vec<_>>(),
        )
    };

    type Attempt<'a> = Box<dyn Fn(&Manager<&FaultInjector<&SimFrames>>) -> Result<u64, Error> + 'a>;
    let attempts: Vec<(&str, Attempt)> = vec![
        (
            "vmalloc",
            Box::new(|vm| vm.vmalloc(700 * 4096).map(|p| p.as_ptr() as u64)),
        ),
        (
            "vrealloc",
            Box::new(|vm| {
                // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
                unsafe { vm.vrealloc(small.as_ptr(), 900 * 4096) }.map(|p| p.as_ptr() as u64)
            }),
        ),
        (
            "vmap",
            // SAFETY: frames the test holds; a successful vmap is the last attempt.
            Box::new(|vm| unsafe { vm.vmap(&lent, Prot::KERNEL_RW) }.map(|p| p.as_ptr() as u64)),
        ),
        (
            "populate",
            // SAFETY: the test's own area: nothing relies on its pages staying unmapped.
            Box::new(|vm| unsafe { vm.populate(reserved.as_ptr(), 1 << 20) }.map(|n| n as u64)),
        ),
    ];
    for (name, attempt) in attempts {
        for k in 0.. {
            // Empty caches: a failure is not retried with frames they gave back
            // (tests/blocks.rs checks that retry), so every failure shows.
            vm.drain_cpu_caches();
            let before = snapshot(&vm);
            injector.fail_after(k);
            let result = attempt(&vm);
            injector.disarm();
            match result {
                Err(error) => {
                    assert_eq!(error, Error::OutOfFrames, "{name} at frame {k}");
                    assert_eq!(
                        snapshot(&vm),
                        before,
                        "{name} failing at frame {k} left something behind"
                    );
                }
                Ok(_) => {
                    assert!(k > 0, "{name} took no frame, so no failure was injected");
                    break;
                }
            }
        }
    }
    assert!(
        machine
            .translate(
                VirtAddr::from_ptr(small.as_ptr()),
                vmalloc_sim::Access::READ
            )
            .is_err(),
        "moved"
    );
}
