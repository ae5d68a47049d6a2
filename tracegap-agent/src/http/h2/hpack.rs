//! HPACK (RFC 7541) decoding for an observer, not an endpoint.
//!
//! Why not a crate: an endpoint's decoder (h2's, `hpack`, `hpack_codec`)
//! fails a whole header block on an index it does not know, which is the
//! normal case for an observer that joined a connection mid-way (the agent
//! restarted): the dynamic table was filled before it looked. This decoder
//! keeps going: a field whose name or value comes from a table entry it
//! never saw is returned with that part unknown, so the caller can still
//! recognise a value by its shape (a W3C `traceparent`), and the block says
//! it was incomplete. It resynchronises by itself once the entries it has
//! seen inserted fill the whole table (no older entry can remain).
//!
//! Bounded: strings at most [`MAX_STRING`], fields per block at most
//! [`MAX_FIELDS`], the table at most its negotiated size.

use std::collections::VecDeque;

use thiserror::Error;

use super::tables::{HUFFMAN, STATIC};

/// The dynamic table's size until the connection's SETTINGS say otherwise
/// (RFC 7540 §6.5.2).
pub const DEFAULT_TABLE_SIZE: usize = 4096;
/// Longest string literal decoded; longer ones are an error (a 16 KiB
/// metadata block fits).
pub const MAX_STRING: usize = 64 * 1024;
/// Fields decoded per block at most.
pub const MAX_FIELDS: usize = 256;

/// Why a header block could not be decoded.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum Error {
    /// The block ends inside a representation.
    #[error("header block truncated")]
    Truncated,
    /// An integer does not fit the decoder's bounds.
    #[error("HPACK integer too large")]
    Integer,
    /// Index 0 (never valid).
    #[error("HPACK index 0")]
    IndexZero,
    /// An index past the tables while the decoder is synchronised.
    #[error("HPACK index {0} past the tables")]
    Index(usize),
    /// A Huffman string that is not a valid code (bad padding, EOS).
    #[error("invalid Huffman string")]
    Huffman,
    /// A string longer than [`MAX_STRING`].
    #[error("HPACK string of {0} bytes past the bound")]
    Long(usize),
    /// More than [`MAX_FIELDS`] fields.
    #[error("more than {MAX_FIELDS} fields in a header block")]
    Fields,
    /// A size update past the size the connection allows.
    #[error("dynamic table size update to {0} past the allowed {1}")]
    SizeUpdate(usize, usize),
}

/// One decoded field; a part that came from a table entry the decoder
/// never saw is None.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Field {
    pub name: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
}

/// A decoded block: its fields, and whether every one is known.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Block {
    pub fields: Vec<Field>,
    pub complete: bool,
}

/// Where decoded fields go, one at a time, as borrowed bytes: a part that
/// came from a table entry never seen is None. Nothing is allocated per
/// field; the sink keeps what it needs.
pub trait Sink {
    fn field(&mut self, name: Option<&[u8]>, value: Option<&[u8]>);
}

impl<F: FnMut(Option<&[u8]>, Option<&[u8]>)> Sink for F {
    fn field(&mut self, name: Option<&[u8]>, value: Option<&[u8]>) {
        self(name, value)
    }
}

/// A field's name and value, borrowed from a table.
type NameValue<'a> = (&'a [u8], &'a [u8]);

/// A dynamic table entry: name then value in one buffer.
#[derive(Clone, Debug)]
struct Entry {
    bytes: Vec<u8>,
    name_len: usize,
}

impl Entry {
    fn name(&self) -> &[u8] {
        &self.bytes[..self.name_len]
    }

    fn value(&self) -> &[u8] {
        &self.bytes[self.name_len..]
    }

    /// RFC 7541 §4.1.
    fn size(&self) -> usize {
        self.bytes.len() + 32
    }
}

/// Evicted entries' buffers kept for new ones at most: a connection's
/// table turns over without allocating.
const SPARE_BUFFERS: usize = 64;

