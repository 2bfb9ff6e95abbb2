//! Envoy stats the filter reports. Every stat is defined once per name per VM (`MetricIds`, shared
//! by every configuration the VM runs: Envoy allocates a new entry each time a name is defined and
//! never frees the old one, so defining per configuration would leak on every reload); per-token
//! and per-model stats are defined the first time a worker needs them, never per request.
//!
//! Names are built so that `stats_tags` regexes in the shipped Envoy configs turn the variable
//! parts into Prometheus labels:
//! - `shieldkey.reason.<code>.denied`                      → `shieldkey_denied{reason}`
//! - `shieldkey.token_id.<id>.<metric>`                    → `shieldkey_<metric>{token_id}`
//! - `shieldkey.token_id.<id>.reason.<code>.denied`        → `shieldkey_denied{token_id,reason}`
//! - `shieldkey.model.<model>.<metric>`                    → `shieldkey_<metric>{model}`
//! - `shieldkey.team.<team>.<metric>`                      → `shieldkey_team_<metric>{team}`
//! - `shieldkey.team.<team>.reason.<code>.denied`          → `shieldkey_team_denied{team,reason}`
//! - `...reason.<code>.would_deny`: as `denied`, for requests a dry run let through
//!
//! They appear as `wasmcustom.<name>`. Cardinality is bounded: token ids come from the policy
//! (a stat is only defined for a token that authenticated), and model names only from the price
//! table (anything else is reported as `unpriced`), never from raw client input.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

use super::host::{Host, MetricKind};
use crate::denial::Denial;
use crate::money::NanoUsd;

/// Counter increments added up in the VM until they are sent (the glue sends them on a timer).
/// Few counters change between two sends, so a small vector searched linearly beats hashing.
#[derive(Default, Debug, PartialEq, Eq)]
pub struct PendingMetrics {
    pub counters: Vec<(u32, i64)>,
}

impl PendingMetrics {
    pub fn increment(&mut self, id: u32, by: i64) {
        match self.counters.iter_mut().find(|(i, _)| *i == id) {
            Some((_, total)) => *total = total.saturating_add(by),
            None => self.counters.push((id, by)),
        }
    }
}

/// The stat ids this VM has defined, by name: one per VM, outliving configurations.
#[derive(Default)]
pub struct MetricIds {
    ids: RefCell<HashMap<String, Option<u32>>>,
}

impl MetricIds {
    fn get(&self, host: &dyn Host, kind: MetricKind, name: &str) -> Option<u32> {
        if let Some(id) = self.ids.borrow().get(name) {
            return *id;
        }
        let id = host.define_metric(kind, name);
        self.ids.borrow_mut().insert(name.to_string(), id);
        id
    }

