//! Analytics: events tracked by clients (over the protocol) and by backends (the
//! server API), counted in time buckets, queried as series, top types and distinct
//! users, and streamed with server metrics to subscribers (see [`stream`]).
//!
//! Tracking is O(1) in memory and never writes to disk itself:
//! - each event adds its count to the current fine bucket (default 5 s; kept for
//!   `window`, default 1 h) and to the pending minute bucket;
//! - every `flush_interval` (and at shutdown) the pending minutes are added to the
//!   minute and hour rollups in redb in one group commit; rollups are pruned past
//!   `minute_retention` and `hour_retention`.
//!
//! An event counts towards its type's series and, for each dimension, towards the
//! series `type|key=value`. Everything held in memory is bounded: the number of
//! event types (`max_event_types`), of dimension series (`max_dimension_series`),
//! the batch size, the dimensions per event, and the fine window. Distinct users are
//! estimated with a HyperLogLog sketch per bucket.

mod hll;
pub mod peers;
pub mod stream;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::Deserialize;

use self::hll::Hll;
use tokio_util::sync::CancellationToken;

use super::{Background, ServiceDeps, ServiceError, ServiceResult, SessionCtx};
use crate::clock::Clock;
use crate::protocol::ErrorCode;
use crate::protocol::v1;
use crate::store::StoreError;
use crate::util::Unpoisoned;

/// (series, minute start ms) → count.
const MINUTES: TableDefinition<(&str, u64), u64> = TableDefinition::new("analytics_minutes");
/// (series, hour start ms) → count.
const HOURS: TableDefinition<(&str, u64), u64> = TableDefinition::new("analytics_hours");
/// (resolution: 0 minute / 1 hour, start ms) → HyperLogLog registers of users.
const USERS: TableDefinition<(u8, u64), &[u8]> = TableDefinition::new("analytics_users");
/// Every series ever counted (for restarts and pruning) → first seen, ms.
const SERIES: TableDefinition<&str, u64> = TableDefinition::new("analytics_series");

const MINUTE_MS: u64 = 60_000;
const HOUR_MS: u64 = 3_600_000;
/// How often rollups are pruned, at most.
const PRUNE_EVERY_MS: u64 = 10 * MINUTE_MS;
/// Points in one series answer, at most.
const MAX_POINTS: u64 = 10_000;
/// The role that may query analytics and subscribe to metrics.
pub const METRICS_ROLE: &str = "metrics";

/// Analytics settings (`[analytics]` in the configuration file).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AnalyticsConfig {
    /// Width of a fine (in-memory) bucket.
    #[serde(with = "crate::clock::duration_str")]
    pub bucket: Duration,
    /// How long fine buckets are kept in memory.
    #[serde(with = "crate::clock::duration_str")]
    pub window: Duration,
    /// How long minute rollups are kept in the database.
    #[serde(with = "crate::clock::duration_str")]
    pub minute_retention: Duration,
    /// How long hour rollups are kept in the database.
    #[serde(with = "crate::clock::duration_str")]
    pub hour_retention: Duration,
    /// How often pending counts are written to the rollups.
    #[serde(with = "crate::clock::duration_str")]
    pub flush_interval: Duration,
    /// If not empty, the only event types accepted; others get `UNKNOWN_EVENT_TYPE`.
    pub event_types: Vec<String>,
    /// Distinct event types at most; a new type past this gets `LIMIT_EXCEEDED`.
    pub max_event_types: usize,
    /// Distinct (type, dimension, value) series at most; past this, `LIMIT_EXCEEDED`.
    pub max_dimension_series: usize,
    /// Dimensions per event at most.
    pub max_dimensions: usize,
    /// Events per track request at most.
    pub max_batch: usize,
    /// The largest `count` of one event.
    pub max_count: u32,
    /// Occurrences a session may track per second (a token bucket holding two
    /// seconds' worth, and at least `max_count`); past this, `RATE_LIMITED`.
    pub events_per_sec: u32,
    /// The default metrics streaming interval.
    #[serde(with = "crate::clock::duration_str")]
    pub metrics_interval: Duration,
    /// Metrics subscriptions per node at most.
    pub max_metrics_subscribers: usize,
    /// Occurrences one user may track per second over all their sessions (a token
    /// bucket holding two seconds' worth, and at least `max_count`); past this,
    /// `RATE_LIMITED`. 0: no per-user limit.
    pub events_per_sec_per_user: u32,
    /// New series (event types and dimension values) one user may add to this
    /// node at most, so that one user cannot use up the node's caps; past this,
    /// `LIMIT_EXCEEDED`. 0: no per-user cap.
    pub max_series_per_user: usize,
    /// Users the per-user limits do not apply to (trusted producers); the
    /// per-connection rate and the node's caps still do.
    pub unlimited_users: Vec<String>,
}

