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
//! Slabs are never given back to the frame source: the bookkeeping stays as large as
//! its high-water mark, as a slab cache without a shrinker would. This keeps node
//! memory valid for as long as any tree may point into it.
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
    frame: PhysFrame<Size4KiB>,
}

/// Fixed-size node slots carved from 4 KiB frames (see the module doc).
pub(crate) struct NodePool<F: FrameSource, M: PhysMemory> {
    frames: F,
    phys: M,
    slot_size: usize,
    free: *mut FreeSlot,
    free_count: usize,
    slabs: *mut SlabHeader,
    frame_count: usize,
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
            free: null_mut(),
            free_count: 0,
            slabs: null_mut(),
            frame_count: 0,
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
        self.frame_count
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
                None => return Err(self.give_back(&taken)),
            }
        }
        for frame in taken.iter().flatten() {
            self.carve(*frame);
        }
        Ok(())
    }

    /// Returns frames taken by a failed [`reserve`](Self::reserve).
    fn give_back(&self, taken: &[Option<PhysFrame<Size4KiB>>]) -> Error {
        for frame in taken.iter().flatten() {
            // The frame came from this source a moment ago; refusing it back would be
            // the source's bug, and the pool has nowhere better to put it.
            let _ = self.frames.free_frame(*frame);
        }
        Error::OutOfFrames
    }

    /// Links a fresh frame in as a slab and puts its slots on the free list.
    fn carve(&mut self, frame: PhysFrame<Size4KiB>) {
        let base = self.phys.phys_to_virt(frame.start_address());
        let header = base.cast::<SlabHeader>();
        // SAFETY: `PhysMemory` makes `base` valid for the whole frame, which this pool
        // now owns; the header fits in the first slot and `base` is 4 KiB-aligned.
        unsafe {
            header.write(SlabHeader {
                next: self.slabs,
                frame,
            })
        };
        self.slabs = header;
        self.frame_count += 1;
        for index in 1..=self.slots_per_frame() {
            // SAFETY: slot `index` lies inside the frame (see `slots_per_frame`).
            let slot = unsafe { base.add(index * self.slot_size) };
            self.push_free(slot.cast());
        }
    }

    fn push_free(&mut self, slot: *mut FreeSlot) {
        // SAFETY: `slot` is an unused, aligned slot of one of this pool's slabs.
        unsafe { slot.write(FreeSlot { next: self.free }) };
        self.free = slot;
        self.free_count += 1;
    }

    /// Takes a reserved slot and writes `node` into it.
    ///
    /// # Panics
    ///
    /// If nothing was reserved, or `N` does not fit a slot: both are bugs in the caller.
    pub(crate) fn take<N>(&mut self, node: N) -> *mut N {
        assert!(size_of::<N>() <= self.slot_size && align_of::<N>() <= SLOT_ALIGN);
        let slot = self.free;
        assert!(!slot.is_null(), "node taken without a reservation");
        // SAFETY: free-list slots hold a valid `FreeSlot`.
        self.free = unsafe { (*slot).next };
        self.free_count -= 1;
        let node_ptr = slot.cast::<N>();
        // SAFETY: the slot is unused, large and aligned enough for `N` (checked above).
        unsafe { node_ptr.write(node) };
        node_ptr
    }

    /// Puts a node's slot back on the free list.
    ///
    /// # Safety
    ///
    /// `node` came from [`take`](Self::take) on this pool, is no longer linked into any
    /// tree and is not used again.
    pub(crate) unsafe fn give(&mut self, node: *mut u8) {
        self.push_free(node.cast());
    }

    /// Physical start addresses of the slab frames, newest first (for diagnostics).
    pub(crate) fn slab_frames(&self) -> impl Iterator<Item = PhysAddr> + '_ {
        let mut slab = self.slabs;
        core::iter::from_fn(move || {
            if slab.is_null() {
                return None;
            }
            // SAFETY: slab headers stay valid for the pool's lifetime.
            let header = unsafe { &*slab };
            slab = header.next;
            Some(header.frame.start_address())
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
