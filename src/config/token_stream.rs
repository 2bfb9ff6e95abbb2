//! Reading a policy document without holding its tokens: the rest of the document first (tokens
//! skipped), then the tokens one at a time. What the filter loads with: a 100,000-token policy
//! then costs a VM one piece of the document (`source`) and one token at a time, not the whole
//! document nor every token parsed and compiled at once (WebAssembly memory never shrinks, so a
//! VM's peak while loading stays).
//!
//! Two passes because JSON objects are unordered: tokens are compiled against the upstream keys
//! and teams, which may come after them.

use std::io::BufRead;

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

/// Reads the whole document once: everything but its tokens, and its fingerprint. The tokens
/// list's elements are skipped, not parsed (`for_each_token` parses each).
pub fn parse_head(source: &dyn PolicySource) -> Result<Head, ConfigError> {
    let mut fingerprint = Fingerprint::default();
    let mut splitter = TokenSplitter::keeping_head();
    {
        let mut reader = buffered(source, Some(&mut fingerprint));
        feed_all(&mut reader, &mut splitter, &mut |_| Ok(()))?;
    }
    // The document without its tokens is small: parsed with the field paths `raw::parse` gives.
    let policy = super::raw::parse(&splitter.into_head()?)?;
    Ok(Head {
        policy,
        fingerprint: fingerprint.finish(),
    })
}

/// Feeds a whole document to `splitter`, a piece at a time.
fn feed_all(
    reader: &mut dyn BufRead,
    splitter: &mut TokenSplitter,
    each: &mut dyn FnMut(&[u8]) -> Result<(), ConfigError>,
) -> Result<(), ConfigError> {
    loop {
        let piece = reader
            .fill_buf()
            .map_err(|e| ConfigError::at(".", e.to_string()))?;
        if piece.is_empty() {
            return Ok(());
        }
        let n = piece.len();
        splitter.feed(piece, each)?;
        reader.consume(n);
    }
}

/// Calls `each` with every token of the document, in order, with its index; stops at the first
/// error. Returns how many there were. Field errors name the token (`tokens[3].budget...`).
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
        // Nothing may follow the token before the next comma.
        de.end()
            .map_err(|e| ConfigError::at(format!("tokens[{index}]"), e.to_string()))?;
        each(index, token)?;
        index += 1;
        Ok(())
    };
    feed_all(&mut reader, &mut splitter, &mut on_element)?;
    splitter.finish()
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
        // Anything after a token but a comma is an error naming it (the fuzzer found this).
        let trailing = DOC.replace(r#""k"},"#, r#""k"} x,"#);
        let err = for_each_token(&trailing.as_bytes(), &mut |_, _| Ok(())).unwrap_err();
        assert!(err.to_string().starts_with("tokens[0]"), "{err}");
    }
}
