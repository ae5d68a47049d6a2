//! HTTP/2 frames (RFC 9113 §4) on one cleartext connection, as an observer
//! reads them: the bytes of each direction in order, in pieces of any size,
//! out of which come the header blocks (HEADERS + CONTINUATION, decoded
//! with that direction's HPACK table) and what changes decoding (SETTINGS).
//! DATA and every other payload are skipped by length, never buffered.
//!
//! Bounded: a header block at most [`MAX_BLOCK`] bytes; a frame header is
//! the only other thing buffered.

use thiserror::Error;

use super::{
    fields::Fields,
    hpack::{self, Decoder},
};

/// The client connection preface (RFC 9113 §3.4).
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Header block bytes gathered per stream at most (a 16 KiB metadata block
/// and more fits).
pub const MAX_BLOCK: usize = 64 * 1024;

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const SETTINGS: u8 = 0x4;
const PUSH_PROMISE: u8 = 0x5;
const CONTINUATION: u8 = 0x9;

const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// SETTINGS_HEADER_TABLE_SIZE.
const HEADER_TABLE_SIZE: u16 = 0x1;

/// Why a direction stopped being read.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum Error {
    /// The client's bytes do not begin with the preface.
    #[error("not an HTTP/2 connection preface")]
    Preface,
    /// CONTINUATION without a header block open, or for another stream.
    #[error("CONTINUATION out of sequence on stream {0}")]
    Continuation(u32),
    /// Another frame while a header block is open (RFC 9113 §6.10).
    #[error("frame type {0} inside a header block")]
    Interleaved(u8),
    /// A header block past [`MAX_BLOCK`].
    #[error("header block past {MAX_BLOCK} bytes")]
    Block,
    /// Padding or priority fields longer than the frame.
    #[error("HEADERS frame shorter than its padding")]
    Padding,
    /// The block does not decode.
    #[error("HPACK: {0}")]
    Hpack(#[from] hpack::Error),
}

/// What one direction's bytes said.
// Held by value, not boxed: a box would allocate per header block.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// A whole header block on a stream: a request's or a response's
    /// headers, or trailers.
    Headers {
        stream: u32,
        block: Fields,
        end_stream: bool,
    },
    /// DATA ended a stream (the request or response is complete).
    EndStream { stream: u32 },
    /// The sender's SETTINGS_HEADER_TABLE_SIZE: what the *other* direction's
    /// encoder may use.
    TableSize(usize),
}

/// Where a direction is within its byte stream.
#[derive(Debug)]
enum State {
    /// The client's preface, this many bytes of it seen.
    Preface(usize),
    /// Reading a frame header: the bytes so far.
    Header(Partial),
    /// Inside a frame's payload.
    Payload(Frame),
    /// Gave up (an error): nothing more is read on this direction.
    Lost,
}

/// A frame header's first bytes: on the stack, as every frame has one.
#[derive(Debug, Default)]
struct Partial {
    bytes: [u8; 9],
    len: usize,
}

impl Partial {
    fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[derive(Debug)]
struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    /// Payload bytes still to come.
    left: usize,
    /// Whether its payload is read (HEADERS, CONTINUATION, SETTINGS) into
    /// the direction's `payload`; others are skipped.
    keep: bool,
}

/// One direction of one HTTP/2 connection.
#[derive(Debug)]
pub struct Direction {
    state: State,
    decoder: Decoder,
    /// An open header block: stream, END_STREAM; its bytes in `block_bytes`.
    block: Option<(u32, bool)>,
    /// The frame being read's payload (reused: no allocation per frame).
    payload: Vec<u8>,
    /// The open header block's bytes (reused).
    block_bytes: Vec<u8>,
    /// The server's side from the connection's start, no frame read yet:
    /// its first must be its preface, a SETTINGS frame (RFC 9113 §3.4).
    preface_due: bool,
}

