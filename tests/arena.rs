//! Big strings through the shared arena: a worker reads them in place,
//! replies that return them come back by reference, regions are freed when
//! everyone let go (a worker's release note, or its end), and what does not
//! fit goes through the socket. The arena is made small here (40 MiB) so
//! that running out of it can be tested; tests run one at a time because
//! they count the arena's regions.

mod common;

use bytes::Bytes;
use common::{await_in_order, check, engine_trials, eq, EngineTest};
use forkrpc::serial::{Archived, Rkyv};
use forkrpc::{arena_stats, in_shared_arena, octets, EngineKind, Octets, Options, Pool, Template};
use libtest_mimic::{Arguments, Failed};
use std::sync::Mutex;

const MIB: usize = 1 << 20;
/// What a typed handler saw of its request.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, PartialEq)]
struct Seen {
    in_arena: bool,
    in_place: bool,
    sum: u64,
}

/// Worker-side stash of arguments, to hold arena strings past a call.
static KEPT: Mutex<Vec<Octets>> = Mutex::new(Vec::new());

fn flag(b: bool) -> &'static str {
    if b {
        "1"
    } else {
        "0"
    }
}

fn pattern(n: usize, seed: u8) -> Bytes {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect::<Vec<u8>>()
        .into()
}

fn template() -> Template {
    Template::builder()
        // [whether arg 1 lies in the arena, arg 0, arg 1, a slice of arg 1]
        .sync("s::where", |a| {
            octets![
                flag(in_shared_arena(&a[1])),
                a[0].clone(),
                a[1].clone(),
                a[1].slice(1000..a[1].len() - 1000)
            ]
        })
        .sync("s::keep", |a| {
            let shared = in_shared_arena(&a[0]);
            KEPT.lock().unwrap().push(a);
            octets![flag(shared)]
        })
        .sync("s::fresh", |a| {
            // A reply made here, not from the arguments.
            octets![flag(in_shared_arena(&a[0])), pattern(a[0].len(), 9)]
        })
        .sync_with("s::typed", Rkyv::checked(), |v: Archived<Vec<u8>>| Seen {
            in_arena: in_shared_arena(v.as_bytes()),
            in_place: v.in_place(),
            sum: v.iter().map(|&b| b as u64).sum(),
        })
        // Writes a forged reply naming offset arg 0 of the arena, then
        // replies normally.
        .sync("s::forge", |a| {
            let off = a.num(0).unwrap() as u64;
            let body = Bytes::from(vec![0u8; 300 * 1024]);
            let payload = forkrpc::wire::arena_ref::encode(&[body], |_| Some(off))
                .unwrap()
                .to_bytes();
            let mut frame = Vec::new();
            frame.extend_from_slice(&1u32.to_be_bytes()); // the sync reply id
            frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
            frame.extend_from_slice(&payload);
            let fd = worker_socket();
            // SAFETY: writes our own buffer to a descriptor this worker owns.
            let n = unsafe { libc::write(fd, frame.as_ptr().cast(), frame.len()) };
            assert_eq!(n, frame.len() as isize);
            octets!["after"]
        })
        .start()
        .expect("template starts")
}

/// The worker's socket: the one socket among its descriptors.
fn worker_socket() -> i32 {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| {
            let e = e.ok()?;
            let target = std::fs::read_link(e.path()).ok()?;
            target
                .to_string_lossy()
                .starts_with("socket:")
                .then_some(())?;
            e.file_name().to_str()?.parse().ok()
        })
        .next()
        .expect("a worker has its socket")
}

/// Regions in use, after a round trip that lets release notes arrive (a
/// worker sends them before its next reply).
fn regions_after_sync(rpc: &forkrpc::Rpc) -> Result<usize, Failed> {
    rpc.call_blocking(octets!["sync", vec![0u8; 4000]])?;
    Ok(arena_stats().map_or(0, |s| s.regions))
}

/// The replies of `args`, all called before any is awaited (so each holds
/// its reply's strings until the end).
fn call_all(rpc: &forkrpc::Rpc, args: Vec<Octets>) -> Result<Vec<Octets>, Failed> {
    let calls = args.into_iter().map(|a| rpc.call(a)).collect();
    Ok(await_in_order(calls)
        .into_iter()
        .collect::<Result<_, _>>()?)
}

fn echo_by_reference(t: &Template, kind: EngineKind) -> Result<(), Failed> {
    let rpc = t.fork().run("s::where", Options::default().engine(kind))?;
    let big = pattern(16 * MIB, 1);
    let reply = rpc.call_blocking(octets!["small", big.clone()])?;
    eq(reply.str(0), Some("1"))?; // the worker read it in place
    eq(&reply[1][..], b"small")?;
    eq(reply[2] == big, true)?;
    eq(reply[3] == big.slice(1000..big.len() - 1000), true)?;
    eq(
        (in_shared_arena(&reply[2]), in_shared_arena(&reply[3])),
        (true, true),
    )?; // came back by reference
    eq(in_shared_arena(&big), false)?; // ours was copied, not taken
    eq(regions_after_sync(&rpc)?, 1)?; // our reply still holds it
    drop(reply);
    eq(regions_after_sync(&rpc)?, 0)?;
    rpc.close_blocking()?;
    Ok(())
}

