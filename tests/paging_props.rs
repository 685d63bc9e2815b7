//! Random map / unmap / protect / detach / reclaim / free-empty-tables sequences on a
//! window of pages that crosses 2 MiB and 1 GiB boundaries, checked after every step
//! against a model: a map from page to (frame, flags) or detached frame.

use proptest::prelude::*;
use std::collections::BTreeMap;
use vmalloc::paging::PageTables;
use vmalloc::tlb::CountingFlush;
use vmalloc::{Error, FrameSource, OffsetPhysMemory};
use vmalloc_sim::{SimConfig, SimFrames, SimMachine};
use x86_64::VirtAddr;
use x86_64::structures::paging::mapper::MappedFrame;
use x86_64::structures::paging::page::PageRange;
use x86_64::structures::paging::{Page, PageTableFlags, PhysFrame};

/// The test's tables are walked by no CPU: flushing is only counted.
static NO_TLB: CountingFlush = CountingFlush::new();

/// 600 pages below a 1 GiB boundary in the kernel half.
const WINDOW_START: u64 = 0xffff_c900_4000_0000 - 600 * 4096;
const WINDOW: u64 = 1200;
const FLAG_CHOICES: [PageTableFlags; 4] = [
    PageTableFlags::WRITABLE,
    PageTableFlags::NO_EXECUTE,
    PageTableFlags::WRITABLE.union(PageTableFlags::USER_ACCESSIBLE),
    PageTableFlags::empty(),
];

#[derive(Debug, Clone, Copy)]
enum Op {
    Map(u64, u64, usize),
    Unmap(u64, u64),
    Protect(u64, u64, usize),
    Detach(u64, u64),
    Reclaim(u64, u64),
    FreeEmptyTables(u64, u64),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Model {
    Mapped(PhysFrame, PageTableFlags),
    Detached(PhysFrame),
}

fn span() -> impl Strategy<Value = (u64, u64)> {
    (0..WINDOW).prop_flat_map(|start| (Just(start), 0..=(WINDOW - start).min(700)))
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (span(), 0..FLAG_CHOICES.len()).prop_map(|((s, n), f)| Op::Map(s, n, f)),
        2 => span().prop_map(|(s, n)| Op::Unmap(s, n)),
        1 => (span(), 0..FLAG_CHOICES.len()).prop_map(|((s, n), f)| Op::Protect(s, n, f)),
        1 => span().prop_map(|(s, n)| Op::Detach(s, n)),
        1 => span().prop_map(|(s, n)| Op::Reclaim(s, n)),
        1 => span().prop_map(|(s, n)| Op::FreeEmptyTables(s, n)),
    ]
}

fn addr(index: u64) -> u64 {
    WINDOW_START + index * 4096
}

fn range(start: u64, len: u64) -> PageRange {
    let page = |i| Page::containing_address(VirtAddr::new(addr(i)));
    Page::range(page(start), page(start + len))
}

struct World {
    pool: SimFrames,
    tables: PageTables<OffsetPhysMemory>,
    model: BTreeMap<u64, Model>,
    start_free: u64,
    // Declared last: dropped after the tables that point into it.
    machine: SimMachine,
}

impl World {
    fn new(seed: u64) -> Self {
        let machine = SimMachine::new(SimConfig::new(16 << 20).with_scatter_seed(seed));
        let pool = machine.frames();
        // SAFETY: the machine's memory lives at this offset for as long as `machine`,
        // which the world owns and drops last.
        let phys = unsafe { OffsetPhysMemory::new(machine.phys_offset()) };
        // SAFETY: the machine's root is a zeroed PML4 that nothing else uses.
        let tables = unsafe { PageTables::new(machine.root(), phys) };
        Self {
            start_free: pool.stats().free,
            pool,
            tables,
            model: BTreeMap::new(),
            machine,
        }
    }

