//! An incremental JSON scanner that picks the billing facts out of a Mistral response body
//! without holding it: top-level `model`, and under top-level `usage` the `prompt_tokens`,
//! `completion_tokens` (or the Responses API's `input_tokens` / `output_tokens`),
//! `prompt_tokens_details.cached_tokens`, `service_tier` and `prompt_audio_seconds`; under
//! `usage_info` (OCR) `pages_processed`; `outputs[].model` (conversations). A top-level `response` object (the Responses API's
//! `response.completed` event) is read as if it were the top level. It also counts the bytes of
//! generated text (string values of `content`, `text`, `arguments`, `delta`, at any depth), which
//! is what an estimate of a cut-short response is based on.
//!
//! Constant memory: the container stack is a 64-bit set (deeper documents stop being scanned),
//! keys are compared through a 24-byte buffer, and only the `model` string (up to 128 bytes) is
//! kept. Field order does not matter; string values (including `delta.content`, padding fields
//! and escapes) are skipped a run at a time, up to the next quote or backslash. It is tolerant, not a validator: on garbage it simply finds
//! nothing, and it never panics.

use crate::byte_search::find_either;

const MAX_DEPTH: u32 = 64;
const KEY_BUF: usize = 24;
pub const MAX_MODEL_LEN: usize = 128;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Key {
    Model,
    Usage,
    Response,
    Outputs,
    PagesProcessed,
    AudioSeconds,
    Generated,
    PromptTokens,
    CompletionTokens,
    PromptDetails,
    CachedTokens,
    ServiceTier,
    Other,
}

/// What the value about to be read is, given where it sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Model,
    UsageObject,
    Prompt,
    Completion,
    Cached,
    Tier,
    Pages,
    AudioSeconds,
    /// A string value here is generated text.
    Generated,
    Ignored,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Between tokens.
    Idle,
    /// Inside a string; `key` when it is an object key.
    Str { key: bool, escaped: bool },
    /// Inside a number or a literal (true/false/null).
    Scalar,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JsonFacts {
    pub model: Option<String>,
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    pub cached_tokens: Option<u64>,
    pub service_tier: Option<String>,
    pub pages_processed: Option<u64>,
    pub audio_seconds: Option<u64>,
    /// A `usage` (or `usage_info`) object was seen at the top level.
    pub saw_usage: bool,
    /// Bytes of generated text seen (see the module comment).
    pub generated_bytes: u64,
}

#[derive(Debug, Clone)]
pub struct JsonScanner {
    state: State,
    depth: u32,
    /// Bit d set: the container at depth d+1 is an object.
    objects: u64,
    /// In an object, the next string is a key.
    expect_key: bool,
    key_buf: [u8; KEY_BUF],
    key_len: usize,
    key_overflow: bool,
    /// The key of the current member at depth 1 to 4 (what the path is).
    path: [Key; 4],
    slot: Slot,
    number: Option<u64>,
    text: Vec<u8>,
    text_overflow: bool,
    closed: bool,
    given_up: bool,
    facts: JsonFacts,
}

impl Default for JsonScanner {
    fn default() -> Self {
        JsonScanner {
            state: State::Idle,
            depth: 0,
            objects: 0,
            expect_key: false,
            key_buf: [0; KEY_BUF],
            key_len: 0,
            key_overflow: false,
            path: [Key::Other; 4],
            slot: Slot::Ignored,
            number: None,
            text: Vec::new(),
            text_overflow: false,
            closed: false,
            given_up: false,
            facts: JsonFacts::default(),
        }
    }
}

impl JsonScanner {
    pub fn new() -> Self {
        JsonScanner::default()
    }

    pub fn facts(&self) -> &JsonFacts {
        &self.facts
    }

    /// The facts, without copying them (the scanner is done).
    pub fn into_facts(self) -> JsonFacts {
        self.facts
    }

    /// The top-level value has been closed.
    pub fn is_complete(&self) -> bool {
        self.closed
    }

    pub fn feed(&mut self, bytes: &[u8]) {
        let mut rest = bytes;
        while let Some((&b, tail)) = rest.split_first() {
            if self.given_up {
                return;
            }
            if let State::Str {
                key,
                escaped: false,
            } = self.state
            {
                // Inside a string only a quote or a backslash changes the state: the bytes up to
                // the next one are taken as one run, not fed through the state machine one by
                // one (most of a response is string content).
                let run = find_either(rest, b'"', b'\\');
                if run > 0 {
                    let (text, after) = rest.split_at(run);
                    self.string_run(text, key);
                    rest = after;
                    continue;
                }
            }
            self.byte(b);
            rest = tail;
        }
    }

