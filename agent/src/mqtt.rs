//! The MQTT session: the only module that touches rumqttc.
//!
//! The event loop runs alone in its task and never blocks: incoming publishes and
//! connection events go to the core over an unbounded channel; publishes and subscriptions
//! come from the core over another and are issued by a separate task, so a full rumqttc
//! request queue can never stall polling. Reconnects use jittered exponential backoff.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{
    AsyncClient, Event, EventLoop, LastWill, MqttOptions, Packet, QoS, TlsConfiguration, Transport,
};
use thiserror::Error;
use tokio::sync::{mpsc, watch};

use crate::config::ValidConfig;

/// The largest MQTT packet the session reads (`envelope::MAX_MQTT_PACKET`): above what any
/// broker Drover configures delivers (both take `envelope::MAX_BROKER_PAYLOAD`), so an
/// oversized downlink is read, refused by the envelope's own bound (`MAX_DOWNLINK_LEN`),
/// acknowledged and reported. A smaller limit here kills the connection instead, and the
/// broker redelivers the unacknowledged message on every reconnect: the device never gets
/// another command (issues 16 and 24).
const MAX_INCOMING_PACKET: usize = drover_protocol::envelope::MAX_MQTT_PACKET;

#[derive(Debug, Error)]
pub enum MqttError {
    #[error("cannot read {what} {path}: {source}")]
    ReadFile {
        what: &'static str,
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("TLS setup failed: {0}")]
    Tls(String),
    #[error(
        "client key {path} is readable by group or others (mode {mode:o}); run `chmod 600 {path}`"
    )]
    InsecureKey { path: std::path::PathBuf, mode: u32 },
}

/// What the session tells the core.
#[derive(Debug)]
pub enum Inbound {
    Connected,
    Disconnected(String),
    /// A message; the broker redelivers it until the core returns `ack` (after handling
    /// it, e.g. after a command's seq is persisted).
    Message {
        topic: String,
        payload: Vec<u8>,
        ack: AckToken,
    },
}

/// Opaque handle to acknowledge one incoming QoS 1 message (manual acks: rumqttc would
/// otherwise ack before the agent has handled, let alone persisted, anything).
#[derive(Debug)]
pub struct AckToken(rumqttc::Publish);

/// What the core asks the session to do.
#[derive(Debug)]
pub enum Outbound {
    Publish { topic: String, payload: Vec<u8> },
    Subscribe(String),
    Unsubscribe(String),
    Ack(AckToken),
    Disconnect,
}

/// Jittered exponential backoff (pure: the caller supplies the random fraction).
pub fn backoff(attempt: u32, jitter: f64) -> Duration {
    let base_ms = 200u64.saturating_mul(1u64 << attempt.min(8)).min(30_000);
    let j = jitter.clamp(0.0, 1.0);
    Duration::from_millis((base_ms as f64 * (0.5 + 0.5 * j)) as u64)
}

