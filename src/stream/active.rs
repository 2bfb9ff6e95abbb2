//! What every request of one configuration shares: the compiled policy, the token verifier, the
//! stats, and this worker's cache of token records read from shared data.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use super::host::{Host, LogLevel};
use super::metrics::{MetricIds, Metrics};
use crate::config::compile::{self, TokenCompiler};
use crate::config::compile::{compile, CompileOptions};
use crate::config::source::PolicySource;
use crate::config::token_stream::{self, Head};
use crate::config::ConfigError;
use crate::fleet::FleetSettings;
use crate::ledger::{Ledger, SharedDataLedger};
use crate::master_key::MasterKey;
use crate::policy::{Policy, TokenPolicy};
use crate::policy_store::{self, Publisher, Started};
use crate::token_digest::TokenVerifier;
use crate::token_record;
use crate::verified_secrets::RememberingVerifier;

/// A decoded token record and the shared-data version it was decoded from.
type VersionedRecord = (u32, Rc<TokenPolicy>);

pub struct Active {
    pub policy: Policy,
    /// The shared-data generation this configuration reads its token records at.
    generation: u64,
    /// Remembers the secrets that verified on this worker (`verified_secrets.rs`).
    pub verifier: RememberingVerifier,
    pub metrics: Metrics,
    /// Records of this configuration already read from shared data by this worker. Records of
    /// one configuration never change (a policy change is a new configuration), so the cache
    /// needs no invalidation; it holds at most the tokens that were actually used.
    tokens: RefCell<HashMap<String, Rc<TokenPolicy>>>,
    /// Fleet mode: records change in place as the syncer follows etcd, so every request reads
    /// the record; the decoded one is reused while its shared-data version is unchanged.
    fleet_records: Option<RefCell<HashMap<String, VersionedRecord>>>,
    fleet: Option<FleetContext>,
}

/// Fleet mode: where the etcd cluster is and who this Envoy is (its budget leases are its own).
#[derive(Debug, Clone)]
pub struct FleetContext {
    pub settings: FleetSettings,
    /// Envoy's `node.id`: unique per Envoy in a fleet.
    pub node: String,
}

impl Active {
    pub fn new(policy: Policy, generation: u64, verifier: TokenVerifier, metrics: Metrics) -> Self {
        Active {
            policy,
            generation,
            verifier: RememberingVerifier::new(verifier),
            metrics,
            tokens: RefCell::new(HashMap::new()),
            fleet_records: None,
            fleet: None,
        }
    }

    pub fn fleet_context(&self) -> Option<&FleetContext> {
        self.fleet.as_ref()
    }

    /// Fleet mode: the policy-wide part from the base document the syncer wrote (`base`: a
    /// `RawPolicy` with settings and sealed upstream keys, no tokens); token records are read
    /// from shared data on every request.
    pub fn from_fleet_base(
        host: &dyn Host,
        base: &[u8],
        master: &MasterKey,
        ids: &Rc<MetricIds>,
        context: FleetContext,
    ) -> Result<Active, ConfigError> {
        let head = Head {
            policy: crate::config::raw::parse(base)?,
            fingerprint: crate::config::compile::fingerprint(base),
        };
        let (policy, verifier) = compile_opened(&head, master)?;
        let mut active = Active::new(policy, 0, verifier, Metrics::define(host, ids));
        active.fleet_records = Some(RefCell::new(HashMap::new()));
        active.fleet = Some(context);
        Ok(active)
    }

    /// Compiles a configuration (`head`: `config` without its tokens, `token_stream::parse_head`),
    /// publishes its token records into shared data and creates their counters: what every root
    /// context does in `on_configure`. Tokens are read from `config` one at a time and kept only
    /// as their encoded records until all of them compiled (a configuration with an invalid token
    /// writes nothing); a root context that finds the configuration published already reads none.
    pub fn load(
        host: &dyn Host,
        config: &dyn PolicySource,
        head: &Head,
        master: &MasterKey,
        ids: &Rc<MetricIds>,
        started_ms: Option<i64>,
    ) -> Result<Active, ConfigError> {
        // The load time logged includes reading the document's head when the caller says when
        // that began.
        let started_ms = started_ms.or_else(|| host.now_unix_ms());
        let (mut policy, verifier) = compile_opened(head, master)?;
        let shared = |e: crate::store::StoreError| {
            ConfigError::at(
                ".",
                format!("cannot publish the policy into shared data: {e:?}"),
            )
        };
        let store = host.store();
        let (publication, counts) =
            match Publisher::start(store, &policy.fingerprint).map_err(shared)? {
                Started::AlreadyPublished(publication) => (publication, None),
                Started::Publishing(mut publisher) => {
                    let counts = publish_tokens(store, config, &policy, &mut publisher)?;
                    (publisher.finish().map_err(shared)?, Some(counts))
                }
            };
        // Once in shared data, the teams are not needed in every worker's memory.
        policy.teams = Vec::new();
        // One root context per configuration writes; the others find the records there.
        let level = if publication.written > 0 {
            LogLevel::Info
        } else {
            LogLevel::Debug
        };
        // Load time (parse, compile, open keys, publish) tells operators what a policy's size
        // costs.
        let took_ms = started_ms
            .zip(host.now_unix_ms())
            .map_or(-1, |(start, end)| end - start);
        let what = match counts {
            Some(c) => format!(
                "{} records written): {} tokens ({} revoked), {} teams",
                publication.written, c.tokens, c.revoked, c.teams
            ),
            None => "records published by another root context)".to_string(),
        };
        host.log(
            level,
            &format!(
                "shieldkey: policy revision {} loaded (fingerprint {}, generation {}, {what}, {} upstream keys, in {} ms",
                policy.revision,
                policy.fingerprint,
                publication.generation,
                policy.upstream_keys.len(),
                took_ms
            ),
        );
        let metrics = Metrics::define(host, ids);
        Ok(Active::new(
            policy,
            publication.generation,
            verifier,
            metrics,
        ))
    }

