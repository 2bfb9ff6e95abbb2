//! A minimal header-swap proxy-wasm filter: the floor any proxy-wasm filter pays in Envoy (a VM
//! call per callback, one header read, one header write). The plugin configuration is the
//! upstream `authorization` value to set, e.g. `Bearer <real key>`.

use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(Root { authorization: Rc::new(Vec::new()) })
    });
}}

struct Root {
    authorization: Rc<Vec<u8>>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        match self.get_plugin_configuration() {
            Some(value) if !value.is_empty() => {
                self.authorization = Rc::new(value);
                true
            }
            _ => false,
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Swap {
            authorization: self.authorization.clone(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Swap {
    authorization: Rc<Vec<u8>>,
}

impl Context for Swap {}

impl HttpContext for Swap {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        // Read the client's credential (a real filter would check it), then swap in the key.
        if self
            .get_http_request_header_bytes("authorization")
            .is_some()
        {
            self.set_http_request_header_bytes("authorization", Some(&self.authorization));
        }
        Action::Continue
    }
}
