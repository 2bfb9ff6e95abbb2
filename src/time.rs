//! TEMPORARY placeholder until the calendar module lands.
pub fn parse_rfc3339(_s: &str) -> Result<i64, String> {
    Err("timestamps not supported yet".into())
}
