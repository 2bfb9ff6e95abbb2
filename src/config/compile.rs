//! Validation and compilation of a raw policy into a `Policy`.

use std::collections::HashMap;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;

use super::error::ConfigError;
use super::raw::{RawPolicy, RawStatus, RawToken, POLICY_FORMAT_VERSION};
use super::settings::compile_settings;
use super::token_rules::compile_rules;
use crate::master_key::{MasterKey, DEFAULT_MASTER_KEY_ENV};
use crate::policy::{Policy, TokenPolicy, UpstreamKey};
use crate::secret::SecretBytes;
use crate::{seal, time, token};

pub const MAX_UPSTREAM_KEYS: usize = 256;

#[derive(Default)]
pub struct CompileOptions<'a> {
    /// With the master key every sealed upstream key is opened (and must open). Without it only
    /// the sealed form is checked: that is the CLI's offline `check`.
    pub master_key: Option<&'a MasterKey>,
}

/// Parses and compiles configuration bytes.
pub fn compile_bytes(json: &[u8], opts: &CompileOptions<'_>) -> Result<Policy, ConfigError> {
    let raw = super::raw::parse(json)?;
    compile(&raw, fingerprint(json), opts)
}

/// A short, stable identity of the configuration bytes.
pub fn fingerprint(json: &[u8]) -> String {
    super::source::Fingerprint::of(json)
}

pub fn compile(
    raw: &RawPolicy,
    fingerprint: String,
    opts: &CompileOptions<'_>,
) -> Result<Policy, ConfigError> {
    if raw.version != POLICY_FORMAT_VERSION {
        return Err(ConfigError::at(
            "version",
            format!(
                "unsupported policy version {} (expected {POLICY_FORMAT_VERSION})",
                raw.version
            ),
        ));
    }
    let master_key_env = match &raw.master_key_env {
        None => DEFAULT_MASTER_KEY_ENV.to_string(),
        Some(name) => {
            let ok =
                !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !ok {
                return Err(ConfigError::at(
                    "master_key_env",
                    "must be an environment variable name",
                ));
            }
            name.clone()
        }
    };

    if raw.upstream_keys.len() > MAX_UPSTREAM_KEYS {
        return Err(ConfigError::at(
            "upstream_keys",
            format!("at most {MAX_UPSTREAM_KEYS} keys"),
        ));
    }
    let mut upstream_keys = Vec::with_capacity(raw.upstream_keys.len());
    let mut key_index: HashMap<&str, u16> = HashMap::new();
    for (i, key) in raw.upstream_keys.iter().enumerate() {
        let path = format!("upstream_keys[{i}]");
        token::validate_id(&key.id).map_err(|m| ConfigError::at(format!("{path}.id"), m))?;
        let index = u16::try_from(i).map_err(|_| ConfigError::at(&path, "too many keys"))?;
        if key_index.insert(key.id.as_str(), index).is_some() {
            return Err(ConfigError::at(
                format!("{path}.id"),
                format!("duplicate upstream key id '{}'", key.id),
            ));
        }
        let authorization = match opts.master_key {
            None => {
                seal::check_format(&key.sealed)
                    .map_err(|e| ConfigError::at(format!("{path}.sealed"), e.to_string()))?;
                None
            }
            Some(master) => {
                let opened = seal::open(master.seal_key(), &key.id, &key.sealed)
                    .map_err(|e| ConfigError::at(format!("{path}.sealed"), e.to_string()))?;
                let mut header = Vec::with_capacity(7 + opened.len());
                header.extend_from_slice(b"Bearer ");
                header.extend_from_slice(opened.expose());
                Some(SecretBytes::new(header))
            }
        };
        upstream_keys.push(UpstreamKey {
            id: key.id.clone(),
            authorization,
        });
    }

    let (teams, team_index) = crate::team::compile_teams(&raw.teams)?;
    let mut compiler = TokenCompiler::new(&key_index, &team_index);
    let mut tokens = Vec::with_capacity(raw.tokens.len());
    for (i, t) in raw.tokens.iter().enumerate() {
        tokens.push(compiler.compile(i, t)?);
    }

    Ok(Policy {
        revision: raw.revision,
        fingerprint,
        master_key_env,
        upstream_keys,
        tokens,
        teams,
        settings: compile_settings(raw)?,
    })
}

/// The upstream keys of a compiled policy by id, as tokens name them.
pub fn key_index(policy: &Policy) -> HashMap<&str, u16> {
    policy
        .upstream_keys
        .iter()
        .enumerate()
        .filter_map(|(i, k)| Some((k.id.as_str(), u16::try_from(i).ok()?)))
        .collect()
}

