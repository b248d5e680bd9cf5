//! Wall-clock helpers without a date crate: ISO-8601 output for stats, and the two date
//! formats upstreams use to say when a rate limit ends (HTTP-date in `retry-after`, RFC 3339
//! in `anthropic-ratelimit-*-reset`). Also the small random source for jitter and probe codes.

use std::cell::Cell;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Days since 1970-01-01 of a civil date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m as i64 + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (
        if m <= 2 {
            yoe + era * 400 + 1
        } else {
            yoe + era * 400
        },
        m,
        d,
    )
}

/// `2026-11-25T17:43:22.123Z`, the form stats and logs show.
pub fn iso8601(t: SystemTime) -> String {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs() as i64;
    let (y, m, d) = civil_from_days(secs.div_euclid(86400));
    let s = secs.rem_euclid(86400);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        s / 3600,
        s / 60 % 60,
        s % 60,
        since.subsec_millis()
    )
}

pub fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

/// Dates from upstreams are believed only with the four-digit years both formats have:
/// a longer year is not a date, and would overflow the arithmetic below.
const YEARS: std::ops::RangeInclusive<i64> = 0..=9999;

fn is_leap(y: i64) -> bool {
    y % 4 == 0 && (y % 100 != 0 || y % 400 == 0)
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        2 if is_leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// A civil date and time (UTC) as a `SystemTime`; `None` for a date that does not exist
/// (Feb 30, hour 24, year 10000) or one the platform's clock cannot hold.
fn from_parts(y: i64, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> Option<SystemTime> {
    let valid = YEARS.contains(&y)
        && (1..=12).contains(&mo)
        && (1..=days_in_month(y, mo)).contains(&d)
        && h <= 23
        && mi <= 59
        && s <= 60;
    if !valid {
        return None;
    }
    // At most ±4e11: no overflow within YEARS.
    let secs = days_from_civil(y, mo, d) * 86_400 + i64::from(h * 3600 + mi * 60 + s);
    from_unix_seconds(secs)
}

/// Seconds since 1970 (negative before) as a `SystemTime`, with checked arithmetic.
fn from_unix_seconds(secs: i64) -> Option<SystemTime> {
    let magnitude = Duration::from_secs(secs.unsigned_abs());
    if secs >= 0 {
        UNIX_EPOCH.checked_add(magnitude)
    } else {
        UNIX_EPOCH.checked_sub(magnitude)
    }
}

/// A number written in ASCII digits only: no sign, no spaces, no exponent (`str::parse`
/// alone takes a `+`).
fn digits<T: std::str::FromStr>(text: &str) -> Option<T> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// Parses an IMF-fixdate, `Wed, 21 Oct 2015 07:28:00 GMT` (the form RFC 9110 requires
/// senders to use). Anything else, an impossible date included, is `None`.
pub fn parse_http_date(text: &str) -> Option<SystemTime> {
    let mut parts = text.split_whitespace().skip(1);
    let d: u32 = digits(parts.next()?)?;
    let months = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let month = parts.next()?;
    let mo = months.iter().position(|m| m.eq_ignore_ascii_case(month))? as u32 + 1;
    let y: i64 = digits(parts.next()?)?;
    let mut hms = parts.next()?.split(':').map(digits::<u32>);
    let (h, mi, s) = (hms.next()??, hms.next()??, hms.next()??);
    if hms.next().is_some() {
        return None;
    }
    from_parts(y, mo, d, h, mi, s)
}

/// Parses RFC 3339 as Anthropic sends it, `2026-11-25T17:43:22Z` or with fractional
/// seconds and a numeric offset. Anything else, an impossible date included, is `None`.
pub fn parse_rfc3339(text: &str) -> Option<SystemTime> {
    let b = text.as_bytes();
    let separators = b.len() >= 20
        && b[4] == b'-'
        && b[7] == b'-'
        && matches!(b[10], b'T' | b't' | b' ')
        && b[13] == b':'
        && b[16] == b':';
    if !separators {
        return None;
    }
    let num = |r: std::ops::Range<usize>| digits::<u32>(text.get(r)?);
    let t = from_parts(
        i64::from(num(0..4)?),
        num(5..7)?,
        num(8..10)?,
        num(11..13)?,
        num(14..16)?,
        num(17..19)?,
    )?;
    let mut rest = text.get(19..)?;
    if let Some(frac) = rest.strip_prefix('.') {
        let count = frac.bytes().take_while(u8::is_ascii_digit).count();
        rest = &frac[count..];
    }
    match rest.as_bytes() {
        [b'Z' | b'z'] => Some(t),
        [sign @ (b'+' | b'-'), _, _, b':', _, _] => {
            let (h, m): (u64, u64) = (digits(rest.get(1..3)?)?, digits(rest.get(4..6)?)?);
            if h > 23 || m > 59 {
                return None;
            }
            let offset = Duration::from_secs(h * 3600 + m * 60);
            if *sign == b'+' {
                t.checked_sub(offset)
            } else {
                t.checked_add(offset)
            }
        }
        _ => None,
    }
}

thread_local! {
    static RNG: Cell<u64> = Cell::new(seed());
}

fn seed() -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64;
    let local = 0u8;
    nanos ^ (&local as *const u8 as u64).rotate_left(32) | 1
}

/// A per-thread splitmix64: jitter and probe codes need unpredictability between runs,
/// not cryptographic strength.
pub fn random_u64() -> u64 {
    RNG.with(|state| {
        let mut z = state.get().wrapping_add(0x9E37_79B9_7F4A_7C15);
        state.set(z);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_parses_dates() {
        let t = UNIX_EPOCH + Duration::from_millis(1_445_412_480_250);
        assert_eq!(iso8601(t), "2015-10-21T07:28:00.250Z");
        let whole = UNIX_EPOCH + Duration::from_secs(1_445_412_480);
        assert_eq!(
            parse_http_date("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(whole)
        );
        assert_eq!(parse_rfc3339("2015-10-21T07:28:00Z"), Some(whole));
        assert_eq!(parse_rfc3339("2015-10-21T07:28:00.5Z"), Some(whole));
        assert_eq!(parse_rfc3339("2015-10-21T09:28:00+02:00"), Some(whole));
        assert_eq!(parse_rfc3339("2015-10-21"), None);
        assert_eq!(parse_http_date("soon"), None);
        assert_eq!(
            iso8601(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00.000Z"
        );
    }

    /// Whatever an upstream writes as a date, parsing gives a time or `None`, never a panic.
    #[test]
    fn hostile_dates_are_refused_or_parsed_without_overflow() {
        let at = |secs: i64| from_unix_seconds(secs).unwrap();
        let http_dates = [
            ("Wed, 21 Oct 400000000000 07:28:00 GMT", None),
            ("Wed, 21 Oct 9999999 07:28:00 GMT", None),
            ("Wed, 21 Oct 18446744073709551616 07:28:00 GMT", None),
            ("Wed, 21 Oct -9223372036854775808 07:28:00 GMT", None),
            ("Wed, 21 Oct +2015 07:28:00 GMT", None),
            ("Wed, 4294967296 Oct 2015 07:28:00 GMT", None),
            ("Wed, 0 Oct 2015 07:28:00 GMT", None),
            ("Sun, 30 Feb 2031 00:00:00 GMT", None),
            ("Sat, 29 Feb 2031 00:00:00 GMT", None),
            ("Wed, 21 Oct 2015 24:00:00 GMT", None),
            ("Wed, 21 Oct 2015 07:60:00 GMT", None),
            ("Wed, 21 Oct 2015 07:28:00:00 GMT", None),
            ("Wed, 21 Oct 2015 99999999999999999999:00:00 GMT", None),
            ("Wed, 21 Oct 2015", None),
            ("", None),
            ("Thu, 29 Feb 2024 00:00:00 GMT", Some(at(1_709_164_800))),
            ("Fri, 31 Dec 9999 23:59:59 GMT", Some(at(253_402_300_799))),
            ("Sat, 01 Jan 0000 00:00:00 GMT", Some(at(-62_167_219_200))),
        ];
        for (text, expected) in http_dates {
            assert_eq!(parse_http_date(text), expected, "{text:?}");
        }
        let rfc3339 = [
            ("4000000000-10-21T07:28:00Z", None),
            ("+201-10-21T07:28:00Z", None),
            ("2031-02-30T00:00:00Z", None),
            ("2031-13-01T00:00:00Z", None),
            ("2031-01-01T00:00:00+99:00", None),
            ("2031-01-01T00:00:00+01:99", None),
            ("2031-01-01T00:00:00+0100", None),
            ("2031-01-01T00:00:00Zjunk", None),
            ("2031-01-01T00x00y00Z", None),
            ("2031-01-01T00:00:00+é:00", None),
            ("2031-01-01T00:00:0é", None),
            ("9999-12-31T23:59:59Z", Some(at(253_402_300_799))),
            ("9999-12-31T23:59:59-23:59", Some(at(253_402_387_139))),
            ("0000-01-01T00:00:00+23:59", Some(at(-62_167_305_540))),
            (
                "1970-01-01T00:00:00.999999999999999999999Z",
                Some(UNIX_EPOCH),
            ),
        ];
        for (text, expected) in rfc3339 {
            assert_eq!(parse_rfc3339(text), expected, "{text:?}");
        }
    }

    #[test]
    fn random_values_differ() {
        assert_ne!(random_u64(), random_u64());
    }
}
