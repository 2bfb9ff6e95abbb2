//! The console's HTTP server: routes, the session guard, the POST checks (session, CSRF token,
//! same origin), security headers on every response, and the handlers that tie pages, data and
//! actions together. Policy and Envoy I/O is blocking (the CLI's own code): it runs on tokio's
//! blocking pool, one action at a time (the policy store is behind a mutex).

// Refusals are responses, as with axum's own extractors: `Result<_, Response>` throughout.
#![allow(clippy::result_large_err)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use axum::extract::{ConnectInfo, FromRequestParts, Path, Request, State};
use axum::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use axum::http::request::Parts;
use axum::http::{Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html as HtmlBody, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use serde::Deserialize;

use super::super::commands::{now, Context};
use super::actions::{self, LimitsForm, MintForm};
use super::auth::{random_text, Attempt, LoginGate};
use super::csrf::{host_allowed, same_origin};
use super::data::{self, RECENT_RECORDS};
use super::pages::{self, Chrome};
use super::session::{self, Flash, Sessions};
use super::Config;
use crate::config::raw::RawStatus;

const CSS: &str = include_str!("assets/console.css");
const JS: &str = include_str!("assets/console.js");

/// The console's state, shared by every request.
pub struct App {
    pub config: Config,
    pub ctx: Mutex<Context>,
    pub sessions: Mutex<Sessions>,
    pub gate: Mutex<LoginGate>,
}

type Shared = Arc<App>;

/// A mutex's guard; a panic elsewhere while it was held does not make the data unusable here
/// (every critical section leaves it consistent).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

pub fn router(app: Shared) -> Router {
    Router::new()
        .route("/", get(overview))
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route("/mint", post(mint))
        .route("/tokens/{id}", get(token_page))
        .route("/tokens/{id}/revoke", get(confirm_revoke).post(revoke))
        .route(
            "/tokens/{id}/unrevoke",
            get(confirm_unrevoke).post(unrevoke),
        )
        .route("/tokens/{id}/limits", post(limits))
        .route("/static/console.css", get(css))
        .route("/static/console.js", get(js))
        .route("/favicon.ico", get(no_icon))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(app.clone(), guard))
        .with_state(app)
}

const SECURITY_HEADERS: [(HeaderName, &str); 5] = [
    (
        header::CONTENT_SECURITY_POLICY,
        "default-src 'self'; script-src 'self'; base-uri 'none'; form-action 'self'; \
         frame-ancestors 'none'",
    ),
    (header::X_FRAME_OPTIONS, "DENY"),
    (header::REFERRER_POLICY, "no-referrer"),
    (header::CACHE_CONTROL, "no-store"),
    (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
];

/// Every request: the `Host` must be this console's (a loopback name unless `--allow-remote`);
/// every response gets the security headers.
async fn guard(State(app): State<Shared>, request: Request, next: Next) -> Response {
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok());
    let mut response = if host_allowed(host, &app.config.hosts).is_err() {
        (
            StatusCode::MISDIRECTED_REQUEST,
            HtmlBody(pages::message_page(
                "Unknown host",
                "This console answers only on the address it listens on.",
            )),
        )
            .into_response()
    } else {
        next.run(request).await
    };
    let headers = response.headers_mut();
    for (name, value) in SECURITY_HEADERS {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

fn header_text(headers: &HeaderMap, name: HeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn refused(status: StatusCode, title: &str, text: &str) -> Response {
    (status, HtmlBody(pages::message_page(title, text))).into_response()
}

fn internal_error() -> Response {
    refused(
        StatusCode::INTERNAL_SERVER_ERROR,
        "Something went wrong",
        "The console could not complete this request; see its log. Nothing secret was shown.",
    )
}

/// A logged-in session.
pub struct Authed {
    id: String,
    csrf: String,
}

impl FromRequestParts<Shared> for Authed {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, app: &Shared) -> Result<Authed, Response> {
        let id = header_text(&parts.headers, header::COOKIE).and_then(session::id_from_cookies);
        let found = id.and_then(|id| {
            lock(&app.sessions)
                .get(id, Instant::now())
                .map(|s| (id.to_string(), s.csrf.clone()))
        });
        match found {
            Some((id, csrf)) => Ok(Authed { id, csrf }),
            None if parts.method == Method::GET || parts.method == Method::HEAD => {
                Err(Redirect::to("/login").into_response())
            }
            None => {
                eprintln!(
                    "console: refused {} {}: no session",
                    parts.method,
                    parts.uri.path()
                );
                Err(refused(
                    StatusCode::FORBIDDEN,
                    "Not logged in",
                    "This request has no session (or it ended): nothing was changed. Log in again.",
                ))
            }
        }
    }
}

/// A POST that changes something: from this console's own pages (same origin) and with the
/// session's CSRF token.
fn check_post(app: &App, authed: &Authed, headers: &HeaderMap, csrf: &str) -> Result<(), Response> {
    let host = header_text(headers, header::HOST);
    let origin = header_text(headers, header::ORIGIN);
    let site = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok());
    if same_origin(host, origin, site).is_err() {
        eprintln!("console: refused a cross-site POST (Origin or Sec-Fetch-Site of another site)");
        return Err(refused(
            StatusCode::FORBIDDEN,
            "Refused",
            "This request came from another site: nothing was changed.",
        ));
    }
    let ok = lock(&app.sessions)
        .get(&authed.id, Instant::now())
        .is_some_and(|s| s.csrf_ok(csrf));
    if !ok {
        eprintln!("console: refused a POST whose CSRF token is not its session's");
        return Err(refused(
            StatusCode::FORBIDDEN,
            "Refused",
            "The form is out of date or was not made by this console (CSRF check failed): \
             nothing was changed. Reload the page and try again.",
        ));
    }
    Ok(())
}

/// Runs blocking work (the policy store, Envoy's admin, files) on the blocking pool.
async fn blocking<T: Send + 'static>(
    app: &Shared,
    work: impl FnOnce(&App) -> T + Send + 'static,
) -> Result<T, Response> {
    let app = app.clone();
    tokio::task::spawn_blocking(move || work(&app))
        .await
        .map_err(|_| internal_error())
}

