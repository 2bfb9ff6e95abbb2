//! The one table of the Mistral API the filter knows. Every decision about a path reads it:
//! whether a token's scopes reach the route, whether the route can be metered and capped, how its
//! worst case is reserved from the request, which request field caps its output, and how its
//! response is priced. A route outside the table is refused unless a token has the `all` scope.
//!
//! Paths are matched as the upstream routes them: the filter refuses any path that is not in
//! canonical form (see `canonical_path`), so the path matched here is the path Mistral acts on.

/// What a token may reach. New tokens get `inference` only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Generation, embeddings, classification, OCR, audio, and the model catalog.
    Inference,
    /// Reading workspace resources (files, batch and fine-tuning jobs, agents, libraries,
    /// conversations): free, but it reads data with the real key.
    Read,
    /// Everything that changes the workspace or reads its secrets (webhook signing secrets,
    /// connector credentials, service accounts), and jobs billed later (batch, fine-tuning).
    Manage,
}

/// A token's scopes, compiled. `all` adds every scope and routes outside the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scopes {
    inference: bool,
    read: bool,
    manage: bool,
    unknown_routes: bool,
}

impl Default for Scopes {
    fn default() -> Self {
        Scopes {
            inference: true,
            read: false,
            manage: false,
            unknown_routes: false,
        }
    }
}

pub const SCOPE_NAMES: &[&str] = &["inference", "read", "manage", "all"];

impl Scopes {
    pub fn parse(names: &[String]) -> Result<Scopes, String> {
        if names.is_empty() {
            return Err(format!("name at least one of {}", SCOPE_NAMES.join(", ")));
        }
        let mut s = Scopes {
            inference: false,
            read: false,
            manage: false,
            unknown_routes: false,
        };
        for name in names {
            match name.as_str() {
                "inference" => s.inference = true,
                "read" => s.read = true,
                "manage" => s.manage = true,
                "all" => {
                    s = Scopes {
                        inference: true,
                        read: true,
                        manage: true,
                        unknown_routes: true,
                    }
                }
                other => {
                    return Err(format!(
                        "unknown scope '{}' (expected one of {})",
                        crate::audit::printable(other),
                        SCOPE_NAMES.join(", ")
                    ))
                }
            }
        }
        Ok(s)
    }

    pub fn allows(&self, scope: Scope) -> bool {
        match scope {
            Scope::Inference => self.inference,
            Scope::Read => self.read,
            Scope::Manage => self.manage,
        }
    }

    pub fn allows_unknown_routes(&self) -> bool {
        self.unknown_routes
    }
}

/// Which request field caps the completion tokens a request can generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputCap {
    /// `max_tokens`, times `n` choices (chat, FIM, agents).
    MaxTokensTimesN,
    /// `completion_args.max_tokens` (conversations; a top-level `max_tokens` is ignored by Mistral).
    CompletionArgsMaxTokens,
    /// `max_output_tokens` (the Responses API).
    MaxOutputTokens,
}

/// Where the prompt comes from, which decides what bounds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromptSource {
    /// Everything the model reads is in the request body: a text token is at least one byte.
    Body,
    /// The upstream adds stored state (conversation history, agent instructions, a previous
    /// response): the body does not bound the prompt, the model's context does.
    BodyAndStoredState,
}

/// Which model the upstream runs, and so whether the body's `model` can be judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelSource {
    /// The body's `model`.
    Body,
    /// The body's `model`, unless the body names an `agent_id`: then the agent's.
    BodyUnlessAgent,
    /// Stored state (the agent's, or the conversation's): a `model` in the body is not what runs.
    Stored,
}

/// What a route is, and so how it is judged, reserved and charged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteKind {
    /// Generates completion tokens; `usage` (or `input_tokens`/`output_tokens`) in the response.
    Generation {
        cap: OutputCap,
        prompt: PromptSource,
        model: ModelSource,
    },
    /// Billed on its prompt only (embeddings, moderation, classification).
    PromptOnly,
    /// Billed per page processed (`usage_info.pages_processed`).
    Ocr,
    /// Billed per second of audio (`usage.prompt_audio_seconds`); the request (a file upload)
    /// does not bound it, so it can be metered but not capped.
    Audio,
    /// Costs nothing (listing, reading, token counting).
    Free,
    /// The filter cannot see what it costs: management calls, jobs billed later (batch,
    /// fine-tuning), speech synthesis.
    Unmetered,
}

