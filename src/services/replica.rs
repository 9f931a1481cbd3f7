//! Writes as replicated commands: how the nodes of a cluster keep identical state.
//!
//! On one node the services change their tables directly. In a cluster every
//! change of shared state is first a [`Command`] in a totally ordered, replicated
//! log (JetStream, in `crate::cluster`); every node applies every command, in log
//! order, through the same service code ([`Services::apply`]). Inputs that would
//! differ between nodes are fixed in the command: its time and the seed of every
//! random id it makes ([`crate::clock::replay`]), and rate limits are checked once,
//! by the node that proposes the command. So each node's database is the same
//! function of the same log: offsets and revisions are dense and identical
//! everywhere, and a node's database is a materialised view that can be dropped
//! and rebuilt from the log.
//!
//! The node a request arrives on proposes it and answers the client with the
//! result of its own application of the command; nothing is acknowledged before
//! the log has the command. Reads (history, lists, opening a document) are
//! answered from the node's own view.

use std::sync::Arc;

use futures_util::future::BoxFuture;

use super::{ServiceError, ServiceResult, Services, SessionCtx};
use crate::hub::{SlowConsumer, Subscriber};
use crate::ids::{RoomId, UserId};
use crate::protocol::ErrorCode;
use crate::protocol::v1::{self, request, response};
use bytes::Bytes;
use prost::Message;

/// One change of shared state, as the log carries it.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Command {
    /// The node that proposed it.
    #[prost(string, tag = "1")]
    pub origin: String,
    /// Unique among the origin's commands (a random base and a counter).
    #[prost(uint64, tag = "2")]
    pub id: u64,
    /// The time every node applies it at (milliseconds since the Unix epoch).
    #[prost(uint64, tag = "3")]
    pub time_ms: u64,
    /// The seed of the random ids it makes.
    #[prost(uint64, tag = "4")]
    pub seed: u64,
    /// The session it comes from (empty for the server API).
    #[prost(string, tag = "5")]
    pub session: String,
    /// The user it comes from (empty for the server API).
    #[prost(string, tag = "6")]
    pub user: String,
    /// The user's roles.
    #[prost(string, repeated, tag = "7")]
    pub roles: Vec<String>,
    /// What it does.
    #[prost(oneof = "Op", tags = "8, 9, 10, 11, 12, 13, 14, 15, 16")]
    pub op: Option<Op>,
}

/// What a [`Command`] does.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Op {
    /// A client request ([`v1::Request`] encoded, id 0).
    #[prost(bytes = "vec", tag = "8")]
    Request(Vec<u8>),
    /// The session connected (presence).
    #[prost(bool, tag = "9")]
    Connected(bool),
    /// The session ended (presence).
    #[prost(bool, tag = "10")]
    Disconnected(bool),
    /// Every session of this node (its id) is gone: the node died or restarted.
    #[prost(string, tag = "11")]
    NodeGone(String),
    /// Server API: a notification (JSON of [`ApiNotify`]).
    #[prost(bytes = "vec", tag = "12")]
    ApiNotify(Vec<u8>),
    /// Server API: a system message (JSON of [`ApiPost`]).
    #[prost(bytes = "vec", tag = "13")]
    ApiPost(Vec<u8>),
    /// Server API: a participant added (JSON of [`ApiAddMember`]).
    #[prost(bytes = "vec", tag = "14")]
    ApiAddMember(Vec<u8>),
    /// The session opened or closed a document (who is here, on every node).
    #[prost(message, tag = "15")]
    DocPresence(DocPresence),
    /// A run of periodic pruning (`crate::services::retention`): every node removes
    /// the same rows at the same point of the log.
    #[prost(message, tag = "16")]
    Prune(Prune),
}

/// A run of periodic pruning, as a command. Every node proposes one each
/// `retention.interval` of its own; applying them in log order, at the command's
/// time, makes every node remove the same rows, so that what a later command finds
/// (an idempotency record, a room) is the same everywhere.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Prune {
    /// Idempotency records only: the follow-up of a run whose batch was full.
    #[prost(bool, tag = "1")]
    pub records_only: bool,
    /// The proposer's `retention.interval` in milliseconds. A full run less than
    /// half of it (in command time, either way) from the previous full run is
    /// skipped, so that nodes proposing on their own timers prune once or twice
    /// per interval.
    #[prost(uint64, tag = "2")]
    pub every_ms: u64,
}

