//! Line charts as server-rendered SVG: no script and no charting library. Series differ
//! by dash pattern as well as colour, thresholds are a labelled line, alert windows are
//! shaded and hatched, and each chart carries a text summary for screen readers.

use std::fmt::Write as _;

use super::html::{esc, iso, num};

/// One line: its name and `(time ms, value)` points, oldest first.
pub struct Series {
    pub name: String,
    pub points: Vec<(u64, f64)>,
}

pub struct Chart {
    /// Also the element id (escaped): tests and links find a chart by it.
    pub id: String,
    pub title: String,
    pub unit: String,
    pub series: Vec<Series>,
    /// A horizontal line: its label and value (a gate's threshold).
    pub threshold: Option<(String, f64)>,
    /// Time ranges to mark (drift alert windows).
    pub marked: Vec<(u64, u64)>,
}

const W: f64 = 640.0;
const H: f64 = 200.0;
const L: f64 = 56.0;
const R: f64 = 12.0;
const T: f64 = 12.0;
const B: f64 = 28.0;
const DASH: [&str; 4] = ["", "6 3", "2 3", "10 3 2 3"];

pub fn render(c: &Chart) -> String {
    let pts = c.series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y1) = (u64::MAX, 0u64, 0f64);
    for &(x, y) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        if y.is_finite() {
            y1 = y1.max(y);
        }
    }
    for &(a, b) in &c.marked {
        x0 = x0.min(a);
        x1 = x1.max(b);
    }
    let mut out = format!(
        "<figure class=\"chart\" id=\"{id}\"><figcaption>{title} ({unit})</figcaption>",
        id = esc(&c.id),
        title = esc(&c.title),
        unit = esc(&c.unit)
    );
    if x0 > x1 {
        out.push_str("<p>No data yet.</p></figure>");
        return out;
    }
    if let Some((_, t)) = &c.threshold {
        y1 = y1.max(*t);
    }
    let y1 = if y1 <= 0.0 { 1.0 } else { y1 * 1.1 };
    let span = (x1 - x0).max(1) as f64;
    let sx = |x: u64| L + (x.saturating_sub(x0)) as f64 / span * (W - L - R);
    let sy = |y: f64| T + (1.0 - (y / y1).clamp(0.0, 1.0)) * (H - T - B);
    let _ = write!(
        out,
        "<svg viewBox=\"0 0 {W} {H}\" role=\"img\" aria-label=\"{}\" \
         xmlns=\"http://www.w3.org/2000/svg\">",
        esc(&summary(c))
    );
    for &(a, b) in &c.marked {
        let (xa, xb) = (sx(a), sx(b).max(sx(a) + 2.0));
        let _ = write!(
            out,
            "<rect class=\"marked\" x=\"{xa:.1}\" y=\"{T}\" width=\"{:.1}\" height=\"{:.1}\"><title>alert {} – {}</title></rect>",
            xb - xa,
            H - T - B,
            iso(a),
            iso(b)
        );
    }
    let _ = write!(
        out,
        "<line class=\"axis\" x1=\"{L}\" y1=\"{yb}\" x2=\"{xr}\" y2=\"{yb}\"/>\
         <line class=\"axis\" x1=\"{L}\" y1=\"{T}\" x2=\"{L}\" y2=\"{yb}\"/>\
         <text x=\"{lx}\" y=\"{ty}\" text-anchor=\"end\">{top}</text>\
         <text x=\"{lx}\" y=\"{yb}\" text-anchor=\"end\">0</text>\
         <text x=\"{L}\" y=\"{H}\" dy=\"-6\">{from}</text>\
         <text x=\"{xr}\" y=\"{H}\" dy=\"-6\" text-anchor=\"end\">{to}</text>",
        yb = H - B,
        xr = W - R,
        lx = L - 4.0,
        ty = T + 10.0,
        top = num(y1),
        from = &iso(x0)[11..19],
        to = &iso(x1)[11..19],
    );
    if let Some((label, t)) = &c.threshold {
        let y = sy(*t);
        let _ = write!(
            out,
            "<line class=\"threshold\" x1=\"{L}\" y1=\"{y:.1}\" x2=\"{}\" y2=\"{y:.1}\"/>\
             <text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            W - R,
            W - R,
            y - 3.0,
            esc(label)
        );
    }
    for (k, s) in c.series.iter().enumerate() {
        let d: Vec<String> = s
            .points
            .iter()
            .filter(|p| p.1.is_finite())
            .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
            .collect();
        let dash = DASH[k % DASH.len()];
        let _ = write!(
            out,
            "<polyline class=\"s{}\" fill=\"none\" stroke-dasharray=\"{dash}\" points=\"{}\"/>",
            k % DASH.len(),
            d.join(" ")
        );
        if d.len() == 1 {
            let (x, y) = s.points[0];
            let _ = write!(
                out,
                "<circle class=\"s{}\" cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\"/>",
                k % DASH.len(),
                sx(x),
                sy(y)
            );
        }
    }
    out.push_str("</svg>");
    out.push_str(&legend(c));
    out
}

