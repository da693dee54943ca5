//! Timestamps in the Python bridge's shape.
//!
//! The Python server writes `datetime.utcnow().isoformat()`: naive UTC with
//! microseconds and no zone suffix (`2025-11-20T23:38:12.123456`), and no
//! fraction at all when the microseconds are zero. Rows are ordered by this
//! text, so autopoll writes exactly the same shape.
//!
//! Reading is lenient, because other writers share the file: every form
//! Python's `datetime.fromisoformat` accepts for what a writer can put there
//! (`T` or a space, any fraction, `Z` or a `+HH:MM` offset, a bare date),
//! and, as a fallback, Unix epoch seconds (`1763681892` or `1763681892.5`).
//! Zoned times are converted to naive UTC. Anything else is an error, which
//! readers of queue ages show as "unknown age" rather than failing on.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use time::{Date, Month, PrimitiveDateTime, Time, UtcOffset};

use crate::error::{Error, Result};

/// A naive UTC instant with microsecond precision.
pub type Timestamp = PrimitiveDateTime;

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
///
/// Digits are written by hand: this runs several times per answer (the
/// response row, its audit rows, the outcome), and `format!` cost about
/// 4,000 instructions a call, a tenth of the poller's work per answer.
pub fn format(t: Timestamp) -> String {
    let year = t.year();
    if !(0..=9999).contains(&year) {
        return format_slow(t);
    }
    fn put(out: &mut [u8], at: usize, width: usize, mut v: u32) {
        for i in (at..at + width).rev() {
            out[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    }
    let mut b = *b"0000-00-00T00:00:00.000000";
    put(&mut b, 0, 4, year as u32);
    put(&mut b, 5, 2, u32::from(u8::from(t.month())));
    put(&mut b, 8, 2, u32::from(t.day()));
    put(&mut b, 11, 2, u32::from(t.hour()));
    put(&mut b, 14, 2, u32::from(t.minute()));
    put(&mut b, 17, 2, u32::from(t.second()));
    let len = match t.microsecond() {
        0 => 19,
        us => {
            put(&mut b, 20, 6, us);
            26
        }
    };
    // Only ASCII digits and separators were written.
    String::from_utf8_lossy(&b[..len]).into_owned()
}

/// [`format`] with `format!`, for years outside 0..=9999.
fn format_slow(t: Timestamp) -> String {
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

/// Parse a bridge timestamp: ISO-8601 as Python's `fromisoformat` reads it
/// (`2025-11-20T23:38:12.123456`, a space for `T`, any fraction, `Z`,
/// `+00:00`, `+0000`, `+05`, a bare date), else Unix epoch seconds. Zoned
/// times become naive UTC; fractions finer than microseconds are truncated.
pub fn parse(s: &str) -> Result<Timestamp> {
    let t = s.trim();
    parse_iso(t)
        .or_else(|| parse_epoch(t))
        .ok_or_else(|| Error::Invalid(format!("bad timestamp {s:?} in the bridge")))
}

fn digits(s: &str, n: usize) -> Option<u32> {
    let d = s.get(..n)?;
    d.bytes()
        .all(|b| b.is_ascii_digit())
        .then(|| d.parse().ok())
        .flatten()
}

fn parse_iso(s: &str) -> Option<Timestamp> {
    let year = i32::try_from(digits(s, 4)?).ok()?;
    let b = s.as_bytes();
    if b.get(4) != Some(&b'-') || b.get(7) != Some(&b'-') {
        return None;
    }
    let month = Month::try_from(u8::try_from(digits(&s[5..], 2)?).ok()?).ok()?;
    let date =
        Date::from_calendar_date(year, month, u8::try_from(digits(&s[8..], 2)?).ok()?).ok()?;
    let rest = &s[10..];
    if rest.is_empty() {
        return Some(PrimitiveDateTime::new(date, Time::MIDNIGHT));
    }
    let rest = rest.strip_prefix(['T', 't', ' '])?;
    let hour = digits(rest, 2)?;
    let rest = rest.get(2..)?;
    let (minute, mut rest) = match rest.strip_prefix(':') {
        Some(r) => (digits(r, 2)?, r.get(2..)?),
        None => (0, rest),
    };
    let mut second = 0;
    let mut micros = 0;
    if let Some(r) = rest.strip_prefix(':') {
        second = digits(r, 2)?;
        rest = r.get(2..)?;
        if let Some(r) = rest.strip_prefix(['.', ',']) {
            let n = r.bytes().take_while(u8::is_ascii_digit).count();
            if n == 0 {
                return None;
            }
            let frac = &r[..n];
            let mut us = 0u32;
            for (i, c) in frac.bytes().take(6).enumerate() {
                us += u32::from(c - b'0') * 10u32.pow(5 - i as u32);
            }
            micros = us;
            rest = &r[n..];
        }
    }
    let time = Time::from_hms_micro(
        u8::try_from(hour).ok()?,
        u8::try_from(minute).ok()?,
        u8::try_from(second).ok()?,
        micros,
    )
    .ok()?;
    let naive = PrimitiveDateTime::new(date, time);
    let offset = match rest.trim_start() {
        "" => return Some(naive),
        "Z" | "z" => UtcOffset::UTC,
        z => {
            let sign: i8 = match z.as_bytes()[0] {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let z = &z[1..];
            let h = i8::try_from(digits(z, 2)?).ok()?;
            let m = match &z[2..] {
                "" => 0,
                r => i8::try_from(digits(r.strip_prefix(':').unwrap_or(r), 2)?).ok()?,
            };
            let tail = z[2..].strip_prefix(':').unwrap_or(&z[2..]);
            if tail.len() > 2 {
                return None;
            }
            UtcOffset::from_hms(sign * h, sign * m, 0).ok()?
        }
    };
    let utc = naive.assume_offset(offset).to_offset(UtcOffset::UTC);
    Some(PrimitiveDateTime::new(utc.date(), utc.time()))
}

fn parse_epoch(s: &str) -> Option<Timestamp> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return None;
    }
    let secs: f64 = s.parse().ok()?;
    if !secs.is_finite() {
        return None;
    }
    let odt = time::OffsetDateTime::from_unix_timestamp_nanos((secs * 1e6).round() as i128 * 1_000)
        .ok()?;
    Some(PrimitiveDateTime::new(odt.date(), odt.time()))
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
    fn the_fast_format_equals_the_format_macro() {
        let start = parse("1999-12-31T23:59:58.999999").unwrap();
        for step in 0..5_000i64 {
            let t = start + time::Duration::microseconds(step * 7_919_113_331);
            assert_eq!(format(t), format_slow(t), "{t:?}");
            let whole = t.replace_microsecond(0).unwrap();
            assert_eq!(format(whole), format_slow(whole), "{whole:?}");
        }
    }

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
        for bad in [
            "yesterday",
            "",
            "2025-13-01T00:00:00",
            "2025-11-20T25:00:00",
            "2025-11-20T23:38:12+",
            "2025-11-20T23:38:12 junk",
            "2025-11-20T23:38:12.",
            "-5",
            "1e9",
            "NaN",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    /// Every form a Python writer can produce (`isoformat()` of naive and
    /// aware datetimes, `str()`, hand-written `Z`), and epoch seconds.
    #[test]
    fn reads_every_python_form_and_epoch_seconds() {
        let want = "2025-11-20T23:38:12.123456";
        for form in [
            "2025-11-20T23:38:12.123456",
            "2025-11-20 23:38:12.123456",
            "2025-11-20T23:38:12.123456Z",
            "2025-11-20T23:38:12.123456+00:00",
            "2025-11-20T23:38:12.123456+0000",
            "2025-11-21T01:38:12.123456+02:00",
            "2025-11-20T18:38:12.123456-05:00",
            "2025-11-21T05:08:12.123456+05:30",
            "2025-11-20T23:38:12.123456789",
            "  2025-11-20T23:38:12.123456\n",
            "1763681892.123456",
        ] {
            assert_eq!(
                parse(form).map(format).ok().as_deref(),
                Some(want),
                "{form:?}"
            );
        }
        assert_eq!(
            format(parse("2025-11-20T23:38:12Z").unwrap()),
            "2025-11-20T23:38:12"
        );
        assert_eq!(
            format(parse("2025-11-20T23:38").unwrap()),
            "2025-11-20T23:38:00"
        );
        assert_eq!(
            format(parse("2025-11-20T23:38:12.123").unwrap()),
            "2025-11-20T23:38:12.123000"
        );
        assert_eq!(format(parse("2025-11-20").unwrap()), "2025-11-20T00:00:00");
        assert_eq!(format(parse("1763681892").unwrap()), "2025-11-20T23:38:12");
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
