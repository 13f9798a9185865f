//! Differential test of the push-rules engine against ruma's (`ruma-common` 0.20): 10,000
//! generated cases (an event, the user's own rules, the room), seeded so every run is the same,
//! are evaluated by both, which must agree on the deciding rule: its id, `notify` and
//! `highlight`. Any other disagreement fails, printing the case.
//!
//! Where ruma departs from the v1.16 spec text herald follows the text. A case that reaches a
//! departure (a rule herald tried, up to the one it picked, that ruma reads differently on this
//! event) is counted under it and skipped. Each departure must, alone, change the answer of some
//! generated case, so the list stays honest:
//!
//! 1. `Ruleset::server_default` lacks the legacy body-mention rules
//!    `.m.rule.contains_display_name`, `.m.rule.roomnotif` (override) and
//!    `.m.rule.contains_user_name` (content), which v1.16 still lists. Not skipped: the harness
//!    adds them to ruma's set at the spec's positions (ruma still skips them by id when
//!    `m.mentions` is present); see `ruma_server_defaults_lack_the_legacy_mention_rules`.
//! 2. `NewlineWildcard`: for `content.body` words ruma turns `*`/`?` into regex `.`, which does
//!    not match `\n`; the spec's `*` matches any characters, `?` any one.
//! 3. `DisplayNameGlob`: `contains_display_name` uses the display name as a glob in ruma (`*`,
//!    `?` are wildcards); the spec: the body contains the display name (herald: literally).
//! 4. `EmptyDisplayName`: in ruma an empty display name matches an empty body; herald: an empty
//!    name is not contained in anything (a user without one is not mentioned by name).
//! 5. `EmptyPattern`: an empty `content.body` pattern never matches a non-empty body in ruma;
//!    by the spec's definition the empty substring at the start of the body starts and ends at a
//!    word boundary, so it matches.
//! 6. `LoneBackslashKey`: a dotted key with `\` before anything but `.` or `\` (`content.a\b`):
//!    the spec (MSC3873) makes that backslash literal; ruma looks the key up verbatim, finding
//!    nothing.
//! 7. `CustomNotificationKey`: `sender_notification_permission` with a key other than `room`
//!    is always false in ruma; the spec compares with `notifications.<key>` when the room sets
//!    it.
//! 8. `MentionsFlattenToNothing`: ruma sees `m.mentions` through flattened keys only, so one
//!    holding nothing flattenable (`{"x": 1.5}`) counts as absent and the legacy rules still
//!    apply; the spec: the property is present.
//! 9. `CaseInsensitiveIds`: ruma matches room and sender rules as case-insensitive globs on
//!    `room_id`/`sender`; the spec: the rule id is the room (user) ID, and IDs are
//!    case-sensitive.
//! 10. `MemberCountParse`: ruma reads `room_member_count`'s number with `u64::from_str`, so it
//!     takes `+2`, and rejects the whole rule above 2^53−1; the spec: a decimal integer.

use std::collections::{BTreeMap, BTreeSet};
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use herald::homeserver::pushrules::{
    CompiledRuleset, Condition, DisplayName, FlatEvent, MAX_SAFE_INTEGER, PowerLevels, PushRule,
    PushRulesContent, RoomCtx, RuleKind, Ruleset,
};
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use ruma_common::power_levels::NotificationPowerLevels;
use ruma_common::push::{
    Action as RumaAction, PushConditionPowerLevelsCtx, PushConditionRoomCtx, RuleKind as RumaKind,
    Ruleset as RumaRuleset,
};
use ruma_common::room_version_rules::{AuthorizationRules, RoomPowerLevelsRules};
use ruma_common::serde::Raw;
use ruma_common::{OwnedRoomId, OwnedUserId};
use serde_json::{Value, json};

const USER: &str = "@alice:example.org";
const ROOM: &str = "!room:example.org";
const CASES: usize = 10_000;
const LEGACY: [&str; 3] =
    [".m.rule.contains_display_name", ".m.rule.roomnotif", ".m.rule.contains_user_name"];

