//! Cursors and selections, and how they move when the document changes.

use serde::{Deserialize, Serialize};

use super::TextOperation;

/// A selection in a document: the range between `anchor` (where it started)
/// and `head` (where the caret is). A plain cursor has `anchor == head`.
/// Offsets count `char`s, like [`TextOperation`]. Serialized as
/// `{"anchor": 1, "head": 4}`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Selection {
    /// Where the selection started (the fixed end).
    pub anchor: usize,
    /// Where the caret is (the moving end).
    pub head: usize,
}

impl Selection {
    /// A selection from `anchor` to `head`.
    pub fn new(anchor: usize, head: usize) -> Self {
        Self { anchor, head }
    }

    /// A collapsed selection (a caret) at `pos`.
    pub fn cursor(pos: usize) -> Self {
        Self {
            anchor: pos,
            head: pos,
        }
    }

    /// Whether the selection is a plain caret.
    pub fn is_collapsed(&self) -> bool {
        self.anchor == self.head
    }

    /// Maps the selection through `op` (which was applied to the document the
    /// selection refers to). Both ends move with the text around them; text
    /// deleted around an end pulls it to the start of the deletion.
    ///
    /// **Insert exactly at an end:** if `is_own_op` is true (the edit was
    /// made by the user this selection belongs to, e.g. they typed at their
    /// caret), the end moves right past the inserted text. Otherwise (a
    /// remote user's edit) the end stays where it is, before the inserted
    /// text — another user typing at your caret does not push it. This is
    /// ot.js's `transformIndex` with the `isOwnOp` switch.
    ///
    /// Never panics: ends beyond `op`'s base length are clamped to it, and
    /// the result never exceeds `op`'s target length.
    #[must_use]
    pub fn transform(&self, op: &TextOperation, is_own_op: bool) -> Selection {
        Selection {
            anchor: op.transform_index(self.anchor, is_own_op),
            head: op.transform_index(self.head, is_own_op),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_at_cursor_depends_on_ownership() {
        let op = TextOperation::new().retain(2).insert("🎉🎉").retain(3);
        let c = Selection::cursor(2);
        assert_eq!(c.transform(&op, true), Selection::cursor(4));
        assert_eq!(c.transform(&op, false), Selection::cursor(2));
        // Before and after the insert the rule does not matter.
        for own in [true, false] {
            assert_eq!(
                Selection::cursor(1).transform(&op, own),
                Selection::cursor(1)
            );
            assert_eq!(
                Selection::cursor(3).transform(&op, own),
                Selection::cursor(5)
            );
            assert_eq!(
                Selection::cursor(5).transform(&op, own),
                Selection::cursor(7)
            );
        }
        // A selection whose head sits at a remote insert keeps it outside.
        let s = Selection::new(0, 2);
        assert_eq!(s.transform(&op, false), Selection::new(0, 2));
        assert_eq!(s.transform(&op, true), Selection::new(0, 4));
    }

    #[test]
    fn deletes_pull_cursors() {
        // "0123456789", delete 3..6
        let op = TextOperation::new().retain(3).delete(3).retain(4);
        let expected = [0, 1, 2, 3, 3, 3, 3, 4, 5, 6, 7];
        for (i, e) in expected.iter().enumerate() {
            assert_eq!(op.transform_index(i, false), *e, "index {i}");
            assert_eq!(op.transform_index(i, true), *e, "index {i}");
        }
        // Replace: insert + delete at the same place.
        let op = TextOperation::new()
            .retain(1)
            .insert("ab")
            .delete(2)
            .retain(1);
        assert_eq!(op.transform_index(1, false), 1);
        assert_eq!(op.transform_index(1, true), 3);
        assert_eq!(op.transform_index(2, false), 3);
        assert_eq!(op.transform_index(3, false), 3);
        assert_eq!(op.transform_index(4, false), 4);
    }

    #[test]
    fn out_of_range_is_clamped() {
        let op = TextOperation::new().retain(2).delete(1);
        assert_eq!(
            Selection::new(100, usize::MAX).transform(&op, true),
            Selection::cursor(2)
        );
        let empty = TextOperation::new();
        assert_eq!(
            Selection::cursor(7).transform(&empty, false),
            Selection::cursor(0)
        );
        let ins = TextOperation::new().insert("xyz");
        assert_eq!(
            Selection::cursor(0).transform(&ins, false),
            Selection::cursor(0)
        );
        assert_eq!(
            Selection::cursor(0).transform(&ins, true),
            Selection::cursor(3)
        );
    }

    #[test]
    fn serde_shape() {
        let s = Selection::new(1, 4);
        assert_eq!(
            serde_json::to_string(&s).unwrap(),
            r#"{"anchor":1,"head":4}"#
        );
        assert!(!s.is_collapsed());
        assert!(Selection::cursor(3).is_collapsed());
    }
}
