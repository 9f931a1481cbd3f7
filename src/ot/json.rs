//! The ot.js JSON form of a [`TextOperation`]: an array where a positive
//! integer is a retain, a string is an insert and a negative integer is a
//! delete, e.g. `[3, "héllo", -2, 1]`.
//!
//! Decoding validates every element: `0`, `""`, floats (`1.0`), booleans,
//! `null`, nested arrays/objects and integers that do not fit are errors.
//! Components are normalized while decoding, as ot.js's `fromJSON` does
//! (`[1, 1]` decodes to the same operation as `[2]`).

use std::fmt;

use serde::de::{self, SeqAccess, Visitor};
use serde::ser::{self, SerializeSeq};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{Component, OtError, TextOperation};

impl TextOperation {
    /// The ot.js JSON form, e.g. `[3,"héllo",-2,1]`. (An operation built by
    /// hand with a delete longer than `i64::MAX`, which no real document
    /// allows, has no JSON form: this returns `[]` for it, and serde's
    /// `Serialize` returns an error.)
    pub fn to_json(&self) -> String {
        // Serializing to a string only fails for a delete longer than
        // `i64::MAX`, which no document can have; the fallback keeps this
        // function total.
        serde_json::to_string(self).unwrap_or_else(|_| "[]".to_owned())
    }

    /// Decodes the ot.js JSON form with typed errors: [`OtError::Json`] when
    /// the text is not a JSON array, [`OtError::EmptyComponent`] for `0` or
    /// `""`, [`OtError::InvalidComponent`] for any other non-component,
    /// [`OtError::LengthOverflow`] when the lengths do not fit.
    pub fn from_json(json: &str) -> Result<Self, OtError> {
        let raw: Vec<RawComponent> =
            serde_json::from_str(json).map_err(|e| OtError::Json(e.to_string()))?;
        from_raw(raw)
    }
}

fn from_raw(raw: Vec<RawComponent>) -> Result<TextOperation, OtError> {
    let mut op = TextOperation::new();
    for (index, r) in raw.into_iter().enumerate() {
        push_raw(&mut op, index, r)?;
    }
    Ok(op)
}

fn to_usize(index: usize, n: u64, sign: &str) -> Result<usize, OtError> {
    usize::try_from(n).map_err(|_| OtError::InvalidComponent {
        index,
        found: format!("{sign}{n} (out of range)"),
    })
}

fn push_raw(op: &mut TextOperation, index: usize, raw: RawComponent) -> Result<(), OtError> {
    let c = match raw {
        RawComponent::Zero => return Err(OtError::EmptyComponent { index }),
        RawComponent::Retain(n) => Component::Retain(to_usize(index, n, "")?),
        RawComponent::Delete(n) => Component::Delete(to_usize(index, n, "-")?),
        RawComponent::Insert(s) => Component::Insert(s),
        RawComponent::Invalid(found) => return Err(OtError::InvalidComponent { index, found }),
    };
    op.push_checked(index, c)
}

/// One array element as found, before validation.
enum RawComponent {
    Zero,
    Retain(u64),
    Delete(u64),
    Insert(String),
    Invalid(String),
}

