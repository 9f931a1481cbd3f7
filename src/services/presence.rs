//! Presence and contacts.
//!
//! Online state is in memory (this node's sessions): a user is online while any of
//! their sessions is connected, with one status (ONLINE, AWAY, DO_NOT_DISTURB) for
//! all their devices. When the last session ends, `last_seen` is committed at once
//! (so a shutdown cannot lose it) and a grace timer starts; the user is shown
//! offline, and their watchers are told, only when it expires with no session back.
//! A reconnect within the grace period cancels the timer and nobody hears a thing.
//!
//! Timers run in the service's background work (on tokio's clock, so a test with
//! `tokio::time::pause()` drives them), which holds a [`Weak`] to the service; each
//! pending timer has a unique token: a timer whose token is no longer the user's
//! (they came back, or left again later) does nothing, and a dropped service or the
//! node's shutdown stops them all.
//!
//! Who hears a user's presence: their accepted contacts and everyone who shares a
//! room with them (never anyone else). Every announcement is published under the
//! state lock and only if it is still the user's current state, so watchers see
//! changes in the order they happened.
//!
//! Contacts are durable: one row per direction, `(user, other) → state` as seen by
//! `user`, both rows written in the same group-committed transaction (read and
//! decided inside it, so two users requesting each other at once end ACCEPTED).

use std::collections::hash_map::Entry;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::Deserialize;

use super::chat::ChatService;
use crate::util::Unpoisoned;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Background, ServiceDeps, ServiceError, ServiceResult, SessionCtx, user_topic};
use crate::protocol::ErrorCode;
use crate::protocol::v1::{self, ContactState, PresenceStatus, StreamKind, push};
use crate::store::StoreError;

/// `(user, other)` → the relation as `user` sees it (a [`ContactState`]: REQUESTED,
/// INCOMING or ACCEPTED). Always written in pairs.
const CONTACTS: TableDefinition<(&str, &str), u8> = TableDefinition::new("presence_contacts");
/// user → when their last device left (ms since the Unix epoch).
const LAST_SEEN: TableDefinition<&str, u64> = TableDefinition::new("presence_last_seen");

/// Users in one `PresenceGetRequest` at most.
pub const MAX_GET: usize = 100;

/// Presence settings (`[presence]` in the configuration file).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PresenceConfig {
    /// After a user's last device leaves, how long before they are shown offline
    /// (a quick reconnect within it does not flap).
    #[serde(with = "crate::clock::duration_str")]
    pub grace: Duration,
    /// Contacts (and requests) one user may have.
    pub max_contacts: usize,
    /// Distinct users one presence change is pushed to at most: accepted contacts
    /// first, then room co-participants in user-id order. Others who may see the
    /// user's presence read it with `PresenceGetRequest` instead.
    pub max_fanout: usize,
}

impl PresenceConfig {
    /// Checks the section (every value is usable).
    pub fn validate(&self) -> Result<(), super::InvalidConfig> {
        Ok(())
    }
}

impl Default for PresenceConfig {
    fn default() -> Self {
        Self {
            grace: Duration::from_secs(5),
            max_contacts: 1000,
            max_fanout: 5000,
        }
    }
}

/// A user shown online on this node.
#[derive(Debug)]
struct Live {
    /// Their sessions here; empty while the grace timer runs.
    sessions: HashSet<String>,
    status: PresenceStatus,
    /// The sequence number of the last change others should hear about.
    version: u64,
    /// The token of the pending offline timer.
    timer: Option<u64>,
    /// When the last session left (while the timer runs).
    left_at: u64,
}

#[derive(Debug, Default)]
struct LiveTable {
    users: HashMap<String, Live>,
    /// Versions and timer tokens: unique and increasing.
    seq: u64,
}

