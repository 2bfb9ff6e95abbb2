//! Reading, validating and atomically writing the policy file and the published ECDS file.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::error::{failed, CliError};
use crate::config::compile::{compile_bytes, CompileOptions};
use crate::config::raw::{self, RawPolicy};
use crate::master_key::MasterKey;
use crate::policy::Policy;

pub fn load(path: &Path) -> Result<RawPolicy, CliError> {
    let bytes = fs::read(path).map_err(|e| {
        failed(format!(
            "cannot read policy {}: {e} (create one with `shieldkey init`)",
            path.display()
        ))
    })?;
    raw::parse(&bytes).map_err(|e| failed(format!("{}: {e}", path.display())))
}

pub fn to_json(policy: &RawPolicy) -> Result<Vec<u8>, CliError> {
    let mut out = serde_json::to_vec_pretty(policy)
        .map_err(|e| failed(format!("cannot encode the policy: {e}")))?;
    out.push(b'\n');
    Ok(out)
}

/// Runs the filter's own compilation on exactly the bytes that would be written. With the master
/// key, sealed keys must open too.
pub fn validate(bytes: &[u8], master: Option<&MasterKey>) -> Result<Policy, CliError> {
    compile_bytes(bytes, &CompileOptions { master_key: master })
        .map_err(|e| failed(format!("policy rejected: {e}")))
}

/// Validates, bumps the revision and writes atomically. Returns the written policy.
pub fn save(
    path: &Path,
    policy: &mut RawPolicy,
    master: Option<&MasterKey>,
) -> Result<(), CliError> {
    policy.revision = policy.revision.saturating_add(1);
    let bytes = to_json(policy)?;
    validate(&bytes, master)?;
    write_atomic(path, &bytes, 0o600)
}

/// Write to a temporary file in the same directory, fsync, rename over the target, fsync the
/// directory: readers (Envoy watching the directory) see the old file or the new one, never half.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CliError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| failed(format!("{} is not a file path", path.display())))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| -> std::io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        File::open(&dir)?.sync_all()
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(failed(format!("cannot write {}: {e}", path.display())));
    }
    Ok(())
}
