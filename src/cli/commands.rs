//! The commands. Each reads what it needs, validates with the filter's own code before writing,
//! and writes atomically.

use std::io::Read;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde_json::json;

use super::args::Args;
use super::duration::parse_ttl;
use super::error::{failed, usage, CliError};
use super::policy_file::{load, save, validate, write_atomic};
use super::random;
use super::rule_flags::RuleFlags;
use crate::config::raw::{RawPolicy, RawStatus, RawToken, RawUpstreamKey, POLICY_FORMAT_VERSION};
use crate::envoy_render::{ecds_file, wasm_filter, FilterSettings};
use crate::master_key::{MasterKey, DEFAULT_MASTER_KEY_ENV, MASTER_KEY_LEN};
use crate::seal::{self, NONCE_LEN};
use crate::secret::{wipe, SecretBytes};
use crate::time::{format_rfc3339, parse_rfc3339};
use crate::token::{self, SECRET_BYTES};
use crate::token_digest::TokenVerifier;

/// Where things are, from flags or their environment defaults.
pub struct Context {
    pub policy_path: PathBuf,
}

fn env_or(flag: Option<String>, var: &str) -> Option<String> {
    flag.or_else(|| std::env::var(var).ok().filter(|v| !v.is_empty()))
}

fn master_env_name(policy: Option<&RawPolicy>) -> String {
    policy
        .and_then(|p| p.master_key_env.clone())
        .unwrap_or_else(|| DEFAULT_MASTER_KEY_ENV.to_string())
}

/// The master key from the environment; `None` when the variable is unset.
fn master_key(policy: Option<&RawPolicy>) -> Result<Option<MasterKey>, CliError> {
    let name = master_env_name(policy);
    match std::env::var(&name) {
        Err(_) => Ok(None),
        Ok(text) => MasterKey::from_base64(text.trim())
            .map(Some)
            .map_err(|e| failed(format!("{name}: {e}"))),
    }
}

