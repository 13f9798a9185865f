//! Push Gateway API wire types: the body of `POST /_matrix/push/v1/notify` and its answer.
//!
//! Field docs paraphrase the spec (`../shared/spec`, "Push Gateway API"). Parsing is lenient
//! where the spec lets it be (unknown fields are ignored, IDs are not grammar-checked) and strict
//! on types, so a malformed request gets `M_BAD_JSON` naming the field instead of a guess.
//! [`parse`] is the only entry point; it never panics on any input.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

use crate::providers::pushkey_hash;

/// `{"notification": …}`.
#[derive(Debug, Clone, Deserialize)]
pub struct NotifyRequest {
    pub notification: Notification,
}

/// Information about one event (or a badge update) for a set of devices.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Notification {
    /// The event's id; absent for badge-only updates. Used to suppress duplicates.
    #[serde(default)]
    pub event_id: Option<String>,
    /// The room the event happened in.
    #[serde(default)]
    pub room_id: Option<String>,
    /// The event type (`m.room.message`, …).
    #[serde(default, rename = "type")]
    pub event_type: Option<String>,
    /// The event's sender.
    #[serde(default)]
    pub sender: Option<String>,
    /// The sender's current display name in the room.
    #[serde(default)]
    pub sender_display_name: Option<String>,
    /// The room's name.
    #[serde(default)]
    pub room_name: Option<String>,
    /// An alias for the room.
    #[serde(default)]
    pub room_alias: Option<String>,
    /// True when the user is the target of a membership event.
    #[serde(default)]
    pub user_is_target: Option<bool>,
    /// `high` (default) or `low`.
    #[serde(default)]
    pub prio: Prio,
    /// The event's `content`, when the pusher sent it.
    #[serde(default)]
    pub content: Option<Map<String, Value>>,
    /// Unacknowledged communications for the user.
    #[serde(default, deserialize_with = "object")]
    pub counts: Counts,
    /// The devices to notify; never empty after [`parse`].
    pub devices: Vec<Device>,
}

/// Deserializes a struct only from a JSON object (serde's derive also takes arrays) or null.
fn object<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: serde::de::DeserializeOwned + Default,
{
    match Option::<Map<String, Value>>::deserialize(d)? {
        None => Ok(T::default()),
        Some(map) => serde_path_to_error::deserialize(Value::Object(map))
            .map_err(|e| serde::de::Error::custom(format!("{}: {}", e.path(), e.inner()))),
    }
}

/// Priority of a notification; an unknown string means the default, `high`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Prio {
    #[default]
    High,
    Low,
}

impl<'de> Deserialize<'de> for Prio {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = Option::<String>::deserialize(d)?;
        Ok(if s.as_deref() == Some("low") { Prio::Low } else { Prio::High })
    }
}

impl Prio {
    pub fn as_str(self) -> &'static str {
        match self {
            Prio::High => "high",
            Prio::Low => "low",
        }
    }
}

/// Unread counts; zero counts may be omitted by the homeserver.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct Counts {
    /// Unread messages over all the user's rooms.
    #[serde(default)]
    pub unread: Option<u64>,
    /// Unacknowledged missed calls over all the user's rooms.
    #[serde(default)]
    pub missed_calls: Option<u64>,
}

impl Counts {
    /// The badge a phone shows: unread messages plus missed calls.
    pub fn badge(&self) -> u64 {
        self.unread.unwrap_or(0).saturating_add(self.missed_calls.unwrap_or(0))
    }
}

/// One device (pusher) to notify. Its `Debug` shows the pushkey only as a short hash and `data`
/// only by its keys, so a stray `?device` in a log line leaks neither.
#[derive(Clone, Default, Deserialize)]
pub struct Device {
    /// The `app_id` given when the pusher was created.
    pub app_id: String,
    /// The `pushkey` given when the pusher was created (a device token, an endpoint, …).
    pub pushkey: String,
    /// Pusher data, minus `url`: `format`, `default_payload`, provider-specific keys.
    #[serde(default)]
    pub data: Option<Map<String, Value>>,
    /// Presentation tweaks added by push rules (`sound`, `highlight`, …).
    #[serde(default)]
    pub tweaks: Option<Map<String, Value>>,
}

