//! Push rules (client-server API, "Push notifications"): the rule model exactly as the spec's
//! JSON (`m.push_rules` account data and the push-rules API), the server-default rules, and a
//! compiled evaluator that decides whether, and how, an event notifies one user.
//!
//! ```text
//! Ruleset::for_user(user, &their m.push_rules)   server defaults merged with the user's rules
//!   → CompiledRuleset::compile(&ruleset, user)    once per rule-set change: globs, keys
//! FlatEvent::new(&event)                          once per event, shared by every recipient
//!   → compiled.evaluate(&flat, &RoomCtx)          per recipient: the first matching rule
//! ```
//!
//! Rules are tried kind by kind (override, content, room, sender, underride), user rules before
//! the server defaults of their kind, except `.m.rule.master`, which comes first of all. The first
//! enabled rule whose conditions all hold decides; its `actions` may be empty (no notification).
//!
//! Forward compatible: unknown condition kinds, and known ones with unusable parameters, are kept
//! as [`Condition::Unknown`] and never match; unknown actions are kept as [`Action::Unknown`] and
//! do nothing; the legacy `dont_notify` and `coalesce` actions are dropped when read.
//!
//! Pure: no I/O, no async, no logging, and no panic on any input.

mod base_rules;
mod conditions;
pub mod edit;
pub mod evaluator;
mod event;
mod glob;

use serde::de::Deserializer;
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub use conditions::{DisplayName, PowerLevels, RoomCtx};
pub use evaluator::{CompiledRuleset, Evaluation, Match};
pub use event::{FlatEvent, MAX_SAFE_INTEGER};

/// The content of the `m.push_rules` account-data event: `{"global": {…}}`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PushRulesContent {
    #[serde(default)]
    pub global: Ruleset,
}

/// The five kinds of rule, in the order they are tried.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleKind {
    Override,
    Content,
    Room,
    Sender,
    Underride,
}

impl RuleKind {
    pub const ALL: [RuleKind; 5] = [
        RuleKind::Override,
        RuleKind::Content,
        RuleKind::Room,
        RuleKind::Sender,
        RuleKind::Underride,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RuleKind::Override => "override",
            RuleKind::Content => "content",
            RuleKind::Room => "room",
            RuleKind::Sender => "sender",
            RuleKind::Underride => "underride",
        }
    }
}

/// A push rule set: the rules of each kind, highest priority first.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Ruleset {
    #[serde(rename = "override", default)]
    pub override_: Vec<PushRule>,
    #[serde(default)]
    pub content: Vec<PushRule>,
    #[serde(default)]
    pub room: Vec<PushRule>,
    #[serde(default)]
    pub sender: Vec<PushRule>,
    #[serde(default)]
    pub underride: Vec<PushRule>,
}

impl Ruleset {
    pub fn rules(&self, kind: RuleKind) -> &Vec<PushRule> {
        match kind {
            RuleKind::Override => &self.override_,
            RuleKind::Content => &self.content,
            RuleKind::Room => &self.room,
            RuleKind::Sender => &self.sender,
            RuleKind::Underride => &self.underride,
        }
    }

    pub fn rules_mut(&mut self, kind: RuleKind) -> &mut Vec<PushRule> {
        match kind {
            RuleKind::Override => &mut self.override_,
            RuleKind::Content => &mut self.content,
            RuleKind::Room => &mut self.room,
            RuleKind::Sender => &mut self.sender,
            RuleKind::Underride => &mut self.underride,
        }
    }

    /// Every rule with its kind, in evaluation order.
    pub fn iter(&self) -> impl Iterator<Item = (RuleKind, &PushRule)> {
        RuleKind::ALL.into_iter().flat_map(move |k| self.rules(k).iter().map(move |r| (k, r)))
    }

    /// The server-default rules for `user_id` (a full Matrix user ID), in the spec's order.
    pub fn server_default(user_id: &str) -> Ruleset {
        base_rules::server_default(user_id)
    }

