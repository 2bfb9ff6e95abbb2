//! Where the policy lives: the policy file (`$SHIELDKEY_POLICY`), or etcd in fleet mode. Commands
//! `load`, change and `save` without knowing which.
//!
//! etcd key layout (values are compact JSON of the `config::raw` types; Envoys in fleet mode
//! follow it):
//! - `<prefix>policy/settings`: the `RawPolicy` with empty `tokens` and `upstream_keys` and no
//!   `teams` (it carries the policy-wide `enforce`);
//! - `<prefix>policy/keys/<id>`: one `RawUpstreamKey`;
//! - `<prefix>policy/teams/<id>`: one `RawTeam`;
//! - `<prefix>policy/tokens/<id>`: one `RawToken`.
//!
//! A save writes only the keys that differ from what was read, in transactions that guard every
//! key written (and the settings key, whose revision every change bumps) with the `mod_revision`
//! it was read at. When another writer got there first the save reports a conflict and the
//! command starts over from a fresh read.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::error::{failed, usage, CliError};
use super::etcd::{Change, Credentials, Etcd, EtcdError, HttpTransport, Kv, Written};
use super::policy_file;
use crate::config::compile::{compile_bytes, CompileOptions};
use crate::config::raw::{self, RawPolicy, RawTeam, RawToken, RawUpstreamKey};
use crate::master_key::MasterKey;
use crate::policy::Policy;
use crate::secret::SecretBytes;

pub const DEFAULT_PREFIX: &str = "shieldkey/";
pub const PASSWORD_ENV: &str = "SHIELDKEY_ETCD_PASSWORD";

/// Where the policy is.
pub enum PolicyStore {
    File(PathBuf),
    Etcd(EtcdPolicy),
}

/// The policy under `<prefix>policy/` in etcd.
pub struct EtcdPolicy {
    etcd: Etcd,
    prefix: String,
}

/// Keys read from etcd: key → (value, `mod_revision`).
type Keys = BTreeMap<Vec<u8>, (Vec<u8>, i64)>;

/// What a change reads: in etcd, a command about one token reads the settings, the upstream keys,
/// the teams and that token only, so its cost does not grow with the number of tokens (the write
/// is guarded by the settings key, which every change rewrites); `Whole` reads every key, in one
/// snapshot, for a change that selects tokens by their content (`revoke --owner`, `--team`) or
/// must know every member of a team (`team remove`, `team list`). Every scope reads all teams:
/// they are few, and validation needs them to check the team a token names. A file is always
/// read whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    Token(String),
    NoTokens,
    Whole,
}

/// What a save is based on: the keys and `mod_revision`s read (etcd); for the file, the
/// revision it had when read (`None`: a save that replaces whatever is there, `init` and
/// `import`).
pub struct Base(Option<Keys>, Option<u64>);

/// A policy as read, with what a save of it is based on.
pub struct Loaded {
    pub policy: RawPolicy,
    pub base: Base,
}

/// What is already there, for `init`.
pub struct Existing {
    /// Something is there that `init` would replace.
    pub found: Option<String>,
    /// The revision of the policy there (0 when none can be read).
    pub revision: u64,
    pub base: Base,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Saved {
    /// Written, in `steps` etcd transactions (1 for the file).
    Written { steps: usize },
    /// Another writer changed the policy since it was read; the first `steps_applied`
    /// transactions of this save were applied. Read again and redo the change.
    Conflict { steps_applied: usize },
}

/// A prefix as the Envoy side accepts it: 1-128 printable characters ending in `/`.
pub fn check_prefix(prefix: &str) -> Result<(), CliError> {
    let ok = !prefix.is_empty()
        && prefix.len() <= 128
        && prefix.ends_with('/')
        && prefix.bytes().all(|b| b.is_ascii_graphic());
    if ok {
        Ok(())
    } else {
        Err(usage(format!(
            "--etcd-prefix {prefix}: 1-128 printable characters ending in '/', e.g. shieldkey/"
        )))
    }
}

impl PolicyStore {
    /// Fleet mode: etcd at `urls` (comma-separated), under `prefix`; with `user`, the password
    /// is read from `SHIELDKEY_ETCD_PASSWORD` when etcd is first asked.
    pub fn etcd(urls: &str, prefix: &str, user: Option<String>) -> Result<PolicyStore, CliError> {
        check_prefix(prefix)?;
        Ok(PolicyStore::Etcd(EtcdPolicy {
            etcd: etcd_client(urls, user)?,
            prefix: prefix.to_string(),
        }))
    }

    pub fn is_etcd(&self) -> bool {
        matches!(self, PolicyStore::Etcd(_))
    }

    /// For messages: the file, or the prefix and endpoints.
    pub fn describe(&self) -> String {
        match self {
            PolicyStore::File(path) => path.display().to_string(),
            PolicyStore::Etcd(e) => e.describe(),
        }
    }

    /// Whether there is a policy.
    pub fn exists(&mut self) -> Result<bool, CliError> {
        match self {
            PolicyStore::File(path) => Ok(path.exists()),
            PolicyStore::Etcd(e) => {
                let settings = e.settings_key();
                Ok(e.read()?.contains_key(settings.as_bytes()))
            }
        }
    }

