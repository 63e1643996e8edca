//! Capped exponential back-off with full jitter, so retries after an outage do not arrive at
//! Exchange in lock-step from thousands of mailboxes.

use std::time::Duration;

/// First retry delay after a transient failure.
pub const TRANSIENT_BASE: Duration = Duration::from_secs(2);
/// Transient failures are retried at least this often.
pub const TRANSIENT_CAP: Duration = Duration::from_secs(300);
/// First retry after a permanent error (bad mailbox, no permission): rarely, since only a
/// configuration change fixes it.
pub const PERMANENT_BASE: Duration = Duration::from_secs(300);
/// Permanent errors are still retried this often, so a fixed configuration is picked up.
pub const PERMANENT_CAP: Duration = Duration::from_secs(6 * 3600);

/// The delay before attempt `failures` (1 = first retry): `base * 2^(failures-1)` capped, with
/// jitter drawn uniformly from the upper half (never less than half the nominal delay).
pub fn delay(failures: u32, base: Duration, cap: Duration, random: u64) -> Duration {
    let exp = failures.saturating_sub(1).min(20);
    let nominal = base.saturating_mul(1u32 << exp).min(cap);
    let half = nominal / 2;
    let jitter_ms = if half.as_millis() == 0 {
        0
    } else {
        random % (half.as_millis() as u64 + 1)
    };
    half + Duration::from_millis(jitter_ms)
}

/// A cheap random number for jitter (not for anything secret).
pub fn random() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_caps_and_jitters_within_bounds() {
        for failures in 1..30 {
            for r in [0, 1, 12345, u64::MAX] {
                let d = delay(failures, TRANSIENT_BASE, TRANSIENT_CAP, r);
                let exp = (failures - 1).min(20);
                let nominal = TRANSIENT_BASE.saturating_mul(1 << exp).min(TRANSIENT_CAP);
                assert!(
                    d >= nominal / 2 && d <= nominal,
                    "{failures}: {d:?} vs {nominal:?}"
                );
            }
        }
        assert!(delay(1, TRANSIENT_BASE, TRANSIENT_CAP, 0) >= Duration::from_secs(1));
        assert!(delay(40, PERMANENT_BASE, PERMANENT_CAP, u64::MAX) <= PERMANENT_CAP);
    }
}
