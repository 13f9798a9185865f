//! Criterion benches for push-rule evaluation: herald's compiled evaluator against ruma's
//! (`ruma-common` 0.20) on the same rules and the same events, in the same run, so each ratio is
//! read from one run on one machine.
//!
//! Groups (the recipient is `@alice:example.org`, display name "Alice Liddell", in a 10-member
//! room; the event is a plain `m.text` `m.room.message` from `@bob:example.org` with a 60-char
//! body and no `m.mentions`, so the legacy body-mention rules run):
//! - `defaults_plain_message`: server-default rules only; `.m.rule.message` decides.
//! - `defaults_plus_50_content_rules`: the same plus 50 user content rules (45 plain words,
//!   5 globs), none of which match; `.m.rule.message` decides.
//! - `body_keyword_hit`: the same 50 content rules, but the 30th matches a word of the body.
//! - `compile`: building a rule set of the defaults, 50 content rules and 4 override rules.
//!   herald: `Ruleset::for_user` + `CompiledRuleset::compile`. ruma has no compile step; its
//!   nearest equivalent is timed: `Ruleset::server_default`, the three legacy rules added (see
//!   below), and `Ruleset::insert` of the 54 user rules.
//! - `flatten`: flattening the event alone: herald's `FlatEvent::new` from a parsed
//!   `serde_json::Value`, the same after parsing the JSON text, and ruma's
//!   `FlattenedJson::from_raw` (which always parses the `Raw` JSON text itself).
//!
//! Each evaluation group has four functions:
//! - `herald/evaluate`: `CompiledRuleset::evaluate` on a `FlatEvent` built beforehand (herald's
//!   design: flatten once per event, evaluate once per recipient);
//! - `ruma/evaluate`: the loop of ruma's `Ruleset::get_match` (the sender check, then
//!   `AnyPushRuleRef::applies` rule by rule) on a `FlattenedJson` built beforehand;
//! - `herald/end_to_end`: `FlatEvent::new` from the parsed `serde_json::Value`, then evaluate;
//! - `ruma/end_to_end`: `Ruleset::get_match(&Raw, …)`, which parses and flattens the raw JSON
//!   itself (so it includes JSON parsing, which herald's end-to-end does not).
//!
//! ruma 0.20's server defaults lack the legacy rules `.m.rule.contains_display_name`,
//! `.m.rule.roomnotif` and `.m.rule.contains_user_name` (deprecated since Matrix 1.7 but still
//! in the spec, and in herald's defaults). They are added to ruma's rule set from the spec's
//! JSON, at the spec's positions, so both evaluate the same rules in the same order; before
//! timing anything, the bench checks that both rule sets list the same rule ids in the same
//! order and that both pick the same rule for every input. ruma's methods are `async` but never
//! pend here; they are polled once with a no-op waker. Expect ruma's content-rule groups to be
//! dominated by its glob matching, which lower-cases body and pattern on every call and builds
//! a `Regex` for every pattern holding `*` or `?`.
//!
//! `cargo bench --bench pushrules` (about 1.5 minutes once built). Compare runs on one machine only; these
//! machines are noisy.

use std::collections::BTreeMap;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, black_box, criterion_group, criterion_main};
use herald::homeserver::pushrules::{
    CompiledRuleset, DisplayName, FlatEvent, PowerLevels, RoomCtx, Ruleset,
};
use ruma_common::power_levels::NotificationPowerLevels;
use ruma_common::push::{
    AnyPushRuleRef, ConditionalPushRule, FlattenedJson, NewConditionalPushRule,
    NewPatternedPushRule, NewPushRule, PatternedPushRule, PushConditionPowerLevelsCtx,
    PushConditionRoomCtx,
};
use ruma_common::room_version_rules::{AuthorizationRules, RoomPowerLevelsRules};
use ruma_common::serde::Raw;
use ruma_common::{OwnedRoomId, OwnedUserId};
use serde_json::{Value, json};

const ALICE: &str = "@alice:example.org";
const ALICE_NAME: &str = "Alice Liddell";
const BOB: &str = "@bob:example.org";
const ROOM: &str = "!jEsUZKDJdhlrceRyVU:example.org";
/// 60 characters; no display name, user name, `@room` or keyword in it.
const BODY: &str = "Are we still on for the planning meeting tomorrow afternoon?";

