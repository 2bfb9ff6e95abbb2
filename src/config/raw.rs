//! The policy file, exactly as written: serde types that reject unknown fields.
//!
//! The same JSON document is the policy file the CLI edits and the plugin configuration Envoy
//! hands the filter. Everything here is unvalidated; `compile` turns it into a `Policy`.

use serde::{Deserialize, Serialize};

pub const POLICY_FORMAT_VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RawPolicy {
    /// Format version of this document; only 1 exists.
    pub version: u32,
    /// Increases on every change the CLI makes; shown in logs so operators can tell which
    /// policy an Envoy is running.
    #[serde(default)]
    pub revision: u64,
    /// Name of the environment variable (passed to the VM through Envoy's
    /// `vm_config.environment_variables.host_env_keys`) that holds the base64 master key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub master_key_env: Option<String>,
    #[serde(default)]
    pub upstream_keys: Vec<RawUpstreamKey>,
    #[serde(default)]
    pub tokens: Vec<RawToken>,
    /// Teams: rules and limits shared by every token that names the team (`RawToken::team`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub teams: Vec<RawTeam>,
    /// `false` puts every rule of every token and team in dry run (see `RawToken::enforce`);
    /// authentication is always enforced. Default true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enforce: Option<bool>,
    /// Price overrides and the rule for models the price table does not know.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pricing: Option<RawPricing>,
    /// How requests are inspected and how much is reserved before forwarding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests: Option<RawRequests>,
    /// Budget alert thresholds and the optional webhook.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alerts: Option<RawAlerts>,
    /// Fleet mode: the policy lives in etcd, not in this document (see `RawFleet`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet: Option<RawFleet>,
}

