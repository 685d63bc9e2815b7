//! Memory per allocation site for the kernel heap: Linux's `/proc/allocinfo`.
//!
//! The heap knows the sites of the objects it samples into the guarded pool only (it
//! records no site for the others: that would cost every allocation), so the listing
//! has two parts: what each kind of block holds (every slab size class, the list
//! heap, the blocks of their own in vmalloc, the guarded pool), and the live *sampled* objects totalled
//! by site, each line a sample of what that site holds (about one object in the
//! sampling interval). Both largest first. The numbers are copied first (the pool's
//! records in batches, the lock held only while one is copied) into the table the
//! caller lends and the listing itself, then formatted with no lock held.

use super::KernelHeap;
use super::pool::{Slot, State};
use super::site::CallSite;
use crate::heap::slab;
use crate::vmalloc::allocinfo::{Tally, caller_order, tally};
use core::cmp::Ordering;
use core::fmt;

/// Live sampled objects of one site; see [`KernelHeap::allocinfo`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeapSiteUsage {
    /// The site (its CPU left out); [`CallSite::frames`] and
    /// [`CallSite::caller`] say where.
    pub site: CallSite,
    /// Bytes of the site's live sampled objects.
    pub bytes: u64,
    /// The site's live sampled objects.
    pub calls: u64,
}

impl HeapSiteUsage {
    /// No site: what a table lent to [`KernelHeap::allocinfo`] starts as.
    pub const EMPTY: HeapSiteUsage = HeapSiteUsage {
        site: CallSite::NONE,
        bytes: 0,
        calls: 0,
    };
}

impl Tally for HeapSiteUsage {
    type Site = CallSite;

    fn of(site: CallSite) -> Self {
        HeapSiteUsage {
            site,
            ..HeapSiteUsage::EMPTY
        }
    }

    fn site(&self) -> CallSite {
        self.site
    }

    /// The `#[track_caller]` location, then the return addresses: one place is
    /// `Equal`, as [`CallSite::same_place`] says.
    fn order(a: &CallSite, b: &CallSite) -> Ordering {
        caller_order(a.caller, b.caller).then_with(|| a.frames().cmp(b.frames()))
    }

    fn add(&mut self, bytes: u64) {
        self.bytes = self.bytes.saturating_add(bytes);
        self.calls = self.calls.saturating_add(1);
    }

    fn size(&self) -> (u64, u64) {
        (self.bytes, self.calls)
    }
}

impl Default for HeapSiteUsage {
    fn default() -> Self {
        Self::EMPTY
    }
}

/// What one kind of block holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    #[default]
    None,
    /// A slab size class, by its object size.
    Slab(usize),
    /// The list heap.
    List,
    /// Blocks in vmalloc areas of their own.
    Large,
    /// Sampled objects in the guarded pool.
    Guarded,
}

#[derive(Debug, Clone, Copy, Default)]
struct KindLine {
    kind: Kind,
    bytes: u64,
    /// Blocks, where the heap counts them (not for the list heap).
    calls: Option<u64>,
}

const KINDS: usize = slab::CLASSES + 3;

/// A `/proc/allocinfo`-style listing of the kernel heap; see
/// [`KernelHeap::allocinfo`]. Its `Display` prints the kinds of block, then the
/// sampled sites, each part largest first.
#[derive(Debug)]
pub struct HeapAllocInfo<'s> {
    kinds: [KindLine; KINDS],
    sites: &'s [HeapSiteUsage],
    other: HeapSiteUsage,
    interval: u32,
}

impl<'s> HeapAllocInfo<'s> {
    /// The sampled sites, largest first.
    pub fn sites(&self) -> &'s [HeapSiteUsage] {
        self.sites
    }

    /// What the sampled sites that did not fit in the table hold together.
    pub fn other(&self) -> HeapSiteUsage {
        self.other
    }
}

/// Records copied from the pool per batch.
const BATCH: usize = 16;

