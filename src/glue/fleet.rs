//! Fleet mode in Envoy: the HTTP filter following the base document the syncer writes, and the
//! syncer itself (one per Envoy: a bootstrap `WasmService` singleton with the filter's `vm_id`, so
//! both see the same shared data). The sync logic is `fleet::sync`; this only sends its calls and
//! reports.

use std::rc::Rc;
use std::time::Duration;

use proxy_wasm::hostcalls;

use super::host::{dispatch_post, log, now_unix_ms, WasmHost, ALERT_QUEUE, SPENT_QUEUE};
use super::host_store::HostStore;
use super::root::metric_ids;
use crate::fleet::alerts::AlertStep;
use crate::fleet::sweep::SweepStep;
use crate::fleet::sync::{Call, Outcome, PolicySync};
use crate::fleet::{FleetSettings, BASE_KEY};
use crate::master_key::MasterKey;
use crate::stream::active::{Active, FleetContext};
use crate::stream::host::{Host, LogLevel, MetricKind};
use crate::stream::metrics::Metrics;

/// Retries a call that never reached a member (safe for any call: it was not sent); an
/// active health check in the cluster takes dead members out.
const RETRY_HEADERS: &[(&str, &str)] = &[
    ("x-envoy-retry-on", "connect-failure,refused-stream"),
    ("x-envoy-max-retries", "2"),
];

pub struct FleetFilter {
    master: MasterKey,
    settings: FleetSettings,
    base_version: Option<u32>,
}

/// Envoy's node.id, which names this Envoy's leases and spend in etcd.
fn node_id() -> Option<String> {
    let id = super::host::node_id();
    if id.is_none() {
        log(
            LogLevel::Warn,
            "shieldkey: fleet mode needs Envoy's node.id (unique per Envoy); not visible yet",
        );
    }
    id
}

impl FleetFilter {
    pub fn new(master: MasterKey, settings: FleetSettings) -> Self {
        FleetFilter {
            master,
            settings,
            base_version: None,
        }
    }

    /// A new view when the base document in shared data changed since the last call.
    pub fn follow(&mut self, host: &WasmHost) -> Option<Rc<Active>> {
        let (base, version) = host.store().get(BASE_KEY)?;
        if self.base_version == Some(version) {
            return None;
        }
        let context = FleetContext {
            settings: self.settings.clone(),
            node: node_id()?,
        };
        self.base_version = Some(version);
        match Active::from_fleet_base(host, &base, &self.master, &metric_ids(), context) {
            Ok(active) => {
                log(
                    LogLevel::Info,
                    &format!(
                        "shieldkey: fleet policy revision {} applied: {} upstream keys",
                        active.policy.revision,
                        active.policy.upstream_keys.len()
                    ),
                );
                Some(Rc::new(active))
            }
            Err(e) => {
                // The previous view keeps serving.
                log(
                    LogLevel::Error,
                    &format!("shieldkey: fleet policy from etcd rejected: {e}"),
                );
                None
            }
        }
    }
}

struct SyncStats {
    revision: Option<u32>,
    lag_ms: Option<u32>,
    failures: Option<u32>,
    records: Option<u32>,
}

pub struct Syncer {
    sync: PolicySync,
    settings: FleetSettings,
    in_flight: Option<u32>,
    /// The flush of spend to etcd in flight (a second call slot: flushing never waits on sync).
    flush_in_flight: Option<u32>,
    /// The read of the other Envoys' rate counts in flight (a third slot).
    rates_in_flight: Option<u32>,
    /// A lease being given back to the pool (a fourth slot).
    return_in_flight: Option<u32>,
    /// The fleet-wide budget alerts' read or claim (a fifth slot).
    alerts_in_flight: Option<u32>,
    /// The sweep of ended budget windows (a sixth slot).
    sweep_in_flight: Option<u32>,
    /// Where an alert this Envoy won goes for the webhook (registered at the first one), and
    /// the alert counters (defined at the first one).
    alert_queue: Option<u32>,
    metrics: Option<Metrics>,
    /// Where the HTTP filter says which tokens' spend changed.
    spent_queue: Option<u32>,
    stats: SyncStats,
    /// Failures are logged once per streak, not on every tick.
    failing: bool,
}

impl Syncer {
    pub fn new(settings: FleetSettings) -> Self {
        // Defined once per syncer: a WasmService is configured once per Envoy.
        let host = WasmHost { alert_queue: None };
        let define = |kind, name: &str| host.define_metric(kind, name);
        Syncer {
            // Envoy's node.id is set on the first tick that can see it.
            sync: PolicySync::new(settings.clone(), String::new()),
            flush_in_flight: None,
            rates_in_flight: None,
            return_in_flight: None,
            alerts_in_flight: None,
            sweep_in_flight: None,
            alert_queue: None,
            metrics: None,
            spent_queue: hostcalls::register_shared_queue(SPENT_QUEUE).ok(),
            stats: SyncStats {
                revision: define(MetricKind::Gauge, "shieldkey.fleet.revision"),
                lag_ms: define(MetricKind::Gauge, "shieldkey.fleet.sync_lag_ms"),
                failures: define(MetricKind::Counter, "shieldkey.fleet.sync_failures"),
                records: define(MetricKind::Counter, "shieldkey.fleet.records_applied"),
            },
            settings,
            in_flight: None,
            failing: false,
        }
    }

