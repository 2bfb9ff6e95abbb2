//! Allowed model names as glob patterns: `*` matches any run of characters (including none);
//! everything else matches itself, case-sensitively.

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelPatterns {
    patterns: Vec<String>,
}

impl ModelPatterns {
    pub fn parse(patterns: &[String]) -> Result<ModelPatterns, String> {
        if patterns.is_empty() {
            return Err("an empty list would deny every model; omit the field instead".into());
        }
        for (i, p) in patterns.iter().enumerate() {
            if p.is_empty() || p.len() > 128 || !p.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(format!(
                    "[{i}]: patterns are 1-128 printable ASCII characters"
                ));
            }
        }
        Ok(ModelPatterns {
            patterns: patterns.to_vec(),
        })
    }

    /// Whether every model is allowed (a pattern of `*` only): the one case where a model the
    /// request does not name (an agent's, a stored conversation's) passes.
    pub fn allows_every_model(&self) -> bool {
        self.patterns.iter().any(|p| p.bytes().all(|b| b == b'*'))
    }

    pub fn allows(&self, model: &str) -> bool {
        self.patterns
            .iter()
            .any(|p| glob_match(p.as_bytes(), model.as_bytes()))
    }
}

/// Iterative matcher with single backtrack point: O(pattern × text) worst case, no recursion,
/// so a hostile `a*a*a*...b` cannot blow up.
fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, t));
                p += 1;
            }
            Some(c) if Some(c) == text.get(t) => {
                p += 1;
                t += 1;
            }
            _ => match star {
                // Let the last `*` swallow one more character and retry from there.
                Some((sp, st)) => {
                    p = sp + 1;
                    t = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    pattern
        .get(p..)
        .is_some_and(|rest| rest.iter().all(|&c| c == b'*'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pats(list: &[&str]) -> ModelPatterns {
        ModelPatterns::parse(&list.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn globs() {
        let p = pats(&["mistral-small-*", "mistral-embed", "*-2512", "code*tral*"]);
        assert!(p.allows("mistral-small-latest"));
        assert!(p.allows("mistral-small-"));
        assert!(!p.allows("mistral-small"));
        assert!(p.allows("mistral-embed"));
        assert!(!p.allows("mistral-embed-2"));
        assert!(p.allows("ministral-8b-2512"));
        assert!(p.allows("codestral"));
        assert!(p.allows("code-x-tral-latest"));
        assert!(!p.allows("Mistral-small-latest"));
        assert!(!p.allows("mistral-large-latest"));
        assert!(pats(&["*"]).allows(""));
        assert!(pats(&["a**b"]).allows("ab"));
        assert!(!pats(&["exact"]).allows(""));
    }

    #[test]
    fn pathological_patterns_are_fast() {
        let p = pats(&["a*a*a*a*a*a*a*a*a*a*b"]);
        let text = "a".repeat(10_000);
        let start = std::time::Instant::now();
        assert!(!p.allows(&text));
        assert!(start.elapsed().as_secs() < 2);
    }

    #[test]
    fn rejects_bad_patterns() {
        assert!(ModelPatterns::parse(&[]).is_err());
        assert!(ModelPatterns::parse(&["".into()]).is_err());
        assert!(ModelPatterns::parse(&["ok".into(), "has space".into()])
            .unwrap_err()
            .starts_with("[1]"));
    }
}
