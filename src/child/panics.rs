//! A worker's panics: the hook that remembers each one's message (and
//! still prints it), for the error note that fails its call.

use std::cell::RefCell;

thread_local! {
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Installs a panic hook that remembers the message (and still prints it).
pub(crate) fn capture_panics() {
    let prev = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = if let Some(s) = info.payload().downcast_ref::<&str>() {
            (*s).to_owned()
        } else if let Some(s) = info.payload().downcast_ref::<String>() {
            s.clone()
        } else {
            "non-string panic payload".to_owned()
        };
        let full = match info.location() {
            Some(l) => format!("{msg} at {}:{}", l.file(), l.line()),
            None => msg,
        };
        LAST_PANIC.with_borrow_mut(|p| *p = Some(full));
        prev(info);
    }));
}

/// The message of the last panic on this thread (taken).
pub(crate) fn take_panic_message() -> String {
    LAST_PANIC
        .with_borrow_mut(|p| p.take())
        .unwrap_or_else(|| "panic".to_owned())
}
