//! The homeserver's HTTP pusher, minus its queue: the pusher model of the client-server API
//! ("Push notifications", pushers), validation of `POST /_matrix/client/v3/pushers/set`, the
//! bodies of `POST /_matrix/push/v1/notify` (Push Gateway API), the retry schedule, and one pooled
//! client that delivers a body to a gateway.
//!
//! ```text
//! POST /pushers/set body → PusherSet::parse(body, allow_insecure) → PusherChange::{Set, Delete}
//! queued event           → PushInput::new(…) → notify_body(&input)  (full or event_id_only)
//! read receipt           → badge_body(pusher, pushkey_ts, counts)   (counts only)
//! either body            → GatewayClient::post(url, body) → GatewayReply { rejected } | SendError
//!   rejected ∋ pushkey   → is_rejected → the worker deletes the pusher
//!   SendError            → retry after Backoff::next(attempt); drop the notification after
//!                          GIVE_UP_AFTER
//! ```
//!
//! The queue worker that drives this (per-pusher order, persisted position) lives elsewhere;
//! everything here but [`GatewayClient::post`] is pure.
//!
//! Never logs anything, and in particular never a pushkey, a gateway URL or an access token:
//! every `Debug` here shows a pushkey only as [`pushkey_hash`], and error messages carry neither
//! pushkeys nor answer bodies (a gateway's error body may echo pushkeys).

use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode, Uri, header};
use http_body_util::Full;
use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value, json};

use crate::config::Upstream;
pub use crate::notification::Prio;
use crate::providers::http::{self as http_client, HttpClient, Protocol};
use crate::providers::{pushkey_hash, retry_after};

/// The only path a pusher URL may have (client-server API, `PusherData.url`).
pub const NOTIFY_PATH: &str = "/_matrix/push/v1/notify";

/// The longest `app_id` the spec allows, in characters.
pub const MAX_APP_ID_CHARS: usize = 64;

/// The longest `pushkey` the spec allows, in bytes.
pub const MAX_PUSHKEY_BYTES: usize = 512;

/// The `data.format` value for pushes that carry ids, `prio` and counts only.
pub const EVENT_ID_ONLY: &str = "event_id_only";

// ---------------------------------------------------------------------------------------------
// The pusher model
// ---------------------------------------------------------------------------------------------

/// A pusher as `GET /_matrix/client/v3/pushers` returns it, and as the worker stores it.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct Pusher {
    /// Identifies the pusher together with `app_id`: the provider's routing token (an APNs
    /// device token, an FCM registration id, …). At most 512 bytes.
    pub pushkey: String,
    /// The pusher kind; this homeserver only has `http` pushers.
    pub kind: PusherKind,
    /// Reverse-DNS identifier of the application, ideally ending in the platform. At most 64
    /// characters.
    pub app_id: String,
    /// Lets the user recognise which application owns this pusher.
    pub app_display_name: String,
    /// Lets the user recognise which device owns this pusher.
    pub device_display_name: String,
    /// Which set of device-specific rules this pusher runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile_tag: Option<String>,
    /// Preferred language for notifications (`en`, `en-US`).
    pub lang: String,
    /// Data for the pusher implementation: the gateway URL and the format.
    pub data: PusherData,
}

/// `kind` of a stored pusher. `email` pushers exist in the spec but not in this homeserver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PusherKind {
    /// Sends HTTP requests to a push gateway.
    Http,
}

/// `PusherData`: what the HTTP pusher needs, plus whatever else the client put there (kept, and
/// passed on to the gateway in `devices[].data`).
#[derive(Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PusherData {
    /// The gateway URL (required for `http` pushers): https, path `/_matrix/push/v1/notify`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// How to format pushes: absent (full) or `event_id_only`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// Every other key the client set (`default_payload`, provider-specific keys, …).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl PusherData {
    /// `format == "event_id_only"`: pushes carry ids, `prio` and counts only.
    pub fn is_event_id_only(&self) -> bool {
        self.format.as_deref() == Some(EVENT_ID_ONLY)
    }

    /// The dictionary sent as `devices[].data`: this data minus `url` (Push Gateway API).
    pub fn without_url(&self) -> Map<String, Value> {
        let mut map = self.extra.clone();
        if let Some(format) = &self.format {
            map.insert("format".into(), format.clone().into());
        }
        map
    }
}

impl fmt::Debug for PusherData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The URL and the extra values may hold secrets; show only what is there.
        f.debug_struct("PusherData")
            .field("url", &self.url.as_ref().map(|_| "…"))
            .field("format", &self.format)
            .field("extra_keys", &self.extra.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl fmt::Debug for Pusher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pusher")
            .field("pushkey_hash", &pushkey_hash(&self.pushkey))
            .field("kind", &self.kind)
            .field("app_id", &self.app_id)
            .field("app_display_name", &self.app_display_name)
            .field("device_display_name", &self.device_display_name)
            .field("profile_tag", &self.profile_tag)
            .field("lang", &self.lang)
            .field("data", &self.data)
            .finish()
    }
}

// ---------------------------------------------------------------------------------------------
// POST /pushers/set
// ---------------------------------------------------------------------------------------------

/// The body of `POST /_matrix/client/v3/pushers/set` as sent: every field optional here, so
/// that [`PusherSet::parse`] can say which one is missing. Unknown fields are ignored.
#[derive(Clone, Default, Deserialize)]
pub struct PusherSet {
    /// Absent: missing. `null`: delete the pusher. A string: create or update.
    #[serde(default, deserialize_with = "present")]
    pub kind: Option<Option<String>>,
    /// Required.
    #[serde(default)]
    pub pushkey: Option<String>,
    /// Required.
    #[serde(default)]
    pub app_id: Option<String>,
    /// Required unless deleting.
    #[serde(default)]
    pub app_display_name: Option<String>,
    /// Required unless deleting.
    #[serde(default)]
    pub device_display_name: Option<String>,
    /// Optional.
    #[serde(default)]
    pub profile_tag: Option<String>,
    /// Required unless deleting.
    #[serde(default)]
    pub lang: Option<String>,
    /// Required unless deleting.
    #[serde(default)]
    pub data: Option<PusherData>,
    /// If true, add this pusher next to other users' pushers with the same `app_id` and
    /// `pushkey`; otherwise those are removed. Default false; `null` counts as false.
    #[serde(default, deserialize_with = "null_false")]
    pub append: bool,
}

impl fmt::Debug for PusherSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PusherSet")
            .field("kind", &self.kind)
            .field("pushkey_hash", &self.pushkey.as_deref().map(pushkey_hash))
            .field("app_id", &self.app_id)
            .field("data", &self.data)
            .field("append", &self.append)
            .finish_non_exhaustive()
    }
}

/// Distinguishes a present `null` (`Some(None)`) from an absent field (`None`, via `default`).
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}

fn null_false<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    Ok(Option::<bool>::deserialize(d)?.unwrap_or(false))
}

/// What a valid `POST /pushers/set` asks for.
#[derive(Clone, PartialEq)]
pub enum PusherChange {
    /// Create the pusher, or update the one with the same `app_id` and `pushkey`. Unless
    /// `append`, remove other users' pushers with that `app_id` and `pushkey`.
    Set { pusher: Pusher, append: bool },
    /// Delete this user's pusher with this `app_id` and `pushkey` (`kind: null`).
    Delete { app_id: String, pushkey: String },
}

