//! Operational-transformation operations on the wire: conversions between
//! [`TextOperation`] and the protocol's `TextOp`. Used by the server's collaboration
//! service and by native clients alike; depends only on `ot` and the protocol.

use crate::ot::{Component, OtError, TextOperation};
use crate::protocol::v1;

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

/// An operation from its wire form; malformed ones are `Err`.
pub fn op_from_wire(op: Option<v1::TextOp>) -> Result<TextOperation, OtError> {
    use v1::op_component::Kind;
    let comps = op
        .unwrap_or_default()
        .components
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            // A length that does not fit this platform's usize is malformed, not
            // truncated.
            let len = |n: u64| {
                usize::try_from(n).map_err(|_| OtError::InvalidComponent {
                    index: i,
                    found: format!("a length of {n}"),
                })
            };
            match c.kind {
                Some(Kind::Retain(n)) => Ok(Component::Retain(len(n)?)),
                Some(Kind::Insert(s)) => Ok(Component::Insert(s)),
                Some(Kind::Delete(n)) => Ok(Component::Delete(len(n)?)),
                None => Err(OtError::InvalidComponent {
                    index: i,
                    found: "an empty component".into(),
                }),
            }
        });
    let comps: Vec<Component> = comps.collect::<Result<_, _>>()?;
    TextOperation::from_components(comps)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operations_survive_the_wire() {
        let op = TextOperation::new()
            .retain(3)
            .insert("héllo")
            .delete(2)
            .retain(1);
        assert_eq!(op_from_wire(Some(op_to_wire(&op))).unwrap(), op);
        assert_eq!(
            op_from_wire(None).unwrap(),
            TextOperation::new(),
            "no op is the empty op"
        );
        let empty = v1::TextOp {
            components: vec![v1::OpComponent { kind: None }],
        };
        assert!(matches!(
            op_from_wire(Some(empty)),
            Err(OtError::InvalidComponent { index: 0, .. })
        ));
    }
}
