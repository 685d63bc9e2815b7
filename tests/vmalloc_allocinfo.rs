//! `Vmalloc::allocinfo`: live vmalloc memory per allocation site, largest first, as
//! Linux's `/proc/allocinfo` shows it, formatted with no lock held.

use std::fmt::{self, Write};
use std::ptr::NonNull;
use vmalloc::PAGE_SIZE;
use vmalloc::vmalloc::{CacheMode, SiteUsage};
use vmalloc_sim::scenarios::manager_over as manager;
use vmalloc_sim::{DEADLOCK_LIMIT, SimConfig, SimMachine, watchdog};
use x86_64::PhysAddr;

const PAGE: usize = PAGE_SIZE as usize;

fn machine() -> SimMachine {
    SimMachine::new(SimConfig::new(64 << 20).with_scatter_seed(4))
}

/// The line `file:line` of this file for `line`.
fn here(line: u32) -> String {
    format!("tests/vmalloc_allocinfo.rs:{line}")
}

#[test]
fn sites_are_totalled_and_listed_largest_first() {
    let machine = machine();
    let frames = machine.frames();
    // SAFETY: the machine's page tables serve this manager alone, and its flush reaches every CPU that runs.
    let vm = unsafe { manager(&machine, &frames) };
    let mut small = Vec::new();
    let mut small_line = 0;
    for _ in 0..3 {
        // One site, three calls: 8 KiB each (per-CPU blocks serve them).
        let (area, line) = (vm.vmalloc(2 * PAGE).unwrap(), line!());
        small.push(area);
        small_line = line;
    }
    let (big, big_line) = (vm.vmalloc(16 * PAGE + 1).unwrap(), line!());
    let window = vm.reserve(64 * PAGE, &Default::default()).unwrap();
    let window_line = line!() - 1;
    // SAFETY: the test's own area: nothing relies on its pages staying unmapped.
    unsafe { vm.populate(window.as_ptr(), 4 * PAGE) }.unwrap();
    // Mappings of memory the manager did not allocate are not counted.
    // SAFETY: a page past the machine's RAM, which nothing uses.
    let mmio =
        unsafe { vm.ioremap(PhysAddr::new(0xfee0_0000), PAGE, CacheMode::Uncached) }.unwrap();

    let mut table = [SiteUsage::EMPTY; 8];
    let info = vm.allocinfo(&mut table);
    let sites: Vec<(String, u64, u64)> = info
        .sites()
        .iter()
        .map(|site| {
            let caller = site.caller.unwrap();
            (
                format!("{}:{}", caller.file(), caller.line()),
                site.bytes,
                site.calls,
            )
        })
        .collect();
    assert_eq!(
        sites,
        [
            (here(big_line), 17 * PAGE as u64, 1),
            (here(small_line), 6 * PAGE as u64, 3),
            (here(window_line), 4 * PAGE as u64, 1),
        ]
    );
    assert_eq!(info.total(), (27 * PAGE as u64, 5));
    let text = info.to_string();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "allocinfo - version: 1.0");
    assert_eq!(
        lines[2],
        format!("{:>12} {:>8} {}", 17 * PAGE, 1, here(big_line))
    );
    assert_eq!(lines.len(), 5, "{text}");

    // Freed areas leave the listing.
    // SAFETY: nothing uses these areas after this.
    unsafe {
        vm.vfree(big.as_ptr()).unwrap();
        small
            .iter()
            .for_each(|area| vm.vfree(area.as_ptr()).unwrap());
        vm.iounmap(mmio.as_ptr()).unwrap();
    }
    let info = vm.allocinfo(&mut table);
    assert_eq!(info.sites().len(), 1);
    assert_eq!(info.sites()[0].caller.unwrap().line(), window_line);
}

#[test]
fn sites_past_the_table_are_summed_in_one_line() {
    let machine = machine();
    let frames = machine.frames();
    // SAFETY: the machine's page tables serve this manager alone, and its flush reaches every CPU that runs.
    let vm = unsafe { manager(&machine, &frames) };
    let _a = vm.vmalloc(PAGE).unwrap();
    let _b = vm.vmalloc(2 * PAGE).unwrap();
    let _c = vm.vmalloc(3 * PAGE).unwrap();
    let mut table = [SiteUsage::EMPTY; 2];
    let info = vm.allocinfo(&mut table);
    assert_eq!(info.sites().len(), 2);
    let other = info.other();
    assert_eq!((other.calls, other.caller), (1, None));
    assert_eq!(info.total(), (6 * PAGE as u64, 3));
    assert!(
        info.to_string()
            .ends_with(&format!("{:>12} {:>8} (other sites)\n", other.bytes, 1)),
        "{info}"
    );
    // An empty table lists nothing but what did not fit.
    let info = vm.allocinfo(&mut []);
    assert_eq!(info.other().calls, 3);
}

