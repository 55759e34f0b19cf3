//! How many threads one inference may use (`runtime.threads` in the agent's config).
//!
//! tract runs a model on one thread unless its plan names an executor; with one, its
//! matrix products and large element-wise kernels split their work over a rayon pool
//! (results are bit-identical to the single-threaded run: work is split on row and
//! block boundaries only). Pools are shared by thread count, so loading a model many
//! times (self-tests, hot swaps) never creates a pool per load.

use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};

use tract_linalg::multithread::Executor;

/// The most threads `Threads::Auto` picks: beyond this, the small models edge devices run
/// gain little and the serving threads lose their cores.
pub const AUTO_MAX_THREADS: usize = 4;

/// Threads per inference.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Threads {
    /// One thread: what the control plane uses (publish checks, the training gate), so
    /// it never competes with its own HTTP and broker threads.
    #[default]
    One,
    /// This many threads (1 is the same as `One`).
    Fixed(usize),
    /// The machine's available cores, at most [`AUTO_MAX_THREADS`].
    Auto,
}

impl Threads {
    /// From a config value: 0 means auto.
    pub fn from_config(n: usize) -> Threads {
        match n {
            0 => Threads::Auto,
            1 => Threads::One,
            n => Threads::Fixed(n),
        }
    }

    /// The thread count this resolves to on this machine.
    pub fn count(self) -> usize {
        match self {
            Threads::One => 1,
            Threads::Fixed(n) => n.max(1),
            Threads::Auto => std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
                .min(AUTO_MAX_THREADS),
        }
    }

    /// The executor a plan runs on, `None` for one thread (tract's inline path).
    pub(crate) fn executor(self) -> Option<Executor> {
        let n = self.count();
        if n <= 1 {
            return None;
        }
        static POOLS: OnceLock<Mutex<BTreeMap<usize, Executor>>> = OnceLock::new();
        let mut pools = POOLS
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        Some(
            pools
                .entry(n)
                .or_insert_with(|| Executor::multithread_with_name(n, "drover-infer"))
                .clone(),
        )
    }
}

#[cfg(all(test, feature = "onnx"))]
mod tests {
    use super::*;
    use crate::graph::{model_bytes, node, tensor_f32, value_info, GraphDim};
    use crate::Model;
    use drover_protocol::manifest::{TensorData, TensorValue};
    use tract_onnx::pb::{self, tensor_proto::DataType};

    const K: usize = 384;

    /// `y = x · w` with a K×K weight: large enough for tract to split its work.
    fn matmul_model() -> Vec<u8> {
        let w: Vec<f32> = (0..K * K)
            .map(|i| ((i % 97) as f32 - 48.0) / 97.0)
            .collect();
        let graph = pb::GraphProto {
            name: "mm".into(),
            node: vec![node("MatMul", &["x", "w"], "y")],
            initializer: vec![tensor_f32("w", vec![K as i64, K as i64], w)],
            input: vec![value_info(
                "x",
                DataType::Float,
                &[GraphDim::Fixed(K as i64), GraphDim::Fixed(K as i64)],
            )],
            output: vec![value_info(
                "y",
                DataType::Float,
                &[GraphDim::Fixed(K as i64), GraphDim::Fixed(K as i64)],
            )],
            ..Default::default()
        };
        model_bytes(graph, "threads-test", "0")
    }

    fn input() -> TensorValue {
        TensorValue {
            name: "x".into(),
            shape: vec![K as u64, K as u64],
            data: TensorData::F32((0..K * K).map(|i| ((i % 13) as f32) / 13.0).collect()),
        }
    }

    /// CPU clock ticks spent so far by this process's `drover-infer-*` pool threads.
    fn pool_ticks() -> u64 {
        let mut ticks = 0;
        for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            if !comm.starts_with("drover-infer") {
                continue;
            }
            let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
            // Fields after the command's closing parenthesis: utime is the 12th, stime the 13th.
            let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
            let f: Vec<&str> = rest.split_whitespace().collect();
            ticks += f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            ticks += f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        }
        ticks
    }

    #[test]
    fn config_values_resolve() {
        assert_eq!(Threads::from_config(0), Threads::Auto);
        assert_eq!(Threads::from_config(1), Threads::One);
        assert_eq!(Threads::from_config(3).count(), 3);
        assert!((1..=AUTO_MAX_THREADS).contains(&Threads::Auto.count()));
        assert!(Threads::One.executor().is_none());
    }

    #[test]
    fn threaded_inference_runs_on_the_pool_with_the_same_outputs() {
        let bytes = matmul_model();
        let one = Model::load(&bytes).unwrap();
        let two = Model::load_with(&bytes, Threads::Fixed(2)).unwrap();
        assert_eq!((one.threads(), two.threads()), (1, 2));
        let want = one.run(&[input()]).unwrap();
        // Single-threaded runs leave the pool idle.
        let before = pool_ticks();
        for _ in 0..5 {
            one.run(&[input()]).unwrap();
        }
        let idle = pool_ticks() - before;
        let mut got = Vec::new();
        for _ in 0..20 {
            got = two.run(&[input()]).unwrap();
        }
        let busy = pool_ticks() - before - idle;
        // Work is split on row and block boundaries: the same bits as one thread.
        assert_eq!(got, want);
        assert!(
            busy > 0,
            "the 2-thread model never ran on its pool (pool ticks {busy}, idle {idle})"
        );
    }
}
