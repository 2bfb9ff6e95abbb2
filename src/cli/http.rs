//! A small std-only HTTP/1.1 client for the CLI: one request per connection (`Connection: close`).
//! Plain HTTP for Envoy's admin API; plain HTTP or TLS (`https://`, through `tls`) for etcd's JSON
//! gateway.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use super::tls::{Tls, TlsStream};

/// `http://host[:port][/base-path]`, or `https://` where TLS is allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    url: String,
    pub host: String,
    pub port: u16,
    /// Prepended to every request path; no trailing `/`.
    pub base_path: String,
    /// `https://`: the connection is TLS.
    pub https: bool,
}

/// Why a URL is not an `Endpoint`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UrlError {
    /// Not `http://` (nor `https://` where allowed; bare `host:port` included).
    NotHttp,
    /// The host or port cannot be read.
    BadHostPort,
}

impl Endpoint {
    /// `http://` only.
    pub fn parse(url: &str) -> Result<Endpoint, UrlError> {
        Endpoint::parse_scheme(url, false)
    }

    /// `http://` or `https://`.
    pub fn parse_http_or_https(url: &str) -> Result<Endpoint, UrlError> {
        Endpoint::parse_scheme(url, true)
    }

    fn parse_scheme(url: &str, https_allowed: bool) -> Result<Endpoint, UrlError> {
        let (rest, https) = match url.strip_prefix("http://") {
            Some(rest) => (rest, false),
            None => match url.strip_prefix("https://") {
                Some(rest) if https_allowed => (rest, true),
                _ => return Err(UrlError::NotHttp),
            },
        };
        let default_port = if https { 443 } else { 80 };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, ""),
        };
        let bad = UrlError::BadHostPort;
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or(bad)?;
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse().map_err(|_| bad)?,
                None if after.is_empty() => default_port,
                None => return Err(bad),
            };
            (h.to_string(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), p.parse().map_err(|_| bad)?),
                None => (authority.to_string(), default_port),
            }
        };
        if host.is_empty() || authority.contains('@') {
            return Err(bad);
        }
        Ok(Endpoint {
            url: url.trim_end_matches('/').to_string(),
            host,
            port,
            base_path: path.to_string(),
            https,
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    fn host_header(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// How a request failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpError {
    /// No connection was made: the request was never sent (safe to send elsewhere).
    Connect(String),
    /// The connection was made but the exchange failed: the server may have acted on it.
    Exchange(String),
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HttpError::Connect(m) | HttpError::Exchange(m) => f.write_str(m),
        }
    }
}

pub struct Request<'a> {
    pub method: &'a str,
    /// Path and query, after the endpoint's base path.
    pub path: &'a str,
    /// Extra headers (Host, Content-Length and Connection are set here).
    pub headers: &'a [(&'a str, &'a str)],
    pub body: &'a [u8],
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub connect_timeout: Duration,
    /// For each read and write on the connection.
    pub io_timeout: Duration,
    /// Largest answer read, headers included.
    pub max_response: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

/// A connection: plain TCP, or TLS over it.
enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream>),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}

/// Sends one request over plain HTTP and reads the whole answer.
pub fn send(
    endpoint: &Endpoint,
    request: &Request<'_>,
    limits: &Limits,
) -> Result<Response, HttpError> {
    send_over(endpoint, request, limits, None)
}

