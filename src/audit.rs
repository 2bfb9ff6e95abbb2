//! The audit facts of one request, gathered in one place and written out as one Envoy
//! filter-state value, `wasm.shieldkey_audit`: the request's fields of the JSON audit record,
//! already JSON (`,"decision":"allowed","token_id":"alice",...`). The shipped access logs splice
//! it into a record whose other fields are Envoy's own
//! (`%FILTER_STATE(wasm.shieldkey_audit:PLAIN)%`, README "Audit trail"). It is written once,
//! when the stream ends.
//!
//! One value, not one per field: each filter-state write costs Envoy about half a microsecond
//! (a state object, a map entry), and ten per request were an eighth of what the filter added
//! to a request in `make bench`. Every text in the fragment is JSON-escaped here, as ASCII, and
//! at most `MAX_AUDIT_TEXT` characters long, so nothing a client sends (a request id, a model
//! name) can end the record, forge a field or split a line.
//! Only public facts live here: ids, the decision code, the model, the accounting.

use crate::money::NanoUsd;

/// Longest text from a client or the upstream written to filter state or a log line (longer
/// request headers are cut there).
pub const MAX_AUDIT_TEXT: usize = 128;

/// The filter-state name of the fragment (`wasm.` is Envoy's prefix for a filter's values).
pub const FILTER_STATE_NAME: &str = "shieldkey_audit";

/// `text` made safe for a log line or a stat name: at most `MAX_AUDIT_TEXT`
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
    /// The request's headers were read: the record gets ShieldKey's fields from here on.
    pub seen: bool,
    /// Request headers as the client (or Envoy) sent them, cut and escaped when written.
    pub method: Option<Vec<u8>>,
    pub request_id: Option<Vec<u8>>,
    pub country: Option<Vec<u8>>,
    /// The response was charged: the numbers below are its accounting.
    pub accounted: bool,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost: NanoUsd,
    pub estimated: bool,
}