    pub fn load(&mut self) -> Result<Loaded, CliError> {
        match self {
            PolicyStore::File(path) => {
                let policy = policy_file::load(path)?;
                let revision = policy.revision;
                Ok(Loaded {
                    policy,
                    base: Base(None, Some(revision)),
                })
            }
            PolicyStore::Etcd(e) => e.load(),
        }
    }

    /// `load`, reading only what `scope` needs from etcd.
    pub fn load_scoped(&mut self, scope: &Scope) -> Result<Loaded, CliError> {
        match (self, scope) {
            (PolicyStore::Etcd(e), scope) => e.load_scoped(scope),
            (store, _) => store.load(),
        }
    }

    /// What `init` would replace.
    pub fn existing(&mut self) -> Result<Existing, CliError> {
        match self {
            PolicyStore::File(path) => Ok(Existing {
                found: path.exists().then(|| format!("{} exists", path.display())),
                revision: 0,
                base: Base(None, None),
            }),
            PolicyStore::Etcd(e) => e.existing(),
        }
    }

    /// Bumps the revision, validates with the filter's own compiler, and writes. Nothing is
    /// written when validation fails.
    pub fn save(
        &mut self,
        base: &Base,
        policy: &mut RawPolicy,
        master: Option<&MasterKey>,
    ) -> Result<Saved, CliError> {
        match self {
            PolicyStore::File(path) => {
                // Another writer (the CLI, the console) saved since this change was read: its
                // change would be lost under this one. Read again and redo, as with etcd. (Checked
                // just before the write; only a lock would close the last microseconds.)
                if let Some(read) = base.1 {
                    if policy_file::load(path)?.revision != read {
                        return Ok(Saved::Conflict { steps_applied: 0 });
                    }
                }
                policy_file::save(path, policy, master)?;
                Ok(Saved::Written { steps: 1 })
            }
            PolicyStore::Etcd(e) => e.save(base, policy, master),
        }
    }

    /// The policy and the bytes the filter would compile: the file as it is, or the document
    /// assembled from etcd.
    pub fn document(&mut self) -> Result<(RawPolicy, Vec<u8>), CliError> {
        match self {
            PolicyStore::File(path) => {
                let bytes = std::fs::read(path.as_path())
                    .map_err(|e| failed(format!("cannot read {}: {e}", path.display())))?;
                let raw =
                    raw::parse(&bytes).map_err(|e| failed(format!("policy rejected: {e}")))?;
                Ok((raw, bytes))
            }
            PolicyStore::Etcd(e) => {
                let policy = e.load()?.policy;
                let bytes = compact(&policy)?;
                Ok((policy, bytes))
            }
        }
    }

    /// The filter's own validation of `bytes` (the document of `policy`); in fleet mode errors
    /// also name the etcd key of the token or upstream key at fault.
    pub fn validate(
        &self,
        policy: &RawPolicy,
        bytes: &[u8],
        master: Option<&MasterKey>,
    ) -> Result<Policy, CliError> {
        match self {
            PolicyStore::File(_) => policy_file::validate(bytes, master),
            PolicyStore::Etcd(e) => e.validate(policy, bytes, master),
        }
    }
}

fn compact<T: Serialize>(value: &T) -> Result<Vec<u8>, CliError> {
    serde_json::to_vec(value).map_err(|e| failed(format!("cannot encode the policy: {e}")))
}

fn etcd_failed(e: EtcdError) -> CliError {
    failed(e.message)
}

/// One value from etcd, with the field path of what is wrong in it.
fn parse_value<T: DeserializeOwned>(key: &str, value: &[u8]) -> Result<T, CliError> {
    let mut de = serde_json::Deserializer::from_slice(value);
    let parsed: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        failed(format!("etcd key {key}: {path}: {}", e.into_inner()))
    })?;
    de.end()
        .map_err(|e| failed(format!("etcd key {key}: {e}")))?;
    Ok(parsed)
}

impl EtcdPolicy {
    fn describe(&self) -> String {
        format!("etcd prefix {} at {}", self.prefix, self.etcd.describe())
    }

    fn policy_prefix(&self) -> String {
        format!("{}policy/", self.prefix)
    }

    fn settings_key(&self) -> String {
        format!("{}policy/settings", self.prefix)
    }

    fn keys_prefix(&self) -> String {
        format!("{}policy/keys/", self.prefix)
    }

    fn tokens_prefix(&self) -> String {
        format!("{}policy/tokens/", self.prefix)
    }

    fn teams_prefix(&self) -> String {
        format!("{}policy/teams/", self.prefix)
    }

    fn team_key(&self, id: &str) -> String {
        format!("{}{id}", self.teams_prefix())
    }

    fn key_key(&self, id: &str) -> String {
        format!("{}{id}", self.keys_prefix())
    }

    fn token_key(&self, id: &str) -> String {
        format!("{}{id}", self.tokens_prefix())
    }

    /// Every key under `<prefix>policy/` with its value and `mod_revision`.
    fn read(&mut self) -> Result<Keys, CliError> {
        let prefix = self.policy_prefix();
        let snapshot = self
            .etcd
            .range_prefix(prefix.as_bytes())
            .map_err(etcd_failed)?;
        Ok(snapshot
            .kvs
            .into_iter()
            .map(
                |Kv {
                     key,
                     value,
                     mod_revision,
                 }| (key, (value, mod_revision)),
            )
            .collect())
    }

