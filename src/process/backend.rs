//! Which backend a worker runs, as the control messages to the template
//! spell it (`sync`, `async:LIMIT:uring|tokio`).

/// Which child backend a spawned worker runs, as sent to the template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Backend {
    Sync,
    /// `limit` calls at once; on tokio-uring when `uring` (and the kernel
    /// allows it), else on tokio.
    Async {
        limit: usize,
        uring: bool,
    },
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Backend::Sync => f.write_str("sync"),
            Backend::Async { limit, uring } => {
                write!(
                    f,
                    "async:{limit}:{}",
                    if *uring { "uring" } else { "tokio" }
                )
            }
        }
    }
}

impl std::str::FromStr for Backend {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        if s == "sync" {
            return Ok(Backend::Sync);
        }
        let mut parts = s.strip_prefix("async:").ok_or(())?.split(':');
        let limit = parts.next().and_then(|l| l.parse().ok()).ok_or(())?;
        let uring = match parts.next() {
            Some("uring") => true,
            Some("tokio") => false,
            _ => return Err(()),
        };
        Ok(Backend::Async { limit, uring })
    }
}