/// One direction of one connection's decoding state.
#[derive(Debug)]
pub struct Decoder {
    /// Newest first: index 62 is `entries[0]`.
    entries: VecDeque<Entry>,
    size: usize,
    /// The current maximum (size updates), at most `allowed`.
    max: usize,
    /// What the peer's SETTINGS_HEADER_TABLE_SIZE allows.
    allowed: usize,
    /// Entries older than `entries` may exist that this decoder never saw
    /// (it joined mid-connection, or lost an insertion's name).
    unseen: bool,
    /// Buffers of evicted entries, for the next ones.
    spare: Vec<Vec<u8>>,
    /// A literal's name and value, decoded (reused for every field).
    name: Vec<u8>,
    value: Vec<u8>,
}

impl Decoder {
    /// A decoder from the connection's start (the preface was seen).
    pub fn new() -> Self {
        Self {
            entries: VecDeque::new(),
            size: 0,
            max: DEFAULT_TABLE_SIZE,
            allowed: DEFAULT_TABLE_SIZE,
            unseen: false,
            spare: Vec::new(),
            name: Vec::new(),
            value: Vec::new(),
        }
    }

    /// A decoder joining a connection already under way: the table holds
    /// entries it never saw until those it sees fill it.
    pub fn joined() -> Self {
        Self {
            unseen: true,
            ..Self::new()
        }
    }

    /// A header block went by unread: its insertions are unknown, and
    /// every entry's index with them. What was known is dropped; the
    /// decoder goes on as one that joined now, within the same bounds.
    pub fn lose_table(&mut self) {
        self.clear();
        self.unseen = true;
    }

    /// Whether every table index resolves.
    pub fn synchronised(&self) -> bool {
        !self.unseen
    }

    /// The peer's SETTINGS_HEADER_TABLE_SIZE for this direction.
    pub fn set_allowed(&mut self, allowed: usize) {
        self.allowed = allowed;
        if self.max > allowed {
            self.max = allowed;
            self.evict();
        }
    }

    /// Decodes one whole header block (HEADERS + CONTINUATION payloads)
    /// into a list (tests, and readers that keep every field).
    pub fn decode(&mut self, b: &[u8]) -> Result<Block, Error> {
        let mut block = Block {
            fields: Vec::new(),
            complete: true,
        };
        self.decode_into(b, &mut |n: Option<&[u8]>, v: Option<&[u8]>| {
            block.complete &= n.is_some() && v.is_some();
            block.fields.push(Field {
                name: n.map(<[u8]>::to_vec),
                value: v.map(<[u8]>::to_vec),
            });
        })?;
        Ok(block)
    }

    /// Decodes one whole header block, each field to `sink`.
    pub fn decode_into(&mut self, mut b: &[u8], sink: &mut impl Sink) -> Result<(), Error> {
        let mut fields = 0;
        while !b.is_empty() {
            if fields >= MAX_FIELDS {
                return Err(Error::Fields);
            }
            if self.next_field(&mut b, sink)? {
                fields += 1;
            }
        }
        Ok(())
    }

    /// Decodes the representation `b` starts with and moves past it: a
    /// field to `sink` (true), or a table size update (false).
    fn next_field(&mut self, b: &mut &[u8], sink: &mut impl Sink) -> Result<bool, Error> {
        let Some(&first) = b.first() else {
            return Ok(false);
        };
        if first & 0x80 != 0 {
            // §6.1 Indexed.
            let i = integer(b, 7)?;
            match self.entry(i)? {
                Some((n, v)) => sink.field(Some(n), Some(v)),
                None => sink.field(None, None),
            }
            Ok(true)
        } else if first & 0xc0 == 0x40 {
            // §6.2.1 Literal with incremental indexing.
            let known = self.literal(b, 6)?;
            sink.field(known.then_some(&self.name[..]), Some(&self.value));
            if known {
                self.insert();
            } else {
                // An insertion whose size is unknown: every index past it
                // is uncertain until the table turns over.
                self.lose_track();
            }
            Ok(true)
        } else if first & 0xe0 == 0x20 {
            // §6.3 Dynamic table size update.
            let size = integer(b, 5)?;
            if size > self.allowed {
                return Err(Error::SizeUpdate(size, self.allowed));
            }
            self.max = size;
            self.evict();
            if size == 0 {
                // Emptied: nothing unseen can remain.
                self.unseen = false;
            }
            Ok(false)
        } else {
            // §6.2.2 without indexing, §6.2.3 never indexed.
            let known = self.literal(b, 4)?;
            sink.field(known.then_some(&self.name[..]), Some(&self.value));
            Ok(true)
        }
    }

