//! Graph's timestamps: written in its fixed UTC form, read in any RFC 3339 form it sends.

use std::time::{Duration, SystemTime, UNIX_EPOCH};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// Graph's UTC form with seven fractional digits: "2026-12-10T11:00:00.0000000Z" (the shape of
/// every `expirationDateTime` in Microsoft's examples). Sub-100 ns precision is truncated; a time
/// outside years 0000–9999 is clamped to that range (Graph accepts nothing else).
pub fn format_time(t: SystemTime) -> String {
    let odt = match t.duration_since(UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_nanos())
            .ok()
            .and_then(|n| OffsetDateTime::from_unix_timestamp_nanos(n.into()).ok()),
        Err(before) => i64::try_from(before.duration().as_nanos())
            .ok()
            .and_then(|n| OffsetDateTime::from_unix_timestamp_nanos(-i128::from(n)).ok()),
    };
    let odt = match odt {
        Some(odt) if (0..=9999).contains(&odt.year()) => odt,
        Some(odt) if odt.year() < 0 => first_instant(),
        _ => last_instant(),
    };
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:07}Z",
        odt.year(),
        u8::from(odt.month()),
        odt.day(),
        odt.hour(),
        odt.minute(),
        odt.second(),
        odt.nanosecond() / 100
    )
}

fn first_instant() -> OffsetDateTime {
    OffsetDateTime::parse("0000-01-01T00:00:00Z", &Rfc3339).expect("valid")
}

fn last_instant() -> OffsetDateTime {
    OffsetDateTime::parse("9999-12-31T23:59:59.9999999Z", &Rfc3339).expect("valid")
}

/// RFC 3339 / ISO 8601 as Graph sends it: "Z" or an offset ("-08:00"), 0–7+ fractional digits
/// (digits past nanoseconds are dropped). `None` if malformed.
pub fn parse_time(s: &str) -> Option<SystemTime> {
    let odt = OffsetDateTime::parse(s, &Rfc3339).ok()?;
    let nanos = odt.unix_timestamp_nanos();
    if nanos >= 0 {
        let nanos = u64::try_from(nanos).ok()?;
        UNIX_EPOCH.checked_add(Duration::from_nanos(nanos))
    } else {
        let nanos = u64::try_from(-nanos).ok()?;
        UNIX_EPOCH.checked_sub(Duration::from_nanos(nanos))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_and_fraction() {
        assert_eq!(format_time(UNIX_EPOCH), "1970-01-01T00:00:00.0000000Z");
        let t = UNIX_EPOCH + Duration::new(1, 123_456_789);
        assert_eq!(format_time(t), "1970-01-01T00:00:01.1234567Z");
    }

    #[test]
    fn before_epoch() {
        let t = UNIX_EPOCH - Duration::from_secs(1);
        assert_eq!(format_time(t), "1969-12-31T23:59:59.0000000Z");
        assert_eq!(parse_time("1969-12-31T23:59:59Z"), Some(t));
    }
}
