//! The AVL trees of the vmalloc bookkeeping: free virtual ranges and busy areas.
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

use super::nodes::NodePool;
use crate::{FrameSource, PhysMemory};
use core::mem::size_of;
use core::ptr::{self, null_mut};

/// Deepest AVL tree an iterator's fixed stack can walk (far beyond 2^40 nodes).
#[cfg(test)]
const MAX_HEIGHT: usize = 64;

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

    #[cfg(test)]
    /// Nodes in address order.
    pub(crate) fn iter(&self) -> TreeIter<'_, V> {
        let mut iter = TreeIter {
            stack: [null_mut(); MAX_HEIGHT],
            depth: 0,
            _tree: core::marker::PhantomData,
        };
        iter.push_left(self.root);
        iter
    }

    /// Unlinks every node and hands each to `release`.
    #[cfg(test)]
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
#[cfg(test)]
pub(crate) struct TreeIter<'a, V> {
    stack: [*mut Node<V>; MAX_HEIGHT],
    depth: usize,
    _tree: core::marker::PhantomData<&'a Node<V>>,
}

#[cfg(test)]
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

#[cfg(test)]
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