    pub fn token(&self, host: &dyn Host, id: &str) -> Option<Rc<TokenPolicy>> {
        if let Some(cache) = &self.fleet_records {
            let (bytes, cas) = host.store().get(&policy_store::record_key(id))?;
            if let Some((seen, token)) = cache.borrow().get(id) {
                if *seen == cas {
                    return Some(token.clone());
                }
            }
            let token = Rc::new(policy_store::decode_newest(&bytes, id)?);
            cache
                .borrow_mut()
                .insert(id.to_string(), (cas, token.clone()));
            return Some(token);
        }
        if let Some(t) = self.tokens.borrow().get(id) {
            return Some(t.clone());
        }
        let record = Rc::new(policy_store::lookup(host.store(), self.generation, id)?);
        self.tokens
            .borrow_mut()
            .insert(id.to_string(), record.clone());
        Some(record)
    }

    pub fn ledger<'h>(&self, host: &'h dyn Host) -> SharedDataLedger<'h> {
        match self.fleet {
            Some(_) => SharedDataLedger::fleet(host.store()),
            None => SharedDataLedger::new(host.store()),
        }
    }
}

struct Counts {
    tokens: usize,
    revoked: usize,
    teams: usize,
}

/// Compiles every token of `config` (one at a time) and the policy's teams, then writes their
/// records: all or nothing, so an invalid token leaves shared data as it was. Creates the
/// counters of those with limits.
fn publish_tokens(
    store: &dyn crate::store::SharedStore,
    config: &dyn PolicySource,
    policy: &Policy,
    publisher: &mut Publisher<'_>,
) -> Result<Counts, ConfigError> {
    let key_index = compile::key_index(policy);
    let team_index = compile::team_index(policy);
    let mut compiler = TokenCompiler::new(&key_index, &team_index);
    let ledger = SharedDataLedger::new(store);
    let counters = |e: crate::store::StoreError| {
        ConfigError::at(".", format!("cannot create counters in shared data: {e:?}"))
    };
    // Encoded records only: a few dozen bytes a token, instead of the parsed and compiled forms;
    // and whether the token (or team) has counters.
    let mut records: Vec<(String, Vec<u8>, bool)> = Vec::new();
    let mut revoked = 0;
    let tokens = token_stream::for_each_token(config, &mut |i, raw| {
        let token = compiler.compile(i, &raw)?;
        revoked += usize::from(token.revoked);
        let tracked = token.rules.limits.is_tracked();
        records.push((token.id.clone(), token_record::encode(&token), tracked));
        Ok(())
    })?;
    records.extend(policy.teams.iter().map(|t| {
        let tracked = t.rules.limits.is_tracked();
        (t.id.clone(), token_record::encode(t), tracked)
    }));
    for (id, record, tracked) in records {
        // Counters are keyed by token id, not by configuration: they survive reloads. Creating
        // them before the record lets every request-time update be a compare-and-swap. Only a
        // new or changed record needs it (counters are never removed): a revocation at 100,000
        // tokens reads each record once, not each record and each token's counters.
        let mut counters_failed = false;
        let mut ensure_counters = || match tracked {
            true => ledger.ensure(&id).inspect_err(|_| counters_failed = true),
            false => Ok(()),
        };
        let published = publisher.put_record_then(&id, &record, &mut ensure_counters);
        published.map_err(|e| match counters_failed {
            true => counters(e),
            false => ConfigError::at(
                ".",
                format!("cannot publish the policy into shared data: {e:?}"),
            ),
        })?;
    }
    Ok(Counts {
        tokens,
        revoked,
        teams: policy.teams.len(),
    })
}

/// Compiles a configuration with its upstream keys opened, and the token verifier of its
/// master key.
fn compile_opened(head: &Head, master: &MasterKey) -> Result<(Policy, TokenVerifier), ConfigError> {
    let policy = compile(
        &head.policy,
        head.fingerprint.clone(),
        &CompileOptions {
            master_key: Some(master),
        },
    )?;
    let verifier = TokenVerifier::new(master.digest_key())
        .ok_or_else(|| ConfigError::at("master_key_env", "cannot derive the token digest key"))?;
    Ok((policy, verifier))
}
