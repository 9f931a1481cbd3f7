//! [`TextOperation`]: a sequence of retain / insert / delete components, and
//! its algebra (apply, compose, transform, invert).

use super::OtError;

/// One component of a [`TextOperation`]. Lengths count `char`s (Unicode
/// scalar values).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Component {
    /// Keep the next `n` characters.
    Retain(usize),
    /// Insert this text at the current position.
    Insert(String),
    /// Remove the next `n` characters.
    Delete(usize),
}

impl Component {
    /// Length in `char`s: `n` for retain and delete, the text's `char` count
    /// for insert.
    pub fn len(&self) -> usize {
        match self {
            Component::Retain(n) | Component::Delete(n) => *n,
            Component::Insert(s) => s.chars().count(),
        }
    }

    /// Whether the component has length zero (never true for a component
    /// inside a [`TextOperation`]).
    pub fn is_empty(&self) -> bool {
        match self {
            Component::Retain(n) | Component::Delete(n) => *n == 0,
            Component::Insert(s) => s.is_empty(),
        }
    }
}

/// An edit of a plain-text document, in the canonical ot.js form.
///
/// The components walk the document from start to end: [`Component::Retain`]
/// skips characters, [`Component::Insert`] adds text, [`Component::Delete`]
/// removes characters. The operation always covers the whole document, so it
/// has a base length (the document length it applies to) and a target length
/// (the length of the result). All positions and lengths count Unicode scalar
/// values (Rust `char`s) — not bytes, not UTF-16 code units, not graphemes.
///
/// The builders keep the operation normalized: no zero-length components,
/// adjacent components of the same kind merged, and at one position an insert
/// always comes before a delete. Two operations with the same effect on every
/// document of their base length are therefore equal (`==`), except for a
/// trailing retain, which is kept as ot.js keeps it.
///
/// ```
/// use tutti::ot::TextOperation;
/// let op = TextOperation::new().retain(1).insert("é").delete(1).retain(1);
/// assert_eq!(op.apply("abc").unwrap(), "aéc");
/// assert_eq!((op.base_len(), op.target_len()), (3, 3));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct TextOperation {
    ops: Vec<Component>,
    base_len: usize,
    target_len: usize,
}

/// A borrowed piece of a component, used while walking two operations at once.
#[derive(Clone, Copy)]
enum Piece<'a> {
    Retain(usize),
    Insert(&'a str, usize),
    Delete(usize),
}

fn piece(c: Option<&Component>) -> Option<Piece<'_>> {
    c.map(|c| match c {
        Component::Retain(n) => Piece::Retain(*n),
        Component::Insert(s) => Piece::Insert(s.as_str(), s.chars().count()),
        Component::Delete(n) => Piece::Delete(*n),
    })
}

/// What is left of a retain or delete of `n` after `used` of it: the rest, or the
/// next piece when it is used up.
fn shorten<'a>(
    kind: fn(usize) -> Piece<'a>,
    n: usize,
    used: usize,
    rest: &mut impl Iterator<Item = &'a Component>,
) -> Option<Piece<'a>> {
    if n > used {
        Some(kind(n - used))
    } else {
        piece(rest.next())
    }
}

/// Splits `s` after `n` chars; if `s` is shorter, the second part is empty.
pub(crate) fn split_chars(s: &str, n: usize) -> (&str, &str) {
    match s.char_indices().nth(n) {
        Some((i, _)) => s.split_at(i),
        None => (s, ""),
    }
}

fn char_len(s: &str) -> usize {
    s.chars().count()
}

impl TextOperation {
    /// The empty operation (base and target length 0).
    pub fn new() -> Self {
        Self::default()
    }

    /// Builds an operation from components, normalizing them (adjacent
    /// components of a kind merged, inserts moved before deletes). Fails on a
    /// zero-length component ([`OtError::EmptyComponent`]) or when the lengths
    /// overflow ([`OtError::LengthOverflow`]). Meant for decoding other wire
    /// forms (e.g. protobuf).
    pub fn from_components<I>(components: I) -> Result<Self, OtError>
    where
        I: IntoIterator<Item = Component>,
    {
        let mut op = Self::new();
        for (index, c) in components.into_iter().enumerate() {
            op.push_checked(index, c)?;
        }
        Ok(op)
    }

