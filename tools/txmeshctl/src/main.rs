//! txmeshctl: see and steer what the txmesh sidecars do — transactions (their
//! decisions in etcd, what the sidecars hold), the service registry.
//! docs/operations.md has the details; `txmeshctl --help` the examples.

use clap::{Parser, Subcommand, ValueEnum};
use common::{parse_age, Fail};
use std::time::Duration;

mod common;
mod etcd;
mod gate;
mod page;
mod services;
mod sidecars;
mod top;
mod txns;

const EXAMPLES: &str = "Examples:
  txmeshctl txns                          decided transactions of the last hour, newest first
  txmeshctl txns --state in-doubt         what the sidecars hold past its deadline
  txmeshctl txns --state stuck            in doubt past the phase-2 give-up time, still retrying
  txmeshctl txns --since 10m --output json
  txmeshctl txn 0123456789abcdef0123456789abcdef
  txmeshctl txn abort 0123456789abcdef0123456789abcdef
  txmeshctl services                      every registered instance, zone, weight, lease TTL left
  txmeshctl services payment
  txmeshctl top                           live rates per sidecar, refreshed every 2 s (Ctrl-C to stop)
  txmeshctl top --iterations 3 --output json
  txmeshctl serve                         the transactions page on http://127.0.0.1:8099
  txmeshctl gate txn.json                 the match_delegate matcher that keeps other traffic
                                          out of the txn filter (txn.json: the filter's config)

Addresses default to the loopback stack of `make up`: etcd at
http://127.0.0.1:2379 and the sidecars' status listeners (:15008, :15108,
:15208). Use --etcd / TXMESH_ETCD and --sidecar / TXMESH_SIDECARS elsewhere.";

#[derive(Parser)]
#[command(name = "txmeshctl", version, about = "Operate a txmesh mesh: transactions and the service registry", after_help = EXAMPLES)]
struct Cli {
    /// etcd's JSON gateway (decisions, pending work, the registry).
    #[arg(
        long,
        global = true,
        env = "TXMESH_ETCD",
        default_value = "http://127.0.0.1:2379"
    )]
    etcd: String,
    /// A sidecar's status endpoint (repeatable, or comma-separated in the env).
    #[arg(
        long = "sidecar",
        global = true,
        env = "TXMESH_SIDECARS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:15008,http://127.0.0.1:15108,http://127.0.0.1:15208"
    )]
    sidecars: Vec<String>,
    /// Output format.
    #[arg(long, short, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum State {
    InDoubt,
    /// In doubt past the phase-2 give-up time: still retrying, look at it.
    Stuck,
    Active,
    Committed,
    Aborted,
}

#[derive(Subcommand)]
enum Cmd {
    /// List transactions: decided ones from etcd, active / in-doubt ones from the sidecars.
    Txns {
        #[arg(long, value_enum)]
        state: Option<State>,
        /// Only decisions this recent (e.g. 30s, 10m, 2h, 1d).
        #[arg(long, default_value = "1h", value_parser = parse_age)]
        since: Duration,
    },
    /// One transaction: outcome, participants, acknowledgements, timings; or `txn abort <id>`.
    Txn {
        /// `abort` followed by the id, or just the id.
        #[arg(num_args = 1..=2, required = true)]
        args: Vec<String>,
    },
    /// The service registry: instances, zone, weight, version, lease TTL left.
    Services { name: Option<String> },
    /// A page of recent and in-doubt transactions with a latency plot
    /// (readable without Grafana), and its data at /api/txns.
    Serve {
        #[arg(long, default_value = "127.0.0.1:8099")]
        listen: String,
    },
    /// Live rates per sidecar: requests, commits, aborts, in flight, in doubt
    /// (from each Envoy's admin /stats/prometheus).
    Top {
        /// Envoy admin addresses (default: the `make up` sidecars).
        #[arg(
            long = "admin",
            env = "TXMESH_ADMINS",
            value_delimiter = ',',
            default_value = "http://127.0.0.1:15000,http://127.0.0.1:15100,http://127.0.0.1:15200"
        )]
        admins: Vec<String>,
        /// Seconds between refreshes.
        #[arg(long, default_value_t = 2)]
        interval: u64,
        /// Stop after this many refreshes (default: until interrupted).
        #[arg(long)]
        iterations: Option<u64>,
    },
    /// Prints the `xds_matcher` that keeps traffic the txn filter would pass
    /// untouched out of the VM (Envoy's match_delegate around the filter;
    /// docs/protocol.md), for the filter's own JSON config (a file, or `-`).
    Gate { config: String },
}

fn main() {
    let cli = Cli::parse();
    let r = match &cli.cmd {
        Cmd::Txns { state, since } => txns::txns(&cli, *state, *since),
        Cmd::Txn { args } => match args.as_slice() {
            [id] => txns::txn_show(&cli, id),
            [verb, id] if verb == "abort" => txns::txn_abort(&cli, id),
            [verb, _] => Err(Fail(format!(
                "unknown action {verb:?}: `txmeshctl txn <id>` or `txmeshctl txn abort <id>`"
            ))),
            _ => Err(Fail(
                "`txmeshctl txn <id>` or `txmeshctl txn abort <id>`".into(),
            )),
        },
        Cmd::Services { name } => services::services(&cli, name.as_deref()),
        Cmd::Serve { listen } => page::serve(&cli, listen),
        Cmd::Gate { config } => gate::gate(config),
        Cmd::Top {
            admins,
            interval,
            iterations,
        } => top::top(&cli, admins, *interval, *iterations),
    };
    if let Err(Fail(msg)) = r {
        eprintln!("txmeshctl: {msg}");
        std::process::exit(2);
    }
}
