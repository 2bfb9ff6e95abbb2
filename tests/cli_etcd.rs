//! The `shieldkey` binary in fleet mode, against a real single-member etcd per test
//! (`/usr/bin/etcd`, 3.4), read back through etcd's JSON gateway.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde_json::{json, Value};
use shieldkey::config::compile::{compile_bytes, CompileOptions};
use shieldkey::config::raw::{RawTeam, RawToken, RawUpstreamKey};
use shieldkey::master_key::MasterKey;
use shieldkey::token;
use shieldkey::token_digest::TokenVerifier;

const REAL_KEY: &str = "AbCdEfGhIjKlMnOpQrStUvWxYz012345";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One HTTP/1.1 exchange (`Connection: close`): status and de-chunked body.
fn http(port: u16, method: &str, path: &str, body: &[u8], auth: Option<&str>) -> (u16, Vec<u8>) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let auth = auth
        .map(|t| format!("Authorization: {t}\r\n"))
        .unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {}\r\n{auth}Connection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&raw[..end]).to_lowercase();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let mut body = raw[end + 4..].to_vec();
    if head.contains("transfer-encoding: chunked") {
        let mut out = Vec::new();
        let mut data = body.as_slice();
        loop {
            let eol = data.windows(2).position(|w| w == b"\r\n").unwrap();
            let size = usize::from_str_radix(std::str::from_utf8(&data[..eol]).unwrap().trim(), 16)
                .unwrap();
            data = &data[eol + 2..];
            if size == 0 {
                break;
            }
            out.extend_from_slice(&data[..size]);
            data = &data[size + 2..];
        }
        body = out;
    }
    (status, body)
}

fn b64(s: impl AsRef<[u8]>) -> String {
    STANDARD.encode(s)
}

fn unb64(v: &Value) -> String {
    String::from_utf8(STANDARD.decode(v.as_str().unwrap_or("")).unwrap()).unwrap()
}

/// A single-member etcd in a temporary directory; killed and removed on drop, even when the
/// test fails.
struct Etcd {
    child: Child,
    dir: PathBuf,
    /// The plain-HTTP client port: the test reads and writes through it.
    port: u16,
    /// The TLS client port (`--client-cert-auth`), when started with certificates.
    tls_port: Option<u16>,
    /// An auth token once auth is enabled.
    token: Option<String>,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

impl Etcd {
    fn start(name: &str) -> Etcd {
        Etcd::start_with(name, None)
    }

    /// With `certs`, etcd also serves TLS on a second client port, with the server certificate
    /// for 127.0.0.1 and `--client-cert-auth` against the test CA. The plain port stays for the
    /// test's own reads (etcd applies client certificate checks to its TLS listeners only).
    fn start_with(name: &str, certs: Option<&Certs>) -> Etcd {
        let dir =
            std::env::temp_dir().join(format!("shieldkey-etcd-{name}-{}", std::process::id()));
        for attempt in 0..5 {
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            let (client, peer) = (free_port(), free_port());
            let tls_port = certs.map(|_| free_port());
            let log = fs::File::create(dir.join("etcd.log")).unwrap();
            let mut listen = format!("http://127.0.0.1:{client}");
            let mut advertise = listen.clone();
            let mut tls_args: Vec<PathBuf> = Vec::new();
            if let (Some(certs), Some(port)) = (certs, tls_port) {
                listen = format!("https://127.0.0.1:{port},{listen}");
                advertise = format!("https://127.0.0.1:{port}");
                for (flag, file) in [
                    ("--cert-file", &certs.server_cert),
                    ("--key-file", &certs.server_key),
                    ("--trusted-ca-file", &certs.ca),
                ] {
                    tls_args.push(flag.into());
                    tls_args.push(file.clone());
                }
                tls_args.push("--client-cert-auth".into());
            }
            let child = Command::new("etcd")
                .args(["--name", "t", "--data-dir"])
                .arg(dir.join("data"))
                .args(&tls_args)
                .args([
                    "--listen-client-urls",
                    &listen,
                    "--advertise-client-urls",
                    &advertise,
                    "--listen-peer-urls",
                    &format!("http://127.0.0.1:{peer}"),
                    "--initial-advertise-peer-urls",
                    &format!("http://127.0.0.1:{peer}"),
                    "--initial-cluster",
                    &format!("t=http://127.0.0.1:{peer}"),
                    "--logger=zap",
                    "--log-outputs=stderr",
                ])
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("etcd is installed (/usr/bin/etcd)");
            let mut etcd = Etcd {
                child,
                dir: dir.clone(),
                port: client,
                tls_port,
                token: None,
            };
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = etcd.child.try_wait() {
                    break; // a port was taken meanwhile: try again
                }
                if TcpStream::connect(("127.0.0.1", client)).is_ok()
                    && http(client, "GET", "/health", b"", None).1 == br#"{"health":"true"}"#
                {
                    return etcd;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            eprintln!(
                "etcd attempt {attempt} failed: {}",
                fs::read_to_string(dir.join("etcd.log")).unwrap_or_default()
            );
            // Dropped here (killed, directory removed); the next attempt takes fresh ports.
        }
        panic!("etcd did not start");
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn https_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.tls_port.unwrap())
    }

    fn call(&self, method: &str, body: Value) -> Value {
        let (status, answer) = http(
            self.port,
            "POST",
            &format!("/v3/{method}"),
            body.to_string().as_bytes(),
            self.token.as_deref(),
        );
        let answer: Value = serde_json::from_slice(&answer).unwrap();
        assert_eq!(status, 200, "{method}: {answer}");
        answer
    }

