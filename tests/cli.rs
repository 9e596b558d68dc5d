//! The CLI contract: `forkrpc bench --json` prints one object per workload
//! with the documented fields, `--only` selects, unknown workloads fail;
//! `forkrpc load --json` prints one final line and fails when calls fail.

use std::process::Command;

/// Runs `forkrpc <sub> <args>` and collects its output.
fn forkrpc(sub: &str, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_forkrpc"))
        .arg(sub)
        .args(args)
        .output()
        .expect("forkrpc runs")
}

fn bench(args: &[&str]) -> std::process::Output {
    forkrpc("bench", args)
}

/// The JSON objects of a successful run's stdout, a line each.
fn json_rows(out: std::process::Output) -> Vec<serde_json::Value> {
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

#[test]
fn json_lines_follow_the_schema() {
    let out = bench(&[
        "--json", "--only", "W1,W2", "--runs", "1", "--calls", "2000", "--pings", "200",
    ]);
    let rows = json_rows(out);
    let ids: Vec<&str> = rows
        .iter()
        .map(|r| r["workload"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["W1", "W2"]);
    assert_eq!(rows[0]["name"], "echo-pipelined");
    assert_eq!(rows[0]["unit"], "calls/s");
    assert_eq!(rows[1]["unit"], "us/call");
    for r in &rows {
        let (value, raw, ratio) = (
            r["value"].as_f64().unwrap(),
            r["raw"].as_f64().unwrap(),
            r["ratio"].as_f64().unwrap(),
        );
        assert!(value > 0.0 && raw > 0.0);
        assert!((ratio - value / raw).abs() <= 0.001 + 0.001 * ratio, "{r}");
        assert_eq!(r["runs"], 1);
    }
    assert!(rows[1]["p99_us"].as_f64().unwrap() >= rows[1]["p50_us"].as_f64().unwrap());
}

#[test]
fn unknown_workload_is_an_error() {
    let out = bench(&["--only", "W1,W9"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown workload \"W9\""));
    // Nothing ran: the refusal comes before any workload.
    assert!(out.stdout.is_empty(), "{out:?}");
}

#[test]
fn async_backend_and_w5() {
    let out = bench(&[
        "--json",
        "--only",
        "W1,W5",
        "--backend",
        "async",
        "--runs",
        "1",
        "--calls",
        "2000",
    ]);
    let rows = json_rows(out);
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(rows[0]["workload"], "W1");
    assert_eq!(rows[0]["backend"], "async");
    assert_eq!(rows[1]["workload"], "W5");
    assert_eq!(rows[1]["name"], "async-concurrency");
    assert_eq!(rows[1]["unit"], "ms");
    assert_eq!(rows[1]["raw"].as_f64(), Some(100.0));
    // 1,000 calls each sleeping 100 ms cannot finish sooner than one sleep.
    assert!(rows[1]["value"].as_f64().unwrap() >= 100.0, "{rows:?}");
}

fn load(args: &[&str]) -> std::process::Output {
    forkrpc("load", args)
}

#[test]
fn load_prints_one_json_line_and_succeeds() {
    let out = load(&["--rate", "2000", "--duration", "300ms", "--json"]);
    let rows = json_rows(out);
    assert_eq!(rows.len(), 1, "{rows:?}");
    let r = &rows[0];
    assert_eq!(r["offered_rate"].as_f64(), Some(2000.0));
    assert_eq!(r["calls"].as_u64(), Some(600), "2000/s for 0.3 s");
    assert_eq!(r["errors"].as_u64(), Some(0));
    assert!(r["achieved_rate"].as_f64().unwrap() > 0.0);
    assert_eq!(r["sent"].as_u64(), Some(600));
    assert_eq!(r["missed"].as_u64(), Some(0));
    assert_eq!(r["ok"].as_u64(), Some(600));
    assert_eq!(r["errors_by_kind"], serde_json::json!({}));
    let p = |k: &str| r[k].as_f64().unwrap();
    assert!(p("p50_us") > 0.0);
    assert!(p("p50_us") <= p("p90_us") && p("p90_us") <= p("p99_us"));
    assert!(p("p99_us") <= p("p999_us") && p("p999_us") <= p("max_us"));
    // The generator's own lateness, apart from the system's latency.
    assert!(p("send_late_p50_us") <= p("send_late_p99_us"));
    assert!(p("send_late_p99_us") <= p("send_late_p999_us"));
    // The raw baseline ran the same schedule; ratios are pool / raw.
    let raw = &r["raw"];
    assert_eq!(raw["sent"].as_u64(), Some(600), "{r}");
    let raw_p50 = raw["p50_us"].as_f64().unwrap();
    assert!(raw_p50 > 0.0);
    let ratio = p("p50_ratio");
    assert!(
        (ratio - p("p50_us") / raw_p50).abs() < 1e-9 * ratio.max(1.0),
        "{r}"
    );
}

#[test]
fn load_without_baseline_reports_no_ratio() {
    let out = load(&[
        "--rate",
        "1000",
        "--duration",
        "100ms",
        "--no-baseline",
        "--json",
    ]);
    let r = &json_rows(out)[0];
    assert_eq!(r["sent"].as_u64(), Some(100));
    assert!(r["raw"].is_null(), "{r}");
    assert!(r["p50_ratio"].is_null(), "{r}");
}

/// Runs `forkrpc load ARGS --json`, killing it (and failing) if it is not
/// done within 30 s; its exit code and JSON line.
fn load_at_most_30s(args: &[&str], what: &str) -> (Option<i32>, serde_json::Value) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_forkrpc"))
        .arg("load")
        .args(args)
        .arg("--json")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_at_most(&mut child, std::time::Duration::from_secs(30), what);
    (status.code(), stdout_json(&mut child))
}

/// Waits for `child` at most `limit`; kills it and panics past that.
fn wait_at_most(
    child: &mut std::process::Child,
    limit: std::time::Duration,
    what: &str,
) -> std::process::ExitStatus {
    let until = std::time::Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if std::time::Instant::now() > until {
            let _ = child.kill();
            panic!("{what}: still running after {limit:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

fn stdout_json(child: &mut std::process::Child) -> serde_json::Value {
    let mut out = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut out).unwrap();
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// A rate no generator can offer still ends at `--duration` (plus the
/// 0.1 s leeway and the drain), with memory bounded by
/// `--max-outstanding`: the calls it could not send are counted as
/// missed, and the run exits with 3 (the rate was not held).
#[test]
fn load_at_an_absurd_rate_ends_on_time_with_bounded_memory() {
    let (code, r) = load_at_most_30s(
        &[
            "--rate",
            "1e9",
            "--duration",
            "300ms",
            "--max-outstanding",
            "1000",
        ],
        "load --rate 1e9 --duration 300ms",
    );
    assert_eq!(code, Some(3));
    let n = |k: &str| r[k].as_u64().unwrap_or_else(|| panic!("{k} in {r}"));
    assert_eq!(n("calls"), 300_000_000);
    assert_eq!(n("sent") + n("missed"), n("calls"), "{r}");
    assert!(n("missed") > n("sent"), "{r}");
    assert_eq!(n("errors"), 0, "{r}");
    assert_eq!(n("ok"), n("sent"), "{r}");
    let raw = &r["raw"];
    assert_eq!(
        raw["sent"].as_u64().unwrap() + raw["missed"].as_u64().unwrap(),
        300_000_000
    );
    // 1,000 calls in flight take a few MiB; an unbounded queue of
    // 3 × 10^8 calls would take tens of GiB.
    assert!(r["peak_rss_mib"].as_f64().unwrap() < 512.0, "{r}");
}

#[test]
fn load_fails_when_calls_fail() {
    // One worker sleeping 50 ms per call cannot answer 200 calls within
    // 0.2 s plus 0.1 s of grace: the unanswered ones are errors.
    let out = load(&[
        "--rate",
        "1000",
        "--duration",
        "0.2",
        "--grace",
        "100ms",
        "--workers",
        "1",
        "--load",
        "1",
        "--handler",
        "sleep:50",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let r: serde_json::Value =
        serde_json::from_str(String::from_utf8(out.stdout).unwrap().trim()).unwrap();
    assert_eq!(r["calls"].as_u64(), Some(200));
    assert!(r["errors"].as_u64().unwrap() > 100, "{r}");
    assert_eq!(r["errors"], r["unanswered"]);
    assert_eq!(
        r["errors_by_kind"],
        serde_json::json!({ "unanswered": r["errors"] }),
        "{r}"
    );
}

/// Bad usage exits with 2 and names the flag; calls that fail, with 3
/// (above); success, 0.
#[test]
fn bad_usage_exits_2_naming_the_flag() {
    let cases: [(&str, &[&str], &str); 15] = [
        ("load", &["--workers", "0"], "--workers"),
        ("load", &["--max-outstanding", "0"], "--max-outstanding"),
        ("load", &["--payload", "100000000"], "--payload"),
        ("load", &["--engine", "kqueue"], "--engine"),
        ("bench", &["--runs", "1001"], "--runs"),
        ("bench", &["--calls", "100000000"], "--calls"),
        ("bench", &["--pings", "0"], "--pings"),
        ("bench", &["--only", "W9"], "--only"),
        ("load", &["--load", "0"], "--load"),
        ("load", &["--duration", "0"], "--duration"),
        ("load", &["--rate", "-5"], "--rate"),
        ("load", &["--rate", "fast"], "--rate"),
        ("load", &["--rate", "0"], "--rate"),
        ("bench", &["--runs", "0"], "--runs"),
        ("bench", &["--no-such-flag"], "--no-such-flag"),
    ];
    for (sub, args, flag) in cases {
        let out = forkrpc(sub, args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{sub} {args:?}: {err}");
        assert!(err.contains(flag), "{sub} {args:?}: {err}");
    }
}

#[test]
fn help_documents_the_exit_codes() {
    let out = Command::new(env!("CARGO_BIN_EXE_forkrpc"))
        .arg("--help")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8_lossy(&out.stdout);
    for code in [
        "0 success",
        "1 the run could not",
        "2 bad usage",
        "3 `load`",
    ] {
        assert!(help.contains(code), "{code}: {help}");
    }
}

#[test]
fn load_rejects_bad_arguments() {
    let out = load(&["--duration", "soon"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a duration"));
    let out = load(&["--handler", "nap:1"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown handler"));
}

#[test]
fn serialiser_switch_for_w1() {
    for ser in ["json", "rkyv"] {
        let out = bench(&[
            "--json",
            "--only",
            "W1",
            "--runs",
            "1",
            "--calls",
            "2000",
            "--serialiser",
            ser,
        ]);
        let rows = json_rows(out);
        let r = &rows[0];
        assert_eq!(r["workload"], "W1");
        assert_eq!(r["serialiser"], ser);
        assert!(r["value"].as_f64().unwrap() > 0.0);
    }
}

/// `scripts/load-sweep` refuses a malformed `--rates` list with exit code
/// 2 and a message naming the flag, before building or running anything.
#[test]
fn load_sweep_refuses_malformed_rates() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/load-sweep");
    for rates in ["5000,abc", "0", "-100", "5000,,6000", "1.5"] {
        let Ok(out) = Command::new("python3")
            .args([script, "--rates", rates])
            .output()
        else {
            eprintln!("note: python3 is not installed; load-sweep's refusals are not tested");
            return;
        };
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{rates}: {err}");
        assert!(
            err.contains("--rates") && err.contains("not a positive whole number"),
            "{rates}: {err}"
        );
    }
}

/// A library user who turns default features off compiles none of the
/// binary's dependencies.
#[test]
fn the_library_does_not_pull_the_cli_dependencies() {
    let out = Command::new(env!("CARGO"))
        .args([
            "tree",
            "-p",
            "forkrpc",
            "-e",
            "normal",
            "--no-default-features",
        ])
        .args(["--prefix", "none", "--offline"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo runs");
    let tree = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(tree.lines().any(|l| l.starts_with("bytes ")), "{tree}");
    for dep in ["clap", "hdrhistogram", "mimalloc", "indicatif", "humantime"] {
        assert!(
            !tree.lines().any(|l| l.starts_with(&format!("{dep} "))),
            "{dep} in the library's tree:\n{tree}"
        );
    }
}

/// The crate's top-level modules import one way: `scripts/module-graph`
/// finds no circle among them, nor between the files of a folder (see
/// lib.rs's Layout), here and in the `forkrpc-pool` crate.
#[test]
fn module_graph_has_no_circle() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/module-graph");
    let Ok(out) = Command::new("python3").arg(script).arg("--files").output() else {
        eprintln!("note: python3 is not installed; the module graph is not checked");
        return;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.ends_with("no circles\n"), "{text}");
    // It reads the edges it should: the RPC layer sits on the engine, and
    // the engine names nothing above it (it calls up through a trait).
    let targets = |from: &str| -> Vec<String> {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{from} -> ")))
            .map(|t| t.split(", ").map(str::to_owned).collect())
            .unwrap_or_default()
    };
    assert!(targets("rpc").contains(&"engine".to_owned()), "{text}");
    let engine = targets("engine");
    assert!(engine.contains(&"wire".to_owned()), "{text}");
    for above in ["rpc", "pool", "template", "typed"] {
        assert!(!engine.contains(&above.to_owned()), "{text}");
    }
    // A name re-exported at the crate root counts where it comes from:
    // `crate::Octets` in the pool is an edge to `wire`.
    assert!(targets("pool").contains(&"wire".to_owned()), "{text}");

    let pool_src = concat!(env!("CARGO_MANIFEST_DIR"), "/pool/src");
    let out = Command::new("python3")
        .args([script, "--root", pool_src, "--files"])
        .output()
        .expect("python3 ran once already");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.ends_with("no circles\n"), "{text}");
    assert!(text.contains("scheduler -> config, ids, queue\n"), "{text}");
}

/// After `--grace`, `load` ends: calls still running count as unanswered
/// and their workers are stopped, not waited for (a 60 s handler here).
#[test]
fn load_ends_after_grace_without_draining() {
    let (code, r) = load_at_most_30s(
        &[
            "--rate",
            "10",
            "--duration",
            "0.3",
            "--grace",
            "100ms",
            "--workers",
            "1",
            "--handler",
            "sleep:60000",
        ],
        "a 0.3 s load run with 100 ms of grace",
    );
    assert_eq!(code, Some(3));
    assert_eq!(r["calls"].as_u64(), Some(3), "{r}");
    assert_eq!(r["unanswered"].as_u64(), Some(3), "{r}");
}

/// A reader that goes away early (`forkrpc bench | head -1`) is no error:
/// the rest of the report is dropped, the run ends as usual, nothing
/// panics.
#[test]
fn a_closed_stdout_ends_the_report_quietly() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    for sub in [
        &[
            "bench", "--only", "W2,W2f", "--pings", "2000", "--runs", "2",
        ][..],
        &["load", "--rate", "200", "--duration", "0.2"][..],
    ] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_forkrpc"))
            .args(sub)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("forkrpc starts");
        let mut first = String::new();
        if sub[0] == "bench" {
            // The header comes before any workload runs: read it, then go.
            BufReader::new(child.stdout.take().unwrap())
                .read_line(&mut first)
                .unwrap();
            assert!(first.starts_with("forkrpc bench"), "{first}");
        } else {
            // `load` prints only at the end: it finds the pipe closed.
            drop(child.stdout.take());
        }
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{sub:?}: {stderr}");
        assert_eq!(out.status.code(), Some(0), "{sub:?}: {stderr}");
    }
}
