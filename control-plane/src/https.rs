//! The HTTP API over TLS: its certificate (issued by the fleet CA at every start, or the
//! operator's pair) and a listener that hands axum connections whose handshake is done.
//!
//! Handshakes run in a task each, never in the accept loop, so a client that connects and
//! stays silent delays no one (the same reason the broker has its own TLS front); one that
//! has not finished within [`HANDSHAKE_TIMEOUT`] is dropped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;

use crate::pki::FleetCa;

/// The API's certificate and key when issued by the fleet CA, in `<data>/keys/`.
pub const API_CERT_FILE: &str = "api.pem";
pub const API_KEY_FILE: &str = "api.key";
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the API's certificate comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApiTls {
    /// Issued by the fleet CA for `localhost`, `127.0.0.1`, the listen address when it is
    /// a specific one, and these names and addresses (`api_hosts`).
    FleetCa { hosts: Vec<String> },
    /// The operator's certificate chain and key (PEM).
    Files { cert: PathBuf, key: PathBuf },
}

#[derive(Debug, thiserror::Error)]
pub enum HttpsError {
    #[error("API TLS file {path}: {detail}")]
    File { path: PathBuf, detail: String },
    #[error("API TLS: {0}")]
    Tls(String),
    #[error(transparent)]
    Pki(#[from] crate::pki::PkiError),
    #[error(transparent)]
    Key(#[from] crate::keys::KeyError),
}

/// The names the fleet CA's API certificate covers.
pub fn cert_hosts(listen: SocketAddr, extra: &[String]) -> Vec<String> {
    let mut hosts = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
    if !listen.ip().is_unspecified() {
        hosts.push(listen.ip().to_string());
    }
    for h in extra {
        if !hosts.contains(h) {
            hosts.push(h.clone());
        }
    }
    hosts
}

/// The certificate and key files the API serves with: the operator's, or a new pair from
/// the fleet CA written to `<keys_dir>/api.{pem,key}` (clients trust the CA, not the
/// certificate, so a new one at every start costs them nothing).
pub fn identity(
    tls: &ApiTls,
    ca: &FleetCa,
    keys_dir: &Path,
    listen: SocketAddr,
    now_ms: u64,
) -> Result<(PathBuf, PathBuf), HttpsError> {
    match tls {
        ApiTls::Files { cert, key } => Ok((cert.clone(), key.clone())),
        ApiTls::FleetCa { hosts } => {
            let issued = ca.issue_server(&cert_hosts(listen, hosts), now_ms)?;
            let (cert, key) = (keys_dir.join(API_CERT_FILE), keys_dir.join(API_KEY_FILE));
            crate::keys::write_private(&cert, issued.cert_pem.as_bytes())?;
            crate::keys::write_private(&key, issued.key_pem.as_bytes())?;
            Ok((cert, key))
        }
    }
}

/// A rustls server config for the API (no client certificates: callers hold tokens).
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, HttpsError> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let read = |path: &Path| {
        std::fs::read(path).map_err(|e| HttpsError::File {
            path: path.to_owned(),
            detail: e.to_string(),
        })
    };
    let bad = |path: &Path, e: &dyn std::fmt::Display| HttpsError::File {
        path: path.to_owned(),
        detail: e.to_string(),
    };
    let certs = CertificateDer::pem_slice_iter(&read(cert)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(cert, &e))?;
    if certs.is_empty() {
        return Err(bad(cert, &"no PEM certificate in it"));
    }
    // The key must be private, as every key file the server reads.
    let key_pem = crate::keys::read_private(key)?;
    let key_der = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| bad(key, &e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| HttpsError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .map_err(|e| HttpsError::Tls(e.to_string()))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Connections whose TLS handshake is done, for `axum::serve`.
pub struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    addr: SocketAddr,
}

/// Accepts on `tcp`, handshakes each connection in a task of its own, and hands the
/// finished ones over. The accept loop ends when the returned listener is dropped.
pub fn listen(tcp: TcpListener, config: Arc<rustls::ServerConfig>) -> std::io::Result<TlsListener> {
    let addr = tcp.local_addr()?;
    let (tx, ready) = mpsc::channel(64);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let (stream, peer) = tokio::select! {
                _ = tx.closed() => return,
                r = tcp.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of file descriptors, say: wait a moment, as axum does.
                        tracing::warn!(error = %e, "API accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send((tls, peer)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "API TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "API TLS handshake timed out"),
                }
            });
        }
    });
    Ok(TlsListener { ready, addr })
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(c) => c,
            // The accept loop only ends once this listener is dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.addr)
    }
}
