//! Kernel stacks from vmalloc: aligned to their size, zeroed, unmapped below (an
//! overflow faults and is diagnosed as one) and above, and freed on drop.

mod common;

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use vmalloc::Error;
use vmalloc::smp::{CpuSet, Cpus, IrqState};
use vmalloc::vmalloc::{AreaKind, FaultSite, StackCache, Vmalloc};
use vmalloc_sim::scenarios::manager_over as manager;
use vmalloc_sim::{Access, DEADLOCK_LIMIT, Fault, SimConfig, SimMachine, watchdog};
use x86_64::VirtAddr;

fn machine() -> SimMachine {
    SimMachine::new(SimConfig::new(64 << 20).with_scatter_seed(4))
}

fn page_fault(machine: &SimMachine, addr: VirtAddr, access: Access) -> Option<FaultSiteInput> {
    match machine.translate(addr, access) {
        Err(Fault::Page(fault)) => Some((fault.addr, fault.code)),
        _ => None,
    }
}

type FaultSiteInput = (VirtAddr, x86_64::structures::idt::PageFaultErrorCode);

#[test]
fn a_stack_is_aligned_to_its_size_zeroed_and_unmapped_below_and_above() {
    let machine = machine();
    let frames = machine.frames();
    // SAFETY: the machine's page tables serve this manager alone, and its flush reaches every CPU that runs.
    let vm = unsafe { manager(&machine, &frames) };
    let own = |vm: &Vmalloc<_, _, _>| {
        let stats = vm.stats();
        (stats.page_table_frames + stats.bookkeeping_frames) as i64
    };
    // Frames that held data: a stack built on them reads zero only if zeroed.
    common::dirty_free_frames(&machine, &frames, 0xee);
    let (free_before, own_before) = (frames.stats().free as i64, own(&vm));
    let (stack, line) = (vm.alloc_stack(16 << 10).unwrap(), line!());
    let (base, top) = (stack.base(), stack.top());
    assert_eq!(top - base, 16 << 10);
    assert_eq!(base.as_u64() % (16 << 10), 0, "aligned to its size");
    // Any stack pointer inside finds the base by masking.
    let rsp = top - 200u64;
    assert_eq!(VirtAddr::new(rsp.as_u64() & !((16 << 10) - 1)), base);
    let mut whole = vec![0xffu8; 16 << 10];
    machine.read(base, &mut whole).unwrap();
    assert!(whole.iter().all(|&b| b == 0), "zeroed");
    // SAFETY: bytes the test owns: no live Rust value lives there.
    unsafe { machine.write(base, b"deepest") }.unwrap();

    // One byte below the base: an overflow, named as one.
    let (addr, code) = page_fault(&machine, base - 8u64, Access::WRITE).expect("faults");
    let diagnosis = vm.diagnose_fault(addr, code);
    assert!(matches!(
        diagnosis.site,
        FaultSite::StackOverflow { below: 8, .. }
    ));
    let text = diagnosis.to_string();
    assert!(
        text.starts_with(&format!(
            "write below 'kernel stack' (16 KiB stack at {:#x}, allocated at tests/stack.rs:{line})",
            base.as_u64()
        )) && text.ends_with("8 bytes below its base: stack overflow"),
        "{text}"
    );
    // The whole lower half is unmapped, not just one page.
    assert!(page_fault(&machine, base - (16u64 << 10), Access::READ).is_some());
    // Above the top: the usual guard page.
    let (addr, code) = page_fault(&machine, top, Access::READ).expect("faults");
    assert!(matches!(
        vm.diagnose_fault(addr, code).site,
        FaultSite::Guard { past_end: 0, .. }
    ));
    let area = vm.find_vm_area(base).unwrap();
    assert_eq!((area.kind, area.pages), (AreaKind::Stack, 4));
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    assert_eq!(
        unsafe { vm.vfree(base.as_mut_ptr()) },
        Err(Error::InteriorPointer),
        "the base is inside the stack's area, past its unmapped lower half"
    );
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    assert_eq!(
        unsafe { vm.vfree(area.start.as_mut_ptr()) },
        Err(Error::WrongKind),
        "nor its area"
    );

    drop(stack);
    vm.purge();
    assert_eq!(vm.stats().areas, 0);
    assert!(
        page_fault(&machine, base, Access::READ).is_some(),
        "unmapped once freed"
    );
    // Every frame came back but what the manager's own tables grew by.
    assert_eq!(
        frames.stats().free as i64,
        free_before - (own(&vm) - own_before)
    );
}

