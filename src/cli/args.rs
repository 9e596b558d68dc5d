//! Argument parsers and values shared by the subcommands: each refusal
//! names what was wrong, and clap names the flag (exit status 2).

use forkrpc::EngineKind;
use std::time::Duration;

/// The worker backend a subcommand runs.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sync,
    Async,
}

impl Backend {
    /// `sync` or `async`, as in the JSON output.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Sync => "sync",
            Backend::Async => "async",
        }
    }
}

/// `uring` or `epoll`.
pub fn parse_engine(e: &str) -> Result<EngineKind, String> {
    match e {
        "uring" => Ok(EngineKind::Uring),
        "epoll" => Ok(EngineKind::Epoll),
        o => Err(format!("unknown engine {o:?} (uring or epoll)")),
    }
}

/// `3` (seconds), `1.5`, `500ms`, `2m`, `1h` …
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    if let Ok(secs) = s.parse::<f64>() {
        if secs.is_finite() && secs >= 0.0 {
            return Ok(Duration::from_secs_f64(secs));
        }
        return Err(format!("{s:?} is not a duration"));
    }
    humantime::parse_duration(s).map_err(|e| format!("{s:?} is not a duration: {e}"))
}

/// A duration of more than zero.
pub fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        d if d.is_zero() => Err("must be more than zero".into()),
        d => Ok(d),
    }
}

/// A whole number of at least 1.
pub fn parse_positive(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("{s:?} is not a whole number")),
    }
}

/// A whole number from 1 to `max`.
pub fn parse_at_most(s: &str, max: usize) -> Result<usize, String> {
    match parse_positive(s)? {
        n if n > max => Err(format!("{n} is more than the most allowed, {max}")),
        n => Ok(n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_seconds_or_units() {
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("-1").is_err());
    }

    #[test]
    fn bounded_numbers() {
        assert_eq!(parse_at_most("5", 10), Ok(5));
        assert!(parse_at_most("11", 10).is_err());
        assert!(parse_at_most("0", 10).is_err());
        assert!(parse_positive("x").is_err());
    }
}
