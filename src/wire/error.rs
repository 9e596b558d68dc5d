//! What can be wrong with a payload's bytes.

/// A payload that does not follow the wire format.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// A length prefix points past the end of the payload.
    #[error("payload truncated: a length prefix points past its end")]
    Truncated,
    /// A BER length longer than 64 bits.
    #[error("BER length prefix longer than 64 bits")]
    VarintOverflow,
    /// Not a chunk request or reply: its tag and one blob (see
    /// [`CHUNK_TAG`](super::CHUNK_TAG)).
    #[error("not a chunk: a chunk is its tag and one string of items")]
    NotChunk,
    /// A chunk reply item with an unknown status byte.
    #[error("chunk reply item with an unknown status")]
    BadChunkItem,
    /// A shared payload (see [`arena_ref`](super::arena_ref)) that does not follow its format.
    #[error("malformed shared payload: {0}")]
    Shared(&'static str),
}