fn require_master_key(policy: Option<&RawPolicy>) -> Result<MasterKey, CliError> {
    master_key(policy)?.ok_or_else(|| {
        failed(format!(
            "{} is not set: export the base64 master key (create one with `shieldkey keygen`)",
            master_env_name(policy)
        ))
    })
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

pub fn keygen(args: Args) -> Result<(), CliError> {
    args.finish()?;
    let mut key = [0u8; MASTER_KEY_LEN];
    random::fill(&mut key)?;
    println!("{}", MasterKey::to_base64(&key));
    wipe(&mut key);
    Ok(())
}

pub fn init(ctx: &Context, mut args: Args) -> Result<(), CliError> {
    let force = args.flag("force");
    let master_key_env = args.option("master-key-env")?;
    args.finish()?;
    if ctx.policy_path.exists() && !force {
        return Err(failed(format!(
            "{} exists; use --force to replace it",
            ctx.policy_path.display()
        )));
    }
    let mut policy = RawPolicy {
        version: POLICY_FORMAT_VERSION,
        revision: 0,
        master_key_env,
        upstream_keys: Vec::new(),
        tokens: Vec::new(),
        pricing: None,
        requests: None,
        alerts: None,
    };
    save(&ctx.policy_path, &mut policy, None)?;
    eprintln!("created {}", ctx.policy_path.display());
    Ok(())
}

/// `--publish PATH [--wasm PATH]` of the changing commands.
struct Publish {
    to: Option<String>,
    wasm: Option<String>,
}

fn publish_options(args: &mut Args) -> Result<Publish, CliError> {
    Ok(Publish {
        to: env_or(args.option("publish")?, "SHIELDKEY_PUBLISH"),
        wasm: env_or(args.option("wasm")?, "SHIELDKEY_WASM"),
    })
}

/// Runs a change to the policy: load, change, validate, write, and publish if asked.
fn change(
    ctx: &Context,
    publish: Publish,
    needs_master_key: bool,
    edit: impl FnOnce(&mut RawPolicy, Option<&MasterKey>) -> Result<String, CliError>,
) -> Result<(), CliError> {
    let mut policy = load(&ctx.policy_path)?;
    let master = if needs_master_key {
        Some(require_master_key(Some(&policy))?)
    } else {
        master_key(Some(&policy))?
    };
    let done = edit(&mut policy, master.as_ref())?;
    save(&ctx.policy_path, &mut policy, master.as_ref())?;
    eprintln!("{done} (policy revision {})", policy.revision);
    if let Some(to) = publish.to {
        publish_policy(&policy, Path::new(&to), publish.wasm, master.as_ref()).map_err(|e| {
            failed(format!(
                "{e}; the policy file has the change (revision {}) but Envoy does not: \
                 fix the problem and run `shieldkey publish`",
                policy.revision
            ))
        })?;
    }
    Ok(())
}

pub fn seal_key(ctx: &Context, mut args: Args) -> Result<(), CliError> {
    let id = args.required("id")?;
    let from_env = args.option("from-env")?;
    token::validate_id(&id).map_err(|m| usage(format!("--id: {m}")))?;
    let publish = publish_options(&mut args)?;
    args.finish()?;
    let plaintext = read_upstream_key(from_env.as_deref())?;
    change(ctx, publish, true, |policy, master| {
        let master = master.ok_or_else(|| failed("the master key is required"))?;
        let mut nonce = [0u8; NONCE_LEN];
        random::fill(&mut nonce)?;
        let sealed = seal::seal(master.seal_key(), &id, plaintext.expose(), &nonce)
            .map_err(|e| failed(format!("cannot seal: {e}")))?;
        let entry = RawUpstreamKey {
            id: id.clone(),
            sealed,
        };
        Ok(match policy.upstream_keys.iter_mut().find(|k| k.id == id) {
            Some(existing) => {
                *existing = entry;
                format!("rotated upstream key '{id}'")
            }
            None => {
                policy.upstream_keys.push(entry);
                format!("sealed upstream key '{id}'")
            }
        })
    })
}

/// The real key comes from stdin or a named environment variable: never from argv, where it would
/// land in shell history and process listings.
fn read_upstream_key(from_env: Option<&str>) -> Result<SecretBytes, CliError> {
    let mut raw = match from_env {
        Some(var) => std::env::var(var)
            .map_err(|_| failed(format!("environment variable {var} is not set")))?
            .into_bytes(),
        None => {
            let mut buf = Vec::new();
            std::io::stdin()
                .read_to_end(&mut buf)
                .map_err(|e| failed(format!("cannot read the key from stdin: {e}")))?;
            buf
        }
    };
    while raw.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        raw.pop();
    }
    let key = SecretBytes::new(raw);
    if key.is_empty() {
        return Err(failed(
            "the upstream key is empty (pipe it on stdin or use --from-env VAR)",
        ));
    }
    if !seal::is_header_safe_key(key.expose()) {
        return Err(failed(
            "the upstream key contains characters that cannot go into an HTTP header",
        ));
    }
    Ok(key)
}

pub fn mint(ctx: &Context, mut args: Args) -> Result<(), CliError> {
    let id = args.required("id")?;
    let upstream_key = args.required("upstream-key")?;
    let owner = args.option("owner")?;
    let description = args.option("description")?;
    let not_before = args.option("not-before")?;
    let expires_at = args.option("expires-at")?;
    let ttl = args.option("ttl")?;
    let rules = RuleFlags::take(&mut args)?;
    let publish = publish_options(&mut args)?;
    args.finish()?;
    token::validate_id(&id).map_err(|m| usage(format!("--id: {m}")))?;
    for (flag, value) in [("--not-before", &not_before), ("--expires-at", &expires_at)] {
        if let Some(v) = value {
            parse_rfc3339(v).map_err(|m| usage(format!("{flag}: {m}")))?;
        }
    }
    let expires_at = match (expires_at, ttl) {
        (Some(_), Some(_)) => return Err(usage("use --expires-at or --ttl, not both")),
        (Some(at), None) => Some(at),
        (None, Some(ttl)) => {
            let secs = parse_ttl(&ttl).map_err(|m| usage(format!("--ttl: {m}")))?;
            Some(format_rfc3339(now().saturating_add(secs)))
        }
        (None, None) => None,
    };

    let mut secret = [0u8; SECRET_BYTES];
    random::fill(&mut secret)?;
    let (full, secret_text) = token::format_token(&id, &secret);
    wipe(&mut secret);
    change(ctx, publish, true, |policy, master| {
        let master = master.ok_or_else(|| failed("the master key is required"))?;
        if policy.tokens.iter().any(|t| t.id == id) {
            return Err(failed(format!(
                "a token with id '{id}' exists (revoke or remove it, or pick another id)"
            )));
        }
        if !policy.upstream_keys.iter().any(|k| k.id == upstream_key) {
            return Err(failed(format!(
                "no upstream key '{upstream_key}' (seal it first: shieldkey seal --id {upstream_key})"
            )));
        }
        let verifier = TokenVerifier::new(master.digest_key())
            .ok_or_else(|| failed("cannot derive the digest key"))?;
        let digest = verifier.digest(&id, secret_text.expose());
        let mut token = RawToken {
            id: id.clone(),
            digest: STANDARD.encode(digest),
            upstream_key: upstream_key.clone(),
            owner,
            description,
            not_before,
            expires_at,
            ..RawToken::default()
        };
        rules.apply(&mut token)?;
        policy.tokens.push(token);
        Ok(format!(
            "minted token '{id}'; it is shown once, store it now"
        ))
    })?;
    println!("{}", String::from_utf8_lossy(full.expose()));
    Ok(())
}

