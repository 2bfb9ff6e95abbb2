//! Budget threshold alerts: what is logged, and the JSON the optional webhook receives.
//! Neither contains anything secret: the token's public id, its owner and money amounts.

use crate::budget_window::BudgetWindow;
use crate::money::{format_usd, NanoUsd};
use crate::time::format_rfc3339;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetAlert {
    pub token_id: String,
    pub owner: String,
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
    pub fn log_line(&self) -> String {
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
        serde_json::json!({
            "event": "shieldkey.budget_threshold",
            "token_id": self.token_id,
            "owner": self.owner,
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
        assert!(
            alert.log_line().contains("80% of its daily budget"),
            "{}",
            alert.log_line()
        );
    }
}
