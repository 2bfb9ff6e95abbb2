//! One HTTP stream through the filter, as a state machine over host-neutral phases: authenticate,
//! apply the token's rules and the route table, swap the key (or refuse with one local reply),
//! judge the whole request body before anything is forwarded, then watch the response go by and
//! charge what it cost. The proxy-wasm glue only forwards callbacks here; the host sits behind
//! `Host`, so every phase and every early end is tested natively (`tests.rs`).

pub mod active;
mod claim;
pub mod host;
pub mod metrics;

#[cfg(test)]
mod fake;
#[cfg(test)]
mod tests;

use std::rc::Rc;

use crate::access::{self, BodyVerdict};
use crate::alert::BudgetAlert;
use crate::audit::AuditFacts;
use crate::authenticate::{authenticate, Credentials};
use crate::denial::Denial;
use crate::ledger::{Admission, Ledger, LedgerDenial};
use crate::policy::TokenPolicy;
use crate::routes::{self, RouteKind};
use crate::rules::source_ip::parse_envoy_address;
use crate::spend::{self, ResponseFacts};
use crate::usage::{BodyKind, UsageScanner};
use active::Active;
use host::{Host, LogLevel};
use metrics::{TokenMetrics, Usage};

/// What the glue tells the host after a phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// Hold the data (request body being judged) or stop (a local reply was sent).
    Pause,
}

pub struct Stream {
    active: Option<Rc<Active>>,
    audit: AuditFacts,
    /// Set once the token authenticated.
    token: Option<(Rc<TokenPolicy>, Rc<TokenMetrics>)>,
    /// The route's kind, from the table, once the route was allowed.
    route: Option<RouteKind>,
    /// Headers went on; the body is held until it is complete and judged.
    awaiting_body: Option<Option<Admission>>,
    /// Set once the request was forwarded.
    exchange: Option<Exchange>,
    /// Fleet mode: the request waits for a budget lease (`claim.rs`).
    claim: Option<claim::Pending>,
}

/// An allowed request on its way: what accounting needs when it is over.
struct Exchange {
    admission: Option<Admission>,
    request_model: Option<String>,
    request_bytes: u64,
    status: u32,
    scanner: Option<UsageScanner>,
    /// The response came in an encoding the scanner cannot read.
    unreadable: bool,
    response_ended: bool,
}

impl Stream {
    pub fn new(active: Option<Rc<Active>>) -> Self {
        Stream {
            active,
            audit: AuditFacts::default(),
            token: None,
            route: None,
            awaiting_body: None,
            exchange: None,
            claim: None,
        }
    }

    pub fn on_request_headers(&mut self, host: &dyn Host, end_of_stream: bool) -> Flow {
        let Some(active) = self.active.clone() else {
            // No valid configuration: Envoy would not have started, but never forward anyway.
            return self.deny(host, &Denial::PolicyUnavailable);
        };
        let Some(now_ms) = host.now_unix_ms() else {
            return self.deny(host, &Denial::PolicyUnavailable);
        };
        let kind = match self.check_headers(host, &active, now_ms) {
            Ok(kind) => kind,
            Err(denial) => return self.deny(host, &denial),
        };
        let admission = match self.admit_and_swap(host, &active) {
            Ok(a) => a,
            Err(denial) => return self.deny(host, &denial),
        };
        let needs_body = self
            .token
            .as_ref()
            .is_some_and(|(t, _)| access::needs_body(&t.rules, kind));
        if needs_body && !end_of_stream {
            // Headers go on (Envoy's buffer filter after this one holds them); the body is held
            // here until it is complete: at its end of stream, or at the request trailers.
            self.awaiting_body = Some(admission);
            return Flow::Continue;
        }
        let request_bytes = content_length(host);
        self.judge_and_reserve(host, &active, admission, None, request_bytes)
    }

