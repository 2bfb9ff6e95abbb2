//! Why a request is refused, and the Mistral-shaped local reply that says so.
//!
//! Bodies follow Mistral's documented error shape so official SDKs raise their normal error:
//! `{"object":"error","message":...,"type":...,"param":null,"code":"shield_..."}`. Messages never
//! contain the presented token or any secret.

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denial {
    TokenMissing,
    TokenMalformed,
    TokenUnknown,
    TokenInvalid,
    TokenRevoked,
    TokenExpired,
    TokenNotYetValid,
    /// The upstream key named by the token could not be used (fail closed).
    KeyUnavailable,
    /// The policy this worker was configured with is not readable in shared data.
    PolicyUnavailable,
}

impl Denial {
    pub fn status(&self) -> u32 {
        match self {
            Denial::TokenMissing
            | Denial::TokenMalformed
            | Denial::TokenUnknown
            | Denial::TokenInvalid
            | Denial::TokenRevoked
            | Denial::TokenExpired
            | Denial::TokenNotYetValid => 401,
            Denial::KeyUnavailable | Denial::PolicyUnavailable => 503,
        }
    }

    /// The stable machine-readable code; also the `reason` in stats.
    pub fn code(&self) -> &'static str {
        match self {
            Denial::TokenMissing => "shield_token_missing",
            Denial::TokenMalformed => "shield_token_malformed",
            Denial::TokenUnknown => "shield_token_unknown",
            Denial::TokenInvalid => "shield_token_invalid",
            Denial::TokenRevoked => "shield_token_revoked",
            Denial::TokenExpired => "shield_token_expired",
            Denial::TokenNotYetValid => "shield_token_not_yet_valid",
            Denial::KeyUnavailable => "shield_key_unavailable",
            Denial::PolicyUnavailable => "shield_policy_unavailable",
        }
    }

    pub fn error_type(&self) -> &'static str {
        match self.status() {
            401 => "authentication_error",
            503 => "server_error",
            _ => "invalid_request_error",
        }
    }

    pub fn message(&self) -> String {
        match self {
            Denial::TokenMissing => {
                "No API key provided. Send your ShieldKey token as 'Authorization: Bearer sk_shield_t_...'.".into()
            }
            Denial::TokenMalformed => "The API key is not a well-formed ShieldKey token.".into(),
            Denial::TokenUnknown | Denial::TokenInvalid => "Invalid API key.".into(),
            Denial::TokenRevoked => "This ShieldKey token has been revoked.".into(),
            Denial::TokenExpired => "This ShieldKey token has expired.".into(),
            Denial::TokenNotYetValid => "This ShieldKey token is not valid yet.".into(),
            Denial::KeyUnavailable => "The gateway cannot use its upstream key right now.".into(),
            Denial::PolicyUnavailable => "The gateway policy is reloading; retry shortly.".into(),
        }
    }

    /// Extra response headers (e.g. `retry-after`).
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        match self {
            Denial::PolicyUnavailable => vec![("retry-after", "1".into())],
            _ => Vec::new(),
        }
    }

    pub fn body(&self) -> Vec<u8> {
        let body = serde_json::json!({
            "object": "error",
            "message": self.message(),
            "type": self.error_type(),
            "param": null,
            "code": self.code(),
        });
        body.to_string().into_bytes()
    }

    /// Every denial, for defining one stat per reason up front.
    pub const ALL_CODES: &'static [&'static str] = &[
        "shield_token_missing",
        "shield_token_malformed",
        "shield_token_unknown",
        "shield_token_invalid",
        "shield_token_revoked",
        "shield_token_expired",
        "shield_token_not_yet_valid",
        "shield_key_unavailable",
        "shield_policy_unavailable",
    ];
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_mistral_shaped() {
        let d = Denial::TokenRevoked;
        let v: serde_json::Value = serde_json::from_slice(&d.body()).unwrap();
        assert_eq!(v["object"], "error");
        assert_eq!(v["type"], "authentication_error");
        assert_eq!(v["code"], "shield_token_revoked");
        assert!(v["param"].is_null());
        assert_eq!(d.status(), 401);
        assert_eq!(Denial::KeyUnavailable.status(), 503);
    }

    #[test]
    fn every_code_is_listed_for_stats() {
        for d in [
            Denial::TokenMissing,
            Denial::TokenMalformed,
            Denial::TokenUnknown,
            Denial::TokenInvalid,
            Denial::TokenRevoked,
            Denial::TokenExpired,
            Denial::TokenNotYetValid,
            Denial::KeyUnavailable,
            Denial::PolicyUnavailable,
        ] {
            assert!(Denial::ALL_CODES.contains(&d.code()), "{}", d.code());
        }
    }
}
