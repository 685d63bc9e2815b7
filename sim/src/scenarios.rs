//! The scenarios of Linux's `lib/test_vmalloc.c`, ported to a simulated machine,
//! for benchmarks and flush counts (`benches/vmalloc.rs`, `examples/flush_counts.rs`).
//!
//! # Panics
//!
//! Each scenario (`fix_size_alloc` to `run_rounds`) panics when a call it makes
//! fails (out of frames or virtual space, a bad argument such as 0 pages), as a
//! test's failed check: they are benchmark and test bodies, not library calls.

use crate::{Rng, SimConfig, SimFrames, SimMachine, SimPhys};
use std::string::String;
use std::sync::atomic::{AtomicBool, Ordering};
use vmalloc::smp::Shootdown;
use vmalloc::vmalloc::{Prot, VmOptions, Vmalloc, VmallocConfig};
use vmalloc::{FrameSource, PAGE_SIZE, TlbFlush};
use x86_64::PhysAddr;
use x86_64::structures::paging::PhysFrame;

/// A manager over a simulated machine, as the scenarios use it; `T` flushes its TLBs:
/// the machine itself (one CPU) or a [`Shootdown`] over its CPUs.
pub type Manager<'m, T = &'m SimMachine> = Vmalloc<&'m SimFrames, SimPhys<'m>, T>;

/// The TLB flush of a machine with several CPUs: a shootdown over them.
pub type SmpTlb = Shootdown<&'static SimMachine, &'static SimMachine>;

/// A machine made from `config`, its frames and a shootdown over its CPUs, all leaked
/// (the IPI handler is `'static`); every CPU's IPI handler serves the shootdown.
/// Every CPU starts online: a flush waits for each until a thread serves it or it
/// goes offline (see [`SimConfig::with_cpus`]).
pub fn smp_machine(
    config: SimConfig,
) -> (&'static SimMachine, &'static SimFrames, &'static SmpTlb) {
    let machine: &'static SimMachine = Box::leak(Box::new(SimMachine::new(config)));
    let frames: &'static SimFrames = Box::leak(Box::new(machine.frames()));
    let tlb: &'static SmpTlb = Box::leak(Box::new(Shootdown::new(machine, machine)));
    machine.set_ipi_handler(move || tlb.handle_ipi());
    (machine, frames, tlb)
}

/// A manager with `config` over `machine`'s page tables, flushing with `tlb`.
///
/// # Panics
///
/// If the manager cannot be made.
///
/// # Safety
///
/// As [`Vmalloc::new`]'s: no other manager or mapper uses the machine's page tables
/// in the manager's region, and `tlb` flushes every CPU that may cache them.
pub unsafe fn manager_with<'m, F: FrameSource + Clone, T: TlbFlush>(
    machine: &'m SimMachine,
    frames: F,
    tlb: T,
    config: VmallocConfig,
) -> Vmalloc<F, SimPhys<'m>, T> {
    // SAFETY: forwarded from the caller.
    unsafe { Vmalloc::new(config, machine.root(), machine.phys(), frames, tlb) }
        .expect("a manager over the simulated machine")
}

/// A manager of the default region over `machine`'s page tables, with frames from
/// any source (`SimFrames`, a `FaultInjector` in front of it, ...), as the tests make
/// them.
///
/// # Panics
///
/// If the manager cannot be made (no frames for its top-level tables).
///
/// # Safety
///
/// As [`Vmalloc::new`]'s: no other manager or mapper uses the machine's page tables
/// in the manager's region, and the machine's CPUs run no thread but the caller's (it flushes only the calling CPU).
///
/// Safe code cannot make one (two over one machine handed out one area twice):
///
/// ```compile_fail,E0133
/// let machine = vmalloc_sim::SimMachine::new(vmalloc_sim::SimConfig::new(64 << 20));
/// let frames = machine.frames();
/// let _vm = vmalloc_sim::scenarios::manager_over(&machine, &frames);
/// ```
pub unsafe fn manager_over<F: FrameSource + Clone>(
    machine: &SimMachine,
    frames: F,
) -> Vmalloc<F, SimPhys<'_>, &SimMachine> {
    // SAFETY: forwarded from the caller.
    unsafe { manager_with(machine, frames, machine, VmallocConfig::default()) }
}

