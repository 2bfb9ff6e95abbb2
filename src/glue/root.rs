//! The root context. In single-Envoy mode it compiles the plugin configuration once per
//! `on_configure`, publishes the per-token records into shared data and hands every HTTP context
//! a shared, read-only view. In fleet mode it either follows the base document the syncer wrote
//! (the HTTP filter) or is the syncer itself (`glue::fleet`). It also delivers budget alerts to
//! the optional webhook.

use std::rc::Rc;
use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{ContextType, MapType};

use super::fleet::{FleetFilter, Syncer};
use super::host::{self, log, WasmHost, ALERT_QUEUE};
use super::http::ShieldHttp;
use crate::config::raw::RawPolicy;
use crate::config::ConfigError;
use crate::fleet::compile_fleet;
use crate::master_key::MasterKey;
use crate::stream::active::Active;
use crate::stream::host::Host;
use crate::stream::host::LogLevel;
use crate::stream::metrics::MetricIds;
use crate::stream::Stream;

/// How often a worker sends its buffered stats to Envoy (and budget alerts to the webhook).
const STATS_FLUSH_MS: u64 = 100;
/// Alerts sent per tick and worker: a flood of alerts must not starve the worker.
const ALERTS_PER_TICK: usize = 16;

thread_local! {
    /// Stat ids defined by this VM, shared by every configuration it runs (a VM is one thread).
    static METRIC_IDS: Rc<MetricIds> = Rc::new(MetricIds::default());
}

pub fn metric_ids() -> Rc<MetricIds> {
    METRIC_IDS.with(Rc::clone)
}

enum Mode {
    /// The policy is the plugin configuration.
    Single,
    /// The HTTP filter of fleet mode: follows the base document the syncer writes.
    FleetFilter(FleetFilter),
    /// The one syncer per Envoy (bootstrap `WasmService`); boxed: it is the large one.
    Syncer(Box<Syncer>),
}

pub struct ShieldRoot {
    active: Option<Rc<Active>>,
    alert_queue: Option<u32>,
    mode: Mode,
}

impl Default for ShieldRoot {
    fn default() -> Self {
        ShieldRoot {
            active: None,
            alert_queue: None,
            mode: Mode::Single,
        }
    }
}

impl Context for ShieldRoot {
    fn on_http_call_response(
        &mut self,
        token: u32,
        _headers: usize,
        body_size: usize,
        _trailers: usize,
    ) {
        let status = hostcalls::get_map_value(MapType::HttpCallResponseHeaders, ":status")
            .ok()
            .flatten();
        if let Mode::Syncer(syncer) = &mut self.mode {
            let body = hostcalls::get_buffer(
                proxy_wasm::types::BufferType::HttpCallResponseBody,
                0,
                body_size,
            )
            .ok()
            .flatten()
            .unwrap_or_default();
            let status = status.as_deref().and_then(|s| s.parse().ok()).unwrap_or(0);
            syncer.on_reply(token, status, &body);
            return;
        }
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
    fn on_configure(&mut self, size: usize) -> bool {
        match self.configure(size) {
            Ok(()) => true,
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
        // Stats of this worker's requests since the last tick.
        host::flush_metrics();
        match &mut self.mode {
            Mode::Syncer(syncer) => {
                syncer.tick();
                return;
            }
            Mode::FleetFilter(filter) => {
                if let Some(active) = filter.follow(&WasmHost {
                    alert_queue: self.alert_queue,
                }) {
                    if active.policy.settings.webhook.is_some() && self.alert_queue.is_none() {
                        self.alert_queue = hostcalls::register_shared_queue(ALERT_QUEUE).ok();
                    }
                    self.active = Some(active);
                }
            }
            Mode::Single => {}
        }
        self.send_alerts();
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

    fn configure(&mut self, size: usize) -> Result<(), ConfigError> {
        if size == 0 {
            return Err(ConfigError::at(
                ".",
                "the filter needs a plugin configuration",
            ));
        }
        let started_ms = WasmHost { alert_queue: None }.now_unix_ms();
        let config = host::PluginConfiguration;
        // The tokens are read later, one at a time (`Active::load`).
        let head = crate::config::token_stream::parse_head(&config)?;
        let raw = &head.policy;
        if let Some(fleet) = &raw.fleet {
            let settings = compile_fleet(raw, fleet)?;
            // A few ticks per interval, so a change waits at most a quarter interval for one.
            let tick = (settings.sync_interval_ms / 4).clamp(10, 250);
            // Envoy's node.id names this Envoy's leases in etcd; it is read on the first tick
            // (it is not visible while the base plugin is configured).
            if settings.sync {
                self.mode = Mode::Syncer(Box::new(Syncer::new(settings)));
                log(LogLevel::Info, "shieldkey: fleet syncer configured");
            } else {
                let filter = FleetFilter::new(master_key(raw)?, settings);
                // The policy may already be in shared data (a reload): the first tick takes it;
                // until then requests are refused (503).
                self.mode = Mode::FleetFilter(filter);
            }
            let _ = hostcalls::set_tick_period(Duration::from_millis(tick));
            return Ok(());
        }
        let master = master_key(raw)?;
        let alert_queue = match raw.alerts.as_ref().and_then(|a| a.webhook.as_ref()) {
            Some(_) => Some(hostcalls::register_shared_queue(ALERT_QUEUE).map_err(|_| {
                ConfigError::at("alerts.webhook", "cannot register the alert queue")
            })?),
            None => None,
        };
        let active = Active::load(
            &WasmHost { alert_queue },
            &config,
            &head,
            &master,
            &metric_ids(),
            started_ms,
        )?;
        // The timer sends the stats buffered in this VM (`host::flush_metrics`) and the budget
        // alerts: stats reach Envoy at most this late.
        let _ = hostcalls::set_tick_period(Duration::from_millis(STATS_FLUSH_MS));
        self.active = Some(Rc::new(active));
        self.alert_queue = alert_queue;
        self.mode = Mode::Single;
        Ok(())
    }

    fn send_alerts(&self) {
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
                &[],
                Duration::from_millis(hook.timeout_ms),
            );
            if sent.is_none() {
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
}

fn master_key(raw: &RawPolicy) -> Result<MasterKey, ConfigError> {
    crate::config::master_key_env::master_key(
        raw,
        "not visible to the filter; pass it with vm_config.environment_variables.host_env_keys",
    )
}
