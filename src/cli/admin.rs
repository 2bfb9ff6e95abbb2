//! Asking Envoy's admin API (plain HTTP/1.1, normally on loopback) whether a published policy was
//! applied or rejected, and reading its stats for `shieldkey status`.
//!
//! What is trusted, checked against Envoy 1.40: the ECDS stats of the filter,
//! `extension_config_discovery.http_filter.<name>.{version_text,update_success,update_rejected}`.
//! `version_text` is the version of the configuration that is serving. `/config_dump`'s
//! `version_info` is not used: Envoy records there the last configuration it received, even one
//! it then rejected.

use std::fmt;
use std::time::{Duration, Instant};

use super::error::{usage, CliError};
use super::http::{self, Endpoint, HttpError, Limits, Request, UrlError};

/// Largest admin response read; the filtered stats are a few hundred bytes.
const MAX_RESPONSE: u64 = 4 << 20;
/// How long one admin request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
const POLL_EVERY: Duration = Duration::from_millis(20);

#[derive(Debug, Clone)]
pub struct Admin {
    endpoint: Endpoint,
}

impl Admin {
    /// `http://host[:port][/prefix]`.
    pub fn parse(url: &str) -> Result<Admin, CliError> {
        Endpoint::parse(url)
            .map(|endpoint| Admin { endpoint })
            .map_err(|e| match e {
                UrlError::NotHttp => usage(format!(
                    "--admin {url}: give the admin address as http://HOST:PORT (Envoy's admin API is plain HTTP)"
                )),
                UrlError::BadHostPort => usage(format!("--admin {url}: cannot read host and port")),
            })
    }

    pub fn url(&self) -> &str {
        self.endpoint.url()
    }

    /// GET `path` (with query); the body of a 200 answer.
    fn get(&self, path: &str, timeout: Duration) -> Result<String, String> {
        self.fetch(path, "text/plain", timeout, MAX_RESPONSE)
            .map_err(|e| e.to_string())
    }

    /// GET `path` (with query), reading at most `max_response` bytes; the body of a 200 answer.
    pub fn fetch(
        &self,
        path: &str,
        accept: &str,
        timeout: Duration,
        max_response: u64,
    ) -> Result<String, AdminError> {
        let request = Request {
            method: "GET",
            path,
            headers: &[("Accept", accept)],
            body: &[],
        };
        let limits = Limits {
            connect_timeout: timeout,
            io_timeout: timeout,
            max_response,
        };
        let answer = http::send(&self.endpoint, &request, &limits).map_err(|e| match e {
            HttpError::Connect(m) => AdminError::Unreachable(m),
            HttpError::Exchange(m) => AdminError::Failed(format!("admin request failed: {m}")),
        })?;
        if answer.status != 200 {
            return Err(AdminError::Failed(format!(
                "GET {path} answered {}: {}",
                answer.status,
                String::from_utf8_lossy(&answer.body).trim()
            )));
        }
        String::from_utf8(answer.body)
            .map_err(|_| AdminError::Failed("the admin answer is not UTF-8".to_string()))
    }

    /// The ECDS stats of the filter named `filter`.
    pub fn ecds_stats(&self, filter: &str, timeout: Duration) -> Result<EcdsStats, String> {
        let text = self.get("/stats?filter=extension_config_discovery", timeout)?;
        EcdsStats::parse(&text, filter).ok_or_else(|| {
            format!(
                "this Envoy has no ECDS filter named '{filter}' \
                 (no extension_config_discovery.http_filter.{filter}.* stats): \
                 is {} the admin of the Envoy that watches this file?",
                self.url()
            )
        })
    }
}

/// Why an admin request failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminError {
    /// No connection could be made (nothing listens there, a name that does not resolve, a
    /// timeout): the request was never sent.
    Unreachable(String),
    /// Connected, but no 200 answer that could be read.
    Failed(String),
}

impl fmt::Display for AdminError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AdminError::Unreachable(m) => write!(f, "admin request failed: {m}"),
            AdminError::Failed(m) => f.write_str(m),
        }
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
        let e = &a.endpoint;
        assert_eq!(
            (e.host.as_str(), e.port, e.base_path.as_str()),
            ("127.0.0.1", 9901, "")
        );
        let b = Admin::parse("http://[::1]:9901/envoy/").unwrap();
        let e = &b.endpoint;
        assert_eq!(
            (e.host.as_str(), e.port, e.base_path.as_str()),
            ("::1", 9901, "/envoy")
        );
        assert_eq!(Admin::parse("http://localhost").unwrap().endpoint.port, 80);
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
    fn stats() {
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