    pub fn tick(&mut self) {
        let Some(now) = now_unix_ms() else { return };
        if !self.sync.has_node() {
            match node_id() {
                Some(node) => self.sync.set_node(node),
                None => return,
            }
        }
        let host = WasmHost { alert_queue: None };
        if let (Some(id), Some(last)) = (self.stats.lag_ms, self.sync.last_success_ms) {
            host.record_metric(id, u64::try_from(now - last).unwrap_or(0));
        }
        self.send(now);
        self.flush(now);
        if self.return_in_flight.is_none() {
            if let Some(call) = self.sync.poll_returns(&HostStore, now) {
                self.return_in_flight = self.dispatch(&call);
                if self.return_in_flight.is_none() {
                    self.sync.on_return_reply(0, b"");
                }
            }
        }
        if self.alerts_in_flight.is_none() {
            if let Some(call) = self.sync.poll_alerts(now) {
                self.alerts_in_flight = self.dispatch(&call);
                if self.alerts_in_flight.is_none() {
                    let step = self.sync.on_alerts_reply(&HostStore, now, 0, b"");
                    self.alert(step);
                }
            }
        }
        if self.sweep_in_flight.is_none() {
            if let Some(call) = self.sync.poll_sweep(now) {
                self.sweep_in_flight = self.dispatch(&call);
                if self.sweep_in_flight.is_none() {
                    let step = self.sync.on_sweep_reply(&HostStore, now, 0, b"");
                    self.swept(step);
                }
            }
        }
        if self.rates_in_flight.is_none() {
            if let Some(call) = self.sync.poll_rates(now) {
                self.rates_in_flight = self.dispatch(&call);
                if self.rates_in_flight.is_none() {
                    self.sync.on_rates_reply(&HostStore, now, 0, b"");
                }
            }
        }
    }

    fn flush(&mut self, now: i64) {
        if let Some(queue) = self.spent_queue {
            // Bounded per tick; what is left waits for the next one.
            for _ in 0..10_000 {
                let Ok(Some(id)) = hostcalls::dequeue_shared_queue(queue) else {
                    break;
                };
                if let Ok(id) = String::from_utf8(id) {
                    self.sync.mark_dirty(id);
                }
            }
        }
        if self.flush_in_flight.is_some() {
            return;
        }
        let Some(call) = self.sync.poll_flush(&HostStore, now) else {
            return;
        };
        self.flush_in_flight = self.dispatch(&call);
        if self.flush_in_flight.is_none() {
            self.sync.on_flush_reply(now, 0, b"");
        }
    }

    fn dispatch(&self, call: &Call) -> Option<u32> {
        dispatch_post(
            &self.settings.cluster,
            call.path,
            &self.settings.authority,
            &call.body,
            RETRY_HEADERS,
            Duration::from_millis(self.settings.timeout_ms),
        )
    }

    fn send(&mut self, now: i64) {
        if self.in_flight.is_some() {
            return;
        }
        let Some(call) = self.sync.poll(now) else {
            return;
        };
        let sent = self.dispatch(&call);
        match sent {
            Some(token) => self.in_flight = Some(token),
            None => {
                let outcome = self
                    .sync
                    .on_reply(&HostStore, now, 0, b"cannot dispatch the call");
                self.report(&outcome);
            }
        }
    }

    pub fn on_reply(&mut self, token: u32, status: u32, body: &[u8]) {
        if self.sweep_in_flight == Some(token) {
            self.sweep_in_flight = None;
            let now = now_unix_ms().unwrap_or(0);
            let step = self.sync.on_sweep_reply(&HostStore, now, status, body);
            self.swept(step);
            return;
        }
        if self.alerts_in_flight == Some(token) {
            self.alerts_in_flight = None;
            let now = now_unix_ms().unwrap_or(0);
            let step = self.sync.on_alerts_reply(&HostStore, now, status, body);
            self.alert(step);
            return;
        }
        if self.return_in_flight == Some(token) {
            self.return_in_flight = None;
            if !self.sync.on_return_reply(status, body) {
                if let Some(id) = self.stats.failures {
                    WasmHost { alert_queue: None }.increment_metric(id, 1);
                }
            }
            return;
        }
        if self.rates_in_flight == Some(token) {
            self.rates_in_flight = None;
            let now = now_unix_ms().unwrap_or(0);
            if !self.sync.on_rates_reply(&HostStore, now, status, body) {
                if let Some(id) = self.stats.failures {
                    WasmHost { alert_queue: None }.increment_metric(id, 1);
                }
            }
            return;
        }
        if self.flush_in_flight == Some(token) {
            self.flush_in_flight = None;
            let now = now_unix_ms().unwrap_or(0);
            if !self.sync.on_flush_reply(now, status, body) {
                if let Some(id) = self.stats.failures {
                    WasmHost { alert_queue: None }.increment_metric(id, 1);
                }
            }
            return;
        }
        if self.in_flight != Some(token) {
            return;
        }
        self.in_flight = None;
        let Some(now) = now_unix_ms() else { return };
        let outcome = self.sync.on_reply(&HostStore, now, status, body);
        self.report(&outcome);
        if outcome == Outcome::Paging {
            self.send(now);
        }
    }

