//! Enrollment refusals: oversized labels are refused with the limit, and an enrollment
//! that fails half way leaves nothing behind, so the id can be enrolled again.

mod common;

use common::*;
use drover_control_plane::fleet::{MAX_LABELS, MAX_LABEL_KEY_BYTES, MAX_LABEL_VALUE_BYTES};
use serde_json::{json, Map, Value};

fn labels(n: usize, key_len: usize, value_len: usize) -> Value {
    let mut m = Map::new();
    for i in 0..n {
        let mut k = format!("k{i}-");
        k.push_str(&"k".repeat(key_len.saturating_sub(k.len())));
        m.insert(k, Value::String("v".repeat(value_len)));
    }
    Value::Object(m)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enroll_refuses_labels_past_their_limits_and_names_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let api = Api::new(&server);

    let refused = [
        (
            "too-many",
            labels(MAX_LABELS + 1, 8, 8),
            format!("at most {MAX_LABELS}"),
        ),
        (
            "long-key",
            labels(1, MAX_LABEL_KEY_BYTES + 1, 8),
            format!("1-{MAX_LABEL_KEY_BYTES} bytes"),
        ),
        (
            "long-value",
            labels(1, 8, MAX_LABEL_VALUE_BYTES + 1),
            format!("1-{MAX_LABEL_VALUE_BYTES} bytes"),
        ),
        // The shape of the reported fault: one label of several megabytes. Refused by
        // the body limit before the label check (413, below).
        (
            "huge-value",
            labels(1, 8, (8 << 20) / 16),
            format!("1-{MAX_LABEL_VALUE_BYTES} bytes"),
        ),
        (
            "empty-key",
            json!({"": "x"}),
            format!("1-{MAX_LABEL_KEY_BYTES} bytes"),
        ),
    ];
    for (id, l, limit) in refused {
        let (status, body) = api
            .post("/v1/devices", &json!({"id": id, "labels": l}))
            .await;
        assert_eq!(status, 400, "{id}: {body}");
        let msg = body.to_string();
        assert!(msg.contains(&limit), "{id}: {limit:?} missing from {msg}");
        assert!(
            msg.len() < 1024,
            "{id}: the refusal echoes the label: {} bytes",
            msg.len()
        );
    }

    // Several megabytes: 413 from the body limit, in JSON, saying the limit.
    let (status, body) = api
        .post(
            "/v1/devices",
            &json!({"id": "huge", "labels": labels(1, 8, 8 << 20)}),
        )
        .await;
    assert_eq!(status, 413, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap_or_default()
            .contains("over the limit"),
        "{body}"
    );

    // Exactly at every limit is fine.
    let (status, body) = api
        .post(
            "/v1/devices",
            &json!({"id": "at-limits", "labels": labels(MAX_LABELS, MAX_LABEL_KEY_BYTES, MAX_LABEL_VALUE_BYTES)}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let ids: Vec<String> = api
        .get("/v1/devices")
        .await
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids, ["at-limits"]);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enrollment_whose_certificate_cannot_be_issued_leaves_the_id_free() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let api = Api::new(&server);

    // The CA cannot record this device's certificate: its file name is taken by a directory.
    let blocker = dir.path().join("keys/issued/gw-x.pem");
    std::fs::create_dir_all(blocker.join("in-the-way")).unwrap();
    let (status, body) = api.post("/v1/devices", &json!({"id": "gw-x"})).await;
    assert_eq!(status, 500, "{body}");
    assert!(
        api.get("/v1/devices").await.as_array().unwrap().is_empty(),
        "the failed enrollment left a device behind"
    );

    std::fs::remove_dir_all(&blocker).unwrap();
    let e = api.enroll("gw-x", &[("site", "a")]).await;
    assert_eq!(e.device_id, "gw-x");
    assert!(!e.client_cert_pem.is_empty());
    assert_eq!(api.device("gw-x").await["labels"]["site"], "a");
    server.shutdown().await;
}
