//! The TLB model: one cache of successful translations, per 4 KiB page.
//!
//! An entry remembers the 4 KiB piece of the frame the page maps to, the effective
//! permissions and the size of the page it came from, so that invalidating any 4 KiB
//! page inside a 2 MiB or 1 GiB mapping drops every entry of that mapping, as `invlpg`
//! does on hardware. Entries are keyed by virtual page number in a `BTreeMap`, which
//! lets a flush look only at the entries that exist inside the range it covers.

use super::mmu::Translation;
use std::collections::BTreeMap;
use std::vec::Vec;
use x86_64::structures::paging::{PageSize, PageTableFlags, Size1GiB};

/// How often the TLB was used and flushed, since the machine was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TlbStats {
    /// `flush_page` calls.
    pub page_flushes: u64,
    /// `flush_range` calls (each counts once, however long the range).
    pub range_flushes: u64,
    /// `flush_all` calls.
    pub full_flushes: u64,
    /// Translations answered from the TLB.
    pub hits: u64,
    /// Translations that walked the page tables (including permission re-walks).
    pub misses: u64,
}

/// Cached translations and the counters, kept behind the machine's lock.
#[derive(Debug, Default)]
pub(super) struct Tlb {
    /// Virtual page number (address >> 12) to the translation of that page's start.
    entries: BTreeMap<u64, Translation>,
    /// The paging-structure cache: upper-level entries that point to a table, keyed by
    /// level (4 = PML4) and the address bits that entry covers.
    structures: BTreeMap<(u32, u64), u64>,
    pub(super) stats: TlbStats,
}

const PAGES_PER_GIB: u64 = Size1GiB::SIZE >> 12;

impl Tlb {
    pub(super) fn lookup(&self, vpn: u64) -> Option<Translation> {
        self.entries.get(&vpn).copied()
    }

    /// Caches `translation`, which must be the translation of page `vpn`'s start.
    pub(super) fn insert(&mut self, vpn: u64, translation: Translation) {
        self.entries.insert(vpn, translation);
    }

    /// The pages whose cached translation reaches `frame_start` (a 4 KiB frame), by
    /// virtual page number.
    pub(super) fn pages_reaching(&self, frame_start: u64) -> impl Iterator<Item = u64> + '_ {
        self.entries.iter().filter_map(move |(&vpn, t)| {
            let reached = t.frame_start.as_u64() + ((vpn << 12) & (t.page_size - 1));
            (reached == frame_start).then_some(vpn)
        })
    }

    /// Whether a cached upper-level entry points to the table in frame `table`.
    pub(super) fn walks_through(&self, table: u64) -> bool {
        const ADDR: u64 = 0x000f_ffff_ffff_f000;
        self.structures.values().any(|&raw| raw & ADDR == table)
    }

    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }

    /// The cached level-`level` entry for `addr`'s prefix, if any.
    pub(super) fn cached_entry(&self, level: u32, addr: u64) -> Option<u64> {
        self.structures.get(&(level, prefix(level, addr))).copied()
    }

    /// Caches the level-`level` entry `raw` for `addr`'s prefix.
    pub(super) fn cache_entry(&mut self, level: u32, addr: u64, raw: u64) {
        self.structures.insert((level, prefix(level, addr)), raw);
    }

    /// Drops every entry whose mapping (of whatever size) overlaps pages
    /// `start_vpn..end_vpn`, and the whole paging-structure cache.
    pub(super) fn invalidate(&mut self, start_vpn: u64, end_vpn: u64) {
        self.drop_entries(start_vpn, end_vpn);
        // `invlpg` drops every paging-structure-cache entry (SDM 4.10.4.1), so only
        // a missing flush can leave one stale.
        self.structures.clear();
    }

    /// What a page fault at `addr` drops (SDM 4.10.4.1): the entries mapping its
    /// page and the cached upper-level entries its walk would use. Other
    /// addresses' stay, so a stale one there is still found after an unrelated
    /// fault (a guard-page probe).
    pub(super) fn forget_fault(&mut self, addr: u64) {
        let vpn = addr >> 12;
        self.drop_entries(vpn, vpn + 1);
        for level in 2..=4 {
            self.structures.remove(&(level, prefix(level, addr)));
        }
    }

    /// Drops every entry whose mapping overlaps pages `start_vpn..end_vpn`.
    fn drop_entries(&mut self, start_vpn: u64, end_vpn: u64) {
        // A 1 GiB mapping is the largest: no entry outside these bounds can overlap.
        let low = start_vpn & !(PAGES_PER_GIB - 1);
        let high = end_vpn
            .div_ceil(PAGES_PER_GIB)
            .saturating_mul(PAGES_PER_GIB);
        let doomed: Vec<u64> = self
            .entries
            .range(low..high)
            .filter(|(vpn, translation)| {
                let pages = translation.page_size >> 12;
                let first = *vpn & !(pages - 1);
                first < end_vpn && start_vpn < first + pages
            })
            .map(|(vpn, _)| *vpn)
            .collect();
        for vpn in doomed {
            self.entries.remove(&vpn);
        }
    }

    pub(super) fn clear(&mut self) {
        self.entries.clear();
        self.structures.clear();
    }

    /// Drops every entry but those of global pages, as a CR3 load does.
    pub(super) fn clear_non_global(&mut self) {
        self.entries
            .retain(|_, translation| translation.flags.contains(PageTableFlags::GLOBAL));
        self.structures.clear();
    }
}

/// The address bits a level-`level` entry covers (the bits above its span).
fn prefix(level: u32, addr: u64) -> u64 {
    addr >> (12 + 9 * (level - 1))
}