impl fmt::Debug for PusherChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PusherChange::Set { pusher, append } => {
                f.debug_struct("Set").field("pusher", pusher).field("append", append).finish()
            }
            PusherChange::Delete { app_id, pushkey } => f
                .debug_struct("Delete")
                .field("app_id", app_id)
                .field("pushkey_hash", &pushkey_hash(pushkey))
                .finish(),
        }
    }
}

/// Why a `POST /pushers/set` body was refused. Every variant is a 400; messages name the field
/// and never quote a pushkey.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PusherError {
    /// Not a JSON object, or a field of the wrong JSON type (the message names it).
    #[error("{0}")]
    BadJson(String),
    /// A required field is absent or null.
    #[error("missing required field `{0}`")]
    MissingParam(&'static str),
    /// A field has the right type but a value this homeserver does not accept.
    #[error("invalid `{field}`: {reason}")]
    InvalidParam { field: &'static str, reason: String },
}

impl PusherError {
    /// The Matrix `errcode`.
    pub fn errcode(&self) -> &'static str {
        match self {
            PusherError::BadJson(_) => "M_BAD_JSON",
            PusherError::MissingParam(_) => "M_MISSING_PARAM",
            PusherError::InvalidParam { .. } => "M_INVALID_PARAM",
        }
    }

    /// The HTTP status: always 400 Bad Request.
    pub fn status(&self) -> StatusCode {
        StatusCode::BAD_REQUEST
    }

    fn invalid(field: &'static str, reason: impl Into<String>) -> PusherError {
        PusherError::InvalidParam { field, reason: reason.into() }
    }
}

impl PusherSet {
    /// Reads and checks a `POST /pushers/set` body.
    ///
    /// `kind`, `app_id` and `pushkey` are always required; `app_display_name`,
    /// `device_display_name`, `lang` and `data` (with `data.url`) too unless `kind` is `null`.
    /// `kind` must be `http`. `data.url` must be `https://…/_matrix/push/v1/notify`; `http://`
    /// is accepted only when `allow_insecure` and the host is loopback (`127.0.0.0/8`, `::1`,
    /// `localhost`). `data.format` must be absent or `event_id_only`.
    pub fn parse(body: &Value, allow_insecure: bool) -> Result<PusherChange, PusherError> {
        if !body.is_object() {
            return Err(PusherError::BadJson("request body must be a JSON object".into()));
        }
        let set: PusherSet = serde_path_to_error::deserialize(body).map_err(|e| {
            PusherError::BadJson(format!("`{}`: {}", e.path(), describe_type_error(e.inner())))
        })?;
        set.validate(allow_insecure)
    }

    /// The checks of [`PusherSet::parse`] on an already deserialized body.
    pub fn validate(self, allow_insecure: bool) -> Result<PusherChange, PusherError> {
        let kind = self.kind.ok_or(PusherError::MissingParam("kind"))?;
        let app_id = self.app_id.ok_or(PusherError::MissingParam("app_id"))?;
        let pushkey = self.pushkey.ok_or(PusherError::MissingParam("pushkey"))?;
        if app_id.is_empty() {
            return Err(PusherError::invalid("app_id", "must not be empty"));
        }
        if app_id.chars().count() > MAX_APP_ID_CHARS {
            return Err(PusherError::invalid(
                "app_id",
                format!("longer than {MAX_APP_ID_CHARS} characters"),
            ));
        }
        if pushkey.is_empty() {
            return Err(PusherError::invalid("pushkey", "must not be empty"));
        }
        if pushkey.len() > MAX_PUSHKEY_BYTES {
            return Err(PusherError::invalid(
                "pushkey",
                format!("longer than {MAX_PUSHKEY_BYTES} bytes"),
            ));
        }
        let Some(kind) = kind else {
            return Ok(PusherChange::Delete { app_id, pushkey });
        };
        let kind = match kind.as_str() {
            "http" => PusherKind::Http,
            "email" => {
                return Err(PusherError::invalid(
                    "kind",
                    "email pushers are not supported by this homeserver; use \"http\"",
                ));
            }
            other => {
                return Err(PusherError::invalid(
                    "kind",
                    format!("unknown pusher kind {other:?}; only \"http\" is supported"),
                ));
            }
        };
        let app_display_name =
            self.app_display_name.ok_or(PusherError::MissingParam("app_display_name"))?;
        let device_display_name =
            self.device_display_name.ok_or(PusherError::MissingParam("device_display_name"))?;
        let lang = self.lang.ok_or(PusherError::MissingParam("lang"))?;
        let data = self.data.ok_or(PusherError::MissingParam("data"))?;
        let url = data.url.as_deref().ok_or(PusherError::MissingParam("data.url"))?;
        check_url(url, allow_insecure)?;
        if let Some(format) = &data.format
            && format != EVENT_ID_ONLY
        {
            return Err(PusherError::invalid(
                "data.format",
                format!("unknown format {format:?}; omit it or use \"event_id_only\""),
            ));
        }
        let pusher = Pusher {
            pushkey,
            kind,
            app_id,
            app_display_name,
            device_display_name,
            profile_tag: self.profile_tag,
            lang,
            data,
        };
        Ok(PusherChange::Set { pusher, append: self.append })
    }
}

/// A serde type error without the offending value: serde quotes strings it rejects, and the
/// string may be a pushkey.
fn describe_type_error(e: &serde_json::Error) -> String {
    let text = e.to_string();
    match (text.find("invalid type: "), text.find(", expected ")) {
        (Some(start), Some(end)) if start < end => {
            let got = &text[start + "invalid type: ".len()..end];
            let got = got.split([' ', '`']).next().unwrap_or(got);
            let expected = text[end + ", expected ".len()..].trim_end();
            let expected = expected.split(" at line ").next().unwrap_or(expected);
            let expected = if expected.starts_with("struct ") { "an object" } else { expected };
            format!("expected {expected}, got {got}")
        }
        _ => "wrong type".to_owned(),
    }
}

/// `data.url`: absolute, https (or loopback http when allowed), no userinfo, the notify path.
fn check_url(url: &str, allow_insecure: bool) -> Result<(), PusherError> {
    const FIELD: &str = "data.url";
    let uri: Uri =
        url.parse().map_err(|_| PusherError::invalid(FIELD, "not a valid absolute URL"))?;
    let (Some(scheme), Some(authority)) = (uri.scheme_str(), uri.authority()) else {
        return Err(PusherError::invalid(FIELD, "not an absolute URL (https://host/…)"));
    };
    if authority.as_str().contains('@') {
        return Err(PusherError::invalid(FIELD, "must not contain credentials (user@host)"));
    }
    let host = authority.host();
    if host.is_empty() {
        return Err(PusherError::invalid(FIELD, "has no host"));
    }
    match scheme.to_ascii_lowercase().as_str() {
        "https" => {}
        "http" if allow_insecure && is_loopback(host) => {}
        "http" if allow_insecure => {
            return Err(PusherError::invalid(
                FIELD,
                "plain http is allowed only for a loopback gateway (127.0.0.0/8, ::1, localhost)",
            ));
        }
        "http" => {
            return Err(PusherError::invalid(
                FIELD,
                "must be https (plain http to a loopback gateway needs allow_insecure_pushers)",
            ));
        }
        _ => return Err(PusherError::invalid(FIELD, "must be an https URL")),
    }
    if uri.path() != NOTIFY_PATH {
        return Err(PusherError::invalid(FIELD, format!("path must be exactly {NOTIFY_PATH}")));
    }
    Ok(())
}

