//! Listings and stats as `/proc/vmallocinfo` and `/proc/meminfo` print them, caller
//! code run without the manager's lock, and threads sharing one manager.

mod common;

use common::vm::*;
use vmalloc::vmalloc::*;
use vmalloc::{Error, FrameSource};
use vmalloc_sim::{DEADLOCK_LIMIT, SimFrames, watchdog};
use x86_64::PhysAddr;
use x86_64::structures::paging::PhysFrame;

#[test]
fn listing_and_stats_read_like_procfs() {
    let machine = machine();
    let frames = machine.frames();
    let vm = manager(&machine, &frames, config(false));
    let tagged = VmOptions {
        tag: "driver_ring",
        ..VmOptions::default()
    };
    let (ptr, line) = (vm.vmalloc_with(4 * 4096, &tagged).unwrap(), line!());
    let listing = std::format!("{}", vm.info());
    // As Linux names the caller, the line names the call that made the area.
    let line = std::format!(
        "{:#018x}-{:#018x}     20480 driver_ring {}:{line} pages=4 vmalloc",
        ptr.as_ptr() as u64,
        ptr.as_ptr() as u64 + 5 * 4096,
        file!()
    );
    let stats = vm.stats();
    // The per-CPU blocks' zone first, as Linux lists its vmap blocks.
    let zone = std::format!(
        "{:#018x}-{:#018x} {} vmap_blocks ",
        VMALLOC_START,
        VMALLOC_START + stats.block_zone_bytes,
        stats.block_zone_bytes
    );
    let lines: Vec<&str> = listing.lines().collect();
    assert_eq!(lines.len(), 2, "{listing}");
    assert!(
        lines[0].starts_with(&zone) && lines[0].ends_with(" reserved"),
        "{listing}"
    );
    assert_eq!(lines[1], line);
    assert_eq!(stats.used, 5 * 4096, "the zone's free space is not used");
    assert_eq!(stats.areas, 1);
    assert_eq!(
        stats.largest_free,
        VMALLOC_SIZE - stats.block_zone_bytes - 5 * 4096
    );
    assert!(std::format!("{stats}").contains("VmallocUsed:            20 kB"));
}

/// A `fmt::Write` sink that calls the manager on every write, as a `String` growing
/// through a heap built on the manager does.
struct CallingSink<'v, 'm> {
    vm: &'v SimVmalloc<'m, &'m SimFrames>,
    text: String,
}

impl core::fmt::Write for CallingSink<'_, '_> {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let ptr = self.vm.vmalloc(4096).map_err(|_| core::fmt::Error)?;
        // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
        unsafe { self.vm.vfree(ptr.as_ptr()) }.map_err(|_| core::fmt::Error)?;
        self.text.push_str(s);
        Ok(())
    }
}

#[test]
fn listings_and_callbacks_run_without_the_lock() {
    let machine = machine();
    let frames = machine.frames();
    let vm = manager(&machine, &frames, config(false));
    let ptrs: Vec<_> = (0..1000).map(|_| vm.vmalloc(4096).unwrap()).collect();

    // Calling the manager between items would deadlock on a held spin lock.
    let mut seen = 0;
    for area in vm.areas().filter(|area| area.tag != "vmap_blocks") {
        assert_eq!(area.kind, AreaKind::Vmalloc);
        vm.stats();
        seen += 1;
    }
    assert_eq!(seen, 1000);

    let mut sink = CallingSink {
        vm: &vm,
        text: String::new(),
    };
    core::fmt::write(&mut sink, format_args!("{}", vm.info())).unwrap();
    assert_eq!(
        sink.text
            .lines()
            .filter(|line| line.ends_with("pages=1 vmalloc"))
            .count(),
        1000
    );

    let mut mine = [PhysFrame::containing_address(PhysAddr::zero()); 3];
    assert_eq!(frames.alloc_frames(&mut mine), 3);
    // SAFETY: frames the test owns, not freed while mapped.
    let mapped = unsafe { vm.vmap(&mine, Prot::KERNEL_RW) }.unwrap();
    let mut back = Vec::new();
    // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
    unsafe {
        vm.vunmap(mapped.as_ptr(), |frame| {
            assert_eq!(vm.vfree(mapped.as_ptr()), Err(Error::NotAllocated));
            back.push(frame);
        })
    }
    .unwrap();
    assert_eq!(back, mine);
    for ptr in ptrs {
        // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
        unsafe { vm.vfree(ptr.as_ptr()) }.unwrap();
    }
}

