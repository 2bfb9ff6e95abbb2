//! etcd v3 through its JSON gateway (checked with etcd 3.4: `POST /v3/<service>/<method>`,
//! HTTP/1.1, keys and values standard base64, int64 as strings, zero values left out).
//!
//! What the CLI needs: a prefix read in pages at one store revision, guarded writes (every key
//! written is compared with the `mod_revision` it was read at) split into transactions under
//! etcd's operation limit, password authentication, and TLS for `https://` URLs (the server
//! verified against `--etcd-cacert`, optionally a client certificate: `tls`).

use std::fmt;
use std::sync::OnceLock;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde_json::{json, Value};

use super::http::{self, Endpoint, HttpError, Limits, Request, UrlError};
use super::tls::Tls;
use crate::secret::SecretBytes;

/// Keys per `kv/range` page.
pub const PAGE_LIMIT: u64 = 5000;
/// Operations per transaction. etcd refuses more than 128 (`--max-txn-ops`) in the success list
/// and in the compare list; each transaction compares one key more than it writes.
pub const MAX_OPS_PER_TXN: usize = 100;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// etcd itself gives up on a request after about 7 s without quorum.
const IO_TIMEOUT: Duration = Duration::from_secs(15);
const MAX_RESPONSE: u64 = 512 << 20;
/// How often a paged read starts over when the revision it reads at was compacted meanwhile.
const RANGE_RESTARTS: usize = 3;

/// gRPC status codes etcd puts in its error bodies.
const CODE_OUT_OF_RANGE: i64 = 11;
const CODE_UNAVAILABLE: i64 = 14;
const CODE_UNAUTHENTICATED: i64 = 16;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdError {
    pub message: String,
    /// etcd's gRPC code, when etcd answered with an error.
    pub code: Option<i64>,
}

impl EtcdError {
    fn new(message: impl Into<String>) -> EtcdError {
        EtcdError {
            message: message.into(),
            code: None,
        }
    }
}

impl fmt::Display for EtcdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// Sends one gateway call (`method` such as `kv/range`) and returns etcd's JSON answer. `Send`:
/// the console calls etcd from a worker thread.
pub trait Transport: Send {
    /// `resend_safe`: the call changes nothing (a read, authentication), so it may be sent to the
    /// next endpoint after a failure that happened once it was sent.
    fn call(&mut self, method: &str, body: &Value, resend_safe: bool) -> Result<Value, EtcdError>;
    /// The endpoints, for messages.
    fn describe(&self) -> String;
}

/// Password authentication: the user from `--etcd-user`, the password from the environment.
pub struct Credentials {
    pub user: String,
    /// `None` when the variable is not set: reported when etcd is first asked.
    pub password: Option<SecretBytes>,
    /// Where the password comes from, for messages.
    pub password_env: &'static str,
}

/// The TLS settings of the global options, for `https://` endpoints: set once, before any client
/// is made (the policy store and the ledger reader make their own).
static TLS: OnceLock<Tls> = OnceLock::new();

/// Makes every `HttpTransport` made after it connect to `https://` endpoints with `tls`. The first
/// call wins: the CLI calls it once, from its global options.
pub fn use_tls(tls: Tls) {
    let _ = TLS.set(tls);
}

/// The real transport: HTTP/1.1 to the endpoints, tried in order until one answers.
pub struct HttpTransport {
    endpoints: Vec<Endpoint>,
    /// For `https://` endpoints.
    tls: Option<Tls>,
    /// The endpoint that answered last; tried first.
    next: usize,
    credentials: Option<Credentials>,
    /// Auth tokens per endpoint (etcd's simple tokens are valid on the member that issued them).
    tokens: Vec<Option<String>>,
    limits: Limits,
}

/// What to do after a failed attempt on one endpoint.
enum Failure {
    /// Nothing happened there: try the next endpoint.
    TryNext(EtcdError),
    /// Report it.
    Stop(EtcdError),
}

