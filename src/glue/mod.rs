//! The only code that talks to Envoy. It gathers request facts, calls the pure core, and applies
//! the verdict; it holds no policy logic. Host calls go through `host`, which turns every host
//! error into a value (the SDK's trait helpers unwrap, and a panic in the VM is an outage).

mod fleet;
mod host;
mod host_store;
mod http;
mod root;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(proxy_wasm::types::LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn proxy_wasm::traits::RootContext> {
        Box::new(root::ShieldRoot::default())
    });
}}
