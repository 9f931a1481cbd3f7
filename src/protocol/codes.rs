//! Stable numeric codes. The numbers are a contract with every client ever shipped:
//! never renumber a variant; add new ones with new numbers. `docs/PROTOCOL.md` lists
//! them and the tests below pin every number.

macro_rules! codes {
    (
        $(#[$meta:meta])*
        pub enum $name:ident { $( $(#[$vmeta:meta])* $variant:ident = $num:literal => $text:literal, )* }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        #[repr(u32)]
        pub enum $name { $( $(#[$vmeta])* $variant = $num, )* }

        impl $name {
            /// Every code, in numeric order.
            pub const ALL: &'static [$name] = &[$($name::$variant,)*];

            /// The code's stable name, as written on the wire and in the docs.
            pub fn name(self) -> &'static str {
                match self { $( $name::$variant => $text, )* }
            }

            /// The code with this number, if this build knows it.
            pub fn from_u32(n: u32) -> Option<Self> {
                match n { $( $num => Some($name::$variant), )* _ => None }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "{} ({})", self.name(), *self as u32)
            }
        }
    };
}

codes! {
    /// Errors answered to a request (in `Response.error`) or to a frame (in
    /// `ServerFrame.error`). The session stays open.
    pub enum ErrorCode {
        /// The server failed; the request may be retried.
        Internal = 100 => "INTERNAL",
        /// A field is missing or out of range.
        BadRequest = 101 => "BAD_REQUEST",
        /// The request's body is not one this server knows.
        UnknownRequest = 102 => "UNKNOWN_REQUEST",
        /// The user may not do this.
        PermissionDenied = 103 => "PERMISSION_DENIED",
        /// The thing does not exist (or the user may not know it exists).
        NotFound = 104 => "NOT_FOUND",
        /// A configured limit would be exceeded; nothing was changed.
        LimitExceeded = 105 => "LIMIT_EXCEEDED",
        /// Too many requests of this kind; retry later.
        RateLimited = 106 => "RATE_LIMITED",
        /// The request conflicts with the current state.
        Conflict = 107 => "CONFLICT",
        /// An operation's base revision is older than the history the server keeps;
        /// the error carries the current snapshot.
        ResyncRequired = 108 => "RESYNC_REQUIRED",
        /// An operation does not fit the document (its base length differs).
        InvalidOperation = 109 => "INVALID_OPERATION",
        /// An analytics event type that this server is not configured to accept.
        UnknownEventType = 110 => "UNKNOWN_EVENT_TYPE",
        /// Storage failed (a full or failing disk); nothing was changed. Retry the
        /// same request (with the same idempotency key) with backoff.
        Unavailable = 111 => "UNAVAILABLE",
        /// The answer would be larger than `Limits.max_frame_size`, so it is not
        /// sent; ask for less (a smaller page) or raise the limit.
        ResponseTooLarge = 112 => "RESPONSE_TOO_LARGE",
        /// A frame was longer than `Limits.max_frame_size`; it was skipped unread.
        FrameTooLarge = 200 => "FRAME_TOO_LARGE",
        /// A frame did not decode as the expected protobuf message; it was skipped.
        FrameMalformed = 201 => "FRAME_MALFORMED",
        /// A frame that is valid but not allowed here (a second Hello, say).
        UnexpectedFrame = 202 => "UNEXPECTED_FRAME",
        /// More requests in flight than `Limits.max_inflight_requests`.
        TooManyInflight = 203 => "TOO_MANY_INFLIGHT",
        /// A request id of 0, or one already in flight.
        BadRequestId = 204 => "BAD_REQUEST_ID",
    }
}

codes! {
    /// Why the server closed a session. Sent in a `Close` frame on the control stream
    /// and as the QUIC application close code. 3000-3499: the client should reconnect
    /// (with backoff); 3500-3999: it should not reconnect without a change (a new
    /// token, a fixed client).
    pub enum CloseCode {
        /// The client closed the session; nothing went wrong.
        Normal = 0 => "NORMAL",
        /// The server is shutting down or draining; reconnect, possibly elsewhere.
        GoingAway = 3000 => "GOING_AWAY",
        /// The client did not read its pushes fast enough; reconnect and resume.
        SlowConsumer = 3001 => "SLOW_CONSUMER",
        /// The server failed; reconnect with backoff.
        ServerError = 3002 => "SERVER_ERROR",
        /// No `Hello` arrived within the handshake timeout.
        HandshakeTimeout = 3003 => "HANDSHAKE_TIMEOUT",
        /// The server has too many sessions; reconnect later.
        Overloaded = 3004 => "OVERLOADED",
        /// The user, or the client's address, has as many sessions open as the
        /// server allows; close one or reconnect later, with backoff.
        TooManyConnections = 3005 => "TOO_MANY_CONNECTIONS",
        /// Storage failed while the session was being set up (its catch-up could
        /// not be read); reconnect with backoff and resume.
        StorageUnavailable = 3006 => "STORAGE_UNAVAILABLE",
        /// This node has more than its share of the cluster's sessions: connect to
        /// the first of `Close.nodes` instead (once; no backoff needed).
        Redirect = 3007 => "REDIRECT",
        /// `Hello` carried no token.
        TokenMissing = 3500 => "TOKEN_MISSING",
        /// The token is malformed, forged or lacks a required claim.
        Unauthorized = 3501 => "UNAUTHORIZED",
        /// The token has expired: get a new one, then reconnect.
        TokenExpired = 3502 => "TOKEN_EXPIRED",
        /// The client broke the protocol (no `Hello` first, an unreadable length prefix).
        ProtocolError = 3503 => "PROTOCOL_ERROR",
        /// The client speaks a protocol version this server does not.
        UnsupportedVersion = 3504 => "UNSUPPORTED_VERSION",
    }
}

impl CloseCode {
    /// Whether a client should reconnect after this close.
    pub fn should_reconnect(self) -> bool {
        (3000..3500).contains(&(self as u32))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The numbers are a wire contract; a rename or reorder must not move them.
    #[test]
    fn error_codes_are_pinned() {
        let pinned: &[(ErrorCode, u32, &str)] = &[
            (ErrorCode::Internal, 100, "INTERNAL"),
            (ErrorCode::BadRequest, 101, "BAD_REQUEST"),
            (ErrorCode::UnknownRequest, 102, "UNKNOWN_REQUEST"),
            (ErrorCode::PermissionDenied, 103, "PERMISSION_DENIED"),
            (ErrorCode::NotFound, 104, "NOT_FOUND"),
            (ErrorCode::LimitExceeded, 105, "LIMIT_EXCEEDED"),
            (ErrorCode::RateLimited, 106, "RATE_LIMITED"),
            (ErrorCode::Conflict, 107, "CONFLICT"),
            (ErrorCode::ResyncRequired, 108, "RESYNC_REQUIRED"),
            (ErrorCode::InvalidOperation, 109, "INVALID_OPERATION"),
            (ErrorCode::UnknownEventType, 110, "UNKNOWN_EVENT_TYPE"),
            (ErrorCode::Unavailable, 111, "UNAVAILABLE"),
            (ErrorCode::ResponseTooLarge, 112, "RESPONSE_TOO_LARGE"),
            (ErrorCode::FrameTooLarge, 200, "FRAME_TOO_LARGE"),
            (ErrorCode::FrameMalformed, 201, "FRAME_MALFORMED"),
            (ErrorCode::UnexpectedFrame, 202, "UNEXPECTED_FRAME"),
            (ErrorCode::TooManyInflight, 203, "TOO_MANY_INFLIGHT"),
            (ErrorCode::BadRequestId, 204, "BAD_REQUEST_ID"),
        ];
        assert_eq!(
            pinned.len(),
            ErrorCode::ALL.len(),
            "pin every new code here"
        );
        for &(code, num, name) in pinned {
            assert_eq!(code as u32, num);
            assert_eq!(code.name(), name);
            assert_eq!(ErrorCode::from_u32(num), Some(code));
        }
    }

    #[test]
    fn close_codes_are_pinned() {
        let pinned: &[(CloseCode, u32, &str, bool)] = &[
            (CloseCode::Normal, 0, "NORMAL", false),
            (CloseCode::GoingAway, 3000, "GOING_AWAY", true),
            (CloseCode::SlowConsumer, 3001, "SLOW_CONSUMER", true),
            (CloseCode::ServerError, 3002, "SERVER_ERROR", true),
            (CloseCode::HandshakeTimeout, 3003, "HANDSHAKE_TIMEOUT", true),
            (CloseCode::Overloaded, 3004, "OVERLOADED", true),
            (
                CloseCode::TooManyConnections,
                3005,
                "TOO_MANY_CONNECTIONS",
                true,
            ),
            (
                CloseCode::StorageUnavailable,
                3006,
                "STORAGE_UNAVAILABLE",
                true,
            ),
            (CloseCode::Redirect, 3007, "REDIRECT", true),
            (CloseCode::TokenMissing, 3500, "TOKEN_MISSING", false),
            (CloseCode::Unauthorized, 3501, "UNAUTHORIZED", false),
            (CloseCode::TokenExpired, 3502, "TOKEN_EXPIRED", false),
            (CloseCode::ProtocolError, 3503, "PROTOCOL_ERROR", false),
            (
                CloseCode::UnsupportedVersion,
                3504,
                "UNSUPPORTED_VERSION",
                false,
            ),
        ];
        assert_eq!(
            pinned.len(),
            CloseCode::ALL.len(),
            "pin every new code here"
        );
        for &(code, num, name, reconnect) in pinned {
            assert_eq!(code as u32, num);
            assert_eq!(code.name(), name);
            assert_eq!(code.should_reconnect(), reconnect, "{name}");
            assert_eq!(CloseCode::from_u32(num), Some(code));
        }
    }

    #[test]
    fn unknown_numbers_are_none() {
        assert_eq!(ErrorCode::from_u32(99), None);
        assert_eq!(CloseCode::from_u32(4000), None);
    }
}
