//! Command-line interface. Every flag has an environment fallback
//! (`TRACEGAP_*`), so the DaemonSet can configure the agent without args.

use clap::{Args, Parser, Subcommand};

/// tracegap: finds the holes in your distributed traces from the network.
#[derive(Debug, Parser)]
#[command(name = "tracegap", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print every HTTP request and response seen on the wire, one per line.
    Observe(ObserveArgs),
}

#[derive(Debug, Args)]
pub struct ObserveArgs {
    /// Interfaces to attach to (repeat or comma-separate).
    #[arg(
        long = "iface",
        env = "TRACEGAP_IFACES",
        value_delimiter = ',',
        required = true
    )]
    pub ifaces: Vec<String>,
    /// Stop after this many messages (0: run until SIGINT/SIGTERM).
    #[arg(long, default_value_t = 0, env = "TRACEGAP_COUNT")]
    pub count: u64,
}