impl AnalyticsConfig {
    /// Checks the section: bucket, window and retentions that fit together.
    pub fn validate(&self) -> Result<(), super::InvalidConfig> {
        let a = self;
        let bad = |m: &str| Err(super::InvalidConfig(m.to_owned()));
        let bucket = a.bucket.as_millis();
        if !(1_000..=60_000).contains(&bucket) || 60_000 % bucket != 0 {
            return bad("analytics.bucket must be 1s-60s and divide a minute");
        }
        if a.window < a.bucket || a.window > Duration::from_secs(86_400) {
            return bad("analytics.window must be between analytics.bucket and 24h");
        }
        if a.minute_retention < a.window || a.hour_retention < a.minute_retention {
            return bad("analytics retention: window <= minute_retention <= hour_retention");
        }
        if a.flush_interval < Duration::from_millis(100) {
            return bad("analytics.flush_interval must be at least 100ms");
        }
        Ok(())
    }
}

impl Default for AnalyticsConfig {
    fn default() -> Self {
        Self {
            bucket: Duration::from_secs(5),
            window: Duration::from_secs(3600),
            minute_retention: Duration::from_secs(7 * 86_400),
            hour_retention: Duration::from_secs(90 * 86_400),
            flush_interval: Duration::from_secs(10),
            event_types: Vec::new(),
            max_event_types: 1_000,
            max_dimension_series: 10_000,
            max_dimensions: 4,
            max_batch: 100,
            max_count: 1_000,
            events_per_sec: 1_000,
            metrics_interval: Duration::from_secs(1),
            max_metrics_subscribers: 64,
            events_per_sec_per_user: 2_000,
            max_series_per_user: 1_000,
            unlimited_users: Vec::new(),
        }
    }
}

/// One event to track.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct NewEvent {
    /// The event type.
    #[serde(rename = "type")]
    pub kind: String,
    /// Dimensions (small, bounded).
    #[serde(default)]
    pub dimensions: BTreeMap<String, String>,
    /// Occurrences; 0 means 1.
    #[serde(default)]
    pub count: u32,
    /// The user, for distinct-user counts (backends only; a session's events are
    /// its user's).
    #[serde(default)]
    pub user: Option<String>,
}

impl From<v1::AnalyticsEvent> for NewEvent {
    fn from(e: v1::AnalyticsEvent) -> Self {
        Self {
            kind: e.r#type,
            dimensions: e.dimensions.into_iter().collect(),
            count: e.count,
            user: None,
        }
    }
}

/// Checks an event type: 1-64 of `a-z 0-9 _ . : -`, starting with a letter or digit.
pub fn validate_type(t: &str) -> ServiceResult<()> {
    let ok = !t.is_empty()
        && t.len() <= 64
        && t.as_bytes()[0].is_ascii_alphanumeric()
        && t.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.' | b':' | b'-')
        });
    if ok {
        Ok(())
    } else {
        Err(ServiceError::bad_request(format!(
            "malformed event type {t:?}: 1-64 of a-z 0-9 _ . : - starting with a letter or digit"
        )))
    }
}

fn validate_dimension(key: &str, value: &str) -> ServiceResult<()> {
    let key_ok = !key.is_empty()
        && key.len() <= 32
        && key
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if !key_ok {
        return Err(ServiceError::bad_request(format!(
            "malformed dimension key {key:?}: 1-32 of a-z 0-9 _"
        )));
    }
    if value.is_empty()
        || value.len() > 64
        || value.contains('|')
        || value.chars().any(char::is_control)
    {
        return Err(ServiceError::new(
            ErrorCode::LimitExceeded,
            format!("dimension {key}: values are 1-64 bytes without '|' or control characters"),
        ));
    }
    Ok(())
}

fn dimension_series(kind: &str, key: &str, value: &str) -> String {
    format!("{kind}|{key}={value}")
}

/// Per-user occurrence buckets kept before idle (full) ones are forgotten.
const USER_LIMITERS: usize = 100_000;

/// A per-session token bucket over occurrences.
#[derive(Debug, Clone, Copy)]
struct TokenBucket {
    tokens: f64,
    at_ms: u64,
}

impl TokenBucket {
    /// Takes `n` tokens if there are enough after refilling at `rate` up to `burst`.
    fn take(&mut self, n: u64, now_ms: u64, rate: f64, burst: f64) -> bool {
        let elapsed = now_ms.saturating_sub(self.at_ms) as f64 / 1000.0;
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.at_ms = self.at_ms.max(now_ms);
        if self.tokens >= n as f64 {
            self.tokens -= n as f64;
            true
        } else {
            false
        }
    }
}

/// Counts of one time bucket.
#[derive(Debug, Default)]
struct Bucket {
    start: u64,
    counts: HashMap<u32, u64>,
    users: Hll,
}

impl Bucket {
    fn new(start: u64) -> Self {
        Self {
            start,
            ..Self::default()
        }
    }

