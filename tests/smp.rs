//! Several CPUs on the simulated machine, each with its own TLB: the library's
//! shootdown reaches every one of them, and the checks can tell when it does not.

use std::alloc::{GlobalAlloc, Layout};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use vmalloc::heap::{HeapConfig, KernelHeap};
use vmalloc::smp::Shootdown;
use vmalloc::vmalloc::deferred::SLOTS;
use vmalloc::vmalloc::{VmOptions, VmallocOps};
use vmalloc::{Error, FrameSource, TlbFlush, Vmalloc, VmallocConfig};
use vmalloc_sim::scenarios::{self, manager_with as manager};
use vmalloc_sim::{DEADLOCK_LIMIT, PoisonOnFree, Rng, SimConfig, SimFrames, SimMachine, watchdog};
use x86_64::VirtAddr;
use x86_64::structures::paging::{Page, PhysFrame};

type Tlb = scenarios::SmpTlb;

/// A machine with `cpus` CPUs, its frames and a shootdown over it; `scatter` hands
/// its frames out in a scattered order.
fn smp_machine(
    cpus: usize,
    scatter: bool,
) -> (&'static SimMachine, &'static SimFrames, &'static Tlb) {
    let mut config = SimConfig::new(64 << 20).with_cpus(cpus);
    if scatter {
        config = config.with_scatter_seed(5);
    }
    scenarios::smp_machine(config)
}

fn addr(ptr: std::ptr::NonNull<u8>) -> VirtAddr {
    VirtAddr::from_ptr(ptr.as_ptr())
}

#[test]
fn four_cpus_share_one_manager_and_every_free_is_seen_by_all() {
    watchdog(
        "four_cpus_share_one_manager_and_every_free_is_seen_by_all",
        DEADLOCK_LIMIT,
        || {
            let (machine, frames, tlb) = smp_machine(4, true);
            let vm = manager(
                machine,
                frames,
                tlb,
                VmallocConfig {
                    lazy_threshold_pages: 64,
                    ..VmallocConfig::default()
                },
            );
            machine.on_every_cpu(|cpu| {
                let mut rng = Rng::new(cpu.index() as u64 + 1);
                let mut live: Vec<(std::ptr::NonNull<u8>, usize, u8)> = Vec::new();
                let mut lent: Vec<(std::ptr::NonNull<u8>, Vec<PhysFrame>, [u8; 16])> = Vec::new();
                for round in 0..300usize {
                    let tag = (cpu.index() * 64 + round % 64) as u8;
                    match rng.below(6) {
                        0 | 1 => {
                            let pages = 1 + rng.below(8) as usize;
                            let ptr = vm.vmalloc(pages * 4096).unwrap();
                            for page in 0..pages {
                                cpu.write(addr(ptr) + (page * 4096) as u64, &[tag; 32])
                                    .unwrap();
                            }
                            live.push((ptr, pages, tag));
                        }
                        2 if !live.is_empty() => {
                            let (ptr, pages, tag) =
                                live.swap_remove(rng.below(live.len() as u64) as usize);
                            for page in 0..pages {
                                let mut back = [0; 32];
                                cpu.read(addr(ptr) + (page * 4096) as u64, &mut back)
                                    .unwrap();
                                assert_eq!(
                                    back,
                                    [tag; 32],
                                    "CPU {} sees its own data",
                                    cpu.index()
                                );
                            }
                            // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
                            unsafe { vm.vfree(ptr.as_ptr()) }.unwrap();
                        }
                        3 if !live.is_empty() => {
                            let index = rng.below(live.len() as u64) as usize;
                            let (ptr, pages, tag) = live[index];
                            let grown = pages + 1 + rng.below(4) as usize;
                            // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
                            let moved = unsafe { vm.vrealloc(ptr.as_ptr(), grown * 4096) }.unwrap();
                            let mut back = [0; 32];
                            cpu.read(addr(moved), &mut back).unwrap();
                            assert_eq!(back, [tag; 32], "vrealloc kept the contents");
                            for page in pages..grown {
                                cpu.write(addr(moved) + (page * 4096) as u64, &[tag; 32])
                                    .unwrap();
                            }
                            live[index] = (moved, grown, tag);
                        }
                        4 => {
                            let owned: Vec<PhysFrame> = (0..1 + rng.below(4))
                                .map(|_| frames.alloc_frame().unwrap())
                                .collect();
                            // SAFETY: frames this test took from the allocator and holds.
                            let ptr = unsafe { vm.vmap(&owned, vmalloc::Prot::KERNEL_RW) }.unwrap();
                            // A stamp no other mapping holds: this CPU and round.
                            let mut stamp = [0xa5; 16];
                            stamp[0] = cpu.index() as u8;
                            stamp[1..3].copy_from_slice(&(round as u16).to_le_bytes());
                            cpu.write(addr(ptr), &stamp).unwrap();
                            lent.push((ptr, owned, stamp));
                        }
                        5 if !lent.is_empty() => {
                            let (ptr, owned, stamp) = lent.swap_remove(0);
                            let mut back = [0; 16];
                            cpu.read(addr(ptr), &mut back).unwrap();
                            assert_eq!(back, stamp);
                            let mut returned = Vec::new();
                            // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
                            unsafe { vm.vunmap(ptr.as_ptr(), |frame| returned.push(frame)) }
                                .unwrap();
                            assert_eq!(returned, owned);
                            // Another CPU may map the freed range at once, but never onto the
                            // frames this CPU still holds: seeing the stamp is a stale entry.
                            let stale = cpu.read(addr(ptr), &mut back).is_ok() && back == stamp;
                            assert!(
                                !stale,
                                "CPU {} still reaches a vunmapped frame",
                                cpu.index()
                            );
                            frames.free_frames(&owned).unwrap();
                        }
                        _ => vm.purge(),
                    }
                }
                for (ptr, ..) in live {
                    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
                    unsafe { vm.vfree(ptr.as_ptr()) }.unwrap();
                }
                for (ptr, owned, _) in lent {
                    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
                    unsafe { vm.vunmap(ptr.as_ptr(), |_| {}) }.unwrap();
                    frames.free_frames(&owned).unwrap();
                }
            });
            vm.purge();
            let stats = vm.stats();
            assert_eq!(
                (stats.areas, stats.data_frames, stats.pending_purge_frames),
                (0, 0, 0)
            );
            // Every frame is free or the manager's own: its tables (the blocks keep
            // theirs while it lives), its bookkeeping, or a CPU's cache.
            assert_eq!(
                frames.stats().free
                    + stats.bookkeeping_frames
                    + stats.page_table_frames
                    + stats.cached_frames,
                frames.stats().total,
                "every frame is back: {stats:?}"
            );
            assert!(tlb.stats().ipis > 0, "the CPUs were shot at");
        },
    );
}

