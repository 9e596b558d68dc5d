//! `init()` in a process that already runs threads must not fork: it
//! re-executes the program, and `init()` in that process becomes the template.

use forkrpc::{octets, Template, TemplateMode};
use libtest_mimic::{Arguments, Trial};

fn main() {
    // A thread before init(): fork would be unsafe now.
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let th = std::thread::spawn(move || rx.recv());
    let t = Template::builder()
        .sync(
            "reexec::whoami",
            |_| octets![std::process::id().to_string()],
        )
        .start()
        .expect("template starts");
    drop(tx);
    let _ = th.join();
    let args = Arguments::from_args();
    let trials = vec![Trial::test("init_with_threads_reexecs", move || {
        if forkrpc::template_mode() != Some(TemplateMode::Reexec) {
            return Err(format!("mode {:?}", forkrpc::template_mode()).into());
        }
        // The template is a fresh exec of this program, not a fork of it.
        let exe = std::fs::read_link(format!("/proc/{}/exe", t.pid()))?;
        if exe != std::env::current_exe()? {
            return Err(format!("template runs {}", exe.display()).into());
        }
        let rpc = t
            .fork()
            .run("reexec::whoami", forkrpc::Options::default())?;
        let pid = rpc.call_blocking(octets![])?;
        if pid.num(0) != Some(rpc.pid() as i64) {
            return Err(format!("reply {pid}").into());
        }
        rpc.close_blocking()?;
        Ok(())
    })];
    libtest_mimic::run(&args, trials).exit();
}
