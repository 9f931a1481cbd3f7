//! Tutti: a real-time server. One QUIC connection per client carries chat,
//! notifications, presence, collaborative editing and live analytics, framed as
//! protobuf, over WebTransport (browsers) or raw QUIC (native programs).
//!
//! Dependencies point one way: `transport` -> `gateway` -> `services` ->
//! `store`/`ot`/`hub`. `protocol` and `ot` do no I/O. The native client
//! (`client`) needs only `protocol`, `ot`, `transport`, `auth`, `crypto` and
//! `metrics`: built with `default-features = false` (no `server` feature), the crate
//! is the client alone, without redb, axum or moka. docs/ARCHITECTURE.md has the
//! map and the rules.

// ---- shared by the client and the server ----
// JWT minting and verification, API keys, user id rules.
pub mod auth;
// The native Rust client (raw QUIC or WebTransport).
pub mod client;
// Wall-clock time that tests can set.
pub mod clock;
// SHA-256 and the rustls provider.
pub mod crypto;
// Typed user, room and document ids, parsed once at the boundary.
pub mod ids;
// HDR histograms per operation, counters, and their export.
pub mod metrics;
// Text operational transformation (no I/O).
pub mod ot;
// The wire protocol: frames, codes, generated messages (no I/O).
pub mod protocol;
// One session type over raw QUIC, WebTransport and an in-memory pair.
pub mod transport;
// Small helpers: hex, random ids, Unix time.
pub mod util;

// ---- the server (feature `server`, on by default) ----
// The HTTP server API for backends.
#[cfg(feature = "server")]
pub mod api;
// The cluster on NATS JetStream.
#[cfg(feature = "server")]
pub mod cluster;
// Typed configuration: defaults < file < environment < flags.
#[cfg(feature = "server")]
pub mod config;
// The bodies of the fuzz targets in fuzz/ and of their stable tests.
#[cfg(all(feature = "server", any(test, feature = "fuzzing")))]
#[doc(hidden)]
pub mod fuzz_harness;
// Sessions: handshake, the control stream state machine, requests, push queues.
#[cfg(feature = "server")]
pub mod gateway;
// The HTTP side port: health, readiness, metrics, web files, the server API.
#[cfg(feature = "server")]
pub mod http;
// Fan-out of topics to sessions, behind a broker to other nodes.
#[cfg(feature = "server")]
pub mod hub;
// Assembles and stops a node.
#[cfg(feature = "server")]
pub mod server;
// Domain services: chat, notifications, presence, collaboration, analytics.
#[cfg(feature = "server")]
pub mod services;
// The redb database, group commit, caches.
#[cfg(feature = "server")]
pub mod store;
// Server certificates: loading, generation, rotation, pins.
#[cfg(feature = "server")]
pub mod tls;

#[cfg(feature = "server")]
pub use config::Config;
#[cfg(feature = "server")]
pub use server::{RunningServer, start};
