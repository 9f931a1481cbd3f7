//! Collaborative text documents: the server is the single authority per document
//! (the ot.js model). A client submits an operation with the revision it was made
//! on; the server transforms it against every operation since, applies it, commits
//! operation and revision to redb, acknowledges, and broadcasts it in revision order
//! on the COLLAB push stream. Operations that arrive while the document is
//! committing are transformed in turn and committed together in its next write
//! (see `super::gather`). Cursors travel as datagrams and settle reliably.
//!
//! Storage (all keyed by document id):
//! - `collab_docs`: owner and access list;
//! - `collab_user_docs`: (user, document) → (role, owner), for every user with
//!   access (the owner included), written in the same transaction as
//!   `collab_docs`, so listing a user's documents reads only their own entries;
//! - `collab_snapshots`: the text at some revision, rewritten every
//!   `snapshot_every` operations;
//! - `collab_ops`: the operation log since `history` operations before the snapshot
//!   (older entries are compacted away when a snapshot is written);
//! - `collab_clients`: the last `(seq, revision)` applied per editing client (keyed by
//!   user and client id), so a
//!   resent operation is acknowledged again instead of applied twice, across restarts.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use prost::Message;
use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

use tokio_util::sync::CancellationToken;

use super::gather::Gather;
use super::{
    Background, ServiceDeps, ServiceError, ServiceResult, SessionCtx, append_failed, corrupt, json,
    user_topic,
};
use crate::ot::{Authority, Component, OtError, TextOperation};
use crate::protocol::ErrorCode;
use crate::protocol::ot_wire::{op_from_wire, op_to_wire};
use crate::protocol::v1::{self, DocRole, StreamKind, push};
use crate::store::registry::Loaded;
use crate::store::{RedbLog, StoreError};
use crate::util::Unpoisoned;

const DOCS: TableDefinition<&str, &[u8]> = TableDefinition::new("collab_docs");
const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("collab_snapshots");
/// The operations' offset log ([`RedbLog`]) keeps them in this table, by revision.
const OPS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("collab_ops");
const CLIENTS: TableDefinition<(&str, &str), (u64, u64)> = TableDefinition::new("collab_clients");
/// (user, document) → (the user's `DocRole` number, the owner): who may see what.
const USER_DOCS: TableDefinition<(&str, &str), (i32, &str)> =
    TableDefinition::new("collab_user_docs");

/// Collaboration settings (`[collab]` in the configuration file).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CollabConfig {
    /// Operations kept (in memory and in the log) for transforming late operations
    /// and for catching up reconnecting clients. Older base revisions get
    /// `RESYNC_REQUIRED`.
    pub history: usize,
    /// A snapshot is written every this many operations.
    pub snapshot_every: u64,
    /// The largest document, in characters.
    pub max_doc_chars: usize,
    /// The longest client id, in bytes.
    pub max_client_id: usize,
    /// A cursor that has not moved for this long is sent again reliably.
    #[serde(with = "crate::clock::duration_str")]
    pub cursor_settle: Duration,
    /// Cursor datagrams relayed per session and document per second at most; moves
    /// in between are coalesced (the latest one settles reliably).
    pub cursor_rate: u32,
    /// `DocListRequest` returns at most this many documents (the first ones by id).
    pub max_list_docs: usize,
    /// Documents one session may have open at once; opening one more is
    /// `LIMIT_EXCEEDED` (close one first).
    pub max_open_docs: usize,
    /// Bytes of documents (text and kept operations) kept loaded while nobody
    /// has them open (a byte-weighed cache).
    pub cache_bytes: u64,
    /// The largest response, in bytes (the node's `limits.max_frame_size`): a
    /// document whose snapshot does not fit is refused with `RESPONSE_TOO_LARGE`.
    #[serde(skip)]
    pub max_response_bytes: usize,
}

impl CollabConfig {
    /// Checks the section: the counts must be positive.
    pub fn validate(&self) -> Result<(), super::InvalidConfig> {
        if self.history == 0
            || self.snapshot_every == 0
            || self.cursor_rate == 0
            || self.max_list_docs == 0
            || self.max_open_docs == 0
        {
            return Err(super::InvalidConfig(
                "collab.history, collab.snapshot_every, collab.cursor_rate, \
                 collab.max_list_docs and collab.max_open_docs must be positive"
                    .into(),
            ));
        }
        Ok(())
    }
}

impl Default for CollabConfig {
    fn default() -> Self {
        Self {
            history: 1000,
            snapshot_every: 100,
            max_doc_chars: 1 << 20,
            max_client_id: 64,
            cursor_settle: Duration::from_millis(300),
            cursor_rate: 20,
            max_list_docs: 1000,
            max_open_docs: 64,
            cache_bytes: 256 << 20,
            max_response_bytes: 64 * 1024,
        }
    }
}

/// Owner and access list of a document.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct DocMeta {
    owner: String,
    /// user → role (`DocRole` number).
    acl: BTreeMap<String, i32>,
}

