//! The console's pages, server-rendered with `html::Html` (every dynamic value escaped). No
//! page shows a digest, a sealed key or a secret; the only secret ever rendered is a newly
//! minted token, on the one response to the form that minted it (`minted`).

use std::collections::BTreeMap;

use super::actions::{current_limits, LimitsForm, MintForm};
use super::data::{Overview, Row, Source};
use super::html::{path_segment, Html};
use super::session::{Flash, FlashKind};
use crate::cli::audit::{usd6, Record};
use crate::cli::commands::enforce_text;
use crate::cli::teams::rules_summary;
use crate::config::raw::RawToken;
use crate::money::{format_usd, NanoUsd};
use crate::time::format_rfc3339;

/// What every page of a session needs: its CSRF token (for the logout form and every other form)
/// and the flash to show.
pub struct Chrome<'a> {
    pub csrf: &'a str,
    pub flash: Option<Flash>,
    /// "policy revision 7 · policy.json".
    pub context: String,
}

fn head(h: &mut Html, title: &str) {
    h.raw(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <meta name=\"referrer\" content=\"no-referrer\"><title>",
    )
    .text(title)
    .raw(
        " · ShieldKey console</title>\
         <link rel=\"stylesheet\" href=\"/static/console.css\">\
         <script src=\"/static/console.js\" defer></script></head><body>",
    );
}

/// A page of a logged-in session: the top bar, the flash, then `body`.
pub fn page(title: &str, chrome: &Chrome<'_>, body: &Html) -> String {
    let mut h = Html::new();
    head(&mut h, title);
    h.raw("<header class=\"top\"><a class=\"brand\" href=\"/\">ShieldKey <span>console</span></a>")
        .el("<span class=\"context\">", &chrome.context, "</span>")
        .raw("<form method=\"post\" action=\"/logout\" class=\"logout\">")
        .hidden("csrf", chrome.csrf)
        .raw("<button type=\"submit\" class=\"quiet\">Log out</button></form></header><main>");
    if let Some(flash) = &chrome.flash {
        flash_box(&mut h, flash);
    }
    h.html(body).raw("</main></body></html>\n");
    h.into_string()
}

/// A page without a session (login, errors before login).
pub fn bare_page(title: &str, body: &Html) -> String {
    let mut h = Html::new();
    head(&mut h, title);
    h.raw("<header class=\"top\"><span class=\"brand\">ShieldKey <span>console</span></span></header><main class=\"narrow\">")
        .html(body)
        .raw("</main></body></html>\n");
    h.into_string()
}

pub fn flash_box(h: &mut Html, flash: &Flash) {
    h.raw(match flash.kind {
        FlashKind::Ok => "<div class=\"flash ok\" role=\"status\">",
        FlashKind::Warn => "<div class=\"flash warn\" role=\"status\">",
        FlashKind::Error => "<div class=\"flash error\" role=\"alert\">",
    });
    for line in &flash.lines {
        h.el("<p>", line, "</p>");
    }
    h.raw("</div>");
}

pub fn login(password: bool, message: Option<&str>) -> String {
    let mut b = Html::new();
    b.raw("<section class=\"card login\"><h1>Log in</h1>");
    if let Some(m) = message {
        b.el(
            "<div class=\"flash error\" role=\"alert\"><p>",
            m,
            "</p></div>",
        );
    }
    if password {
        b.raw("<p class=\"hint\">Use the password the console was started with (<code>SHIELDKEY_CONSOLE_PASSWORD</code>).</p>");
    } else {
        b.raw("<p class=\"hint\">Use the one-time login secret the console printed on its standard error when it started (or after the last login). It works once.</p>");
    }
    b.raw(
        "<form method=\"post\" action=\"/login\" class=\"stack\">\
         <label for=\"secret\">",
    )
    .raw(if password { "Password" } else { "Login secret" })
    .raw(
        "</label><input id=\"secret\" name=\"secret\" type=\"password\" autocomplete=\"off\" \
         autofocus required><button type=\"submit\" class=\"primary\" id=\"login\">Log in</button>\
         </form></section>",
    );
    bare_page("Log in", &b)
}

