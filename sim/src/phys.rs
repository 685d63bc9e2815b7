//! The simulated machine's physical memory as the library reaches it: a pointer into
//! the machine's block, checked on every access.

use crate::SimMachine;
use core::marker::PhantomData;
use core::ptr::NonNull;
use vmalloc::PhysMemory;
use x86_64::PhysAddr;

/// The simulated machine's physical memory, as the library reaches it.
///
/// Borrowing the machine keeps the block alive for as long as a `SimPhys` exists.
#[derive(Debug, Clone, Copy)]
pub struct SimPhys<'machine> {
    pub(crate) base: NonNull<u8>,
    pub(crate) size: u64,
    pub(crate) _machine: PhantomData<&'machine SimMachine>,
}

// SAFETY: a `SimPhys` is a pointer into the machine's block with the machine borrowed;
// sharing it across threads is sharing `&SimMachine`, which is `Sync`.
unsafe impl Send for SimPhys<'_> {}
// SAFETY: as for `Send`.
unsafe impl Sync for SimPhys<'_> {}

impl SimPhys<'_> {
    /// The host pointer for `addr`.
    ///
    /// # Panics
    ///
    /// If `addr` is outside the simulated memory.
    pub fn host_ptr(&self, addr: PhysAddr) -> *mut u8 {
        self.host_range(addr, 1)
    }

    /// The host pointer for `addr`, after checking that `len` bytes from there are
    /// inside the simulated memory (an empty range may start at its end).
    pub(crate) fn host_range(&self, addr: PhysAddr, len: usize) -> *mut u8 {
        // Before the code under test can map a window page: see "The SIGSEGV
        // handler" in the module documentation.
        #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
        crate::host::watch();
        let end = addr.as_u64().checked_add(len as u64);
        assert!(
            end.is_some_and(|end| end <= self.size),
            "physical range {:#x} + {len:#x} is outside the simulated memory ({:#x} bytes)",
            addr.as_u64(),
            self.size
        );
        // SAFETY: the offset is inside the block (checked above), which is one
        // allocation, so the result stays in bounds.
        unsafe { self.base.as_ptr().add(addr.as_u64() as usize) }
    }
}

// SAFETY: every address below `size` maps to a distinct byte of the block, which is
// valid for reads and writes and lives as long as the borrowed machine; addresses
// outside it panic instead of returning a pointer.
unsafe impl PhysMemory for SimPhys<'_> {
    fn phys_to_virt(&self, phys: PhysAddr) -> *mut u8 {
        self.host_ptr(phys)
    }
}
