//! What a request may cost before it runs (the reservation), and what it did cost after.
//!
//! Reservation (worst case, so concurrent requests cannot overshoot a budget):
//! `prompt bound × input price + max_tokens × output price`, at the priority-tier multiplier and
//! without the cache discount. The prompt bound is the request body's length in bytes: a text
//! token is at least one byte of JSON, so it bounds the prompt tokens of text requests. (It does
//! not bound images or documents fetched by URL; see the README for the overshoot that remains.)
//! `max_tokens` defaults to the configured `default_max_tokens` when the request has none.
//!
//! Charge (after the response):
//! - usage present → exact cost from `prompt_tokens` and `completion_tokens` (never `total_tokens`);
//! - upstream error status without usage → 0 (Mistral bills nothing for errors);
//! - a complete response without usage (e.g. `/v1/models`) → 0;
//! - a response cut short (client abort, upstream reset, truncated body) → an estimate that is
//!   never 0: the larger of the reservation and the streamed bytes / 4 as completion tokens.

use crate::money::NanoUsd;
use crate::pricing::{self, ModelPrice, PriceTable};
use crate::usage::{ScanResult, Usage};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnknownModel {
    /// Refuse budgeted requests for models without a price.
    Deny,
    /// Charge the most expensive price in the table: never under-bill.
    MaxPrice,
    Price(ModelPrice),
}

#[derive(Debug, Clone)]
pub struct Prices {
    pub table: PriceTable,
    pub unknown: UnknownModel,
    max_price: ModelPrice,
}

impl Prices {
    pub fn new(table: PriceTable, unknown: UnknownModel) -> Self {
        let max_price = table.max_price();
        Prices {
            table,
            unknown,
            max_price,
        }
    }

    /// The price to charge for `model`; `None` only when unknown models are denied.
    pub fn price_for(&self, model: Option<&str>) -> Option<ModelPrice> {
        if let Some(price) = model.and_then(|m| self.table.lookup(m)) {
            return Some(price);
        }
        match &self.unknown {
            UnknownModel::Deny => None,
            UnknownModel::MaxPrice => Some(self.max_price),
            UnknownModel::Price(p) => Some(*p),
        }
    }
}

pub fn reservation(
    price: ModelPrice,
    body_len: u64,
    max_tokens: Option<u64>,
    default_max_tokens: u64,
) -> NanoUsd {
    pricing::worst_case_cost(price, body_len, max_tokens.unwrap_or(default_max_tokens))
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Charge {
    pub cost: NanoUsd,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// True when the cost is an estimate because the response ended without usage.
    pub estimated: bool,
}

pub struct ResponseFacts<'a> {
    pub status: u32,
    pub scan: &'a ScanResult,
    /// The stream reached its normal end (Envoy delivered end_of_stream) and the body was
    /// syntactically complete.
    pub complete: bool,
    pub bytes_seen: u64,
}

