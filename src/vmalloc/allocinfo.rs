//! Memory per allocation site: Linux's `/proc/allocinfo` for vmalloc areas.
//!
//! Every area records the `file:line` of the call that made it (`#[track_caller]`,
//! [`AreaInfo::caller`]). [`Vmalloc::allocinfo`] totals the live areas by that site:
//! bytes of frames they hold and how many there are, largest first, the answer to
//! "who holds the memory" that a kernel prints on demand.
//!
//! The manager allocates nothing, so the caller lends the table the totals go into
//! (`&mut [SiteUsage]`, a `Vec` of [`SiteUsage::EMPTY`] in a kernel with a heap);
//! sites past its length are summed in one "other sites" line. The areas are read as
//! [`Vmalloc::areas`] reads them, a batch under the lock at a time, and the listing
//! is formatted from the caller's table: no lock is held while the caller's
//! formatter runs, so it may allocate (through the kernel heap, which grows through
//! this manager).
//!
//! Counted: areas whose frames the manager allocated (`vmalloc`, reserved windows
//! for what is populated, kernel stacks), not `vmap` and `ioremap` mappings of the
//! caller's memory, nor the per-CPU blocks' zone (its areas are counted one by one).

use super::area::{AreaInfo, AreaKind};
use super::manager::Vmalloc;
use crate::{FrameSource, PAGE_SIZE, PhysMemory, TlbFlush};
use core::fmt;
use core::panic::Location;

/// The live allocations of one site, as a line of `/proc/allocinfo` shows them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SiteUsage {
    /// Where the allocating call was made (`None` in [`SiteUsage::EMPTY`]).
    pub caller: Option<&'static Location<'static>>,
    /// Bytes of frames the site's live areas hold.
    pub bytes: u64,
    /// The site's live areas.
    pub calls: u64,
}

impl SiteUsage {
    /// No site: what a table lent to [`Vmalloc::allocinfo`] starts as.
    pub const EMPTY: SiteUsage = SiteUsage {
        caller: None,
        bytes: 0,
        calls: 0,
    };

    /// Whether `caller` is this line's site.
    fn is(&self, caller: &'static Location<'static>) -> bool {
        self.caller.is_some_and(|mine| same_location(mine, caller))
    }
}

/// Whether two `#[track_caller]` locations are one place: the same static, or the
/// same file, line and column (a location may be emitted once per codegen unit).
pub(crate) fn same_location(a: &Location<'_>, b: &Location<'_>) -> bool {
    core::ptr::eq(a, b)
        || (a.line() == b.line() && a.column() == b.column() && a.file() == b.file())
}

impl Default for SiteUsage {
    fn default() -> Self {
        Self::EMPTY
    }
}

/// A `/proc/allocinfo`-style listing of vmalloc memory per allocation site; see
/// [`Vmalloc::allocinfo`]. Its `Display` prints a header and one line per site,
/// largest first: `bytes calls file:line`.
#[derive(Debug)]
pub struct AllocInfo<'s> {
    sites: &'s [SiteUsage],
    other: SiteUsage,
}

impl<'s> AllocInfo<'s> {
    /// The sites, largest first (by bytes, then by areas).
    pub fn sites(&self) -> &'s [SiteUsage] {
        self.sites
    }

    /// What the sites that did not fit in the table hold together (`caller` is
    /// `None`).
    pub fn other(&self) -> SiteUsage {
        self.other
    }

    /// Bytes and areas of all sites.
    pub fn total(&self) -> (u64, u64) {
        self.sites
            .iter()
            .chain([&self.other])
            .fold((0, 0), |(bytes, calls), site| {
                (bytes + site.bytes, calls + site.calls)
            })
    }
}

/// Adds to the line of `lines[..*used]` that `same` picks with `add`, or to a new line
/// made by `new` after them; false, changing nothing, when the site has no line and
/// none is left.
pub(crate) fn add_site<K: Copy>(
    lines: &mut [K],
    used: &mut usize,
    same: impl Fn(&K) -> bool,
    new: impl FnOnce() -> K,
    add: impl Fn(&mut K),
) -> bool {
    if let Some(line) = lines[..*used].iter_mut().find(|line| same(line)) {
        add(line);
        return true;
    }
    let Some(line) = lines.get_mut(*used) else {
        return false;
    };
    *line = new();
    add(line);
    *used += 1;
    true
}

impl<F, M, T> Vmalloc<F, M, T>
where
    F: FrameSource + Clone,
    M: PhysMemory + Copy,
    T: TlbFlush,
{
    /// Live vmalloc memory totalled per allocation site into `sites` (Linux's
    /// `/proc/allocinfo`), largest first; sites past `sites.len()` are summed in
    /// [`AllocInfo::other`]. The areas are read in batches, the lock held only while
    /// one is copied (see the [module documentation](super::allocinfo)): areas made
    /// or freed meanwhile may or may not be counted, as in a listing.
    pub fn allocinfo<'s>(&self, sites: &'s mut [SiteUsage]) -> AllocInfo<'s> {
        let zone = self.blocks.zone();
        let mut used = 0;
        let mut other = SiteUsage::EMPTY;
        for area in self.areas().filter(|area| counted(area, zone)) {
            let Some(caller) = area.caller else { continue };
            let bytes = area.pages * PAGE_SIZE;
            let add = |line: &mut SiteUsage| {
                line.bytes += bytes;
                line.calls += 1;
            };
            let fitted = add_site(
                sites,
                &mut used,
                |line| line.is(caller),
                || SiteUsage {
                    caller: Some(caller),
                    bytes: 0,
                    calls: 0,
                },
                add,
            );
            if !fitted {
                add(&mut other);
            }
        }
        let sites = &mut sites[..used];
        sites.sort_unstable_by(|a, b| b.bytes.cmp(&a.bytes).then(b.calls.cmp(&a.calls)));
        AllocInfo { sites, other }
    }
}

/// Whether `area` holds memory the manager allocated for a caller: not a mapping of
/// the caller's own memory, nor the per-CPU blocks' zone at `zone`.
fn counted(area: &AreaInfo, zone: u64) -> bool {
    let mapping = matches!(area.kind, AreaKind::Vmap | AreaKind::Ioremap);
    // The zone is a reserved area; the first block's first area starts where it does.
    let is_zone = area.kind == AreaKind::Reserved && zone != 0 && area.start.as_u64() == zone;
    !mapping && !is_zone
}

impl fmt::Display for AllocInfo<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "allocinfo - version: 1.0")?;
        writeln!(f, "#     <size>  <calls> <tag info>")?;
        for site in self.sites {
            write!(f, "{:>12} {:>8} ", site.bytes, site.calls)?;
            match site.caller {
                Some(caller) => writeln!(f, "{}:{}", caller.file(), caller.line())?,
                None => writeln!(f, "?")?,
            }
        }
        if self.other.calls > 0 {
            writeln!(
                f,
                "{:>12} {:>8} (other sites)",
                self.other.bytes, self.other.calls
            )?;
        }
        Ok(())
    }
}
