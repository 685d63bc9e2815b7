//! Frees deferred from contexts that may not wait for any lock.
//!
//! A fault handler, an NMI, or code holding a lock of its own cannot wait for the
//! manager's locks. Linux's `vfree_atomic` pushes the area on a lock-free list drained
//! later by a worker; here [`Vmalloc::vfree_atomic`] claims a slot of a fixed array
//! with one compare-and-swap and returns: it never waits and never starts a flush.
//! The next call on the manager that allocates, frees, resizes, lists or counts, the
//! per-CPU fast paths included, frees every queued area before doing its own work
//! (`diagnose_fault`, which only tries the lock, and `vfree_atomic` itself do not),
//! so a queued area waits for one such call. A full queue is refused
//! ([`Error::WouldBlock`]) rather than drained by the
//! pusher, which could mean waiting for a lock its own CPU holds. The slots hold only
//! addresses, so a bad pointer cannot do harm: the drain checks each one as `vfree`
//! would and counts the ones it refuses ([`VmallocStats::deferred_refused`]).
//!
//! [`Vmalloc::vfree_atomic`]: super::Vmalloc::vfree_atomic
//! [`VmallocStats::deferred_refused`]: super::VmallocStats::deferred_refused
//! [`Error::WouldBlock`]: crate::Error::WouldBlock

use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Frees that can wait at once.
pub const SLOTS: usize = 256;

/// Addresses waiting to be freed; 0 is an empty slot.
pub(super) struct DeferredFrees {
    slots: [AtomicU64; SLOTS],
    queued: AtomicUsize,
}

impl DeferredFrees {
    pub(super) const fn new() -> Self {
        Self {
            slots: [const { AtomicU64::new(0) }; SLOTS],
            queued: AtomicUsize::new(0),
        }
    }

    /// Queues `addr` (not 0); `false` when every slot is taken.
    pub(super) fn push(&self, addr: u64) -> bool {
        // Counted before it is in a slot: a call on another CPU that finds the count
        // 0 finds nothing queued (counted after, it could miss a free just queued).
        self.queued.fetch_add(1, Ordering::Release);
        for slot in &self.slots {
            // A plain read first: full slots are skipped without taking their line.
            if slot.load(Ordering::Relaxed) == 0
                && slot
                    .compare_exchange(0, addr, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
            {
                return true;
            }
        }
        self.queued.fetch_sub(1, Ordering::Release);
        false
    }

    /// Whether anything may be queued (a cheap check before [`drain`](Self::drain)).
    pub(super) fn any(&self) -> bool {
        self.queued.load(Ordering::Acquire) != 0
    }

    /// Takes every queued address and hands it to `free`.
    pub(super) fn drain(&self, mut free: impl FnMut(u64)) {
        for slot in &self.slots {
            let addr = slot.swap(0, Ordering::AcqRel);
            if addr != 0 {
                self.queued.fetch_sub(1, Ordering::Release);
                free(addr);
            }
        }
    }
}
