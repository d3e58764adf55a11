//! `rs-traffic`: a guest with two vhost-user ports that sends timestamped frames from A to B
//! through any vhost-user backend, and prints throughput, loss and one-way latency percentiles.
//! Pin it to its own CPU (`taskset -c 0`): it busy-polls.
//!
//!   rs-traffic --a A.sock --b B.sock [--size 64] [--rate max|PPS] [--secs 10] [--json]
//!              [--hgrm FILE]

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use perf::traffic::{hgrm, run, TrafficConfig};
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
    /// Print the result as one JSON object.
    #[arg(long)]
    json: bool,
    /// Write the latency distribution (HdrHistogram .hgrm percentiles, in µs) here.
    #[arg(long)]
    hgrm: Option<PathBuf>,
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
    };
    let r = run(&args.a, &args.b, &cfg)?;
    let q = |p: f64| r.latency.value_at_quantile(p) as f64 / 1e3;
    let pct = [
        ("p50", 0.5),
        ("p90", 0.9),
        ("p99", 0.99),
        ("p99.9", 0.999),
        ("p99.99", 0.9999),
    ];
    if let Some(path) = &args.hgrm {
        std::fs::write(path, hgrm(&r.latency))?;
    }
    if args.json {
        let mut lat = serde_json::Map::new();
        for (k, p) in pct {
            lat.insert(k.into(), json!(q(p)));
        }
        lat.insert("max".into(), json!(r.latency.max() as f64 / 1e3));
        println!(
            "{}",
            json!({
                "size": args.size, "offered_rate": rate, "seconds": r.seconds,
                "sent": r.sent, "received": r.received, "lost": r.lost, "reordered": r.reordered,
                "offered_mpps": r.offered_mpps(), "received_mpps": r.received_mpps(),
                "latency_us": lat,
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
    for (k, p) in pct {
        println!("  {k:>7} {:10.2}", q(p));
    }
    println!("  {:>7} {:10.2}", "max", r.latency.max() as f64 / 1e3);
    Ok(())
}
