//! Tree nodes for the vmalloc bookkeeping, and the pool they are carved from.
//!
//! The vmalloc manager must work before the kernel has a heap, so its two trees (free
//! virtual ranges in [`space`](super::space), busy areas in [`AreaMap`](super::space::AreaMap))
//! take their nodes from a [`NodePool`]: 4 KiB frames pulled from a [`FrameSource`] on
//! demand, reached through [`PhysMemory`], and cut into equal slots. The first slot of
//! every frame (a "slab") links the slabs together; the others hold nodes. A freed
//! node goes onto an intrusive free list and is reused before any new frame is taken.
//! Both trees share one slot size (the larger of their node types), so a node freed by
//! one tree can be reused by the other: `vfree` moves the area's record into a purge-list
//! entry in the slot the area map just freed, and the purge pops it (freeing the slot)
//! before giving the range back (which may need one), so neither step needs a new frame.
//!
//! Each slab counts its free slots and keeps its own free list, and the pool keeps
//! its slabs on three lists (full, partial, empty), as SLUB does, so a slab whose
//! last node is freed is found in O(1). Empty slabs go back to the frame source when
//! the manager asks ([`NodePool::shrink`]): after every call it keeps at most one, so
//! bookkeeping shrinks when areas go, and a failed call gives back every slab it took
//! ([`NodePool::shrink_to`]). Nothing is given back in the middle of a call, so a
//! reservation stays valid until the call ends.
//!
//! Operations that may need nodes call [`NodePool::reserve`] first and mutate only once
//! it succeeded, so running out of frames changes nothing.
//!
//! Both trees are AVL trees keyed by start address over the same [`Node`] layout,
//! generic over a small value that the tree keeps up to date on every path it changes
//! ([`NodeValue::update`]): the largest free size of a subtree for the free tree, the
//! caller's payload for the area map. AVL rather than red-black: the height bound is
//! tighter (1.44 log2 n, 25 at 100,000 nodes), and recursive insert/remove recompute
//! the augmented value on the way back up without parent pointers, so a node is five
//! words plus its value. Above the first level whose child came out with its
//! height and augmented value unchanged, the way back up only compares: nothing there
//! can change.

use crate::{Error, FrameSource, PAGE_SIZE, PhysMemory};
use core::marker::PhantomData;
use core::mem::{align_of, size_of};
use core::ptr::{self, null_mut};
use x86_64::PhysAddr;
use x86_64::structures::paging::{PhysFrame, Size4KiB};

/// Alignment of every slot; a node type may not need more.
const SLOT_ALIGN: usize = 16;

/// Most frames one [`NodePool::reserve`] call may need to take.
const MAX_RESERVE_FRAMES: usize = 4;

/// Deepest AVL tree an iterator's fixed stack can walk (far beyond 2^40 nodes).
const MAX_HEIGHT: usize = 64;

/// A free slot, linked through its first word.
struct FreeSlot {
    next: *mut FreeSlot,
}

/// The first slot of every slab frame.
struct SlabHeader {
    next: *mut SlabHeader,
    prev: *mut SlabHeader,
    /// This slab's free slots.
    free: *mut FreeSlot,
    free_count: usize,
    frame: PhysFrame<Size4KiB>,
}

/// A doubly linked list of slabs.
struct SlabList {
    head: *mut SlabHeader,
    len: usize,
}

impl SlabList {
    const fn new() -> Self {
        Self {
            head: null_mut(),
            len: 0,
        }
    }

    /// Links `slab` at the front.
    ///
    /// # Safety
    ///
    /// `slab` is a live slab header on no list.
    unsafe fn push(&mut self, slab: *mut SlabHeader) {
        // SAFETY: per the caller; `head` is live or null.
        unsafe {
            (*slab).prev = null_mut();
            (*slab).next = self.head;
            if let Some(head) = self.head.as_mut() {
                head.prev = slab;
            }
        }
        self.head = slab;
        self.len += 1;
    }

    /// Unlinks `slab`.
    ///
    /// # Safety
    ///
    /// `slab` is on this list.
    unsafe fn unlink(&mut self, slab: *mut SlabHeader) {
        // SAFETY: per the caller; neighbours on a list are live or null.
        unsafe {
            let (prev, next) = ((*slab).prev, (*slab).next);
            match prev.as_mut() {
                Some(prev) => prev.next = next,
                None => self.head = next,
            }
            if let Some(next) = next.as_mut() {
                next.prev = prev;
            }
        }
        self.len -= 1;
    }

