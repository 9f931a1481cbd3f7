//! Transports behind one [`Session`] type: raw QUIC (quinn, ALPN `tutti/1`),
//! WebTransport over HTTP/3 (wtransport, ALPN `h3`), and an in-memory pair for tests
//! ([`memory`]). The gateway and the client see only [`Session`] and boxed byte
//! streams, never a quinn or wtransport type.

pub mod endpoint;
pub mod memory;
mod session;

pub(crate) use endpoint::udp_socket;
pub use endpoint::{Accepted, ServerEndpoint};
pub use session::{CloseInfo, RecvStream, SendStream, Session, SessionError, Transport};

/// Which transport carries a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransportKind {
    /// Raw QUIC with ALPN `tutti/1`.
    Quic,
    /// WebTransport over HTTP/3.
    WebTransport,
}

impl TransportKind {
    /// `"quic"` or `"webtransport"`.
    pub fn as_str(self) -> &'static str {
        match self {
            TransportKind::Quic => "quic",
            TransportKind::WebTransport => "webtransport",
        }
    }
}

impl std::fmt::Display for TransportKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for TransportKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "quic" => Ok(TransportKind::Quic),
            "webtransport" | "wt" => Ok(TransportKind::WebTransport),
            _ => Err(format!("unknown transport {s:?} (quic or webtransport)")),
        }
    }
}
