//! Plain-text operational transformation (OT), the ot.js / Google Docs model.
//! Pure data and algorithms: no I/O, no async, no clock.
//!
//! # The model
//!
//! One [`Authority`] per document, on the server, decides the order of all
//! edits and numbers the document's versions with a *revision* counter. A
//! client edits its local copy at once and sends each edit as a
//! [`TextOperation`] together with the revision it was made on. If other edits
//! were applied in the meantime, the authority *transforms* the incoming
//! operation against them, applies it, bumps the revision and broadcasts the
//! transformed operation; the sender only gets an acknowledgement. Each
//! [`Client`] has at most one operation in flight, buffers (composes) edits
//! made while waiting, and transforms incoming server operations against its
//! pending ones, so every copy converges to the authority's document.
//!
//! # Operations
//!
//! A [`TextOperation`] is a normalized list of [`Component`]s — retain `n`,
//! insert text, delete `n` — that walks the whole document, so it has a
//! base length and a target length. **Positions and lengths count Unicode
//! scalar values (Rust `char`s)**: not bytes, not UTF-16 code units (a
//! JavaScript client must convert, e.g. with `Array.from(str)`), not grapheme
//! clusters (an operation may split `"e\u{301}"` or a ZWJ emoji sequence; the
//! editor decides what it lets the user do).
//!
//! The algebra, with `d` a document (the laws the tests check):
//!
//! - apply: `a.apply(d)`, an error unless `d` has `a.base_len()` chars;
//! - compose: `a.compose(&b)?.apply(d) == b.apply(&a.apply(d)?)`;
//! - transform (TP1): for concurrent `a`, `b` on `d`, `(a', b') =
//!   TextOperation::transform(&a, &b)?` gives `b'.apply(&a.apply(d)?) ==
//!   a'.apply(&b.apply(d)?)`;
//! - invert: `a.invert(d)?.apply(&a.apply(d)?) == d`.
//!
//! **Tie-breaking:** when `a` and `b` insert at the same position, `a`'s text
//! comes first (the left argument, as in ot.js). The authority passes the
//! incoming operation as `a` and the already-applied history as `b`; the
//! client passes its pending operations as `a` and the server's operation as
//! `b` — the same on both sides, as in ot.js's `Server` and `Client`, so
//! ot.js clients interoperate.
//!
//! # Wire form
//!
//! Serde maps a [`TextOperation`] to the ot.js JSON array: a positive integer
//! retains, a string inserts, a negative integer deletes, e.g.
//! `[3, "héllo", -2, 1]`. Decoding validates (no `0`, no `""`, no floats,
//! booleans or nulls) and returns typed errors from
//! [`TextOperation::from_json`]. [`TextOperation::components`] and
//! [`TextOperation::from_components`] are there for other encodings.
//!
//! # Cursors
//!
//! [`Selection`]s move with the text; an insert exactly at a cursor pushes it
//! only when the edit is the cursor owner's own (see [`Selection::transform`]).
//!
//! # Errors
//!
//! Nothing here panics on bad input; every failure is an [`OtError`].
//!
//! # Tests
//!
//! Property tests check the laws above (and JSON round-trips and cursor
//! bounds) on random documents with multi-byte text, emoji, combining marks
//! and CJK, 10,000 cases per law by default; for a longer run:
//!
//! ```text
//! TUTTI_PROPTEST_CASES=1000000 cargo test --release --lib ot::
//! ```
//!
//! A simulation runs 3–8 clients against one authority with random message
//! delays, reorderings across connections, duplicate and lost sends, for 200
//! seeds (`TUTTI_SIM_SEEDS` for more), and checks that everyone converges. Conformance vectors for other
//! implementations live in `tests/vectors/ot.json`; see [`vectors`] for how
//! to regenerate them (`TUTTI_WRITE_VECTORS=1 cargo test --lib ot::vectors`).

mod authority;
mod client;
mod cursor;
mod error;
mod json;
mod operation;
mod rng;
pub mod vectors;

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod simulation;

pub use authority::{Applied, Authority, DEFAULT_MAX_HISTORY};
pub use client::{Client, ClientState, Outgoing};
pub use cursor::Selection;
pub use error::OtError;
pub use operation::{Component, TextOperation};