impl RouteKind {
    /// Whether the filter can reserve this route's worst case before forwarding it.
    pub fn is_capped(&self) -> bool {
        !matches!(self, RouteKind::Audio | RouteKind::Unmetered)
    }

    /// Whether the response says what the request cost.
    pub fn is_metered(&self) -> bool {
        !matches!(self, RouteKind::Unmetered)
    }

    /// Whether the request body matters to the route's rules and reservation.
    pub fn reads_body(&self) -> bool {
        matches!(
            self,
            RouteKind::Generation { .. } | RouteKind::PromptOnly | RouteKind::Ocr
        )
    }

    pub fn generates(&self) -> bool {
        matches!(self, RouteKind::Generation { .. })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Post,
    /// Any method (management families).
    Any,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub method: Method,
    /// Segments after the leading `/`: `{}` matches one segment, a final `**` any rest
    /// (including none).
    pub template: &'static str,
    pub scope: Scope,
    pub kind: RouteKind,
}

impl Route {
    /// How audit records name the route: its template (`v1/conversations/{}`), so a record says
    /// what was reached without carrying ids or client-written path text.
    pub fn audit_name(&self) -> &'static str {
        self.template
    }
}

const fn route(method: Method, template: &'static str, scope: Scope, kind: RouteKind) -> Route {
    Route {
        method,
        template,
        scope,
        kind,
    }
}

const CHAT: RouteKind = RouteKind::Generation {
    cap: OutputCap::MaxTokensTimesN,
    prompt: PromptSource::Body,
    model: ModelSource::Body,
};
const AGENT: RouteKind = RouteKind::Generation {
    cap: OutputCap::MaxTokensTimesN,
    prompt: PromptSource::BodyAndStoredState,
    model: ModelSource::Stored,
};
const CONVERSATION: RouteKind = RouteKind::Generation {
    cap: OutputCap::CompletionArgsMaxTokens,
    prompt: PromptSource::BodyAndStoredState,
    model: ModelSource::BodyUnlessAgent,
};
/// Appending to or restarting a stored conversation: its model is the conversation's.
const CONVERSATION_CONTINUED: RouteKind = RouteKind::Generation {
    cap: OutputCap::CompletionArgsMaxTokens,
    prompt: PromptSource::BodyAndStoredState,
    model: ModelSource::Stored,
};
const RESPONSE: RouteKind = RouteKind::Generation {
    cap: OutputCap::MaxOutputTokens,
    prompt: PromptSource::BodyAndStoredState,
    model: ModelSource::Body,
};

use Method::{Any, Get, Post};
use RouteKind::{Audio, Free, Ocr, PromptOnly, Unmetered};
use Scope::{Inference, Manage, Read};

