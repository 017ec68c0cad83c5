//! An HPACK decoder (RFC 7541) for the lean HTTP/2 server ([`crate::h2conn`]): request
//! header blocks with the dynamic table and Huffman-coded strings.
//!
//! `loona-hpack` (the maintained `hpack` crate) was tried first: its Huffman decoder builds
//! a hash map of all 257 codes for every string it decodes, which cost more than the rest
//! of a unary call's serving together (30% of the serving thread). This decoder reads
//! Huffman codes of up to 8 bits (most of what a header holds) through one table lookup
//! and longer ones by the canonical code's first-code-per-length rule; it hands each field
//! to a callback as slices (of the block, the table, or its scratch buffers), so decoding a
//! request whose fields are all indexed allocates nothing.

use std::collections::VecDeque;
use std::sync::OnceLock;

include!("hpack_tables.rs");

/// Why a header block could not be decoded (a connection error: COMPRESSION_ERROR).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HpackError {
    #[error("the block ends inside a field")]
    Truncated,
    #[error("an integer past 2^28")]
    IntegerOverflow,
    #[error("index {0} is in neither table")]
    BadIndex(usize),
    #[error("a Huffman string is malformed (an unknown code, EOS, or padding other than up to 7 one bits)")]
    BadHuffman,
    #[error("a dynamic table size update to {0} bytes, past the allowed {1}")]
    TableSizeTooLarge(usize, usize),
    #[error("a dynamic table size update after a field")]
    LateTableSizeUpdate,
    #[error("the block decodes to more than {0} bytes of fields")]
    ListTooLong(usize),
}

/// The per-field overhead RFC 7541 section 4.1 counts in a table's size, in bytes.
const ENTRY_OVERHEAD: usize = 32;

/// A dynamic table entry: its name and value.
type Entry = (Box<[u8]>, Box<[u8]>);

/// Decodes a connection's request header blocks, in order (its dynamic table follows the
/// peer's encoder).
#[derive(Debug)]
pub struct Decoder {
    /// Newest first: index 62 is `table[0]`.
    table: VecDeque<Entry>,
    /// The table's size by RFC 7541's count, in bytes.
    size: usize,
    /// The table's current maximum size (the encoder's last size update), in bytes.
    max_size: usize,
    /// The most the encoder may set it to (our SETTINGS_HEADER_TABLE_SIZE), in bytes.
    allowed: usize,
    name_buf: Vec<u8>,
    value_buf: Vec<u8>,
}

impl Decoder {
    /// A decoder whose dynamic table holds at most `allowed` bytes (the protocol's
    /// default SETTINGS_HEADER_TABLE_SIZE is 4096).
    pub fn new(allowed: usize) -> Self {
        Self {
            table: VecDeque::new(),
            size: 0,
            max_size: allowed,
            allowed,
            name_buf: Vec::new(),
            value_buf: Vec::new(),
        }
    }

    /// Decodes `block`, calling `f(name, value)` for each field in order. A block whose
    /// fields come to more than `limit` bytes (RFC 7541's count: names, values and 32 per
    /// field) is refused once past it, before more is copied.
    pub fn decode(
        &mut self,
        block: &[u8],
        limit: usize,
        mut f: impl FnMut(&[u8], &[u8]),
    ) -> Result<(), HpackError> {
        let mut src = block;
        let mut fields = 0usize;
        let mut decoded = 0usize;
        let mut f = |n: &[u8], v: &[u8]| {
            decoded += n.len() + v.len() + ENTRY_OVERHEAD;
            if decoded > limit {
                return Err(HpackError::ListTooLong(limit));
            }
            f(n, v);
            Ok(())
        };
        while let Some(&b) = src.first() {
            if b & 0x80 != 0 {
                // Indexed field.
                let i = read_int(&mut src, 7)?;
                let (n, v) = self.get(i)?;
                f(n, v)?;
            } else if b & 0xc0 == 0x40 {
                // Literal with incremental indexing.
                let i = read_int(&mut src, 6)?;
                self.literal(&mut src, i, &mut f)?;
                let (n, v) = if i == 0 {
                    (
                        self.name_buf.clone().into_boxed_slice(),
                        self.value_buf.clone().into_boxed_slice(),
                    )
                } else {
                    let n = self.get(i)?.0.to_vec().into_boxed_slice();
                    (n, self.value_buf.clone().into_boxed_slice())
                };
                self.insert(n, v);
            } else if b & 0xe0 == 0x20 {
                // Dynamic table size update: only before the block's first field.
                if fields > 0 {
                    return Err(HpackError::LateTableSizeUpdate);
                }
                let n = read_int(&mut src, 5)?;
                if n > self.allowed {
                    return Err(HpackError::TableSizeTooLarge(n, self.allowed));
                }
                self.max_size = n;
                self.evict();
                continue;
            } else {
                // Literal without indexing, or never indexed (4-bit prefix both).
                let i = read_int(&mut src, 4)?;
                self.literal(&mut src, i, &mut f)?;
            }
            fields += 1;
        }
        Ok(())
    }

