//! The global heap's guarded pool (KFENCE) on the real MMU: an overrun, an underrun
//! and a use after free of sampled `Box`es fault, the page-fault handler recovers
//! them (through the probes' exception-table fixups), and the heap's diagnosis of
//! each is printed and names the object.

use super::library::{Outcome, PAGE};
use super::{Ctx, ensure};
use crate::fault::{Fault, probe_read, probe_write};
use crate::mm;
use alloc::boxed::Box;
use alloc::format;
use vmalloc::heap::guarded::GuardedFault;
use x86_64::VirtAddr;

/// 24 bytes, 8-aligned: the object a sampled allocation places against its page's
/// end (an overrun's first word past it is on the guard page) or start.
type Object = [u64; 3];
const SIZE: usize = size_of::<Object>();

/// The global heap's diagnosis of `fault`, logged as an oops would print it; `Err`
/// if the probe did not fault or the heap does not explain it.
fn diagnose(
    probe: Result<u64, Fault>,
) -> Result<vmalloc::heap::guarded::HeapFaultDiagnosis, &'static str> {
    let fault = probe.err().ok_or("the access did not fault")?;
    let diagnosis = mm::HEAP
        .diagnose_fault(fault.addr, fault.code)
        .ok_or("the fault is not in the guarded pool")?;
    super::note(format_args!(
        "page fault at {:#x}: {diagnosis}",
        fault.addr.as_u64()
    ));
    Ok(diagnosis)
}

/// Three boxes sampled into the guarded pool (every allocation sampled while they
/// are made, then sampling off again): one against its page's end is overrun by a
/// write 8 bytes past it, one against its page's start underrun by a read 8 bytes
/// before it, and one read after it is dropped. Each access faults and
/// `diagnose_fault` names the object, the distance or offset, and (for the use after
/// free) that it was freed; the pool gives every page back.
pub fn heap_guarded_faults(_ctx: &mut Ctx) -> Outcome {
    let heap = &mm::HEAP;
    let before = heap.guarded_stats();
    heap.set_sample_interval(1);
    let boxes = [
        Box::new([1u64; 3]),
        Box::new([2u64; 3]),
        Box::new([3u64; 3]),
    ];
    heap.set_sample_interval(0);
    let addrs = boxes.each_ref().map(|object| &raw const **object as usize);
    ensure(
        addrs.iter().all(|&at| heap.is_guarded(at as *const u8)),
        "a box made with sampling at 1 is not in the guarded pool",
    )?;
    ensure(
        boxes
            .iter()
            .enumerate()
            .all(|(index, object)| **object == [index as u64 + 1; 3]),
        "a guarded box does not hold what was written",
    )?;
    let at_end = addrs
        .iter()
        .position(|&at| (at + SIZE).is_multiple_of(PAGE))
        .ok_or("no box sits against its page's end")?;
    let at_start = addrs
        .iter()
        .position(|&at| at.is_multiple_of(PAGE))
        .ok_or("no box sits against its page's start")?;
    let freed = 3 - at_end - at_start;

    // SAFETY: the guard page after the box, never mapped: the write faults.
    let overrun = unsafe { probe_write(VirtAddr::new((addrs[at_end] + SIZE + 8) as u64), 0) };
    let overrun = diagnose(overrun.map(|()| 0))?;
    ensure(
        matches!(overrun.fault, GuardedFault::PastEnd { object, distance: 8 }
            if object.addr == addrs[at_end] && object.size == SIZE),
        "the overrun is not charged to its box, 8 bytes past it",
    )?;
    ensure(
        format!("{overrun}")
            .starts_with("out-of-bounds write past the end of a 24-byte heap object"),
        "the overrun's diagnosis does not say so",
    )?;

    // SAFETY: the guard page before the box, never mapped: the read faults.
    let underrun = unsafe { probe_read(VirtAddr::new((addrs[at_start] - 8) as u64)) };
    let underrun = diagnose(underrun)?;
    ensure(
        matches!(underrun.fault, GuardedFault::BeforeStart { object, distance: 8 }
            if object.addr == addrs[at_start] && object.size == SIZE),
        "the underrun is not charged to its box, 8 bytes before it",
    )?;

    let [first, second, third] = boxes;
    let mut boxes = [Some(first), Some(second), Some(third)];
    drop(boxes[freed].take());
    // SAFETY: the freed box's page, unmapped (every CPU flushed) by the free.
    let after_free = unsafe { probe_read(VirtAddr::new((addrs[freed] + 8) as u64)) };
    let after_free = diagnose(after_free)?;
    ensure(
        matches!(after_free.fault, GuardedFault::UseAfterFree { object, offset: 8 }
            if object.addr == addrs[freed] && object.free.is_some()),
        "the use after free is not charged to the freed box at offset 8",
    )?;
    ensure(
        format!("{after_free}").starts_with("use after free: read of a 24-byte heap object"),
        "the use after free's diagnosis does not say so",
    )?;
    drop(boxes);
    let after = heap.guarded_stats();
    ensure(
        after.live == before.live && after.reports == before.reports,
        "the pool kept an object or found a corrupted slack",
    )
}
