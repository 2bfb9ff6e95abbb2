//! Where a policy document is read from, a piece at a time.
//!
//! Envoy hands the filter its plugin configuration on request, any byte range of it. Asking for
//! the whole document at once would copy it into every VM's WebAssembly memory, which never
//! shrinks: a 100,000-token policy (tens of MB) would then stay resident once per worker. Read
//! in pieces, a VM holds one piece and one token at a time, whatever the policy's size.
//!
//! The document may be the policy's JSON, or that JSON zlib-compressed (what `shieldkey publish`
//! writes): Envoy keeps several copies of a filter's configuration in its own heap, so the
//! configuration's size is most of what a large policy costs Envoy. The two are told apart by
//! the first byte; the fingerprint is always that of the bytes Envoy holds.

use std::io::{self, BufReader, Read};

use miniz_oxide::inflate::stream::{inflate, InflateState};
use miniz_oxide::{DataFormat, MZError, MZFlush, MZStatus};
use sha2::{Digest, Sha256};

/// How much of the document one read asks Envoy for.
pub const CHUNK: usize = 64 * 1024;

/// A policy document that can be read from its first byte, as often as needed.
pub trait PolicySource {
    fn reader(&self) -> Box<dyn Read + '_>;
}

impl PolicySource for Vec<u8> {
    fn reader(&self) -> Box<dyn Read + '_> {
        Box::new(self.as_slice())
    }
}

impl PolicySource for &[u8] {
    fn reader(&self) -> Box<dyn Read + '_> {
        Box::new(*self)
    }
}

/// A buffered reader of the whole document as JSON, decompressed if it came compressed;
/// `fingerprint` hashes the bytes as they come from the source.
pub(super) fn buffered<'a>(
    source: &'a dyn PolicySource,
    fingerprint: Option<&'a mut Fingerprint>,
) -> BufReader<Decoded<'a>> {
    BufReader::with_capacity(
        CHUNK,
        Decoded {
            inner: Hashing {
                inner: source.reader(),
                fingerprint,
            },
            input: Vec::new(),
            start: 0,
            inflate: None,
            state: Stage::First,
        },
    )
}

/// How a zlib stream (deflate, 32 KiB window: every zlib encoder's default) starts. A JSON
/// document starts with `{` or whitespace.
pub const ZLIB_FIRST_BYTE: u8 = 0x78;

/// A whole document as JSON, decompressed if it was compressed (the CLI and tests; the filter
/// never holds a whole document).
pub fn decode(bytes: &[u8]) -> io::Result<Vec<u8>> {
    let source: &[u8] = bytes;
    let mut out = Vec::new();
    buffered(&source, None).read_to_end(&mut out)?;
    Ok(out)
}

/// zlib-compresses a policy document, as the filter reads it back.
pub fn compress(json: &[u8]) -> Vec<u8> {
    miniz_oxide::deflate::compress_to_vec_zlib(json, 6)
}

#[derive(PartialEq)]
enum Stage {
    First,
    Reading,
    /// The source is exhausted (plain), or the compressed stream ended.
    Done,
}

/// The source's bytes, inflated when they start as a zlib stream.
pub(super) struct Decoded<'a> {
    inner: Hashing<'a>,
    /// Bytes read from the source and not yet used, from `start`.
    input: Vec<u8>,
    start: usize,
    inflate: Option<Box<InflateState>>,
    state: Stage,
}

impl Decoded<'_> {
    /// Reads the next piece of the source into `input`; false at its end.
    fn refill(&mut self) -> io::Result<bool> {
        self.input.resize(CHUNK, 0);
        let n = self.inner.read(&mut self.input)?;
        self.input.truncate(n);
        self.start = 0;
        Ok(n > 0)
    }

    fn pending(&self) -> &[u8] {
        self.input.get(self.start..).unwrap_or_default()
    }
}

fn corrupt(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("the compressed configuration {what}"),
    )
}

