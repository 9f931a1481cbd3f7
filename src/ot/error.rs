//! The one error type of the OT module.

/// Everything that can go wrong in [`crate::ot`]. No function of the module
/// panics on bad input; it returns one of these instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OtError {
    /// [`apply`](super::TextOperation::apply) or
    /// [`invert`](super::TextOperation::invert) was given a document whose
    /// length (in `char`s) is not the operation's base length.
    #[error("the operation expects a document of {expected} characters, but it has {actual}")]
    BaseLengthMismatch {
        /// The operation's base length.
        expected: usize,
        /// The document's length in `char`s.
        actual: usize,
    },

    /// [`compose`](super::TextOperation::compose) was given a second operation
    /// whose base length is not the first operation's target length (or a
    /// client was handed a local edit that does not fit its pending edits).
    #[error(
        "cannot compose: the first operation produces {first_target_len} characters, \
         the second expects {second_base_len}"
    )]
    ComposeLengthMismatch {
        /// Target length of the first operation.
        first_target_len: usize,
        /// Base length of the second operation.
        second_base_len: usize,
    },

    /// [`transform`](super::TextOperation::transform) was given two operations
    /// that were not made on documents of the same length, so they cannot be
    /// concurrent edits of one document.
    #[error(
        "cannot transform: the operations have different base lengths ({a_base_len} and {b_base_len})"
    )]
    TransformBaseMismatch {
        /// Base length of the left operation (`a`).
        a_base_len: usize,
        /// Base length of the right operation (`b`).
        b_base_len: usize,
    },

    /// A component has length zero: a `0` in JSON (retain or delete of nothing)
    /// or an empty insert string `""`.
    #[error("component {index} is empty (zero-length retain/delete or empty insert)")]
    EmptyComponent {
        /// Position of the component in the array.
        index: usize,
    },

    /// A JSON component is neither a non-zero integer nor a string (a float,
    /// `true`, `null`, an integer out of range, …).
    #[error("component {index} is not a non-zero integer or a string: {found}")]
    InvalidComponent {
        /// Position of the component in the array.
        index: usize,
        /// What was found instead.
        found: String,
    },

    /// The lengths of a deserialized operation do not fit in `usize`.
    #[error("the operation's lengths overflow")]
    LengthOverflow,

    /// The input is not JSON, or not a JSON array of components.
    #[error("malformed operation JSON: {0}")]
    Json(String),

    /// [`Authority::receive`](super::Authority::receive): the client claims a
    /// base revision the server has not reached.
    #[error("base revision {base_revision} is ahead of the current revision {current_revision}")]
    FutureRevision {
        /// The revision the client sent.
        base_revision: u64,
        /// The authority's revision.
        current_revision: u64,
    },

    /// [`Authority::receive`](super::Authority::receive): the base revision is
    /// older than the retained history, so the operation cannot be transformed.
    /// The client must resynchronize: fetch the document at `current_revision`
    /// and start over.
    #[error(
        "base revision {base_revision} is older than the retained history \
         (oldest {oldest_revision}); resync at revision {current_revision}"
    )]
    TooOld {
        /// The revision the client sent.
        base_revision: u64,
        /// The oldest base revision the authority can still transform from.
        oldest_revision: u64,
        /// The authority's revision, to resync at.
        current_revision: u64,
    },

    /// [`Authority::receive`](super::Authority::receive): the client's
    /// sequence number is older than the last one applied for that client, so
    /// it is a replay of an operation that is no longer remembered.
    #[error("client {client_id} sent seq {seq}, older than its last applied seq {last_seq}")]
    StaleSequence {
        /// The client.
        client_id: String,
        /// The sequence number it sent.
        seq: u64,
        /// The last sequence number applied for it.
        last_seq: u64,
    },

    /// [`Authority::with_history`](super::Authority::with_history): the
    /// restored operations do not lead to the document and revision.
    #[error("the restored history does not fit the document: {reason}")]
    InvalidHistory {
        /// What does not fit.
        reason: String,
    },

    /// [`Client::server_ack`](super::Client::server_ack) was called while no
    /// operation was awaiting confirmation.
    #[error("the server acknowledged an operation, but none is outstanding")]
    UnexpectedAck,

    /// A revision counter would pass `u64::MAX`.
    #[error("the revision counter overflowed")]
    RevisionOverflow,
}
