//! Self-tests of the loopback fakes in `support/`, driven by a raw hyper-util
//! client (TLS via hyper-rustls trusting only the test CA, HTTP/2-only for
//! APNs) and by gcp_auth for the Google token flow. They prove the fakes speak
//! the protocols before any gateway test relies on them.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
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
use crate::support::fake_unifiedpush::FakeDistributor;
use crate::support::fake_webpush::{
    DEFAULT_MAX_BODY, FakePushService, PushReply, Subscription, VAPID_SEC1_PEM, decrypt_aes128gcm,
    public_key_b64_of_sec1, sign_vapid_jwt, vapid_authorization, vapid_key,
};
use crate::support::server::{FakeServer, sign_es256_jwt, unix_now};
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

// ---------------------------------------------------------------------------
// Web Push service and UnifiedPush distributor

const VAPID_SUBJECT: &str = "mailto:ops@example.com";

/// `plaintext` encrypted for `sub` the way herald does it (web-push-native).
fn encrypt_for(sub: &Subscription, plaintext: &[u8]) -> Vec<u8> {
    let p256dh = URL_SAFE_NO_PAD.decode(&sub.p256dh).unwrap();
    let ua_public = p256::PublicKey::from_sec1_bytes(&p256dh).unwrap();
    let auth = web_push_native::Auth::clone_from_slice(&URL_SAFE_NO_PAD.decode(&sub.auth).unwrap());
    web_push_native::encrypt(plaintext.to_vec(), &ua_public, &auth).unwrap()
}

/// A VAPID `Authorization` value signed with `pem` for `aud`, valid for an hour.
fn vapid_for(pem: &str, public: &str, aud: &str) -> String {
    vapid_authorization(&sign_vapid_jwt(pem, aud, unix_now() + 3600, VAPID_SUBJECT), public)
}

fn webpush_request(endpoint: &str, authorization: &str, body: Vec<u8>) -> Request<Full<Bytes>> {
    Request::post(endpoint)
        .header("authorization", authorization)
        .header("ttl", "60")
        .header("urgency", "high")
        .header("topic", "room-1")
        .header("content-encoding", "aes128gcm")
        .header("content-type", "application/octet-stream")
        .body(Full::from(body))
        .unwrap()
}

#[tokio::test]
async fn webpush_decrypts_the_rfc8291_example() {
    // RFC 8291 Appendix A (also web-push-native's own test vector).
    let body = URL_SAFE_NO_PAD
        .decode(
            "DGv6ra1nlYgDCS1FRnbzlwAAEABBBP4z9KsN6nGRTbVYI_c7VJSPQTBtkgcy27mlmlMoZIIgDll6e3vCYLoc\
             InmYWAmS6TlzAC8wEqKK6PBru3jl7A_yl95bQpu6cVPTpK4Mqgkf1CXztLVBSt2Ks3oZwbuwXPXLWyouBWLV\
             WGNWQexSgSxsj_Qulcy4a-fN",
        )
        .unwrap();
    let auth = URL_SAFE_NO_PAD.decode("BTBZMqHH6r4Tts7J_aSIgg").unwrap();
    let ua_private = URL_SAFE_NO_PAD.decode("q1dXpw3UpT5VOmu_cf_v6ih07Aems3njxI-JWgLcM94").unwrap();
    let ua_secret = p256::SecretKey::from_slice(&ua_private).unwrap();

    let plaintext = decrypt_aes128gcm(&body, &ua_secret, &auth).unwrap();
    assert_eq!(plaintext, b"When I grow up, I want to be a watermelon");

    let mut tampered = body.clone();
    *tampered.last_mut().unwrap() ^= 1;
    assert!(decrypt_aes128gcm(&tampered, &ua_secret, &auth).is_err());
    assert!(decrypt_aes128gcm(&body, &ua_secret, &[0; 16]).is_err());
}

