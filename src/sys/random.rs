//! A small per-thread random source, for spreading things apart (claim jumps, retry
//! jitter). Not for anything that needs unpredictability.

use std::cell::Cell;
use std::hash::BuildHasher;

thread_local! {
    static STATE: Cell<u64> = Cell::new(seed());
}

/// Seeded from the operating system's randomness, through std's `RandomState`.
fn seed() -> u64 {
    std::collections::hash_map::RandomState::new().hash_one(std::thread::current().id()) | 1
}

/// The next number of a xorshift64* sequence.
pub(crate) fn next() -> u64 {
    STATE.with(|state| {
        let mut x = state.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        state.set(x);
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    })
}

/// A number in `[0, 1)`.
pub(crate) fn unit() -> f64 {
    (next() >> 11) as f64 / (1u64 << 53) as f64
}

/// A number in `[0, n)`; 0 when `n` is 0.
pub(crate) fn below(n: u64) -> u64 {
    if n == 0 {
        0
    } else {
        next() % n
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn units_stay_in_range_and_vary() {
        let values: Vec<f64> = (0..1000).map(|_| super::unit()).collect();
        assert!(values.iter().all(|v| (0.0..1.0).contains(v)));
        assert!(values.windows(2).any(|w| w[0] != w[1]));
        assert_eq!(super::below(0), 0);
        assert!((0..100).all(|_| super::below(7) < 7));
    }
}
