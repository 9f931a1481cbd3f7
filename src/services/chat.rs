//! Chat: rooms with participants and admins, messages with a per-room offset,
//! cursor-paginated history, read marks with exact unread counts, read receipts,
//! typing indicators, and recovery by offset.
//!
//! Ordering and recovery: a room's messages are committed and published under the
//! room's lock, and a session subscribes to a room (after sending what it missed)
//! under the same lock. So a reconnecting client receives every message after its
//! resume offset exactly once and in order, then the live ones. The backlog itself
//! is streamed outside the lock (see [`super::catch_up`]), so a long catch-up does
//! not stall the room.
//!
//! Consent: nobody is put into a room without agreeing. The users named when a
//! room is created or added to it become *invitees* (unless `rooms.join_policy`
//! says otherwise): the invitation is stored and pushed to them, and only when they
//! accept do they become participants, count toward their room limit, receive the
//! room's events, and become co-participants for presence. The server API (a
//! trusted backend) adds participants directly.
//!
//! Ids: a room id chosen by its creator is `"<creator>~<name>"` (see
//! [`RoomId::chosen`]), so creating a room never fails because someone else's
//! exists; an outsider gets the same answers for a room that exists as for one
//! that does not.
//!
//! Unread counts: a user's unread count in a room is the number of messages after
//! their read mark. Sending a message moves the sender's mark to it (you have read
//! what you answer), so counts stay exact with one stored number per user and room.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use prost::Message;
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::catch_up::{CatchUp, CatchUpStream, catch_up};
use super::gather::Gather;
use super::rate::Action;
use super::{ServiceDeps, ServiceError, ServiceResult, SessionCtx, append_failed, corrupt, json};
use crate::hub::Subscriber;
use crate::ids::{RoomId, UserId};
use crate::protocol::ErrorCode;
use crate::protocol::v1::{self, StreamKind, push, room_event};
use crate::store::dedup::{self, Dedup, Retention};
use crate::store::registry::Loaded;
use crate::store::{AppendError, OffsetLog, RedbLog, StoreError};
use crate::util::Unpoisoned;
use futures_util::future::BoxFuture;

const ROOMS: TableDefinition<&str, &[u8]> = TableDefinition::new("chat_rooms");
/// Every room ever created: 0 while it lives (its last offset is its log's last
/// entry), its last offset once removed, so that the id is never reused.
const OFFSETS: TableDefinition<&str, u64> = TableDefinition::new("chat_room_offsets");
/// The messages' offset log ([`RedbLog`]) keeps them in this table.
const MESSAGES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("chat_messages");
const USER_ROOMS: TableDefinition<(&str, &str), u8> = TableDefinition::new("chat_user_rooms");
const READ_MARKS: TableDefinition<(&str, &str), u64> = TableDefinition::new("chat_read_marks");
/// (invitee, room): the user's pending invitations (the invitation itself is in the
/// room's record).
const INVITES: TableDefinition<(&str, &str), u8> = TableDefinition::new("chat_invites");
/// The idempotency records of sends with a client message id, keyed by
/// [`sent_key`] (older builds kept them in `chat_sent`, room first; the store
/// moves those at start).
pub(crate) const SENT_KEYS: &str = "chat_sent_ids";
/// Their ages, for pruning the oldest first.
pub(crate) const SENT_AGES: &str = "chat_sent_ids_age";

/// The idempotency key of a send: the client message id first. Tutti's client
/// libraries start their ids with the time (see
/// [`crate::client::new_client_message_id`]), so the records of one commit fall
/// next to each other in the key table instead of each in a leaf of its own
/// (a fifth of the writer's CPU at 40,000 deliveries/s in the load test, whose
/// clients share one clock; docs/BENCHMARKS.md, "The price of client message
/// ids"). Any id works; others just cost more.
pub(crate) fn sent_key(client_message_id: &str, room: &str, user: &str) -> String {
    dedup::key(&[client_message_id, room, user])
}

/// Who may be put into a room by someone else (`rooms.join_policy`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JoinPolicy {
    /// Everyone named is invited and must accept (the default).
    #[default]
    Invite,
    /// The creator's or admin's accepted contacts are added directly; others are
    /// invited.
    Contacts,
    /// Everyone named is added directly, without consent: for trusted
    /// deployments and load tests.
    Open,
}

/// Room membership rules (`[rooms]` in the configuration file).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoomsConfig {
    /// Who is added directly and who is invited.
    pub join_policy: JoinPolicy,
    /// Pending invitations one user may have; more are refused with
    /// `LIMIT_EXCEEDED` until they accept or decline some.
    pub max_invites_per_user: usize,
}

impl Default for RoomsConfig {
    fn default() -> Self {
        Self {
            join_policy: JoinPolicy::Invite,
            max_invites_per_user: 100,
        }
    }
}

/// Who is whose accepted contact (the presence service knows), for
/// [`JoinPolicy::Contacts`].
pub trait Contacts: Send + Sync + std::fmt::Debug {
    /// Whether `a` and `b` are accepted contacts.
    fn are_contacts(&self, a: &str, b: &str) -> ServiceResult<bool>;
}

/// The longest client message id, in bytes.
pub const MAX_CLIENT_MESSAGE_ID: usize = 64;

/// Chat limits (`[chat]` in the configuration file).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChatConfig {
    /// The largest message text, in bytes.
    pub max_message_bytes: usize,
    /// Rooms one user may be in.
    pub max_rooms_per_user: usize,
    /// Participants one room may have.
    pub max_participants: usize,
    /// The largest history page.
    pub max_history_page: u32,
    /// Typing indicators one session may send per second.
    pub typing_per_second: u32,
    /// The longest room name, in bytes.
    pub max_room_name: usize,
    /// `RoomListRequest` answers at most this many rooms per page.
    pub max_room_list_page: u32,
    /// Bytes of rooms kept loaded while unused (a byte-weighed cache).
    pub cache_bytes: u64,
    /// Bytes of read marks kept cached.
    pub read_mark_cache_bytes: u64,
    /// The largest response, in bytes (the node's `limits.max_frame_size`): a
    /// room list page ends before it would grow past this.
    #[serde(skip)]
    pub max_response_bytes: usize,
    /// How long a client message id is remembered: a send retried later than
    /// this is a new message.
    #[serde(with = "crate::clock::duration_str")]
    pub idempotency_window: Duration,
    /// Client message ids remembered at most (the oldest are forgotten first).
    pub idempotency_max_keys: u64,
}

impl ChatConfig {
    /// Checks the section (every value is usable).
    pub fn validate(&self) -> Result<(), super::InvalidConfig> {
        Ok(())
    }
}

impl Default for ChatConfig {
    fn default() -> Self {
        Self {
            max_message_bytes: 4096,
            max_rooms_per_user: 1000,
            max_participants: 1000,
            max_history_page: 100,
            typing_per_second: 5,
            max_room_name: 256,
            max_room_list_page: 100,
            cache_bytes: 64 << 20,
            read_mark_cache_bytes: 64 << 20,
            max_response_bytes: 64 * 1024,
            idempotency_window: Duration::from_secs(24 * 3600),
            idempotency_max_keys: 1_000_000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct RoomMeta {
    name: String,
    admins: BTreeSet<String>,
    participants: BTreeSet<String>,
    /// Invited users who have not accepted yet (not participants).
    #[serde(default)]
    invitees: BTreeMap<String, Invitation>,
}

/// A pending invitation.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Invitation {
    inviter: String,
    at_ms: u64,
    admin: bool,
}

/// A change to a user's membership rows, written with the room's record.
enum Change {
    /// Becomes a participant (and is no longer invited).
    Join(String),
    /// Stops being a participant (their read mark goes too).
    Drop(String),
    /// Is invited.
    Invite(String),
    /// Is no longer invited (declined or withdrawn).
    Uninvite(String),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredMessage {
    sender: String,
    text: String,
    sent_at_ms: u64,
    system: bool,
}

#[derive(Debug)]
struct RoomState {
    id: String,
    meta: RoomMeta,
    last_offset: u64,
    last_message: Option<v1::ChatMessage>,
    /// The store's recovery generation ([`crate::store::Store::reopens`]) when
    /// this state last matched the disk. See [`ChatService::reconcile`].
    generation: u64,
}

impl RoomState {
    /// About the bytes the room takes in memory (for the cache's byte bound).
    fn weight(&self) -> usize {
        use prost::Message;
        let people: usize = self
            .meta
            .participants
            .iter()
            .chain(self.meta.admins.iter())
            .map(|p| p.len() + 48)
            .sum();
        self.id.len()
            + self.meta.name.len()
            + people
            + self.last_message.as_ref().map_or(0, |m| m.encoded_len())
            + 128
    }

    fn wire(&self) -> v1::Room {
        v1::Room {
            room_id: self.id.clone(),
            name: self.meta.name.clone(),
            admins: self.meta.admins.iter().cloned().collect(),
            participants: self.meta.participants.iter().cloned().collect(),
            last_offset: self.last_offset,
            invitees: self.meta.invitees.keys().cloned().collect(),
        }
    }

    fn invite_wire(&self, user: &str) -> Option<v1::RoomInvite> {
        let i = self.meta.invitees.get(user)?;
        Some(v1::RoomInvite {
            room_id: self.id.clone(),
            name: self.meta.name.clone(),
            inviter_id: i.inviter.clone(),
            invited_at_ms: i.at_ms,
            admin: i.admin,
        })
    }
}

/// Posts one write stores at most (the rest wait for the next).
const MAX_POSTS_PER_COMMIT: usize = 256;

/// A post waiting for its room.
#[derive(Debug)]
struct Post {
    /// `None`: the system sender.
    sender: Option<String>,
    texts: Vec<String>,
    key: Option<String>,
}

/// A post as its write stores it.
#[derive(Debug)]
struct PostRows {
    rows: Vec<Vec<u8>>,
    key: Option<String>,
    /// The sender whose read mark moves to the post's last message.
    mark_for: Option<String>,
}

/// What the write did with one post.
#[derive(Debug)]
enum Stored {
    /// Stored at these offsets.
    Appended { first: u64, last: u64 },
    /// A post with its key was stored before: the record (its first offset).
    Earlier(Vec<u8>),
}

/// Who sends a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sender<'a> {
    /// A participant.
    User(&'a str),
    /// A backend, through the server API.
    System,
}

/// The chat service.
#[derive(Debug)]
pub struct ChatService {
    deps: ServiceDeps,
    config: ChatConfig,
    membership: RoomsConfig,
    /// Set once the presence service is open (it needs this one first).
    contacts: OnceLock<Weak<dyn Contacts>>,
    rooms: crate::store::registry::Registry<RoomState>,
    /// Each room's messages.
    log: RedbLog,
    /// (room, sender, client message id) → the offset of the message stored for it.
    sent: Dedup,
    /// (user, room) → the user's read mark there. Shared values: a send moves its
    /// sender's cached mark with a read of the cache, not a write (a moka insert
    /// costs more than the rest of a send's bookkeeping), and a miss is filled
    /// from redb on the next read. Marks are read and moved under the room's lock.
    read_marks: crate::store::cache::Cache<(String, String), Arc<AtomicU64>>,
    /// room → posts waiting for its lock (see [`ChatService::post_keyed`]).
    waiting: Gather<Post, ServiceResult<Vec<v1::ChatMessage>>>,
    /// session → rooms it is subscribed to.
    subscribed: Mutex<HashMap<String, HashSet<String>>>,
    /// session → (window start, typing indicators in it).
    typing: Mutex<HashMap<String, (Instant, u32)>>,
    /// The last room retention looked at (it goes on after it next time).
    prune_cursor: Mutex<String>,
}

fn topic(room: &str) -> String {
    format!("room/{room}")
}

/// The resume key of a room's stream in `Hello.resume`.
pub fn resume_key(room: &str) -> String {
    topic(room)
}

/// A room as a session catching up sees it.
struct RoomStream<'a> {
    chat: &'a ChatService,
    ctx: &'a SessionCtx,
    room_id: &'a str,
    handle: Loaded<RoomState>,
}

impl CatchUpStream for RoomStream<'_> {
    type Guard = tokio::sync::OwnedMutexGuard<RoomState>;

    async fn lock(&self) -> Result<Option<(Self::Guard, u64)>, StoreError> {
        let mut room = self.handle.clone().lock_owned().await;
        self.chat.reconcile(&mut room).await?;
        if !room.meta.participants.contains(self.ctx.user_id()) {
            return Ok(None);
        }
        let last = room.last_offset;
        Ok(Some((room, last)))
    }

    fn read(&self, from: u64, to: u64) -> BoxFuture<'_, Result<Vec<v1::Push>, StoreError>> {
        Box::pin(async move {
            Ok(self
                .chat
                .read_messages(self.room_id, from, to)
                .await?
                .iter()
                .map(message_push)
                .collect())
        })
    }