    /// Every key under `prefix`: value and mod_revision.
    fn range(&self, prefix: &str) -> BTreeMap<String, (String, i64)> {
        let mut end = prefix.as_bytes().to_vec();
        *end.last_mut().unwrap() += 1;
        let answer = self.call(
            "kv/range",
            json!({"key": b64(prefix), "range_end": b64(&end)}),
        );
        answer["kvs"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .map(|kv| {
                (
                    unb64(&kv["key"]),
                    (
                        unb64(&kv["value"]),
                        kv["mod_revision"].as_str().unwrap().parse().unwrap(),
                    ),
                )
            })
            .collect()
    }

    /// The store revision: it moves with every write, to anything.
    fn revision(&self) -> i64 {
        let answer = self.call("kv/range", json!({"key": b64("x")}));
        answer["header"]["revision"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap()
    }

    fn put(&self, key: &str, value: &str) {
        self.call("kv/put", json!({"key": b64(key), "value": b64(value)}));
    }

    fn value(&self, key: &str) -> Value {
        let kvs = self.range(key);
        serde_json::from_str(&kvs.get(key).unwrap_or_else(|| panic!("no {key}")).0).unwrap()
    }
}

/// The CLI pointed at etcd; the policy file it would otherwise use never exists.
#[derive(Clone)]
struct Cli {
    urls: String,
    master: String,
    policy_file: PathBuf,
    env: Vec<(String, String)>,
}

impl Cli {
    fn new(etcd: &Etcd) -> Cli {
        let master = String::from_utf8(
            Command::new(env!("CARGO_BIN_EXE_shieldkey"))
                .arg("keygen")
                .output()
                .unwrap()
                .stdout,
        )
        .unwrap()
        .trim()
        .to_string();
        Cli {
            urls: etcd.url(),
            master,
            policy_file: etcd.dir.join("policy.json"),
            env: Vec::new(),
        }
    }

    fn with(&self, name: &str, value: &str) -> Cli {
        let mut cli = self.clone();
        cli.env.push((name.to_string(), value.to_string()));
        cli
    }

    fn at(&self, urls: &str) -> Cli {
        let mut cli = self.clone();
        cli.urls = urls.to_string();
        cli
    }

    fn run(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_shieldkey"));
        cmd.args(args)
            .current_dir(self.policy_file.parent().unwrap())
            .env("SHIELDKEY_ETCD", &self.urls)
            .env("SHIELDKEY_POLICY", &self.policy_file)
            .env("SHIELDKEY_MASTER_KEY", &self.master)
            .env_remove("SHIELDKEY_ETCD_PREFIX")
            .env_remove("SHIELDKEY_ETCD_USER")
            .env_remove("SHIELDKEY_ETCD_PASSWORD")
            .env_remove("SHIELDKEY_ETCD_CACERT")
            .env_remove("SHIELDKEY_ETCD_CERT")
            .env_remove("SHIELDKEY_ETCD_KEY")
            .env_remove("SHIELDKEY_PUBLISH")
            .env_remove("SHIELDKEY_WASM")
            .env_remove("SHIELDKEY_ADMIN")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let mut pipe = child.stdin.take().unwrap();
        if let Err(e) = pipe.write_all(stdin.unwrap_or("").as_bytes()) {
            assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "{e}");
        }
        drop(pipe);
        child.wait_with_output().unwrap()
    }

    /// Succeeds; stdout and stderr.
    fn ok(&self, args: &[&str], stdin: Option<&str>) -> (String, String) {
        let out = self.run(args, stdin);
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(out.status.success(), "{args:?}: {err}");
        (String::from_utf8(out.stdout).unwrap(), err)
    }

    /// Fails with `code`; stderr.
    fn fails(&self, args: &[&str], stdin: Option<&str>, code: i32) -> String {
        let out = self.run(args, stdin);
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
        err
    }

    /// `init`, `seal --id prod`, and a token per id; returns the printed tokens.
    fn setup(&self, tokens: &[&str]) -> Vec<String> {
        self.ok(&["init"], None);
        self.ok(&["seal", "--id", "prod"], Some(&format!("{REAL_KEY}\n")));
        tokens
            .iter()
            .map(|id| {
                self.ok(&["mint", "--id", id, "--upstream-key", "prod"], None)
                    .0
                    .trim()
                    .to_string()
            })
            .collect()
    }
}

impl Cli {
    /// `setup` with alice and bob, then team eng (a monthly budget) with alice in it, bob
    /// revoked: a policy with every kind of entry. Returns the printed tokens.
    fn setup_with_team(&self, alice_flags: &[&str]) -> Vec<String> {
        let printed = self.setup(&["alice", "bob"]);
        self.ok(
            &[
                "team",
                "create",
                "eng",
                "--budget-usd",
                "5",
                "--budget-window",
                "monthly",
            ],
            None,
        );
        let mut limit = vec!["limit", "alice", "--team", "eng"];
        limit.extend_from_slice(alice_flags);
        self.ok(&limit, None);
        self.ok(&["revoke", "bob"], None);
        printed
    }
}

fn keys(kvs: &BTreeMap<String, (String, i64)>) -> Vec<&str> {
    kvs.keys().map(String::as_str).collect()
}

#[test]
fn init_seal_mint_list_in_etcd_and_the_exact_keys_written() {
    let etcd = Etcd::start("roundtrip");
    let cli = Cli::new(&etcd);
    let (_, err) = cli.ok(&["init"], None);
    assert!(
        err.contains("created an empty policy (policy revision 1, etcd prefix shieldkey/"),
        "{err}"
    );
    cli.ok(&["seal", "--id", "prod"], Some(&format!("{REAL_KEY}\n")));
    let (out, err) = cli.ok(
        &[
            "mint",
            "--id",
            "alice",
            "--upstream-key",
            "prod",
            "--owner",
            "a@x",
            "--rpm",
            "60",
            "--models",
            "mistral-small-*",
        ],
        None,
    );
    assert!(
        err.contains("(policy revision 3, etcd prefix shieldkey/ at http://127.0.0.1:"),
        "{err}"
    );
    let printed = out.trim();
    assert!(printed.starts_with("sk_shield_t_alice_"));

    // Exactly the documented keys, with compact JSON of the policy types.
    let kvs = etcd.range("shieldkey/");
    assert_eq!(
        keys(&kvs),
        [
            "shieldkey/policy/keys/prod",
            "shieldkey/policy/settings",
            "shieldkey/policy/tokens/alice"
        ]
    );
    assert_eq!(
        kvs["shieldkey/policy/settings"].0,
        r#"{"version":1,"revision":3,"upstream_keys":[],"tokens":[]}"#
    );
    let key_text = &kvs["shieldkey/policy/keys/prod"].0;
    let key: RawUpstreamKey = serde_json::from_str(key_text).unwrap();
    assert_eq!(key.id, "prod");
    assert!(key.sealed.starts_with("skseal:v1:"));
    assert_eq!(*key_text, serde_json::to_string(&key).unwrap());
    let token_text = &kvs["shieldkey/policy/tokens/alice"].0;
    let token: RawToken = serde_json::from_str(token_text).unwrap();
    assert_eq!(*token_text, serde_json::to_string(&token).unwrap());
    assert_eq!(
        (token.id.as_str(), token.upstream_key.as_str()),
        ("alice", "prod")
    );
    assert_eq!(token.owner.as_deref(), Some("a@x"));
    assert_eq!(token.rate_limit.unwrap().requests_per_minute, Some(60));
    assert_eq!(token.models.unwrap().allow.unwrap(), ["mistral-small-*"]);
    let stored: String = kvs.values().map(|(v, _)| v.as_str()).collect();
    assert!(!stored.contains(printed) && !stored.contains(REAL_KEY));

    // The printed token verifies against the stored digest; the sealed key opens with the
    // filter's own compiler once the document is assembled from the keys.
    let master = MasterKey::from_base64(&cli.master).unwrap();
    let presented = token::parse(printed.as_bytes()).unwrap();
    let digest: [u8; 32] = STANDARD.decode(&token.digest).unwrap().try_into().unwrap();
    assert!(TokenVerifier::new(master.digest_key()).unwrap().verify(
        "alice",
        presented.secret_text(),
        &digest
    ));
    let mut doc: Value = serde_json::from_str(&kvs["shieldkey/policy/settings"].0).unwrap();
    doc["upstream_keys"] = json!([serde_json::from_str::<Value>(key_text).unwrap()]);
    doc["tokens"] = json!([serde_json::from_str::<Value>(token_text).unwrap()]);
    let compiled = compile_bytes(
        doc.to_string().as_bytes(),
        &CompileOptions {
            master_key: Some(&master),
        },
    )
    .unwrap();
    assert_eq!(
        compiled.authorization_for(0).unwrap().expose(),
        format!("Bearer {REAL_KEY}").as_bytes()
    );

    let (list, _) = cli.ok(&["list"], None);
    assert!(
        list.contains("alice") && list.contains("active") && list.contains("a@x"),
        "{list}"
    );
    let (json, _) = cli.ok(&["list", "--json"], None);
    let json: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(json["revision"], 3);
    assert_eq!(json["upstream_keys"], json!(["prod"]));
    assert_eq!(json["tokens"][0]["rate_limit"]["requests_per_minute"], 60);
    let (check, _) = cli.ok(&["check"], None);
    assert!(
        check.starts_with("ok: revision 3, 1 tokens (0 revoked), 1 upstream keys, all sealed keys open; etcd prefix shieldkey/"),
        "{check}"
    );
    assert!(
        !cli.policy_file.exists(),
        "fleet mode never touches the policy file"
    );

    // init refuses a prefix that holds a policy, unless --force; --force keeps the revision going.
    assert!(cli.fails(&["init"], None, 1).contains("--force"));
    cli.ok(&["init", "--force"], None);
    let kvs = etcd.range("shieldkey/");
    assert_eq!(keys(&kvs), ["shieldkey/policy/settings"]);
    assert_eq!(
        kvs["shieldkey/policy/settings"].0,
        r#"{"version":1,"revision":4,"upstream_keys":[],"tokens":[]}"#
    );
}

#[test]
fn revoke_changes_only_that_tokens_key_and_the_settings() {
    let etcd = Etcd::start("revoke");
    let cli = Cli::new(&etcd);
    cli.setup(&["alice", "bob"]);
    let before = etcd.range("shieldkey/");
    let store_before = etcd.revision();
    let (_, err) = cli.ok(&["revoke", "alice"], None);
    assert!(
        err.contains("revoked token 'alice' (policy revision 5"),
        "{err}"
    );
    let after = etcd.range("shieldkey/");
    assert_eq!(etcd.revision(), store_before + 1, "one transaction");
    let m =
        |kvs: &BTreeMap<String, (String, i64)>, k: &str| kvs[&format!("shieldkey/policy/{k}")].1;
    for unchanged in ["tokens/bob", "keys/prod"] {
        assert_eq!(m(&before, unchanged), m(&after, unchanged), "{unchanged}");
        assert_eq!(
            before[&format!("shieldkey/policy/{unchanged}")].0,
            after[&format!("shieldkey/policy/{unchanged}")].0
        );
    }
    for changed in ["tokens/alice", "settings"] {
        assert_eq!(m(&after, changed), store_before + 1, "{changed}");
    }
    assert_eq!(
        etcd.value("shieldkey/policy/tokens/alice")["status"],
        "revoked"
    );
    assert_eq!(etcd.value("shieldkey/policy/settings")["revision"], 5);
    assert!(cli.ok(&["list"], None).0.contains("revoked"));

    cli.ok(&["unrevoke", "alice"], None);
    assert_eq!(
        etcd.value("shieldkey/policy/tokens/alice")["status"],
        "active"
    );
    assert_eq!(
        m(&etcd.range("shieldkey/"), "tokens/bob"),
        m(&before, "tokens/bob")
    );
    assert!(cli
        .fails(&["revoke", "ghost"], None, 1)
        .contains("no token with id 'ghost'"));
}

#[test]
fn remove_deletes_the_tokens_key() {
    let etcd = Etcd::start("remove");
    let cli = Cli::new(&etcd);
    cli.setup(&["alice", "bob"]);
    let (_, err) = cli.ok(&["remove", "bob"], None);
    assert!(
        err.contains("removed token 'bob' (policy revision 5"),
        "{err}"
    );
    assert_eq!(
        keys(&etcd.range("shieldkey/")),
        [
            "shieldkey/policy/keys/prod",
            "shieldkey/policy/settings",
            "shieldkey/policy/tokens/alice"
        ]
    );
    let (list, _) = cli.ok(&["list"], None);
    assert!(list.contains("alice") && !list.contains("bob"));
    assert!(cli
        .fails(&["remove", "bob"], None, 1)
        .contains("no token with id 'bob'"));
}

/// A proxy in front of etcd that runs `before_txn(n)` before it forwards the n-th `kv/txn`
/// (from 0): a deterministic race between a CLI's read and its write.
fn racing_proxy(etcd_port: u16, mut before_txn: impl FnMut(usize) + Send + 'static) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut txns = 0;
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { break };
            let mut request = Vec::new();
            let mut buf = [0u8; 8192];
            let body_at = loop {
                let n = conn.read(&mut buf).unwrap();
                assert!(n > 0);
                request.extend_from_slice(&buf[..n]);
                if let Some(i) = request.windows(4).position(|w| w == b"\r\n\r\n") {
                    break i + 4;
                }
            };
            let head = String::from_utf8_lossy(&request[..body_at]).to_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap());
            while request.len() < body_at + length {
                let n = conn.read(&mut buf).unwrap();
                assert!(n > 0);
                request.extend_from_slice(&buf[..n]);
            }
            if head.starts_with("post /v3/kv/txn ") {
                before_txn(txns);
                txns += 1;
            }
            let mut upstream = TcpStream::connect(("127.0.0.1", etcd_port)).unwrap();
            upstream.write_all(&request).unwrap();
            let mut answer = Vec::new();
            upstream.read_to_end(&mut answer).unwrap();
            conn.write_all(&answer).unwrap();
        }
    });
    format!("http://127.0.0.1:{port}")
}

#[test]
fn two_racing_limits_on_different_tokens_both_take_effect() {
    let etcd = Etcd::start("race");
    let cli = Cli::new(&etcd);
    cli.setup(&["alice", "bob"]);
    let settings_before = etcd.value("shieldkey/policy/settings")["revision"]
        .as_u64()
        .unwrap();

    // A reads, then B runs from start to end, then A's write arrives: A's compare on the
    // settings key fails, A reads again and re-applies its change on top of B's.
    let other = cli.at(&etcd.url());
    let proxy = racing_proxy(etcd.port, move |n| {
        if n == 0 {
            other.ok(&["limit", "bob", "--rpm", "22"], None);
        }
    });
    let (_, err) = cli.at(&proxy).ok(&["limit", "alice", "--rpm", "11"], None);
    assert!(err.contains("retry 1 of 5"), "{err}");
    assert!(
        err.contains("re-applied 1 time(s) after concurrent changes"),
        "{err}"
    );
    assert_eq!(
        etcd.value("shieldkey/policy/tokens/alice")["rate_limit"]["requests_per_minute"],
        11
    );
    assert_eq!(
        etcd.value("shieldkey/policy/tokens/bob")["rate_limit"]["requests_per_minute"],
        22
    );
    assert_eq!(
        etcd.value("shieldkey/policy/settings")["revision"],
        settings_before + 2,
        "each change bumped the revision once"
    );

    // And a free-for-all: six CLIs at once on six tokens; every change lands.
    let ids = ["t0", "t1", "t2", "t3", "t4", "t5"];
    for id in ids {
        cli.ok(&["mint", "--id", id, "--upstream-key", "prod"], None);
    }
    let start = etcd.value("shieldkey/policy/settings")["revision"]
        .as_u64()
        .unwrap();
    let barrier = Arc::new(Barrier::new(ids.len()));
    let threads: Vec<_> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let cli = cli.at(&etcd.url());
            let barrier = Arc::clone(&barrier);
            let id = id.to_string();
            std::thread::spawn(move || {
                barrier.wait();
                cli.ok(&["limit", &id, "--rpm", &(100 + i).to_string()], None)
                    .1
            })
        })
        .collect();
    let retried = threads
        .into_iter()
        .map(|t| t.join().unwrap())
        .filter(|err| err.contains("retry"))
        .count();
    eprintln!("{retried} of 6 concurrent CLIs retried");
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(
            etcd.value(&format!("shieldkey/policy/tokens/{id}"))["rate_limit"]
                ["requests_per_minute"],
            100 + i
        );
    }
    assert_eq!(
        etcd.value("shieldkey/policy/settings")["revision"],
        start + 6
    );
}

