//! The configs in deploy/ pass `herald check-config` once the secret files they name exist:
//! deploy/gateway.production.yaml, the `gateway.yaml` of the Kubernetes ConfigMap and
//! deploy/compose/gateway.yaml; a broken copy of each fails with exit 64. The ConfigMap's secret
//! paths are files of the Secret volumes the Deployment mounts. (.ci/run validates the
//! Kubernetes manifests themselves with kubernetes-validate.)

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::cli::herald;
use crate::support::fake_fcm::FakeFcm;
use crate::support::tls::{TestCa, write_file};

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy").join(path)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn yaml(path: &Path) -> Value {
    serde_saphyr::from_str(&read(path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The `gateway.yaml` key of deploy/kubernetes/configmap.yaml.
fn configmap_gateway_yaml() -> String {
    let config_map = yaml(&deploy("kubernetes/configmap.yaml"));
    config_map["data"]["gateway.yaml"].as_str().expect("data.gateway.yaml").to_owned()
}

/// `(key, path)` for every string value of `config` that is a path under `dir`.
fn files_under(config: &Value, key: &str, dir: &Path, found: &mut Vec<(String, PathBuf)>) {
    match config {
        Value::Object(map) => map.iter().for_each(|(k, v)| files_under(v, k, dir, found)),
        Value::Array(items) => items.iter().for_each(|v| files_under(v, key, dir, found)),
        Value::String(s) if Path::new(s).starts_with(dir) => {
            found.push((key.to_owned(), PathBuf::from(s)));
        }
        _ => {}
    }
}

/// Points `/secrets/` of `config` into a temporary directory, writes a test file there for each
/// secret it names, and checks the result (exit 0 and the OK line) and a copy with an unknown
/// key (exit 64). Returns the config keys of the secrets.
async fn check_with_secrets(what: &str, config: &str) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets");
    let config = config.replace("/secrets/", &format!("{}/", secrets.display()));
    let parsed: Value =
        serde_saphyr::from_str(&config).unwrap_or_else(|e| panic!("{what} is not YAML: {e}"));
    let mut files = Vec::new();
    files_under(&parsed, "", &secrets, &mut files);

    let ca = TestCa::new();
    let fcm = FakeFcm::start().await;
    for (key, path) in &files {
        let contents = match key.as_str() {
            "key_file" | "vapid_private_key_file" => {
                rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
                    .unwrap()
                    .serialize_pem()
            }
            "cert_file" => {
                let (cert, key) = ca.issue_client_cert("deploy");
                format!("{cert}{key}")
            }
            "service_account_file" => fcm.service_account_json("example-project"),
            "ca_file" | "redis_ca_file" => ca.cert_pem(),
            "redis_password_file" => "test-password\n".to_owned(),
            other => panic!("{what}: no test file for `{other}` ({})", path.display()),
        };
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, contents).unwrap();
    }

    let good = write_file(dir.path(), "gateway.yaml", &config);
    let (code, stdout, stderr) = check_config(good.clone()).await;
    assert_eq!(code, 0, "{what}: {stderr}");
    let ok = format!("{}: OK (", good.display());
    assert!(stdout.starts_with(&ok), "{what}: {stdout}");
    if files.iter().any(|(key, _)| key == "vapid_private_key_file") {
        // The web client's applicationServerKey: base64url of a 65-byte uncompressed point.
        let printed =
            stdout.lines().find_map(|l| l.split_once(": VAPID public key ")).map(|(_, k)| k);
        assert!(printed.is_some_and(|k| k.len() == 87 && k.starts_with('B')), "{what}: {stdout}");
    }

    let broken = write_file(dir.path(), "broken.yaml", format!("{config}\nnot_a_herald_key: 1\n"));
    let (code, _, stderr) = check_config(broken).await;
    assert_eq!(code, 64, "{what} with an unknown key: {stderr}");
    assert!(stderr.contains("not_a_herald_key"), "{what}: {stderr}");

    files.into_iter().map(|(key, _)| key).collect()
}

