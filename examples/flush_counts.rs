//! TLB flushes of each kind per `lib/test_vmalloc.c` scenario, lazy against eager, and
//! the shootdowns and IPIs the same scenarios cost on 1, 2 and 4 simulated CPUs:
//! `cargo run --release --example flush_counts`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use vmalloc::smp::Shootdown;
use vmalloc::{FrameSource, TlbFlush, Vmalloc, VmallocConfig};
use vmalloc_sim::scenarios::*;
use vmalloc_sim::{Rng, SimConfig, SimFrames, SimMachine};

const ROUNDS: usize = 1000;

const SCENARIOS: [&str; 8] = [
    "fix_size_alloc_1",
    "fix_size_alloc_64",
    "full_fit_alloc_10_pairs",
    "random_size_alloc",
    "fix_align_alloc",
    "random_size_align_alloc",
    "align_shift_alloc",
    "vm_map_ram_64",
];

/// One round of scenario `which` (an index into [`SCENARIOS`]).
fn round(which: usize, vm: &Manager<'_, impl TlbFlush>, rng: &mut Rng) {
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
            vm.frames().free_frames(&lent).unwrap();
        }
    }
}

/// Runs `ROUNDS` rounds and a purge.
fn run(which: usize, vm: &Manager<'_, impl TlbFlush>) {
    let mut rng = Rng::new(1);
    for _ in 0..ROUNDS {
        round(which, vm, &mut rng);
    }
    vm.purge();
}

fn flushes(which: usize, eager: bool) {
    let machine = machine();
    let frames = fragmented_frames(&machine);
    let vm = manager(&machine, &frames, eager);
    let before = machine.tlb_stats();
    run(which, &vm);
    let after = machine.tlb_stats();
    println!(
        "{:<26} {:<6} {:>8} {:>8} {:>8}",
        SCENARIOS[which],
        if eager { "eager" } else { "lazy" },
        after.page_flushes - before.page_flushes,
        after.range_flushes - before.range_flushes,
        after.full_flushes - before.full_flushes,
    );
}

type Tlb = Shootdown<&'static SimMachine, &'static SimMachine>;

/// A machine with `cpus` CPUs and a shootdown over them, leaked: the IPI handler the
/// machine runs must be `'static`.
fn smp_machine(cpus: usize) -> (&'static SimMachine, &'static SimFrames, &'static Tlb) {
    let machine: &'static SimMachine = Box::leak(Box::new(SimMachine::new(
        SimConfig::new(1 << 30).with_cpus(cpus),
    )));
    let frames: &'static SimFrames = Box::leak(Box::new(fragmented_frames(machine)));
    let tlb: &'static Tlb = Box::leak(Box::new(Shootdown::new(machine, machine)));
    machine.set_ipi_handler(move || tlb.handle_ipi());
    (machine, frames, tlb)
}

/// Runs the scenario on CPU 0 while the other CPUs idle, taking their IPIs, and
/// returns the shootdowns and IPIs it cost.
fn shootdowns(
    which: usize,
    eager: bool,
    (machine, frames, tlb): (&'static SimMachine, &'static SimFrames, &'static Tlb),
) -> (u64, u64) {
    let config = VmallocConfig {
        eager,
        ..VmallocConfig::default()
    };
    // SAFETY: the machine's page tables serve this manager alone (the managers of
    // earlier rows were dropped).
    let vm = unsafe { Vmalloc::new(config, machine.root(), machine.phys(), frames, tlb) }.unwrap();
    let idle = AtomicBool::new(true);
    thread::scope(|scope| {
        for index in 1..machine.cpu_count() {
            let idle = &idle;
            scope.spawn(move || {
                let cpu = machine.cpu(index);
                while idle.load(Ordering::Acquire) {
                    cpu.poll();
                    thread::yield_now();
                }
            });
        }
        machine.cpu(0).enter();
        let before = tlb.stats();
        run(which, &vm);
        let after = tlb.stats();
        // Dropping the manager shoots down too: the other CPUs must still be taking IPIs.
        drop(vm);
        idle.store(false, Ordering::Release);
        (
            after.shootdowns - before.shootdowns,
            after.ipis - before.ipis,
        )
    })
}

fn main() {
    println!("{ROUNDS} rounds per scenario, then one purge; flushes counted by the simulated TLB");
    println!(
        "{:<26} {:<6} {:>8} {:>8} {:>8}",
        "scenario", "mode", "page", "range", "full"
    );
    for eager in [false, true] {
        for which in 0..SCENARIOS.len() {
            flushes(which, eager);
        }
    }

    println!();
    println!("The same on 1, 2 and 4 CPUs through a Shootdown: shootdowns (each one local");
    println!("flush plus one IPI per other online CPU) and IPIs sent");
    println!(
        "{:<26} {:<6} {:>10} {:>8} {:>8} {:>8}",
        "scenario", "mode", "shootdowns", "IPIs@1", "IPIs@2", "IPIs@4"
    );
    let machines = [smp_machine(1), smp_machine(2), smp_machine(4)];
    for eager in [false, true] {
        for (which, name) in SCENARIOS.iter().enumerate() {
            let counts = machines.map(|machine| shootdowns(which, eager, machine));
            println!(
                "{name:<26} {:<6} {:>10} {:>8} {:>8} {:>8}",
                if eager { "eager" } else { "lazy" },
                counts[0].0,
                counts[0].1,
                counts[1].1,
                counts[2].1,
            );
        }
    }
}
