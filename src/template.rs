//! The public face of process creation: registering handlers, starting the
//! template ([`init`]), deriving templates, and forking workers ([`Fork`]).

use crate::child::asynchronous::DEFAULT_CONCURRENCY;
use crate::child::done::Done;
use crate::child::registry::{self, Handler, IntoReply, WorkerArgs};
use crate::engine::{Engine, EngineKind};
use crate::error::{Error, Result};
use crate::process::{self, Backend, TemplateClient, WorkerSpec};
use crate::rpc::{Options, Rpc};
use crate::serial::Codec;
use crate::wire::Octets;
use bytes::Bytes;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, OnceLock};

/// A template process: a single-threaded process that forks workers.
///
/// The root template is started by [`init`] (or [`Builder::start`]);
/// [`Template::derive`] makes templates that ran an init function first,
/// so every worker forked from them shares its state copy-on-write (as
/// `AnyEvent::Fork->new->require(...)` does).
#[derive(Clone)]
pub struct Template {
    client: Arc<TemplateClient>,
}

/// Registers handlers and init functions, then starts the template.
///
/// ```no_run
/// fn main() -> Result<(), forkrpc::Error> {
///     forkrpc::Template::builder()
///         .sync("MyWorker::run", |args| args)
///         .start()?;
///     Ok(())
/// }
/// ```
#[must_use = "call start() (or install())"]
#[derive(Default)]
pub struct Builder {
    handlers: Vec<(String, Handler)>,
    inits: Vec<(String, registry::InitFn)>,
}

impl Builder {
    /// Registers a sync handler under `name` (e.g. `"MyWorker::run"`): it
    /// gets a call's arguments and returns the reply. It runs on either
    /// backend.
    pub fn sync(
        mut self,
        name: impl Into<String>,
        f: impl Fn(Octets) -> Octets + Send + Sync + 'static,
    ) -> Self {
        self.handlers.push((
            name.into(),
            Handler::Sync(Arc::new(move |args| Ok(f(args)))),
        ));
        self
    }

    /// Registers a fallible sync handler: an `Err` fails that call with
    /// [`Error::Handler`] carrying the error's message, and the worker
    /// carries on.
    ///
    /// ```no_run
    /// use forkrpc::{octets, Octets, Template};
    ///
    /// fn read(args: Octets) -> std::io::Result<Octets> {
    ///     Ok(octets![std::fs::read(args.str(0).unwrap_or(""))?])
    /// }
    ///
    /// # fn main() -> Result<(), forkrpc::Error> {
    /// Template::builder().try_sync("read", read).start()?;
    /// # Ok(()) }
    /// ```
    pub fn try_sync<E: std::fmt::Display>(
        mut self,
        name: impl Into<String>,
        f: impl Fn(Octets) -> Result<Octets, E> + Send + Sync + 'static,
    ) -> Self {
        self.handlers.push((
            name.into(),
            Handler::Sync(Arc::new(move |args| f(args).into_reply())),
        ));
        self
    }

    /// Registers a typed sync handler: requests are thawed and replies
    /// frozen with `codec` (the parent calls it through
    /// [`Rpc::typed`](crate::Rpc::typed) with the same codec). It runs on
    /// either backend. Put errors in `Resp` (e.g. a `Result`), or panic.
    ///
    /// ```no_run
    /// use forkrpc::serial::Json;
    /// # fn main() -> Result<(), forkrpc::Error> {
    /// forkrpc::Template::builder()
    ///     .sync_with("len", Json, |(s,): (String,)| s.len())
    ///     .start()?;
    /// # Ok(()) }
    /// ```
    pub fn sync_with<C, Req, Resp>(
        mut self,
        name: impl Into<String>,
        codec: C,
        f: impl Fn(<C as Codec<Req>>::Thawed) -> Resp + Send + Sync + 'static,
    ) -> Self
    where
        C: Codec<Req> + Codec<Resp>,
    {
        self.handlers.push((
            name.into(),
            Handler::Raw(crate::child::registry::raw_sync::<C, Req, Resp>(codec, f)),
        ));
        self
    }

    /// Registers a typed async handler, an `async fn` from the thawed
    /// request to the reply, frozen with `codec`. Needs
    /// [`Options::asynchronous`].
    pub fn async_fn_with<C, Req, Resp, F, Fut>(
        mut self,
        name: impl Into<String>,
        codec: C,
        f: F,
    ) -> Self
    where
        C: Codec<Req> + Codec<Resp>,
        F: Fn(<C as Codec<Req>>::Thawed) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Resp> + 'static,
    {
        self.handlers.push((
            name.into(),
            Handler::RawAsync(crate::child::registry::raw_async::<C, Req, Resp, F, Fut>(
                codec, f,
            )),
        ));
        self
    }

