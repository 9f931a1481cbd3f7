//! Boots the real server on ephemeral ports with a temporary data directory, and
//! connects native clients to it over either transport.
#![allow(dead_code, unreachable_pub)]

pub mod typing;

use std::time::Duration;

use tutti::client::{Client, ClientConfig, Trust};
use tutti::config::Config;
use tutti::protocol::v1::{self, request, response};
use tutti::transport::TransportKind;
use tutti::{RunningServer, start};

/// Every end-to-end case runs over both.
pub const TRANSPORTS: [TransportKind; 2] = [TransportKind::Quic, TransportKind::WebTransport];

/// A bound on any single test, so a hang fails fast.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(60);

/// A bound on waiting for one event (a push, a session's end).
pub const EVENT_WAIT: Duration = Duration::from_secs(10);

/// A server for one test.
pub struct TestServer {
    pub server: Option<RunningServer>,
    pub dir: tempfile::TempDir,
}

/// The configuration tests start from: ephemeral ports, temporary directories,
/// development mode (the generated secret; tests mint tokens through `auth()`).
pub fn test_config(dir: &std::path::Path) -> Config {
    let mut c = Config {
        dev: true,
        listen: "127.0.0.1:0".parse().unwrap(),
        http: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.join("data"),
        web_dir: dir.join("web"),
        ..Config::default()
    };
    c.tls.cert_dir = dir.join("certs");
    // Tests about other things put users into rooms directly; the tests of consent
    // (tests/chat.rs, tests/presence.rs, tests/authz.rs) set the default back.
    c.rooms.join_policy = tutti::services::chat::JoinPolicy::Open;
    c
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut config = test_config(dir.path());
        tweak(&mut config);
        let server = start(config).await.expect("server starts");
        Self {
            server: Some(server),
            dir,
        }
    }

    /// A server that makes no writes of its own while a test lasts (the analytics
    /// flush and retention runs are an hour apart), so that a test holding the
    /// writer sees only the writes of its own requests.
    pub async fn start_without_background_writes() -> Self {
        Self::start_with(|c| {
            c.analytics.flush_interval = Duration::from_secs(3600);
            c.retention.interval = Duration::from_secs(3600);
        })
        .await
    }

    /// A server whose services read `clock` (a manual one, in tests that cross
    /// time boundaries without sleeping).
    pub async fn start_with_clock(
        clock: tutti::clock::Clock,
        tweak: impl FnOnce(&mut Config),
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut config = test_config(dir.path());
        tweak(&mut config);
        let server = tutti::server::start_with_clock(config, clock)
            .await
            .expect("server starts");
        Self {
            server: Some(server),
            dir,
        }
    }

    pub fn server(&self) -> &RunningServer {
        self.server.as_ref().expect("server is running")
    }

    pub fn token(&self, user: &str) -> String {
        self.server()
            .auth()
            .mint(user, Duration::from_secs(3600), &[])
            .unwrap()
    }

    pub fn client_config(&self, transport: TransportKind, token: &str) -> ClientConfig {
        let mut c = ClientConfig::new(
            self.server().quic_addr(),
            transport,
            Trust::Pinned(vec![self.server().certs().pin()]),
            token,
        );
        c.timeout = Duration::from_secs(10);
        c
    }

    /// Connects `user` with [`connect_subscribed`].
    pub async fn connect(&self, transport: TransportKind, user: &str) -> Client {
        connect_subscribed(self.client_config(transport, &self.token(user)))
            .await
            .expect("client connects")
    }

    /// `GET path` on the HTTP port: (status, body).
    pub async fn http_get(&self, path: &str) -> (u16, String) {
        http(self.server().http_addr(), "GET", path, None).await
    }

    /// `POST path` with a JSON body on the HTTP port: (status, body).
    pub async fn http_post(&self, path: &str, json: &str) -> (u16, String) {
        http(self.server().http_addr(), "POST", path, Some(json)).await
    }

    /// The server API key (the generated development key).
    pub fn api_key(&self) -> String {
        std::fs::read_to_string(self.server().config().data_dir.join("dev-api-key"))
            .unwrap()
            .trim()
            .to_owned()
    }

    /// A server API call with the API key.
    pub async fn api(&self, method: &str, path: &str, json: Option<&str>) -> (u16, String) {
        http_with(
            self.server().http_addr(),
            method,
            path,
            json,
            Some(&self.api_key()),
        )
        .await
    }

    /// Waits until the server holds at most `n` sessions. A session the client
    /// closed, or one the server refused, holds its place (and its user's and
    /// address's) until the server has seen the connection close, a moment
    /// after the client has.
    pub async fn wait_sessions(&self, n: usize) {
        wait_until("the sessions to end", || self.server().sessions() <= n).await;
    }

    /// Waits until the HTTP port has no connection open: the server frees a
    /// connection's place under `limits.http_max_connections` before its count
    /// falls, a moment after the client saw the connection close.
    pub async fn wait_http_closed(&self) {
        let metrics = self.server().metrics();
        wait_until("the HTTP connections to close", || {
            metrics.value("http.connections").unwrap() == 0.0
        })
        .await;
    }

    pub async fn shutdown(&mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown().await.expect("clean shutdown");
        }
    }
}

