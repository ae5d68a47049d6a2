//! HTTP/1.x message heads: the request or status line and the header
//! fields, parsed from the bytes the kernel copied.
//!
//! Zero-copy: a [`Head`] keeps the head's bytes as a [`Bytes`] slice of the
//! event's payload and its fields as offsets into it, so parsing a head
//! allocates its field list and its path, not a `String` per name and
//! value. Never trusts its input: any byte sequence gives a head or an
//! error, never a panic (see the fuzz-style test below and `fuzz/`).

use bytes::Bytes;
use thiserror::Error;

/// Header fields kept per message at most; the rest are counted, not kept.
pub const MAX_HEADERS: usize = 64;
/// Trace-context headers kept past [`MAX_HEADERS`], this many at most: a
/// context after 64 other headers is still a context, not a missing one.
const MAX_CONTEXT_PAST: usize = 16;
/// W3C's trace-context headers (the other formats': [`OTHER_FORMATS`]).
pub const W3C_HEADERS: [&str; 3] = ["traceparent", "tracestate", "baggage"];

/// Whether header `name` carries trace context in any format read.
pub fn is_context_header(name: &[u8]) -> bool {
    W3C_HEADERS
        .iter()
        .any(|w| w.as_bytes().eq_ignore_ascii_case(name))
        || is_other_format(name)
}

/// Why bytes are not (yet) an HTTP/1.x message head.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum HeadError {
    /// The blank line that ends the head has not been seen.
    #[error("incomplete header block ({0} bytes so far)")]
    Incomplete(usize),
    /// The first line is neither a request line nor a status line.
    #[error("not an HTTP/1.x start line: {0:?}")]
    StartLine(String),
    /// A header line has no colon or a name that is not a token.
    #[error("malformed header line {0:?}")]
    HeaderLine(String),
}

/// Request or response, with what its start line says. Methods and
/// versions are one of a known few, so they are `'static`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StartLine {
    Request {
        method: &'static str,
        /// The path, without query string or fragment: queries can carry
        /// secrets and are never kept.
        path: Path,
        version: &'static str,
    },
    Response {
        version: &'static str,
        status: u16,
    },
}

/// A request's path: a slice of its head's text (UTF-8), not a copy.
#[derive(Clone, PartialEq, Eq)]
pub struct Path(Bytes);

