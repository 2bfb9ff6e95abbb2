//! Budget threshold alerts: what is logged, and the JSON the optional webhook receives.
//! Neither contains anything secret: the token's public id, its owner and money amounts.

use crate::budget_window::BudgetWindow;
use crate::money::{format_usd, NanoUsd};
use crate::time::format_rfc3339;

/// The thresholds (ascending percentages, at most 8) that `spent` of `limit` reaches and that are
/// not in `fired` (bit i: `thresholds[i]` already alerted), and `fired` with them added.
pub fn newly_crossed(
    spent: NanoUsd,
    limit: NanoUsd,
    thresholds: &[u8],
    fired: u8,
) -> (Vec<u8>, u8) {
    let percent = if limit == 0 {
        100
    } else {
        u128::from(spent) * 100 / u128::from(limit)
    };
    let mut crossed = Vec::new();
    let mut now_fired = fired;
    for (i, threshold) in thresholds.iter().enumerate().take(8) {
        let bit = 1u8 << i;
        if fired & bit == 0 && percent >= u128::from(*threshold) {
            now_fired |= bit;
            crossed.push(*threshold);
        }
    }
    (crossed, now_fired)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetAlert {
    /// Whose budget: a token's id, or a team's subject id (`team.<id>`).
    pub token_id: String,
    pub owner: String,
    /// The team of the token, or the team itself for a team's budget.
    pub team: Option<String>,
    pub threshold_percent: u8,
    pub spent: NanoUsd,
    pub limit: NanoUsd,
    pub window: BudgetWindow,
    /// When the window restarts; `None` for lifetime budgets.
    pub reset_at: Option<i64>,
    /// Unix seconds.
    pub at: i64,
}

impl BudgetAlert {
    /// The team whose own budget this is, when it is a team's.
    fn team_budget(&self) -> Option<&str> {
        crate::team::team_of_subject(&self.token_id)
    }

    pub fn log_line(&self) -> String {
        if let Some(team) = self.team_budget() {
            return format!(
                "shieldkey: budget alert: team {} reached {}% of its {} budget: spent {} of {} USD",
                team,
                self.threshold_percent,
                self.window.name(),
                format_usd(self.spent),
                format_usd(self.limit),
            );
        }
        format!(
            "shieldkey: budget alert: token {} (owner '{}') reached {}% of its {} budget: spent {} of {} USD",
            self.token_id,
            self.owner,
            self.threshold_percent,
            self.window.name(),
            format_usd(self.spent),
            format_usd(self.limit),
        )
    }

    pub fn webhook_body(&self) -> Vec<u8> {
        let (event, token_id, owner) = match self.team_budget() {
            Some(_) => ("shieldkey.team_budget_threshold", None, None),
            None => (
                "shieldkey.budget_threshold",
                Some(self.token_id.as_str()),
                Some(self.owner.as_str()),
            ),
        };
        serde_json::json!({
            "event": event,
            "token_id": token_id,
            "owner": owner,
            "team": self.team,
            "threshold_percent": self.threshold_percent,
            "spent_nano_usd": self.spent,
            "limit_nano_usd": self.limit,
            "spent_usd": format_usd(self.spent),
            "limit_usd": format_usd(self.limit),
            "window": self.window.name(),
            "window_resets_at": self.reset_at.map(format_rfc3339),
            "at": format_rfc3339(self.at),
        })
        .to_string()
        .into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webhook_body_carries_the_facts() {
        let alert = BudgetAlert {
            token_id: "ci-bot".into(),
            owner: "platform".into(),
            team: Some("eng".into()),
            threshold_percent: 80,
            spent: 8_000_000_000,
            limit: 10_000_000_000,
            window: BudgetWindow::Daily,
            reset_at: Some(1_795_564_800),
            at: 1_795_548_089,
        };
        let v: serde_json::Value = serde_json::from_slice(&alert.webhook_body()).unwrap();
        assert_eq!(v["token_id"], "ci-bot");
        assert_eq!(v["threshold_percent"], 80);
        assert_eq!(v["spent_nano_usd"], 8_000_000_000u64);
        assert_eq!(v["window"], "daily");
        assert_eq!(v["window_resets_at"], "2026-11-25T00:00:00Z");
        assert_eq!(v["team"], "eng");
        assert!(
            alert.log_line().contains("80% of its daily budget"),
            "{}",
            alert.log_line()
        );
        let team = BudgetAlert {
            token_id: "team.eng".into(),
            owner: String::new(),
            ..alert
        };
        let v: serde_json::Value = serde_json::from_slice(&team.webhook_body()).unwrap();
        assert_eq!(v["event"], "shieldkey.team_budget_threshold");
        assert_eq!(v["team"], "eng");
        assert!(v["token_id"].is_null() && v["owner"].is_null());
        assert_eq!(
            team.log_line(),
            "shieldkey: budget alert: team eng reached 80% of its daily budget: spent 8.00 of 10.00 USD"
        );
    }
}
