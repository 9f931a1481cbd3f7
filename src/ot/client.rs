//! The client side: the classic three-state machine of ot.js's `Client`.
//!
//! A client has at most one operation in flight (the *outstanding* one). Local
//! edits made while it waits are composed into one *buffer*, sent when the
//! server acknowledges the outstanding one. Operations from the server are
//! transformed against the outstanding and buffered operations before they are
//! applied to the local document.

use super::{OtError, Selection, TextOperation};

/// Where the client is in the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientState {
    /// Nothing sent and unacknowledged: the local document equals the server
    /// document at [`Client::revision`].
    Synchronized,
    /// One operation sent, waiting for the server's acknowledgement.
    AwaitingConfirm(TextOperation),
    /// One operation sent (first) and more local edits composed into a buffer
    /// (second), to be sent after the acknowledgement.
    AwaitingWithBuffer(TextOperation, TextOperation),
}

/// An operation for the client to send to the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    /// The server revision the operation applies to.
    pub base_revision: u64,
    /// The client's sequence number for this operation. With the client's id
    /// it identifies the operation, so that a resend is recognised (see
    /// [`Authority::receive`](super::Authority::receive)).
    pub seq: u64,
    /// The operation.
    pub op: TextOperation,
}

/// A pure client state machine (no I/O, no document): it tells the caller
/// what to send and what to apply locally.
///
/// The caller keeps the local document: it applies its own edits to it, then
/// calls [`apply_client`](Self::apply_client); it applies the operation that
/// [`apply_server`](Self::apply_server) returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Client {
    revision: u64,
    state: ClientState,
    /// Sequence number of the outstanding operation (meaningless when synchronized).
    outstanding_seq: u64,
    /// Sequence number the next sent operation gets.
    next_seq: u64,
}

impl Client {
    /// A synchronized client whose document is the server's at `revision`.
    /// Sequence numbers start at 1.
    pub fn new(revision: u64) -> Self {
        Self::with_next_seq(revision, 1)
    }

    /// Like [`new`](Self::new), but the first operation sent gets `next_seq`.
    /// A client that reconnects under the same client id must continue its
    /// sequence numbers (the authority keeps the last one per client id).
    pub fn with_next_seq(revision: u64, next_seq: u64) -> Self {
        Self {
            revision,
            state: ClientState::Synchronized,
            outstanding_seq: 0,
            next_seq,
        }
    }

    /// The last server revision this client has seen (operations received
    /// plus acknowledgements).
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// The protocol state.
    pub fn state(&self) -> &ClientState {
        &self.state
    }

    /// Whether nothing is waiting for the server.
    pub fn is_synchronized(&self) -> bool {
        matches!(self.state, ClientState::Synchronized)
    }

    /// The sequence number the next sent operation will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Records a local edit `op` (already applied to the local document).
    /// Returns the operation to send now, if the client was synchronized;
    /// otherwise the edit is buffered and `None` is returned.
    ///
    /// No-op edits are ignored. When an operation is pending, `op` must apply
    /// to the pending result ([`OtError::ComposeLengthMismatch`] otherwise,
    /// and the state is unchanged).
    pub fn apply_client(&mut self, op: TextOperation) -> Result<Option<Outgoing>, OtError> {
        if op.is_noop() {
            return Ok(None);
        }
        let mismatch = |pending: &TextOperation| OtError::ComposeLengthMismatch {
            first_target_len: pending.target_len(),
            second_base_len: op.base_len(),
        };
        match &self.state {
            ClientState::Synchronized => {
                let seq = self.next_seq;
                self.next_seq = seq.checked_add(1).ok_or(OtError::RevisionOverflow)?;
                self.outstanding_seq = seq;
                self.state = ClientState::AwaitingConfirm(op.clone());
                Ok(Some(Outgoing {
                    base_revision: self.revision,
                    seq,
                    op,
                }))
            }
            ClientState::AwaitingConfirm(outstanding) => {
                if outstanding.target_len() != op.base_len() {
                    return Err(mismatch(outstanding));
                }
                self.state = ClientState::AwaitingWithBuffer(outstanding.clone(), op);
                Ok(None)
            }
            ClientState::AwaitingWithBuffer(outstanding, buffer) => {
                let buffer = buffer.compose(&op)?;
                self.state = ClientState::AwaitingWithBuffer(outstanding.clone(), buffer);
                Ok(None)
            }
        }
    }