/// The legend: each series' line style, name and latest value; the marked windows.
fn legend(c: &Chart) -> String {
    let mut out = String::from("<ul class=\"legend\">");
    for (k, s) in c.series.iter().enumerate() {
        let last = s.points.last().map_or("—".into(), |p| num(p.1));
        let _ = write!(
            out,
            "<li><svg width=\"28\" height=\"8\" aria-hidden=\"true\"><line class=\"s{}\" x1=\"0\" y1=\"4\" x2=\"28\" y2=\"4\" stroke-dasharray=\"{}\"/></svg> {} (latest {} {})</li>",
            k % DASH.len(),
            DASH[k % DASH.len()],
            esc(&s.name),
            last,
            esc(&c.unit)
        );
    }
    if !c.marked.is_empty() {
        let _ = write!(
            out,
            "<li><span class=\"marked-key\" aria-hidden=\"true\"></span> alert windows: {}</li>",
            c.marked.len()
        );
    }
    out.push_str("</ul></figure>");
    out
}

/// What the chart shows, in words.
fn summary(c: &Chart) -> String {
    let mut s = format!("{}: ", c.title);
    for (k, series) in c.series.iter().enumerate() {
        if k > 0 {
            s.push_str("; ");
        }
        let last = series.points.last().map_or("no data".into(), |p| num(p.1));
        let _ = write!(
            s,
            "{} latest {last} {} over {} points",
            series.name,
            c.unit,
            series.points.len()
        );
    }
    if let Some((label, _)) = &c.threshold {
        let _ = write!(s, "; threshold {label}");
    }
    if !c.marked.is_empty() {
        let _ = write!(s, "; {} alert windows marked", c.marked.len());
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chart_draws_every_series_the_threshold_and_the_marked_windows() {
        let c = Chart {
            id: "p99".into(),
            title: "latency <p99>".into(),
            unit: "ms".into(),
            series: vec![
                Series {
                    name: "p50".into(),
                    points: vec![(1_000, 1.0), (2_000, 2.0)],
                },
                Series {
                    name: "p99".into(),
                    points: vec![(1_000, 4.0), (2_000, 8.0)],
                },
            ],
            threshold: Some(("<= 5".into(), 5.0)),
            marked: vec![(1_500, 2_000)],
        };
        let svg = render(&c);
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("class=\"threshold\""));
        assert!(svg.contains("class=\"marked\""));
        assert!(svg.contains("latency &lt;p99&gt;"), "titles are escaped");
        assert!(svg.contains("p99 latest 8 ms over 2 points"));
        let empty = render(&Chart {
            series: vec![],
            threshold: None,
            marked: vec![],
            ..c
        });
        assert!(empty.contains("No data yet."));
    }
}
