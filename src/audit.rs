//! The audit facts of one request, gathered in one place and written out as Envoy filter state
//! (`wasm.shieldkey_*`), which access logs read with `%FILTER_STATE(wasm.shieldkey_token_id:PLAIN)%`.
//! Only public facts live here: the token id, the decision code, the model and the accounting.

use crate::money::NanoUsd;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditFacts {
    pub token_id: Option<String>,
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
        let mut out = Vec::with_capacity(3);
        if let Some(id) = &self.token_id {
            out.push(("shieldkey_token_id", id.clone()));
        }
        if let Some(decision) = self.decision {
            out.push(("shieldkey_decision", decision.to_string()));
        }
        if let Some(model) = &self.model {
            out.push(("shieldkey_model", model.clone()));
        }
        out
    }

    /// Filter-state entries known when the response is over (the model again: without a body
    /// rule it is only known from the response).
    pub fn accounting_entries(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::with_capacity(5);
        if let Some(model) = &self.model {
            out.push(("shieldkey_model", model.clone()));
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
        };
        let decided = facts.decision_entries();
        assert_eq!(decided[0], ("shieldkey_token_id", "alice".to_string()));
        assert_eq!(decided[1], ("shieldkey_decision", "allowed".to_string()));
        let accounted = facts.accounting_entries();
        assert!(accounted.contains(&("shieldkey_cost_nano_usd", "2850".to_string())));
        assert!(accounted.contains(&("shieldkey_model", "mistral-small-latest".to_string())));
        assert_eq!(AuditFacts::default().decision_entries(), vec![]);
    }
}
