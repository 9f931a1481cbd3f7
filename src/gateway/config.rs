//! The gateway's own configuration: per-connection limits and timeouts (`[limits]`
//! and `[timeouts]` in the configuration file, aggregated by `crate::config`).

use std::time::Duration;

use serde::Deserialize;

use crate::clock::duration_str;

/// Per-connection limits, announced to clients in `Welcome.limits`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// The largest frame accepted or sent, in bytes.
    pub max_frame_size: usize,
    /// The largest datagram accepted, in bytes (browsers can send about 1,200).
    pub max_datagram_size: usize,
    /// Requests one session may have waiting for their response.
    pub max_inflight_requests: usize,
    /// Frames waiting to be written on one push stream; past this the client is a
    /// slow consumer and is disconnected with `SLOW_CONSUMER`.
    pub push_queue_frames: usize,
    /// Responses waiting to be written on the control stream; when full the server
    /// stops reading requests until the client reads (for at most
    /// `timeouts.slow_consumer`).
    pub control_queue_frames: usize,
    /// Sessions this node accepts at once; past this new ones get `OVERLOADED`.
    pub max_connections: usize,
    /// Per-user write rate limits (`[limits.rate]`).
    pub rate: crate::services::rate::RateConfig,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_frame_size: 64 * 1024,
            max_datagram_size: 1200,
            max_inflight_requests: 64,
            push_queue_frames: 4096,
            control_queue_frames: 256,
            max_connections: 100_000,
            rate: Default::default(),
        }
    }
}

/// Timeouts.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TimeoutsConfig {
    /// Time allowed from connection to `Hello`.
    #[serde(with = "duration_str")]
    pub handshake: Duration,
    /// A connection with no packet for this long is dead.
    #[serde(with = "duration_str")]
    pub idle: Duration,
    /// QUIC keep-alive interval, also announced as the client heartbeat.
    #[serde(with = "duration_str")]
    pub heartbeat: Duration,
    /// How long shutdown waits for sessions to close.
    #[serde(with = "duration_str")]
    pub drain: Duration,
    /// After a `Close` frame, how long the server waits for the client to close first
    /// (so the frame is read) before it closes the connection itself.
    #[serde(with = "duration_str")]
    pub close_linger: Duration,
    /// How long a response (or a catch-up push) may wait for room in a session's
    /// queue; a client that reads nothing for this long is closed with
    /// `SLOW_CONSUMER`.
    #[serde(with = "duration_str")]
    pub slow_consumer: Duration,
}

impl Default for TimeoutsConfig {
    fn default() -> Self {
        Self {
            handshake: Duration::from_secs(10),
            idle: Duration::from_secs(30),
            heartbeat: Duration::from_secs(10),
            drain: Duration::from_secs(10),
            close_linger: Duration::from_millis(500),
            slow_consumer: Duration::from_secs(5),
        }
    }
}
