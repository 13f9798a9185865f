//! An event flattened once for push-rule evaluation, and the dotted keys that look into it.
//!
//! A key such as `content.m\.relates_to.rel_type` names a property by its path through nested
//! objects: `.` separates names, `\.` is a literal dot and `\\` a literal backslash; a backslash
//! before anything else is itself literal. Keys are parsed once, when a rule set is compiled,
//! into a canonical path and its hash; flattening computes the same for every non-object value
//! of the event, so a lookup is a binary search on hashes plus one string comparison.
//!
//! Only values a condition can use are kept: strings (with their lower-cased form when not
//! ASCII), integers within ±(2^53−1), booleans, null and arrays. Floats and larger integers are
//! not canonical JSON and match nothing. This module never allocates per lookup and never
//! panics, whatever the event holds.

use std::hash::BuildHasher;
use std::ops::Range;
use std::sync::LazyLock;

use serde_json::{Map, Value};

use super::glob::Folded;

/// The largest integer canonical JSON allows (2^53 − 1); the smallest is its negation.
pub const MAX_SAFE_INTEGER: i64 = (1 << 53) - 1;

/// One hasher for the process, seeded at random, so keys compiled into any rule set and paths
/// flattened from any event agree while staying unpredictable to whoever writes events.
static HASHER: LazyLock<std::hash::RandomState> = LazyLock::new(std::hash::RandomState::new);

/// `content.body`, which `contains_display_name` and content rules read.
static BODY: LazyLock<Key> = LazyLock::new(|| Key::parse("content.body"));

fn hash(path: &str) -> u64 {
    HASHER.hash_one(path)
}

/// A dotted key, parsed and hashed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Key {
    hash: u64,
    /// The canonical path: names joined by `.`, each with `\` and `.` escaped.
    path: Box<str>,
}

impl Key {
    pub fn parse(dotted: &str) -> Key {
        let mut path = String::with_capacity(dotted.len());
        let mut chars = dotted.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '.' => path.push('.'),
                '\\' => match chars.peek() {
                    Some('.') => {
                        chars.next();
                        path.push_str("\\.");
                    }
                    Some('\\') => {
                        chars.next();
                        path.push_str("\\\\");
                    }
                    // A backslash escaping nothing is a literal backslash.
                    _ => path.push_str("\\\\"),
                },
                c => path.push(c),
            }
        }
        Key { hash: hash(&path), path: path.into() }
    }

    /// The canonical form of this key.
    pub fn as_str(&self) -> &str {
        &self.path
    }
}

/// A string from the event, ready for case-insensitive matching.
#[derive(Debug)]
pub struct Text<'a> {
    pub raw: &'a str,
    /// The lower-cased characters, when `raw` is not ASCII.
    wide: Option<Box<[char]>>,
}

impl<'a> Text<'a> {
    pub fn new(raw: &'a str) -> Text<'a> {
        Text { raw, wide: Folded::owned(raw) }
    }

    pub fn folded(&self) -> Folded<'_> {
        match &self.wide {
            Some(chars) => Folded::Wide(chars),
            None => Folded::Ascii(self.raw.as_bytes()),
        }
    }
}

/// A value a condition can look at.
#[derive(Debug)]
pub enum Leaf<'a> {
    Str(Text<'a>),
    Int(i64),
    Bool(bool),
    Null,
    /// Elements that are not canonical scalars are skipped when compared.
    Array(&'a [Value]),
}

#[derive(Debug)]
struct Entry<'a> {
    hash: u64,
    path: Range<usize>,
    leaf: Leaf<'a>,
}

/// An event flattened for evaluation: build it once, evaluate it for every recipient.
#[derive(Debug, Default)]
pub struct FlatEvent<'a> {
    /// Sorted by hash.
    entries: Vec<Entry<'a>>,
    /// Every entry's canonical path, back to back.
    paths: String,
    sender: Option<&'a str>,
    room_id: Option<&'a str>,
    /// Index of `content.body` in `entries`, found once: every content rule reads it.
    body: Option<usize>,
    has_mentions: bool,
}

impl<'a> FlatEvent<'a> {
    /// Flattens an event (a JSON object; anything else flattens to nothing).
    pub fn new(event: &'a Value) -> FlatEvent<'a> {
        let mut flat = FlatEvent::default();
        let Some(object) = event.as_object() else { return flat };
        flat.sender = object.get("sender").and_then(Value::as_str);
        flat.room_id = object.get("room_id").and_then(Value::as_str);
        flat.has_mentions = object
            .get("content")
            .and_then(Value::as_object)
            .is_some_and(|c| c.contains_key("m.mentions"));
        let mut scratch = String::new();
        flat.walk(object, &mut scratch);
        flat.entries.sort_unstable_by_key(|e| e.hash);
        flat.body = flat.position(&BODY).filter(|&i| matches!(flat.entries[i].leaf, Leaf::Str(_)));
        flat
    }

    fn walk(&mut self, object: &'a Map<String, Value>, scratch: &mut String) {
        for (name, value) in object {
            let len = scratch.len();
            if len > 0 {
                scratch.push('.');
            }
            for c in name.chars() {
                if matches!(c, '.' | '\\') {
                    scratch.push('\\');
                }
                scratch.push(c);
            }
            let leaf = match value {
                Value::Object(inner) => {
                    self.walk(inner, scratch);
                    None
                }
                Value::String(s) => Some(Leaf::Str(Text::new(s))),
                Value::Number(n) => {
                    n.as_i64().filter(|i| i.abs() <= MAX_SAFE_INTEGER).map(Leaf::Int)
                }
                Value::Bool(b) => Some(Leaf::Bool(*b)),
                Value::Null => Some(Leaf::Null),
                Value::Array(items) => Some(Leaf::Array(items)),
            };
            if let Some(leaf) = leaf {
                let start = self.paths.len();
                self.paths.push_str(scratch);
                self.entries.push(Entry {
                    hash: hash(scratch),
                    path: start..self.paths.len(),
                    leaf,
                });
            }
            scratch.truncate(len);
        }
    }

    fn position(&self, key: &Key) -> Option<usize> {
        let first = self.entries.partition_point(|e| e.hash < key.hash);
        self.entries[first..]
            .iter()
            .take_while(|e| e.hash == key.hash)
            .position(|e| self.paths.get(e.path.clone()) == Some(&*key.path))
            .map(|i| first + i)
    }

    /// The value at `key`, if it is one a condition can use.
    pub fn get(&self, key: &Key) -> Option<&Leaf<'a>> {
        self.position(key).map(|i| &self.entries[i].leaf)
    }