/// The user's keyword patterns: 45 plain words and 5 globs (at 7, 19, 33, 41 and 48), none of
/// which match [`BODY`].
const KEYWORDS: [&str; 50] = [
    "kubernetes",
    "deploy",
    "outage",
    "pagerduty",
    "rollback",
    "database",
    "migration",
    "incident*",
    "latency",
    "grafana",
    "prometheus",
    "terraform",
    "ansible",
    "jenkins",
    "invoice",
    "payroll",
    "budget",
    "quarterly",
    "roadmap",
    "*postmortem",
    "hiring",
    "offsite",
    "coffee",
    "pizza",
    "birthday",
    "vacation",
    "holiday",
    "standup",
    "retro",
    "sprint",
    "backlog",
    "security",
    "phishing",
    "rel?ase",
    "password",
    "vpn",
    "firewall",
    "certificate",
    "expired",
    "urgent",
    "asap",
    "deploy*prod",
    "blocker",
    "regression",
    "crash",
    "segfault",
    "escalation",
    "oncall",
    "h?tfix",
    "downtime",
];

/// The keyword that replaces the 30th pattern in `body_keyword_hit`: a word of [`BODY`].
const HIT: &str = "meeting";
const HIT_INDEX: usize = 29;

/// Polls a future that must be ready at once (ruma's evaluator never pends without thread
/// subscriptions).
fn ready<F: Future>(future: F) -> F::Output {
    match pin!(future).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(output) => output,
        Poll::Pending => panic!("ruma's evaluator pended"),
    }
}

fn event() -> Value {
    json!({
        "type": "m.room.message",
        "room_id": ROOM,
        "sender": BOB,
        "event_id": "$143273582443PhrSn:example.org",
        "origin_server_ts": 1_432_735_824_653_u64,
        "content": {"msgtype": "m.text", "body": BODY},
        "unsigned": {"age": 1234}
    })
}

fn keyword_actions() -> Value {
    json!(["notify", {"set_tweak": "highlight"}])
}

/// The user's own rules, as `m.push_rules` `global` JSON: a content rule per keyword, and when
/// `overrides`, four override rules.
fn user_rules(keywords: &[&str], overrides: bool) -> Value {
    let content: Vec<Value> = keywords
        .iter()
        .enumerate()
        .map(|(i, pattern)| {
            json!({"rule_id": format!("kw{i:02}"), "enabled": true, "pattern": pattern,
                   "actions": keyword_actions()})
        })
        .collect();
    let override_ = if overrides {
        json!([
            {"rule_id": "mute-bots", "enabled": true, "actions": [],
             "conditions": [{"kind": "event_match", "key": "sender", "pattern": "@*bot:example.org"}]},
            {"rule_id": "alerts", "enabled": true,
             "actions": ["notify", {"set_tweak": "sound", "value": "alarm"}, {"set_tweak": "highlight"}],
             "conditions": [{"kind": "event_match", "key": "room_id", "pattern": "!alerts:example.org"},
                            {"kind": "event_match", "key": "content.body", "pattern": "*critical*"}]},
            {"rule_id": "small-room-edits", "enabled": true, "actions": [],
             "conditions": [{"kind": "room_member_count", "is": "<20"},
                            {"kind": "event_property_is", "key": "content.m\\.relates_to.rel_type",
                             "value": "m.replace"}]},
            {"rule_id": "ping-list", "enabled": true, "actions": ["notify"],
             "conditions": [{"kind": "event_property_contains", "key": "content.org\\.example\\.ping",
                             "value": ALICE}]}
        ])
    } else {
        json!([])
    };
    json!({"override": override_, "content": content})
}

/// The same rules as ruma's `Ruleset::insert` takes them.
fn ruma_user_rules(rules: &Value) -> Vec<NewPushRule> {
    fn field<T: serde::de::DeserializeOwned>(rule: &Value, name: &str) -> T {
        serde_json::from_value(rule[name].clone()).unwrap()
    }
    let text = |rule: &Value, name: &str| rule[name].as_str().unwrap().to_owned();
    let overrides = rules["override"].as_array().unwrap().iter().map(|rule| {
        NewPushRule::Override(NewConditionalPushRule::new(
            text(rule, "rule_id"),
            field(rule, "conditions"),
            field(rule, "actions"),
        ))
    });
    let content = rules["content"].as_array().unwrap().iter().map(|rule| {
        NewPushRule::Content(NewPatternedPushRule::new(
            text(rule, "rule_id"),
            text(rule, "pattern"),
            field(rule, "actions"),
        ))
    });
    overrides.chain(content).collect()
}

