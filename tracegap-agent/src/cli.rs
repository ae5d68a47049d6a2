//! Command-line interface. Every flag has an environment fallback
//! (`TRACEGAP_*`), so the DaemonSet can configure the agent without args.

use clap::{Args, Parser, Subcommand};

use crate::{
    discover::{DEFAULT_PATTERNS, Patterns},
    interfaces::Selection,
};

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

/// Which interfaces to attach to.
#[derive(Debug, Args)]
pub struct InterfaceArgs {
    /// Interfaces to attach to (repeat or comma-separate). Without it, pod
    /// veths are discovered by --iface-pattern and followed as they come
    /// and go.
    #[arg(long = "iface", env = "TRACEGAP_IFACES", value_delimiter = ',')]
    pub ifaces: Vec<String>,
    /// Name patterns of pod veths' host ends (`*` and `?` wildcards); the
    /// defaults cover bridge/flannel, Calico, Cilium and other CNIs.
    #[arg(
        long = "iface-pattern",
        env = "TRACEGAP_IFACE_PATTERNS",
        value_delimiter = ',',
        default_values_t = DEFAULT_PATTERNS.map(String::from)
    )]
    pub patterns: Vec<String>,
}

impl InterfaceArgs {
    pub fn selection(&self) -> Selection {
        if self.ifaces.is_empty() {
            Selection::Discover(Patterns::new(&self.patterns))
        } else {
            Selection::Explicit(self.ifaces.clone())
        }
    }
}

#[derive(Debug, Args)]
pub struct ObserveArgs {
    #[command(flatten)]
    pub interfaces: InterfaceArgs,
    /// Stop after this many messages (0: run until SIGINT/SIGTERM).
    #[arg(long, default_value_t = 0, env = "TRACEGAP_COUNT")]
    pub count: u64,
}
