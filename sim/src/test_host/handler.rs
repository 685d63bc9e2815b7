//! The SIGSEGV handler when a runtime installs its own over the window's.

use super::*;

#[test]
fn interrupts_off_puts_back_a_handler_installed_over_the_windows() {
    // A runtime installs its SIGSEGV handler over the window's after the machine was
    // made (see the crate documentation). The next interrupts-off, which every lock
    // of the heap and the manager takes first, puts the window's back in front, so a
    // page mapped before and first touched after that call still reaches its frame.
    use vmalloc::smp::Cpus as _;
    let machine = machine();
    let mut frames = frames_of(&machine);
    let page = window_page(&machine, 3);
    let frame = next(&mut frames);
    // SAFETY: bytes the test owns: no live Rust value lives there.
    unsafe { machine.fill_phys(frame.start_address(), 4096, 0x5a) };
    map(&machine, &mut frames, page, frame, RW);
    extern "C" fn runtimes(_: libc::c_int) {
        // SAFETY: ends the child; async-signal-safe.
        unsafe { libc::_exit(42) };
    }
    let (status, printed) = in_child(|| {
        host::watch_again();
        // SAFETY: all-zero is a valid `sigaction`; installing a plain handler.
        unsafe {
            let mut action: libc::sigaction = core::mem::zeroed();
            action.sa_sigaction = runtimes as *const () as libc::sighandler_t;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(libc::SIGSEGV, &action, core::ptr::null_mut());
        }
        let state = machine.irq_save();
        machine.irq_restore(state);
        // SAFETY: mapped writable; the window's handler fills it.
        let seen = unsafe { ptr(page).read_volatile() };
        if seen != 0x5a {
            // SAFETY: ends the child.
            unsafe { libc::_exit(43) };
        }
    });
    assert_eq!(status, 0, "child ended with {status:#x}: {printed}");
    assert!(printed.contains("installed again"), "{printed}");
}