    /// Registers an async handler in the seed's style: it gets the call's
    /// [`Done`] first and calls [`Done::reply`] when the call is finished,
    /// before or after returning (typically from a task it spawned with
    /// `tokio::task::spawn_local`). Needs [`Options::asynchronous`].
    ///
    /// ```no_run
    /// use forkrpc::{octets, Done, Octets, Template};
    /// use std::time::Duration;
    ///
    /// fn countdown(done: Done, args: Octets) {
    ///     let count: u32 = args.str(0).unwrap_or("1").parse().unwrap_or(1);
    ///     tokio::task::spawn_local(async move {
    ///         for n in 1..=count {
    ///             tokio::time::sleep(Duration::from_secs(1)).await;
    ///             forkrpc::event(octets![format!("count {n} of {count}")]);
    ///         }
    ///         done.reply(octets![]);
    ///     });
    /// }
    ///
    /// # fn main() -> Result<(), forkrpc::Error> {
    /// Template::builder().asynchronous("countdown", countdown).start()?;
    /// # Ok(()) }
    /// ```
    pub fn asynchronous(
        mut self,
        name: impl Into<String>,
        f: impl Fn(Done, Octets) + Send + Sync + 'static,
    ) -> Self {
        self.handlers
            .push((name.into(), Handler::Async(Arc::new(f))));
        self
    }

    /// Registers an async handler written as an `async fn`: its output is
    /// the reply (or a `Result`, as for [`Builder::sync`]). Each call runs
    /// as its own task on the worker's runtime. Needs
    /// [`Options::asynchronous`].
    ///
    /// ```no_run
    /// use forkrpc::{octets, Octets, Template};
    ///
    /// async fn slow_echo(args: Octets) -> Octets {
    ///     tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    ///     args
    /// }
    ///
    /// # fn main() -> Result<(), forkrpc::Error> {
    /// Template::builder().async_fn("slow_echo", slow_echo).start()?;
    /// # Ok(()) }
    /// ```
    pub fn async_fn<F, Fut>(self, name: impl Into<String>, f: F) -> Self
    where
        F: Fn(Octets) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future + 'static,
        Fut::Output: IntoReply,
    {
        self.asynchronous(name, move |done, args| {
            let fut = f(args);
            tokio::task::spawn_local(async move { done.reply(fut.await) });
        })
    }

    /// Registers an init function under `name`, for [`Options::init`] and
    /// [`Template::derive`].
    pub fn init(
        mut self,
        name: impl Into<String>,
        f: impl Fn(WorkerArgs) + Send + Sync + 'static,
    ) -> Self {
        self.inits.push((name.into(), Arc::new(f)));
        self
    }

    /// Registers everything without starting the template (it then starts
    /// on the first [`Fork::new`], if the process is still single-threaded).
    pub fn install(self) {
        for (n, h) in self.handlers {
            registry::add_handler(n, h);
        }
        for (n, f) in self.inits {
            registry::add_init(n, f);
        }
    }

    /// Registers everything and starts the root template. Call it first
    /// thing in `main`. In a re-executed template process it never returns.
    pub fn start(self) -> Result<Template> {
        self.install();
        process::become_template_if_marked();
        Ok(Template {
            client: process::init_root()?,
        })
    }
}

/// Starts the root template with only the built-in handlers registered
/// (same as `Template::builder().start()`).
pub fn init() -> Result<Template> {
    Template::builder().start()
}

impl Template {
    /// A [`Builder`] for handlers and init functions.
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// The root template (started now if `init()` was never called and the
    /// process is single-threaded; else [`Error::NotInitialised`]).
    pub fn root() -> Result<Template> {
        process::become_template_if_marked();
        Ok(Template {
            client: process::root()?,
        })
    }

    /// Starts preparing a worker forked from this template.
    pub fn fork(&self) -> Fork {
        Fork {
            template: self.clone(),
            args: Vec::new(),
            fds: Vec::new(),
        }
    }

    /// A new template forked from this one that first runs the init
    /// function `init` with `args`; workers forked from it share what the
    /// init function set up.
    pub fn derive<I, B>(&self, init: &str, args: I) -> Result<Template>
    where
        I: IntoIterator<Item = B>,
        B: Into<Bytes>,
    {
        let args: Vec<Bytes> = args.into_iter().map(Into::into).collect();
        Ok(Template {
            client: self.client.derive(init, &args, &[])?,
        })
    }

