//! Shared payloads (see [`SHARED_TAG`]): octets whose big strings stay in
//! the parent's shared arena and are named by offset and length instead of
//! being sent. Only between a forkrpc parent and the workers it started, which
//! get the arena when they start; a Perl peer never sees them. The arena
//! itself (memory, who holds what) is not wire format: see `arena.rs`.
//!
//! `[SHARED_TAG, map, e1, ..., en]` stands for the octets `[s1, ..., sn]`:
//! byte `i` of `map` is 0 if `ei` is `si` itself, 1 if `ei` is 16 bytes,
//! `offset, length` (u64 big-endian), naming `si` in the arena.
//!
//! `[SHARED_TAG, [2], e]` stands for a serialiser's frozen payload (not
//! octets) that `e` names in the arena: a typed call's big request.
//!
//! A worker that has dropped every view of a string it received says so
//! with the event `[RELEASE_TAG, offsets]` (offsets as received, u64
//! big-endian each), sent after any reply that names the string.

use super::{Octets, WireError, RELEASE_TAG, SHARED_TAG};
use bytes::Bytes;

/// Size of a reference element: offset and length.
pub const REF_LEN: usize = 16;

/// Whether `o` is a shared payload.
pub fn is_shared(o: &Octets) -> bool {
    o.first().is_some_and(|t| t[..] == *SHARED_TAG.as_bytes())
}

/// Whether an encoded payload may be a shared one (its first string is
/// [`SHARED_TAG`]), without decoding it.
pub fn starts_shared(payload: &[u8]) -> bool {
    super::starts_with_tag(payload, SHARED_TAG)
}

/// A reference element: `offset, len`.
fn reference(offset: u64, len: u64) -> Bytes {
    [offset.to_be_bytes(), len.to_be_bytes()].concat().into()
}

/// The `offset, len` of a reference element, if it is one.
fn referred(e: &[u8]) -> Option<(u64, u64)> {
    let e: &[u8; REF_LEN] = e.try_into().ok()?;
    let (off, len) = e.split_at(8);
    Some((
        u64::from_be_bytes(off.try_into().unwrap()),
        u64::from_be_bytes(len.try_into().unwrap()),
    ))
}

/// The shared form of `strings`: those `place` finds an offset for become
/// references; `None` if it finds none (send the strings as they are).
pub fn encode(strings: &[Bytes], mut place: impl FnMut(&Bytes) -> Option<u64>) -> Option<Octets> {
    let mut map = Vec::with_capacity(strings.len());
    let mut out = Vec::with_capacity(strings.len() + 2);
    out.push(Bytes::from_static(SHARED_TAG.as_bytes()));
    out.push(Bytes::new());
    for s in strings {
        match place(s) {
            Some(offset) => {
                map.push(1);
                out.push(reference(offset, s.len() as u64));
            }
            None => {
                map.push(0);
                out.push(s.clone());
            }
        }
    }
    if !map.contains(&1) {
        return None;
    }
    out[1] = map.into();
    Some(Octets(out))
}

/// The shared form of a frozen payload lying at `offset` in the arena.
pub fn encode_frozen(offset: u64, len: u64) -> Octets {
    Octets(vec![
        Bytes::from_static(SHARED_TAG.as_bytes()),
        Bytes::from_static(&[2]),
        reference(offset, len),
    ])
}

/// The frozen payload a shared form names, if it is one (`None` for the
/// octets form); `view` as for [`decode`].
pub fn decode_frozen(
    o: &Octets,
    view: impl FnOnce(u64, u64) -> Option<Bytes>,
) -> Result<Option<Bytes>, WireError> {
    match &o.0[..] {
        [_, map, e] if map[..] == [2] => {
            let (offset, len) =
                referred(e).ok_or(WireError::Shared("a malformed frozen payload"))?;
            view(offset, len)
                .map(Some)
                .ok_or(WireError::Shared("a reference names no shared string"))
        }
        [_, map, ..] if map.contains(&2) => Err(WireError::Shared("a malformed frozen payload")),
        _ => Ok(None),
    }
}

/// The strings a shared payload stands for; `view(offset, length)` gives
/// the string a reference names, or `None` if it names nothing it may.
pub fn decode(
    o: &Octets,
    mut view: impl FnMut(u64, u64) -> Option<Bytes>,
) -> Result<Octets, WireError> {
    let (map, elems) = match &o.0[..] {
        [_, map, elems @ ..] if map.len() == elems.len() => (map, elems),
        _ => return Err(WireError::Shared("its map does not match its strings")),
    };
    let mut out = Vec::with_capacity(elems.len());
    for (&kind, e) in map.iter().zip(elems) {
        out.push(match kind {
            0 => e.clone(),
            1 => match referred(e) {
                Some((offset, len)) => view(offset, len)
                    .ok_or(WireError::Shared("a reference names no shared string"))?,
                None => return Err(WireError::Shared("a malformed element")),
            },
            _ => return Err(WireError::Shared("a malformed element")),
        });
    }
    Ok(Octets(out))
}

