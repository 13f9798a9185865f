//! Self-tests of the loopback fakes in `support/`, driven by a raw hyper-util
//! client (TLS via hyper-rustls trusting only the test CA, HTTP/2-only for
//! APNs) and by gcp_auth for the Google token flow. They prove the fakes speak
//! the protocols before any gateway test relies on them.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

use crate::support::fake_apns::{FakeApns, Reply, sign_provider_token};
use crate::support::fake_fcm::{FCM_SCOPE, FakeFcm, FcmReply, JWT_BEARER_GRANT, sign_assertion};
use crate::support::server::{FakeServer, unix_now};
use crate::support::tls::TestCa;

const TEAM_ID: &str = "TEAM123456";
const KEY_ID: &str = "KEY1234567";
const TOPIC: &str = "org.example.app";
const WAIT: Duration = Duration::from_secs(5);

type HttpsClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;
type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// An HTTP/2-only TLS client that trusts only the test CA.
fn h2_tls_client(ca: &TestCa, client_cert: Option<(&str, &str)>) -> HttpsClient {
    let https = HttpsConnectorBuilder::new()
        .with_tls_config(ca.client_config(client_cert))
        .https_only()
        .enable_http2()
        .build();
    Client::builder(TokioExecutor::new()).http2_only(true).build(https)
}

fn http_client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }
}

async fn send<C>(
    client: &Client<C, Full<Bytes>>,
    req: Request<Full<Bytes>>,
) -> Result<Answer, hyper_util::client::legacy::Error>
where
    C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
{
    let response = client.request(req).await?;
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("read body").to_bytes();
    Ok(Answer { status: parts.status, headers: parts.headers, body })
}

