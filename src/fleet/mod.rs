//! Fleet mode: many Envoys follow one policy kept in etcd.
//!
//! One syncer per Envoy (a bootstrap `WasmService` singleton sharing the filter's `vm_id`) follows
//! `<prefix>policy/` in etcd through Envoy's own HTTP callouts to etcd's JSON gateway, and writes
//! what it reads into shared data: each token's compiled record in place (`policy_store`), and the
//! policy-wide part (settings and sealed upstream keys) as one base document. Each team's compiled
//! record goes in place too, under its subject id `team.<id>` (`crate::team`), in the same key
//! space as the tokens' records. The HTTP filter's root contexts compile the base when it changes;
//! the request path reads a token's record (and its team's), as in single-Envoy mode, and never
//! calls etcd.
//!
//! etcd key layout (values are compact JSON of the `config::raw` types; the CLI writes them, and
//! rewrites the settings with every change):
//! - `<prefix>policy/settings`: a `RawPolicy` without tokens, teams and upstream keys;
//! - `<prefix>policy/keys/<id>`: one `RawUpstreamKey`;
//! - `<prefix>policy/teams/<id>`: one `RawTeam` (its `id` is the key's);
//! - `<prefix>policy/tokens/<id>`: one `RawToken` (its `id` is the key's).
//!
//! Budget leases, flushed spend and per-minute counts (`lease`) are keyed by subject id, a token's
//! or a team's alike.

pub mod alerts;
pub mod etcd;
pub mod flush_queue;
pub mod lease;
pub mod sweep;
pub mod sync;

use crate::config::raw::{RawFleet, RawPolicy};
use crate::config::ConfigError;

pub const DEFAULT_PREFIX: &str = "shieldkey/";
pub const DEFAULT_SYNC_INTERVAL_MS: u64 = 200;
pub const DEFAULT_TIMEOUT_MS: u64 = 1_000;
pub const DEFAULT_RECONCILE_INTERVAL_MS: u64 = 10_000;
pub const DEFAULT_LEASE_IDLE_MS: u64 = 30_000;

/// Shared-data key of the base document the syncer writes for the HTTP filter.
pub const BASE_KEY: &str = "shieldkey/fleet/base";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetSettings {
    pub cluster: String,
    pub prefix: String,
    pub authority: String,
    pub sync_interval_ms: u64,
    pub timeout_ms: u64,
    pub reconcile_interval_ms: u64,
    pub lease_idle_ms: u64,
    pub sync: bool,
}

impl FleetSettings {
    pub fn settings_key(&self) -> String {
        format!("{}policy/settings", self.prefix)
    }
    pub fn policy_prefix(&self) -> String {
        format!("{}policy/", self.prefix)
    }
    pub fn keys_prefix(&self) -> String {
        format!("{}policy/keys/", self.prefix)
    }
    pub fn tokens_prefix(&self) -> String {
        format!("{}policy/tokens/", self.prefix)
    }
    pub fn teams_prefix(&self) -> String {
        format!("{}policy/teams/", self.prefix)
    }
}

/// Validates a fleet-mode plugin configuration: the `fleet` section, and nothing that belongs in
/// etcd.
pub fn compile_fleet(raw: &RawPolicy, fleet: &RawFleet) -> Result<FleetSettings, ConfigError> {
    let misplaced = [
        ("tokens", !raw.tokens.is_empty()),
        ("teams", !raw.teams.is_empty()),
        ("upstream_keys", !raw.upstream_keys.is_empty()),
        ("pricing", raw.pricing.is_some()),
        ("requests", raw.requests.is_some()),
        ("alerts", raw.alerts.is_some()),
    ];
    if let Some((field, _)) = misplaced.iter().find(|(_, present)| *present) {
        return Err(ConfigError::at(
            *field,
            "in fleet mode this lives in etcd, not in the plugin configuration",
        ));
    }
    let name_ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 128
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
    };
    if !name_ok(&fleet.cluster) {
        return Err(ConfigError::at(
            "fleet.cluster",
            "must name an Envoy cluster",
        ));
    }
    let prefix = fleet
        .prefix
        .clone()
        .unwrap_or_else(|| DEFAULT_PREFIX.into());
    let prefix_ok = !prefix.is_empty()
        && prefix.len() <= 128
        && prefix.ends_with('/')
        && prefix.bytes().all(|b| b.is_ascii_graphic());
    if !prefix_ok {
        return Err(ConfigError::at(
            "fleet.prefix",
            "1-128 printable characters ending in '/'",
        ));
    }
    let authority = fleet
        .authority
        .clone()
        .unwrap_or_else(|| fleet.cluster.clone());
    if !name_ok(&authority) {
        return Err(ConfigError::at("fleet.authority", "must be a host name"));
    }
    let ms = |value: Option<u64>, default: u64, path: &str, range: (u64, u64)| {
        let v = value.unwrap_or(default);
        if v < range.0 || v > range.1 {
            return Err(ConfigError::at(
                path,
                format!("must be between {} and {} ms", range.0, range.1),
            ));
        }
        Ok(v)
    };
    Ok(FleetSettings {
        cluster: fleet.cluster.clone(),
        prefix,
        authority,
        sync_interval_ms: ms(
            fleet.sync_interval_ms,
            DEFAULT_SYNC_INTERVAL_MS,
            "fleet.sync_interval_ms",
            (10, 60_000),
        )?,
        timeout_ms: ms(
            fleet.timeout_ms,
            DEFAULT_TIMEOUT_MS,
            "fleet.timeout_ms",
            (10, 60_000),
        )?,
        reconcile_interval_ms: ms(
            fleet.reconcile_interval_ms,
            DEFAULT_RECONCILE_INTERVAL_MS,
            "fleet.reconcile_interval_ms",
            (100, 3_600_000),
        )?,
        lease_idle_ms: ms(
            fleet.lease_idle_ms,
            DEFAULT_LEASE_IDLE_MS,
            "fleet.lease_idle_ms",
            (100, 86_400_000),
        )?,
        sync: fleet.sync.unwrap_or(false),
    })
}
