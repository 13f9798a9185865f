//! The client-server API of the embedded homeserver (v3 paths), as an axum `Router`.
//!
//! Routes (under `/_matrix/client/v3` unless noted): `GET /_matrix/client/versions`;
//! `GET|POST /login`, `POST /register`, `POST /logout`, `GET /account/whoami`;
//! `POST /createRoom`, `POST /rooms/{id}/{join,invite,leave}`, `POST /join/{id}`,
//! `PUT /rooms/{id}/send/{type}/{txn}`, `GET /rooms/{id}/state`,
//! `GET|PUT /rooms/{id}/state/{type}[/{key}]`, `GET /rooms/{id}/joined_members`,
//! `POST /rooms/{id}/receipt/{type}/{event}`, `POST /rooms/{id}/read_markers`,
//! `GET|PUT /profile/{user}/displayname`, `GET /profile/{user}`, `GET /sync`,
//! `GET|PUT /user/{user}/account_data/{type}`, `POST /user/{user}/filter`,
//! `GET /capabilities`, `PUT /sendToDevice/{type}/{txn}`, `GET /pushers`, `POST /pushers/set`,
//! `GET /notifications`, and the push-rules API under `/pushrules/`.
//!
//! Every failure is a Matrix JSON error from [`error::MatrixError`]; an unknown path is 404
//! `M_UNRECOGNIZED`. Access tokens come from `Authorization: Bearer` or `?access_token=`;
//! they are never logged.

pub mod account;
pub mod error;
pub mod push;
pub mod rooms;
pub mod sync;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{Method, StatusCode, header};
use axum::routing::{get, post, put};
use serde_json::{Map, Value};
use tower_http::cors::{Any, CorsLayer};

use self::error::MatrixError;
use super::{Homeserver, store};

/// Largest request body accepted (events are limited to 64 KiB by the spec; to-device batches
/// can be larger).
const MAX_BODY: usize = 1 << 20;

/// The client-server router for `hs`.
pub fn router(hs: Homeserver) -> Router {
    let v3 = Router::new()
        .route("/login", get(account::login_flows).post(account::login))
        .route("/register", post(account::register))
        .route("/logout", post(account::logout))
        .route("/account/whoami", get(account::whoami))
        .route("/capabilities", get(account::capabilities))
        .route("/profile/{user}", get(account::profile))
        .route(
            "/profile/{user}/displayname",
            get(account::get_displayname).put(account::set_displayname),
        )
        .route("/user/{user}/filter", post(account::create_filter))
        .route("/user/{user}/filter/{id}", get(account::get_filter))
        .route(
            "/user/{user}/account_data/{kind}",
            get(account::get_account_data).put(account::put_account_data),
        )
        .route("/createRoom", post(rooms::create_room))
        .route("/join/{room}", post(rooms::join))
        .route("/rooms/{room}/join", post(rooms::join))
        .route("/rooms/{room}/invite", post(rooms::invite))
        .route("/rooms/{room}/leave", post(rooms::leave))
        .route("/rooms/{room}/send/{kind}/{txn}", put(rooms::send))
        .route("/rooms/{room}/state", get(rooms::full_state))
        .route(
            "/rooms/{room}/state/{kind}",
            get(rooms::get_state_empty_key).put(rooms::put_state_empty_key),
        )
        // An empty state key may come with or without the trailing slash.
        .route(
            "/rooms/{room}/state/{kind}/",
            get(rooms::get_state_empty_key).put(rooms::put_state_empty_key),
        )
        .route("/rooms/{room}/state/{kind}/{key}", get(rooms::get_state).put(rooms::put_state))
        .route("/rooms/{room}/joined_members", get(rooms::joined_members))
        .route("/rooms/{room}/receipt/{kind}/{event}", post(rooms::receipt))
        .route("/rooms/{room}/read_markers", post(rooms::read_markers))
        .route("/sync", get(sync::sync))
        .route("/sendToDevice/{kind}/{txn}", put(sync::send_to_device))
        .route("/pushers", get(push::get_pushers))
        .route("/pushers/set", post(push::set_pusher))
        .route("/notifications", get(push::notifications))
        .route("/pushrules/", get(push::all_rules))
        .route("/pushrules", get(push::all_rules))
        .route("/pushrules/global/", get(push::global_rules))
        .route("/pushrules/global", get(push::global_rules))
        .route(
            "/pushrules/global/{kind}/{rule}",
            get(push::get_rule).put(push::put_rule).delete(push::delete_rule),
        )
        .route(
            "/pushrules/global/{kind}/{rule}/enabled",
            get(push::get_enabled).put(push::put_enabled),
        )
        .route(
            "/pushrules/global/{kind}/{rule}/actions",
            get(push::get_actions).put(push::put_actions),
        );
    Router::new()
        .route("/_matrix/client/versions", get(account::versions))
        .nest("/_matrix/client/v3", v3)
        .fallback(|| async { MatrixError::unrecognized() })
        .method_not_allowed_fallback(|| async {
            MatrixError::new(StatusCode::METHOD_NOT_ALLOWED, "M_UNRECOGNIZED", "method not allowed")
        })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        // Browser clients: the spec asks every endpoint to answer CORS preflights.
        .layer(
            CorsLayer::new()
                .allow_origin(Any)
                .allow_methods([
                    Method::GET,
                    Method::POST,
                    Method::PUT,
                    Method::DELETE,
                    Method::OPTIONS,
                ])
                .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE, header::ACCEPT]),
        )
        .with_state(hs)
}

