//! Logging in to the console: a one-time login secret printed at start (consumed by the first
//! login that uses it; a fresh one is then printed for the next login), or a configured password
//! (`SHIELDKEY_CONSOLE_PASSWORD`, reusable). Compared in constant time; with a password,
//! repeated failures lock logins out for a while (a one-time secret, 256 random bits, cannot be
//! guessed, and a lockout would only let anyone who reaches the port keep the operator out).
//! Nothing here ever logs or returns what was typed.

use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use sha2::{Digest, Sha256};

use super::super::error::CliError;
use super::super::random;
use crate::secret::SecretBytes;

/// Failed logins in a row before logins are locked out.
pub const MAX_FAILURES: u32 = 5;
/// How long a lockout lasts.
pub const LOCKOUT: Duration = Duration::from_secs(30);
/// Random bytes of a login secret (and of session ids and CSRF tokens).
pub const SECRET_BYTES: usize = 32;

/// A fresh random value: `SECRET_BYTES` from the OS, base64url without padding.
pub fn random_text() -> Result<String, CliError> {
    let mut bytes = [0u8; SECRET_BYTES];
    random::fill(&mut bytes)?;
    let text = URL_SAFE_NO_PAD.encode(bytes);
    crate::secret::wipe(&mut bytes);
    Ok(text)
}

/// Equality of two secrets in time that depends on neither their content nor their lengths:
/// both are hashed, and the hashes compared without an early exit.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let (ha, hb) = (Sha256::digest(a), Sha256::digest(b));
    ha.iter()
        .zip(hb.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// What lets an operator in.
pub enum Credential {
    /// The current one-time login secret (`None` only while none could be made).
    OneTime(Option<SecretBytes>),
    /// A configured password, reusable.
    Password(SecretBytes),
}

/// How a login attempt ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Attempt {
    /// In. With a one-time secret, the next login's secret (to print where the first was).
    Granted { next_secret: Option<String> },
    /// Wrong; `failures` in a row so far; `locked`: this failure started a lockout.
    Refused { failures: u32, locked: bool },
    /// Locked out: nothing was compared; try again after this long.
    LockedOut { retry_after: Duration },
}

/// The credential and the failures counted against it.
pub struct LoginGate {
    credential: Credential,
    failures: u32,
    locked_until: Option<Instant>,
}

impl LoginGate {
    pub fn new(credential: Credential) -> LoginGate {
        LoginGate {
            credential,
            failures: 0,
            locked_until: None,
        }
    }

    pub fn is_password(&self) -> bool {
        matches!(self.credential, Credential::Password(_))
    }

    /// Checks `given`; `fresh` makes the next one-time secret after a one-time secret is used.
    pub fn attempt(
        &mut self,
        given: &[u8],
        now: Instant,
        fresh: impl FnOnce() -> Result<String, CliError>,
    ) -> Attempt {
        if let Some(until) = self.locked_until {
            if now < until {
                return Attempt::LockedOut {
                    retry_after: until - now,
                };
            }
            self.locked_until = None;
            self.failures = 0;
        }
        let matches = match &self.credential {
            Credential::OneTime(Some(secret)) | Credential::Password(secret) => {
                // Checked even for empty input, so every attempt costs the same.
                constant_time_eq(secret.expose(), given) && !given.is_empty()
            }
            Credential::OneTime(None) => false,
        };
        if !matches {
            self.failures = self.failures.saturating_add(1);
            let locked = self.is_password() && self.failures >= MAX_FAILURES;
            if locked {
                self.locked_until = Some(now + LOCKOUT);
            }
            return Attempt::Refused {
                failures: self.failures,
                locked,
            };
        }
        self.failures = 0;
        let next_secret = match &mut self.credential {
            Credential::Password(_) => None,
            Credential::OneTime(current) => {
                // Consumed: the secret just used never works again.
                *current = None;
                match fresh() {
                    Ok(next) => {
                        *current = Some(SecretBytes::new(next.clone().into_bytes()));
                        Some(next)
                    }
                    Err(_) => None,
                }
            }
        };
        Attempt::Granted { next_secret }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one_time(secret: &str) -> LoginGate {
        LoginGate::new(Credential::OneTime(Some(SecretBytes::new(
            secret.as_bytes().to_vec(),
        ))))
    }

    #[test]
    fn constant_time_equality() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(!constant_time_eq(b"", b"a"));
    }