/// The teams of a compiled policy by team id.
pub fn team_index(policy: &Policy) -> HashMap<String, usize> {
    policy
        .teams
        .iter()
        .enumerate()
        .filter_map(|(i, t)| Some((crate::team::team_of_subject(&t.id)?.to_string(), i)))
        .collect()
}

/// Compiles the tokens of one policy, one at a time, checking what spans tokens: unique ids, and
/// that each names an upstream key and a team the policy has. Used on a whole `RawPolicy`
/// (`compile`) and on tokens read one by one (`config::token_stream`).
pub struct TokenCompiler<'p> {
    key_index: &'p HashMap<&'p str, u16>,
    team_index: &'p HashMap<String, usize>,
    seen: HashMap<String, usize>,
}

impl<'p> TokenCompiler<'p> {
    pub fn new(
        key_index: &'p HashMap<&'p str, u16>,
        team_index: &'p HashMap<String, usize>,
    ) -> Self {
        TokenCompiler {
            key_index,
            team_index,
            seen: HashMap::new(),
        }
    }

    /// Compiles `tokens[i]`.
    pub fn compile(&mut self, i: usize, t: &RawToken) -> Result<TokenPolicy, ConfigError> {
        let path = format!("tokens[{i}]");
        token::validate_id(&t.id).map_err(|m| ConfigError::at(format!("{path}.id"), m))?;
        if let Some(first) = self.seen.insert(t.id.clone(), i) {
            return Err(ConfigError::at(
                format!("{path}.id"),
                format!("duplicate token id '{}' (first at tokens[{first}])", t.id),
            ));
        }
        if let Some(team) = &t.team {
            if !self.team_index.contains_key(team) {
                return Err(ConfigError::at(
                    format!("{path}.team"),
                    format!("no team with id '{team}'"),
                ));
            }
        }
        compile_token(t, self.key_index, &path)
    }
}

/// Compiles one token against the upstream keys of its policy (`key_index`: id → index). `path`
/// names the token in errors (`tokens[3]`, or its etcd key in fleet mode).
pub fn compile_token(
    t: &RawToken,
    key_index: &HashMap<&str, u16>,
    path: &str,
) -> Result<TokenPolicy, ConfigError> {
    token::validate_id(&t.id).map_err(|m| ConfigError::at(format!("{path}.id"), m))?;
    let digest =
        parse_digest(&t.digest).map_err(|m| ConfigError::at(format!("{path}.digest"), m))?;
    let upstream_key = *key_index.get(t.upstream_key.as_str()).ok_or_else(|| {
        ConfigError::at(
            format!("{path}.upstream_key"),
            format!("no upstream key with id '{}'", t.upstream_key),
        )
    })?;
    let not_before = parse_time(t.not_before.as_deref(), &format!("{path}.not_before"))?;
    let expires_at = parse_time(t.expires_at.as_deref(), &format!("{path}.expires_at"))?;
    if let (Some(nbf), Some(exp)) = (not_before, expires_at) {
        if exp <= nbf {
            return Err(ConfigError::at(
                format!("{path}.expires_at"),
                "must be after not_before",
            ));
        }
    }
    let owner = t.owner.clone().unwrap_or_default();
    if owner.len() > 256 {
        return Err(ConfigError::at(
            format!("{path}.owner"),
            "at most 256 bytes",
        ));
    }
    Ok(TokenPolicy {
        id: t.id.clone(),
        digest,
        upstream_key,
        owner,
        revoked: t.status == RawStatus::Revoked,
        not_before,
        expires_at,
        team: t
            .team
            .as_deref()
            .map(|team| {
                crate::team::validate_id(team)
                    .map(|()| crate::team::subject_id(team))
                    .map_err(|m| ConfigError::at(format!("{path}.team"), m))
            })
            .transpose()?,
        rules: compile_rules(&t.rules(), path)?,
    })
}

fn parse_digest(text: &str) -> Result<[u8; 32], String> {
    let bytes = STANDARD
        .decode(text)
        .map_err(|_| "not valid base64".to_string())?;
    bytes
        .try_into()
        .map_err(|v: Vec<u8>| format!("must be 32 bytes, got {}", v.len()))
}

fn parse_time(text: Option<&str>, path: &str) -> Result<Option<i64>, ConfigError> {
    text.map(|t| time::parse_rfc3339(t).map_err(|m| ConfigError::at(path, m)))
        .transpose()
}
