//! `drover-agent`: the Drover edge agent.
//!
//! Layout:
//! - [`config`]: the human-edited TOML config, layered and validated.
//! - The model runtime (tract-onnx load, inference, self-test, the `ai.onnx.ml`
//!   operators) is the `drover-runtime` crate, shared with the control plane.
//! - [`serving`]: per model name, the active and shadow models behind an atomic swap, and
//!   the per-window monitoring counters.
//! - [`api`]: the local KServe v2 inference API (axum, loopback).
//! - [`mqtt`]: the only module touching rumqttc; its poll loop runs alone in a task.
//! - [`machine`]: the deployment state machine, free of I/O (`handle(input, now_ms)`
//!   returns effects): commands, downloads, install, activation, probation, rollback,
//!   promote, uplink sealing. The fleet simulator drives the same machine.
//! - [`core`]: one thread that drives the machine and executes its effects against the
//!   disk, tract, the served models and MQTT; spool replay and telemetry windows.
//! - [`boot`]: the state loaded (migrated) and every slot's last good model served.
//! - [`state`], [`download`], [`spool`]: the crash-safe on-disk store (writes through
//!   `drover_host::fs`); `state` owns the on-disk form of the machine's record.
//! - [`isolate`]: new models loaded and self-tested in a short-lived child process (the
//!   hidden `check-model` mode) with memory and time limits before they load here.
//! - [`store`]: the model store's collection (keeps what the record names) and the
//!   free-space check before a download.
//! - [`telemetry`]: system facts. Crash points for the SIGKILL tests: `drover_host::crash`.
//!
//! Architecture invariant: inference never waits on the core thread or the MQTT session;
//! nothing decoded from the network can panic.

pub mod api;
pub mod boot;
pub mod capture;
pub mod config;
pub mod core;
pub mod download;
pub mod isolate;
pub mod machine;
pub mod mqtt;
pub mod serving;
pub mod spool;
pub mod state;
pub mod store;
pub mod telemetry;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use thiserror::Error;
use tokio::sync::watch;

pub use crate::config::AgentConfig;
pub use crate::core::Tuning;
use crate::serving::Serving;

#[derive(Debug, Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Boot(#[from] core::BootError),
    #[error(transparent)]
    Mqtt(#[from] mqtt::MqttError),
    #[error("cannot bind the inference API on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(
        "cannot bind the metrics listener on {addr}: {source} (set metrics_addr to a free port)"
    )]
    BindMetrics {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Loader(String),
    #[error("agent task failed: {0}")]
    Task(String),
}

/// A running agent.
pub struct Agent {
    api_addr: SocketAddr,
    metrics_addr: SocketAddr,
    serving: Arc<Serving>,
    stop: Arc<AtomicBool>,
    shutdown_tx: watch::Sender<bool>,
    core: Option<std::thread::JoinHandle<()>>,
    server: tokio::task::JoinHandle<()>,
    metrics_server: tokio::task::JoinHandle<()>,
}

impl Agent {
    /// Where the local inference API listens.
    pub fn api_addr(&self) -> SocketAddr {
        self.api_addr
    }

    /// Where the Prometheus `/metrics` listener listens.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    /// The models being served (for in-process tests and benchmarks).
    pub fn serving(&self) -> Arc<Serving> {
        self.serving.clone()
    }

    /// Asks the agent to stop (as the shutdown future does).
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.shutdown_tx.send(true);
    }

    /// Waits until the agent has stopped (after the shutdown future completed or
    /// [`Agent::shutdown`] was called).
    pub async fn wait(mut self) -> Result<(), AgentError> {
        let mut rx = self.shutdown_tx.subscribe();
        let _ = rx.wait_for(|v| *v).await;
        self.stop.store(true, Ordering::SeqCst);
        if let Some(core) = self.core.take() {
            tokio::task::spawn_blocking(move || core.join())
                .await
                .map_err(|e| AgentError::Task(e.to_string()))?
                .map_err(|_| AgentError::Task("core thread panicked".into()))?;
        }
        (&mut self.server)
            .await
            .map_err(|e| AgentError::Task(e.to_string()))?;
        (&mut self.metrics_server)
            .await
            .map_err(|e| AgentError::Task(e.to_string()))?;
        Ok(())
    }
}

