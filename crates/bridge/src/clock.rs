//! Timestamps in the Python bridge's shape.
//!
//! The Python server writes `datetime.utcnow().isoformat()`: naive UTC with
//! microseconds and no zone suffix (`2025-11-20T23:38:12.123456`), and no
//! fraction at all when the microseconds are zero. Rows are ordered by this
//! text, so autopoll writes exactly the same shape.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use time::{PrimitiveDateTime, format_description::BorrowedFormatItem, macros::format_description};

use crate::error::{Error, Result};

/// A naive UTC instant with microsecond precision.
pub type Timestamp = PrimitiveDateTime;

const PARSE: &[BorrowedFormatItem<'static>] = format_description!(
    version = 2,
    "[year]-[month]-[day][first [T] [ ]][hour]:[minute][optional [:[second][optional [.[subsecond]]]]]"
);

/// The current UTC time, truncated to microseconds as Python keeps it.
pub fn now() -> Timestamp {
    from_system(SystemTime::now())
}

/// Convert a system time to a naive UTC timestamp (microsecond precision).
pub fn from_system(t: SystemTime) -> Timestamp {
    let odt = time::OffsetDateTime::from(t);
    let micros = odt.nanosecond() / 1_000;
    let odt = odt.replace_nanosecond(micros * 1_000).unwrap_or(odt);
    PrimitiveDateTime::new(odt.date(), odt.time())
}

/// Format in the Python shape: `YYYY-MM-DDTHH:MM:SS[.ffffff]`.
pub fn format(t: Timestamp) -> String {
    let base = format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    );
    match t.microsecond() {
        0 => base,
        us => format!("{base}.{us:06}"),
    }
}

/// Parse what Python's `datetime.fromisoformat` accepts for naive timestamps
/// (the shapes the bridge holds: with or without fraction, `T` or space).
pub fn parse(s: &str) -> Result<Timestamp> {
    PrimitiveDateTime::parse(s.trim(), PARSE)
        .map_err(|e| Error::Invalid(format!("bad timestamp {s:?} in the bridge: {e}")))
}

/// `now()` formatted.
pub fn now_string() -> String {
    format(now())
}

/// Whole seconds and fraction elapsed from `t` until `now` (negative if in the future).
pub fn seconds_between(earlier: Timestamp, later: Timestamp) -> f64 {
    (later - earlier).as_seconds_f64()
}

/// `t + d`.
pub fn add(t: Timestamp, d: Duration) -> Timestamp {
    t.saturating_add(time::Duration::try_from(d).unwrap_or(time::Duration::MAX))
}

/// Milliseconds since the Unix epoch, for lease arithmetic in our own tables.
pub fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_like_python_isoformat() {
        let t = parse("2025-11-20T23:38:12.123456").unwrap();
        assert_eq!(format(t), "2025-11-20T23:38:12.123456");
        let t = parse("2025-11-20T23:38:12").unwrap();
        assert_eq!(format(t), "2025-11-20T23:38:12");
        let t = parse("2025-01-02T03:04:05.000007").unwrap();
        assert_eq!(format(t), "2025-01-02T03:04:05.000007");
    }

    #[test]
    fn parses_space_separator_and_short_fractions() {
        let t = parse("2025-11-20 23:38:12.5").unwrap();
        assert_eq!(format(t), "2025-11-20T23:38:12.500000");
    }

    #[test]
    fn rejects_garbage() {
        assert!(parse("yesterday").is_err());
        assert!(parse("").is_err());
    }

    #[test]
    fn text_order_matches_time_order() {
        // Python omits the fraction when it is zero; text order must still hold.
        let a = "2025-11-20T23:38:12";
        let b = "2025-11-20T23:38:12.000001";
        let c = "2025-11-20T23:38:13";
        assert!(a < b && b < c);
        assert!(parse(a).unwrap() < parse(b).unwrap());
    }

    #[test]
    fn now_has_microsecond_precision() {
        let t = now();
        assert_eq!(t.nanosecond() % 1_000, 0);
        assert_eq!(parse(&format(t)).unwrap(), t);
    }
}
