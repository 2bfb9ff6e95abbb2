//! One HTTP stream through the filter, as a state machine over host-neutral phases: authenticate,
//! apply the token's rules and the route table, swap the key (or refuse with one local reply),
//! judge the whole request body before anything is forwarded, then watch the response go by and
//! charge what it cost. The proxy-wasm glue only forwards callbacks here; the host sits behind
//! `Host`, so every phase and every early end is tested natively (`tests.rs`).

pub mod active;
mod claim;
mod headers;
pub mod host;
mod levels;
pub mod metrics;

#[cfg(test)]
mod fake;
#[cfg(test)]
mod team_tests;
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
use headers::Headers;
use host::{Host, LogLevel};
use levels::{Admissions, Level, Reservations, Subject};
use metrics::{BudgetReport, Usage};

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
    token: Option<Subject>,
    /// The token's team, when it has one (read right after the token).
    team: Option<Subject>,
    /// Refusals of levels in dry run: the request went on, and is reported as `would_deny`.
    would_deny: Vec<Denial>,
    /// The route's kind, from the table, once the route was allowed.
    route: Option<RouteKind>,
    /// Headers went on; the body is held until it is complete and judged.
    awaiting_body: Option<Admissions>,
    /// Set once the request was forwarded.
    exchange: Option<Exchange>,
    /// Fleet mode: the request waits for a budget lease (`claim.rs`).
    claim: Option<claim::Pending>,
}