    #[test]
    fn a_one_time_secret_is_consumed_by_the_first_login() {
        let mut gate = one_time("first");
        let now = Instant::now();
        assert_eq!(
            gate.attempt(b"first", now, || Ok("second".to_string())),
            Attempt::Granted {
                next_secret: Some("second".to_string())
            }
        );
        // The first secret never works again; the new one does, once.
        assert!(matches!(
            gate.attempt(b"first", now, || Ok("x".to_string())),
            Attempt::Refused { failures: 1, .. }
        ));
        assert!(matches!(
            gate.attempt(b"second", now, || Ok("third".to_string())),
            Attempt::Granted { .. }
        ));
        assert!(matches!(
            gate.attempt(b"second", now, || Ok("x".to_string())),
            Attempt::Refused { .. }
        ));
    }

    #[test]
    fn a_password_is_reusable_and_empty_input_never_matches() {
        let mut gate = LoginGate::new(Credential::Password(SecretBytes::new(b"pw".to_vec())));
        let now = Instant::now();
        for _ in 0..3 {
            assert_eq!(
                gate.attempt(b"pw", now, || Ok("unused".to_string())),
                Attempt::Granted { next_secret: None }
            );
        }
        assert!(matches!(
            gate.attempt(b"", now, || Ok(String::new())),
            Attempt::Refused { .. }
        ));
        let mut none = LoginGate::new(Credential::OneTime(None));
        assert!(matches!(
            none.attempt(b"", now, || Ok(String::new())),
            Attempt::Refused { .. }
        ));
    }

    /// Wrong attempts `failures` (counted from 1) refused without a lockout.
    fn refused_without_lockout(
        gate: &mut LoginGate,
        failures: std::ops::RangeInclusive<u32>,
        now: Instant,
    ) {
        for n in failures {
            assert_eq!(
                gate.attempt(b"wrong", now, || Ok(String::new())),
                Attempt::Refused {
                    failures: n,
                    locked: false
                }
            );
        }
    }

    #[test]
    fn failures_never_lock_out_a_one_time_secret() {
        let mut gate = one_time("right");
        let start = Instant::now();
        refused_without_lockout(&mut gate, 1..=3 * MAX_FAILURES, start);
        assert!(matches!(
            gate.attempt(b"right", start, || Ok("next".to_string())),
            Attempt::Granted { .. }
        ));
    }

    #[test]
    fn failures_lock_password_logins_out_even_for_the_right_password() {
        let mut gate = LoginGate::new(Credential::Password(SecretBytes::new(b"right".to_vec())));
        let start = Instant::now();
        refused_without_lockout(&mut gate, 1..=MAX_FAILURES - 1, start);
        assert_eq!(
            gate.attempt(b"wrong", start, || Ok(String::new())),
            Attempt::Refused {
                failures: MAX_FAILURES,
                locked: true
            }
        );
        // Locked: the right secret is not even compared.
        let later = start + Duration::from_secs(10);
        assert_eq!(
            gate.attempt(b"right", later, || Ok(String::new())),
            Attempt::LockedOut {
                retry_after: LOCKOUT - Duration::from_secs(10)
            }
        );
        // After the lockout the count starts over and the secret still works.
        let after = start + LOCKOUT;
        assert!(matches!(
            gate.attempt(b"right", after, || Ok("next".to_string())),
            Attempt::Granted { .. }
        ));
    }

    #[test]
    fn random_values_are_long_and_distinct() {
        let (a, b) = (random_text().unwrap(), random_text().unwrap());
        assert_eq!(a.len(), 43);
        assert_ne!(a, b);
        assert!(a
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'));
    }
}
