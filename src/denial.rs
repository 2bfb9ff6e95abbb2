//! Why a request is refused, and the Mistral-shaped local reply that says so.
//!
//! Bodies follow Mistral's documented error shape so official SDKs raise their normal error:
//! `{"object":"error","message":...,"type":...,"param":null,"code":"shield_..."}`. Messages never
//! contain the presented token or any secret.

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denial {
    TokenMissing,
    TokenMalformed,
    TokenUnknown,
    TokenInvalid,
    TokenRevoked,
    TokenExpired,
    TokenNotYetValid,
    /// The upstream key named by the token could not be used (fail closed).
    KeyUnavailable,
    /// The policy this worker was configured with is not readable in shared data.
    PolicyUnavailable,
    /// The client address is outside the token's allowed networks.
    SourceIpDenied,
    /// The client's country (as resolved by Envoy's geoip filter) is not allowed, or unknown.
    CountryDenied,
    RequestRateLimited {
        retry_after_secs: u64,
    },
    TokenRateLimited {
        retry_after_secs: u64,
    },
    /// `reset_at`: unix seconds when the budget window restarts; `None` for lifetime budgets.
    BudgetExceeded {
        reset_at: Option<i64>,
    },
    ModelDenied,
    /// The model has no price and the policy denies unpriced models for budgeted tokens.
    ModelUnpriced,
    MaxTokensExceeded {
        limit: u64,
    },
    BodyTooLarge {
        limit: u64,
    },
    /// A rule needs the JSON request body and it is not JSON, or has no usable `model`.
    BodyUnreadable,
    /// The shared counters could not be updated (contention or a store failure): fail closed.
    LedgerBusy,
    /// The route is outside the Mistral API table, or outside the token's scopes.
    RouteDenied,
    /// The route cannot be capped or metered, and the token has limits that need it.
    RouteUnmetered,
    /// The path is not in the canonical form the upstream routes (percent escapes, `//`, dot
    /// segments): judging one path while the upstream acts on another is refused.
    PathNotCanonical,
    /// `model` is not a model name (control characters, too long).
    ModelNameInvalid,
    /// A tool the upstream runs itself reaches the workspace beyond the token's scopes
    /// (`document_library` needs `read`, a connector `manage`).
    ToolDenied,
    /// A tool the upstream runs itself is billed per call, which the token's limits cannot meter.
    ToolUnmetered,
    /// A rule of the token's team refused the request (the inner denial says which).
    Team(Box<Denial>),
    /// The token names a team whose record is not readable (fleet mode: not synced yet).
    TeamUnavailable,
}

impl Denial {
    /// The same refusal, made by the token's team.
    pub fn by_team(self) -> Denial {
        match self {
            Denial::Team(_) => self,
            other => Denial::Team(Box::new(other)),
        }
    }

    /// Whether a dry run (`enforce: false`) may let this refusal through. Only the rules an
    /// operator configures per token or team: never authentication, never the checks that keep
    /// judging and accounting sound (path form, body readability and size, unavailable policy,
    /// key or counters, unpriced models).
    pub fn is_rule(&self) -> bool {
        match self {
            Denial::SourceIpDenied
            | Denial::CountryDenied
            | Denial::RequestRateLimited { .. }
            | Denial::TokenRateLimited { .. }
            | Denial::BudgetExceeded { .. }
            | Denial::ModelDenied
            | Denial::MaxTokensExceeded { .. }
            | Denial::RouteDenied
            | Denial::RouteUnmetered
            | Denial::ToolDenied
            | Denial::ToolUnmetered => true,
            Denial::Team(inner) => inner.is_rule(),
            _ => false,
        }
    }

    pub fn status(&self) -> u32 {
        match self {
            Denial::Team(inner) => inner.status(),
            Denial::TokenMissing
            | Denial::TokenMalformed
            | Denial::TokenUnknown
            | Denial::TokenInvalid
            | Denial::TokenRevoked
            | Denial::TokenExpired
            | Denial::TokenNotYetValid => 401,
            Denial::SourceIpDenied
            | Denial::CountryDenied
            | Denial::ModelDenied
            | Denial::ModelUnpriced
            | Denial::RouteDenied
            | Denial::RouteUnmetered
            | Denial::ToolDenied
            | Denial::ToolUnmetered => 403,
            Denial::RequestRateLimited { .. }
            | Denial::TokenRateLimited { .. }
            | Denial::BudgetExceeded { .. } => 429,
            Denial::MaxTokensExceeded { .. }
            | Denial::BodyUnreadable
            | Denial::PathNotCanonical
            | Denial::ModelNameInvalid => 400,
            Denial::BodyTooLarge { .. } => 413,
            Denial::KeyUnavailable
            | Denial::PolicyUnavailable
            | Denial::LedgerBusy
            | Denial::TeamUnavailable => 503,
        }
    }

