//! The compiled rule set and its evaluation: which rule, if any, decides how an event notifies
//! one user.
//!
//! [`CompiledRuleset::compile`] does the work that does not depend on the event once: it drops
//! disabled rules and rules that can never match (an unknown condition, a content rule with no
//! pattern), compiles globs and keys, and precomputes each rule's `notify` and tweaks.
//! [`CompiledRuleset::evaluate`] then walks the rules in order with no allocation.

use serde::Serialize;
use serde_json::{Map, Value};

use super::base_rules::LEGACY_MENTION_RULES;
use super::conditions::{Cond, RoomCtx};
use super::event::FlatEvent;
use super::glob::Glob;
use super::{Action, RuleKind, Ruleset};

/// A rule set compiled for one user.
#[derive(Clone, Debug)]
pub struct CompiledRuleset {
    user_id: Box<str>,
    rules: Vec<CompiledRule>,
}

#[derive(Clone, Debug)]
struct CompiledRule {
    kind: RuleKind,
    rule_id: Box<str>,
    actions: Box<[Action]>,
    notify: bool,
    tweaks: Map<String, Value>,
    /// A legacy body-mention rule: skipped when `content` has `m.mentions`.
    legacy_mention: bool,
    test: Test,
}

#[derive(Clone, Debug)]
enum Test {
    /// `override`/`underride`: every condition holds (none: always).
    All(Box<[Cond]>),
    /// `content`: the pattern matches words of `content.body`.
    Body(Glob),
    /// `room`: the event is in this room.
    Room(Box<str>),
    /// `sender`: the event is from this user.
    Sender(Box<str>),
}

/// The rule that matched an event.
#[derive(Clone, Copy, Debug)]
pub struct Match<'r> {
    pub kind: RuleKind,
    pub rule_id: &'r str,
    pub actions: &'r [Action],
    /// Whether the actions include `notify`.
    pub notify: bool,
    /// The tweaks the actions set (`highlight` without a value is `true`; other tweaks without
    /// a value are left out; a later action overrides an earlier one).
    pub tweaks: &'r Map<String, Value>,
}

impl Match<'_> {
    /// Whether the `highlight` tweak is set to `true`.
    pub fn highlight(&self) -> bool {
        self.tweaks.get("highlight").and_then(Value::as_bool).unwrap_or(false)
    }
}

/// The answer of `herald push-rules evaluate`: the matching rule (`null`s when none).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Evaluation {
    pub rule_id: Option<String>,
    pub actions: Option<Vec<Action>>,
    pub notify: bool,
    pub tweaks: Map<String, Value>,
}

impl From<Option<Match<'_>>> for Evaluation {
    fn from(m: Option<Match<'_>>) -> Evaluation {
        match m {
            Some(m) => Evaluation {
                rule_id: Some(m.rule_id.to_owned()),
                actions: Some(m.actions.to_vec()),
                notify: m.notify,
                tweaks: m.tweaks.clone(),
            },
            None => Evaluation { rule_id: None, actions: None, notify: false, tweaks: Map::new() },
        }
    }
}

impl CompiledRuleset {
    /// Compiles `ruleset` (usually from [`Ruleset::for_user`]) for `user_id`, whose own events
    /// are never evaluated.
    pub fn compile(ruleset: &Ruleset, user_id: &str) -> CompiledRuleset {
        let rules = ruleset
            .iter()
            .filter(|(_, rule)| rule.enabled)
            .filter_map(|(kind, rule)| {
                let test = match kind {
                    RuleKind::Override | RuleKind::Underride => Test::All(
                        rule.conditions
                            .iter()
                            .flatten()
                            .map(Cond::compile)
                            .collect::<Option<_>>()?,
                    ),
                    RuleKind::Content => Test::Body(Glob::new(rule.pattern.as_deref()?)),
                    RuleKind::Room => Test::Room(rule.rule_id.as_str().into()),
                    RuleKind::Sender => Test::Sender(rule.rule_id.as_str().into()),
                };
                Some(CompiledRule {
                    kind,
                    rule_id: rule.rule_id.as_str().into(),
                    actions: rule.actions.clone().into(),
                    notify: rule.actions.contains(&Action::Notify),
                    tweaks: tweaks(&rule.actions),
                    legacy_mention: rule.default
                        && LEGACY_MENTION_RULES.contains(&rule.rule_id.as_str()),
                    test,
                })
            })
            .collect();
        CompiledRuleset { user_id: user_id.into(), rules }
    }

