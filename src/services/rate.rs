//! Write rate limits: one token bucket per user and kind of write (chat sends,
//! document submits, room creation, contact requests, presence changes).
//!
//! A bucket holds at most `burst` tokens and gains `per_sec` tokens a second; a
//! write takes one token or is refused with `RATE_LIMITED` and the time until a
//! token is back (`Error.retry_after_ms`). Time comes from the node's [`Clock`], so
//! tests move it by hand.
//!
//! Idle users cost nothing: a bucket that has refilled to `burst` is the same as no
//! bucket at all, so buckets are kept in a map that forgets full ones whenever it
//! reaches its size bound (`limits.rate.max_tracked_users`). Checking an existing
//! user's bucket allocates nothing (the map is looked up by `&str`).

use std::collections::HashMap;
use std::sync::Mutex;

use serde::Deserialize;

use super::{ServiceError, ServiceResult};
use crate::clock::Clock;
use crate::util::Unpoisoned;

/// One rate: a burst and a sustained rate per second.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rate {
    /// Writes allowed at once after a quiet period (the bucket's size).
    pub burst: u32,
    /// Writes allowed per second, sustained (the refill rate). 0 turns the limit off.
    pub per_sec: f64,
}

impl Rate {
    /// No limit.
    pub const OFF: Rate = Rate::new(0, 0.0);

    /// `burst` at once, `per_sec` sustained.
    pub const fn new(burst: u32, per_sec: f64) -> Self {
        Self { burst, per_sec }
    }

    /// Whether the limit is on.
    pub fn enabled(&self) -> bool {
        self.per_sec > 0.0
    }
}

/// The write rate limits (`[limits.rate]` in the configuration file), per user.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateConfig {
    /// `ChatSendRequest`s (and nothing else: server API posts are not limited).
    pub chat_send: Rate,
    /// `DocSubmitRequest`s.
    pub doc_submit: Rate,
    /// `RoomCreateRequest`s.
    pub room_create: Rate,
    /// `ContactRequestRequest`s.
    pub contact_request: Rate,
    /// `PresenceSetRequest`s.
    pub presence_set: Rate,
    /// Buckets kept per kind of write at most; past this, full (idle) buckets are
    /// forgotten, and if none is full, all are (the limit then restarts afresh).
    pub max_tracked_users: usize,
}

impl RateConfig {
    /// Every write kind unlimited (for trusted load generators and tests about
    /// something else).
    pub fn off() -> Self {
        Self {
            chat_send: Rate::OFF,
            doc_submit: Rate::OFF,
            room_create: Rate::OFF,
            contact_request: Rate::OFF,
            presence_set: Rate::OFF,
            ..Self::default()
        }
    }
}

impl Default for RateConfig {
    fn default() -> Self {
        Self {
            chat_send: Rate::new(200, 50.0),
            doc_submit: Rate::new(200, 50.0),
            room_create: Rate::new(20, 1.0),
            contact_request: Rate::new(20, 1.0),
            presence_set: Rate::new(10, 2.0),
            max_tracked_users: 100_000,
        }
    }
}

impl RateConfig {
    /// Checks the section: bursts of at least one write and finite rates.
    pub fn validate(&self) -> Result<(), super::InvalidConfig> {
        for (name, r) in self.rates() {
            if !r.per_sec.is_finite() || r.per_sec < 0.0 || (r.enabled() && r.burst == 0) {
                return Err(super::InvalidConfig(format!(
                    "limits.rate.{name}: per_sec must be 0 (off) or positive with a burst of at least 1"
                )));
            }
        }
        if self.max_tracked_users == 0 {
            return Err(super::InvalidConfig(
                "limits.rate.max_tracked_users must be positive".into(),
            ));
        }
        Ok(())
    }

    fn rates(&self) -> [(&'static str, Rate); 5] {
        [
            ("chat_send", self.chat_send),
            ("doc_submit", self.doc_submit),
            ("room_create", self.room_create),
            ("contact_request", self.contact_request),
            ("presence_set", self.presence_set),
        ]
    }
}

/// A token bucket. Pure: the caller passes the time, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenBucket {
    tokens: f64,
    at_ms: u64,
}

impl TokenBucket {
    /// A full bucket at `now_ms`.
    pub fn full(rate: Rate, now_ms: u64) -> Self {
        Self {
            tokens: f64::from(rate.burst),
            at_ms: now_ms,
        }
    }

    fn refill(&mut self, rate: Rate, now_ms: u64) {
        // A clock that goes back refills nothing (and does not go back with it).
        let elapsed = now_ms.saturating_sub(self.at_ms) as f64 / 1000.0;
        self.tokens = (self.tokens + elapsed * rate.per_sec).min(f64::from(rate.burst));
        self.at_ms = self.at_ms.max(now_ms);
    }

