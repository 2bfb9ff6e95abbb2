//! `shieldkey audit`: reads the audit trail (the JSON access log every shipped Envoy config
//! writes, `shieldkey-audit.log`) and answers "who used what, when, from where".
//!
//! One JSON object per line per request. Values ShieldKey writes come from Envoy's filter state
//! and are strings or null (`"prompt_tokens":"1000"`, `"cost_estimated":"false"`); Envoy's own
//! (`status`, `duration_ms`, `bytes_*`) are numbers. Records are normalized as they are read:
//! numbers as numbers, booleans as booleans, every other field as it was. Lines that are not JSON
//! objects (Envoy's own log lines, when the log is read from Envoy's stdout; a line cut short) are
//! skipped and counted; so are objects whose known fields have the wrong type.
//!
//! Parsing, filtering and the summary are pure functions; `audit` reads the files and prints.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{self, BufRead, BufReader, Write};
use std::net::IpAddr;

use ipnet::IpNet;
use serde_json::{json, Map, Value};

use super::args::Args;
use super::duration::parse_ttl;
use super::error::{failed, usage, CliError};
use super::status_common::table;
use crate::denial::Denial;
use crate::money::{format_usd, NanoUsd};
use crate::time::parse_rfc3339;

/// The log `audit` reads without a file argument: where the shipped configs write it (relative to
/// Envoy's working directory).
pub const DEFAULT_LOG: &str = "shieldkey-audit.log";

/// Fields written as strings (or null).
const TEXT_FIELDS: &[&str] = &[
    "time",
    "token_id",
    "owner",
    "team",
    "decision",
    "would_deny",
    "client_address",
    "country",
    "method",
    "route",
    "model",
    "upstream_key",
    "request_id",
];
/// Fields that are whole numbers: ShieldKey's accounting (written as strings) and Envoy's own.
const NUMBER_FIELDS: &[&str] = &[
    "prompt_tokens",
    "completion_tokens",
    "cost_nano_usd",
    "status",
    "duration_ms",
    "bytes_received",
    "bytes_sent",
];
/// Fields that are booleans (written as `"true"` / `"false"`).
const BOOL_FIELDS: &[&str] = &["cost_estimated"];

/// How many malformed records are described one by one on stderr.
const MAX_REPORTED: usize = 5;

/// One record of the audit trail, normalized.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// The record: known fields normalized, unknown fields as they were.
    pub fields: Map<String, Value>,
    /// `time` as Unix milliseconds.
    pub time_ms: i64,
}

impl Record {
    /// A text field; `None` when absent or null.
    pub fn text(&self, name: &str) -> Option<&str> {
        self.fields.get(name).and_then(Value::as_str)
    }

    /// A number field; `None` when absent or null.
    pub fn number(&self, name: &str) -> Option<u64> {
        self.fields.get(name).and_then(Value::as_u64)
    }

