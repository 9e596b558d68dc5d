//! The public face of process creation: registering handlers, starting the
//! template ([`init`]), deriving templates, and forking workers ([`Fork`]).

use crate::engine::{Engine, EngineKind};
use crate::error::{Error, Result};
use crate::process::{self, TemplateClient};
use crate::registry::{self, Handler, WorkerArgs};
use crate::rpc::{Options, Rpc};
use crate::Octets;
use bytes::Bytes;
use std::os::fd::OwnedFd;
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
    /// Registers a sync handler under `name` (e.g. `"MyWorker::run"`).
    pub fn sync(
        mut self,
        name: impl Into<String>,
        f: impl Fn(Octets) -> Octets + Send + Sync + 'static,
    ) -> Self {
        self.handlers
            .push((name.into(), Handler::Sync(Arc::new(f))));
        self
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
        let pid = self
            .client
            .spawn(registry::RAW_ECHO, None, &[], theirs, &[])?;
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

    /// Forks the worker, running `handler` with the sync backend, and
    /// returns its handle. Unknown handler or init names are an error here.
    pub fn run(self, handler: &str, opts: Options) -> Result<Rpc> {
        let engine = Engine::get(opts.engine.unwrap_or_else(default_engine))?;
        let (mine, theirs) = process::worker_pair()?;
        let pid = self.template.client.spawn(
            handler,
            opts.init.as_deref(),
            &self.args,
            theirs,
            &self.fds,
        )?;
        Ok(Rpc::new(engine, mine, pid, opts))
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
