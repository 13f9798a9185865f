//! Accounts and profiles: versions, register (`m.login.dummy`), login (password), logout,
//! whoami, capabilities, display names, filters and global account data.
//!
//! Passwords are stored as PBKDF2-HMAC-SHA256 hashes with a random salt; neither passwords
//! nor access tokens are ever logged.

use std::num::NonZeroU32;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD_NO_PAD as B64;
use ring::pbkdf2;
use serde_json::{Value, json};

use super::error::{ApiResult, MatrixError};
use super::{Auth, JsonObject, Path, required_str};
use crate::homeserver::{Homeserver, random_id, rooms, store};

const PBKDF2_ROUNDS: u32 = 10_000;

/// The spec versions this subset follows.
pub async fn versions() -> Json<Value> {
    Json(json!({ "versions": ["v1.1", "v1.2", "v1.3", "v1.4", "v1.5", "v1.6", "v1.7", "v1.8",
        "v1.9", "v1.10", "v1.11", "v1.12", "v1.13", "v1.14", "v1.15", "v1.16"] }))
}

pub async fn capabilities(_auth: Auth) -> Json<Value> {
    Json(json!({ "capabilities": {
        "m.change_password": { "enabled": false },
        "m.room_versions": { "default": rooms::ROOM_VERSION, "available": { rooms::ROOM_VERSION: "stable" } },
    }}))
}

pub async fn login_flows() -> Json<Value> {
    Json(json!({ "flows": [{ "type": "m.login.password" }] }))
}

fn hash_password(password: &str) -> String {
    let salt: [u8; 16] = rand::random();
    let mut out = [0u8; 32];
    let rounds = NonZeroU32::new(PBKDF2_ROUNDS).unwrap_or(NonZeroU32::MIN);
    pbkdf2::derive(pbkdf2::PBKDF2_HMAC_SHA256, rounds, &salt, password.as_bytes(), &mut out);
    format!("pbkdf2-sha256${PBKDF2_ROUNDS}${}${}", B64.encode(salt), B64.encode(out))
}

fn verify_password(stored: &str, password: &str) -> bool {
    let mut parts = stored.split('$');
    let (Some("pbkdf2-sha256"), Some(rounds), Some(salt), Some(hash)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let (Some(rounds), Ok(salt), Ok(hash)) =
        (rounds.parse().ok().and_then(NonZeroU32::new), B64.decode(salt), B64.decode(hash))
    else {
        return false;
    };
    pbkdf2::verify(pbkdf2::PBKDF2_HMAC_SHA256, rounds, &salt, password.as_bytes(), &hash).is_ok()
}

fn valid_localpart(localpart: &str) -> bool {
    !localpart.is_empty()
        && localpart.len() <= 200
        && localpart.bytes().all(
            |b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'=' | b'-' | b'/' | b'+'),
        )
}

/// A new device and access token for the user.
fn new_session(
    user_id: String,
    device_id: Option<&str>,
) -> impl FnOnce(&Homeserver, &mut rusqlite::Connection) -> ApiResult<Value> + Send + 'static {
    let device_id = device_id
        .map_or_else(|| random_id(8).to_uppercase().replace(['-', '_'], "X"), str::to_owned);
    move |hs, conn| {
        let token = format!("syt_{}", random_id(24));
        store::add_device(conn, &user_id, &device_id, &token)?;
        Ok(json!({
            "user_id": user_id, "access_token": token, "device_id": device_id,
            "home_server": hs.server_name(),
        }))
    }
}

/// `POST /register`: `m.login.dummy` (or no) auth; answers 401 with the flows first when the
/// request has no `auth`, as user-interactive auth asks.
pub async fn register(
    State(hs): State<Homeserver>,
    JsonObject(body): JsonObject,
) -> ApiResult<(StatusCode, Json<Value>)> {
    if body.get("auth").is_none() {
        return Ok((
            StatusCode::UNAUTHORIZED,
            Json(json!({
                "flows": [{ "stages": ["m.login.dummy"] }], "params": {}, "session": random_id(12),
            })),
        ));
    }
    let localpart = match body.get("username") {
        Some(Value::String(s)) => s.to_lowercase(),
        None | Some(Value::Null) => random_id(9).to_lowercase().replace(['-', '_'], "x"),
        Some(_) => return Err(MatrixError::bad_json("`username` must be a string")),
    };
    if !valid_localpart(&localpart) {
        return Err(MatrixError::bad_request(
            "M_INVALID_USERNAME",
            format!("{localpart:?} is not a valid user name: use a-z, 0-9 and ._=-/+"),
        ));
    }
    let password = required_str(&body, "password")?.to_owned();
    let device_id = body.get("device_id").and_then(Value::as_str).map(str::to_owned);
    let inhibit_login = body.get("inhibit_login").and_then(Value::as_bool).unwrap_or(false);
    let user_id = hs.user_id(&localpart);
    let hash =
        tokio::task::spawn_blocking(move || hash_password(&password)).await.map_err(|_| {
            MatrixError::new(StatusCode::INTERNAL_SERVER_ERROR, "M_UNKNOWN", "internal error")
        })?;
    let uid = user_id.clone();
    let created = hs.db(move |_, conn| Ok(store::create_user(conn, &uid, &hash)?)).await?;
    if !created {
        return Err(MatrixError::bad_request(
            "M_USER_IN_USE",
            format!("{user_id} is already taken"),
        ));
    }
    if inhibit_login {
        return Ok((StatusCode::OK, Json(json!({ "user_id": user_id }))));
    }
    let session = new_session(user_id, device_id.as_deref());
    Ok((StatusCode::OK, Json(hs.db(session).await?)))
}

