//! Virtual address space of the vmalloc region: free ranges and busy areas.
//!
//! Like Linux's `mm/vmalloc.c`, the region `[start, start + size)` is described by two
//! trees keyed by start address, both AVL trees from [`tree`](super::tree) whose nodes
//! come from a shared [`NodePool`]:
//!
//! - [`VSpace`] keeps the *free* ranges, each node augmented with the largest free size
//!   in its subtree. Allocation is lowest-address first fit: starting at the root, skip
//!   any subtree whose largest free size is below the request; otherwise search the left
//!   subtree first (lower addresses), then the node itself (its start rounded up to the
//!   alignment must leave `size` bytes before its end), then the right subtree. When
//!   the alignment is at most a page every range of `size` bytes fits, so the first
//!   subtree entered always succeeds and the walk is one root-to-leaf path: O(log n).
//!   With larger alignments a range can be long enough and still miss its aligned
//!   start; the walk then backtracks, but only through ranges whose length lies in
//!   `[size, size + align - 1)` (Linux's `find_vmap_lowest_match` descends on
//!   `size + align - 1` for the same reason and accepts a non-lowest fit; this search
//!   stays exact, which is what the property test checks). The chosen range is split
//!   into the part before the allocation, the allocation and the part after; only
//!   when both outer parts are non-empty is a node needed, and it is reserved first.
//!   Freeing coalesces with the free neighbours found by a floor/ceiling descent, so
//!   the tree never holds two adjacent ranges, and needs a new node only when neither
//!   neighbour is adjacent.
//! - [`AreaMap`] keeps the *live* areas with a caller-defined `Copy` payload, and finds
//!   the area containing an address by a floor descent (greatest start `<=` address).
//!
//! Freed areas waiting for the TLB flush are in neither tree: they sit on the
//! [purge list](super::purge), their ranges still out of [`VSpace`].
//!
//! Why AVL with augmentation rather than the sorted vector of free ranges a small
//! kernel would start with: the vector's linear first fit and its shifting inserts
//! grow with the number of ranges, the tree's cost only with its depth
//! (`benches/vspace.rs` measures both; figures in the README). A treap or red-black
//! tree would have the same O(log n) shape; AVL keeps the path shortest for lookups,
//! which vmalloc does on every `vfree`.

use super::nodes::NodePool;
use super::tree::{MaxFree, Node, Payload, Tree, release};
use crate::{Error, FrameSource, PAGE_SIZE, PhysMemory};
use x86_64::VirtAddr;

/// Lowest bit outside the lower canonical half.
const LOWER_HALF_END: u64 = 1 << 47;

/// The free virtual ranges of one region (see the module doc).
pub(crate) struct VSpace {
    free: Tree<MaxFree>,
    start: u64,
    size: u64,
    free_total: u64,
}

impl VSpace {
    /// The region `[start, start + size)`, all free.
    ///
    /// # Errors
    ///
    /// [`Error::ZeroSize`]; [`Error::Unaligned`] unless both are page multiples;
    /// [`Error::RangeWraps`] if the end passes 2^64 - 1; [`Error::NonCanonical`] if the
    /// range crosses the non-canonical hole; [`Error::OutOfFrames`].
    pub(crate) fn new<F: FrameSource, M: PhysMemory>(
        pool: &mut NodePool<F, M>,
        start: VirtAddr,
        size: u64,
    ) -> Result<Self, Error> {
        let start = start.as_u64();
        check_region(start, size)?;
        pool.reserve(1)?;
        let mut free = Tree::new();
        free.insert(pool.take(free_node(start, size)));
        Ok(Self {
            free,
            start,
            size,
            free_total: size,
        })
    }

    /// A space with no region, for a manager that is being torn down.
    pub(crate) const fn empty() -> Self {
        Self {
            free: Tree::new(),
            start: 0,
            size: 0,
            free_total: 0,
        }
    }