/// CPU 1 caches a translation of a vmalloc page; CPU 0 frees the area, purges, and
/// hands the frame out again with new contents; then CPU 1 reads the old address.
/// Returns what CPU 1 read, or `None` if it faulted.
fn stale_read_after_reuse<T: TlbFlush + Sync>(
    machine: &'static SimMachine,
    frames: &'static SimFrames,
    tlb: T,
) -> Option<[u8; 8]> {
    // The tree's path: `tests/blocks.rs` checks the same for small areas in blocks.
    let tree = VmallocConfig {
        cpu_caches: false,
        ..VmallocConfig::default()
    };
    let vm = manager(machine, frames, tlb, tree);
    let old = addr(vm.vmalloc(4096).unwrap());
    let (seen, (new, hole)) = machine.read_again_after(1, old, || {
        let frame = vm.vmalloc_to_frame(old).unwrap();
        // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
        unsafe { vm.vfree(old.as_mut_ptr()) }.unwrap();
        vm.purge();
        // The old virtual range goes to a reservation without frames, so the frame
        // comes back at another address and the old one is mapped to nothing.
        let hole = vm.reserve(4096, &vmalloc::VmOptions::default()).unwrap();
        assert_eq!(addr(hole), old, "the virtual range came back");
        let new = vm.vmalloc(4096).unwrap();
        assert_eq!(
            vm.vmalloc_to_frame(addr(new)).unwrap(),
            frame,
            "the frame came back"
        );
        machine.write(addr(new), b"NEWDATA!").unwrap();
        (new, hole)
    });
    // CPU 1 left when it was done, so these flushes do not wait for it.
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    unsafe { vm.vfree(new.as_ptr()) }.unwrap();
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    unsafe { vm.vfree(hole.as_ptr()) }.unwrap();
    seen
}

