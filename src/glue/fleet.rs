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

/// The syncer's independent calls to etcd, one in flight each: following the policy never
/// waits on a flush, nor a flush on an alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lane {
    /// Loading and following the policy (`PolicySync::poll`).
    Policy,
    /// This Envoy's spend to etcd.
    Flush,
    /// A lease given back to the pool.
    Return,
    /// The fleet-wide budget alerts' read or claim.
    Alerts,
    /// The sweep of ended budget windows.
    Sweep,
    /// The other Envoys' rate counts.
    Rates,
}

const LANES: [Lane; 6] = [
    Lane::Policy,
    Lane::Flush,
    Lane::Return,
    Lane::Alerts,
    Lane::Sweep,
    Lane::Rates,
];

/// The call in flight on each lane: Envoy's token for it.
#[derive(Debug, Default)]
struct InFlight {
    policy: Option<u32>,
    flush: Option<u32>,
    ret: Option<u32>,
    alerts: Option<u32>,
    sweep: Option<u32>,
    rates: Option<u32>,
}

impl InFlight {
    fn slot(&mut self, lane: Lane) -> &mut Option<u32> {
        match lane {
            Lane::Policy => &mut self.policy,
            Lane::Flush => &mut self.flush,
            Lane::Return => &mut self.ret,
            Lane::Alerts => &mut self.alerts,
            Lane::Sweep => &mut self.sweep,
            Lane::Rates => &mut self.rates,
        }
    }

    /// The lane whose call `token` is, freed.
    fn take(&mut self, token: u32) -> Option<Lane> {
        let lane = LANES
            .into_iter()
            .find(|lane| *self.slot(*lane) == Some(token))?;
        *self.slot(lane) = None;
        Some(lane)
    }
}

pub struct Syncer {
    sync: PolicySync,
    settings: FleetSettings,
    /// The token of the call in flight on each lane.
    in_flight: InFlight,
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
            in_flight: InFlight::default(),
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
        self.take_spent_marks();
        for lane in LANES {
            self.send(lane, now);
        }
    }

    /// The tokens whose spend the HTTP filter changed, to be flushed.
    fn take_spent_marks(&mut self) {
        let Some(queue) = self.spent_queue else {
            return;
        };
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

    /// The lane's next call, if it is free and one is due. A call Envoy would not dispatch is
    /// answered at once as a failure (status 0).
    fn send(&mut self, lane: Lane, now: i64) {
        if self.in_flight.slot(lane).is_some() {
            return;
        }
        let call = match lane {
            Lane::Policy => self.sync.poll(now),
            Lane::Flush => self.sync.poll_flush(&HostStore, now),
            Lane::Return => self.sync.poll_returns(&HostStore, now),
            Lane::Alerts => self.sync.poll_alerts(now),
            Lane::Sweep => self.sync.poll_sweep(now),
            Lane::Rates => self.sync.poll_rates(now),
        };
        let Some(call) = call else { return };
        match self.dispatch(&call) {
            Some(token) => *self.in_flight.slot(lane) = Some(token),
            None => self.answer(lane, now, 0, b"cannot dispatch the call"),
        }
    }

    pub fn on_reply(&mut self, token: u32, status: u32, body: &[u8]) {
        let Some(lane) = self.in_flight.take(token) else {
            return;
        };
        let now = now_unix_ms().unwrap_or(0);
        self.answer(lane, now, status, body);
    }

    /// Hands a reply to the lane's state machine and reports what it did; a failure counts in
    /// `shieldkey.fleet.sync_failures`.
    fn answer(&mut self, lane: Lane, now: i64, status: u32, body: &[u8]) {
        let ok = match lane {
            Lane::Policy => {
                let outcome = self.sync.on_reply(&HostStore, now, status, body);
                // `report` counts this lane's failures (and logs the first of a streak).
                self.report(&outcome);
                if outcome == Outcome::Paging {
                    self.send(Lane::Policy, now);
                }
                true
            }
            Lane::Flush => self.sync.on_flush_reply(now, status, body),
            Lane::Return => self.sync.on_return_reply(status, body),
            Lane::Rates => self.sync.on_rates_reply(&HostStore, now, status, body),
            Lane::Alerts => {
                let step = self.sync.on_alerts_reply(&HostStore, now, status, body);
                self.alert(step)
            }
            Lane::Sweep => {
                let step = self.sync.on_sweep_reply(&HostStore, now, status, body);
                self.swept(step)
            }
        };
        if !ok {
            if let Some(id) = self.stats.failures {
                WasmHost { alert_queue: None }.increment_metric(id, 1);
            }
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

    /// Logs what a sweep deleted; `false` when its call failed.
    fn swept(&self, step: SweepStep) -> bool {
        if let SweepStep::Deleted(windows) = step {
            log(
                LogLevel::Info,
                &format!("shieldkey: fleet ledger: the keys of {windows} ended budget windows removed from etcd"),
            );
        }
        step != SweepStep::Failed
    }

    /// Reports a fleet-wide budget alert this Envoy won: the log line and counters of a
    /// single-Envoy alert, and the webhook body on the queue the workers send from. `false`
    /// when the alerts' call failed.
    fn alert(&mut self, step: AlertStep) -> bool {
        let host = WasmHost { alert_queue: None };
        match step {
            AlertStep::Done => true,
            AlertStep::Failed => false,
            AlertStep::GaveUp { subject, threshold } => {
                log(
                    LogLevel::Error,
                    &format!("shieldkey: budget alert for {subject} at {threshold}% not sent: etcd did not take its claim"),
                );
                false
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
                true
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
