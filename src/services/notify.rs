//! Notifications: created by backends (server API) or by services, persisted with a
//! per-user offset, pushed live to every device of the user, paginated by cursor,
//! marked read by id or all at once, with an exact unread count.
//!
//! The unread count is one stored number per user, changed only under the user's
//! lock and only by notifications that really change state: marking an already
//! read notification, an unknown id, or someone else's id changes nothing.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::catch_up::{CatchUpStream, catch_up};
use super::gather::Gather;
use super::{ServiceDeps, ServiceError, ServiceResult, SessionCtx, append_failed, corrupt};
use crate::util::Unpoisoned;
use futures_util::future::BoxFuture;

use crate::ids::UserId;
use crate::protocol::ErrorCode;
use crate::protocol::v1::{self, StreamKind, push};
use crate::store::dedup::{self, Dedup, Retention};
use crate::store::{AppendError, OffsetLog, RedbLog, StoreError};

/// The notifications' offset log ([`RedbLog`]) keeps them in this table; marking one
/// read rewrites its entry in place.
const NOTES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("notify_notes");
/// user → (last offset, unread count).
const STATE: TableDefinition<&str, (u64, u64)> = TableDefinition::new("notify_state");

/// The resume key of a user's notifications in `Hello.resume`.
pub const RESUME_KEY: &str = "notifications";

/// Lock stripes: a user's writes are serialized on one of these. A write holds
/// its stripe through its commit, so the users of one stripe wait for each
/// other's commits, and with commit pacing a stripe takes about one user's
/// waiting notifications per `commit_interval`. Hence many: with 64, 128
/// concurrent API requests to distinct users went at 5,400–6,100 a second with
/// p99 over 400 ms; with 1,024, at 12,900–18,500 with p99 15–21 ms
/// (docs/BENCHMARKS.md, "Notification bursts"). Each is one small mutex.
const STRIPES: usize = 1024;

/// Notifications to one user stored in one write at most.
const MAX_NOTES_PER_COMMIT: usize = 256;

/// Notification limits (`[notify]` in the configuration file).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NotifyConfig {
    /// The largest page.
    pub max_page: u32,
    /// The longest `kind`, in bytes.
    pub max_kind: usize,
    /// The longest title, in bytes.
    pub max_title: usize,
    /// The longest body, in bytes.
    pub max_body: usize,
    /// The largest `data` JSON document, in bytes.
    pub max_data: usize,
    /// Ids in one mark-read request at most.
    pub max_mark_ids: usize,
    /// Bytes of per-user notification state (offsets) kept cached.
    pub cache_bytes: u64,
    /// How long an `Idempotency-Key` of the server API is remembered: a request
    /// retried later than this creates a new notification.
    #[serde(with = "crate::clock::duration_str")]
    pub idempotency_window: std::time::Duration,
    /// Idempotency keys remembered at most (the oldest are forgotten first).
    pub idempotency_max_keys: u64,
}

impl NotifyConfig {
    /// Checks the section (every value is usable).
    pub fn validate(&self) -> Result<(), super::InvalidConfig> {
        Ok(())
    }
}

impl Default for NotifyConfig {
    fn default() -> Self {
        Self {
            max_page: 100,
            max_kind: 64,
            max_title: 256,
            max_body: 4096,
            max_data: 16 * 1024,
            max_mark_ids: 1000,
            cache_bytes: 16 << 20,
            idempotency_window: std::time::Duration::from_secs(24 * 3600),
            idempotency_max_keys: 1_000_000,
        }
    }
}

/// A notification to create.
#[derive(Debug, Clone, Default, serde::Serialize, Deserialize)]
pub struct NewNotification {
    /// What kind ("mention", ...); 1-64 bytes.
    pub kind: String,
    /// The title.
    #[serde(default)]
    pub title: String,
    /// The body.
    #[serde(default)]
    pub body: String,
    /// Application data as a JSON document (or empty).
    #[serde(default)]
    pub data: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredNote {
    kind: String,
    title: String,
    body: String,
    data: String,
    created_at_ms: u64,
    read: bool,
}

fn wire(user: &str, offset: u64, n: StoredNote) -> v1::Notification {
    v1::Notification {
        notification_id: format!("{user}:{offset}"),
        offset,
        kind: n.kind,
        title: n.title,
        body: n.body,
        data: n.data,
        created_at_ms: n.created_at_ms,
        read: n.read,
    }
}

/// A notification as a push on the user's resumable stream.
fn note_push(note: v1::Notification) -> v1::Push {
    v1::Push {
        stream: RESUME_KEY.into(),
        offset: note.offset,
        event: Some(push::Event::Notification(note)),
    }
}

fn topic(user: &str) -> String {
    format!("notify/{user}")
}

/// A user's notifications as a session catching up sees them.
struct NoteStream<'a> {
    notify: &'a NotifyService,
    ctx: &'a SessionCtx,
}