    /// Adds one validated component (used by the decoders).
    pub(crate) fn push_checked(&mut self, index: usize, c: Component) -> Result<(), OtError> {
        if c.is_empty() {
            return Err(OtError::EmptyComponent { index });
        }
        let n = c.len();
        let (base, target) = match &c {
            Component::Retain(_) => (n, n),
            Component::Insert(_) => (0, n),
            Component::Delete(_) => (n, 0),
        };
        self.base_len
            .checked_add(base)
            .ok_or(OtError::LengthOverflow)?;
        self.target_len
            .checked_add(target)
            .ok_or(OtError::LengthOverflow)?;
        match c {
            Component::Retain(n) => self.add_retain(n),
            Component::Insert(s) => self.add_insert(&s),
            Component::Delete(n) => self.add_delete(n),
        }
        Ok(())
    }

    /// Appends "keep the next `n` characters" (nothing if `n` is 0). Lengths
    /// saturate at `usize::MAX` rather than overflow.
    #[must_use]
    pub fn retain(mut self, n: usize) -> Self {
        self.add_retain(n);
        self
    }

    /// Appends "insert `text` here" (nothing if `text` is empty).
    #[must_use]
    pub fn insert(mut self, text: &str) -> Self {
        self.add_insert(text);
        self
    }

    /// Appends "remove the next `n` characters" (nothing if `n` is 0).
    #[must_use]
    pub fn delete(mut self, n: usize) -> Self {
        self.add_delete(n);
        self
    }

    fn add_retain(&mut self, n: usize) {
        if n == 0 {
            return;
        }
        self.base_len = self.base_len.saturating_add(n);
        self.target_len = self.target_len.saturating_add(n);
        if let Some(Component::Retain(last)) = self.ops.last_mut() {
            *last = last.saturating_add(n);
        } else {
            self.ops.push(Component::Retain(n));
        }
    }

    fn add_insert(&mut self, text: &str) {
        if text.is_empty() {
            return;
        }
        self.target_len = self.target_len.saturating_add(char_len(text));
        let len = self.ops.len();
        match self.ops.last_mut() {
            Some(Component::Insert(last)) => last.push_str(text),
            Some(Component::Delete(_)) => {
                // Canonical form: the insert goes before the delete, merging
                // with an insert that already precedes it.
                let before = len.checked_sub(2).and_then(|i| self.ops.get_mut(i));
                if let Some(Component::Insert(prev)) = before {
                    prev.push_str(text);
                } else {
                    self.ops
                        .insert(len.saturating_sub(1), Component::Insert(text.to_owned()));
                }
            }
            _ => self.ops.push(Component::Insert(text.to_owned())),
        }
    }

    fn add_delete(&mut self, n: usize) {
        if n == 0 {
            return;
        }
        self.base_len = self.base_len.saturating_add(n);
        if let Some(Component::Delete(last)) = self.ops.last_mut() {
            *last = last.saturating_add(n);
        } else {
            self.ops.push(Component::Delete(n));
        }
    }

    /// The normalized components, for mapping to other wire forms.
    pub fn components(&self) -> &[Component] {
        &self.ops
    }

    /// Length (in `char`s) of the documents this operation applies to.
    pub fn base_len(&self) -> usize {
        self.base_len
    }

    /// Length (in `char`s) of the documents this operation produces.
    pub fn target_len(&self) -> usize {
        self.target_len
    }

    /// Whether the operation leaves every document unchanged (it is empty or
    /// only retains).
    pub fn is_noop(&self) -> bool {
        self.ops.iter().all(|c| matches!(c, Component::Retain(_)))
    }