    fn load_scoped(&mut self, scope: &Scope) -> Result<Loaded, CliError> {
        let token = match scope {
            // One read of the whole prefix: every token, at one etcd revision.
            Scope::Whole => return self.load(),
            Scope::Token(id) => Some(id),
            Scope::NoTokens => None,
        };
        let mut kvs = Keys::new();
        let mut read = |store: &mut Self, prefix: String, exact: bool| -> Result<(), CliError> {
            let snapshot = store
                .etcd
                .range_prefix(prefix.as_bytes())
                .map_err(etcd_failed)?;
            for Kv {
                key,
                value,
                mod_revision,
            } in snapshot.kvs
            {
                if !exact || key == prefix.as_bytes() {
                    kvs.insert(key, (value, mod_revision));
                }
            }
            Ok(())
        };
        read(self, self.settings_key(), true)?;
        read(self, self.keys_prefix(), false)?;
        read(self, self.teams_prefix(), false)?;
        if let Some(id) = token {
            read(self, format!("{}{id}", self.tokens_prefix()), true)?;
        }
        let policy = self.assemble(&kvs)?;
        Ok(Loaded {
            policy,
            base: Base(Some(kvs), None),
        })
    }

    fn load(&mut self) -> Result<Loaded, CliError> {
        let kvs = self.read()?;
        let policy = self.assemble(&kvs)?;
        Ok(Loaded {
            policy,
            base: Base(Some(kvs), None),
        })
    }

    /// The policy document from its keys: upstream keys, teams and tokens sorted by id.
    fn assemble(&self, kvs: &Keys) -> Result<RawPolicy, CliError> {
        let settings_key = self.settings_key();
        let keys_prefix = self.keys_prefix();
        let teams_prefix = self.teams_prefix();
        let tokens_prefix = self.tokens_prefix();
        let mut settings = None;
        let mut upstream_keys = Vec::new();
        let mut teams = Vec::new();
        let mut tokens = Vec::new();
        for (key, (value, _)) in kvs {
            let key = String::from_utf8_lossy(key);
            if *key == settings_key {
                settings = Some(parse_settings(&key, value)?);
            } else if let Some(id) = key.strip_prefix(&keys_prefix) {
                let entry: RawUpstreamKey = parse_value(&key, value)?;
                same_id(&key, id, &entry.id)?;
                upstream_keys.push(entry);
            } else if let Some(id) = key.strip_prefix(&teams_prefix) {
                let entry: RawTeam = parse_value(&key, value)?;
                same_id(&key, id, &entry.id)?;
                teams.push(entry);
            } else if let Some(id) = key.strip_prefix(&tokens_prefix) {
                let entry: RawToken = parse_value(&key, value)?;
                same_id(&key, id, &entry.id)?;
                tokens.push(entry);
            } else {
                return Err(failed(format!(
                    "unexpected etcd key {key}: under {} there are only settings, keys/<id>, \
                     teams/<id> and tokens/<id>",
                    self.policy_prefix()
                )));
            }
        }
        let mut policy = settings.ok_or_else(|| {
            if kvs.is_empty() {
                failed(format!(
                    "no policy in {} (create one with `shieldkey init`)",
                    self.describe()
                ))
            } else {
                failed(format!(
                    "{} has policy keys but no {settings_key}: `shieldkey init --force` \
                     replaces them with an empty policy",
                    self.describe()
                ))
            }
        })?;
        upstream_keys.sort_by(|a, b| a.id.cmp(&b.id));
        teams.sort_by(|a, b| a.id.cmp(&b.id));
        tokens.sort_by(|a, b| a.id.cmp(&b.id));
        policy.upstream_keys = upstream_keys;
        policy.teams = teams;
        policy.tokens = tokens;
        Ok(policy)
    }

    fn existing(&mut self) -> Result<Existing, CliError> {
        let kvs = self.read()?;
        let settings = kvs
            .get(self.settings_key().as_bytes())
            .and_then(|(value, _)| raw::parse(value).ok());
        let found = (!kvs.is_empty()).then(|| {
            format!(
                "{} already holds a policy ({} key{} under {})",
                self.describe(),
                kvs.len(),
                if kvs.len() == 1 { "" } else { "s" },
                self.policy_prefix()
            )
        });
        Ok(Existing {
            found,
            revision: settings.map_or(0, |s| s.revision),
            base: Base(Some(kvs), None),
        })
    }

    fn validate(
        &self,
        policy: &RawPolicy,
        bytes: &[u8],
        master: Option<&MasterKey>,
    ) -> Result<Policy, CliError> {
        compile_bytes(bytes, &CompileOptions { master_key: master }).map_err(|e| {
            failed(format!(
                "policy rejected: {}{}: {}",
                e.path,
                self.key_of_path(policy, &e.path),
                e.message
            ))
        })
    }

