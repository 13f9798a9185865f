//! Conditions compiled for evaluation, and the room context they read.
//!
//! [`Cond::compile`] turns a [`Condition`] into its compiled form once (glob compiled, key
//! parsed); `None` means the condition can never hold (an unknown kind, a bad `is`), which
//! disables its rule. [`Cond::holds`] then runs with no allocation.

use std::collections::HashMap;

use serde_json::Value;

use super::event::{FlatEvent, Key, Leaf};
use super::glob::Glob;
use super::{Condition, MAX_SAFE_INTEGER, Scalar};

/// What the evaluator knows about the room and the recipient when an event arrives.
#[derive(Clone, Copy, Debug, Default)]
pub struct RoomCtx<'a> {
    /// The number of joined members; `room_member_count` never matches without it.
    pub member_count: Option<u64>,
    /// The recipient's display name in the room.
    pub display_name: Option<&'a DisplayName>,
    /// The room's power levels; `sender_notification_permission` never matches without them.
    pub power_levels: Option<&'a PowerLevels>,
}

/// A display name compiled for `contains_display_name`: matched literally (`*` and `?` are
/// plain characters), case-insensitively, as a word of `content.body`. An empty name matches
/// nothing.
#[derive(Clone, Debug)]
pub struct DisplayName(Option<Glob>);

impl DisplayName {
    pub fn new(name: &str) -> DisplayName {
        DisplayName((!name.is_empty()).then(|| Glob::literal(name)))
    }
}

/// A room's `m.room.power_levels` content, read once with one rule for every level: what
/// `sender_notification_permission` needs, and what the homeserver checks before an event or an
/// invite.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PowerLevels {
    pub users: HashMap<String, i64>,
    pub users_default: i64,
    /// `notifications`: the level needed per kind of notification (`room` is 50 unless set).
    pub notifications: HashMap<String, i64>,
    /// `events`: the level needed per event type.
    pub events: HashMap<String, i64>,
    pub events_default: i64,
    pub state_default: i64,
    pub invite: i64,
}

impl PowerLevels {
    /// The required level for `room` notifications when `notifications.room` is not set.
    pub const DEFAULT_ROOM_NOTIFICATION: i64 = 50;

    /// Reads a `m.room.power_levels` content. Levels may be integers or, as older room versions
    /// allow, strings holding an integer; anything else is skipped as if absent.
    pub fn from_content(content: &Value) -> PowerLevels {
        let level = |v: &Value| match v {
            Value::Number(n) => n.as_i64(),
            Value::String(s) => s.trim().parse().ok(),
            _ => None,
        };
        let levels = |field: &str| -> HashMap<String, i64> {
            content
                .get(field)
                .and_then(Value::as_object)
                .map(|o| o.iter().filter_map(|(k, v)| Some((k.clone(), level(v)?))).collect())
                .unwrap_or_default()
        };
        let single =
            |field: &str, default: i64| content.get(field).and_then(level).unwrap_or(default);
        PowerLevels {
            users: levels("users"),
            users_default: single("users_default", 0),
            notifications: levels("notifications"),
            events: levels("events"),
            events_default: single("events_default", 0),
            state_default: single("state_default", 50),
            invite: single("invite", 0),
        }
    }

    /// The level needed to send an event of type `kind` (a state event when `state`).
    pub fn event_level(&self, kind: &str, state: bool) -> i64 {
        match self.events.get(kind) {
            Some(level) => *level,
            None if state => self.state_default,
            None => self.events_default,
        }
    }

    pub fn user_level(&self, user_id: &str) -> i64 {
        self.users.get(user_id).copied().unwrap_or(self.users_default)
    }

    /// The level needed to trigger notifications of kind `key`; `None` when the room does not
    /// say and the spec gives no default.
    pub fn notification_level(&self, key: &str) -> Option<i64> {
        match self.notifications.get(key) {
            Some(level) => Some(*level),
            None => (key == "room").then_some(Self::DEFAULT_ROOM_NOTIFICATION),
        }
    }
}

/// How `room_member_count` compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cmp {
    Eq,
    Lt,
    Gt,
    Le,
    Ge,
}

