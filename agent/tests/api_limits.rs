//! The local inference API bounds memory per request (issue 24, fault 8): a body over the
//! limit gets 413 naming the limit before it is read, and requests past the in-flight
//! byte budget get 503 at once while small requests are still served.

mod common;

use common::*;
use drover_agent::api::{MAX_BODY, MAX_IN_FLIGHT_BYTES};
use drover_protocol::messages::{DeployMode, Phase};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends a request head announcing `len` body bytes (and `body`, possibly less).
async fn send_head(addr: &str, len: usize, body: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /v2/models/dense/infer HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {len}\r\nconnection: close\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    s
}

/// The status line and body of the response (the server closes the connection).
async fn response(mut s: TcpStream) -> (u16, String) {
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, text)
}

async fn metric(http: &reqwest::Client, base: &str, name: &str) -> u64 {
    let text = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_requests_get_413_and_requests_past_the_in_flight_budget_503_while_small_ones_are_served(
) {
    let mut h = Harness::start("gw-limits", |_| {}).await;
    let v1 = publish(&h.keys, "dense_v1", "dense", "1.0.0", 4096);
    let c = h.deploy(&v1, DeployMode::Activate).await;
    h.cp.wait_phase(c.digest(), Phase::Healthy).await;
    let (inputs, _) = reference("dense_v1");
    let http = reqwest::Client::new();
    let base = h.base.clone();
    let metrics = h.metrics_base.clone();
    let addr = base.trim_start_matches("http://").to_owned();
    let small = || async {
        http.post(format!("{base}/v2/models/dense/infer"))
            .json(&infer_body(&inputs))
            .send()
            .await
            .unwrap()
            .status()
    };

    // Over the limit: refused on its Content-Length, before any body byte is read.
    let (status, text) = response(send_head(&addr, MAX_BODY + 1, b"").await).await;
    assert_eq!(status, 413, "{text}");
    assert!(
        text.contains(&format!("exceeds the limit of {MAX_BODY} bytes")),
        "{text}"
    );

    // A slow client holds most of the in-flight budget with a large body still arriving.
    let held = MAX_BODY - 1024 * 1024;
    let slow = send_head(&addr, held, b"{\"inputs\": [").await;
    for _ in 0..3000 {
        if metric(&http, &metrics, "drover_agent_request_bytes_in_flight").await >= held as u64 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(
        metric(&http, &metrics, "drover_agent_request_bytes_in_flight").await,
        held as u64
    );
    // A second large request does not fit: 503 at once, with a reason and Retry-After.
    let second = MAX_BODY / 2;
    assert!(held + second > MAX_IN_FLIGHT_BYTES);
    let (status, text) = response(send_head(&addr, second, b"").await).await;
    assert_eq!(status, 503, "{text}");
    assert!(text.contains("the agent is busy"), "{text}");
    assert!(
        text.to_ascii_lowercase().contains("retry-after: 1"),
        "{text}"
    );
    // Small requests still fit beside the slow one.
    for _ in 0..5 {
        assert_eq!(small().await, 200);
    }
    assert_eq!(
        metric(&http, &metrics, "drover_agent_requests_too_large_total").await,
        1
    );
    assert_eq!(
        metric(&http, &metrics, "drover_agent_requests_busy_total").await,
        1
    );

    // The slow client gives up: its reservation is released.
    drop(slow);
    for _ in 0..3000 {
        if metric(&http, &metrics, "drover_agent_request_bytes_in_flight").await == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(
        metric(&http, &metrics, "drover_agent_request_bytes_in_flight").await,
        0
    );
    assert_eq!(small().await, 200);
    h.stop().await;
}