impl Path {
    pub fn as_str(&self) -> &str {
        // Cut from valid UTF-8 at ASCII bytes (or copied from a str), so
        // never fails.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl std::ops::Deref for Path {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl std::fmt::Debug for Path {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl std::fmt::Display for Path {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<&str> for Path {
    fn from(s: &str) -> Self {
        Self(Bytes::copy_from_slice(s.as_bytes()))
    }
}

impl PartialEq<&str> for Path {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialEq<str> for Path {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

/// One header field: where its name and value are in [`Head`]'s text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Field {
    name: (u32, u32),
    value: (u32, u32),
    /// A credential: present, its value never shown.
    redacted: bool,
}

/// A parsed message head.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Head {
    pub start: StartLine,
    /// The head's text, valid UTF-8 (bytes that were not are replaced with
    /// U+FFFD, in a copy): usually a slice of the event's payload.
    text: Bytes,
    /// Header fields in order, at most [`MAX_HEADERS`]; a usual head's
    /// inline, with no allocation of their own.
    fields: Fields,
    /// Fields beyond [`MAX_HEADERS`], dropped.
    pub dropped_headers: usize,
    /// A header of a context format other than W3C's is among the fields
    /// ([`crate::http::context::Headers::other_formats`]).
    other_formats: bool,
    /// `Connection` named the option `close` (or `keep-alive`), noted as
    /// the fields are cut, so asking costs nothing per message.
    close_option: bool,
    keep_alive_option: bool,
    /// Length of the head including its final blank line.
    pub len: usize,
}

/// A head's fields: [`INLINE_FIELDS`] without an allocation.
type Fields = smallvec::SmallVec<[Field; INLINE_FIELDS]>;
/// Fields a head holds inline: most requests and responses send fewer.
const INLINE_FIELDS: usize = 16;

/// Header names whose values are secrets: kept as present, value redacted.
const REDACTED: [&str; 5] = [
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
    "x-api-key",
];

/// The headers of the formats other than W3C's (`traceparent`,
/// `tracestate`, `baggage`).
pub const OTHER_FORMATS: [&str; 18] = [
    "uber-trace-id",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
    "x-datadog-trace-id",
    "x-datadog-parent-id",
    "x-datadog-sampling-priority",
    "x-datadog-tags",
    "x-amzn-trace-id",
    "x-cloud-trace-context",
    "ot-tracer-traceid",
    "ot-tracer-spanid",
    "ot-tracer-sampled",
    "grpc-trace-bin",
    "sw8",
];

/// Whether header `name` is one of [`OTHER_FORMATS`] (any case).
pub fn is_other_format(name: &[u8]) -> bool {
    // Most headers fail on their first byte.
    matches!(
        name.first().map(u8::to_ascii_lowercase),
        Some(b'u' | b'b' | b'x' | b'o' | b'g' | b's')
    ) && OTHER_FORMATS
        .iter()
        .any(|f| f.as_bytes().eq_ignore_ascii_case(name))
}

/// Whether header `name` holds a credential ([`REDACTED`]); most names
/// fail on their first byte.
fn is_redacted(name: &str) -> bool {
    matches!(
        name.as_bytes().first().map(u8::to_ascii_lowercase),
        Some(b'a' | b'p' | b'c' | b's' | b'x')
    ) && REDACTED.iter().any(|r| r.eq_ignore_ascii_case(name))
}

/// What a credential's value reads as.
pub const REDACTED_VALUE: &str = "[redacted]";

impl Head {
    fn bytes(&self, (from, to): (u32, u32)) -> &[u8] {
        &self.text[from as usize..to as usize]
    }

    fn str(&self, at: (u32, u32)) -> &str {
        // Fields are cut at ASCII bytes of valid UTF-8, so never fails.
        std::str::from_utf8(self.bytes(at)).unwrap_or_default()
    }

    fn value(&self, f: &Field) -> &str {
        if f.redacted {
            REDACTED_VALUE
        } else {
            self.str(f.value)
        }
    }

    /// Header fields in order, names as written, credentials redacted.
    pub fn headers(&self) -> impl Iterator<Item = (&str, &str)> + '_ {
        self.fields
            .iter()
            .map(|f| (self.str(f.name), self.value(f)))
    }

    /// Whether a header of a context format other than W3C's is kept.
    pub fn other_formats(&self) -> bool {
        self.other_formats
    }

    /// Whether the connection ends after this message (RFC 9112 §9.3): a
    /// `close` option in `Connection`, or HTTP/1.0 without `keep-alive`.
    pub fn closes_connection(&self) -> bool {
        let version = match &self.start {
            StartLine::Request { version, .. } | StartLine::Response { version, .. } => *version,
        };
        self.close_option || (version == "HTTP/1.0" && !self.keep_alive_option)
    }

    /// Header fields kept (at most [`MAX_HEADERS`]).
    pub fn header_count(&self) -> usize {
        self.fields.len()
    }

