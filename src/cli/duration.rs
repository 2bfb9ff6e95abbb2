//! `--ttl` values: a positive integer with a unit: `s`, `m`, `h` or `d` (e.g. `90d`, `12h`).

pub fn parse_ttl(text: &str) -> Result<i64, String> {
    let bad = || format!("'{text}' is not a positive duration like 3600s, 30m, 12h or 90d");
    let split = text.len().checked_sub(1).ok_or_else(bad)?;
    let (number, unit) = (
        text.get(..split).ok_or_else(bad)?,
        text.get(split..).ok_or_else(bad)?,
    );
    let n: i64 = number.parse().map_err(|_| bad())?;
    if n <= 0 || !number.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let unit_secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(bad()),
    };
    n.checked_mul(unit_secs).ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units() {
        assert_eq!(parse_ttl("3600s"), Ok(3600));
        assert_eq!(parse_ttl("30m"), Ok(1800));
        assert_eq!(parse_ttl("24h"), Ok(86_400));
        assert_eq!(parse_ttl("90d"), Ok(90 * 86_400));
        for bad in [
            "",
            "h",
            "0h",
            "-1h",
            "+1h",
            "1.5h",
            "10",
            "10w",
            "99999999999999999d",
        ] {
            assert!(parse_ttl(bad).is_err(), "{bad}");
        }
    }
}
