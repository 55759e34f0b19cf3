//! Tests of the serve config: layering, validation, typed settings.
use super::*;

#[test]
fn layers_apply_in_order_and_all_errors_are_reported_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("c.toml");
    std::fs::write(
        &f,
        "version = 1\nhttp_listen = \"127.0.0.1:1\"\nmqtt_listen = \"127.0.0.1:2\"\n",
    )
    .unwrap();
    let env = HashMap::from([("DROVER_MQTT_LISTEN".to_string(), "127.0.0.1:3".to_string())]);
    let o = Overrides {
        http_listen: Some("127.0.0.1:4".into()),
        ..Default::default()
    };
    let c = ServeConfig::load(Some(&f), &env, &o).unwrap();
    assert_eq!(c.http_listen.port(), 4);
    assert_eq!(
        c.broker,
        BrokerMode::Embedded {
            listen: "127.0.0.1:3".parse().unwrap()
        }
    );
    let bad = ServeConfig {
        version: 9,
        http_listen: "nope".into(),
        broker_url: "http://x".into(),
        ..Default::default()
    };
    match bad.validate() {
        Err(ConfigError::Invalid(errs)) => assert_eq!(errs.len(), 3, "{errs:?}"),
        other => panic!("{other:?}"),
    }
    assert!(toml::from_str::<ServeConfig>(&ServeConfig::default_toml()).is_ok());
}

#[test]
fn settings_are_typed_empty_paths_are_none_and_durations_carry_their_unit() {
    let s = ServeConfig::default().validate().unwrap();
    assert_eq!(s.broker_ca_file, None);
    assert_eq!(s.broker_client_identity, None);
    assert_eq!(s.advertised_broker_url, None);
    assert!(s.continuous.is_none(), "no policy: no continuous training");
    assert_eq!(s.command_ttl, Duration::from_secs(7 * 24 * 3_600));
    assert_eq!(s.ingest.ack_interval, Duration::from_millis(200));
    let s = ServeConfig {
        broker_client_cert_file: "c.pem".into(),
        broker_client_key_file: "k.pem".into(),
        advertised_broker_url: "mqtts://cp.example.com:8883".into(),
        continuous: ContinuousConfig {
            policy: "policy.toml".into(),
            tick_secs: 30,
            ..Default::default()
        },
        ..Default::default()
    }
    .validate()
    .unwrap();
    assert_eq!(
        s.broker_client_identity,
        Some((PathBuf::from("c.pem"), PathBuf::from("k.pem")))
    );
    assert_eq!(
        s.advertised_broker_url.as_deref(),
        Some("mqtts://cp.example.com:8883")
    );
    let c = s.continuous.unwrap();
    assert_eq!(
        (c.policy, c.tick),
        (PathBuf::from("policy.toml"), Duration::from_secs(30))
    );
    assert_eq!(c.slurm_bin_dir, None);
}

#[test]
fn the_api_is_tls_beyond_loopback_by_default_and_plaintext_only_when_asked() {
    use crate::https::ApiTls;
    let with = |listen: &str, tls: &str| {
        ServeConfig {
            http_listen: listen.into(),
            api_tls: tls.into(),
            ..Default::default()
        }
        .validate()
        .unwrap()
        .api_tls
    };
    let ca = Some(ApiTls::FleetCa { hosts: vec![] });
    let named = ServeConfig {
        http_listen: "0.0.0.0:8470".into(),
        api_hosts: vec!["api.test".into()],
        advertise: vec!["cp.test:8883".into(), "api.test".into()],
        ..Default::default()
    };
    assert_eq!(
        named.validate().unwrap().api_tls,
        Some(ApiTls::FleetCa {
            hosts: vec!["api.test".into(), "cp.test".into()]
        }),
        "advertised names are the API certificate's too"
    );
    assert_eq!(with("127.0.0.1:8470", "auto"), None);
    assert_eq!(with("0.0.0.0:8470", "auto"), ca);
    assert_eq!(with("10.0.0.5:8470", "auto"), ca);
    assert_eq!(with("127.0.0.1:8470", "on"), ca);
    assert_eq!(with("0.0.0.0:8470", "off"), None);
    let o = Overrides {
        http_listen: Some("0.0.0.0:0".into()),
        api_plaintext: true,
        ..Default::default()
    };
    let s = ServeConfig::load(None, &HashMap::new(), &o).unwrap();
    assert_eq!(s.api_tls, None, "--api-plaintext");
    let files = ServeConfig {
        http_listen: "0.0.0.0:8470".into(),
        api_cert_file: "/etc/drover/api.pem".into(),
        api_key_file: "/etc/drover/api.key".into(),
        ..Default::default()
    };
    assert_eq!(
        files.validate().unwrap().api_tls,
        Some(ApiTls::Files {
            cert: "/etc/drover/api.pem".into(),
            key: "/etc/drover/api.key".into()
        })
    );
    let bad = ServeConfig {
        api_tls: "yes".into(),
        api_cert_file: "a.pem".into(),
        ..Default::default()
    };
    let e = bad.validate().unwrap_err().to_string();
    assert!(
        e.contains("api_tls = \"yes\"") && e.contains("given together"),
        "{e}"
    );
}