impl KernelHeap<'_> {
    /// The heap's memory per kind of block and per sampled site (Linux's
    /// `/proc/allocinfo`; see [`allocinfo`](super::allocinfo)): the live sampled
    /// objects totalled per site into `sites`, largest first, those past its length
    /// in [`HeapAllocInfo::other`].
    pub fn allocinfo<'s>(&self, sites: &'s mut [HeapSiteUsage]) -> HeapAllocInfo<'s> {
        let mut kinds = [KindLine::default(); KINDS];
        let classes = self.slab_stats();
        // Read apart from the classes: no sum of two readings of them while CPUs run.
        let (_, list_in_use) = self.list_usage();
        for (line, class) in kinds.iter_mut().zip(classes.iter()) {
            let bytes = (class.objects * class.size) as u64;
            *line = KindLine {
                kind: Kind::Slab(class.size),
                bytes,
                calls: Some(class.objects as u64),
            };
        }
        kinds[slab::CLASSES] = KindLine {
            kind: Kind::List,
            bytes: list_in_use as u64,
            calls: None,
        };
        kinds[slab::CLASSES + 1] = KindLine {
            kind: Kind::Large,
            bytes: self.large_bytes.load(core::sync::atomic::Ordering::Relaxed) as u64,
            calls: Some(
                self.large_blocks
                    .load(core::sync::atomic::Ordering::Relaxed) as u64,
            ),
        };
        let mut guarded = HeapSiteUsage::EMPTY;
        let (used, (bytes, calls)) = tally(sites, |count| {
            let (Some(pool), Some(backing)) = (self.guarded.ready(), self.backing.get()) else {
                return;
            };
            let mut batch = [Slot::UNUSED; BATCH];
            let mut from = 0;
            loop {
                let copied = pool.copy(backing.vmalloc, from, &mut batch);
                for slot in batch[..copied].iter().filter(|s| s.state == State::Live) {
                    let mut site = slot.alloc;
                    site.cpu = None;
                    count(site, slot.size as u64);
                }
                if copied < BATCH {
                    break;
                }
                from += copied;
            }
        });
        let other = HeapSiteUsage {
            bytes,
            calls,
            ..HeapSiteUsage::EMPTY
        };
        for line in &sites[..used] {
            guarded.bytes += line.bytes;
            guarded.calls += line.calls;
        }
        guarded.bytes += other.bytes;
        guarded.calls += other.calls;
        kinds[slab::CLASSES + 2] = KindLine {
            kind: Kind::Guarded,
            bytes: guarded.bytes,
            calls: Some(guarded.calls),
        };
        kinds.sort_unstable_by(|a, b| b.bytes.cmp(&a.bytes).then(a.kind.cmp(&b.kind)));
        HeapAllocInfo {
            kinds,
            sites: &sites[..used],
            other,
            interval: self
                .guarded
                .interval
                .load(core::sync::atomic::Ordering::Relaxed),
        }
    }
}

impl fmt::Display for HeapAllocInfo<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "allocinfo - version: 1.0")?;
        writeln!(f, "#     <size>  <calls> <tag info>")?;
        for line in self.kinds.iter().filter(|line| line.bytes > 0) {
            write!(f, "{:>12} ", line.bytes)?;
            match line.calls {
                Some(calls) => write!(f, "{calls:>8} ")?,
                None => write!(f, "{:>8} ", "-")?,
            }
            match line.kind {
                Kind::Slab(size) => writeln!(f, "kernel heap: slab-{size}")?,
                Kind::List => writeln!(f, "kernel heap: list")?,
                Kind::Large => writeln!(f, "kernel heap: vmalloc")?,
                Kind::Guarded => writeln!(f, "kernel heap: guarded pool")?,
                Kind::None => writeln!(f, "?")?,
            }
        }
        if self.sites.is_empty() && self.other.calls == 0 {
            return Ok(());
        }
        write!(f, "# sampled into the guarded pool (")?;
        match self.interval {
            0 => write!(f, "sampling off now")?,
            interval => write!(f, "about 1 in {interval}")?,
        }
        writeln!(f, "): live objects per site")?;
        for site in self.sites {
            writeln!(
                f,
                "{:>12} {:>8} {}",
                site.bytes,
                site.calls,
                site.site.place()
            )?;
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