#[test]
fn a_translation_cached_on_another_cpu_is_gone_before_its_frame_is_reused() {
    watchdog(
        "a_translation_cached_on_another_cpu_is_gone_before_its_frame_is_reused",
        DEADLOCK_LIMIT,
        || {
            let (machine, frames, tlb) = smp_machine(2, false);
            assert_eq!(
                stale_read_after_reuse(machine, frames, tlb),
                None,
                "CPU 1 faults"
            );
            assert!(tlb.stats().ipis > 0 && machine.cpu(1).ipis_taken() > 0);
        },
    );
}

#[test]
fn a_local_only_flush_is_caught_reading_the_reused_frame() {
    watchdog(
        "a_local_only_flush_is_caught_reading_the_reused_frame",
        DEADLOCK_LIMIT,
        || {
            // The negative control: the same steps with a flush that only reaches CPU 0.
            let (machine, frames, _) = smp_machine(2, false);
            assert_eq!(
                stale_read_after_reuse(machine, frames, machine),
                Some(*b"NEWDATA!"),
                "without a shootdown CPU 1 reads the new owner's data"
            );
        },
    );
}

/// The calling CPU's flushes, by a CPU that spins with interrupts disabled: it never
/// takes an IPI while it waits.
struct InterruptsOff(&'static SimMachine);

impl TlbFlush for InterruptsOff {
    fn flush_page(&self, page: Page) {
        self.0.flush_page(page);
    }
    fn flush_range(&self, range: x86_64::structures::paging::page::PageRange) {
        self.0.flush_range(range);
    }
    fn flush_all(&self) {
        self.0.flush_all();
    }
    fn relax(&self) {
        thread::yield_now();
    }
}

#[test]
fn crossing_shootdowns_with_interrupts_disabled_do_not_deadlock() {
    watchdog(
        "crossing_shootdowns_with_interrupts_disabled_do_not_deadlock",
        DEADLOCK_LIMIT,
        || {
            let (machine, _, _) = smp_machine(2, false);
            // No IPI handler runs: each initiator must serve its own mailbox while it waits.
            let tlb: &'static _ =
                Box::leak(Box::new(Shootdown::new(machine, InterruptsOff(machine))));
            let page = Page::containing_address(VirtAddr::new(0xffff_c900_0000_0000));
            let rounds = 2000;
            machine.on_every_cpu(|_| {
                for i in 0..rounds {
                    if i % 2 == 0 {
                        tlb.flush_page(page);
                    } else {
                        tlb.flush_all();
                    }
                }
            });
            let stats = tlb.stats();
            assert_eq!(stats.shootdowns, 2 * rounds);
            assert!(
                stats.served > 0,
                "each CPU served the other's requests while waiting"
            );
        },
    );
}

#[test]
fn two_managers_purging_at_once_on_two_cpus_both_finish() {
    watchdog(
        "two_managers_purging_at_once_on_two_cpus_both_finish",
        DEADLOCK_LIMIT,
        || {
            let (machine, frames, tlb) = smp_machine(2, false);
            let low = manager(machine, frames, tlb, VmallocConfig::default());
            let high = manager(
                machine,
                frames,
                tlb,
                VmallocConfig {
                    start: VirtAddr::new(0xffff_e000_0000_0000),
                    size: 1 << 40,
                    ..VmallocConfig::default()
                },
            );
            let managers = [&low, &high];
            machine.on_every_cpu(|cpu| {
                let vm = managers[cpu.index()];
                for _ in 0..300 {
                    let ptr = vm.vmalloc(3 * 4096).unwrap();
                    cpu.write(addr(ptr), b"x").unwrap();
                    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
                    unsafe { vm.vfree(ptr.as_ptr()) }.unwrap();
                    vm.purge();
                }
            });
            assert_eq!((low.stats().areas, high.stats().areas), (0, 0));
        },
    );
}

/// Ten areas apart from each other, freed and purged on CPU 0 while CPU 1 serves
/// its IPIs: one shootdown flushes the ten ranges everywhere, and a translation CPU 1
/// cached of each is gone.
#[test]
fn a_purge_of_many_ranges_is_one_shootdown_that_reaches_every_range() {
    watchdog(
        "a_purge_of_many_ranges_is_one_shootdown_that_reaches_every_range",
        DEADLOCK_LIMIT,
        || {
            let (machine, frames, tlb) = smp_machine(2, false);
            let vm = manager(machine, frames, tlb, VmallocConfig::default());
            // Labelled areas come from the tree; every second one stays, so the
            // freed ones are ten ranges and no page table empties.
            let tagged = VmOptions {
                tag: "apart",
                ..VmOptions::default()
            };
            let areas: Vec<_> = (0..20)
                .map(|_| vm.vmalloc_with(4096, &tagged).unwrap())
                .collect();
            let freed: Vec<VirtAddr> = areas.iter().step_by(2).map(|ptr| addr(*ptr)).collect();
            let done = AtomicBool::new(false);
            let cached = AtomicBool::new(false);
            thread::scope(|scope| {
                scope.spawn(|| {
                    // Later flushes do not wait for a CPU whose thread is gone.
                    let cpu = machine.cpu(1);
                    let _offline = cpu.offline_when_dropped();
                    for &at in &freed {
                        cpu.read(at, &mut [0]).unwrap();
                    }
                    cached.store(true, Ordering::Release);
                    while !done.load(Ordering::Acquire) {
                        cpu.poll();
                        thread::yield_now();
                    }
                    for &at in &freed {
                        assert!(cpu.cached(at).is_none(), "CPU 1 still holds a freed page");
                    }
                });
                machine.cpu(0).enter();
                while !cached.load(Ordering::Acquire) {
                    thread::yield_now();
                }
                for ptr in areas.iter().step_by(2) {
                    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
                    unsafe { vm.vfree(ptr.as_ptr()) }.unwrap();
                }
                let before = tlb.stats();
                vm.purge();
                let after = tlb.stats();
                done.store(true, Ordering::Release);
                assert_eq!(
                    (
                        after.shootdowns - before.shootdowns,
                        after.ipis - before.ipis
                    ),
                    (1, 1),
                    "ten ranges, one shootdown"
                );
            });
            for ptr in areas.iter().skip(1).step_by(2) {
                // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
                unsafe { vm.vfree(ptr.as_ptr()) }.unwrap();
            }
        },
    );
}

#[test]
fn a_cpu_going_offline_is_no_longer_waited_for() {
    watchdog(
        "a_cpu_going_offline_is_no_longer_waited_for",
        DEADLOCK_LIMIT,
        || {
            let (machine, _, tlb) = smp_machine(3, false);
            machine.cpu(2).go_offline();
            // CPU 1 is online but never polls: only its leaving lets the flush finish.
            let done = AtomicBool::new(false);
            thread::scope(|scope| {
                scope.spawn(|| {
                    tlb.flush_all();
                    done.store(true, Ordering::Release);
                });
                thread::sleep(std::time::Duration::from_millis(20));
                assert!(!done.load(Ordering::Acquire), "the flush waits for CPU 1");
                machine.cpu(1).go_offline();
            });
            assert!(done.load(Ordering::Acquire));
            assert_eq!(machine.cpu(2).ipis_taken(), 0, "CPU 2 was never shot at");
        },
    );
}

/// A frame source that, once armed, runs `interrupt` on its next allocation, which
/// the manager makes under its lock: an interrupt handler arriving while the CPU holds
/// the lock.
struct Interrupting {
    frames: &'static SimFrames,
    armed: AtomicBool,
    interrupt: std::sync::OnceLock<Box<dyn Fn() + Send + Sync>>,
}

// SAFETY: every frame comes from `frames`, whose contract this forwards.
unsafe impl FrameSource for Interrupting {
    fn alloc_frame(&self) -> Option<PhysFrame> {
        if self.armed.swap(false, Ordering::SeqCst) {
            (self.interrupt.get().unwrap())();
        }
        self.frames.alloc_frame()
    }
    fn free_frame(&self, frame: PhysFrame) -> Result<(), Error> {
        self.frames.free_frame(frame)
    }
    fn free_frames(&self, frames: &[PhysFrame]) -> Result<(), Error> {
        self.frames.free_frames(frames)
    }
}

#[test]
fn vfree_atomic_from_an_interrupt_under_the_lock_is_done_by_the_next_call() {
    let (machine, frames, _) = smp_machine(1, false);
    let source: &'static Interrupting = Box::leak(Box::new(Interrupting {
        frames,
        armed: AtomicBool::new(false),
        interrupt: std::sync::OnceLock::new(),
    }));
    // SAFETY: the machine's root table serves this manager alone.
    let vm = unsafe {
        Vmalloc::new(
            VmallocConfig::default(),
            machine.root(),
            machine.phys(),
            source,
            machine,
        )
    }
    .unwrap();
    let vm: &'static _ = Box::leak(Box::new(vm));
    let victims: Vec<_> = (0..SLOTS + 2).map(|_| vm.vmalloc(4096).unwrap()).collect();
    let outcomes: &'static std::sync::Mutex<Vec<Result<(), Error>>> = Box::leak(Box::default());
    let queue: &'static std::sync::Mutex<Vec<usize>> = Box::leak(Box::default());
    source
        .interrupt
        .set(Box::new(move || {
            for &ptr in queue.lock().unwrap().iter() {
                // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
                outcomes
                    .lock()
                    .unwrap()
                    .push(unsafe { vm.vfree_atomic(ptr as *mut u8) });
            }
        }))
        .ok()
        .unwrap();
    let areas = vm.stats().areas;

    // One good pointer and one interior pointer, freed while the lock is held.
    *queue.lock().unwrap() = vec![
        victims[0].as_ptr() as usize,
        victims[1].as_ptr() as usize + 8,
    ];
    source.armed.store(true, Ordering::SeqCst);
    // More than 16 pages: made under the manager's lock, not from a CPU's cache.
    let trigger = vm.vmalloc(20 * 4096).unwrap();
    assert_eq!(
        *outcomes.lock().unwrap(),
        [Ok(()), Ok(())],
        "queued without waiting"
    );
    machine
        .write(addr(victims[0]), b"mapped until the next call")
        .unwrap();
    let stats = vm.stats();
    assert_eq!(
        stats.areas, areas,
        "the next call freed one area and made one"
    );
    assert_eq!(
        stats.deferred_refused, 1,
        "the interior pointer was refused"
    );
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    assert_eq!(
        unsafe { vm.vfree(victims[0].as_ptr()) },
        Err(Error::NotAllocated)
    );

    // A full queue: the free past its slots is refused at once, without waiting
    // for the lock or draining the queue itself.
    outcomes.lock().unwrap().clear();
    *queue.lock().unwrap() = victims[1..].iter().map(|p| p.as_ptr() as usize).collect();
    source.armed.store(true, Ordering::SeqCst);
    let trigger2 = vm.vmalloc(20 * 4096).unwrap();
    let outcomes = outcomes.lock().unwrap().clone();
    assert!(outcomes[..SLOTS].iter().all(Result::is_ok));
    assert_eq!(outcomes[SLOTS], Err(Error::WouldBlock));
    // Since `areas` was counted: two triggers made, victims[0] and SLOTS more freed.
    assert_eq!(
        vm.stats().areas,
        areas + 2 - 1 - SLOTS as u64,
        "the queued areas are freed by the next call"
    );
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    unsafe { vm.vfree(victims[SLOTS + 1].as_ptr()) }.unwrap();
    for ptr in [trigger, trigger2] {
        // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
        unsafe { vm.vfree(ptr.as_ptr()) }.unwrap();
    }
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    assert_eq!(
        unsafe { vm.vfree_atomic(std::ptr::null_mut()) },
        Err(Error::NullPointer)
    );
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    assert_eq!(
        unsafe { vm.vfree_atomic(0x1000 as *mut u8) },
        Err(Error::NotInRegion)
    );
}

