//! Every vector of tests/data/wire-vectors.json (made with Perl's own
//! `pack`) reproduced byte for byte, in both directions; decoding shares
//! the received buffer.

use bytes::{Bytes, BytesMut};
use forkrpc::wire::ber::{self, Varint};
use forkrpc::wire::frame::{put_id_header, put_len_header, split_id_frame, split_len_frame};
use forkrpc::wire::Decoded;
use forkrpc::Octets;
use serde_json::Value;

fn vectors() -> Value {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/wire-vectors.json"
    ))
    .unwrap();
    serde_json::from_str(&text).unwrap()
}

fn unhex(v: &Value) -> Vec<u8> {
    hex::decode(v.as_str().unwrap()).unwrap()
}

fn args(case: &Value) -> Octets {
    case["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| Bytes::from(unhex(a)))
        .collect()
}

#[test]
fn ber_varints_match_perl_pack_w() {
    let v = vectors();
    let list = v["varints"].as_array().unwrap();
    assert!(list.len() >= 15);
    for item in list {
        let n = item["n"].as_u64().unwrap();
        let expect = unhex(&item["ber"]);
        let mut got = Vec::new();
        ber::encode(n, &mut got);
        assert_eq!(hex::encode(&got), hex::encode(&expect), "encode {n}");
        assert_eq!(ber::encoded_len(n), expect.len(), "length of {n}");
        assert_eq!(
            ber::decode(&expect),
            Varint::Value(n, expect.len()),
            "decode {n}"
        );
        if expect.len() > 1 {
            assert_eq!(ber::decode(&expect[..expect.len() - 1]), Varint::Incomplete);
        }
    }
}

fn encode_request_sync(o: &Octets) -> Vec<u8> {
    let mut b = Vec::new();
    put_len_header(&mut b, o.encoded_len() as u32);
    o.encode(&mut b);
    b
}

fn encode_id_frame(id: u32, o: &Octets) -> Vec<u8> {
    let mut b = Vec::new();
    put_id_header(&mut b, id, o.encoded_len() as u32);
    o.encode(&mut b);
    b
}

/// Decodes `payload` and checks that every string points into `buf`.
fn decode_shared(payload: Bytes, buf_range: std::ops::Range<usize>) -> Octets {
    let o = Octets::decode(payload).unwrap();
    for s in o.iter().filter(|s| !s.is_empty()) {
        let p = s.as_ptr() as usize;
        assert!(
            buf_range.contains(&p) && p + s.len() <= buf_range.end,
            "string was copied"
        );
    }
    o
}

#[test]
fn frames_match_perl_pack_both_directions() {
    let v = vectors();
    let cases = v["cases"].as_array().unwrap();
    assert!(cases.len() >= 5);
    for (i, case) in cases.iter().enumerate() {
        let a = args(case);
        // octets: pack "(w/a*)*"
        let octets = unhex(&case["octets"]);
        assert_eq!(a.to_bytes()[..], octets[..], "case {i}: octets");
        assert_eq!(a.encoded_len(), octets.len() as u64);

        // parent → child, sync: pack "N/a*"
        let sync = unhex(&case["sync_request"]);
        assert_eq!(encode_request_sync(&a), sync, "case {i}: sync request");
        let mut buf = BytesMut::from(&sync[..]);
        let range = buf.as_ptr() as usize..buf.as_ptr() as usize + buf.len();
        match split_len_frame(&mut buf) {
            Decoded::Frame(f) => assert_eq!(decode_shared(f.payload, range), a),
            Decoded::Incomplete { .. } => panic!("case {i}: sync request incomplete"),
        }
        assert!(buf.is_empty());

        // parent → child async, child → parent reply and event: pack "NN/a*"
        for (key, id) in [
            (
                "async_request",
                case["async_request"]["id"].as_u64().unwrap() as u32,
            ),
            ("reply", case["reply"]["id"].as_u64().unwrap() as u32),
            ("event", 0),
        ] {
            let frame = if key == "event" {
                unhex(&case["event"])
            } else {
                unhex(&case[key]["frame"])
            };
            assert_eq!(encode_id_frame(id, &a), frame, "case {i}: {key}");
            let mut buf = BytesMut::from(&frame[..]);
            let range = buf.as_ptr() as usize..buf.as_ptr() as usize + buf.len();
            match split_id_frame(&mut buf) {
                Decoded::Frame(f) => {
                    assert_eq!(f.id, id, "case {i}: {key} id");
                    assert_eq!(decode_shared(f.payload, range), a, "case {i}: {key}");
                }
                Decoded::Incomplete { .. } => panic!("case {i}: {key} incomplete"),
            }
        }
    }
}

#[test]
fn frames_split_across_reads() {
    // Two replies delivered one byte at a time come out whole and in order.
    let v = vectors();
    let cases = v["cases"].as_array().unwrap();
    let stream: Vec<u8> = [
        unhex(&cases[2]["reply"]["frame"]),
        unhex(&cases[3]["event"]),
    ]
    .concat();
    let mut buf = BytesMut::new();
    let mut got = Vec::new();
    for b in stream {
        buf.extend_from_slice(&[b]);
        while let Decoded::Frame(f) = split_id_frame(&mut buf) {
            got.push((f.id, Octets::decode(f.payload).unwrap()));
        }
    }
    assert_eq!(
        got,
        vec![
            (
                cases[2]["reply"]["id"].as_u64().unwrap() as u32,
                args(&cases[2])
            ),
            (0, args(&cases[3])),
        ]
    );
}