#[tokio::test]
async fn webpush_accepts_an_encrypted_vapid_signed_push_over_tls() {
    let ca = TestCa::new();
    let (pem, public) = vapid_key();
    assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"));
    let push = FakePushService::start(Some(&ca), &public, VAPID_SUBJECT).await;
    assert!(push.url().starts_with("https://127.0.0.1:"));
    let sub = push.subscribe();
    assert_eq!(sub.endpoint, format!("{}/push/{}", push.url(), sub.id));
    assert_eq!(URL_SAFE_NO_PAD.decode(&sub.p256dh).unwrap().len(), 65);
    assert_eq!(URL_SAFE_NO_PAD.decode(&sub.auth).unwrap().len(), 16);

    let client = h2_tls_client(&ca, None);
    let message = json!({ "event_id": "$e", "room_id": "!r:example.org" });
    let body = encrypt_for(&sub, message.to_string().as_bytes());
    let answer =
        send(&client, webpush_request(&sub.endpoint, &vapid_for(&pem, &public, &push.url()), body))
            .await
            .unwrap();
    assert_eq!(answer.status, StatusCode::CREATED);
    assert_eq!(answer.headers["location"], "/message/1");
    assert_eq!(answer.headers["ttl"], "60");

    let recorded = push.wait_for_requests(1, WAIT).await;
    let r = &recorded[0];
    assert_eq!(r.id, sub.id);
    assert_eq!(r.status, 201);
    assert_eq!(r.json(), Some(message));
    assert_eq!((r.ttl(), r.urgency(), r.topic()), (Some(60), Some("high"), Some("room-1")));
    assert_eq!(r.alpn.as_deref(), Some(&b"h2"[..]));
    let claims = r.claims.as_ref().unwrap();
    assert_eq!(claims["aud"], push.url());
    assert_eq!(claims["sub"], VAPID_SUBJECT);
    assert_eq!(push.max_in_flight(), 1);
    assert_eq!(push.in_flight(), 0);
}

