//! `rs-traffic`: a guest with two vhost-user ports that sends timestamped frames from A to B
//! through any vhost-user backend, and prints throughput, loss and one-way latency percentiles.
//! Pin it to its own CPU (`taskset -c 0`): it busy-polls.
//!
//!   rs-traffic --a A.sock --b B.sock [--size 64] [--rate max|PPS] [--secs 10] [--json]
//!              [--hgrm FILE] [--svg FILE]
//!   rs-traffic --a A.sock --b B.sock --zero-loss [--secs 5] [--tries 2] ...   zero-loss rate
//!              (binary search; a rate passes when one of --tries trials loses nothing), then
//!              latency at 10 %, 50 % and 90 % of it

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use perf::plot::latency_svg;
use perf::traffic::{hgrm, run, zero_loss, Report, TrafficConfig};
use serde_json::json;

#[derive(Parser)]
#[command(
    name = "rs-traffic",
    about = "Throughput, loss and latency through a vhost-user backend"
)]
struct Args {
    /// Socket of the backend port frames are sent into.
    #[arg(long)]
    a: PathBuf,
    /// Socket of the backend port frames are received from.
    #[arg(long)]
    b: PathBuf,
    /// Ethernet frame size in bytes (64..=2000).
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Offered rate in frames per second, or "max".
    #[arg(long, default_value = "max")]
    rate: String,
    #[arg(long, default_value_t = 10.0)]
    secs: f64,
    /// Entries per ring.
    #[arg(long, default_value_t = 256)]
    ring: u16,
    /// Negotiate EVENT_IDX and decide on kicks from the backend's avail_event, as Linux does.
    #[arg(long)]
    event_idx: bool,
    /// Ask for a notification (call eventfd write) after the backend's bursts, as a guest
    /// driver that sleeps does; by default the rings say NO_INTERRUPT.
    #[arg(long)]
    interrupts: bool,
    /// Print the result as one JSON object.
    #[arg(long)]
    json: bool,
    /// Write the latency distribution (HdrHistogram .hgrm percentiles, in µs) here (with
    /// --zero-loss: of the run at 50 % load).
    #[arg(long)]
    hgrm: Option<PathBuf>,
    /// Write a plot of the latency distribution (SVG) here (with --zero-loss: one line per
    /// load).
    #[arg(long)]
    svg: Option<PathBuf>,
    /// Find the zero-loss rate by binary search (trials of --secs each), then measure latency
    /// at 10 %, 50 % and 90 % of it.
    #[arg(long)]
    zero_loss: bool,
    /// Binary-search steps for --zero-loss.
    #[arg(long, default_value_t = 8)]
    steps: u32,
    /// Trials per rate for --zero-loss: a rate passes when one of them loses nothing.
    #[arg(long, default_value_t = 2)]
    tries: u32,
}

const PERCENTILES: [(&str, f64); 5] = [
    ("p50", 0.5),
    ("p90", 0.9),
    ("p99", 0.99),
    ("p99.9", 0.999),
    ("p99.99", 0.9999),
];

