//! Which top-level entries the live managers use.
//!
//! Two managers whose regions share a top-level (PML4) entry share the tables below
//! it: each would free, as its own, tables the other maps through, and drop a
//! top-level table the other promised never to change. So [`Vmalloc::new`] marks
//! the region's top-level entries [`MANAGED`] once it has given each a table, and
//! refuses a region whose entries carry the mark ([`Error::Overlap`]); the drop
//! clears it. The mark lives in the address space itself: a manager forgotten
//! rather than dropped keeps its entries (and its areas), and a new address space
//! starts with none.
//!
//! Managers make and give back their top-level entries one at a time, under one
//! lock, so that two made at once over one root cannot both find an entry free.
//!
//! [`Vmalloc::new`]: super::Vmalloc::new
//! [`MANAGED`]: crate::paging::MANAGED
//! [`Error::Overlap`]: crate::Error::Overlap

use crate::sync::{self, Cpu};

/// Held while a manager surveys, makes and marks its region's top-level entries, or
/// clears the marks and frees the tables it made. Taken with interrupts held off,
/// never from a manager's calls an interrupt handler may make.
static CLAIMING: spin::Mutex<()> = spin::Mutex::new(());

/// One manager at a time claims or gives back top-level entries; while it waits, a
/// CPU serves `cpu`'s shootdowns (the holder may be waiting for frames another CPU
/// drains).
pub(super) fn lock(cpu: &(impl Cpu + ?Sized)) -> spin::MutexGuard<'static, ()> {
    sync::wait_for(&CLAIMING, cpu)
}
