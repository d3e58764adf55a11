//! Latency distribution plots as SVG, drawn the way HdrHistogram's plotter draws them: latency
//! (µs, log scale) against percentile on a "nines" axis (0 %, 90 %, 99 %, 99.9 %, …), so the
//! tail is as readable as the median. Several named series share one plot for comparisons.

use std::fmt::Write;

use hdrhistogram::Histogram;

const W: f64 = 720.0;
const H: f64 = 420.0;
const LEFT: f64 = 70.0;
const BOTTOM: f64 = 50.0;
const TOP: f64 = 30.0;
const RIGHT: f64 = 150.0;
/// The axis ends at 99.999 % (five nines).
const MAX_NINES: f64 = 5.0;
const COLORS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
];

/// x position of percentile `q` (0..1): log10(1 / (1 - q)) nines.
fn nines(q: f64) -> f64 {
    (1.0 / (1.0 - q.min(1.0 - 10f64.powf(-MAX_NINES)))).log10()
}

/// One SVG with a line per named histogram (values in ns, drawn in µs).
pub fn latency_svg(title: &str, series: &[(&str, &Histogram<u64>)]) -> String {
    // Whole decades of µs, from 0.1 up to the decade above the largest value drawn.
    let top = series
        .iter()
        .map(|(_, h)| h.value_at_quantile(0.99999) as f64 / 1e3)
        .fold(1.0f64, f64::max)
        .log10()
        .ceil()
        .max(1.0) as i32;
    let (lo, hi) = (-1.0, top as f64);
    let x = |n: f64| LEFT + n / MAX_NINES * (W - LEFT - RIGHT);
    let y = |us: f64| {
        let l = us.max(0.1).log10();
        H - BOTTOM - (l - lo) / (hi - lo) * (H - BOTTOM - TOP)
    };
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="18" text-anchor="middle" font-size="14">{}</text>"#,
        (W - RIGHT + LEFT) / 2.0,
        escape(title)
    );
    for n in 0..=MAX_NINES as u32 {
        let label = match n {
            0 => "0%".to_string(),
            n => format!("{}%", 100.0 - 100.0 / 10f64.powi(n as i32)),
        };
        let px = x(n as f64);
        let _ = writeln!(
            s,
            r##"<line x1="{px}" y1="{TOP}" x2="{px}" y2="{}" stroke="#ddd"/><text x="{px}" y="{}" text-anchor="middle">{label}</text>"##,
            H - BOTTOM,
            H - BOTTOM + 16.0
        );
    }
    for d in -1..=top {
        let us = 10f64.powi(d);
        let py = y(us);
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" y1="{py}" x2="{}" y2="{py}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">{us}</text>"##,
            W - RIGHT,
            LEFT - 6.0,
            py + 4.0
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">percentile</text><text x="16" y="{}" transform="rotate(-90 16 {})" text-anchor="middle">latency (µs)</text>"#,
        (W - RIGHT + LEFT) / 2.0,
        H - 10.0,
        (H - BOTTOM + TOP) / 2.0,
        (H - BOTTOM + TOP) / 2.0
    );
    for (i, (name, h)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let points: Vec<String> = (0..=200)
            .map(|k| {
                let n = MAX_NINES * k as f64 / 200.0;
                let q = 1.0 - 10f64.powf(-n);
                let us = h.value_at_quantile(q) as f64 / 1e3;
                format!("{:.1},{:.1}", x(nines(q)), y(us))
            })
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
            points.join(" ")
        );
        let ly = TOP + 10.0 + 20.0 * i as f64;
        let _ = writeln!(
            s,
            r#"<line x1="{}" y1="{ly}" x2="{}" y2="{ly}" stroke="{color}" stroke-width="3"/><text x="{}" y="{}">{}</text>"#,
            W - RIGHT + 10.0,
            W - RIGHT + 30.0,
            W - RIGHT + 36.0,
            ly + 4.0,
            escape(name)
        );
    }
    s += "</svg>\n";
    s
}

fn escape(t: &str) -> String {
    t.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plots_every_series_on_a_nines_axis() {
        let mut a = Histogram::<u64>::new(3).unwrap();
        let mut b = Histogram::<u64>::new(3).unwrap();
        for v in 1..=10_000u64 {
            a.record(v * 10).unwrap();
            b.record(v * 20).unwrap();
        }
        let svg = latency_svg("64 B <at 50 %>", &[("ringswitch", &a), ("dpdk", &b)]);
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("99.99%") && svg.contains("&lt;at 50 %&gt;"));
        assert!((nines(0.99) - 2.0).abs() < 1e-9);
    }
}
