//! Renders the policy into the Envoy resources that carry it.
//!
//! The recommended setup delivers the filter through Envoy's extension config discovery (ECDS)
//! from a watched file: the bootstrap names the filter `shieldkey` and points at that file, and
//! `shieldkey publish` rewrites it atomically. A change of only the `configuration` reuses the
//! running VMs, so shared data (records, counters) survives every policy change.

use serde_json::{json, Value};

pub const WASM_FILTER_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";
pub const TYPED_EXTENSION_CONFIG_TYPE: &str =
    "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig";

#[derive(Debug, Clone)]
pub struct FilterSettings {
    /// ECDS resource name; must equal the `config_discovery` name in the bootstrap.
    pub filter_name: String,
    /// Path of the compiled filter, as Envoy will open it.
    pub wasm_path: String,
    /// Shared data namespace; keep it stable so counters survive reloads.
    pub vm_id: String,
    /// `envoy.wasm.runtime.v8` (default) or `envoy.wasm.runtime.wasmtime`.
    pub runtime: String,
    /// Environment variable holding the master key, passed through `host_env_keys`.
    pub master_key_env: String,
}

impl Default for FilterSettings {
    fn default() -> Self {
        FilterSettings {
            filter_name: "shieldkey".into(),
            wasm_path: "shieldkey.wasm".into(),
            vm_id: "shieldkey".into(),
            runtime: "envoy.wasm.runtime.v8".into(),
            master_key_env: crate::master_key::DEFAULT_MASTER_KEY_ENV.into(),
        }
    }
}

/// The `envoy.extensions.filters.http.wasm.v3.Wasm` message carrying `policy_json`.
pub fn wasm_filter(settings: &FilterSettings, policy_json: &str) -> Value {
    json!({
        "@type": WASM_FILTER_TYPE,
        "config": {
            "name": settings.filter_name,
            "root_id": "shieldkey",
            "vm_config": {
                "vm_id": settings.vm_id,
                "runtime": settings.runtime,
                "code": {"local": {"filename": settings.wasm_path}},
                "environment_variables": {"host_env_keys": [settings.master_key_env]},
            },
            "configuration": {
                "@type": "type.googleapis.com/google.protobuf.StringValue",
                "value": policy_json,
            },
            // Fail closed: if the VM cannot run, requests get an error, never the upstream.
            "fail_open": false,
        }
    })
}

/// A `DiscoveryResponse` with the one `TypedExtensionConfig`, for `path_config_source`.
pub fn ecds_file(settings: &FilterSettings, policy_json: &str, revision: u64) -> Value {
    json!({
        "version_info": revision.to_string(),
        "resources": [{
            "@type": TYPED_EXTENSION_CONFIG_TYPE,
            "name": settings.filter_name,
            "typed_config": wasm_filter(settings, policy_json),
        }]
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ecds_file_carries_the_policy_verbatim() {
        let s = FilterSettings::default();
        let v = ecds_file(&s, r#"{"version":1}"#, 7);
        assert_eq!(v["version_info"], "7");
        let r = &v["resources"][0];
        assert_eq!(r["name"], "shieldkey");
        let cfg = &r["typed_config"]["config"];
        assert_eq!(cfg["configuration"]["value"], r#"{"version":1}"#);
        assert_eq!(
            cfg["vm_config"]["environment_variables"]["host_env_keys"][0],
            "SHIELDKEY_MASTER_KEY"
        );
        assert_eq!(cfg["fail_open"], false);
    }
}