/// Departures 2–10 of the module documentation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Departure {
    NewlineWildcard,
    DisplayNameGlob,
    EmptyDisplayName,
    EmptyPattern,
    LoneBackslashKey,
    CustomNotificationKey,
    MentionsFlattenToNothing,
    CaseInsensitiveIds,
    MemberCountParse,
}

const DEPARTURES: [Departure; 9] = [
    Departure::NewlineWildcard,
    Departure::DisplayNameGlob,
    Departure::EmptyDisplayName,
    Departure::EmptyPattern,
    Departure::LoneBackslashKey,
    Departure::CustomNotificationKey,
    Departure::MentionsFlattenToNothing,
    Departure::CaseInsensitiveIds,
    Departure::MemberCountParse,
];

// Generator pools, `|`-separated (an empty entry is an empty string).
const SENDERS: &str = "@bob:example.org|@bob:example.org|@bob:example.org|@eve:example.org|\
    @eve:example.org|@carol:example.org|@BOB:example.org|@alice:example.org";
const WORDS: &str = "alice|Alice|ALICE|liddell|@room|cake|CAKE|cakes|cupcake|lunch|lunchtime|\
    -|_|é|École|Straße|STRASSE|.|:|🎂|*|?|[x]|a\\b|İ|\u{212A}|al*ce|alice_b|x|cake\nlunch";
const BODY_PATTERNS: &str = "cake|CAKE|ca*e|c?ke|cake*lunch|cake?lunch|a*e|*||lunch*|*cake|\
    @room|é*|[x]|a\\b|straße|?|alice_b|İ|k|al*ce|école";
const WHOLE_PATTERNS: &str = "m.room.message|m.room.*|M.ROOM.MESSAGE|*||m.?otice|m.notice|\
    m.text|invite|m.thread|m.*|@alice:example.org|@bob:*|!room:*|!ROOM:example.org|x|?|\
    ?cole|école|lunch*";
const MATCH_KEYS: &str = "type|content.msgtype|state_key|sender|room_id|\
    content.m\\.relates_to.rel_type|content.membership|content.topic";
const PROPERTY_KEYS: &str = "content.n|content.n|content.n|content.flag|content.msgtype|\
    content.m\\.relates_to.rel_type|content.m\\.mentions.room|content.list|state_key";
const MEMBER_COUNTS: &str =
    "2|==2|<3|>=3|>1|<=1|3|+2|==+2|two||=2|<9007199254740993|<18446744073709551616";
const VALUES: &str = r#"[1, -1, 9007199254740991, 9007199254740992, -9007199254740992, 1.5, 1.0,
    null, true, false, "1", "m.thread", "@alice:example.org"]"#;
const MENTIONS: &str = r#"[{}, {"user_ids": ["@alice:example.org"]}, {"room": true},
    {"user_ids": []}, {"x": 1.5}, {"user_ids": ["@bob:example.org"], "room": false}, null,
    {"room": 9007199254740992}]"#;
const ACTIONS: &str = r#"[[], ["notify"], ["notify", {"set_tweak": "highlight"}],
    ["notify", {"set_tweak": "sound", "value": "default"}],
    ["notify", {"set_tweak": "highlight", "value": false}]]"#;

/// One generated case: the event, the user's own `m.push_rules` `global`, and the room.
struct Case {
    event: Value,
    rules: Value,
    members: u64,
    display_name: &'static str,
    power_levels: Option<Value>,
}

/// The deciding rule: (id, notify, highlight).
type Answer = Option<(String, bool, bool)>;

