//! Hand-written SVG line charts (no dependencies): one chart, several named series of (x, y)
//! points, linear or log₂ x axis, a legend on the right.

/// One line of a chart.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

pub struct Chart<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub y_label: &'a str,
    pub log_x: bool,
    pub series: Vec<Series>,
}

const W: f64 = 760.0;
const H: f64 = 420.0;
/// Plot area: left, top, right, bottom margins (the legend sits in the right margin).
const ML: f64 = 70.0;
const MT: f64 = 40.0;
const MR: f64 = 220.0;
const MB: f64 = 50.0;
const COLORS: [&str; 10] = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// Tick label: few significant digits.
fn fmt_tick(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}").trim_end_matches('0').trim_end_matches('.').into()
    } else {
        format!("{v:.3}").trim_end_matches('0').trim_end_matches('.').into()
    }
}

/// `n` evenly spaced "nice" ticks covering `lo..hi`.
fn nice_ticks(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    let span = (hi - lo).max(1e-12);
    let raw = span / n as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * mag).find(|s| span / s <= n as f64).unwrap_or(10.0 * mag);
    let start = (lo / step).ceil() * step;
    (0..=n * 2).map(|i| start + i as f64 * step).take_while(|v| *v <= hi + step * 1e-9).collect()
}

impl Chart<'_> {
    pub fn to_svg(&self) -> String {
        let pts: Vec<(f64, f64)> = self.series.iter().flat_map(|s| s.points.iter().copied()).filter(|(x, y)| x.is_finite() && y.is_finite() && (!self.log_x || *x > 0.0)).collect();
        let tx = |x: f64| if self.log_x { x.log2() } else { x };
        let (mut x0, mut x1) = pts.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| (a.min(tx(p.0)), b.max(tx(p.0))));
        let (mut y0, mut y1) = pts.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| (a.min(p.1), b.max(p.1)));
        if pts.is_empty() {
            (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
        }
        if x1 - x0 < 1e-12 {
            (x0, x1) = (x0 - 0.5, x1 + 0.5);
        }
        if y1 - y0 < 1e-12 {
            (y0, y1) = (y0 - 0.5, y1 + 0.5);
        }
        let pad = (y1 - y0) * 0.05;
        (y0, y1) = (y0 - pad, y1 + pad);
        let (pw, ph) = (W - ML - MR, H - MT - MB);
        let sx = |x: f64| ML + (tx(x) - x0) / (x1 - x0) * pw;
        let sy = |y: f64| MT + ph - (y - y0) / (y1 - y0) * ph;
        let mut s = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"{W}\" height=\"{H}\" fill=\"white\"/>\n<text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"15\">{}</text>\n",
            ML + pw / 2.0,
            esc(self.title)
        );
        // Axes, grid and ticks.
        s += &format!("<rect x=\"{ML}\" y=\"{MT}\" width=\"{pw}\" height=\"{ph}\" fill=\"none\" stroke=\"#333\"/>\n");
        for v in nice_ticks(y0, y1, 5) {
            let y = sy(v);
            s += &format!("<line x1=\"{ML}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\" stroke=\"#ddd\"/><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\n", ML + pw, ML - 6.0, y + 4.0, fmt_tick(v));
        }
        let xticks: Vec<f64> = if self.log_x { (x0.ceil() as i64..=x1.floor() as i64).map(|e| 2f64.powi(e as i32)).collect() } else { nice_ticks(x0, x1, 6) };
        for v in xticks {
            let x = sx(v);
            s += &format!("<line x1=\"{x:.1}\" y1=\"{MT}\" x2=\"{x:.1}\" y2=\"{:.1}\" stroke=\"#eee\"/><text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\n", MT + ph, MT + ph + 16.0, fmt_tick(v));
        }
        s += &format!("<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\n", ML + pw / 2.0, H - 12.0, esc(self.x_label));
        s += &format!("<text x=\"16\" y=\"{:.1}\" text-anchor=\"middle\" transform=\"rotate(-90 16 {:.1})\">{}</text>\n", MT + ph / 2.0, MT + ph / 2.0, esc(self.y_label));
        // Series and legend.
        for (i, ser) in self.series.iter().enumerate() {
            let c = COLORS[i % COLORS.len()];
            let mut p: Vec<(f64, f64)> = ser.points.iter().copied().filter(|(x, y)| x.is_finite() && y.is_finite() && (!self.log_x || *x > 0.0)).collect();
            p.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap_or(std::cmp::Ordering::Equal));
            let path: Vec<String> = p.iter().map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y))).collect();
            if p.len() > 1 {
                s += &format!("<polyline fill=\"none\" stroke=\"{c}\" stroke-width=\"2\" points=\"{}\"/>\n", path.join(" "));
            }
            for &(x, y) in &p {
                s += &format!("<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{c}\"/>\n", sx(x), sy(y));
            }
            let ly = MT + 10.0 + i as f64 * 18.0;
            s += &format!("<line x1=\"{:.1}\" y1=\"{ly:.1}\" x2=\"{:.1}\" y2=\"{ly:.1}\" stroke=\"{c}\" stroke-width=\"3\"/><text x=\"{:.1}\" y=\"{:.1}\">{}</text>\n", W - MR + 12.0, W - MR + 32.0, W - MR + 38.0, ly + 4.0, esc(&ser.name));
        }
        s += "</svg>\n";
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn svg_has_a_line_per_series_and_survives_odd_input() {
        let c = Chart {
            title: "KL <vs> budget",
            x_label: "B",
            y_label: "KL",
            log_x: true,
            series: vec![Series { name: "a".into(), points: vec![(256.0, 0.1), (1024.0, 0.01)] }, Series { name: "b".into(), points: vec![(0.0, f64::NAN)] }],
        };
        let s = c.to_svg();
        assert!(s.starts_with("<svg") && s.ends_with("</svg>\n"));
        assert_eq!(s.matches("<polyline").count(), 1);
        assert!(s.contains("KL &lt;vs&gt; budget"));
        assert_eq!(nice_ticks(0.0, 1.0, 5).len(), 6);
    }
}