    /// The codes a dry run let through (empty when none).
    pub fn would_deny(&self) -> Vec<&str> {
        self.text("would_deny")
            .map(|list| {
                list.split(',')
                    .map(str::trim)
                    .filter(|c| !c.is_empty())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn decision(&self) -> Option<&str> {
        self.text("decision")
    }

    fn is_denied(&self) -> bool {
        self.decision().is_some_and(|d| d.starts_with("shield_"))
    }
}

/// What one line of a log is.
#[derive(Debug, Clone, PartialEq)]
pub enum Line {
    /// Empty or only whitespace: not counted.
    Blank,
    Record(Record),
    /// Not a JSON object: an Envoy log line, or a line cut short.
    NotJson,
    /// A JSON object whose known fields have the wrong type; why (names fields, never values).
    Malformed(String),
}

/// Parses one line of the log.
pub fn parse_line(line: &[u8]) -> Line {
    if line.iter().all(u8::is_ascii_whitespace) {
        return Line::Blank;
    }
    match serde_json::from_slice::<Value>(line) {
        Ok(Value::Object(map)) => match normalize(map) {
            Ok(record) => Line::Record(record),
            Err(why) => Line::Malformed(why),
        },
        _ => Line::NotJson,
    }
}

/// Normalizes a record's known fields: numbers (also from strings of digits) as numbers,
/// `"true"`/`"false"` as booleans; text stays text. Null stays null; absent stays absent.
pub fn normalize(mut fields: Map<String, Value>) -> Result<Record, String> {
    for name in NUMBER_FIELDS {
        if let Some(value) = fields.get_mut(*name) {
            *value = match value {
                Value::Null => Value::Null,
                Value::Number(n) if n.is_u64() => Value::Number(n.clone()),
                Value::String(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => s
                    .parse::<u64>()
                    .map(Value::from)
                    .map_err(|_| format!("{name} is too large"))?,
                _ => return Err(format!("{name} is not a whole number")),
            };
        }
    }
    for name in BOOL_FIELDS {
        if let Some(value) = fields.get_mut(*name) {
            *value = match value {
                Value::Null => Value::Null,
                Value::Bool(b) => Value::Bool(*b),
                Value::String(s) if s == "true" => Value::Bool(true),
                Value::String(s) if s == "false" => Value::Bool(false),
                _ => return Err(format!("{name} is not true or false")),
            };
        }
    }
    for name in TEXT_FIELDS {
        match fields.get(*name) {
            None | Some(Value::Null | Value::String(_)) => {}
            Some(_) => return Err(format!("{name} is not a string")),
        }
    }
    let time_ms = match fields.get("time") {
        Some(Value::String(t)) => parse_time_ms(t).map_err(|_| "time is not an RFC 3339 time")?,
        _ => return Err("time is missing".to_string()),
    };
    Ok(Record { fields, time_ms })
}

/// An RFC 3339 time as Unix milliseconds (finer fractions truncated).
pub fn parse_time_ms(text: &str) -> Result<i64, String> {
    let secs = parse_rfc3339(text)?;
    // parse_rfc3339 validated the shape: a fraction, if any, starts at byte 19.
    let millis = match text.as_bytes().get(19) {
        Some(b'.') => text
            .bytes()
            .skip(20)
            .take_while(u8::is_ascii_digit)
            .chain(std::iter::repeat(b'0'))
            .take(3)
            .fold(0i64, |acc, d| acc * 10 + i64::from(d - b'0')),
        _ => 0,
    };
    secs.checked_mul(1000)
        .and_then(|ms| ms.checked_add(millis))
        .ok_or_else(|| format!("'{text}' is out of range"))
}

/// A `--since`/`--until` value as Unix milliseconds: an RFC 3339 time, a date (`2026-11-26`,
/// midnight UTC), or a duration (`90s`, `15m`, `2h`, `7d`) meaning that long before `now_ms`.
pub fn parse_instant(text: &str, now_ms: i64) -> Result<i64, String> {
    if text.bytes().next().is_some_and(|b| b.is_ascii_digit())
        && text.bytes().last().is_some_and(|b| b"smhd".contains(&b))
    {
        if let Ok(secs) = parse_ttl(text) {
            return secs
                .checked_mul(1000)
                .and_then(|ms| now_ms.checked_sub(ms))
                .ok_or_else(|| format!("'{text}' is too long ago"));
        }
    }
    let full = if text.len() == 10 {
        format!("{text}T00:00:00Z")
    } else {
        text.to_string()
    };
    parse_time_ms(&full).map_err(|_| {
        format!(
            "'{}' is neither an RFC 3339 time like 2026-11-26T02:00:00Z (or a date like \
             2026-11-26) nor a duration before now like 15m, 2h or 7d",
            text.chars().take(40).collect::<String>()
        )
    })
}

/// `--decision`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecisionFilter {
    /// Forwarded (dry-run refusals included).
    Allowed,
    /// Refused: any `shield_*` code.
    Denied,
    /// Forwarded although a dry run would have refused it.
    WouldDeny,
    /// Refused with this code.
    Code(String),
}

impl DecisionFilter {
    pub fn parse(text: &str) -> Result<DecisionFilter, String> {
        match text {
            "allowed" => Ok(DecisionFilter::Allowed),
            "denied" => Ok(DecisionFilter::Denied),
            "would-deny" | "would_deny" => Ok(DecisionFilter::WouldDeny),
            code if Denial::ALL_CODES.contains(&code) => Ok(DecisionFilter::Code(code.to_string())),
            other => Err(format!(
                "--decision '{}': expected allowed, denied, would-deny or a denial code \
                 (shield_budget_exceeded, shield_token_revoked, …)",
                other.chars().take(40).collect::<String>()
            )),
        }
    }

    fn matches(&self, record: &Record) -> bool {
        match self {
            DecisionFilter::Allowed => record.decision() == Some("allowed"),
            DecisionFilter::Denied => record.is_denied(),
            DecisionFilter::WouldDeny => !record.would_deny().is_empty(),
            DecisionFilter::Code(code) => record.decision() == Some(code.as_str()),
        }
    }
}

/// The record filters; every one given must match.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Filter {
    pub token: Option<String>,
    pub owner: Option<String>,
    pub team: Option<String>,
    pub decision: Option<DecisionFilter>,
    /// Unix ms, inclusive.
    pub since_ms: Option<i64>,
    /// Unix ms, exclusive.
    pub until_ms: Option<i64>,
    pub route: Option<String>,
    pub model: Option<String>,
    /// An address is a one-address network.
    pub client: Option<IpNet>,
    /// Upper case; `UNKNOWN` matches records without a country.
    pub country: Option<String>,
    pub request_id: Option<String>,
}

/// `--client`: an IP address or a CIDR network.
pub fn parse_client(text: &str) -> Result<IpNet, String> {
    let bad = || {
        format!(
            "--client '{}' is not an IP address or a CIDR network like 10.0.0.0/8",
            text.chars().take(50).collect::<String>()
        )
    };
    if text.contains('/') {
        text.parse::<IpNet>().map(|n| n.trunc()).map_err(|_| bad())
    } else {
        text.parse::<IpAddr>().map(IpNet::from).map_err(|_| bad())
    }
}

/// The record's client address, as an address (IPv4-mapped IPv6 addresses as IPv4).
fn client_ip(record: &Record) -> Option<IpAddr> {
    let ip: IpAddr = record.text("client_address")?.parse().ok()?;
    Some(match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    })
}

impl Filter {
    pub fn matches(&self, record: &Record) -> bool {
        let same = |wanted: &Option<String>, field: &str| {
            wanted
                .as_deref()
                .is_none_or(|w| record.text(field) == Some(w))
        };
        same(&self.token, "token_id")
            && same(&self.owner, "owner")
            && same(&self.team, "team")
            && same(&self.model, "model")
            && same(&self.request_id, "request_id")
            && self
                .route
                .as_deref()
                .is_none_or(|r| record.text("route") == Some(r.trim_start_matches('/')))
            && self.decision.as_ref().is_none_or(|d| d.matches(record))
            && self.since_ms.is_none_or(|t| record.time_ms >= t)
            && self.until_ms.is_none_or(|t| record.time_ms < t)
            && self
                .client
                .is_none_or(|net| client_ip(record).is_some_and(|ip| net.contains(&ip)))
            && self.country.as_deref().is_none_or(|c| {
                match record.text("country").filter(|v| !v.is_empty()) {
                    Some(country) => country.eq_ignore_ascii_case(c),
                    None => c == "UNKNOWN",
                }
            })
    }
}

/// What was skipped while reading one source.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Skipped {
    /// Lines that are not JSON objects.
    pub not_json: u64,
    /// Records with wrong field types: (line number, why).
    pub malformed: Vec<(u64, String)>,
}

/// Reads one log: its records in the order written, and what was skipped.
pub fn read_log(mut reader: impl BufRead) -> io::Result<(Vec<Record>, Skipped)> {
    let mut records = Vec::new();
    let mut skipped = Skipped::default();
    let mut line = Vec::new();
    let mut number = 0u64;
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 {
            break;
        }
        number += 1;
        match parse_line(&line) {
            Line::Blank => {}
            Line::Record(r) => records.push(r),
            Line::NotJson => skipped.not_json += 1,
            Line::Malformed(why) => skipped.malformed.push((number, why)),
        }
    }
    Ok((records, skipped))
}

/// Merges the records of several logs in time order (the time each request started); records of
/// the same millisecond keep the order of the arguments, then of the lines.
pub fn merge(logs: Vec<Vec<Record>>) -> Vec<Record> {
    let mut all: Vec<Record> = logs.into_iter().flatten().collect();
    all.sort_by_key(|r| r.time_ms);
    all
}

