//! The embedded homeserver driven by a mainstream Matrix client library (matrix-nio, Python):
//! register, profile, rooms, sync parsing, unread counts, receipts, push-rule edits and
//! to-device messages, as a real client sends them (`tests/clients/nio_flow.py`).
//!
//! Needs `python3` with `matrix-nio` (`pip install matrix-nio`; `.ci/run` installs it). Without
//! it the test says so and passes, unless `HERALD_REQUIRE_CLIENT_LIBS=1` (set by `.ci/run`),
//! where a missing library fails the test.

use std::process::Command;

use crate::support::matrix::TestHomeserver;

fn nio_available() -> bool {
    Command::new("python3")
        .args(["-c", "import nio"])
        .output()
        .is_ok_and(|out| out.status.success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn matrix_nio_runs_the_whole_client_flow() {
    if !nio_available() {
        let required = std::env::var("HERALD_REQUIRE_CLIENT_LIBS").is_ok_and(|v| v == "1");
        assert!(!required, "matrix-nio is required here: pip install matrix-nio");
        eprintln!("skipping: python3 with matrix-nio is not installed (pip install matrix-nio)");
        return;
    }
    let server = TestHomeserver::start().await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/nio_flow.py");
    let url = server.base();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3").arg(script).arg(url).output().expect("python3 runs")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "matrix-nio flow failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("ok: an acknowledged to-device message is gone"), "{stdout}");
}
