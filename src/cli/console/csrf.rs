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

/// The names this console answers to in `Host`, from its command line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hosts {
    /// `--allow-remote`: not only loopback names.
    pub allow_remote: bool,
    /// `--public-host`: with `allow_remote`, the names (lower case, no port) besides loopback
    /// ones; none means any name.
    pub public: Vec<String>,
}

/// A `Host` this console answers: a loopback name; with remote access allowed, one of the public
/// names it was given (any name when none was given).
pub fn host_allowed(host: Option<&str>, hosts: &Hosts) -> Result<(), Refusal> {
    let Some(host) = host.filter(|h| !h.is_empty()) else {
        return Err(Refusal::BadHost);
    };
    let name = host_of(host).to_ascii_lowercase();
    let loopback = name == "localhost"
        || name.ends_with(".localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    let public = hosts.allow_remote && (hosts.public.is_empty() || hosts.public.contains(&name));
    if loopback || public {
        Ok(())
    } else {
        Err(Refusal::BadHost)
    }
}

/// `--public-host` values: comma-separated names (or addresses), each without a port.
pub fn parse_public_hosts(text: &str) -> Result<Vec<String>, String> {
    let mut names = Vec::new();
    for part in text.split(',').map(str::trim) {
        let bracketed = part.starts_with('[') && part.ends_with(']');
        let name = part.trim_start_matches('[').trim_end_matches(']');
        let valid = !name.is_empty()
            && name.bytes().all(|b| {
                b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || (bracketed && b == b':')
            });
        if !valid {
            return Err(format!(
                "--public-host {text}: give the names the console is reached under, comma-separated \
                 and without a port, e.g. console.example.com or 192.0.2.7 or [2001:db8::7]"
            ));
        }
        names.push(name.to_ascii_lowercase());
    }
    Ok(names)
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
        let local = Hosts::default();
        for ok in [
            "127.0.0.1:8484",
            "localhost:8484",
            "LOCALHOST",
            "[::1]:8484",
            "127.1.2.3",
            "console.localhost:1",
        ] {
            assert_eq!(host_allowed(Some(ok), &local), Ok(()), "{ok}");
        }
        for bad in ["evil.example:8484", "10.0.0.1:8484", "", "[::2]:1"] {
            assert_eq!(
                host_allowed(Some(bad), &local),
                Err(Refusal::BadHost),
                "{bad}"
            );
        }
        assert_eq!(host_allowed(None, &local), Err(Refusal::BadHost));
        let any = Hosts {
            allow_remote: true,
            public: Vec::new(),
        };
        assert_eq!(host_allowed(Some("console.example.com"), &any), Ok(()));
        assert_eq!(host_allowed(None, &any), Err(Refusal::BadHost));
    }

    #[test]
    fn public_hosts_are_the_only_remote_names_answered() {
        let hosts = Hosts {
            allow_remote: true,
            public: parse_public_hosts("Console.Example.com, 192.0.2.7,[2001:db8::7]").unwrap(),
        };
        for ok in [
            "console.example.com",
            "CONSOLE.example.com:443",
            "192.0.2.7:8484",
            "[2001:db8::7]:8484",
            "127.0.0.1:8484",
            "localhost",
        ] {
            assert_eq!(host_allowed(Some(ok), &hosts), Ok(()), "{ok}");
        }
        // A name rebound to the console by a hostile page, or a near miss.
        for bad in [
            "evil.example",
            "console.example.com.evil.example",
            "example.com",
            "192.0.2.8",
            "[2001:db8::8]:1",
            "",
        ] {
            assert_eq!(
                host_allowed(Some(bad), &hosts),
                Err(Refusal::BadHost),
                "{bad}"
            );
        }
        // Without --allow-remote the public names are not answered (the flag is refused then).
        let local = Hosts {
            allow_remote: false,
            public: hosts.public.clone(),
        };
        assert_eq!(
            host_allowed(Some("console.example.com"), &local),
            Err(Refusal::BadHost)
        );
    }

    #[test]
    fn public_host_values_are_names_without_ports() {
        assert_eq!(
            parse_public_hosts("a.example,B.example").unwrap(),
            vec!["a.example", "b.example"]
        );
        assert_eq!(parse_public_hosts("[::7]").unwrap(), vec!["::7"]);
        for bad in [
            "",
            "a.example:443",
            "a.example,",
            "a b",
            "*.example",
            "::7",
            "a/b",
        ] {
            assert!(parse_public_hosts(bad).is_err(), "{bad}");
        }
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