/// An allowed request on its way: what accounting needs when it is over.
struct Exchange {
    admissions: Admissions,
    request_model: Option<String>,
    request_bytes: u64,
    status: u32,
    scanner: Option<UsageScanner>,
    /// The last response chunk, already on its way to the client, not yet scanned.
    unscanned: Vec<u8>,
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
            team: None,
            would_deny: Vec::new(),
            route: None,
            awaiting_body: None,
            exchange: None,
            claim: None,
        }
    }

    pub fn on_request_headers(&mut self, host: &dyn Host, end_of_stream: bool) -> Flow {
        let headers = Headers::new(host.request_headers());
        self.note_request(&headers);
        let Some(active) = self.active.clone() else {
            // No valid configuration: Envoy would not have started, but never forward anyway.
            return self.deny(host, &Denial::PolicyUnavailable);
        };
        let Some(now_ms) = host.now_unix_ms() else {
            return self.deny(host, &Denial::PolicyUnavailable);
        };
        self.audit.country = headers
            .get(&active.policy.settings.country_header)
            .map(<[u8]>::to_vec);
        let kind = match self.check_headers(host, &active, &headers, now_ms) {
            Ok(kind) => kind,
            Err(denial) => return self.deny(host, &denial),
        };
        let admission = match self.admit_and_swap(host, &active, &headers, now_ms) {
            Ok(a) => a,
            Err(denial) => return self.deny(host, &denial),
        };
        let needs_body = self
            .subjects()
            .any(|(_, s)| access::needs_body(&s.record.rules, kind));
        if needs_body && !end_of_stream {
            // Headers go on (Envoy's buffer filter after this one holds them); the body is held
            // here until it is complete: at its end of stream, or at the request trailers.
            self.awaiting_body = Some(admission);
            return Flow::Continue;
        }
        // The declared length (Envoy's codec enforces it), for estimates of requests whose body
        // was not read.
        let request_bytes = headers.number("content-length").unwrap_or(0);
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
            let headers = Headers::new(host.response_headers());
            exchange.status = headers.number(":status").unwrap_or(0);
            let kind = headers
                .get("content-type")
                .and_then(|ct| std::str::from_utf8(ct).ok())
                .map_or(BodyKind::Json, BodyKind::from_content_type);
            exchange.unreadable = headers
                .get("content-encoding")
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
            if let Some(scanner) = exchange.scanner.as_mut() {
                // A chunk is scanned when the next one comes (or when the stream is over), after
                // it went on to the client: the client never waits for the scan of what it is
                // about to receive. Nothing is charged before the last chunk was scanned.
                scanner.feed(&exchange.unscanned);
                exchange.unscanned = host.response_chunk(body_size).unwrap_or_default();
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
            if let Some(pending) = self.claim.take() {
                self.release(host, &active, pending.request.admissions);
            }
        }
        self.account(host);
        // The access log reads the record's fields after this callback (`audit.rs`).
        self.write_audit(host);
    }

    /// The request's own facts for the audit record, from the headers already read.
    fn note_request(&mut self, headers: &Headers) {
        let copy = |name: &str| headers.get(name).map(<[u8]>::to_vec);
        self.audit.seen = true;
        self.audit.method = copy(":method");
        self.audit.request_id = copy("x-request-id");
    }

    /// Writes the audit record's fields, in one filter-state value, once: when the stream ends.
    /// (Not also at the decision: a second write cost about 3 us per request in `make bench`
    /// A/B runs, for a record that only a VM failing mid-request would otherwise lose; README
    /// "Audit trail".)
    fn write_audit(&self, host: &dyn Host) {
        if let Some(fragment) = self.audit.log_fragment() {
            host.set_filter_state(crate::audit::FILTER_STATE_NAME, fragment.as_bytes());
        }
    }

    fn deny(&mut self, host: &dyn Host, denial: &Denial) -> Flow {
        if let Some(active) = &self.active {
            active.metrics.denied(host, denial);
        }
        for (_, subject) in self.subjects() {
            subject.metrics.denied(host, denial);
        }
        self.audit.decision = Some(denial.code());
        // What a dry run let through before an enforced rule refused is part of the record.
        self.audit.would_deny = self.would_deny.iter().map(Denial::code).collect();
        let extra = denial.headers();
        let mut headers: Vec<(&str, &str)> = vec![("content-type", "application/json")];
        headers.extend(extra.iter().map(|(k, v)| (*k, v.as_str())));
        host.send_local_reply(denial.status(), &headers, &denial.body());
        // Refusals are the rare path, and an operator watching one expects to see it counted.
        host.flush_metrics();
        Flow::Pause
    }

    /// Records who is asking (audit facts and the token's stats), once the secret verified.
    fn identify(&mut self, host: &dyn Host, active: &Active, token: &Rc<TokenPolicy>) {
        self.audit.token_id = Some(token.id.clone());
        self.audit.owner = Some(token.owner.clone());
        self.audit.team = token
            .team
            .as_deref()
            .and_then(crate::team::team_of_subject)
            .map(str::to_string);
        let metrics = active.metrics.token(host, &token.id);
        self.token = Some(Subject {
            record: token.clone(),
            metrics,
        });
    }

    /// The levels this request is judged at: its token, then its team.
    fn subjects(&self) -> impl Iterator<Item = (Level, &Subject)> {
        [(Level::Token, &self.token), (Level::Team, &self.team)]
            .into_iter()
            .filter_map(|(level, s)| Some((level, s.as_ref()?)))
    }

    fn subject(&self, level: Level) -> Option<&Subject> {
        match level {
            Level::Token => self.token.as_ref(),
            Level::Team => self.team.as_ref(),
        }
    }

    /// Everything the body is not needed for: the token (and its team), the connection, the
    /// route, at each level.
    fn check_headers(
        &mut self,
        host: &dyn Host,
        active: &Active,
        headers: &Headers,
        now_ms: i64,
    ) -> Result<RouteKind, Denial> {
        let credentials = Credentials {
            authorization: headers.get("authorization"),
            x_api_key: headers.get("x-api-key"),
        };
        let lookup = |id: &str| active.token(host, id);
        let authenticated = authenticate(
            &lookup,
            &active.verifier,
            &credentials,
            now_ms.div_euclid(1000),
        );
        let token = match authenticated {
            Ok(token) => token,
            Err(refusal) => {
                // A revoked, expired or not-yet-valid token whose secret verified: its holder is
                // known, so the refusal is audited and counted under the token.
                if let Some(token) = refusal.verified {
                    self.identify(host, active, &token);
                }
                return Err(refusal.denial);
            }
        };
        self.identify(host, active, &token);
        if let Some(team_subject) = &token.team {
            // A member of a team that is not readable is refused: its limits cannot be checked.
            let record = active
                .token(host, team_subject)
                .ok_or(Denial::TeamUnavailable)?;
            let metrics = active.metrics.team(host, team_subject);
            self.team = Some(Subject { record, metrics });
        }

        // Envoy's resolved client address and the country are read only when a rule needs them.
        let rules_of = || self.subjects().map(|(_, s)| &s.record.rules);
        let source = if rules_of().any(|r| r.source_networks.is_some()) {
            host.property(&["source", "address"])
                .as_deref()
                .and_then(parse_envoy_address)
        } else {
            None
        };
        let country = if rules_of().any(|r| r.countries.is_some()) {
            headers.get(&active.policy.settings.country_header)
        } else {
            None
        };
        let path = headers.get(":path").unwrap_or_default();
        let path = routes::canonical_path(path).ok_or(Denial::PathNotCanonical)?;
        let method = headers.get(":method").unwrap_or_default();
        let route = routes::lookup(method, path);
        self.audit.route = Some(route.map_or("unknown", |r| r.audit_name()));
        let dry_run = active.policy.settings.dry_run;
        let mut kind = None;
        let mut would_deny = std::mem::take(&mut self.would_deny);
        for (level, subject) in self.subjects() {
            let mut judge = levels::judge(level, subject, dry_run, &mut would_deny);
            let rules = &subject.record.rules;
            access::check_connection(rules, &mut judge, source, country)?;
            kind = Some(access::check_route(rules, &mut judge, route)?);
        }
        self.would_deny = would_deny;
        let kind = kind.ok_or(Denial::PolicyUnavailable)?;
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
        headers: &Headers,
        now_ms: i64,
    ) -> Result<Admissions, Denial> {
        let mut admissions = Admissions::default();
        for level in Level::BOTH {
            let Some(subject) = self.subject(level).cloned() else {
                continue;
            };
            if !subject.limits().is_tracked() {
                continue;
            }
            let admitted = active
                .ledger(host)
                .admit(subject.id(), subject.limits(), 0, now_ms)
                .or_else(|e| self.waive(active, level, e, subject.limits(), now_ms));
            match admitted {
                Ok(admission) => *admissions.slot(level) = Some(admission),
                Err(e) => {
                    self.release(host, active, admissions);
                    return Err(self.level_denial(level, e));
                }
            }
            let limits = subject.limits();
            if active.fleet_context().is_some()
                && (limits.requests_per_minute.is_some() || limits.tokens_per_minute.is_some())
            {
                // The syncer shares this Envoy's count of the minute with the fleet.
                host.mark_spent(subject.id());
            }
        }
        let Some(token) = self.token.clone() else {
            self.release(host, active, admissions);
            return Err(Denial::PolicyUnavailable);
        };
        self.audit.upstream_key = active
            .policy
            .upstream_keys
            .get(usize::from(token.record.upstream_key))
            .map(|k| k.id.clone());
        let Some(upstream_authorization) =
            active.policy.authorization_for(token.record.upstream_key)
        else {
            self.release(host, active, admissions);
            return Err(Denial::KeyUnavailable);
        };
        // `authorization` is replaced, `x-api-key` removed: no shield token goes upstream. The
        // upstream is asked for an uncompressed response, the only kind the usage scanner reads
        // (Envoy's compressor, placed before ShieldKey, compresses for the client again).
        let swapped = (!headers.has("x-api-key") || host.remove_request_header("x-api-key"))
            && host.set_request_header("authorization", upstream_authorization.expose())
            && host.set_request_header("accept-encoding", b"identity");
        if !swapped {
            self.release(host, active, admissions);
            return Err(Denial::KeyUnavailable);
        }
        Ok(admissions)
    }

    /// A level's counters refused: in dry run (and for a rule's refusal) the request goes on
    /// with nothing reserved at that level, so what it costs is still charged there.
    fn waive(
        &mut self,
        active: &Active,
        level: Level,
        refusal: LedgerDenial,
        limits: &crate::ledger::Limits,
        now_ms: i64,
    ) -> Result<Admission, LedgerDenial> {
        let denial = ledger_denial(refusal.clone());
        let Some(subject) = self.subject(level).cloned() else {
            return Err(refusal);
        };
        let mut judge = levels::judge(
            level,
            &subject,
            active.policy.settings.dry_run,
            &mut self.would_deny,
        );
        match judge.refuse(denial) {
            Ok(()) => Ok(Admission::unreserved(limits, now_ms)),
            Err(_) => Err(refusal),
        }
    }

    /// The denial a level's counters refused with, named for that level.
    fn level_denial(&self, level: Level, refusal: LedgerDenial) -> Denial {
        let denial = ledger_denial(refusal);
        match level {
            Level::Team if denial.is_rule() => denial.by_team(),
            _ => denial,
        }
    }

    fn finish_body(&mut self, host: &dyn Host, active: &Active) -> Flow {
        let Some(admissions) = self.awaiting_body.take() else {
            return Flow::Continue;
        };
        let body = host.request_body().unwrap_or_default();
        let request_bytes = body.len() as u64;
        self.judge_and_reserve(host, active, admissions, Some(&body), request_bytes)
    }

    /// The body rules of each level (model, output cap, size), then the budget reservations and
    /// forwarding. A refusal here sends a local reply before the buffered request is released
    /// upstream.
    fn judge_and_reserve(
        &mut self,
        host: &dyn Host,
        active: &Active,
        admissions: Admissions,
        body: Option<&[u8]>,
        request_bytes: u64,
    ) -> Flow {
        let Some(kind) = self.route else {
            return self.deny(host, &Denial::PolicyUnavailable);
        };
        let settings = &active.policy.settings;
        let mut model = None;
        let mut reservations = Reservations::default();
        let mut would_deny = std::mem::take(&mut self.would_deny);
        let mut refused = None;
        for (level, subject) in self.subjects() {
            let rules = &subject.record.rules;
            if !access::needs_body(rules, kind) {
                continue;
            }
            let mut judge = levels::judge(level, subject, settings.dry_run, &mut would_deny);
            match access::judge_body(rules, &mut judge, settings, kind, body) {
                Ok(verdict) => {
                    match level {
                        Level::Token => reservations.token = verdict.reservation,
                        Level::Team => reservations.team = verdict.reservation,
                    }
                    model = model.or(verdict.model);
                }
                Err(denial) => {
                    refused = Some(denial);
                    break;
                }
            }
        }
        self.would_deny = would_deny;
        if let Some(denial) = refused {
            // The model the refused request asked for, when its body names one.
            self.audit.model = body
                .and_then(|b| crate::rules::request_body::parse_request_body(b).ok())
                .and_then(|facts| facts.model);
            self.release(host, active, admissions);
            return self.deny(host, &denial);
        }
        self.audit.model = model.clone();
        let verdict = BodyVerdict {
            model,
            reservation: 0,
        };
        let pending = Reserving {
            admissions,
            reservations,
            verdict,
            request_bytes,
        };
        self.reserve_from(host, active, pending, Level::Token)
    }

    /// Reserves each level's worst case, from `start` on, then forwards. In fleet mode, when
    /// this Envoy's share of a level's budget is short, the request waits for one lease claim
    /// (`claim.rs`), which comes back here for that level.
    fn reserve_from(
        &mut self,
        host: &dyn Host,
        active: &Active,
        mut pending: Reserving,
        start: Level,
    ) -> Flow {
        let mut level = Some(start);
        while let Some(current) = level {
            level = current.next();
            let amount = pending.reservations.get(current);
            let (Some(subject), Some(admission)) = (
                self.subject(current).cloned(),
                pending.admissions.slot(current).as_mut(),
            ) else {
                continue;
            };
            if amount == 0 {
                continue;
            }
            let reserved = host
                .now_unix_ms()
                .ok_or(LedgerDenial::Busy)
                .and_then(|now_ms| {
                    active.ledger(host).reserve(
                        subject.id(),
                        subject.limits(),
                        admission,
                        amount,
                        now_ms,
                    )
                });
            match reserved {
                Ok(()) => {}
                Err(LedgerDenial::AllowanceShort { short }) if active.fleet_context().is_some() => {
                    let claim = claim::Pending::new(pending, current, short);
                    return self.start_claim(host, active, claim);
                }
                Err(e) => {
                    if let Err(denial) = self.refuse_at(active, current, ledger_denial(e)) {
                        self.release(host, active, pending.admissions);
                        return self.deny(host, &denial);
                    }
                }
            }
        }
        self.forward_reserved(host, active, pending)
    }

    fn forward_reserved(&mut self, host: &dyn Host, active: &Active, request: Reserving) -> Flow {
        let exchange = Exchange {
            admissions: request.admissions,
            request_model: request.verdict.model,
            request_bytes: request.request_bytes,
            status: 0,
            scanner: None,
            unscanned: Vec::new(),
            unreadable: false,
            response_ended: false,
        };
        self.forward(host, active, exchange)
    }

    /// A refusal at `level`: `Ok` when that level is in dry run and it is a rule's (recorded as
    /// would-deny), else the denial to answer with.
    fn refuse_at(&mut self, active: &Active, level: Level, denial: Denial) -> Result<(), Denial> {
        let Some(subject) = self.subject(level).cloned() else {
            return Err(denial);
        };
        levels::judge(
            level,
            &subject,
            active.policy.settings.dry_run,
            &mut self.would_deny,
        )
        .refuse(denial)
    }

    fn forward(&mut self, host: &dyn Host, active: &Active, exchange: Exchange) -> Flow {
        self.audit.decision = Some("allowed");
        self.audit.would_deny = self.would_deny.iter().map(Denial::code).collect();
        active.metrics.allowed(host);
        for (_, subject) in self.subjects() {
            subject.metrics.allowed(host);
        }
        if !self.would_deny.is_empty() {
            for denial in &self.would_deny {
                active.metrics.would_deny(host, denial);
                for (_, subject) in self.subjects() {
                    subject.metrics.would_deny(host, denial);
                }
            }
            host.log(LogLevel::Info, &self.audit.would_deny_line());
        }
        self.exchange = Some(exchange);
        Flow::Continue
    }

    fn release_awaiting(&mut self, host: &dyn Host, active: &Active) {
        if let Some(admissions) = self.awaiting_body.take() {
            self.release(host, active, admissions);
        }
    }

    /// Gives back every level's reservation for a request that was admitted but then not
    /// forwarded.
    fn release(&self, host: &dyn Host, active: &Active, admissions: Admissions) {
        let Some(now_ms) = host.now_unix_ms() else {
            return;
        };
        for (level, subject) in self.subjects() {
            if let Some(admission) = admissions.get(level) {
                let _ = active.ledger(host).settle(
                    subject.id(),
                    subject.limits(),
                    &[],
                    &admission,
                    0,
                    0,
                    now_ms,
                );
            }
        }
    }

    /// The response is over (normally or not): charge it, settle each level's reservation,
    /// report.
    fn account(&mut self, host: &dyn Host) {
        let (Some(active), Some(token), Some(exchange), Some(kind)) = (
            self.active.clone(),
            self.token.clone(),
            self.exchange.take(),
            self.route,
        ) else {
            return;
        };
        let mut exchange = exchange;
        if let Some(scanner) = exchange.scanner.as_mut() {
            scanner.feed(&std::mem::take(&mut exchange.unscanned));
        }
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
        // The estimate of a cut-short response is bounded by what was reserved for it: the most
        // any level reserved (levels without a budget reserve nothing).
        let reserved = Level::BOTH
            .iter()
            .map(|l| exchange.admissions.reserved(*l))
            .max()
            .unwrap_or(0);
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
        for (_, subject) in self.subjects() {
            subject.metrics.settled(host, &usage);
        }
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
        self.audit.accounted = true;
        if self.audit.model.is_none() {
            self.audit.model = scan.model.clone();
        }

        let Some(now_ms) = host.now_unix_ms() else {
            return;
        };
        let tokens = charge
            .prompt_tokens
            .saturating_add(charge.completion_tokens);
        for (level, subject) in self.subjects() {
            let Some(admission) = exchange.admissions.get(level) else {
                continue;
            };
            settle(
                host,
                &active,
                subject,
                &token.record.owner,
                self.audit.team.as_deref(),
                &admission,
                charge.cost,
                tokens,
                now_ms,
            );
        }
    }
}

