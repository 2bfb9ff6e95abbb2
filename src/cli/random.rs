//! Randomness from the operating system (`/dev/urandom`): token secrets, nonces, master keys.

use std::fs::File;
use std::io::Read;

use super::error::{failed, CliError};

pub fn fill(buf: &mut [u8]) -> Result<(), CliError> {
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(buf))
        .map_err(|e| failed(format!("cannot read /dev/urandom: {e}")))
}
