//! Console sessions, kept in memory only: a random id (the cookie), a CSRF token for the forms
//! of that session, the flash message of the last action, and the mint forms handed out (each
//! can be submitted once). Sessions end after `IDLE` without a request, after `MAX_AGE` in any
//! case, or at logout.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::auth::constant_time_eq;

/// A session unused this long is gone.
pub const IDLE: Duration = Duration::from_secs(8 * 3600);
/// No session lives longer than this.
pub const MAX_AGE: Duration = Duration::from_secs(24 * 3600);
/// The cookie that carries the session id.
pub const COOKIE: &str = "shieldkey_console";
/// Mint forms remembered per session (older ones can no longer be submitted).
const MAX_MINT_FORMS: usize = 16;

/// How a flash message looks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlashKind {
    Ok,
    Warn,
    Error,
}

/// A message shown once, on the next page of the session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flash {
    pub kind: FlashKind,
    pub lines: Vec<String>,
}

#[derive(Debug)]
pub struct Session {
    pub csrf: String,
    created: Instant,
    last_seen: Instant,
    flash: Option<Flash>,
    mint_forms: Vec<String>,
}

impl Session {
    /// Whether `given` is this session's CSRF token (constant time).
    pub fn csrf_ok(&self, given: &str) -> bool {
        constant_time_eq(self.csrf.as_bytes(), given.as_bytes())
    }

    pub fn set_flash(&mut self, flash: Flash) {
        self.flash = Some(flash);
    }

    pub fn take_flash(&mut self) -> Option<Flash> {
        self.flash.take()
    }

    /// Remembers a mint form handed out.
    pub fn add_mint_form(&mut self, id: String) {
        if self.mint_forms.len() >= MAX_MINT_FORMS {
            self.mint_forms.remove(0);
        }
        self.mint_forms.push(id);
    }

    /// Consumes a mint form: `true` the first time, never again.
    pub fn use_mint_form(&mut self, id: &str) -> bool {
        match self
            .mint_forms
            .iter()
            .position(|f| constant_time_eq(f.as_bytes(), id.as_bytes()))
        {
            Some(i) => {
                self.mint_forms.remove(i);
                true
            }
            None => false,
        }
    }

    fn expired(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.last_seen) >= IDLE
            || now.saturating_duration_since(self.created) >= MAX_AGE
    }
}

#[derive(Debug, Default)]
pub struct Sessions {
    map: HashMap<String, Session>,
}

impl Sessions {
    /// A new session with id `id` and CSRF token `csrf` (both random, from the caller).
    pub fn create(&mut self, id: String, csrf: String, now: Instant) {
        self.sweep(now);
        self.map.insert(
            id,
            Session {
                csrf,
                created: now,
                last_seen: now,
                flash: None,
                mint_forms: Vec::new(),
            },
        );
    }

    /// The live session with this id, marked as used now; an expired one is removed.
    pub fn get(&mut self, id: &str, now: Instant) -> Option<&mut Session> {
        if self.map.get(id).is_some_and(|s| s.expired(now)) {
            self.map.remove(id);
        }
        let session = self.map.get_mut(id)?;
        session.last_seen = now;
        Some(session)
    }

    pub fn remove(&mut self, id: &str) {
        self.map.remove(id);
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.map.len()
    }

    fn sweep(&mut self, now: Instant) {
        self.map.retain(|_, s| !s.expired(now));
    }
}

/// The session id from a `Cookie` header value, if any.
pub fn id_from_cookies(header: &str) -> Option<&str> {
    header.split(';').find_map(|pair| {
        let (name, value) = pair.trim().split_once('=')?;
        (name == COOKIE && !value.is_empty()).then_some(value)
    })
}

/// The `Set-Cookie` value for a new session; `secure` when the console is reached over TLS.
pub fn cookie(id: &str, secure: bool) -> String {
    format!(
        "{COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/{}",
        if secure { "; Secure" } else { "" }
    )
}

/// The `Set-Cookie` value that removes the session cookie.
pub fn cleared_cookie(secure: bool) -> String {
    format!(
        "{COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0{}",
        if secure { "; Secure" } else { "" }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_expire_when_idle_or_too_old_and_end_at_logout() {
        let mut sessions = Sessions::default();
        let t0 = Instant::now();
        sessions.create("a".into(), "csrf-a".into(), t0);
        assert!(sessions.get("a", t0 + IDLE / 2).is_some());
        // Used half-way: idle time counts from then.
        assert!(sessions.get("a", t0 + IDLE).is_some());
        assert!(sessions
            .get("a", t0 + IDLE * 2 + Duration::from_secs(1))
            .is_none());
        assert_eq!(sessions.len(), 0);

        sessions.create("b".into(), "csrf-b".into(), t0);
        let mut t = t0;
        while t < t0 + MAX_AGE - IDLE {
            t += IDLE / 2;
            assert!(sessions.get("b", t).is_some());
        }
        assert!(sessions.get("b", t0 + MAX_AGE).is_none());

        sessions.create("c".into(), "csrf-c".into(), t0);
        sessions.remove("c");
        assert!(sessions.get("c", t0).is_none());
        assert!(sessions.get("unknown", t0).is_none());
    }

    #[test]
    fn csrf_tokens_and_mint_forms() {
        let mut sessions = Sessions::default();
        let now = Instant::now();
        sessions.create("s".into(), "the-token".into(), now);
        let s = sessions.get("s", now).unwrap();
        assert!(s.csrf_ok("the-token"));
        assert!(!s.csrf_ok("the-tokem") && !s.csrf_ok("") && !s.csrf_ok("the-token "));

        s.add_mint_form("f1".into());
        assert!(s.use_mint_form("f1"));
        assert!(!s.use_mint_form("f1"), "a mint form is used once");
        assert!(!s.use_mint_form("forged"));
        for n in 0..=MAX_MINT_FORMS {
            s.add_mint_form(format!("g{n}"));
        }
        assert!(!s.use_mint_form("g0"), "the oldest forms are forgotten");
        assert!(s.use_mint_form(&format!("g{MAX_MINT_FORMS}")));

        s.set_flash(Flash {
            kind: FlashKind::Ok,
            lines: vec!["done".into()],
        });
        assert!(s.take_flash().is_some());
        assert!(s.take_flash().is_none(), "a flash is shown once");
    }

    #[test]
    fn cookies() {
        assert_eq!(
            id_from_cookies("a=b; shieldkey_console=xyz; c=d"),
            Some("xyz")
        );
        assert_eq!(id_from_cookies("shieldkey_console="), None);
        assert_eq!(id_from_cookies("other=1"), None);
        assert_eq!(
            cookie("id", false),
            "shieldkey_console=id; HttpOnly; SameSite=Strict; Path=/"
        );
        assert!(cookie("id", true).ends_with("; Secure"));
        assert!(cleared_cookie(false).contains("Max-Age=0"));
    }
}