    /// The rule set that applies to `user_id`: the server defaults merged with the user's own
    /// rules (`user`, their `m.push_rules` `global` content). A user rule whose id starts with
    /// `.` only changes `enabled` and `actions` of the server-default rule of that kind and id;
    /// all other user rules keep their order and come before the defaults of their kind
    /// (after `.m.rule.master`). Returns the ids of `.` rules that name no server default, which
    /// are ignored.
    pub fn for_user(user_id: &str, user: &Ruleset) -> (Ruleset, Vec<String>) {
        let mut merged = Ruleset::server_default(user_id);
        let mut ignored = Vec::new();
        for kind in RuleKind::ALL {
            let mut own = Vec::new();
            for rule in user.rules(kind) {
                if rule.rule_id.starts_with('.') {
                    match merged.rules_mut(kind).iter_mut().find(|d| d.rule_id == rule.rule_id) {
                        Some(default) => {
                            default.enabled = rule.enabled;
                            default.actions.clone_from(&rule.actions);
                        }
                        None => ignored.push(rule.rule_id.clone()),
                    }
                } else {
                    own.push(PushRule { default: false, ..rule.clone() });
                }
            }
            let rules = merged.rules_mut(kind);
            // `.m.rule.master` stays ahead of every user rule.
            let at = usize::from(
                kind == RuleKind::Override
                    && rules.first().is_some_and(|r| r.rule_id == base_rules::MASTER),
            );
            rules.splice(at..at, own);
        }
        (merged, ignored)
    }
}

fn enabled_by_default() -> bool {
    true
}

/// One push rule, as the spec's `PushRule` object.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PushRule {
    /// Unique within its kind. Server-default rules start with `.`; a `room` rule's id is the
    /// room ID and a `sender` rule's id the sender's user ID.
    pub rule_id: String,
    /// Whether this is a server-default rule.
    #[serde(default)]
    pub default: bool,
    /// Disabled rules never match.
    #[serde(default = "enabled_by_default")]
    pub enabled: bool,
    /// `override` and `underride` only: all must hold; none (or absent) always matches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conditions: Option<Vec<Condition>>,
    /// `content` only: the glob matched against words of `content.body`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pattern: Option<String>,
    /// What to do when the rule matches; empty means "do not notify".
    #[serde(deserialize_with = "deserialize_actions")]
    pub actions: Vec<Action>,
}

/// What a matching rule does.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// `"notify"`: send a notification.
    Notify,
    /// `{"set_tweak": name, "value": …}`: set a tweak in the notification (`sound`,
    /// `highlight`, or any other the client and gateway agree on). A `highlight` with no value
    /// means `true`.
    SetTweak { name: String, value: Option<Value> },
    /// Anything else, kept as it was written; it does nothing.
    Unknown(Value),
}

impl Action {
    /// Reads one action; `None` for the legacy `dont_notify` and `coalesce`, which the spec says
    /// to drop.
    pub fn from_json(value: Value) -> Option<Action> {
        match &value {
            Value::String(s) if s == "notify" => Some(Action::Notify),
            Value::String(s) if s == "dont_notify" || s == "coalesce" => None,
            Value::Object(o) => match o.get("set_tweak") {
                Some(Value::String(name)) => {
                    Some(Action::SetTweak { name: name.clone(), value: o.get("value").cloned() })
                }
                _ => Some(Action::Unknown(value)),
            },
            _ => Some(Action::Unknown(value)),
        }
    }

    pub fn to_json(&self) -> Value {
        match self {
            Action::Notify => Value::from("notify"),
            Action::SetTweak { name, value } => {
                let mut o = Map::new();
                o.insert("set_tweak".into(), Value::from(name.as_str()));
                if let Some(v) = value {
                    o.insert("value".into(), v.clone());
                }
                Value::Object(o)
            }
            Action::Unknown(v) => v.clone(),
        }
    }
}

impl Serialize for Action {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Action::Notify => s.serialize_str("notify"),
            Action::SetTweak { name, value } => {
                let mut map = s.serialize_map(Some(1 + usize::from(value.is_some())))?;
                map.serialize_entry("set_tweak", name)?;
                if let Some(v) = value {
                    map.serialize_entry("value", v)?;
                }
                map.end()
            }
            Action::Unknown(v) => v.serialize(s),
        }
    }
}

fn deserialize_actions<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Action>, D::Error> {
    Ok(Vec::<Value>::deserialize(d)?.into_iter().filter_map(Action::from_json).collect())
}

/// A JSON value `event_property_is` and `event_property_contains` can compare: a string, an
/// integer within ±(2^53−1), a boolean or null.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scalar {
    String(String),
    Int(i64),
    Bool(bool),
    Null,
}

impl Scalar {
    /// `None` for floats, integers outside ±(2^53−1), arrays and objects.
    pub fn from_json(value: &Value) -> Option<Scalar> {
        match value {
            Value::String(s) => Some(Scalar::String(s.clone())),
            Value::Number(n) => n.as_i64().filter(|i| i.abs() <= MAX_SAFE_INTEGER).map(Scalar::Int),
            Value::Bool(b) => Some(Scalar::Bool(*b)),
            Value::Null => Some(Scalar::Null),
            Value::Array(_) | Value::Object(_) => None,
        }
    }