#[test]
fn a_writer_that_keeps_losing_gives_up_clearly() {
    let etcd = Etcd::start("giveup");
    let cli = Cli::new(&etcd);
    cli.setup(&["alice"]);
    let port = etcd.port;
    // Before every write of the CLI, someone else touches the settings key.
    let proxy = racing_proxy(port, move |_| {
        let settings = b64("shieldkey/policy/settings");
        let (status, body) = http(
            port,
            "POST",
            "/v3/kv/range",
            json!({"key": settings}).to_string().as_bytes(),
            None,
        );
        assert_eq!(status, 200);
        let value: Value = serde_json::from_slice(&body).unwrap();
        let put = json!({"key": settings, "value": value["kvs"][0]["value"]});
        assert_eq!(
            http(port, "POST", "/v3/kv/put", put.to_string().as_bytes(), None).0,
            200
        );
    });
    let err = cli.at(&proxy).fails(&["revoke", "alice"], None, 1);
    assert!(err.contains("retry 5 of 5"), "{err}");
    assert!(err.contains("gave up after 6 attempts"), "{err}");
    assert!(err.contains("the last attempt wrote nothing"), "{err}");
    assert_eq!(
        etcd.value("shieldkey/policy/tokens/alice")["status"],
        "active"
    );
}

#[test]
fn a_change_that_fails_validation_writes_nothing() {
    let etcd = Etcd::start("invalid");
    let cli = Cli::new(&etcd);
    cli.setup(&["alice", "bob"]);
    let before = etcd.revision();
    let err = cli.fails(&["limit", "bob", "--cidrs", "10.0.0.0/33"], None, 1);
    // A change to one token reads (and validates) that token alone: the etcd key names it.
    assert!(
        err.contains(".source_cidrs (etcd key shieldkey/policy/tokens/bob)"),
        "{err}"
    );
    let err = cli.fails(&["limit", "alice", "--countries-allow", "FRA"], None, 1);
    assert!(
        err.contains("tokens[0].countries (etcd key shieldkey/policy/tokens/alice)"),
        "{err}"
    );
    // A malformed budget is refused at the flag, before etcd is read.
    let err = cli.fails(&["limit", "alice", "--budget-window", "weekly"], None, 2);
    assert!(err.contains("--budget-window: must be lifetime"), "{err}");
    assert!(cli
        .fails(
            &["mint", "--id", "carol", "--upstream-key", "nope"],
            None,
            1
        )
        .contains("no upstream key 'nope'"));
    assert!(cli
        .fails(&["init"], None, 1)
        .contains("already holds a policy"));
    assert_eq!(
        etcd.revision(),
        before,
        "nothing at all was written to etcd"
    );

    // A hand-broken value is reported with its key.
    etcd.put(
        "shieldkey/policy/tokens/bob",
        r#"{"id":"bob","digest":"x","upstream_key":"prod","colour":"blue"}"#,
    );
    let err = cli.fails(&["check"], None, 1);
    assert!(
        err.contains("etcd key shieldkey/policy/tokens/bob") && err.contains("colour"),
        "{err}"
    );
    // A change to another token reads only that token, so a broken neighbour does not block
    // it (the Envoys refuse the broken token; `check` names it).
    cli.ok(&["revoke", "alice"], None);
    assert!(cli.fails(&["revoke", "bob"], None, 1).contains("colour"));
}

#[test]
fn publish_is_refused_in_fleet_mode() {
    let etcd = Etcd::start("publish");
    let cli = Cli::new(&etcd);
    cli.setup(&["alice"]);
    let before = etcd.revision();
    let dir = cli.policy_file.parent().unwrap().to_path_buf();
    let err = cli.fails(&["revoke", "alice", "--publish", "ecds.json"], None, 2);
    assert!(
        err.contains("--publish: in fleet mode") && err.contains("nothing to publish"),
        "{err}"
    );
    let err = cli.fails(&["publish", "--to", "ecds.json"], None, 2);
    assert!(err.contains("publish: in fleet mode"), "{err}");
    let err = cli.with("SHIELDKEY_PUBLISH", "ecds.json").fails(
        &["limit", "alice", "--rpm", "5"],
        None,
        2,
    );
    assert!(err.contains("SHIELDKEY_PUBLISH is set"), "{err}");
    assert!(!dir.join("ecds.json").exists());
    assert_eq!(etcd.revision(), before);
    assert_eq!(
        etcd.value("shieldkey/policy/tokens/alice")["status"],
        "active"
    );
    // --policy names a file: it cannot be combined with etcd.
    assert!(cli
        .fails(
            &["--etcd", &etcd.url(), "--policy", "p.json", "list"],
            None,
            2
        )
        .contains("exclude each other"));
}

#[test]
fn prefixes_keep_policies_apart() {
    let etcd = Etcd::start("prefix");
    let cli = Cli::new(&etcd);
    cli.setup(&["alice"]);
    let team_b = cli.with("SHIELDKEY_ETCD_PREFIX", "team-b/");
    team_b.setup(&["bob"]);
    let flagged = |args: &[&str]| {
        let mut all = vec!["--etcd-prefix", "team-b/"];
        all.extend_from_slice(args);
        cli.ok(&all, None).0
    };
    let default_before = etcd.range("shieldkey/");
    flagged(&["revoke", "bob"]);
    assert_eq!(
        etcd.range("shieldkey/"),
        default_before,
        "the other prefix is untouched"
    );
    assert_eq!(
        keys(&etcd.range("team-b/")),
        [
            "team-b/policy/keys/prod",
            "team-b/policy/settings",
            "team-b/policy/tokens/bob"
        ]
    );
    assert_eq!(etcd.value("team-b/policy/tokens/bob")["status"], "revoked");
    let list_a = cli.ok(&["list"], None).0;
    let list_b = flagged(&["list"]);
    assert!(list_a.contains("alice") && !list_a.contains("bob"));
    assert!(list_b.contains("bob") && !list_b.contains("alice"));
    assert!(cli
        .fails(&["--etcd-prefix", "team-c", "list"], None, 2)
        .contains("ending in '/'"));
    let err = cli.fails(&["--etcd-prefix", "team-c/", "list"], None, 1);
    assert!(
        err.contains("no policy in etcd prefix team-c/") && err.contains("shieldkey init"),
        "{err}"
    );
}

#[test]
fn a_bulk_change_is_split_into_transactions_etcd_accepts() {
    let etcd = Etcd::start("bulk");
    let cli = Cli::new(&etcd);
    cli.setup(&["alice"]);
    // 160 more tokens, written the way an import would (here: directly, 40 per txn).
    let digest = b64([9u8; 32]);
    for chunk in 0..4 {
        let ops: Vec<Value> = (0..40)
            .map(|i| {
                let id = format!("bulk-{:03}", chunk * 40 + i);
                let value = json!({"id": id, "digest": digest, "upstream_key": "prod"});
                json!({"request_put": {"key": b64(format!("shieldkey/policy/tokens/{id}")), "value": b64(value.to_string())}})
            })
            .collect();
        assert_eq!(
            etcd.call("kv/txn", json!({"success": ops}))["succeeded"],
            true
        );
    }
    let (list, err) = cli.ok(&["list"], None);
    assert_eq!(list.lines().count(), 1 + 161, "{err}");
    assert!(cli.ok(&["check"], None).0.contains("161 tokens"));

    // One transaction cannot hold it: etcd allows 128 operations.
    let deletes: Vec<Value> = etcd
        .range("shieldkey/policy/tokens/")
        .keys()
        .map(|k| json!({"request_delete_range": {"key": b64(k)}}))
        .collect();
    let (status, body) = http(
        etcd.port,
        "POST",
        "/v3/kv/txn",
        json!({"success": deletes}).to_string().as_bytes(),
        None,
    );
    assert_eq!(status, 400);
    assert!(String::from_utf8_lossy(&body).contains("too many operations"));

    // Replacing the policy removes 162 keys and writes the settings: two steps.
    let revision = etcd.value("shieldkey/policy/settings")["revision"]
        .as_u64()
        .unwrap();
    let (_, err) = cli.ok(&["init", "--force"], None);
    assert!(err.contains("applied in 2 steps"), "{err}");
    let kvs = etcd.range("shieldkey/");
    assert_eq!(keys(&kvs), ["shieldkey/policy/settings"]);
    assert_eq!(
        etcd.value("shieldkey/policy/settings")["revision"],
        revision + 1
    );
}

#[test]
fn endpoints_are_tried_in_order_until_one_answers() {
    let etcd = Etcd::start("endpoints");
    let dead = format!("http://127.0.0.1:{}", free_port());
    let cli = Cli::new(&etcd).at(&format!("{dead},{}", etcd.url()));
    cli.setup(&["alice"]);
    assert!(cli.ok(&["list"], None).0.contains("alice"));
    let err = cli.at(&dead).fails(&["list"], None, 1);
    assert!(
        err.contains("no etcd endpoint answered") && err.contains("cannot connect"),
        "{err}"
    );
    let err = cli.at("https://127.0.0.1:2379").fails(&["list"], None, 2);
    assert!(err.contains("need --etcd-cacert"), "{err}");
}