/// Small calls are framed by the caller (the outbox) and shared ones go
/// to the driver as commands. Made alternately from a callback on the
/// driver thread, all are queued before the driver looks at any; their
/// replies must still come back in call order (a sync worker's replies
/// are matched to calls by order alone).
fn framed_and_shared_calls_keep_their_order(t: &Template, kind: EngineKind) -> Result<(), Failed> {
    const N: usize = 40;
    let rpc = t.fork().run("s::where", Options::default().engine(kind))?;
    let echo = t
        .fork()
        .run(forkrpc::ECHO, Options::default().engine(kind))?;
    let args: Vec<Octets> = (0..N)
        .map(|i| {
            let size = if i % 2 == 0 { 3000 } else { MIB };
            octets![i.to_string(), pattern(size, i as u8)]
        })
        .collect();
    let (tx, rx) = std::sync::mpsc::channel();
    let (rpc2, args2) = (rpc.clone(), args.clone());
    echo.call_with(octets!["go"], move |_| {
        for (i, a) in args2.into_iter().enumerate() {
            let tx = tx.clone();
            rpc2.call_with(a, move |r| tx.send((i, r)).unwrap());
        }
    });
    for n in 0..N {
        let (i, r) = rx.recv_timeout(std::time::Duration::from_secs(10))?;
        let r = r?;
        eq(i, n)?; // callbacks run in reply order
        eq(r.str(1), Some(i.to_string().as_str()))?; // the reply of call i
        eq(r.str(0), Some(if i % 2 == 0 { "0" } else { "1" }))?;
        eq(r[2] == args[i][1], true)?;
    }
    echo.close_blocking()?;
    eq(regions_after_sync(&rpc)?, 0)?;
    rpc.close_blocking()?;
    Ok(())
}

fn what_does_not_fit_goes_by_socket(t: &Template, kind: EngineKind) -> Result<(), Failed> {
    let rpc = t.fork().run("s::where", Options::default().engine(kind))?;
    // 40 MiB of arena: two strings of 16 MiB fit, the third does not. Each
    // reply holds its string until awaited, so all three are held at once.
    let bigs: Vec<Bytes> = (0..3).map(|i| pattern(16 * MIB, i)).collect();
    let replies = call_all(&rpc, bigs.iter().map(|b| octets!["x", b.clone()]).collect())?;
    let flags: Vec<_> = replies.iter().map(|r| r.str(0).unwrap()).collect();
    eq(flags, vec!["1", "1", "0"])?;
    for (r, b) in replies.iter().zip(&bigs) {
        eq(r[2] == b, true)?;
    }
    eq(
        replies.iter().map(|r| in_shared_arena(&r[2])).collect(),
        vec![true, true, false],
    )?;
    drop(replies);
    eq(regions_after_sync(&rpc)?, 0)?;
    rpc.close_blocking()?;
    Ok(())
}

fn a_worker_that_ends_frees_what_it_held(t: &Template, kind: EngineKind) -> Result<(), Failed> {
    let rpc = t.fork().run("s::keep", Options::default().engine(kind))?;
    let reply = rpc.call_blocking(octets![pattern(MIB, 3)])?;
    eq(reply.str(0), Some("1"))?;
    // Our copy went with the request; the worker keeps its view.
    eq(arena_stats().map(|s| (s.regions, s.bytes)), Some((1, MIB)))?;
    if std::env::var_os("FORKRPC_ARENA").is_none() {
        // The documented default: 1 GiB of address space.
        eq(arena_stats().map(|s| s.capacity), Some(1 << 30))?;
    }
    rpc.close_blocking()?;
    eq(arena_stats().map(|s| s.regions), Some(0))?;
    Ok(())
}

fn fresh_replies_and_small_strings(t: &Template, kind: EngineKind) -> Result<(), Failed> {
    let rpc = t.fork().run("s::fresh", Options::default().engine(kind))?;
    // Below the threshold nothing is shared; a reply the worker made goes
    // through the socket whatever its size.
    for n in [1000, 64 * 1024 - 1, 64 * 1024, 3 * MIB] {
        let reply = rpc.call_blocking(octets![vec![0u8; n]])?;
        eq(reply.str(0), Some(flag(n >= 64 * 1024)))?;
        eq(reply[1] == pattern(n, 9), true)?;
        eq(in_shared_arena(&reply[1]), false)?;
    }
    eq(regions_after_sync(&rpc)?, 0)?;
    rpc.close_blocking()?;
    Ok(())
}