/// Starts the agent: boots the store (serving the last good model), binds the API,
/// connects to the broker. Returns once everything is started; `shutdown` stops it.
pub async fn run<F>(config: AgentConfig, shutdown: F) -> Result<Agent, AgentError>
where
    F: Future<Output = ()> + Send + 'static,
{
    run_with(config, Tuning::default(), shutdown).await
}

/// As [`run`], with test knobs.
pub async fn run_with<F>(
    config: AgentConfig,
    tuning: Tuning,
    shutdown: F,
) -> Result<Agent, AgentError>
where
    F: Future<Output = ()> + Send + 'static,
{
    let cfg = config.validate()?;
    let loader = isolate::Loader::resolve(&cfg.raw.runtime, tuning.loader_crash_at.clone())
        .map_err(AgentError::Loader)?;
    let serving = Arc::new(Serving::new(cfg.raw.telemetry.sample_rate_ppm));
    serving.set_capture(cfg.raw.capture.clone());
    let booted = {
        let cfg = cfg.clone();
        let serving = serving.clone();
        tokio::task::spawn_blocking(move || core::boot(&cfg, &serving))
            .await
            .map_err(|e| AgentError::Task(e.to_string()))??
    };
    let listener = tokio::net::TcpListener::bind(cfg.api_addr)
        .await
        .map_err(|source| AgentError::Bind {
            addr: cfg.api_addr,
            source,
        })?;
    let api_addr = listener.local_addr().map_err(|source| AgentError::Bind {
        addr: cfg.api_addr,
        source,
    })?;
    let metrics_listener = tokio::net::TcpListener::bind(cfg.metrics_addr)
        .await
        .map_err(|source| AgentError::BindMetrics {
            addr: cfg.metrics_addr,
            source,
        })?;
    let metrics_addr = metrics_listener
        .local_addr()
        .map_err(|source| AgentError::BindMetrics {
            addr: cfg.metrics_addr,
            source,
        })?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let stop = Arc::new(AtomicBool::new(false));

    let (app, metrics_app) = api::routers(api::ApiState {
        serving: serving.clone(),
    });
    let server = serve_http(listener, app, shutdown_rx.clone(), "inference API");
    let metrics_server = serve_http(
        metrics_listener,
        metrics_app,
        shutdown_rx.clone(),
        "metrics listener",
    );

    let (in_tx, in_rx) = std::sync::mpsc::channel();
    let will: mqtt::WillSlot = Arc::new(Mutex::new((String::new(), Vec::new())));
    let (out_tx, out_rx) = tokio::sync::mpsc::unbounded_channel();
    // The core is built first: it seals the last will the session needs to connect.
    let core = core::Core::new(
        cfg.clone(),
        booted,
        serving.clone(),
        out_tx,
        will.clone(),
        tuning,
        loader,
    );
    mqtt::start(&cfg, will, in_tx, out_rx, shutdown_rx.clone())?;
    let core_stop = stop.clone();
    let core = std::thread::Builder::new()
        .name("drover-core".into())
        .spawn(move || core.run(in_rx, core_stop))
        .map_err(|e| AgentError::Task(e.to_string()))?;

    let (tx, st) = (shutdown_tx.clone(), stop.clone());
    tokio::spawn(async move {
        shutdown.await;
        st.store(true, Ordering::SeqCst);
        let _ = tx.send(true);
    });
    tracing::info!(device_id = %cfg.device_id, api = %api_addr, metrics = %metrics_addr, "agent started");
    Ok(Agent {
        api_addr,
        metrics_addr,
        metrics_server,
        serving,
        stop,
        shutdown_tx,
        core: Some(core),
        server,
    })
}

/// Serves `app` on `listener` until the shutdown signal.
fn serve_http(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    mut shutdown: watch::Receiver<bool>,
    what: &'static str,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let graceful = async move {
            let _ = shutdown.wait_for(|v| *v).await;
        };
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(graceful)
            .await
        {
            tracing::error!(error = %e, "{what} stopped");
        }
    })
}