impl Read for Decoded<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.state == Stage::First {
            self.state = Stage::Reading;
            self.refill()?;
            if self.pending().first() == Some(&ZLIB_FIRST_BYTE) {
                self.inflate = Some(InflateState::new_boxed(DataFormat::Zlib));
            }
        }
        if self.state == Stage::Done || out.is_empty() {
            return Ok(0);
        }
        if self.inflate.is_none() {
            // Plain JSON: what was read to look at the first byte, then the source itself.
            let pending = self.pending();
            if pending.is_empty() {
                return self.inner.read(out);
            }
            let n = pending.len().min(out.len());
            if let (Some(to), Some(from)) = (out.get_mut(..n), pending.get(..n)) {
                to.copy_from_slice(from);
            }
            self.start += n;
            return Ok(n);
        }
        loop {
            let Some(state) = self.inflate.as_mut() else {
                return Ok(0);
            };
            let input = self.input.get(self.start..).unwrap_or_default();
            let result = inflate(state, input, out, MZFlush::None);
            self.start += result.bytes_consumed;
            match result.status {
                Ok(MZStatus::StreamEnd) => {
                    self.state = Stage::Done;
                    // Anything after the stream would be bytes the policy does not account for.
                    if !self.pending().is_empty() || self.refill()? {
                        return Err(corrupt("has data after its end"));
                    }
                    return Ok(result.bytes_written);
                }
                // `Buf` ("needs more input") may come with output flushed from the window.
                Ok(_) | Err(MZError::Buf) if result.bytes_written > 0 => {
                    return Ok(result.bytes_written)
                }
                // No output yet: the stream needs more input.
                Ok(_) | Err(MZError::Buf) => {
                    if self.pending().is_empty() && !self.refill()? {
                        return Err(corrupt("is truncated"));
                    }
                }
                Err(_) => return Err(corrupt("is corrupt")),
            }
        }
    }
}

/// A short, stable identity of a document's bytes, computed as they are read.
#[derive(Default)]
pub struct Fingerprint(Sha256);

impl Fingerprint {
    pub fn of(bytes: &[u8]) -> String {
        let mut f = Fingerprint::default();
        f.update(bytes);
        f.finish()
    }

    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    pub fn finish(self) -> String {
        let hash = self.0.finalize();
        hash.iter().take(8).map(|b| format!("{b:02x}")).collect()
    }
}

pub(super) struct Hashing<'a> {
    inner: Box<dyn Read + 'a>,
    fingerprint: Option<&'a mut Fingerprint>,
}

impl Read for Hashing<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let (Some(f), Some(read)) = (self.fingerprint.as_deref_mut(), buf.get(..n)) {
            f.update(read);
        }
        Ok(n)
    }
}

/// Reads a document through `fetch(offset, max_len)`, which returns up to `max_len` bytes from
/// `offset` (fewer, or none, at the end): Envoy's `proxy_get_buffer_bytes` on the plugin
/// configuration.
pub struct RangeReader<F> {
    fetch: F,
    offset: usize,
    done: bool,
}

impl<F: FnMut(usize, usize) -> Option<Vec<u8>>> RangeReader<F> {
    pub fn new(fetch: F) -> Self {
        RangeReader {
            fetch,
            offset: 0,
            done: false,
        }
    }
}