/// Fleet mode: every Envoy follows one policy kept in etcd. The plugin configuration then holds
/// only `version`, `master_key_env` and this section; tokens, upstream keys and the policy-wide
/// sections are read from etcd (`<prefix>policy/...`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RawFleet {
    /// The Envoy cluster of the etcd members (their HTTP/1.1 JSON gateway).
    pub cluster: String,
    /// Key prefix of this policy in etcd (default `shieldkey/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// `:authority` of the calls to etcd (default: the cluster name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority: Option<String>,
    /// How often the syncer asks etcd for changes (default 200 ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync_interval_ms: Option<u64>,
    /// Timeout of one call to etcd (default 1000 ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// How often the syncer lists every token key to notice removed tokens (default 10000 ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reconcile_interval_ms: Option<u64>,
    /// A budget lease this Envoy has not used for this long goes back to the fleet's pool
    /// (default 30000 ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_idle_ms: Option<u64>,
    /// True in the one `WasmService` per Envoy that syncs from etcd into shared data; false (the
    /// default) in the HTTP filter, which reads what the syncer wrote.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync: Option<bool>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RawPricing {
    /// `max_price` (default: charge the most expensive known price, never under-bill),
    /// `default_price` (charge `default_price`) or `deny` (refuse budgeted requests for it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unknown_model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_price: Option<RawPrice>,
    /// Additions and overrides of the built-in table.
    #[serde(default)]
    pub models: Vec<RawModelPrice>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RawPrice {
    /// Decimal USD per million input (prompt) tokens, e.g. "0.15".
    pub input_usd_per_mtok: String,
    /// Decimal USD per million output (completion) tokens.
    pub output_usd_per_mtok: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RawModelPrice {
    pub model: String,
    pub input_usd_per_mtok: String,
    pub output_usd_per_mtok: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RawRequests {
    /// Largest request body the filter reads when a rule needs it (default 1 MiB); larger: 413.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_body_bytes: Option<u64>,
    /// Completion tokens reserved when a request has no `max_tokens` (default 4096).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_max_tokens: Option<u64>,
    /// Request header carrying the ISO country code set by Envoy's geoip filter
    /// (default `x-shieldkey-country`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub country_header: Option<String>,
    /// Prompt tokens reserved on top of the body for routes whose prompt includes state stored
    /// upstream (conversations, agents, `previous_response_id`); default 262144, the largest
    /// context of Mistral's models.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_context_tokens: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RawAlerts {
    /// Percentages of a budget window; default [50, 80, 100]; at most 8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thresholds_percent: Option<Vec<u8>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<RawWebhook>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RawWebhook {
    /// An Envoy cluster name; alerts are POSTed through Envoy's HTTP callout.
    pub cluster: String,
    pub path: String,
    /// `:authority` of the callout (default: the cluster name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RawUpstreamKey {
    pub id: String,
    /// `skseal:v1:...`, see `seal.rs`.
    pub sealed: String,
}

/// Declares a struct with its own fields followed by the rule fields a token and a team share,
/// and `rules()`, its rule section: the rule fields are written once, so a token, a team and the
/// shared-data record's rule section (`RawTokenRules`) cannot drift apart.
macro_rules! with_rule_fields {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $($(#[$field_meta:meta])* pub $field:ident: $ty:ty,)*
        }
    ) => {
        $(#[$meta])*
        pub struct $name {
            $($(#[$field_meta])* pub $field: $ty,)*
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub budget: Option<RawBudget>,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub rate_limit: Option<RawRateLimit>,
            /// Allowed client networks (CIDR, IPv4 or IPv6), checked against Envoy's resolved
            /// client address.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub source_cidrs: Option<Vec<String>>,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub countries: Option<RawCountries>,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub models: Option<RawModels>,
            /// Which routes of the Mistral API are reached: `inference` (default), `read`,
            /// `manage`, or `all` (every route, including ones ShieldKey does not know).
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub scopes: Option<Vec<String>>,
            /// Lets a budget, a tokens-per-minute limit or a `max_tokens` ceiling coexist with
            /// routes ShieldKey cannot cap or meter (management, batch jobs, audio). Default
            /// false: refused.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub allow_unmetered: Option<bool>,
            /// `false`: dry run of these rules: a request they would refuse is let through,
            /// logged and counted as `would_deny`. Authentication is always enforced. Default
            /// true.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub enforce: Option<bool>,
        }

        impl $name {
            /// The rule section alone.
            pub fn rules(&self) -> super::token_rules::RawTokenRules {
                super::token_rules::RawTokenRules {
                    budget: self.budget.clone(),
                    rate_limit: self.rate_limit.clone(),
                    source_cidrs: self.source_cidrs.clone(),
                    countries: self.countries.clone(),
                    models: self.models.clone(),
                    scopes: self.scopes.clone(),
                    allow_unmetered: self.allow_unmetered,
                    enforce: self.enforce,
                }
            }
        }
    };
}
pub(crate) use with_rule_fields;

with_rule_fields! {
    #[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
    #[serde(deny_unknown_fields)]
    pub struct RawToken {
        pub id: String,
        /// base64 of HMAC-SHA256 over the secret; see `token_digest.rs`.
        pub digest: String,
        pub upstream_key: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub owner: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub description: Option<String>,
        #[serde(default)]
        pub status: RawStatus,
        /// RFC 3339.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub not_before: Option<String>,
        /// RFC 3339.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub expires_at: Option<String>,
        /// The team (`RawTeam::id`) whose rules and limits apply on top of this token's own.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub team: Option<String>,
    }
}

with_rule_fields! {
    /// A team: the same rules a token can have, applied to the team's members together (one
    /// budget, one rate limit shared by all of them), on top of each member's own.
    #[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
    #[serde(deny_unknown_fields)]
    pub struct RawTeam {
        pub id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub description: Option<String>,
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RawBudget {
    /// Decimal USD, e.g. "25.00".
    pub limit_usd: String,
    /// `lifetime`, `daily`, `monthly` (UTC calendar), `hourly`, or `"<N>s"` (epoch-aligned).
    pub window: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_minute: Option<u64>,
    /// Mistral tokens (prompt + completion, from response usage) per minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_minute: Option<u64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RawCountries {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deny: Option<Vec<String>>,
    /// `deny` (default) or `allow`: what to do when the country is not known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unknown: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RawModels {
    /// Glob patterns (`*` matches any run of characters), e.g. `mistral-small-*`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow: Option<Vec<String>>,
    /// Largest `max_tokens` a request may ask for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u64>,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RawStatus {
    #[default]
    Active,
    Revoked,
}

/// Parses a policy document; errors carry the JSON path of the offending field.
pub fn parse(json: &[u8]) -> Result<RawPolicy, super::ConfigError> {
    let mut de = serde_json::Deserializer::from_slice(json);
    let policy: RawPolicy = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        super::ConfigError::at(path, e.into_inner().to_string())
    })?;
    de.end()
        .map_err(|e| super::ConfigError::at(".", e.to_string()))?;
    Ok(policy)
}