impl fmt::Debug for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Device")
            .field("app_id", &self.app_id)
            .field("pushkey_hash", &pushkey_hash(&self.pushkey))
            .field("data_keys", &self.data.as_ref().map(|d| d.keys().collect::<Vec<_>>()))
            .field("tweaks", &self.tweaks)
            .finish()
    }
}

impl Device {
    /// `data.default_payload` when it is an object.
    pub fn default_payload(&self) -> Option<&Map<String, Value>> {
        self.data.as_ref()?.get("default_payload")?.as_object()
    }

    /// `data.format == "event_id_only"`.
    pub fn event_id_only(&self) -> bool {
        self.data.as_ref().and_then(|d| d.get("format")).and_then(Value::as_str)
            == Some("event_id_only")
    }

    /// `tweaks.sound` when it is a string.
    pub fn sound(&self) -> Option<&str> {
        self.tweaks.as_ref()?.get("sound")?.as_str()
    }
}

impl Notification {
    /// A notification with only counts (no event): a badge update.
    pub fn is_badge_only(&self) -> bool {
        self.event_id.is_none() && self.event_type.is_none()
    }
}

/// The 200 answer: pushkeys the providers said are invalid.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotifyResponse {
    pub rejected: Vec<String>,
}

/// Why a body could not be read as a notify request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Not JSON at all (or JSON with NaN/Infinity, which JSON does not have).
    #[error("request body is not valid JSON: {0}")]
    NotJson(String),
    /// JSON, but not the shape of a notify request; the message names the field.
    #[error("{0}")]
    BadJson(String),
}

/// Reads a notify request body, naming the offending field on a type error.
pub fn parse(body: &[u8]) -> Result<Notification, ParseError> {
    // The common case, a valid body, takes the plain parser; only a failure is parsed again
    // with path tracking to name the field (the tracking costs on every value).
    let request = match serde_json::from_slice::<NotifyRequest>(body) {
        Ok(request) => request,
        Err(_) => return Err(parse_error(body)),
    };
    if request.notification.devices.is_empty() {
        return Err(ParseError::BadJson("notification.devices: must not be empty".into()));
    }
    Ok(request.notification)
}

/// Why `body` failed the plain parse, naming the offending field: the slow parse with path
/// tracking, run only on a body that already failed.
fn parse_error(body: &[u8]) -> ParseError {
    let mut de = serde_json::Deserializer::from_slice(body);
    match serde_path_to_error::deserialize::<_, NotifyRequest>(&mut de) {
        Err(e) => {
            let path = e.path().to_string();
            // A type error can come before a syntax error later in the body; only JSON that is
            // valid as a whole is "bad JSON" rather than "not JSON".
            if let Err(syntax) = serde_json::from_slice::<serde::de::IgnoredAny>(body) {
                return ParseError::NotJson(syntax.to_string());
            }
            classify(e.into_inner(), &path)
        }
        // The request parsed, so what failed is the text after it.
        Ok(_) => match de.end() {
            Err(e) => classify(e, "."),
            Ok(()) => ParseError::BadJson("body: not a notify request".into()),
        },
    }
}

fn classify(e: serde_json::Error, path: &str) -> ParseError {
    match e.classify() {
        serde_json::error::Category::Data => {
            let what = strip_position(&e.to_string());
            if path == "." {
                ParseError::BadJson(format!("body: {what}"))
            } else {
                ParseError::BadJson(format!("{path}: {what}"))
            }
        }
        _ => ParseError::NotJson(e.to_string()),
    }
}

