//! One session type over both transports.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};

use super::TransportKind;

/// The sending half of a stream.
pub type SendStream = Box<dyn AsyncWrite + Send + Unpin>;
/// The receiving half of a stream.
pub type RecvStream = Box<dyn AsyncRead + Send + Unpin>;

/// A session over raw QUIC or WebTransport.
#[derive(Clone, Debug)]
pub enum Session {
    /// Raw QUIC.
    Quic(quinn::Connection),
    /// WebTransport over HTTP/3.
    WebTransport(wtransport::Connection),
}

/// How a session ended, as seen from this side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseInfo {
    /// The application close code, when the peer (or this side) closed with one.
    pub code: Option<u32>,
    /// The close reason or a description of the failure.
    pub reason: String,
}

/// A session-level failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// The session is closed.
    #[error("session closed: {0:?}")]
    Closed(CloseInfo),
    /// A datagram could not be sent (too large, or datagrams unsupported).
    #[error("datagram not sent: {0}")]
    Datagram(String),
}

fn quinn_close(e: quinn::ConnectionError) -> CloseInfo {
    match e {
        quinn::ConnectionError::ApplicationClosed(c) => CloseInfo {
            code: u32::try_from(c.error_code.into_inner()).ok(),
            reason: String::from_utf8_lossy(&c.reason).into_owned(),
        },
        other => CloseInfo {
            code: None,
            reason: other.to_string(),
        },
    }
}

fn wt_close(e: wtransport::error::ConnectionError) -> CloseInfo {
    match e {
        wtransport::error::ConnectionError::ApplicationClosed(c) => CloseInfo {
            code: u32::try_from(c.code().into_inner()).ok(),
            reason: String::from_utf8_lossy(c.reason()).into_owned(),
        },
        other => CloseInfo {
            code: None,
            reason: other.to_string(),
        },
    }
}

impl Session {
    /// Which transport carries this session.
    pub fn kind(&self) -> TransportKind {
        match self {
            Session::Quic(_) => TransportKind::Quic,
            Session::WebTransport(_) => TransportKind::WebTransport,
        }
    }

    /// Waits for the peer to open a bidirectional stream.
    pub async fn accept_bi(&self) -> Result<(SendStream, RecvStream), SessionError> {
        match self {
            Session::Quic(c) => {
                let (s, r) = c
                    .accept_bi()
                    .await
                    .map_err(|e| SessionError::Closed(quinn_close(e)))?;
                Ok((Box::new(s), Box::new(r)))
            }
            Session::WebTransport(c) => {
                let (s, r) = c
                    .accept_bi()
                    .await
                    .map_err(|e| SessionError::Closed(wt_close(e)))?;
                Ok((Box::new(s), Box::new(r)))
            }
        }
    }

    /// Opens a bidirectional stream.
    pub async fn open_bi(&self) -> Result<(SendStream, RecvStream), SessionError> {
        match self {
            Session::Quic(c) => {
                let (s, r) = c
                    .open_bi()
                    .await
                    .map_err(|e| SessionError::Closed(quinn_close(e)))?;
                Ok((Box::new(s), Box::new(r)))
            }
            Session::WebTransport(c) => {
                let opening = c
                    .open_bi()
                    .await
                    .map_err(|e| SessionError::Closed(wt_close(e)))?;
                let (s, r) = opening.await.map_err(|e| {
                    SessionError::Closed(CloseInfo {
                        code: None,
                        reason: e.to_string(),
                    })
                })?;
                Ok((Box::new(s), Box::new(r)))
            }
        }
    }

    /// Opens a unidirectional stream.
    pub async fn open_uni(&self) -> Result<SendStream, SessionError> {
        match self {
            Session::Quic(c) => {
                let s = c
                    .open_uni()
                    .await
                    .map_err(|e| SessionError::Closed(quinn_close(e)))?;
                Ok(Box::new(s))
            }
            Session::WebTransport(c) => {
                let opening = c
                    .open_uni()
                    .await
                    .map_err(|e| SessionError::Closed(wt_close(e)))?;
                let s = opening.await.map_err(|e| {
                    SessionError::Closed(CloseInfo {
                        code: None,
                        reason: e.to_string(),
                    })
                })?;
                Ok(Box::new(s))
            }
        }
    }

    /// Waits for the peer to open a unidirectional stream.
    pub async fn accept_uni(&self) -> Result<RecvStream, SessionError> {
        match self {
            Session::Quic(c) => {
                let r = c
                    .accept_uni()
                    .await
                    .map_err(|e| SessionError::Closed(quinn_close(e)))?;
                Ok(Box::new(r))
            }
            Session::WebTransport(c) => {
                let r = c
                    .accept_uni()
                    .await
                    .map_err(|e| SessionError::Closed(wt_close(e)))?;
                Ok(Box::new(r))
            }
        }
    }

    /// Sends a datagram (unreliable, unordered).
    pub fn send_datagram(&self, data: Bytes) -> Result<(), SessionError> {
        match self {
            Session::Quic(c) => c
                .send_datagram(data)
                .map_err(|e| SessionError::Datagram(e.to_string())),
            Session::WebTransport(c) => c
                .send_datagram(data)
                .map_err(|e| SessionError::Datagram(e.to_string())),
        }
    }

    /// Waits for the next datagram.
    pub async fn read_datagram(&self) -> Result<Bytes, SessionError> {
        match self {
            Session::Quic(c) => c
                .read_datagram()
                .await
                .map_err(|e| SessionError::Closed(quinn_close(e))),
            Session::WebTransport(c) => c
                .receive_datagram()
                .await
                .map(|d| d.payload())
                .map_err(|e| SessionError::Closed(wt_close(e))),
        }
    }

    /// The largest datagram payload the path allows now, if datagrams are supported.
    pub fn max_datagram_size(&self) -> Option<usize> {
        match self {
            Session::Quic(c) => c.max_datagram_size(),
            Session::WebTransport(c) => c.max_datagram_size(),
        }
    }

    /// Closes the session with an application code. Unsent data is dropped.
    pub fn close(&self, code: u32, reason: &str) {
        let code = quinn::VarInt::from_u32(code);
        match self {
            Session::Quic(c) => c.close(code, reason.as_bytes()),
            Session::WebTransport(c) => c.close(
                wtransport::VarInt::from_u32(code.into_inner() as u32),
                reason.as_bytes(),
            ),
        }
    }

    /// Waits until the session is closed, by either side or by a timeout.
    pub async fn closed(&self) -> CloseInfo {
        match self {
            Session::Quic(c) => quinn_close(c.closed().await),
            Session::WebTransport(c) => wt_close(c.closed().await),
        }
    }

    /// The peer's UDP address.
    pub fn remote_address(&self) -> SocketAddr {
        match self {
            Session::Quic(c) => c.remote_address(),
            Session::WebTransport(c) => c.remote_address(),
        }
    }

    /// UDP payload bytes (received, sent) over the connection so far.
    pub fn transferred(&self) -> (u64, u64) {
        let stats = match self {
            Session::Quic(c) => c.stats(),
            Session::WebTransport(c) => c.quic_connection().stats(),
        };
        (stats.udp_rx.bytes, stats.udp_tx.bytes)
    }

    /// The current round-trip time estimate.
    pub fn rtt(&self) -> Duration {
        match self {
            Session::Quic(c) => c.rtt(),
            Session::WebTransport(c) => c.rtt(),
        }
    }
}
