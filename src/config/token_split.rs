//! Finds the elements of a policy document's top-level `tokens` list, one at a time, as bytes;
//! and the document without them (its "head": everything else, with `"tokens":[]`).
//!
//! Why not serde over a reader: serde_json reads an `io::Read` a byte at a time through the
//! reader, several times slower than over a slice, and every VM reads the whole document on every
//! configuration (a revocation included). This walks the document's structure only (strings,
//! nesting, the list's commas) and leaves the JSON itself to serde over slices: the head, and each
//! element (`token_stream`). Memory: the head and one element at a time.

use super::ConfigError;
use crate::byte_search::find_either;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Before the document's opening brace.
    Start,
    /// In the top-level object, outside the `tokens` list.
    TopLevel,
    /// After `"tokens":`, before its value.
    TokensValue,
    /// Inside the `tokens` list (depth 2), between elements.
    Tokens,
    /// After the `tokens` list.
    Done,
}

pub struct TokenSplitter {
    stage: Stage,
    /// Containers open, the top-level object included.
    depth: u32,
    in_string: bool,
    escaped: bool,
    /// At depth 1, the next string is a key.
    expect_key: bool,
    /// The top-level key being read (only kept while it could still be `tokens`).
    key: Vec<u8>,
    reading_key: bool,
    /// The last top-level key was `tokens`.
    key_is_tokens: bool,
    /// The bytes of the element being read; `None` between elements.
    element: Option<Vec<u8>>,
    /// In the list, a comma was the last thing read (an element must follow).
    after_comma: bool,
    count: usize,
    /// The document without the list's elements, when asked for.
    head: Option<Vec<u8>>,
}

/// Longest top-level key kept to compare with `tokens` (escapes included).
const KEY_MAX: usize = 64;

impl Default for TokenSplitter {
    fn default() -> Self {
        TokenSplitter {
            stage: Stage::Start,
            depth: 0,
            in_string: false,
            escaped: false,
            expect_key: false,
            key: Vec::new(),
            reading_key: false,
            key_is_tokens: false,
            element: None,
            after_comma: false,
            count: 0,
            head: None,
        }
    }
}