/// A minimal HTTP/1.1 client (one request per connection), enough for the side port.
pub async fn http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    json: Option<&str>,
) -> (u16, String) {
    http_with(addr, method, path, json, None).await
}

/// [`http`] with an `Authorization: Bearer` header.
pub async fn http_with(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    json: Option<&str>,
    bearer: Option<&str>,
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let body = json.unwrap_or("");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        bearer
            .map(|k| format!("Authorization: Bearer {k}\r\n"))
            .unwrap_or_default(),
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text[9..12].parse().unwrap();
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(rest)
    } else {
        rest.to_owned()
    };
    (status, body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
    out
}

/// Runs `$body` (an async fn taking a TransportKind) once per transport, each as its
/// own test, bounded by [`TEST_TIMEOUT`].
#[macro_export]
macro_rules! both_transports {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn quic() {
                tokio::time::timeout($crate::support::TEST_TIMEOUT, super::$name(tutti::transport::TransportKind::Quic))
                    .await
                    .expect("test timed out");
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn webtransport() {
                tokio::time::timeout($crate::support::TEST_TIMEOUT, super::$name(tutti::transport::TransportKind::WebTransport))
                    .await
                    .expect("test timed out");
            }
        }
    )*};
}

/// Every message of a room, oldest first (paging back through history).
pub async fn all_messages(c: &Client, room: &str) -> Vec<v1::ChatMessage> {
    let mut out = Vec::new();
    let mut before = 0;
    loop {
        let page = match c
            .request(request::Body::ChatHistory(v1::ChatHistoryRequest {
                room_id: room.into(),
                before_offset: before,
                limit: 100,
            }))
            .await
            .unwrap()
        {
            response::Body::ChatHistory(r) => r,
            other => panic!("{other:?}"),
        };
        let Some(first) = page.messages.first() else {
            break;
        };
        before = first.offset;
        let more = page.more;
        out.splice(0..0, page.messages);
        if !more {
            break;
        }
    }
    out
}

/// Connects, and waits for a first answer. The server subscribes a session to its
/// streams after the Welcome and reads its requests only once that is done, so
/// from the answer on the client misses nothing published (without the round
/// trip, an event published in between would reach a client that resumes nothing
/// only through history; docs/PROTOCOL.md, "Handshake").
pub async fn connect_subscribed(
    config: ClientConfig,
) -> Result<Client, tutti::client::ClientError> {
    let c = Client::connect(config).await?;
    c.echo(vec![], false).await?;
    Ok(c)
}

/// Waits (at most [`EVENT_WAIT`]) until `done` holds, for a state of the server
/// that no event announces; panics with `what` if it does not.
pub async fn wait_until(what: &str, done: impl Fn() -> bool) {
    tokio::time::timeout(EVENT_WAIT, async {
        while !done() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}
