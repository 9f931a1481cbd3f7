//! The client side of collaborative editing: a local copy of a document kept in step
//! with the server by the three-state OT client ([`crate::ot::Client`]).
//!
//! [`Document`] is sans-IO: it returns the requests to send and takes the events the
//! session receives. Operations arrive on the COLLAB push stream in revision order;
//! the echo of the client's own operation there (same `client_id` and `seq`) is what
//! moves the state machine on, so acknowledgements and other people's operations are
//! always processed in the server's order, whatever order the control stream and the
//! push stream deliver them in.

use std::collections::BTreeMap;

use crate::ot::{self, OtError, TextOperation};
use crate::protocol::ot_wire::{op_from_wire, op_to_wire};
use crate::protocol::v1::{self, DocRole, doc_open_response};

/// A local copy of a shared document.
#[derive(Debug, Clone)]
pub struct Document {
    doc_id: String,
    client_id: String,
    text: String,
    role: DocRole,
    ot: ot::Client,
    /// Operations that arrived before the one the document needs next.
    early: BTreeMap<u64, v1::DocOperation>,
}

/// Why a document could not follow the server.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DocumentError {
    /// The open response carried no snapshot (pass it to [`Document::catch_up`]).
    #[error("the open response has no snapshot")]
    NoSnapshot,
    /// The server's operation does not fit the local state.
    #[error(transparent)]
    Ot(#[from] OtError),
    /// The server sent a snapshot while local edits are unacknowledged; the edits
    /// cannot be placed on it. Open the document again and redo them.
    #[error("a snapshot arrived while local edits were pending")]
    Diverged,
}

impl Document {
    /// A document from the response to `DocOpenRequest` (with a snapshot).
    /// `client_id` must be unique per editing client and stable across reconnects.
    pub fn from_open(
        client_id: impl Into<String>,
        open: v1::DocOpenResponse,
    ) -> Result<Self, DocumentError> {
        let Some(doc_open_response::State::Snapshot(text)) = open.state else {
            return Err(DocumentError::NoSnapshot);
        };
        Ok(Self {
            doc_id: open.doc_id,
            client_id: client_id.into(),
            text,
            role: DocRole::try_from(open.role).unwrap_or(DocRole::Unspecified),
            ot: ot::Client::new(open.revision),
            early: BTreeMap::new(),
        })
    }

    /// The document id.
    pub fn doc_id(&self) -> &str {
        &self.doc_id
    }

    /// This editor's client id.
    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// The local text (with local edits not yet acknowledged).
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The last server revision seen.
    pub fn revision(&self) -> u64 {
        self.ot.revision()
    }

    /// The caller's role.
    pub fn role(&self) -> DocRole {
        self.role
    }

    /// Whether every local edit has been acknowledged.
    pub fn is_synchronized(&self) -> bool {
        self.ot.is_synchronized()
    }

    /// The request for an OT outgoing operation.
    fn request(&self, out: ot::Outgoing) -> v1::DocSubmitRequest {
        v1::DocSubmitRequest {
            doc_id: self.doc_id.clone(),
            base_revision: out.base_revision,
            op: Some(op_to_wire(&out.op)),
            client_id: self.client_id.clone(),
            seq: out.seq,
        }
    }

    /// A local edit: applies it to the local text and returns the request to send
    /// now, if any (at most one operation is in flight; later edits are buffered).
    pub fn edit(
        &mut self,
        op: TextOperation,
    ) -> Result<Option<v1::DocSubmitRequest>, DocumentError> {
        let text = op.apply(&self.text)?;
        let out = self.ot.apply_client(op)?;
        self.text = text;
        Ok(out.map(|o| self.request(o)))
    }

    /// The operation in flight, to send again after a reconnect.
    pub fn pending(&self) -> Option<v1::DocSubmitRequest> {
        self.ot.resend().map(|o| self.request(o))
    }

    /// An operation pushed by the server. Returns the next request to send when it
    /// was the acknowledgement of this client's operation and edits are buffered.
    pub fn on_operation(
        &mut self,
        ev: v1::DocOperation,
    ) -> Result<Option<v1::DocSubmitRequest>, DocumentError> {
        if ev.doc_id != self.doc_id || ev.revision <= self.ot.revision() {
            return Ok(None);
        }
        self.early.insert(ev.revision, ev);
        let mut next = None;
        while let Some(ev) = self.early.remove(&(self.ot.revision() + 1)) {
            let own = self
                .ot
                .resend()
                .is_some_and(|o| ev.client_id == self.client_id && ev.seq == o.seq);
            if own {
                if let Some(out) = self.ot.server_ack()? {
                    next = Some(self.request(out));
                }
            } else {
                let op = op_from_wire(ev.op)?;
                let local = self.ot.apply_server(op)?;
                self.text = local.apply(&self.text)?;
            }
        }
        Ok(next)
    }

    /// Applies the response to reopening the document after a reconnect
    /// (`known_revision` = [`revision`](Self::revision)). Returns the request to
    /// (re)send: the operation still in flight, or the next buffered one.
    pub fn catch_up(
        &mut self,
        open: v1::DocOpenResponse,
    ) -> Result<Option<v1::DocSubmitRequest>, DocumentError> {
        let mut next = None;
        match open.state {
            Some(doc_open_response::State::CatchUp(c)) => {
                for ev in c.operations {
                    if let Some(req) = self.on_operation(ev)? {
                        next = Some(req);
                    }
                }
            }
            Some(doc_open_response::State::Snapshot(text)) => {
                if !self.is_synchronized() {
                    return Err(DocumentError::Diverged);
                }
                self.text = text;
                self.ot = ot::Client::with_next_seq(open.revision, self.ot.next_seq());
                self.early.clear();
            }
            None => return Err(DocumentError::NoSnapshot),
        }
        Ok(next.or_else(|| self.pending()))
    }
}
