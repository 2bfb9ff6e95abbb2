//! Secret bytes that wipe themselves and never print.
//!
//! Every plaintext secret the filter or the CLI holds (master key, opened upstream key, derived
//! keys, token secrets) lives in a `SecretBytes`, so that a stray `{:?}` cannot leak it into a log
//! or a panic message, and its memory is overwritten when it is dropped.

use std::fmt;

pub struct SecretBytes(Vec<u8>);

impl SecretBytes {
    pub fn new(bytes: Vec<u8>) -> Self {
        SecretBytes(bytes)
    }

    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Drop for SecretBytes {
    fn drop(&mut self) {
        wipe(&mut self.0);
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretBytes(<{} bytes redacted>)", self.0.len())
    }
}

/// Overwrites a buffer with zeros in a way the optimiser may not remove.
pub fn wipe(buf: &mut [u8]) {
    for byte in buf.iter_mut() {
        // SAFETY: `byte` is a valid, aligned, exclusive reference; a volatile write stops the
        // compiler from eliding a store to memory that is about to be freed.
        unsafe { std::ptr::write_volatile(byte, 0) };
    }
    std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_bytes() {
        let s = SecretBytes::new(b"hunter2-very-secret".to_vec());
        let shown = format!("{s:?}");
        assert!(!shown.contains("hunter2"));
        assert!(shown.contains("19 bytes"));
    }

    #[test]
    fn wipe_zeroes() {
        let mut b = vec![1u8, 2, 3];
        wipe(&mut b);
        assert_eq!(b, vec![0, 0, 0]);
    }
}
