//! Retention: a background task that removes what the node no longer has to keep,
//! in bounded batches, through the group-commit writer:
//!
//! - a room's old messages, past `retention.room_messages` (count) or
//!   `retention.room_message_age` (age); the newest message of a room always stays;
//! - a user's old notifications, past `retention.user_notifications` or
//!   `retention.notification_age` (an unread one removed no longer counts as
//!   unread); the newest one always stays;
//! - rooms nobody is in any more (`retention.empty_rooms`), with their messages; the
//!   room's last offset stays behind so its id is never reused;
//! - collaboration bookkeeping: a client's duplicate-detection row once its last
//!   operation is older than the history the document keeps (a resend that old is
//!   answered `RESYNC_REQUIRED` anyway), and access rows of documents that no
//!   longer exist.
//!
//! Offsets are never reused: a stream's last offset never moves back. A client
//! that asks for entries that were removed learns it: a session resuming from an
//! older offset gets a `HistoryTruncated` push (the first offset still kept) before
//! the rest, and history pages carry `first_offset`.
//!
//! Each run looks at most at `retention.batch` rooms and users and removes at most
//! `retention.batch` rows per kind, continuing where the previous run stopped.
//! The same task forgets idempotency records (chat's client message ids, the
//! server API's idempotency keys) past their window and count.
//!
//! In a cluster a run is a command of the log ([`super::replica::Prune`]), not
//! something each node does on its own clock: what a later command finds (an
//! idempotency record, an empty room) must be the same on every node, or a retry
//! would be a duplicate on one node and a new message on another. Each node
//! proposes a run every interval; a run less than half an interval from the
//! previous one is skipped at application, so a cluster prunes once or twice
//! per interval whatever its size. The batches' cursors are kept in memory, which is
//! the same on every node because every node builds its view by applying the log
//! from the start.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use super::chat::ChatService;
use super::collab::CollabService;
use super::notify::NotifyService;
use super::replica::{Op, Outcome, Prune, Replicator};
use super::{Background, ServiceError, ServiceResult};
use crate::clock::Clock;
use crate::util::Unpoisoned;

/// What is kept how long (`[retention]` in the configuration file).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionConfig {
    /// How often the retention task runs.
    #[serde(with = "crate::clock::duration_str")]
    pub interval: Duration,
    /// Rooms and users looked at, and rows removed per kind, in one run at most.
    pub batch: usize,
    /// Messages kept per room at most (0: no limit).
    pub room_messages: u64,
    /// Messages older than this are removed (unset: kept whatever their age).
    #[serde(with = "crate::clock::duration_str::option")]
    pub room_message_age: Option<Duration>,
    /// Notifications kept per user at most (0: no limit).
    pub user_notifications: u64,
    /// Notifications older than this are removed (unset: kept whatever their age).
    #[serde(with = "crate::clock::duration_str::option")]
    pub notification_age: Option<Duration>,
    /// Whether rooms without participants are removed with their messages.
    pub empty_rooms: bool,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(60),
            batch: 10_000,
            room_messages: 0,
            room_message_age: None,
            user_notifications: 10_000,
            notification_age: Some(Duration::from_secs(90 * 86_400)),
            empty_rooms: true,
        }
    }
}

impl RetentionConfig {
    /// Checks the section: a positive batch and an interval of at least a second.
    pub fn validate(&self) -> Result<(), super::InvalidConfig> {
        if self.batch == 0 || self.interval < Duration::from_secs(1) {
            return Err(super::InvalidConfig(
                "retention.batch must be positive and retention.interval at least 1s".into(),
            ));
        }
        Ok(())
    }
}

/// What one run removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Chat messages.
    pub messages: u64,
    /// Empty rooms.
    pub rooms: u64,
    /// Notifications.
    pub notifications: u64,
    /// Collaboration duplicate-detection rows.
    pub dedup_rows: u64,
    /// Access rows of documents that no longer exist.
    pub access_rows: u64,
}