/// Charges one level's counters, and reports its budget and any alert threshold crossed.
#[allow(clippy::too_many_arguments)]
fn settle(
    host: &dyn Host,
    active: &Active,
    subject: &Subject,
    owner: &str,
    team: Option<&str>,
    admission: &Admission,
    cost: crate::money::NanoUsd,
    tokens: u64,
    now_ms: i64,
) {
    let limits = subject.limits();
    // In fleet mode this Envoy's spend is part of the fleet's: the syncer judges thresholds on
    // the fleet's sum and one Envoy sends each alert (`fleet::alerts`).
    let thresholds: &[u8] = if active.fleet_context().is_some() {
        &[]
    } else {
        &active.policy.settings.alert_thresholds
    };
    let settled = active.ledger(host).settle(
        subject.id(),
        limits,
        thresholds,
        admission,
        cost,
        tokens,
        now_ms,
    );
    if settled.is_ok() && active.fleet_context().is_some() {
        host.mark_spent(subject.id());
    }
    let Ok(settlement) = settled else {
        // The request already happened; the cost is in the stats. Losing it from the
        // counters must be loud.
        host.log(
            LogLevel::Error,
            &format!(
                "shieldkey: could not record spend of {} in shared data ({} nano-USD)",
                subject.id(),
                cost
            ),
        );
        return;
    };
    let (Some(budget), Some(remaining)) = (limits.budget, settlement.remaining) else {
        return;
    };
    let now = now_ms.div_euclid(1000);
    subject.metrics.budget(
        host,
        &BudgetReport {
            limit: budget.limit,
            remaining,
            spent: settlement.spent,
            // The ledger rolled its counters to the window of `now` before charging.
            window_start: budget.window.start(now),
        },
    );
    for threshold in settlement.crossed {
        let team_budget = crate::team::team_of_subject(subject.id());
        let alert = BudgetAlert {
            token_id: subject.id().to_string(),
            // A team's alert names no owner: it is the team's budget, shared by its members.
            owner: if team_budget.is_some() {
                String::new()
            } else {
                owner.to_string()
            },
            team: team.map(str::to_string),
            threshold_percent: threshold,
            spent: settlement.spent,
            limit: budget.limit,
            window: budget.window,
            reset_at: budget.window.reset_at(now),
            at: now,
        };
        host.log(LogLevel::Warn, &alert.log_line());
        active.metrics.alert(host);
        subject.metrics.alert(host);
        if active.policy.settings.webhook.is_some() {
            host.enqueue_alert(&alert.webhook_body());
        }
    }
}

/// A request whose body was judged, on its way through the levels' reservations (and, in
/// fleet mode, possibly waiting for a lease claim).
pub(crate) struct Reserving {
    admissions: Admissions,
    reservations: Reservations,
    verdict: BodyVerdict,
    request_bytes: u64,
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