    /// ` (etcd key <key>)` when `path` is in a token, team or upstream key.
    fn key_of_path(&self, policy: &RawPolicy, path: &str) -> String {
        let index = |rest: &str| -> Option<usize> {
            rest.strip_prefix('[')?
                .split(']')
                .next()
                .and_then(|n| n.parse().ok())
        };
        let key = if let Some(rest) = path.strip_prefix("tokens") {
            index(rest)
                .and_then(|i| policy.tokens.get(i))
                .map(|t| self.token_key(&t.id))
        } else if let Some(rest) = path.strip_prefix("upstream_keys") {
            index(rest)
                .and_then(|i| policy.upstream_keys.get(i))
                .map(|k| self.key_key(&k.id))
        } else if let Some(rest) = path.strip_prefix("teams") {
            index(rest)
                .and_then(|i| policy.teams.get(i))
                .map(|t| self.team_key(&t.id))
        } else {
            None
        };
        key.map(|k| format!(" (etcd key {k})")).unwrap_or_default()
    }

    fn save(
        &mut self,
        base: &Base,
        policy: &mut RawPolicy,
        master: Option<&MasterKey>,
    ) -> Result<Saved, CliError> {
        let empty = BTreeMap::new();
        let kvs = base.0.as_ref().unwrap_or(&empty);
        policy.revision = policy.revision.saturating_add(1);
        policy.upstream_keys.sort_by(|a, b| a.id.cmp(&b.id));
        policy.teams.sort_by(|a, b| a.id.cmp(&b.id));
        policy.tokens.sort_by(|a, b| a.id.cmp(&b.id));
        let document = compact(policy)?;
        self.validate(policy, &document, master)?;
        let (changes, settings) = self.plan(kvs, policy)?;
        match self
            .etcd
            .write_guarded(&changes, &settings)
            .map_err(etcd_failed)?
        {
            Written::Done { steps } => Ok(Saved::Written { steps }),
            Written::Lost { steps_applied } => Ok(Saved::Conflict { steps_applied }),
        }
    }

    /// The writes that turn `kvs` into `policy`, ordered so that every step of a change split
    /// over several transactions leaves a consistent policy: new and changed upstream keys, then
    /// teams (a token never names a team not yet written), then tokens, then removed tokens, then
    /// removed teams (removed only once no token names them), then removed upstream keys, then
    /// anything else removed; and the settings (which always change: the revision) to write last.
    fn plan(&self, kvs: &Keys, policy: &RawPolicy) -> Result<(Vec<Change>, Change), CliError> {
        let seen = |key: &[u8]| kvs.get(key).map_or(0, |(_, m)| *m);
        let mut wanted = BTreeSet::new();
        let mut changes = Vec::new();
        for k in &policy.upstream_keys {
            put_if_changed(kvs, &mut wanted, self.key_key(&k.id), k, &mut changes)?;
        }
        for t in &policy.teams {
            put_if_changed(kvs, &mut wanted, self.team_key(&t.id), t, &mut changes)?;
        }
        for t in &policy.tokens {
            put_if_changed(kvs, &mut wanted, self.token_key(&t.id), t, &mut changes)?;
        }
        let settings_key = self.settings_key().into_bytes();
        let mut settings_doc = policy.clone();
        settings_doc.upstream_keys.clear();
        settings_doc.teams.clear();
        settings_doc.tokens.clear();
        let settings = Change {
            seen: seen(&settings_key),
            value: Some(compact(&settings_doc)?),
            key: settings_key.clone(),
        };
        let tokens_prefix = self.tokens_prefix().into_bytes();
        let teams_prefix = self.teams_prefix().into_bytes();
        let keys_prefix = self.keys_prefix().into_bytes();
        let (mut tokens_removed, mut teams_removed, mut keys_removed, mut others_removed) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (key, (_, m)) in kvs {
            if *key == settings_key || wanted.contains(key) {
                continue;
            }
            let change = Change {
                key: key.clone(),
                seen: *m,
                value: None,
            };
            if key.starts_with(&tokens_prefix) {
                tokens_removed.push(change);
            } else if key.starts_with(&teams_prefix) {
                teams_removed.push(change);
            } else if key.starts_with(&keys_prefix) {
                keys_removed.push(change);
            } else {
                others_removed.push(change);
            }
        }
        changes.extend(tokens_removed);
        changes.extend(teams_removed);
        changes.extend(keys_removed);
        changes.extend(others_removed);
        Ok((changes, settings))
    }
}

/// Adds a put of `entry` at `key` unless etcd already holds it (the same value, perhaps written
/// differently): a change writes only what changed.
fn put_if_changed<T: Serialize + DeserializeOwned + PartialEq>(
    kvs: &Keys,
    wanted: &mut BTreeSet<Vec<u8>>,
    key: String,
    entry: &T,
    out: &mut Vec<Change>,
) -> Result<(), CliError> {
    let key = key.into_bytes();
    if !wanted.insert(key.clone()) {
        return Err(failed(format!(
            "two entries would be written to etcd key {}",
            String::from_utf8_lossy(&key)
        )));
    }
    let value = compact(entry)?;
    let (same, seen) = match kvs.get(&key) {
        None => (false, 0),
        Some((current, m)) => (
            *current == value || serde_json::from_slice::<T>(current).is_ok_and(|c| c == *entry),
            *m,
        ),
    };
    if !same {
        out.push(Change {
            key,
            seen,
            value: Some(value),
        });
    }
    Ok(())
}