    /// The string at `key`.
    pub fn text(&self, key: &Key) -> Option<&Text<'a>> {
        match self.get(key) {
            Some(Leaf::Str(text)) => Some(text),
            _ => None,
        }
    }

    /// `content.body`, when it is a string.
    pub fn body(&self) -> Option<&Text<'a>> {
        match &self.entries.get(self.body?)?.leaf {
            Leaf::Str(text) => Some(text),
            _ => None,
        }
    }

    pub fn sender(&self) -> Option<&'a str> {
        self.sender
    }

    pub fn room_id(&self) -> Option<&'a str> {
        self.room_id
    }

    /// Whether `content` has an `m.mentions` property (whatever its value): if so, the three
    /// legacy body-mention rules are skipped.
    pub fn has_mentions(&self) -> bool {
        self.has_mentions
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn keys_unescape_dots_and_backslashes() {
        assert_eq!(Key::parse("content.body").as_str(), "content.body");
        assert_eq!(Key::parse(r"content.m\.relates_to").as_str(), r"content.m\.relates_to");
        assert_eq!(Key::parse(r"a\\.b").as_str(), r"a\\.b", "`\\\\` then a separator");
        assert_eq!(Key::parse(r"a\b").as_str(), r"a\\b", "a lone backslash is literal");
        assert_eq!(Key::parse(r"a\").as_str(), r"a\\");
    }

    #[test]
    fn lookups_follow_nesting_and_escapes() {
        let event = json!({
            "type": "m.room.message",
            "content": {
                "m.relates_to": {"rel_type": "m.replace"},
                "m": {"relates_to": "nested"},
                "a\\b": 1,
                "a.b": {"c": true},
                "n": null,
                "big": 9007199254740992_i64,
                "max": 9007199254740991_i64,
                "min": -9007199254740991_i64,
                "float": 1.0,
                "list": [1, "x", 2.5, {"o": 1}],
                "empty": {}
            }
        });
        let flat = FlatEvent::new(&event);
        let get = |k: &str| flat.get(&Key::parse(k));
        assert!(matches!(get("type"), Some(Leaf::Str(t)) if t.raw == "m.room.message"));
        assert!(
            matches!(get(r"content.m\.relates_to.rel_type"), Some(Leaf::Str(t)) if t.raw == "m.replace")
        );
        assert!(matches!(get("content.m.relates_to"), Some(Leaf::Str(t)) if t.raw == "nested"));
        assert!(matches!(get(r"content.a\\b"), Some(Leaf::Int(1))));
        assert!(matches!(get(r"content.a\b"), Some(Leaf::Int(1))));
        assert!(matches!(get(r"content.a\.b.c"), Some(Leaf::Bool(true))));
        assert!(get("content.a.b.c").is_none());
        assert!(matches!(get("content.n"), Some(Leaf::Null)));
        assert!(get("content.big").is_none(), "2^53 is outside canonical JSON");
        assert!(matches!(get("content.max"), Some(Leaf::Int(MAX_SAFE_INTEGER))));
        assert!(matches!(get("content.min"), Some(Leaf::Int(i)) if *i == -MAX_SAFE_INTEGER));
        assert!(get("content.float").is_none());
        assert!(matches!(get("content.list"), Some(Leaf::Array(a)) if a.len() == 4));
        assert!(get("content.empty").is_none());
        assert!(get("content").is_none(), "objects are not values");
        assert!(get("missing").is_none());
        assert!(!flat.has_mentions());
    }

    #[test]
    fn mentions_count_when_present_in_any_form() {
        for mentions in [json!({}), json!(null), json!({"user_ids": []}), json!("x")] {
            let event = json!({"content": {"m.mentions": mentions}});
            assert!(FlatEvent::new(&event).has_mentions(), "{mentions}");
        }
        assert!(!FlatEvent::new(&json!({"m.mentions": {}})).has_mentions(), "top level");
        assert!(!FlatEvent::new(&json!({"content": {"m": {"mentions": {}}}})).has_mentions());
    }

    #[test]
    fn non_objects_flatten_to_nothing() {
        for v in [json!(null), json!([1]), json!("event")] {
            let flat = FlatEvent::new(&v);
            assert!(flat.get(&Key::parse("type")).is_none());
            assert!(flat.sender().is_none());
        }
    }
}