/// The manager as the kernel heap sees it, except that the calls that map memory
/// (which the heap makes with a lock held: a slab class's for `vmalloc_with`, the list
/// heap's for `populate`) first shoot down every CPU, as a purge under memory pressure
/// would from inside the call.
struct ShootsWhilePopulating<'a> {
    vm: &'a dyn VmallocOps,
    tlb: &'static Tlb,
    inside: &'a AtomicBool,
}

// SAFETY: every call forwards to a manager; the shootdown changes no mapping.
unsafe impl VmallocOps for ShootsWhilePopulating<'_> {
    fn vmalloc_with(&self, size: usize, options: &VmOptions) -> Result<NonNull<u8>, Error> {
        self.inside.store(true, Ordering::Release);
        self.tlb.flush_all();
        self.vm.vmalloc_with(size, options)
    }
    unsafe fn vfree(&self, ptr: *mut u8) -> Result<(), Error> {
        // SAFETY: forwarded from the caller.
        unsafe { self.vm.vfree(ptr) }
    }
    unsafe fn vrealloc(&self, ptr: *mut u8, new_size: usize) -> Result<NonNull<u8>, Error> {
        // SAFETY: forwarded from the caller.
        unsafe { self.vm.vrealloc(ptr, new_size) }
    }
    fn reserve(&self, size: usize, options: &VmOptions) -> Result<NonNull<u8>, Error> {
        self.vm.reserve(size, options)
    }
    fn populate(&self, ptr: *mut u8, bytes: usize) -> Result<usize, Error> {
        self.inside.store(true, Ordering::Release);
        self.tlb.flush_all();
        self.vm.populate(ptr, bytes)
    }
    fn relax(&self) {
        self.vm.relax();
    }
}