/// Totals over a set of records.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Totals {
    pub requests: u64,
    pub allowed: u64,
    pub denied: u64,
    pub denied_by_code: BTreeMap<String, u64>,
    /// Neither allowed nor denied by ShieldKey: answered by Envoy before ShieldKey decided.
    pub not_decided: u64,
    /// Allowed requests a dry run let through.
    pub would_deny: u64,
    pub would_deny_by_code: BTreeMap<String, u64>,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost: NanoUsd,
    /// Requests whose cost was estimated (the upstream reported no usage).
    pub cost_estimated: u64,
    /// (Unix ms, the record's time) of the earliest and the latest record.
    pub first_seen: Option<(i64, String)>,
    pub last_seen: Option<(i64, String)>,
    pub clients: BTreeSet<String>,
}

impl Totals {
    pub fn add(&mut self, record: &Record) {
        self.requests += 1;
        match record.decision() {
            Some("allowed") => self.allowed += 1,
            Some(code) if record.is_denied() => {
                self.denied += 1;
                *self.denied_by_code.entry(code.to_string()).or_default() += 1;
            }
            _ => self.not_decided += 1,
        }
        let would = record.would_deny();
        if !would.is_empty() {
            self.would_deny += 1;
            for code in would {
                *self.would_deny_by_code.entry(code.to_string()).or_default() += 1;
            }
        }
        let n = |name| record.number(name).unwrap_or(0);
        self.prompt_tokens = self.prompt_tokens.saturating_add(n("prompt_tokens"));
        self.completion_tokens = self
            .completion_tokens
            .saturating_add(n("completion_tokens"));
        self.cost = self.cost.saturating_add(n("cost_nano_usd"));
        if record.fields.get("cost_estimated") == Some(&Value::Bool(true)) {
            self.cost_estimated += 1;
        }
        let time = record.text("time").unwrap_or_default();
        if self
            .first_seen
            .as_ref()
            .is_none_or(|(t, _)| record.time_ms < *t)
        {
            self.first_seen = Some((record.time_ms, time.to_string()));
        }
        if self
            .last_seen
            .as_ref()
            .is_none_or(|(t, _)| record.time_ms >= *t)
        {
            self.last_seen = Some((record.time_ms, time.to_string()));
        }
        if let Some(client) = record.text("client_address") {
            self.clients.insert(client.to_string());
        }
    }

    fn json(&self) -> Map<String, Value> {
        let seen = |s: &Option<(i64, String)>| s.as_ref().map(|(_, t)| t.clone());
        let mut out = Map::new();
        out.insert("requests".into(), self.requests.into());
        out.insert("allowed".into(), self.allowed.into());
        out.insert("denied".into(), self.denied.into());
        out.insert("denied_by_code".into(), json!(self.denied_by_code));
        out.insert("not_decided".into(), self.not_decided.into());
        out.insert("would_deny".into(), self.would_deny.into());
        out.insert("would_deny_by_code".into(), json!(self.would_deny_by_code));
        out.insert("prompt_tokens".into(), self.prompt_tokens.into());
        out.insert("completion_tokens".into(), self.completion_tokens.into());
        out.insert("cost_nano_usd".into(), self.cost.into());
        out.insert("cost_usd".into(), format_usd(self.cost).into());
        out.insert("cost_estimated".into(), self.cost_estimated.into());
        out.insert("first_seen".into(), json!(seen(&self.first_seen)));
        out.insert("last_seen".into(), json!(seen(&self.last_seen)));
        out.insert("clients".into(), json!(self.clients));
        out
    }

    fn cells(&self) -> Vec<String> {
        let seen = |s: &Option<(i64, String)>| s.as_ref().map_or("-", |(_, t)| t).to_string();
        vec![
            self.requests.to_string(),
            self.allowed.to_string(),
            self.denied.to_string(),
            self.would_deny.to_string(),
            self.prompt_tokens.to_string(),
            self.completion_tokens.to_string(),
            usd6(self.cost),
            seen(&self.first_seen),
            seen(&self.last_seen),
            counts(&self.denied_by_code),
            list(self.clients.iter()),
        ]
    }
}

/// One token's totals, with the owners and teams its records name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenTotals {
    pub owners: BTreeSet<String>,
    pub teams: BTreeSet<String>,
    pub totals: Totals,
}

/// One team's totals, with the tokens its records name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TeamTotals {
    pub tokens: BTreeSet<String>,
    pub totals: Totals,
}

/// Totals per token (`None`: records without one), per team, and over everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    pub tokens: BTreeMap<Option<String>, TokenTotals>,
    pub teams: BTreeMap<String, TeamTotals>,
    pub total: Totals,
}

pub fn summarize<'r>(records: impl IntoIterator<Item = &'r Record>) -> Summary {
    let mut summary = Summary::default();
    for record in records {
        summary.total.add(record);
        let token_id = record.text("token_id").map(str::to_string);
        let token = summary.tokens.entry(token_id.clone()).or_default();
        token.totals.add(record);
        if let Some(owner) = record.text("owner") {
            token.owners.insert(owner.to_string());
        }
        if let Some(team) = record.text("team") {
            token.teams.insert(team.to_string());
            let entry = summary.teams.entry(team.to_string()).or_default();
            entry.totals.add(record);
            if let Some(id) = token_id {
                entry.tokens.insert(id);
            }
        }
    }
    summary
}

impl Summary {
    /// The tokens by id, then the records without a token.
    fn token_rows(&self) -> impl Iterator<Item = (&Option<String>, &TokenTotals)> {
        let (named, anonymous): (Vec<_>, Vec<_>) =
            self.tokens.iter().partition(|(id, _)| id.is_some());
        named.into_iter().chain(anonymous)
    }

    pub fn json(&self) -> Value {
        let tokens: Vec<Value> = self
            .token_rows()
            .map(|(id, t)| {
                let mut row = Map::new();
                row.insert("token_id".into(), json!(id));
                row.insert("owners".into(), json!(t.owners));
                row.insert("teams".into(), json!(t.teams));
                row.extend(t.totals.json());
                Value::Object(row)
            })
            .collect();
        let teams: Vec<Value> = self
            .teams
            .iter()
            .map(|(id, t)| {
                let mut row = Map::new();
                row.insert("team".into(), json!(id));
                row.insert("tokens".into(), json!(t.tokens));
                row.extend(t.totals.json());
                Value::Object(row)
            })
            .collect();
        json!({"tokens": tokens, "teams": teams, "total": Value::Object(self.total.json())})
    }