/// A session opened or closed a document.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DocPresence {
    /// The document.
    #[prost(string, tag = "1")]
    pub doc_id: String,
    /// Opened (true) or closed.
    #[prost(bool, tag = "2")]
    pub joined: bool,
}

/// The server API's notification, as a command carries it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ApiNotify {
    /// Who gets it.
    pub user: String,
    /// What.
    pub notification: super::notify::NewNotification,
    /// The `Idempotency-Key`.
    pub key: Option<String>,
}

/// The server API's system message, as a command carries it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ApiPost {
    /// The room.
    pub room: String,
    /// The text.
    pub text: String,
}

/// The server API's direct add, as a command carries it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ApiAddMember {
    /// The room.
    pub room: String,
    /// Who joins.
    pub user: String,
    /// As an admin.
    pub admin: bool,
}

/// What applying a command gave.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// A client request's answer.
    Response(ServiceResult<response::Body>),
    /// A notification and whether it was a replay of an earlier one.
    Notified(ServiceResult<(v1::Notification, bool)>),
    /// A system message.
    Posted(ServiceResult<v1::ChatMessage>),
    /// The room after a direct add.
    Added(ServiceResult<v1::Room>),
    /// A pruning run: whether a batch of idempotency records was full (more may
    /// be left, and the proposer follows up).
    Pruned(ServiceResult<bool>),
    /// Done (presence and node changes answer nothing).
    Done,
}

/// Puts commands in the cluster's log and reports their local application.
pub trait Replicator: Send + Sync + std::fmt::Debug {
    /// Appends `op` (from `ctx`, if a session) to the log and returns the outcome
    /// of this node's application of it. Fails with `UNAVAILABLE` when the log
    /// could not take it: then nothing was acknowledged.
    fn propose(&self, op: Op, ctx: Option<SessionCtx>) -> BoxFuture<'_, ServiceResult<Outcome>>;

    /// Waits until this node has applied every command the log held when it was
    /// called (bounded; gives up quietly when the log cannot be reached), so that
    /// a session starting here sees every write acknowledged anywhere before.
    fn sync(&self) -> BoxFuture<'_, ()>;
}

/// Whether a request changes shared state (and so goes through the log in a
/// cluster). Reads and per-session requests are answered by the node itself.
pub fn is_write(body: &request::Body) -> bool {
    use request::Body as Rq;
    matches!(
        body,
        Rq::RoomCreate(_)
            | Rq::RoomAdd(_)
            | Rq::RoomRemove(_)
            | Rq::RoomLeave(_)
            | Rq::ChatSend(_)
            | Rq::ChatMarkRead(_)
            | Rq::RoomInviteAccept(_)
            | Rq::RoomInviteDecline(_)
            | Rq::NotifyMarkRead(_)
            | Rq::NotifyMarkAllRead(_)
            | Rq::PresenceSet(_)
            | Rq::ContactRequest(_)
            | Rq::ContactAccept(_)
            | Rq::ContactRemove(_)
            | Rq::DocCreate(_)
            | Rq::DocShare(_)
            | Rq::DocSubmit(_)
    )
}

/// The rate limit a write counts against, checked by the proposing node only.
fn rate_action(body: &request::Body) -> Option<super::rate::Action> {
    use super::rate::Action;
    use request::Body as Rq;
    match body {
        Rq::ChatSend(_) => Some(Action::ChatSend),
        Rq::DocSubmit(_) => Some(Action::DocSubmit),
        Rq::RoomCreate(_) => Some(Action::RoomCreate),
        Rq::ContactRequest(_) => Some(Action::ContactRequest),
        Rq::PresenceSet(_) => Some(Action::PresenceSet),
        _ => None,
    }
}

/// A session of another node, as this node's services see it while applying that
/// node's commands: it has a user and an id, and nothing is delivered to it here
/// (its own node delivers to it).
#[derive(Debug)]
pub struct RemoteSession {
    session: String,
    user: String,
}

impl RemoteSession {
    /// The session `session` of `user`, connected to another node.
    pub fn new(session: String, user: String) -> Self {
        Self { session, user }
    }
}

impl Subscriber for RemoteSession {
    fn session_id(&self) -> &str {
        &self.session
    }
    fn user_id(&self) -> &str {
        &self.user
    }
    fn push(&self, _kind: v1::StreamKind, _push: v1::Push) -> Result<(), SlowConsumer> {
        Ok(())
    }
    fn push_frame(&self, _kind: v1::StreamKind, _frame: Bytes) -> Result<(), SlowConsumer> {
        Ok(())
    }
    fn push_wait(
        &self,
        _kind: v1::StreamKind,
        _push: v1::Push,
    ) -> BoxFuture<'_, Result<(), SlowConsumer>> {
        Box::pin(async { Ok(()) })
    }
    fn datagram(&self, _data: Bytes) {}
    fn is_remote(&self) -> bool {
        true
    }
}

