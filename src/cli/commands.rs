//! The commands. Each reads what it needs, validates with the filter's own code before writing,
//! and writes atomically: the policy file, or etcd in fleet mode (`policy_store`).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde_json::json;

use super::admin::{wait_applied, Admin, EcdsStats, WaitError};
use super::args::Args;
use super::duration::parse_ttl;
use super::error::{failed, usage, CliError};
use super::policy_file::{validate, write_atomic};
use super::policy_store::{Loaded, PolicyStore, Saved, Scope};
use super::random;
use super::rule_flags::RuleFlags;
use crate::config::raw::{
    self, RawPolicy, RawStatus, RawTeam, RawToken, RawUpstreamKey, POLICY_FORMAT_VERSION,
};
use crate::envoy_render::{
    ecds_file, http_filters, http_filters_yaml, plain_configuration, read_published, wasm_filter,
    ChainOptions, FilterSettings, PublishedFilter,
};
use crate::master_key::{MasterKey, DEFAULT_MASTER_KEY_ENV, MASTER_KEY_LEN};
use crate::seal::{self, NONCE_LEN};
use crate::secret::{wipe, SecretBytes};
use crate::settings::DEFAULT_COUNTRY_HEADER;
use crate::time::{format_rfc3339, parse_rfc3339};
use crate::token::{self, SECRET_BYTES};
use crate::token_digest::TokenVerifier;

/// Where things are, from flags or their environment defaults.
pub struct Context {
    /// The policy file, or etcd in fleet mode.
    pub store: PolicyStore,
}

/// How many times a change is read and applied again after another writer changed the policy in
/// etcd between this command's read and its write.
const MAX_RETRIES: usize = 5;

/// Runs `attempt` (read, change, save) until its save is not beaten by another writer, at most
/// `MAX_RETRIES` more times. Returns its value, the number of transactions of the save that
/// went through, and the number of retries.
pub(super) fn retrying<T>(
    store: &mut PolicyStore,
    mut attempt: impl FnMut(&mut PolicyStore) -> Result<(Saved, T), CliError>,
) -> Result<(T, usize, usize), CliError> {
    let mut retries = 0;
    loop {
        let (saved, value) = attempt(store)?;
        match saved {
            Saved::Written { steps } => return Ok((value, steps, retries)),
            Saved::Conflict { steps_applied } => {
                if retries == MAX_RETRIES {
                    let partial = if steps_applied > 0 {
                        format!(
                            "; the first {steps_applied} step(s) of the last attempt were applied \
                             (each leaves a valid policy): run the command again to finish"
                        )
                    } else {
                        "; the last attempt wrote nothing".to_string()
                    };
                    return Err(failed(format!(
                        "gave up after {} attempts: each time another writer changed the policy \
                         in {} between this command's read and its write{partial}",
                        MAX_RETRIES + 1,
                        store.describe()
                    )));
                }
                retries += 1;
                eprintln!(
                    "note: the policy changed in etcd since it was read (another writer); \
                     reading it again and re-applying the change (retry {retries} of {MAX_RETRIES})"
                );
                let mut jitter = [0u8; 1];
                random::fill(&mut jitter)?;
                let ms = 10 * u64::try_from(retries).unwrap_or(1) + u64::from(jitter[0] % 40);
                std::thread::sleep(Duration::from_millis(ms));
            }
        }
    }
}

/// What a write says after "(policy revision N": where it went, in how many steps, after how
/// many retries.
pub(super) fn written_note(store: &PolicyStore, steps: usize, retries: usize) -> String {
    let mut note = String::new();
    if store.is_etcd() {
        note.push_str(&format!(", {}", store.describe()));
    }
    if steps > 1 {
        note.push_str(&format!(
            "; applied in {steps} steps (etcd transactions of at most {} operations)",
            super::etcd::MAX_OPS_PER_TXN
        ));
    }
    if retries > 0 {
        note.push_str(&format!(
            "; re-applied {retries} time(s) after concurrent changes"
        ));
    }
    note
}

