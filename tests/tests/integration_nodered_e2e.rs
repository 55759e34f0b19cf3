//! A real integration consumer end to end (issue 20): `drover serve` (embedded broker
//! behind its mutual-TLS front, JSON stream on) with real agents; a real Node-RED
//! (npm `node-red`, headless, the committed flow `tests/node-red/flows.json`: MQTT in over
//! TLS with the identity from `drover integration create` → JSON → file) must write every
//! telemetry window the agents' control plane stored, decoded. Then a plain MQTT client
//! (rumqttc) holding the same identity proves it can read the JSON stream and nothing
//! else: every publish, and every subscription outside `drover/v1/json/#`, closes its
//! connection; it cannot pose as a device; revoking it cuts its session.
//!
//! Needs Node-RED (`.ci/install-deps.sh` puts it in /opt/drover-peers/node-red; another
//! install via `DROVER_NODE_RED=<path to bin/node-red>`). With `DROVER_REQUIRE_PEERS=1`
//! (CI) a missing Node-RED fails the test.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use drover_control_plane::config::{IntegrationConfig, ServeConfig};
use drover_control_plane::metrics::BrokerRefusal;
use drover_control_plane::serve;
use drover_protocol::{topics, DeviceId};
use drover_tests::fleet::Api;
use drover_tests::{cli_enroll, drover_cli, peers_required, wait_until};
use rumqttc::{
    AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS, TlsConfiguration, Transport,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(120);
const DEVICES: [&str; 3] = ["gw-1", "gw-2", "gw-3"];
/// Telemetry windows each device sends before the agents stop.
const WINDOWS: usize = 6;

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn node_red_bin() -> Option<PathBuf> {
    let p = std::env::var_os("DROVER_NODE_RED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/drover-peers/node-red/node_modules/.bin/node-red"));
    p.exists().then_some(p)
}

/// Node-RED's output file: one JSON object per record it decoded.
fn records(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn telemetry_seqs(records: &[Value], device: &str) -> BTreeSet<u64> {
    records
        .iter()
        .filter(|r| r["kind"] == "telemetry" && r["device"] == device)
        .filter(|r| r["schema"] == 1 && r["inferences"].is_u64() && r["window_end_ms"].is_u64())
        .filter_map(|r| r["seq"].as_u64())
        .collect()
}

/// The telemetry windows the control plane stored for `device` (what its agent sent).
async fn stored_seqs(api: &Api, device: &str) -> BTreeSet<u64> {
    let v = api
        .get(&format!("/v1/devices/{device}/telemetry?limit=10000"))
        .await
        .unwrap_or(Value::Null);
    v.as_array()
        .map(|a| a.iter().filter_map(|t| t["seq"].as_u64()).collect())
        .unwrap_or_default()
}

/// The stored telemetry windows (re-read each time: one in flight when the agents stopped
/// lands late) that are not in Node-RED's file, decoded; empty when none.
async fn missing_windows(api: &Api, out_file: &Path) -> String {
    let got = records(out_file);
    let mut missing = String::new();
    for d in DEVICES {
        let stored = stored_seqs(api, d).await;
        let lost: Vec<_> = stored
            .difference(&telemetry_seqs(&got, d))
            .copied()
            .collect();
        if !lost.is_empty() {
            missing.push_str(&format!("{d}: {lost:?} of {}; ", stored.len()));
        }
    }
    missing
}

struct Identity {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn client(port: u16, id: &Identity, client_id: &str, user: &str) -> (AsyncClient, EventLoop) {
    let mut o = MqttOptions::new(client_id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30))
        .set_credentials(user, "");
    let cfg = drover_control_plane::mqtt::tls_config(&id.ca, Some((&id.cert, &id.key))).unwrap();
    o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(cfg)));
    AsyncClient::new(o, 64)
}

