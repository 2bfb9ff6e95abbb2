//! The console's connection loop, in place of `axum::serve`, for the limits a service reachable
//! by anyone on its port needs: a client must send its request headers within
//! `HEADER_READ_TIMEOUT` (hyper's timeout, which needs a timer `axum::serve` does not give it),
//! at most `MAX_CONNECTIONS` are served at once (more are closed at once), a connection lives at
//! most `CONNECTION_LIFETIME` (an idle keep-alive connection cannot hold its slot for ever;
//! browsers reconnect), and a failed accept (out of file descriptors) waits a moment instead of
//! spinning.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// How long a client may take to send its request headers.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once: an operator's browser opens a handful.
pub const MAX_CONNECTIONS: usize = 64;
/// The longest a connection is served, well over the longest action (a publish waits for
/// Envoy's verdict).
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(300);

/// Serves `router` on `listener` until the process ends.
pub async fn serve(listener: TcpListener, router: Router) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Over the limit: closed at once (dropped), never queued.
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        // The handlers read the client's address as `axum::serve` would give it.
        let service = TowerToHyperService::new(
            router
                .clone()
                .layer(axum::Extension(ConnectInfo::<SocketAddr>(peer))),
        );
        tokio::spawn(async move {
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT);
            let connection = http.serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_LIFETIME, connection).await;
            drop(slot);
        });
    }
}