/// The settings value: a policy document without tokens, teams and upstream keys, and nothing
/// that belongs in the plugin configuration of a fleet-mode Envoy.
fn parse_settings(key: &str, value: &[u8]) -> Result<RawPolicy, CliError> {
    let doc: serde_json::Value =
        serde_json::from_slice(value).map_err(|e| failed(format!("etcd key {key}: {e}")))?;
    for (field, own_keys) in [
        ("tokens", "policy/tokens/"),
        ("teams", "policy/teams/"),
        ("upstream_keys", "policy/keys/"),
    ] {
        if doc
            .get(field)
            .and_then(serde_json::Value::as_array)
            .is_some_and(|list| !list.is_empty())
        {
            return Err(failed(format!(
                "etcd key {key}: {field} must be empty: each entry has its own key under \
                 {own_keys}"
            )));
        }
    }
    if doc.get("fleet").is_some() {
        return Err(failed(format!(
            "etcd key {key}: fleet: belongs in the Envoy plugin configuration, not in etcd"
        )));
    }
    raw::parse(value).map_err(|e| failed(format!("etcd key {key}: {e}")))
}

/// An entry's id must be the one its key names.
fn same_id(key: &str, id: &str, inside: &str) -> Result<(), CliError> {
    if inside == id {
        return Ok(());
    }
    Err(failed(format!(
        "etcd key {key}: its id is '{inside}', not '{id}'"
    )))
}

/// An etcd client for `urls` (comma-separated); with `user`, the password is read from
/// `SHIELDKEY_ETCD_PASSWORD` when etcd is first asked. The policy and `status` share it.
pub fn etcd_client(urls: &str, user: Option<String>) -> Result<Etcd, CliError> {
    let credentials = user.map(|user| Credentials {
        user,
        password: std::env::var(PASSWORD_ENV)
            .ok()
            .map(|p| SecretBytes::new(p.into_bytes())),
        password_env: PASSWORD_ENV,
    });
    let transport =
        HttpTransport::new(urls, credentials).map_err(|m| usage(format!("--etcd: {m}")))?;
    Ok(Etcd::new(Box::new(transport)))
}

#[cfg(test)]
mod tests {
    use super::super::etcd::fake::{etcd, Fake};
    use super::*;
    use crate::config::raw::RawStatus;

