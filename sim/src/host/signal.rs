//! The process-wide SIGSEGV handler: installed in front of the one there was, put
//! back in front of one installed over it, and serving faults in the windows (see
//! [the module documentation](super)).

use super::SLOTS;
use super::window::Refusal;
use core::ffi::{c_int, c_void};
use core::ptr;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Once, OnceLock};

/// How many times ours may be put back in front of a handler that replaced it.
pub(super) const REINSTALLS: usize = 4;
/// The action faults outside every window go to: `PREVIOUS[CHAIN]`, the one ours
/// replaced last. Set before `CHAIN` points to it, never changed afterwards, so the
/// handler reads it without a lock.
pub(super) static PREVIOUS: [OnceLock<libc::sigaction>; REINSTALLS + 1] =
    [const { OnceLock::new() }; REINSTALLS + 1];
pub(super) static CHAIN: AtomicUsize = AtomicUsize::new(0);
pub(super) static INSTALL: Once = Once::new();
/// Checks [`watch`] still makes (see the module documentation): 0 once ours has
/// been found replaced and put back, or when it replaced a handler, not the default.
pub(super) static WATCH: AtomicU32 = AtomicU32::new(0);
/// How many checks a process watching its handler makes at most: a program whose
/// runtime installs no handler of its own is not slowed down for ever.
pub(super) const WATCH_CHECKS: u32 = 100_000;
/// Held while putting ours back.
pub(super) static REINSTALLING: AtomicBool = AtomicBool::new(false);
/// Set once a refused fault restored the default action: nothing is put back then.
pub(super) static DYING: AtomicBool = AtomicBool::new(false);

/// The SIGSEGV action now.
pub(super) fn current_action() -> libc::sigaction {
    // SAFETY: all-zero is a valid `sigaction` (no handler, empty mask, no flags).
    let mut action: libc::sigaction = unsafe { core::mem::zeroed() };
    // SAFETY: querying the current action into a valid struct.
    unsafe { libc::sigaction(libc::SIGSEGV, ptr::null(), &mut action) };
    action
}

pub(super) fn ours() -> libc::sighandler_t {
    on_segv as *const () as libc::sighandler_t
}

/// Installs ours, to chain to `previous` (the action it replaces).
pub(super) fn install_over(previous: libc::sigaction) {
    let chain = CHAIN.load(Ordering::Acquire);
    let next = if PREVIOUS[chain].get().is_none() {
        chain
    } else {
        chain + 1
    };
    let Some(slot) = PREVIOUS.get(next) else {
        return;
    };
    let _ = slot.set(previous);
    CHAIN.store(next, Ordering::Release);
    // SAFETY: all-zero is a valid `sigaction`.
    let mut action: libc::sigaction = unsafe { core::mem::zeroed() };
    action.sa_sigaction = ours();
    // On the alternate stack when there is one, as Rust's handler, so a stack
    // overflow still reaches it through us.
    action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
    // SAFETY: `sa_mask` is a valid sigset; installing a handler with the
    // `SA_SIGINFO` signature.
    unsafe {
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGSEGV, &action, ptr::null_mut());
    }
    // Replacing the default action, ours may be replaced in turn by a runtime that
    // read the default before it (see the module documentation).
    let watch = if previous.sa_sigaction == libc::SIG_DFL {
        WATCH_CHECKS
    } else {
        0
    };
    WATCH.store(watch, Ordering::Relaxed);
}

pub(super) fn install_handler() {
    install_over(current_action());
}

/// Whether the SIGSEGV action is ours now.
pub(crate) fn installed() -> bool {
    INSTALL.is_completed() && current_action().sa_sigaction == ours()
}

/// Watches the handler again as if ours had replaced the default action: a forked
/// test child then plays the runtime that installs its own over ours.
#[cfg(test)]
pub(crate) fn watch_again() {
    WATCH.store(WATCH_CHECKS, Ordering::Relaxed);
}

/// While ours may still be replaced (see the module documentation): checks that it
/// is installed, and if it is not, installs it again in front of the one that
/// replaced it and says so. One relaxed load otherwise. Allocates nothing: it runs
/// inside the code under test, which may be a global allocator.
#[inline]
pub(crate) fn watch() {
    if WATCH.load(Ordering::Relaxed) != 0 {
        check_handler();
    }
}