/// The table. First match wins: specific routes before the families that cover the rest.
/// Sources: Mistral's OpenAPI reference and the routes of the official SDKs (`mistralai` 3.7.0).
pub const TABLE: &[Route] = &[
    // Inference.
    route(Post, "v1/chat/completions", Inference, CHAT),
    route(Post, "v1/fim/completions", Inference, CHAT),
    route(Post, "v1/agents/completions", Inference, AGENT),
    route(Post, "v1/conversations", Inference, CONVERSATION),
    route(
        Post,
        "v1/conversations/{}",
        Inference,
        CONVERSATION_CONTINUED,
    ),
    route(
        Post,
        "v1/conversations/{}/restart",
        Inference,
        CONVERSATION_CONTINUED,
    ),
    route(Post, "v1/responses", Inference, RESPONSE),
    route(Post, "v1/responses/input_tokens", Inference, Free),
    route(Post, "v1/embeddings", Inference, PromptOnly),
    route(Post, "v1/moderations", Inference, PromptOnly),
    route(Post, "v1/chat/moderations", Inference, PromptOnly),
    route(Post, "v1/classifications", Inference, PromptOnly),
    route(Post, "v1/chat/classifications", Inference, PromptOnly),
    route(Post, "v1/ocr", Inference, Ocr),
    route(Post, "v1/audio/transcriptions", Inference, Audio),
    route(Post, "v1/audio/speech", Inference, Unmetered),
    route(Get, "v1/models", Inference, Free),
    route(Get, "v1/models/{}", Inference, Free),
    // Reading workspace resources.
    route(Get, "v1/files/**", Read, Free),
    route(Get, "v1/batch/jobs/**", Read, Free),
    route(Get, "v1/fine_tuning/jobs/**", Read, Free),
    route(Get, "v1/agents/**", Read, Free),
    route(Get, "v1/libraries/**", Read, Free),
    route(Get, "v1/conversations", Read, Free),
    route(Get, "v1/conversations/{}", Read, Free),
    route(Get, "v1/conversations/{}/history", Read, Free),
    route(Get, "v1/conversations/{}/messages", Read, Free),
    route(Get, "v1/audio/voices/**", Read, Free),
    // Management: changes the workspace, reads its secrets, or starts work billed later.
    route(Any, "v1/files/**", Manage, Unmetered),
    route(Any, "v1/batch/**", Manage, Unmetered),
    route(Any, "v1/fine_tuning/**", Manage, Unmetered),
    route(Any, "v1/models/**", Manage, Unmetered),
    route(Any, "v1/agents/**", Manage, Unmetered),
    route(Any, "v1/libraries/**", Manage, Unmetered),
    route(Any, "v1/conversations/**", Manage, Unmetered),
    route(Any, "v1/audio/**", Manage, Unmetered),
    route(Any, "v1/service-accounts/**", Manage, Unmetered),
    route(Any, "v1/webhooks/**", Manage, Unmetered),
    route(Any, "v1/workflows/**", Manage, Unmetered),
    route(Any, "v1/connectors/**", Manage, Unmetered),
    route(Any, "v1/observability/**", Manage, Unmetered),
    route(Any, "v1/context/**", Manage, Unmetered),
    route(Any, "v1/rag/**", Manage, Unmetered),
    route(Any, "v1/triggers/**", Manage, Unmetered),
    route(Any, "v1/users/**", Manage, Unmetered),
    route(Any, "v1/whoami", Manage, Unmetered),
    route(Any, "v1/client/**", Manage, Unmetered),
];

/// The route a request names, if the table knows it. `path` must be canonical (no query).
pub fn lookup(method: &[u8], path: &str) -> Option<&'static Route> {
    let rest = path.strip_prefix('/')?;
    TABLE
        .iter()
        .find(|r| method_matches(r.method, method) && template_matches(r.template, rest))
}

fn method_matches(want: Method, method: &[u8]) -> bool {
    match want {
        Method::Any => true,
        Method::Get => method == b"GET",
        Method::Post => method == b"POST",
    }
}

fn template_matches(template: &str, path: &str) -> bool {
    let mut segments = path.split('/');
    for part in template.split('/') {
        if part == "**" {
            return true;
        }
        match segments.next() {
            Some(seg) if part == "{}" && !seg.is_empty() => {}
            Some(seg) if seg == part => {}
            _ => return false,
        }
    }
    segments.next().is_none()
}

/// The path without its query, if it is the exact form the upstream routes: a path that a
/// percent-decoding server (FastAPI decodes before routing), a slash-merging proxy or a
/// dot-segment resolver would read differently is refused rather than guessed at.
/// Allowed: `/`-separated, non-empty segments of RFC 3986 unreserved characters and sub-delims
/// (`[A-Za-z0-9-._~!$&'()*+,;=:@]`), no `.`/`..` segment, no percent escape. Envoy's
/// `normalize_path` and `merge_slashes` produce this form for every path a client can mean.
pub fn canonical_path(path: &[u8]) -> Option<&str> {
    let end = path.iter().position(|b| *b == b'?').unwrap_or(path.len());
    let path = path.get(..end)?;
    let text = std::str::from_utf8(path).ok()?;
    let rest = text.strip_prefix('/')?;
    for segment in rest.split('/') {
        if segment.is_empty() || segment == "." || segment == ".." {
            return None;
        }
        if !segment.bytes().all(is_path_char) {
            return None;
        }
    }
    Some(text)
}