    /// Reads a literal's name (unless indexed by `i`) and value into the scratch buffers
    /// and calls `f` with them.
    fn literal(
        &mut self,
        src: &mut &[u8],
        i: usize,
        f: &mut impl FnMut(&[u8], &[u8]) -> Result<(), HpackError>,
    ) -> Result<(), HpackError> {
        if i == 0 {
            read_string(src, &mut self.name_buf)?;
        }
        read_string(src, &mut self.value_buf)?;
        if i == 0 {
            f(&self.name_buf, &self.value_buf)
        } else {
            let value = std::mem::take(&mut self.value_buf);
            let r = self.get(i).and_then(|(n, _)| f(n, &value));
            self.value_buf = value;
            r
        }
    }

    fn get(&self, i: usize) -> Result<(&[u8], &[u8]), HpackError> {
        match i {
            0 => Err(HpackError::BadIndex(0)),
            1..=61 => {
                let (n, v) = STATIC_TABLE[i - 1];
                Ok((n.as_bytes(), v.as_bytes()))
            }
            _ => {
                self.table.get(i - 62).map(|(n, v)| (&n[..], &v[..])).ok_or(HpackError::BadIndex(i))
            }
        }
    }

    fn insert(&mut self, name: Box<[u8]>, value: Box<[u8]>) {
        let size = name.len() + value.len() + ENTRY_OVERHEAD;
        if size > self.max_size {
            // Larger than the whole table: it empties the table (section 4.4).
            self.table.clear();
            self.size = 0;
            return;
        }
        self.size += size;
        self.table.push_front((name, value));
        self.evict();
    }

    fn evict(&mut self) {
        while self.size > self.max_size {
            let (n, v) = self.table.pop_back().expect("a table over its size has entries");
            self.size -= n.len() + v.len() + ENTRY_OVERHEAD;
        }
    }
}

/// Reads an integer with an `n`-bit prefix (section 5.1).
fn read_int(src: &mut &[u8], n: u32) -> Result<usize, HpackError> {
    let max = (1usize << n) - 1;
    let (&first, rest) = src.split_first().ok_or(HpackError::Truncated)?;
    *src = rest;
    let mut v = usize::from(first) & max;
    if v < max {
        return Ok(v);
    }
    let mut shift = 0;
    loop {
        let (&b, rest) = src.split_first().ok_or(HpackError::Truncated)?;
        *src = rest;
        v += usize::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
        shift += 7;
        if shift > 21 {
            return Err(HpackError::IntegerOverflow);
        }
    }
}

/// Reads a string literal (section 5.2) into `out`.
fn read_string(src: &mut &[u8], out: &mut Vec<u8>) -> Result<(), HpackError> {
    let huffman = src.first().ok_or(HpackError::Truncated)? & 0x80 != 0;
    let len = read_int(src, 7)?;
    if len > src.len() {
        return Err(HpackError::Truncated);
    }
    let (s, rest) = src.split_at(len);
    *src = rest;
    out.clear();
    if huffman {
        huffman_decode(s, out)
    } else {
        out.extend_from_slice(s);
        Ok(())
    }
}

