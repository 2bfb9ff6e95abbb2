//! The audit facts of one request, gathered in one place and written out as Envoy filter state
//! (`wasm.shieldkey_*`), which access logs read with `%FILTER_STATE(wasm.shieldkey_token_id:PLAIN)%`.
//! Only public facts live here: the token id, the decision code, the model and the accounting.

use crate::money::NanoUsd;

/// Longest text from a client or the upstream written to filter state or a log line.
pub const MAX_AUDIT_TEXT: usize = 128;

/// `text` made safe for a log line, a stat name or filter state: at most `MAX_AUDIT_TEXT`
/// characters of `[A-Za-z0-9._:/@+-]`, anything else replaced by `_`. No newline, quote or
/// control character written by a client can forge a log line.
pub fn printable(text: &str) -> String {
    text.chars()
        .take(MAX_AUDIT_TEXT)
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._:/@+-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditFacts {
    pub token_id: Option<String>,
    /// The token's owner as the policy states it (made printable).
    pub owner: Option<String>,
    /// The token's team (its id, not the subject id).
    pub team: Option<String>,
    /// The route as the route table names it (`v1/conversations/{}`), or `unknown` for a path
    /// outside it; never the raw path.
    pub route: Option<&'static str>,
    /// The id of the upstream key the request was sent with.
    pub upstream_key: Option<String>,
    /// Codes of the refusals a dry run let through (`decision` is then `allowed`).
    pub would_deny: Vec<&'static str>,
    /// `allowed` or a denial code.
    pub decision: Option<&'static str>,
    pub model: Option<String>,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost: NanoUsd,
    pub estimated: bool,
}

impl AuditFacts {
    /// Filter-state entries known when the request is decided.
    pub fn decision_entries(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::with_capacity(8);
        if let Some(id) = &self.token_id {
            out.push(("shieldkey_token_id", id.clone()));
        }
        if let Some(owner) = self.owner.as_deref().filter(|o| !o.is_empty()) {
            out.push(("shieldkey_owner", printable(owner)));
        }
        if let Some(route) = self.route {
            out.push(("shieldkey_route", route.to_string()));
        }
        if let Some(key) = &self.upstream_key {
            out.push(("shieldkey_upstream_key", key.clone()));
        }
        if let Some(team) = &self.team {
            out.push(("shieldkey_team", team.clone()));
        }
        if !self.would_deny.is_empty() {
            out.push(("shieldkey_would_deny", self.would_deny.join(",")));
        }
        if let Some(decision) = self.decision {
            out.push(("shieldkey_decision", decision.to_string()));
        }
        // An allowed request's model is written with its accounting (it may only be known from
        // the response); a refused request has no accounting.
        if let (Some(model), false) = (&self.model, self.decision == Some("allowed")) {
            out.push(("shieldkey_model", printable(model)));
        }
        out
    }

    /// The log line of a request a dry run let through.
    pub fn would_deny_line(&self) -> String {
        format!(
            "shieldkey: dry run: request of token {} (team {}) would be refused: {}",
            self.token_id.as_deref().unwrap_or("-"),
            self.team.as_deref().unwrap_or("-"),
            self.would_deny.join(","),
        )
    }

    /// Filter-state entries known when the response is over (the model again: without a body
    /// rule it is only known from the response).
    pub fn accounting_entries(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::with_capacity(5);
        if let Some(model) = &self.model {
            out.push(("shieldkey_model", printable(model)));
        }
        out.extend([
            ("shieldkey_prompt_tokens", self.prompt_tokens.to_string()),
            (
                "shieldkey_completion_tokens",
                self.completion_tokens.to_string(),
            ),
            ("shieldkey_cost_nano_usd", self.cost.to_string()),
            ("shieldkey_cost_estimated", self.estimated.to_string()),
        ]);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_carry_only_public_facts() {
        let facts = AuditFacts {
            token_id: Some("alice".into()),
            decision: Some("allowed"),
            model: Some("mistral-small-latest".into()),
            prompt_tokens: 3,
            completion_tokens: 4,
            cost: 2_850,
            estimated: false,
            ..AuditFacts::default()
        };
        let decided = facts.decision_entries();
        assert_eq!(decided[0], ("shieldkey_token_id", "alice".to_string()));
        assert_eq!(decided[1], ("shieldkey_decision", "allowed".to_string()));
        let accounted = facts.accounting_entries();
        assert!(accounted.contains(&("shieldkey_cost_nano_usd", "2850".to_string())));
        assert!(accounted.contains(&("shieldkey_model", "mistral-small-latest".to_string())));
        assert_eq!(AuditFacts::default().decision_entries(), vec![]);
        let routed = AuditFacts {
            token_id: Some("bob".into()),
            owner: Some("bob@example.com\nforged".into()),
            route: Some("v1/conversations/{}"),
            upstream_key: Some("prod".into()),
            ..AuditFacts::default()
        };
        let entries = routed.decision_entries();
        assert!(entries.contains(&("shieldkey_owner", "bob@example.com_forged".to_string())));
        assert!(entries.contains(&("shieldkey_route", "v1/conversations/{}".to_string())));
        assert!(entries.contains(&("shieldkey_upstream_key", "prod".to_string())));
        let dry = AuditFacts {
            token_id: Some("bob".into()),
            team: Some("eng".into()),
            would_deny: vec!["shield_model_denied", "shield_team_budget_exceeded"],
            decision: Some("allowed"),
            ..AuditFacts::default()
        };
        let entries = dry.decision_entries();
        assert!(entries.contains(&("shieldkey_team", "eng".to_string())));
        assert!(entries.contains(&(
            "shieldkey_would_deny",
            "shield_model_denied,shield_team_budget_exceeded".to_string()
        )));
        assert_eq!(
            dry.would_deny_line(),
            "shieldkey: dry run: request of token bob (team eng) would be refused: shield_model_denied,shield_team_budget_exceeded"
        );
    }

    #[test]
    fn client_text_cannot_forge_log_lines() {
        let forged = AuditFacts {
            model: Some("x\n[2026] token=alice decision=allowed \"".into()),
            ..AuditFacts::default()
        };
        let (_, model) = &forged.accounting_entries()[0];
        assert_eq!(model, "x__2026__token_alice_decision_allowed__");
        assert_eq!(printable(&"m".repeat(500)).len(), MAX_AUDIT_TEXT);
        assert_eq!(
            printable("ft:mistral-small:a/b@c+d"),
            "ft:mistral-small:a/b@c+d"
        );
    }
}