    /// Applies the operation to `doc`. Fails with
    /// [`OtError::BaseLengthMismatch`] if `doc` does not have exactly
    /// [`base_len`](Self::base_len) `char`s.
    pub fn apply(&self, doc: &str) -> Result<String, OtError> {
        let actual = char_len(doc);
        if actual != self.base_len {
            return Err(OtError::BaseLengthMismatch {
                expected: self.base_len,
                actual,
            });
        }
        let mut out = String::with_capacity(doc.len());
        let mut rest = doc;
        for c in &self.ops {
            match c {
                Component::Retain(n) => {
                    let (keep, tail) = split_chars(rest, *n);
                    out.push_str(keep);
                    rest = tail;
                }
                Component::Insert(s) => out.push_str(s),
                Component::Delete(n) => rest = split_chars(rest, *n).1,
            }
        }
        Ok(out)
    }

    /// The operation that undoes this one: applying `self` to `doc` and then
    /// the result of `invert(doc)` gives `doc` back. `doc` is the document
    /// *before* `self` (needed to restore deleted text). Fails with
    /// [`OtError::BaseLengthMismatch`] if `doc` does not fit.
    pub fn invert(&self, doc: &str) -> Result<TextOperation, OtError> {
        let actual = char_len(doc);
        if actual != self.base_len {
            return Err(OtError::BaseLengthMismatch {
                expected: self.base_len,
                actual,
            });
        }
        let mut inverse = TextOperation::new();
        let mut rest = doc;
        for c in &self.ops {
            match c {
                Component::Retain(n) => {
                    inverse.add_retain(*n);
                    rest = split_chars(rest, *n).1;
                }
                Component::Insert(s) => inverse.add_delete(char_len(s)),
                Component::Delete(n) => {
                    let (deleted, tail) = split_chars(rest, *n);
                    inverse.add_insert(deleted);
                    rest = tail;
                }
            }
        }
        Ok(inverse)
    }

    /// Combines `self` followed by `next` into one operation with the same
    /// effect: `a.compose(b)?.apply(d) == b.apply(&a.apply(d)?)`. Fails with
    /// [`OtError::ComposeLengthMismatch`] unless `next.base_len() ==
    /// self.target_len()`.
    pub fn compose(&self, next: &TextOperation) -> Result<TextOperation, OtError> {
        let mismatch = || OtError::ComposeLengthMismatch {
            first_target_len: self.target_len,
            second_base_len: next.base_len,
        };
        if self.target_len != next.base_len {
            return Err(mismatch());
        }
        let mut out = TextOperation::new();
        let mut i1 = self.ops.iter();
        let mut i2 = next.ops.iter();
        let mut p1 = piece(i1.next());
        let mut p2 = piece(i2.next());
        loop {
            match (p1, p2) {
                (None, None) => break,
                // Deletes of the first operation happen regardless of the second.
                (Some(Piece::Delete(n)), _) => {
                    out.add_delete(n);
                    p1 = piece(i1.next());
                }
                // Inserts of the second operation happen regardless of the first.
                (_, Some(Piece::Insert(s, _))) => {
                    out.add_insert(s);
                    p2 = piece(i2.next());
                }
                (None, _) | (_, None) => return Err(mismatch()),
                (Some(Piece::Retain(a)), Some(Piece::Retain(b))) => {
                    let m = a.min(b);
                    out.add_retain(m);
                    p1 = shorten(Piece::Retain, a, m, &mut i1);
                    p2 = shorten(Piece::Retain, b, m, &mut i2);
                }
                (Some(Piece::Insert(s, len)), Some(Piece::Delete(n))) => {
                    // Text inserted by the first and deleted by the second
                    // never appears.
                    let m = len.min(n);
                    p1 = if len > m {
                        Some(Piece::Insert(split_chars(s, m).1, len - m))
                    } else {
                        piece(i1.next())
                    };
                    p2 = shorten(Piece::Delete, n, m, &mut i2);
                }
                (Some(Piece::Insert(s, len)), Some(Piece::Retain(n))) => {
                    let m = len.min(n);
                    let (head, tail) = split_chars(s, m);
                    out.add_insert(head);
                    p1 = if len > m {
                        Some(Piece::Insert(tail, len - m))
                    } else {
                        piece(i1.next())
                    };
                    p2 = shorten(Piece::Retain, n, m, &mut i2);
                }
                (Some(Piece::Retain(a)), Some(Piece::Delete(n))) => {
                    let m = a.min(n);
                    out.add_delete(m);
                    p1 = shorten(Piece::Retain, a, m, &mut i1);
                    p2 = shorten(Piece::Delete, n, m, &mut i2);
                }
            }
        }
        Ok(out)
    }

