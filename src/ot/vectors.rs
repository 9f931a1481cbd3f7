//! Conformance vectors: a deterministic list of cases with the expected
//! results of every operation of the module, kept in `tests/vectors/ot.json`
//! so that other implementations (the web client, native clients) can check
//! themselves against this one.
//!
//! Each case has a document `doc` and two concurrent operations `a` and `b`
//! on it, and the expected: `after_a` / `after_b` (apply), `a_prime` /
//! `b_prime` (`transform(a, b)`, `a` wins ties), `after_both` (apply `a` then
//! `b_prime`, equal to `b` then `a_prime`), `compose` (`a` composed with
//! `b_prime`), `invert_a` (`a.invert(doc)`), and cursor positions mapped
//! through `a` with `is_own_op` true and false. Lengths and positions count
//! Unicode scalar values.
//!
//! The file is generated; regenerate it after a deliberate change with
//!
//! ```text
//! TUTTI_WRITE_VECTORS=1 cargo test --lib ot::vectors
//! ```
//!
//! and the test `vectors_file_is_current` fails while the file is stale.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use super::rng::SplitMix64;
use super::{Component, OtError, TextOperation};

/// Version of the vector file's layout.
pub const FORMAT: u32 = 1;

/// Number of generated (random but seeded) cases after the hand-written ones.
const GENERATED: usize = 50;

/// The whole vector file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VectorFile {
    /// Layout version ([`FORMAT`]).
    pub format: u32,
    /// What the file is and how it was made, for a human reader.
    pub notes: Vec<String>,
    /// The cases.
    pub cases: Vec<Vector>,
}

/// One case: two concurrent operations on a document and every expected result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vector {
    /// A short description.
    pub name: String,
    /// The document both operations were made on.
    pub doc: String,
    /// The first operation (wins insert ties in `transform`).
    pub a: TextOperation,
    /// The second operation.
    pub b: TextOperation,
    /// `a` applied to `doc`.
    pub after_a: String,
    /// `b` applied to `doc`.
    pub after_b: String,
    /// `transform(a, b).0`: `a` rebased onto `after_b`.
    pub a_prime: TextOperation,
    /// `transform(a, b).1`: `b` rebased onto `after_a`.
    pub b_prime: TextOperation,
    /// The converged document: `b_prime(after_a) == a_prime(after_b)`.
    pub after_both: String,
    /// `a.compose(b_prime)`, which takes `doc` to `after_both`.
    pub compose: TextOperation,
    /// `a.invert(doc)`, which takes `after_a` back to `doc`.
    pub invert_a: TextOperation,
    /// Cursor positions in `doc` mapped through `a`.
    pub cursors: Vec<CursorVector>,
}

/// A cursor position mapped through a case's operation `a`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CursorVector {
    /// Position in `doc` (chars).
    pub index: usize,
    /// Whether `a` is the cursor owner's own edit.
    pub own: bool,
    /// Expected position in `after_a`.
    pub after_a: usize,
}

impl Vector {
    /// Computes every expected value of a case with this implementation.
    pub fn compute(
        name: &str,
        doc: &str,
        a: TextOperation,
        b: TextOperation,
    ) -> Result<Vector, OtError> {
        let after_a = a.apply(doc)?;
        let after_b = b.apply(doc)?;
        let (a_prime, b_prime) = TextOperation::transform(&a, &b)?;
        let after_both = b_prime.apply(&after_a)?;
        let compose = a.compose(&b_prime)?;
        let invert_a = a.invert(doc)?;
        let len = doc.chars().count();
        let mut indexes = BTreeSet::from([0, len / 2, len]);
        let mut pos = 0usize;
        for c in a.components() {
            indexes.insert(pos);
            if !matches!(c, Component::Insert(_)) {
                pos = pos.saturating_add(c.len());
            }
        }
        let cursors = indexes
            .into_iter()
            .flat_map(|index| {
                [true, false].map(|own| CursorVector {
                    index,
                    own,
                    after_a: a.transform_index(index, own),
                })
            })
            .collect();
        Ok(Vector {
            name: name.to_owned(),
            doc: doc.to_owned(),
            a,
            b,
            after_a,
            after_b,
            a_prime,
            b_prime,
            after_both,
            compose,
            invert_a,
            cursors,
        })
    }

    /// Checks every expected value against this implementation, including
    /// the laws (convergence, compose, invert). Returns what differs.
    pub fn check(&self) -> Result<(), String> {
        let again = Vector::compute(&self.name, &self.doc, self.a.clone(), self.b.clone())
            .map_err(|e| format!("{}: {e}", self.name))?;
        if &again != self {
            return Err(format!("{}: expected values differ", self.name));
        }
        let other_way = self
            .a_prime
            .apply(&self.after_b)
            .map_err(|e| format!("{}: {e}", self.name))?;
        let composed = self
            .compose
            .apply(&self.doc)
            .map_err(|e| format!("{}: {e}", self.name))?;
        let undone = self
            .invert_a
            .apply(&self.after_a)
            .map_err(|e| format!("{}: {e}", self.name))?;
        if other_way != self.after_both || composed != self.after_both || undone != self.doc {
            return Err(format!("{}: a law does not hold", self.name));
        }
        Ok(())
    }
}