/// Latency percentiles and max of a run, in µs, as JSON.
fn latency_json(r: &Report) -> serde_json::Value {
    let mut lat = serde_json::Map::new();
    for (k, p) in PERCENTILES {
        lat.insert(k.into(), json!(r.latency.value_at_quantile(p) as f64 / 1e3));
    }
    lat.insert("max".into(), json!(r.latency.max() as f64 / 1e3));
    lat.into()
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rate = match args.rate.as_str() {
        "max" => None,
        r => Some(
            r.parse::<f64>()
                .ok()
                .filter(|r| *r > 0.0)
                .ok_or_else(|| anyhow::anyhow!("--rate: {r:?} is not a positive number or max"))?,
        ),
    };
    anyhow::ensure!(args.ring.is_power_of_two(), "--ring must be a power of two");
    let cfg = TrafficConfig {
        frame_len: args.size,
        rate,
        duration: Duration::from_secs_f64(args.secs),
        ring: args.ring,
        progress: !args.json,
        event_idx: args.event_idx,
        interrupts: args.interrupts,
    };
    if args.zero_loss {
        let z = zero_loss(
            &args.a,
            &args.b,
            &cfg,
            args.steps,
            args.tries,
            &[0.1, 0.5, 0.9],
        )?;
        if let (Some(path), Some((_, r))) = (&args.hgrm, z.at_load.get(1)) {
            std::fs::write(path, hgrm(&r.latency))?;
        }
        if let Some(path) = &args.svg {
            let names: Vec<String> = z
                .at_load
                .iter()
                .map(|(f, _)| format!("{:.0} % load", f * 100.0))
                .collect();
            let series: Vec<_> = names
                .iter()
                .zip(&z.at_load)
                .map(|(n, (_, r))| (n.as_str(), &r.latency))
                .collect();
            let title = format!(
                "{} B, zero-loss rate {:.2} Mpps: one-way latency",
                args.size,
                z.rate / 1e6
            );
            std::fs::write(path, latency_svg(&title, &series))?;
        }
        if args.json {
            let loads: Vec<_> = z
                .at_load
                .iter()
                .map(|(f, r)| json!({"load": f, "lost": r.lost, "latency_us": latency_json(r)}))
                .collect();
            println!(
                "{}",
                json!({"size": args.size, "zero_loss_mpps": z.rate / 1e6, "at_load": loads})
            );
            return Ok(());
        }
        println!(
            "{} B frames: zero-loss rate {:.3} Mpps",
            args.size,
            z.rate / 1e6
        );
        println!("one-way latency (us) at a share of it:");
        print!("  {:>6}", "load");
        for (k, _) in PERCENTILES {
            print!(" {k:>9}");
        }
        println!(" {:>9} {:>6}", "max", "lost");
        for (f, r) in &z.at_load {
            print!("  {:>5.0}%", f * 100.0);
            for (_, p) in PERCENTILES {
                print!(" {:9.2}", r.latency.value_at_quantile(p) as f64 / 1e3);
            }
            println!(" {:9.2} {:>6}", r.latency.max() as f64 / 1e3, r.lost);
        }
        return Ok(());
    }
    let r = run(&args.a, &args.b, &cfg)?;
    if let Some(path) = &args.hgrm {
        std::fs::write(path, hgrm(&r.latency))?;
    }
    if let Some(path) = &args.svg {
        let at = rate.map_or("max rate".to_string(), |r| format!("{:.2} Mpps", r / 1e6));
        let title = format!("{} B at {at}: one-way latency", args.size);
        std::fs::write(path, latency_svg(&title, &[("latency", &r.latency)]))?;
    }
    if args.json {
        println!(
            "{}",
            json!({
                "size": args.size, "offered_rate": rate, "seconds": r.seconds,
                "sent": r.sent, "received": r.received, "lost": r.lost, "reordered": r.reordered, "late": r.late,
                "offered_mpps": r.offered_mpps(), "received_mpps": r.received_mpps(),
                "latency_us": latency_json(&r),
            })
        );
        return Ok(());
    }
    println!(
        "{} B frames, {:.1} s: sent {} ({:.2} Mpps), received {} ({:.2} Mpps), lost {} ({:.4} %), reordered {}",
        args.size,
        r.seconds,
        r.sent,
        r.offered_mpps(),
        r.received,
        r.received_mpps(),
        r.lost,
        100.0 * r.lost as f64 / r.sent.max(1) as f64,
        r.reordered
    );
    println!("one-way latency (us):");
    for (k, p) in PERCENTILES {
        println!(
            "  {k:>7} {:10.2}",
            r.latency.value_at_quantile(p) as f64 / 1e3
        );
    }
    println!("  {:>7} {:10.2}", "max", r.latency.max() as f64 / 1e3);
    Ok(())
}