impl<F: FnMut(usize, usize) -> Option<Vec<u8>>> Read for RangeReader<F> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.done || buf.is_empty() {
            return Ok(0);
        }
        let piece = (self.fetch)(self.offset, buf.len()).unwrap_or_default();
        // A host that returned more than asked would be a bug: refuse rather than truncate.
        let Some(target) = buf.get_mut(..piece.len()) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the host returned more of the configuration than asked",
            ));
        };
        target.copy_from_slice(&piece);
        if piece.is_empty() {
            self.done = true;
        }
        self.offset += piece.len();
        Ok(piece.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_range_reader_reads_the_whole_document_in_pieces() {
        let doc: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let mut asked = Vec::new();
        let mut reader = RangeReader::new(|offset: usize, len: usize| {
            let end = doc.len().min(offset + len.min(CHUNK));
            let piece = doc.get(offset..end).map(<[u8]>::to_vec);
            asked.push((offset, piece.as_ref().map_or(0, Vec::len)));
            piece.filter(|p| !p.is_empty())
        });
        let mut out = Vec::new();
        reader.read_to_end(&mut out).unwrap();
        // Once the end is reached, the host is not asked again.
        assert_eq!(reader.read(&mut [0u8; 8]).unwrap(), 0);
        assert_eq!(out, doc);
        // Each piece starts where the previous one ended; the last one is empty.
        let mut next = 0;
        for &(offset, len) in &asked {
            assert_eq!(offset, next);
            next += len;
        }
        assert_eq!(asked.last(), Some(&(doc.len(), 0)));
        assert!(asked.len() > 3);
    }

    #[test]
    fn a_host_returning_more_than_asked_is_an_error() {
        let mut reader = RangeReader::new(|_: usize, len: usize| Some(vec![b'x'; len + 1]));
        let mut buf = [0u8; 16];
        assert!(reader.read(&mut buf).is_err());
    }

    #[test]
    fn the_fingerprint_of_what_is_read_is_the_fingerprint_of_the_bytes() {
        let doc = b"{\"version\":1}  ".to_vec();
        let mut f = Fingerprint::default();
        let mut out = Vec::new();
        buffered(&doc, Some(&mut f)).read_to_end(&mut out).unwrap();
        assert_eq!(out, doc);
        assert_eq!(f.finish(), Fingerprint::of(&doc));
        assert_ne!(Fingerprint::of(b"a"), Fingerprint::of(b"b"));
        assert_eq!(Fingerprint::of(b"").len(), 16);
    }

    fn read_all(source: &dyn PolicySource) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        buffered(source, None).read_to_end(&mut out)?;
        Ok(out)
    }

    fn large_document() -> Vec<u8> {
        let tokens: Vec<String> = (0..5_000)
            .map(|i| format!(r#"{{"id":"t{i}","digest":"{:064x}"}}"#, i * 7919))
            .collect();
        format!(r#"{{"version":1,"tokens":[{}]}}"#, tokens.join(",")).into_bytes()
    }

    #[test]
    fn a_compressed_document_reads_back_as_its_json_whatever_the_piece_sizes() {
        let json = large_document();
        assert!(json.len() > 3 * CHUNK);
        let packed = compress(&json);
        assert_eq!(packed.first(), Some(&ZLIB_FIRST_BYTE));
        assert!(packed.len() < json.len() / 2);
        assert_eq!(read_all(&packed).unwrap(), json);
        assert_eq!(read_all(&json).unwrap(), json);
        // Through a host that hands out a few bytes at a time.
        struct Trickle(Vec<u8>);
        impl PolicySource for Trickle {
            fn reader(&self) -> Box<dyn Read + '_> {
                Box::new(RangeReader::new(|offset: usize, len: usize| {
                    let end = self.0.len().min(offset + len.min(7));
                    self.0.get(offset..end).map(<[u8]>::to_vec)
                }))
            }
        }
        let trickled = read_all(&Trickle(packed.clone())).unwrap();
        assert!(
            trickled == json,
            "{} of {} bytes",
            trickled.len(),
            json.len()
        );
        // Read by the parser one byte at a time.
        let mut one = Vec::new();
        let mut reader = buffered(&packed, None);
        let mut byte = [0u8; 1];
        while reader.read(&mut byte).unwrap() == 1 {
            one.push(byte[0]);
        }
        assert_eq!(one, json);
    }

    #[test]
    fn the_fingerprint_is_of_the_bytes_envoy_holds() {
        let json = large_document();
        let packed = compress(&json);
        let mut f = Fingerprint::default();
        buffered(&packed, Some(&mut f))
            .read_to_end(&mut Vec::new())
            .unwrap();
        assert_eq!(f.finish(), Fingerprint::of(&packed));
        assert_ne!(Fingerprint::of(&packed), Fingerprint::of(&json));
    }

    #[test]
    fn a_damaged_compressed_document_is_an_error_never_a_shorter_policy() {
        let packed = compress(&large_document());
        let truncated = packed[..packed.len() / 2].to_vec();
        let err = read_all(&truncated).unwrap_err().to_string();
        assert!(err.contains("truncated"), "{err}");
        // The checksum at the end catches a flipped bit the deflate stream itself accepts.
        let mut flipped = packed.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert!(read_all(&flipped).is_err());
        let mut corrupt = packed.clone();
        for b in corrupt.iter_mut().skip(2).take(64) {
            *b = 0xff;
        }
        assert!(read_all(&corrupt).is_err());
        let mut trailing = packed.clone();
        trailing.extend_from_slice(b"{}");
        let err = read_all(&trailing).unwrap_err().to_string();
        assert!(err.contains("after its end"), "{err}");
        assert_eq!(
            read_all(&vec![ZLIB_FIRST_BYTE]).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
        assert!(read_all(&Vec::new()).unwrap().is_empty());
    }
}
