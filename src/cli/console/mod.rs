//! `shieldkey console`: the operator's web console, served by the CLI binary.
//!
//! Tokens with owner, status, spend against limit, window reset, last use and denials (one
//! Envoy's admin stats, or the fleet's ledger in etcd; the audit log); a token's recent audit
//! records; revoke, unrevoke, change limits and mint, each through the CLI's own code
//! (`commands`), published live as `--publish PATH [--admin URL]` does for the CLI, or written to
//! etcd in fleet mode.
//!
//! Security model: it listens on loopback unless `--allow-remote`; logging in needs the one-time
//! login secret printed on stderr (or `SHIELDKEY_CONSOLE_PASSWORD`); sessions live in memory
//! behind an `HttpOnly; SameSite=Strict` cookie; every POST needs the session's CSRF token and
//! must come from the console's own origin; GET changes nothing; no page renders a secret except
//! a newly minted token, once.
//!
//! - `server`: routes, guards, handlers; `auth`: login; `session`: sessions, flashes, mint forms;
//!   `csrf`: origin and host checks; `data`: what pages show; `pages` and `html`: rendering;
//!   `actions`: forms to the CLI's core functions.

mod actions;
mod auth;
mod csrf;
mod data;
mod html;
mod pages;
mod serve;
mod server;
mod session;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use super::admin::Admin;
use super::args::Args;
use super::commands::{publish_options, Context, Publish};
use super::error::{failed, usage, CliError};
use super::policy_store::PolicyStore;
use super::{env_var, Target};
use crate::secret::SecretBytes;
use auth::{Credential, LoginGate};

/// Where the console listens by default.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8484";
/// The variable of a configured login password (never argv).
pub const PASSWORD_ENV: &str = "SHIELDKEY_CONSOLE_PASSWORD";

/// Fleet mode: where etcd is, for the ledger.
pub struct Fleet {
    pub urls: String,
    pub prefix: String,
    pub user: Option<String>,
}

/// How the console was started.
pub struct Config {
    /// Where and how changes are published (as `--publish PATH [--admin URL]` for the CLI).
    pub publish: Publish,
    /// The Envoy whose stats are shown (single-Envoy mode).
    pub admin: Option<Admin>,
    /// The ECDS filter whose served revision is checked.
    pub filter_name: String,
    pub audit_log: Option<PathBuf>,
    /// The `Host` names answered (`--allow-remote`, `--public-host`).
    pub hosts: csrf::Hosts,
    pub fleet: Option<Fleet>,
    /// Where the policy is, for the top bar.
    pub describe: String,
}

/// Checks the listen address: loopback, unless remote access is allowed.
fn listen_address(text: &str, allow_remote: bool) -> Result<SocketAddr, CliError> {
    let addr: SocketAddr = text.parse().map_err(|_| {
        usage(format!(
            "--listen {text}: give IP:PORT, e.g. {DEFAULT_LISTEN} (or [::1]:8484)"
        ))
    })?;
    if !addr.ip().is_loopback() && !allow_remote {
        return Err(usage(format!(
            "--listen {text} is not a loopback address: the console would be reachable from \
             other hosts. Give --allow-remote to mean it (and put TLS in front of it), or \
             listen on {DEFAULT_LISTEN}"
        )));
    }
    Ok(addr)
}

