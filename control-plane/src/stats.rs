//! Small statistics the training gate (and accuracy monitoring) decide with: the normal
//! quantile, Wilson score intervals for an accuracy, and a one-sided confidence bound on
//! the accuracy difference of two models scored on the same rows. Pure; checked against
//! scipy in `tests/gate_fixture.rs` (`tests/fixtures/gate/make_fixture.py`).

/// The standard normal quantile (inverse CDF) at `p` in (0, 1), by Acklam's rational
/// approximation (relative error below 1.2e-9, far below what a gate decides on).
pub fn normal_quantile(p: f64) -> f64 {
    if !(p > 0.0 && p < 1.0) {
        return if p <= 0.0 {
            f64::NEG_INFINITY
        } else {
            f64::INFINITY
        };
    }
    const A: [f64; 6] = [
        -3.969_683_028_665_376e1,
        2.209_460_984_245_205e2,
        -2.759_285_104_469_687e2,
        1.383_577_518_672_69e2,
        -3.066_479_806_614_716e1,
        2.506_628_277_459_239,
    ];
    const B: [f64; 5] = [
        -5.447_609_879_822_406e1,
        1.615_858_368_580_409e2,
        -1.556_989_798_598_866e2,
        6.680_131_188_771_972e1,
        -1.328_068_155_288_572e1,
    ];
    const C: [f64; 6] = [
        -7.784_894_002_430_293e-3,
        -3.223_964_580_411_365e-1,
        -2.400_758_277_161_838,
        -2.549_732_539_343_734,
        4.374_664_141_464_968,
        2.938_163_982_698_783,
    ];
    const D: [f64; 4] = [
        7.784_695_709_041_462e-3,
        3.224_671_290_700_398e-1,
        2.445_134_137_142_996,
        3.754_408_661_907_416,
    ];
    let tail = |q: f64| {
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    if p < 0.02425 {
        tail((-2.0 * p.ln()).sqrt())
    } else if p > 1.0 - 0.02425 {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    } else {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    }
}

/// The two-sided Wilson score interval of `successes` out of `n` at `confidence` (for
/// example 0.95), as `(low, high)`; `(0, 1)` when `n` is 0.
pub fn wilson(successes: u64, n: u64, confidence: f64) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let z = normal_quantile(0.5 + confidence / 2.0);
    let (k, n) = (successes.min(n) as f64, n as f64);
    let p = k / n;
    let z2 = z * z;
    let centre = (p + z2 / (2.0 * n)) / (1.0 + z2 / n);
    let half = z / (1.0 + z2 / n) * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
    ((centre - half).max(0.0), (centre + half).min(1.0))
}

/// Two models scored on the same rows: the mean of `a_i - b_i` (1 right, 0 wrong) and its
/// one-sided lower confidence bound (normal approximation of the paired difference), so
/// "a beats b by at least m with 95 % confidence" is `bound >= m`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PairedDifference {
    pub rows: u64,
    pub mean: f64,
    pub lower_bound: f64,
}

/// See [`PairedDifference`]. Rows where both agree add 0 with no variance; with no
/// disagreement at all the bound is the mean (0). `None` without rows.
pub fn paired_difference(a: &[bool], b: &[bool], confidence: f64) -> Option<PairedDifference> {
    let n = a.len().min(b.len());
    if n == 0 {
        return None;
    }
    let d: Vec<f64> = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(u8::from(*x)) - f64::from(u8::from(*y)))
        .collect();
    let nf = n as f64;
    let mean = d.iter().sum::<f64>() / nf;
    let var = if n > 1 {
        d.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (nf - 1.0)
    } else {
        0.0
    };
    let z = normal_quantile(confidence);
    Some(PairedDifference {
        rows: n as u64,
        mean,
        lower_bound: mean - z * (var / nf).sqrt(),
    })
}
