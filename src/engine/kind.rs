//! Which I/O backend drives the worker sockets.

/// Which I/O backend drives the worker sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EngineKind {
    /// io_uring (Linux 5.11+; see `uring` for the features used).
    Uring,
    /// epoll, where io_uring is missing or forbidden.
    Epoll,
}

impl EngineKind {
    /// The engine named by `FORKRPC_ENGINE` (`uring` or `epoll`), else io_uring
    /// where the kernel allows it, else epoll.
    pub fn from_env() -> EngineKind {
        match std::env::var("FORKRPC_ENGINE").as_deref() {
            Ok("epoll") => EngineKind::Epoll,
            Ok("uring") => EngineKind::Uring,
            _ => match super::uring::available() {
                Ok(()) => EngineKind::Uring,
                Err(e) => {
                    eprintln!("forkrpc: io_uring is unavailable ({e}); using the epoll engine");
                    EngineKind::Epoll
                }
            },
        }
    }

    /// `"uring"` or `"epoll"`.
    pub fn name(&self) -> &'static str {
        match self {
            EngineKind::Uring => "uring",
            EngineKind::Epoll => "epoll",
        }
    }
}