    /// Unlinks and returns the first slab.
    fn pop(&mut self) -> Option<*mut SlabHeader> {
        let slab = self.head;
        if slab.is_null() {
            return None;
        }
        // SAFETY: the head is on this list.
        unsafe { self.unlink(slab) };
        Some(slab)
    }
}

/// Fixed-size node slots carved from 4 KiB frames (see the module doc).
pub(crate) struct NodePool<F: FrameSource, M: PhysMemory> {
    frames: F,
    phys: M,
    slot_size: usize,
    /// Slabs with no free slot, some free slots, every slot free.
    full: SlabList,
    partial: SlabList,
    empty: SlabList,
    free_count: usize,
}

// SAFETY: the pool exclusively owns its slabs; the raw pointers are never shared with
// another pool, so moving the pool moves ownership of that memory with it.
unsafe impl<F: FrameSource + Send, M: PhysMemory + Send> Send for NodePool<F, M> {}

impl<F: FrameSource, M: PhysMemory> NodePool<F, M> {
    /// An empty pool whose slots fit both trees' nodes for area payload `T`.
    pub(crate) fn new<T: Copy>(frames: F, phys: M) -> Self {
        Self::with_slot_size(frames, phys, slot_size_for::<T>())
    }

    /// An empty pool of `slot_size`-byte slots (rounded up to [`SLOT_ALIGN`]).
    ///
    /// # Panics
    ///
    /// If fewer than two nodes of that size fit in a frame next to the slab header.
    pub(crate) fn with_slot_size(frames: F, phys: M, slot_size: usize) -> Self {
        let slot_size = slot_size
            .max(size_of::<SlabHeader>())
            .next_multiple_of(SLOT_ALIGN);
        assert!(PAGE_SIZE as usize / slot_size >= 3, "node slots too large");
        Self {
            frames,
            phys,
            slot_size,
            full: SlabList::new(),
            partial: SlabList::new(),
            empty: SlabList::new(),
            free_count: 0,
        }
    }

    /// Bytes per slot.
    pub(crate) fn slot_size(&self) -> usize {
        self.slot_size
    }

    /// Node slots per slab frame (one slot holds the slab header).
    pub(crate) fn slots_per_frame(&self) -> usize {
        PAGE_SIZE as usize / self.slot_size - 1
    }

    /// Frames the pool holds: the manager's "bookkeeping frames".
    pub(crate) fn frames_held(&self) -> usize {
        self.full.len + self.partial.len + self.empty.len
    }

    /// Slots ready to hand out without taking a frame.
    pub(crate) fn free_slots(&self) -> usize {
        self.free_count
    }

    /// The frame source the pool grows from.
    pub(crate) fn frame_source(&self) -> &F {
        &self.frames
    }

    /// The physical-memory window the pool reaches its frames through.
    pub(crate) fn phys(&self) -> &M {
        &self.phys
    }

    /// Makes sure `count` slots can be taken without failing.
    ///
    /// # Errors
    ///
    /// [`Error::OutOfFrames`] when the frame source runs dry; the frames taken by this
    /// call are given back and the pool is as it was.
    pub(crate) fn reserve(&mut self, count: usize) -> Result<(), Error> {
        let missing = count.saturating_sub(self.free_count);
        let needed = missing.div_ceil(self.slots_per_frame());
        assert!(needed <= MAX_RESERVE_FRAMES, "reservation too large");
        let mut taken = [None; MAX_RESERVE_FRAMES];
        for slot in taken.iter_mut().take(needed) {
            match self.frames.alloc_frame() {
                Some(frame) => *slot = Some(frame),
                None => {
                    for frame in taken.iter().flatten() {
                        self.give_frame(*frame);
                    }
                    return Err(Error::OutOfFrames);
                }
            }
        }
        for frame in taken.iter().flatten() {
            self.carve(*frame);
        }
        Ok(())
    }

    /// Returns a frame to the source it came from.
    fn give_frame(&self, frame: PhysFrame<Size4KiB>) {
        // The frame came from this source; its contract is to take it back, and the
        // pool has nowhere better to put it should it refuse.
        let _ = self.frames.free_frame(frame);
    }

