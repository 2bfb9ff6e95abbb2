//! Compiling the policy-wide sections: `pricing`, `requests` and `alerts`.

use super::error::ConfigError;
use super::raw::{RawAlerts, RawPolicy, RawPricing, RawRequests};
use crate::pricing::{self, PriceTable};
use crate::settings::{self, Settings, Webhook};
use crate::spend::{Prices, UnknownModel};

pub fn compile_settings(raw: &RawPolicy) -> Result<Settings, ConfigError> {
    let mut out = Settings {
        prices: compile_pricing(raw.pricing.as_ref())?,
        dry_run: raw.enforce == Some(false),
        ..Settings::default()
    };
    if let Some(requests) = &raw.requests {
        compile_requests(requests, &mut out)?;
    }
    if let Some(alerts) = &raw.alerts {
        compile_alerts(alerts, &mut out)?;
    }
    Ok(out)
}

fn compile_pricing(raw: Option<&RawPricing>) -> Result<Prices, ConfigError> {
    let Some(raw) = raw else {
        return Ok(Prices::new(PriceTable::builtin(), UnknownModel::MaxPrice));
    };
    let mut overrides = Vec::with_capacity(raw.models.len());
    for (i, m) in raw.models.iter().enumerate() {
        let path = format!("pricing.models[{i}]");
        let name_ok = !m.model.is_empty()
            && m.model.len() <= 128
            && m.model.bytes().all(|b| b.is_ascii_graphic());
        if !name_ok {
            return Err(ConfigError::at(
                format!("{path}.model"),
                "must be 1-128 printable ASCII characters",
            ));
        }
        let price = pricing::parse_price(&m.input_usd_per_mtok, &m.output_usd_per_mtok)
            .map_err(|e| ConfigError::at(&path, e))?;
        overrides.push((m.model.clone(), price));
    }
    let default_price = raw
        .default_price
        .as_ref()
        .map(|p| pricing::parse_price(&p.input_usd_per_mtok, &p.output_usd_per_mtok))
        .transpose()
        .map_err(|e| ConfigError::at("pricing.default_price", e))?;
    let unknown = match (raw.unknown_model.as_deref(), default_price) {
        (None | Some("max_price"), None) => UnknownModel::MaxPrice,
        (Some("deny"), None) => UnknownModel::Deny,
        (Some("default_price"), Some(price)) => UnknownModel::Price(price),
        (Some("default_price"), None) => {
            return Err(ConfigError::at(
                "pricing.default_price",
                "required when unknown_model is \"default_price\"",
            ))
        }
        (None | Some("max_price" | "deny"), Some(_)) => {
            return Err(ConfigError::at(
                "pricing.default_price",
                "only used when unknown_model is \"default_price\"",
            ))
        }
        (Some(_), _) => {
            return Err(ConfigError::at(
                "pricing.unknown_model",
                "must be \"max_price\", \"default_price\" or \"deny\"",
            ))
        }
    };
    Ok(Prices::new(
        PriceTable::builtin().with_overrides(overrides),
        unknown,
    ))
}

fn compile_requests(raw: &RawRequests, out: &mut Settings) -> Result<(), ConfigError> {
    if let Some(max) = raw.max_body_bytes {
        if max == 0 || max > settings::MAX_MAX_BODY_BYTES {
            return Err(ConfigError::at(
                "requests.max_body_bytes",
                format!("must be between 1 and {}", settings::MAX_MAX_BODY_BYTES),
            ));
        }
        out.max_body_bytes = max;
    }
    if let Some(tokens) = raw.default_max_tokens {
        if tokens == 0 || tokens > 10_000_000 {
            return Err(ConfigError::at(
                "requests.default_max_tokens",
                "must be between 1 and 10000000",
            ));
        }
        out.default_max_tokens = tokens;
    }
    if let Some(tokens) = raw.max_context_tokens {
        if tokens == 0 || tokens > 100_000_000 {
            return Err(ConfigError::at(
                "requests.max_context_tokens",
                "must be between 1 and 100000000",
            ));
        }
        out.max_context_tokens = tokens;
    }
    if let Some(header) = &raw.country_header {
        let ok = !header.is_empty()
            && !header.starts_with(':')
            && header
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if !ok {
            return Err(ConfigError::at(
                "requests.country_header",
                "must be a lower-case HTTP header name",
            ));
        }
        out.country_header = header.clone();
    }
    Ok(())
}

fn compile_alerts(raw: &RawAlerts, out: &mut Settings) -> Result<(), ConfigError> {
    if let Some(thresholds) = &raw.thresholds_percent {
        let valid_values = thresholds.iter().all(|t| (1..=100).contains(t));
        let ascending = thresholds.windows(2).all(|w| matches!(w, [a, b] if a < b));
        if thresholds.len() > 8 || !valid_values || !ascending {
            return Err(ConfigError::at(
                "alerts.thresholds_percent",
                "at most 8 strictly ascending percentages between 1 and 100",
            ));
        }
        out.alert_thresholds = thresholds.clone();
    }
    if let Some(hook) = &raw.webhook {
        if hook.cluster.is_empty() {
            return Err(ConfigError::at(
                "alerts.webhook.cluster",
                "must name an Envoy cluster",
            ));
        }
        if !hook.path.starts_with('/') {
            return Err(ConfigError::at(
                "alerts.webhook.path",
                "must start with '/'",
            ));
        }
        let timeout_ms = hook
            .timeout_ms
            .unwrap_or(settings::DEFAULT_WEBHOOK_TIMEOUT_MS);
        if timeout_ms == 0 || timeout_ms > 60_000 {
            return Err(ConfigError::at(
                "alerts.webhook.timeout_ms",
                "must be between 1 and 60000",
            ));
        }
        out.webhook = Some(Webhook {
            cluster: hook.cluster.clone(),
            path: hook.path.clone(),
            authority: hook
                .authority
                .clone()
                .unwrap_or_else(|| hook.cluster.clone()),
            timeout_ms,
        });
    }
    Ok(())
}
