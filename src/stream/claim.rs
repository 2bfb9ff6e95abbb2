//! Fleet mode: a request that needs more of a budget than this Envoy holds waits for one lease
//! claim (`fleet::lease`): read the pool and this node's claim, then add to both in a guarded
//! transaction, then reserve again. Contention re-reads (a few times); etcd unreachable, or the
//! fleet's budget spent, refuses the request: fail closed. The budget is the token's or its
//! team's (`Level`): a team's leases are keyed by its subject id like a token's.

use super::host::Host;
use super::levels::Level;
use super::{Flow, Reserving, Stream};
use crate::denial::Denial;
use crate::fleet::lease::{self, Claims, CLAIM_ATTEMPTS, TXN_PATH};
use crate::money::NanoUsd;
use crate::stream::active::Active;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Reading,
    Writing {
        amount: NanoUsd,
        marker: u64,
    },
    /// The write's reply was lost (a timeout, a 5xx): etcd may have applied it. Reading the
    /// node's claim back tells: it carries this write's marker only if this write was applied
    /// (and no claim of this node came after it; then it is lost, as before, never granted twice).
    Verifying {
        amount: NanoUsd,
        marker: u64,
    },
}

pub(super) struct Pending {
    pub(super) request: Reserving,
    /// The level whose budget is short.
    level: Level,
    short: NanoUsd,
    attempts: u32,
    step: Step,
    call: Option<u32>,
}

impl Pending {
    pub(super) fn new(request: Reserving, level: Level, short: NanoUsd) -> Self {
        Pending {
            request,
            level,
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
        let (Some(subject), Some(_)) =
            (self.subject(pending.level).cloned(), active.fleet_context())
        else {
            return;
        };
        let (Some(budget), Some(admission)) = (
            subject.limits().budget,
            pending.request.admissions.get(pending.level),
        ) else {
            return;
        };
        let window = admission.window_start;
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
                let marker = lease::marker(pending.call.unwrap_or(0));
                pending.step = Step::Writing { amount, marker };
                self.resend(host, &active, pending, Some((claims, amount, marker)));
            }
            Step::Verifying { amount, marker } => {
                let Some(now) = (status == 200).then(|| lease::parse_read(&body)).flatten() else {
                    self.give_up(host, &active, pending, Denial::LedgerBusy);
                    return;
                };
                if now.node_marker == Some(marker) {
                    self.granted(host, &active, pending, window, amount);
                } else {
                    // Not applied (or claimed over since): claim again from what is there now.
                    self.retry(host, &active, pending);
                }
            }
            Step::Writing { amount, marker } => {
                match (status == 200).then(|| lease::parse_write(&body)).flatten() {
                    Some(true) => self.granted(host, &active, pending, window, amount),
                    // Another Envoy (or worker) claimed in between: read again.
                    Some(false) => self.retry(host, &active, pending),
                    // Applied or not, nobody said: read the claim back.
                    None => {
                        pending.step = Step::Verifying { amount, marker };
                        self.resend(host, &active, pending, None);
                    }
                }
            }
        }
    }

    /// The claim's write went through: the lease is this Envoy's, then the request goes on.
    fn granted(
        &mut self,
        host: &dyn Host,
        active: &Active,
        pending: Pending,
        window: i64,
        amount: NanoUsd,
    ) {
        let (Some(subject), Some(budget)) = (
            self.subject(pending.level).cloned(),
            self.subject(pending.level).and_then(|s| s.limits().budget),
        ) else {
            self.give_up(host, active, pending, Denial::LedgerBusy);
            return;
        };
        let now = host.now_unix_ms().unwrap_or(0);
        let granted = active.ledger(host).grant(
            subject.id(),
            Some(budget.window),
            window,
            amount,
            budget.limit,
            now,
        );
        active.metrics.lease_claimed(host);
        if granted.is_err() {
            self.give_up(host, active, pending, Denial::LedgerBusy);
            return;
        }
        self.after_grant(host, active, pending);
    }

    /// With the lease added, reserve again from the level that was short: forwarded, or (if
    /// other requests took the lease meanwhile) another round.
    fn after_grant(&mut self, host: &dyn Host, active: &Active, pending: Pending) {
        let attempts = pending.attempts;
        let level = pending.level;
        if self.reserve_from(host, active, pending.request, level) == Flow::Continue {
            host.resume_request();
        } else if let Some(next) = self.claim.as_mut() {
            // Short again at the same level: that counts as another round.
            if next.level == level {
                next.attempts = attempts + 1;
                if next.attempts >= CLAIM_ATTEMPTS {
                    if let Some(p) = self.claim.take() {
                        self.give_up(host, active, p, Denial::LedgerBusy);
                    }
                }
            }
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
        write: Option<(Claims, NanoUsd, u64)>,
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
        write: Option<(Claims, NanoUsd, u64)>,
    ) -> Option<u32> {
        let fleet = active.fleet_context()?;
        let subject = self.subject(pending.level)?;
        let prefix = &fleet.settings.prefix;
        let window = pending.request.admissions.get(pending.level)?.window_start;
        let pool = lease::pool_key(prefix, subject.id(), window);
        let claimed = lease::claimed_key(prefix, &fleet.node, subject.id(), window);
        let body = match write {
            None => lease::read_body(&pool, &claimed),
            Some((seen, amount, marker)) => {
                lease::claim_body(&pool, &claimed, &seen, amount, marker)
            }
        };
        host.dispatch_call(
            &fleet.settings.cluster,
            &fleet.settings.authority,
            TXN_PATH,
            &body,
            fleet.settings.timeout_ms,
        )
    }

    /// Refuses the held request (one local reply) and gives its admissions back; a level in
    /// dry run lets a budget refusal through instead and the request goes on to the next level.
    fn give_up(&mut self, host: &dyn Host, active: &Active, pending: Pending, denial: Denial) {
        if denial == Denial::LedgerBusy {
            active.metrics.lease_claim_failed(host);
        }
        match self.refuse_at(active, pending.level, denial) {
            Ok(()) => match pending.level.next() {
                Some(next) => {
                    if self.reserve_from(host, active, pending.request, next) == Flow::Continue {
                        host.resume_request();
                    }
                }
                None => {
                    if self.forward_reserved(host, active, pending.request) == Flow::Continue {
                        host.resume_request();
                    }
                }
            },
            Err(denial) => {
                self.release(host, active, pending.request.admissions);
                self.deny(host, &denial);
            }
        }
    }
}
