//! The server-default push rules of the spec (v1.16 text), as constant data in the spec's order.
//!
//! Three of them depend on the user: `.m.rule.invite_for_me` and `.m.rule.is_user_mention` name
//! the user ID, `.m.rule.contains_user_name` its localpart; [`server_default`] fills them in.
//! `.m.rule.contains_display_name`, `.m.rule.roomnotif` and `.m.rule.contains_user_name` are the
//! legacy body-mention rules: since v1.7 they are skipped for events whose `content` has
//! `m.mentions` ([`LEGACY_MENTION_RULES`]).

use super::{Action, Condition, PushRule, RuleKind, Ruleset, Scalar};

pub const MASTER: &str = ".m.rule.master";

/// Skipped when the event's `content` has an `m.mentions` property.
pub const LEGACY_MENTION_RULES: [&str; 3] =
    [".m.rule.contains_display_name", ".m.rule.roomnotif", ".m.rule.contains_user_name"];

/// Text in a rule that may stand for the user.
#[derive(Clone, Copy)]
enum Text {
    Lit(&'static str),
    /// The user's Matrix ID.
    UserId,
    /// The localpart of the user's Matrix ID.
    Localpart,
}

#[derive(Clone, Copy)]
enum Cond {
    Match(&'static str, Text),
    Is(&'static str, Val),
    Contains(&'static str, Text),
    DisplayName,
    MemberCount(&'static str),
    SenderPermission(&'static str),
}

/// The scalar values the defaults compare with.
#[derive(Clone, Copy)]
enum Val {
    True,
    Str(&'static str),
}

#[derive(Clone, Copy)]
enum Act {
    Notify,
    Sound(&'static str),
    /// `{"set_tweak": "highlight"}`, written without a value as the spec does.
    Highlight,
}

struct BaseRule {
    kind: RuleKind,
    id: &'static str,
    enabled: bool,
    conditions: &'static [Cond],
    pattern: Option<Text>,
    actions: &'static [Act],
}

const fn rule(
    kind: RuleKind,
    id: &'static str,
    conditions: &'static [Cond],
    actions: &'static [Act],
) -> BaseRule {
    BaseRule { kind, id, enabled: true, conditions, pattern: None, actions }
}

use Act::{Highlight, Notify, Sound};
use Cond::{Contains, DisplayName, Is, Match, MemberCount, SenderPermission};
use RuleKind::{Content, Override, Underride};
use Text::{Lit, Localpart, UserId};

const NOTIFY_SOUND_HIGHLIGHT: &[Act] = &[Notify, Sound("default"), Highlight];
const NOTIFY_HIGHLIGHT: &[Act] = &[Notify, Highlight];
const NOTIFY_SOUND: &[Act] = &[Notify, Sound("default")];

/// Every server-default rule, in the spec's order within each kind.
const BASE_RULES: &[BaseRule] = &[
    BaseRule { enabled: false, ..rule(Override, MASTER, &[], &[]) },
    rule(Override, ".m.rule.suppress_notices", &[Match("content.msgtype", Lit("m.notice"))], &[]),
    rule(
        Override,
        ".m.rule.invite_for_me",
        &[
            Match("type", Lit("m.room.member")),
            Match("content.membership", Lit("invite")),
            Match("state_key", UserId),
        ],
        NOTIFY_SOUND,
    ),
    rule(Override, ".m.rule.member_event", &[Match("type", Lit("m.room.member"))], &[]),
    rule(
        Override,
        ".m.rule.is_user_mention",
        &[Contains(r"content.m\.mentions.user_ids", UserId)],
        NOTIFY_SOUND_HIGHLIGHT,
    ),
    rule(Override, ".m.rule.contains_display_name", &[DisplayName], NOTIFY_SOUND_HIGHLIGHT),
    rule(
        Override,
        ".m.rule.is_room_mention",
        &[Is(r"content.m\.mentions.room", Val::True), SenderPermission("room")],
        NOTIFY_HIGHLIGHT,
    ),
    rule(
        Override,
        ".m.rule.roomnotif",
        &[Match("content.body", Lit("@room")), SenderPermission("room")],
        NOTIFY_HIGHLIGHT,
    ),
    rule(
        Override,
        ".m.rule.tombstone",
        &[Match("type", Lit("m.room.tombstone")), Match("state_key", Lit(""))],
        NOTIFY_HIGHLIGHT,
    ),
    rule(Override, ".m.rule.reaction", &[Match("type", Lit("m.reaction"))], &[]),
    rule(
        Override,
        ".m.rule.room.server_acl",
        &[Match("type", Lit("m.room.server_acl")), Match("state_key", Lit(""))],
        &[],
    ),
    rule(
        Override,
        ".m.rule.suppress_edits",
        &[Is(r"content.m\.relates_to.rel_type", Val::Str("m.replace"))],
        &[],
    ),
    BaseRule {
        pattern: Some(Localpart),
        ..rule(Content, ".m.rule.contains_user_name", &[], NOTIFY_SOUND_HIGHLIGHT)
    },
    rule(
        Underride,
        ".m.rule.call",
        &[Match("type", Lit("m.call.invite"))],
        &[Notify, Sound("ring")],
    ),
    rule(
        Underride,
        ".m.rule.encrypted_room_one_to_one",
        &[MemberCount("2"), Match("type", Lit("m.room.encrypted"))],
        NOTIFY_SOUND,
    ),
    rule(
        Underride,
        ".m.rule.room_one_to_one",
        &[MemberCount("2"), Match("type", Lit("m.room.message"))],
        NOTIFY_SOUND,
    ),
    rule(Underride, ".m.rule.message", &[Match("type", Lit("m.room.message"))], &[Notify]),
    rule(Underride, ".m.rule.encrypted", &[Match("type", Lit("m.room.encrypted"))], &[Notify]),
];

/// The server-default rules for `user_id`, as the push-rules API shows them.
pub fn server_default(user_id: &str) -> Ruleset {
    // The localpart is everything between the sigil and the first `:`.
    let localpart = user_id.strip_prefix('@').unwrap_or(user_id);
    let localpart = localpart.split_once(':').map_or(localpart, |(l, _)| l);
    let text = |t: Text| match t {
        Lit(s) => s.to_owned(),
        UserId => user_id.to_owned(),
        Localpart => localpart.to_owned(),
    };
    let mut set = Ruleset::default();
    for base in BASE_RULES {
        let conditions = (base.kind != Content).then(|| {
            base.conditions
                .iter()
                .map(|c| match *c {
                    Match(key, pattern) => {
                        Condition::EventMatch { key: key.into(), pattern: text(pattern) }
                    }
                    Is(key, v) => Condition::EventPropertyIs {
                        key: key.into(),
                        value: match v {
                            Val::True => Scalar::Bool(true),
                            Val::Str(s) => Scalar::String(s.into()),
                        },
                    },
                    Contains(key, v) => Condition::EventPropertyContains {
                        key: key.into(),
                        value: Scalar::String(text(v)),
                    },
                    DisplayName => Condition::ContainsDisplayName,
                    MemberCount(is) => Condition::RoomMemberCount { is: is.into() },
                    SenderPermission(key) => {
                        Condition::SenderNotificationPermission { key: key.into() }
                    }
                })
                .collect()
        });
        let actions = base
            .actions
            .iter()
            .map(|a| match *a {
                Notify => Action::Notify,
                Sound(s) => Action::SetTweak { name: "sound".into(), value: Some(s.into()) },
                Highlight => Action::SetTweak { name: "highlight".into(), value: None },
            })
            .collect();
        set.rules_mut(base.kind).push(PushRule {
            rule_id: base.id.into(),
            default: true,
            enabled: base.enabled,
            conditions,
            pattern: base.pattern.map(text),
            actions,
        });
    }
    set
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn defaults_are_in_spec_order() {
        let set = server_default("@alice:example.org");
        let ids = |k: RuleKind| set.rules(k).iter().map(|r| r.rule_id.clone()).collect::<Vec<_>>();
        assert_eq!(
            ids(Override),
            [
                ".m.rule.master",
                ".m.rule.suppress_notices",
                ".m.rule.invite_for_me",
                ".m.rule.member_event",
                ".m.rule.is_user_mention",
                ".m.rule.contains_display_name",
                ".m.rule.is_room_mention",
                ".m.rule.roomnotif",
                ".m.rule.tombstone",
                ".m.rule.reaction",
                ".m.rule.room.server_acl",
                ".m.rule.suppress_edits",
            ]
        );
        assert_eq!(ids(Content), [".m.rule.contains_user_name"]);
        assert!(ids(RuleKind::Room).is_empty() && ids(RuleKind::Sender).is_empty());
        assert_eq!(
            ids(Underride),
            [
                ".m.rule.call",
                ".m.rule.encrypted_room_one_to_one",
                ".m.rule.room_one_to_one",
                ".m.rule.message",
                ".m.rule.encrypted",
            ]
        );
        assert!(set.iter().all(|(_, r)| r.default && r.enabled == (r.rule_id != MASTER)));
    }

    #[test]
    fn defaults_serialize_as_the_spec_writes_them() {
        let set = server_default("@alice:example.org");
        let json = serde_json::to_value(&set).unwrap();
        assert_eq!(
            json["override"][2],
            json!({
                "rule_id": ".m.rule.invite_for_me", "default": true, "enabled": true,
                "conditions": [
                    {"kind": "event_match", "key": "type", "pattern": "m.room.member"},
                    {"kind": "event_match", "key": "content.membership", "pattern": "invite"},
                    {"kind": "event_match", "key": "state_key", "pattern": "@alice:example.org"}
                ],
                "actions": ["notify", {"set_tweak": "sound", "value": "default"}]
            })
        );
        assert_eq!(
            json["override"][4]["conditions"],
            json!([{"kind": "event_property_contains", "key": "content.m\\.mentions.user_ids",
                    "value": "@alice:example.org"}])
        );
        assert_eq!(
            json["override"][4]["actions"],
            json!(["notify", {"set_tweak": "sound", "value": "default"}, {"set_tweak": "highlight"}])
        );
        assert_eq!(
            json["content"][0],
            json!({"rule_id": ".m.rule.contains_user_name", "default": true, "enabled": true,
                   "pattern": "alice",
                   "actions": ["notify", {"set_tweak": "sound", "value": "default"},
                               {"set_tweak": "highlight"}]})
        );
        assert_eq!(
            json["underride"][0]["actions"],
            json!(["notify", {"set_tweak": "sound", "value": "ring"}])
        );
        assert_eq!(
            json["override"][11]["conditions"],
            json!([{"kind": "event_property_is", "key": "content.m\\.relates_to.rel_type",
                    "value": "m.replace"}])
        );
    }
}
