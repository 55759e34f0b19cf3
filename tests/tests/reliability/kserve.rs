//! KServe v2 abuse on a running `drover-agent` process's local API, beyond the malformed
//! requests of `agent/tests/api.rs` and the memory limits of `agent/tests/api_limits.rs`:
//! shapes claiming billions of values, deeply nested JSON, hundreds of malformed requests
//! at once, and 50 connections dripping their headers. Each request gets its 4xx (or, at
//! volume, the in-flight budget's 503; never another 5xx or a dropped connection), and the
//! agent keeps serving good requests.

use drover_control_plane::config::ServeConfig;
use drover_control_plane::serve;
use drover_tests::{cli_enroll, free_port, wait_until};
use serde_json::json;
use tokio::io::AsyncWriteExt;

use crate::common::*;

const DEVICE: &str = "kserve-a";

fn abusive_bodies() -> Vec<(String, u16)> {
    let nested = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    vec![
        (json!({"inputs": [{"name": "x", "shape": [1_000_000_000u64, 16], "datatype": "FP32", "data": vec![0.5; 16]}]}).to_string(), 400),
        (json!({"inputs": [{"name": "x", "shape": [u64::MAX, u64::MAX], "datatype": "FP32", "data": [0.5]}]}).to_string(), 400),
        (json!({"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": nested}]}).to_string(), 400),
        (format!("{{\"inputs\": {nested}}}"), 400),
        ("{\"inputs\": [{\"name\": \"x\", \"shape\": [1, 16], \"datatype\": \"FP32\", \"data\": [".to_string(), 400),
        (String::new(), 400),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kserve_abuse_on_a_running_agent_gets_client_errors_and_good_requests_are_served() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let config = ServeConfig {
        data_dir: dir.join("server"),
        http_listen: "127.0.0.1:0".into(),
        mqtt_listen: "127.0.0.1:0".into(),
        ..Default::default()
    };
    let server = serve::run(config.validate().unwrap(), std::future::pending())
        .await
        .unwrap();
    let url = format!("http://{}", server.http_addr());
    let token = server.api_token().to_string();
    let srv: Vec<&str> = vec!["--server", &url, "--token", &token];
    let api = format!("127.0.0.1:{}", free_port());
    cli_enroll(&srv, dir, DEVICE, &[], &api).unwrap();
    publish_dense(&srv);
    let log = dir.join("agent.log");
    let mut agent = spawn_agent(&dir.join(format!("{DEVICE}.toml")), &log);
    deploy_dense(&srv, DEVICE, "1.0.0");
    healthy_on(&srv, DEVICE, "1.0.0", &log).await.unwrap();

    let http = reqwest::Client::builder().timeout(WAIT).build().unwrap();
    let infer = format!("http://{api}/v2/models/dense/infer");
    let send = |body: String| {
        let (http, infer) = (http.clone(), infer.clone());
        async move {
            http.post(infer)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .map(|r| r.status().as_u16())
                .map_err(|e| e.to_string())
        }
    };
    for (body, want) in abusive_bodies() {
        assert_eq!(
            send(body.clone()).await,
            Ok(want),
            "{}",
            &body[..body.len().min(120)]
        );
    }

    // 50 connections dripping a request head, held while the abuse runs at volume.
    let mut drips = Vec::new();
    for _ in 0..50 {
        let mut s = tokio::net::TcpStream::connect(api.as_str()).await.unwrap();
        drips.push(tokio::spawn(async move {
            let head =
                b"POST /v2/models/dense/infer HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n";
            for b in head.iter().cycle() {
                if s.write_all(&[*b]).await.is_err() {
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        }));
    }
    // 50 rounds of every abusive body at once (300 requests in flight).
    let mut tasks = Vec::new();
    for _ in 0..50 {
        for (body, want) in abusive_bodies() {
            let f = send(body);
            tasks.push(tokio::spawn(async move { (f.await, want) }));
        }
    }
    // At volume a body may also meet the agent's shared in-flight byte budget: 503
    // (busy) is that budget's own clear refusal. Anything else is wrong.
    let (mut wrong, mut busy) = (Vec::new(), 0);
    for t in tasks {
        let (got, want) = t.await.unwrap();
        match got {
            Ok(503) => busy += 1,
            g if g == Ok(want) => {}
            g => wrong.push(g),
        }
    }
    eprintln!("kserve abuse: 300 at once, {busy} answered 503 (in-flight budget)");
    assert!(
        wrong.is_empty(),
        "{} answers differ: {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(5)]
    );

    // Good requests are served, by the same process, with the drips still open.
    let served = wait_until("a good request served", WAIT, || served_version(&api)).await;
    assert_eq!(served.ok().as_deref(), Some("1.0.0"));
    assert!(agent.try_wait().unwrap().is_none(), "the agent exited");
    for d in drips {
        d.abort();
    }
    agent.kill().unwrap();
    agent.wait().unwrap();
    server.shutdown().await;
}
