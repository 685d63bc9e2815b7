//! TLB flushes of each kind per `lib/test_vmalloc.c` scenario, lazy against eager, and
//! the shootdowns and IPIs the same scenarios cost on 2 and 4 simulated CPUs (the
//! table in the README, which `tests/readme.rs` compares with this one):
//! `cargo run --release --example flush_counts`.

use vmalloc_sim::scenarios::*;

fn flushes(which: usize, eager: bool) {
    let machine = machine();
    let frames = fragmented_frames(&machine);
    // SAFETY: the machine's page tables serve this manager alone, and its flush reaches every CPU that runs.
    let vm = unsafe { manager(&machine, &frames, eager) };
    let before = machine.tlb_stats();
    run_rounds(which, &vm);
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
    println!("The same through a Shootdown on 2 and 4 CPUs: shootdowns (each one local flush");
    println!("plus one IPI per other online CPU, the same at every CPU count) and IPIs sent");
    println!();
    print!("{}", shootdown_table());
}
