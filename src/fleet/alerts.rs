//! Budget threshold alerts across the fleet.
//!
//! An Envoy knows only its own spend; the fleet's spend of a budget window is the sum of every
//! node's `ledger/spent/<subject>/<window>/<node>` key (`lease::fleet_spent_key`), which each
//! flush writes. That sum grows only by some node's flush, and a node reads the sum after each
//! successful flush of a budget: so the node whose flush carries the fleet over a threshold sees
//! it crossed. Other nodes may see it too (their reads can overlap); the alert key
//! `ledger/alerts/<subject>/<window>/<threshold>`, created only if absent, elects the one that
//! sends it. A restarted node finds the alerts already sent in etcd and sends none again.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use super::lease::{self, Created};
use super::sync::Call;
use crate::alert::{newly_crossed, BudgetAlert};
use crate::money::NanoUsd;
use crate::policy_store;
use crate::store::SharedStore;
use crate::team::team_of_subject;

/// Budgets read per check: one range each (etcd allows 128 operations in a txn).
const CHECK_BATCH: usize = 64;
/// Tries of one alert's claim before it is given up (logged: the alert is lost).
const CLAIM_ATTEMPTS: u32 = 3;

#[derive(Debug, Default)]
pub struct FleetAlerts {
    thresholds: Vec<u8>,
    webhook: bool,
    /// Budgets flushed since the last check: (subject, window start); a window that just
    /// turned keeps its own check beside the new one's.
    to_check: BTreeSet<(String, i64)>,
    /// Thresholds this node claimed or saw claimed: (subject, window start) -> bits of
    /// `thresholds`, so one crossing is claimed once, not after every flush; the two newest
    /// windows of a subject (the previous one is still flushed for a while after it turned).
    claimed: BTreeMap<(String, i64), u8>,
    claims: VecDeque<Claim>,
    in_flight: Option<InFlight>,
    /// After a failed call, nothing is sent before this (etcd down is not asked every tick).
    retry_at_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Claim {
    subject: String,
    window_start: i64,
    threshold: u8,
    /// The fleet's spend when the crossing was seen.
    spent: NanoUsd,
    attempts: u32,
    /// Written into the alert key: found there after a lost reply, this claim won; a node's
    /// name alone would not tell this claim from the same node's before a restart.
    marker: u64,
}

#[derive(Debug)]
enum InFlight {
    Check(Vec<(String, i64)>),
    Claim(Claim),
}

/// What a reply leads to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AlertStep {
    /// Nothing to report (a check read, or an alert another node sent).
    Done,
    /// This node won the alert: log it, count it, and queue it for the webhook if `webhook`.
    Send { alert: BudgetAlert, webhook: bool },
    /// The call failed; what it was for is tried again.
    Failed,
    /// A claim failed `CLAIM_ATTEMPTS` times: this alert is not sent.
    GaveUp { subject: String, threshold: u8 },
}

impl FleetAlerts {
    /// The policy's `alerts` section (set at every load of the settings).
    pub fn configure(&mut self, thresholds: &[u8], webhook: bool) {
        if self.thresholds != thresholds {
            // The bits index the thresholds; etcd's alert keys name the percentages, so nothing
            // already sent is sent again.
            self.claimed.clear();
            self.thresholds = thresholds.to_vec();
        }
        self.webhook = webhook;
    }

    /// This node's spend of `subject`'s budget window was written to etcd.
    pub fn flushed(&mut self, subject: &str, window_start: i64) {
        if !self.thresholds.is_empty() {
            self.to_check.insert((subject.to_string(), window_start));
        }
    }

    /// The next call: a pending claim first, then a read of the fleet's spend of the budgets
    /// flushed since the last one.
    pub fn poll(&mut self, prefix: &str, node: &str, now_ms: i64) -> Option<Call> {
        if self.in_flight.is_some() || now_ms < self.retry_at_ms {
            return None;
        }
        if let Some(claim) = self.claims.pop_front() {
            let key = lease::alert_key(prefix, &claim.subject, claim.window_start, claim.threshold);
            let value = serde_json::json!({
                "node": node,
                "spent": claim.spent,
                "at": now_ms.div_euclid(1000),
                "claim": format!("{:016x}", claim.marker),
            })
            .to_string();
            self.in_flight = Some(InFlight::Claim(claim));
            return Some(Call {
                path: lease::TXN_PATH,
                body: lease::create_body(&key, &value),
            });
        }
        if self.to_check.is_empty() {
            return None;
        }
        let mut batch = Vec::with_capacity(self.to_check.len().min(CHECK_BATCH));
        while batch.len() < CHECK_BATCH {
            let Some(entry) = self.to_check.pop_first() else {
                break;
            };
            batch.push(entry);
        }
        let prefixes: Vec<String> = batch
            .iter()
            .map(|(subject, window)| lease::fleet_spent_prefix(prefix, subject, *window))
            .collect();
        self.in_flight = Some(InFlight::Check(batch));
        Some(Call {
            path: lease::TXN_PATH,
            body: lease::ranges_body(&prefixes),
        })
    }

