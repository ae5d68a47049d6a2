//! HTTP/2 in user space, as an observer reads it: frames out of each
//! direction's bytes ([`frame`]), header blocks decoded with that
//! direction's HPACK table ([`hpack`], tolerant of joining mid-connection),
//! streams paired into request/response exchanges with their gRPC status
//! ([`exchange`]), and RFC 7541's tables ([`tables`]).
//!
//! Not yet fed by the kernel: the TC programs copy HTTP/1.x heads only.

pub mod exchange;
pub mod frame;
pub mod hpack;
pub mod tables;