/// The default configuration with its region at `machine`'s host window, where host
/// threads read and write what the manager maps: the kernel heap over the simulated
/// machine lives there.
///
/// # Panics
///
/// If the machine was made without a host window ([`SimConfig::with_host_window`]).
pub fn window_config(machine: &SimMachine) -> VmallocConfig {
    let (start, size) = machine
        .host_window()
        .expect("a machine made with a host window");
    VmallocConfig {
        start,
        size,
        ..VmallocConfig::default()
    }
}

/// A manager of [`window_config`] over `machine`'s page tables, with frames from any
/// source, flushing with `tlb`.
///
/// # Panics
///
/// If the machine has no host window, or the manager cannot be made.
///
/// # Safety
///
/// As [`Vmalloc::new`]'s: no other manager or mapper uses the machine's page tables
/// in the manager's region, and `tlb` flushes every CPU that may cache them.
pub unsafe fn window_manager<F: FrameSource + Clone, T: TlbFlush>(
    machine: &SimMachine,
    frames: F,
    tlb: T,
) -> Vmalloc<F, SimPhys<'_>, T> {
    // SAFETY: forwarded from the caller.
    unsafe { manager_with(machine, frames, tlb, window_config(machine)) }
}

/// A 1 GiB machine.
pub fn machine() -> SimMachine {
    SimMachine::new(SimConfig::new(1 << 30))
}

/// The machine's frames, fragmented the way a long-running kernel's are: a random
/// half of all frames stays allocated for good, so the frames handed out (lowest
/// free first, in bulk) are scattered over memory.
pub fn fragmented_frames(machine: &SimMachine) -> SimFrames {
    let frames = machine.frames();
    let mut all =
        vec![PhysFrame::containing_address(PhysAddr::zero()); frames.stats().free as usize];
    let taken = frames.alloc_frames(&mut all);
    all.truncate(taken);
    Rng::new(17).shuffle(&mut all);
    // SAFETY: taken above and never used.
    unsafe { frames.free_frames(&all[..taken / 2]) }.unwrap();
    frames
}

/// A manager in the default configuration, lazy or eager, over `machine`.
///
/// # Safety
///
/// As [`manager_over`]'s.
pub unsafe fn manager<'m>(
    machine: &'m SimMachine,
    frames: &'m SimFrames,
    eager: bool,
) -> Manager<'m> {
    let config = VmallocConfig {
        eager,
        ..VmallocConfig::default()
    };
    // SAFETY: forwarded from the caller.
    unsafe { manager_with(machine, frames, machine, config) }
}

/// A manager, lazy or eager, over `machine`, without the per-CPU caches
/// (`VmallocConfig::cpu_caches` off): every area is made under its lock.
///
/// # Safety
///
/// As [`manager_over`]'s.
pub unsafe fn locked_manager<'m>(
    machine: &'m SimMachine,
    frames: &'m SimFrames,
    eager: bool,
) -> Manager<'m> {
    let config = VmallocConfig {
        eager,
        cpu_caches: false,
        ..VmallocConfig::default()
    };
    // SAFETY: forwarded from the caller.
    unsafe { manager_with(machine, frames, machine, config) }
}

fn alloc_free(vm: &Manager<'_, impl TlbFlush>, pages: u64, align: u64) {
    let options = VmOptions {
        align,
        ..VmOptions::default()
    };
    let ptr = vm
        .vmalloc_with((pages * PAGE_SIZE) as usize, &options)
        .unwrap();
    // SAFETY: the area was made above for this scenario and is not used again.
    unsafe { vm.vfree(ptr.as_ptr()) }.unwrap();
}

/// `fix_size_alloc_test`: vmalloc and vfree of `pages` pages.
pub fn fix_size_alloc(vm: &Manager<'_, impl TlbFlush>, pages: u64) {
    alloc_free(vm, pages, PAGE_SIZE);
}

/// `full_fit_alloc_test`: pairs of 1-page areas, every second one freed, then 1-page
/// allocations that must land in the holes.
pub fn full_fit_alloc(vm: &Manager<'_, impl TlbFlush>, pairs: usize) {
    let one = PAGE_SIZE as usize;
    let mut kept = Vec::with_capacity(2 * pairs);
    for _ in 0..pairs {
        let junk = vm.vmalloc(one).unwrap();
        kept.push(vm.vmalloc(one).unwrap());
        // SAFETY: the area was made above for this scenario and is not used again.
        unsafe { vm.vfree(junk.as_ptr()) }.unwrap();
    }
    for _ in 0..pairs {
        kept.push(vm.vmalloc(one).unwrap());
    }
    for ptr in kept {
        // SAFETY: the area was made above for this scenario and is not used again.
        unsafe { vm.vfree(ptr.as_ptr()) }.unwrap();
    }
}