fn token_mut<'p>(policy: &'p mut RawPolicy, id: &str) -> Result<&'p mut RawToken, CliError> {
    policy
        .tokens
        .iter_mut()
        .find(|t| t.id == id)
        .ok_or_else(|| failed(format!("no token with id '{id}'")))
}

pub fn set_status(ctx: &Context, mut args: Args, status: RawStatus) -> Result<(), CliError> {
    let publish = publish_options(&mut args)?;
    let id = args.positional("token id")?;
    args.finish()?;
    change(ctx, publish, false, |policy, _| {
        let token = token_mut(policy, &id)?;
        token.status = status;
        Ok(match status {
            RawStatus::Revoked => format!("revoked token '{id}'"),
            RawStatus::Active => format!("re-enabled token '{id}'"),
        })
    })
}

/// `limit ID <rule flags>`: changes a token's rules (budget, rates, networks, countries, models).
pub fn limit(ctx: &Context, mut args: Args) -> Result<(), CliError> {
    let publish = publish_options(&mut args)?;
    let rules = RuleFlags::take(&mut args)?;
    let id = args.positional("token id")?;
    args.finish()?;
    if rules.is_empty() {
        return Err(usage(
            "nothing to change: give at least one rule flag (see --help)",
        ));
    }
    change(ctx, publish, false, |policy, _| {
        rules.apply(token_mut(policy, &id)?)?;
        Ok(format!("changed the rules of token '{id}'"))
    })
}

pub fn remove(ctx: &Context, mut args: Args) -> Result<(), CliError> {
    let publish = publish_options(&mut args)?;
    let id = args.positional("token id")?;
    args.finish()?;
    change(ctx, publish, false, |policy, _| {
        let before = policy.tokens.len();
        policy.tokens.retain(|t| t.id != id);
        if policy.tokens.len() == before {
            return Err(failed(format!("no token with id '{id}'")));
        }
        Ok(format!("removed token '{id}'"))
    })
}