#[tokio::test]
async fn webpush_refuses_bad_vapid_headers_and_bodies() {
    let (pem, public) = vapid_key();
    let push = FakePushService::start(None, &public, VAPID_SUBJECT).await;
    let sub = push.subscribe();
    let client = http_client();
    let good_auth = vapid_for(&pem, &public, &push.url());
    let body = || encrypt_for(&sub, b"{\"n\":1}");
    // A refusal must not use up a scripted reply.
    push.respond(&sub.id, vec![PushReply::status(500)]);

    let (other_pem, other_public) = vapid_key();
    let now = unix_now();
    let jwt = |aud: &str, exp: u64, subject: &str| sign_vapid_jwt(&pem, aud, exp, subject);
    let alg_none = sign_es256_jwt(
        &pem,
        &json!({ "typ": "JWT", "alg": "none" }),
        &json!({ "aud": push.url(), "exp": now + 60, "sub": VAPID_SUBJECT }),
    );
    // (what, Authorization, status, words of the refusal message)
    let bad_auths = [
        ("missing", String::new(), 401, "missing Authorization"),
        (
            "not vapid",
            format!("Bearer {}", jwt(&push.url(), now + 60, VAPID_SUBJECT)),
            401,
            "is not `vapid",
        ),
        ("wrong aud", vapid_for(&pem, &public, "http://127.0.0.1:1"), 401, "aud"),
        (
            "expired",
            vapid_authorization(&jwt(&push.url(), now - 1, VAPID_SUBJECT), &public),
            401,
            "exp has passed",
        ),
        (
            "too far ahead",
            vapid_authorization(&jwt(&push.url(), now + 25 * 3600, VAPID_SUBJECT), &public),
            401,
            "24 hours",
        ),
        (
            "wrong sub",
            vapid_authorization(&jwt(&push.url(), now + 60, "mailto:x@y"), &public),
            401,
            "sub",
        ),
        ("wrong k", vapid_for(&other_pem, &other_public, &push.url()), 403, "applicationServerKey"),
        ("bad signature", vapid_for(&other_pem, &public, &push.url()), 401, "signature"),
        ("alg none", vapid_authorization(&alg_none, &public), 401, "ES256"),
    ];
    for (what, authorization, status, words) in &bad_auths {
        let mut req = webpush_request(&sub.endpoint, authorization, body());
        if authorization.is_empty() {
            req.headers_mut().remove("authorization");
        }
        let answer = send(&client, req).await.unwrap();
        assert_eq!(answer.status.as_u16(), *status, "{what}: {:?}", answer.body);
        let error = answer.json();
        assert_eq!(error["code"], *status, "{what}");
        let message = error["message"].as_str().unwrap();
        assert!(message.contains(words), "{what}: {message}");
    }
    let claims = push.requests().last().unwrap().claims.clone();
    assert_eq!(claims, None, "claims are recorded only once the signature verified");

    let mut no_ttl = webpush_request(&sub.endpoint, &good_auth, body());
    no_ttl.headers_mut().remove("ttl");
    let mut bad_ttl = webpush_request(&sub.endpoint, &good_auth, body());
    bad_ttl.headers_mut().insert("ttl", "-1".parse().unwrap());
    let mut aesgcm = webpush_request(&sub.endpoint, &good_auth, body());
    aesgcm.headers_mut().insert("content-encoding", "aesgcm".parse().unwrap());
    let mut corrupted = body();
    *corrupted.last_mut().unwrap() ^= 0x55;
    let corrupted = webpush_request(&sub.endpoint, &good_auth, corrupted);
    for (what, req, status, words) in [
        ("no TTL", no_ttl, 400, "TTL"),
        ("negative TTL", bad_ttl, 400, "TTL"),
        ("aesgcm", aesgcm, 415, "aes128gcm"),
        ("corrupted ciphertext", corrupted, 400, "decrypt"),
    ] {
        let answer = send(&client, req).await.unwrap();
        assert_eq!(answer.status.as_u16(), status, "{what}: {:?}", answer.body);
        let message = answer.json()["message"].as_str().unwrap().to_owned();
        assert!(message.contains(words), "{what}: {message}");
    }

    push.set_max_body(200);
    let oversized = encrypt_for(&sub, &[b'x'; 300]);
    let answer =
        send(&client, webpush_request(&sub.endpoint, &good_auth, oversized)).await.unwrap();
    assert_eq!(answer.status, StatusCode::PAYLOAD_TOO_LARGE);
    push.set_max_body(DEFAULT_MAX_BODY);

    let unknown = format!("{}/push/no-such-id", push.url());
    let answer = send(&client, webpush_request(&unknown, &good_auth, body())).await.unwrap();
    assert_eq!(answer.status, StatusCode::NOT_FOUND);

    assert_eq!(push.pending_replies(), 1);
    assert_eq!(push.in_flight(), 0);
    assert_eq!(push.max_in_flight(), 0, "refused requests are never in flight");

    // The scripted reply is still there for the first valid push; then 201.
    let answer = send(&client, webpush_request(&sub.endpoint, &good_auth, body())).await.unwrap();
    assert_eq!(answer.status, StatusCode::INTERNAL_SERVER_ERROR);
    let answer = send(&client, webpush_request(&sub.endpoint, &good_auth, body())).await.unwrap();
    assert_eq!(answer.status, StatusCode::CREATED);

    push.unsubscribe(&sub.id);
    let answer = send(&client, webpush_request(&sub.endpoint, &good_auth, body())).await.unwrap();
    assert_eq!(answer.status, StatusCode::GONE);

    let recorded = push.requests();
    let statuses: Vec<u16> = recorded.iter().map(|r| r.status).collect();
    assert_eq!(
        statuses,
        [401, 401, 401, 401, 401, 401, 403, 401, 401, 400, 400, 415, 400, 413, 404, 500, 201, 410]
    );
    assert_eq!(recorded[2].claims.as_ref().unwrap()["aud"], "http://127.0.0.1:1");
    assert_eq!(recorded[12].plaintext, None, "corrupted body is not decrypted");
    assert_eq!(recorded[16].json(), Some(json!({ "n": 1 })));
}

