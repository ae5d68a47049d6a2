//! tracegap's agent as a library: the binary (`src/main.rs`) is a thin CLI
//! over it, and the end-to-end tests drive it directly.
//!
//! The data path, from packet to output:
//! [`ebpf`] (load and attach the TC programs) → [`events`] (ring-buffer
//! records) → [`nat`] (Service addresses to the pods behind them) → [`http`] (message heads, trace context, pairing) → [`gap`]
//! (hops, classification, synthetic spans) → [`reconcile`] (held for the
//! settle delay, corrected by what [`tracestore`] reads back; optional) →
//! [`export`] (OTLP), with
//! [`metrics`], [`report`] and [`server`] for people. [`agent`] runs it all;
//! [`observe`] prints the wire for a person.

pub mod agent;
pub mod backend;
pub mod cli;
pub mod clock;
pub mod cluster;
pub mod discover;
pub mod ebpf;
pub mod events;
pub mod export;
pub mod gap;
pub mod http;
pub mod identity;
pub mod interfaces;
pub mod libssl;
pub mod metrics;
pub mod nat;
pub mod observe;
pub mod privileges;
pub mod process;
pub mod prometheus;
pub mod quality;
pub mod reconcile;
pub mod remote;
pub mod replay;
pub mod report;
pub mod server;
pub mod shutdown;
pub mod tls;
pub mod tracestore;

/// The hash map of the per-event path (flows, streams, requests in flight,
/// addresses): foldhash, what hashbrown uses by default, seeded per process
/// (from its randomised address-space layout). SipHash, std's default, was a tenth of the user-space
/// pipeline's time (`perf` on `tracegap-lab bench-pipeline`). Keys come
/// from the network; the per-process seed keeps a sender from choosing
/// colliding ones in advance.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
