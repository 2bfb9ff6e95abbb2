//! A phase's headers, read from Envoy in one host call (`Host::request_headers`), then looked up
//! here: one call instead of one per header (authorization, x-api-key, :path, :method,
//! content-length, the country header), on the path every request takes.

/// Header names as Envoy hands them over: lower case (HTTP/2 and Envoy's HTTP/1 codec both
/// normalise them).
pub struct Headers(Vec<(String, Vec<u8>)>);

impl Headers {
    pub fn new(pairs: Vec<(String, Vec<u8>)>) -> Self {
        Headers(pairs)
    }

    /// The first value of `name` (compared case-insensitively, whatever the host did).
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.0
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }

    pub fn has(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// A header holding a decimal number (`content-length`, `:status`); `None` if absent or not
    /// a number.
    pub fn number<T: std::str::FromStr>(&self, name: &str) -> Option<T> {
        std::str::from_utf8(self.get(name)?)
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups() {
        let h = Headers::new(vec![
            (":status".into(), b"200".to_vec()),
            ("Content-Length".into(), b" 12 ".to_vec()),
            ("x".into(), b"1".to_vec()),
            ("x".into(), b"2".to_vec()),
        ]);
        assert_eq!(h.number::<u32>(":status"), Some(200));
        assert_eq!(h.number::<u64>("content-length"), Some(12));
        assert_eq!(h.get("x"), Some(&b"1"[..]));
        assert!(!h.has("y"));
        assert_eq!(h.number::<u64>("x-nope"), None);
    }
}
