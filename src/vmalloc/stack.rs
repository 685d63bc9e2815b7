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
//!
//! Making a stack maps pages and freeing one needs a TLB flush, so a kernel that
//! creates threads often keeps a few freed stacks: a [`StackCache`] holds two per CPU
//! (Linux's `NR_CACHED_STACKS`), and a stack it hands out again is zeroed first. A
//! cache serves the manager its first stack came from and refuses every other
//! ([`Error::WrongManager`]), a manager made later at the same address included: a
//! stack it keeps is a live area of that manager alone.

use super::area::{AreaKind, AreaRecord};
use super::manager::Vmalloc;
use super::options::{Prot, VmOptions};
use crate::percpu::PerCpu;
use crate::smp::Cpus;
use crate::sync::IrqOff;
use crate::{Error, FrameSource, PAGE_SIZE, PhysMemory, TlbFlush};
use core::panic::Location;
use core::sync::atomic::{AtomicU64, Ordering};
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
    /// Where the stack goes when dropped, if it came from a cache.
    cache: Option<&'a dyn Park>,
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
        if self
            .cache
            .is_some_and(|cache| cache.park(self.base, self.size))
        {
            return;
        }
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
    /// A stack size's bytes and pages, or the error [`alloc_stack`](Self::alloc_stack)
    /// refuses it with.
    fn stack_pages(&self, size: usize) -> Result<(u64, u64), Error> {
        let bytes = size as u64;
        if bytes == 0 {
            return Err(Error::ZeroSize);
        }
        if !bytes.is_power_of_two() || bytes < 2 * PAGE_SIZE {
            return Err(Error::BadAlignment);
        }
        let pages = self.pages_for(bytes.checked_mul(2).ok_or(Error::SizeTooLarge)?)? / 2;
        Ok((bytes, pages))
    }

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
        let (bytes, pages) = self.stack_pages(size)?;
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
                cache: None,
            })
        })
    }

    /// Frees the stack whose base is `base`.
    fn free_stack(&self, base: VirtAddr) -> Result<(), Error> {
        let mut cx = self.lock();
        let (start, record) = stack_at(&cx.area_containing(base), base)?;
        cx.inner().uncount_data(&record);
        cx.retire(start, record);
        Ok(())
    }

    /// The live stack of `size` bytes at `base`, zeroed again and listed under
    /// `caller` (who holds it now), if this manager has one.
    fn reuse_stack(
        &self,
        base: VirtAddr,
        size: u64,
        caller: &'static Location<'static>,
    ) -> Option<KernelStack<'_, F, M, T>> {
        let mut cx = self.lock();
        let (start, record) = stack_at(&cx.area_containing(base), base).ok()?;
        if record.size != size {
            return None;
        }
        let lead = record.lead * PAGE_SIZE;
        cx.zero_bytes(start, lead, lead + size);
        cx.record_mut(start).caller = caller;
        Some(KernelStack {
            vmalloc: self,
            base,
            size,
            cache: None,
        })
    }
}

/// The start and record of the live stack whose base is `base`, from the area
/// containing it.
fn stack_at(
    area: &Option<(VirtAddr, u64, AreaRecord)>,
    base: VirtAddr,
) -> Result<(VirtAddr, AreaRecord), Error> {
    match *area {
        Some((start, _, record))
            if record.kind == AreaKind::Stack
                && !record.dying
                && start + record.lead * PAGE_SIZE == base =>
        {
            Ok((start, record))
        }
        _ => Err(Error::NotAllocated),
    }
}

/// Stacks each CPU keeps.
const CACHED_PER_CPU: usize = 2;

/// What a dropped [`KernelStack`] from a cache needs of it.
trait Park: Sync {
    /// Keeps the stack at `base` for this CPU; false if its slots are full.
    fn park(&self, base: VirtAddr, size: u64) -> bool;
}

/// Freed stacks kept per CPU for the next [`alloc`](Self::alloc) on that CPU; see the
/// [module docs](self). One cache serves one manager: the one its first stack
/// came from (a call that hands out no stack binds it to none).
/// It holds no reference to that manager, so dropping it frees nothing: the stacks
/// it keeps stay allocated until [`drain`](Self::drain) gives them back or the
/// manager is dropped (which frees every area). Drain a cache before dropping it.
pub struct StackCache<C: Cpus> {
    cpus: C,
    /// The identity of the manager the cache serves; 0 before its first stack.
    manager: AtomicU64,
    /// Each CPU's slots: a cached stack's base with log2 of its size in the low bits,
    /// or 0. Any CPU may take one (`drain`), so they are swapped atomically.
    slots: PerCpu<[AtomicU64; CACHED_PER_CPU]>,
}

impl<C: Cpus> StackCache<C> {
    /// An empty cache over the kernel's `cpus`; `const`, for a `static`.
    pub const fn new(cpus: C) -> Self {
        Self {
            cpus,
            manager: AtomicU64::new(0),
            slots: PerCpu::new(),
        }
    }

