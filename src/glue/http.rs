//! One HTTP stream: authenticate, apply the token's rules, swap the key (or refuse with one
//! local reply), then watch the response go by to charge what it cost.

use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, LogLevel};

use super::host::{self, log};
use super::root::Active;
use crate::access::{self, BodyVerdict};
use crate::alert::BudgetAlert;
use crate::audit::AuditFacts;
use crate::authenticate::{authenticate, Credentials};
use crate::denial::Denial;
use crate::ledger::{Admission, Ledger, LedgerDenial};
use crate::policy::TokenPolicy;
use crate::rules::source_ip::parse_envoy_address;
use crate::spend::{self, ResponseFacts};
use crate::usage::{BodyKind, UsageScanner};

use super::metrics::{TokenMetrics, Usage};

pub struct ShieldHttp {
    active: Option<Rc<Active>>,
    audit: AuditFacts,
    /// Set once the token authenticated.
    token: Option<(Rc<TokenPolicy>, Rc<TokenMetrics>)>,
    /// Set once the request was forwarded.
    exchange: Option<Exchange>,
    /// Headers went on; the body is being read before the request is allowed to complete.
    awaiting_body: Option<Option<Admission>>,
    /// The path generates a completion (read with the headers: they are gone by the body).
    generates: bool,
}

/// An allowed request on its way: what accounting needs when it is over.
struct Exchange {
    admission: Option<Admission>,
    request_model: Option<String>,
    status: u32,
    scanner: Option<UsageScanner>,
    response_ended: bool,
}

impl ShieldHttp {
    pub fn new(active: Option<Rc<Active>>) -> Self {
        ShieldHttp {
            active,
            audit: AuditFacts::default(),
            token: None,
            exchange: None,
            awaiting_body: None,
            generates: false,
        }
    }

    fn deny(&mut self, denial: &Denial) -> Action {
        if let Some(active) = &self.active {
            active.metrics.denied(denial);
        }
        if let Some((_, metrics)) = &self.token {
            metrics.denied(denial);
        }
        self.audit.decision = Some(denial.code());
        self.write_decision();
        let extra = denial.headers();
        let mut headers: Vec<(&str, &str)> = vec![("content-type", "application/json")];
        headers.extend(extra.iter().map(|(k, v)| (*k, v.as_str())));
        host::send_local_reply(denial.status(), &headers, &denial.body());
        Action::Pause
    }

    fn write_decision(&self) {
        for (name, value) in self.audit.decision_entries() {
            host::set_filter_state(name, value.as_bytes());
        }
    }

    /// Everything the body is not needed for. Returns the token's record on success.
    fn check_headers(&mut self, active: &Active, now_ms: i64) -> Result<(), Denial> {
        let authorization = host::request_header("authorization");
        let x_api_key = host::request_header("x-api-key");
        let credentials = Credentials {
            authorization: authorization.as_deref(),
            x_api_key: x_api_key.as_deref(),
        };
        let lookup = |id: &str| active.token(id);
        let token = authenticate(
            &lookup,
            &active.verifier,
            &credentials,
            now_ms.div_euclid(1000),
        )?;
        self.audit.token_id = Some(token.id.clone());
        self.generates =
            host::request_header(":path").is_some_and(|p| access::generates_completion(&p));
        let metrics = active.metrics.token(&token.id);
        self.token = Some((token.clone(), metrics));

        let source = host::property(&["source", "address"])
            .as_deref()
            .and_then(parse_envoy_address);
        let country = if token.rules.countries.is_some() {
            host::request_header(&active.policy.settings.country_header)
        } else {
            None
        };
        access::check_connection(&token.rules, source, country.as_deref())
    }