    /// Transforms two concurrent operations `a` and `b` (made on the same
    /// document) into `(a', b')` such that applying `a` then `b'` gives the
    /// same document as applying `b` then `a'` (TP1):
    ///
    /// `b'.apply(a.apply(d)) == a'.apply(b.apply(d))`
    ///
    /// **Tie-breaking:** when both insert at the same position, the text of
    /// the left argument `a` ends up first (ot.js convention). In this crate
    /// [`Authority`](super::Authority) passes the incoming client operation as
    /// `a` and the operations the server already applied as `b`, and
    /// [`Client`](super::Client) passes its own pending operations as `a` and
    /// the server's operation as `b`, exactly like ot.js's `Server` and
    /// `Client`; so the two sides always agree, and ot.js clients interoperate.
    ///
    /// Fails with [`OtError::TransformBaseMismatch`] unless both operations
    /// have the same base length.
    pub fn transform(
        a: &TextOperation,
        b: &TextOperation,
    ) -> Result<(TextOperation, TextOperation), OtError> {
        let mismatch = || OtError::TransformBaseMismatch {
            a_base_len: a.base_len,
            b_base_len: b.base_len,
        };
        if a.base_len != b.base_len {
            return Err(mismatch());
        }
        let mut a_prime = TextOperation::new();
        let mut b_prime = TextOperation::new();
        let mut i1 = a.ops.iter();
        let mut i2 = b.ops.iter();
        let mut p1 = piece(i1.next());
        let mut p2 = piece(i2.next());
        loop {
            match (p1, p2) {
                (None, None) => break,
                // Inserts of `a` go first: this is the tie-break.
                (Some(Piece::Insert(s, len)), _) => {
                    a_prime.add_insert(s);
                    b_prime.add_retain(len);
                    p1 = piece(i1.next());
                }
                (_, Some(Piece::Insert(s, len))) => {
                    a_prime.add_retain(len);
                    b_prime.add_insert(s);
                    p2 = piece(i2.next());
                }
                (None, _) | (_, None) => return Err(mismatch()),
                (Some(Piece::Retain(x)), Some(Piece::Retain(y))) => {
                    let m = x.min(y);
                    a_prime.add_retain(m);
                    b_prime.add_retain(m);
                    p1 = shorten(Piece::Retain, x, m, &mut i1);
                    p2 = shorten(Piece::Retain, y, m, &mut i2);
                }
                (Some(Piece::Delete(x)), Some(Piece::Delete(y))) => {
                    // Both delete the same text: neither needs to any more.
                    let m = x.min(y);
                    p1 = shorten(Piece::Delete, x, m, &mut i1);
                    p2 = shorten(Piece::Delete, y, m, &mut i2);
                }
                (Some(Piece::Delete(x)), Some(Piece::Retain(y))) => {
                    let m = x.min(y);
                    a_prime.add_delete(m);
                    p1 = shorten(Piece::Delete, x, m, &mut i1);
                    p2 = shorten(Piece::Retain, y, m, &mut i2);
                }
                (Some(Piece::Retain(x)), Some(Piece::Delete(y))) => {
                    let m = x.min(y);
                    b_prime.add_delete(m);
                    p1 = shorten(Piece::Retain, x, m, &mut i1);
                    p2 = shorten(Piece::Delete, y, m, &mut i2);
                }
            }
        }
        Ok((a_prime, b_prime))
    }

