//! Serialisers end to end: JSON byte-compatible with Perl's JSON
//! serialiser (vectors from Perl's JSON::PP), typed calls through workers
//! and pools with JSON, rkyv (read in place, validated) and a codec that
//! is not built in, typed events, and corrupt payloads as errors.
//!
//! Owns `main` (harness = false) because `init()` must run before the test
//! harness starts its threads.

use bytes::{Bytes, BytesMut};
use forkrpc::serial::{Archived, Codec, Json, Rkyv};
use forkrpc::{Error, Options, Pool, PoolOptions, Template};
mod common;

use common::eq;
use libtest_mimic::{Arguments, Failed, Trial};
use std::sync::{mpsc, Mutex};
use std::time::Duration;

#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, PartialEq, Clone)]
struct Job {
    id: u32,
    path: String,
    data: Vec<u8>,
}

#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, PartialEq)]
struct Done {
    id: u32,
    sum: u64,
    /// Whether the worker read the request in place (no alignment copy).
    in_place: bool,
}

/// A codec that is not built in: one `u64`, little-endian.
#[derive(Clone, Copy)]
struct Le64;

impl Codec<u64> for Le64 {
    type Thawed = u64;
    fn freeze(&self, v: &u64, out: &mut BytesMut, _offset: usize) -> forkrpc::Result<()> {
        out.extend_from_slice(&v.to_le_bytes());
        Ok(())
    }
    fn thaw(&self, p: Bytes, _offset: usize) -> forkrpc::Result<u64> {
        let b: [u8; 8] = p[..].try_into().map_err(|_| Error::Codec {
            detail: format!("Le64 wants 8 bytes, got {}", p.len()),
        })?;
        Ok(u64::from_le_bytes(b))
    }
}

/// A codec whose replies are garbage for rkyv: frozen as raw bytes.
use common::RawBytes as Junk;

fn sum_job(j: &Archived<Job>) -> Done {
    Done {
        id: j.id.to_native(),
        sum: j.data.iter().map(|&b| b as u64).sum::<u64>() + j.path.len() as u64,
        in_place: j.in_place(),
    }
}

fn template() -> Result<Template, Error> {
    Template::builder()
        .sync_with("t::add", Json, |(a, b): (i64, i64)| a + b)
        // Perl-style: the arguments as a JSON array of any values.
        .sync_with("t::json_echo", Json, |args: Vec<serde_json::Value>| args)
        .sync_with("t::job", Rkyv::checked(), |j: Archived<Job>| sum_job(&j))
        .async_fn_with(
            "t::job_async",
            Rkyv::checked(),
            |j: Archived<Job>| async move {
                tokio::time::sleep(Duration::from_millis(1)).await;
                sum_job(&j)
            },
        )
        // An octets event of odd length before the reply shifts the stream.
        .sync_with("t::job_after_event", Rkyv::checked(), |j: Archived<Job>| {
            forkrpc::event(forkrpc::octets!["odd"]);
            sum_job(&j)
        })
        .sync_with("t::le64", Le64, |n: u64| n * 3)
        .sync_with("t::junk", Junk, |v: Vec<u8>| v)
        .sync_with("t::progress", Json, |(n,): (u32,)| {
            for i in 1..=n {
                forkrpc::event_with(&Json, &("progress".to_owned(), i));
            }
            "done".to_owned()
        })
        .start()
}

type SerialTest = fn(&Template) -> Result<(), Failed>;

fn main() {
    let t = template().expect("template starts");
    let args = Arguments::from_args();
    let tests: [(&str, SerialTest); 9] = [
        ("json_matches_perl_json_pp", json_vectors),
        ("json_typed_call", json_call),
        ("json_perl_style_arguments", json_perl_style),
        ("rkyv_typed_call_read_in_place", rkyv_call),
        ("rkyv_async_backend", rkyv_async),
        ("rkyv_after_a_shifting_event", rkyv_shifted),
        ("rkyv_corrupt_reply_is_an_error", rkyv_corrupt),
        ("custom_codec_end_to_end", custom_codec),
        ("typed_events_and_pool", typed_events_and_pool),
    ];
    let trials = tests
        .into_iter()
        .map(|(name, f)| {
            let t = t.clone();
            Trial::test(name, move || f(&t))
        })
        .collect();
    libtest_mimic::run(&args, trials).exit();
}

fn json_vectors(_t: &Template) -> Result<(), Failed> {
    let v: serde_json::Value =
        serde_json::from_str(include_str!("data/json-vectors.json")).unwrap();
    let cases = v["cases"].as_array().unwrap();
    assert!(cases.len() >= 7);
    for c in cases {
        let mut out = BytesMut::new();
        Json.freeze(&c["args"], &mut out, 4)?;
        eq(
            hex::encode(&out),
            c["perl_hex"].as_str().unwrap().to_owned(),
        )?;
        // And Perl's bytes thaw to the same values.
        let perl = Bytes::from(hex::decode(c["perl_hex"].as_str().unwrap()).unwrap());
        let back: serde_json::Value = Json.thaw(perl, 4)?;
        eq(&back, &c["args"])?;
    }
    Ok(())
}