    fn add(&mut self, ids: &[u32], count: u64, user: Option<&str>) {
        for id in ids {
            *self.counts.entry(*id).or_default() += count;
        }
        if let Some(u) = user {
            self.users.insert(u);
        }
    }
}

#[derive(Debug, Default)]
struct State {
    /// Series names by id; a series is a type or `type|key=value`.
    names: Vec<Arc<str>>,
    ids: HashMap<Arc<str>, u32>,
    is_type: Vec<bool>,
    types: usize,
    /// Occurrences per series since the node started (for metrics streaming).
    totals: Vec<u64>,
    /// Fine buckets, oldest first, only those with events.
    fine: VecDeque<Bucket>,
    /// Minute buckets not yet written to the rollups.
    pending: BTreeMap<u64, Bucket>,
    /// Series ids not yet in the series table.
    unsaved: Vec<u32>,
    limiters: HashMap<String, TokenBucket>,
    /// user → their occurrence bucket (full ones are forgotten when many).
    user_limiters: HashMap<String, TokenBucket>,
    /// user → series they added.
    created_by: HashMap<String, usize>,
    last_prune: u64,
}

impl State {
    fn intern(&mut self, name: &str, is_type: bool, now: u64) -> u32 {
        if let Some(id) = self.ids.get(name) {
            return *id;
        }
        let id = self.names.len() as u32;
        let name: Arc<str> = name.into();
        self.names.push(name.clone());
        self.ids.insert(name, id);
        self.is_type.push(is_type);
        self.totals.push(0);
        if is_type {
            self.types += 1;
        }
        if now > 0 {
            self.unsaved.push(id);
        }
        id
    }

    fn type_ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.is_type
            .iter()
            .enumerate()
            .filter(|(_, t)| **t)
            .map(|(i, _)| i as u32)
    }
}

/// Minute buckets on their way to the rollups: (minute, (series, count)s, users).
type FlushBatch = Vec<(u64, Vec<(Arc<str>, u64)>, Hll)>;

/// The analytics service.
#[derive(Debug)]
pub struct AnalyticsService {
    deps: ServiceDeps,
    config: AnalyticsConfig,
    clock: Clock,
    allowed: HashSet<String>,
    /// Users exempt from the per-user caps.
    unlimited: HashSet<String>,
    state: Mutex<State>,
    /// Held by a flush and by queries that read the rollups, so a query never sees
    /// counts both pending and written.
    flush_lock: tokio::sync::Mutex<()>,
    streams: Mutex<HashMap<String, tokio::task::AbortHandle>>,
    /// The other nodes, in a cluster.
    peers: std::sync::OnceLock<Arc<dyn peers::Peers>>,
    /// Metrics streams run for other nodes' sessions, by subscription id.
    feeds: Mutex<HashMap<String, peers::RemoteFeed>>,
}

/// A series answer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Series {
    /// The width of each point, ms.
    pub resolution_ms: u64,
    /// (start ms, count), oldest first, zeros included.
    pub points: Vec<(u64, u64)>,
    /// The sum of the points.
    pub total: u64,
}

/// Which stored bucket width a query reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Fine,
    Minutes,
    Hours,
}

impl AnalyticsService {
    /// Opens the service, creates its tables and loads the known series. The
    /// returned work flushes periodically, and once more at shutdown.
    pub fn open(
        deps: ServiceDeps,
        config: AnalyticsConfig,
    ) -> Result<(Arc<Self>, Background), StoreError> {
        let mut txn = deps.store.db().begin_write()?;
        txn.set_quick_repair(true);
        txn.open_table(MINUTES)?;
        txn.open_table(HOURS)?;
        txn.open_table(USERS)?;
        txn.open_table(SERIES)?;
        txn.commit()?;
        let mut state = State::default();
        {
            let txn = deps.store.db().begin_read()?;
            let table = txn.open_table(SERIES)?;
            for row in table.iter()? {
                let (name, _) = row?;
                let name = name.value();
                state.intern(name, !name.contains('|'), 0);
            }
        }
        let svc = Arc::new(Self {
            allowed: config.event_types.iter().cloned().collect(),
            unlimited: config.unlimited_users.iter().cloned().collect(),
            clock: deps.clock.clone(),
            deps,
            config,
            state: Mutex::new(state),
            flush_lock: tokio::sync::Mutex::new(()),
            streams: Mutex::new(HashMap::new()),
            peers: std::sync::OnceLock::new(),
            feeds: Mutex::new(HashMap::new()),
        });
        let every = svc.config.flush_interval.max(Duration::from_millis(100));
        let work = Background::new(
            "analytics flush",
            flush_periodically(Arc::downgrade(&svc), every, svc.deps.shutdown.clone()),
        );
        Ok((svc, work))
    }