/// `localhost`, `127.0.0.0/8`, `::1` (bracketed or not) and `::ffff:127.x.y.z`.
fn is_loopback(host: &str) -> bool {
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    let bare = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    match bare.parse::<IpAddr>() {
        Ok(IpAddr::V4(v4)) => v4.is_loopback(),
        Ok(IpAddr::V6(v6)) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
        Err(_) => false,
    }
}

// ---------------------------------------------------------------------------------------------
// Notify bodies
// ---------------------------------------------------------------------------------------------

/// The user's unread counts, sent as `notification.counts`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Unread notifications over all the user's rooms (DESIGN §4: a total, not a room count).
    /// Always sent, even when zero: a badge update of `0` is how a phone clears its badge
    /// (Sygnal and herald set the badge only when `unread` is present).
    pub unread: u64,
    /// Unacknowledged missed calls; sent only when known and non-zero (the spec says zero counts
    /// should be omitted).
    pub missed_calls: Option<u64>,
}

impl Counts {
    fn to_json(self) -> Value {
        let mut counts = Map::new();
        counts.insert("unread".into(), self.unread.into());
        if let Some(missed) = self.missed_calls.filter(|&m| m > 0) {
            counts.insert("missed_calls".into(), missed.into());
        }
        Value::Object(counts)
    }
}

/// Everything one event push needs, for one pusher. Build it with [`PushInput::new`] and set
/// the optional room and sender facts with struct update syntax.
#[derive(Debug, Clone)]
pub struct PushInput<'a> {
    /// The event: `event_id`, `room_id`, `type`, `sender` and `content` are read from it (absent
    /// or non-string ones are left out of the body).
    pub event: &'a Value,
    /// The sender's current display name in the room; omitted when `None` or empty.
    pub sender_display_name: Option<&'a str>,
    /// The room's name; omitted when `None` or empty.
    pub room_name: Option<&'a str>,
    /// The room's canonical alias; omitted when `None` or empty.
    pub room_alias: Option<&'a str>,
    /// Whether the pushed-to user is the `state_key` of this membership event. Sent only for
    /// `m.room.member` events, where it means something; ignored for any other type.
    pub user_is_target: bool,
    /// The user's counts after this event.
    pub counts: Counts,
    /// The tweaks of the push rule that matched (`sound`, `highlight`, …), sent per device.
    pub tweaks: &'a Map<String, Value>,
    /// `high` or `low`; [`PushInput::new`] fills it in with [`prio`].
    pub prio: Prio,
    /// The pusher this push is for; its `data.format` picks full or `event_id_only`.
    pub pusher: &'a Pusher,
    /// When the pusher's pushkey was last set, in Unix seconds (`devices[].pushkey_ts`).
    pub pushkey_ts: u64,
}

impl<'a> PushInput<'a> {
    /// An input with no room or sender names, `user_is_target` false, and `prio` from [`prio`].
    pub fn new(
        event: &'a Value,
        pusher: &'a Pusher,
        pushkey_ts: u64,
        tweaks: &'a Map<String, Value>,
        counts: Counts,
    ) -> PushInput<'a> {
        PushInput {
            event,
            sender_display_name: None,
            room_name: None,
            room_alias: None,
            user_is_target: false,
            counts,
            tweaks,
            prio: prio(event, tweaks),
            pusher,
            pushkey_ts,
        }
    }
}

/// `high` when the event is encrypted (`m.room.encrypted`: it may be anything, so assume it
/// matters), when the rule set `highlight` true, or when it set a `sound` (a non-empty string,
/// or any other value but `null`/`false`); `low` otherwise. Same rule as Synapse.
pub fn prio(event: &Value, tweaks: &Map<String, Value>) -> Prio {
    let encrypted = event.get("type").and_then(Value::as_str) == Some("m.room.encrypted");
    let highlight = tweaks.get("highlight").and_then(Value::as_bool) == Some(true);
    let sound = match tweaks.get("sound") {
        None | Some(Value::Null) | Some(Value::Bool(false)) => false,
        Some(Value::String(s)) => !s.is_empty(),
        Some(_) => true,
    };
    if encrypted || highlight || sound { Prio::High } else { Prio::Low }
}

/// The `{"notification": …}` body for one event push, in the pusher's format.
///
/// Full: `event_id`, `room_id`, `type`, `sender`, `sender_display_name`, `room_name`,
/// `room_alias`, `user_is_target` (member events), `prio`, `content` (when a non-empty object),
/// `counts`, `devices`. `event_id_only`: `event_id`, `room_id`, `prio`, `counts`, `devices` and
/// nothing else (no content, sender or type; DESIGN §4). Absent optional fields are left out.
/// Each format sends one device: `app_id`, `pushkey`, `pushkey_ts`, `data` (pusher data minus
/// `url`) and `tweaks`.
pub fn notify_body(input: &PushInput<'_>) -> Value {
    let event = input.event;
    let mut n = Map::new();
    copy_str(&mut n, "event_id", event.get("event_id"));
    copy_str(&mut n, "room_id", event.get("room_id"));
    n.insert("prio".into(), input.prio.as_str().into());
    n.insert("counts".into(), input.counts.to_json());
    let device = device(input.pusher, input.pushkey_ts, Some(input.tweaks));
    n.insert("devices".into(), Value::Array(vec![device]));
    if input.pusher.data.is_event_id_only() {
        return json!({ "notification": n });
    }

    copy_str(&mut n, "type", event.get("type"));
    copy_str(&mut n, "sender", event.get("sender"));
    for (key, value) in [
        ("sender_display_name", input.sender_display_name),
        ("room_name", input.room_name),
        ("room_alias", input.room_alias),
    ] {
        if let Some(v) = value.filter(|v| !v.is_empty()) {
            n.insert(key.into(), v.into());
        }
    }
    if event.get("type").and_then(Value::as_str) == Some("m.room.member") {
        n.insert("user_is_target".into(), input.user_is_target.into());
    }
    if let Some(content) = event.get("content").and_then(Value::as_object)
        && !content.is_empty()
    {
        n.insert("content".into(), Value::Object(content.clone()));
    }
    json!({ "notification": n })
}

/// The body of a badge-only update (sent after a read receipt changes the user's counts):
/// `{"notification": {"prio": "low", "counts": {…}, "devices": [{app_id, pushkey, pushkey_ts,
/// data}]}}`, with no event fields and no tweaks, whatever the pusher's format.
///
/// The spec makes `event_id`/`room_id` required only for notifications about an event, and
/// only `devices` is required; Sygnal needs nothing else either, and herald's gateway reads a
/// notification without `event_id` and `type` as badge-only. `prio` is `low` because nothing is
/// shown or sounded; APNs wants priority 5 for such pushes.
pub fn badge_body(pusher: &Pusher, pushkey_ts: u64, counts: Counts) -> Value {
    json!({
        "notification": {
            "prio": Prio::Low.as_str(),
            "counts": counts.to_json(),
            "devices": [device(pusher, pushkey_ts, None)],
        }
    })
}

