//! The one error type. Every variant says what happened in words a user can
//! act on; it is `Clone` because one failure (a dead worker) resolves many
//! calls at once.

use std::sync::Arc;

/// How a worker process ended, as its template reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// `exit(code)`.
    Code(i32),
    /// Killed by this signal.
    Signal(i32),
    /// The connection closed but no exit was seen within the grace period.
    StillRunning,
}

impl ExitStatus {
    /// Decodes a raw `waitpid` status.
    pub fn from_wait_status(raw: i32) -> Self {
        if libc::WIFSIGNALED(raw) {
            ExitStatus::Signal(libc::WTERMSIG(raw))
        } else {
            ExitStatus::Code(libc::WEXITSTATUS(raw))
        }
    }

    /// True for `exit(0)`.
    pub fn success(&self) -> bool {
        *self == ExitStatus::Code(0)
    }
}

impl Error {
    /// How a worker ended, as the cause of a call it never started: the
    /// error without its count of outstanding calls.
    pub(crate) fn end_cause(&self) -> String {
        match self {
            Error::WorkerExited {
                pid, status, panic, ..
            } => format!(
                "worker {pid} ended with {status}{}",
                panic
                    .as_ref()
                    .map(|m| format!("; a handler panicked: {m}"))
                    .unwrap_or_default()
            ),
            Error::Timeout { after } => {
                format!("the worker was killed: a call overran its timeout of {after:?}")
            }
            e => e.to_string(),
        }
    }
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            ExitStatus::Code(c) => write!(f, "exit code {c}"),
            ExitStatus::Signal(s) => {
                let name = nix::sys::signal::Signal::try_from(s)
                    .map(|s| s.as_str())
                    .unwrap_or("?");
                write!(f, "signal {s} ({name})")
            }
            ExitStatus::StillRunning => f.write_str("its connection closed but it did not exit"),
        }
    }
}

