//! The per-token access rules, compiled once per configuration and evaluated per request.
//! Pure: the glue passes in what Envoy resolved (client address, geoip header, request body).
//! The order they run in lives in `access.rs`.

pub mod country;
pub mod model_pattern;
pub mod rate_window;
pub mod request_body;
pub mod source_ip;
