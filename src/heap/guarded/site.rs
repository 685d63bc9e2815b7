//! Where a sampled object was allocated and freed: the CPU, the `#[track_caller]`
//! location of the heap call, and, in a kernel built with frame pointers, a few
//! return addresses from the frame-pointer chain.
//!
//! # What each part is worth
//!
//! - **Return addresses** (after [`KernelHeap::use_frame_pointers`]): the first few
//!   return addresses of the call chain, innermost first, starting in the heap's
//!   entry (`__rust_alloc`, or `KernelHeap::alloc` where it is called directly, as
//!   inlined); the kernel symbolizes them (`addr2line -e kernel.elf`). Only a kernel
//!   built with `-C force-frame-pointers=yes` has the chain (Rust's prebuilt `core`
//!   and `alloc` keep frame pointers), so the walk is switched on by an `unsafe` call
//!   that promises it.
//! - **The caller's location** (always): the `#[track_caller]` location of the heap
//!   call. Code that calls the heap directly (`heap.alloc(layout)`, as the simulated
//!   machine's tests do, or `kvmalloc`) gets its own `file:line`; everything that
//!   goes through `#[global_allocator]` gets the line of that attribute, which only
//!   says "the global allocator". Reports show it when there are no return addresses
//!   and say so.
//!
//! [`KernelHeap::use_frame_pointers`]: crate::heap::KernelHeap::use_frame_pointers

use core::fmt;
use core::panic::Location;

/// Return addresses kept per site.
pub const FRAMES: usize = 6;

/// Where an allocation or a free of a sampled object was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallSite {
    /// The CPU that made it, when the heap knows the CPUs.
    pub cpu: Option<usize>,
    /// The `#[track_caller]` location of the heap call (see the
    /// [module documentation](self) for what it is worth).
    pub caller: Option<&'static Location<'static>>,
    frames: [u64; FRAMES],
    depth: u8,
}

impl CallSite {
    /// No site.
    pub(super) const NONE: CallSite = CallSite {
        cpu: None,
        caller: None,
        frames: [0; FRAMES],
        depth: 0,
    };

    /// The site of a call made now from `caller` on `cpu`, with the frame-pointer
    /// chain if `frame_pointers`.
    ///
    /// # Safety
    ///
    /// If `frame_pointers`, every frame on the calling stack keeps a frame pointer,
    /// and the outermost has a null one (see [`KernelHeap::use_frame_pointers`]).
    ///
    /// [`KernelHeap::use_frame_pointers`]: crate::heap::KernelHeap::use_frame_pointers
    #[inline(always)]
    pub(super) unsafe fn here(
        caller: &'static Location<'static>,
        cpu: Option<usize>,
        frame_pointers: bool,
    ) -> Self {
        let mut site = CallSite {
            cpu,
            caller: Some(caller),
            ..Self::NONE
        };
        if frame_pointers {
            // SAFETY: forwarded from the caller.
            site.depth = unsafe { frame_pointer_walk(&mut site.frames) } as u8;
        }
        site
    }

    /// The return addresses, innermost first; empty without frame pointers.
    pub fn frames(&self) -> &[u64] {
        &self.frames[..usize::from(self.depth).min(FRAMES)]
    }

    /// Whether `other` is the same place (the CPU aside).
    pub fn same_place(&self, other: &CallSite) -> bool {
        let same_caller = match (self.caller, other.caller) {
            (Some(a), Some(b)) => crate::vmalloc::allocinfo::same_location(a, b),
            (None, None) => true,
            _ => false,
        };
        same_caller && self.frames() == other.frames()
    }

    /// The place, without the CPU: `at [0x.., 0x..]` or `at file:line (no frame
    /// pointers)`.
    pub fn place(&self) -> Place<'_> {
        Place(self)
    }
}

/// A [`CallSite`]'s place, as reports print it; see [`CallSite::place`].
pub struct Place<'a>(&'a CallSite);

impl fmt::Display for Place<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let site = self.0;
        if !site.frames().is_empty() {
            write!(f, "[")?;
            for (index, frame) in site.frames().iter().enumerate() {
                let sep = if index == 0 { "" } else { ", " };
                write!(f, "{sep}{frame:#x}")?;
            }
            return write!(f, "]");
        }
        match site.caller {
            Some(caller) => write!(f, "{}:{} (no frame pointers)", caller.file(), caller.line()),
            None => write!(f, "an unknown site"),
        }
    }
}

impl fmt::Display for CallSite {
    /// `on CPU 1 at [0x.., 0x..]`, or `at file:line (no frame pointers)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(cpu) = self.cpu {
            write!(f, "on CPU {cpu} ")?;
        }
        write!(f, "at {}", self.place())
    }
}

/// The most bytes between two frames the walk accepts: a larger step is not a frame
/// record of the same stack.
const MAX_FRAME: u64 = 64 << 10;

/// Fills `out` with the return addresses of the frame-pointer chain, from the one
/// into the caller's caller on (the heap's guarded path is left out); returns how
/// many.
///
/// # Safety
///
/// Every frame on the stack keeps a frame pointer (`rbp` points at the saved `rbp`,
/// the return address above it), and the outermost frame's saved `rbp` is null. The
/// walk also stops at a step down the stack, of more than 64 KiB, or misaligned.
#[cfg(target_arch = "x86_64")]
#[inline(never)]
unsafe fn frame_pointer_walk(out: &mut [u64]) -> usize {
    let mut frame: u64;
    // SAFETY: reads a register.
    unsafe { core::arch::asm!("mov {}, rbp", out(reg) frame, options(nomem, nostack)) };
    let read = |addr: u64| -> u64 {
        let value: u64;
        // SAFETY: `addr` is a frame record's word on the stack (the caller's
        // contract, and the checks below).
        unsafe {
            core::arch::asm!(
                "mov {}, [{}]",
                out(reg) value,
                in(reg) addr,
                options(readonly, nostack, preserves_flags)
            )
        };
        value
    };
    // This function's own frame record, whose return address is in the heap's guarded
    // path: skipped. The next one returns into the heap's entry.
    let mut skip = 1;
    let mut count = 0;
    while count < out.len() {
        if frame == 0 || !frame.is_multiple_of(8) {
            break;
        }
        let (next, ret) = (read(frame), read(frame.wrapping_add(8)));
        if ret == 0 {
            break;
        }
        if skip > 0 {
            skip -= 1;
        } else {
            out[count] = ret;
            count += 1;
        }
        if next <= frame || next - frame > MAX_FRAME {
            break;
        }
        frame = next;
    }
    count
}

/// Without x86_64 frame records there is no walk.
///
/// # Safety
///
/// None needed.
#[cfg(not(target_arch = "x86_64"))]
unsafe fn frame_pointer_walk(_out: &mut [u64]) -> usize {
    0
}