impl HttpTransport {
    /// `urls`: comma-separated `http://host:port` or `https://host:port`; `https://` ones use the
    /// TLS settings given to `use_tls`.
    pub fn new(urls: &str, credentials: Option<Credentials>) -> Result<HttpTransport, String> {
        HttpTransport::with_tls(urls, credentials, TLS.get().cloned())
    }

    /// `new`, with these TLS settings.
    pub fn with_tls(
        urls: &str,
        credentials: Option<Credentials>,
        tls: Option<Tls>,
    ) -> Result<HttpTransport, String> {
        let mut endpoints: Vec<Endpoint> = Vec::new();
        for url in urls.split(',').map(str::trim).filter(|u| !u.is_empty()) {
            let endpoint = Endpoint::parse_http_or_https(url).map_err(|e| match e {
                UrlError::NotHttp => {
                    format!("{url}: give etcd client URLs as http://HOST:PORT or https://HOST:PORT")
                }
                UrlError::BadHostPort => format!("{url}: cannot read host and port"),
            })?;
            if let Some(first) = endpoints.first().filter(|f| f.https != endpoint.https) {
                return Err(format!(
                    "{} and {url}: give every etcd URL with the same scheme, http:// or https://",
                    first.url()
                ));
            }
            if endpoint.https && tls.is_none() {
                return Err(format!(
                    "{url}: an https:// etcd needs --etcd-cacert PATH (or SHIELDKEY_ETCD_CACERT), \
                     the PEM CA bundle that signed its certificate"
                ));
            }
            endpoints.push(endpoint);
        }
        if endpoints.is_empty() {
            return Err("no etcd URL given".to_string());
        }
        Ok(HttpTransport {
            tokens: vec![None; endpoints.len()],
            tls: tls.filter(|_| endpoints.iter().any(|e| e.https)),
            endpoints,
            next: 0,
            credentials,
            limits: Limits {
                connect_timeout: CONNECT_TIMEOUT,
                io_timeout: IO_TIMEOUT,
                max_response: MAX_RESPONSE,
            },
        })
    }

    fn post(
        &self,
        index: usize,
        method: &str,
        body: &[u8],
        token: Option<&str>,
    ) -> Result<http::Response, HttpError> {
        let endpoint = self
            .endpoints
            .get(index)
            .ok_or_else(|| HttpError::Connect("no such endpoint".to_string()))?;
        let path = format!("/v3/{method}");
        let mut headers = vec![("Content-Type", "application/json")];
        if let Some(token) = token {
            headers.push(("Authorization", token));
        }
        http::send_over(
            endpoint,
            &Request {
                method: "POST",
                path: &path,
                headers: &headers,
                body,
            },
            &self.limits,
            self.tls.as_ref(),
        )
    }

    fn url(&self, index: usize) -> &str {
        self.endpoints.get(index).map_or("?", |e| e.url())
    }

