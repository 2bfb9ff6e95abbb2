//! Configuration compilation: a valid policy compiles, and each invalid field is rejected with
//! its JSON path. Cases mutate one field of a known-good document so that a failure can only
//! come from that field.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde_json::{json, Value};

use super::compile::{compile_bytes, CompileOptions};
use super::ConfigError;
use crate::master_key::MasterKey;
use crate::seal;

const REAL_KEY: &[u8] = b"real-mistral-key-0123456789abcdef";

fn master() -> MasterKey {
    MasterKey::from_bytes(&[7u8; 32]).unwrap()
}

fn sealed(key_id: &str) -> String {
    seal::seal(
        master().seal_key(),
        key_id,
        REAL_KEY,
        &[3u8; seal::NONCE_LEN],
    )
    .unwrap()
}

fn digest() -> String {
    STANDARD.encode([9u8; 32])
}

/// Every optional section present and valid.
fn valid() -> Value {
    json!({
        "version": 1,
        "revision": 4,
        "master_key_env": "SHIELDKEY_MASTER_KEY",
        "upstream_keys": [
            {"id": "prod", "sealed": sealed("prod")},
            {"id": "dev", "sealed": sealed("dev")}
        ],
        "tokens": [
            {"id": "alice", "digest": digest(), "upstream_key": "prod", "owner": "alice@example.com",
             "description": "laptop", "status": "active",
             "not_before": "2026-01-01T00:00:00Z", "expires_at": "2027-01-01T00:00:00Z",
             "budget": {"limit_usd": "25.00", "window": "monthly"},
             "rate_limit": {"requests_per_minute": 60, "tokens_per_minute": 100000},
             "source_cidrs": ["10.0.0.0/8", "2001:db8::/32"],
             "countries": {"allow": ["FR", "DE"], "unknown": "deny"},
             "models": {"allow": ["mistral-small-*"], "max_tokens": 2048}, "team": "eng"},
            {"id": "ci-bot", "digest": digest(), "upstream_key": "dev", "status": "revoked",
             "enforce": false}
        ],
        "teams": [
            {"id": "eng", "description": "Engineering", "enforce": true,
             "budget": {"limit_usd": "100", "window": "monthly"},
             "rate_limit": {"requests_per_minute": 600}, "models": {"allow": ["mistral-*"]}}
        ],
        "pricing": {
            "unknown_model": "default_price",
            "default_price": {"input_usd_per_mtok": "1", "output_usd_per_mtok": "3"},
            "models": [{"model": "my-finetune", "input_usd_per_mtok": "0.2", "output_usd_per_mtok": "0.6"}]
        },
        "requests": {"max_body_bytes": 65536, "default_max_tokens": 1024, "country_header": "x-country"},
        "alerts": {"thresholds_percent": [50, 90],
                   "webhook": {"cluster": "alerts", "path": "/hook", "timeout_ms": 500}}
    })
}

fn compile_value(doc: &Value, with_master: bool) -> Result<crate::policy::Policy, ConfigError> {
    let key = master();
    let opts = CompileOptions {
        master_key: with_master.then_some(&key),
    };
    compile_bytes(doc.to_string().as_bytes(), &opts)
}

/// Sets (or with `None` removes) the value at a JSON pointer of the valid document.
fn with(pointer: &str, value: Option<Value>) -> Value {
    let mut doc = valid();
    let (parent, last) = pointer.rsplit_once('/').unwrap();
    let target = doc.pointer_mut(parent).unwrap();
    match (target, value) {
        (Value::Object(map), Some(v)) => {
            map.insert(last.to_string(), v);
        }
        (Value::Object(map), None) => {
            map.remove(last);
        }
        (Value::Array(list), Some(v)) => list[last.parse::<usize>().unwrap()] = v,
        _ => unreachable!("{pointer}"),
    }
    doc
}

fn rejected(doc: &Value) -> ConfigError {
    match compile_value(doc, true) {
        Ok(_) => panic!("accepted: {doc}"),
        Err(e) => e,
    }
}

