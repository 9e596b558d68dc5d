//! Property tests of the wire codecs (hardening): what the encoders make
//! decodes back to what went in, streamed in any cut; and no input, however
//! malformed, makes a decoder panic — it answers with an error or asks for
//! more bytes (`Incomplete` is ordinary control flow).

use bytes::{Bytes, BytesMut};
use forkrpc::wire::ber::{self, Varint};
use forkrpc::wire::chunk::{self, ItemResult, ReplyWriter};
use forkrpc::wire::frame::{self, Decoded};
use forkrpc::wire::{arena_ref, WireError};
use forkrpc::Octets;
use proptest::prelude::*;

fn octets() -> impl Strategy<Value = Octets> {
    proptest::collection::vec(
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..4),
            proptest::collection::vec(any::<u8>(), 100..300),
        ],
        0..6,
    )
    .prop_map(|v| Octets(v.into_iter().map(Bytes::from).collect()))
}

fn item_result() -> impl Strategy<Value = ItemResult> {
    prop_oneof![
        octets().prop_map(ItemResult::Reply),
        "[a-z ]{0,20}".prop_map(ItemResult::Error),
        "[a-z ]{0,20}".prop_map(ItemResult::Panic),
        Just(ItemResult::NotRun),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn ber_round_trips_every_u64(n in any::<u64>()) {
        let mut buf = BytesMut::new();
        ber::encode(n, &mut buf);
        prop_assert_eq!(buf.len(), ber::encoded_len(n));
        prop_assert_eq!(ber::decode(&buf), Varint::Value(n, buf.len()));
        // Any proper prefix is incomplete, never a wrong value.
        for k in 0..buf.len() {
            prop_assert_eq!(ber::decode(&buf[..k]), Varint::Incomplete);
        }
    }

    #[test]
    fn ber_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..16)) {
        match ber::decode(&bytes) {
            Varint::Value(_, used) => prop_assert!(used >= 1 && used <= bytes.len()),
            Varint::Incomplete => prop_assert!(bytes.iter().all(|b| b & 0x80 != 0)),
            Varint::Overflow => {}
        }
    }

    #[test]
    fn octets_round_trip(o in octets()) {
        let bytes = o.to_bytes();
        prop_assert_eq!(bytes.len() as u64, o.encoded_len());
        prop_assert!(Octets::check(&bytes).is_ok());
        prop_assert_eq!(Octets::decode(bytes).unwrap(), o);
    }

    /// Arbitrary bytes: `check` and `decode` agree, neither panics, and
    /// what decodes re-encodes to bytes that decode to the same strings.
    #[test]
    fn octets_decode_of_any_bytes_is_an_answer(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        let checked = Octets::check(&bytes);
        let decoded = Octets::decode(Bytes::from(bytes));
        prop_assert_eq!(checked.is_ok(), decoded.is_ok());
        if let Ok(o) = decoded {
            prop_assert_eq!(Octets::decode(o.to_bytes()).unwrap(), o);
        }
    }

    /// A stream of frames cut anywhere (as reads deliver it) yields the
    /// same frames in order, and a cut frame is `Incomplete`, not an error.
    #[test]
    fn frames_split_the_same_however_the_stream_is_cut(
        frames in proptest::collection::vec((any::<u32>(), octets()), 0..8),
        cuts in proptest::collection::vec(any::<proptest::sample::Index>(), 0..8),
        with_ids in any::<bool>(),
    ) {
        let mut stream = BytesMut::new();
        for (id, o) in &frames {
            let payload = o.to_bytes();
            if with_ids {
                frame::put_id_header(&mut stream, *id, payload.len() as u32);
            } else {
                frame::put_len_header(&mut stream, payload.len() as u32);
            }
            stream.extend_from_slice(&payload);
        }
        let stream = stream.freeze();
        let mut points: Vec<usize> = cuts.iter().map(|c| c.index(stream.len() + 1)).collect();
        points.push(stream.len());
        points.sort_unstable();
        let (mut buf, mut got, mut from) = (BytesMut::new(), Vec::new(), 0);
        for p in points {
            buf.extend_from_slice(&stream[from..p]);
            from = p;
            loop {
                let d = if with_ids {
                    frame::split_id_frame(&mut buf)
                } else {
                    frame::split_len_frame(&mut buf)
                };
                match d {
                    Decoded::Frame(f) => got.push(f),
                    Decoded::Incomplete { needed } => {
                        prop_assert!(needed > buf.len());
                        break;
                    }
                }
            }
        }
        prop_assert!(buf.is_empty());
        prop_assert_eq!(got.len(), frames.len());
        for (f, (id, o)) in got.iter().zip(&frames) {
            prop_assert_eq!(f.id, if with_ids { *id } else { frame::SYNC_REPLY_ID });
            prop_assert_eq!(&Octets::decode(f.payload.clone()).unwrap(), o);
        }
    }

    /// Chunk requests and replies round-trip; their items come back in order.
    #[test]
    fn chunks_round_trip(calls in proptest::collection::vec(octets(), 0..10), results in proptest::collection::vec(item_result(), 0..10)) {
        let req = chunk::request(calls.iter());
        prop_assert!(chunk::is_chunk(&req));
        prop_assert_eq!(chunk::check(&req).unwrap(), calls.len());
        prop_assert_eq!(chunk::items(&req).unwrap(), calls.clone());
        let mut w = ReplyWriter::new();
        for r in &results {
            w.push(r);
        }
        let reply = w.finish();
        prop_assert!(chunk::is_chunk(&reply));
        prop_assert_eq!(chunk::results(&reply[1]).unwrap(), results);
    }

    /// Malformed chunk bodies and shared forms get errors, never a panic.
    #[test]
    fn chunk_and_shared_decoders_answer_any_bytes(
        blob in proptest::collection::vec(any::<u8>(), 0..64),
        strings in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..12), 0..5),
    ) {
        let blob = Bytes::from(blob);
        let all: Vec<_> = chunk::each_result(&blob).collect();
        // An error ends the results: nothing follows it.
        if let Some(k) = all.iter().position(|r| r.is_err()) {
            prop_assert_eq!(k + 1, all.len());
        }
        let _ = chunk::results(&blob);
        let o = Octets(strings.into_iter().map(Bytes::from).collect());
        if !chunk::is_chunk(&o) {
            prop_assert_eq!(chunk::items(&o), Err(WireError::NotChunk));
            prop_assert_eq!(chunk::check(&o), Err(WireError::NotChunk));
        }
        // A reference may name nothing: the view refuses it.
        let _ = arena_ref::decode(&o, |_, _| None);
        let _ = arena_ref::decode_frozen(&o, |_, _| None);
    }
}
