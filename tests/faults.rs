//! Storage faults and idempotency through the real server: a disk that fails
//! (full, I/O errors, failed fsync) under a running node, retries that must not
//! duplicate (chat client message ids, API `Idempotency-Key`s), and a crash loop
//! that SIGKILLs the `tutti` binary under a mixed write load.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::{TEST_TIMEOUT, TestServer, test_config};
use tutti::client::{Client, ClientConfig, ClientError, Event, Trust};
use tutti::config::Config;
use tutti::protocol::v1::{self, StreamKind, push, request, response};
use tutti::protocol::{CloseCode, ErrorCode};
use tutti::store::fault::{Fault, FaultSwitch};
use tutti::transport::TransportKind;

// ---- helpers ------------------------------------------------------------------

async fn create_room(c: &Client, id: &str, others: &[&str]) {
    match c
        .request(request::Body::RoomCreate(v1::RoomCreateRequest {
            room_id: id.into(),
            name: id.into(),
            participants: others.iter().map(|s| s.to_string()).collect(),
        }))
        .await
        .unwrap()
    {
        response::Body::RoomCreate(_) => {}
        other => panic!("{other:?}"),
    }
}

/// Every notification of the session's user, oldest first.
async fn all_notifications(c: &Client) -> Vec<v1::Notification> {
    let mut out = Vec::new();
    let mut before = 0;
    loop {
        let page = match c
            .request(request::Body::NotifyList(v1::NotifyListRequest {
                before_offset: before,
                limit: 100,
            }))
            .await
            .unwrap()
        {
            response::Body::NotifyList(r) => r,
            other => panic!("{other:?}"),
        };
        let Some(first) = page.notifications.first() else {
            break;
        };
        before = first.offset;
        let more = page.more;
        out.splice(0..0, page.notifications);
        if !more {
            break;
        }
    }
    out
}

fn code<T: std::fmt::Debug>(r: Result<T, ClientError>) -> ErrorCode {
    match r {
        Err(ClientError::Server(e)) => e.error_code().expect("a known code"),
        other => panic!("expected a server error, got {other:?}"),
    }
}

/// The next chat message pushed to `c`, skipping other events.
async fn next_message(c: &Client) -> v1::ChatMessage {
    loop {
        match c.next_event().await.expect("session open") {
            Event::Push(StreamKind::Chat, p) => {
                if let Some(push::Event::ChatMessage(m)) = p.event {
                    return m;
                }
            }
            _ => continue,
        }
    }
}

/// The next notification pushed to `c`, skipping other events.
async fn next_notification(c: &Client) -> v1::Notification {
    loop {
        match c.next_event().await.expect("session open") {
            Event::Push(StreamKind::Notifications, p) => {
                if let Some(push::Event::Notification(n)) = p.event {
                    return n;
                }
            }
            _ => continue,
        }
    }
}

/// `POST /api/v1/notifications` with the API key and, if given, an
/// `Idempotency-Key`: (status, `Idempotent-Replayed` header, body).
async fn notify(
    http: SocketAddr,
    api_key: &str,
    idempotency_key: Option<&str>,
    json: &str,
) -> (u16, String, String) {
    try_notify(http, api_key, idempotency_key, json)
        .await
        .expect("the HTTP port answers")
}

/// [`notify`], or `None` when the connection fails (the server was killed).
async fn try_notify(
    http: SocketAddr,
    api_key: &str,
    idempotency_key: Option<&str>,
    json: &str,
) -> Option<(u16, String, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(http).await.ok()?;
    let req = format!(
        "POST /api/v1/notifications HTTP/1.1\r\nHost: {http}\r\nConnection: close\r\nAuthorization: Bearer {api_key}\r\n{}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{json}",
        idempotency_key
            .map(|k| format!("Idempotency-Key: {k}\r\n"))
            .unwrap_or_default(),
        json.len()
    );
    s.write_all(req.as_bytes()).await.ok()?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.ok()?;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.get(9..12)?.parse().ok()?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let replayed = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("idempotent-replayed:")
                .map(|v| v.trim().to_owned())
        })
        .unwrap_or_default();
    Some((status, replayed, body.to_owned()))
}