    pub fn on_request_body(
        &mut self,
        host: &dyn Host,
        body_size: usize,
        end_of_stream: bool,
    ) -> Flow {
        let Some(active) = self.active.clone() else {
            return Flow::Continue;
        };
        if self.awaiting_body.is_none() {
            // No body rule, or already refused: pass it on.
            return Flow::Continue;
        }
        let limit = active.policy.settings.max_body_bytes;
        if body_size as u64 > limit {
            self.release_awaiting(host, &active);
            return self.deny(host, &Denial::BodyTooLarge { limit });
        }
        if !end_of_stream {
            return Flow::Pause;
        }
        self.finish_body(host, &active)
    }

    /// Trailers end the request: the body held so far is all of it (HTTP/2 DATA without
    /// END_STREAM then trailers, or HTTP/1.1 chunked with trailers).
    pub fn on_request_trailers(&mut self, host: &dyn Host) -> Flow {
        match (self.active.clone(), self.awaiting_body.is_some()) {
            (Some(active), true) => self.finish_body(host, &active),
            _ => Flow::Continue,
        }
    }

    pub fn on_response_headers(&mut self, host: &dyn Host, end_of_stream: bool) -> Flow {
        if let Some(exchange) = &mut self.exchange {
            exchange.status = host
                .response_header(":status")
                .and_then(|s| std::str::from_utf8(&s).ok()?.parse().ok())
                .unwrap_or(0);
            let kind = host
                .response_header("content-type")
                .and_then(|ct| String::from_utf8(ct).ok())
                .map_or(BodyKind::Json, |ct| BodyKind::from_content_type(&ct));
            exchange.unreadable = host
                .response_header("content-encoding")
                .is_some_and(|e| !e.trim_ascii().eq_ignore_ascii_case(b"identity"));
            exchange.scanner = Some(UsageScanner::new(kind));
            exchange.response_ended = end_of_stream;
        }
        Flow::Continue
    }

    pub fn on_response_body(
        &mut self,
        host: &dyn Host,
        body_size: usize,
        end_of_stream: bool,
    ) -> Flow {
        if let Some(exchange) = &mut self.exchange {
            if let (Some(scanner), Some(chunk)) =
                (exchange.scanner.as_mut(), host.response_chunk(body_size))
            {
                scanner.feed(&chunk);
            }
            exchange.response_ended |= end_of_stream;
        }
        // Never buffer: every chunk goes on to the client at once.
        Flow::Continue
    }

    /// The stream is over, however it ended.
    pub fn on_log(&mut self, host: &dyn Host) {
        if let Some(active) = self.active.clone() {
            // The client went away (or another filter replied) before the body was complete, or
            // while its request waited for a lease: nothing was forwarded.
            self.release_awaiting(host, &active);
            if let (Some(pending), Some((token, _))) = (self.claim.take(), self.token.clone()) {
                release(host, &active, &token, Some(pending.admission));
            }
        }
        self.account(host);
    }

    fn deny(&mut self, host: &dyn Host, denial: &Denial) -> Flow {
        if let Some(active) = &self.active {
            active.metrics.denied(host, denial);
        }
        if let Some((_, metrics)) = &self.token {
            metrics.denied(host, denial);
        }
        self.audit.decision = Some(denial.code());
        self.write_decision(host);
        let extra = denial.headers();
        let mut headers: Vec<(&str, &str)> = vec![("content-type", "application/json")];
        headers.extend(extra.iter().map(|(k, v)| (*k, v.as_str())));
        host.send_local_reply(denial.status(), &headers, &denial.body());
        Flow::Pause
    }

    fn write_decision(&self, host: &dyn Host) {
        for (name, value) in self.audit.decision_entries() {
            host.set_filter_state(name, value.as_bytes());
        }
    }

