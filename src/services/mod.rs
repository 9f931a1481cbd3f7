//! Domain services. They know users, sessions (as [`Subscriber`]s) and protocol
//! messages, never a QUIC or WebTransport type; each owns its redb tables.

pub mod analytics;
pub mod catch_up;
pub mod chat;
pub mod collab;
#[cfg(any(test, feature = "fuzzing"))]
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) mod fakes;
mod gather;
pub mod notify;
pub mod presence;
pub mod rate;
pub mod replica;
pub mod retention;

use std::sync::Arc;

use futures_util::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::hub::{Hub, Subscriber};
use crate::metrics::Metrics;
use crate::protocol::ErrorCode;
use crate::protocol::v1::{self, request, response};
use crate::store::{Store, Writer};
use crate::util::Unpoisoned;

/// A failed request: a typed code, a message, and optional details.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct ServiceError {
    /// The stable code.
    pub code: ErrorCode,
    /// For people.
    pub message: String,
    /// Machine-readable details.
    pub detail: Option<v1::error::Detail>,
    /// With `RATE_LIMITED`: milliseconds until the request may succeed.
    pub retry_after_ms: Option<u64>,
}

impl ServiceError {
    /// An error with `code` and `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            detail: None,
            retry_after_ms: None,
        }
    }

    /// `RATE_LIMITED`, to be retried after `retry_after_ms`.
    pub fn rate_limited(message: impl Into<String>, retry_after_ms: u64) -> Self {
        Self {
            retry_after_ms: Some(retry_after_ms),
            ..Self::new(ErrorCode::RateLimited, message)
        }
    }

    /// `BAD_REQUEST`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }

    /// `INTERNAL`, logging the cause.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!(%cause, "internal error");
        Self::new(ErrorCode::Internal, "internal error")
    }

    /// The wire form.
    pub fn into_wire(self) -> v1::Error {
        let mut e = v1::Error::new(self.code, self.message);
        e.detail = self.detail;
        e.retry_after_ms = self.retry_after_ms.unwrap_or(0);
        e
    }
}

/// A storage failure is `UNAVAILABLE` (retryable); any other store error is
/// `INTERNAL`.
impl From<crate::store::StoreError> for ServiceError {
    fn from(e: crate::store::StoreError) -> Self {
        if e.is_unavailable() {
            tracing::warn!(cause = %e, "storage unavailable");
            return Self::new(
                ErrorCode::Unavailable,
                "storage is unavailable; retry with backoff",
            );
        }
        Self::internal(e)
    }
}

macro_rules! internal_from {
    ($($t:ty),*) => {$(
        impl From<$t> for ServiceError {
            fn from(e: $t) -> Self { crate::store::StoreError::Db(e.into()).into() }
        }
    )*};
}
internal_from!(redb::TransactionError, redb::TableError, redb::StorageError);

/// A malformed id is the client's mistake: `BAD_REQUEST`, saying which rule.
impl From<crate::ids::IdError> for ServiceError {
    fn from(e: crate::ids::IdError) -> Self {
        Self::bad_request(e.to_string())
    }
}

/// A stored record's bytes.
fn json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("plain data serializes")
}

/// An append to an offset log that was refused inside a service's own transaction
/// (the service holds the stream's lock, so this is a broken invariant).
fn append_failed(e: crate::store::AppendError) -> crate::store::StoreError {
    match e {
        crate::store::AppendError::Store(e) => e,
        other => crate::store::StoreError::Write(other.to_string()),
    }
}

/// Stored data that does not decode.
fn corrupt(e: impl std::fmt::Display) -> crate::store::StoreError {
    crate::store::StoreError::Corrupt(e.to_string())
}