    /// Links a fresh frame in as an empty slab.
    fn carve(&mut self, frame: PhysFrame<Size4KiB>) {
        let base = self.phys.phys_to_virt(frame.start_address());
        let header = base.cast::<SlabHeader>();
        let mut free = null_mut::<FreeSlot>();
        for index in (1..=self.slots_per_frame()).rev() {
            // SAFETY: slot `index` lies inside the frame (see `slots_per_frame`), which
            // this pool now owns; slots are `SLOT_ALIGN`-aligned in a 4 KiB-aligned
            // frame (`PhysMemory`'s contract).
            let slot = unsafe { base.add(index * self.slot_size) }.cast::<FreeSlot>();
            // SAFETY: as above.
            unsafe { slot.write(FreeSlot { next: free }) };
            free = slot;
        }
        // SAFETY: as above; the header fits in the first slot.
        unsafe {
            header.write(SlabHeader {
                next: null_mut(),
                prev: null_mut(),
                free,
                free_count: self.slots_per_frame(),
                frame,
            });
            self.empty.push(header);
        }
        self.free_count += self.slots_per_frame();
    }

    /// Takes a reserved slot and writes `node` into it.
    ///
    /// # Panics
    ///
    /// If nothing was reserved, or `N` does not fit a slot: both are bugs in the caller.
    pub(crate) fn take<N>(&mut self, node: N) -> *mut N {
        assert!(size_of::<N>() <= self.slot_size && align_of::<N>() <= SLOT_ALIGN);
        let slab = if self.partial.head.is_null() {
            let slab = self.empty.pop().expect("node taken without a reservation");
            // SAFETY: a slab just unlinked from the empty list.
            unsafe { self.partial.push(slab) };
            slab
        } else {
            self.partial.head
        };
        // SAFETY: slabs on the lists are live, and partial ones have a free slot.
        let header = unsafe { &mut *slab };
        let slot = header.free;
        // SAFETY: free-list slots hold a valid `FreeSlot`.
        header.free = unsafe { (*slot).next };
        header.free_count -= 1;
        self.free_count -= 1;
        if header.free_count == 0 {
            // SAFETY: the slab is on the partial list.
            unsafe {
                self.partial.unlink(slab);
                self.full.push(slab);
            }
        }
        let node_ptr = slot.cast::<N>();
        // SAFETY: the slot is unused, large and aligned enough for `N` (checked above).
        unsafe { node_ptr.write(node) };
        node_ptr
    }

    /// Puts a node's slot back on its slab's free list.
    ///
    /// # Safety
    ///
    /// `node` came from [`take`](Self::take) on this pool, is no longer linked into any
    /// tree and is not used again.
    pub(crate) unsafe fn give(&mut self, node: *mut u8) {
        // Slabs are 4 KiB-aligned and a slot never crosses its slab's end.
        let slab = node
            .map_addr(|addr| addr & !(PAGE_SIZE as usize - 1))
            .cast::<SlabHeader>();
        let per_frame = self.slots_per_frame();
        // SAFETY: the node's slab is live and owned by this pool (the caller).
        let header = unsafe { &mut *slab };
        let slot = node.cast::<FreeSlot>();
        // SAFETY: the slot is unused now (the caller) and aligned for a `FreeSlot`.
        unsafe { slot.write(FreeSlot { next: header.free }) };
        header.free = slot;
        header.free_count += 1;
        self.free_count += 1;
        // SAFETY: a slab with one free slot was full, with all free partial (or full
        // when a slab holds one slot); each is on the list its old count says.
        unsafe {
            if header.free_count == 1 {
                self.full.unlink(slab);
                self.partial.push(slab);
            }
            if header.free_count == per_frame {
                self.partial.unlink(slab);
                self.empty.push(slab);
            }
        }
    }

    /// Gives empty slabs back to the frame source until at most `keep` are left.
    pub(crate) fn shrink(&mut self, keep: usize) {
        while self.empty.len > keep {
            self.release_empty();
        }
    }

    /// Gives empty slabs back until the pool holds at most `frames` frames (or no
    /// empty slab is left): the rollback of a failed call that grew the pool.
    pub(crate) fn shrink_to(&mut self, frames: usize) {
        while self.frames_held() > frames && self.empty.len > 0 {
            self.release_empty();
        }
    }

    fn release_empty(&mut self) {
        if let Some(slab) = self.empty.pop() {
            // SAFETY: an empty slab: no node lives in it, and it is on no list now.
            let frame = unsafe { (*slab).frame };
            self.free_count -= self.slots_per_frame();
            self.give_frame(frame);
        }
    }

