//! `shieldkey`: the operator's CLI. Mint, seal, revoke, check and publish policy, with the
//! filter's own validation, never taking a secret from argv.

mod admin;
mod args;
mod commands;
mod duration;
mod error;
mod policy_file;
mod random;
mod rule_flags;

use std::path::PathBuf;

use args::Args;
use commands::Context;
use error::{usage, CliError};

use crate::config::raw::RawStatus;

const USAGE: &str = "\
shieldkey: revocable shield tokens for Mistral behind Envoy

usage: shieldkey [--policy PATH] <command> [options]

  keygen                          print a new base64 master key (keep it in your secret store)
  init [--force]                  create an empty policy file
  seal --id ID [--from-env VAR]   seal an upstream Mistral key read from stdin (or VAR);
                                  sealing an existing id rotates it
  mint --id ID --upstream-key KEY [--owner O] [--description D]
       [--not-before T] [--expires-at T | --ttl 90d] [rule flags]
                                  create a token; prints it once on stdout
  limit ID <rule flags>           change a token's rules
  revoke ID | unrevoke ID | remove ID
  list [--json]                   tokens and their state (never digests or keys)
  check                           validate the policy with the filter's own code
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

Environment: SHIELDKEY_POLICY (policy file, default policy.json), SHIELDKEY_MASTER_KEY (or the
variable the policy's master_key_env names), SHIELDKEY_PUBLISH, SHIELDKEY_WASM, SHIELDKEY_ADMIN
(defaults for --publish/--to, --wasm and --admin). Times are RFC 3339, e.g. 2027-01-31T00:00:00Z.
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

fn dispatch(argv: Vec<String>) -> Result<(), CliError> {
    let mut args = Args::new(argv);
    let policy_path = args
        .option("policy")?
        .or_else(|| {
            std::env::var("SHIELDKEY_POLICY")
                .ok()
                .filter(|p| !p.is_empty())
        })
        .unwrap_or_else(|| "policy.json".to_string());
    let ctx = Context {
        policy_path: PathBuf::from(policy_path),
    };
    if args.flag("help") {
        print_help();
        return Ok(());
    }
    let command = args.positional("command")?;
    match command.as_str() {
        "help" => {
            print_help();
            Ok(())
        }
        "keygen" => commands::keygen(args),
        "init" => commands::init(&ctx, args),
        "seal" => commands::seal_key(&ctx, args),
        "mint" => commands::mint(&ctx, args),
        "revoke" => commands::set_status(&ctx, args, RawStatus::Revoked),
        "unrevoke" => commands::set_status(&ctx, args, RawStatus::Active),
        "limit" => commands::limit(&ctx, args),
        "remove" => commands::remove(&ctx, args),
        "list" => commands::list(&ctx, args),
        "check" => commands::check(&ctx, args),
        "render" => commands::render(&ctx, args),
        "publish" => commands::publish(&ctx, args),
        other => Err(usage(format!("unknown command '{other}'"))),
    }
}