    /// Takes `n` tokens at `now_ms`, or says how many milliseconds until there are
    /// enough (at least 1; `u64::MAX` when `n` is more than the burst).
    pub fn take(&mut self, rate: Rate, n: u32, now_ms: u64) -> Result<(), u64> {
        self.refill(rate, now_ms);
        let n = f64::from(n);
        if self.tokens >= n {
            self.tokens -= n;
            return Ok(());
        }
        if n > f64::from(rate.burst) || rate.per_sec <= 0.0 {
            return Err(u64::MAX);
        }
        let wait = ((n - self.tokens) / rate.per_sec * 1000.0).ceil();
        Err((wait as u64).max(1))
    }

    /// Whether the bucket has refilled to its burst by `now_ms` (it then carries
    /// no information and can be forgotten).
    pub fn is_full(&self, rate: Rate, now_ms: u64) -> bool {
        let mut b = *self;
        b.refill(rate, now_ms);
        b.tokens >= f64::from(rate.burst)
    }
}

/// The kinds of write that are rate-limited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// A chat message.
    ChatSend,
    /// A document operation.
    DocSubmit,
    /// A new room.
    RoomCreate,
    /// A contact request.
    ContactRequest,
    /// A presence status change.
    PresenceSet,
}

impl Action {
    const ALL: [Action; 5] = [
        Action::ChatSend,
        Action::DocSubmit,
        Action::RoomCreate,
        Action::ContactRequest,
        Action::PresenceSet,
    ];

    fn what(self) -> &'static str {
        match self {
            Action::ChatSend => "chat messages",
            Action::DocSubmit => "document operations",
            Action::RoomCreate => "new rooms",
            Action::ContactRequest => "contact requests",
            Action::PresenceSet => "presence changes",
        }
    }
}

/// Per-user buckets of one kind of write.
#[derive(Debug)]
struct Buckets {
    rate: Rate,
    /// Shards by user, so that users' writes rarely wait for each other's check.
    shards: Box<[Shard]>,
}

/// One shard of a kind's buckets: user → bucket.
type Shard = Mutex<HashMap<Box<str>, TokenBucket>>;

impl Buckets {
    fn shard(&self, user: &str) -> &Shard {
        use std::hash::{BuildHasher, BuildHasherDefault};
        let hash = BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default()
            .hash_one(user);
        &self.shards[(hash % self.shards.len() as u64) as usize]
    }
}

/// Shards per kind of write (one when few users are tracked).
const SHARDS: usize = 16;

/// Every write rate limit of a node, per user.
#[derive(Debug)]
pub struct RateLimits {
    clock: Clock,
    /// Buckets per shard at most.
    max_tracked: usize,
    kinds: [Buckets; 5],
}

impl RateLimits {
    /// The limits of `config`, reading time from `clock`.
    pub fn new(config: &RateConfig, clock: Clock) -> Self {
        let max_tracked = config.max_tracked_users.max(1);
        let shards = if max_tracked >= 64 * SHARDS {
            SHARDS
        } else {
            1
        };
        let buckets = |rate| Buckets {
            rate,
            shards: (0..shards).map(|_| Mutex::new(HashMap::new())).collect(),
        };
        Self {
            clock,
            // Per shard.
            max_tracked: max_tracked / shards,
            kinds: [
                buckets(config.chat_send),
                buckets(config.doc_submit),
                buckets(config.room_create),
                buckets(config.contact_request),
                buckets(config.presence_set),
            ],
        }
    }

    fn kind(&self, action: Action) -> &Buckets {
        let i = Action::ALL
            .iter()
            .position(|a| *a == action)
            .expect("every action has buckets");
        &self.kinds[i]
    }

    /// Takes one `action` token of `user`, or refuses with `RATE_LIMITED` and the
    /// time until the next token (`retry_after_ms`).
    pub fn check(&self, action: Action, user: &str) -> ServiceResult<()> {
        let kind = self.kind(action);
        // A replicated command was checked by the node that proposed it.
        if !kind.rate.enabled() || crate::clock::replay::active() {
            return Ok(());
        }
        let now = self.clock.now_ms();
        let mut map = kind.shard(user).locked();
        let taken = match map.get_mut(user) {
            Some(bucket) => bucket.take(kind.rate, 1, now),
            None => {
                if map.len() >= self.max_tracked {
                    map.retain(|_, b| !b.is_full(kind.rate, now));
                    if map.len() >= self.max_tracked {
                        // Every tracked user is busy: start afresh rather than
                        // grow, or refuse users for others' traffic.
                        map.clear();
                    }
                }
                let mut bucket = TokenBucket::full(kind.rate, now);
                let taken = bucket.take(kind.rate, 1, now);
                map.insert(user.into(), bucket);
                taken
            }
        };
        drop(map);
        taken.map_err(|wait| {
            ServiceError::rate_limited(
                format!(
                    "too many {}: at most {} at once and {} per second",
                    action.what(),
                    kind.rate.burst,
                    kind.rate.per_sec
                ),
                wait,
            )
        })
    }

