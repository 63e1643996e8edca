//! The `clientState` secret: how long it may be, and how to compare it without a timing leak.

/// Longest `clientState` Graph accepts ("The maximum length is 128 characters", `subscription`
/// resource type); a longer one makes the subscription request fail.
pub const MAX_CLIENT_STATE: usize = 128;

/// Equality whose time does not depend on where the inputs differ (length may leak).
///
/// Used to check an item's `clientState` against its subscription's secret: an early-exit
/// comparison would let a sender who can time the relay's answers guess the secret byte by byte.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // black_box keeps the optimiser from turning the fold back into an early exit.
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_and_unequal() {
        assert!(constant_time_eq(b"", b""));
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"Secret"));
        assert!(!constant_time_eq(b"secret", b"secret!"));
        assert!(!constant_time_eq(b"", b"x"));
    }
}