/// serde_json appends " at line L column C", useful for syntax errors but noise for type errors.
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_owned(),
        None => message.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bad(body: &str) -> String {
        match parse(body.as_bytes()) {
            Err(ParseError::BadJson(m)) => m,
            other => panic!("expected BadJson for {body}, got {other:?}"),
        }
    }

    #[test]
    fn spec_example_parses() {
        let n = parse(
            br##"{"notification":{"content":{"body":"hi","msgtype":"m.text"},"counts":{"missed_calls":1,"unread":2},
            "devices":[{"app_id":"a","data":{},"pushkey":"k","pushkey_ts":12345678,"tweaks":{"sound":"bing"}}],
            "event_id":"$e","prio":"high","room_alias":"#r:x","room_id":"!r:x","room_name":"R",
            "sender":"@u:x","sender_display_name":"U","type":"m.room.message","extra":[1]}}"##,
        )
        .unwrap();
        assert_eq!(n.counts.badge(), 3);
        assert_eq!(n.devices[0].sound(), Some("bing"));
        assert_eq!(n.event_type.as_deref(), Some("m.room.message"));
    }

    #[test]
    fn not_json_and_nan_are_not_json() {
        for body in ["{", "nope", r#"{"notification": NaN}"#, "", r#"{"a":1} trailing"#] {
            assert!(matches!(parse(body.as_bytes()), Err(ParseError::NotJson(_))), "{body}");
        }
    }

    #[test]
    fn shape_errors_name_the_field() {
        assert!(bad("[]").starts_with("body"));
        assert!(bad("3").starts_with("body"));
        assert!(bad("{}").contains("notification"));
        assert!(bad(r#"{"notification":{}}"#).contains("devices"));
        assert!(bad(r#"{"notification":{"devices":[]}}"#).contains("notification.devices"));
        assert!(bad(r#"{"notification":{"devices":{}}}"#).contains("notification.devices"));
        assert!(bad(r#"{"notification":{"devices":[{"pushkey":"k"}]}}"#).contains("app_id"));
        assert!(
            bad(r#"{"notification":{"devices":[{"app_id":1,"pushkey":"k"}]}}"#)
                .contains("devices[0].app_id")
        );
        assert!(bad(r#"{"notification":{"devices":[{"app_id":"a","pushkey":"k"}],"counts":{"unread":"2"}}}"#)
            .contains("counts: unread"));
        assert!(
            bad(r#"{"notification":{"devices":[{"app_id":"a","pushkey":"k","tweaks":[]}]}}"#)
                .contains("tweaks")
        );
        assert!(
            bad(r#"{"notification":{"devices":[{"app_id":"a","pushkey":"k","data":"x"}]}}"#)
                .contains("data")
        );
        assert!(
            bad(r#"{"notification":{"devices":[{"app_id":"a","pushkey":"k"}],"prio":5}}"#)
                .contains("prio")
        );
    }

    #[test]
    fn device_debug_hides_the_pushkey_and_data_values() {
        let n = parse(
            br#"{"notification":{"devices":[{"app_id":"a","pushkey":"secret-token-123",
            "data":{"auth":"secret-auth","default_payload":{"k":"secret-payload"}}}]}}"#,
        )
        .unwrap();
        for text in [format!("{:?}", n.devices[0]), format!("{n:?}"), format!("{:#?}", n.devices)] {
            assert!(!text.contains("secret"), "{text}");
            assert!(text.contains(&pushkey_hash("secret-token-123")), "{text}");
            assert!(text.contains("default_payload") && text.contains("auth"), "{text}");
        }
    }

    #[test]
    fn prio_defaults_to_high_and_nulls_are_absent() {
        let n = parse(br#"{"notification":{"devices":[{"app_id":"a","pushkey":"k"}],"prio":null,"event_id":null}}"#)
            .unwrap();
        assert_eq!(n.prio, Prio::High);
        assert!(n.is_badge_only());
    }
}