    /// The stable machine-readable code; also the `reason` in stats.
    pub fn code(&self) -> &'static str {
        match self {
            Denial::TokenMissing => "shield_token_missing",
            Denial::TokenMalformed => "shield_token_malformed",
            Denial::TokenUnknown => "shield_token_unknown",
            Denial::TokenInvalid => "shield_token_invalid",
            Denial::TokenRevoked => "shield_token_revoked",
            Denial::TokenExpired => "shield_token_expired",
            Denial::TokenNotYetValid => "shield_token_not_yet_valid",
            Denial::KeyUnavailable => "shield_key_unavailable",
            Denial::PolicyUnavailable => "shield_policy_unavailable",
            Denial::SourceIpDenied => "shield_ip_denied",
            Denial::CountryDenied => "shield_geo_denied",
            Denial::RequestRateLimited { .. } | Denial::TokenRateLimited { .. } => {
                "shield_rate_limited"
            }
            Denial::BudgetExceeded { .. } => "shield_budget_exceeded",
            Denial::ModelDenied | Denial::ModelUnpriced => "shield_model_denied",
            Denial::MaxTokensExceeded { .. } => "shield_max_tokens_exceeded",
            Denial::BodyTooLarge { .. } => "shield_body_too_large",
            Denial::BodyUnreadable => "shield_body_unreadable",
            Denial::LedgerBusy => "shield_ledger_busy",
            Denial::RouteDenied => "shield_route_denied",
            Denial::RouteUnmetered => "shield_route_unmetered",
            Denial::PathNotCanonical => "shield_path_not_canonical",
            Denial::ModelNameInvalid => "shield_model_invalid",
            Denial::ToolDenied => "shield_tool_denied",
            Denial::ToolUnmetered => "shield_tool_unmetered",
            Denial::TeamUnavailable => "shield_team_unavailable",
            Denial::Team(inner) => match inner.code() {
                "shield_ip_denied" => "shield_team_ip_denied",
                "shield_geo_denied" => "shield_team_geo_denied",
                "shield_rate_limited" => "shield_team_rate_limited",
                "shield_budget_exceeded" => "shield_team_budget_exceeded",
                "shield_model_denied" => "shield_team_model_denied",
                "shield_max_tokens_exceeded" => "shield_team_max_tokens_exceeded",
                "shield_route_denied" => "shield_team_route_denied",
                "shield_route_unmetered" => "shield_team_route_unmetered",
                "shield_tool_denied" => "shield_team_tool_denied",
                "shield_tool_unmetered" => "shield_team_tool_unmetered",
                // Not a team rule (body, path, counters): the same code as the token's.
                other => other,
            },
        }
    }

    pub fn error_type(&self) -> &'static str {
        match self.status() {
            401 => "authentication_error",
            429 => "rate_limit_error",
            500..=599 => "server_error",
            _ => "invalid_request_error",
        }
    }

    pub fn message(&self) -> String {
        match self {
            Denial::Team(inner) => inner
                .message()
                .replace("this token's", "this token's team's")
                .replace("this token", "this token's team"),
            Denial::TeamUnavailable => {
                "The gateway policy for this token's team is not loaded yet; retry shortly.".into()
            }
            Denial::TokenMissing => {
                "No API key provided. Send your ShieldKey token as 'Authorization: Bearer sk_shield_t_...'.".into()
            }
            Denial::TokenMalformed => "The API key is not a well-formed ShieldKey token.".into(),
            Denial::TokenUnknown | Denial::TokenInvalid => "Invalid API key.".into(),
            Denial::TokenRevoked => "This ShieldKey token has been revoked.".into(),
            Denial::TokenExpired => "This ShieldKey token has expired.".into(),
            Denial::TokenNotYetValid => "This ShieldKey token is not valid yet.".into(),
            Denial::KeyUnavailable => "The gateway cannot use its upstream key right now.".into(),
            Denial::PolicyUnavailable => "The gateway policy is reloading; retry shortly.".into(),
            Denial::SourceIpDenied => "This token may not be used from your network.".into(),
            Denial::CountryDenied => "This token may not be used from your country.".into(),
            Denial::RequestRateLimited { retry_after_secs } => format!(
                "Request rate limit of this token exceeded; retry after {retry_after_secs} s."
            ),
            Denial::TokenRateLimited { retry_after_secs } => format!(
                "Token-per-minute limit of this token exceeded; retry after {retry_after_secs} s."
            ),
            Denial::BudgetExceeded { reset_at: Some(at) } => format!(
                "The spend budget of this token is exhausted until {}.",
                crate::time::format_rfc3339(*at)
            ),
            Denial::BudgetExceeded { reset_at: None } => {
                "The lifetime spend budget of this token is exhausted.".into()
            }
            Denial::ModelDenied => "This token may not use the requested model.".into(),
            Denial::ModelUnpriced => {
                "The requested model has no price in the gateway policy, so a budgeted token may not use it.".into()
            }
            Denial::MaxTokensExceeded { limit } => {
                format!("max_tokens exceeds this token's limit of {limit}.")
            }
            Denial::BodyTooLarge { limit } => {
                format!("The request body exceeds the gateway's inspection limit of {limit} bytes.")
            }
            Denial::BodyUnreadable => {
                "The request body must be a JSON object with a string 'model' for this token's rules.".into()
            }
            Denial::LedgerBusy => "The gateway could not update usage counters; retry shortly.".into(),
            Denial::RouteDenied => "This token may not use this endpoint.".into(),
            Denial::RouteUnmetered => {
                "This endpoint's cost cannot be capped or metered by the gateway, and this token has spend, token or model limits.".into()
            }
            Denial::PathNotCanonical => {
                "The request path must be in canonical form (no percent-escapes, empty or dot segments).".into()
            }
            Denial::ModelNameInvalid => "The 'model' field is not a valid model name.".into(),
            Denial::ToolDenied => {
                "This token may not use a tool in 'tools' (document_library needs the read scope, connectors the manage scope).".into()
            }
            Denial::ToolUnmetered => {
                "Built-in tools in 'tools' are billed per call, which the gateway cannot meter, and this token has spend or token limits.".into()
            }
        }
    }

    /// Extra response headers (e.g. `retry-after`).
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        match self {
            Denial::Team(inner) => inner.headers(),
            Denial::PolicyUnavailable | Denial::LedgerBusy | Denial::TeamUnavailable => {
                vec![("retry-after", "1".into())]
            }
            Denial::RequestRateLimited { retry_after_secs }
            | Denial::TokenRateLimited { retry_after_secs } => {
                vec![("retry-after", retry_after_secs.max(&1).to_string())]
            }
            Denial::BudgetExceeded { reset_at: Some(at) } => {
                vec![("x-shieldkey-budget-reset", crate::time::format_rfc3339(*at))]
            }
            _ => Vec::new(),
        }
    }

    pub fn body(&self) -> Vec<u8> {
        let body = serde_json::json!({
            "object": "error",
            "message": self.message(),
            "type": self.error_type(),
            "param": null,
            "code": self.code(),
        });
        body.to_string().into_bytes()
    }

    /// Every denial, for defining one stat per reason up front.
    pub const ALL_CODES: &'static [&'static str] = &[
        "shield_token_missing",
        "shield_token_malformed",
        "shield_token_unknown",
        "shield_token_invalid",
        "shield_token_revoked",
        "shield_token_expired",
        "shield_token_not_yet_valid",
        "shield_key_unavailable",
        "shield_policy_unavailable",
        "shield_ip_denied",
        "shield_geo_denied",
        "shield_rate_limited",
        "shield_budget_exceeded",
        "shield_model_denied",
        "shield_max_tokens_exceeded",
        "shield_body_too_large",
        "shield_body_unreadable",
        "shield_ledger_busy",
        "shield_route_denied",
        "shield_route_unmetered",
        "shield_path_not_canonical",
        "shield_model_invalid",
        "shield_tool_denied",
        "shield_tool_unmetered",
        "shield_team_unavailable",
        "shield_team_ip_denied",
        "shield_team_geo_denied",
        "shield_team_rate_limited",
        "shield_team_budget_exceeded",
        "shield_team_model_denied",
        "shield_team_max_tokens_exceeded",
        "shield_team_route_denied",
        "shield_team_route_unmetered",
        "shield_team_tool_denied",
        "shield_team_tool_unmetered",
    ];

    /// The denials a dry run can let through, for defining one `would_deny` stat per reason.
    pub const RULE_CODES: &'static [&'static str] = &[
        "shield_ip_denied",
        "shield_geo_denied",
        "shield_rate_limited",
        "shield_budget_exceeded",
        "shield_model_denied",
        "shield_max_tokens_exceeded",
        "shield_route_denied",
        "shield_route_unmetered",
        "shield_tool_denied",
        "shield_tool_unmetered",
        "shield_team_ip_denied",
        "shield_team_geo_denied",
        "shield_team_rate_limited",
        "shield_team_budget_exceeded",
        "shield_team_model_denied",
        "shield_team_max_tokens_exceeded",
        "shield_team_route_denied",
        "shield_team_route_unmetered",
        "shield_team_tool_denied",
        "shield_team_tool_unmetered",
    ];
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_mistral_shaped() {
        let d = Denial::TokenRevoked;
        let v: serde_json::Value = serde_json::from_slice(&d.body()).unwrap();
        assert_eq!(v["object"], "error");
        assert_eq!(v["type"], "authentication_error");
        assert_eq!(v["code"], "shield_token_revoked");
        assert!(v["param"].is_null());
        assert_eq!(d.status(), 401);
        assert_eq!(Denial::KeyUnavailable.status(), 503);
    }

    #[test]
    fn rate_and_budget_denials_say_when_to_come_back() {
        let d = Denial::RequestRateLimited {
            retry_after_secs: 7,
        };
        assert_eq!((d.status(), d.error_type()), (429, "rate_limit_error"));
        assert_eq!(d.headers(), vec![("retry-after", "7".to_string())]);
        let reset = crate::time::parse_rfc3339("2026-12-01T00:00:00Z").unwrap();
        let b = Denial::BudgetExceeded {
            reset_at: Some(reset),
        };
        assert!(
            b.message().contains("2026-12-01T00:00:00Z"),
            "{}",
            b.message()
        );
        assert_eq!(b.code(), "shield_budget_exceeded");
        assert_eq!(Denial::SourceIpDenied.status(), 403);
        assert_eq!(Denial::BodyTooLarge { limit: 1 }.status(), 413);
        assert_eq!(Denial::MaxTokensExceeded { limit: 1 }.status(), 400);
    }

    #[test]
    fn every_code_is_listed_for_stats() {
        for d in [
            Denial::TokenMissing,
            Denial::TokenMalformed,
            Denial::TokenUnknown,
            Denial::TokenInvalid,
            Denial::TokenRevoked,
            Denial::TokenExpired,
            Denial::TokenNotYetValid,
            Denial::KeyUnavailable,
            Denial::PolicyUnavailable,
            Denial::SourceIpDenied,
            Denial::CountryDenied,
            Denial::RequestRateLimited {
                retry_after_secs: 3,
            },
            Denial::TokenRateLimited {
                retry_after_secs: 3,
            },
            Denial::BudgetExceeded { reset_at: None },
            Denial::ModelDenied,
            Denial::ModelUnpriced,
            Denial::MaxTokensExceeded { limit: 10 },
            Denial::BodyTooLarge { limit: 10 },
            Denial::BodyUnreadable,
            Denial::LedgerBusy,
            Denial::RouteDenied,
            Denial::RouteUnmetered,
            Denial::PathNotCanonical,
            Denial::ModelNameInvalid,
            Denial::TeamUnavailable,
        ] {
            assert!(Denial::ALL_CODES.contains(&d.code()), "{}", d.code());
            let team = d.clone().by_team();
            assert!(Denial::ALL_CODES.contains(&team.code()), "{}", team.code());
            assert_eq!(team.status(), d.status());
            assert_eq!(team.is_rule(), d.is_rule());
            if d.is_rule() {
                assert!(Denial::RULE_CODES.contains(&d.code()), "{}", d.code());
                assert!(Denial::RULE_CODES.contains(&team.code()), "{}", team.code());
                assert_ne!(team.code(), d.code());
            }
        }
        assert!(
            !Denial::TokenRevoked.is_rule(),
            "authentication is never a dry-run rule"
        );
    }

    #[test]
    fn a_team_refusal_names_the_team_level() {
        let d = Denial::BudgetExceeded { reset_at: None }.by_team();
        assert_eq!(d.code(), "shield_team_budget_exceeded");
        assert_eq!(d.status(), 429);
        assert!(d.message().contains("team"), "{}", d.message());
        let v: serde_json::Value = serde_json::from_slice(&d.body()).unwrap();
        assert_eq!(v["code"], "shield_team_budget_exceeded");
        let rate = Denial::RequestRateLimited {
            retry_after_secs: 4,
        }
        .by_team();
        assert_eq!(rate.headers(), vec![("retry-after", "4".to_string())]);
        assert_eq!(rate.clone().by_team(), rate, "wrapping twice is one level");
    }
}