impl Direction {
    /// The client's side from the connection's start: the preface first.
    pub fn client() -> Self {
        Self {
            state: State::Preface(0),
            decoder: Decoder::new(),
            block: None,
            payload: Vec::new(),
            block_bytes: Vec::new(),
            preface_due: false,
        }
    }

    /// The server's side from the connection's start: its preface first,
    /// or (the kernel read on from the server's next write when the two
    /// prefaces crossed) whatever it wrote next, read as joined.
    pub fn server() -> Self {
        Self {
            state: State::Header(Partial::default()),
            decoder: Decoder::new(),
            block: None,
            payload: Vec::new(),
            block_bytes: Vec::new(),
            preface_due: true,
        }
    }

    /// The server's side from the connection's start, read from OpenSSL's
    /// calls: its preface may reach user space after its next frames (the
    /// client's read of it and the server's own writes race to the ring),
    /// and then goes by as bytes already read. Over TLS there is no
    /// `Upgrade: h2c`, so nothing the server wrote before it touches the
    /// HPACK table: its first frame seen, whatever it is, starts a table
    /// in sync.
    pub fn server_over_tls() -> Self {
        Self {
            preface_due: false,
            ..Self::server()
        }
    }

    /// Either side, joined at a frame boundary mid-connection: its HPACK
    /// table holds entries this reader never saw.
    pub fn joined() -> Self {
        Self {
            state: State::Header(Partial::default()),
            decoder: Decoder::joined(),
            block: None,
            payload: Vec::new(),
            block_bytes: Vec::new(),
            preface_due: false,
        }
    }

    /// Whether an error stopped this direction.
    pub fn lost(&self) -> bool {
        matches!(self.state, State::Lost)
    }

    /// Whether every HPACK index resolves.
    pub fn synchronised(&self) -> bool {
        self.decoder.synchronised()
    }

    /// The table size the other side's SETTINGS allow this direction.
    pub fn set_table_size(&mut self, size: usize) {
        self.decoder.set_allowed(size);
    }

    /// `n` bytes of this direction the kernel did not copy: the rest of a
    /// frame it skips (DATA), whole skipped frames, and the bytes after it
    /// start a frame. Inside a frame that is read (the kernel's budget ran
    /// out) the block is lost: the table may have changed unseen, so the
    /// decoder starts over as if joined (see [`Decoder::joined`]).
    pub fn gap(&mut self, n: usize, out: &mut Vec<Event>) {
        match &mut self.state {
            State::Lost => {}
            State::Payload(f) if !f.keep => {
                // Its end is in the gap (the bytes after one start a
                // frame): a DATA frame's END_STREAM counts.
                let _ = n;
                f.left = 0;
                let _ = self.finish_if_empty(out);
                self.state = State::Header(Partial::default());
            }
            State::Header(h) if h.is_empty() => {}
            // A frame header cut short whose frame was skipped.
            State::Header(_) if self.block.is_none() => {
                self.state = State::Header(Partial::default())
            }
            _ => {
                self.state = State::Header(Partial::default());
                self.block = None;
                self.decoder.lose_table();
            }
        }
    }

    /// Reads the next bytes of this direction. On an error the direction
    /// is lost (and says so); what came before it is in `out`.
    pub fn push(&mut self, mut bytes: &[u8], out: &mut Vec<Event>) -> Result<(), Error> {
        let r = self.read(&mut bytes, out);
        if r.is_err() {
            self.state = State::Lost;
            self.block = None;
        }
        r
    }