fn apns_request(base: &str, token: &str, jwt: Option<&str>) -> Request<Full<Bytes>> {
    let mut builder = Request::post(format!("{base}/3/device/{token}"))
        .header("apns-topic", TOPIC)
        .header("apns-push-type", "alert")
        .header("apns-priority", "10")
        .header("apns-expiration", "0");
    if let Some(jwt) = jwt {
        builder = builder.header("authorization", format!("bearer {jwt}"));
    }
    builder.body(Full::from(r#"{"aps":{"alert":"hi"}}"#)).unwrap()
}

#[tokio::test]
async fn apns_token_auth_accepts_a_signed_jwt_and_records_it() {
    let ca = TestCa::new();
    let (apns, p8) = FakeApns::start_token_auth(&ca, TEAM_ID, KEY_ID).await;
    assert!(p8.starts_with("-----BEGIN PRIVATE KEY-----"));
    assert!(apns.url().starts_with("https://127.0.0.1:"));
    let client = h2_tls_client(&ca, None);
    let jwt = sign_provider_token(&p8, TEAM_ID, KEY_ID, unix_now());

    let answer = send(&client, apns_request(&apns.url(), "aabbcc", Some(&jwt))).await.unwrap();
    assert_eq!(answer.status, StatusCode::OK);
    assert!(answer.headers.contains_key("apns-id"));
    assert!(answer.body.is_empty());

    let recorded = apns.wait_for_requests(1, WAIT).await;
    assert_eq!(recorded.len(), 1);
    let r = &recorded[0];
    assert_eq!(r.token, "aabbcc");
    assert_eq!(r.version, http::Version::HTTP_2);
    assert_eq!(r.jwt.as_deref(), Some(jwt.as_str()));
    assert_eq!(r.header("apns-topic"), Some(TOPIC));
    assert_eq!(r.header("apns-push-type"), Some("alert"));
    assert_eq!(r.body["aps"]["alert"], "hi");
    assert_eq!(r.status, 200);
    assert_eq!(apns.jwts_seen(), vec![jwt]);

    // A caller-chosen apns-id is echoed back.
    let mut req = apns_request(&apns.url(), "aabbcc", r.jwt.as_deref());
    let id = "123E4567-E89B-12D3-A456-4266554400A0";
    req.headers_mut().insert("apns-id", id.parse().unwrap());
    let answer = send(&client, req).await.unwrap();
    assert_eq!(answer.headers["apns-id"], id);
}

#[tokio::test]
async fn apns_token_auth_rejects_missing_and_bad_tokens() {
    let ca = TestCa::new();
    let (apns, p8) = FakeApns::start_token_auth(&ca, TEAM_ID, KEY_ID).await;
    let client = h2_tls_client(&ca, None);
    let reason = |a: &Answer| a.json()["reason"].as_str().unwrap().to_owned();

    let answer = send(&client, apns_request(&apns.url(), "aa", None)).await.unwrap();
    assert_eq!(answer.status, StatusCode::FORBIDDEN);
    assert_eq!(reason(&answer), "MissingProviderToken");

    // Signed by a different key.
    let other = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let forged = sign_provider_token(&other.serialize_pem(), TEAM_ID, KEY_ID, unix_now());
    let answer = send(&client, apns_request(&apns.url(), "aa", Some(&forged))).await.unwrap();
    assert_eq!(answer.status, StatusCode::FORBIDDEN);
    assert_eq!(reason(&answer), "InvalidProviderToken");

    // Right key, wrong kid / team.
    for jwt in [
        sign_provider_token(&p8, TEAM_ID, "OTHERKEYID", unix_now()),
        sign_provider_token(&p8, "OTHERTEAM", KEY_ID, unix_now()),
    ] {
        let answer = send(&client, apns_request(&apns.url(), "aa", Some(&jwt))).await.unwrap();
        assert_eq!(reason(&answer), "InvalidProviderToken");
    }

    // Older than an hour.
    let stale = sign_provider_token(&p8, TEAM_ID, KEY_ID, unix_now() - 3700);
    let answer = send(&client, apns_request(&apns.url(), "aa", Some(&stale))).await.unwrap();
    assert_eq!(reason(&answer), "ExpiredProviderToken");

    // Valid token but no apns-topic.
    let jwt = sign_provider_token(&p8, TEAM_ID, KEY_ID, unix_now());
    let mut req = apns_request(&apns.url(), "aa", Some(&jwt));
    req.headers_mut().remove("apns-topic");
    let answer = send(&client, req).await.unwrap();
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert_eq!(reason(&answer), "MissingTopic");

    // Bad priority.
    let mut req = apns_request(&apns.url(), "aa", Some(&jwt));
    req.headers_mut().insert("apns-priority", "7".parse().unwrap());
    let answer = send(&client, req).await.unwrap();
    assert_eq!(reason(&answer), "BadPriority");

    assert_eq!(apns.request_count(), 7, "rejected requests are recorded too");
}

#[tokio::test]
async fn apns_scripted_replies_come_back_in_order() {
    let ca = TestCa::new();
    let (apns, p8) = FakeApns::start_token_auth(&ca, TEAM_ID, KEY_ID).await;
    let client = h2_tls_client(&ca, None);
    let jwt = sign_provider_token(&p8, TEAM_ID, KEY_ID, unix_now());
    apns.respond(
        "dead",
        vec![
            Reply::status(410, "Unregistered"),
            Reply::too_many_requests(Some(7)),
            Reply::Delay(Duration::from_millis(300)),
        ],
    );

    let answer = send(&client, apns_request(&apns.url(), "dead", Some(&jwt))).await.unwrap();
    assert_eq!(answer.status, StatusCode::GONE);
    let body = answer.json();
    assert_eq!(body["reason"], "Unregistered");
    assert!(body["timestamp"].as_u64().unwrap() > 1_600_000_000_000);

    let answer = send(&client, apns_request(&apns.url(), "dead", Some(&jwt))).await.unwrap();
    assert_eq!(answer.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(answer.headers["retry-after"], "7");

    let started = Instant::now();
    let answer = send(&client, apns_request(&apns.url(), "dead", Some(&jwt))).await.unwrap();
    assert_eq!(answer.status, StatusCode::OK);
    assert!(started.elapsed() >= Duration::from_millis(300));

    // Script used up, other tokens unaffected.
    for token in ["dead", "alive"] {
        let answer = send(&client, apns_request(&apns.url(), token, Some(&jwt))).await.unwrap();
        assert_eq!(answer.status, StatusCode::OK);
    }
    let statuses: Vec<u16> = apns.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [410, 429, 200, 200, 200]);
    assert_eq!(apns.pending_replies(), 0);
}

#[tokio::test]
async fn apns_reset_reset_connection_and_goaway() {
    let ca = TestCa::new();
    let (apns, p8) = FakeApns::start_token_auth(&ca, TEAM_ID, KEY_ID).await;
    let client = h2_tls_client(&ca, None);
    let jwt = sign_provider_token(&p8, TEAM_ID, KEY_ID, unix_now());
    let url = apns.url();

    // RST_STREAM: this request fails, the connection survives.
    apns.respond("tok", vec![Reply::Reset]);
    let err = send(&client, apns_request(&url, "tok", Some(&jwt)))
        .await
        .err()
        .expect("stream reset must fail the request");
    eprintln!("Reset -> {err:?}");
    let answer = send(&client, apns_request(&url, "tok", Some(&jwt))).await.unwrap();
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(apns.server().connections_accepted(), 1);

    // TCP RST: this request fails; the next one needs a new connection.
    apns.respond("tok", vec![Reply::ResetConnection]);
    let err = send(&client, apns_request(&url, "tok", Some(&jwt)))
        .await
        .err()
        .expect("connection reset must fail the request");
    eprintln!("ResetConnection -> {err:?}");
    let answer = send(&client, apns_request(&url, "tok", Some(&jwt))).await.unwrap();
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(apns.server().connections_accepted(), 2);

    // GOAWAY: this request succeeds; later ones go over a new connection.
    apns.respond("tok", vec![Reply::Goaway]);
    let answer = send(&client, apns_request(&url, "tok", Some(&jwt))).await.unwrap();
    assert_eq!(answer.status, StatusCode::OK);
    let answer = send(&client, apns_request(&url, "tok", Some(&jwt))).await.unwrap();
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(apns.server().connections_accepted(), 3);

    let conn_ids: Vec<u64> = apns.requests().iter().map(|r| r.conn_id).collect();
    assert_eq!(conn_ids, [1, 1, 1, 2, 2, 3]);
}

#[tokio::test]
async fn apns_cert_auth_requires_a_client_certificate() {
    let ca = TestCa::new();
    let apns = FakeApns::start_cert_auth(&ca).await;

    let anonymous = h2_tls_client(&ca, None);
    let err = send(&anonymous, apns_request(&apns.url(), "tok", None))
        .await
        .err()
        .expect("no client cert must fail");
    eprintln!("no client cert -> {err:?}");
    assert_eq!(apns.request_count(), 0);

    let (cert_pem, key_pem) = ca.issue_client_cert("org.example.app push");
    assert!(key_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
    let client = h2_tls_client(&ca, Some((&cert_pem, &key_pem)));
    let answer = send(&client, apns_request(&apns.url(), "tok", None)).await.unwrap();
    assert_eq!(answer.status, StatusCode::OK);
    let recorded = apns.requests();
    assert_eq!(recorded.len(), 1);
    assert_eq!(recorded[0].jwt, None);
    assert!(apns.server().tls_handshake_failures() >= 1);

    // A certificate from another CA is refused too.
    let stranger = TestCa::new();
    let (cert_pem, key_pem) = stranger.issue_client_cert("intruder");
    let client = h2_tls_client(&ca, Some((&cert_pem, &key_pem)));
    assert!(send(&client, apns_request(&apns.url(), "tok", None)).await.is_err());
    assert_eq!(apns.request_count(), 1);
}

fn form_post(uri: &str, form: &str) -> Request<Full<Bytes>> {
    Request::post(uri)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Full::from(form.to_owned()))
        .unwrap()
}

fn fcm_send(base: &str, project: &str, access_token: &str, message: Value) -> Request<Full<Bytes>> {
    Request::post(format!("{base}/v1/projects/{project}/messages:send"))
        .header("authorization", format!("Bearer {access_token}"))
        .header("content-type", "application/json")
        .body(Full::from(json!({ "message": message }).to_string()))
        .unwrap()
}

#[tokio::test]
async fn fcm_token_flow_send_scripted_errors_and_revocation() {
    let fcm = FakeFcm::start().await;
    let client = http_client();
    let sa: Value = serde_json::from_str(&fcm.service_account_json("proj-1")).unwrap();
    assert_eq!(sa["type"], "service_account");
    assert_eq!(sa["token_uri"], fcm.token_uri());
    let email = sa["client_email"].as_str().unwrap();

    // Bad signature -> invalid_grant.
    let mut forged = sign_assertion(email, &fcm.token_uri(), FCM_SCOPE, unix_now());
    forged.replace_range(forged.len() - 6.., "AAAAAA");
    let answer = send(
        &client,
        form_post(&fcm.token_uri(), &format!("grant_type={JWT_BEARER_GRANT}&assertion={forged}")),
    )
    .await
    .unwrap();
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert_eq!(answer.json()["error"], "invalid_grant");

    // Good assertion (grant type percent-encoded, as real clients send it).
    let assertion = sign_assertion(email, &fcm.token_uri(), FCM_SCOPE, unix_now());
    let answer = send(
        &client,
        form_post(
            &fcm.token_uri(),
            &format!(
                "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion={assertion}"
            ),
        ),
    )
    .await
    .unwrap();
    assert_eq!(answer.status, StatusCode::OK);
    let token = answer.json();
    assert_eq!(token["expires_in"], 3600);
    assert_eq!(token["token_type"], "Bearer");
    let access = token["access_token"].as_str().unwrap().to_owned();
    assert_eq!(fcm.tokens_issued(), 1);

    let message = json!({ "token": "reg-1", "data": { "event_id": "$e" } });
    let answer =
        send(&client, fcm_send(&fcm.url(), "proj-1", &access, message.clone())).await.unwrap();
    assert_eq!(answer.status, StatusCode::OK);
    assert!(answer.json()["name"].as_str().unwrap().starts_with("projects/proj-1/messages/0:"));

    // Scripted errors carry Google's error shape.
    fcm.respond(
        "reg-1",
        vec![FcmReply::unregistered(), FcmReply::invalid_token(), FcmReply::unavailable(Some(30))],
    );
    let answer =
        send(&client, fcm_send(&fcm.url(), "proj-1", &access, message.clone())).await.unwrap();
    assert_eq!(answer.status, StatusCode::NOT_FOUND);
    let error = &answer.json()["error"];
    assert_eq!(error["status"], "NOT_FOUND");
    assert_eq!(error["details"][0]["@type"], "type.googleapis.com/google.firebase.fcm.v1.FcmError");
    assert_eq!(error["details"][0]["errorCode"], "UNREGISTERED");

    let answer =
        send(&client, fcm_send(&fcm.url(), "proj-1", &access, message.clone())).await.unwrap();
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    let error = &answer.json()["error"];
    assert_eq!(error["details"][1]["fieldViolations"][0]["field"], "message.token");

    let answer =
        send(&client, fcm_send(&fcm.url(), "proj-1", &access, message.clone())).await.unwrap();
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(answer.headers["retry-after"], "30");

    // Non-string data values are rejected the way FCM does.
    let answer = send(
        &client,
        fcm_send(&fcm.url(), "proj-1", &access, json!({ "token": "reg-1", "data": { "n": 1 } })),
    )
    .await
    .unwrap();
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        answer.json()["error"]["details"][0]["fieldViolations"][0]["field"],
        "message.data[0].value"
    );

    // Wrong project -> 403.
    let answer =
        send(&client, fcm_send(&fcm.url(), "proj-2", &access, message.clone())).await.unwrap();
    assert_eq!(answer.status, StatusCode::FORBIDDEN);

    // Revoked token -> 401 UNAUTHENTICATED.
    fcm.revoke_tokens();
    let answer =
        send(&client, fcm_send(&fcm.url(), "proj-1", &access, message.clone())).await.unwrap();
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert_eq!(answer.json()["error"]["status"], "UNAUTHENTICATED");

    let recorded = fcm.wait_for_requests(7, WAIT).await;
    let statuses: Vec<u16> = recorded.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [200, 404, 400, 503, 400, 403, 401]);
    assert_eq!(recorded[0].project_id, "proj-1");
    assert_eq!(recorded[0].message_token(), Some("reg-1"));
    assert_eq!(recorded[0].bearer.as_deref(), Some(access.as_str()));
    assert_eq!(recorded[0].message()["data"]["event_id"], "$e");
}

