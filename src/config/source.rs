//! Where a policy document is read from, a piece at a time.
//!
//! Envoy hands the filter its plugin configuration on request, any byte range of it. Asking for
//! the whole document at once would copy it into every VM's WebAssembly memory, which never
//! shrinks: a 100,000-token policy (tens of MB) would then stay resident once per worker. Read
//! in pieces, a VM holds one piece and one token at a time, whatever the policy's size.

use std::io::{self, BufReader, Read};

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

/// A buffered reader of the whole document; `fingerprint` hashes what it reads.
pub(super) fn buffered<'a>(
    source: &'a dyn PolicySource,
    fingerprint: Option<&'a mut Fingerprint>,
) -> BufReader<Hashing<'a>> {
    BufReader::with_capacity(
        CHUNK,
        Hashing {
            inner: source.reader(),
            fingerprint,
        },
    )
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
}
