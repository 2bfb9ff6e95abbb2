//! The two levels a request is judged and charged at: its token, and the token's team (when it
//! has one). Each level has its own rules, its own counters (keyed by the token id or the team's
//! subject id) and its own enforcement switch; a request must pass both.
//!
//! Budgets are reserved level by level, token first: each reservation is one atomic update of
//! that level's counters (`spent + reserved + amount <= limit`), and a refusal at the team gives
//! the token's reservation back before the request is answered. Neither level can be overshot by
//! concurrent requests; the price of not locking both together is that a request refused by its
//! team briefly held part of its token's budget (a concurrent request of the same token may be
//! refused in that window: the safe direction). See `tests.rs` for the property test.

use std::rc::Rc;

use super::metrics::TokenMetrics;
use crate::access::Judge;
use crate::denial::Denial;
use crate::ledger::{Admission, Limits};
use crate::money::NanoUsd;
use crate::policy::TokenPolicy;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Token,
    Team,
}

impl Level {
    pub const BOTH: [Level; 2] = [Level::Token, Level::Team];

    pub fn next(self) -> Option<Level> {
        match self {
            Level::Token => Some(Level::Team),
            Level::Team => None,
        }
    }
}

/// A token or team record, with its stats.
#[derive(Clone)]
pub struct Subject {
    pub record: Rc<TokenPolicy>,
    pub metrics: Rc<TokenMetrics>,
}

impl Subject {
    pub fn id(&self) -> &str {
        &self.record.id
    }

    pub fn limits(&self) -> &Limits {
        &self.record.rules.limits
    }
}

/// What each level's counters granted a request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Admissions {
    pub token: Option<Admission>,
    pub team: Option<Admission>,
}

impl Admissions {
    pub fn get(&self, level: Level) -> Option<Admission> {
        match level {
            Level::Token => self.token,
            Level::Team => self.team,
        }
    }

    pub fn slot(&mut self, level: Level) -> &mut Option<Admission> {
        match level {
            Level::Token => &mut self.token,
            Level::Team => &mut self.team,
        }
    }

    pub fn reserved(&self, level: Level) -> NanoUsd {
        self.get(level).map_or(0, |a| a.reserved)
    }
}

/// The worst case each level reserves (a level without a budget reserves nothing).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reservations {
    pub token: NanoUsd,
    pub team: NanoUsd,
}

impl Reservations {
    pub fn get(&self, level: Level) -> NanoUsd {
        match level {
            Level::Token => self.token,
            Level::Team => self.team,
        }
    }
}

/// A judge for `level`'s rules: dry run when the level or the whole policy says so.
pub fn judge<'a>(
    level: Level,
    subject: &Subject,
    policy_dry_run: bool,
    would_deny: &'a mut Vec<Denial>,
) -> Judge<'a> {
    Judge::new(
        level == Level::Team,
        policy_dry_run || subject.record.rules.dry_run,
        would_deny,
    )
}