/// Sends one request and reads the whole answer; `tls` is what `https://` endpoints connect with.
pub fn send_over(
    endpoint: &Endpoint,
    request: &Request<'_>,
    limits: &Limits,
    tls: Option<&Tls>,
) -> Result<Response, HttpError> {
    let addrs = (endpoint.host.as_str(), endpoint.port)
        .to_socket_addrs()
        .map_err(|e| HttpError::Connect(format!("cannot resolve {}: {e}", endpoint.host)))?;
    let mut last = format!("no address for {}", endpoint.host);
    let mut stream = None;
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, limits.connect_timeout) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = format!("cannot connect to {addr}: {e}"),
        }
    }
    let tcp = stream.ok_or(HttpError::Connect(last))?;
    let io = |e: std::io::Error| {
        HttpError::Exchange(format!(
            "{} {}{} failed: {e}",
            request.method,
            endpoint.url(),
            request.path
        ))
    };
    let setup =
        |e: std::io::Error| HttpError::Connect(format!("cannot set up the connection: {e}"));
    tcp.set_read_timeout(Some(limits.io_timeout))
        .map_err(setup)?;
    tcp.set_write_timeout(Some(limits.io_timeout))
        .map_err(setup)?;
    let (mut stream, tls) = match (endpoint.https, tls) {
        (false, _) => (Stream::Plain(tcp), None),
        (true, Some(tls)) => {
            let stream = tls
                .connect(tcp, &endpoint.host)
                .map_err(|m| HttpError::Connect(format!("{}: {m}", endpoint.url())))?;
            (Stream::Tls(Box::new(stream)), Some(tls))
        }
        (true, None) => {
            return Err(HttpError::Connect(format!(
                "{}: no TLS settings for an https:// URL",
                endpoint.url()
            )))
        }
    };
    // A TLS server that refuses the session (a TLS 1.3 client certificate check) drops the
    // request unread: that is a failure to connect, not a failed exchange.
    let refused = |e: &io::Error| {
        tls.and_then(|tls| tls.refusal(e, &endpoint.host))
            .map(|m| HttpError::Connect(format!("{}: {m}", endpoint.url())))
    };
    let mut head = format!(
        "{} {}{} HTTP/1.1\r\nHost: {}\r\nUser-Agent: shieldkey\r\nConnection: close\r\n",
        request.method,
        endpoint.base_path,
        request.path,
        endpoint.host_header()
    );
    if !request.body.is_empty() || request.method != "GET" {
        head.push_str(&format!("Content-Length: {}\r\n", request.body.len()));
    }
    for (name, value) in request.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    out.extend_from_slice(request.body);
    if let Err(e) = stream.write_all(&out).and_then(|()| stream.flush()) {
        return Err(refused(&e).unwrap_or_else(|| io(e)));
    }
    let mut raw = Vec::new();
    if let Err(e) = stream
        .take(limits.max_response.saturating_add(1))
        .read_to_end(&mut raw)
    {
        if raw.is_empty() {
            if let Some(refusal) = refused(&e) {
                return Err(refusal);
            }
        }
        // A TLS peer that closes without close_notify: accepted when the answer is complete by
        // its own framing (a Content-Length or the last chunk), so nothing can have been cut.
        if !(tls.is_some() && e.kind() == io::ErrorKind::UnexpectedEof && is_complete(&raw)) {
            return Err(io(e));
        }
    }
    if raw.is_empty() {
        let hint = if endpoint.https {
            ""
        } else {
            " (if it serves TLS there, give its URL as https://)"
        };
        return Err(HttpError::Exchange(format!(
            "{} closed the connection without answering {} {}{hint}",
            endpoint.url(),
            request.method,
            request.path
        )));
    }
    if u64::try_from(raw.len()).map_or(true, |n| n > limits.max_response) {
        return Err(HttpError::Exchange(format!(
            "the answer of {} is larger than {} bytes",
            endpoint.url(),
            limits.max_response
        )));
    }
    let (status, body) = parse_response(&raw).map_err(|m| {
        HttpError::Exchange(format!("{m} (from {}{})", endpoint.url(), request.path))
    })?;
    Ok(Response { status, body })
}

/// Whether an answer read so far is whole by its framing: a Content-Length body or a complete
/// chunked body (an answer delimited only by the connection's end cannot tell).
fn is_complete(raw: &[u8]) -> bool {
    let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
    let framed = head.split("\r\n").skip(1).any(|line| {
        line.split_once(':').is_some_and(|(name, value)| {
            name.trim() == "content-length"
                || (name.trim() == "transfer-encoding" && value.trim() == "chunked")
        })
    });
    framed && parse_response(raw).is_ok()
}

