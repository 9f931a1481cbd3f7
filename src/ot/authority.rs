//! The server side: one [`Authority`] per document, the single place where
//! the order of operations is decided.

use std::collections::{HashMap, VecDeque};

use super::{OtError, TextOperation};

/// How many applied operations an [`Authority`] keeps by default to transform
/// late operations against.
pub const DEFAULT_MAX_HISTORY: usize = 1024;

/// The result of [`Authority::receive`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The revision the document has after this operation (the operation is
    /// the one that turned revision `revision - 1` into `revision`).
    pub revision: u64,
    /// The operation as applied: transformed against the operations applied
    /// since its base revision. This is what other clients receive.
    pub op: TextOperation,
    /// How many already-applied operations it was transformed against.
    pub concurrent: usize,
    /// `true` when this is a resend that had already been applied: nothing
    /// was applied now, and the fields above are those of the first time.
    /// The caller should acknowledge it to the sender again (if needed) but
    /// must not broadcast it a second time.
    pub duplicate: bool,
}

/// The server's copy of one document, with its revision counter and a window
/// of recent operations. Pure: no I/O, no clock.
///
/// Revision `r` is the document after `r` operations (an authority restored
/// with [`at_revision`](Self::at_revision) starts counting at that revision).
/// The history holds the last (at most `max_history`) applied operations, so
/// an operation based on any revision from
/// [`oldest_revision`](Self::oldest_revision) to
/// [`revision`](Self::revision) can be transformed and applied.
#[derive(Debug, Clone)]
pub struct Authority {
    doc: String,
    doc_len: usize,
    revision: u64,
    history: VecDeque<TextOperation>,
    max_history: usize,
    /// Per client id: the last applied sequence number and its result.
    last_applied: HashMap<String, (u64, Applied)>,
}

impl Authority {
    /// A document with content `doc` at revision 0, keeping
    /// [`DEFAULT_MAX_HISTORY`] operations.
    pub fn new(doc: impl Into<String>) -> Self {
        Self::at_revision(doc, 0)
    }

    /// A document with content `doc` at `revision` (e.g. restored from
    /// storage) and an empty history.
    pub fn at_revision(doc: impl Into<String>, revision: u64) -> Self {
        let doc = doc.into();
        Self {
            doc_len: doc.chars().count(),
            doc,
            revision,
            history: VecDeque::new(),
            max_history: DEFAULT_MAX_HISTORY,
            last_applied: HashMap::new(),
        }
    }

    /// Sets how many past operations are kept (older ones are dropped at once).
    /// With 0, only operations based on the current revision are accepted.
    #[must_use]
    pub fn with_max_history(mut self, max_history: usize) -> Self {
        self.max_history = max_history;
        self.trim();
        self
    }

    /// Restores the history (e.g. from storage): `history` is the operations
    /// that led to the current document, oldest first, the last one producing
    /// the document at [`revision`](Self::revision). It replaces the current
    /// history; only the last `max_history` are kept, so set
    /// [`with_max_history`](Self::with_max_history) first.
    ///
    /// Fails with [`OtError::InvalidHistory`] if the operations do not chain
    /// (each one's target length the next one's base length, the last one's
    /// the document's length) or are more than the revision.
    pub fn with_history<I>(mut self, history: I) -> Result<Self, OtError>
    where
        I: IntoIterator<Item = TextOperation>,
    {
        let history: VecDeque<TextOperation> = history.into_iter().collect();
        if history.len() as u64 > self.revision {
            return Err(OtError::InvalidHistory {
                reason: format!(
                    "{} operations cannot lead to revision {}",
                    history.len(),
                    self.revision
                ),
            });
        }
        for (i, pair) in history.iter().zip(history.iter().skip(1)).enumerate() {
            if pair.0.target_len() != pair.1.base_len() {
                return Err(OtError::InvalidHistory {
                    reason: format!(
                        "operation {i} produces {} characters, operation {} expects {}",
                        pair.0.target_len(),
                        i + 1,
                        pair.1.base_len()
                    ),
                });
            }
        }
        if let Some(last) = history.back()
            && last.target_len() != self.doc_len
        {
            return Err(OtError::InvalidHistory {
                reason: format!(
                    "the last operation produces {} characters, the document has {}",
                    last.target_len(),
                    self.doc_len
                ),
            });
        }
        self.history = history;
        self.trim();
        Ok(self)
    }

