//! The agent's Prometheus page, on its own listener (`metrics_addr`): cumulative counters
//! since start, run-time histograms in seconds per model version (active and shadow),
//! spool, download, broker and self-test gauges. Passes `promtool check metrics`
//! (`tests/tests/metrics_e2e.rs`).

use std::sync::atomic::Ordering::Relaxed;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use drover_host::prom;

use super::{error, Shared, MAX_IN_FLIGHT_BYTES};

pub(super) fn router(shared: Shared) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .fallback(|| async {
            error(
                StatusCode::NOT_FOUND,
                "this listener serves /metrics only; the inference API is on api_addr",
            )
        })
        .with_state(shared)
}

async fn metrics(State(s): State<Shared>) -> Response {
    let mut out = String::new();
    counters(&mut out, &s);
    gauges(&mut out, &s);
    let t = &s.serving.totals;
    let o = &mut out;
    let actives = s.serving.actives();
    if !actives.is_empty() {
        prom::header(o, "drover_agent_model_info", "gauge", "The serving models.");
    }
    for m in actives {
        let r = &m.model_ref;
        prom::sample(
            o,
            "drover_agent_model_info",
            &[("name", &r.name), ("version", &r.version)],
            1.0,
        );
    }
    prom::header(
        o,
        "drover_agent_inference_duration_seconds",
        "histogram",
        "Model run time per inference, by model version and role (active, shadow).",
    );
    for ((model, version, role), h) in t.latency_snapshot() {
        prom::histogram(
            o,
            "drover_agent_inference_duration_seconds",
            &[("model", &model), ("version", &version), ("role", role)],
            &h,
        );
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        out,
    )
        .into_response()
}

fn counters(o: &mut String, s: &Shared) {
    let t = &s.serving.totals;
    let name = "drover_agent_samples_dropped_total";
    prom::header(
        o,
        name,
        "counter",
        "Sampled inputs the capture policy wanted but its budget refused, by the cap that refused them.",
    );
    for (d, v) in crate::capture::Dropped::ALL.iter().zip(&t.samples_dropped) {
        prom::sample(o, name, &[("reason", d.as_str())], v.load(Relaxed) as f64);
    }
    let per_model = s.serving.model_counts();
    for (name, help, ix) in [
        (
            "drover_agent_model_inferences_total",
            "Inference requests that reached each model (since it was first served here).",
            0,
        ),
        (
            "drover_agent_model_inference_errors_total",
            "Inferences of each model that failed in the runtime.",
            1,
        ),
    ] {
        if per_model.is_empty() {
            break;
        }
        prom::header(o, name, "counter", help);
        for (model, inferences, errors) in &per_model {
            let v = [*inferences, *errors][ix];
            prom::sample(o, name, &[("model", model)], v as f64);
        }
    }
    let n = |v: &std::sync::atomic::AtomicU64| v.load(Relaxed) as f64;
    for (name, help, v) in [
        (
            "drover_agent_inferences_total",
            "Inference requests that reached a model.",
            &t.inferences,
        ),
        (
            "drover_agent_inference_errors_total",
            "Inferences that failed in the runtime.",
            &t.errors,
        ),
        (
            "drover_agent_inference_rejected_total",
            "Inferences refused for bad inputs.",
            &t.client_errors,
        ),
        (
            "drover_agent_model_swaps_total",
            "Active model swaps.",
            &t.swaps,
        ),
        (
            "drover_agent_samples_kept_total",
            "Sampled inputs kept for retraining (sent as samples).",
            &t.samples_kept,
        ),
        (
            "drover_agent_spool_dropped_total",
            "Uplink records the spool dropped: evicted when full or not writable.",
            &t.spool_dropped,
        ),
        (
            "drover_agent_state_write_failures_total",
            "Failed writes of the agent's state file (commands are not acted on meanwhile).",
            &t.state_write_failures,
        ),
        (
            "drover_agent_store_collected_bytes_total",
            "Bytes of superseded model files and partial downloads collected.",
            &t.store_collected_bytes,
        ),
        (
            "drover_agent_shadow_compared_total",
            "Inferences the shadow candidate ran beside the active model.",
            &t.shadow_compared,
        ),
        (
            "drover_agent_shadow_agreed_total",
            "Shadow comparisons where the candidate agreed with the active model.",
            &t.shadow_agreed,
        ),
        (
            "drover_agent_shadow_candidate_errors_total",
            "Shadow runs that failed in the candidate.",
            &t.shadow_candidate_errors,
        ),
        (
            "drover_agent_self_tests_total",
            "Self-tests run on a model against its manifest's test vectors.",
            &t.self_tests,
        ),
        (
            "drover_agent_requests_too_large_total",
            "Inference requests refused for a body over the limit (413).",
            &s.refused.too_large,
        ),
        (
            "drover_agent_requests_busy_total",
            "Inference requests refused because requests in flight held the byte budget (503).",
            &s.refused.busy,
        ),
    ] {
        prom::single(o, name, "counter", help, n(v));
    }
}

fn gauges(o: &mut String, s: &Shared) {
    let t = &s.serving.totals;
    let n = |v: &std::sync::atomic::AtomicU64| v.load(Relaxed) as f64;
    for (name, help, v) in [
        (
            "drover_agent_disk_full",
            "1 while the last state write failed (a full disk), else 0.",
            n(&t.disk_full),
        ),
        (
            "drover_agent_broker_connected",
            "1 while the MQTT session to the broker is up, else 0.",
            n(&t.broker_connected),
        ),
        (
            "drover_agent_spool_bytes",
            "Bytes the uplink spool holds on disk (records not yet acknowledged).",
            n(&t.spool_bytes),
        ),
        (
            "drover_agent_download_chunks_verified",
            "Chunks of the model being downloaded that are verified on disk (0 when none is).",
            n(&t.download_chunks_verified),
        ),
        (
            "drover_agent_download_chunks",
            "Chunks of the model being downloaded (0 when none is).",
            n(&t.download_chunks),
        ),
        (
            "drover_agent_self_test_seconds",
            "Run time of the last self-test.",
            t.last_self_test_seconds(),
        ),
        (
            "drover_agent_request_bytes_in_flight",
            "Request body bytes reserved by inference requests being handled.",
            (MAX_IN_FLIGHT_BYTES - s.in_flight.available_permits()) as f64,
        ),
        (
            "drover_agent_model_loaded",
            "1 when a model is serving.",
            f64::from(u8::from(s.serving.any_active())),
        ),
    ] {
        prom::single(o, name, "gauge", help, v);
    }
}