/// The services a retention task prunes, and in a cluster the log its runs go
/// through.
#[derive(Debug)]
pub struct Parts<'a> {
    /// Rooms and messages, and client message ids.
    pub chat: &'a Arc<ChatService>,
    /// Notifications, and the server API's idempotency keys.
    pub notify: &'a Arc<NotifyService>,
    /// Collaboration bookkeeping.
    pub collab: &'a Arc<CollabService>,
    /// In a cluster: where the log will be once the node has caught up with it
    /// (`None` on a single node).
    pub log: Option<Arc<OnceLock<Arc<dyn Replicator>>>>,
}

/// How many follow-ups one periodic run proposes at most while idempotency
/// batches come back full; the next run goes on.
const MAX_FOLLOW_UPS: usize = 100;

/// The retention task of a node.
#[derive(Debug)]
pub struct Retention {
    config: RetentionConfig,
    clock: Clock,
    chat: Weak<ChatService>,
    notify: Weak<NotifyService>,
    collab: Weak<CollabService>,
    /// In a cluster: the log (set once the node has caught up with it).
    log: Option<Arc<OnceLock<Arc<dyn Replicator>>>>,
    /// The command time of the last full run applied from the log (0: none yet).
    last_applied_ms: AtomicU64,
    /// The steps of a run from the log that were done when its application
    /// failed: the log's applier applies it again, and those are not done twice.
    retried: std::sync::Mutex<Steps>,
    /// One run at a time (the periodic one, or one a test or operator asks for).
    running: tokio::sync::Mutex<()>,
}

impl Retention {
    /// The retention of these services; the returned work runs it every
    /// `config.interval` (on tokio's clock) until `shutdown`.
    pub fn open(
        config: RetentionConfig,
        clock: Clock,
        parts: Parts<'_>,
        shutdown: CancellationToken,
    ) -> (Arc<Self>, Background) {
        let every = config.interval.max(Duration::from_secs(1));
        let retention = Arc::new(Self {
            config,
            clock,
            chat: Arc::downgrade(parts.chat),
            notify: Arc::downgrade(parts.notify),
            collab: Arc::downgrade(parts.collab),
            log: parts.log,
            last_applied_ms: AtomicU64::new(0),
            retried: std::sync::Mutex::new(Steps::default()),
            running: tokio::sync::Mutex::new(()),
        });
        let work = Background::new(
            "retention",
            run_periodically(Arc::downgrade(&retention), every, shutdown),
        );
        (retention, work)
    }

    /// The configuration it applies.
    pub fn config(&self) -> &RetentionConfig {
        &self.config
    }

    /// Runs once now, on this node alone: one bounded batch of each kind
    /// (idempotency records aside, see [`Retention::tick`]). Refused in a
    /// cluster, where every node must prune at the same point of the log.
    pub async fn run_once(&self) -> ServiceResult<Pruned> {
        if self.log.is_some() {
            return Err(ServiceError::internal(
                "in a cluster, retention runs as a command of the log",
            ));
        }
        let _one = self.running.lock().await;
        self.retention_steps(self.clock.now_ms(), &mut Steps::default())
            .await
    }

    /// The retention batch of each kind not yet done in `steps`, at `now`.
    /// Returns what it removed.
    async fn retention_steps(&self, now: u64, steps: &mut Steps) -> ServiceResult<Pruned> {
        let (c, batch) = (&self.config, self.config.batch);
        let mut pruned = Pruned::default();
        if !steps.rooms {
            if let Some(chat) = self.chat.upgrade() {
                (pruned.messages, pruned.rooms) = chat.prune(c, now, batch).await?;
            }
            steps.rooms = true;
        }
        if !steps.notifications {
            if let Some(notify) = self.notify.upgrade() {
                pruned.notifications = notify.prune(c, now, batch).await?;
            }
            steps.notifications = true;
        }
        if !steps.collab {
            if let Some(collab) = self.collab.upgrade() {
                (pruned.dedup_rows, pruned.access_rows) = collab.prune(batch).await?;
            }
            steps.collab = true;
        }
        if pruned != Pruned::default() {
            tracing::info!(?pruned, "retention");
        }
        Ok(pruned)
    }