    /// Gets an auth token from the member at `index`.
    fn authenticate(&mut self, index: usize) -> Result<(), Failure> {
        let Some(credentials) = &self.credentials else {
            return Ok(());
        };
        let password = credentials.password.as_ref().ok_or_else(|| {
            Failure::Stop(EtcdError::new(format!(
                "{} is not set: the password of --etcd-user {} is read from the environment only",
                credentials.password_env, credentials.user
            )))
        })?;
        let password = std::str::from_utf8(password.expose()).map_err(|_| {
            Failure::Stop(EtcdError::new(format!(
                "{} is not UTF-8",
                credentials.password_env
            )))
        })?;
        let body = SecretBytes::new(
            json!({"name": credentials.user, "password": password})
                .to_string()
                .into_bytes(),
        );
        let user = credentials.user.clone();
        let answer = self.exchange(index, "auth/authenticate", body.expose(), None, true)?;
        let token = answer
            .get("token")
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                Failure::Stop(EtcdError::new(format!(
                    "etcd at {} gave no auth token for user {user}",
                    self.url(index)
                )))
            })?;
        if let Some(slot) = self.tokens.get_mut(index) {
            *slot = Some(token.to_string());
        }
        Ok(())
    }

    /// One request to one endpoint; a 200 answer's JSON, or what to do next.
    fn exchange(
        &self,
        index: usize,
        method: &str,
        body: &[u8],
        token: Option<&str>,
        resend_safe: bool,
    ) -> Result<Value, Failure> {
        let url = self.url(index).to_string();
        match self.post(index, method, body, token) {
            Err(HttpError::Connect(m)) => Err(Failure::TryNext(EtcdError::new(m))),
            Err(HttpError::Exchange(m)) if resend_safe => Err(Failure::TryNext(EtcdError::new(m))),
            Err(HttpError::Exchange(m)) => Err(Failure::Stop(EtcdError::new(format!(
                "{m}: no answer from etcd, so the change may or may not have been applied \
                 (see `shieldkey list`)"
            )))),
            Ok(answer) if answer.status == 200 => {
                serde_json::from_slice(&answer.body).map_err(|e| {
                    let error = EtcdError::new(format!(
                        "etcd at {url} answered {method} with something that is not JSON: {e}"
                    ));
                    if resend_safe {
                        Failure::TryNext(error)
                    } else {
                        Failure::Stop(error)
                    }
                })
            }
            Ok(answer) => {
                let error = api_error(&url, method, answer.status, &answer.body);
                let unavailable = answer.status >= 500 || error.code == Some(CODE_UNAVAILABLE);
                if unavailable && resend_safe {
                    Err(Failure::TryNext(error))
                } else if unavailable {
                    Err(Failure::Stop(EtcdError {
                        message: format!(
                            "{}; the change may or may not have been applied (see `shieldkey list`)",
                            error.message
                        ),
                        code: error.code,
                    }))
                } else {
                    Err(Failure::Stop(error))
                }
            }
        }
    }

    fn call_one(
        &mut self,
        index: usize,
        method: &str,
        body: &[u8],
        resend_safe: bool,
    ) -> Result<Value, Failure> {
        if self.credentials.is_some() && self.tokens.get(index).is_some_and(Option::is_none) {
            self.authenticate(index)?;
        }
        let mut reauthenticated = false;
        loop {
            let token = self.tokens.get(index).cloned().flatten();
            match self.exchange(index, method, body, token.as_deref(), resend_safe) {
                // An expired or foreign token is refused before anything is done: safe to resend.
                Err(Failure::Stop(e))
                    if e.code == Some(CODE_UNAUTHENTICATED)
                        && self.credentials.is_some()
                        && !reauthenticated =>
                {
                    reauthenticated = true;
                    self.authenticate(index)?;
                }
                other => return other,
            }
        }
    }
}

/// etcd's error body (`{"error":..,"message":..,"code":N}`) as a message, with a hint for the
/// usual causes.
fn api_error(url: &str, method: &str, status: u16, body: &[u8]) -> EtcdError {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    let code = parsed.as_ref().and_then(|v| v.get("code")).and_then(int);
    let text = parsed
        .as_ref()
        .and_then(|v| v.get("message").or_else(|| v.get("error")))
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| {
            String::from_utf8_lossy(body)
                .trim()
                .chars()
                .take(300)
                .collect()
        });
    let hint = if text.contains("user name is empty") || text.contains("invalid auth token") {
        " (this etcd requires authentication: give --etcd-user NAME and SHIELDKEY_ETCD_PASSWORD)"
    } else if text.contains("permission denied") {
        " (the etcd user's role needs readwrite on the whole <prefix>policy/ range)"
    } else if text.contains("authentication failed") {
        " (check --etcd-user and SHIELDKEY_ETCD_PASSWORD)"
    } else {
        ""
    };
    EtcdError {
        message: format!("etcd at {url} refused {method} ({status}): {text}{hint}"),
        code,
    }
}