fn one(rng: &mut StdRng, pool: &'static str) -> &'static str {
    pool.split('|').collect::<Vec<_>>().choose(rng).unwrap()
}

fn one_json(rng: &mut StdRng, pool: &str) -> Value {
    let Value::Array(items) = serde_json::from_str(pool).unwrap() else { unreachable!() };
    items.choose(rng).unwrap().clone()
}

fn gen_body(rng: &mut StdRng) -> String {
    let mut body = String::new();
    for i in 0..rng.random_range(0..6) {
        if i > 0 {
            body.push_str(one(rng, " | |\n|\n||, "));
        }
        body.push_str(one(rng, WORDS));
    }
    body
}

fn gen_event(rng: &mut StdRng) -> Value {
    let mut content = serde_json::Map::new();
    let (kind, state_key) = match rng.random_range(0..12) {
        0..=4 => {
            content.insert("msgtype".into(), one(rng, "m.text|m.text|m.notice|m.emote").into());
            ("m.room.message", None)
        }
        5 => ("m.room.encrypted", None),
        6 => {
            content.insert("membership".into(), one(rng, "invite|join").into());
            ("m.room.member", Some(one(rng, "@alice:example.org|@carol:example.org")))
        }
        7 => (one(rng, "m.room.tombstone|m.room.server_acl"), Some(one(rng, "|x"))),
        8 => ("m.reaction", None),
        9 => ("m.call.invite", None),
        _ => ("m.room.topic", Some("")),
    };
    if rng.random_bool(if kind == "m.room.message" { 0.95 } else { 0.15 }) {
        let body = if rng.random_bool(0.03) { json!(42) } else { json!(gen_body(rng)) };
        content.insert("body".into(), body);
    }
    if rng.random_bool(0.4) {
        content.insert("m.mentions".into(), one_json(rng, MENTIONS));
    }
    if rng.random_bool(0.15) {
        let rel = one(rng, "m.replace|m.thread");
        content.insert("m.relates_to".into(), json!({"rel_type": rel, "event_id": "$root"}));
    }
    for (name, p) in [("n", 0.5), ("flag", 0.1), ("list", 0.15), ("a\\b", 0.1), ("topic", 0.1)] {
        if rng.random_bool(p) {
            let value = match name {
                "list" => json!([1, "x", 1.5, null, 9007199254740992_i64, USER]),
                "a\\b" | "topic" => json!(one(rng, "x|lunch time|École")),
                _ => one_json(rng, VALUES),
            };
            content.insert(name.into(), value);
        }
    }
    let room_id = one(
        rng,
        "!room:example.org|!room:example.org|!room:example.org|!other:x.org|!ROOM:example.org",
    );
    let mut event = json!({"type": kind, "event_id": "$e", "sender": one(rng, SENDERS),
        "room_id": room_id, "content": content});
    if let Some(state_key) = state_key {
        event["state_key"] = state_key.into();
    }
    event
}

fn gen_condition(rng: &mut StdRng) -> Value {
    match rng.random_range(0..11) {
        0 | 1 => json!({"kind": "event_match", "key": "content.body",
            "pattern": one(rng, BODY_PATTERNS)}),
        2 | 3 => json!({"kind": "event_match", "key": one(rng, MATCH_KEYS),
            "pattern": one(rng, WHOLE_PATTERNS)}),
        4 => json!({"kind": "event_property_is", "key": one(rng, PROPERTY_KEYS),
            "value": one_json(rng, VALUES)}),
        5 => json!({"kind": "event_property_contains", "key": one(rng,
            "content.m\\.mentions.user_ids|content.list"), "value": one_json(rng, VALUES)}),
        6 => json!({"kind": "contains_display_name"}),
        7 => json!({"kind": "room_member_count", "is": one(rng, MEMBER_COUNTS)}),
        8 => json!({"kind": "sender_notification_permission", "key": one(rng, "room|custom|")}),
        9 => json!({"kind": one(rng, "event_match|event_property_is"),
            "key": one(rng, "content.a\\b|content.a\\\\b"), "pattern": "*", "value": "x"}),
        _ => json!({"kind": "org.example.future"}),
    }
}

fn gen_rules(rng: &mut StdRng) -> Value {
    let mut rules = json!({"override": [], "content": [], "room": [], "sender": [],
        "underride": []});
    let mut push = |rng: &mut StdRng, kind: &str, id: &str, mut rule: Value| {
        rule["rule_id"] = id.into();
        rule["default"] = false.into();
        rule["enabled"] = rng.random_bool(0.9).into();
        rule["actions"] = one_json(rng, ACTIONS);
        rules[kind].as_array_mut().unwrap().push(rule);
    };
    for kind in ["override", "underride"] {
        for i in 0..rng.random_range(0..4) {
            let n = if rng.random_bool(0.05) { 0 } else { rng.random_range(1..3) };
            let conditions: Vec<Value> = (0..n).map(|_| gen_condition(rng)).collect();
            push(rng, kind, &format!("{kind}{i}"), json!({"conditions": conditions}));
        }
    }
    for i in 0..rng.random_range(0..3) {
        let pattern = one(rng, BODY_PATTERNS);
        push(rng, "content", &format!("content{i}"), json!({"pattern": pattern}));
    }
    for (kind, ids) in [
        ("room", ["!room:example.org", "!other:x.org", "!third:x.org", "!ROOM:example.org"]),
        ("sender", ["@bob:example.org", "@eve:example.org", "@carol:x.org", "@BOB:example.org"]),
    ] {
        let n = rng.random_range(0..3);
        for id in ids.choose_multiple(rng, n) {
            push(rng, kind, id, json!({}));
        }
    }
    // Changes to server-default rules: `enabled` and `actions` only.
    for (kind, id, p) in [
        ("override", ".m.rule.master", 0.02),
        ("override", ".m.rule.suppress_notices", 0.1),
        ("override", ".m.rule.contains_display_name", 0.1),
        ("override", ".m.rule.roomnotif", 0.05),
        ("content", ".m.rule.contains_user_name", 0.1),
        ("underride", ".m.rule.message", 0.1),
        ("underride", ".m.rule.no_such_rule", 0.05),
    ] {
        if rng.random_bool(p) {
            push(rng, kind, id, json!({}));
        }
    }
    rules
}

fn gen_case(rng: &mut StdRng) -> Case {
    let power_levels = rng.random_bool(0.85).then(|| {
        let mut levels = json!({"users": {"@bob:example.org": one_json(rng, "[0, 49, 50, 100]")},
            "users_default": one_json(rng, "[0, 0, 50]")});
        if rng.random_bool(0.4) {
            levels["notifications"] = json!({"room": one_json(rng, "[0, 50, 51, 100]")});
        }
        if rng.random_bool(0.3) {
            levels["notifications"]["custom"] = one_json(rng, "[0, 50]");
        }
        levels
    });
    Case {
        event: gen_event(rng),
        rules: gen_rules(rng),
        members: rng.random_range(1..6),
        display_name: one(rng, "Alice|Alice|Alice Liddell|alice|Straße|École|al*ce|A?ice|*|"),
        power_levels,
    }
}

/// herald's answer with `rules` (already merged with the defaults) on the case's event.
fn herald_eval(case: &Case, rules: &Ruleset) -> Answer {
    let compiled = CompiledRuleset::compile(rules, USER);
    let name = DisplayName::new(case.display_name);
    let levels = case.power_levels.as_ref().map(PowerLevels::from_content);
    let room = RoomCtx {
        member_count: Some(case.members),
        display_name: Some(&name),
        power_levels: levels.as_ref(),
    };
    let flat = FlatEvent::new(&case.event);
    compiled.evaluate(&flat, &room).map(|m| (m.rule_id.to_owned(), m.notify, m.highlight()))
}

/// herald's answer, and the merged rules it tried, in order.
fn herald(case: &Case) -> (Answer, Ruleset) {
    let content: PushRulesContent = serde_json::from_value(json!({"global": case.rules})).unwrap();
    let (merged, _ignored) = Ruleset::for_user(USER, &content.global);
    (herald_eval(case, &merged), merged)
}

/// Whether herald says `conditions` all hold for the case (as a plain, non-legacy rule).
fn herald_holds(case: &Case, conditions: Vec<Condition>) -> bool {
    let rule = PushRule {
        rule_id: "probe".into(),
        default: false,
        enabled: true,
        conditions: Some(conditions),
        pattern: None,
        actions: vec![],
    };
    herald_eval(case, &Ruleset { override_: vec![rule], ..Ruleset::default() }).is_some()
}

/// Whether herald's `pattern` matches words of `body`.
fn herald_words(pattern: &str, body: &str) -> bool {
    let probe = Case {
        event: json!({"sender": "@s:x", "content": {"body": body}}),
        rules: json!({}),
        members: 0,
        display_name: "",
        power_levels: None,
    };
    let key = "content.body".into();
    herald_holds(&probe, vec![Condition::EventMatch { key, pattern: pattern.into() }])
}

/// Polls a future that never pends (ruma's evaluator is `async` only for an optional callback).
fn ready<F: Future>(future: F) -> F::Output {
    match pin!(future).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(output) => output,
        Poll::Pending => panic!("ruma's evaluator pended"),
    }
}

