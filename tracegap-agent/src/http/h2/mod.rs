//! HTTP/2 in user space, as an observer reads it: frames out of each
//! direction's bytes ([`frame`]), header blocks decoded with that
//! direction's HPACK table ([`hpack`], tolerant of joining mid-connection),
//! streams paired into request/response exchanges with their gRPC status
//! ([`exchange`]), the kernel's events into connections ([`follow`]), and
//! RFC 7541's tables ([`tables`]).

pub mod exchange;
pub mod fields;
pub mod follow;
pub mod frame;
pub mod hpack;
pub mod tables;

/// What the tests of this module share.
#[cfg(test)]
pub(crate) mod testing {
    /// An HTTP/2 frame: its 9-byte header, then `payload`.
    pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }
}
