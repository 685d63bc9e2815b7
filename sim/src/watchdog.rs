//! Tests that can deadlock fail by name instead of hanging.

use std::io::Write;
use std::sync::mpsc;
use std::time::Duration;

/// How long a test that can deadlock may take before [`watchdog`] calls it stuck:
/// far beyond what any of them needs in a debug build on a loaded machine.
pub const DEADLOCK_LIMIT: Duration = Duration::from_secs(60);

/// Runs `work` on the calling thread. If it has not returned within `limit`, prints
/// `watchdog: <name> made no progress in <limit> (deadlock)` and ends the process
/// with a failure: a deadlocked test cannot be unwound, and the harness would wait
/// for it forever.
pub fn watchdog<R>(name: &str, limit: Duration, work: impl FnOnce() -> R) -> R {
    let (done, finished) = mpsc::channel::<()>();
    let name = name.to_owned();
    let guard = std::thread::spawn(move || {
        if let Err(mpsc::RecvTimeoutError::Timeout) = finished.recv_timeout(limit) {
            // Past the harness's output capture, which dies with the process.
            let _ = writeln!(
                std::io::stderr(),
                "watchdog: {name} made no progress in {limit:?} (deadlock)"
            );
            std::process::exit(101);
        }
    });
    let result = work();
    drop(done);
    let _ = guard.join();
    result
}