    /// Forgets idempotency records past their window and count, at most
    /// `batches` bounded writes per service not yet done in `steps` (both are
    /// tried; the first error is returned). Returns whether a batch came back
    /// full, so that more may be left.
    async fn record_steps(&self, batches: usize, steps: &mut Steps) -> ServiceResult<bool> {
        let (chat, notify) = (self.chat.upgrade(), self.notify.upgrade());
        let chat = record_step(
            "chat",
            &mut steps.chat_ids,
            &mut steps.more,
            chat.as_deref()
                .map(|c| c.prune_idempotency_batches(batches)),
        )
        .await;
        let notify = record_step(
            "notify",
            &mut steps.api_keys,
            &mut steps.more,
            notify
                .as_deref()
                .map(|n| n.prune_idempotency_batches(batches)),
        )
        .await;
        chat.and(notify)?;
        Ok(steps.more)
    }

    /// One periodic run. On a single node: a retention batch of each kind, and
    /// idempotency records until none is left to forget. In a cluster it is a
    /// command of the log ([`super::replica::Prune`]), followed up while
    /// idempotency batches come back full; a node still catching up with the log
    /// does nothing (it applies the other nodes' runs as it goes).
    pub async fn tick(&self) {
        let Some(log) = &self.log else {
            if let Err(e) = self.run_once().await {
                tracing::warn!(error = %e.message, "retention run failed");
            }
            if let Err(e) = self.record_steps(usize::MAX, &mut Steps::default()).await {
                tracing::warn!(error = %e.message, "pruning idempotency records");
            }
            return;
        };
        let Some(log) = log.get() else { return };
        let every_ms = self.config.interval.as_millis() as u64;
        for n in 0..=MAX_FOLLOW_UPS {
            let op = Op::Prune(Prune {
                records_only: n > 0,
                every_ms,
            });
            match log.propose(op, None).await {
                Ok(Outcome::Pruned(Ok(true))) => continue,
                Ok(Outcome::Pruned(Ok(false))) => return,
                Ok(Outcome::Pruned(Err(e))) | Err(e) => {
                    tracing::warn!(error = %e.message, "retention run failed");
                    return;
                }
                Ok(other) => {
                    tracing::warn!(?other, "unexpected outcome of a retention run");
                    return;
                }
            }
        }
    }

    /// Applies a run of the log (inside the command's replay scope, so that
    /// "now" is the command's time): the retention batch of each kind unless the
    /// previous full run is less than half the proposer's interval away, then
    /// one batch of idempotency records per service. Returns whether one of those
    /// batches was full.
    ///
    /// When storage fails, the log's applier applies the command again (nothing
    /// else is applied in between): the steps already done are skipped, and a
    /// failed step's cursor is where it was. A step of several writes that
    /// failed after some of them committed redoes the rest with the budget those
    /// left, so another node may remove a few rows more or less in that batch
    /// (the next batches catch up); idempotency batches are one write each.
    pub(super) async fn apply(&self, p: &Prune) -> ServiceResult<bool> {
        let now = self.clock.now_ms();
        let full = !p.records_only;
        if full {
            let last = self.last_applied_ms.load(Ordering::Relaxed);
            // Either way: a proposer whose clock runs ahead must not stop the others'.
            if last != 0 && now.abs_diff(last) < p.every_ms / 2 {
                return Ok(false);
            }
        }
        let mut steps = std::mem::take(&mut *self.retried.locked());
        match self.apply_steps(full, now, &mut steps).await {
            Ok(more) => {
                if full {
                    self.last_applied_ms.store(now, Ordering::Relaxed);
                }
                Ok(more)
            }
            Err(e) => {
                *self.retried.locked() = steps;
                Err(e)
            }
        }
    }

    async fn apply_steps(&self, full: bool, now: u64, steps: &mut Steps) -> ServiceResult<bool> {
        if full {
            self.retention_steps(now, steps).await?;
        }
        self.record_steps(1, steps).await
    }
}

/// One service's step of [`Retention::record_steps`]: `batch` (none when the
/// service is gone) unless `done`; marks it done and notes in `more` whether the
/// batch came back full.
async fn record_step(
    what: &'static str,
    done: &mut bool,
    more: &mut bool,
    batch: Option<
        impl std::future::Future<Output = Result<(usize, bool), crate::store::StoreError>>,
    >,
) -> ServiceResult<()> {
    if *done {
        return Ok(());
    }
    if let Some(batch) = batch {
        let (n, left) = batch.await?;
        *more |= left;
        if n > 0 {
            tracing::debug!(what, n, "idempotency records pruned");
        }
    }
    *done = true;
    Ok(())
}

