//! Fleet mode: a request that needs more of the budget than this Envoy holds waits for one lease
//! claim (`fleet::lease`): read the pool and this node's claim, then add to both in a guarded
//! transaction, then reserve again. Contention re-reads (a few times); etcd unreachable, or the
//! fleet's budget spent, refuses the request: fail closed.

use super::host::Host;
use super::{ledger_denial, release, Exchange, Flow, Stream};
use crate::access::BodyVerdict;
use crate::denial::Denial;
use crate::fleet::lease::{self, Claims, CLAIM_ATTEMPTS, TXN_PATH};
use crate::ledger::{Admission, Ledger, LedgerDenial};
use crate::money::NanoUsd;
use crate::stream::active::Active;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Reading,
    Writing { amount: NanoUsd },
}

pub(super) struct Pending {
    pub(super) admission: Admission,
    verdict: BodyVerdict,
    request_bytes: u64,
    short: NanoUsd,
    attempts: u32,
    step: Step,
    call: Option<u32>,
}

impl Pending {
    pub(super) fn new(
        admission: Admission,
        verdict: BodyVerdict,
        request_bytes: u64,
        short: NanoUsd,
    ) -> Self {
        Pending {
            admission,
            verdict,
            request_bytes,
            short,
            attempts: 0,
            step: Step::Reading,
            call: None,
        }
    }
}

impl Stream {
    /// Sends the claim's first call and holds the request.
    pub(super) fn start_claim(
        &mut self,
        host: &dyn Host,
        active: &Active,
        mut pending: Pending,
    ) -> Flow {
        pending.step = Step::Reading;
        match self.send(host, active, &pending, None) {
            Some(call) => {
                pending.call = Some(call);
                self.claim = Some(pending);
                Flow::Pause
            }
            None => {
                self.give_up(host, active, pending, Denial::LedgerBusy);
                Flow::Pause
            }
        }
    }

    /// The reply to a claim call. Resumes the request (forwarded) or answers it (refused).
    pub fn on_call_response(&mut self, host: &dyn Host, call: u32, body_size: usize) {
        let Some(active) = self.active.clone() else {
            return;
        };
        let Some(mut pending) = self.claim.take() else {
            return;
        };
        if pending.call != Some(call) {
            self.claim = Some(pending);
            return;
        }
        let (status, body) = host.call_response(body_size);
        let (Some((token, _)), Some(_)) = (self.token.clone(), active.fleet_context()) else {
            return;
        };
        let Some(budget) = token.rules.limits.budget else {
            return;
        };
        let window = pending.admission.window_start;
        match pending.step {
            Step::Reading => {
                let Some(claims) = (status == 200).then(|| lease::parse_read(&body)).flatten()
                else {
                    self.give_up(host, &active, pending, Denial::LedgerBusy);
                    return;
                };
                let Some(amount) = lease::grant(budget.limit, claims.pool, pending.short) else {
                    let now = host.now_unix_ms().unwrap_or(0).div_euclid(1000);
                    let denial = Denial::BudgetExceeded {
                        reset_at: budget.window.reset_at(now),
                    };
                    self.give_up(host, &active, pending, denial);
                    return;
                };
                pending.step = Step::Writing { amount };
                self.resend(host, &active, pending, Some((claims, amount)));
            }
            Step::Writing { amount } => {
                match (status == 200).then(|| lease::parse_write(&body)).flatten() {
                    Some(true) => {
                        let now = host.now_unix_ms().unwrap_or(0);
                        let granted = active.ledger(host).grant(
                            &token.id,
                            Some(budget.window),
                            window,
                            amount,
                            now,
                        );
                        active.metrics.lease_claimed(host);
                        if granted.is_err() {
                            self.give_up(host, &active, pending, Denial::LedgerBusy);
                            return;
                        }
                        self.after_grant(host, &active, pending);
                    }
                    // Another Envoy (or worker) claimed in between: read again.
                    Some(false) => self.retry(host, &active, pending),
                    None => self.give_up(host, &active, pending, Denial::LedgerBusy),
                }
            }
        }
    }

    /// With the lease added, reserve again: forwarded, or (if other requests took it meanwhile)
    /// another round.
    fn after_grant(&mut self, host: &dyn Host, active: &Active, mut pending: Pending) {
        let Some((token, _)) = self.token.clone() else {
            return;
        };
        let now = host.now_unix_ms().unwrap_or(0);
        let mut admission = pending.admission;
        let reserved = active.ledger(host).reserve(
            &token.id,
            &token.rules.limits,
            &mut admission,
            pending.verdict.reservation,
            now,
        );
        match reserved {
            Ok(()) => {
                let exchange = Exchange {
                    admission: Some(admission),
                    request_model: pending.verdict.model.take(),
                    request_bytes: pending.request_bytes,
                    status: 0,
                    scanner: None,
                    unreadable: false,
                    response_ended: false,
                };
                if self.forward(host, active, exchange) == Flow::Continue {
                    host.resume_request();
                }
            }
            Err(LedgerDenial::AllowanceShort { short }) => {
                pending.short = short;
                self.retry(host, active, pending);
            }
            Err(e) => self.give_up(host, active, pending, ledger_denial(e)),
        }
    }

    fn retry(&mut self, host: &dyn Host, active: &Active, mut pending: Pending) {
        pending.attempts += 1;
        if pending.attempts >= CLAIM_ATTEMPTS {
            self.give_up(host, active, pending, Denial::LedgerBusy);
            return;
        }
        pending.step = Step::Reading;
        self.resend(host, active, pending, None);
    }

    fn resend(
        &mut self,
        host: &dyn Host,
        active: &Active,
        mut pending: Pending,
        write: Option<(Claims, NanoUsd)>,
    ) {
        match self.send(host, active, &pending, write) {
            Some(call) => {
                pending.call = Some(call);
                self.claim = Some(pending);
            }
            None => {
                self.give_up(host, active, pending, Denial::LedgerBusy);
            }
        }
    }

    fn send(
        &self,
        host: &dyn Host,
        active: &Active,
        pending: &Pending,
        write: Option<(Claims, NanoUsd)>,
    ) -> Option<u32> {
        let fleet = active.fleet_context()?;
        let (token, _) = self.token.as_ref()?;
        let prefix = &fleet.settings.prefix;
        let window = pending.admission.window_start;
        let pool = lease::pool_key(prefix, &token.id, window);
        let claimed = lease::claimed_key(prefix, &fleet.node, &token.id, window);
        let body = match write {
            None => lease::read_body(&pool, &claimed),
            Some((seen, amount)) => lease::write_body(&pool, &claimed, &seen, amount),
        };
        host.dispatch_call(
            &fleet.settings.cluster,
            &fleet.settings.authority,
            TXN_PATH,
            &body,
            fleet.settings.timeout_ms,
        )
    }

    /// Refuses the held request (one local reply) and gives its admission back.
    fn give_up(&mut self, host: &dyn Host, active: &Active, pending: Pending, denial: Denial) {
        if denial == Denial::LedgerBusy {
            active.metrics.lease_claim_failed(host);
        }
        if let Some((token, _)) = self.token.clone() {
            release(host, active, &token, Some(pending.admission));
        }
        self.deny(host, &denial);
    }
}
