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

/// Options the demo cannot run with are usage errors (exit 1) that name the option; the demo
/// does not start. `--timeout 1s` bounds a demo that would start anyway.
#[test]
fn impossible_demo_options_are_usage_errors() {
    for args in [
        ["--green-errors", "2"],
        ["--green-errors", "1.5"],
        ["--green-errors", "nan"],
        ["--green-errors", "inf"],
        ["--green-errors=-0.1", "--rate=800"],
        ["--rate", "0"],
        ["--admin", "0.0.0.0:0"],
        ["--admin", "not-an-address"],
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_veer"))
            .args(["demo", "--timeout", "1s"])
            .args(args)
            .output()
            .expect("veer demo runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{args:?}: {stderr}");
        let option = args[0].split('=').next().unwrap();
        assert!(stderr.contains(option), "{args:?}: {stderr}");
        assert!(!stderr.contains("demo config"), "{args:?}: {stderr}");
    }
}
