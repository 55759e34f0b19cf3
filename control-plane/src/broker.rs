//! The embedded MQTT broker (rumqttd), with per-device authentication from the store.
//!
//! rumqttd runs on its own threads and cannot be stopped; it lives until the process
//! exits. A restarted in-process server therefore starts a second broker on a new port.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};

use crate::serve::Shared;

/// Largest MQTT payload the broker accepts: a full chunk or command frame fits, and an
/// oversized uplink still reaches ingest, which counts it (`too_large`) and drops it.
pub const MAX_PAYLOAD: usize = drover_protocol::envelope::MAX_DOWNLINK_LEN + 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot find a free port on {addr}: {source}")]
    Port {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start the broker thread: {0}")]
    Thread(std::io::Error),
    #[error("embedded broker did not start listening on {0}")]
    NotListening(SocketAddr),
}

/// Port 0 means "pick one": bind it to learn a free port, release it, give it to rumqttd
/// (which cannot report the port it bound).
fn concrete(addr: SocketAddr) -> Result<SocketAddr, BrokerError> {
    if addr.port() != 0 {
        return Ok(addr);
    }
    let l = TcpListener::bind(addr).map_err(|source| BrokerError::Port { addr, source })?;
    l.local_addr()
        .map_err(|source| BrokerError::Port { addr, source })
}

/// Starts the broker; returns the address it listens on once it accepts connections.
pub fn start(listen: SocketAddr, shared: Arc<Shared>) -> Result<SocketAddr, BrokerError> {
    let addr = concrete(listen)?;
    let mut connections = ConnectionSettings {
        connection_timeout_ms: 60_000,
        max_payload_size: MAX_PAYLOAD,
        max_inflight_count: 1024,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    connections.set_auth_handler(move |_client_id, user: String, pass: String| {
        let ok = shared.broker_login_ok(&user, &pass);
        async move { ok }
    });
    let server = ServerSettings {
        name: "drover-v4".into(),
        listen: addr,
        tls: None,
        next_connection_delay_ms: 0,
        connections,
    };
    let config = Config {
        id: 0,
        router: RouterConfig {
            max_connections: 50_010,
            max_outgoing_packet_count: 1024,
            max_segment_size: 64 * 1024 * 1024,
            max_segment_count: 4,
            ..Default::default()
        },
        v4: Some(HashMap::from([("1".to_string(), server)])),
        ..Default::default()
    };
    let mut broker = Broker::new(config);
    std::thread::Builder::new()
        .name("drover-broker".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded broker stopped");
            }
        })
        .map_err(BrokerError::Thread)?;
    // Readiness: the broker binds on its own thread; wait until it accepts.
    for _ in 0..500 {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
            tracing::info!(%addr, "embedded MQTT broker listening");
            return Ok(addr);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Err(BrokerError::NotListening(addr))
}