#[test]
fn a_cpu_waiting_for_the_heap_lock_serves_the_shootdown_its_holder_started() {
    watchdog(
        "a_cpu_waiting_for_the_heap_lock_serves_the_shootdown_its_holder_started",
        DEADLOCK_LIMIT,
        || {
            let machine: &'static SimMachine = Box::leak(Box::new(SimMachine::new(
                SimConfig::new(64 << 20)
                    .with_cpus(2)
                    .with_host_window(1 << 30),
            )));
            let frames: &'static SimFrames = Box::leak(Box::new(machine.frames()));
            let tlb: &'static Tlb = Box::leak(Box::new(Shootdown::new(machine, machine)));
            machine.set_ipi_handler(move || tlb.handle_ipi());
            let (start, size) = machine.host_window().unwrap();
            let config = VmallocConfig {
                start,
                size,
                ..VmallocConfig::default()
            };
            // A hang is the failure: a watchdog turns it into a panic.
            let (done, finished) = std::sync::mpsc::channel();
            thread::spawn(move || {
                // A slab-sized block (the class's lock) and a list-sized one (the list's).
                for size in [64, 5000] {
                    machine.cpu(1).go_online();
                    let vm = manager(machine, frames, tlb, config);
                    let inside = AtomicBool::new(false);
                    let ops = ShootsWhilePopulating {
                        vm: &vm,
                        tlb,
                        inside: &inside,
                    };
                    let heap = KernelHeap::new(HeapConfig {
                        window: 16 << 20,
                        ..HeapConfig::DEFAULT
                    });
                    heap.init(&ops).unwrap();
                    let layout = Layout::from_size_align(size, 8).unwrap();
                    thread::scope(|scope| {
                        let cpu1 = machine.cpu(1);
                        let (heap, inside) = (&heap, &inside);
                        scope.spawn(move || {
                            cpu1.enter();
                            // Interrupts off: this CPU takes no IPI, it only serves while it waits.
                            while !inside.load(Ordering::Acquire) {
                                std::hint::spin_loop();
                            }
                            // SAFETY: a valid layout; the block is freed with it.
                            unsafe {
                                let block = heap.alloc(layout);
                                assert!(!block.is_null());
                                heap.dealloc(block, layout);
                            }
                        });
                        machine.cpu(0).enter();
                        // The first block of its kind maps memory under the heap's lock.
                        // SAFETY: as above.
                        unsafe {
                            let block = heap.alloc(layout);
                            assert!(!block.is_null());
                            heap.dealloc(block, layout);
                        }
                    });
                    // CPU 1's thread is gone: it leaves, so dropping the manager (which
                    // shoots down) does not wait for it.
                    machine.cpu(1).go_offline();
                }
                done.send(tlb.stats()).unwrap();
            });
            let stats = finished
                .recv_timeout(std::time::Duration::from_secs(120))
                .expect("deadlock: CPU 1 waited for the heap lock without serving the shootdown");
            assert!(stats.ipis >= 2 && stats.served >= 2);
        },
    );
}