/// ruma's server defaults plus the three legacy rules at the spec's positions (departure 1).
fn ruma_defaults() -> RumaRuleset {
    let user: OwnedUserId = USER.try_into().unwrap();
    let mut set = RumaRuleset::server_default(&user);
    let loud = json!(["notify", {"set_tweak": "sound", "value": "default"},
        {"set_tweak": "highlight"}]);
    let display_name = json!({"rule_id": LEGACY[0], "default": true, "enabled": true,
        "conditions": [{"kind": "contains_display_name"}], "actions": loud});
    let room = json!({"rule_id": LEGACY[1], "default": true, "enabled": true, "conditions": [
            {"kind": "event_match", "key": "content.body", "pattern": "@room"},
            {"kind": "sender_notification_permission", "key": "room"}],
        "actions": ["notify", {"set_tweak": "highlight"}]});
    for (after, rule) in
        [(".m.rule.is_user_mention", display_name), (".m.rule.is_room_mention", room)]
    {
        let at = set.override_.get_index_of(after).unwrap() + 1;
        let (from, _) = set.override_.insert_full(serde_json::from_value(rule).unwrap());
        set.override_.move_index(from, at);
    }
    let user_name = json!({"rule_id": LEGACY[2], "default": true, "enabled": true,
        "pattern": "alice", "actions": loud});
    set.content.insert(serde_json::from_value(user_name).unwrap());
    set
}