#[test]
fn the_valid_document_compiles_with_and_without_the_master_key() {
    for with_master in [true, false] {
        let policy = compile_value(&valid(), with_master).unwrap();
        assert_eq!(policy.revision, 4);
        assert_eq!(policy.tokens.len(), 2);
        assert_eq!(policy.upstream_keys.len(), 2);
        assert_eq!(policy.revoked_count(), 1);
        assert_eq!(policy.tokens[1].upstream_key, 1);
        assert!(policy.tokens[0].rules.needs_body());
        assert_eq!(policy.tokens[0].team.as_deref(), Some("team.eng"));
        assert_eq!(policy.teams[0].id, "team.eng");
        assert!(policy.tokens[1].rules.dry_run && !policy.tokens[0].rules.dry_run);
        assert_eq!(
            policy.upstream_keys[0].authorization.is_some(),
            with_master,
            "keys are opened only when the master key is given"
        );
    }
    let policy = compile_value(&valid(), true).unwrap();
    let auth = policy.authorization_for(0).unwrap();
    assert_eq!(&auth.expose()[..7], b"Bearer ");
    assert_eq!(&auth.expose()[7..], REAL_KEY);
}

#[test]
fn a_minimal_document_compiles_with_safe_defaults() {
    let policy = compile_value(&json!({"version": 1}), true).unwrap();
    assert!(policy.tokens.is_empty());
    assert_eq!(policy.master_key_env, "SHIELDKEY_MASTER_KEY");
}

