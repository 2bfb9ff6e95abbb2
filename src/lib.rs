//! ShieldKey: a proxy-wasm filter for Envoy that lets teams hand out revocable shield tokens
//! instead of their real Mistral API key.
//!
//! Everything except `glue` is pure Rust with no proxy-wasm import: the decision is a function of
//! (compiled policy, request facts, counters, now), and host capabilities sit behind small traits
//! (`store::SharedStore`) with in-memory implementations for tests.

pub mod access;
pub mod alert;
pub mod audit;
pub mod authenticate;
pub mod budget_window;
pub mod byte_search;
pub mod codec;
pub mod config;
pub mod denial;
pub mod envoy_render;
pub mod fleet;
pub mod ledger;
pub mod master_key;
pub mod money;
pub mod policy;
pub mod policy_store;
pub mod pricing;
pub mod routes;
pub mod rules;
pub mod seal;
pub mod secret;
pub mod settings;
pub mod spend;
pub mod store;
pub mod stream;
pub mod team;
pub mod time;
pub mod token;
pub mod token_digest;
pub mod token_record;
pub mod usage;
pub mod verified_secrets;

#[cfg(not(target_arch = "wasm32"))]
pub mod cli;

#[cfg(target_arch = "wasm32")]
mod glue;
