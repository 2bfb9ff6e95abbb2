//! `shieldkey`: the operator's CLI. Mint, seal, revoke, check and publish policy, with the
//! filter's own validation, never taking a secret from argv.

mod admin;
mod args;
mod commands;
mod duration;
mod error;
mod etcd;
mod http;
mod policy_file;
mod policy_store;
mod random;
mod rule_flags;
mod status;

use std::path::PathBuf;

use args::Args;
use commands::Context;
use error::{usage, CliError};
use policy_store::{PolicyStore, DEFAULT_PREFIX};

use crate::config::raw::RawStatus;

const USAGE: &str = "\
shieldkey: revocable shield tokens for Mistral behind Envoy

usage: shieldkey [--policy PATH | --etcd URLS [--etcd-prefix P] [--etcd-user NAME]]
                 <command> [options]

  keygen                          print a new base64 master key (keep it in your secret store)
  init [--force]                  create an empty policy (the file, or in etcd)
  seal --id ID [--from-env VAR]   seal an upstream Mistral key read from stdin (or VAR);
                                  sealing an existing id rotates it
  mint --id ID --upstream-key KEY [--owner O] [--description D]
       [--not-before T] [--expires-at T | --ttl 90d] [rule flags]
                                  create a token; prints it once on stdout
  limit ID <rule flags>           change a token's rules
  revoke ID | unrevoke ID | remove ID
  list [--json]                   tokens and their state (never digests or keys)
  check                           validate the policy with the filter's own code
  status [--token ID] [--all] [--json]
                                  fleet mode: spend per budgeted token in its current window,
                                  summed over every Envoy (--token: per Envoy; --all: every token)
  render plugin-config|wasm-filter|ecds [filter settings]
  render http-filters [--country-header NAME] [--geoip DB_PATH] [--ecds-path PATH]
       [--filter-name NAME] [--json]
                                  the http_filters chain every listener needs (YAML, or JSON)
  publish --to PATH [filter settings] [--admin URL [--wait-secs N]]
                                  write the ECDS file Envoy watches, atomically

Changing commands (seal, mint, limit, revoke, unrevoke, remove) also take --publish PATH
[filter settings] [--admin URL [--wait-secs N]] to publish right after writing the policy.

Filter settings: --wasm PATH, --vm-id ID, --runtime envoy.wasm.runtime.v8 (or .wasmtime),
--filter-name NAME. Publishing over an existing file keeps that file's settings unless given;
a file that is not a ShieldKey ECDS file is never overwritten. Without a file and a flag, the
defaults are shieldkey.wasm (relative to Envoy's working directory), vm_id shieldkey, V8.

--admin URL (Envoy's admin, e.g. http://127.0.0.1:9901): after writing, wait up to --wait-secs
(default 10) until Envoy applied the new revision; exit 1 if it rejected it or did not apply it.

Fleet mode: with --etcd URLS (comma-separated http://HOST:PORT etcd client URLs, tried in order
until one answers) every command reads and writes the policy in etcd under --etcd-prefix
(default shieldkey/) instead of the policy file: <prefix>policy/settings, <prefix>policy/keys/<id>,
<prefix>policy/tokens/<id>. A change writes only the keys it changes, guarded by the revisions it
read: when another writer got there first it is read and applied again (up to 5 times). There is
nothing to publish (Envoys follow etcd): publish and --publish are refused. --etcd-user NAME
authenticates with the password from SHIELDKEY_ETCD_PASSWORD (never argv). Plain HTTP only: TLS
to etcd is not supported yet.

Environment: SHIELDKEY_POLICY (policy file, default policy.json), SHIELDKEY_MASTER_KEY (or the
variable the policy's master_key_env names), SHIELDKEY_PUBLISH, SHIELDKEY_WASM, SHIELDKEY_ADMIN
(defaults for --publish/--to, --wasm and --admin), SHIELDKEY_ETCD, SHIELDKEY_ETCD_PREFIX,
SHIELDKEY_ETCD_USER (defaults for --etcd, --etcd-prefix, --etcd-user), SHIELDKEY_ETCD_PASSWORD.
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
}

impl StoreOptions {
    fn take(args: &mut Args) -> Result<StoreOptions, CliError> {
        Ok(StoreOptions {
            policy: args.option("policy")?,
            etcd: args.option("etcd")?,
            prefix: args.option("etcd-prefix")?,
            user: args.option("etcd-user")?,
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

    /// Where the policy is, from the flags and their environment defaults.
    fn target(self) -> Result<Target, CliError> {
        let Some(urls) = self.etcd.or_else(|| env_var("SHIELDKEY_ETCD")) else {
            for (flag, given) in [
                ("--etcd-prefix", self.prefix.is_some()),
                ("--etcd-user", self.user.is_some()),
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
        Ok(Target::Etcd { urls, prefix, user })
    }
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
        "status" => return status::status(options.target()?, args),
        _ => {}
    }
    let mut ctx = Context {
        store: options.store()?,
    };
    let ctx = &mut ctx;
    match command.as_str() {
        "init" => commands::init(ctx, args),
        "seal" => commands::seal_key(ctx, args),
        "mint" => commands::mint(ctx, args),
        "revoke" => commands::set_status(ctx, args, RawStatus::Revoked),
        "unrevoke" => commands::set_status(ctx, args, RawStatus::Active),
        "limit" => commands::limit(ctx, args),
        "remove" => commands::remove(ctx, args),
        "list" => commands::list(ctx, args),
        "check" => commands::check(ctx, args),
        "render" => commands::render(ctx, args),
        "publish" => commands::publish(ctx, args),
        other => Err(usage(format!("unknown command '{other}'"))),
    }
}