/// Connects; `Err` is the broker's refusal as text.
async fn connect(
    port: u16,
    id: &Identity,
    client_id: &str,
    user: &str,
) -> Result<(AsyncClient, EventLoop), String> {
    let (c, mut el) = client(port, id, client_id, user);
    let r = tokio::time::timeout(WAIT, async {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await
    .unwrap_or_else(|_| Err("no answer".into()));
    r.map(|()| (c, el))
}

/// Polls until the connection ends; returns the topics that arrived meanwhile, or
/// `None` if a SUBACK came (the broker accepted the subscription).
async fn until_closed(el: &mut EventLoop) -> Option<Vec<String>> {
    let mut got = Vec::new();
    tokio::time::timeout(WAIT, async {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => return None,
                Ok(Event::Incoming(Packet::Publish(p))) => got.push(p.topic.clone()),
                Ok(_) => {}
                Err(_) => return Some(got),
            }
        }
    })
    .await
    .expect("the front answers within the wait")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_red_reads_every_telemetry_window_and_the_identity_reads_nothing_else() {
    let Some(node_red) = node_red_bin() else {
        assert!(
            !peers_required(),
            "Node-RED is required (DROVER_REQUIRE_PEERS=1): run .ci/install-deps.sh"
        );
        eprintln!("skipped: Node-RED not installed");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let config = ServeConfig {
        data_dir: dir.join("server"),
        http_listen: "127.0.0.1:0".into(),
        mqtt_listen: "127.0.0.1:0".into(),
        integration: IntegrationConfig { stream: true },
        ..Default::default()
    };
    let server = serve::run(config.validate().unwrap(), std::future::pending())
        .await
        .unwrap();
    let url = format!("http://{}", server.http_addr());
    let token = server.api_token().to_string();
    let api = Api::new(url.clone(), token.clone());
    let srv: Vec<&str> = vec!["--server", &url, "--token", &token];
    let port = server.mqtt_addr().port();

    // The identity, as an operator gets it.
    let ids = dir.join("node-red-identity");
    let ids_s = ids.to_string_lossy().into_owned();
    let out = drover_cli(
        &[
            &[
                "integration",
                "create",
                "node-red",
                "--out",
                &ids_s,
                "--output",
                "json",
            ][..],
            &srv,
        ]
        .concat(),
    )
    .unwrap();
    let created: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(created["identity"], "integration@node-red", "{created}");
    assert_eq!(created["topic_filter"], "drover/v1/json/#", "{created}");
    let id = Identity {
        ca: ids.join("ca.pem"),
        cert: ids.join("node-red.pem"),
        key: ids.join("node-red.key"),
    };
    let again = drover_cli(
        &[
            &["integration", "create", "node-red", "--out", &ids_s][..],
            &srv,
        ]
        .concat(),
    );
    assert!(
        again
            .as_ref()
            .is_err_and(|e| e.to_string().contains("already exists")),
        "{again:?}"
    );

    // A probe device first: its telemetry in Node-RED's file proves the subscription is
    // live before the fleet proper starts (a QoS 0 record published earlier is nobody's).
    let probe = cli_enroll(&srv, dir, "gw-probe", &[], "127.0.0.1:0").unwrap();
    let _probe = drover_agent::run(probe, std::future::pending())
        .await
        .unwrap();

    let nr_dir = dir.join("node-red");
    std::fs::create_dir_all(&nr_dir).unwrap();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("node-red");
    for f in ["settings.js", "flows.json", "flows_cred.json"] {
        std::fs::copy(repo.join(f), nr_dir.join(f)).unwrap();
    }
    let out_file = nr_dir.join("records.jsonl");
    let log = std::fs::File::create(nr_dir.join("node-red.log")).unwrap();
    let _node_red = KillOnDrop(
        Command::new(&node_red)
            .arg("--userDir")
            .arg(&nr_dir)
            .arg("--settings")
            .arg(nr_dir.join("settings.js"))
            .arg(nr_dir.join("flows.json"))
            .env("DROVER_MQTT_HOST", "127.0.0.1")
            .env("DROVER_MQTT_PORT", port.to_string())
            .env("DROVER_TLS_CA", &id.ca)
            .env("DROVER_TLS_CERT", &id.cert)
            .env("DROVER_TLS_KEY", &id.key)
            .env("DROVER_NR_OUT", &out_file)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let node_red_log = || std::fs::read_to_string(nr_dir.join("node-red.log")).unwrap_or_default();
    let live = wait_until("the probe's telemetry in Node-RED's file", WAIT, || async {
        (!telemetry_seqs(&records(&out_file), "gw-probe").is_empty()).then_some(())
    })
    .await;
    assert!(live.is_ok(), "{live:?}\nNode-RED log:\n{}", node_red_log());

    // The fleet proper.
    let mut agents = Vec::new();
    for d in DEVICES {
        let cfg = cli_enroll(&srv, dir, d, &["site=plant-a"], "127.0.0.1:0").unwrap();
        agents.push(
            drover_agent::run(cfg, std::future::pending())
                .await
                .unwrap(),
        );
    }
    for d in DEVICES {
        wait_until(
            &format!("{WINDOWS} telemetry windows of {d} stored"),
            WAIT,
            || async { (stored_seqs(&api, d).await.len() >= WINDOWS).then_some(()) },
        )
        .await
        .unwrap();
    }
    for a in agents {
        a.shutdown();
        a.wait().await.unwrap();
    }
    // Every window stored (re-read each round: one in flight at the stop lands late) is in
    // Node-RED's file, decoded.
    let all_in = wait_until(
        "every stored telemetry window in Node-RED's file",
        WAIT,
        || async {
            missing_windows(&api, &out_file)
                .await
                .is_empty()
                .then_some(())
        },
    )
    .await;
    assert!(
        all_in.is_ok(),
        "missing windows: {}\nNode-RED log:\n{}",
        missing_windows(&api, &out_file).await,
        node_red_log()
    );
    let got = records(&out_file);
    for d in DEVICES {
        assert!(telemetry_seqs(&got, d).len() >= WINDOWS, "{d}");
        assert!(
            got.iter().any(|r| r["kind"] == "registration"
                && r["device"] == d
                && r["labels"]["site"] == "plant-a"),
            "registration of {d} decoded"
        );
    }
    drop(_node_red);

    check_read_only(&server, &api, &srv, port, &id).await;
}

/// The identity reads the JSON stream and nothing else, cannot pose as a device, and a
/// revocation cuts it off.
async fn check_read_only(
    server: &serve::ServeHandle,
    api: &Api,
    srv: &[&str],
    port: u16,
    id: &Identity,
) {
    const ME: &str = "integration@node-red";
    let gw = DeviceId::new("gw-1").unwrap();
    let acl_before = server.metrics().broker_refused(BrokerRefusal::Acl);

    // Reading the stream works: the retained registration arrives.
    let (c, mut reader) = connect(port, id, ME, ME).await.unwrap();
    let reg = topics::json_registration(&gw);
    c.subscribe(reg.clone(), QoS::AtMostOnce).await.unwrap();
    let got = tokio::time::timeout(WAIT, async {
        loop {
            if let Event::Incoming(Packet::Publish(p)) = reader.poll().await.unwrap() {
                return p.topic;
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(got, reg);
    drop((c, reader));

    // Anything else closes the connection: subscriptions outside the stream (nothing
    // arrives first), and every publish, inside the stream or not. One connection per
    // check, all of this identity: 15 connects here, within its burst of
    // `broker::CONNECT_BURST` (Node-RED, stopped above, refilled it long ago).
    let filters = [
        topics::uplink_filter_all(),
        topics::downlink(&gw),
        topics::keyring(),
        "drover/v1/model/+/chunks".into(),
        "drover/#".into(),
        "#".into(),
    ];
    for f in &filters {
        let (c, mut el) = connect(port, id, ME, ME).await.unwrap();
        c.subscribe(f.clone(), QoS::AtMostOnce).await.unwrap();
        let got = until_closed(&mut el).await;
        assert_eq!(
            got,
            Some(vec![]),
            "subscribing to {f} was refused and read nothing"
        );
    }
    let publishes = [
        topics::uplink(&gw, topics::UplinkKind::Telemetry),
        topics::json_uplink(&gw, topics::UplinkKind::Telemetry),
        topics::keyring(),
    ];
    assert!(
        (1 + filters.len() + publishes.len() + 3 + 2) as f64
            <= drover_control_plane::broker::CONNECT_BURST
    );
    for t in &publishes {
        let (c, mut el) = connect(port, id, ME, ME).await.unwrap();
        c.publish(t.clone(), QoS::AtLeastOnce, false, b"{}".to_vec())
            .await
            .unwrap();
        assert!(
            until_closed(&mut el).await.is_some(),
            "publishing to {t} was refused"
        );
    }
    let acl = server.metrics().broker_refused(BrokerRefusal::Acl) - acl_before;
    assert_eq!(acl, (filters.len() + publishes.len()) as u64);

    // Not a device, not a device's session: the client id and username are its name.
    let refused = |r| server.metrics().broker_refused(r);
    let (login, client_id_refused, rate) = (
        refused(BrokerRefusal::Login),
        refused(BrokerRefusal::ClientId),
        refused(BrokerRefusal::ConnectRate),
    );
    for (client_id, user) in [("gw-1", ME), (ME, "gw-1"), ("gw-1", "gw-1")] {
        let r = connect(port, id, client_id, user).await;
        assert!(
            r.is_err(),
            "client id {client_id}, user {user}: {:?}",
            r.map(|_| ())
        );
    }

    assert_eq!(refused(BrokerRefusal::ClientId) - client_id_refused, 1);
    assert_eq!(refused(BrokerRefusal::Login) - login, 2);

    // Revoked: the open session is cut, a new one refused, the listing says so.
    let (c, mut el) = connect(port, id, ME, ME).await.unwrap();
    c.subscribe(topics::json_filter_all(), QoS::AtMostOnce)
        .await
        .unwrap();
    drover_cli(&[&["integration", "revoke", "node-red"][..], srv].concat()).unwrap();
    tokio::time::timeout(WAIT, async { while el.poll().await.is_ok() {} })
        .await
        .expect("the revoked session is cut");
    let r = connect(port, id, ME, ME).await;
    assert!(r.is_err(), "a revoked identity connects");
    assert_eq!(
        refused(BrokerRefusal::Login) - login,
        3,
        "refused as revoked"
    );
    assert_eq!(
        refused(BrokerRefusal::ConnectRate),
        rate,
        "never for its rate"
    );
    let list = api.get("/v1/integrations").await.unwrap();
    assert!(list[0]["revoked_at_ms"].is_u64(), "{list}");
}