impl Transport for HttpTransport {
    fn call(&mut self, method: &str, body: &Value, resend_safe: bool) -> Result<Value, EtcdError> {
        let bytes = body.to_string().into_bytes();
        let count = self.endpoints.len();
        let mut errors = Vec::new();
        for k in 0..count {
            let index = (self.next + k) % count;
            match self.call_one(index, method, &bytes, resend_safe) {
                Ok(answer) => {
                    self.next = index;
                    return Ok(answer);
                }
                Err(Failure::Stop(e)) => return Err(e),
                Err(Failure::TryNext(e)) => errors.push(e.message),
            }
        }
        Err(EtcdError::new(format!(
            "no etcd endpoint answered: {}",
            errors.join("; ")
        )))
    }

    fn describe(&self) -> String {
        self.endpoints
            .iter()
            .map(Endpoint::url)
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// int64 as the gateway writes them (strings), or as numbers.
fn int(v: &Value) -> Option<i64> {
    match v {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_i64(),
        _ => None,
    }
}

fn field_int(v: &Value, name: &str) -> Option<i64> {
    v.get(name).and_then(int)
}

/// The end of the range of every key that starts with a prefix: the filter's own.
pub use crate::fleet::etcd::prefix_end;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kv {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub mod_revision: i64,
}

/// A prefix read: its keys, sorted, all as of one store revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub revision: i64,
    pub kvs: Vec<Kv>,
}

/// One key to write: put `value`, or delete it when `None`. `seen` is the `mod_revision` the key
/// had when it was read (0: it did not exist); the write happens only if it still has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub key: Vec<u8>,
    pub seen: i64,
    pub value: Option<Vec<u8>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// Every change was applied, in `steps` transactions.
    Done { steps: usize },
    /// A compare failed: someone else changed a key since it was read. The first
    /// `steps_applied` transactions were applied.
    Lost { steps_applied: usize },
}

pub struct Etcd {
    transport: Box<dyn Transport>,
    page_limit: u64,
    max_ops: usize,
}

