//! The `shieldkey` binary, run as an operator would, in a temporary directory.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use std::fs;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde_json::json;
use shieldkey::config::compile::{compile_bytes, CompileOptions};
use shieldkey::master_key::MasterKey;
use shieldkey::token;
use shieldkey::token_digest::TokenVerifier;

struct Workspace {
    dir: PathBuf,
    master: String,
}

impl Workspace {
    fn new(name: &str) -> Workspace {
        let dir = std::env::temp_dir().join(format!("shieldkey-cli-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let mut ws = Workspace {
            dir,
            master: String::new(),
        };
        let out = ws.run(&["keygen"], None);
        assert!(out.status.success());
        ws.master = String::from_utf8(out.stdout).unwrap().trim().to_string();
        ws
    }

    fn policy(&self) -> PathBuf {
        self.dir.join("policy.json")
    }

    fn run(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_shieldkey"));
        cmd.args(args)
            .current_dir(&self.dir)
            .env("SHIELDKEY_POLICY", self.policy())
            .env("SHIELDKEY_MASTER_KEY", &self.master)
            .env_remove("SHIELDKEY_PUBLISH")
            .env_remove("SHIELDKEY_WASM")
            .env_remove("SHIELDKEY_ADMIN")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let mut pipe = child.stdin.take().unwrap();
        // A command that fails before reading stdin closes it: that is not the test's failure.
        if let Err(e) = pipe.write_all(stdin.unwrap_or("").as_bytes()) {
            assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "{e}");
        }
        drop(pipe);
        child.wait_with_output().unwrap()
    }

    fn ok(&self, args: &[&str], stdin: Option<&str>) -> String {
        let out = self.run(args, stdin);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn fails(&self, args: &[&str], stdin: Option<&str>, code: i32) -> String {
        let out = self.run(args, stdin);
        assert_eq!(out.status.code(), Some(code), "{args:?}");
        String::from_utf8(out.stderr).unwrap()
    }
}

/// `printed` is token `id`'s, as `mint` printed it: its secret verifies against the digest the
/// policy file stores, under the workspace's master key.
fn assert_token_verifies(ws: &Workspace, id: &str, printed: &str) {
    assert!(
        printed.starts_with(&format!("sk_shield_t_{id}_")),
        "{printed:?}"
    );
    let policy = read_json(&ws.policy());
    let record = token_of(&policy, id);
    let digest: [u8; 32] = STANDARD
        .decode(record["digest"].as_str().unwrap())
        .unwrap()
        .try_into()
        .unwrap();
    let master = MasterKey::from_base64(&ws.master).unwrap();
    let verifier = TokenVerifier::new(master.digest_key()).unwrap();
    let presented = token::parse(printed.as_bytes()).unwrap();
    assert!(verifier.verify(id, presented.secret_text(), &digest));
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&fs::read(path).unwrap()).unwrap()
}

const REAL_KEY: &str = "AbCdEfGhIjKlMnOpQrStUvWxYz012345";

#[test]
fn mint_seal_revoke_publish_round_trip() {
    let ws = Workspace::new("roundtrip");
    ws.ok(&["init"], None);
    ws.ok(&["seal", "--id", "prod"], Some(&format!("{REAL_KEY}\n")));
    let token = ws.ok(
        &[
            "mint",
            "--id",
            "alice",
            "--upstream-key",
            "prod",
            "--owner",
            "a@x",
            "--ttl",
            "1h",
        ],
        None,
    );
    let token = token.trim();
    assert!(token.starts_with("sk_shield_t_alice_"));

    // Only the digest is stored, and it verifies the printed token under the master key.
    let policy = read_json(&ws.policy());
    let stored = policy.to_string();
    assert!(!stored.contains(token) && !stored.contains(REAL_KEY));
    assert_token_verifies(&ws, "alice", token);
    let master = MasterKey::from_base64(&ws.master).unwrap();

    // The sealed key opens to the real key with the filter's own compiler.
    let compiled = compile_bytes(
        &fs::read(ws.policy()).unwrap(),
        &CompileOptions {
            master_key: Some(&master),
        },
    )
    .unwrap();
    assert_eq!(
        compiled.authorization_for(0).unwrap().expose(),
        format!("Bearer {REAL_KEY}").as_bytes()
    );

    let list = ws.ok(&["list"], None);
    assert!(list.contains("alice") && list.contains("active") && !list.contains(REAL_KEY));
    let json = ws.ok(&["list", "--json"], None);
    assert!(!json.contains("digest") && !json.contains("skseal"));

    fs::create_dir(ws.dir.join("filter")).unwrap();
    ws.ok(
        &[
            "revoke",
            "alice",
            "--publish",
            "filter/shieldkey.json",
            "--wasm",
            "/opt/shieldkey.wasm",
        ],
        None,
    );
    let ecds = read_json(&ws.dir.join("filter/shieldkey.json"));
    let revision = read_json(&ws.policy())["revision"].as_u64().unwrap();
    assert_eq!(ecds["version_info"], revision.to_string());
    let cfg = &ecds["resources"][0]["typed_config"]["config"];
    assert_eq!(
        cfg["vm_config"]["code"]["local"]["filename"],
        "/opt/shieldkey.wasm"
    );
    let inner: serde_json::Value = serde_json::from_slice(
        &shieldkey::envoy_render::policy_of_configuration(&cfg["configuration"]).unwrap(),
    )
    .unwrap();
    assert_eq!(inner["tokens"][0]["status"], "revoked");
    assert!(ws.ok(&["list"], None).contains("revoked"));

    // Atomic writes leave no temporary files behind.
    for dir in [ws.dir.clone(), ws.dir.join("filter")] {
        for entry in fs::read_dir(dir).unwrap() {
            let name = entry.unwrap().file_name().into_string().unwrap();
            assert!(!name.contains(".tmp"), "{name}");
        }
    }
    let check = ws.ok(&["check"], None);
    assert!(check.starts_with("ok: revision"), "{check}");
}

#[test]
fn secrets_are_never_taken_from_argv_and_bad_input_is_refused() {
    let ws = Workspace::new("refuse");
    ws.ok(&["init"], None);
    let err = ws.fails(&["seal", "--id", "prod", REAL_KEY], None, 2);
    assert!(err.contains("unexpected argument"), "{err}");
    assert!(!err.contains(REAL_KEY));
    assert!(ws
        .fails(&["seal", "--id", "prod"], Some(""), 1)
        .contains("empty"));
    assert!(ws
        .fails(&["seal", "--id", "prod"], Some("bad\u{7}key"), 1)
        .contains("header"));
    assert!(ws
        .fails(&["seal", "--id", "Bad_Id"], Some(REAL_KEY), 2)
        .contains("--id"));
    ws.ok(&["seal", "--id", "prod"], Some(REAL_KEY));
    let before = fs::read(ws.policy()).unwrap();
    assert!(ws
        .fails(&["mint", "--id", "x", "--upstream-key", "nope"], None, 1)
        .contains("no upstream key 'nope'"));
    assert!(ws
        .fails(
            &["mint", "--id", "x", "--upstream-key", "prod", "--ttl", "5w"],
            None,
            2
        )
        .contains("--ttl"));
    assert!(ws
        .fails(
            &[
                "mint",
                "--id",
                "x",
                "--upstream-key",
                "prod",
                "--expires-at",
                "tomorrow"
            ],
            None,
            2
        )
        .contains("RFC 3339"));
    assert_eq!(
        fs::read(ws.policy()).unwrap(),
        before,
        "a refused change must not touch the policy"
    );
    assert!(ws
        .fails(&["revoke", "ghost"], None, 1)
        .contains("no token with id 'ghost'"));
    assert!(ws
        .fails(&["frobnicate"], None, 2)
        .contains("unknown command"));
    assert!(ws.fails(&["init"], None, 1).contains("--force"));
}

#[test]
fn mint_without_the_master_key_fails_clearly() {
    let ws = Workspace::new("nomaster");
    ws.ok(&["init"], None);
    ws.ok(&["seal", "--id", "prod"], Some(REAL_KEY));
    let out = Command::new(env!("CARGO_BIN_EXE_shieldkey"))
        .args(["mint", "--id", "a", "--upstream-key", "prod"])
        .env("SHIELDKEY_POLICY", ws.policy())
        .env_remove("SHIELDKEY_MASTER_KEY")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("SHIELDKEY_MASTER_KEY is not set"));
    assert!(out.stdout.is_empty());
}

#[test]
fn check_reports_the_field_path_of_a_hand_broken_policy() {
    let ws = Workspace::new("check");
    ws.ok(&["init"], None);
    ws.ok(&["seal", "--id", "prod"], Some(REAL_KEY));
    ws.ok(&["mint", "--id", "alice", "--upstream-key", "prod"], None);
    let mut doc = read_json(&ws.policy());
    doc["tokens"][0]["budget"] = serde_json::json!({"limit_usd": "ten", "window": "daily"});
    fs::write(ws.policy(), doc.to_string()).unwrap();
    let out = ws.run(&["check"], None);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("tokens[0].budget.limit_usd"));

    doc["tokens"][0].as_object_mut().unwrap().remove("budget");
    doc["tokens"][0]["colour"] = serde_json::json!("blue");
    fs::write(ws.policy(), doc.to_string()).unwrap();
    let err = String::from_utf8(ws.run(&["check"], None).stderr).unwrap();
    assert!(err.contains("tokens[0]") && err.contains("colour"), "{err}");

    // A different master key cannot open the sealed key.
    doc["tokens"][0].as_object_mut().unwrap().remove("colour");
    fs::write(ws.policy(), doc.to_string()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_shieldkey"))
        .arg("check")
        .env("SHIELDKEY_POLICY", ws.policy())
        .env("SHIELDKEY_MASTER_KEY", MasterKey::to_base64(&[7u8; 32]))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("upstream_keys[0].sealed"));
}