    #[test]
    fn a_file_save_based_on_an_older_read_is_a_conflict_not_a_lost_change() {
        let dir = std::env::temp_dir().join(format!("shieldkey-store-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("policy.json");
        let mut empty =
            raw::parse(format!(r#"{{"version":{}}}"#, raw::POLICY_FORMAT_VERSION).as_bytes())
                .unwrap();
        policy_file::save(&path, &mut empty, None).unwrap();
        let (mut cli, mut console) = (
            PolicyStore::File(path.clone()),
            PolicyStore::File(path.clone()),
        );
        // Both read revision 1; the CLI saves first.
        let (read_by_cli, read_by_console) = (cli.load().unwrap(), console.load().unwrap());
        let mut p = read_by_cli.policy;
        p.master_key_env = Some("CLI_WAS_HERE".into());
        let saved = cli.save(&read_by_cli.base, &mut p, None).unwrap();
        assert_eq!(saved, Saved::Written { steps: 1 });
        // The console's save would drop the CLI's change: a conflict, nothing written.
        let mut p = read_by_console.policy;
        let saved = console.save(&read_by_console.base, &mut p, None).unwrap();
        assert_eq!(saved, Saved::Conflict { steps_applied: 0 });
        let on_disk = console.load().unwrap();
        assert_eq!(on_disk.policy.revision, 2);
        assert_eq!(
            on_disk.policy.master_key_env.as_deref(),
            Some("CLI_WAS_HERE")
        );
        // Read again, the save goes through and keeps the CLI's change.
        let mut p = on_disk.policy;
        assert_eq!(
            console.save(&on_disk.base, &mut p, None).unwrap(),
            Saved::Written { steps: 1 }
        );
        assert_eq!(
            console.load().unwrap().policy.master_key_env.as_deref(),
            Some("CLI_WAS_HERE")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn store(fake: &Fake, prefix: &str) -> PolicyStore {
        PolicyStore::Etcd(EtcdPolicy {
            etcd: etcd(fake, 5000),
            prefix: prefix.to_string(),
        })
    }

    const SEALED: &str = "skseal:v1:";

    fn empty() -> RawPolicy {
        raw::parse(br#"{"version":1}"#).unwrap()
    }

    fn token(id: &str) -> RawToken {
        RawToken {
            id: id.to_string(),
            digest: base64::Engine::encode(&base64::engine::general_purpose::STANDARD, [7u8; 32]),
            upstream_key: "prod".to_string(),
            ..RawToken::default()
        }
    }

    fn sealed_key() -> RawUpstreamKey {
        // A real sealed key, so the filter's validation passes without the master key.
        let master = MasterKey::from_base64(&MasterKey::to_base64(&[1u8; 32])).unwrap();
        let sealed = crate::seal::seal(master.seal_key(), "prod", b"real-key", &[2u8; 12]).unwrap();
        assert!(sealed.starts_with(SEALED));
        RawUpstreamKey {
            id: "prod".to_string(),
            sealed,
        }
    }

    fn save(s: &mut PolicyStore, base: &Base, p: &mut RawPolicy) -> Saved {
        s.save(base, p, None).unwrap()
    }

    #[test]
    fn the_layout_round_trips_and_only_differences_are_written() {
        let fake = Fake::default();
        let mut s = store(&fake, "sk/");
        let mut p = empty();
        p.upstream_keys.push(sealed_key());
        p.tokens.push(token("zed"));
        p.tokens.push(token("amy"));
        assert_eq!(
            save(&mut s, &Base(Some(BTreeMap::new()), None), &mut p),
            Saved::Written { steps: 1 }
        );
        {
            let f = fake.0.borrow();
            let keys: Vec<_> = f
                .kvs
                .keys()
                .map(|k| String::from_utf8(k.clone()).unwrap())
                .collect();
            assert_eq!(
                keys,
                [
                    "sk/policy/keys/prod",
                    "sk/policy/settings",
                    "sk/policy/tokens/amy",
                    "sk/policy/tokens/zed"
                ]
            );
            assert_eq!(
                f.kvs[&b"sk/policy/settings".to_vec()].0,
                br#"{"version":1,"revision":1,"upstream_keys":[],"tokens":[]}"#
            );
        }
        let loaded = s.load().unwrap();
        assert_eq!(loaded.policy.revision, 1);
        assert_eq!(
            loaded
                .policy
                .tokens
                .iter()
                .map(|t| t.id.as_str())
                .collect::<Vec<_>>(),
            ["amy", "zed"]
        );

        // Revoking one token writes that token and the settings, nothing else.
        let mut p = loaded.policy;
        p.tokens[1].status = RawStatus::Revoked;
        let before = fake.0.borrow().calls.len();
        save(&mut s, &loaded.base, &mut p);
        let f = fake.0.borrow();
        let (_, txn) = &f.calls[before];
        let written: Vec<_> = txn["success"]
            .as_array()
            .unwrap()
            .iter()
            .map(|op| op["request_put"]["key"].as_str().unwrap().to_string())
            .collect();
        let b = |k: &str| base64::Engine::encode(&base64::engine::general_purpose::STANDARD, k);
        assert_eq!(
            written,
            [b("sk/policy/tokens/zed"), b("sk/policy/settings")]
        );
    }

    #[test]
    fn a_value_written_differently_but_equal_is_not_rewritten() {
        let fake = Fake::default();
        let mut s = store(&fake, "sk/");
        let mut p = empty();
        p.upstream_keys.push(sealed_key());
        p.tokens.push(token("amy"));
        save(&mut s, &Base(Some(BTreeMap::new()), None), &mut p);
        // Another tool wrote amy with spaces and an explicit default status.
        let digest = &p.tokens[0].digest;
        let text = format!(
            r#"{{ "id": "amy", "digest": "{digest}", "upstream_key": "prod", "status": "active" }}"#
        );
        fake.0
            .borrow_mut()
            .put(b"sk/policy/tokens/amy", text.as_bytes());
        let loaded = s.load().unwrap();
        let PolicyStore::Etcd(e) = &s else { panic!() };
        let (changes, _) = e
            .plan(loaded.base.0.as_ref().unwrap(), &loaded.policy)
            .unwrap();
        assert!(changes.is_empty(), "{changes:?}");
    }

    #[test]
    fn removals_come_after_puts_tokens_before_keys() {
        let fake = Fake::default();
        let mut s = store(&fake, "sk/");
        let mut p = empty();
        p.upstream_keys.push(sealed_key());
        p.tokens.push(token("amy"));
        save(&mut s, &Base(Some(BTreeMap::new()), None), &mut p);
        let loaded = s.load().unwrap();
        let mut p = loaded.policy;
        p.tokens.clear();
        p.upstream_keys.clear();
        let mut other = sealed_key();
        other.id = "next".into();
        // Same sealed text under another id: the form check passes without the master key.
        p.upstream_keys.push(other);
        let PolicyStore::Etcd(e) = &s else { panic!() };
        let (changes, settings) = e.plan(loaded.base.0.as_ref().unwrap(), &p).unwrap();
        let order: Vec<_> = changes
            .iter()
            .map(|c| (String::from_utf8(c.key.clone()).unwrap(), c.value.is_some()))
            .collect();
        assert_eq!(
            order,
            [
                ("sk/policy/keys/next".to_string(), true),
                ("sk/policy/tokens/amy".to_string(), false),
                ("sk/policy/keys/prod".to_string(), false),
            ]
        );
        assert_eq!(settings.key, b"sk/policy/settings");
        assert!(settings.seen > 0);
    }

    #[test]
    fn unexpected_or_inconsistent_keys_are_refused_naming_the_key() {
        let fake = Fake::default();
        let mut s = store(&fake, "sk/");
        fake.0
            .borrow_mut()
            .put(b"sk/policy/settings", br#"{"version":1,"revision":4}"#);
        assert_eq!(s.load().unwrap().policy.revision, 4);
        fake.0.borrow_mut().put(
            b"sk/policy/tokens/bob",
            br#"{"id":"bob","digest":"x","upstream_key":"p","colour":"blue"}"#,
        );
        let e = s.load().err().unwrap().to_string();
        assert!(
            e.contains("sk/policy/tokens/bob") && e.contains("colour"),
            "{e}"
        );
        fake.0.borrow_mut().put(
            b"sk/policy/tokens/bob",
            br#"{"id":"rob","digest":"x","upstream_key":"p"}"#,
        );
        let e = s.load().err().unwrap().to_string();
        assert!(e.contains("its id is 'rob'"), "{e}");
        fake.0
            .borrow_mut()
            .kvs
            .remove(b"sk/policy/tokens/bob".as_slice());
        fake.0.borrow_mut().put(b"sk/policy/extra", b"{}");
        assert!(s
            .load()
            .err()
            .unwrap()
            .to_string()
            .contains("unexpected etcd key sk/policy/extra"));
        fake.0
            .borrow_mut()
            .kvs
            .remove(b"sk/policy/extra".as_slice());
        fake.0.borrow_mut().put(
            b"sk/policy/settings",
            br#"{"version":1,"tokens":[{"id":"a"}]}"#,
        );
        assert!(s
            .load()
            .err()
            .unwrap()
            .to_string()
            .contains("tokens must be empty"));
        fake.0.borrow_mut().kvs.clear();
        assert!(s
            .load()
            .err()
            .unwrap()
            .to_string()
            .contains("shieldkey init"));
    }

    #[test]
    fn validation_errors_name_the_etcd_key_and_nothing_is_written() {
        let fake = Fake::default();
        let mut s = store(&fake, "sk/");
        let mut p = empty();
        p.upstream_keys.push(sealed_key());
        p.tokens.push(token("amy"));
        let mut bad = token("bob");
        bad.upstream_key = "nope".into();
        p.tokens.push(bad);
        let e = s
            .save(&Base(Some(BTreeMap::new()), None), &mut p, None)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("tokens[1].upstream_key (etcd key sk/policy/tokens/bob)"),
            "{e}"
        );
        assert!(fake.0.borrow().kvs.is_empty());
        assert!(fake.0.borrow().calls.is_empty());
    }

    #[test]
    fn the_whole_scope_reads_every_token() {
        let fake = Fake::default();
        let mut s = store(&fake, "sk/");
        let mut p = empty();
        p.upstream_keys.push(sealed_key());
        p.tokens.push(token("amy"));
        p.tokens.push(token("zed"));
        save(&mut s, &Base(Some(BTreeMap::new()), None), &mut p);
        let ids = |scope: Scope, s: &mut PolicyStore| -> Vec<String> {
            let loaded = s.load_scoped(&scope).unwrap();
            assert_eq!(loaded.policy.upstream_keys.len(), 1);
            loaded.policy.tokens.into_iter().map(|t| t.id).collect()
        };
        assert_eq!(ids(Scope::Whole, &mut s), ["amy", "zed"]);
        assert_eq!(ids(Scope::Token("zed".into()), &mut s), ["zed"]);
        assert!(ids(Scope::NoTokens, &mut s).is_empty());
    }

    fn team(id: &str) -> RawTeam {
        RawTeam {
            id: id.to_string(),
            ..RawTeam::default()
        }
    }

    fn key_names(fake: &Fake) -> Vec<String> {
        fake.0
            .borrow()
            .kvs
            .keys()
            .map(|k| String::from_utf8(k.clone()).unwrap())
            .collect()
    }

    #[test]
    fn teams_have_a_key_each_and_every_scope_reads_them() {
        let fake = Fake::default();
        let mut s = store(&fake, "sk/");
        let mut p = empty();
        p.upstream_keys.push(sealed_key());
        p.teams.push(team("ops"));
        let mut eng = team("eng");
        eng.enforce = Some(false);
        eng.description = Some("Engineering".into());
        p.teams.push(eng.clone());
        let mut amy = token("amy");
        amy.team = Some("eng".into());
        p.tokens.push(amy);
        p.tokens.push(token("zed"));
        p.enforce = Some(false);
        save(&mut s, &Base(Some(BTreeMap::new()), None), &mut p);
        assert_eq!(
            key_names(&fake),
            [
                "sk/policy/keys/prod",
                "sk/policy/settings",
                "sk/policy/teams/eng",
                "sk/policy/teams/ops",
                "sk/policy/tokens/amy",
                "sk/policy/tokens/zed"
            ]
        );
        {
            let f = fake.0.borrow();
            // The settings carry the policy-wide enforce but never the teams.
            assert_eq!(
                f.kvs[&b"sk/policy/settings".to_vec()].0,
                br#"{"version":1,"revision":1,"upstream_keys":[],"tokens":[],"enforce":false}"#
            );
            let stored: RawTeam =
                serde_json::from_slice(&f.kvs[&b"sk/policy/teams/eng".to_vec()].0).unwrap();
            assert_eq!(stored, eng);
        }
        for scope in [
            Scope::Whole,
            Scope::NoTokens,
            Scope::Token("amy".into()),
            Scope::Token("nobody".into()),
        ] {
            let loaded = s.load_scoped(&scope).unwrap();
            let ids: Vec<_> = loaded.policy.teams.iter().map(|t| t.id.as_str()).collect();
            assert_eq!(ids, ["eng", "ops"], "{scope:?}: sorted by id");
            assert_eq!(loaded.policy.enforce, Some(false));
        }

        // A token-scoped change is validated against every team: naming a missing one fails,
        // naming the key of the token, and writes nothing.
        let loaded = s.load_scoped(&Scope::Token("zed".into())).unwrap();
        let mut p = loaded.policy;
        assert_eq!(p.tokens.len(), 1);
        p.tokens[0].team = Some("ghost".into());
        let calls = fake.0.borrow().calls.len();
        let e = s
            .save(&loaded.base, &mut p, None)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("tokens[0].team (etcd key sk/policy/tokens/zed): no team with id 'ghost'"),
            "{e}"
        );
        assert_eq!(fake.0.borrow().calls.len(), calls);
        // Naming an existing one goes through, writing that token and the settings only.
        let loaded = s.load_scoped(&Scope::Token("zed".into())).unwrap();
        let mut p = loaded.policy;
        p.tokens[0].team = Some("ops".into());
        let before = fake.0.borrow().kvs.clone();
        save(&mut s, &loaded.base, &mut p);
        let f = fake.0.borrow();
        let changed: Vec<_> = f
            .kvs
            .iter()
            .filter(|(k, v)| before.get(*k) != Some(v))
            .map(|(k, _)| String::from_utf8(k.clone()).unwrap())
            .collect();
        assert_eq!(changed, ["sk/policy/settings", "sk/policy/tokens/zed"]);
    }

    #[test]
    fn teams_are_written_before_their_members_and_removed_after() {
        let fake = Fake::default();
        let mut s = store(&fake, "sk/");
        let mut p = empty();
        p.upstream_keys.push(sealed_key());
        p.teams.push(team("old"));
        let mut amy = token("amy");
        amy.team = Some("old".into());
        p.tokens.push(amy);
        save(&mut s, &Base(Some(BTreeMap::new()), None), &mut p);
        let loaded = s.load().unwrap();
        // Move amy to a new team and remove the old one, in one change.
        let mut p = loaded.policy;
        p.teams = vec![team("new")];
        p.tokens[0].team = Some("new".into());
        let PolicyStore::Etcd(e) = &s else { panic!() };
        let (changes, _) = e.plan(loaded.base.0.as_ref().unwrap(), &p).unwrap();
        let order: Vec<_> = changes
            .iter()
            .map(|c| (String::from_utf8(c.key.clone()).unwrap(), c.value.is_some()))
            .collect();
        assert_eq!(
            order,
            [
                ("sk/policy/teams/new".to_string(), true),
                ("sk/policy/tokens/amy".to_string(), true),
                ("sk/policy/teams/old".to_string(), false),
            ]
        );
        // Removing a team still named by a token is refused by validation, naming the token.
        let mut p = s.load().unwrap().policy;
        p.teams.clear();
        let e = s
            .save(&Base(Some(BTreeMap::new()), None), &mut p, None)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("(etcd key sk/policy/tokens/amy)"), "{e}");
    }

    #[test]
    fn inconsistent_team_keys_and_teams_in_the_settings_are_refused() {
        let fake = Fake::default();
        let mut s = store(&fake, "sk/");
        fake.0
            .borrow_mut()
            .put(b"sk/policy/settings", br#"{"version":1,"revision":2}"#);
        fake.0
            .borrow_mut()
            .put(b"sk/policy/teams/eng", br#"{"id":"ops"}"#);
        let e = s.load().err().unwrap().to_string();
        assert!(
            e.contains("sk/policy/teams/eng") && e.contains("its id is 'ops'"),
            "{e}"
        );
        fake.0
            .borrow_mut()
            .put(b"sk/policy/teams/eng", br#"{"id":"eng","colour":"blue"}"#);
        let e = s.load_scoped(&Scope::NoTokens).err().unwrap().to_string();
        assert!(
            e.contains("sk/policy/teams/eng") && e.contains("colour"),
            "{e}"
        );
        fake.0
            .borrow_mut()
            .kvs
            .remove(b"sk/policy/teams/eng".as_slice());
        fake.0.borrow_mut().put(
            b"sk/policy/settings",
            br#"{"version":1,"teams":[{"id":"eng"}]}"#,
        );
        let e = s.load().err().unwrap().to_string();
        assert!(
            e.contains("teams must be empty") && e.contains("policy/teams/"),
            "{e}"
        );

        // A team the filter refuses names its etcd key.
        fake.0
            .borrow_mut()
            .put(b"sk/policy/settings", br#"{"version":1,"revision":2}"#);
        let mut p = s.load().unwrap().policy;
        let mut bad = team("eng");
        bad.source_cidrs = Some(vec!["10.0.0.0/33".into()]);
        p.teams.push(bad);
        let e = s
            .save(&Base(Some(BTreeMap::new()), None), &mut p, None)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("teams[0].source_cidrs (etcd key sk/policy/teams/eng)"),
            "{e}"
        );
    }

    #[test]
    fn prefixes_are_checked() {
        for good in ["shieldkey/", "a/", "prod/eu-1/"] {
            assert!(check_prefix(good).is_ok(), "{good}");
        }
        for bad in ["", "shieldkey", "with space/", "é/"] {
            assert!(check_prefix(bad).is_err(), "{bad}");
        }
    }
}
