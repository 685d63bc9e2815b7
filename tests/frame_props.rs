//! Random operation sequences against a model of the held frames.

use proptest::prelude::*;
use std::collections::BTreeSet;
use vmalloc::Error;
use vmalloc::frame::*;
use x86_64::PhysAddr;
use x86_64::structures::paging::PhysFrame;

const FRAME: u64 = 4096;

fn frame(number: u64) -> PhysFrame {
    PhysFrame::containing_address(PhysAddr::new(number * FRAME))
}

fn number(frame: PhysFrame) -> u64 {
    frame.start_address().as_u64() / FRAME
}

/// Three zones, one with a reserved hole, and unaligned ends: about 1000 frames.
fn memory_map() -> Vec<MemoryRegion> {
    vec![
        MemoryRegion::usable(0, 300 * FRAME + 17),
        MemoryRegion::reserved(100 * FRAME + 5, 110 * FRAME),
        MemoryRegion::usable(1 << 32, (1 << 32) + 500 * FRAME),
        MemoryRegion::usable((1 << 45) + 100, (1 << 45) + 220 * FRAME),
    ]
}

#[derive(Debug, Clone)]
enum Op {
    Alloc,
    AllocFrom(u64),
    AllocBulk(usize),
    Free(usize),
    DoubleFree(usize),
    FreeBulk(usize),
    FreeBulkWithDuplicate(usize),
    FreeUnmanaged(u64),
    Contiguous(u64, u32),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => Just(Op::Alloc),
        2 => any::<u64>().prop_map(|n| Op::AllocFrom(n % (1 << 34))),
        3 => (0usize..200).prop_map(Op::AllocBulk),
        3 => any::<usize>().prop_map(Op::Free),
        1 => any::<usize>().prop_map(Op::DoubleFree),
        2 => (0usize..150).prop_map(Op::FreeBulk),
        1 => (1usize..20).prop_map(Op::FreeBulkWithDuplicate),
        1 => any::<u64>().prop_map(Op::FreeUnmanaged),
        2 => ((1u64..80), (0u32..8)).prop_map(|(count, shift)| Op::Contiguous(count, shift)),
    ]
}

struct Harness<'a> {
    alloc: BitmapFrameAllocator<'a>,
    held: BTreeSet<u64>,
    freed: Vec<u64>,
}