fn is_path_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@".contains(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(method: &str, path: &str) -> Option<RouteKind> {
        lookup(method.as_bytes(), path).map(|r| r.kind)
    }

    #[test]
    fn inference_routes_are_metered_and_capped() {
        assert_eq!(kind("POST", "/v1/chat/completions"), Some(CHAT));
        assert_eq!(
            kind("POST", "/v1/conversations/c1/restart"),
            Some(CONVERSATION_CONTINUED)
        );
        assert_eq!(kind("POST", "/v1/conversations"), Some(CONVERSATION));
        assert_eq!(kind("POST", "/v1/responses"), Some(RESPONSE));
        assert_eq!(kind("POST", "/v1/embeddings"), Some(PromptOnly));
        assert_eq!(kind("POST", "/v1/ocr"), Some(Ocr));
        assert_eq!(kind("GET", "/v1/models"), Some(Free));
        let chat = lookup(b"POST", "/v1/chat/completions").unwrap();
        assert_eq!(chat.scope, Inference);
        assert!(chat.kind.is_capped() && chat.kind.is_metered() && chat.kind.generates());
        assert!(!Audio.is_capped() && Audio.is_metered());
    }

    #[test]
    fn management_needs_its_scope_and_is_never_metered() {
        for (method, path) in [
            ("DELETE", "/v1/models/ft:mistral-small:abc"),
            ("POST", "/v1/batch/jobs"),
            ("GET", "/v1/webhooks/w1/signing-secret"),
            ("POST", "/v1/service-accounts"),
            ("DELETE", "/v1/conversations/c1"),
            ("PATCH", "/v1/connectors/c/user/credentials"),
            ("POST", "/v1/files"),
        ] {
            let r = lookup(method.as_bytes(), path).unwrap();
            assert_eq!((r.scope, r.kind), (Manage, Unmetered), "{method} {path}");
        }
        let read = lookup(b"GET", "/v1/files/f1/content").unwrap();
        assert_eq!((read.scope, read.kind), (Read, Free));
        assert_eq!(lookup(b"GET", "/v1/batch/jobs").unwrap().scope, Read);
    }

    #[test]
    fn anything_else_is_unknown() {
        for (method, path) in [
            ("GET", "/v1/chat/completions"),
            ("POST", "/v1/chat/completions/"),
            ("POST", "/v1/chat/completions/extra"),
            ("POST", "/V1/chat/completions"),
            ("POST", "/v2/chat/completions"),
            ("PUT", "/v1/embeddings"),
            ("GET", "/"),
            ("GET", "/v1"),
        ] {
            assert!(lookup(method.as_bytes(), path).is_none(), "{method} {path}");
        }
    }

    #[test]
    fn only_canonical_paths_are_judged() {
        assert_eq!(
            canonical_path(b"/v1/chat/completions?x=%2F&y"),
            Some("/v1/chat/completions")
        );
        assert_eq!(
            canonical_path(b"/v1/models/ft:a:b~c"),
            Some("/v1/models/ft:a:b~c")
        );
        for bad in [
            &b"/v1/%63hat/completions"[..],
            b"/v1//chat/completions",
            b"/v1/./chat/completions",
            b"/v1/x/../chat/completions",
            b"/v1/chat/completions/",
            b"v1/chat/completions",
            b"/v1/chat\\completions",
            b"/v1/chat/completions#frag",
            b"/v1/chat/comp letions",
            b"/v1/\xc3\xa9",
            b"",
            b"/",
        ] {
            assert_eq!(
                canonical_path(bad),
                None,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn scopes_default_to_inference_and_all_opens_unknown_routes() {
        let d = Scopes::default();
        assert!(d.allows(Inference) && !d.allows(Read) && !d.allows(Manage));
        assert!(!d.allows_unknown_routes());
        let all = Scopes::parse(&["all".into()]).unwrap();
        assert!(all.allows(Manage) && all.allows_unknown_routes());
        let rm = Scopes::parse(&["read".into(), "manage".into()]).unwrap();
        assert!(!rm.allows(Inference) && rm.allows(Read) && rm.allows(Manage));
        assert!(Scopes::parse(&[]).is_err());
        assert!(Scopes::parse(&["admin".into()]).is_err());
    }
}
