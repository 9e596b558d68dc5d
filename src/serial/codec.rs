//! The contract every serialiser keeps.

use crate::error::{Error, Result};
use bytes::{Bytes, BytesMut};

/// How values of type `T` travel in frames.
pub trait Codec<T>: Send + Sync + 'static {
    /// What a payload thaws into: `T`, or a view of it.
    type Thawed: Send + 'static;

    /// Appends the payload for `value` to `out`. `offset` is the size of
    /// the frame header in front of it (4 for a sync request, 8 otherwise),
    /// for codecs that align their payload.
    fn freeze(&self, value: &T, out: &mut BytesMut, offset: usize) -> Result<()>;

    /// Reads a payload that had `offset` header bytes in front of it.
    fn thaw(&self, payload: Bytes, offset: usize) -> Result<Self::Thawed>;
}

pub(crate) fn codec_error(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Codec {
        detail: format!("{what}: {e}"),
    }
}
