//! The object-safe face of the manager that owners and the kernel heap hold.

use super::manager::Vmalloc;
use super::options::{CacheMode, Prot, VmOptions};
use crate::smp::Cpus;
use crate::{Error, FrameSource, PhysMemory, TlbFlush};
use core::ptr::NonNull;
use x86_64::PhysAddr;
use x86_64::structures::paging::PhysFrame;

/// The calls the owners ([`VBox`](super::VBox), [`VBuffer`](super::VBuffer),
/// [`VMapping`](super::VMapping), [`IoMapping`](super::IoMapping)) and the kernel heap
/// need from a [`Vmalloc`], object-safe so they can hold a `&dyn VmallocOps` whatever
/// the manager's frame allocator, memory access and flush policy.
///
/// # Safety
///
/// The owners and the kernel heap read and write through the pointers these calls
/// return, and hand them back only through these calls, so an implementation
/// promises, as [`Vmalloc`] does:
///
/// - `vmalloc_with` returns the start of `size` bytes (rounded up to pages), aligned to
///   `options.align` (at least a page), mapped readable, and writable when
///   `options.prot` has `WRITE`, zeroed when `options.flags` has `ZERO`, and used by
///   nothing else until `vfree` (or a `vrealloc` that moves it) gives them up;
/// - `vrealloc` returns such a block of `new_size` bytes, with the area's alignment,
///   rights and zeroing kept, holding the old contents up to the smaller size; a
///   block whose size it shrinks keeps its address; the old pointer is no longer
///   valid unless it is the one returned;
/// - `reserve` returns a range of `size` bytes aligned to `options.align` that nothing
///   else uses, of which `populate` maps (with the rights `options.prot` asked for,
///   zeroed when asked) the first bytes it reports, at least as many as asked, staying mapped until
///   `vfree`;
/// - `reserve_sparse` returns such a range with nothing mapped, of which `map_page`
///   maps one page (with the rights asked for, zeroed when asked) until
///   `unmap_page` unmaps it, which flushes every CPU's TLB before it returns;
/// - `vmap` maps the given frames in order and `ioremap` the given physical range,
///   each at a range nothing else uses, until `vunmap` or `iounmap`;
/// - `area_size` and `retag` answer only for the start of a live `vmalloc_with` area
///   carrying that tag (made with it, or given it by `retag`), with its usable bytes,
///   all mapped as that call mapped them; `retag` changes the tag of the area it
///   answers for and of no other;
/// - a call that fails leaves every block and mapping as it was;
/// - `cpus`, when it answers, upholds [`Cpus`]'s contract for the CPUs that call.
pub unsafe trait VmallocOps: Sync {
    /// See [`Vmalloc::vmalloc_with`](super::Vmalloc::vmalloc_with).
    ///
    /// # Errors
    ///
    /// As there.
    #[track_caller]
    fn vmalloc_with(&self, size: usize, options: &VmOptions) -> Result<NonNull<u8>, Error>;

    /// See [`Vmalloc::vfree`](super::Vmalloc::vfree).
    ///
    /// # Errors
    ///
    /// As there.
    ///
    /// # Safety
    ///
    /// As there.
    unsafe fn vfree(&self, ptr: *mut u8) -> Result<(), Error>;

    /// [`vfree`](Self::vfree), only if the area at `ptr` was made with
    /// [`VmOptions::tag`] `tag`: a caller that makes its areas with a tag of its own
    /// (the kernel heap's large blocks) refuses to free anyone else's. The default
    /// cannot tell tags and frees as `vfree` does.
    ///
    /// # Errors
    ///
    /// [`Error::WrongKind`] for an area with another tag (nothing changes); otherwise
    /// as `vfree`.
    ///
    /// # Safety
    ///
    /// As `vfree`.
    unsafe fn vfree_tagged(&self, ptr: *mut u8, tag: &str) -> Result<(), Error> {
        let _ = tag;
        // SAFETY: forwarded from the caller.
        unsafe { self.vfree(ptr) }
    }