/// `herald check-config --config PATH`: exit code, stdout, stderr. Off the runtime's thread, so
/// the fake FCM keeps answering should the check ever call its token endpoint.
async fn check_config(path: PathBuf) -> (i32, String, String) {
    let out = tokio::task::spawn_blocking(move || {
        herald(&["check-config", "--config", path.to_str().unwrap()])
    })
    .await
    .unwrap();
    (
        out.status.code().expect("exit code"),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn production_example_is_valid() {
    let keys =
        check_with_secrets("gateway.production.yaml", &read(&deploy("gateway.production.yaml")))
            .await;
    for key in ["key_file", "cert_file", "service_account_file", "vapid_private_key_file"] {
        assert!(keys.iter().any(|k| k == key), "{key} is exercised: {keys:?}");
    }
}

#[tokio::test]
async fn kubernetes_configmap_is_valid() {
    let mut keys =
        check_with_secrets("the ConfigMap's gateway.yaml", &configmap_gateway_yaml()).await;
    keys.sort();
    assert_eq!(keys, ["key_file", "service_account_file"]);
}

#[tokio::test]
async fn compose_config_is_valid() {
    let keys =
        check_with_secrets("compose/gateway.yaml", &read(&deploy("compose/gateway.yaml"))).await;
    assert!(keys.is_empty(), "the compose config needs no credentials: {keys:?}");
}

#[test]
fn kubernetes_mounts_match_the_configmap() {
    let deployment = yaml(&deploy("kubernetes/deployment.yaml"));
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let volume = |path: &Path| -> &Value {
        let mount = container["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["mountPath"].as_str().map(Path::new) == Some(path))
            .unwrap_or_else(|| panic!("nothing is mounted at {}", path.display()));
        assert_eq!(mount["readOnly"], true, "{} is mounted read-only", path.display());
        pod["volumes"].as_array().unwrap().iter().find(|v| v["name"] == mount["name"]).unwrap()
    };

    // HERALD_CONFIG is the `gateway.yaml` key of the mounted ConfigMap.
    let config_path = container["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "HERALD_CONFIG")
        .and_then(|e| e["value"].as_str())
        .map(PathBuf::from)
        .expect("HERALD_CONFIG is set");
    let config_map = yaml(&deploy("kubernetes/configmap.yaml"));
    assert_eq!(
        volume(config_path.parent().unwrap())["configMap"]["name"],
        config_map["metadata"]["name"]
    );
    let key = config_path.file_name().unwrap().to_str().unwrap();
    assert!(config_map["data"][key].is_string(), "the ConfigMap has no {key}");

    // Every secret file the config names is a key of the Secret mounted at its directory.
    let examples: Vec<Value> =
        serde_saphyr::from_multiple(&read(&deploy("kubernetes/secrets.example.yaml"))).unwrap();
    let config: Value = serde_saphyr::from_str(&configmap_gateway_yaml()).unwrap();
    let mut files = Vec::new();
    files_under(&config, "", Path::new("/secrets"), &mut files);
    assert!(!files.is_empty());
    for (_, path) in files {
        let secret = volume(path.parent().unwrap())["secret"]["secretName"].clone();
        let example = examples
            .iter()
            .find(|s| s["metadata"]["name"] == secret)
            .unwrap_or_else(|| panic!("secrets.example.yaml has no Secret {secret}"));
        let file = path.file_name().unwrap().to_str().unwrap();
        assert!(example["stringData"][file].is_string(), "Secret {secret} has no key {file}");
    }

    // The preStop sleep and herald's drain fit in the termination grace period.
    let grace = Duration::from_secs(pod["terminationGracePeriodSeconds"].as_u64().unwrap());
    let pre_stop = Duration::from_secs(
        container["lifecycle"]["preStop"]["sleep"]["seconds"].as_u64().unwrap(),
    );
    let drain = humantime::parse_duration(config["shutdown_grace"].as_str().unwrap()).unwrap();
    assert!(pre_stop + drain < grace, "{pre_stop:?} + {drain:?} must stay below {grace:?}");
}