/// The rustls transport for an `mqtts://` broker (`None` for plain `mqtt://`).
pub fn tls_config(cfg: &ValidConfig) -> Result<Option<Transport>, MqttError> {
    if !cfg.broker.tls {
        return Ok(None);
    }
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let Some(tls) = &cfg.raw.tls else {
        return Err(MqttError::Tls("mqtts:// needs a [tls] section".into()));
    };
    let read = |what: &'static str, path: &std::path::Path| {
        std::fs::read(path).map_err(|source| MqttError::ReadFile {
            what,
            path: path.to_owned(),
            source,
        })
    };
    let mut roots = rustls::RootCertStore::empty();
    let ca = read("CA file", &tls.ca_file)?;
    for c in CertificateDer::pem_slice_iter(&ca) {
        let c = c.map_err(|e| MqttError::Tls(format!("CA file: {e}")))?;
        roots
            .add(c)
            .map_err(|e| MqttError::Tls(format!("CA file: {e}")))?;
    }
    if roots.is_empty() {
        return Err(MqttError::Tls(format!(
            "CA file {} holds no PEM certificate",
            tls.ca_file.display()
        )));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| MqttError::Tls(e.to_string()))?
        .with_root_certificates(roots);
    let config = match (&tls.client_cert_file, &tls.client_key_file) {
        (Some(cert), Some(key)) => {
            let cert_pem = read("client certificate", cert)?;
            let certs = CertificateDer::pem_slice_iter(&cert_pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| MqttError::Tls(format!("client certificate: {e}")))?;
            // A private key others can read is refused, never silently used.
            match drover_host::fs::check_private(key) {
                Ok(()) => {}
                Err(drover_host::fs::FsError::InsecurePermissions { path, mode }) => {
                    return Err(MqttError::InsecureKey { path, mode });
                }
                Err(drover_host::fs::FsError::Io { path, source }) => {
                    return Err(MqttError::ReadFile {
                        what: "client key",
                        path,
                        source,
                    });
                }
            }
            let key_pem = read("client key", key)?;
            let key = PrivateKeyDer::from_pem_slice(&key_pem)
                .map_err(|e| MqttError::Tls(format!("client key: {e}")))?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| MqttError::Tls(e.to_string()))?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(Some(Transport::tls_with_config(TlsConfiguration::Rustls(
        Arc::new(config),
    ))))
}

/// The last-will payload, refreshed by the core before each reconnect (it carries a fresh
/// sequence number and MAC).
pub type WillSlot = Arc<Mutex<(String, Vec<u8>)>>;

/// Starts the session tasks. `inbound` receives connection events and messages;
/// `outbound` carries the core's requests.
pub fn start(
    cfg: &ValidConfig,
    will: WillSlot,
    inbound: std::sync::mpsc::Sender<Inbound>,
    mut out_rx: mpsc::UnboundedReceiver<Outbound>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), MqttError> {
    let id = cfg.device_id.as_str().to_owned();
    let mut opts = MqttOptions::new(id.clone(), cfg.broker.host.clone(), cfg.broker.port);
    opts.set_clean_session(false)
        .set_keep_alive(Duration::from_secs(15))
        .set_credentials(id, cfg.device_key.mqtt_password())
        .set_max_packet_size(
            MAX_INCOMING_PACKET,
            drover_protocol::envelope::MAX_UPLINK_LEN + 1024,
        )
        .set_inflight(64)
        .set_manual_acks(true);
    if let Some(t) = tls_config(cfg)? {
        opts.set_transport(t);
    }
    if let Ok(w) = will.lock() {
        opts.set_last_will(LastWill::new(
            w.0.clone(),
            w.1.clone(),
            QoS::AtLeastOnce,
            false,
        ));
    }
    let (client, eventloop) = AsyncClient::new(opts, 256);
    tokio::spawn(poll_loop(eventloop, will, inbound, shutdown.clone()));
    tokio::spawn(async move {
        loop {
            let cmd = tokio::select! {
                c = out_rx.recv() => c,
                _ = shutdown.changed() => None,
            };
            let Some(cmd) = cmd else { break };
            let r = match cmd {
                Outbound::Publish { topic, payload } => {
                    client
                        .publish(topic, QoS::AtLeastOnce, false, payload)
                        .await
                }
                Outbound::Subscribe(t) => client.subscribe(t, QoS::AtLeastOnce).await,
                Outbound::Unsubscribe(t) => client.unsubscribe(t).await,
                Outbound::Ack(AckToken(p)) => client.ack(&p).await,
                Outbound::Disconnect => {
                    let _ = client.disconnect().await;
                    break;
                }
            };
            if let Err(e) = r {
                tracing::warn!(error = %e, "mqtt request failed");
            }
        }
    });
    Ok(())
}

