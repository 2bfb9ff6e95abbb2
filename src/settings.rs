//! Policy-wide settings, compiled once per configuration: prices, request inspection limits,
//! the country header and budget alerts.

use crate::pricing::PriceTable;
use crate::spend::{Prices, UnknownModel};

pub const DEFAULT_MAX_BODY_BYTES: u64 = 1024 * 1024;
pub const MAX_MAX_BODY_BYTES: u64 = 16 * 1024 * 1024;
pub const DEFAULT_MAX_TOKENS: u64 = 4096;
/// The largest context of Mistral's models: what a prompt read from stored state can reach.
pub const DEFAULT_MAX_CONTEXT_TOKENS: u64 = 262_144;
pub const DEFAULT_COUNTRY_HEADER: &str = "x-shieldkey-country";
pub const DEFAULT_ALERT_THRESHOLDS: [u8; 3] = [50, 80, 100];
pub const DEFAULT_WEBHOOK_TIMEOUT_MS: u64 = 5_000;

#[derive(Debug, Clone)]
pub struct Settings {
    pub prices: Prices,
    /// Largest request body read when a rule needs it; larger requests are refused (413).
    pub max_body_bytes: u64,
    /// Completion tokens reserved for a request that does not set `max_tokens`.
    pub default_max_tokens: u64,
    /// Prompt tokens reserved for state stored upstream (conversation history, agents).
    pub max_context_tokens: u64,
    /// Lower-case request header set by Envoy's geoip filter.
    pub country_header: String,
    /// Ascending percentages of a budget window, at most 8.
    pub alert_thresholds: Vec<u8>,
    pub webhook: Option<Webhook>,
    /// `enforce: false` at the top of the policy: every rule of every token and team in dry run.
    pub dry_run: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Webhook {
    pub cluster: String,
    pub path: String,
    pub authority: String,
    pub timeout_ms: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            prices: Prices::new(PriceTable::builtin(), UnknownModel::MaxPrice),
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            default_max_tokens: DEFAULT_MAX_TOKENS,
            max_context_tokens: DEFAULT_MAX_CONTEXT_TOKENS,
            country_header: DEFAULT_COUNTRY_HEADER.to_string(),
            alert_thresholds: DEFAULT_ALERT_THRESHOLDS.to_vec(),
            webhook: None,
            dry_run: false,
        }
    }
}