/// A shootdown's handler, for the nested-flush scenario to drive any protocol.
trait ServesIpis: TlbFlush + Sync {
    fn serve_ipi(&self);
}

impl ServesIpis for Tlb {
    fn serve_ipi(&self) {
        self.handle_ipi();
    }
}

/// The protocol before its fix, kept as the negative control: a serve publishes the
/// request count it read once it has flushed what it took, in any nesting, so a
/// serve nested in another's flush covers the outer serve's request too.
struct PublishesInAnyNesting {
    machine: &'static SimMachine,
    mailboxes: Vec<Mailbox>,
}

#[derive(Default)]
struct Mailbox {
    queue: std::sync::Mutex<Vec<x86_64::structures::paging::page::PageRange>>,
    requested: std::sync::atomic::AtomicU64,
    done: std::sync::atomic::AtomicU64,
}

impl PublishesInAnyNesting {
    fn serve(&self, cpu: usize) {
        let Ok(mut queue) = self.mailboxes[cpu].queue.try_lock() else {
            return;
        };
        let mailbox = &self.mailboxes[cpu];
        let requested = mailbox.requested.load(Ordering::Acquire);
        if mailbox.done.load(Ordering::Relaxed) >= requested {
            return;
        }
        let taken = std::mem::take(&mut *queue);
        drop(queue);
        taken
            .into_iter()
            .for_each(|range| self.machine.flush_range(range));
        mailbox.done.fetch_max(requested, Ordering::Release);
    }
}

