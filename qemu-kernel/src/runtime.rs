//! What the precompiled `core` and `alloc` and the optimiser expect from the
//! environment: the C memory and string functions, an unwinding personality and
//! `_Unwind_Resume` (never called: `panic = "abort"`) and a panic handler.
//!
//! The copy and fill functions use `rep movsb` / `rep stosb` in assembly, so the
//! optimiser cannot turn them back into calls to themselves.

use core::arch::asm;

/// # Safety
///
/// `dest` and `src` are valid for `n` bytes and do not overlap.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcpy(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller's contract; the direction flag is clear (boot stub `cld`).
    unsafe {
        asm!("rep movsb", inout("rdi") dest => _, inout("rsi") src => _, inout("rcx") n => _,
             options(nostack, preserves_flags));
    }
    dest
}

/// # Safety
///
/// `dest` and `src` are valid for `n` bytes; they may overlap.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memmove(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dest as usize).wrapping_sub(src as usize) >= n {
        // `dest` is below `src` or past its end: a forward copy never reads a byte
        // it already overwrote.
        // SAFETY: as for `memcpy`, and the forward copy is overlap-safe here.
        return unsafe { memcpy(dest, src, n) };
    }
    // SAFETY: the caller's contract; with DF set `rep movsb` copies from the last
    // byte down, which is overlap-safe when `dest` is above `src`. DF is cleared again.
    unsafe {
        asm!("std", "rep movsb", "cld",
             inout("rdi") dest.add(n).wrapping_sub(1) => _,
             inout("rsi") src.add(n).wrapping_sub(1) => _,
             inout("rcx") n => _, options(nostack));
    }
    dest
}

/// # Safety
///
/// `dest` is valid for writes of `n` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memset(dest: *mut u8, byte: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller's contract; the direction flag is clear.
    unsafe {
        asm!("rep stosb", inout("rdi") dest => _, inout("rcx") n => _, in("al") byte as u8,
             options(nostack, preserves_flags));
    }
    dest
}

/// # Safety
///
/// `a` and `b` are valid for reads of `n` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    for i in 0..n {
        // SAFETY: `i < n`, within both buffers by the caller's contract.
        let (x, y) = unsafe { (*a.add(i), *b.add(i)) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
    }
    0
}

/// # Safety
///
/// As [`memcmp`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract.
    unsafe { memcmp(a, b, n) }
}

/// Length of the NUL-terminated string at `s`. The optimiser rewrites byte-counting
/// loops into calls to `strlen`, so the kernel must provide it; volatile reads keep
/// this one from becoming a call to itself.
///
/// # Safety
///
/// `s` points to a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn strlen(s: *const u8) -> usize {
    let mut len = 0;
    // SAFETY: every byte up to and including the NUL is readable.
    while unsafe { s.add(len).read_volatile() } != 0 {
        len += 1;
    }
    len
}

/// Referenced by the precompiled `core`; never called because panics abort.
#[unsafe(no_mangle)]
pub extern "C" fn rust_eh_personality() {}

/// Referenced by the landing pads of the precompiled `alloc` (`alloc::format!`);
/// never reached because panics abort, so an unwind that gets here is a bug.
#[unsafe(no_mangle)]
pub extern "C" fn _Unwind_Resume() -> ! {
    crate::println!("\nfatal: _Unwind_Resume called, but panics abort");
    crate::serial::exit(false)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    crate::println!("\npanic: {}", info);
    crate::serial::exit(false)
}