impl App {
    fn chrome<'a>(
        &self,
        authed: &'a Authed,
        flash: Option<Flash>,
        revision: Option<u64>,
    ) -> Chrome<'a> {
        Chrome {
            csrf: &authed.csrf,
            flash,
            context: match revision {
                Some(r) => format!("policy revision {r} · {}", self.config.describe),
                None => self.config.describe.clone(),
            },
        }
    }

    fn take_flash(&self, authed: &Authed) -> Option<Flash> {
        lock(&self.sessions)
            .get(&authed.id, Instant::now())
            .and_then(session::Session::take_flash)
    }

    fn set_flash(&self, authed: &Authed, flash: Flash) {
        if let Some(s) = lock(&self.sessions).get(&authed.id, Instant::now()) {
            s.set_flash(flash);
        }
    }

    /// A new one-time mint form id, remembered by the session.
    fn mint_form_id(&self, authed: &Authed) -> Result<String, Response> {
        let id = random_text().map_err(|_| internal_error())?;
        if let Some(s) = lock(&self.sessions).get(&authed.id, Instant::now()) {
            s.add_mint_form(id.clone());
        }
        Ok(id)
    }
}

fn snapshot_error(app: &App, authed: &Authed, e: &impl std::fmt::Display) -> Response {
    let chrome = app.chrome(
        authed,
        Some(Flash {
            kind: session::FlashKind::Error,
            lines: vec![format!("Cannot read the policy: {e}")],
        }),
        None,
    );
    (
        StatusCode::SERVICE_UNAVAILABLE,
        HtmlBody(pages::page("Error", &chrome, &super::html::Html::new())),
    )
        .into_response()
}

async fn overview(State(app): State<Shared>, authed: Authed) -> Response {
    render_overview(&app, &authed, None, None).await
}

/// The overview, with a flash (else the session's) and a failed mint's input.
async fn render_overview(
    app: &Shared,
    authed: &Authed,
    flash: Option<Flash>,
    mint_values: Option<MintForm>,
) -> Response {
    let snap = match blocking(app, |app| {
        let mut ctx = lock(&app.ctx);
        data::snapshot(&app.config, &mut ctx.store, now())
    })
    .await
    {
        Ok(Ok(snap)) => snap,
        Ok(Err(e)) => return snapshot_error(app, authed, &e),
        Err(r) => return r,
    };
    let form_id = match app.mint_form_id(authed) {
        Ok(id) => id,
        Err(r) => return r,
    };
    let flash = flash.or_else(|| app.take_flash(authed));
    let chrome = app.chrome(authed, flash, Some(snap.overview.revision));
    HtmlBody(pages::overview(
        &chrome,
        &snap.overview,
        &form_id,
        mint_values.as_ref(),
    ))
    .into_response()
}

