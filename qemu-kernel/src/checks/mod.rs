//! The check suite and its runner.
//!
//! A check is a `fn(&mut Ctx) -> Result<(), &'static str>` listed in [`CHECKS`]. The
//! runner prints `check <name> ... ok` or `check <name> ... FAILED: <why>` for each,
//! then `checks: N passed, M failed`, and the kernel exits with success only if all
//! passed. Between checks the scratch window is emptied. A check that panics or takes
//! an unexpected exception ends the run with failure (its line stays unfinished).

mod boot;
mod edges;
mod faults;
mod guarded;
mod heap;
mod infra;
mod irq;
mod library;
mod mappings;
mod oracle;
mod poison;
mod shootdown;
mod smp;

pub use irq::timer_tick;
pub use shootdown::serve_ipi as serve_check_shootdown;

use crate::multiboot::BootInfo;
use crate::paging::{ScratchWindow, TEST_FRAME_COUNT};
use crate::println;
use core::ops::Range;
use vmalloc::OffsetPhysMemory;
use vmalloc::vmalloc::VmallocConfig;
use x86_64::structures::paging::PhysFrame;
use x86_64::{PhysAddr, VirtAddr};

/// What a check may use.
pub struct Ctx {
    /// The multiboot info: command line, firmware map, and the memory map with the
    /// kernel's own memory reserved (ready for a frame allocator).
    pub boot: BootInfo,
    /// All physical memory, at [`PHYS_OFFSET`](crate::paging::PHYS_OFFSET).
    pub phys: OffsetPhysMemory,
    /// End of the physical range the physical map covers (at least 4 GiB).
    pub physmap_end: PhysAddr,
    /// Physical (= virtual) range of the kernel image.
    pub kernel_image: Range<PhysAddr>,
    /// The active PML4 (CR3).
    pub pml4: PhysFrame,
    /// Hand-made 4 KiB mappings for testing page-table flags.
    pub scratch: ScratchWindow,
    /// Frames inside the kernel image, reserved for checks (identity-mapped too).
    pub test_frames: [PhysFrame; TEST_FRAME_COUNT],
}

/// A check: `Ok` or why it failed.
pub type Check = fn(&mut Ctx) -> Result<(), &'static str>;

/// Every check, in the order they run.
pub const CHECKS: &[(&str, Check)] = &[
    ("memory_map", infra::memory_map),
    ("address_space", infra::address_space),
    ("fault_probe_read", infra::fault_probe_read),
    (
        "fault_probe_write_readonly",
        infra::fault_probe_write_readonly,
    ),
    ("fault_probe_exec_nx", infra::fault_probe_exec_nx),
    ("apic_version", infra::apic_version),
    ("frame_allocator", library::frame_allocator),
    ("vmalloc_large", library::vmalloc_large),
    ("vzalloc_zeroed", library::vzalloc_zeroed),
    (
        "no_frame_reused_before_purge",
        library::no_frame_reused_before_purge,
    ),
    ("use_after_free_faults", faults::use_after_free_faults),
    ("guard_page_faults", faults::guard_page_faults),
    ("vmalloc_huge", mappings::vmalloc_huge),
    ("readonly_write_faults", faults::readonly_write_faults),
    ("nx_faults", faults::nx_faults),
    ("second_address_space", mappings::second_address_space),
    ("ioremap_apic", mappings::ioremap_apic),
    ("qemu_walk_agrees", oracle::qemu_walk_agrees),
    ("heap_global_alloc", heap::heap_global_alloc),
    (
        "info_listing_under_global_heap",
        heap::info_listing_under_global_heap,
    ),
    ("stress", library::stress),
    ("kernel_stack_overflow", faults::kernel_stack_overflow),
    ("set_prot_tree_area", edges::set_prot_tree_area),
    ("vzalloc_block_zeroed", edges::vzalloc_block_zeroed),
    ("stack_cache_reuse", edges::stack_cache_reuse),
    ("huge_split_keeps_nx", edges::huge_split_keeps_nx),
    (
        "frame_double_free_refused",
        edges::frame_double_free_refused,
    ),
    ("vrealloc_regrow_zeroed", edges::vrealloc_regrow_zeroed),
    ("heap_overaligned", edges::heap_overaligned),
    ("heap_guarded_faults", guarded::heap_guarded_faults),
    ("smp_cpus_online", smp::smp_cpus_online),
    ("smp_stress", smp::smp_stress),
    (
        "smp_stale_translation_faults",
        smp::smp_stale_translation_faults,
    ),
    (
        "smp_local_only_flush_is_caught",
        smp::smp_local_only_flush_is_caught,
    ),
    (
        "smp_freed_frame_poison_unseen",
        poison::smp_freed_frame_poison_unseen,
    ),
    (
        "smp_poison_seen_with_local_only_flush",
        poison::smp_poison_seen_with_local_only_flush,
    ),
    (
        "smp_shootdown_acks_after_flush",
        shootdown::smp_shootdown_acks_after_flush,
    ),
    (
        "smp_shootdown_nested_acks_after_flush",
        shootdown::smp_shootdown_nested_acks_after_flush,
    ),
    (
        "smp_early_ack_is_caught",
        shootdown::smp_early_ack_is_caught,
    ),
    ("smp_crossing_purges", smp::smp_crossing_purges),
    ("smp_heap", smp::smp_heap),
    ("smp_irq_storm", irq::smp_irq_storm),
    ("recursive_window_manager", boot::recursive_window_manager),
];