/// Prunes `records`, one bounded batch per write (so that other writes are not
/// held up), at most `batches` writes, stopping early once a batch finds less to
/// drop. Counts what it drops in `counter`. Returns how many were dropped and
/// whether the last batch was full (so that more may be left).
pub(super) async fn prune(
    deps: &ServiceDeps,
    records: &crate::store::dedup::Dedup,
    keep: crate::store::dedup::Retention,
    batches: usize,
    counter: &std::sync::atomic::AtomicU64,
) -> Result<(usize, bool), crate::store::StoreError> {
    let now = deps.clock.now_ms();
    let mut total = 0;
    for _ in 0..batches {
        let pruned = Arc::new(std::sync::Mutex::new(0));
        let (records, out) = (records.clone(), pruned.clone());
        deps.writer
            .write(move |txn| {
                let n = records.prune_in(txn, now, keep)?;
                *out.locked() = n;
                Ok(())
            })
            .await?;
        let n = *pruned.locked();
        counter.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        total += n;
        if n < crate::store::dedup::PRUNE_BATCH {
            return Ok((total, false));
        }
    }
    Ok((total, batches > 0))
}

/// The topic every session of a user is subscribed to.
pub fn user_topic(user: &str) -> String {
    format!("user/{user}")
}

/// A page of a stream numbered by offset (1, 2, ... `last`), read backwards with a
/// cursor: stable while new entries arrive, unlike skip/limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Page {
    /// The first offset of the page.
    pub from: u64,
    /// The last offset of the page.
    pub to: u64,
}

impl Page {
    /// The page of at most `limit` entries (0 or more than `max`: `max`) before
    /// `before` (0: after the newest). `None` when it would be empty.
    pub fn before(before: u64, limit: u32, max: u32, last: u64) -> Option<Page> {
        let limit = u64::from(if limit == 0 { max } else { limit.min(max) });
        let to = if before == 0 {
            last
        } else {
            (before - 1).min(last)
        };
        (to > 0 && limit > 0).then(|| Page {
            from: to.saturating_sub(limit - 1).max(1),
            to,
        })
    }

    /// Whether older entries exist.
    pub fn more(&self) -> bool {
        self.from > 1
    }

    /// The part of the page a stream that keeps entries from `first` on still has
    /// (`None` when it has none of it). A stream with no entry has `first` 0.
    pub fn kept_from(self, first: u64) -> Option<Page> {
        (first > 0 && first <= self.to).then(|| Page {
            from: self.from.max(first),
            to: self.to,
        })
    }
}

/// A service's configuration section that cannot work: what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidConfig(pub String);

/// The configuration of every service: the sections `[chat]`, `[notify]`,
/// `[presence]`, `[collab]` and `[analytics]` of the node's configuration.
#[derive(Debug, Clone, Default)]
pub struct ServicesConfig {
    /// Chat limits.
    pub chat: chat::ChatConfig,
    /// Room membership rules.
    pub rooms: chat::RoomsConfig,
    /// Notification limits.
    pub notify: notify::NotifyConfig,
    /// Presence settings.
    pub presence: presence::PresenceConfig,
    /// Collaboration settings.
    pub collab: collab::CollabConfig,
    /// Analytics settings.
    pub analytics: analytics::AnalyticsConfig,
    /// Retention of messages, notifications and bookkeeping rows.
    pub retention: retention::RetentionConfig,
    /// The node is part of a cluster: its writes will go through the log set with
    /// [`Services::set_replicator`], and periodic pruning waits for it.
    pub clustered: bool,
}

/// The result of a request handler.
pub type ServiceResult<T> = Result<T, ServiceError>;

/// The authenticated session a request comes from.
#[derive(Debug, Clone)]
pub struct SessionCtx {
    /// The session, for pushes and subscriptions.
    pub subscriber: Arc<dyn Subscriber>,
    /// Roles from the token.
    pub roles: Arc<[String]>,
}

impl SessionCtx {
    /// The user.
    pub fn user_id(&self) -> &str {
        self.subscriber.user_id()
    }

    /// The session id.
    pub fn session_id(&self) -> &str {
        self.subscriber.session_id()
    }
}

/// Everything a service may need from the node.
#[derive(Debug, Clone)]
pub struct ServiceDeps {
    /// The database.
    pub store: Store,
    /// Group-commit writes.
    pub writer: Writer,
    /// Local fan-out.
    pub hub: Arc<Hub>,
    /// Counters and histograms.
    pub metrics: Arc<Metrics>,
    /// Wall-clock time: timestamps, last seen, analytics buckets. Tests set a
    /// manual one. Delays (presence grace, periodic work) run on tokio's clock, so
    /// `tokio::time::pause()` drives them.
    pub clock: Clock,
    /// Per-user write rate limits.
    pub rates: Arc<rate::RateLimits>,
    /// Cancelled when the node shuts down: every [`Background`] future then
    /// finishes what must be finished (the last analytics flush) and returns.
    pub shutdown: CancellationToken,
}