    /// The first value of header `name` (any case).
    pub fn header<'a>(&'a self, name: &str) -> Option<&'a str> {
        self.header_all(name).next()
    }

    /// Every value of header `name` (any case), in order.
    pub fn header_all<'a>(&'a self, name: &str) -> impl Iterator<Item = &'a str> {
        self.fields
            .iter()
            .filter(move |f| self.bytes(f.name).eq_ignore_ascii_case(name.as_bytes()))
            .map(|f| self.value(f))
    }

    /// Keeps only the fields named in `names` (lowercase), in a copy of
    /// just their bytes: what a message waiting for its response holds,
    /// instead of the whole payload its head was a slice of.
    pub fn retain(&mut self, names: &[&str]) {
        let mut text = Vec::new();
        let mut fields = Fields::new();
        let mut put = |bytes: &[u8]| {
            let from = text.len() as u32;
            text.extend_from_slice(bytes);
            (from, text.len() as u32)
        };
        for f in &self.fields {
            let name = self.bytes(f.name);
            if !names
                .iter()
                .any(|n| n.as_bytes().eq_ignore_ascii_case(name))
            {
                continue;
            }
            fields.push(Field {
                name: put(name),
                value: put(self.bytes(f.value)),
                redacted: f.redacted,
            });
        }
        self.text = Bytes::from(text);
        self.fields = fields;
        if let StartLine::Request { path, .. } = &mut self.start {
            *path = Path::from(path.as_str());
        }
    }
}

/// A 1xx status other than 101: an interim response, the final one still
/// to come.
pub fn is_interim(status: u16) -> bool {
    (100..200).contains(&status) && status != 101
}

/// Where the first CRLF in `buf` starts. `memchr` on the LF: a `memmem`
/// searcher costs more to build than a head's short lines take to scan.
fn find_crlf(buf: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = memchr::memchr(b'\n', &buf[from..]) {
        let lf = from + i;
        if lf > 0 && buf[lf - 1] == b'\r' {
            return Some(lf - 1);
        }
        from = lf + 1;
    }
    None
}

fn find_blank_line(buf: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = find_crlf(&buf[from..]) {
        let end = from + i + 2;
        if buf[end..].starts_with(b"\r\n") {
            return Some(end + 2);
        }
        from = end;
    }
    None
}

/// RFC 9110 `tchar`, as a table: a byte test per character of every name.
const TCHAR: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        t[b] = c.is_ascii_alphanumeric()
            || matches!(
                c,
                b'!' | b'#'
                    | b'$'
                    | b'%'
                    | b'&'
                    | b'\''
                    | b'*'
                    | b'+'
                    | b'-'
                    | b'.'
                    | b'^'
                    | b'_'
                    | b'`'
                    | b'|'
                    | b'~'
            );
        b += 1;
    }
    t
};

fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| TCHAR[b as usize])
}

const METHODS: [&str; 9] = [
    "GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "CONNECT", "TRACE",
];

fn version(v: &str) -> Option<&'static str> {
    match v {
        "HTTP/1.1" => Some("HTTP/1.1"),
        "HTTP/1.0" => Some("HTTP/1.0"),
        _ => None,
    }
}

/// `line`'s start line; `path` keeps the path (a slice of the text `line`
/// is in, or a copy).
fn parse_start(line: &str, path: impl Fn(&str) -> Path) -> Result<StartLine, HeadError> {
    let bad = || HeadError::StartLine(line.chars().take(80).collect());
    let mut parts = line.splitn(3, ' ');
    let first = parts.next().ok_or_else(bad)?;
    if first.starts_with("HTTP/") {
        let version = version(first).ok_or_else(bad)?;
        let code = parts.next().ok_or_else(bad)?;
        if code.len() != 3 || !code.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let status: u16 = code.parse().map_err(|_| bad())?;
        if !(100..=599).contains(&status) {
            return Err(bad());
        }
        return Ok(StartLine::Response { version, status });
    }
    let method = *METHODS.iter().find(|m| **m == first).ok_or_else(bad)?;
    let target = parts.next().ok_or_else(bad)?;
    let version = parts.next().and_then(version).ok_or_else(bad)?;
    if target.is_empty() {
        return Err(bad());
    }
    // absolute-form (proxies) carries scheme and authority: keep the path.
    let target = match target.find("://") {
        Some(i) => target[i + 3..]
            .find('/')
            .map_or("/", |p| &target[i + 3 + p..]),
        None => target,
    };
    let path = match target.split(['?', '#']).next().filter(|p| !p.is_empty()) {
        Some(p) => path(p),
        None => Path(Bytes::from_static(b"/")),
    };
    Ok(StartLine::Request {
        method,
        path,
        version,
    })
}

