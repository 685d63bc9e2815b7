//! The one word of a slab that every CPU may touch: who holds the slab, and the
//! objects CPUs other than its holder freed into it (SLUB's and mimalloc's remote
//! frees).
//!
//! A slab is held by its class (its lock governs the slab) or by one CPU, whose
//! current slab it is or which keeps it on its own partial list or, full, on no list
//! (that CPU alone touches the slab's free list and counts, through its per-CPU slot).
//! A CPU freeing an object into a slab another CPU holds pushes it on the slab's
//! remote list with a compare-and-swap of this word, without a lock; the holder takes
//! the whole list with one compare-and-swap when it needs objects. The word packs:
//!
//! | bits | what |
//! |---|---|
//! | 0..8 | the holder: 0 the class, `1 + cpu` a CPU |
//! | 8 | *armed*: the next remote free notifies the holder |
//! | 32..64 | the list's first object, as an offset from the slab's start (0: none) |
//!
//! A CPU does not look at the remote lists of the slabs it is not carving, and a full
//! slab is on none of its lists: it learns of remote frees through *notices*. The
//! first remote free after the holder last took the list (which arms the word) does
//! not go on the list: it disarms the word and goes on the holder's notice list
//! ([`Slabs::notify`](super::Slabs::notify)), which the holder looks at on every heap
//! call; taking that object back, the holder takes the slab's remote list too and
//! arms the word again. So a disarmed word always has a notice on its way, and no
//! object waits on a remote list that its holder will not take (mimalloc's
//! "delayed free" of full pages).

use super::list::FreeObject;
use core::sync::atomic::{AtomicU64, Ordering};

/// The holder field: the class.
const CLASS: u64 = 0;
const HOLDER: u64 = 0xff;
const ARMED: u64 = 1 << 8;
const HEAD_SHIFT: u32 = 32;

const _: () = assert!(crate::smp::MAX_CPUS < HOLDER as usize, "holders fit a byte");

/// A slab's shared word; see the [module documentation](self).
pub(in crate::heap) struct Remote(AtomicU64);

/// What a remote free did.
#[derive(Debug, PartialEq, Eq)]
pub(in crate::heap) enum Pushed {
    /// The object is on the slab's remote list.
    Listed,
    /// The object is the holder's to be told of: the caller puts it on CPU `cpu`'s
    /// notice list (the object is not on the slab's list).
    Notify(usize),
    /// The class holds the slab: the object goes back under the class's lock.
    Class,
    /// The object heads the slab's remote list already: freed twice in a row (the
    /// caller's bug). Nothing changed.
    Repeated,
}

fn holder(word: u64) -> Option<usize> {
    match word & HOLDER {
        CLASS => None,
        tag => Some(tag as usize - 1),
    }
}

/// The first object of the list a word holds, its objects in the slab at `base`.
fn list(word: u64, base: usize) -> *mut FreeObject {
    match (word >> HEAD_SHIFT) as usize {
        0 => core::ptr::null_mut(),
        offset => (base + offset) as *mut FreeObject,
    }
}

impl Remote {
    /// A word of a slab its class holds, with no remote object.
    pub(super) const fn class() -> Self {
        Self(AtomicU64::new(CLASS))
    }

    /// The CPU holding the slab, if one does. A CPU that holds its own per-CPU slot
    /// reads its own index here only for slabs it holds: only it gives a slab to
    /// itself or away (see [`cpu_slab`](crate::heap::cpu_slab)).
    #[inline]
    pub(in crate::heap) fn holder(&self) -> Option<usize> {
        holder(self.0.load(Ordering::Relaxed))
    }

    /// Hands a slab its class holds to CPU `cpu`, armed, with no remote object. The
    /// caller holds the class's lock: nobody else writes the word of a slab its class
    /// holds.
    pub(in crate::heap) fn give_to(&self, cpu: usize) {
        self.0.store((cpu as u64 + 1) | ARMED, Ordering::Release);
    }