fn pool_calls_share(t: &Template, kind: EngineKind) -> Result<(), Failed> {
    let pool = Pool::new(
        t,
        "s::where",
        Options::default().engine(kind),
        Default::default(),
    )?;
    let big = pattern(4 * MIB, 5);
    let reply = pool.call_blocking(octets!["p", big.clone()])?;
    eq(reply.str(0), Some("1"))?;
    eq(reply[2] == big, true)?;
    eq(in_shared_arena(&reply[2]), true)?;
    drop(reply);
    // A map of big strings sends them one call each, by reference (a
    // chunk would copy them into its blob; 40 items make chunks of 2).
    let flags: Vec<String> = pool
        .map((0..40).map(|i| octets!["m", pattern(300 * 1024, i)]))
        .results()
        .map(|r| r.map(|o| o.str(0).unwrap_or("?").to_owned()))
        .collect::<Result<_, _>>()?;
    eq(flags, vec!["1".to_owned(); 40])?;
    pool.close_blocking()?;
    // The workers are gone: nothing of theirs is held.
    eq(arena_stats().map(|s| s.regions), Some(0))?;
    Ok(())
}

fn async_workers_share_too(t: &Template, kind: EngineKind) -> Result<(), Failed> {
    let rpc = t.fork().run(
        "s::where",
        Options::default().engine(kind).asynchronous(true),
    )?;
    let big = pattern(2 * MIB, 7);
    let replies = call_all(&rpc, vec![octets!["a", big.clone()]; 3])?;
    for r in &replies {
        eq(r.str(0), Some("1"))?;
        eq(r[2] == big, true)?;
        eq(in_shared_arena(&r[2]), true)?;
    }
    drop(replies);
    // The async worker sends its release notes with its next reply.
    eq(regions_after_sync(&rpc)?, 0)?;
    rpc.close_blocking()?;
    Ok(())
}

fn typed_requests_are_read_in_place(t: &Template, kind: EngineKind) -> Result<(), Failed> {
    // A big frozen payload goes into the arena where its frame header
    // would have put it: the worker reads the archive there, aligned.
    for asynchronous in [false, true] {
        let opts = Options::default().engine(kind).asynchronous(asynchronous);
        let rpc = t.fork().run("s::typed", opts)?;
        let typed = rpc.typed::<Vec<u8>, Seen, _>(Rkyv::checked());
        for n in [1000, 2 * MIB] {
            let data = pattern(n, 3).to_vec();
            let seen = typed.call_blocking(&data)?.deserialize()?;
            let big = n >= 64 * 1024;
            eq(
                seen,
                Seen {
                    in_arena: big,
                    in_place: true,
                    sum: data.iter().map(|&b| b as u64).sum(),
                },
            )?;
        }
        typed.call_blocking(&vec![0u8; 10])?; // lets the release notes arrive
        eq(arena_stats().map(|s| s.regions), Some(0))?;
        rpc.close_blocking()?;
    }
    Ok(())
}

fn forged_references_are_protocol_errors(t: &Template, kind: EngineKind) -> Result<(), Failed> {
    // Another worker holds a region; a worker that names it (or a place
    // nobody holds) fails its call instead of reading what is not its own.
    let keeper = t.fork().run("s::keep", Options::default().engine(kind))?;
    keeper.call_blocking(octets![pattern(MIB, 4)])?;
    let held = arena_stats().map(|s| s.regions);
    eq(held, Some(1))?;
    for off in [0, 64 * MIB as u64] {
        let quiet = Options::default().engine(kind).on_error(|_| {});
        let forger = t.fork().run("s::forge", quiet)?;
        match forger.call_blocking(octets![off.to_string()]) {
            Err(forkrpc::Error::Protocol { detail, .. }) => check(
                detail.contains("a reference names no shared string"),
                format!("offset {off}: {detail}"),
            )?,
            other => {
                return Err(
                    format!("offset {off}: expected a protocol error, got {other:?}").into(),
                )
            }
        }
        drop(forger);
    }
    eq(arena_stats().map(|s| s.regions), held)?; // nothing taken, nothing lost
    keeper.close_blocking()?;
    eq(arena_stats().map(|s| s.regions), Some(0))?;
    Ok(())
}

fn main() {
    // Before anything makes the arena (it is made for the first sync
    // worker), while this process has one thread.
    std::env::set_var("FORKRPC_ARENA", (40 * MIB).to_string());
    let t = template();
    let mut args = Arguments::from_args();
    args.test_threads = Some(1);
    let tests: [(&str, EngineTest); 9] = [
        ("echo_by_reference", echo_by_reference),
        (
            "framed_and_shared_calls_keep_their_order",
            framed_and_shared_calls_keep_their_order,
        ),
        (
            "what_does_not_fit_goes_by_socket",
            what_does_not_fit_goes_by_socket,
        ),
        (
            "a_worker_that_ends_frees_what_it_held",
            a_worker_that_ends_frees_what_it_held,
        ),
        (
            "fresh_replies_and_small_strings",
            fresh_replies_and_small_strings,
        ),
        ("pool_calls_share", pool_calls_share),
        ("async_workers_share_too", async_workers_share_too),
        (
            "forged_references_are_protocol_errors",
            forged_references_are_protocol_errors,
        ),
        (
            "typed_requests_are_read_in_place",
            typed_requests_are_read_in_place,
        ),
    ];
    let trials = engine_trials(&t, &tests);
    libtest_mimic::run(&args, trials).exit();
}
