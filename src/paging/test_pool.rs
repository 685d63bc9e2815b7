//! Host memory standing in for physical memory, and a frame pool over it, for the
//! page-table tests, the property tests and the benchmark (included by path there).
#![allow(dead_code)]

extern crate std;

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::cell::{Cell, RefCell};
use std::vec::Vec;
// The includer provides these: `crate::` in the library, `vmalloc::` elsewhere.
use super::{Error, FrameSource, OffsetPhysMemory};
use x86_64::structures::paging::{PageTable, PhysFrame};
use x86_64::{PhysAddr, VirtAddr};

/// `frames` zeroed 4 KiB frames of host memory; physical address `p` is byte `p`.
pub struct HostMemory {
    base: *mut u8,
    layout: Layout,
}

impl HostMemory {
    pub fn new(frames: usize) -> Self {
        let layout = Layout::from_size_align(frames * 4096, 4096).unwrap();
        // SAFETY: the layout has a non-zero size.
        let base = unsafe { alloc_zeroed(layout) };
        assert!(!base.is_null(), "host allocation failed");
        Self { base, layout }
    }

    pub fn frames(&self) -> usize {
        self.layout.size() / 4096
    }

    pub fn phys(&self) -> OffsetPhysMemory {
        // SAFETY: the whole buffer stays allocated while `self` lives, and the tests
        // touch no physical address beyond it.
        unsafe { OffsetPhysMemory::new(VirtAddr::from_ptr(self.base)) }
    }

    pub fn offset(&self) -> u64 {
        self.base as u64
    }

    /// A copy of the frame at `frame`.
    pub fn frame_copy(&self, frame: PhysFrame) -> [u8; 4096] {
        let phys = frame.start_address().as_u64() as usize;
        assert!(phys + 4096 <= self.layout.size());
        // SAFETY: in bounds (checked); frames are plain bytes.
        unsafe { self.base.add(phys).cast::<[u8; 4096]>().read() }
    }

    /// Writes `bytes` at physical address `phys`.
    pub fn write(&self, phys: PhysAddr, bytes: &[u8]) {
        let phys = phys.as_u64() as usize;
        assert!(phys + bytes.len() <= self.layout.size());
        // SAFETY: in bounds (checked); no reference into the buffer is alive.
        unsafe {
            self.base
                .add(phys)
                .copy_from_nonoverlapping(bytes.as_ptr(), bytes.len())
        }
    }

    /// A copy of the page table at `frame`.
    pub fn table_copy(&self, frame: PhysFrame) -> [u64; 512] {
        let bytes = self.frame_copy(frame);
        core::array::from_fn(|i| u64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().unwrap()))
    }

    /// The `x86_64` crate's own walker over the tables rooted at `root`.
    ///
    /// # Safety
    ///
    /// No other reference to the tables is alive while the result is.
    pub unsafe fn offset_page_table(
        &self,
        root: PhysFrame,
    ) -> x86_64::structures::paging::OffsetPageTable<'_> {
        let pml4 = (self.offset() + root.start_address().as_u64()) as *mut PageTable;
        // SAFETY: per the caller; all physical memory is mapped at `offset`.
        unsafe {
            x86_64::structures::paging::OffsetPageTable::new(
                &mut *pml4,
                VirtAddr::new(self.offset()),
            )
        }
    }
}

impl Drop for HostMemory {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.base, self.layout) }
    }
}

/// A frame pool over frames `[1, frames)` of a [`HostMemory`], in scattered order.
pub struct Pool {
    free: RefCell<Vec<PhysFrame>>,
    allocated: RefCell<Vec<bool>>,
    /// Allocations until one fails on purpose (`Some(1)`: the next one).
    fail_in: Cell<Option<usize>>,
    allocs: Cell<usize>,
}

impl Pool {
    /// Frame 0 stays out so that a zero address in an entry is never a real frame.
    pub fn new(frames: usize, seed: u64) -> Self {
        let mut free: Vec<PhysFrame> = (1..frames as u64)
            .map(|i| PhysFrame::containing_address(PhysAddr::new(i * 4096)))
            .collect();
        shuffle(&mut free, seed);
        Self {
            free: RefCell::new(free),
            allocated: RefCell::new(std::vec![false; frames]),
            fail_in: Cell::new(None),
            allocs: Cell::new(0),
        }
    }

    /// Frames handed out and not returned.
    pub fn out(&self) -> usize {
        self.allocated.borrow().iter().filter(|a| **a).count()
    }

    /// Successful allocations so far.
    pub fn allocs(&self) -> usize {
        self.allocs.get()
    }

    /// Makes the `k`-th allocation from now (1-based) fail, and every one after it.
    pub fn fail_from(&self, k: Option<usize>) {
        self.fail_in.set(k);
    }

    /// `n` frames, panicking if the pool runs dry.
    pub fn take(&self, n: usize) -> Vec<PhysFrame> {
        (0..n)
            .map(|_| self.alloc_frame().expect("pool exhausted"))
            .collect()
    }
}

// SAFETY: frames lie in the host buffer the tests reach them through, and each is
// handed out once until freed.
unsafe impl FrameSource for Pool {
    fn alloc_frame(&self) -> Option<PhysFrame> {
        if let Some(k) = self.fail_in.get() {
            if k <= 1 {
                return None;
            }
            self.fail_in.set(Some(k - 1));
        }
        let frame = self.free.borrow_mut().pop()?;
        self.allocated.borrow_mut()[(frame.start_address().as_u64() / 4096) as usize] = true;
        self.allocs.set(self.allocs.get() + 1);
        Some(frame)
    }

    fn free_frame(&self, frame: PhysFrame) -> Result<(), Error> {
        let index = (frame.start_address().as_u64() / 4096) as usize;
        let mut allocated = self.allocated.borrow_mut();
        match allocated.get_mut(index) {
            None => Err(Error::FrameNotManaged),
            Some(false) => Err(Error::FrameNotAllocated),
            Some(slot) => {
                *slot = false;
                self.free.borrow_mut().push(frame);
                Ok(())
            }
        }
    }

    fn free_frames(&self, frames: &[PhysFrame]) -> Result<(), Error> {
        for (i, frame) in frames.iter().enumerate() {
            let index = (frame.start_address().as_u64() / 4096) as usize;
            let allocated = self.allocated.borrow();
            match allocated.get(index) {
                None => return Err(Error::FrameNotManaged),
                Some(false) => return Err(Error::FrameNotAllocated),
                Some(true) if frames[..i].contains(frame) => return Err(Error::FrameNotAllocated),
                Some(true) => {}
            }
        }
        for frame in frames {
            self.free_frame(*frame)?;
        }
        Ok(())
    }
}

/// Fisher-Yates with a xorshift generator: deterministic scatter.
fn shuffle<T>(items: &mut [T], seed: u64) {
    let mut state = seed | 1;
    for i in (1..items.len()).rev() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        items.swap(i, (state % (i as u64 + 1)) as usize);
    }
}
