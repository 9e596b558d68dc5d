//! Typed calls: a [`Codec`] freezes the request on the caller's thread and
//! thaws the reply, over an RPC handle ([`Rpc::typed`]) or a pool
//! ([`Pool::typed`]). The worker's handler is registered with the same
//! codec ([`Builder::sync_with`](crate::Builder::sync_with),
//! [`Builder::async_fn_with`](crate::Builder::async_fn_with)).
//!
//! ```no_run
//! use forkrpc::serial::Json;
//! use forkrpc::{Options, Template};
//!
//! fn main() -> Result<(), forkrpc::Error> {
//!     let t = Template::builder()
//!         .sync_with("add", Json, |(a, b): (i64, i64)| a + b)
//!         .start()?;
//!     let rpc = t.fork().run("add", Options::default())?;
//!     let add = rpc.typed::<(i64, i64), i64, _>(Json);
//!     assert_eq!(add.call_blocking(&(2, 3))?, 5);
//!     Ok(())
//! }
//! ```

use crate::error::{Error, Result};
use crate::latch::{Latch, Take};
use crate::pool::{Admit, Pool};
use crate::rpc::{Rpc, Waiter};
use crate::serial::Codec;
use bytes::{Bytes, BytesMut};
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll};

use crate::wire::REPLY_OFFSET;

type Thawed<C, T> = <C as Codec<T>>::Thawed;

fn freeze<C: Codec<T>, T>(codec: &C, value: &T, offset: usize) -> Result<Bytes> {
    let mut buf = BytesMut::new();
    codec.freeze(value, &mut buf, offset)?;
    Ok(buf.freeze())
}

/// A waiter that thaws the reply with `codec`, then hands it on. The codec
/// travels by value: a shared `Arc` would bounce its count between the
/// caller's and the driver's threads on every call.
fn thawing<C, Resp>(
    codec: C,
    deliver: impl FnOnce(Result<Thawed<C, Resp>>) + Send + 'static,
) -> Waiter
where
    C: Codec<Resp>,
{
    Waiter::raw(move |r: Result<Bytes>| {
        deliver(r.and_then(|p| <C as Codec<Resp>>::thaw(&codec, p, REPLY_OFFSET)))
    })
}

/// An RPC handle whose calls send `Req` and get `Resp` through codec `C`.
/// It holds a clone of the [`Rpc`]: like any clone, it keeps the worker
/// open, so drop it before waiting on [`Rpc::close`].
pub struct Typed<C, Req, Resp> {
    rpc: Rpc,
    codec: C,
    _types: PhantomData<fn(&Req) -> Resp>,
}

impl<C: Clone, Req, Resp> Clone for Typed<C, Req, Resp> {
    fn clone(&self) -> Self {
        Typed {
            rpc: self.rpc.clone(),
            codec: self.codec.clone(),
            _types: PhantomData,
        }
    }
}

impl Rpc {
    /// This handle with typed calls: requests frozen and replies thawed by
    /// `codec`. The worker's handler must use the same codec. The codec is
    /// cloned for every call (wrap a costly one in an `Arc`).
    pub fn typed<Req, Resp, C>(&self, codec: C) -> Typed<C, Req, Resp>
    where
        C: Codec<Req> + Codec<Resp> + Clone,
    {
        Typed {
            rpc: self.clone(),
            codec,
            _types: PhantomData,
        }
    }
}

