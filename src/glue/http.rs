//! One HTTP stream: authenticate, swap the key, or refuse with one local reply.

use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;

use super::host;
use super::host_store::HostStore;
use super::root::Active;
use crate::authenticate::{authenticate, Credentials};
use crate::denial::Denial;

pub struct ShieldHttp {
    active: Option<Rc<Active>>,
}

impl ShieldHttp {
    pub fn new(active: Option<Rc<Active>>) -> Self {
        ShieldHttp { active }
    }

    fn deny(&self, denial: &Denial) -> Action {
        if let Some(active) = &self.active {
            active.metrics.denied(denial);
        }
        host::set_filter_state("shieldkey_decision", denial.code().as_bytes());
        let extra = denial.headers();
        let mut headers: Vec<(&str, &str)> = vec![("content-type", "application/json")];
        headers.extend(extra.iter().map(|(k, v)| (*k, v.as_str())));
        host::send_local_reply(denial.status(), &headers, &denial.body());
        Action::Pause
    }
}

impl Context for ShieldHttp {}

impl HttpContext for ShieldHttp {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let Some(active) = self.active.clone() else {
            // No valid configuration: Envoy would not have started, but never forward anyway.
            return self.deny(&Denial::PolicyUnavailable);
        };
        let Some(now_ms) = host::now_unix_ms() else {
            return self.deny(&Denial::PolicyUnavailable);
        };
        let authorization = host::request_header("authorization");
        let x_api_key = host::request_header("x-api-key");
        let credentials = Credentials {
            authorization: authorization.as_deref(),
            x_api_key: x_api_key.as_deref(),
        };
        let token = match authenticate(
            &HostStore,
            &active.policy.fingerprint,
            &active.verifier,
            &credentials,
            now_ms.div_euclid(1000),
        ) {
            Ok(token) => token,
            Err(denial) => return self.deny(&denial),
        };
        host::set_filter_state("shieldkey_token_id", token.id.as_bytes());

        let Some(upstream_authorization) = active.policy.authorization_for(token.upstream_key)
        else {
            return self.deny(&Denial::KeyUnavailable);
        };
        let swapped = host::remove_request_header("x-api-key")
            && host::set_request_header("authorization", upstream_authorization.expose());
        if !swapped {
            // Never forward a request whose credentials could not be replaced.
            return self.deny(&Denial::KeyUnavailable);
        }
        host::set_filter_state("shieldkey_decision", b"allowed");
        active.metrics.allowed();
        Action::Continue
    }
}
