//! Glob matching for push rules: `*` (any run of characters, newlines included) and `?` (exactly
//! one character); every other character, `[`, `\` and regex metacharacters included, is literal.
//!
//! Matching is case-insensitive: patterns are lower-cased once when compiled, and text is folded
//! as it is read (ASCII) or once per event (anything else, see [`Folded`]). Two modes:
//! - [`Glob::matches`]: the pattern must match the whole value;
//! - [`Glob::matches_words`]: the pattern must match some substring that starts and ends at a
//!   word boundary (`content.body`). A position is a boundary unless it sits between two word
//!   characters, and word characters are exactly `[A-Za-z0-9_]`; so `é`, `-` and a newline
//!   separate words, and a pattern may begin or end with a separator (`@room`).
//!
//! The matcher never compiles anything per call, never allocates, and runs in
//! O(text × pattern) at worst: a glob is a list of literal segments between `*`s, and each
//! segment is placed at its earliest possible position, which is always optimal.

/// One pattern character.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tok {
    /// This character (already lower-cased).
    Lit(char),
    /// `?`: any one character.
    Any,
}

/// A run of pattern characters with no `*` in it.
type Seg = Box<[Tok]>;

/// A compiled glob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Glob(Shape);

#[derive(Clone, Debug, PartialEq, Eq)]
enum Shape {
    /// No `*`: the text (or word run) has exactly this many characters.
    Exact(Seg),
    /// `head*middle[0]*…*tail`; `head` and `tail` are empty when the pattern starts or ends
    /// with `*`.
    Starred { head: Seg, middle: Box<[Seg]>, tail: Seg },
}

/// Text as the matcher reads it. ASCII text is used as it is and folded byte by byte; any other
/// text is lower-cased into characters once (by [`Folded::owned`]).
#[derive(Clone, Copy, Debug)]
pub enum Folded<'a> {
    Ascii(&'a [u8]),
    Wide(&'a [char]),
}

impl Folded<'_> {
    /// The lower-cased characters of `text` when it is not ASCII (`None` when it is, as ASCII
    /// text needs no copy).
    pub fn owned(text: &str) -> Option<Box<[char]>> {
        (!text.is_ascii()).then(|| text.to_lowercase().chars().collect())
    }
}

impl Glob {
    /// Compiles a push-rule pattern.
    pub fn new(pattern: &str) -> Glob {
        let mut segs: Vec<Seg> = Vec::new();
        let mut run = Vec::new();
        let mut starred = false;
        for c in pattern.to_lowercase().chars() {
            match c {
                '*' => {
                    segs.push(std::mem::take(&mut run).into());
                    starred = true;
                }
                '?' => run.push(Tok::Any),
                c => run.push(Tok::Lit(c)),
            }
        }
        if !starred {
            return Glob(Shape::Exact(run.into()));
        }
        // `segs` is the head, then the runs between stars; `a**b` leaves an empty run, which
        // matches anywhere and is dropped.
        let mut runs = segs.into_iter();
        let head = runs.next().unwrap_or_default();
        let middle = runs.filter(|s| !s.is_empty()).collect();
        Glob(Shape::Starred { head, middle, tail: run.into() })
    }

    /// Compiles text that must appear literally (a display name): `*` and `?` are plain
    /// characters here.
    pub fn literal(text: &str) -> Glob {
        Glob(Shape::Exact(text.to_lowercase().chars().map(Tok::Lit).collect()))
    }

    /// Whether the pattern matches the whole of `text`.
    pub fn matches(&self, text: Folded<'_>) -> bool {
        match text {
            Folded::Ascii(t) => self.whole(t),
            Folded::Wide(t) => self.whole(t),
        }
    }

    /// Whether the pattern matches a substring of `text` that starts and ends at a word
    /// boundary.
    pub fn matches_words(&self, text: Folded<'_>) -> bool {
        match text {
            Folded::Ascii(t) => self.words(t),
            Folded::Wide(t) => self.words(t),
        }
    }

    fn whole<S: Sym>(&self, t: &[S]) -> bool {
        match &self.0 {
            Shape::Exact(seg) => seg.len() == t.len() && seg_at(t, 0, seg),
            Shape::Starred { head, middle, tail } => {
                let Some(end) = t.len().checked_sub(tail.len()) else { return false };
                if head.len() > end || !seg_at(t, 0, head) || !seg_at(t, end, tail) {
                    return false;
                }
                let mut at = head.len();
                for seg in middle {
                    match find_seg(&t[..end], at, seg) {
                        Some(i) => at = i + seg.len(),
                        None => return false,
                    }
                }
                true
            }
        }
    }