    /// Gives every slab back, whatever lives in it: the end of the manager, whose trees
    /// are dropped unused.
    pub(crate) fn release_all(&mut self) {
        for list in [&mut self.full, &mut self.partial, &mut self.empty] {
            while let Some(slab) = list.pop() {
                // SAFETY: slabs on the lists are live; this one is on none now.
                let frame = unsafe { (*slab).frame };
                let _ = self.frames.free_frame(frame);
            }
        }
        self.free_count = 0;
    }

    /// Physical start addresses of the slab frames (for diagnostics).
    pub(crate) fn slab_frames(&self) -> impl Iterator<Item = PhysAddr> + '_ {
        [&self.full, &self.partial, &self.empty]
            .into_iter()
            .flat_map(|list| {
                let mut slab = list.head;
                core::iter::from_fn(move || {
                    // SAFETY: slabs on the lists are live.
                    let header = unsafe { slab.as_ref() }?;
                    slab = header.next;
                    Some(header.frame.start_address())
                })
            })
    }
}

/// Slot size fitting a free-tree node and an area node with payload `T`.
pub(crate) const fn slot_size_for<T: Copy>() -> usize {
    let free = size_of::<Node<MaxFree>>();
    let area = size_of::<Node<Payload<T>>>();
    if free > area { free } else { area }
}

/// An AVL tree node: a range `[start, start + size)` and a value.
pub(crate) struct Node<V> {
    pub(crate) left: *mut Node<V>,
    pub(crate) right: *mut Node<V>,
    pub(crate) start: u64,
    pub(crate) size: u64,
    pub(crate) height: u8,
    pub(crate) value: V,
}

impl<V> Node<V> {
    /// End of the range, exclusive (ranges never reach 2^64: the region rules it out).
    pub(crate) fn end(&self) -> u64 {
        self.start + self.size
    }
}

/// A value kept in every node and refreshed bottom-up on every changed path.
pub(crate) trait NodeValue: Sized {
    /// Recomputes the node's value from its own range and its children.
    fn update(node: &mut Node<Self>);

    /// The part of the value a parent derives from this node (0 when none is).
    fn summary(&self) -> u64;
}

/// Largest free range in the subtree: the free tree's augmentation.
#[derive(Clone, Copy)]
pub(crate) struct MaxFree(pub(crate) u64);

impl NodeValue for MaxFree {
    fn update(node: &mut Node<Self>) {
        let mut max = node.size;
        // SAFETY: children of a live node are live nodes of the same tree.
        unsafe {
            if let Some(left) = node.left.as_ref() {
                max = max.max(left.value.0);
            }
            if let Some(right) = node.right.as_ref() {
                max = max.max(right.value.0);
            }
        }
        node.value = MaxFree(max);
    }

    fn summary(&self) -> u64 {
        self.0
    }
}

/// The area map's payload; it depends on nothing below it.
#[derive(Clone, Copy)]
pub(crate) struct Payload<T>(pub(crate) T);

impl<T> NodeValue for Payload<T> {
    fn update(_: &mut Node<Self>) {}

    fn summary(&self) -> u64 {
        0
    }
}

/// What a parent derives from a possibly empty subtree: its height and summary.
fn shape<V: NodeValue>(node: *mut Node<V>) -> (u8, u64) {
    // SAFETY: non-null tree links point to live nodes.
    unsafe {
        node.as_ref()
            .map_or((0, 0), |n| (n.height, n.value.summary()))
    }
}

/// After a child subtree of `root` changed from shape `before`: restores `root`,
/// or, if the child looks the same from above, leaves it alone. Everything above
/// then looks the same too, so a change deep in a large tree costs one comparison
/// per level on the way back instead of a refresh that reads both children.
///
/// # Safety
///
/// As [`rebalance`].
unsafe fn rebalance_after<V: NodeValue>(
    root: *mut Node<V>,
    child: *mut Node<V>,
    before: (u8, u64),
) -> *mut Node<V> {
    if shape(child) == before {
        return root;
    }
    // SAFETY: forwarded from the caller.
    unsafe { rebalance(root) }
}

/// Height of a possibly empty subtree.
fn height<V>(node: *mut Node<V>) -> u8 {
    // SAFETY: non-null tree links point to live nodes.
    unsafe { node.as_ref().map_or(0, |n| n.height) }
}

