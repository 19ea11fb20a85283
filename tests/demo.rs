//! `veer demo` ends by itself with the right outcome: a healthy green is promoted, a green
//! answering 20 % errors is rolled back. Runs the real binary with a short step time; each
//! run is bounded by the demo's own `--timeout`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

fn demo(args: &[&str]) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_veer"))
        .args([
            "demo",
            "--min-step-time",
            "1s",
            "--rate",
            "600",
            "--timeout",
            "150s",
        ])
        .args(args)
        .output()
        .expect("veer demo runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    (
        output.status.success(),
        format!("{stdout}\n--- stderr ---\n{stderr}"),
    )
}

#[test]
fn demo_promotes_a_healthy_green() {
    let (ok, output) = demo(&[]);
    assert!(ok, "{output}");
    assert!(
        output.contains("Promoted: green (v2) is now stable."),
        "{output}"
    );
}

#[test]
fn demo_rolls_back_a_green_with_errors() {
    let (ok, output) = demo(&["--green-errors", "0.2"]);
    assert!(ok, "{output}");
    assert!(
        output.contains("Rolled back: all traffic is on blue (v1)."),
        "{output}"
    );
}

/// A green that never answers is rolled back on the requests it keeps waiting, long before
/// `request_timeout` (60 s) could turn them into errors: the demo's 30 s bound fails the test
/// otherwise.
#[test]
fn demo_rolls_back_a_green_that_hangs_before_any_timeout() {
    let output = Command::new(env!("CARGO_BIN_EXE_veer"))
        .args(["demo", "--min-step-time", "1s", "--rate", "600"])
        .args(["--timeout", "30s", "--green-latency", "1h"])
        .output()
        .expect("veer demo runs");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{text}");
    assert!(
        text.contains("Rolled back: all traffic is on blue (v1).")
            && text.contains("still waiting for an answer"),
        "{text}"
    );
}

/// Options the demo cannot run with are usage errors (exit 1) that name the option; the demo
/// does not start. `--timeout 1s` bounds a demo that would start anyway. Durations are at most
/// 100 years, as in the config (a deadline past what the clock counts aborted the demo).
#[test]
fn impossible_demo_options_are_usage_errors() {
    for args in [
        ["--green-errors", "2"],
        ["--green-errors", "1.5"],
        ["--green-errors", "nan"],
        ["--green-errors", "inf"],
        ["--green-errors=-0.1", "--rate=800"],
        ["--green-errors", "-0.1"],
        ["--green-latency", "-5ms"],
        ["--green-latency", "abc"],
        ["--timeout", "0s"],
        ["--timeout", "300000000000years"],
        ["--green-latency", "101years"],
        ["--min-step-time", "0s"],
        ["--rate", "0"],
        ["--rate", "4000000000"],
        ["--admin", "0.0.0.0:0"],
        ["--admin", "not-an-address"],
    ] {
        let bound: &[&str] = if args[0] == "--timeout" {
            &[]
        } else {
            &["--timeout", "1s"]
        };
        let output = Command::new(env!("CARGO_BIN_EXE_veer"))
            .arg("demo")
            .args(bound)
            .args(args)
            .output()
            .expect("veer demo runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains("invalid value"), "{args:?}: {stderr}");
        let option = args[0].split('=').next().unwrap();
        assert!(stderr.contains(option), "{args:?}: {stderr}");
        assert!(!stderr.contains("demo config"), "{args:?}: {stderr}");
    }
}

/// A demo (bounded by its own 60 s `--timeout`) with its temp dir in `tmp`, once its live
/// view's first line is out: the child, its stdout, and its state dir, which then exists.
fn demo_under_way(
    tmp: &std::path::Path,
) -> (
    std::process::Child,
    std::io::BufReader<std::process::ChildStdout>,
    std::path::PathBuf,
) {
    use std::io::BufRead;
    use std::process::Stdio;
    let mut child = Command::new(env!("CARGO_BIN_EXE_veer"))
        .args(["demo", "--timeout", "60s"])
        .env("TMPDIR", tmp)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let state = tmp.join(format!("veer-demo-{}", child.id()));
    assert!(state.is_dir(), "{line}");
    (child, stdout, state)
}

/// SIGINT or SIGTERM stops the demo: it removes its state dir and exits with the code a shell
/// gives that signal (130, 143), saying why.
#[test]
fn a_signal_stops_the_demo_and_it_cleans_up() {
    for (signal, code) in [("INT", 130), ("TERM", 143)] {
        let tmp = tempfile::tempdir().unwrap();
        let (child, _stdout, state) = demo_under_way(tmp.path());
        let sent = Command::new("kill")
            .args([format!("-{signal}"), child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        let output = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(code), "SIG{signal}: {stderr}");
        assert!(
            stderr.contains(&format!("interrupted by SIG{signal}")),
            "{stderr}"
        );
        assert!(
            !state.exists(),
            "SIG{signal}: {} left behind",
            state.display()
        );
    }
}

/// A reader that stops reading (`veer demo | head -3`) ends the demo: a runtime failure (exit 2)
/// that says why, no panic, and the state dir is removed.
#[test]
fn a_closed_stdout_ends_the_demo_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let (child, stdout, state) = demo_under_way(tmp.path());
    drop(stdout);
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("stdout was closed"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!state.exists(), "{} left behind", state.display());
}
