//! What keeps a pool open: held by every `Pool` clone and every running
//! `Map`; when the last goes, the pool closes (its queue drains first).

use super::state::PoolState;
use std::sync::Arc;

/// Closes the pool when dropped.
pub(crate) struct KeepOpen(Arc<PoolState>);

impl KeepOpen {
    pub(crate) fn new(state: Arc<PoolState>) -> KeepOpen {
        KeepOpen(state)
    }

    /// The pool's state.
    pub(crate) fn state(&self) -> &Arc<PoolState> {
        &self.0
    }
}

impl Drop for KeepOpen {
    fn drop(&mut self) {
        self.0.close(None);
    }
}