#[tokio::test]
async fn webpush_scripted_replies_come_back_in_order() {
    let (pem, public) = vapid_key();
    let push = FakePushService::start(None, &public, VAPID_SUBJECT).await;
    let sub = push.subscribe();
    let other = push.subscribe();
    let client = http_client();
    let auth = vapid_for(&pem, &public, &push.url());
    push.respond(
        &sub.id,
        vec![
            PushReply::retry_after(429, 7),
            PushReply::status(404),
            PushReply::Delay(Duration::from_millis(20)),
            PushReply::Reset,
        ],
    );
    assert_eq!(push.pending_replies(), 4);
    let req = |s: &Subscription| webpush_request(&s.endpoint, &auth, encrypt_for(s, b"hi"));

    let answer = send(&client, req(&sub)).await.unwrap();
    assert_eq!(answer.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(answer.headers["retry-after"], "7");
    let answer = send(&client, req(&other)).await.unwrap();
    assert_eq!(answer.status, StatusCode::CREATED, "other subscriptions are not scripted");
    let answer = send(&client, req(&sub)).await.unwrap();
    assert_eq!(answer.status, StatusCode::NOT_FOUND);
    let answer = send(&client, req(&sub)).await.unwrap();
    assert_eq!(answer.status, StatusCode::CREATED);
    let err = send(&client, req(&sub)).await.err().expect("reset must fail the request");
    eprintln!("Web Push Reset -> {err:?}");
    let answer = send(&client, req(&sub)).await.unwrap();
    assert_eq!(answer.status, StatusCode::CREATED);

    let statuses: Vec<u16> = push.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [429, 201, 404, 201, 0, 201]);
    assert_eq!(push.pending_replies(), 0);
    push.clear_requests();
    assert_eq!(push.request_count(), 0);
}

#[tokio::test]
async fn webpush_hold_and_release_show_concurrent_requests() {
    let (pem, public) = vapid_key();
    let push = FakePushService::start(None, &public, VAPID_SUBJECT).await;
    let (a, b) = (push.subscribe(), push.subscribe());
    let client = http_client();
    let auth = vapid_for(&pem, &public, &push.url());
    let req = |s: &Subscription| webpush_request(&s.endpoint, &auth, encrypt_for(s, b"hi"));

    push.hold();
    let (first, second, ()) = tokio::join!(send(&client, req(&a)), send(&client, req(&b)), async {
        push.wait_for_in_flight(2, WAIT).await;
        assert_eq!(push.in_flight(), 2);
        assert_eq!(push.request_count(), 2, "held requests are already recorded");
        push.release();
    });
    assert_eq!(first.unwrap().status, StatusCode::CREATED);
    assert_eq!(second.unwrap().status, StatusCode::CREATED);
    assert_eq!(push.max_in_flight(), 2);
    assert_eq!(push.in_flight(), 0);

    // Released for good: later requests are not held.
    let answer = send(&client, req(&a)).await.unwrap();
    assert_eq!(answer.status, StatusCode::CREATED);
}

#[tokio::test]
async fn webpush_and_distributor_on_a_second_loopback_address() {
    let second: IpAddr = "127.0.0.2".parse().unwrap();
    let (pem, public) = vapid_key();
    let push = FakePushService::start_on(second, None, &public, VAPID_SUBJECT).await;
    assert!(push.url().starts_with("http://127.0.0.2:"));
    let sub = push.subscribe();
    assert!(sub.endpoint.starts_with("http://127.0.0.2:"));
    let client = http_client();

    let wrong_host = push.url().replace("127.0.0.2", "127.0.0.1");
    for (aud, status) in [(wrong_host, 401), (push.url(), 201)] {
        let auth = vapid_for(&pem, &public, &aud);
        let answer = send(&client, webpush_request(&sub.endpoint, &auth, encrypt_for(&sub, b"x")))
            .await
            .unwrap();
        assert_eq!(answer.status.as_u16(), status, "aud {aud}");
    }

    let up = FakeDistributor::start_on(second, None).await;
    assert!(up.endpoint("t").starts_with("http://127.0.0.2:"));
}