/// The three legacy server-default rules ruma 0.20 no longer has, from the spec's JSON.
#[derive(Clone)]
struct Legacy {
    contains_display_name: ConditionalPushRule,
    roomnotif: ConditionalPushRule,
    contains_user_name: PatternedPushRule,
}

impl Legacy {
    fn new(localpart: &str) -> Legacy {
        let highlight_sound = json!(["notify", {"set_tweak": "sound", "value": "default"}, {"set_tweak": "highlight"}]);
        Legacy {
            contains_display_name: serde_json::from_value(json!({
                "rule_id": ".m.rule.contains_display_name", "default": true, "enabled": true,
                "conditions": [{"kind": "contains_display_name"}],
                "actions": highlight_sound
            }))
            .unwrap(),
            roomnotif: serde_json::from_value(json!({
                "rule_id": ".m.rule.roomnotif", "default": true, "enabled": true,
                "conditions": [{"kind": "event_match", "key": "content.body", "pattern": "@room"},
                               {"kind": "sender_notification_permission", "key": "room"}],
                "actions": ["notify", {"set_tweak": "highlight"}]
            }))
            .unwrap(),
            contains_user_name: serde_json::from_value(json!({
                "rule_id": ".m.rule.contains_user_name", "default": true, "enabled": true,
                "pattern": localpart, "actions": highlight_sound
            }))
            .unwrap(),
        }
    }
}

/// ruma's nearest equivalent of `Ruleset::for_user`: its server defaults, the legacy rules at
/// the spec's positions, then the user's rules (inserted last first, as each new rule goes to
/// the top of its kind, after `.m.rule.master`).
fn ruma_ruleset(
    user: &OwnedUserId,
    legacy: &Legacy,
    rules: &[NewPushRule],
) -> ruma_common::push::Ruleset {
    let mut set = ruma_common::push::Ruleset::server_default(user);
    let overrides = &mut set.override_;
    let (at, _) = overrides.insert_full(legacy.contains_display_name.clone());
    let to = overrides.get_index_of(".m.rule.is_user_mention").unwrap() + 1;
    overrides.move_index(at, to);
    let (at, _) = overrides.insert_full(legacy.roomnotif.clone());
    let to = overrides.get_index_of(".m.rule.is_room_mention").unwrap() + 1;
    overrides.move_index(at, to);
    set.content.insert(legacy.contains_user_name.clone());
    for rule in rules.iter().rev() {
        set.insert(rule.clone(), None, None).unwrap();
    }
    set
}

/// ruma's `get_match` on an already flattened event.
fn ruma_match<'r>(
    set: &'r ruma_common::push::Ruleset,
    event: &FlattenedJson,
    ctx: &PushConditionRoomCtx,
) -> Option<AnyPushRuleRef<'r>> {
    ready(async {
        if event.get_str("sender").is_some_and(|sender| sender == ctx.user_id) {
            return None;
        }
        for rule in set {
            if rule.applies(event, ctx).await {
                return Some(rule);
            }
        }
        None
    })
}

/// One rule set in both engines.
struct Rules {
    user: Value,
    herald: CompiledRuleset,
    ruma: ruma_common::push::Ruleset,
}

impl Rules {
    fn new(user: Value, alice: &OwnedUserId, legacy: &Legacy) -> Rules {
        let parsed: Ruleset = serde_json::from_value(user.clone()).unwrap();
        let (merged, ignored) = Ruleset::for_user(ALICE, &parsed);
        assert!(ignored.is_empty());
        let ruma = ruma_ruleset(alice, legacy, &ruma_user_rules(&user));
        let herald_ids: Vec<(&str, bool)> =
            merged.iter().map(|(_, r)| (r.rule_id.as_str(), r.enabled)).collect();
        let ruma_ids: Vec<(&str, bool)> = ruma.iter().map(|r| (r.rule_id(), r.enabled())).collect();
        assert_eq!(herald_ids, ruma_ids, "both engines hold the same rules in the same order");
        Rules { user, herald: CompiledRuleset::compile(&merged, ALICE), ruma }
    }
}

