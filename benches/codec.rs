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

criterion_group!(benches, varint, octets, frames, chunks);
criterion_main!(benches);
