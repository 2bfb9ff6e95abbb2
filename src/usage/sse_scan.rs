//! Server-sent events, split at any byte: each event's `data` is streamed into a fresh JSON
//! scanner, and the last event that carried `usage` wins. Handles `\n`, `\r\n` and `\r` line ends,
//! `data:` with or without a space, multi-line data, comments, other fields, and `data: [DONE]`.
//! Memory per stream is constant: a few bytes of the current field name and data prefix.

use super::json_scan::{JsonFacts, JsonScanner};
use crate::byte_search::find_either;

const FIELD_BUF: usize = 8;
const DONE: &[u8] = b"[DONE]";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Line {
    /// Reading the field name (before `:`).
    Field,
    /// Just after `data:`: one optional space is skipped.
    DataStart,
    Data,
    /// A comment, or a field other than `data`.
    Skip,
}

#[derive(Debug, Clone)]
pub struct SseScanner {
    line: Line,
    field: [u8; FIELD_BUF],
    field_len: usize,
    /// The first bytes of this line's data value, to recognise `[DONE]`.
    data_prefix: [u8; 8],
    data_len: usize,
    after_cr: bool,
    event: JsonScanner,
    event_has_data: bool,
    last: JsonFacts,
    model: Option<String>,
    /// Generated text of the events already dispatched.
    generated_bytes: u64,
    saw_done: bool,
}

impl Default for SseScanner {
    fn default() -> Self {
        SseScanner {
            line: Line::Field,
            field: [0; FIELD_BUF],
            field_len: 0,
            data_prefix: [0; 8],
            data_len: 0,
            after_cr: false,
            event: JsonScanner::new(),
            event_has_data: false,
            last: JsonFacts::default(),
            model: None,
            generated_bytes: 0,
            saw_done: false,
        }
    }
}

impl SseScanner {
    pub fn feed(&mut self, mut bytes: &[u8]) {
        while let Some((&b, rest)) = bytes.split_first() {
            if self.line == Line::Data {
                // The rest of a data line goes to the event's JSON scanner in one piece: most
                // of a stream is data lines.
                let run = find_either(bytes, b'\n', b'\r');
                if run > 0 {
                    let (data, after) = bytes.split_at(run);
                    self.data_run(data);
                    bytes = after;
                    continue;
                }
            }
            self.byte(b);
            bytes = rest;
        }
    }

    pub fn saw_done(&self) -> bool {
        self.saw_done
    }

    /// Usage from the last event that had it (including one still open at the end of input),
    /// and the last model named.
    pub fn facts(&self) -> (JsonFacts, Option<String>) {
        let mut last = self.last.clone();
        let mut model = self.model.clone();
        let mut pending = self.event.clone();
        pending.finish();
        let open = pending.facts();
        if open.saw_usage {
            last = open.clone();
        }
        if open.model.is_some() {
            model = open.model.clone();
        }
        last.generated_bytes = self.generated_bytes.saturating_add(open.generated_bytes);
        (last, model)
    }

    fn byte(&mut self, b: u8) {
        if self.after_cr {
            self.after_cr = false;
            if b == b'\n' {
                return;
            }
        }
        match b {
            b'\r' => {
                self.after_cr = true;
                self.end_line();
            }
            b'\n' => self.end_line(),
            _ => match self.line {
                Line::Field => {
                    if b == b':' {
                        let name = self.field.get(..self.field_len).unwrap_or_default();
                        self.line = if name == b"data" {
                            Line::DataStart
                        } else {
                            Line::Skip
                        };
                    } else if let Some(slot) = self.field.get_mut(self.field_len) {
                        *slot = b;
                        self.field_len += 1;
                    } else {
                        self.line = Line::Skip;
                    }
                }
                Line::DataStart => {
                    self.begin_data_line();
                    if b != b' ' {
                        self.data_byte(b);
                    }
                }
                Line::Data => self.data_byte(b),
                Line::Skip => {}
            },
        }
    }

    fn begin_data_line(&mut self) {
        if self.event_has_data {
            // Data lines of one event are joined with a newline: whitespace to JSON.
            self.event.feed(b"\n");
        }
        self.event_has_data = true;
        self.data_len = 0;
        self.line = Line::Data;
    }

    fn data_byte(&mut self, b: u8) {
        self.data_run(&[b]);
    }

    /// Bytes of a data line (no line break among them).
    fn data_run(&mut self, run: &[u8]) {
        // Only the start of the line is kept, to recognise `[DONE]`.
        for (slot, b) in self.data_prefix.iter_mut().skip(self.data_len).zip(run) {
            *slot = *b;
        }
        self.data_len = self.data_len.saturating_add(run.len());
        self.event.feed(run);
    }

    fn end_line(&mut self) {
        match self.line {
            // `data:` with nothing after it is an empty data line.
            Line::DataStart => self.begin_data_line(),
            Line::Data => {
                if self.data_prefix.get(..self.data_len) == Some(DONE) {
                    self.saw_done = true;
                }
            }
            // An empty line dispatches the event.
            Line::Field if self.field_len == 0 => self.end_event(),
            // A line without a colon is a field with an empty value: nothing we use.
            Line::Field | Line::Skip => {}
        }
        self.line = Line::Field;
        self.field_len = 0;
    }

    fn end_event(&mut self) {
        if !self.event_has_data {
            return;
        }
        let mut event = std::mem::take(&mut self.event);
        event.finish();
        let mut facts = event.into_facts();
        self.generated_bytes = self.generated_bytes.saturating_add(facts.generated_bytes);
        if let Some(model) = facts.model.take() {
            self.model = Some(model);
        }
        if facts.saw_usage {
            self.last = facts;
        }
        self.event_has_data = false;
    }
}
