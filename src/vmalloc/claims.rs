//! Which top-level entries the live managers use.
//!
//! Two managers whose regions share a top-level (PML4) entry share the tables below
//! it: each would free, as its own, tables the other maps through, and drop a
//! top-level table the other promised never to change. So [`Vmalloc::new`] claims the
//! region's top-level entries of its root here and refuses a region whose entries a
//! live manager claimed ([`Error::Overlap`]); the drop gives them back. An address
//! space is told by where its root table is reachable ([`PhysMemory::phys_to_virt`]),
//! so managers of different machines on the host never meet. Up to [`CLAIMS`]
//! managers are recorded at once; past that, a new one is not checked.
//!
//! [`Vmalloc::new`]: super::Vmalloc::new
//! [`PhysMemory::phys_to_virt`]: crate::PhysMemory::phys_to_virt

use crate::Error;

/// Live managers recorded at once.
pub const CLAIMS: usize = 64;

/// One manager's top-level entries `first..=last` of the root reached at `space`.
#[derive(Clone, Copy)]
struct Claim {
    space: usize,
    first: usize,
    last: usize,
}

/// Every live manager's claim. Taken only by `new` and the drop, with interrupts
/// held off (the callers'), never from an interrupt handler's own manager calls.
static CLAIMED: spin::Mutex<[Option<Claim>; CLAIMS]> = spin::Mutex::new([None; CLAIMS]);

/// Claims the top-level entries `first..=last` of the root reached at `space`: the
/// record's index, or `None` when every record is taken (not checked then).
///
/// # Errors
///
/// [`Error::Overlap`] if a live manager claimed one of them.
pub(super) fn claim(space: usize, first: usize, last: usize) -> Result<Option<usize>, Error> {
    let mut claimed = CLAIMED.lock();
    let overlaps =
        |claim: &Claim| claim.space == space && claim.first <= last && first <= claim.last;
    if claimed.iter().flatten().any(overlaps) {
        return Err(Error::Overlap);
    }
    let free = claimed.iter().position(Option::is_none);
    if let Some(at) = free {
        claimed[at] = Some(Claim { space, first, last });
    }
    Ok(free)
}

/// Gives back the claim `claim` recorded.
pub(super) fn release(claim: Option<usize>) {
    if let Some(slot) = claim.and_then(|at| CLAIMED.lock().get_mut(at).map(Option::take)) {
        debug_assert!(slot.is_some(), "a claim given back twice");
    }
}
