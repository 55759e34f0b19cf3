//! Sampled self-test vectors (issue 16): generated inputs, outputs compared at sampled
//! positions within a tolerance relative to each output's scale. Made at publish by the
//! registry ([`sampled_vector`]) and checked on the device ([`self_test_sampled`]), with
//! the same code, so both sides agree on what passes.

use drover_protocol::manifest::{
    pattern, PatternInput, SampledOutput, SampledVector, TensorData, TensorValue,
};

use crate::model::{Model, RuntimeError};

/// At most this many values are kept per output.
pub const MAX_SAMPLED_VALUES: u64 = 4096;
/// Default relative tolerance: outputs may differ by 0.1 % of their largest magnitude
/// (tract's kernels differ between CPUs in summation order, never by more on real models).
pub const DEFAULT_RTOL: f32 = 1e-3;
/// Absolute floor, for outputs that are all (nearly) zero.
pub const DEFAULT_ATOL: f32 = 1e-5;

/// Materializes the generated inputs; `None` when a dtype cannot be generated.
pub fn pattern_inputs(inputs: &[PatternInput]) -> Option<Vec<TensorValue>> {
    inputs
        .iter()
        .map(|p| {
            let n = p.shape.iter().try_fold(1u64, |a, d| a.checked_mul(*d))?;
            Some(TensorValue {
                name: p.name.clone(),
                shape: p.shape.clone(),
                data: pattern(p.dtype, n, p.seed)?,
            })
        })
        .collect()
}

fn as_f64(d: &TensorData) -> Vec<f64> {
    match d {
        TensorData::F32(v) => v.iter().map(|x| f64::from(*x)).collect(),
        TensorData::I64(v) => v.iter().map(|x| *x as f64).collect(),
    }
}

/// The sampled form of one full output.
pub fn sample_output(out: &TensorValue, rtol: f32, atol: f32) -> SampledOutput {
    let all = as_f64(&out.data);
    let n = all.len() as u64;
    let stride = n.div_ceil(MAX_SAMPLED_VALUES).max(1);
    let scale = all
        .iter()
        .filter(|v| v.is_finite())
        .fold(0f64, |m, v| m.max(v.abs()));
    SampledOutput {
        name: out.name.clone(),
        shape: out.shape.clone(),
        stride,
        values: all
            .iter()
            .step_by(stride as usize)
            .map(|v| *v as f32)
            .collect(),
        scale: scale as f32,
        rtol,
        atol,
    }
}

/// Runs `inputs` (generated from `seeds`) through the model and records the sampled outputs.
pub fn sampled_vector(
    model: &Model,
    inputs: Vec<PatternInput>,
) -> Result<Option<SampledVector>, RuntimeError> {
    let Some(values) = pattern_inputs(&inputs) else {
        return Ok(None);
    };
    let outputs = model.run(&values)?;
    Ok(Some(SampledVector {
        inputs,
        outputs: outputs
            .iter()
            .map(|o| sample_output(o, DEFAULT_RTOL, DEFAULT_ATOL))
            .collect(),
    }))
}

/// Checks one output against its samples.
pub fn compare_sampled(got: &TensorValue, want: &SampledOutput) -> Result<(), String> {
    if got.shape != want.shape {
        return Err(format!(
            "output {:?} shape {:?}, expected {:?}",
            want.name, got.shape, want.shape
        ));
    }
    let g = as_f64(&got.data);
    let stride = want.stride.max(1) as usize;
    let expected = g.len().div_ceil(stride);
    if want.values.len() != expected {
        return Err(format!(
            "output {:?}: {} samples for {} elements at stride {stride}",
            want.name,
            want.values.len(),
            g.len()
        ));
    }
    let tol = f64::from(want.atol) + f64::from(want.rtol) * f64::from(want.scale);
    for (k, (a, b)) in g.iter().step_by(stride).zip(&want.values).enumerate() {
        let b = f64::from(*b);
        if !((a - b).abs() <= tol || (a.is_nan() && b.is_nan())) {
            return Err(format!(
                "output {:?} element {} is {a}, expected {b} (tolerance {tol:.3e} = {} + {} × scale {})",
                want.name,
                k * stride,
                want.atol,
                want.rtol,
                want.scale
            ));
        }
    }
    Ok(())
}

/// Runs every sampled vector; the first mismatch names the vector, output and element.
pub fn self_test_sampled(model: &Model, vectors: &[SampledVector]) -> Result<(), RuntimeError> {
    for (vi, v) in vectors.iter().enumerate() {
        let fail = |detail: String| RuntimeError::SelfTest { vector: vi, detail };
        let inputs = pattern_inputs(&v.inputs)
            .ok_or_else(|| fail("an input cannot be generated (string dtype)".into()))?;
        let got = model.run(&inputs).map_err(|e| fail(e.to_string()))?;
        for want in &v.outputs {
            let g = got
                .iter()
                .find(|g| g.name == want.name)
                .ok_or_else(|| fail(format!("model has no output {:?}", want.name)))?;
            compare_sampled(g, want).map_err(fail)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(v: Vec<f32>) -> TensorValue {
        TensorValue {
            name: "y".into(),
            shape: vec![v.len() as u64],
            data: TensorData::F32(v),
        }
    }

    #[test]
    fn tolerance_follows_each_outputs_scale_and_samples_are_bounded() {
        let big: Vec<f32> = (0..100_000).map(|i| i as f32).collect();
        let s = sample_output(&out(big.clone()), 1e-3, 0.0);
        assert_eq!(s.stride, 25);
        assert_eq!(s.values.len(), 4000);
        assert_eq!(s.scale, 99_999.0);
        // 0.1 % of 99,999 is about 100: an error of 50 passes, 150 does not.
        let mut near = big.clone();
        near[250] += 50.0;
        assert_eq!(compare_sampled(&out(near), &s), Ok(()));
        let mut far = big;
        far[250] += 150.0;
        let e = compare_sampled(&out(far), &s).unwrap_err();
        assert!(e.contains("element 250"), "{e}");
        // A small-scale output gets a small tolerance.
        let small = sample_output(&out(vec![0.001, 0.002]), 1e-3, 0.0);
        assert!(compare_sampled(&out(vec![0.001, 0.0021]), &small).is_err());
        assert_eq!(compare_sampled(&out(vec![0.001, 0.002]), &small), Ok(()));
    }
}