impl LiveTable {
    fn next(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    /// Adds a session of `user`; true when the user was offline until now.
    fn register(&mut self, user: &str, session: &str) -> bool {
        let seq = self.next();
        match self.users.entry(user.to_owned()) {
            Entry::Occupied(mut e) => {
                let live = e.get_mut();
                live.sessions.insert(session.to_owned());
                live.timer = None; // a reconnect within the grace period
                false
            }
            Entry::Vacant(e) => {
                e.insert(Live {
                    sessions: HashSet::from([session.to_owned()]),
                    status: PresenceStatus::Online,
                    version: seq,
                    timer: None,
                    left_at: 0,
                });
                true
            }
        }
    }
}

impl crate::services::chat::Contacts for PresenceService {
    fn are_contacts(&self, a: &str, b: &str) -> ServiceResult<bool> {
        PresenceService::are_contacts(self, a, b)
    }
}

/// The presence service.
#[derive(Debug)]
pub struct PresenceService {
    deps: ServiceDeps,
    config: PresenceConfig,
    chat: Arc<ChatService>,
    /// Starts a grace timer: (user, token), run by the service's background work.
    timers: mpsc::UnboundedSender<(String, u64)>,
    live: Mutex<LiveTable>,
}

fn state(user: &str, status: PresenceStatus, last_seen_ms: u64) -> v1::PresenceState {
    v1::PresenceState {
        user_id: user.to_owned(),
        status: status as i32,
        last_seen_ms,
    }
}

fn presence_push(s: v1::PresenceState) -> v1::Push {
    v1::Push {
        stream: String::new(),
        offset: 0,
        event: Some(push::Event::Presence(s)),
    }
}

fn contact_push(user: &str, state: ContactState) -> v1::Push {
    v1::Push {
        stream: String::new(),
        offset: 0,
        event: Some(push::Event::ContactEvent(v1::ContactEvent {
            user_id: user.to_owned(),
            state: state as i32,
        })),
    }
}

fn decode_contact(v: u8) -> Result<ContactState, StoreError> {
    match ContactState::try_from(i32::from(v)) {
        Ok(s @ (ContactState::Requested | ContactState::Incoming | ContactState::Accepted)) => {
            Ok(s)
        }
        _ => Err(StoreError::Corrupt(format!("contact state {v}"))),
    }
}

/// The other party of a contact request: a valid user id, not the caller.
fn other_user<'a>(ctx: &SessionCtx, user: &'a str) -> ServiceResult<&'a str> {
    crate::ids::UserId::parse(user)?;
    if user == ctx.user_id() {
        return Err(ServiceError::bad_request("you cannot be your own contact"));
    }
    Ok(user)
}

fn no_request() -> ServiceError {
    ServiceError::new(ErrorCode::NotFound, "no such contact request")
}

/// Rows of `user` in the contacts table.
fn count_contacts(
    table: &impl ReadableTable<(&'static str, &'static str), u8>,
    user: &str,
) -> Result<usize, StoreError> {
    let mut n = 0;
    for entry in table.range((user, "")..)? {
        let (key, _) = entry?;
        if key.value().0 != user {
            break;
        }
        n += 1;
    }
    Ok(n)
}

/// What a contact write decided (set inside the transaction, which may run twice).
#[derive(Debug, Clone, PartialEq)]
enum Decision {
    /// Both rows now hold these states (caller's side, other's side).
    Changed(ContactState, ContactState),
    /// Nothing to do; the caller's side is this.
    Unchanged(ContactState),
    /// Both rows were removed.
    Removed,
    Failed(ErrorCode, String),
}

impl PresenceService {
    /// Opens the service, creating its tables. The returned work runs the grace
    /// timers (on tokio's clock) until the node stops.
    pub fn open(
        deps: ServiceDeps,
        config: PresenceConfig,
        chat: Arc<ChatService>,
    ) -> Result<(Arc<Self>, Background), StoreError> {
        let mut txn = deps.store.db().begin_write()?;
        txn.set_quick_repair(true);
        txn.open_table(CONTACTS)?;
        txn.open_table(LAST_SEEN)?;
        txn.commit()?;
        let (timers, started) = mpsc::unbounded_channel();
        let service = Arc::new(Self {
            deps,
            config,
            chat,
            timers,
            live: Mutex::new(LiveTable::default()),
        });
        let work = Background::new(
            "presence grace timers",
            run_timers(
                Arc::downgrade(&service),
                started,
                service.config.grace,
                service.deps.shutdown.clone(),
            ),
        );
        Ok((service, work))
    }