/// Fills the region's low end with `count` live 1-page areas (for
/// `long_busy_list_alloc_test` and the latency scenario); returns them.
pub fn busy_list(vm: &Manager<'_, impl TlbFlush>, count: usize) -> Vec<*mut u8> {
    (0..count)
        .map(|_| vm.vmalloc(PAGE_SIZE as usize).unwrap().as_ptr())
        .collect()
}

/// `long_busy_list_alloc_test`, one round: with many areas live, a 100-page and a
/// 1-page allocation, freed again.
pub fn long_busy_list_alloc(vm: &Manager<'_, impl TlbFlush>) {
    alloc_free(vm, 100, PAGE_SIZE);
    alloc_free(vm, 1, PAGE_SIZE);
}

/// `random_size_alloc_test`: 1 to 100 pages.
pub fn random_size_alloc(vm: &Manager<'_, impl TlbFlush>, rng: &mut Rng) {
    alloc_free(vm, 1 + rng.below(100), PAGE_SIZE);
}

/// `fix_align_alloc_test`: 5 pages aligned to 32 KiB.
pub fn fix_align_alloc(vm: &Manager<'_, impl TlbFlush>) {
    alloc_free(vm, 5, 32 << 10);
}

/// `random_size_align_alloc_test`: 1 to 10 pages, alignment 2^0 to 2^22 bytes.
pub fn random_size_align_alloc(vm: &Manager<'_, impl TlbFlush>, rng: &mut Rng) {
    let pages = 1 + rng.below(10);
    alloc_free(vm, pages, 1 << rng.below(23));
}

/// `align_shift_alloc_test`: 1 page at every alignment 2^0 to 2^63. Alignments no
/// address of the region can meet must fail cleanly; returns how many did.
pub fn align_shift_alloc(vm: &Manager<'_, impl TlbFlush>) -> u32 {
    let mut refused = 0;
    for shift in 0..64 {
        let options = VmOptions {
            align: 1 << shift,
            ..VmOptions::default()
        };
        match vm.vmalloc_with(PAGE_SIZE as usize, &options) {
            // SAFETY: the area was made above for this scenario and is not used again.
            Ok(ptr) => unsafe { vm.vfree(ptr.as_ptr()) }.unwrap(),
            Err(error) => {
                assert!(shift > 40, "alignment 2^{shift} refused: {error:?}");
                refused += 1;
            }
        }
    }
    refused
}

/// Frames for `vm_map_ram_test`, taken once.
pub fn frames_for_vmap(frames: &SimFrames, count: usize) -> Vec<PhysFrame> {
    let mut out = vec![PhysFrame::containing_address(PhysAddr::zero()); count];
    assert_eq!(frames.alloc_frames(&mut out), count);
    out
}

/// `vm_map_ram_test`: vmap and vunmap of the same frames, which the caller holds
/// (from [`frames_for_vmap`]).
pub fn vm_map_ram(vm: &Manager<'_, impl TlbFlush>, frames: &[PhysFrame]) {
    // SAFETY: the frames are the caller's, held for the whole run.
    let ptr = unsafe { vm.vmap(frames, Prot::KERNEL_RW) }.unwrap();
    // SAFETY: the area was made above for this scenario and is not used again.
    unsafe { vm.vunmap(ptr.as_ptr(), |_| ()) }.unwrap();
}

/// The scenarios [`round`] runs, by index, as `lib/test_vmalloc.c` names them.
pub const SCENARIOS: [&str; 8] = [
    "fix_size_alloc_1",
    "fix_size_alloc_64",
    "full_fit_alloc_10_pairs",
    "random_size_alloc",
    "fix_align_alloc",
    "random_size_align_alloc",
    "align_shift_alloc",
    "vm_map_ram_64",
];

/// Rounds per scenario in the flush counts.
pub const ROUNDS: usize = 1000;