#[test]
fn every_invalid_field_is_rejected_with_its_path() {
    let cases: Vec<(&str, Option<Value>, &str)> = vec![
        ("/version", Some(json!(2)), "version"),
        ("/tokens/0/team", Some(json!("sales")), "tokens[0].team"),
        ("/tokens/0/team", Some(json!("Eng")), "tokens[0].team"),
        ("/teams/0/id", Some(json!("eng.x")), "teams[0].id"),
        (
            "/teams/0/budget/window",
            Some(json!("weekly")),
            "teams[0].budget.window",
        ),
        ("/teams/0/owner", Some(json!("x")), "teams[0].owner"),
        ("/enforce", Some(json!("no")), "enforce"),
        ("/version", Some(json!("1")), "version"),
        ("/version", None, "."),
        ("/revision", Some(json!(-1)), "revision"),
        ("/master_key_env", Some(json!("BAD NAME")), "master_key_env"),
        ("/master_key_env", Some(json!("")), "master_key_env"),
        (
            "/upstream_keys/0/id",
            Some(json!("Prod!")),
            "upstream_keys[0].id",
        ),
        (
            "/upstream_keys/1/id",
            Some(json!("prod")),
            "upstream_keys[1].id",
        ),
        (
            "/upstream_keys/0/sealed",
            Some(json!("plaintext-key")),
            "upstream_keys[0].sealed",
        ),
        // A ciphertext moved between entries does not open: the key id is bound as AAD.
        (
            "/upstream_keys/0/sealed",
            Some(json!(sealed("dev"))),
            "upstream_keys[0].sealed",
        ),
        (
            "/upstream_keys/0/extra",
            Some(json!(1)),
            "upstream_keys[0].extra",
        ),
        ("/tokens/0/id", Some(json!("")), "tokens[0].id"),
        ("/tokens/0/id", Some(json!("a".repeat(33))), "tokens[0].id"),
        ("/tokens/1/id", Some(json!("alice")), "tokens[1].id"),
        (
            "/tokens/0/digest",
            Some(json!("not base64!")),
            "tokens[0].digest",
        ),
        (
            "/tokens/0/digest",
            Some(json!(STANDARD.encode([1u8; 16]))),
            "tokens[0].digest",
        ),
        (
            "/tokens/0/upstream_key",
            Some(json!("staging")),
            "tokens[0].upstream_key",
        ),
        ("/tokens/0/upstream_key", None, "tokens[0]"),
        (
            "/tokens/0/status",
            Some(json!("paused")),
            "tokens[0].status",
        ),
        (
            "/tokens/0/not_before",
            Some(json!("yesterday")),
            "tokens[0].not_before",
        ),
        (
            "/tokens/0/expires_at",
            Some(json!("2027-13-01T00:00:00Z")),
            "tokens[0].expires_at",
        ),
        (
            "/tokens/0/expires_at",
            Some(json!("2025-12-31T23:59:59Z")),
            "tokens[0].expires_at",
        ),
        (
            "/tokens/0/expires_at",
            Some(json!("2026-01-01T00:00:00Z")),
            "tokens[0].expires_at",
        ),
        (
            "/tokens/0/owner",
            Some(json!("o".repeat(257))),
            "tokens[0].owner",
        ),
        ("/tokens/0/secret", Some(json!("x")), "tokens[0].secret"),
        (
            "/tokens/0/budget",
            Some(json!({"limit_usd": "ten", "window": "daily"})),
            "tokens[0].budget.limit_usd",
        ),
        (
            "/tokens/0/budget",
            Some(json!({"limit_usd": "-1", "window": "daily"})),
            "tokens[0].budget.limit_usd",
        ),
        (
            "/tokens/0/budget",
            Some(json!({"limit_usd": "1", "window": "weekly"})),
            "tokens[0].budget.window",
        ),
        (
            "/tokens/0/budget",
            Some(json!({"limit_usd": "1"})),
            "tokens[0].budget",
        ),
        (
            "/tokens/0/rate_limit",
            Some(json!({"requests_per_minute": 0})),
            "tokens[0].rate_limit.requests_per_minute",
        ),
        (
            "/tokens/0/rate_limit",
            Some(json!({"tokens_per_minute": 0})),
            "tokens[0].rate_limit.tokens_per_minute",
        ),
        (
            "/tokens/0/rate_limit",
            Some(json!({})),
            "tokens[0].rate_limit",
        ),
        (
            "/tokens/0/rate_limit",
            Some(json!({"requests_per_second": 5})),
            "tokens[0].rate_limit.requests_per_second",
        ),
        (
            "/tokens/0/source_cidrs",
            Some(json!([])),
            "tokens[0].source_cidrs",
        ),
        (
            "/tokens/0/source_cidrs",
            Some(json!(["10.0.0.0/33"])),
            "tokens[0].source_cidrs",
        ),
        (
            "/tokens/0/source_cidrs",
            Some(json!(["example.com"])),
            "tokens[0].source_cidrs",
        ),
        (
            "/tokens/0/countries",
            Some(json!({})),
            "tokens[0].countries",
        ),
        (
            "/tokens/0/countries",
            Some(json!({"allow": ["France"]})),
            "tokens[0].countries",
        ),
        (
            "/tokens/0/countries",
            Some(json!({"allow": []})),
            "tokens[0].countries",
        ),
        (
            "/tokens/0/countries",
            Some(json!({"deny": ["RU"], "unknown": "maybe"})),
            "tokens[0].countries",
        ),
        ("/tokens/0/models", Some(json!({})), "tokens[0].models"),
        (
            "/tokens/0/models",
            Some(json!({"allow": []})),
            "tokens[0].models.allow",
        ),
        (
            "/tokens/0/models",
            Some(json!({"allow": ["bad model"]})),
            "tokens[0].models.allow",
        ),
        (
            "/tokens/0/models",
            Some(json!({"max_tokens": 0})),
            "tokens[0].models.max_tokens",
        ),
        (
            "/pricing/unknown_model",
            Some(json!("free")),
            "pricing.unknown_model",
        ),
        ("/pricing/default_price", None, "pricing.default_price"),
        (
            "/pricing/default_price",
            Some(json!({"input_usd_per_mtok": "x", "output_usd_per_mtok": "1"})),
            "pricing.default_price",
        ),
        (
            "/pricing/models/0/model",
            Some(json!("")),
            "pricing.models[0].model",
        ),
        (
            "/pricing/models/0/output_usd_per_mtok",
            Some(json!("-2")),
            "pricing.models[0]",
        ),
        (
            "/requests/max_body_bytes",
            Some(json!(0)),
            "requests.max_body_bytes",
        ),
        (
            "/requests/max_body_bytes",
            Some(json!(1u64 << 40)),
            "requests.max_body_bytes",
        ),
        (
            "/requests/default_max_tokens",
            Some(json!(0)),
            "requests.default_max_tokens",
        ),
        (
            "/requests/country_header",
            Some(json!("X-Country")),
            "requests.country_header",
        ),
        (
            "/requests/country_header",
            Some(json!(":authority")),
            "requests.country_header",
        ),
        (
            "/alerts/thresholds_percent",
            Some(json!([80, 50])),
            "alerts.thresholds_percent",
        ),
        (
            "/alerts/thresholds_percent",
            Some(json!([0])),
            "alerts.thresholds_percent",
        ),
        (
            "/alerts/thresholds_percent",
            Some(json!([50, 101])),
            "alerts.thresholds_percent",
        ),
        (
            "/alerts/webhook/cluster",
            Some(json!("")),
            "alerts.webhook.cluster",
        ),
        (
            "/alerts/webhook/path",
            Some(json!("hook")),
            "alerts.webhook.path",
        ),
        (
            "/alerts/webhook/timeout_ms",
            Some(json!(0)),
            "alerts.webhook.timeout_ms",
        ),
        (
            "/alerts/webhook/timeout_ms",
            Some(json!(60_001)),
            "alerts.webhook.timeout_ms",
        ),
        ("/unknown_section", Some(json!({})), "unknown_section"),
    ];
    let mismatches: Vec<String> = cases
        .into_iter()
        .filter_map(|(pointer, value, path)| {
            let err = rejected(&with(pointer, value.clone()));
            (err.path != path || err.message.is_empty())
                .then(|| format!("{pointer} = {value:?}: expected {path}, got {err}"))
        })
        .collect();
    assert!(mismatches.is_empty(), "{mismatches:#?}");
}

