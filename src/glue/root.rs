//! The root context: compiles the plugin configuration once per `on_configure`, publishes the
//! per-token records into shared data, hands every HTTP context a shared, read-only view, and
//! delivers budget alerts to the optional webhook.

use std::rc::Rc;
use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::ContextType;

use super::host::{self, log, WasmHost};
use super::http::ShieldHttp;
use crate::config::{raw, ConfigError};
use crate::master_key::{MasterKey, DEFAULT_MASTER_KEY_ENV};
use crate::stream::active::Active;
use crate::stream::host::LogLevel;
use crate::stream::metrics::MetricIds;
use crate::stream::Stream;

const ALERT_QUEUE: &str = "shieldkey.alerts";

thread_local! {
    /// Stat ids defined by this VM, shared by every configuration it runs (a VM is one thread).
    static METRIC_IDS: Rc<MetricIds> = Rc::new(MetricIds::default());
}
/// Alerts sent per tick and worker: a flood of alerts must not starve the worker.
const ALERTS_PER_TICK: usize = 16;

#[derive(Default)]
pub struct ShieldRoot {
    active: Option<Rc<Active>>,
    alert_queue: Option<u32>,
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
                active.metrics.webhook_failed(&self.host());
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
            Ok((active, alert_queue)) => {
                if alert_queue.is_some() {
                    let _ = hostcalls::set_tick_period(Duration::from_millis(500));
                }
                self.active = Some(Rc::new(active));
                self.alert_queue = alert_queue;
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
        let (Some(queue), Some(hook)) = (self.alert_queue, &active.policy.settings.webhook) else {
            return;
        };
        for _ in 0..ALERTS_PER_TICK {
            let Ok(Some(body)) = hostcalls::dequeue_shared_queue(queue) else {
                break;
            };
            // Failures are logged and counted, never retried into the request path.
            let sent = host::dispatch_post(
                &hook.cluster,
                &hook.path,
                &hook.authority,
                &body,
                Duration::from_millis(hook.timeout_ms),
            );
            if !sent {
                active.metrics.webhook_failed(&self.host());
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
        Some(Box::new(ShieldHttp {
            stream: Stream::new(self.active.clone()),
            host: self.host(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

impl ShieldRoot {
    fn host(&self) -> WasmHost {
        WasmHost {
            alert_queue: self.alert_queue,
        }
    }
}

fn configure() -> Result<(Active, Option<u32>), ConfigError> {
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
    let alert_queue =
        match raw.alerts.as_ref().and_then(|a| a.webhook.as_ref()) {
            Some(_) => Some(hostcalls::register_shared_queue(ALERT_QUEUE).map_err(|_| {
                ConfigError::at("alerts.webhook", "cannot register the alert queue")
            })?),
            None => None,
        };
    let ids = METRIC_IDS.with(Rc::clone);
    let active = Active::load(&WasmHost { alert_queue }, &bytes, &raw, &master, &ids)?;
    Ok((active, alert_queue))
}