fn json_call(t: &Template) -> Result<(), Failed> {
    let rpc = t.fork().run("t::add", Options::default())?;
    let add = rpc.typed::<(i64, i64), i64, _>(Json);
    eq(add.call_blocking(&(2, 3))?, 5)?;
    let (tx, rx) = mpsc::channel();
    add.call_with(&(40, 2), move |r| {
        tx.send(r.map_err(|e| e.to_string())).unwrap()
    });
    eq(rx.recv_timeout(Duration::from_secs(20))?, Ok(42))?;
    drop(add); // a typed handle keeps its worker open, as any clone does
    rpc.close_blocking()?;
    Ok(())
}

fn json_perl_style(t: &Template) -> Result<(), Failed> {
    let rpc = t.fork().run("t::json_echo", Options::default())?;
    let echo = rpc.typed::<serde_json::Value, serde_json::Value, _>(Json);
    let args = serde_json::json!(["rmdir", "/tmp/x", 3, {"k": "v"}, null]);
    eq(echo.call_blocking(&args)?, args)?;
    drop(echo);
    rpc.close_blocking()?;
    Ok(())
}

fn job(id: u32) -> Job {
    Job {
        id,
        path: format!("/tmp/job-{id}"),
        data: (0..=id as u8).collect(),
    }
}

fn expected(j: &Job) -> u64 {
    j.data.iter().map(|&b| b as u64).sum::<u64>() + j.path.len() as u64
}

fn rkyv_call(t: &Template) -> Result<(), Failed> {
    let rpc = t.fork().run("t::job", Options::default())?;
    let typed = rpc.typed::<Job, Done, _>(Rkyv::checked());
    for id in 0..50 {
        let j = job(id);
        let r = typed.call_blocking(&j)?;
        eq((r.id.to_native(), r.sum.to_native()), (id, expected(&j)))?;
        // Both sides read the archive in place: nothing else is in the
        // stream, so every frame stays aligned.
        eq((r.in_place, r.in_place()), (true, true))?;
    }
    // Pipelined: many frames back to back in one buffer.
    let calls: Vec<_> = (0..200).map(|id| typed.call(&job(id % 250))).collect();
    let rt = tokio::runtime::Builder::new_current_thread().build()?;
    for (id, c) in calls.into_iter().enumerate() {
        let r = rt.block_on(c)?;
        eq(r.sum.to_native(), expected(&job((id % 250) as u32)))?;
        eq(r.deserialize()?.in_place, true)?;
    }
    drop(typed);
    rpc.close_blocking()?;
    Ok(())
}

fn rkyv_async(t: &Template) -> Result<(), Failed> {
    let rpc = t
        .fork()
        .run("t::job_async", Options::default().asynchronous(true))?;
    let typed = rpc.typed::<Job, Done, _>(Rkyv::checked());
    let rt = tokio::runtime::Builder::new_current_thread().build()?;
    let calls: Vec<_> = (0..100).map(|id| typed.call(&job(id))).collect();
    for (id, c) in calls.into_iter().enumerate() {
        let r = rt.block_on(c)?;
        eq(
            (r.id.to_native(), r.sum.to_native()),
            (id as u32, expected(&job(id as u32))),
        )?;
    }
    drop(typed);
    rpc.close_blocking()?;
    Ok(())
}

fn rkyv_shifted(t: &Template) -> Result<(), Failed> {
    let events = std::sync::Arc::new(Mutex::new(0));
    let e = events.clone();
    let rpc = t.fork().run(
        "t::job_after_event",
        Options::default().on_event(move |_| *e.lock().unwrap() += 1),
    )?;
    let typed = rpc.typed::<Job, Done, _>(Rkyv::checked());
    let calls: Vec<_> = (0..20).map(|id| typed.call(&job(id))).collect();
    let rt = tokio::runtime::Builder::new_current_thread().build()?;
    for (id, c) in calls.into_iter().enumerate() {
        // Correct whether read in place or copied to realign.
        let r = rt.block_on(c)?;
        eq(r.sum.to_native(), expected(&job(id as u32)))?;
    }
    drop(typed);
    rpc.close_blocking()?;
    let n = *events.lock().unwrap();
    eq(n, 20)
}

fn rkyv_corrupt(t: &Template) -> Result<(), Failed> {
    let rpc = t.fork().run("t::junk", Options::default())?;
    // The worker answers with bytes that are no rkyv archive of `Done`.
    let typed = rpc.typed::<Vec<u8>, Done, _>(JunkThenRkyv);
    let mut garbage = vec![0u8; 64];
    garbage[..4].copy_from_slice(&40u32.to_le_bytes());
    garbage[8..].iter_mut().for_each(|b| *b = 0xff);
    match typed.call_blocking(&garbage) {
        Err(Error::Codec { detail }) => {
            if !detail.starts_with("rkyv") {
                return Err(detail.into());
            }
        }
        other => return Err(format!("expected Error::Codec, got {:?}", other.map(|_| ())).into()),
    }
    // The connection is fine: the next call works.
    drop(typed);
    let typed = rpc.typed::<Vec<u8>, Vec<u8>, _>(Junk);
    eq(typed.call_blocking(&vec![1, 2, 3])?, vec![1, 2, 3])?;
    drop(typed);
    rpc.close_blocking()?;
    Ok(())
}