    /// Everything the body is not needed for: the token, the connection, the route.
    fn check_headers(
        &mut self,
        host: &dyn Host,
        active: &Active,
        now_ms: i64,
    ) -> Result<RouteKind, Denial> {
        let authorization = host.request_header("authorization");
        let x_api_key = host.request_header("x-api-key");
        let credentials = Credentials {
            authorization: authorization.as_deref(),
            x_api_key: x_api_key.as_deref(),
        };
        let lookup = |id: &str| active.token(host, id);
        let token = authenticate(
            &lookup,
            &active.verifier,
            &credentials,
            now_ms.div_euclid(1000),
        )?;
        self.audit.token_id = Some(token.id.clone());
        let metrics = active.metrics.token(host, &token.id);
        self.token = Some((token.clone(), metrics));

        let source = host
            .property(&["source", "address"])
            .as_deref()
            .and_then(parse_envoy_address);
        let country = if token.rules.countries.is_some() {
            host.request_header(&active.policy.settings.country_header)
        } else {
            None
        };
        access::check_connection(&token.rules, source, country.as_deref())?;

        let path = host.request_header(":path").unwrap_or_default();
        let path = routes::canonical_path(&path).ok_or(Denial::PathNotCanonical)?;
        let method = host.request_header(":method").unwrap_or_default();
        let kind = access::check_route(&token.rules, routes::lookup(&method, path))?;
        self.route = Some(kind);
        Ok(kind)
    }

    /// Admission (rate limits, and the budget not already exhausted) and the key swap. Runs in
    /// the headers phase: proxy-wasm cannot hold request headers while reading the body (the
    /// host turns a header pause into a full stop), so everything that can be judged without
    /// the body is judged before anything is forwarded.
    fn admit_and_swap(
        &mut self,
        host: &dyn Host,
        active: &Active,
    ) -> Result<Option<Admission>, Denial> {
        let Some((token, _)) = self.token.clone() else {
            return Err(Denial::PolicyUnavailable);
        };
        let mut admission = None;
        if token.rules.limits.is_tracked() {
            let now_ms = host.now_unix_ms().ok_or(Denial::LedgerBusy)?;
            let admitted = active
                .ledger(host)
                .admit(&token.id, &token.rules.limits, 0, now_ms)
                .map_err(ledger_denial)?;
            admission = Some(admitted);
            let limits = &token.rules.limits;
            if active.fleet_context().is_some()
                && (limits.requests_per_minute.is_some() || limits.tokens_per_minute.is_some())
            {
                // The syncer shares this Envoy's count of the minute with the fleet.
                host.mark_spent(&token.id);
            }
        }
        let Some(upstream_authorization) = active.policy.authorization_for(token.upstream_key)
        else {
            release(host, active, &token, admission);
            return Err(Denial::KeyUnavailable);
        };
        // `authorization` is replaced, `x-api-key` removed: no shield token goes upstream. The
        // upstream is asked for an uncompressed response, the only kind the usage scanner reads
        // (Envoy's compressor, placed before ShieldKey, compresses for the client again).
        let swapped = host.remove_request_header("x-api-key")
            && host.set_request_header("authorization", upstream_authorization.expose())
            && host.set_request_header("accept-encoding", b"identity");
        if !swapped {
            release(host, active, &token, admission);
            return Err(Denial::KeyUnavailable);
        }
        Ok(admission)
    }

    fn finish_body(&mut self, host: &dyn Host, active: &Active) -> Flow {
        let Some(admission) = self.awaiting_body.take() else {
            return Flow::Continue;
        };
        let body = host.request_body().unwrap_or_default();
        let request_bytes = body.len() as u64;
        self.judge_and_reserve(host, active, admission, Some(&body), request_bytes)
    }

    /// The body rules (model, output cap, size), then the budget reservation and forwarding. A
    /// refusal here sends a local reply before the buffered request is released upstream.
    fn judge_and_reserve(
        &mut self,
        host: &dyn Host,
        active: &Active,
        admission: Option<Admission>,
        body: Option<&[u8]>,
        request_bytes: u64,
    ) -> Flow {
        let (Some((token, _)), Some(kind)) = (self.token.clone(), self.route) else {
            return self.deny(host, &Denial::PolicyUnavailable);
        };
        let verdict = if access::needs_body(&token.rules, kind) {
            access::judge_body(&token.rules, &active.policy.settings, kind, body)
        } else {
            Ok(BodyVerdict::default())
        };
        match verdict {
            Ok(verdict) => {
                self.audit.model = verdict.model.clone();
                self.reserve_and_forward(host, active, admission, verdict, request_bytes)
            }
            Err(denial) => {
                release(host, active, &token, admission);
                self.deny(host, &denial)
            }
        }
    }