    /// Where the character position `index` (in the document before `self`)
    /// ends up after `self`. See [`Selection::transform`](super::Selection::transform)
    /// for the rule at an insert exactly at `index`. `index` beyond the base
    /// length is clamped to it; the result is at most the target length.
    pub fn transform_index(&self, index: usize, is_own_op: bool) -> usize {
        let index = index.min(self.base_len);
        let mut pos = 0usize; // position in the old document
        let mut new_index = index;
        for c in &self.ops {
            if pos > index {
                break;
            }
            match c {
                Component::Retain(n) => pos = pos.saturating_add(*n),
                Component::Insert(s) => {
                    if pos < index || is_own_op {
                        new_index = new_index.saturating_add(char_len(s));
                    }
                }
                Component::Delete(n) => {
                    let before_cursor = (*n).min(index.saturating_sub(pos));
                    new_index = new_index.saturating_sub(before_cursor);
                    pos = pos.saturating_add(*n);
                }
            }
        }
        new_index.min(self.target_len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op_json(op: &TextOperation) -> String {
        op.to_json()
    }

    #[test]
    fn builders_normalize() {
        let op = TextOperation::new()
            .retain(0)
            .retain(2)
            .retain(1)
            .insert("")
            .delete(0)
            .delete(2)
            .insert("ab")
            .delete(1)
            .insert("c");
        assert_eq!(op_json(&op), r#"[3,"abc",-3]"#);
        assert_eq!((op.base_len(), op.target_len()), (6, 6));
        // An insert after a delete with no insert before it moves in front.
        let op = TextOperation::new().retain(1).delete(1).insert("x");
        assert_eq!(
            op.components(),
            &[
                Component::Retain(1),
                Component::Insert("x".into()),
                Component::Delete(1)
            ]
        );
        // Deletes and inserts in either order compare equal.
        assert_eq!(
            TextOperation::new().delete(2).insert("é"),
            TextOperation::new().insert("é").delete(2)
        );
    }

    #[test]
    fn lengths_count_chars() {
        let family = "👩\u{200d}👩\u{200d}👧"; // 5 chars, 18 bytes
        let op = TextOperation::new().retain(2).insert(family).delete(2);
        assert_eq!(op.target_len(), 7);
        assert_eq!(
            op.apply("e\u{301}中文").unwrap(),
            format!("e\u{301}{family}")
        );
        // Deleting one char of a ZWJ sequence is allowed: positions are chars.
        let op = TextOperation::new().retain(1).delete(1).retain(3);
        assert_eq!(op.apply(family).unwrap(), "👩👩\u{200d}👧");
    }

    #[test]
    fn apply_length_mismatch() {
        let op = TextOperation::new().retain(3);
        assert_eq!(
            op.apply("héllo"),
            Err(OtError::BaseLengthMismatch {
                expected: 3,
                actual: 5
            })
        );
        // Bytes are not chars: "éé" is 4 bytes but 2 chars.
        assert_eq!(
            TextOperation::new().retain(4).apply("éé"),
            Err(OtError::BaseLengthMismatch {
                expected: 4,
                actual: 2
            })
        );
        assert!(TextOperation::new().retain(2).apply("éé").is_ok());
    }

    #[test]
    fn invert_length_mismatch() {
        let op = TextOperation::new().delete(2);
        assert_eq!(
            op.invert("a"),
            Err(OtError::BaseLengthMismatch {
                expected: 2,
                actual: 1
            })
        );
        let inv = op.invert("🎉x").unwrap();
        assert_eq!(inv, TextOperation::new().insert("🎉x"));
    }

    #[test]
    fn compose_length_mismatch() {
        let a = TextOperation::new().insert("ab"); // 0 -> 2
        let b = TextOperation::new().retain(3);
        assert_eq!(
            a.compose(&b),
            Err(OtError::ComposeLengthMismatch {
                first_target_len: 2,
                second_base_len: 3
            })
        );
    }

    #[test]
    fn compose_examples() {
        let a = TextOperation::new().retain(1).insert("xyz").retain(1);
        let b = TextOperation::new()
            .retain(2)
            .delete(2)
            .insert("🎉")
            .retain(1);
        let c = a.compose(&b).unwrap();
        assert_eq!(c.apply("ab").unwrap(), "ax🎉b");
        assert_eq!(c, TextOperation::new().retain(1).insert("x🎉").retain(1));
    }

    #[test]
    fn transform_base_mismatch() {
        let a = TextOperation::new().retain(2);
        let b = TextOperation::new().retain(3);
        assert_eq!(
            TextOperation::transform(&a, &b),
            Err(OtError::TransformBaseMismatch {
                a_base_len: 2,
                b_base_len: 3
            })
        );
    }

    #[test]
    fn transform_tie_break_left_goes_first() {
        let doc = "ab";
        let a = TextOperation::new().retain(1).insert("X").retain(1);
        let b = TextOperation::new().retain(1).insert("Y").retain(1);
        let (a1, b1) = TextOperation::transform(&a, &b).unwrap();
        let via_a = b1.apply(&a.apply(doc).unwrap()).unwrap();
        let via_b = a1.apply(&b.apply(doc).unwrap()).unwrap();
        assert_eq!(via_a, "aXYb");
        assert_eq!(via_b, "aXYb");
        // Swapping the arguments swaps the order.
        let (b2, a2) = TextOperation::transform(&b, &a).unwrap();
        assert_eq!(a2.apply(&b.apply(doc).unwrap()).unwrap(), "aYXb");
        assert_eq!(b2.apply(&a.apply(doc).unwrap()).unwrap(), "aYXb");
    }

    #[test]
    fn transform_overlapping_deletes() {
        let doc = "0123456789";
        let a = TextOperation::new().retain(2).delete(5).retain(3);
        let b = TextOperation::new().retain(4).delete(5).retain(1);
        let (a1, b1) = TextOperation::transform(&a, &b).unwrap();
        assert_eq!(b1.apply(&a.apply(doc).unwrap()).unwrap(), "019");
        assert_eq!(a1.apply(&b.apply(doc).unwrap()).unwrap(), "019");
    }

    #[test]
    fn noop() {
        assert!(TextOperation::new().is_noop());
        assert!(TextOperation::new().retain(5).is_noop());
        assert!(!TextOperation::new().retain(5).insert("a").is_noop());
        assert!(!TextOperation::new().delete(1).is_noop());
    }

    #[test]
    fn from_components_validates() {
        assert_eq!(
            TextOperation::from_components([Component::Retain(1), Component::Delete(0)]),
            Err(OtError::EmptyComponent { index: 1 })
        );
        assert_eq!(
            TextOperation::from_components([Component::Insert(String::new())]),
            Err(OtError::EmptyComponent { index: 0 })
        );
        assert_eq!(
            TextOperation::from_components([Component::Retain(usize::MAX), Component::Retain(1)]),
            Err(OtError::LengthOverflow)
        );
        assert_eq!(
            TextOperation::from_components([
                Component::Retain(1),
                Component::Retain(1),
                Component::Delete(1),
                Component::Insert("a".into()),
            ])
            .unwrap(),
            TextOperation::new().retain(2).insert("a").delete(1)
        );
    }

    #[test]
    fn huge_lengths_do_not_panic() {
        let op = TextOperation::new()
            .retain(usize::MAX)
            .retain(5)
            .delete(usize::MAX);
        assert_eq!(op.base_len(), usize::MAX);
        assert!(op.apply("abc").is_err());
        assert!(op.invert("abc").is_err());
        assert!(op.compose(&op).is_err());
        assert!(TextOperation::transform(&op, &TextOperation::new()).is_err());
        let _ = op.transform_index(usize::MAX, true);
    }

    #[test]
    fn split_chars_edges() {
        assert_eq!(split_chars("", 3), ("", ""));
        assert_eq!(split_chars("é🎉", 1), ("é", "🎉"));
        assert_eq!(split_chars("é🎉", 2), ("é🎉", ""));
        assert_eq!(split_chars("é🎉", 0), ("", "é🎉"));
    }
}
