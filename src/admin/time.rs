//! Times as the operator's tools write them: [`parse_time`].

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A point in time as the operator's tools take it (`dirq push --at`, the `not_before`
/// of `dirq serve`): seconds since the Unix epoch, as `@SECONDS` (fractions allowed) or
/// bare digits, or RFC 3339 with an explicit zone, `2026-12-01T08:00:00Z` or
/// `2026-12-01 09:00:00.5+01:00`. A local time without a zone is refused rather than
/// guessed, as are times before the epoch and impossible dates.
///
/// ```
/// use std::time::{Duration, UNIX_EPOCH};
/// use dirq::admin::parse_time;
///
/// let noon = UNIX_EPOCH + Duration::from_secs(1_796_126_400);
/// assert_eq!(parse_time("2026-12-01T12:00:00Z"), Some(noon));
/// assert_eq!(parse_time("@1796126400"), Some(noon));
/// assert_eq!(parse_time("1796126400"), Some(noon));
/// assert_eq!(parse_time("2026-12-01 12:00:00"), None, "no zone");
/// ```
pub fn parse_time(s: &str) -> Option<SystemTime> {
    let s = s.trim();
    if !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()) {
        return UNIX_EPOCH.checked_add(Duration::from_secs(s.parse().ok()?));
    }
    if let Some(secs) = s.strip_prefix('@') {
        let secs: f64 = secs.parse().ok()?;
        let since = Duration::try_from_secs_f64(secs).ok()?;
        return UNIX_EPOCH.checked_add(since);
    }
    // YYYY-MM-DD[T ]HH:MM:SS[.frac](Z|+HH:MM|-HH:MM)
    let b = s.as_bytes();
    let digits = |from: usize, len: usize| -> Option<i64> {
        let part = s.get(from..from + len)?;
        part.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| part.parse().ok())?
    };
    let shape = b.len() >= 20
        && b[4] == b'-'
        && b[7] == b'-'
        && matches!(b[10], b'T' | b't' | b' ')
        && b[13] == b':'
        && b[16] == b':';
    if !shape {
        return None;
    }
    let (year, month, day) = (digits(0, 4)?, digits(5, 2)?, digits(8, 2)?);
    let (hour, minute, second) = (digits(11, 2)?, digits(14, 2)?, digits(17, 2)?);
    let mut rest = &s[19..];
    let mut nanos = 0u32;
    if let Some(frac) = rest.strip_prefix('.') {
        let len = frac.bytes().take_while(u8::is_ascii_digit).count();
        if len == 0 {
            return None;
        }
        let padded = format!("{:0<9}", &frac[..len.min(9)]);
        nanos = padded.parse().ok()?;
        rest = &frac[len..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ if rest.len() == 6 && rest.as_bytes()[3] == b':' => {
            let sign = match rest.as_bytes()[0] {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let (h, m) = (digits_of(&rest[1..3])?, digits_of(&rest[4..6])?);
            sign * (h * 3600 + m * 60)
        }
        _ => return None,
    };
    let days_in_month = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        _ => return None,
    };
    if !(1..=days_in_month).contains(&day) || hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let secs =
        days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second - offset;
    let secs = u64::try_from(secs).ok()?;
    UNIX_EPOCH.checked_add(Duration::new(secs, nanos))
}

fn digits_of(s: &str) -> Option<i64> {
    s.bytes()
        .all(|c| c.is_ascii_digit())
        .then(|| s.parse().ok())?
}

/// Days from 1970-01-01 to the given date of the proleptic Gregorian calendar (Howard
/// Hinnant's `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month_index = (month + 9) % 12;
    let day_of_year = (153 * month_index + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse_as_rfc_3339_or_epoch_seconds() {
        let at = |secs| UNIX_EPOCH + Duration::from_secs(secs);
        assert_eq!(parse_time("@0"), Some(at(0)));
        assert_eq!(
            parse_time("@1796112000.5"),
            Some(at(1_796_112_000) + Duration::from_millis(500))
        );
        assert_eq!(parse_time("1970-01-01T00:00:00Z"), Some(at(0)));
        assert_eq!(parse_time("2000-03-01T00:00:00Z"), Some(at(951_868_800)));
        assert_eq!(parse_time("2026-12-01T08:00:00Z"), Some(at(1_796_112_000)));
        assert_eq!(
            parse_time("2026-12-01 09:00:00+01:00"),
            Some(at(1_796_112_000))
        );
        assert_eq!(
            parse_time("2026-12-01T07:30:00.25-00:30"),
            Some(at(1_796_112_000) + Duration::from_millis(250))
        );
        for bad in [
            "",
            "tomorrow",
            "2026-12-01T08:00:00",
            "2026-02-30T08:00:00Z",
            "2026-12-01T24:00:00Z",
            "2026-12-01T08:00:00+1:00",
            "@-5",
            "1969-12-31T23:59:59Z",
        ] {
            assert!(parse_time(bad).is_none(), "{bad:?}");
        }
        assert_eq!(parse_time("1796112000"), Some(at(1_796_112_000)));
    }
}