#[test]
fn rules_are_set_at_mint_and_changed_with_limit() {
    let ws = Workspace::new("limit");
    ws.ok(&["init"], None);
    ws.ok(&["seal", "--id", "prod"], Some(REAL_KEY));
    ws.ok(
        &[
            "mint",
            "--id",
            "bot",
            "--upstream-key",
            "prod",
            "--budget-usd",
            "25.00",
            "--budget-window",
            "monthly",
            "--rpm",
            "60",
            "--cidrs",
            "10.0.0.0/8,2001:db8::/32",
        ],
        None,
    );
    let token = |ws: &Workspace| read_json(&ws.policy())["tokens"][0].clone();
    let t = token(&ws);
    assert_eq!(t["budget"]["limit_usd"], "25.00");
    assert_eq!(t["rate_limit"]["requests_per_minute"], 60);
    assert_eq!(t["source_cidrs"][1], "2001:db8::/32");

    ws.ok(
        &[
            "limit",
            "bot",
            "--budget-usd",
            "50",
            "--models",
            "mistral-small-*",
            "--max-tokens",
            "1024",
            "--rpm",
            "none",
        ],
        None,
    );
    let t = token(&ws);
    assert_eq!(t["budget"]["limit_usd"], "50");
    assert_eq!(t["budget"]["window"], "monthly", "untouched fields stay");
    assert!(
        t.get("rate_limit").is_none(),
        "an emptied section is removed"
    );
    assert_eq!(t["models"]["allow"][0], "mistral-small-*");
    assert_eq!(t["models"]["max_tokens"], 1024);
    let json = ws.ok(&["list", "--json"], None);
    assert!(json.contains("mistral-small-*"));

    // Invalid values are refused by the filter's own validation, naming the field, or (budget
    // values, numbers) at the flag, naming it; the policy file is left as it was.
    let before = fs::read(ws.policy()).unwrap();
    let err = ws.fails(&["limit", "bot", "--cidrs", "10.0.0.0/33"], None, 1);
    assert!(err.contains("tokens[0].source_cidrs"), "{err}");
    let err = ws.fails(&["limit", "bot", "--budget-window", "weekly"], None, 2);
    assert!(err.contains("--budget-window: must be lifetime"), "{err}");
    assert!(ws
        .fails(&["limit", "bot", "--rpm", "many"], None, 2)
        .contains("--rpm"));
    assert!(ws
        .fails(&["limit", "bot"], None, 2)
        .contains("nothing to change"));
    assert!(ws
        .fails(&["limit", "nobody", "--rpm", "5"], None, 1)
        .contains("no token with id 'nobody'"));
    assert_eq!(fs::read(ws.policy()).unwrap(), before);
}

/// A workspace with one token, published once to `filter/shieldkey.json` with the given flags.
fn published(name: &str, publish_flags: &[&str]) -> Workspace {
    let ws = Workspace::new(name);
    ws.ok(&["init"], None);
    ws.ok(&["seal", "--id", "prod"], Some(REAL_KEY));
    ws.ok(&["mint", "--id", "carol", "--upstream-key", "prod"], None);
    fs::create_dir(ws.dir.join("filter")).unwrap();
    let mut args = vec!["publish", "--to", "filter/shieldkey.json"];
    args.extend_from_slice(publish_flags);
    ws.ok(&args, None);
    ws
}

fn vm_config(ws: &Workspace) -> serde_json::Value {
    read_json(&ws.dir.join("filter/shieldkey.json"))["resources"][0]["typed_config"]["config"]
        ["vm_config"]
        .clone()
}

fn revision(ws: &Workspace) -> u64 {
    read_json(&ws.policy())["revision"].as_u64().unwrap()
}

#[test]
fn publishing_over_a_published_file_keeps_its_filter_settings() {
    let ws = published(
        "keep",
        &[
            "--wasm",
            "/abs/path/shieldkey.wasm",
            "--vm-id",
            "edge",
            "--runtime",
            "envoy.wasm.runtime.wasmtime",
        ],
    );
    // The documented revocation, without --wasm: the file keeps what it had.
    ws.ok(
        &["revoke", "carol", "--publish", "filter/shieldkey.json"],
        None,
    );
    let vm = vm_config(&ws);
    assert_eq!(vm["code"]["local"]["filename"], "/abs/path/shieldkey.wasm");
    assert_eq!(vm["vm_id"], "edge");
    assert_eq!(vm["runtime"], "envoy.wasm.runtime.wasmtime");
    let ecds = read_json(&ws.dir.join("filter/shieldkey.json"));
    assert_eq!(ecds["version_info"], revision(&ws).to_string());
    ws.ok(&["publish", "--to", "filter/shieldkey.json"], None);
    assert_eq!(
        vm_config(&ws)["code"]["local"]["filename"],
        "/abs/path/shieldkey.wasm"
    );
    // An explicit flag still wins, and only changes what it names.
    ws.ok(
        &[
            "unrevoke",
            "carol",
            "--publish",
            "filter/shieldkey.json",
            "--wasm",
            "/new/shieldkey.wasm",
        ],
        None,
    );
    let vm = vm_config(&ws);
    assert_eq!(vm["code"]["local"]["filename"], "/new/shieldkey.wasm");
    assert_eq!(vm["vm_id"], "edge");
    assert_eq!(
        vm["environment_variables"]["host_env_keys"],
        serde_json::json!(["SHIELDKEY_MASTER_KEY"])
    );
}

#[test]
fn publishing_refuses_to_replace_a_file_that_is_not_shieldkeys() {
    let ws = published("foreign", &["--wasm", "/opt/shieldkey.wasm"]);
    let target = ws.dir.join("filter/shieldkey.json");
    let mut other_filter = read_json(&target);
    other_filter["resources"][0]["typed_config"]["config"]["root_id"] = "ratelimit".into();
    let foreign = [
        "static_resources: {}\n".to_string(),
        String::new(),
        r#"{"resources": []}"#.to_string(),
        other_filter.to_string(),
    ];
    for content in foreign {
        fs::write(&target, &content).unwrap();
        let policy_before = fs::read(ws.policy()).unwrap();
        let err = ws.fails(&["publish", "--to", "filter/shieldkey.json"], None, 1);
        assert!(
            err.contains("is not a ShieldKey ECDS file") && err.contains("refusing to replace it"),
            "{err}"
        );
        // Not even with --wasm: the other settings would still be guessed.
        ws.fails(
            &[
                "publish",
                "--to",
                "filter/shieldkey.json",
                "--wasm",
                "/x.wasm",
            ],
            None,
            1,
        );
        // A changing command refuses before it writes anything.
        let err = ws.fails(
            &["revoke", "carol", "--publish", "filter/shieldkey.json"],
            None,
            1,
        );
        assert!(err.contains("refusing to replace it"), "{err}");
        assert_eq!(fs::read_to_string(&target).unwrap(), content);
        assert_eq!(fs::read(ws.policy()).unwrap(), policy_before);
    }
    // A path that cannot be read as a file is refused too.
    fs::remove_file(&target).unwrap();
    fs::create_dir(&target).unwrap();
    let err = ws.fails(&["publish", "--to", "filter/shieldkey.json"], None, 1);
    assert!(err.contains("cannot be read"), "{err}");
}

#[test]
fn render_http_filters_prints_the_mandatory_chain_in_order() {
    let ws = Workspace::new("chain");
    let yaml = ws.ok(&["render", "http-filters"], None);
    let pos = |what: &str| {
        yaml.find(what)
            .unwrap_or_else(|| panic!("{what} missing from:\n{yaml}"))
    };
    let compressor = pos("- name: envoy.filters.http.compressor");
    let strip = pos("- remove: x-shieldkey-country");
    let shieldkey = pos("- name: shieldkey");
    let buffer = pos("- name: envoy.filters.http.buffer");
    let router = pos("- name: envoy.filters.http.router");
    assert!(compressor < strip && strip < shieldkey && shieldkey < buffer && buffer < router);
    // geoip is optional: shown commented out, between the header removal and ShieldKey.
    let geoip = pos("# - name: envoy.filters.http.geoip");
    assert!(strip < geoip && geoip < shieldkey);
    assert!(
        yaml.contains("content_type_matcher:\n        - exact: application/json\n"),
        "{yaml}"
    );
    assert!(yaml.contains("path_with_escaped_slashes_action: REJECT_REQUEST"));

    let json = ws.ok(
        &[
            "render",
            "http-filters",
            "--json",
            "--country-header",
            "x-geo",
            "--geoip",
            "/var/geo.mmdb",
        ],
        None,
    );
    let doc: serde_json::Value = serde_json::from_str(&json).unwrap();
    let filters = doc["http_filters"].as_array().unwrap();
    let names: Vec<&str> = filters
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "envoy.filters.http.compressor",
            "strip-client-country",
            "envoy.filters.http.geoip",
            "shieldkey",
            "envoy.filters.http.buffer",
            "envoy.filters.http.router"
        ]
    );
    assert_eq!(
        filters[1]["typed_config"]["mutations"]["request_mutations"][0]["remove"],
        "x-geo"
    );
    let geo = &filters[2]["typed_config"]["provider"]["typed_config"];
    assert_eq!(
        geo["common_provider_config"]["geo_field_keys"]["country"],
        "x-geo"
    );
    assert_eq!(geo["country_db_path"], "/var/geo.mmdb");
    assert!(ws
        .fails(
            &["render", "http-filters", "--country-header", "X-Geo"],
            None,
            2
        )
        .contains("lower-case"));
}

