//! Teams: a set of rules and limits shared by every token that names the team.
//!
//! A team is compiled into a record of the same shape as a token's (`TokenPolicy`, with no
//! secret that could ever verify) under its *subject id* `team.<id>`. Token ids cannot contain a
//! dot, so the two never collide, and everything keyed by a token id works for a team unchanged:
//! its shared-data record and generations, its counters (budget window, reservations, rate
//! windows, alerts), and in fleet mode its leases, flushed spend and per-minute counts in etcd.

use std::collections::HashMap;

use crate::config::raw::RawTeam;
use crate::config::token_rules::compile_rules;
use crate::config::ConfigError;
use crate::policy::TokenPolicy;
use crate::token;

pub const SUBJECT_PREFIX: &str = "team.";
pub const MAX_DESCRIPTION_LEN: usize = 256;

/// The ledger and record key of team `id`.
pub fn subject_id(team: &str) -> String {
    format!("{SUBJECT_PREFIX}{team}")
}

/// The team id of a subject id, when it is a team's.
pub fn team_of_subject(subject: &str) -> Option<&str> {
    subject.strip_prefix(SUBJECT_PREFIX)
}

/// Team ids follow the token id rules (they appear in stats names, etcd keys and logs).
pub fn validate_id(id: &str) -> Result<(), String> {
    token::validate_id(id).map_err(|m| m.replace("token id", "team id"))
}

/// Compiles one team; `path` names it in errors (`teams[2]`, or its etcd key).
pub fn compile_team(raw: &RawTeam, path: &str) -> Result<TokenPolicy, ConfigError> {
    validate_id(&raw.id).map_err(|m| ConfigError::at(format!("{path}.id"), m))?;
    if raw
        .description
        .as_ref()
        .is_some_and(|d| d.len() > MAX_DESCRIPTION_LEN)
    {
        return Err(ConfigError::at(
            format!("{path}.description"),
            format!("at most {MAX_DESCRIPTION_LEN} bytes"),
        ));
    }
    Ok(TokenPolicy {
        id: subject_id(&raw.id),
        // No HMAC output is all zeros in practice, and `authenticate` never looks a subject id
        // up (a presented id cannot contain a dot): a team record cannot authenticate.
        digest: [0; crate::token_digest::DIGEST_LEN],
        upstream_key: 0,
        owner: String::new(),
        revoked: false,
        not_before: None,
        expires_at: None,
        team: None,
        rules: compile_rules(&raw.rules(), path)?,
    })
}

/// Compiles every team of a policy, refusing duplicates: subject id → index.
pub fn compile_teams(
    teams: &[RawTeam],
) -> Result<(Vec<TokenPolicy>, HashMap<String, usize>), ConfigError> {
    let mut compiled = Vec::with_capacity(teams.len());
    let mut index = HashMap::with_capacity(teams.len());
    for (i, raw) in teams.iter().enumerate() {
        let path = format!("teams[{i}]");
        let team = compile_team(raw, &path)?;
        if let Some(first) = index.insert(raw.id.clone(), i) {
            return Err(ConfigError::at(
                format!("{path}.id"),
                format!("duplicate team id '{}' (first at teams[{first}])", raw.id),
            ));
        }
        compiled.push(team);
    }
    Ok((compiled, index))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subject_ids_cannot_be_token_ids() {
        let subject = subject_id("eng");
        assert_eq!(subject, "team.eng");
        assert!(token::validate_id(&subject).is_err());
        assert_eq!(team_of_subject(&subject), Some("eng"));
        assert_eq!(team_of_subject("alice"), None);
    }

    #[test]
    fn a_team_compiles_to_a_record_with_its_rules() {
        let raw: RawTeam = serde_json::from_str(
            r#"{"id":"eng","description":"Engineering","budget":{"limit_usd":"5","window":"daily"},"enforce":false}"#,
        )
        .unwrap();
        let team = compile_team(&raw, "teams[0]").unwrap();
        assert_eq!(team.id, "team.eng");
        assert!(team.rules.limits.budget.is_some());
        assert!(team.rules.dry_run);
        let bad = RawTeam {
            id: "Eng!".into(),
            ..RawTeam::default()
        };
        let err = compile_team(&bad, "teams[1]").unwrap_err().to_string();
        assert!(
            err.contains("teams[1].id") && err.contains("team id"),
            "{err}"
        );
        let dup = compile_teams(&[raw.clone(), raw]).unwrap_err().to_string();
        assert!(dup.contains("duplicate team id 'eng'"), "{dup}");
    }
}
