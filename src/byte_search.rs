//! Finding the first of two bytes in a slice, eight bytes at a time. The scanners spend most of
//! their time looking for the end of a run: a quote or backslash in a JSON string (response
//! bodies, the policy), a line end in a server-sent event. WebAssembly has 64-bit integers but
//! the filter is built without SIMD, so this is the word-at-a-time ("SWAR") form of `memchr2`.

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;

/// The high bit of each byte of `word` that is zero is set; bits above the first zero byte may
/// be set too (a borrow runs up), so only the lowest set bit is exact.
fn zero_bytes(word: u64) -> u64 {
    word.wrapping_sub(ONES) & !word & HIGHS
}

/// The index of the first byte of `bytes` equal to `a` or `b`, or `bytes.len()` when there is
/// none.
#[inline]
pub fn find_either(bytes: &[u8], a: u8, b: u8) -> usize {
    let (spread_a, spread_b) = (ONES * u64::from(a), ONES * u64::from(b));
    let mut words = bytes.chunks_exact(8);
    let mut at = 0;
    for chunk in words.by_ref() {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let word = u64::from_le_bytes(word);
        let found = zero_bytes(word ^ spread_a) | zero_bytes(word ^ spread_b);
        if found != 0 {
            // Little-endian: the lowest set bit is the first matching byte.
            return at + (found.trailing_zeros() / 8) as usize;
        }
        at += 8;
    }
    let tail = words.remainder();
    at + tail
        .iter()
        .position(|&c| c == a || c == b)
        .unwrap_or(tail.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn naive(bytes: &[u8], a: u8, b: u8) -> usize {
        bytes
            .iter()
            .position(|&c| c == a || c == b)
            .unwrap_or(bytes.len())
    }

    #[test]
    fn finds_the_first_of_either_byte_at_every_position() {
        assert_eq!(find_either(b"", b'"', b'\\'), 0);
        for len in 0..40 {
            for at in 0..len {
                for (hit, other) in [(b'"', b'\\'), (b'\\', b'"')] {
                    let mut bytes = vec![b'x'; len];
                    bytes[at] = hit;
                    // A byte just above or below the target must not count (the borrow trick).
                    if at + 1 < len {
                        bytes[at + 1] = other;
                    }
                    assert_eq!(find_either(&bytes, b'"', b'\\'), at, "{bytes:?}");
                }
            }
            assert_eq!(find_either(&vec![0x21u8; len], b'"', b'\\'), len);
            assert_eq!(find_either(&vec![0x23u8; len], b'"', b'\\'), len);
        }
        assert_eq!(find_either(b"data: {\"a\":1}\r\n", b'\n', b'\r'), 13);
    }

    proptest! {
        #[test]
        fn agrees_with_a_byte_by_byte_search(
            bytes in proptest::collection::vec(any::<u8>(), 0..100),
            a in any::<u8>(),
            b in any::<u8>(),
        ) {
            prop_assert_eq!(find_either(&bytes, a, b), naive(&bytes, a, b));
        }

        #[test]
        fn agrees_on_bytes_near_the_targets(
            bytes in proptest::collection::vec(prop_oneof![Just(0x21u8), Just(0x22), Just(0x23),
                Just(0x5b), Just(0x5c), Just(0x5d), Just(0x00), Just(0x80), Just(0xff)], 0..64),
        ) {
            prop_assert_eq!(find_either(&bytes, b'"', b'\\'), naive(&bytes, b'"', b'\\'));
            prop_assert_eq!(find_either(&bytes, 0x00, 0xff), naive(&bytes, 0x00, 0xff));
        }
    }
}