#[test]
fn threads_share_one_manager() {
    for cpu_caches in [true, false] {
        watchdog("threads_share_one_manager", DEADLOCK_LIMIT, || {
            threads_share_one_manager_with(cpu_caches)
        });
    }
}

fn threads_share_one_manager_with(cpu_caches: bool) {
    {
        let machine = machine();
        let frames = machine.frames();
        let before_manager = free_frames(&frames);
        let vm = manager(
            &machine,
            &frames,
            VmallocConfig {
                lazy_threshold_pages: 64,
                cpu_caches,
                ..config(false)
            },
        );
        let initial = vm.stats();
        let baseline = free_frames(&frames);
        std::thread::scope(|scope| {
            for t in 0..4u8 {
                let (vm, machine) = (&vm, &machine);
                scope.spawn(move || {
                    let mut live = Vec::new();
                    for i in 0..200usize {
                        let pages = 1 + (i * 7 + t as usize) % 9;
                        let ptr = vm.vmalloc(pages * 4096).unwrap();
                        // SAFETY: bytes the test owns: no live Rust value lives there.
                        unsafe { machine.write(addr(ptr), &[t; 64]) }.unwrap();
                        live.push(ptr);
                        if i % 3 != 0 {
                            let victim = live.swap_remove(i % live.len());
                            let mut check = [0; 64];
                            machine.read(addr(victim), &mut check).unwrap();
                            assert_eq!(check, [t; 64], "no other thread wrote into this area");
                            // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
                            unsafe { vm.vfree(victim.as_ptr()) }.unwrap();
                        }
                    }
                    for ptr in live {
                        // SAFETY: nothing uses the area after this; a pointer to no live area is refused.
                        unsafe { vm.vfree(ptr.as_ptr()) }.unwrap();
                    }
                });
            }
        });
        vm.purge();
        let stats = vm.stats();
        assert_eq!((stats.areas, stats.data_frames), (0, 0));
        assert_frames_conserved(&vm, &frames, 0);
        if !cpu_caches {
            // The blocks keep their page tables and cached frames while the manager
            // lives; the tree gives back all but its bookkeeping at once.
            assert_eq!(stats.page_table_frames, initial.page_table_frames);
            assert_eq!(
                free_frames(&frames) + stats.bookkeeping_frames,
                baseline + initial.bookkeeping_frames,
                "every frame is back but the bookkeeping kept"
            );
        }
        drop(vm);
        assert_eq!(
            free_frames(&frames),
            before_manager,
            "the manager kept nothing"
        );
    }
}

/// `vunmap`'s callback runs without the lock and may call the manager: what
/// `stats()` counts there agrees with what `areas()` lists (the area being unmapped
/// is in neither; it was counted, not listed).
#[test]
fn stats_and_the_listing_agree_inside_vunmaps_callback() {
    let machine = vmalloc_sim::SimMachine::new(vmalloc_sim::SimConfig::new(64 << 20));
    let frames = machine.frames();
    // SAFETY: the machine's page tables serve this manager alone.
    let vm = unsafe { vmalloc_sim::scenarios::manager(&machine, &frames, false) };
    let _keep = vm.vmalloc(20 * 4096).unwrap();
    let mut lent = vec![PhysFrame::containing_address(PhysAddr::zero()); 3];
    assert_eq!(frames.alloc_frames(&mut lent), 3);
    // SAFETY: the frames are the test's, used nowhere else.
    let mapped = unsafe { vm.vmap(&lent, Prot::KERNEL_RW) }.unwrap();
    let listed = || vm.areas().filter(|area| area.tag != "vmap_blocks").count() as u64;
    assert_eq!(vm.stats().areas, listed());
    let mut seen = Vec::new();
    // SAFETY: the mapping is not used again.
    unsafe { vm.vunmap(mapped.as_ptr(), |_| seen.push((vm.stats().areas, listed()))) }.unwrap();
    assert_eq!(seen.len(), 3);
    for (counted, listed) in seen {
        assert_eq!(counted, listed, "stats().areas vs areas() inside on_frame");
    }
    assert_eq!(vm.stats().areas, listed());
    // SAFETY: the frames came back through the callback's order; the test's again.
    unsafe { frames.free_frames(&lent) }.unwrap();
}
