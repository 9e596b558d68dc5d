//! The async backend's runtime: tokio-uring where the kernel allows it,
//! else a plain tokio current-thread runtime. The only place that touches
//! tokio-uring (unmaintained, on io-uring 0.6), so replacing it is one file.
//!
//! Both run every task on the worker's one thread inside a `LocalSet`, so
//! handlers use `tokio::task::spawn_local`, tokio timers and tokio sockets
//! on either; `tokio_uring::fs` and friends work only on the first (see
//! [`uring`]).
//!
//! tokio-uring needs Linux 5.10 or later (its ring uses no optional
//! features beyond what 5.10 has); where `io_uring_setup` fails (old
//! kernel, seccomp, `kernel.io_uring_disabled`), or the worker's
//! [`Options::engine`](crate::Options::engine) is epoll (by default, when
//! `FORKRPC_ENGINE=epoll`), the fallback runs instead.

use std::future::Future;

/// Which runtime the async backend of this worker runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AsyncRuntime {
    /// tokio-uring: io_uring file and socket operations are available.
    TokioUring,
    /// tokio current-thread with a `LocalSet` (no io_uring).
    Tokio,
}

thread_local! {
    static CURRENT: std::cell::Cell<Option<AsyncRuntime>> = const { std::cell::Cell::new(None) };
}

/// The runtime the calling worker's async backend runs on, or `None`
/// outside an async worker. Handlers that want io_uring file I/O check it
/// and fall back to blocking or tokio I/O when it is
/// [`AsyncRuntime::Tokio`].
///
/// ```
/// // In the parent process no async backend runs:
/// assert_eq!(forkrpc::async_runtime(), None);
/// ```
pub fn async_runtime() -> Option<AsyncRuntime> {
    CURRENT.get()
}

/// Runs `fut` to completion on tokio-uring if `want_uring` and the kernel
/// allows it, else on tokio.
pub(crate) fn block_on<F: Future>(want_uring: bool, fut: F) -> std::io::Result<F::Output> {
    if want_uring {
        if let Ok(rt) = tokio_uring::Runtime::new(&tokio_uring::builder()) {
            CURRENT.set(Some(AsyncRuntime::TokioUring));
            return Ok(rt.block_on(fut));
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    CURRENT.set(Some(AsyncRuntime::Tokio));
    Ok(tokio::task::LocalSet::new().block_on(&rt, fut))
}

/// tokio-uring's own API, for handlers that run on
/// [`AsyncRuntime::TokioUring`] (file I/O through io_uring, e.g.
/// `forkrpc::uring::fs::File::open`).
pub mod uring {
    pub use tokio_uring::{buf, fs, net, BufResult};
}