fn json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("plain data serializes")
}

fn decode<T: serde::de::DeserializeOwned>(b: &[u8]) -> ServiceResult<T> {
    serde_json::from_slice(b).map_err(|e| ServiceError::internal(format!("bad command: {e}")))
}

fn unexpected(what: &str) -> ServiceError {
    ServiceError::internal(format!("unexpected outcome of {what}"))
}

impl Services {
    /// Sets the cluster's replicator: from now on writes go through its log.
    pub fn set_replicator(&self, replicator: Arc<dyn Replicator>) {
        let _ = self.replicator.set(replicator);
    }

    /// The replicator, in a cluster.
    pub(super) fn replicator(&self) -> Option<&Arc<dyn Replicator>> {
        self.replicator.get()
    }

    /// A write request in a cluster: checked here (rate, an open document), then
    /// proposed; the answer is this node's application of it.
    pub(super) async fn propose_request(
        &self,
        replicator: &Arc<dyn Replicator>,
        ctx: &SessionCtx,
        body: request::Body,
    ) -> ServiceResult<response::Body> {
        if let Some(action) = rate_action(&body) {
            self.deps_rates().check(action, ctx.user_id())?;
        }
        if let request::Body::DocSubmit(r) = &body {
            self.collab.require_open(ctx, &r.doc_id)?;
        }
        let bytes = v1::Request {
            id: 0,
            body: Some(body),
        }
        .encode_to_vec();
        match replicator
            .propose(Op::Request(bytes), Some(ctx.clone()))
            .await?
        {
            Outcome::Response(r) => r,
            _ => Err(unexpected("a request")),
        }
    }

    /// In a cluster, tells every node that the session opened (`joined`) or closed
    /// a document, so that their sessions see who is here. Best effort: a failure
    /// only delays it to the session's end.
    pub(super) async fn doc_presence(&self, ctx: &SessionCtx, doc_id: &str, joined: bool) {
        if let Some(r) = self.replicator() {
            let op = Op::DocPresence(DocPresence {
                doc_id: doc_id.to_owned(),
                joined,
            });
            if let Err(e) = r.propose(op, Some(ctx.clone())).await {
                tracing::warn!(error = %e.message, "announcing a document's participant to the cluster");
            }
        }
    }

    /// A session connected: in a cluster every node learns it (presence).
    pub(super) async fn presence_connected(&self, ctx: &SessionCtx) {
        match self.replicator() {
            None => self.presence.connected(ctx).await,
            Some(r) => {
                if let Err(e) = r.propose(Op::Connected(true), Some(ctx.clone())).await {
                    tracing::warn!(error = %e.message, "announcing a session to the cluster");
                }
            }
        }
    }

    /// A session ended: in a cluster every node learns it (presence).
    pub(super) async fn presence_disconnected(&self, ctx: &SessionCtx) {
        match self.replicator() {
            None => self.presence.disconnected(ctx).await,
            Some(r) => {
                if let Err(e) = r.propose(Op::Disconnected(true), Some(ctx.clone())).await {
                    tracing::warn!(error = %e.message, "announcing a session's end to the cluster");
                }
            }
        }
    }

    /// Server API: creates a notification (once per idempotency key).
    pub async fn api_notify(
        &self,
        user: &UserId,
        notification: super::notify::NewNotification,
        key: Option<&str>,
    ) -> ServiceResult<(v1::Notification, bool)> {
        let Some(r) = self.replicator() else {
            return self.notify.create_once(user, notification, key).await;
        };
        let op = Op::ApiNotify(json(&ApiNotify {
            user: user.as_str().to_owned(),
            notification,
            key: key.map(str::to_owned),
        }));
        match r.propose(op, None).await? {
            Outcome::Notified(n) => n,
            _ => Err(unexpected("a notification")),
        }
    }

    /// Server API: posts a system message.
    pub async fn api_post(&self, room: &RoomId, text: String) -> ServiceResult<v1::ChatMessage> {
        let Some(r) = self.replicator() else {
            return self
                .chat
                .post(room, super::chat::Sender::System, text)
                .await;
        };
        let op = Op::ApiPost(json(&ApiPost {
            room: room.as_str().to_owned(),
            text,
        }));
        match r.propose(op, None).await? {
            Outcome::Posted(m) => m,
            _ => Err(unexpected("a message")),
        }
    }