    /// Forks a worker that echoes raw bytes with no framing: the bench's
    /// physical baseline. Returns the parent's (blocking) end and the pid.
    #[doc(hidden)]
    pub fn spawn_raw_echo(&self) -> Result<(OwnedFd, i32)> {
        let (mine, theirs) = process::worker_pair()?;
        let spec = WorkerSpec {
            handler: registry::RAW_ECHO,
            init: None,
            backend: Backend::Sync,
            args: &[],
            fds: &[],
            arena: None,
            journal: None,
        };
        let pid = self.client.spawn(&spec, theirs)?;
        Ok((mine, pid))
    }

    /// Process id of the template.
    pub fn pid(&self) -> i32 {
        self.client.pid()
    }
}

/// A worker being prepared: arguments and descriptors for its init
/// function, then [`Fork::run`] (AnyEvent::Fork's `send_arg`, `send_fh`, `run`).
pub struct Fork {
    template: Template,
    args: Vec<Bytes>,
    fds: Vec<OwnedFd>,
}

fn default_engine() -> EngineKind {
    static KIND: OnceLock<EngineKind> = OnceLock::new();
    *KIND.get_or_init(EngineKind::from_env)
}

impl Fork {
    /// A worker forked from the root template.
    pub fn new() -> Result<Fork> {
        Ok(Template::root()?.fork())
    }

    /// Adds an argument for the init function.
    pub fn send_arg(mut self, arg: impl Into<Bytes>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Passes a descriptor to the worker (SCM_RIGHTS); the init function
    /// gets it in [`WorkerArgs::fds`]. Our copy is closed once it is sent.
    pub fn send_fh(mut self, fd: impl Into<OwnedFd>) -> Self {
        self.fds.push(fd.into());
        self
    }

    /// Forks the worker, running `handler` with the backend `opts` select
    /// (sync by default), and returns its handle. Unknown handler or init
    /// names are an error here, and so is an async handler without
    /// [`Options::asynchronous`] ([`Error::NeedsAsync`]).
    pub fn run(self, handler: &str, opts: Options) -> Result<Rpc> {
        let kind = opts.engine.unwrap_or_else(default_engine);
        let engine = Engine::get(kind)?;
        let (mine, theirs) = process::worker_pair()?;
        let backend = if opts.asynchronous {
            Backend::Async {
                limit: opts.concurrency.unwrap_or(DEFAULT_CONCURRENCY),
                uring: kind == EngineKind::Uring,
            }
        } else {
            Backend::Sync
        };
        // The worker reads big strings of calls in the shared arena.
        let arena = crate::arena::arena();
        // The worker keeps a crash journal (see `journal`).
        let journal = Some(
            crate::journal::Journal::create()
                .map_err(|e| Error::io("making a worker's crash journal", e))?,
        );
        let spec = WorkerSpec {
            handler,
            init: opts.init.as_deref(),
            backend,
            args: &self.args,
            fds: &self.fds,
            arena: arena.map(|a| a.fd()),
            journal: journal.as_ref().map(|j| j.1.as_fd()),
        };
        let pid = self.template.client.spawn(&spec, theirs)?;
        Ok(Rpc::new(
            engine,
            mine,
            pid,
            opts,
            arena,
            journal.map(|j| j.0),
        ))
    }
}

impl Fork {
    /// Runs an external program as the worker instead of a registered
    /// handler: the template forks and executes `program` (looked up in
    /// `PATH`) with `args`, the worker's socket as its stdin and stdout,
    /// and stderr shared. The program must speak the wire format (see
    /// [`wire`](crate::wire)) for the backend `opts` selects — a worker in
    /// another language, or a remote one through `ssh host command`. It
    /// is reaped and reported like any worker. `send_arg` and `send_fh`
    /// values and [`Options::init`] do not apply to it (use `args`).
    ///
    /// ```no_run
    /// # fn main() -> Result<(), forkrpc::Error> {
    /// let rpc = forkrpc::Fork::new()?.exec("perl", ["worker.pl"], forkrpc::Options::default())?;
    /// # Ok(()) }
    /// ```
    pub fn exec<I, B>(self, program: &str, args: I, opts: Options) -> Result<Rpc>
    where
        I: IntoIterator<Item = B>,
        B: Into<Bytes>,
    {
        let args: Vec<Bytes> = args.into_iter().map(Into::into).collect();
        let engine = Engine::get(opts.engine.unwrap_or_else(default_engine))?;
        let (mine, theirs) = process::worker_pair()?;
        let pid = self.template.client.spawn_exec(program, &args, theirs)?;
        Ok(Rpc::new(engine, mine, pid, opts, None, None))
    }
}

impl std::fmt::Debug for Template {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Template(pid {})", self.pid())
    }
}

#[allow(dead_code)]
fn _assert_error_is_send_sync() {
    fn is<T: Send + Sync>() {}
    is::<Error>();
}