    /// The usable bytes (whole pages) of the live area that starts at `ptr` and was
    /// carries [`VmOptions::tag`] `tag`, or `None`: what the kernel heap checks
    /// before it resizes a large block, so it resizes only its own live blocks. An
    /// implementation answers exactly or `None`; the default knows of no area (the
    /// heap then refuses to resize its large blocks).
    fn area_size(&self, ptr: *const u8, tag: &str) -> Option<usize> {
        let _ = (ptr, tag);
        None
    }

    /// Gives the live `vmalloc_with` area that starts at `ptr` and carries tag
    /// `from` the tag `to`, in one step, and returns its usable bytes; `None`
    /// (nothing changes) for any other pointer. The kernel heap marks the large
    /// blocks it keeps for reuse so: a second free of one, through any heap, finds no
    /// area of the heap's tag and is refused, and of two racing frees one wins. The
    /// default knows of no area (the heap then keeps none).
    ///
    /// # Safety
    ///
    /// An area the call retags is the caller's: nothing else relies on its tag (the
    /// heap frees and reuses its blocks by theirs; one retagged under it stays
    /// mapped until the manager is dropped). A call that retags nothing is safe.
    ///
    /// Safe code cannot retag, populate or map a page of an area it found, say, in the
    /// listing:
    ///
    /// ```compile_fail,E0133
    /// fn change(ops: &dyn vmalloc::vmalloc::VmallocOps, area: *mut u8) {
    ///     let _ = ops.retag(area, "kernel heap large", "mine");
    ///     let _ = ops.populate(area, 4096);
    ///     let _ = ops.map_page(area, 0);
    /// }
    /// ```
    unsafe fn retag(&self, ptr: *const u8, from: &str, to: &'static str) -> Option<usize> {
        let _ = (ptr, from, to);
        None
    }

    /// Whether [`retag`](Self::retag) knows the manager's areas (the default knows
    /// none). Where it does, a retag that finds no area of the tag is final: the
    /// kernel heap refuses the free of a large block its retag does not find, rather
    /// than free whatever area starts there by then.
    fn retags(&self) -> bool {
        false
    }

    /// See [`Vmalloc::vrealloc`](super::Vmalloc::vrealloc).
    ///
    /// # Errors
    ///
    /// As there.
    ///
    /// # Safety
    ///
    /// As there.
    unsafe fn vrealloc(&self, ptr: *mut u8, new_size: usize) -> Result<NonNull<u8>, Error>;

    /// See [`Vmalloc::reserve`](super::Vmalloc::reserve).
    ///
    /// # Errors
    ///
    /// As there.
    #[track_caller]
    fn reserve(&self, size: usize, options: &VmOptions) -> Result<NonNull<u8>, Error>;

    /// See [`Vmalloc::populate`](super::Vmalloc::populate).
    ///
    /// # Errors
    ///
    /// As there.
    ///
    /// # Safety
    ///
    /// As there.
    unsafe fn populate(&self, ptr: *mut u8, bytes: usize) -> Result<usize, Error>;

    /// See [`Vmalloc::reserve_sparse`](super::Vmalloc::reserve_sparse). The default
    /// refuses ([`Error::WrongKind`]): the heap then has no guarded pool.
    ///
    /// # Errors
    ///
    /// As there.
    #[track_caller]
    fn reserve_sparse(&self, size: usize, options: &VmOptions) -> Result<NonNull<u8>, Error> {
        let _ = (size, options);
        Err(Error::WrongKind)
    }

    /// See [`Vmalloc::map_page`](super::Vmalloc::map_page). The default refuses
    /// ([`Error::WrongKind`]).
    ///
    /// # Errors
    ///
    /// As there.
    ///
    /// # Safety
    ///
    /// As there.
    unsafe fn map_page(&self, area: *mut u8, index: usize) -> Result<(), Error> {
        let _ = (area, index);
        Err(Error::WrongKind)
    }

