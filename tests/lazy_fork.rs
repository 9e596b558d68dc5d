//! Without `init()`, a single-threaded process forks the template on its
//! first worker.

use forkrpc::{octets, Fork, Options, TemplateMode};

fn main() {
    forkrpc::Template::builder()
        .sync("lazy::double", |a| {
            a.iter().chain(a.iter()).cloned().collect()
        })
        .install();
    assert_eq!(
        forkrpc::template_mode(),
        None,
        "nothing started by install()"
    );
    // Still single-threaded here: the first Fork::new forks the template.
    let rpc = Fork::new()
        .and_then(|f| f.run("lazy::double", Options::default()))
        .expect("lazy template");
    assert_eq!(forkrpc::template_mode(), Some(TemplateMode::Forked));
    assert_eq!(rpc.call_blocking(octets!["a"]).unwrap(), octets!["a", "a"]);
    rpc.close_blocking().unwrap();
    println!("lazy_fork: 1 passed, 0 failed");
}
