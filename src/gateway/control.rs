//! The control stream as a state machine, with no I/O (in the manner of
//! quinn-proto): bytes in, [`Action`]s out. The gateway's I/O loop feeds it what it
//! reads, carries out what it asks, and tells it when a request has been answered.
//!
//! It owns the rules of the control stream: the first frame is a `Hello`; after it,
//! requests carry ids that are non-zero and unique while in flight; at most
//! `max_inflight` requests run at once; a frame that is too large or does not decode
//! is answered with a typed error and the stream goes on, while a broken length
//! prefix ends the session (the stream cannot be resynchronised).

use std::collections::HashSet;
use std::time::Duration;

use crate::auth::{AuthError, Claims};
use crate::protocol::v1::{self, ClientFrame, ServerFrame, client_frame, response, server_frame};
use crate::protocol::{CloseCode, ErrorCode, FrameDecoder, FrameError, PROTOCOL_VERSION};

/// What the I/O loop must do next.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Run this request; answer it with [`Control::completed`] and its response.
    Dispatch(v1::Request),
    /// Write this frame on the control stream.
    Send(ServerFrame),
    /// End the session with this code.
    Close(CloseCode, String),
}

/// What the first frame says.
#[derive(Debug, Clone, PartialEq)]
pub enum HelloOutcome {
    /// More bytes are needed.
    NeedMore,
    /// A `Hello` of a version this server speaks: authenticate its token next.
    Hello(v1::Hello),
    /// Refuse the session with this code.
    Refuse(CloseCode, String),
}

/// Decodes the first frame of the control stream, which must be a `Hello`.
pub fn read_hello(decoder: &mut FrameDecoder) -> HelloOutcome {
    let first = match decoder.decode::<ClientFrame>() {
        Ok(Some(f)) => f,
        Ok(None) => return HelloOutcome::NeedMore,
        Err(e) => {
            return HelloOutcome::Refuse(CloseCode::ProtocolError, format!("first frame: {e}"));
        }
    };
    let Some(client_frame::Kind::Hello(hello)) = first.kind else {
        return HelloOutcome::Refuse(
            CloseCode::ProtocolError,
            "the first frame must be Hello".into(),
        );
    };
    if hello.protocol_version > PROTOCOL_VERSION {
        return HelloOutcome::Refuse(
            CloseCode::UnsupportedVersion,
            format!("this server speaks protocol version {PROTOCOL_VERSION}"),
        );
    }
    HelloOutcome::Hello(hello)
}

/// The control stream of an open session.
#[derive(Debug)]
pub struct Control {
    decoder: FrameDecoder,
    inflight: HashSet<u64>,
    max_inflight: usize,
    /// Set once the session is to end: nothing more is decoded.
    ended: bool,
}

impl Control {
    /// A control stream whose decoder holds what followed the `Hello`.
    pub fn new(decoder: FrameDecoder, max_inflight: usize) -> Self {
        Self {
            decoder,
            inflight: HashSet::new(),
            max_inflight,
            ended: false,
        }
    }

    /// Bytes read from the stream.
    pub fn received(&mut self, bytes: &[u8]) {
        self.decoder.extend(bytes);
    }

    /// The client finished its side of the stream: the session ends normally.
    pub fn finished(&mut self) -> Action {
        self.ended = true;
        Action::Close(CloseCode::Normal, "control stream finished".into())
    }

    /// Requests dispatched and not yet completed.
    pub fn inflight(&self) -> usize {
        self.inflight.len()
    }

    /// Request `id` was answered; returns the frame to send (its response).
    pub fn completed(&mut self, id: u64, reply: ServerFrame) -> Action {
        self.inflight.remove(&id);
        Action::Send(reply)
    }