/// Sends raw bytes, reads the reply as an rkyv `Done`.
#[derive(Clone, Copy)]
struct JunkThenRkyv;

impl Codec<Vec<u8>> for JunkThenRkyv {
    type Thawed = Vec<u8>;
    fn freeze(&self, v: &Vec<u8>, out: &mut BytesMut, o: usize) -> forkrpc::Result<()> {
        Junk.freeze(v, out, o)
    }
    fn thaw(&self, p: Bytes, o: usize) -> forkrpc::Result<Vec<u8>> {
        Junk.thaw(p, o)
    }
}

impl Codec<Done> for JunkThenRkyv {
    type Thawed = Archived<Done>;
    fn freeze(&self, v: &Done, out: &mut BytesMut, o: usize) -> forkrpc::Result<()> {
        Rkyv::checked().freeze(v, out, o)
    }
    fn thaw(&self, p: Bytes, o: usize) -> forkrpc::Result<Archived<Done>> {
        <Rkyv as Codec<Done>>::thaw(&Rkyv::checked(), p, o)
    }
}

fn custom_codec(t: &Template) -> Result<(), Failed> {
    let rpc = t.fork().run("t::le64", Options::default())?;
    let typed = rpc.typed::<u64, u64, _>(Le64);
    eq(typed.call_blocking(&14)?, 42)?;
    // A payload the worker's codec refuses fails that call alone.
    let bad = rpc.typed::<serde_json::Value, u64, _>(JsonThenLe64);
    match bad.call_blocking(&serde_json::json!("not eight bytes")) {
        Err(Error::Handler { message, .. }) => {
            if !message.contains("Le64 wants 8 bytes") {
                return Err(message.into());
            }
        }
        other => return Err(format!("expected Error::Handler, got {other:?}").into()),
    }
    eq(typed.call_blocking(&1)?, 3)?;
    drop((typed, bad));
    rpc.close_blocking()?;
    Ok(())
}

/// Sends JSON, reads a `Le64` reply.
#[derive(Clone, Copy)]
struct JsonThenLe64;

impl Codec<serde_json::Value> for JsonThenLe64 {
    type Thawed = serde_json::Value;
    fn freeze(&self, v: &serde_json::Value, out: &mut BytesMut, o: usize) -> forkrpc::Result<()> {
        Json.freeze(v, out, o)
    }
    fn thaw(&self, p: Bytes, o: usize) -> forkrpc::Result<serde_json::Value> {
        Json.thaw(p, o)
    }
}

impl Codec<u64> for JsonThenLe64 {
    type Thawed = u64;
    fn freeze(&self, v: &u64, out: &mut BytesMut, o: usize) -> forkrpc::Result<()> {
        Le64.freeze(v, out, o)
    }
    fn thaw(&self, p: Bytes, o: usize) -> forkrpc::Result<u64> {
        Le64.thaw(p, o)
    }
}

fn typed_events_and_pool(t: &Template) -> Result<(), Failed> {
    let seen = std::sync::Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let rpc = t.fork().run(
        "t::progress",
        Options::default().on_event_with(Json, move |ev: forkrpc::Result<(String, u32)>| {
            s.lock().unwrap().push(ev.unwrap())
        }),
    )?;
    let typed = rpc.typed::<(u32,), String, _>(Json);
    eq(typed.call_blocking(&(3,))?, "done".to_owned())?;
    eq(
        seen.lock().unwrap().clone(),
        (1..=3)
            .map(|i| ("progress".to_owned(), i))
            .collect::<Vec<_>>(),
    )?;
    drop(typed);
    rpc.close_blocking()?;

    let pool = Pool::new(
        t,
        "t::job",
        Options::default(),
        PoolOptions::default().max(2),
    )?;
    let typed = pool.typed::<Job, Done, _>(Rkyv::checked());
    let calls: Vec<_> = (0..100).map(|id| typed.call(&job(id))).collect();
    let rt = tokio::runtime::Builder::new_current_thread().build()?;
    for (id, c) in calls.into_iter().enumerate() {
        eq(rt.block_on(c)?.sum.to_native(), expected(&job(id as u32)))?;
    }
    drop(typed);
    let apool = Pool::new(
        t,
        "t::job_async",
        Options::default().asynchronous(true),
        PoolOptions::default().max(2),
    )?;
    let typed = apool.typed::<Job, Done, _>(Rkyv::checked());
    eq(
        typed.call_blocking(&job(9))?.sum.to_native(),
        expected(&job(9)),
    )?;
    drop(typed);
    pool.close_blocking()?;
    apool.close_blocking()?;
    Ok(())
}