/// The Huffman code's decoding tables, built once from [`HUFFMAN_CODE_BITS`].
struct Huffman {
    /// By the next 8 bits: the symbol and its code's length, for codes of up to 8 bits
    /// (length 0: a longer code).
    short: [(u8, u8); 256],
    /// Per code length: the first code of that length, how many there are, and where
    /// they start in `sorted`.
    first: [u32; 31],
    count: [u32; 31],
    start: [u32; 31],
    /// Symbols in code order.
    sorted: [u16; 257],
}

fn huffman() -> &'static Huffman {
    static H: OnceLock<Huffman> = OnceLock::new();
    H.get_or_init(|| {
        let mut h = Huffman {
            short: [(0, 0); 256],
            first: [0; 31],
            count: [0; 31],
            start: [0; 31],
            sorted: [0; 257],
        };
        let mut order: Vec<u16> = (0..257).collect();
        order.sort_by_key(|&s| (HUFFMAN_CODE_BITS[usize::from(s)], s));
        let mut code = 0u32;
        let mut prev = HUFFMAN_CODE_BITS[usize::from(order[0])];
        for (k, &sym) in order.iter().enumerate() {
            let len = HUFFMAN_CODE_BITS[usize::from(sym)];
            if k > 0 {
                code = (code + 1) << (len - prev);
            }
            prev = len;
            let l = usize::from(len);
            if h.count[l] == 0 {
                h.first[l] = code;
                h.start[l] = k as u32;
            }
            h.count[l] += 1;
            h.sorted[k] = sym;
            if len <= 8 {
                let base = (code << (8 - len)) as usize;
                for e in &mut h.short[base..base + (1 << (8 - len))] {
                    *e = (sym as u8, len);
                }
            }
        }
        h
    })
}

