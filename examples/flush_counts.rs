//! TLB flushes of each kind per `lib/test_vmalloc.c` scenario, lazy against eager:
//! `cargo run --release --example flush_counts`.

use vmalloc::FrameSource;
use vmalloc_sim::Rng;
use vmalloc_sim::scenarios::*;

const ROUNDS: usize = 1000;

fn count(name: &str, eager: bool, scenario: impl Fn(&Manager, &mut Rng)) {
    let machine = machine();
    let frames = fragmented_frames(&machine);
    let vm = manager(&machine, &frames, eager);
    let mut rng = Rng::new(1);
    let before = machine.tlb_stats();
    for _ in 0..ROUNDS {
        scenario(&vm, &mut rng);
    }
    vm.purge();
    let after = machine.tlb_stats();
    println!(
        "{name:<26} {:<6} {:>8} {:>8} {:>8}",
        if eager { "eager" } else { "lazy" },
        after.page_flushes - before.page_flushes,
        after.range_flushes - before.range_flushes,
        after.full_flushes - before.full_flushes,
    );
}

fn main() {
    println!("{ROUNDS} rounds per scenario, then one purge; flushes counted by the simulated TLB");
    println!(
        "{:<26} {:<6} {:>8} {:>8} {:>8}",
        "scenario", "mode", "page", "range", "full"
    );
    for eager in [false, true] {
        count("fix_size_alloc_1", eager, |vm, _| fix_size_alloc(vm, 1));
        count("fix_size_alloc_64", eager, |vm, _| fix_size_alloc(vm, 64));
        count("full_fit_alloc_10_pairs", eager, |vm, _| {
            full_fit_alloc(vm, 10)
        });
        count("random_size_alloc", eager, random_size_alloc);
        count("fix_align_alloc", eager, |vm, _| fix_align_alloc(vm));
        count("random_size_align_alloc", eager, random_size_align_alloc);
        count("align_shift_alloc", eager, |vm, _| {
            align_shift_alloc(vm);
        });
        count("vm_map_ram_64", eager, |vm, _| {
            let lent = frames_for_vmap(vm.frames(), 64);
            vm_map_ram(vm, &lent);
            vm.frames().free_frames(&lent).unwrap();
        });
    }
}
