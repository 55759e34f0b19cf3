//! Tests of the agent config: layering, validation, the shipped file.
use super::*;

fn good() -> AgentConfig {
    AgentConfig {
        device_id: "gw-01".into(),
        device_key: "11".repeat(32),
        root_public_key: drover_protocol::topics::hex32(
            &drover_protocol::SecretKey::from_seed([7; 32]).public(),
        ),
        ..AgentConfig::default()
    }
}

#[test]
fn documented_example_parses_and_validates() {
    let text = format!(
        r#"
version = 1
device_id = "gw-01"
device_key = "{}"
root_public_key = "{}"
broker_url = "mqtts://broker.example:8883"
data_dir = "/var/lib/drover-agent"
api_addr = "127.0.0.1:8480"
metrics_addr = "127.0.0.1:9480"
[labels]
site = "plant-a"
[tls]
ca_file = "/etc/drover/ca.pem"
client_cert_file = "/etc/drover/device.pem"
client_key_file = "/etc/drover/device.key"
[telemetry]
interval_ms = 10000
spool_max_bytes = 67108864
sample_rate_ppm = 10000
"#,
        good().device_key,
        good().root_public_key
    );
    let cfg = AgentConfig::from_toml(&text).unwrap();
    let v = cfg.validate().unwrap();
    assert_eq!(v.broker.port, 8883);
    assert!(v.broker.tls);
    assert_eq!(cfg.labels["site"], "plant-a");
    // Round trip through to_toml.
    assert_eq!(
        AgentConfig::from_toml(&cfg.to_toml().unwrap()).unwrap(),
        cfg
    );
}

#[test]
fn every_error_is_reported_at_once() {
    let cfg = AgentConfig {
        version: 9,
        device_id: "a/b".into(),
        device_key: "zz".into(),
        broker_url: "http://x".into(),
        api_addr: "nope".into(),
        store: StoreConfig { max_bytes: 1000 },
        runtime: RuntimeConfig {
            threads: 65,
            io_threads: 65,
            load_memory_bytes: 1000,
            load_timeout_ms: 10,
            ..RuntimeConfig::default()
        },
        capture: crate::capture::CaptureConfig {
            low_confidence_below: 0.0,
            ..Default::default()
        },
        ..AgentConfig::default()
    };
    let Err(ConfigError::Invalid(errs)) = cfg.validate() else {
        panic!("expected Invalid");
    };
    for needle in [
        "version",
        "device_id",
        "device_key",
        "root_public_key",
        "broker_url",
        "api_addr",
        "store.max_bytes",
        "runtime.threads",
        "runtime.io_threads",
        "runtime.load_memory_bytes",
        "runtime.load_timeout_ms",
        "capture.low_confidence_below",
    ] {
        assert!(
            errs.iter().any(|e| e.starts_with(needle)),
            "{needle} missing from {errs:?}"
        );
    }
}

#[test]
fn layers_apply_in_order_defaults_file_env_flags() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    let mut file_cfg = good();
    file_cfg.telemetry.interval_ms = 5000;
    file_cfg.api_addr = "127.0.0.1:1".into();
    std::fs::write(&path, file_cfg.to_toml().unwrap()).unwrap();
    let env: BTreeMap<String, String> = [
        ("DROVER_AGENT_TELEMETRY_INTERVAL_MS", "700"),
        ("DROVER_AGENT_API_ADDR", "127.0.0.1:2"),
        ("DROVER_AGENT_STORE_MAX_BYTES", "2000000"),
        ("DROVER_AGENT_RUNTIME_THREADS", "2"),
        ("DROVER_AGENT_RUNTIME_IO_THREADS", "3"),
        ("DROVER_AGENT_RUNTIME_ISOLATE", "false"),
        ("DROVER_AGENT_RUNTIME_LOAD_MEMORY_BYTES", "268435456"),
        (
            "DROVER_AGENT_RUNTIME_LOADER_EXE",
            "/opt/drover/drover-agent",
        ),
        ("UNRELATED", "x"),
    ]
    .into_iter()
    .map(|(a, b)| (a.to_owned(), b.to_owned()))
    .collect();
    let flags = vec![
        ("api_addr".to_owned(), "127.0.0.1:3".to_owned()),
        ("runtime.load_timeout_ms".to_owned(), "5000".to_owned()),
    ];
    let v = AgentConfig::load(Some(&path), &env, &flags).unwrap();
    let rt = &v.raw.runtime;
    assert_eq!(
        (rt.isolate, rt.load_memory_bytes, rt.load_timeout_ms),
        (false, 256 << 20, 5000)
    );
    assert_eq!(
        rt.loader_exe.as_deref(),
        Some("/opt/drover/drover-agent".as_ref())
    );
    assert_eq!(v.raw.telemetry.interval_ms, 700);
    assert_eq!(v.raw.store.max_bytes, 2_000_000);
    assert_eq!(v.raw.runtime.threads(), drover_runtime::Threads::Fixed(2));
    assert_eq!(v.raw.runtime.io_worker_threads(), 3);
    assert_eq!(RuntimeConfig::default().io_worker_threads(), 1);
    assert_eq!(v.api_addr.port(), 3);
    // Default kept for what nobody set.
    assert_eq!(v.raw.telemetry.sample_rate_ppm, 10_000);
}