/// The steps of a run done so far (a run from the log that storage failed is
/// applied again without the steps it completed).
#[derive(Debug, Default, Clone, Copy)]
struct Steps {
    rooms: bool,
    notifications: bool,
    collab: bool,
    chat_ids: bool,
    api_keys: bool,
    /// An idempotency batch came back full.
    more: bool,
}

async fn run_periodically(retention: Weak<Retention>, every: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // the first tick is immediate: skip it
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        let Some(r) = retention.upgrade() else { return };
        r.tick().await;
    }
}

/// Runs one batch of retention (`work`) that moves `cursor`; if it fails, the
/// cursor goes back to where it was, so that the next batch (or the log's applier
/// applying a command again) looks at the same rows.
pub(crate) async fn restoring_cursor<C: Clone, T>(
    cursor: &std::sync::Mutex<C>,
    work: impl std::future::Future<Output = ServiceResult<T>>,
) -> ServiceResult<T> {
    let before = cursor.locked().clone();
    let result = work.await;
    if result.is_err() {
        *cursor.locked() = before;
    }
    result
}

/// The first offset to keep of a stream holding `first..=last`: at most `max_count`
/// entries (0: any number), never past `last` (the newest entry stays), and at
/// most `budget` removed.
pub(crate) fn keep_from_count(first: u64, last: u64, max_count: u64, budget: usize) -> u64 {
    if first == 0 {
        return 0;
    }
    let mut keep = first;
    if max_count > 0 && last - first + 1 > max_count {
        keep = last - max_count + 1;
    }
    keep.min(last)
        .min(first.saturating_add(budget as u64))
        .max(first)
}

/// Entries read per page while looking for the first one young enough.
const AGE_PAGE: usize = 64;

/// The first offset to keep of a stream (from `keep`, up to its newest entry
/// `last`) so that entries older than `cutoff` go: entries are in time order, so it
/// reads from `keep` in small pages until the first young enough one, at most
/// `budget` entries past `keep`. `time_of` reads an entry's time.
pub(crate) async fn keep_from_age(
    log: &crate::store::RedbLog,
    stream: &str,
    mut keep: u64,
    last: u64,
    budget: usize,
    cutoff: u64,
    time_of: impl Fn(&[u8]) -> Result<u64, crate::store::StoreError>,
) -> Result<u64, crate::store::StoreError> {
    use crate::store::OffsetLog;
    let end = last.min(keep.saturating_add(budget as u64));
    while keep < end {
        let page = log.read(stream, keep, end, AGE_PAGE).await?;
        let Some(tail) = page.last().map(|e| e.offset) else {
            break;
        };
        for e in &page {
            if time_of(&e.data)? >= cutoff {
                return Ok(keep);
            }
            keep = e.offset + 1;
        }
        if tail >= end {
            break;
        }
    }
    Ok(keep.min(last))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn count_limits_keep_the_newest_within_the_budget() {
        assert_eq!(keep_from_count(1, 10, 3, 100), 8);
        assert_eq!(keep_from_count(1, 10, 0, 100), 1, "no limit");
        assert_eq!(keep_from_count(1, 10, 20, 100), 1, "under the limit");
        assert_eq!(
            keep_from_count(1, 10, 3, 4),
            5,
            "at most the budget removed"
        );
        assert_eq!(keep_from_count(5, 5, 1, 100), 5, "the newest stays");
        assert_eq!(keep_from_count(0, 0, 1, 100), 0, "empty");
    }

    #[test]
    fn the_defaults_are_valid() {
        RetentionConfig::default().validate().unwrap();
        let c = RetentionConfig {
            batch: 0,
            ..Default::default()
        };
        assert!(c.validate().is_err());
    }
}

/// Runs applied from the log, as every node of a cluster applies them.
#[cfg(test)]
mod log_tests {
    use std::time::Duration;

    use prost::Message;

    use crate::clock::replay;
    use crate::protocol::v1::{self, request, response};
    use crate::services::fakes::Node;
    use crate::services::replica::{Command, Op, Outcome, Prune};
    use crate::services::{Services, ServicesConfig};

    const T: u64 = 1_800_000_000_000;