#[test]
fn password_authentication() {
    let mut etcd = Etcd::start("auth");
    let b = |s: &str| b64(s);
    for (method, body) in [
        (
            "auth/user/add",
            json!({"name": "root", "password": "rootpw"}),
        ),
        ("auth/role/add", json!({"name": "root"})),
        ("auth/user/grant", json!({"user": "root", "role": "root"})),
        ("auth/user/add", json!({"name": "ops", "password": "opspw"})),
        ("auth/role/add", json!({"name": "shieldkey-rw"})),
        (
            "auth/role/grant",
            json!({"name": "shieldkey-rw", "perm": {"permType": "READWRITE", "key": b("shieldkey/"), "range_end": b("shieldkey0")}}),
        ),
        (
            "auth/user/grant",
            json!({"user": "ops", "role": "shieldkey-rw"}),
        ),
        ("auth/enable", json!({})),
    ] {
        etcd.call(method, body);
    }
    let root = etcd.call(
        "auth/authenticate",
        json!({"name": "root", "password": "rootpw"}),
    );
    etcd.token = Some(root["token"].as_str().unwrap().to_string());

    let anonymous = Cli::new(&etcd);
    let err = anonymous.fails(&["init"], None, 1);
    assert!(err.contains("--etcd-user"), "{err}");
    let ops = anonymous.with("SHIELDKEY_ETCD_USER", "ops");
    let err = ops.fails(&["init"], None, 1);
    assert!(err.contains("SHIELDKEY_ETCD_PASSWORD is not set"), "{err}");
    let err = ops
        .with("SHIELDKEY_ETCD_PASSWORD", "wrong")
        .fails(&["init"], None, 1);
    assert!(err.contains("authentication failed"), "{err}");

    let ops = ops.with("SHIELDKEY_ETCD_PASSWORD", "opspw");
    ops.setup(&["alice"]);
    ops.ok(&["revoke", "alice"], None);
    assert_eq!(
        etcd.value("shieldkey/policy/tokens/alice")["status"],
        "revoked"
    );
    // The flag works too, and the role's range is enforced by etcd.
    assert!(anonymous
        .with("SHIELDKEY_ETCD_PASSWORD", "opspw")
        .ok(&["--etcd-user", "ops", "list"], None)
        .0
        .contains("alice"));
    let err = ops.fails(&["--etcd-prefix", "other/", "init"], None, 1);
    assert!(err.contains("permission denied"), "{err}");
}

/// The row of `id` in a `status` table, split on whitespace.
fn status_row<'t>(table: &'t str, id: &str) -> Vec<&'t str> {
    table
        .lines()
        .find(|l| l.split_whitespace().next() == Some(id))
        .unwrap_or_else(|| panic!("no row {id} in\n{table}"))
        .split_whitespace()
        .collect()
}

#[test]
fn status_sums_the_current_window_over_every_envoy() {
    let etcd = Etcd::start("status");
    let cli = Cli::new(&etcd);
    cli.setup(&[]);
    let mint = |id: &str, extra: &[&str]| {
        let mut args = vec!["mint", "--id", id, "--upstream-key", "prod"];
        args.extend_from_slice(extra);
        cli.ok(&args, None);
    };
    mint(
        "alice",
        &[
            "--owner",
            "a@x",
            "--budget-usd",
            "25",
            "--budget-window",
            "monthly",
        ],
    );
    mint(
        "bob",
        &["--budget-usd", "1.50", "--budget-window", "lifetime"],
    );
    mint("carol", &["--owner", "c@x"]);

    // The ledger as two Envoys' syncers and claims leave it (nano-USD). A month boundary passing
    // while this test runs would move alice's window: the CLI and the test read the clock apart.
    let now = now_secs();
    let month = shieldkey::time::month_start(now);
    let last_month = shieldkey::time::month_start(month - 1);
    let ledger = |key: &str, field: &str, n: u64| {
        etcd.put(
            &format!("shieldkey/ledger/{key}"),
            &format!("{{\"{field}\":{n}}}"),
        );
    };
    ledger(&format!("pool/alice/{month}"), "claimed", 8_000_000_000);
    ledger(
        &format!("node/envoy-a/alice/{month}/claimed"),
        "claimed",
        5_000_000_000,
    );
    ledger(
        &format!("node/envoy-a/alice/{month}/spent"),
        "spent",
        3_250_000_000,
    );
    // A node id may hold '/': keys are read from the right.
    ledger(
        &format!("node/eu/envoy-b/alice/{month}/claimed"),
        "claimed",
        3_000_000_000,
    );
    ledger(
        &format!("node/eu/envoy-b/alice/{month}/spent"),
        "spent",
        1_000_000_001,
    );
    // Last month: not counted.
    ledger(
        &format!("pool/alice/{last_month}"),
        "claimed",
        25_000_000_000,
    );
    ledger(
        &format!("node/envoy-a/alice/{last_month}/claimed"),
        "claimed",
        25_000_000_000,
    );
    ledger(
        &format!("node/envoy-a/alice/{last_month}/spent"),
        "spent",
        24_000_000_000,
    );
    // bob's lifetime window starts at 0; his limit was lowered below what was spent.
    ledger("pool/bob/0", "claimed", 1_500_000_000);
    ledger("node/eu/envoy-b/bob/0/claimed", "claimed", 1_500_000_000);
    ledger("node/eu/envoy-b/bob/0/spent", "spent", 1_750_000_000);
    // A removed token's keys are ignored.
    ledger("node/envoy-a/gone/0/spent", "spent", 9_000_000_000);

    let (table, err) = cli.ok(&["status"], None);
    let window = format!("monthly from {}", shieldkey::time::format_rfc3339(month));
    let window_words: Vec<&str> = window.split(' ').collect();
    let mut alice = vec!["alice", "a@x"];
    alice.extend_from_slice(&window_words);
    alice.extend_from_slice(&["$25.00", "$4.250000001", "$8.00", "$20.749999999", "2"]);
    assert_eq!(status_row(&table, "alice"), alice, "{table}");
    assert_eq!(
        status_row(&table, "bob"),
        ["bob", "-", "lifetime", "$1.50", "$1.75", "$1.50", "-$0.25", "1"],
        "{table}"
    );
    assert!(table.starts_with("TOKEN "), "{table}");
    assert_eq!(table.lines().count(), 3, "no carol without --all:\n{table}");
    assert!(
        err.contains("1 without a budget: --all lists them"),
        "{err}"
    );

    let (json, _) = cli.ok(&["status", "--json"], None);
    let json: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(json["teams"], json!([]), "no teams");
    let rows = json["tokens"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    let a = &rows[0];
    assert_eq!(a["id"], "alice");
    assert_eq!(a["owner"], "a@x");
    assert_eq!(a["window"], "monthly");
    assert_eq!(a["window_start"], month);
    assert_eq!(a["limit_nano_usd"], 25_000_000_000u64);
    assert_eq!(
        a["spent_nano_usd"], 4_250_000_001u64,
        "summed, last month left out"
    );
    assert_eq!(a["claimed_nano_usd"], 8_000_000_000u64);
    assert_eq!(a["remaining_nano_usd"], 20_749_999_999u64);
    assert_eq!(a["envoys"], 2);
    let b = &rows[1];
    assert_eq!(
        (&b["id"], &b["window_start"], &b["spent_nano_usd"]),
        (&json!("bob"), &json!(0), &json!(1_750_000_000u64))
    );
    assert_eq!(b["remaining_nano_usd"], -250_000_000i64);
    assert_eq!(b["envoys"], 1);

    // One token, per Envoy.
    let (one, _) = cli.ok(&["status", "--token", "alice"], None);
    assert_eq!(status_row(&one, "alice"), alice, "{one}");
    assert_eq!(
        status_row(&one, "envoy-a"),
        ["envoy-a", "$5.00", "$3.25"],
        "{one}"
    );
    assert_eq!(
        status_row(&one, "eu/envoy-b"),
        ["eu/envoy-b", "$3.00", "$1.000000001"],
        "{one}"
    );
    assert!(
        one.contains("ENVOY") && !one.contains("$24.00") && !one.contains("bob"),
        "{one}"
    );
    let (one, _) = cli.ok(&["status", "--token", "alice", "--json"], None);
    let one: Value = serde_json::from_str(&one).unwrap();
    assert_eq!(
        one["tokens"][0]["nodes"],
        json!([
            {"node": "envoy-a", "claimed_nano_usd": 5_000_000_000u64,
             "spent_nano_usd": 3_250_000_000u64, "reported_spend": true},
            {"node": "eu/envoy-b", "claimed_nano_usd": 3_000_000_000u64,
             "spent_nano_usd": 1_000_000_001u64, "reported_spend": true},
        ])
    );
    let (carol, _) = cli.ok(&["status", "--token", "carol"], None);
    assert_eq!(
        status_row(&carol, "carol"),
        ["carol", "c@x", "no", "budget", "-", "$0.00", "$0.00", "-", "0"],
        "{carol}"
    );
    assert!(
        carol.contains("no Envoy has claimed or reported spend"),
        "{carol}"
    );
    assert!(cli
        .fails(&["status", "--token", "ghost"], None, 1)
        .contains("no token with id 'ghost'"));

    // --all adds the tokens without a budget.
    let (all, _) = cli.ok(&["status", "--all"], None);
    assert_eq!(all.lines().count(), 4, "{all}");
    assert_eq!(status_row(&all, "carol")[2..4], ["no", "budget"], "{all}");
    let (all, _) = cli.ok(&["status", "--all", "--json"], None);
    let all: Value = serde_json::from_str(&all).unwrap();
    assert_eq!(
        all["tokens"][2],
        json!({"id": "carol", "owner": "c@x", "window": null, "window_start": 0,
               "limit_nano_usd": null, "spent_nano_usd": 0, "claimed_nano_usd": 0,
               "remaining_nano_usd": null, "envoys": 0, "nodes": [], "team": null})
    );
    assert_eq!(
        shieldkey::time::month_start(now_secs()),
        month,
        "a month boundary passed during the test: run it again"
    );

    // status only reads.
    let before = etcd.revision();
    cli.ok(&["status", "--all"], None);
    assert_eq!(etcd.revision(), before);
}

/// The row of team `id` in a `status` table (`team <id> ...`), split on whitespace.
fn status_team_row<'t>(table: &'t str, id: &str) -> Vec<&'t str> {
    table
        .lines()
        .find(|l| l.starts_with(&format!("team {id} ")))
        .unwrap_or_else(|| panic!("no row team {id} in\n{table}"))
        .split_whitespace()
        .collect()
}

