//! The flush token every call that may leave stale translations returns.

use crate::TlbFlush;
use x86_64::VirtAddr;
use x86_64::structures::paging::page::PageRange;
use x86_64::structures::paging::{Page, Size4KiB};

/// Translations a page-table change left stale in the TLB.
///
/// Flush it ([`flush`](Self::flush)), fold it into a batch ([`merge`](Self::merge))
/// to flush once later, or say why not ([`ignore`](Self::ignore)).
#[must_use = "the TLB may still hold the old translations: flush, merge or ignore"]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RangeFlush {
    range: PageRange<Size4KiB>,
    /// Set when the range cannot say it: ranges merged across the canonical hole.
    whole: bool,
}

impl RangeFlush {
    /// A token for the pages `[start, end)` (canonical addresses in the same half).
    pub(crate) fn new(start: u64, end: u64) -> Self {
        let page = |addr| Page::containing_address(VirtAddr::new(addr));
        Self {
            range: Page::range(page(start), page(end)),
            whole: false,
        }
    }

    /// A token for `range`: for code that changed entries by other means and wants
    /// the flush batched with the library's.
    pub fn from_range(range: PageRange<Size4KiB>) -> Self {
        Self {
            range,
            whole: false,
        }
    }

    /// The pages to flush; `None` when only a whole-TLB flush will do.
    pub fn range(&self) -> Option<PageRange<Size4KiB>> {
        (!self.whole).then_some(self.range)
    }

    /// Whether nothing needs flushing.
    pub fn is_empty(&self) -> bool {
        !self.whole && self.range.is_empty()
    }

    /// Flushes the range through `tlb` (nothing for an empty range).
    pub fn flush(self, tlb: &(impl TlbFlush + ?Sized)) {
        if self.whole {
            tlb.flush_all();
        } else if !self.range.is_empty() {
            tlb.flush_range(self.range);
        }
    }

    /// Drops the token without flushing.
    ///
    /// # Safety
    ///
    /// No CPU's TLB holds a translation of the range that matters: the pages were
    /// never accessed since they were last flushed, or the caller flushes them (or the
    /// whole TLB) before anything is reused.
    pub unsafe fn ignore(self) {}

    /// One token covering both: the smallest range holding both (flushing more than
    /// was changed is harmless), or the whole TLB for ranges on both sides of the
    /// canonical hole.
    pub fn merge(self, other: RangeFlush) -> RangeFlush {
        if other.is_empty() {
            return self;
        }
        if self.is_empty() {
            return other;
        }
        let lower_half = |r: &RangeFlush| r.range.start.start_address().as_u64() >> 63 == 0;
        let whole = self.whole || other.whole || lower_half(&self) != lower_half(&other);
        let range = Page::range(
            self.range.start.min(other.range.start),
            self.range.end.max(other.range.end),
        );
        RangeFlush { range, whole }
    }
}