    fn trim(&mut self) {
        while self.history.len() > self.max_history {
            self.history.pop_front();
        }
    }

    /// The current document.
    pub fn doc(&self) -> &str {
        &self.doc
    }

    /// The current revision.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// The oldest base revision [`receive`](Self::receive) still accepts.
    pub fn oldest_revision(&self) -> u64 {
        self.revision.saturating_sub(self.history.len() as u64)
    }

    /// The maximum number of operations kept.
    pub fn max_history(&self) -> usize {
        self.max_history
    }

    /// The applied operations after `revision`, oldest first (to catch up a
    /// client that has seen `revision`). Same errors as `receive`:
    /// [`OtError::FutureRevision`] or [`OtError::TooOld`].
    pub fn ops_since(
        &self,
        revision: u64,
    ) -> Result<impl ExactSizeIterator<Item = &TextOperation>, OtError> {
        let skip = self
            .history
            .len()
            .saturating_sub(self.concurrent_count(revision)?);
        Ok(self.history.iter().skip(skip))
    }

    /// How many history entries lie after `base_revision`, checking it.
    fn concurrent_count(&self, base_revision: u64) -> Result<usize, OtError> {
        if base_revision > self.revision {
            return Err(OtError::FutureRevision {
                base_revision,
                current_revision: self.revision,
            });
        }
        let oldest = self.oldest_revision();
        if base_revision < oldest {
            return Err(OtError::TooOld {
                base_revision,
                oldest_revision: oldest,
                current_revision: self.revision,
            });
        }
        // At most history.len(), so it fits in usize.
        usize::try_from(self.revision - base_revision).map_err(|_| OtError::TooOld {
            base_revision,
            oldest_revision: oldest,
            current_revision: self.revision,
        })
    }

    /// Receives an operation a client made on the document at
    /// `base_revision`, transforms it against every operation applied since
    /// then (the incoming operation is the left argument of
    /// [`TextOperation::transform`], as in ot.js, so at a tie its insert lands
    /// before theirs), applies it and advances the revision.
    ///
    /// `origin` is the sender's `(client_id, seq)`, if known. The authority
    /// remembers the last applied `seq` per client id: if the same pair
    /// arrives again (a resend after a reconnect), nothing is applied and the
    /// first [`Applied`] is returned again with `duplicate: true`; a `seq`
    /// lower than the last one is refused with [`OtError::StaleSequence`].
    /// Memory grows with the number of client ids; call
    /// [`forget_client`](Self::forget_client) for clients that are gone.
    ///
    /// Errors (the document is unchanged):
    /// [`OtError::FutureRevision`] if `base_revision` is ahead of the server;
    /// [`OtError::TooOld`] if it is older than the retained history (the
    /// client must resync at the current revision);
    /// [`OtError::TransformBaseMismatch`] or [`OtError::BaseLengthMismatch`]
    /// if the operation does not fit the document at `base_revision`;
    /// [`OtError::RevisionOverflow`] at `u64::MAX`.
    pub fn receive(
        &mut self,
        base_revision: u64,
        op: TextOperation,
        origin: Option<(&str, u64)>,
    ) -> Result<Applied, OtError> {
        if let Some((client_id, seq)) = origin
            && let Some((last_seq, applied)) = self.last_applied.get(client_id)
        {
            if seq == *last_seq {
                return Ok(Applied {
                    duplicate: true,
                    ..applied.clone()
                });
            }
            if seq < *last_seq {
                return Err(OtError::StaleSequence {
                    client_id: client_id.to_owned(),
                    seq,
                    last_seq: *last_seq,
                });
            }
        }
        let concurrent = self.concurrent_count(base_revision)?;
        let new_revision = self
            .revision
            .checked_add(1)
            .ok_or(OtError::RevisionOverflow)?;
        let skip = self.history.len().saturating_sub(concurrent);
        let mut op = op;
        for past in self.history.iter().skip(skip) {
            op = TextOperation::transform(&op, past)?.0;
        }
        let doc = op.apply(&self.doc)?;

        self.doc = doc;
        self.doc_len = op.target_len();
        self.revision = new_revision;
        self.history.push_back(op.clone());
        self.trim();
        let applied = Applied {
            revision: new_revision,
            op,
            concurrent,
            duplicate: false,
        };
        if let Some((client_id, seq)) = origin {
            self.last_applied
                .insert(client_id.to_owned(), (seq, applied.clone()));
        }
        Ok(applied)
    }