/// Polls `/readyz` until it answers `status` (bounded by the test's timeout).
async fn wait_ready(s: &TestServer, status: u16) {
    loop {
        if s.http_get("/readyz").await.0 == status {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn start_faulty(dir: tempfile::TempDir, switch: FaultSwitch) -> TestServer {
    let config = test_config(dir.path());
    let server = tutti::server::start_with_faults(config, switch)
        .await
        .expect("server starts");
    TestServer {
        server: Some(server),
        dir,
    }
}

async fn restart(mut s: TestServer, tweak: impl FnOnce(&mut Config)) -> TestServer {
    s.shutdown().await;
    let dir = s.dir;
    let mut config = test_config(dir.path());
    tweak(&mut config);
    let server = tutti::start(config).await.expect("server restarts");
    TestServer {
        server: Some(server),
        dir,
    }
}

// ---- storage faults -----------------------------------------------------------

/// The disk fails under a running node: a send gets `UNAVAILABLE` and reaches
/// nobody, an API call gets 503 with the same code, `/readyz` says not ready, a
/// session that connects meanwhile is closed with `STORAGE_UNAVAILABLE`. Once the
/// disk works again the node reopens its database by itself; the retried send
/// (same client message id) is stored and delivered once, and everything
/// acknowledged is there, also after a restart.
async fn storage_fault(transport: TransportKind, fault: Fault) {
    let switch = FaultSwitch::new();
    let s = start_faulty(tempfile::tempdir().unwrap(), switch.clone()).await;
    let key = s.api_key();
    let http = s.server().http_addr();
    let ann = s.connect(transport, "ann").await;
    let bob = s.connect(transport, "bob").await;
    create_room(&ann, "r", &["bob", "carl"]).await;
    let before = ann
        .send_message_with_id("ann~r", "before", "m1")
        .await
        .unwrap();
    assert_eq!(before.offset, 1);
    assert_eq!(next_message(&bob).await, before);
    create_doc(&ann, "d").await;
    open_doc(&ann, "ann~d").await;
    let edit = |seq: u64, base: u64, text: &str| v1::DocSubmitRequest {
        doc_id: "ann~d".into(),
        base_revision: base,
        op: Some(insert_at_end(base as usize, text)),
        client_id: "ann-editor".into(),
        seq,
    };
    assert_eq!(submit(&ann, edit(1, 0, "a")).await.unwrap().revision, 1);
    assert_eq!(s.http_get("/readyz").await.0, 200);

    switch.arm(fault);
    let during = ann.send_message_with_id("ann~r", "during", "m2").await;
    assert_eq!(code(during), ErrorCode::Unavailable, "{fault:?}");
    assert!(switch.injected() > 0);
    assert_eq!(
        code(submit(&ann, edit(2, 1, "b")).await),
        ErrorCode::Unavailable
    );
    assert_eq!(s.http_get("/readyz").await.0, 503, "not ready");
    let (status, _, body) = notify(
        http,
        &key,
        Some("n1"),
        r#"{"user_id":"bob","kind":"k","title":"t"}"#,
    )
    .await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains(r#""code":111"#), "{body}");
    assert!(body.contains("UNAVAILABLE"), "{body}");
    // A session that connects now cannot be given its catch-up.
    let carl = Client::connect(s.client_config(transport, &s.token("carl")))
        .await
        .expect("the handshake completes");
    let closed = carl.closed().await;
    assert_eq!(
        closed.close_code(),
        Some(CloseCode::StorageUnavailable),
        "{closed:?}"
    );
    assert!(CloseCode::StorageUnavailable.should_reconnect());
    // Still failing: still unavailable.
    assert_eq!(
        code(ann.send_message_with_id("ann~r", "during", "m2").await),
        ErrorCode::Unavailable
    );

    switch.disarm();
    wait_ready(&s, 200).await;
    assert!(s.server().store().reopens() >= 1);
    let during = ann
        .send_message_with_id("ann~r", "during", "m2")
        .await
        .unwrap();
    assert_eq!(during.offset, 2);
    // Bob got nothing while the disk failed: the next push is the retried send.
    assert_eq!(next_message(&bob).await, during);
    let again = ann
        .send_message_with_id("ann~r", "during", "m2")
        .await
        .unwrap();
    assert_eq!(
        again, during,
        "a resend is answered with the stored message"
    );
    // The document is opened again and the edit resent (same client id and seq):
    // applied once, whether or not the failed commit reached the disk.
    open_doc(&ann, "ann~d").await;
    assert_eq!(submit(&ann, edit(2, 1, "b")).await.unwrap().revision, 2);
    assert!(submit(&ann, edit(2, 1, "b")).await.unwrap().duplicate);
    let (status, replayed, first) = notify(
        http,
        &key,
        Some("n1"),
        r#"{"user_id":"bob","kind":"k","title":"t"}"#,
    )
    .await;
    assert_eq!((status, replayed.as_str()), (201, "false"), "{first}");
    assert_eq!(next_notification(&bob).await.offset, 1);
    // Carl reconnects and resumes.
    let mut config = s.client_config(transport, &s.token("carl"));
    config.resume = HashMap::from([("room/ann~r".to_string(), 0)]);
    let carl = Client::connect(config).await.unwrap();
    assert_eq!(next_message(&carl).await, before);
    assert_eq!(next_message(&carl).await, during);

    let s = restart(s, |_| {}).await;
    let ann = s.connect(transport, "ann").await;
    assert_eq!(
        support::all_messages(&ann, "ann~r").await,
        vec![before, during.clone()]
    );
    let again = ann
        .send_message_with_id("ann~r", "during", "m2")
        .await
        .unwrap();
    assert_eq!(again, during, "remembered across a restart");
    let bob = s.connect(transport, "bob").await;
    assert_eq!(all_notifications(&bob).await.len(), 1);
    let doc = open_doc(&ann, "ann~d").await;
    assert_eq!(doc.revision, 2);
    assert_eq!(
        doc.state,
        Some(v1::doc_open_response::State::Snapshot("ab".into()))
    );
}

async fn disk_full(transport: TransportKind) {
    storage_fault(transport, Fault::DiskFull).await;
}

both_transports!(disk_full);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn io_errors_on_write() {
    tokio::time::timeout(TEST_TIMEOUT, storage_fault(TransportKind::Quic, Fault::Io))
        .await
        .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_fsync() {
    tokio::time::timeout(
        TEST_TIMEOUT,
        storage_fault(TransportKind::WebTransport, Fault::Fsync),
    )
    .await
    .expect("test timed out");
}

/// A commit reaches the disk but its fsync reports an error: its writers were told
/// `UNAVAILABLE`. Once the node has reopened its database, without a retry or any
/// further write: history shows the message, a session connected throughout gets
/// it pushed once, and a session resuming from before it gets it once. The retry
/// (same client message id) then answers it and pushes nothing. Likewise a
/// notification (listed, pushed, resumed; its retry creates nothing).
async fn a_commit_reported_failed_but_durable_is_delivered_once(transport: TransportKind) {
    let switch = FaultSwitch::new();
    let s = start_faulty(tempfile::tempdir().unwrap(), switch.clone()).await;
    let key = s.api_key();
    let http = s.server().http_addr();
    let ann = s.connect(transport, "ann").await;
    let bob = s.connect(transport, "bob").await;
    create_room(&ann, "r", &["bob"]).await;
    let before = ann
        .send_message_with_id("ann~r", "before", "m1")
        .await
        .unwrap();
    assert_eq!(next_message(&bob).await, before);

    switch.arm_durable_failure(b"durable-but-failed");
    let r = ann
        .send_message_with_id("ann~r", "durable-but-failed", "m2")
        .await;
    assert_eq!(code(r), ErrorCode::Unavailable);
    wait_ready(&s, 200).await;
    // No retry, no other write: history has it...
    let history = support::all_messages(&ann, "ann~r").await;
    let texts: Vec<&str> = history.iter().map(|m| m.text.as_str()).collect();
    assert_eq!(texts, ["before", "durable-but-failed"]);
    let durable = history[1].clone();
    assert_eq!(durable.offset, 2);
    // ...the session connected throughout gets it...
    assert_eq!(
        next_message(&bob).await,
        durable,
        "pushed after the recovery"
    );
    // ...and so does one resuming from before it.
    let mut config = s.client_config(transport, &s.token("bob"));
    config.resume = HashMap::from([("room/ann~r".to_string(), before.offset)]);
    let resumed = Client::connect(config).await.unwrap();
    assert_eq!(next_message(&resumed).await, durable, "caught up");
    // Once each.
    assert_no_more_pushes(&bob, StreamKind::Chat).await;
    assert_no_more_pushes(&resumed, StreamKind::Chat).await;
    // The retry finds it stored: the same message, pushed no more.
    let retried = ann
        .send_message_with_id("ann~r", "durable-but-failed", "m2")
        .await
        .unwrap();
    assert_eq!(retried, durable);
    let after = ann
        .send_message_with_id("ann~r", "after", "m3")
        .await
        .unwrap();
    assert_eq!(next_message(&bob).await, after, "and only once");
    assert_eq!(next_message(&resumed).await, after, "and only once");
    let texts: Vec<String> = support::all_messages(&ann, "ann~r")
        .await
        .into_iter()
        .map(|m| m.text)
        .collect();
    assert_eq!(texts, ["before", "durable-but-failed", "after"]);
    drop(resumed);

    let note = |title: &str| format!(r#"{{"user_id":"bob","kind":"k","title":"{title}"}}"#);
    switch.arm_durable_failure(b"note-durable-but-failed");
    let (status, _, body) = notify(http, &key, Some("n1"), &note("note-durable-but-failed")).await;
    assert_eq!(status, 503, "{body}");
    wait_ready(&s, 200).await;
    // No retry, no other notification: the list has it...
    let listed = all_notifications(&bob).await;
    let titles: Vec<&str> = listed.iter().map(|n| n.title.as_str()).collect();
    assert_eq!(titles, ["note-durable-but-failed"]);
    // ...the session connected throughout gets it...
    assert_eq!(next_notification(&bob).await, listed[0]);
    // ...and so does one resuming from before it.
    let mut config = s.client_config(transport, &s.token("bob"));
    config.resume = HashMap::from([("notifications".to_string(), 0)]);
    let resumed = Client::connect(config).await.unwrap();
    assert_eq!(next_notification(&resumed).await, listed[0], "caught up");
    // Once each.
    assert_no_more_pushes(&bob, StreamKind::Notifications).await;
    assert_no_more_pushes(&resumed, StreamKind::Notifications).await;
    // The retry finds it stored and creates nothing.
    let (status, replayed, body) =
        notify(http, &key, Some("n1"), &note("note-durable-but-failed")).await;
    assert_eq!((status, replayed.as_str()), (201, "true"), "{body}");
    assert!(body.contains(r#""offset":1"#), "{body}");
    let (status, replayed, _) = notify(http, &key, Some("n2"), &note("n2")).await;
    assert_eq!((status, replayed.as_str()), (201, "false"));
    assert_eq!(next_notification(&bob).await.title, "n2", "pushed once");
    assert_eq!(next_notification(&resumed).await.title, "n2", "pushed once");
    assert_eq!(all_notifications(&bob).await.len(), 2);
}

/// Fails if `c` gets a chat message, notification or document operation on
/// `kind` before the push
/// answering an echo sent now (a check that what was already pushed to it came
/// once; a later duplicate shows as the next message being the wrong one).
async fn assert_no_more_pushes(c: &Client, kind: StreamKind) {
    c.echo(b"sync".to_vec(), true).await.unwrap();
    loop {
        match c.next_event().await.expect("session open") {
            Event::Push(StreamKind::System, _) => return,
            Event::Push(k, p) if k == kind => assert!(
                !matches!(
                    p.event,
                    Some(
                        push::Event::ChatMessage(_)
                            | push::Event::Notification(_)
                            | push::Event::DocOperation(_)
                    )
                ),
                "pushed again: {p:?}"
            ),
            _ => {}
        }
    }
}

both_transports!(a_commit_reported_failed_but_durable_is_delivered_once);

/// A document operation whose commit reaches the disk but reports an error: its
/// editor is told `UNAVAILABLE` and opens the document again, whose answer has
/// the operation; another session that kept the document open gets it pushed,
/// once; the editor does not get it pushed too; the resend is a duplicate.
async fn a_document_operation_reported_failed_but_durable_is_pushed_once(transport: TransportKind) {
    let switch = FaultSwitch::new();
    let s = start_faulty(tempfile::tempdir().unwrap(), switch.clone()).await;
    let ann = s.connect(transport, "ann").await;
    let other = s.connect(transport, "ann").await;
    create_doc(&ann, "d").await;
    open_doc(&ann, "ann~d").await;
    open_doc(&other, "ann~d").await;
    let edit = |seq: u64, base: u64, text: &str| v1::DocSubmitRequest {
        doc_id: "ann~d".into(),
        base_revision: base,
        op: Some(insert_at_end(base as usize, text)),
        client_id: "ann-editor".into(),
        seq,
    };
    assert_eq!(submit(&ann, edit(1, 0, "a")).await.unwrap().revision, 1);
    assert_eq!(next_operation(&ann).await.revision, 1);
    assert_eq!(next_operation(&other).await.revision, 1);

    switch.arm_durable_failure(b"durable-op");
    assert_eq!(
        code(submit(&ann, edit(2, 1, "durable-op")).await),
        ErrorCode::Unavailable
    );
    wait_ready(&s, 200).await;
    let reopened = match ann
        .request(request::Body::DocOpen(v1::DocOpenRequest {
            doc_id: "ann~d".into(),
            known_revision: Some(1),
        }))
        .await
        .unwrap()
    {
        response::Body::DocOpen(r) => r,
        other => panic!("{other:?}"),
    };
    assert_eq!(reopened.revision, 2);
    let Some(v1::doc_open_response::State::CatchUp(caught_up)) = reopened.state else {
        panic!("{:?}", reopened.state);
    };
    assert_eq!(caught_up.operations.len(), 1);
    assert_eq!(caught_up.operations[0].revision, 2);
    assert_eq!(
        next_operation(&other).await,
        caught_up.operations[0],
        "pushed to the session that kept it open"
    );
    assert_no_more_pushes(&other, StreamKind::Collab).await;
    assert_no_more_pushes(&ann, StreamKind::Collab).await;
    let resent = submit(&ann, edit(2, 1, "durable-op")).await.unwrap();
    assert_eq!((resent.revision, resent.duplicate), (2, true));
    let next = v1::DocSubmitRequest {
        op: Some(insert_at_end("adurable-op".len(), "c")),
        ..edit(3, 2, "c")
    };
    assert_eq!(submit(&ann, next).await.unwrap().revision, 3);
    assert_eq!(next_operation(&ann).await.revision, 3);
    assert_eq!(next_operation(&other).await.revision, 3, "and only once");
}

both_transports!(a_document_operation_reported_failed_but_durable_is_pushed_once);

/// The next document operation pushed to `c`, skipping other events.
async fn next_operation(c: &Client) -> v1::DocOperation {
    loop {
        if let Event::Push(StreamKind::Collab, p) = c.next_event().await.expect("session open")
            && let Some(push::Event::DocOperation(op)) = p.event
        {
            return op;
        }
    }
}

// ---- idempotency ----------------------------------------------------------------

/// A chat send retried with the same client message id (after a lost answer or a
/// reconnect) returns the stored message and is delivered once; another sender's
/// equal id, or no id, is a new message; an over-long id is refused.
async fn a_resent_chat_message_is_stored_and_delivered_once(transport: TransportKind) {
    let s = TestServer::start().await;
    let ann = s.connect(transport, "ann").await;
    let bob = s.connect(transport, "bob").await;
    create_room(&ann, "r", &["bob"]).await;
    // The id starts with the server's time, as its Welcome gave it.
    let id = ann.new_message_id();
    let ms = u64::from_str_radix(&id[..12], 16).unwrap();
    assert!((ann.welcome().server_time_ms..=ann.server_now_ms()).contains(&ms));
    let first = ann
        .send_message_with_id("ann~r", "hello", &id)
        .await
        .unwrap();
    let second = ann
        .send_message_with_id("ann~r", "hello", &id)
        .await
        .unwrap();
    assert_eq!(first, second);
    drop(ann);
    let ann = s.connect(transport, "ann").await;
    let third = ann
        .send_message_with_id("ann~r", "hello", &id)
        .await
        .unwrap();
    assert_eq!(first, third, "after a reconnect");
    // Same id, another sender: its own message.
    let bobs = bob
        .send_message_with_id("ann~r", "mine", &id)
        .await
        .unwrap();
    assert_eq!(bobs.offset, 2);
    // No id: every send is new.
    let a = ann.send_message("ann~r", "x").await.unwrap();
    let b = ann.send_message("ann~r", "x").await.unwrap();
    assert_eq!((a.offset, b.offset), (3, 4));
    for (field, text) in [("client_message_id", "a".repeat(65))] {
        let r = ann.send_message_with_id("ann~r", "x", &text).await;
        assert_eq!(code(r), ErrorCode::BadRequest, "{field}");
    }
    // Bob was pushed each message once.
    let mut pushed = Vec::new();
    for _ in 0..4 {
        pushed.push(next_message(&bob).await.offset);
    }
    assert_eq!(pushed, [1, 2, 3, 4]);
    assert_eq!(support::all_messages(&bob, "ann~r").await.len(), 4);
}

both_transports!(a_resent_chat_message_is_stored_and_delivered_once);

/// `POST /api/v1/notifications` with an `Idempotency-Key`: the same key for the
/// same user gets the same answer and creates one notification (also after a
/// restart); another user's equal key is their own; a malformed key is
/// `BAD_REQUEST`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_notification_with_an_idempotency_key_is_created_once() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let s = TestServer::start().await;
        let key = s.api_key();
        let http = s.server().http_addr();
        // Subscribed once connected (the helper waits for a first answer).
        let bob = s.connect(TransportKind::Quic, "bob").await;
        assert!(all_notifications(&bob).await.is_empty());
        let body = r#"{"user_id":"bob","kind":"k","title":"once"}"#;
        let (status, replayed, first) = notify(http, &key, Some("order-17"), body).await;
        assert_eq!((status, replayed.as_str()), (201, "false"), "{first}");
        let (status, replayed, again) = notify(http, &key, Some("order-17"), body).await;
        assert_eq!((status, replayed.as_str()), (201, "true"));
        assert_eq!(first, again, "the same answer");
        // Another user, same key: a notification of their own.
        let (status, replayed, _) = notify(
            http,
            &key,
            Some("order-17"),
            r#"{"user_id":"carl","kind":"k","title":"once"}"#,
        )
        .await;
        assert_eq!((status, replayed.as_str()), (201, "false"));
        // No key: every call is new.
        for _ in 0..2 {
            assert_eq!(notify(http, &key, None, body).await.0, 201);
        }
        for bad in ["", &"k".repeat(129), "caf\u{e9}", "a b"] {
            let (status, _, body) = notify(http, &key, Some(bad), body).await;
            assert_eq!(status, 400, "{bad:?}: {body}");
            assert!(body.contains(r#""code":101"#), "{body}");
        }
        let pushed: Vec<u64> = [
            next_notification(&bob).await.offset,
            next_notification(&bob).await.offset,
            next_notification(&bob).await.offset,
        ]
        .into();
        assert_eq!(pushed, [1, 2, 3], "the replay was not pushed");
        drop(bob);

        let s = restart(s, |_| {}).await;
        let (status, replayed, after) =
            notify(s.server().http_addr(), &key, Some("order-17"), body).await;
        assert_eq!((status, replayed.as_str()), (201, "true"));
        assert_eq!(after, first, "remembered across a restart");
        let bob = s.connect(TransportKind::Quic, "bob").await;
        assert_eq!(all_notifications(&bob).await.len(), 3);
    })
    .await
    .expect("test timed out");
}

/// Idempotency records are bounded: past `idempotency_max_keys` the oldest are
/// forgotten (and a resend of a forgotten id is a new message).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_records_are_pruned_by_count_and_age() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let s = TestServer::start_with(|c| {
            c.chat.idempotency_max_keys = 2;
            c.notify.idempotency_window = Duration::ZERO;
        })
        .await;
        let ann = s.connect(TransportKind::Quic, "ann").await;
        create_room(&ann, "r", &[]).await;
        for id in ["a", "b", "c"] {
            ann.send_message_with_id("ann~r", id, id).await.unwrap();
        }
        let chat = &s.server().services().chat;
        assert_eq!(chat.idempotency_keys().unwrap(), 3);
        assert_eq!(chat.prune_idempotency().await.unwrap(), 1);
        assert_eq!(chat.idempotency_keys().unwrap(), 2);
        assert_eq!(
            ann.send_message_with_id("ann~r", "c", "c")
                .await
                .unwrap()
                .offset,
            3
        );
        assert_eq!(
            ann.send_message_with_id("ann~r", "a", "a")
                .await
                .unwrap()
                .offset,
            4,
            "forgotten: a new message"
        );
        let notify_svc = &s.server().services().notify;
        let (status, _, _) = notify(
            s.server().http_addr(),
            &s.api_key(),
            Some("k"),
            r#"{"user_id":"ann","kind":"k"}"#,
        )
        .await;
        assert_eq!(status, 201);
        assert_eq!(notify_svc.idempotency_keys().unwrap(), 1);
        // Sent at some millisecond; a zero window drops it once the clock moves.
        let mut pruned = 0;
        while pruned == 0 {
            pruned = notify_svc.prune_idempotency().await.unwrap();
        }
        assert_eq!(notify_svc.idempotency_keys().unwrap(), 0);
    })
    .await
    .expect("test timed out");
}

// ---- the crash loop -----------------------------------------------------------

/// A small seeded generator (xorshift64*), so a failing round can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// What the load has been told was stored, and what was in flight at a kill.
#[derive(Default)]
struct Ledger {
    /// Acknowledged chat messages: offset → text.
    messages: BTreeMap<u64, String>,
    /// A send in flight: (client message id, text).
    message_pending: Option<(String, String)>,
    /// Acknowledged notifications: offset → title.
    notes: BTreeMap<u64, String>,
    /// A notification in flight: (idempotency key, title).
    note_pending: Option<(String, String)>,
    /// Acknowledged document operations: revision → inserted marker.
    ops: BTreeMap<u64, String>,
    /// An operation in flight, as sent.
    op_pending: Option<v1::DocSubmitRequest>,
    /// The next operation's seq.
    seq: u64,
    /// Writes acknowledged in this round.
    acked_this_round: u64,
    /// Writes in flight at a kill and retried after it.
    retried: u64,
    /// Of those, found already stored (answered from the idempotency record).
    retried_stored: u64,
}

struct Node {
    child: tokio::process::Child,
    quic: SocketAddr,
    http: SocketAddr,
}

fn spawn_node(data: &std::path::Path, certs: &std::path::Path) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_tutti"))
        .args([
            "serve",
            "--dev",
            "--listen",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(data)
        .arg("--cert-dir")
        .arg(certs)
        .env_remove("TUTTI_JWT_SECRET")
        .env("TUTTI_LOG", "error")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// Starts the binary and reads its (UDP, HTTP) addresses from its banner.
async fn start_node(data: &std::path::Path, certs: &std::path::Path) -> Node {
    use tokio::io::AsyncBufReadExt;
    let mut child = spawn_node(data, certs);
    let stdout = child.stdout.take().unwrap();
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let mut http = None;
    while let Some(line) = lines.next_line().await.unwrap() {
        if let Some(rest) = line.trim().strip_prefix("page:") {
            let url = rest
                .trim()
                .trim_start_matches("http://")
                .trim_end_matches('/');
            http = Some(url.parse().unwrap());
        }
        if let Some(rest) = line.trim().strip_prefix("raw quic:") {
            tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
            let quic = rest.split_whitespace().next().unwrap().parse().unwrap();
            return Node {
                child,
                quic,
                http: http.expect("the page line comes first"),
            };
        }
    }
    panic!("the server printed no address");
}

fn insert_at_end(len: usize, marker: &str) -> v1::TextOp {
    let op = tutti::ot::TextOperation::new().retain(len).insert(marker);
    tutti::protocol::ot_wire::op_to_wire(&op)
}

async fn create_doc(c: &Client, doc: &str) {
    match c
        .request(request::Body::DocCreate(v1::DocCreateRequest {
            doc_id: doc.into(),
            text: String::new(),
        }))
        .await
        .unwrap()
    {
        response::Body::DocCreate(_) => {}
        other => panic!("{other:?}"),
    }
}

async fn open_doc(c: &Client, doc: &str) -> v1::DocOpenResponse {
    match c
        .request(request::Body::DocOpen(v1::DocOpenRequest {
            doc_id: doc.into(),
            known_revision: None,
        }))
        .await
        .unwrap()
    {
        response::Body::DocOpen(r) => r,
        other => panic!("{other:?}"),
    }
}

async fn submit(
    c: &Client,
    req: v1::DocSubmitRequest,
) -> Result<v1::DocSubmitResponse, ClientError> {
    match c.request(request::Body::DocSubmit(req)).await? {
        response::Body::DocSubmit(r) => Ok(r),
        other => Err(ClientError::Protocol(format!("{other:?}"))),
    }
}

/// Checks the node against the ledger: every acknowledged write is there, offsets
/// and revisions are dense, the document equals the replay of its operations,
/// and the writes that were in flight at the kill, retried with their ids, are
/// stored once.
async fn verify_and_retry(
    ann: &Client,
    bob: &Client,
    node: &Node,
    api_key: &str,
    ledger: &Mutex<Ledger>,
) {
    // Retries first (what a client does after reconnecting).
    let pending = ledger.lock().unwrap().message_pending.take();
    if let Some((id, text)) = pending {
        let m = ann.send_message_with_id("ann~r", &text, &id).await.unwrap();
        assert_eq!(m.text, text);
        let mut l = ledger.lock().unwrap();
        l.retried += 1;
        assert!(l.messages.insert(m.offset, text).is_none());
    }
    let pending = ledger.lock().unwrap().note_pending.take();
    if let Some((key, title)) = pending {
        let json = format!(r#"{{"user_id":"bob","kind":"k","title":"{title}"}}"#);
        let (status, replayed, body) = notify(node.http, api_key, Some(&key), &json).await;
        assert_eq!(status, 201, "{body}");
        let mut l = ledger.lock().unwrap();
        l.retried += 1;
        l.retried_stored += u64::from(replayed == "true");
        drop(l);
        let offset = serde_json::from_str::<serde_json::Value>(&body).unwrap()["offset"]
            .as_u64()
            .unwrap();
        let mut l = ledger.lock().unwrap();
        assert!(l.notes.insert(offset, title).is_none());
    }
    let doc = open_doc(ann, "ann~d").await;
    let pending = ledger.lock().unwrap().op_pending.take();
    if let Some(req) = pending {
        let marker = marker_of(&req);
        let r = submit(ann, req).await.unwrap();
        let mut l = ledger.lock().unwrap();
        l.retried += 1;
        l.retried_stored += u64::from(r.duplicate);
        assert!(l.ops.insert(r.revision, marker).is_none());
    }

    // What the node has, then what it should have.
    let messages = support::all_messages(ann, "ann~r").await;
    let notes = all_notifications(bob).await;
    let opened = open_doc(ann, "ann~d").await;
    let l = ledger.lock().unwrap();

    let offsets: Vec<u64> = messages.iter().map(|m| m.offset).collect();
    assert_eq!(
        offsets,
        (1..=messages.len() as u64).collect::<Vec<_>>(),
        "dense"
    );
    let stored: BTreeMap<u64, String> = messages.into_iter().map(|m| (m.offset, m.text)).collect();
    assert_eq!(
        stored, l.messages,
        "exactly the acknowledged messages, once each"
    );

    let offsets: Vec<u64> = notes.iter().map(|n| n.offset).collect();
    assert_eq!(
        offsets,
        (1..=notes.len() as u64).collect::<Vec<_>>(),
        "dense"
    );
    let stored: BTreeMap<u64, String> = notes.into_iter().map(|n| (n.offset, n.title)).collect();
    assert_eq!(
        stored, l.notes,
        "exactly the acknowledged notifications, once each"
    );

    let replay: String = l.ops.values().map(String::as_str).collect();
    let revisions: Vec<u64> = l.ops.keys().copied().collect();
    assert_eq!(
        revisions,
        (1..=l.ops.len() as u64).collect::<Vec<_>>(),
        "dense"
    );
    let text = match opened.state {
        Some(v1::doc_open_response::State::Snapshot(t)) => t,
        other => panic!("{other:?}"),
    };
    assert_eq!(opened.revision, l.ops.len() as u64);
    assert_eq!(text, replay, "the document is the replay of its operations");
    assert!(doc.revision <= opened.revision);
}

fn marker_of(req: &v1::DocSubmitRequest) -> String {
    req.op
        .as_ref()
        .and_then(|op| {
            op.components.iter().find_map(|c| match &c.kind {
                Some(v1::op_component::Kind::Insert(s)) => Some(s.clone()),
                _ => None,
            })
        })
        .unwrap_or_default()
}

/// The server process is SIGKILLed 20 times at random (seeded) moments under a
/// mixed write load: chat sends with client message ids, API notifications with
/// idempotency keys, document operations. After each restart the database opens,
/// every acknowledged write is there, offsets and revisions are dense, the
/// document is the replay of its operations, and the writes in flight at the kill,
/// retried with the same ids, are not duplicated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_crash_loop_loses_and_duplicates_nothing() {
    const ROUNDS: usize = 20;
    let seed = std::env::var("TUTTI_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_261_203);
    eprintln!("crash loop seed {seed} (TUTTI_CRASH_SEED to replay)");
    let mut rng = Rng(seed | 1);
    tokio::time::timeout(Duration::from_secs(120), async {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let certs = dir.path().join("certs");
        let ledger = Arc::new(Mutex::new(Ledger {
            seq: 1,
            ..Ledger::default()
        }));
        let mut first = true;
        for round in 0..ROUNDS {
            let node = start_node(&data, &certs).await;
            let auth = tutti::auth::Auth::from_config(&Default::default(), true, &data).unwrap();
            let tls = tutti::config::TlsConfig {
                cert_dir: certs.clone(),
                ..Default::default()
            };
            let pin = tutti::tls::CertStore::from_config(&tls).unwrap().pin();
            let api_key = std::fs::read_to_string(data.join("dev-api-key"))
                .unwrap()
                .trim()
                .to_owned();
            let connect = |user: &str| {
                let mut c = ClientConfig::new(
                    node.quic,
                    TransportKind::Quic,
                    Trust::Pinned(vec![pin]),
                    auth.mint(user, Duration::from_secs(600), &[]).unwrap(),
                );
                c.timeout = Duration::from_secs(10);
                Client::connect(c)
            };
            let ann = Arc::new(connect("ann").await.unwrap());
            let bob = connect("bob").await.unwrap();
            if first {
                create_room(&ann, "r", &["bob"]).await;
                // The node runs the default join policy: Bob accepts.
                bob.request(request::Body::RoomInviteAccept(
                    v1::RoomInviteAcceptRequest {
                        room_id: "ann~r".into(),
                    },
                ))
                .await
                .unwrap();
                create_doc(&ann, "d").await;
                first = false;
            }
            verify_and_retry(&ann, &bob, &node, &api_key, &ledger).await;

            // The load: three writers, each one write at a time, until the kill.
            ledger.lock().unwrap().acked_this_round = 0;
            let kill_after = 3 + rng.below(25);
            let acked = Arc::new(tokio::sync::Notify::new());
            let mut load = tokio::task::JoinSet::new();
            {
                let (ann, ledger, acked) = (ann.clone(), ledger.clone(), acked.clone());
                load.spawn(async move {
                    for i in 0.. {
                        let id = format!("c{round}-{i}");
                        let text = format!("msg {round}.{i}");
                        ledger.lock().unwrap().message_pending = Some((id.clone(), text.clone()));
                        let Ok(m) = ann.send_message_with_id("ann~r", &text, &id).await else {
                            return;
                        };
                        let mut l = ledger.lock().unwrap();
                        l.message_pending = None;
                        assert!(l.messages.insert(m.offset, text).is_none());
                        l.acked_this_round += 1;
                        acked.notify_one();
                    }
                });
            }
            {
                let (ledger, acked, http, key) =
                    (ledger.clone(), acked.clone(), node.http, api_key.clone());
                load.spawn(async move {
                    for i in 0.. {
                        let key_id = format!("n{round}-{i}");
                        let title = format!("note {round}.{i}");
                        ledger.lock().unwrap().note_pending = Some((key_id.clone(), title.clone()));
                        let json = format!(r#"{{"user_id":"bob","kind":"k","title":"{title}"}}"#);
                        let Some((201, _, body)) =
                            try_notify(http, &key, Some(&key_id), &json).await
                        else {
                            return;
                        };
                        let Ok(v) = serde_json::from_str::<serde_json::Value>(&body) else {
                            return;
                        };
                        let offset = v["offset"].as_u64().unwrap();
                        let mut l = ledger.lock().unwrap();
                        l.note_pending = None;
                        assert!(l.notes.insert(offset, title).is_none());
                        l.acked_this_round += 1;
                        acked.notify_one();
                    }
                });
            }
            {
                let (ann, ledger, acked) = (ann.clone(), ledger.clone(), acked.clone());
                load.spawn(async move {
                    for i in 0.. {
                        let req = {
                            let mut l = ledger.lock().unwrap();
                            let len: usize = l.ops.values().map(|m| m.chars().count()).sum();
                            let marker = format!("[{round}.{i}]");
                            let req = v1::DocSubmitRequest {
                                doc_id: "ann~d".into(),
                                base_revision: l.ops.len() as u64,
                                op: Some(insert_at_end(len, &marker)),
                                client_id: "crash-loop".into(),
                                seq: l.seq,
                            };
                            l.seq += 1;
                            l.op_pending = Some(req.clone());
                            req
                        };
                        let marker = marker_of(&req);
                        let Ok(r) = submit(&ann, req).await else {
                            return;
                        };
                        let mut l = ledger.lock().unwrap();
                        l.op_pending = None;
                        assert!(!r.duplicate);
                        assert!(l.ops.insert(r.revision, marker).is_none());
                        l.acked_this_round += 1;
                        acked.notify_one();
                    }
                });
            }
            while ledger.lock().unwrap().acked_this_round < kill_after {
                acked.notified().await;
            }
            let mut node = node;
            node.child.kill().await.unwrap(); // SIGKILL: no shutdown, no flush
            load.abort_all();
            while load.join_next().await.is_some() {}
            drop((ann, bob));
        }
        // One more start: the last kill is checked too.
        let node = start_node(&data, &certs).await;
        let auth = tutti::auth::Auth::from_config(&Default::default(), true, &data).unwrap();
        let tls = tutti::config::TlsConfig {
            cert_dir: certs.clone(),
            ..Default::default()
        };
        let pin = tutti::tls::CertStore::from_config(&tls).unwrap().pin();
        let api_key = std::fs::read_to_string(data.join("dev-api-key")).unwrap();
        let connect = |user: &str| {
            Client::connect(ClientConfig::new(
                node.quic,
                TransportKind::Quic,
                Trust::Pinned(vec![pin]),
                auth.mint(user, Duration::from_secs(600), &[]).unwrap(),
            ))
        };
        let ann = connect("ann").await.unwrap();
        let bob = connect("bob").await.unwrap();
        verify_and_retry(&ann, &bob, &node, api_key.trim(), &ledger).await;
        let l = ledger.lock().unwrap();
        eprintln!(
            "after {ROUNDS} kills: {} messages, {} notifications, {} operations; \
             {} writes retried after a kill, {} of them (notifications, operations) found stored",
            l.messages.len(),
            l.notes.len(),
            l.ops.len(),
            l.retried,
            l.retried_stored,
        );
        assert!(l.messages.len() + l.notes.len() + l.ops.len() >= 3 * ROUNDS);
    })
    .await
    .expect("test timed out");
}