    /// Takes an operation from the server (made by another client) and
    /// returns the operation to apply to the local document: `op` transformed
    /// against the outstanding and buffered operations, which are transformed
    /// in turn. Advances the revision by one.
    ///
    /// Fails (leaving the state unchanged) if `op` is not concurrent to the
    /// pending operations ([`OtError::TransformBaseMismatch`]).
    pub fn apply_server(&mut self, op: TextOperation) -> Result<TextOperation, OtError> {
        let revision = self
            .revision
            .checked_add(1)
            .ok_or(OtError::RevisionOverflow)?;
        let (state, local) = match &self.state {
            ClientState::Synchronized => (ClientState::Synchronized, op),
            ClientState::AwaitingConfirm(outstanding) => {
                let (outstanding, op) = TextOperation::transform(outstanding, &op)?;
                (ClientState::AwaitingConfirm(outstanding), op)
            }
            ClientState::AwaitingWithBuffer(outstanding, buffer) => {
                let (outstanding, op) = TextOperation::transform(outstanding, &op)?;
                let (buffer, op) = TextOperation::transform(buffer, &op)?;
                (ClientState::AwaitingWithBuffer(outstanding, buffer), op)
            }
        };
        self.state = state;
        self.revision = revision;
        Ok(local)
    }

    /// The server acknowledged the outstanding operation. Advances the
    /// revision by one and returns the buffered operation, if any, which is
    /// now outstanding and must be sent. Fails with [`OtError::UnexpectedAck`]
    /// if nothing was outstanding.
    pub fn server_ack(&mut self) -> Result<Option<Outgoing>, OtError> {
        let revision = self
            .revision
            .checked_add(1)
            .ok_or(OtError::RevisionOverflow)?;
        match std::mem::replace(&mut self.state, ClientState::Synchronized) {
            ClientState::Synchronized => Err(OtError::UnexpectedAck),
            ClientState::AwaitingConfirm(_) => {
                self.revision = revision;
                Ok(None)
            }
            ClientState::AwaitingWithBuffer(outstanding, buffer) => {
                let seq = self.next_seq;
                let Some(next_seq) = seq.checked_add(1) else {
                    self.state = ClientState::AwaitingWithBuffer(outstanding, buffer);
                    return Err(OtError::RevisionOverflow);
                };
                self.next_seq = next_seq;
                self.revision = revision;
                self.outstanding_seq = seq;
                self.state = ClientState::AwaitingConfirm(buffer.clone());
                Ok(Some(Outgoing {
                    base_revision: revision,
                    seq,
                    op: buffer,
                }))
            }
        }
    }

    /// The outstanding operation again, for sending after a reconnect: the
    /// same `seq` as the first send (so the authority can tell if it already
    /// applied it), transformed up to the current revision and based on it.
    /// `None` when synchronized.
    pub fn resend(&self) -> Option<Outgoing> {
        let outstanding = match &self.state {
            ClientState::Synchronized => return None,
            ClientState::AwaitingConfirm(o) | ClientState::AwaitingWithBuffer(o, _) => o,
        };
        Some(Outgoing {
            base_revision: self.revision,
            seq: self.outstanding_seq,
            op: outstanding.clone(),
        })
    }