/// Work a service does for as long as the node runs (periodic flushes, timers),
/// returned by its constructor instead of spawned there, so that the node runs
/// and stops all of it in one place. Each ends after [`ServiceDeps::shutdown`].
pub struct Background {
    /// What it is, for logs.
    pub name: &'static str,
    /// The work.
    pub task: BoxFuture<'static, ()>,
}

impl Background {
    /// Names `task`.
    pub fn new(name: &'static str, task: impl Future<Output = ()> + Send + 'static) -> Self {
        Self {
            name,
            task: Box::pin(task),
        }
    }
}

impl std::fmt::Debug for Background {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Background")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// All services of a node.
#[derive(Debug)]
pub struct Services {
    hub: Arc<Hub>,
    rates: Arc<rate::RateLimits>,
    /// In a cluster: the log every write goes through (shared with retention,
    /// which proposes its runs there).
    replicator: Arc<std::sync::OnceLock<Arc<dyn replica::Replicator>>>,
    /// Analytics and metrics streaming.
    pub analytics: Arc<analytics::AnalyticsService>,
    /// Rooms and messages.
    pub chat: Arc<chat::ChatService>,
    /// Collaborative documents.
    pub collab: Arc<collab::CollabService>,
    /// Notifications.
    pub notify: Arc<notify::NotifyService>,
    /// Presence and contacts.
    pub presence: Arc<presence::PresenceService>,
    /// Removal of what the node no longer keeps.
    pub retention: Arc<retention::Retention>,
}

impl Services {
    /// Opens every service over `deps`, and returns their background work for the
    /// caller to run (until `deps.shutdown`).
    pub fn open(
        deps: ServiceDeps,
        config: ServicesConfig,
    ) -> Result<(Self, Vec<Background>), crate::store::StoreError> {
        Self::open_with_analytics(deps.clone(), deps, config)
    }

    /// [`Services::open`] with analytics on a database of its own
    /// (`analytics_deps`): in a cluster the main database is a view of the log,
    /// rebuilt at each start, while analytics counts are the node's own.
    pub fn open_with_analytics(
        deps: ServiceDeps,
        analytics_deps: ServiceDeps,
        config: ServicesConfig,
    ) -> Result<(Self, Vec<Background>), crate::store::StoreError> {
        let chat = chat::ChatService::open(deps.clone(), config.chat, config.rooms)?;
        let (analytics, analytics_work) =
            analytics::AnalyticsService::open(analytics_deps, config.analytics)?;
        let (presence, presence_work) =
            presence::PresenceService::open(deps.clone(), config.presence, chat.clone())?;
        let (collab, collab_work) = collab::CollabService::open(deps.clone(), config.collab)?;
        let contacts: Arc<dyn chat::Contacts> = presence.clone();
        chat.set_contacts(Arc::downgrade(&contacts));
        let notify = notify::NotifyService::open(deps.clone(), config.notify)?;
        let replicator = Arc::new(std::sync::OnceLock::new());
        let (retention, retention_work) = retention::Retention::open(
            config.retention,
            deps.clock.clone(),
            retention::Parts {
                chat: &chat,
                notify: &notify,
                collab: &collab,
                log: config.clustered.then(|| replicator.clone()),
            },
            deps.shutdown.clone(),
        );
        let services = Self {
            hub: deps.hub.clone(),
            rates: deps.rates.clone(),
            replicator,
            analytics,
            presence,
            notify,
            chat,
            collab,
            retention,
        };
        Ok((
            services,
            vec![analytics_work, presence_work, collab_work, retention_work],
        ))
    }

