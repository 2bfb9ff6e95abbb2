//! Ended budget windows leave etcd.
//!
//! Every budget window leaves keys in the ledger (`lease`): the pool, each node's claim and spend,
//! the spend filed by token, and the alerts sent. Nothing reads them once the window is over, but
//! without this they would pile up (a key per token, node and hour for an hourly budget), and a
//! restarting node reads all of its own. So each node's syncer lists its own ledger keys (keys
//! only, paged) every sweep interval, and deletes the windows that ended before the previous one
//! (the current and the previous window stay, so a node whose clock is behind by less than a
//! whole window never finds a pool gone that it still claims from): its own keys, and the
//! window's shared keys (pool, spend by token, alerts), which any node may delete. A node that
//! left the fleet for good leaves its own keys behind.

use std::collections::BTreeSet;

use super::etcd::{parse_range, prefix_end, Range, RANGE_PATH};
use super::lease;
use super::sync::{Call, PAGE};
use crate::policy_store;
use crate::store::SharedStore;

/// Windows deleted per transaction: four operations each (etcd allows 128 per txn).
const DELETE_BATCH: usize = 30;

#[derive(Debug, Default)]
pub struct LedgerSweep {
    next_ms: i64,
    /// The listing in progress: the next key to read.
    listing: Option<Vec<u8>>,
    /// Ended windows found, (subject, window start), to delete.
    ended: BTreeSet<(String, i64)>,
    in_flight: Option<InFlight>,
}

#[derive(Debug)]
enum InFlight {
    List,
    Delete(usize),
}

/// What a reply did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SweepStep {
    Listed,
    /// This many ended windows' keys were deleted.
    Deleted(usize),
    Failed,
}

impl LedgerSweep {
    /// The first sweep comes `delay_ms` after `now_ms`.
    pub fn start_after(&mut self, now_ms: i64, delay_ms: i64) {
        self.next_ms = now_ms.saturating_add(delay_ms);
    }

    pub fn poll(
        &mut self,
        prefix: &str,
        node: &str,
        interval_ms: i64,
        now_ms: i64,
    ) -> Option<Call> {
        if self.in_flight.is_some() {
            return None;
        }
        if !self.ended.is_empty() {
            let mut ops = Vec::with_capacity(DELETE_BATCH * 4);
            let mut count = 0;
            while count < DELETE_BATCH {
                let Some((subject, window)) = self.ended.pop_first() else {
                    break;
                };
                ops.extend(window_keys(prefix, node, &subject, window));
                count += 1;
            }
            self.in_flight = Some(InFlight::Delete(count));
            return Some(Call {
                path: lease::TXN_PATH,
                body: lease::delete_ranges_body(&ops),
            });
        }
        let node_prefix = lease::node_prefix(prefix, node);
        let from = match self.listing.take() {
            Some(next) => next,
            None if now_ms >= self.next_ms => {
                self.next_ms = now_ms.saturating_add(interval_ms);
                node_prefix.clone().into_bytes()
            }
            None => return None,
        };
        self.in_flight = Some(InFlight::List);
        Some(Call {
            path: RANGE_PATH,
            body: Range {
                from,
                end: prefix_end(node_prefix.as_bytes()),
                limit: PAGE,
                keys_only: true,
                ..Range::default()
            }
            .body(),
        })
    }

    pub fn on_reply(
        &mut self,
        store: &dyn SharedStore,
        prefix: &str,
        node: &str,
        now_ms: i64,
        status: u32,
        body: &[u8],
    ) -> SweepStep {
        match self.in_flight.take() {
            None => SweepStep::Listed,
            Some(InFlight::List) => {
                // A failed listing waits for the next interval.
                let Some(reply) = (status == 200).then(|| parse_range(body)).flatten() else {
                    return SweepStep::Failed;
                };
                let node_prefix = lease::node_prefix(prefix, node);
                let now = now_ms.div_euclid(1000);
                for kv in &reply.kvs {
                    let Some((subject, window, _)) = std::str::from_utf8(&kv.key)
                        .ok()
                        .and_then(|k| lease::parse_node_key(k, &node_prefix))
                    else {
                        continue;
                    };
                    if ended(store, subject, window, now) {
                        self.ended.insert((subject.to_string(), window));
                    }
                }
                if let (true, Some(last)) = (reply.more, reply.kvs.last()) {
                    let mut next = last.key.clone();
                    next.push(0);
                    self.listing = Some(next);
                }
                SweepStep::Listed
            }
            Some(InFlight::Delete(count)) => {
                // Windows not deleted are found again by the next sweep.
                match (status == 200).then(|| lease::parse_write(body)).flatten() {
                    Some(true) => SweepStep::Deleted(count),
                    _ => SweepStep::Failed,
                }
            }
        }
    }
}

/// Whether `subject`'s window starting at `window_start` ended before its previous window: only
/// for a subject whose record has a budget (a subject no longer in the policy keeps its keys: a
/// token minted again under its id continues its spend).
fn ended(store: &dyn SharedStore, subject: &str, window_start: i64, now: i64) -> bool {
    let Some(budget) =
        policy_store::lookup_newest(store, subject).and_then(|(t, _)| t.rules.limits.budget)
    else {
        return false;
    };
    let current = budget.window.start(now);
    let previous = budget.window.start(current.saturating_sub(1));
    window_start < previous
}

/// What to delete of one ended window (`lease::delete_ranges_body`: a prefix ends in '/').
fn window_keys(prefix: &str, node: &str, subject: &str, window: i64) -> [String; 4] {
    [
        format!("{}{subject}/{window}/", lease::node_prefix(prefix, node)),
        lease::fleet_spent_prefix(prefix, subject, window),
        lease::alerts_prefix(prefix, subject, window),
        lease::pool_key(prefix, subject, window),
    ]
}
