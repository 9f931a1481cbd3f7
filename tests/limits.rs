//! Bounded resources through the real server: what a client can park on streams
//! the server does not read, sessions per user and per address, address
//! validation under a handshake flood, documents open per session, room lists in
//! pages, responses over the frame limit, the HTTP side port's limits and its
//! shutdown with a slowloris connection open, and the memory an idle session costs.

mod support;

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use prost::Message;
use support::{TestServer, http_with};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tutti::client::{Client, ClientError, Trust, connect_transport};
use tutti::ot::TextOperation;
use tutti::protocol::v1::{self, request, response};
use tutti::protocol::{CloseCode, ErrorCode};
use tutti::transport::TransportKind;

fn code_of(e: &ClientError) -> Option<ErrorCode> {
    match e {
        ClientError::Server(e) => ErrorCode::from_u32(e.code),
        _ => None,
    }
}

// ---- QUIC flow control --------------------------------------------------------

/// Writes to `stream` until a write makes no progress for `stall` (flow control),
/// returning the bytes the transport took.
async fn park(mut stream: tutti::transport::SendStream, stall: Duration) -> usize {
    let chunk = vec![0x55u8; 4096];
    let mut parked = 0;
    loop {
        match tokio::time::timeout(stall, stream.write(&chunk)).await {
            Ok(Ok(n)) if n > 0 => parked += n,
            // Blocked on flow control, refused, or reset: nothing more goes in.
            _ => {
                // Kept open (unread on the server) for the rest of the test.
                std::mem::forget(stream);
                return parked;
            }
        }
    }
}

/// A client that opens every stream it can besides the control stream and writes
/// into them (the server reads none of them) parks at most the configured
/// connection window, and no stream more than the stream window; other clients
/// are served meanwhile.
async fn data_parked_on_unread_streams_is_bounded_by_the_window(t: TransportKind) {
    const STREAM_WINDOW: u64 = 32 * 1024;
    const CONNECTION_WINDOW: u64 = 96 * 1024;
    const STALL: Duration = Duration::from_secs(1);
    let s = TestServer::start_with(|c| {
        c.limits.stream_receive_window = STREAM_WINDOW;
        c.limits.connection_receive_window = CONNECTION_WINDOW;
    })
    .await;
    let config = s.client_config(t, &s.token("mallory"));
    let session = connect_transport(&config).await.unwrap();
    // The control stream, with a Hello, as a real client's.
    let (mut control, _control_recv) = session.open_bi().await.unwrap();
    let mut hello = bytes::BytesMut::new();
    tutti::protocol::encode_frame(
        &v1::ClientFrame {
            kind: Some(v1::client_frame::Kind::Hello(v1::Hello {
                token: s.token("mallory"),
                protocol_version: tutti::protocol::PROTOCOL_VERSION,
                ..Default::default()
            })),
        },
        &mut hello,
    );
    control.write_all(&hello).await.unwrap();
    // Every extra stream the server lets the client open; an open that does not
    // complete within the stall is past the stream limit.
    let opens = (0..8)
        .map(|_| {
            let session = session.clone();
            async move {
                let bi = tokio::time::timeout(STALL, session.open_bi()).await;
                let uni = tokio::time::timeout(STALL, session.open_uni()).await;
                let mut out = Vec::new();
                if let Ok(Ok((send, recv))) = bi {
                    std::mem::forget(recv);
                    out.push(send);
                }
                if let Ok(Ok(send)) = uni {
                    out.push(send);
                }
                out
            }
        })
        .collect::<Vec<_>>();
    let streams: Vec<_> = join_all(opens).await.into_iter().flatten().collect();
    assert!(
        streams.len() < 8,
        "{} extra streams opened: the stream limits are not applied",
        streams.len()
    );
    let parked: Vec<usize> = join_all(streams.into_iter().map(|st| park(st, STALL))).await;
    let total: usize = parked.iter().sum();
    eprintln!("{t}: parked {parked:?} = {total} bytes");
    assert!(
        parked.iter().all(|&p| p as u64 <= STREAM_WINDOW),
        "a stream took more than its window: {parked:?}"
    );
    assert!(
        total as u64 <= CONNECTION_WINDOW,
        "{total} bytes parked, over the {CONNECTION_WINDOW}-byte connection window"
    );
    // Someone else is served as usual.
    let bob = s.connect(t, "bob").await;
    assert_eq!(bob.echo(b"hi".to_vec(), false).await.unwrap(), &b"hi"[..]);
    drop(session);
}