pub fn list(ctx: &Context, mut args: Args) -> Result<(), CliError> {
    let as_json = args.flag("json");
    args.finish()?;
    let policy = load(&ctx.policy_path)?;
    let now = now();
    let state = |t: &RawToken| -> &'static str {
        let parsed = |v: &Option<String>| v.as_deref().and_then(|s| parse_rfc3339(s).ok());
        match t.status {
            RawStatus::Revoked => "revoked",
            _ if parsed(&t.expires_at).is_some_and(|e| now >= e) => "expired",
            _ if parsed(&t.not_before).is_some_and(|n| now < n) => "not-yet-valid",
            _ => "active",
        }
    };
    if as_json {
        // Digests and sealed keys stay out: the listing is for people and dashboards.
        let tokens: Vec<_> = policy
            .tokens
            .iter()
            .map(|t| {
                json!({
                    "id": t.id, "owner": t.owner, "description": t.description,
                    "state": state(t), "upstream_key": t.upstream_key,
                    "not_before": t.not_before, "expires_at": t.expires_at,
                    "budget": t.budget, "rate_limit": t.rate_limit,
                    "source_cidrs": t.source_cidrs, "countries": t.countries, "models": t.models,
                })
            })
            .collect();
        let keys: Vec<_> = policy.upstream_keys.iter().map(|k| k.id.as_str()).collect();
        let doc = json!({"revision": policy.revision, "upstream_keys": keys, "tokens": tokens});
        println!("{doc:#}");
        return Ok(());
    }
    println!(
        "{:<32} {:<14} {:<12} {:<24} {:<24} OWNER",
        "ID", "STATE", "UPSTREAM", "NOT BEFORE", "EXPIRES"
    );
    for t in &policy.tokens {
        println!(
            "{:<32} {:<14} {:<12} {:<24} {:<24} {}",
            t.id,
            state(t),
            t.upstream_key,
            t.not_before.as_deref().unwrap_or("-"),
            t.expires_at.as_deref().unwrap_or("-"),
            t.owner.as_deref().unwrap_or("-")
        );
    }
    eprintln!(
        "revision {}, {} tokens, upstream keys: {}",
        policy.revision,
        policy.tokens.len(),
        policy
            .upstream_keys
            .iter()
            .map(|k| k.id.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

pub fn check(ctx: &Context, args: Args) -> Result<(), CliError> {
    args.finish()?;
    let bytes = std::fs::read(&ctx.policy_path)
        .map_err(|e| failed(format!("cannot read {}: {e}", ctx.policy_path.display())))?;
    let raw =
        crate::config::raw::parse(&bytes).map_err(|e| failed(format!("policy rejected: {e}")))?;
    let master = master_key(Some(&raw))?;
    let policy = validate(&bytes, master.as_ref())?;
    println!(
        "ok: revision {}, {} tokens ({} revoked), {} upstream keys{}",
        policy.revision,
        policy.tokens.len(),
        policy.revoked_count(),
        policy.upstream_keys.len(),
        if master.is_some() {
            ", all sealed keys open"
        } else {
            " (master key not set: sealed keys checked for form only)"
        }
    );
    Ok(())
}

fn settings(policy: &RawPolicy, wasm: Option<String>) -> FilterSettings {
    let mut s = FilterSettings {
        master_key_env: master_env_name(Some(policy)),
        ..FilterSettings::default()
    };
    if let Some(path) = wasm {
        s.wasm_path = path;
    }
    s
}

fn compact(policy: &RawPolicy) -> Result<String, CliError> {
    serde_json::to_string(policy).map_err(|e| failed(format!("cannot encode the policy: {e}")))
}

pub fn render(ctx: &Context, mut args: Args) -> Result<(), CliError> {
    let what = args.positional("what to render (plugin-config or ecds)")?;
    let wasm = env_or(args.option("wasm")?, "SHIELDKEY_WASM");
    args.finish()?;
    let policy = load(&ctx.policy_path)?;
    let json = compact(&policy)?;
    validate(json.as_bytes(), master_key(Some(&policy))?.as_ref())?;
    let out = match what.as_str() {
        "plugin-config" => json,
        "wasm-filter" => format!("{:#}", wasm_filter(&settings(&policy, wasm), &json)),
        "ecds" => format!(
            "{:#}",
            ecds_file(&settings(&policy, wasm), &json, policy.revision)
        ),
        other => {
            return Err(usage(format!(
                "cannot render '{other}': choose plugin-config, wasm-filter or ecds"
            )))
        }
    };
    println!("{out}");
    Ok(())
}

pub fn publish(ctx: &Context, mut args: Args) -> Result<(), CliError> {
    let to = env_or(args.option("to")?, "SHIELDKEY_PUBLISH")
        .ok_or_else(|| usage("--to PATH is required (or set SHIELDKEY_PUBLISH)"))?;
    let wasm = env_or(args.option("wasm")?, "SHIELDKEY_WASM");
    args.finish()?;
    let policy = load(&ctx.policy_path)?;
    let master = master_key(Some(&policy))?;
    publish_policy(&policy, Path::new(&to), wasm, master.as_ref())
}

/// Writes the ECDS file Envoy watches, atomically, after the same validation the filter runs.
fn publish_policy(
    policy: &RawPolicy,
    to: &Path,
    wasm: Option<String>,
    master: Option<&MasterKey>,
) -> Result<(), CliError> {
    let json = compact(policy)?;
    validate(json.as_bytes(), master)?;
    let doc = ecds_file(&settings(policy, wasm), &json, policy.revision);
    let mut bytes = format!("{doc:#}").into_bytes();
    bytes.push(b'\n');
    // The file carries sealed keys and digests, not secrets, but no one else needs to read it.
    write_atomic(to, &bytes, 0o640)?;
    eprintln!(
        "published policy revision {} to {}",
        policy.revision,
        to.display()
    );
    Ok(())
}
