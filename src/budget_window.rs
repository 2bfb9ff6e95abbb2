//! Budget windows: when a token's spend starts again from zero.
//!
//! Calendar windows reset at UTC boundaries (midnight, the first of the month). A fixed window of
//! N seconds is aligned to the Unix epoch (so `3600` resets on every UTC hour); it also lets tests
//! watch a reset happen without waiting a day.

use crate::time;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetWindow {
    Lifetime,
    Daily,
    Monthly,
    FixedSeconds(u32),
}

impl BudgetWindow {
    pub fn parse(text: &str) -> Result<BudgetWindow, String> {
        match text {
            "lifetime" => Ok(BudgetWindow::Lifetime),
            "daily" => Ok(BudgetWindow::Daily),
            "monthly" => Ok(BudgetWindow::Monthly),
            "hourly" => Ok(BudgetWindow::FixedSeconds(3600)),
            other => {
                let secs = other
                    .strip_suffix('s')
                    .and_then(|n| n.parse::<u32>().ok())
                    .filter(|n| *n > 0)
                    .ok_or_else(|| {
                        "must be lifetime, daily, monthly, hourly or a number of seconds like \"300s\""
                            .to_string()
                    })?;
                Ok(BudgetWindow::FixedSeconds(secs))
            }
        }
    }

    /// The configuration spelling of the window (`hourly` is reported as `3600s`).
    pub fn name(&self) -> String {
        match self {
            BudgetWindow::Lifetime => "lifetime".into(),
            BudgetWindow::Daily => "daily".into(),
            BudgetWindow::Monthly => "monthly".into(),
            BudgetWindow::FixedSeconds(n) => format!("{n}s"),
        }
    }

    /// Start of the window containing `now` (unix seconds). Lifetime starts at 0.
    pub fn start(&self, now: i64) -> i64 {
        match self {
            BudgetWindow::Lifetime => 0,
            BudgetWindow::Daily => time::day_start(now),
            BudgetWindow::Monthly => time::month_start(now),
            BudgetWindow::FixedSeconds(n) => now - now.rem_euclid(i64::from(*n)),
        }
    }

    /// When the window containing `now` ends; `None` for lifetime budgets.
    pub fn reset_at(&self, now: i64) -> Option<i64> {
        match self {
            BudgetWindow::Lifetime => None,
            BudgetWindow::Daily => Some(time::next_day_start(now)),
            BudgetWindow::Monthly => Some(time::next_month_start(now)),
            BudgetWindow::FixedSeconds(n) => Some(self.start(now) + i64::from(*n)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        assert_eq!(BudgetWindow::parse("daily"), Ok(BudgetWindow::Daily));
        assert_eq!(
            BudgetWindow::parse("hourly"),
            Ok(BudgetWindow::FixedSeconds(3600))
        );
        assert_eq!(BudgetWindow::parse("5s"), Ok(BudgetWindow::FixedSeconds(5)));
        for bad in ["", "weekly", "0s", "-5s", "5", "s"] {
            assert!(BudgetWindow::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn boundaries() {
        // 2026-11-24T19:21:29Z
        let now = 1_795_548_089;
        assert_eq!(BudgetWindow::Daily.start(now), 1_795_478_400);
        assert_eq!(BudgetWindow::Daily.reset_at(now), Some(1_795_564_800));
        assert_eq!(
            BudgetWindow::Monthly.start(now),
            time::parse_rfc3339("2026-11-01T00:00:00Z").unwrap()
        );
        assert_eq!(
            BudgetWindow::Monthly.reset_at(now),
            Some(time::parse_rfc3339("2026-12-01T00:00:00Z").unwrap())
        );
        assert_eq!(BudgetWindow::FixedSeconds(60).start(now), now - 29);
        assert_eq!(BudgetWindow::Lifetime.reset_at(now), None);
    }
}
