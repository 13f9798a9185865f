//! The `herald` binary itself: `check-config` for each kind of bad config (exit 64 naming the
//! YAML path), the shipped `gateway.yaml` and `deploy/` examples, `send`, and a full
//! serve → SIGTERM run whose logs must hold no key, token, JWT or full pushkey.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use base64::Engine as _;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::support::fake_apns::{FakeApns, Reply};
use crate::support::fake_fcm::{FakeFcm, FcmReply};
use crate::support::gateway::{
    APNS_KEY_ID, APNS_TEAM_ID, Settings, apns_app, client, fcm_app, message, send,
};
use crate::support::tls::{TestCa, write_file};

const HERALD: &str = env!("CARGO_BIN_EXE_herald");

pub(crate) fn herald(args: &[&str]) -> Output {
    Command::new(HERALD)
        .args(args)
        .env_remove("HERALD_CONFIG")
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

fn check(yaml: &str) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), "gateway.yaml", yaml);
    let out = herald(&["check-config", "--config", path.to_str().unwrap()]);
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    (out.status.code().unwrap(), text)
}

#[test]
fn shipped_gateway_yaml_is_valid() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = herald(&["check-config", "--config", root.join("gateway.yaml").to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn deploy_examples_are_valid_once_their_secrets_exist() {
    // The examples point at /secrets/…; swap in real (test) files so every key is checked.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let (cert, key) = ca.issue_client_cert("deploy");
    let p8 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap().serialize_pem();
    let sa = json!({"type": "service_account", "project_id": "p", "private_key_id": "1",
        "private_key": std::fs::read_to_string(crate::support::gateway::fixture("fcm-test-key.pem")).unwrap(),
        "client_email": "sa@p.iam.gserviceaccount.com", "client_id": "1",
        "token_uri": "https://oauth2.googleapis.com/token"});
    let mut checked = 0;
    for entry in std::fs::read_dir(root.join("deploy")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let yaml = std::fs::read_to_string(&path).unwrap();
        let secrets = dir.path().join("secrets");
        std::fs::create_dir_all(&secrets).unwrap();
        for line in yaml.lines().filter(|l| !l.trim_start().starts_with('#')) {
            let Some(at) = line.find("/secrets/") else { continue };
            let file =
                line[at + "/secrets/".len()..].split_whitespace().next().unwrap().trim_matches('"');
            if let Some(parent) = Path::new(file).parent() {
                std::fs::create_dir_all(secrets.join(parent)).unwrap();
            }
            let contents = if file.ends_with(".p8") {
                p8.clone()
            } else if file.ends_with(".json") {
                sa.to_string()
            } else {
                format!("{cert}{key}")
            };
            std::fs::write(secrets.join(file), contents).unwrap();
        }
        let rewritten = yaml.replace("/secrets/", &format!("{}/", secrets.display()));
        let (code, text) = check(&rewritten);
        assert_eq!(code, 0, "{}: {text}", path.display());
        checked += 1;
    }
    assert!(checked > 0, "deploy/ has no yaml files");
}

#[test]
fn bad_configs_exit_64_naming_the_yaml_path() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = write_file(dir.path(), "garbage.p8", "not a key");
    let rsa_not_ec = crate::support::gateway::fixture("fcm-test-key.pem");
    let bad_sa = write_file(dir.path(), "sa.json", "{\"type\": \"service_account\"}");
    let cases: Vec<(String, &str)> = vec![
        ("listn: \"127.0.0.1:5000\"\n".into(), "listn"),
        ("listen: \"localhost\"\n".into(), "listen"),
        ("request_deadline: soon\n".into(), "request_deadline"),
        ("retry: { attempts: 0 }\n".into(), "retry.attempts"),
        ("log: { format: xml }\n".into(), "xml"),
        ("dedup: { backend: etcd }\n".into(), "dedup.backend"),
        ("proxy: \"socks5://x:1\"\n".into(), "proxy"),
        ("apps:\n  a:\n    type: carrier-pigeon\n".into(), "apps.a"),
        ("apps:\n  a:\n    type: log\n    extra: 1\n".into(), "apps.a"),
        ("apps:\n  a:\n    type: apns\n    topic: a\n".into(), "apps.a"),
        (
            "apps:\n  a:\n    type: apns\n    topic: a\n    key_file: /nonexistent/key.p8\n    key_id: K\n    team_id: T\n".into(),
            "apps.a.key_file",
        ),
        (
            format!("apps:\n  a:\n    type: apns\n    topic: a\n    key_file: {}\n    key_id: K\n    team_id: T\n", garbage.display()),
            "apps.a.key_file",
        ),
        (
            format!("apps:\n  a:\n    type: apns\n    topic: a\n    key_file: {}\n    key_id: K\n    team_id: T\n", rsa_not_ec.display()),
            "apps.a.key_file",
        ),
        (
            format!("apps:\n  a:\n    type: apns\n    topic: a\n    cert_file: {}\n", garbage.display()),
            "apps.a.cert_file",
        ),
        (
            format!("apps:\n  a:\n    type: apns\n    topic: a\n    key_file: {}\n    key_id: K\n    team_id: T\n    platform: staging\n", garbage.display()),
            "apps.a",
        ),
        (format!("apps:\n  a:\n    type: fcm\n    service_account_file: {}\n", bad_sa.display()), "apps.a.service_account_file"),
        ("apps:\n  a:\n    type: fcm\n    service_account_file: /nonexistent.json\n".into(), "apps.a.service_account_file"),
        ("apps: [1, 2]\n".into(), "apps"),
        (":\n  - [\n".into(), "yaml"),
    ];
    for (yaml, needle) in cases {
        let (code, text) = check(&yaml);
        assert_eq!(code, 64, "{yaml} → {text}");
        assert!(text.contains(needle), "error for {yaml:?} should mention {needle}: {text}");
        assert_eq!(text.trim().lines().count(), 1, "one readable line: {text}");
    }
}

#[test]
fn check_config_builds_the_providers() {
    // Each file parses on its own; only building the TLS client shows they are unusable.
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let (cert, _) = ca.issue_client_cert("one");
    let (_, other_key) = ca.issue_client_cert("two");
    let mismatched = write_file(dir.path(), "mismatched.pem", format!("{cert}{other_key}"));
    let (code, text) = check(&format!(
        "apps:\n  im.example.ios:\n    type: apns\n    topic: t\n    cert_file: {}\n",
        mismatched.display()
    ));
    assert_eq!(code, 64, "{text}");
    assert!(text.starts_with("herald: configuration error: "), "{text}");
    assert!(text.contains("apps.im.example.ios") && text.contains("cert_file"), "{text}");
    assert_eq!(text.trim().lines().count(), 1, "one readable line: {text}");

    // `serve` refuses the same file with the same exit code, before binding anything.
    let yaml = format!(
        "listen: \"127.0.0.1:0\"\napps:\n  im.example.ios:\n    type: apns\n    topic: t\n    cert_file: {}\n",
        mismatched.display()
    );
    let config = write_file(dir.path(), "serve.yaml", yaml);
    let out = herald(&["serve", "--config", config.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("herald: configuration error: apps.im.example.ios"), "{stderr}");

    let garbage_der = "-----BEGIN CERTIFICATE-----\nAAECAwQF\n-----END CERTIFICATE-----\n";
    let ca_file = write_file(dir.path(), "ca.pem", garbage_der);
    let (key_cert, key) = ca.issue_client_cert("ok");
    let good = write_file(dir.path(), "good.pem", format!("{key_cert}{key}"));
    let (code, text) = check(&format!(
        "apps:\n  im.example.ios:\n    type: apns\n    topic: t\n    cert_file: {}\n    ca_file: {}\n",
        good.display(),
        ca_file.display()
    ));
    assert_eq!(code, 64, "{text}");
    assert!(text.contains("apps.im.example.ios") && text.contains("ca_file"), "{text}");

    // The same files without the bad CA pass.
    let (code, text) = check(&format!(
        "apps:\n  im.example.ios:\n    type: apns\n    topic: t\n    cert_file: {}\n",
        good.display()
    ));
    assert_eq!(code, 0, "{text}");
}

#[test]
fn missing_config_file_exits_64() {
    let out = herald(&["check-config", "--config", "/nonexistent/gateway.yaml"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/gateway.yaml"));
}

#[test]
fn version_prints_the_crate_version() {
    let out = herald(&["--version"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
}

#[tokio::test]
async fn send_prints_the_providers_answer() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let (fake, p8) = FakeApns::start_token_auth(&ca, APNS_TEAM_ID, APNS_KEY_ID).await;
    let good = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
    let bad = base64::engine::general_purpose::STANDARD.encode([8u8; 32]);
    fake.respond(&hex::encode([8u8; 32]), vec![Reply::bad_device_token()]);
    let yaml = Settings {
        apps: apns_app("im.example.ios", dir.path(), &fake, &ca, &p8, ""),
        ..Settings::default()
    }
    .yaml();
    let config = write_file(dir.path(), "gateway.yaml", yaml);
    let run = |pushkey: String, extra: Vec<&'static str>| {
        let config = config.clone();
        tokio::task::spawn_blocking(move || {
            let mut args = vec![
                "send",
                "--config",
                config.to_str().unwrap(),
                "--app-id",
                "im.example.ios",
                "--pushkey",
            ];
            args.push(&pushkey);
            args.extend(extra);
            herald(&args)
        })
    };
    let out = run(good.clone(), vec![]).await.unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "delivered");
    let out = run(bad, vec![]).await.unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stdout).contains("BadDeviceToken"));
    let out = run(good, vec!["--event-id-only"]).await.unwrap();
    assert_eq!(out.status.code(), Some(0));
    let last = fake.requests().pop().unwrap();
    assert!(
        last.body["aps"].get("alert").is_none(),
        "event_id_only carries no alert: {}",
        last.body
    );
    assert!(last.body["event_id"].as_str().unwrap().starts_with("$herald-test-"));
}

#[tokio::test]
async fn serve_logs_no_secrets_and_exits_0_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let (apns, p8) = FakeApns::start_token_auth(&ca, APNS_TEAM_ID, APNS_KEY_ID).await;
    let fcm = FakeFcm::start().await;
    let apps = apns_app("im.example.ios", dir.path(), &apns, &ca, &p8, "")
        + &fcm_app("im.example.android", dir.path(), &fcm, "");
    let yaml = Settings { apps, ..Settings::default() }
        .yaml()
        .replace("log: { level: debug }", "log: { level: trace, format: json }");
    let config = write_file(dir.path(), "gateway.yaml", yaml);

    let mut child = tokio::process::Command::new(HERALD)
        .args(["serve", "--config", config.to_str().unwrap()])
        .env_remove("RUST_LOG")
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // Drain stderr all along (trace logs would otherwise fill the pipe and block herald).
    let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let (serving_tx, serving_rx) = tokio::sync::oneshot::channel::<String>();
    let reader = {
        let log = log.clone();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        tokio::spawn(async move {
            let mut serving_tx = Some(serving_tx);
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains("herald is serving")
                    && let Some(tx) = serving_tx.take()
                {
                    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
                    let _ = tx.send(
                        v["fields"]["listen"].as_str().unwrap().trim_matches(['[', ']']).to_owned(),
                    );
                }
                let mut log = log.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        })
    };
    let addr = tokio::time::timeout(Duration::from_secs(20), serving_rx)
        .await
        .unwrap()
        .expect("herald exited early");

    let apns_key = base64::engine::general_purpose::STANDARD.encode([0x5a; 32]);
    let apns_hex = hex::encode([0x5a; 32]);
    let dead_apns = base64::engine::general_purpose::STANDARD.encode([0x5b; 32]);
    apns.respond(&hex::encode([0x5b; 32]), vec![Reply::unregistered()]);
    apns.respond(&apns_hex, vec![Reply::expired_provider_token()]);
    let fcm_key = "fcm-registration-token-that-must-stay-secret";
    fcm.respond(fcm_key, vec![FcmReply::unavailable(None)]);
    let body = message(
        "$secret",
        &[
            ("im.example.ios", &apns_key),
            ("im.example.ios", &dead_apns),
            ("im.example.android", fcm_key),
            ("nobody", "unknown-app-pushkey-secret"),
        ],
    );
    let url = format!("http://{addr}/_matrix/push/v1/notify");
    let reply = send(&client(), http::Method::POST, &url, body.to_string().into_bytes()).await;
    assert_eq!(reply.status, http::StatusCode::OK, "{:?}", reply.json);

    let pid = child.id().unwrap().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let status = tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .expect("herald stops after SIGTERM")
        .unwrap();
    reader.await.unwrap();
    let log = log.lock().unwrap().clone();
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(
        log.contains("push not delivered") || log.contains("retrying"),
        "debug logs were captured: {log}"
    );

    let mut secrets: Vec<String> =
        vec![apns_key, apns_hex, dead_apns, fcm_key.into(), "unknown-app-pushkey-secret".into()];
    secrets.extend(apns.jwts_seen());
    secrets.extend(fcm.requests().into_iter().filter_map(|r| r.bearer));
    let p8_body: String = p8.lines().filter(|l| !l.starts_with("-----")).collect();
    secrets.push(p8_body[..40].to_owned());
    let rsa =
        std::fs::read_to_string(crate::support::gateway::fixture("fcm-test-key.pem")).unwrap();
    secrets.push(rsa.lines().nth(1).unwrap().to_owned());
    assert!(secrets.len() >= 9, "JWTs and access tokens were seen: {secrets:?}");
    for secret in &secrets {
        assert!(
            !log.contains(secret.as_str()),
            "log contains a secret ({}…):\n{log}",
            &secret[..8]
        );
    }
}