    /// Admission (rate limits, and the budget not already exhausted) and the key swap. Runs in
    /// the headers phase: proxy-wasm cannot hold request headers while reading the body (the
    /// host turns a header pause into a full stop), so everything that can be judged without
    /// the body is judged before anything is forwarded.
    fn admit_and_swap(&mut self, active: &Active) -> Result<Option<Admission>, Denial> {
        let Some((token, _)) = self.token.clone() else {
            return Err(Denial::PolicyUnavailable);
        };
        let mut admission = None;
        if token.rules.limits.is_tracked() {
            let now_ms = host::now_unix_ms().ok_or(Denial::LedgerBusy)?;
            let admitted = active
                .ledger()
                .admit(&token.id, &token.rules.limits, 0, now_ms)
                .map_err(ledger_denial)?;
            admission = Some(admitted);
        }
        let Some(upstream_authorization) = active.policy.authorization_for(token.upstream_key)
        else {
            self.release(active, &token, admission);
            return Err(Denial::KeyUnavailable);
        };
        // `authorization` is replaced, `x-api-key` removed: no shield token goes upstream.
        let swapped = host::remove_request_header("x-api-key")
            && host::set_request_header("authorization", upstream_authorization.expose());
        if !swapped {
            self.release(active, &token, admission);
            return Err(Denial::KeyUnavailable);
        }
        Ok(admission)
    }

    /// The body rules (model, `max_tokens`, size) and the budget reservation. For a request
    /// with a body this runs once the whole body is in; a refusal then resets the upstream
    /// stream before the body is sent, so Mistral never receives a complete request.
    fn judge_body_and_reserve(
        &mut self,
        active: &Active,
        mut admission: Option<Admission>,
        body: Option<&[u8]>,
    ) -> Result<Exchange, Denial> {
        let Some((token, _)) = self.token.clone() else {
            return Err(Denial::PolicyUnavailable);
        };
        let verdict = if token.rules.needs_body() {
            access::judge_body(&token.rules, &active.policy.settings, body, self.generates)
        } else {
            Ok(BodyVerdict::default())
        };
        let verdict = match verdict {
            Ok(v) => v,
            Err(denial) => {
                self.release(active, &token, admission);
                return Err(denial);
            }
        };
        self.audit.model = verdict.model.clone();
        if let Some(admitted) = admission.as_mut() {
            if verdict.reservation > 0 {
                let now_ms = host::now_unix_ms().ok_or(Denial::LedgerBusy)?;
                if let Err(e) = active.ledger().reserve(
                    &token.id,
                    &token.rules.limits,
                    admitted,
                    verdict.reservation,
                    now_ms,
                ) {
                    self.release(active, &token, admission);
                    return Err(ledger_denial(e));
                }
            }
        }
        Ok(Exchange {
            admission,
            request_model: verdict.model,
            status: 0,
            scanner: None,
            response_ended: false,
        })
    }

    fn forward(&mut self, active: &Active, exchange: Exchange) -> Action {
        self.audit.decision = Some("allowed");
        self.write_decision();
        active.metrics.allowed();
        if let Some((_, metrics)) = &self.token {
            metrics.allowed();
        }
        self.exchange = Some(exchange);
        Action::Continue
    }

