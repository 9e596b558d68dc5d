//! The default serialiser: a list of byte strings, each prefixed by its BER
//! length — Perl `pack "(w/a*)*"`. Decoding slices the received buffer, so
//! the strings share its allocation and nothing is copied.

use super::ber::{self, Varint};
use super::error::WireError;
use bytes::{BufMut, Bytes, BytesMut};

/// The arguments of a call, a reply, or an event: a list of byte strings.
///
/// ```
/// use forkrpc::{octets, Octets};
/// let o: Octets = octets!["rmdir", "/tmp/x"];
/// assert_eq!(o.len(), 2);
/// assert_eq!(&o[1][..], b"/tmp/x");
/// assert_eq!(o.str(0), Some("rmdir"));
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Octets(pub Vec<Bytes>);

/// Builds an [`Octets`] from anything convertible into [`Bytes`]
/// (`&'static str`, `String`, `Vec<u8>`, `Bytes`, …).
#[macro_export]
macro_rules! octets {
    () => { $crate::Octets::new() };
    ($($x:expr),+ $(,)?) => {
        $crate::Octets(vec![$($crate::__to_bytes($x)),+])
    };
}

#[doc(hidden)]
pub fn __to_bytes(x: impl Into<Bytes>) -> Bytes {
    x.into()
}

impl Octets {
    /// An empty list.
    pub fn new() -> Self {
        Octets(Vec::new())
    }

    /// Element `i` as UTF-8, if it exists and is valid UTF-8.
    pub fn str(&self, i: usize) -> Option<&str> {
        self.0.get(i).and_then(|b| std::str::from_utf8(b).ok())
    }

    /// Element `i` read as a decimal number (Perl's numeric view of a string).
    pub fn num(&self, i: usize) -> Option<i64> {
        self.str(i).and_then(|s| s.trim().parse().ok())
    }

    /// The encoded size in bytes.
    pub fn encoded_len(&self) -> u64 {
        self.0
            .iter()
            .map(|b| (ber::encoded_len(b.len() as u64) + b.len()) as u64)
            .sum()
    }

    /// Appends the encoding to `out`.
    pub fn encode(&self, out: &mut impl BufMut) {
        for b in &self.0 {
            ber::encode(b.len() as u64, out);
            out.put_slice(b);
        }
    }

    /// The encoding as a new buffer.
    pub fn to_bytes(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(self.encoded_len() as usize);
        self.encode(&mut out);
        out.freeze()
    }

    /// Decodes a whole payload; the strings are slices of `payload`.
    ///
    /// ```
    /// use bytes::Bytes;
    /// let o = forkrpc::Octets::decode(Bytes::from_static(b"\x01a\x02bc")).unwrap();
    /// assert_eq!(o, forkrpc::octets!["a", "bc"]);
    /// ```
    pub fn decode(payload: Bytes) -> Result<Octets, WireError> {
        Octets::decode_in(&payload, 0..payload.len())
    }

    /// Decodes the encoding at `range` of `buf`; the strings are slices of
    /// `buf` (no temporary slice of the range itself).
    pub fn decode_in(buf: &Bytes, range: std::ops::Range<usize>) -> Result<Octets, WireError> {
        if range.is_empty() {
            return Ok(Octets(Vec::new()));
        }
        // What the first push would reserve, without its slow path: most
        // calls and replies carry one to three strings.
        let mut items = Vec::with_capacity(4);
        walk(buf, range, |r| items.push(buf.slice(r)))?;
        Ok(Octets(items))
    }

    /// Checks that `bytes` is a well-formed encoding, without decoding it.
    ///
    /// ```
    /// assert!(forkrpc::Octets::check(b"\x01a\x02bc").is_ok());
    /// assert!(forkrpc::Octets::check(b"\x05ab").is_err());
    /// ```
    pub fn check(bytes: &[u8]) -> Result<(), WireError> {
        walk(bytes, 0..bytes.len(), |_| {})
    }
}

/// Hands `each` the range of every string encoded at `range` of `buf`.
fn walk(
    buf: &[u8],
    range: std::ops::Range<usize>,
    mut each: impl FnMut(std::ops::Range<usize>),
) -> Result<(), WireError> {
    let (mut pos, stop) = (range.start, range.end.min(buf.len()));
    while pos < stop {
        let (len, used) = match ber::decode(&buf[pos..stop]) {
            Varint::Value(n, used) => (n, used),
            Varint::Incomplete => return Err(WireError::Truncated),
            Varint::Overflow => return Err(WireError::VarintOverflow),
        };
        pos += used;
        let end = usize::try_from(len)
            .ok()
            .and_then(|l| pos.checked_add(l))
            .filter(|&e| e <= stop)
            .ok_or(WireError::Truncated)?;
        each(pos..end);
        pos = end;
    }
    Ok(())
}

impl std::ops::Deref for Octets {
    type Target = Vec<Bytes>;
    fn deref(&self) -> &Vec<Bytes> {
        &self.0
    }
}

impl std::ops::DerefMut for Octets {
    fn deref_mut(&mut self) -> &mut Vec<Bytes> {
        &mut self.0
    }
}

impl From<Vec<Bytes>> for Octets {
    fn from(v: Vec<Bytes>) -> Self {
        Octets(v)
    }
}

impl<B: Into<Bytes>> FromIterator<B> for Octets {
    fn from_iter<I: IntoIterator<Item = B>>(iter: I) -> Self {
        Octets(iter.into_iter().map(Into::into).collect())
    }
}

impl std::fmt::Display for Octets {
    /// Space-separated, lossy UTF-8 (like Perl's `"@_"`).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            f.write_str(&String::from_utf8_lossy(b))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncated_payloads_are_errors() {
        assert_eq!(
            Octets::decode(Bytes::from_static(b"\x05ab")),
            Err(WireError::Truncated)
        );
        assert_eq!(
            Octets::decode(Bytes::from_static(b"\x81")),
            Err(WireError::Truncated)
        );
    }

    #[test]
    fn decoding_shares_the_buffer() {
        let payload = Bytes::from_static(b"\x03abc\x01d");
        let o = Octets::decode(payload.clone()).unwrap();
        assert_eq!(o[0].as_ptr(), payload[1..].as_ptr());
        assert_eq!(o[1].as_ptr(), payload[5..].as_ptr());
    }
}