fn b64(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

fn protocol(what: &str) -> EtcdError {
    EtcdError::new(format!("unexpected answer from etcd: {what}"))
}

impl Etcd {
    pub fn new(transport: Box<dyn Transport>) -> Etcd {
        Etcd {
            transport,
            page_limit: PAGE_LIMIT,
            max_ops: MAX_OPS_PER_TXN,
        }
    }

    pub fn describe(&self) -> String {
        self.transport.describe()
    }

    /// Every key under `prefix`, read in pages of `PAGE_LIMIT` at the revision of the first page.
    pub fn range_prefix(&mut self, prefix: &[u8]) -> Result<Snapshot, EtcdError> {
        let mut restarts = 0;
        loop {
            match self.range_once(prefix) {
                Err(e) if e.code == Some(CODE_OUT_OF_RANGE) && restarts < RANGE_RESTARTS => {
                    restarts += 1;
                }
                other => return other,
            }
        }
    }

    fn range_once(&mut self, prefix: &[u8]) -> Result<Snapshot, EtcdError> {
        let end = b64(&prefix_end(prefix));
        let mut from = prefix.to_vec();
        let mut revision: Option<i64> = None;
        let mut kvs = Vec::new();
        loop {
            let mut body = json!({
                "key": b64(&from),
                "range_end": end,
                "limit": self.page_limit.to_string(),
            });
            if let (Some(rev), Some(obj)) = (revision, body.as_object_mut()) {
                obj.insert("revision".to_string(), Value::String(rev.to_string()));
            }
            let answer = self.transport.call("kv/range", &body, true)?;
            let header_revision = answer
                .get("header")
                .and_then(|h| field_int(h, "revision"))
                .ok_or_else(|| protocol("a range without a header revision"))?;
            let at = *revision.get_or_insert(header_revision);
            let page = answer
                .get("kvs")
                .and_then(Value::as_array)
                .map(Vec::as_slice)
                .unwrap_or_default();
            for kv in page {
                let decode = |name: &str| {
                    STANDARD
                        .decode(kv.get(name).and_then(Value::as_str).unwrap_or(""))
                        .map_err(|_| protocol("a key or value that is not base64"))
                };
                kvs.push(Kv {
                    key: decode("key")?,
                    value: decode("value")?,
                    mod_revision: field_int(kv, "mod_revision").unwrap_or(0),
                });
            }
            let more = answer.get("more").and_then(Value::as_bool).unwrap_or(false);
            if !more {
                return Ok(Snapshot { revision: at, kvs });
            }
            let last = kvs
                .last()
                .filter(|_| !page.is_empty())
                .ok_or_else(|| protocol("\"more\" with an empty page"))?;
            from = last.key.clone();
            from.push(0);
        }
    }

    /// One transaction: if every key in `guards` has its `mod_revision`, apply `changes`.
    /// Returns whether it was applied.
    pub fn txn(&mut self, guards: &[(&[u8], i64)], changes: &[&Change]) -> Result<bool, EtcdError> {
        let compare: Vec<Value> = guards
            .iter()
            .map(|(key, seen)| {
                json!({"key": b64(key), "target": "MOD", "result": "EQUAL",
                       "mod_revision": seen.to_string()})
            })
            .collect();
        let success: Vec<Value> = changes
            .iter()
            .map(|c| match &c.value {
                Some(v) => json!({"request_put": {"key": b64(&c.key), "value": b64(v)}}),
                None => json!({"request_delete_range": {"key": b64(&c.key)}}),
            })
            .collect();
        let answer = self.transport.call(
            "kv/txn",
            &json!({"compare": compare, "success": success}),
            false,
        )?;
        if answer.get("header").is_none() {
            return Err(protocol("a txn answer without a header"));
        }
        Ok(answer
            .get("succeeded")
            .and_then(Value::as_bool)
            .unwrap_or(false))
    }

    /// Applies `changes` and then `last`, each guarded by the `mod_revision` it was read at. When
    /// they do not fit one transaction, they are split into transactions of at most
    /// `MAX_OPS_PER_TXN` operations, in order, `last` in the final one; every transaction also
    /// checks that `last`'s key is unchanged, so no other writer (all of which change that key)
    /// can interleave.
    pub fn write_guarded(
        &mut self,
        changes: &[Change],
        last: &Change,
    ) -> Result<Written, EtcdError> {
        let all: Vec<&Change> = changes.iter().chain(std::iter::once(last)).collect();
        let chunks: Vec<&[&Change]> = all.chunks(self.max_ops.max(1)).collect();
        let steps = chunks.len();
        for (i, chunk) in chunks.into_iter().enumerate() {
            let mut guards: Vec<(&[u8], i64)> =
                chunk.iter().map(|c| (c.key.as_slice(), c.seen)).collect();
            if i + 1 < steps {
                guards.push((last.key.as_slice(), last.seen));
            }
            if !self.txn(&guards, chunk)? {
                return Ok(Written::Lost { steps_applied: i });
            }
        }
        Ok(Written::Done { steps })
    }
}

#[cfg(test)]
pub mod fake {
    //! An in-memory etcd behind the `Transport` trait, with etcd's op limit and revisions.

    use super::*;
    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex, MutexGuard};

    /// Runs before a txn is applied, with its number (from 0).
    pub type Hook = Box<dyn FnMut(usize, &mut State) + Send>;

    #[derive(Default)]
    pub struct State {
        pub revision: i64,
        pub kvs: BTreeMap<Vec<u8>, (Vec<u8>, i64)>,
        /// Every call: method and body.
        pub calls: Vec<(String, Value)>,
        pub before_txn: Option<Hook>,
        pub txns: usize,
    }

    impl State {
        pub fn put(&mut self, key: &[u8], value: &[u8]) {
            self.revision += 1;
            self.kvs
                .insert(key.to_vec(), (value.to_vec(), self.revision));
        }
    }

    #[derive(Clone, Default)]
    pub struct Fake(pub Arc<Shared>);

    /// The fake's state, shared by the test and the transport it gave away.
    #[derive(Default)]
    pub struct Shared(Mutex<State>);

    impl Shared {
        pub fn borrow(&self) -> MutexGuard<'_, State> {
            self.0.lock().unwrap()
        }

        pub fn borrow_mut(&self) -> MutexGuard<'_, State> {
            self.0.lock().unwrap()
        }
    }

    fn bytes(v: &Value, name: &str) -> Vec<u8> {
        STANDARD
            .decode(v.get(name).and_then(Value::as_str).unwrap_or(""))
            .unwrap()
    }

    impl Transport for Fake {
        fn call(&mut self, method: &str, body: &Value, _: bool) -> Result<Value, EtcdError> {
            let mut s = self.0.borrow_mut();
            s.calls.push((method.to_string(), body.clone()));
            match method {
                "kv/range" => {
                    let from = bytes(body, "key");
                    let end = bytes(body, "range_end");
                    let limit = field_int(body, "limit").unwrap_or(0) as usize;
                    if let Some(rev) = field_int(body, "revision") {
                        // The fake keeps no history: a paged read must not see a newer store.
                        assert_eq!(rev, s.revision, "pages read at different revisions");
                    }
                    let all: Vec<_> = s
                        .kvs
                        .range(from..end)
                        .map(|(k, (v, m))| {
                            json!({"key": b64(k), "value": b64(v), "mod_revision": m.to_string()})
                        })
                        .collect();
                    let more = limit > 0 && all.len() > limit;
                    let page: Vec<_> = all
                        .into_iter()
                        .take(if limit > 0 { limit } else { usize::MAX })
                        .collect();
                    let mut answer = json!({"header": {"revision": s.revision.to_string()}});
                    if !page.is_empty() {
                        answer["kvs"] = Value::Array(page);
                    }
                    if more {
                        answer["more"] = Value::Bool(true);
                    }
                    Ok(answer)
                }
                "kv/txn" => {
                    let compare = body["compare"].as_array().unwrap().clone();
                    let success = body["success"].as_array().unwrap().clone();
                    if compare.len() > 128 || success.len() > 128 {
                        return Err(EtcdError {
                            message: "etcdserver: too many operations in txn request".into(),
                            code: Some(3),
                        });
                    }
                    let n = s.txns;
                    s.txns += 1;
                    if let Some(mut hook) = s.before_txn.take() {
                        hook(n, &mut s);
                        s.before_txn = Some(hook);
                    }
                    let ok = compare.iter().all(|c| {
                        assert_eq!(
                            (c["target"].as_str(), c["result"].as_str()),
                            (Some("MOD"), Some("EQUAL"))
                        );
                        let want = field_int(c, "mod_revision").unwrap();
                        let have = s.kvs.get(&bytes(c, "key")).map_or(0, |(_, m)| *m);
                        want == have
                    });
                    if !ok {
                        return Ok(json!({"header": {"revision": s.revision.to_string()}}));
                    }
                    s.revision += 1;
                    let rev = s.revision;
                    for op in &success {
                        if let Some(put) = op.get("request_put") {
                            s.kvs.insert(bytes(put, "key"), (bytes(put, "value"), rev));
                        } else {
                            s.kvs.remove(&bytes(&op["request_delete_range"], "key"));
                        }
                    }
                    Ok(json!({"header": {"revision": rev.to_string()}, "succeeded": true}))
                }
                other => panic!("the fake does not know {other}"),
            }
        }

        fn describe(&self) -> String {
            "fake".to_string()
        }
    }

    pub fn etcd(fake: &Fake, page_limit: u64) -> Etcd {
        let mut e = Etcd::new(Box::new(fake.clone()));
        e.page_limit = page_limit;
        e
    }
}

