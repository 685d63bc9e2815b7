//! Kernel stacks from vmalloc (Linux's `VMAP_STACK`).
//!
//! A stack grows down, so the page that must fault is the one *below* it: a stack
//! area is twice the stack's size, aligned to that size, with the stack in its upper
//! half and the lower half never mapped (the `lead` of its record). An overflow runs
//! into that half and faults, and [`diagnose_fault`](super::Vmalloc::diagnose_fault)
//! calls it a stack overflow instead of letting it corrupt a neighbour. The stack's
//! base is aligned to its size, so `rsp & !(size - 1)` finds it, as Linux's
//! `THREAD_ALIGN` does. The lower half costs virtual space only, of which the region
//! has terabytes; the usual guard page still follows the top.

use super::area::{AreaKind, AreaRecord};
use super::manager::Vmalloc;
use super::options::{Prot, VmOptions};
use crate::{Error, FrameSource, PAGE_SIZE, PhysMemory, TlbFlush};
use x86_64::VirtAddr;

/// A kernel stack made by [`Vmalloc::alloc_stack`], freed when dropped.
pub struct KernelStack<'a, F, M, T>
where
    F: FrameSource + Clone,
    M: PhysMemory + Copy,
    T: TlbFlush,
{
    vmalloc: &'a Vmalloc<F, M, T>,
    base: VirtAddr,
    size: u64,
}

impl<F, M, T> KernelStack<'_, F, M, T>
where
    F: FrameSource + Clone,
    M: PhysMemory + Copy,
    T: TlbFlush,
{
    /// The lowest byte of the stack (aligned to its size).
    pub fn base(&self) -> VirtAddr {
        self.base
    }

    /// One past the highest byte: the initial stack pointer.
    pub fn top(&self) -> VirtAddr {
        self.base + self.size
    }

    /// Bytes of the stack.
    pub fn size(&self) -> u64 {
        self.size
    }
}

impl<F, M, T> Drop for KernelStack<'_, F, M, T>
where
    F: FrameSource + Clone,
    M: PhysMemory + Copy,
    T: TlbFlush,
{
    fn drop(&mut self) {
        // The stack is this value's alone; freeing it cannot fail.
        let _ = self.vmalloc.free_stack(self.base);
    }
}

impl<F, M, T> Vmalloc<F, M, T>
where
    F: FrameSource + Clone,
    M: PhysMemory + Copy,
    T: TlbFlush,
{
    /// A zeroed kernel stack of `size` bytes (a power of two, at least two pages),
    /// aligned to its size, with unmapped memory below it (see the
    /// [module docs](super::stack)). Freed when the returned value is dropped.
    ///
    /// # Errors
    ///
    /// [`Error::ZeroSize`], [`Error::BadAlignment`] for a size that is not a power of
    /// two of at least two pages, [`Error::SizeTooLarge`],
    /// [`Error::OutOfVirtualSpace`], [`Error::OutOfFrames`]; nothing changes on error.
    #[track_caller]
    pub fn alloc_stack(&self, size: usize) -> Result<KernelStack<'_, F, M, T>, Error> {
        let bytes = size as u64;
        if bytes == 0 {
            return Err(Error::ZeroSize);
        }
        if !bytes.is_power_of_two() || bytes < 2 * PAGE_SIZE {
            return Err(Error::BadAlignment);
        }
        let pages = self.pages_for(bytes.checked_mul(2).ok_or(Error::SizeTooLarge)?)? / 2;
        let options = VmOptions {
            prot: Prot::KERNEL_RW,
            tag: "kernel stack",
            ..VmOptions::default()
        };
        let flags = options.prot.leaf_flags()?;
        let mut record = AreaRecord::new(AreaKind::Stack, bytes, flags, &options);
        record.lead = pages;
        self.transact(|cx| {
            let start = cx.create_area(record, bytes)?;
            if let Err(error) = cx.back_pages(start, pages..2 * pages, flags, true) {
                cx.remove_area(start);
                return Err(error);
            }
            cx.inner().data_frames += pages;
            Ok(KernelStack {
                vmalloc: self,
                base: start + bytes,
                size: bytes,
            })
        })
    }

    /// Frees the stack whose base is `base`.
    fn free_stack(&self, base: VirtAddr) -> Result<(), Error> {
        let mut cx = self.lock();
        let (start, _, record) = cx.area_containing(base).ok_or(Error::NotAllocated)?;
        if record.kind != AreaKind::Stack || record.dying || start + record.lead * PAGE_SIZE != base
        {
            return Err(Error::NotAllocated);
        }
        cx.inner().data_frames -= record.mapped_pages;
        cx.retire(start, record);
        Ok(())
    }
}