impl CatchUpStream for NoteStream<'_> {
    type Guard = tokio::sync::OwnedMutexGuard<()>;

    async fn lock(&self) -> Result<Option<(Self::Guard, u64)>, StoreError> {
        let user = self.ctx.user_id();
        let guard = self.notify.stripe(user).clone().lock_owned().await;
        let (last, _) = self.notify.user_state(user).await?;
        Ok(Some((guard, last)))
    }

    fn read(&self, from: u64, to: u64) -> BoxFuture<'_, Result<Vec<v1::Push>, StoreError>> {
        Box::pin(async move {
            Ok(self
                .notify
                .read_range(self.ctx.user_id(), from, to)
                .await?
                .into_iter()
                .map(note_push)
                .collect())
        })
    }

    fn subscribe(&self, _stripe: &mut Self::Guard) {
        self.notify
            .deps
            .hub
            .subscribe(&topic(self.ctx.user_id()), self.ctx.subscriber.clone());
    }

    fn name(&self) -> String {
        RESUME_KEY.into()
    }
}

/// The notification service.
#[derive(Debug)]
pub struct NotifyService {
    deps: ServiceDeps,
    config: NotifyConfig,
    stripes: Vec<Arc<tokio::sync::Mutex<()>>>,
    /// Each user's notifications.
    log: RedbLog,
    /// (user, idempotency key) → the offset of the notification created for it.
    created: Dedup,
    /// user → (last offset, unread, the store's recovery generation when read).
    state: crate::store::cache::Cache<String, (u64, u64, u64)>,
    /// The last user retention looked at (it goes on after them next time).
    prune_cursor: std::sync::Mutex<String>,
    /// Notifications waiting for their user's stripe, by user.
    waiting: Gather<Pending, ServiceResult<(v1::Notification, bool)>>,
}

/// A notification waiting to be stored.
#[derive(Debug)]
struct Pending {
    note: StoredNote,
    /// `note` as stored.
    bytes: Vec<u8>,
    /// Its idempotency record's key.
    key: Option<String>,
}

/// What a write did with one notification.
#[derive(Debug)]
enum Stored {
    /// Appended at this offset.
    Appended(u64),
    /// Its key was used before: the idempotency record (the offset created then).
    Earlier(Vec<u8>),
}

impl NotifyService {
    /// Opens the service, creating its tables.
    pub fn open(deps: ServiceDeps, config: NotifyConfig) -> Result<Arc<Self>, StoreError> {
        let mut txn = deps.store.db().begin_write()?;
        txn.set_quick_repair(true);
        txn.open_table(NOTES)?;
        txn.open_table(STATE)?;
        txn.commit()?;
        let log = RedbLog::open(&deps.store, &deps.writer, "notify_notes", "notify_epochs")?;
        let cache_bytes = config.cache_bytes;
        let created = Dedup::open(&deps.store, "notify_created", "notify_created_age")?;
        Ok(Arc::new(Self {
            deps,
            config,
            log,
            created,
            stripes: (0..STRIPES)
                .map(|_| Arc::new(tokio::sync::Mutex::new(())))
                .collect(),
            state: crate::store::cache::CacheSpec::new(
                cache_bytes,
                std::time::Duration::from_secs(600),
            )
            .build_weighed("notify_state", |user: &String, _| user.len() + 16),
            prune_cursor: std::sync::Mutex::new(String::new()),
            waiting: Gather::default(),
        }))
    }

    fn stripe(&self, user: &str) -> &Arc<tokio::sync::Mutex<()>> {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        user.hash(&mut h);
        &self.stripes[(h.finish() as usize) % STRIPES]
    }

    /// (last offset, unread) of a user; call under the user's stripe.
    ///
    /// Reconciled with the disk: a commit reported failed may have reached it
    /// anyway (an fsync that wrote and then reported an error), leaving
    /// notifications stored but never published, after the last offset cached.
    /// Once the database was reopened since the cached state was read, the
    /// stored state is read again and those notifications are published, in
    /// order, once. Costs one atomic load while nothing was reopened.
    async fn user_state(&self, user: &str) -> Result<(u64, u64), StoreError> {
        // Before any read: a recovery meanwhile makes the state look older than it
        // is (reconciled once more for nothing), never newer.
        let generation = self.deps.store.reopens();
        let cached = self.state.get(user).await;
        if let Some((last, unread, g)) = cached
            && g == generation
        {
            return Ok((last, unread));
        }
        let stored = self.stored_state(user)?;
        if let Some((last, _, _)) = cached {
            self.publish_stored(user, last, stored.0).await?;
        }
        self.state
            .insert(user.to_owned(), (stored.0, stored.1, generation))
            .await;
        Ok(stored)
    }