#[cfg(test)]
mod tests {
    use super::fake::{etcd, Fake};
    use super::*;

    fn key(i: usize) -> Vec<u8> {
        format!("p/policy/tokens/t{i:04}").into_bytes()
    }

    #[test]
    fn a_prefix_is_read_in_pages_at_one_revision() {
        let fake = Fake::default();
        {
            let mut s = fake.0.borrow_mut();
            for i in 0..12 {
                s.put(&key(i), b"{}");
            }
            s.put(b"p/policz", b"outside");
            s.put(b"p/policy", b"outside too");
        }
        let snap = etcd(&fake, 5).range_prefix(b"p/policy/").unwrap();
        assert_eq!(snap.revision, 14);
        assert_eq!(
            snap.kvs.iter().map(|kv| kv.key.clone()).collect::<Vec<_>>(),
            (0..12).map(key).collect::<Vec<_>>()
        );
        assert_eq!(snap.kvs[3].mod_revision, 4);
        let s = fake.0.borrow();
        let ranges: Vec<_> = s.calls.iter().filter(|(m, _)| m == "kv/range").collect();
        assert_eq!(ranges.len(), 3, "12 keys in pages of 5");
        assert!(ranges[0].1.get("revision").is_none());
        assert_eq!(ranges[1].1["revision"], "14");
        assert_eq!(ranges[1].1["limit"], "5");
        // The next page starts just after the last key read.
        let mut next = key(4);
        next.push(0);
        assert_eq!(ranges[1].1["key"], b64(&next));
        assert_eq!(ranges[2].1["range_end"], b64(b"p/policy0"));
    }