fn device(pusher: &Pusher, pushkey_ts: u64, tweaks: Option<&Map<String, Value>>) -> Value {
    let mut d = Map::new();
    d.insert("app_id".into(), pusher.app_id.clone().into());
    d.insert("pushkey".into(), pusher.pushkey.clone().into());
    d.insert("pushkey_ts".into(), pushkey_ts.into());
    d.insert("data".into(), Value::Object(pusher.data.without_url()));
    if let Some(tweaks) = tweaks {
        d.insert("tweaks".into(), Value::Object(tweaks.clone()));
    }
    Value::Object(d)
}

fn copy_str(into: &mut Map<String, Value>, key: &str, value: Option<&Value>) {
    if let Some(s) = value.and_then(Value::as_str) {
        into.insert(key.into(), s.into());
    }
}

// ---------------------------------------------------------------------------------------------
// Retry schedule
// ---------------------------------------------------------------------------------------------

/// How long a pusher keeps retrying one notification, counted from its first failed attempt.
/// After that the worker drops that notification and moves on to the next one; the pusher
/// itself stays (only a gateway `rejected` removes it). The spec asks for exponential backoff
/// "for a reasonable period of time"; a day covers a gateway's maintenance window.
pub const GIVE_UP_AFTER: Duration = Duration::from_secs(24 * 60 * 60);

/// Exponential backoff between attempts: `base`, doubling, never more than `cap`. No jitter: one
/// homeserver with a handful of pushers cannot stampede a gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The wait after the first failure.
    pub base: Duration,
    /// The longest wait.
    pub cap: Duration,
}

impl Backoff {
    /// 1 s doubling to 1 h (DESIGN §4).
    pub const DEFAULT: Backoff =
        Backoff { base: Duration::from_secs(1), cap: Duration::from_secs(60 * 60) };

    /// The wait before the next attempt, `attempt` being the 0-based index of the failure just
    /// seen: `next(0)` = 1 s, `next(1)` = 2 s, … `next(11)` = 2048 s, then 1 h from `next(12)`
    /// on.
    pub fn next(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt).unwrap_or(u32::MAX);
        self.base.checked_mul(factor).map_or(self.cap, |d| d.min(self.cap))
    }
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff::DEFAULT
    }
}

// ---------------------------------------------------------------------------------------------
// Gateway client
// ---------------------------------------------------------------------------------------------

/// The 200 answer of a gateway: pushkeys it says are invalid. The worker must delete the
/// pushers with these pushkeys (and this `app_id`) and stop sending to them.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct GatewayReply {
    pub rejected: Vec<String>,
}

impl fmt::Debug for GatewayReply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hashes: Vec<String> = self.rejected.iter().map(|k| pushkey_hash(k)).collect();
        f.debug_struct("GatewayReply").field("rejected_hashes", &hashes).finish()
    }
}

/// Whether the gateway rejected `pushkey`.
pub fn is_rejected(reply: &GatewayReply, pushkey: &str) -> bool {
    reply.rejected.iter().any(|k| k == pushkey)
}

/// Why a push was not delivered. Messages never contain the URL, pushkeys or the gateway's
/// answer body.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The stored URL does not parse; retrying will not help (validation should prevent it).
    #[error("push gateway URL is not a valid absolute URL")]
    InvalidUrl,
    /// Connect, TLS, reset, or a response body over the size limit.
    #[error("push gateway unreachable: {0}")]
    Transport(String),
    /// No complete answer within the client's timeout.
    #[error("push gateway did not answer within {0:?}")]
    Timeout(Duration),
    /// Any status but 200. `retry_after` is the gateway's `Retry-After` in seconds, capped at
    /// an hour, if it sent one.
    #[error("push gateway answered HTTP {status}")]
    Status { status: StatusCode, retry_after: Option<Duration> },
    /// A 200 whose body is not `{"rejected": [strings]}`.
    #[error("push gateway's 200 answer is unusable: {0}")]
    BadReply(&'static str),
}

impl SendError {
    /// Whether sending the same request again may succeed: not for a bad URL, nor for a 4xx
    /// other than 408 (timeout) and 429 (rate limit), where the gateway refused this very
    /// request; everything else (5xx, transport errors, timeouts, unusable answers) is retried.
    pub fn is_retryable(&self) -> bool {
        match self {
            SendError::InvalidUrl => false,
            SendError::Status { status, .. } => {
                !status.is_client_error() || matches!(status.as_u16(), 408 | 429)
            }
            _ => true,
        }
    }
}

/// Failure to build the client (TLS setup).
#[derive(Debug, thiserror::Error)]
#[error("building the push gateway client: {0}")]
pub struct BuildError(String);

/// One pooled HTTP client for every pusher's gateway: HTTP/2 or HTTP/1.1 over TLS (webpki
/// roots, ALPN), HTTP/1.1 for `http://`. Cheap to clone; clones share the pool.
#[derive(Clone)]
pub struct GatewayClient {
    client: HttpClient,
    timeout: Duration,
}

impl fmt::Debug for GatewayClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GatewayClient").field("timeout", &self.timeout).finish_non_exhaustive()
    }
}

impl GatewayClient {
    /// A client trusting the embedded webpki roots; each [`post`](Self::post) must complete
    /// (connect, send, read the answer) within `timeout`.
    pub fn new(timeout: Duration) -> Result<GatewayClient, BuildError> {
        GatewayClient::with_extra_roots(timeout, &[])
    }

    /// Like [`GatewayClient::new`], also trusting `extra_roots` (a private CA).
    pub fn with_extra_roots(
        timeout: Duration,
        extra_roots: &[CertificateDer<'static>],
    ) -> Result<GatewayClient, BuildError> {
        let upstream = Upstream { base_url: String::new(), extra_roots: extra_roots.to_vec() };
        let client =
            http_client::client(&upstream, None, None, Protocol::Any).map_err(BuildError)?;
        Ok(GatewayClient { client, timeout })
    }

    /// POSTs `body` as JSON to `url` (a pusher's `data.url`). Only a 200 whose body is a JSON
    /// object with an optional `rejected` string array is `Ok` (missing or `null` `rejected`
    /// is empty); everything else is a [`SendError`]. Answers over 64 KiB are transport errors.
    pub async fn post(&self, url: &str, body: &Value) -> Result<GatewayReply, SendError> {
        let uri: Uri = url.parse().map_err(|_| SendError::InvalidUrl)?;
        if uri.scheme().is_none() || uri.authority().is_none() {
            return Err(SendError::InvalidUrl);
        }
        let request = http::Request::builder()
            .method(Method::POST)
            .uri(uri)
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::USER_AGENT, concat!("herald/", env!("CARGO_PKG_VERSION")))
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|_| SendError::InvalidUrl)?;
        let answer =
            tokio::time::timeout(self.timeout, http_client::exchange(&self.client, request))
                .await
                .map_err(|_| SendError::Timeout(self.timeout))?
                .map_err(SendError::Transport)?;
        if answer.status != StatusCode::OK {
            return Err(SendError::Status {
                status: answer.status,
                retry_after: retry_after(&answer.headers),
            });
        }
        parse_reply(&answer.body)
    }
}

