//! Asking Envoy's admin API (plain HTTP/1.1, normally on loopback) whether a published policy was
//! applied or rejected.
//!
//! What is trusted, checked against Envoy 1.40: the ECDS stats of the filter,
//! `extension_config_discovery.http_filter.<name>.{version_text,update_success,update_rejected}`.
//! `version_text` is the version of the configuration that is serving. `/config_dump`'s
//! `version_info` is not used: Envoy records there the last configuration it received, even one
//! it then rejected.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use super::error::{usage, CliError};

/// Largest admin response read; the filtered stats are a few hundred bytes.
const MAX_RESPONSE: u64 = 4 << 20;
/// How long one admin request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
const POLL_EVERY: Duration = Duration::from_millis(20);

#[derive(Debug, Clone)]
pub struct Admin {
    url: String,
    host: String,
    port: u16,
    base_path: String,
}

impl Admin {
    /// `http://host[:port][/prefix]`.
    pub fn parse(url: &str) -> Result<Admin, CliError> {
        let rest = url.strip_prefix("http://").ok_or_else(|| {
            usage(format!(
                "--admin {url}: give the admin address as http://HOST:PORT (Envoy's admin API is plain HTTP)"
            ))
        })?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, ""),
        };
        let bad = || usage(format!("--admin {url}: cannot read host and port"));
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or_else(bad)?;
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse().map_err(|_| bad())?,
                None if after.is_empty() => 80,
                None => return Err(bad()),
            };
            (h.to_string(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), p.parse().map_err(|_| bad())?),
                None => (authority.to_string(), 80),
            }
        };
        if host.is_empty() || authority.contains('@') {
            return Err(bad());
        }
        Ok(Admin {
            url: url.trim_end_matches('/').to_string(),
            host,
            port,
            base_path: path.to_string(),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// GET `path` (with query); the body of a 200 answer.
    fn get(&self, path: &str, timeout: Duration) -> Result<String, String> {
        let addrs = (self.host.as_str(), self.port)
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve {}: {e}", self.host))?;
        let mut last = format!("no address for {}", self.host);
        let mut stream = None;
        for addr in addrs {
            match TcpStream::connect_timeout(&addr, timeout) {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last = format!("cannot connect to {addr}: {e}"),
            }
        }
        let mut stream = stream.ok_or(last)?;
        let io = |e: std::io::Error| format!("admin request failed: {e}");
        stream.set_read_timeout(Some(timeout)).map_err(io)?;
        stream.set_write_timeout(Some(timeout)).map_err(io)?;
        let host_header = if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        };
        let request = format!(
            "GET {}{path} HTTP/1.1\r\nHost: {host_header}\r\nUser-Agent: shieldkey\r\nAccept: text/plain\r\nConnection: close\r\n\r\n",
            self.base_path
        );
        stream.write_all(request.as_bytes()).map_err(io)?;
        let mut raw = Vec::new();
        stream
            .take(MAX_RESPONSE)
            .read_to_end(&mut raw)
            .map_err(io)?;
        let (status, body) = parse_response(&raw)?;
        if status != 200 {
            return Err(format!(
                "GET {path} answered {status}: {}",
                String::from_utf8_lossy(&body).trim()
            ));
        }
        String::from_utf8(body).map_err(|_| "the admin answer is not UTF-8".to_string())
    }

    /// The ECDS stats of the filter named `filter`.
    pub fn ecds_stats(&self, filter: &str, timeout: Duration) -> Result<EcdsStats, String> {
        let text = self.get("/stats?filter=extension_config_discovery", timeout)?;
        EcdsStats::parse(&text, filter).ok_or_else(|| {
            format!(
                "this Envoy has no ECDS filter named '{filter}' \
                 (no extension_config_discovery.http_filter.{filter}.* stats): \
                 is {} the admin of the Envoy that watches this file?",
                self.url
            )
        })
    }
}

/// Splits an HTTP/1.1 response into its status and (de-chunked) body.
fn parse_response(raw: &[u8]) -> Result<(u16, Vec<u8>), String> {
    let bad = || "malformed HTTP answer from the admin API".to_string();
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(bad)?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| bad())?;
    let body = &raw[end + 4..];
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(bad)?;
    let mut chunked = false;
    let mut length = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("transfer-encoding") && value.eq_ignore_ascii_case("chunked") {
            chunked = true;
        } else if name.eq_ignore_ascii_case("content-length") {
            length = value.parse::<usize>().ok();
        }
    }
    if chunked {
        return Ok((status, dechunk(body).ok_or_else(bad)?));
    }
    let body = match length {
        Some(n) if n <= body.len() => &body[..n],
        Some(_) => return Err("the admin answer was cut short".into()),
        None => body,
    };
    Ok((status, body.to_vec()))
}

fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = data.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&data[..eol]).ok()?;
        let size_text = size_text.split(';').next()?.trim();
        let size = usize::from_str_radix(size_text, 16).ok()?;
        data = &data[eol + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(data.get(..size)?);
        data = data.get(size + 2..)?;
    }
}

/// The ECDS counters of one filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EcdsStats {
    /// The version serving (`""` before any configuration was accepted).
    pub version_text: String,
    pub update_success: u64,
    pub update_rejected: u64,
    pub update_failure: u64,
}