/// Everything that can go wrong in forkrpc.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The worker ended while calls were outstanding ("unexpected eof").
    #[error("worker {pid} ended with {status} while {outstanding} call(s) were outstanding (unexpected eof){}",
        panic.as_ref().map(|m| format!("; a handler panicked: {m}")).unwrap_or_default())]
    WorkerExited {
        /// Process id of the worker.
        pid: i32,
        /// How it ended.
        status: ExitStatus,
        /// Calls that were sent or queued and got no reply.
        outstanding: usize,
        /// The panic message, when a handler panicked.
        panic: Option<String>,
    },
    /// The handler of this very call panicked. A sync worker then exits
    /// (its later calls fail with [`Error::WorkerExited`]); an async worker
    /// carries on with its other calls.
    #[error("handler panicked in worker {pid}: {message}")]
    HandlerPanicked {
        /// Process id of the worker.
        pid: i32,
        /// The panic message and location.
        message: String,
    },
    /// The handler returned an error for this call (or, in the async
    /// backend, dropped its [`Done`](crate::Done) without replying). The
    /// worker carries on.
    #[error("handler failed in worker {pid}: {message}")]
    Handler {
        /// Process id of the worker.
        pid: i32,
        /// The handler's error message.
        message: String,
    },
    /// The call did not finish within the pool's timeout. A sync worker
    /// that was running it has been killed and replaced.
    #[error("the call did not finish within {after:?}")]
    Timeout {
        /// The timeout.
        after: std::time::Duration,
    },
    /// The pool's queue is full (`try_call` with a queue limit).
    #[error("the pool's queue is full ({limit} calls wait); try again later")]
    QueueFull {
        /// The queue limit.
        limit: usize,
    },
    /// The pool was closed with a deadline that passed before this call
    /// finished (its worker was killed, or it never left the queue).
    #[error("pool shut down before the call finished: {detail}")]
    Shutdown {
        /// What happened to the call.
        detail: String,
    },
    /// The pool's workers keep dying before they finish anything: worker
    /// starts wait `backoff` (reported through `on_error`; calls wait in
    /// the queue meanwhile). See `PoolOptions::crash_loop`.
    #[error("{deaths} pool workers in a row died before finishing a call; starting the next in {backoff:?}")]
    CrashLoop {
        /// Deaths in a row of workers that finished nothing.
        deaths: usize,
        /// How long starts wait.
        backoff: std::time::Duration,
    },
    /// The worker ended before it began this call (it died running an
    /// earlier one): the call did not run, and can be sent again (a pool
    /// does so by itself).
    #[error("not started: worker {pid} ended before it began this call ({cause})")]
    NotStarted {
        /// Process id of the worker.
        pid: i32,
        /// How the worker ended.
        cause: String,
    },
    /// Not run: an earlier item of the same chunk panicked and the worker
    /// exited.
    #[error("not run in worker {pid}: an earlier item of its chunk panicked ({message})")]
    Skipped {
        /// Process id of the worker.
        pid: i32,
        /// The earlier item's panic message.
        message: String,
    },
    /// A value could not be frozen into a payload, or a payload could not
    /// be thawed (malformed, or failed validation).
    #[error("serialiser: {detail}")]
    Codec {
        /// What went wrong.
        detail: String,
    },
    /// An async handler was asked to run on the sync backend.
    #[error("handler {name:?} is asynchronous; run it with Options::asynchronous(true)")]
    NeedsAsync {
        /// The handler's name.
        name: String,
    },
    /// No handler or init function of that name is registered.
    #[error("no {kind} named {name:?} is registered in the template (known: {known})")]
    UnknownHandler {
        /// "handler" or "init function".
        kind: &'static str,
        /// The name asked for.
        name: String,
        /// The names that are registered, comma-separated.
        known: String,
    },
    /// A payload larger than the frame format allows; nothing was sent.
    #[error("payload of {size} bytes exceeds the 4 GiB - 1 frame limit; nothing was sent")]
    PayloadTooLarge {
        /// Encoded size of the payload.
        size: u64,
    },
    /// The peer sent bytes that break the protocol.
    #[error("protocol error from worker {pid}: {detail}")]
    Protocol {
        /// Process id of the worker.
        pid: i32,
        /// What was wrong.
        detail: String,
    },
    /// The RPC handle or its worker is closed; the call was not sent.
    #[error("the worker connection is closed; the call was not sent")]
    Closed,
    /// Workers cannot be forked from this (multi-threaded) process yet.
    #[error("forkrpc::init() was not called and this process already runs threads; call forkrpc::init() (or Template::builder()...start()) first thing in main, before any thread starts")]
    NotInitialised,
    /// The template process is gone or refused the request.
    #[error("template process: {0}")]
    Template(String),
    /// A blocking call was made on the driver thread (from a callback), where it would deadlock.
    #[error(
        "call_blocking from a callback on the driver thread would deadlock; use call_with instead"
    )]
    WouldDeadlock,
    /// An operating-system error.
    #[error("{context}: {source}")]
    Io {
        /// What forkrpc was doing.
        context: &'static str,
        /// The OS error.
        source: Arc<std::io::Error>,
    },
}

impl Error {
    /// A short, stable name of the error's kind, in snake case: the
    /// variant's name (`"worker_exited"`, `"timeout"`, `"not_started"` …),
    /// for counting errors by kind in logs and reports.
    ///
    /// ```
    /// assert_eq!(forkrpc::Error::Closed.kind(), "closed");
    /// let t = forkrpc::Error::Timeout { after: std::time::Duration::from_secs(1) };
    /// assert_eq!(t.kind(), "timeout");
    /// ```
    pub fn kind(&self) -> &'static str {
        match self {
            Error::WorkerExited { .. } => "worker_exited",
            Error::HandlerPanicked { .. } => "handler_panicked",
            Error::Handler { .. } => "handler",
            Error::Timeout { .. } => "timeout",
            Error::QueueFull { .. } => "queue_full",
            Error::Shutdown { .. } => "shutdown",
            Error::CrashLoop { .. } => "crash_loop",
            Error::NotStarted { .. } => "not_started",
            Error::Skipped { .. } => "skipped",
            Error::Codec { .. } => "codec",
            Error::NeedsAsync { .. } => "needs_async",
            Error::UnknownHandler { .. } => "unknown_handler",
            Error::PayloadTooLarge { .. } => "payload_too_large",
            Error::Protocol { .. } => "protocol",
            Error::Closed => "closed",
            Error::NotInitialised => "not_initialised",
            Error::Template(_) => "template",
            Error::WouldDeadlock => "would_deadlock",
            Error::Io { .. } => "io",
        }
    }

    pub(crate) fn io(context: &'static str, source: impl Into<std::io::Error>) -> Self {
        Error::Io {
            context,
            source: Arc::new(source.into()),
        }
    }
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
