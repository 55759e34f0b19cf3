//! The built-in trainer: multinomial logistic regression on standardized features,
//! exported as a real ONNX graph (`Sub → Mul → MatMul → Add → Softmax`) that tract, and
//! any other ONNX runtime, runs. It lets the embedded default close the training loop
//! with nothing installed but Rust; datacenter jobs use any command that writes
//! `model.onnx` (see the training executors).

use thiserror::Error;
use tract_onnx::pb;

#[derive(Debug, Error, PartialEq)]
pub enum TrainError {
    #[error("the dataset is empty")]
    Empty,
    #[error("row {row} has {got} features, expected {expected}")]
    Ragged {
        row: usize,
        got: usize,
        expected: usize,
    },
    #[error("row {row} has a non-finite feature value")]
    NonFinite { row: usize },
    #[error("labels must be 0..{classes}; row {row} has {label}")]
    BadLabel {
        row: usize,
        label: u32,
        classes: u32,
    },
    #[error("need at least two classes in the labels, found {0}")]
    OneClass(u32),
}

/// Rows of features with a class label each.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Dataset {
    pub features: Vec<Vec<f32>>,
    pub labels: Vec<u32>,
}

#[derive(Clone, Debug)]
pub struct TrainParams {
    pub epochs: u32,
    pub learning_rate: f32,
    pub l2: f32,
}

impl Default for TrainParams {
    fn default() -> Self {
        Self {
            epochs: 300,
            learning_rate: 0.5,
            l2: 1e-4,
        }
    }
}

/// A trained model: parameters plus the ONNX bytes that compute the same thing.
#[derive(Clone, Debug)]
pub struct LogReg {
    pub mean: Vec<f32>,
    pub inv_std: Vec<f32>,
    /// Row-major `[features, classes]`.
    pub weights: Vec<f32>,
    pub bias: Vec<f32>,
    pub classes: usize,
}

impl LogReg {
    pub fn features(&self) -> usize {
        self.mean.len()
    }

    /// Class probabilities for one row (softmax of the logits).
    pub fn predict_proba(&self, x: &[f32]) -> Vec<f32> {
        let mut z = self.bias.clone();
        let rows = self.weights.chunks(self.classes.max(1));
        for (((&xj, &mu), &is), row) in x.iter().zip(&self.mean).zip(&self.inv_std).zip(rows) {
            let xs = (xj - mu) * is;
            for (zc, w) in z.iter_mut().zip(row) {
                *zc += xs * w;
            }
        }
        softmax(&mut z);
        z
    }

    pub fn predict(&self, x: &[f32]) -> u32 {
        argmax(&self.predict_proba(x))
    }

    /// Fraction of rows predicted right.
    pub fn accuracy(&self, d: &Dataset) -> f64 {
        if d.labels.is_empty() {
            return 0.0;
        }
        let right = d
            .features
            .iter()
            .zip(&d.labels)
            .filter(|(x, &y)| self.predict(x) == y)
            .count();
        right as f64 / d.labels.len() as f64
    }

    /// The model as ONNX (opset 13): input `x` `[N, F]` f32, output `probabilities`
    /// `[N, C]` f32.
    pub fn to_onnx(&self) -> Vec<u8> {
        let f = self.features() as i64;
        let c = self.classes as i64;
        use drover_runtime::graph::{
            attr_int, model_bytes, node, tensor_f32, value_info, DataType, GraphDim,
        };
        let mut softmax = node("Softmax", &["logits"], "probabilities");
        softmax.attribute.push(attr_int("axis", 1));
        let graph = pb::GraphProto {
            name: "drover_logreg".into(),
            node: vec![
                node("Sub", &["x", "mean"], "centered"),
                node("Mul", &["centered", "inv_std"], "scaled"),
                node("MatMul", &["scaled", "weights"], "z"),
                node("Add", &["z", "bias"], "logits"),
                softmax,
            ],
            initializer: vec![
                tensor_f32("mean", vec![f], self.mean.clone()),
                tensor_f32("inv_std", vec![f], self.inv_std.clone()),
                tensor_f32("weights", vec![f, c], self.weights.clone()),
                tensor_f32("bias", vec![c], self.bias.clone()),
            ],
            input: vec![value_info(
                "x",
                DataType::Float,
                &[GraphDim::batch(), GraphDim::Fixed(f)],
            )],
            output: vec![value_info(
                "probabilities",
                DataType::Float,
                &[GraphDim::batch(), GraphDim::Fixed(c)],
            )],
            ..Default::default()
        };
        model_bytes(graph, "drover-trainer", env!("CARGO_PKG_VERSION"))
    }
}

fn softmax(z: &mut [f32]) {
    let m = z.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let mut s = 0.0;
    for v in z.iter_mut() {
        *v = (*v - m).exp();
        s += *v;
    }
    for v in z.iter_mut() {
        *v /= s;
    }
}

pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Checks a dataset and returns (features, classes).
pub fn check(d: &Dataset) -> Result<(usize, usize), TrainError> {
    let first = d.features.first().ok_or(TrainError::Empty)?;
    let f = first.len();
    if f == 0 || d.labels.len() != d.features.len() {
        return Err(TrainError::Empty);
    }
    for (row, x) in d.features.iter().enumerate() {
        if x.len() != f {
            return Err(TrainError::Ragged {
                row,
                got: x.len(),
                expected: f,
            });
        }
        if x.iter().any(|v| !v.is_finite()) {
            return Err(TrainError::NonFinite { row });
        }
    }
    let classes = d.labels.iter().copied().max().unwrap_or(0) + 1;
    if classes < 2 {
        return Err(TrainError::OneClass(classes));
    }
    Ok((f, classes as usize))
}

/// Full-batch gradient descent on the cross-entropy with L2 regularisation.
/// Deterministic: the same data and parameters give the same model.
pub fn train(d: &Dataset, p: &TrainParams) -> Result<LogReg, TrainError> {
    let (f, c) = check(d)?;
    let n = d.features.len() as f32;
    let mut mean = vec![0f32; f];
    for x in &d.features {
        for j in 0..f {
            mean[j] += x[j] / n;
        }
    }
    let mut var = vec![0f32; f];
    for x in &d.features {
        for j in 0..f {
            var[j] += (x[j] - mean[j]).powi(2) / n;
        }
    }
    let inv_std: Vec<f32> = var.iter().map(|v| 1.0 / v.sqrt().max(1e-6)).collect();
    let mut m = LogReg {
        mean,
        inv_std,
        weights: vec![0.0; f * c],
        bias: vec![0.0; c],
        classes: c,
    };
    let scaled: Vec<Vec<f32>> = d
        .features
        .iter()
        .map(|x| (0..f).map(|j| (x[j] - m.mean[j]) * m.inv_std[j]).collect())
        .collect();
    let mut gw = vec![0f32; f * c];
    let mut gb = vec![0f32; c];
    let mut z = vec![0f32; c];
    for _ in 0..p.epochs {
        gw.iter_mut().for_each(|g| *g = 0.0);
        gb.iter_mut().for_each(|g| *g = 0.0);
        for (xs, &y) in scaled.iter().zip(&d.labels) {
            z.copy_from_slice(&m.bias);
            for (&xj, row) in xs.iter().zip(m.weights.chunks(c)) {
                for (zk, w) in z.iter_mut().zip(row) {
                    *zk += xj * w;
                }
            }
            softmax(&mut z);
            for (k, &pk) in z.iter().enumerate() {
                let err = pk - if k as u32 == y { 1.0 } else { 0.0 };
                gb[k] += err / n;
                for (&xj, grow) in xs.iter().zip(gw.chunks_mut(c)) {
                    grow[k] += err * xj / n;
                }
            }
        }
        for (w, g) in m.weights.iter_mut().zip(&gw) {
            *w -= p.learning_rate * (g + p.l2 * *w);
        }
        for (b, g) in m.bias.iter_mut().zip(&gb) {
            *b -= p.learning_rate * g;
        }
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::prelude::*;

    fn blobs() -> Dataset {
        // Two well-separated classes on a deterministic grid.
        let mut d = Dataset::default();
        for i in 0..200u32 {
            let t = i as f32 / 200.0;
            let class = i % 2;
            let off = if class == 1 { 3.0 } else { 0.0 };
            d.features
                .push(vec![off + t, 10.0 * (off + (1.0 - t)), 0.5]);
            d.labels.push(class);
        }
        d
    }

    #[test]
    fn learns_separable_data() {
        let m = train(&blobs(), &TrainParams::default()).unwrap();
        assert!(m.accuracy(&blobs()) > 0.99, "{}", m.accuracy(&blobs()));
    }

    #[test]
    fn onnx_export_runs_in_tract_with_the_same_outputs() {
        let d = blobs();
        let m = train(&d, &TrainParams::default()).unwrap();
        let bytes = m.to_onnx();
        let model = tract_onnx::onnx()
            .model_for_read(&mut bytes.as_slice())
            .unwrap()
            .into_optimized()
            .unwrap()
            .into_runnable()
            .unwrap();
        let rows = 5;
        let flat: Vec<f32> = d.features[..rows].iter().flatten().copied().collect();
        let x = tract_ndarray::Array2::from_shape_vec((rows, 3), flat).unwrap();
        let out = model.run(tvec!(Tensor::from(x).into())).unwrap();
        let probs = out[0].to_plain_array_view::<f32>().unwrap();
        for r in 0..rows {
            let want = m.predict_proba(&d.features[r]);
            for k in 0..2 {
                assert!((probs[[r, k]] - want[k]).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn bad_datasets_are_refused_with_the_reason() {
        assert_eq!(
            train(&Dataset::default(), &TrainParams::default()).unwrap_err(),
            TrainError::Empty
        );
        let d = Dataset {
            features: vec![vec![1.0, 2.0], vec![1.0]],
            labels: vec![0, 1],
        };
        assert_eq!(
            check(&d).unwrap_err(),
            TrainError::Ragged {
                row: 1,
                got: 1,
                expected: 2
            }
        );
        let d = Dataset {
            features: vec![vec![f32::NAN], vec![1.0]],
            labels: vec![0, 1],
        };
        assert_eq!(check(&d).unwrap_err(), TrainError::NonFinite { row: 0 });
        let d = Dataset {
            features: vec![vec![0.0], vec![1.0]],
            labels: vec![0, 0],
        };
        assert_eq!(check(&d).unwrap_err(), TrainError::OneClass(1));
    }
}