#[test]
fn advertised_names_parse_and_bad_ones_say_what_to_give() {
    let a = |s: &str| parse_advertised(s).map(|a| (a.host, a.port));
    assert_eq!(a("CP.Example.com"), Ok(("cp.example.com".into(), None)));
    assert_eq!(a("192.0.2.7:8884"), Ok(("192.0.2.7".into(), Some(8884))));
    assert_eq!(a("2001:db8::7"), Ok(("2001:db8::7".into(), None)));
    assert_eq!(
        a("[2001:db8::7]:8884"),
        Ok(("2001:db8::7".into(), Some(8884)))
    );
    let v6 = parse_advertised("[2001:db8::7]").unwrap();
    assert_eq!(v6.authority(8883), "[2001:db8::7]:8883");
    for bad in [
        "mqtts://cp:8883",
        "0.0.0.0",
        "::",
        "cp:0",
        "cp:x",
        "-cp",
        "a b",
        "",
    ] {
        let e = parse_advertised(bad).unwrap_err();
        assert!(e.contains("host") || e.contains("port"), "{bad}: {e}");
    }
}

#[test]
fn an_unspecified_listen_address_needs_a_name_to_advertise() {
    let c = |listen: &str, advertise: &[&str]| ServeConfig {
        mqtt_listen: listen.into(),
        advertise: advertise.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    for listen in ["0.0.0.0:8883", "[::]:8883"] {
        match c(listen, &[]).validate() {
            Err(ConfigError::Invalid(e)) => {
                assert!(e[0].contains("--advertise HOST[:PORT]"), "{e:?}")
            }
            other => panic!("{other:?}"),
        }
    }
    let s = c(
        "0.0.0.0:8883",
        &["cp.example.com", "192.0.2.7:9883", "cp.example.com"],
    )
    .validate()
    .unwrap();
    assert_eq!(s.advertise.len(), 2, "duplicates dropped");
    assert_eq!(s.advertise[1].port, Some(9883));
    // A specific address names itself.
    assert!(c("192.0.2.7:8883", &[]).validate().is_ok());
    // Flags replace the file's list; the environment is a comma-separated list.
    let env = HashMap::from([("DROVER_ADVERTISE".to_string(), "a.test, b.test".to_string())]);
    let s = ServeConfig::load(None, &env, &Overrides::default()).unwrap();
    assert_eq!(s.advertise.len(), 2);
    let o = Overrides {
        advertise: vec!["c.test".into()],
        ..Default::default()
    };
    let s = ServeConfig::load(None, &env, &o).unwrap();
    assert_eq!(s.advertise[0].host, "c.test");
    assert_eq!(s.advertise.len(), 1);
}

#[test]
fn broker_urls_parse_with_credentials() {
    let u = parse_broker_url("mqtts://cp:secret@broker.local:8884").unwrap();
    assert_eq!(
        (u.host.as_str(), u.port, u.tls),
        ("broker.local", 8884, true)
    );
    assert_eq!(u.username.as_deref(), Some("cp"));
    assert!(!format!("{u:?}").contains("secret"));
    assert_eq!(parse_broker_url("mqtt://h").unwrap().port, 1883);
    assert!(parse_broker_url("tcp://h").is_err());
}

#[test]
fn the_embedded_broker_is_rumqttd_unless_rmqtt_is_asked_for_and_built_in() {
    let s = ServeConfig::default().validate().unwrap();
    assert_eq!(s.embedded_broker, EmbeddedBroker::Rumqttd);
    let with = |name: &str| {
        ServeConfig {
            embedded_broker: name.into(),
            ..Default::default()
        }
        .validate()
    };
    match with("mosquitto") {
        Err(ConfigError::Invalid(errs)) => {
            assert!(errs[0].contains("\"rumqttd\""), "{errs:?}")
        }
        other => panic!("{other:?}"),
    }
    match with("rmqtt") {
        Ok(s) if cfg!(feature = "rmqtt") => assert_eq!(s.embedded_broker, EmbeddedBroker::Rmqtt),
        Err(ConfigError::Invalid(errs)) if !cfg!(feature = "rmqtt") => {
            assert!(errs[0].contains("--features rmqtt"), "{errs:?}")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn ingest_batches_are_large_by_default_and_bounded_by_the_queue() {
    let s = ServeConfig::default().validate().unwrap();
    assert_eq!(s.ingest.batch_max, 32_768);
    assert_eq!(
        with_batch(INGEST_QUEUE)
            .validate()
            .unwrap()
            .ingest
            .batch_max,
        INGEST_QUEUE
    );
    assert_eq!(with_batch(1).validate().unwrap().ingest.batch_max, 1);
    for bad in [0, INGEST_QUEUE + 1] {
        match with_batch(bad).validate() {
            Err(ConfigError::Invalid(errs)) => {
                assert_eq!(errs.len(), 1, "{errs:?}");
                assert!(
                    errs[0].contains("ingest.batch_max must be within 1..=65536"),
                    "{errs:?}"
                );
            }
            other => panic!("batch_max {bad}: {other:?}"),
        }
    }
}

fn with_batch(batch_max: usize) -> ServeConfig {
    ServeConfig {
        ingest: IngestConfig {
            batch_max,
            ..Default::default()
        },
        ..Default::default()
    }
}