#[test]
fn status_groups_by_team_and_sums_the_team_ledger() {
    let etcd = Etcd::start("status-teams");
    let cli = Cli::new(&etcd);
    cli.setup(&[]);
    cli.ok(
        &[
            "team",
            "create",
            "eng",
            "--description",
            "Engineering",
            "--budget-usd",
            "500",
            "--budget-window",
            "monthly",
        ],
        None,
    );
    cli.ok(&["team", "create", "ops"], None);
    let mint = |id: &str, extra: &[&str]| {
        let mut args = vec!["mint", "--id", id, "--upstream-key", "prod"];
        args.extend_from_slice(extra);
        cli.ok(&args, None);
    };
    let monthly_150 = ["--budget-usd", "150", "--budget-window", "monthly"];
    mint(
        "alice",
        &[&["--team", "eng", "--owner", "a@x"][..], &monthly_150].concat(),
    );
    mint("bob", &["--team", "eng"]);
    mint(
        "carol",
        &["--budget-usd", "1.50", "--budget-window", "lifetime"],
    );
    mint(
        "dave",
        &[
            "--team",
            "ops",
            "--budget-usd",
            "2",
            "--budget-window",
            "lifetime",
        ],
    );
    mint("erin", &[]);

    // The ledger as two Envoys leave it: a team's keys are under its subject id `team.<id>`,
    // windowed by the team's own budget.
    let now = now_secs();
    let month = shieldkey::time::month_start(now);
    let last_month = shieldkey::time::month_start(month - 1);
    let ledger = |key: &str, field: &str, n: u64| {
        etcd.put(
            &format!("shieldkey/ledger/{key}"),
            &format!("{{\"{field}\":{n}}}"),
        );
    };
    ledger(
        &format!("pool/team.eng/{month}"),
        "claimed",
        120_000_000_000,
    );
    ledger(
        &format!("node/envoy-a/team.eng/{month}/claimed"),
        "claimed",
        70_000_000_000,
    );
    ledger(
        &format!("node/envoy-a/team.eng/{month}/spent"),
        "spent",
        41_250_000_000,
    );
    ledger(
        &format!("node/eu/envoy-b/team.eng/{month}/claimed"),
        "claimed",
        50_000_000_000,
    );
    ledger(
        &format!("node/eu/envoy-b/team.eng/{month}/spent"),
        "spent",
        8_750_000_001,
    );
    // Last month's team window: not counted.
    ledger(
        &format!("node/envoy-a/team.eng/{last_month}/spent"),
        "spent",
        499_000_000_000,
    );
    // A key under the bare team id is no team's (and no token's).
    ledger(&format!("node/envoy-a/eng/{month}/spent"), "spent", 7);
    // The members' own budgets.
    ledger(&format!("pool/alice/{month}"), "claimed", 40_000_000_000);
    ledger(
        &format!("node/envoy-a/alice/{month}/claimed"),
        "claimed",
        40_000_000_000,
    );
    ledger(
        &format!("node/envoy-a/alice/{month}/spent"),
        "spent",
        30_000_000_000,
    );
    ledger("pool/dave/0", "claimed", 2_000_000_000);
    ledger("node/eu/envoy-b/dave/0/claimed", "claimed", 2_000_000_000);
    ledger("node/eu/envoy-b/dave/0/spent", "spent", 1_000_000_000);
    ledger("pool/carol/0", "claimed", 1_500_000_000);
    ledger("node/envoy-a/carol/0/claimed", "claimed", 1_500_000_000);
    ledger("node/envoy-a/carol/0/spent", "spent", 250_000_000);

    let window = format!("monthly from {}", shieldkey::time::format_rfc3339(month));
    let window_words: Vec<&str> = window.split(' ').collect();
    let mut eng = vec!["team", "eng", "-"];
    eng.extend_from_slice(&window_words);
    eng.extend_from_slice(&["$500.00", "$50.000000001", "$120.00", "$449.999999999", "2"]);
    let mut alice = vec!["alice", "a@x"];
    alice.extend_from_slice(&window_words);
    alice.extend_from_slice(&["$150.00", "$30.00", "$40.00", "$120.00", "1"]);
    let ops = [
        "team", "ops", "-", "no", "budget", "-", "$0.00", "$0.00", "-", "0",
    ];
    let dave = [
        "dave", "-", "lifetime", "$2.00", "$1.00", "$2.00", "$1.00", "1",
    ];
    let carol = [
        "carol", "-", "lifetime", "$1.50", "$0.25", "$1.50", "$1.25", "1",
    ];

    // Budgeted teams and tokens, each team followed by its members, then the tokens in no team.
    let (table, err) = cli.ok(&["status"], None);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 7, "{table}");
    assert!(lines[0].starts_with("TOKEN "), "{table}");
    assert_eq!(status_team_row(&table, "eng"), eng, "{table}");
    assert!(lines[1].starts_with("team eng "), "{table}");
    assert!(lines[2].starts_with("  alice "), "{table}");
    assert_eq!(status_row(&table, "alice"), alice, "{table}");
    // ops has no budget of its own: shown for dave, who has one.
    assert!(lines[3].starts_with("team ops "), "{table}");
    assert_eq!(status_team_row(&table, "ops"), ops, "{table}");
    assert!(lines[4].starts_with("  dave "), "{table}");
    assert_eq!(status_row(&table, "dave"), dave, "{table}");
    assert_eq!(lines[5], "(no team)", "{table}");
    assert!(lines[6].starts_with("  carol "), "{table}");
    assert_eq!(status_row(&table, "carol"), carol, "{table}");
    assert!(
        !table.contains("bob") && !table.contains("erin") && !table.contains("$499"),
        "{table}"
    );
    assert!(
        err.contains("2 teams, 3 tokens (2 without a budget: --all lists them)"),
        "{err}"
    );

    // --all: bob under eng, erin in no team.
    let (all, _) = cli.ok(&["status", "--all"], None);
    let lines: Vec<&str> = all.lines().collect();
    assert_eq!(lines.len(), 9, "{all}");
    assert!(
        lines[1].starts_with("team eng ")
            && lines[2].starts_with("  alice ")
            && lines[3].starts_with("  bob ")
            && lines[4].starts_with("team ops ")
            && lines[5].starts_with("  dave ")
            && lines[6] == "(no team)"
            && lines[7].starts_with("  carol ")
            && lines[8].starts_with("  erin "),
        "{all}"
    );
    assert_eq!(
        status_row(&all, "bob"),
        ["bob", "-", "no", "budget", "-", "$0.00", "$0.00", "-", "0"],
        "{all}"
    );

    // JSON: the teams with their members, and each token's team.
    let (json, _) = cli.ok(&["status", "--json"], None);
    let json: Value = serde_json::from_str(&json).unwrap();
    let teams = json["teams"].as_array().unwrap();
    assert_eq!(teams.len(), 2, "{json:#}");
    assert_eq!(
        teams[0],
        json!({
            "id": "eng", "description": "Engineering", "window": "monthly",
            "window_start": month, "limit_nano_usd": 500_000_000_000u64,
            "spent_nano_usd": 50_000_000_001u64, "claimed_nano_usd": 120_000_000_000u64,
            "remaining_nano_usd": 449_999_999_999u64, "envoys": 2,
            "nodes": [
                {"node": "envoy-a", "claimed_nano_usd": 70_000_000_000u64,
                 "spent_nano_usd": 41_250_000_000u64, "reported_spend": true},
                {"node": "eu/envoy-b", "claimed_nano_usd": 50_000_000_000u64,
                 "spent_nano_usd": 8_750_000_001u64, "reported_spend": true},
            ],
            "members": ["alice", "bob"],
        })
    );
    assert_eq!(
        (&teams[1]["id"], &teams[1]["window"], &teams[1]["members"]),
        (&json!("ops"), &Value::Null, &json!(["dave"]))
    );
    let tokens = json["tokens"].as_array().unwrap();
    let ids: Vec<(&str, &Value)> = tokens
        .iter()
        .map(|t| (t["id"].as_str().unwrap(), &t["team"]))
        .collect();
    assert_eq!(
        ids,
        [
            ("alice", &json!("eng")),
            ("dave", &json!("ops")),
            ("carol", &Value::Null)
        ]
    );
    assert_eq!(tokens[0]["spent_nano_usd"], 30_000_000_000u64);
    assert_eq!(tokens[0]["remaining_nano_usd"], 120_000_000_000u64);

    // One team: its row and every member's, then the team's budget per Envoy.
    let (one, err) = cli.ok(&["status", "--team", "eng"], None);
    let lines: Vec<&str> = one.lines().collect();
    assert_eq!(status_team_row(&one, "eng"), eng, "{one}");
    assert!(
        lines[1].starts_with("team eng ")
            && lines[2].starts_with("  alice ")
            && lines[3].starts_with("  bob ")
            && lines[4].is_empty()
            && lines[5].starts_with("ENVOY "),
        "{one}"
    );
    assert_eq!(
        status_row(&one, "envoy-a"),
        ["envoy-a", "$70.00", "$41.25"],
        "{one}"
    );
    assert_eq!(
        status_row(&one, "eu/envoy-b"),
        ["eu/envoy-b", "$50.00", "$8.750000001"],
        "{one}"
    );
    assert_eq!(lines.len(), 8, "{one}");
    assert!(
        !one.contains("carol") && !one.contains("dave") && !one.contains("$499"),
        "{one}"
    );
    assert!(err.contains("1 team, 2 tokens;"), "{err}");
    let (one, _) = cli.ok(&["status", "--team", "eng", "--json"], None);
    let one: Value = serde_json::from_str(&one).unwrap();
    assert_eq!(one["teams"], json!([teams[0]]));
    assert_eq!(one["tokens"][0]["id"], "alice");
    assert_eq!(one["tokens"][1]["id"], "bob");
    assert_eq!(one["tokens"][1]["team"], "eng");
    assert_eq!(one["tokens"].as_array().unwrap().len(), 2);

    let (ops_one, _) = cli.ok(&["status", "--team", "ops"], None);
    assert_eq!(status_team_row(&ops_one, "ops"), ops, "{ops_one}");
    assert!(
        ops_one.contains("no Envoy has claimed or reported spend"),
        "{ops_one}"
    );
    assert!(cli
        .fails(&["status", "--team", "ghost"], None, 1)
        .contains("no team with id 'ghost'"));
    assert!(cli
        .fails(&["status", "--team", "eng", "--token", "alice"], None, 2)
        .contains("--token and --team exclude each other"));

    // One token: its row alone; the JSON names its team.
    let (alone, _) = cli.ok(&["status", "--token", "alice", "--json"], None);
    let alone: Value = serde_json::from_str(&alone).unwrap();
    assert_eq!(alone["teams"], json!([]));
    assert_eq!(alone["tokens"][0]["team"], "eng");
    assert_eq!(
        shieldkey::time::month_start(now_secs()),
        month,
        "a month boundary passed during the test: run it again"
    );
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[test]
fn status_needs_fleet_mode() {
    let dir = std::env::temp_dir().join(format!("shieldkey-status-file-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_shieldkey"))
        .args(["status", "--json"])
        .current_dir(&dir)
        .env_remove("SHIELDKEY_ETCD")
        .env("SHIELDKEY_POLICY", dir.join("policy.json"))
        .output()
        .unwrap();
    let _ = fs::remove_dir_all(&dir);
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(out.stdout.is_empty());
    assert!(
        err.contains("needs fleet mode (--etcd URLS or SHIELDKEY_ETCD)")
            && err.contains("/stats")
            && err.contains("wasmcustom.shieldkey.token_id.<id>.spend_nano_usd"),
        "{err}"
    );
}