impl DocMeta {
    fn role_of(&self, user: &str) -> DocRole {
        if user == self.owner {
            return DocRole::Owner;
        }
        self.acl
            .get(user)
            .and_then(|r| DocRole::try_from(*r).ok())
            .unwrap_or(DocRole::Unspecified)
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct StoredSnapshot {
    revision: u64,
    text: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct StoredOp {
    op: TextOperation,
    user: String,
    client_id: String,
    seq: u64,
}

/// The deduplication key of an editing client: its user and its client id,
/// separated by a NUL (which user ids cannot contain). Entries stored before keys
/// carried the user no longer match: a resend of an operation applied before that
/// upgrade would be applied again.
fn dedup_key(user: &str, client_id: &str) -> String {
    format!("{user}\0{client_id}")
}

impl DocState {
    /// About the bytes the document takes in memory (for the cache's byte bound):
    /// its text, the operations kept, and the access list.
    fn weight(&self) -> usize {
        let log: usize = self.log.iter().map(|op| op.encoded_len() + 64).sum();
        let clients: usize = self.clients.keys().map(|k| k.len() + 64).sum();
        self.id.len() + self.authority.doc().len() + log + clients + 256
    }
}

/// One loaded document.
#[derive(Debug)]
struct DocState {
    id: String,
    meta: DocMeta,
    authority: Authority,
    /// The last `history` operations as pushed, for catch-up.
    log: VecDeque<v1::DocOperation>,
    /// [`dedup_key`] of (user, client id) → (last seq, its revision).
    clients: HashMap<String, (u64, u64)>,
    /// Revision of the last snapshot written.
    snapshot_revision: u64,
    /// Sessions that have the document open: session id → user.
    present: BTreeMap<String, String>,
    /// An in-memory change could not be committed: this copy is stale.
    broken: bool,
    /// Loaded after a copy was retired by a failed commit, which had published
    /// up to this revision: the operations after it (a commit reported failed
    /// that reached the disk) are pushed by the next open. See
    /// [`CollabService::push_unpublished`].
    unpublished_after: Option<u64>,
}

#[derive(Debug)]
struct CursorState {
    cursor: v1::DocCursor,
    last_relay: Option<Instant>,
    last_move: Instant,
    settled: bool,
}

pub use crate::metrics::CollabCounters;

/// The collaboration service.
#[derive(Debug)]
pub struct CollabService {
    deps: ServiceDeps,
    config: CollabConfig,
    /// Loaded documents: never more than one copy of one.
    docs: crate::store::registry::Registry<DocState>,
    /// Each document's operations since shortly before its snapshot.
    log: RedbLog,
    /// Documents whose copy was retired by a failed commit → the last revision
    /// that copy published (taken by the next load).
    retired: Mutex<HashMap<String, u64>>,
    /// session id → documents it has open.
    sessions: Mutex<HashMap<String, HashMap<String, Loaded<DocState>>>>,
    /// (document, session) → its cursor.
    cursors: Mutex<HashMap<(String, String), CursorState>>,
    /// Where retention goes on in `collab_clients` and `collab_user_docs`.
    prune_cursors: Mutex<[(String, String); 2]>,
    /// In a cluster: the sessions of other nodes that have documents open.
    remote: Mutex<RemotePresence>,
    /// Operations waiting for their document, by document id: whoever holds
    /// the document's lock applies and stores them together.
    waiting: Gather<Edit, ServiceResult<v1::DocSubmitResponse>>,
}

/// Who has which document open on the other nodes of a cluster, as their
/// commands tell (see [`CollabService::remote_presence`]).
#[derive(Debug, Default)]
struct RemotePresence {
    /// document → session → user.
    docs: HashMap<String, BTreeMap<String, String>>,
    /// session → its documents.
    sessions: HashMap<String, std::collections::HashSet<String>>,
}

impl RemotePresence {
    /// Forgets `session` on `doc`; true if it was there.
    fn remove(&mut self, doc: &str, session: &str) -> bool {
        let Some(present) = self.docs.get_mut(doc) else {
            return false;
        };
        let was = present.remove(session).is_some();
        if present.is_empty() {
            self.docs.remove(doc);
        }
        if let Some(docs) = self.sessions.get_mut(session) {
            docs.remove(doc);
            if docs.is_empty() {
                self.sessions.remove(session);
            }
        }
        was
    }
}

fn topic(doc_id: &str) -> String {
    format!("doc/{doc_id}")
}

/// Operations stored in one write at most.
const MAX_OPS_PER_COMMIT: usize = 256;

/// An operation waiting for its document.
#[derive(Debug)]
struct Edit {
    /// The copy of the document the session opened.
    copy: Loaded<DocState>,
    user: String,
    client_id: String,
    seq: u64,
    base_revision: u64,
    op: TextOperation,
}

/// The operations of one batch applied in memory, side by side: what the write
/// stores, and what is published once it is durable.
#[derive(Debug, Default)]
struct Batch {
    /// As stored in the log, at consecutive revisions.
    rows: Vec<Vec<u8>>,
    /// Each operation's client ([`dedup_key`]), seq and revision.
    clients: Vec<(String, u64, u64)>,
    /// As pushed to the editors.
    events: Vec<v1::DocOperation>,
    /// How many were transformed against operations they had not seen.
    transformed: u64,
}

/// What became of a waiting operation that was not refused.
#[derive(Debug)]
enum Outcome {
    /// Applied at this revision.
    Applied(u64),
    /// A resend of the operation applied at this revision.
    Duplicate(u64),
    /// Its base revision is older than the kept history.
    Resync,
}

fn reloaded() -> ServiceError {
    ServiceError::new(
        ErrorCode::Internal,
        "the document was reloaded; open it again",
    )
}

fn not_found() -> ServiceError {
    ServiceError::new(ErrorCode::NotFound, "no such document")
}

impl CollabService {
    /// Opens the service (creating its tables). The returned work settles cursors
    /// until the node stops.
    pub fn open(
        deps: ServiceDeps,
        config: CollabConfig,
    ) -> Result<(Arc<Self>, Background), StoreError> {
        let mut txn = deps.store.db().begin_write()?;
        txn.set_quick_repair(true);
        txn.open_table(DOCS)?;
        txn.open_table(SNAPSHOTS)?;
        txn.open_table(OPS)?;
        txn.open_table(CLIENTS)?;
        index_existing_docs(&txn)?;
        txn.commit()?;
        let log = RedbLog::open(&deps.store, &deps.writer, "collab_ops", "collab_epochs")?;
        let cache_bytes = config.cache_bytes;
        let service = Arc::new(Self {
            deps,
            docs: crate::store::registry::Registry::new(
                "docs",
                cache_bytes,
                Duration::from_secs(600),
                DocState::weight,
            ),
            log,
            config,
            retired: Mutex::new(HashMap::new()),
            sessions: Mutex::new(HashMap::new()),
            cursors: Mutex::new(HashMap::new()),
            prune_cursors: Mutex::default(),
            remote: Mutex::default(),
            waiting: Gather::default(),
        });
        let work = Background::new(
            "collab cursors",
            settle_cursors(Arc::downgrade(&service), service.deps.shutdown.clone()),
        );
        Ok((service, work))
    }

    /// Creates a document owned by the caller.
    pub async fn create(
        &self,
        ctx: &SessionCtx,
        req: v1::DocCreateRequest,
    ) -> ServiceResult<v1::DocCreateResponse> {
        // A chosen id is namespaced per creator ("<creator>~<name>"): it can only
        // be taken by the caller's own document, so the answer tells an outsider
        // nothing about anyone else's.
        let chosen = !req.doc_id.is_empty();
        let id = if chosen {
            let creator = crate::ids::UserId::parse(ctx.user_id())?;
            crate::ids::DocId::chosen(&creator, &req.doc_id)?.into_string()
        } else {
            crate::ids::DocId::generated().into_string()
        };
        if req.text.chars().count() > self.config.max_doc_chars {
            return Err(ServiceError::new(
                ErrorCode::LimitExceeded,
                format!(
                    "documents hold at most {} characters",
                    self.config.max_doc_chars
                ),
            ));
        }
        let meta = DocMeta {
            owner: ctx.user_id().to_owned(),
            acl: BTreeMap::new(),
        };
        let (meta_bytes, snap_bytes) = (
            json(&meta),
            json(&StoredSnapshot {
                revision: 0,
                text: req.text,
            }),
        );
        let exists = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = exists.clone();
        let doc_id = id.clone();
        let owner = ctx.user_id().to_owned();
        self.deps
            .writer
            .write(move |txn| {
                let mut docs = txn.open_table(DOCS)?;
                if docs.get(doc_id.as_str())?.is_some() {
                    flag.store(true, std::sync::atomic::Ordering::Relaxed);
                    return Ok(());
                }
                flag.store(false, std::sync::atomic::Ordering::Relaxed);
                docs.insert(doc_id.as_str(), meta_bytes.as_slice())?;
                txn.open_table(SNAPSHOTS)?
                    .insert(doc_id.as_str(), snap_bytes.as_slice())?;
                txn.open_table(USER_DOCS)?.insert(
                    (owner.as_str(), doc_id.as_str()),
                    (DocRole::Owner as i32, owner.as_str()),
                )?;
                Ok(())
            })
            .await?;
        if exists.load(std::sync::atomic::Ordering::Relaxed) {
            // A generated id (16 random hex digits) practically never collides;
            // when it does, the caller retries as after any failed write.
            let why = if chosen {
                "you already created a document with this id"
            } else {
                "the generated id collided; retry"
            };
            let code = if chosen {
                ErrorCode::Conflict
            } else {
                ErrorCode::Internal
            };
            return Err(ServiceError::new(code, why));
        }
        Ok(v1::DocCreateResponse {
            doc_id: id,
            revision: 0,
        })
    }

    /// Grants or revokes access. Owner only. The user whose access changed gets a
    /// `DocShared` push on every session.
    pub async fn share(
        &self,
        ctx: &SessionCtx,
        req: v1::DocShareRequest,
    ) -> ServiceResult<v1::DocShareResponse> {
        crate::ids::DocId::parse(req.doc_id.as_str())?;
        crate::ids::UserId::parse(&req.user_id)?;
        let role =
            DocRole::try_from(req.role).map_err(|_| ServiceError::bad_request("unknown role"))?;
        if role == DocRole::Owner {
            return Err(ServiceError::bad_request("a document has one owner"));
        }
        let handle = self.load(&req.doc_id).await?.ok_or_else(not_found)?;
        let mut d = handle.lock().await;
        match d.meta.role_of(ctx.user_id()) {
            DocRole::Owner => {}
            DocRole::Unspecified => return Err(not_found()),
            _ => {
                return Err(ServiceError::new(
                    ErrorCode::PermissionDenied,
                    "only the owner shares a document",
                ));
            }
        }
        if req.user_id == d.meta.owner {
            return Err(ServiceError::bad_request("the owner's role cannot change"));
        }
        let mut meta = d.meta.clone();
        if role == DocRole::Unspecified {
            meta.acl.remove(&req.user_id);
        } else {
            meta.acl.insert(req.user_id.clone(), role as i32);
        }
        let before = d.meta.role_of(&req.user_id);
        let bytes = json(&meta);
        let id = d.id.clone();
        let (user, owner) = (req.user_id.clone(), meta.owner.clone());
        self.deps
            .writer
            .write(move |txn| {
                txn.open_table(DOCS)?
                    .insert(id.as_str(), bytes.as_slice())?;
                let mut index = txn.open_table(USER_DOCS)?;
                if role == DocRole::Unspecified {
                    index.remove((user.as_str(), id.as_str()))?;
                } else {
                    index.insert((user.as_str(), id.as_str()), (role as i32, owner.as_str()))?;
                }
                Ok(())
            })
            .await?;
        d.meta = meta;
        if role == DocRole::Unspecified {
            self.close_for_revoked(&mut d, &req.user_id);
        }
        if before != role {
            let push = v1::Push {
                stream: String::new(),
                offset: 0,
                event: Some(push::Event::DocShared(v1::DocShared {
                    doc_id: d.id.clone(),
                    owner_id: d.meta.owner.clone(),
                    role: role as i32,
                })),
            };
            self.deps
                .hub
                .publish(&user_topic(&req.user_id), StreamKind::Collab, &push);
        }
        Ok(v1::DocShareResponse {})
    }

    /// The documents the caller owns or that are shared with them, by id, with their
    /// role and current revision: at most `max_list_docs`, the first ones by id
    /// (`more` says whether there are others). Reads only the caller's index entries
    /// and one key per document.
    pub async fn list(&self, ctx: &SessionCtx) -> ServiceResult<v1::DocListResponse> {
        let user = ctx.user_id();
        let max = self.config.max_list_docs;
        let txn = self.deps.store.db().begin_read()?;
        let index = txn.open_table(USER_DOCS)?;
        let ops = txn.open_table(OPS)?;
        let mut docs = Vec::new();
        let mut more = false;
        for entry in index.range((user, "")..)? {
            let (key, value) = entry?;
            let (u, doc_id) = key.value();
            if u != user {
                break;
            }
            if docs.len() == max {
                more = true;
                break;
            }
            let (role, owner) = value.value();
            // The last operation's revision is the document's (the log always keeps
            // its last entry); a document never edited is at revision 0.
            let revision = match ops.range((doc_id, 0)..=(doc_id, u64::MAX))?.next_back() {
                Some(op) => op?.0.value().1,
                None => 0,
            };
            docs.push(v1::DocSummary {
                doc_id: doc_id.to_owned(),
                owner_id: owner.to_owned(),
                role,
                revision,
            });
        }
        Ok(v1::DocListResponse { docs, more })
    }

    /// Opens a document for the session: snapshot or catch-up, who is here, and
    /// from now on its operations and presence on the COLLAB stream.
    pub async fn open_doc(
        &self,
        ctx: &SessionCtx,
        req: v1::DocOpenRequest,
    ) -> ServiceResult<v1::DocOpenResponse> {
        crate::ids::DocId::parse(req.doc_id.as_str())?;
        self.check_open_count(ctx, &req.doc_id)?;
        let handle = self.load(&req.doc_id).await?.ok_or_else(not_found)?;
        let mut d = handle.lock().await;
        if let Some(published) = d.unpublished_after.take() {
            self.push_unpublished(&d, published, ctx.session_id());
        }
        let role = d.meta.role_of(ctx.user_id());
        if role == DocRole::Unspecified {
            return Err(not_found());
        }
        let revision = d.authority.revision();
        let state = match req.known_revision {
            Some(k) if k > revision => {
                return Err(ServiceError::bad_request(format!(
                    "known_revision {k} is ahead of the document ({revision})"
                )));
            }
            Some(k) if revision - k <= d.log.len() as u64 => {
                let skip = d.log.len() - (revision - k) as usize;
                v1::doc_open_response::State::CatchUp(v1::DocCatchUp {
                    operations: d.log.iter().skip(skip).cloned().collect(),
                })
            }
            _ => v1::doc_open_response::State::Snapshot(d.authority.doc().to_owned()),
        };
        // Refused before the session is subscribed, so a refused open leaves
        // nothing behind.
        let state_len = match &state {
            v1::doc_open_response::State::Snapshot(text) => text.len(),
            v1::doc_open_response::State::CatchUp(c) => prost::Message::encoded_len(c),
        };
        if state_len + 1024 > self.config.max_response_bytes {
            return Err(ServiceError::new(
                ErrorCode::ResponseTooLarge,
                format!(
                    "{} is {state_len} bytes, over the {}-byte frame limit",
                    req.doc_id, self.config.max_response_bytes
                ),
            ));
        }
        let participants = {
            let cursors = self.cursors.locked();
            let remote = self.remote.locked();
            d.present
                .iter()
                .chain(remote.docs.get(&d.id).into_iter().flatten())
                .filter(|(s, _)| s.as_str() != ctx.session_id())
                .map(|(s, u)| v1::DocParticipant {
                    user_id: u.clone(),
                    session_id: s.clone(),
                    cursor: cursors
                        .get(&(d.id.clone(), s.clone()))
                        .map(|c| c.cursor.clone()),
                })
                .collect()
        };
        // Subscribing under the document lock: every operation after `revision` is
        // published under the same lock, so none is missed.
        {
            // Checked again where it is recorded: opens running at once cannot
            // pass the limit together.
            let mut sessions = self.sessions.locked();
            let open = sessions.entry(ctx.session_id().to_owned()).or_default();
            if open.len() >= self.config.max_open_docs && !open.contains_key(&d.id) {
                return Err(ServiceError::new(
                    ErrorCode::LimitExceeded,
                    format!(
                        "{} documents open in this session already: close one first",
                        self.config.max_open_docs
                    ),
                ));
            }
            open.insert(d.id.clone(), handle.clone());
        }
        let t = topic(&d.id);
        self.deps.hub.subscribe(&t, ctx.subscriber.clone());
        let newly = d
            .present
            .insert(ctx.session_id().to_owned(), ctx.user_id().to_owned())
            .is_none();
        if newly {
            self.publish_presence(&d.id, ctx.user_id(), ctx.session_id(), true);
        }
        Ok(v1::DocOpenResponse {
            doc_id: d.id.clone(),
            revision,
            role: role as i32,
            state: Some(state),
            participants,
        })
    }

    /// Publishes the operations after revision `published` that a retired copy of
    /// the document never published (their commit was reported failed but
    /// reached the disk), in revision order, once: to the sessions that kept the
    /// document open, and not to the session `opening` it, which gets them in
    /// its answer (it is subscribed again by the open). Call under the
    /// document's lock, before anything else is published from it.
    fn push_unpublished(&self, d: &DocState, published: u64, opening: &str) {
        let t = topic(&d.id);
        self.deps.hub.unsubscribe(&t, opening);
        for op in d.log.iter().filter(|op| op.revision > published) {
            tracing::warn!(doc = %d.id, revision = op.revision, "publishing an operation stored by a commit reported failed");
            let push = v1::Push {
                stream: t.clone(),
                offset: op.revision,
                event: Some(push::Event::DocOperation(op.clone())),
            };
            self.deps.hub.publish(&t, StreamKind::Collab, &push);
        }
    }

    /// `LIMIT_EXCEEDED` when the session has `max_open_docs` documents open and
    /// `doc_id` is not one of them.
    /// Fails with `NOT_FOUND` unless the session has `doc_id` open (checked before a
    /// submit is proposed to the cluster).
    pub fn require_open(&self, ctx: &SessionCtx, doc_id: &str) -> ServiceResult<()> {
        let open = self
            .sessions
            .locked()
            .get(ctx.session_id())
            .is_some_and(|docs| docs.contains_key(doc_id));
        if open {
            Ok(())
        } else {
            Err(self.reject(ServiceError::new(
                ErrorCode::NotFound,
                "open the document before submitting to it",
            )))
        }
    }

    fn check_open_count(&self, ctx: &SessionCtx, doc_id: &str) -> ServiceResult<()> {
        let sessions = self.sessions.locked();
        let Some(open) = sessions.get(ctx.session_id()) else {
            return Ok(());
        };
        if open.len() >= self.config.max_open_docs && !open.contains_key(doc_id) {
            return Err(ServiceError::new(
                ErrorCode::LimitExceeded,
                format!(
                    "{} documents open in this session already: close one first",
                    self.config.max_open_docs
                ),
            ));
        }
        Ok(())
    }

    /// Stops sending the document's events to the session.
    pub async fn close_doc(
        &self,
        ctx: &SessionCtx,
        req: v1::DocCloseRequest,
    ) -> ServiceResult<v1::DocCloseResponse> {
        let handle = self
            .sessions
            .locked()
            .get_mut(ctx.session_id())
            .and_then(|docs| docs.remove(&req.doc_id));
        if let Some(handle) = handle {
            self.leave(ctx, &handle).await;
        }
        Ok(v1::DocCloseResponse {})
    }

    /// The session ended: it leaves every document it had open.
    pub async fn disconnected(&self, ctx: &SessionCtx) {
        let docs = self
            .sessions
            .locked()
            .remove(ctx.session_id())
            .unwrap_or_default();
        for handle in docs.values() {
            self.leave(ctx, handle).await;
        }
    }

    async fn leave(&self, ctx: &SessionCtx, handle: &Loaded<DocState>) {
        let mut d = handle.lock().await;
        self.deps.hub.unsubscribe(&topic(&d.id), ctx.session_id());
        self.cursors
            .locked()
            .remove(&(d.id.clone(), ctx.session_id().to_owned()));
        if d.present.remove(ctx.session_id()).is_some() {
            self.publish_presence(&d.id, ctx.user_id(), ctx.session_id(), false);
        }
    }

    fn publish_presence(&self, doc_id: &str, user: &str, session: &str, joined: bool) {
        let push = v1::Push {
            stream: String::new(),
            offset: 0,
            event: Some(push::Event::DocPresence(v1::DocPresence {
                doc_id: doc_id.to_owned(),
                user_id: user.to_owned(),
                session_id: session.to_owned(),
                joined,
            })),
        };
        for s in self.deps.hub.subscribers(&topic(doc_id)) {
            if s.session_id() != session {
                let _ = s.push(StreamKind::Collab, push.clone());
            }
        }
    }

    /// Access to `d` was revoked from `user`: their sessions that have it open stop
    /// receiving its operations, presence and cursors at once (they learn why from
    /// the `DocShared` push with no role), and the others see them leave.
    fn close_for_revoked(&self, d: &mut DocState, user: &str) {
        let sessions: Vec<String> = d
            .present
            .iter()
            .filter(|(_, u)| u.as_str() == user)
            .map(|(s, _)| s.clone())
            .collect();
        for session in sessions {
            d.present.remove(&session);
            self.deps.hub.unsubscribe(&topic(&d.id), &session);
            self.cursors
                .locked()
                .remove(&(d.id.clone(), session.clone()));
            if let Some(docs) = self.sessions.locked().get_mut(&session) {
                docs.remove(&d.id);
            }
            self.publish_presence(&d.id, user, &session, false);
        }
        // Other nodes' sessions of the user: every node applies the same share
        // command, so each tells its own sessions that they left.
        let remote: Vec<String> = {
            let mut r = self.remote.locked();
            let gone: Vec<String> = r
                .docs
                .get(&d.id)
                .into_iter()
                .flatten()
                .filter(|(_, u)| u.as_str() == user)
                .map(|(s, _)| s.clone())
                .collect();
            gone.into_iter().filter(|s| r.remove(&d.id, s)).collect()
        };
        for session in remote {
            self.publish_presence(&d.id, user, &session, false);
        }
    }

    /// In a cluster: a session of another node opened (`joined`) or closed a
    /// document. This node's sessions that have it open see the change, and later
    /// opens list the session among the participants.
    pub fn remote_presence(&self, session: &str, user: &str, doc_id: &str, joined: bool) {
        let local = self.sessions.locked().contains_key(session);
        if local {
            // This node's own session, whose proposal timed out here.
            return;
        }
        let changed = {
            let mut r = self.remote.locked();
            if joined {
                let docs = r.sessions.entry(session.to_owned()).or_default();
                // The proposing node enforced the limit; this only bounds memory.
                if docs.len() >= self.config.max_open_docs && !docs.contains(doc_id) {
                    false
                } else {
                    docs.insert(doc_id.to_owned());
                    r.docs
                        .entry(doc_id.to_owned())
                        .or_default()
                        .insert(session.to_owned(), user.to_owned())
                        .is_none()
                }
            } else {
                r.remove(doc_id, session)
            }
        };
        if changed {
            self.publish_presence(doc_id, user, session, joined);
        }
    }

    /// In a cluster: a session of another node ended (or its node is gone): it
    /// leaves every document it had open.
    pub fn remote_gone(&self, session: &str, user: &str) {
        let docs: Vec<String> = {
            let mut r = self.remote.locked();
            let docs: Vec<String> = r
                .sessions
                .get(session)
                .into_iter()
                .flatten()
                .cloned()
                .collect();
            docs.into_iter().filter(|d| r.remove(d, session)).collect()
        };
        for doc in docs {
            self.publish_presence(&doc, user, session, false);
        }
    }

    fn reject(&self, e: ServiceError) -> ServiceError {
        self.counters()
            .rejected
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        e
    }

    fn counters(&self) -> &CollabCounters {
        &self.deps.metrics.collab
    }

    /// Applies an operation: transform, commit, acknowledge, broadcast. An
    /// operation that arrives while its document is committing waits, and is
    /// stored with the others that waited in the document's next write.
    pub async fn submit(
        &self,
        ctx: &SessionCtx,
        req: v1::DocSubmitRequest,
    ) -> ServiceResult<v1::DocSubmitResponse> {
        self.deps
            .rates
            .check(super::rate::Action::DocSubmit, ctx.user_id())?;
        let handle = if crate::clock::replay::active() {
            // A replicated submit: the proposing node checked that the session has
            // the document open; every node applies it to the document itself.
            crate::ids::DocId::parse(req.doc_id.as_str())?;
            self.load(&req.doc_id).await?
        } else {
            self.sessions
                .locked()
                .get(ctx.session_id())
                .and_then(|docs| docs.get(&req.doc_id).cloned())
        };
        let Some(handle) = handle else {
            // Whether it exists or not, the session has not opened it.
            return Err(self.reject(ServiceError::new(
                ErrorCode::NotFound,
                "open the document before submitting to it",
            )));
        };
        if req.client_id.is_empty()
            || req.client_id.len() > self.config.max_client_id
            || req.seq == 0
        {
            return Err(self.reject(ServiceError::bad_request(format!(
                "client_id must be 1-{} bytes and seq positive",
                self.config.max_client_id
            ))));
        }
        let op = op_from_wire(req.op).map_err(|e| {
            self.reject(ServiceError::new(
                ErrorCode::InvalidOperation,
                e.to_string(),
            ))
        })?;
        let edit = Edit {
            copy: handle.clone(),
            user: ctx.user_id().to_owned(),
            client_id: req.client_id,
            seq: req.seq,
            base_revision: req.base_revision,
            op,
        };
        let lock = async {
            let d = handle.lock().await;
            if d.broken {
                return Err(reloaded());
            }
            Ok(d)
        };
        self.waiting
            .wait_or_serve(&req.doc_id, edit, lock, &(self, &handle), |(s, h), d| {
                Box::pin(s.apply_waiting(h, d))
            })
            .await?
            .into_result(
                "the operation was interrupted and may have been applied; resend it with the same client_id and seq",
            )
    }

    /// Transforms the operations waiting for the document in the order they
    /// came, stores them in one write, publishes them in revision order and
    /// answers each. Returns how many it took. Call under the document's lock,
    /// on the copy `copy` (not retired).
    async fn apply_waiting(&self, copy: &Loaded<DocState>, d: &mut DocState) -> usize {
        use std::sync::atomic::Ordering::Relaxed;
        let taken = self.waiting.take(&d.id, MAX_OPS_PER_COMMIT);
        let count = taken.len();
        let base = d.authority.revision();
        let mut batch = Batch::default();
        // Answered once the write is durable: their answer tells of state it stores.
        let mut settled = Vec::new();
        for (edit, reply) in taken {
            if !Arc::ptr_eq(&edit.copy, copy) {
                // Opened on a copy retired since: the session opens it again.
                let _ = reply.send(Err(reloaded()));
                continue;
            }
            match self.transform(d, edit, &mut batch) {
                Ok(outcome) => settled.push((reply, outcome)),
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            }
        }
        let Batch {
            rows,
            clients,
            events,
            transformed,
        } = batch;
        if !rows.is_empty()
            && let Err(e) = self.store_applied(d, base, rows, clients).await
        {
            for (reply, _) in settled {
                let _ = reply.send(Err(e.clone()));
            }
            return count;
        }
        self.counters()
            .applied
            .fetch_add(events.len() as u64, Relaxed);
        self.counters().transformed.fetch_add(transformed, Relaxed);
        // Published under the document lock: pushes go out in revision order.
        let t = topic(&d.id);
        for event in events {
            d.log.push_back(event.clone());
            self.deps.hub.publish(
                &t,
                StreamKind::Collab,
                &v1::Push {
                    stream: t.clone(),
                    offset: event.revision,
                    event: Some(push::Event::DocOperation(event)),
                },
            );
        }
        while d.log.len() > self.config.history {
            d.log.pop_front();
        }
        for (reply, outcome) in settled {
            let answer = match outcome {
                Outcome::Applied(revision) => Ok(v1::DocSubmitResponse {
                    revision,
                    duplicate: false,
                }),
                Outcome::Duplicate(revision) => Ok(v1::DocSubmitResponse {
                    revision,
                    duplicate: true,
                }),
                Outcome::Resync => Err(self.resync(d)),
            };
            let _ = reply.send(answer);
        }
        count
    }

    /// Checks one waiting operation against the document and applies it in
    /// memory (its client's seq included), adding it to `batch`. Nothing is
    /// stored yet: if the write that follows fails, this copy is retired.
    fn transform(&self, d: &mut DocState, edit: Edit, batch: &mut Batch) -> ServiceResult<Outcome> {
        match d.meta.role_of(&edit.user) {
            DocRole::Owner | DocRole::Editor => {}
            DocRole::Viewer => {
                return Err(self.reject(ServiceError::new(
                    ErrorCode::PermissionDenied,
                    "viewers cannot edit",
                )));
            }
            _ => return Err(self.reject(not_found())),
        }
        // Keyed by the user too: client ids are broadcast to every editor, and one
        // editor must not be able to mark another's next edit as already applied.
        let dedup = dedup_key(&edit.user, &edit.client_id);
        if let Some(&(seq, revision)) = d.clients.get(&dedup) {
            if edit.seq == seq {
                return Ok(Outcome::Duplicate(revision));
            }
            if edit.seq < seq {
                return Err(self.reject(ServiceError::new(
                    ErrorCode::Conflict,
                    format!("seq {} is older than the last applied ({seq})", edit.seq),
                )));
            }
        }
        let inserted: usize = edit
            .op
            .components()
            .iter()
            .map(|c| match c {
                Component::Insert(s) => s.chars().count(),
                _ => 0,
            })
            .sum();
        if d.authority.doc_len() + inserted > self.config.max_doc_chars {
            return Err(self.reject(ServiceError::new(
                ErrorCode::LimitExceeded,
                format!(
                    "documents hold at most {} characters",
                    self.config.max_doc_chars
                ),
            )));
        }
        let applied = match d.authority.receive(edit.base_revision, edit.op, None) {
            Ok(a) => a,
            Err(OtError::TooOld { .. }) => {
                self.counters()
                    .resyncs
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return Ok(Outcome::Resync);
            }
            Err(e @ OtError::FutureRevision { .. }) => {
                return Err(self.reject(ServiceError::bad_request(e.to_string())));
            }
            Err(e) => {
                return Err(self.reject(ServiceError::new(
                    ErrorCode::InvalidOperation,
                    e.to_string(),
                )));
            }
        };
        let revision = applied.revision;
        d.clients.insert(dedup.clone(), (edit.seq, revision));
        batch.rows.push(json(&StoredOp {
            op: applied.op.clone(),
            user: edit.user.clone(),
            client_id: edit.client_id.clone(),
            seq: edit.seq,
        }));
        batch.clients.push((dedup, edit.seq, revision));
        batch.events.push(v1::DocOperation {
            doc_id: d.id.clone(),
            revision,
            op: Some(op_to_wire(&applied.op)),
            user_id: edit.user,
            client_id: edit.client_id,
            seq: edit.seq,
        });
        batch.transformed += u64::from(applied.concurrent > 0);
        Ok(Outcome::Applied(revision))
    }

    /// Stores operations applied in memory after revision `base`, in one
    /// write: their log `rows`, each client's (key, seq, revision), and a
    /// snapshot when due. If the write fails, this copy is retired. Call under
    /// the document's lock.
    async fn store_applied(
        &self,
        d: &mut DocState,
        base: u64,
        rows: Vec<Vec<u8>>,
        clients: Vec<(String, u64, u64)>,
    ) -> ServiceResult<()> {
        let revision = d.authority.revision();
        let snapshot = (revision - d.snapshot_revision >= self.config.snapshot_every).then(|| {
            json(&StoredSnapshot {
                revision,
                text: d.authority.doc().to_owned(),
            })
        });
        let history = self.config.history as u64;
        let snapshot_taken = snapshot.is_some();
        let id = d.id.clone();
        let log = self.log.clone();
        let write = self
            .deps
            .writer
            .write(move |txn| {
                log.append_in(txn, &id, base, &rows)
                    .map_err(append_failed)?;
                let mut table = txn.open_table(CLIENTS)?;
                for (client, seq, revision) in &clients {
                    table.insert((id.as_str(), client.as_str()), (*seq, *revision))?;
                }
                if let Some(snap) = &snapshot {
                    txn.open_table(SNAPSHOTS)?
                        .insert(id.as_str(), snap.as_slice())?;
                    // Keep `history` operations before the snapshot for catch-up.
                    let keep_from = revision.saturating_sub(history) + 1;
                    log.trim_in(txn, &id, keep_from)?;
                }
                Ok(())
            })
            .await;
        if let Err(e) = write {
            // Memory is ahead of the disk now: retire this copy. The commit may
            // still have reached the disk (an fsync that wrote, then reported an
            // error): the next copy pushes what is stored past `base`.
            self.retired.locked().insert(d.id.clone(), base);
            d.broken = true;
            self.docs.forget(&d.id).await;
            return Err(ServiceError::from(e));
        }
        if snapshot_taken {
            d.snapshot_revision = revision;
        }
        // As retention does on disk: a client whose last operation is older than
        // the history is forgotten (its resends get RESYNC_REQUIRED anyway), so a
        // loaded document remembers at most about 2 × `history` clients.
        if d.clients.len() > 2 * self.config.history {
            let floor = revision.saturating_sub(history);
            d.clients.retain(|_, (_, rev)| *rev >= floor);
        }
        Ok(())
    }

    /// `RESYNC_REQUIRED` with the document as stored now.
    fn resync(&self, d: &DocState) -> ServiceError {
        let mut e = ServiceError::new(
            ErrorCode::ResyncRequired,
            "the base revision is older than the kept history",
        );
        e.detail = Some(v1::error::Detail::Resync(v1::DocSnapshot {
            doc_id: d.id.clone(),
            revision: d.authority.revision(),
            text: d.authority.doc().to_owned(),
        }));
        e
    }

    /// A cursor datagram: relayed to the others in the document (at most
    /// `cursor_rate` per second; the latest position always settles reliably).
    pub fn cursor(&self, ctx: &SessionCtx, mut c: v1::DocCursor) {
        let open = self
            .sessions
            .locked()
            .get(ctx.session_id())
            .is_some_and(|docs| docs.contains_key(&c.doc_id));
        if !open {
            return;
        }
        c.user_id = ctx.user_id().to_owned();
        c.session_id = ctx.session_id().to_owned();
        let now = Instant::now();
        let min_gap = Duration::from_secs(1) / self.config.cursor_rate.max(1);
        let relay = {
            let mut cursors = self.cursors.locked();
            let state = cursors
                .entry((c.doc_id.clone(), c.session_id.clone()))
                .or_insert_with(|| CursorState {
                    cursor: c.clone(),
                    last_relay: None,
                    last_move: now,
                    settled: true,
                });
            state.cursor = c.clone();
            state.last_move = now;
            state.settled = false;
            let due = state.last_relay.is_none_or(|t| now - t >= min_gap);
            if due {
                state.last_relay = Some(now);
            }
            due
        };
        if relay {
            let data = Bytes::from(
                v1::Datagram {
                    kind: Some(v1::datagram::Kind::Cursor(c.clone())),
                }
                .encode_to_vec(),
            );
            self.deps
                .hub
                .datagram(&topic(&c.doc_id), &c.session_id, &data);
        }
    }

    /// Sends, reliably, every cursor that stopped moving and was not sent so yet.
    fn settle(&self) {
        let now = Instant::now();
        let due: Vec<v1::DocCursor> = {
            let mut cursors = self.cursors.locked();
            cursors
                .values_mut()
                .filter(|s| !s.settled && now - s.last_move >= self.config.cursor_settle)
                .map(|s| {
                    s.settled = true;
                    s.cursor.clone()
                })
                .collect()
        };
        for c in due {
            let push = v1::Push {
                stream: String::new(),
                offset: 0,
                event: Some(push::Event::DocCursor(c.clone())),
            };
            for s in self.deps.hub.subscribers(&topic(&c.doc_id)) {
                if s.session_id() != c.session_id {
                    let _ = s.push(StreamKind::Collab, push.clone());
                }
            }
        }
    }

    /// The loaded document, loading it from redb if needed. `None`: no such document.
    async fn load(&self, id: &str) -> ServiceResult<Option<Loaded<DocState>>> {
        let read = || {
            let mut doc = self.read_doc(id)?;
            if let Some(d) = &mut doc {
                d.unpublished_after = self.retired.locked().remove(id);
            }
            Ok::<_, StoreError>(doc)
        };
        Ok(self.docs.get_or_load(id, read).await?)
    }

    fn read_doc(&self, id: &str) -> Result<Option<DocState>, StoreError> {
        let txn = self.deps.store.db().begin_read()?;
        let Some(meta) = txn.open_table(DOCS)?.get(id)? else {
            return Ok(None);
        };
        let meta: DocMeta = serde_json::from_slice(meta.value()).map_err(corrupt)?;
        let snap: StoredSnapshot = match txn.open_table(SNAPSHOTS)?.get(id)? {
            Some(s) => serde_json::from_slice(s.value()).map_err(corrupt)?,
            None => return Err(corrupt(format!("document {id} has no snapshot"))),
        };
        // The log holds up to `history` operations before the snapshot and every
        // one after it. Replay those after it; keep the last `history` for catch-up.
        let mut text = snap.text;
        let mut revision = snap.revision;
        let mut history = VecDeque::new();
        let mut log = VecDeque::new();
        let ops = txn.open_table(OPS)?;
        for entry in ops.range((id, 0)..=(id, u64::MAX))? {
            let (key, value) = entry?;
            let rev = key.value().1;
            let stored: StoredOp = serde_json::from_slice(value.value()).map_err(corrupt)?;
            if rev > revision {
                if rev != revision + 1 {
                    return Err(corrupt(format!(
                        "document {id}: revision {rev} after {revision}"
                    )));
                }
                text = stored.op.apply(&text).map_err(corrupt)?;
                revision = rev;
            }
            log.push_back(v1::DocOperation {
                doc_id: id.to_owned(),
                revision: rev,
                op: Some(op_to_wire(&stored.op)),
                user_id: stored.user,
                client_id: stored.client_id,
                seq: stored.seq,
            });
            history.push_back(stored.op);
            if history.len() > self.config.history {
                history.pop_front();
                log.pop_front();
            }
        }
        let mut clients = HashMap::new();
        for entry in txn.open_table(CLIENTS)?.range((id, "")..)? {
            let (key, value) = entry?;
            let (doc, client) = key.value();
            if doc != id {
                break;
            }
            clients.insert(client.to_owned(), value.value());
        }
        let authority = Authority::at_revision(text, revision)
            .with_max_history(self.config.history)
            .with_history(history)
            .map_err(corrupt)?;
        Ok(Some(DocState {
            id: id.to_owned(),
            meta,
            authority,
            log,
            clients,
            snapshot_revision: snap.revision,
            present: BTreeMap::new(),
            broken: false,
            unpublished_after: None,
        }))
    }
}

impl CollabService {
    /// One retention batch (`prune_batch`, below). A batch that fails
    /// leaves the cursor where it was, so the next one looks at the same rows
    /// again (and a command of the log applied again does the same work).
    pub async fn prune(&self, budget: usize) -> ServiceResult<(u64, u64)> {
        super::retention::restoring_cursor(&self.prune_cursors, self.prune_batch(budget)).await
    }

    /// One retention batch (see [`super::retention`]): looks at up to `budget`
    /// duplicate-detection rows and `budget` access rows after the previous
    /// batch's, and removes (a) a client's row once its last operation is more
    /// than `history` operations old, or its document is gone, and (b) access rows
    /// of documents that are gone. Returns (dedup rows, access rows) removed.
    async fn prune_batch(&self, budget: usize) -> ServiceResult<(u64, u64)> {
        let history = self.config.history as u64;
        let [after_clients, after_access] = self.prune_cursors.locked().clone();
        let mut stale_clients: Vec<(String, String, (u64, u64))> = Vec::new();
        let mut stale_access: Vec<(String, String)> = Vec::new();
        let (mut next_clients, mut next_access) = (None, None);
        {
            let txn = self.deps.store.db().begin_read()?;
            let docs = txn.open_table(DOCS)?;
            let mut last_of: HashMap<String, Option<u64>> = HashMap::new();
            let mut last_revision = |doc: &str| -> ServiceResult<Option<u64>> {
                if let Some(v) = last_of.get(doc) {
                    return Ok(*v);
                }
                let v = match docs.get(doc)? {
                    Some(_) => Some(self.log.last_offset_in_read(&txn, doc)?),
                    None => None,
                };
                last_of.insert(doc.to_owned(), v);
                Ok(v)
            };
            let clients = txn.open_table(CLIENTS)?;
            let from = (after_clients.0.as_str(), after_clients.1.as_str());
            let range = (std::ops::Bound::Excluded(from), std::ops::Bound::Unbounded);
            let mut seen = 0;
            for entry in clients.range::<(&str, &str)>(range)?.take(budget) {
                let (key, value) = entry?;
                let (doc, client) = key.value();
                let (seq, revision) = value.value();
                seen += 1;
                let stale = match last_revision(doc)? {
                    None => true,
                    Some(last) => revision.saturating_add(history) < last,
                };
                if stale {
                    stale_clients.push((doc.to_owned(), client.to_owned(), (seq, revision)));
                }
                next_clients = Some((doc.to_owned(), client.to_owned()));
            }
            if seen < budget {
                next_clients = None;
            }
            let access = txn.open_table(USER_DOCS)?;
            let from = (after_access.0.as_str(), after_access.1.as_str());
            let range = (std::ops::Bound::Excluded(from), std::ops::Bound::Unbounded);
            let mut seen = 0;
            for entry in access.range::<(&str, &str)>(range)?.take(budget) {
                let (key, _) = entry?;
                let (user, doc) = key.value();
                seen += 1;
                if last_revision(doc)?.is_none() {
                    stale_access.push((user.to_owned(), doc.to_owned()));
                }
                next_access = Some((user.to_owned(), doc.to_owned()));
            }
            if seen < budget {
                next_access = None;
            }
        }
        *self.prune_cursors.locked() = [
            next_clients.unwrap_or_default(),
            next_access.unwrap_or_default(),
        ];
        if stale_clients.is_empty() && stale_access.is_empty() {
            return Ok((0, 0));
        }
        let counts = Arc::new(Mutex::new((0u64, 0u64)));
        let out = counts.clone();
        self.deps
            .writer
            .write(move |txn| {
                let docs = txn.open_table(DOCS)?;
                let mut clients = txn.open_table(CLIENTS)?;
                let mut n = (0, 0);
                for (doc, client, row) in &stale_clients {
                    // Only if no operation of that client came meanwhile.
                    let current = clients
                        .get((doc.as_str(), client.as_str()))?
                        .map(|v| v.value());
                    if current == Some(*row) {
                        clients.remove((doc.as_str(), client.as_str()))?;
                        n.0 += 1;
                    }
                }
                let mut access = txn.open_table(USER_DOCS)?;
                for (user, doc) in &stale_access {
                    if docs.get(doc.as_str())?.is_none() {
                        access.remove((user.as_str(), doc.as_str()))?;
                        n.1 += 1;
                    }
                }
                *out.locked() = n;
                Ok(())
            })
            .await?;
        let n = *counts.locked();
        Ok(n)
    }
}

/// Fills `collab_user_docs` from `collab_docs` when the index is empty but documents
/// exist (a database written before the index was kept). Every document indexes its
/// owner, so a non-empty `collab_docs` never leaves the index empty otherwise.
fn index_existing_docs(txn: &redb::WriteTransaction) -> Result<(), StoreError> {
    let mut index = txn.open_table(USER_DOCS)?;
    if !index.is_empty()? {
        return Ok(());
    }
    let docs = txn.open_table(DOCS)?;
    for entry in docs.iter()? {
        let (id, meta) = entry?;
        let id = id.value();
        let meta: DocMeta = serde_json::from_slice(meta.value()).map_err(corrupt)?;
        let owner = meta.owner.as_str();
        index.insert((owner, id), (DocRole::Owner as i32, owner))?;
        for (user, role) in &meta.acl {
            index.insert((user.as_str(), id), (*role, owner))?;
        }
    }
    Ok(())
}

async fn settle_cursors(service: Weak<CollabService>, stop: CancellationToken) {
    let period = match service.upgrade() {
        Some(s) => (s.config.cursor_settle / 2).max(Duration::from_millis(10)),
        None => return,
    };
    let mut tick = tokio::time::interval(period);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        match service.upgrade() {
            Some(s) => s.settle(),
            None => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use futures_util::FutureExt;

    use super::*;
    use crate::services::fakes::{FakeSession, Node};

    fn insert(at: usize, text: &str, len: usize) -> Option<v1::TextOp> {
        Some(op_to_wire(
            &TextOperation::new()
                .retain(at)
                .insert(text)
                .retain(len - at),
        ))
    }

    /// While one operation's commit is held, the operations that arrive for the
    /// document wait; one write then stores all of them, each transformed
    /// against those before it, answered with its own revision and pushed in
    /// revision order. Refusals, a resend and a base older than the history are
    /// answered among them.
    #[tokio::test]
    async fn edits_waiting_on_a_document_share_one_commit() {
        let node = Node::new();
        let config = CollabConfig {
            history: 2,
            ..Default::default()
        };
        let (collab, _work) = CollabService::open(node.deps.clone(), config).unwrap();
        let (alice, mut pushes) = FakeSession::new("alice", "a", 64);
        let alice = alice.ctx();
        let [bob, carol, dave] =
            ["bob", "carol", "dave"].map(|u| FakeSession::new(u, u, 64).0.ctx());
        collab
            .create(
                &alice,
                v1::DocCreateRequest {
                    doc_id: "d".into(),
                    text: "abc".into(),
                },
            )
            .await
            .unwrap();
        for (user, role) in [
            ("bob", DocRole::Editor),
            ("carol", DocRole::Viewer),
            ("dave", DocRole::Editor),
        ] {
            let req = v1::DocShareRequest {
                doc_id: "alice~d".into(),
                user_id: user.into(),
                role: role as i32,
            };
            collab.share(&alice, req).await.unwrap();
        }
        for who in [&alice, &bob, &carol, &dave] {
            let req = v1::DocOpenRequest {
                doc_id: "alice~d".into(),
                known_revision: None,
            };
            collab.open_doc(who, req).await.unwrap();
        }
        let submit = |who: &SessionCtx, client: &str, seq, base, op| {
            let req = v1::DocSubmitRequest {
                doc_id: "alice~d".into(),
                client_id: client.into(),
                seq,
                base_revision: base,
                op,
            };
            let (collab, who) = (&collab, who.clone());
            Box::pin(async move { collab.submit(&who, req).await })
        };
        let hold = node.deps.writer.hold();
        // "abc" → "Aabc" at revision 1, held in its commit.
        let mut edits = vec![submit(&alice, "a", 1, 0, insert(0, "A", 3))];
        node.until_committing(&mut edits[0]).await;
        for (who, client, seq, base, op) in [
            // Made on "abc": transformed to "AabcB".
            (&bob, "b", 1, 0, insert(3, "B", 3)),
            (&carol, "c", 1, 1, insert(0, "C", 4)),
            // Made on "Aabc": "AabcB" → "AXabcB".
            (&alice, "a", 2, 1, insert(1, "X", 4)),
            (&bob, "b", 1, 0, insert(3, "B", 3)),
            // Three revisions behind, with two kept.
            (&dave, "d", 1, 0, insert(0, "D", 3)),
        ] {
            let mut e = submit(who, client, seq, base, op);
            assert!(
                e.as_mut().now_or_never().is_none(),
                "waits for the document"
            );
            edits.push(e);
        }
        assert_eq!(collab.waiting.queued("alice~d"), 5);
        let before = node.deps.metrics.writes_committed.load(Ordering::Relaxed);
        drop(hold);
        let answers: Vec<_> = futures_util::future::join_all(edits)
            .await
            .into_iter()
            .map(|r| match r {
                Ok(r) => Ok((r.revision, r.duplicate)),
                Err(e) => Err((e.code, e.detail)),
            })
            .collect();
        let writes = node.deps.metrics.writes_committed.load(Ordering::Relaxed) - before;
        assert_eq!(
            writes, 2,
            "the first operation's write, then one for the rest"
        );
        let resync = v1::error::Detail::Resync(v1::DocSnapshot {
            doc_id: "alice~d".into(),
            revision: 3,
            text: "AXabcB".into(),
        });
        assert_eq!(
            answers,
            [
                Ok((1, false)),
                Ok((2, false)),
                Err((ErrorCode::PermissionDenied, None)),
                Ok((3, false)),
                Ok((2, true)),
                Err((ErrorCode::ResyncRequired, Some(resync))),
            ]
        );
        let mut pushed = Vec::new();
        while let Ok((_, p)) = pushes.try_recv() {
            if let Some(push::Event::DocOperation(op)) = p.event {
                pushed.push((op.revision, op.user_id));
            }
        }
        let expected = [(1, "alice"), (2, "bob"), (3, "alice")].map(|(r, u)| (r, u.to_owned()));
        assert_eq!(pushed, expected, "published once each, in revision order");
        let stored = collab.read_doc("alice~d").unwrap().unwrap();
        assert_eq!(
            (stored.authority.revision(), stored.authority.doc()),
            (3, "AXabcB")
        );
        let clients = |k: &str| {
            stored
                .clients
                .get(&dedup_key(k, k.get(..1).unwrap()))
                .copied()
        };
        assert_eq!(
            (clients("alice"), clients("bob"), clients("dave")),
            (Some((2, 3)), Some((1, 2)), None)
        );
        assert_eq!(collab.waiting.queued("alice~d"), 0);
    }
}