    /// The clock buckets are counted by.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.locked()
    }

    fn bucket_ms(&self) -> u64 {
        (self.config.bucket.as_millis() as u64).max(1)
    }

    fn window_ms(&self) -> u64 {
        self.config.window.as_millis() as u64
    }

    /// Tracks a batch of events for `user`, rate-limited per `session` when given.
    /// The batch is counted whole or refused whole. Returns the occurrences counted.
    pub fn track(
        &self,
        user: Option<&str>,
        session: Option<&str>,
        events: &[NewEvent],
    ) -> ServiceResult<u64> {
        if events.is_empty() {
            return Err(ServiceError::bad_request("no events"));
        }
        if events.len() > self.config.max_batch {
            return Err(ServiceError::new(
                ErrorCode::LimitExceeded,
                format!("at most {} events per request", self.config.max_batch),
            ));
        }
        let mut total = 0u64;
        for e in events {
            validate_type(&e.kind)?;
            if !self.allowed.is_empty() && !self.allowed.contains(&e.kind) {
                return Err(ServiceError::new(
                    ErrorCode::UnknownEventType,
                    format!("event type {:?} is not configured", e.kind),
                ));
            }
            if e.dimensions.len() > self.config.max_dimensions {
                return Err(ServiceError::new(
                    ErrorCode::LimitExceeded,
                    format!(
                        "at most {} dimensions per event",
                        self.config.max_dimensions
                    ),
                ));
            }
            for (k, v) in &e.dimensions {
                validate_dimension(k, v)?;
            }
            if e.count > self.config.max_count {
                return Err(ServiceError::new(
                    ErrorCode::LimitExceeded,
                    format!("an event's count is at most {}", self.config.max_count),
                ));
            }
            if let Some(u) = &e.user {
                crate::ids::UserId::parse(u)?;
            }
            total += u64::from(e.count.max(1));
        }

        // Each dimension's series name, built once and outside the lock.
        let dim_series: Vec<Vec<String>> = events
            .iter()
            .map(|e| {
                e.dimensions
                    .iter()
                    .map(|(k, v)| dimension_series(&e.kind, k, v))
                    .collect()
            })
            .collect();
        let now = self.clock.now_ms();
        let mut st = self.state();
        // Caps first, so a refused batch costs no tokens.
        let mut new_types = HashSet::new();
        let mut new_dims = HashSet::new();
        for (e, dims) in events.iter().zip(&dim_series) {
            if !st.ids.contains_key(e.kind.as_str()) {
                new_types.insert(e.kind.as_str());
            }
            for s in dims {
                if !st.ids.contains_key(s.as_str()) {
                    new_dims.insert(s.as_str());
                }
            }
        }
        if st.types + new_types.len() > self.config.max_event_types {
            return Err(ServiceError::new(
                ErrorCode::LimitExceeded,
                format!(
                    "the node counts at most {} event types",
                    self.config.max_event_types
                ),
            ));
        }
        let dims = st.names.len() - st.types;
        if dims + new_dims.len() > self.config.max_dimension_series {
            return Err(ServiceError::new(
                ErrorCode::LimitExceeded,
                format!(
                    "the node counts at most {} dimension values",
                    self.config.max_dimension_series
                ),
            ));
        }
        // Per-user caps, for a session's user not on the allowlist.
        let limited_user = user.filter(|u| session.is_some() && !self.unlimited.contains(*u));
        let new_series = new_types.len() + new_dims.len();
        if let Some(u) = limited_user {
            let max = self.config.max_series_per_user;
            let created = st.created_by.get(u).copied().unwrap_or(0);
            if max > 0 && new_series > 0 && created + new_series > max {
                return Err(ServiceError::new(
                    ErrorCode::LimitExceeded,
                    format!("one user adds at most {max} event types and dimension values"),
                ));
            }
        }
        let user_rate = f64::from(self.config.events_per_sec_per_user);
        let user_burst = (2.0 * user_rate).max(f64::from(self.config.max_count));
        if let Some(u) = limited_user.filter(|_| user_rate > 0.0) {
            if st.user_limiters.len() >= USER_LIMITERS && !st.user_limiters.contains_key(u) {
                // A full bucket is the same as none.
                st.user_limiters.retain(|_, b| {
                    let mut b = *b;
                    b.take(0, now, user_rate, user_burst);
                    b.tokens < user_burst
                });
                if st.user_limiters.len() >= USER_LIMITERS {
                    st.user_limiters.clear();
                }
            }
            let bucket = st.user_limiters.entry(u.to_owned()).or_insert(TokenBucket {
                tokens: user_burst,
                at_ms: now,
            });
            if !bucket.take(total, now, user_rate, user_burst) {
                let wait = ((total as f64 - bucket.tokens) / user_rate * 1000.0).ceil() as u64;
                return Err(ServiceError::rate_limited(
                    format!(
                        "at most {} events per second per user",
                        self.config.events_per_sec_per_user
                    ),
                    wait.max(1),
                ));
            }
        }
        if let Some(session) = session {
            let rate = f64::from(self.config.events_per_sec.max(1));
            let burst = (2.0 * rate).max(f64::from(self.config.max_count));
            let bucket = st
                .limiters
                .entry(session.to_owned())
                .or_insert(TokenBucket {
                    tokens: burst,
                    at_ms: now,
                });
            if !bucket.take(total, now, rate, burst) {
                let wait = ((total as f64 - bucket.tokens) / rate * 1000.0).ceil() as u64;
                // The user's tokens were not used after all.
                if let Some(b) = limited_user.and_then(|u| st.user_limiters.get_mut(u)) {
                    b.tokens = (b.tokens + total as f64).min(user_burst);
                }
                return Err(ServiceError::rate_limited(
                    format!(
                        "at most {} events per second per connection",
                        self.config.events_per_sec
                    ),
                    wait.max(1),
                ));
            }
        }
        if let Some(u) = limited_user.filter(|_| new_series > 0) {
            *st.created_by.entry(u.to_owned()).or_default() += new_series;
        }

        let bucket_ms = self.bucket_ms();
        let fine_start = now - now % bucket_ms;
        let minute = now - now % MINUTE_MS;
        let mut ids = Vec::with_capacity(1 + self.config.max_dimensions);
        for (e, dims) in events.iter().zip(&dim_series) {
            let count = u64::from(e.count.max(1));
            let user = e.user.as_deref().or(user);
            ids.clear();
            ids.push(st.intern(&e.kind, true, now));
            for name in dims {
                ids.push(st.intern(name, false, now));
            }
            for id in &ids {
                st.totals[*id as usize] += count;
            }
            let st = &mut *st;
            let fine = match st.fine.back() {
                Some(b) if b.start == fine_start => st.fine.back_mut(),
                Some(b) if b.start > fine_start => {
                    // The clock went back: count into the bucket if it is still kept.
                    st.fine.iter_mut().rev().find(|b| b.start == fine_start)
                }
                _ => {
                    st.fine.push_back(Bucket::new(fine_start));
                    st.fine.back_mut()
                }
            };
            if let Some(b) = fine {
                b.add(&ids, count, user);
            }
            st.pending
                .entry(minute)
                .or_insert_with(|| Bucket::new(minute))
                .add(&ids, count, user);
        }
        let horizon = now.saturating_sub(self.window_ms());
        while st
            .fine
            .front()
            .is_some_and(|b| b.start + bucket_ms <= horizon)
        {
            st.fine.pop_front();
        }
        Ok(total)
    }

    /// `AnalyticsTrackRequest` from a session.
    pub fn track_request(
        &self,
        ctx: &SessionCtx,
        req: v1::AnalyticsTrackRequest,
    ) -> ServiceResult<v1::AnalyticsTrackResponse> {
        let events: Vec<NewEvent> = req.events.into_iter().map(NewEvent::from).collect();
        let accepted = self.track(Some(ctx.user_id()), Some(ctx.session_id()), &events)?;
        Ok(v1::AnalyticsTrackResponse { accepted })
    }

    fn require_metrics_role(ctx: &SessionCtx) -> ServiceResult<()> {
        if ctx.roles.iter().any(|r| r == METRICS_ROLE) {
            Ok(())
        } else {
            Err(ServiceError::new(
                ErrorCode::PermissionDenied,
                "analytics queries and metrics need the `metrics` role",
            ))
        }
    }

    /// Chooses the stored buckets for a range of `duration_ms` at `resolution_ms`.
    fn source(&self, duration_ms: u64, resolution_ms: u64) -> (Source, u64) {
        if duration_ms <= self.window_ms() && resolution_ms < MINUTE_MS {
            (Source::Fine, self.bucket_ms())
        } else if duration_ms <= self.config.minute_retention.as_millis() as u64
            && resolution_ms < HOUR_MS
        {
            (Source::Minutes, MINUTE_MS)
        } else {
            (Source::Hours, HOUR_MS)
        }
    }

    /// The series of `kind` (optionally restricted to `dimension` = "key=value") over
    /// the last `duration_ms`, one point per `resolution_ms` (rounded up to the width
    /// of the buckets it is read from).
    pub async fn series(
        &self,
        kind: &str,
        dimension: &str,
        duration_ms: u64,
        resolution_ms: u64,
    ) -> ServiceResult<Series> {
        validate_type(kind)?;
        let name = if dimension.is_empty() {
            kind.to_owned()
        } else {
            let (k, v) = dimension
                .split_once('=')
                .ok_or_else(|| ServiceError::bad_request("dimension must be key=value"))?;
            validate_dimension(k, v)?;
            dimension_series(kind, k, v)
        };
        if duration_ms == 0 {
            return Err(ServiceError::bad_request("duration must be positive"));
        }
        let (source, width) = self.source(duration_ms, resolution_ms);
        let too_coarse = || ServiceError::bad_request("resolution too large");
        let res = resolution_ms
            .max(width)
            .div_ceil(width)
            .checked_mul(width)
            .ok_or_else(too_coarse)?;
        let now = self.clock.now_ms();
        let first = now.saturating_sub(duration_ms - 1) / res * res;
        let last = now / res * res;
        let end = last.checked_add(res).ok_or_else(too_coarse)?;
        let n = (last - first) / res + 1;
        if n > MAX_POINTS {
            return Err(ServiceError::new(
                ErrorCode::LimitExceeded,
                format!("at most {MAX_POINTS} points; use a coarser resolution"),
            ));
        }
        let mut points: Vec<(u64, u64)> = (0..n).map(|i| (first + i * res, 0)).collect();
        let mut add = |start: u64, count: u64| {
            if start >= first && start < end {
                points[((start - first) / res) as usize].1 += count;
            }
        };
        match source {
            Source::Fine => {
                let st = self.state();
                if let Some(id) = st.ids.get(name.as_str()) {
                    for b in &st.fine {
                        if let Some(c) = b.counts.get(id) {
                            add(b.start, *c);
                        }
                    }
                }
            }
            Source::Minutes | Source::Hours => {
                let _flush = self.flush_lock.lock().await;
                let pending: Vec<(u64, u64)> = {
                    let st = self.state();
                    match st.ids.get(name.as_str()) {
                        Some(id) => st
                            .pending
                            .values()
                            .filter_map(|b| b.counts.get(id).map(|c| (b.start, *c)))
                            .collect(),
                        None => return Ok(zeros(res, points)),
                    }
                };
                let table = if source == Source::Minutes {
                    MINUTES
                } else {
                    HOURS
                };
                let txn = self.deps.store.db().begin_read()?;
                let t = txn.open_table(table)?;
                for row in t.range((name.as_str(), first)..(name.as_str(), end))? {
                    let (k, v) = row?;
                    add(k.value().1, v.value());
                }
                for (start, c) in pending {
                    add(start, c);
                }
            }
        }
        let total = points.iter().map(|p| p.1).sum();
        Ok(Series {
            resolution_ms: res,
            points,
            total,
        })
    }

    /// The `limit` most frequent event types over the last `window_ms`.
    pub async fn top(&self, window_ms: u64, limit: usize) -> ServiceResult<Vec<(String, u64)>> {
        if window_ms == 0 {
            return Err(ServiceError::bad_request("window must be positive"));
        }
        let (source, width) = self.source(window_ms, 0);
        let now = self.clock.now_ms();
        let from = now.saturating_sub(window_ms - 1) / width * width;
        let mut counts: HashMap<u32, u64> = HashMap::new();
        let names: Vec<Arc<str>>;
        match source {
            Source::Fine => {
                let st = self.state();
                for b in st.fine.iter().filter(|b| b.start >= from) {
                    for (id, c) in &b.counts {
                        if st.is_type[*id as usize] {
                            *counts.entry(*id).or_default() += c;
                        }
                    }
                }
                names = st.names.clone();
            }
            Source::Minutes | Source::Hours => {
                let _flush = self.flush_lock.lock().await;
                let types: Vec<(u32, Arc<str>)> = {
                    let st = self.state();
                    for b in st.pending.values().filter(|b| b.start >= from) {
                        for (id, c) in &b.counts {
                            if st.is_type[*id as usize] {
                                *counts.entry(*id).or_default() += c;
                            }
                        }
                    }
                    names = st.names.clone();
                    st.type_ids()
                        .map(|id| (id, st.names[id as usize].clone()))
                        .collect()
                };
                let table = if source == Source::Minutes {
                    MINUTES
                } else {
                    HOURS
                };
                let txn = self.deps.store.db().begin_read()?;
                let t = txn.open_table(table)?;
                for (id, name) in types {
                    for row in t.range((&*name, from)..(&*name, u64::MAX))? {
                        *counts.entry(id).or_default() += row?.1.value();
                    }
                }
            }
        }
        let out: Vec<(String, u64)> = counts
            .into_iter()
            .filter(|(_, c)| *c > 0)
            .map(|(id, c)| (names[id as usize].to_string(), c))
            .collect();
        Ok(rank(out, limit))
    }

    /// Estimated distinct users over the last `window_ms`, and the window covered.
    pub async fn distinct_users(&self, window_ms: u64) -> ServiceResult<(u64, u64)> {
        let (sketch, covered) = self.users_sketch(window_ms).await?;
        Ok((sketch.estimate(), covered))
    }

    /// The sketch of users over the last `window_ms`, and the window covered.
    async fn users_sketch(&self, window_ms: u64) -> ServiceResult<(Hll, u64)> {
        if window_ms == 0 {
            return Err(ServiceError::bad_request("window must be positive"));
        }
        let (source, width) = self.source(window_ms, 0);
        let now = self.clock.now_ms();
        let from = now.saturating_sub(window_ms - 1) / width * width;
        let covered = now - from + 1;
        let mut sketch = Hll::default();
        match source {
            Source::Fine => {
                let st = self.state();
                for b in st.fine.iter().filter(|b| b.start >= from) {
                    sketch.merge(&b.users);
                }
            }
            Source::Minutes | Source::Hours => {
                let _flush = self.flush_lock.lock().await;
                {
                    let st = self.state();
                    for b in st.pending.values().filter(|b| b.start >= from) {
                        sketch.merge(&b.users);
                    }
                }
                let res = if source == Source::Minutes { 0u8 } else { 1u8 };
                let txn = self.deps.store.db().begin_read()?;
                let t = txn.open_table(USERS)?;
                for row in t.range((res, from)..=(res, u64::MAX))? {
                    let (_, v) = row?;
                    if let Some(h) = Hll::from_bytes(v.value()) {
                        sketch.merge(&h);
                    }
                }
            }
        }
        Ok((sketch, covered))
    }

    /// Writes pending minute buckets to the rollups, in one group commit.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let _flush = self.flush_lock.lock().await;
        let now = self.clock.now_ms();
        let (batch, new_names, prune) = {
            let mut st = self.state();
            let pending = std::mem::take(&mut st.pending);
            let unsaved = std::mem::take(&mut st.unsaved);
            let new_names: Vec<Arc<str>> = unsaved
                .iter()
                .map(|id| st.names[*id as usize].clone())
                .collect();
            let prune = if now >= st.last_prune + PRUNE_EVERY_MS {
                st.last_prune = now;
                Some(st.names.clone())
            } else {
                None
            };
            let batch: FlushBatch = pending
                .into_values()
                .map(|b| {
                    let counts = b
                        .counts
                        .iter()
                        .map(|(id, c)| (st.names[*id as usize].clone(), *c))
                        .collect();
                    (b.start, counts, b.users)
                })
                .collect();
            if batch.is_empty() && new_names.is_empty() && prune.is_none() {
                return Ok(());
            }
            (Arc::new(batch), new_names, prune)
        };
        let minute_cut = now.saturating_sub(self.config.minute_retention.as_millis() as u64);
        let hour_cut = now.saturating_sub(self.config.hour_retention.as_millis() as u64);
        let write_batch = batch.clone();
        let names = new_names.clone();
        let result = self
            .deps
            .writer
            .write(move |txn| {
                let mut minutes = txn.open_table(MINUTES)?;
                let mut hours = txn.open_table(HOURS)?;
                let mut users = txn.open_table(USERS)?;
                let mut series = txn.open_table(SERIES)?;
                for name in &names {
                    series.insert(&**name, now)?;
                }
                for (minute, counts, sketch) in write_batch.iter() {
                    let hour = minute - minute % HOUR_MS;
                    for (name, c) in counts {
                        for (table, start) in [(&mut minutes, *minute), (&mut hours, hour)] {
                            let old = table.get((&**name, start))?.map_or(0, |v| v.value());
                            table.insert((&**name, start), old + c)?;
                        }
                    }
                    if !sketch.is_empty() {
                        for key in [(0u8, *minute), (1u8, hour)] {
                            let mut merged = sketch.clone();
                            if let Some(old) = users.get(key)?
                                && let Some(h) = Hll::from_bytes(old.value())
                            {
                                merged.merge(&h);
                            }
                            users.insert(key, merged.as_bytes())?;
                        }
                    }
                }
                if let Some(all) = &prune {
                    for name in all {
                        minutes.retain_in((&**name, 0)..(&**name, minute_cut), |_, _| false)?;
                        hours.retain_in((&**name, 0)..(&**name, hour_cut), |_, _| false)?;
                    }
                    users.retain_in((0u8, 0)..(0u8, minute_cut), |_, _| false)?;
                    users.retain_in((1u8, 0)..(1u8, hour_cut), |_, _| false)?;
                }
                Ok(())
            })
            .await;
        if let Err(e) = &result {
            // Put the counts back: nothing tracked is dropped by a failed flush.
            tracing::warn!(error = %e, "analytics flush failed; retrying at the next one");
            let mut st = self.state();
            for (minute, counts, sketch) in batch.iter() {
                let b = st
                    .pending
                    .entry(*minute)
                    .or_insert_with(|| Bucket::new(*minute));
                b.users.merge(sketch);
                let pairs: Vec<(u32, u64)> = counts
                    .iter()
                    .map(|(n, c)| (*st.ids.get(&**n).expect("interned"), *c))
                    .collect();
                let b = st.pending.get_mut(minute).expect("inserted");
                for (id, c) in pairs {
                    *b.counts.entry(id).or_default() += c;
                }
            }
            let ids: Vec<u32> = new_names.iter().map(|n| st.ids[&**n]).collect();
            st.unsaved.extend(ids);
        }
        result
    }

    /// The node is stopping: ends the metrics streams and writes what is pending.
    async fn finish(&self) {
        for (_, task) in self.streams.locked().drain() {
            task.abort();
        }
        self.end_feeds();
        if let Err(e) = self.flush().await {
            tracing::error!(error = %e, "the final analytics flush failed");
        }
    }

    /// The session ended: forget its rate limit and stop its metrics stream.
    pub fn disconnected(&self, ctx: &SessionCtx) {
        self.state().limiters.remove(ctx.session_id());
        self.stop_stream(ctx.session_id());
    }

    /// Answers an analytics request from a session.
    pub async fn handle(
        self: &Arc<Self>,
        ctx: &SessionCtx,
        body: v1::request::Body,
    ) -> ServiceResult<v1::response::Body> {
        use v1::request::Body as Rq;
        use v1::response::Body as Rs;
        match body {
            Rq::AnalyticsTrack(r) => self.track_request(ctx, r).map(Rs::AnalyticsTrack),
            Rq::AnalyticsSeries(r) => {
                Self::require_metrics_role(ctx)?;
                self.cluster_series(r).await.map(Rs::AnalyticsSeries)
            }
            Rq::AnalyticsTop(r) => {
                Self::require_metrics_role(ctx)?;
                let limit = match r.limit {
                    0 => 10,
                    n => n.min(100) as usize,
                };
                self.cluster_top(r.window_ms, limit)
                    .await
                    .map(Rs::AnalyticsTop)
            }
            Rq::AnalyticsDistinctUsers(r) => {
                Self::require_metrics_role(ctx)?;
                self.cluster_users(r.window_ms)
                    .await
                    .map(Rs::AnalyticsDistinctUsers)
            }
            Rq::MetricsSubscribe(r) => {
                Self::require_metrics_role(ctx)?;
                self.subscribe(ctx, r).map(Rs::MetricsSubscribe)
            }
            Rq::MetricsUnsubscribe(_) => {
                self.stop_stream(ctx.session_id());
                Ok(Rs::MetricsUnsubscribe(v1::MetricsUnsubscribeResponse {}))
            }
            other => Err(ServiceError::new(
                ErrorCode::UnknownRequest,
                format!("{} is not an analytics request", other.name()),
            )),
        }
    }
}

