//! `SimMachine::host_window_prefault` keeps the whole range mapped when it returns
//! `Ok`, even when its own fills push the window past its page budget: a fill that
//! finds the window full evicts the oldest fill's 2 MiB, which may hold pages the
//! same call mapped before. It returned `Ok` over such pages, and the `read` that
//! followed failed with "Bad address". A program on the kernel heap, one thread,
//! reading `/dev/zero` into fresh `Vec` capacity after each prefault.

#![cfg(all(target_os = "linux", target_arch = "x86_64"))]

use vmalloc::heap::{HeapConfig, KernelHeap};
use vmalloc::vmalloc::{Vmalloc, VmallocConfig};
use vmalloc_sim::{RoutedHeap, SimConfig, SimFrames, SimMachine};
use x86_64::VirtAddr;

static HEAP: KernelHeap<'static> = KernelHeap::new(HeapConfig::DEFAULT);

#[global_allocator]
static GLOBAL: RoutedHeap = RoutedHeap::new(&HEAP);

fn build() -> &'static SimMachine {
    let machine: &'static SimMachine = Box::leak(Box::new(SimMachine::new(
        SimConfig::new(1 << 30).with_host_window(64 << 30),
    )));
    let frames: &'static SimFrames = Box::leak(Box::new(machine.frames()));
    let (start, size) = machine.host_window().unwrap();
    let config = VmallocConfig {
        start,
        size,
        ..VmallocConfig::default()
    };
    // SAFETY: the machine's page tables are used by this manager alone.
    let vm = unsafe { Vmalloc::new(config, machine.root(), machine.phys(), frames, machine) };
    HEAP.init(Box::leak(Box::new(vm.unwrap()))).unwrap();
    HEAP.use_cpus(machine);
    // SAFETY: the heap serves this machine's host window.
    unsafe { GLOBAL.route(machine) };
    machine
}

#[test]
fn a_prefaulted_range_stays_mapped_for_the_system_call() {
    use std::os::fd::AsRawFd;
    let machine = build();
    let zero = std::fs::File::open("/dev/zero").unwrap();
    let mut live: Vec<Vec<u8>> = Vec::new();
    let mut failed = Vec::new();
    for round in 0..3000usize {
        let len = [3000usize, 20_000, 100_000, 1 << 20, 40][round % 5] + round;
        // Fresh capacity, nothing written: its pages are not host-mapped yet.
        let mut buffer: Vec<u8> = Vec::with_capacity(len);
        let spare = buffer.spare_capacity_mut().as_mut_ptr().cast::<u8>();
        machine
            .host_window_prefault(VirtAddr::from_ptr(spare), len)
            .unwrap();
        // SAFETY: `spare` holds `len` bytes of the Vec's capacity.
        let got = unsafe { libc::read(zero.as_raw_fd(), spare.cast(), len) };
        if got != len as isize {
            failed.push(round);
        } else {
            // SAFETY: `read` wrote all `len` bytes.
            unsafe { buffer.set_len(len) };
        }
        live.push(buffer);
        if live.len() > 60 {
            live.remove(round % 50);
        }
    }
    assert!(
        failed.is_empty(),
        "reads that met unmapped pages: rounds {failed:?}"
    );
}
