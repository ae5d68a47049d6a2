//! tracegap's agent as a library: the binary (`src/main.rs`) is a thin CLI
//! over it, and the end-to-end tests drive it directly.
//!
//! The data path, from packet to output:
//! [`ebpf`] (load and attach the TC programs) → [`events`] (ring-buffer
//! records) → [`observe`] (what a person watches on the wire).

pub mod cli;
pub mod clock;
pub mod discover;
pub mod ebpf;
pub mod events;
pub mod gap;
pub mod http;
pub mod interfaces;
pub mod observe;
pub mod shutdown;
