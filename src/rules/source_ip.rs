//! Allowed client networks (CIDR, IPv4 and IPv6), and parsing of Envoy's `source.address`.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceNetworks {
    networks: Vec<IpNet>,
}

impl SourceNetworks {
    pub fn parse(cidrs: &[String]) -> Result<SourceNetworks, String> {
        if cidrs.is_empty() {
            return Err("an empty list would deny every client; omit the field instead".into());
        }
        let networks = cidrs
            .iter()
            .enumerate()
            .map(|(i, text)| {
                text.parse::<IpNet>()
                    .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
                    .map(|n| n.trunc())
                    .map_err(|_| {
                        format!(
                            "[{i}]: '{text}' is not an IP network like 10.0.0.0/8 or 2001:db8::/32"
                        )
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(SourceNetworks { networks })
    }

    pub fn allows(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.networks.iter().any(|n| n.contains(&ip))
    }
}

/// `::ffff:a.b.c.d` is an IPv4 client on a dual-stack socket: judge it by IPv4 rules.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Envoy's `source.address`: `1.2.3.4:5678`, `[2001:db8::1]:80` (port 0 when the address came from
/// `X-Forwarded-For`), or a bare address. Anything else (a pipe, garbage) is `None`.
pub fn parse_envoy_address(text: &[u8]) -> Option<IpAddr> {
    let text = std::str::from_utf8(text).ok()?;
    if let Ok(sock) = text.parse::<SocketAddr>() {
        return Some(canonical(sock.ip()));
    }
    text.parse::<IpAddr>().ok().map(canonical)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> SourceNetworks {
        SourceNetworks::parse(&list.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ipv4_edges() {
        let n = nets(&["10.0.0.0/8", "192.168.1.7"]);
        assert!(n.allows(ip("10.0.0.0")));
        assert!(n.allows(ip("10.255.255.255")));
        assert!(!n.allows(ip("11.0.0.0")));
        assert!(!n.allows(ip("9.255.255.255")));
        assert!(n.allows(ip("192.168.1.7")));
        assert!(!n.allows(ip("192.168.1.8")));
        assert!(n.allows(ip("::ffff:10.1.2.3")));
        // The deprecated IPv4-compatible form is an IPv6 address, not an IPv4 client.
        assert!(!n.allows(ip("::10.1.2.3")));
        let all = nets(&["0.0.0.0/0"]);
        assert!(all.allows(ip("255.255.255.255")));
        assert!(!all.allows(ip("2001:db8::1")));
    }

    #[test]
    fn ipv6_edges() {
        let n = nets(&["2001:db8::/32", "::1/128"]);
        assert!(n.allows(ip("2001:db8::")));
        assert!(n.allows(ip("2001:db8:ffff:ffff:ffff:ffff:ffff:ffff")));
        assert!(!n.allows(ip("2001:db9::")));
        assert!(n.allows(ip("::1")));
        assert!(!n.allows(ip("::2")));
        assert!(!n.allows(ip("127.0.0.1")));
        // Host bits set in the configured network are ignored, as `ip route` would.
        assert!(nets(&["10.1.2.3/8"]).allows(ip("10.200.0.1")));
    }

    #[test]
    fn rejects_bad_lists() {
        assert!(SourceNetworks::parse(&[]).is_err());
        let err = SourceNetworks::parse(&["10.0.0.0/8".into(), "10.0.0.0/33".into()]).unwrap_err();
        assert!(err.starts_with("[1]"), "{err}");
        for bad in [
            "",
            "10.0.0",
            "example.com",
            "10.0.0.0/",
            "2001:db8::/129",
            " 10.0.0.1",
        ] {
            assert!(SourceNetworks::parse(&[bad.to_string()]).is_err(), "{bad}");
        }
    }

    #[test]
    fn envoy_address_forms() {
        assert_eq!(
            parse_envoy_address(b"127.0.0.1:53122"),
            Some(ip("127.0.0.1"))
        );
        assert_eq!(
            parse_envoy_address(b"203.0.113.9:0"),
            Some(ip("203.0.113.9"))
        );
        assert_eq!(
            parse_envoy_address(b"[2001:db8::5]:0"),
            Some(ip("2001:db8::5"))
        );
        assert_eq!(
            parse_envoy_address(b"[::ffff:10.0.0.1]:80"),
            Some(ip("10.0.0.1"))
        );
        assert_eq!(parse_envoy_address(b"10.0.0.1"), Some(ip("10.0.0.1")));
        assert_eq!(parse_envoy_address(b"2001:db8::5"), Some(ip("2001:db8::5")));
        for bad in [
            &b""[..],
            b"/tmp/envoy.sock",
            b"@abstract",
            b"1.2.3.4:x",
            b"\xff\xfe",
            b"[::1]",
        ] {
            assert_eq!(parse_envoy_address(bad), None, "{bad:?}");
        }
    }
}