/// ruma's answer (on [`ruma_defaults`] and the user's rules), and the user rules it could not
/// read, which it leaves out (as herald never matches a rule with an unusable condition).
fn ruma(case: &Case) -> (Answer, Vec<String>) {
    ruma_with(case, ruma_defaults())
}

fn ruma_with(case: &Case, mut set: RumaRuleset) -> (Answer, Vec<String>) {
    let mut unread = Vec::new();
    let kinds = [
        ("override", RumaKind::Override),
        ("content", RumaKind::Content),
        ("room", RumaKind::Room),
        ("sender", RumaKind::Sender),
        ("underride", RumaKind::Underride),
    ];
    for (kind, ruma_kind) in kinds {
        // User rules keep their order, ahead of the defaults (after `.m.rule.master`).
        let mut at = usize::from(kind == "override");
        for rule in case.rules[kind].as_array().into_iter().flatten() {
            let id = rule["rule_id"].as_str().unwrap();
            if id.starts_with('.') {
                let actions: Vec<RumaAction> =
                    serde_json::from_value(rule["actions"].clone()).unwrap();
                if set.set_enabled(ruma_kind.clone(), id, rule["enabled"] == true).is_ok() {
                    set.set_actions(ruma_kind.clone(), id, actions).unwrap();
                }
                continue;
            }
            macro_rules! place {
                ($list:expr) => {
                    serde_json::from_value(rule.clone()).map(|rule| {
                        let (from, _) = $list.insert_full(rule);
                        $list.move_index(from, at);
                    })
                };
            }
            let placed = match kind {
                "override" => place!(set.override_),
                "content" => place!(set.content),
                "room" => place!(set.room),
                "sender" => place!(set.sender),
                _ => place!(set.underride),
            };
            match placed {
                Ok(()) => at += 1,
                Err(_) => unread.push(id.to_owned()),
            }
        }
    }
    let room_id: OwnedRoomId = case.event["room_id"].as_str().unwrap().try_into().unwrap();
    let user: OwnedUserId = USER.try_into().unwrap();
    let members = u32::try_from(case.members).unwrap().into();
    let mut ctx = PushConditionRoomCtx::new(room_id, members, user, case.display_name.into());
    if let Some(content) = &case.power_levels {
        let levels = PowerLevels::from_content(content);
        let int = |level: i64| i32::try_from(level).unwrap().into();
        let users = levels
            .users
            .iter()
            .map(|(user, level)| (user.as_str().try_into().unwrap(), int(*level)));
        let mut notifications = NotificationPowerLevels::new();
        if let Some(room) = levels.notifications.get("room") {
            notifications.room = int(*room);
        }
        ctx = ctx.with_power_levels(PushConditionPowerLevelsCtx::new(
            users.collect::<BTreeMap<_, _>>(),
            int(levels.users_default),
            notifications,
            RoomPowerLevelsRules::new(&AuthorizationRules::V1, []),
        ));
    }
    let raw = Raw::<Value>::from_json(serde_json::value::to_raw_value(&case.event).unwrap());
    let answer = ready(set.get_match(&raw, &ctx)).map(|rule| {
        (rule.rule_id().to_owned(), rule.triggers_notification(), rule.triggers_highlight())
    });
    (answer, unread)
}

