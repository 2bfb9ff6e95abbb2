//! Shield token parsing: `token::parse` and `token::from_headers` never panic, and whatever they
//! accept is exactly `sk_shield_t_<id>_<secret>` with the id and secret taken from the input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shieldkey::token::{self, PresentedToken, SECRET_TEXT_LEN, TOKEN_PREFIX};
use shieldkey_fuzz::is_subslice;

/// Checks an accepted token against the credential it was parsed from.
fn check_accepted(credential: &[u8], t: &PresentedToken<'_>) {
    let id = t.id.as_bytes();
    let secret = t.secret_text();
    assert!(
        is_subslice(credential, id),
        "id is not taken from the input"
    );
    assert!(
        is_subslice(credential, secret),
        "secret is not taken from the input"
    );
    assert!(credential.starts_with(TOKEN_PREFIX.as_bytes()));
    let mut rebuilt = TOKEN_PREFIX.as_bytes().to_vec();
    rebuilt.extend_from_slice(id);
    rebuilt.push(b'_');
    rebuilt.extend_from_slice(secret);
    assert_eq!(rebuilt, credential, "the whole credential is the token");
    assert!(
        token::validate_id(t.id).is_ok(),
        "accepted an invalid id {:?}",
        t.id
    );
    assert_eq!(secret.len(), SECRET_TEXT_LEN);
    assert!(secret
        .iter()
        .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_'));
}

fn trim(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &b[start..end]
}

fuzz_target!(|data: &[u8]| {
    // The input as a bare credential.
    if let Ok(t) = token::parse(data) {
        check_accepted(data, &t);
    }

    // The input as header values: before the first NUL the `authorization` value, after it the
    // `x-api-key` value (NUL cannot occur in an HTTP header, so it is a safe separator).
    let (auth, key) = match data.iter().position(|b| *b == 0) {
        Some(i) => (&data[..i], Some(&data[i + 1..])),
        None => (data, None),
    };
    for (a, k) in [
        (Some(auth), key),
        (None, Some(auth)),
        (Some(auth), None),
        (None, key),
    ] {
        match token::from_headers(a, k) {
            Ok(t) => {
                // The token comes from the header that wins: a non-empty authorization, else the key.
                let winner = match a {
                    Some(a) if !a.is_empty() => a,
                    _ => k.expect("a token was found, so some header was given"),
                };
                assert!(is_subslice(winner, t.id.as_bytes()));
                assert!(is_subslice(winner, t.secret_text()));
                // The credential is the trimmed header (after `Bearer ` for authorization).
                let credential = if a.is_some_and(|a| !a.is_empty()) {
                    let h = trim(winner);
                    assert!(h.len() >= 7 && h[..7].eq_ignore_ascii_case(b"bearer "));
                    trim(&h[7..])
                } else {
                    trim(winner)
                };
                check_accepted(credential, &t);
                // Same answer as parsing the credential directly.
                let direct = token::parse(credential).expect("from_headers accepted it");
                assert_eq!(direct.id, t.id);
                assert_eq!(direct.secret_text(), t.secret_text());
            }
            Err(token::TokenError::Missing) => {
                assert!(a.is_none_or(<[u8]>::is_empty) && k.is_none_or(<[u8]>::is_empty));
            }
            Err(token::TokenError::Malformed) => {}
        }
    }

    // Minting round-trips: any valid id with any 32 secret bytes parses back to itself.
    if data.len() >= 32 {
        let (secret, rest) = data.split_at(32);
        let secret: [u8; 32] = secret.try_into().expect("32 bytes");
        if let Ok(id) = std::str::from_utf8(rest) {
            if token::validate_id(id).is_ok() {
                let (full, text) = token::format_token(id, &secret);
                let t = token::parse(full.expose()).expect("a minted token parses");
                assert_eq!(t.id, id);
                assert_eq!(t.secret_text(), text.expose());
            }
        }
    }
});