fn benches(c: &mut Criterion) {
    let alice = OwnedUserId::try_from(ALICE).unwrap();
    let legacy = Legacy::new("alice");

    // The room, for each engine.
    let name = DisplayName::new(ALICE_NAME);
    let levels = PowerLevels::from_content(&json!({"users": {BOB: 50}}));
    let room =
        RoomCtx { member_count: Some(10), display_name: Some(&name), power_levels: Some(&levels) };
    let ruma_levels = PushConditionPowerLevelsCtx::new(
        BTreeMap::from([(OwnedUserId::try_from(BOB).unwrap(), 50.into())]),
        0.into(),
        NotificationPowerLevels::new(),
        RoomPowerLevelsRules::new(&AuthorizationRules::V10, []),
    );
    let ruma_room = PushConditionRoomCtx::new(
        OwnedRoomId::try_from(ROOM).unwrap(),
        10_u32.into(),
        alice.clone(),
        ALICE_NAME.to_owned(),
    )
    .with_power_levels(ruma_levels);

    // The event, for each engine.
    let value = event();
    let text = serde_json::to_string(&value).unwrap();
    let raw: Raw<Value> = Raw::from_json_string(text.clone()).unwrap();
    let flat = FlatEvent::new(&value);
    let ruma_flat = FlattenedJson::from_raw(&raw);

    let mut hit_keywords = KEYWORDS;
    hit_keywords[HIT_INDEX] = HIT;
    let cases = [
        ("defaults_plain_message", user_rules(&[], false), ".m.rule.message"),
        ("defaults_plus_50_content_rules", user_rules(&KEYWORDS, false), ".m.rule.message"),
        ("body_keyword_hit", user_rules(&hit_keywords, false), "kw29"),
    ];

    for (group_name, user, expected) in cases {
        let rules = Rules::new(user, &alice, &legacy);
        // Equal work: both engines pick the same rule, by either path.
        let herald_id = rules.herald.evaluate(&flat, &room).map(|m| m.rule_id);
        let ruma_id = ruma_match(&rules.ruma, &ruma_flat, &ruma_room).map(|r| r.rule_id());
        let ruma_e2e_id = ready(rules.ruma.get_match(&raw, &ruma_room)).map(|r| r.rule_id());
        assert_eq!(herald_id, Some(expected), "{group_name}: herald");
        assert_eq!(ruma_id, Some(expected), "{group_name}: ruma");
        assert_eq!(ruma_e2e_id, Some(expected), "{group_name}: ruma get_match");

        let mut group = c.benchmark_group(group_name);
        group.bench_function(BenchmarkId::new("herald", "evaluate"), |b| {
            b.iter(|| rules.herald.evaluate(black_box(&flat), black_box(&room)))
        });
        group.bench_function(BenchmarkId::new("ruma", "evaluate"), |b| {
            b.iter(|| ruma_match(&rules.ruma, black_box(&ruma_flat), black_box(&ruma_room)))
        });
        group.bench_function(BenchmarkId::new("herald", "end_to_end"), |b| {
            b.iter(|| {
                let flat = FlatEvent::new(black_box(&value));
                rules.herald.evaluate(&flat, black_box(&room))
            })
        });
        group.bench_function(BenchmarkId::new("ruma", "end_to_end"), |b| {
            b.iter(|| ready(rules.ruma.get_match(black_box(&raw), black_box(&ruma_room))))
        });
        group.finish();
    }

    // Compiling: defaults + 50 content rules + 4 override rules.
    let user = user_rules(&KEYWORDS, true);
    let rules = Rules::new(user, &alice, &legacy);
    assert_eq!(rules.herald.len(), 18 - 1 + 54, "every rule but the disabled master compiled");
    let herald_user: Ruleset = serde_json::from_value(rules.user.clone()).unwrap();
    let ruma_user = ruma_user_rules(&rules.user);
    let mut group = c.benchmark_group("compile");
    group.bench_function("herald", |b| {
        b.iter(|| {
            let (merged, _) = Ruleset::for_user(ALICE, black_box(&herald_user));
            CompiledRuleset::compile(&merged, ALICE)
        })
    });
    group.bench_function("ruma", |b| {
        b.iter(|| ruma_ruleset(black_box(&alice), &legacy, black_box(&ruma_user)))
    });
    group.finish();

    let mut group = c.benchmark_group("flatten");
    group.bench_function(BenchmarkId::new("herald", "from_value"), |b| {
        b.iter(|| FlatEvent::new(black_box(&value)))
    });
    group.bench_function(BenchmarkId::new("herald", "parse_and_flatten"), |b| {
        b.iter(|| {
            let value: Value = serde_json::from_str(black_box(&text)).unwrap();
            FlatEvent::new(&value).has_mentions()
        })
    });
    group.bench_function(BenchmarkId::new("ruma", "from_raw"), |b| {
        b.iter(|| FlattenedJson::from_raw(black_box(&raw)))
    });
    group.finish();
}

criterion_group! {
    name = pushrules;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .without_plots();
    targets = benches
}
criterion_main!(pushrules);