/// ruma's word matching (`matches_word`), modelled on herald's: an equal body always matches,
/// an empty pattern matches nothing else, and wildcards stop at newlines.
fn ruma_words(pattern: &str, body: &str) -> bool {
    if body.to_lowercase() == pattern.to_lowercase() {
        true
    } else if pattern.is_empty() {
        false
    } else if pattern.contains(['*', '?']) {
        body.split('\n').any(|line| herald_words(pattern, line))
    } else {
        herald_words(pattern, body)
    }
}

/// ruma's `room_member_count` on a room of `members`, when it reads `is` differently from the
/// spec (a decimal integer): `u64::from_str` takes a `+` sign and ruma rejects the whole rule
/// above 2^53−1.
fn ruma_member_count(is: &str, members: u64) -> Option<bool> {
    let (op, number) = ["<=", "<", ">=", ">", "=="]
        .into_iter()
        .find_map(|op| Some((op, is.strip_prefix(op)?)))
        .unwrap_or(("==", is));
    let holds = |n: u64| match op {
        "<=" => members <= n,
        "<" => members < n,
        ">=" => members >= n,
        ">" => members > n,
        _ => members == n,
    };
    let decimal = !number.is_empty() && number.bytes().all(|b| b.is_ascii_digit());
    let ruma = number.parse::<u64>().ok().filter(|n| *n < 1 << 53);
    (ruma.is_some() != decimal).then(|| ruma.is_some_and(holds))
}

/// Whether a dotted key has a backslash escaping neither `.` nor `\` (ruma never finds it).
fn lone_backslash(key: &str) -> bool {
    let mut chars = key.chars();
    while let Some(c) = chars.next() {
        if c == '\\' && !matches!(chars.next(), Some('.' | '\\')) {
            return true;
        }
    }
    false
}

/// Whether ruma's flattening keeps nothing of a value: floats, integers beyond ±(2^53−1), and
/// objects holding only such values.
fn flattens_to_nothing(value: &Value) -> bool {
    match value {
        Value::Number(n) => n.as_i64().is_none_or(|i| i.abs() > MAX_SAFE_INTEGER),
        Value::Object(o) => !o.is_empty() && o.values().all(flattens_to_nothing),
        _ => false,
    }
}

