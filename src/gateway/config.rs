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
    /// Sessions one user may have open at once (all devices and tabs); past this a
    /// new session is closed with `TOO_MANY_CONNECTIONS`.
    pub max_sessions_per_user: usize,
    /// Sessions from one IP address, counted from the end of the transport
    /// handshake (before `Hello`); past this a new one is closed with
    /// `TOO_MANY_CONNECTIONS`. Handshakes still in progress are bounded by
    /// `retry_above_handshakes` and `timeouts.handshake`.
    pub max_connections_per_address: usize,
    /// QUIC handshakes in progress past which a new connection must first prove
    /// its address with a Retry round trip (a handshake flood from spoofed
    /// addresses then costs the server no handshake state). 0: always.
    pub retry_above_handshakes: usize,
    /// Bytes a client may send on one stream ahead of the server reading them (the
    /// QUIC stream flow-control window).
    pub stream_receive_window: u64,
    /// Bytes a client may send on all of its streams together ahead of the server
    /// reading them (the QUIC connection flow-control window): the most a client
    /// can park in the server, however many streams it opens.
    pub connection_receive_window: u64,
    /// Bytes the server sends on one connection ahead of the client's
    /// acknowledgements (QUIC's send buffer).
    pub send_window: u64,
    /// The QUIC congestion controller: `cubic` (the default) or `bbr`.
    pub congestion_control: crate::transport::CongestionControl,
    /// Bytes of pushes waiting to be written for one session, all kinds together;
    /// past this (as past `push_queue_frames`) the client is a slow consumer.
    pub push_queue_bytes: usize,
    /// Bytes of responses waiting to be written on the control stream; past this
    /// the server stops reading requests, as with `control_queue_frames`.
    pub control_queue_bytes: usize,
    /// TCP connections the HTTP side port serves at once; past this new ones are
    /// closed at once.
    pub http_max_connections: usize,
    /// The largest HTTP request body, in bytes (larger: 413).
    pub http_max_body_bytes: usize,
}

impl LimitsConfig {
    /// Checks the values that depend on each other; the message names the keys.
    pub fn validate(&self) -> Result<(), String> {
        let frame = self.max_frame_size as u64;
        if self.max_sessions_per_user == 0
            || self.max_connections_per_address == 0
            || self.http_max_connections == 0
            || self.http_max_body_bytes == 0
        {
            return Err(
                "limits.max_sessions_per_user, limits.max_connections_per_address, \
                 limits.http_max_connections and limits.http_max_body_bytes must be positive"
                    .into(),
            );
        }
        if self.stream_receive_window < 16 * 1024
            || self.connection_receive_window < self.stream_receive_window
            || self.send_window < 16 * 1024
        {
            return Err(
                "limits.stream_receive_window and limits.send_window must be at least \
                 16 KiB, limits.connection_receive_window at least the stream window"
                    .into(),
            );
        }
        if (self.push_queue_bytes as u64) < frame || (self.control_queue_bytes as u64) < frame {
            return Err(
                "limits.push_queue_bytes and limits.control_queue_bytes must hold a frame of \
                 limits.max_frame_size"
                    .into(),
            );
        }
        Ok(())
    }
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
            max_sessions_per_user: 32,
            max_connections_per_address: 1024,
            retry_above_handshakes: 256,
            stream_receive_window: 256 * 1024,
            connection_receive_window: 1024 * 1024,
            send_window: 2 * 1024 * 1024,
            congestion_control: Default::default(),
            push_queue_bytes: 8 * 1024 * 1024,
            control_queue_bytes: 1024 * 1024,
            http_max_connections: 1024,
            http_max_body_bytes: 1024 * 1024,
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
    /// The longest a client may wait before it acknowledges the server's packets,
    /// asked of it with QUIC's ACK-frequency extension together with an ACK every
    /// tenth packet (a client that does not offer the extension keeps its own 25 ms
    /// and every second packet); `0s` asks nothing. A connection gets a few small
    /// packets a second, each ACK a packet the server must receive, decrypt and
    /// process; a longer delay lets one ACK cover several. Delivery is not
    /// delayed, and a lost packet followed by another is still acknowledged (and
    /// resent) at once. For 10 s after a packet to a client is lost, that client is
    /// asked to acknowledge as without the extension, so a lost last packet is
    /// resent as soon as without it (`transport::endpoint::ACK_DELAY_LOSS_FALLBACK`);
    /// so is a client whose packets come further apart than this on average, as the
    /// long delay would save it no ACK.
    #[serde(with = "duration_str")]
    pub ack_delay: Duration,
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
    /// Time an HTTP client has to send a request's headers; a slower one is
    /// disconnected (slowloris).
    #[serde(with = "duration_str")]
    pub http_header_read: Duration,
}

impl TimeoutsConfig {
    /// `ack_delay` by default (docs/BENCHMARKS.md, "What each change bought").
    pub const DEFAULT_ACK_DELAY: Duration = Duration::from_millis(500);
    /// The longest `ack_delay` accepted.
    pub const MAX_ACK_DELAY: Duration = Duration::from_secs(1);
}

impl Default for TimeoutsConfig {
    fn default() -> Self {
        Self {
            handshake: Duration::from_secs(10),
            idle: Duration::from_secs(30),
            heartbeat: Duration::from_secs(10),
            ack_delay: Self::DEFAULT_ACK_DELAY,
            drain: Duration::from_secs(10),
            close_linger: Duration::from_millis(500),
            slow_consumer: Duration::from_secs(5),
            http_header_read: Duration::from_secs(10),
        }
    }
}
