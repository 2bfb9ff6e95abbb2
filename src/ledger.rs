//! Per-token counters (spend, reservations, rate windows) and the rules that move them.
//!
//! `Ledger` is the one interface the request path uses for anything that must be consistent
//! across workers: `admit` before forwarding, `settle` when the response is over. The shared-data
//! implementation keeps all of a token's counters in one value, updated with compare-and-swap and a
//! bounded number of retries; when the retries run out, admission fails closed. A fleet-wide store
//! can implement the same trait later.
//!
//! Budgets cannot be overshot by concurrent requests: admission reserves each request's
//! worst-case cost (`spent + reserved + reservation <= limit`), and settling replaces the
//! reservation by the real cost. Spend can only pass the limit when a request's real cost exceeds
//! its reservation, which the reservation bound is built to prevent (see README).

use crate::budget_window::BudgetWindow;
use crate::codec::{Reader, Writer};
use crate::money::NanoUsd;
use crate::rules::rate_window::RateWindow;
use crate::store::{SharedStore, StoreError};

const STATE_VERSION: u8 = 4;
/// The previous release's format, under its own key (`legacy_key`): read once, to carry a
/// token's counters over, and never written. A filter upgrade keeps Envoy's shared data, so
/// spend must survive it; and the previous release's VMs, still finishing their streams, must
/// never meet a format they do not know: they would take it for corrupt and reset it.
const STATE_VERSION_3: u8 = 3;
const MINUTE_MS: u64 = 60_000;
pub const CAS_RETRIES: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    pub limit: NanoUsd,
    pub window: BudgetWindow,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Limits {
    pub budget: Option<Budget>,
    pub requests_per_minute: Option<u64>,
    pub tokens_per_minute: Option<u64>,
}

impl Limits {
    /// Tokens without any limit need no shared counters at all (their spend is still reported
    /// through stats).
    pub fn is_tracked(&self) -> bool {
        self.budget.is_some()
            || self.requests_per_minute.is_some()
            || self.tokens_per_minute.is_some()
    }
}

/// What `admit` granted; handed back to `settle`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admission {
    pub window_start: i64,
    pub reserved: NanoUsd,
}