    /// A session completed its handshake; `resume` is its `Hello.resume`.
    ///
    /// Fails when the session's catch-up could not be read (storage failed): the
    /// session is then not subscribed to everything and must be closed.
    pub async fn connected(
        &self,
        ctx: &SessionCtx,
        resume: &std::collections::HashMap<String, u64>,
    ) -> Result<(), crate::store::StoreError> {
        if let Some(r) = self.replicator() {
            r.sync().await;
        }
        self.hub
            .subscribe(&user_topic(ctx.user_id()), ctx.subscriber.clone());
        self.presence_connected(ctx).await;
        self.notify.connected(ctx, resume).await?;
        self.chat.connected(ctx, resume).await
    }

    /// Answers a feature request. `None` means the body is not a feature request.
    /// In a cluster, writes go through the log ([`replica`]).
    pub async fn handle(
        &self,
        ctx: &SessionCtx,
        body: request::Body,
    ) -> Option<ServiceResult<response::Body>> {
        if let Some(r) = self.replicator()
            && replica::is_write(&body)
        {
            return Some(self.propose_request(r, ctx, body).await);
        }
        if self.replicator().is_some() {
            // Who has a document open is shared with the other nodes.
            let closed = match &body {
                request::Body::DocClose(r) => Some(r.doc_id.clone()),
                _ => None,
            };
            let answer = self.handle_local(ctx, body).await;
            match (&answer, closed) {
                (Some(Ok(response::Body::DocOpen(r))), _) => {
                    self.doc_presence(ctx, &r.doc_id, true).await
                }
                (Some(Ok(response::Body::DocClose(_))), Some(doc)) => {
                    self.doc_presence(ctx, &doc, false).await
                }
                _ => {}
            }
            return answer;
        }
        self.handle_local(ctx, body).await
    }

    /// The per-user rate limits.
    pub(crate) fn deps_rates(&self) -> &rate::RateLimits {
        &self.rates
    }

    /// Answers a feature request on this node's own state.
    async fn handle_local(
        &self,
        ctx: &SessionCtx,
        body: request::Body,
    ) -> Option<ServiceResult<response::Body>> {
        use request::Body as Rq;
        use response::Body as Rs;
        Some(match body {
            Rq::RoomCreate(r) => self.chat.create(ctx, r).await.map(Rs::RoomCreate),
            Rq::RoomAdd(r) => self.chat.add(ctx, r).await.map(Rs::RoomAdd),
            Rq::RoomRemove(r) => self.chat.remove(ctx, r).await.map(Rs::RoomRemove),
            Rq::RoomLeave(r) => self.chat.leave(ctx, r).await.map(Rs::RoomLeave),
            Rq::RoomList(r) => self.chat.list(ctx, r).await.map(Rs::RoomList),
            Rq::ChatSend(r) => self.chat.send(ctx, r).await.map(Rs::ChatSend),
            Rq::ChatHistory(r) => self.chat.history(ctx, r).await.map(Rs::ChatHistory),
            Rq::ChatMarkRead(r) => self.chat.mark_read(ctx, r).await.map(Rs::ChatMarkRead),
            Rq::RoomInviteList(_) => self.chat.invites(ctx).await.map(Rs::RoomInviteList),
            Rq::RoomInviteAccept(r) => self.chat.accept(ctx, r).await.map(Rs::RoomInviteAccept),
            Rq::RoomInviteDecline(r) => self.chat.decline(ctx, r).await.map(Rs::RoomInviteDecline),
            Rq::NotifyList(r) => self.notify.list(ctx, r).await.map(Rs::NotifyList),
            Rq::NotifyMarkRead(r) => self.notify.mark_read(ctx, r).await.map(Rs::NotifyMarkRead),
            Rq::NotifyMarkAllRead(_) => self
                .notify
                .mark_all_read(ctx)
                .await
                .map(Rs::NotifyMarkAllRead),
            Rq::PresenceSet(r) => self.presence.set(ctx, r).await.map(Rs::PresenceSet),
            Rq::PresenceGet(r) => self.presence.get(ctx, r).await.map(Rs::PresenceGet),
            Rq::ContactRequest(r) => self
                .presence
                .contact_request(ctx, r)
                .await
                .map(Rs::ContactRequest),
            Rq::ContactAccept(r) => self
                .presence
                .contact_accept(ctx, r)
                .await
                .map(Rs::ContactAccept),
            Rq::ContactRemove(r) => self
                .presence
                .contact_remove(ctx, r)
                .await
                .map(Rs::ContactRemove),
            Rq::ContactList(r) => self
                .presence
                .contact_list(ctx, r)
                .await
                .map(Rs::ContactList),
            Rq::DocCreate(r) => self.collab.create(ctx, r).await.map(Rs::DocCreate),
            Rq::DocShare(r) => self.collab.share(ctx, r).await.map(Rs::DocShare),
            Rq::DocOpen(r) => self.collab.open_doc(ctx, r).await.map(Rs::DocOpen),
            Rq::DocClose(r) => self.collab.close_doc(ctx, r).await.map(Rs::DocClose),
            Rq::DocSubmit(r) => self.collab.submit(ctx, r).await.map(Rs::DocSubmit),
            Rq::DocList(_) => self.collab.list(ctx).await.map(Rs::DocList),
            r @ (Rq::AnalyticsTrack(_)
            | Rq::AnalyticsSeries(_)
            | Rq::AnalyticsTop(_)
            | Rq::AnalyticsDistinctUsers(_)
            | Rq::MetricsSubscribe(_)
            | Rq::MetricsUnsubscribe(_)) => self.analytics.handle(ctx, r).await,
            // Answered by the gateway itself.
            Rq::Echo(_) | Rq::AuthRefresh(_) => return None,
        })
    }