    fn swept(&self, step: SweepStep) {
        match step {
            SweepStep::Listed => {}
            SweepStep::Deleted(windows) => log(
                LogLevel::Info,
                &format!("shieldkey: fleet ledger: the keys of {windows} ended budget windows removed from etcd"),
            ),
            SweepStep::Failed => {
                if let Some(id) = self.stats.failures {
                    WasmHost { alert_queue: None }.increment_metric(id, 1);
                }
            }
        }
    }

    /// Reports a fleet-wide budget alert this Envoy won: the log line and counters of a
    /// single-Envoy alert, and the webhook body on the queue the workers send from.
    fn alert(&mut self, step: AlertStep) {
        let host = WasmHost { alert_queue: None };
        match step {
            AlertStep::Done => {}
            AlertStep::Failed => {
                if let Some(id) = self.stats.failures {
                    host.increment_metric(id, 1);
                }
            }
            AlertStep::GaveUp { subject, threshold } => {
                if let Some(id) = self.stats.failures {
                    host.increment_metric(id, 1);
                }
                log(
                    LogLevel::Error,
                    &format!("shieldkey: budget alert for {subject} at {threshold}% not sent: etcd did not take its claim"),
                );
            }
            AlertStep::Send { alert, webhook } => {
                log(LogLevel::Warn, &alert.log_line());
                let metrics = self
                    .metrics
                    .get_or_insert_with(|| Metrics::define(&host, &metric_ids()));
                metrics.alert(&host);
                let subject = if crate::team::team_of_subject(&alert.token_id).is_some() {
                    metrics.team(&host, &alert.token_id)
                } else {
                    metrics.token(&host, &alert.token_id)
                };
                subject.alert(&host);
                if webhook {
                    if self.alert_queue.is_none() {
                        self.alert_queue = hostcalls::register_shared_queue(ALERT_QUEUE).ok();
                    }
                    if let Some(queue) = self.alert_queue {
                        let _ = hostcalls::enqueue_shared_queue(queue, Some(&alert.webhook_body()));
                    }
                }
            }
        }
    }

    fn report(&mut self, outcome: &Outcome) {
        let host = WasmHost { alert_queue: None };
        if let Some(id) = self.stats.revision {
            host.record_metric(id, self.sync.revision());
        }
        match outcome {
            Outcome::Failed(why) => {
                if let Some(id) = self.stats.failures {
                    host.increment_metric(id, 1);
                }
                if !self.failing {
                    log(
                        LogLevel::Warn,
                        &format!(
                            "shieldkey: fleet sync from etcd failing ({why}); enforcing the last policy read (revision {})",
                            self.sync.revision()
                        ),
                    );
                }
                self.failing = true;
                return;
            }
            Outcome::Loaded {
                revision,
                tokens,
                teams,
            } => log(
                LogLevel::Info,
                &format!("shieldkey: fleet policy loaded from etcd at revision {revision}: {tokens} tokens, {teams} teams"),
            ),
            Outcome::Applied { records, .. } => {
                if let (Some(id), true) = (self.stats.records, *records > 0) {
                    host.increment_metric(id, i64::try_from(*records).unwrap_or(i64::MAX));
                }
            }
            Outcome::Reconciled { removed } if *removed > 0 => log(
                LogLevel::Info,
                &format!("shieldkey: fleet sync removed {removed} tokens and teams deleted from etcd"),
            ),
            Outcome::Rejected(why) => log(
                LogLevel::Error,
                &format!("shieldkey: fleet policy in etcd rejected, keeping the last one: {why}"),
            ),
            Outcome::Restored { tokens } => log(
                LogLevel::Info,
                &format!("shieldkey: fleet ledger: this Envoy's spend read back for {tokens} tokens; serving"),
            ),
            Outcome::Reconciled { .. } | Outcome::Paging => {}
        }
        if self.failing {
            log(LogLevel::Info, "shieldkey: fleet sync from etcd recovered");
            self.failing = false;
        }
    }
}