impl EcdsStats {
    /// From `/stats` text; `None` when the filter has no ECDS stats at all.
    fn parse(text: &str, filter: &str) -> Option<EcdsStats> {
        let prefix = format!("extension_config_discovery.http_filter.{filter}.");
        let mut stats = EcdsStats {
            version_text: String::new(),
            update_success: 0,
            update_rejected: 0,
            update_failure: 0,
        };
        let mut seen = false;
        for line in text.lines() {
            let Some((name, value)) = line.split_once(": ") else {
                continue;
            };
            let Some(stat) = name.strip_prefix(&prefix) else {
                continue;
            };
            let number = || value.trim().parse::<u64>().unwrap_or(0);
            match stat {
                "version_text" => {
                    seen = true;
                    stats.version_text = value.trim().trim_matches('"').to_string();
                }
                "update_success" => stats.update_success = number(),
                "update_rejected" => stats.update_rejected = number(),
                "update_failure" => stats.update_failure = number(),
                _ => {}
            }
        }
        seen.then_some(stats)
    }
}

/// Why a publish was not confirmed.
#[derive(Debug)]
pub enum WaitError {
    /// Envoy refused the new file; the previous configuration keeps serving.
    Refused(String),
    /// No verdict in time, or the admin API stopped answering.
    Unknown(String),
}

/// Waits until Envoy serves `revision` (after `before` was read, before the file was written),
/// or reports why not. Returns how long it took.
pub fn wait_applied(
    admin: &Admin,
    filter: &str,
    revision: u64,
    before: &EcdsStats,
    wait: Duration,
) -> Result<Duration, WaitError> {
    let start = Instant::now();
    let deadline = start + wait;
    let want = revision.to_string();
    let previous = if before.version_text.is_empty() {
        "Envoy has never accepted a ShieldKey configuration, so the listener answers 500"
            .to_string()
    } else {
        format!(
            "the previous policy (revision {}) is still serving",
            before.version_text
        )
    };
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let timeout = remaining.clamp(Duration::from_millis(200), REQUEST_TIMEOUT);
        match admin.ecds_stats(filter, timeout) {
            Ok(now) => {
                if now.update_success > before.update_success && now.version_text == want {
                    return Ok(start.elapsed());
                }
                if now.update_rejected > before.update_rejected {
                    return Err(WaitError::Refused(format!(
                        "Envoy rejected revision {revision} (see its log: update_rejected went {} -> {}); {previous}",
                        before.update_rejected, now.update_rejected
                    )));
                }
                if now.update_failure > before.update_failure {
                    return Err(WaitError::Refused(format!(
                        "Envoy could not read revision {revision} (see its log: update_failure went {} -> {}); {previous}",
                        before.update_failure, now.update_failure
                    )));
                }
                if Instant::now() >= deadline {
                    return Err(WaitError::Unknown(format!(
                        "Envoy did not report applying revision {revision} within {} s (it serves \
                         revision \"{}\"; update_success {} -> {}): is this the file it watches?",
                        wait.as_secs_f64(),
                        now.version_text,
                        before.update_success,
                        now.update_success
                    )));
                }
            }
            Err(e) => {
                if Instant::now() >= deadline {
                    return Err(WaitError::Unknown(format!(
                        "cannot confirm revision {revision} with Envoy at {}: {e}",
                        admin.url()
                    )));
                }
            }
        }
        std::thread::sleep(POLL_EVERY.min(deadline.saturating_duration_since(Instant::now())));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_urls() {
        let a = Admin::parse("http://127.0.0.1:9901").unwrap();
        assert_eq!(
            (a.host.as_str(), a.port, a.base_path.as_str()),
            ("127.0.0.1", 9901, "")
        );
        let b = Admin::parse("http://[::1]:9901/envoy/").unwrap();
        assert_eq!(
            (b.host.as_str(), b.port, b.base_path.as_str()),
            ("::1", 9901, "/envoy")
        );
        assert_eq!(Admin::parse("http://localhost").unwrap().port, 80);
        for bad in [
            "https://x:1",
            "127.0.0.1:9901",
            "http://:9901",
            "http://h:port",
            "http://u@h:1",
        ] {
            assert!(Admin::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn responses_and_stats() {
        let raw = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n";
        assert_eq!(parse_response(raw).unwrap(), (200, b"hello world".to_vec()));
        let raw = b"HTTP/1.1 404 Not Found\r\ncontent-length: 3\r\n\r\nno!extra";
        assert_eq!(parse_response(raw).unwrap(), (404, b"no!".to_vec()));
        let text = "extension_config_discovery.http_filter.shieldkey.version_text: \"4\"\n\
                    extension_config_discovery.http_filter.shieldkey.update_rejected: 2\n\
                    extension_config_discovery.http_filter.shieldkey.update_success: 5\n\
                    extension_config_discovery.http_filter.shieldkey2.update_success: 9\n";
        let s = EcdsStats::parse(text, "shieldkey").unwrap();
        assert_eq!(
            (s.version_text.as_str(), s.update_rejected, s.update_success),
            ("4", 2, 5)
        );
        assert!(EcdsStats::parse(text, "other").is_none());
    }
}