both_transports!(data_parked_on_unread_streams_is_bounded_by_the_window);

// ---- connections per user and per address ------------------------------------

async fn sessions_per_user_and_per_address_are_limited(t: TransportKind) {
    let s = TestServer::start_with(|c| {
        c.limits.max_sessions_per_user = 2;
        c.limits.max_connections_per_address = 4;
    })
    .await;
    let _a1 = s.connect(t, "ann").await;
    let _a2 = s.connect(t, "ann").await;
    let err = Client::connect(s.client_config(t, &s.token("ann")))
        .await
        .unwrap_err();
    assert_eq!(
        err.close_code(),
        Some(CloseCode::TooManyConnections),
        "{err:?}"
    );
    assert!(CloseCode::TooManyConnections.should_reconnect());
    // The refused connection counts for its address until the server has seen
    // it close, a moment after the client has.
    s.wait_sessions(2).await;
    // Two more from the same address (any user), then the address is full.
    let _b = s.connect(t, "bob").await;
    let _c = s.connect(t, "cid").await;
    let err = Client::connect(s.client_config(t, &s.token("dan")))
        .await
        .unwrap_err();
    assert_eq!(
        err.close_code(),
        Some(CloseCode::TooManyConnections),
        "{err:?}"
    );
    let metrics = s.http_get("/metrics").await.1;
    assert!(
        metrics.contains("tutti_sessions_closed_total{code=\"TOO_MANY_CONNECTIONS\"} 2"),
        "{metrics}"
    );
}

both_transports!(sessions_per_user_and_per_address_are_limited);

/// With the handshake threshold at 0 every new address is asked to validate
/// itself with a Retry; real clients answer it and connect.
async fn a_handshake_flood_is_answered_with_address_validation(t: TransportKind) {
    let s = TestServer::start_with(|c| c.limits.retry_above_handshakes = 0).await;
    let users: Vec<String> = (0..5).map(|i| format!("u{i}")).collect();
    let clients = join_all(users.iter().map(|u| s.connect(t, u))).await;
    for c in &clients {
        assert_eq!(c.echo(b"x".to_vec(), false).await.unwrap(), &b"x"[..]);
    }
    let retries = s
        .server()
        .metrics()
        .quic_retries
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(retries >= 5, "{retries} retries");
}

both_transports!(a_handshake_flood_is_answered_with_address_validation);

// ---- documents per session ----------------------------------------------------

async fn doc(c: &Client, body: request::Body) -> Result<response::Body, ClientError> {
    c.request(body).await
}

fn open(id: &str) -> request::Body {
    request::Body::DocOpen(v1::DocOpenRequest {
        doc_id: id.into(),
        known_revision: None,
    })
}

/// A session that tries to open 10,000 documents gets the configured number and
/// `LIMIT_EXCEEDED` for every other one; closing one makes room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_opening_ten_thousand_documents_is_limited() {
    const LIMIT: usize = 16;
    tokio::time::timeout(support::TEST_TIMEOUT, async {
        let s = TestServer::start_with(|c| c.collab.max_open_docs = LIMIT).await;
        let c = s.connect(TransportKind::Quic, "ann").await;
        for i in 0..=LIMIT {
            doc(
                &c,
                request::Body::DocCreate(v1::DocCreateRequest {
                    doc_id: format!("d{i}"),
                    text: "hello".into(),
                }),
            )
            .await
            .unwrap();
        }
        for i in 0..LIMIT {
            doc(&c, open(&format!("ann~d{i}"))).await.unwrap();
        }
        // Reopening one already open is fine.
        doc(&c, open("ann~d0")).await.unwrap();
        let mut refused = 0;
        for batch in 0..(10_000 / 50) {
            let answers = join_all((0..50).map(|i| {
                let n: usize = batch * 50 + i;
                let id = if n.is_multiple_of(2) {
                    format!("ann~d{LIMIT}")
                } else {
                    format!("ghost{n}")
                };
                let c = &c;
                async move { doc(c, open(&id)).await }
            }))
            .await;
            for a in answers {
                assert_eq!(code_of(&a.unwrap_err()), Some(ErrorCode::LimitExceeded));
                refused += 1;
            }
        }
        assert_eq!(refused, 10_000);
        doc(
            &c,
            request::Body::DocClose(v1::DocCloseRequest {
                doc_id: "ann~d3".into(),
            }),
        )
        .await
        .unwrap();
        doc(&c, open(&format!("ann~d{LIMIT}"))).await.unwrap();
    })
    .await
    .expect("test timed out");
}

// ---- room lists in pages ------------------------------------------------------

