//! The bitmap's word-at-a-time helpers against their page-at-a-time definitions.

use super::{WORDS, run_starts, set_bits};

/// Bit `i`: bits `i..i + span` of `bits` all set, one page at a time.
fn naive_starts(bits: u128, span: usize) -> u64 {
    (0..64)
        .filter(|&i| (i..i + span).all(|bit| bits >> bit & 1 == 1))
        .fold(0, |starts, i| starts | 1 << i)
}

#[test]
fn run_starts_finds_every_run_of_every_span() {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for round in 0..2000 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        // Long runs of set bits, so spans up to 17 find some.
        let noise = u128::from(seed) | u128::from(seed.rotate_left(round % 64)) << 64;
        let bits = !(noise & noise >> 3 & noise >> 5);
        for span in 1..=17 {
            assert_eq!(
                run_starts(bits, span),
                naive_starts(bits, span),
                "{bits:#x}, span {span}"
            );
        }
    }
}

#[test]
fn set_bits_changes_exactly_its_pages_across_words() {
    for first in [0, 1, 50, 63, 64, 100, 127, 500] {
        for span in [1, 2, 14, 17, 64, 65, 12] {
            if first + span > WORDS * 64 {
                continue;
            }
            let mut free = [u64::MAX; WORDS];
            set_bits(&mut free, first, span, false);
            for page in 0..WORDS * 64 {
                let taken = (first..first + span).contains(&page);
                assert_eq!(
                    free[page / 64] >> (page % 64) & 1 == 0,
                    taken,
                    "page {page} after taking {first}+{span}"
                );
            }
            set_bits(&mut free, first, span, true);
            assert_eq!(free, [u64::MAX; WORDS]);
        }
    }
}

/// The owner carves and takes back what others returned while three CPUs return
/// its areas: the returned-page count never runs below the list it counts (it was
/// added after the push, so the owner could take and subtract the pages first, and
/// `available`, read by every returner, overflowed), and at the end every page is
/// free again.
#[test]
fn returned_pages_never_run_below_the_returned_list() {
    use super::{BLOCK_PAGES, Block};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::mpsc;
    const ROUNDS: usize = 200_000;
    let block = Block::new(0, 0);
    let done = AtomicBool::new(false);
    let caller = core::panic::Location::caller();
    std::thread::scope(|scope| {
        let mut lines = std::vec::Vec::new();
        for _ in 0..3 {
            let (send, receive) = mpsc::sync_channel::<usize>(64);
            lines.push(send);
            let (block, done) = (&block, &done);
            scope.spawn(move || {
                while let Ok(first) = receive.recv() {
                    assert!(block.claim_free(first, 1));
                    let _ = block.return_freed(first, 1);
                    let _ = block.worth_taking(1);
                }
                done.store(true, Ordering::Relaxed);
            });
        }
        let mut sent = 0;
        while sent < ROUNDS {
            // SAFETY: this thread is the owner, and holds no other bitmap reference.
            match unsafe { block.carve(2) } {
                Some(first) => {
                    assert!(block.available() <= BLOCK_PAGES);
                    block.record(first, 1, false, caller);
                    lines[sent % 3].send(first).unwrap();
                    sent += 1;
                }
                None => std::thread::yield_now(),
            }
        }
        drop(lines);
    });
    assert!(done.load(Ordering::Relaxed));
    // SAFETY: the owner again, every returner gone.
    unsafe { block.take_returned() };
    assert_eq!(block.available(), BLOCK_PAGES);
}