    fn read(&mut self, bytes: &mut &[u8], out: &mut Vec<Event>) -> Result<(), Error> {
        while !bytes.is_empty() {
            match &mut self.state {
                State::Lost => return Ok(()),
                State::Preface(seen) => {
                    let want = &PREFACE[*seen..];
                    let n = want.len().min(bytes.len());
                    if bytes[..n] != want[..n] {
                        return Err(Error::Preface);
                    }
                    *seen += n;
                    *bytes = &bytes[n..];
                    if *seen == PREFACE.len() {
                        self.state = State::Header(Partial::default());
                    }
                }
                State::Header(h) => {
                    let n = (9 - h.len).min(bytes.len());
                    h.bytes[h.len..h.len + n].copy_from_slice(&bytes[..n]);
                    h.len += n;
                    *bytes = &bytes[n..];
                    if h.len == 9 {
                        let header = h.bytes;
                        if std::mem::take(&mut self.preface_due)
                            && !(header[3] == SETTINGS && header[4] & ACK == 0)
                        {
                            // The server's preface went by unseen, and
                            // whatever else it wrote before the kernel
                            // followed: its table may hold entries never
                            // seen (an `Upgrade: h2c` answer's headers).
                            self.decoder.lose_table();
                        }
                        let mut frame = self.begin(header)?;
                        self.payload.clear();
                        // A DATA frame's END_STREAM ends its stream as its
                        // header is read: the kernel copies that header
                        // and skips the payload, whose end user space
                        // would learn of only with the next bytes copied
                        // (the next call's, perhaps much later).
                        if frame.kind == DATA && frame.flags & END_STREAM != 0 {
                            out.push(Event::EndStream {
                                stream: frame.stream,
                            });
                            frame.flags &= !END_STREAM;
                        }
                        self.state = State::Payload(frame);
                        self.finish_if_empty(out)?;
                    }
                }
                State::Payload(f) => {
                    let n = f.left.min(bytes.len());
                    if f.keep {
                        self.payload.extend_from_slice(&bytes[..n]);
                    }
                    f.left -= n;
                    *bytes = &bytes[n..];
                    self.finish_if_empty(out)?;
                }
            }
        }
        Ok(())
    }

    fn begin(&self, h: [u8; 9]) -> Result<Frame, Error> {
        let len = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
        let (kind, flags) = (h[3], h[4]);
        let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
        if let Some((open, _)) = &self.block {
            if kind != CONTINUATION {
                return Err(Error::Interleaved(kind));
            }
            if stream != *open {
                return Err(Error::Continuation(stream));
            }
            if self.block_bytes.len() + len > MAX_BLOCK {
                return Err(Error::Block);
            }
        } else if kind == CONTINUATION {
            return Err(Error::Continuation(stream));
        }
        let keep = matches!(kind, HEADERS | CONTINUATION | PUSH_PROMISE)
            || (kind == SETTINGS && flags & ACK == 0);
        if keep && len > MAX_BLOCK {
            return Err(Error::Block);
        }
        Ok(Frame {
            kind,
            flags,
            stream,
            left: len,
            keep,
        })
    }