    fn subscribe(&self, _room: &mut Self::Guard) {
        self.chat
            .subscribe(self.ctx.subscriber.clone(), self.room_id);
    }

    fn name(&self) -> String {
        topic(self.room_id)
    }
}

fn not_found() -> ServiceError {
    ServiceError::new(ErrorCode::NotFound, "no such room")
}

fn message_wire(room: &str, offset: u64, m: StoredMessage) -> v1::ChatMessage {
    v1::ChatMessage {
        room_id: room.to_owned(),
        offset,
        message_id: format!("{room}:{offset}"),
        sender_id: m.sender,
        text: m.text,
        sent_at_ms: m.sent_at_ms,
        system: m.system,
    }
}

fn message_push(m: &v1::ChatMessage) -> v1::Push {
    v1::Push {
        stream: topic(&m.room_id),
        offset: m.offset,
        event: Some(push::Event::ChatMessage(m.clone())),
    }
}

impl ChatService {
    /// Opens the service, creating its tables.
    pub fn open(
        deps: ServiceDeps,
        config: ChatConfig,
        membership: RoomsConfig,
    ) -> Result<Arc<Self>, StoreError> {
        let mut txn = deps.store.db().begin_write()?;
        txn.set_quick_repair(true);
        txn.open_table(ROOMS)?;
        txn.open_table(OFFSETS)?;
        txn.open_table(MESSAGES)?;
        txn.open_table(USER_ROOMS)?;
        txn.open_table(READ_MARKS)?;
        txn.open_table(INVITES)?;
        txn.commit()?;
        let log = RedbLog::open(&deps.store, &deps.writer, "chat_messages", "chat_epochs")?;
        let (cache_bytes, read_mark_cache_bytes) =
            (config.cache_bytes, config.read_mark_cache_bytes);
        let sent = Dedup::open(&deps.store, SENT_KEYS, SENT_AGES)?;
        Ok(Arc::new(Self {
            deps,
            config,
            membership,
            contacts: OnceLock::new(),
            log,
            sent,
            rooms: crate::store::registry::Registry::new(
                "rooms",
                cache_bytes,
                Duration::from_secs(600),
                RoomState::weight,
            ),
            read_marks: crate::store::cache::CacheSpec::new(
                read_mark_cache_bytes,
                Duration::from_secs(600),
            )
            .build_weighed("read_marks", |(user, room): &(String, String), _| {
                user.len() + room.len() + 8
            }),
            waiting: Gather::default(),
            subscribed: Mutex::new(HashMap::new()),
            typing: Mutex::new(HashMap::new()),
            prune_cursor: Mutex::new(String::new()),
        }))
    }

    /// Tells the service who is whose contact, for [`JoinPolicy::Contacts`].
    pub fn set_contacts(&self, contacts: Weak<dyn Contacts>) {
        let _ = self.contacts.set(contacts);
    }

    // ---- sessions -------------------------------------------------------------

