//! A minimal header-swap proxy-wasm filter: the floor any proxy-wasm filter pays in Envoy (a VM
//! call per callback, one header read, one header write). The plugin configuration is the
//! upstream `authorization` value to set, e.g. `Bearer <real key>`.
//!
//! For `tests/bench/host_costs.py` only, a second line of the configuration names one kind of
//! extra work to do per request (`Extra`), so what each kind of host operation costs Envoy can be
//! measured against this floor. Without it, the filter is exactly the floor.

use std::rc::Rc;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MetricType};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(Root { authorization: Rc::new(Vec::new()), extra: Extra::None, gauge: 0 })
    });
}}

/// Extra work per request, as ShieldKey does it (the counts are ShieldKey's per request, or a
/// round number where only the cost of one matters).
#[derive(Clone, Copy, PartialEq)]
enum Extra {
    None,
    /// 10 host calls that only return a number (`get_current_time`): the VM boundary itself.
    HostCalls,
    /// 10 filter-state writes (`set_property("wasm.bench_<n>")`), as the audit record once was.
    FilterState,
    /// Every request header, the request body, every response header and the response body,
    /// each read into the VM in one call.
    Reads,
    /// 3 shared-data reads, each followed by a compare-and-swap write of a 120-byte value: a
    /// budget and rate counter reservation and settlement.
    SharedData,
    /// 2 gauge updates (the budget's remaining and spent amounts).
    Gauges,
    /// The client's address (`source.address`), for network rules.
    Property,
}

impl Extra {
    fn parse(name: &str) -> Option<Extra> {
        Some(match name {
            "" => Extra::None,
            "host-calls" => Extra::HostCalls,
            "filter-state" => Extra::FilterState,
            "reads" => Extra::Reads,
            "shared-data" => Extra::SharedData,
            "gauges" => Extra::Gauges,
            "property" => Extra::Property,
            _ => return None,
        })
    }
}

struct Root {
    authorization: Rc<Vec<u8>>,
    extra: Extra,
    gauge: u32,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let Some(value) = self.get_plugin_configuration().filter(|v| !v.is_empty()) else {
            return false;
        };
        let mut lines = value.splitn(2, |b| *b == b'\n');
        let authorization = lines.next().unwrap_or_default().to_vec();
        let extra = std::str::from_utf8(lines.next().unwrap_or_default())
            .ok()
            .and_then(|name| Extra::parse(name.trim()));
        let Some(extra) = extra else {
            return false;
        };
        if extra == Extra::Gauges {
            match hostcalls::define_metric(MetricType::Gauge, "bench_minimal_gauge") {
                Ok(id) => self.gauge = id,
                Err(_) => return false,
            }
        }
        self.authorization = Rc::new(authorization);
        self.extra = extra;
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Swap {
            authorization: self.authorization.clone(),
            extra: self.extra,
            gauge: self.gauge,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Swap {
    authorization: Rc<Vec<u8>>,
    extra: Extra,
    gauge: u32,
}

impl Context for Swap {}

impl Swap {
    fn request_extra(&self) {
        match self.extra {
            Extra::HostCalls => {
                for _ in 0..10 {
                    let _ = hostcalls::get_current_time();
                }
            }
            Extra::FilterState => {
                for n in 0..10 {
                    let name = format!("bench_{n}");
                    let _ = hostcalls::set_property(vec![name.as_str()], Some(b"value-of-16-byte"));
                }
            }
            Extra::Reads => {
                let _ = hostcalls::get_map_bytes(proxy_wasm::types::MapType::HttpRequestHeaders);
            }
            Extra::SharedData => {
                for key in ["bench/ledger/a", "bench/ledger/b", "bench/ledger/c"] {
                    let (value, cas) = hostcalls::get_shared_data(key).unwrap_or((None, None));
                    let mut value = value.unwrap_or_else(|| vec![7; 120]);
                    if let Some(first) = value.first_mut() {
                        *first = first.wrapping_add(1);
                    }
                    let _ = hostcalls::set_shared_data(key, Some(&value), cas);
                }
            }
            Extra::Gauges => {
                for value in [1, 2] {
                    let _ = hostcalls::record_metric(self.gauge, value);
                }
            }
            Extra::Property => {
                let _ = hostcalls::get_property(vec!["source", "address"]);
            }
            Extra::None => {}
        }
    }
}

impl HttpContext for Swap {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        // Read the client's credential (a real filter would check it), then swap in the key.
        if self
            .get_http_request_header_bytes("authorization")
            .is_some()
        {
            self.set_http_request_header_bytes("authorization", Some(&self.authorization));
        }
        self.request_extra();
        Action::Continue
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if self.extra == Extra::Reads && end_of_stream {
            let _ = self.get_http_request_body(0, body_size);
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if self.extra == Extra::Reads {
            let _ = hostcalls::get_map_bytes(proxy_wasm::types::MapType::HttpResponseHeaders);
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, _end_of_stream: bool) -> Action {
        if self.extra == Extra::Reads {
            let _ = self.get_http_response_body(0, body_size);
        }
        Action::Continue
    }
}
