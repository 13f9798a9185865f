//! Edits a user's stored push rules the way the client-server push-rules API asks
//! (`GET`/`PUT`/`DELETE /pushrules/global/{kind}/{ruleId}`, and `GET`/`PUT` on its `/enabled`
//! and `/actions`).
//!
//! The input is the user's *stored* [`Ruleset`]: their own rules in order, plus `.`-prefixed
//! entries that only record a changed `enabled`/`actions` of a server-default rule. That is what
//! [`Ruleset::for_user`] merges with the defaults, and what the push-rules API shows. Each
//! operation either applies fully or returns an [`EditError`] and leaves the rules unchanged.
//! [`EditError::status`] and [`EditError::errcode`] give the HTTP status and the Matrix
//! `errcode`, so the HTTP layer maps these errors in one place.
//!
//! Pure: no I/O, no async, no logging, and no panic on any input. Storing the result and sending
//! the `m.push_rules` account-data event are the caller's job.

use serde_json::Value;
use thiserror::Error;

use super::{Action, Condition, PushRule, RuleKind, Ruleset};

/// Why a push-rules request cannot be applied.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum EditError {
    /// No rule of this kind has this id (404 `M_NOT_FOUND`).
    #[error("no {} push rule {rule_id:?}", kind.as_str())]
    NotFound { kind: RuleKind, rule_id: String },
    /// A bad kind, rule id or body, or deleting a server-default rule (400 `M_INVALID_PARAM`).
    #[error("{0}")]
    InvalidParam(String),
    /// `before`/`after` names no user rule of the same kind (400 `M_UNKNOWN`, with the
    /// spec's example message).
    #[error("before/after rule not found: {anchor}")]
    AnchorNotFound { anchor: String },
    /// `before`/`after` names a server-default rule, which the spec does not allow
    /// (400 `M_INVALID_PARAM`).
    #[error("push rule {rule_id:?} cannot be placed relative to server-default rule {anchor:?}")]
    AnchorIsServerDefault { rule_id: String, anchor: String },
}

impl EditError {
    /// The Matrix `errcode` of the error response.
    pub fn errcode(&self) -> &'static str {
        match self {
            EditError::NotFound { .. } => "M_NOT_FOUND",
            EditError::InvalidParam(_) | EditError::AnchorIsServerDefault { .. } => {
                "M_INVALID_PARAM"
            }
            EditError::AnchorNotFound { .. } => "M_UNKNOWN",
        }
    }

    /// The HTTP status of the error response.
    pub fn status(&self) -> u16 {
        match self {
            EditError::NotFound { .. } => 404,
            EditError::InvalidParam(_)
            | EditError::AnchorNotFound { .. }
            | EditError::AnchorIsServerDefault { .. } => 400,
        }
    }

    fn not_found(kind: RuleKind, rule_id: &str) -> EditError {
        EditError::NotFound { kind, rule_id: rule_id.to_owned() }
    }
}

/// The `{kind}` path segment: `override`, `content`, `room`, `sender` or `underride`.
pub fn parse_kind(s: &str) -> Result<RuleKind, EditError> {
    RuleKind::ALL
        .into_iter()
        .find(|kind| kind.as_str() == s)
        .ok_or_else(|| EditError::InvalidParam(format!("unknown push rule kind {s:?}")))
}

/// The body of `PUT /pushrules/global/{kind}/{ruleId}`, checked against the kind.
#[derive(Clone, Debug, PartialEq)]
pub struct NewRule {
    /// Required. The legacy `dont_notify` and `coalesce` are dropped, unknown actions kept.
    pub actions: Vec<Action>,
    /// `override` and `underride` only; absent means none (the rule always matches).
    pub conditions: Option<Vec<Condition>>,
    /// `content` only, and required there: the glob matched against words of `content.body`.
    pub pattern: Option<String>,
}

/// Condition kinds the model understands; one of these with unusable parameters is refused
/// rather than stored as a condition that never matches.
const KNOWN_CONDITIONS: [&str; 6] = [
    "event_match",
    "event_property_is",
    "event_property_contains",
    "contains_display_name",
    "room_member_count",
    "sender_notification_permission",
];

