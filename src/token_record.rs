//! The shared-data record of one token: `TokenPolicy` in compact binary.

use crate::codec::{Reader, Writer};
use crate::config::token_rules::rules_from_spec;
use crate::policy::TokenPolicy;

const RECORD_VERSION: u8 = 2;

pub fn encode(t: &TokenPolicy) -> Vec<u8> {
    let mut w = Writer::new(RECORD_VERSION);
    w.bytes(t.id.as_bytes())
        .raw(&t.digest)
        .u16(t.upstream_key)
        .bytes(t.owner.as_bytes())
        .u8(u8::from(t.revoked))
        .opt_i64(t.not_before)
        .opt_i64(t.expires_at)
        .bytes(t.team.as_deref().unwrap_or_default().as_bytes())
        .bytes(&t.rules.spec);
    w.finish()
}

pub fn decode(data: &[u8]) -> Option<TokenPolicy> {
    let mut r = Reader::new(data, RECORD_VERSION)?;
    let t = TokenPolicy {
        id: r.string()?,
        digest: r.raw::<32>()?,
        upstream_key: r.u16()?,
        owner: r.string()?,
        revoked: match r.u8()? {
            0 => false,
            1 => true,
            _ => return None,
        },
        not_before: r.opt_i64()?,
        expires_at: r.opt_i64()?,
        team: Some(r.string()?).filter(|t| !t.is_empty()),
        rules: rules_from_spec(r.bytes()?)?,
    };
    r.is_done().then_some(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_corruption() {
        let t = TokenPolicy {
            id: "alice".into(),
            digest: [7u8; 32],
            upstream_key: 3,
            owner: "alice@example.com".into(),
            revoked: true,
            not_before: Some(1_700_000_000),
            expires_at: None,
            team: Some("team.eng".into()),
            rules: Default::default(),
        };
        let bytes = encode(&t);
        assert_eq!(decode(&bytes), Some(t));
        assert_eq!(decode(&bytes[..bytes.len() - 1]), None);
        let mut extra = bytes.clone();
        extra.push(0);
        assert_eq!(decode(&extra), None);
        assert_eq!(decode(&[]), None);
    }
}
