//! The wire protocol without I/O: generated protobuf types, the length-prefixed frame
//! codec, and the stable error and close codes.
//!
//! Nothing here touches a socket; the gateway and the client feed it bytes. It
//! depends on nothing of ours but [`crate::ot`], for the wire form of operations.

mod codec;
mod codes;
pub mod ot_wire;

pub use codec::{FrameDecoder, FrameError, decode_frame, encode_frame, encoded_frame};
pub use codes::{CloseCode, ErrorCode};

/// Protobuf messages generated from `proto/tutti/v1`.
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/tutti.v1.rs"));
}

/// The ALPN of raw QUIC sessions.
pub const ALPN_NATIVE: &[u8] = b"tutti/1";
/// The ALPN of HTTP/3, which carries WebTransport sessions.
pub const ALPN_H3: &[u8] = b"h3";
/// The path of WebTransport sessions.
pub const WEBTRANSPORT_PATH: &str = "/tutti";
/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;

impl v1::Error {
    /// Builds a wire error from a code and a human-readable message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code: code as u32,
            name: code.name().to_owned(),
            message: message.into(),
            detail: None,
            retry_after_ms: 0,
        }
    }

    /// The typed code, if this build knows it.
    pub fn error_code(&self) -> Option<ErrorCode> {
        ErrorCode::from_u32(self.code)
    }
}

impl v1::Close {
    /// Builds a close frame from a close code and a human-readable message.
    pub fn new(code: CloseCode, message: impl Into<String>) -> Self {
        Self {
            code: code as u32,
            name: code.name().to_owned(),
            message: message.into(),
            ..Default::default()
        }
    }
}

impl v1::request::Body {
    /// The request type's name, as used in metrics (`chat_send`, ...).
    pub fn name(&self) -> &'static str {
        use v1::request::Body as B;
        match self {
            B::Echo(_) => "echo",
            B::AuthRefresh(_) => "auth_refresh",
            B::RoomCreate(_) => "room_create",
            B::RoomAdd(_) => "room_add",
            B::RoomRemove(_) => "room_remove",
            B::RoomLeave(_) => "room_leave",
            B::RoomList(_) => "room_list",
            B::ChatSend(_) => "chat_send",
            B::ChatHistory(_) => "chat_history",
            B::ChatMarkRead(_) => "chat_mark_read",
            B::RoomInviteList(_) => "room_invite_list",
            B::RoomInviteAccept(_) => "room_invite_accept",
            B::RoomInviteDecline(_) => "room_invite_decline",
            B::NotifyList(_) => "notify_list",
            B::NotifyMarkRead(_) => "notify_mark_read",
            B::NotifyMarkAllRead(_) => "notify_mark_all_read",
            B::PresenceSet(_) => "presence_set",
            B::PresenceGet(_) => "presence_get",
            B::ContactRequest(_) => "contact_request",
            B::ContactAccept(_) => "contact_accept",
            B::ContactRemove(_) => "contact_remove",
            B::ContactList(_) => "contact_list",
            B::DocCreate(_) => "doc_create",
            B::DocShare(_) => "doc_share",
            B::DocOpen(_) => "doc_open",
            B::DocClose(_) => "doc_close",
            B::DocSubmit(_) => "doc_submit",
            B::DocList(_) => "doc_list",
            B::AnalyticsTrack(_) => "analytics_track",
            B::AnalyticsSeries(_) => "analytics_series",
            B::AnalyticsTop(_) => "analytics_top",
            B::AnalyticsDistinctUsers(_) => "analytics_distinct_users",
            B::MetricsSubscribe(_) => "metrics_subscribe",
            B::MetricsUnsubscribe(_) => "metrics_unsubscribe",
        }
    }
}