pub fn message_page(title: &str, text: &str) -> String {
    let mut b = Html::new();
    b.raw("<section class=\"card\">")
        .el("<h1>", title, "</h1>")
        .el("<p>", text, "</p>")
        .raw("<p><a href=\"/\">Back to the console</a></p></section>");
    bare_page(title, &b)
}

fn usd(value: NanoUsd) -> String {
    format!("${}", format_usd(value))
}

fn status_badge(h: &mut Html, status: &str) {
    let class = match status {
        "active" => "badge active",
        "revoked" => "badge revoked",
        "dry-run" => "badge dry",
        "expired" | "not-yet-valid" => "badge muted",
        _ => "badge",
    };
    h.raw("<span class=\"")
        .raw(class)
        .raw("\">")
        .text(status)
        .raw("</span>");
}

/// `budget_exceeded 3, rate_limited 1` (codes without `shield_`).
fn counts(map: &BTreeMap<String, u64>) -> String {
    map.iter()
        .map(|(code, n)| format!("{} {n}", code.strip_prefix("shield_").unwrap_or(code)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The spend cell: a bar against the limit, the amounts, and the exact nano-USD as data.
fn spend(h: &mut Html, row: &Row) {
    let Some(spent) = row.spent else {
        h.raw("<span class=\"muted\">-</span>");
        if let Some(limit) = row.limit {
            h.raw(" <span class=\"muted\">of ")
                .text(&usd(limit))
                .raw("</span>");
        }
        return;
    };
    h.raw("<div class=\"spend\" data-spent-nano-usd=\"")
        .num(spent)
        .raw("\">");
    match (row.limit, row.percent()) {
        (Some(limit), Some(percent)) => {
            let step = (percent.min(100) / 5) as u8;
            h.raw("<span class=\"bar");
            if percent >= 100 {
                h.raw(" over");
            } else if percent >= 80 {
                h.raw(" high");
            }
            h.raw("\"><span class=\"fill p")
                .num(step)
                .raw("\"></span></span><span class=\"amount\">")
                .text(&usd(spent))
                .raw(" of ")
                .text(&usd(limit))
                .raw(" <span class=\"muted\">(")
                .num(percent)
                .raw("%)</span></span>");
        }
        _ => {
            h.el("<span class=\"amount\">", &usd(spent), "</span>")
                .raw(" <span class=\"muted\">no budget</span>");
        }
    }
    h.raw("</div>");
}

fn window_cell(h: &mut Html, row: &Row) {
    match (&row.window, row.resets_at) {
        (Some(w), Some(at)) => {
            h.text(w)
                .raw("<br><span class=\"muted small\">resets ")
                .text(&format_rfc3339(at))
                .raw("</span>");
        }
        (Some(w), None) => {
            h.text(w);
        }
        _ => {
            h.raw("<span class=\"muted\">-</span>");
        }
    }
}

fn denials_cell(h: &mut Html, row: &Row) {
    if row.denied.is_empty() && row.would_deny.is_empty() {
        h.raw(if row.requests.is_some() {
            "<span class=\"muted\">none</span>"
        } else {
            "<span class=\"muted\">-</span>"
        });
    }
    if !row.denied.is_empty() {
        h.el("<span class=\"denied\">", &counts(&row.denied), "</span>");
    }
    if !row.would_deny.is_empty() {
        h.el(
            "<br><span class=\"muted small\">would deny: ",
            &counts(&row.would_deny),
            "</span>",
        );
    }
}

fn opt_num(h: &mut Html, n: Option<u64>) {
    match n {
        Some(n) => h.num(n),
        None => h.raw("<span class=\"muted\">-</span>"),
    };
}

fn token_tr(h: &mut Html, row: &Row, indent: bool) {
    h.raw("<tr class=\"token")
        .raw(if indent { " member" } else { "" })
        .raw("\" data-token=\"")
        .text(&row.id)
        .raw("\"><td class=\"id\">")
        .link(&format!("/tokens/{}", path_segment(&row.id)), &row.id)
        .raw("</td><td>")
        .text(row.owner.as_deref().unwrap_or("-"))
        .raw("</td><td>");
    status_badge(h, &row.status);
    h.raw("</td><td>");
    spend(h, row);
    h.raw("</td><td>");
    window_cell(h, row);
    h.raw("</td><td class=\"num\">");
    opt_num(h, row.requests);
    h.raw("</td><td>");
    denials_cell(h, row);
    h.raw("</td><td class=\"small\">")
        .text(row.last_use.as_deref().unwrap_or("-"))
        .raw("</td></tr>");
}

fn team_tr(h: &mut Html, row: &Row) {
    h.raw("<tr class=\"team\"><td class=\"id\">Team <strong>")
        .text(&row.id)
        .raw("</strong></td><td></td><td>");
    status_badge(h, &row.status);
    h.raw("</td><td>");
    spend(h, row);
    h.raw("</td><td>");
    window_cell(h, row);
    h.raw("</td><td class=\"num\">");
    opt_num(h, row.requests);
    h.raw("</td><td>");
    denials_cell(h, row);
    h.raw("</td><td></td></tr>");
}

/// What a revoked token's page can say of Envoy: it refuses the token only once it serves the
/// policy revision that revoked it (a publish can fail, or not have been asked for).
fn revoked_line(overview: &Overview) -> String {
    let revision = overview.revision;
    match &overview.source {
        Source::Envoy {
            served: Some(v), ..
        } if *v == revision.to_string() => {
            format!("This token is revoked in policy revision {revision}, which Envoy serves: Envoy refuses it.")
        }
        Source::Envoy {
            served: Some(v), ..
        } if !v.is_empty() => format!(
            "This token is revoked in policy revision {revision}, but Envoy serves revision {v}: \
             it refuses the token only once it serves this one (publish it)."
        ),
        _ => format!(
            "This token is revoked in policy revision {revision}: Envoy refuses it once it serves \
             that revision (not checked: start the console with --admin to see what Envoy serves)."
        ),
    }
}

fn source_line(h: &mut Html, overview: &Overview) {
    h.raw("<p class=\"source\">");
    match &overview.source {
        Source::Envoy { url, served } => {
            h.text("Spend, requests and denials from Envoy at ")
                .text(url);
            if let Some(v) = served.as_ref().filter(|v| !v.is_empty()) {
                h.text(&format!(" (serving policy revision {v})"));
            }
            h.text(": counters since that Envoy started, spend in each budget's current window.");
        }
        Source::Ledger => {
            h.text(
                "Spend from the fleet's ledger in etcd, summed over every Envoy as last flushed.",
            );
        }
        Source::None => {
            h.text("No Envoy was read: start the console with --admin URL to see spend, requests and denials.");
        }
    }
    h.raw("</p>");
}

fn notes(h: &mut Html, notes: &[String]) {
    if notes.is_empty() {
        return;
    }
    h.raw("<div class=\"flash warn\">");
    for n in notes {
        h.el("<p>", n, "</p>");
    }
    h.raw("</div>");
}

const TABLE_HEAD: &str = "<table class=\"tokens\"><thead><tr><th>Token</th><th>Owner</th>\
<th>Status</th><th>Spend</th><th>Budget window</th><th class=\"num\">Requests</th>\
<th>Denials</th><th>Last use</th></tr></thead><tbody>";

fn text_input(
    h: &mut Html,
    name: &'static str,
    label: &'static str,
    value: &str,
    placeholder: &'static str,
) {
    h.raw("<label>")
        .raw(label)
        .raw("<input name=\"")
        .raw(name)
        .raw("\" value=\"")
        .text(value)
        .raw("\" placeholder=\"")
        .raw(placeholder)
        .raw("\"></label>");
}

fn window_input(h: &mut Html, value: &str) {
    h.raw("<label>Budget window<input name=\"budget_window\" list=\"windows\" value=\"")
        .text(value)
        .raw(
            "\" placeholder=\"monthly\"></label><datalist id=\"windows\">\
             <option value=\"monthly\"><option value=\"daily\"><option value=\"hourly\">\
             <option value=\"lifetime\"><option value=\"3600s\"></datalist>",
        );
}

fn team_select(h: &mut Html, teams: &[String], current: &str) {
    h.raw("<label>Team<select name=\"team\"><option value=\"\">(no team)</option>");
    for t in teams {
        h.raw("<option value=\"").text(t).raw("\"");
        if t == current {
            h.raw(" selected");
        }
        h.raw(">").text(t).raw("</option>");
    }
    h.raw("</select></label>");
}

fn mint_form(
    h: &mut Html,
    overview: &Overview,
    csrf: &str,
    form_id: &str,
    values: Option<&MintForm>,
) {
    let blank = MintForm::default();
    let v = values.unwrap_or(&blank);
    h.raw("<details class=\"card mint\" id=\"mint\"")
        .raw(if values.is_some() { " open" } else { "" })
        .raw("><summary>Mint a token</summary>")
        .raw("<form method=\"post\" action=\"/mint\" class=\"grid\">")
        .hidden("csrf", csrf)
        .hidden("form_id", form_id);
    text_input(h, "id", "Token id", &v.id, "alice-laptop");
    h.raw("<label>Upstream key<select name=\"upstream_key\">");
    for key in &overview.upstream_keys {
        h.raw("<option value=\"").text(key).raw("\"");
        if *key == v.upstream_key {
            h.raw(" selected");
        }
        h.raw(">").text(key).raw("</option>");
    }
    h.raw("</select></label>");
    text_input(h, "owner", "Owner", &v.owner, "alice@example.com");
    text_input(h, "description", "Description", &v.description, "");
    team_select(h, &overview.teams, &v.team);
    text_input(h, "ttl", "Valid for", &v.ttl, "90d (empty: no expiry)");
    text_input(h, "budget_usd", "Budget (USD)", &v.budget_usd, "25");
    window_input(
        h,
        if v.budget_window.is_empty() {
            "monthly"
        } else {
            &v.budget_window
        },
    );
    text_input(h, "rpm", "Requests / minute", &v.rpm, "");
    text_input(h, "tpm", "Tokens / minute", &v.tpm, "");
    text_input(
        h,
        "models",
        "Models",
        &v.models,
        "mistral-small-*,mistral-embed",
    );
    text_input(h, "max_tokens", "Max tokens", &v.max_tokens, "");
    h.raw(
        "<div class=\"actions\"><button type=\"submit\" class=\"primary\" id=\"mint-submit\">Mint\
         </button><span class=\"hint\">The token is shown once, on the next page.</span></div>\
         </form></details>",
    );
}

/// The tokens overview, with the mint form (`mint_values`: a failed mint's input, shown again).
pub fn overview(
    chrome: &Chrome<'_>,
    overview: &Overview,
    mint_form_id: &str,
    mint_values: Option<&MintForm>,
) -> String {
    let mut b = Html::new();
    b.raw("<div class=\"title\"><h1>Tokens</h1><a class=\"button\" href=\"#mint\" data-open=\"mint\">Mint a token</a></div>");
    notes(&mut b, &overview.notes);
    source_line(&mut b, overview);
    b.raw(TABLE_HEAD);
    let tokens: usize = overview.groups.iter().map(|g| g.tokens.len()).sum();
    for group in &overview.groups {
        match &group.team {
            Some(team) => team_tr(&mut b, team),
            None if overview.grouped => {
                b.raw("<tr class=\"team none\"><td colspan=\"8\">(no team)</td></tr>");
            }
            None => {}
        }
        for row in &group.tokens {
            token_tr(&mut b, row, overview.grouped);
        }
    }
    if tokens == 0 {
        b.raw("<tr><td colspan=\"8\" class=\"muted\">No tokens yet: mint one below.</td></tr>");
    }
    b.raw("</tbody></table>");
    mint_form(&mut b, overview, chrome.csrf, mint_form_id, mint_values);
    page("Tokens", chrome, &b)
}

fn dl_row(h: &mut Html, term: &'static str, value: &str) {
    h.raw("<dt>")
        .raw(term)
        .raw("</dt>")
        .el("<dd>", value, "</dd>");
}

fn records_table(h: &mut Html, records: &[&Record], audit_log: bool) {
    h.raw("<section class=\"card\"><h2>Recent requests</h2>");
    if !audit_log {
        h.raw("<p class=\"muted\">Start the console with --audit-log PATH (Envoy's shieldkey-audit.log) to see this token's requests.</p></section>");
        return;
    }
    if records.is_empty() {
        h.raw("<p class=\"muted\">No request of this token in the audit log.</p></section>");
        return;
    }
    h.raw(
        "<div class=\"scroll\"><table class=\"records\"><thead><tr><th>Time</th><th>Decision</th>\
         <th>Client</th><th>Country</th><th>Route</th><th>Model</th><th class=\"num\">In</th>\
         <th class=\"num\">Out</th><th class=\"num\">Cost (USD)</th><th class=\"num\">Status</th>\
         <th>Request id</th></tr></thead><tbody>",
    );
    for r in records {
        let text = |name| r.text(name).unwrap_or("-").to_string();
        let num = |name| {
            r.number(name)
                .map_or_else(|| "-".to_string(), |n| n.to_string())
        };
        let decision = text("decision");
        let would = r.would_deny();
        h.raw("<tr><td class=\"small\">")
            .text(&text("time"))
            .raw("</td><td>");
        if decision.starts_with("shield_") {
            h.el("<span class=\"denied\">", &decision, "</span>");
        } else {
            h.text(&decision);
        }
        if !would.is_empty() {
            h.el(
                "<br><span class=\"muted small\">would deny: ",
                &would.join(", "),
                "</span>",
            );
        }
        h.raw("</td>")
            .el("<td>", &text("client_address"), "</td>")
            .el("<td>", &text("country"), "</td>")
            .raw("<td>")
            .text(&format!("{} {}", text("method"), text("route")))
            .raw("</td>")
            .el("<td>", &text("model"), "</td>")
            .el("<td class=\"num\">", &num("prompt_tokens"), "</td>")
            .el("<td class=\"num\">", &num("completion_tokens"), "</td>")
            .el(
                "<td class=\"num\">",
                &r.number("cost_nano_usd")
                    .map_or_else(|| "-".to_string(), usd6),
                "</td>",
            )
            .el("<td class=\"num\">", &num("status"), "</td>")
            .el(
                "<td class=\"small mono\">",
                &text("request_id"),
                "</td></tr>",
            );
    }
    h.raw("</tbody></table></div></section>");
}

fn limits_form(h: &mut Html, token: &RawToken, csrf: &str, teams: &[String]) {
    let v: LimitsForm = current_limits(token);
    h.raw("<section class=\"card\"><h2>Change limits</h2><form method=\"post\" action=\"")
        .text(&format!("/tokens/{}/limits", path_segment(&token.id)))
        .raw("\" class=\"grid\">")
        .hidden("csrf", csrf)
        .hidden("baseline", &v.baseline);
    text_input(h, "budget_usd", "Budget (USD)", &v.budget_usd, "none");
    window_input(h, &v.budget_window);
    text_input(h, "rpm", "Requests / minute", &v.rpm, "none");
    text_input(h, "tpm", "Tokens / minute", &v.tpm, "none");
    text_input(h, "models", "Models", &v.models, "any");
    text_input(h, "max_tokens", "Max tokens", &v.max_tokens, "none");
    team_select(h, teams, &v.team);
    h.raw(
        "<div class=\"actions\"><button type=\"submit\" class=\"primary\" id=\"limits-submit\">\
         Save limits</button><span class=\"hint\">An empty field removes that limit. \
        </span></div></form></section>",
    );
}

/// A token's page: its details and rules, its status row, the actions, its recent requests.
pub fn token(
    chrome: &Chrome<'_>,
    token: &RawToken,
    row: Option<&Row>,
    overview: &Overview,
    records: &[&Record],
    audit_log: bool,
) -> String {
    let mut b = Html::new();
    let status = row.map_or("-", |r| r.status.as_str());
    b.raw("<p class=\"crumbs\"><a href=\"/\">&larr; All tokens</a></p><div class=\"title\"><h1>Token <code>")
        .text(&token.id)
        .raw("</code></h1>");
    status_badge(&mut b, status);
    b.raw("</div>");
    notes(&mut b, &overview.notes);
    b.raw("<div class=\"cards\"><section class=\"card\"><h2>Details</h2><dl>");
    dl_row(&mut b, "Owner", token.owner.as_deref().unwrap_or("-"));
    dl_row(
        &mut b,
        "Description",
        token.description.as_deref().unwrap_or("-"),
    );
    dl_row(&mut b, "Team", token.team.as_deref().unwrap_or("(no team)"));
    dl_row(&mut b, "Upstream key", &token.upstream_key);
    dl_row(
        &mut b,
        "Not before",
        token.not_before.as_deref().unwrap_or("-"),
    );
    dl_row(
        &mut b,
        "Expires",
        token.expires_at.as_deref().unwrap_or("never"),
    );
    dl_row(&mut b, "Enforce", enforce_text(token.enforce));
    dl_row(&mut b, "Rules", &rules_summary(&token.rules()));
    b.raw("</dl></section><section class=\"card\"><h2>Usage</h2>");
    match row {
        Some(row) => {
            b.raw("<dl><dt>Spend</dt><dd id=\"token-spend\">");
            spend(&mut b, row);
            b.raw("</dd><dt>Budget window</dt><dd>");
            window_cell(&mut b, row);
            b.raw("</dd><dt>Requests</dt><dd>");
            opt_num(&mut b, row.requests);
            b.raw("</dd><dt>Denials</dt><dd>");
            denials_cell(&mut b, row);
            b.raw("</dd>");
            dl_row(&mut b, "Last use", row.last_use.as_deref().unwrap_or("-"));
            b.raw("</dl>");
        }
        None => {
            b.raw("<p class=\"muted\">No usage known.</p>");
        }
    }
    source_line(&mut b, overview);
    b.raw("</section><section class=\"card\"><h2>Access</h2>");
    let path = format!("/tokens/{}", path_segment(&token.id));
    if status == "revoked" {
        b.raw("<p>").text(&revoked_line(overview)).raw("</p>");
        b.raw("<a class=\"button\" id=\"unrevoke\" href=\"")
            .text(&format!("{path}/unrevoke"))
            .raw("\">Re-enable&hellip;</a>");
    } else {
        b.raw("<p>Revoking takes effect as soon as Envoy applies the new policy revision.</p><a class=\"button danger\" id=\"revoke\" href=\"")
            .text(&format!("{path}/revoke"))
            .raw("\">Revoke&hellip;</a>");
    }
    b.raw("</section></div>");
    limits_form(&mut b, token, chrome.csrf, &overview.teams);
    records_table(&mut b, records, audit_log);
    page(&format!("Token {}", token.id), chrome, &b)
}

/// The confirm step of revoke and unrevoke.
pub fn confirm(chrome: &Chrome<'_>, id: &str, revoke: bool) -> String {
    let mut b = Html::new();
    let path = format!("/tokens/{}", path_segment(id));
    b.raw("<section class=\"card confirm\">");
    if revoke {
        b.raw("<h1>Revoke token <code>").text(id).raw("</code>?</h1>")
            .raw("<p>Every request with this token is refused (401 <code>shield_token_revoked</code>) as soon as Envoy applies the change. You can re-enable it later.</p>");
    } else {
        b.raw("<h1>Re-enable token <code>").text(id).raw("</code>?</h1>")
            .raw("<p>Requests with this token are accepted again (within its limits) as soon as Envoy applies the change.</p>");
    }
    b.raw("<form method=\"post\" action=\"")
        .text(&format!(
            "{path}/{}",
            if revoke { "revoke" } else { "unrevoke" }
        ))
        .raw("\" class=\"actions\">")
        .hidden("csrf", chrome.csrf)
        .raw(if revoke {
            "<button type=\"submit\" class=\"danger\" id=\"confirm\">Revoke</button>"
        } else {
            "<button type=\"submit\" class=\"primary\" id=\"confirm\">Re-enable</button>"
        })
        .raw("<a class=\"button quiet\" href=\"")
        .text(&path)
        .raw("\">Cancel</a></form></section>");
    page(
        if revoke {
            "Revoke token"
        } else {
            "Re-enable token"
        },
        chrome,
        &b,
    )
}

/// The one page that shows a secret: a token just minted, with a copy button. Never stored,
/// never shown again.
pub fn minted(chrome: &Chrome<'_>, id: &str, token: &str) -> String {
    let mut b = Html::new();
    b.raw("<section class=\"card minted\"><h1>Token <code>")
        .text(id)
        .raw(
            "</code> minted</h1><div class=\"flash warn\"><p><strong>Copy it now: it is shown \
             once.</strong> ShieldKey keeps only its digest; this page cannot be shown again. \
             Hand it to its owner through a secret channel.</p></div>\
             <div class=\"secret\"><input id=\"minted-token\" readonly value=\"",
        )
        .text(token)
        .raw(
            "\" aria-label=\"The new token\"><button type=\"button\" class=\"primary\" \
             data-copy=\"minted-token\" id=\"copy\">Copy</button></div><p class=\"actions\">",
        )
        .link(&format!("/tokens/{}", path_segment(id)), "Open the token")
        .raw(" <a href=\"/\">Back to all tokens</a></p></section>");
    page("Token minted", chrome, &b)
}

/// A page saying a mint form cannot be used again.
pub fn mint_form_used(chrome: &Chrome<'_>) -> String {
    let mut b = Html::new();
    b.raw(
        "<section class=\"card\"><h1>This mint form was already used</h1><p>A minted token's \
         secret is shown only once, on the page right after minting; it is not shown again. \
         To mint another token, use the form on the overview.</p><p><a href=\"/\">Back to all \
         tokens</a></p></section>",
    );
    page("Mint form used", chrome, &b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::console::data::Group;

    fn chrome() -> Chrome<'static> {
        Chrome {
            csrf: "CSRF-TOKEN",
            flash: Some(Flash {
                kind: FlashKind::Ok,
                lines: vec!["<b>done</b>".into()],
            }),
            context: "policy revision 1".into(),
        }
    }

    fn overview() -> Overview {
        Overview {
            revision: 1,
            grouped: false,
            groups: vec![Group {
                team: None,
                tokens: vec![Row {
                    id: "ann".into(),
                    owner: Some("<script>alert(1)</script>".into()),
                    status: "active".into(),
                    window: Some("daily".into()),
                    limit: Some(2_000_000_000),
                    spent: Some(500_000_000),
                    resets_at: Some(0),
                    requests: Some(3),
                    ..Row::default()
                }],
            }],
            source: Source::None,
            notes: vec![],
            upstream_keys: vec!["prod".into()],
            teams: vec![],
        }
    }

    #[test]
    fn a_revoked_token_is_said_refused_only_when_envoy_serves_that_revision() {
        let mut o = overview();
        o.revision = 7;
        let envoy = |served: &str| Source::Envoy {
            url: "http://127.0.0.1:9901".into(),
            served: Some(served.into()),
        };
        o.source = envoy("7");
        assert!(revoked_line(&o).contains("which Envoy serves: Envoy refuses it"));
        o.source = envoy("6");
        assert!(revoked_line(&o).contains("but Envoy serves revision 6"));
        o.source = Source::None;
        assert!(revoked_line(&o).contains("not checked"));
        assert!(!revoked_line(&o).contains("Envoy refuses it."));
    }

    #[test]
    fn the_overview_escapes_values_and_carries_the_csrf_token() {
        let page = overview_page();
        assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(!page.contains("<script>alert"));
        assert!(page.contains("&lt;b&gt;done&lt;/b&gt;"));
        assert!(page.contains("name=\"csrf\" value=\"CSRF-TOKEN\""));
        assert!(page.contains("name=\"form_id\" value=\"FORM\""));
        assert!(page.contains("data-spent-nano-usd=\"500000000\""));
        assert!(page.contains("$0.50 of $2.00"));
        assert!(page.contains("fill p5"));
        // No inline script or style: the CSP allows only the console's own files.
        assert!(!page.contains("<script>") && !page.contains("style="));
    }

    fn overview_page() -> String {
        super::overview(&chrome(), &overview(), "FORM", None)
    }

    #[test]
    fn the_token_page_shows_no_digest() {
        let token = RawToken {
            id: "ann".into(),
            digest: "DIGEST-NEVER-SHOWN".into(),
            upstream_key: "prod".into(),
            ..RawToken::default()
        };
        let o = overview();
        let page = super::token(&chrome(), &token, o.groups[0].tokens.first(), &o, &[], true);
        assert!(!page.contains("DIGEST-NEVER-SHOWN"));
        assert!(page.contains("/tokens/ann/revoke"));
        assert!(page.contains("action=\"/tokens/ann/limits\""));
    }

    #[test]
    fn the_confirm_step_posts_with_the_csrf_token() {
        let page = confirm(&chrome(), "ann", true);
        assert!(page.contains("action=\"/tokens/ann/revoke\""));
        assert!(page.contains("value=\"CSRF-TOKEN\""));
        let login_page = login(false, Some("wrong <secret>"));
        assert!(login_page.contains("wrong &lt;secret&gt;"));
        assert!(!login_page.contains("csrf"));
    }
}