async fn poll_loop(
    mut eventloop: EventLoop,
    will: WillSlot,
    inbound: std::sync::mpsc::Sender<Inbound>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut attempt = 0u32;
    loop {
        let ev = tokio::select! {
            ev = eventloop.poll() => ev,
            _ = shutdown.changed() => return,
        };
        match ev {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                attempt = 0;
                tracing::info!("connected to broker");
                if inbound.send(Inbound::Connected).is_err() {
                    return;
                }
            }
            Ok(Event::Incoming(Packet::Publish(mut p))) => {
                let payload = std::mem::take(&mut p.payload).to_vec();
                let msg = Inbound::Message {
                    topic: std::mem::take(&mut p.topic),
                    payload,
                    ack: AckToken(p),
                };
                if inbound.send(msg).is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(e) => {
                let delay = backoff(attempt, rand::random::<f64>());
                attempt = attempt.saturating_add(1);
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "broker connection lost");
                if inbound.send(Inbound::Disconnected(e.to_string())).is_err() {
                    return;
                }
                if let Ok(w) = will.lock() {
                    eventloop.mqtt_options.set_last_will(LastWill::new(
                        w.0.clone(),
                        w.1.clone(),
                        QoS::AtLeastOnce,
                        false,
                    ));
                }
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.changed() => return,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn openssl(dir: &std::path::Path, args: &[&str]) {
        let st = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(st.success(), "openssl {args:?}");
    }

    fn tls_cfg(dir: &std::path::Path, ca: &str, client: bool) -> ValidConfig {
        let mut c = crate::config::AgentConfig {
            device_id: "gw-01".into(),
            device_key: "11".repeat(32),
            root_public_key: drover_protocol::topics::hex32(
                &drover_protocol::SecretKey::from_seed([7; 32]).public(),
            ),
            broker_url: "mqtts://localhost:8883".into(),
            data_dir: dir.to_owned(),
            tls: Some(crate::config::TlsConfig {
                ca_file: dir.join(ca),
                client_cert_file: client.then(|| dir.join("dev.pem")),
                client_key_file: client.then(|| dir.join("dev.key")),
            }),
            ..Default::default()
        };
        c.api_addr = "127.0.0.1:0".into();
        c.metrics_addr = "127.0.0.1:0".into();
        c.validate().unwrap()
    }

    #[test]
    fn tls_transport_loads_ca_and_client_identity_and_refuses_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let mut args = vec!["req", "-x509"];
        args.extend(ec);
        args.extend([
            "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=ca",
        ]);
        openssl(d, &args);
        let mut args = vec!["req"];
        args.extend(ec);
        args.extend([
            "-keyout",
            "dev.key",
            "-out",
            "dev.csr",
            "-subj",
            "/CN=gw-01",
        ]);
        openssl(d, &args);
        // Extensions make a v3 certificate (webpki refuses v1).
        std::fs::write(d.join("ext.cnf"), "basicConstraints=CA:FALSE\n").unwrap();
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                "dev.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "dev.pem",
                "-days",
                "1",
                "-extfile",
                "ext.cnf",
            ],
        );
        use std::os::unix::fs::PermissionsExt as _;
        let key = d.join("dev.key");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            tls_config(&tls_cfg(d, "ca.pem", true)),
            Err(MqttError::InsecureKey { mode: 0o644, .. })
        ));
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        for client in [false, true] {
            match tls_config(&tls_cfg(d, "ca.pem", client)) {
                Ok(Some(_)) => {}
                Ok(None) => panic!("no TLS transport"),
                Err(e) => panic!("client identity {client}: {e}"),
            }
        }
        assert!(matches!(
            tls_config(&tls_cfg(d, "missing.pem", false)),
            Err(MqttError::ReadFile {
                what: "CA file",
                ..
            })
        ));
        std::fs::write(d.join("junk.pem"), "not a certificate").unwrap();
        let Err(e) = tls_config(&tls_cfg(d, "junk.pem", false)) else {
            panic!("junk CA accepted");
        };
        assert!(e.to_string().contains("holds no PEM certificate"), "{e}");
    }

    #[test]
    fn backoff_grows_caps_and_jitters() {
        assert_eq!(backoff(0, 1.0), Duration::from_millis(200));
        assert_eq!(backoff(0, 0.0), Duration::from_millis(100));
        assert!(backoff(3, 1.0) > backoff(2, 1.0));
        assert_eq!(backoff(30, 1.0), Duration::from_millis(30_000));
    }
}