/// ECDS stats as Envoy's admin `/stats` prints them.
fn ecds_stats(version: &str, success: u64, rejected: u64) -> String {
    format!(
        "extension_config_discovery.http_filter.shieldkey.version_text: \"{version}\"\n\
         extension_config_discovery.http_filter.shieldkey.update_failure: 0\n\
         extension_config_discovery.http_filter.shieldkey.update_rejected: {rejected}\n\
         extension_config_discovery.http_filter.shieldkey.update_success: {success}\n"
    )
}

/// A stand-in for Envoy's admin API: answers the n-th request (0-based) with `answer(n)`.
/// An admin whose Envoy serves `serving` and rejects the next update (`rejected` updates were
/// rejected before).
fn rejecting_admin(serving: u64, rejected: u64) -> String {
    let s = serving.to_string();
    fake_admin(move |i| match i {
        0 => ecds_stats(&s, 2, rejected),
        _ => ecds_stats(&s, 2, rejected + 1),
    })
}

/// Publish flags whose wasm path Envoy cannot load, waiting for the verdict at `admin`.
fn rejected_publish(admin: &str) -> [&str; 6] {
    [
        "--publish",
        "filter/shieldkey.json",
        "--admin",
        admin,
        "--wasm",
        "/nonexistent.wasm",
    ]
}

fn fake_admin(answer: impl Fn(usize) -> String + Send + 'static) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let count = Arc::new(AtomicUsize::new(0));
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let head = String::from_utf8_lossy(&request);
            assert!(head.starts_with("GET /stats?filter=extension_config_discovery HTTP/1.1\r\n"));
            let body = answer(count.fetch_add(1, Ordering::SeqCst));
            // Chunked, as Envoy's admin answers.
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n\
                 {:x}\r\n{body}\r\n0\r\n\r\n",
                body.len()
            );
        }
    });
    url
}

#[test]
fn publish_with_admin_waits_for_envoys_verdict() {
    let ws = published("admin", &["--wasm", "/opt/shieldkey.wasm"]);
    let serving = revision(&ws);
    let next = (serving + 1).to_string();
    let serving_text = serving.to_string();

    // Applied: Envoy reports the new revision after a few polls.
    let (s, n) = (serving_text.clone(), next.clone());
    let url = fake_admin(move |i| match i {
        0..=2 => ecds_stats(&s, 1, 0),
        _ => ecds_stats(&n, 2, 0),
    });
    let out = ws.run(
        &[
            "revoke",
            "carol",
            "--publish",
            "filter/shieldkey.json",
            "--admin",
            &url,
        ],
        None,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains(&format!(
            "published revision {next} to filter/shieldkey.json; Envoy applied it"
        )),
        "{err}"
    );

    // Rejected: exit 1 with the reason; the file is put back to what Envoy serves.
    let serving = revision(&ws);
    let before = fs::read(ws.dir.join("filter/shieldkey.json")).unwrap();
    let url = rejecting_admin(serving, 0);
    let err = ws.fails(
        &[&["unrevoke", "carol"], &rejected_publish(&url)[..]].concat(),
        None,
        1,
    );
    assert!(
        err.contains(&format!(
            "Envoy rejected revision {} (see its log: update_rejected went 0 -> 1); \
             the previous policy (revision {serving}) is still serving",
            serving + 1
        )),
        "{err}"
    );
    assert!(err.contains("run `shieldkey publish`"), "{err}");
    assert_eq!(
        fs::read(ws.dir.join("filter/shieldkey.json")).unwrap(),
        before
    );

    // A mint whose publish is rejected: the token is written to the policy file, so it is
    // printed all the same (exit 1 says it is not served yet), never lost.
    let url = rejecting_admin(revision(&ws), 1);
    let mint = ["mint", "--id", "dave", "--upstream-key", "prod"];
    let out = ws.run(&[&mint[..], &rejected_publish(&url)[..]].concat(), None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("Envoy rejected revision"), "{err}");
    assert_token_verifies(&ws, "dave", String::from_utf8_lossy(&out.stdout).trim());

    // No verdict in time: exit 1, saying so.
    let s = revision(&ws).to_string();
    let url = fake_admin(move |_| ecds_stats(&s, 2, 1));
    let err = ws.fails(
        &[
            "publish",
            "--to",
            "filter/shieldkey.json",
            "--admin",
            &url,
            "--wait-secs",
            "0.3",
        ],
        None,
        1,
    );
    assert!(err.contains("did not report applying revision"), "{err}");

    // An admin that cannot be asked, or has no such filter: nothing is written.
    let policy_before = fs::read(ws.policy()).unwrap();
    let file_before = fs::read(ws.dir.join("filter/shieldkey.json")).unwrap();
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let no_filter = fake_admin(|_| "server.live: 1\n".to_string());
    for url in [closed.as_str(), no_filter.as_str()] {
        let err = ws.fails(
            &[
                "revoke",
                "carol",
                "--publish",
                "filter/shieldkey.json",
                "--admin",
                url,
            ],
            None,
            1,
        );
        assert!(err.contains("nothing was changed"), "{err}");
    }
    assert!(ws
        .fails(&["revoke", "carol", "--admin", &closed], None, 2)
        .contains("--admin needs --publish"));
    assert_eq!(fs::read(ws.policy()).unwrap(), policy_before);
    assert_eq!(
        fs::read(ws.dir.join("filter/shieldkey.json")).unwrap(),
        file_before
    );
}

/// Each token's status in the policy file, by id.
fn statuses(ws: &Workspace) -> Vec<(String, String)> {
    read_json(&ws.policy())["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["id"].as_str().unwrap().to_string(),
                t["status"].as_str().unwrap_or("active").to_string(),
            )
        })
        .collect()
}

fn expect_statuses(ws: &Workspace, want: &[(&str, &str)]) {
    let want: Vec<(String, String)> = want
        .iter()
        .map(|(id, s)| (id.to_string(), s.to_string()))
        .collect();
    assert_eq!(statuses(ws), want);
}

