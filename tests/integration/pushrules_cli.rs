//! `herald push-rules evaluate`: the verdict for an event and a user, with the user's rules,
//! display name, member count and power levels read from files; bad input exits 64 naming the
//! file, and no gateway config is needed.

use std::path::PathBuf;

use serde_json::{Value, json};

use crate::cli::herald;
use crate::support::tls::write_file;

struct Inputs {
    dir: tempfile::TempDir,
}

impl Inputs {
    fn new() -> Inputs {
        Inputs { dir: tempfile::tempdir().unwrap() }
    }

    fn file(&self, name: &str, value: &Value) -> PathBuf {
        write_file(self.dir.path(), name, value.to_string())
    }

    /// Runs `push-rules evaluate` (no `--config`, and none needed) and returns (exit code,
    /// parsed stdout or null, stderr).
    fn evaluate(&self, args: &[&str]) -> (i32, Value, String) {
        let out = herald(&[&["push-rules", "evaluate"][..], args].concat());
        let stdout = String::from_utf8_lossy(&out.stdout);
        let parsed = serde_json::from_str(&stdout).unwrap_or(Value::Null);
        (out.status.code().unwrap(), parsed, String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn message(body: &str) -> Value {
    json!({"type": "m.room.message", "sender": "@bob:example.org", "room_id": "!r:example.org",
           "event_id": "$1", "content": {"msgtype": "m.text", "body": body}})
}

#[test]
fn a_plain_message_notifies_through_the_defaults() {
    let inputs = Inputs::new();
    let event = inputs.file("event.json", &message("lunch?"));
    let (code, out, _) =
        inputs.evaluate(&["--event", event.to_str().unwrap(), "--user-id", "@alice:example.org"]);
    assert_eq!(code, 0);
    assert_eq!(
        out,
        json!({"rule_id": ".m.rule.message", "actions": ["notify"], "notify": true, "tweaks": {}})
    );
    let (_, out, _) = inputs.evaluate(&[
        "--event",
        event.to_str().unwrap(),
        "--user-id",
        "@alice:example.org",
        "--member-count",
        "2",
    ]);
    assert_eq!(out["rule_id"], ".m.rule.room_one_to_one");
    assert_eq!(out["tweaks"], json!({"sound": "default"}));
}

#[test]
fn display_name_and_power_levels_come_from_flags_and_files() {
    let inputs = Inputs::new();
    let event = inputs.file("event.json", &message("Alice Liddell: @room"));
    let event = event.to_str().unwrap();
    let user = ["--user-id", "@al:example.org"];
    let (_, out, _) = inputs
        .evaluate(&[&["--event", event][..], &user, &["--display-name", "alice liddell"]].concat());
    assert_eq!(out["rule_id"], ".m.rule.contains_display_name");
    assert_eq!(out["tweaks"], json!({"sound": "default", "highlight": true}));

    // Without a display name, @room needs the sender to have power 50.
    let (_, out, _) = inputs.evaluate(&[&["--event", event][..], &user].concat());
    assert_eq!(out["rule_id"], ".m.rule.message");
    let pl = inputs.file(
        "pl.json",
        &json!({"type": "m.room.power_levels", "state_key": "",
                "content": {"users": {"@bob:example.org": 50}}}),
    );
    let (_, out, _) = inputs.evaluate(
        &[&["--event", event][..], &user, &["--power-levels", pl.to_str().unwrap()]].concat(),
    );
    assert_eq!(out["rule_id"], ".m.rule.roomnotif");
    let (_, out, _) = inputs.evaluate(
        &[
            &["--event", event][..],
            &user,
            &["--power-levels", pl.to_str().unwrap(), "--sender-power-level", "-1"],
        ]
        .concat(),
    );
    assert_eq!(out["rule_id"], ".m.rule.message", "--sender-power-level wins");
    let (_, out, _) = inputs
        .evaluate(&[&["--event", event][..], &user, &["--sender-power-level", "100"]].concat());
    assert_eq!(out["rule_id"], ".m.rule.roomnotif");
}

#[test]
fn user_rules_change_defaults_and_add_their_own() {
    let inputs = Inputs::new();
    let rules = inputs.file(
        "rules.json",
        &json!({"global": {
            "override": [{"rule_id": ".m.rule.suppress_notices", "default": true,
                          "enabled": false, "actions": []},
                         {"rule_id": ".m.rule.not_a_default", "enabled": true, "actions": []}],
            "content": [{"rule_id": "cake", "enabled": true, "pattern": "cake",
                         "actions": ["notify", {"set_tweak": "sound", "value": "cake.wav"}]}],
            "underride": [{"rule_id": ".m.rule.message", "default": true, "enabled": true,
                           "actions": ["notify", {"set_tweak": "sound", "value": "msg.wav"}]}]
        }}),
    );
    let rules = rules.to_str().unwrap();
    let notice = inputs.file(
        "notice.json",
        &json!({"type": "m.room.message", "sender": "@bot:example.org",
                "content": {"msgtype": "m.notice", "body": "build ok"}}),
    );
    let (code, out, err) = inputs.evaluate(&[
        "--event",
        notice.to_str().unwrap(),
        "--user-id",
        "@alice:example.org",
        "--rules",
        rules,
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out["rule_id"], ".m.rule.message", "suppress_notices disabled");
    assert_eq!(out["tweaks"], json!({"sound": "msg.wav"}), "new default actions");
    assert!(err.contains(".m.rule.not_a_default") && err.contains("ignored"), "{err}");
    let cake = inputs.file("cake.json", &message("Who wants CAKE?"));
    let (_, out, _) = inputs.evaluate(&[
        "--event",
        cake.to_str().unwrap(),
        "--user-id",
        "@alice:example.org",
        "--rules",
        rules,
    ]);
    assert_eq!(out["rule_id"], "cake");
}

#[test]
fn no_match_prints_nulls_and_own_events_say_why() {
    let inputs = Inputs::new();
    let topic = inputs.file(
        "topic.json",
        &json!({"type": "m.room.topic", "sender": "@bob:example.org", "state_key": "",
                "content": {"topic": "x"}}),
    );
    let (code, out, _) =
        inputs.evaluate(&["--event", topic.to_str().unwrap(), "--user-id", "@a:x"]);
    assert_eq!(code, 0);
    assert_eq!(out, json!({"rule_id": null, "actions": null, "notify": false, "tweaks": {}}));
    let own = inputs.file("own.json", &message("hi"));
    let (code, out, err) =
        inputs.evaluate(&["--event", own.to_str().unwrap(), "--user-id", "@bob:example.org"]);
    assert_eq!(code, 0);
    assert_eq!(out["rule_id"], Value::Null);
    assert!(err.contains("own events never notify"), "{err}");
}

#[test]
fn bad_input_exits_64_naming_the_file() {
    let inputs = Inputs::new();
    let event = inputs.file("event.json", &message("x"));
    let event = event.to_str().unwrap();
    let not_json = write_file(inputs.dir.path(), "broken.json", "{not json");
    let bad_rules = inputs.file(
        "rules.json",
        &json!({"global": {"content": [{"rule_id": "x", "pattern": 5, "actions": []}]}}),
    );
    let array = inputs.file("array.json", &json!([1]));
    for (args, expect) in [
        (vec!["--event", event, "--user-id", "alice"], "--user-id"),
        (vec!["--event", "/nonexistent/e.json", "--user-id", "@a:x"], "/nonexistent/e.json"),
        (vec!["--event", not_json.to_str().unwrap(), "--user-id", "@a:x"], "broken.json"),
        (vec!["--event", array.to_str().unwrap(), "--user-id", "@a:x"], "array.json"),
        (
            vec!["--event", event, "--user-id", "@a:x", "--rules", bad_rules.to_str().unwrap()],
            "global.content[0].pattern",
        ),
        (
            vec!["--event", event, "--user-id", "@a:x", "--power-levels", array.to_str().unwrap()],
            "array.json",
        ),
    ] {
        let (code, out, err) = inputs.evaluate(&args);
        assert_eq!(code, 64, "{args:?}: {err}");
        assert_eq!(out, Value::Null, "nothing on stdout");
        assert!(err.contains(expect), "{args:?}: {err}");
    }
}