    /// `n` frames from the machine.
    fn take(&self, n: usize) -> Vec<PhysFrame> {
        (0..n).map(|_| self.pool.alloc_frame().unwrap()).collect()
    }

    /// Frames handed out and not given back.
    fn out(&self) -> u64 {
        self.start_free - self.pool.stats().free
    }

    /// What the model expects: the error of the first page of `[start, start + len)`
    /// that fails `ok`.
    fn expect(
        &self,
        start: u64,
        len: u64,
        ok: impl Fn(Option<&Model>) -> Result<(), Error>,
    ) -> Result<(), Error> {
        (start..start + len).try_for_each(|i| ok(self.model.get(&i)))
    }

    /// The model's frames of `[start, start + len)`, removed if `remove`.
    fn frames(&mut self, start: u64, len: u64, remove: bool) -> Vec<PhysFrame> {
        let frames = (start..start + len)
            .map(|i| frame_of(self.model.get(&i).copied()))
            .collect();
        if remove {
            (start..start + len).for_each(|i| _ = self.model.remove(&i));
        }
        frames
    }

    fn apply(&mut self, op: Op) -> Result<(), TestCaseError> {
        let before = self.model.clone();
        let (result, expected) = match op {
            Op::Map(s, n, f) => {
                let expected =
                    self.expect(s, n, |m| m.map_or(Ok(()), |_| Err(Error::AlreadyMapped)));
                let frames = self.take(n as usize);
                let flags = FLAG_CHOICES[f];
                // SAFETY: the test pool's frames, in tables no CPU walks.
                let result = unsafe {
                    self.tables
                        .map(range(s, n), frames.iter().copied(), flags, &self.pool)
                };
                if result.is_ok() {
                    for (i, frame) in (s..).zip(&frames) {
                        let leaf = Model::Mapped(*frame, flags | PageTableFlags::PRESENT);
                        self.model.insert(i, leaf);
                    }
                } else {
                    // SAFETY: frames the test took and no longer uses (or a bad free, refused).
                    unsafe { self.pool.free_frames(&frames) }.unwrap();
                }
                (result, expected)
            }
            Op::Unmap(s, n) => {
                let expected = self.expect(s, n, present);
                let mut handed = Vec::new();
                // SAFETY: no CPU walks these tables or caches their translations.
                let result = unsafe { self.tables.unmap(range(s, n), |p, f| handed.push((p, f))) };
                let result = result.map(|flush| flush.flush(&NO_TLB));
                if result.is_ok() {
                    let pages = range(s, n);
                    let want: Vec<_> = pages.zip(self.frames(s, n, true)).collect();
                    prop_assert_eq!(&handed, &want);
                    let frames: Vec<_> = handed.iter().map(|(_, f)| *f).collect();
                    // SAFETY: frames the test took and no longer uses (or a bad free, refused).
                    unsafe { self.pool.free_frames(&frames) }.unwrap();
                }
                (result, expected)
            }
            Op::Protect(s, n, f) => {
                let expected = self.expect(s, n, present);
                let flags = FLAG_CHOICES[f];
                // SAFETY: as for `unmap`.
                let result = unsafe { self.tables.protect(range(s, n), flags) };
                let result = result.map(|flush| flush.flush(&NO_TLB));
                if result.is_ok() {
                    for (i, frame) in (s..).zip(self.frames(s, n, false)) {
                        let leaf = Model::Mapped(frame, flags | PageTableFlags::PRESENT);
                        self.model.insert(i, leaf);
                    }
                }
                (result, expected)
            }
            Op::Detach(s, n) => {
                let expected = self.expect(s, n, present);
                // SAFETY: as for `unmap`.
                let result = unsafe { self.tables.detach(range(s, n)) };
                let result = result.map(|flush| flush.flush(&NO_TLB));
                if result.is_ok() {
                    for (i, frame) in (s..).zip(self.frames(s, n, false)) {
                        self.model.insert(i, Model::Detached(frame));
                    }
                }
                (result, expected)
            }
            Op::Reclaim(s, n) => {
                let expected = self.expect(s, n, |m| match m {
                    Some(Model::Detached(_)) => Ok(()),
                    Some(Model::Mapped(..)) => Err(Error::AlreadyMapped),
                    None => Err(Error::NotMapped),
                });
                let mut handed = Vec::new();
                // SAFETY: as for `unmap`.
                let result = unsafe {
                    self.tables
                        .reclaim_detached(range(s, n), |_, f| handed.push(f))
                };
                if result.is_ok() {
                    prop_assert_eq!(&handed, &self.frames(s, n, true));
                    // SAFETY: frames the test took and no longer uses (or a bad free, refused).
                    unsafe { self.pool.free_frames(&handed) }.unwrap();
                }
                (result, expected)
            }
            Op::FreeEmptyTables(s, n) => {
                let mut unlinked = Vec::new();
                let result = self
                    .tables
                    .free_empty_tables(range(s, n), |frame| unlinked.push(frame));
                // SAFETY: frames the test took and no longer uses (or a bad free, refused).
                unsafe { self.pool.free_frames(&unlinked) }.unwrap();
                (result.map(|(_, flush)| flush.flush(&NO_TLB)), Ok(()))
            }
        };
        prop_assert_eq!(result, expected, "{:?}", op);
        if result.is_err() {
            prop_assert_eq!(&self.model, &before, "a failed call changed the model");
        }
        self.check()
    }