/// One round of scenario `which` (an index into [`SCENARIOS`]).
pub fn round(which: usize, vm: &Manager<'_, impl TlbFlush>, rng: &mut Rng) {
    match which {
        0 => fix_size_alloc(vm, 1),
        1 => fix_size_alloc(vm, 64),
        2 => full_fit_alloc(vm, 10),
        3 => random_size_alloc(vm, rng),
        4 => fix_align_alloc(vm),
        5 => random_size_align_alloc(vm, rng),
        6 => {
            align_shift_alloc(vm);
        }
        _ => {
            let lent = frames_for_vmap(vm.frames(), 64);
            vm_map_ram(vm, &lent);
            // SAFETY: lent to the mapping above, which is gone.
            unsafe { vm.frames().free_frames(&lent) }.unwrap();
        }
    }
}

/// [`ROUNDS`] rounds of scenario `which`, then a purge.
pub fn run_rounds(which: usize, vm: &Manager<'_, impl TlbFlush>) {
    let mut rng = Rng::new(1);
    for _ in 0..ROUNDS {
        round(which, vm, &mut rng);
    }
    vm.purge();
}

/// Runs scenario `which` ([`run_rounds`]) on CPU 0 of `machine` (from
/// [`smp_machine`]) with a default manager, lazy or eager, while the other CPUs idle
/// and take their IPIs; returns the shootdowns and the IPIs it cost.
///
/// # Safety
///
/// The machine's page tables serve no other manager or mapper in the default region
/// meanwhile.
pub unsafe fn shootdowns(
    which: usize,
    eager: bool,
    (machine, frames, tlb): (&'static SimMachine, &'static SimFrames, &'static SmpTlb),
) -> (u64, u64) {
    let config = VmallocConfig {
        eager,
        ..VmallocConfig::default()
    };
    // SAFETY: the caller's promise; the shootdown reaches every CPU of the machine.
    let vm = unsafe { manager_with(machine, frames, tlb, config) };
    let idle = AtomicBool::new(true);
    std::thread::scope(|scope| {
        for index in 1..machine.cpu_count() {
            let idle = &idle;
            scope.spawn(move || {
                let cpu = machine.cpu(index);
                while idle.load(Ordering::Acquire) {
                    cpu.poll();
                    std::thread::yield_now();
                }
            });
        }
        machine.cpu(0).enter();
        let rounds = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let before = tlb.stats();
            run_rounds(which, &vm);
            (before, tlb.stats())
        }));
        // The other CPUs stop however this ends (a failed scenario panics, not hangs),
        // once the manager is dropped: that shoots down too, so they still take IPIs.
        let _stop = StopIdling(&idle);
        drop(vm);
        let (before, after) = rounds.unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        (
            after.shootdowns - before.shootdowns,
            after.ipis - before.ipis,
        )
    })
}

/// Lets the idling CPUs of [`shootdowns`] return when dropped.
struct StopIdling<'a>(&'a AtomicBool);

impl Drop for StopIdling<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// The README's table of shootdowns and IPIs per scenario, lazy and eager, on 2 and
/// 4 CPUs, as markdown: `examples/flush_counts.rs` prints it, and a test holds the
/// README to it.
///
/// # Panics
///
/// If a scenario fails, or costs a different number of shootdowns on 2 and 4 CPUs.
pub fn shootdown_table() -> String {
    use core::fmt::Write;
    let machine = |cpus| smp_machine(SimConfig::new(256 << 20).with_cpus(cpus));
    let (two, four) = (machine(2), machine(4));
    let mut table = String::from(
        "| scenario | lazy: shootdowns | IPIs, 2 CPUs | IPIs, 4 CPUs | eager: shootdowns | IPIs, 4 CPUs |\n|---|---:|---:|---:|---:|---:|\n",
    );
    for (which, name) in SCENARIOS.iter().enumerate() {
        let lazy = [
            // SAFETY: the machine's page tables serve this manager alone, and its flush reaches every CPU that runs.
            unsafe { shootdowns(which, false, two) },
            // SAFETY: the machine's page tables serve this manager alone, and its flush reaches every CPU that runs.
            unsafe { shootdowns(which, false, four) },
        ];
        // SAFETY: the machine's page tables serve this manager alone, and its flush reaches every CPU that runs.
        let eager = unsafe { shootdowns(which, true, four) };
        assert_eq!(lazy[0].0, lazy[1].0, "shootdowns depend on the CPU count");
        writeln!(
            table,
            "| {name} | {} | {} | {} | {} | {} |",
            lazy[0].0, lazy[0].1, lazy[1].1, eager.0, eager.1
        )
        .unwrap();
    }
    table
}
