//! Typed ids, parsed once where a frame or an HTTP body is decoded: a [`UserId`],
//! [`RoomId`] or [`DocId`] in hand is known to be well formed, so nothing past the
//! boundary checks it again or confuses one kind with another.

use std::fmt;

/// An id that does not follow its rules.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} ids {rule}")]
pub struct IdError {
    /// Which kind of id ("user", "room", "document").
    pub kind: &'static str,
    /// The rule it breaks.
    pub rule: &'static str,
}

/// The longest id of any kind, in bytes.
pub const MAX_ID_LEN: usize = 128;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $check:ident, $rule:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            #[doc = concat!("Parses a ", $kind, " id (", $kind, " ids `", $rule, "`).")]
            pub fn parse(s: impl Into<String>) -> Result<Self, IdError> {
                let s = s.into();
                if $check(&s) {
                    Ok(Self(s))
                } else {
                    Err(IdError { kind: $kind, rule: $rule })
                }
            }

            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// The id as an owned string.
            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::parse(s)
            }
        }
    };
}

/// 1-128 bytes, no whitespace or control characters.
fn user_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_ID_LEN
        && !s.chars().any(|c| c.is_whitespace() || c.is_control())
}

/// 1-128 of `A-Z a-z 0-9 - _ .`.
fn name_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_ID_LEN
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

id_type!(
    /// A user: the `sub` of a token.
    UserId,
    "user",
    user_ok,
    "are 1-128 bytes without whitespace or control characters"
);
/// A room or document id: a server-generated name, or `"<creator>~<name>"` for
/// one its creator chose (see [`RoomId::chosen`]). The name never contains `~`, so
/// the creator is everything before the last `~`, and two users' chosen ids
/// never collide.
fn scoped_ok(s: &str) -> bool {
    match s.rsplit_once('~') {
        Some((creator, name)) => user_ok(creator) && name_ok(name),
        None => name_ok(s),
    }
}

id_type!(
    /// A chat room.
    RoomId,
    "room",
    scoped_ok,
    "are 1-128 of A-Z a-z 0-9 - _ . (after \"<creator>~\" when the creator chose it)"
);
id_type!(
    /// A collaborative document.
    DocId,
    "document",
    scoped_ok,
    "are 1-128 of A-Z a-z 0-9 - _ . (after \"<creator>~\" when the creator chose it)"
);

/// The rule a name chosen at creation breaks.
const CHOSEN_RULE: &str = "chosen at creation are 1-128 of A-Z a-z 0-9 - _ .";

macro_rules! chosen_id {
    ($name:ident, $kind:literal) => {
        impl $name {
            /// The id of one that `creator` creates under the name `name`:
            /// `"<creator>~<name>"`. Ids are namespaced per creator so that
            /// creating one never fails because someone else's exists (which would
            /// tell an outsider that it does).
            pub fn chosen(creator: &UserId, name: &str) -> Result<Self, IdError> {
                if !name_ok(name) {
                    return Err(IdError {
                        kind: $kind,
                        rule: CHOSEN_RULE,
                    });
                }
                Ok(Self(format!("{creator}~{name}")))
            }

            /// A server-generated id (random, never containing `~`).
            pub fn generated() -> Self {
                Self(crate::util::random_hex(8))
            }
        }
    };
}
chosen_id!(RoomId, "room");
chosen_id!(DocId, "document");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_follow_their_rules() {
        assert_eq!(
            UserId::parse("ann@example.com").unwrap().as_str(),
            "ann@example.com"
        );
        assert!(UserId::parse("").is_err());
        assert!(UserId::parse("a b").is_err());
        assert!(UserId::parse("a\u{7}").is_err());
        assert!(UserId::parse("é".repeat(64)).is_ok(), "128 bytes");
        assert!(UserId::parse("x".repeat(129)).is_err());
        assert!(RoomId::parse("room-1_a.b").is_ok());
        assert!(RoomId::parse("room/1").is_err());
        assert!(DocId::parse("x".repeat(128)).is_ok());
        let e = DocId::parse("").unwrap_err();
        assert_eq!(
            e.to_string(),
            "document ids are 1-128 of A-Z a-z 0-9 - _ . (after \"<creator>~\" when the creator chose it)"
        );
        assert_eq!("bob".parse::<UserId>().unwrap().to_string(), "bob");
    }

    #[test]
    fn chosen_ids_are_namespaced_per_creator() {
        let ann = UserId::parse("ann@x").unwrap();
        let id = RoomId::chosen(&ann, "general").unwrap();
        assert_eq!(id.as_str(), "ann@x~general");
        assert_eq!(RoomId::parse(id.as_str()).unwrap(), id);
        // A creator whose id has `~` still maps to one id: the name has none.
        let tilde = UserId::parse("a~b").unwrap();
        assert_eq!(DocId::chosen(&tilde, "c").unwrap().as_str(), "a~b~c");
        assert!(DocId::chosen(&ann, "b~c").is_err());
        assert!(RoomId::chosen(&ann, "").is_err());
        assert!(RoomId::chosen(&ann, "no spaces").is_err());
        assert!(RoomId::parse("~general").is_err(), "no creator");
        assert!(RoomId::parse("ann~").is_err(), "no name");
        assert!(RoomId::parse("a b~c").is_err());
        assert!(!RoomId::generated().as_str().contains('~'));
    }
}