    /// Forgets the sequence number remembered for `client_id` (when that
    /// client is gone for good). A later resend from it would be applied again.
    pub fn forget_client(&mut self, client_id: &str) {
        self.last_applied.remove(client_id);
    }

    /// The length of the current document in `char`s.
    pub fn doc_len(&self) -> usize {
        self.doc_len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ins(pos: usize, len: usize, text: &str) -> TextOperation {
        TextOperation::new()
            .retain(pos)
            .insert(text)
            .retain(len - pos)
    }

    #[test]
    fn sequential_and_concurrent() {
        let mut a = Authority::new("ab");
        let r1 = a.receive(0, ins(2, 2, "c"), Some(("alice", 1))).unwrap();
        assert_eq!((r1.revision, r1.concurrent, r1.duplicate), (1, 0, false));
        // Bob edited revision 0 too, inserting at the same place: his insert
        // (the incoming one) lands first.
        let r2 = a.receive(0, ins(2, 2, "🎉"), Some(("bob", 1))).unwrap();
        assert_eq!((r2.revision, r2.concurrent), (2, 1));
        assert_eq!(r2.op, ins(2, 3, "🎉"));
        assert_eq!(a.doc(), "ab🎉c");
        assert_eq!(a.doc_len(), 4);
        assert_eq!(a.revision(), 2);
        let since: Vec<_> = a.ops_since(0).unwrap().cloned().collect();
        assert_eq!(since, vec![ins(2, 2, "c"), ins(2, 3, "🎉")]);
        assert_eq!(a.ops_since(2).unwrap().len(), 0);
    }

    #[test]
    fn resend_is_applied_once() {
        let mut a = Authority::new("");
        let first = a.receive(0, ins(0, 0, "x"), Some(("c1", 7))).unwrap();
        a.receive(1, ins(1, 1, "y"), Some(("c2", 1))).unwrap();
        // The resend is rebased by the client, but it is the same (c1, 7).
        let again = a.receive(1, ins(0, 1, "x"), Some(("c1", 7))).unwrap();
        assert!(again.duplicate);
        assert_eq!(
            Applied {
                duplicate: false,
                ..again
            },
            first
        );
        assert_eq!(a.doc(), "xy");
        assert_eq!(a.revision(), 2);
        assert_eq!(
            a.receive(2, ins(0, 2, "z"), Some(("c1", 6))),
            Err(OtError::StaleSequence {
                client_id: "c1".into(),
                seq: 6,
                last_seq: 7
            })
        );
        // Without origin there is no dedup.
        a.receive(2, ins(0, 2, "z"), None).unwrap();
        a.receive(3, ins(0, 3, "z"), None).unwrap();
        assert_eq!(a.doc(), "zzxy");
        // After forget_client the pair is new again.
        a.forget_client("c1");
        a.receive(4, ins(0, 4, "w"), Some(("c1", 7))).unwrap();
        assert_eq!(a.doc(), "wzzxy");
    }

    #[test]
    fn revision_errors() {
        let mut a = Authority::at_revision("abc", 10).with_max_history(2);
        assert_eq!(a.oldest_revision(), 10);
        assert_eq!(
            a.receive(11, ins(0, 3, "x"), None),
            Err(OtError::FutureRevision {
                base_revision: 11,
                current_revision: 10
            })
        );
        assert_eq!(
            a.receive(9, ins(0, 3, "x"), None),
            Err(OtError::TooOld {
                base_revision: 9,
                oldest_revision: 10,
                current_revision: 10
            })
        );
        for i in 0..3 {
            a.receive(10 + i, ins(0, 3 + i as usize, "x"), None)
                .unwrap();
        }
        assert_eq!(a.revision(), 13);
        assert_eq!(a.oldest_revision(), 11);
        assert!(matches!(
            a.receive(10, ins(0, 3, "y"), None),
            Err(OtError::TooOld {
                current_revision: 13,
                ..
            })
        ));
        assert!(matches!(a.ops_since(10), Err(OtError::TooOld { .. })));
        assert!(matches!(
            a.ops_since(14),
            Err(OtError::FutureRevision { .. })
        ));
        // Based on 11, transformed against the 2 retained ops.
        let r = a.receive(11, ins(4, 4, "y"), None).unwrap();
        assert_eq!(r.concurrent, 2);
        assert_eq!(a.doc(), "xxxabcy");
        assert_eq!(a.max_history(), 2);
    }

    #[test]
    fn length_errors_leave_document_unchanged() {
        let mut a = Authority::new("héllo");
        // Current revision, wrong length: apply refuses.
        assert_eq!(
            a.receive(0, TextOperation::new().retain(6), None),
            Err(OtError::BaseLengthMismatch {
                expected: 6,
                actual: 5
            })
        );
        a.receive(0, ins(5, 5, "!"), None).unwrap();
        // Old revision, wrong length: transform refuses.
        assert_eq!(
            a.receive(0, TextOperation::new().retain(6), None),
            Err(OtError::TransformBaseMismatch {
                a_base_len: 6,
                b_base_len: 5
            })
        );
        assert_eq!(a.doc(), "héllo!");
        assert_eq!(a.revision(), 1);
    }

    #[test]
    fn restored_history() {
        let h = vec![ins(0, 0, "ab"), ins(2, 2, "c")];
        let mut a = Authority::at_revision("abc", 7)
            .with_max_history(10)
            .with_history(h.clone())
            .unwrap();
        assert_eq!(a.oldest_revision(), 5);
        // An operation made on revision 5 ("") is transformed against both.
        let r = a.receive(5, ins(0, 0, "é"), None).unwrap();
        assert_eq!((r.revision, r.concurrent), (8, 2));
        assert_eq!(a.doc(), "éabc");
        // Only the last max_history are kept.
        let a = Authority::at_revision("abc", 7)
            .with_max_history(1)
            .with_history(h.clone())
            .unwrap();
        assert_eq!(a.oldest_revision(), 6);
        for bad in [
            Authority::at_revision("abc", 1).with_history(h.clone()),
            Authority::at_revision("abcd", 7).with_history(h.clone()),
            Authority::at_revision("abc", 7).with_history(vec![ins(0, 1, "ab"), ins(2, 2, "c")]),
        ] {
            assert!(matches!(bad, Err(OtError::InvalidHistory { .. })));
        }
        assert!(
            Authority::at_revision("abc", 0)
                .with_history(Vec::new())
                .is_ok()
        );
    }

    #[test]
    fn zero_history_and_overflow() {
        let mut a = Authority::new("a").with_max_history(0);
        a.receive(0, ins(0, 1, "b"), None).unwrap();
        assert!(matches!(
            a.receive(0, ins(0, 1, "c"), None),
            Err(OtError::TooOld { .. })
        ));
        let mut a = Authority::at_revision("", u64::MAX);
        assert_eq!(
            a.receive(u64::MAX, ins(0, 0, "x"), None),
            Err(OtError::RevisionOverflow)
        );
    }
}
