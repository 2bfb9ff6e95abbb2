//! The master key a filter opens the policy's sealed keys with: read from the environment
//! variable the policy names (`master_key_env`, `SHIELDKEY_MASTER_KEY` by default) when a
//! configuration loads. Shared by the proxy-wasm glue and the benchmark's native module.

use super::raw::RawPolicy;
use super::ConfigError;
use crate::master_key::{MasterKey, DEFAULT_MASTER_KEY_ENV};

/// The master key for `raw`. `not_visible` ends the error of an unset variable: how this host
/// passes variables to the filter (the key itself never appears in an error).
pub fn master_key(raw: &RawPolicy, not_visible: &str) -> Result<MasterKey, ConfigError> {
    let env_name = raw
        .master_key_env
        .as_deref()
        .unwrap_or(DEFAULT_MASTER_KEY_ENV);
    let master_text = std::env::var(env_name).map_err(|_| {
        ConfigError::at(
            "master_key_env",
            format!("environment variable {env_name} is {not_visible}"),
        )
    })?;
    MasterKey::from_base64(&master_text)
        .map_err(|e| ConfigError::at("master_key_env", format!("{env_name}: {e}")))
}