pub fn charge(
    prices: &Prices,
    request_model: Option<&str>,
    reserved: NanoUsd,
    facts: &ResponseFacts<'_>,
) -> Charge {
    let model = facts
        .scan
        .model
        .as_deref()
        .filter(|m| prices.table.lookup(m).is_some())
        .or(request_model);
    if let Some(usage) = &facts.scan.usage {
        let cost = prices
            .price_for(model)
            .map_or(0, |p| pricing::cost(p, usage));
        // A model the policy denies pricing for cannot have been admitted with a budget; if it
        // still reports usage (no budget on the token), charge the most expensive price.
        let cost = if prices.price_for(model).is_none() {
            pricing::cost(prices.max_price, usage)
        } else {
            cost
        };
        return Charge {
            cost,
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            estimated: false,
        };
    }
    if facts.status >= 400 || facts.complete {
        return Charge::default();
    }
    let completion_tokens = facts.bytes_seen.div_ceil(4);
    let price = prices.price_for(model).unwrap_or(prices.max_price);
    let by_bytes = pricing::cost(
        price,
        &Usage {
            prompt_tokens: 0,
            completion_tokens,
            cached_prompt_tokens: 0,
            priority: false,
        },
    );
    Charge {
        cost: by_bytes.max(reserved).max(1),
        prompt_tokens: 0,
        completion_tokens,
        estimated: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prices() -> Prices {
        Prices::new(PriceTable::builtin(), UnknownModel::MaxPrice)
    }

    fn usage(prompt: u64, completion: u64) -> Usage {
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            cached_prompt_tokens: 0,
            priority: false,
        }
    }

    fn facts(status: u32, scan: &ScanResult, complete: bool, bytes: u64) -> ResponseFacts<'_> {
        ResponseFacts {
            status,
            scan,
            complete,
            bytes_seen: bytes,
        }
    }

    #[test]
    fn usage_is_billed_exactly_by_the_response_model() {
        let scan = ScanResult {
            usage: Some(usage(1000, 500)),
            model: Some("mistral-small-latest".into()),
        };
        let c = charge(&prices(), None, 9_999, &facts(200, &scan, true, 800));
        // 1000 × 0.15 + 500 × 0.60 USD per million tokens.
        assert_eq!(c.cost, 450_000);
        assert!(!c.estimated);
        assert_eq!((c.prompt_tokens, c.completion_tokens), (1000, 500));
    }

    #[test]
    fn errors_and_usage_free_responses_cost_nothing() {
        let empty = ScanResult::default();
        assert_eq!(
            charge(&prices(), None, 5_000, &facts(429, &empty, true, 90)).cost,
            0
        );
        assert_eq!(
            charge(&prices(), None, 5_000, &facts(503, &empty, false, 0)).cost,
            0
        );
        assert_eq!(
            charge(&prices(), None, 5_000, &facts(200, &empty, true, 4000)).cost,
            0
        );
    }

    #[test]
    fn a_response_cut_short_is_never_free() {
        let empty = ScanResult::default();
        let model = Some("mistral-small-latest");
        // Nothing streamed yet: the reservation is charged, and never less than 1 nano-USD.
        let c = charge(&prices(), model, 0, &facts(200, &empty, false, 0));
        assert!(c.estimated && c.cost >= 1);
        let c = charge(&prices(), model, 70_000, &facts(200, &empty, false, 0));
        assert_eq!(c.cost, 70_000);
        // Many bytes streamed: bytes / 4 as completion tokens, if that is more.
        let c = charge(&prices(), model, 10, &facts(200, &empty, false, 400_000));
        assert_eq!(c.completion_tokens, 100_000);
        assert_eq!(c.cost, 100_000 * 600);
    }

    #[test]
    fn unknown_models_follow_the_configured_rule() {
        let deny = Prices::new(PriceTable::builtin(), UnknownModel::Deny);
        assert_eq!(deny.price_for(Some("no-such-model")), None);
        assert!(deny.price_for(Some("mistral-small-latest")).is_some());
        let max = prices();
        assert_eq!(
            max.price_for(Some("no-such-model")),
            Some(PriceTable::builtin().max_price())
        );
        let fixed = ModelPrice {
            input_nano_per_mtok: 1,
            output_nano_per_mtok: 2,
        };
        let own = Prices::new(PriceTable::builtin(), UnknownModel::Price(fixed));
        assert_eq!(own.price_for(None), Some(fixed));
    }

    #[test]
    fn the_reservation_covers_the_worst_case() {
        let price = prices().price_for(Some("mistral-small-latest")).unwrap();
        let reserved = reservation(price, 1_000, Some(2_000), 4_096);
        let worst = Usage {
            prompt_tokens: 1_000,
            completion_tokens: 2_000,
            cached_prompt_tokens: 0,
            priority: true,
        };
        assert!(reserved >= pricing::cost(price, &worst));
        assert_eq!(
            reservation(price, 10, None, 4_096),
            reservation(price, 10, Some(4_096), 1)
        );
    }
}