fn huffman_decode(src: &[u8], out: &mut Vec<u8>) -> Result<(), HpackError> {
    let h = huffman();
    // The next `bits` bits, aligned to the top of `acc`.
    let mut acc = 0u64;
    let mut bits = 0u32;
    let mut i = 0;
    loop {
        while bits <= 56 && i < src.len() {
            acc |= u64::from(src[i]) << (56 - bits);
            bits += 8;
            i += 1;
        }
        if bits == 0 {
            return Ok(());
        }
        let (sym, len) = match h.short[(acc >> 56) as usize] {
            (s, l) if l != 0 && u32::from(l) <= bits => (u16::from(s), u32::from(l)),
            _ => {
                let mut found = None;
                for len in 9..=30u32.min(bits) {
                    let code = (acc >> (64 - len)) as u32;
                    let l = len as usize;
                    if h.count[l] > 0 && code >= h.first[l] && code - h.first[l] < h.count[l] {
                        found = Some((h.sorted[(h.start[l] + code - h.first[l]) as usize], len));
                        break;
                    }
                }
                match found {
                    Some(f) => f,
                    // What is left must be padding: fewer than 8 bits, all ones (EOS's first).
                    None if bits < 8 && i == src.len() && acc >> (64 - bits) == (1 << bits) - 1 => {
                        return Ok(())
                    }
                    None => return Err(HpackError::BadHuffman),
                }
            }
        };
        if sym == 256 {
            return Err(HpackError::BadHuffman);
        }
        out.push(sym as u8);
        acc <<= len;
        bits -= len;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The canonical Huffman code of `sym` (for encoding in tests).
    fn code_of(sym: usize) -> (u32, u32) {
        let h = huffman();
        let k = h.sorted.iter().position(|&s| usize::from(s) == sym).unwrap() as u32;
        let len = u32::from(HUFFMAN_CODE_BITS[sym]);
        (h.first[len as usize] + (k - h.start[len as usize]), len)
    }

    fn huffman_encode(s: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let (mut acc, mut bits) = (0u64, 0u32);
        for &b in s {
            let (code, len) = code_of(usize::from(b));
            acc = (acc << len) | u64::from(code);
            bits += len;
            while bits >= 8 {
                out.push((acc >> (bits - 8)) as u8);
                bits -= 8;
            }
        }
        if bits > 0 {
            out.push(((acc << (8 - bits)) as u8) | ((1u8 << (8 - bits)) - 1));
        }
        out
    }

    fn decode_all(d: &mut Decoder, block: &[u8]) -> Result<Vec<(String, String)>, HpackError> {
        let mut got = Vec::new();
        d.decode(block, usize::MAX, |n, v| {
            got.push((
                String::from_utf8_lossy(n).into_owned(),
                String::from_utf8_lossy(v).into_owned(),
            ))
        })?;
        Ok(got)
    }

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    fn fields(f: &[(&str, &str)]) -> Vec<(String, String)> {
        f.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect()
    }

    #[test]
    fn the_rfcs_huffman_request_examples_decode() {
        // RFC 7541 appendix C.4: three requests on one connection, Huffman-coded.
        let mut d = Decoder::new(4096);
        let got = decode_all(&mut d, &hex("8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff")).unwrap();
        assert_eq!(
            got,
            fields(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com")
            ])
        );
        let got = decode_all(&mut d, &hex("8286 84be 5886 a8eb 1064 9cbf")).unwrap();
        assert_eq!(
            got[3..],
            fields(&[(":authority", "www.example.com"), ("cache-control", "no-cache")])
        );
        let got =
            decode_all(&mut d, &hex("8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf"))
                .unwrap();
        assert_eq!(
            got,
            fields(&[
                (":method", "GET"),
                (":scheme", "https"),
                (":path", "/index.html"),
                (":authority", "www.example.com"),
                ("custom-key", "custom-value"),
            ])
        );
        // The table now holds the three literals indexed, newest first (164 bytes).
        assert_eq!(d.size, 54 + 53 + 57);
        assert_eq!(d.table[0].0.as_ref(), b"custom-key");
    }

    #[test]
    fn every_symbol_round_trips_and_bad_huffman_is_refused() {
        let all: Vec<u8> = (0..=255u8).chain((0..=255u8).rev()).collect();
        let mut out = Vec::new();
        huffman_decode(&huffman_encode(&all), &mut out).unwrap();
        assert_eq!(out, all);
        for s in [&b""[..], b"a", b"/wayside.v1.Nms/Read", b"\x00\xff~"] {
            let mut out = Vec::new();
            huffman_decode(&huffman_encode(s), &mut out).unwrap();
            assert_eq!(out, s);
        }
        let mut out = Vec::new();
        // EOS (30 one bits) inside a string, and padding of 8 bits or more.
        assert_eq!(
            huffman_decode(&[0xff, 0xff, 0xff, 0xff], &mut out),
            Err(HpackError::BadHuffman)
        );
        let mut padded = huffman_encode(b"a");
        padded.push(0xff);
        assert_eq!(huffman_decode(&padded, &mut out), Err(HpackError::BadHuffman));
        // 'a' is 00011: padded with ones it decodes, with zeros it does not.
        out.clear();
        assert_eq!(huffman_decode(&[0b0001_1111], &mut out), Ok(()));
        assert_eq!(out, b"a");
        assert_eq!(huffman_decode(&[0b0001_1000], &mut out), Err(HpackError::BadHuffman));
    }

    #[test]
    fn the_table_evicts_by_size_and_bad_blocks_are_refused() {
        let mut d = Decoder::new(100);
        // Each entry is 32 + 2 + 20 = 54 bytes: the second evicts the first.
        let lit = |n: &str, v: &str| {
            let mut b = vec![0x40, n.len() as u8];
            b.extend_from_slice(n.as_bytes());
            b.push(v.len() as u8);
            b.extend_from_slice(v.as_bytes());
            b
        };
        decode_all(&mut d, &lit("aa", &"x".repeat(20))).unwrap();
        decode_all(&mut d, &lit("bb", &"y".repeat(20))).unwrap();
        assert_eq!(decode_all(&mut d, &[0xbe]).unwrap(), fields(&[("bb", &"y".repeat(20))]));
        assert_eq!(decode_all(&mut d, &[0xbf]), Err(HpackError::BadIndex(63)));
        assert_eq!(decode_all(&mut d, &[0x80]), Err(HpackError::BadIndex(0)));
        // A size update shrinks it; past the allowed size, or after a field, is an error.
        assert_eq!(decode_all(&mut d, &[0x20]).unwrap(), vec![]);
        assert_eq!(decode_all(&mut d, &[0xbe]), Err(HpackError::BadIndex(62)));
        assert_eq!(decode_all(&mut d, &[0x3f, 0x46]), Err(HpackError::TableSizeTooLarge(101, 100)));
        assert_eq!(decode_all(&mut d, &[0x82, 0x20]), Err(HpackError::LateTableSizeUpdate));
        // A block of many references to one entry stops once past its limit.
        let mut d2 = Decoder::new(4096);
        let mut block = lit("nn", &"v".repeat(60));
        block.extend(std::iter::repeat_n(0xbe, 1000));
        let mut n = 0;
        assert_eq!(d2.decode(&block, 94 * 10, |_, _| n += 1), Err(HpackError::ListTooLong(940)));
        assert_eq!(n, 10);
        // Truncated integers and strings, and integers past 2^28.
        assert_eq!(decode_all(&mut d, &[0xff]), Err(HpackError::Truncated));
        assert_eq!(decode_all(&mut d, &[0x00, 0x05, b'a']), Err(HpackError::Truncated));
        assert_eq!(
            decode_all(&mut d, &[0xff, 0xff, 0xff, 0xff, 0xff, 0x0f]),
            Err(HpackError::IntegerOverflow)
        );
    }

    /// Random header lists, encoded every way HPACK allows (indexed, literal with and
    /// without indexing, Huffman or not), decode the same with this decoder and with
    /// `loona-hpack` (an independent implementation), block after block on one table.
    #[test]
    fn random_blocks_decode_as_an_independent_decoder_decodes_them() {
        use rand::{Rng as _, SeedableRng as _};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut ours = Decoder::new(4096);
        let mut theirs = loona_hpack::Decoder::new();
        let mut dynamic: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        for _ in 0..300 {
            let mut block = Vec::new();
            for _ in 0..rng.gen_range(1..12) {
                let name: Vec<u8> =
                    (0..rng.gen_range(1..12)).map(|_| rng.gen_range(b'a'..=b'z')).collect();
                let value: Vec<u8> = (0..rng.gen_range(0..40)).map(|_| rng.gen::<u8>()).collect();
                let string = |b: &mut Vec<u8>, s: &[u8], huff: bool| {
                    if huff {
                        let e = huffman_encode(s);
                        let mut n = Vec::new();
                        crate::h2conn::encode_int(&mut n, 0x80, 7, e.len());
                        b.extend(n);
                        b.extend(e);
                    } else {
                        let mut n = Vec::new();
                        crate::h2conn::encode_int(&mut n, 0, 7, s.len());
                        b.extend(n);
                        b.extend_from_slice(s);
                    }
                };
                match rng.gen_range(0..4) {
                    0 if !dynamic.is_empty() => {
                        let i = rng.gen_range(0..dynamic.len());
                        crate::h2conn::encode_int(&mut block, 0x80, 7, 62 + i);
                    }
                    1 => crate::h2conn::encode_int(&mut block, 0x80, 7, rng.gen_range(1..=61)),
                    2 => {
                        block.push(0x40);
                        string(&mut block, &name, rng.gen());
                        string(&mut block, &value, rng.gen());
                        dynamic.insert(0, (name, value));
                        // Mirror the eviction (entries of 32 + bytes, 4096 in all).
                        let mut size = 0;
                        dynamic.retain(|(n, v)| {
                            size += n.len() + v.len() + 32;
                            size <= 4096
                        });
                    }
                    _ => {
                        block.push(if rng.gen() { 0x00 } else { 0x10 });
                        string(&mut block, &name, rng.gen());
                        string(&mut block, &value, rng.gen());
                    }
                }
            }
            let mut got = Vec::new();
            ours.decode(&block, usize::MAX, |n, v| got.push((n.to_vec(), v.to_vec()))).unwrap();
            let want = theirs.decode(&block).unwrap();
            assert_eq!(got, want);
        }
    }
}
