//! A slab's header and the doubly linked lists slabs are threaded on: a class's
//! partial and empty lists, under its lock, and a CPU's own partial list, which only
//! the CPU that holds the slabs touches.

use super::remote::Remote;
use core::ptr;

/// Which list a slab is on, or what holds it when it is on none.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(in crate::heap) enum Listed {
    /// On no list: full (found again through its objects' addresses), or a CPU's
    /// current slab.
    Nowhere,
    /// On its class's partial list.
    Partial,
    /// On its class's empty list.
    Empty,
    /// On the partial list of the CPU that holds it.
    Cpu,
}

/// The start of a slab.
///
/// Who may touch the fields after `remote` is what `remote` says: a slab its class
/// holds is the class's (its lock held), a slab a CPU holds is that CPU's (its
/// per-CPU slot held). `remote` itself is shared by everyone.
#[repr(C)]
pub(in crate::heap) struct SlabHeader {
    /// The slab's holder and the objects other CPUs freed into it.
    pub(in crate::heap) remote: Remote,
    /// Freed objects, threaded through their first word.
    pub(in crate::heap) free: *mut FreeObject,
    /// Neighbours on the list the slab is on (null at its ends).
    pub(in crate::heap) next: *mut SlabHeader,
    pub(in crate::heap) prev: *mut SlabHeader,
    /// Objects `0..bump` have been handed out at least once.
    pub(in crate::heap) bump: u32,
    /// Objects handed out and not freed to the holder (objects on `remote` count).
    pub(in crate::heap) in_use: u32,
    pub(in crate::heap) listed: Listed,
    /// The heap's clock when the slab became empty.
    pub(in crate::heap) emptied: u64,
}

/// A free object: its first word links it to the next.
pub(in crate::heap) struct FreeObject {
    pub(in crate::heap) next: *mut FreeObject,
}

impl SlabHeader {
    /// The header of a slab that nobody holds yet.
    pub(super) const fn new() -> Self {
        Self {
            remote: Remote::class(),
            free: ptr::null_mut(),
            next: ptr::null_mut(),
            prev: ptr::null_mut(),
            bump: 0,
            in_use: 0,
            listed: Listed::Nowhere,
            emptied: 0,
        }
    }
}

/// Pushes every object of the list from `head` on `slab`'s free list; how many.
///
/// # Safety
///
/// `slab` is live and its holder calls this; the list holds freed objects of it.
pub(in crate::heap) unsafe fn give_objects(
    slab: *mut SlabHeader,
    mut head: *mut FreeObject,
) -> u32 {
    let mut count = 0;
    while !head.is_null() {
        // SAFETY: a freed object of the slab (caller), which the holder may link.
        unsafe {
            let next = (*head).next;
            (*head).next = (*slab).free;
            (*slab).free = head;
            head = next;
        }
        count += 1;
    }
    count
}

/// A doubly linked list of slabs, threaded through their headers.
pub(in crate::heap) struct SlabList {
    pub(in crate::heap) head: *mut SlabHeader,
    pub(in crate::heap) tail: *mut SlabHeader,
    which: Listed,
}

impl SlabList {
    pub(in crate::heap) const fn new(which: Listed) -> Self {
        Self {
            head: ptr::null_mut(),
            tail: ptr::null_mut(),
            which,
        }
    }

    /// Puts `slab` at the head.
    ///
    /// # Safety
    ///
    /// `slab` is a live slab on no list, and the caller may touch it and this list's
    /// slabs (see [`SlabHeader`]).
    pub(in crate::heap) unsafe fn push(&mut self, slab: *mut SlabHeader) {
        // SAFETY: live slabs the caller may touch.
        unsafe {
            (*slab).prev = ptr::null_mut();
            (*slab).next = self.head;
            match self.head.as_mut() {
                Some(head) => head.prev = slab,
                None => self.tail = slab,
            }
            (*slab).listed = self.which;
        }
        self.head = slab;
    }

    /// Takes `slab` off the list.
    ///
    /// # Safety
    ///
    /// `slab` is a live slab on this list, and the caller may touch its slabs.
    pub(in crate::heap) unsafe fn unlink(&mut self, slab: *mut SlabHeader) {
        // SAFETY: `slab` and its neighbours are live slabs on this list (caller).
        unsafe {
            let SlabHeader { next, prev, .. } = *slab;
            match prev.as_mut() {
                Some(prev) => prev.next = next,
                None => self.head = next,
            }
            match next.as_mut() {
                Some(next) => next.prev = prev,
                None => self.tail = prev,
            }
            (*slab).listed = Listed::Nowhere;
        }
    }

    /// Takes the head off the list, if there is one.
    ///
    /// # Safety
    ///
    /// As [`unlink`](Self::unlink).
    pub(in crate::heap) unsafe fn pop(&mut self) -> Option<*mut SlabHeader> {
        let head = self.head;
        if head.is_null() {
            return None;
        }
        // SAFETY: the head is a live slab on this list (caller).
        unsafe { self.unlink(head) };
        Some(head)
    }

    /// How many slabs the list holds (a walk).
    ///
    /// # Safety
    ///
    /// As [`unlink`](Self::unlink).
    pub(in crate::heap) unsafe fn len(&self) -> usize {
        let (mut count, mut slab) = (0, self.head);
        while !slab.is_null() {
            count += 1;
            // SAFETY: slabs on the list are live (caller).
            slab = unsafe { (*slab).next };
        }
        count
    }
}
