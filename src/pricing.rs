//! The Mistral price table, and what a request costs under it.
//!
//! Prices are integer nano-USD per million tokens, so a published price like $0.15/M is exact.
//! Costs are computed in `u128` and rounded up once per request, so a request is never billed
//! less than its price.

use std::collections::HashMap;

use crate::money::{self, NanoUsd};
use crate::usage::Usage;

/// The date of Mistral's published prices the built-in table reproduces.
pub const PRICE_TABLE_DATE: &str = "2026-08-12";

/// OCR: $4 per 1000 pages.
pub const OCR_NANO_PER_PAGE: NanoUsd = 4_000_000;
/// The most pages one OCR request processes (Mistral's documented limit per document): the
/// worst case of a request that does not name its `pages`.
pub const OCR_MAX_PAGES: u64 = 1_000;
/// Transcription: $0.003 per minute of audio.
pub const AUDIO_NANO_PER_SECOND: NanoUsd = 50_000;

/// Cost of `units` at `unit_price` (pages, seconds), saturating.
pub fn unit_cost(units: u64, unit_price: NanoUsd) -> NanoUsd {
    units.saturating_mul(unit_price)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelPrice {
    pub input_nano_per_mtok: u64,
    pub output_nano_per_mtok: u64,
}

const fn usd_per_mtok(input_cents: u64, output_cents: u64) -> ModelPrice {
    ModelPrice {
        input_nano_per_mtok: input_cents * 10_000_000,
        output_nano_per_mtok: output_cents * 10_000_000,
    }
}

/// (names, price): every alias and dated version Mistral documents for the same price is listed
/// explicitly; nothing is guessed from the shape of a name, because a dated version can carry a
/// different price than `-latest` (as `mistral-medium-2508` does).
const BUILTIN: &[(&[&str], ModelPrice)] = &[
    (
        &["mistral-large-latest", "mistral-large-2512"],
        usd_per_mtok(50, 150),
    ),
    (
        &["mistral-medium-latest", "mistral-medium-3-5"],
        usd_per_mtok(150, 750),
    ),
    (
        &["mistral-medium-2508", "mistral-medium-2505"],
        usd_per_mtok(40, 200),
    ),
    (
        &["mistral-small-latest", "mistral-small-2603"],
        usd_per_mtok(15, 60),
    ),
    (
        &["ministral-14b-latest", "ministral-14b-2512"],
        usd_per_mtok(20, 20),
    ),
    (
        &["ministral-8b-latest", "ministral-8b-2512"],
        usd_per_mtok(15, 15),
    ),
    (
        &["ministral-3b-latest", "ministral-3b-2512"],
        usd_per_mtok(10, 10),
    ),
    (
        &["codestral-latest", "codestral-2508"],
        usd_per_mtok(30, 90),
    ),
    (&["open-mistral-nemo"], usd_per_mtok(15, 15)),
    (&["pixtral-large-latest"], usd_per_mtok(200, 600)),
    (&["magistral-medium-latest"], usd_per_mtok(200, 500)),
    (&["magistral-small-latest"], usd_per_mtok(50, 150)),
    (
        &["devstral-medium-latest", "devstral-2512"],
        usd_per_mtok(40, 200),
    ),
    (&["mistral-embed"], usd_per_mtok(10, 0)),
    (&["codestral-embed"], usd_per_mtok(15, 0)),
    (
        &["mistral-moderation-latest", "mistral-moderation-2603"],
        usd_per_mtok(0, 0),
    ),
];

#[derive(Debug, Clone)]
pub struct PriceTable {
    models: HashMap<String, ModelPrice>,
}

impl PriceTable {
    pub fn builtin() -> PriceTable {
        let models = BUILTIN
            .iter()
            .flat_map(|(names, price)| names.iter().map(move |n| (n.to_string(), *price)))
            .collect();
        PriceTable { models }
    }

    /// Adds models, or replaces the price of known ones (a deployment's negotiated prices).
    pub fn with_overrides(mut self, overrides: Vec<(String, ModelPrice)>) -> PriceTable {
        self.models.extend(overrides);
        self
    }

    pub fn lookup(&self, model: &str) -> Option<ModelPrice> {
        self.models.get(model).copied()
    }

    /// The table's own spelling of `model`, for stats: a bounded set of names.
    pub fn canonical_name(&self, model: &str) -> Option<&str> {
        self.models.get_key_value(model).map(|(k, _)| k.as_str())
    }

    /// Component-wise maximum: the price that can never under-bill any model of the table.
    pub fn max_price(&self) -> ModelPrice {
        self.models.values().fold(
            ModelPrice {
                input_nano_per_mtok: 0,
                output_nano_per_mtok: 0,
            },
            |acc, p| ModelPrice {
                input_nano_per_mtok: acc.input_nano_per_mtok.max(p.input_nano_per_mtok),
                output_nano_per_mtok: acc.output_nano_per_mtok.max(p.output_nano_per_mtok),
            },
        )
    }
}

pub fn parse_price(
    input_usd_per_mtok: &str,
    output_usd_per_mtok: &str,
) -> Result<ModelPrice, String> {
    Ok(ModelPrice {
        input_nano_per_mtok: money::parse_usd(input_usd_per_mtok)
            .map_err(|e| format!("input_usd_per_mtok: {e}"))?,
        output_nano_per_mtok: money::parse_usd(output_usd_per_mtok)
            .map_err(|e| format!("output_usd_per_mtok: {e}"))?,
    })
}

/// Per million tokens, in tenths (cache discount) and percent (priority multiplier).
const DIVISOR: u128 = 1_000_000 * 10 * 100;

/// The exact cost of a response: uncached prompt tokens at the input price, cached ones at 10%
/// of it, completion tokens at the output price, all × 1.75 for the priority tier.
pub fn cost(price: ModelPrice, usage: &Usage) -> NanoUsd {
    let cached = usage.cached_prompt_tokens.min(usage.prompt_tokens);
    let uncached = u128::from(usage.prompt_tokens - cached);
    let input = u128::from(price.input_nano_per_mtok);
    let output = u128::from(price.output_nano_per_mtok);
    // Saturating: absurd counts or prices bill the maximum rather than wrap or panic.
    let tenths = (uncached.saturating_mul(input).saturating_mul(10))
        .saturating_add(u128::from(cached).saturating_mul(input))
        .saturating_add(
            u128::from(usage.completion_tokens)
                .saturating_mul(output)
                .saturating_mul(10),
        );
    let percent = if usage.priority { 175 } else { 100 };
    round_up(tenths.saturating_mul(percent))
}

/// The most a request can cost: every prompt token uncached, every allowed completion token
/// generated, at the priority multiplier.
pub fn worst_case_cost(
    price: ModelPrice,
    prompt_tokens_bound: u64,
    max_completion_tokens: u64,
) -> NanoUsd {
    let tenths = (u128::from(prompt_tokens_bound)
        .saturating_mul(u128::from(price.input_nano_per_mtok)))
    .saturating_add(
        u128::from(max_completion_tokens).saturating_mul(u128::from(price.output_nano_per_mtok)),
    )
    .saturating_mul(10);
    round_up(tenths.saturating_mul(175))
}

fn round_up(scaled: u128) -> NanoUsd {
    u64::try_from(scaled.div_ceil(DIVISOR)).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(prompt: u64, completion: u64, cached: u64, priority: bool) -> Usage {
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            cached_prompt_tokens: cached,
            priority,
            ..Usage::default()
        }
    }

    #[test]
    fn table_resolves_aliases_and_versions() {
        let t = PriceTable::builtin();
        let small = t.lookup("mistral-small-latest").unwrap();
        assert_eq!(small.input_nano_per_mtok, 150_000_000);
        assert_eq!(small.output_nano_per_mtok, 600_000_000);
        assert_eq!(t.lookup("mistral-small-2603"), Some(small));
        assert_ne!(
            t.lookup("mistral-medium-2508"),
            t.lookup("mistral-medium-latest")
        );
        assert_eq!(t.lookup("mistral-small"), None);
        assert_eq!(t.canonical_name("codestral-2508"), Some("codestral-2508"));
        assert_eq!(t.max_price(), usd_per_mtok(200, 750));
    }

    #[test]
    fn overrides_add_and_replace() {
        let t = PriceTable::builtin().with_overrides(vec![
            ("my-finetune".into(), usd_per_mtok(100, 300)),
            ("mistral-small-latest".into(), usd_per_mtok(10, 30)),
        ]);
        assert_eq!(t.lookup("my-finetune"), Some(usd_per_mtok(100, 300)));
        assert_eq!(t.lookup("mistral-small-latest"), Some(usd_per_mtok(10, 30)));
        assert_eq!(parse_price("0.15", "0.60"), Ok(usd_per_mtok(15, 60)));
        assert!(parse_price("0.15", "x")
            .unwrap_err()
            .contains("output_usd_per_mtok"));
    }

    #[test]
    fn costs_by_hand() {
        let small = usd_per_mtok(15, 60);
        // 1000 × 0.15 + 500 × 0.60 = 450 micro-USD.
        assert_eq!(cost(small, &usage(1000, 500, 0, false)), 450_000);
        // 400 of the 1000 prompt tokens cached: 600 × 0.15 + 400 × 0.015 + 500 × 0.60.
        assert_eq!(
            cost(small, &usage(1000, 500, 400, false)),
            90_000 + 6_000 + 300_000
        );
        // Priority: × 1.75 after the cache discount.
        assert_eq!(
            cost(small, &usage(1000, 500, 400, true)),
            396_000 * 175 / 100
        );
        // One token of a cheap model still costs something: rounded up, never down.
        assert_eq!(cost(usd_per_mtok(10, 10), &usage(1, 0, 0, false)), 100);
        assert_eq!(
            cost(
                ModelPrice {
                    input_nano_per_mtok: 1,
                    output_nano_per_mtok: 0
                },
                &usage(1, 0, 0, false)
            ),
            1
        );
        assert_eq!(cost(small, &usage(0, 0, 0, true)), 0);
        // Cached tokens above the prompt count are clamped, not subtracted into overflow.
        assert_eq!(
            cost(small, &usage(10, 0, 50, false)),
            cost(small, &usage(10, 0, 10, false))
        );
        assert_eq!(
            cost(
                usd_per_mtok(u64::MAX / 10_000_000, 0),
                &usage(u64::MAX, 0, 0, true)
            ),
            u64::MAX
        );
    }

    #[test]
    fn worst_case_bounds_every_usage_within_it() {
        let p = usd_per_mtok(200, 750);
        let worst = worst_case_cost(p, 1000, 2000);
        for (prompt, completion, cached, priority) in [
            (1000, 2000, 0, true),
            (1000, 2000, 500, true),
            (10, 2000, 0, false),
            (1000, 0, 0, true),
        ] {
            assert!(cost(p, &usage(prompt, completion, cached, priority)) <= worst);
        }
        assert_eq!(worst, cost(p, &usage(1000, 2000, 0, true)));
    }
}