#[test]
fn revoke_by_owner_changes_every_token_of_that_owner_in_one_revision() {
    let ws = Workspace::new("owner");
    ws.ok(&["init"], None);
    ws.ok(&["seal", "--id", "prod"], Some(REAL_KEY));
    let alice = "alice@example.com";
    for (id, owner) in [
        ("a1", alice),
        ("a2", alice),
        ("a3", alice),
        ("b1", "bob@example.com"),
        // Another owner for an exact, case-sensitive match.
        ("c1", "Alice@example.com"),
    ] {
        ws.ok(
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
    ws.ok(&["revoke", "a2"], None);
    let rev = revision(&ws);
    let before = fs::read(ws.policy()).unwrap();

    // --dry-run: what would change, on stdout as the real run prints it; nothing written.
    let out = ws.run(&["revoke", "--owner", alice, "--dry-run"], None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "a1\na3\n");
    assert!(
        err.contains(&format!(
            "dry run: would revoke 2 tokens of owner '{alice}' (policy revision {rev} -> {}); \
             nothing was written",
            rev + 1
        )),
        "{err}"
    );
    assert!(
        err.contains("left as they are (already revoked): a2"),
        "{err}"
    );
    assert_eq!(fs::read(ws.policy()).unwrap(), before);

    // The change: the two active tokens of alice, in one revision; bob and Alice untouched.
    let out = ws.run(&["revoke", "--owner", alice], None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "a1\na3\n");
    assert!(
        err.contains(&format!(
            "revoked 2 tokens of owner '{alice}' (policy revision {})",
            rev + 1
        )),
        "{err}"
    );
    assert!(
        err.contains("left as they are (already revoked): a2"),
        "{err}"
    );
    assert_eq!(revision(&ws), rev + 1, "one revision");
    expect_statuses(
        &ws,
        &[
            ("a1", "revoked"),
            ("a2", "revoked"),
            ("a3", "revoked"),
            ("b1", "active"),
            ("c1", "active"),
        ],
    );
    assert!(ws.ok(&["check"], None).starts_with("ok: revision"));

    // Nothing left to change, no such owner, or a near miss: exit 1, nothing written.
    let before = fs::read(ws.policy()).unwrap();
    let err = ws.fails(&["revoke", "--owner", alice], None, 1);
    assert!(
        err.contains(&format!(
            "no active token of owner '{alice}': its 3 tokens are already revoked (a1, a2, a3); \
             nothing was changed"
        )),
        "{err}"
    );
    let err = ws.fails(&["revoke", "--owner", "carol@example.com"], None, 1);
    assert!(
        err.contains("no token has owner 'carol@example.com'; nothing was changed"),
        "{err}"
    );
    let err = ws.fails(
        &["revoke", "--owner", "ALICE@example.com", "--dry-run"],
        None,
        1,
    );
    assert!(
        err.contains(
            "no token has owner 'ALICE@example.com' (owners match exactly; similar: \
             'Alice@example.com', 'alice@example.com')"
        ),
        "{err}"
    );
    // An id and --owner exclude each other (the id is not echoed); an empty owner is refused.
    let err = ws.fails(&["revoke", "b1", "--owner", alice], None, 2);
    assert!(
        err.contains("give a token id or --owner OWNER, not both") && !err.contains("b1"),
        "{err}"
    );
    ws.fails(&["unrevoke", "--owner", alice, "a1"], None, 2);
    ws.fails(&["revoke", "--owner="], None, 2);
    assert_eq!(fs::read(ws.policy()).unwrap(), before);

    // unrevoke --owner: the reverse, by the same rules, in one revision.
    assert_eq!(ws.ok(&["unrevoke", "--owner", alice], None), "a1\na2\na3\n");
    assert_eq!(revision(&ws), rev + 2);
    let err = ws.fails(&["unrevoke", "--owner", "bob@example.com"], None, 1);
    assert!(
        err.contains(
            "no revoked token of owner 'bob@example.com': its 1 token is already active (b1)"
        ),
        "{err}"
    );

    // The single-token form takes --dry-run too.
    let before = fs::read(ws.policy()).unwrap();
    let err = String::from_utf8(ws.run(&["revoke", "b1", "--dry-run"], None).stderr).unwrap();
    assert!(
        err.contains(&format!(
            "dry run: would revoke token 'b1' (policy revision {} -> {}); nothing was written",
            rev + 2,
            rev + 3
        )),
        "{err}"
    );
    assert_eq!(fs::read(ws.policy()).unwrap(), before);

    // With --publish: one change, one publish of it.
    fs::create_dir(ws.dir.join("filter")).unwrap();
    let out = ws.run(
        &[
            "revoke",
            "--owner",
            "bob@example.com",
            "--publish",
            "filter/shieldkey.json",
            "--wasm",
            "/opt/shieldkey.wasm",
        ],
        None,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "b1\n");
    assert_eq!(revision(&ws), rev + 3);
    assert!(
        err.contains(&format!(
            "published revision {} to filter/shieldkey.json",
            rev + 3
        )),
        "{err}"
    );
    let ecds = read_json(&ws.dir.join("filter/shieldkey.json"));
    assert_eq!(ecds["version_info"], (rev + 3).to_string());
    let inner: serde_json::Value = serde_json::from_slice(
        &shieldkey::envoy_render::policy_of_configuration(
            &ecds["resources"][0]["typed_config"]["config"]["configuration"],
        )
        .unwrap(),
    )
    .unwrap();
    let b1 = inner["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == "b1")
        .unwrap();
    assert_eq!(b1["status"], "revoked");
}

fn team_of<'v>(policy: &'v serde_json::Value, id: &str) -> &'v serde_json::Value {
    policy["teams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == id)
        .unwrap_or_else(|| panic!("no team {id}"))
}

fn token_of<'v>(policy: &'v serde_json::Value, id: &str) -> &'v serde_json::Value {
    policy["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == id)
        .unwrap_or_else(|| panic!("no token {id}"))
}

#[test]
fn teams_are_created_changed_listed_and_removed_once_empty() {
    let ws = Workspace::new("teams");
    ws.ok(&["init"], None);
    ws.ok(&["seal", "--id", "prod"], Some(REAL_KEY));
    ws.ok(
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
            "--rpm",
            "600",
            "--models",
            "mistral-small-*",
        ],
        None,
    );
    let policy = read_json(&ws.policy());
    let eng = team_of(&policy, "eng");
    assert_eq!(eng["description"], "Engineering");
    assert_eq!(eng["budget"]["limit_usd"], "100");
    assert_eq!(eng["budget"]["window"], "monthly");
    assert_eq!(eng["rate_limit"]["requests_per_minute"], 600);
    assert_eq!(eng["models"]["allow"][0], "mistral-small-*");
    assert!(eng.get("enforce").is_none());

    // An existing id, a malformed id or value: refused, nothing written.
    let before = fs::read(ws.policy()).unwrap();
    assert!(ws
        .fails(&["team", "create", "eng"], None, 1)
        .contains("a team with id 'eng' exists"));
    assert!(ws
        .fails(&["team", "create", "Eng!"], None, 2)
        .contains("team id"));
    let err = ws.fails(
        &["team", "create", "ops", "--cidrs", "10.0.0.0/33"],
        None,
        1,
    );
    assert!(err.contains("teams[1].source_cidrs"), "{err}");
    assert!(ws
        .fails(&["team", "frobnicate"], None, 2)
        .contains("unknown team command"));
    assert_eq!(fs::read(ws.policy()).unwrap(), before);

    // team limit: the semantics of limit (untouched fields stay, none removes, emptied
    // sections go), plus the description and enforce.
    ws.ok(
        &[
            "team",
            "limit",
            "eng",
            "--budget-usd",
            "150",
            "--rpm",
            "none",
            "--tpm",
            "20000",
            "--enforce",
            "false",
        ],
        None,
    );
    let policy = read_json(&ws.policy());
    let eng = team_of(&policy, "eng");
    assert_eq!(eng["budget"]["limit_usd"], "150");
    assert_eq!(eng["budget"]["window"], "monthly");
    assert_eq!(eng["rate_limit"]["tokens_per_minute"], 20000);
    assert!(eng["rate_limit"].get("requests_per_minute").is_none());
    assert_eq!(eng["enforce"], false);
    ws.ok(
        &[
            "team",
            "limit",
            "eng",
            "--description",
            "none",
            "--models",
            "none",
        ],
        None,
    );
    let policy = read_json(&ws.policy());
    let eng = team_of(&policy, "eng");
    assert!(eng.get("description").is_none() && eng.get("models").is_none());
    assert!(ws
        .fails(&["team", "limit", "eng"], None, 2)
        .contains("nothing to change"));
    assert!(ws
        .fails(&["team", "limit", "nope", "--rpm", "5"], None, 1)
        .contains("no team with id 'nope'"));
    ws.ok(
        &["team", "create", "ops", "--description", "Operations"],
        None,
    );

    // Membership: mint --team (the team must exist), limit --team / --no-team.
    let before = fs::read(ws.policy()).unwrap();
    let err = ws.fails(
        &[
            "mint",
            "--id",
            "x",
            "--upstream-key",
            "prod",
            "--team",
            "ghost",
        ],
        None,
        1,
    );
    assert!(
        err.contains("no team 'ghost' (create it first: shieldkey team create ghost)"),
        "{err}"
    );
    assert_eq!(fs::read(ws.policy()).unwrap(), before);
    for (id, team) in [
        ("alice", Some("eng")),
        ("bob", Some("eng")),
        ("carol", None),
    ] {
        let mut args = vec!["mint", "--id", id, "--upstream-key", "prod"];
        if let Some(team) = team {
            args.extend(["--team", team]);
        }
        ws.ok(&args, None);
    }
    let policy = read_json(&ws.policy());
    assert_eq!(token_of(&policy, "alice")["team"], "eng");
    assert!(token_of(&policy, "carol").get("team").is_none());

    // team list: rules, enforce, members by status.
    ws.ok(&["revoke", "bob"], None);
    let table = ws.ok(&["team", "list"], None);
    let eng_row = table.lines().find(|l| l.starts_with("eng ")).unwrap();
    let cols: Vec<&str> = eng_row.split_whitespace().collect();
    assert_eq!(&cols[..4], ["eng", "2", "1", "1"], "{table}");
    assert!(eng_row.contains("false (dry run)"), "{table}");
    assert!(
        table.contains("rules: budget 150 USD monthly; tpm 20000"),
        "{table}"
    );
    assert!(
        table.contains("Operations") && table.contains("rules: none"),
        "{table}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&ws.ok(&["team", "list", "--json"], None)).unwrap();
    let eng = team_of(&json, "eng");
    assert_eq!(
        (
            &eng["members"],
            &eng["active"],
            &eng["revoked"],
            &eng["enforce"]
        ),
        (&json!(2), &json!(1), &json!(1), &json!(false))
    );
    assert_eq!(eng["member_ids"], json!(["alice", "bob"]));
    assert_eq!(team_of(&json, "ops")["members"], 0);
    assert_eq!(json["enforce"], true);

    // team remove: refused while tokens name the team, naming them; no --force.
    let before = fs::read(ws.policy()).unwrap();
    let err = ws.fails(&["team", "remove", "eng"], None, 1);
    assert!(
        err.contains("team 'eng' still has 2 member tokens: alice, bob")
            && err.contains("--no-team")
            && err.contains("nothing was changed"),
        "{err}"
    );
    assert!(ws
        .fails(&["team", "remove", "eng", "--force"], None, 2)
        .contains("no --force"));
    assert!(ws
        .fails(&["team", "remove", "ghost"], None, 1)
        .contains("no team with id 'ghost'"));
    assert_eq!(fs::read(ws.policy()).unwrap(), before);
    let (_, err) = {
        let out = ws.run(&["limit", "alice", "--team", "ops"], None);
        assert!(out.status.success());
        ((), String::from_utf8(out.stderr).unwrap())
    };
    assert!(
        err.contains("moved token 'alice' from team 'eng' to team 'ops'"),
        "{err}"
    );
    let err = String::from_utf8(ws.run(&["limit", "bob", "--no-team"], None).stderr).unwrap();
    assert!(err.contains("took token 'bob' out of team 'eng'"), "{err}");
    assert!(ws
        .fails(&["limit", "bob", "--team", "ops", "--no-team"], None, 2)
        .contains("exclude each other"));
    assert!(ws
        .fails(&["limit", "bob", "--team", "ghost"], None, 1)
        .contains("no team 'ghost'"));
    ws.ok(&["team", "remove", "eng"], None);
    let policy = read_json(&ws.policy());
    assert_eq!(policy["teams"].as_array().unwrap().len(), 1);
    assert!(token_of(&policy, "bob").get("team").is_none());
    assert!(ws.ok(&["check"], None).contains("1 teams"));

    // A hand-edited token naming a missing team is refused by the filter's own validation.
    let mut broken = read_json(&ws.policy());
    broken["tokens"][1]["team"] = json!("ghost");
    fs::write(ws.policy(), broken.to_string()).unwrap();
    let err = ws.fails(&["check"], None, 1);
    assert!(
        err.contains("tokens[1].team: no team with id 'ghost'"),
        "{err}"
    );
    let list = ws.ok(&["list"], None);
    assert!(
        list.contains("team ghost (1 token): no such team"),
        "{list}"
    );
}

#[test]
fn list_groups_tokens_by_team_and_shows_dry_run() {
    let ws = Workspace::new("list-teams");
    ws.ok(&["init"], None);
    ws.ok(&["seal", "--id", "prod"], Some(REAL_KEY));
    ws.ok(&["mint", "--id", "solo", "--upstream-key", "prod"], None);
    // Without teams the table is not grouped.
    let flat = ws.ok(&["list"], None);
    assert!(!flat.contains("(no team)"), "{flat}");

    ws.ok(
        &[
            "team",
            "create",
            "ops",
            "--description",
            "Operations",
            "--enforce",
            "false",
        ],
        None,
    );
    ws.ok(&["team", "create", "eng"], None);
    ws.ok(
        &[
            "mint",
            "--id",
            "e1",
            "--upstream-key",
            "prod",
            "--team",
            "eng",
        ],
        None,
    );
    ws.ok(
        &[
            "mint",
            "--id",
            "o1",
            "--upstream-key",
            "prod",
            "--team",
            "ops",
            "--enforce",
            "false",
        ],
        None,
    );
    ws.ok(
        &[
            "mint",
            "--id",
            "e2",
            "--upstream-key",
            "prod",
            "--team",
            "eng",
        ],
        None,
    );
    let list = ws.ok(&["list"], None);
    let lines: Vec<&str> = list.lines().skip(1).collect();
    let first = |l: &&str| l.split_whitespace().next().unwrap_or("").to_string();
    // Teams in policy order, each followed by its tokens; tokens in no team last.
    assert_eq!(
        lines.iter().map(first).collect::<Vec<_>>(),
        ["team", "o1", "team", "e1", "e2", "(no", "solo"],
        "{list}"
    );
    assert_eq!(
        lines[0],
        "team ops (1 token): Operations; enforce=false (dry run)"
    );
    assert_eq!(lines[2], "team eng (2 tokens)");
    assert_eq!(lines[5], "(no team) (1 token)");
    assert!(lines[1].contains("false (dry run)"), "{list}");
    assert!(lines[3].contains(" true "), "{list}");

    // --json keeps its fields and adds each token's team and enforce.
    let json: serde_json::Value = serde_json::from_str(&ws.ok(&["list", "--json"], None)).unwrap();
    assert_eq!(json["teams"], json!(["ops", "eng"]));
    assert_eq!(json["enforce"], true);
    let o1 = token_of(&json, "o1");
    assert_eq!(
        (&o1["team"], &o1["enforce"]),
        (&json!("ops"), &json!(false))
    );
    assert_eq!(o1["state"], "active");
    assert_eq!(o1["upstream_key"], "prod");
    let solo = token_of(&json, "solo");
    assert_eq!(
        (&solo["team"], &solo["enforce"]),
        (&json!(null), &json!(true))
    );
    assert!(!json.to_string().contains("digest"));
}

#[test]
fn enforce_flags_and_the_policy_wide_switch_round_trip() {
    let ws = Workspace::new("enforce");
    ws.ok(&["init"], None);
    ws.ok(&["seal", "--id", "prod"], Some(REAL_KEY));
    ws.ok(
        &[
            "mint",
            "--id",
            "t1",
            "--upstream-key",
            "prod",
            "--enforce",
            "false",
        ],
        None,
    );
    assert_eq!(token_of(&read_json(&ws.policy()), "t1")["enforce"], false);
    ws.ok(&["limit", "t1", "--enforce", "true"], None);
    assert_eq!(token_of(&read_json(&ws.policy()), "t1")["enforce"], true);
    ws.ok(&["limit", "t1", "--enforce", "none"], None);
    assert!(token_of(&read_json(&ws.policy()), "t1")
        .get("enforce")
        .is_none());
    assert!(ws
        .fails(&["limit", "t1", "--enforce", "maybe"], None, 2)
        .contains("--enforce"));

    assert_eq!(ws.ok(&["enforce"], None), "true\n");
    assert!(read_json(&ws.policy()).get("enforce").is_none());
    let out = ws.run(&["enforce", "false"], None);
    assert!(out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("policy-wide enforce=false"), "{err}");
    assert_eq!(read_json(&ws.policy())["enforce"], false);
    assert_eq!(ws.ok(&["enforce"], None), "false\n");
    let out = ws.run(&["list"], None);
    assert!(String::from_utf8(out.stderr)
        .unwrap()
        .contains("policy-wide enforce=false"));
    // The filter's own compiler reads it as a policy-wide dry run.
    let compiled =
        compile_bytes(&fs::read(ws.policy()).unwrap(), &CompileOptions::default()).unwrap();
    assert!(compiled.settings.dry_run);
    ws.ok(&["enforce", "true"], None);
    assert_eq!(read_json(&ws.policy())["enforce"], true);
    let before = fs::read(ws.policy()).unwrap();
    assert!(ws
        .fails(&["enforce", "off"], None, 2)
        .contains("true or false"));
    assert_eq!(fs::read(ws.policy()).unwrap(), before);
}

#[test]
fn revoke_by_team_changes_every_member_in_one_revision() {
    let ws = Workspace::new("revoke-team");
    ws.ok(&["init"], None);
    ws.ok(&["seal", "--id", "prod"], Some(REAL_KEY));
    ws.ok(&["team", "create", "eng"], None);
    ws.ok(&["team", "create", "ops"], None);
    ws.ok(&["team", "create", "empty"], None);
    for (id, team, owner) in [
        ("e1", "eng", "alice@example.com"),
        ("e2", "eng", "bob@example.com"),
        ("e3", "eng", "alice@example.com"),
        ("o1", "ops", "alice@example.com"),
    ] {
        ws.ok(
            &[
                "mint",
                "--id",
                id,
                "--upstream-key",
                "prod",
                "--team",
                team,
                "--owner",
                owner,
            ],
            None,
        );
    }
    ws.ok(&["mint", "--id", "n1", "--upstream-key", "prod"], None);
    ws.ok(&["revoke", "e3"], None);
    let rev = revision(&ws);
    let before = fs::read(ws.policy()).unwrap();

    let out = ws.run(&["revoke", "--team", "eng", "--dry-run"], None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "e1\ne2\n");
    assert!(
        err.contains(&format!(
            "dry run: would revoke 2 tokens of team 'eng' (policy revision {rev} -> {}); \
             nothing was written",
            rev + 1
        )),
        "{err}"
    );
    assert!(
        err.contains("left as they are (already revoked): e3"),
        "{err}"
    );
    assert_eq!(fs::read(ws.policy()).unwrap(), before);

    let out = ws.run(&["revoke", "--team", "eng"], None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "e1\ne2\n");
    assert!(
        err.contains(&format!(
            "revoked 2 tokens of team 'eng' (policy revision {})",
            rev + 1
        )),
        "{err}"
    );
    assert_eq!(revision(&ws), rev + 1, "one revision");
    expect_statuses(
        &ws,
        &[
            ("e1", "revoked"),
            ("e2", "revoked"),
            ("e3", "revoked"),
            ("o1", "active"),
            ("n1", "active"),
        ],
    );

    // Nothing to change, an empty team, a missing team: exit 1, nothing written.
    let before = fs::read(ws.policy()).unwrap();
    assert!(ws
        .fails(&["revoke", "--team", "eng"], None, 1)
        .contains("no active token of team 'eng': its 3 tokens are already revoked"));
    assert!(ws
        .fails(&["revoke", "--team", "empty"], None, 1)
        .contains("no token is in team 'empty'; nothing was changed"));
    assert!(ws
        .fails(&["revoke", "--team", "ghost", "--dry-run"], None, 1)
        .contains("no team with id 'ghost'; nothing was changed"));
    assert!(ws
        .fails(&["revoke", "--team", "Not A Team"], None, 2)
        .contains("--team"));
    let err = ws.fails(&["revoke", "e1", "--team", "eng"], None, 2);
    assert!(err.contains("not both") && !err.contains("e1"), "{err}");
    assert_eq!(fs::read(ws.policy()).unwrap(), before);

    // --owner and --team together: tokens matching both.
    assert_eq!(
        ws.ok(
            &["unrevoke", "--team", "eng", "--owner", "alice@example.com"],
            None
        ),
        "e1\ne3\n"
    );
    expect_statuses(
        &ws,
        &[
            ("e1", "active"),
            ("e2", "revoked"),
            ("e3", "active"),
            ("o1", "active"),
            ("n1", "active"),
        ],
    );
    assert!(ws
        .fails(
            &["revoke", "--team", "ops", "--owner", "bob@example.com"],
            None,
            1
        )
        .contains("no token of owner 'bob@example.com' is in team 'ops'"));
    assert_eq!(ws.ok(&["unrevoke", "--team", "eng"], None), "e2\n");
}

/// A stand-in for Envoy's admin `/stats?format=json`: answers every request with `body`
/// (chunked, as Envoy does) and records each request's first line.
fn fake_stats_admin(status: u16, body: String) -> (String, Arc<std::sync::Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let head = String::from_utf8_lossy(&request);
            record
                .lock()
                .unwrap()
                .push(head.lines().next().unwrap_or("").to_string());
            let _ = write!(
                stream,
                "HTTP/1.1 {status} OK\r\ncontent-type: application/json\r\n\
                 transfer-encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
                body.len()
            );
        }
    });
    (url, seen)
}