    /// The teams' table (when any record names a team), then the tokens' with a total row.
    pub fn tables(&self) -> String {
        const TOTALS: [&str; 11] = [
            "REQUESTS",
            "ALLOWED",
            "DENIED",
            "WOULD_DENY",
            "IN",
            "OUT",
            "COST_USD",
            "FIRST_SEEN",
            "LAST_SEEN",
            "DENIED_BY_CODE",
            "CLIENTS",
        ];
        const RIGHT: [bool; 11] = [
            true, true, true, true, true, true, true, false, false, false, false,
        ];
        let mut out = String::new();
        if !self.teams.is_empty() {
            let rows: Vec<Vec<String>> = self
                .teams
                .iter()
                .map(|(id, t)| {
                    let mut row = vec![id.clone(), list(t.tokens.iter())];
                    row.extend(t.totals.cells());
                    row
                })
                .collect();
            let headers: Vec<&str> = ["TEAM", "TOKENS"].into_iter().chain(TOTALS).collect();
            let right: Vec<bool> = [false, false].into_iter().chain(RIGHT).collect();
            out.push_str(&table(&headers, &right, &safe_rows(rows)));
            out.push('\n');
        }
        let mut rows: Vec<Vec<String>> = self
            .token_rows()
            .map(|(id, t)| {
                let mut row = vec![
                    id.clone().unwrap_or_else(|| "(none)".to_string()),
                    list(t.owners.iter()),
                    list(t.teams.iter()),
                ];
                row.extend(t.totals.cells());
                row
            })
            .collect();
        let mut total = vec!["(total)".to_string(), String::new(), String::new()];
        total.extend(self.total.cells());
        rows.push(total);
        let headers: Vec<&str> = ["TOKEN", "OWNER", "TEAM"]
            .into_iter()
            .chain(TOTALS)
            .collect();
        let right: Vec<bool> = [false, false, false].into_iter().chain(RIGHT).collect();
        out.push_str(&table(&headers, &right, &safe_rows(rows)));
        out
    }
}

/// USD with at least 6 decimals, exact: `0.450000`, `12.500000`, `0.00000285`.
pub fn usd6(value: NanoUsd) -> String {
    let text = format_usd(value);
    match text.split_once('.') {
        Some((whole, frac)) if frac.len() < 6 => format!("{whole}.{frac:0<6}"),
        _ => text,
    }
}

fn list<'a>(items: impl Iterator<Item = &'a String>) -> String {
    let items: Vec<&str> = items.map(String::as_str).collect();
    if items.is_empty() {
        "-".to_string()
    } else {
        items.join(",")
    }
}