impl Cmp {
    /// Parses `is`: an optional `==`, `<`, `>`, `<=` or `>=`, then a decimal integer.
    pub fn parse(is: &str) -> Option<(Cmp, u64)> {
        let (cmp, number) =
            [("==", Cmp::Eq), ("<=", Cmp::Le), (">=", Cmp::Ge), ("<", Cmp::Lt), (">", Cmp::Gt)]
                .into_iter()
                .find_map(|(prefix, cmp)| is.strip_prefix(prefix).map(|rest| (cmp, rest)))
                .unwrap_or((Cmp::Eq, is));
        if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Some((cmp, number.parse().ok()?))
    }

    fn holds(self, count: u64, n: u64) -> bool {
        match self {
            Cmp::Eq => count == n,
            Cmp::Lt => count < n,
            Cmp::Gt => count > n,
            Cmp::Le => count <= n,
            Cmp::Ge => count >= n,
        }
    }
}

/// A compiled condition.
#[derive(Clone, Debug)]
pub enum Cond {
    /// `event_match`; `words` for `content.body`.
    Match {
        key: Key,
        glob: Glob,
        words: bool,
    },
    Is {
        key: Key,
        value: Scalar,
    },
    Contains {
        key: Key,
        value: Scalar,
    },
    DisplayName,
    MemberCount {
        cmp: Cmp,
        n: u64,
    },
    SenderPermission {
        key: Box<str>,
    },
}

impl Cond {
    pub fn compile(condition: &Condition) -> Option<Cond> {
        Some(match condition {
            Condition::EventMatch { key, pattern } => Cond::body_or_match(key, pattern),
            Condition::EventPropertyIs { key, value } => {
                Cond::Is { key: Key::parse(key), value: value.clone() }
            }
            Condition::EventPropertyContains { key, value } => {
                Cond::Contains { key: Key::parse(key), value: value.clone() }
            }
            Condition::ContainsDisplayName => Cond::DisplayName,
            Condition::RoomMemberCount { is } => {
                let (cmp, n) = Cmp::parse(is)?;
                Cond::MemberCount { cmp, n }
            }
            Condition::SenderNotificationPermission { key } => {
                Cond::SenderPermission { key: key.as_str().into() }
            }
            Condition::Unknown(_) => return None,
        })
    }

    /// An `event_match`; on `content.body` it matches words rather than the whole value.
    pub fn body_or_match(key: &str, pattern: &str) -> Cond {
        let key = Key::parse(key);
        let words = key.as_str() == "content.body";
        Cond::Match { key, glob: Glob::new(pattern), words }
    }

    pub fn holds(&self, event: &FlatEvent<'_>, room: &RoomCtx<'_>) -> bool {
        match self {
            Cond::Match { key, glob, words } => event.text(key).is_some_and(|text| {
                if *words { glob.matches_words(text.folded()) } else { glob.matches(text.folded()) }
            }),
            Cond::Is { key, value } => event.get(key).is_some_and(|leaf| leaf_is(leaf, value)),
            Cond::Contains { key, value } => match event.get(key) {
                Some(Leaf::Array(items)) => items.iter().any(|item| json_is(item, value)),
                _ => false,
            },
            Cond::DisplayName => {
                let Some(DisplayName(Some(name))) = room.display_name else { return false };
                event.body().is_some_and(|body| name.matches_words(body.folded()))
            }
            Cond::MemberCount { cmp, n } => room.member_count.is_some_and(|c| cmp.holds(c, *n)),
            Cond::SenderPermission { key } => {
                let (Some(levels), Some(sender)) = (room.power_levels, event.sender()) else {
                    return false;
                };
                levels
                    .notification_level(key)
                    .is_some_and(|needed| levels.user_level(sender) >= needed)
            }
        }
    }
}

fn leaf_is(leaf: &Leaf<'_>, value: &Scalar) -> bool {
    match (leaf, value) {
        (Leaf::Str(t), Scalar::String(s)) => t.raw == s,
        (Leaf::Int(i), Scalar::Int(j)) => i == j,
        (Leaf::Bool(a), Scalar::Bool(b)) => a == b,
        (Leaf::Null, Scalar::Null) => true,
        _ => false,
    }
}