    /// Ends the current frame once its payload is all read.
    fn finish_if_empty(&mut self, out: &mut Vec<Event>) -> Result<(), Error> {
        let State::Payload(f) = &self.state else {
            return Ok(());
        };
        if f.left > 0 {
            return Ok(());
        }
        let State::Payload(f) =
            std::mem::replace(&mut self.state, State::Header(Partial::default()))
        else {
            return Ok(());
        };
        match f.kind {
            DATA if f.flags & END_STREAM != 0 => out.push(Event::EndStream { stream: f.stream }),
            HEADERS => {
                let range = fragment_range(&f, &self.payload)?;
                self.block_bytes.clear();
                self.block_bytes.extend_from_slice(&self.payload[range]);
                self.block = Some((f.stream, f.flags & END_STREAM != 0));
                if f.flags & END_HEADERS != 0 {
                    self.end_block(out)?;
                }
            }
            CONTINUATION => {
                if self.block.is_some() {
                    self.block_bytes.extend_from_slice(&self.payload);
                }
                if f.flags & END_HEADERS != 0 {
                    self.end_block(out)?;
                }
            }
            PUSH_PROMISE => {
                // Its header block changes the table like any other: decoded
                // (and dropped) to keep the table right.
                let range = fragment_range(&f, &self.payload)?;
                let promised = self.payload[range].get(4..).unwrap_or_default();
                self.block_bytes.clear();
                self.block_bytes.extend_from_slice(promised);
                self.block = Some((f.stream, false));
                if f.flags & END_HEADERS != 0 {
                    self.block = None;
                    self.decoder.decode_into(
                        &self.block_bytes,
                        &mut |_: Option<&[u8]>, _: Option<&[u8]>| {},
                    )?;
                }
            }
            SETTINGS => {
                for s in self.payload.chunks_exact(6) {
                    if u16::from_be_bytes([s[0], s[1]]) == HEADER_TABLE_SIZE {
                        let v = u32::from_be_bytes([s[2], s[3], s[4], s[5]]);
                        out.push(Event::TableSize(v as usize));
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn end_block(&mut self, out: &mut Vec<Event>) -> Result<(), Error> {
        if let Some((stream, end_stream)) = self.block.take() {
            let mut block = Fields::default();
            self.decoder.decode_into(&self.block_bytes, &mut block)?;
            out.push(Event::Headers {
                stream,
                block,
                end_stream,
            });
        }
        Ok(())
    }
}

/// Where a HEADERS (or PUSH_PROMISE) payload's block fragment lies, its
/// padding and priority left out.
fn fragment_range(f: &Frame, payload: &[u8]) -> Result<std::ops::Range<usize>, Error> {
    let mut start = 0usize;
    let mut pad = 0usize;
    if f.flags & PADDED != 0 {
        pad = usize::from(*payload.first().ok_or(Error::Padding)?);
        start = 1;
    }
    if f.kind == HEADERS && f.flags & PRIORITY != 0 {
        start += 5;
    }
    let end = payload.len().checked_sub(pad).ok_or(Error::Padding)?;
    if start > end {
        return Err(Error::Padding);
    }
    Ok(start..end)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::h2::testing::frame;

    /// A header block of literal fields without indexing, new names.
    fn block(fields: &[(&str, &str)]) -> Vec<u8> {
        let mut b = Vec::new();
        for (n, v) in fields {
            b.push(0x00);
            for s in [n, v] {
                // 7-bit prefix length (§5.1), no Huffman.
                if s.len() < 127 {
                    b.push(s.len() as u8);
                } else {
                    b.push(0x7f);
                    let mut rest = s.len() - 127;
                    while rest >= 128 {
                        b.push((rest % 128) as u8 | 0x80);
                        rest /= 128;
                    }
                    b.push(rest as u8);
                }
                b.extend_from_slice(s.as_bytes());
            }
        }
        b
    }

    /// The kept fields' names ([`Fields`] keeps what the engine reads).
    fn names(e: &Event) -> Vec<String> {
        match e {
            Event::Headers { block, .. } => block.names().map(str::to_owned).collect(),
            _ => Vec::new(),
        }
    }

    #[test]
    fn a_request_read_a_byte_at_a_time_gives_its_headers_and_skips_data() {
        let mut wire = PREFACE.to_vec();
        wire.extend(frame(SETTINGS, 0, 0, &[0, 1, 0, 0, 0x10, 0]));
        wire.extend(frame(
            HEADERS,
            END_HEADERS,
            1,
            &[
                &[0x82, 0x86, 0x84][..],
                &block(&[(
                    "traceparent",
                    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                )]),
            ]
            .concat(),
        ));
        // A big DATA frame: skipped, not kept.
        wire.extend(frame(DATA, END_STREAM, 1, &vec![0xaa; 20000]));
        let mut d = Direction::client();
        let mut out = Vec::new();
        for b in &wire {
            d.push(std::slice::from_ref(b), &mut out).unwrap();
        }
        assert_eq!(out[0], Event::TableSize(4096));
        assert_eq!(names(&out[1]), [":method", ":path", "traceparent"]);
        assert!(matches!(
            out[1],
            Event::Headers {
                stream: 1,
                end_stream: false,
                ..
            }
        ));
        assert_eq!(out[2], Event::EndStream { stream: 1 });
        assert_eq!(out.len(), 3);
        assert!(!d.lost());
    }

    #[test]
    fn a_16_kib_metadata_block_over_continuation_frames_is_one_block() {
        let big = "x".repeat(16 * 1024);
        let b = block(&[
            (":status", "200"),
            ("tracestate", &big),
            ("grpc-status", "0"),
        ]);
        let (first, rest) = b.split_at(5000);
        let (second, third) = rest.split_at(8000);
        // Padded and with priority, as a server may send it.
        let mut headers = vec![3u8];
        headers.extend([0, 0, 0, 0, 16]);
        headers.extend_from_slice(first);
        headers.extend([0, 0, 0]);
        let mut wire = frame(HEADERS, PADDED | PRIORITY | END_STREAM, 3, &headers);
        wire.extend(frame(CONTINUATION, 0, 3, second));
        wire.extend(frame(CONTINUATION, END_HEADERS, 3, third));
        let mut d = Direction::server();
        let mut out = Vec::new();
        for chunk in wire.chunks(1400) {
            d.push(chunk, &mut out).unwrap();
        }
        assert_eq!(out.len(), 1);
        assert_eq!(names(&out[0]), [":status", "tracestate", "grpc-status"]);
        let Event::Headers {
            block,
            end_stream,
            stream,
        } = &out[0]
        else {
            panic!("{out:?}");
        };
        assert_eq!((*stream, *end_stream), (3, true));
        use crate::http::context::Headers as _;
        assert_eq!(block.header("tracestate").map(str::len), Some(16 * 1024));
    }

    #[test]
    fn a_server_side_that_does_not_start_with_its_preface_is_read_as_joined() {
        // An index no block inserted: an error on a side read from its
        // preface, an unknown field on one whose start went by unseen.
        let answer = frame(HEADERS, END_HEADERS | END_STREAM, 1, &[0x88, 0xbe]);
        let mut out = Vec::new();
        let mut d = Direction::server();
        let mut wire = frame(SETTINGS, 0, 0, &[]);
        wire.extend(&answer);
        assert_eq!(
            d.push(&wire, &mut out),
            Err(Error::Hpack(hpack::Error::Index(62)))
        );
        let mut d = Direction::server();
        let mut wire = frame(SETTINGS, ACK, 0, &[]);
        wire.extend(&answer);
        d.push(&wire, &mut out).unwrap();
        let [Event::Headers { block, .. }] = &out[..] else {
            panic!("{out:?}");
        };
        // :status read, the unseen entry counted unknown.
        assert_eq!(names(&out[0]), [":status"]);
        assert!(block.incomplete());
        assert!(!d.synchronised());
    }

    #[test]
    fn out_of_order_frames_lose_the_direction_with_a_reason() {
        let mut out = Vec::new();
        let mut d = Direction::server();
        assert_eq!(
            d.push(&frame(CONTINUATION, END_HEADERS, 1, &[0x88]), &mut out),
            Err(Error::Continuation(1))
        );
        assert!(d.lost());
        // Lost stays lost: nothing more is read.
        assert!(
            d.push(&frame(HEADERS, END_HEADERS, 1, &[0x88]), &mut out)
                .is_ok()
        );
        assert!(out.is_empty());
        let mut d = Direction::server();
        let mut wire = frame(HEADERS, 0, 1, &[0x88]);
        wire.extend(frame(DATA, 0, 1, b"x"));
        assert_eq!(d.push(&wire, &mut out), Err(Error::Interleaved(DATA)));
        assert_eq!(
            Direction::client().push(b"GET / HTTP/1.1\r\n", &mut out),
            Err(Error::Preface)
        );
        assert_eq!(
            Direction::server().push(
                &frame(HEADERS, END_HEADERS | PADDED, 1, &[9, 0x88]),
                &mut out
            ),
            Err(Error::Padding)
        );
        let huge = [0x7f, 0xff, 0xff, HEADERS, 0, 0, 0, 0, 1];
        assert_eq!(Direction::server().push(&huge, &mut out), Err(Error::Block));
    }
}
