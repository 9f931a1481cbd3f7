//! Transports behind one [`Session`] type: raw QUIC (quinn, ALPN `tutti/1`),
//! WebTransport over HTTP/3 (wtransport, ALPN `h3`), and an in-memory pair for tests
//! ([`memory`]). The gateway and the client see only [`Session`] and boxed byte
//! streams, never a quinn or wtransport type.

#[cfg(feature = "server")]
pub mod endpoint;
pub mod memory;
mod session;

#[cfg(feature = "server")]
pub use endpoint::{Accepted, CongestionControl, ServerEndpoint};
pub use session::{AckCounts, CloseInfo, RecvStream, SendStream, Session, SessionError, Transport};

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

/// A transport name that is neither `quic` nor `webtransport`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown transport {0:?} (quic or webtransport)")]
pub struct UnknownTransport(pub String);

impl std::str::FromStr for TransportKind {
    type Err = UnknownTransport;
    fn from_str(s: &str) -> Result<Self, UnknownTransport> {
        match s {
            "quic" => Ok(TransportKind::Quic),
            "webtransport" | "wt" => Ok(TransportKind::WebTransport),
            _ => Err(UnknownTransport(s.to_owned())),
        }
    }
}

/// Requested size of a UDP socket's kernel receive and send buffers. Every client
/// shares the server's one socket, and Linux's default receive buffer (208 KiB)
/// overflows under bursts of thousands of packets: dropped datagrams then cost a
/// loss-recovery round (`RcvbufErrors` in `/proc/net/snmp`). Linux caps the size at
/// `net.core.rmem_max` / `wmem_max`; see docs/OPERATIONS.md.
const SOCKET_BUFFER: usize = 4 << 20;

/// Binds a UDP socket on `addr` with kernel buffers of up to [`SOCKET_BUFFER`].
pub(crate) fn udp_socket(addr: std::net::SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    // Best effort: the kernel clamps to its maximum instead of failing.
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
    socket.bind(&addr.into())?;
    Ok(socket.into())
}
