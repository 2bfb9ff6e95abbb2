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
//! - a complete response without usage (e.g. `/v1/models`) → 0, unless it carried generated
//!   text (then estimated);
//! - a response cut short (client abort, upstream reset, truncated body), or in an encoding the
//!   filter cannot read → an estimate that is never 0 and never more than the reservation
//!   (see `estimate`);
//! - routes the table marks free or unmetered → 0.

use crate::money::NanoUsd;
use crate::pricing::{self, ModelPrice, PriceTable};
use crate::routes::RouteKind;
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

    /// The most any model can be charged: the table's highest input and output prices, or
    /// the unknown-model price where that is higher.
    pub fn highest(&self) -> ModelPrice {
        match &self.unknown {
            UnknownModel::Price(p) => ModelPrice {
                input_nano_per_mtok: p
                    .input_nano_per_mtok
                    .max(self.max_price.input_nano_per_mtok),
                output_nano_per_mtok: p
                    .output_nano_per_mtok
                    .max(self.max_price.output_nano_per_mtok),
            },
            _ => self.max_price,
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
    /// The response came with a content encoding the scanner cannot read (it asked for
    /// `identity`, so the upstream ignored that).
    pub unreadable: bool,
    pub bytes_seen: u64,
    /// Length of the request body, when it was read: bounds the prompt of an estimate.
    pub request_bytes: u64,
}

/// What a finished request is charged. `reserved` is the request's worst case when it had a
/// budget (0 otherwise).
pub fn charge(
    prices: &Prices,
    kind: RouteKind,
    request_model: Option<&str>,
    reserved: NanoUsd,
    facts: &ResponseFacts<'_>,
) -> Charge {
    if !kind.is_metered() || kind == RouteKind::Free {
        return Charge::default();
    }
    let model = facts
        .scan
        .model
        .as_deref()
        .filter(|m| prices.table.lookup(m).is_some())
        .or(request_model);
    // A model the policy denies pricing for cannot have been admitted with a budget; if it
    // still reports usage (no budget on the token), charge the most expensive price.
    let price = prices.price_for(model).unwrap_or(prices.max_price);
    if let (Some(usage), false) = (&facts.scan.usage, facts.unreadable) {
        let cost = match kind {
            RouteKind::Ocr => pricing::unit_cost(usage.pages, pricing::OCR_NANO_PER_PAGE),
            RouteKind::Audio => {
                pricing::unit_cost(usage.audio_seconds, pricing::AUDIO_NANO_PER_SECOND)
            }
            _ => pricing::cost(price, usage),
        };
        return Charge {
            cost,
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            estimated: false,
        };
    }
    // A complete response without usage costs nothing (`/v1/models`), unless it carried
    // generated text: then it was work, and it is estimated like a response cut short.
    let generated_text = kind.generates() && facts.scan.generated_bytes > 0;
    if facts.status >= 400 || (facts.complete && !facts.unreadable && !generated_text) {
        return Charge::default();
    }
    estimate(price, kind, reserved, facts)
}

/// A response that ended without readable usage: cut short (client gone, upstream reset,
/// truncated body) or in an encoding the filter cannot read. Never 0, never more than the
/// request's worst case. Text: one token per byte of the request body (prompt) and of the
/// generated text (completion; JSON and SSE framing, padding and ids not counted). A text token
/// is at least one byte, so this never charges less than Mistral bills for what passed: a
/// client that stops a stream just before its usage (or asks for text that tokenizes densely,
/// such as digits) cannot make its spend look smaller than it is. English text is about 4
/// bytes per token, so a typical stopped stream is charged more than Mistral bills, at most its
/// reservation.
/// An unreadable body is charged the reservation (without a budget: all its bytes counted as
/// generated text). Pages and audio seconds cannot be
/// counted from a partial response: the worst case is charged.
fn estimate(
    price: ModelPrice,
    kind: RouteKind,
    reserved: NanoUsd,
    facts: &ResponseFacts,
) -> Charge {
    let generated = if facts.unreadable {
        facts.bytes_seen
    } else {
        facts.scan.generated_bytes
    };
    let (prompt_tokens, completion_tokens) = match kind {
        RouteKind::Generation { .. } => (facts.request_bytes, generated),
        RouteKind::PromptOnly => (facts.request_bytes, 0),
        _ => (0, 0),
    };
    let by_content = pricing::cost(
        price,
        &Usage {
            prompt_tokens,
            completion_tokens,
            ..Usage::default()
        },
    );
    let cost = match kind {
        RouteKind::Ocr | RouteKind::Audio => reserved,
        // What an unreadable body held cannot be known: its worst case.
        _ if facts.unreadable && reserved > 0 => reserved,
        _ if reserved > 0 => by_content.min(reserved),
        _ => by_content,
    };
    Charge {
        cost: cost.max(1),
        prompt_tokens,
        completion_tokens,
        estimated: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes;

    fn prices() -> Prices {
        Prices::new(PriceTable::builtin(), UnknownModel::MaxPrice)
    }

    fn chat() -> RouteKind {
        routes::lookup(b"POST", "/v1/chat/completions")
            .unwrap()
            .kind
    }

    fn usage(prompt: u64, completion: u64) -> Usage {
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            ..Usage::default()
        }
    }

    fn facts(status: u32, scan: &ScanResult, complete: bool, bytes: u64) -> ResponseFacts<'_> {
        ResponseFacts {
            status,
            scan,
            complete,
            unreadable: false,
            bytes_seen: bytes,
            request_bytes: 0,
        }
    }

    #[test]
    fn usage_is_billed_exactly_by_the_response_model() {
        let scan = ScanResult {
            usage: Some(usage(1000, 500)),
            model: Some("mistral-small-latest".into()),
            generated_bytes: 10,
        };
        let c = charge(
            &prices(),
            chat(),
            None,
            9_999,
            &facts(200, &scan, true, 800),
        );
        // 1000 × 0.15 + 500 × 0.60 USD per million tokens.
        assert_eq!(c.cost, 450_000);
        assert!(!c.estimated);
        assert_eq!((c.prompt_tokens, c.completion_tokens), (1000, 500));
    }

    #[test]
    fn pages_and_audio_seconds_are_billed_by_the_unit() {
        let ocr = routes::lookup(b"POST", "/v1/ocr").unwrap().kind;
        let scan = ScanResult {
            usage: Some(Usage {
                pages: 3,
                ..Usage::default()
            }),
            ..ScanResult::default()
        };
        let c = charge(&prices(), ocr, None, 0, &facts(200, &scan, true, 10));
        assert_eq!(c.cost, 3 * pricing::OCR_NANO_PER_PAGE);
        let audio = routes::lookup(b"POST", "/v1/audio/transcriptions")
            .unwrap()
            .kind;
        let scan = ScanResult {
            usage: Some(Usage {
                audio_seconds: 60,
                prompt_tokens: 9,
                ..Usage::default()
            }),
            ..ScanResult::default()
        };
        // $0.003 per minute.
        assert_eq!(
            charge(&prices(), audio, None, 0, &facts(200, &scan, true, 10)).cost,
            3_000_000
        );
    }

    #[test]
    fn errors_free_routes_and_usage_free_responses_cost_nothing() {
        let empty = ScanResult::default();
        for (status, complete) in [(429, true), (503, false), (200, true)] {
            let c = charge(
                &prices(),
                chat(),
                None,
                5_000,
                &facts(status, &empty, complete, 90),
            );
            assert_eq!(c.cost, 0, "{status}");
        }
        let models = routes::lookup(b"GET", "/v1/models").unwrap().kind;
        assert_eq!(
            charge(&prices(), models, None, 0, &facts(200, &empty, false, 90)).cost,
            0
        );
    }

    #[test]
    fn a_response_cut_short_is_estimated_from_generated_text_within_the_reservation() {
        let model = Some("mistral-small-latest");
        let empty = ScanResult::default();
        // Nothing generated yet: never 0.
        let c = charge(&prices(), chat(), model, 0, &facts(200, &empty, false, 0));
        assert!(c.estimated && c.cost >= 1);
        // The prompt (request bytes) and the generated text (its bytes) are counted, a token
        // per byte (never less than billed), not the bytes on the wire.
        let scan = ScanResult {
            generated_bytes: 400,
            ..ScanResult::default()
        };
        let mut f = facts(200, &scan, false, 40_000);
        f.request_bytes = 4_000;
        let c = charge(&prices(), chat(), model, 0, &f);
        assert_eq!((c.prompt_tokens, c.completion_tokens), (4_000, 400));
        assert_eq!(c.cost, 4_000 * 150 + 400 * 600);
        // Never more than the worst case reserved for it.
        let c = charge(&prices(), chat(), model, 70_000, &f);
        assert_eq!(c.cost, 70_000);
        // A stream that reached its end without usage but with generated text: estimated too.
        f.complete = true;
        let c = charge(&prices(), chat(), model, 0, &f);
        assert!(c.estimated && c.cost == 4_000 * 150 + 400 * 600);
    }

    #[test]
    fn an_unreadable_response_is_charged_its_reservation() {
        let empty = ScanResult::default();
        let mut f = facts(200, &empty, true, 500);
        f.unreadable = true;
        let c = charge(&prices(), chat(), Some("mistral-small-latest"), 9_000, &f);
        assert_eq!(c.cost, 9_000);
        assert!(c.estimated);
        // Usage in a body the scanner could not read is no usage: a gzip body can contain
        // anything once decoded.
        let c = charge(&prices(), chat(), Some("mistral-small-latest"), 0, &f);
        assert!(c.cost >= 1);
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
        // The most any model can cost: the table's highest, or a higher unknown-model price.
        assert_eq!(own.highest(), PriceTable::builtin().max_price());
        let dear = ModelPrice {
            input_nano_per_mtok: 1,
            output_nano_per_mtok: u64::MAX / 4,
        };
        let dear = Prices::new(PriceTable::builtin(), UnknownModel::Price(dear)).highest();
        assert_eq!(dear.output_nano_per_mtok, u64::MAX / 4);
        assert_eq!(
            dear.input_nano_per_mtok,
            PriceTable::builtin().max_price().input_nano_per_mtok
        );
    }
}