    /// The next thing to do about the bytes received so far; `None` when more bytes
    /// are needed. `now_ms` stamps pongs.
    pub fn poll_action(&mut self, now_ms: u64) -> Option<Action> {
        if self.ended {
            return None;
        }
        let incoming = match self.decoder.decode::<ClientFrame>() {
            Ok(Some(f)) => f,
            Ok(None) => return None,
            Err(e) if e.is_fatal() => {
                self.ended = true;
                return Some(Action::Close(CloseCode::ProtocolError, e.to_string()));
            }
            Err(e) => {
                let code = match e {
                    FrameError::TooLarge { .. } => ErrorCode::FrameTooLarge,
                    _ => ErrorCode::FrameMalformed,
                };
                return Some(Action::Send(frame(server_frame::Kind::Error(
                    v1::Error::new(code, e.to_string()),
                ))));
            }
        };
        Some(match incoming.kind {
            Some(client_frame::Kind::Request(req)) => {
                if req.id == 0 || self.inflight.contains(&req.id) {
                    Action::Send(error_response(
                        req.id,
                        ErrorCode::BadRequestId,
                        "request id is 0 or already in flight",
                    ))
                } else if self.inflight.len() >= self.max_inflight {
                    Action::Send(error_response(
                        req.id,
                        ErrorCode::TooManyInflight,
                        format!("at most {} requests in flight", self.max_inflight),
                    ))
                } else {
                    self.inflight.insert(req.id);
                    Action::Dispatch(req)
                }
            }
            Some(client_frame::Kind::Ping(p)) => {
                Action::Send(frame(server_frame::Kind::Pong(v1::Pong {
                    nonce: p.nonce,
                    server_time_ms: now_ms,
                })))
            }
            Some(client_frame::Kind::Hello(_)) => Action::Send(frame(server_frame::Kind::Error(
                v1::Error::new(ErrorCode::UnexpectedFrame, "the session has already begun"),
            ))),
            None => Action::Send(frame(server_frame::Kind::Error(v1::Error::new(
                ErrorCode::UnexpectedFrame,
                "empty or unknown frame",
            )))),
        })
    }
}

/// The token a session runs on: when it expires, and whether a new one may
/// replace it. The gateway's loop sleeps until [`remaining`](Self::remaining) is
/// zero, then closes the session with `TOKEN_EXPIRED`.
#[derive(Debug, Clone)]
pub struct SessionToken {
    claims: Claims,
}

impl SessionToken {
    /// The token accepted in the session's `Hello`.
    pub fn new(claims: Claims) -> Self {
        Self { claims }
    }

    /// The current token's claims.
    pub fn claims(&self) -> &Claims {
        &self.claims
    }

    /// When the current token expires, in milliseconds since the Unix epoch.
    pub fn expires_at_ms(&self) -> u64 {
        self.claims.exp.saturating_mul(1000)
    }

    /// How long the session may still run at `now_ms` (zero once expired).
    pub fn remaining(&self, now_ms: u64) -> Duration {
        Duration::from_millis(self.expires_at_ms().saturating_sub(now_ms))
    }

    /// Replaces the token with `offered` (as verified) if it names the same user
    /// with the same roles and expires later; returns the new expiry in
    /// milliseconds. A refusal leaves the current token in force.
    pub fn refresh(&mut self, offered: Result<Claims, AuthError>) -> Result<u64, v1::Error> {
        let new = match offered {
            Ok(c) => c,
            Err(AuthError::Missing) => {
                return Err(v1::Error::new(ErrorCode::BadRequest, "no token"));
            }
            Err(e) => return Err(v1::Error::new(ErrorCode::PermissionDenied, e.to_string())),
        };
        if new.sub != self.claims.sub {
            return Err(v1::Error::new(
                ErrorCode::PermissionDenied,
                "the new token is for another user",
            ));
        }
        if new.roles != self.claims.roles {
            return Err(v1::Error::new(
                ErrorCode::PermissionDenied,
                "the new token has other roles: reconnect with it",
            ));
        }
        if new.exp <= self.claims.exp {
            return Err(v1::Error::new(
                ErrorCode::BadRequest,
                "the new token does not expire later than the current one",
            ));
        }
        self.claims = new;
        Ok(self.expires_at_ms())
    }
}

/// A server frame of `kind`.
pub fn frame(kind: server_frame::Kind) -> ServerFrame {
    ServerFrame { kind: Some(kind) }
}