/// The check of [`watch`].
#[cold]
fn check_handler() {
    let _ = WATCH.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
        left.checked_sub(1)
    });
    let current = current_action();
    if current.sa_sigaction == ours()
        || DYING.load(Ordering::Relaxed)
        || REINSTALLING.swap(true, Ordering::Acquire)
    {
        return;
    }
    let full = CHAIN.load(Ordering::Acquire) >= REINSTALLS;
    if full {
        WATCH.store(0, Ordering::Relaxed);
        say(b"vmalloc-sim host window: the SIGSEGV handler was replaced again; window faults now reach the new handler\n");
    } else {
        install_over(current);
        say(b"vmalloc-sim host window: the SIGSEGV handler was replaced after the machine was made (by the Rust runtime, if the machine was made before main); installed again in front of the new one\n");
    }
    REINSTALLING.store(false, Ordering::Release);
}

pub(super) extern "C" fn on_segv(signal: c_int, info: *mut libc::siginfo_t, context: *mut c_void) {
    // SAFETY: the kernel passes a valid siginfo for a SIGSEGV with `SA_SIGINFO`.
    let addr = unsafe { (*info).si_addr() } as u64;
    // SAFETY: and a valid `ucontext_t`, whose `REG_ERR` holds the page-fault error
    // code on x86_64.
    let err = unsafe { (*context.cast::<libc::ucontext_t>()).uc_mcontext.gregs }
        [libc::REG_ERR as usize] as u64;
    match serve(addr, err) {
        Some(Ok(())) => {}
        Some(Err(refusal)) => {
            report(addr, refusal);
            die_on_return();
        }
        None => chain(signal, info, context),
    }
}

/// Serves a fault in a registered window; `None` if `addr` is in none.
pub(super) fn serve(addr: u64, err: u64) -> Option<Result<(), Refusal>> {
    SLOTS.iter().find_map(|slot| {
        // Announce the read before loading the pointer, so `drop` waits for it.
        slot.readers.fetch_add(1, Ordering::SeqCst);
        let window = slot.window.load(Ordering::SeqCst);
        // SAFETY: a registered window stays allocated while `readers` is non-zero.
        let outcome = unsafe { window.as_ref() }
            .filter(|window| window.contains(addr))
            .map(|window| window.fill(addr, err));
        slot.readers.fetch_sub(1, Ordering::SeqCst);
        outcome
    })
}

/// Hands a fault outside every window to the action ours replaced.
pub(super) fn chain(signal: c_int, info: *mut libc::siginfo_t, context: *mut c_void) {
    let Some(previous) = PREVIOUS[CHAIN.load(Ordering::Acquire)].get() else {
        return die_on_return();
    };
    match previous.sa_sigaction {
        libc::SIG_DFL | libc::SIG_IGN => die_on_return(),
        handler if previous.sa_flags & libc::SA_SIGINFO != 0 => {
            // SAFETY: with `SA_SIGINFO` the handler has this signature.
            let handler: extern "C" fn(c_int, *mut libc::siginfo_t, *mut c_void) =
                unsafe { core::mem::transmute(handler) };
            handler(signal, info, context);
        }
        handler => {
            // SAFETY: without `SA_SIGINFO` the handler takes only the signal.
            let handler: extern "C" fn(c_int) = unsafe { core::mem::transmute(handler) };
            handler(signal);
        }
    }
}

/// Restores the default action, so the faulting access, retried, kills the process.
pub(super) fn die_on_return() {
    DYING.store(true, Ordering::Relaxed);
    // SAFETY: all-zero with `SIG_DFL` (0) is the default action.
    let action: libc::sigaction = unsafe { core::mem::zeroed() };
    // SAFETY: `sigaction` is async-signal-safe.
    unsafe { libc::sigaction(libc::SIGSEGV, &action, ptr::null_mut()) };
}

/// Writes `line` to stderr, without allocating.
pub(super) fn say(line: &[u8]) {
    // SAFETY: `write` is async-signal-safe and `line` is initialised.
    unsafe { libc::write(libc::STDERR_FILENO, line.as_ptr().cast(), line.len()) };
}

/// Writes one line about a refused fault to stderr, without allocating.
pub(super) fn report(addr: u64, refusal: Refusal) {
    let mut line = [0u8; 160];
    let mut len = 0;
    let mut push = |bytes: &[u8]| {
        let n = bytes.len().min(line.len() - len);
        line[len..len + n].copy_from_slice(&bytes[..n]);
        len += n;
    };
    push(b"vmalloc-sim host window: fatal fault at 0x");
    let mut hex = [0u8; 16];
    for (i, digit) in hex.iter_mut().enumerate() {
        *digit = b"0123456789abcdef"[(addr >> (60 - 4 * i)) as usize & 0xf];
    }
    push(&hex);
    push(b": ");
    push(refusal.message());
    push(b"\n");
    say(&line[..len]);
}