    /// The name and value at a (static or dynamic) index; None for an
    /// entry never seen.
    fn entry(&self, i: usize) -> Result<Option<NameValue<'_>>, Error> {
        entry(&self.entries, self.unseen, i)
    }

    /// A literal representation with a `prefix`-bit name index, into
    /// `self.name` and `self.value`; false when its name is an entry
    /// never seen.
    fn literal(&mut self, b: &mut &[u8], prefix: u8) -> Result<bool, Error> {
        let i = integer(b, prefix)?;
        let known = if i == 0 {
            string(b, &mut self.name)?;
            true
        } else {
            let name = entry(&self.entries, self.unseen, i)?.map(|(n, _)| n);
            self.name.clear();
            if let Some(n) = name {
                self.name.extend_from_slice(n);
            }
            name.is_some()
        };
        string(b, &mut self.value)?;
        Ok(known)
    }

    /// Inserts the literal just read (`self.name`, `self.value`).
    fn insert(&mut self) {
        let size = self.name.len() + self.value.len() + 32;
        if size > self.max {
            // §4.4: an entry larger than the table empties it.
            self.clear();
            self.unseen = false;
            return;
        }
        let mut bytes = self.spare.pop().unwrap_or_default();
        bytes.clear();
        bytes.extend_from_slice(&self.name);
        bytes.extend_from_slice(&self.value);
        self.size += size;
        self.entries.push_front(Entry {
            bytes,
            name_len: self.name.len(),
        });
        self.evict();
        // What this decoder has seen fills the table: an older entry would
        // not fit beside it (the smallest takes 32).
        if self.unseen && self.size + 32 > self.max {
            self.unseen = false;
        }
    }

    fn evict(&mut self) {
        while self.size > self.max {
            match self.entries.pop_back() {
                Some(e) => {
                    self.size -= e.size();
                    self.keep_spare(e.bytes);
                }
                None => {
                    self.size = 0;
                    break;
                }
            }
        }
    }

    fn keep_spare(&mut self, bytes: Vec<u8>) {
        if self.spare.len() < SPARE_BUFFERS {
            self.spare.push(bytes);
        }
    }

    fn clear(&mut self) {
        while let Some(e) = self.entries.pop_back() {
            self.keep_spare(e.bytes);
        }
        self.size = 0;
    }

    fn lose_track(&mut self) {
        self.clear();
        self.unseen = true;
    }
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new()
    }
}

/// [`Decoder::entry`] on the table's parts (so a literal can copy an
/// entry's name into the decoder's own buffer).
fn entry(
    entries: &VecDeque<Entry>,
    unseen: bool,
    i: usize,
) -> Result<Option<NameValue<'_>>, Error> {
    match i {
        0 => Err(Error::IndexZero),
        1..=61 => {
            let (n, v) = STATIC[i - 1];
            Ok(Some((n.as_bytes(), v.as_bytes())))
        }
        _ => match entries.get(i - 62) {
            Some(e) => Ok(Some((e.name(), e.value()))),
            None if unseen => Ok(None),
            None => Err(Error::Index(i)),
        },
    }
}

/// §5.1: an integer with an N-bit prefix.
fn integer(b: &mut &[u8], prefix: u8) -> Result<usize, Error> {
    let (&first, rest) = b.split_first().ok_or(Error::Truncated)?;
    *b = rest;
    let max = (1usize << prefix) - 1;
    let mut v = usize::from(first) & max;
    if v < max {
        return Ok(v);
    }
    let mut shift = 0u32;
    loop {
        let (&byte, rest) = b.split_first().ok_or(Error::Truncated)?;
        *b = rest;
        if shift > 28 {
            return Err(Error::Integer);
        }
        v += usize::from(byte & 0x7f) << shift;
        shift += 7;
        if byte & 0x80 == 0 {
            return Ok(v);
        }
    }
}