async fn token_page(State(app): State<Shared>, authed: Authed, Path(id): Path<String>) -> Response {
    let snap = match blocking(&app, |app| {
        let mut ctx = lock(&app.ctx);
        data::snapshot(&app.config, &mut ctx.store, now())
    })
    .await
    {
        Ok(Ok(snap)) => snap,
        Ok(Err(e)) => return snapshot_error(&app, &authed, &e),
        Err(r) => return r,
    };
    let Some(token) = snap.policy.tokens.iter().find(|t| t.id == id) else {
        return refused(
            StatusCode::NOT_FOUND,
            "No such token",
            "The policy has no token with this id.",
        );
    };
    let row = snap
        .overview
        .groups
        .iter()
        .flat_map(|g| g.tokens.iter())
        .find(|r| r.id == id);
    let records = data::recent_records(&snap.records, &id, RECENT_RECORDS);
    let flash = app.take_flash(&authed);
    let chrome = app.chrome(&authed, flash, Some(snap.overview.revision));
    HtmlBody(pages::token(
        &chrome,
        token,
        row,
        &snap.overview,
        &records,
        app.config.audit_log.is_some(),
    ))
    .into_response()
}

async fn confirm_revoke(
    State(app): State<Shared>,
    authed: Authed,
    Path(id): Path<String>,
) -> Response {
    let chrome = app.chrome(&authed, None, None);
    HtmlBody(pages::confirm(&chrome, &id, true)).into_response()
}

async fn confirm_unrevoke(
    State(app): State<Shared>,
    authed: Authed,
    Path(id): Path<String>,
) -> Response {
    let chrome = app.chrome(&authed, None, None);
    HtmlBody(pages::confirm(&chrome, &id, false)).into_response()
}

/// A form that carries only the CSRF token.
#[derive(Debug, Default, Deserialize)]
pub struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

fn token_path(id: &str) -> String {
    format!("/tokens/{}", super::html::path_segment(id))
}

/// Logs what an action did (never a secret: flashes have none), keeps it for the next page, and
/// sends the browser there (so a reload does not repeat the action).
fn after_action(app: &App, authed: &Authed, flash: Flash, to: &str) -> Response {
    eprintln!("console: {}", flash.lines.join(" "));
    app.set_flash(authed, flash);
    Redirect::to(to).into_response()
}

async fn set_status(
    app: Shared,
    authed: Authed,
    headers: HeaderMap,
    id: String,
    form: CsrfForm,
    status: RawStatus,
) -> Response {
    if let Err(r) = check_post(&app, &authed, &headers, &form.csrf) {
        return r;
    }
    let target = id.clone();
    let flash = match blocking(&app, move |app| {
        let mut ctx = lock(&app.ctx);
        actions::set_status(&app.config, &mut ctx, &target, status)
    })
    .await
    {
        Ok(flash) => flash,
        Err(r) => return r,
    };
    after_action(&app, &authed, flash, &token_path(&id))
}

async fn revoke(
    State(app): State<Shared>,
    authed: Authed,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(form): Form<CsrfForm>,
) -> Response {
    set_status(app, authed, headers, id, form, RawStatus::Revoked).await
}

async fn unrevoke(
    State(app): State<Shared>,
    authed: Authed,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(form): Form<CsrfForm>,
) -> Response {
    set_status(app, authed, headers, id, form, RawStatus::Active).await
}

async fn limits(
    State(app): State<Shared>,
    authed: Authed,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(form): Form<LimitsForm>,
) -> Response {
    if let Err(r) = check_post(&app, &authed, &headers, &form.csrf) {
        return r;
    }
    let target = id.clone();
    let flash = match blocking(&app, move |app| {
        let mut ctx = lock(&app.ctx);
        actions::change_limits(&app.config, &mut ctx, &target, &form)
    })
    .await
    {
        Ok(flash) => flash,
        Err(r) => return r,
    };
    after_action(&app, &authed, flash, &token_path(&id))
}