/// Lines a check leaves for the log, printed after its result line (a line printed
/// while it runs would split its `check <name> ... <result>` line).
static NOTES: spin::Mutex<alloc::string::String> = spin::Mutex::new(alloc::string::String::new());

/// Leaves `line` for the log, printed indented after the running check's result.
pub fn note(line: core::fmt::Arguments<'_>) {
    use core::fmt::Write;
    let mut notes = NOTES.lock();
    let _ = writeln!(notes, "    {line}");
}

/// Runs every check; true if all passed.
pub fn run_all(ctx: &mut Ctx) -> bool {
    println!("checks: running {}", CHECKS.len());
    let mut failed = 0;
    for (name, check) in CHECKS {
        crate::print!("check {name} ... ");
        match check(ctx) {
            Ok(()) => println!("ok"),
            Err(why) => {
                println!("FAILED: {why}");
                failed += 1;
            }
        }
        let notes = core::mem::take(&mut *NOTES.lock());
        crate::print!("{notes}");
        ctx.scratch.unmap_all();
    }
    println!(
        "checks: {} passed, {} failed",
        CHECKS.len() - failed,
        failed
    );
    failed == 0
}

/// `Ok` if `condition`, else `Err(why)`: keeps checks a list of plain conditions.
pub fn ensure(condition: bool, why: &'static str) -> Result<(), &'static str> {
    if condition { Ok(()) } else { Err(why) }
}

/// The top-level (512 GiB) slots, above the boot manager's region and below the
/// scratch window, where checks make managers of their own: one slot each, so no
/// CPU's paging-structure caches still hold tables of a manager dropped earlier.
#[derive(Clone, Copy)]
#[repr(u64)]
pub enum SpareSlot {
    LocalOnlyFlush,
    LocalOnlyFlushCpuCaches,
    StackCacheOther,
    PoisonShootdown,
    PoisonShootdownCpuCaches,
    PoisonLocalOnly,
    PoisonLocalOnlyCpuCaches,
    ShootdownAckAfterFlush,
    ShootdownNestedAck,
    ShootdownEarlyAck,
    ShootdownUnrelated,
}

/// A one-slot region at `slot` for a manager a check makes and drops.
pub fn spare_region(slot: SpareSlot, cpu_caches: bool) -> VmallocConfig {
    const FIRST: u64 = 0xffff_f000_0000_0000;
    VmallocConfig {
        start: VirtAddr::new(FIRST + ((slot as u64) << 39)),
        size: 1 << 39,
        cpu_caches,
        ..VmallocConfig::default()
    }
}