/// Recomputes `node`'s height and value from its children.
///
/// # Safety
///
/// `node` is a live node whose children are live or null.
unsafe fn refresh<V: NodeValue>(node: *mut Node<V>) {
    // SAFETY: the caller passes a live node that nothing else borrows.
    let n = unsafe { &mut *node };
    n.height = 1 + height(n.left).max(height(n.right));
    V::update(n);
}

/// Rotates `node` right (its left child rises) and returns the new subtree root.
///
/// # Safety
///
/// `node` and its left child are live.
unsafe fn rotate_right<V: NodeValue>(node: *mut Node<V>) -> *mut Node<V> {
    // SAFETY: the caller guarantees both nodes are live; links stay within the tree.
    unsafe {
        let pivot = (*node).left;
        (*node).left = (*pivot).right;
        (*pivot).right = node;
        refresh(node);
        refresh(pivot);
        pivot
    }
}

/// Mirror of [`rotate_right`].
///
/// # Safety
///
/// `node` and its right child are live.
unsafe fn rotate_left<V: NodeValue>(node: *mut Node<V>) -> *mut Node<V> {
    // SAFETY: as in `rotate_right`.
    unsafe {
        let pivot = (*node).right;
        (*node).right = (*pivot).left;
        (*pivot).left = node;
        refresh(node);
        refresh(pivot);
        pivot
    }
}

/// Refreshes `node` and restores the AVL balance at it; returns the subtree root.
///
/// # Safety
///
/// `node` is live and both its subtrees are valid AVL trees differing in height by at
/// most two.
unsafe fn rebalance<V: NodeValue>(node: *mut Node<V>) -> *mut Node<V> {
    // SAFETY: the caller's guarantee; rotations only touch live children.
    unsafe {
        refresh(node);
        let (left, right) = ((*node).left, (*node).right);
        let balance = i16::from(height(left)) - i16::from(height(right));
        if balance > 1 {
            if height((*left).right) > height((*left).left) {
                (*node).left = rotate_left(left);
            }
            return rotate_right(node);
        }
        if balance < -1 {
            if height((*right).left) > height((*right).right) {
                (*node).right = rotate_right(right);
            }
            return rotate_left(node);
        }
        node
    }
}

/// An AVL tree of non-overlapping ranges keyed by start (see the module doc).
pub(crate) struct Tree<V> {
    root: *mut Node<V>,
    len: usize,
}

// SAFETY: the tree exclusively owns its nodes; values move with it.
unsafe impl<V: Send> Send for Tree<V> {}

impl<V: NodeValue> Tree<V> {
    /// An empty tree.
    pub(crate) const fn new() -> Self {
        Self {
            root: null_mut(),
            len: 0,
        }
    }

    /// Number of nodes.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The root, for searches that use the augmented values.
    pub(crate) fn root(&self) -> *mut Node<V> {
        self.root
    }

    /// Links `node` (from the pool, its range overlapping no other) into the tree.
    pub(crate) fn insert(&mut self, node: *mut Node<V>) {
        let linked = self.insert_disjoint(node);
        debug_assert!(linked, "overlapping ranges in one tree");
    }

    /// Links `node` (from the pool) into the tree unless its range overlaps a node's;
    /// returns whether it did. The only candidates, the nodes just before and after
    /// it, both lie on the insertion path, so the check costs no extra descent.
    pub(crate) fn insert_disjoint(&mut self, node: *mut Node<V>) -> bool {
        // SAFETY: `node` is a fresh node; `root` is this tree's valid root.
        match unsafe { insert_at(self.root, node) } {
            Some(root) => {
                self.root = root;
                self.len += 1;
                true
            }
            None => false,
        }
    }

    /// Unlinks the node starting at `start` and returns it (null if there is none).
    pub(crate) fn remove(&mut self, start: u64) -> *mut Node<V> {
        let mut removed = null_mut();
        // SAFETY: `root` is this tree's valid root.
        self.root = unsafe { remove_at(self.root, start, &mut removed) };
        if !removed.is_null() {
            self.len -= 1;
        }
        removed
    }

    /// Runs `change` on the node starting at `start` and refreshes the values on its
    /// path; `change` must keep the node between its neighbours. False if absent.
    pub(crate) fn modify(&mut self, start: u64, change: impl FnOnce(&mut Node<V>)) -> bool {
        // SAFETY: `root` is this tree's valid root.
        unsafe { modify_at(self.root, start, change) }
    }

