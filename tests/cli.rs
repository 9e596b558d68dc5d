//! The `forkrpc bench` contract: `--json` prints one object per workload
//! with the documented fields, `--only` selects, unknown workloads fail.

use std::process::Command;

fn bench(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_forkrpc"))
        .arg("bench")
        .args(args)
        .output()
        .expect("forkrpc runs")
}

#[test]
fn json_lines_follow_the_schema() {
    let out = bench(&[
        "--json", "--only", "W1,W2", "--runs", "1", "--calls", "2000", "--pings", "200",
    ]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let rows: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
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
    let out = bench(&["--only", "W9"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown workload \"W9\""));
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
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let rows: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2, "{text}");
    assert_eq!(rows[0]["workload"], "W1");
    assert_eq!(rows[0]["backend"], "async");
    assert_eq!(rows[1]["workload"], "W5");
    assert_eq!(rows[1]["name"], "async-concurrency");
    assert_eq!(rows[1]["unit"], "ms");
    assert_eq!(rows[1]["raw"].as_f64(), Some(100.0));
    // 1,000 calls each sleeping 100 ms cannot finish sooner than one sleep.
    assert!(rows[1]["value"].as_f64().unwrap() >= 100.0, "{text}");
}
