//! One header block's fields as the engine reads them: only the fields it
//! asks for ([`KEPT`]: the pseudo-headers it names a hop by, the gRPC
//! status, the client and server products; and every trace-context header),
//! names lowercase, in one buffer held inline. Decoding a block into it
//! allocates nothing for a usual block (issue 33); what is not kept is
//! decoded (the table needs it) and dropped.

use smallvec::SmallVec;

use super::hpack::{Block, Sink};
use crate::http::{
    context::{Found, Headers, traceparent},
    message::{OTHER_FORMATS, W3C_HEADERS, is_other_format},
};

/// The fields kept besides the context headers: what
/// [`crate::gap::hop::Request::from_h2`] and the exchange's status and
/// gRPC readers ask for. With every context header ([`W3C_HEADERS`],
/// [`OTHER_FORMATS`]: what [`crate::http::context::Propagation`] reads).
pub const KEPT: [&str; 8] = [
    ":method",
    ":path",
    ":authority",
    ":status",
    "content-type",
    "grpc-status",
    "server",
    "user-agent",
];

/// Bytes of kept names and values held without an allocation: a gRPC
/// request's (method, path, authority, content type, user agent, a
/// traceparent and a tracestate) fit.
const INLINE_TEXT: usize = 224;
/// Fields held without an allocation.
const INLINE_FIELDS: usize = 8;

/// One header block's kept fields. Cloned by value (no allocation while
/// inline): a stream's start and its exchange each hold it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fields {
    text: SmallVec<[u8; INLINE_TEXT]>,
    /// Per field: where its name starts, where its value starts (the
    /// name's end), where its value ends.
    at: SmallVec<[(u32, u32, u32); INLINE_FIELDS]>,
    /// Fields whose name (or whole field) came from an unseen table entry
    /// and whose value's shape tells nothing.
    pub unknown: usize,
    /// `traceparent` fields recognised by their value's shape alone.
    pub inferred: usize,
    /// Read on a connection joined mid-way (its start unseen).
    pub joined: bool,
    /// A header of a context format other than W3C's is kept.
    other_formats: bool,
}

impl Fields {
    /// A list of decoded fields, kept as a block decoded into [`Fields`]
    /// would keep them (tests, and readers of [`super::hpack::Decoder::decode`]).
    pub fn from_block(block: Block) -> Self {
        let mut f = Self::default();
        for field in &block.fields {
            f.field(field.name.as_deref(), field.value.as_deref());
        }
        f
    }

    /// The kept fields' names, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.at.iter().map(|&(n, m, _)| self.str(n, m))
    }

    /// Whether a field may be missing from what was read.
    pub fn incomplete(&self) -> bool {
        self.unknown > 0
    }

    fn str(&self, from: u32, to: u32) -> &str {
        let bytes = &self.text[from as usize..to as usize];
        // SAFETY: `push` writes only whole UTF-8 strings (a kept name is
        // one of KEPT's ASCII names; values are checked or replaced) and
        // records their bounds, which are what is read back here.
        unsafe { std::str::from_utf8_unchecked(bytes) }
    }

    /// Keeps a field; `name` is the KEPT name it matched.
    fn push(&mut self, name: &'static str, value: &[u8]) {
        self.other_formats |= is_other_format(name.as_bytes());
        let from = self.text.len() as u32;
        self.text.extend_from_slice(name.as_bytes());
        let mid = self.text.len() as u32;
        // Header values are UTF-8 in practice; bytes that are not are
        // replaced (what a str reader sees), rarely, in a copy.
        match std::str::from_utf8(value) {
            Ok(_) => self.text.extend_from_slice(value),
            Err(_) => self
                .text
                .extend_from_slice(String::from_utf8_lossy(value).as_bytes()),
        }
        self.at.push((from, mid, self.text.len() as u32));
    }
}

/// The kept name `name` is, in any case (HTTP/2 sends names lowercase:
/// that is looked for first).
fn kept(name: &[u8]) -> Option<&'static str> {
    let all = || {
        KEPT.iter()
            .chain(&W3C_HEADERS)
            .chain(&OTHER_FORMATS)
            .copied()
    };
    all().find(|k| k.as_bytes() == name).or_else(|| {
        name.iter()
            .any(u8::is_ascii_uppercase)
            .then(|| all().find(|k| k.as_bytes().eq_ignore_ascii_case(name)))
            .flatten()
    })
}

impl Sink for Fields {
    fn field(&mut self, name: Option<&[u8]>, value: Option<&[u8]>) {
        match (name, value) {
            (Some(n), Some(v)) => {
                if let Some(name) = kept(n) {
                    self.push(name, v);
                }
            }
            (None, Some(v))
                if std::str::from_utf8(v)
                    .is_ok_and(|v| matches!(traceparent(v), Found::Valid(_))) =>
            {
                self.inferred += 1;
                self.push("traceparent", v);
            }
            _ => self.unknown += 1,
        }
    }
}

impl Headers for Fields {
    fn header_all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> {
        self.at
            .iter()
            .filter(move |&&(n, m, _)| {
                self.text[n as usize..m as usize].eq_ignore_ascii_case(name.as_bytes())
            })
            .map(|&(_, m, e)| self.str(m, e))
    }

    fn other_formats(&self) -> bool {
        self.other_formats || self.unknown > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_fields_read_are_kept_named_lowercase() {
        let mut f = Fields::default();
        f.field(Some(b":Path"), Some(b"/shop.Cart/Add"));
        f.field(Some(b"x-secret-token"), Some(b"abc"));
        f.field(Some(b"traceparent"), Some(b"00-x"));
        f.field(None, None);
        assert_eq!(f.header(":path"), Some("/shop.Cart/Add"));
        assert_eq!(f.header("x-secret-token"), None, "not kept");
        assert_eq!(f.header("TraceParent"), Some("00-x"));
        assert_eq!((f.unknown, f.inferred), (1, 0));
        assert!(f.incomplete());
        // A value from an unseen name, shaped like a traceparent: kept.
        let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        f.field(None, Some(tp.as_bytes()));
        assert_eq!(f.inferred, 1);
        assert_eq!(
            f.header_all("traceparent").collect::<Vec<_>>(),
            ["00-x", tp]
        );
    }

    #[test]
    fn the_context_readers_names_are_all_kept() {
        // Every header a context format is read from: a format whose
        // header were dropped here would read as missing over HTTP/2.
        for name in [
            "traceparent",
            "uber-trace-id",
            "b3",
            "x-b3-traceid",
            "x-datadog-trace-id",
            "x-amzn-trace-id",
            "x-cloud-trace-context",
            "ot-tracer-traceid",
            "grpc-trace-bin",
            "sw8",
            "baggage",
        ] {
            assert_eq!(kept(name.as_bytes()), Some(name));
            assert_eq!(kept(name.to_uppercase().as_bytes()), Some(name));
        }
    }
}