    fn in_object(&self) -> bool {
        self.depth > 0 && self.objects & (1u64 << (self.depth - 1)) != 0
    }

    fn byte(&mut self, b: u8) {
        match self.state {
            State::Str { key, escaped } => self.string_byte(b, key, escaped),
            State::Scalar => {
                if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'+' | b'.') {
                    self.scalar_byte(b);
                } else {
                    self.end_scalar();
                    self.state = State::Idle;
                    self.byte(b);
                }
            }
            State::Idle => self.structural(b),
        }
    }

    fn structural(&mut self, b: u8) {
        match b {
            b'{' | b'[' => {
                if self.closed {
                    return;
                }
                if self.depth >= MAX_DEPTH {
                    self.given_up = true;
                    return;
                }
                let slot = self.slot;
                if b == b'{' {
                    self.objects |= 1u64 << self.depth;
                    if slot == Slot::UsageObject {
                        self.facts.saw_usage = true;
                    }
                } else {
                    self.objects &= !(1u64 << self.depth);
                }
                self.depth += 1;
                self.expect_key = b == b'{';
                self.slot = Slot::Ignored;
            }
            b'}' | b']' => {
                if self.depth == 0 {
                    return;
                }
                self.depth -= 1;
                if let Some(k) = self.path.get_mut(self.depth as usize) {
                    *k = Key::Other;
                }
                if self.depth == 0 {
                    self.closed = true;
                }
                self.expect_key = false;
                self.slot = Slot::Ignored;
            }
            b',' => {
                self.expect_key = self.in_object();
                self.slot = Slot::Ignored;
            }
            b':' => {
                self.expect_key = false;
            }
            b'"' => {
                let key = self.expect_key && self.in_object();
                if key {
                    self.key_len = 0;
                    self.key_overflow = false;
                } else {
                    self.text.clear();
                    self.text_overflow = false;
                }
                self.state = State::Str {
                    key,
                    escaped: false,
                };
            }
            b if b.is_ascii_whitespace() => {}
            _ => {
                self.number = if b.is_ascii_digit() {
                    Some(u64::from(b - b'0'))
                } else {
                    None
                };
                self.state = State::Scalar;
            }
        }
    }

    fn string_byte(&mut self, b: u8, key: bool, escaped: bool) {
        if escaped {
            self.push_string_byte(b, key);
            self.state = State::Str {
                key,
                escaped: false,
            };
            return;
        }
        match b {
            b'\\' => {
                // Keys and model names we care about never contain escapes: spoil the capture.
                if key {
                    self.key_overflow = true;
                } else {
                    self.text_overflow = true;
                }
                self.state = State::Str { key, escaped: true };
            }
            b'"' => {
                self.state = State::Idle;
                if key {
                    self.end_key();
                } else {
                    self.end_string_value();
                }
            }
            _ => self.push_string_byte(b, key),
        }
    }

    /// String bytes with no quote or backslash among them: what `push_string_byte` does with
    /// each, at once.
    fn string_run(&mut self, run: &[u8], key: bool) {
        if key {
            match self.key_buf.get_mut(self.key_len..self.key_len + run.len()) {
                Some(slots) => {
                    slots.copy_from_slice(run);
                    self.key_len += run.len();
                }
                None => self.key_overflow = true,
            }
        } else if self.slot == Slot::Generated {
            self.facts.generated_bytes =
                self.facts.generated_bytes.saturating_add(run.len() as u64);
        } else if matches!(self.slot, Slot::Model | Slot::Tier) {
            if self.text.len() + run.len() <= MAX_MODEL_LEN {
                self.text.extend_from_slice(run);
            } else {
                self.text_overflow = true;
            }
        }
    }

    fn push_string_byte(&mut self, b: u8, key: bool) {
        if key {
            match self.key_buf.get_mut(self.key_len) {
                Some(slot) => {
                    *slot = b;
                    self.key_len += 1;
                }
                None => self.key_overflow = true,
            }
        } else if self.slot == Slot::Generated {
            self.facts.generated_bytes = self.facts.generated_bytes.saturating_add(1);
        } else if matches!(self.slot, Slot::Model | Slot::Tier) {
            if self.text.len() < MAX_MODEL_LEN {
                self.text.push(b);
            } else {
                self.text_overflow = true;
            }
        }
    }

    fn end_key(&mut self) {
        let name = self.key_buf.get(..self.key_len).unwrap_or_default();
        let key = if self.key_overflow {
            Key::Other
        } else {
            match name {
                b"model" => Key::Model,
                b"usage" | b"usage_info" => Key::Usage,
                b"response" => Key::Response,
                b"outputs" => Key::Outputs,
                b"prompt_tokens" | b"input_tokens" => Key::PromptTokens,
                b"completion_tokens" | b"output_tokens" => Key::CompletionTokens,
                b"pages_processed" => Key::PagesProcessed,
                b"prompt_audio_seconds" => Key::AudioSeconds,
                b"content" | b"text" | b"arguments" | b"delta" => Key::Generated,
                b"prompt_tokens_details" => Key::PromptDetails,
                b"cached_tokens" => Key::CachedTokens,
                b"service_tier" => Key::ServiceTier,
                _ => Key::Other,
            }
        };
        let d = self.depth as usize;
        if let Some(k) = self.path.get_mut(d.wrapping_sub(1)) {
            *k = key;
        }
        // Inside a top-level `response` object, read as if it were the top level.
        let (d, path) = match self.path {
            [Key::Response, a, b, c] if d >= 2 => (d - 1, [a, b, c]),
            [a, b, c, _] => (d, [a, b, c]),
        };
        self.slot = match (d, path) {
            (1, [Key::Model, ..]) => Slot::Model,
            // Conversations name the model on each output entry, not at the top level.
            (3, [Key::Outputs, _, Key::Model]) => Slot::Model,
            (1, [Key::Usage, ..]) => Slot::UsageObject,
            (1, [Key::ServiceTier, ..]) => Slot::Tier,
            (2, [Key::Usage, Key::PromptTokens, _]) => Slot::Prompt,
            (2, [Key::Usage, Key::CompletionTokens, _]) => Slot::Completion,
            (2, [Key::Usage, Key::ServiceTier, _]) => Slot::Tier,
            (2, [Key::Usage, Key::PagesProcessed, _]) => Slot::Pages,
            (2, [Key::Usage, Key::AudioSeconds, _]) => Slot::AudioSeconds,
            (3, [Key::Usage, Key::PromptDetails, Key::CachedTokens]) => Slot::Cached,
            _ if key == Key::Generated => Slot::Generated,
            _ => Slot::Ignored,
        };
    }

    fn end_string_value(&mut self) {
        if self.depth == 0 {
            self.closed = true;
        }
        if !self.text_overflow {
            match self.slot {
                Slot::Model => {
                    self.facts.model = String::from_utf8(std::mem::take(&mut self.text)).ok();
                }
                Slot::Tier => {
                    self.facts.service_tier =
                        String::from_utf8(std::mem::take(&mut self.text)).ok();
                }
                _ => {}
            }
        }
        self.slot = Slot::Ignored;
    }

    fn scalar_byte(&mut self, b: u8) {
        self.number = match (self.number, b) {
            (Some(n), b'0'..=b'9') => {
                Some(n.saturating_mul(10).saturating_add(u64::from(b - b'0')))
            }
            // Fractions, exponents, signs and literals are not token counts.
            _ => None,
        };
    }

    fn end_scalar(&mut self) {
        if self.depth == 0 {
            self.closed = true;
        }
        if let Some(n) = self.number.take() {
            match self.slot {
                Slot::Prompt => self.facts.prompt_tokens = Some(n),
                Slot::Completion => self.facts.completion_tokens = Some(n),
                Slot::Cached => self.facts.cached_tokens = Some(n),
                Slot::Pages => self.facts.pages_processed = Some(n),
                Slot::AudioSeconds => self.facts.audio_seconds = Some(n),
                _ => {}
            }
        }
        self.slot = Slot::Ignored;
    }

    /// Ends a scalar that was still open when the input ended (e.g. a bare top-level number).
    pub fn finish(&mut self) {
        if self.state == State::Scalar {
            self.end_scalar();
            self.state = State::Idle;
        }
    }
}