/// §5.2: a string literal, Huffman-coded or not, into `out` (cleared).
fn string(b: &mut &[u8], out: &mut Vec<u8>) -> Result<(), Error> {
    let huffman = b.first().ok_or(Error::Truncated)? & 0x80 != 0;
    let len = integer(b, 7)?;
    if len > MAX_STRING {
        return Err(Error::Long(len));
    }
    if b.len() < len {
        return Err(Error::Truncated);
    }
    let (s, rest) = b.split_at(len);
    *b = rest;
    out.clear();
    if huffman {
        huffman_decode(s, out)
    } else {
        out.extend_from_slice(s);
        Ok(())
    }
}

/// The Huffman code as a binary tree: node i's children are
/// `TREE[i][bit]`; a leaf is `LEAF | symbol`.
const LEAF: u16 = 0x8000;

fn tree() -> &'static [[u16; 2]] {
    static TREE: std::sync::LazyLock<Vec<[u16; 2]>> = std::sync::LazyLock::new(|| {
        let mut nodes = vec![[0u16; 2]];
        for (sym, &(code, len)) in HUFFMAN.iter().enumerate() {
            let mut at = 0usize;
            for i in (0..len).rev() {
                let bit = ((code >> i) & 1) as usize;
                if i == 0 {
                    nodes[at][bit] = LEAF | sym as u16;
                } else {
                    if nodes[at][bit] == 0 {
                        nodes.push([0, 0]);
                        nodes[at][bit] = (nodes.len() - 1) as u16;
                    }
                    at = nodes[at][bit] as usize;
                }
            }
        }
        nodes
    });
    &TREE
}

/// Appendix B decoding onto `out`; padding must be the EOS prefix (ones),
/// under a byte.
fn huffman_decode(s: &[u8], out: &mut Vec<u8>) -> Result<(), Error> {
    let tree = tree();
    out.reserve(s.len() * 8 / 5);
    let mut at = 0usize;
    // Bits read since the last symbol, and whether all were ones.
    let (mut pending, mut ones) = (0u32, true);
    for &byte in s {
        for i in (0..8).rev() {
            let bit = (byte >> i) & 1;
            let next = tree[at][bit as usize];
            pending += 1;
            ones &= bit == 1;
            if next & LEAF != 0 {
                let sym = next & !LEAF;
                if sym == 256 {
                    return Err(Error::Huffman);
                }
                out.push(sym as u8);
                at = 0;
                (pending, ones) = (0, true);
            } else if next == 0 {
                return Err(Error::Huffman);
            } else {
                at = next as usize;
            }
        }
    }
    if pending > 7 || !ones {
        return Err(Error::Huffman);
    }
    Ok(())
}

/// The first pseudo-header of a block that starts `fragment` (its first
/// or only part), read as a decoder that joined the connection now would:
/// fields from entries never seen are passed over by their encoded length
/// (gRPC C-core sends its `:path` first, from its table, and `:method`
/// from the static table after it). None: no pseudo-header named before
/// the first regular field (RFC 9113 §8.3 puts them first), the end of
/// `fragment`, or a representation that does not decode.
pub fn first_pseudo_header(mut fragment: &[u8]) -> Option<Vec<u8>> {
    let mut decoder = Decoder::joined();
    for _ in 0..MAX_FIELDS {
        // The field's name: Some(None) for a field whose name is unseen.
        let mut name: Option<Option<Vec<u8>>> = None;
        decoder
            .next_field(&mut fragment, &mut |n: Option<&[u8]>, _: Option<&[u8]>| {
                name = Some(n.map(<[u8]>::to_vec))
            })
            .ok()?;
        match name {
            Some(Some(n)) if n.starts_with(b":") => return Some(n),
            Some(Some(_)) => return None,
            _ if fragment.is_empty() => return None,
            _ => {}
        }
    }
    None
}