#[test]
fn malformed_json_is_rejected_not_panicked_on() {
    let key = master();
    let opts = CompileOptions {
        master_key: Some(&key),
    };
    for bad in [
        &b""[..],
        b"{",
        b"[]",
        b"null",
        b"{\"version\":1} trailing",
        b"\xff\xfe",
    ] {
        assert!(compile_bytes(bad, &opts).is_err(), "{bad:?}");
    }
}

#[test]
fn a_wrong_master_key_cannot_open_the_sealed_keys() {
    let wrong = MasterKey::from_bytes(&[8u8; 32]).unwrap();
    let opts = CompileOptions {
        master_key: Some(&wrong),
    };
    let err = compile_bytes(valid().to_string().as_bytes(), &opts).unwrap_err();
    assert_eq!(err.path, "upstream_keys[0].sealed");
    // Without the master key only the format is checked (the CLI's offline `check`).
    assert!(compile_value(&valid(), false).is_ok());
}

#[test]
fn errors_never_carry_key_material() {
    let doc = with("/upstream_keys/0/sealed", Some(json!(sealed("dev"))));
    let err = rejected(&doc).to_string();
    assert!(!err.contains("real-mistral-key"));
    assert!(!err.contains("skseal:v1:"), "{err}");
}

#[test]
fn the_fingerprint_identifies_the_exact_bytes() {
    let a = compile_value(&valid(), true).unwrap();
    let b = compile_value(&with("/revision", Some(json!(5))), true).unwrap();
    assert_ne!(a.fingerprint, b.fingerprint);
    assert_eq!(
        a.fingerprint,
        compile_value(&valid(), true).unwrap().fingerprint
    );
}