impl TlbFlush for PublishesInAnyNesting {
    fn flush_page(&self, page: Page) {
        self.flush_range(Page::range(page, page + 1));
    }
    fn flush_range(&self, range: x86_64::structures::paging::page::PageRange) {
        let me = self.machine.current_cpu();
        self.machine.flush_range(range);
        let online = vmalloc::smp::Cpus::online(self.machine).without(me);
        let targets: Vec<usize> = online.iter().collect();
        let tickets: Vec<u64> = targets
            .iter()
            .map(|&cpu| {
                let mailbox = &self.mailboxes[cpu];
                mailbox.queue.lock().unwrap().push(range);
                mailbox.requested.fetch_add(1, Ordering::AcqRel) + 1
            })
            .collect();
        vmalloc::smp::Cpus::send_ipi(self.machine, online);
        for (&cpu, &ticket) in targets.iter().zip(&tickets) {
            while self.mailboxes[cpu].done.load(Ordering::Acquire) < ticket {
                self.serve(me);
                self.machine.relax();
            }
        }
    }
    fn flush_all(&self) {
        unreachable!("the scenario flushes ranges")
    }
}

impl ServesIpis for PublishesInAnyNesting {
    fn serve_ipi(&self) {
        self.serve(self.machine.current_cpu());
    }
}

/// Where the nested-flush scenario's threads stand.
#[derive(Default)]
struct Steps {
    start_a: AtomicBool,
    start_c: AtomicBool,
    a_done: AtomicBool,
    stop: AtomicBool,
    early: AtomicBool,
}

/// CPU 0 shoots down R1, which CPU 1 caches; CPU 1 is its only target. CPU 1 takes
/// the IPI, and in the middle of that flush (before it dropped R1) CPU 2 comes
/// online, shoots down R2, and its IPI lands and is served, nested. Returns whether
/// CPU 0's shootdown returned while CPU 1 still translated R1: a frame behind R1
/// could then be handed out while CPU 1 reads it.
fn completes_before_the_target_flushed<T: ServesIpis + 'static>(
    machine: &'static SimMachine,
    frames: &'static SimFrames,
    tlb: &'static T,
) -> bool {
    let vm = manager(machine, frames, machine, VmallocConfig::default());
    let area = addr(vm.vmalloc(2 * 4096).unwrap());
    let (r1, r2) = (
        Page::containing_address(area),
        Page::containing_address(area) + 1,
    );
    let steps: &'static Steps = Box::leak(Box::default());
    let (cpu0, cpu1, cpu2) = (machine.cpu(0), machine.cpu(1), machine.cpu(2));
    cpu2.go_offline();
    // Every CPU serves its mailbox while it waits for its turn, as a CPU polls
    // with interrupts off, until the scenario is over.
    let serve_until = |flag: &AtomicBool| {
        while !flag.load(Ordering::Acquire) {
            tlb.serve_ipi();
            thread::yield_now();
        }
    };
    machine.set_ipi_handler(move || tlb.serve_ipi());
    thread::scope(|scope| {
        scope.spawn(|| {
            cpu2.enter();
            while !steps.start_c.load(Ordering::Acquire) {
                thread::yield_now();
            }
            cpu2.go_online();
            tlb.flush_range(Page::range(r2, r2 + 1));
            serve_until(&steps.stop);
        });
        scope.spawn(|| {
            cpu0.enter();
            serve_until(&steps.start_a);
            tlb.flush_range(Page::range(r1, r1 + 1));
            let cached = cpu1.cached(r1.start_address()).is_some();
            steps.early.store(cached, Ordering::Release);
            steps.a_done.store(true, Ordering::Release);
            serve_until(&steps.stop);
        });
        cpu1.enter();
        let mut word = [0; 8];
        cpu1.read(r1.start_address(), &mut word).unwrap();
        cpu1.read(r2.start_address(), &mut word).unwrap();
        // Runs on this thread, as CPU 1, inside the flush of R1 that its handler
        // runs: CPU 2's IPI lands there.
        cpu1.in_next_flush(move || {
            steps.start_c.store(true, Ordering::Release);
            while !cpu1.ipi_pending() {
                thread::yield_now();
            }
            tlb.serve_ipi();
            // CPU 0 waits for CPU 1 alone, and spins only while it is told R1 is not
            // flushed: two spins since the nested serve returned and no return mean
            // it read "not flushed" after that serve.
            let spins = cpu0.relaxes();
            while !steps.a_done.load(Ordering::Acquire) && cpu0.relaxes() < spins + 2 {
                thread::yield_now();
            }
        });
        steps.start_a.store(true, Ordering::Release);
        while !cpu1.ipi_pending() {
            thread::yield_now();
        }
        // CPU 1 takes CPU 0's IPI.
        cpu1.poll();
        serve_until(&steps.a_done);
        steps.stop.store(true, Ordering::Release);
    });
    cpu0.enter();
    steps.early.load(Ordering::Acquire)
}