#[test]
fn status_reads_one_envoys_stats_next_to_the_policy() {
    let ws = Workspace::new("status-admin");
    ws.ok(&["init"], None);
    ws.ok(&["seal", "--id", "prod"], Some(REAL_KEY));
    ws.ok(
        &[
            "team",
            "create",
            "eng",
            "--budget-usd",
            "10",
            "--budget-window",
            "daily",
        ],
        None,
    );
    ws.ok(
        &[
            "mint",
            "--id",
            "alice",
            "--upstream-key",
            "prod",
            "--owner",
            "alice@example.com",
            "--team",
            "eng",
            "--budget-usd",
            "5",
            "--budget-window",
            "lifetime",
        ],
        None,
    );
    ws.ok(&["mint", "--id", "bob", "--upstream-key", "prod"], None);
    ws.ok(&["revoke", "bob"], None);

    // Without --admin (nor SHIELDKEY_ADMIN) and without etcd: a usage error naming both.
    let err = ws.fails(&["status"], None, 2);
    assert!(
        err.contains("--admin URL or SHIELDKEY_ADMIN")
            && err.contains("needs fleet mode (--etcd URLS or SHIELDKEY_ETCD)"),
        "{err}"
    );

    let t = |id: &str, m: &str, v: u64| json!({"name": format!("wasmcustom.shieldkey.token_id.{id}.{m}"), "value": v});
    let team =
        |m: &str, v: u64| json!({"name": format!("wasmcustom.shieldkey.team.eng.{m}"), "value": v});
    let stats = json!({"stats": [
        t("alice", "requests", 3),
        t("alice", "spend_nano_usd", 1_500_000_000),
        t("alice", "budget_limit_nano_usd", 5_000_000_000),
        t("alice", "budget_remaining_nano_usd", 3_500_000_000),
        t("alice", "budget_spent_nano_usd", 1_500_000_000),
        t("alice", "budget_window_start_seconds", 0),
        t("alice", "reason.shield_budget_exceeded.denied", 2),
        t("bob", "requests", 1),
        t("bob", "spend_nano_usd", 42),
        team("requests", 3),
        team("spend_nano_usd", 1_500_000_000),
        team("budget_limit_nano_usd", 10_000_000_000),
        team("budget_remaining_nano_usd", 8_500_000_000),
        team("budget_spent_nano_usd", 1_500_000_000),
        // Settled on 1970-01-02: long before today's window, which has no spend yet.
        team("budget_window_start_seconds", 86_400),
        {"name": "extension_config_discovery.http_filter.shieldkey.version_text", "value": "1"},
    ]});
    let (url, seen) = fake_stats_admin(200, stats.to_string());
    let out = ws.run(&["status", "--admin", &url, "--json"], None);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{err}");
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let request = seen.lock().unwrap()[0].clone();
    assert!(
        request.starts_with("GET /stats?format=json&filter=%5E%28wasmcustom%5C.shieldkey"),
        "{request}"
    );
    assert_eq!(doc["teams"][0]["id"], "eng");
    assert_eq!(doc["teams"][0]["spent_nano_usd"], 0, "an earlier window");
    assert_eq!(doc["teams"][0]["spend_total_nano_usd"], 1_500_000_000u64);
    assert_eq!(doc["teams"][0]["members"], json!(["alice"]));
    let alice = &doc["tokens"][0];
    assert_eq!(
        (
            &alice["id"],
            &alice["status"],
            &alice["spent_nano_usd"],
            &alice["remaining_nano_usd"],
            &alice["percent"],
            &alice["requests"],
            &alice["denied"]
        ),
        (
            &json!("alice"),
            &json!("active"),
            &json!(1_500_000_000u64),
            &json!(3_500_000_000u64),
            &json!(30),
            &json!(3),
            &json!({"shield_budget_exceeded": 2})
        )
    );
    let bob = &doc["tokens"][1];
    assert_eq!(
        (
            &bob["status"],
            &bob["spent_nano_usd"],
            &bob["limit_nano_usd"]
        ),
        (&json!("revoked"), &json!(42), &serde_json::Value::Null)
    );
    // The policy file is ahead of what Envoy serves: said on stderr.
    assert!(
        err.contains("Envoy serves policy revision 1, the policy file"),
        "{err}"
    );

    // The table, through SHIELDKEY_ADMIN.
    let out = Command::new(env!("CARGO_BIN_EXE_shieldkey"))
        .args(["status"])
        .env("SHIELDKEY_POLICY", ws.policy())
        .env("SHIELDKEY_ADMIN", &url)
        .env_remove("SHIELDKEY_ETCD")
        .output()
        .unwrap();
    assert!(out.status.success());
    let table = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("TOKEN "), "{table}");
    assert!(lines[1].starts_with("team eng "), "{table}");
    assert!(
        lines[2].starts_with("  alice ")
            && lines[2].contains("[###-------] 30%")
            && lines[2].contains("budget_exceeded:2"),
        "{table}"
    );
    assert!(
        lines[4].starts_with("  bob ") && lines[4].contains("revoked"),
        "{table}"
    );
    // One token.
    let one = ws.ok(&["status", "--admin", &url, "--token", "bob"], None);
    assert_eq!(one.lines().count(), 2, "{one}");

    // Nothing listens there: a clear error naming the URL, exit 1, nothing on stdout.
    let closed = {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    };
    let out = ws.run(&["status", "--admin", &closed], None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(out.stdout.is_empty());
    assert!(
        err.contains(&format!("cannot reach Envoy's admin endpoint at {closed}"))
            && err.contains("check that Envoy is running"),
        "{err}"
    );

    // Something answers, but not Envoy's stats: exit 1, nothing on stdout.
    let (other, _) = fake_stats_admin(200, "<html>hello</html>".into());
    let out = ws.run(&["status", "--admin", &other], None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(out.stdout.is_empty());
    assert!(err.contains("is not Envoy's stats JSON"), "{err}");
    let (refusing, _) = fake_stats_admin(404, "no such path".into());
    let err = ws.fails(&["status", "--admin", &refusing], None, 1);
    assert!(err.contains("answered 404"), "{err}");

    // Bad URLs and selections are usage errors; --admin in fleet mode too.
    ws.fails(&["status", "--admin", "127.0.0.1:9901"], None, 2);
    let err = ws.fails(&["status", "--admin", &url, "--token", "nobody"], None, 1);
    assert!(err.contains("no token with id 'nobody'"), "{err}");
    let err = ws.fails(
        &["--etcd", "http://127.0.0.1:1", "status", "--admin", &url],
        None,
        2,
    );
    assert!(err.contains("in fleet mode status reads"), "{err}");
}

// --- audit -----------------------------------------------------------------------------------

/// The fixture logs: two Envoys' audit trails; the first read from Envoy's stdout capture, so
/// mixed with Envoy's own log lines, with a record of the wrong shape and one cut short.
fn audit_fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/audit")
        .join(name)
        .to_str()
        .unwrap()
        .to_string()
}