    /// Users with a bucket for `action` (for tests and metrics).
    pub fn tracked(&self, action: Action) -> usize {
        self.kind(action)
            .shards
            .iter()
            .map(|s| s.locked().len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ErrorCode;

    const R: Rate = Rate::new(3, 2.0);

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let mut b = TokenBucket::full(R, 10_000);
        for _ in 0..3 {
            b.take(R, 1, 10_000).unwrap();
        }
        assert_eq!(b.take(R, 1, 10_000), Err(500), "one token every 500 ms");
        assert_eq!(b.take(R, 1, 10_200), Err(300), "the wait shrinks");
        b.take(R, 1, 10_500).unwrap();
        assert_eq!(b.take(R, 1, 10_500), Err(500));
        // A long pause refills to the burst, never beyond.
        assert!(b.is_full(R, 60_000));
        for _ in 0..3 {
            b.take(R, 1, 60_000).unwrap();
        }
        assert!(b.take(R, 1, 60_000).is_err());
        assert!(!b.is_full(R, 60_000));
    }

    #[test]
    fn a_clock_going_back_refills_nothing() {
        let mut b = TokenBucket::full(R, 10_000);
        for _ in 0..3 {
            b.take(R, 1, 10_000).unwrap();
        }
        assert!(b.take(R, 1, 5_000).is_err());
        assert_eq!(b.take(R, 1, 10_000), Err(500), "time did not move back");
    }

    #[test]
    fn more_than_the_burst_never_fits() {
        let mut b = TokenBucket::full(R, 0);
        assert_eq!(b.take(R, 4, 0), Err(u64::MAX));
        b.take(R, 3, 0).unwrap();
    }

    #[test]
    fn limits_are_per_user_and_kind_and_idle_users_are_forgotten() {
        let clock = Clock::manual(1_000);
        let config = RateConfig {
            chat_send: R,
            max_tracked_users: 2,
            ..RateConfig::default()
        };
        let limits = RateLimits::new(&config, clock.clone());
        for _ in 0..3 {
            limits.check(Action::ChatSend, "ann").unwrap();
        }
        let e = limits.check(Action::ChatSend, "ann").unwrap_err();
        assert_eq!(e.code, ErrorCode::RateLimited);
        assert_eq!(e.retry_after_ms, Some(500));
        limits.check(Action::ChatSend, "bob").unwrap();
        limits.check(Action::PresenceSet, "ann").unwrap();
        assert_eq!(limits.tracked(Action::ChatSend), 2);
        // Both buckets refill; a third user makes room by forgetting them.
        clock.advance(10_000);
        limits.check(Action::ChatSend, "cat").unwrap();
        assert_eq!(limits.tracked(Action::ChatSend), 1);
        // Busy users are kept while there is room; past the bound, the map restarts.
        limits.check(Action::ChatSend, "dan").unwrap();
        limits.check(Action::ChatSend, "eve").unwrap();
        assert_eq!(limits.tracked(Action::ChatSend), 1);
    }

    #[test]
    fn many_users_never_grow_the_map_past_its_bound() {
        let clock = Clock::manual(0);
        let config = RateConfig {
            chat_send: R,
            max_tracked_users: 2048,
            ..RateConfig::default()
        };
        let limits = RateLimits::new(&config, clock.clone());
        for i in 0..10_000 {
            // Each user is busy (one token of three used): nothing is idle.
            limits.check(Action::ChatSend, &format!("u{i}")).unwrap();
            assert!(limits.tracked(Action::ChatSend) <= 2048);
        }
        assert!(limits.tracked(Action::ChatSend) > 0);
    }

    #[test]
    fn rates_read_from_toml_with_whole_or_fractional_rates() {
        let c: RateConfig = toml::from_str(
            "chat_send = { burst = 5, per_sec = 2 }\nroom_create = { burst = 1, per_sec = 0.5 }",
        )
        .unwrap();
        assert_eq!(c.chat_send, Rate::new(5, 2.0));
        assert_eq!(c.room_create, Rate::new(1, 0.5));
        assert_eq!(c.presence_set, RateConfig::default().presence_set);
    }

    #[test]
    fn a_rate_of_zero_is_off_and_bad_rates_are_refused() {
        let config = RateConfig {
            chat_send: Rate::new(0, 0.0),
            ..RateConfig::default()
        };
        config.validate().unwrap();
        let limits = RateLimits::new(&config, Clock::manual(0));
        for _ in 0..1000 {
            limits.check(Action::ChatSend, "ann").unwrap();
        }
        assert_eq!(limits.tracked(Action::ChatSend), 0);
        RateConfig::default().validate().unwrap();
        for bad in [
            Rate::new(0, 1.0),
            Rate::new(1, -1.0),
            Rate::new(1, f64::NAN),
        ] {
            let c = RateConfig {
                doc_submit: bad,
                ..RateConfig::default()
            };
            assert!(c.validate().is_err(), "{bad:?}");
        }
    }
}