/// For a condition that hits a departure on this case: which, and what ruma says. Only the
/// departure's own inputs count (a wildcard and a newline, an empty pattern, …), so that a
/// herald bug elsewhere cannot hide behind one.
fn ruma_reading(case: &Case, condition: &Condition) -> Option<(Departure, bool)> {
    let body = case.event["content"]["body"].as_str();
    let wild = |pattern: &str| pattern.contains(['*', '?']);
    match condition {
        Condition::EventMatch { key, pattern } if key == "content.body" => {
            let departure = if pattern.is_empty() {
                Departure::EmptyPattern
            } else if wild(pattern) && body.is_some_and(|b| b.contains('\n')) {
                Departure::NewlineWildcard
            } else {
                return None;
            };
            Some((departure, body.is_some_and(|b| ruma_words(pattern, b))))
        }
        Condition::EventMatch { key, .. }
        | Condition::EventPropertyIs { key, .. }
        | Condition::EventPropertyContains { key, .. } => {
            lone_backslash(key).then_some((Departure::LoneBackslashKey, false))
        }
        Condition::ContainsDisplayName => {
            let name = case.display_name;
            let departure = match name.is_empty() {
                true => Departure::EmptyDisplayName,
                false => Departure::DisplayNameGlob,
            };
            (name.is_empty() || wild(name))
                .then(|| (departure, body.is_some_and(|b| ruma_words(name, b))))
        }
        Condition::RoomMemberCount { is } => {
            ruma_member_count(is, case.members).map(|theirs| (Departure::MemberCountParse, theirs))
        }
        Condition::SenderNotificationPermission { key } => {
            (key != "room").then_some((Departure::CustomNotificationKey, false))
        }
        Condition::Unknown(_) => None,
    }
}

/// The departures this case reaches: rules herald tried, up to and including the one it picked,
/// that ruma reads differently on this event. Elsewhere the two must agree.
fn departures(case: &Case, ours: &Answer, merged: &Ruleset) -> BTreeSet<Departure> {
    let mut found = BTreeSet::new();
    let sender = case.event["sender"].as_str().unwrap();
    if sender == USER {
        return found; // neither evaluates the user's own events
    }
    let room_id = case.event["room_id"].as_str().unwrap();
    let mentions = case.event["content"].get("m.mentions");
    let ids_differ = |id: &str, actual: &str| id != actual && id.eq_ignore_ascii_case(actual);
    let tried = merged
        .iter()
        .position(|(_, rule)| ours.as_ref().is_some_and(|(id, ..)| rule.rule_id == *id))
        .map_or(usize::MAX, |i| i + 1);
    for (kind, rule) in merged.iter().take(tried).filter(|(_, rule)| rule.enabled) {
        let conditions = match kind {
            RuleKind::Room | RuleKind::Sender => {
                let actual = if kind == RuleKind::Room { room_id } else { sender };
                if ids_differ(&rule.rule_id, actual) {
                    found.insert(Departure::CaseInsensitiveIds);
                }
                continue;
            }
            RuleKind::Content => match &rule.pattern {
                Some(p) => {
                    vec![Condition::EventMatch { key: "content.body".into(), pattern: p.clone() }]
                }
                None => continue,
            },
            RuleKind::Override | RuleKind::Underride => rule.conditions.clone().unwrap_or_default(),
        };
        if rule.default && LEGACY.contains(&rule.rule_id.as_str()) && mentions.is_some() {
            if !mentions.is_some_and(flattens_to_nothing) {
                continue; // both skip it
            }
            if herald_holds(case, conditions.clone()) {
                found.insert(Departure::MentionsFlattenToNothing);
            }
        }
        for condition in &conditions {
            if let Some((departure, theirs)) = ruma_reading(case, condition)
                && theirs != herald_holds(case, vec![condition.clone()])
            {
                found.insert(departure);
            }
        }
    }
    found
}

