//! A value set once, awaited by a future on any runtime or by a blocked
//! thread. Completes calls and `close()`.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll, Waker};

pub(crate) struct Latch<T> {
    state: Mutex<(Option<T>, Option<Waker>)>,
    cond: Condvar,
}

impl<T> Latch<T> {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Latch {
            state: Mutex::new((None, None)),
            cond: Condvar::new(),
        })
    }

    /// Sets the value and wakes the waiter.
    pub(crate) fn set(&self, v: T) {
        let waker = {
            let mut s = self.state.lock().unwrap();
            s.0 = Some(v);
            s.1.take()
        };
        self.cond.notify_all();
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Blocks the thread until the value is set, and takes it.
    pub(crate) fn wait(&self) -> T {
        let mut s = self.state.lock().unwrap();
        loop {
            if let Some(v) = s.0.take() {
                return v;
            }
            s = self.cond.wait(s).unwrap();
        }
    }

    pub(crate) fn poll_take(&self, cx: &mut Context<'_>) -> Poll<T> {
        let mut s = self.state.lock().unwrap();
        match s.0.take() {
            Some(v) => Poll::Ready(v),
            None => {
                if !s.1.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    s.1 = Some(cx.waker().clone());
                }
                Poll::Pending
            }
        }
    }
}

impl<T: Clone> Latch<T> {
    /// Blocks until set and returns a copy, leaving the value in place.
    pub(crate) fn wait_clone(&self) -> T {
        let mut s = self.state.lock().unwrap();
        loop {
            if let Some(v) = &s.0 {
                return v.clone();
            }
            s = self.cond.wait(s).unwrap();
        }
    }

    pub(crate) fn poll_clone(&self, cx: &mut Context<'_>) -> Poll<T> {
        let mut s = self.state.lock().unwrap();
        match &s.0 {
            Some(v) => Poll::Ready(v.clone()),
            None => {
                s.1 = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

/// Future over a latch that is taken once.
pub(crate) struct Take<T>(pub Arc<Latch<T>>);

impl<T> Future for Take<T> {
    type Output = T;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        self.0.poll_take(cx)
    }
}