/// JSON's whitespace (not form feed or the other bytes `is_ascii_whitespace` accepts).
fn is_json_whitespace(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

fn not_a_list() -> ConfigError {
    ConfigError::at("tokens", "invalid type: expected a list of tokens")
}

impl TokenSplitter {
    /// A splitter that also keeps the document without the list's elements (`into_head`).
    pub fn keeping_head() -> Self {
        TokenSplitter {
            head: Some(Vec::new()),
            ..TokenSplitter::default()
        }
    }

    /// Reads `bytes`, calling `each` with every element completed in them, in order.
    pub fn feed(
        &mut self,
        bytes: &[u8],
        each: &mut dyn FnMut(&[u8]) -> Result<(), ConfigError>,
    ) -> Result<(), ConfigError> {
        let mut at = 0;
        while let Some(&b) = bytes.get(at) {
            if self.stage == Stage::Done && self.head.is_none() {
                return Ok(());
            }
            let in_list = self.stage == Stage::Tokens;
            // Most of a policy's bytes are inside strings (digests, ids, owners): a string's
            // plain bytes are taken a run at a time, up to the next quote or backslash, instead
            // of one at a time through the state machine. Keys go byte by byte (`string_byte`).
            if self.in_string && !self.escaped && !self.reading_key {
                let run = find_either(&bytes[at..], b'"', b'\\');
                if run > 0 {
                    let plain = &bytes[at..at + run];
                    if let Some(element) = self.element.as_mut() {
                        element.extend_from_slice(plain);
                    }
                    if let (Some(head), false) = (self.head.as_mut(), in_list) {
                        head.extend_from_slice(plain);
                    }
                    at += run;
                    continue;
                }
            }
            if self.in_string {
                self.string_byte(b);
            } else {
                self.structural(b, each)?;
            }
            // The head: every byte outside the list, its brackets included.
            if let Some(head) = self.head.as_mut() {
                if !in_list || self.stage == Stage::Done {
                    head.push(b);
                }
            }
            at += 1;
        }
        Ok(())
    }

    /// The document ended: how many elements there were.
    pub fn finish(self) -> Result<usize, ConfigError> {
        self.check_end()?;
        Ok(self.count)
    }

    /// The document ended: the document without the list's elements.
    pub fn into_head(self) -> Result<Vec<u8>, ConfigError> {
        self.check_end()?;
        Ok(self.head.unwrap_or_default())
    }

    fn check_end(&self) -> Result<(), ConfigError> {
        match self.stage {
            Stage::Done | Stage::TopLevel if self.element.is_none() => Ok(()),
            Stage::Start => Err(not_a_list_document()),
            _ => Err(ConfigError::at(
                "tokens",
                "the document ended inside the list",
            )),
        }
    }

    fn string_byte(&mut self, b: u8) {
        if let Some(element) = self.element.as_mut() {
            element.push(b);
        }
        if self.escaped {
            self.escaped = false;
        } else if b == b'\\' {
            self.escaped = true;
        } else if b == b'"' {
            self.in_string = false;
            if self.reading_key {
                self.reading_key = false;
                self.key_is_tokens = key_is_tokens(&self.key);
            }
            return;
        }
        if self.reading_key && self.key.len() < KEY_MAX {
            self.key.push(b);
        }
    }

    fn structural(
        &mut self,
        b: u8,
        each: &mut dyn FnMut(&[u8]) -> Result<(), ConfigError>,
    ) -> Result<(), ConfigError> {
        if is_json_whitespace(b) {
            if let Some(element) = self.element.as_mut() {
                element.push(b);
            }
            return Ok(());
        }
        // An element of the list ends at a comma or at the list's end, at the list's depth.
        if self.stage == Stage::Tokens && self.depth == 2 && matches!(b, b',' | b']') {
            match self.element.take() {
                Some(element) => {
                    each(&element)?;
                    self.count += 1;
                }
                // `[,`, `,,` or `,]`: a missing element.
                None if b == b',' || self.after_comma => {
                    return Err(ConfigError::at(
                        format!("tokens[{}]", self.count),
                        "expected a token, found a comma or the end of the list",
                    ))
                }
                None => {}
            }
            self.after_comma = b == b',';
            if b == b']' {
                self.depth = 1;
                self.stage = Stage::Done;
            }
            return Ok(());
        }
        if self.stage == Stage::Tokens && self.depth == 2 && self.element.is_none() {
            self.element = Some(Vec::with_capacity(512));
            self.after_comma = false;
        }
        if let Some(element) = self.element.as_mut() {
            element.push(b);
        }
        match b {
            b'"' if self.stage == Stage::TokensValue => return Err(not_a_list()),
            b'"' => {
                self.in_string = true;
                if self.depth == 1 && self.expect_key {
                    self.reading_key = true;
                    self.key.clear();
                }
            }
            b'{' | b'[' => {
                self.depth += 1;
                match self.stage {
                    Stage::Start if b == b'{' => {
                        self.stage = Stage::TopLevel;
                        self.expect_key = true;
                    }
                    Stage::Start => return Err(not_a_list_document()),
                    Stage::TokensValue if b == b'[' => self.stage = Stage::Tokens,
                    Stage::TokensValue => return Err(not_a_list()),
                    _ => {}
                }
            }
            b'}' | b']' => self.depth = self.depth.saturating_sub(1),
            b':' if self.depth == 1 => {
                self.expect_key = false;
                if self.key_is_tokens && self.stage == Stage::TopLevel {
                    self.stage = Stage::TokensValue;
                }
            }
            b',' if self.depth == 1 => {
                self.expect_key = true;
                self.key_is_tokens = false;
            }
            // A scalar where the list should be (`"tokens": null`).
            _ if self.stage == Stage::TokensValue => return Err(not_a_list()),
            _ => {}
        }
        Ok(())
    }
}

fn not_a_list_document() -> ConfigError {
    ConfigError::at(".", "a policy document is a JSON object")
}

/// The key's raw bytes (between the quotes) name `tokens`, escapes decoded as JSON does.
fn key_is_tokens(raw: &[u8]) -> bool {
    if !raw.contains(&b'\\') {
        return raw == b"tokens";
    }
    let mut quoted = Vec::with_capacity(raw.len() + 2);
    quoted.push(b'"');
    quoted.extend_from_slice(raw);
    quoted.push(b'"');
    serde_json::from_slice::<String>(&quoted).is_ok_and(|k| k == "tokens")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(doc: &str, piece: usize) -> Result<Vec<String>, ConfigError> {
        let mut splitter = TokenSplitter::default();
        let mut out = Vec::new();
        for chunk in doc.as_bytes().chunks(piece.max(1)) {
            splitter.feed(chunk, &mut |e| {
                out.push(String::from_utf8_lossy(e).trim().to_string());
                Ok(())
            })?;
        }
        let n = splitter.finish()?;
        assert_eq!(n, out.len());
        Ok(out)
    }

    #[test]
    fn elements_come_out_whole_whatever_the_pieces() {
        let doc = r#" {"version":1, "teams":[{"id":"t","tokens":[9]}], "tokens" : [
            {"id":"a","owner":"x, \"y\" ]}","rules":{"models":{"allow":["m-*"]}}},
            {"id":"b"} ,{}], "upstream_keys":[{"id":"k","sealed":"s"}]} "#;
        for piece in [1, 2, 3, 7, 64, 4096] {
            assert_eq!(
                split(doc, piece).unwrap(),
                vec![
                    r#"{"id":"a","owner":"x, \"y\" ]}","rules":{"models":{"allow":["m-*"]}}}"#,
                    r#"{"id":"b"}"#,
                    "{}"
                ],
                "pieces of {piece}"
            );
        }
    }

    #[test]
    fn only_the_top_level_tokens_list_counts() {
        assert_eq!(split(r#"{"tokens":[]}"#, 5).unwrap(), Vec::<String>::new());
        assert_eq!(split(r#"{"version":1}"#, 5).unwrap(), Vec::<String>::new());
        assert_eq!(
            split(r#"{"x":{"tokens":[1]},"y":"tokens","tokens":[2]}"#, 3).unwrap(),
            vec!["2"]
        );
        // An escaped key is the same key.
        assert_eq!(
            split(r#"{"tok\u0065ns":[{"id":"e"}]}"#, 4).unwrap(),
            vec![r#"{"id":"e"}"#]
        );
        assert_eq!(
            split(r#"{"tokens2":[1],"xtokens":[2]}"#, 4).unwrap(),
            Vec::<String>::new()
        );
    }

    #[test]
    fn the_head_is_the_document_with_an_empty_list() {
        let doc = r#" {"version":1, "tokens" : [ {"id":"a","x":"]"} , {"id":"b"} ], "teams":[]} "#;
        for piece in [1, 5, 4096] {
            let mut splitter = TokenSplitter::keeping_head();
            for chunk in doc.as_bytes().chunks(piece) {
                splitter.feed(chunk, &mut |_| Ok(())).unwrap();
            }
            let head = String::from_utf8(splitter.into_head().unwrap()).unwrap();
            assert_eq!(head, r#" {"version":1, "tokens" : [], "teams":[]} "#);
        }
        // Missing elements are errors, as in JSON.
        for doc in [
            r#"{"tokens":[,{"id":"a"}]}"#,
            r#"{"tokens":[{"id":"a"},]}"#,
            r#"{"tokens":[{"id":"a"},,{"id":"b"}]}"#,
        ] {
            let mut splitter = TokenSplitter::keeping_head();
            let fed = splitter.feed(doc.as_bytes(), &mut |_| Ok(()));
            assert!(fed.is_err() || splitter.into_head().is_err(), "{doc}");
        }
    }

    #[test]
    fn a_tokens_value_that_is_not_a_list_is_an_error() {
        for doc in [
            r#"{"tokens":null}"#,
            r#"{"tokens":{"a":1}}"#,
            r#"{"tokens":"x"}"#,
            r#"[1]"#,
            r#"{"tokens":[{"id":"a"}"#,
        ] {
            assert!(split(doc, 3).is_err(), "{doc}");
        }
    }
}