    pub fn to_json(&self) -> Value {
        match self {
            Scalar::String(s) => Value::from(s.as_str()),
            Scalar::Int(i) => Value::from(*i),
            Scalar::Bool(b) => Value::from(*b),
            Scalar::Null => Value::Null,
        }
    }
}

/// A condition of an `override` or `underride` rule.
#[derive(Clone, Debug, PartialEq)]
pub enum Condition {
    /// The string at `key` matches the glob `pattern` (whole value; words of `content.body`).
    EventMatch { key: String, pattern: String },
    /// The value at `key` equals `value` exactly (same type, no conversion).
    EventPropertyIs { key: String, value: Scalar },
    /// The array at `key` has an element equal to `value`.
    EventPropertyContains { key: String, value: Scalar },
    /// `content.body` contains the user's display name in the room, as a word.
    ContainsDisplayName,
    /// The room's member count compares with `is` (`2`, `==2`, `<10`, `>=3`, …).
    RoomMemberCount { is: String },
    /// The sender's power level is at least the room's `notifications.<key>` level.
    SenderNotificationPermission { key: String },
    /// An unknown kind, or a known one with missing or unusable parameters: kept, never
    /// matches.
    Unknown(Value),
}

impl Condition {
    pub fn from_json(value: Value) -> Condition {
        let parsed = (|| {
            let o = value.as_object()?;
            let text = |field: &str| o.get(field)?.as_str().map(str::to_owned);
            Some(match o.get("kind")?.as_str()? {
                "event_match" => {
                    Condition::EventMatch { key: text("key")?, pattern: text("pattern")? }
                }
                "event_property_is" => Condition::EventPropertyIs {
                    key: text("key")?,
                    value: Scalar::from_json(o.get("value")?)?,
                },
                "event_property_contains" => Condition::EventPropertyContains {
                    key: text("key")?,
                    value: Scalar::from_json(o.get("value")?)?,
                },
                "contains_display_name" => Condition::ContainsDisplayName,
                "room_member_count" => Condition::RoomMemberCount { is: text("is")? },
                "sender_notification_permission" => {
                    Condition::SenderNotificationPermission { key: text("key")? }
                }
                _ => return None,
            })
        })();
        parsed.unwrap_or(Condition::Unknown(value))
    }

    pub fn to_json(&self) -> Value {
        let (kind, fields): (&str, Vec<(&str, Value)>) = match self {
            Condition::EventMatch { key, pattern } => (
                "event_match",
                vec![("key", key.as_str().into()), ("pattern", pattern.as_str().into())],
            ),
            Condition::EventPropertyIs { key, value } => (
                "event_property_is",
                vec![("key", key.as_str().into()), ("value", value.to_json())],
            ),
            Condition::EventPropertyContains { key, value } => (
                "event_property_contains",
                vec![("key", key.as_str().into()), ("value", value.to_json())],
            ),
            Condition::ContainsDisplayName => ("contains_display_name", vec![]),
            Condition::RoomMemberCount { is } => {
                ("room_member_count", vec![("is", is.as_str().into())])
            }
            Condition::SenderNotificationPermission { key } => {
                ("sender_notification_permission", vec![("key", key.as_str().into())])
            }
            Condition::Unknown(v) => return v.clone(),
        };
        let mut o = Map::new();
        o.insert("kind".into(), kind.into());
        o.extend(fields.into_iter().map(|(k, v)| (k.to_owned(), v)));
        Value::Object(o)
    }
}

impl Serialize for Condition {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_json().serialize(s)
    }
}

impl<'de> Deserialize<'de> for Condition {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Value::deserialize(d).map(Condition::from_json)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn rules_read_and_write_the_spec_json() {
        let rule = json!({
            "rule_id": "cake",
            "default": false,
            "enabled": true,
            "pattern": "cake*lie",
            "actions": ["notify", {"set_tweak": "sound", "value": "cakealarm.wav"},
                        {"set_tweak": "highlight"}]
        });
        let parsed: PushRule = serde_json::from_value(rule.clone()).unwrap();
        assert_eq!(parsed.actions.len(), 3);
        assert_eq!(serde_json::to_value(&parsed).unwrap(), rule);
    }

    #[test]
    fn legacy_actions_are_dropped_and_unknown_ones_kept() {
        let rule: PushRule = serde_json::from_value(json!({
            "rule_id": "x", "enabled": true,
            "actions": ["dont_notify", "coalesce", "org.example.beep", {"org.example": 1},
                        {"set_tweak": 5}]
        }))
        .unwrap();
        assert_eq!(
            serde_json::to_value(&rule.actions).unwrap(),
            json!(["org.example.beep", {"org.example": 1}, {"set_tweak": 5}])
        );
        assert!(rule.actions.iter().all(|a| matches!(a, Action::Unknown(_))));
    }

