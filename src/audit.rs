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

    /// Filter-state entries known when the response is over.
    pub fn accounting_entries(&self) -> Vec<(&'static str, String)> {
        vec![
            ("shieldkey_prompt_tokens", self.prompt_tokens.to_string()),
            (
                "shieldkey_completion_tokens",
                self.completion_tokens.to_string(),
            ),
            ("shieldkey_cost_nano_usd", self.cost.to_string()),
            ("shieldkey_cost_estimated", self.estimated.to_string()),
        ]
    }
}
