//! Policy parsing and compilation: never panics, an error never echoes a sealed upstream key, a
//! parsed policy survives a serialize/parse round trip, and a policy that compiles with the
//! master key (keys opened) also compiles without it (format only). The filter's streamed reading
//! (`token_stream`, plain or zlib-compressed, its tokens split out one at a time) agrees with
//! `raw::parse`, and decoding any bytes as a compressed configuration never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shieldkey::config::compile::{compile_bytes, CompileOptions};
use shieldkey::config::{raw, source, token_stream};
use shieldkey::master_key::MasterKey;
use shieldkey_fuzz::J;

/// The master key the seed corpus's sealed keys were sealed under (as in src/config/tests.rs).
const MASTER: [u8; 32] = [7u8; 32];
/// Shorter values are too likely to occur in an error message by chance (a path, a word).
const MIN_SECRET_LEN: usize = 12;

/// The `sealed` strings of `upstream_keys[*]` in the first JSON value of the input, minus those
/// that also appear in some other string, key or number of the document (an error may quote
/// those legitimately: an id, an unknown field name).
fn sealed_values(data: &[u8]) -> Vec<String> {
    let Some(Ok(doc)) = serde_json::Deserializer::from_slice(data)
        .into_iter::<J>()
        .next()
    else {
        return Vec::new();
    };
    let mut sealed = Vec::new();
    let mut others = Vec::new();
    for (key, value) in doc.members() {
        if key == "upstream_keys" {
            if let J::Arr(entries) = value {
                for entry in entries {
                    for (k, v) in entry.members() {
                        match (k.as_str(), v) {
                            ("sealed", J::Str(s)) => sealed.push(s.clone()),
                            _ => {
                                others.push(k.clone());
                                v.texts(&mut others);
                            }
                        }
                    }
                    if !matches!(entry, J::Obj(_)) {
                        entry.texts(&mut others);
                    }
                }
                continue;
            }
        }
        others.push(key.clone());
        value.texts(&mut others);
    }
    sealed.retain(|s| s.len() >= MIN_SECRET_LEN && !others.iter().any(|o| o.contains(s.as_str())));
    sealed
}

fuzz_target!(|data: &[u8]| {
    let parsed = raw::parse(data);
    let offline = compile_bytes(data, &CompileOptions { master_key: None });
    let master = MasterKey::from_bytes(&MASTER).expect("32 bytes");
    let online = compile_bytes(
        data,
        &CompileOptions {
            master_key: Some(&master),
        },
    );

    if parsed.is_err() {
        assert!(
            offline.is_err() && online.is_err(),
            "compiled what does not parse"
        );
    }
    if let Ok(raw_policy) = &parsed {
        // What the CLI writes back reads the same.
        let text = serde_json::to_vec(raw_policy).expect("a RawPolicy serializes");
        let again = raw::parse(&text).unwrap_or_else(|e| panic!("re-parse failed: {e}"));
        assert_eq!(&again, raw_policy);
    }
    match (&online, &offline) {
        (Ok(with_keys), Ok(without_keys)) => {
            assert_eq!(with_keys.tokens, without_keys.tokens);
            assert_eq!(with_keys.revision, without_keys.revision);
            assert_eq!(with_keys.fingerprint, without_keys.fingerprint);
            assert!(with_keys
                .upstream_keys
                .iter()
                .all(|k| k.authorization.is_some()));
            assert!(without_keys
                .upstream_keys
                .iter()
                .all(|k| k.authorization.is_none()));
        }
        (Ok(_), Err(e)) => panic!("opens with the master key but fails the format check: {e}"),
        _ => {}
    }

    let head = token_stream::parse_head(&data);
    if let Ok(whole) = &parsed {
        let mut without_tokens = whole.clone();
        without_tokens.tokens.clear();
        match &head {
            Ok(h) => assert_eq!(h.policy, without_tokens),
            Err(e) => panic!("parses whole but not streamed: {e}"),
        }
        let mut tokens = Vec::new();
        let count = token_stream::for_each_token(&data, &mut |_, t| {
            tokens.push(t);
            Ok(())
        })
        .unwrap_or_else(|e| panic!("parses whole but its tokens do not stream: {e}"));
        assert_eq!(count, tokens.len());
        assert_eq!(tokens, whole.tokens);
    }
    if head.is_ok() {
        // What the publishing VM accepts (the head, then every token), the whole-document parser
        // accepts too: the streamed reading is never laxer.
        let streamed = token_stream::for_each_token(&data, &mut |_, _| Ok(()));
        if let Ok(count) = streamed {
            match &parsed {
                Ok(whole) => assert_eq!(count, whole.tokens.len()),
                Err(e) => panic!("streamed reading accepted what raw::parse refuses: {e}"),
            }
        }
    }
    let packed = source::compress(data);
    let packed_head = token_stream::parse_head(&packed);
    match (&head, &packed_head) {
        (Ok(a), Ok(b)) => assert_eq!(a.policy, b.policy),
        (Err(_), Err(_)) => {}
        _ => panic!("the compressed document reads differently"),
    }
    let _ = source::decode(data);
    let _ = token_stream::parse_head(&data.get(..data.len() / 2).unwrap_or_default());

    let secrets = sealed_values(data);
    for err in [offline.err(), online.err(), parsed.err()]
        .into_iter()
        .flatten()
    {
        let shown = err.to_string();
        for s in &secrets {
            assert!(
                !shown.contains(s.as_str()),
                "error echoes a sealed value: {shown}"
            );
        }
    }
});