    /// A datagram from a session (already decoded).
    pub fn datagram(&self, ctx: &SessionCtx, dgram: v1::datagram::Kind) {
        match dgram {
            v1::datagram::Kind::Cursor(c) => self.collab.cursor(ctx, c),
            v1::datagram::Kind::Typing(t) => self.chat.typing(ctx, t),
            _ => {}
        }
    }

    /// The session ended.
    pub async fn disconnected(&self, ctx: &SessionCtx) {
        self.hub
            .unsubscribe(&user_topic(ctx.user_id()), ctx.session_id());
        self.chat.disconnected(ctx);
        self.notify.disconnected(ctx);
        self.analytics.disconnected(ctx);
        self.presence_disconnected(ctx).await;
        self.collab.disconnected(ctx).await;
    }
}

#[cfg(test)]
mod tests {
    use super::Page;

    #[test]
    fn pages_walk_back_by_offset() {
        assert_eq!(Page::before(0, 3, 100, 10), Some(Page { from: 8, to: 10 }));
        assert_eq!(Page::before(8, 0, 4, 10), Some(Page { from: 4, to: 7 }));
        assert_eq!(
            Page::before(8, 50, 4, 10),
            Some(Page { from: 4, to: 7 }),
            "capped"
        );
        assert_eq!(Page::before(2, 10, 100, 10), Some(Page { from: 1, to: 1 }));
        assert!(!Page::before(2, 10, 100, 10).unwrap().more());
        assert_eq!(Page::before(1, 10, 100, 10), None);
        assert_eq!(Page::before(0, 10, 100, 0), None, "empty stream");
        assert_eq!(
            Page::before(99, 2, 100, 10),
            Some(Page { from: 9, to: 10 }),
            "clamped"
        );
        assert_eq!(
            Page::before(u64::MAX, 2, 100, 10),
            Some(Page { from: 9, to: 10 }),
            "the largest cursor is the newest page"
        );
        assert_eq!(
            Page::before(0, 2, 100, u64::MAX),
            Some(Page {
                from: u64::MAX - 1,
                to: u64::MAX
            }),
            "a full stream does not wrap"
        );
    }

    #[test]
    fn pages_stop_at_the_oldest_kept_entry() {
        let page = Page::before(0, 5, 100, 10).unwrap();
        assert_eq!(page.kept_from(8), Some(Page { from: 8, to: 10 }));
        assert_eq!(page.kept_from(1), Some(page), "nothing removed");
        assert_eq!(page.kept_from(11), None);
        assert_eq!(page.kept_from(0), None, "an empty stream");
        let older = Page::before(8, 5, 100, 10).unwrap();
        assert_eq!(older.kept_from(8), None, "all of it was removed");
    }
}
