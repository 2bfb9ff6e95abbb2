//! Envoy stats the filter reports, defined once per configuration (never per request).
//!
//! Names are built so that `stats_tags` regexes in the shipped Envoy configs turn the variable
//! parts into Prometheus labels, e.g. `shieldkey.reason.shield_token_revoked.denied` becomes
//! `shieldkey_denied{reason="shield_token_revoked"}`. They appear as `wasmcustom.<name>`.

use std::collections::HashMap;

use proxy_wasm::hostcalls;
use proxy_wasm::types::MetricType;

use crate::denial::Denial;

pub struct Metrics {
    allowed: Option<u32>,
    denied: HashMap<&'static str, u32>,
}

impl Metrics {
    pub fn define() -> Self {
        let counter = |name: &str| hostcalls::define_metric(MetricType::Counter, name).ok();
        let denied = Denial::ALL_CODES
            .iter()
            .filter_map(|code| Some((*code, counter(&format!("shieldkey.reason.{code}.denied"))?)))
            .collect();
        Metrics {
            allowed: counter("shieldkey.allowed"),
            denied,
        }
    }

    pub fn allowed(&self) {
        bump(self.allowed);
    }

    pub fn denied(&self, denial: &Denial) {
        bump(self.denied.get(denial.code()).copied());
    }
}

fn bump(id: Option<u32>) {
    if let Some(id) = id {
        let _ = hostcalls::increment_metric(id, 1);
    }
}