/// The CRLF-separated lines of a head (a `str::split` on "\r\n" was a
/// tenth of the parser's time).
struct Lines<'a>(&'a str);

impl<'a> Iterator for Lines<'a> {
    type Item = &'a str;
    fn next(&mut self) -> Option<&'a str> {
        let rest = self.0;
        if rest.is_empty() {
            return None;
        }
        match find_crlf(rest.as_bytes()) {
            Some(i) => {
                self.0 = &rest[i + 2..];
                Some(&rest[..i])
            }
            None => {
                self.0 = "";
                Some(rest)
            }
        }
    }
}

/// Parses a message head from the start of `buf`, copying the head's bytes
/// (see [`parse`] for the zero-copy form).
pub fn parse_head(buf: &[u8]) -> Result<Head, HeadError> {
    match find_blank_line(buf) {
        Some(len) => parse(&Bytes::copy_from_slice(&buf[..len])),
        None => parse(&Bytes::copy_from_slice(buf)),
    }
}

/// Parses a message head from the start of `buf`; the head keeps a slice
/// of `buf`, not a copy, when its bytes are UTF-8 (as they nearly always are).
pub fn parse(buf: &Bytes) -> Result<Head, HeadError> {
    let Some(len) = find_blank_line(buf) else {
        // A start line that is already wrong need not wait for more bytes.
        if let Some(eol) = find_crlf(buf) {
            parse_start(&String::from_utf8_lossy(&buf[..eol]), |p| Path::from(p))?;
        }
        return Err(HeadError::Incomplete(buf.len()));
    };
    // Header values are ISO-8859-1 in theory and UTF-8 in practice; lossy
    // decoding keeps every ASCII byte, which is all trace context uses.
    let text = match std::str::from_utf8(&buf[..len - 4]) {
        Ok(_) => buf.slice(..len - 4),
        Err(_) => Bytes::from(String::from_utf8_lossy(&buf[..len - 4]).into_owned()),
    };
    let s = std::str::from_utf8(&text).unwrap_or_default();
    let at = |part: &str| {
        let from = part.as_ptr() as usize - s.as_ptr() as usize;
        (from as u32, (from + part.len()) as u32)
    };
    let mut lines = Lines(s);
    let start = parse_start(lines.next().unwrap_or_default(), |p| {
        let within = s.as_bytes().as_ptr_range();
        if within.contains(&p.as_ptr()) && p.as_bytes().as_ptr_range().end <= within.end {
            Path(text.slice_ref(p.as_bytes()))
        } else {
            Path::from(p)
        }
    })?;
    let mut fields = Fields::new();
    let mut dropped_headers = 0;
    let mut other_formats = false;
    let (mut close_option, mut keep_alive_option) = (false, false);
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Err(HeadError::HeaderLine(line.chars().take(80).collect()));
        };
        if !is_token(name) {
            return Err(HeadError::HeaderLine(line.chars().take(80).collect()));
        }
        if fields.len() >= MAX_HEADERS
            && (fields.len() >= MAX_HEADERS + MAX_CONTEXT_PAST
                || !is_context_header(name.as_bytes()))
        {
            dropped_headers += 1;
            continue;
        }
        other_formats |= is_other_format(name.as_bytes());
        if name.len() == 10 && name.eq_ignore_ascii_case("connection") {
            for option in value.split(',').map(|o| o.trim_matches([' ', '\t'])) {
                close_option |= option.eq_ignore_ascii_case("close");
                keep_alive_option |= option.eq_ignore_ascii_case("keep-alive");
            }
        }
        fields.push(Field {
            name: at(name),
            value: at(value.trim_matches([' ', '\t'])),
            redacted: is_redacted(name),
        });
    }
    Ok(Head {
        start,
        text,
        fields,
        dropped_headers,
        other_formats,
        close_option,
        keep_alive_option,
        len,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_request_and_drops_the_query() {
        let raw: &[u8] = b"GET /api/items/42?token=secret#x HTTP/1.1\r\nHost: shop:8080\r\nTraceparent:  00-abc \r\n\r\nbody";
        let h = parse_head(raw).unwrap();
        assert_eq!(
            h.start,
            StartLine::Request {
                method: "GET",
                path: "/api/items/42".into(),
                version: "HTTP/1.1"
            }
        );
        assert_eq!(h.header("host"), Some("shop:8080"));
        assert_eq!(h.header("traceparent"), Some("00-abc"));
        assert_eq!(h.len, raw.len() - 4);
    }

    #[test]
    fn tells_a_message_that_ends_its_connection() {
        let closes = |raw: &[u8]| parse_head(raw).unwrap().closes_connection();
        assert!(closes(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n"));
        assert!(closes(
            b"HTTP/1.1 200 OK\r\nconnection: Upgrade, CLOSE\r\n\r\n"
        ));
        assert!(closes(
            b"GET / HTTP/1.1\r\nConnection: keep-alive\r\nConnection: close\r\n\r\n"
        ));
        assert!(closes(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n"));
        assert!(!closes(
            b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\n\r\n"
        ));
        assert!(!closes(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"));
        assert!(!closes(b"HTTP/1.1 200 OK\r\nX-Connection: close\r\n\r\n"));
        assert!(!closes(b"HTTP/1.1 200 OK\r\nConnection: closed\r\n\r\n"));
    }

    #[test]
    fn parses_a_status_line() {
        let h =
            parse_head(b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n").unwrap();
        assert_eq!(
            h.start,
            StartLine::Response {
                version: "HTTP/1.0",
                status: 503
            }
        );
    }

    #[test]
    fn absolute_form_keeps_only_the_path() {
        let h = parse_head(b"GET http://proxy.example/a/b?q=1 HTTP/1.1\r\n\r\n").unwrap();
        assert!(matches!(h.start, StartLine::Request { ref path, .. } if path == "/a/b"));
        let h = parse_head(b"OPTIONS * HTTP/1.1\r\n\r\n").unwrap();
        assert!(matches!(h.start, StartLine::Request { ref path, .. } if path == "*"));
    }

    #[test]
    fn credentials_are_never_kept() {
        let h = parse_head(
            b"GET / HTTP/1.1\r\nAuthorization: Bearer abc\r\nCookie: s=1\r\nX-Api-Key: k\r\n\r\n",
        )
        .unwrap();
        assert_eq!(h.header_count(), 3);
        for (_, v) in h.headers() {
            assert_eq!(v, REDACTED_VALUE);
        }
    }

    #[test]
    fn incomplete_and_invalid_heads() {
        assert_eq!(
            parse_head(b"GET / HTTP/1.1\r\nHost: a"),
            Err(HeadError::Incomplete(23))
        );
        assert!(matches!(
            parse_head(b"GETX / HTTP/1.1\r\n"),
            Err(HeadError::StartLine(_))
        ));
        assert!(matches!(
            parse_head(b"HTTP/2 200\r\n\r\n"),
            Err(HeadError::StartLine(_))
        ));
        assert!(matches!(
            parse_head(b"HTTP/1.1 2000 OK\r\n\r\n"),
            Err(HeadError::StartLine(_))
        ));
        assert!(matches!(
            parse_head(b"GET / HTTP/1.1\r\nno colon here\r\n\r\n"),
            Err(HeadError::HeaderLine(_))
        ));
        assert!(matches!(
            parse_head(b"GET / HTTP/1.1\r\nbad name: x\r\n\r\n"),
            Err(HeadError::HeaderLine(_))
        ));
    }

    #[test]
    fn a_head_is_a_slice_of_the_payload_and_names_match_in_any_case() {
        let payload = Bytes::from_static(
            b"GET /a HTTP/1.1\r\nHOST: h\r\nTraceParent: 00-x\r\nx: 1\r\nx: 2\r\n\r\nbody",
        );
        let h = parse(&payload).unwrap();
        // No copy: the head's text points into the payload.
        assert_eq!(h.text.as_ptr(), payload.as_ptr());
        assert_eq!(h.header("host"), Some("h"));
        assert_eq!(h.header("traceparent"), Some("00-x"));
        assert_eq!(h.header_all("X").collect::<Vec<_>>(), ["1", "2"]);
        assert_eq!(
            h.headers().map(|(n, _)| n).collect::<Vec<_>>(),
            ["HOST", "TraceParent", "x", "x"]
        );
    }

    #[test]
    fn bytes_that_are_not_utf8_are_replaced_in_a_copy() {
        let payload = Bytes::from_static(b"GET / HTTP/1.1\r\nx-bin: a\xffb\r\nb3: 1\r\n\r\n");
        let h = parse(&payload).unwrap();
        assert_ne!(h.text.as_ptr(), payload.as_ptr());
        assert_eq!(h.header("x-bin"), Some("a\u{fffd}b"));
        assert_eq!(h.header("b3"), Some("1"));
    }

    #[test]
    fn retain_keeps_the_named_fields_in_their_own_copy() {
        let payload = Bytes::from(
            b"GET / HTTP/1.1\r\nHost: h\r\nAccept: x\r\nCookie: s\r\nb3: 1\r\n\r\n".to_vec(),
        );
        let mut h = parse(&payload).unwrap();
        h.retain(&["host", "b3", "cookie"]);
        assert_eq!(
            h.headers().collect::<Vec<_>>(),
            [("Host", "h"), ("Cookie", REDACTED_VALUE), ("b3", "1")]
        );
        // The payload is no longer held.
        assert!(payload.is_unique());
    }

    #[test]
    fn keeps_at_most_max_headers() {
        let mut raw = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..(MAX_HEADERS + 5) {
            raw.extend_from_slice(format!("x-h{i}: v\r\n").as_bytes());
        }
        raw.extend_from_slice(b"\r\n");
        let h = parse_head(&raw).unwrap();
        assert_eq!(h.header_count(), MAX_HEADERS);
        assert_eq!(h.dropped_headers, 5);
        // A context after them is kept: read, not reported missing.
        raw.truncate(raw.len() - 2);
        raw.extend_from_slice(
            b"traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n\r\n",
        );
        let h = parse_head(&raw).unwrap();
        assert_eq!(h.header_count(), MAX_HEADERS + 1);
        assert!(h.header("traceparent").is_some());
        assert_eq!(h.dropped_headers, 5);
    }

    #[test]
    fn never_panics_on_arbitrary_bytes() {
        // A deterministic sweep of mutations of valid heads, standing in for
        // the fuzz target in CI: every input must give Ok or Err.
        let seeds: [&[u8]; 3] = [
            b"GET /a?b HTTP/1.1\r\nHost: x\r\ntraceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
            b"POST http://h/p HTTP/1.0\r\nb3: 80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1\r\n\r\n",
        ];
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for seed in seeds {
            for _ in 0..5_000 {
                let mut b = seed.to_vec();
                for _ in 0..(next() % 6) {
                    let i = (next() as usize) % b.len();
                    match next() % 3 {
                        0 => b[i] = next() as u8,
                        1 => b.truncate(i),
                        _ => b.insert(i, next() as u8),
                    }
                    if b.is_empty() {
                        break;
                    }
                }
                let _ = parse_head(&b);
            }
        }
    }
}