/// `{"rejected": [..]}` from a 200 body.
fn parse_reply(body: &[u8]) -> Result<GatewayReply, SendError> {
    let value: Value =
        serde_json::from_slice(body).map_err(|_| SendError::BadReply("body is not JSON"))?;
    let Value::Object(mut object) = value else {
        return Err(SendError::BadReply("body is not a JSON object"));
    };
    let rejected = match object.remove("rejected") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items
            .into_iter()
            .map(|item| match item {
                Value::String(s) => Ok(s),
                _ => Err(SendError::BadReply("`rejected` is not an array of strings")),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(SendError::BadReply("`rejected` is not an array of strings")),
    };
    Ok(GatewayReply { rejected })
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;
    use hyper::body::Incoming;
    use hyper_util::rt::TokioIo;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;
    use tokio::sync::mpsc;

    use super::*;

    const URL: &str = "https://push.example.org/_matrix/push/v1/notify";

    fn set_body() -> Value {
        json!({
            "kind": "http",
            "app_id": "org.example.app.ios",
            "pushkey": "V2h5IG9uIGVhcnRoIGRpZCB5b3UgZGVjb2RlIHRoaXM/",
            "app_display_name": "Example",
            "device_display_name": "Alice's phone",
            "lang": "en-GB",
            "data": { "url": URL },
        })
    }

    /// `set_body()` with `changes` applied: a `null` value in `changes` sets the field to null;
    /// keys listed in `remove` are deleted.
    fn body_with(changes: Value, remove: &[&str]) -> Value {
        let mut body = set_body();
        let obj = body.as_object_mut().unwrap();
        for (k, v) in changes.as_object().unwrap() {
            obj.insert(k.clone(), v.clone());
        }
        for k in remove {
            obj.remove(*k);
        }
        body
    }

    fn with_url(url: &str) -> Value {
        body_with(json!({ "data": { "url": url } }), &[])
    }

    fn pusher(data: Value) -> Pusher {
        Pusher {
            pushkey: "pk1".into(),
            kind: PusherKind::Http,
            app_id: "org.example.app".into(),
            app_display_name: "Example".into(),
            device_display_name: "Phone".into(),
            profile_tag: None,
            lang: "en".into(),
            data: serde_json::from_value(data).unwrap(),
        }
    }

    #[test]
    fn parse_accepts_a_full_set_request_and_keeps_extra_data() {
        let body = body_with(
            json!({
                "profile_tag": "xyz",
                "append": true,
                "data": { "url": URL, "format": "event_id_only", "default_payload": {"a": 1} },
                "unknown_field": 1,
            }),
            &[],
        );
        let change = PusherSet::parse(&body, false).unwrap();
        let PusherChange::Set { pusher, append } = change else { panic!("not a set: {change:?}") };
        assert!(append);
        assert_eq!(pusher.kind, PusherKind::Http);
        assert_eq!(pusher.profile_tag.as_deref(), Some("xyz"));
        assert!(pusher.data.is_event_id_only());
        assert_eq!(
            serde_json::to_value(&pusher).unwrap(),
            json!({
                "pushkey": "V2h5IG9uIGVhcnRoIGRpZCB5b3UgZGVjb2RlIHRoaXM/",
                "kind": "http",
                "app_id": "org.example.app.ios",
                "app_display_name": "Example",
                "device_display_name": "Alice's phone",
                "profile_tag": "xyz",
                "lang": "en-GB",
                "data": { "url": URL, "format": "event_id_only", "default_payload": {"a": 1} },
            })
        );
        // Round trip through the stored form.
        let back: Pusher = serde_json::from_value(serde_json::to_value(&pusher).unwrap()).unwrap();
        assert_eq!(back, pusher);
    }

    #[test]
    fn parse_defaults_and_omits_profile_tag() {
        let change = PusherSet::parse(&body_with(json!({ "append": null }), &[]), false).unwrap();
        let PusherChange::Set { pusher, append } = change else { panic!() };
        assert!(!append);
        let json = serde_json::to_value(&pusher).unwrap();
        assert!(json.get("profile_tag").is_none());
        assert_eq!(json["data"], json!({ "url": URL }));
    }

    #[test]
    fn parse_kind_null_deletes() {
        let body = json!({ "kind": null, "app_id": "a.b", "pushkey": "pk" });
        assert_eq!(
            PusherSet::parse(&body, false).unwrap(),
            PusherChange::Delete { app_id: "a.b".into(), pushkey: "pk".into() }
        );
        let body = json!({ "kind": null, "app_id": "a.b" });
        assert_eq!(PusherSet::parse(&body, false), Err(PusherError::MissingParam("pushkey")));
    }

    #[test]
    fn parse_limits_are_inclusive_and_counted_as_the_spec_says() {
        // 64 characters (128 bytes) of app_id, 512 bytes of pushkey: accepted.
        let ok = body_with(json!({ "app_id": "é".repeat(64), "pushkey": "k".repeat(512) }), &[]);
        assert!(PusherSet::parse(&ok, false).is_ok());
    }

    #[test]
    fn parse_rejects_every_bad_request() {
        use PusherError::{BadJson, InvalidParam, MissingParam};
        #[rustfmt::skip]
        let cases: Vec<(&str, Value, &str, Option<&str>)> = vec![
            // (what, body, errcode, field for MissingParam/InvalidParam or text for BadJson)
            ("array body", json!([1]), "M_BAD_JSON", Some("must be a JSON object")),
            ("string body", json!("x"), "M_BAD_JSON", Some("must be a JSON object")),
            ("pushkey type", body_with(json!({"pushkey": 5}), &[]), "M_BAD_JSON", Some("`pushkey`: expected a string, got integer")),
            ("kind type", body_with(json!({"kind": true}), &[]), "M_BAD_JSON", Some("`kind`: expected a string, got boolean")),
            ("append type", body_with(json!({"append": "yes"}), &[]), "M_BAD_JSON", Some("`append`: expected a boolean, got string")),
            ("data type", body_with(json!({"data": 5}), &[]), "M_BAD_JSON", Some("`data`: expected an object, got integer")),
            ("url type", body_with(json!({"data": {"url": 5}}), &[]), "M_BAD_JSON", Some("`data.url`: expected a string, got integer")),
            ("format type", body_with(json!({"data": {"url": URL, "format": 5}}), &[]), "M_BAD_JSON", Some("`data.format`: expected a string, got integer")),
            ("kind missing", body_with(json!({}), &["kind"]), "M_MISSING_PARAM", Some("kind")),
            ("app_id missing", body_with(json!({}), &["app_id"]), "M_MISSING_PARAM", Some("app_id")),
            ("pushkey missing", body_with(json!({}), &["pushkey"]), "M_MISSING_PARAM", Some("pushkey")),
            ("pushkey null", body_with(json!({"pushkey": null}), &[]), "M_MISSING_PARAM", Some("pushkey")),
            ("app_display_name missing", body_with(json!({}), &["app_display_name"]), "M_MISSING_PARAM", Some("app_display_name")),
            ("device_display_name missing", body_with(json!({}), &["device_display_name"]), "M_MISSING_PARAM", Some("device_display_name")),
            ("lang missing", body_with(json!({}), &["lang"]), "M_MISSING_PARAM", Some("lang")),
            ("data missing", body_with(json!({}), &["data"]), "M_MISSING_PARAM", Some("data")),
            ("url missing", body_with(json!({"data": {"format": "event_id_only"}}), &[]), "M_MISSING_PARAM", Some("data.url")),
            ("app_id empty", body_with(json!({"app_id": ""}), &[]), "M_INVALID_PARAM", Some("app_id")),
            ("app_id 65 chars", body_with(json!({"app_id": "a".repeat(65)}), &[]), "M_INVALID_PARAM", Some("app_id")),
            ("pushkey empty", body_with(json!({"pushkey": ""}), &[]), "M_INVALID_PARAM", Some("pushkey")),
            ("pushkey 513 bytes", body_with(json!({"pushkey": "k".repeat(513)}), &[]), "M_INVALID_PARAM", Some("pushkey")),
            ("pushkey 257 two-byte chars", body_with(json!({"pushkey": "é".repeat(257)}), &[]), "M_INVALID_PARAM", Some("pushkey")),
            ("kind email", body_with(json!({"kind": "email"}), &[]), "M_INVALID_PARAM", Some("kind")),
            ("kind unknown", body_with(json!({"kind": "carrier-pigeon"}), &[]), "M_INVALID_PARAM", Some("kind")),
            ("format unknown", body_with(json!({"data": {"url": URL, "format": "full"}}), &[]), "M_INVALID_PARAM", Some("data.format")),
            ("url garbage", with_url("not a url"), "M_INVALID_PARAM", Some("data.url")),
            ("url relative", with_url("/_matrix/push/v1/notify"), "M_INVALID_PARAM", Some("data.url")),
            ("url no path", with_url("https://push.example.org"), "M_INVALID_PARAM", Some("data.url")),
            ("url wrong path", with_url("https://push.example.org/notify"), "M_INVALID_PARAM", Some("data.url")),
            ("url trailing slash", with_url("https://push.example.org/_matrix/push/v1/notify/"), "M_INVALID_PARAM", Some("data.url")),
            ("url old path", with_url("https://push.example.org/_matrix/push/r0/notify"), "M_INVALID_PARAM", Some("data.url")),
            ("url ftp", with_url("ftp://push.example.org/_matrix/push/v1/notify"), "M_INVALID_PARAM", Some("data.url")),
            ("url userinfo", with_url("https://u:p@push.example.org/_matrix/push/v1/notify"), "M_INVALID_PARAM", Some("data.url")),
            ("url http remote", with_url("http://push.example.org/_matrix/push/v1/notify"), "M_INVALID_PARAM", Some("data.url")),
            ("url http loopback not allowed", with_url("http://127.0.0.1:8080/_matrix/push/v1/notify"), "M_INVALID_PARAM", Some("data.url")),
        ];
        for (what, body, errcode, detail) in cases {
            let err = PusherSet::parse(&body, false).expect_err(what);
            assert_eq!(err.errcode(), errcode, "{what}: {err}");
            assert_eq!(err.status(), StatusCode::BAD_REQUEST, "{what}");
            match (&err, detail) {
                (BadJson(msg), Some(text)) => assert!(msg.contains(text), "{what}: {msg}"),
                (MissingParam(field), Some(f)) => assert_eq!(*field, f, "{what}"),
                (InvalidParam { field, .. }, Some(f)) => assert_eq!(*field, f, "{what}: {err}"),
                _ => panic!("{what}: unexpected {err:?}"),
            }
            // Messages never quote a pushkey.
            assert!(!err.to_string().contains("V2h5IG9u"), "{what}: {err}");
        }
    }

    #[test]
    fn parse_messages_are_readable() {
        let err = PusherSet::parse(&body_with(json!({"kind": "email"}), &[]), false).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid `kind`: email pushers are not supported by this homeserver; use \"http\""
        );
        let err = PusherSet::parse(&with_url("http://gw.example/_matrix/push/v1/notify"), false)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid `data.url`: must be https (plain http to a loopback gateway needs \
             allow_insecure_pushers)"
        );
        let err = PusherSet::parse(&body_with(json!({}), &["lang"]), false).unwrap_err();
        assert_eq!(err.to_string(), "missing required field `lang`");
        // A string of the wrong type (maybe a pushkey) is not quoted back.
        let err =
            PusherSet::parse(&body_with(json!({"append": "secret"}), &[]), false).unwrap_err();
        assert!(!err.to_string().contains("secret"), "{err}");
    }

    #[test]
    fn insecure_http_only_for_loopback_when_allowed() {
        let loopback = [
            "http://127.0.0.1/_matrix/push/v1/notify",
            "http://127.0.0.1:5000/_matrix/push/v1/notify",
            "http://127.10.20.30:5000/_matrix/push/v1/notify",
            "http://[::1]:5000/_matrix/push/v1/notify",
            "http://[::ffff:127.0.0.1]/_matrix/push/v1/notify",
            "http://localhost/_matrix/push/v1/notify",
            "http://LocalHost:8080/_matrix/push/v1/notify",
        ];
        for url in loopback {
            assert!(PusherSet::parse(&with_url(url), true).is_ok(), "{url}");
            assert!(PusherSet::parse(&with_url(url), false).is_err(), "{url}");
        }
        let remote = [
            "http://128.0.0.1/_matrix/push/v1/notify",
            "http://10.0.0.1/_matrix/push/v1/notify",
            "http://[::2]/_matrix/push/v1/notify",
            "http://localhost.example.org/_matrix/push/v1/notify",
            "http://127.0.0.1.nip.io/_matrix/push/v1/notify",
        ];
        for url in remote {
            let err = PusherSet::parse(&with_url(url), true).unwrap_err();
            assert_eq!(err.errcode(), "M_INVALID_PARAM", "{url}");
        }
        // https is fine anywhere, loopback included, with or without the setting.
        for url in [URL, "https://127.0.0.1:8443/_matrix/push/v1/notify"] {
            assert!(PusherSet::parse(&with_url(url), false).is_ok(), "{url}");
        }
    }

    #[test]
    fn debug_never_shows_pushkeys() {
        let body = set_body();
        let change = PusherSet::parse(&body, false).unwrap();
        let set: PusherSet = serde_json::from_value(body).unwrap();
        let delete = PusherChange::Delete { app_id: "a".into(), pushkey: "V2h5IG9u".into() };
        let reply = GatewayReply { rejected: vec!["V2h5IG9u".into()] };
        for text in
            [format!("{change:?}"), format!("{set:?}"), format!("{delete:?}"), format!("{reply:?}")]
        {
            assert!(!text.contains("V2h5IG9u"), "{text}");
            assert!(text.contains("hash"), "{text}");
        }
        assert!(!format!("{change:?}").contains("push.example.org"));
    }

    fn message_event() -> Value {
        json!({
            "event_id": "$ev1",
            "room_id": "!room:example.org",
            "type": "m.room.message",
            "sender": "@bob:example.org",
            "origin_server_ts": 1,
            "content": { "msgtype": "m.text", "body": "hello" },
        })
    }

    #[test]
    fn full_body() {
        let p = pusher(json!({ "url": URL, "default_payload": {"aps": {}} }));
        let event = message_event();
        let tweaks: Map<String, Value> =
            json!({ "sound": "default", "highlight": false }).as_object().unwrap().clone();
        let input = PushInput {
            sender_display_name: Some("Bob"),
            room_name: Some("Lunch"),
            room_alias: Some("#lunch:example.org"),
            user_is_target: true, // not a member event: ignored
            ..PushInput::new(
                &event,
                &p,
                1_700_000_000,
                &tweaks,
                Counts { unread: 3, missed_calls: Some(1) },
            )
        };
        assert_eq!(
            notify_body(&input),
            json!({ "notification": {
                "event_id": "$ev1",
                "room_id": "!room:example.org",
                "type": "m.room.message",
                "sender": "@bob:example.org",
                "sender_display_name": "Bob",
                "room_name": "Lunch",
                "room_alias": "#lunch:example.org",
                "prio": "high",
                "content": { "msgtype": "m.text", "body": "hello" },
                "counts": { "unread": 3, "missed_calls": 1 },
                "devices": [{
                    "app_id": "org.example.app",
                    "pushkey": "pk1",
                    "pushkey_ts": 1_700_000_000,
                    "data": { "default_payload": {"aps": {}} },
                    "tweaks": { "sound": "default", "highlight": false },
                }],
            }})
        );
    }

    #[test]
    fn full_body_omits_absent_optionals() {
        let p = pusher(json!({ "url": URL }));
        let event =
            json!({ "event_id": "$e", "room_id": "!r", "type": "m.room.redaction", "content": {} });
        let tweaks = Map::new();
        let input = PushInput {
            sender_display_name: Some(""),
            ..PushInput::new(&event, &p, 5, &tweaks, Counts { unread: 0, missed_calls: Some(0) })
        };
        assert_eq!(
            notify_body(&input),
            json!({ "notification": {
                "event_id": "$e",
                "room_id": "!r",
                "type": "m.room.redaction",
                "prio": "low",
                "counts": { "unread": 0 },
                "devices": [{ "app_id": "org.example.app", "pushkey": "pk1", "pushkey_ts": 5, "data": {}, "tweaks": {} }],
            }})
        );
    }

    #[test]
    fn full_body_member_event_carries_user_is_target() {
        let p = pusher(json!({ "url": URL }));
        let event = json!({
            "event_id": "$m", "room_id": "!r", "type": "m.room.member", "sender": "@bob:x",
            "state_key": "@alice:x", "content": { "membership": "invite" },
        });
        let tweaks = Map::new();
        for target in [true, false] {
            let input = PushInput {
                user_is_target: target,
                ..PushInput::new(&event, &p, 5, &tweaks, Counts { unread: 1, missed_calls: None })
            };
            let body = notify_body(&input);
            assert_eq!(body["notification"]["user_is_target"], json!(target));
            assert_eq!(body["notification"]["content"], json!({ "membership": "invite" }));
        }
    }

    #[test]
    fn event_id_only_body_carries_ids_prio_and_counts_only() {
        let p = pusher(json!({ "url": URL, "format": "event_id_only", "extra": true }));
        let event = json!({
            "event_id": "$ev1", "room_id": "!room:example.org", "type": "m.room.encrypted",
            "sender": "@bob:example.org", "content": { "ciphertext": "…" },
        });
        let tweaks = Map::new();
        let input = PushInput {
            sender_display_name: Some("Bob"),
            room_name: Some("Lunch"),
            room_alias: Some("#lunch:example.org"),
            ..PushInput::new(&event, &p, 42, &tweaks, Counts { unread: 7, missed_calls: None })
        };
        assert_eq!(
            notify_body(&input),
            json!({ "notification": {
                "event_id": "$ev1",
                "room_id": "!room:example.org",
                "prio": "high",
                "counts": { "unread": 7 },
                "devices": [{
                    "app_id": "org.example.app",
                    "pushkey": "pk1",
                    "pushkey_ts": 42,
                    "data": { "format": "event_id_only", "extra": true },
                    "tweaks": {},
                }],
            }})
        );
    }

    #[test]
    fn badge_body_has_counts_and_devices_only() {
        for data in [json!({ "url": URL }), json!({ "url": URL, "format": "event_id_only" })] {
            let p = pusher(data.clone());
            let mut expected_data = data.as_object().unwrap().clone();
            expected_data.remove("url");
            assert_eq!(
                badge_body(&p, 9, Counts { unread: 0, missed_calls: None }),
                json!({ "notification": {
                    "prio": "low",
                    "counts": { "unread": 0 },
                    "devices": [{
                        "app_id": "org.example.app",
                        "pushkey": "pk1",
                        "pushkey_ts": 9,
                        "data": expected_data,
                    }],
                }})
            );
        }
        let p = pusher(json!({ "url": URL }));
        assert_eq!(
            badge_body(&p, 9, Counts { unread: 2, missed_calls: Some(1) })["notification"]["counts"],
            json!({ "unread": 2, "missed_calls": 1 })
        );
    }

    #[test]
    fn badge_body_is_read_as_badge_only_by_herald() {
        let p = pusher(json!({ "url": URL }));
        let body = badge_body(&p, 9, Counts { unread: 0, missed_calls: None });
        let n = crate::notification::parse(body.to_string().as_bytes()).unwrap();
        assert!(n.is_badge_only());
        assert_eq!(n.counts.unread, Some(0));
        assert_eq!(n.prio, Prio::Low);
        // And a full body parses as an event notification.
        let event = message_event();
        let tweaks = Map::new();
        let input = PushInput::new(&event, &p, 1, &tweaks, Counts::default());
        let n = crate::notification::parse(notify_body(&input).to_string().as_bytes()).unwrap();
        assert!(!n.is_badge_only());
    }

    #[test]
    fn prio_table() {
        let tweaks = |v: Value| v.as_object().unwrap().clone();
        let message = json!({ "type": "m.room.message" });
        let encrypted = json!({ "type": "m.room.encrypted" });
        let no_type = json!({});
        #[rustfmt::skip]
        let cases = [
            (&message, json!({}), Prio::Low),
            (&no_type, json!({}), Prio::Low),
            (&encrypted, json!({}), Prio::High),
            (&message, json!({ "highlight": true }), Prio::High),
            (&message, json!({ "highlight": false }), Prio::Low),
            (&message, json!({ "highlight": "true" }), Prio::Low),
            (&message, json!({ "sound": "default" }), Prio::High),
            (&message, json!({ "sound": "ring.caf" }), Prio::High),
            (&message, json!({ "sound": "" }), Prio::Low),
            (&message, json!({ "sound": null }), Prio::Low),
            (&message, json!({ "sound": false }), Prio::Low),
            (&message, json!({ "sound": {"name": "x"} }), Prio::High),
            (&message, json!({ "custom": "x" }), Prio::Low),
            (&encrypted, json!({ "highlight": false }), Prio::High),
        ];
        for (event, t, want) in cases {
            assert_eq!(prio(event, &tweaks(t.clone())), want, "{event} {t}");
        }
    }

    #[test]
    fn backoff_doubles_from_one_second_to_an_hour() {
        let b = Backoff::default();
        let secs: Vec<u64> = (0..16).map(|n| b.next(n).as_secs()).collect();
        assert_eq!(
            secs,
            [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 3600, 3600, 3600, 3600]
        );
        for n in [31, 32, 64, 1000, u32::MAX] {
            assert_eq!(b.next(n), Duration::from_secs(3600), "{n}");
        }
        assert_eq!(GIVE_UP_AFTER, Duration::from_secs(86_400));
        // The whole schedule to the cap fits many times into the give-up window.
        let to_cap: Duration = (0..12).map(|n| b.next(n)).sum();
        assert!(to_cap < GIVE_UP_AFTER);
    }

    #[test]
    fn is_rejected_matches_exactly() {
        let reply = GatewayReply { rejected: vec!["a".into(), "bb".into()] };
        assert!(is_rejected(&reply, "a"));
        assert!(is_rejected(&reply, "bb"));
        assert!(!is_rejected(&reply, "b"));
        assert!(!is_rejected(&GatewayReply::default(), "a"));
    }

    // -- GatewayClient against a loopback server ------------------------------------------

    /// What the fake gateway does with each connection.
    #[derive(Clone)]
    enum Behaviour {
        /// Answer every request with this status and body.
        Reply(StatusCode, &'static str),
        /// Read the request, then reset the TCP connection.
        Reset,
        /// Read the request and never answer.
        Hang,
    }

    /// One request as the gateway saw it.
    struct Seen {
        method: Method,
        path: String,
        content_type: Option<String>,
        body: Value,
    }

    /// Starts a gateway on 127.0.0.1:0 (listening before it returns); returns its notify URL.
    async fn gateway(behaviour: Behaviour) -> (String, mpsc::UnboundedReceiver<Seen>) {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let url = format!("http://{}{NOTIFY_PATH}", listener.local_addr().unwrap());
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let Ok((mut tcp, _)) = listener.accept().await else { return };
                let behaviour = behaviour.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    match behaviour {
                        Behaviour::Reply(status, body) => {
                            let service =
                                hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                                    let tx = tx.clone();
                                    async move {
                                        let (parts, incoming) = req.into_parts();
                                        let bytes = incoming.collect().await?.to_bytes();
                                        let _ = tx.send(Seen {
                                            method: parts.method,
                                            path: parts.uri.path().to_owned(),
                                            content_type: parts
                                                .headers
                                                .get(header::CONTENT_TYPE)
                                                .map(|v| v.to_str().unwrap().to_owned()),
                                            body: serde_json::from_slice(&bytes)
                                                .unwrap_or(Value::Null),
                                        });
                                        let mut response =
                                            hyper::Response::new(Full::new(Bytes::from(body)));
                                        *response.status_mut() = status;
                                        Ok::<_, hyper::Error>(response)
                                    }
                                });
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(tcp), service)
                                .await;
                        }
                        Behaviour::Reset => {
                            let mut buf = [0u8; 1024];
                            let _ = tcp.read(&mut buf).await;
                            let _ = tcp.set_zero_linger();
                            drop(tcp);
                        }
                        Behaviour::Hang => {
                            let mut buf = [0u8; 1024];
                            let _ = tcp.read(&mut buf).await;
                            std::future::pending::<()>().await;
                        }
                    }
                });
            }
        });
        (url, rx)
    }

    fn client() -> GatewayClient {
        GatewayClient::new(Duration::from_millis(200)).unwrap()
    }

    #[tokio::test]
    async fn post_200_with_rejected_list() {
        let (url, mut seen) =
            gateway(Behaviour::Reply(StatusCode::OK, r#"{"rejected": ["pk1", "pk2"]}"#)).await;
        let p = pusher(json!({ "url": url }));
        let body = badge_body(&p, 1, Counts { unread: 2, missed_calls: None });
        let reply = client().post(&url, &body).await.unwrap();
        assert_eq!(reply, GatewayReply { rejected: vec!["pk1".into(), "pk2".into()] });
        assert!(is_rejected(&reply, &p.pushkey));
        let request = seen.recv().await.unwrap();
        assert_eq!(request.method, Method::POST);
        assert_eq!(request.path, NOTIFY_PATH);
        assert_eq!(request.content_type.as_deref(), Some("application/json"));
        assert_eq!(request.body, body);
    }

    #[tokio::test]
    async fn post_200_without_rejected_is_empty_and_reuses_the_client() {
        let (url, _seen) = gateway(Behaviour::Reply(StatusCode::OK, "{}")).await;
        let client = client();
        for _ in 0..3 {
            let reply = client.post(&url, &json!({"notification": {}})).await.unwrap();
            assert!(reply.rejected.is_empty());
        }
        let (url, _seen) = gateway(Behaviour::Reply(StatusCode::OK, r#"{"rejected": null}"#)).await;
        assert_eq!(client.post(&url, &json!({})).await.unwrap(), GatewayReply::default());
    }

    #[tokio::test]
    async fn post_500_is_a_retryable_status_error() {
        let (url, _seen) = gateway(Behaviour::Reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            r#"{"errcode":"M_UNKNOWN"}"#,
        ))
        .await;
        let err = client().post(&url, &json!({})).await.unwrap_err();
        assert!(
            matches!(
                err,
                SendError::Status { status: StatusCode::INTERNAL_SERVER_ERROR, retry_after: None }
            ),
            "{err:?}"
        );
        assert!(err.is_retryable());
        assert_eq!(err.to_string(), "push gateway answered HTTP 500 Internal Server Error");
    }

    #[tokio::test]
    async fn post_200_with_unusable_bodies_is_bad_reply() {
        for (body, why) in [
            ("<html>oops</html>", "body is not JSON"),
            ("", "body is not JSON"),
            (r#"["pk1"]"#, "body is not a JSON object"),
            (r#"{"rejected": "pk1"}"#, "`rejected` is not an array of strings"),
            (r#"{"rejected": [1]}"#, "`rejected` is not an array of strings"),
        ] {
            let (url, _seen) = gateway(Behaviour::Reply(StatusCode::OK, body)).await;
            let err = client().post(&url, &json!({})).await.unwrap_err();
            assert!(matches!(err, SendError::BadReply(w) if w == why), "{body}: {err:?}");
            assert!(err.is_retryable());
        }
    }

    #[tokio::test]
    async fn post_to_a_connection_reset_is_a_transport_error() {
        let (url, _seen) = gateway(Behaviour::Reset).await;
        let err = client().post(&url, &json!({})).await.unwrap_err();
        assert!(matches!(err, SendError::Transport(_)), "{err:?}");
        assert!(err.is_retryable());
        assert!(!err.to_string().contains("127.0.0.1"), "{err}");
    }

    #[tokio::test]
    async fn post_to_a_silent_gateway_times_out() {
        let (url, _seen) = gateway(Behaviour::Hang).await;
        let started = tokio::time::Instant::now();
        let err = client().post(&url, &json!({})).await.unwrap_err();
        assert!(matches!(err, SendError::Timeout(d) if d == Duration::from_millis(200)), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(err.is_retryable());
    }

    #[tokio::test]
    async fn post_to_nothing_listening_is_a_transport_error() {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let url = format!("http://{addr}{NOTIFY_PATH}");
        let err = client().post(&url, &json!({})).await.unwrap_err();
        assert!(matches!(err, SendError::Transport(_)), "{err:?}");
    }

    #[tokio::test]
    async fn post_to_an_unparseable_url_is_not_retryable() {
        for url in ["not a url", "/_matrix/push/v1/notify"] {
            let err = client().post(url, &json!({})).await.unwrap_err();
            assert!(matches!(err, SendError::InvalidUrl), "{url}: {err:?}");
            assert!(!err.is_retryable());
        }
    }
}
