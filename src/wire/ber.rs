//! BER compressed integers, as Perl's `pack "w"` writes them: base 128, most
//! significant group first, the high bit set on every byte but the last.
//! This is *not* LEB128 (which puts the least significant group first).

/// Longest encoding of a `u64` (ceil(64 / 7)).
pub const MAX_LEN: usize = 10;

/// Number of bytes `n` takes.
#[inline]
pub fn encoded_len(n: u64) -> usize {
    let bits = 64 - (n | 1).leading_zeros() as usize;
    bits.div_ceil(7)
}

/// Appends the encoding of `n` to `out`.
///
/// ```
/// let mut v = Vec::new();
/// forkrpc::wire::ber::encode(128, &mut v);
/// assert_eq!(v, [0x81, 0x00]);
/// ```
#[inline]
pub fn encode(n: u64, out: &mut impl bytes::BufMut) {
    if n < 0x80 {
        out.put_u8(n as u8);
        return;
    }
    let len = encoded_len(n);
    let mut buf = [0u8; MAX_LEN];
    for (i, b) in buf[..len].iter_mut().enumerate() {
        let shift = 7 * (len - 1 - i);
        *b = ((n >> shift) & 0x7f) as u8 | if i + 1 < len { 0x80 } else { 0 };
    }
    out.put_slice(&buf[..len]);
}

/// Outcome of decoding a varint from the front of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Varint {
    /// The value and how many bytes it took.
    Value(u64, usize),
    /// The buffer ends inside the number.
    Incomplete,
    /// More than 64 bits.
    Overflow,
}

/// Decodes the varint at the start of `buf`.
///
/// ```
/// use forkrpc::wire::ber::{decode, Varint};
/// assert_eq!(decode(&[0x81, 0x00, 0xff]), Varint::Value(128, 2));
/// assert_eq!(decode(&[0x81]), Varint::Incomplete);
/// ```
#[inline]
pub fn decode(buf: &[u8]) -> Varint {
    let mut n: u64 = 0;
    for (i, &b) in buf.iter().enumerate() {
        if n >> 57 != 0 {
            return Varint::Overflow;
        }
        n = (n << 7) | u64::from(b & 0x7f);
        if b & 0x80 == 0 {
            return Varint::Value(n, i + 1);
        }
    }
    Varint::Incomplete
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_match_encoding() {
        for n in [0u64, 1, 127, 128, 16383, 16384, u32::MAX as u64, u64::MAX] {
            let mut v = Vec::new();
            encode(n, &mut v);
            assert_eq!(v.len(), encoded_len(n), "n={n}");
            assert_eq!(decode(&v), Varint::Value(n, v.len()));
        }
    }

    #[test]
    fn overflow_is_reported() {
        assert_eq!(decode(&[0xff; 11]), Varint::Overflow);
    }
}