/// 150 rooms of 200 participants each are about half a megabyte of summaries:
/// the list comes in pages, each within the frame limit, every room exactly once.
async fn a_huge_room_list_is_paged(t: TransportKind) {
    const ROOMS: usize = 150;
    // Rooms are made faster than a user may create them.
    let s =
        TestServer::start_with(|c| c.limits.rate = tutti::services::rate::RateConfig::off()).await;
    let c = s.connect(t, "ann").await;
    let participants: Vec<String> = (0..199).map(|i| format!("member-{i:05}")).collect();
    for batch in 0..ROOMS / 25 {
        join_all((0..25).map(|i| {
            let c = &c;
            let participants = participants.clone();
            async move {
                c.request(request::Body::RoomCreate(v1::RoomCreateRequest {
                    room_id: format!("room-{:04}", batch * 25 + i),
                    name: "a room with many people".into(),
                    participants,
                }))
                .await
                .unwrap()
            }
        }))
        .await;
    }
    let max_frame = s.server().config().limits.max_frame_size;
    let list = |cursor: String, limit: u32| {
        let c = &c;
        async move {
            let req = request::Body::RoomList(v1::RoomListRequest { cursor, limit });
            match c.request(req).await.unwrap() {
                response::Body::RoomList(r) => r,
                other => panic!("{other:?}"),
            }
        }
    };
    let mut seen = Vec::new();
    let mut cursor = String::new();
    let mut pages = 0;
    loop {
        let page = list(cursor.clone(), 0).await;
        pages += 1;
        assert!(page.encoded_len() <= max_frame);
        assert!(!page.rooms.is_empty());
        seen.extend(
            page.rooms
                .iter()
                .map(|r| r.room.as_ref().unwrap().room_id.clone()),
        );
        if !page.more {
            assert!(page.next_cursor.is_empty());
            break;
        }
        cursor = page.next_cursor;
        assert!(pages < 100, "the pages do not end");
    }
    let expected: Vec<String> = (0..ROOMS).map(|i| format!("ann~room-{i:04}")).collect();
    assert_eq!(seen, expected, "every room once, in order");
    assert!(pages > 2, "{pages} pages for about half a megabyte");
    // A small limit gives pages of that size.
    let page = list(String::new(), 10).await;
    assert_eq!(page.rooms.len(), 10);
    assert!(page.more);
    assert_eq!(page.next_cursor, "ann~room-0009");
    let page = list(page.next_cursor, 10).await;
    assert_eq!(
        page.rooms[0].room.as_ref().unwrap().room_id,
        "ann~room-0010",
        "the next page starts after the cursor"
    );
}

both_transports!(a_huge_room_list_is_paged);

// ---- responses over the frame limit -------------------------------------------

/// A document grown past the frame limit by edits is refused at open with
/// `RESPONSE_TOO_LARGE` (nothing is subscribed), as is any other answer that
/// would not fit; the session goes on.
async fn an_oversize_response_is_a_typed_error(t: TransportKind) {
    const FRAME: usize = 4096;
    let s = TestServer::start_with(|c| c.limits.max_frame_size = FRAME).await;
    let c = s.connect(t, "ann").await;
    let chunk = "x".repeat(3000);
    doc(
        &c,
        request::Body::DocCreate(v1::DocCreateRequest {
            doc_id: "big".into(),
            text: chunk.clone(),
        }),
    )
    .await
    .unwrap();
    doc(&c, open("ann~big")).await.unwrap();
    let mut revision = 0;
    let mut len = chunk.len();
    for seq in 1..=3u64 {
        let op = TextOperation::new().retain(len).insert(&chunk);
        let r = doc(
            &c,
            request::Body::DocSubmit(v1::DocSubmitRequest {
                doc_id: "ann~big".into(),
                base_revision: revision,
                op: Some(tutti::protocol::ot_wire::op_to_wire(&op)),
                client_id: "ann-1".into(),
                seq,
            }),
        )
        .await
        .unwrap();
        let response::Body::DocSubmit(r) = r else {
            panic!("{r:?}")
        };
        revision = r.revision;
        len += chunk.len();
    }
    doc(
        &c,
        request::Body::DocClose(v1::DocCloseRequest {
            doc_id: "ann~big".into(),
        }),
    )
    .await
    .unwrap();
    let err = doc(&c, open("ann~big")).await.unwrap_err();
    assert_eq!(code_of(&err), Some(ErrorCode::ResponseTooLarge), "{err:?}");
    // Catching up from a recent revision fits.
    let r = doc(
        &c,
        request::Body::DocOpen(v1::DocOpenRequest {
            doc_id: "ann~big".into(),
            known_revision: Some(revision),
        }),
    )
    .await
    .unwrap();
    assert!(matches!(r, response::Body::DocOpen(_)));
    // Any answer over the limit: an echo whose request fits but answer does not.
    let err = c
        .echo(vec![1; largest_echo_payload(FRAME) - 2], false)
        .await
        .unwrap_err();
    assert_eq!(code_of(&err), Some(ErrorCode::ResponseTooLarge), "{err:?}");
    assert_eq!(c.echo(b"ok".to_vec(), false).await.unwrap(), &b"ok"[..]);
}

