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
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RawUpstreamKey {
    pub id: String,
    /// `skseal:v1:...`, see `seal.rs`.
    pub sealed: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
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
