//! Without `init()`, a process that already runs threads gets an error that
//! tells it to call `init()`, and nothing is forked.

use forkrpc::{Error, Fork};

fn main() {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let th = std::thread::spawn(move || rx.recv());
    match Fork::new() {
        Err(e @ Error::NotInitialised) => {
            assert!(e.to_string().contains("call forkrpc::init()"), "{e}");
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("forked from a threaded process"),
    }
    assert_eq!(forkrpc::template_mode(), None);
    drop(tx);
    let _ = th.join();
    println!("threaded_without_init: 1 passed, 0 failed");
}