/// In fleet mode every Envoy follows etcd: there is no file to publish.
fn refuse_publish(ctx: &Context, what: &str) -> Result<(), CliError> {
    if ctx.store.is_etcd() {
        return Err(usage(format!(
            "{what}: in fleet mode (--etcd or SHIELDKEY_ETCD) every Envoy follows the policy in \
             etcd, so there is nothing to publish; nothing was changed"
        )));
    }
    Ok(())
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

pub(super) fn require_master_key(policy: Option<&RawPolicy>) -> Result<MasterKey, CliError> {
    master_key(policy)?.ok_or_else(|| {
        failed(format!(
            "{} is not set: export the base64 master key (create one with `shieldkey keygen`)",
            master_env_name(policy)
        ))
    })
}

pub(super) fn now() -> i64 {
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

pub fn init(ctx: &mut Context, mut args: Args) -> Result<(), CliError> {
    let force = args.flag("force");
    let master_key_env = args.option("master-key-env")?;
    args.finish()?;
    let (revision, steps, retries) = retrying(&mut ctx.store, |store| {
        let existing = store.existing()?;
        if let Some(what) = &existing.found {
            if !force {
                return Err(failed(format!("{what}; use --force to replace it")));
            }
        }
        // An empty policy of the current format. Replacing a policy in etcd keeps its revision
        // increasing, as every other change does (operators tell policies apart by it).
        let mut policy = raw::parse(format!(r#"{{"version":{POLICY_FORMAT_VERSION}}}"#).as_bytes())
            .map_err(|e| failed(format!("cannot build an empty policy: {e}")))?;
        policy.master_key_env = master_key_env.clone();
        policy.revision = existing.revision;
        let saved = store.save(&existing.base, &mut policy, None)?;
        Ok((saved, policy.revision))
    })?;
    if ctx.store.is_etcd() {
        eprintln!(
            "created an empty policy (policy revision {revision}{})",
            written_note(&ctx.store, steps, retries)
        );
    } else {
        eprintln!("created {}", ctx.store.describe());
    }
    Ok(())
}

/// Filter settings given explicitly (flags or their environment defaults). `None` keeps what the
/// published file being replaced says, or the default when there is none.
#[derive(Debug, Clone)]
struct FilterFlags {
    wasm: Option<String>,
    vm_id: Option<String>,
    runtime: Option<String>,
    filter_name: Option<String>,
}

fn filter_flags(args: &mut Args) -> Result<FilterFlags, CliError> {
    let flags = FilterFlags {
        wasm: env_or(args.option("wasm")?, "SHIELDKEY_WASM"),
        vm_id: args.option("vm-id")?,
        runtime: args.option("runtime")?,
        filter_name: args.option("filter-name")?,
    };
    if let Some(r) = &flags.runtime {
        if !r.starts_with("envoy.wasm.runtime.") {
            return Err(usage(format!(
                "--runtime {r}: expected an Envoy Wasm runtime such as envoy.wasm.runtime.v8"
            )));
        }
    }
    for (flag, value) in [
        ("--wasm", &flags.wasm),
        ("--filter-name", &flags.filter_name),
    ] {
        if value.as_deref() == Some("") {
            return Err(usage(format!("{flag} must not be empty")));
        }
    }
    Ok(flags)
}

/// Where and how to publish: `--publish PATH` (or `publish --to PATH`), the filter settings,
/// and `--admin URL [--wait-secs N]` to wait for Envoy's verdict.
#[derive(Debug, Clone)]
pub(super) struct Publish {
    to: Option<String>,
    /// `to` came from `SHIELDKEY_PUBLISH`, not a flag.
    to_from_env: bool,
    flags: FilterFlags,
    admin: Option<String>,
    wait: Duration,
}

impl Publish {
    /// `--publish` (or `--to`) was given on the command line, not taken from SHIELDKEY_PUBLISH.
    pub(super) fn given(&self) -> bool {
        self.to.is_some() && !self.to_from_env
    }

    /// The ECDS filter name given (`--filter-name`), if any.
    pub(super) fn filter_name(&self) -> Option<&str> {
        self.flags.filter_name.as_deref()
    }

    /// Where changes are published, if anywhere.
    pub(super) fn to(&self) -> Option<&str> {
        self.to.as_deref()
    }

    /// Confirms every publish with the Envoy whose admin is at `admin` (nothing without a file to
    /// publish to).
    pub(super) fn confirm_with(&mut self, admin: Option<String>) {
        self.admin = if self.to.is_some() { admin } else { None };
    }

    /// Refuses a file to publish to in fleet mode, where every Envoy follows etcd.
    pub(super) fn check_store(&self, store: &PolicyStore) -> Result<(), CliError> {
        if self.to.is_some() && store.is_etcd() {
            return Err(usage(format!(
                "{}: in fleet mode (--etcd or SHIELDKEY_ETCD) every Envoy follows the policy in \
                 etcd, so there is nothing to publish; nothing was changed",
                if self.to_from_env {
                    "SHIELDKEY_PUBLISH is set (unset it)"
                } else {
                    "--publish"
                }
            )));
        }
        Ok(())
    }
}

const DEFAULT_WAIT_SECS: f64 = 10.0;

pub(super) fn publish_options(args: &mut Args, to_flag: &str) -> Result<Publish, CliError> {
    let to_flag_value = args.option(to_flag)?;
    let to_from_env = to_flag_value.is_none();
    let to = env_or(to_flag_value, "SHIELDKEY_PUBLISH");
    let flags = filter_flags(args)?;
    let admin_flag = args.option("admin")?;
    let wait_flag = args.option("wait-secs")?;
    if to.is_none() {
        for (flag, given) in [
            ("--admin", admin_flag.is_some()),
            ("--wait-secs", wait_flag.is_some()),
        ] {
            if given {
                return Err(usage(format!("{flag} needs --{to_flag} PATH")));
            }
        }
    }
    let wait = match wait_flag {
        None => Duration::from_secs_f64(DEFAULT_WAIT_SECS),
        Some(text) => text
            .parse::<f64>()
            .ok()
            .filter(|s| s.is_finite() && (0.0..=3600.0).contains(s))
            .map(Duration::from_secs_f64)
            .ok_or_else(|| usage(format!("--wait-secs {text}: seconds between 0 and 3600")))?,
    };
    Ok(Publish {
        to_from_env: to_from_env && to.is_some(),
        to,
        flags,
        admin: env_or(admin_flag, "SHIELDKEY_ADMIN"),
        wait,
    })
}

/// What a written change did.
pub(super) struct Changed<T> {
    /// What was done, in words ("revoked token 'alice'").
    pub done: String,
    /// The revision the policy was written at.
    pub revision: u64,
    /// Where it went, in how many steps, after how many retries (see `written_note`).
    pub note: String,
    /// What the edit returned in detail.
    pub value: T,
    /// `None`: nothing to publish to (no `--publish`, or fleet mode). `Some(Err)`: the policy
    /// was written but Envoy does not serve it (the publish failed, or Envoy refused it).
    pub published: Option<Result<Published, CliError>>,
}

impl<T> Changed<T> {
    /// The line the CLI prints once the change is written.
    pub(super) fn written_line(&self) -> String {
        format!(
            "{} (policy revision {}{})",
            self.done, self.revision, self.note
        )
    }
}

/// Says why a written policy is not served, and what to do.
pub(super) fn not_served(e: &CliError, revision: u64) -> CliError {
    failed(format!(
        "{e}\nthe policy file has revision {revision} but Envoy does not serve it: \
         fix the problem and run `shieldkey publish`"
    ))
}

/// The edit of a change: applied to the policy as read (with the master key when there is
/// one), it returns what it did in words and in detail.
pub(super) trait Edit<T>:
    FnMut(&mut RawPolicy, Option<&MasterKey>) -> Result<(String, T), CliError>
{
}
impl<T, F: FnMut(&mut RawPolicy, Option<&MasterKey>) -> Result<(String, T), CliError>> Edit<T>
    for F
{
}

/// Runs a change to the policy: load, change, validate, write, and publish if asked. Everything
/// publishing needs (the settings of the published file, Envoy's counters) is read first, so a
/// publish that cannot happen changes nothing.
///
/// In fleet mode `edit` may run more than once: when another writer changed the policy in etcd
/// between the read and the write, the change is applied again to a fresh read.
pub(super) fn change(
    ctx: &mut Context,
    publish: Publish,
    scope: Scope,
    needs_master_key: bool,
    mut edit: impl FnMut(&mut RawPolicy, Option<&MasterKey>) -> Result<String, CliError>,
) -> Result<(), CliError> {
    change_reporting(
        ctx,
        publish,
        scope,
        needs_master_key,
        false,
        |policy, master| Ok((edit(policy, master)?, ())),
        |_| {},
    )
}

/// `change`, for an edit that also returns what it did in detail: `report` gets the value of the
/// attempt that was written, once it is written and before the publish is reported (so a
/// publish that fails does not hide what changed). With `dry_run` the edit is applied to one
/// fresh read and validated like a save, the revision it would get is shown, `report` gets its
/// value, and nothing is written or published.
pub(super) fn change_reporting<T>(
    ctx: &mut Context,
    publish: Publish,
    scope: Scope,
    needs_master_key: bool,
    dry_run: bool,
    edit: impl Edit<T>,
    report: impl FnOnce(&T),
) -> Result<(), CliError> {
    if dry_run {
        publish.check_store(&ctx.store)?;
        let (done, from, to, value) = dry_run_change(ctx, scope, needs_master_key, edit)?;
        let publish_note = match &publish.to {
            Some(to) => format!(" or published to {to}"),
            None => String::new(),
        };
        eprintln!(
            "dry run: {done} (policy revision {from} -> {to}); nothing was written{publish_note}"
        );
        report(&value);
        return Ok(());
    }
    let changed = apply_change(ctx, &publish, scope, needs_master_key, edit)?;
    report_changed(changed, report)
}

/// Prints a written change as the CLI does: what was done, `report`'s detail, then the
/// publish; a failed publish is the command's error.
fn report_changed<T>(changed: Changed<T>, report: impl FnOnce(&T)) -> Result<(), CliError> {
    eprintln!("{}", changed.written_line());
    report(&changed.value);
    match changed.published {
        None => Ok(()),
        Some(Ok(published)) => {
            eprintln!("{}", published.line());
            Ok(())
        }
        Some(Err(e)) => Err(not_served(&e, changed.revision)),
    }
}

fn load_master(policy: &RawPolicy, needs_master_key: bool) -> Result<Option<MasterKey>, CliError> {
    if needs_master_key {
        require_master_key(Some(policy)).map(Some)
    } else {
        master_key(Some(policy))
    }
}

/// A change applied to one fresh read and validated like a save, writing nothing: what it would
/// do, the revision before and the one it would get, and the edit's value.
pub(super) fn dry_run_change<T>(
    ctx: &mut Context,
    scope: Scope,
    needs_master_key: bool,
    mut edit: impl Edit<T>,
) -> Result<(String, u64, u64, T), CliError> {
    let mut policy = ctx.store.load_scoped(&scope)?.policy;
    let master = load_master(&policy, needs_master_key)?;
    let from = policy.revision;
    let (done, value) = edit(&mut policy, master.as_ref())?;
    policy.revision = from.saturating_add(1);
    let json = compact(&policy)?;
    ctx.store
        .validate(&policy, json.as_bytes(), master.as_ref())?;
    Ok((done, from, policy.revision, value))
}

/// The core of every change, for the CLI and the console alike: load, change, validate, write
/// (retrying in fleet mode when another writer got there first), then publish as `publish`
/// says. An `Err` means nothing was written; a failed publish after the write is in
/// `Changed::published`.
pub(super) fn apply_change<T>(
    ctx: &mut Context,
    publish: &Publish,
    scope: Scope,
    needs_master_key: bool,
    mut edit: impl Edit<T>,
) -> Result<Changed<T>, CliError> {
    publish.check_store(&ctx.store)?;
    let target = match &publish.to {
        Some(to) => Some(PublishTarget::prepare(Path::new(to), publish)?),
        None => None,
    };
    let ((done, value, policy, master), steps, retries) = retrying(&mut ctx.store, |store| {
        let Loaded { mut policy, base } = store.load_scoped(&scope)?;
        let master = load_master(&policy, needs_master_key)?;
        let (done, value) = edit(&mut policy, master.as_ref())?;
        let saved = store.save(&base, &mut policy, master.as_ref())?;
        Ok((saved, (done, value, policy, master)))
    })?;
    let published = target.map(|target| target.publish(&policy, master.as_ref()));
    Ok(Changed {
        done,
        revision: policy.revision,
        note: written_note(&ctx.store, steps, retries),
        value,
        published,
    })
}

pub fn seal_key(ctx: &mut Context, mut args: Args) -> Result<(), CliError> {
    let id = args.required("id")?;
    let from_env = args.option("from-env")?;
    token::validate_id(&id).map_err(|m| usage(format!("--id: {m}")))?;
    let publish = publish_options(&mut args, "publish")?;
    args.finish()?;
    let plaintext = read_upstream_key(from_env.as_deref())?;
    change(ctx, publish, Scope::NoTokens, true, |policy, master| {
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

/// A token to mint, as `mint` takes it (from flags, or the console's form).
#[derive(Debug, Clone, Default)]
pub(super) struct MintSpec {
    pub id: String,
    pub upstream_key: String,
    pub owner: Option<String>,
    pub description: Option<String>,
    pub team: Option<String>,
    pub not_before: Option<String>,
    pub expires_at: Option<String>,
    /// A validity from now (`90d`); excludes `expires_at`.
    pub ttl: Option<String>,
    pub rules: RuleFlags,
}

impl MintSpec {
    /// Checks the shape of every field; turns a `ttl` into `expires_at`.
    fn checked(mut self) -> Result<MintSpec, CliError> {
        token::validate_id(&self.id).map_err(|m| usage(format!("--id: {m}")))?;
        if let Some(team) = &self.team {
            crate::team::validate_id(team).map_err(|m| usage(format!("--team: {m}")))?;
        }
        for (flag, value) in [
            ("--not-before", &self.not_before),
            ("--expires-at", &self.expires_at),
        ] {
            if let Some(v) = value {
                parse_rfc3339(v).map_err(|m| usage(format!("{flag}: {m}")))?;
            }
        }
        self.expires_at = match (self.expires_at.take(), self.ttl.take()) {
            (Some(_), Some(_)) => return Err(usage("use --expires-at or --ttl, not both")),
            (Some(at), None) => Some(at),
            (None, Some(ttl)) => {
                let secs = parse_ttl(&ttl).map_err(|m| usage(format!("--ttl: {m}")))?;
                Some(format_rfc3339(now().saturating_add(secs)))
            }
            (None, None) => None,
        };
        Ok(self)
    }
}

/// The core of `mint` (the CLI's and the console's): a new secret, its digest in the policy.
/// Returns the change and the token, which exists nowhere else: show it once.
pub(super) fn mint_token(
    ctx: &mut Context,
    publish: &Publish,
    spec: MintSpec,
) -> Result<(Changed<()>, SecretBytes), CliError> {
    let spec = spec.checked()?;
    let id = spec.id.clone();
    let mut secret = [0u8; SECRET_BYTES];
    random::fill(&mut secret)?;
    let (full, secret_text) = token::format_token(&id, &secret);
    wipe(&mut secret);
    let changed = apply_change(
        ctx,
        publish,
        Scope::Token(id.clone()),
        true,
        |policy: &mut RawPolicy, master: Option<&MasterKey>| {
            let master = master.ok_or_else(|| failed("the master key is required"))?;
            if policy.tokens.iter().any(|t| t.id == id) {
                return Err(failed(format!(
                    "a token with id '{id}' exists (revoke or remove it, or pick another id)"
                )));
            }
            let upstream_key = &spec.upstream_key;
            if !policy.upstream_keys.iter().any(|k| k.id == *upstream_key) {
                return Err(failed(format!(
                    "no upstream key '{upstream_key}' (seal it first: shieldkey seal --id {upstream_key})"
                )));
            }
            if let Some(team) = &spec.team {
                require_team(policy, team)?;
            }
            let verifier = TokenVerifier::new(master.digest_key())
                .ok_or_else(|| failed("cannot derive the digest key"))?;
            let digest = verifier.digest(&id, secret_text.expose());
            let mut token = RawToken {
                id: id.clone(),
                digest: STANDARD.encode(digest),
                upstream_key: upstream_key.clone(),
                owner: spec.owner.clone(),
                description: spec.description.clone(),
                not_before: spec.not_before.clone(),
                expires_at: spec.expires_at.clone(),
                team: spec.team.clone(),
                ..RawToken::default()
            };
            spec.rules.clone().apply(&mut token)?;
            policy.tokens.push(token);
            Ok((
                format!("minted token '{id}'; it is shown once, store it now"),
                (),
            ))
        },
    )?;
    Ok((changed, full))
}

pub fn mint(ctx: &mut Context, mut args: Args) -> Result<(), CliError> {
    let spec = MintSpec {
        id: args.required("id")?,
        upstream_key: args.required("upstream-key")?,
        owner: args.option("owner")?,
        description: args.option("description")?,
        not_before: args.option("not-before")?,
        expires_at: args.option("expires-at")?,
        ttl: args.option("ttl")?,
        team: args.option("team")?,
        rules: RuleFlags::take(&mut args)?,
    };
    let publish = publish_options(&mut args, "publish")?;
    args.finish()?;
    let (changed, full) = mint_token(ctx, &publish, spec)?;
    // The token is in the written policy whether or not publishing worked: it is printed either
    // way, or a failed publish would leave a token whose secret nobody ever saw.
    report_changed(changed, |_| {
        println!("{}", String::from_utf8_lossy(full.expose()));
    })
}

/// A token may only name a team the policy has (the filter's validation refuses it too; this says
/// what to do about it).
fn require_team(policy: &RawPolicy, team: &str) -> Result<(), CliError> {
    if policy.teams.iter().any(|t| t.id == team) {
        return Ok(());
    }
    Err(failed(format!(
        "no team '{team}' (create it first: shieldkey team create {team})"
    )))
}

fn token_mut<'p>(policy: &'p mut RawPolicy, id: &str) -> Result<&'p mut RawToken, CliError> {
    policy
        .tokens
        .iter_mut()
        .find(|t| t.id == id)
        .ok_or_else(|| failed(format!("no token with id '{id}'")))
}

/// Which tokens `revoke` and `unrevoke` change.
enum Selection {
    Id(String),
    /// Every token matching all that is given: `owner` exactly this, in team `team`.
    Matching(Match),
}

/// `--owner` and `--team` of `revoke` / `unrevoke`: at least one is given; given both, a token
/// must match both.
struct Match {
    owner: Option<String>,
    team: Option<String>,
}

impl Match {
    fn selects(&self, t: &RawToken) -> bool {
        self.owner
            .as_deref()
            .is_none_or(|o| t.owner.as_deref() == Some(o))
            && self
                .team
                .as_deref()
                .is_none_or(|team| t.team.as_deref() == Some(team))
    }

    /// "of owner 'O'", "of team 'T'", "of owner 'O' in team 'T'".
    fn whose(&self) -> String {
        match (&self.owner, &self.team) {
            (Some(o), Some(t)) => format!("of owner '{o}' in team '{t}'"),
            (Some(o), None) => format!("of owner '{o}'"),
            (None, Some(t)) => format!("of team '{t}'"),
            (None, None) => String::new(),
        }
    }
}

/// How `revoke` and `unrevoke` speak of what they do.
struct StatusWords {
    /// "revoke": what a dry run would do.
    verb: &'static str,
    /// "revoked": what was done.
    done: &'static str,
    /// The state the command puts tokens in, and the one it takes them from.
    to: &'static str,
    from: &'static str,
}

impl StatusWords {
    fn of(status: RawStatus) -> StatusWords {
        match status {
            RawStatus::Revoked => StatusWords {
                verb: "revoke",
                done: "revoked",
                to: "revoked",
                from: "active",
            },
            RawStatus::Active => StatusWords {
                verb: "re-enable",
                done: "re-enabled",
                to: "active",
                from: "revoked",
            },
        }
    }

    fn did(&self, dry_run: bool) -> String {
        if dry_run {
            format!("would {}", self.verb)
        } else {
            self.done.to_string()
        }
    }
}

/// `revoke ID`, `unrevoke ID`, and `revoke --owner OWNER` / `--team TEAM` (and the same for
/// `unrevoke`): every token of that owner, of that team, or of both when both are given, in one
/// change (one revision, one publish). The ids changed go to stdout, one a line; selected tokens
/// already in the wanted state are left as they are and named on stderr. With `--dry-run`
/// nothing is written.
pub fn set_status(ctx: &mut Context, mut args: Args, status: RawStatus) -> Result<(), CliError> {
    let publish = publish_options(&mut args, "publish")?;
    let owner = args.option("owner")?;
    let team = args.option("team")?;
    let dry_run = args.flag("dry-run");
    let selection = if owner.is_none() && team.is_none() {
        Selection::Id(args.positional("token id (or --owner OWNER, --team TEAM)")?)
    } else {
        // Not echoed: it may be a token pasted where an id belongs.
        if args.positional("token id").is_ok() {
            let given = match (&owner, &team) {
                (Some(_), Some(_)) => "--owner OWNER and --team TEAM",
                (Some(_), None) => "--owner OWNER",
                _ => "--team TEAM",
            };
            return Err(usage(format!(
                "give a token id or {given}, not both; nothing was changed"
            )));
        }
        if owner.as_deref() == Some("") {
            return Err(usage("--owner must not be empty"));
        }
        if let Some(team) = &team {
            crate::team::validate_id(team).map_err(|m| usage(format!("--team: {m}")))?;
        }
        Selection::Matching(Match { owner, team })
    };
    args.finish()?;
    let words = StatusWords::of(status);
    match selection {
        Selection::Id(id) => change_reporting(
            ctx,
            publish,
            Scope::Token(id.clone()),
            false,
            dry_run,
            token_status_edit(&id, status, dry_run),
            |_| {},
        ),
        Selection::Matching(selected) => change_reporting(
            ctx,
            publish,
            Scope::Whole,
            false,
            dry_run,
            |policy, _| set_status_of_matching(policy, &selected, status, &words, dry_run),
            |outcome: &BulkChange| {
                for id in &outcome.changed {
                    println!("{id}");
                }
                if !outcome.left.is_empty() {
                    eprintln!(
                        "left as they are (already {}): {}",
                        words.to,
                        outcome.left.join(", ")
                    );
                }
            },
        ),
    }
}

/// The change of `revoke ID` and `unrevoke ID`: the token's status.
fn token_status_edit(id: &str, status: RawStatus, dry_run: bool) -> impl Edit<()> + '_ {
    let words = StatusWords::of(status);
    move |policy: &mut RawPolicy, _: Option<&MasterKey>| {
        let token = token_mut(policy, id)?;
        token.status = status;
        Ok((format!("{} token '{id}'", words.did(dry_run)), ()))
    }
}

/// The core of `revoke ID` / `unrevoke ID` (the CLI's and the console's).
pub(super) fn set_token_status(
    ctx: &mut Context,
    publish: &Publish,
    id: &str,
    status: RawStatus,
) -> Result<Changed<()>, CliError> {
    apply_change(
        ctx,
        publish,
        Scope::Token(id.to_string()),
        false,
        token_status_edit(id, status, false),
    )
}

/// The tokens selected by `--owner` / `--team` that `revoke` / `unrevoke` changed, and those it
/// left as they were (already in the wanted state), by id in policy order.
struct BulkChange {
    changed: Vec<String>,
    left: Vec<String>,
}

/// Puts every selected token in `status`: what was done, and the ids. Fails, changing nothing,
/// when no token is changed.
fn set_status_of_matching(
    policy: &mut RawPolicy,
    selected: &Match,
    status: RawStatus,
    words: &StatusWords,
    dry_run: bool,
) -> Result<(String, BulkChange), CliError> {
    let whose = selected.whose();
    let (mut changed, mut left) = (Vec::new(), Vec::new());
    for token in policy.tokens.iter_mut().filter(|t| selected.selects(t)) {
        if token.status == status {
            left.push(token.id.clone());
        } else {
            token.status = status;
            changed.push(token.id.clone());
        }
    }
    if changed.is_empty() {
        let why = if left.is_empty() {
            nothing_selected(policy, selected)
        } else {
            format!(
                "no {} token {whose}: its {} token{} already {} ({})",
                words.from,
                left.len(),
                if left.len() == 1 { " is" } else { "s are" },
                words.to,
                left.join(", ")
            )
        };
        return Err(failed(format!("{why}; nothing was changed")));
    }
    let done = format!(
        "{} {} token{} {whose}",
        words.did(dry_run),
        changed.len(),
        if changed.len() == 1 { "" } else { "s" }
    );
    Ok((done, BulkChange { changed, left }))
}

/// Why no token matched `--owner` / `--team`, with a hint when an owner differs only in case or
/// spaces, or the team does not exist.
fn nothing_selected(policy: &RawPolicy, selected: &Match) -> String {
    let owner_hint = |owner: &str| {
        let mut near: Vec<&str> = policy
            .tokens
            .iter()
            .filter_map(|t| t.owner.as_deref())
            .filter(|o| o.eq_ignore_ascii_case(owner) || o.trim() == owner.trim())
            .collect();
        near.sort_unstable();
        near.dedup();
        if near.is_empty() {
            String::new()
        } else {
            format!(
                " (owners match exactly; similar: {})",
                near.iter()
                    .map(|o| format!("'{o}'"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
    };
    let team_exists = |team: &str| policy.teams.iter().any(|t| t.id == team);
    match (selected.owner.as_deref(), selected.team.as_deref()) {
        (_, Some(team)) if !team_exists(team) => format!("no team with id '{team}'"),
        (Some(owner), None) => format!("no token has owner '{owner}'{}", owner_hint(owner)),
        (None, Some(team)) => format!("no token is in team '{team}'"),
        (Some(owner), Some(team)) => format!(
            "no token of owner '{owner}' is in team '{team}'{}",
            owner_hint(owner)
        ),
        (None, None) => "no token selected".to_string(),
    }
}

/// What `limit` changes: rules, and the team (`Some(None)`: out of its team).
#[derive(Debug, Clone, Default)]
pub(super) struct TokenChange {
    pub rules: RuleFlags,
    pub membership: Option<Option<String>>,
}

impl TokenChange {
    fn checked(&self) -> Result<(), CliError> {
        if let Some(Some(team)) = &self.membership {
            crate::team::validate_id(team).map_err(|m| usage(format!("--team: {m}")))?;
        }
        if self.rules.is_empty() && self.membership.is_none() {
            return Err(usage(
                "nothing to change: give at least one rule flag, --team TEAM or --no-team (see --help)",
            ));
        }
        Ok(())
    }
}

/// The core of `limit ID` (the CLI's and the console's): changes a token's rules (budget,
/// rates, networks, countries, models, scopes, enforce) and the team it is in.
pub(super) fn change_token(
    ctx: &mut Context,
    publish: &Publish,
    id: &str,
    change: &TokenChange,
) -> Result<Changed<()>, CliError> {
    change.checked()?;
    let rules_given = !change.rules.is_empty();
    let membership = &change.membership;
    apply_change(
        ctx,
        publish,
        Scope::Token(id.to_string()),
        false,
        |policy: &mut RawPolicy, _: Option<&MasterKey>| {
            if let Some(Some(team)) = membership {
                require_team(policy, team)?;
            }
            let token = token_mut(policy, id)?;
            let mut done = Vec::new();
            if rules_given {
                change.rules.clone().apply(&mut *token)?;
                done.push(format!("changed the rules of token '{id}'"));
            }
            if let Some(new) = membership {
                let subject = if done.is_empty() {
                    format!("token '{id}'")
                } else {
                    "it".to_string()
                };
                done.push(match (token.team.as_deref(), new.as_deref()) {
                    (Some(old), Some(new)) if old == new => {
                        format!("{subject} stays in team '{new}'")
                    }
                    (Some(old), Some(new)) => {
                        format!("moved {subject} from team '{old}' to team '{new}'")
                    }
                    (None, Some(new)) => format!("put {subject} in team '{new}'"),
                    (Some(old), None) => format!("took {subject} out of team '{old}'"),
                    (None, None) => format!("{subject} was in no team and stays so"),
                });
                token.team = new.clone();
            }
            Ok((done.join("; "), ()))
        },
    )
}

/// `limit ID [rule flags] [--team T | --no-team]`.
pub fn limit(ctx: &mut Context, mut args: Args) -> Result<(), CliError> {
    let publish = publish_options(&mut args, "publish")?;
    let rules = RuleFlags::take(&mut args)?;
    let team = args.option("team")?;
    let no_team = args.flag("no-team");
    let id = args.positional("token id")?;
    args.finish()?;
    // `--team none` would be ambiguous (a team may be called none): leaving is `--no-team`.
    let membership: Option<Option<String>> = match (team, no_team) {
        (Some(_), true) => {
            return Err(usage(
                "--team and --no-team exclude each other; nothing was changed",
            ))
        }
        (Some(team), false) => Some(Some(team)),
        (None, true) => Some(None),
        (None, false) => None,
    };
    let change = TokenChange { rules, membership };
    report_changed(change_token(ctx, &publish, &id, &change)?, |_| {})
}

pub fn remove(ctx: &mut Context, mut args: Args) -> Result<(), CliError> {
    let publish = publish_options(&mut args, "publish")?;
    let id = args.positional("token id")?;
    args.finish()?;
    change(
        ctx,
        publish,
        Scope::Token(id.clone()),
        false,
        |policy, _| {
            let before = policy.tokens.len();
            policy.tokens.retain(|t| t.id != id);
            if policy.tokens.len() == before {
                return Err(failed(format!("no token with id '{id}'")));
            }
            Ok(format!("removed token '{id}'"))
        },
    )
}

/// A token's state as `list` shows it: its status, then its validity period.
pub(super) fn token_state(t: &RawToken, now: i64) -> &'static str {
    let parsed = |v: &Option<String>| v.as_deref().and_then(|s| parse_rfc3339(s).ok());
    match t.status {
        RawStatus::Revoked => "revoked",
        _ if parsed(&t.expires_at).is_some_and(|e| now >= e) => "expired",
        _ if parsed(&t.not_before).is_some_and(|n| now < n) => "not-yet-valid",
        _ => "active",
    }
}

/// How `list` and `team list` show an `enforce` setting (absent means true).
pub(super) fn enforce_text(enforce: Option<bool>) -> &'static str {
    if enforce == Some(false) {
        "false (dry run)"
    } else {
        "true"
    }
}

/// `list [--json]`: every token and its state; grouped by team when the policy has teams.
pub fn list(ctx: &mut Context, mut args: Args) -> Result<(), CliError> {
    let as_json = args.flag("json");
    args.finish()?;
    let policy = ctx.store.load()?.policy;
    let now = now();
    if as_json {
        // Digests and sealed keys stay out: the listing is for people and dashboards.
        let tokens: Vec<_> = policy
            .tokens
            .iter()
            .map(|t| {
                json!({
                    "id": t.id, "owner": t.owner, "description": t.description,
                    "state": token_state(t, now), "upstream_key": t.upstream_key,
                    "not_before": t.not_before, "expires_at": t.expires_at,
                    "budget": t.budget, "rate_limit": t.rate_limit,
                    "source_cidrs": t.source_cidrs, "countries": t.countries, "models": t.models,
                    "team": t.team, "enforce": t.enforce != Some(false),
                })
            })
            .collect();
        let keys: Vec<_> = policy.upstream_keys.iter().map(|k| k.id.as_str()).collect();
        let teams: Vec<_> = policy.teams.iter().map(|t| t.id.as_str()).collect();
        let doc = json!({
            "revision": policy.revision, "enforce": policy.enforce != Some(false),
            "upstream_keys": keys, "teams": teams, "tokens": tokens,
        });
        println!("{doc:#}");
        return Ok(());
    }
    println!(
        "{:<32} {:<14} {:<12} {:<16} {:<24} {:<24} OWNER",
        "ID", "STATE", "UPSTREAM", "ENFORCE", "NOT BEFORE", "EXPIRES"
    );
    let row = |t: &RawToken| {
        println!(
            "{:<32} {:<14} {:<12} {:<16} {:<24} {:<24} {}",
            t.id,
            token_state(t, now),
            t.upstream_key,
            enforce_text(t.enforce),
            t.not_before.as_deref().unwrap_or("-"),
            t.expires_at.as_deref().unwrap_or("-"),
            t.owner.as_deref().unwrap_or("-")
        );
    };
    let grouped = !policy.teams.is_empty() || policy.tokens.iter().any(|t| t.team.is_some());
    if grouped {
        for group in team_groups(&policy) {
            let count = format!(
                "{} token{}",
                group.members.len(),
                if group.members.len() == 1 { "" } else { "s" }
            );
            match (group.id, group.team) {
                (Some(id), Some(team)) => println!(
                    "team {id} ({count}){}{}",
                    team.description
                        .as_deref()
                        .map(|d| format!(": {d}"))
                        .unwrap_or_default(),
                    if team.enforce == Some(false) {
                        "; enforce=false (dry run)"
                    } else {
                        ""
                    }
                ),
                // Only in a hand-edited policy, which `check` refuses: shown, not hidden.
                (Some(id), None) => {
                    println!("team {id} ({count}): no such team in the policy (check refuses it)")
                }
                (None, _) => println!("(no team) ({count})"),
            }
            for t in group.members {
                row(t);
            }
        }
    } else {
        for t in &policy.tokens {
            row(t);
        }
    }
    let mut summary = format!(
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
    if !policy.teams.is_empty() {
        summary.push_str(&format!(
            ", teams: {}",
            policy
                .teams
                .iter()
                .map(|t| t.id.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if policy.enforce == Some(false) {
        summary.push_str(
            "; policy-wide enforce=false: every rule of every token and team is in dry run",
        );
    }
    eprintln!("{summary}");
    Ok(())
}

/// Tokens by team for `list`: the policy's teams in order (empty ones too), then teams tokens
/// name that the policy lacks, then the tokens in no team (when there are any).
struct TeamGroup<'p> {
    id: Option<&'p str>,
    team: Option<&'p RawTeam>,
    members: Vec<&'p RawToken>,
}

fn team_groups(policy: &RawPolicy) -> Vec<TeamGroup<'_>> {
    let mut groups: Vec<TeamGroup<'_>> = policy
        .teams
        .iter()
        .map(|team| TeamGroup {
            id: Some(team.id.as_str()),
            team: Some(team),
            members: Vec::new(),
        })
        .collect();
    let mut no_team = Vec::new();
    for t in &policy.tokens {
        let Some(name) = t.team.as_deref() else {
            no_team.push(t);
            continue;
        };
        match groups.iter_mut().find(|g| g.id == Some(name)) {
            Some(group) => group.members.push(t),
            None => groups.push(TeamGroup {
                id: Some(name),
                team: None,
                members: vec![t],
            }),
        }
    }
    if !no_team.is_empty() {
        groups.push(TeamGroup {
            id: None,
            team: None,
            members: no_team,
        });
    }
    groups
}

pub fn check(ctx: &mut Context, args: Args) -> Result<(), CliError> {
    args.finish()?;
    let (raw, bytes) = ctx.store.document()?;
    let master = master_key(Some(&raw))?;
    let policy = ctx.store.validate(&raw, &bytes, master.as_ref())?;
    println!(
        "ok: revision {}, {} tokens ({} revoked), {} upstream keys{}{}{}",
        policy.revision,
        policy.tokens.len(),
        policy.revoked_count(),
        policy.upstream_keys.len(),
        if policy.teams.is_empty() {
            String::new()
        } else {
            format!(", {} teams", policy.teams.len())
        },
        if master.is_some() {
            ", all sealed keys open"
        } else {
            " (master key not set: sealed keys checked for form only)"
        },
        if ctx.store.is_etcd() {
            format!("; {}", ctx.store.describe())
        } else {
            String::new()
        }
    );
    Ok(())
}

/// Settings for `render`: the defaults with what the flags give.
fn rendered_settings(policy: &RawPolicy, flags: FilterFlags) -> FilterSettings {
    let d = FilterSettings::default();
    FilterSettings {
        filter_name: flags.filter_name.unwrap_or(d.filter_name),
        wasm_path: flags.wasm.unwrap_or(d.wasm_path),
        vm_id: flags.vm_id.unwrap_or(d.vm_id),
        runtime: flags.runtime.unwrap_or(d.runtime),
        master_key_env: master_env_name(Some(policy)),
        other_env_keys: Vec::new(),
    }
}

fn compact(policy: &RawPolicy) -> Result<String, CliError> {
    serde_json::to_string(policy).map_err(|e| failed(format!("cannot encode the policy: {e}")))
}

pub fn render(ctx: &mut Context, mut args: Args) -> Result<(), CliError> {
    let what =
        args.positional("what to render (plugin-config, wasm-filter, ecds or http-filters)")?;
    if what == "http-filters" {
        return render_http_filters(ctx, args);
    }
    let flags = filter_flags(&mut args)?;
    args.finish()?;
    let policy = ctx.store.load()?.policy;
    let json = compact(&policy)?;
    ctx.store.validate(
        &policy,
        json.as_bytes(),
        master_key(Some(&policy))?.as_ref(),
    )?;
    let out = match what.as_str() {
        "plugin-config" => json,
        "wasm-filter" => format!(
            "{:#}",
            wasm_filter(
                &rendered_settings(&policy, flags),
                plain_configuration(&json)
            )
        ),
        "ecds" => format!(
            "{:#}",
            ecds_file(&rendered_settings(&policy, flags), &json, policy.revision)
        ),
        other => {
            return Err(usage(format!(
                "cannot render '{other}': choose plugin-config, wasm-filter, ecds or http-filters"
            )))
        }
    };
    println!("{out}");
    Ok(())
}

fn is_header_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with(':')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// `render http-filters`: the chain every listener in front of ShieldKey needs, to copy.
fn render_http_filters(ctx: &mut Context, mut args: Args) -> Result<(), CliError> {
    let header = args.option("country-header")?;
    let geoip_db = args.option("geoip")?;
    let ecds_path = args.option("ecds-path")?;
    let filter_name = args.option("filter-name")?;
    let as_json = args.flag("json");
    args.finish()?;
    let country_header = match header {
        Some(h) => h,
        // The policy's own header when there is a policy: it is the one the filter reads.
        None if ctx.store.exists()? => ctx
            .store
            .load()?
            .policy
            .requests
            .and_then(|r| r.country_header)
            .unwrap_or_else(|| DEFAULT_COUNTRY_HEADER.to_string()),
        None => DEFAULT_COUNTRY_HEADER.to_string(),
    };
    if !is_header_name(&country_header) {
        return Err(usage(format!(
            "--country-header {country_header}: must be a lower-case HTTP header name"
        )));
    }
    let d = ChainOptions::default();
    let options = ChainOptions {
        country_header,
        filter_name: filter_name.unwrap_or(d.filter_name),
        ecds_path: ecds_path.unwrap_or(d.ecds_path),
        geoip_db,
    };
    if as_json {
        println!("{:#}", http_filters(&options));
    } else {
        print!("{}", http_filters_yaml(&options));
    }
    Ok(())
}

pub fn publish(ctx: &mut Context, mut args: Args) -> Result<(), CliError> {
    refuse_publish(ctx, "publish")?;
    let options = publish_options(&mut args, "to")?;
    args.finish()?;
    let to = options
        .to
        .clone()
        .ok_or_else(|| usage("--to PATH is required (or set SHIELDKEY_PUBLISH)"))?;
    let policy = ctx.store.load()?.policy;
    let master = master_key(Some(&policy))?;
    let published =
        PublishTarget::prepare(Path::new(&to), &options)?.publish(&policy, master.as_ref())?;
    eprintln!("{}", published.line());
    Ok(())
}

/// A publish that went through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Published {
    pub revision: u64,
    pub to: PathBuf,
    /// How long Envoy took to apply it; `None`: not confirmed (no `--admin`).
    pub applied_after: Option<Duration>,
}

impl Published {
    /// What the CLI says about it.
    pub(super) fn line(&self) -> String {
        match self.applied_after {
            Some(took) => format!(
                "published revision {} to {}; Envoy applied it ({} ms)",
                self.revision,
                self.to.display(),
                took.as_millis()
            ),
            None => format!(
                "published revision {} to {} (not confirmed: with --admin URL the CLI waits until \
                 Envoy applies it)",
                self.revision,
                self.to.display()
            ),
        }
    }
}

/// The file mode of the published ECDS file. It carries sealed keys and digests, not secrets,
/// but no one else needs to read it.
const ECDS_MODE: u32 = 0o640;

/// How a publish confirmed with Envoy can end.
enum Verdict {
    /// After this long.
    Applied(Duration),
    /// Envoy refused the file (the previous configuration keeps serving).
    Refused(CliError),
    /// No verdict (timeout, admin unreachable).
    Unknown(CliError),
}

/// A publish about to happen: the settings it will write, the file it replaces, and Envoy's
/// counters before the write when the result is to be confirmed.
struct PublishTarget {
    to: PathBuf,
    settings: FilterSettings,
    /// The bytes of the file being replaced, when it is the one Envoy serves: put back if Envoy
    /// refuses the new one, so the file again shows what serves and the next publish starts from
    /// settings that work.
    serving: Option<Vec<u8>>,
    confirm: Option<(Admin, EcdsStats, Duration)>,
}

impl PublishTarget {
    fn prepare(to: &Path, options: &Publish) -> Result<PublishTarget, CliError> {
        let (settings, existing) = resolve_settings(to, &options.flags)?;
        let confirm = match &options.admin {
            None => None,
            Some(url) => {
                let admin = Admin::parse(url)?;
                let before = admin
                    .ecds_stats(&settings.filter_name, Duration::from_secs(2))
                    .map_err(|e| {
                        failed(format!(
                            "cannot ask Envoy at {} before publishing: {e}; nothing was changed",
                            admin.url()
                        ))
                    })?;
                Some((admin, before, options.wait))
            }
        };
        let serving = match (&confirm, existing) {
            (Some((_, before, _)), Some((bytes, published)))
                if !before.version_text.is_empty()
                    && published.version_info.as_deref() == Some(before.version_text.as_str()) =>
            {
                Some(bytes)
            }
            _ => None,
        };
        Ok(PublishTarget {
            to: to.to_path_buf(),
            settings,
            serving,
            confirm,
        })
    }

    /// Writes the ECDS file Envoy watches, atomically, after the same validation the filter runs;
    /// with `--admin`, waits for Envoy's verdict.
    fn publish(
        mut self,
        policy: &RawPolicy,
        master: Option<&MasterKey>,
    ) -> Result<Published, CliError> {
        let json = compact(policy)?;
        validate(json.as_bytes(), master)?;
        // The policy names the variable the filter reads the master key from: it must be passed.
        self.settings.master_key_env = master_env_name(Some(policy));
        let doc = ecds_file(&self.settings, &json, policy.revision);
        let mut bytes = format!("{doc:#}").into_bytes();
        bytes.push(b'\n');
        write_atomic(&self.to, &bytes, ECDS_MODE)?;
        let published = |applied_after| Published {
            revision: policy.revision,
            to: self.to.clone(),
            applied_after,
        };
        let Some((admin, before, wait)) = &self.confirm else {
            return Ok(published(None));
        };
        let verdict = match wait_applied(
            admin,
            &self.settings.filter_name,
            policy.revision,
            before,
            *wait,
        ) {
            Ok(took) => Verdict::Applied(took),
            Err(WaitError::Refused(m)) => Verdict::Refused(failed(m)),
            Err(WaitError::Unknown(m)) => Verdict::Unknown(failed(m)),
        };
        match verdict {
            Verdict::Applied(took) => Ok(published(Some(took))),
            Verdict::Unknown(e) => Err(e),
            Verdict::Refused(e) => match &self.serving {
                None => Err(e),
                Some(old) => match write_atomic(&self.to, old, ECDS_MODE) {
                    Ok(()) => Err(failed(format!(
                        "{e}; {} was put back to the revision Envoy serves",
                        self.to.display()
                    ))),
                    Err(w) => Err(failed(format!(
                        "{e}; putting the previous file back failed: {w}"
                    ))),
                },
            },
        }
    }
}

/// A published file being replaced: its bytes and what it says.
type Existing = (Vec<u8>, PublishedFilter);

/// The settings to publish with: explicit flags first, then those of the ShieldKey ECDS file
/// being replaced, then the defaults (only when there is no file). A file that exists but cannot
/// be read as ShieldKey's is never overwritten: its settings would be lost.
fn resolve_settings(
    to: &Path,
    flags: &FilterFlags,
) -> Result<(FilterSettings, Option<Existing>), CliError> {
    let refuse = |why: String| {
        failed(format!(
            "{} exists but {why}; refusing to replace it, since its settings (wasm path, vm_id, \
             runtime, filter name) could not be kept: remove it, or publish to another path",
            to.display()
        ))
    };
    let existing = match std::fs::read(to) {
        Ok(bytes) => {
            let doc: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| {
                refuse(format!(
                    "is not a ShieldKey ECDS file (not JSON, which `shieldkey publish` writes: {e})"
                ))
            })?;
            let published = read_published(&doc)
                .map_err(|why| refuse(format!("is not a ShieldKey ECDS file ({why})")))?;
            Some((bytes, published))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(refuse(format!("cannot be read ({e})"))),
    };
    let d = FilterSettings::default();
    let settings = match &existing {
        None => {
            if flags.wasm.is_none() {
                eprintln!(
                    "note: no --wasm given and no published file to keep it from: Envoy will load \
                     '{}' relative to its working directory",
                    d.wasm_path
                );
            }
            FilterSettings {
                filter_name: flags.filter_name.clone().unwrap_or(d.filter_name),
                wasm_path: flags.wasm.clone().unwrap_or(d.wasm_path),
                vm_id: flags.vm_id.clone().unwrap_or(d.vm_id),
                runtime: flags.runtime.clone().unwrap_or(d.runtime),
                master_key_env: d.master_key_env,
                other_env_keys: Vec::new(),
            }
        }
        Some((_, p)) => {
            let wasm_path = match (&flags.wasm, &p.wasm_path) {
                (Some(w), _) | (None, Some(w)) => w.clone(),
                (None, None) => {
                    return Err(failed(format!(
                        "{} loads the filter from somewhere other than \
                         vm_config.code.local.filename, which `shieldkey publish` cannot keep: \
                         give --wasm PATH",
                        to.display()
                    )))
                }
            };
            FilterSettings {
                filter_name: flags
                    .filter_name
                    .clone()
                    .unwrap_or_else(|| p.filter_name.clone()),
                wasm_path,
                vm_id: flags.vm_id.clone().unwrap_or_else(|| p.vm_id.clone()),
                runtime: flags.runtime.clone().unwrap_or_else(|| p.runtime.clone()),
                master_key_env: d.master_key_env,
                other_env_keys: p.host_env_keys.clone(),
            }
        }
    };
    Ok((settings, existing))
}
