//! The `ringswitch` binary: `ringswitch --config FILE` runs the switch; `ringswitch ctl ...`
//! talks to a running one. Runs on the main (control) thread; exits on SIGINT/SIGTERM.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use control::ctl::protocol::{Policy, Request, Response};
use control::ctl::text;
use control::{config, ctl, switch};

#[derive(Parser)]
#[command(
    name = "ringswitch",
    version,
    about = "A vhost-user switch with busy-polling PMD cores"
)]
struct Cli {
    /// Main configuration file (per-port files go in ports.d/ beside it).
    #[arg(long, short)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Query a running switch over its control socket.
    Ctl {
        #[arg(long, default_value = "/run/ringswitch/ctl.sock")]
        socket: PathBuf,
        #[command(subcommand)]
        what: CtlCmd,
    },
    /// Check a configuration and exit.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum CtlCmd {
    /// Per-PMD and per-port counters.
    Stats {
        #[arg(long)]
        json: bool,
    },
    /// Start a port described by a port file (as in ports.d/) in the running switch.
    AddPort { file: PathBuf },
    /// Stop and remove a port; the others keep running.
    DelPort { name: String },
    /// Per PMD: packets, cycles per packet, busy and idle time.
    PmdStatsShow,
    /// Which PMD polls which source queue, and how busy each keeps it.
    PmdRxqShow,
    /// Reassign the source queues to the PMDs now, by the configured policy or the one named.
    Rebalance { policy: Option<Policy> },
    /// Pin a source queue of a port to a PMD core ("none": unpin) and move it there now.
    Pin {
        port: String,
        queue: u16,
        core: String,
    },
}

fn main() -> anyhow::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    match (cli.cmd, cli.config) {
        (Some(Cmd::Ctl { socket, what }), _) => ctl_command(&socket, what),
        (Some(Cmd::Check { config }), _) => {
            let c = config::Config::load(&config)?;
            println!("{}: ok, {} port(s)", config.display(), c.ports.len());
            Ok(())
        }
        (None, Some(path)) => run(&path),
        (None, None) => {
            anyhow::bail!("give --config FILE to run the switch, or a subcommand (see --help)")
        }
    }
}

/// `ringswitch ctl ...`: one request, its reply printed as text (or JSON for `stats --json`).
fn ctl_command(socket: &std::path::Path, what: CtlCmd) -> anyhow::Result<()> {
    let request = match &what {
        CtlCmd::Stats { .. } | CtlCmd::PmdStatsShow | CtlCmd::PmdRxqShow => Request::Stats,
        // We read the file, with our own rights, and send it; the path names it in the
        // switch's messages.
        CtlCmd::AddPort { file } => Request::AddPort {
            text: std::fs::read_to_string(file).with_context(|| format!("{}", file.display()))?,
            path: std::fs::canonicalize(file)
                .with_context(|| format!("{}", file.display()))?
                .display()
                .to_string(),
        },
        CtlCmd::DelPort { name } => Request::DelPort { name: name.clone() },
        CtlCmd::Rebalance { policy } => Request::Rebalance { policy: *policy },
        CtlCmd::Pin { port, queue, core } => Request::Pin {
            port: port.clone(),
            queue: *queue,
            core: match core.as_str() {
                "none" => None,
                c => Some(
                    c.parse()
                        .with_context(|| format!("CORE {c:?}: a number or none"))?,
                ),
            },
        },
    };
    let out = match (ctl::client(socket, &request)?, &what) {
        (Response::Stats(r), CtlCmd::Stats { json: true }) => serde_json::to_string(&r)? + "\n",
        (Response::Stats(r), CtlCmd::PmdStatsShow) => text::pmds(&r),
        (Response::Stats(r), CtlCmd::PmdRxqShow) => text::sources(&r),
        (Response::Stats(r), _) => text::stats(&r),
        (Response::Moved { moves }, _) => format!("ok: {}", text::moves(&moves)),
        (Response::Done { what }, _) => format!("ok: {what}\n"),
        (Response::Error { message }, _) => anyhow::bail!("{message}"),
    };
    print!("{out}");
    Ok(())
}

fn run(path: &std::path::Path) -> anyhow::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let cfg = config::Config::load(path)?;
    let fds = switch::raise_fd_limit();
    log::debug!("file descriptor limit {fds}");
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM]).context("signals")?;
    let sw = Arc::new(switch::Switch::start(&cfg)?);
    ctl::serve(&cfg.control_socket, cfg.control_perm, sw.clone())?;
    log::info!(
        "ringswitch running: {} port(s), PMD core(s) {:?}, control socket {}",
        sw.with_ports(|p| p.len()),
        cfg.pmd_cores,
        cfg.control_socket.display()
    );
    // The main thread watches: for a signal to stop, for rings a guest corrupted (the PMD
    // only flags them; saying so is control's job), and for frontends that shrank the memory
    // we map. It also closes the PMDs' load windows and rebalances them when auto-rebalance
    // is on.
    let mut reported = std::collections::HashSet::new();
    loop {
        if let Some(sig) = signals.pending().next() {
            log::info!("signal {sig}: stopping");
            break;
        }
        sw.report_broken_rings(&mut reported);
        sw.close_faulted_connections();
        match sw.dp.tick() {
            Ok(moves) if !moves.is_empty() => {
                log::info!(
                    "auto-rebalance: {}",
                    text::moves(&ctl::move_reports(&sw, &moves)).trim_end()
                )
            }
            Ok(_) => {}
            Err(e) => log::error!("auto-rebalance: {e}"),
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    sw.remove_sockets();
    switch::remove_socket_file(&cfg.control_socket);
    // Exit without joining the port threads (they block in accept/recv); the OS unmaps guest memory.
    std::process::exit(0)
}