    /// See [`Vmalloc::unmap_page`](super::Vmalloc::unmap_page). The default refuses
    /// ([`Error::WrongKind`]).
    ///
    /// # Errors
    ///
    /// As there.
    ///
    /// # Safety
    ///
    /// As there.
    unsafe fn unmap_page(&self, area: *mut u8, index: usize) -> Result<(), Error> {
        let _ = (area, index);
        Err(Error::WrongKind)
    }

    /// See [`Vmalloc::vmap`](super::Vmalloc::vmap). The default refuses
    /// ([`Error::WrongKind`]): the heap never calls it.
    ///
    /// # Errors
    ///
    /// As there.
    ///
    /// # Safety
    ///
    /// As there.
    #[track_caller]
    unsafe fn vmap(&self, frames: &[PhysFrame], prot: Prot) -> Result<NonNull<u8>, Error> {
        let _ = (frames, prot);
        Err(Error::WrongKind)
    }

    /// See [`Vmalloc::vunmap`](super::Vmalloc::vunmap). The default refuses
    /// ([`Error::WrongKind`]): the heap never calls it.
    ///
    /// # Errors
    ///
    /// As there.
    ///
    /// # Safety
    ///
    /// As there.
    unsafe fn vunmap(
        &self,
        ptr: *mut u8,
        on_frame: &mut dyn FnMut(PhysFrame),
    ) -> Result<(), Error> {
        let _ = (ptr, on_frame);
        Err(Error::WrongKind)
    }

    /// See [`Vmalloc::ioremap`](super::Vmalloc::ioremap). The default refuses
    /// ([`Error::WrongKind`]): the heap never calls it.
    ///
    /// # Errors
    ///
    /// As there.
    ///
    /// # Safety
    ///
    /// As there.
    #[track_caller]
    unsafe fn ioremap(
        &self,
        phys: PhysAddr,
        size: usize,
        cache: CacheMode,
    ) -> Result<NonNull<u8>, Error> {
        let _ = (phys, size, cache);
        Err(Error::WrongKind)
    }

    /// See [`Vmalloc::iounmap`](super::Vmalloc::iounmap). The default refuses
    /// ([`Error::WrongKind`]): the heap never calls it.
    ///
    /// # Errors
    ///
    /// As there.
    ///
    /// # Safety
    ///
    /// As there.
    unsafe fn iounmap(&self, ptr: *mut u8) -> Result<(), Error> {
        let _ = ptr;
        Err(Error::WrongKind)
    }

    /// Called by a CPU spinning for a lock whose holder may be inside one of these
    /// calls, waiting for this CPU to flush: serves the flush requests sent to this
    /// CPU ([`TlbFlush::relax`]), as the manager's own lock waits do.
    fn relax(&self) {
        core::hint::spin_loop();
    }

    /// The kernel's CPUs as the manager's flush policy knows them
    /// ([`TlbFlush::cpus`]): how the heap holds off interrupts around its locks.
    fn cpus(&self) -> Option<&dyn Cpus> {
        None
    }

    /// Runs `work` on every other online CPU, as the manager's flush policy does
    /// ([`TlbFlush::call_on_other_cpus`]); `false` when it cannot.
    fn call_on_other_cpus(&self, work: &(dyn Fn() + Sync)) -> bool {
        let _ = work;
        false
    }
}