#[test]
fn vapid_key_helpers() {
    let (pem, public) = vapid_key();
    assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"));
    let point = URL_SAFE_NO_PAD.decode(&public).unwrap();
    assert_eq!((point.len(), point[0]), (65, 0x04));

    assert!(VAPID_SEC1_PEM.starts_with("-----BEGIN EC PRIVATE KEY-----"));
    let sec1_public = URL_SAFE_NO_PAD.decode(public_key_b64_of_sec1(VAPID_SEC1_PEM)).unwrap();
    assert_eq!((sec1_public.len(), sec1_public[0]), (65, 0x04));
}

fn up_request(endpoint: &str, body: impl Into<Bytes>) -> Request<Full<Bytes>> {
    Request::post(endpoint)
        .header("content-type", "application/json")
        .body(Full::new(body.into()))
        .unwrap()
}

#[tokio::test]
async fn distributor_records_bodies_limits_and_unsubscribes() {
    let ca = TestCa::new();
    let up = FakeDistributor::start(Some(&ca)).await;
    assert!(up.url().starts_with("https://127.0.0.1:"));
    let endpoint = up.endpoint("topic-1");
    assert_eq!(endpoint, format!("{}/up/topic-1", up.url()));
    let client = h2_tls_client(&ca, None);
    let message = json!({ "notification": { "event_id": "$e", "counts": { "unread": 2 } } });

    let answer = send(&client, up_request(&endpoint, message.to_string())).await.unwrap();
    assert_eq!(answer.status, StatusCode::CREATED);
    // Any id is a valid topic by default.
    let answer =
        send(&client, up_request(&format!("{}/up/anything", up.url()), "{}")).await.unwrap();
    assert_eq!(answer.status, StatusCode::CREATED);

    up.set_max_body(64);
    let answer = send(&client, up_request(&endpoint, vec![b'x'; 65])).await.unwrap();
    assert_eq!(answer.status, StatusCode::PAYLOAD_TOO_LARGE);
    up.set_max_body(DEFAULT_MAX_BODY);

    up.respond("topic-1", vec![PushReply::retry_after(503, 3)]);
    let answer = send(&client, up_request(&endpoint, "{}")).await.unwrap();
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(answer.headers["retry-after"], "3");
    assert_eq!(up.pending_replies(), 0);

    up.forget_unknown(true);
    let answer =
        send(&client, up_request(&format!("{}/up/stranger", up.url()), "{}")).await.unwrap();
    assert_eq!(answer.status, StatusCode::NOT_FOUND);

    up.unsubscribe("topic-1");
    let answer = send(&client, up_request(&endpoint, "{}")).await.unwrap();
    assert_eq!(answer.status, StatusCode::GONE);

    let recorded = up.wait_for_requests(6, WAIT).await;
    let statuses: Vec<u16> = recorded.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [201, 201, 413, 503, 404, 410]);
    assert_eq!(recorded[0].id, "topic-1");
    assert_eq!(recorded[0].json(), Some(message));
    assert_eq!(recorded[0].header("content-type"), Some("application/json"));
    assert_eq!(recorded[0].alpn.as_deref(), Some(&b"h2"[..]));
    assert_eq!(recorded[2].body.len(), 65);
    assert_eq!(recorded[2].json(), None);
}

#[tokio::test]
async fn distributor_hold_and_release_show_concurrent_requests() {
    let up = FakeDistributor::start(None).await;
    let client = http_client();
    up.hold();
    let (first, second, ()) = tokio::join!(
        send(&client, up_request(&up.endpoint("a"), "{}")),
        send(&client, up_request(&up.endpoint("b"), "{}")),
        async {
            up.wait_for_in_flight(2, WAIT).await;
            up.release();
        }
    );
    assert_eq!(first.unwrap().status, StatusCode::CREATED);
    assert_eq!(second.unwrap().status, StatusCode::CREATED);
    assert_eq!(up.max_in_flight(), 2);
    assert_eq!(up.in_flight(), 0);
}