#[cfg(test)]
impl Field {
    fn known(name: &[u8], value: &[u8]) -> Self {
        Self {
            name: Some(name.to_vec()),
            value: Some(value.to_vec()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn text(b: &Block) -> Vec<(String, String)> {
        b.fields
            .iter()
            .map(|f| {
                let s = |v: &Option<Vec<u8>>| {
                    v.as_deref()
                        .map_or("?".to_owned(), |v| String::from_utf8_lossy(v).into_owned())
                };
                (s(&f.name), s(&f.value))
            })
            .collect()
    }

    fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn integers_as_appendix_c1_encodes_them() {
        // C.1.1: 10 in a 5-bit prefix; C.1.2: 1337; C.1.3: 42 at a boundary.
        assert_eq!(integer(&mut &[0x0a][..], 5), Ok(10));
        assert_eq!(integer(&mut &[0x1f, 0x9a, 0x0a][..], 5), Ok(1337));
        assert_eq!(integer(&mut &[0x2a][..], 8), Ok(42));
        assert_eq!(integer(&mut &[0x1f, 0x9a][..], 5), Err(Error::Truncated));
        assert_eq!(
            integer(&mut &[0x1f, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f][..], 5),
            Err(Error::Integer)
        );
    }

    /// C.3 and C.4: three requests on one connection, without and with
    /// Huffman coding; the third reuses the first two's table entries.
    #[test]
    fn the_request_examples_of_appendix_c3_and_c4() {
        for blocks in [
            [
                "8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d",
                "8286 84be 5808 6e6f 2d63 6163 6865",
                "8287 85bf 400a 6375 7374 6f6d 2d6b 6579 0c63 7573 746f 6d2d 7661 6c75 65",
            ],
            [
                "8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff",
                "8286 84be 5886 a8eb 1064 9cbf",
                "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf",
            ],
        ] {
            let mut d = Decoder::new();
            let base = [
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com"),
            ];
            let b = d.decode(&hex(blocks[0])).unwrap();
            assert!(b.complete);
            assert_eq!(text(&b), pairs(&base));
            let mut second = base.to_vec();
            second.push(("cache-control", "no-cache"));
            assert_eq!(text(&d.decode(&hex(blocks[1])).unwrap()), pairs(&second));
            assert_eq!(
                text(&d.decode(&hex(blocks[2])).unwrap()),
                pairs(&[
                    (":method", "GET"),
                    (":scheme", "https"),
                    (":path", "/index.html"),
                    (":authority", "www.example.com"),
                    ("custom-key", "custom-value"),
                ])
            );
            // Table: custom-key, cache-control, :authority (164 bytes).
            assert_eq!(d.entries.len(), 3);
            assert_eq!(d.size, 164);
        }
    }

    /// C.5: responses with a 256-byte table, so entries are evicted.
    #[test]
    fn the_response_examples_of_appendix_c5_evict_as_the_rfc_says() {
        let mut d = Decoder::new();
        d.set_allowed(256);
        let first = d
            .decode(&hex(
                "4803 3330 3258 0770 7269 7661 7465 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133 2032 303a \
                 3133 3a32 3120 474d 546e 1768 7474 7073 3a2f 2f77 7777 2e65 7861 6d70 6c65 2e63 6f6d",
            ))
            .unwrap();
        assert_eq!(
            text(&first),
            pairs(&[
                (":status", "302"),
                ("cache-control", "private"),
                ("date", "Mon, 21 Oct 2013 20:13:21 GMT"),
                ("location", "https://www.example.com"),
            ])
        );
        assert_eq!(d.size, 222);
        let second = d.decode(&hex("4803 3330 37c1 c0bf")).unwrap();
        assert_eq!(text(&second)[0], (":status".into(), "307".into()));
        // :status 302 was evicted for :status 307.
        assert_eq!(d.entries.len(), 4);
        assert_eq!(d.size, 222);
        let third = d
            .decode(&hex(
                "88c1 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133 2032 303a 3133 3a32 3220 474d 54c0 5a04 \
                 677a 6970 7738 666f 6f3d 4153 444a 4b48 514b 425a 584f 5157 454f 5049 5541 5851 5745 4f49 \
                 553b 206d 6178 2d61 6765 3d33 3630 303b 2076 6572 7369 6f6e 3d31",
            ))
            .unwrap();
        assert_eq!(third.fields.len(), 6);
        assert_eq!(text(&third)[0], (":status".into(), "200".into()));
        assert_eq!(
            text(&third)[5],
            (
                "set-cookie".into(),
                "foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1".into()
            )
        );
        assert_eq!(d.entries.len(), 3);
        assert_eq!(d.size, 215);
    }

    #[test]
    fn joined_mid_connection_unknown_entries_stay_unknown_and_values_still_show() {
        // An encoder's connection: a traceparent inserted as a literal with
        // a new name, then referred to by index in a later block.
        let insert = |name: &str, value: &str| {
            let mut b = vec![0x40, name.len() as u8];
            b.extend_from_slice(name.as_bytes());
            b.push(value.len() as u8);
            b.extend_from_slice(value.as_bytes());
            b
        };
        let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        // Joined after the table had 3 entries: index 64 is unseen; a
        // literal whose name is entry 63 keeps its value.
        let mut d = Decoder::joined();
        let mut block = vec![0x82, 0xc0];
        block.extend([0x7f, 0x00]); // literal, indexed name 63 (6-bit prefix: 63 = 0x3f + 0)
        block.push(tp.len() as u8);
        block.extend_from_slice(tp.as_bytes());
        let b = d.decode(&block).unwrap();
        assert!(!b.complete);
        assert_eq!(b.fields[0], Field::known(b":method", b"GET"));
        assert_eq!(
            b.fields[1],
            Field {
                name: None,
                value: None
            }
        );
        assert_eq!(b.fields[2].name, None);
        assert_eq!(b.fields[2].value.as_deref(), Some(tp.as_bytes()));
        assert!(!d.synchronised(), "an insertion of unknown size");
        // Insertions it sees resolve; once they fill the table it is
        // synchronised again.
        let mut d = Decoder::joined();
        d.set_allowed(256);
        let b = d.decode(&insert("traceparent", tp)).unwrap();
        assert!(b.complete);
        assert_eq!(
            d.decode(&[0xbe]).unwrap().fields[0],
            Field::known(b"traceparent", tp.as_bytes())
        );
        assert_eq!(
            d.decode(&[0xbf]).unwrap().fields[0].name,
            None,
            "older than the join"
        );
        assert!(!d.synchronised());
        for i in 0..4 {
            d.decode(&insert("x-filler", &format!("{i:0>20}"))).unwrap();
        }
        assert!(d.synchronised(), "what it saw fills the table: {}", d.size);
        assert_eq!(d.decode(&[0xc8]), Err(Error::Index(72)));
        // From the start, an unknown index is an error, not a guess.
        assert_eq!(Decoder::new().decode(&[0xbe]), Err(Error::Index(62)));
    }

    #[test]
    fn malformed_blocks_are_errors_not_panics() {
        let mut d = Decoder::new();
        assert_eq!(d.decode(&[0x80]), Err(Error::IndexZero));
        assert_eq!(d.decode(&[0x40, 0x05, b'a']), Err(Error::Truncated));
        // A size update to the allowed 4096 is fine; to 4097 it is not.
        assert!(d.decode(&[0x3f, 0xe1, 0x1f]).is_ok());
        assert_eq!(
            d.decode(&[0x3f, 0xe2, 0x1f]),
            Err(Error::SizeUpdate(4097, 4096))
        );
        // EOS inside a string, and padding that is not all ones.
        let huffman = |s: &[u8]| {
            let mut out = Vec::new();
            huffman_decode(s, &mut out).map(|()| out)
        };
        assert_eq!(huffman(&[0xff, 0xff, 0xff, 0xff]), Err(Error::Huffman));
        assert_eq!(huffman(&[0x00]), Err(Error::Huffman));
        assert_eq!(huffman(&[0x07]), Ok(b"0".to_vec()));
        // A string length past the bound: 127 + 127 + 127 * 128 + 3 * 16384.
        assert_eq!(
            d.decode(&[0x00, 0x7f, 0xff, 0xff, 0x03]),
            Err(Error::Long(65662))
        );
    }
}