impl NewRule {
    /// Reads and checks a `PUT` body for a rule of `kind` with id `rule_id` (see
    /// [`put_rule`] for the checks). A `null` field counts as absent; wrong JSON types are
    /// [`EditError::InvalidParam`].
    pub fn from_json(kind: RuleKind, rule_id: &str, body: &Value) -> Result<NewRule, EditError> {
        let invalid =
            |what: String| EditError::InvalidParam(format!("push rule {rule_id:?}: {what}"));
        let body =
            body.as_object().ok_or_else(|| invalid("the body must be a JSON object".into()))?;
        let field = |name: &str| body.get(name).filter(|v| !v.is_null());
        let actions = parse_actions(field("actions")).map_err(invalid)?;
        let pattern = match field("pattern") {
            None => None,
            Some(Value::String(p)) => Some(p.clone()),
            Some(_) => return Err(invalid("`pattern` must be a string".into())),
        };
        let conditions = match field("conditions") {
            None => None,
            Some(Value::Array(items)) => Some(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, c)| parse_condition(i, c))
                    .collect::<Result<_, _>>()
                    .map_err(invalid)?,
            ),
            Some(_) => return Err(invalid("`conditions` must be an array".into())),
        };
        let rule = NewRule { actions, conditions, pattern };
        rule.check(kind, rule_id)?;
        Ok(rule)
    }

    /// The checks that depend on the kind: the rule id and which of `pattern`/`conditions`
    /// may appear.
    fn check(&self, kind: RuleKind, rule_id: &str) -> Result<(), EditError> {
        check_rule_id(kind, rule_id)?;
        let invalid = |what: &str| {
            Err(EditError::InvalidParam(format!("{} push rule {rule_id:?}: {what}", kind.as_str())))
        };
        match kind {
            RuleKind::Content if self.pattern.is_none() => invalid("`pattern` is required"),
            RuleKind::Content | RuleKind::Room | RuleKind::Sender if self.conditions.is_some() => {
                invalid("`conditions` are only allowed on override and underride rules")
            }
            RuleKind::Override | RuleKind::Room | RuleKind::Sender | RuleKind::Underride
                if self.pattern.is_some() =>
            {
                invalid("`pattern` is only allowed on content rules")
            }
            _ => Ok(()),
        }
    }
}

/// The spec's rules for a new rule id: not reserved (`.`), no `/` or `\`, and a room or user ID
/// for `room` and `sender` rules.
fn check_rule_id(kind: RuleKind, rule_id: &str) -> Result<(), EditError> {
    let problem = if rule_id.is_empty() {
        "must not be empty"
    } else if rule_id.starts_with('.') {
        "must not start with `.`, which is reserved for server-default rules"
    } else if rule_id.contains(['/', '\\']) {
        "must not contain `/` or `\\`"
    } else if kind == RuleKind::Room && !rule_id.starts_with('!') {
        "must be a room ID (starting with `!`)"
    } else if kind == RuleKind::Sender && !rule_id.starts_with('@') {
        "must be a user ID (starting with `@`)"
    } else {
        return Ok(());
    };
    Err(EditError::InvalidParam(format!("{} push rule id {rule_id:?} {problem}", kind.as_str())))
}

/// An `actions` array: each item a string or an object, a `set_tweak` name a string. Unknown
/// actions are kept; the legacy `dont_notify` and `coalesce` are dropped.
fn parse_actions(actions: Option<&Value>) -> Result<Vec<Action>, String> {
    let items = match actions {
        None => return Err("`actions` is required".into()),
        Some(Value::Array(items)) => items,
        Some(_) => return Err("`actions` must be an array".into()),
    };
    let mut parsed = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        match item {
            Value::String(_) => {}
            Value::Object(o) if o.get("set_tweak").is_none_or(Value::is_string) => {}
            Value::Object(_) => return Err(format!("action {i}: `set_tweak` must be a string")),
            _ => return Err(format!("action {i} must be a string or an object")),
        }
        parsed.extend(Action::from_json(item.clone()));
    }
    Ok(parsed)
}

/// One condition: an object with a string `kind`. Unknown kinds are kept (they never match);
/// a known kind must have usable parameters.
fn parse_condition(i: usize, value: &Value) -> Result<Condition, String> {
    let Some(kind) = value.get("kind").and_then(Value::as_str) else {
        return Err(format!("condition {i} must be an object with a string `kind`"));
    };
    let condition = Condition::from_json(value.clone());
    if matches!(condition, Condition::Unknown(_)) && KNOWN_CONDITIONS.contains(&kind) {
        return Err(format!("condition {i} ({kind}) has missing or invalid parameters"));
    }
    Ok(condition)
}

/// The actions in a `PUT .../actions` body, `{"actions": [...]}`, read as a `PUT` rule body's.
pub fn actions_from_body(body: &Value) -> Result<Vec<Action>, EditError> {
    let actions = body.as_object().and_then(|o| o.get("actions"));
    parse_actions(actions).map_err(EditError::InvalidParam)
}

/// The flag in a `PUT .../enabled` body, `{"enabled": true}`.
pub fn enabled_from_body(body: &Value) -> Result<bool, EditError> {
    body.get("enabled")
        .and_then(Value::as_bool)
        .ok_or_else(|| EditError::InvalidParam("`enabled` must be a boolean".into()))
}

/// Where `before`/`after` put the rule.
#[derive(Clone, Copy, PartialEq)]
enum Place {
    Before,
    After,
}

