//! The compiled policy: validated, with references resolved and upstream keys opened.
//!
//! A `Policy` is built once per configuration (`config::compile`). Its per-token part is
//! published into Envoy shared data as compact records (`token_record`, `policy_store`), so the
//! request path reads only the record of the token presented.

use crate::ledger::Limits;
use crate::routes::{Scope, Scopes};
use crate::rules::country::CountryRule;
use crate::rules::model_pattern::ModelPatterns;
use crate::rules::source_ip::SourceNetworks;
use crate::secret::SecretBytes;
use crate::settings::Settings;
use crate::token_digest::DIGEST_LEN;

#[derive(Debug)]
pub struct Policy {
    pub revision: u64,
    /// Hex prefix of SHA-256 over the configuration bytes: which configuration a shared-data
    /// generation belongs to (`policy_store`), and what the load log line names.
    pub fingerprint: String,
    pub master_key_env: String,
    pub upstream_keys: Vec<UpstreamKey>,
    pub tokens: Vec<TokenPolicy>,
    /// Teams, compiled as records of the same shape as tokens (`team::team_record`), published
    /// and counted alongside them under their subject ids.
    pub teams: Vec<TokenPolicy>,
    pub settings: Settings,
}

#[derive(Debug)]
pub struct UpstreamKey {
    pub id: String,
    /// The full `Authorization` header value (`Bearer <key>`), prepared once per configuration so
    /// the request path neither decrypts nor formats. `None` when compiled without the master key
    /// (the CLI's offline `check`).
    pub authorization: Option<SecretBytes>,
}

/// Everything the request path needs to judge one token. This is what a shared-data record holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenPolicy {
    pub id: String,
    pub digest: [u8; DIGEST_LEN],
    /// Index into `Policy::upstream_keys` of the same configuration.
    pub upstream_key: u16,
    pub owner: String,
    pub revoked: bool,
    /// Unix seconds.
    pub not_before: Option<i64>,
    /// Unix seconds.
    pub expires_at: Option<i64>,
    /// The ledger subject of the token's team (`team::subject_id`), whose record holds the
    /// team's rules; `None` outside a team.
    pub team: Option<String>,
    pub rules: TokenRules,
}

/// A token's optional access rules and limits, compiled. Every field `None` means "no rule".
#[derive(Debug, Clone, Default)]
pub struct TokenRules {
    pub limits: Limits,
    pub source_networks: Option<SourceNetworks>,
    pub countries: Option<CountryRule>,
    pub models: Option<ModelPatterns>,
    pub max_tokens: Option<u64>,
    /// The routes of the Mistral API the token reaches (`routes`).
    pub scopes: Scopes,
    /// Routes that cannot be capped or metered are open to a token with metered limits.
    pub allow_unmetered: bool,
    /// `enforce: false`: a request these rules refuse is let through and counted as
    /// `would_deny` (never authentication: that is not a rule).
    pub dry_run: bool,
    /// The rule section exactly as configured, canonical JSON (empty when there are no rules):
    /// this is what the shared-data record carries, and what two rule sets compare by.
    pub spec: Vec<u8>,
}

impl PartialEq for TokenRules {
    fn eq(&self, other: &Self) -> bool {
        self.spec == other.spec
    }
}

impl Eq for TokenRules {}

impl TokenRules {
    /// Whether judging a request needs its JSON body: model rules read `model` and
    /// `max_tokens`, and a budget reserves the worst case, which depends on both.
    pub fn needs_body(&self) -> bool {
        self.models.is_some() || self.max_tokens.is_some() || self.limits.budget.is_some()
    }

    /// Whether a tool the upstream runs itself could be refused to this token (`access`): it
    /// lacks the `read` or `manage` scope, or has metered limits without `allow_unmetered`.
    pub fn judges_server_tools(&self) -> bool {
        !(self.scopes.allows(Scope::Read) && self.scopes.allows(Scope::Manage))
            || (self.has_metered_limits() && !self.allow_unmetered)
    }

    /// Whether a limit depends on knowing what a request can cost or generate: such a token
    /// must not reach a route the filter cannot cap or meter, unless `allow_unmetered`.
    pub fn has_metered_limits(&self) -> bool {
        self.limits.budget.is_some()
            || self.limits.tokens_per_minute.is_some()
            || self.max_tokens.is_some()
    }
}

impl Policy {
    pub fn revoked_count(&self) -> usize {
        self.tokens.iter().filter(|t| t.revoked).count()
    }

    pub fn authorization_for(&self, index: u16) -> Option<&SecretBytes> {
        self.upstream_keys
            .get(usize::from(index))
            .and_then(|k| k.authorization.as_ref())
    }
}