    #[cfg(test)]
    /// First address of the region.
    pub(crate) fn region_start(&self) -> VirtAddr {
        VirtAddr::new_truncate(self.start)
    }

    #[cfg(test)]
    /// Size of the region in bytes.
    pub(crate) fn region_size(&self) -> u64 {
        self.size
    }

    /// Bytes currently free.
    pub(crate) fn free_total(&self) -> u64 {
        self.free_total
    }

    /// Length of the largest free range.
    pub(crate) fn largest_free(&self) -> u64 {
        // SAFETY: the root is live or null.
        unsafe { self.free.root().as_ref().map_or(0, |root| root.value.0) }
    }

    #[cfg(test)]
    /// Number of free ranges (tree nodes).
    pub(crate) fn free_ranges(&self) -> usize {
        self.free.len()
    }

    #[cfg(test)]
    /// Free ranges as `(start, size)`, in address order.
    pub(crate) fn iter_free(&self) -> impl Iterator<Item = (VirtAddr, u64)> + '_ {
        self.free
            .iter()
            .map(|n| (VirtAddr::new_truncate(n.start), n.size))
    }

    /// The lowest `align`-aligned range of `size` bytes that is free, now busy.
    ///
    /// # Errors
    ///
    /// [`Error::ZeroSize`]; [`Error::Unaligned`] if `size` is not a page multiple;
    /// [`Error::BadAlignment`] unless `align` is a power of two; [`Error::SizeTooLarge`]
    /// if `size` exceeds the region; [`Error::OutOfVirtualSpace`] if no free range fits
    /// (including alignments no address of the region satisfies);
    /// [`Error::OutOfFrames`]. Nothing changes on error.
    pub(crate) fn alloc<F: FrameSource, M: PhysMemory>(
        &mut self,
        pool: &mut NodePool<F, M>,
        size: u64,
        align: u64,
    ) -> Result<VirtAddr, Error> {
        check_request(size, align, self.size)?;
        let align = align.max(PAGE_SIZE);
        // SAFETY: the root is this tree's valid root.
        let (range_start, range_end, addr) =
            unsafe { lowest_fit(self.free.root(), size, align) }.ok_or(Error::OutOfVirtualSpace)?;
        let (head, tail) = (addr - range_start, range_end - (addr + size));
        if head > 0 && tail > 0 {
            pool.reserve(1)?;
            self.free.modify(range_start, |n| n.size = head);
            self.free.insert(pool.take(free_node(addr + size, tail)));
        } else if head > 0 {
            self.free.modify(range_start, |n| n.size = head);
        } else if tail > 0 {
            self.free.modify(range_start, |n| {
                n.start = addr + size;
                n.size = tail;
            });
        } else {
            self.remove_free(pool, range_start);
        }
        self.free_total -= size;
        Ok(VirtAddr::new_truncate(addr))
    }

    /// Gives `[start, start + size)` back, merging it with free neighbours.
    ///
    /// A new node is needed only when neither neighbour is free; freeing right after
    /// [`AreaMap::remove`] or the purge list's `pop` (each returns a slot to the shared
    /// pool) never fails.
    ///
    /// # Errors
    ///
    /// [`Error::OutOfFrames`]; nothing changes.
    pub(crate) fn free<F: FrameSource, M: PhysMemory>(
        &mut self,
        pool: &mut NodePool<F, M>,
        start: VirtAddr,
        size: u64,
    ) -> Result<(), Error> {
        let (start, end) = (start.as_u64(), start.as_u64() + size);
        self.debug_check_busy(start, size);
        let (before, after) = self.free.around(start);
        let before = before.filter(|n| n.end() == start);
        let after = after.filter(|n| n.start == end);
        match (before.map(|n| n.start), after.map(|n| (n.start, n.size))) {
            (Some(prev), Some((next, next_size))) => {
                self.remove_free(pool, next);
                self.free.modify(prev, |n| n.size += size + next_size);
            }
            (Some(prev), None) => {
                self.free.modify(prev, |n| n.size += size);
            }
            (None, Some((next, _))) => {
                self.free.modify(next, |n| {
                    n.start = start;
                    n.size += size;
                });
            }
            (None, None) => {
                pool.reserve(1)?;
                self.free.insert(pool.take(free_node(start, size)));
            }
        }
        self.free_total += size;
        Ok(())
    }

    /// Grows the busy range `[start, start + old_size)` to `new_size` in place if the
    /// range right after it is free; false (and nothing changes) otherwise.
    pub(crate) fn try_extend<F: FrameSource, M: PhysMemory>(
        &mut self,
        pool: &mut NodePool<F, M>,
        start: VirtAddr,
        old_size: u64,
        new_size: u64,
    ) -> bool {
        if new_size <= old_size || !new_size.is_multiple_of(PAGE_SIZE) {
            return false;
        }
        let (tail_start, grow) = (start.as_u64() + old_size, new_size - old_size);
        let Some(tail_size) = self
            .free
            .ceiling(tail_start)
            .filter(|n| n.start == tail_start && n.size >= grow)
            .map(|n| n.size)
        else {
            return false;
        };
        if tail_size == grow {
            self.remove_free(pool, tail_start);
        } else {
            self.free.modify(tail_start, |n| {
                n.start += grow;
                n.size -= grow;
            });
        }
        self.free_total -= grow;
        true
    }

    /// Shrinks the busy range `[start, start + old_size)` to `new_size`, giving the tail
    /// back as [`free`](Self::free) does.
    ///
    /// # Errors
    ///
    /// [`Error::Unaligned`] if `new_size` is not a page multiple; [`Error::ZeroSize`]
    /// (use [`free`](Self::free)); [`Error::SizeTooLarge`]
    /// if it exceeds `old_size`; [`Error::OutOfFrames`]. Nothing changes on error.
    pub(crate) fn shrink<F: FrameSource, M: PhysMemory>(
        &mut self,
        pool: &mut NodePool<F, M>,
        start: VirtAddr,
        old_size: u64,
        new_size: u64,
    ) -> Result<(), Error> {
        if !new_size.is_multiple_of(PAGE_SIZE) {
            return Err(Error::Unaligned);
        }
        if new_size == 0 {
            return Err(Error::ZeroSize);
        }
        if new_size > old_size {
            return Err(Error::SizeTooLarge);
        }
        if new_size == old_size {
            return Ok(());
        }
        self.free(pool, start + new_size, old_size - new_size)
    }

    fn remove_free<F: FrameSource, M: PhysMemory>(
        &mut self,
        pool: &mut NodePool<F, M>,
        start: u64,
    ) {
        let node = self.free.remove(start);
        // SAFETY: the node came from `pool` and was just unlinked.
        unsafe { release(pool, node) };
    }

    /// A freed range must be page-aligned, inside the region and entirely busy.
    fn debug_check_busy(&self, start: u64, size: u64) {
        debug_assert!(
            size > 0 && start.is_multiple_of(PAGE_SIZE) && size.is_multiple_of(PAGE_SIZE)
        );
        debug_assert!(start >= self.start && start + size <= self.start + self.size);
        debug_assert!(
            self.free.floor(start).is_none_or(|n| n.end() <= start),
            "range freed twice"
        );
        debug_assert!(
            self.free
                .ceiling(start)
                .is_none_or(|n| n.start >= start + size),
            "range freed twice"
        );
    }
}

