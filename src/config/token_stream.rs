//! Reading a policy document without holding its tokens: the rest of the document first (tokens
//! skipped), then the tokens one at a time. What the filter loads with: a 100,000-token policy
//! then costs a VM one piece of the document (`source`) and one token at a time, not the whole
//! document nor every token parsed and compiled at once (WebAssembly memory never shrinks, so a
//! VM's peak while loading stays).
//!
//! Two passes because JSON objects are unordered: tokens are compiled against the upstream keys
//! and teams, which may come after them.

use std::fmt;
use std::io::{self, BufRead};

use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::{Map, Value};

use super::raw::{RawPolicy, RawToken};
use super::source::{buffered, Fingerprint, PolicySource};
use super::token_split::TokenSplitter;
use super::ConfigError;

/// A document without its tokens, and the fingerprint of all its bytes.
#[derive(Debug)]
pub struct Head {
    /// The document with `tokens` empty, validated as `raw::parse` validates.
    pub policy: RawPolicy,
    pub fingerprint: String,
}

/// Reads the whole document once: everything but its tokens, and its fingerprint.
pub fn parse_head(source: &dyn PolicySource) -> Result<Head, ConfigError> {
    let syntax = |e: serde_json::Error| ConfigError::at(".", e.to_string());
    let mut fingerprint = Fingerprint::default();
    let rest = {
        let mut reader = buffered(source, Some(&mut fingerprint));
        let mut de = serde_json::Deserializer::from_reader(&mut reader);
        let rest = de.deserialize_map(HeadVisitor).map_err(syntax)?;
        de.end().map_err(syntax)?;
        // Whatever the parser did not need still belongs to the fingerprint.
        io::copy(&mut reader, &mut io::sink()).map_err(|e| ConfigError::at(".", e.to_string()))?;
        rest
    };
    let mut head = serde_json::to_vec(&Value::Object(rest))
        .map_err(|e| ConfigError::at(".", e.to_string()))?;
    // The document without `tokens` is small: parsed with the field paths `raw::parse` gives.
    let policy = super::raw::parse(&head)?;
    head.clear();
    Ok(Head {
        policy,
        fingerprint: fingerprint.finish(),
    })
}

/// Calls `each` with every token of the document, in order, with its index; stops at the first
/// error. Returns how many there were. Field errors name the token (`tokens[3].budget...`).
/// Expects a document `parse_head` accepted (well-formed JSON).
pub fn for_each_token(
    source: &dyn PolicySource,
    each: &mut dyn FnMut(usize, RawToken) -> Result<(), ConfigError>,
) -> Result<usize, ConfigError> {
    let mut reader = buffered(source, None);
    let mut splitter = TokenSplitter::default();
    let mut index = 0;
    let mut on_element = |bytes: &[u8]| -> Result<(), ConfigError> {
        let mut de = serde_json::Deserializer::from_slice(bytes);
        let token = serde_path_to_error::deserialize::<_, RawToken>(&mut de).map_err(|e| {
            let path = e.path().to_string();
            let at = if path == "." {
                format!("tokens[{index}]")
            } else {
                format!("tokens[{index}].{path}")
            };
            ConfigError::at(at, e.into_inner().to_string())
        })?;
        each(index, token)?;
        index += 1;
        Ok(())
    };
    loop {
        let piece = reader
            .fill_buf()
            .map_err(|e| ConfigError::at(".", e.to_string()))?;
        if piece.is_empty() {
            break;
        }
        let n = piece.len();
        splitter.feed(piece, &mut on_element)?;
        reader.consume(n);
    }
    splitter.finish()
}

/// Collects every top-level field but `tokens` (skipped, its syntax still checked).
struct HeadVisitor;

impl<'de> Visitor<'de> for HeadVisitor {
    type Value = Map<String, Value>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a policy document (a JSON object)")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = Map::new();
        let mut tokens_seen = false;
        while let Some(key) = map.next_key::<String>()? {
            if key == "tokens" {
                if tokens_seen {
                    return Err(serde::de::Error::duplicate_field("tokens"));
                }
                tokens_seen = true;
                map.next_value::<IgnoredAny>()?;
            } else if out.contains_key(&key) {
                return Err(serde::de::Error::custom(format!("duplicate field `{key}`")));
            } else {
                let value = map.next_value::<Value>()?;
                out.insert(key, value);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::raw;

    const DOC: &str = r#"{"version":1,"tokens":[
        {"id":"a","digest":"x","upstream_key":"k"},
        {"id":"b","digest":"y","upstream_key":"k","team":"t"}],
        "upstream_keys":[{"id":"k","sealed":"s"}],"teams":[{"id":"t"}]}"#;

    #[test]
    fn the_head_is_the_document_without_its_tokens() {
        let head = parse_head(&DOC.as_bytes()).unwrap();
        assert_eq!(head.fingerprint, Fingerprint::of(DOC.as_bytes()));
        let head = head.policy;
        let mut whole = raw::parse(DOC.as_bytes()).unwrap();
        let tokens = std::mem::take(&mut whole.tokens);
        assert_eq!(head, whole);
        let mut seen = Vec::new();
        let n = for_each_token(&DOC.as_bytes(), &mut |i, t| {
            seen.push((i, t));
            Ok(())
        })
        .unwrap();
        assert_eq!(n, 2);
        assert_eq!(seen.into_iter().map(|(_, t)| t).collect::<Vec<_>>(), tokens);
    }

    #[test]
    fn a_compressed_document_reads_as_its_json() {
        let packed = crate::config::source::compress(DOC.as_bytes());
        let head = parse_head(&packed).unwrap();
        assert_eq!(head.policy, parse_head(&DOC.as_bytes()).unwrap().policy);
        assert_eq!(head.fingerprint, Fingerprint::of(&packed));
        let mut ids = Vec::new();
        let n = for_each_token(&packed, &mut |_, t| {
            ids.push(t.id);
            Ok(())
        })
        .unwrap();
        assert_eq!((n, ids), (2, vec!["a".to_string(), "b".to_string()]));
        let err = parse_head(&packed[..packed.len() - 3].to_vec()).unwrap_err();
        assert!(err.to_string().contains("truncated"), "{err}");
    }

    #[test]
    fn errors_name_the_token_and_stop() {
        let bad = DOC.replace(
            r#""id":"b","digest""#,
            r#""id":"b","colour":"red","digest""#,
        );
        let err = for_each_token(&bad.as_bytes(), &mut |_, _| Ok(()))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("tokens[1]"), "{err}");
        assert!(err.contains("colour"), "{err}");
        let mut calls = 0;
        let err = for_each_token(&DOC.as_bytes(), &mut |i, _| {
            calls += 1;
            Err(ConfigError::at(format!("tokens[{i}].team"), "no such team"))
        })
        .unwrap_err()
        .to_string();
        assert_eq!(calls, 1);
        assert!(err.starts_with("tokens[0].team"), "{err}");
        // The head refuses what raw::parse refuses, tokens apart.
        for doc in [
            r#"{"version":1,"tokens":[],"tokens":[]}"#,
            r#"{"version":1,"extra":1}"#,
            r#"{"version":1,"tokens":[1,]}"#,
            r#"[1]"#,
            r#"{"version":1} x"#,
        ] {
            assert!(parse_head(&doc.as_bytes()).is_err(), "{doc}");
        }
        assert!(parse_head(&&br#"{"tokens":[{"anything":1}],"version":1}"#[..]).is_ok());
    }
}
