//! Plugin configuration: the policy file format (`raw`) and its compilation into a validated
//! [`Policy`](crate::policy::Policy) (`compile`). The CLI's `check` runs exactly this code.

pub mod compile;
pub mod error;
pub mod master_key_env;
pub mod raw;
pub mod settings;
pub mod source;
pub mod token_rules;
pub mod token_split;
pub mod token_stream;

pub use compile::{compile, CompileOptions};
pub use error::ConfigError;

#[cfg(test)]
mod tests;
