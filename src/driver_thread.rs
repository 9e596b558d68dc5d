//! Whether the running thread is an engine's driver thread, where reply
//! callbacks run: a blocking call there would deadlock, and what a
//! callback boxed there is freed there (see `call::leftovers`). The engine
//! sets it; the layers above read it.

use std::cell::Cell;

thread_local! {
    pub(crate) static ON_DRIVER: Cell<bool> = const { Cell::new(false) };
}

/// True on a driver thread (inside callbacks).
pub(crate) fn on_driver_thread() -> bool {
    ON_DRIVER.get()
}
