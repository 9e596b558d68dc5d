//! A chunk's results counted and turned into call results, part by part.

use crate::error::{Error, Result};
use crate::wire::chunk::{self, ItemResult};
use crate::wire::Octets;
use bytes::Bytes;

/// Counts a chunk's results and turns them into call results.
pub(crate) struct Results {
    pub(super) pid: i32,
    /// Items in the chunk.
    pub(super) n: usize,
    /// Items resolved so far.
    pub(super) seen: usize,
    last_panic: String,
}

impl Results {
    pub(crate) fn new(pid: i32, n: usize) -> Results {
        Results {
            pid,
            n,
            seen: 0,
            last_panic: String::new(),
        }
    }

    /// Items not resolved yet.
    pub(crate) fn left(&self) -> usize {
        self.n - self.seen
    }

    /// Hands each result in `blob` to `f`, in order; more than the chunk
    /// has left, or a malformed one, is an error (those before it were
    /// handed over).
    pub(crate) fn each(
        &mut self,
        blob: &Bytes,
        f: impl FnMut(Result<Octets>),
    ) -> std::result::Result<(), String> {
        self.each_from(self.seen, blob, f)
    }

    /// As [`Results::each`], for results from item `first` on (a dead
    /// worker's journal): those already seen are skipped; a gap before
    /// them is an error.
    pub(crate) fn each_from(
        &mut self,
        first: usize,
        blob: &Bytes,
        mut f: impl FnMut(Result<Octets>),
    ) -> std::result::Result<(), String> {
        if first > self.seen {
            return Err(format!(
                "recovered results start at item {first}, after the {} seen",
                self.seen
            ));
        }
        let mut at = first;
        for x in chunk::each_result(blob) {
            let x = x.map_err(|e| format!("malformed chunk results: {e}"))?;
            at += 1;
            if at <= self.seen {
                continue;
            }
            if self.left() == 0 {
                return Err(format!("more results than the chunk's {} calls", self.n));
            }
            self.seen += 1;
            f(self.convert(x));
        }
        Ok(())
    }

    /// Hands the results of a chunk's reply to `f`: exactly the items
    /// left.
    pub(crate) fn last(
        &mut self,
        reply: &Octets,
        f: impl FnMut(Result<Octets>),
    ) -> std::result::Result<(), String> {
        if !chunk::is_chunk(reply) {
            return Err("a chunk of calls got a plain reply".into());
        }
        self.each(&reply[1], f)?;
        match self.left() {
            0 => Ok(()),
            n => Err(format!("the chunk's reply lacks {n} results")),
        }
    }

    fn convert(&mut self, x: ItemResult) -> Result<Octets> {
        let pid = self.pid;
        match x {
            ItemResult::Reply(o) => Ok(o),
            ItemResult::Error(message) => Err(Error::Handler { pid, message }),
            ItemResult::Panic(message) => {
                self.last_panic = message.clone();
                Err(Error::HandlerPanicked { pid, message })
            }
            ItemResult::NotRun => Err(Error::Skipped {
                pid,
                message: self.last_panic.clone(),
            }),
        }
    }

    /// The error for the items left when the chunk could not be read.
    pub(crate) fn protocol(&self, detail: String) -> Error {
        Error::Protocol {
            pid: self.pid,
            detail,
        }
    }
}
