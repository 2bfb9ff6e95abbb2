//! A tiny length-prefixed binary writer/reader for values kept in Envoy shared data.
//!
//! Records are read on every request, so they are compact binary rather than JSON. Readers
//! return `None` on any truncation or inconsistency: a corrupt record is treated as absent,
//! which fails closed.

pub struct Writer(Vec<u8>);

impl Writer {
    pub fn new(version: u8) -> Self {
        Writer(vec![version])
    }
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn i64(&mut self, v: i64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn opt_i64(&mut self, v: Option<i64>) -> &mut Self {
        match v {
            None => self.u8(0),
            Some(x) => self.u8(1).i64(x),
        }
    }
    pub fn opt_u64(&mut self, v: Option<u64>) -> &mut Self {
        match v {
            None => self.u8(0),
            Some(x) => self.u8(1).u64(x),
        }
    }
    /// Bytes with a u16 length; longer input is cut (callers validate lengths at compile time).
    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        let len = v.len().min(usize::from(u16::MAX));
        self.u16(len as u16);
        self.0.extend_from_slice(v.get(..len).unwrap_or_default());
        self
    }
    pub fn raw(&mut self, v: &[u8]) -> &mut Self {
        self.0.extend_from_slice(v);
        self
    }
    pub fn finish(self) -> Vec<u8> {
        self.0
    }
}

pub struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    /// Starts reading; `None` unless the first byte is the expected format version.
    pub fn new(data: &'a [u8], version: u8) -> Option<Self> {
        let (first, rest) = data.split_first()?;
        (*first == version).then_some(Reader(rest))
    }
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }
    pub fn u8(&mut self) -> Option<u8> {
        self.take(1)?.first().copied()
    }
    pub fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?))
    }
    pub fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    pub fn i64(&mut self) -> Option<i64> {
        Some(i64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    pub fn opt_i64(&mut self) -> Option<Option<i64>> {
        match self.u8()? {
            0 => Some(None),
            1 => Some(Some(self.i64()?)),
            _ => None,
        }
    }
    pub fn opt_u64(&mut self) -> Option<Option<u64>> {
        match self.u8()? {
            0 => Some(None),
            1 => Some(Some(self.u64()?)),
            _ => None,
        }
    }
    pub fn bytes(&mut self) -> Option<&'a [u8]> {
        let len = self.u16()?;
        self.take(usize::from(len))
    }
    pub fn string(&mut self) -> Option<String> {
        String::from_utf8(self.bytes()?.to_vec()).ok()
    }
    pub fn raw<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }
    /// True when every byte was consumed: trailing garbage means a corrupt record.
    pub fn is_done(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_truncation() {
        let mut w = Writer::new(7);
        w.u8(1)
            .u16(300)
            .u64(u64::MAX)
            .i64(-5)
            .opt_i64(None)
            .opt_i64(Some(9))
            .bytes(b"hi");
        let data = w.finish();
        let mut r = Reader::new(&data, 7).unwrap();
        assert_eq!(r.u8(), Some(1));
        assert_eq!(r.u16(), Some(300));
        assert_eq!(r.u64(), Some(u64::MAX));
        assert_eq!(r.i64(), Some(-5));
        assert_eq!(r.opt_i64(), Some(None));
        assert_eq!(r.opt_i64(), Some(Some(9)));
        assert_eq!(r.bytes(), Some(&b"hi"[..]));
        assert!(r.is_done());
        assert!(Reader::new(&data, 8).is_none());
        for cut in 1..data.len() {
            let mut r = Reader::new(&data[..cut], 7).unwrap();
            let all = (|| {
                r.u8()?;
                r.u16()?;
                r.u64()?;
                r.i64()?;
                r.opt_i64()?;
                r.opt_i64()?;
                r.bytes()
            })();
            assert!(all.is_none(), "cut at {cut}");
        }
    }
}