impl AuditFacts {
    /// The record's fields ShieldKey knows, as JSON members each preceded by a comma (keys
    /// sorted), absent ones as `null` (`decision` too, for a request that ended before it was
    /// decided); `None` when the request's headers were never seen (the record then has Envoy's
    /// fields only). Numbers are written as strings (`"prompt_tokens":"1000"`), as the record
    /// has always had them.
    pub fn log_fragment(&self) -> Option<String> {
        if !self.seen {
            return None;
        }
        let accounted = |value: String| self.accounted.then_some(value);
        let owner = self
            .owner
            .as_deref()
            .filter(|o| !o.is_empty())
            .map(printable);
        let would_deny = (!self.would_deny.is_empty()).then(|| self.would_deny.join(","));
        let text = |bytes: &Option<Vec<u8>>| {
            bytes.as_deref().map(|b| {
                String::from_utf8_lossy(b)
                    .chars()
                    .take(MAX_AUDIT_TEXT)
                    .collect::<String>()
            })
        };
        let fields: [(&str, Option<String>); 15] = [
            (
                "completion_tokens",
                accounted(self.completion_tokens.to_string()),
            ),
            ("cost_estimated", accounted(self.estimated.to_string())),
            ("cost_nano_usd", accounted(self.cost.to_string())),
            ("country", text(&self.country)),
            ("decision", self.decision.map(str::to_string)),
            ("method", text(&self.method)),
            ("model", self.model.as_deref().map(printable)),
            ("owner", owner),
            ("prompt_tokens", accounted(self.prompt_tokens.to_string())),
            ("request_id", text(&self.request_id)),
            ("route", self.route.map(str::to_string)),
            ("team", self.team.clone()),
            ("token_id", self.token_id.clone()),
            ("upstream_key", self.upstream_key.clone()),
            ("would_deny", would_deny),
        ];
        let mut out = String::with_capacity(512);
        for (name, value) in fields {
            out.push_str(",\"");
            out.push_str(name);
            out.push_str("\":");
            match value {
                Some(v) => push_json_string(&mut out, &v),
                None => out.push_str("null"),
            }
        }
        Some(out)
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
}

/// `text` as a JSON string of printable ASCII: quotes and backslashes escaped, every other
/// character outside ` `..`~` written as `\uXXXX` (RFC 8259; UTF-16 pairs above U+FFFF), so a
/// value can neither end its string nor its line, for readers that also end lines at U+2028,
/// U+2029 or U+0085.
fn push_json_string(out: &mut String, text: &str) {
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            ' '..='~' => out.push(c),
            c => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    /// The fragment as the access log splices it into a record, parsed.
    fn record(facts: &AuditFacts) -> Value {
        let fragment = facts.log_fragment().unwrap();
        serde_json::from_str(&format!("{{\"status\":200{fragment}}}")).unwrap()
    }

    #[test]
    fn the_fragment_carries_only_public_facts() {
        let facts = AuditFacts {
            seen: true,
            token_id: Some("alice".into()),
            decision: Some("allowed"),
            model: Some("mistral-small-latest".into()),
            route: Some("v1/conversations/{}"),
            upstream_key: Some("prod".into()),
            method: Some(b"POST".to_vec()),
            accounted: true,
            prompt_tokens: 3,
            completion_tokens: 4,
            cost: 2_850,
            estimated: false,
            ..AuditFacts::default()
        };
        assert_eq!(
            record(&facts),
            json!({"status": 200, "completion_tokens": "4", "cost_estimated": "false",
                   "cost_nano_usd": "2850", "country": null, "decision": "allowed",
                   "method": "POST", "model": "mistral-small-latest", "owner": null,
                   "prompt_tokens": "3", "request_id": null, "route": "v1/conversations/{}",
                   "team": null, "token_id": "alice", "upstream_key": "prod",
                   "would_deny": null})
        );
        // Nothing before the headers were seen: the record keeps Envoy's fields only.
        assert_eq!(AuditFacts::default().log_fragment(), None);
        // Seen, not decided (the client went away first): what is known, and no decision.
        let undecided = AuditFacts {
            seen: true,
            token_id: Some("alice".into()),
            method: Some(b"POST".to_vec()),
            ..AuditFacts::default()
        };
        let r = record(&undecided);
        assert_eq!(
            (&r["token_id"], &r["decision"]),
            (&json!("alice"), &Value::Null)
        );
        let dry = AuditFacts {
            seen: true,
            token_id: Some("bob".into()),
            owner: Some("bob@example.com\nforged".into()),
            team: Some("eng".into()),
            would_deny: vec!["shield_model_denied", "shield_team_budget_exceeded"],
            decision: Some("shield_token_rate_limited"),
            ..AuditFacts::default()
        };
        let r = record(&dry);
        assert_eq!(r["owner"], "bob@example.com_forged");
        assert_eq!(r["team"], "eng");
        assert_eq!(
            r["would_deny"],
            "shield_model_denied,shield_team_budget_exceeded"
        );
        // A refused request was not charged: no accounting, not zeros.
        assert_eq!(r["cost_nano_usd"], Value::Null);
        assert_eq!(
            dry.would_deny_line(),
            "shieldkey: dry run: request of token bob (team eng) would be refused: shield_model_denied,shield_team_budget_exceeded"
        );
    }

    #[test]
    fn client_text_cannot_forge_fields_or_lines() {
        let forged = AuditFacts {
            seen: true,
            decision: Some("allowed"),
            model: Some("x\n[2026] token=alice decision=allowed \"".into()),
            request_id: Some(b"r\",\"decision\":\"allowed\"}\n{\"x\\\x01\xff".to_vec()),
            country: Some(b"F\"R".to_vec()),
            ..AuditFacts::default()
        };
        let fragment = forged.log_fragment().unwrap();
        assert!(
            fragment.bytes().all(|b| (b' '..=b'~').contains(&b)),
            "{fragment}"
        );
        let r = record(&forged);
        assert_eq!(r["model"], "x__2026__token_alice_decision_allowed__");
        assert_eq!(
            r["request_id"],
            "r\",\"decision\":\"allowed\"}\n{\"x\\\u{1}\u{fffd}"
        );
        assert_eq!(r["country"], "F\"R");
        assert_eq!(r["decision"], "allowed");
        // Line separators some readers split on, a character beyond U+FFFF, and a long value.
        let odd = AuditFacts {
            seen: true,
            request_id: Some("a\u{2028}b\u{2029}c\u{85}d\u{1f600}".as_bytes().to_vec()),
            method: Some(vec![b'G'; 5000]),
            ..AuditFacts::default()
        };
        let fragment = odd.log_fragment().unwrap();
        assert!(
            fragment.contains(r#""a\u2028b\u2029c\u0085d\ud83d\ude00""#),
            "{fragment}"
        );
        let r = record(&odd);
        assert_eq!(r["request_id"], "a\u{2028}b\u{2029}c\u{85}d\u{1f600}");
        assert_eq!(r["method"].as_str().unwrap().len(), MAX_AUDIT_TEXT);
        assert_eq!(printable(&"m".repeat(500)).len(), MAX_AUDIT_TEXT);
        assert_eq!(
            printable("ft:mistral-small:a/b@c+d"),
            "ft:mistral-small:a/b@c+d"
        );
    }
}