/// The release note for `offsets`.
pub fn release_note(offsets: &[u64]) -> Octets {
    let blob: Vec<u8> = offsets.iter().flat_map(|o| o.to_be_bytes()).collect();
    Octets(vec![
        Bytes::from_static(RELEASE_TAG.as_bytes()),
        blob.into(),
    ])
}

/// The offsets of a release note (`[RELEASE_TAG, offsets]`).
pub fn released(note: &Octets) -> Result<impl Iterator<Item = u64> + '_, WireError> {
    match &note.0[..] {
        [_, blob] if blob.len() % 8 == 0 => Ok(blob
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap()))),
        _ => Err(WireError::Shared("a malformed release note")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::octets;

    #[test]
    fn big_strings_become_references_and_come_back() {
        let big = Bytes::from(vec![9u8; 100]);
        let args = octets!["cmd", big.clone()];
        let shared = encode(&args.0, |s| (s.len() == 100).then_some(0x1_0000_0002)).unwrap();
        assert!(is_shared(&shared));
        assert!(starts_shared(&shared.to_bytes()));
        assert!(!starts_shared(&args.to_bytes()));
        assert_eq!(
            shared.to_bytes()[..],
            [
                &[12][..],
                b"\0forkrpc-shm",
                &[2, 0, 1],
                &[3],
                b"cmd",
                &[16, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 100]
            ]
            .concat()[..]
        );
        let mut named = vec![];
        let back = decode(&shared, |off, len| {
            named.push((off, len));
            Some(big.clone())
        })
        .unwrap();
        assert_eq!(back, args);
        assert_eq!(named, [(0x1_0000_0002, 100)]);
    }

    #[test]
    fn nothing_placed_means_no_shared_form() {
        assert_eq!(encode(&octets!["a", "b"].0, |_| None), None);
    }

    #[test]
    fn malformed_shared_payloads_are_errors() {
        let tag = SHARED_TAG;
        let cases = [
            octets![tag],
            octets![tag, vec![1u8, 0], "x"],
            octets![tag, vec![1u8], "short"],
            octets![tag, vec![2u8], "x"],
        ];
        for c in cases {
            assert!(
                matches!(decode(&c, |_, _| None), Err(WireError::Shared(_))),
                "{c:?}"
            );
        }
        let good_ref = octets![tag, vec![1u8], vec![0u8; 16]];
        assert_eq!(
            decode(&good_ref, |_, _| None),
            Err(WireError::Shared("a reference names no shared string"))
        );
    }

    #[test]
    fn frozen_payloads_name_one_string() {
        let f = encode_frozen(4100, 1 << 20);
        assert!(starts_shared(&f.to_bytes()));
        let got = decode_frozen(&f, |off, len| {
            assert_eq!((off, len), (4100, 1 << 20));
            Some(Bytes::from_static(b"payload"))
        });
        assert_eq!(got, Ok(Some(Bytes::from_static(b"payload"))));
        assert_eq!(
            decode_frozen(&f, |_, _| None),
            Err(WireError::Shared("a reference names no shared string"))
        );
        // The octets form is not a frozen one, and a 2 among strings is bad.
        let octets = encode(&[Bytes::from(vec![1u8; 9])], |_| Some(0)).unwrap();
        assert_eq!(decode_frozen(&octets, |_, _| None), Ok(None));
        let bad = octets![SHARED_TAG, vec![0u8, 2], "a", vec![0u8; 16]];
        assert!(decode_frozen(&bad, |_, _| None).is_err());
        let short = octets![SHARED_TAG, vec![2u8], vec![0u8; 15]];
        assert_eq!(
            decode_frozen(&short, |_, _| Some(Bytes::new())),
            Err(WireError::Shared("a malformed frozen payload"))
        );
        assert!(decode(&f, |_, _| Some(Bytes::new())).is_err(), "not octets");
    }

    #[test]
    fn release_notes_round_trip() {
        let n = release_note(&[0, 4096, u64::MAX]);
        assert_eq!(n.to_bytes().len(), 1 + 16 + 1 + 24);
        assert_eq!(
            released(&n).unwrap().collect::<Vec<_>>(),
            [0, 4096, u64::MAX]
        );
        assert!(released(&octets![RELEASE_TAG, "1234567"]).is_err());
    }
}