/// A throwaway CA, etcd's server certificate for 127.0.0.1 (an IP SAN only), a client
/// certificate, and a second CA that signed none of them; made with `openssl`.
struct Certs {
    dir: PathBuf,
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
    other_ca: PathBuf,
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

impl Certs {
    fn make(name: &str) -> Certs {
        let dir =
            std::env::temp_dir().join(format!("shieldkey-certs-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(&dir)
                .output()
                .expect("openssl is installed");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let key = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ];
        for ca in ["ca", "other-ca"] {
            let mut args = vec!["req", "-x509", "-days", "2"];
            args.extend_from_slice(&key);
            let (keyout, out, subject) = (
                format!("{ca}.key"),
                format!("{ca}.pem"),
                format!("/CN=shieldkey test {ca}"),
            );
            args.extend_from_slice(&["-keyout", &keyout, "-out", &out, "-subj", &subject]);
            openssl(&args);
        }
        for (leaf, ext) in [
            (
                "server",
                "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n\
                 basicConstraints=CA:FALSE\n",
            ),
            (
                "client",
                "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n",
            ),
        ] {
            fs::write(dir.join(format!("{leaf}.ext")), ext).unwrap();
            let mut args = vec!["req"];
            args.extend_from_slice(&key);
            let (keyout, csr, subject) = (
                format!("{leaf}.key"),
                format!("{leaf}.csr"),
                format!("/CN={leaf}"),
            );
            args.extend_from_slice(&["-keyout", &keyout, "-out", &csr, "-subj", &subject]);
            openssl(&args);
            let (out, extfile) = (format!("{leaf}.pem"), format!("{leaf}.ext"));
            openssl(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-out",
                &out,
                "-extfile",
                &extfile,
            ]);
        }
        Certs {
            ca: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client.key"),
            other_ca: dir.join("other-ca.pem"),
            dir,
        }
    }
}

fn path(p: &std::path::Path) -> &str {
    p.to_str().unwrap()
}

/// The CLI against etcd's TLS port, with `ca` and, when given, the client certificate.
fn tls_cli(etcd: &Etcd, ca: &std::path::Path, client: Option<&Certs>) -> Cli {
    let mut cli = Cli::new(etcd)
        .at(&etcd.https_url())
        .with("SHIELDKEY_ETCD_CACERT", path(ca));
    if let Some(certs) = client {
        cli = cli
            .with("SHIELDKEY_ETCD_CERT", path(&certs.client_cert))
            .with("SHIELDKEY_ETCD_KEY", path(&certs.client_key));
    }
    cli
}

#[test]
fn init_seal_mint_list_status_over_tls_with_a_client_certificate() {
    let certs = Certs::make("roundtrip");
    let etcd = Etcd::start_with("tls-roundtrip", Some(&certs));
    let cli = tls_cli(&etcd, &certs.ca, Some(&certs));
    let (_, err) = cli.ok(&["init"], None);
    assert!(
        err.contains(&format!("etcd prefix shieldkey/ at {}", etcd.https_url())),
        "{err}"
    );
    cli.ok(&["seal", "--id", "prod"], Some(&format!("{REAL_KEY}\n")));
    let token = cli
        .ok(
            &[
                "mint",
                "--id",
                "alice",
                "--upstream-key",
                "prod",
                "--budget-usd",
                "5",
                "--budget-window",
                "monthly",
            ],
            None,
        )
        .0;
    assert!(token.trim().starts_with("sk_shield_t_alice_"), "{token}");
    // Written to etcd, as read back through the plain port.
    let kvs = etcd.range("shieldkey/");
    assert_eq!(
        keys(&kvs),
        [
            "shieldkey/policy/keys/prod",
            "shieldkey/policy/settings",
            "shieldkey/policy/tokens/alice"
        ]
    );
    assert!(cli.ok(&["list"], None).0.contains("alice"));
    // status reads the ledger over TLS too.
    let month = shieldkey::time::month_start(now_secs());
    etcd.put(
        &format!("shieldkey/ledger/node/envoy-a/alice/{month}/spent"),
        "{\"spent\":1250000000}",
    );
    let (table, _) = cli.ok(&["status"], None);
    assert!(status_row(&table, "alice").contains(&"$1.25"), "{table}");

    // The flags instead of the variables.
    let flags = Cli::new(&etcd).at(&etcd.https_url());
    let (out, _) = flags.ok(
        &[
            "--etcd-cacert",
            path(&certs.ca),
            "--etcd-cert",
            path(&certs.client_cert),
            "--etcd-key",
            path(&certs.client_key),
            "list",
        ],
        None,
    );
    assert!(out.contains("alice"), "{out}");
}

#[test]
fn tls_failures_are_clear_and_write_nothing() {
    let certs = Certs::make("failures");
    let etcd = Etcd::start_with("tls-failures", Some(&certs));
    let before = etcd.revision();

    // A CA that did not sign etcd's certificate: refused by the CLI before anything is sent.
    let wrong_ca = tls_cli(&etcd, &certs.other_ca, Some(&certs));
    let err = wrong_ca.fails(&["init"], None, 1);
    assert!(
        err.contains("invalid peer certificate: UnknownIssuer")
            && err.contains(&format!(
                "not signed by a CA in --etcd-cacert {}",
                path(&certs.other_ca)
            )),
        "{err}"
    );

    // etcd's certificate names 127.0.0.1, not localhost.
    let err = tls_cli(&etcd, &certs.ca, Some(&certs))
        .at(&format!("https://localhost:{}", etcd.tls_port.unwrap()))
        .fails(&["init"], None, 1);
    assert!(
        err.contains("not valid for name \"localhost\"")
            && err.contains("not made for 'localhost'"),
        "{err}"
    );

    // No client certificate: etcd (--client-cert-auth) refuses the session.
    let anonymous = tls_cli(&etcd, &certs.ca, None);
    let err = anonymous.fails(&["init"], None, 1);
    assert!(
        err.contains("requires a client certificate") && err.contains("--etcd-cert"),
        "{err}"
    );
    // A certificate etcd's CA did not sign (the server's own key pair is fine for the CLI).
    let err = anonymous
        .with("SHIELDKEY_ETCD_CERT", path(&certs.other_ca))
        .with("SHIELDKEY_ETCD_KEY", path(&certs.dir.join("other-ca.key")))
        .fails(&["init"], None, 1);
    assert!(
        err.contains(&format!(
            "refused the client certificate in --etcd-cert {}",
            path(&certs.other_ca)
        )),
        "{err}"
    );

    // Plain HTTP to the TLS port, TLS to the plain port.
    let err = Cli::new(&etcd)
        .at(&format!("http://127.0.0.1:{}", etcd.tls_port.unwrap()))
        .fails(&["init"], None, 1);
    assert!(err.contains("give its URL as https://"), "{err}");
    let err = tls_cli(&etcd, &certs.ca, Some(&certs))
        .at(&format!("https://127.0.0.1:{}", etcd.port))
        .fails(&["init"], None, 1);
    assert!(err.contains("does it serve TLS there?"), "{err}");

    assert!(etcd.range("shieldkey/").is_empty());
    assert_eq!(etcd.revision(), before, "nothing was written");
}

#[test]
fn tls_options_are_checked_before_etcd_is_asked() {
    let certs = Certs::make("options");
    let dir = certs.dir.clone();
    let cli = Cli {
        urls: format!("https://127.0.0.1:{}", free_port()),
        master: "unused".to_string(),
        policy_file: dir.join("policy.json"),
        env: Vec::new(),
    };
    let ca = path(&certs.ca);
    let err = cli.fails(&["list"], None, 2);
    assert!(
        err.contains("https:// etcd URLs need --etcd-cacert PATH"),
        "{err}"
    );
    let err = cli
        .with("SHIELDKEY_ETCD_CERT", path(&certs.client_cert))
        .fails(&["--etcd-cacert", ca, "list"], None, 2);
    assert!(
        err.contains("SHIELDKEY_ETCD_CERT needs --etcd-key PATH"),
        "{err}"
    );
    let err = cli.at(&format!("http://127.0.0.1:{}", free_port())).fails(
        &["--etcd-cacert", ca, "list"],
        None,
        2,
    );
    assert!(
        err.contains("--etcd-cacert is for https:// etcd URLs"),
        "{err}"
    );
    let err = cli.at("http://127.0.0.1:1,https://127.0.0.1:2").fails(
        &["--etcd-cacert", ca, "list"],
        None,
        2,
    );
    assert!(err.contains("the same scheme"), "{err}");
    // Files: named, with the reason; a key's contents are never echoed.
    let err = cli.fails(&["--etcd-cacert", "/nonexistent/ca.pem", "list"], None, 1);
    assert!(
        err.contains("--etcd-cacert /nonexistent/ca.pem: No such file"),
        "{err}"
    );
    let key_text = fs::read_to_string(&certs.client_key).unwrap();
    let err = cli.fails(&["--etcd-cacert", path(&certs.client_key), "list"], None, 1);
    assert!(err.contains("no PEM certificate in it"), "{err}");
    let err = cli.fails(
        &[
            "--etcd-cacert",
            ca,
            "--etcd-cert",
            path(&certs.client_cert),
            "--etcd-key",
            path(&certs.server_key),
            "list",
        ],
        None,
        1,
    );
    assert!(
        err.contains("is not the key of the certificate in --etcd-cert"),
        "{err}"
    );
    for line in key_text.lines().filter(|l| !l.starts_with("-----")) {
        assert!(!err.contains(line), "{err}");
    }
}

#[test]
fn a_change_to_one_token_reads_that_token_only() {
    let etcd = Etcd::start("scoped");
    let cli = Cli::new(&etcd);
    cli.setup(&["alice", "bob"]);
    // A token key that would not even parse: a change to another token must not read it.
    etcd.put("shieldkey/policy/tokens/zed", "{not json");
    cli.ok(&["revoke", "alice"], None);
    assert!(cli
        .fails(&["list"], None, 1)
        .contains("shieldkey/policy/tokens/zed"));
}

#[test]
fn revoke_by_owner_is_one_change_of_exactly_those_tokens() {
    let etcd = Etcd::start("owner");
    let cli = Cli::new(&etcd);
    cli.ok(&["init"], None);
    cli.ok(&["seal", "--id", "prod"], Some(REAL_KEY));
    let alice = "alice@example.com";
    for (id, owner) in [
        ("a1", alice),
        ("a2", alice),
        ("a3", alice),
        ("b1", "bob@example.com"),
    ] {
        cli.ok(
            &[
                "mint",
                "--id",
                id,
                "--upstream-key",
                "prod",
                "--owner",
                owner,
            ],
            None,
        );
    }
    cli.ok(&["revoke", "a2"], None);
    let settings = "shieldkey/policy/settings";
    let policy_revision = etcd.value(settings)["revision"].as_u64().unwrap();
    let before = etcd.range("shieldkey/");
    let store_before = etcd.revision();

    // --dry-run: the same answer, nothing written.
    let (out, err) = cli.ok(&["revoke", "--owner", alice, "--dry-run"], None);
    assert_eq!(out, "a1\na3\n");
    assert!(
        err.contains(&format!(
            "dry run: would revoke 2 tokens of owner '{alice}' (policy revision \
             {policy_revision} -> {})",
            policy_revision + 1
        )),
        "{err}"
    );
    assert_eq!(etcd.revision(), store_before, "a dry run writes nothing");

    let (out, err) = cli.ok(&["revoke", "--owner", alice], None);
    assert_eq!(out, "a1\na3\n");
    assert!(
        err.contains(&format!(
            "revoked 2 tokens of owner '{alice}' (policy revision {}, etcd prefix shieldkey/",
            policy_revision + 1
        )),
        "{err}"
    );
    assert!(
        err.contains("left as they are (already revoked): a2"),
        "{err}"
    );
    assert_eq!(etcd.revision(), store_before + 1, "one transaction");
    assert_eq!(
        etcd.value(settings)["revision"].as_u64().unwrap(),
        policy_revision + 1,
        "one policy revision"
    );
    let after = etcd.range("shieldkey/");
    assert_eq!(keys(&after), keys(&before));
    let written: Vec<&str> = after
        .iter()
        .filter(|(k, v)| before[*k] != **v)
        .map(|(k, (_, m))| {
            assert_eq!(*m, store_before + 1, "{k}");
            k.as_str()
        })
        .collect();
    assert_eq!(
        written,
        [
            settings,
            "shieldkey/policy/tokens/a1",
            "shieldkey/policy/tokens/a3"
        ]
    );
    for (id, status) in [
        ("a1", "revoked"),
        ("a2", "revoked"),
        ("a3", "revoked"),
        ("b1", "active"),
    ] {
        let token = etcd.value(&format!("shieldkey/policy/tokens/{id}"));
        assert_eq!(token["status"].as_str().unwrap_or("active"), status, "{id}");
    }

    // Nothing to change, or --publish in fleet mode: refused, nothing written.
    let store = etcd.revision();
    assert!(cli
        .fails(&["revoke", "--owner", alice], None, 1)
        .contains("no active token of owner 'alice@example.com'"));
    assert!(cli
        .fails(&["revoke", "--owner", "b1@example.com"], None, 1)
        .contains("no token has owner 'b1@example.com'; nothing was changed"));
    cli.fails(
        &[
            "revoke",
            "--owner",
            "bob@example.com",
            "--publish",
            "x.json",
        ],
        None,
        2,
    );
    cli.fails(&["revoke", "b1", "--owner", "bob@example.com"], None, 2);
    assert_eq!(etcd.revision(), store);
    assert_eq!(
        etcd.value("shieldkey/policy/tokens/b1")["status"]
            .as_str()
            .unwrap_or("active"),
        "active"
    );

    // unrevoke --owner: every revoked token of alice, again in one transaction.
    let (out, _) = cli.ok(&["unrevoke", "--owner", alice], None);
    assert_eq!(out, "a1\na2\na3\n");
    assert_eq!(etcd.revision(), store + 1);
    assert_eq!(
        etcd.value(settings)["revision"].as_u64().unwrap(),
        policy_revision + 2
    );
    assert!(!cli.ok(&["list"], None).0.contains("revoked"));
}

#[test]
fn teams_live_at_their_own_keys_and_every_change_checks_them() {
    let etcd = Etcd::start("teams");
    let cli = Cli::new(&etcd);
    cli.setup(&[]);
    let (_, err) = cli.ok(
        &[
            "team",
            "create",
            "eng",
            "--description",
            "Engineering",
            "--budget-usd",
            "100",
            "--budget-window",
            "monthly",
            "--enforce",
            "false",
        ],
        None,
    );
    assert!(
        err.contains("created team 'eng' (policy revision 3, etcd prefix shieldkey/"),
        "{err}"
    );
    cli.ok(&["team", "create", "ops"], None);

    // One key per team, the compact RawTeam JSON; the settings never hold teams.
    let kvs = etcd.range("shieldkey/");
    assert_eq!(
        keys(&kvs),
        [
            "shieldkey/policy/keys/prod",
            "shieldkey/policy/settings",
            "shieldkey/policy/teams/eng",
            "shieldkey/policy/teams/ops"
        ]
    );
    let team_text = &kvs["shieldkey/policy/teams/eng"].0;
    let team: RawTeam = serde_json::from_str(team_text).unwrap();
    assert_eq!(*team_text, serde_json::to_string(&team).unwrap());
    assert_eq!(team.description.as_deref(), Some("Engineering"));
    assert_eq!(team.budget.unwrap().limit_usd, "100");
    assert_eq!(team.enforce, Some(false));
    assert_eq!(
        kvs["shieldkey/policy/settings"].0,
        r#"{"version":1,"revision":4,"upstream_keys":[],"tokens":[]}"#
    );
    assert!(cli
        .fails(&["team", "create", "eng"], None, 1)
        .contains("a team with id 'eng' exists"));

    // Membership is checked by token-scoped changes too (they read every team).
    assert!(cli
        .fails(
            &[
                "mint",
                "--id",
                "x",
                "--upstream-key",
                "prod",
                "--team",
                "ghost"
            ],
            None,
            1
        )
        .contains("no team 'ghost'"));
    for (id, team) in [("a1", "eng"), ("a2", "eng"), ("o1", "ops")] {
        cli.ok(
            &["mint", "--id", id, "--upstream-key", "prod", "--team", team],
            None,
        );
    }
    cli.ok(&["mint", "--id", "solo", "--upstream-key", "prod"], None);
    assert_eq!(etcd.value("shieldkey/policy/tokens/a1")["team"], "eng");
    let store = etcd.revision();
    assert!(cli
        .fails(&["limit", "solo", "--team", "ghost"], None, 1)
        .contains("no team 'ghost'"));
    assert_eq!(etcd.revision(), store, "nothing written");

    // team limit writes that team's key and the settings, nothing else.
    let before = etcd.range("shieldkey/");
    cli.ok(&["team", "limit", "ops", "--rpm", "30"], None);
    let after = etcd.range("shieldkey/");
    let written: Vec<&str> = after
        .iter()
        .filter(|(k, v)| before.get(*k) != Some(*v))
        .map(|(k, _)| k.as_str())
        .collect();
    assert_eq!(
        written,
        ["shieldkey/policy/settings", "shieldkey/policy/teams/ops"]
    );
    assert_eq!(
        etcd.value("shieldkey/policy/teams/ops")["rate_limit"]["requests_per_minute"],
        30
    );

    // list groups by team; --json names each token's team; team list counts members.
    let (list, _) = cli.ok(&["list"], None);
    let firsts: Vec<&str> = list
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().next().unwrap_or(""))
        .collect();
    assert_eq!(
        firsts,
        ["team", "a1", "a2", "team", "o1", "(no", "solo"],
        "{list}"
    );
    assert!(list.contains("team eng (2 tokens): Engineering; enforce=false (dry run)"));
    let (json, _) = cli.ok(&["list", "--json"], None);
    let json: Value = serde_json::from_str(&json).unwrap();
    let teams: Vec<&Value> = json["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| &t["team"])
        .collect();
    assert_eq!(
        teams,
        [&json!("eng"), &json!("eng"), &json!("ops"), &json!(null)]
    );
    let (json, _) = cli.ok(&["team", "list", "--json"], None);
    let json: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(json["teams"][0]["id"], "eng");
    assert_eq!(json["teams"][0]["member_ids"], json!(["a1", "a2"]));
    assert_eq!(json["teams"][1]["members"], 1);

    // revoke --team: one transaction of exactly those tokens; --dry-run writes nothing.
    let policy_revision = etcd.value("shieldkey/policy/settings")["revision"]
        .as_u64()
        .unwrap();
    let store = etcd.revision();
    let (out, err) = cli.ok(&["revoke", "--team", "eng", "--dry-run"], None);
    assert_eq!(out, "a1\na2\n");
    assert!(
        err.contains("dry run: would revoke 2 tokens of team 'eng'"),
        "{err}"
    );
    assert_eq!(etcd.revision(), store);
    let before = etcd.range("shieldkey/");
    let (out, _) = cli.ok(&["revoke", "--team", "eng"], None);
    assert_eq!(out, "a1\na2\n");
    assert_eq!(etcd.revision(), store + 1, "one transaction");
    let after = etcd.range("shieldkey/");
    let written: Vec<&str> = after
        .iter()
        .filter(|(k, v)| before.get(*k) != Some(*v))
        .map(|(k, _)| k.as_str())
        .collect();
    assert_eq!(
        written,
        [
            "shieldkey/policy/settings",
            "shieldkey/policy/tokens/a1",
            "shieldkey/policy/tokens/a2"
        ]
    );
    assert_eq!(
        etcd.value("shieldkey/policy/settings")["revision"],
        policy_revision + 1
    );

    // team remove: refused while tokens name the team; once empty, its key is deleted.
    let store = etcd.revision();
    let err = cli.fails(&["team", "remove", "eng"], None, 1);
    assert!(
        err.contains("team 'eng' still has 2 member tokens: a1, a2"),
        "{err}"
    );
    assert_eq!(etcd.revision(), store);
    cli.ok(&["limit", "a1", "--no-team"], None);
    cli.ok(&["limit", "a2", "--team", "ops"], None);
    assert!(etcd
        .value("shieldkey/policy/tokens/a1")
        .get("team")
        .is_none());
    let (_, err) = cli.ok(&["team", "remove", "eng"], None);
    assert!(err.contains("removed team 'eng'"), "{err}");
    assert!(!etcd
        .range("shieldkey/")
        .contains_key("shieldkey/policy/teams/eng"));

    // The policy-wide switch lives in the settings key.
    cli.ok(&["enforce", "false"], None);
    assert_eq!(etcd.value("shieldkey/policy/settings")["enforce"], false);
    assert_eq!(cli.ok(&["enforce"], None).0, "false\n");
    let (check, _) = cli.ok(&["check"], None);
    assert!(check.contains("1 teams"), "{check}");
}

#[test]
fn a_token_scoped_change_still_checks_the_team_it_names() {
    let etcd = Etcd::start("team-scoped");
    let cli = Cli::new(&etcd);
    cli.setup(&["alice"]);
    cli.ok(&["team", "create", "eng"], None);
    // A token key that would not even parse: a change to another token must not read it, yet
    // must still see every team.
    etcd.put("shieldkey/policy/tokens/zed", "{not json");
    cli.ok(&["limit", "alice", "--team", "eng"], None);
    assert_eq!(etcd.value("shieldkey/policy/tokens/alice")["team"], "eng");
    let store = etcd.revision();
    assert!(cli
        .fails(&["limit", "alice", "--team", "ghost"], None, 1)
        .contains("no team 'ghost'"));
    // A team removed behind the CLI's back (by hand): the token naming it fails validation,
    // which names the token's etcd key.
    let mut token = etcd.value("shieldkey/policy/tokens/alice");
    token["team"] = json!("gone");
    etcd.put("shieldkey/policy/tokens/alice", &token.to_string());
    let store_after_put = etcd.revision();
    assert!(store_after_put > store);
    let err = cli.fails(&["limit", "alice", "--rpm", "5"], None, 1);
    assert!(
        err.contains(
            "tokens[0].team (etcd key shieldkey/policy/tokens/alice): no team with id 'gone'"
        ),
        "{err}"
    );
    assert_eq!(etcd.revision(), store_after_put, "nothing written");
    // A team key whose id differs from its key name is refused, naming the key.
    etcd.put("shieldkey/policy/teams/ops", r#"{"id":"eng"}"#);
    assert!(cli
        .fails(&["limit", "alice", "--team", "eng"], None, 1)
        .contains("shieldkey/policy/teams/ops"));
    // Teams in the settings key are refused.
    etcd.call(
        "kv/deleterange",
        json!({"key": b64("shieldkey/policy/teams/ops")}),
    );
    let mut settings = etcd.value("shieldkey/policy/settings");
    settings["teams"] = json!([{"id": "x"}]);
    etcd.put("shieldkey/policy/settings", &settings.to_string());
    assert!(cli
        .fails(&["team", "list"], None, 1)
        .contains("teams must be empty"));
}

#[test]
fn import_moves_a_policy_file_into_etcd_and_its_tokens_keep_working() {
    let etcd = Etcd::start("import");
    let cli = Cli::new(&etcd);
    // A single-Envoy policy file: a sealed key, a team with a budget, two tokens (one revoked).
    let file = cli.with("SHIELDKEY_ETCD", "");
    let printed = file.setup_with_team(&["--rpm", "60"]);
    let path = cli.policy_file.to_str().unwrap().to_string();
    let on_file: Value = serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();

    // Refused without etcd: there is nothing to import into.
    assert!(file
        .fails(&["import", &path], None, 2)
        .contains("give --etcd URLS"));
    // Refused when the master key does not open the sealed keys: nothing written.
    let other = Cli::new(&etcd).master;
    let err = cli
        .with("SHIELDKEY_MASTER_KEY", &other)
        .fails(&["import", &path], None, 1);
    assert!(err.contains("wrong master key"), "{err}");
    assert!(!err.contains(REAL_KEY), "{err}");
    assert!(etcd.range("shieldkey/").is_empty(), "{err}");

    let (_, err) = cli.ok(&["import", &path], None);
    assert!(
        err.contains(&format!("imported {path}: 2 tokens, 1 teams, 1 upstream keys (policy revision 8, etcd prefix shieldkey/")),
        "{err}"
    );
    let kvs = etcd.range("shieldkey/");
    assert_eq!(
        keys(&kvs),
        [
            "shieldkey/policy/keys/prod",
            "shieldkey/policy/settings",
            "shieldkey/policy/teams/eng",
            "shieldkey/policy/tokens/alice",
            "shieldkey/policy/tokens/bob"
        ]
    );
    // The same policy, read back from etcd: tokens (digests, team, rules, status) as in the file.
    let (listed, _) = cli.ok(&["list", "--json"], None);
    let listed: Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed["revision"], 8);
    let alice: RawToken = serde_json::from_str(&kvs["shieldkey/policy/tokens/alice"].0).unwrap();
    let alice_on_file: RawToken = serde_json::from_value(
        on_file["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["id"] == "alice")
            .unwrap()
            .clone(),
    )
    .unwrap();
    assert_eq!(alice, alice_on_file);
    let team: RawTeam = serde_json::from_str(&kvs["shieldkey/policy/teams/eng"].0).unwrap();
    assert_eq!(team.id, "eng");
    let (check, _) = cli.ok(&["check"], None);
    assert!(
        check.contains("2 tokens (1 revoked), 1 upstream keys, 1 teams, all sealed keys open"),
        "{check}"
    );
    // The secret printed in file mode verifies against the digest now in etcd.
    let master = MasterKey::from_base64(&cli.master).unwrap();
    let presented = token::parse(printed[0].as_bytes()).unwrap();
    let digest: [u8; 32] = STANDARD.decode(&alice.digest).unwrap().try_into().unwrap();
    assert!(TokenVerifier::new(master.digest_key()).unwrap().verify(
        "alice",
        presented.secret_text(),
        &digest
    ));

    // A second import needs --force, and replaces: a token gone from the file leaves etcd.
    assert!(cli.fails(&["import", &path], None, 1).contains("--force"));
    file.ok(&["remove", "bob"], None);
    cli.ok(&["import", &path, "--force"], None);
    let kvs = etcd.range("shieldkey/");
    assert!(!kvs.contains_key("shieldkey/policy/tokens/bob"));
    assert!(kvs.contains_key("shieldkey/policy/tokens/alice"));
}

#[test]
fn settings_are_shown_and_replaced_in_etcd_validated_first() {
    let etcd = Etcd::start("settings");
    let cli = Cli::new(&etcd);
    cli.setup(&["alice"]);
    let (shown, _) = cli.ok(&["settings"], None);
    assert_eq!(serde_json::from_str::<Value>(&shown).unwrap(), json!({}));

    let wanted = json!({
        "alerts": {"thresholds_percent": [50, 90],
                   "webhook": {"cluster": "alerts", "path": "/hook"}},
        "pricing": {"models": [{"model": "ft:small:acme", "input_usd_per_mtok": "0.5",
                                "output_usd_per_mtok": "2"}]}
    });
    let (_, err) = cli.ok(&["settings", "set", "-"], Some(&wanted.to_string()));
    assert!(
        err.contains("policy-wide settings replaced (pricing set, requests default, alerts set) (policy revision 4"),
        "{err}"
    );
    let kvs = etcd.range("shieldkey/");
    let stored: Value = serde_json::from_str(&kvs["shieldkey/policy/settings"].0).unwrap();
    assert_eq!(stored["alerts"], wanted["alerts"]);
    assert_eq!(stored["pricing"], wanted["pricing"]);
    assert_eq!(stored["revision"], 4);
    // The tokens and keys were not rewritten.
    let (shown, _) = cli.ok(&["settings"], None);
    assert_eq!(serde_json::from_str::<Value>(&shown).unwrap(), wanted);

    // Refused with the field named, nothing written: an unknown field, a threshold the
    // compiler refuses, and anything but an object of those sections.
    let before = etcd.range("shieldkey/");
    let err = cli.fails(
        &["settings", "set", "-"],
        Some(r#"{"alerts":{"thresholds":[50]}}"#),
        1,
    );
    assert!(err.contains("stdin: alerts"), "{err}");
    let err = cli.fails(
        &["settings", "set", "-"],
        Some(r#"{"alerts":{"thresholds_percent":[0]}}"#),
        1,
    );
    assert!(err.contains("alerts.thresholds_percent"), "{err}");
    let err = cli.fails(&["settings", "set", "-"], Some(r#"{"tokens":[]}"#), 1);
    assert!(err.contains("unknown field `tokens`"), "{err}");
    assert_eq!(etcd.range("shieldkey/"), before);

    // An empty object puts every section back to its default.
    cli.ok(&["settings", "set", "-"], Some("{}"));
    let (shown, _) = cli.ok(&["settings"], None);
    assert_eq!(serde_json::from_str::<Value>(&shown).unwrap(), json!({}));
}

#[test]
fn export_writes_the_policy_in_etcd_to_a_file_that_imports_back() {
    let etcd = Etcd::start("export");
    let cli = Cli::new(&etcd);
    let printed = cli.setup_with_team(&[]);
    let (listed_before, _) = cli.ok(&["list", "--json"], None);
    let out = etcd.dir.join("backup.json");
    let out_path = out.to_str().unwrap();

    let (_, err) = cli.ok(&["export", out_path], None);
    assert!(
        err.contains("2 tokens, 1 teams, 1 upstream keys (policy revision 7)"),
        "{err}"
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        fs::metadata(&out).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let exported: Value = serde_json::from_str(&fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(exported["revision"], 7);
    let text = fs::read_to_string(&out).unwrap();
    assert!(!text.contains(&printed[0]) && !text.contains(REAL_KEY));
    // The file is a policy the CLI works on as it is: the token printed at mint verifies.
    let on_file = cli
        .with("SHIELDKEY_ETCD", "")
        .with("SHIELDKEY_POLICY", out_path);
    let (check, _) = on_file.ok(&["check"], None);
    assert!(
        check.contains("2 tokens (1 revoked), 1 upstream keys, 1 teams, all sealed keys open"),
        "{check}"
    );

    assert!(cli
        .fails(&["export", out_path], None, 1)
        .contains("--force"));
    assert!(on_file
        .fails(&["export", out_path], None, 2)
        .contains("give --etcd URLS"));

    // Into a fresh prefix and back out: the same tokens, teams and keys.
    let other = cli.with("SHIELDKEY_ETCD_PREFIX", "copy/");
    other.ok(&["import", out_path], None);
    let (listed_after, _) = other.ok(&["list", "--json"], None);
    let mut before: Value = serde_json::from_str(&listed_before).unwrap();
    let mut after: Value = serde_json::from_str(&listed_after).unwrap();
    before["revision"] = Value::Null;
    after["revision"] = Value::Null;
    assert_eq!(before, after);
}

#[test]
fn release_node_gives_back_what_a_stopped_envoy_did_not_spend() {
    let etcd = Etcd::start("release");
    let cli = Cli::new(&etcd);
    etcd.put("shieldkey/ledger/pool/alice/0", r#"{"claimed":700}"#);
    etcd.put(
        "shieldkey/ledger/node/e1/alice/0/claimed",
        r#"{"claimed":500}"#,
    );
    etcd.put("shieldkey/ledger/node/e1/alice/0/spent", r#"{"spent":200}"#);
    // Without --stopped: refused, nothing written.
    let before = etcd.revision();
    let err = cli.fails(&["release-node", "e1"], None, 2);
    assert!(err.contains("--stopped"), "{err}");
    assert_eq!(etcd.revision(), before);
    // Single-Envoy mode has no ledger to release.
    let err = cli
        .at("")
        .fails(&["release-node", "e1", "--stopped"], None, 2);
    assert!(err.contains("--etcd"), "{err}");

    let (out, err) = cli.ok(&["release-node", "e1", "--stopped"], None);
    assert!(out.contains("alice\twindow 0\treleased"), "{out}");
    assert!(err.contains("released"), "{err}");
    assert_eq!(etcd.value("shieldkey/ledger/pool/alice/0")["claimed"], 400);
    assert_eq!(
        etcd.value("shieldkey/ledger/node/e1/alice/0/claimed")["claimed"],
        200
    );
    let err = cli.fails(&["release-node", "e2", "--stopped"], None, 1);
    assert!(err.contains("no Envoy 'e2'"), "{err}");
}