fn free_node(start: u64, size: u64) -> Node<MaxFree> {
    Node {
        left: core::ptr::null_mut(),
        right: core::ptr::null_mut(),
        start,
        size,
        height: 1,
        value: MaxFree(size),
    }
}

/// Checks that `[start, start + size)` can be a region: page-aligned, not empty,
/// not containing address 0 (areas there would be null pointers), inside one
/// canonical half, and ending at a canonical address (so the end of its last area,
/// guard page included, can be named).
///
/// # Errors
///
/// [`Error::ZeroSize`], [`Error::Unaligned`], [`Error::NullPointer`] for a region
/// starting at 0, [`Error::RangeWraps`] for one reaching the end of the address
/// space, [`Error::NonCanonical`] otherwise.
pub(crate) fn check_region(start: u64, size: u64) -> Result<(), Error> {
    if size == 0 {
        return Err(Error::ZeroSize);
    }
    if !start.is_multiple_of(PAGE_SIZE) || !size.is_multiple_of(PAGE_SIZE) {
        return Err(Error::Unaligned);
    }
    if start == 0 {
        return Err(Error::NullPointer);
    }
    let end = start.checked_add(size).ok_or(Error::RangeWraps)?;
    let crosses_hole = start < LOWER_HALF_END && end > LOWER_HALF_END;
    if crosses_hole || VirtAddr::try_new(start).is_err() || VirtAddr::try_new(end).is_err() {
        return Err(Error::NonCanonical);
    }
    Ok(())
}

