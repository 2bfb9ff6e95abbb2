//! The shield token a client presents: `sk_shield_t_<id>_<secret>`.
//!
//! Layout (documented in the README):
//! - `sk_shield_t_`: fixed prefix, so secret scanners and humans recognise the token;
//! - `<id>`: the public token id, 1–32 characters of `[a-z0-9-]`, starting with a letter or
//!   digit. It never contains `_`, so the first `_` after the prefix ends it unambiguously;
//! - `<secret>`: 32 random bytes (256 bits) in unpadded base64url, exactly 43 characters.
//!
//! The id is what logs, stats and the CLI show. The secret is shown once, at minting.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

use crate::secret::SecretBytes;

pub const TOKEN_PREFIX: &str = "sk_shield_t_";
pub const MAX_ID_LEN: usize = 32;
pub const SECRET_BYTES: usize = 32;
pub const SECRET_TEXT_LEN: usize = 43;

/// A token as presented by a client, split but not yet verified.
#[derive(Debug)]
pub struct PresentedToken<'a> {
    pub id: &'a str,
    /// The secret's text form; kept as text because the digest is computed over it.
    secret: &'a [u8],
}

impl<'a> PresentedToken<'a> {
    pub fn secret_text(&self) -> &'a [u8] {
        self.secret
    }
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum TokenError {
    /// No credential at all.
    Missing,
    /// A credential that is not a well-formed shield token.
    Malformed,
}

/// Checks an operator-chosen token id.
pub fn validate_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_ID_LEN {
        return Err(format!("token id must be 1 to {MAX_ID_LEN} characters"));
    }
    let bytes = id.as_bytes();
    let first_ok = bytes
        .first()
        .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    let rest_ok = bytes
        .iter()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-');
    if !first_ok || !rest_ok {
        return Err(
            "token id may only use a-z, 0-9 and '-', and must start with a-z or 0-9".into(),
        );
    }
    Ok(())
}

/// Extracts the token from the raw `authorization` and `x-api-key` header values.
///
/// `Authorization: Bearer <token>` wins; `x-api-key` is accepted because some clients send keys
/// that way. Header bytes are taken as bytes: non-UTF-8 input is simply malformed.
pub fn from_headers<'a>(
    authorization: Option<&'a [u8]>,
    x_api_key: Option<&'a [u8]>,
) -> Result<PresentedToken<'a>, TokenError> {
    let credential = match (authorization, x_api_key) {
        (Some(auth), _) if !auth.is_empty() => bearer_value(auth).ok_or(TokenError::Malformed)?,
        (_, Some(key)) if !key.is_empty() => trim_ascii(key),
        _ => return Err(TokenError::Missing),
    };
    parse(credential)
}

fn bearer_value(header: &[u8]) -> Option<&[u8]> {
    let header = trim_ascii(header);
    let scheme = header.get(..7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    Some(trim_ascii(header.get(7..)?))
}

fn trim_ascii(mut b: &[u8]) -> &[u8] {
    while let [first, rest @ ..] = b {
        if first.is_ascii_whitespace() {
            b = rest;
        } else {
            break;
        }
    }
    while let [rest @ .., last] = b {
        if last.is_ascii_whitespace() {
            b = rest;
        } else {
            break;
        }
    }
    b
}

/// Parses `sk_shield_t_<id>_<secret>`.
pub fn parse(credential: &[u8]) -> Result<PresentedToken<'_>, TokenError> {
    let rest = credential
        .strip_prefix(TOKEN_PREFIX.as_bytes())
        .ok_or(TokenError::Malformed)?;
    let split = rest
        .iter()
        .position(|b| *b == b'_')
        .ok_or(TokenError::Malformed)?;
    let (id_bytes, secret_with_sep) = rest.split_at(split);
    let secret = secret_with_sep.get(1..).ok_or(TokenError::Malformed)?;
    let id = std::str::from_utf8(id_bytes).map_err(|_| TokenError::Malformed)?;
    validate_id(id).map_err(|_| TokenError::Malformed)?;
    let secret_ok = secret.len() == SECRET_TEXT_LEN
        && secret
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_');
    if !secret_ok {
        return Err(TokenError::Malformed);
    }
    Ok(PresentedToken { id, secret })
}