async fn mint(
    State(app): State<Shared>,
    authed: Authed,
    headers: HeaderMap,
    Form(form): Form<MintForm>,
) -> Response {
    if let Err(r) = check_post(&app, &authed, &headers, &form.csrf) {
        return r;
    }
    let fresh = lock(&app.sessions)
        .get(&authed.id, Instant::now())
        .is_some_and(|s| s.use_mint_form(&form.form_id));
    if !fresh {
        let chrome = app.chrome(&authed, None, None);
        return (
            StatusCode::CONFLICT,
            HtmlBody(pages::mint_form_used(&chrome)),
        )
            .into_response();
    }
    let values = form.clone();
    let result = match blocking(&app, move |app| {
        let mut ctx = lock(&app.ctx);
        actions::mint(&app.config, &mut ctx, &form)
    })
    .await
    {
        Ok(result) => result,
        Err(r) => return r,
    };
    match result {
        Ok((flash, token)) => {
            eprintln!("console: {}", flash.lines.join(" "));
            let id = values.id.trim().to_string();
            let chrome = app.chrome(&authed, Some(flash), None);
            // The token goes into this response only; `token` is wiped when dropped.
            let text = String::from_utf8_lossy(token.expose()).into_owned();
            HtmlBody(pages::minted(&chrome, &id, &text)).into_response()
        }
        Err(flash) => {
            eprintln!("console: {}", flash.lines.join(" "));
            render_overview(&app, &authed, Some(flash), Some(values)).await
        }
    }
}

async fn login_page(State(app): State<Shared>, headers: HeaderMap) -> Response {
    let logged_in = header_text(&headers, header::COOKIE)
        .and_then(session::id_from_cookies)
        .is_some_and(|id| lock(&app.sessions).get(id, Instant::now()).is_some());
    if logged_in {
        return Redirect::to("/").into_response();
    }
    let password = lock(&app.gate).is_password();
    HtmlBody(pages::login(password, None)).into_response()
}

#[derive(Deserialize)]
pub struct LoginForm {
    #[serde(default)]
    secret: String,
}

async fn login(
    State(app): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Response {
    let host = header_text(&headers, header::HOST);
    let origin = header_text(&headers, header::ORIGIN);
    let site = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok());
    if same_origin(host, origin, site).is_err() {
        eprintln!("console: refused a cross-site login (Origin or Sec-Fetch-Site of another site)");
        return refused(
            StatusCode::FORBIDDEN,
            "Refused",
            "This login came from another site.",
        );
    }
    let (attempt, password) = {
        let mut gate = lock(&app.gate);
        let attempt = gate.attempt(form.secret.trim().as_bytes(), Instant::now(), random_text);
        (attempt, gate.is_password())
    };
    match attempt {
        Attempt::Granted { next_secret } => {
            let (Ok(id), Ok(csrf)) = (random_text(), random_text()) else {
                return internal_error();
            };
            lock(&app.sessions).create(id.clone(), csrf, Instant::now());
            eprintln!("console: logged in from {}", peer.ip());
            if let Some(next) = next_secret {
                eprintln!("login secret (one-time, for the next login): {next}");
            }
            let cookie = session::cookie(&id, app.config.hosts.allow_remote);
            let mut response = Redirect::to("/").into_response();
            if let Ok(value) = HeaderValue::from_str(&cookie) {
                response.headers_mut().insert(header::SET_COOKIE, value);
            }
            response
        }
        Attempt::Refused { failures, locked } => {
            eprintln!(
                "console: failed login from {} ({failures} in a row{})",
                peer.ip(),
                if locked {
                    format!("; logins locked for {} s", super::auth::LOCKOUT.as_secs())
                } else {
                    String::new()
                }
            );
            let message = if locked {
                format!(
                    "Wrong {}. Too many failed logins: logins are locked for {} s.",
                    if password { "password" } else { "login secret" },
                    super::auth::LOCKOUT.as_secs()
                )
            } else {
                format!(
                    "Wrong {}.",
                    if password { "password" } else { "login secret" }
                )
            };
            (
                StatusCode::UNAUTHORIZED,
                HtmlBody(pages::login(password, Some(&message))),
            )
                .into_response()
        }
        Attempt::LockedOut { retry_after } => {
            eprintln!("console: login from {} refused: locked out", peer.ip());
            (
                StatusCode::TOO_MANY_REQUESTS,
                HtmlBody(pages::login(
                    password,
                    Some(&format!(
                        "Too many failed logins: try again in {} s.",
                        retry_after.as_secs().max(1)
                    )),
                )),
            )
                .into_response()
        }
    }
}

async fn logout(
    State(app): State<Shared>,
    authed: Authed,
    headers: HeaderMap,
    Form(form): Form<CsrfForm>,
) -> Response {
    if let Err(r) = check_post(&app, &authed, &headers, &form.csrf) {
        return r;
    }
    lock(&app.sessions).remove(&authed.id);
    let mut response = Redirect::to("/login").into_response();
    if let Ok(value) =
        HeaderValue::from_str(&session::cleared_cookie(app.config.hosts.allow_remote))
    {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

async fn css() -> Response {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], CSS).into_response()
}