    /// Reserves the request's worst case and forwards it. In fleet mode, when this Envoy's share
    /// of the budget is short, the request waits for one lease claim (`claim.rs`).
    fn reserve_and_forward(
        &mut self,
        host: &dyn Host,
        active: &Active,
        mut admission: Option<Admission>,
        verdict: BodyVerdict,
        request_bytes: u64,
    ) -> Flow {
        let Some((token, _)) = self.token.clone() else {
            return self.deny(host, &Denial::PolicyUnavailable);
        };
        if let (Some(admitted), true) = (admission.as_mut(), verdict.reservation > 0) {
            let reserved = host
                .now_unix_ms()
                .ok_or(LedgerDenial::Busy)
                .and_then(|now_ms| {
                    active.ledger(host).reserve(
                        &token.id,
                        &token.rules.limits,
                        admitted,
                        verdict.reservation,
                        now_ms,
                    )
                });
            match reserved {
                Ok(()) => {}
                Err(LedgerDenial::AllowanceShort { short }) if active.fleet_context().is_some() => {
                    let pending = claim::Pending::new(*admitted, verdict, request_bytes, short);
                    return self.start_claim(host, active, pending);
                }
                Err(e) => {
                    release(host, active, &token, admission);
                    return self.deny(host, &ledger_denial(e));
                }
            }
        }
        let exchange = Exchange {
            admission,
            request_model: verdict.model,
            request_bytes,
            status: 0,
            scanner: None,
            unreadable: false,
            response_ended: false,
        };
        self.forward(host, active, exchange)
    }

    fn forward(&mut self, host: &dyn Host, active: &Active, exchange: Exchange) -> Flow {
        self.audit.decision = Some("allowed");
        self.write_decision(host);
        active.metrics.allowed(host);
        if let Some((_, metrics)) = &self.token {
            metrics.allowed(host);
        }
        self.exchange = Some(exchange);
        Flow::Continue
    }

    fn release_awaiting(&mut self, host: &dyn Host, active: &Active) {
        if let (Some(admission), Some((token, _))) = (self.awaiting_body.take(), &self.token) {
            release(host, active, token, admission);
        }
    }