both_transports!(an_oversize_response_is_a_typed_error);

/// The largest echo payload whose request fits in `frame` bytes (its answer
/// adds a timestamp, so it does not).
fn largest_echo_payload(frame: usize) -> usize {
    (0..frame)
        .rev()
        .find(|&p| {
            v1::ClientFrame {
                kind: Some(v1::client_frame::Kind::Request(v1::Request {
                    id: 100,
                    body: Some(request::Body::Echo(v1::EchoRequest {
                        payload: vec![1; p].into(),
                        push: false,
                    })),
                })),
            }
            .encoded_len()
                <= frame
        })
        .unwrap()
}

// ---- the HTTP side port ---------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_bodies_over_the_limit_are_refused_on_every_route() {
    let s = TestServer::start_with(|c| c.limits.http_max_body_bytes = 1024).await;
    let big = format!("{{\"user\":\"{}\"}}", "x".repeat(2000));
    let addr = s.server().http_addr();
    let key = s.api_key();
    for path in [
        "/api/v1/events",
        "/api/v1/notifications",
        "/api/dev/token",
        "/healthz",
        "/",
    ] {
        let (status, _) = http_with(addr, "POST", path, Some(&big), Some(&key)).await;
        assert_eq!(status, 413, "{path}");
    }
    // Small bodies are served as before.
    let (status, _) = s.http_post("/api/dev/token", "{\"user\":\"ann\"}").await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_headers_must_arrive_in_time_and_connections_are_capped() {
    let s = TestServer::start_with(|c| {
        c.timeouts.http_header_read = Duration::from_millis(300);
        c.limits.http_max_connections = 2;
    })
    .await;
    let addr = s.server().http_addr();
    // Two slow clients hold both places.
    let mut slow = Vec::new();
    for _ in 0..2 {
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        slow.push(c);
    }
    // Each is disconnected once its header time is up (with a 408 or without a
    // word), and the port serves again.
    for mut c in slow {
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut rest))
            .await
            .expect("a slowloris connection is closed")
            .ok();
        let text = String::from_utf8_lossy(&rest);
        assert!(
            text.is_empty() || text.starts_with("HTTP/1.1 408"),
            "{text}"
        );
    }
    // The cap frees a place when the server has dropped the connection, which
    // may be a moment after the client saw it close.
    assert!(get_when_free(addr, "/healthz").await.is_some());
    // That request's place too.
    s.wait_http_closed().await;
    // Over the cap a connection is closed at once, unanswered.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut first = [0u8; 12];
        c.read_exact(&mut first).await.unwrap();
        held.push(c);
    }
    let mut third = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _ = third
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), third.read_to_end(&mut out))
        .await
        .expect("refused at once");
    assert!(out.is_empty(), "{}", String::from_utf8_lossy(&out));
    drop(held);
    let metrics = get_when_free(addr, "/metrics").await.expect("served again");
    // At least the third connection (retries above may have been refused too).
    let refused: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("tutti_http_refused_total "))
        .and_then(|n| n.trim().parse().ok())
        .expect("the refusal counter");
    assert!(refused >= 1, "{metrics}");
}