/// `PUT /pushrules/global/{kind}/{ruleId}?before=…&after=…`: creates or updates the user rule
/// `rule_id` of `kind`. The spec (client-server API, `setPushRule`):
///
/// > If a rule with the same `rule_id` already exists among rules of the same kind, it is
/// > updated with the new parameters, otherwise a new rule is created.
/// >
/// > If both `after` and `before` are provided, the new or updated rule must be the next most
/// > important rule with respect to the rule identified by `before`.
/// >
/// > If neither `after` nor `before` are provided and the rule is created, it should be added
/// > as the most important user defined rule among rules of the same kind.
/// >
/// > When creating push rules, they MUST be enabled by default.
///
/// So: a new rule goes first among the user's rules of its kind (still after `.m.rule.master`
/// and before the other defaults, as [`Ruleset::for_user`] places user rules). An updated rule
/// gets `new`'s actions, conditions and pattern but keeps its `enabled` (the body has no
/// `enabled`; synapse does the same), and keeps its position unless `before`/`after` is given.
///
/// Errors, with the rules left unchanged: [`EditError::InvalidParam`] for a rule id that starts
/// with `.` (the spec says such requests MUST be rejected), contains `/` or `\`, or for `room`
/// and `sender` rules is not a room or user ID; for a `content` rule without `pattern`,
/// `conditions` on a rule that is not `override`/`underride`, or `pattern` on one that is not
/// `content`; and for `before`/`after` naming the rule itself.
/// [`EditError::AnchorIsServerDefault`] when `before`/`after` names a server-default rule ("It
/// is not possible to add a rule relative to a predefined server rule");
/// [`EditError::AnchorNotFound`] when it names no user rule of this kind.
pub fn put_rule(
    user: &mut Ruleset,
    kind: RuleKind,
    rule_id: &str,
    new: NewRule,
    before: Option<&str>,
    after: Option<&str>,
) -> Result<(), EditError> {
    new.check(kind, rule_id)?;
    let rules = user.rules_mut(kind);
    let anchor = match (before, after) {
        (Some(id), _) => Some((id, Place::Before)),
        (None, Some(id)) => Some((id, Place::After)),
        (None, None) => None,
    };
    // Where to insert, counted in `rules` as it is now.
    let at = match anchor {
        None => None,
        Some((id, _)) if id.starts_with('.') => {
            return Err(EditError::AnchorIsServerDefault {
                rule_id: rule_id.to_owned(),
                anchor: id.to_owned(),
            });
        }
        Some((id, _)) if id == rule_id => {
            return Err(EditError::InvalidParam(format!(
                "push rule {rule_id:?} cannot be placed relative to itself"
            )));
        }
        Some((id, place)) => match rules.iter().position(|r| r.rule_id == id) {
            Some(i) => Some(i + usize::from(place == Place::After)),
            None => return Err(EditError::AnchorNotFound { anchor: id.to_owned() }),
        },
    };
    let existing = rules.iter().position(|r| r.rule_id == rule_id);
    let rule = PushRule {
        rule_id: rule_id.to_owned(),
        default: false,
        enabled: existing.is_none_or(|i| rules[i].enabled),
        conditions: match kind {
            RuleKind::Override | RuleKind::Underride => Some(new.conditions.unwrap_or_default()),
            _ => None,
        },
        pattern: new.pattern,
        actions: new.actions,
    };
    match (existing, at) {
        (Some(i), None) => rules[i] = rule,
        (None, None) => rules.insert(0, rule),
        (existing, Some(mut at)) => {
            if let Some(i) = existing {
                rules.remove(i);
                if i < at {
                    at -= 1;
                }
            }
            rules.insert(at, rule);
        }
    }
    Ok(())
}

/// `DELETE /pushrules/global/{kind}/{ruleId}`: removes the user rule `rule_id` of `kind`.
/// [`EditError::InvalidParam`] for a server-default rule, which cannot be deleted (only
/// disabled); [`EditError::NotFound`] when there is no such rule.
pub fn delete_rule(user: &mut Ruleset, kind: RuleKind, rule_id: &str) -> Result<(), EditError> {
    if rule_id.starts_with('.') {
        // Default rule ids do not depend on the user, so any user ID will do here.
        let is_default =
            Ruleset::server_default("").rules(kind).iter().any(|r| r.rule_id == rule_id);
        return Err(if is_default {
            EditError::InvalidParam(format!(
                "{} push rule {rule_id:?} is a server-default rule and cannot be deleted",
                kind.as_str()
            ))
        } else {
            EditError::not_found(kind, rule_id)
        });
    }
    let rules = user.rules_mut(kind);
    let i = rules
        .iter()
        .position(|r| r.rule_id == rule_id)
        .ok_or_else(|| EditError::not_found(kind, rule_id))?;
    rules.remove(i);
    Ok(())
}

/// `GET /pushrules/global/{kind}/{ruleId}` (and the `enabled`/`actions` of it): the rule as
/// `user_id` sees it, a server default with the user's changes applied (`default: true`) or a
/// user rule. [`EditError::NotFound`] when there is no such rule.
pub fn get_rule(
    user: &Ruleset,
    user_id: &str,
    kind: RuleKind,
    rule_id: &str,
) -> Result<PushRule, EditError> {
    let (mut merged, _) = Ruleset::for_user(user_id, user);
    std::mem::take(merged.rules_mut(kind))
        .into_iter()
        .find(|r| r.rule_id == rule_id)
        .ok_or_else(|| EditError::not_found(kind, rule_id))
}