/// Splits an HTTP/1.1 response into its status and (de-chunked) body.
pub fn parse_response(raw: &[u8]) -> Result<(u16, Vec<u8>), String> {
    let bad = || "malformed HTTP answer".to_string();
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
        Some(_) => return Err("the HTTP answer was cut short".into()),
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn urls() {
        let a = Endpoint::parse("http://127.0.0.1:9901").unwrap();
        assert_eq!(
            (a.host.as_str(), a.port, a.base_path.as_str(), a.url()),
            ("127.0.0.1", 9901, "", "http://127.0.0.1:9901")
        );
        let b = Endpoint::parse("http://[::1]:9901/envoy/").unwrap();
        assert_eq!(
            (b.host.as_str(), b.port, b.base_path.as_str()),
            ("::1", 9901, "/envoy")
        );
        assert_eq!(Endpoint::parse("http://localhost").unwrap().port, 80);
        assert_eq!(Endpoint::parse("https://x:1"), Err(UrlError::NotHttp));
        let c = Endpoint::parse_http_or_https("https://[::1]/etcd").unwrap();
        assert_eq!(
            (c.host.as_str(), c.port, c.base_path.as_str(), c.https),
            ("::1", 443, "/etcd", true)
        );
        assert!(!Endpoint::parse_http_or_https("http://h:1").unwrap().https);
        assert_eq!(
            Endpoint::parse_http_or_https("ftp://h:1"),
            Err(UrlError::NotHttp)
        );
        assert_eq!(Endpoint::parse("127.0.0.1:9901"), Err(UrlError::NotHttp));
        for bad in [
            "http://:9901",
            "http://h:port",
            "http://u@h:1",
            "http://[::1",
        ] {
            assert_eq!(Endpoint::parse(bad), Err(UrlError::BadHostPort), "{bad}");
        }
    }

    #[test]
    fn responses() {
        let raw = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n";
        assert_eq!(parse_response(raw).unwrap(), (200, b"hello world".to_vec()));
        let raw = b"HTTP/1.1 404 Not Found\r\ncontent-length: 3\r\n\r\nno!extra";
        assert_eq!(parse_response(raw).unwrap(), (404, b"no!".to_vec()));
        assert!(parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nshort").is_err());
        assert!(parse_response(b"garbage").is_err());
        assert!(is_complete(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        ));
        assert!(!is_complete(
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok"
        ));
        assert!(!is_complete(b"HTTP/1.1 200 OK\r\n\r\nwho knows"));
        assert!(is_complete(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
        ));
        assert!(!is_complete(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n"
        ));
    }

    #[test]
    fn a_post_round_trip_and_a_refused_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut seen = Vec::new();
            let mut buf = [0u8; 1024];
            while !seen.ends_with(b"{\"a\":1}") {
                let n = conn.read(&mut buf).unwrap();
                assert!(n > 0);
                seen.extend_from_slice(&buf[..n]);
            }
            conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .unwrap();
            String::from_utf8(seen).unwrap()
        });
        let endpoint = Endpoint::parse(&format!("http://127.0.0.1:{port}/base")).unwrap();
        let limits = Limits {
            connect_timeout: Duration::from_secs(2),
            io_timeout: Duration::from_secs(5),
            max_response: 1024,
        };
        let request = Request {
            method: "POST",
            path: "/v3/kv/range",
            headers: &[("Authorization", "tok")],
            body: b"{\"a\":1}",
        };
        let answer = send(&endpoint, &request, &limits).unwrap();
        assert_eq!((answer.status, answer.body.as_slice()), (200, &b"ok"[..]));
        let seen = server.join().unwrap();
        assert!(
            seen.starts_with("POST /base/v3/kv/range HTTP/1.1\r\n"),
            "{seen}"
        );
        assert!(seen.contains("Content-Length: 7\r\n") && seen.contains("Authorization: tok\r\n"));

        // Nothing listens any more: a connect failure, never sent.
        match send(&endpoint, &request, &limits) {
            Err(HttpError::Connect(_)) => {}
            other => panic!("{other:?}"),
        }
    }
}