impl Admission {
    /// A request let through although the counters refused it (dry run): it holds nothing, and
    /// settling it charges what it cost to the current window.
    pub fn unreserved(limits: &Limits, now_ms: i64) -> Admission {
        Admission {
            window_start: limits
                .budget
                .map_or(0, |b| b.window.start(now_ms.div_euclid(1000))),
            reserved: 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LedgerDenial {
    RequestRate {
        retry_after_secs: u64,
    },
    TokenRate {
        retry_after_secs: u64,
    },
    /// `reset_at`: unix seconds when the window restarts (`None` for lifetime budgets).
    Budget {
        reset_at: Option<i64>,
        now: i64,
    },
    /// Fleet mode: the limit allows it, but this Envoy's share of the budget does not; `short`
    /// more must be claimed from the fleet's pool first (`fleet::lease`).
    AllowanceShort {
        short: NanoUsd,
    },
    /// CAS retries exhausted or the store failed: fail closed.
    Busy,
}

/// A budget window's start (unix seconds) and what was spent in it.
pub type WindowSpend = (i64, NanoUsd);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settlement {
    pub spent: NanoUsd,
    pub remaining: Option<NanoUsd>,
    /// Alert thresholds (percent of the budget) crossed by this settlement, each reported once
    /// per window across all workers.
    pub crossed: Vec<u8>,
}

pub trait Ledger {
    fn admit(
        &self,
        token_id: &str,
        limits: &Limits,
        reservation: NanoUsd,
        now_ms: i64,
    ) -> Result<Admission, LedgerDenial>;

    /// Adds `amount` to an admitted request's reservation (once its body told the worst case):
    /// the budget rule again, `spent + reserved + amount <= limit`, atomically.
    fn reserve(
        &self,
        token_id: &str,
        limits: &Limits,
        admission: &mut Admission,
        amount: NanoUsd,
        now_ms: i64,
    ) -> Result<(), LedgerDenial>;

    #[allow(clippy::too_many_arguments)]
    fn settle(
        &self,
        token_id: &str,
        limits: &Limits,
        thresholds: &[u8],
        admission: &Admission,
        cost: NanoUsd,
        tokens: u64,
        now_ms: i64,
    ) -> Result<Settlement, StoreError>;

    /// Creates the counters of a token if they do not exist yet. Called when a configuration is
    /// loaded, so that request-time updates always find a key to compare-and-swap (Envoy does
    /// not check CAS on a key that does not exist yet).
    fn ensure(&self, token_id: &str) -> Result<(), StoreError>;
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Counters {
    window_start: i64,
    spent: NanoUsd,
    reserved: NanoUsd,
    /// Fleet mode: what this Envoy may commit in this window (spent + reserved), the sum of the
    /// leases it claimed from the fleet's pool. Unused in single-Envoy mode.
    allowance: NanoUsd,
    /// Fleet mode: the UTC minute (unix minutes) the counts below are for; this Envoy's admitted
    /// requests and settled Mistral tokens in it, and the other Envoys' as last read from etcd.
    minute: i64,
    minute_requests: u64,
    minute_tokens: u64,
    remote_requests: u64,
    remote_tokens: u64,
    /// Fleet mode: when a request last used this token here (to give idle leases back).
    last_use_ms: i64,
    alerts_fired: u8,
    requests: RateWindow,
    tokens: RateWindow,
    /// Fleet mode: the budget limit the allowance was last granted under (0: not known). When
    /// the policy's limit is another (lowered, or raised and lowered again while other Envoys
    /// claimed under the higher one), the allowance beyond what is committed does not count
    /// until a claim under the new limit succeeds (the pool is then within it, and every
    /// allowance is backed by it) or the syncer gave the surplus back.
    lease_limit: NanoUsd,
    /// The window before this one and what was spent in it, kept when a window turns: a request
    /// admitted in it that ends after the turn is charged there, never to a window it reserved
    /// nothing in; and in fleet mode the last spend of the window is still flushed.
    prev_window_start: i64,
    prev_spent: NanoUsd,
}

impl Counters {
    fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new(STATE_VERSION);
        w.i64(self.window_start)
            .u64(self.spent)
            .u64(self.reserved)
            .u64(self.allowance)
            .i64(self.minute)
            .u64(self.minute_requests)
            .u64(self.minute_tokens)
            .u64(self.remote_requests)
            .u64(self.remote_tokens)
            .i64(self.last_use_ms)
            .u8(self.alerts_fired)
            .bytes(&self.requests.encode())
            .bytes(&self.tokens.encode())
            .u64(self.lease_limit)
            .i64(self.prev_window_start)
            .u64(self.prev_spent);
        w.finish()
    }

    fn decode(data: &[u8]) -> Option<Counters> {
        Counters::decode_version(data, STATE_VERSION)
    }

    /// The previous release's counters, carried over: its outstanding reservations belong to
    /// requests that settle on its own key, which this release never reads again, so they count
    /// as spent (their worst case: nothing is lost, a little may be overcounted).
    fn from_legacy(data: &[u8]) -> Option<Counters> {
        let mut c = Counters::decode_version(data, STATE_VERSION_3)?;
        c.spent = c.spent.saturating_add(c.reserved);
        c.reserved = 0;
        Some(c)
    }

    fn decode_version(data: &[u8], version: u8) -> Option<Counters> {
        let mut r = Reader::new(data, version)?;
        let mut c = Counters {
            window_start: r.i64()?,
            spent: r.u64()?,
            reserved: r.u64()?,
            allowance: r.u64()?,
            minute: r.i64()?,
            minute_requests: r.u64()?,
            minute_tokens: r.u64()?,
            remote_requests: r.u64()?,
            remote_tokens: r.u64()?,
            last_use_ms: r.i64()?,
            alerts_fired: r.u8()?,
            requests: RateWindow::decode(r.bytes()?)?,
            tokens: RateWindow::decode(r.bytes()?)?,
            lease_limit: 0,
            prev_window_start: 0,
            prev_spent: 0,
        };
        if version == STATE_VERSION {
            c.lease_limit = r.u64()?;
            c.prev_window_start = r.i64()?;
            c.prev_spent = r.u64()?;
        }
        r.is_done().then_some(c)
    }

    /// Starts the counts of a new minute when `now_ms` has left the stored one.
    fn roll_minute(&mut self, now_ms: i64) {
        let minute = now_ms.div_euclid(MINUTE_MS as i64);
        if minute != self.minute {
            self.minute = minute;
            self.minute_requests = 0;
            self.minute_tokens = 0;
            self.remote_requests = 0;
            self.remote_tokens = 0;
        }
    }

    /// Fleet mode, for what the syncer writes: with a budget in the policy, as `roll`; without
    /// one (the token removed, or its budget taken off) the stored window stays, unless
    /// `window_start` is a later one, which starts afresh. So the spend of a token removed and
    /// minted again in the same window is still there, and never flushed lower.
    fn roll_or_keep(&mut self, window: Option<BudgetWindow>, window_start: i64, now: i64) {
        if window.is_some() {
            self.roll(window, now);
        } else if window_start > self.window_start {
            self.start_window(window_start);
        }
    }

    /// Starts a new budget window when `now` has left the stored one. Outstanding reservations
    /// belong to the old window and are dropped with it (their settlements see the window changed).
    /// Without a budget there are no windows: the stored one stays, so a budget taken off and put
    /// back within its window finds that window's spend.
    fn roll(&mut self, window: Option<BudgetWindow>, now: i64) {
        let Some(window) = window else {
            return;
        };
        let start = window.start(now);
        if start != self.window_start {
            self.start_window(start);
        }
    }

    fn start_window(&mut self, start: i64) {
        self.prev_window_start = self.window_start;
        self.prev_spent = self.spent;
        self.window_start = start;
        self.spent = 0;
        self.reserved = 0;
        self.allowance = 0;
        self.alerts_fired = 0;
        self.lease_limit = 0;
    }
}

fn key(token_id: &str) -> String {
    format!("shieldkey/2/ledger/{token_id}")
}

/// Where the previous release (format 3) keeps a token's counters.
fn legacy_key(token_id: &str) -> String {
    format!("shieldkey/1/ledger/{token_id}")
}

pub struct SharedDataLedger<'a> {
    store: &'a dyn SharedStore,
    /// Fleet mode: budgets are also bounded by this Envoy's allowance.
    fleet: bool,
}

impl<'a> SharedDataLedger<'a> {
    /// (spent, reserved) in the token's current budget window, as stored.
    pub fn balance(&self, token_id: &str) -> Option<(NanoUsd, NanoUsd)> {
        self.read(token_id).map(|c| (c.spent, c.reserved))
    }

    /// The stored counters, or the previous release's carried over when this release has none.
    fn read(&self, token_id: &str) -> Option<Counters> {
        match self.store.get(&key(token_id)) {
            Some((bytes, _)) => Counters::decode(&bytes),
            None => self.legacy(token_id),
        }
    }

    fn legacy(&self, token_id: &str) -> Option<Counters> {
        let (bytes, _) = self.store.get(&legacy_key(token_id))?;
        Counters::from_legacy(&bytes)
    }

    pub fn new(store: &'a dyn SharedStore) -> Self {
        SharedDataLedger {
            store,
            fleet: false,
        }
    }

    /// The ledger of an Envoy in a fleet: budgets also bounded by its claimed allowance.
    pub fn fleet(store: &'a dyn SharedStore) -> Self {
        SharedDataLedger { store, fleet: true }
    }

    /// Fleet mode: adds a lease claimed from the pool under `limit` to the allowance of
    /// `window_start` (a lease of a window that has ended since is dropped: its window's budget
    /// is gone).
    pub fn grant(
        &self,
        token_id: &str,
        window: Option<BudgetWindow>,
        window_start: i64,
        amount: NanoUsd,
        limit: NanoUsd,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        self.in_window(token_id, window, window_start, now_ms, |c| {
            c.allowance = c.allowance.saturating_add(amount);
            c.lease_limit = limit;
        })
    }

    /// Fleet mode, after a restart: what this Envoy had spent in `window_start` (as flushed to
    /// etcd) comes back, with no allowance above it: what was claimed but not flushed may have
    /// been spent, so new spending needs new leases.
    pub fn restore(
        &self,
        token_id: &str,
        window: Option<BudgetWindow>,
        window_start: i64,
        spent: NanoUsd,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        self.in_window(token_id, window, window_start, now_ms, |c| {
            c.spent = c.spent.max(spent);
            c.allowance = c.allowance.max(c.spent);
        })
    }

    /// Applies `change` to the counters if they are still in the budget window that started at
    /// `window_start` (what belonged to an ended window went with it).
    fn in_window(
        &self,
        token_id: &str,
        window: Option<BudgetWindow>,
        window_start: i64,
        now_ms: i64,
        mut change: impl FnMut(&mut Counters),
    ) -> Result<(), StoreError> {
        let now = now_ms.div_euclid(1000);
        self.update(
            token_id,
            |c| {
                c.roll_or_keep(window, window_start, now);
                if c.window_start == window_start {
                    change(c);
                }
                Ok(())
            },
            StoreError::CasMismatch,
        )
    }

    /// Fleet mode: the other Envoys' requests and tokens in `minute`, as read from etcd.
    pub fn set_remote(
        &self,
        token_id: &str,
        minute: i64,
        requests: u64,
        tokens: u64,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        self.update(
            token_id,
            |c| {
                c.roll_minute(now_ms);
                if c.minute == minute {
                    c.remote_requests = requests;
                    c.remote_tokens = tokens;
                }
                Ok(())
            },
            StoreError::CasMismatch,
        )
    }

    /// Fleet mode: the part of this Envoy's allowance no request holds, taken back when the
    /// token has not been used here for `idle_ms`: (window start, amount) to return to the pool.
    /// The allowance is lowered first, so a failed return strands budget, never overspends it.
    /// `window` is `None` when the policy has no budget for the token now (removed, or its budget
    /// taken off): the stored window and its spend stay as they are, for when it comes back.
    pub fn take_unused(
        &self,
        token_id: &str,
        budget: Option<Budget>,
        idle_ms: i64,
        now_ms: i64,
    ) -> Result<Option<(i64, NanoUsd)>, StoreError> {
        let now = now_ms.div_euclid(1000);
        self.update(
            token_id,
            |c| {
                if let Some(b) = budget {
                    c.roll(Some(b.window), now);
                }
                // A limit other than the one the leases were claimed under: the surplus goes back
                // at once, busy or not (until it does, this Envoy claims before spending).
                let changed = budget.is_some_and(|b| b.limit != c.lease_limit);
                let committed = c.spent.saturating_add(c.reserved);
                if changed {
                    c.lease_limit = budget.map_or(0, |b| b.limit);
                } else if now_ms - c.last_use_ms < idle_ms {
                    return Ok(None);
                }
                if c.allowance <= committed {
                    return Ok(None);
                }
                let unused = c.allowance - committed;
                c.allowance = committed;
                Ok(Some((c.window_start, unused)))
            },
            StoreError::CasMismatch,
        )
    }

    /// (minute, requests, tokens) this Envoy counted in the stored minute, for sharing.
    pub fn minute_counts(&self, token_id: &str) -> Option<(i64, u64, u64)> {
        self.read(token_id)
            .map(|c| (c.minute, c.minute_requests, c.minute_tokens))
    }

    /// (window start, spent) as stored, for flushing this Envoy's spend to etcd.
    pub fn spent(&self, token_id: &str) -> Option<(i64, NanoUsd)> {
        self.read(token_id).map(|c| (c.window_start, c.spent))
    }

    /// As `spent`, with the previous window's (start, spent) when anything was spent in it.
    pub fn spent_with_previous(
        &self,
        token_id: &str,
    ) -> Option<(WindowSpend, Option<WindowSpend>)> {
        let c = self.read(token_id)?;
        let previous = (c.prev_spent > 0 && c.prev_window_start != c.window_start)
            .then_some((c.prev_window_start, c.prev_spent));
        Some(((c.window_start, c.spent), previous))
    }

    /// Read-modify-CAS with bounded retries. `update` returns `Err` to abort without writing.
    fn update<T, E>(
        &self,
        token_id: &str,
        mut update: impl FnMut(&mut Counters) -> Result<T, E>,
        exhausted: E,
    ) -> Result<T, E> {
        let key = key(token_id);
        for _ in 0..CAS_RETRIES {
            let (mut counters, cas) = match self.store.get(&key) {
                Some((bytes, cas)) => match Counters::decode(&bytes) {
                    Some(c) => (c, Some(cas)),
                    // A corrupt value is replaced: the alternative is a token locked out forever.
                    None => (Counters::default(), Some(cas)),
                },
                None => (self.legacy(token_id).unwrap_or_default(), None),
            };
            let out = update(&mut counters)?;
            match self.store.set(&key, &counters.encode(), cas) {
                Ok(()) => return Ok(out),
                Err(StoreError::CasMismatch) => continue,
                Err(StoreError::Failed) => return Err(exhausted),
            }
        }
        Err(exhausted)
    }
}

impl Ledger for SharedDataLedger<'_> {
    fn admit(
        &self,
        token_id: &str,
        limits: &Limits,
        reservation: NanoUsd,
        now_ms: i64,
    ) -> Result<Admission, LedgerDenial> {
        let now = now_ms.div_euclid(1000);
        let fleet = self.fleet;
        self.update(
            token_id,
            |c| {
                c.roll(limits.budget.map(|b| b.window), now);
                if let Some(rpm) = limits.requests_per_minute {
                    if !c.requests.would_allow(now_ms, MINUTE_MS, rpm, 1) {
                        let retry_after_secs =
                            c.requests.retry_after_secs(now_ms, MINUTE_MS, rpm, 1);
                        return Err(LedgerDenial::RequestRate { retry_after_secs });
                    }
                }
                if let Some(tpm) = limits.tokens_per_minute {
                    // Token counts are only known afterwards: refuse while the window is full.
                    if !c.tokens.would_allow(now_ms, MINUTE_MS, tpm, 1) {
                        let retry_after_secs = c.tokens.retry_after_secs(now_ms, MINUTE_MS, tpm, 1);
                        return Err(LedgerDenial::TokenRate { retry_after_secs });
                    }
                }
                c.roll_minute(now_ms);
                if fleet {
                    // The whole fleet's use of this minute, as far as the last sync knows.
                    let next_minute = (c.minute + 1) * MINUTE_MS as i64;
                    let retry_after_secs = u64::try_from((next_minute - now_ms + 999) / 1000)
                        .unwrap_or(1)
                        .max(1);
                    let requests = c.remote_requests.saturating_add(c.minute_requests);
                    if limits
                        .requests_per_minute
                        .is_some_and(|rpm| requests >= rpm)
                    {
                        return Err(LedgerDenial::RequestRate { retry_after_secs });
                    }
                    let tokens = c.remote_tokens.saturating_add(c.minute_tokens);
                    if limits.tokens_per_minute.is_some_and(|tpm| tokens >= tpm) {
                        return Err(LedgerDenial::TokenRate { retry_after_secs });
                    }
                }
                let mut reserved = 0;
                if let Some(budget) = limits.budget {
                    let committed = c.spent.saturating_add(c.reserved);
                    if committed.saturating_add(reservation) > budget.limit
                        || committed >= budget.limit
                    {
                        return Err(LedgerDenial::Budget {
                            reset_at: budget.window.reset_at(now),
                            now,
                        });
                    }
                    c.reserved = c.reserved.saturating_add(reservation);
                    reserved = reservation;
                }
                if limits.requests_per_minute.is_some() {
                    c.requests.add(now_ms, MINUTE_MS, rpm_limit(limits), 1);
                }
                c.minute_requests = c.minute_requests.saturating_add(1);
                c.last_use_ms = now_ms;
                Ok(Admission {
                    window_start: c.window_start,
                    reserved,
                })
            },
            LedgerDenial::Busy,
        )
    }

    fn settle(
        &self,
        token_id: &str,
        limits: &Limits,
        thresholds: &[u8],
        admission: &Admission,
        cost: NanoUsd,
        tokens: u64,
        now_ms: i64,
    ) -> Result<Settlement, StoreError> {
        let now = now_ms.div_euclid(1000);
        self.update(
            token_id,
            |c| {
                c.roll(limits.budget.map(|b| b.window), now);
                if c.window_start == admission.window_start || limits.budget.is_none() {
                    c.reserved = c.reserved.saturating_sub(admission.reserved);
                    c.spent = c.spent.saturating_add(cost);
                } else if c.prev_window_start == admission.window_start {
                    // Admitted before the window turned: its reservation was in the previous
                    // window, and so is its cost. Charged to the current window, it would pass
                    // a limit it reserved nothing under.
                    c.prev_spent = c.prev_spent.saturating_add(cost);
                }
                // Older still (a request longer than a whole window): its window's counters are
                // gone; its cost is in the stats and the audit log only.
                if let Some(tpm) = limits.tokens_per_minute {
                    c.tokens.add(now_ms, MINUTE_MS, tpm, tokens);
                }
                c.roll_minute(now_ms);
                c.minute_tokens = c.minute_tokens.saturating_add(tokens);
                let mut crossed = Vec::new();
                let mut remaining = None;
                if let Some(budget) = limits.budget {
                    remaining = Some(budget.limit.saturating_sub(c.spent));
                    (crossed, c.alerts_fired) = crate::alert::newly_crossed(
                        c.spent,
                        budget.limit,
                        thresholds,
                        c.alerts_fired,
                    );
                }
                Ok(Settlement {
                    spent: c.spent,
                    remaining,
                    crossed,
                })
            },
            StoreError::CasMismatch,
        )
    }

    fn reserve(
        &self,
        token_id: &str,
        limits: &Limits,
        admission: &mut Admission,
        amount: NanoUsd,
        now_ms: i64,
    ) -> Result<(), LedgerDenial> {
        let Some(budget) = limits.budget else {
            return Ok(());
        };
        let now = now_ms.div_euclid(1000);
        let window_start = admission.window_start;
        let fleet = self.fleet;
        let added = self.update(
            token_id,
            |c| {
                c.roll(Some(budget.window), now);
                // If the window turned since admission, the old reservation went with it.
                let rolled = c.window_start != window_start;
                let committed = c.spent.saturating_add(c.reserved);
                if committed.saturating_add(amount) > budget.limit {
                    return Err(LedgerDenial::Budget {
                        reset_at: budget.window.reset_at(now),
                        now,
                    });
                }
                // After the limit changed from the one the leases were claimed under (or if that
                // is not known), only what is committed counts as held (see `lease_limit`): the
                // pool may hold claims made under another limit by other Envoys.
                let allowance = if budget.limit != c.lease_limit {
                    c.allowance.min(committed)
                } else {
                    c.allowance
                };
                if fleet && committed.saturating_add(amount) > allowance {
                    return Err(LedgerDenial::AllowanceShort {
                        short: committed.saturating_add(amount) - allowance,
                    });
                }
                c.reserved = c.reserved.saturating_add(amount);
                let held = if rolled { 0 } else { admission.reserved };
                Ok((c.window_start, held.saturating_add(amount)))
            },
            LedgerDenial::Busy,
        );
        match added {
            Ok((window_start, reserved)) => {
                admission.window_start = window_start;
                admission.reserved = reserved;
                Ok(())
            }
            Err(short @ LedgerDenial::AllowanceShort { .. }) => {
                // The claim that follows is for the window the shortfall is in: when the window
                // turned since admission, that is the new one (the old reservation went with the
                // old window), not the ended window's pool.
                let current = budget.window.start(now);
                if current != admission.window_start {
                    admission.window_start = current;
                    admission.reserved = 0;
                }
                Err(short)
            }
            Err(denial) => Err(denial),
        }
    }

    fn ensure(&self, token_id: &str) -> Result<(), StoreError> {
        if self.store.get(&key(token_id)).is_none() {
            // First loaded by this release: the previous release's counters, if any, carry over.
            let counters = self.legacy(token_id).unwrap_or_default();
            self.store.set(&key(token_id), &counters.encode(), None)?;
        }
        Ok(())
    }
}

fn rpm_limit(limits: &Limits) -> u64 {
    limits.requests_per_minute.unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    const T0: i64 = 1_795_548_089_000; // 2026-11-24T19:21:29Z in ms
    const USD: NanoUsd = 1_000_000_000;

    fn budget(limit: NanoUsd, window: BudgetWindow) -> Limits {
        Limits {
            budget: Some(Budget { limit, window }),
            ..Limits::default()
        }
    }

    #[test]
    fn fleet_budgets_are_bounded_by_the_leases_this_envoy_holds() {
        let s = MemoryStore::new();
        let l = SharedDataLedger::fleet(&s);
        let limits = budget(USD, BudgetWindow::Lifetime);
        let mut a = l.admit("a", &limits, 0, T0).unwrap();
        assert_eq!(
            l.reserve("a", &limits, &mut a, USD / 10, T0),
            Err(LedgerDenial::AllowanceShort { short: USD / 10 })
        );
        l.grant("a", None, a.window_start, USD / 4, USD, T0)
            .unwrap();
        assert_eq!(l.reserve("a", &limits, &mut a, USD / 10, T0), Ok(()));
        l.settle("a", &limits, &[], &a, USD / 5, 0, T0).unwrap();
        // 0.25 held, 0.20 spent: 0.05 more fits, 0.06 does not.
        let mut b = l.admit("a", &limits, 0, T0).unwrap();
        assert!(l.reserve("a", &limits, &mut b, USD / 20, T0).is_ok());
        let mut c = l.admit("a", &limits, 0, T0).unwrap();
        assert!(matches!(
            l.reserve("a", &limits, &mut c, 1, T0),
            Err(LedgerDenial::AllowanceShort { short: 1 })
        ));
        // The limit still comes first.
        assert!(matches!(
            l.reserve("a", &limits, &mut c, 2 * USD, T0),
            Err(LedgerDenial::Budget { .. })
        ));
    }

    #[test]
    fn fleet_rate_limits_count_the_other_envoys_of_the_minute() {
        let s = MemoryStore::new();
        let l = SharedDataLedger::fleet(&s);
        let limits = Limits {
            requests_per_minute: Some(10),
            tokens_per_minute: Some(1_000),
            ..Limits::default()
        };
        let minute = T0.div_euclid(60_000);
        // The other Envoys used 8 requests of this minute: 2 are left here.
        l.set_remote("a", minute, 8, 0, T0).unwrap();
        assert!(l.admit("a", &limits, 0, T0).is_ok());
        assert!(l.admit("a", &limits, 0, T0 + 1).is_ok());
        match l.admit("a", &limits, 0, T0 + 2) {
            Err(LedgerDenial::RequestRate { retry_after_secs }) => {
                // Until the next minute starts (T0 is 29 s into its minute).
                assert_eq!(retry_after_secs, 31);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(l.minute_counts("a"), Some((minute, 2, 0)));
        // Tokens: the fleet used the minute's 1000 already.
        l.set_remote("b", minute, 0, 1_000, T0).unwrap();
        assert!(matches!(
            l.admit("b", &limits, 0, T0),
            Err(LedgerDenial::TokenRate { .. })
        ));
        // A new minute starts from nothing.
        assert!(l.admit("b", &limits, 0, T0 + 60_000).is_ok());
        // Counts of another minute are ignored.
        l.set_remote("c", minute - 1, 100, 0, T0).unwrap();
        assert!(l.admit("c", &limits, 0, T0).is_ok());
    }

    #[test]
    fn a_restart_restores_flushed_spend_without_headroom() {
        let s = MemoryStore::new();
        let l = SharedDataLedger::fleet(&s);
        let limits = budget(USD, BudgetWindow::Lifetime);
        l.restore("a", None, 0, USD / 3, T0).unwrap();
        assert_eq!(l.spent("a"), Some((0, USD / 3)));
        let mut a = l.admit("a", &limits, 0, T0).unwrap();
        assert!(matches!(
            l.reserve("a", &limits, &mut a, 1, T0),
            Err(LedgerDenial::AllowanceShort { short: 1 })
        ));
        // Single-Envoy mode has no allowance to be short of.
        let single = SharedDataLedger::new(&s);
        assert!(single.reserve("a", &limits, &mut a, 1, T0).is_ok());
    }

    #[test]
    fn reservations_prevent_overshoot() {
        let s = MemoryStore::new();
        let l = SharedDataLedger::new(&s);
        let limits = budget(USD, BudgetWindow::Daily);
        // Ten concurrent requests each reserving 0.3 USD: only three fit in 1 USD.
        let admitted: Vec<_> = (0..10)
            .filter_map(|_| l.admit("a", &limits, 3 * USD / 10, T0).ok())
            .collect();
        assert_eq!(admitted.len(), 3);
        assert!(
            l.admit("a", &limits, 1, T0).is_ok(),
            "0.9 USD reserved: 1 nano-USD still fits"
        );
        // Settling at a lower real cost frees the difference.
        for a in &admitted {
            l.settle("a", &limits, &[], a, USD / 10, 0, T0).unwrap();
        }
        let more = l.admit("a", &limits, 3 * USD / 10, T0);
        assert!(more.is_ok(), "{more:?}");
    }

    #[test]
    fn exhausted_budget_denies_with_reset_time_and_window_reset_restores() {
        let s = MemoryStore::new();
        let l = SharedDataLedger::new(&s);
        let limits = budget(USD, BudgetWindow::FixedSeconds(60));
        let a = l.admit("a", &limits, USD, T0).unwrap();
        let st = l
            .settle("a", &limits, &[50, 80, 100], &a, USD, 10, T0)
            .unwrap();
        assert_eq!(st.remaining, Some(0));
        assert_eq!(st.crossed, vec![50, 80, 100]);
        match l.admit("a", &limits, 0, T0) {
            Err(LedgerDenial::Budget {
                reset_at: Some(r), ..
            }) => assert_eq!(r, T0 / 1000 - 29 + 60),
            other => panic!("{other:?}"),
        }
        // Next window: allowed again, alerts re-arm.
        let later = T0 + 31_000;
        let a2 = l.admit("a", &limits, USD / 2, later).unwrap();
        let st2 = l
            .settle("a", &limits, &[50, 80, 100], &a2, USD / 2, 0, later)
            .unwrap();
        assert_eq!(st2.crossed, vec![50]);
        assert_eq!(st2.spent, USD / 2);
    }

    #[test]
    fn alerts_fire_once_per_window() {
        let s = MemoryStore::new();
        let l = SharedDataLedger::new(&s);
        let limits = budget(100, BudgetWindow::Daily);
        let mut all = Vec::new();
        for _ in 0..10 {
            let a = l.admit("a", &limits, 10, T0).unwrap();
            all.extend(
                l.settle("a", &limits, &[50, 80, 100], &a, 10, 0, T0)
                    .unwrap()
                    .crossed,
            );
        }
        assert_eq!(all, vec![50, 80, 100]);
    }

    #[test]
    fn request_rate_limit_and_retry_after() {
        let s = MemoryStore::new();
        let l = SharedDataLedger::new(&s);
        let limits = Limits {
            requests_per_minute: Some(3),
            ..Limits::default()
        };
        for _ in 0..3 {
            l.admit("a", &limits, 0, T0).unwrap();
        }
        match l.admit("a", &limits, 0, T0) {
            Err(LedgerDenial::RequestRate { retry_after_secs }) => {
                assert!((1..=120).contains(&retry_after_secs))
            }
            other => panic!("{other:?}"),
        }
        assert!(
            l.admit("b", &limits, 0, T0).is_ok(),
            "other tokens unaffected"
        );
    }

    #[test]
    fn token_rate_limit_counts_usage_after_the_response() {
        let s = MemoryStore::new();
        let l = SharedDataLedger::new(&s);
        let limits = Limits {
            tokens_per_minute: Some(1000),
            ..Limits::default()
        };
        let a = l.admit("a", &limits, 0, T0).unwrap();
        assert!(l.admit("a", &limits, 0, T0).is_ok(), "not yet counted");
        l.settle("a", &limits, &[], &a, 0, 1500, T0).unwrap();
        assert!(matches!(
            l.admit("a", &limits, 0, T0 + 1000),
            Err(LedgerDenial::TokenRate { .. })
        ));
    }

    struct AlwaysConflict(MemoryStore);
    impl SharedStore for AlwaysConflict {
        fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
            self.0.get(key)
        }
        fn set(&self, _: &str, _: &[u8], _: Option<u32>) -> Result<(), StoreError> {
            Err(StoreError::CasMismatch)
        }
    }

    #[test]
    fn exhausted_retries_fail_closed() {
        let s = AlwaysConflict(MemoryStore::new());
        let l = SharedDataLedger::new(&s);
        assert_eq!(
            l.admit("a", &budget(USD, BudgetWindow::Daily), 1, T0),
            Err(LedgerDenial::Busy)
        );
    }

    #[test]
    fn ensure_does_not_reset_existing_counters() {
        let s = MemoryStore::new();
        let l = SharedDataLedger::new(&s);
        let limits = budget(100, BudgetWindow::Lifetime);
        let a = l.admit("a", &limits, 10, T0).unwrap();
        l.settle("a", &limits, &[], &a, 10, 0, T0).unwrap();
        l.ensure("a").unwrap();
        let a = l.admit("a", &limits, 0, T0).unwrap();
        assert_eq!(l.settle("a", &limits, &[], &a, 0, 0, T0).unwrap().spent, 10);
    }

    #[test]
    fn a_shortfall_after_the_window_turned_is_claimed_for_the_new_window() {
        let s = MemoryStore::new();
        let l = SharedDataLedger::fleet(&s);
        let limits = budget(USD, BudgetWindow::Daily);
        let day = BudgetWindow::Daily.start(T0 / 1000);
        let next_day_ms = (day + 86_400) * 1000;
        l.grant("a", Some(BudgetWindow::Daily), day, USD / 2, USD, T0)
            .unwrap();
        // Admitted in the last second of the day; its body is judged after midnight.
        let mut a = l.admit("a", &limits, 0, next_day_ms - 1).unwrap();
        assert_eq!(a.window_start, day);
        assert!(matches!(
            l.reserve("a", &limits, &mut a, USD / 10, next_day_ms + 5),
            Err(LedgerDenial::AllowanceShort { short }) if short == USD / 10
        ));
        // The claim must go to the new day's pool: the old day's lease is gone with its day.
        assert_eq!(a.window_start, day + 86_400);
        assert_eq!(a.reserved, 0);
        l.grant(
            "a",
            Some(BudgetWindow::Daily),
            a.window_start,
            USD / 10,
            USD,
            next_day_ms + 6,
        )
        .unwrap();
        assert_eq!(
            l.reserve("a", &limits, &mut a, USD / 10, next_day_ms + 7),
            Ok(())
        );
        assert_eq!(a.reserved, USD / 10);
    }

    /// Two Envoys hold half of a $1 pool each; the limit goes down to $0.30. Without a claim
    /// under the new limit, neither may spend from the leases it holds beyond what is committed;
    /// the syncer's return scan gives the surplus back at once, busy or not.
    #[test]
    fn a_lowered_limit_holds_across_the_fleet_before_the_leases_go_back() {
        let (s1, s2) = (MemoryStore::new(), MemoryStore::new());
        let (e1, e2) = (SharedDataLedger::fleet(&s1), SharedDataLedger::fleet(&s2));
        let lifetime = |limit| Limits {
            budget: Some(Budget {
                limit,
                window: BudgetWindow::Lifetime,
            }),
            ..Limits::default()
        };
        let (old, new) = (lifetime(USD), lifetime(USD * 3 / 10));
        for l in [&e1, &e2] {
            l.grant("x", None, 0, USD / 2, USD, T0).unwrap();
            let mut a = l.admit("x", &old, 0, T0).unwrap();
            l.reserve("x", &old, &mut a, USD / 10, T0).unwrap();
            l.settle("x", &old, &[], &a, USD / 10, 0, T0).unwrap();
        }
        // $0.20 spent in all; each Envoy still holds $0.40 of leases claimed under $1.
        for l in [&e1, &e2] {
            let mut a = l.admit("x", &new, 0, T0).unwrap();
            assert_eq!(
                l.reserve("x", &new, &mut a, USD / 20, T0),
                Err(LedgerDenial::AllowanceShort { short: USD / 20 }),
                "a claim under the new limit first"
            );
        }
        // The return scan, although the token was used just now: the surplus goes back.
        assert_eq!(
            e1.take_unused("x", new.budget, 60_000, T0 + 1),
            Ok(Some((0, USD * 4 / 10)))
        );
        // A claim granted under the new limit (the pool is within it, the surplus being back)
        // counts as before.
        e1.grant("x", None, 0, USD / 20, USD * 3 / 10, T0).unwrap();
        let mut a = e1.admit("x", &new, 0, T0).unwrap();
        assert_eq!(e1.reserve("x", &new, &mut a, USD / 20, T0), Ok(()));
        // A raised limit takes nothing back from a busy token.
        assert_eq!(e2.take_unused("x", old.budget, 60_000, T0 + 1), Ok(None));
    }

    fn lifetime(limit: NanoUsd) -> Limits {
        budget(limit, BudgetWindow::Lifetime)
    }

    /// $1 → $3 → $1.80: e1 holds $0.50 claimed under $1; e2 claimed and spent $1.50 under $3
    /// (pool $2.00). e1 must claim under $1.80 before spending (which the pool refuses), not
    /// spend its old lease: a limit other than the one a lease was claimed under, either way.
    #[test]
    fn a_limit_raised_then_lowered_holds_for_an_envoy_that_claimed_under_the_first() {
        let (s1, s2) = (MemoryStore::new(), MemoryStore::new());
        let (e1, e2) = (SharedDataLedger::fleet(&s1), SharedDataLedger::fleet(&s2));
        e1.grant("x", None, 0, USD / 2, USD, T0).unwrap();
        let three = lifetime(3 * USD);
        e2.grant("x", None, 0, USD * 3 / 2, 3 * USD, T0).unwrap();
        let mut a = e2.admit("x", &three, 0, T0).unwrap();
        e2.reserve("x", &three, &mut a, USD * 3 / 2, T0).unwrap();
        e2.settle("x", &three, &[], &a, USD * 3 / 2, 0, T0).unwrap();
        let lowered = lifetime(USD * 18 / 10);
        let mut b = e1.admit("x", &lowered, 0, T0).unwrap();
        assert_eq!(
            e1.reserve("x", &lowered, &mut b, USD / 2, T0),
            Err(LedgerDenial::AllowanceShort { short: USD / 2 })
        );
    }

    /// A store holding `counters` (this release's encoding) as the previous release wrote them:
    /// format 3, the same fields before `lease_limit`, under its own key.
    fn store_of_the_previous_release(id: &str, counters: &[u8]) -> MemoryStore {
        let mut v3 = counters.to_vec();
        v3[0] = STATE_VERSION_3;
        v3.truncate(v3.len() - 24);
        let s = MemoryStore::new();
        s.set(&legacy_key(id), &v3, None).unwrap();
        s
    }

    /// Leases carried over from the previous release (the limit they were claimed under is not
    /// known) do not count once the limit is lowered: a claim first.
    #[test]
    fn leases_of_the_previous_release_do_not_outlive_a_lowered_limit() {
        let s = MemoryStore::new();
        let l = SharedDataLedger::fleet(&s);
        l.grant("x", None, 0, USD / 2, USD, T0).unwrap();
        let (bytes, _) = s.get(&key("x")).unwrap();
        let s = store_of_the_previous_release("x", &bytes);
        let l = SharedDataLedger::fleet(&s);
        let lowered = lifetime(USD / 10);
        let mut a = l.admit("x", &lowered, 0, T0).unwrap();
        assert!(matches!(
            l.reserve("x", &lowered, &mut a, USD / 10, T0),
            Err(LedgerDenial::AllowanceShort { .. })
        ));
    }

    /// A budget taken off (a rate limit kept) and put back within the same day: the day's
    /// spend is still there.
    #[test]
    fn a_budget_taken_off_and_put_back_the_same_day_keeps_the_days_spend() {
        let s = MemoryStore::new();
        let l = SharedDataLedger::new(&s);
        let daily = Limits {
            requests_per_minute: Some(1000),
            ..budget(USD, BudgetWindow::Daily)
        };
        let off = Limits {
            requests_per_minute: Some(1000),
            ..Limits::default()
        };
        let a = l.admit("a", &daily, USD * 8 / 10, T0).unwrap();
        l.settle("a", &daily, &[], &a, USD * 8 / 10, 0, T0).unwrap();
        let b = l.admit("a", &off, 0, T0 + 1_000).unwrap();
        l.settle("a", &off, &[], &b, 5, 0, T0 + 1_000).unwrap();
        assert!(matches!(
            l.admit("a", &daily, USD / 2, T0 + 2_000),
            Err(LedgerDenial::Budget { .. })
        ));
        assert_eq!(l.balance("a"), Some((USD * 8 / 10 + 5, 0)));
    }

    #[test]
    fn the_previous_releases_counters_carry_over_and_are_never_written() {
        let c = Counters {
            window_start: 0,
            spent: 123,
            reserved: 4,
            allowance: 500,
            last_use_ms: 9,
            lease_limit: 999,
            prev_window_start: 3,
            prev_spent: 77,
            ..Counters::default()
        };
        let s = store_of_the_previous_release("a", &c.encode());
        let l = SharedDataLedger::new(&s);
        // Its outstanding reservation settles on the old key, never read again: counted as spent.
        assert_eq!(l.balance("a"), Some((127, 0)));
        l.ensure("a").unwrap();
        assert_eq!(
            Counters::decode(&s.get(&key("a")).unwrap().0),
            Some(Counters {
                spent: 127,
                reserved: 0,
                lease_limit: 0,
                prev_window_start: 0,
                prev_spent: 0,
                ..c.clone()
            })
        );
        // A VM of the previous release finishing a stream rewrites its own key (it would reset a
        // format it does not know): this release's counters are untouched, its key never written.
        s.set(&legacy_key("a"), &[3, 0], None).unwrap();
        let limits = budget(USD, BudgetWindow::Lifetime);
        let a = l.admit("a", &limits, 0, T0).unwrap();
        l.settle("a", &limits, &[], &a, 3, 0, T0).unwrap();
        assert_eq!(l.balance("a").map(|b| b.0), Some(130));
        assert_eq!(s.get(&legacy_key("a")).unwrap().0, vec![3, 0]);
        assert_eq!(Counters::decode(&c.encode()), Some(c));
    }

    /// A request admitted before its budget window turned and settled after: charged to the
    /// window it reserved in, not to the new one (whose limit it would pass unreserved).
    #[test]
    fn a_request_across_a_window_turn_is_charged_to_the_window_it_reserved_in() {
        let s = MemoryStore::new();
        let l = SharedDataLedger::new(&s);
        let limits = budget(USD, BudgetWindow::Daily);
        let day = BudgetWindow::Daily.start(T0 / 1000);
        let midnight_ms = (day + 86_400) * 1000;
        let late = l.admit("a", &limits, USD / 2, midnight_ms - 1_000).unwrap();
        // After midnight another request takes the whole new day.
        let b = l.admit("a", &limits, USD, midnight_ms + 1_000).unwrap();
        l.settle("a", &limits, &[], &b, USD, 0, midnight_ms + 2_000)
            .unwrap();
        // The late one ends now: the new day stays at its limit; the old day gets the cost.
        let st = l
            .settle("a", &limits, &[], &late, USD / 2, 0, midnight_ms + 3_000)
            .unwrap();
        assert_eq!(st.spent, USD);
        assert_eq!(
            l.spent_with_previous("a"),
            Some(((day + 86_400, USD), Some((day, USD / 2))))
        );
        // A request older than the previous window is charged to neither.
        let two_days_later = midnight_ms + 86_400_000;
        let c = l.admit("a", &limits, 0, two_days_later).unwrap();
        l.settle("a", &limits, &[], &c, 7, 0, two_days_later)
            .unwrap();
        l.settle("a", &limits, &[], &late, 5, 0, two_days_later)
            .unwrap();
        assert_eq!(
            l.spent_with_previous("a"),
            Some(((day + 2 * 86_400, 7), Some((day + 86_400, USD))))
        );
    }

    #[test]
    fn reserve_tops_up_an_admission_without_overshooting() {
        let store = MemoryStore::new();
        let ledger = SharedDataLedger::new(&store);
        let limits = budget(10 * USD, BudgetWindow::Daily);
        ledger.ensure("t").unwrap();
        let mut a = ledger.admit("t", &limits, 0, T0).unwrap();
        ledger.reserve("t", &limits, &mut a, 6 * USD, T0).unwrap();
        assert_eq!(a.reserved, 6 * USD);
        let mut b = ledger.admit("t", &limits, 0, T0).unwrap();
        assert_eq!(
            ledger.reserve("t", &limits, &mut b, 5 * USD, T0),
            Err(LedgerDenial::Budget {
                reset_at: BudgetWindow::Daily.reset_at(T0 / 1000),
                now: T0 / 1000
            })
        );
        ledger.reserve("t", &limits, &mut b, 4 * USD, T0).unwrap();
        // Settling gives back exactly what was reserved.
        ledger.settle("t", &limits, &[], &a, USD, 0, T0).unwrap();
        let s = ledger.settle("t", &limits, &[], &b, USD, 0, T0).unwrap();
        assert_eq!(s.spent, 2 * USD);
        let mut c = ledger.admit("t", &limits, 0, T0).unwrap();
        ledger.reserve("t", &limits, &mut c, 8 * USD, T0).unwrap();
    }

    /// The documented bound, for any interleaving of concurrent requests: recorded spend never
    /// exceeds the limit by more than the sum of what requests cost beyond their reservations
    /// (zero when every real cost is within its reservation, as the reservation bound ensures
    /// for text requests).
    mod overshoot_bound {
        use super::*;
        use proptest::prelude::*;

        #[derive(Debug, Clone)]
        struct Request {
            reservation: NanoUsd,
            cost: NanoUsd,
        }

        enum Stage {
            New,
            Admitted(Admission),
            Reserved(Admission),
            Done,
        }

        fn requests(max_excess: NanoUsd) -> impl Strategy<Value = Vec<Request>> {
            prop::collection::vec(
                (1..=400 * USD / 1000, 0..=1000u64, 0..=max_excess).prop_map(
                    move |(reservation, permille, excess)| Request {
                        reservation,
                        cost: reservation * permille / 1000 + excess,
                    },
                ),
                1..48,
            )
        }

        /// Runs the requests the way the glue does (admit, reserve once the body is judged,
        /// settle at the end; a refused reservation gives its admission back), in the order
        /// the schedule picks. Returns the final spend and the sum of the admitted excesses.
        fn run(limit: NanoUsd, reqs: &[Request], schedule: &[usize]) -> (NanoUsd, NanoUsd) {
            let store = MemoryStore::new();
            let ledger = SharedDataLedger::new(&store);
            let limits = budget(limit, BudgetWindow::Lifetime);
            ledger.ensure("t").unwrap();
            let mut stages: Vec<Stage> = reqs.iter().map(|_| Stage::New).collect();
            let (mut spent, mut excess) = (0, 0);
            let order = schedule
                .iter()
                .map(|i| i % reqs.len())
                .chain((0..reqs.len()).flat_map(|i| [i, i, i]));
            for i in order {
                let req = &reqs[i];
                stages[i] = match std::mem::replace(&mut stages[i], Stage::Done) {
                    Stage::New => match ledger.admit("t", &limits, 0, T0) {
                        Ok(a) => Stage::Admitted(a),
                        Err(_) => Stage::Done,
                    },
                    Stage::Admitted(mut a) => {
                        match ledger.reserve("t", &limits, &mut a, req.reservation, T0) {
                            Ok(()) => Stage::Reserved(a),
                            Err(_) => {
                                ledger.settle("t", &limits, &[], &a, 0, 0, T0).unwrap();
                                Stage::Done
                            }
                        }
                    }
                    Stage::Reserved(a) => {
                        let s = ledger
                            .settle("t", &limits, &[], &a, req.cost, 0, T0)
                            .unwrap();
                        spent = s.spent;
                        excess += req.cost.saturating_sub(req.reservation);
                        Stage::Done
                    }
                    Stage::Done => Stage::Done,
                };
            }
            (spent, excess)
        }

        proptest! {
            #[test]
            fn spend_never_exceeds_the_limit_when_costs_are_within_reservations(
                limit in 1..=2 * USD,
                reqs in requests(0),
                schedule in prop::collection::vec(0usize..1000, 0..200),
            ) {
                let (spent, _) = run(limit, &reqs, &schedule);
                prop_assert!(spent <= limit, "spent {spent} > limit {limit}");
            }

            #[test]
            fn overshoot_is_at_most_the_sum_of_excesses(
                limit in 1..=2 * USD,
                reqs in requests(USD / 10),
                schedule in prop::collection::vec(0usize..1000, 0..200),
            ) {
                let (spent, excess) = run(limit, &reqs, &schedule);
                prop_assert!(spent <= limit + excess, "spent {spent} > {limit} + {excess}");
            }
        }
    }
}