/// `PUT .../enabled`: enables or disables a user rule or a server-default rule (see
/// [`set_actions`] for how a default's change is stored). [`EditError::NotFound`] when there is
/// no such rule.
pub fn set_enabled(
    user: &mut Ruleset,
    user_id: &str,
    kind: RuleKind,
    rule_id: &str,
    enabled: bool,
) -> Result<(), EditError> {
    update(user, user_id, kind, rule_id, |rule| rule.enabled = enabled)
}

/// `PUT .../actions`: replaces the actions of a user rule or a server-default rule ("This can be
/// used to change the actions of builtin rules"). A user rule changes in place. A server-default
/// rule's change is recorded in a `.`-prefixed entry of `user` that carries both its current
/// `enabled` and `actions`, which [`Ruleset::for_user`] applies. [`EditError::NotFound`] when
/// there is no such rule.
pub fn set_actions(
    user: &mut Ruleset,
    user_id: &str,
    kind: RuleKind,
    rule_id: &str,
    actions: Vec<Action>,
) -> Result<(), EditError> {
    update(user, user_id, kind, rule_id, |rule| rule.actions.clone_from(&actions))
}

fn update(
    user: &mut Ruleset,
    user_id: &str,
    kind: RuleKind,
    rule_id: &str,
    change: impl Fn(&mut PushRule),
) -> Result<(), EditError> {
    if !rule_id.starts_with('.') {
        let rule = user
            .rules_mut(kind)
            .iter_mut()
            .find(|r| r.rule_id == rule_id)
            .ok_or_else(|| EditError::not_found(kind, rule_id))?;
        change(rule);
        return Ok(());
    }
    let mut defaults = Ruleset::server_default(user_id);
    let rules = defaults.rules_mut(kind);
    let Some(i) = rules.iter().position(|r| r.rule_id == rule_id) else {
        return Err(EditError::not_found(kind, rule_id));
    };
    let default = rules.swap_remove(i);
    let stored = user.rules_mut(kind);
    // Normally at most one entry; `for_user` applies them in order, so change them all alike.
    let mut found = false;
    for entry in stored.iter_mut().filter(|r| r.rule_id == rule_id) {
        change(entry);
        found = true;
    }
    if !found {
        let mut entry = PushRule {
            rule_id: default.rule_id,
            default: true,
            enabled: default.enabled,
            conditions: None,
            pattern: None,
            actions: default.actions,
        };
        change(&mut entry);
        stored.push(entry);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::{CompiledRuleset, FlatEvent, RoomCtx};
    use super::*;

    const ALICE: &str = "@alice:example.org";

    /// The user's own rule ids of `kind`, in order (`.` entries left out).
    fn own_ids(user: &Ruleset, kind: RuleKind) -> Vec<&str> {
        let ids = user.rules(kind).iter().map(|r| r.rule_id.as_str());
        ids.filter(|id| !id.starts_with('.')).collect()
    }

    fn new_rule(kind: RuleKind, id: &str, body: Value) -> NewRule {
        NewRule::from_json(kind, id, &body).unwrap()
    }

    /// An override rule that notifies on `m.room.message`.
    fn notify_rule(id: &str) -> NewRule {
        new_rule(
            RuleKind::Override,
            id,
            json!({"conditions": [{"kind": "event_match", "key": "type", "pattern": "m.room.message"}],
                   "actions": ["notify"]}),
        )
    }

    fn put(
        user: &mut Ruleset,
        id: &str,
        before: Option<&str>,
        after: Option<&str>,
    ) -> Result<(), EditError> {
        put_rule(user, RuleKind::Override, id, notify_rule(id), before, after)
    }

    /// A user with override rules `a`, `b`, `c`, in that order.
    fn abc() -> Ruleset {
        let mut user = Ruleset::default();
        for id in ["c", "b", "a"] {
            put(&mut user, id, None, None).unwrap();
        }
        assert_eq!(own_ids(&user, RuleKind::Override), ["a", "b", "c"]);
        user
    }

    fn message(body: &str) -> Value {
        json!({"type": "m.room.message", "sender": "@bob:example.org", "room_id": "!r:example.org",
               "event_id": "$e", "content": {"msgtype": "m.text", "body": body}})
    }

    /// The rule that decides `event` for Alice in a room of 5, and whether it notifies.
    fn decide(user: &Ruleset, event: &Value) -> Option<(String, bool)> {
        let (merged, ignored) = Ruleset::for_user(ALICE, user);
        assert!(ignored.is_empty(), "{ignored:?}");
        let compiled = CompiledRuleset::compile(&merged, ALICE);
        let flat = FlatEvent::new(event);
        let room = RoomCtx { member_count: Some(5), ..RoomCtx::default() };
        compiled.evaluate(&flat, &room).map(|m| (m.rule_id.to_owned(), m.notify))
    }

    fn invalid(err: EditError, needle: &str) {
        assert_eq!((err.status(), err.errcode()), (400, "M_INVALID_PARAM"), "{err}");
        assert!(err.to_string().contains(needle), "{err:?} lacks {needle:?}");
    }

    #[test]
    fn errors_map_to_matrix_errors_and_read_lowercase() {
        let errors = [
            (EditError::not_found(RuleKind::Room, "!x:y"), 404, "M_NOT_FOUND"),
            (EditError::InvalidParam("bad".into()), 400, "M_INVALID_PARAM"),
            (EditError::AnchorNotFound { anchor: "x".into() }, 400, "M_UNKNOWN"),
            (
                EditError::AnchorIsServerDefault { rule_id: "r".into(), anchor: ".m.x".into() },
                400,
                "M_INVALID_PARAM",
            ),
        ];
        for (err, status, errcode) in errors {
            assert_eq!((err.status(), err.errcode()), (status, errcode), "{err:?}");
            let message = err.to_string();
            assert!(message.starts_with(|c: char| c.is_lowercase()), "{message}");
        }
        assert_eq!(
            EditError::not_found(RuleKind::Room, "!x:y").to_string(),
            r#"no room push rule "!x:y""#
        );
        assert_eq!(
            EditError::AnchorNotFound { anchor: "someRuleId".into() }.to_string(),
            "before/after rule not found: someRuleId",
            "the spec's example message"
        );
    }

    #[test]
    fn kinds_parse_from_the_path() {
        for kind in RuleKind::ALL {
            assert_eq!(parse_kind(kind.as_str()), Ok(kind));
        }
        for bad in ["", "global", "Override", "device", "override "] {
            invalid(parse_kind(bad).unwrap_err(), "unknown push rule kind");
        }
    }

    #[test]
    fn put_bodies_parse_for_each_kind() {
        let content = new_rule(
            RuleKind::Content,
            "cake",
            json!({"pattern": "cake*lie", "actions": ["notify", "dont_notify", "coalesce",
                   "org.example.beep", {"set_tweak": "sound", "value": "cakealarm.wav"}]}),
        );
        assert_eq!(content.pattern.as_deref(), Some("cake*lie"));
        assert_eq!(content.conditions, None);
        assert_eq!(
            serde_json::to_value(&content.actions).unwrap(),
            json!(["notify", "org.example.beep", {"set_tweak": "sound", "value": "cakealarm.wav"}]),
            "legacy actions dropped, unknown ones kept"
        );
        let room = new_rule(RuleKind::Room, "!r:example.org", json!({"actions": []}));
        assert_eq!(room, NewRule { actions: vec![], conditions: None, pattern: None });
        new_rule(RuleKind::Sender, "@spambot:matrix.org", json!({"actions": [], "pattern": null}));
        let underride = new_rule(RuleKind::Underride, "u", json!({"actions": ["notify"]}));
        assert_eq!(underride.conditions, None);
        let with_conditions = new_rule(
            RuleKind::Override,
            "beer",
            json!({"conditions": [{"kind": "event_match", "key": "content.body", "pattern": "beer"},
                                  {"kind": "room_member_count", "is": "<=10"},
                                  {"kind": "org.example.future", "x": 1}],
                   "actions": ["notify"]}),
        );
        let conditions = with_conditions.conditions.unwrap();
        assert_eq!(conditions.len(), 3);
        assert!(matches!(conditions[2], Condition::Unknown(_)), "unknown kinds are kept");

        // An override rule stored without conditions shows `"conditions": []`.
        let mut user = Ruleset::default();
        put_rule(&mut user, RuleKind::Underride, "u", underride_body(), None, None).unwrap();
        assert_eq!(user.underride[0].conditions, Some(vec![]));
    }

    fn underride_body() -> NewRule {
        new_rule(RuleKind::Underride, "u", json!({"actions": ["notify"]}))
    }

    #[test]
    fn bad_put_bodies_and_ids_are_invalid_params() {
        use RuleKind::{Content, Override, Room, Sender, Underride};
        let cases = [
            (Content, "c", json!({"actions": []}), "`pattern` is required"),
            (Content, "c", json!({"pattern": "x", "conditions": [], "actions": []}), "conditions"),
            (Room, "!r:x", json!({"conditions": [], "actions": []}), "conditions"),
            (Sender, "@s:x", json!({"conditions": [], "actions": []}), "conditions"),
            (Room, "!r:x", json!({"pattern": "x", "actions": []}), "`pattern` is only allowed"),
            (Override, "o", json!({"pattern": "x", "actions": []}), "`pattern` is only allowed"),
            (Room, "r:x", json!({"actions": []}), "must be a room ID"),
            (Room, "@r:x", json!({"actions": []}), "must be a room ID"),
            (Sender, "!s:x", json!({"actions": []}), "must be a user ID"),
            (Override, ".m.rule.mine", json!({"actions": []}), "must not start with `.`"),
            (Room, ".m.rule.mine", json!({"actions": []}), "must not start with `.`"),
            (Underride, "a/b", json!({"actions": []}), "must not contain"),
            (Underride, "a\\b", json!({"actions": []}), "must not contain"),
            (Override, "", json!({"actions": []}), "must not be empty"),
            (Override, "o", json!(["notify"]), "must be a JSON object"),
            (Override, "o", json!({}), "`actions` is required"),
            (Override, "o", json!({"actions": null}), "`actions` is required"),
            (Override, "o", json!({"actions": "notify"}), "`actions` must be an array"),
            (Override, "o", json!({"actions": ["notify", 5]}), "action 1 must be"),
            (Override, "o", json!({"actions": [{"set_tweak": 5}]}), "`set_tweak` must be a string"),
            (Content, "c", json!({"pattern": 5, "actions": []}), "`pattern` must be a string"),
            (Override, "o", json!({"conditions": {}, "actions": []}), "must be an array"),
            (Override, "o", json!({"conditions": ["x"], "actions": []}), "condition 0 must be"),
            (Override, "o", json!({"conditions": [{"key": "type"}], "actions": []}), "`kind`"),
            (
                Override,
                "o",
                json!({"conditions": [{"kind": "event_match", "key": "type"}], "actions": []}),
                "condition 0 (event_match) has missing or invalid parameters",
            ),
            (
                Underride,
                "u",
                json!({"conditions": [{"kind": "event_property_is", "key": "k", "value": 1.5}],
                       "actions": []}),
                "(event_property_is)",
            ),
        ];
        for (kind, id, body, needle) in cases {
            let err = NewRule::from_json(kind, id, &body).unwrap_err();
            invalid(err, needle);
        }
        // `put_rule` checks a `NewRule` built by hand against the kind as well.
        let mut user = Ruleset::default();
        let no_pattern = NewRule { actions: vec![], conditions: None, pattern: None };
        let err = put_rule(&mut user, Content, "c", no_pattern.clone(), None, None).unwrap_err();
        invalid(err, "`pattern` is required");
        let err = put_rule(&mut user, Room, "not-a-room", no_pattern, None, None).unwrap_err();
        invalid(err, "must be a room ID");
        assert_eq!(user, Ruleset::default());
    }

    #[test]
    fn new_rules_go_first_and_are_enabled() {
        let user = abc();
        for rule in &user.override_ {
            assert!(rule.enabled && !rule.default, "{rule:?}");
        }
        let (merged, _) = Ruleset::for_user(ALICE, &user);
        let ids: Vec<_> = merged.override_.iter().map(|r| r.rule_id.as_str()).collect();
        assert_eq!(&ids[..5], [".m.rule.master", "a", "b", "c", ".m.rule.suppress_notices"]);
        assert_eq!(decide(&user, &message("hi")), Some(("a".into(), true)));
    }

    #[test]
    fn before_and_after_place_the_rule() {
        let cases = [
            (Some("a"), None, vec!["x", "a", "b", "c"]),
            (None, Some("a"), vec!["a", "x", "b", "c"]),
            (Some("c"), None, vec!["a", "b", "x", "c"]),
            (None, Some("c"), vec!["a", "b", "c", "x"]),
            (Some("b"), Some("c"), vec!["a", "x", "b", "c"]),
        ];
        for (before, after, want) in cases {
            let mut user = abc();
            put(&mut user, "x", before, after).unwrap();
            assert_eq!(
                own_ids(&user, RuleKind::Override),
                want,
                "before {before:?} after {after:?}"
            );
        }
    }

    #[test]
    fn stored_default_entries_do_not_disturb_placement() {
        let mut user = Ruleset::default();
        set_enabled(&mut user, ALICE, RuleKind::Override, ".m.rule.master", true).unwrap();
        put(&mut user, "a", None, None).unwrap();
        put(&mut user, "b", None, Some("a")).unwrap();
        put(&mut user, "c", None, None).unwrap();
        assert_eq!(own_ids(&user, RuleKind::Override), ["c", "a", "b"]);
        let (merged, _) = Ruleset::for_user(ALICE, &user);
        let ids: Vec<_> = merged.override_.iter().map(|r| r.rule_id.as_str()).collect();
        assert_eq!(&ids[..4], [".m.rule.master", "c", "a", "b"]);
        assert!(merged.override_[0].enabled);
    }

    #[test]
    fn bad_before_and_after_leave_the_rules_unchanged() {
        let mut user = abc();
        let err = put(&mut user, "x", Some("missing"), None).unwrap_err();
        assert_eq!(err, EditError::AnchorNotFound { anchor: "missing".into() });
        assert_eq!((err.status(), err.errcode()), (400, "M_UNKNOWN"));
        let err = put(&mut user, "a", None, Some("missing")).unwrap_err();
        assert_eq!(err, EditError::AnchorNotFound { anchor: "missing".into() }, "on update too");

        // A rule of another kind is not a valid anchor.
        put_rule(&mut user, RuleKind::Underride, "u", underride_body(), None, None).unwrap();
        let err = put(&mut user, "x", Some("u"), None).unwrap_err();
        assert_eq!(err, EditError::AnchorNotFound { anchor: "u".into() });

        for anchor in [".m.rule.master", ".m.rule.suppress_notices", ".m.rule.nonexistent"] {
            let err = put(&mut user, "x", None, Some(anchor)).unwrap_err();
            assert_eq!(
                err,
                EditError::AnchorIsServerDefault { rule_id: "x".into(), anchor: anchor.into() }
            );
            assert_eq!((err.status(), err.errcode()), (400, "M_INVALID_PARAM"));
        }
        // Even one whose change the user has stored.
        set_actions(&mut user, ALICE, RuleKind::Override, ".m.rule.master", vec![]).unwrap();
        let err = put(&mut user, "x", Some(".m.rule.master"), None).unwrap_err();
        assert!(matches!(err, EditError::AnchorIsServerDefault { .. }));

        invalid(put(&mut user, "b", Some("b"), None).unwrap_err(), "relative to itself");
        assert_eq!(own_ids(&user, RuleKind::Override), ["a", "b", "c"]);
        assert!(user.override_.iter().all(|r| r.rule_id != "x"));
    }

    #[test]
    fn updating_a_rule_keeps_its_place_and_enabled_unless_moved() {
        let mut user = abc();
        set_enabled(&mut user, ALICE, RuleKind::Override, "b", false).unwrap();
        let quiet = new_rule(RuleKind::Override, "b", json!({"actions": []}));
        put_rule(&mut user, RuleKind::Override, "b", quiet, None, None).unwrap();
        assert_eq!(own_ids(&user, RuleKind::Override), ["a", "b", "c"]);
        let b = &user.override_[1];
        assert_eq!((b.enabled, b.actions.as_slice()), (false, &[][..]), "enabled kept");
        assert_eq!(b.conditions, Some(vec![]), "conditions replaced");

        let moves = [
            ("c", Some("a"), None, vec!["c", "a", "b"]),
            ("a", None, Some("b"), vec!["c", "b", "a"]),
            ("b", None, Some("c"), vec!["c", "b", "a"]),
            ("b", Some("a"), None, vec!["c", "b", "a"]),
            ("c", None, Some("a"), vec!["b", "a", "c"]),
            ("b", Some("c"), None, vec!["a", "b", "c"]),
        ];
        for (id, before, after, want) in moves {
            put(&mut user, id, before, after).unwrap();
            assert_eq!(own_ids(&user, RuleKind::Override), want, "{id} {before:?} {after:?}");
        }
        assert!(!user.override_.iter().find(|r| r.rule_id == "b").unwrap().enabled);
    }

    #[test]
    fn delete_removes_user_rules_only() {
        let mut user = abc();
        delete_rule(&mut user, RuleKind::Override, "b").unwrap();
        assert_eq!(own_ids(&user, RuleKind::Override), ["a", "c"]);

        let err = delete_rule(&mut user, RuleKind::Override, "b").unwrap_err();
        assert_eq!(err, EditError::not_found(RuleKind::Override, "b"));
        assert_eq!((err.status(), err.errcode()), (404, "M_NOT_FOUND"));
        let err = delete_rule(&mut user, RuleKind::Underride, "a").unwrap_err();
        assert_eq!(err, EditError::not_found(RuleKind::Underride, "a"), "kinds are separate");

        set_enabled(&mut user, ALICE, RuleKind::Override, ".m.rule.master", true).unwrap();
        let before = user.clone();
        for (kind, id) in [
            (RuleKind::Override, ".m.rule.master"),
            (RuleKind::Content, ".m.rule.contains_user_name"),
            (RuleKind::Underride, ".m.rule.message"),
        ] {
            invalid(delete_rule(&mut user, kind, id).unwrap_err(), "cannot be deleted");
        }
        let err = delete_rule(&mut user, RuleKind::Override, ".m.rule.message").unwrap_err();
        assert_eq!(err, EditError::not_found(RuleKind::Override, ".m.rule.message"), "wrong kind");
        let err = delete_rule(&mut user, RuleKind::Override, ".m.rule.nonexistent").unwrap_err();
        assert_eq!(err.status(), 404);
        assert_eq!(user, before);
    }

    #[test]
    fn get_shows_the_merged_rule() {
        let mut user = abc();
        let master = get_rule(&user, ALICE, RuleKind::Override, ".m.rule.master").unwrap();
        assert!(master.default && !master.enabled);
        let invite = get_rule(&user, ALICE, RuleKind::Override, ".m.rule.invite_for_me").unwrap();
        let invite = serde_json::to_value(invite).unwrap();
        assert_eq!(invite["conditions"][2]["pattern"], ALICE, "filled in for the user");
        let name = get_rule(&user, ALICE, RuleKind::Content, ".m.rule.contains_user_name").unwrap();
        assert_eq!(name.pattern.as_deref(), Some("alice"));

        let a = get_rule(&user, ALICE, RuleKind::Override, "a").unwrap();
        assert_eq!(a, user.override_[0]);
        assert!(!a.default);

        set_actions(&mut user, ALICE, RuleKind::Override, ".m.rule.master", vec![Action::Notify])
            .unwrap();
        let master = get_rule(&user, ALICE, RuleKind::Override, ".m.rule.master").unwrap();
        assert_eq!(master.actions, [Action::Notify]);
        assert_eq!(master.conditions, Some(vec![]), "the definition stays the server's");

        for (kind, id) in [
            (RuleKind::Override, "missing"),
            (RuleKind::Underride, "a"),
            (RuleKind::Underride, ".m.rule.master"),
            (RuleKind::Override, ".m.rule.nonexistent"),
        ] {
            assert_eq!(get_rule(&user, ALICE, kind, id), Err(EditError::not_found(kind, id)));
        }
    }

    #[test]
    fn disabling_a_default_stops_it_matching() {
        let mut user = Ruleset::default();
        let hello = message("hello");
        assert_eq!(decide(&user, &hello), Some((".m.rule.message".into(), true)));

        set_enabled(&mut user, ALICE, RuleKind::Underride, ".m.rule.message", false).unwrap();
        let rule = get_rule(&user, ALICE, RuleKind::Underride, ".m.rule.message").unwrap();
        assert!(!rule.enabled && rule.default);
        assert_eq!(rule.actions, [Action::Notify], "actions kept");
        assert_eq!(decide(&user, &hello), None);

        set_enabled(&mut user, ALICE, RuleKind::Underride, ".m.rule.message", true).unwrap();
        assert_eq!(user.underride.len(), 1, "the same entry is updated");
        assert_eq!(decide(&user, &hello), Some((".m.rule.message".into(), true)));

        set_enabled(&mut user, ALICE, RuleKind::Override, ".m.rule.master", true).unwrap();
        assert_eq!(decide(&user, &hello), Some((".m.rule.master".into(), false)));
    }

    #[test]
    fn setting_a_defaults_actions_keeps_its_enabled() {
        let mut user = Ruleset::default();
        let hello = message("hello");
        set_actions(&mut user, ALICE, RuleKind::Underride, ".m.rule.message", vec![]).unwrap();
        let rule = get_rule(&user, ALICE, RuleKind::Underride, ".m.rule.message").unwrap();
        assert!(rule.enabled && rule.actions.is_empty());
        assert_eq!(decide(&user, &hello), Some((".m.rule.message".into(), false)), "no notify");

        // Master starts disabled: changing its actions must not enable it.
        let highlight =
            vec![Action::Notify, Action::SetTweak { name: "highlight".into(), value: None }];
        set_actions(&mut user, ALICE, RuleKind::Override, ".m.rule.master", highlight.clone())
            .unwrap();
        let master = get_rule(&user, ALICE, RuleKind::Override, ".m.rule.master").unwrap();
        assert!(!master.enabled);
        assert_eq!(master.actions, highlight);

        set_enabled(&mut user, ALICE, RuleKind::Underride, ".m.rule.message", false).unwrap();
        let entry = &user.underride[0];
        assert_eq!((entry.enabled, entry.actions.len()), (false, 0), "both carried");
        assert_eq!(decide(&user, &hello), None);

        let (merged, ignored) = Ruleset::for_user(ALICE, &user);
        assert!(ignored.is_empty());
        assert_eq!(merged.underride.len(), Ruleset::server_default(ALICE).underride.len());
    }

    #[test]
    fn user_rules_change_in_place() {
        let mut user = abc();
        set_enabled(&mut user, ALICE, RuleKind::Override, "a", false).unwrap();
        assert_eq!(decide(&user, &message("hi")), Some(("b".into(), true)));
        set_actions(&mut user, ALICE, RuleKind::Override, "b", vec![]).unwrap();
        assert_eq!(decide(&user, &message("hi")), Some(("b".into(), false)));
        assert_eq!(own_ids(&user, RuleKind::Override), ["a", "b", "c"]);
        assert_eq!(user.override_.len(), 3, "no `.` entries");

        let before = user.clone();
        for (kind, id) in [
            (RuleKind::Override, "missing"),
            (RuleKind::Room, "a"),
            (RuleKind::Override, ".m.rule.nonexistent"),
            (RuleKind::Content, ".m.rule.master"),
        ] {
            let not_found = EditError::not_found(kind, id);
            assert_eq!(set_enabled(&mut user, ALICE, kind, id, false), Err(not_found.clone()));
            assert_eq!(set_actions(&mut user, ALICE, kind, id, vec![]), Err(not_found));
        }
        assert_eq!(user, before);
    }

    #[test]
    fn enabled_and_actions_bodies() {
        assert_eq!(enabled_from_body(&json!({"enabled": false})), Ok(false));
        for bad in [json!({}), json!({"enabled": "true"}), json!(true), json!(null)] {
            invalid(enabled_from_body(&bad).unwrap_err(), "`enabled` must be a boolean");
        }
        let actions = actions_from_body(&json!({"actions": ["notify", "dont_notify"]})).unwrap();
        assert_eq!(actions, [Action::Notify]);
        invalid(actions_from_body(&json!({})).unwrap_err(), "`actions` is required");
        invalid(actions_from_body(&json!([])).unwrap_err(), "`actions` is required");
        invalid(actions_from_body(&json!({"actions": [[]]})).unwrap_err(), "action 0 must be");
    }
}
