//! The demo's predictive-maintenance world: pumps on a production line report vibration,
//! temperature, motor current and speed; some fail soon after. Plant B retrofits its line
//! with high-speed pumps halfway through the demo: they run faster, vibrate and heat more
//! in normal operation, and are rated for it. A model that only ever saw standard pumps
//! reads their normal vibration as wear and raises false alarms; a model retrained on the
//! fleet's labelled samples learns that the rated vibration grows with speed.

use rand::rngs::StdRng;
use rand::Rng;

pub const FEATURES: [&str; 4] = ["vibration_rms", "temperature_c", "current_a", "rpm"];

/// The two kinds of line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Line {
    Standard,
    HighSpeed,
}

struct Rating {
    rpm: f64,
    vibration: f64,
    temperature: f64,
    current: f64,
}

impl Line {
    fn rating(self) -> Rating {
        match self {
            Line::Standard => Rating {
                rpm: 1500.0,
                vibration: 3.0,
                temperature: 68.0,
                current: 12.0,
            },
            Line::HighSpeed => Rating {
                rpm: 2400.0,
                vibration: 4.2,
                temperature: 77.0,
                current: 14.5,
            },
        }
    }
}

/// A standard normal draw (Box–Muller).
fn normal(rng: &mut StdRng, mean: f64, sd: f64) -> f64 {
    let u1: f64 = rng.gen_range(f64::EPSILON..1.0);
    let u2: f64 = rng.gen();
    mean + sd * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// One reading from a pump on `line`, and whether it failed within the horizon.
pub fn reading(rng: &mut StdRng, line: Line) -> (Vec<f32>, u32) {
    let r = line.rating();
    // Hidden wear: worn pumps vibrate, heat and draw current above their rating.
    let wear = normal(rng, 0.0, 1.0);
    let rpm = normal(rng, r.rpm, 60.0);
    let vibration = r.vibration - 0.8 + 0.8 * wear + normal(rng, 0.0, 0.15);
    let temperature = r.temperature - 6.0 + 2.5 * wear + normal(rng, 0.0, 3.0);
    let current = r.current + 0.4 * wear + normal(rng, 0.0, 1.0);
    let z = 3.5 * (vibration - r.vibration) + 0.25 * (temperature - r.temperature);
    let p = 1.0 / (1.0 + (-z).exp());
    let failed = u32::from(rng.gen::<f64>() < p);
    (
        vec![
            vibration as f32,
            temperature as f32,
            current as f32,
            rpm as f32,
        ],
        failed,
    )
}

/// `rows` labelled readings of standard pumps, as CSV with a `label` column.
pub fn history_csv(rng: &mut StdRng, rows: usize) -> String {
    let mut s = FEATURES.join(",");
    s.push_str(",label\n");
    for _ in 0..rows {
        let (x, y) = reading(rng, Line::Standard);
        let cells: Vec<String> = x.iter().map(|v| format!("{v:.4}")).collect();
        s.push_str(&cells.join(","));
        s.push_str(&format!(",{y}\n"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn rate(line: Line) -> f64 {
        let mut rng = StdRng::seed_from_u64(1);
        let n = 20_000;
        let failed: u32 = (0..n).map(|_| reading(&mut rng, line).1).sum();
        f64::from(failed) / f64::from(n)
    }

    #[test]
    fn both_lines_fail_at_a_similar_minority_rate() {
        let (a, b) = (rate(Line::Standard), rate(Line::HighSpeed));
        assert!((0.1..0.35).contains(&a), "{a}");
        assert!((a - b).abs() < 0.05, "{a} vs {b}");
    }

    #[test]
    fn history_is_a_labelled_csv_of_standard_pumps() {
        let mut rng = StdRng::seed_from_u64(2);
        let csv = history_csv(&mut rng, 3);
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines[0], "vibration_rms,temperature_c,current_a,rpm,label");
        assert_eq!(lines.len(), 4);
        let rpm: f64 = lines[1].split(',').nth(3).unwrap().parse().unwrap();
        assert!((1200.0..1800.0).contains(&rpm), "{rpm}");
    }
}
