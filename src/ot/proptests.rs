//! Property tests of the OT laws on random documents and operations.
//!
//! Documents and inserted text are made of [`PIECES`] (multi-byte Latin,
//! combining marks, CJK, ZWJ emoji, astral emoji). An operation is generated
//! as a short script of steps that is fitted to the document's length, so
//! the strategies do not depend on each other (cheap, and shrinking works).
//!
//! `TUTTI_PROPTEST_CASES` sets the number of cases per law (default 10,000).
//!
//! Not a law here, on purpose: transforming against a composition `b∘c` is
//! *not* always the same as transforming against `b` and then `c` (as in
//! ot.js: composing moves an insert next to a deletion in front of it, which
//! changes how a concurrent insert inside the deleted range is ordered). The
//! authority and the client therefore always transform against the other
//! side's operations one at a time, each pair with the same arguments on both
//! sides, which only needs TP1.

use proptest::prelude::*;
use proptest::sample::select;

use super::rng::PIECES;
use super::{Component, OtError, Selection, TextOperation};

fn cases() -> u32 {
    std::env::var("TUTTI_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000)
}

fn config() -> ProptestConfig {
    ProptestConfig::with_cases(cases())
}

#[derive(Debug, Clone)]
enum Step {
    Retain(usize),
    Delete(usize),
    Insert(&'static str),
}

fn doc() -> impl Strategy<Value = String> {
    prop::collection::vec(select(PIECES), 0..10).prop_map(|v| v.concat())
}

fn script() -> impl Strategy<Value = Vec<Step>> {
    prop::collection::vec(
        prop_oneof![
            (1usize..6).prop_map(Step::Retain),
            (1usize..6).prop_map(Step::Delete),
            select(PIECES).prop_map(Step::Insert),
        ],
        0..8,
    )
}

/// Fits a script to a document of `len` chars: retains and deletes are cut
/// at the end of the document, and the rest is retained.
fn build(script: &[Step], len: usize) -> TextOperation {
    let mut op = TextOperation::new();
    let mut remaining = len;
    for step in script {
        match step {
            Step::Retain(n) => {
                let n = (*n).min(remaining);
                op = op.retain(n);
                remaining -= n;
            }
            Step::Delete(n) => {
                let n = (*n).min(remaining);
                op = op.delete(n);
                remaining -= n;
            }
            Step::Insert(s) => op = op.insert(s),
        }
    }
    op.retain(remaining)
}

fn len(s: &str) -> usize {
    s.chars().count()
}

/// The canonical form: no empty components, no two adjacent of one kind, no
/// insert right after a delete, and lengths that add up.
fn assert_canonical(op: &TextOperation) -> Result<(), TestCaseError> {
    let (mut base, mut target) = (0usize, 0usize);
    let mut prev: Option<&Component> = None;
    for c in op.components() {
        prop_assert!(!c.is_empty(), "empty component in {:?}", op);
        if let Some(p) = prev {
            prop_assert!(
                std::mem::discriminant(p) != std::mem::discriminant(c),
                "unmerged components in {:?}",
                op
            );
            prop_assert!(
                !(matches!(p, Component::Delete(_)) && matches!(c, Component::Insert(_))),
                "insert after delete in {:?}",
                op
            );
        }
        match c {
            Component::Retain(n) => {
                base += n;
                target += n;
            }
            Component::Insert(s) => target += len(s),
            Component::Delete(n) => base += n,
        }
        prev = Some(c);
    }
    prop_assert_eq!((base, target), (op.base_len(), op.target_len()));
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn transform_converges(d in doc(), sa in script(), sb in script()) {
        let a = build(&sa, len(&d));
        let b = build(&sb, len(&d));
        let (a1, b1) = TextOperation::transform(&a, &b).unwrap();
        assert_canonical(&a1)?;
        assert_canonical(&b1)?;
        let via_a = b1.apply(&a.apply(&d).unwrap()).unwrap();
        let via_b = a1.apply(&b.apply(&d).unwrap()).unwrap();
        prop_assert_eq!(via_a, via_b);
    }

    #[test]
    fn compose_matches_sequential_apply(d in doc(), sa in script(), sb in script()) {
        let a = build(&sa, len(&d));
        let mid = a.apply(&d).unwrap();
        let b = build(&sb, len(&mid));
        let ab = a.compose(&b).unwrap();
        assert_canonical(&ab)?;
        prop_assert_eq!((ab.base_len(), ab.target_len()), (a.base_len(), b.target_len()));
        prop_assert_eq!(ab.apply(&d).unwrap(), b.apply(&mid).unwrap());
    }

    #[test]
    fn invert_undoes(d in doc(), sa in script()) {
        let a = build(&sa, len(&d));
        assert_canonical(&a)?;
        let after = a.apply(&d).unwrap();
        let inv = a.invert(&d).unwrap();
        assert_canonical(&inv)?;
        prop_assert_eq!(inv.apply(&after).unwrap(), d.clone());
        // Inverting twice gives the operation back.
        prop_assert_eq!(inv.invert(&after).unwrap(), a.clone());
        // An operation composed with its inverse changes nothing.
        prop_assert_eq!(a.compose(&inv).unwrap().apply(&d).unwrap(), d);
    }

    #[test]
    fn json_round_trips(d in doc(), sa in script()) {
        let a = build(&sa, len(&d));
        let json = a.to_json();
        prop_assert_eq!(TextOperation::from_json(&json).unwrap(), a.clone());
        let via_serde: TextOperation = serde_json::from_str(&json).unwrap();
        prop_assert_eq!(via_serde, a);
    }

    #[test]
    fn cursor_stays_in_bounds(
        d in doc(),
        sa in script(),
        i in 0usize..40,
        j in 0usize..40,
        own in any::<bool>(),
    ) {
        let a = build(&sa, len(&d));
        let s = Selection::new(i, j).transform(&a, own);
        prop_assert!(s.anchor <= a.target_len() && s.head <= a.target_len());
        // Order is preserved (transform_index is monotonic).
        if i <= j {
            prop_assert!(s.anchor <= s.head);
        }
        if i >= j {
            prop_assert!(s.anchor >= s.head);
        }
        // Own edits push at least as far as remote ones.
        let remote = Selection::new(i, j).transform(&a, false);
        let mine = Selection::new(i, j).transform(&a, true);
        prop_assert!(remote.anchor <= mine.anchor && remote.head <= mine.head);
        // Typing at one's own caret moves it past the typed text; a remote
        // user typing there leaves it.
        let c = i.min(len(&d));
        let typing = TextOperation::new().retain(c).insert("🎉x").retain(len(&d) - c);
        prop_assert_eq!(typing.transform_index(c, true), c + 2);
        prop_assert_eq!(typing.transform_index(c, false), c);
    }

    #[test]
    fn decoding_arbitrary_text_never_panics(s in "\\PC{0,24}") {
        let _ = TextOperation::from_json(&s);
        let _ = serde_json::from_str::<TextOperation>(&s);
    }

    #[test]
    fn decoding_arbitrary_arrays_never_panics(
        items in prop::collection::vec(
            prop_oneof![
                any::<i64>().prop_map(|v| v.to_string()),
                any::<f64>().prop_map(|v| v.to_string()),
                "[a-z😀]{0,3}".prop_map(|s| format!("{s:?}")),
                Just("null".to_owned()),
                Just("0".to_owned()),
            ],
            0..6,
        )
    ) {
        let json = format!("[{}]", items.join(","));
        match TextOperation::from_json(&json) {
            Ok(op) => assert_canonical(&op)?,
            Err(e) => {
                let plausible = !matches!(e, OtError::BaseLengthMismatch { .. });
                prop_assert!(plausible);
            }
        }
    }

    #[test]
    fn mismatched_inputs_are_errors(d in doc(), sa in script(), extra in 1usize..4) {
        let a = build(&sa, len(&d) + extra);
        let is_base_mismatch = matches!(a.apply(&d), Err(OtError::BaseLengthMismatch { .. }));
        prop_assert!(is_base_mismatch);
        prop_assert!(a.invert(&d).is_err());
        let b = build(&sa, len(&d));
        prop_assert!(TextOperation::transform(&a, &b).is_err());
        prop_assert!(b.compose(&a).is_err() || b.target_len() == a.base_len());
    }
}
