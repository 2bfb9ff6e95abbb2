//! UTC calendar arithmetic: RFC 3339 timestamps and the day/month boundaries budgets reset at.
//!
//! Written out rather than pulled in as a dependency because the filter needs only this much and
//! the wasm must stay small. Days↔civil-date conversion follows Howard Hinnant's well-known
//! `days_from_civil` / `civil_from_days` algorithms (proleptic Gregorian calendar).

const SECS_PER_DAY: i64 = 86_400;

/// Parses `YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)` into Unix seconds (fraction truncated).
pub fn parse_rfc3339(text: &str) -> Result<i64, String> {
    let err = || {
        format!(
            "'{}' is not an RFC 3339 timestamp like 2026-01-31T23:59:59Z",
            shorten(text)
        )
    };
    let b = text.as_bytes();
    if b.len() < 20 || !b.is_ascii() {
        return Err(err());
    }
    let num = |from: usize, len: usize| -> Result<i64, String> {
        let digits = b.get(from..from + len).ok_or_else(err)?;
        if !digits.iter().all(u8::is_ascii_digit) {
            return Err(err());
        }
        Ok(digits
            .iter()
            .fold(0i64, |acc, d| acc * 10 + i64::from(d - b'0')))
    };
    let sep = |at: usize, allowed: &[u8]| -> Result<(), String> {
        match b.get(at) {
            Some(c) if allowed.contains(c) => Ok(()),
            _ => Err(err()),
        }
    };
    let year = num(0, 4)?;
    sep(4, b"-")?;
    let month = num(5, 2)?;
    sep(7, b"-")?;
    let day = num(8, 2)?;
    sep(10, b"Tt")?;
    let hour = num(11, 2)?;
    sep(13, b":")?;
    let minute = num(14, 2)?;
    sep(16, b":")?;
    let second = num(17, 2)?;

    let mut i = 19;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == start {
            return Err(err());
        }
    }
    let offset = match b.get(i) {
        Some(b'Z' | b'z') if i + 1 == b.len() => 0,
        Some(sign @ (b'+' | b'-')) if i + 6 == b.len() => {
            let oh = num(i + 1, 2)?;
            sep(i + 3, b":")?;
            let om = num(i + 4, 2)?;
            if oh > 23 || om > 59 {
                return Err(err());
            }
            let secs = oh * 3600 + om * 60;
            if *sign == b'+' {
                secs
            } else {
                -secs
            }
        }
        _ => return Err(err()),
    };

    if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
        return Err(format!("'{}' is not a valid calendar date", shorten(text)));
    }
    // Leap seconds (:60) are refused rather than guessed at: no policy needs one.
    if hour > 23 || minute > 59 || second > 59 {
        return Err(format!("'{}' is not a valid time of day", shorten(text)));
    }
    let days = days_from_civil(year, month, day);
    Ok(days * SECS_PER_DAY + hour * 3600 + minute * 60 + second - offset)
}

/// Formats Unix seconds as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn format_rfc3339(unix: i64) -> String {
    let days = unix.div_euclid(SECS_PER_DAY);
    let secs = unix.rem_euclid(SECS_PER_DAY);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// Midnight UTC of the day containing `unix`.
pub fn day_start(unix: i64) -> i64 {
    unix.div_euclid(SECS_PER_DAY) * SECS_PER_DAY
}

pub fn next_day_start(unix: i64) -> i64 {
    day_start(unix).saturating_add(SECS_PER_DAY)
}

/// Midnight UTC on the first of the month containing `unix`.
pub fn month_start(unix: i64) -> i64 {
    let (y, m, _) = civil_from_days(unix.div_euclid(SECS_PER_DAY));
    days_from_civil(y, m, 1) * SECS_PER_DAY
}

pub fn next_month_start(unix: i64) -> i64 {
    let (y, m, _) = civil_from_days(unix.div_euclid(SECS_PER_DAY));
    let (y, m) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    days_from_civil(y, m, 1) * SECS_PER_DAY
}

fn is_leap(year: i64) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Error messages quote the input, but never more than a short prefix of it.
fn shorten(text: &str) -> String {
    text.chars().take(40).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_utc_and_offsets() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z").unwrap(), 0);
        assert_eq!(
            parse_rfc3339("2026-11-24T12:00:00Z").unwrap(),
            1_795_521_600
        );
        assert_eq!(
            parse_rfc3339("2026-11-24T14:00:00+02:00").unwrap(),
            parse_rfc3339("2026-11-24T12:00:00Z").unwrap()
        );
        assert_eq!(
            parse_rfc3339("2026-11-24T07:30:00-04:30").unwrap(),
            parse_rfc3339("2026-11-24T12:00:00Z").unwrap()
        );
        assert_eq!(
            parse_rfc3339("2026-11-24t12:00:00.999z").unwrap(),
            1_795_521_600
        );
        assert_eq!(parse_rfc3339("1969-12-31T23:59:59Z").unwrap(), -1);
    }

    #[test]
    fn rejects_malformed_and_impossible_dates() {
        for bad in [
            "",
            "2026-11-24",
            "2026-11-24T12:00:00",
            "2026-11-24 12:00:00Z",
            "2026-13-01T00:00:00Z",
            "2026-02-29T00:00:00Z",
            "2026-04-31T00:00:00Z",
            "2026-11-24T24:00:00Z",
            "2026-11-24T23:60:00Z",
            "2026-11-24T23:59:60Z",
            "2026-11-24T12:00:00.Z",
            "2026-11-24T12:00:00+0200",
            "2026-11-24T12:00:00Zjunk",
            "２026-11-24T12:00:00Z",
        ] {
            assert!(parse_rfc3339(bad).is_err(), "{bad}");
        }
        assert!(parse_rfc3339("2024-02-29T00:00:00Z").is_ok());
    }

    #[test]
    fn formats_round_trip() {
        for t in [0, -1, 951_782_400, 1_795_521_600, 4_102_444_799] {
            assert_eq!(parse_rfc3339(&format_rfc3339(t)).unwrap(), t);
        }
        assert_eq!(format_rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn calendar_boundaries() {
        let t = parse_rfc3339("2026-12-31T23:59:59Z").unwrap();
        assert_eq!(day_start(t), parse_rfc3339("2026-12-31T00:00:00Z").unwrap());
        assert_eq!(
            next_day_start(t),
            parse_rfc3339("2027-01-01T00:00:00Z").unwrap()
        );
        assert_eq!(
            month_start(t),
            parse_rfc3339("2026-12-01T00:00:00Z").unwrap()
        );
        assert_eq!(
            next_month_start(t),
            parse_rfc3339("2027-01-01T00:00:00Z").unwrap()
        );
        let feb = parse_rfc3339("2028-02-29T10:00:00Z").unwrap();
        assert_eq!(
            next_month_start(feb),
            parse_rfc3339("2028-03-01T00:00:00Z").unwrap()
        );
        // A boundary instant belongs to the window it starts.
        let midnight = parse_rfc3339("2026-11-01T00:00:00Z").unwrap();
        assert_eq!(month_start(midnight), midnight);
        assert_eq!(day_start(midnight), midnight);
    }
}