fn ins(pos: usize, len: usize, text: &str) -> TextOperation {
    TextOperation::new()
        .retain(pos)
        .insert(text)
        .retain(len.saturating_sub(pos))
}

fn del(pos: usize, n: usize, len: usize) -> TextOperation {
    TextOperation::new()
        .retain(pos)
        .delete(n)
        .retain(len.saturating_sub(pos + n))
}

fn replace(pos: usize, n: usize, text: &str, len: usize) -> TextOperation {
    TextOperation::new()
        .retain(pos)
        .insert(text)
        .delete(n)
        .retain(len.saturating_sub(pos + n))
}

/// The hand-written cases: `(name, doc, a, b)`.
fn hand_written() -> Vec<(&'static str, &'static str, TextOperation, TextOperation)> {
    const FAMILY: &str = "👩\u{200d}👩\u{200d}👧";
    vec![
        (
            "concurrent inserts at the same position: a goes first",
            "ab",
            ins(1, 2, "X"),
            ins(1, 2, "Y"),
        ),
        (
            "concurrent inserts into an empty document",
            "",
            ins(0, 0, "é"),
            ins(0, 0, "🎉"),
        ),
        (
            "inserts at both ends",
            "mid",
            ins(0, 3, "<"),
            ins(3, 3, ">"),
        ),
        (
            "overlapping deletes",
            "0123456789",
            del(2, 5, 10),
            del(4, 5, 10),
        ),
        (
            "identical deletes",
            "héllo wörld",
            del(1, 4, 11),
            del(1, 4, 11),
        ),
        (
            "delete contained in a delete",
            "abcdefgh",
            del(1, 6, 8),
            del(3, 2, 8),
        ),
        (
            "insert inside a concurrent delete",
            "abcdef",
            ins(3, 6, "X"),
            del(2, 3, 6),
        ),
        (
            "delete everything vs insert",
            "中文字",
            del(0, 3, 3),
            ins(1, 3, "国"),
        ),
        (
            "replace vs replace of the same range",
            "one two three",
            replace(4, 3, "2", 13),
            replace(4, 3, "deux", 13),
        ),
        (
            "no-op vs edit",
            "abc",
            TextOperation::new().retain(3),
            replace(0, 1, "A", 3),
        ),
        (
            "empty operations on the empty document",
            "",
            TextOperation::new(),
            TextOperation::new(),
        ),
        (
            "ZWJ family emoji is five chars: delete it whole",
            "👩\u{200d}👩\u{200d}👧🎉",
            del(0, 5, 6),
            ins(5, 6, "!"),
        ),
        (
            "chars, not graphemes: delete one ZWJ inside the family",
            FAMILY,
            del(1, 1, 5),
            ins(2, 5, "🎉"),
        ),
        (
            "combining mark: e + U+0301 is two chars",
            "e\u{301}a",
            ins(1, 3, "\u{302}"),
            del(1, 1, 3),
        ),
        (
            "combining mark inserted after a precomposed letter",
            "é",
            ins(1, 1, "\u{301}"),
            replace(0, 1, "e", 1),
        ),
        (
            "astral emoji counts one char (two in UTF-16)",
            "🎉a🎉",
            ins(2, 3, "b"),
            del(0, 1, 3),
        ),
        (
            "CJK replace vs insert",
            "中文字",
            replace(1, 1, "国", 3),
            ins(1, 3, "日本"),
        ),
        (
            "many components",
            "the quick brown fox",
            TextOperation::new()
                .retain(4)
                .delete(6)
                .insert("slow ")
                .retain(6)
                .insert("🦊")
                .delete(3),
            TextOperation::new()
                .insert("» ")
                .retain(10)
                .insert("red-")
                .retain(9)
                .insert("!"),
        ),
        (
            "newlines",
            "line 1\nline 2\n",
            ins(7, 14, "inserted\n"),
            del(6, 1, 14),
        ),
    ]
}

/// All cases: the hand-written ones, then seeded random ones over documents
/// with multi-byte text, emoji and combining marks.
pub fn cases() -> Result<Vec<Vector>, OtError> {
    let mut out = Vec::new();
    for (name, doc, a, b) in hand_written() {
        out.push(Vector::compute(name, doc, a, b)?);
    }
    let mut rng = SplitMix64::new(0x0074_7574_7469); // "tutti" in ASCII
    for i in 0..GENERATED {
        let doc = rng.doc(6);
        let len = doc.chars().count();
        let a = rng.op(len, 5);
        let b = rng.op(len, 5);
        out.push(Vector::compute(&format!("random {i}"), &doc, a, b)?);
    }
    Ok(out)
}