/// The `limit` largest counts, largest first (ties by name).
fn rank(mut counts: Vec<(String, u64)>, limit: usize) -> Vec<(String, u64)> {
    counts.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    counts.truncate(limit);
    counts
}

fn zeros(res: u64, points: Vec<(u64, u64)>) -> Series {
    Series {
        resolution_ms: res,
        points,
        total: 0,
    }
}

/// Flushes every `every` until `stop`, then once more.
async fn flush_periodically(svc: Weak<AnalyticsService>, every: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => break,
        }
        let Some(svc) = svc.upgrade() else { return };
        if let Err(e) = svc.flush().await {
            tracing::warn!(error = %e, "analytics flush failed");
        }
    }
    if let Some(svc) = svc.upgrade() {
        svc.finish().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_types_and_dimensions_are_checked() {
        for ok in ["signup", "page.view", "a", "checkout:v2", "x-1_2"] {
            validate_type(ok).unwrap();
        }
        for bad in ["", "Signup", "-x", "a b", "a|b", "é", &"a".repeat(65)] {
            assert_eq!(
                validate_type(bad).unwrap_err().code,
                ErrorCode::BadRequest,
                "{bad}"
            );
        }
        validate_dimension("plan", "free").unwrap();
        assert_eq!(
            validate_dimension("Plan", "free").unwrap_err().code,
            ErrorCode::BadRequest
        );
        assert_eq!(
            validate_dimension("plan", &"x".repeat(65))
                .unwrap_err()
                .code,
            ErrorCode::LimitExceeded
        );
        assert_eq!(
            validate_dimension("plan", "").unwrap_err().code,
            ErrorCode::LimitExceeded
        );
    }

    #[test]
    fn the_token_bucket_refills_with_time_only() {
        let mut b = TokenBucket {
            tokens: 10.0,
            at_ms: 1_000,
        };
        assert!(b.take(10, 1_000, 5.0, 10.0));
        assert!(!b.take(1, 1_000, 5.0, 10.0));
        assert!(b.take(5, 2_000, 5.0, 10.0), "one second refills 5");
        assert!(!b.take(1, 2_000, 5.0, 10.0));
        assert!(b.take(10, 60_000, 5.0, 10.0), "capped at the burst");
        assert!(!b.take(1, 60_000, 5.0, 10.0));
    }
}
