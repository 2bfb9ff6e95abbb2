//! Allowed and denied countries (ISO 3166-1 alpha-2), read from the header Envoy's geoip filter
//! sets. The header is only trustworthy because the shipped Envoy config strips any client copy
//! before geoip runs (see `envoy/behind-lb.yaml`).

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CountryRule {
    allow: Option<Vec<[u8; 2]>>,
    deny: Vec<[u8; 2]>,
    allow_unknown: bool,
}

impl CountryRule {
    pub fn parse(
        allow: Option<&[String]>,
        deny: Option<&[String]>,
        unknown: Option<&str>,
    ) -> Result<CountryRule, String> {
        if allow.is_none() && deny.is_none() {
            return Err("set allow, deny or both".into());
        }
        let codes = |list: &[String], field: &str| -> Result<Vec<[u8; 2]>, String> {
            list.iter()
                .enumerate()
                .map(|(i, c)| {
                    normalize(c.as_bytes()).ok_or_else(|| {
                        format!("{field}[{i}]: '{c}' is not a two-letter ISO country code")
                    })
                })
                .collect()
        };
        let allow = allow.map(|a| codes(a, "allow")).transpose()?;
        if allow.as_ref().is_some_and(Vec::is_empty) {
            return Err("allow: an empty list would deny every country; omit it instead".into());
        }
        let deny = deny
            .map(|d| codes(d, "deny"))
            .transpose()?
            .unwrap_or_default();
        let allow_unknown = match unknown {
            None | Some("deny") => false,
            Some("allow") => true,
            Some(other) => {
                return Err(format!(
                    "unknown: must be \"deny\" or \"allow\", not '{other}'"
                ))
            }
        };
        Ok(CountryRule {
            allow,
            deny,
            allow_unknown,
        })
    }

    /// `country`: the header value; absent, empty or malformed means unknown.
    pub fn check(&self, country: Option<&[u8]>) -> bool {
        let Some(code) = country.and_then(normalize) else {
            return self.allow_unknown;
        };
        if self.deny.contains(&code) {
            return false;
        }
        self.allow
            .as_ref()
            .is_none_or(|allow| allow.contains(&code))
    }
}

fn normalize(code: &[u8]) -> Option<[u8; 2]> {
    match code {
        [a, b] if a.is_ascii_alphabetic() && b.is_ascii_alphabetic() => {
            Some([a.to_ascii_uppercase(), b.to_ascii_uppercase()])
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(codes: &[&str]) -> Vec<String> {
        codes.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn allow_list_normalises_case_and_denies_unknown_by_default() {
        let r = CountryRule::parse(Some(&list(&["fr", "DE"])), None, None).unwrap();
        assert!(r.check(Some(b"FR")));
        assert!(r.check(Some(b"de")));
        assert!(!r.check(Some(b"US")));
        assert!(!r.check(None));
        assert!(!r.check(Some(b"")));
        assert!(!r.check(Some(b"FRA")));
        assert!(!r.check(Some(b"F1")));
    }

    #[test]
    fn deny_list_wins_and_unknown_can_be_allowed() {
        let r = CountryRule::parse(Some(&list(&["FR", "US"])), Some(&list(&["US"])), None).unwrap();
        assert!(!r.check(Some(b"US")));
        assert!(r.check(Some(b"FR")));
        let r = CountryRule::parse(None, Some(&list(&["US"])), Some("allow")).unwrap();
        assert!(r.check(None));
        assert!(r.check(Some(b"JP")));
        assert!(!r.check(Some(b"us")));
    }

    #[test]
    fn rejects_bad_rules() {
        assert!(CountryRule::parse(None, None, None).is_err());
        assert!(CountryRule::parse(Some(&[]), None, None).is_err());
        assert!(CountryRule::parse(Some(&list(&["FRA"])), None, None)
            .unwrap_err()
            .contains("allow[0]"));
        assert!(CountryRule::parse(None, Some(&list(&["1A"])), None).is_err());
        assert!(CountryRule::parse(Some(&list(&["FR"])), None, Some("maybe")).is_err());
    }
}
