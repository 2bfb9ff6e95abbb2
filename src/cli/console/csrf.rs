//! Cross-site request checks. Every state change is a POST that must carry the session's CSRF
//! token (a hidden form field, `Session::csrf_ok`) and must not come from another site: when the
//! browser says where a request comes from (`Sec-Fetch-Site`, `Origin`), it must be this console.
//! Requests must also name this console as their `Host`: on loopback only a loopback name, so a
//! hostile page cannot reach the console through DNS rebinding.

/// Why a request is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    CrossSite,
    BadHost,
}

/// The host part of a `Host` header or an origin's authority (`[::1]:8484` → `::1`).
fn host_of(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split(']').next().unwrap_or("");
    }
    authority
        .rsplit_once(':')
        .map_or(authority, |(host, _port)| host)
}

/// A `Host` this console answers: any when remote access was allowed, else a loopback name.
pub fn host_allowed(host: Option<&str>, allow_remote: bool) -> Result<(), Refusal> {
    let Some(host) = host.filter(|h| !h.is_empty()) else {
        return Err(Refusal::BadHost);
    };
    if allow_remote {
        return Ok(());
    }
    let name = host_of(host).to_ascii_lowercase();
    let loopback = name == "localhost"
        || name.ends_with(".localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if loopback {
        Ok(())
    } else {
        Err(Refusal::BadHost)
    }
}

/// A POST from this console's own pages. Browsers say where a request comes from in
/// `Sec-Fetch-Site`, which pages cannot set: when sent, it must be `same-origin` and decides.
/// Browsers without it are judged by `Origin`, which must name the host the request was sent to
/// (`null`, what browsers send under `Referrer-Policy: no-referrer` or from sandboxed frames, is
/// refused). Clients that send neither (not browsers: scripts, curl) pass here; they still need
/// a session and its CSRF token.
pub fn same_origin(
    host: Option<&str>,
    origin: Option<&str>,
    fetch_site: Option<&str>,
) -> Result<(), Refusal> {
    if let Some(site) = fetch_site {
        return if site.eq_ignore_ascii_case("same-origin") {
            Ok(())
        } else {
            Err(Refusal::CrossSite)
        };
    }
    if let Some(origin) = origin {
        let authority = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"))
            .ok_or(Refusal::CrossSite)?;
        match host {
            Some(host) if authority.eq_ignore_ascii_case(host) => {}
            _ => return Err(Refusal::CrossSite),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_hosts_unless_remote_is_allowed() {
        for ok in [
            "127.0.0.1:8484",
            "localhost:8484",
            "LOCALHOST",
            "[::1]:8484",
            "127.1.2.3",
            "console.localhost:1",
        ] {
            assert_eq!(host_allowed(Some(ok), false), Ok(()), "{ok}");
        }
        for bad in ["evil.example:8484", "10.0.0.1:8484", "", "[::2]:1"] {
            assert_eq!(
                host_allowed(Some(bad), false),
                Err(Refusal::BadHost),
                "{bad}"
            );
        }
        assert_eq!(host_allowed(None, false), Err(Refusal::BadHost));
        assert_eq!(host_allowed(Some("console.example.com"), true), Ok(()));
        assert_eq!(host_allowed(None, true), Err(Refusal::BadHost));
    }

    #[test]
    fn cross_site_posts_are_refused() {
        let host = Some("127.0.0.1:8484");
        assert_eq!(same_origin(host, None, None), Ok(()));
        assert_eq!(
            same_origin(host, Some("http://127.0.0.1:8484"), Some("same-origin")),
            Ok(())
        );
        assert_eq!(
            same_origin(host, Some("http://evil.example"), None),
            Err(Refusal::CrossSite)
        );
        assert_eq!(
            same_origin(host, Some("http://127.0.0.1:9999"), None),
            Err(Refusal::CrossSite)
        );
        assert_eq!(
            same_origin(host, Some("null"), None),
            Err(Refusal::CrossSite)
        );
        assert_eq!(
            same_origin(host, None, Some("cross-site")),
            Err(Refusal::CrossSite)
        );
        assert_eq!(
            same_origin(host, None, Some("same-site")),
            Err(Refusal::CrossSite)
        );
        assert_eq!(
            same_origin(None, Some("http://127.0.0.1:8484"), None),
            Err(Refusal::CrossSite)
        );
        // Chrome under `Referrer-Policy: no-referrer`: `Origin: null`, and Sec-Fetch-Site
        // (which no page can set) says where the form was.
        assert_eq!(same_origin(host, Some("null"), Some("same-origin")), Ok(()));
        assert_eq!(
            same_origin(host, Some("null"), Some("cross-site")),
            Err(Refusal::CrossSite)
        );
    }
}