fn counts(map: &BTreeMap<String, u64>) -> String {
    if map.is_empty() {
        return "-".to_string();
    }
    map.iter()
        .map(|(code, n)| format!("{code}={n}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// A cell for a terminal: control characters (a forged record's escape sequences) are shown
/// escaped, never sent to the terminal.
fn safe(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

fn safe_rows(rows: Vec<Vec<String>>) -> Vec<Vec<String>> {
    rows.into_iter()
        .map(|row| row.iter().map(|c| safe(c)).collect())
        .collect()
}

/// One record as a row of the table.
pub fn record_cells(record: &Record) -> Vec<String> {
    let text = |name| record.text(name).unwrap_or("-").to_string();
    let number = |name| {
        record
            .number(name)
            .map_or_else(|| "-".to_string(), |n| n.to_string())
    };
    let mut decision = text("decision");
    let would = record.would_deny();
    if !would.is_empty() {
        decision = format!("{decision} [{}]", would.join(","));
    }
    vec![
        text("time"),
        text("token_id"),
        text("owner"),
        text("team"),
        decision,
        text("client_address"),
        text("country"),
        text("method"),
        text("route"),
        text("model"),
        number("prompt_tokens"),
        number("completion_tokens"),
        record
            .number("cost_nano_usd")
            .map_or_else(|| "-".to_string(), usd6),
        number("status"),
    ]
}

pub fn records_table(records: &[&Record]) -> String {
    let rows: Vec<Vec<String>> = records.iter().map(|r| record_cells(r)).collect();
    table(
        &[
            "TIME", "TOKEN", "OWNER", "TEAM", "DECISION", "CLIENT", "COUNTRY", "METHOD", "ROUTE",
            "MODEL", "IN", "OUT", "COST_USD", "STATUS",
        ],
        &[
            false, false, false, false, false, false, false, false, false, false, true, true, true,
            true,
        ],
        &safe_rows(rows),
    )
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The filters from the command line.
fn take_filter(args: &mut Args, now_ms: i64) -> Result<Filter, CliError> {
    let instant = |flag: &str, value: Option<String>| -> Result<Option<i64>, CliError> {
        value
            .map(|v| parse_instant(&v, now_ms).map_err(|e| usage(format!("--{flag}: {e}"))))
            .transpose()
    };
    let since = args.option("since")?;
    let until = args.option("until")?;
    let filter = Filter {
        token: args.option("token")?,
        owner: args.option("owner")?,
        team: args.option("team")?,
        decision: args
            .option("decision")?
            .map(|d| DecisionFilter::parse(&d).map_err(usage))
            .transpose()?,
        since_ms: instant("since", since)?,
        until_ms: instant("until", until)?,
        route: args.option("route")?,
        model: args.option("model")?,
        client: args
            .option("client")?
            .map(|c| parse_client(&c).map_err(usage))
            .transpose()?,
        country: args.option("country")?.map(|c| c.to_ascii_uppercase()),
        request_id: args.option("request-id")?,
    };
    if let (Some(since), Some(until)) = (filter.since_ms, filter.until_ms) {
        if until <= since {
            return Err(usage("--until is not after --since: no record can match"));
        }
    }
    Ok(filter)
}

/// Reads one source (`-` is stdin); the error names it.
fn read_source(path: &str, explicit: bool) -> Result<(Vec<Record>, Skipped), CliError> {
    let result = if path == "-" {
        read_log(io::stdin().lock())
    } else {
        let file = File::open(path).map_err(|e| {
            let hint = if explicit {
                ""
            } else {
                " (the default; Envoy writes shieldkey-audit.log in its working directory: \
                 pass the log's path)"
            };
            failed(format!("cannot read {path}: {e}{hint}"))
        })?;
        read_log(BufReader::new(file))
    };
    result.map_err(|e| failed(format!("cannot read {path}: {e}")))
}

/// Stdout, where a reader that went away (`| head`) ends the output quietly.
fn emit(text: &str) -> Result<(), CliError> {
    let mut out = io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != io::ErrorKind::BrokenPipe => {
            Err(failed(format!("cannot write output: {e}")))
        }
        _ => Ok(()),
    }
}

fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// `audit [FILE...] [filters] [--summary] [--json]`.
pub fn audit(mut args: Args) -> Result<(), CliError> {
    let now_ms = now_ms();
    let filter = take_filter(&mut args, now_ms)?;
    let summary = args.flag("summary");
    let as_json = args.flag("json");
    let mut paths = Vec::new();
    while let Ok(path) = args.positional("file") {
        paths.push(path);
    }
    args.finish()?;
    let explicit = !paths.is_empty();
    if !explicit {
        paths.push(DEFAULT_LOG.to_string());
    }
    if paths.iter().filter(|p| *p == "-").count() > 1 {
        return Err(usage("'-' (stdin) can be read only once"));
    }

    let mut logs = Vec::with_capacity(paths.len());
    for path in &paths {
        let (records, skipped) = read_source(path, explicit)?;
        let name = if path == "-" { "stdin" } else { path };
        if skipped.not_json > 0 {
            eprintln!(
                "{name}: skipped {} (Envoy's own log lines, or a record cut short)",
                plural(
                    skipped.not_json,
                    "line that is not a JSON object",
                    "lines that are not JSON objects"
                )
            );
        }
        if !skipped.malformed.is_empty() {
            eprintln!(
                "{name}: skipped {}",
                plural(
                    skipped.malformed.len() as u64,
                    "JSON object that is not an audit record",
                    "JSON objects that are not audit records"
                )
            );
            for (line, why) in skipped.malformed.iter().take(MAX_REPORTED) {
                eprintln!("  line {line}: {why}");
            }
            if skipped.malformed.len() > MAX_REPORTED {
                eprintln!("  and {} more", skipped.malformed.len() - MAX_REPORTED);
            }
        }
        logs.push(records);
    }
    let all = merge(logs);
    let shown: Vec<&Record> = all.iter().filter(|r| filter.matches(r)).collect();

    if summary {
        let summary = summarize(shown.iter().copied());
        if as_json {
            emit(&format!("{:#}\n", summary.json()))?;
        } else {
            emit(&summary.tables())?;
        }
    } else if as_json {
        let mut text = String::new();
        for record in &shown {
            text.push_str(&Value::Object(record.fields.clone()).to_string());
            text.push('\n');
        }
        emit(&text)?;
    } else {
        emit(&records_table(&shown))?;
    }
    if !as_json {
        eprintln!(
            "{} of {} read from {}",
            shown.len(),
            plural(all.len() as u64, "record", "records"),
            paths.join(", ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real record, as Envoy wrote it.
    const REAL: &str = r#"{"bytes_received":82,"bytes_sent":2684,"client_address":"127.0.0.1","completion_tokens":"500","cost_estimated":"false","cost_nano_usd":"450000","country":null,"decision":"allowed","duration_ms":4,"method":"POST","model":"mistral-small-latest","owner":null,"prompt_tokens":"1000","request_id":"e87cc71d-042d-453b-910a-677faaa024b5","route":"v1/chat/completions","status":200,"team":null,"time":"2026-11-26T02:38:58.297Z","token_id":"meter","upstream_key":"prod","would_deny":null}"#;

    fn record(text: &str) -> Record {
        match parse_line(text.as_bytes()) {
            Line::Record(r) => r,
            other => panic!("{text}: {other:?}"),
        }
    }

    /// A record like REAL with some fields replaced.
    fn with(changes: Value) -> Record {
        let mut doc: Value = serde_json::from_str(REAL).unwrap();
        for (k, v) in changes.as_object().unwrap() {
            doc[k] = v.clone();
        }
        record(&doc.to_string())
    }

    fn ms(text: &str) -> i64 {
        parse_time_ms(text).unwrap()
    }

    #[test]
    fn real_records_are_normalized() {
        let r = record(REAL);
        assert_eq!(r.time_ms, ms("2026-11-26T02:38:58Z") + 297);
        assert_eq!(r.number("prompt_tokens"), Some(1000));
        assert_eq!(r.number("completion_tokens"), Some(500));
        assert_eq!(r.number("cost_nano_usd"), Some(450_000));
        assert_eq!(r.number("status"), Some(200));
        assert_eq!(r.fields["cost_estimated"], Value::Bool(false));
        assert_eq!(r.fields["owner"], Value::Null);
        assert_eq!(r.text("token_id"), Some("meter"));
        let expected: Value = json!({
            "bytes_received": 82, "bytes_sent": 2684, "client_address": "127.0.0.1",
            "completion_tokens": 500, "cost_estimated": false, "cost_nano_usd": 450000,
            "country": null, "decision": "allowed", "duration_ms": 4, "method": "POST",
            "model": "mistral-small-latest", "owner": null, "prompt_tokens": 1000,
            "request_id": "e87cc71d-042d-453b-910a-677faaa024b5", "route": "v1/chat/completions",
            "status": 200, "team": null, "time": "2026-11-26T02:38:58.297Z", "token_id": "meter",
            "upstream_key": "prod", "would_deny": null});
        assert_eq!(Value::Object(r.fields.clone()), expected);
        // Normalizing is idempotent: the --json output reads back the same.
        let again = record(&Value::Object(r.fields.clone()).to_string());
        assert_eq!(again, r);
        // Unknown fields are kept as they were; absent known fields stay absent.
        let extra = record(r#"{"time":"2026-11-26T02:38:58Z","x_custom":[1,"a"]}"#);
        assert_eq!(extra.fields["x_custom"], json!([1, "a"]));
        assert!(!extra.fields.contains_key("status"));
        assert_eq!(
            extra.fields["time"],
            Value::String("2026-11-26T02:38:58Z".into())
        );
        assert_eq!(extra.time_ms, ms("2026-11-26T02:38:58Z"));
    }

    #[test]
    fn records_envoy_answered_alone_have_no_shieldkey_values() {
        // This release: Envoy's fields only. Earlier releases: every ShieldKey field null.
        for line in [
            r#"{"bytes_received":0,"bytes_sent":0,"client_address":"127.0.0.1","duration_ms":0,"host":"gw","status":404,"time":"2026-11-26T02:38:58.297Z"}"#,
            r#"{"bytes_received":0,"bytes_sent":0,"client_address":"127.0.0.1","completion_tokens":null,"cost_estimated":null,"cost_nano_usd":null,"country":null,"decision":null,"duration_ms":0,"method":"GET","model":null,"owner":null,"prompt_tokens":null,"request_id":null,"route":null,"status":404,"team":null,"time":"2026-11-26T02:38:58.297Z","token_id":null,"upstream_key":null,"would_deny":null}"#,
        ] {
            let r = record(line);
            assert_eq!(r.number("prompt_tokens"), None);
            assert_eq!(r.text("decision"), None);
            assert!(r.would_deny().is_empty());
            let cells = record_cells(&r);
            assert_eq!(cells[1], "-");
            assert_eq!(cells[12], "-");
            assert_eq!(cells[13], "404");
        }
    }

    #[test]
    fn non_objects_and_wrong_types_are_skipped_with_a_reason() {
        for line in [
            "[2026-11-26 02:38:58.297][1][info][main] starting main dispatch loop",
            "{\"time\":\"2026-11-26T02:38:58Z\",\"token_id\":\"me",
            "[1,2]",
            "\"text\"",
            "42",
            "null",
            "\u{1b}[31m{",
        ] {
            assert_eq!(parse_line(line.as_bytes()), Line::NotJson, "{line}");
        }
        assert_eq!(parse_line(b"   \n"), Line::Blank);
        assert_eq!(parse_line(&[0xff, 0xfe, b'{']), Line::NotJson);
        let why = |text: &str| match parse_line(text.as_bytes()) {
            Line::Malformed(why) => why,
            other => panic!("{text}: {other:?}"),
        };
        assert_eq!(
            why(r#"{"time":"2026-11-26T02:38:58Z","status":"two hundred"}"#),
            "status is not a whole number"
        );
        assert_eq!(
            why(r#"{"time":"2026-11-26T02:38:58Z","cost_nano_usd":"-5"}"#),
            "cost_nano_usd is not a whole number"
        );
        assert_eq!(
            why(r#"{"time":"2026-11-26T02:38:58Z","cost_nano_usd":1.5}"#),
            "cost_nano_usd is not a whole number"
        );
        assert_eq!(
            why(r#"{"time":"2026-11-26T02:38:58Z","prompt_tokens":"99999999999999999999999"}"#),
            "prompt_tokens is too large"
        );
        assert_eq!(
            why(r#"{"time":"2026-11-26T02:38:58Z","cost_estimated":"maybe"}"#),
            "cost_estimated is not true or false"
        );
        assert_eq!(
            why(r#"{"time":"2026-11-26T02:38:58Z","token_id":7}"#),
            "token_id is not a string"
        );
        assert_eq!(why(r#"{"token_id":"a"}"#), "time is missing");
        assert_eq!(why(r#"{"time":null}"#), "time is missing");
        assert_eq!(
            why(r#"{"time":"yesterday"}"#),
            "time is not an RFC 3339 time"
        );
        // The reason names the field, never the value.
        assert!(
            !why(r#"{"time":"2026-11-26T02:38:58Z","status":"sk_secret"}"#).contains("sk_secret")
        );
    }

    #[test]
    fn a_log_mixed_with_envoy_lines_is_read_and_counted() {
        let text = format!(
            "[2026-11-26 02:38:58.100][7][info][main] starting\n{REAL}\n\n\
             {{\"time\":\"2026-11-26T02:38:59Z\",\"status\":\"x\"}}\n{}\n{{\"time\":\"2026",
            REAL.replace("02:38:58.297", "02:38:57.001")
        );
        let (records, skipped) = read_log(text.as_bytes()).unwrap();
        assert_eq!(records.len(), 2);
        assert_eq!(skipped.not_json, 2);
        assert_eq!(
            skipped.malformed,
            vec![(4, "status is not a whole number".to_string())]
        );
        // In the order written; merge puts them in time order.
        assert!(records[0].time_ms > records[1].time_ms);
        let merged = merge(vec![records]);
        assert!(merged[0].time_ms < merged[1].time_ms);
    }

    #[test]
    fn logs_are_merged_in_time_order_ties_in_argument_order() {
        let at = |t: &str, id: &str| with(json!({"time": t, "token_id": id}));
        let a = vec![
            at("2026-11-26T02:00:00.000Z", "a1"),
            at("2026-11-26T02:00:02.000Z", "a2"),
            at("2026-11-26T02:00:01.500Z", "a3"),
        ];
        let b = vec![
            at("2026-11-26T02:00:01.500Z", "b1"),
            at("2026-11-26T03:00:00.000+01:00", "b2"),
        ];
        let order: Vec<String> = merge(vec![a, b])
            .iter()
            .map(|r| r.text("token_id").unwrap().to_string())
            .collect();
        assert_eq!(order, ["a1", "b2", "a3", "b1", "a2"]);
    }

    #[test]
    fn times_and_relative_times() {
        assert_eq!(
            parse_time_ms("2026-11-26T02:38:58.297Z").unwrap(),
            ms("2026-11-26T02:38:58Z") + 297
        );
        assert_eq!(
            parse_time_ms("2026-11-26T02:38:58.5Z").unwrap(),
            ms("2026-11-26T02:38:58Z") + 500
        );
        assert_eq!(
            parse_time_ms("2026-11-26T02:38:58.123456789+01:00").unwrap(),
            ms("2026-11-26T01:38:58Z") + 123
        );
        assert_eq!(parse_time_ms("1969-12-31T23:59:59.5Z").unwrap(), -500);
        let now = ms("2026-11-26T12:00:00Z");
        assert_eq!(
            parse_instant("15m", now).unwrap(),
            ms("2026-11-26T11:45:00Z")
        );
        assert_eq!(
            parse_instant("2h", now).unwrap(),
            ms("2026-11-26T10:00:00Z")
        );
        assert_eq!(
            parse_instant("7d", now).unwrap(),
            ms("2026-11-19T12:00:00Z")
        );
        assert_eq!(
            parse_instant("30s", now).unwrap(),
            ms("2026-11-26T11:59:30Z")
        );
        assert_eq!(
            parse_instant("2026-11-25T00:00:00Z", now).unwrap(),
            ms("2026-11-25T00:00:00Z")
        );
        assert_eq!(
            parse_instant("2026-11-25", now).unwrap(),
            ms("2026-11-25T00:00:00Z")
        );
        for bad in [
            "",
            "15",
            "15w",
            "-15m",
            "0m",
            "yesterday",
            "2026-11-25T00:00",
            "2026-13-01",
            "m",
        ] {
            assert!(parse_instant(bad, now).is_err(), "{bad}");
        }
        assert!(parse_instant("99999999999999d", now).is_err());
    }

    #[test]
    fn every_filter() {
        let r = with(json!({
            "owner": "ml@example.com", "team": "eng", "country": "FR",
            "client_address": "10.1.2.3", "time": "2026-11-26T02:00:00.000Z"
        }));
        let all = |f: Filter| f.matches(&r);
        assert!(all(Filter::default()));
        type Set = fn(&mut Filter, String);
        let text_filters: [(Set, &str, &str); 6] = [
            (|f, v| f.token = Some(v), "meter", "other"),
            (|f, v| f.owner = Some(v), "ml@example.com", "ML@example.com"),
            (|f, v| f.team = Some(v), "eng", "ops"),
            (
                |f, v| f.model = Some(v),
                "mistral-small-latest",
                "mistral-small",
            ),
            (
                |f, v| f.route = Some(v),
                "v1/chat/completions",
                "v1/embeddings",
            ),
            (
                |f, v| f.request_id = Some(v),
                "e87cc71d-042d-453b-910a-677faaa024b5",
                "e87cc71d",
            ),
        ];
        for (set, yes, no) in text_filters {
            let mut f = Filter::default();
            set(&mut f, yes.to_string());
            assert!(all(f.clone()), "{yes}");
            set(&mut f, no.to_string());
            assert!(!all(f), "{no}");
        }
        // A route given with its leading slash.
        assert!(all(Filter {
            route: Some("/v1/chat/completions".into()),
            ..Filter::default()
        }));
        // Time: --since inclusive, --until exclusive.
        let t = ms("2026-11-26T02:00:00Z");
        let window = |since, until| Filter {
            since_ms: since,
            until_ms: until,
            ..Filter::default()
        };
        assert!(all(window(Some(t), None)));
        assert!(!all(window(Some(t + 1), None)));
        assert!(all(window(None, Some(t + 1))));
        assert!(!all(window(None, Some(t))));
        assert!(all(window(Some(t - 1000), Some(t + 1000))));
        // Country: case-insensitive; UNKNOWN for records without one.
        let country = |c: &str| Filter {
            country: Some(c.to_ascii_uppercase()),
            ..Filter::default()
        };
        assert!(all(country("fr")));
        assert!(!all(country("de")));
        assert!(!all(country("unknown")));
        let nowhere = with(json!({"country": null}));
        assert!(country("unknown").matches(&nowhere));
        assert!(!country("fr").matches(&nowhere));
        // A null field never matches a filter on it.
        let anonymous = with(json!({"token_id": null, "owner": null}));
        assert!(!Filter {
            token: Some("meter".into()),
            ..Filter::default()
        }
        .matches(&anonymous));
    }

    #[test]
    fn client_addresses_and_networks() {
        let from = |addr: Value| with(json!({ "client_address": addr }));
        let client = |c: &str| Filter {
            client: Some(parse_client(c).unwrap()),
            ..Filter::default()
        };
        let v4 = from(json!("10.1.2.3"));
        assert!(client("10.1.2.3").matches(&v4));
        assert!(!client("10.1.2.4").matches(&v4));
        assert!(client("10.0.0.0/8").matches(&v4));
        assert!(client("10.1.2.0/24").matches(&v4));
        assert!(!client("10.1.3.0/24").matches(&v4));
        // Host bits in the network are ignored, as ip-rules read them.
        assert!(client("10.1.2.77/24").matches(&v4));
        assert!(client("0.0.0.0/0").matches(&v4));
        assert!(!client("::/0").matches(&v4));
        let v6 = from(json!("2001:db8::7"));
        assert!(client("2001:db8::/32").matches(&v6));
        assert!(client("2001:db8::7").matches(&v6));
        assert!(!client("10.0.0.0/8").matches(&v6));
        // An IPv4-mapped IPv6 address (a dual-stack listener) is its IPv4 address.
        let mapped = from(json!("::ffff:10.1.2.3"));
        assert!(client("10.1.2.3").matches(&mapped));
        assert!(client("10.0.0.0/8").matches(&mapped));
        for absent in [json!(null), json!("/var/run/envoy.sock"), json!("")] {
            assert!(!client("0.0.0.0/0").matches(&from(absent)));
        }
        for bad in ["10.0.0", "10.0.0.0/33", "host.example", "10.0.0.0/", ""] {
            assert!(parse_client(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn decisions() {
        let allowed = record(REAL);
        let denied = with(json!({"decision": "shield_budget_exceeded", "cost_nano_usd": null}));
        let dry = with(json!({"would_deny": "shield_model_denied,shield_team_budget_exceeded"}));
        let unjudged = with(json!({"decision": null}));
        let check = |d: &str, want: [bool; 4]| {
            let f = Filter {
                decision: Some(DecisionFilter::parse(d).unwrap()),
                ..Filter::default()
            };
            let got = [&allowed, &denied, &dry, &unjudged].map(|r| f.matches(r));
            assert_eq!(got, want, "{d}");
        };
        check("allowed", [true, false, true, false]);
        check("denied", [false, true, false, false]);
        check("would-deny", [false, false, true, false]);
        check("would_deny", [false, false, true, false]);
        check("shield_budget_exceeded", [false, true, false, false]);
        check("shield_model_denied", [false, false, false, false]);
        for bad in ["deny", "refused", "shield_nope", "ALLOWED", ""] {
            assert!(DecisionFilter::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            dry.would_deny(),
            ["shield_model_denied", "shield_team_budget_exceeded"]
        );
        assert_eq!(
            record_cells(&dry)[4],
            "allowed [shield_model_denied,shield_team_budget_exceeded]"
        );
        assert_eq!(record_cells(&denied)[4], "shield_budget_exceeded");
    }

    #[test]
    fn summary_sums_per_token_and_team() {
        let records = [
            with(
                json!({"time": "2026-11-26T02:00:00.000Z", "team": "eng", "owner": "a@x",
                        "client_address": "10.0.0.1"}),
            ),
            with(
                json!({"time": "2026-11-26T02:00:05.000Z", "team": "eng", "owner": "a@x",
                        "prompt_tokens": "7", "completion_tokens": "3", "cost_nano_usd": "2850",
                        "cost_estimated": "true", "client_address": "10.0.0.2",
                        "would_deny": "shield_rate_limited"}),
            ),
            with(json!({"time": "2026-11-26T01:59:00.000Z", "team": "eng",
                        "decision": "shield_budget_exceeded", "prompt_tokens": null,
                        "completion_tokens": null, "cost_nano_usd": null,
                        "cost_estimated": null})),
            with(
                json!({"time": "2026-11-26T02:00:01.000Z", "token_id": "solo", "team": "eng",
                        "decision": "shield_team_rate_limited", "cost_nano_usd": null,
                        "prompt_tokens": null, "completion_tokens": null}),
            ),
            with(
                json!({"time": "2026-11-26T02:00:02.000Z", "token_id": "other",
                        "decision": "shield_budget_exceeded", "cost_nano_usd": null,
                        "prompt_tokens": null, "completion_tokens": null}),
            ),
            with(
                json!({"time": "2026-11-26T02:00:03.000Z", "token_id": null, "team": null,
                        "decision": "shield_token_unknown", "cost_nano_usd": null,
                        "prompt_tokens": null, "completion_tokens": null}),
            ),
            with(
                json!({"time": "2026-11-26T02:00:04.000Z", "token_id": null, "decision": null,
                        "status": 404, "cost_nano_usd": null, "prompt_tokens": null,
                        "completion_tokens": null}),
            ),
        ];
        let s = summarize(records.iter());
        let meter = &s.tokens[&Some("meter".to_string())];
        assert_eq!(meter.owners, BTreeSet::from(["a@x".to_string()]));
        assert_eq!(meter.teams, BTreeSet::from(["eng".to_string()]));
        let t = &meter.totals;
        assert_eq!(
            (t.requests, t.allowed, t.denied, t.not_decided),
            (3, 2, 1, 0)
        );
        assert_eq!(t.denied_by_code["shield_budget_exceeded"], 1);
        assert_eq!(t.would_deny, 1);
        assert_eq!(t.would_deny_by_code["shield_rate_limited"], 1);
        assert_eq!((t.prompt_tokens, t.completion_tokens), (1007, 503));
        assert_eq!(t.cost, 452_850);
        assert_eq!(t.cost_estimated, 1);
        assert_eq!(
            t.first_seen.as_ref().map(|(_, s)| s.as_str()),
            Some("2026-11-26T01:59:00.000Z")
        );
        assert_eq!(
            t.last_seen.as_ref().map(|(_, s)| s.as_str()),
            Some("2026-11-26T02:00:05.000Z")
        );
        assert_eq!(
            t.clients,
            BTreeSet::from(["10.0.0.1", "10.0.0.2", "127.0.0.1"].map(String::from))
        );
        let eng = &s.teams["eng"];
        assert_eq!(
            eng.tokens,
            BTreeSet::from(["meter".to_string(), "solo".to_string()])
        );
        assert_eq!((eng.totals.requests, eng.totals.denied), (4, 2));
        assert_eq!(eng.totals.cost, 452_850);
        let none = &s.tokens[&None];
        assert_eq!(
            (
                none.totals.requests,
                none.totals.denied,
                none.totals.not_decided
            ),
            (2, 1, 1)
        );
        let total = &s.total;
        assert_eq!(total.requests, 7);
        assert_eq!(
            total.allowed + total.denied + total.not_decided,
            total.requests
        );
        assert_eq!(total.cost, 452_850);
        assert_eq!(total.denied_by_code["shield_budget_exceeded"], 2);

        let doc = s.json();
        assert_eq!(doc["total"]["cost_nano_usd"], 452_850);
        assert_eq!(doc["total"]["cost_usd"], "0.00045285");
        let tokens = doc["tokens"].as_array().unwrap();
        // Records without a token come last, as null.
        assert_eq!(tokens.len(), 4);
        assert_eq!(tokens[3]["token_id"], Value::Null);
        assert_eq!(tokens[0]["token_id"], "meter");
        let meter = tokens.iter().find(|t| t["token_id"] == "meter").unwrap();
        assert_eq!(meter["requests"], 3);
        assert_eq!(
            meter["denied_by_code"],
            json!({"shield_budget_exceeded": 1})
        );
        assert_eq!(
            meter["clients"],
            json!(["10.0.0.1", "10.0.0.2", "127.0.0.1"])
        );
        assert_eq!(doc["teams"][0]["team"], "eng");
        assert_eq!(doc["teams"][0]["tokens"], json!(["meter", "solo"]));
        let tables = s.tables();
        assert!(tables.starts_with("TEAM"), "{tables}");
        assert!(tables.contains("(total)"), "{tables}");
        assert!(tables.contains("0.00045285"), "{tables}");
        // Nothing: empty totals.
        let empty = summarize([]);
        assert_eq!(empty.json()["total"]["requests"], 0);
        assert_eq!(empty.json()["total"]["first_seen"], Value::Null);
    }

    #[test]
    fn money_in_usd_with_six_decimals_exactly() {
        assert_eq!(usd6(450_000), "0.000450");
        assert_eq!(usd6(0), "0.000000");
        assert_eq!(usd6(12_500_000_000), "12.500000");
        assert_eq!(usd6(2_850), "0.00000285");
        assert_eq!(usd6(1), "0.000000001");
    }

    #[test]
    fn the_table_shows_records_and_escapes_control_characters() {
        let r = with(json!({"country": "F\u{1b}[2JR", "owner": "a@x", "team": "eng"}));
        let text = records_table(&[&r]);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("TIME"));
        assert!(!text.contains('\u{1b}'));
        assert!(lines[1].contains("F\\u{1b}[2JR"));
        for cell in [
            "2026-11-26T02:38:58.297Z",
            "meter",
            "a@x",
            "eng",
            "allowed",
            "127.0.0.1",
            "POST",
            "v1/chat/completions",
            "mistral-small-latest",
            "1000",
            "500",
            "0.000450",
            "200",
        ] {
            assert!(lines[1].contains(cell), "{cell}: {}", lines[1]);
        }
    }
}