    /// Maps a remote user's selection, given relative to the server document
    /// at [`revision`](Self::revision), into the local document (through the
    /// outstanding and buffered operations, which are not that user's own).
    pub fn transform_selection(&self, selection: Selection) -> Selection {
        match &self.state {
            ClientState::Synchronized => selection,
            ClientState::AwaitingConfirm(o) => selection.transform(o, false),
            ClientState::AwaitingWithBuffer(o, b) => {
                selection.transform(o, false).transform(b, false)
            }
        }
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
    fn state_machine_walkthrough() {
        let mut doc = String::from("ab");
        let mut c = Client::new(5);
        assert!(c.is_synchronized());
        assert_eq!(c.resend(), None);

        // Local edit: sent at once.
        let op1 = ins(1, 2, "X");
        doc = op1.apply(&doc).unwrap();
        let sent = c.apply_client(op1.clone()).unwrap().unwrap();
        assert_eq!((sent.base_revision, sent.seq), (5, 1));
        assert_eq!(c.state(), &ClientState::AwaitingConfirm(op1.clone()));

        // Second edit: buffered; third: composed into the buffer.
        let op2 = ins(0, 3, "é");
        doc = op2.apply(&doc).unwrap();
        assert_eq!(c.apply_client(op2).unwrap(), None);
        let op3 = ins(4, 4, "🎉");
        doc = op3.apply(&doc).unwrap();
        assert_eq!(c.apply_client(op3).unwrap(), None);
        assert_eq!(doc, "éaXb🎉");
        assert!(matches!(c.state(), ClientState::AwaitingWithBuffer(..)));

        // A server op (someone appended "Z" to "ab" at revision 5).
        let server = ins(2, 2, "Z");
        let local = c.apply_server(server).unwrap();
        doc = local.apply(&doc).unwrap();
        assert_eq!(doc, "éaXb🎉Z");
        assert_eq!(c.revision(), 6);

        // Resend keeps seq 1, rebased at revision 6.
        let again = c.resend().unwrap();
        assert_eq!((again.base_revision, again.seq), (6, 1));
        assert_eq!(again.op.apply("abZ").unwrap(), "aXbZ");

        // Ack: the buffer goes out with seq 2.
        let next = c.server_ack().unwrap().unwrap();
        assert_eq!((next.base_revision, next.seq), (7, 2));
        assert_eq!(next.op.apply("aXbZ").unwrap(), doc);
        assert_eq!(c.server_ack().unwrap(), None);
        assert!(c.is_synchronized());
        assert_eq!(c.revision(), 8);
        assert_eq!(c.server_ack(), Err(OtError::UnexpectedAck));
        assert_eq!(c.revision(), 8);
    }

    #[test]
    fn noop_edits_are_ignored() {
        let mut c = Client::new(0);
        assert_eq!(
            c.apply_client(TextOperation::new().retain(3)).unwrap(),
            None
        );
        assert!(c.is_synchronized());
        assert_eq!(c.next_seq(), 1);
    }

    #[test]
    fn mismatched_local_edit_is_refused() {
        let mut c = Client::with_next_seq(0, 10);
        let sent = c.apply_client(ins(0, 2, "x")).unwrap().unwrap();
        assert_eq!(sent.seq, 10);
        // Local doc now has 3 chars; an edit for 5 chars does not fit.
        let err = c.apply_client(TextOperation::new().delete(5)).unwrap_err();
        assert_eq!(
            err,
            OtError::ComposeLengthMismatch {
                first_target_len: 3,
                second_base_len: 5
            }
        );
        c.apply_client(ins(0, 3, "y")).unwrap();
        let before = c.clone();
        assert!(c.apply_client(TextOperation::new().delete(9)).is_err());
        assert_eq!(c, before);
    }

    #[test]
    fn mismatched_server_op_leaves_state() {
        let mut c = Client::new(3);
        c.apply_client(ins(0, 2, "x")).unwrap();
        let before = c.clone();
        let err = c.apply_server(TextOperation::new().retain(7)).unwrap_err();
        assert!(matches!(err, OtError::TransformBaseMismatch { .. }));
        assert_eq!(c, before);
    }

    #[test]
    fn remote_selection_through_pending() {
        let mut c = Client::new(0);
        // Local insert of "ab" at 1 in "xyz".
        c.apply_client(ins(1, 3, "ab")).unwrap();
        // A remote caret at 1 (before "y") stays before the local insert...
        assert_eq!(
            c.transform_selection(Selection::cursor(1)),
            Selection::cursor(1)
        );
        // ...and one at 2 moves past it.
        assert_eq!(
            c.transform_selection(Selection::cursor(2)),
            Selection::cursor(4)
        );
        c.apply_client(ins(0, 5, "Q")).unwrap();
        assert_eq!(
            c.transform_selection(Selection::cursor(2)),
            Selection::cursor(5)
        );
        assert_eq!(
            Client::new(0).transform_selection(Selection::new(1, 2)),
            Selection::new(1, 2)
        );
    }
}