/// The vector file's contents.
pub fn vector_file() -> Result<VectorFile, OtError> {
    Ok(VectorFile {
        format: FORMAT,
        notes: vec![
            "Operational-transformation conformance vectors for Tutti (src/ot).".to_owned(),
            "Operations use the ot.js JSON form: positive integer = retain, \
             string = insert, negative integer = delete."
                .to_owned(),
            "Lengths and positions count Unicode scalar values, not bytes or UTF-16 units."
                .to_owned(),
            "transform(a, b) = [a_prime, b_prime]; at concurrent inserts at one \
             position the text of a comes first."
                .to_owned(),
            "Cursor rule: an insert exactly at the cursor moves it only when own is true."
                .to_owned(),
            "Generated: TUTTI_WRITE_VECTORS=1 cargo test --lib ot::vectors".to_owned(),
        ],
        cases: cases()?,
    })
}

fn compact<T: Serialize>(value: &T) -> Result<String, OtError> {
    serde_json::to_string(value).map_err(|e| OtError::Json(e.to_string()))
}

/// The vector file as text: one field per line, so diffs stay readable.
pub fn to_json() -> Result<String, OtError> {
    let file = vector_file()?;
    let mut out = String::new();
    out.push_str(&format!(
        "{{\n  \"format\": {},\n  \"notes\": [\n",
        file.format
    ));
    let notes: Result<Vec<String>, OtError> = file
        .notes
        .iter()
        .map(|n| Ok(format!("    {}", compact(n)?)))
        .collect();
    out.push_str(&notes?.join(",\n"));
    out.push_str("\n  ],\n  \"cases\": [\n");
    let mut cases = Vec::new();
    for v in &file.cases {
        let fields = [
            ("name", compact(&v.name)?),
            ("doc", compact(&v.doc)?),
            ("a", compact(&v.a)?),
            ("b", compact(&v.b)?),
            ("after_a", compact(&v.after_a)?),
            ("after_b", compact(&v.after_b)?),
            ("a_prime", compact(&v.a_prime)?),
            ("b_prime", compact(&v.b_prime)?),
            ("after_both", compact(&v.after_both)?),
            ("compose", compact(&v.compose)?),
            ("invert_a", compact(&v.invert_a)?),
            ("cursors", compact(&v.cursors)?),
        ];
        let body: Vec<String> = fields
            .iter()
            .map(|(k, v)| format!("      \"{k}\": {v}"))
            .collect();
        cases.push(format!("    {{\n{}\n    }}", body.join(",\n")));
    }
    out.push_str(&cases.join(",\n"));
    out.push_str("\n  ]\n}\n");
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vectors/ot.json");

    #[test]
    fn vectors_file_is_current() {
        let fresh = to_json().expect("the vectors compute");
        if std::env::var("TUTTI_WRITE_VECTORS").as_deref() == Ok("1") {
            let dir = std::path::Path::new(PATH).parent().expect("has a parent");
            std::fs::create_dir_all(dir).expect("create tests/vectors");
            std::fs::write(PATH, &fresh).expect("write tests/vectors/ot.json");
            return;
        }
        let on_disk = std::fs::read_to_string(PATH).unwrap_or_default();
        assert!(
            on_disk == fresh,
            "tests/vectors/ot.json is stale or missing; regenerate it with \
             `TUTTI_WRITE_VECTORS=1 cargo test --lib ot::vectors` and review the diff"
        );
    }

    #[test]
    fn vectors_parse_and_check() {
        let text = to_json().expect("the vectors compute");
        let file: VectorFile = serde_json::from_str(&text).expect("the file parses");
        assert_eq!(file, vector_file().unwrap());
        assert_eq!(file.format, FORMAT);
        assert!(
            (40..=80).contains(&file.cases.len()),
            "{}",
            file.cases.len()
        );
        for case in &file.cases {
            case.check().unwrap();
        }
        // The tie-break case says what the docs say.
        let tie = &file.cases[0];
        assert_eq!(tie.after_both, "aXYb");
        // A tampered case is caught.
        let mut bad = file.cases[3].clone();
        bad.after_both.push('!');
        assert!(bad.check().is_err());
    }

    #[test]
    fn vectors_cover_the_interesting_text() {
        let all: String = cases()
            .unwrap()
            .iter()
            .map(|c| c.doc.clone() + &c.after_both)
            .collect();
        for needle in ["👩\u{200d}👩\u{200d}👧", "🎉", "e\u{301}", "中", "é"] {
            assert!(all.contains(needle), "{needle}");
        }
    }
}