    /// The response is over (normally or not): charge it, settle the reservation, report.
    fn account(&mut self, host: &dyn Host) {
        let (Some(active), Some((token, metrics)), Some(exchange), Some(kind)) = (
            self.active.clone(),
            self.token.clone(),
            self.exchange.take(),
            self.route,
        ) else {
            return;
        };
        let scan = exchange
            .scanner
            .as_ref()
            .map(UsageScanner::result)
            .unwrap_or_default();
        let complete = exchange.response_ended
            && exchange
                .scanner
                .as_ref()
                .is_none_or(UsageScanner::is_complete);
        let bytes_seen = exchange
            .scanner
            .as_ref()
            .map_or(0, UsageScanner::bytes_seen);
        if exchange.unreadable {
            active.metrics.unreadable_response(host);
        }
        let reserved = exchange.admission.map_or(0, |a| a.reserved);
        let charge = spend::charge(
            &active.policy.settings.prices,
            kind,
            exchange.request_model.as_deref(),
            reserved,
            &ResponseFacts {
                status: exchange.status,
                scan: &scan,
                complete,
                unreadable: exchange.unreadable,
                bytes_seen,
                request_bytes: exchange.request_bytes,
            },
        );
        let usage = Usage {
            prompt_tokens: charge.prompt_tokens,
            completion_tokens: charge.completion_tokens,
            cost: charge.cost,
            estimated: charge.estimated,
        };
        metrics.settled(host, &usage);
        let priced_model = scan
            .model
            .as_deref()
            .or(exchange.request_model.as_deref())
            .and_then(|m| active.policy.settings.prices.table.canonical_name(m));
        active
            .metrics
            .model(host, priced_model.unwrap_or("unpriced"))
            .settled(host, &usage);

        self.audit.prompt_tokens = charge.prompt_tokens;
        self.audit.completion_tokens = charge.completion_tokens;
        self.audit.cost = charge.cost;
        self.audit.estimated = charge.estimated;
        if self.audit.model.is_none() {
            self.audit.model = scan.model.clone();
        }
        for (name, value) in self.audit.accounting_entries() {
            host.set_filter_state(name, value.as_bytes());
        }

        let Some(admission) = exchange.admission else {
            return;
        };
        let Some(now_ms) = host.now_unix_ms() else {
            return;
        };
        let limits = &token.rules.limits;
        let settled = active.ledger(host).settle(
            &token.id,
            limits,
            &active.policy.settings.alert_thresholds,
            &admission,
            charge.cost,
            charge
                .prompt_tokens
                .saturating_add(charge.completion_tokens),
            now_ms,
        );
        if settled.is_ok() && active.fleet_context().is_some() {
            host.mark_spent(&token.id);
        }
        let Ok(settlement) = settled else {
            // The request already happened; the cost is in the stats. Losing it from the
            // counters must be loud.
            host.log(
                LogLevel::Error,
                &format!(
                    "shieldkey: could not record spend of token {} in shared data ({} nano-USD)",
                    token.id, charge.cost
                ),
            );
            return;
        };
        if let (Some(budget), Some(remaining)) = (limits.budget, settlement.remaining) {
            metrics.budget(host, budget.limit, remaining);
            let now = now_ms.div_euclid(1000);
            for threshold in settlement.crossed {
                let alert = BudgetAlert {
                    token_id: token.id.clone(),
                    owner: token.owner.clone(),
                    threshold_percent: threshold,
                    spent: settlement.spent,
                    limit: budget.limit,
                    window: budget.window,
                    reset_at: budget.window.reset_at(now),
                    at: now,
                };
                host.log(LogLevel::Warn, &alert.log_line());
                active.metrics.alert(host);
                metrics.alert(host);
                if active.policy.settings.webhook.is_some() {
                    host.enqueue_alert(&alert.webhook_body());
                }
            }
        }
    }
}

/// Gives back a reservation for a request that was admitted but then not forwarded.
fn release(host: &dyn Host, active: &Active, token: &TokenPolicy, admission: Option<Admission>) {
    if let (Some(admission), Some(now_ms)) = (admission, host.now_unix_ms()) {
        let _ = active.ledger(host).settle(
            &token.id,
            &token.rules.limits,
            &[],
            &admission,
            0,
            0,
            now_ms,
        );
    }
}

/// The request body's declared length (Envoy's codec enforces it), for estimates of requests
/// whose body was not read.
fn content_length(host: &dyn Host) -> u64 {
    host.request_header("content-length")
        .and_then(|v| std::str::from_utf8(&v).ok()?.trim().parse().ok())
        .unwrap_or(0)
}

fn ledger_denial(e: LedgerDenial) -> Denial {
    match e {
        LedgerDenial::RequestRate { retry_after_secs } => {
            Denial::RequestRateLimited { retry_after_secs }
        }
        LedgerDenial::TokenRate { retry_after_secs } => {
            Denial::TokenRateLimited { retry_after_secs }
        }
        LedgerDenial::Budget { reset_at, .. } => Denial::BudgetExceeded { reset_at },
        // Only reached outside fleet mode, where there is no allowance to be short of.
        LedgerDenial::AllowanceShort { .. } | LedgerDenial::Busy => Denial::LedgerBusy,
    }
}