    fn puts(n: usize) -> Vec<Change> {
        (0..n)
            .map(|i| Change {
                key: key(i),
                seen: 0,
                value: Some(b"{}".to_vec()),
            })
            .collect()
    }

    fn settings(seen: i64) -> Change {
        Change {
            key: b"p/policy/settings".to_vec(),
            seen,
            value: Some(b"{\"version\":1}".to_vec()),
        }
    }

    #[test]
    fn a_small_change_is_one_guarded_transaction() {
        let fake = Fake::default();
        fake.0.borrow_mut().put(b"p/policy/settings", b"old");
        fake.0.borrow_mut().put(&key(1), b"gone soon");
        let changes = vec![
            Change {
                key: key(0),
                seen: 0,
                value: Some(b"new".to_vec()),
            },
            Change {
                key: key(1),
                seen: 2,
                value: None,
            },
        ];
        let written = etcd(&fake, 10)
            .write_guarded(&changes, &settings(1))
            .unwrap();
        assert_eq!(written, Written::Done { steps: 1 });
        let s = fake.0.borrow();
        let (_, txn) = s.calls.last().unwrap();
        let compare = txn["compare"].as_array().unwrap();
        assert_eq!(compare.len(), 3);
        assert_eq!(
            compare[0]["mod_revision"], "0",
            "absent keys are guarded with 0"
        );
        assert_eq!(compare[1]["mod_revision"], "2");
        assert_eq!(compare[2]["key"], b64(b"p/policy/settings"));
        assert_eq!(compare[2]["mod_revision"], "1");
        assert!(txn["success"][1]["request_delete_range"].is_object());
        assert!(!s.kvs.contains_key(&key(1)));
        assert_eq!(s.kvs[&key(0)].0, b"new");
    }