    /// Caches a user's (last offset, unread) as it is on disk now. Call under the
    /// user's stripe, with the state [`user_state`](Self::user_state) gave moved
    /// by this node's own committed writes.
    async fn remember(&self, user: &str, (last, unread): (u64, u64)) {
        let generation = self.deps.store.reopens();
        self.state
            .insert(user.to_owned(), (last, unread, generation))
            .await;
    }

    fn validate(&self, n: &NewNotification) -> ServiceResult<()> {
        let c = &self.config;
        if n.kind.is_empty() || n.kind.len() > c.max_kind {
            return Err(ServiceError::bad_request(format!(
                "kind must be 1-{} bytes",
                c.max_kind
            )));
        }
        if n.title.len() > c.max_title || n.body.len() > c.max_body || n.data.len() > c.max_data {
            return Err(ServiceError::new(
                ErrorCode::LimitExceeded,
                format!(
                    "title, body and data hold at most {}, {} and {} bytes",
                    c.max_title, c.max_body, c.max_data
                ),
            ));
        }
        if !n.data.is_empty() && serde_json::from_str::<serde::de::IgnoredAny>(&n.data).is_err() {
            return Err(ServiceError::bad_request("data must be a JSON document"));
        }
        Ok(())
    }

    /// Creates a notification for `user`: committed, then pushed to their devices.
    pub async fn create(
        &self,
        user: &UserId,
        n: NewNotification,
    ) -> ServiceResult<v1::Notification> {
        Ok(self.create_once(user, n, None).await?.0)
    }

    /// [`create`](Self::create), once per (`user`, `key`): if a notification was
    /// created with the same key, that one is returned (with `true`) and nothing
    /// is stored or pushed.
    ///
    /// Notifications to one user wait for the user's stripe together: whoever
    /// takes it stores every one queued for the user (up to
    /// `MAX_NOTES_PER_COMMIT`) in one write, then publishes them in offset order
    /// and answers each, so a burst to one user is not one commit per
    /// notification.
    pub async fn create_once(
        &self,
        user: &UserId,
        n: NewNotification,
        key: Option<&str>,
    ) -> ServiceResult<(v1::Notification, bool)> {
        let user = user.as_str();
        self.validate(&n)?;
        let note = StoredNote {
            kind: n.kind,
            title: n.title,
            body: n.body,
            data: n.data,
            created_at_ms: self.deps.clock.now_ms(),
            read: false,
        };
        let pending = Pending {
            bytes: serde_json::to_vec(&note).expect("plain data"),
            note,
            key: key.map(|k| dedup::key(&[user, k])),
        };
        let stripe = async { Ok::<_, ServiceError>(self.stripe(user).lock().await) };
        self.waiting
            .wait_or_serve(user, pending, stripe, &(self, user), |(svc, user), _| {
                Box::pin(svc.create_waiting(user))
            })
            .await?
            .into_result(
                "the notification was interrupted and may have been stored; \
                 retry with the same Idempotency-Key",
            )
    }