fn check_request(size: u64, align: u64, region_size: u64) -> Result<(), Error> {
    if size == 0 {
        return Err(Error::ZeroSize);
    }
    if !size.is_multiple_of(PAGE_SIZE) {
        return Err(Error::Unaligned);
    }
    if !align.is_power_of_two() {
        return Err(Error::BadAlignment);
    }
    if size > region_size {
        return Err(Error::SizeTooLarge);
    }
    Ok(())
}

/// Where `size` bytes aligned to `align` fit in free range `[start, start + len)`.
fn fit_in(start: u64, len: u64, size: u64, align: u64) -> Option<u64> {
    let addr = start.checked_next_multiple_of(align)?;
    let end = start + len;
    (addr <= end && end - addr >= size).then_some(addr)
}

/// Lowest fit in the subtree: `(start and end of the free range, allocated address)`.
///
/// # Safety
///
/// `node` is a valid free-tree subtree or null.
unsafe fn lowest_fit(node: *mut Node<MaxFree>, size: u64, align: u64) -> Option<(u64, u64, u64)> {
    // SAFETY: the caller's guarantee; children of live nodes are live or null.
    unsafe {
        let n = node.as_ref().filter(|n| n.value.0 >= size)?;
        if let Some(hit) = lowest_fit(n.left, size, align) {
            return Some(hit);
        }
        if let Some(addr) = fit_in(n.start, n.size, size, align) {
            return Some((n.start, n.end(), addr));
        }
        lowest_fit(n.right, size, align)
    }
}

/// One busy area: its range and the manager's record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Area<T> {
    /// First address.
    pub(crate) start: VirtAddr,
    /// Length in bytes.
    pub(crate) size: u64,
    /// What the manager keeps about the area.
    pub(crate) data: T,
}

/// The busy areas, keyed by start address (see the module doc).
pub(crate) struct AreaMap<T: Copy> {
    busy: Tree<Payload<T>>,
}

impl<T: Copy> AreaMap<T> {
    /// An empty map.
    pub(crate) const fn new() -> Self {
        Self { busy: Tree::new() }
    }

    /// Number of areas.
    pub(crate) fn len(&self) -> usize {
        self.busy.len()
    }

    #[cfg(test)]
    /// Whether there are no areas.
    pub(crate) fn is_empty(&self) -> bool {
        self.busy.len() == 0
    }

    /// Records area `[start, start + size)`.
    ///
    /// # Errors
    ///
    /// [`Error::ZeroSize`]; [`Error::RangeWraps`]; [`Error::Overlap`] if it overlaps an
    /// area already recorded; [`Error::OutOfFrames`]. Nothing changes on error.
    pub(crate) fn insert<F: FrameSource, M: PhysMemory>(
        &mut self,
        pool: &mut NodePool<F, M>,
        start: VirtAddr,
        size: u64,
        data: T,
    ) -> Result<(), Error> {
        let start = start.as_u64();
        if size == 0 {
            return Err(Error::ZeroSize);
        }
        start.checked_add(size).ok_or(Error::RangeWraps)?;
        pool.reserve(1)?;
        let node = pool.take(Node {
            left: core::ptr::null_mut(),
            right: core::ptr::null_mut(),
            start,
            size,
            height: 1,
            value: Payload(data),
        });
        if !self.busy.insert_disjoint(node) {
            // SAFETY: the node was taken from `pool` above and never linked.
            unsafe { release(pool, node) };
            return Err(Error::Overlap);
        }
        Ok(())
    }