    fn live(&self) -> MutexGuard<'_, LiveTable> {
        self.live.locked()
    }

    // ---- sessions -------------------------------------------------------------

    /// A session completed its handshake.
    pub async fn connected(&self, ctx: &SessionCtx) {
        let came_online = {
            let mut live = self.live();
            live.register(ctx.user_id(), ctx.session_id())
                .then(|| live.users[ctx.user_id()].version)
        };
        if let Some(version) = came_online {
            self.announce(ctx.user_id(), version, None).await;
        }
    }

    /// The sessions (id, user) of the node `node` that are online here. Session ids
    /// are `<node id>-<number>`.
    pub fn sessions_of_node(&self, node: &str) -> Vec<(String, String)> {
        let prefix = format!("{node}-");
        let live = self.live();
        let mut out = Vec::new();
        for (user, l) in &live.users {
            for s in &l.sessions {
                if s.strip_prefix(&prefix)
                    .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
                {
                    out.push((s.clone(), user.clone()));
                }
            }
        }
        // In a stable order, so that every node announces in the same one.
        out.sort();
        out
    }

    /// A session ended.
    pub async fn disconnected(&self, ctx: &SessionCtx) {
        let user = ctx.user_id();
        let (token, left_at) = {
            let mut guard = self.live();
            let LiveTable { users, seq } = &mut *guard;
            let Some(live) = users.get_mut(user) else {
                return;
            };
            if !live.sessions.remove(ctx.session_id()) || !live.sessions.is_empty() {
                return;
            }
            *seq += 1;
            live.timer = Some(*seq);
            live.left_at = self.deps.clock.now_ms();
            (*seq, live.left_at)
        };
        // Durable now: a shutdown may come before the grace period ends.
        let owned = user.to_owned();
        let write = self
            .deps
            .writer
            .write(move |txn| {
                let mut table = txn.open_table(LAST_SEEN)?;
                let before = table.get(owned.as_str())?.map(|v| v.value()).unwrap_or(0);
                if left_at > before {
                    table.insert(owned.as_str(), left_at)?;
                }
                Ok(())
            })
            .await;
        if let Err(e) = write {
            tracing::error!(error = %e, user, "storing last seen");
        }
        // Fails only when the node is stopping: the user then stays shown online
        // in this node's memory, which goes with it.
        let _ = self.timers.send((user.to_owned(), token));
    }

    /// The grace timer `token` of `user` expired: offline, unless they came back.
    async fn expire(&self, user: &str, token: u64) {
        let current =
            |live: &LiveTable| live.users.get(user).is_some_and(|l| l.timer == Some(token));
        if !current(&self.live()) {
            return;
        }
        let watchers = self.watchers(user).await.unwrap_or_else(|e| {
            tracing::error!(error = %e.message, user, "listing presence watchers");
            BTreeSet::new()
        });
        let mut live = self.live();
        if !current(&live) {
            return;
        }
        let gone = live.users.remove(user).expect("checked above");
        let push = presence_push(state(user, PresenceStatus::Offline, gone.left_at));
        for w in &watchers {
            self.deps
                .hub
                .publish(&user_topic(w), StreamKind::Presence, &push);
        }
    }

    /// Tells `user`'s watchers their current state, if `version` is still current
    /// (else a newer announcement, or the offline one, covers it). With `own`, the
    /// user's other sessions (all but that one) hear it too.
    async fn announce(&self, user: &str, version: u64, own: Option<&str>) {
        let watchers = match self.watchers(user).await {
            Ok(w) => w,
            Err(e) => {
                tracing::error!(error = %e.message, user, "listing presence watchers");
                BTreeSet::new()
            }
        };
        let live = self.live();
        let Some(l) = live.users.get(user).filter(|l| l.version == version) else {
            return;
        };
        let push = presence_push(state(user, l.status, 0));
        for w in &watchers {
            self.deps
                .hub
                .publish(&user_topic(w), StreamKind::Presence, &push);
        }
        if let Some(except) = own {
            for s in self.deps.hub.subscribers(&user_topic(user)) {
                if s.session_id() != except {
                    let _ = s.push(StreamKind::Presence, push.clone());
                }
            }
        }
    }

    /// Who hears `user`'s presence: accepted contacts, then room co-participants,
    /// `max_fanout` of them at most.
    async fn watchers(&self, user: &str) -> ServiceResult<BTreeSet<String>> {
        let max = self.config.max_fanout;
        let mut out: BTreeSet<String> = self
            .contacts_of(user)?
            .into_iter()
            .filter(|(_, s)| *s == ContactState::Accepted)
            .map(|(u, _)| u)
            .take(max)
            .collect();
        if out.len() < max {
            for u in self.chat.co_participants_bounded(user, max).await? {
                if out.len() >= max {
                    break;
                }
                out.insert(u);
            }
        }
        Ok(out)
    }

    // ---- presence -------------------------------------------------------------

    /// Sets the caller's status.
    pub async fn set(
        &self,
        ctx: &SessionCtx,
        req: v1::PresenceSetRequest,
    ) -> ServiceResult<v1::PresenceSetResponse> {
        let status = match PresenceStatus::try_from(req.status) {
            Ok(
                s @ (PresenceStatus::Online | PresenceStatus::Away | PresenceStatus::DoNotDisturb),
            ) => s,
            _ => {
                return Err(ServiceError::bad_request(
                    "status must be ONLINE, AWAY or DO_NOT_DISTURB",
                ));
            }
        };
        let user = ctx.user_id();
        self.deps
            .rates
            .check(super::rate::Action::PresenceSet, user)?;
        let changed = {
            let mut live = self.live();
            // A request may come before the session's `connected` ran.
            let new = live.register(user, ctx.session_id());
            let seq = live.next();
            let l = live.users.get_mut(user).expect("registered");
            let changed = new || l.status != status;
            l.status = status;
            if changed {
                l.version = seq;
            }
            changed.then_some(seq)
        };
        if let Some(version) = changed {
            self.announce(user, version, Some(ctx.session_id())).await;
        }
        Ok(v1::PresenceSetResponse {
            state: Some(state(user, status, 0)),
        })
    }

    /// Reads others' presence: each must be the caller, an accepted contact or a
    /// room co-participant, else the whole request is `PERMISSION_DENIED`.
    pub async fn get(
        &self,
        ctx: &SessionCtx,
        req: v1::PresenceGetRequest,
    ) -> ServiceResult<v1::PresenceGetResponse> {
        if req.user_ids.len() > MAX_GET {
            return Err(ServiceError::new(
                ErrorCode::LimitExceeded,
                format!("at most {MAX_GET} users per request"),
            ));
        }
        for id in &req.user_ids {
            crate::ids::UserId::parse(id)?;
        }
        let me = ctx.user_id();
        let mut rooms: Option<BTreeSet<String>> = None;
        for id in &req.user_ids {
            if id == me || self.contact_state(me, id)? == Some(ContactState::Accepted) {
                continue;
            }
            if rooms.is_none() {
                rooms = Some(self.chat.co_participants(me).await?);
            }
            if !rooms.as_ref().is_some_and(|r| r.contains(id)) {
                return Err(ServiceError::new(
                    ErrorCode::PermissionDenied,
                    "presence is visible to contacts and to people in a room with the user",
                ));
            }
        }
        let states = req
            .user_ids
            .iter()
            .map(|id| self.state_of(id))
            .collect::<ServiceResult<_>>()?;
        Ok(v1::PresenceGetResponse { states })
    }

    /// A user's presence, for the server API (no permission check: the caller is a
    /// trusted backend).
    pub async fn presence_of(&self, user: &str) -> ServiceResult<v1::PresenceState> {
        crate::ids::UserId::parse(user)?;
        self.state_of(user)
    }

    fn state_of(&self, user: &str) -> ServiceResult<v1::PresenceState> {
        if let Some(l) = self.live().users.get(user) {
            return Ok(state(user, l.status, 0));
        }
        let txn = self.deps.store.db().begin_read()?;
        let last_seen = txn
            .open_table(LAST_SEEN)?
            .get(user)?
            .map(|v| v.value())
            .unwrap_or(0);
        Ok(state(user, PresenceStatus::Offline, last_seen))
    }

    // ---- contacts -------------------------------------------------------------

    /// Whether `a` and `b` are accepted contacts.
    pub fn are_contacts(&self, a: &str, b: &str) -> ServiceResult<bool> {
        Ok(self.contact_state(a, b)? == Some(ContactState::Accepted))
    }

    fn contact_state(&self, user: &str, other: &str) -> ServiceResult<Option<ContactState>> {
        let txn = self.deps.store.db().begin_read()?;
        let table = txn.open_table(CONTACTS)?;
        Ok(match table.get((user, other))? {
            Some(v) => Some(decode_contact(v.value())?),
            None => None,
        })
    }

    fn contacts_of(&self, user: &str) -> ServiceResult<Vec<(String, ContactState)>> {
        let txn = self.deps.store.db().begin_read()?;
        let table = txn.open_table(CONTACTS)?;
        let mut out = Vec::new();
        for entry in table.range((user, "")..)? {
            let (key, value) = entry?;
            let (u, other) = key.value();
            if u != user {
                break;
            }
            out.push((other.to_owned(), decode_contact(value.value())?));
        }
        Ok(out)
    }

    /// Runs `decide` over the current pair of rows inside one write transaction.
    /// It gets the caller's current state and the two users' row counts.
    async fn contact_write(
        &self,
        me: &str,
        other: &str,
        decide: impl Fn(Option<ContactState>, usize, usize) -> Decision + Send + 'static,
    ) -> ServiceResult<Decision> {
        let out = Arc::new(Mutex::new(None));
        let (me_o, other_o, result) = (me.to_owned(), other.to_owned(), out.clone());
        self.deps
            .writer
            .write(move |txn| {
                let (me, other) = (me_o.as_str(), other_o.as_str());
                let mut table = txn.open_table(CONTACTS)?;
                let current = match table.get((me, other))? {
                    Some(v) => Some(decode_contact(v.value())?),
                    None => None,
                };
                let decision = if current.is_some() {
                    decide(current, 0, 0)
                } else {
                    decide(
                        None,
                        count_contacts(&table, me)?,
                        count_contacts(&table, other)?,
                    )
                };
                match &decision {
                    Decision::Changed(mine, theirs) => {
                        table.insert((me, other), *mine as u8)?;
                        table.insert((other, me), *theirs as u8)?;
                    }
                    Decision::Removed => {
                        table.remove((me, other))?;
                        table.remove((other, me))?;
                    }
                    Decision::Unchanged(_) | Decision::Failed(..) => {}
                }
                *result.locked() = Some(decision);
                Ok(())
            })
            .await?;
        let decision = out.locked().take();
        decision.ok_or_else(|| ServiceError::internal("contact write decided nothing"))
    }

    /// Tells `other` (every session) and the caller's other sessions.
    fn contact_events(
        &self,
        ctx: &SessionCtx,
        other: &str,
        mine: ContactState,
        theirs: ContactState,
    ) {
        self.deps.hub.publish(
            &user_topic(other),
            StreamKind::Presence,
            &contact_push(ctx.user_id(), theirs),
        );
        let push = contact_push(other, mine);
        for s in self.deps.hub.subscribers(&user_topic(ctx.user_id())) {
            if s.session_id() != ctx.session_id() {
                let _ = s.push(StreamKind::Presence, push.clone());
            }
        }
    }

    /// Asks someone to become a contact (accepts if they had asked the caller).
    pub async fn contact_request(
        &self,
        ctx: &SessionCtx,
        req: v1::ContactRequestRequest,
    ) -> ServiceResult<v1::ContactRequestResponse> {
        let other = other_user(ctx, &req.user_id)?;
        self.deps
            .rates
            .check(super::rate::Action::ContactRequest, ctx.user_id())?;
        let max = self.config.max_contacts;
        let who = other.to_owned();
        let decision = self
            .contact_write(
                ctx.user_id(),
                other,
                move |current, mine, theirs| match current {
                    None if mine >= max => Decision::Failed(
                        ErrorCode::LimitExceeded,
                        format!("you have {max} contacts and requests already"),
                    ),
                    None if theirs >= max => Decision::Failed(
                        ErrorCode::LimitExceeded,
                        format!("{who} has too many contacts and requests"),
                    ),
                    None => Decision::Changed(ContactState::Requested, ContactState::Incoming),
                    Some(ContactState::Incoming) => {
                        Decision::Changed(ContactState::Accepted, ContactState::Accepted)
                    }
                    Some(s) => Decision::Unchanged(s),
                },
            )
            .await?;
        let state = match decision {
            Decision::Changed(mine, theirs) => {
                self.contact_events(ctx, other, mine, theirs);
                mine
            }
            Decision::Unchanged(s) => s,
            Decision::Failed(code, message) => return Err(ServiceError::new(code, message)),
            Decision::Removed => return Err(ServiceError::internal("unexpected removal")),
        };
        Ok(v1::ContactRequestResponse {
            state: state as i32,
        })
    }

    /// Accepts a contact request (only an INCOMING one: else `NOT_FOUND`).
    pub async fn contact_accept(
        &self,
        ctx: &SessionCtx,
        req: v1::ContactAcceptRequest,
    ) -> ServiceResult<v1::ContactAcceptResponse> {
        let other = other_user(ctx, &req.user_id)?;
        let decision = self
            .contact_write(ctx.user_id(), other, |current, _, _| match current {
                Some(ContactState::Incoming) => {
                    Decision::Changed(ContactState::Accepted, ContactState::Accepted)
                }
                _ => Decision::Failed(ErrorCode::NotFound, String::new()),
            })
            .await?;
        match decision {
            Decision::Changed(mine, theirs) => {
                self.contact_events(ctx, other, mine, theirs);
                Ok(v1::ContactAcceptResponse {})
            }
            _ => Err(no_request()),
        }
    }

    /// Removes a contact or a request, either way (`NOT_FOUND` if there is none).
    pub async fn contact_remove(
        &self,
        ctx: &SessionCtx,
        req: v1::ContactRemoveRequest,
    ) -> ServiceResult<v1::ContactRemoveResponse> {
        let other = other_user(ctx, &req.user_id)?;
        let decision = self
            .contact_write(ctx.user_id(), other, |current, _, _| match current {
                Some(_) => Decision::Removed,
                None => Decision::Failed(ErrorCode::NotFound, String::new()),
            })
            .await?;
        match decision {
            Decision::Removed => {
                self.contact_events(ctx, other, ContactState::Removed, ContactState::Removed);
                Ok(v1::ContactRemoveResponse {})
            }
            _ => Err(ServiceError::new(ErrorCode::NotFound, "no such contact")),
        }
    }

    /// Lists the caller's contacts and requests (with presence for accepted ones).
    pub async fn contact_list(
        &self,
        ctx: &SessionCtx,
        _req: v1::ContactListRequest,
    ) -> ServiceResult<v1::ContactListResponse> {
        let contacts = self
            .contacts_of(ctx.user_id())?
            .into_iter()
            .map(|(user, s)| {
                let presence = match s {
                    ContactState::Accepted => Some(self.state_of(&user)?),
                    _ => None,
                };
                Ok(v1::Contact {
                    user_id: user,
                    state: s as i32,
                    presence,
                })
            })
            .collect::<ServiceResult<_>>()?;
        Ok(v1::ContactListResponse { contacts })
    }
}

