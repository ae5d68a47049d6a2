//! The gap engine: from paired HTTP messages to hops, from hops to a
//! diagnosis (why is this hop missing from the trace?), and from the
//! diagnosis to the synthetic span that makes the hop visible.

pub mod classify;
pub mod fix;
pub mod formats;
pub mod hop;
pub mod route;
pub mod silence;
pub mod span;
pub mod threads;
pub mod timing;

pub use classify::{Confidence, Engine, GapKind, HandoffSeen, Link, Verdict};
pub use hop::Hop;