    /// A stack of `size` bytes from `vmalloc`: one of that size this CPU freed,
    /// zeroed again, or a new one ([`Vmalloc::alloc_stack`]). Dropped, it comes back
    /// to this cache while the CPU has room. The CPU's cached stacks of other sizes
    /// stay cached; on error nothing changes ([`drain`](Self::drain) gives the
    /// cached stacks back, to a kernel short of memory).
    ///
    /// # Errors
    ///
    /// [`Error::WrongManager`] if the cache serves another manager; otherwise as
    /// [`Vmalloc::alloc_stack`].
    #[track_caller]
    pub fn alloc<'a, F, M, T>(
        &'a self,
        vmalloc: &'a Vmalloc<F, M, T>,
        size: usize,
    ) -> Result<KernelStack<'a, F, M, T>, Error>
    where
        F: FrameSource + Clone,
        M: PhysMemory + Copy,
        T: TlbFlush,
    {
        // Bound once and for good: bound to this manager, every stack cached is its
        // own; unbound, none is (a stack parked after this look is another's).
        let bound = self.bound_to(vmalloc.id)?;
        // A size `alloc_stack` refuses leaves the cached stacks where they are.
        vmalloc.stack_pages(size)?;
        let slots = if bound { self.slots_here() } else { &[] };
        for slot in slots {
            let packed = slot.load(Ordering::Relaxed);
            if packed == 0
                || unpack(packed).1 != size as u64
                || slot
                    .compare_exchange(packed, 0, Ordering::AcqRel, Ordering::Relaxed)
                    .is_err()
            {
                continue;
            }
            let (base, bytes) = unpack(packed);
            if let Some(mut stack) = vmalloc.reuse_stack(base, bytes, Location::caller()) {
                stack.cache = Some(self);
                return Ok(stack);
            }
            let _ = vmalloc.free_stack(base);
        }
        // Stacks of other sizes stay cached, and a call that fails changes nothing
        // (`drain` gives the cached stacks back).
        let mut stack = vmalloc.alloc_stack(size)?;
        // Bound by its first stack; should another CPU have bound it to another
        // manager meanwhile, the stack goes back (dropped before it joins the cache).
        self.bind(vmalloc.id)?;
        stack.cache = Some(self);
        Ok(stack)
    }

    /// Gives every cached stack back to `vmalloc`.
    ///
    /// # Errors
    ///
    /// [`Error::WrongManager`] if the cache serves another manager (nothing changes).
    pub fn drain<F, M, T>(&self, vmalloc: &Vmalloc<F, M, T>) -> Result<(), Error>
    where
        F: FrameSource + Clone,
        M: PhysMemory + Copy,
        T: TlbFlush,
    {
        // An unbound cache holds no stack: nothing to give back, and no binding.
        if !self.bound_to(vmalloc.id)? {
            return Ok(());
        }
        for (_, slots) in self.slots.each() {
            for slot in slots {
                let packed = slot.swap(0, Ordering::AcqRel);
                if packed != 0 {
                    let _ = vmalloc.free_stack(unpack(packed).0);
                }
            }
        }
        Ok(())
    }

    /// Whether the cache is bound to the manager `id` (`false`: unbound, so it may
    /// be); [`Error::WrongManager`] if it is bound to another.
    fn bound_to(&self, id: u64) -> Result<bool, Error> {
        match self.manager.load(Ordering::Acquire) {
            0 => Ok(false),
            bound if bound == id => Ok(true),
            _ => Err(Error::WrongManager),
        }
    }

    /// Binds the cache to the manager `id`, unless it is bound already: then only to
    /// that one.
    fn bind(&self, id: u64) -> Result<(), Error> {
        match self
            .manager
            .compare_exchange(0, id, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => Ok(()),
            Err(bound) if bound == id => Ok(()),
            Err(_) => Err(Error::WrongManager),
        }
    }

    /// Stacks the cache holds.
    pub fn cached(&self) -> usize {
        self.slots
            .each()
            .flat_map(|(_, slots)| slots)
            .filter(|slot| slot.load(Ordering::Relaxed) != 0)
            .count()
    }

    /// This CPU's slots (none for an index past [`MAX_CPUS`]). The index is read
    /// with interrupts held off, as [`Cpus`] asks; the task may move on afterwards,
    /// and any CPU may use any slot (they are swapped atomically), so it is only
    /// where to look first.
    fn slots_here(&self) -> &[AtomicU64] {
        let cpu = {
            let _irq = IrqOff::with(&self.cpus);
            self.cpus.current()
        };
        self.slots.get(cpu).map_or(&[], |slots| slots.as_slice())
    }
}

impl<C: Cpus> Park for StackCache<C> {
    fn park(&self, base: VirtAddr, size: u64) -> bool {
        let packed = base.as_u64() | u64::from(size.trailing_zeros());
        self.slots_here().iter().any(|slot| {
            slot.compare_exchange(0, packed, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        })
    }
}

/// A slot's base and size.
fn unpack(packed: u64) -> (VirtAddr, u64) {
    let size = 1 << (packed & 0x3f);
    (VirtAddr::new_truncate(packed & !0x3f), size)
}
