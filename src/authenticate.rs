//! Step one of every request: who is this, and may that token be used at all right now?
//!
//! Order: parse → find the record by public id (O(1), one shared-data read) → verify the secret
//! (constant time) → status → validity window. The secret is verified before the status is
//! revealed, so only the holder of a token learns that it was revoked or expired.

use std::rc::Rc;

use crate::denial::Denial;
use crate::policy::TokenPolicy;
use crate::token::{self, TokenError};
use crate::verified_secrets::SecretCheck;

pub struct Credentials<'a> {
    pub authorization: Option<&'a [u8]>,
    pub x_api_key: Option<&'a [u8]>,
}

/// Why authentication failed, and the token's record when its secret did verify (a revoked,
/// expired or not-yet-valid token): its holder is known, so the refusal can be audited and
/// counted under the token.
#[derive(Debug)]
pub struct Refusal {
    pub denial: Denial,
    pub verified: Option<Rc<TokenPolicy>>,
}

impl From<Denial> for Refusal {
    fn from(denial: Denial) -> Self {
        Refusal {
            denial,
            verified: None,
        }
    }
}

/// `lookup` finds a token's record by public id (the glue reads it from shared data once per
/// worker and configuration, then serves it from a cache: records of one configuration never
/// change, a new policy is a new configuration).
pub fn authenticate(
    lookup: &dyn Fn(&str) -> Option<Rc<TokenPolicy>>,
    verifier: &dyn SecretCheck,
    credentials: &Credentials<'_>,
    now_unix: i64,
) -> Result<Rc<TokenPolicy>, Refusal> {
    let presented = token::from_headers(credentials.authorization, credentials.x_api_key).map_err(
        |e| match e {
            TokenError::Missing => Denial::TokenMissing,
            TokenError::Malformed => Denial::TokenMalformed,
        },
    )?;
    let record = lookup(presented.id).ok_or(Denial::TokenUnknown)?;
    if !verifier.verify(presented.id, presented.secret_text(), &record.digest) {
        return Err(Denial::TokenInvalid.into());
    }
    let refused = if record.revoked {
        Denial::TokenRevoked
    } else if record.not_before.is_some_and(|nbf| now_unix < nbf) {
        Denial::TokenNotYetValid
    } else if record.expires_at.is_some_and(|exp| now_unix >= exp) {
        Denial::TokenExpired
    } else {
        return Ok(record);
    };
    Err(Refusal {
        denial: refused,
        verified: Some(record),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Policy;
    use crate::policy_store;
    use crate::store::MemoryStore;
    use crate::token::format_token;
    use crate::token_digest::TokenVerifier;

    const FP: &str = "fp01";

    struct Fixture {
        store: MemoryStore,
        verifier: TokenVerifier,
        tokens: Vec<(String, String)>, // id -> full token text
    }

    fn fixture() -> Fixture {
        let verifier = TokenVerifier::new(&[9u8; 32]).unwrap();
        let mut tokens = Vec::new();
        let mut records = Vec::new();
        let specs: [(&str, bool, Option<i64>, Option<i64>); 4] = [
            ("ok", false, None, None),
            ("gone", true, None, None),
            ("old", false, None, Some(1_000)),
            ("soon", false, Some(5_000), None),
        ];
        for (n, (id, revoked, nbf, exp)) in specs.into_iter().enumerate() {
            let (full, secret) = format_token(id, &[n as u8 + 1; 32]);
            records.push(TokenPolicy {
                id: id.into(),
                digest: verifier.digest(id, secret.expose()),
                upstream_key: 0,
                owner: String::new(),
                revoked,
                not_before: nbf,
                expires_at: exp,
                team: None,
                rules: Default::default(),
            });
            tokens.push((
                id.to_string(),
                String::from_utf8(full.expose().to_vec()).unwrap(),
            ));
        }
        let store = MemoryStore::new();
        let policy = Policy {
            revision: 1,
            fingerprint: FP.into(),
            master_key_env: "K".into(),
            upstream_keys: vec![],
            tokens: records,
            teams: vec![],
            settings: Default::default(),
        };
        // The first configuration published into a fresh store is generation 1.
        assert_eq!(
            policy_store::publish(&store, &policy).unwrap().generation,
            1
        );
        Fixture {
            store,
            verifier,
            tokens,
        }
    }

    fn run(f: &Fixture, header: Option<&str>, now: i64) -> Result<String, Denial> {
        let creds = Credentials {
            authorization: header.map(str::as_bytes),
            x_api_key: None,
        };
        let lookup = |id: &str| policy_store::lookup(&f.store, 1, id).map(Rc::new);
        authenticate(&lookup, &f.verifier, &creds, now)
            .map(|t| t.id.clone())
            .map_err(|r| {
                // The record comes back exactly when the secret verified.
                let verified = matches!(
                    r.denial,
                    Denial::TokenRevoked | Denial::TokenExpired | Denial::TokenNotYetValid
                );
                assert_eq!(r.verified.is_some(), verified, "{:?}", r.denial);
                r.denial
            })
    }

    fn bearer(f: &Fixture, id: &str) -> String {
        let t = &f.tokens.iter().find(|(i, _)| i == id).unwrap().1;
        format!("Bearer {t}")
    }

    #[test]
    fn decision_table() {
        let f = fixture();
        let wrong_secret = bearer(&f, "ok").replace("_AQEB", "_AQEC");
        let unknown = bearer(&f, "ok").replace("t_ok_", "t_nobody_");
        let cases: Vec<(Option<String>, i64, Result<&str, Denial>)> = vec![
            (Some(bearer(&f, "ok")), 2_000, Ok("ok")),
            (None, 2_000, Err(Denial::TokenMissing)),
            (
                Some("Bearer nope".into()),
                2_000,
                Err(Denial::TokenMalformed),
            ),
            (Some(unknown), 2_000, Err(Denial::TokenUnknown)),
            (Some(wrong_secret), 2_000, Err(Denial::TokenInvalid)),
            (Some(bearer(&f, "gone")), 2_000, Err(Denial::TokenRevoked)),
            (Some(bearer(&f, "old")), 999, Ok("old")),
            (Some(bearer(&f, "old")), 1_000, Err(Denial::TokenExpired)),
            (
                Some(bearer(&f, "soon")),
                4_999,
                Err(Denial::TokenNotYetValid),
            ),
            (Some(bearer(&f, "soon")), 5_000, Ok("soon")),
        ];
        for (header, now, want) in cases {
            let got = run(&f, header.as_deref(), now);
            assert_eq!(
                got.as_deref().map_err(Clone::clone),
                want,
                "{header:?} at {now}"
            );
        }
    }

    #[test]
    fn a_digest_from_another_master_key_does_not_verify() {
        let f = fixture();
        let other = TokenVerifier::new(&[8u8; 32]).unwrap();
        let creds_text = bearer(&f, "ok");
        let creds = Credentials {
            authorization: Some(creds_text.as_bytes()),
            x_api_key: None,
        };
        let refused = authenticate(
            &|id: &str| policy_store::lookup(&f.store, 1, id).map(Rc::new),
            &other,
            &creds,
            0,
        )
        .unwrap_err();
        assert_eq!(refused.denial, Denial::TokenInvalid);
        assert!(refused.verified.is_none());
    }
}