impl Harness<'_> {
    fn hold(&mut self, frame: PhysFrame) {
        assert!(
            self.held.insert(number(frame)),
            "{frame:?} handed out twice"
        );
        assert_eq!(self.alloc.is_free(frame), Ok(false));
    }

    fn nth_held(&self, index: usize) -> Option<u64> {
        let len = self.held.len();
        (len > 0).then(|| *self.held.iter().nth(index % len).unwrap())
    }

    /// Runs a call that must be refused and checks it changed nothing.
    fn refused(
        &mut self,
        expected: Error,
        call: impl FnOnce(&mut BitmapFrameAllocator) -> Result<(), Error>,
    ) {
        let before = self.alloc.stats();
        assert_eq!(call(&mut self.alloc), Err(expected));
        assert_eq!(self.alloc.stats(), before);
        for &held in &self.held {
            assert_eq!(self.alloc.is_free(frame(held)), Ok(false));
        }
    }

    fn apply(&mut self, op: Op) {
        match op {
            Op::Alloc => match self.alloc.alloc() {
                Some(f) => self.hold(f),
                None => assert_eq!(self.alloc.stats().free, 0),
            },
            Op::AllocFrom(hint) => match self.alloc.alloc_from(frame(hint)) {
                Some(f) => self.hold(f),
                None => assert_eq!(self.alloc.stats().free, 0),
            },
            Op::AllocBulk(count) => {
                let free = self.alloc.stats().free;
                let mut out = vec![frame(0); count];
                let got = self.alloc.alloc_bulk(&mut out);
                assert_eq!(got as u64, free.min(count as u64));
                out[..got].iter().for_each(|f| self.hold(*f));
            }
            Op::Free(index) => {
                if let Some(n) = self.nth_held(index) {
                    // SAFETY: frames the test took and no longer uses (or a bad free, refused).
                    unsafe { self.alloc.free(frame(n)) }.unwrap();
                    self.held.remove(&n);
                    self.freed.push(n);
                }
            }
            Op::DoubleFree(index) => {
                let candidate =
                    (!self.freed.is_empty()).then(|| self.freed[index % self.freed.len()]);
                if let Some(n) = candidate.filter(|n| !self.held.contains(n)) {
                    // SAFETY: frames the test took and no longer uses (or a bad free, refused).
                    self.refused(Error::FrameNotAllocated, |a| unsafe { a.free(frame(n)) });
                }
            }
            Op::FreeBulk(count) => {
                let chosen: Vec<u64> = self.held.iter().copied().take(count).collect();
                let frames: Vec<PhysFrame> = chosen.iter().map(|n| frame(*n)).collect();
                // SAFETY: frames the test took and no longer uses (or a bad free, refused).
                unsafe { self.alloc.free_bulk(&frames) }.unwrap();
                for n in chosen {
                    self.held.remove(&n);
                    self.freed.push(n);
                }
            }
            Op::FreeBulkWithDuplicate(count) => {
                let mut frames: Vec<PhysFrame> =
                    self.held.iter().take(count).map(|n| frame(*n)).collect();
                if let Some(&first) = frames.first() {
                    frames.push(first);
                    // SAFETY: frames the test took and no longer uses (or a bad free, refused).
                    self.refused(Error::FrameNotAllocated, |a| unsafe {
                        a.free_bulk(&frames)
                    });
                }
            }
            Op::FreeUnmanaged(raw) => {
                // Just past a zone, in the reserved hole, far beyond, or anywhere.
                let n = [300, 105, (1 << 20) + 500, raw % (1 << 40)][(raw % 4) as usize];
                if self.alloc.is_free(frame(n)).is_err() {
                    // SAFETY: frames the test took and no longer uses (or a bad free, refused).
                    self.refused(Error::FrameNotManaged, |a| unsafe { a.free(frame(n)) });
                }
            }
            Op::Contiguous(count, shift) => {
                let align = 1u64 << shift;
                let before = self.alloc.stats();
                match self.alloc.alloc_contiguous(count, align) {
                    Ok(first) => {
                        assert_eq!(number(first) % align, 0);
                        (0..count).for_each(|i| self.hold(frame(number(first) + i)));
                    }
                    Err(error) => {
                        assert_eq!(error, Error::OutOfFrames);
                        assert_eq!(self.alloc.stats(), before);
                    }
                }
            }
        }
    }

    fn check(&self) {
        let stats = self.alloc.stats();
        assert_eq!(stats.total, stats.free + stats.used);
        assert_eq!(stats.used, self.held.len() as u64);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn random_sequences_match_the_model(ops in prop::collection::vec(op(), 1..120)) {
        let map = memory_map();
        let mut storage = vec![0; BitmapFrameAllocator::storage_words(map.clone())];
        let alloc = BitmapFrameAllocator::with_storage(map, &mut storage).unwrap();
        let mut harness = Harness { alloc, held: BTreeSet::new(), freed: Vec::new() };
        for op in ops {
            harness.apply(op);
            harness.check();
        }
        // Everything still held comes back, and then all of memory can be taken again.
        let held: Vec<PhysFrame> = harness.held.iter().map(|n| frame(*n)).collect();
        // SAFETY: frames the test took and no longer uses (or a bad free, refused).
        unsafe { harness.alloc.free_bulk(&held) }.unwrap();
        let total = harness.alloc.stats().total;
        let mut out = vec![frame(0); total as usize + 1];
        prop_assert_eq!(harness.alloc.alloc_bulk(&mut out) as u64, total);
        prop_assert_eq!(out[..total as usize].iter().collect::<BTreeSet<_>>().len() as u64, total);
    }
}