    /// The reply to the call `poll` made (`status` 0: it could not be sent). After a failure the
    /// next call waits `retry_ms`.
    pub fn on_reply(
        &mut self,
        store: &dyn SharedStore,
        now_ms: i64,
        retry_ms: i64,
        status: u32,
        body: &[u8],
    ) -> AlertStep {
        let step = self.step(store, now_ms, status, body);
        if matches!(step, AlertStep::Failed | AlertStep::GaveUp { .. }) {
            self.retry_at_ms = now_ms.saturating_add(retry_ms);
        }
        step
    }

    fn step(
        &mut self,
        store: &dyn SharedStore,
        now_ms: i64,
        status: u32,
        body: &[u8],
    ) -> AlertStep {
        match self.in_flight.take() {
            None => AlertStep::Done,
            Some(InFlight::Check(batch)) => {
                let sums = (status == 200)
                    .then(|| lease::parse_spent_sums(body, batch.len()))
                    .flatten();
                let Some(sums) = sums else {
                    self.to_check.extend(batch);
                    return AlertStep::Failed;
                };
                for ((subject, window), spent) in batch.into_iter().zip(sums) {
                    self.judge(store, subject, window, spent);
                }
                AlertStep::Done
            }
            Some(InFlight::Claim(mut claim)) => {
                let won = match (status == 200).then(|| lease::parse_create(body)).flatten() {
                    Some(Created::Now) => Some(true),
                    // Created by this node already: an earlier try was applied but its reply
                    // was lost. Else another node created it first, and that one sends it.
                    Some(Created::Already(value)) => Some(marker_of(&value) == Some(claim.marker)),
                    None => None,
                };
                match won {
                    Some(true) => match self.alert(store, &claim, now_ms) {
                        Some(alert) => AlertStep::Send {
                            alert,
                            webhook: self.webhook,
                        },
                        None => AlertStep::Done,
                    },
                    Some(false) => AlertStep::Done,
                    None => {
                        claim.attempts += 1;
                        if claim.attempts >= CLAIM_ATTEMPTS {
                            return AlertStep::GaveUp {
                                subject: claim.subject,
                                threshold: claim.threshold,
                            };
                        }
                        self.claims.push_front(claim);
                        AlertStep::Failed
                    }
                }
            }
        }
    }

    /// Queues a claim for each threshold the fleet's `spent` reached that is not claimed yet.
    fn judge(&mut self, store: &dyn SharedStore, subject: String, window: i64, spent: NanoUsd) {
        let Some(budget) =
            policy_store::lookup_newest(store, &subject).and_then(|(t, _)| t.rules.limits.budget)
        else {
            return;
        };
        let fired = self
            .claimed
            .get(&(subject.clone(), window))
            .copied()
            .unwrap_or(0);
        let (crossed, fired) = newly_crossed(spent, budget.limit, &self.thresholds, fired);
        for threshold in crossed {
            self.claims.push_back(Claim {
                subject: subject.clone(),
                window_start: window,
                threshold,
                spent,
                attempts: 0,
                marker: lease::marker(u32::from(threshold)),
            });
        }
        self.claimed.insert((subject.clone(), window), fired);
        let windows: Vec<i64> = self
            .claimed
            .range((subject.clone(), i64::MIN)..=(subject.clone(), i64::MAX))
            .map(|((_, w), _)| *w)
            .collect();
        for old in windows.iter().rev().skip(2) {
            self.claimed.remove(&(subject.clone(), *old));
        }
    }

    /// The alert of a claim this node won, named as the single-Envoy alert is.
    fn alert(&self, store: &dyn SharedStore, claim: &Claim, now_ms: i64) -> Option<BudgetAlert> {
        let (record, _) = policy_store::lookup_newest(store, &claim.subject)?;
        let budget = record.rules.limits.budget?;
        let team_budget = team_of_subject(&claim.subject);
        Some(BudgetAlert {
            token_id: claim.subject.clone(),
            // A team's alert names no owner: it is the team's budget, shared by its members.
            owner: if team_budget.is_some() {
                String::new()
            } else {
                record.owner.clone()
            },
            team: team_budget
                .or_else(|| record.team.as_deref().and_then(team_of_subject))
                .map(str::to_string),
            threshold_percent: claim.threshold,
            spent: claim.spent,
            limit: budget.limit,
            window: budget.window,
            reset_at: budget.window.reset_at(claim.window_start),
            at: now_ms.div_euclid(1000),
        })
    }
}

/// The marker in an alert key's value (`poll` writes it).
fn marker_of(value: &[u8]) -> Option<u64> {
    let value: serde_json::Value = serde_json::from_slice(value).ok()?;
    u64::from_str_radix(value.get("claim")?.as_str()?, 16).ok()
}