#[test]
fn relative_tls_paths_in_a_file_name_files_beside_it() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("etc");
    std::fs::create_dir(&conf).unwrap();
    let mut c = good();
    c.broker_url = "mqtts://drover-cp.test:8883".into();
    c.tls = Some(TlsConfig {
        ca_file: "gw-01.ca.pem".into(),
        client_cert_file: Some("certs/gw-01.cert.pem".into()),
        client_key_file: Some("/abs/gw-01.key.pem".into()),
    });
    let file = conf.join("agent.toml");
    std::fs::write(&file, c.to_toml().unwrap()).unwrap();
    let v = AgentConfig::load(Some(&file), &BTreeMap::new(), &[]).unwrap();
    let tls = v.raw.tls.unwrap();
    assert_eq!(tls.ca_file, conf.join("gw-01.ca.pem"));
    assert_eq!(
        tls.client_cert_file,
        Some(conf.join("certs").join("gw-01.cert.pem"))
    );
    assert_eq!(
        tls.client_key_file,
        Some(PathBuf::from("/abs/gw-01.key.pem"))
    );
    // The same for a tool that parses the text and resolves against the file.
    let mut parsed = AgentConfig::from_toml(&std::fs::read_to_string(&file).unwrap()).unwrap();
    parsed.resolve_tls_paths(&file);
    assert_eq!(parsed.tls, Some(tls));
}

#[test]
fn unknown_env_key_and_unknown_file_key_are_errors() {
    let env: BTreeMap<String, String> = [("DROVER_AGENT_NOPE".to_owned(), "1".to_owned())]
        .into_iter()
        .collect();
    assert!(matches!(
        AgentConfig::load(None, &env, &[]),
        Err(ConfigError::Invalid(_))
    ));
    assert!(AgentConfig::from_toml("version = 1\nbogus = 2\n").is_err());
}

#[test]
fn shipped_config_is_hardened_and_valid_once_enrolled() {
    let text = include_str!("../../agent.toml");
    let mut cfg = AgentConfig::from_toml(text).unwrap();
    assert!(cfg.broker_url.starts_with("mqtts://"));
    assert!(cfg.api_addr.starts_with("127.0.0.1:"));
    // Unenrolled: refused, naming the identity fields.
    let Err(ConfigError::Invalid(errs)) = cfg.validate() else {
        panic!("an unenrolled config must not validate");
    };
    assert_eq!(errs.len(), 3, "{errs:?}");
    let g = good();
    cfg.device_id = g.device_id;
    cfg.device_key = g.device_key;
    cfg.root_public_key = g.root_public_key;
    assert!(cfg.validate().unwrap().broker.tls);
}

#[test]
fn metrics_get_a_listener_of_their_own() {
    let v = good().validate().unwrap();
    assert_eq!(v.metrics_addr.to_string(), "127.0.0.1:9480");
    assert_ne!(v.metrics_addr, v.api_addr);
    let mut cfg = good();
    cfg.metrics_addr = cfg.api_addr.clone();
    let Err(ConfigError::Invalid(errs)) = cfg.validate() else {
        panic!("metrics on the API's own address must not validate");
    };
    assert!(
        errs[0].contains("give /metrics a port of its own"),
        "{errs:?}"
    );
    cfg.metrics_addr = "nowhere".into();
    let Err(ConfigError::Invalid(errs)) = cfg.validate() else {
        panic!("a bad metrics_addr must not validate");
    };
    assert!(errs[0].starts_with("metrics_addr: "), "{errs:?}");
    // A config written before the key existed gets the default.
    let mut table = toml::Table::try_from(good()).unwrap();
    table.remove("metrics_addr");
    let old: AgentConfig = toml::Value::Table(table).try_into().unwrap();
    assert_eq!(old.metrics_addr, "127.0.0.1:9480");
}

#[test]
fn default_config_round_trips_through_toml() {
    let text = AgentConfig::default().to_toml().unwrap();
    assert_eq!(
        AgentConfig::from_toml(&text).unwrap(),
        AgentConfig::default()
    );
}

#[test]
fn plaintext_broker_url_with_tls_configured_is_refused_unless_allowed() {
    let mut cfg = good();
    cfg.broker_url = "mqtt://broker.example:1883".into();
    cfg.tls = Some(TlsConfig {
        ca_file: "/etc/drover/ca.pem".into(),
        client_cert_file: None,
        client_key_file: None,
    });
    let Err(ConfigError::Invalid(errs)) = cfg.validate() else {
        panic!("plaintext with [tls] must not validate");
    };
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(errs[0].starts_with("broker_url: \"mqtt://broker.example:1883\" is plaintext MQTT while a [tls] section is configured"), "{errs:?}");
    // Allowed explicitly (as a flag would set it), or no TLS material at all: accepted.
    let mut table = toml::Table::try_from(&cfg).unwrap();
    set_path(&mut table, &["allow_plaintext"], "true");
    let allowed: AgentConfig = toml::Value::Table(table).try_into().unwrap();
    assert!(allowed.allow_plaintext);
    assert!(!allowed.validate().unwrap().broker.tls);
    cfg.tls = None;
    assert!(cfg.validate().is_ok());
}

#[test]
fn debug_never_prints_the_device_key() {
    let s = format!("{:?}", good());
    assert!(!s.contains(&"11".repeat(32)));
}