/// A table shorter than the sites keeps the largest, whatever order the sites come
/// in, and sums the rest in "other sites": 40 sites (more than one pass of the
/// totals takes) of 1 to 40 pages, shuffled, into a table of 5. (The table kept the
/// first sites met.)
#[test]
fn a_short_table_keeps_the_largest_sites() {
    let machine = SimMachine::new(SimConfig::new(64 << 20));
    let frames = machine.frames();
    // SAFETY: the machine's page tables serve this manager alone, and its flush reaches every CPU that runs.
    let vm = unsafe { manager(&machine, &frames) };
    // Site `i` (its own call below, in order) holds `pages(i)` pages: 1 to 40, shuffled.
    let pages = |i: usize| (i * 17) % 40 + 1;
    let size = |i: usize| pages(i) * PAGE;
    let areas = [
        vm.vmalloc(size(0)),
        vm.vmalloc(size(1)),
        vm.vmalloc(size(2)),
        vm.vmalloc(size(3)),
        vm.vmalloc(size(4)),
        vm.vmalloc(size(5)),
        vm.vmalloc(size(6)),
        vm.vmalloc(size(7)),
        vm.vmalloc(size(8)),
        vm.vmalloc(size(9)),
        vm.vmalloc(size(10)),
        vm.vmalloc(size(11)),
        vm.vmalloc(size(12)),
        vm.vmalloc(size(13)),
        vm.vmalloc(size(14)),
        vm.vmalloc(size(15)),
        vm.vmalloc(size(16)),
        vm.vmalloc(size(17)),
        vm.vmalloc(size(18)),
        vm.vmalloc(size(19)),
        vm.vmalloc(size(20)),
        vm.vmalloc(size(21)),
        vm.vmalloc(size(22)),
        vm.vmalloc(size(23)),
        vm.vmalloc(size(24)),
        vm.vmalloc(size(25)),
        vm.vmalloc(size(26)),
        vm.vmalloc(size(27)),
        vm.vmalloc(size(28)),
        vm.vmalloc(size(29)),
        vm.vmalloc(size(30)),
        vm.vmalloc(size(31)),
        vm.vmalloc(size(32)),
        vm.vmalloc(size(33)),
        vm.vmalloc(size(34)),
        vm.vmalloc(size(35)),
        vm.vmalloc(size(36)),
        vm.vmalloc(size(37)),
        vm.vmalloc(size(38)),
        vm.vmalloc(size(39)),
    ];
    let mut table = [SiteUsage::EMPTY; 5];
    let info = vm.allocinfo(&mut table);
    let listed: Vec<u64> = info
        .sites()
        .iter()
        .map(|site| site.bytes / PAGE as u64)
        .collect();
    assert_eq!(listed, [40, 39, 38, 37, 36]);
    let rest: u64 = (1..=35).sum();
    assert_eq!(
        (info.other().bytes, info.other().calls),
        (rest * PAGE as u64, 35)
    );
    let mut table = [SiteUsage::EMPTY; 64];
    assert_eq!(vm.allocinfo(&mut table).sites().len(), 40);
    for area in areas {
        // SAFETY: made above, freed once.
        unsafe { vm.vfree(area.unwrap().as_ptr()) }.unwrap();
    }
}

/// A `fmt::Write` sink that makes and frees an area for every piece it is given, as
/// a kernel's `String` growing through its heap (which grows through the manager)
/// does.
struct AllocatingSink<'v, 'm> {
    vm: &'v vmalloc_sim::scenarios::Manager<'m>,
    text: String,
}

impl Write for AllocatingSink<'_, '_> {
    fn write_str(&mut self, piece: &str) -> fmt::Result {
        let area: NonNull<u8> = self.vm.vmalloc(PAGE).map_err(|_| fmt::Error)?;
        // SAFETY: nothing uses the area after this.
        unsafe { self.vm.vfree(area.as_ptr()) }.map_err(|_| fmt::Error)?;
        self.text.push_str(piece);
        Ok(())
    }
}

#[test]
fn the_formatter_may_call_the_manager() {
    watchdog("the_formatter_may_call_the_manager", DEADLOCK_LIMIT, || {
        let machine = machine();
        let frames = machine.frames();
        // SAFETY: the machine's page tables serve this manager alone, and its flush reaches every CPU that runs.
        let vm = unsafe { vmalloc_sim::scenarios::manager(&machine, &frames, false) };
        let areas: Vec<_> = (0..40).map(|i| vm.vmalloc((1 + i % 3) * PAGE)).collect();
        let line = line!() - 1;
        let mut table = vec![SiteUsage::EMPTY; 4];
        let mut sink = AllocatingSink {
            vm: &vm,
            text: String::new(),
        };
        write!(sink, "{}", vm.allocinfo(&mut table)).unwrap();
        assert!(sink.text.contains(&here(line)), "{}", sink.text);
        assert!(areas.iter().all(Result::is_ok));
    });
}