    /// The first rule that matches `event`, or `None` (no rule matched, or the user sent it).
    pub fn evaluate(&self, event: &FlatEvent<'_>, room: &RoomCtx<'_>) -> Option<Match<'_>> {
        if event.sender() == Some(&*self.user_id) {
            return None;
        }
        let mentions = event.has_mentions();
        let rule = self.rules.iter().find(|rule| {
            if rule.legacy_mention && mentions {
                return false;
            }
            match &rule.test {
                Test::All(conds) => conds.iter().all(|c| c.holds(event, room)),
                Test::Body(glob) => {
                    event.body().is_some_and(|body| glob.matches_words(body.folded()))
                }
                Test::Room(id) => event.room_id() == Some(&**id),
                Test::Sender(id) => event.sender() == Some(&**id),
            }
        })?;
        Some(Match {
            kind: rule.kind,
            rule_id: &rule.rule_id,
            actions: &rule.actions,
            notify: rule.notify,
            tweaks: &rule.tweaks,
        })
    }

    /// How many rules can match (enabled, and with no condition that never holds).
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }
}

/// The tweaks `actions` set; `highlight` without a value means true.
pub fn tweaks(actions: &[Action]) -> Map<String, Value> {
    let mut tweaks = Map::new();
    for action in actions {
        if let Action::SetTweak { name, value } = action {
            match value {
                Some(v) => {
                    tweaks.insert(name.clone(), v.clone());
                }
                None if name == "highlight" => {
                    tweaks.insert(name.clone(), Value::Bool(true));
                }
                None => {}
            }
        }
    }
    tweaks
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::{DisplayName, PowerLevels, PushRulesContent};
    use super::*;

    const ALICE: &str = "@alice:example.org";

    /// Evaluates `event` for Alice ("Alice Liddell") in a room of `members`, where Bob has
    /// power 50, with Alice's own `rules` (an `m.push_rules` content).
    struct Case {
        rules: Value,
        members: u64,
    }

    impl Case {
        fn new() -> Case {
            Case { rules: json!({"global": {}}), members: 5 }
        }

        fn rule_for(&self, event: Value) -> Option<String> {
            let content: PushRulesContent = serde_json::from_value(self.rules.clone()).unwrap();
            let (merged, _) = Ruleset::for_user(ALICE, &content.global);
            let compiled = CompiledRuleset::compile(&merged, ALICE);
            let name = DisplayName::new("Alice Liddell");
            let levels = PowerLevels::from_content(&json!({"users": {"@bob:example.org": 50}}));
            let room = RoomCtx {
                member_count: Some(self.members),
                display_name: Some(&name),
                power_levels: Some(&levels),
            };
            let flat = FlatEvent::new(&event);
            compiled.evaluate(&flat, &room).map(|m| m.rule_id.to_owned())
        }
    }

    fn msg(content: Value) -> Value {
        json!({"type": "m.room.message", "sender": "@bob:example.org", "room_id": "!r:example.org",
               "event_id": "$e", "content": content})
    }

    fn text(body: &str) -> Value {
        msg(json!({"msgtype": "m.text", "body": body}))
    }

    fn rule(case: &Case, event: Value) -> String {
        case.rule_for(event).unwrap_or_else(|| "<none>".into())
    }

    #[test]
    fn every_default_override_rule() {
        let c = Case::new();
        assert_eq!(
            rule(&c, msg(json!({"msgtype": "m.notice", "body": "Alice Liddell"}))),
            ".m.rule.suppress_notices"
        );
        let member = |membership: &str, state_key: &str| {
            json!({"type": "m.room.member",
            "sender": "@bob:example.org", "state_key": state_key,
            "content": {"membership": membership}})
        };
        assert_eq!(rule(&c, member("invite", ALICE)), ".m.rule.invite_for_me");
        assert_eq!(rule(&c, member("invite", "@carol:example.org")), ".m.rule.member_event");
        assert_eq!(rule(&c, member("join", ALICE)), ".m.rule.member_event");
        assert_eq!(
            rule(&c, msg(json!({"body": "hi", "m.mentions": {"user_ids": [ALICE]}}))),
            ".m.rule.is_user_mention"
        );
        assert_eq!(rule(&c, text("hi alice liddell!")), ".m.rule.contains_display_name");
        assert_eq!(
            rule(&c, msg(json!({"body": "hi", "m.mentions": {"room": true}}))),
            ".m.rule.is_room_mention"
        );
        assert_eq!(rule(&c, text("@room: lunch")), ".m.rule.roomnotif");
        let state = |t: &str, sk: &str| {
            json!({"type": t, "sender": "@bob:example.org",
            "state_key": sk, "content": {}})
        };
        assert_eq!(rule(&c, state("m.room.tombstone", "")), ".m.rule.tombstone");
        assert_eq!(rule(&c, state("m.room.tombstone", "x")), "<none>");
        assert_eq!(
            rule(
                &c,
                json!({"type": "m.reaction", "sender": "@bob:example.org",
            "content": {}})
            ),
            ".m.rule.reaction"
        );
        assert_eq!(rule(&c, state("m.room.server_acl", "")), ".m.rule.room.server_acl");
        assert_eq!(rule(&c, state("m.room.server_acl", "x")), "<none>");
        assert_eq!(
            rule(&c, msg(json!({"body": "* fixed", "m.relates_to": {"rel_type": "m.replace"}}))),
            ".m.rule.suppress_edits"
        );
    }

    #[test]
    fn default_content_and_underride_rules() {
        let mut c = Case::new();
        assert_eq!(rule(&c, text("ALICE, look")), ".m.rule.contains_user_name");
        assert_eq!(rule(&c, text("alice_b look")), ".m.rule.message", "`_` joins words");
        assert_eq!(
            rule(
                &c,
                json!({"type": "m.call.invite", "sender": "@bob:example.org",
            "content": {}})
            ),
            ".m.rule.call"
        );
        let encrypted = json!({"type": "m.room.encrypted", "sender": "@bob:example.org",
            "content": {"algorithm": "m.megolm.v1.aes-sha2"}});
        assert_eq!(rule(&c, encrypted.clone()), ".m.rule.encrypted");
        assert_eq!(rule(&c, text("hello")), ".m.rule.message");
        c.members = 2;
        assert_eq!(rule(&c, encrypted), ".m.rule.encrypted_room_one_to_one");
        assert_eq!(rule(&c, text("hello")), ".m.rule.room_one_to_one");
        assert_eq!(
            rule(
                &c,
                json!({"type": "m.room.topic", "sender": "@bob:example.org",
            "state_key": "", "content": {"topic": "x"}})
            ),
            "<none>"
        );
    }

    #[test]
    fn master_is_first_and_disabled_by_default() {
        let mut c = Case::new();
        c.rules = json!({"global": {"override": [
            {"rule_id": "mine", "enabled": true, "conditions": [], "actions": ["notify"]},
            {"rule_id": ".m.rule.master", "enabled": true, "actions": []}]}});
        assert_eq!(rule(&c, text("hello")), ".m.rule.master", "ahead of user rules");
        c.rules = json!({"global": {"override": [
            {"rule_id": "mine", "enabled": true, "conditions": [], "actions": ["notify"]}]}});
        assert_eq!(rule(&c, text("hello")), "mine", "user override rules beat default ones");
    }

    #[test]
    fn mentions_switch_off_the_legacy_rules() {
        let c = Case::new();
        // `m.mentions` present but empty: the body's mentions no longer count.
        for mentions in [json!({}), json!({"user_ids": []}), json!({"room": false})] {
            for body in ["Alice Liddell", "alice", "@room"] {
                let ev = msg(json!({"msgtype": "m.text", "body": body, "m.mentions": mentions}));
                assert_eq!(rule(&c, ev), ".m.rule.message", "{body} with {mentions}");
            }
        }
        // A user's own rule with the same condition is not a legacy rule.
        let mut c = Case::new();
        c.rules = json!({"global": {"override": [{"rule_id": "dn", "enabled": true,
            "conditions": [{"kind": "contains_display_name"}], "actions": ["notify"]}]}});
        let ev = msg(json!({"body": "Alice Liddell", "m.mentions": {}}));
        assert_eq!(rule(&c, ev), "dn");
    }

    #[test]
    fn room_mentions_need_power() {
        let c = Case::new();
        let from = |sender: &str, content: Value| {
            json!({"type": "m.room.message",
            "sender": sender, "content": content})
        };
        // Eve has power 0 < 50: her `@room` is an ordinary message.
        assert_eq!(rule(&c, from("@eve:example.org", json!({"body": "@room"}))), ".m.rule.message");
        assert_eq!(
            rule(&c, from("@bob:example.org", json!({"body": "@room"}))),
            ".m.rule.roomnotif"
        );
        let room_mention = json!({"body": "x", "m.mentions": {"room": true}});
        assert_eq!(rule(&c, from("@eve:example.org", room_mention.clone())), ".m.rule.message");
        assert_eq!(rule(&c, from("@bob:example.org", room_mention)), ".m.rule.is_room_mention");
    }

    #[test]
    fn own_events_are_never_evaluated() {
        let mut c = Case::new();
        c.rules = json!({"global": {"override": [{"rule_id": "all", "enabled": true,
            "conditions": [], "actions": ["notify"]}]}});
        let mine = json!({"type": "m.room.message", "sender": ALICE, "content": {"body": "x"}});
        assert_eq!(c.rule_for(mine), None);
    }

    #[test]
    fn user_rules_of_every_kind() {
        let mut c = Case::new();
        c.rules = json!({"global": {
            "content": [{"rule_id": "cake", "enabled": true, "pattern": "cake*lie",
                         "actions": ["notify", {"set_tweak": "sound", "value": "cakealarm.wav"}]},
                        {"rule_id": "nopattern", "enabled": true, "actions": ["notify"]}],
            "room": [{"rule_id": "!r:example.org", "enabled": true, "actions": []}],
            "sender": [{"rule_id": "@carol:example.org", "enabled": true, "actions": ["notify"]}],
            "underride": [{"rule_id": "late", "enabled": true,
                           "conditions": [{"kind": "event_match", "key": "type", "pattern": "m.room.topic"}],
                           "actions": ["notify"]}]
        }});
        assert_eq!(rule(&c, text("the cake is a lie")), "cake");
        assert_eq!(rule(&c, text("hello")), "!r:example.org", "room rule mutes the room");
        let mut other_room = text("hello");
        other_room["room_id"] = json!("!R:example.org");
        assert_eq!(rule(&c, other_room.clone()), ".m.rule.message", "room ids are exact");
        other_room["sender"] = json!("@carol:example.org");
        assert_eq!(rule(&c, other_room), "@carol:example.org");
        assert_eq!(
            rule(
                &c,
                json!({"type": "m.room.topic", "sender": "@bob:example.org",
            "content": {}})
            ),
            "late",
            "user underride rules come before the defaults"
        );
    }

    #[test]
    fn disabled_and_unknown_rules_never_match() {
        let mut c = Case::new();
        c.rules = json!({"global": {"override": [
            {"rule_id": "off", "enabled": false, "conditions": [], "actions": ["notify"]},
            {"rule_id": "future", "enabled": true,
             "conditions": [{"kind": "org.example.future"}], "actions": ["notify"]},
            {"rule_id": ".m.rule.suppress_notices", "enabled": false, "actions": []}
        ]}});
        assert_eq!(rule(&c, msg(json!({"msgtype": "m.notice", "body": "x"}))), ".m.rule.message");
    }

    #[test]
    fn matches_report_actions_notify_and_tweaks() {
        let content: PushRulesContent = serde_json::from_value(json!({"global": {"override": [
            {"rule_id": "t", "enabled": true, "conditions": [],
             "actions": ["notify", "dont_notify", {"set_tweak": "sound", "value": "a"},
                         {"set_tweak": "sound", "value": "b"}, {"set_tweak": "highlight"},
                         {"set_tweak": "org.x"}, {"set_tweak": "org.y", "value": {"z": 1}}]}]}}))
        .unwrap();
        let (merged, _) = Ruleset::for_user(ALICE, &content.global);
        let compiled = CompiledRuleset::compile(&merged, ALICE);
        let event = text("x");
        let flat = FlatEvent::new(&event);
        let m = compiled.evaluate(&flat, &RoomCtx::default()).unwrap();
        assert!(m.notify && m.highlight());
        assert_eq!(
            Value::Object(m.tweaks.clone()),
            json!({"sound": "b", "highlight": true, "org.y": {"z": 1}})
        );
        let evaluation = serde_json::to_value(Evaluation::from(Some(m))).unwrap();
        assert_eq!(evaluation["rule_id"], "t");
        assert_eq!(evaluation["actions"].as_array().unwrap().len(), 6, "dont_notify dropped");
        assert_eq!(
            serde_json::to_value(Evaluation::from(None)).unwrap(),
            json!({"rule_id": null, "actions": null, "notify": false, "tweaks": {}})
        );
    }
}