    /// The node with the greatest start `<= key`.
    pub(crate) fn floor(&self, key: u64) -> Option<&Node<V>> {
        let mut best = null_mut();
        let mut node = self.root;
        // SAFETY: links of this tree are live or null.
        unsafe {
            while let Some(n) = node.as_ref() {
                if n.start <= key {
                    best = node;
                    node = n.right;
                } else {
                    node = n.left;
                }
            }
            best.as_ref()
        }
    }

    /// The node with the smallest start `>= key`.
    pub(crate) fn ceiling(&self, key: u64) -> Option<&Node<V>> {
        let mut best = null_mut();
        let mut node = self.root;
        // SAFETY: links of this tree are live or null.
        unsafe {
            while let Some(n) = node.as_ref() {
                if n.start >= key {
                    best = node;
                    node = n.left;
                } else {
                    node = n.right;
                }
            }
            best.as_ref()
        }
    }

    /// The nodes with the greatest start `<= key` and the smallest start `>= key`, in
    /// one descent.
    pub(crate) fn around(&self, key: u64) -> (Option<&Node<V>>, Option<&Node<V>>) {
        let (mut below, mut above) = (null_mut(), null_mut());
        let mut node = self.root;
        // SAFETY: links of this tree are live or null.
        unsafe {
            while let Some(n) = node.as_ref() {
                if n.start <= key {
                    below = node;
                }
                if n.start >= key {
                    above = node;
                }
                if n.start == key {
                    break;
                }
                node = if n.start < key { n.right } else { n.left };
            }
            (below.as_ref(), above.as_ref())
        }
    }

    /// Mutable access to the node starting exactly at `start`, for changes that do not
    /// touch its range (the area map's payload).
    pub(crate) fn get_mut(&mut self, start: u64) -> Option<&mut Node<V>> {
        let mut node = self.root;
        // SAFETY: links of this tree are live or null; `&mut self` makes this the only
        // reference into the tree.
        unsafe {
            while let Some(n) = node.as_mut() {
                match start.cmp(&n.start) {
                    core::cmp::Ordering::Less => node = n.left,
                    core::cmp::Ordering::Greater => node = n.right,
                    core::cmp::Ordering::Equal => return Some(n),
                }
            }
        }
        None
    }

    /// Panics unless the tree is ordered, balanced, and every height and value is
    /// what [`refresh`] would compute (for tests of the rebalancing shortcuts).
    #[cfg(test)]
    pub(crate) fn assert_valid(&self) {
        /// Checks the subtree within `(low, high)`; returns its height and summary.
        fn walk<V: NodeValue>(node: *mut Node<V>, low: u64, high: u64) -> (u8, u64) {
            // SAFETY: links of a tree are live or null.
            let Some(n) = (unsafe { node.as_mut() }) else {
                return (0, 0);
            };
            assert!(low <= n.start && n.end() <= high, "ranges out of order");
            let left = walk(n.left, low, n.start);
            let right = walk(n.right, n.end(), high);
            assert!(
                left.0.abs_diff(right.0) <= 1,
                "unbalanced at {:#x}",
                n.start
            );
            assert_eq!(n.height, 1 + left.0.max(right.0), "stale height");
            let stored = n.value.summary();
            V::update(n);
            assert_eq!(n.value.summary(), stored, "stale value at {:#x}", n.start);
            (n.height, stored)
        }
        walk(self.root, 0, u64::MAX);
    }

    /// Nodes in address order.
    pub(crate) fn iter(&self) -> TreeIter<'_, V> {
        let mut iter = TreeIter {
            stack: [null_mut(); MAX_HEIGHT],
            depth: 0,
            _tree: PhantomData,
        };
        iter.push_left(self.root);
        iter
    }

    /// Unlinks every node and hands each to `release`.
    pub(crate) fn drain(&mut self, mut release: impl FnMut(*mut Node<V>)) {
        while let Some(start) = self.iter().next().map(|n| n.start) {
            release(self.remove(start));
        }
    }
}