#[test]
fn bad_sizes_are_refused_and_change_nothing() {
    let machine = machine();
    let frames = machine.frames();
    // SAFETY: the machine's page tables serve this manager alone, and its flush reaches every CPU that runs.
    let vm = unsafe { manager(&machine, &frames) };
    let before = vm.stats();
    assert_eq!(vm.alloc_stack(0).err(), Some(Error::ZeroSize));
    assert_eq!(vm.alloc_stack(4096).err(), Some(Error::BadAlignment));
    assert_eq!(vm.alloc_stack(12 << 10).err(), Some(Error::BadAlignment));
    assert_eq!(vm.alloc_stack(1 << 62).err(), Some(Error::SizeTooLarge));
    assert_eq!(
        vm.alloc_stack(usize::MAX / 2 + 1).err(),
        Some(Error::SizeTooLarge)
    );
    assert_eq!(vm.stats(), before);
    // Through a stack cache: the stacks it keeps stay kept.
    let cache = StackCache::new(&machine);
    drop(cache.alloc(&vm, 16 << 10).unwrap());
    let kept = vm.stats();
    for size in [0, 4096, 12 << 10, usize::MAX] {
        assert!(cache.alloc(&vm, size).is_err(), "{size}");
        assert_eq!((cache.cached(), vm.stats()), (1, kept), "{size}");
    }
    cache.drain(&vm).unwrap();
    // Stacks in a row never touch: each one's lower half separates it from the last.
    let stacks: Vec<_> = (0..8).map(|_| vm.alloc_stack(8192).unwrap()).collect();
    for pair in stacks.windows(2) {
        let (low, high) = if pair[0].base() < pair[1].base() {
            (&pair[0], &pair[1])
        } else {
            (&pair[1], &pair[0])
        };
        assert!(high.base() - low.top() >= 8192);
    }
}

#[test]
fn a_cpu_reuses_the_stacks_it_freed_zeroed_and_keeps_at_most_two() {
    watchdog(
        "a_cpu_reuses_the_stacks_it_freed_zeroed_and_keeps_at_most_two",
        DEADLOCK_LIMIT,
        || {
            let machine: &'static SimMachine = Box::leak(Box::new(SimMachine::new(
                SimConfig::new(64 << 20).with_cpus(2).with_scatter_seed(4),
            )));
            let frames = machine.frames();
            // SAFETY: the machine's page tables serve this manager alone, and its flush reaches every CPU that runs.
            let vm = unsafe { manager(machine, &frames) };
            let cache = StackCache::new(machine);
            machine.cpu(0).enter();
            let stack = cache.alloc(&vm, 16 << 10).unwrap();
            let base = stack.base();
            // SAFETY: bytes the test owns: no live Rust value lives there.
            unsafe { machine.write(stack.top() - 8u64, b"old data") }.unwrap();
            drop(stack);
            assert_eq!(
                (cache.cached(), vm.stats().areas),
                (1, 1),
                "kept, still mapped"
            );
            let (again, line) = (cache.alloc(&vm, 16 << 10).unwrap(), line!());
            assert_eq!(again.base(), base, "the same stack");
            // Listed under the call that holds it now, not the one that made it.
            let listed = vm
                .areas()
                .find(|area| area.kind == AreaKind::Stack)
                .unwrap();
            let caller = listed.caller.map(|at| (at.file(), at.line()));
            assert_eq!(caller, Some((file!(), line)), "{listed}");
            let mut word = [0xffu8; 8];
            machine.read(again.top() - 8u64, &mut word).unwrap();
            assert_eq!(word, [0; 8], "zeroed before it is handed out again");
            assert_eq!(cache.cached(), 0);

            // Three freed: two kept, the third goes back to the manager.
            let more: Vec<_> = (0..2)
                .map(|_| cache.alloc(&vm, 16 << 10).unwrap())
                .collect();
            drop(again);
            drop(more);
            assert_eq!((cache.cached(), vm.stats().areas), (2, 2));

            // Another CPU has its own slots: it makes a new stack.
            std::thread::scope(|scope| {
                scope.spawn(|| {
                    machine.cpu(1).enter();
                    let other = cache.alloc(&vm, 16 << 10).unwrap();
                    assert_ne!(other.base(), base);
                    assert_eq!(cache.cached(), 2);
                    // The other CPU's slots take it when it is dropped.
                    drop(other);
                    assert_eq!(cache.cached(), 3);
                });
            });
            // A cached stack of another size is not handed out.
            let small = cache.alloc(&vm, 8 << 10).unwrap();
            assert_eq!(small.size(), 8 << 10);
            drop(small);
            cache.drain(&vm).unwrap();
            vm.purge();
            assert_eq!((cache.cached(), vm.stats().areas), (0, 0));
        },
    );
}

