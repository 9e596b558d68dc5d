//! An axum service that offloads a 20 µs job to a `max(2)` forkrpc pool;
//! every `CRASH_EVERY`-th job id crashes its worker (abort). `GET /job/N`
//! runs job N (200 with its result, 500 with the error); `GET /stats`
//! counts what happened. `tools/service-check/run` loads it with wrk.
//!
//! Env: `PORT` (default 3000), `CRASH_EVERY` (default 500), `MAX_BATCH`
//! (the pool's, default its own).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use forkrpc::{octets, Octets, Options, Pool, PoolOptions, Template};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Spins `us` microseconds (the job), or aborts on a crashing input.
fn job(args: Octets) -> Octets {
    if args.str(0) == Some("crash") {
        std::process::abort();
    }
    let t = Instant::now();
    while t.elapsed() < Duration::from_micros(20) {
        std::hint::spin_loop();
    }
    args
}

#[derive(Default)]
struct Stats {
    ok: AtomicU64,
    crash_inputs: AtomicU64,
    failed: Mutex<BTreeMap<String, u64>>,
    /// Failed requests whose input was not a crashing one.
    innocent_failed: AtomicU64,
}

struct App {
    pool: Pool,
    every: u64,
    stats: Stats,
}

async fn run_job(State(app): State<Arc<App>>, Path(n): Path<u64>) -> (StatusCode, String) {
    let crash = n % app.every == 0;
    if crash {
        app.stats.crash_inputs.fetch_add(1, Ordering::Relaxed);
    }
    let arg = if crash {
        "crash".to_owned()
    } else {
        n.to_string()
    };
    match app.pool.call(octets![arg]).await {
        Ok(r) => {
            app.stats.ok.fetch_add(1, Ordering::Relaxed);
            (StatusCode::OK, r.str(0).unwrap_or("").to_owned())
        }
        Err(e) => {
            *app.stats
                .failed
                .lock()
                .unwrap()
                .entry(e.kind().to_owned())
                .or_default() += 1;
            if !crash {
                app.stats.innocent_failed.fetch_add(1, Ordering::Relaxed);
            }
            (StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
        }
    }
}

async fn stats(State(app): State<Arc<App>>) -> String {
    let s = &app.stats;
    serde_json::json!({
        "ok": s.ok.load(Ordering::Relaxed),
        "crash_inputs": s.crash_inputs.load(Ordering::Relaxed),
        "failed": *s.failed.lock().unwrap(),
        "innocent_failed": s.innocent_failed.load(Ordering::Relaxed),
    })
    .to_string()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // First thing: the template, while this process has one thread.
    let template = Template::builder().sync("job", job).start()?;
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
    let mut po = PoolOptions::default().max(2);
    if let Some(b) = env("MAX_BATCH") {
        po = po.max_batch(b as usize);
    }
    let pool = Pool::new(&template, "job", Options::default().on_error(|_| {}), po)?;
    let app = Arc::new(App {
        pool,
        every: env("CRASH_EVERY").unwrap_or(500).max(1),
        stats: Stats::default(),
    });
    let port = env("PORT").unwrap_or(3000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let router = axum::Router::new()
            .route("/job/{n}", get(run_job))
            .route("/stats", get(stats))
            .with_state(app);
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port as u16)).await?;
        axum::serve(listener, router)
            .with_graceful_shutdown(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await
    })?;
    Ok(())
}