    /// Server API: adds a participant directly.
    pub async fn api_add_member(
        &self,
        room: &RoomId,
        user: &UserId,
        admin: bool,
    ) -> ServiceResult<v1::Room> {
        let Some(r) = self.replicator() else {
            return self.chat.add_member(room, user, admin).await;
        };
        let op = Op::ApiAddMember(json(&ApiAddMember {
            room: room.as_str().to_owned(),
            user: user.as_str().to_owned(),
            admin,
        }));
        match r.propose(op, None).await? {
            Outcome::Added(room) => room,
            _ => Err(unexpected("an add")),
        }
    }

    /// Applies one command of the log. `ctx` is the session it came from when that
    /// session is on this node (its answers and subscriptions go to it); else the
    /// command's session is a [`RemoteSession`]. Run it inside
    /// [`crate::clock::replay::scope`] with the command's time and seed.
    pub async fn apply(&self, command: &Command, ctx: Option<SessionCtx>) -> Outcome {
        let ctx = || {
            ctx.clone().unwrap_or_else(|| SessionCtx {
                subscriber: Arc::new(RemoteSession::new(
                    command.session.clone(),
                    command.user.clone(),
                )),
                roles: command.roles.clone().into(),
            })
        };
        let Some(op) = &command.op else {
            return Outcome::Done;
        };
        match op {
            Op::Request(bytes) => {
                let body = match v1::Request::decode(bytes.as_slice()) {
                    Ok(v1::Request {
                        body: Some(body), ..
                    }) if is_write(&body) => body,
                    _ => {
                        return Outcome::Response(Err(ServiceError::new(
                            ErrorCode::UnknownRequest,
                            "not a replicated request",
                        )));
                    }
                };
                let answer = self.handle_local(&ctx(), body).await;
                Outcome::Response(answer.unwrap_or_else(|| {
                    Err(ServiceError::new(
                        ErrorCode::UnknownRequest,
                        "unknown request",
                    ))
                }))
            }
            Op::Connected(_) => {
                self.presence.connected(&ctx()).await;
                Outcome::Done
            }
            Op::Disconnected(_) => {
                let ctx = ctx();
                self.presence.disconnected(&ctx).await;
                if ctx.subscriber.is_remote() {
                    self.collab.remote_gone(ctx.session_id(), ctx.user_id());
                }
                Outcome::Done
            }
            Op::NodeGone(node) => {
                for (session, user) in self.presence.sessions_of_node(node) {
                    self.collab.remote_gone(&session, &user);
                    let gone = SessionCtx {
                        subscriber: Arc::new(RemoteSession::new(session, user)),
                        roles: Arc::from([]),
                    };
                    self.presence.disconnected(&gone).await;
                }
                Outcome::Done
            }
            Op::DocPresence(p) => {
                // The proposing node has already told its own sessions.
                let ctx = ctx();
                if ctx.subscriber.is_remote() {
                    self.collab.remote_presence(
                        ctx.session_id(),
                        ctx.user_id(),
                        &p.doc_id,
                        p.joined,
                    );
                }
                Outcome::Done
            }
            Op::ApiNotify(b) => Outcome::Notified(match decode::<ApiNotify>(b) {
                Ok(n) => match UserId::parse(n.user) {
                    Ok(user) => {
                        self.notify
                            .create_once(&user, n.notification, n.key.as_deref())
                            .await
                    }
                    Err(e) => Err(e.into()),
                },
                Err(e) => Err(e),
            }),
            Op::ApiPost(b) => Outcome::Posted(match decode::<ApiPost>(b) {
                Ok(p) => match RoomId::parse(p.room) {
                    Ok(room) => {
                        self.chat
                            .post(&room, super::chat::Sender::System, p.text)
                            .await
                    }
                    Err(e) => Err(e.into()),
                },
                Err(e) => Err(e),
            }),
            Op::ApiAddMember(b) => Outcome::Added(match decode::<ApiAddMember>(b) {
                Ok(a) => match (RoomId::parse(a.room), UserId::parse(a.user)) {
                    (Ok(room), Ok(user)) => self.chat.add_member(&room, &user, a.admin).await,
                    (Err(e), _) | (_, Err(e)) => Err(e.into()),
                },
                Err(e) => Err(e),
            }),
            Op::Prune(p) => Outcome::Pruned(self.retention.apply(p).await),
        }
    }
}
