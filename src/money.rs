//! Money as integers: nano-USD (10⁻⁹ USD). No floats anywhere in accounting.

pub type NanoUsd = u64;
pub const NANO_PER_USD: NanoUsd = 1_000_000_000;

/// Parses a plain decimal USD amount such as `25`, `0.15` or `0.000000001`.
pub fn parse_usd(text: &str) -> Result<NanoUsd, String> {
    let bad =
        || format!("'{text}' is not a decimal USD amount like \"25.00\" (at most 9 decimals)");
    let (whole, frac) = match text.split_once('.') {
        Some((w, f)) => (w, f),
        None => (text, ""),
    };
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || !digits(whole) || !digits(frac) || frac.len() > 9 || text.ends_with('.')
    {
        return Err(bad());
    }
    let whole: u64 = whole.parse().map_err(|_| bad())?;
    let mut frac_nano: u64 = 0;
    for (i, b) in frac.bytes().enumerate() {
        frac_nano += u64::from(b - b'0') * 10u64.pow(8 - i as u32);
    }
    whole
        .checked_mul(NANO_PER_USD)
        .and_then(|w| w.checked_add(frac_nano))
        .ok_or_else(|| format!("'{text}' is too large"))
}

/// Formats nano-USD with at least 2 decimals and no trailing zeros beyond them: `12.50`,
/// `0.000123`.
pub fn format_usd(value: NanoUsd) -> String {
    let whole = value / NANO_PER_USD;
    let frac = format!("{:09}", value % NANO_PER_USD);
    let trimmed = frac.trim_end_matches('0');
    let shown = if trimmed.len() < 2 {
        &frac[..2]
    } else {
        trimmed
    };
    format!("{whole}.{shown}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_exactly() {
        assert_eq!(parse_usd("25"), Ok(25 * NANO_PER_USD));
        assert_eq!(parse_usd("0.15"), Ok(150_000_000));
        assert_eq!(parse_usd("0.000000001"), Ok(1));
        assert_eq!(parse_usd("18446744073.709551615"), Ok(u64::MAX));
        for bad in [
            "",
            ".5",
            "5.",
            "-1",
            "+1",
            "1e3",
            " 1",
            "1.0000000001",
            "1,5",
            "18446744074",
        ] {
            assert!(parse_usd(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn formats() {
        assert_eq!(format_usd(12_500_000_000), "12.50");
        assert_eq!(format_usd(123_000), "0.000123");
        assert_eq!(format_usd(0), "0.00");
        assert_eq!(format_usd(1), "0.000000001");
        for v in [0, 1, 450_000, 10 * NANO_PER_USD, u64::MAX] {
            assert_eq!(parse_usd(&format_usd(v)), Ok(v));
        }
    }
}