/// Whether an array element equals `value`; elements that are not canonical scalars never do.
fn json_is(item: &Value, value: &Scalar) -> bool {
    match (item, value) {
        (Value::String(a), Scalar::String(b)) => a == b,
        (Value::Number(n), Scalar::Int(j)) => {
            n.as_i64().is_some_and(|i| i.abs() <= MAX_SAFE_INTEGER && i == *j)
        }
        (Value::Bool(a), Scalar::Bool(b)) => a == b,
        (Value::Null, Scalar::Null) => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn holds(condition: Value, event: &Value, room: &RoomCtx<'_>) -> bool {
        let condition: Condition = serde_json::from_value(condition).unwrap();
        let flat = FlatEvent::new(event);
        Cond::compile(&condition).is_some_and(|c| c.holds(&flat, room))
    }

    fn message(body: &str) -> Value {
        json!({"type": "m.room.message", "sender": "@bob:x", "room_id": "!r:x",
               "content": {"msgtype": "m.text", "body": body}})
    }

    #[test]
    fn event_match_whole_values() {
        let none = RoomCtx::default();
        let c = |key: &str, pattern: &str| json!({"kind": "event_match", "key": key, "pattern": pattern});
        let topic =
            json!({"type": "m.room.topic", "content": {"topic": "Lunch plans"}, "state_key": ""});
        assert!(holds(c("content.topic", "lunc?*"), &topic, &none));
        assert!(!holds(c("content.topic", "lunch"), &topic, &none));
        assert!(holds(c("state_key", ""), &topic, &none));
        assert!(!holds(c("state_key", ""), &message("x"), &none), "missing never matches");
        assert!(!holds(c("content.topic", "*"), &json!({"content": {"topic": null}}), &none));
        assert!(!holds(c("content.topic", "*"), &json!({"content": {"topic": 1}}), &none));
        assert!(!holds(c("content", "*"), &topic, &none), "objects are not strings");
        assert!(holds(c("type", "M.ROOM.*"), &topic, &none));
        assert!(holds(c("content.body", "hello"), &message("Oh, HELLO there"), &none));
        assert!(!holds(c("content.body", "hello"), &message("hellothere"), &none));
    }

    #[test]
    fn event_property_is_compares_type_and_value() {
        let none = RoomCtx::default();
        let create = json!({"type": "m.room.create", "state_key": "",
            "content": {"m.federate": true, "n": 5, "s": "true", "z": null, "f": 5.0,
                        "big": 9007199254740991_i64}});
        let c = |key: &str, value: Value| json!({"kind": "event_property_is", "key": key, "value": value});
        assert!(holds(c(r"content.m\.federate", json!(true)), &create, &none));
        assert!(!holds(c(r"content.m\.federate", json!("true")), &create, &none));
        assert!(!holds(c(r"content.m\.federate", json!(1)), &create, &none));
        assert!(!holds(c("content.m.federate", json!(true)), &create, &none), "unescaped dot");
        assert!(holds(c("content.n", json!(5)), &create, &none));
        assert!(!holds(c("content.n", json!("5")), &create, &none));
        assert!(holds(c("content.s", json!("true")), &create, &none));
        assert!(!holds(c("content.s", json!("TRUE")), &create, &none), "exact, not case-folded");
        assert!(holds(c("content.z", json!(null)), &create, &none));
        assert!(!holds(c("content.missing", json!(null)), &create, &none));
        assert!(!holds(c("content.f", json!(5)), &create, &none), "a float is not an integer");
        assert!(holds(c("content.big", json!(9007199254740991_i64)), &create, &none));
        assert!(!holds(c("content.big", json!(9007199254740992_i64)), &create, &none));
    }

    #[test]
    fn event_property_contains_looks_inside_arrays() {
        let none = RoomCtx::default();
        let alias = json!({"type": "m.room.canonical_alias", "content": {
            "alt_aliases": ["#somewhere:example.org", "#myroom:example.com", 3, null, 2.0, [1], {"a": 1}],
            "not_array": "#myroom:example.com"}});
        let c = |key: &str, value: Value| json!({"kind": "event_property_contains", "key": key, "value": value});
        assert!(holds(c("content.alt_aliases", json!("#myroom:example.com")), &alias, &none));
        assert!(!holds(c("content.alt_aliases", json!(":example.com")), &alias, &none));
        assert!(holds(c("content.alt_aliases", json!(3)), &alias, &none));
        assert!(holds(c("content.alt_aliases", json!(null)), &alias, &none));
        assert!(!holds(c("content.alt_aliases", json!(2)), &alias, &none), "2.0 is a float");
        assert!(!holds(c("content.not_array", json!("#myroom:example.com")), &alias, &none));
        assert!(!holds(c("content.missing", json!("x")), &alias, &none));
    }

    #[test]
    fn contains_display_name_is_a_literal_word() {
        let alice = DisplayName::new("Alice B.");
        let room = RoomCtx { display_name: Some(&alice), ..RoomCtx::default() };
        let c = json!({"kind": "contains_display_name"});
        assert!(holds(c.clone(), &message("hey alice b., look"), &room));
        assert!(!holds(c.clone(), &message("hey alice bob"), &room));
        assert!(!holds(c.clone(), &message("hey Alice"), &room));
        let star = DisplayName::new("*");
        let room_star = RoomCtx { display_name: Some(&star), ..RoomCtx::default() };
        assert!(!holds(c.clone(), &message("anything"), &room_star), "`*` is literal here");
        assert!(holds(c.clone(), &message("look at * now"), &room_star));
        let empty = DisplayName::new("");
        let room_empty = RoomCtx { display_name: Some(&empty), ..RoomCtx::default() };
        assert!(!holds(c.clone(), &message("anything"), &room_empty));
        assert!(!holds(c.clone(), &message(""), &room_empty));
        assert!(!holds(c, &message("alice"), &RoomCtx::default()), "no name, no match");
    }

    #[test]
    fn room_member_count_compares() {
        let c = |is: &str| json!({"kind": "room_member_count", "is": is});
        let ev = message("x");
        let at = |n: u64| RoomCtx { member_count: Some(n), ..RoomCtx::default() };
        for (is, yes, no) in [
            ("2", 2, 3),
            ("==2", 2, 1),
            ("<10", 9, 10),
            (">10", 11, 10),
            ("<=10", 10, 11),
            (">=10", 10, 9),
        ] {
            assert!(holds(c(is), &ev, &at(yes)), "{is} with {yes}");
            assert!(!holds(c(is), &ev, &at(no)), "{is} with {no}");
        }
        for bad in
            ["", "=2", "=>2", "<", " 2", "2 ", "+2", "-1", "2.0", "0x2", "99999999999999999999"]
        {
            assert!(!holds(c(bad), &ev, &at(2)), "{bad:?} never matches");
        }
        assert!(!holds(c("2"), &ev, &RoomCtx::default()), "unknown count never matches");
    }

    #[test]
    fn sender_notification_permission_reads_power_levels() {
        let c = json!({"kind": "sender_notification_permission", "key": "room"});
        let ev = message("@room");
        let levels = PowerLevels::from_content(&json!({"users": {"@bob:x": 50, "@eve:x": "49"},
            "users_default": 10}));
        let room = RoomCtx { power_levels: Some(&levels), ..RoomCtx::default() };
        assert!(holds(c.clone(), &ev, &room), "room defaults to 50");
        let eve =
            json!({"type": "m.room.message", "sender": "@eve:x", "content": {"body": "@room"}});
        assert!(!holds(c.clone(), &eve, &room), "string levels are read");
        let strict = PowerLevels::from_content(&json!({"users": {"@bob:x": 50},
            "notifications": {"room": 51, "custom": 0}}));
        let room = RoomCtx { power_levels: Some(&strict), ..RoomCtx::default() };
        assert!(!holds(c.clone(), &ev, &room));
        let custom = json!({"kind": "sender_notification_permission", "key": "custom"});
        assert!(holds(custom, &ev, &room));
        let other = json!({"kind": "sender_notification_permission", "key": "other"});
        assert!(!holds(other, &ev, &room), "no level known for this key");
        assert!(!holds(c.clone(), &ev, &RoomCtx::default()), "no power levels, no match");
        let no_sender = json!({"type": "m.room.message", "content": {"body": "@room"}});
        let open = PowerLevels { users_default: 100, ..PowerLevels::default() };
        let room = RoomCtx { power_levels: Some(&open), ..RoomCtx::default() };
        assert!(!holds(c, &no_sender, &room));
    }

    #[test]
    fn unknown_conditions_never_compile() {
        for c in [
            json!({"kind": "org.example"}),
            json!({"kind": "room_member_count", "is": "two"}),
            json!({"kind": "event_property_is", "key": "k", "value": 1.5}),
        ] {
            let condition: Condition = serde_json::from_value(c).unwrap();
            assert!(Cond::compile(&condition).is_none());
        }
    }
}