    /// Stores the notifications waiting for `user` in one write, publishes them
    /// in offset order and answers each. Returns how many it took. Call under the
    /// user's stripe.
    async fn create_waiting(&self, user: &str) -> usize {
        let taken = self.waiting.take(user, MAX_NOTES_PER_COMMIT);
        let count = taken.len();
        if count == 0 {
            return 0;
        }
        let (pending, replies): (Vec<_>, Vec<_>) = taken.into_iter().unzip();
        match self.store_notes(user, pending).await {
            Ok(answers) => {
                for (answer, reply) in answers.into_iter().zip(replies) {
                    let _ = reply.send(answer);
                }
            }
            Err(e) => {
                for reply in replies {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
        count
    }

    /// Writes `pending` after the user's last offset in one transaction, each
    /// with its idempotency record, then publishes the new notifications and
    /// returns each one's answer, in order. Retries once caught up if the user's
    /// log moved (a write whose caller gave up, or was told it failed, that still
    /// committed). Call under the user's stripe.
    async fn store_notes(
        &self,
        user: &str,
        pending: Vec<Pending>,
    ) -> ServiceResult<Vec<ServiceResult<(v1::Notification, bool)>>> {
        let (mut last, mut unread) = self.user_state(user).await?;
        let now = self.deps.clock.now_ms();
        let (notes, rows): (Vec<_>, Vec<_>) = pending
            .into_iter()
            .map(|p| (p.note, (p.bytes, p.key)))
            .unzip();
        let rows = Arc::new(rows);
        let mut attempts = 0;
        let outcomes = loop {
            attempts += 1;
            let base = last;
            if base.checked_add(rows.len() as u64).is_none() {
                return Err(ServiceError::new(
                    ErrorCode::LimitExceeded,
                    "no more notifications",
                ));
            }
            let result = Arc::new(std::sync::Mutex::new((Vec::new(), None)));
            let (u, log, created, rows, out) = (
                user.to_owned(),
                self.log.clone(),
                self.created.clone(),
                rows.clone(),
                result.clone(),
            );
            self.deps
                .writer
                .write(move |txn| {
                    let mut outcomes = Vec::with_capacity(rows.len());
                    let mut at = base;
                    for (bytes, key) in rows.iter() {
                        // Checked in the transaction that would store the
                        // notification: a retry finds the record exactly when the
                        // first one committed (in this same write, too).
                        if let Some(key) = key
                            && let Some(record) = created.get_in(txn, key)?
                        {
                            outcomes.push(Stored::Earlier(record));
                            continue;
                        }
                        match log.append_in(txn, &u, at, std::slice::from_ref(bytes)) {
                            Ok(l) => at = l,
                            Err(AppendError::Conflict { actual, .. }) if at == base => {
                                // Nothing written yet; caught up below.
                                *out.locked() = (Vec::new(), Some(actual));
                                return Ok(());
                            }
                            Err(e) => return Err(append_failed(e)),
                        }
                        outcomes.push(Stored::Appended(at));
                        if let Some(key) = key {
                            created.put_in(txn, key, now, &at.to_le_bytes())?;
                        }
                    }
                    if at > base {
                        txn.open_table(STATE)?
                            .insert(u.as_str(), (at, unread + (at - base)))?;
                    }
                    *out.locked() = (outcomes, None);
                    Ok(())
                })
                .await?;
            let (outcomes, moved) = std::mem::take(&mut *result.locked());
            match moved {
                None => break outcomes,
                // Notifications whose request was abandoned while their commit was
                // in flight, or whose commit was reported failed but reached the
                // disk, still committed, unread: deliver them, count them, go on.
                Some(actual) if actual > last && attempts < 3 => {
                    tracing::warn!(user, actual, "notification offsets moved under a create");
                    self.publish_stored(user, last, actual).await?;
                    unread += actual - last;
                    last = actual;
                }
                Some(actual) => {
                    return Err(ServiceError::internal(format!(
                        "notifications of {user} are at offset {actual}, expected {last}"
                    )));
                }
            }
        };
        let mut answers = Vec::with_capacity(outcomes.len());
        for (outcome, note) in outcomes.into_iter().zip(notes) {
            answers.push(match outcome {
                Stored::Appended(offset) => {
                    last = offset;
                    unread += 1;
                    let note = wire(user, offset, note);
                    // Published under the user's lock: in offset order, after any
                    // catch-up.
                    self.publish(user, note.clone());
                    Ok((note, false))
                }
                Stored::Earlier(record) => {
                    self.created_before(user, &record, &mut last, &mut unread)
                        .await
                }
            });
        }
        self.remember(user, (last, unread)).await;
        Ok(answers)
    }

    /// The answer to a notification whose idempotency key was used before: the
    /// notification created then. `(last, unread)` is the user's state so far,
    /// moved if that one was stored by a commit its caller was told failed and
    /// was never published.
    async fn created_before(
        &self,
        user: &str,
        record: &[u8],
        last: &mut u64,
        unread: &mut u64,
    ) -> ServiceResult<(v1::Notification, bool)> {
        let offset = <[u8; 8]>::try_from(record)
            .map(u64::from_le_bytes)
            .map_err(|_| ServiceError::internal("a stored idempotency key is corrupt"))?;
        if offset > *last {
            // Stored by a commit whose caller was told it failed (a failed fsync
            // that still reached the disk): deliver it now, once.
            let stored = self.stored_state(user)?;
            self.publish_stored(user, *last, stored.0).await?;
            (*last, *unread) = stored;
        }
        let note = self.read_range(user, offset, offset).await?.pop();
        // The notification may be gone (retention); its id is the answer.
        let note = note.unwrap_or_else(|| v1::Notification {
            notification_id: format!("{user}:{offset}"),
            offset,
            ..Default::default()
        });
        Ok((note, true))
    }

    /// Forgets idempotency keys past the configured window and count, in as many
    /// bounded writes as it takes. Returns how many.
    pub async fn prune_idempotency(&self) -> Result<usize, StoreError> {
        Ok(self.prune_idempotency_batches(usize::MAX).await?.0)
    }

    /// [`Self::prune_idempotency`] in at most `batches` writes: returns how many
    /// were forgotten and whether more may be left.
    pub async fn prune_idempotency_batches(
        &self,
        batches: usize,
    ) -> Result<(usize, bool), StoreError> {
        let keep = Retention {
            window: self.config.idempotency_window,
            max_keys: self.config.idempotency_max_keys,
        };
        let counter = &self.deps.metrics.idempotency_pruned[1];
        super::prune(&self.deps, &self.created, keep, batches, counter).await
    }

    /// Idempotency keys remembered now.
    pub fn idempotency_keys(&self) -> Result<u64, StoreError> {
        self.created.len(&self.deps.store)
    }

    /// A session opened: it gets the notifications after its resume offset (if
    /// given), in order, then the live ones. See [`super::catch_up`]: the backlog
    /// is streamed outside the user's lock.
    ///
    /// Fails (with the session not subscribed) when storage fails.
    pub async fn connected(
        &self,
        ctx: &SessionCtx,
        resume: &HashMap<String, u64>,
    ) -> Result<(), StoreError> {
        let stream = NoteStream { notify: self, ctx };
        let from = resume.get(RESUME_KEY).copied();
        catch_up(
            &stream,
            ctx.subscriber.as_ref(),
            StreamKind::Notifications,
            from,
        )
        .await
        .inspect_err(|e| tracing::warn!(error = %e, "reading notifications for a catch-up"))?;
        Ok(())
    }

    /// A session ended.
    pub fn disconnected(&self, ctx: &SessionCtx) {
        self.deps
            .hub
            .unsubscribe(&topic(ctx.user_id()), ctx.session_id());
    }

    /// (last offset, unread) of a user as stored (not cached).
    fn stored_state(&self, user: &str) -> Result<(u64, u64), StoreError> {
        let txn = self.deps.store.db().begin_read()?;
        Ok(txn
            .open_table(STATE)?
            .get(user)?
            .map(|v| v.value())
            .unwrap_or((0, 0)))
    }

    /// Publishes the notifications after `last` up to `to`, which are stored but
    /// were never published. Call under the user's stripe.
    async fn publish_stored(&self, user: &str, last: u64, to: u64) -> Result<(), StoreError> {
        if to <= last {
            return Ok(());
        }
        for note in self.read_range(user, last + 1, to).await? {
            self.publish(user, note);
        }
        Ok(())
    }

    /// Pushes `note` to every session of `user`. Call under the user's stripe, in
    /// offset order.
    fn publish(&self, user: &str, note: v1::Notification) {
        self.deps
            .hub
            .publish(&topic(user), StreamKind::Notifications, &note_push(note));
    }

    /// The notifications `from..=to` of a user.
    async fn read_range(
        &self,
        user: &str,
        from: u64,
        to: u64,
    ) -> Result<Vec<v1::Notification>, StoreError> {
        let entries = self.log.read(user, from, to, usize::MAX).await?;
        entries
            .into_iter()
            .map(|e| {
                let n: StoredNote = serde_json::from_slice(&e.data).map_err(corrupt)?;
                Ok(wire(user, e.offset, n))
            })
            .collect()
    }

    /// A page of the caller's notifications.
    pub async fn list(
        &self,
        ctx: &SessionCtx,
        req: v1::NotifyListRequest,
    ) -> ServiceResult<v1::NotifyListResponse> {
        let user = ctx.user_id();
        let (last, unread) = {
            let _guard = self.stripe(user).lock().await;
            self.user_state(user).await?
        };
        let first = self.log.first_offset(user)?;
        let page = super::Page::before(req.before_offset, req.limit, self.config.max_page, last)
            .and_then(|p| p.kept_from(first));
        Ok(v1::NotifyListResponse {
            notifications: match page {
                Some(p) => self.read_range(user, p.from, p.to).await?,
                None => vec![],
            },
            more: page.is_some_and(|p| p.from > first),
            unread,
            first_offset: first,
        })
    }

    /// One retention batch (`prune_batch`, below). A batch that fails
    /// leaves the cursor where it was, so the next one looks at the same users
    /// again (and a command of the log applied again does the same work).
    pub async fn prune(
        &self,
        r: &super::retention::RetentionConfig,
        now: u64,
        budget: usize,
    ) -> ServiceResult<u64> {
        super::retention::restoring_cursor(&self.prune_cursor, self.prune_batch(r, now, budget))
            .await
    }

    /// One retention batch (see [`super::retention`]): looks at up to `budget`
    /// users after the previous batch's last one and removes their notifications
    /// past the configured count and age (at most `budget`; the newest one always
    /// stays). A removed unread notification no longer counts as unread. Returns
    /// how many were removed.
    async fn prune_batch(
        &self,
        r: &super::retention::RetentionConfig,
        now: u64,
        budget: usize,
    ) -> ServiceResult<u64> {
        if r.user_notifications == 0 && r.notification_age.is_none() {
            return Ok(0);
        }
        let after = self.prune_cursor.locked().clone();
        let mut users = Vec::new();
        {
            let txn = self.deps.store.db().begin_read()?;
            let table = txn.open_table(STATE)?;
            let range = (
                std::ops::Bound::Excluded(after.as_str()),
                std::ops::Bound::Unbounded,
            );
            for entry in table.range::<&str>(range)?.take(budget) {
                users.push(entry?.0.value().to_owned());
            }
        }
        *self.prune_cursor.locked() = if users.len() < budget {
            String::new()
        } else {
            users.last().cloned().unwrap_or_default()
        };
        let (mut removed, mut left) = (0u64, budget);
        for user in users {
            if left == 0 {
                break;
            }
            let n = self.prune_user(&user, r, now, left).await?;
            removed += n as u64;
            left -= n.min(left);
        }
        Ok(removed)
    }

    async fn prune_user(
        &self,
        user: &str,
        r: &super::retention::RetentionConfig,
        now: u64,
        budget: usize,
    ) -> ServiceResult<usize> {
        let _guard = self.stripe(user).lock().await;
        let (last, _) = self.user_state(user).await?;
        let first = self.log.first_offset(user)?;
        let mut keep = super::retention::keep_from_count(first, last, r.user_notifications, budget);
        if let Some(age) = r.notification_age {
            let cutoff = now.saturating_sub(age.as_millis() as u64);
            let user_budget = budget.saturating_sub((keep - first) as usize);
            keep = super::retention::keep_from_age(
                &self.log,
                user,
                keep,
                last,
                user_budget,
                cutoff,
                |data| {
                    let n: StoredNote = serde_json::from_slice(data).map_err(corrupt)?;
                    Ok(n.created_at_ms)
                },
            )
            .await?;
        }
        if keep <= first {
            return Ok(0);
        }
        let removed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (u, n) = (user.to_owned(), removed.clone());
        self.deps
            .writer
            .write(move |txn| {
                let mut notes = txn.open_table(NOTES)?;
                let mut gone = Vec::new();
                let mut unread_gone = 0u64;
                // Never the newest: it carries the stream's last offset.
                for entry in notes.range((u.as_str(), 0)..(u.as_str(), keep.min(last)))? {
                    let (k, v) = entry?;
                    let note: StoredNote = serde_json::from_slice(v.value()).map_err(corrupt)?;
                    unread_gone += u64::from(!note.read);
                    gone.push(k.value().1);
                }
                for o in &gone {
                    notes.remove((u.as_str(), *o))?;
                }
                let mut state = txn.open_table(STATE)?;
                let (l, unread) = state.get(u.as_str())?.map(|v| v.value()).unwrap_or((0, 0));
                state.insert(u.as_str(), (l, unread.saturating_sub(unread_gone)))?;
                n.store(gone.len(), std::sync::atomic::Ordering::Relaxed);
                Ok(())
            })
            .await?;
        self.state.invalidate(user).await;
        Ok(removed.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Marks some of the caller's notifications read.
    pub async fn mark_read(
        &self,
        ctx: &SessionCtx,
        req: v1::NotifyMarkReadRequest,
    ) -> ServiceResult<v1::NotifyMarkReadResponse> {
        if req.notification_ids.len() > self.config.max_mark_ids {
            return Err(ServiceError::new(
                ErrorCode::LimitExceeded,
                format!("at most {} ids at once", self.config.max_mark_ids),
            ));
        }
        let user = ctx.user_id();
        // Someone else's id refuses the whole request (nothing changes); unknown
        // and already read ids of the caller's own change nothing.
        let mut offsets = Vec::with_capacity(req.notification_ids.len());
        for id in &req.notification_ids {
            let Some((owner, offset)) = id.rsplit_once(':') else {
                return Err(ServiceError::bad_request(format!(
                    "{id:?} is not a notification id"
                )));
            };
            let Ok(offset) = offset.parse::<u64>() else {
                return Err(ServiceError::bad_request(format!(
                    "{id:?} is not a notification id"
                )));
            };
            if owner != user {
                return Err(ServiceError::new(
                    ErrorCode::PermissionDenied,
                    "notifications can be marked only by the user they belong to",
                ));
            }
            offsets.push(offset);
        }
        offsets.sort_unstable();
        offsets.dedup();
        self.mark(user, Some(offsets)).await
    }

    /// Marks every notification of the caller read.
    pub async fn mark_all_read(
        &self,
        ctx: &SessionCtx,
    ) -> ServiceResult<v1::NotifyMarkReadResponse> {
        self.mark(ctx.user_id(), None).await
    }

    /// Marks `offsets` (or every unread one) read; returns how many changed.
    async fn mark(
        &self,
        user: &str,
        offsets: Option<Vec<u64>>,
    ) -> ServiceResult<v1::NotifyMarkReadResponse> {
        let _guard = self.stripe(user).lock().await;
        let (last, unread) = self.user_state(user).await?;
        let all = offsets.is_none();
        // Read the notes that change.
        let mut changed: Vec<(u64, StoredNote)> = Vec::new();
        {
            let txn = self.deps.store.db().begin_read()?;
            let table = txn.open_table(NOTES)?;
            match &offsets {
                Some(offsets) => {
                    for &o in offsets.iter().filter(|&&o| o >= 1 && o <= last) {
                        if let Some(v) = table.get((user, o))? {
                            let n: StoredNote =
                                serde_json::from_slice(v.value()).map_err(corrupt)?;
                            if !n.read {
                                changed.push((o, n));
                            }
                        }
                    }
                }
                None if unread > 0 => {
                    for entry in table.range((user, 1)..=(user, last))? {
                        let (k, v) = entry?;
                        let n: StoredNote = serde_json::from_slice(v.value()).map_err(corrupt)?;
                        if !n.read {
                            changed.push((k.value().1, n));
                        }
                    }
                }
                None => {}
            }
        }
        let marked = changed.len() as u64;
        let new_unread = unread.saturating_sub(marked);
        if marked > 0 {
            let rows: Vec<(u64, Vec<u8>)> = changed
                .iter()
                .map(|(o, n)| {
                    let mut n = n.clone();
                    n.read = true;
                    (*o, serde_json::to_vec(&n).expect("plain data"))
                })
                .collect();
            let u = user.to_owned();
            self.deps
                .writer
                .write(move |txn| {
                    let mut notes = txn.open_table(NOTES)?;
                    for (o, bytes) in &rows {
                        notes.insert((u.as_str(), *o), bytes.as_slice())?;
                    }
                    txn.open_table(STATE)?
                        .insert(u.as_str(), (last, new_unread))?;
                    Ok(())
                })
                .await?;
            self.remember(user, (last, new_unread)).await;
            let event = v1::NotificationsRead {
                notification_ids: if all {
                    vec![]
                } else {
                    changed.iter().map(|(o, _)| format!("{user}:{o}")).collect()
                },
                all,
                unread: new_unread,
            };
            self.deps.hub.publish(
                &topic(user),
                StreamKind::Notifications,
                &v1::Push {
                    stream: String::new(),
                    offset: 0,
                    event: Some(push::Event::NotificationsRead(event)),
                },
            );
        }
        Ok(v1::NotifyMarkReadResponse {
            marked: u32::try_from(marked).unwrap_or(u32::MAX),
            unread: new_unread,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::fakes::{FakeSession, Node};
    use futures_util::FutureExt;

    /// A service, the user alice, and the pushes to one connected device of hers.
    async fn alice_with_a_device() -> (
        Node,
        Arc<NotifyService>,
        UserId,
        tokio::sync::mpsc::Receiver<(StreamKind, v1::Push)>,
    ) {
        let node = Node::new();
        let notify = NotifyService::open(node.deps.clone(), Default::default()).unwrap();
        let (device, pushes) = FakeSession::new("alice", "d", 16);
        notify
            .connected(&device.ctx(), &HashMap::new())
            .await
            .unwrap();
        (node, notify, UserId::parse("alice").unwrap(), pushes)
    }

    fn note(title: &str) -> NewNotification {
        NewNotification {
            kind: "k".into(),
            title: title.into(),
            ..Default::default()
        }
    }

    /// A notification abandoned while its commit is in flight still commits; the
    /// next one follows it, and both count as unread.
    #[tokio::test]
    async fn a_notification_after_an_abandoned_one_follows_it() {
        let (node, notify, alice, mut pushes) = alice_with_a_device().await;
        let hold = node.deps.writer.hold();
        let mut abandoned = Box::pin(notify.create(&alice, note("abandoned")));
        while node.deps.writer.in_flight() == 0 {
            assert!(abandoned.as_mut().now_or_never().is_none(), "held");
            tokio::task::yield_now().await;
        }
        drop(abandoned);
        drop(hold);
        // Writes commit in order: once this one is durable, so is the abandoned one.
        node.deps.writer.write(|_| Ok(())).await.unwrap();
        let next = notify.create(&alice, note("next")).await.unwrap();
        assert_eq!(next.offset, 2);
        let (alice, _) = FakeSession::new("alice", "a", 16);
        let page = notify
            .list(&alice.ctx(), v1::NotifyListRequest::default())
            .await
            .unwrap();
        let titles: Vec<&str> = page
            .notifications
            .iter()
            .map(|n| n.title.as_str())
            .collect();
        assert_eq!(titles, ["abandoned", "next"]);
        assert_eq!(page.unread, 2);
        // The abandoned one was stored without being published: it is delivered
        // before the next one, once.
        let mut delivered = Vec::new();
        while let Ok((_, p)) = pushes.try_recv() {
            if let Some(push::Event::Notification(n)) = p.event {
                delivered.push(n.title);
            }
        }
        assert_eq!(delivered, ["abandoned", "next"]);
    }

    /// Notifications queued for one user while a commit for them is in flight are
    /// stored together in the next write: in order, with their idempotency keys
    /// checked against earlier writes and against each other.
    #[tokio::test]
    async fn notifications_waiting_on_a_user_share_one_commit() {
        let (node, notify, alice, mut pushes) = alice_with_a_device().await;
        let create = |title: &str, key: &'static str| {
            let n = note(title);
            let (notify, alice) = (&notify, &alice);
            Box::pin(async move {
                let key = (!key.is_empty()).then_some(key);
                let (n, replayed) = notify.create_once(alice, n, key).await?;
                Ok::<_, ServiceError>((n.offset, n.title, replayed))
            })
        };
        let hold = node.deps.writer.hold();
        let mut creates = vec![create("n1", "a")];
        node.until_committing(&mut creates[0]).await;
        // The first holds alice's stripe while its commit waits; these queue up.
        for (title, key) in [
            ("n2", "k"),
            ("n3", ""),
            ("n2 again", "k"),
            ("n1 again", "a"),
            ("n4", ""),
        ] {
            let mut c = create(title, key);
            assert!(c.as_mut().now_or_never().is_none(), "waits for the stripe");
            creates.push(c);
        }
        assert_eq!(notify.waiting.queued("alice"), 5);
        let before = node
            .deps
            .metrics
            .writes_committed
            .load(std::sync::atomic::Ordering::Relaxed);
        drop(hold);
        let answers = futures_util::future::join_all(creates).await;
        let writes = node
            .deps
            .metrics
            .writes_committed
            .load(std::sync::atomic::Ordering::Relaxed)
            - before;
        assert_eq!(writes, 2, "the first one's write, then one for the rest");
        let answers: Vec<_> = answers.into_iter().map(Result::unwrap).collect();
        let expected = [
            (1, "n1", false),
            (2, "n2", false),
            (3, "n3", false),
            (2, "n2", true),
            (1, "n1", true),
            (4, "n4", false),
        ];
        assert_eq!(
            answers,
            expected.map(|(o, t, r)| (o, t.to_owned(), r)),
            "each answered with its own notification, a repeated key with the first"
        );
        let mut delivered = Vec::new();
        while let Ok((_, p)) = pushes.try_recv() {
            if let Some(push::Event::Notification(n)) = p.event {
                delivered.push((n.offset, n.title));
            }
        }
        let expected = [(1, "n1"), (2, "n2"), (3, "n3"), (4, "n4")];
        assert_eq!(delivered, expected.map(|(o, t)| (o, t.to_owned())));
        assert_eq!(
            notify.stored_state("alice").unwrap(),
            (4, 4),
            "(last, unread)"
        );
        let next = notify.create(&alice, note("n5"));
        assert_eq!(
            next.await.unwrap().offset,
            5,
            "the cached state moved with them"
        );
    }
}
