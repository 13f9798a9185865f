//! How `herald demo` prints: one line per hop of the flow, a label column on the left, with ANSI
//! colours only when enabled. Also renders provider payloads the way a phone would show them.
//!
//! Never prints keys or tokens; pushkeys only through [`short`].

use serde_json::{Map, Value};

/// Width of the label column.
const LABEL_WIDTH: usize = 24;

/// A text style; each maps to one ANSI SGR code.
#[derive(Clone, Copy)]
pub enum Style {
    Bold,
    Dim,
    Red,
    Green,
    Yellow,
    Blue,
    Magenta,
    Cyan,
}

impl Style {
    fn sgr(self) -> &'static str {
        match self {
            Style::Bold => "1",
            Style::Dim => "2",
            Style::Red => "31",
            Style::Green => "32",
            Style::Yellow => "33",
            Style::Blue => "34",
            Style::Magenta => "35",
            Style::Cyan => "36",
        }
    }
}

/// Prints the narration to stdout.
pub struct Out {
    color: bool,
}

impl Out {
    pub fn new(color: bool) -> Out {
        Out { color }
    }

    /// `text` in `style`, or as it is when colour is off.
    pub fn paint(&self, style: Style, text: &str) -> String {
        if self.color { format!("\x1b[{}m{text}\x1b[0m", style.sgr()) } else { text.to_owned() }
    }

    pub fn banner(&self, text: &str) {
        println!("{}", self.paint(Style::Bold, text));
    }

    /// A numbered section heading, after a blank line.
    pub fn section(&self, n: usize, title: &str) {
        println!();
        println!("{}", self.paint(Style::Bold, &format!("{n}. {title}")));
    }

    /// One line: `label` (padded, in `style`) then `text`.
    pub fn line(&self, style: Style, label: &str, text: &str) {
        let padded = format!("{label:<LABEL_WIDTH$}");
        println!("  {} {text}", self.paint(style, &padded));
    }

    /// A line in the dim style, for asides.
    pub fn note(&self, text: &str) {
        println!("  {}", self.paint(Style::Dim, &format!("{:LABEL_WIDTH$} {text}", "")));
    }
}

/// The first characters of a pushkey, enough to tell devices apart and no more.
pub fn short(pushkey: &str) -> String {
    let head: String = pushkey.chars().take(6).collect();
    format!("{head}…")
}

/// Element iOS's English strings for the `loc-key`s herald sends.
const LOC_KEYS: &[(&str, &str)] = &[
    ("MSG_FROM_USER", "Message from %@"),
    ("MSG_FROM_USER_IN_ROOM", "%@ posted in %@"),
    ("MSG_FROM_USER_WITH_CONTENT", "%@: %@"),
    ("MSG_FROM_USER_IN_ROOM_WITH_CONTENT", "%@ in %@: %@"),
    ("IMAGE_FROM_USER", "%@ sent you a picture %@"),
    ("IMAGE_FROM_USER_IN_ROOM", "%@ posted a picture %@ in %@"),
    ("ACTION_FROM_USER", "* %@ %@"),
    ("ACTION_FROM_USER_IN_ROOM", "%@: * %@ %@"),
    ("USER_INVITE_TO_NAMED_ROOM", "%@ has invited you to %@"),
    ("USER_INVITE_TO_CHAT", "%@ has invited you to chat"),
    ("VOICE_CALL_FROM_USER", "Call from %@"),
    ("VIDEO_CALL_FROM_USER", "Video call from %@"),
];

/// The alert text an iPhone shows for `aps.alert`, if there is one.
pub fn apns_alert_text(payload: &Value) -> Option<String> {
    let alert = payload.get("aps")?.get("alert")?;
    if let Some(text) = alert.as_str() {
        return Some(text.to_owned());
    }
    let key = alert.get("loc-key")?.as_str()?;
    let args: Vec<&str> = alert
        .get("loc-args")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let Some((_, template)) = LOC_KEYS.iter().find(|(k, _)| *k == key) else {
        return Some(format!("{key} {args:?}"));
    };
    let mut args = args.into_iter();
    let mut text = String::new();
    let mut rest = *template;
    while let Some(at) = rest.find("%@") {
        text.push_str(&rest[..at]);
        text.push_str(args.next().unwrap_or(""));
        rest = &rest[at + 2..];
    }
    text.push_str(rest);
    Some(text)
}