    /// A node of a cluster that has not been given its log: only what it applies
    /// changes its database.
    fn clustered(node: &Node) -> Services {
        let mut config = ServicesConfig {
            clustered: true,
            ..Default::default()
        };
        config.chat.idempotency_window = Duration::from_secs(10);
        Services::open(node.deps.clone(), config).unwrap().0
    }

    async fn apply(services: &Services, time_ms: u64, op: Op) -> Outcome {
        let command = Command {
            origin: "n1".into(),
            id: time_ms,
            time_ms,
            seed: time_ms,
            session: "s-ann".into(),
            user: "ann".into(),
            roles: vec![],
            op: Some(op),
        };
        replay::scope(time_ms, time_ms, services.apply(&command, None)).await
    }

    fn request(body: request::Body) -> Op {
        Op::Request(
            v1::Request {
                id: 0,
                body: Some(body),
            }
            .encode_to_vec(),
        )
    }

    /// The offset a chat send with client message id `id` was answered with.
    async fn send(services: &Services, time_ms: u64, room: &str, id: &str) -> u64 {
        let op = request(request::Body::ChatSend(v1::ChatSendRequest {
            room_id: room.into(),
            text: id.into(),
            client_message_id: id.into(),
        }));
        match apply(services, time_ms, op).await {
            Outcome::Response(Ok(response::Body::ChatSend(r))) => r.message.unwrap().offset,
            other => panic!("{other:?}"),
        }
    }

    async fn prune(services: &Services, time_ms: u64) -> bool {
        let op = Op::Prune(Prune {
            records_only: false,
            every_ms: 60_000,
        });
        match apply(services, time_ms, op).await {
            Outcome::Pruned(r) => r.unwrap(),
            other => panic!("{other:?}"),
        }
    }

    /// Two nodes whose clocks are an hour apart apply the same commands: they
    /// forget the same client message ids at the same point (by the commands'
    /// time, not their own), skip the same run that comes too soon after the
    /// previous one, and answer every resend alike.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn runs_from_the_log_forget_the_same_records_whatever_the_node_s_clock() {
        let (a, b) = (Node::new(), Node::new());
        b.clock.advance(3_600_000);
        let nodes = [clustered(&a), clustered(&b)];
        let mut answers = Vec::new();
        for services in &nodes {
            let op = request(request::Body::RoomCreate(v1::RoomCreateRequest {
                room_id: "r".into(),
                name: "r".into(),
                participants: vec![],
            }));
            let room = match apply(services, T, op).await {
                Outcome::Response(Ok(response::Body::RoomCreate(r))) => r.room.unwrap().room_id,
                other => panic!("{other:?}"),
            };
            let mut got = vec![
                send(services, T + 1_000, &room, "a").await,
                send(services, T + 20_000, &room, "b").await,
            ];
            // At T + 25 s, "a" is past the 10 s window and "b" is not.
            assert!(!prune(services, T + 25_000).await);
            got.push(send(services, T + 26_000, &room, "a").await);
            got.push(send(services, T + 27_000, &room, "b").await);
            // 15 s after the previous run, less than half of 60 s: skipped, so
            // "b" (20 s old, past the window) is still remembered.
            assert!(!prune(services, T + 40_000).await);
            got.push(send(services, T + 41_000, &room, "b").await);
            // 35 s after the previous run: both records are past the window.
            assert!(!prune(services, T + 60_000).await);
            got.push(send(services, T + 61_000, &room, "b").await);
            answers.push((got, services.chat.idempotency_keys().unwrap()));
        }
        assert_eq!(
            answers[0].0,
            [1, 2, 3, 2, 2, 4],
            "new, new, a forgotten (new), b remembered, b remembered (the run \
             was skipped), b forgotten (new)"
        );
        assert_eq!(answers[0].0, answers[1].0, "both nodes answered alike");
        assert_eq!(answers[0].1, 1, "only the last b is remembered");
        assert_eq!(answers[0].1, answers[1].1);
    }

    /// On a node of a cluster, a run that is not from the log is refused.
    #[tokio::test]
    async fn a_local_run_is_refused_in_a_cluster() {
        let node = Node::new();
        let services = clustered(&node);
        assert!(services.retention.run_once().await.is_err());
    }
}
