//! The root context: compiles the plugin configuration once per `on_configure`, publishes the
//! per-token records into shared data, and hands every HTTP context a shared, read-only view.

use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{ContextType, LogLevel};

use super::host::{self, log};
use super::host_store::HostStore;
use super::http::ShieldHttp;
use super::metrics::Metrics;
use crate::config::compile::{compile, fingerprint, CompileOptions};
use crate::config::{raw, ConfigError};
use crate::master_key::{MasterKey, DEFAULT_MASTER_KEY_ENV};
use crate::policy::Policy;
use crate::policy_store::{self, Published};
use crate::token_digest::TokenVerifier;

/// What every request of one configuration shares.
pub struct Active {
    pub policy: Policy,
    pub verifier: TokenVerifier,
    pub metrics: Metrics,
}

#[derive(Default)]
pub struct ShieldRoot {
    active: Option<Rc<Active>>,
}

impl Context for ShieldRoot {}

impl RootContext for ShieldRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        match configure() {
            Ok(active) => {
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

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(ShieldHttp::new(self.active.clone())))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

fn configure() -> Result<Active, ConfigError> {
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
    // Once in shared data, the token list is not needed in every worker's memory.
    let (tokens, revoked) = (policy.tokens.len(), policy.revoked_count());
    policy.tokens = Vec::new();
    let level = if published == Published::Written {
        LogLevel::Info
    } else {
        LogLevel::Debug
    };
    log(
        level,
        &format!(
            "shieldkey: policy revision {} loaded (fingerprint {}): {} tokens ({} revoked), {} upstream keys",
            policy.revision,
            policy.fingerprint,
            tokens,
            revoked,
            policy.upstream_keys.len()
        ),
    );
    Ok(Active {
        policy,
        verifier,
        metrics: Metrics::define(),
    })
}