/// Returns the new subtree root, or `None`, with nothing changed, if `node`'s range
/// overlaps one in the subtree.
///
/// # Safety
///
/// `root` is a valid AVL subtree or null; `node` is live and unlinked.
unsafe fn insert_at<V: NodeValue>(root: *mut Node<V>, node: *mut Node<V>) -> Option<*mut Node<V>> {
    // SAFETY: the caller's guarantee; recursion stays inside the subtree, and links
    // change only after the recursion below succeeded.
    unsafe {
        if root.is_null() {
            (*node).left = null_mut();
            (*node).right = null_mut();
            refresh(node);
            return Some(node);
        }
        if (*node).start < (*root).end() && (*root).start < (*node).end() {
            return None;
        }
        let child = if (*node).start < (*root).start {
            &mut (*root).left
        } else {
            &mut (*root).right
        };
        let before = shape(*child);
        *child = insert_at(*child, node)?;
        Some(rebalance_after(root, *child, before))
    }
}

/// # Safety
///
/// `root` is a valid AVL subtree or null.
unsafe fn remove_at<V: NodeValue>(
    root: *mut Node<V>,
    start: u64,
    removed: &mut *mut Node<V>,
) -> *mut Node<V> {
    // SAFETY: the caller's guarantee; recursion stays inside the subtree.
    unsafe {
        let Some(r) = root.as_mut() else {
            return root;
        };
        if start != r.start {
            let child = if start < r.start {
                &mut r.left
            } else {
                &mut r.right
            };
            let before = shape(*child);
            *child = remove_at(*child, start, removed);
            return rebalance_after(root, *child, before);
        }
        *removed = root;
        if r.left.is_null() {
            return r.right;
        }
        if r.right.is_null() {
            return r.left;
        }
        let mut successor = null_mut();
        let right = remove_min(r.right, &mut successor);
        (*successor).left = r.left;
        (*successor).right = right;
        rebalance(successor)
    }
}

/// Unlinks the leftmost node of a non-empty subtree into `min`.
///
/// # Safety
///
/// `root` is a valid, non-empty AVL subtree.
unsafe fn remove_min<V: NodeValue>(root: *mut Node<V>, min: &mut *mut Node<V>) -> *mut Node<V> {
    // SAFETY: the caller's guarantee.
    unsafe {
        if (*root).left.is_null() {
            *min = root;
            return (*root).right;
        }
        let before = shape((*root).left);
        (*root).left = remove_min((*root).left, min);
        rebalance_after(root, (*root).left, before)
    }
}

/// # Safety
///
/// `root` is a valid AVL subtree or null.
unsafe fn modify_at<V: NodeValue>(
    root: *mut Node<V>,
    start: u64,
    change: impl FnOnce(&mut Node<V>),
) -> bool {
    // SAFETY: the caller's guarantee; only the path to the node is refreshed.
    unsafe {
        let Some(r) = root.as_mut() else {
            return false;
        };
        let found = if start < r.start {
            modify_at(r.left, start, change)
        } else if start > r.start {
            modify_at(r.right, start, change)
        } else {
            change(r);
            true
        };
        if found {
            refresh(root);
        }
        found
    }
}

/// In-order walk with a fixed stack (no heap).
pub(crate) struct TreeIter<'a, V> {
    stack: [*mut Node<V>; MAX_HEIGHT],
    depth: usize,
    _tree: PhantomData<&'a Node<V>>,
}

impl<V> TreeIter<'_, V> {
    fn push_left(&mut self, mut node: *mut Node<V>) {
        while !node.is_null() {
            self.stack[self.depth] = node;
            self.depth += 1;
            // SAFETY: non-null tree links point to live nodes.
            node = unsafe { (*node).left };
        }
    }
}

impl<'a, V> Iterator for TreeIter<'a, V> {
    type Item = &'a Node<V>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.depth == 0 {
            return None;
        }
        self.depth -= 1;
        // SAFETY: stacked nodes are live for the tree borrow `'a`.
        let node = unsafe { &*self.stack[self.depth] };
        self.push_left(node.right);
        Some(node)
    }
}

/// Frees a detached node's slot back to `pool`.
///
/// # Safety
///
/// `node` came from `pool` and is no longer linked into any tree.
pub(crate) unsafe fn release<V, F: FrameSource, M: PhysMemory>(
    pool: &mut NodePool<F, M>,
    node: *mut Node<V>,
) {
    // SAFETY: nodes hold only plain data, so dropping in place is a no-op; the caller
    // guarantees the slot is ours and unused from now on.
    unsafe {
        ptr::drop_in_place(node);
        pool.give(node.cast());
    }
}