    fn words<S: Sym>(&self, t: &[S]) -> bool {
        let n = t.len();
        let boundary = |k: usize| k == 0 || k >= n || !t[k - 1].is_word() || !t[k].is_word();
        match &self.0 {
            Shape::Exact(seg) => {
                find_seg_where(t, 0, seg, |i| boundary(i) && boundary(i + seg.len())).is_some()
            }
            Shape::Starred { head, middle, tail } => {
                // The earliest start leaves the most room for everything after it.
                let Some(start) = find_seg_where(t, 0, head, boundary) else { return false };
                let mut at = start + head.len();
                for seg in middle {
                    match find_seg(t, at, seg) {
                        Some(i) => at = i + seg.len(),
                        None => return false,
                    }
                }
                // With an empty tail, the trailing `*` runs to the end, which is a boundary.
                find_seg_where(t, at, tail, |q| boundary(q + tail.len())).is_some()
            }
        }
    }
}

/// A character of folded text.
trait Sym: Copy {
    /// The lower-cased character.
    fn fold(self) -> char;
    /// Whether it is one of `[A-Za-z0-9_]`.
    fn is_word(self) -> bool;
    /// The first position at or after `from` whose folded character is `c` (lower-cased).
    fn find(t: &[Self], from: usize, c: char) -> Option<usize>;
}

impl Sym for u8 {
    #[inline]
    fn fold(self) -> char {
        char::from(self.to_ascii_lowercase())
    }
    #[inline]
    fn is_word(self) -> bool {
        self.is_ascii_alphanumeric() || self == b'_'
    }
    fn find(t: &[u8], from: usize, c: char) -> Option<usize> {
        let hay = t.get(from..)?;
        let lower = u8::try_from(c).ok().filter(u8::is_ascii)?;
        let upper = lower.to_ascii_uppercase();
        let found = if upper == lower {
            memchr::memchr(lower, hay)
        } else {
            memchr::memchr2(lower, upper, hay)
        };
        found.map(|i| from + i)
    }
}

impl Sym for char {
    #[inline]
    fn fold(self) -> char {
        self
    }
    #[inline]
    fn is_word(self) -> bool {
        self.is_ascii_alphanumeric() || self == '_'
    }
    fn find(t: &[char], from: usize, c: char) -> Option<usize> {
        t.get(from..)?.iter().position(|&x| x == c).map(|i| from + i)
    }
}

#[inline]
fn seg_at<S: Sym>(t: &[S], i: usize, seg: &[Tok]) -> bool {
    let Some(window) = t.get(i..i + seg.len()) else { return false };
    window.iter().zip(seg).all(|(s, tok)| match tok {
        Tok::Any => true,
        Tok::Lit(c) => s.fold() == *c,
    })
}

/// The first position at or after `from` where `seg` matches.
fn find_seg<S: Sym>(t: &[S], from: usize, seg: &[Tok]) -> Option<usize> {
    let last = t.len().checked_sub(seg.len())?;
    let mut i = from;
    while i <= last {
        if let Some(Tok::Lit(c)) = seg.first() {
            // Jump to the next place the first character occurs (memchr on ASCII text).
            i = S::find(&t[..=last], i, *c)?;
        }
        if seg_at(t, i, seg) {
            return Some(i);
        }
        i += 1;
    }
    None
}

