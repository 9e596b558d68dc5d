//! The byte layout, and nothing else: BER varints, the octets serialiser and
//! the frame headers of AnyEvent::Fork::RPC 1.21. No syscalls, no engine.
//!
//! | direction | backend | frame |
//! |---|---|---|
//! | parent → child | sync | `u32 len, payload` (Perl `pack "N/a*"`) |
//! | parent → child | async | `u32 id, u32 len, payload` (`pack "NN/a*"`), id ≠ 0 |
//! | child → parent | both | `u32 id, u32 len, payload`; id 0 = event |
//!
//! All integers are big-endian. A sync reply carries id 1.

pub mod ber;
mod error;
pub mod frame;
pub mod octets;
pub(crate) mod sendq;

pub use error::WireError;
pub use frame::{Decoded, Frame, MAX_PAYLOAD};

/// Strings at least this big are sent from where they lie (a send of
/// their own, or written straight to the socket by a worker) rather than
/// copied into a frame buffer. Shared by the parent's send queue, its
/// callers' framing, the pool's chunks and the workers.
pub(crate) const SEND_IN_PLACE: usize = 64 * 1024;

/// Where a reply's or event's payload starts in its frame: after the
/// `NN` header (typed replies are thawed at this offset).
pub(crate) const REPLY_OFFSET: usize = frame::ID_HEADER;
pub use octets::Octets;

/// First element of the event a forkrpc worker sends before it exits on a
/// fatal condition: `[FATAL_TAG, kind, message]`, kind being `panic`,
/// `init-panic`, `protocol` or `start` (the worker could not start). A native extension that keeps the frame
/// layout: a Perl parent sees an ordinary event.
pub const FATAL_TAG: &str = "\0forkrpc-fatal";

/// First element of the event a forkrpc worker sends *instead of* the
/// reply of a call that failed: `[ERROR_TAG, id, kind, message]` (id in
/// decimal, 1 for a sync call; kind `error`, `panic` or `dropped`). The
/// worker carries on. A native extension like [`FATAL_TAG`].
pub const ERROR_TAG: &str = "\0forkrpc-error";

/// The event a worker sends to ask its pool to retire it: `[RETIRE_TAG]`.
pub const RETIRE_TAG: &str = "\0forkrpc-retire";

/// First element of a *chunk* request: `[CHUNK_TAG, item, item, ...]`,
/// each item being the octets encoding of one call's arguments. The worker
/// runs the handler on each item in order and answers with one reply
/// `[CHUNK_TAG, result, result, ...]`, each result one status byte then
/// its body (see [`chunk`]). Pools use it for `map`; a Perl peer never
/// sees it.
pub const CHUNK_TAG: &str = "\0forkrpc-chunk";

/// First element of the event that carries the results of a chunk's
/// first items *before* the chunk's reply: `[CHUNK_PART_TAG, results]`
/// (results as in the reply). A worker sends it when a handler emits an
/// event mid-chunk, so that the parent sees every reply and event in the
/// order the worker made them; the chunk's reply then carries the rest.
pub const CHUNK_PART_TAG: &str = "\0forkrpc-part";

/// First element of a *shared* payload: `[SHARED_TAG, map, strings...]`,
/// whose big strings lie in the parent's shared arena (see [`arena_ref`]).
/// Between a forkrpc parent and the workers it started only.
pub const SHARED_TAG: &str = "\0forkrpc-shm";

/// The event a worker sends once it dropped strings it received in
/// the shared arena: `[RELEASE_TAG, offsets]` (see [`arena_ref`]).
pub const RELEASE_TAG: &str = "\0forkrpc-release";

/// Whether an encoded octets payload's first string is `tag` (one of the
/// tags above), without decoding it.
pub fn starts_with_tag(payload: &[u8], tag: &str) -> bool {
    payload.first() == Some(&(tag.len() as u8)) && payload[1..].starts_with(tag.as_bytes())
}

pub mod arena_ref;
pub mod chunk;