    /// How many names this VM has defined.
    pub fn len(&self) -> usize {
        self.ids.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

pub struct Metrics {
    ids: Rc<MetricIds>,
    allowed: Option<u32>,
    unreadable_responses: Option<u32>,
    lease_claims: Option<u32>,
    lease_claim_failures: Option<u32>,
    denied: HashMap<&'static str, u32>,
    would_deny: HashMap<&'static str, u32>,
    alerts: Option<u32>,
    webhook_failures: Option<u32>,
    tokens: RefCell<HashMap<String, Rc<TokenMetrics>>>,
    teams: RefCell<HashMap<String, Rc<TokenMetrics>>>,
    models: RefCell<HashMap<String, Rc<ModelMetrics>>>,
}

pub struct TokenMetrics {
    ids: Rc<MetricIds>,
    prefix: String,
    requests: Option<u32>,
    prompt_tokens: Option<u32>,
    completion_tokens: Option<u32>,
    spend: Option<u32>,
    estimated: Option<u32>,
    budget_limit: Option<u32>,
    budget_remaining: Option<u32>,
    budget_spent: Option<u32>,
    budget_window_start: Option<u32>,
    /// The limit and window start this worker last set: both change rarely (a new policy, a new
    /// window), and every worker sets the same value, so they are only sent when they changed.
    reported_limit: Cell<Option<u64>>,
    reported_window_start: Cell<Option<u64>>,
    alerts: Option<u32>,
    denied: RefCell<HashMap<&'static str, Option<u32>>>,
    would_deny: RefCell<HashMap<&'static str, Option<u32>>>,
}

pub struct ModelMetrics {
    requests: Option<u32>,
    prompt_tokens: Option<u32>,
    completion_tokens: Option<u32>,
    spend: Option<u32>,
}

/// A budget's state after a settlement, for its gauges.
pub struct BudgetReport {
    pub limit: NanoUsd,
    pub remaining: NanoUsd,
    pub spent: NanoUsd,
    /// Unix seconds; 0 for a lifetime budget.
    pub window_start: i64,
}

/// What one finished request adds to the stats.
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost: NanoUsd,
    pub estimated: bool,
}

fn counter(host: &dyn Host, ids: &MetricIds, name: &str) -> Option<u32> {
    ids.get(host, MetricKind::Counter, name)
}

fn gauge(host: &dyn Host, ids: &MetricIds, name: &str) -> Option<u32> {
    ids.get(host, MetricKind::Gauge, name)
}

fn bump(host: &dyn Host, id: Option<u32>, by: u64) {
    if let (Some(id), true) = (id, by > 0) {
        host.increment_metric(id, i64::try_from(by).unwrap_or(i64::MAX));
    }
}

fn set(host: &dyn Host, id: Option<u32>, value: u64) {
    if let Some(id) = id {
        host.record_metric(id, value);
    }
}

/// `set`, skipped when this worker already set `value`. Only for gauges every worker sets to the
/// same value at the same time (never for one a worker's older value could overwrite).
fn set_if_changed(host: &dyn Host, id: Option<u32>, reported: &Cell<Option<u64>>, value: u64) {
    if reported.get() != Some(value) {
        set(host, id, value);
        reported.set(Some(value));
    }
}

impl Metrics {
    pub fn define(host: &dyn Host, ids: &Rc<MetricIds>) -> Self {
        let denied = Denial::ALL_CODES
            .iter()
            .filter_map(|code| {
                Some((
                    *code,
                    counter(host, ids, &format!("shieldkey.reason.{code}.denied"))?,
                ))
            })
            .collect();
        let would_deny = Denial::RULE_CODES
            .iter()
            .filter_map(|code| {
                Some((
                    *code,
                    counter(host, ids, &format!("shieldkey.reason.{code}.would_deny"))?,
                ))
            })
            .collect();
        Metrics {
            would_deny,
            teams: RefCell::new(HashMap::new()),
            ids: ids.clone(),
            allowed: counter(host, ids, "shieldkey.allowed"),
            unreadable_responses: counter(host, ids, "shieldkey.unreadable_responses"),
            lease_claims: counter(host, ids, "shieldkey.fleet.lease_claims"),
            lease_claim_failures: counter(host, ids, "shieldkey.fleet.lease_claim_failures"),
            denied,
            alerts: counter(host, ids, "shieldkey.budget_alerts"),
            webhook_failures: counter(host, ids, "shieldkey.webhook_failures"),
            tokens: RefCell::new(HashMap::new()),
            models: RefCell::new(HashMap::new()),
        }
    }

    pub fn allowed(&self, host: &dyn Host) {
        bump(host, self.allowed, 1);
    }

    /// A response arrived in an encoding the filter cannot read: charged its worst case.
    pub fn unreadable_response(&self, host: &dyn Host) {
        bump(host, self.unreadable_responses, 1);
    }

    pub fn denied(&self, host: &dyn Host, denial: &Denial) {
        bump(host, self.denied.get(denial.code()).copied(), 1);
    }

    /// A dry run let through a request this rule would have refused.
    pub fn would_deny(&self, host: &dyn Host, denial: &Denial) {
        bump(host, self.would_deny.get(denial.code()).copied(), 1);
    }

    /// Fleet mode: a budget lease was claimed from etcd for a waiting request.
    pub fn lease_claimed(&self, host: &dyn Host) {
        bump(host, self.lease_claims, 1);
    }

    /// Fleet mode: a claim could not be made (etcd unreachable, contention): request refused.
    pub fn lease_claim_failed(&self, host: &dyn Host) {
        bump(host, self.lease_claim_failures, 1);
    }

    pub fn alert(&self, host: &dyn Host) {
        bump(host, self.alerts, 1);
    }

    pub fn webhook_failed(&self, host: &dyn Host) {
        bump(host, self.webhook_failures, 1);
    }

    pub fn token(&self, host: &dyn Host, id: &str) -> Rc<TokenMetrics> {
        if let Some(m) = self.tokens.borrow().get(id) {
            return m.clone();
        }
        let prefix = format!("shieldkey.token_id.{id}");
        let m = Rc::new(TokenMetrics::define(host, &self.ids, prefix));
        self.tokens.borrow_mut().insert(id.to_string(), m.clone());
        m
    }

    /// The stats of a team (`subject`: its subject id `team.<id>`), same names as a token's
    /// under `shieldkey.team.<id>`.
    pub fn team(&self, host: &dyn Host, subject: &str) -> Rc<TokenMetrics> {
        if let Some(m) = self.teams.borrow().get(subject) {
            return m.clone();
        }
        let team = crate::team::team_of_subject(subject).unwrap_or(subject);
        let prefix = format!("shieldkey.team.{team}");
        let m = Rc::new(TokenMetrics::define(host, &self.ids, prefix));
        self.teams
            .borrow_mut()
            .insert(subject.to_string(), m.clone());
        m
    }

