//! Tests that can deadlock fail by name instead of hanging.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// How long a test that can deadlock may take before [`watchdog`] calls it stuck:
/// far beyond what any of them needs in a debug build on a loaded machine.
pub const DEADLOCK_LIMIT: Duration = Duration::from_secs(60);

/// Runs `work` on the calling thread. If it has neither returned nor panicked within
/// `limit`, prints
/// `watchdog: <name> made no progress in <limit> (deadlock)` and ends the process
/// with a failure: a deadlocked test cannot be unwound, and the harness would wait
/// for it forever.
///
/// The watching thread allocates nothing once it runs (its message is made before,
/// and it sleeps and polls a flag), so it fires even when the deadlock is in the
/// process's global allocator (a kernel heap under test).
pub fn watchdog<R>(name: &str, limit: Duration, work: impl FnOnce() -> R) -> R {
    let done = Arc::new(AtomicBool::new(false));
    let message = format!("watchdog: {name} made no progress in {limit:?} (deadlock)\n");
    let guard = {
        let done = Arc::clone(&done);
        std::thread::spawn(move || {
            let start = Instant::now();
            while !done.load(Ordering::Acquire) {
                if start.elapsed() >= limit {
                    // Past the harness's output capture, which dies with the process.
                    let _ = std::io::stderr().write_all(message.as_bytes());
                    std::process::exit(101);
                }
                std::thread::park_timeout(POLL.min(limit));
            }
        })
    };
    // Set however `work` ends: a failed check in it unwinds as a failure of its
    // own, not a deadlock reported a limit later (which ends every other test too).
    let finished = Finished(&done, guard.thread().clone());
    let result = work();
    drop(finished);
    let _ = guard.join();
    result
}

/// Tells the watching thread the work is over when dropped.
struct Finished<'a>(&'a AtomicBool, std::thread::Thread);

impl Drop for Finished<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
        self.1.unpark();
    }
}

/// How often the watching thread looks (it is woken when the work returns).
const POLL: Duration = Duration::from_millis(20);