#[test]
fn an_ipi_landing_in_a_targets_flush_never_completes_a_shootdown_early() {
    watchdog("nested shootdown", DEADLOCK_LIMIT, || {
        let (machine, frames, tlb) = smp_machine(3, false);
        assert!(
            !completes_before_the_target_flushed(machine, frames, tlb),
            "CPU 0 was told R1 was flushed while CPU 1 still translated it"
        );
    });
}

#[test]
fn publishing_in_any_nesting_is_caught_completing_early() {
    // The negative control: the protocol before the fix, on the same steps.
    watchdog("nested shootdown, negative control", DEADLOCK_LIMIT, || {
        let (machine, frames, _) = smp_machine(3, false);
        let tlb: &'static _ = Box::leak(Box::new(PublishesInAnyNesting {
            machine,
            mailboxes: (0..3).map(|_| Mailbox::default()).collect(),
        }));
        assert!(
            completes_before_the_target_flushed(machine, frames, tlb),
            "the old protocol reports R1 flushed before CPU 1 flushed it"
        );
    });
}

#[test]
fn no_frame_comes_back_while_any_cpu_still_reaches_it() {
    watchdog("poisoned frames", DEADLOCK_LIMIT, || {
        for cpu_caches in [false, true] {
            let (machine, frames, tlb) = smp_machine(2, true);
            let poison: &'static PoisonOnFree =
                Box::leak(Box::new(PoisonOnFree::new(machine, frames)));
            let config = VmallocConfig {
                cpu_caches,
                lazy_threshold_pages: 48,
                ..VmallocConfig::default()
            };
            // SAFETY: the machine's page tables serve this manager alone.
            let vm = unsafe { Vmalloc::new(config, machine.root(), machine.phys(), poison, tlb) }
                .unwrap();
            let areas: Vec<(usize, usize)> = (1..40)
                .map(|pages| (vm.vmalloc(pages * 4096).unwrap().as_ptr() as usize, pages))
                .collect();
            let cached = AtomicBool::new(false);
            machine.on_every_cpu(|cpu| {
                if cpu.index() == 1 {
                    // Every page read once: CPU 1 caches every translation.
                    for &(start, pages) in &areas {
                        for page in 0..pages {
                            let mut byte = [0];
                            cpu.read(VirtAddr::new((start + page * 4096) as u64), &mut byte)
                                .unwrap();
                        }
                    }
                    cached.store(true, Ordering::Release);
                    // Served while CPU 0 frees: interrupts on, polled.
                    while cached.load(Ordering::Acquire) {
                        cpu.poll();
                        thread::yield_now();
                    }
                    return;
                }
                while !cached.load(Ordering::Acquire) {
                    thread::yield_now();
                }
                eprintln!(
                    "cpu1 caches first: {:?}",
                    machine.cpu(1).cached(VirtAddr::new(areas[0].0 as u64))
                );
                for &(start, _) in &areas {
                    // SAFETY: not used again (CPU 1 only read them before).
                    unsafe { vm.vfree(start as *mut u8) }.unwrap();
                }
                vm.purge();
                cached.store(false, Ordering::Release);
            });
            eprintln!(
                "poisoned {} stale {}",
                poison.poisoned(),
                poison.stale_reads().len()
            );
            assert!(
                poison.poisoned() >= (1..40).sum::<u64>(),
                "every data frame came back"
            );
            let stale = poison.stale_reads();
            assert!(
                stale.is_empty(),
                "caches {cpu_caches}: {} frames came back while a CPU could still reach them, \
                 the first: {:?}",
                stale.len(),
                stale.first()
            );
            drop(vm);
            assert_eq!(poison.stale_reads(), [], "caches {cpu_caches}: teardown");
        }
    });
}