    /// Every page of the window translates as the model says.
    fn check(&self) -> Result<(), TestCaseError> {
        for i in 0..WINDOW {
            let got = self.tables.translate(VirtAddr::new(addr(i)));
            match (self.model.get(&i), got) {
                (
                    Some(Model::Mapped(frame, flags)),
                    Ok((phys, got_flags, MappedFrame::Size4KiB(f))),
                ) => {
                    let want = (frame.start_address(), *flags, *frame);
                    prop_assert_eq!((phys, got_flags, f), want, "page {}", i);
                }
                (Some(Model::Detached(_)) | None, Err(Error::NotMapped)) => {}
                (want, got) => {
                    prop_assert!(false, "page {}: model {:?}, tables {:?}", i, want, got)
                }
            }
        }
        Ok(())
    }
}

fn present(m: Option<&Model>) -> Result<(), Error> {
    match m {
        Some(Model::Mapped(..)) => Ok(()),
        _ => Err(Error::NotMapped),
    }
}

fn frame_of(m: Option<Model>) -> PhysFrame {
    match m {
        Some(Model::Mapped(f, _) | Model::Detached(f)) => f,
        None => panic!("the model has no frame there"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn page_tables_follow_the_model(seed in any::<u64>(), ops in prop::collection::vec(op(), 1..30)) {
        let mut world = World::new(seed);
        for op in ops {
            world.apply(op)?;
        }
        // Tear down: every page detached, reclaimed, every table below the root freed:
        // only the PDPT under the window's root entry (root entries never change once
        // made) is left out of the pool.
        let mapped: Vec<u64> = world
            .model
            .iter()
            .filter(|(_, m)| matches!(m, Model::Mapped(..)))
            .map(|(i, _)| *i)
            .collect();
        for i in mapped {
            world.apply(Op::Detach(i, 1))?;
        }
        let detached: Vec<u64> = world.model.keys().copied().collect();
        for i in detached {
            world.apply(Op::Reclaim(i, 1))?;
        }
        world.apply(Op::FreeEmptyTables(0, WINDOW))?;
        let root = world.machine.frame_bytes(world.tables.root());
        let slot = ((WINDOW_START >> 39) as usize & 511) * 8;
        let root_entry = u64::from_le_bytes(root[slot..slot + 8].try_into().unwrap());
        prop_assert_eq!(world.out(), u64::from(root_entry != 0));
    }
}