/// The error response to request `id`.
pub fn error_response(id: u64, code: ErrorCode, message: impl Into<String>) -> ServerFrame {
    frame(server_frame::Kind::Response(v1::Response {
        id,
        body: Some(response::Body::Error(v1::Error::new(code, message))),
    }))
}

/// The code of an error frame or error response, if `frame` is one.
pub fn error_code(frame: &ServerFrame) -> Option<ErrorCode> {
    match &frame.kind {
        Some(server_frame::Kind::Error(e))
        | Some(server_frame::Kind::Response(v1::Response {
            body: Some(response::Body::Error(e)),
            ..
        })) => e.error_code(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::encode_frame;
    use crate::protocol::v1::request;
    use bytes::BytesMut;

    fn bytes_of(frames: &[ClientFrame]) -> Vec<u8> {
        let mut buf = BytesMut::new();
        for f in frames {
            encode_frame(f, &mut buf);
        }
        buf.to_vec()
    }

    fn echo(id: u64) -> ClientFrame {
        ClientFrame {
            kind: Some(client_frame::Kind::Request(v1::Request {
                id,
                body: Some(request::Body::Echo(v1::EchoRequest {
                    payload: bytes::Bytes::from_static(&[1]),
                    push: false,
                })),
            })),
        }
    }

    fn hello(version: u32) -> ClientFrame {
        ClientFrame {
            kind: Some(client_frame::Kind::Hello(v1::Hello {
                token: "t".into(),
                protocol_version: version,
                ..Default::default()
            })),
        }
    }

    fn drain(c: &mut Control) -> Vec<Action> {
        std::iter::from_fn(|| c.poll_action(7)).collect()
    }

    #[test]
    fn a_refresh_needs_the_same_user_and_roles_and_a_later_expiry() {
        let claims = |sub: &str, exp: u64, roles: &[&str]| Claims {
            sub: sub.into(),
            exp,
            roles: roles.iter().map(|r| (*r).to_owned()).collect(),
            ..Claims::default()
        };
        let mut t = SessionToken::new(claims("ann", 100, &["metrics"]));
        assert_eq!(t.expires_at_ms(), 100_000);
        assert_eq!(t.remaining(40_000), Duration::from_secs(60));
        assert_eq!(t.remaining(200_000), Duration::ZERO);
        let refused = |t: &mut SessionToken, offered| t.refresh(offered).unwrap_err().error_code();
        assert_eq!(
            refused(&mut t, Ok(claims("bob", 200, &["metrics"]))),
            Some(ErrorCode::PermissionDenied)
        );
        assert_eq!(
            refused(&mut t, Ok(claims("ann", 200, &[]))),
            Some(ErrorCode::PermissionDenied)
        );
        assert_eq!(
            refused(&mut t, Ok(claims("ann", 100, &["metrics"]))),
            Some(ErrorCode::BadRequest)
        );
        assert_eq!(
            refused(&mut t, Err(AuthError::Invalid("forged".into()))),
            Some(ErrorCode::PermissionDenied)
        );
        assert_eq!(
            refused(&mut t, Err(AuthError::Missing)),
            Some(ErrorCode::BadRequest)
        );
        assert_eq!(t.expires_at_ms(), 100_000, "refusals change nothing");
        assert_eq!(t.refresh(Ok(claims("ann", 160, &["metrics"]))), Ok(160_000));
        assert_eq!(t.remaining(100_000), Duration::from_secs(60));
    }

    #[test]
    fn hello_first_in_any_chunking() {
        let bytes = bytes_of(&[hello(PROTOCOL_VERSION), echo(1)]);
        for split in 0..bytes.len() {
            let mut d = FrameDecoder::new(1024);
            d.extend(&bytes[..split]);
            let mut outcome = read_hello(&mut d);
            if outcome == HelloOutcome::NeedMore {
                d.extend(&bytes[split..]);
                outcome = read_hello(&mut d);
            } else {
                d.extend(&bytes[split..]);
            }
            assert!(matches!(outcome, HelloOutcome::Hello(_)), "split {split}");
            // What followed the Hello stays in the decoder for the control stream.
            let mut c = Control::new(d, 4);
            assert!(matches!(drain(&mut c)[..], [Action::Dispatch(_)]));
        }
    }

    #[test]
    fn a_session_must_begin_with_a_known_hello() {
        let mut d = FrameDecoder::new(1024);
        d.extend(&bytes_of(&[echo(1)]));
        assert!(matches!(
            read_hello(&mut d),
            HelloOutcome::Refuse(CloseCode::ProtocolError, _)
        ));
        let mut d = FrameDecoder::new(1024);
        d.extend(&bytes_of(&[hello(PROTOCOL_VERSION + 1)]));
        assert!(matches!(
            read_hello(&mut d),
            HelloOutcome::Refuse(CloseCode::UnsupportedVersion, _)
        ));
        let mut d = FrameDecoder::new(1024);
        d.extend(&[0xff; 11]);
        assert!(matches!(
            read_hello(&mut d),
            HelloOutcome::Refuse(CloseCode::ProtocolError, _)
        ));
    }

    #[test]
    fn pipelined_requests_are_dispatched_in_order_up_to_the_limit() {
        let mut c = Control::new(FrameDecoder::new(1024), 2);
        c.received(&bytes_of(&[echo(1), echo(2), echo(3)]));
        let actions = drain(&mut c);
        assert!(matches!(&actions[0], Action::Dispatch(r) if r.id == 1));
        assert!(matches!(&actions[1], Action::Dispatch(r) if r.id == 2));
        assert!(
            matches!(&actions[2], Action::Send(f) if error_code(f) == Some(ErrorCode::TooManyInflight))
        );
        assert_eq!(c.inflight(), 2);
        // Completing one makes room; its id may then be used again.
        let reply = frame(server_frame::Kind::Response(v1::Response {
            id: 1,
            body: None,
        }));
        assert_eq!(c.completed(1, reply.clone()), Action::Send(reply));
        c.received(&bytes_of(&[echo(1)]));
        assert!(matches!(&drain(&mut c)[..], [Action::Dispatch(r)] if r.id == 1));
    }

    #[test]
    fn request_ids_are_non_zero_and_unique_in_flight() {
        let mut c = Control::new(FrameDecoder::new(1024), 8);
        c.received(&bytes_of(&[echo(0), echo(5), echo(5)]));
        let actions = drain(&mut c);
        assert!(
            matches!(&actions[0], Action::Send(f) if error_code(f) == Some(ErrorCode::BadRequestId))
        );
        assert!(matches!(&actions[1], Action::Dispatch(_)));
        assert!(
            matches!(&actions[2], Action::Send(f) if error_code(f) == Some(ErrorCode::BadRequestId))
        );
    }

    #[test]
    fn frame_errors_are_answered_and_a_broken_prefix_ends_the_session() {
        let mut c = Control::new(FrameDecoder::new(16), 8);
        // Too large (skipped), malformed (consumed), a second Hello, a ping.
        let mut bytes = vec![100];
        bytes.extend([0u8; 100]);
        bytes.extend([2, 0xff, 0xff]);
        bytes.extend(bytes_of(&[hello(PROTOCOL_VERSION)]));
        bytes.extend(bytes_of(&[ClientFrame {
            kind: Some(client_frame::Kind::Ping(v1::Ping { nonce: 9 })),
        }]));
        c.received(&bytes);
        let actions = drain(&mut c);
        let codes: Vec<_> = actions
            .iter()
            .map(|a| match a {
                Action::Send(f) => error_code(f),
                _ => None,
            })
            .collect();
        assert_eq!(
            codes,
            [
                Some(ErrorCode::FrameTooLarge),
                Some(ErrorCode::FrameMalformed),
                Some(ErrorCode::UnexpectedFrame),
                None
            ]
        );
        assert!(matches!(
            &actions[3],
            Action::Send(ServerFrame { kind: Some(server_frame::Kind::Pong(p)) })
                if p.nonce == 9 && p.server_time_ms == 7
        ));
        c.received(&[0xff; 10]);
        assert!(matches!(
            drain(&mut c)[..],
            [Action::Close(CloseCode::ProtocolError, _)]
        ));
        c.received(&bytes_of(&[echo(1)]));
        assert!(drain(&mut c).is_empty(), "nothing after the end");
    }
}