    /// `model` must be a name from the price table (or `unpriced`).
    pub fn model(&self, host: &dyn Host, model: &str) -> Rc<ModelMetrics> {
        if let Some(m) = self.models.borrow().get(model) {
            return m.clone();
        }
        let name = model.replace('.', "_");
        let p = format!("shieldkey.model.{name}");
        let ids = &self.ids;
        let m = Rc::new(ModelMetrics {
            requests: counter(host, ids, &format!("{p}.requests")),
            prompt_tokens: counter(host, ids, &format!("{p}.prompt_tokens")),
            completion_tokens: counter(host, ids, &format!("{p}.completion_tokens")),
            spend: counter(host, ids, &format!("{p}.spend_nano_usd")),
        });
        self.models
            .borrow_mut()
            .insert(model.to_string(), m.clone());
        m
    }
}

impl TokenMetrics {
    fn define(host: &dyn Host, ids: &Rc<MetricIds>, prefix: String) -> Self {
        TokenMetrics {
            requests: counter(host, ids, &format!("{prefix}.requests")),
            prompt_tokens: counter(host, ids, &format!("{prefix}.prompt_tokens")),
            completion_tokens: counter(host, ids, &format!("{prefix}.completion_tokens")),
            spend: counter(host, ids, &format!("{prefix}.spend_nano_usd")),
            estimated: counter(host, ids, &format!("{prefix}.estimated_charges")),
            budget_limit: gauge(host, ids, &format!("{prefix}.budget_limit_nano_usd")),
            budget_remaining: gauge(host, ids, &format!("{prefix}.budget_remaining_nano_usd")),
            budget_spent: gauge(host, ids, &format!("{prefix}.budget_spent_nano_usd")),
            budget_window_start: gauge(host, ids, &format!("{prefix}.budget_window_start_seconds")),
            reported_limit: Cell::new(None),
            reported_window_start: Cell::new(None),
            alerts: counter(host, ids, &format!("{prefix}.budget_alerts")),
            denied: RefCell::new(HashMap::new()),
            would_deny: RefCell::new(HashMap::new()),
            ids: ids.clone(),
            prefix,
        }
    }

    pub fn allowed(&self, host: &dyn Host) {
        bump(host, self.requests, 1);
    }

    pub fn denied(&self, host: &dyn Host, denial: &Denial) {
        let code = denial.code();
        let id = *self.denied.borrow_mut().entry(code).or_insert_with(|| {
            counter(
                host,
                &self.ids,
                &format!("{}.reason.{code}.denied", self.prefix),
            )
        });
        bump(host, id, 1);
    }

    pub fn would_deny(&self, host: &dyn Host, denial: &Denial) {
        let code = denial.code();
        let id = *self.would_deny.borrow_mut().entry(code).or_insert_with(|| {
            counter(
                host,
                &self.ids,
                &format!("{}.reason.{code}.would_deny", self.prefix),
            )
        });
        bump(host, id, 1);
    }

    pub fn settled(&self, host: &dyn Host, usage: &Usage) {
        bump(host, self.prompt_tokens, usage.prompt_tokens);
        bump(host, self.completion_tokens, usage.completion_tokens);
        bump(host, self.spend, usage.cost);
        if usage.estimated {
            bump(host, self.estimated, 1);
        }
    }

    /// The budget as a settlement left it: its limit, what remains and what was spent in the
    /// window the settlement was charged to, and that window's start (unix seconds, 0 for a
    /// lifetime budget). Set only when a request settles: nothing resets them when a window
    /// ends, so `shieldkey status` compares the window start with the current one.
    pub fn budget(&self, host: &dyn Host, budget: &BudgetReport) {
        set_if_changed(host, self.budget_limit, &self.reported_limit, budget.limit);
        set(host, self.budget_remaining, budget.remaining);
        set(host, self.budget_spent, budget.spent);
        set_if_changed(
            host,
            self.budget_window_start,
            &self.reported_window_start,
            u64::try_from(budget.window_start).unwrap_or(0),
        );
    }

    pub fn alert(&self, host: &dyn Host) {
        bump(host, self.alerts, 1);
    }
}

impl ModelMetrics {
    pub fn settled(&self, host: &dyn Host, usage: &Usage) {
        bump(host, self.requests, 1);
        bump(host, self.prompt_tokens, usage.prompt_tokens);
        bump(host, self.completion_tokens, usage.completion_tokens);
        bump(host, self.spend, usage.cost);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_increments_add_up() {
        let mut p = PendingMetrics::default();
        p.increment(3, 2);
        p.increment(5, 1);
        p.increment(3, 4);
        assert_eq!(p.counters, vec![(3, 6), (5, 1)]);
        p.increment(5, i64::MAX);
        assert_eq!(p.counters[1], (5, i64::MAX));
    }
}