impl<'de> Deserialize<'de> for RawComponent {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawComponent;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a non-zero integer or a string")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawComponent, E> {
                Ok(if v == 0 {
                    RawComponent::Zero
                } else {
                    RawComponent::Retain(v)
                })
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawComponent, E> {
                Ok(match v {
                    0 => RawComponent::Zero,
                    v if v > 0 => RawComponent::Retain(v.unsigned_abs()),
                    // A delete of 2^63 would have no JSON form (`to_json` writes
                    // deletes as an i64), so it would not survive being stored again.
                    i64::MIN => RawComponent::Invalid(format!("{v} (out of range)")),
                    v => RawComponent::Delete(v.unsigned_abs()),
                })
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<RawComponent, E> {
                // serde_json reads `-0` as a float; it is a zero all the same.
                Ok(if v == 0.0 {
                    RawComponent::Zero
                } else {
                    RawComponent::Invalid(format!("the number {v}"))
                })
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<RawComponent, E> {
                Ok(RawComponent::Invalid(format!("{v}")))
            }
            fn visit_unit<E: de::Error>(self) -> Result<RawComponent, E> {
                Ok(RawComponent::Invalid("null".to_owned()))
            }
            fn visit_none<E: de::Error>(self) -> Result<RawComponent, E> {
                Ok(RawComponent::Invalid("null".to_owned()))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawComponent, E> {
                Ok(RawComponent::Insert(v.to_owned()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<RawComponent, E> {
                Ok(RawComponent::Insert(v))
            }
        }
        d.deserialize_any(V)
    }
}

impl Serialize for TextOperation {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.components().len()))?;
        for c in self.components() {
            match c {
                Component::Retain(n) => seq.serialize_element(&(*n as u64))?,
                Component::Insert(text) => seq.serialize_element(text)?,
                Component::Delete(n) => {
                    let n = i64::try_from(*n).map_err(|_| {
                        <S::Error as ser::Error>::custom("delete longer than i64::MAX")
                    })?;
                    seq.serialize_element(&-n)?
                }
            }
        }
        seq.end()
    }
}

impl<'de> Deserialize<'de> for TextOperation {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = TextOperation;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an ot.js operation: an array of non-zero integers and strings")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<TextOperation, A::Error> {
                let mut op = TextOperation::new();
                let mut index = 0usize;
                while let Some(raw) = seq.next_element::<RawComponent>()? {
                    push_raw(&mut op, index, raw).map_err(de::Error::custom)?;
                    index = index.saturating_add(1);
                }
                Ok(op)
            }
        }
        d.deserialize_seq(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_example() {
        let op = TextOperation::from_json(r#"[3, "héllo", -2, 1]"#).unwrap();
        assert_eq!(
            op,
            TextOperation::new()
                .retain(3)
                .insert("héllo")
                .delete(2)
                .retain(1)
        );
        assert_eq!(op.to_json(), r#"[3,"héllo",-2,1]"#);
        assert_eq!(serde_json::to_string(&op).unwrap(), op.to_json());
        let back: TextOperation = serde_json::from_str(&op.to_json()).unwrap();
        assert_eq!(back, op);
        assert_eq!(
            TextOperation::from_json("[]").unwrap(),
            TextOperation::new()
        );
    }

    #[test]
    fn decoding_normalizes() {
        let op = TextOperation::from_json(r#"[1, 1, -1, "a", "b"]"#).unwrap();
        assert_eq!(op.to_json(), r#"[2,"ab",-1]"#);
    }

    #[test]
    fn bad_json_is_rejected() {
        let cases: &[(&str, OtError)] = &[
            ("[0]", OtError::EmptyComponent { index: 0 }),
            ("[-0]", OtError::EmptyComponent { index: 0 }),
            (r#"[1, ""]"#, OtError::EmptyComponent { index: 1 }),
            (
                "[1.5]",
                OtError::InvalidComponent {
                    index: 0,
                    found: "the number 1.5".into(),
                },
            ),
            (
                "[2, 1.0]",
                OtError::InvalidComponent {
                    index: 1,
                    found: "the number 1".into(),
                },
            ),
            (
                "[true]",
                OtError::InvalidComponent {
                    index: 0,
                    found: "true".into(),
                },
            ),
            (
                "[null]",
                OtError::InvalidComponent {
                    index: 0,
                    found: "null".into(),
                },
            ),
            (
                "[1e3]",
                OtError::InvalidComponent {
                    index: 0,
                    found: "the number 1000".into(),
                },
            ),
            (
                "[-99999999999999999999]",
                OtError::InvalidComponent {
                    index: 0,
                    found: "the number -100000000000000000000".into(),
                },
            ),
            (
                "[18446744073709551615, 18446744073709551615]",
                OtError::LengthOverflow,
            ),
            (
                "[-9223372036854775808]",
                OtError::InvalidComponent {
                    index: 0,
                    found: "-9223372036854775808 (out of range)".into(),
                },
            ),
        ];
        for (json, expected) in cases {
            assert_eq!(
                &TextOperation::from_json(json).unwrap_err(),
                expected,
                "{json}"
            );
            // The serde path refuses them too.
            assert!(
                serde_json::from_str::<TextOperation>(json).is_err(),
                "{json}"
            );
        }
        for json in [
            "",
            "3",
            "\"abc\"",
            "{}",
            "[[1]]",
            "[{\"a\":1}]",
            "[1,",
            "[1] x",
            "[\"\\ud800\"]",
        ] {
            assert!(
                matches!(TextOperation::from_json(json), Err(OtError::Json(_))),
                "{json}"
            );
            assert!(
                serde_json::from_str::<TextOperation>(json).is_err(),
                "{json}"
            );
        }
    }

    #[test]
    fn huge_delete_does_not_serialize() {
        let op = TextOperation::new().delete(usize::MAX);
        assert!(serde_json::to_string(&op).is_err());
        assert_eq!(op.to_json(), "[]");
    }
}