// SAFETY: each method forwards to the manager, whose areas are mapped as asked,
// aligned as asked, and exclusively the caller's until freed; `cpus` is the flush
// policy's, which the manager's own contract makes the kernel's.
unsafe impl<F, M, T> VmallocOps for Vmalloc<F, M, T>
where
    F: FrameSource + Clone + Send + Sync,
    M: PhysMemory + Copy + Send + Sync,
    T: TlbFlush + Sync,
{
    #[track_caller]
    fn vmalloc_with(&self, size: usize, options: &VmOptions) -> Result<NonNull<u8>, Error> {
        Vmalloc::vmalloc_with(self, size, options)
    }
    unsafe fn vfree(&self, ptr: *mut u8) -> Result<(), Error> {
        // SAFETY: forwarded from the caller.
        unsafe { Vmalloc::vfree(self, ptr) }
    }
    unsafe fn vfree_tagged(&self, ptr: *mut u8, tag: &str) -> Result<(), Error> {
        // SAFETY: forwarded from the caller.
        unsafe { Vmalloc::vfree_tagged(self, ptr, tag) }
    }
    unsafe fn retag(&self, ptr: *const u8, from: &str, to: &'static str) -> Option<usize> {
        self.retag_area(ptr, from, to).map(|size| size as usize)
    }
    fn retags(&self) -> bool {
        true
    }
    fn area_size(&self, ptr: *const u8, tag: &str) -> Option<usize> {
        let start = x86_64::VirtAddr::try_new(ptr as u64).ok()?;
        let area = self.find_vm_area(start)?;
        (area.start == start && area.tag == tag && area.kind == super::AreaKind::Vmalloc)
            .then_some(area.size as usize)
    }
    unsafe fn vrealloc(&self, ptr: *mut u8, new_size: usize) -> Result<NonNull<u8>, Error> {
        // SAFETY: forwarded from the caller.
        unsafe { Vmalloc::vrealloc(self, ptr, new_size) }
    }
    #[track_caller]
    fn reserve(&self, size: usize, options: &VmOptions) -> Result<NonNull<u8>, Error> {
        Vmalloc::reserve(self, size, options)
    }
    unsafe fn populate(&self, ptr: *mut u8, bytes: usize) -> Result<usize, Error> {
        // SAFETY: forwarded from the caller.
        unsafe { Vmalloc::populate(self, ptr, bytes) }
    }
    #[track_caller]
    fn reserve_sparse(&self, size: usize, options: &VmOptions) -> Result<NonNull<u8>, Error> {
        Vmalloc::reserve_sparse(self, size, options)
    }
    unsafe fn map_page(&self, area: *mut u8, index: usize) -> Result<(), Error> {
        // SAFETY: forwarded from the caller.
        unsafe { Vmalloc::map_page(self, area, index) }
    }
    unsafe fn unmap_page(&self, area: *mut u8, index: usize) -> Result<(), Error> {
        // SAFETY: forwarded from the caller.
        unsafe { Vmalloc::unmap_page(self, area, index) }
    }
    #[track_caller]
    unsafe fn vmap(&self, frames: &[PhysFrame], prot: Prot) -> Result<NonNull<u8>, Error> {
        // SAFETY: forwarded from the caller.
        unsafe { Vmalloc::vmap(self, frames, prot) }
    }
    unsafe fn vunmap(
        &self,
        ptr: *mut u8,
        on_frame: &mut dyn FnMut(PhysFrame),
    ) -> Result<(), Error> {
        // SAFETY: forwarded from the caller.
        unsafe { Vmalloc::vunmap(self, ptr, on_frame) }
    }
    #[track_caller]
    unsafe fn ioremap(
        &self,
        phys: PhysAddr,
        size: usize,
        cache: CacheMode,
    ) -> Result<NonNull<u8>, Error> {
        // SAFETY: forwarded from the caller.
        unsafe { Vmalloc::ioremap(self, phys, size, cache) }
    }
    unsafe fn iounmap(&self, ptr: *mut u8) -> Result<(), Error> {
        // SAFETY: forwarded from the caller.
        unsafe { Vmalloc::iounmap(self, ptr) }
    }
    fn relax(&self) {
        self.tlb.relax();
    }
    fn cpus(&self) -> Option<&dyn Cpus> {
        self.tlb.cpus()
    }
    fn call_on_other_cpus(&self, work: &(dyn Fn() + Sync)) -> bool {
        self.tlb.call_on_other_cpus(work)
    }
}