    /// Removes the area starting exactly at `start` and returns it.
    pub(crate) fn remove<F: FrameSource, M: PhysMemory>(
        &mut self,
        pool: &mut NodePool<F, M>,
        start: VirtAddr,
    ) -> Option<Area<T>> {
        let node = self.busy.remove(start.as_u64());
        // SAFETY: non-null means the node was just unlinked from this tree.
        let area = unsafe { node.as_ref() }.map(area_of)?;
        // SAFETY: the node came from `pool` and is no longer linked.
        unsafe { release(pool, node) };
        Some(area)
    }

    #[cfg(test)]
    /// The area starting exactly at `start`.
    pub(crate) fn get(&self, start: VirtAddr) -> Option<Area<T>> {
        self.busy
            .floor(start.as_u64())
            .filter(|n| n.start == start.as_u64())
            .map(area_of)
    }

    /// The area whose range contains `addr` (its start or any interior address).
    pub(crate) fn find_containing(&self, addr: VirtAddr) -> Option<Area<T>> {
        let addr = addr.as_u64();
        self.busy
            .floor(addr)
            .filter(|n| addr < n.end())
            .map(area_of)
    }

    /// The first area starting at or after `addr`.
    pub(crate) fn first_from(&self, addr: u64) -> Option<Area<T>> {
        self.busy.ceiling(addr).map(area_of)
    }

    /// The record of the area starting exactly at `start`, to update in place.
    pub(crate) fn data_mut(&mut self, start: VirtAddr) -> Option<&mut T> {
        self.busy.get_mut(start.as_u64()).map(|n| &mut n.value.0)
    }

    /// Changes the size of the area starting at `start` (after a successful
    /// [`VSpace::try_extend`] or [`VSpace::shrink`]).
    ///
    /// # Errors
    ///
    /// [`Error::ZeroSize`]; [`Error::RangeWraps`]; [`Error::Overlap`] if the new end passes the next area's
    /// start; [`Error::NotAllocated`] if no area starts there.
    pub(crate) fn resize(&mut self, start: VirtAddr, new_size: u64) -> Result<(), Error> {
        let start = start.as_u64();
        if new_size == 0 {
            return Err(Error::ZeroSize);
        }
        let end = start.checked_add(new_size).ok_or(Error::RangeWraps)?;
        if self.busy.ceiling(start + 1).is_some_and(|n| n.start < end) {
            return Err(Error::Overlap);
        }
        let node = self.busy.get_mut(start).ok_or(Error::NotAllocated)?;
        node.size = new_size;
        Ok(())
    }

    #[cfg(test)]
    /// Areas in address order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = Area<T>> + '_ {
        self.busy.iter().map(area_of)
    }

    #[cfg(test)]
    /// Removes every area, returning the nodes to `pool`.
    pub(crate) fn clear<F: FrameSource, M: PhysMemory>(&mut self, pool: &mut NodePool<F, M>) {
        // SAFETY: drained nodes came from `pool` and are unlinked.
        self.busy.drain(|node| unsafe { release(pool, node) });
    }
}

impl<T: Copy> Default for AreaMap<T> {
    fn default() -> Self {
        Self::new()
    }
}

fn area_of<T: Copy>(node: &Node<Payload<T>>) -> Area<T> {
    Area {
        start: VirtAddr::new_truncate(node.start),
        size: node.size,
        data: node.value.0,
    }
}

#[cfg(test)]
mod test;
