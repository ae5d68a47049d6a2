//! HTTP/2 in user space, as an observer reads it: frames out of each
//! direction's bytes ([`frame`]), header blocks decoded with that
//! direction's HPACK table ([`hpack`], tolerant of joining mid-connection),
//! streams paired into request/response exchanges with their gRPC status
//! ([`exchange`]), the kernel's events into connections ([`follow`]), and
//! RFC 7541's tables ([`tables`]).

pub mod exchange;
pub mod follow;
pub mod frame;
pub mod hpack;
pub mod tables;