/// `POST /login` with `m.login.password` and an `m.id.user` identifier (or legacy `user`).
pub async fn login(
    State(hs): State<Homeserver>,
    JsonObject(body): JsonObject,
) -> ApiResult<Json<Value>> {
    if required_str(&body, "type")? != "m.login.password" {
        return Err(MatrixError::bad_request("M_UNKNOWN", "only m.login.password is supported"));
    }
    let user = body
        .get("identifier")
        .and_then(|i| i.get("user"))
        .or_else(|| body.get("user"))
        .and_then(Value::as_str)
        .ok_or_else(|| MatrixError::bad_request("M_MISSING_PARAM", "missing `identifier.user`"))?;
    let user_id =
        if user.starts_with('@') { user.to_owned() } else { hs.user_id(&user.to_lowercase()) };
    let password = required_str(&body, "password")?.to_owned();
    let device_id = body.get("device_id").and_then(Value::as_str).map(str::to_owned);
    let uid = user_id.clone();
    let stored = hs.db(move |_, conn| Ok(store::password_hash(conn, &uid)?)).await?;
    let ok = match stored {
        Some(stored) => tokio::task::spawn_blocking(move || verify_password(&stored, &password))
            .await
            .unwrap_or(false),
        None => false,
    };
    if !ok {
        return Err(MatrixError::forbidden("invalid user name or password"));
    }
    let session = new_session(user_id, device_id.as_deref());
    Ok(Json(hs.db(session).await?))
}

pub async fn logout(State(hs): State<Homeserver>, auth: Auth) -> ApiResult<Json<Value>> {
    hs.db(move |hs, conn| {
        store::delete_token(conn, &auth.token)?;
        hs.notify_change();
        Ok(())
    })
    .await?;
    Ok(Json(json!({})))
}

pub async fn whoami(auth: Auth) -> Json<Value> {
    Json(json!({ "user_id": auth.user_id, "device_id": auth.device_id, "is_guest": false }))
}

pub async fn profile(
    State(hs): State<Homeserver>,
    Path(user): Path<String>,
) -> ApiResult<Json<Value>> {
    let name = displayname_of(&hs, user).await?;
    Ok(Json(match name {
        Some(n) => json!({ "displayname": n }),
        None => json!({}),
    }))
}

async fn displayname_of(hs: &Homeserver, user: String) -> ApiResult<Option<String>> {
    hs.db(move |_, conn| {
        if !store::user_exists(conn, &user)? {
            return Err(MatrixError::not_found(format!("unknown user {user}")));
        }
        Ok(store::displayname(conn, &user)?)
    })
    .await
}

pub async fn get_displayname(
    State(hs): State<Homeserver>,
    Path(user): Path<String>,
) -> ApiResult<Json<Value>> {
    let name = displayname_of(&hs, user).await?;
    Ok(Json(json!({ "displayname": name })))
}

pub async fn set_displayname(
    State(hs): State<Homeserver>,
    auth: Auth,
    Path(user): Path<String>,
    JsonObject(body): JsonObject,
) -> ApiResult<Json<Value>> {
    if user != auth.user_id {
        return Err(MatrixError::forbidden("you can only change your own display name"));
    }
    let name = match body.get("displayname") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(MatrixError::bad_json("`displayname` must be a string")),
    };
    hs.db(move |hs, conn| rooms::set_displayname(hs, conn, &user, name.as_deref())).await?;
    Ok(Json(json!({})))
}

/// Filters are accepted and ignored: every sync returns the same shape.
pub async fn create_filter(_auth: Auth, JsonObject(_): JsonObject) -> Json<Value> {
    Json(json!({ "filter_id": "0" }))
}

pub async fn get_filter(_auth: Auth) -> Json<Value> {
    Json(json!({}))
}

pub async fn get_account_data(
    State(hs): State<Homeserver>,
    auth: Auth,
    Path((user, kind)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    if user != auth.user_id {
        return Err(MatrixError::forbidden("you can only read your own account data"));
    }
    if kind == crate::homeserver::PUSH_RULES {
        let rules = hs.db(move |hs, conn| hs.merged_rules(conn, &user)).await?;
        return Ok(Json(json!({ "global": rules })));
    }
    match hs.db(move |_, conn| Ok(store::account_data(conn, &user, &kind)?)).await? {
        Some(content) => Ok(Json(content)),
        None => Err(MatrixError::not_found("no account data of that type")),
    }
}

pub async fn put_account_data(
    State(hs): State<Homeserver>,
    auth: Auth,
    Path((user, kind)): Path<(String, String)>,
    JsonObject(body): JsonObject,
) -> ApiResult<Json<Value>> {
    if user != auth.user_id {
        return Err(MatrixError::forbidden("you can only set your own account data"));
    }
    if kind == crate::homeserver::PUSH_RULES || kind == "m.fully_read" {
        // The spec (v1.10): these types have their own APIs; setting them here is a 405.
        return Err(MatrixError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "M_BAD_JSON",
            format!("{kind} cannot be set here: use the push rules API or read markers"),
        ));
    }
    hs.db(move |hs, conn| {
        let tx = conn.transaction()?;
        store::set_account_data(&tx, &user, &kind, &Value::Object(body))?;
        tx.commit()?;
        hs.notify_change();
        Ok(())
    })
    .await?;
    Ok(Json(json!({})))
}
