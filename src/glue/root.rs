//! The root context: compiles the plugin configuration once per `on_configure`, publishes the
//! per-token records into shared data, hands every HTTP context a shared, read-only view, and
//! delivers budget alerts to the optional webhook.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{ContextType, LogLevel};

use super::host::{self, log};
use super::host_store::HostStore;
use super::http::ShieldHttp;
use super::metrics::Metrics;
use crate::alert::BudgetAlert;
use crate::config::compile::{compile, fingerprint, CompileOptions};
use crate::config::{raw, ConfigError};
use crate::ledger::{Ledger, SharedDataLedger};
use crate::master_key::{MasterKey, DEFAULT_MASTER_KEY_ENV};
use crate::policy::{Policy, TokenPolicy};
use crate::policy_store::{self, Published};
use crate::token_digest::TokenVerifier;

const ALERT_QUEUE: &str = "shieldkey.alerts";
/// Alerts sent per tick and worker: a flood of alerts must not starve the worker.
const ALERTS_PER_TICK: usize = 16;

/// What every request of one configuration shares.
pub struct Active {
    pub policy: Policy,
    pub verifier: TokenVerifier,
    pub metrics: Metrics,
    /// Records of this configuration already read from shared data by this worker. Records of
    /// one configuration never change (a policy change is a new configuration), so the cache
    /// needs no invalidation; it holds at most the tokens that were actually used.
    tokens: RefCell<HashMap<String, Rc<TokenPolicy>>>,
    alert_queue: Option<u32>,
}

impl Active {
    pub fn token(&self, id: &str) -> Option<Rc<TokenPolicy>> {
        if let Some(t) = self.tokens.borrow().get(id) {
            return Some(t.clone());
        }
        let record = Rc::new(policy_store::lookup(
            &HostStore,
            &self.policy.fingerprint,
            id,
        )?);
        self.tokens
            .borrow_mut()
            .insert(id.to_string(), record.clone());
        Some(record)
    }

    pub fn ledger(&self) -> SharedDataLedger<'static> {
        SharedDataLedger::new(&HostStore)
    }

    pub fn queue_alert(&self, alert: &BudgetAlert) {
        if let Some(queue) = self.alert_queue {
            let _ = hostcalls::enqueue_shared_queue(queue, Some(&alert.webhook_body()));
        }
    }
}

#[derive(Default)]
pub struct ShieldRoot {
    active: Option<Rc<Active>>,
}

impl Context for ShieldRoot {
    fn on_http_call_response(
        &mut self,
        _token: u32,
        _headers: usize,
        _body: usize,
        _trailers: usize,
    ) {
        let status = hostcalls::get_map_value(
            proxy_wasm::types::MapType::HttpCallResponseHeaders,
            ":status",
        )
        .ok()
        .flatten();
        if status.as_deref().is_none_or(|s| !s.starts_with('2')) {
            if let Some(active) = &self.active {
                active.metrics.webhook_failed();
            }
            log(
                LogLevel::Warn,
                &format!(
                    "shieldkey: budget alert webhook failed (status {})",
                    status.as_deref().unwrap_or("none")
                ),
            );
        }
    }
}

