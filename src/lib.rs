//! Tutti: a real-time server. One QUIC connection per client carries chat,
//! notifications, presence, collaborative editing and live analytics, framed as
//! protobuf, over WebTransport (browsers) or raw QUIC (native programs).
//!
//! Dependencies point one way: `transport` -> `gateway` -> services -> `store`.
//! `protocol` depends on nothing of ours and does no I/O.

pub mod api;
pub mod auth;
pub mod client;
pub mod clock;
pub mod config;
pub mod gateway;
pub mod http;
pub mod hub;
pub mod metrics;
pub mod ot;
pub mod protocol;
pub mod server;
pub mod services;
pub mod store;
pub mod tls;
pub mod transport;
pub mod util;

pub use config::Config;
pub use server::{RunningServer, start};