    #[test]
    fn a_bulk_change_is_split_with_the_settings_last_and_guarded_in_every_step() {
        let fake = Fake::default();
        // What a single transaction of 251 operations would get: etcd's limit is 128.
        let mut e = etcd(&fake, 5000);
        e.max_ops = 1000;
        let err = e.write_guarded(&puts(250), &settings(0)).unwrap_err();
        assert!(err.message.contains("too many operations"), "{err}");
        assert!(fake.0.borrow().kvs.is_empty());

        let written = etcd(&fake, 5000)
            .write_guarded(&puts(250), &settings(0))
            .unwrap();
        assert_eq!(written, Written::Done { steps: 3 });
        let s = fake.0.borrow();
        assert_eq!(s.kvs.len(), 251);
        let txns: Vec<_> = s.calls.iter().filter(|(m, _)| m == "kv/txn").collect();
        assert_eq!(txns.len(), 4, "the refused one, then three steps");
        let sizes: Vec<_> = txns[1..]
            .iter()
            .map(|(_, t)| {
                (
                    t["success"].as_array().unwrap().len(),
                    t["compare"].as_array().unwrap().len(),
                )
            })
            .collect();
        assert_eq!(sizes, vec![(100, 101), (100, 101), (51, 51)]);
        let settings_key = b64(b"p/policy/settings");
        for (_, t) in &txns[1..3] {
            // Not written yet, but checked: a concurrent writer would change it.
            assert_eq!(t["compare"][100]["key"], settings_key);
            assert!(t["success"]
                .as_array()
                .unwrap()
                .iter()
                .all(|op| op["request_put"]["key"] != settings_key));
        }
        assert_eq!(txns[3].1["success"][50]["request_put"]["key"], settings_key);
    }

    #[test]
    fn a_concurrent_writer_between_steps_makes_the_rest_fail() {
        let fake = Fake::default();
        fake.0.borrow_mut().put(b"p/policy/settings", b"v1");
        fake.0.borrow_mut().before_txn = Some(Box::new(|n, s| {
            if n == 1 {
                s.put(b"p/policy/settings", b"someone else");
            }
        }));
        let written = etcd(&fake, 5000)
            .write_guarded(&puts(150), &settings(1))
            .unwrap();
        assert_eq!(written, Written::Lost { steps_applied: 1 });
        let s = fake.0.borrow();
        assert_eq!(s.kvs.len(), 101, "step 1 stays; step 2 was refused");
        assert_eq!(s.kvs[&b"p/policy/settings".to_vec()].0, b"someone else");
    }

    #[test]
    fn a_lost_compare_applies_nothing() {
        let fake = Fake::default();
        fake.0.borrow_mut().put(b"p/policy/settings", b"v1");
        let written = etcd(&fake, 5000)
            .write_guarded(&puts(3), &settings(0))
            .unwrap();
        assert_eq!(written, Written::Lost { steps_applied: 0 });
        assert_eq!(fake.0.borrow().kvs.len(), 1);
    }

    #[test]
    fn error_bodies_become_messages_with_hints() {
        let e = api_error(
            "http://e:1",
            "kv/range",
            400,
            br#"{"error":"etcdserver: user name is empty","message":"etcdserver: user name is empty","code":3}"#,
        );
        assert_eq!(e.code, Some(3));
        assert!(e.message.contains("user name is empty") && e.message.contains("--etcd-user"));
        let e = api_error("http://e:1", "kv/txn", 502, b"bad gateway");
        assert_eq!(e.code, None);
        assert!(e.message.contains("502") && e.message.contains("bad gateway"));
    }

    #[test]
    fn urls_are_checked() {
        assert!(HttpTransport::new("http://127.0.0.1:1,http://[::1]:2", None).is_ok());
        let e = HttpTransport::with_tls("https://127.0.0.1:2379", None, None)
            .err()
            .unwrap();
        assert!(e.contains("needs --etcd-cacert"), "{e}");
        let e = HttpTransport::with_tls("http://127.0.0.1:1,https://127.0.0.1:2", None, None)
            .err()
            .unwrap();
        assert!(e.contains("same scheme"), "{e}");
        assert!(HttpTransport::with_tls("ftp://h:1", None, None).is_err());
        assert!(HttpTransport::new(" , ", None).is_err());
        assert!(HttpTransport::new("http://h:x", None).is_err());
    }
}