/// What herald put on the wire to APNs, briefly: `alert MSG_FROM_USER… ["Alice", …], badge 1,
/// sound "default", priority 10` (or `badge 0, priority 5`).
pub fn apns_summary(payload: &Value, priority: Option<&str>) -> String {
    let aps = payload.get("aps").and_then(Value::as_object);
    let mut parts = Vec::new();
    if let Some(alert) = aps.and_then(|a| a.get("alert")) {
        let key = alert.get("loc-key").and_then(Value::as_str).unwrap_or("?");
        let args = alert.get("loc-args").map(Value::to_string).unwrap_or_default();
        parts.push(format!("alert {key} {args}"));
    }
    if let Some(badge) = aps.and_then(|a| a.get("badge")) {
        parts.push(format!("badge {badge}"));
    }
    if let Some(sound) = aps.and_then(|a| a.get("sound")) {
        parts.push(format!("sound {sound}"));
    }
    if parts.is_empty() {
        parts.push(format!("payload {payload}"));
    }
    if let Some(p) = priority {
        parts.push(format!("priority {p}"));
    }
    parts.join(", ")
}

/// What the iPhone does with the payload.
pub fn apns_phone(payload: &Value) -> String {
    let aps = payload.get("aps");
    let badge = aps.and_then(|a| a.get("badge")).map(Value::to_string);
    match apns_alert_text(payload) {
        Some(text) => {
            let mut line = format!("banner \"{text}\"");
            if aps.and_then(|a| a.get("sound")).is_some() {
                line.push_str(" + sound");
            }
            if let Some(b) = badge {
                line.push_str(&format!(", app icon badge {b}"));
            }
            line
        }
        None => match badge {
            Some(b) => format!("no banner, no sound; app icon badge → {b}"),
            None => "a background push for the app".to_owned(),
        },
    }
}

/// The FCM data keys worth showing, in this order.
const FCM_KEYS: &[&str] =
    &["type", "membership", "sender_display_name", "room_name", "content_body", "unread"];

/// What herald put on the wire to FCM, briefly: the interesting `data` keys and the priority.
pub fn fcm_summary(message: &Value) -> String {
    let data = message.get("data").and_then(Value::as_object);
    let shown: Vec<String> =
        FCM_KEYS.iter().filter_map(|k| Some(format!("{k}: {}", data?.get(*k)?))).collect();
    let mut text = format!("data {{{}}}", shown.join(", "));
    if let Some(p) = message.get("android").and_then(|a| a.get("priority")).and_then(Value::as_str)
    {
        text.push_str(&format!(", android.priority {p}"));
    }
    text
}

/// What the Android app does with the data message (it builds its own notification).
pub fn fcm_phone(message: &Value) -> String {
    let empty = Map::new();
    let data = message.get("data").and_then(Value::as_object).unwrap_or(&empty);
    let get = |k: &str| data.get(k).and_then(Value::as_str);
    let unread = get("unread").unwrap_or("?");
    let from = get("sender_display_name").or(get("sender")).unwrap_or("someone");
    let room = get("room_name").map(|r| format!(" in {r}")).unwrap_or_default();
    match (get("type"), get("membership"), get("content_body")) {
        (None, _, _) => format!("app wakes silently; unread count → {unread}"),
        (Some("m.room.member"), Some("invite"), _) => {
            format!("app shows \"{from} invited you{}\"", room.replacen(" in ", " to ", 1))
        }
        (Some(_), _, Some(body)) => {
            format!("app shows \"{from}{room}: {body}\", unread {unread}")
        }
        (Some(kind), _, None) => format!("app shows a {kind} from {from}{room}"),
    }
}