#[tokio::test]
async fn fcm_token_endpoint_works_with_gcp_auth_and_h2c() {
    use gcp_auth::TokenProvider;

    let fcm = FakeFcm::start().await;
    fcm.fail_token_endpoint(1); // gcp_auth retries by itself
    let account = gcp_auth::CustomServiceAccount::from_json(&fcm.service_account_json("proj-9"))
        .expect("service account JSON accepted by gcp_auth");
    let token = account.token(&[FCM_SCOPE]).await.expect("token from fake");
    assert_eq!(fcm.token_requests(), 2);
    assert_eq!(fcm.tokens_issued(), 1);

    // h2c prior knowledge works on the plain-HTTP fake too.
    let h2c: HttpClient = Client::builder(TokioExecutor::new()).http2_only(true).build_http();
    let answer =
        send(&h2c, fcm_send(&fcm.url(), "proj-9", token.as_str(), json!({ "token": "reg-9" })))
            .await
            .unwrap();
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(fcm.requests()[0].version, http::Version::HTTP_2);

    // Delay and connection reset.
    fcm.respond("reg-9", vec![FcmReply::Delay(Duration::from_millis(200)), FcmReply::Reset]);
    let client = http_client();
    let started = Instant::now();
    let answer =
        send(&client, fcm_send(&fcm.url(), "proj-9", token.as_str(), json!({ "token": "reg-9" })))
            .await
            .unwrap();
    assert_eq!(answer.status, StatusCode::OK);
    assert!(started.elapsed() >= Duration::from_millis(200));
    let err =
        send(&client, fcm_send(&fcm.url(), "proj-9", token.as_str(), json!({ "token": "reg-9" })))
            .await
            .err()
            .expect("reset must fail the request");
    eprintln!("FCM Reset -> {err:?}");
}

#[tokio::test]
async fn raw_reset_server_resets_connections() {
    let server = FakeServer::start_raw_reset().await;
    let client = http_client();
    let req = Request::get(format!("{}/", server.url())).body(Full::default()).unwrap();
    let err = send(&client, req).await.err().expect("reset server must fail");
    eprintln!("raw reset -> {err:?}");
    assert_eq!(server.connections_accepted(), 1);
}