#[test]
fn a_stack_cache_serves_one_manager_and_refuses_a_manager_rebuilt_over_the_same_region() {
    let machine = machine();
    let frames = machine.frames();
    let cache = StackCache::new(&machine);
    // SAFETY: the machine's page tables serve this manager alone, and its flush reaches every CPU that runs.
    let first = unsafe { manager(&machine, &frames) };
    let parked = cache.alloc(&first, 16 << 10).unwrap();
    let base = parked.base();
    drop(parked);
    assert_eq!(cache.cached(), 1);
    drop(first);

    // A new manager over the same region makes a stack where the parked one was.
    // SAFETY: the machine's page tables serve this manager alone, and its flush reaches every CPU that runs.
    let second = unsafe { manager(&machine, &frames) };
    let live = second.alloc_stack(16 << 10).unwrap();
    assert_eq!(
        live.base(),
        base,
        "the same range, now another manager's stack"
    );
    // SAFETY: bytes the test owns: no live Rust value lives there.
    unsafe { machine.write(live.top() - 8u64, b"live one") }.unwrap();
    assert_eq!(
        cache.alloc(&second, 16 << 10).err(),
        Some(Error::WrongManager),
        "the cache would hand out a second owner of the live stack"
    );
    assert_eq!(cache.drain(&second), Err(Error::WrongManager));
    let mut word = [0; 8];
    machine.read(live.top() - 8u64, &mut word).unwrap();
    assert_eq!(&word, b"live one", "nothing zeroed the live stack");
    assert_eq!(second.stats().areas, 1);
}

/// A cache is bound to the manager its first stack came from: a call that made no
/// stack (refused, or a drain of an unused cache) binds it to nothing.
#[test]
fn a_cache_is_bound_by_the_first_stack_it_hands_out_and_not_by_a_refused_call() {
    let (machine, other_machine) = (machine(), machine());
    let (frames, other_frames) = (machine.frames(), other_machine.frames());
    // SAFETY: each machine's page tables serve its manager alone, and its flush
    // reaches every CPU that runs.
    let (first, second) = unsafe {
        (
            manager(&machine, &frames),
            manager(&other_machine, &other_frames),
        )
    };
    let cache = StackCache::new(&machine);
    assert_eq!(cache.alloc(&first, 0).err(), Some(Error::ZeroSize));
    assert_eq!(
        cache.alloc(&first, 3 << 12).err(),
        Some(Error::BadAlignment)
    );
    assert_eq!(cache.drain(&first), Ok(()), "nothing to give back");
    // Nothing of the first manager's is in the cache: the second may use it.
    let stack = cache.alloc(&second, 16 << 10).expect("an unbound cache");
    drop(stack);
    assert_eq!(cache.cached(), 1);
    // From now on the cache is the second manager's.
    assert_eq!(
        cache.alloc(&first, 16 << 10).err(),
        Some(Error::WrongManager)
    );
    assert_eq!(cache.drain(&first), Err(Error::WrongManager));
    assert_eq!(cache.cached(), 1, "the refusals changed nothing");
    cache.drain(&second).unwrap();
    assert_eq!((cache.cached(), first.stats().areas), (0, 0));
}

/// The machine's CPUs with every caller on CPU 0 (tasks of one CPU), where a task
/// that asked for it is preempted once in `current()` until released.
struct PreemptOnce<'m> {
    machine: &'m SimMachine,
    /// (preempted, released)
    state: Mutex<(bool, bool)>,
    changed: Condvar,
    armed: AtomicBool,
}

thread_local! {
    static PREEMPT_HERE: Cell<bool> = const { Cell::new(false) };
}

// SAFETY: one CPU index for every thread, as a one-CPU kernel's tasks; interrupts are
// not touched (no handler runs), and IPIs go to the machine's CPUs.
unsafe impl Cpus for PreemptOnce<'_> {
    fn current(&self) -> usize {
        if PREEMPT_HERE.get() && self.armed.swap(false, Ordering::AcqRel) {
            let mut state = self.state.lock().unwrap();
            state.0 = true;
            self.changed.notify_all();
            while !state.1 {
                state = self.changed.wait(state).unwrap();
            }
        }
        0
    }
    fn online(&self) -> CpuSet {
        Cpus::online(self.machine)
    }
    fn send_ipi(&self, targets: CpuSet) {
        Cpus::send_ipi(self.machine, targets)
    }
    fn irq_save(&self) -> IrqState {
        IrqState::new(0)
    }
    fn irq_restore(&self, _: IrqState) {}
}