/// The first position at or after `from` where `seg` matches and `ok` holds.
fn find_seg_where<S: Sym>(
    t: &[S],
    from: usize,
    seg: &[Tok],
    ok: impl Fn(usize) -> bool,
) -> Option<usize> {
    let mut i = from;
    loop {
        let at = find_seg(t, i, seg)?;
        if ok(at) {
            return Some(at);
        }
        i = at + 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn folded(text: &str) -> (Vec<u8>, Option<Box<[char]>>) {
        (text.as_bytes().to_vec(), Folded::owned(text))
    }

    fn whole(pattern: &str, text: &str) -> bool {
        let (bytes, wide) = folded(text);
        let t = wide.as_deref().map_or(Folded::Ascii(&bytes), Folded::Wide);
        Glob::new(pattern).matches(t)
    }

    fn words(pattern: &str, text: &str) -> bool {
        let (bytes, wide) = folded(text);
        let t = wide.as_deref().map_or(Folded::Ascii(&bytes), Folded::Wide);
        Glob::new(pattern).matches_words(t)
    }

    #[test]
    fn whole_value_globs() {
        // The spec's own examples for `lunc?*`.
        assert!(whole("lunc?*", "Lunch plans"));
        assert!(whole("lunc?*", "LUNCH"));
        assert!(!whole("lunc?*", " lunch"));
        assert!(!whole("lunc?*", "lunc"));
        assert!(whole("m.notice", "m.notice"));
        assert!(!whole("m.notice", "m.noticeX"));
        assert!(!whole("m.notice", "m_notice"), "`.` is literal");
        assert!(whole("", ""));
        assert!(!whole("", "a"));
        assert!(whole("*", ""));
        assert!(whole("*", "anything\nat all"));
        assert!(whole("a*b*c", "abc"));
        assert!(whole("a*b*c", "a-b-b-c"));
        assert!(!whole("a*b*c", "a-c-b"));
        assert!(!whole("ab*ba", "aba"), "head and tail may not overlap");
        assert!(whole("a**b", "ab"));
        assert!(whole("?", "é"), "`?` is one character, not one byte");
        assert!(!whole("??", "é"));
        assert!(whole("*\n*", "one\ntwo"), "`*` crosses newlines");
    }

    #[test]
    fn only_star_and_question_mark_are_special() {
        assert!(whole("[abc]", "[abc]"));
        assert!(!whole("[abc]", "a"));
        assert!(whole("a\\*b", "a\\xyzb"), "`\\` escapes nothing; `*` stays a wildcard");
        assert!(whole("a\\b", "a\\b"));
        assert!(whole("^a.c$", "^a.c$"));
        assert!(!whole("^a.c$", "abc"));
        assert!(whole("(x|y)+", "(X|Y)+"));
        assert!(!whole("(x|y)+", "x"));
    }

    #[test]
    fn case_folding() {
        assert!(whole("ÉCOLE", "école"));
        assert!(whole("hello", "HeLLo"));
        assert!(!whole("hello", "hellö"));
    }

    #[test]
    fn word_matches_need_boundaries_on_both_sides() {
        // The spec's examples for `ex*ple`.
        assert!(words("ex*ple", "An example event."));
        assert!(words("ex*ple", "exple"));
        assert!(words("ex*ple", "An exciting triple-whammy"));
        assert!(!words("ex*ple", "An exciting triples"));
        assert!(words("cake", "I like cake!"));
        assert!(!words("cake", "cupcake"));
        assert!(!words("cake", "cakes"));
        assert!(words("cake", "cup-cake"), "`-` separates words");
        assert!(!words("cake", "cup_cake"), "`_` is a word character");
        assert!(words("cake", "cakeé"), "`é` is not a word character");
        assert!(words("cake", "line\ncake\n"));
        assert!(words("alice", "ALICE: hi"));
        assert!(!words("alice", "alice2"));
        assert!(words("alice", "alice alice2"));
        assert!(words("a?c", "x abc y"));
        assert!(!words("a?c", "xabc"));
    }

    #[test]
    fn word_matches_may_start_or_end_with_a_separator() {
        assert!(words("@room", "@room hello"));
        assert!(words("@room", "hi @room"));
        assert!(words("@room", "hi@room"), "`@` itself is a boundary");
        assert!(!words("@room", "@roomy"));
        assert!(words("-x-", "a-x-b"));
    }

    #[test]
    fn word_matches_try_every_occurrence() {
        assert!(words("aa", "aaa aa"));
        assert!(words("a*b", "ab1 ab"));
        assert!(words("a*b", "xab a-b"));
        assert!(!words("a*b", "xab a-bc"));
        assert!(words("*b", "aab"));
        assert!(words("b*", "ab b"));
        assert!(!words("b*", "ab"));
        assert!(words("*", ""));
        assert!(words("", "anything"), "the empty substring at the start is at a boundary");
    }

    #[test]
    fn pathological_inputs_stay_fast() {
        // Quadratic in the worst case is 2,000 × 20; this would be hopeless with backtracking.
        let text = "a ".repeat(1000);
        assert!(!words("*a*a*a*a*a*a*a*a*a*b*", &text));
        assert!(!whole("*a*a*a*a*a*a*a*a*a*b", &text));
        let long = "a".repeat(5000);
        assert!(!words("a*b", &long));
    }
}
