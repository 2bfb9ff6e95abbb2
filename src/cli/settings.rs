//! `shieldkey settings [set FILE|-]`: the policy-wide sections `pricing`, `requests` and
//! `alerts`, printed as JSON, or replaced from a JSON document and validated with the filter's own
//! compiler before anything is written. The file and etcd alike; in fleet mode it is how the
//! budget alert webhook or a price override is set. (`enforce` has its own command.)

use std::io::Read;

use serde::{Deserialize, Serialize};

use super::args::Args;
use super::commands::{change, publish_options, Context};
use super::error::{failed, usage, CliError};
use super::policy_store::Scope;
use crate::config::raw::{RawAlerts, RawPolicy, RawPricing, RawRequests};

/// The sections `settings` shows and replaces; one left out is its default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicySettings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pricing: Option<RawPricing>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    requests: Option<RawRequests>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    alerts: Option<RawAlerts>,
}

impl PolicySettings {
    fn of(policy: &RawPolicy) -> Self {
        PolicySettings {
            pricing: policy.pricing.clone(),
            requests: policy.requests.clone(),
            alerts: policy.alerts.clone(),
        }
    }

    fn apply(&self, policy: &mut RawPolicy) {
        policy.pricing = self.pricing.clone();
        policy.requests = self.requests.clone();
        policy.alerts = self.alerts.clone();
    }
}

pub fn settings(ctx: &mut Context, mut args: Args) -> Result<(), CliError> {
    let publish = publish_options(&mut args, "publish")?;
    let action = args.positional("set").ok();
    match action.as_deref() {
        None => {
            args.finish()?;
            if publish.given() {
                return Err(usage("--publish goes with settings set FILE"));
            }
            let policy = ctx.store.load_scoped(&Scope::NoTokens)?.policy;
            let text = serde_json::to_string_pretty(&PolicySettings::of(&policy))
                .map_err(|e| failed(format!("cannot encode the settings: {e}")))?;
            println!("{text}");
            Ok(())
        }
        Some("set") => {
            let source = args.positional("FILE (or - for stdin)")?;
            args.finish()?;
            let wanted = read_settings(&source)?;
            change(ctx, publish, Scope::NoTokens, false, |policy, _| {
                let before = PolicySettings::of(policy);
                wanted.apply(policy);
                Ok(if before == wanted {
                    "policy-wide settings unchanged (they already were these)".to_string()
                } else {
                    format!("policy-wide settings replaced ({})", summary(&wanted))
                })
            })
        }
        // Not echoed: like any stray argument, it may be a pasted secret.
        Some(_) => Err(usage("settings takes no argument, or set FILE")),
    }
}

/// The settings document from `source` (`-`: stdin), with the path of what is wrong in it.
fn read_settings(source: &str) -> Result<PolicySettings, CliError> {
    let mut bytes = Vec::new();
    if source == "-" {
        std::io::stdin()
            .read_to_end(&mut bytes)
            .map_err(|e| failed(format!("cannot read the settings from stdin: {e}")))?;
    } else {
        bytes = std::fs::read(source).map_err(|e| failed(format!("cannot read {source}: {e}")))?;
    }
    let name = if source == "-" { "stdin" } else { source };
    let mut de = serde_json::Deserializer::from_slice(&bytes);
    let settings: PolicySettings = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        failed(format!(
            "{name}: {path}: {} (the settings are an object with pricing, requests and alerts, \
             as in the policy file)",
            e.into_inner()
        ))
    })?;
    de.end().map_err(|e| failed(format!("{name}: {e}")))?;
    Ok(settings)
}

fn summary(s: &PolicySettings) -> String {
    let state = |set: bool| if set { "set" } else { "default" };
    format!(
        "pricing {}, requests {}, alerts {}",
        state(s.pricing.is_some()),
        state(s.requests.is_some()),
        state(s.alerts.is_some())
    )
}