impl<C, Req, Resp> Typed<C, Req, Resp>
where
    C: Codec<Req> + Codec<Resp> + Clone,
{
    /// Calls the handler; the future resolves with the thawed reply.
    pub fn call(&self, req: &Req) -> TypedCall<Thawed<C, Resp>> {
        let latch = Latch::new();
        let l = latch.clone();
        self.submit(req, move |r| l.set(r));
        TypedCall(Take(latch))
    }

    /// Calls the handler; `f` runs with the thawed reply on the driver
    /// thread (or at once, on this thread, if the request cannot be
    /// frozen).
    pub fn call_with(&self, req: &Req, f: impl FnOnce(Result<Thawed<C, Resp>>) + Send + 'static) {
        self.submit(req, f)
    }

    /// Calls the handler and blocks until the reply arrives.
    pub fn call_blocking(&self, req: &Req) -> Result<Thawed<C, Resp>> {
        if crate::driver_thread::on_driver_thread() {
            return Err(Error::WouldDeadlock);
        }
        let latch = Latch::new();
        let l = latch.clone();
        self.submit(req, move |r| l.set(r));
        latch.wait()
    }

    /// The untyped handle underneath.
    pub fn rpc(&self) -> &Rpc {
        &self.rpc
    }

    fn submit(&self, req: &Req, deliver: impl FnOnce(Result<Thawed<C, Resp>>) + Send + 'static) {
        match freeze(&self.codec, req, self.rpc.request_offset()) {
            Ok(p) => self
                .rpc
                .submit(p, thawing::<C, Resp>(self.codec.clone(), deliver)),
            Err(e) => deliver(Err(e)),
        }
    }
}

/// The reply of one typed call.
pub struct TypedCall<T>(Take<Result<T>>);

impl<T> Future for TypedCall<T> {
    type Output = Result<T>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx)
    }
}

/// A pool whose calls send `Req` and get `Resp` through codec `C`. It
/// holds a clone of the [`Pool`], which keeps the pool open.
pub struct TypedPool<C, Req, Resp> {
    pool: Pool,
    codec: C,
    _types: PhantomData<fn(&Req) -> Resp>,
}

impl<C: Clone, Req, Resp> Clone for TypedPool<C, Req, Resp> {
    fn clone(&self) -> Self {
        TypedPool {
            pool: self.pool.clone(),
            codec: self.codec.clone(),
            _types: PhantomData,
        }
    }
}

impl Pool {
    /// This pool with typed calls (see [`Rpc::typed`]).
    pub fn typed<Req, Resp, C>(&self, codec: C) -> TypedPool<C, Req, Resp>
    where
        C: Codec<Req> + Codec<Resp> + Clone,
    {
        TypedPool {
            pool: self.clone(),
            codec,
            _types: PhantomData,
        }
    }
}

impl<C, Req, Resp> TypedPool<C, Req, Resp>
where
    C: Codec<Req> + Codec<Resp> + Clone,
{
    fn frozen(&self, req: &Req) -> Result<Bytes> {
        freeze(&self.codec, req, self.pool.request_offset())
    }

    /// Calls the handler on some worker; the future resolves with the
    /// thawed reply (queue limits as for [`Pool::call_blocking`]: the
    /// call is queued at once, waiting for room if needed).
    pub fn call(&self, req: &Req) -> TypedCall<Thawed<C, Resp>> {
        let latch = Latch::new();
        let l = latch.clone();
        self.submit(req, Admit::Block, move |r| l.set(r));
        TypedCall(Take(latch))
    }

    /// Calls the handler; `f` runs with the thawed reply.
    pub fn call_with(&self, req: &Req, f: impl FnOnce(Result<Thawed<C, Resp>>) + Send + 'static) {
        self.submit(req, Admit::Block, f)
    }

    /// Calls the handler and blocks until the reply arrives.
    pub fn call_blocking(&self, req: &Req) -> Result<Thawed<C, Resp>> {
        if crate::driver_thread::on_driver_thread() {
            return Err(Error::WouldDeadlock);
        }
        let latch = Latch::new();
        let l = latch.clone();
        self.submit(req, Admit::Block, move |r| l.set(r));
        latch.wait()
    }

    /// The untyped pool underneath.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    fn submit(
        &self,
        req: &Req,
        admit: Admit,
        deliver: impl FnOnce(Result<Thawed<C, Resp>>) + Send + 'static,
    ) {
        match self.frozen(req) {
            Ok(p) => {
                let w = thawing::<C, Resp>(self.codec.clone(), deliver);
                let _ = self.pool.submit_payload(p, w, admit);
            }
            Err(e) => deliver(Err(e)),
        }
    }
}
