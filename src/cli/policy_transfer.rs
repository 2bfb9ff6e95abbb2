//! Moving a whole policy between a file and etcd, as it is: tokens keep their digests (their
//! secrets keep working), upstream keys stay sealed, teams and the policy-wide settings come
//! along.
//! - `shieldkey --etcd URLS import FILE [--force]`: a policy file into etcd, to move a deployment
//!   to fleet mode without minting again. The fleet's Envoys must run with the master key the
//!   file was written with; the import checks that every sealed key opens with the master key it
//!   is given before it writes anything.
//! - `shieldkey --etcd URLS export FILE [--force]`: the policy in etcd into a file (a backup, or
//!   the way back to single-Envoy mode), at the revision read.

use std::path::Path;

use super::args::Args;
use super::commands::{require_master_key, retrying, written_note, Context};
use super::error::{failed, usage, CliError};
use super::policy_file;

/// The arguments both take: the file, and `--force`; both need etcd.
fn file_and_force(ctx: &Context, mut args: Args, what: &str) -> Result<(String, bool), CliError> {
    let force = args.flag("force");
    let path = args.positional("policy file")?;
    args.finish()?;
    if !ctx.store.is_etcd() {
        return Err(usage(format!(
            "{what}: give --etcd URLS (or SHIELDKEY_ETCD)"
        )));
    }
    Ok((path, force))
}

pub fn import(ctx: &mut Context, args: Args) -> Result<(), CliError> {
    let (path, force) = file_and_force(ctx, args, "import writes a policy file into etcd")?;
    let file = policy_file::load(Path::new(&path))?;
    if file.fleet.is_some() {
        return Err(failed(format!(
            "{path}: has a `fleet` section, which belongs in the Envoys' plugin configuration, \
             not in the policy"
        )));
    }
    // Every sealed key must open: a fleet started with another master key would refuse all.
    let master = require_master_key(Some(&file))?;
    let (revision, steps, retries) = retrying(&mut ctx.store, |store| {
        let existing = store.existing()?;
        if let Some(what) = &existing.found {
            if !force {
                return Err(failed(format!(
                    "{what}; use --force to replace it with {path}"
                )));
            }
        }
        let mut policy = file.clone();
        // Revisions only go up, from the file's point of view and from etcd's.
        policy.revision = policy.revision.max(existing.revision);
        let saved = store.save(&existing.base, &mut policy, Some(&master))?;
        Ok((saved, policy.revision))
    })?;
    eprintln!(
        "imported {path}: {} tokens, {} teams, {} upstream keys (policy revision {revision}{})",
        file.tokens.len(),
        file.teams.len(),
        file.upstream_keys.len(),
        written_note(&ctx.store, steps, retries)
    );
    Ok(())
}

pub fn export(ctx: &mut Context, args: Args) -> Result<(), CliError> {
    let (path, force) = file_and_force(ctx, args, "export reads the policy from etcd")?;
    let target = Path::new(&path);
    if target.exists() && !force {
        return Err(failed(format!("{path} exists; use --force to replace it")));
    }
    let policy = ctx.store.load()?.policy;
    let bytes = policy_file::to_json(&policy)?;
    // What is written is a policy the filter accepts (sealed keys are not opened: no master key
    // is needed to take a copy).
    policy_file::validate(&bytes, None)?;
    policy_file::write_atomic(target, &bytes, 0o600)?;
    eprintln!(
        "exported {} to {path}: {} tokens, {} teams, {} upstream keys (policy revision {})",
        ctx.store.describe(),
        policy.tokens.len(),
        policy.teams.len(),
        policy.upstream_keys.len(),
        policy.revision
    );
    Ok(())
}
