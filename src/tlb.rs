//! TLB-flush policy.
//!
//! Changing or removing a present page-table entry leaves the old translation in the
//! TLB until it is flushed. Who flushes, and how, is the kernel's business (one CPU
//! with `invlpg`, or an SMP shootdown), so the library only asks through [`TlbFlush`].

use x86_64::structures::paging::page::PageRange;
use x86_64::structures::paging::{Page, Size4KiB};

/// Drops stale translations from the TLB.
///
/// Methods take `&self`: a TLB is machine state shared by every user of the page
/// tables, and implementations lock or use per-CPU state as they need.
pub trait TlbFlush {
    /// Drops any translation of `page`.
    fn flush_page(&self, page: Page<Size4KiB>);

    /// Drops any translation in `range`. The default flushes page by page.
    fn flush_range(&self, range: PageRange<Size4KiB>) {
        for page in range {
            self.flush_page(page);
        }
    }

    /// Drops every non-global and global translation.
    fn flush_all(&self);
}

impl<T: TlbFlush + ?Sized> TlbFlush for &T {
    fn flush_page(&self, page: Page<Size4KiB>) {
        (**self).flush_page(page)
    }
    fn flush_range(&self, range: PageRange<Size4KiB>) {
        (**self).flush_range(range)
    }
    fn flush_all(&self) {
        (**self).flush_all()
    }
}