fn dump(case: &Case, ours: &Answer, theirs: &Answer, unread: &[String]) -> String {
    serde_json::to_string_pretty(&json!({
        "event": case.event, "user_rules": case.rules, "member_count": case.members,
        "display_name": case.display_name, "power_levels": case.power_levels,
        "herald": ours, "ruma": theirs, "ruma_could_not_read": unread,
    }))
    .unwrap()
}

#[test]
fn herald_agrees_with_ruma_except_where_ruma_departs_from_the_spec() {
    let mut rng = StdRng::seed_from_u64(0x6865_7261_6c64);
    let mut compared = 0;
    let mut decided_by = BTreeMap::<String, usize>::new();
    // Per departure: cases reaching it, and those where it alone was reached and changed the
    // answer.
    let mut skipped = BTreeMap::<Departure, (usize, usize)>::new();
    for _ in 0..CASES {
        let case = gen_case(&mut rng);
        let (ours, merged) = herald(&case);
        let (theirs, unread) = ruma(&case);
        let reached = departures(&case, &ours, &merged);
        if reached.is_empty() {
            compared += 1;
            let dump = || dump(&case, &ours, &theirs, &unread);
            assert!(ours == theirs, "unexplained disagreement:\n{}", dump());
            let id = ours.map_or("<none>".into(), |(id, ..)| id);
            *decided_by.entry(id).or_default() += 1;
        } else {
            for departure in &reached {
                let counts = skipped.entry(*departure).or_default();
                counts.0 += 1;
                counts.1 += usize::from(reached.len() == 1 && ours != theirs);
            }
        }
    }
    eprintln!("compared {compared} of {CASES} cases; deciding rules: {decided_by:?}");
    for (departure, (cases, changed)) in &skipped {
        eprintln!("{departure:?}: reached in {cases} cases; alone changed the answer in {changed}");
    }
    assert!(compared >= CASES / 2, "only {compared} of {CASES} cases compared");
    for departure in DEPARTURES {
        let (_, changed) = skipped.get(&departure).copied().unwrap_or_default();
        assert!(changed > 0, "{departure:?} never changed an answer on its own");
    }
    // Every server-default rule, user rules of every kind, and no match at all were compared.
    let defaults = Ruleset::server_default(USER);
    let ids = defaults.iter().map(|(_, rule)| rule.rule_id.as_str());
    let users = ["<none>", "override0", "content0", ROOM, "@bob:example.org", "underride0"];
    for id in ids.chain(users) {
        assert!(decided_by.get(id).is_some_and(|n| *n >= 5), "{id} decided too few cases");
    }
}

/// Departure 1: ruma's defaults lack the three legacy body-mention rules, so an event naming the
/// user in its body only gets `.m.rule.message` there; with the rules added (as the differential
/// test does) ruma agrees with the spec.
#[test]
fn ruma_server_defaults_lack_the_legacy_mention_rules() {
    let user: OwnedUserId = USER.try_into().unwrap();
    let plain = RumaRuleset::server_default(&user);
    let ours = Ruleset::server_default(USER);
    for id in LEGACY {
        assert!(plain.iter().all(|rule| rule.rule_id() != id), "ruma now has {id}");
        assert!(ours.iter().any(|(_, rule)| rule.rule_id == id));
    }
    for (body, legacy) in
        [("Alice Liddell?", LEGACY[0]), ("@room lunch", LEGACY[1]), ("alice: lunch", LEGACY[2])]
    {
        let case = Case {
            event: json!({"type": "m.room.message", "sender": "@bob:example.org", "room_id": ROOM,
                "content": {"msgtype": "m.text", "body": body}}),
            rules: json!({}),
            members: 5,
            display_name: "Alice Liddell",
            power_levels: Some(json!({"users": {"@bob:example.org": 50}})),
        };
        let id = |answer: Answer| answer.map(|(id, ..)| id);
        assert_eq!(id(herald(&case).0).as_deref(), Some(legacy));
        assert_eq!(id(ruma_with(&case, plain.clone()).0).as_deref(), Some(".m.rule.message"));
        assert_eq!(id(ruma(&case).0).as_deref(), Some(legacy));
    }
}