/// Builds the full token text from an id and fresh random secret bytes (CLI side).
pub fn format_token(id: &str, secret: &[u8; SECRET_BYTES]) -> (SecretBytes, SecretBytes) {
    let secret_text = URL_SAFE_NO_PAD.encode(secret);
    let full = format!("{TOKEN_PREFIX}{id}_{secret_text}");
    (
        SecretBytes::new(full.into_bytes()),
        SecretBytes::new(secret_text.into_bytes()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";

    fn tok(id: &str) -> String {
        format!("sk_shield_t_{id}_{SECRET}")
    }

    #[test]
    fn parses_bearer_and_x_api_key() {
        let t = tok("alice-1");
        let header = format!("Bearer {t}");
        let p = from_headers(Some(header.as_bytes()), None).unwrap();
        assert_eq!(p.id, "alice-1");
        assert_eq!(p.secret_text(), SECRET.as_bytes());
        let p = from_headers(None, Some(t.as_bytes())).unwrap();
        assert_eq!(p.id, "alice-1");
        let lower = format!("bearer   {t} ");
        assert_eq!(
            from_headers(Some(lower.as_bytes()), None).unwrap().id,
            "alice-1"
        );
    }

    #[test]
    fn secret_may_contain_underscores_and_dashes() {
        let secret = "_-_aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
        assert_eq!(secret.len(), SECRET_TEXT_LEN);
        let t = format!("sk_shield_t_bob_{secret}");
        let p = parse(t.as_bytes()).unwrap();
        assert_eq!(p.id, "bob");
        assert_eq!(p.secret_text(), secret.as_bytes());
    }

    #[test]
    fn missing_and_malformed() {
        assert_eq!(from_headers(None, None).unwrap_err(), TokenError::Missing);
        assert_eq!(
            from_headers(Some(b""), Some(b"")).unwrap_err(),
            TokenError::Missing
        );
        let cases: Vec<Vec<u8>> = vec![
            b"Basic abc".to_vec(),
            b"Bearer".to_vec(),
            b"Bearer ".to_vec(),
            b"Bearer abcdefghijklmnopqrstuvwxyz012345".to_vec(), // a real-looking Mistral key
            format!("Bearer sk_shield_t_{SECRET}").into_bytes(), // no id
            format!("Bearer sk_shield_t__{SECRET}").into_bytes(), // empty id
            format!("Bearer sk_shield_t_Alice_{SECRET}").into_bytes(), // uppercase id
            format!("Bearer sk_shield_t_alice_{}", &SECRET[1..]).into_bytes(), // short secret
            format!("Bearer sk_shield_t_alice_{SECRET}A").into_bytes(), // long secret
            format!("Bearer sk_shield_t_alice_{}=", &SECRET[1..]).into_bytes(), // bad char
            b"Bearer sk_shield_t_al\xffice_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA".to_vec(),
            format!("Bearer sk_shield_t_{}_{SECRET}", "a".repeat(33)).into_bytes(),
        ];
        for c in cases {
            assert_eq!(
                from_headers(Some(&c), None).unwrap_err(),
                TokenError::Malformed,
                "{}",
                String::from_utf8_lossy(&c)
            );
        }
    }

    #[test]
    fn format_then_parse_round_trips() {
        let (full, secret_text) = format_token("svc-7", &[9u8; SECRET_BYTES]);
        let p = parse(full.expose()).unwrap();
        assert_eq!(p.id, "svc-7");
        assert_eq!(p.secret_text(), secret_text.expose());
    }

    #[test]
    fn id_rules() {
        assert!(validate_id("a").is_ok());
        assert!(validate_id("0-team").is_ok());
        assert!(validate_id(&"a".repeat(32)).is_ok());
        for bad in ["", "-a", "a_b", "A", "a.b", "é"] {
            assert!(validate_id(bad).is_err(), "{bad}");
        }
        assert!(validate_id(&"a".repeat(33)).is_err());
    }
}
