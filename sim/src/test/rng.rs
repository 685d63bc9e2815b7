//! The deterministic random numbers tests draw from.

use super::*;

#[test]
fn rng_is_deterministic_per_seed() {
    let take = |seed| {
        let mut rng = Rng::new(seed);
        (0..8).map(|_| rng.next_u64()).collect::<Vec<_>>()
    };
    assert_eq!(take(1), take(1));
    assert_ne!(take(1), take(2));
}

#[test]
fn rng_below_stays_in_range_and_reaches_every_value() {
    let mut rng = Rng::new(42);
    let mut seen = [false; 10];
    for _ in 0..1000 {
        let n = rng.below(10);
        assert!(n < 10);
        seen[n as usize] = true;
    }
    assert!(seen.iter().all(|&s| s), "{seen:?}");
}

#[test]
fn rng_shuffle_permutes() {
    let mut items: Vec<u32> = (0..100).collect();
    Rng::new(3).shuffle(&mut items);
    assert_ne!(items, (0..100).collect::<Vec<_>>());
    items.sort_unstable();
    assert_eq!(items, (0..100).collect::<Vec<_>>());
}
