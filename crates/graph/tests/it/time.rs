use graph::{format_time, parse_time};
use std::time::{Duration, UNIX_EPOCH};

#[test]
fn graph_form_round_trips() {
    for s in [
        "2026-12-10T11:00:00.0000000Z",
        "2016-11-20T18:23:45.9356913Z",
        "2000-02-29T23:59:59.9999999Z",
        "1970-01-01T00:00:00.0000000Z",
    ] {
        assert_eq!(format_time(parse_time(s).unwrap()), s);
    }
    let t = UNIX_EPOCH + Duration::new(1_796_900_000, 123_456_700);
    assert_eq!(parse_time(&format_time(t)), Some(t));
}

#[test]
fn offsets_and_fraction_lengths() {
    let utc = parse_time("2026-12-10T11:00:00Z").unwrap();
    assert_eq!(parse_time("2026-12-10T03:00:00-08:00"), Some(utc));
    assert_eq!(parse_time("2026-12-10T12:00:00+01:00"), Some(utc));
    assert_eq!(parse_time("2026-12-10T11:00:00+00:00"), Some(utc));
    assert_eq!(parse_time("2026-12-10T11:00:00.0Z"), Some(utc));
    assert_eq!(parse_time("2026-12-10T11:00:00.000Z"), Some(utc));
    // RFC 3339 lets a space stand for "T", and "z" for "Z".
    assert_eq!(parse_time("2026-12-10 11:00:00Z"), Some(utc));
    assert_eq!(parse_time("2026-12-10t11:00:00z"), Some(utc));
    let frac = parse_time("2016-03-19T22:11:09.952Z").unwrap();
    assert_eq!(format_time(frac), "2016-03-19T22:11:09.9520000Z");
    // More digits than Graph's seven: truncated past nanoseconds, not refused.
    let long = parse_time("2016-11-20T18:23:45.935691312345Z").unwrap();
    assert_eq!(format_time(long), "2016-11-20T18:23:45.9356913Z");
}

#[test]
fn malformed() {
    for s in [
        "",
        "2026-12-10",
        "2026-12-10T11:00:00",
        "2026-13-10T11:00:00Z",
        "2026-12-10T11:00:00.Z",
        "2026-12-10T11:00:00Zjunk",
        "tomorrow",
    ] {
        assert_eq!(parse_time(s), None, "{s}");
    }
}