    #[test]
    fn conditions_round_trip_and_unusable_ones_are_unknown() {
        let known = json!([
            {"kind": "event_match", "key": "content.body", "pattern": "x"},
            {"kind": "event_property_is", "key": "content.m\\.federate", "value": true},
            {"kind": "event_property_contains", "key": "content.alt_aliases", "value": "#a:b"},
            {"kind": "contains_display_name"},
            {"kind": "room_member_count", "is": "<=10"},
            {"kind": "sender_notification_permission", "key": "room"},
            {"kind": "event_property_is", "key": "k", "value": null},
            {"kind": "event_property_is", "key": "k", "value": -9007199254740991_i64}
        ]);
        let parsed: Vec<Condition> = serde_json::from_value(known.clone()).unwrap();
        assert!(parsed.iter().all(|c| !matches!(c, Condition::Unknown(_))), "{parsed:?}");
        assert_eq!(serde_json::to_value(&parsed).unwrap(), known);

        let unknown = json!([
            {"kind": "org.example.custom", "x": 1},
            {"kind": "event_match", "key": "content.body"},
            {"kind": "event_match", "key": 1, "pattern": "x"},
            {"kind": "event_property_is", "key": "k", "value": 1.5},
            {"kind": "event_property_is", "key": "k", "value": 9007199254740992_i64},
            {"kind": "event_property_is", "key": "k", "value": [1]},
            {"kind": "event_property_contains", "key": "k"},
            {"kind": "room_member_count"},
            {"no_kind": true},
            "event_match"
        ]);
        let parsed: Vec<Condition> = serde_json::from_value(unknown.clone()).unwrap();
        assert!(parsed.iter().all(|c| matches!(c, Condition::Unknown(_))), "{parsed:?}");
        assert_eq!(serde_json::to_value(&parsed).unwrap(), unknown, "kept as written");
    }

    #[test]
    fn push_rules_content_reads_every_kind() {
        let content: PushRulesContent = serde_json::from_value(json!({"global": {
            "override": [{"rule_id": "o", "enabled": true, "conditions": [], "actions": []}],
            "content": [{"rule_id": "c", "enabled": true, "pattern": "p", "actions": []}],
            "room": [{"rule_id": "!r:x", "enabled": true, "actions": []}],
            "sender": [{"rule_id": "@s:x", "enabled": false, "actions": []}],
            "underride": [{"rule_id": "u", "actions": ["notify"]}],
            "org.example.kind": []
        }}))
        .unwrap();
        let ids: Vec<_> = content.global.iter().map(|(k, r)| (k, r.rule_id.as_str())).collect();
        assert_eq!(
            ids,
            [
                (RuleKind::Override, "o"),
                (RuleKind::Content, "c"),
                (RuleKind::Room, "!r:x"),
                (RuleKind::Sender, "@s:x"),
                (RuleKind::Underride, "u"),
            ]
        );
        assert!(content.global.underride[0].enabled, "enabled defaults to true");
    }

    #[test]
    fn user_rules_merge_around_the_defaults() {
        let user: Ruleset = serde_json::from_value(json!({
            "override": [
                {"rule_id": ".m.rule.master", "enabled": true, "actions": []},
                {"rule_id": "mine", "default": true, "enabled": true, "conditions": [], "actions": ["notify"]},
                {"rule_id": ".m.rule.suppress_notices", "enabled": false, "actions": ["notify"]},
                {"rule_id": ".m.rule.nonexistent", "enabled": true, "actions": []},
                {"rule_id": ".m.rule.message", "enabled": false, "actions": []}
            ],
            "content": [{"rule_id": "c1", "enabled": true, "pattern": "x", "actions": []}]
        }))
        .unwrap();
        let (merged, ignored) = Ruleset::for_user("@alice:example.org", &user);
        assert_eq!(ignored, [".m.rule.nonexistent", ".m.rule.message"], "wrong kind too");
        let ids: Vec<_> = merged.override_.iter().map(|r| r.rule_id.as_str()).collect();
        assert_eq!(&ids[..3], [".m.rule.master", "mine", ".m.rule.suppress_notices"]);
        assert!(merged.override_[0].enabled);
        assert!(!merged.override_[1].default, "a user rule is never a default");
        assert!(!merged.override_[2].enabled);
        assert_eq!(merged.override_[2].actions, [Action::Notify]);
        assert_eq!(merged.override_[2].conditions.as_ref().unwrap().len(), 1, "definition kept");
        let content: Vec<_> = merged.content.iter().map(|r| r.rule_id.as_str()).collect();
        assert_eq!(content, ["c1", ".m.rule.contains_user_name"]);
    }
}