    /// Gives back a reservation for a request that was admitted but then not forwarded.
    fn release(&self, active: &Active, token: &TokenPolicy, admission: Option<Admission>) {
        if let (Some(admission), Some(now_ms)) = (admission, host::now_unix_ms()) {
            let _ = active.ledger().settle(
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

    /// The response is over (normally or not): charge it, settle the reservation, report.
    fn account(&mut self) {
        let (Some(active), Some((token, metrics)), Some(exchange)) = (
            self.active.clone(),
            self.token.clone(),
            self.exchange.take(),
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
        let reserved = exchange.admission.map_or(0, |a| a.reserved);
        let charge = spend::charge(
            &active.policy.settings.prices,
            exchange.request_model.as_deref(),
            reserved,
            &ResponseFacts {
                status: exchange.status,
                scan: &scan,
                complete,
                bytes_seen,
            },
        );
        let usage = Usage {
            prompt_tokens: charge.prompt_tokens,
            completion_tokens: charge.completion_tokens,
            cost: charge.cost,
            estimated: charge.estimated,
        };
        metrics.settled(&usage);
        let priced_model = scan
            .model
            .as_deref()
            .or(exchange.request_model.as_deref())
            .and_then(|m| active.policy.settings.prices.table.canonical_name(m));
        active
            .metrics
            .model(priced_model.unwrap_or("unpriced"))
            .settled(&usage);

        self.audit.prompt_tokens = charge.prompt_tokens;
        self.audit.completion_tokens = charge.completion_tokens;
        self.audit.cost = charge.cost;
        self.audit.estimated = charge.estimated;
        if self.audit.model.is_none() {
            self.audit.model = scan.model.clone();
        }
        for (name, value) in self.audit.accounting_entries() {
            host::set_filter_state(name, value.as_bytes());
        }

        let Some(admission) = exchange.admission else {
            return;
        };
        let Some(now_ms) = host::now_unix_ms() else {
            return;
        };
        let limits = &token.rules.limits;
        let settled = active.ledger().settle(
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
        let settlement = match settled {
            Ok(s) => s,
            Err(_) => {
                // The request already happened; the cost is in the stats. Losing it from the
                // counters must be loud.
                log(
                    LogLevel::Error,
                    &format!(
                        "shieldkey: could not record spend of token {} in shared data ({} nano-USD)",
                        token.id, charge.cost
                    ),
                );
                return;
            }
        };
        if let (Some(budget), Some(remaining)) = (limits.budget, settlement.remaining) {
            metrics.budget(budget.limit, remaining);
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
                log(LogLevel::Warn, &alert.log_line());
                active.metrics.alert();
                metrics.alert();
                active.queue_alert(&alert);
            }
        }
    }
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
        LedgerDenial::Busy => Denial::LedgerBusy,
    }
}

impl Context for ShieldHttp {}

impl HttpContext for ShieldHttp {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let Some(active) = self.active.clone() else {
            // No valid configuration: Envoy would not have started, but never forward anyway.
            return self.deny(&Denial::PolicyUnavailable);
        };
        let Some(now_ms) = host::now_unix_ms() else {
            return self.deny(&Denial::PolicyUnavailable);
        };
        if let Err(denial) = self.check_headers(&active, now_ms) {
            return self.deny(&denial);
        }
        let admission = match self.admit_and_swap(&active) {
            Ok(a) => a,
            Err(denial) => return self.deny(&denial),
        };
        let needs_body = self
            .token
            .as_ref()
            .is_some_and(|(t, _)| t.rules.needs_body());
        if needs_body && !end_of_stream {
            // Headers go on; the body is held (and judged) in `on_http_request_body`.
            self.awaiting_body = Some(admission);
            return Action::Continue;
        }
        match self.judge_body_and_reserve(&active, admission, None) {
            Ok(exchange) => self.forward(&active, exchange),
            Err(denial) => self.deny(&denial),
        }
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let (Some(active), Some(admission)) = (self.active.clone(), self.awaiting_body) else {
            // No body rule, or already refused: pass it on.
            return Action::Continue;
        };
        let limit = active.policy.settings.max_body_bytes;
        if body_size as u64 > limit {
            self.awaiting_body = None;
            if let Some((token, _)) = self.token.clone() {
                self.release(&active, &token, admission);
            }
            return self.deny(&Denial::BodyTooLarge { limit });
        }
        if !end_of_stream {
            return Action::Pause;
        }
        self.awaiting_body = None;
        let body = host::request_body(body_size).unwrap_or_default();
        match self.judge_body_and_reserve(&active, admission, Some(&body)) {
            Ok(exchange) => self.forward(&active, exchange),
            Err(denial) => self.deny(&denial),
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        if let Some(exchange) = &mut self.exchange {
            exchange.status = host::response_header(":status")
                .and_then(|s| std::str::from_utf8(&s).ok()?.parse().ok())
                .unwrap_or(0);
            let kind = host::response_header("content-type")
                .and_then(|ct| String::from_utf8(ct).ok())
                .map_or(BodyKind::Json, |ct| BodyKind::from_content_type(&ct));
            exchange.scanner = Some(UsageScanner::new(kind));
            exchange.response_ended = end_of_stream;
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if let Some(exchange) = &mut self.exchange {
            if let (Some(scanner), Some(chunk)) =
                (exchange.scanner.as_mut(), host::response_body(body_size))
            {
                scanner.feed(&chunk);
            }
            exchange.response_ended |= end_of_stream;
        }
        // Never buffer: every chunk goes on to the client at once.
        Action::Continue
    }

    fn on_log(&mut self) {
        if let (Some(admission), Some(active), Some((token, _))) = (
            self.awaiting_body.take(),
            self.active.clone(),
            self.token.clone(),
        ) {
            // The client went away before its body was complete: nothing was forwarded.
            self.release(&active, &token, admission);
        }
        self.account();
    }
}