/// Runs the grace timers started through `started` until `stop`.
async fn run_timers(
    service: Weak<PresenceService>,
    mut started: mpsc::UnboundedReceiver<(String, u64)>,
    grace: Duration,
    stop: CancellationToken,
) {
    let mut pending = FuturesUnordered::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            Some((user, token)) = started.recv() => pending.push(async move {
                tokio::time::sleep(grace).await;
                (user, token)
            }),
            Some((user, token)) = pending.next(), if !pending.is_empty() => {
                let Some(service) = service.upgrade() else { return };
                service.expire(&user, token).await;
            }
            else => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::fakes::{FakeSession, Node};
    use tokio::time::Instant;

    /// The next presence push, within an hour of virtual time.
    async fn next_presence(rx: &mut mpsc::Receiver<(StreamKind, v1::Push)>) -> v1::PresenceState {
        let next = async {
            loop {
                let (_, p) = rx.recv().await.expect("the session is open");
                if let Some(push::Event::Presence(s)) = p.event {
                    return s;
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(3600), next)
            .await
            .expect("a presence push")
    }

    /// On tokio's paused clock: a user who comes back within the grace period is
    /// never shown offline; one who does not is shown offline exactly one grace
    /// period after leaving, with the injected clock's time as last seen.
    #[tokio::test(start_paused = true)]
    async fn offline_only_after_the_grace_period_unless_back_within_it() {
        let node = Node::new();
        let grace = Duration::from_secs(5);
        let rooms = crate::services::chat::RoomsConfig {
            join_policy: crate::services::chat::JoinPolicy::Open,
            ..Default::default()
        };
        let chat = ChatService::open(node.deps.clone(), Default::default(), rooms).unwrap();
        let config = PresenceConfig {
            grace,
            ..Default::default()
        };
        let (presence, work) =
            PresenceService::open(node.deps.clone(), config, chat.clone()).unwrap();
        tokio::spawn(work.task);
        let (alice, _) = FakeSession::new("alice", "a1", 64);
        let (bob, mut heard) = FakeSession::new("bob", "b1", 64);
        // Bob hears Alice: they share a room.
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
        node.deps.hub.subscribe(&user_topic("bob"), bob.clone());
        presence.connected(&alice.ctx()).await;
        let online = next_presence(&mut heard).await;
        assert_eq!(
            (online.user_id.as_str(), online.status()),
            ("alice", PresenceStatus::Online)
        );

        // Alice's only session leaves and another comes back just within the grace.
        presence.disconnected(&alice.ctx()).await;
        tokio::time::advance(grace - Duration::from_millis(1)).await;
        tokio::task::yield_now().await;
        assert!(heard.try_recv().is_err(), "nothing within the grace period");
        let (again, _) = FakeSession::new("alice", "a2", 64);
        presence.connected(&again.ctx()).await;
        // The first timer expires meanwhile, and does nothing.
        tokio::time::advance(grace * 3).await;
        tokio::task::yield_now().await;
        assert!(heard.try_recv().is_err(), "a quick return is not heard");

        // Gone for good.
        node.clock.advance(42_000);
        let last_seen = node.clock.now_ms();
        let left = Instant::now();
        presence.disconnected(&again.ctx()).await;
        let offline = next_presence(&mut heard).await;
        assert_eq!(offline.status(), PresenceStatus::Offline);
        assert_eq!(offline.last_seen_ms, last_seen);
        assert_eq!(
            Instant::now() - left,
            grace,
            "exactly one grace period later"
        );
        assert!(!bob.was_slow());
    }
}
