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
use core::cmp::Ordering;
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

/// A line of an allocinfo table: a site and what its live allocations hold.
pub(crate) trait Tally: Copy {
    /// What tells sites apart.
    type Site: Copy;
    /// A line for `site` holding nothing yet.
    fn of(site: Self::Site) -> Self;
    /// The line's site.
    fn site(&self) -> Self::Site;
    /// A total order of sites, `Equal` for one place.
    fn order(a: &Self::Site, b: &Self::Site) -> Ordering;
    /// Counts one more allocation of `bytes`.
    fn add(&mut self, bytes: u64);
    /// Bytes, then allocations: the larger line lists first.
    fn size(&self) -> (u64, u64);
}

/// Sites totalled per pass: sites beyond it wait for another pass.
const SITES_PER_PASS: usize = 32;

/// Totals the allocations `scan` reports (a site and bytes each; it is run once per
/// pass and reads the live allocations anew) per site, and keeps the largest sites
/// in `lines`, sorted largest first: how many, and the bytes and allocations of the
/// sites left out.
///
/// A table lent by the caller holds fewer lines than there may be sites, and nothing
/// here allocates, so the totals come in passes: each pass totals the
/// `SITES_PER_PASS` lowest sites (in [`Tally::order`]) above the last pass's
/// highest. While a pass's batch is full, a lower site met takes the place of its
/// highest, whose count is dropped: the highest only falls, so every site that ends
/// in the batch was counted from the pass's start, and each one left out is above the
/// batch's highest, for a later pass. The table keeps the largest of each pass's
/// sites. One pass when there are no more sites than a batch holds.
pub(crate) fn tally<T: Tally>(
    lines: &mut [T],
    mut scan: impl FnMut(&mut dyn FnMut(T::Site, u64)),
) -> (usize, (u64, u64)) {
    let mut used = 0;
    let mut total = (0u64, 0u64);
    let mut above: Option<T::Site> = None;
    loop {
        let mut batch: [Option<T>; SITES_PER_PASS] = [None; SITES_PER_PASS];
        let mut count = 0;
        let first = above.is_none();
        scan(&mut |site, bytes| {
            if first {
                total = (total.0.saturating_add(bytes), total.1.saturating_add(1));
            }
            if above.is_some_and(|above| T::order(&site, &above).is_le()) {
                return;
            }
            let held = batch[..count].iter_mut().flatten();
            if let Some(line) = held
                .into_iter()
                .find(|line| T::order(&line.site(), &site).is_eq())
            {
                line.add(bytes);
                return;
            }
            let slot = if count < SITES_PER_PASS {
                count += 1;
                count - 1
            } else {
                match highest::<T>(&batch) {
                    Some((index, top)) if T::order(&site, &top).is_lt() => index,
                    _ => return,
                }
            };
            let mut line = T::of(site);
            line.add(bytes);
            batch[slot] = Some(line);
        });
        for line in batch[..count].iter().flatten() {
            keep_largest(lines, &mut used, *line);
        }
        if count < SITES_PER_PASS {
            break;
        }
        above = highest::<T>(&batch).map(|(_, site)| site);
    }
    let lines = &mut lines[..used];
    lines.sort_unstable_by_key(|line| core::cmp::Reverse(line.size()));
    let listed = lines.iter().fold((0u64, 0u64), |sum, line| {
        let (bytes, calls) = line.size();
        (sum.0.saturating_add(bytes), sum.1.saturating_add(calls))
    });
    let other = (
        total.0.saturating_sub(listed.0),
        total.1.saturating_sub(listed.1),
    );
    (used, other)
}

/// The highest site of a full batch, and where it is.
fn highest<T: Tally>(batch: &[Option<T>]) -> Option<(usize, T::Site)> {
    batch
        .iter()
        .enumerate()
        .filter_map(|(index, line)| line.map(|line| (index, line.site())))
        .max_by(|a, b| T::order(&a.1, &b.1))
}

/// Puts `line` in `lines[..*used]`, or in place of its smallest line if it is full
/// and `line` is larger.
fn keep_largest<T: Tally>(lines: &mut [T], used: &mut usize, line: T) {
    if let Some(free) = lines.get_mut(*used) {
        *free = line;
        *used += 1;
        return;
    }
    let smallest = lines.iter_mut().min_by_key(|kept| kept.size());
    if let Some(smallest) = smallest.filter(|smallest| smallest.size() < line.size()) {
        *smallest = line;
    }
}

/// `(file, line, column)`: the order of [`same_location`]'s places.
pub(crate) fn location_order(a: &Location<'_>, b: &Location<'_>) -> Ordering {
    (a.file(), a.line(), a.column()).cmp(&(b.file(), b.line(), b.column()))
}

/// [`location_order`], no location first.
pub(crate) fn caller_order(a: Option<&Location<'_>>, b: Option<&Location<'_>>) -> Ordering {
    match (a, b) {
        (Some(a), Some(b)) => location_order(a, b),
        _ => a.is_some().cmp(&b.is_some()),
    }
}

impl Tally for SiteUsage {
    type Site = Option<&'static Location<'static>>;

    fn of(caller: Self::Site) -> Self {
        SiteUsage {
            caller,
            ..SiteUsage::EMPTY
        }
    }

    fn site(&self) -> Self::Site {
        self.caller
    }

    fn order(a: &Self::Site, b: &Self::Site) -> Ordering {
        caller_order(*a, *b)
    }

    fn add(&mut self, bytes: u64) {
        self.bytes = self.bytes.saturating_add(bytes);
        self.calls = self.calls.saturating_add(1);
    }

    fn size(&self) -> (u64, u64) {
        (self.bytes, self.calls)
    }
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
    /// or freed meanwhile may or may not be counted, as in a listing. The areas are
    /// read once per 32 sites (the totals are kept in `sites` alone).
    pub fn allocinfo<'s>(&self, sites: &'s mut [SiteUsage]) -> AllocInfo<'s> {
        let zone = self.blocks.zone();
        let (used, (bytes, calls)) = tally(sites, |count| {
            for area in self.areas().filter(|area| counted(area, zone)) {
                if area.caller.is_some() {
                    count(area.caller, area.pages * PAGE_SIZE);
                }
            }
        });
        let other = SiteUsage {
            caller: None,
            bytes,
            calls,
        };
        AllocInfo {
            sites: &sites[..used],
            other,
        }
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