/// A call that found the cache unbound, preempted while another task binds it to
/// another manager and parks that manager's stack there, hands out no stack of the
/// other manager, and the one it hands out (or refuses) is its own manager's.
#[test]
fn a_call_preempted_while_the_cache_is_bound_to_another_manager_takes_none_of_its_stacks() {
    watchdog("stack cache bound meanwhile", DEADLOCK_LIMIT, || {
        let (first_machine, second_machine) = (machine(), machine());
        let (f1, f2) = (first_machine.frames(), second_machine.frames());
        // SAFETY: each machine's page tables serve its manager alone, and its flush
        // reaches every CPU that runs.
        let (first, second) =
            unsafe { (manager(&first_machine, &f1), manager(&second_machine, &f2)) };
        // The second manager's stack, someone's: where the first's first stack goes.
        let live = second.alloc_stack(16 << 10).unwrap();
        // SAFETY: bytes the test owns: no live Rust value lives there.
        unsafe { second_machine.write(live.top() - 8u64, b"live one") }.unwrap();
        let cpus = PreemptOnce {
            machine: &first_machine,
            state: Mutex::new((false, false)),
            changed: Condvar::new(),
            armed: AtomicBool::new(true),
        };
        let cache = StackCache::new(&cpus);
        std::thread::scope(|s| {
            let late = s.spawn(|| {
                PREEMPT_HERE.set(true);
                cache.alloc(&second, 16 << 10)
            });
            // Until the late call is preempted, if it ever is.
            let mut state = cpus.state.lock().unwrap();
            while !state.0 && !late.is_finished() {
                state = (cpus.changed)
                    .wait_timeout(state, std::time::Duration::from_millis(10))
                    .unwrap()
                    .0;
            }
            drop(state);
            if let Ok(parked) = cache.alloc(&first, 16 << 10) {
                assert_eq!(parked.base(), live.base(), "the same place in both");
                drop(parked);
            }
            cpus.state.lock().unwrap().1 = true;
            cpus.changed.notify_all();
            if let Ok(stack) = late.join().unwrap() {
                assert_ne!(stack.base(), live.base(), "a second owner of a live stack");
            }
        });
        let mut word = [0; 8];
        second_machine.read(live.top() - 8u64, &mut word).unwrap();
        assert_eq!(&word, b"live one", "the live stack was zeroed");
        let _ = cache.drain(&first);
        let _ = cache.drain(&second);
        assert_eq!(
            (cache.cached(), first.stats().areas, second.stats().areas),
            (0, 0, 1),
            "every stack went back to its own manager"
        );
    });
}

/// A cache keeps its stacks of other sizes when it makes a new one, and a request
/// `alloc_stack` refuses, for its form or for want of memory, changes nothing: it
/// freed every cached stack of another size before it tried.
#[test]
fn a_cache_keeps_its_stacks_of_other_sizes_and_a_failed_call_changes_nothing() {
    let machine = SimMachine::new(SimConfig::new(16 << 20).with_scatter_seed(4));
    let frames = machine.frames();
    // SAFETY: the machine's page tables serve this manager alone, and its flush reaches every CPU that runs.
    let vm = unsafe { manager(&machine, &frames) };
    let cache = StackCache::new(&machine);
    drop(cache.alloc(&vm, 16 << 10).unwrap());
    assert_eq!(cache.cached(), 1);
    // Another size: a new stack; the cached one stays.
    let other = cache.alloc(&vm, 8 << 10).unwrap();
    assert_eq!(cache.cached(), 1);
    drop(other);
    assert_eq!(cache.cached(), 2);
    let kept = vm.stats();
    for refused in [0, 12 << 10, 64 << 20, 1 << 40] {
        assert!(cache.alloc(&vm, refused).is_err(), "{refused}");
        assert_eq!((cache.cached(), vm.stats()), (2, kept), "{refused}");
    }
    // Each size finds its own.
    let (big, small) = (cache.alloc(&vm, 16 << 10), cache.alloc(&vm, 8 << 10));
    assert_eq!((cache.cached(), vm.stats().areas), (0, 2));
    drop((big, small));
    cache.drain(&vm).unwrap();
    vm.purge();
    assert_eq!(vm.stats().areas, 0);
}

/// A write below a freed stack's base, in its unmapped lower half, is diagnosed as a
/// use after free that far below the base, not at its first byte.
#[test]
fn a_write_below_a_freed_stack_says_how_far_below_its_base() {
    let machine = machine();
    let frames = machine.frames();
    // SAFETY: the machine's page tables serve this manager alone, and its flush reaches every CPU that runs.
    let vm = unsafe { manager(&machine, &frames) };
    let stack = vm.alloc_stack(8 << 10).unwrap();
    let base = stack.base();
    drop(stack);
    for (at, says) in [
        (base - 8u64, "8 bytes below its base"),
        (base + 16u64, "offset 16"),
    ] {
        let (addr, code) = page_fault(&machine, at, Access::WRITE).unwrap();
        let diagnosis = vm.diagnose_fault(addr, code);
        assert!(
            matches!(diagnosis.site, FaultSite::Freed { .. }),
            "{diagnosis}"
        );
        let text = diagnosis.to_string();
        assert!(text.contains(says), "{text}");
    }
}