async fn js() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        JS,
    )
        .into_response()
}

/// Browsers ask for it; the console has none.
async fn no_icon() -> StatusCode {
    StatusCode::NO_CONTENT
}

async fn not_found() -> Response {
    refused(
        StatusCode::NOT_FOUND,
        "Not found",
        "There is no such page in the console.",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::commands::publish_options;
    use crate::cli::console::auth::Credential;
    use crate::cli::policy_store::PolicyStore;
    use crate::secret::SecretBytes;
    use axum::body::Body;
    use std::path::PathBuf;
    use tower::ServiceExt;

    const SECRET: &str = "the-one-time-secret";

    struct Fixture {
        dir: PathBuf,
        app: Shared,
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    impl Fixture {
        fn policy(&self) -> String {
            std::fs::read_to_string(self.dir.join("policy.json")).unwrap()
        }
    }

    fn fixture(name: &str) -> Fixture {
        let dir =
            std::env::temp_dir().join(format!("shieldkey-console-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        use base64::Engine;
        let master = crate::master_key::MasterKey::from_base64(
            &base64::engine::general_purpose::STANDARD.encode([7u8; 32]),
        )
        .unwrap();
        let sealed = crate::seal::seal(
            master.seal_key(),
            "prod",
            b"upstream",
            &[0u8; crate::seal::NONCE_LEN],
        )
        .unwrap();
        let policy = serde_json::json!({"version": 1, "revision": 3,
            "upstream_keys": [{"id": "prod", "sealed": sealed}],
            "tokens": [{"id": "ann", "digest": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
                        "upstream_key": "prod"}]});
        std::fs::write(dir.join("policy.json"), policy.to_string()).unwrap();
        let mut args = Args::new(Vec::new());
        let publish = publish_options(&mut args, "publish").unwrap();
        let app = Arc::new(App {
            config: Config {
                publish,
                admin: None,
                filter_name: "shieldkey".into(),
                audit_log: None,
                hosts: Default::default(),
                fleet: None,
                describe: "policy.json".into(),
            },
            ctx: Mutex::new(Context {
                store: PolicyStore::File(dir.join("policy.json")),
            }),
            sessions: Mutex::new(Sessions::default()),
            gate: Mutex::new(LoginGate::new(Credential::OneTime(Some(SecretBytes::new(
                SECRET.as_bytes().to_vec(),
            ))))),
        });
        Fixture { dir, app }
    }

    use super::super::super::args::Args;

    fn request(method: &str, path: &str, cookie: Option<&str>, body: &str) -> Request {
        let mut builder = axum::http::Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, "127.0.0.1:8484");
        if let Some(c) = cookie {
            builder = builder.header(header::COOKIE, c);
        }
        if method == "POST" {
            builder = builder.header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
        }
        let mut req = builder.body(Body::from(body.to_string())).unwrap();
        req.extensions_mut()
            .insert(ConnectInfo(SocketAddr::from(([127, 0, 0, 1], 5555))));
        req
    }

    async fn send(app: &Shared, req: Request) -> Response {
        router(app.clone()).oneshot(req).await.unwrap()
    }

    async fn body(response: Response) -> String {
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    /// Logs in; returns the cookie and the CSRF token of the session.
    async fn log_in(app: &Shared) -> (String, String) {
        let r = send(
            app,
            request("POST", "/login", None, &format!("secret={SECRET}")),
        )
        .await;
        assert_eq!(r.status(), StatusCode::SEE_OTHER);
        let cookie = r.headers()[header::SET_COOKIE]
            .to_str()
            .unwrap()
            .to_string();
        assert!(cookie.contains("HttpOnly; SameSite=Strict; Path=/"));
        let cookie = cookie.split(';').next().unwrap().to_string();
        let page = body(send(app, request("GET", "/", Some(&cookie), "")).await).await;
        let csrf = page
            .split("name=\"csrf\" value=\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap()
            .to_string();
        (cookie, csrf)
    }

    #[tokio::test(flavor = "current_thread")]
    async fn pages_need_a_session_and_carry_security_headers() {
        let f = fixture("guard");
        let r = send(&f.app, request("GET", "/", None, "")).await;
        assert_eq!(r.status(), StatusCode::SEE_OTHER);
        assert_eq!(r.headers()[header::LOCATION], "/login");
        for (name, value) in SECURITY_HEADERS {
            assert_eq!(r.headers()[name], value);
        }
        let r = send(
            &f.app,
            request("GET", "/tokens/ann", Some("shieldkey_console=forged"), ""),
        )
        .await;
        assert_eq!(r.status(), StatusCode::SEE_OTHER);
        // Another host (DNS rebinding) is not answered.
        let mut req = request("GET", "/login", None, "");
        req.headers_mut()
            .insert(header::HOST, HeaderValue::from_static("evil.example:8484"));
        assert_eq!(
            send(&f.app, req).await.status(),
            StatusCode::MISDIRECTED_REQUEST
        );
        // The login page and the static files need no session.
        assert_eq!(
            send(&f.app, request("GET", "/login", None, ""))
                .await
                .status(),
            StatusCode::OK
        );
        let css = send(&f.app, request("GET", "/static/console.css", None, "")).await;
        assert_eq!(
            css.headers()[header::CONTENT_TYPE],
            "text/css; charset=utf-8"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn posts_without_a_session_or_with_a_forged_csrf_token_change_nothing() {
        let f = fixture("csrf");
        let before = f.policy();
        let r = send(
            &f.app,
            request("POST", "/tokens/ann/revoke", None, "csrf=x"),
        )
        .await;
        assert_eq!(r.status(), StatusCode::FORBIDDEN);

        let (cookie, csrf) = log_in(&f.app).await;
        for forged in ["", "csrf=", "csrf=forged", &format!("csrf={csrf}x")] {
            let r = send(
                &f.app,
                request("POST", "/tokens/ann/revoke", Some(&cookie), forged),
            )
            .await;
            assert_eq!(r.status(), StatusCode::FORBIDDEN, "{forged}");
        }
        // The right token from another site.
        let mut req = request(
            "POST",
            "/tokens/ann/revoke",
            Some(&cookie),
            &format!("csrf={csrf}"),
        );
        req.headers_mut()
            .insert("sec-fetch-site", HeaderValue::from_static("cross-site"));
        assert_eq!(send(&f.app, req).await.status(), StatusCode::FORBIDDEN);
        // GET is only the confirm step.
        let r = send(
            &f.app,
            request("GET", "/tokens/ann/revoke", Some(&cookie), ""),
        )
        .await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(f.policy(), before);

        // With the session's token, from its own pages: done.
        let mut req = request(
            "POST",
            "/tokens/ann/revoke",
            Some(&cookie),
            &format!("csrf={csrf}"),
        );
        req.headers_mut()
            .insert("sec-fetch-site", HeaderValue::from_static("same-origin"));
        let r = send(&f.app, req).await;
        assert_eq!(r.status(), StatusCode::SEE_OTHER);
        assert_eq!(r.headers()[header::LOCATION], "/tokens/ann");
        assert!(f.policy().contains("\"revoked\""));
        let page = body(send(&f.app, request("GET", "/tokens/ann", Some(&cookie), "")).await).await;
        assert!(
            page.contains("Revoked token &#39;ann&#39; (policy revision 4)."),
            "{page}"
        );

        // Logout ends the session.
        let r = send(
            &f.app,
            request("POST", "/logout", Some(&cookie), &format!("csrf={csrf}")),
        )
        .await;
        assert_eq!(r.status(), StatusCode::SEE_OTHER);
        let r = send(&f.app, request("GET", "/", Some(&cookie), "")).await;
        assert_eq!(r.headers()[header::LOCATION], "/login");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_login_secret_works_once_and_password_failures_lock_out() {
        let f = fixture("login");
        log_in(&f.app).await;
        let r = send(
            &f.app,
            request("POST", "/login", None, &format!("secret={SECRET}")),
        )
        .await;
        assert_eq!(
            r.status(),
            StatusCode::UNAUTHORIZED,
            "the secret was consumed"
        );
        // A one-time secret cannot be guessed: failures never lock the operator out.
        for _ in 0..2 * super::super::auth::MAX_FAILURES {
            let r = send(&f.app, request("POST", "/login", None, "secret=wrong")).await;
            assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        }
        // A password can be: failures in a row lock logins out.
        *f.app.gate.lock().unwrap() = LoginGate::new(super::super::auth::Credential::Password(
            SecretBytes::new(b"a long password".to_vec()),
        ));
        for _ in 0..super::super::auth::MAX_FAILURES {
            send(&f.app, request("POST", "/login", None, "secret=wrong")).await;
        }
        let r = send(
            &f.app,
            request("POST", "/login", None, "secret=a long password"),
        )
        .await;
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    }
}
