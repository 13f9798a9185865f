//! `herald demo`: the built binary plays the whole push flow on loopback and narrates it. Its
//! stdout is a pipe here, so the narration must be plain text. It plays once as started here and
//! once pinned to one CPU, where herald runs on tokio's current-thread scheduler (homeserver,
//! gateway and the fake providers then share one thread).

use std::process::Command;

#[test]
fn demo_plays_the_whole_flow_and_exits_0() {
    let mut command = Command::new(env!("CARGO_BIN_EXE_herald"));
    command.arg("demo");
    assert_demo_played(command);
}

#[test]
fn demo_plays_the_whole_flow_on_one_cpu() {
    // `taskset` is part of util-linux, on every Linux machine this suite runs on.
    let mut command = Command::new("taskset");
    command.args(["--cpu-list", "0", env!("CARGO_BIN_EXE_herald"), "demo"]);
    command.env_remove("TOKIO_WORKER_THREADS");
    assert_demo_played(command);
}

fn assert_demo_played(mut command: Command) {
    let out = command
        .env_remove("HERALD_CONFIG")
        .env_remove("RUST_LOG")
        .output()
        .expect("herald runs (and taskset exists, for the one-CPU run)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "herald demo failed: {stderr}\n{stdout}");
    assert!(!stdout.contains("\x1b["), "ANSI escapes on a pipe:\n{stdout}");
    for expected in [
        // The invite, then messages, reach both providers.
        "gateway → APNs",
        "gateway → FCM",
        "banner \"Alice in Lunch: hello! lunch at noon?\"",
        "app shows \"Alice in Lunch: Bob, are you coming?\"",
        // The dead token is rejected and its pusher dropped.
        "410 Unregistered",
        "{\"rejected\": [",
        "drops the old iPad's pusher",
        // The muted room pushes nothing.
        "no actions, no notification",
        "no push for the muted room",
        // The read receipt clears the badge on both phones.
        "app icon badge → 0",
        "unread count → 0",
        // The to-device message arrives over /sync.
        "to_device: im.herald.demo.ping from @alice:",
    ] {
        assert!(stdout.contains(expected), "missing {expected:?} in:\n{stdout}");
    }
}