/// `GET path`, retried while the port is at its connection cap (closed
/// unanswered); the response of a 200.
async fn get_when_free(addr: std::net::SocketAddr, path: &str) -> Option<String> {
    for _ in 0..100 {
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let _ = c.write_all(request.as_bytes()).await;
        let mut out = Vec::new();
        let _ = c.read_to_end(&mut out).await;
        let text = String::from_utf8_lossy(&out).into_owned();
        if text.starts_with("HTTP/1.1 200") {
            return Some(text);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// Shutdown ends within its drain bound even while a client holds a connection
/// with half a request (it would otherwise wait for that request forever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_within_the_drain_bound_with_a_slowloris_open() {
    const DRAIN: Duration = Duration::from_secs(1);
    let mut s = TestServer::start_with(|c| {
        c.timeouts.drain = DRAIN;
        c.timeouts.http_header_read = Duration::from_secs(3600);
    })
    .await;
    let addr = s.server().http_addr();
    let (status, _) = s.http_get("/healthz").await;
    assert_eq!(status, 200);
    let mut slowloris = tokio::net::TcpStream::connect(addr).await.unwrap();
    slowloris
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .unwrap();
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(30), s.shutdown())
        .await
        .expect("shutdown finishes");
    let took = started.elapsed();
    // The QUIC drain (no sessions: at once), the HTTP drain (DRAIN), the close
    // linger and the rest of the shutdown; without the bound it never ends.
    assert!(took < DRAIN * 3 + Duration::from_secs(5), "took {took:?}");
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), slowloris.read_to_end(&mut rest))
        .await
        .expect("the slowloris connection is closed");
}

// ---- memory per idle session ----------------------------------------------------

/// Resident memory of a process, in bytes (Linux).
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .expect("VmRSS in /proc/<pid>/status");
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .expect("VmRSS in kB");
    kib * 1024
}

/// The real `tutti serve` process holds N idle sessions within a stated ceiling
/// per session (measured: see docs/SECURITY.md (Memory per idle session)).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_per_idle_session_stays_under_the_ceiling() {
    const CEILING: u64 = 256 * 1024;
    const WARM: usize = 20;
    const N: usize = 200;
    tokio::time::timeout(Duration::from_secs(120), async {
        let dir = tempfile::tempdir().unwrap();
        let secret = "memory-test-secret-0123456789abcdef0123";
        let config = dir.path().join("tutti.toml");
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:0\"\nhttp = \"127.0.0.1:0\"\ndata_dir = {:?}\nweb_dir = {:?}\n\
                 [tls]\ncert_dir = {:?}\n[auth]\njwt_secret = {secret:?}\n",
                dir.path().join("data"),
                dir.path().join("web"),
                dir.path().join("certs"),
            ),
        )
        .unwrap();
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tutti"))
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let pid = child.id().unwrap();
        let mut stdout = tokio::io::BufReader::new(child.stdout.take().unwrap());
        let (mut quic, mut pin) = (None, None);
        while quic.is_none() || pin.is_none() {
            use tokio::io::AsyncBufReadExt;
            let mut line = String::new();
            assert!(stdout.read_line(&mut line).await.unwrap() > 0, "banner");
            let line = line.trim();
            if let Some(rest) = line.strip_prefix("raw quic:") {
                quic = rest.split_whitespace().next().map(|a| a.parse().unwrap());
            }
            if let Some((_, rest)) = line.split_once("sha-256 pin ") {
                pin = Some(tutti::client::parse_pin(rest.trim_end_matches(')')).unwrap());
            }
        }
        let auth = tutti::auth::Auth::new(
            secret.as_bytes(),
            tutti::auth::SecretSource::Configured,
            Duration::from_secs(5),
        );
        let connect = |i: usize| {
            let token = auth
                .mint(&format!("idle-{i}"), Duration::from_secs(3600), &[])
                .unwrap();
            let mut c = tutti::client::ClientConfig::new(
                quic.unwrap(),
                if i.is_multiple_of(2) {
                    TransportKind::Quic
                } else {
                    TransportKind::WebTransport
                },
                Trust::Pinned(vec![pin.unwrap()]),
                token,
            );
            c.timeout = Duration::from_secs(30);
            Client::connect(c)
        };
        let mut clients = Vec::new();
        for i in 0..WARM {
            clients.push(connect(i).await.unwrap());
        }
        let before = rss_bytes(pid);
        for batch in 0..N / 20 {
            for c in join_all((0..20).map(|i| connect(WARM + batch * 20 + i))).await {
                clients.push(c.unwrap());
            }
        }
        // Every session has its Welcome; let them all go idle.
        for c in &clients[clients.len() - 5..] {
            c.echo(b"x".to_vec(), false).await.unwrap();
        }
        let after = rss_bytes(pid);
        let per_session = after.saturating_sub(before) / N as u64;
        eprintln!(
            "idle sessions: RSS {} KiB with {WARM}, {} KiB with {}: {} KiB per session",
            before / 1024,
            after / 1024,
            WARM + N,
            per_session / 1024
        );
        assert!(
            per_session < CEILING,
            "{per_session} bytes per idle session, over {CEILING}"
        );
        drop(clients);
        child.kill().await.unwrap();
    })
    .await
    .expect("test timed out");
}
