//! The wire codecs with no I/O: BER varints, the octets serialiser, frame
//! headers and splitting, and chunk frames (bulk `map`).
//!
//! `cargo bench --bench codec`

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use forkrpc::wire::{ber, chunk, frame, Decoded, Octets};
use std::hint::black_box;

fn varint(c: &mut Criterion) {
    let mut g = c.benchmark_group("ber");
    for n in [5u64, 300, 1 << 20, u32::MAX as u64] {
        g.bench_with_input(BenchmarkId::new("encode", n), &n, |b, &n| {
            let mut out = Vec::with_capacity(16);
            b.iter(|| {
                out.clear();
                ber::encode(black_box(n), &mut out);
                out.len()
            })
        });
        let mut enc = Vec::new();
        ber::encode(n, &mut enc);
        g.bench_with_input(BenchmarkId::new("decode", n), &enc, |b, enc| {
            b.iter(|| ber::decode(black_box(enc)))
        });
    }
    g.finish();
}

fn octets(c: &mut Criterion) {
    let mut g = c.benchmark_group("octets");
    for size in [16usize, 1024, 1 << 20] {
        let o = Octets(vec![
            Bytes::from(vec![7u8; size]),
            Bytes::from_static(b"rmdir"),
        ]);
        g.throughput(Throughput::Bytes(o.encoded_len()));
        g.bench_with_input(BenchmarkId::new("encode", size), &o, |b, o| {
            let mut out = BytesMut::with_capacity(o.encoded_len() as usize);
            b.iter(|| {
                out.clear();
                o.encode(&mut out);
                out.len()
            })
        });
        let enc = o.to_bytes();
        g.bench_with_input(BenchmarkId::new("decode", size), &enc, |b, enc| {
            b.iter(|| Octets::decode(black_box(enc.clone())).unwrap())
        });
    }
    g.finish();
}

fn frames(c: &mut Criterion) {
    let mut g = c.benchmark_group("frame");
    // 1000 reply frames of a 16-byte argument back to back, as a read
    // buffer holds them in W1.
    let payload = Octets(vec![Bytes::from_static(b"0123456789abcdef")]).to_bytes();
    let mut stream = BytesMut::new();
    for _ in 0..1000 {
        frame::put_id_header(&mut stream, 1, payload.len() as u32);
        stream.extend_from_slice(&payload);
    }
    g.throughput(Throughput::Elements(1000));
    g.bench_function("split_1000_id_frames", |b| {
        b.iter(|| {
            let mut buf = stream.clone();
            let mut n = 0;
            while let Decoded::Frame(f) = frame::split_id_frame(&mut buf) {
                n += f.payload.len();
            }
            n
        })
    });
    g.bench_function("put_1000_len_headers", |b| {
        let mut out = BytesMut::with_capacity(1000 * 24);
        b.iter(|| {
            out.clear();
            for _ in 0..1000 {
                frame::put_len_header(&mut out, payload.len() as u32);
                out.extend_from_slice(&payload);
            }
            out.len()
        })
    });
    g.finish();
}

fn chunks(c: &mut Criterion) {
    let mut g = c.benchmark_group("chunk");
    let calls: Vec<Octets> = (0..1024)
        .map(|i| Octets(vec![Bytes::from(format!("{i:016}"))]))
        .collect();
    g.throughput(Throughput::Elements(calls.len() as u64));
    g.bench_function("request_1024", |b| b.iter(|| chunk::request(calls.iter())));
    let req = chunk::request(calls.iter());
    g.bench_function("items_1024", |b| b.iter(|| chunk::items(&req).unwrap()));
    let mut w = chunk::ReplyWriter::new();
    for o in &calls {
        w.push(&chunk::ItemResult::Reply(o.clone()));
    }
    let reply = w.finish();
    g.bench_function("results_1024", |b| {
        b.iter(|| chunk::results(&reply[1]).unwrap())
    });
    g.finish();
}

/// Each serialiser freezing and thawing a byte payload of 16 B, 1 KiB and
/// 1 MiB (for JSON a string of that many characters).
fn serialisers(c: &mut Criterion) {
    use forkrpc::serial::{Archived, Codec, Json, OctetsCodec, Rkyv};
    let mut g = c.benchmark_group("serialiser");
    for size in [16usize, 1024, 1 << 20] {
        g.throughput(Throughput::Bytes(size as u64));
        let oct = Octets(vec![Bytes::from(vec![b'x'; size])]);
        let json = serde_json::Value::String("x".repeat(size));
        let bin = vec![b'x'; size];
        let frozen = |f: &dyn Fn(&mut BytesMut)| {
            let mut b = BytesMut::new();
            f(&mut b);
            b.freeze()
        };
        g.bench_with_input(BenchmarkId::new("octets/freeze", size), &oct, |b, v| {
            let mut out = BytesMut::new();
            b.iter(|| {
                out.clear();
                OctetsCodec.freeze(v, &mut out, 8).unwrap()
            })
        });
        let p = frozen(&|b| OctetsCodec.freeze(&oct, b, 8).unwrap());
        g.bench_with_input(BenchmarkId::new("octets/thaw", size), &p, |b, p| {
            b.iter(|| OctetsCodec.thaw(p.clone(), 8).unwrap())
        });
        g.bench_with_input(BenchmarkId::new("json/freeze", size), &json, |b, v| {
            let mut out = BytesMut::new();
            b.iter(|| {
                out.clear();
                Json.freeze(v, &mut out, 8).unwrap()
            })
        });
        let p = frozen(&|b| Json.freeze(&json, b, 8).unwrap());
        g.bench_with_input(BenchmarkId::new("json/thaw", size), &p, |b, p| {
            b.iter(|| -> serde_json::Value { Json.thaw(p.clone(), 8).unwrap() })
        });
        g.bench_with_input(BenchmarkId::new("rkyv/freeze", size), &bin, |b, v| {
            let mut out = BytesMut::new();
            b.iter(|| {
                out.clear();
                Rkyv::checked().freeze(v, &mut out, 8).unwrap()
            })
        });
        // Thaw from a 16-aligned payload, as in a receive buffer.
        let p = frozen(&|b| Rkyv::checked().freeze(&bin, b, 8).unwrap());
        let mut block = rkyv::util::AlignedVec::<16>::new();
        block.extend_from_slice(&[0u8; 8]);
        block.extend_from_slice(&p);
        let block = Bytes::from(block.to_vec());
        let aligned = if (block.as_ptr() as usize + 16) % 16 == 0 {
            block.slice(8..)
        } else {
            p.clone()
        };
        g.bench_with_input(BenchmarkId::new("rkyv/thaw", size), &aligned, |b, p| {
            b.iter(|| -> Archived<Vec<u8>> { Rkyv::checked().thaw(p.clone(), 8).unwrap() })
        });
    }
    g.finish();
}

criterion_group!(benches, varint, octets, frames, chunks, serialisers);
criterion_main!(benches);