    /// Frees `object` into the slab at `base` as a CPU that does not hold it; see
    /// [`Pushed`]. A slab its class holds is never written here.
    ///
    /// An object at the head of the list is free already, not the caller's to give:
    /// refused, as a legitimate free cannot meet it there.
    ///
    /// # Safety
    ///
    /// `object` is an object of the slab at `base`, handed out and now given up by
    /// the caller, at least 16 bytes.
    #[inline]
    pub(in crate::heap) unsafe fn push(&self, base: usize, object: *mut FreeObject) -> Pushed {
        let offset = (object as usize - base) as u64;
        let mut word = self.0.load(Ordering::Relaxed);
        loop {
            let Some(cpu) = holder(word) else {
                return Pushed::Class;
            };
            if word & ARMED != 0 {
                match self.0.compare_exchange_weak(
                    word,
                    word & !ARMED,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => return Pushed::Notify(cpu),
                    Err(now) => word = now,
                }
                continue;
            }
            let head = list(word, base);
            if head == object {
                return Pushed::Repeated;
            }
            // SAFETY: the object is the caller's to link (caller).
            unsafe { (*object).next = head };
            let new = (word & (HOLDER | ARMED)) | (offset << HEAD_SHIFT);
            // Release: the holder that takes the list sees the link.
            match self
                .0
                .compare_exchange_weak(word, new, Ordering::Release, Ordering::Relaxed)
            {
                Ok(_) => return Pushed::Listed,
                Err(now) => word = now,
            }
        }
    }

    /// The remote list of a slab the caller holds (as a CPU), and the word armed again.
    /// No locked instruction when the list is empty and the word armed.
    pub(in crate::heap) fn take(&self, base: usize) -> *mut FreeObject {
        let mut word = self.0.load(Ordering::Relaxed);
        loop {
            if word & !HOLDER == ARMED {
                return core::ptr::null_mut();
            }
            // Acquire: the pushers' links.
            match self.0.compare_exchange_weak(
                word,
                (word & HOLDER) | ARMED,
                Ordering::Acquire,
                Ordering::Relaxed,
            ) {
                Ok(_) => return list(word, base),
                Err(now) => word = now,
            }
        }
    }

    /// Gives a slab the caller holds (as a CPU) back to its class, with the class's
    /// lock held; returns the remote list, which is the class's now.
    pub(in crate::heap) fn give_back(&self, base: usize) -> *mut FreeObject {
        list(self.0.swap(CLASS, Ordering::Acquire), base)
    }
}

#[cfg(test)]
mod test {
    use super::*;

    /// A slab-sized, aligned buffer of 16-byte objects.
    #[repr(C, align(4096))]
    struct Buffer([[usize; 2]; 256]);

    fn object(buffer: &mut Buffer, index: usize) -> *mut FreeObject {
        buffer.0[index].as_mut_ptr().cast()
    }

    #[test]
    fn the_first_remote_free_after_a_take_notifies_the_holder_and_the_rest_wait_listed() {
        let mut buffer = Buffer([[0; 2]; 256]);
        let base = buffer.0.as_ptr() as usize;
        let word = Remote::class();
        let first = object(&mut buffer, 4);
        // SAFETY: objects of the buffer, this test's to link.
        unsafe {
            assert_eq!(word.push(base, first), Pushed::Class);
            word.give_to(3);
            assert_eq!(word.holder(), Some(3));
            assert_eq!(word.push(base, first), Pushed::Notify(3));
            assert_eq!(word.push(base, object(&mut buffer, 5)), Pushed::Listed);
            assert_eq!(word.push(base, object(&mut buffer, 9)), Pushed::Listed);
            assert_eq!(word.push(base, object(&mut buffer, 9)), Pushed::Repeated);
        }
        let taken = word.take(base);
        assert_eq!(taken, object(&mut buffer, 9));
        // SAFETY: the list links objects of the buffer.
        unsafe {
            assert_eq!((*taken).next, object(&mut buffer, 5));
            assert!((*(*taken).next).next.is_null());
        }
        assert!(word.take(base).is_null(), "taken once");
        // Armed again by the take.
        // SAFETY: as above.
        unsafe {
            assert_eq!(word.push(base, object(&mut buffer, 7)), Pushed::Notify(3));
            assert_eq!(word.push(base, object(&mut buffer, 8)), Pushed::Listed);
        }
        let back = word.give_back(base);
        assert_eq!(back, object(&mut buffer, 8));
        // SAFETY: as above.
        assert!(unsafe { (*back).next }.is_null());
        assert_eq!(word.holder(), None);
    }
}