/// The authenticated caller.
#[derive(Clone)]
pub struct Auth {
    pub user_id: String,
    pub device_id: String,
    pub token: String,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token.
        f.debug_struct("Auth")
            .field("user_id", &self.user_id)
            .field("device_id", &self.device_id)
            .finish_non_exhaustive()
    }
}

impl FromRequestParts<Homeserver> for Auth {
    type Rejection = MatrixError;

    async fn from_request_parts(parts: &mut Parts, hs: &Homeserver) -> Result<Self, MatrixError> {
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_owned);
        let query = query_param(parts.uri.query(), "access_token");
        let Some(token) = header.or(query) else {
            return Err(MatrixError::new(
                StatusCode::UNAUTHORIZED,
                "M_MISSING_TOKEN",
                "missing access token",
            ));
        };
        let lookup = token.clone();
        let owner = hs.db(move |_, conn| Ok(store::token_owner(conn, &lookup)?)).await?;
        match owner {
            Some((user_id, device_id)) => Ok(Auth { user_id, device_id, token }),
            None => Err(MatrixError::new(
                StatusCode::UNAUTHORIZED,
                "M_UNKNOWN_TOKEN",
                "unknown or logged-out access token",
            )),
        }
    }
}

/// A JSON object request body: not JSON → `M_NOT_JSON`, not an object → `M_BAD_JSON`. An
/// empty body reads as `{}` (clients send none to `/join`).
pub struct JsonObject(pub Map<String, Value>);

impl<S: Send + Sync> FromRequest<S> for JsonObject {
    type Rejection = MatrixError;

    async fn from_request(req: Request, state: &S) -> Result<Self, MatrixError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            MatrixError::new(
                e.status(),
                if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    "M_TOO_LARGE"
                } else {
                    "M_UNKNOWN"
                },
                e.body_text(),
            )
        })?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(JsonObject(Map::new()));
        }
        match serde_json::from_slice::<Value>(&bytes) {
            Ok(Value::Object(map)) => Ok(JsonObject(map)),
            Ok(_) => Err(MatrixError::bad_json("the body must be a JSON object")),
            Err(e) => {
                Err(MatrixError::bad_request("M_NOT_JSON", format!("the body is not JSON: {e}")))
            }
        }
    }
}

/// Path parameters, like axum's `Path`, but a malformed path (bad percent-encoding, not UTF-8)
/// is a Matrix JSON error rather than axum's plain-text 400.
pub struct Path<T>(pub T);

impl<T, S> FromRequestParts<S> for Path<T>
where
    T: serde::de::DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = MatrixError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, MatrixError> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(value)) => Ok(Path(value)),
            Err(rejection) => Err(MatrixError::invalid_param(format!(
                "malformed path parameter: {}",
                rejection.body_text()
            ))),
        }
    }
}

/// Decodes `%XX` escapes (and `+` as a space) of a query value.
pub fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                match std::str::from_utf8(&bytes[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A query parameter, decoded.
pub fn query_param(parts_query: Option<&str>, name: &str) -> Option<String> {
    parts_query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then(|| percent_decode(v))
    })
}

/// Requires a string field of a request body.
pub fn required_str<'a>(body: &'a Map<String, Value>, name: &str) -> Result<&'a str, MatrixError> {
    match body.get(name) {
        Some(Value::String(s)) => Ok(s),
        None | Some(Value::Null) => {
            Err(MatrixError::bad_request("M_MISSING_PARAM", format!("missing `{name}`")))
        }
        Some(_) => Err(MatrixError::bad_json(format!("`{name}` must be a string"))),
    }
}
