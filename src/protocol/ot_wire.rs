//! Text operations between their wire form (`TextOp`) and [`crate::ot`]'s. The one
//! place the protocol meets the OT engine; both the server and the native client use
//! it.

use super::v1;
use crate::ot::{Component, OtError, TextOperation};

/// The wire form of an operation.
pub fn op_to_wire(op: &TextOperation) -> v1::TextOp {
    use v1::op_component::Kind;
    v1::TextOp {
        components: op
            .components()
            .iter()
            .map(|c| v1::OpComponent {
                kind: Some(match c {
                    Component::Retain(n) => Kind::Retain(*n as u64),
                    Component::Insert(s) => Kind::Insert(s.clone()),
                    Component::Delete(n) => Kind::Delete(*n as u64),
                }),
            })
            .collect(),
    }
}

/// An operation from its wire form: every component present, every count one this
/// machine can hold, and the whole a valid operation.
pub fn op_from_wire(op: Option<v1::TextOp>) -> Result<TextOperation, OtError> {
    use v1::op_component::Kind;
    let count = |index: usize, n: u64| {
        usize::try_from(n).map_err(|_| OtError::InvalidComponent {
            index,
            found: format!("a count of {n}"),
        })
    };
    let comps = op
        .unwrap_or_default()
        .components
        .into_iter()
        .enumerate()
        .map(|(i, c)| match c.kind {
            Some(Kind::Retain(n)) => Ok(Component::Retain(count(i, n)?)),
            Some(Kind::Insert(s)) => Ok(Component::Insert(s)),
            Some(Kind::Delete(n)) => Ok(Component::Delete(count(i, n)?)),
            None => Err(OtError::InvalidComponent {
                index: i,
                found: "an empty component".into(),
            }),
        });
    let comps: Vec<Component> = comps.collect::<Result<_, _>>()?;
    TextOperation::from_components(comps)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operations_survive_the_wire_and_empty_components_are_refused() {
        let op = TextOperation::new().retain(2).insert("é🎵").delete(3);
        assert_eq!(op_from_wire(Some(op_to_wire(&op))).unwrap(), op);
        let empty = v1::TextOp {
            components: vec![v1::OpComponent { kind: None }],
        };
        assert!(matches!(
            op_from_wire(Some(empty)),
            Err(OtError::InvalidComponent { index: 0, .. })
        ));
    }
}