fn json_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn request_ids(text: &str) -> Vec<String> {
    json_lines(text)
        .iter()
        .map(|r| r["request_id"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn audit_filters_a_log_and_merges_logs_in_time_order() {
    let ws = Workspace::new("audit");
    let (e0, e1) = (audit_fixture("envoy-0.log"), audit_fixture("envoy-1.log"));
    let ids = |extra: &[&str]| {
        let mut args = vec!["audit", e0.as_str(), e1.as_str(), "--json"];
        args.extend_from_slice(extra);
        request_ids(&ws.ok(&args, None))
    };
    // Merged in time order; the lines that are not records are skipped, and said so.
    assert_eq!(ids(&[]), ["r-1", "r-6", "r-2", "r-7", "r-3", "r-4", "r-5"]);
    let out = ws.run(&["audit", &e0, &e1, "--json"], None);
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("skipped 3 lines that are not JSON objects"),
        "{stderr}"
    );
    assert!(
        stderr.contains("skipped 1 JSON object that is not an audit record"),
        "{stderr}"
    );
    assert!(
        stderr.contains("line 8: status is not a whole number"),
        "{stderr}"
    );
    assert!(!stderr.contains("oops"), "{stderr}");

    // Every filter.
    assert_eq!(ids(&["--token", "alice"]), ["r-1", "r-3"]);
    assert_eq!(ids(&["--owner", "carol@example.com"]), ["r-6", "r-7"]);
    assert_eq!(ids(&["--team", "ml"]), ["r-1", "r-6", "r-7", "r-3"]);
    assert_eq!(ids(&["--decision", "allowed"]), ["r-1", "r-6", "r-3"]);
    assert_eq!(ids(&["--decision", "denied"]), ["r-2", "r-7", "r-4"]);
    assert_eq!(ids(&["--decision", "would-deny"]), ["r-3"]);
    assert_eq!(ids(&["--decision", "shield_team_rate_limited"]), ["r-7"]);
    assert_eq!(
        ids(&[
            "--since",
            "2026-11-26T02:00:03Z",
            "--until",
            "2026-11-26T02:00:06Z"
        ]),
        ["r-2", "r-7", "r-3"]
    );
    assert_eq!(ids(&["--since", "2026-11-27"]), Vec::<String>::new());
    assert_eq!(ids(&["--route", "v1/embeddings"]), ["r-6", "r-7"]);
    assert_eq!(ids(&["--model", "mistral-large-latest"]), ["r-3"]);
    assert_eq!(ids(&["--client", "10.0.0.0/30"]), Vec::<String>::new());
    assert_eq!(ids(&["--client", "10.0.0.0/29"]), ["r-1"]);
    assert_eq!(
        ids(&["--client", "10.0.0.0/8"]),
        ["r-1", "r-6", "r-7", "r-3"]
    );
    assert_eq!(ids(&["--client", "203.0.113.5"]), ["r-4"]);
    assert_eq!(ids(&["--country", "fr"]), ["r-1", "r-3"]);
    assert_eq!(ids(&["--country", "unknown"]), ["r-2", "r-4", "r-5"]);
    assert_eq!(ids(&["--request-id", "r-5"]), ["r-5"]);
    assert_eq!(
        ids(&["--team", "ml", "--decision", "allowed", "--country", "DE"]),
        ["r-6"]
    );

    // --json: the records as read, numbers as numbers and booleans as booleans.
    let records = json_lines(&ws.ok(&["audit", &e0, "--json", "--request-id", "r-3"], None));
    assert_eq!(
        records,
        [json!({
            "bytes_received": 82, "bytes_sent": 2684, "client_address": "10.0.0.8",
            "completion_tokens": 30, "cost_estimated": true, "cost_nano_usd": 64000,
            "country": "FR", "decision": "allowed", "duration_ms": 900, "method": "POST",
            "model": "mistral-large-latest", "owner": "alice@example.com", "prompt_tokens": 20,
            "request_id": "r-3", "route": "v1/chat/completions", "status": 200, "team": "ml",
            "time": "2026-11-26T02:00:05.250Z", "token_id": "alice", "upstream_key": "prod",
            "would_deny": "shield_model_denied"
        })]
    );

    // The table: one row per record, money in USD.
    let table = ws.ok(&["audit", &e0, "--token", "alice"], None);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    for header in [
        "TIME", "TOKEN", "OWNER", "TEAM", "DECISION", "CLIENT", "COUNTRY", "METHOD", "ROUTE",
        "MODEL", "IN", "OUT", "COST_USD", "STATUS",
    ] {
        assert!(lines[0].contains(header), "{header}");
    }
    let row: Vec<&str> = lines[2].split_whitespace().collect();
    assert_eq!(
        row,
        [
            "2026-11-26T02:00:05.250Z",
            "alice",
            "alice@example.com",
            "ml",
            "allowed",
            "[shield_model_denied]",
            "10.0.0.8",
            "FR",
            "POST",
            "v1/chat/completions",
            "mistral-large-latest",
            "20",
            "30",
            "0.000064",
            "200"
        ]
    );
    assert!(lines[1].contains("0.000450"));

    // Stdin, with `-`.
    let text = fs::read_to_string(&e1).unwrap();
    assert_eq!(
        request_ids(&ws.ok(&["audit", "-", "--json"], Some(&text))),
        ["r-6", "r-7"]
    );
}

#[test]
fn audit_summary_totals_per_token_and_team() {
    let ws = Workspace::new("audit-summary");
    let (e0, e1) = (audit_fixture("envoy-0.log"), audit_fixture("envoy-1.log"));
    let doc: serde_json::Value =
        serde_json::from_str(&ws.ok(&["audit", &e0, &e1, "--summary", "--json"], None)).unwrap();
    let token = |id: &str| {
        doc["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["token_id"] == id)
            .unwrap()
            .clone()
    };
    let alice = token("alice");
    assert_eq!(alice["requests"], 2);
    assert_eq!(alice["allowed"], 2);
    assert_eq!(alice["would_deny"], 1);
    assert_eq!(
        alice["would_deny_by_code"],
        json!({"shield_model_denied": 1})
    );
    assert_eq!(alice["prompt_tokens"], 1020);
    assert_eq!(alice["completion_tokens"], 530);
    assert_eq!(alice["cost_nano_usd"], 514_000);
    assert_eq!(alice["cost_usd"], "0.000514");
    assert_eq!(alice["owners"], json!(["alice@example.com"]));
    assert_eq!(alice["clients"], json!(["10.0.0.7", "10.0.0.8"]));
    assert_eq!(alice["first_seen"], "2026-11-26T02:00:01.000Z");
    assert_eq!(alice["last_seen"], "2026-11-26T02:00:05.250Z");
    let carol = token("carol");
    assert_eq!(
        (carol["requests"].clone(), carol["denied"].clone()),
        (json!(2), json!(1))
    );
    assert_eq!(
        carol["denied_by_code"],
        json!({"shield_team_rate_limited": 1})
    );
    assert_eq!(
        token("bob")["denied_by_code"],
        json!({"shield_budget_exceeded": 1})
    );
    let teams = doc["teams"].as_array().unwrap();
    assert_eq!(teams.len(), 1);
    assert_eq!(teams[0]["team"], "ml");
    assert_eq!(teams[0]["tokens"], json!(["alice", "carol"]));
    assert_eq!(teams[0]["requests"], 4);
    assert_eq!(teams[0]["cost_nano_usd"], 534_000);
    let total = &doc["total"];
    assert_eq!(total["requests"], 7);
    assert_eq!(total["allowed"], 3);
    assert_eq!(total["denied"], 3);
    assert_eq!(total["not_decided"], 1);
    assert_eq!(total["cost_nano_usd"], 534_000);

    // Filters apply before the summary.
    let denied: serde_json::Value = serde_json::from_str(&ws.ok(
        &[
            "audit",
            &e0,
            &e1,
            "--summary",
            "--json",
            "--decision",
            "denied",
        ],
        None,
    ))
    .unwrap();
    assert_eq!(denied["total"]["requests"], 3);
    assert_eq!(denied["total"]["cost_nano_usd"], 0);

    // The table: teams, then tokens and a total row.
    let table = ws.ok(&["audit", &e0, &e1, "--summary"], None);
    assert!(table.starts_with("TEAM"), "{table}");
    let total_row = table.lines().last().unwrap();
    assert!(total_row.starts_with("(total)"), "{table}");
    assert!(total_row.contains("0.000534"), "{table}");
}

#[test]
fn audit_reads_the_default_log_and_relative_times() {
    let ws = Workspace::new("audit-default");
    // No log where Envoy would have written it: a clear error, exit 1.
    let err = ws.fails(&["audit"], None, 1);
    assert!(err.contains("cannot read shieldkey-audit.log"), "{err}");
    let err = ws.fails(&["audit", "nowhere.log"], None, 1);
    assert!(err.contains("cannot read nowhere.log"), "{err}");
    // Usage errors, exit 2.
    for (args, message) in [
        (
            &["audit", "--decision", "refused"][..],
            "--decision 'refused'",
        ),
        (&["audit", "--since", "yesterday"][..], "--since"),
        (&["audit", "--until", "15w"][..], "--until"),
        (&["audit", "--client", "10.0.0.0/33"][..], "--client"),
        (&["audit", "--since", "1h", "--until", "2h"][..], "--until"),
        (&["audit", "-", "-"][..], "stdin"),
        (&["audit", "--nope"][..], "--nope"),
    ] {
        let err = ws.fails(args, None, 2);
        assert!(err.contains(message), "{args:?}: {err}");
    }

    // Records 3 hours, 30 minutes and 1 minute old, in the default log.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let record = |age: i64, id: &str| {
        json!({"time": shieldkey::time::format_rfc3339(now - age), "token_id": id,
               "decision": "allowed", "status": 200})
        .to_string()
    };
    let log = [
        record(3 * 3600, "old"),
        record(1800, "recent"),
        record(60, "new"),
    ]
    .join("\n");
    fs::write(ws.dir.join("shieldkey-audit.log"), log + "\n").unwrap();
    let tokens = |args: &[&str]| -> Vec<String> {
        let mut all = vec!["audit", "--json"];
        all.extend_from_slice(args);
        json_lines(&ws.ok(&all, None))
            .iter()
            .map(|r| r["token_id"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(tokens(&[]), ["old", "recent", "new"]);
    assert_eq!(tokens(&["--since", "1h"]), ["recent", "new"]);
    assert_eq!(tokens(&["--since", "15m"]), ["new"]);
    assert_eq!(
        tokens(&["--since", "7d", "--until", "10m"]),
        ["old", "recent"]
    );
    assert_eq!(tokens(&["--until", "2h"]), ["old"]);
}

/// One HTTP/1.1 exchange with the console: (status, headers lowercased, body).
fn http(
    addr: &str,
    method: &str,
    path: &str,
    cookie: Option<&str>,
    form: Option<&str>,
) -> (u16, Vec<(String, String)>, String) {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    let body = form.unwrap_or("");
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(c) = cookie {
        request.push_str(&format!("Cookie: {c}\r\n"));
    }
    if form.is_some() {
        request.push_str(&format!(
            "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes()).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_ascii_lowercase(), v.to_string()))
        .collect();
    (status, headers, body.to_string())
}

fn header<'h>(headers: &'h [(String, String)], name: &str) -> Option<&'h str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

#[test]
fn console_logs_in_with_the_printed_secret_and_refuses_forged_posts() {
    use std::io::BufRead;
    let ws = Workspace::new("console");
    ws.ok(&["init"], None);
    ws.ok(&["seal", "--id", "prod"], Some(REAL_KEY));
    let token = ws.ok(
        &[
            "mint",
            "--id",
            "ann",
            "--upstream-key",
            "prod",
            "--owner",
            "ann@x",
        ],
        None,
    );
    let token = token.trim().to_string();

    // Refused before anything listens: a non-loopback address without --allow-remote.
    let err = ws.fails(&["console", "--listen", "0.0.0.0:0"], None, 2);
    assert!(err.contains("--allow-remote"), "{err}");

    let mut child = Command::new(env!("CARGO_BIN_EXE_shieldkey"))
        .args(["console", "--listen", "127.0.0.1:0"])
        .current_dir(&ws.dir)
        .env("SHIELDKEY_POLICY", ws.policy())
        .env("SHIELDKEY_MASTER_KEY", &ws.master)
        .env_remove("SHIELDKEY_PUBLISH")
        .env_remove("SHIELDKEY_ADMIN")
        .env_remove("SHIELDKEY_CONSOLE_PASSWORD")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let (mut addr, mut secret) = (String::new(), String::new());
    let mut banner = String::new();
    while secret.is_empty() {
        let mut line = String::new();
        assert!(stderr.read_line(&mut line).unwrap() > 0, "{banner}");
        banner.push_str(&line);
        if let Some(url) = line.strip_prefix("shieldkey console: http://") {
            addr = url.trim().trim_end_matches('/').to_string();
        }
        if let Some(s) = line.strip_prefix("login secret (one-time): ") {
            secret = s.trim().to_string();
        }
    }
    // Keep reading stderr (the console's log) so it never blocks, and keep it for the end.
    let log = std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = stderr.read_to_string(&mut rest);
        rest
    });
    let before = fs::read(ws.policy()).unwrap();

    // No session: pages send to the login, POSTs are refused.
    let (status, headers, _) = http(&addr, "GET", "/", None, None);
    assert_eq!(
        (status, header(&headers, "location")),
        (303, Some("/login"))
    );
    assert_eq!(
        header(&headers, "content-security-policy")
            .map(|v| v.starts_with("default-src 'self'; script-src 'self'")),
        Some(true)
    );
    assert_eq!(header(&headers, "x-frame-options"), Some("DENY"));
    assert_eq!(header(&headers, "referrer-policy"), Some("no-referrer"));
    assert_eq!(header(&headers, "cache-control"), Some("no-store"));
    let (status, _, _) = http(
        &addr,
        "POST",
        "/tokens/ann/revoke",
        None,
        Some("csrf=anything"),
    );
    assert_eq!(status, 403);

    // A wrong secret, then the printed one.
    let (status, _, _) = http(&addr, "POST", "/login", None, Some("secret=wrong"));
    assert_eq!(status, 401);
    let (status, headers, _) = http(
        &addr,
        "POST",
        "/login",
        None,
        Some(&format!("secret={secret}")),
    );
    assert_eq!(status, 303);
    let cookie = header(&headers, "set-cookie").unwrap().to_string();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let cookie = cookie.split(';').next().unwrap().to_string();
    // Used once: the same secret does not log in again.
    let (status, _, _) = http(
        &addr,
        "POST",
        "/login",
        None,
        Some(&format!("secret={secret}")),
    );
    assert_eq!(status, 401);

    let (status, _, page) = http(&addr, "GET", "/", Some(&cookie), None);
    assert_eq!(status, 200);
    assert!(
        page.contains("ann@x") && page.contains("/tokens/ann"),
        "{page}"
    );
    let csrf = page
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap()
        .to_string();
    let (status, _, token_page) = http(&addr, "GET", "/tokens/ann", Some(&cookie), None);
    assert_eq!(status, 200);

    // A forged CSRF token, none, another session's cookie: 403, nothing changed.
    for form in [
        "csrf=forged".to_string(),
        String::new(),
        format!("csrf={csrf}0"),
    ] {
        let (status, _, body) = http(
            &addr,
            "POST",
            "/tokens/ann/revoke",
            Some(&cookie),
            Some(&form),
        );
        assert_eq!(status, 403, "{form}: {body}");
    }
    let (status, _, _) = http(
        &addr,
        "POST",
        "/tokens/ann/revoke",
        Some("shieldkey_console=someone-elses"),
        Some(&format!("csrf={csrf}")),
    );
    assert_eq!(status, 403);
    let (status, _, _) = http(
        &addr,
        "POST",
        "/mint",
        Some(&cookie),
        Some("csrf=forged&form_id=x&id=evil&upstream_key=prod"),
    );
    assert_eq!(status, 403);
    assert_eq!(
        fs::read(ws.policy()).unwrap(),
        before,
        "the policy file did not change"
    );

    // The real thing goes through (and is the CLI's revoke: the next revision, revoked).
    let (status, headers, _) = http(
        &addr,
        "POST",
        "/tokens/ann/revoke",
        Some(&cookie),
        Some(&format!("csrf={csrf}")),
    );
    assert_eq!(
        (status, header(&headers, "location")),
        (303, Some("/tokens/ann"))
    );
    let policy = read_json(&ws.policy());
    assert_eq!(policy["tokens"][0]["status"], "revoked");
    assert_eq!(policy["revision"], 4);

    child.kill().unwrap();
    child.wait().unwrap();
    let log = log.join().unwrap();
    assert!(log.contains("refused"), "{log}");
    // No page and no log line has the token, its digest or the upstream key.
    let digest = policy["tokens"][0]["digest"].as_str().unwrap().to_string();
    for text in [&page, &token_page, &log, &banner] {
        assert!(!text.contains(&token) && !text.contains(REAL_KEY) && !text.contains(&digest));
        assert!(!text.contains(&ws.master));
    }
}

#[test]
fn settings_are_shown_and_replaced_in_the_policy_file() {
    let ws = Workspace::new("settings");
    ws.ok(&["init"], None);
    ws.ok(
        &["seal", "--id", "prod"],
        Some("RealKey0123456789abcdefghijklmno\n"),
    );
    ws.ok(&["mint", "--id", "alice", "--upstream-key", "prod"], None);
    let before = read_json(&ws.policy());
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&ws.ok(&["settings"], None)).unwrap(),
        serde_json::json!({})
    );
    let file = ws.dir.join("settings.json");
    fs::write(
        &file,
        r#"{"requests": {"max_body_bytes": 1048576}, "alerts": {"thresholds_percent": [75]}}"#,
    )
    .unwrap();
    ws.ok(&["settings", "set", file.to_str().unwrap()], None);
    let after = read_json(&ws.policy());
    assert_eq!(after["requests"]["max_body_bytes"], 1048576);
    assert_eq!(
        after["alerts"]["thresholds_percent"],
        serde_json::json!([75])
    );
    assert_eq!(after["tokens"], before["tokens"], "tokens untouched");
    assert_eq!(after["revision"], before["revision"].as_u64().unwrap() + 1);

    // A value the filter refuses: named, and the file is left as it was.
    let err = ws.fails(
        &["settings", "set", "-"],
        Some(r#"{"alerts": {"thresholds_percent": [80, 50]}}"#),
        1,
    );
    assert!(err.contains("alerts.thresholds_percent"), "{err}");
    assert_eq!(read_json(&ws.policy()), after);
    assert!(ws
        .fails(&["settings", "unset"], None, 2)
        .contains("settings takes no argument, or set FILE"));
}