/// `console [--listen ADDR] [--allow-remote] [--admin URL] [--audit-log PATH]
/// [--publish PATH [filter settings] [--wait-secs N]]`.
pub fn console(target: Target, mut args: Args) -> Result<(), CliError> {
    let listen = args
        .option("listen")?
        .unwrap_or_else(|| DEFAULT_LISTEN.to_string());
    let allow_remote = args.flag("allow-remote");
    let public_hosts =
        match args.option("public-host")? {
            Some(_) if !allow_remote => return Err(usage(
                "--public-host names the hosts a remote console is reached under: give it with \
                 --allow-remote (on loopback the console answers loopback names only)",
            )),
            Some(text) => csrf::parse_public_hosts(&text).map_err(usage)?,
            None => Vec::new(),
        };
    let admin_flag = args.option("admin")?;
    let audit_log = args.option("audit-log")?.map(PathBuf::from);
    let mut publish = publish_options(&mut args, "publish")?;
    args.finish()?;
    let addr = listen_address(&listen, allow_remote)?;

    let (store, fleet, admin) = match target {
        Target::File(path) => {
            let admin = admin_flag.or_else(|| env_var("SHIELDKEY_ADMIN"));
            (PolicyStore::File(path), None, admin)
        }
        Target::Etcd { urls, prefix, user } => {
            if admin_flag.is_some() {
                return Err(usage(
                    "--admin reads one Envoy's stats, with the policy file; in fleet mode the \
                     console reads the fleet's spend from the ledger in etcd (leave out --admin)",
                ));
            }
            let store = PolicyStore::etcd(&urls, &prefix, user.clone())?;
            (store, Some(Fleet { urls, prefix, user }), None)
        }
    };
    publish.check_store(&store)?;
    publish.confirm_with(admin.clone());
    let admin = admin.map(|url| Admin::parse(&url)).transpose()?;
    let filter_name = publish.filter_name().unwrap_or("shieldkey").to_string();

    let mut ctx = Context { store };
    // A policy that cannot be read is said now, not on the first page.
    let revision = ctx
        .store
        .load()
        .map_err(|e| failed(format!("cannot start the console: {e}")))?
        .policy
        .revision;

    // Compared as typed into the login form, which is trimmed: surrounding spaces of the
    // configured password would otherwise make it impossible to enter.
    let credential = match env_var(PASSWORD_ENV).filter(|p| !p.trim().is_empty()) {
        Some(password) => {
            Credential::Password(SecretBytes::new(password.trim().as_bytes().to_vec()))
        }
        None => Credential::OneTime(None),
    };
    let mut gate = LoginGate::new(credential);
    let one_time = if gate.is_password() {
        None
    } else {
        let secret = auth::random_text()?;
        gate = LoginGate::new(Credential::OneTime(Some(SecretBytes::new(
            secret.clone().into_bytes(),
        ))));
        Some(secret)
    };

    let listener = std::net::TcpListener::bind(addr)
        .map_err(|e| failed(format!("cannot listen on {addr}: {e}")))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| failed(format!("cannot listen on {addr}: {e}")))?;
    let bound = listener
        .local_addr()
        .map_err(|e| failed(format!("cannot listen on {addr}: {e}")))?;

    let publishing = match (&fleet, publish.to()) {
        (Some(_), _) => "changes are written to etcd; every Envoy follows them".to_string(),
        (None, Some(to)) => match &admin {
            Some(a) => format!(
                "changes are published to {to} and confirmed by Envoy at {}",
                a.url()
            ),
            None => format!("changes are published to {to} (not confirmed: no --admin)"),
        },
        (None, None) => {
            "changes are written to the policy file only (no --publish: not applied live)"
                .to_string()
        }
    };
    let spend = match (&fleet, &admin) {
        (Some(_), _) => "spend from the ledger in etcd".to_string(),
        (None, Some(a)) => format!("spend and counters from Envoy at {}", a.url()),
        (None, None) => "no spend shown (no --admin)".to_string(),
    };
    let describe = ctx.store.describe();
    eprintln!("shieldkey console: http://{bound}/");
    eprintln!("  policy: {describe} (revision {revision}); {publishing}");
    eprintln!(
        "  {spend}; audit log: {}",
        audit_log.as_ref().map_or_else(
            || "none (no --audit-log)".to_string(),
            |p| p.display().to_string()
        )
    );
    if allow_remote && !bound.ip().is_loopback() {
        eprintln!(
            "warning: listening on {bound}, reachable from other hosts: put a TLS-terminating \
             proxy in front of it (the session cookie is marked Secure and needs HTTPS)"
        );
    }
    if allow_remote && public_hosts.is_empty() {
        eprintln!(
            "warning: no --public-host: every Host name is answered, so a page that rebinds its \
             own name to this console reaches its login page; give the names it is reached under"
        );
    }
    match &one_time {
        Some(secret) => eprintln!("login secret (one-time): {secret}"),
        None => eprintln!("log in with the password from {PASSWORD_ENV}"),
    }

    let app = Arc::new(server::App {
        config: Config {
            publish,
            admin,
            filter_name,
            audit_log,
            hosts: csrf::Hosts {
                allow_remote,
                public: public_hosts,
            },
            fleet,
            describe,
        },
        ctx: Mutex::new(ctx),
        sessions: Mutex::new(session::Sessions::default()),
        gate: Mutex::new(gate),
    });
    // Timers too: the server sleeps and retries when accepting a connection fails (say, out of
    // file descriptors under a flood of idle connections); without a timer that sleep panics
    // and the console exits.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| failed(format!("cannot start the console's runtime: {e}")))?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener)
            .map_err(|e| failed(format!("cannot listen on {bound}: {e}")))?;
        serve::serve(listener, server::router(app)).await;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listens_on_loopback_unless_remote_is_allowed() {
        assert!(listen_address("127.0.0.1:8484", false).is_ok());
        assert!(listen_address("[::1]:0", false).is_ok());
        assert!(listen_address("0.0.0.0:8484", false).is_err());
        assert!(listen_address("192.0.2.1:8484", false).is_err());
        assert!(listen_address("0.0.0.0:8484", true).is_ok());
        assert!(listen_address("localhost", false).is_err());
    }
}