impl RootContext for ShieldRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        match configure() {
            Ok(active) => {
                if active.alert_queue.is_some() {
                    let _ = hostcalls::set_tick_period(Duration::from_millis(500));
                }
                self.active = Some(Rc::new(active));
                true
            }
            Err(e) => {
                // The message names the field; it never contains a secret (seal/token errors are
                // fixed strings, and parse errors only echo field names and types).
                log(
                    LogLevel::Error,
                    &format!("shieldkey: configuration rejected: {e}"),
                );
                false
            }
        }
    }

    fn on_tick(&mut self) {
        let Some(active) = &self.active else { return };
        let (Some(queue), Some(hook)) = (active.alert_queue, &active.policy.settings.webhook)
        else {
            return;
        };
        for _ in 0..ALERTS_PER_TICK {
            let Ok(Some(body)) = hostcalls::dequeue_shared_queue(queue) else {
                break;
            };
            let headers = vec![
                (":method", "POST"),
                (":path", hook.path.as_str()),
                (":authority", hook.authority.as_str()),
                ("content-type", "application/json"),
            ];
            // Failures are logged and counted, never retried into the request path.
            if hostcalls::dispatch_http_call(
                &hook.cluster,
                headers,
                Some(&body),
                vec![],
                Duration::from_millis(hook.timeout_ms),
            )
            .is_err()
            {
                active.metrics.webhook_failed();
                log(
                    LogLevel::Warn,
                    &format!(
                        "shieldkey: cannot call the budget alert webhook cluster '{}'",
                        hook.cluster
                    ),
                );
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(ShieldHttp::new(self.active.clone())))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

fn configure() -> Result<Active, ConfigError> {
    let started_ms = host::now_unix_ms();
    let bytes = host::plugin_configuration()
        .ok_or_else(|| ConfigError::at(".", "the filter needs a plugin configuration"))?;
    let raw = raw::parse(&bytes)?;
    let env_name = raw
        .master_key_env
        .as_deref()
        .unwrap_or(DEFAULT_MASTER_KEY_ENV);
    let master_text = std::env::var(env_name).map_err(|_| {
        ConfigError::at(
            "master_key_env",
            format!(
                "environment variable {env_name} is not visible to the filter; pass it with \
                 vm_config.environment_variables.host_env_keys"
            ),
        )
    })?;
    let master = MasterKey::from_base64(&master_text)
        .map_err(|e| ConfigError::at("master_key_env", format!("{env_name}: {e}")))?;
    drop(master_text);
    let mut policy = compile(
        &raw,
        fingerprint(&bytes),
        &CompileOptions {
            master_key: Some(&master),
        },
    )?;
    let verifier = TokenVerifier::new(master.digest_key())
        .ok_or_else(|| ConfigError::at("master_key_env", "cannot derive the token digest key"))?;

    let published = policy_store::publish(&HostStore, &policy).map_err(|e| {
        ConfigError::at(
            ".",
            format!("cannot publish the policy into shared data: {e:?}"),
        )
    })?;
    // Counters are keyed by token id, not by configuration: they survive reloads. Creating
    // them here lets every request-time update be a compare-and-swap.
    let ledger = SharedDataLedger::new(&HostStore);
    for token in policy.tokens.iter().filter(|t| t.rules.limits.is_tracked()) {
        ledger.ensure(&token.id).map_err(|e| {
            ConfigError::at(".", format!("cannot create counters in shared data: {e:?}"))
        })?;
    }
    // Once in shared data, the token list is not needed in every worker's memory.
    let (tokens, revoked) = (policy.tokens.len(), policy.revoked_count());
    policy.tokens = Vec::new();
    let level = if published == Published::Written {
        LogLevel::Info
    } else {
        LogLevel::Debug
    };
    // Load time (parse, compile, open keys, publish) tells operators what a policy's size costs.
    let took_ms = started_ms
        .zip(host::now_unix_ms())
        .map_or(-1, |(start, end)| end - start);
    log(
        level,
        &format!(
            "shieldkey: policy revision {} loaded (fingerprint {}): {} tokens ({} revoked), {} upstream keys, in {} ms",
            policy.revision,
            policy.fingerprint,
            tokens,
            revoked,
            policy.upstream_keys.len(),
            took_ms
        ),
    );
    let alert_queue =
        match &policy.settings.webhook {
            Some(_) => Some(hostcalls::register_shared_queue(ALERT_QUEUE).map_err(|_| {
                ConfigError::at("alerts.webhook", "cannot register the alert queue")
            })?),
            None => None,
        };
    Ok(Active {
        policy,
        verifier,
        metrics: Metrics::define(),
        tokens: RefCell::new(HashMap::new()),
        alert_queue,
    })
}
