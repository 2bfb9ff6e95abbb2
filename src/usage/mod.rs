//! Reading token usage out of Mistral responses as they stream past, in constant memory.
//!
//! `UsageScanner` is fed every response body chunk (the filter never holds the response back) and
//! reports the usage and model at the end. JSON bodies go through `json_scan`; `text/event-stream`
//! bodies through `sse_scan`, which runs a JSON scan per event.

mod json_scan;
mod sse_scan;

use json_scan::{JsonFacts, JsonScanner};
use sse_scan::SseScanner;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// `usage.prompt_tokens_details.cached_tokens`: billed at 10% of the input price.
    pub cached_prompt_tokens: u64,
    /// `usage.service_tier == "priority"`: billed at 1.75×.
    pub priority: bool,
    /// OCR: `usage_info.pages_processed`.
    pub pages: u64,
    /// Transcription: `usage.prompt_audio_seconds`.
    pub audio_seconds: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScanResult {
    pub usage: Option<Usage>,
    pub model: Option<String>,
    /// Bytes of generated text seen (content, text, tool-call arguments), without JSON or SSE
    /// framing: what an estimate of a response cut short counts.
    pub generated_bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    Json,
    EventStream,
}

impl BodyKind {
    pub fn from_content_type(content_type: &str) -> BodyKind {
        let media = content_type.split(';').next().unwrap_or_default().trim();
        if media.eq_ignore_ascii_case("text/event-stream") {
            BodyKind::EventStream
        } else {
            BodyKind::Json
        }
    }
}

// One scanner lives inline in each stream's state; a few hundred bytes either way, and boxing
// would cost an allocation per response.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
enum Inner {
    Json(JsonScanner),
    Sse(SseScanner),
}

#[derive(Debug, Clone)]
pub struct UsageScanner {
    inner: Inner,
    bytes_seen: u64,
}

fn usage_of(facts: &JsonFacts) -> Option<Usage> {
    // Billing needs both counts; a `usage` object without them (or `usage: null`) is no usage.
    let counted = facts.prompt_tokens.is_some()
        || facts.completion_tokens.is_some()
        || facts.pages_processed.is_some()
        || facts.audio_seconds.is_some();
    if !facts.saw_usage || !counted {
        return None;
    }
    Some(Usage {
        prompt_tokens: facts.prompt_tokens.unwrap_or(0),
        completion_tokens: facts.completion_tokens.unwrap_or(0),
        cached_prompt_tokens: facts.cached_tokens.unwrap_or(0),
        priority: facts.service_tier.as_deref() == Some("priority"),
        pages: facts.pages_processed.unwrap_or(0),
        audio_seconds: facts.audio_seconds.unwrap_or(0),
    })
}

impl UsageScanner {
    pub fn new(kind: BodyKind) -> Self {
        let inner = match kind {
            BodyKind::Json => Inner::Json(JsonScanner::new()),
            BodyKind::EventStream => Inner::Sse(SseScanner::default()),
        };
        UsageScanner {
            inner,
            bytes_seen: 0,
        }
    }

    pub fn feed(&mut self, chunk: &[u8]) {
        self.bytes_seen = self.bytes_seen.saturating_add(chunk.len() as u64);
        match &mut self.inner {
            Inner::Json(s) => s.feed(chunk),
            Inner::Sse(s) => s.feed(chunk),
        }
    }

    pub fn result(&self) -> ScanResult {
        match &self.inner {
            Inner::Json(s) => {
                let mut s = s.clone();
                s.finish();
                ScanResult {
                    usage: usage_of(s.facts()),
                    model: s.facts().model.clone(),
                    generated_bytes: s.facts().generated_bytes,
                }
            }
            Inner::Sse(s) => {
                let (facts, model) = s.facts();
                ScanResult {
                    usage: usage_of(&facts),
                    model,
                    generated_bytes: facts.generated_bytes,
                }
            }
        }
    }

    pub fn bytes_seen(&self) -> u64 {
        self.bytes_seen
    }

    pub fn saw_done(&self) -> bool {
        matches!(&self.inner, Inner::Sse(s) if s.saw_done())
    }

    /// The body ended where it should: a closed top-level JSON value, or an event stream that
    /// reached `[DONE]` (or at least delivered its usage).
    pub fn is_complete(&self) -> bool {
        match &self.inner {
            Inner::Json(s) => s.is_complete(),
            Inner::Sse(s) => s.saw_done() || usage_of(&s.facts().0).is_some(),
        }
    }
}

#[cfg(test)]
mod tests;