    /// A session opened: it gets what it missed in the rooms named in `resume`
    /// (in order), then every room's live messages. See [`super::catch_up`]: the
    /// backlog is streamed outside the room's lock.
    ///
    /// Fails (with the session subscribed to only some rooms) when storage fails.
    pub async fn connected(
        &self,
        ctx: &SessionCtx,
        resume: &HashMap<String, u64>,
    ) -> Result<(), StoreError> {
        let rooms = self
            .user_rooms(ctx.user_id())
            .inspect_err(|e| tracing::warn!(error = %e, "listing rooms at connect"))?;
        for room_id in rooms {
            let handle = match self.load(&room_id).await {
                Ok(Some(handle)) => handle,
                Ok(None) => continue,
                Err(e) if e.code == ErrorCode::Unavailable => {
                    return Err(StoreError::Unavailable(e.message));
                }
                Err(e) => {
                    tracing::error!(error = %e.message, room = %room_id, "loading a room at connect");
                    continue;
                }
            };
            let stream = RoomStream {
                chat: self,
                ctx,
                room_id: &room_id,
                handle,
            };
            let from = resume.get(&topic(&room_id)).copied();
            match catch_up(&stream, ctx.subscriber.as_ref(), StreamKind::Chat, from).await {
                Ok(CatchUp::Live | CatchUp::Gone) => {}
                // A slow consumer: the gateway closes the session.
                Ok(CatchUp::Slow) => return Ok(()),
                Err(e) => {
                    tracing::warn!(error = %e, "reading messages for a catch-up");
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    fn subscribe(&self, sub: Arc<dyn Subscriber>, room: &str) {
        if sub.is_remote() {
            return;
        }
        self.subscribed
            .locked()
            .entry(sub.session_id().to_owned())
            .or_default()
            .insert(room.to_owned());
        self.deps.hub.subscribe(&topic(room), sub);
    }

    fn unsubscribe(&self, session: &str, room: &str) {
        if let Some(rooms) = self.subscribed.locked().get_mut(session) {
            rooms.remove(room);
        }
        self.deps.hub.unsubscribe(&topic(room), session);
    }

    /// A session ended.
    pub fn disconnected(&self, ctx: &SessionCtx) {
        let rooms = self
            .subscribed
            .locked()
            .remove(ctx.session_id())
            .unwrap_or_default();
        for room in rooms {
            self.deps.hub.unsubscribe(&topic(&room), ctx.session_id());
        }
        self.typing.locked().remove(ctx.session_id());
    }

    fn sessions_of(&self, user: &str) -> Vec<Arc<dyn Subscriber>> {
        self.deps.hub.subscribers(&super::user_topic(user))
    }

    fn room_event(&self, kind: room_event::Kind, room: &RoomState, user: &str) -> v1::Push {
        v1::Push {
            stream: String::new(),
            offset: 0,
            event: Some(push::Event::RoomEvent(v1::RoomEvent {
                kind: kind as i32,
                room_id: room.id.clone(),
                user_id: user.to_owned(),
                room: Some(room.wire()),
            })),
        }
    }

    // ---- rooms ----------------------------------------------------------------

    fn user_rooms(&self, user: &str) -> Result<Vec<String>, StoreError> {
        self.rooms_keyed_by(USER_ROOMS, user)
    }

    /// The rooms of `user` in a table keyed by (user, room), in room id order.
    fn rooms_keyed_by(
        &self,
        table: TableDefinition<(&str, &str), u8>,
        user: &str,
    ) -> Result<Vec<String>, StoreError> {
        let txn = self.deps.store.db().begin_read()?;
        let table = txn.open_table(table)?;
        let mut rooms = Vec::new();
        for entry in table.range((user, "")..)? {
            let (key, _) = entry?;
            let (u, room) = key.value();
            if u != user {
                break;
            }
            rooms.push(room.to_owned());
        }
        Ok(rooms)
    }

    fn check_room_count(&self, user: &str) -> ServiceResult<()> {
        if self.user_rooms(user)?.len() >= self.config.max_rooms_per_user {
            return Err(ServiceError::new(
                ErrorCode::LimitExceeded,
                format!(
                    "{user} is in {} rooms already",
                    self.config.max_rooms_per_user
                ),
            ));
        }
        Ok(())
    }

    /// Whether `inviter` may put `user` into a room directly (or must invite them).
    fn joins_directly(&self, inviter: &str, user: &str) -> ServiceResult<bool> {
        match self.membership.join_policy {
            JoinPolicy::Open => Ok(true),
            JoinPolicy::Invite => Ok(false),
            JoinPolicy::Contacts => match self.contacts.get().and_then(Weak::upgrade) {
                Some(c) => c.are_contacts(inviter, user),
                None => Ok(false),
            },
        }
    }

    fn invites_of(&self, user: &str) -> Result<Vec<String>, StoreError> {
        self.rooms_keyed_by(INVITES, user)
    }

    fn check_invite_count(&self, user: &str) -> ServiceResult<()> {
        if self.invites_of(user)?.len() >= self.membership.max_invites_per_user {
            return Err(ServiceError::new(
                ErrorCode::LimitExceeded,
                format!(
                    "{user} has {} pending invitations already",
                    self.membership.max_invites_per_user
                ),
            ));
        }
        Ok(())
    }

    fn check_room_size(&self, meta: &RoomMeta) -> ServiceResult<()> {
        if meta.participants.len() + meta.invitees.len() > self.config.max_participants {
            return Err(ServiceError::new(
                ErrorCode::LimitExceeded,
                format!(
                    "rooms hold at most {} participants and invitees",
                    self.config.max_participants
                ),
            ));
        }
        Ok(())
    }

    fn push_invite(&self, room: &RoomState, user: &str) {
        let Some(invite) = room.invite_wire(user) else {
            return;
        };
        let push = v1::Push {
            stream: String::new(),
            offset: 0,
            event: Some(push::Event::RoomInvite(invite)),
        };
        for s in self.sessions_of(user) {
            let _ = s.push(StreamKind::Chat, push.clone());
        }
    }

    /// Creates a room with the caller as admin. The others named join directly or
    /// are invited, as `rooms.join_policy` says.
    pub async fn create(
        &self,
        ctx: &SessionCtx,
        req: v1::RoomCreateRequest,
    ) -> ServiceResult<v1::RoomCreateResponse> {
        self.deps.rates.check(Action::RoomCreate, ctx.user_id())?;
        let chosen = !req.room_id.is_empty();
        let mut id = if chosen {
            RoomId::chosen(&UserId::parse(ctx.user_id())?, &req.room_id)?.into_string()
        } else {
            RoomId::generated().into_string()
        };
        if req.name.len() > self.config.max_room_name {
            return Err(ServiceError::new(
                ErrorCode::LimitExceeded,
                "room name too long",
            ));
        }
        let me = ctx.user_id().to_owned();
        let mut meta = RoomMeta {
            name: req.name,
            admins: BTreeSet::from([me.clone()]),
            participants: BTreeSet::from([me.clone()]),
            invitees: BTreeMap::new(),
        };
        let now = self.deps.clock.now_ms();
        for p in req.participants {
            let p = UserId::parse(p)?.into_string();
            if meta.participants.contains(&p) || meta.invitees.contains_key(&p) {
                continue;
            }
            if self.joins_directly(&me, &p)? {
                meta.participants.insert(p);
            } else {
                let invitation = Invitation {
                    inviter: me.clone(),
                    at_ms: now,
                    admin: false,
                };
                meta.invitees.insert(p, invitation);
            }
            self.check_room_size(&meta)?;
        }
        for p in &meta.participants {
            self.check_room_count(p)?;
        }
        for p in meta.invitees.keys() {
            self.check_invite_count(p)?;
        }
        let bytes = json(&meta);
        let members: Vec<String> = meta.participants.iter().cloned().collect();
        let invitees: Vec<String> = meta.invitees.keys().cloned().collect();
        let mut attempts = 0;
        loop {
            attempts += 1;
            let taken = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let (flag, room_id, members, invitees, bytes) = (
                taken.clone(),
                id.clone(),
                members.clone(),
                invitees.clone(),
                bytes.clone(),
            );
            self.deps
                .writer
                .write(move |txn| {
                    let mut rooms = txn.open_table(ROOMS)?;
                    // A removed room leaves its last offset behind: its id is not
                    // reused, so no stale resume offset points into another room.
                    let exists = rooms.get(room_id.as_str())?.is_some()
                        || txn.open_table(OFFSETS)?.get(room_id.as_str())?.is_some();
                    flag.store(exists, Ordering::Relaxed);
                    if exists {
                        return Ok(());
                    }
                    rooms.insert(room_id.as_str(), bytes.as_slice())?;
                    txn.open_table(OFFSETS)?.insert(room_id.as_str(), 0)?;
                    let mut user_rooms = txn.open_table(USER_ROOMS)?;
                    for m in &members {
                        user_rooms.insert((m.as_str(), room_id.as_str()), 0)?;
                    }
                    let mut invites = txn.open_table(INVITES)?;
                    for m in &invitees {
                        invites.insert((m.as_str(), room_id.as_str()), 0)?;
                    }
                    Ok(())
                })
                .await?;
            if !taken.load(Ordering::Relaxed) {
                break;
            }
            // Only the caller's own chosen ids can be taken: they are in the
            // caller's namespace. A generated id that collides is drawn again.
            if chosen {
                return Err(ServiceError::new(
                    ErrorCode::Conflict,
                    "you already created a room with this id",
                ));
            }
            if attempts >= 3 {
                return Err(ServiceError::internal("generated room ids keep colliding"));
            }
            id = RoomId::generated().into_string();
        }
        let handle = self
            .load(&id)
            .await?
            .ok_or_else(|| ServiceError::internal("room vanished"))?;
        let room = self.locked(&handle).await?;
        let event = self.room_event(room_event::Kind::Created, &room, ctx.user_id());
        for user in &room.meta.participants {
            for s in self.sessions_of(user) {
                self.subscribe(s.clone(), &room.id);
                let _ = s.push(StreamKind::Chat, event.clone());
            }
        }
        for user in room.meta.invitees.keys() {
            self.push_invite(&room, user);
        }
        Ok(v1::RoomCreateResponse {
            room: Some(room.wire()),
        })
    }

    /// The room, if it exists and `user` is in it; `NOT_FOUND` otherwise (the same
    /// answer either way, so that outsiders cannot learn which rooms exist).
    async fn room_for(&self, room_id: &RoomId) -> ServiceResult<Loaded<RoomState>> {
        self.load(room_id.as_str()).await?.ok_or_else(not_found)
    }

    async fn write_meta(
        &self,
        room: &RoomState,
        meta: &RoomMeta,
        change: Change,
    ) -> ServiceResult<()> {
        let bytes = json(meta);
        let id = room.id.clone();
        self.deps
            .writer
            .write(move |txn| {
                txn.open_table(ROOMS)?
                    .insert(id.as_str(), bytes.as_slice())?;
                let id = id.as_str();
                match &change {
                    Change::Join(u) => {
                        txn.open_table(USER_ROOMS)?.insert((u.as_str(), id), 0)?;
                        txn.open_table(INVITES)?.remove((u.as_str(), id))?;
                    }
                    Change::Drop(u) => {
                        txn.open_table(USER_ROOMS)?.remove((u.as_str(), id))?;
                        txn.open_table(READ_MARKS)?.remove((u.as_str(), id))?;
                    }
                    Change::Invite(u) => {
                        txn.open_table(INVITES)?.insert((u.as_str(), id), 0)?;
                    }
                    Change::Uninvite(u) => {
                        txn.open_table(INVITES)?.remove((u.as_str(), id))?;
                    }
                }
                Ok(())
            })
            .await?;
        Ok(())
    }

    /// Adds a participant directly, without an invitation: for the server API,
    /// whose callers are trusted backends. `NOT_FOUND` if the room does not exist.
    pub async fn add_member(
        &self,
        room_id: &RoomId,
        user: &UserId,
        admin: bool,
    ) -> ServiceResult<v1::Room> {
        let handle = self.room_for(room_id).await?;
        let mut room = self.locked(&handle).await?;
        self.join(&mut room, user.as_str(), admin).await?;
        Ok(room.wire())
    }

    /// Makes `user` a participant (from invitee or outsider).
    async fn join(&self, room: &mut RoomState, user: &str, admin: bool) -> ServiceResult<()> {
        let mut meta = room.meta.clone();
        let invited = meta.invitees.remove(user).is_some();
        let new = meta.participants.insert(user.to_owned());
        if new {
            self.check_room_size(&meta)?;
            self.check_room_count(user)?;
        }
        let admin_changed = admin && meta.admins.insert(user.to_owned());
        if !new && !admin_changed && !invited {
            return Ok(());
        }
        self.write_meta(room, &meta, Change::Join(user.to_owned()))
            .await?;
        room.meta = meta;
        if new {
            for s in self.sessions_of(user) {
                self.subscribe(s, &room.id);
            }
            let event = self.room_event(room_event::Kind::Added, room, user);
            self.deps
                .hub
                .publish(&topic(&room.id), StreamKind::Chat, &event);
        }
        Ok(())
    }

    /// Invites `user` (an outsider) into the room.
    async fn invite(
        &self,
        room: &mut RoomState,
        inviter: &str,
        user: &str,
        admin: bool,
    ) -> ServiceResult<()> {
        let mut meta = room.meta.clone();
        match meta.invitees.get_mut(user) {
            // Already invited: only the admin flag may change.
            Some(i) if i.admin == admin => return Ok(()),
            Some(i) => i.admin = admin,
            None => {
                let invitation = Invitation {
                    inviter: inviter.to_owned(),
                    at_ms: self.deps.clock.now_ms(),
                    admin,
                };
                meta.invitees.insert(user.to_owned(), invitation);
                self.check_room_size(&meta)?;
                self.check_invite_count(user)?;
            }
        }
        self.write_meta(room, &meta, Change::Invite(user.to_owned()))
            .await?;
        room.meta = meta;
        let event = self.room_event(room_event::Kind::Invited, room, user);
        self.deps
            .hub
            .publish(&topic(&room.id), StreamKind::Chat, &event);
        self.push_invite(room, user);
        Ok(())
    }

    /// Takes back an invitation (declined, or withdrawn by an admin).
    async fn uninvite(&self, room: &mut RoomState, user: &str) -> ServiceResult<()> {
        let mut meta = room.meta.clone();
        if meta.invitees.remove(user).is_none() {
            return Err(not_found());
        }
        self.write_meta(room, &meta, Change::Uninvite(user.to_owned()))
            .await?;
        room.meta = meta;
        let event = self.room_event(room_event::Kind::Declined, room, user);
        self.deps
            .hub
            .publish(&topic(&room.id), StreamKind::Chat, &event);
        Ok(())
    }

    /// Adds a participant, or invites them, as `rooms.join_policy` says (admins
    /// only). A participant already in the room may be made an admin.
    pub async fn add(
        &self,
        ctx: &SessionCtx,
        req: v1::RoomAddRequest,
    ) -> ServiceResult<v1::RoomAddResponse> {
        let user = UserId::parse(req.user_id.as_str())?;
        let handle = self.room_for(&RoomId::parse(req.room_id)?).await?;
        let mut room = self.locked(&handle).await?;
        self.require_admin(&room, ctx.user_id())?;
        let user = user.as_str();
        if room.meta.participants.contains(user) || self.joins_directly(ctx.user_id(), user)? {
            self.join(&mut room, user, req.admin).await?;
        } else {
            self.invite(&mut room, ctx.user_id(), user, req.admin)
                .await?;
        }
        Ok(v1::RoomAddResponse {
            room: Some(room.wire()),
        })
    }

    /// The caller's pending invitations, oldest first.
    pub async fn invites(&self, ctx: &SessionCtx) -> ServiceResult<v1::RoomInviteListResponse> {
        let mut invites = Vec::new();
        for id in self.invites_of(ctx.user_id())? {
            let Some(handle) = self.load(&id).await? else {
                continue;
            };
            if let Some(i) = self.locked(&handle).await?.invite_wire(ctx.user_id()) {
                invites.push(i);
            }
        }
        invites.sort_by(|a, b| (a.invited_at_ms, &a.room_id).cmp(&(b.invited_at_ms, &b.room_id)));
        Ok(v1::RoomInviteListResponse { invites })
    }

    /// Accepts an invitation: the caller becomes a participant. `NOT_FOUND` when
    /// there is no invitation (as for a room that does not exist).
    pub async fn accept(
        &self,
        ctx: &SessionCtx,
        req: v1::RoomInviteAcceptRequest,
    ) -> ServiceResult<v1::RoomInviteAcceptResponse> {
        let handle = self.room_for(&RoomId::parse(req.room_id)?).await?;
        let mut room = self.locked(&handle).await?;
        let Some(invitation) = room.meta.invitees.get(ctx.user_id()) else {
            return Err(not_found());
        };
        let admin = invitation.admin;
        self.join(&mut room, ctx.user_id(), admin).await?;
        Ok(v1::RoomInviteAcceptResponse {
            room: Some(room.wire()),
        })
    }

    /// Declines an invitation. `NOT_FOUND` when there is none.
    pub async fn decline(
        &self,
        ctx: &SessionCtx,
        req: v1::RoomInviteDeclineRequest,
    ) -> ServiceResult<v1::RoomInviteDeclineResponse> {
        let handle = self.room_for(&RoomId::parse(req.room_id)?).await?;
        let mut room = self.locked(&handle).await?;
        self.uninvite(&mut room, ctx.user_id()).await?;
        Ok(v1::RoomInviteDeclineResponse {})
    }

    fn require_admin(&self, room: &RoomState, user: &str) -> ServiceResult<()> {
        if !room.meta.participants.contains(user) {
            return Err(not_found());
        }
        if !room.meta.admins.contains(user) {
            return Err(ServiceError::new(
                ErrorCode::PermissionDenied,
                "only room admins may do this",
            ));
        }
        Ok(())
    }

    /// Removes a participant (admins only).
    pub async fn remove(
        &self,
        ctx: &SessionCtx,
        req: v1::RoomRemoveRequest,
    ) -> ServiceResult<v1::RoomRemoveResponse> {
        let handle = self.room_for(&RoomId::parse(req.room_id.as_str())?).await?;
        let mut room = self.locked(&handle).await?;
        self.require_admin(&room, ctx.user_id())?;
        if room.meta.invitees.contains_key(&req.user_id) {
            // Withdraws the invitation.
            self.uninvite(&mut room, &req.user_id).await?;
            return Ok(v1::RoomRemoveResponse {});
        }
        self.drop_participant(&mut room, &req.user_id, room_event::Kind::Removed)
            .await?;
        Ok(v1::RoomRemoveResponse {})
    }

    /// Leaves a room.
    pub async fn leave(
        &self,
        ctx: &SessionCtx,
        req: v1::RoomLeaveRequest,
    ) -> ServiceResult<v1::RoomLeaveResponse> {
        let handle = self.room_for(&RoomId::parse(req.room_id.as_str())?).await?;
        let mut room = self.locked(&handle).await?;
        if !room.meta.participants.contains(ctx.user_id()) {
            return Err(not_found());
        }
        self.drop_participant(&mut room, ctx.user_id(), room_event::Kind::Left)
            .await?;
        Ok(v1::RoomLeaveResponse {})
    }

    async fn drop_participant(
        &self,
        room: &mut RoomState,
        user: &str,
        kind: room_event::Kind,
    ) -> ServiceResult<()> {
        let mut meta = room.meta.clone();
        if !meta.participants.remove(user) {
            return Err(ServiceError::new(ErrorCode::NotFound, "not a participant"));
        }
        meta.admins.remove(user);
        // A room with participants keeps an admin.
        if meta.admins.is_empty()
            && let Some(first) = meta.participants.iter().next().cloned()
        {
            meta.admins.insert(first);
        }
        self.write_meta(room, &meta, Change::Drop(user.to_owned()))
            .await?;
        room.meta = meta;
        let event = self.room_event(kind, room, user);
        // The one who goes hears it too, then stops hearing the room.
        self.deps
            .hub
            .publish(&topic(&room.id), StreamKind::Chat, &event);
        for s in self.sessions_of(user) {
            self.unsubscribe(s.session_id(), &room.id);
        }
        self.read_marks
            .invalidate(&(user.to_owned(), room.id.clone()))
            .await;
        Ok(())
    }

    // ---- messages ---------------------------------------------------------------

    /// Sends a message from a participant.
    pub async fn send(
        &self,
        ctx: &SessionCtx,
        req: v1::ChatSendRequest,
    ) -> ServiceResult<v1::ChatSendResponse> {
        self.deps.rates.check(Action::ChatSend, ctx.user_id())?;
        if req.client_message_id.len() > MAX_CLIENT_MESSAGE_ID {
            return Err(ServiceError::bad_request(format!(
                "client_message_id holds at most {MAX_CLIENT_MESSAGE_ID} bytes"
            )));
        }
        let room = RoomId::parse(req.room_id)?;
        let key = (!req.client_message_id.is_empty())
            .then(|| sent_key(&req.client_message_id, room.as_str(), ctx.user_id()));
        let mut posted = self
            .post_keyed(&room, Sender::User(ctx.user_id()), vec![req.text], key)
            .await?;
        let message = posted
            .pop()
            .ok_or_else(|| ServiceError::internal("a post returned no message"))?;
        Ok(v1::ChatSendResponse {
            message: Some(message),
        })
    }

    /// Forgets client message ids past the configured window and count, in as many
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
        let counter = &self.deps.metrics.idempotency_pruned[0];
        super::prune(&self.deps, &self.sent, keep, batches, counter).await
    }

    /// Client message ids remembered now.
    pub fn idempotency_keys(&self) -> Result<u64, StoreError> {
        self.sent.len(&self.deps.store)
    }

    /// Commits a message and publishes it. Used by participants and by the server
    /// API (as the system sender).
    pub async fn post(
        &self,
        room_id: &RoomId,
        sender: Sender<'_>,
        text: String,
    ) -> ServiceResult<v1::ChatMessage> {
        let mut posted = self.post_many(room_id, sender, vec![text]).await?;
        posted
            .pop()
            .ok_or_else(|| ServiceError::internal("a post returned no message"))
    }

    /// Commits several messages from one sender in one write, with consecutive
    /// offsets, and publishes them in order (an import, a backend's batch). Each text
    /// is checked as [`post`](Self::post) checks it; one bad text refuses them all.
    pub async fn post_many(
        &self,
        room_id: &RoomId,
        sender: Sender<'_>,
        texts: Vec<String>,
    ) -> ServiceResult<Vec<v1::ChatMessage>> {
        self.post_keyed(room_id, sender, texts, None).await
    }

    /// [`post_many`](Self::post_many), once per idempotency `key`: if a post with
    /// the same key is stored, that one's first message is returned and nothing
    /// is stored or published.
    ///
    /// Posts to one room share commits: a post queues up for the room (see
    /// [`super::gather`]), then waits for its answer or for the room's lock.
    /// Whoever takes the lock stores every post queued by then in one write and
    /// answers each, so a busy room takes as many posts per commit as arrive
    /// while the previous commit is paced or written, instead of one.
    async fn post_keyed(
        &self,
        room_id: &RoomId,
        sender: Sender<'_>,
        texts: Vec<String>,
        key: Option<String>,
    ) -> ServiceResult<Vec<v1::ChatMessage>> {
        for text in &texts {
            if text.is_empty() {
                return Err(ServiceError::bad_request("empty message"));
            }
            if text.len() > self.config.max_message_bytes {
                return Err(ServiceError::new(
                    ErrorCode::LimitExceeded,
                    format!(
                        "messages hold at most {} bytes",
                        self.config.max_message_bytes
                    ),
                ));
            }
        }
        if texts.is_empty() {
            return Ok(vec![]);
        }
        let handle = self.room_for(room_id).await?;
        let post = Post {
            sender: match sender {
                Sender::User(u) => Some(u.to_owned()),
                Sender::System => None,
            },
            texts,
            key,
        };
        self.waiting
            .wait_or_serve(
                room_id.as_str(),
                post,
                self.locked(&handle),
                self,
                |chat, room| Box::pin(chat.post_waiting(room)),
            )
            .await?
            .into_result(
                "the send was interrupted and may have been stored; retry with the same client_message_id",
            )
    }

    /// Stores the posts waiting for `room` in one write, publishes their messages
    /// in offset order and answers each. Returns how many posts it took. Call
    /// under the room's lock.
    async fn post_waiting(&self, room: &mut RoomState) -> usize {
        let taken = self.waiting.take(&room.id, MAX_POSTS_PER_COMMIT);
        let count = taken.len();
        let now = self.deps.clock.now_ms();
        // What the write stores, and beside it what each post's answer needs.
        let (mut rows, mut waiting) = (Vec::with_capacity(count), Vec::with_capacity(count));
        for (post, reply) in taken {
            if let Some(u) = &post.sender
                && !room.meta.participants.contains(u)
            {
                let _ = reply.send(Err(not_found()));
                continue;
            }
            let stored: Vec<StoredMessage> = post
                .texts
                .into_iter()
                .map(|text| StoredMessage {
                    sender: post.sender.clone().unwrap_or_default(),
                    text,
                    sent_at_ms: now,
                    system: post.sender.is_none(),
                })
                .collect();
            rows.push(PostRows {
                rows: stored.iter().map(json).collect(),
                key: post.key,
                mark_for: post.sender,
            });
            waiting.push((stored, reply));
        }
        if rows.is_empty() {
            return count;
        }
        let rows = Arc::new(rows);
        match self.store_posts(room, rows.clone(), now).await {
            Err(e) => {
                for (_, reply) in waiting {
                    let _ = reply.send(Err(e.clone()));
                }
            }
            Ok(outcomes) => {
                for ((row, (stored, reply)), outcome) in rows.iter().zip(waiting).zip(outcomes) {
                    let answer = self.posted(room, row, stored, outcome).await;
                    let _ = reply.send(answer);
                }
            }
        }
        count
    }

    /// Writes `posts` after the room's last offset in one transaction, each
    /// with its idempotency record and its sender's read mark. Retries once the
    /// room is caught up if its log moved (a write whose sender was told it
    /// failed, or gave up, that still committed). Call under the room's lock.
    async fn store_posts(
        &self,
        room: &mut RoomState,
        posts: Arc<Vec<PostRows>>,
        now: u64,
    ) -> ServiceResult<Vec<Stored>> {
        let count: usize = posts.iter().map(|p| p.rows.len()).sum();
        let mut attempts = 0;
        loop {
            attempts += 1;
            let base = room.last_offset;
            if base.checked_add(count as u64).is_none() {
                return Err(ServiceError::new(
                    ErrorCode::LimitExceeded,
                    "the room is full",
                ));
            }
            let result = Arc::new(Mutex::new((Vec::new(), None)));
            let (id, log, sent, posts, out) = (
                room.id.clone(),
                self.log.clone(),
                self.sent.clone(),
                posts.clone(),
                result.clone(),
            );
            self.deps
                .writer
                .write(move |txn| {
                    let mut outcomes = Vec::with_capacity(posts.len());
                    let mut last = base;
                    let mut marks: HashMap<&str, u64> = HashMap::new();
                    for post in posts.iter() {
                        // Checked in the transaction that would store the post: a
                        // retry finds the record exactly when the first one
                        // committed (in this same write, too).
                        if let Some(key) = &post.key
                            && let Some(record) = sent.get_in(txn, key)?
                        {
                            outcomes.push(Stored::Earlier(record));
                            continue;
                        }
                        let first = last + 1;
                        match log.append_in(txn, &id, last, &post.rows) {
                            Ok(l) => last = l,
                            Err(AppendError::Conflict { actual, .. }) if last == base => {
                                // Nothing written yet; the room is caught up below.
                                *out.locked() = (Vec::new(), Some(actual));
                                return Ok(());
                            }
                            Err(e) => return Err(append_failed(e)),
                        }
                        outcomes.push(Stored::Appended { first, last });
                        if let Some(u) = &post.mark_for {
                            marks.insert(u, last);
                        }
                        if let Some(key) = &post.key {
                            sent.put_in(txn, key, now, &first.to_le_bytes())?;
                        }
                    }
                    // The room's last offset is its log's last entry; the offsets
                    // table keeps it only for a removed room.
                    if !marks.is_empty() {
                        let mut table = txn.open_table(READ_MARKS)?;
                        for (user, mark) in marks {
                            table.insert((user, id.as_str()), mark)?;
                        }
                    }
                    *out.locked() = (outcomes, None);
                    Ok(())
                })
                .await?;
            let (outcomes, moved) = std::mem::take(&mut *result.locked());
            match moved {
                None => return Ok(outcomes),
                Some(actual) if actual > room.last_offset && attempts < 3 => {
                    tracing::warn!(room = %room.id, actual, "room offsets moved under a send");
                    self.publish_stored(room, actual).await?;
                }
                Some(actual) => {
                    return Err(ServiceError::internal(format!(
                        "room {} is at offset {actual}, expected {}",
                        room.id, room.last_offset
                    )));
                }
            }
        }
    }

    /// Takes one stored post into the room's state, publishes its messages and
    /// returns them (or, for a post stored before, the earlier one's first
    /// message). Call under the room's lock, in the order the posts were stored.
    async fn posted(
        &self,
        room: &mut RoomState,
        post: &PostRows,
        stored: Vec<StoredMessage>,
        outcome: Stored,
    ) -> ServiceResult<Vec<v1::ChatMessage>> {
        let (first, last) = match outcome {
            Stored::Appended { first, last } => (first, last),
            Stored::Earlier(bytes) => {
                let offset = <[u8; 8]>::try_from(bytes.as_slice())
                    .map(u64::from_le_bytes)
                    .map_err(|_| ServiceError::internal("a stored client message id is corrupt"))?;
                if offset > room.last_offset {
                    // Stored by a commit whose sender was told it failed (a failed
                    // fsync that still reached the disk): deliver it now, once.
                    let last = self.log.last_offset(&room.id).await?;
                    self.publish_stored(room, last).await?;
                }
                let message = self.read_messages(&room.id, offset, offset).await?.pop();
                // The message may be gone (retention); its offset is the answer.
                let message = message.unwrap_or_else(|| v1::ChatMessage {
                    room_id: room.id.clone(),
                    offset,
                    message_id: format!("{}:{offset}", room.id),
                    sender_id: post.mark_for.clone().unwrap_or_default(),
                    ..Default::default()
                });
                return Ok(vec![message]);
            }
        };
        room.last_offset = last;
        let messages: Vec<v1::ChatMessage> = (first..)
            .zip(stored)
            .map(|(offset, m)| message_wire(&room.id, offset, m))
            .collect();
        room.last_message = messages.last().cloned();
        if let Some(user) = &post.mark_for {
            self.raise_cached_mark(user.clone(), &room.id, last).await;
        }
        // Published under the room lock: in offset order, after any catch-up.
        for m in &messages {
            self.deps
                .hub
                .publish(&topic(&room.id), StreamKind::Chat, &message_push(m));
        }
        Ok(messages)
    }

    /// Publishes the messages after `room.last_offset` up to `last` that are
    /// stored but were never published (their sender was not told they were
    /// stored), and takes them into the room's state. Call under the room's lock.
    async fn publish_stored(&self, room: &mut RoomState, last: u64) -> Result<(), StoreError> {
        if last <= room.last_offset {
            return Ok(());
        }
        let missed = self
            .read_messages(&room.id, room.last_offset + 1, last)
            .await?;
        for m in &missed {
            self.deps
                .hub
                .publish(&topic(&room.id), StreamKind::Chat, &message_push(m));
        }
        if let Some(m) = missed.last() {
            room.last_message = Some(m.clone());
        }
        room.last_offset = last;
        Ok(())
    }

    /// The messages `from..=to` of a room.
    async fn read_messages(
        &self,
        room: &str,
        from: u64,
        to: u64,
    ) -> Result<Vec<v1::ChatMessage>, StoreError> {
        let entries = self.log.read(room, from, to, usize::MAX).await?;
        entries
            .into_iter()
            .map(|e| {
                let m: StoredMessage = serde_json::from_slice(&e.data).map_err(corrupt)?;
                Ok(message_wire(room, e.offset, m))
            })
            .collect()
    }

    /// A page of history before an offset.
    pub async fn history(
        &self,
        ctx: &SessionCtx,
        req: v1::ChatHistoryRequest,
    ) -> ServiceResult<v1::ChatHistoryResponse> {
        let handle = self.room_for(&RoomId::parse(req.room_id.as_str())?).await?;
        let last = {
            let room = self.locked(&handle).await?;
            if !room.meta.participants.contains(ctx.user_id()) {
                return Err(not_found());
            }
            room.last_offset
        };
        let first = self.log.first_offset(&req.room_id)?;
        let page = super::Page::before(
            req.before_offset,
            req.limit,
            self.config.max_history_page,
            last,
        )
        .and_then(|p| p.kept_from(first));
        let mut messages = match page {
            Some(p) => self.read_messages(&req.room_id, p.from, p.to).await?,
            None => vec![],
        };
        // A page is one frame: keep the newest messages that fit in it (one at
        // least), so that large messages make a shorter page rather than an
        // answer too large to send. The client asks again before the first.
        use prost::Message;
        // Room for the response's envelope and other fields, and for each
        // message's field tag and length prefix.
        const ENVELOPE: usize = 512;
        const PER_MESSAGE: usize = 8;
        let budget = self.config.max_response_bytes.saturating_sub(ENVELOPE);
        let mut size = 0;
        let mut keep_from = messages.len();
        for (i, m) in messages.iter().enumerate().rev() {
            let len = m.encoded_len() + PER_MESSAGE;
            if size + len > budget && keep_from < messages.len() {
                break;
            }
            size += len;
            keep_from = i;
        }
        messages.drain(..keep_from);
        let from = messages.first().map(|m| m.offset).or(page.map(|p| p.from));
        Ok(v1::ChatHistoryResponse {
            messages,
            more: from.is_some_and(|from| from > first),
            first_offset: first,
        })
    }

    fn read_mark_stored(&self, user: &str, room: &str) -> Result<u64, StoreError> {
        let txn = self.deps.store.db().begin_read()?;
        Ok(txn
            .open_table(READ_MARKS)?
            .get((user, room))?
            .map(|v| v.value())
            .unwrap_or(0))
    }

    async fn read_mark(&self, user: &str, room: &str) -> ServiceResult<u64> {
        let key = (user.to_owned(), room.to_owned());
        if let Some(v) = self.read_marks.get(&key).await {
            return Ok(v.load(Ordering::Relaxed));
        }
        let v = self.read_mark_stored(user, room)?;
        self.read_marks
            .insert(key, Arc::new(AtomicU64::new(v)))
            .await;
        Ok(v)
    }

    /// Raises `user`'s cached mark in `room` to `to` after the stored one was
    /// written; a mark not cached is left to be read from redb when next needed.
    /// Call under the room's lock.
    async fn raise_cached_mark(&self, user: String, room: &str, to: u64) {
        if let Some(mark) = self.read_marks.get(&(user, room.to_owned())).await {
            mark.fetch_max(to, Ordering::Relaxed);
        }
    }

    /// Moves the caller's read mark forward.
    pub async fn mark_read(
        &self,
        ctx: &SessionCtx,
        req: v1::ChatMarkReadRequest,
    ) -> ServiceResult<v1::ChatMarkReadResponse> {
        let handle = self.room_for(&RoomId::parse(req.room_id.as_str())?).await?;
        let room = self.locked(&handle).await?;
        let user = ctx.user_id();
        if !room.meta.participants.contains(user) {
            return Err(not_found());
        }
        let current = self.read_mark(user, &room.id).await?;
        let target = req.offset.min(room.last_offset);
        if target > current {
            let (u, id) = (user.to_owned(), room.id.clone());
            self.deps
                .writer
                .write(move |txn| {
                    txn.open_table(READ_MARKS)?
                        .insert((u.as_str(), id.as_str()), target)?;
                    Ok(())
                })
                .await?;
            self.raise_cached_mark(user.to_owned(), &room.id, target)
                .await;
            let receipt = v1::Push {
                stream: String::new(),
                offset: 0,
                event: Some(push::Event::ChatReadReceipt(v1::ChatReadReceipt {
                    room_id: room.id.clone(),
                    user_id: user.to_owned(),
                    offset: target,
                })),
            };
            self.deps
                .hub
                .publish(&topic(&room.id), StreamKind::Chat, &receipt);
        }
        let mark = target.max(current);
        Ok(v1::ChatMarkReadResponse {
            read_offset: mark,
            unread: self.unread(&room, mark)?,
        })
    }

    /// Messages after the read mark `mark` that the room still keeps (retention
    /// may have removed older ones).
    fn unread(&self, room: &RoomState, mark: u64) -> Result<u64, StoreError> {
        let first = self.log.first_offset(&room.id)?;
        Ok(room
            .last_offset
            .saturating_sub(mark.max(first.saturating_sub(1))))
    }

    /// The caller's rooms with their last message and unread count, one page at a
    /// time in room id order: at most `limit` (or the configured page) rooms, and
    /// no more than fit in a frame.
    pub async fn list(
        &self,
        ctx: &SessionCtx,
        req: v1::RoomListRequest,
    ) -> ServiceResult<v1::RoomListResponse> {
        use prost::Message;
        let page = match req.limit {
            0 => self.config.max_room_list_page,
            n => n.min(self.config.max_room_list_page),
        }
        .max(1) as usize;
        // Room for the response's own fields and the frame around it.
        let budget = self.config.max_response_bytes.saturating_sub(512);
        let mut rooms = Vec::new();
        let mut size = 0;
        let mut more = false;
        let ids = self.user_rooms(ctx.user_id())?;
        let start = ids.partition_point(|id| id.as_str() <= req.cursor.as_str());
        for id in &ids[start..] {
            if rooms.len() == page {
                more = true;
                break;
            }
            let Some(handle) = self.load(id).await? else {
                continue;
            };
            let room = self.locked(&handle).await?;
            if !room.meta.participants.contains(ctx.user_id()) {
                continue;
            }
            let mark = self.read_mark(ctx.user_id(), id).await?;
            let summary = v1::RoomSummary {
                room: Some(room.wire()),
                last_message: room.last_message.clone(),
                unread: self.unread(&room, mark)?,
                read_offset: mark,
            };
            // A room alone over the budget still goes out alone (the gateway then
            // answers RESPONSE_TOO_LARGE instead of sending it).
            let len = summary.encoded_len() + 8;
            if !rooms.is_empty() && size + len > budget {
                more = true;
                break;
            }
            size += len;
            rooms.push(summary);
        }
        let next_cursor = match (more, rooms.last()) {
            (true, Some(last)) => last
                .room
                .as_ref()
                .map(|r| r.room_id.clone())
                .unwrap_or_default(),
            _ => String::new(),
        };
        Ok(v1::RoomListResponse {
            rooms,
            more,
            next_cursor,
        })
    }

    /// Everyone who shares a room with `user` (`user` excluded).
    pub async fn co_participants(&self, user: &str) -> ServiceResult<BTreeSet<String>> {
        let mut out = BTreeSet::new();
        for id in self.user_rooms(user)? {
            if let Some(handle) = self.load(&id).await? {
                let room = self.locked(&handle).await?;
                if room.meta.participants.contains(user) {
                    out.extend(room.meta.participants.iter().cloned());
                }
            }
        }
        out.remove(user);
        Ok(out)
    }

    /// The first `max` users (by user id within each room, rooms in id order) who
    /// share a room with `user`: the bounded form of
    /// [`co_participants`](Self::co_participants), for fan-out.
    pub async fn co_participants_bounded(
        &self,
        user: &str,
        max: usize,
    ) -> ServiceResult<BTreeSet<String>> {
        let mut out = BTreeSet::new();
        for id in self.user_rooms(user)? {
            if out.len() >= max {
                break;
            }
            if let Some(handle) = self.load(&id).await? {
                let room = self.locked(&handle).await?;
                if room.meta.participants.contains(user) {
                    let others = room.meta.participants.iter().filter(|p| *p != user);
                    for p in others {
                        if out.len() >= max {
                            break;
                        }
                        out.insert(p.clone());
                    }
                }
            }
        }
        Ok(out)
    }

    /// A room's participants (server API).
    pub async fn participants(&self, room_id: &RoomId) -> ServiceResult<Vec<String>> {
        let handle = self.room_for(room_id).await?;
        let room = self.locked(&handle).await?;
        Ok(room.meta.participants.iter().cloned().collect())
    }

    /// A typing indicator (datagram): relayed to the room's other sessions, at most
    /// `typing_per_second` per session.
    pub fn typing(&self, ctx: &SessionCtx, mut t: v1::ChatTyping) {
        let subscribed = self
            .subscribed
            .locked()
            .get(ctx.session_id())
            .is_some_and(|rooms| rooms.contains(&t.room_id));
        if !subscribed {
            return;
        }
        {
            let mut typing = self.typing.locked();
            let now = Instant::now();
            let (start, count) = typing
                .entry(ctx.session_id().to_owned())
                .or_insert((now, 0));
            if now - *start >= Duration::from_secs(1) {
                *start = now;
                *count = 0;
            }
            if *count >= self.config.typing_per_second {
                return;
            }
            *count += 1;
        }
        t.user_id = ctx.user_id().to_owned();
        let data = Bytes::from(
            v1::Datagram {
                kind: Some(v1::datagram::Kind::Typing(t.clone())),
            }
            .encode_to_vec(),
        );
        self.deps
            .hub
            .datagram(&topic(&t.room_id), ctx.session_id(), &data);
    }

    // ---- retention --------------------------------------------------------------

    /// One retention batch (`prune_batch`, below). A batch that fails
    /// leaves the cursor where it was, so the next one looks at the same rooms
    /// again (and a command of the log applied again does the same work).
    pub async fn prune(
        &self,
        r: &super::retention::RetentionConfig,
        now: u64,
        budget: usize,
    ) -> ServiceResult<(u64, u64)> {
        super::retention::restoring_cursor(&self.prune_cursor, self.prune_batch(r, now, budget))
            .await
    }

    /// One retention batch (see [`super::retention`]): looks at up to `budget`
    /// rooms after the previous batch's last one, removes old messages (at most
    /// `budget`) and empty rooms. Returns (messages, rooms) removed.
    async fn prune_batch(
        &self,
        r: &super::retention::RetentionConfig,
        now: u64,
        budget: usize,
    ) -> ServiceResult<(u64, u64)> {
        let after = self.prune_cursor.locked().clone();
        let mut rooms: Vec<(String, bool)> = Vec::new();
        {
            let txn = self.deps.store.db().begin_read()?;
            let table = txn.open_table(ROOMS)?;
            let range = (
                std::ops::Bound::Excluded(after.as_str()),
                std::ops::Bound::Unbounded,
            );
            for entry in table.range::<&str>(range)?.take(budget) {
                let (id, meta) = entry?;
                let meta: RoomMeta = serde_json::from_slice(meta.value()).map_err(corrupt)?;
                rooms.push((id.value().to_owned(), meta.participants.is_empty()));
            }
        }
        // The next batch goes on after this one, or starts over at the end.
        *self.prune_cursor.locked() = if rooms.len() < budget {
            String::new()
        } else {
            rooms.last().map(|(id, _)| id.clone()).unwrap_or_default()
        };
        let (mut messages, mut removed_rooms, mut left) = (0u64, 0u64, budget);
        for (id, empty) in rooms {
            if left == 0 {
                break;
            }
            let n = if empty && r.empty_rooms {
                let (n, gone) = self.remove_empty(&id, left).await?;
                removed_rooms += u64::from(gone);
                n
            } else {
                self.trim_room(&id, r, now, left).await?
            };
            messages += n as u64;
            left -= n.min(left);
        }
        Ok((messages, removed_rooms))
    }

    /// Removes old messages of a room: returns how many.
    async fn trim_room(
        &self,
        id: &str,
        r: &super::retention::RetentionConfig,
        now: u64,
        budget: usize,
    ) -> ServiceResult<usize> {
        if r.room_messages == 0 && r.room_message_age.is_none() {
            return Ok(0);
        }
        let first = self.log.first_offset(id)?;
        let last = self.log.last_offset(id).await?;
        let mut keep = super::retention::keep_from_count(first, last, r.room_messages, budget);
        if let Some(age) = r.room_message_age {
            let cutoff = now.saturating_sub(age.as_millis() as u64);
            let room_budget = budget.saturating_sub((keep - first) as usize);
            keep = super::retention::keep_from_age(
                &self.log,
                id,
                keep,
                last,
                room_budget,
                cutoff,
                |data| {
                    let m: StoredMessage = serde_json::from_slice(data).map_err(corrupt)?;
                    Ok(m.sent_at_ms)
                },
            )
            .await?;
        }
        if keep <= first {
            return Ok(0);
        }
        let removed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (log, room, n) = (self.log.clone(), id.to_owned(), removed.clone());
        self.deps
            .writer
            .write(move |txn| {
                // Never the last message: the room's offsets never move back.
                let end = keep.min(log.last_offset_in(txn, &room)?);
                let k = log.remove_in(txn, &room, end, budget)?;
                n.store(k, Ordering::Relaxed);
                Ok(())
            })
            .await?;
        Ok(removed.load(Ordering::Relaxed))
    }

    /// Removes a room nobody is in: up to `budget` of its messages, and the room
    /// once none is left. Its last offset stays (the id is not reused). Returns
    /// (messages removed, whether the room is gone).
    async fn remove_empty(&self, id: &str, budget: usize) -> ServiceResult<(usize, bool)> {
        let Some(handle) = self.load(id).await? else {
            return Ok((0, false));
        };
        let room = self.locked(&handle).await?;
        if !room.meta.participants.is_empty() {
            return Ok((0, false));
        }
        let out = Arc::new(Mutex::new((0, false)));
        let (log, room_id, result) = (self.log.clone(), id.to_owned(), out.clone());
        self.deps
            .writer
            .write(move |txn| {
                // The last offset outlives the messages: the id is not reused.
                let mut offsets = txn.open_table(OFFSETS)?;
                let recorded = offsets.get(room_id.as_str())?.map_or(0, |v| v.value());
                let last = log.last_offset_in(txn, &room_id)?;
                if last > recorded {
                    offsets.insert(room_id.as_str(), last)?;
                }
                drop(offsets);
                let n = log.remove_in(txn, &room_id, u64::MAX, budget)?;
                let gone = log.last_offset_in(txn, &room_id)? == 0;
                if gone {
                    txn.open_table(ROOMS)?.remove(room_id.as_str())?;
                }
                *result.locked() = (n, gone);
                Ok(())
            })
            .await?;
        let (n, gone) = *out.locked();
        if gone {
            // Under the room's lock: whoever waits for it finds no participant
            // (NOT_FOUND), and later callers find no room.
            self.rooms.forget(id).await;
        }
        drop(room);
        Ok((n, gone))
    }

    // ---- loading ----------------------------------------------------------------

    async fn load(&self, id: &str) -> ServiceResult<Option<Loaded<RoomState>>> {
        Ok(self.rooms.get_or_load(id, || self.read_room(id)).await?)
    }

    fn read_room(&self, id: &str) -> Result<Option<RoomState>, StoreError> {
        // Before the read: a recovery during it makes the state look older than
        // it is (reconciled once more for nothing), never newer.
        let generation = self.deps.store.reopens();
        let txn = self.deps.store.db().begin_read()?;
        let Some(meta) = txn.open_table(ROOMS)?.get(id)? else {
            return Ok(None);
        };
        let meta: RoomMeta = serde_json::from_slice(meta.value()).map_err(corrupt)?;
        // The log's last entry (never trimmed while the room lives).
        let last_offset = self.log.last_offset_in_read(&txn, id)?;
        let last_message = match txn.open_table(MESSAGES)?.get((id, last_offset))? {
            Some(v) => {
                let m: StoredMessage = serde_json::from_slice(v.value()).map_err(corrupt)?;
                Some(message_wire(id, last_offset, m))
            }
            None => None,
        };
        Ok(Some(RoomState {
            id: id.to_owned(),
            meta,
            last_offset,
            last_message,
            generation,
        }))
    }

    /// Locks a loaded room, reconciled with the disk (see [`Self::reconcile`]).
    async fn locked<'h>(
        &self,
        handle: &'h Loaded<RoomState>,
    ) -> Result<tokio::sync::MutexGuard<'h, RoomState>, StoreError> {
        let mut room = handle.lock().await;
        self.reconcile(&mut room).await?;
        Ok(room)
    }

    /// Brings a room loaded before the database was last reopened up to what is
    /// stored. A commit reported failed may have reached the disk anyway (an fsync
    /// that wrote and then reported an error): its messages are stored but were
    /// never published, and the room's state in memory stops before them. Here
    /// they are published, in offset order, once (the state moves past them under
    /// the room's lock), and the room's record is read again. Call under the
    /// room's lock; costs one atomic load while nothing was reopened.
    async fn reconcile(&self, room: &mut RoomState) -> Result<(), StoreError> {
        let generation = self.deps.store.reopens();
        if room.generation == generation {
            return Ok(());
        }
        if let Some(stored) = self.read_room(&room.id)? {
            room.meta = stored.meta;
            self.publish_stored(room, stored.last_offset).await?;
        }
        room.generation = generation;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    /// Creates room `r` as `ctx`'s user, with no other participant.
    async fn create_room_r(chat: &ChatService, ctx: &SessionCtx) {
        chat.create(
            ctx,
            v1::RoomCreateRequest {
                room_id: "r".into(),
                name: "r".into(),
                participants: vec![],
            },
        )
        .await
        .unwrap();
    }

    fn open_rooms() -> RoomsConfig {
        RoomsConfig {
            join_policy: JoinPolicy::Open,
            ..Default::default()
        }
    }

    use super::*;
    use crate::services::fakes::{FakeSession, Node};

    /// A send abandoned while its commit is in flight (its future dropped) still
    /// commits; the next send takes the room as stored and follows it, instead
    /// of writing over it or failing.
    #[tokio::test]
    async fn a_send_after_an_abandoned_one_follows_it() {
        let node = Node::new();
        let chat = ChatService::open(node.deps.clone(), Default::default(), open_rooms()).unwrap();
        let (alice, mut pushes) = FakeSession::new("alice", "a", 16);
        let alice = alice.ctx();
        create_room_r(&chat, &alice).await;
        let send = |text: &str| {
            chat.send(
                &alice,
                v1::ChatSendRequest {
                    room_id: "alice~r".into(),
                    text: text.into(),
                    client_message_id: String::new(),
                },
            )
        };
        chat.connected(&alice, &HashMap::new()).await.unwrap();
        let hold = node.deps.writer.hold();
        let mut abandoned = Box::pin(send("abandoned"));
        node.until_committing(&mut abandoned).await;
        drop(abandoned);
        drop(hold);
        // Writes commit in order: once this one is durable, so is the abandoned one.
        node.deps.writer.write(|_| Ok(())).await.unwrap();
        let next = send("next").await.unwrap().message.unwrap();
        assert_eq!(next.offset, 2);
        let history = chat
            .history(
                &alice,
                v1::ChatHistoryRequest {
                    room_id: "alice~r".into(),
                    before_offset: 0,
                    limit: 10,
                },
            )
            .await
            .unwrap();
        let texts: Vec<&str> = history.messages.iter().map(|m| m.text.as_str()).collect();
        assert_eq!(texts, ["abandoned", "next"]);
        // The abandoned one was stored without being published: it is delivered
        // before the next one, once.
        let mut delivered = Vec::new();
        while let Ok((_, p)) = pushes.try_recv() {
            if let Some(push::Event::ChatMessage(m)) = p.event {
                delivered.push(m.text);
            }
        }
        assert_eq!(delivered, ["abandoned", "next"]);
    }

    /// Sends that queue up behind a room's commit share the next one: one write
    /// stores them all, with consecutive offsets in the order they came, each
    /// sender's read mark and idempotency record in it (a retry in the same
    /// write finds the first), and a sender who is not a participant refused
    /// alone.
    #[tokio::test]
    async fn sends_waiting_on_a_room_share_one_commit() {
        use futures_util::FutureExt;
        let node = Node::new();
        let chat = ChatService::open(node.deps.clone(), Default::default(), open_rooms()).unwrap();
        let ctx = |user: &str| FakeSession::new(user, user, 64);
        let (alice, mut pushes) = ctx("alice");
        let (alice, bob, carol, dave) = (
            alice.ctx(),
            ctx("bob").0.ctx(),
            ctx("carol").0.ctx(),
            ctx("dave").0.ctx(),
        );
        chat.create(
            &alice,
            v1::RoomCreateRequest {
                room_id: "r".into(),
                name: "r".into(),
                participants: vec!["bob".into(), "carol".into()],
            },
        )
        .await
        .unwrap();
        chat.connected(&alice, &HashMap::new()).await.unwrap();
        let send = |who: &SessionCtx, text: &str, key: &str| {
            let req = v1::ChatSendRequest {
                room_id: "alice~r".into(),
                text: text.into(),
                client_message_id: key.into(),
            };
            let (chat, who) = (&chat, who.clone());
            Box::pin(async move { chat.send(&who, req).await })
        };
        let hold = node.deps.writer.hold();
        let mut sends = vec![send(&alice, "a1", "")];
        node.until_committing(&mut sends[0]).await;
        // The first send holds the room while its commit waits; these queue up.
        for (who, text, key) in [
            (&bob, "b1", "k"),
            (&carol, "c1", ""),
            (&dave, "d1", ""),
            (&alice, "a2", ""),
            (&bob, "b1 again", "k"),
        ] {
            let mut s = send(who, text, key);
            assert!(s.as_mut().now_or_never().is_none(), "waits for the room");
            sends.push(s);
        }
        assert_eq!(chat.waiting.queued("alice~r"), 5);
        let before = node.deps.metrics.writes_committed.load(Ordering::Relaxed);
        drop(hold);
        let results = futures_util::future::join_all(sends).await;
        let writes = node.deps.metrics.writes_committed.load(Ordering::Relaxed) - before;
        assert_eq!(writes, 2, "the first send's write, then one for the rest");
        let answers: Vec<_> = results
            .into_iter()
            .map(|r| r.map(|r| r.message.map(|m| (m.offset, m.text))))
            .collect();
        assert_eq!(
            answers,
            [
                Ok(Some((1, "a1".into()))),
                Ok(Some((2, "b1".into()))),
                Ok(Some((3, "c1".into()))),
                Err(not_found()),
                Ok(Some((4, "a2".into()))),
                Ok(Some((2, "b1".into()))),
            ]
        );
        let mut delivered = Vec::new();
        while let Ok((_, p)) = pushes.try_recv() {
            if let Some(push::Event::ChatMessage(m)) = p.event {
                delivered.push((m.offset, m.text));
            }
        }
        let expected: Vec<(u64, String)> = [(1, "a1"), (2, "b1"), (3, "c1"), (4, "a2")]
            .map(|(o, t)| (o, t.to_owned()))
            .into();
        assert_eq!(delivered, expected, "published once each, in offset order");
        let marks: Vec<u64> = ["alice", "bob", "carol"]
            .iter()
            .map(|u| chat.read_mark_stored(u, "alice~r").unwrap())
            .collect();
        assert_eq!(marks, [4, 2, 3]);
        assert_eq!(chat.waiting.queued("alice~r"), 0);
    }

    /// A send whose caller gives up while it waits for the room is not stored.
    #[tokio::test]
    async fn a_send_given_up_while_waiting_is_not_stored() {
        use futures_util::FutureExt;
        let node = Node::new();
        let chat = ChatService::open(node.deps.clone(), Default::default(), open_rooms()).unwrap();
        let (alice, _pushes) = FakeSession::new("alice", "a", 16);
        let alice = alice.ctx();
        create_room_r(&chat, &alice).await;
        let send = |text: &str| {
            Box::pin(chat.send(
                &alice,
                v1::ChatSendRequest {
                    room_id: "alice~r".into(),
                    text: text.into(),
                    client_message_id: String::new(),
                },
            ))
        };
        let hold = node.deps.writer.hold();
        let mut first = send("first");
        node.until_committing(&mut first).await;
        let mut gone = send("gone");
        assert!(gone.as_mut().now_or_never().is_none());
        assert_eq!(chat.waiting.queued("alice~r"), 1);
        drop(gone);
        assert_eq!(chat.waiting.queued("alice~r"), 0);
        drop(hold);
        assert_eq!(first.await.unwrap().message.unwrap().offset, 1);
        let next = send("next").await.unwrap().message.unwrap();
        assert_eq!((next.offset, next.text.as_str()), (2, "next"));
    }

    /// A history page of large messages is cut to what fits in a frame, newest
    /// kept, with `more` set; asking before its first message gets the rest.
    #[tokio::test]
    async fn a_history_page_of_large_messages_fits_in_a_frame() {
        use prost::Message;
        let node = Node::new();
        let chat = ChatService::open(node.deps.clone(), Default::default(), open_rooms()).unwrap();
        let (alice, _pushes) = FakeSession::new("alice", "a", 256);
        let alice = alice.ctx();
        create_room_r(&chat, &alice).await;
        let texts: Vec<String> = (1..=100)
            .map(|i| format!("{i:04}{}", "x".repeat(1996)))
            .collect();
        chat.post_many(
            &RoomId::parse("alice~r").unwrap(),
            Sender::User("alice"),
            texts,
        )
        .await
        .unwrap();
        let limit = ChatConfig::default().max_response_bytes;
        let mut offsets = Vec::new();
        let mut before = 0;
        for _ in 0..10 {
            let page = chat
                .history(
                    &alice,
                    v1::ChatHistoryRequest {
                        room_id: "alice~r".into(),
                        before_offset: before,
                        limit: 0,
                    },
                )
                .await
                .unwrap();
            assert!(page.encoded_len() < limit, "{} bytes", page.encoded_len());
            assert!(!page.messages.is_empty());
            let mut got: Vec<u64> = page.messages.iter().map(|m| m.offset).collect();
            if before == 0 {
                assert_eq!(got.last(), Some(&100), "the newest first");
                assert!(got.len() < 100 && page.more);
            }
            before = got[0];
            got.extend(offsets);
            offsets = got;
            if !page.more {
                break;
            }
        }
        assert_eq!(offsets, (1..=100).collect::<Vec<u64>>());
    }

    /// A session resumes from offset 0 of a room of 1,000 messages through a queue
    /// of 100 that it reads only once 50 more were sent meanwhile (so the catch-up
    /// waits for room, and must pick those up after the range it started with);
    /// then 50 live ones. It gets offsets 1..=1,100 once each, in order, without
    /// ever finding its queue full. (No timers involved: it runs on the real clock,
    /// bounded, since paused time would jump while the writer thread commits.)
    #[tokio::test]
    async fn catch_up_then_live_in_order_with_sends_meanwhile() {
        let node = Node::new();
        let chat = ChatService::open(node.deps.clone(), Default::default(), open_rooms()).unwrap();
        let (alice, _) = FakeSession::new("alice", "a", 16);
        chat.create(
            &alice.ctx(),
            v1::RoomCreateRequest {
                room_id: "r".into(),
                name: "r".into(),
                participants: vec!["bob".into()],
            },
        )
        .await
        .unwrap();
        let seeded = (1..=1000).map(|i| format!("m{i}")).collect();
        chat.post_many(&RoomId::parse("alice~r").unwrap(), Sender::System, seeded)
            .await
            .unwrap();
        let alice = alice.ctx();
        let send = |text: String| {
            chat.send(
                &alice,
                v1::ChatSendRequest {
                    room_id: "alice~r".into(),
                    text,
                    client_message_id: String::new(),
                },
            )
        };

        let (bob, mut queue) = FakeSession::new("bob", "b", 100);
        let resume = HashMap::from([(resume_key("alice~r"), 0)]);
        let gate = tokio::sync::Notify::new();
        let mut got = Vec::new();
        let meanwhile = async {
            // Once the catch-up waits for room, 50 messages arrive.
            let mut spins = 0;
            while bob.room() > 0 {
                spins += 1;
                assert!(spins < 10_000, "the catch-up never filled the queue");
                tokio::task::yield_now().await;
            }
            for i in 0..50 {
                send(format!("meanwhile {i}")).await.unwrap();
            }
            gate.notify_one();
        };
        let read = async {
            gate.notified().await;
            while got.len() < 1050 {
                let (_, p) = queue.recv().await.unwrap();
                if let Some(push::Event::ChatMessage(m)) = p.event {
                    got.push(m.offset);
                }
            }
        };
        let ctx = bob.ctx();
        let all = async {
            tokio::join!(
                async { chat.connected(&ctx, &resume).await.unwrap() },
                meanwhile,
                read
            )
        };
        tokio::time::timeout(Duration::from_secs(10), all)
            .await
            .expect("every message arrives");
        for i in 0..50 {
            send(format!("live {i}")).await.unwrap();
        }
        while let Ok((_, p)) = queue.try_recv() {
            if let Some(push::Event::ChatMessage(m)) = p.event {
                got.push(m.offset);
            }
        }
        assert_eq!(got, (1..=1100).collect::<Vec<u64>>());
        assert!(!bob.was_slow());
    }
}
