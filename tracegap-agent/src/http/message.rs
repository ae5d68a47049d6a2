//! HTTP/1.x message heads: the request or status line and the header
//! fields, parsed from the bytes the kernel copied.
//!
//! Never trusts its input: any byte sequence gives a head or an error, never
//! a panic (see the fuzz-style test below and `fuzz/`).

use thiserror::Error;

/// Header fields kept per message at most; the rest are counted, not kept.
pub const MAX_HEADERS: usize = 64;

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

/// Request or response, with what its start line says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StartLine {
    Request {
        method: String,
        /// The path, without query string or fragment: queries can carry
        /// secrets and are never kept.
        path: String,
        version: String,
    },
    Response {
        version: String,
        status: u16,
    },
}

/// A parsed message head.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Head {
    pub start: StartLine,
    /// Header fields in order, names lowercased. Values of credentials
    /// (Authorization, Cookie, ...) are never kept.
    pub headers: Vec<(String, String)>,
    /// Fields beyond [`MAX_HEADERS`], dropped.
    pub dropped_headers: usize,
    /// Length of the head including its final blank line.
    pub len: usize,
}

/// Header names whose values are secrets: kept as present, value redacted.
const REDACTED: [&str; 5] = [
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
    "x-api-key",
];

impl Head {
    /// The first value of header `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Every value of header `name` (lowercase), in order.
    pub fn header_all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers
            .iter()
            .filter(move |(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A 1xx status other than 101: an interim response, the final one still
/// to come.
pub fn is_interim(status: u16) -> bool {
    (100..200).contains(&status) && status != 101
}

fn find_blank_line(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

const METHODS: [&str; 9] = [
    "GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "CONNECT", "TRACE",
];

fn parse_start(line: &str) -> Result<StartLine, HeadError> {
    let bad = || HeadError::StartLine(line.chars().take(80).collect());
    let mut parts = line.splitn(3, ' ');
    let first = parts.next().ok_or_else(bad)?;
    if let Some(version) = first.strip_prefix("HTTP/") {
        if version != "1.0" && version != "1.1" {
            return Err(bad());
        }
        let code = parts.next().ok_or_else(bad)?;
        if code.len() != 3 || !code.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let status: u16 = code.parse().map_err(|_| bad())?;
        if !(100..=599).contains(&status) {
            return Err(bad());
        }
        return Ok(StartLine::Response {
            version: first.to_owned(),
            status,
        });
    }
    if !METHODS.contains(&first) {
        return Err(bad());
    }
    let target = parts.next().ok_or_else(bad)?;
    let version = parts.next().ok_or_else(bad)?;
    if version != "HTTP/1.0" && version != "HTTP/1.1" || target.is_empty() {
        return Err(bad());
    }
    // absolute-form (proxies) carries scheme and authority: keep the path.
    let target = match target.find("://") {
        Some(i) => target[i + 3..]
            .find('/')
            .map_or("/", |p| &target[i + 3 + p..]),
        None => target,
    };
    let path = target
        .split(['?', '#'])
        .next()
        .filter(|p| !p.is_empty())
        .unwrap_or("/");
    Ok(StartLine::Request {
        method: first.to_owned(),
        path: path.to_owned(),
        version: version.to_owned(),
    })
}

/// Parses a message head from the start of `buf`.
pub fn parse_head(buf: &[u8]) -> Result<Head, HeadError> {
    let Some(len) = find_blank_line(buf) else {
        // A start line that is already wrong need not wait for more bytes.
        if let Some(eol) = buf.windows(2).position(|w| w == b"\r\n") {
            parse_start(&String::from_utf8_lossy(&buf[..eol]))?;
        }
        return Err(HeadError::Incomplete(buf.len()));
    };
    // Header values are ISO-8859-1 in theory and UTF-8 in practice; lossy
    // decoding keeps every ASCII byte, which is all trace context uses.
    let text = String::from_utf8_lossy(&buf[..len - 4]);
    let mut lines = text.split("\r\n");
    let start = parse_start(lines.next().unwrap_or_default())?;
    let mut headers = Vec::new();
    let mut dropped_headers = 0;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Err(HeadError::HeaderLine(line.chars().take(80).collect()));
        };
        if !is_token(name) {
            return Err(HeadError::HeaderLine(line.chars().take(80).collect()));
        }
        if headers.len() == MAX_HEADERS {
            dropped_headers += 1;
            continue;
        }
        let name = name.to_ascii_lowercase();
        let value = if REDACTED.contains(&name.as_str()) {
            "[redacted]".to_owned()
        } else {
            value.trim_matches([' ', '\t']).to_owned()
        };
        headers.push((name, value));
    }
    Ok(Head {
        start,
        headers,
        dropped_headers,
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
                method: "GET".into(),
                path: "/api/items/42".into(),
                version: "HTTP/1.1".into()
            }
        );
        assert_eq!(h.header("host"), Some("shop:8080"));
        assert_eq!(h.header("traceparent"), Some("00-abc"));
        assert_eq!(h.len, raw.len() - 4);
    }

    #[test]
    fn parses_a_status_line() {
        let h =
            parse_head(b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n").unwrap();
        assert_eq!(
            h.start,
            StartLine::Response {
                version: "HTTP/1.0".into(),
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
        for (_, v) in &h.headers {
            assert_eq!(v, "[redacted]");
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
    fn keeps_at_most_max_headers() {
        let mut raw = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..(MAX_HEADERS + 5) {
            raw.extend_from_slice(format!("x-h{i}: v\r\n").as_bytes());
        }
        raw.extend_from_slice(b"\r\n");
        let h = parse_head(&raw).unwrap();
        assert_eq!(h.headers.len(), MAX_HEADERS);
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
